"""The events process in the real daemon (``mta serve``, loopback only).

- kill -9 of the events process during load loses no event: every accepted recipient
  has its injection and its delivery event in the log (an event read again after the
  restart comes with the same event_id);
- the log rotates by size and keeps what retention allows; SIGUSR1 (to the supervisor)
  makes the events process reopen the log after an external rename;
- a stopped events process holds the spool's segment reclamation (``mta queue`` shows the
  backlog); continued, it catches up and the segments are reclaimed;
- a record whose events cannot be shaped is logged, counted and passed over: the events
  behind it are published, and the events process does not restart over it.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import signal
import smtplib
import threading
import time

import pytest

from daemon import HOST, wait_until
from mta import native
from mta.obs import events as ev
from mta.store import Store, shard_dir
from sinks import AioSink, common_port


@pytest.fixture
def sink():
    port = common_port(["127.0.0.1"])
    s = AioSink("127.0.0.1", port).start()
    yield s
    s.stop()


def delivering(make_daemon, sink, **sections):
    delivery = {"hold": False, "processes": 1,
                "route": [{"domain": "*", "hosts": [f"127.0.0.1:{sink.port}"],
                           "starttls": "none"}]}
    return make_daemon(acceptors=1, shards=2, delivery=delivery, **sections)


def send_many(d, count: int, rcpts_per: int, tag: str, size: int = 200,
              threads: int = 3, stop: threading.Event | None = None) -> dict[str, list[str]]:
    """Send *count* messages over SMTP from *threads* threads (fewer once *stop* is set);
    {tag+n: recipients} accepted."""
    accepted: dict[str, list[str]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    pad = (b"x" * 76 + b"\r\n") * (size // 78) + b"x" * (size % 78)

    def run(k: int):
        try:
            with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
                for i in range(k, count, threads):
                    if stop is not None and stop.is_set():
                        break
                    rcpts = [f"{tag}{i}-{j}@dest{j % 3}.test" for j in range(rcpts_per)]
                    refused = s.sendmail("a@sender.test", rcpts, b"Subject: " + tag.encode()
                                         + b"\r\n\r\n" + pad + b"\r\n")
                    assert not refused, refused
                    with lock:
                        accepted[f"{tag}{i}"] = rcpts
        except (OSError, smtplib.SMTPException, AssertionError) as exc:
            errors.append(repr(exc))

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    return accepted


def by_rcpt(events: list[dict]) -> dict[str, collections.Counter]:
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        out[e["raw_rcpt_to"]][e["type"]] += 1
    return out


def test_kill9_of_the_events_process_during_load_loses_no_event(make_daemon, sink):
    d = delivering(make_daemon, sink)
    result: dict = {}
    stop = threading.Event()
    # load until the three kills are done (at most 5000 messages)
    loader = threading.Thread(target=lambda: result.update(send_many(d, 5000, 2, "k",
                                                                     stop=stop)))
    loader.start()
    try:
        for _ in range(3):
            wait_until(lambda: "events[0]" in d.children(), 20, "the events process")
            time.sleep(0.5)
            assert loader.is_alive(), "the load ended before the kills"
            old = d.children()["events[0]"]
            os.kill(old, signal.SIGKILL)
            d.wait_restarted("events[0]", old)
        time.sleep(0.5)
    finally:
        stop.set()
        loader.join()
    rcpts = [r for rs in result.values() for r in rs]
    assert len(rcpts) >= 100, len(rcpts)
    wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 60, "an empty queue")

    def complete():
        got = by_rcpt(d.events())
        return all(got[r]["injection"] == 1 and got[r]["delivery"] == 1 for r in rcpts)
    wait_until(complete, 30, "every injection and delivery event", interval=0.2)
    events = d.events()          # each event_id once; a replay must be the same event
    got = by_rcpt(events)
    for r in rcpts:
        assert got[r] == {"injection": 1, "delivery": 1}, (r, got[r])
    raw = d.events_raw()
    # at least once: the kills made the events process write some events again, with
    # the ids they had (d.events() checked that each id means one event)
    assert len(raw) >= len(events)
    per_key = collections.defaultdict(set)
    for e in raw:
        per_key[(e["queue_id"], e["raw_rcpt_to"], e["type"])].add(e["event_id"])
    assert all(len(ids) == 1 for ids in per_key.values())
    # and every delivery reached the receiver once (kill -9 of the events process does
    # not touch delivery)
    at_sink = collections.Counter(r for t in sink.snapshot() for r in t.rcpt_tos)
    assert set(at_sink) == set(rcpts) and set(at_sink.values()) == {1}


def test_log_rotation_retention_and_sigusr1_reopen(make_daemon, sink):
    d = delivering(make_daemon, sink, events={"rotate_bytes": 65536, "keep_files": 2,
                                              "checkpoint_interval": 0.2})
    log_path = os.path.join(d.state_dir, "log", "events.jsonl")
    rotated = os.path.join(d.state_dir, "log", "events-*.jsonl")
    # about 450 bytes per event line: 600 recipients x 2 events ~ 540 KB, ~5 rotations
    sent = send_many(d, 100, 6, "r", threads=2)
    rcpts = [r for rs in sent.values() for r in rs]
    wait_until(lambda: d.log().count("event log rotated") >= 3, 30, "several rotations")
    wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 60, "an empty queue")
    files = sorted(glob.glob(rotated))
    assert 1 <= len(files) <= 2, files               # keep_files = 2
    assert d.log().count("event log retention removed") >= 1
    for f in files:        # each rotated file at the size bound, plus at most one read
        assert 65536 <= os.path.getsize(f) <= 65536 + 1024 * 1024, (f, os.path.getsize(f))

    # What is kept (rotated files and the current one) is the newest part of the stream,
    # whole lines, each event once: the last recipient's events are there.
    def kept():
        out = []
        for f in sorted(glob.glob(rotated)) + [log_path]:
            with open(f, "rb") as fh:
                out += [json.loads(x) for x in fh.read().splitlines()]
        return out
    wait_until(lambda: any(e["raw_rcpt_to"] == rcpts[-1] and e["type"] == "delivery"
                           for e in kept()), 20, "the last delivery event")

    # logrotate: rename the file away, SIGUSR1 to the supervisor, new events go to a new
    # file.  The message sent before must have its last event in the current file; if its
    # events crossed the size bound, they went to a file rotated meanwhile: send another.
    def delivered_in(events, rcpt):
        return any(e["raw_rcpt_to"] == rcpt and e["type"] == "delivery" for e in events)

    for attempt in range(5):
        before = f"before-reopen{attempt}@dest.test"
        d.send("a@sender.test", [before], b"Subject: x\r\n\r\nbefore\r\n")
        wait_until(lambda rcpt=before: delivered_in(kept(), rcpt), 20, "the delivery event before")
        with open(log_path, "rb") as fh:
            if delivered_in([json.loads(x) for x in fh.read().splitlines()], before):
                break
    else:
        raise AssertionError("the events of 5 messages in a row went to rotated files")
    os.rename(log_path, log_path + ".moved")
    d.proc.send_signal(signal.SIGUSR1)
    d.wait_log(r"event log reopened", timeout=10)
    d.send("a@sender.test", ["after-reopen@dest.test"], b"Subject: x\r\n\r\nafter\r\n")
    wait_until(lambda: os.path.exists(log_path) and b"after-reopen@dest.test" in
               open(log_path, "rb").read(), 20, "the new event in the reopened log")
    with open(log_path + ".moved", "rb") as fh:
        moved = [json.loads(x) for x in fh.read().splitlines()]
    assert before in {e["raw_rcpt_to"] for e in moved}
    assert all(e["raw_rcpt_to"] != "after-reopen@dest.test" for e in moved)


def test_a_stopped_events_process_holds_reclamation_then_catches_up(make_daemon, sink):
    d = delivering(make_daemon, sink, spool={"segment_size": 1 << 20, "preallocate": False})
    wait_until(lambda: "events[0]" in d.children(), 20, "the events process")
    ev_pid = d.children()["events[0]"]
    shard_dirs = sorted(glob.glob(os.path.join(d.state_dir, "spool", "shard-*")))
    os.kill(ev_pid, signal.SIGSTOP)
    try:
        # ~4 MB per shard of messages, all delivered: without the hold all but the
        # current segment would be reclaimed within a second or two
        sent = send_many(d, 120, 1, "h", size=64 * 1024, threads=2)
        rcpts = [r for rs in sent.values() for r in rs]
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 60, "an empty queue")
        time.sleep(3)             # several reclamation passes
        segs = {sd: glob.glob(os.path.join(sd, "*.seg")) for sd in shard_dirs}
        assert sum(len(v) for v in segs.values()) >= 4, segs
        q = d.queue_summary()
        backlog = sum(x["events_backlog_bytes"] for x in q["shards"])
        assert backlog >= 3 << 20, q["shards"]
        assert not [e for e in d.events() if e["raw_rcpt_to"] in set(rcpts)]
    finally:
        os.kill(ev_pid, signal.SIGCONT)

    def caught_up():
        got = by_rcpt(d.events())
        return all(got[r]["delivery"] == 1 for r in rcpts)
    wait_until(caught_up, 30, "the events process to catch up", interval=0.2)
    got = by_rcpt(d.events())
    assert all(got[r] == {"injection": 1, "delivery": 1} for r in rcpts)
    # now the segments it has read are reclaimed
    wait_until(lambda: sum(len(glob.glob(os.path.join(sd, "*.seg"))) for sd in shard_dirs)
               <= 2 * len(shard_dirs), 20, "the held segments to be reclaimed")
    assert sum(x["events_backlog_bytes"] for x in d.queue_summary()["shards"]) < 1 << 20


def test_the_events_backlog_bound_lets_reclamation_go_on(make_daemon, sink):
    """events.max_backlog_bytes: past it the spool reclaims without waiting (the disk does
    not fill up behind a dead events process); the loss is logged on both sides."""
    d = delivering(make_daemon, sink, spool={"segment_size": 1 << 20, "preallocate": False},
                   events={"max_backlog_bytes": 1 << 20})
    wait_until(lambda: "events[0]" in d.children(), 20, "the events process")
    ev_pid = d.children()["events[0]"]
    shard_dirs = sorted(glob.glob(os.path.join(d.state_dir, "spool", "shard-*")))
    # the events process has a position in every shard's first segment
    send_many(d, 6, 1, "first", threads=1)
    wait_until(lambda: len([e for e in d.events() if e["type"] == "delivery"]) == 6, 20,
               "the first deliveries' events")
    wait_until(lambda: all(os.path.exists(os.path.join(sd, "events.cursor"))
                           for sd in shard_dirs), 10, "a cursor in every shard")
    os.kill(ev_pid, signal.SIGSTOP)
    try:
        send_many(d, 120, 1, "b", size=64 * 1024, threads=2)
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 60, "an empty queue")
        d.wait_log(r"events backlog \d+ bytes in \d+ segment\(s\) is over "
                   r"events.max_backlog_bytes", timeout=10)
        # reclaimed all the same: at most the current segment and one more per shard
        wait_until(lambda: sum(len(glob.glob(os.path.join(sd, "*.seg")))
                               for sd in shard_dirs) <= 2 * len(shard_dirs), 20,
                   "reclamation past the bound")
    finally:
        os.kill(ev_pid, signal.SIGCONT)
    d.wait_log(r"was removed before its events were all read", timeout=20)


def _first_events_read(d, shard_dirs) -> None:
    """Six messages delivered, and the events process has a cursor in every shard."""
    wait_until(lambda: "events[0]" in d.children(), 20, "the events process")
    send_many(d, 6, 1, "first", threads=1)
    wait_until(lambda: len([e for e in d.events() if e["type"] == "delivery"]) == 6, 20,
               "the first deliveries' events")
    wait_until(lambda: all(os.path.exists(os.path.join(sd, "events.cursor"))
                           for sd in shard_dirs), 10, "a cursor in every shard")


def test_a_reload_gives_the_spool_shards_a_lower_events_backlog_bound(make_daemon, sink):
    """events.max_backlog_bytes lowered by a reload: the spool shards (not replaced) kept
    the bound they were started with until a restart -- a dead events process let the
    spool grow to the old bound.  Now they take it at the reload."""
    d = delivering(make_daemon, sink, spool={"segment_size": 1 << 20, "preallocate": False},
                   events={"max_backlog_bytes": 256 << 20})
    shard_dirs = sorted(glob.glob(os.path.join(d.state_dir, "spool", "shard-*")))
    _first_events_read(d, shard_dirs)
    log = d.reload(events={"max_backlog_bytes": 1 << 20}, timeout=60)
    assert "events.max_backlog_bytes (the spool shards')" not in log, log[-3000:]
    d.wait_log(r"spool\[\d\].*reload: events.max_backlog_bytes 1048576", count=2)
    ev_pid = d.children()["events[0]"]
    os.kill(ev_pid, signal.SIGSTOP)
    try:
        send_many(d, 120, 1, "b", size=64 * 1024, threads=2)
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 60, "an empty queue")
        d.wait_log(r"events backlog \d+ bytes in \d+ segment\(s\) is over "
                   r"events.max_backlog_bytes \(1048576\)", timeout=10)
        wait_until(lambda: sum(len(glob.glob(os.path.join(sd, "*.seg")))
                               for sd in shard_dirs) <= 2 * len(shard_dirs), 20,
                   "reclamation past the new bound")
    finally:
        os.kill(ev_pid, signal.SIGCONT)


def test_a_reload_below_the_backlog_reclaims_none_of_it(make_daemon, sink):
    """A reload that lowers events.max_backlog_bytes below the backlog the shards hold
    (the events process down): taken as is, it would reclaim at once the segments the
    events process has not read -- their events lost because of a reload.  The backlog
    held then is kept until the events process has read it below the new bound (it may
    not grow past it); the events process comes back and every event is there."""
    d = delivering(make_daemon, sink, spool={"segment_size": 1 << 20, "preallocate": False},
                   events={"max_backlog_bytes": 256 << 20},
                   server={"shutdown_timeout": 1})
    shard_dirs = sorted(glob.glob(os.path.join(d.state_dir, "spool", "shard-*")))
    _first_events_read(d, shard_dirs)
    ev_pid = d.children()["events[0]"]
    os.kill(ev_pid, signal.SIGSTOP)
    try:
        sent = send_many(d, 60, 1, "b", size=64 * 1024, threads=2)
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 60, "an empty queue")
        wait_until(lambda: min(x["events_backlog_bytes"] for x in d.queue_summary()["shards"])
                   > 1 << 20, 20, "a backlog over 1 MiB in each shard")
        done = d.log().count("reloaded: ")
        d.sections["events"] = {"max_backlog_bytes": 1 << 20}
        d.write_config()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log(r"spool\[\d\].*reload: events.max_backlog_bytes 1048576 is below the "
                   r"backlog", count=2, timeout=30)
        time.sleep(3)       # three reclamation passes
    finally:
        os.kill(ev_pid, signal.SIGCONT)
    d.wait_log(r"reloaded: ", count=done + 1, timeout=60)
    rcpts = [r for rs in sent.values() for r in rs]
    wait_until(lambda: all(by_rcpt(d.events())[r]["delivery"] == 1 for r in rcpts), 60,
               "every delivery event")
    assert "was removed before its events were all read" not in d.log()
    assert "is over events.max_backlog_bytes" not in d.log()


def test_a_record_whose_events_cannot_be_shaped_is_passed_over(make_daemon, sink):
    d = delivering(make_daemon, sink)
    first = send_many(d, 4, 1, "a", threads=1)
    wait_until(lambda: len(d.events()) == 8, 30, "the first messages' events")
    assert d.stop() == 0
    # a checksummed events record (as a shard writes one) that the shaper cannot read:
    # its recipients are not a list -- a bug, or a version the reader does not know
    spool = os.path.dirname(glob.glob(os.path.join(d.state_dir, "*", "shard-00"))[0])
    st = Store(shard_dir(spool, 0), 4 << 20, fsync=True, events=True)
    st.codec = native.load("record")
    st.recover()
    st.write([], [], None, ev.encode([{"type": "injection", "timestamp": time.time(),
                                       "queue_id": "F" * 20, "rcpts": 5}]))
    st.sync()
    st.commit([], [])
    st.close()
    d.start()
    wait_until(lambda: "events[0]" in d.children(), 20, "the events process")
    events_pid = d.children()["events[0]"]
    later = send_many(d, 12, 1, "b", threads=2)
    rcpts = [r for rs in (*first.values(), *later.values()) for r in rs]

    def complete():
        got = by_rcpt(d.events())
        return all(got[r] == {"injection": 1, "delivery": 1} for r in rcpts)
    wait_until(complete, 30, "every message's injection and delivery event")
    d.wait_log(r"shard 0 segment \d+: the events of the record at offset \d+ cannot be "
               r"read \(TypeError: .*\); passed over")
    assert d.children()["events[0]"] == events_pid, "the events process restarted"
    wait_until(lambda: d.metrics().get("mta_events_unreadable_records_total") == 1, 20,
               "mta_events_unreadable_records_total 1")
    assert "Traceback" not in d.log(since_start=True)


def test_a_stored_event_that_cannot_be_read_does_not_stop_the_events_process(make_daemon):
    """A stored event of the events store that is no msgpack map (damage LMDB does not
    see) ended the events process at its first checkpoint once the event was past the
    retention -- the prune decoded it -- and again after every restart: no event was
    published any more.  It is now deleted, logged with its seq, with its index entries."""
    d = make_daemon(acceptors=1, shards=1, events={"retention": 60},
                    http={"api_keys": ["events-key"]})
    d.send("a@sender.test", ["before@dest.test"], b"Subject: a\r\n\r\nx\r\n")
    wait_until(lambda: len(d.events()) == 1, 30, "the first injection event")
    assert d.stop() == 0
    from mta.feedback.events_store import _U64, EventStore
    st = EventStore(os.path.join(d.state_dir, "events"), map_size=64 << 20, retention=60)
    old = time.time() - 3600            # past the retention: the first prune takes it
    seq = st.append([{"type": "delivery", "event_id": "9" * 18, "timestamp": str(int(old)),
                      "rcpt_to": "old@dest.test"}])
    with st.env.begin(write=True, db=st.ev) as txn:
        k = _U64.pack(seq)
        txn.put(k, bytes(txn.get(k)[:8]) + b"\x93\x01\x02\x03")    # an array, not a map
    st.close()
    # What the webhooks process publishes (no webhook: nothing held back) once it has
    # seen the new seq: the min_seq of the first run (this seq) would keep the event
    # through the events process's first prune when that came first -- and the next
    # prune is a minute later (the test failed now and then).
    from mta.api import webhookdb
    webhookdb.write_min_seq(d.state_dir, seq + 1)
    d.start()
    wait_until(lambda: "events[0]" in d.children(), 20, "the events process")
    events_pid = d.children()["events[0]"]
    d.wait_log(rf"events store: the event of seq {seq} cannot be read \(ValidationError: "
               r".*\); deleted")
    d.send("a@sender.test", ["after@dest.test"], b"Subject: b\r\n\r\ny\r\n")
    wait_until(lambda: any(e.get("rcpt_to") == "after@dest.test" for e in d.events()), 30,
               "the injection event of a message sent after the start")
    assert d.children()["events[0]"] == events_pid, "the events process restarted"
    assert "Traceback" not in d.log(since_start=True)
    # nothing of it is left for the Events API to count (its recipient's index entry was
    # left behind: total_count 1, for ever); the sweep that removes it runs in pieces
    # between the events process's turns, so it may end after the event above is stored
    def answer():
        return d.api("GET", "/api/v1/events/message?recipients=old@dest.test&from="
                     + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(old - 60)),
                     key="events-key")
    empty = (200, {"results": [], "total_count": 0, "links": {}})
    wait_until(lambda: answer() == empty, 20, "the damaged event's index entries swept")
