"""The spool side of the events pipeline, in process: REC_EVENTS records, the synced
watermark, the events cursor and the reader (mta.events.main.Tail), the reclamation hold.

Every test runs with the compiled record codec and with its pure twin.
"""
from __future__ import annotations

import os

import pytest

from mta import native
from mta.events.main import Tail
from mta.obs import events as ev
from mta.store import (CURSOR, REC_EVENTS, REC_MESSAGE, MessageMeta, Store, Watermark,
                       read_cursor, read_events, write_cursor)

MiB = 1 << 20
SEG = 70_001     # a segment number for records made by hand (version 2, as written)
IMPLS = ["pure"] if native.PURE else ["compiled", "pure"]


@pytest.fixture(params=IMPLS)
def codec(request):
    return native.load("record", pure=request.param == "pure")


def new_store(path, codec, segment_size=MiB) -> Store:
    st = Store(str(path), segment_size, fsync=True, events=True)
    st.codec = codec
    st.recover()
    return st


def meta(n: int) -> MessageMeta:
    return MessageMeta("%020X" % n, "s@x.test", [f"r{n}@y.test"], 1_700_000_000.0 + n, {},
                       "c [127.0.0.1]")


def injection(n: int) -> dict:
    return {"type": "injection", "timestamp": 1_700_000_000.0 + n, "queue_id": "%020X" % n,
            "rcpts": [f"r{n}@y.test", f"R{n}b@y.test"], "sender": "s@x.test", "size": 300}


def commit(st: Store, n: int, sync: bool = True) -> None:
    """One group commit of message n with its injection event (as the shard writes it)."""
    new = st.write([(meta(n), b"x" * 300)], [], None, ev.encode([injection(n)]))
    if sync:
        st.sync()
        st.commit(new, [])


def drain(tail: Tail) -> list[dict]:
    out: list[dict] = []
    while tail.poll(out):
        pass
    return out


def test_events_are_read_up_to_the_watermark_only(tmp_path, codec):
    st = new_store(tmp_path, codec)
    tail = Tail(0, str(tmp_path), codec)
    assert drain(tail) == []
    commit(st, 1)
    got = drain(tail)
    assert [(e["type"], e["raw_rcpt_to"]) for e in got] == [("injection", "r1@y.test"),
                                                           ("injection", "R1b@y.test")]
    assert got[1]["rcpt_to"] == "r1b@y.test"
    # written, not synced: not durable, not published
    commit(st, 2, sync=False)
    assert drain(tail) == []
    st.sync()
    assert [e["raw_rcpt_to"] for e in drain(tail)] == ["r2@y.test", "R2b@y.test"]
    # recovery ignores REC_EVENTS for the queue
    st.close()
    st2 = new_store(tmp_path, codec)
    assert st2.index.sorted_qids() == ["%020X" % 1, "%020X" % 2]
    assert Watermark(str(tmp_path), False).get() == (max(st2.segments),
                                                     st2.segments[max(st2.segments)].size)
    st2.close()


def test_ids_are_stable_when_read_again_from_the_cursor(tmp_path, codec):
    st = new_store(tmp_path, codec, segment_size=MiB)
    for n in range(5):
        commit(st, n)
    first = Tail(0, str(tmp_path), codec)
    a = drain(first)
    assert len(a) == 10 and len({e["event_id"] for e in a}) == 10
    # a cursor at the third record (its offset is in its events' ids): a new reader
    # gives the same events from there, with the same ids
    third = int(a[4]["event_id"]) >> 40 & 0xFFFFFFFF
    write_cursor(str(tmp_path), 1, third)
    assert drain(Tail(0, str(tmp_path), codec)) == a[4:]
    # no cursor: from the start, the same ids
    os.unlink(os.path.join(tmp_path, CURSOR))
    assert drain(Tail(0, str(tmp_path), codec)) == a
    st.close()


def test_reader_follows_segments_and_a_torn_record(tmp_path, codec):
    st = new_store(tmp_path, codec, segment_size=MiB)
    big = b"y" * (300 * 1024)
    n = 0
    while len(st.segments) < 3:
        new = st.write([(meta(n), big)], [], None, ev.encode([injection(n)]))
        st.sync()
        st.commit(new, [])
        n += 1
    got = drain(Tail(0, str(tmp_path), codec))
    assert [e["queue_id"] for e in got[::2]] == ["%020X" % i for i in range(n)]
    # A damaged record in an older segment is skipped (like recovery); the rest is read.
    oldest = st.segments[min(st.segments)]
    with open(oldest.path, "r+b") as f:
        data = f.read()
        at = data.index(b'"injection"')
        f.seek(at)
        f.write(b'"injectioN"')         # the checksum no longer matches
    got2 = drain(Tail(0, str(tmp_path), codec))
    assert [e["queue_id"] for e in got2[::2]] == ["%020X" % i for i in range(1, n)]
    st.close()


