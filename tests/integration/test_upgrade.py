"""mta upgrade: a new supervisor takes the listening sockets over while a probe keeps sending.

Probe threads open SMTP connections back to back all through the upgrade, one
message per connection.  None may be refused (the listening sockets stay open
the whole time; connections wait in their backlogs while the roles change
hands), and afterwards every message that got its 250 is in the queue exactly
once (delivery is held, so the queue keeps them).  The old supervisor exits 0,
the new one serves SMTP, HTTP and the admin listener on the same ports.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import smtplib
import sys
import threading
import time

import pytest

from daemon import HOST, NotifySocket, max_gap, mta_children, wait_until
from test_admin_api import admin_call


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def supervisor_pid(d) -> int:
    try:
        with open(os.path.join(d.state_dir, "run", "mta.pid")) as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class Probe(threading.Thread):
    def __init__(self, d, name: str):
        super().__init__(daemon=True)
        self.d, self.name = d, name
        self.acked: list[tuple[str, float]] = []     # (queue id, when)
        self.refused: list[str] = []
        self.tempfail: list[str] = []
        self.stop = threading.Event()

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            msg = (f"From: p@probe.test\r\nTo: x\r\nSubject: {self.name}-{n}\r\n"
                   f"Message-ID: <{self.name}-{n}@probe.test>\r\n\r\nprobe\r\n").encode()
            try:
                with smtplib.SMTP(HOST, self.d.port, local_hostname="probe.test",
                                  timeout=60) as s:
                    s.ehlo()
                    code, _ = s.mail("p@probe.test")
                    if code != 250:
                        self.tempfail.append(f"MAIL {code}")
                        continue
                    s.rcpt(f"{self.name}-{n}@example.net")
                    code, text = s.data(msg)
                    if code == 250:
                        qid = re.search(r"queued as ([0-9A-F]+)", text.decode()).group(1)
                        self.acked.append((qid, time.monotonic()))
                    else:
                        self.tempfail.append(f"DATA {code}")
            except ConnectionRefusedError as exc:
                self.refused.append(repr(exc))
            except smtplib.SMTPServerDisconnected as exc:
                self.tempfail.append(repr(exc))         # a 421 from the old acceptors
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code >= 500:
                    raise
                self.tempfail.append(f"{exc.smtp_code}")
            except OSError as exc:
                self.refused.append(repr(exc))          # reset, timeout: as bad as refused


class HttpProbe(threading.Thread):
    """HTTP injections back to back, one recipient each, sender h@probe.test."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.d = d
        self.accepted = 0
        self.refused: list[str] = []
        self.other: list[int] = []
        self.stop = threading.Event()

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                st, _, body = self.d.post({"recipients": [f"h{n}@example.net"],
                                           "content": {"from": "h@probe.test",
                                                       "subject": "s", "text": "x"}},
                                          timeout=60)
            except OSError as exc:
                self.refused.append(repr(exc))
                continue
            if st == 200 and body["results"]["total_accepted_recipients"] == 1:
                self.accepted += 1
            else:
                self.other.append(st)       # 503 from an acceptor stopping: not accepted


