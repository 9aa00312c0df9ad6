"""kill -9 in the middle of an SMTP load: nothing that got a 250 is lost or damaged.

Three scenarios, each under a pipelining load of checkable messages
(tests/loadclient.py) plus Postfix's smtp-source as background load:

A. kill -9 of the whole process tree, then a restart on the same state dir;
B. kill -9 of one spool shard (the supervisor restarts it);
C. kill -9 of one acceptor (the supervisor restarts it).

After the daemon is stopped, the spool files are read directly
(``mta spool-dump``, which verifies every record's checksum) and must hold
every message that was answered 250, exactly once, under the queue id from
the reply, byte for byte what was sent; no message of ours twice; nothing
damaged or half-written (every message of ours equals what was sent, every
smtp-source message has smtp-source's exact body).  ``mta queue list`` of the
running daemon must show the same queue ids as the files.
"""
from __future__ import annotations

import base64
import collections
import os
import re
import signal
import subprocess
import time

from daemon import HOST, split_received
from mta.queueid import shard_of
from loadclient import RCPT, SENDER, LoadClient, message, seq_of, smtp_source_argv

SS_SENDER = "a@example.com"
SS_RCPT = "b@example.net"

# Replies a load message may get: queued, told to retry, or the connection broke.
ALLOWED = {"250", "451", "error"}


def crash_daemon(make_daemon, preallocate: bool = False):
    return make_daemon(acceptors=2, shards=2,
                       smtp={"spool_timeout": 3.0},
                       # small segments: rollovers mid-load
                       spool={"segment_size": 1 << 20, "preallocate": preallocate})


