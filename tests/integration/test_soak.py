"""The short chaos soak (issue 13): bench/soak.py for about two minutes, then its books
checked again here from the raw files it leaves.

bench/soak.py starts the real ``mta serve`` (its own subprocess, loopback only), injects
over SMTP and HTTP while a random child -- and every 15th time the whole tree -- is
killed with SIGKILL every 2 s, delivers to its own sink that defers and bounces a share of
the recipients, drains the queue and stops everything it started by PID.  This test does
not take its verdict on trust: from ``acks.jsonl`` (what the injectors were told),
``state/log/events.jsonl`` (the mta's event log, SparkPost-shaped, deduplicated by
event_id) and ``sink.log`` (what the receiver got)
it recounts that every acknowledged recipient has exactly one terminal event, of the kind
its address asks for, and that nothing delivered is missing at the sink; and from
``kills.jsonl`` that every duplicate at the sink was a delivery in flight at a kill.
With ``--webhook`` the harness also pushes every event to a webhook receiver that refuses
5 % of the POSTs, and checks that each event of the log reached it (at least once) and
that a retried batch kept its id and body.
"""
from __future__ import annotations

import bisect
import collections
import json
import os
import subprocess
import sys

import pytest

from daemon import REPO

SOAK = os.path.join(REPO, "bench", "soak.py")
DURATION_S = 100
EXPECTED = {"ok": "delivery", "defer": "delivery", "bounce": "bounce", "never": "expiration"}
TERMINAL = ("delivery", "bounce", "expiration")
EXPIRY_REASON = "[internal] message expired"


def _kind(e):
    """SparkPost's type, but an expiry (a bounce whose reason names it) is "expiration"."""
    if e["type"] == "bounce" and EXPIRY_REASON in e.get("raw_reason", ""):
        return "expiration"
    return e["type"]


def _lines(path):
    with open(path, "rb") as f:
        return [json.loads(x) for x in f.read().splitlines() if x.strip()]


@pytest.mark.slow
def test_chaos_soak_loses_nothing(tmp_path):
    report_path = tmp_path / "report.json"
    argv = [sys.executable, SOAK, "--duration", str(DURATION_S), "--kill-interval", "2",
            "--tree-every", "15", "--rate", "20", "--workdir", str(tmp_path), "--keep",
            "--json", str(report_path), "--drain-timeout", "150", "--webhook"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=DURATION_S + 400)
    out = r.stdout[-6000:] + r.stderr[-3000:]
    assert report_path.exists(), out
    rep = json.loads(report_path.read_text())
    run = rep["rundir"]

    # The harness's own verdict and figures.
    assert not rep["errors"], out
    assert rep["lost"] == 0, out
    assert rep["missing_terminal_events"] == 0, out
    assert not rep["problem_counts"], out
    assert r.returncode == 0, out
    assert rep["duplicates"] <= rep["in_flight_at_kills"], out
    # The chaos really happened: every role was killed, and the whole tree at least once.
    for role in ("acceptor", "spool", "delivery", "tree"):
        assert rep["kills"].get(role, 0) >= 1, (role, rep["kills"])
    assert rep["tree_restarts"] == rep["kills"]["tree"]
    # ...under real load, with every kind of ending.
    assert rep["recipients"]["acked"] >= 1000, rep["recipients"]
    assert rep["recipients"]["acked_smtp"] >= 300 and rep["recipients"]["acked_http"] >= 300
    for t in TERMINAL:
        assert rep["acked_outcomes"][t] >= 1, rep["acked_outcomes"]
    assert rep["tracebacks"] == 0, out
    # Every event of the log reached the webhook receiver (which refused 5 % of the POSTs:
    # retried with the same batch id and body), across the kills of the webhooks and
    # events processes and of the whole tree.
    hook = rep["webhook"]
    assert hook["missing"] == 0 and hook["changed_batches"] == 0, hook
    assert hook["answered_500"] >= 1 and hook["distinct_events"] >= rep["recipients"]["acked"]
    assert rep["kills"].get("webhooks", 0) + rep["kills"]["tree"] >= 1, rep["kills"]

    # The books again, from the raw files.
    acks = {a["rcpt"]: a for a in _lines(os.path.join(run, "acks.jsonl"))}
    events = _lines(os.path.join(run, "state", "log", "events.jsonl"))
    # At least once: an event read again after a kill of the events process comes with
    # the same event_id; a second delivery would have its own.
    by_id = {}
    for e in events:
        assert by_id.setdefault(e["event_id"], e) == e, e
    terminal = collections.defaultdict(list)
    delivered_at = {}
    qid_of_mid = {}
    for e in by_id.values():
        key = (e["queue_id"], e["raw_rcpt_to"])
        if _kind(e) in TERMINAL:
            terminal[key].append(_kind(e))
            if e["type"] == "delivery":
                delivered_at.setdefault(key, float(e["event_time"]))
        if e["type"] == "injection" and e.get("message_id_header"):
            qid_of_mid[e["message_id_header"]] = e["queue_id"]
    by_rcpt = collections.defaultdict(list)
    for (qid, rcpt), types in terminal.items():
        by_rcpt[rcpt].append((qid, types))
    acked = [a for a in acks.values() if a["status"] == "acked"]
    assert len(acked) == rep["recipients"]["acked"]
    for a in acked:
        ends = by_rcpt.get(a["rcpt"])
        assert ends and len(ends) == 1, f"{a}: terminal events {ends}"
        qid, types = ends[0]
        kind = a["rcpt"].split(".", 1)[0]
        assert types == [EXPECTED[kind]], f"{a}: terminal events {types}"
        if a["channel"] == "smtp":
            assert qid == a["qid"], a

    sink = collections.Counter()
    first_start = {}
    with open(os.path.join(run, "sink.log")) as f:
        for line in f:
            _d, start, _end, qid, rcpts = line.split()
            if qid.startswith("mid:"):
                qid = qid_of_mid[qid[4:]]
            for rcpt in rcpts.split(","):
                sink[(qid, rcpt)] += 1
                first_start.setdefault((qid, rcpt), float(start))
    # Nothing the event log calls delivered is missing at the receiver, and the receiver
    # got nothing the event log does not know.
    assert set(delivered_at) == set(sink), (set(delivered_at) ^ set(sink))
    # A repeated delivery was one in flight at a kill of a delivery process, a spool
    # shard or the whole tree: its job was out (its transaction at the sink started before
    # the kill, or within the soak's --in-flight-window after it: a job handed to a
    # delivery process goes on after its shard died) and its outcome was not yet in the
    # event log.
    kills = sorted(k["t"] for k in _lines(os.path.join(run, "kills.jsonl"))
                   if k["role"] in ("delivery", "spool", "tree"))
    dups = [k for k, n in sink.items() if n > 1]
    assert sum(sink[k] - 1 for k in dups) == rep["duplicates"]
    for key in dups:
        i = bisect.bisect_left(kills, first_start[key] - rep["args"]["in_flight_window"])
        assert i < len(kills) and kills[i] <= delivered_at[key], (key, first_start[key])

    # Resources: the tree idle after the drain holds no more than half again the
    # descriptors and memory it held idle before the load.
    res = rep["resources"]
    before, after = res["idle_before"], res["idle_after"]
    assert after["processes"] == before["processes"], res
    assert after["fds"] <= before["fds"] * 1.5, res
    assert after["rss_kib"] <= before["rss_kib"] * 1.5, res