def test_upgrade_refuses_no_connection_and_loses_or_repeats_no_message(make_daemon):
    d = make_daemon(acceptors=2, shards=2)
    old = supervisor_pid(d)
    assert old == d.proc.pid
    probes = [Probe(d, f"p{i}") for i in range(4)]
    hp = HttpProbe(d)
    for p in [*probes, hp]:
        p.start()
    try:
        wait_until(lambda: sum(len(p.acked) for p in probes) >= 20, 30, "probe traffic")
        r = d.cli("upgrade", timeout=180)
        assert "upgraded: supervisor pid" in r.stdout.decode(), r
        new = supervisor_pid(d)
        assert new and new != old and alive(new)
        upgraded_at = time.monotonic()
        # The new supervisor's acceptors take the probes' mail.
        wait_until(lambda: sum(1 for p in probes for _, t in p.acked if t > upgraded_at) >= 20,
                   60, "messages accepted after the upgrade")
    finally:
        for p in [*probes, hp]:
            p.stop.set()
        for p in [*probes, hp]:
            p.join(90)
    assert d.proc.wait(30) == 0                 # the old supervisor left cleanly
    refused = [x for p in probes for x in p.refused]
    assert refused == [], refused
    acked = [q for p in probes for q, _ in p.acked]
    assert len(acked) == len(set(acked))

    assert hp.refused == [] and hp.accepted > 0, (hp.refused, hp.accepted)

    # Every acknowledged message is queued, once; nothing else is.
    entries = d.queue_list()
    listed = [e["queue_id"] for e in entries if e["sender"] == "p@probe.test"]
    assert sorted(listed) == sorted(acked), (len(listed), len(acked),
                                             set(acked) ^ set(listed))
    assert sum(e["sender"] == "h@probe.test" for e in entries) == hp.accepted
    # The same ports serve HTTP and the admin API from the new processes.
    st, _, body = d.post({"recipients": ["h@example.net"],
                          "content": {"from": "p@probe.test", "subject": "s", "text": "x"}})
    assert st == 200, body
    # (503 until every child of the new supervisor reports)
    health = wait_until(lambda: (lambda r: r[2] if r[0] == 200 else None)(
        admin_call(d, "GET", "/api/admin/health")), 20,
        "every child of the new supervisor reporting", interval=0.3)
    assert health["ok"] and health["supervisor"]["pid"] == new
    log = d.log()
    assert "upgrade: supervisor pid %d took over" % new in log
    assert "took over" in log and "Traceback" not in log
    # The new supervisor stops like any other.
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not alive(new), 60, "the new supervisor to stop")
    assert "stopped" in d.log().rsplit("upgrade: took over", 1)[1]


def test_a_new_version_that_does_not_start_leaves_the_old_one_serving(make_daemon):
    d = make_daemon(acceptors=1, shards=1)
    qid = d.send("a@probe.test", ["r@example.net"], b"Subject: before\r\n\r\nx\r\n")
    good = open(d.config_path).read()
    d.write_config(good + "\n[nonsense]\nkey = 1\n")     # the new supervisor refuses it
    os.kill(d.proc.pid, signal.SIGUSR2)
    d.wait_log("upgrade failed: the new supervisor did not become ready", timeout=120)
    d.wait_log("configuration error", timeout=5)
    d.write_config(good)
    wait_until(lambda: supervisor_pid(d) == d.proc.pid, 30, "the old pid file back")
    assert d.proc.poll() is None
    d.wait_ready()
    qid2 = d.send("a@probe.test", ["r@example.net"], b"Subject: after\r\n\r\nx\r\n")
    assert sorted(e["queue_id"] for e in d.queue_list()) == sorted([qid, qid2])
    assert d.stop() == 0


def test_a_drained_node_stays_drained_across_an_upgrade_but_not_a_restart(make_daemon):
    d = make_daemon(acceptors=1, shards=1)
    assert admin_call(d, "POST", "/api/admin/drain")[0] == 200
    wait_until(lambda: d.connect().banner[0] == 421, 10, "421 while draining")
    d.cli("upgrade", timeout=180)
    new = supervisor_pid(d)
    assert new != d.proc.pid and d.proc.wait(30) == 0
    assert d.connect().banner[0] == 421
    assert admin_call(d, "GET", "/api/admin/drain")[2]["draining"] is True
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not alive(new), 60, "the new supervisor to stop")
    d.start()                               # a fresh start accepts mail again
    assert d.connect().banner[0] == 220
    assert "a drain was in effect" in d.log(since_start=True)
    assert admin_call(d, "GET", "/api/admin/drain")[2]["draining"] is False


def test_a_stop_asked_for_during_an_upgrade_stops_the_new_supervisor(make_daemon):
    # SIGTERM while the old supervisor hands over: the stop is passed on to the new one
    # (it was dropped with the old process, and the node kept running)
    d = make_daemon(acceptors=1, shards=1)
    old = d.proc.pid
    os.kill(old, signal.SIGUSR2)
    d.wait_log("upgrade: stopping the children", timeout=20)
    os.kill(old, signal.SIGTERM)
    assert d.proc.wait(120) == 0
    new = supervisor_pid(d)
    assert "upgrade: supervisor pid %d took over" % new in d.log()
    wait_until(lambda: not alive(new), 60, "the new supervisor to stop as asked")
    assert "passing the stop asked for meanwhile" in d.log()
    with pytest.raises(OSError):
        d.connect(timeout=2)


