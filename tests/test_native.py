"""mta.native: which hot-path implementation is loaded, and saying so truthfully."""
import os
import subprocess
import sys

import pytest

from mta import native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", native.MODULES)
def test_kind_is_read_from_the_module(name):
    assert native.kind(native.load(name, pure=False)) == "compiled"
    assert native.kind(native.load(name, pure=True)) == "pure-python"


def test_implementation_reports_what_load_gives():
    want = "pure-python" if native.PURE else "compiled"
    assert native.implementation() == want
    assert native.implementation("scanner") == want


def test_implementation_reports_the_module_really_imported_not_the_variable(monkeypatch):
    """A pure module where the compiled one should be (a stale or shadowing file) shows."""
    monkeypatch.setattr(native, "PURE", False)
    monkeypatch.setitem(sys.modules, "mta._ext.record", native.load("record", pure=True))
    assert native.implementation("record") == "pure-python"
    assert native.implementation("scanner") == "compiled"
    assert native.implementation() == \
        "mixed (envelope compiled, evkernel compiled, fields compiled, mime compiled, "\
        "qindex compiled, record pure-python, render compiled, reply compiled, "\
        "scanner compiled, smtppath compiled)"


@pytest.mark.parametrize("pure, want", [("1", "pure-python"), ("0", "compiled"),
                                        ("", "compiled")])
def test_the_environment_variable_selects_the_implementation(pure, want):
    env = dict(os.environ, MTA_PUREPYTHON=pure, PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", "from mta import native; print(native.implementation())"],
        env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == want


def test_pure_python_imports_no_compiled_module_anywhere():
    """With MTA_PUREPYTHON=1, importing every module of the package (every role's code, as
    the daemon's processes do) loads no mta._ext module: nothing bypasses native.load."""
    code = (
        "import importlib, pkgutil, sys, mta\n"
        "names = [m.name for m in pkgutil.walk_packages(mta.__path__, 'mta.')\n"
        "         if not m.name.startswith(('mta._ext', 'mta.__main__'))]\n"
        "for n in names: importlib.import_module(n)\n"
        "print(len(names), sorted(m for m in sys.modules if m.startswith('mta._ext.')))\n")
    # (The compiled run shows the check sees a compiled import: mime, the events
    # kernel, the HTTP API's template renderer and header fields, the delivery client's
    # envelope writer and reply reader, and the SMTP session's path check are loaded at
    # import time; the scanner and the record codec are loaded when an acceptor or a
    # store starts.)
    for pure, want in (("1", []),
                       ("0", ["mta._ext.envelope", "mta._ext.evkernel", "mta._ext.fields",
                              "mta._ext.mime", "mta._ext.render", "mta._ext.reply",
                              "mta._ext.smtppath"])):
        env = dict(os.environ, MTA_PUREPYTHON=pure, PYTHONPATH=REPO)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=REPO).stdout.split(" ", 1)
        assert int(out[0]) > 50, out            # the walk found the package's modules
        assert eval(out[1]) == want, (pure, out)  # noqa: S307 - our own repr of a list
