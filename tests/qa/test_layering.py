"""The layering of mta/ (DESIGN.md, STYLE.md), checked on every run of the suite.

The rules, read from the import statements of every module under ``mta/``
with ``ast`` (``import x``, ``from x import y``, relative imports; at module
level and inside functions, classes, ``try`` and ``if`` blocks alike):

1. A **role** package (one per process role: ``mta/acceptor``, ``mta/spool``,
   ``mta/delivery``, ``mta/supervisor``, ``mta/admin``, ``mta/events``) never
   imports another role: roles
   talk over the bus.
2. A **library** (everything else under ``mta/``: ``mta/bus``, ``mta/config``,
   ``mta/store.py``, ...) never imports a role.
3. The **entry points** (``mta/cli.py``, ``mta/__main__.py``) may import any
   library and, of the roles, only ``mta.supervisor``: ``mta serve`` runs the
   supervisor and ``mta print-services`` prints its process table.  Everything
   else the CLI needs (the config, the bus conversations with a running
   daemon, the segment store for ``spool-dump``, password hashing) lives in
   libraries.  Nothing imports an entry point but ``mta/__main__.py``.
4. Only ``mta/bus/`` imports ``zmq`` and ``msgpack``, the wire libraries.
   (``msgspec`` is not one of them: the config schema and the store's on-disk
   records use it, and bus records may be declared with it.)

Not an import: the supervisor starts each role in its child process from the
entry string of the process table (``"mta.spool.main:main"`` in
``mta/supervisor/services.py``) through ``importlib.import_module``.  That is
how a parent starts a role, like Postfix's master runs the programs named in
master.cf, and it is allowed.  The checker reads import statements only, so
strings passed to importlib are not seen.

CI runs it by name like every test under tests/: ``.ci/run`` runs the README's
test command, ``scripts/run-tests``, whose pytest collects all of ``tests/``
(``testpaths`` in pyproject.toml), ``tests/qa/test_layering.py`` included.
Run it by hand (prints every violation as ``path:line: what``; exit 1 if any)::

    python3 tests/qa/test_layering.py [ROOT]     # ROOT: a checkout, default this one
"""
from __future__ import annotations

import ast
import os
import sys
import textwrap
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGE = "mta"
ROLES = ("acceptor", "spool", "delivery", "supervisor", "admin", "events", "webhooks")
ENTRY_POINTS = ("mta.cli", "mta.__main__")
ENTRY_POINT_ROLES = ("supervisor",)      # the roles an entry point may import
BUS = "mta.bus"
WIRE = ("zmq", "msgpack")                # imported only inside mta/bus/


