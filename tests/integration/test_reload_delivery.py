"""SIGHUP reloads [delivery] for real (issue 11 item 5): the delivery processes are
replaced one at a time with ones that read the new file, under load, and no job in
flight is lost or delivered twice; what needs a restart is named in the log."""
from __future__ import annotations

import collections
import re
import signal
import threading
import time

import pytest

from daemon import HOST, free_port, wait_until
from sinks import AioSink

N_BEFORE, N_DURING, N_AFTER = 20, 150, 20


def route(sink: AioSink) -> list[dict]:
    return [{"domain": "*", "starttls": "none", "hosts": [f"{HOST}:{sink.port}"]}]


def message(tag: str) -> bytes:
    return f"Subject: {tag}\r\nMessage-ID: <{tag}@reload.test>\r\n\r\n{tag}\r\n".encode()


def test_reload_applies_delivery_settings_and_keeps_every_job(make_daemon):
    a = AioSink(HOST, free_port(), name="A").start()
    b = AioSink(HOST, free_port(), name="B").start()
    a.delay = b.delay = 0.01          # transactions in flight while the reload runs
    try:
        d = make_daemon(acceptors=1, shards=2, delivery={
            "hold": False, "processes": 2, "route": route(a)})
        assert "a reload (SIGHUP) applies every change" in d.cli("check-config").stdout.decode()
        for i in range(N_BEFORE):
            d.send("s@example.com", [f"before{i}@example.net"], message(f"before{i}"))
        wait_until(lambda: a.received() >= N_BEFORE, 60, "the first mail at A")
        old = {k: v for k, v in d.children().items() if k.startswith("delivery")}
        others = {k: v for k, v in d.children().items() if not k.startswith("delivery")}

        errors = []

        def load():
            try:
                for i in range(N_DURING):
                    for attempt in range(5):
                        # the acceptors are replaced too: a session the old one takes just
                        # as it stops gets 421 4.3.2 (nothing accepted); a client retries
                        try:
                            d.send("s@example.com", [f"during{i}@example.net"],
                                   message(f"during{i}"))
                            break
                        except AssertionError as exc:
                            if "421" not in repr(exc) or attempt == 4:
                                raise
                            time.sleep(0.2)
            except Exception as exc:          # noqa: BLE001 (reported below)
                errors.append(repr(exc))
        t = threading.Thread(target=load)
        t.start()
        wait_until(lambda: a.received() >= N_BEFORE + 10, 60, "load under way at A",
                   interval=0.02)
        # A delivery setting changes: the route now goes to B (and a restart-only one).
        log = d.reload(delivery={"route": route(b), "processes": 3})
        t.join(120)
        assert not errors, errors
        assert "replacing the delivery process(es) one at a time" in log
        assert "reload: delivery.processes changed; it takes effect at the next restart" in log
        # ... and mta check-config names it against the running daemon
        out = d.cli("check-config").stdout.decode()
        assert "needs a restart (a reload leaves these as they are): delivery.processes" \
            in out, out
        new = {k: v for k, v in d.children().items() if k.startswith("delivery")}
        assert set(new) == set(old) == {"delivery[0]", "delivery[1]"}   # still two
        assert not set(new.values()) & set(old.values()), (old, new)    # both replaced
        # the other processes were left alone (the acceptors: same sockets, no change)
        assert {k: v for k, v in d.children().items()
                if k in others and not k.startswith("acceptor")} == \
            {k: v for k, v in others.items() if not k.startswith("acceptor")}

        # The new setting is in effect: what is sent now goes to B only.
        for i in range(N_AFTER):
            d.send("s@example.com", [f"after{i}@example.net"], message(f"after{i}"))
        wait_until(lambda: sum(1 for t in b.snapshot() if t.rcpt_tos[0].startswith("after"))
                   >= N_AFTER, 60, "the mail sent after the reload at B")
        assert not [t for t in a.snapshot() if t.rcpt_tos[0].startswith("after")]

        # Every job in flight across the reload was delivered, once, to A or to B.
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 60, "an empty queue")
        got = collections.Counter(r for s in (a, b) for t in s.snapshot() for r in t.rcpt_tos)
        want = {f"{k}{i}@example.net" for k, n in (("before", N_BEFORE), ("during", N_DURING),
                                                     ("after", N_AFTER)) for i in range(n)}
        assert set(got) == want, sorted(want - set(got))[:10]
        assert [r for r, n in got.items() if n > 1] == []
        assert "Traceback" not in d.log()
    finally:
        a.stop()
        b.stop()