# ------------------------------------------------------------------------------------------
# What the soak found: a kill -9 of a spool shard while it waits in fdatasync for a batch
# that holds a delivery outcome.  The shard used to write the batch, sync, and only then
# append the batch's events to the event log; killed during the sync, the records were in
# the page cache (so, after the restart, the recipient counted as delivered and was not
# sent again) but their events were never written.  Now the events are a record of the
# same batch (REC_EVENTS), read by the events process up to the synced watermark.  fdatasync is made slow here (in the spool
# processes only, through a sitecustomize on PYTHONPATH) so that the kill lands in that
# window every time; on a real disk the window is the sync's duration.

SLOW_SYNC = '''
import os, threading, time
_fdatasync = os.fdatasync
def _slow(fd):
    with open("/proc/self/cmdline", "rb") as f:
        if f.read().startswith(b"mta: spool"):
            marks = os.environ.get("SYNC_MARKS")
            if marks and threading.current_thread() is threading.main_thread():
                with open(marks, "a") as m:     # a group commit's sync begins
                    m.write("%f\\n" % time.time())
            time.sleep(float(os.environ.get("SLOW_FDATASYNC", "0")))
    return _fdatasync(fd)
os.fdatasync = _slow
'''


def test_kill9_during_the_outcome_sync_keeps_the_terminal_event(make_daemon, tmp_path):
    import signal

    from daemon import wait_until
    from sinks import AioSink, common_port

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SYNC)
    port = common_port(["127.0.0.1"])
    sink = AioSink("127.0.0.1", port).start()
    try:
        d = make_daemon(start=False, acceptors=1, shards=1, delivery={
            "hold": False, "processes": 1,
            "route": [{"domain": "*", "hosts": [f"127.0.0.1:{port}"], "starttls": "none"}]})
        d.env["PYTHONPATH"] = str(site) + os.pathsep + d.env["PYTHONPATH"]
        marks = tmp_path / "syncs"
        d.start(env={"SLOW_FDATASYNC": "2.0", "SYNC_MARKS": str(marks)})

        def syncs() -> int:
            return len(marks.read_text().splitlines()) if marks.exists() else 0
        # The 250 comes after the message's own group commit; the shard's next one is
        # the batch with the delivery's outcome (nothing else is written meanwhile).
        # Counted from before the message: the delivery and its outcome's sync may begin
        # before this process has read the 250 (and the QUIT's reply) on a busy machine.
        before = syncs()
        qid = d.send("a@example.com", ["rcpt@example.net"], b"Subject: gap\r\n\r\nhello\r\n")
        sink.wait_for("rcpt@example.net", timeout=30)
        wait_until(lambda: syncs() >= before + 2, 30, "the sync of the batch with the outcome")
        # It is in that sync now, for 2 s: kill it there.
        old = d.children()["spool[0]"]
        os.kill(old, signal.SIGKILL)
        d.wait_restarted("spool[0]", old)
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 30,
                   "the queue to be empty")
        # Delivered once, and the spool knows it: nothing is sent again.
        assert [t.rcpt_tos for t in sink.snapshot()] == [["rcpt@example.net"]]
        wait_until(lambda: any(e.get("queue_id") == qid and e["type"] == "delivery"
                               for e in d.events()), 10, "the delivery event")
        ends = {e["event_id"]: e["type"] for e in d.events()
                if e.get("queue_id") == qid and e["type"] in TERMINAL}
        assert list(ends.values()) == ["delivery"], ends
    finally:
        sink.stop()