@dataclass(frozen=True, order=True)
class Violation:
    path: str       # relative to the checked root, e.g. "mta/spool/main.py"
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def module_name(relpath: str) -> str:
    """The dotted module name of a file: mta/spool/__init__.py -> mta.spool."""
    parts = relpath[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute names an Import/ImportFrom node may import.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (c may be a submodule);
    relative imports are resolved against *module*'s package.
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        keep = len(package) - (node.level - 1)
        if keep <= 0:
            return []   # beyond the top package: Python refuses it anyway
        base = ".".join(package[:keep] + ([node.module] if node.module else []))
    names = [base] if node.module else []
    return names + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def role_of(name: str) -> str | None:
    """The role package a dotted module name belongs to, or None."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == PACKAGE and parts[1] in ROLES:
        return parts[1]
    return None


def within(name: str, package: str) -> bool:
    """True when module *name* is *package* or inside it."""
    return name == package or name.startswith(package + ".")


def check_module(relpath: str, source: str) -> list[Violation]:
    """Every layering violation in one module's source, one per statement and target."""
    module = module_name(relpath)
    is_package = relpath.endswith("/__init__.py")
    own_role = role_of(module)
    entry = module in ENTRY_POINTS
    out = {}    # (line, what is broken) -> Violation; the first (shortest) name tells it
    for node in ast.walk(ast.parse(source, relpath)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for name in imported_modules(node, module, is_package):
            top = name.split(".")[0]
            if top in WIRE and not within(module, BUS):
                what = f"imports {top}" + (f" ({name})" if name != top else "")
                out.setdefault((node.lineno, top),
                               Violation(relpath, node.lineno, f"{what}; only {BUS} may"))
            role = role_of(name)
            if role is not None and role != own_role:
                if own_role is not None:
                    what = f"role {own_role} imports role {role} ({name})"
                elif not entry:
                    what = f"library imports role {role} ({name})"
                elif role not in ENTRY_POINT_ROLES:
                    what = f"entry point imports role {role} ({name})"
                else:
                    what = None
                if what:
                    out.setdefault((node.lineno, role), Violation(relpath, node.lineno, what))
            if name in ENTRY_POINTS and module != "mta.__main__":
                out.setdefault((node.lineno, name), Violation(
                    relpath, node.lineno, f"imports the entry point {name}"))
    return sorted(out.values())


def python_files(root: str) -> list[str]:
    """Every .py file under ROOT/mta, as paths relative to ROOT, sorted."""
    found = []
    for d, dirs, files in os.walk(os.path.join(root, PACKAGE)):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for f in files:
            if f.endswith(".py"):
                found.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(found)


def check_tree(root: str) -> list[Violation]:
    """Every layering violation in the mta package under *root*."""
    out = []
    for rel in python_files(root):
        with open(os.path.join(root, rel), encoding="utf-8") as fh:
            out += check_module(rel, fh.read())
    return out


# ---------------------------------------------------------------- the real tree


def test_mta_keeps_its_layers():
    violations = check_tree(REPO)
    assert not violations, "layering violations (see tests/qa/test_layering.py):\n" + \
        "\n".join(map(str, violations))


def test_the_checker_reads_the_real_tree():
    """Not vacuous: every role exists, and the tree's mta imports are seen."""
    files = python_files(REPO)
    for role in ROLES:
        assert f"mta/{role}/main.py" in files, role
    for entry in ENTRY_POINTS:
        assert entry.replace(".", "/") + ".py" in files, entry
    seen = set()
    for rel in files:
        with open(os.path.join(REPO, rel), encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), rel)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                seen.update(imported_modules(node, module_name(rel),
                                             rel.endswith("/__init__.py")))
    assert {"mta.bus", "mta.config", "mta.store", "mta.passwords",
            "mta.supervisor.main"} <= seen


def test_the_roles_are_the_process_table():
    """ROLES above names the roles the supervisor runs, and the supervisor itself."""
    from mta import config
    from mta.supervisor.services import table

    services = table(config.load(None, cpu_count=2))
    assert {s.role for s in services} | {"supervisor"} == set(ROLES)
    for s in services:   # each entry string names a module of its own role
        assert role_of(s.entry.split(":")[0]) == s.role


# ---------------------------------------------------------------- the checker


def write_tree(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_reports_each_kind_of_violation(tmp_path):
    write_tree(tmp_path, {
        "mta/__init__.py": "",
        "mta/__main__.py": "from mta.cli import main\n",
        "mta/bus/__init__.py": "import zmq\nimport msgpack\n",
        "mta/config/__init__.py": """\
            from mta.bus import encode
            from .schema import Config


            def _read(path):
                from mta.acceptor.auth import parse  # a library importing a role
            """,
        "mta/config/schema.py": "import msgspec\n",
        "mta/acceptor/__init__.py": "",
        "mta/acceptor/main.py": """\
            import zmq
            from mta import bus, config
            from mta.acceptor import smtp
            from . import smtp as again


            def commit():
                from mta.spool.main import Shard
            """,
        "mta/acceptor/smtp.py": "from .. import delivery\nfrom ..spool import store\n",
        "mta/spool/__init__.py": "",
        "mta/spool/main.py": "from zmq.utils.monitor import recv_monitor_message\n",
        "mta/delivery/__init__.py": "",
        "mta/delivery/main.py": "import mta.supervisor.notify\nfrom mta import cli\n",
        "mta/supervisor/__init__.py": "",
        "mta/supervisor/main.py": """\
            import importlib


            def spawn(entry="mta.spool.main:main"):
                mod_name, func = entry.split(":")
                return getattr(importlib.import_module(mod_name), func)  # allowed
            """,
        "mta/supervisor/services.py": "",
        "mta/cli.py": """\
            from mta.supervisor.main import serve
            from mta.supervisor.services import table


            def spool_dump():
                from mta.spool.store import Store
            """,
    })
    got = [str(v) for v in check_tree(str(tmp_path))]
    assert got == [
        "mta/acceptor/main.py:1: imports zmq; only mta.bus may",
        "mta/acceptor/main.py:8: role acceptor imports role spool (mta.spool.main)",
        "mta/acceptor/smtp.py:1: role acceptor imports role delivery (mta.delivery)",
        "mta/acceptor/smtp.py:2: role acceptor imports role spool (mta.spool)",
        "mta/cli.py:6: entry point imports role spool (mta.spool.store)",
        "mta/config/__init__.py:6: library imports role acceptor (mta.acceptor.auth)",
        "mta/delivery/main.py:1: role delivery imports role supervisor "
        "(mta.supervisor.notify)",
        "mta/delivery/main.py:2: imports the entry point mta.cli",
        "mta/spool/main.py:1: imports zmq (zmq.utils.monitor); only mta.bus may",
    ]


def test_the_checker_passes_a_clean_tree(tmp_path):
    write_tree(tmp_path, {
        "mta/__init__.py": "",
        "mta/__main__.py": "from mta.cli import main\n",
        "mta/bus/__init__.py": "import zmq\nfrom msgpack import packb\n",
        "mta/bus/sockets.py": "from zmq.utils.monitor import recv_monitor_message\n",
        "mta/store.py": "import msgspec\nfrom mta import native\n",
        "mta/native.py": "",
        "mta/spool/__init__.py": "",
        "mta/spool/main.py": "from mta import bus\nfrom mta.store import Store\n"
                             "from . import schedule\nfrom .schedule import due\n",
        "mta/spool/schedule.py": "",
        "mta/cli.py": "from mta.supervisor.main import serve\nfrom mta.store import Store\n",
        "mta/supervisor/__init__.py": "",
        "mta/supervisor/main.py": "from mta.supervisor import notify\nfrom mta import config\n",
    })
    assert check_tree(str(tmp_path)) == []


if __name__ == "__main__":
    found = check_tree(sys.argv[1] if len(sys.argv) > 1 else REPO)
    for v in found:
        print(v)
    print(f"{len(found)} layering violation(s)", file=sys.stderr)
    sys.exit(1 if found else 0)