def test_a_reload_holds_and_releases_delivery(make_daemon):
    # [delivery] hold is the spool's: the shards are not replaced by a reload, so they
    # must take it then (it was logged as applied while mail kept going out), and
    # check-config must name the keys they read only at start.
    a = AioSink(HOST, free_port(), name="A").start()
    try:
        d = make_daemon(acceptors=1, shards=2, delivery={"hold": False, "route": route(a)})
        spools = {k: v for k, v in d.children().items() if k.startswith("spool")}
        d.send("s@example.com", ["first@example.net"], message("first"))
        wait_until(lambda: a.received() == 1, 30, "the first message at A")

        d.sections["delivery"]["hold"] = True
        d.write_config()
        out = d.cli("check-config").stdout.decode()
        assert "a reload (SIGHUP) applies every change" in out, out
        d.reload(r"reload: delivery held", delivery={"hold": True}, timeout=30)
        d.wait_log(r"reload: delivery held", count=2, timeout=30)   # (both shards)
        qids = [d.send("s@example.com", [f"held{i}@example.net"], message(f"held{i}"))
                for i in range(4)]
        time.sleep(2.0)
        assert a.received() == 1, "mail went out while delivery was held"
        assert sorted(x["queue_id"] for x in d.queue_list()) == sorted(qids)
        assert all(s["held"] for s in d.queue_summary()["shards"])

        d.reload(r"reload: delivery no longer held", delivery={"hold": False}, timeout=30)
        # (the shards log that before the supervisor's "reloaded:", which the next
        # d.reload() counts: it must be there first)
        d.wait_log(r"reloaded: ", count=2, timeout=30)
        wait_until(lambda: a.received() == 5, 30, "the held mail at A after the release")
        assert {k: v for k, v in d.children().items() if k.startswith("spool")} == spools

        # what the shards read only at their start is named, and left as it was
        d.sections["delivery"]["max_age"] = 7200.0
        d.write_config()
        out = d.cli("check-config").stdout.decode()
        assert "delivery.max_age (the spool shards')" in out, out
        log = d.reload(delivery={"max_age": 7200.0})
        assert "delivery.max_age (the spool shards') changed; it takes effect at the " \
            "next restart" in log
        assert "Traceback" not in d.log()
    finally:
        a.stop()


def test_a_reload_whose_record_cannot_be_written_says_the_spool_keeps_delivery(make_daemon):
    # The shards read [delivery] from the supervisor's record of the active
    # configuration; when it cannot be written they keep theirs, and the log says so
    # rather than that [delivery] was applied.
    import os
    d = make_daemon(acceptors=1, shards=1)
    blocker = os.path.join(d.state_dir, "run", "active-config.json.tmp")
    os.mkdir(blocker)                      # (open(..., "wb") of it fails: a directory)
    try:
        log = d.reload(r"reloaded: ", delivery={"hold": False})
    finally:
        os.rmdir(blocker)
    assert "cannot record the active configuration" in log
    assert "the spool shards keep [delivery] as it was" in log
    assert "reload: delivery no longer held" not in d.log()
    assert all(s["held"] for s in d.queue_summary()["shards"])