def test_a_supervisor_that_cannot_start_its_children_after_a_failed_upgrade_exits_1(
        make_daemon):
    # The new supervisor fails, and the old one cannot start its children again (here a
    # shard's writer lock is taken as its spool process stops; in life, the children of a
    # new supervisor killed for not being ready, still stopping): the old one stopped and
    # exited 0, so systemd (Restart=on-failure) left the node down for good
    # (short stop timeouts: the supervisor waits a child's stop grace, then STOP_GRACE,
    # for a lock another process holds -- 45 s with the tests' defaults)
    d = make_daemon(acceptors=1, shards=1, server={"shutdown_timeout": 1.0},
                    smtp={"spool_timeout": 1.0})
    lock_path = os.path.join(d.state_dir, "spool", "shard-00", "writer.lock")
    fd = os.open(lock_path, os.O_RDWR)
    try:
        locker = threading.Thread(target=fcntl.flock, args=(fd, fcntl.LOCK_EX), daemon=True)
        locker.start()                  # (waits while the running shard holds it)
        good = open(d.config_path).read()
        d.write_config(good + "\n[nonsense]\nkey = 1\n")     # the new supervisor refuses it
        os.kill(d.proc.pid, signal.SIGUSR2)
        assert d.proc.wait(180) == 1
        d.write_config(good)
        log = d.log()
        assert "upgrade failed: the new supervisor did not become ready" in log
        assert "cannot start the children again" in log
        assert not locker.is_alive()
    finally:
        os.close(fd)


def test_a_reload_asked_for_during_an_upgrade_is_applied_by_the_new_supervisor(make_daemon):
    # SIGHUP (systemctl reload, mta reload) sent to the old supervisor while the new one
    # starts: the new one read the file before the change, so the old one must hand the
    # reload on; it was dropped with the old process.
    d = make_daemon(acceptors=1, shards=1)
    old = d.proc.pid
    os.kill(old, signal.SIGUSR2)
    # once it has read its file (it logs the sockets it took after), held before it is
    # ready, so that the old one waits
    new = wait_until(lambda: "upgrade: took over" in d.log() and
                     d.children().get("supervisor"), 60, "the new supervisor", interval=0.005)
    os.kill(new, signal.SIGSTOP)
    try:
        d.sections["smtp"]["banner"] = "ESMTP after-upgrade"
        d.write_config()
        os.kill(old, signal.SIGHUP)
        time.sleep(0.5)
        assert alive(old)
    finally:
        os.kill(new, signal.SIGCONT)
    assert d.proc.wait(120) == 0
    assert supervisor_pid(d) == new
    wait_until(lambda: d.connect().banner == (220, ["mta.test ESMTP after-upgrade"]), 30,
               "the new supervisor applying the reload", interval=0.3)
    log = d.log()
    assert f"upgrade: passing the reload asked for meanwhile to pid {new}" in log
    assert "Traceback" not in log
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not alive(new), 60, "the new supervisor to stop")


def children_of(pid: int) -> dict[str, int]:
    """Process title ('spool[0]') -> pid of *pid*'s live children (one just forked, still
    with its parent's title: 'supervisor<pid>')."""
    return {title + (str(child) if title == "supervisor" else ""): child
            for title, child in mta_children(pid)}


