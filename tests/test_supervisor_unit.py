"""The supervisor's restart of a dead child, in process: a fork that fails."""
from __future__ import annotations

import errno
import os
import time

import pytest

from mta import config as mconfig
from mta.supervisor import main as sup_main


def test_a_child_that_cannot_be_forked_is_tried_again_later(tmp_path, monkeypatch):
    # fork() fails with EAGAIN when the unit reaches its TasksMax (or memory is short):
    # the supervisor -- and with it every child -- must not end; the slot is tried again
    # after its back-off, and no pipe is left open.
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    sup = sup_main.Supervisor(mconfig.load(str(path)), str(path))
    slot = sup_main.Slot("delivery", 0, [], restart_at=0.0)
    sup.slots[("delivery", 0)] = slot

    def no_fork():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
    monkeypatch.setattr(sup_main.os, "fork", no_fork)
    fds = len(os.listdir("/proc/self/fd"))
    before = slot.backoff
    sup.restart_due()
    assert slot.child is None
    assert slot.restart_at is not None and slot.restart_at > time.monotonic()
    assert slot.backoff > before
    assert len(os.listdir("/proc/self/fd")) == fds
    # Every other caller (a first start, a reload, an upgrade's fallback) gets the
    # StartupError it handles, not an OSError that would end the supervisor.
    with pytest.raises(sup_main.StartupError, match=r"cannot start delivery\[0\]"):
        sup.spawn(slot, sup.settings)
    assert len(os.listdir("/proc/self/fd")) == fds