def hung_transactions(make_daemon, processes: int, **delivery):
    """A daemon delivering to a receiver that never answers the end of data, with a
    transaction under way in each of its *processes* delivery processes (*delivery*:
    more [delivery] keys)."""
    a = AioSink(HOST, free_port(), name="A").start()
    a.delay = 600.0                     # (the end of data is never answered)
    d = make_daemon(acceptors=1, shards=1, server={"shutdown_timeout": 2.0},
                    delivery={"hold": False, "processes": processes, "route": route(a),
                              **delivery})
    for i in range(4 * processes):      # (domains spread over the delivery processes)
        d.send("s@example.com", [f"r@d{i}.example"], message(f"hung{i}"))
    wait_until(lambda: a.open_now >= processes and len(a.rcpt_log) >= processes, 30,
               "transactions under way at A")
    return a, d


def test_a_delivery_process_replaced_by_a_reload_during_a_hung_transaction_is_not_killed(
        make_daemon):
    # A delivery process stops (SIGTERM) in shutdown_timeout, then gives its busy
    # transactions 10 s more to end before it cancels them; a reload gave it only
    # shutdown_timeout + 10 s in all, so each one with a transaction to a receiver that
    # does not answer was killed ("did not stop in time; killing it"), its last outcomes
    # and final counters with it -- as a stop, which gives it longer, never did
    a, d = hung_transactions(make_daemon, 1)
    try:
        old = d.children()["delivery[0]"]
        d.reload(delivery={"retry_schedule": [5.0, 10.0]}, timeout=90)
        assert "did not stop in time" not in d.log()
        assert f"delivery[0] pid={old} exited (exit status 0)" in d.log()
    finally:
        a.stop()


def test_a_stop_during_a_reload_does_not_wait_for_the_rest_of_the_delivery_processes(
        make_daemon):
    # SIGTERM while a reload replaces the delivery processes one at a time: the
    # supervisor went on replacing each of them (each taking as long as a stop when a
    # transaction hangs) before it began to stop, so `systemctl stop` right after a
    # reload took the processes' count times longer than a stop
    a, d = hung_transactions(make_daemon, 3)
    try:
        d.sections["delivery"]["retry_schedule"] = [5.0, 10.0]
        d.write_config()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log(r"replacing the delivery process\(es\) one at a time")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(120) == 0
        log = d.log()
        assert "reload: a stop was asked for; delivery[1] and the rest are left as they are" in log, log
        assert len(re.findall(r"started delivery\[[12]\]", log)) == 2     # (the first start)
    finally:
        a.stop()


# Runs `mta serve` (its arguments) with every delivery process started while the file
# named first exists failing at its start, as one that cannot start does.
FAILING_DELIVERY_WRAPPER = """
import os, runpy, sys
from mta import proc
flag = sys.argv.pop(1)
start_role = proc.start_role
def start(role, index, log_level):
    if role == "delivery" and os.path.exists(flag):
        raise SystemExit(3)
    return start_role(role, index, log_level)
proc.start_role = start
sys.argv = sys.argv[2:]
runpy.run_module("mta", run_name="__main__")
"""


HANGING_DELIVERY_WRAPPER = """
import os, runpy, sys, time
from mta import proc
flag = sys.argv.pop(1)
start_role = proc.start_role
def start(role, index, log_level):
    name = start_role(role, index, log_level)
    while role == "delivery" and os.path.exists(flag):
        time.sleep(0.1)         # alive, never ready
    return name
proc.start_role = start
sys.argv = sys.argv[2:]
runpy.run_module("mta", run_name="__main__")
"""


