"""Shared fixtures.  Integration tests start the real daemon (tests/daemon.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon import Daemon  # noqa: E402
from dnsserver import dns_server  # noqa: E402,F401  (a shared fixture: a real DNS server)


@pytest.fixture
def make_daemon(tmp_path):
    """Factory: make_daemon(**config_sections) -> a started Daemon, stopped at teardown."""
    made = []

    def make(start: bool = True, subdir: str | None = None, **kw):
        d = Daemon(tmp_path / (subdir or f"d{len(made)}"), **kw)
        os.makedirs(d.dir, exist_ok=True)
        d.write_config()
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()