def test_a_new_supervisor_killed_mid_upgrade_leaves_no_second_shard_writer(make_daemon):
    # The new supervisor dies (SIGKILL) after its spool shard took the shard's writer
    # lock; the shard, orphaned, is sent SIGTERM but here cannot act on it (stopped).
    # The old supervisor starting its own shard at once found the lock held: its
    # children did not start, and it stopped (exit 1), the node down.  It must wait for
    # the lock, then kill the orphan it names, and serve again.
    d = make_daemon(acceptors=1, shards=1, server={"shutdown_timeout": 1.0},
                    smtp={"spool_timeout": 1.0})
    qid = d.send("a@probe.test", ["r@example.net"], b"Subject: before\r\n\r\nx\r\n")
    old = d.proc.pid
    lock = os.path.join(d.state_dir, "spool", "shard-00", "writer.lock")
    os.kill(old, signal.SIGUSR2)
    d.wait_log(r"upgrade: took over \d+ listening socket", timeout=60)
    new = wait_until(lambda: d.children().get("supervisor"), 30, "the new supervisor")
    # Held as soon as it has forked its second child (admin[0], then spool[0]; a child
    # has its parent's title until it sets its own), so it cannot become ready.
    wait_until(lambda: len(children_of(new)) >= 2, 60, "the new supervisor's spool[0]",
               interval=0.005)
    os.kill(new, signal.SIGSTOP)

    def new_shard_locked():
        pid = children_of(new).get("spool[0]")
        return pid if pid and open(lock).read().strip() == str(pid) else None

    orphan = wait_until(new_shard_locked, 60, "the new supervisor's shard holding its lock")
    os.kill(orphan, signal.SIGSTOP)
    try:
        os.kill(new, signal.SIGKILL)
        d.wait_log("upgrade failed", timeout=60)
        text = d.wait_log(rf"spool shard 0 is still written by pid {orphan}.*killing it",
                          timeout=60)
        assert re.search(rf"waiting up to [\d.]+s for pid\(s\) {orphan} ", text), text
    finally:
        if alive(orphan):
            os.kill(orphan, signal.SIGCONT)
    # (the line is logged before the SIGKILL is sent: on a loaded machine the test may
    # read it first, so the kill is waited for, bounded)
    wait_until(lambda: not alive(orphan), 15, f"the orphan {orphan} killed")
    wait_until(lambda: {"spool[0]", "acceptor[0]"} <= set(d.children()), 60,
               "the old supervisor's children started again")
    assert d.proc.poll() is None and supervisor_pid(d) == old
    qid2 = d.send("a@probe.test", ["r@example.net"], b"Subject: after\r\n\r\nx\r\n")
    assert sorted(e["queue_id"] for e in d.queue_list()) == sorted([qid, qid2])
    assert d.stop() == 0


def test_after_a_failed_upgrade_the_active_record_is_the_old_supervisors_again(make_daemon):
    # The new supervisor records the configuration it read (run/active-config.json) before
    # it starts its children; killed after that, it left its record behind, and the old
    # supervisor's spool shards, which take that record at their first turn (and at each
    # SIGHUP), ran the [delivery] of a file the old supervisor never applied: here
    # delivery no longer held, though the running configuration holds it.
    d = make_daemon(acceptors=1, shards=1, server={"shutdown_timeout": 1.0},
                    smtp={"spool_timeout": 1.0})
    old = d.proc.pid
    active = os.path.join(d.state_dir, "run", "active-config.json")
    d.sections["delivery"]["hold"] = False       # in the file, not applied (no reload)
    d.write_config()
    os.kill(old, signal.SIGUSR2)
    d.wait_log(r"upgrade: took over \d+ listening socket", timeout=60)
    new = wait_until(lambda: d.children().get("supervisor"), 30, "the new supervisor")
    # (its first child forked: the record written just before, with hold = false)
    wait_until(lambda: len(children_of(new)) >= 1, 60, "the new supervisor's children",
               interval=0.005)
    os.kill(new, signal.SIGKILL)
    d.wait_log("upgrade failed", timeout=60)
    wait_until(lambda: {"spool[0]", "acceptor[0]"} <= set(d.children()), 90,
               "the old supervisor's children started again")
    assert d.proc.poll() is None and supervisor_pid(d) == old
    with open(active, "rb") as fh:
        assert json.loads(fh.read())["config"]["delivery"]["hold"] is True
    time.sleep(1.0)       # (the shard's first turns)
    assert "delivery no longer held" not in d.log().rsplit("upgrade failed", 1)[1]
    assert d.stop() == 0


def test_the_state_directory_lock_passes_to_the_new_supervisor(make_daemon):
    # run/mta.lock (flock) keeps a second daemon off the state directory for the running
    # one's life: an upgrade hands it on, so a start after the old supervisor exited is
    # still refused, naming the new one, and leaves its pid file and ports alone.
    d = make_daemon(acceptors=1, shards=1)
    d.cli("upgrade", timeout=180)
    new = supervisor_pid(d)
    assert new != d.proc.pid and d.proc.wait(30) == 0
    with open(os.path.join(d.state_dir, "run", "mta.pid"), "w") as fh:
        fh.write("0\n")             # (a pid file that names nobody: the lock alone refuses)
    d.start(wait=False)
    assert d.proc.wait(30) == 1
    assert f"cannot start: another mta (pid {new}) uses {d.state_dir}" in \
        d.log(since_start=True)
    assert open(os.path.join(d.state_dir, "run", "mta.pid")).read() == "0\n"
    assert d.connect().banner[0] == 220
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not alive(new), 60, "the new supervisor to stop")
    d.start()
    assert d.connect().banner[0] == 220