def test_a_new_delivery_process_that_never_reports_ready_is_killed_and_started_again(
        make_daemon, tmp_path):
    # A successor that stayed alive but never reported ready within ready_timeout was
    # neither killed nor restarted, though the reload's error said "it is started again
    # as after a crash": its slot kept a process that never became ready (no delivery
    # by it, ever).  It is killed, and the slot started again.
    import os
    import sys
    wrapper = tmp_path / "hanging_delivery.py"
    wrapper.write_text(HANGING_DELIVERY_WRAPPER)
    flag = tmp_path / "hang"
    d = make_daemon(acceptors=1, shards=1, start=False, server={"ready_timeout": 3.0},
                    delivery={"processes": 1})
    d.start(python=[sys.executable, str(wrapper), str(flag)])
    before = d.children()["delivery[0]"]
    flag.touch()
    d.sections["delivery"]["connect_timeout"] = 17.0
    d.write_config()
    r = d.cli("reload", check=False, timeout=120)
    assert r.returncode == 1 and "delivery[0] did not start" in r.stderr.decode(), r
    hung = int(re.findall(r"started delivery\[0\] pid=(\d+)", d.log())[-1])
    assert hung != before
    # killed (not left in the slot, alive and never ready)
    wait_until(lambda: hung not in d.children().values(), 10, "the hung one killed")
    os.unlink(flag)
    wait_until(lambda: d.children().get("delivery[0]") not in (None, hung, before) and
               re.search(rf"started delivery\[0\] pid={d.children()['delivery[0]']}",
                         d.log()), 20, "delivery[0] started again")
    # and it reports ready: the next reload replaces it
    r = d.cli("reload", timeout=120)
    assert "reloaded: " in r.stdout.decode(), r


def test_a_reload_whose_new_delivery_process_does_not_start_is_reported_failed(
        make_daemon, tmp_path):
    # A new delivery process that did not start was only logged: the reload was
    # recorded as done (mta reload exit 0, systemd READY=1), and the roll went on to
    # stop the next old process too, whose successor fails alike -- no delivery at all.
    # mta reload must fail naming it, and the processes not replaced yet keep serving.
    import os
    import sys
    a = AioSink(HOST, free_port(), name="A").start()
    try:
        wrapper = tmp_path / "failing_delivery.py"
        wrapper.write_text(FAILING_DELIVERY_WRAPPER)
        flag = tmp_path / "fail"
        d = make_daemon(acceptors=1, shards=1, start=False,
                        delivery={"hold": False, "processes": 2, "route": route(a)})
        d.start(python=[sys.executable, str(wrapper), str(flag)])
        before = d.children()
        flag.touch()
        d.sections["delivery"]["connect_timeout"] = 17.0
        d.sections["smtp"]["banner"] = "ESMTP reloaded"
        d.write_config()
        r = d.cli("reload", check=False, timeout=120)
        assert r.returncode == 1, r
        err = r.stderr.decode()
        assert "delivery[0]" in err and "did not start" in err, err
        assert re.search(r"ERROR supervisor\[\d+\]: reload failed: delivery\[0\] did not "
                         r"start", d.log()), d.log()[-3000:]
        assert "reloaded: " not in d.log()
        # delivery[1] was not replaced: it still runs, with what it was started with
        assert d.children().get("delivery[1]") == before["delivery[1]"]
        with d.connect() as c:                  # the rest of the reload is in effect
            assert c.banner == (220, ["mta.test ESMTP reloaded"])
        # once it can start, delivery[0] is started again as after a crash: mail flows
        os.unlink(flag)
        wait_until(lambda: "delivery[0]" in d.children() and
                   d.children()["delivery[0]"] != before["delivery[0]"], 30,
                   "delivery[0] started again")
        for i in range(6):      # (domains spread over the delivery processes)
            d.send("s@example.com", [f"r@d{i}.example"], message(f"after{i}"))
        wait_until(lambda: a.received() >= 6, 60, "the mail at A")
        # the next reload (the file unchanged) replaces what the failed one left
        r = d.cli("reload", timeout=120)
        assert "reloaded: " in r.stdout.decode(), r
        assert d.children()["delivery[1]"] != before["delivery[1]"]
    finally:
        a.stop()


