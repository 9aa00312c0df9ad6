"""Shared fixtures.  Integration tests start the real daemon (tests/daemon.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon import Daemon  # noqa: E402
from dnsserver import dns_server  # noqa: E402,F401  (a shared fixture: a real DNS server)


def pytest_collection_modifyitems(session, config, items):
    """Modules with a test marked `slow` (the chaos soak: two minutes on its own) come
    first.  scripts/run-tests spreads whole modules over workers (pytest-xdist,
    --dist loadfile --no-loadscope-reorder) in collection order: started first, the
    longest module runs beside the others instead of alone at the end.  The order within
    a module is kept."""
    slow = {item.module.__name__ for item in items
            if item.get_closest_marker("slow") is not None and getattr(item, "module", None)}
    if slow:
        items.sort(key=lambda item: getattr(item, "module", None) is None
                   or item.module.__name__ not in slow)


class DaemonFactory:
    """make(**config_sections) -> a Daemon in a directory of its own under *base*, started
    unless start=False (subdir names the directory); close() stops every one it made."""

    def __init__(self, base):
        self.base = base
        self.made: list[Daemon] = []

    def __call__(self, start: bool = True, subdir: str | None = None, **kw) -> Daemon:
        d = Daemon(self.base / (subdir or f"d{len(self.made)}"), **kw)
        os.makedirs(d.dir, exist_ok=True)
        d.write_config()
        self.made.append(d)
        if start:
            d.start()
        return d

    def close(self) -> None:
        for d in self.made:
            d.cleanup()


@pytest.fixture
def make_daemon(tmp_path):
    """Factory: make_daemon(**config_sections) -> a started Daemon, stopped at teardown."""
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def make_module_daemon(tmp_path_factory, request):
    """The same factory for daemons that the tests of one module share (tests that only
    talk to it and read its queue).  At teardown, after it stopped, a shared daemon's log
    must hold no Traceback: many sessions went through it."""
    factory = DaemonFactory(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]))
    yield factory
    factory.close()
    for d in factory.made:
        assert "Traceback" not in d.log(), d.log()[-4000:]


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()