def test_read_events_stops_at_an_incomplete_record_in_the_newest_segment(codec):
    rec1 = codec.encode(REC_EVENTS, ev.encode([injection(1)]), b"", SEG)
    rec2 = codec.encode(REC_EVENTS, ev.encode([injection(2)]), b"", SEG)
    other = codec.encode(REC_MESSAGE, b"m", b"body", SEG)
    buf = rec1 + other + rec2[: len(rec2) // 2]
    seen = []
    off = read_events(codec, buf, 0, len(buf), True, lambda o, m: seen.append(o), segment=SEG)
    assert seen == [0] and off == len(rec1) + len(other)    # tried again later from there
    # the rest arrives: read from where it stopped
    buf = rec1 + other + rec2
    off = read_events(codec, buf, off, len(buf), True, lambda o, m: seen.append(o), segment=SEG)
    assert seen == [0, len(rec1) + len(other)] and off == len(buf)
    # limit: one record at a time
    seen.clear()
    off = read_events(codec, buf, 0, len(buf), False, lambda o, m: seen.append(o), limit=1,
                     segment=SEG)
    assert seen == [0] and off == len(rec1)


def test_cursor_is_replaced_whole(tmp_path):
    assert read_cursor(str(tmp_path)) is None
    write_cursor(str(tmp_path), 7, 12345)
    assert read_cursor(str(tmp_path)) == (7, 12345)
    write_cursor(str(tmp_path), 8, 0)
    assert read_cursor(str(tmp_path)) == (8, 0)
    assert not os.path.exists(os.path.join(tmp_path, CURSOR + ".tmp"))
    with open(os.path.join(tmp_path, CURSOR), "r+b") as f:
        f.write(b"\xff")
    assert read_cursor(str(tmp_path)) is None          # damaged: not trusted


def test_reclamation_waits_for_the_cursor(tmp_path, codec):
    st = new_store(tmp_path, codec, segment_size=MiB)
    big = b"z" * (300 * 1024)
    n = 0
    while len(st.segments) < 4:
        new = st.write([(meta(n), big)], [], None, ev.encode([injection(n)]))
        st.sync()
        st.commit(new, [])
        n += 1
    done = st.index.sorted_qids()
    st.commit(st.write([], done), done)
    st.sync()
    segs = sorted(st.segments)
    # the cursor is in the second segment: only the first may go
    _, unlink = st.reclaim_plan(0.25, 100, hold=segs[1])
    assert [s.number for s in unlink] == segs[:1]
    _, unlink = st.reclaim_plan(0.25, 100, hold=segs[0])
    assert unlink == []
    _, unlink = st.reclaim_plan(0.25, 100, hold=None)
    assert [s.number for s in unlink] == segs[:-1]
    st.close()


@pytest.mark.parametrize("bad", [
    {"type": "injection", "timestamp": 1.0, "queue_id": "A" * 20, "rcpts": 5},
    {"type": "injection", "timestamp": "soon", "queue_id": "A" * 20, "rcpts": ["r@y.test"]},
    {"type": "delivery", "timestamp": 1e300, "queue_id": "A" * 20, "rcpt": "r@y.test"},
    {"type": "delivery", "timestamp": 1.0, "queue_id": None, "rcpt": "r@y.test"},
    [1, 2],
], ids=["rcpts-not-a-list", "timestamp-not-a-number", "timestamp-out-of-range",
        "queue-id-null", "entry-not-a-map"])
def test_a_record_whose_events_cannot_be_shaped_is_passed_over(tmp_path, codec, bad, caplog):
    """A checksummed record the shaper cannot read (a bug, or a version this reader does
    not know) is logged with its place and counted, and every event behind it is still
    read: before, the exception ended the events process, and its restart met the same
    record again."""
    st = new_store(tmp_path, codec)
    commit(st, 1)
    new = st.write([(meta(2), b"x" * 300)], [], None, ev.encode([bad]))
    st.sync()
    st.commit(new, [])
    commit(st, 3)
    tail = Tail(0, str(tmp_path), codec)
    with caplog.at_level("ERROR", logger="mta.events"):
        got = drain(tail)
    assert [e["queue_id"] for e in got] == ["%020X" % 1] * 2 + ["%020X" % 3] * 2
    assert tail.unreadable == 1
    msgs = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("shard 0 segment 1: ")
    # the cursor moves past it: a reader from the cursor does not meet it again
    write_cursor(str(tmp_path), *tail.position())
    assert drain(Tail(0, str(tmp_path), codec)) == []
    st.close()
