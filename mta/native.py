"""Choose the compiled hot-path modules or their pure-Python twins.

``load("scanner")`` returns ``mta._ext.scanner`` when it was built, else fails
loudly; with ``MTA_PUREPYTHON=1`` in the environment it returns
``mta._pure.scanner``.  There is no silent fallback: a missing extension is an
installation error, and the daemon logs which implementation is live:
:func:`implementation` looks at the modules :func:`load` returns, not at the
environment.
"""
import importlib
import importlib.machinery
import os

PURE = os.environ.get("MTA_PUREPYTHON", "") not in ("", "0")

MODULES = ("scanner", "record", "mime", "qindex", "reply", "envelope", "render",
           "fields", "evkernel", "smtppath")   # every hot-path module, in ext/ and mta/_pure/


def load(name: str, pure: bool | None = None):
    """Return the implementation of hot-path module *name*."""
    if pure is None:
        pure = PURE
    if pure:
        return importlib.import_module("mta._pure." + name)
    try:
        return importlib.import_module("mta._ext." + name)
    except ImportError as exc:
        raise ImportError(
            f"compiled module mta._ext.{name} is not built ({exc}); "
            "run 'pip install .' (or set MTA_PUREPYTHON=1 to use the pure twins)"
        ) from exc


def kind(module) -> str:
    """'compiled' for an extension module, else 'pure-python' (from the module itself)."""
    spec = getattr(module, "__spec__", None)
    loader = getattr(spec, "loader", None)
    return ("compiled" if isinstance(loader, importlib.machinery.ExtensionFileLoader)
            else "pure-python")


def implementation(*names: str) -> str:
    """Say which implementation of the hot-path modules is live, for the start-up log line.

    Looks at the modules :func:`load` returns for *names* (default: all of
    :data:`MODULES`), importing them if need be: "compiled" or "pure-python"
    when they agree, else each one's, e.g. "mixed (mime compiled, record
    pure-python, scanner compiled)".
    """
    kinds = {name: kind(load(name)) for name in sorted(names or MODULES)}
    found = set(kinds.values())
    if len(found) == 1:
        return found.pop()
    return "mixed (" + ", ".join(f"{n} {k}" for n, k in kinds.items()) + ")"
