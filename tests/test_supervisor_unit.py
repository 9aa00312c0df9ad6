"""The supervisor's restart of a dead child, in process: a fork that fails."""
from __future__ import annotations

import errno
import fcntl
import gc
import os
import signal
import socket
import time

import pytest

from mta import config as mconfig
from mta.supervisor import main as sup_main
from mta.supervisor import services


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
    # (garbage an earlier test of this worker left -- sockets, pipes -- is collected now,
    # not while this test counts: a collection in between closed 12 of them in one run)
    gc.collect()
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


def test_a_child_told_to_stop_while_it_starts_stops(tmp_path, monkeypatch):
    # A child inherits the supervisor's SIGTERM handler, which only notes the signal,
    # until its role's start_role resets it -- after the role's modules are imported (a
    # few hundred ms the first time).  A SIGTERM meanwhile (a stop just after a restart
    # of a crashing child; the supervisor's death, PR_SET_PDEATHSIG) was lost: the child
    # started and served on, the stop waited out its grace and killed it, and an orphan
    # kept its sockets and spool shard.  Here the import takes 1 s.
    (tmp_path / "slow_role_mod.py").write_text(
        "import time\ntime.sleep(1.0)\n"
        "def main(settings, index, ready_fd):\n    time.sleep(5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    sup = sup_main.Supervisor(mconfig.load(str(path)), str(path))
    monkeypatch.setattr(sup_main, "table", lambda settings: [
        services.Service("slow", 1, "slow_role_mod:main", (), "always", "keep")])
    signal.signal(signal.SIGTERM, sup.on_signal)      # as in Supervisor.run
    child = None
    try:
        child = sup.spawn(sup_main.Slot("slow", 0, []), sup.settings)
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while True:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                break
            assert time.monotonic() < deadline, "the child did not stop"
            time.sleep(0.05)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if child is not None:
            try:
                os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            if child.ready_fd is not None:
                os.close(child.ready_fd)


def test_an_upgrades_lock_of_another_state_directory_is_let_go(tmp_path, monkeypatch):
    # An upgrade to a configuration that moves server.state_dir hands over the old
    # directory's run/mta.lock ($MTA_LOCK_FD): the new supervisor takes the new
    # directory's lock and closes the old one, so the old directory is not kept locked
    # by it and its children.  A descriptor that is not a lock file is left alone.
    old = tmp_path / "old" / "run"
    old.mkdir(parents=True)
    old_lock = str(old / mconfig.SUPERVISOR_LOCK)
    held = os.open(old_lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)     # (the upgraded daemon's lock)
    other = os.open(str(tmp_path / "not-a-lock"), os.O_RDWR | os.O_CREAT, 0o644)
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    for fd in (held, other):
        monkeypatch.setenv(sup_main.LOCK_ENV, str(fd))
        sup = sup_main.Supervisor(mconfig.load(str(path)), str(path))
        os.makedirs(sup.settings.run_dir, exist_ok=True)
        sup._lock_run_dir()
        try:
            assert os.readlink(f"/proc/self/fd/{sup.lock_fd}") == \
                os.path.join(sup.settings.run_dir, mconfig.SUPERVISOR_LOCK)
            if fd == other:
                assert os.readlink(f"/proc/self/fd/{other}").endswith("not-a-lock")
                os.close(other)
        finally:
            os.close(sup.lock_fd)
    probe = os.open(old_lock, os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the old directory is free
    finally:
        os.close(probe)


def test_an_ipv6_listener_is_named_in_brackets(tmp_path):
    # The ready / reloaded line (the log, systemctl status) and a listener's failure named
    # [::1]:PORT as "::1:PORT" -- an IPv6 address of its own, with no port.
    from daemon import free_port

    port, taken = free_port(), socket.socket(socket.AF_INET6)
    taken.bind(("::1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[smtp]\nlisten = ["127.0.0.1:{port}", "[::1]:{port}"]\n'
                    f'[admin]\nagent_listen = ["[::1]:{busy}"]\n')
    sup = sup_main.Supervisor(mconfig.load(str(path)), str(path))
    line = sup.status_line()
    assert f"SMTP on 127.0.0.1:{port}, [::1]:{port}," in line, line
    assert f"HAProxy agent on [::1]:{busy};" in line, line
    with pytest.raises(sup_main.StartupError) as exc:
        sup.bind_all([("::1", busy)], first=True)
    assert str(exc.value).startswith(f"cannot listen on [::1]:{busy}: "), exc.value
    taken.close()


@pytest.mark.parametrize("usec, warned", [("500000", True), ("999999", True), ("1", True),
                                          ("1000000", False), ("30000000", False),
                                          ("", False), ("0", False)])
def test_a_watchdog_interval_below_one_second_is_warned_of_at_start(
        monkeypatch, caplog, usec, warned):
    """WatchdogSec= below 1 s was taken without a word, though the supervisor pings at
    half of it from waits of up to a TICK and cannot keep up: systemd then kills the
    unit now and then.  The start says so, naming the value, and still takes it."""
    from mta.supervisor import notify
    monkeypatch.setattr(notify, "_watchdog", dict(notify._watchdog))
    env = {"WATCHDOG_USEC": usec} if usec else {}
    caplog.set_level("WARNING", logger=sup_main.log.name)
    sup_main._note_watchdog(notify.take_watchdog(env))
    said = [r.getMessage() for r in caplog.records if "watchdog" in r.getMessage()]
    if warned:
        assert len(said) == 1 and f"WATCHDOG_USEC={usec}" in said[0], said
        assert f"{int(usec) / 1e6:g} s" in said[0] and "WatchdogSec=" in said[0]
    else:
        assert said == []
    assert notify.watchdog_usec() == (int(usec) if usec else 0)   # taken all the same


def test_a_reload_that_adds_an_address_keeps_the_sockets_of_the_ones_that_stay(tmp_path):
    # A reload that changed smtp.listen bound every address of the new list anew, so a
    # new socket joined the SO_REUSEPORT group of an address that already listened: the
    # kernel queued connections on it, and when the reload failed (or the old socket
    # was closed after it) the ones queued there were reset.  An address in both lists
    # keeps its socket; only the new one is bound, and closed again if unused.
    from daemon import free_port

    a, b = free_port(), free_port()
    path = tmp_path / "mta.toml"
    text = f'[server]\nstate_dir = "{tmp_path / "state"}"\n[smtp]\nacceptors = 2\n'
    path.write_text(text + f'listen = ["127.0.0.1:{a}"]\n')
    old = mconfig.load(str(path))
    sup = sup_main.Supervisor(old, str(path))
    sup.slots.update(sup.bind_slots(old, "acceptor", 2, old.listen))
    path.write_text(text + f'listen = ["127.0.0.1:{b}", "127.0.0.1:{a}"]\n')
    new = mconfig.load(str(path))
    try:
        fresh = sup._fresh_slots(old, new)
        for i in range(2):
            prev, slot = sup.slots[("acceptor", i)], fresh[("acceptor", i)]
            assert slot.socks[1] is prev.socks[0]
            assert slot.socks[0].getsockname() == ("127.0.0.1", b)
        added = [fresh[("acceptor", i)].socks[0] for i in range(2)]
        sup._close_unshared(fresh)
        assert all(x.fileno() == -1 for x in added)
        assert all(sl.socks[0].fileno() != -1 for sl in sup.slots.values())
    finally:
        for sl in sup.slots.values():
            for x in sl.all_socks():
                x.close()


def fake_acceptors(tmp_path, monkeypatch, source: str, n: int, server: str = ""):
    """A Supervisor of *n* acceptor slots whose processes run *source*'s main() (a module
    written in *tmp_path*), with *server*: more [server] lines; (settings, supervisor)."""
    (tmp_path / "fake_acceptor_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FAKE_ACCEPTOR_DIR", str(tmp_path))
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\nready_timeout = 20\n'
                    f'{server}[smtp]\nacceptors = {n}\n')
    settings = mconfig.load(str(path))
    sup = sup_main.Supervisor(settings, str(path))
    monkeypatch.setattr(sup_main, "table", lambda s: [
        services.Service("acceptor", n, "fake_acceptor_mod:main", (), "always", "replace")])
    for i in range(n):
        sup.slots[("acceptor", i)] = sup_main.Slot("acceptor", i, [])
    return settings, sup


def kill_children(sup) -> None:
    for c in list(sup.children.values()):
        sup._kill(c.pid, signal.SIGKILL)
        os.waitpid(c.pid, 0)
        if c.ready_fd is not None:
            os.close(c.ready_fd)


FAKE_ACCEPTOR = r'''
import os, time
from mta import proc

def main(settings, index, ready_fd, *socks):
    marks = os.environ["FAKE_ACCEPTOR_DIR"]
    if index == 0:                      # ready, then dies at once
        with open(os.path.join(marks, "0.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        proc.report_ready(ready_fd)
        return
    # acceptor[1] is ready only once acceptor[0] has exited (is a zombie)
    path = os.path.join(marks, "0.pid")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with open(path) as fh:
                pid = int(fh.read())
            if not proc.alive(pid):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.report_ready(ready_fd, keep=True)
    time.sleep(30)
'''


def test_a_new_acceptor_that_dies_after_ready_during_a_reload_is_restarted(
        tmp_path, monkeypatch):
    # A reload starts every new acceptor and switches the slots to them once all are
    # ready; until then a slot names its old acceptor.  One that reported ready and died
    # while another was still starting was reaped as no slot's child (no restart), and
    # the switch then gave its slot that dead process: never restarted, the slot (its
    # SO_REUSEPORT sockets, their share of connections) served by nobody for good.
    settings, sup = fake_acceptors(tmp_path, monkeypatch, FAKE_ACCEPTOR, 2)
    try:
        sup._replace_acceptors(settings, settings, {})
        sup.reap()
        for i in range(2):
            slot = sup.slots[("acceptor", i)]
            assert slot.child is None or slot.child.pid in sup.children, \
                f"acceptor[{i}]'s slot names a process that is gone"
        assert sup.slots[("acceptor", 0)].restart_at is not None    # started again
    finally:
        kill_children(sup)


DEAF_ACCEPTOR = r'''
import signal, time
from mta import proc

def main(settings, index, ready_fd, *socks):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # (wedged: never stops accepting)
    proc.report_ready(ready_fd, keep=True)
    time.sleep(60)
'''


def test_a_reload_waits_reload_handover_timeout_once_for_all_old_acceptors(
        tmp_path, monkeypatch):
    # A reload waits up to server.reload_handover_timeout for the replaced acceptors to
    # say they stopped accepting -- "at most", said the change; but it waited for each in
    # turn, each with the whole timeout: with every old acceptor wedged (a stalled disk)
    # a node of N acceptors took N times it, the supervisor meanwhile deaf to a stop and
    # restarting no dead child.  Here 3 old acceptors that never stop, a 2 s timeout:
    # about 2 s, not 6.
    settings, sup = fake_acceptors(tmp_path, monkeypatch, DEAF_ACCEPTOR, 3,
                                   "reload_handover_timeout = 2\n")
    starting = sup._start_new_acceptors
    started_in = []

    def timed(*args):       # (the new ones' start is not the wait measured)
        t = time.monotonic()
        try:
            return starting(*args)
        finally:
            started_in.append(time.monotonic() - t)
    monkeypatch.setattr(sup, "_start_new_acceptors", timed)
    try:
        old = [sup.spawn(sl, settings) for sl in sup.slots.values()]
        assert sup.wait_ready(old, 20)
        t0 = time.monotonic()
        sup._replace_acceptors(settings, settings, {})
        took = time.monotonic() - t0 - started_in[0]
        assert all(c.retired for c in old)
        assert all(sup.slots[("acceptor", i)].child not in old for i in range(3))
        assert 2 <= took < 4.5, took
        assert all(c.ready_fd is not None for c in old)    # (closed when reaped)
    finally:
        kill_children(sup)


def test_a_failed_reload_that_adds_acceptors_resets_no_connection(tmp_path):
    # A reload that raised smtp.acceptors bound the new slots' sockets listening at once:
    # each joined the SO_REUSEPORT group of the address, and the kernel queued a share of
    # the new connections on it before any process could accept there (for as long as
    # the new acceptors took to start, ready_timeout when one hangs).  When the reload
    # failed its sockets were closed and those connections reset.  A socket bound for a
    # reload listens only once its acceptor serves on it (create_server's listen()).
    from daemon import free_port

    port = free_port()
    path = tmp_path / "mta.toml"
    text = f'[server]\nstate_dir = "{tmp_path / "state"}"\n[smtp]\nlisten = ["127.0.0.1:{port}"]\n'
    path.write_text(text + "acceptors = 1\n")
    old = mconfig.load(str(path))
    sup = sup_main.Supervisor(old, str(path))
    sup.slots.update(sup.bind_slots(old, "acceptor", 1, old.listen))
    path.write_text(text + "acceptors = 3\n")
    new = mconfig.load(str(path))
    clients = []
    try:
        fresh = sup._fresh_slots(old, new)
        assert sorted(fresh) == [("acceptor", 1), ("acceptor", 2)]
        for _ in range(30):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        sup._close_unshared(fresh)          # (as the reload's failure does)
        reset = 0
        for c in clients:
            c.settimeout(0.05)
            try:
                c.recv(1)
            except ConnectionResetError:
                reset += 1
            except TimeoutError:
                pass                        # (waiting in the old slot's queue)
        assert reset == 0, f"{reset} of {len(clients)} connections reset"
    finally:
        for c in clients:
            c.close()
        for sl in sup.slots.values():
            for x in sl.all_socks():
                x.close()


def test_a_shard_that_signs_with_other_key_files_than_those_checked_is_told_again(tmp_path):
    # A spool shard reads the [dkim] key files itself at a reload and takes them only if
    # they are those the supervisor checked (their digest); a file replaced again in
    # between leaves it on its old keys.  The next reload must tell it again even when
    # the supervisor reads the same files as the last time.
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    settings = mconfig.load(str(path))
    import dataclasses
    settings = dataclasses.replace(settings, dkim_keys_digest="a" * 64)
    sup = sup_main.Supervisor(settings, str(path))
    os.makedirs(settings.run_dir, exist_ok=True)
    pid = os.getpid()       # (no process is signalled: the record is only read)
    sup.children[pid] = sup_main.Child("spool", 0, pid, time.monotonic(), None, ready=True)
    assert not sup._stale_keys()            # no answer yet
    mconfig.write_applied(settings.run_dir, 0, {"pid": pid, "dkim_keys_digest": "a" * 64})
    assert not sup._stale_keys()
    mconfig.write_applied(settings.run_dir, 0, {"pid": pid, "dkim_keys_digest": "b" * 64})
    assert sup._stale_keys()
    # another process's answer (the one before it) says nothing of this one
    mconfig.write_applied(settings.run_dir, 0, {"pid": pid + 1, "dkim_keys_digest": "b" * 64})
    assert not sup._stale_keys()