def start_smtp_source(d) -> subprocess.Popen:
    out = open(os.path.join(d.dir, "smtp-source.out"), "ab")
    try:
        return subprocess.Popen(smtp_source_argv(d.port, 10, 50_000, SS_SENDER, SS_RCPT),
                                stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def stop_smtp_source(p: subprocess.Popen) -> None:
    """Kill our smtp-source by PID; it has seen errors, so its status means nothing."""
    if p.poll() is None:
        p.kill()
    p.wait(10)


def load_under_way(load: LoadClient, queued: int = 300, seconds: float = 1.0) -> None:
    """Let the load run at least *seconds* and until *queued* messages got 250."""
    t0 = time.monotonic()
    load.wait_for(queued, timeout=20)
    left = seconds - (time.monotonic() - t0)
    if left > 0:
        time.sleep(left)   # pacing only: nothing is asserted from it
    assert load.running() == load.connections, load.connection_errors


PROBE_SENDER = "probe@example.com"


def send_probe(d, probes: dict) -> str:
    """One message over a fresh connection; records and returns its queue id."""
    msg = f"Subject: probe {len(probes)}\r\n\r\nprobe\r\n".encode()
    qid = d.send(PROBE_SENDER, [RCPT], msg, helo="probe.test")
    probes[qid] = msg
    return qid


def stop_loads(ss: subprocess.Popen, *loads: LoadClient | None) -> None:
    """After a scenario (or its failure): kill the smtp-source, ask the load connections to
    stop (finish_and_check waits for them)."""
    stop_smtp_source(ss)
    for load in loads:
        if load is not None:
            load.stopping.set()


def finish_and_check(d, loads: list[LoadClient], probes: dict | None = None) -> dict:
    """Stop the load, list the live queue, stop the daemon, read the files, check it all."""
    for load in loads:
        load.stop()
    listed = d.queue_list()
    assert d.stop() == 0, d.log()[-3000:]
    dump = d.spool_dump(bodies=True)
    return check_spool(dump, listed, loads, probes or {})


def check_spool(dump: list[dict], listed: list[dict], loads: list[LoadClient],
                probes: dict[str, bytes]) -> dict:
    by_qid = {x["queue_id"]: x for x in dump}
    assert len(by_qid) == len(dump), "a queue id appears twice in the spool"
    listed_ids = [x["queue_id"] for x in listed]
    assert len(set(listed_ids)) == len(listed_ids)
    assert set(listed_ids) == set(by_qid), "mta queue list and the spool files disagree"

    results: dict[int, tuple[str, str]] = {}
    for load in loads:
        assert not set(results) & set(load.results)
        results.update(load.results)
    kinds = collections.Counter(r[0] for r in results.values())
    assert set(kinds) <= ALLOWED, kinds
    for kind, text in results.values():
        if kind == "451":
            assert text.startswith("4.3.0"), text
    queued = {s: r[1] for s, r in results.items() if r[0] == "250"}
    assert len(set(queued.values())) == len(queued), "one queue id given to two messages"

    seen: collections.Counter = collections.Counter()
    seq_at: dict[str, int] = {}
    ss_bodies: collections.Counter = collections.Counter()
    for qid, x in by_qid.items():
        raw = base64.b64decode(x["message"])
        assert len(raw) == x["message_size"]
        received, sent = split_received(raw)
        assert f" id {qid}".encode() in received, received
        if x["sender"] == SENDER:
            assert x["recipients"] == [RCPT]
            seq = seq_of(sent)
            assert seq is not None and seq in results, f"{qid}: a message nobody sent"
            assert sent == message(seq), f"{qid}: seq {seq} is damaged or half-written"
            seen[seq] += 1
            seq_at[qid] = seq
        elif x["sender"] == PROBE_SENDER:
            assert probes.get(qid) == sent, f"{qid}: unexpected or damaged probe"
        else:
            assert x["sender"] == SS_SENDER and x["recipients"] == [SS_RCPT], x
            head, sep, body = sent.partition(b"\r\n\r\n")
            assert sep and body.endswith(b"\r\n") and len(body) >= 2048, f"{qid}: {sent[-200:]!r}"
            ss_bodies[body] += 1
    twice = [s for s, n in seen.items() if n > 1]
    assert not twice, f"messages queued twice: {twice[:10]}"
    # smtp-source sends the same body every time: any other one is damaged.
    assert len(ss_bodies) <= 1, [len(b) for b in ss_bodies]

    lost = [(s, q) for s, q in queued.items() if q not in by_qid]
    assert not lost, f"{len(lost)} messages answered 250 are not in the spool: {lost[:10]}"
    assert set(probes) <= set(by_qid), "a probe answered 250 is not in the spool"
    wrong = [(s, q) for s, q in queued.items() if seq_at.get(q) != s]
    assert not wrong, f"250 queue ids holding another message: {wrong[:10]}"
    return {"kinds": kinds, "dumped_ids": set(by_qid), "ours": sum(seen.values()),
            "smtp_source": sum(ss_bodies.values()), "queued": queued}


# ------------------------------------------------------------------ scenarios

def test_kill9_whole_tree_mid_load_loses_nothing_acknowledged(make_daemon):
    # With preallocated (zero-filled) segments, the default: the torn tails below are
    # then followed by zeros, and the rollovers take spare segments (crash_daemon's plain
    # appends, preallocate = false, are what the other kill -9 tests here run).
    d = crash_daemon(make_daemon, preallocate=True)
    load = LoadClient(HOST, d.port, connections=8, max_messages=30_000, time_limit=30).start()
    ss = start_smtp_source(d)
    try:
        load_under_way(load, queued=300, seconds=1.5)
        d.kill9()
    finally:
        stop_smtp_source(ss)
        load.stop()
    # Every connection was cut in the middle of its work.
    assert len(load.connection_errors) == load.connections, load.connection_errors
    assert load.tally().get("error", 0) >= 1

    # A crash can also leave a record half-written at the end of a segment
    # (kill -9 in the middle of a large writev, or power loss): add one to each
    # shard's newest segment, as if the crash had cut it there.
    torn = add_torn_tails(d)

    d.start()
    run = d.log(since_start=True)
    assert len(re.findall(r"recovered queue: messages=\d+", run)) == 2, run
    assert len(re.findall(r"are incomplete or damaged \(torn tail: [a-z ]+\); ignored", run)) \
        == 2, run
    # It takes mail again, into new segments after the torn ones.
    probes: dict[str, bytes] = {}
    for _ in range(4):
        send_probe(d, probes)
    res = finish_and_check(d, [load], probes)
    assert not set(torn) & res["dumped_ids"], "a half-written record was recovered"
    assert len(res["queued"]) >= 300
    assert res["smtp_source"] >= 1


def add_torn_tails(d) -> list[str]:
    from mta import native
    from mta.store import REC_MESSAGE, SEGMENT_SUFFIX, MessageMeta, _enc

    codec = native.load("record")
    qids = []
    spool = os.path.join(d.state_dir, "spool")
    for n, shard in enumerate(sorted(x for x in os.listdir(spool) if x.startswith("shard-"))):
        sdir = os.path.join(spool, shard)
        segs = sorted(x for x in os.listdir(sdir) if x.endswith(SEGMENT_SUFFIX))
        assert segs, f"{shard} has no segment"
        qid = "%013X%02X%05X" % (0x1FFFFFFFFFFF, 0, n)
        meta = MessageMeta(qid, SENDER, [RCPT], time.time(), {}, "torn [127.0.0.1]")
        number = int(segs[-1][:-len(SEGMENT_SUFFIX)])
        rec = codec.encode(REC_MESSAGE, _enc.encode(meta), b"Subject: torn\r\n\r\n" + b"x" * 4000,
                           number)
        path = os.path.join(sdir, segs[-1])
        # Where the next write would have gone: after the last whole record.
        # (In a preallocated segment that is before the zero-filled rest of
        # the file, so the torn record is followed by zeros, as after a crash.)
        data = open(path, "rb").read()
        end = 0
        while True:
            status, *_, nxt = codec.decode(data, end, segment=number)
            if status != codec.OK:
                break
            end = nxt
        with open(path, "r+b") as fh:
            fh.seek(end)
            fh.write(rec[:len(rec) * 2 // 3])
        qids.append(qid)
    return qids


def test_kill9_one_spool_shard_mid_load(make_daemon):
    d = crash_daemon(make_daemon)
    load = LoadClient(HOST, d.port, connections=8, max_messages=40_000, time_limit=35).start()
    ss = start_smtp_source(d)
    load2 = None
    try:
        load_under_way(load, queued=300, seconds=1.0)
        old = d.children()["spool[0]"]
        os.kill(old, signal.SIGKILL)
        new = d.wait_restarted("spool[0]", old)
        d.wait_log(rf"spool\[0\]\[{new}\]: recovered queue", timeout=20)
        # The load keeps going, now also into the new shard process.
        before = len(load.queued())
        load2 = LoadClient(HOST, d.port, connections=4, max_messages=40_000, time_limit=30,
                           first_seq=1_000_000).start()
        load2.wait_for(200, timeout=20)
        load.wait_for(before + 200, timeout=20)
    finally:
        stop_loads(ss, load, load2)
    res = finish_and_check(d, [load] + ([load2] if load2 else []))

    # The surviving connections carried on: the shard's death did not cut them.
    assert not load.connection_errors and not load2.connection_errors
    # Messages the dead shard never confirmed were answered 451, never 250:
    # those in flight when it died (at once when it had read them, else after
    # smtp.spool_timeout), and those that came while it was down (at once).
    log = d.log()
    timed_out = set(re.findall(r"([0-9A-F]{20}): no answer from the spool in 3s; answered 451",
                               log))
    # (those the shard had read: at once, its connection gone)
    timed_out |= set(re.findall(r"([0-9A-F]{20}): spool shard 0 went away before it "
                                r"answered; answered 451", log))
    refused = re.findall(r"spool shard (\d+) is not taking messages; answered 451", log)
    assert timed_out or refused, "no message was in flight to the killed shard?\n" + log[-3000:]
    assert not timed_out & set(res["queued"].values())
    assert {shard_of(q, 2) for q in timed_out} <= {0} and set(refused) <= {"0"}
    assert res["kinds"]["451"] >= 1
    # After its restart the shard takes messages again.
    assert any(shard_of(q, 2) == 0 for q in load2.queued().values())


def test_kill9_one_acceptor_mid_load(make_daemon):
    d = crash_daemon(make_daemon)
    load = LoadClient(HOST, d.port, connections=12, max_messages=40_000, time_limit=35).start()
    ss = start_smtp_source(d)
    load2 = None
    probes: dict[str, bytes] = {}
    try:
        load_under_way(load, queued=300, seconds=1.0)
        old = d.children()["acceptor[0]"]
        # The acceptor being killed is serving some of the load: queue ids carry
        # the acceptor slot (characters 13-14) and are handed out before the kill.
        assert any(q[13:15] == "00" for q in load.queued().values())
        kill_us = time.time_ns() // 1000
        os.kill(old, signal.SIGKILL)
        new = d.wait_restarted("acceptor[0]", old)
        load2 = LoadClient(HOST, d.port, connections=4, max_messages=40_000, time_limit=30,
                           first_seq=1_000_000).start()
        load2.wait_for(200, timeout=20)
        # New connections reach the new acceptor[0] (queue ids carry the acceptor slot).
        for _ in range(64):
            if send_probe(d, probes)[13:15] == "00":
                break
        else:
            raise AssertionError("no connection reached the restarted acceptor[0]")
        assert new != old
        # ...and the restarted acceptor[0] (same slot, later ids) serves mail.
        assert any(q[13:15] == "00" and int(q[:13], 16) > kill_us
                   for q in list(load2.queued().values()) + list(probes))
    finally:
        stop_loads(ss, load, load2)
    res = finish_and_check(d, [load] + ([load2] if load2 else []), probes)
    assert not load2.connection_errors
    # Connections on the killed acceptor broke; their last message may or may
    # not be queued (it is checked like every other) but none is duplicated.
    assert res["kinds"]["250"] >= 500
