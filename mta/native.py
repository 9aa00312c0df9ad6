"""Choose the compiled hot-path modules or their pure-Python twins.

``load("scanner")`` returns ``mta._ext.scanner`` when it was built, else fails
loudly; with ``MTA_PUREPYTHON=1`` in the environment it returns
``mta._pure.scanner``.  There is no silent fallback: a missing extension is an
installation error, and the daemon logs which implementation is live.
"""
import importlib
import os

PURE = os.environ.get("MTA_PUREPYTHON", "") not in ("", "0")


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


def implementation() -> str:
    """Say which implementation is live, for the start-up log line."""
    return "pure-python" if PURE else "compiled"