@pytest.mark.slow     # (its module goes first: see tests/conftest.py)
def test_a_reload_of_many_delivery_processes_takes_a_few_of_their_stops_not_each(
        make_daemon):
    # A reload replaced the delivery processes one at a time, each stopped (it finishes
    # its transactions: up to shutdown_timeout + 10 s) before its successor started: with
    # 16 processes busy it took 16 such stops, past mta reload's wait in the unit
    # (--timeout 290 s, shutdown_timeout 30 s: 16 x 40 s).  They are replaced a quarter
    # at a time now -- never all away at once -- and no job is lost.
    n = 16
    # (one site: its connection_limit, 10, is the node's, shared by the processes)
    a, d = hung_transactions(make_daemon, n, connection_limit=4 * n)
    try:
        old = {k: v for k, v in d.children().items() if k.startswith("delivery")}
        assert len(old) == n
        mark = len(d.log())
        d.sections["delivery"]["retry_schedule"] = [1.0, 5.0]
        d.write_config()
        a.delay = 0.0       # (the transactions under way still hang; new ones do not)
        t0 = time.monotonic()
        r = d.cli("reload", "--timeout", "100", check=False, timeout=150)
        took = time.monotonic() - t0
        assert r.returncode == 0, (r, d.log()[-3000:])
        print(f"reload of {n} busy delivery processes: {took:.1f}s")
        new = {k: v for k, v in d.children().items() if k.startswith("delivery")}
        assert set(new) == set(old) and not set(new.values()) & set(old.values())
        log = d.log()[mark:]
        assert "did not stop in time" not in log
        # at no moment were more than a quarter of them away
        away = most = 0
        for m in re.finditer(r"started delivery\[\d+\]|delivery\[\d+\] pid=\d+ exited", log):
            away += -1 if m.group().startswith("started") else 1
            most = max(most, away)
        assert away == 0 and most == n // 4, (most, log[-3000:])
        # every job in flight across the reload is delivered
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 60, "an empty queue",
                   details=lambda: f"{a.received()} {d.queue_summary()['total']}\n"
                   f"{d.log()[-4000:]}")
        got = collections.Counter(r for t in a.snapshot() for r in t.rcpt_tos)
        assert set(got) == {f"r@d{i}.example" for i in range(4 * n)}
    finally:
        a.stop()


def test_a_round_of_new_delivery_processes_that_do_not_start_ends_the_roll(
        make_daemon, tmp_path):
    # replaced a quarter at a time: the ones of the round that did not start are named,
    # the later rounds' keep serving, and nothing of the supervisor's breaks
    import os
    import sys
    wrapper = tmp_path / "failing_delivery.py"
    wrapper.write_text(FAILING_DELIVERY_WRAPPER)
    flag = tmp_path / "fail"
    d = make_daemon(acceptors=1, shards=1, start=False, delivery={"processes": 8})
    d.start(python=[sys.executable, str(wrapper), str(flag)])
    before = d.children()
    flag.touch()
    d.sections["delivery"]["connect_timeout"] = 17.0
    d.write_config()
    r = d.cli("reload", check=False, timeout=120)
    assert r.returncode == 1, r
    err = r.stderr.decode()
    assert "delivery[0], delivery[1] did not start with the new configuration; they are " \
        "started again as after a crash; delivery[2], delivery[3], delivery[4], " \
        "delivery[5], delivery[6], delivery[7] not replaced" in err, err
    now = d.children()
    assert all(now.get(f"delivery[{i}]") == before[f"delivery[{i}]"] for i in range(2, 8))
    os.unlink(flag)
    wait_until(lambda: all(f"delivery[{i}]" in d.children() for i in (0, 1)), 30,
               "delivery[0] and [1] started again")
    r = d.cli("reload", timeout=120)
    assert "reloaded: " in r.stdout.decode(), r
    assert "replacing the delivery process(es) 2 at a time" in d.log()
    assert not set(d.children().values()) & {before[f"delivery[{i}]"] for i in range(8)}
    assert "Traceback" not in d.log()