def test_the_new_supervisor_takes_over_the_watchdog_pings(make_daemon, tmp_path):
    # WatchdogSec= (NotifyAccess=all): systemd restarts the unit when no WATCHDOG=1 came
    # within the interval; it names the supervisor it starts in $WATCHDOG_PID.  Through an
    # upgrade the old supervisor pings until it exits, the new one from its start on.
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    d = make_daemon(start=False, acceptors=1, shards=1)
    d.start(env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "1000000"},
            python=["/bin/sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"',
                    sys.executable])
    ready = ns.expect("READY=1")[0]
    ns.collect(1.5)
    assert {pid for _, pid in ns.pings(ready)} == {d.proc.pid}
    cli = threading.Thread(target=d.cli, args=("upgrade",), kwargs={"timeout": 180})
    began = time.monotonic()
    cli.start()
    handed = ns.expect("READY=1", timeout=180)
    deadline = time.monotonic() + 60
    while d.proc.poll() is None and time.monotonic() < deadline:
        ns.receive(0.05)                # (MAINPID=, then the old supervisor exits)
    gone = time.monotonic()
    cli.join(180)
    new = supervisor_pid(d)
    assert new and new != d.proc.pid and d.proc.wait(30) == 0
    assert any(f"MAINPID={new}" in lines for _, pid, lines in ns.got if pid == d.proc.pid)
    ns.collect(2)
    end = time.monotonic()
    assert max_gap([t for t, _ in ns.pings(began)], began, end) < 1.0
    assert handed[1] == new
    after = ns.pings(gone)
    assert len(after) >= 2 and {pid for _, pid in after} == {new}
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not alive(new), 60, "the new supervisor to stop")
    ns.close()


def test_after_a_failed_upgrade_the_restart_counts_are_the_old_supervisors_again(make_daemon):
    # run/restarts.json is the running supervisor's count of its children's unasked deaths
    # (mta_child_restarts_total).  The new supervisor resets it at its start; killed
    # after that, it left its own (empty) count behind, and the old supervisor, running on,
    # showed 0 for a child it had seen die -- the counter fell, and rose by the whole count
    # again at the next death (a rate() of it counts each such jump).
    d = make_daemon(acceptors=1, shards=1, server={"shutdown_timeout": 1.0},
                    smtp={"spool_timeout": 1.0})
    old = d.proc.pid
    path = os.path.join(d.state_dir, "run", "restarts.json")
    acceptor = d.children()["acceptor[0]"]
    os.kill(acceptor, signal.SIGKILL)
    d.wait_restarted("acceptor[0]", acceptor)
    with open(path, "rb") as fh:
        assert json.loads(fh.read()) == {"acceptor[0]": 1}
    os.kill(old, signal.SIGUSR2)
    d.wait_log(r"upgrade: took over \d+ listening socket", timeout=60)
    new = wait_until(lambda: d.children().get("supervisor"), 30, "the new supervisor")
    wait_until(lambda: len(children_of(new)) >= 1, 60, "the new supervisor's children",
               interval=0.005)
    os.kill(new, signal.SIGKILL)
    d.wait_log("upgrade failed", timeout=60)
    wait_until(lambda: {"spool[0]", "acceptor[0]"} <= set(d.children()), 90,
               "the old supervisor's children started again")
    assert d.proc.poll() is None and supervisor_pid(d) == old
    with open(path, "rb") as fh:
        assert json.loads(fh.read()) == {"acceptor[0]": 1}
    def health():
        try:
            return admin_call(d, "GET", "/api/admin/health")[2]
        except OSError:
            return None         # (the admin process starting again)
    h = wait_until(health, 30, "the admin process's health", interval=0.2)
    assert {(c["role"], c["index"]): c["restarts"] for c in h["children"]}[
        ("acceptor", 0)] == 1
    assert d.stop() == 0
