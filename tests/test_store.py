"""In-process tests of the spool's segment store (mta/store.py).

Every test runs once with the compiled record codec and once with its pure
twin (``MTA_PUREPYTHON=1`` runs only the pure one).  A "restart" is a new
:class:`Store` over the same directory, built only from what is on disk, the
way a shard rebuilds its queue after kill -9: the old object is dropped
without ``close()``.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import time

import pytest

from mta import native
from mta import store as store_mod
from mta.store import (REC_EVENTS, REC_MESSAGE, SEGMENT_SUFFIX, SPARE_READY, SPARE_REUSED,
                       SPARE_TMP, MessageMeta, Segment, Store, _enc, read_events)

MiB = 1 << 20
IMPLS = ["pure"] if native.PURE else ["compiled", "pure"]


@pytest.fixture(params=IMPLS)
def codec(request):
    return native.load("record", pure=request.param == "pure")


# ----------------------------------------------------------------- helpers

def new_store(path, codec, segment_size=MiB, preallocate=False, reserve=0) -> Store:
    st = Store(str(path), segment_size, fsync=True, preallocate=preallocate, reserve=reserve)
    st.codec = codec
    return st


def restart(path, codec, segment_size=MiB, preallocate=False) -> tuple[Store, dict]:
    """A new store from what is on disk.  Only one store of a directory may make
    spare segments (as only one shard process owns it): pass preallocate=True
    only after the previous store's spare thread is stopped (crash())."""
    st = new_store(path, codec, segment_size, preallocate)
    stats = st.recover()
    return st, stats


def crash(st: Store) -> None:
    """Stop what dies with the process besides the store object: its spare thread."""
    if st.spare is not None:
        st.spare.close()


def wait_spare(st: Store, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not (st.spare is not None and st.spare.ready):
        assert time.monotonic() < deadline, "no spare segment was prepared"
        time.sleep(0.01)


def qid(n: int) -> str:
    return "%013X%02X%05X" % (0x18A3F2C4B1D2E + n, 0, n)


def meta(n: int, nrcpt: int = 1) -> MessageMeta:
    return MessageMeta(qid(n), f"sender{n}@example.com",
                       [f"r{n}-{i}@example.net" for i in range(nrcpt)],
                       1_700_000_000.0 + n, {"BODY": "8BITMIME"} if n % 2 else {},
                       f"client{n} [127.0.0.1]")


def body(n: int, size: int = 300) -> bytes:
    """Deterministic message bytes for message n, exactly *size* long."""
    head = f"X-Seq: {n}\r\n\r\n".encode()
    line = hashlib.sha256(str(n).encode()).hexdigest().encode() + b"\r\n"
    out = head + line * (size // len(line) + 1)
    return out[:size]


def put(st: Store, items: list, done: list[str] = ()) -> list:
    """One group commit the way the shard does it: write, sync, then publish."""
    done = list(done)
    new = st.write(items, done)
    st.sync()
    return st.commit(new, done)


def contents(st: Store) -> dict[str, bytes]:
    return {q: st.read_body(q) for q in queued(st)}


def queued(st: Store) -> list[str]:
    """The queue ids in the store's index, in order."""
    return st.index.sorted_qids()


def seg_of(st: Store, q: str) -> int:
    """The segment holding message *q*'s current record."""
    return st.index.location(q)[0]


def seg_files(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(SEGMENT_SUFFIX))


def last_segment(path) -> str:
    return os.path.join(str(path), seg_files(path)[-1])


# -------------------------------------------------------- round trip, torn tail

def test_write_sync_commit_then_recover_same_entries(tmp_path, codec):
    st = new_store(tmp_path, codec)
    msgs = {}
    n = 0
    for batch_size in (1, 3, 7, 2):
        items = []
        for _ in range(batch_size):
            b = body(n, 200 + 37 * n)
            items.append((meta(n, nrcpt=1 + n % 3), b))
            msgs[qid(n)] = (meta(n, nrcpt=1 + n % 3), b)
            n += 1
        put(st, items)
    # Bodies with the record magic inside and an empty body are stored as they are.
    tricky = [(meta(100), b"\x89MTA" * 50 + codec.encode(1, b"meta", b"inner")),
              (meta(101), b"")]
    put(st, tricky)
    msgs.update({m.qid: (m, b) for m, b in tricky})
    assert contents(st) == {q: b for q, (_, b) in msgs.items()}

    st2, stats = restart(tmp_path, codec)
    assert stats["messages"] == len(msgs)
    assert stats["skipped_bytes"] == 0 and stats["torn"] == 0
    assert contents(st2) == {q: b for q, (_, b) in msgs.items()}
    for q, (m, _) in msgs.items():
        assert st2.read_meta(q) == m
    assert st2.summary()["recipients"] == sum(len(m.rcpts) for m, _ in msgs.values())
    assert st2.summary()["bytes"] == sum(len(b) for _, b in msgs.values())
    assert st2.summary() == {**st.summary(), "segments": st2.summary()["segments"]}

    # The restarted store appends to a new segment; both survive the next restart.
    put(st2, [(meta(200), body(200))])
    st3, _ = restart(tmp_path, codec)
    assert set(queued(st3)) == set(msgs) | {qid(200)}
    assert len(seg_files(tmp_path)) == 2


def test_from_and_subject_survive_a_restart_and_are_not_kept_in_memory(tmp_path, codec):
    """A campaign's messages repeat one From address and Subject: they are read back
    from the records after a restart, and the queue in memory keeps no copy of them --
    no envelope at all (this replaced sharing one string object per value)."""
    st = new_store(tmp_path, codec)
    items = []
    for n in range(6):
        m = meta(n)
        m.params.update({"friendly_from": "news@example.org",
                         "subject": "Spring sale" if n < 5 else "Other"})
        items.append((m, body(n)))
    put(st, items)
    st2, _ = restart(tmp_path, codec)
    got = [st2.read_meta(qid(n)).params for n in range(6)]
    assert [p["subject"] for p in got] == ["Spring sale"] * 5 + ["Other"]
    assert {p["friendly_from"] for p in got} == {"news@example.org"}
    # interned: the recipients' domain and the pool, nothing of the From or Subject
    domains, pools, campaigns, replies = st2.index.tables()
    assert (pools, campaigns, replies) == (1, 0, 0) and domains == len(
        {r.rpartition("@")[2] for m, _ in items for r in m.rcpts})


def test_the_two_codecs_read_each_others_segments(tmp_path):
    pure = native.load("record", pure=True)
    compiled = native.load("record", pure=False) if "compiled" in IMPLS else pure
    st = new_store(tmp_path, pure)
    put(st, [(meta(i), body(i)) for i in range(5)])
    st2, _ = restart(tmp_path, compiled)
    put(st2, [(meta(i), body(i)) for i in range(5, 9)], done=[qid(0)])
    st3, _ = restart(tmp_path, pure)
    assert contents(st3) == {qid(i): body(i) for i in range(1, 9)}


def test_torn_tail_at_every_offset_is_ignored_and_earlier_records_survive(tmp_path, codec):
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1, 500)), (meta(2), body(2, 700))])
    path = last_segment(tmp_path)
    start = os.path.getsize(path)
    put(st, [(meta(3), body(3, 300))])
    full = open(path, "rb").read()
    end = len(full)
    assert end > start + 300
    intact = {qid(1): body(1, 500), qid(2): body(2, 700)}

    d = tmp_path / "torn"
    d.mkdir()
    torn_path = d / os.path.basename(path)
    for cut in range(start, end):
        torn_path.write_bytes(full[:cut])
        st2, stats = restart(d, codec)
        assert contents(st2) == intact, f"cut at {cut}"
        assert stats["skipped_bytes"] == cut - start
        assert stats["torn"] == (1 if cut > start else 0)
    # Cut at the very end: the last record is whole.
    torn_path.write_bytes(full)
    st2, _ = restart(d, codec)
    assert contents(st2) == {**intact, qid(3): body(3, 300)}


def test_torn_tail_then_new_writes_then_restart(tmp_path, codec):
    """A torn tail does not poison what is written after the restart."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1))])
    put(st, [(meta(2), body(2))])
    path = last_segment(tmp_path)
    os.truncate(path, os.path.getsize(path) - 17)
    st2, stats = restart(tmp_path, codec)
    assert set(queued(st2)) == {qid(1)} and stats["torn"] == 1
    put(st2, [(meta(3), body(3)), (meta(4), body(4))], done=[qid(1)])
    st3, stats3 = restart(tmp_path, codec)
    assert contents(st3) == {qid(3): body(3), qid(4): body(4)}
    assert stats3["torn"] == 1  # the old tail is still there and still ignored


def test_flipped_byte_in_middle_record_skips_only_that_record(tmp_path, codec):
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1, 150))])
    path = last_segment(tmp_path)
    a = os.path.getsize(path)
    put(st, [(meta(2), body(2, 150))])
    b = os.path.getsize(path)
    put(st, [(meta(3), body(3, 150))])
    full = open(path, "rb").read()
    d = tmp_path / "flip"
    d.mkdir()
    bad = d / os.path.basename(path)
    commit = b - codec.HEADER_SIZE - store_mod._COMMIT.size   # the batch's REC_COMMIT
    for pos in range(a, b):   # every byte of the middle batch: header, meta, body, commit
        damaged = bytearray(full)
        damaged[pos] ^= 0xFF
        bad.write_bytes(bytes(damaged))
        st2, stats = restart(d, codec)
        want = {qid(1): body(1, 150), qid(3): body(3, 150)}
        if pos >= commit:
            # the message record is intact and a whole batch follows its batch (which was
            # therefore synced, acknowledged): it is taken (_take_broken)
            want[qid(2)] = body(2, 150)
        assert contents(st2) == want, f"flip at {pos}"
        assert stats["skipped_bytes"] == b - a
        assert stats["torn"] == 0
        assert stats["mended_batch"] == (pos >= commit)


def test_damaged_done_record_keeps_the_message(tmp_path, codec):
    """A DONE record that fails its checksum is ignored: the message stays (never lost)."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1)), (meta(2), body(2))])
    path = last_segment(tmp_path)
    a = os.path.getsize(path)
    put(st, [], done=[qid(1)])
    put(st, [(meta(3), body(3))])
    data = bytearray(open(path, "rb").read())
    data[a + 22] ^= 0x01
    open(path, "wb").write(bytes(data))
    st2, _ = restart(tmp_path, codec)
    assert set(queued(st2)) == {qid(1), qid(2), qid(3)}


# ------------------------------------------------------------------ DONE records

def test_done_records_remove_messages_across_restart(tmp_path, codec):
    st = new_store(tmp_path, codec)
    put(st, [(meta(i, nrcpt=2), body(i)) for i in range(5)])
    removed = put(st, [(meta(5), body(5))], done=[qid(1), qid(3), qid(99)])
    assert removed == [qid(1), qid(3)]
    removed = put(st, [], done=[qid(5), qid(1)])  # qid(1) is already gone
    assert removed == [qid(5)]
    expect = {qid(i): body(i) for i in (0, 2, 4)}
    assert contents(st) == expect
    st2, _ = restart(tmp_path, codec)
    assert contents(st2) == expect
    assert st2.recipients == 6
    assert st2.bytes == sum(len(b) for b in expect.values())


def test_done_for_message_in_an_older_segment(tmp_path, codec):
    st = new_store(tmp_path, codec, segment_size=MiB)
    put(st, [(meta(0), body(0, 100_000))])
    for i in range(1, 15):   # roll over into new segments
        put(st, [(meta(i), body(i, 100_000))])
    assert len(seg_files(tmp_path)) >= 2
    put(st, [], done=[qid(0)])
    st2, _ = restart(tmp_path, codec)
    assert set(queued(st2)) == {qid(i) for i in range(1, 15)}


# -------------------------------------------------------------- reclamation

def reclaim(st: Store, live_ratio: float = 0.25, max_copy: int = 2000) -> tuple[list, list]:
    """One reclamation pass exactly as the shard runs it (mta.spool.shard.Shard.reclaim)."""
    before = sorted(st.segments)
    copies, unlink = st.reclaim_plan(live_ratio, max_copy)
    numbers = [s.number for s in unlink]
    # Never a newer segment before an older one: what is unlinked is the oldest prefix.
    assert numbers == before[:len(numbers)]
    if unlink:
        if copies:
            put(st, copies)
        recycled = st.spare.recycled if st.spare is not None else 0
        _, kept = st.unlink(unlink)
        # (the count the shard's log line gives: files offered as the spare)
        assert kept == (st.spare.recycled if st.spare is not None else 0) - recycled
    return copies, numbers


def fill(st: Store, first: int, count: int, size: int = 100_000) -> list[str]:
    qids = []
    for i in range(first, first + count):
        put(st, [(meta(i), body(i, size))])
        qids.append(qid(i))
    return qids


def test_reclaim_unlinks_finished_segments_and_restart_resurrects_nothing(tmp_path, codec):
    st = new_store(tmp_path, codec, segment_size=MiB)
    qids = fill(st, 0, 45)
    files = seg_files(tmp_path)
    assert len(files) >= 4
    put(st, [], done=qids)
    assert queued(st) == []
    copies, unlinked = reclaim(st)
    assert copies == []
    # Every segment but the current one (which holds the DONE record) is gone from disk.
    assert seg_files(tmp_path) == [os.path.basename(st.current.path)]
    assert len(unlinked) == len(files) - 1
    assert st.summary()["disk_bytes"] == os.path.getsize(st.current.path)
    st2, stats = restart(tmp_path, codec)
    assert queued(st2) == []
    assert stats["segments"] == 1
    # After a restart nothing is current: the last segment goes too.
    copies, unlinked = reclaim(st2)
    assert copies == [] and len(unlinked) == 1
    assert seg_files(tmp_path) == []
    st3, _ = restart(tmp_path, codec)
    assert queued(st3) == []
    put(st3, [(meta(500), body(500))])
    st4, _ = restart(tmp_path, codec)
    assert contents(st4) == {qid(500): body(500)}


def test_compaction_copies_live_messages_forward_then_unlinks(tmp_path, codec):
    st = new_store(tmp_path, codec, segment_size=MiB)
    qids = fill(st, 0, 35)
    by_seg: dict[int, list[str]] = {}
    for q in queued(st):
        by_seg.setdefault(seg_of(st, q), []).append(q)
    oldest, second = sorted(by_seg)[:2]
    assert len(by_seg[oldest]) >= 8
    keep = {by_seg[oldest][3], by_seg[second][0], by_seg[second][5]}
    put(st, [], done=[q for q in qids if q not in keep and seg_of(st, q) in (oldest, second)])
    expect = {q: body(int(q[15:], 16), 100_000) for q in queued(st)}
    assert len(expect) == len(qids) - len(by_seg[oldest]) - len(by_seg[second]) + 3
    old_paths = [st.segments[n].path for n in (oldest, second)]
    copies, unlinked = reclaim(st, live_ratio=0.25)
    assert sorted(m.qid for m, _ in copies) == sorted(keep)
    assert unlinked == [oldest, second]
    for p in old_paths:
        assert not os.path.exists(p)
    for q in keep:
        assert seg_of(st, q) == st.current.number
    assert contents(st) == expect
    st2, stats = restart(tmp_path, codec)
    assert contents(st2) == expect
    assert stats["skipped_bytes"] == 0


def one_left_in_the_oldest_segment(tmp_path, codec):
    """A store of 25 messages whose oldest segment holds one live message, *keep*: (store,
    every qid, the oldest segment's number, the qids that were in it, keep)."""
    st = new_store(tmp_path, codec, segment_size=MiB)
    qids = fill(st, 0, 25)
    oldest = min(st.segments)
    in_oldest = st.index.in_segment(oldest)
    keep = in_oldest[0]
    put(st, [], done=[q for q in in_oldest if q != keep])
    return st, qids, oldest, in_oldest, keep


def test_crash_between_copy_and_unlink_keeps_one_copy(tmp_path, codec):
    st, qids, oldest, in_oldest, keep = one_left_in_the_oldest_segment(tmp_path, codec)
    copies, unlink = st.reclaim_plan(0.25, 2000)
    assert [m.qid for m, _ in copies] == [keep]
    put(st, copies)
    # kill -9 here: the copy is durable, the old segment was not unlinked yet.
    st2, _ = restart(tmp_path, codec)
    expect = {q: body(int(q[15:], 16), 100_000) for q in qids if q not in in_oldest or q == keep}
    assert contents(st2) == expect
    assert seg_of(st2, keep) != oldest  # the newest copy wins
    # The next pass finishes the job.
    _, unlinked = reclaim(st2)
    assert oldest in unlinked
    st3, _ = restart(tmp_path, codec)
    assert contents(st3) == expect


def test_reclaim_stops_at_an_older_segment_that_is_still_needed(tmp_path, codec):
    """A newer, finished segment holds DONE records for messages in an older one
    that is still needed: unlinking the newer one first would bring those
    messages back after a restart."""
    st = new_store(tmp_path, codec, segment_size=MiB)
    first = fill(st, 0, 11)
    seg1 = seg_of(st, first[0])
    assert all(seg_of(st, q) == seg1 for q in first)
    second = fill(st, 11, 5)
    seg2 = st.current.number
    assert seg2 != seg1
    keep, finished = first[:7], first[7:]        # live ratio 7/11: not compacted
    put(st, [], done=finished)                    # DONE(finished) lands in seg2
    second += fill(st, 16, 6)
    assert all(seg_of(st, q) == seg2 for q in second)
    put(st, [], done=second)                      # rolls over: seg2 is no longer current
    assert st.current.number > seg2
    assert st.segments[seg2].live == 0 and st.segments[seg1].live == len(keep)

    copies, unlink = st.reclaim_plan(0.25, 2000)
    assert copies == [] and unlink == []
    # Even when handed a plan whose copies were never made, unlink keeps the order.
    st.unlink([st.segments[seg1], st.segments[seg2]])
    assert os.path.exists(st.segments[seg1].path)
    assert seg2 in st.segments and os.path.exists(st.segments[seg2].path), \
        "a newer segment was unlinked while an older one is still needed"
    st2, _ = restart(tmp_path, codec)
    assert set(queued(st2)) == set(keep)


@pytest.mark.parametrize("prealloc", [False, True], ids=["append", "preallocated"])
def test_random_workload_restart_always_matches_the_model(tmp_path, codec, prealloc):
    """Writes, DONEs, compaction and unlinks at random; after every pass a restart
    from disk gives exactly the queue the live store had, bodies intact."""
    rng = random.Random(20240611)
    seg_size = 64 * 1024   # tiny segments: many of them, lots of reclamation
    st = new_store(tmp_path, codec, segment_size=seg_size, preallocate=prealloc)
    st._start_spare()
    prezeroed_used = 0
    model: dict[str, bytes] = {}
    n = 0
    unlinked_total = copied_total = reused_total = 0
    for step in range(120):
        items = []
        for _ in range(rng.randint(0, 4)):
            b = body(n, rng.randint(0, 12_000))
            items.append((meta(n), b))
            model[qid(n)] = b
            n += 1
        live = list(model)
        done = rng.sample(live, min(len(live), rng.randint(0, 5)))
        put(st, items, done)
        if st.current is not None and st.current.prezeroed:
            prezeroed_used += 1
        for q in done:
            model.pop(q, None)
        if step % 3 == 0:
            copies, unlinked = reclaim(st, live_ratio=0.6, max_copy=rng.randint(1, 12))
            unlinked_total += len(unlinked)
            copied_total += len(copies)
            assert contents(st) == model
            st2, stats = restart(tmp_path, codec, seg_size)
            assert contents(st2) == model, f"step {step}"
            assert stats["skipped_bytes"] == 0
        if step % 10 == 9:   # crash and carry on with the rebuilt store
            if st.spare is not None:
                reused_total += st.spare.recycled
            crash(st)
            st, _ = restart(tmp_path, codec, seg_size, preallocate=prealloc)
            assert contents(st) == model
        if prealloc and step % 7 == 0:
            wait_spare(st)   # so that some segments are certainly preallocated ones
    assert unlinked_total > 10 and copied_total > 0
    assert (prezeroed_used > 10) == prealloc
    if st.spare is not None:
        reused_total += st.spare.recycled
    # Finished segments' files were reused as the next segments (their old records
    # were never read back: every restart above matched the model).
    assert (reused_total > 5) == prealloc
    # Disk use tracks the queue: finishing everything and reclaiming frees all
    # but the segment that holds the last DONE record.
    put(st, [], list(model))
    model.clear()
    reclaim(st)
    assert len(seg_files(tmp_path)) <= 1
    crash(st)
    st2, _ = restart(tmp_path, codec, seg_size)
    assert queued(st2) == []


# ------------------------------------------------------- preallocated segments

def test_preallocated_segment_is_zero_filled_ahead_and_recovers_cleanly(tmp_path, codec):
    st = new_store(tmp_path, codec, preallocate=True)
    st._start_spare()
    wait_spare(st)
    assert os.path.getsize(tmp_path / SPARE_READY) == MiB
    put(st, [(meta(1), body(1))])
    seg = st.current
    assert seg.prezeroed
    # The segment is the whole preallocated file; the data is at its start.
    assert os.path.getsize(seg.path) == MiB and 0 < seg.size < MiB
    put(st, [(meta(2), body(2)), (meta(3), body(3))], done=[qid(1)])
    # Another spare is made for the next segment.
    wait_spare(st)
    assert st.spare.filled == 2
    # Fill past the end of the segment: the next one is the new spare.
    fill(st, 10, 12, size=100_000)
    assert st.current.number != seg.number and st.current.prezeroed
    expect = contents(st)
    crash(st)
    st2, stats = restart(tmp_path, codec)
    assert contents(st2) == expect
    # The zero-filled ends are where the data ends, not damage.
    assert stats["torn"] == 0 and stats["skipped_bytes"] == 0
    assert SPARE_TMP not in os.listdir(tmp_path)


def batch_of(codec, seg: Segment, *records: bytes) -> bytes:
    """*records* as one batch written at the end of *seg*'s data: with its REC_COMMIT."""
    meta = store_mod._COMMIT.pack(seg.size, len(records))
    return b"".join(records) + codec.encode(store_mod.REC_COMMIT, meta, b"", seg.number)


def torn_writes(tmp_path, seg: Segment, rec: bytes, step: int, keep=()):
    """*rec* written at the end of segment *seg*'s data as a crash leaves it: cut after
    each of its first 40 octets, then every *step*, then whole (the last one).  Each is
    a copy of the segment's file, beside copies of the files named in *keep*, in a
    directory of its own; yields (cut, that directory)."""
    full = open(seg.path, "rb").read()
    at = seg.size
    d = tmp_path / "torn"
    d.mkdir()
    for name in keep:
        shutil.copy(tmp_path / name, d / name)
    path = d / os.path.basename(seg.path)
    for cut in [*range(1, 40), *range(40, len(rec), step), len(rec)]:
        path.write_bytes(full[:at] + rec[:cut] + full[at + cut:])
        assert os.path.getsize(path) == len(full)
        yield cut, d


def test_torn_write_inside_a_preallocated_segment_at_every_offset(tmp_path, codec):
    """A crash during a write into a preallocated segment leaves a record whose
    rest is zeros: it is a torn tail, skipped; what was synced before survives."""
    st = new_store(tmp_path, codec, preallocate=True)
    st._start_spare()
    wait_spare(st)
    put(st, [(meta(1), body(1, 500)), (meta(2), body(2, 700))])
    seg = st.current
    assert seg.prezeroed
    crash(st)
    rec = batch_of(codec, seg, codec.encode(REC_MESSAGE, _enc.encode(meta(3)), body(3, 300),
                                          seg.number))
    intact = {qid(1): body(1, 500), qid(2): body(2, 700)}
    for cut, d in torn_writes(tmp_path, seg, rec, 23):
        st2, stats = restart(d, codec)
        if cut < len(rec):
            assert contents(st2) == intact, f"cut at {cut}"
            assert stats["torn"] == 1, f"cut at {cut}"
        else:
            assert contents(st2) == {**intact, qid(3): body(3, 300)} and stats["torn"] == 0


def reused_segment(tmp_path, codec):
    """A store whose current segment is segment 1's file reused (rotated through 1, 2, 3):
    (store, the reused segment, what is queued, the queue ids that were in segment 1)."""
    st = new_store(tmp_path, codec, preallocate=True)
    st._start_spare()
    wait_spare(st)
    first = fill(st, 0, 10, size=100_000)           # segment 1, most of its MiB
    seg1 = st.current
    assert seg1.prezeroed and all(seg_of(st, q) == seg1.number for q in first)
    old_end = seg1.size
    wait_spare(st)
    fill(st, 10, 2, size=100_000)                    # rolls over to segment 2 (zero-filled)
    assert st.current.number == seg1.number + 1 and st.spare.recycled == 0
    put(st, [], done=first)                          # segment 1's DONE record is in 2
    wait_spare(st)                                   # the next zero-filled one
    _, numbers = reclaim(st)
    assert numbers == [seg1.number]
    # Segment 1's file is a spare now, and the one taken first.
    assert st.spare.recycled == 1 and st.spare.reused and st.spare.ready
    assert not os.path.exists(seg1.path) and os.path.getsize(tmp_path / SPARE_REUSED) >= MiB
    filled = st.spare.filled
    n = 12
    while st.current.number == seg1.number + 1:      # segment 2 fills up; 3 takes the spare
        fill(st, n, 1, size=100_000)
        n += 1
    seg3 = st.current
    assert seg3.number == seg1.number + 2 and seg3.prezeroed and not st.spare.reused
    # The zero-filled spare is still there, and nothing more was filled.
    assert st.spare.ready and st.spare.filled == filled
    later = fill(st, 30, 2, size=1000) + fill(st, 32, 1, size=50_000)
    assert all(seg_of(st, q) == seg3.number for q in later)
    assert seg3.size < old_end                       # segment 1's records lie beyond
    return st, seg3, contents(st), first


def test_a_reused_segment_file_never_gives_back_its_old_records(tmp_path, codec):
    st, seg3, expect, first = reused_segment(tmp_path, codec)
    data = open(seg3.path, "rb").read()
    assert len(data) >= MiB
    # What lies after the new records: segment 1's, whole and valid in segment 1.
    tail = _find(data, codec.MAGIC, seg3.size)
    assert tail > 0 and codec.decode(data, tail, segment=seg3.number)[0] == codec.STALE
    assert codec.decode(data, tail, segment=seg3.number - 2)[0] == codec.OK
    crash(st)
    st2, stats = restart(tmp_path, codec)
    assert contents(st2) == expect
    assert not set(first) & set(queued(st2))
    # The old records end the segment quietly: not damage, not a torn tail.
    assert stats["torn"] == 0 and stats["skipped_bytes"] == 0
    # The events reader ends the (complete) segment there too, having read only its own.
    seen = []
    off = read_events(codec, data, 0, len(data), False, lambda o, m: seen.append(o),
                      lambda o, n: pytest.fail(f"skipped {n} octets at {o}"),
                      segment=seg3.number)
    assert off == len(data)


def test_zeros_among_a_reused_files_old_contents_are_not_a_torn_tail(tmp_path, codec):
    """Where the new records end, the file's old contents may hold zeros (inside an old
    body, say) before its next old record: the segment ends there quietly, as at an old
    record -- zeros pass for a header of ours cut short only where zeros follow."""
    st, seg3, expect, first = reused_segment(tmp_path, codec)
    crash(st)
    with open(seg3.path, "r+b") as fh:
        data = fh.read()
        tail = _find(data, codec.MAGIC, seg3.size)
        assert tail - seg3.size >= 16          # (the new data ends inside an old record)
        fh.seek(seg3.size)
        fh.write(bytes(16))
    st2, stats = restart(tmp_path, codec)
    assert contents(st2) == expect
    assert not set(first) & set(queued(st2))
    assert stats["torn"] == 0


def test_a_torn_write_in_a_reused_segment_at_every_offset(tmp_path, codec):
    """A crash during a write into a reused file leaves a record followed by the old
    contents: nothing of it and nothing after it is read; what was synced survives."""
    st, seg3, expect, first = reused_segment(tmp_path, codec)
    crash(st)
    rec = batch_of(codec, seg3, codec.encode(REC_MESSAGE, _enc.encode(meta(99)),
                                             body(99, 300), seg3.number))
    others = [n for n in seg_files(tmp_path) if n != os.path.basename(seg3.path)]
    skips: list[int] = []
    for cut, d in torn_writes(tmp_path, seg3, rec, 29, keep=others):
        data = (d / os.path.basename(seg3.path)).read_bytes()
        skips.clear()
        read_events(codec, data, 0, len(data), False, lambda o, m: None,
                    lambda o, n: skips.append(o), segment=seg3.number)
        st2, stats = restart(d, codec)
        if cut < len(rec):
            assert contents(st2) == expect, f"cut at {cut}"
            assert not set(first) & set(queued(st2)), f"cut at {cut}"
            # Counted and logged as a torn tail once its header is whole (cut shorter,
            # the file's old octets after it cannot be told from a record of ours cut
            # off), by recovery and by the events reader alike.
            if cut >= 8:
                assert stats["torn"] == 1, f"cut at {cut}"
                assert skips == [seg3.size], f"cut at {cut}"
        else:
            assert contents(st2) == {**expect, qid(99): body(99, 300)}
            assert stats["torn"] == 0


def test_a_spare_whose_records_are_not_of_an_older_segment_is_not_used(tmp_path, codec):
    """Should a reused file ever meet a number not above its own (after every segment
    was reclaimed numbers start again at 1; here: a spool edited by hand), its records
    would not be stale there: it is removed, and a new file is used."""
    st, seg3, expect, first = reused_segment(tmp_path, codec)
    kept = {q: b for q, b in expect.items() if seg_of(st, q) != seg3.number}
    crash(st)
    # The newest segment's file becomes the spare: the next number is its own again.
    os.replace(seg3.path, tmp_path / SPARE_REUSED)
    st2, _ = restart(tmp_path, codec, preallocate=True)
    assert st2.spare.reused and contents(st2) == kept
    put(st2, [(meta(50), body(50))])
    assert st2.current.number == seg3.number
    assert not st2.current.prezeroed                 # a fresh file, not that one
    crash(st2)
    st3, stats = restart(tmp_path, codec)
    assert contents(st3) == {**kept, qid(50): body(50)} and stats["skipped_bytes"] == 0


@pytest.mark.parametrize("spare_name", [SPARE_READY, SPARE_REUSED])
def test_a_spare_name_on_a_segments_file_is_never_used(tmp_path, codec, spare_name):
    """A file with two names, a segment's and a spare's (a crash between the link and the
    unlink with which an earlier version moved a spare into place), is never made a
    spare: two segments would share one file and the later would overwrite the earlier."""
    st = new_store(tmp_path, codec, preallocate=True)
    st._start_spare()
    wait_spare(st)
    put(st, [(meta(1), body(1, 50_000))])
    seg = st.current
    assert seg.prezeroed
    crash(st)
    if os.path.exists(tmp_path / spare_name):
        os.unlink(tmp_path / spare_name)             # (the next zero-filled one)
    os.link(seg.path, tmp_path / spare_name)
    st2, _ = restart(tmp_path, codec, preallocate=True)
    assert not os.path.exists(tmp_path / spare_name) or \
        os.stat(tmp_path / spare_name).st_ino != os.stat(seg.path).st_ino
    wait_spare(st2)
    put(st2, [(meta(2), body(2))])
    assert os.stat(st2.current.path).st_ino != os.stat(seg.path).st_ino
    # Nor is a finished segment whose file has another name offered as a spare.
    put(st2, [], done=[qid(1)])
    os.link(seg.path, tmp_path / "elsewhere")
    fill(st2, 10, 12)                                # rolls over: segment 1 is finished
    _, numbers = reclaim(st2)
    assert seg.number in numbers and st2.spare.recycled == 0
    crash(st2)
    st3, stats = restart(tmp_path, codec)
    assert set(queued(st3)) == {qid(2)} | {qid(n) for n in range(10, 22)}
    assert st3.read_body(qid(2)) == body(2) and stats["skipped_bytes"] == 0


@pytest.mark.parametrize("gap", [0, 100])
def test_a_version_1_record_in_a_reused_files_old_bytes_is_not_read(tmp_path, codec, gap):
    """A segment written with numbered records holds no version-1 record of its own: one
    found in a reused file's old bytes (say inside an old message's body) is not read."""
    st, seg3, expect, first = reused_segment(tmp_path, codec)
    crash(st)
    data = bytearray(open(seg3.path, "rb").read())
    at = seg3.size + gap
    planted = codec.encode(REC_MESSAGE, _enc.encode(meta(77)), body(77, 300))
    events = codec.encode(REC_EVENTS, b'[{"type":"injection"}]', b"")
    data[at:at + len(planted) + len(events)] = planted + events
    with open(seg3.path, "wb") as fh:
        fh.write(data)
    st2, stats = restart(tmp_path, codec)
    assert contents(st2) == expect
    seen = []
    read_events(codec, bytes(data), 0, len(data), False, lambda o, m: seen.append(o),
                segment=seg3.number)
    assert all(o < seg3.size for o in seen)


def _find(data: bytes, needle: bytes, start: int) -> int:
    return data.find(needle, start)


def test_spare_leftovers_of_a_crash_are_not_trusted(tmp_path, codec):
    (tmp_path / SPARE_TMP).write_bytes(b"\x89MTA half filled")
    (tmp_path / SPARE_READY).write_bytes(b"\0" * 1000)    # not the segment size
    st = new_store(tmp_path, codec, preallocate=True)
    st._start_spare()
    wait_spare(st)
    assert os.path.getsize(tmp_path / SPARE_READY) == MiB
    assert open(tmp_path / SPARE_READY, "rb").read() == bytes(MiB)
    assert SPARE_TMP not in os.listdir(tmp_path)
    put(st, [(meta(1), body(1))])
    assert st.current.prezeroed
    crash(st)


def test_a_fill_stopped_half_way_leaves_no_file(tmp_path):
    """Stopping the spare's thread (the shard closing) while it zero-fills removes the
    half-filled file instead of leaving it for the next start to find."""
    spare = store_mod.Spare(str(tmp_path), 256 * store_mod.FILL_STEP)   # 64 MiB: many steps
    deadline = time.monotonic() + 20
    while not (tmp_path / SPARE_TMP).exists():
        assert time.monotonic() < deadline and not spare.ready, "the fill never began"
        time.sleep(0.0005)
    spare.close()
    assert not spare._thread.is_alive()
    if not spare.ready:         # (stopped before the fill's end: the usual case)
        assert os.listdir(tmp_path) == []
    else:
        assert os.listdir(tmp_path) == [SPARE_READY]


def test_no_spare_when_it_would_eat_into_the_free_space_reserve(tmp_path, codec):
    st = new_store(tmp_path, codec, preallocate=True, reserve=1 << 62)
    put(st, [(meta(1), body(1))])
    put(st, [(meta(2), body(2))])
    assert not st.current.prezeroed
    assert not st.spare.ready
    assert sorted(os.listdir(tmp_path)) == seg_files(tmp_path)
    crash(st)
    st2, stats = restart(tmp_path, codec)
    assert set(queued(st2)) == {qid(1), qid(2)} and stats["torn"] == 0


# ------------------------------------------------------------------- probe

def test_probe_writes_a_record_that_changes_nothing(tmp_path, codec):
    st = new_store(tmp_path, codec)
    st.recover()
    new = st.write([(meta(1), body(1)), (meta(2), body(2))], [])
    st.sync()
    st.commit(new, [])
    before = os.path.getsize(st.current.path)
    st.probe()
    assert os.path.getsize(st.current.path) > before      # it really wrote
    st.close()
    st2, stats = restart(tmp_path, codec)
    assert queued(st2) == [qid(1), qid(2)] and stats["skipped_bytes"] == 0
    st2.close()


def test_probe_fails_while_writes_fail_then_heals_in_a_new_segment(tmp_path, codec,
                                                                    monkeypatch):
    st = new_store(tmp_path, codec)
    st.recover()
    st.commit(st.write([(meta(1), body(1))], []), [])
    st.sync()
    real = os.pwritev

    def full(fd, bufs, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(OSError):
        st.write([(meta(2), body(2))], [])
    failed = st.current
    with pytest.raises(OSError):
        st.probe()
    segments = sorted(os.listdir(tmp_path))
    with pytest.raises(OSError):
        st.probe()
    assert sorted(os.listdir(tmp_path)) == segments        # no empty file per probe
    monkeypatch.setattr(os, "pwritev", real)
    st.probe()
    assert st.current is not failed and not st.current.failed
    st.close()
    st2, _ = restart(tmp_path, codec)
    assert queued(st2) == [qid(1)]
    st2.close()


def test_a_failed_fsync_cuts_off_what_it_did_not_cover(tmp_path, codec, monkeypatch):
    """After a failed fdatasync its pages stay readable in the page cache, marked clean but
    never written.  A compaction's copies written there and read back by a restart of the
    shard (not of the machine) would move their messages' home to them, the originals'
    segment would be reclaimed, and a reboot would lose both: so the store cuts the
    segment back to what its last good sync covered, and a restart does not see them."""
    st, qids, oldest, in_oldest, keep = one_left_in_the_oldest_segment(tmp_path, codec)
    copies, unlink = st.reclaim_plan(0.25, 2000)
    assert [m.qid for m, _ in copies] == [keep] and unlink[0].number == oldest
    seg = st.current
    synced = seg.size
    real = os.fdatasync

    def eio(fd):
        raise OSError(5, "Input/output error")

    st.write(copies, [])
    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(OSError):
        st.sync()
    monkeypatch.setattr(os, "fdatasync", real)
    assert os.path.getsize(seg.path) == synced          # the copy is gone from the file
    st2, stats = restart(tmp_path, codec)                 # (the same boot: the page cache)
    assert seg_of(st2, keep) == oldest                    # still at home: not reclaimable
    copies2, unlink2 = st2.reclaim_plan(0.25, 2000)
    assert keep in [m.qid for m, _ in copies2]            # copied again, not unlinked first
    assert set(queued(st2)) == set(queued(st))
    st2.close()


def test_failing_fsyncs_leave_no_segment_file_per_batch(tmp_path, codec, monkeypatch):
    """While fdatasync fails (the data's blocks cannot be written; the directory's can),
    each batch and each probe starts a new segment; one whose data never became durable
    is removed again instead of left behind (50 probes made 50 files)."""
    st = new_store(tmp_path, codec)
    st.recover()
    put(st, [(meta(1), body(1))])
    real = os.fdatasync

    def eio(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(OSError):
        put(st, [(meta(2), body(2))])
    files = seg_files(tmp_path)
    for _ in range(20):
        with pytest.raises(OSError):
            st.probe()
    assert seg_files(tmp_path) == files
    monkeypatch.setattr(os, "fdatasync", real)
    st.probe()
    put(st, [(meta(3), body(3))])
    st.close()
    st2, _ = restart(tmp_path, codec)
    assert queued(st2) == [qid(1), qid(3)]
    st2.close()


def test_recovery_syncs_each_segment_before_reading_it(tmp_path, codec, monkeypatch):
    """A shard killed between a write and its fdatasync leaves the write in the page
    cache only: recovery syncs each segment file before it trusts (and publishes the
    events of) what it reads there."""
    st = new_store(tmp_path, codec, segment_size=MiB)
    fill(st, 0, 25)
    st.write([(meta(100), body(100))], [])               # written, never synced: a kill -9
    synced = []
    real = os.fdatasync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    before = seg_files(tmp_path)
    assert len(before) >= 3
    monkeypatch.setattr(os, "fdatasync", record)
    st2, _ = restart(tmp_path, codec)
    assert {os.path.basename(p) for p in synced} >= set(before)
    assert qid(100) in queued(st2)
    st2.close()


def test_recipient_flags_survive_restart_and_compaction(tmp_path, codec):
    """A recipient's flags (the delay notice sent) are written with its update record,
    read back at recovery, and carried by a compaction copy."""
    from mta.store import PENDING, RCPT_DELAY_NOTIFIED
    st = new_store(tmp_path, codec)
    put(st, [(meta(1, nrcpt=3), body(1))])
    ups = {qid(1): [[1, PENDING, 2, 123.0, RCPT_DELAY_NOTIFIED], [2, PENDING, 2, 124.0]]}
    new = st.write([], [], ups)
    st.sync()
    st.commit(new, [], ups)

    def flags(st):
        return st.index.progress(qid(1))[3]

    assert flags(st) == [0, RCPT_DELAY_NOTIFIED, 0]
    st.close()
    st, _ = restart(tmp_path, codec)
    assert flags(st) == [0, RCPT_DELAY_NOTIFIED, 0]
    _, attempts, due, _ = st.index.progress(qid(1))
    assert attempts == [0, 2, 2] and due[1:] == [123.0, 124.0]
    copy, b = st.progress_meta(qid(1))
    assert copy.flags == [0, RCPT_DELAY_NOTIFIED, 0] and b == body(1)
    put(st, [(copy, b)])                                 # indexed from the copy
    assert flags(st) == [0, RCPT_DELAY_NOTIFIED, 0]
    st.index.apply(qid(1), [[1, PENDING, 3, 200.0]])    # a plain update keeps the flags
    assert flags(st) == [0, RCPT_DELAY_NOTIFIED, 0]
    st.close()


def test_owed_bounces_survive_restart_and_compaction_until_cleared(tmp_path, codec):
    """A recipient's RCPT_BOUNCE_OWED flag and what its bounce will say (RcptMeta.owed)
    are read back at recovery (Store.owed, no walk of the queue), carried by a
    compaction copy, dropped once an update clears the flag or a DONE ends the message."""
    from mta.store import FAILED, PENDING, RCPT_BOUNCE_OWED
    st = new_store(tmp_path, codec)
    put(st, [(meta(1, nrcpt=3), body(1)), (meta(2, nrcpt=2), body(2))])
    report = ["5.1.1", "mx.one.test", "550 5.1.1 no such user", 1_800_000_000.5]
    ups = {qid(1): [[0, FAILED, 1, 0.0, RCPT_BOUNCE_OWED], [1, PENDING, 1, 500.0]],
           qid(2): [[1, FAILED, 1, 0.0, RCPT_BOUNCE_OWED]]}
    owed = {qid(1): [[0, *report]], qid(2): [[1, "5.0.0", "", "refused", None]]}
    new = st.write([], [], ups, None, owed)
    st.sync()
    st.commit(new, [], ups, owed)
    want = {qid(1): {0: report}, qid(2): {1: ["5.0.0", "", "refused", None]}}
    assert st.owed == want
    st.close()
    st, _ = restart(tmp_path, codec)
    assert st.owed == want
    assert st.index.progress(qid(1))[3] == [RCPT_BOUNCE_OWED, 0, 0]
    # a compaction copy carries the flags and the reports; read back from it alone
    copies = [st.progress_meta(qid(1)), st.progress_meta(qid(2))]
    assert copies[0][0].owed == [[0, *report]]
    st.close()
    st = new_store(tmp_path / "copied", codec)
    st.recover()
    put(st, copies)
    assert st.owed == want
    st.close()
    st, _ = restart(tmp_path / "copied", codec)
    assert st.owed == want
    # the batch that queues the bounce clears the flag: nothing owed after a restart
    clear = {qid(1): [[0, FAILED, 1, 0.0, 0]]}
    new = st.write([], [qid(2)], clear)
    st.sync()
    st.commit(new, [qid(2)], clear)
    assert st.owed == {}
    st.close()
    st, _ = restart(tmp_path / "copied", codec)
    assert st.owed == {} and st.index.progress(qid(1))[3] == [0, 0, 0]
    assert qid(2) not in st.index
    st.close()


def test_recovery_in_slices_takes_new_messages_in_a_new_segment_meanwhile(tmp_path, codec):
    st = new_store(tmp_path, codec)
    put(st, [(meta(n), body(n)) for n in range(300)])
    put(st, [], done=[qid(n) for n in range(0, 300, 3)])         # a third finished
    before = contents(st)
    st.close()

    st = new_store(tmp_path, codec)
    st.recover_start()
    old_segments = set(st.segments)
    assert st.recover_step(50) is False and 0 < len(st.index) <= 50   # a slice, not all
    # New mail while the rest is still unread: its own new segment, readable at once.
    put(st, [(meta(n), body(n)) for n in range(1000, 1010)])
    assert {seg_of(st, qid(n)) for n in range(1000, 1010)} == {max(old_segments) + 1}
    assert st.read_body(qid(1005)) == body(1005)
    while not st.recover_step(50):
        pass
    stats = st.recover_finish()
    want = {**before, **{qid(n): body(n) for n in range(1000, 1010)}}
    assert contents(st) == want and stats["messages"] == len(want) == 210
    assert sum(s.live for s in st.segments.values()) == 210
    crash(st)
    st.close()
    # What was written during the slices is read back with the rest after a restart.
    st2, stats = restart(tmp_path, codec)
    assert contents(st2) == want
    st2.close()


def test_a_compaction_copy_keeps_the_jobs_out_and_the_last_replies(tmp_path, codec):
    # Not on disk, so a copy made by compaction must take them over: a message with a
    # delivery job out would otherwise look idle (dispatched again, or bounced by a bulk
    # bounce while it is being delivered).
    st, qids, oldest, in_oldest, keep = one_left_in_the_oldest_segment(tmp_path, codec)
    st.index.add_out(keep, 1)
    reply = (451, "4.2.2", "full", "mx.example.net", "127.0.0.2", 22, "temp-mailbox-full")
    st.index.set_last(keep, 0, reply)
    copies, unlinked = reclaim(st)
    assert [m.qid for m, _ in copies] == [keep] and unlinked[0] == oldest
    assert seg_of(st, keep) != oldest
    assert (st.index.info(keep)[9], st.index.last(keep, 0)) == (1, reply)   # (jobs out)
    assert len(qids) == 25


def test_recovery_lets_go_of_the_pages_it_has_read_and_reads_everything(tmp_path, codec,
                                                                        monkeypatch):
    # Pages read through the segment's mapping are released every RELEASE_STEP octets
    # (else a whole segment counts in the shard's RSS); records across a released
    # boundary are read as before.
    monkeypatch.setattr(store_mod, "RELEASE_STEP", 4096)
    released = []
    real = store_mod._release
    monkeypatch.setattr(store_mod, "_release",
                        lambda mm, a, b: released.append(real(mm, a, b)) or released[-1])
    st = new_store(tmp_path, codec)
    qids = fill(st, 0, 8, size=3000)
    put(st, [], done=qids[:2])
    expect = contents(st)
    st.close()
    st2, stats = restart(tmp_path, codec)
    assert contents(st2) == expect and stats["skipped_bytes"] == 0
    assert released and all(r % 4096 == 0 for r in released)   # (page-aligned)
    st2.close()


def test_a_batch_torn_out_of_order_is_dropped_whole(tmp_path, codec):
    """A power cut during a batch's fdatasync may keep some of its pages and lose others,
    in any order.  A batch holding a bounce (the DSN of X), X's DONE and their events,
    whose first pages were lost: recovery used to skip to the next record that decodes
    and apply the DONE -- X finished, its DSN and its events gone.  Now a batch counts
    only with its REC_COMMIT and every record it names: none of this one does (it was
    never acknowledged), X stays queued, and the events reader emits none of its events."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1))])
    seg = st.current
    start = seg.size
    events = b'[{"type":"bounce","queue_id":"X"}]'
    new = st.write([(meta(2), body(2, 20_000))], [qid(1)], None, events)   # bounce + DONE
    st.sync()
    st.commit(new, [qid(1)])
    crash(st)
    path = last_segment(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[start:start + 8192] = bytes(8192)            # its first two pages never written
    open(path, "wb").write(bytes(data))
    st2, stats = restart(tmp_path, codec)
    assert queued(st2) == [qid(1)] and stats["torn"] == 0
    assert stats["skipped_bytes"] == len(data) - start
    st2.close()
    seen = []
    read_events(codec, bytes(data), 0, len(data), False, lambda o, m: seen.append(m),
                segment=seg.number)
    assert seen == []
    # and whole, the same batch is read: the DONE applied, the events emitted
    st3 = new_store(tmp_path / "whole", codec)
    put(st3, [(meta(1), body(1))])
    new = st3.write([(meta(2), body(2, 20_000))], [qid(1)], None, events)
    st3.sync()
    st3.commit(new, [qid(1)])
    crash(st3)
    st4, stats = restart(tmp_path / "whole", codec)
    assert queued(st4) == [qid(2)] and stats["skipped_bytes"] == 0
    whole = open(last_segment(tmp_path / "whole"), "rb").read()
    number = int(os.path.basename(last_segment(tmp_path / "whole"))[:16])
    read_events(codec, whole, 0, len(whole), False, lambda o, m: seen.append(bytes(m)),
                segment=number)
    assert seen == [events]
    st4.close()


def test_segments_of_an_earlier_version_are_read_as_before(tmp_path, codec):
    """A segment that does not begin with the opening REC_COMMIT (written by a version
    before batches had one) is read record by record, as then."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1))])
    path = last_segment(tmp_path)
    number = st.current.number
    crash(st)
    st.close()
    legacy = b"".join([
        codec.encode(REC_MESSAGE, _enc.encode(meta(5)), body(5), number),
        codec.encode(REC_MESSAGE, _enc.encode(meta(6)), body(6), number)])
    with open(path, "wb") as fh:
        fh.write(legacy)
    st2, stats = restart(tmp_path, codec)
    assert queued(st2) == [qid(5), qid(6)] and stats["skipped_bytes"] == 0
    st2.close()


def _hold_writer_lock(directory, conn):
    from mta.store import lock_writer
    lock_writer(directory)
    conn.send("held")
    conn.recv()


def test_one_writer_per_shard_directory(tmp_path):
    # Another process writing the directory (an orphaned shard, a second daemon on the
    # same state directory): refused with its pid; once it is gone, taken.
    import multiprocessing
    from mta.store import WriterBusy, lock_writer
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_hold_writer_lock, args=(str(tmp_path), child), daemon=True)
    p.start()
    try:
        assert parent.poll(10) and parent.recv() == "held"
        with pytest.raises(WriterBusy) as e:
            lock_writer(str(tmp_path))
        assert f"pid {p.pid}" in e.value.strerror
    finally:
        p.kill()
        p.join(10)
    fd = lock_writer(str(tmp_path))     # the kernel dropped the dead writer's lock
    with open(tmp_path / "writer.lock") as fh:
        assert fh.read().strip() == str(os.getpid())
    os.close(fd)


@pytest.mark.parametrize("step", [1, 7, 100])
def test_writev_short_writes_continue_where_they_stopped(tmp_path, monkeypatch, step):
    """pwritev may write less than asked (a signal, a full pipe): the rest follows, at
    the right offsets, including a buffer cut in its middle; more than IOV_MAX
    buffers go in several calls."""
    real = os.pwritev
    calls = []

    def short(fd, bufs, offset):
        calls.append(len(bufs))
        data = b"".join(bytes(b) for b in bufs)[:step]
        return real(fd, [data], offset)

    bufs = [bytes([65 + i % 26]) * (1 + i % 5) for i in range(store_mod.IOV_MAX + 40)]
    want = b"".join(bufs)
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"head")
        monkeypatch.setattr(os, "pwritev", short)
        store_mod.Store._writev(fd, list(bufs), len(want), 4)
        monkeypatch.setattr(os, "pwritev", real)
        assert os.pread(fd, len(want) + 10, 0) == b"head" + want
        assert max(calls) <= store_mod.IOV_MAX
        # all at once: one call
        calls.clear()
        monkeypatch.setattr(os, "pwritev", lambda fd, b, o: calls.append(len(b)) or real(fd, b, o))
        store_mod.Store._writev(fd, bufs[:10], sum(map(len, bufs[:10])), 0)
        assert calls == [10]
        assert os.pread(fd, sum(map(len, bufs[:10])), 0) == b"".join(bufs[:10])
    finally:
        os.close(fd)


# ------------------------------------------- checksummed records that cannot be read

def put_raw(st: Store, rtype: int, mb: bytes, bd: bytes = b"") -> None:
    """One batch of one record of *rtype* with the meta octets *mb*, framed and checksummed
    as Store.write frames its own: a record that passes the checksum whatever it holds."""
    seg = st._writable()
    hdr = st.codec.encode_header(rtype, mb, bd, seg.number)
    cm = store_mod._COMMIT.pack(seg.size, 1)
    commit = st.codec.encode_header(store_mod.REC_COMMIT, cm, b"", seg.number)
    st._append(seg, [hdr, mb, bd, commit, cm],
               seg.size + len(hdr) + len(mb) + len(bd) + len(commit) + len(cm))
    st.sync()


def _m(q, *rest):
    return _raw.encode([q, "s@example.com", ["r@example.net"], 1_700_000_000.0, {}, "c",
                        *rest])


_raw = store_mod.msgspec.msgpack.Encoder()
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("rtype,mb", [
    (REC_MESSAGE, b"\xc1\xc1"),
    (REC_MESSAGE, _raw.encode(["A" * 20, "s@example.com"])),
    (REC_MESSAGE, _raw.encode(["A" * 20, "s@example.com", [5], 1.0, {}, "c"])),
    (store_mod.REC_DONE, _raw.encode([[5]])),
    (store_mod.REC_RCPT, _raw.encode([qid(1)])),
    (store_mod.REC_RCPT, _raw.encode([qid(1), [[0, 1, 1, 1.0]], [7]])),
], ids=["message-not-msgpack", "message-short", "message-recipient-int", "done-qid-int", "update-short", "update-owed-int"])
def test_a_record_that_cannot_be_read_is_passed_over(tmp_path, codec, rtype, mb, caplog):
    """A checksummed record whose content is not what its type says (a bug, a version that
    wrote something else, damage the checksum missed) or holds a time no clock reads, was
    raised by the recovery: the shard died at every start, and the node took no mail.  It
    is now logged with its place, counted, and passed over; everything else is read."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1, 2), body(1))])
    put_raw(st, rtype, mb, b"x" * 50 if rtype == REC_MESSAGE else b"")
    put(st, [(meta(2), body(2))], done=[])
    st.write([], [], {qid(1): [[1, store_mod.DELIVERED, 1, 5.0]]})
    st.sync()
    with caplog.at_level("ERROR", logger="mta.spool"):
        st2, stats = restart(tmp_path, codec)
    assert contents(st2) == {qid(1): body(1), qid(2): body(2)}
    assert st2.index.recipient(qid(1), 1)[0] == store_mod.DELIVERED    # (read after it)
    assert stats["unreadable"] == 1 and stats["skipped_bytes"] == 0
    msgs = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith(f"segment {last_segment(tmp_path)}: the ")
    assert msgs[0].endswith("; passed over")


def _damaged(q, arrival, *rest):
    return _raw.encode([q, "s@example.com", ["r1@example.net", "r2@example.net"], arrival,
                        {}, "c", *rest])


TAKEN = 0x18A3F2C4B1D2E / 1e6       # when qid(n) was made (n microseconds later)


@pytest.mark.parametrize("arrival,progress,mended", [
    (NAN, (), "arrival"),
    (INF, (), "arrival"),
    (-INF, (), "arrival"),
    (3e12, (), "arrival"),              # the year 97,000
    (-5e11, (), "arrival"),
    ("1700000000", (), "arrival"),      # (not a number at all)
    (None, (), "arrival"),
    (1_700_000_100.0, ([0, 0], [1, 2], [NAN, 1_700_000_200.0]), "due"),
    (1_700_000_100.0, ([0, 0], [1, 2], [1e300, -INF]), "due"),
    (INF, ([0, 0], [1, 2], [NAN, 1_700_000_200.0]), "arrival, due"),
], ids=["arrival-nan", "arrival-inf", "arrival-minus-inf", "arrival-year-97000",
        "arrival-before-1970", "arrival-string", "arrival-nil", "due-nan", "due-far",
        "both"])
def test_a_message_whose_times_are_out_of_range_is_mended_not_passed_over(
        tmp_path, codec, arrival, progress, mended, caplog):
    """A message record whose arrival or a recipient's due time is out of range (NaN,
    infinite, past MAX_TIME, or no number) was passed over whole as unreadable: the message
    had been acknowledged, its queue id, sender and recipients were there, and none of them
    was ever delivered, bounced or reported.  It is taken with those times mended -- the
    arrival when its queue id was made, a due time its start -- logged, and counted."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1))])
    put_raw(st, REC_MESSAGE, _damaged(qid(7), arrival, *progress), b"damaged body")
    put(st, [(meta(2), body(2))])
    st.write([], [], {qid(7): [[1, store_mod.PENDING, 3, 1_700_000_300.0]]})
    st.sync()
    with caplog.at_level("WARNING", logger="mta.spool"):
        st2, stats = restart(tmp_path, codec)
    assert contents(st2) == {qid(1): body(1), qid(2): body(2), qid(7): b"damaged body"}
    assert stats["unreadable"] == 0 and stats["mended_time"] == 1
    at = TAKEN + 7e-6 if "arrival" in mended else 1_700_000_100.0
    info = st2.index.info(qid(7))
    assert info[4] == info[5] == pytest.approx(at, abs=1e-6)
    r0, r1 = st2.index.recipient(qid(7), 0), st2.index.recipient(qid(7), 1)
    # the update after it is read as always; a due time out of range is its start
    assert r1[:3] == (store_mod.PENDING, 3, 1_700_000_300.0)
    if progress:
        assert r0[:3] == (store_mod.PENDING, 1, pytest.approx(at, abs=1e-6)) or \
            r0[:3] == (store_mod.PENDING, 1, 1_700_000_200.0) and "due" not in mended
    else:
        assert r0[:3] == (store_mod.PENDING, 0, pytest.approx(at, abs=1e-6))
    msgs = [r.getMessage() for r in caplog.records if "out of range" in r.getMessage()]
    assert msgs == [f"segment {last_segment(tmp_path)}: the message record at offset "
                    f"{msgs[0].split('offset ')[1].split()[0]} has a time out of range "
                    f"({mended}); mended: {qid(7)} arrives at {at:.6f}"]
    # read back (a delivery job, a query, spool-dump), the envelope is the mended one ...
    m, b = st2.read_record(qid(7))
    assert (m.qid, m.rcpts, b) == (qid(7), ["r1@example.net", "r2@example.net"],
                                   b"damaged body")
    assert m.arrival == info[4] and st2.read_meta(qid(7)).arrival == info[4]
    assert store_mod.start_of(m) == info[5]
    # ... and a copy made by compaction holds the mended times: it reads as any other
    copy, _ = st2.progress_meta(qid(7))
    assert store_mod._dec_msg.decode(store_mod._enc.encode(copy)) == copy
    # expiry counts from the mended start
    assert st2.index.schedule_recovered(1 << 30, 3600.0) == []
    assert qid(7) not in st2.index.passed(info[5] + 3600.0 - 2)
    assert qid(7) in st2.index.passed(info[5] + 3600.0 + 2)


def test_a_message_whose_times_and_more_are_damaged_is_still_unreadable(tmp_path, codec,
                                                                         caplog):
    """Mending takes only times: a record with its arrival out of range and its recipients
    no addresses is passed over as unreadable, saying what MessageMeta's decoder said (about
    the recipients: it reads the fields in order)."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1))])
    put_raw(st, REC_MESSAGE, _raw.encode([qid(7), "s@example.com", [5], NAN, {}, "c"]),
            b"x")
    with caplog.at_level("ERROR", logger="mta.spool"):
        st2, stats = restart(tmp_path, codec)
    assert queued(st2) == [qid(1)]
    assert stats["unreadable"] == 1 and stats["mended_time"] == 0
    assert any("cannot be read (ValidationError: Expected `str`, got `int` - at `$[2][0]`)"
               in r.getMessage()
               for r in caplog.records)


OWED = store_mod.RCPT_BOUNCE_OWED
REPORT = ["5.1.1", "mx.example.net", "550 5.1.1 no such user", 1_700_000_050.0]


@pytest.mark.parametrize("progress,want,fields", [
    # a state no version writes: that recipient pending (the others as they were)
    (([2, 9, 1], [1, 1, 1], None), [(2, 1), (0, 1), (1, 1)], "state"),
    (([2, 1.5, 1], None, None), [(2, 0), (0, 0), (1, 0)], "state"),
    # not one value per recipient: as a fresh message's (pending, never tried)
    (([1, 0], None, None), [(0, 0), (0, 0), (0, 0)], "state"),
    ((None, [1, 2], None), [(0, 0), (0, 0), (0, 0)], "attempts"),
    # attempts beyond 64 bits (the index refused them) or no number: saturated, 0
    (([0, 0, 1], [2**64 - 1, "x", 3], None), [(0, 0xFFFF), (0, 0), (1, 3)], "attempts"),
    # flags beyond a byte: none, but the bounce its report says is owed
    (([2, 0, 0], [1, 0, 0], [300, -1, 0]), [(2, 1), (0, 0), (0, 0)], "flags"),
    (([2, 0, 0], [1, 0, 0], [1, 0]), [(2, 1), (0, 0), (0, 0)], "flags"),
], ids=["state-unknown", "state-not-int", "states-not-per-recipient",
        "attempts-not-per-recipient", "attempts-huge", "flags-beyond-a-byte",
        "flags-not-per-recipient"])
def test_a_copy_whose_progress_is_damaged_is_mended_not_passed_over(
        tmp_path, codec, progress, want, fields, caplog):
    """A message record made by compaction carries its recipients' progress; when that was
    out of range (a state no version writes, attempts beyond 64 bits, flags beyond a byte,
    or not one value per recipient) the record was passed over whole -- and a compaction
    copy is the message's only record once its old segment is gone: acknowledged, never
    delivered, bounced nor reported.  It is taken with the damaged progress mended: a
    recipient whose state is unknown is pending (at least once: it may be sent again, as
    after a damaged recipient update), attempts saturated, flags none but the owed bounce
    its report names; logged and counted (reason "progress")."""
    state, attempts, flags = progress
    owed = [[0, *REPORT]] if flags is not None else None
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1))])
    put_raw(st, REC_MESSAGE, _raw.encode(
        [qid(7), "s@example.com", ["a@example.net", "b@example.net", "c@example.net"],
         1_700_000_100.0, {}, "c", state, attempts, [1_700_000_200.0] * 3, flags, owed]),
        b"copied body")
    with caplog.at_level("WARNING", logger="mta.spool"):
        st2, stats = restart(tmp_path, codec)
    assert contents(st2) == {qid(1): body(1), qid(7): b"copied body"}
    assert stats["unreadable"] == 0 and stats["mended_progress"] == 1
    assert stats["mended_time"] == 0
    got = [st2.index.recipient(qid(7), i) for i in range(3)]
    assert [r[:2] for r in got] == want
    if flags is not None:
        assert [r[3] for r in got] == [OWED, 0, 0]
        assert st2.owed == {qid(7): {0: REPORT}}
    msgs = [r.getMessage() for r in caplog.records if "out of range" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].endswith(
        f"has its recipients' progress out of range ({fields}); mended: {qid(7)} arrives "
        "at 1700000100.000000")
    m, b = st2.read_record(qid(7))
    assert (m.qid, m.arrival, b) == (qid(7), 1_700_000_100.0, b"copied body")
    copy, _ = st2.progress_meta(qid(7))
    assert store_mod._dec_msg.decode(store_mod._enc.encode(copy)) == copy


def test_a_time_no_clock_reads_is_not_taken_from_a_record(tmp_path, codec):
    """A recipient update whose due time is NaN or infinite stalled (NaN: due at once, again
    and again, ahead of every other message) or stopped (infinity: the wait for it) the
    shard's loop at every start: that update is skipped, as a malformed one is; a start
    time (options.start_time) beyond any clock is ignored, as one that is no number."""
    st = new_store(tmp_path, codec)
    m = meta(1, 3)
    m.params = {"start_at": 1e300}
    put(st, [(m, body(1))])
    st.write([], [], {qid(1): [[0, 0, 1, NAN], [1, 0, 1, -INF], [2, 0, 1, 1_800_000_000.0]]})
    st.sync()
    st2, stats = restart(tmp_path, codec)
    assert stats["unreadable"] == 0
    got = [st2.index.recipient(qid(1), i)[:3] for i in range(3)]
    assert got == [(0, 0, m.arrival), (0, 0, m.arrival), (0, 1, 1_800_000_000.0)]
    assert store_mod.start_of(st2.read_meta(qid(1))) == m.arrival


def test_a_file_not_named_as_a_segment_is_ignored(tmp_path, codec, caplog):
    """A file whose name ends in .seg but is no segment number (a copy an operator left
    in the shard directory) ended the shard at every start (int() of its name); it is
    now logged and left alone, as the events process's reader already did."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1))])
    (tmp_path / "old-1.seg").write_bytes(b"x" * 100)
    (tmp_path / "\u00b2.seg").write_bytes(b"")           # (a digit int() does not take)
    os.mkdir(tmp_path / "7.seg")
    with caplog.at_level("WARNING", logger="mta.spool"):
        st2, stats = restart(tmp_path, codec)
    assert contents(st2) == {qid(1): body(1)} and stats["segments"] == 1
    assert sum("not a segment file" in r.getMessage() for r in caplog.records) == 3
    put(st2, [(meta(2), body(2))])                       # a new segment after the last
    assert set(seg_files(tmp_path)) >= {"old-1.seg", "\u00b2.seg", "7.seg"}


def test_an_owed_report_naming_no_recipient_index_is_dropped_not_kept(tmp_path, codec):
    """A recipient update's owed report whose index is beyond 64 bits (a damaged or foreign
    record) made Store._owe raise after it had put the report into the message's held
    reports -- in place, when the message already owed a bounce: the record counted as
    unreadable though its updates were applied, every later record of the message raised
    too, and after the recovery a live commit of the message raised in the shard.  It is
    now dropped as any malformed report is, and the record read."""
    from mta.store import FAILED, PENDING, RCPT_BOUNCE_OWED
    st = new_store(tmp_path, codec)
    put(st, [(meta(1, nrcpt=3), body(1))])
    report = ["5.1.1", "mx.one.test", "550 5.1.1 no such user", 1_800_000_000.5]
    ups = {qid(1): [[0, FAILED, 1, 0.0, RCPT_BOUNCE_OWED]]}
    new = st.write([], [], ups, None, {qid(1): [[0, *report]]})
    st.sync()
    st.commit(new, [], ups, {qid(1): [[0, *report]]})
    put_raw(st, store_mod.REC_RCPT, _raw.encode(
        [qid(1), [[1, PENDING, 1, 500.0]], [[2**64 - 1, "5.0.0", "", "refused", None]]]))
    st.write([], [], {qid(1): [[2, PENDING, 1, 600.0]]})
    st.sync()
    st.close()
    st, stats = restart(tmp_path, codec)
    assert stats["unreadable"] == 0
    assert st.owed == {qid(1): {0: report}}
    assert [st.index.recipient(qid(1), i)[:3] for i in (1, 2)] == \
        [(PENDING, 1, 500.0), (PENDING, 1, 600.0)]
    ups = {qid(1): [[1, FAILED, 2, 0.0]]}
    new = st.write([], [], ups)
    st.sync()
    st.commit(new, [], ups)             # (raised before: the report kept in place)
    assert st.owed == {qid(1): {0: report}}
    st.close()


# ------------------------------------- an acknowledged batch damaged after its sync

def _batch_damaged_after_sync(tmp_path, codec, damage: str, later: bool):
    """Segment data: a batch of message 1 (two recipients); batch B of its events, messages
    2 and 3, an update delivering message 1's first recipient and a DONE of message 9;
    then, when *later*, a batch of message 4.  Then one octet of B is damaged: *damage*
    says where.  The store, restarted, and its stats."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1, 2), body(1)), (meta(9), body(9))])
    seg = st.current
    start = seg.size
    ups = {qid(1): [[0, store_mod.DELIVERED, 1, 5.0]]}
    new = st.write([(meta(2), body(2)), (meta(3), body(3))], [qid(9)], ups,
                   b'[{"type":"delivery"}]')
    st.sync()
    st.commit(new, [qid(9)], ups)
    end = seg.size
    where = {"events": start + 25,
             "message": sum(st.index.location(qid(2))[1:3]) + 10,
             "done": end - 40,
             "commit": end - 5}[damage]
    if later:
        put(st, [(meta(4), body(4))])
    crash(st)
    path = last_segment(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[where] ^= 0x40
    open(path, "wb").write(bytes(data))
    return restart(tmp_path, codec)


@pytest.mark.parametrize("damage", ["events", "message", "done", "commit"])
def test_an_acknowledged_batch_damaged_later_keeps_its_intact_messages(tmp_path, codec,
                                                                       damage, caplog):
    """A batch whose records were damaged after its fdatasync returned (a later batch of
    the same segment follows it: the shard writes the next batch only after that, and a
    failed sync ends the segment) was dropped whole, as a batch a power cut tore: its
    messages -- acknowledged -- were never delivered, bounced nor reported.  Now its intact
    message records are taken; its recipient updates and DONE records are not (those may
    be sent again: at least once), and the damage is still counted."""
    with caplog.at_level("WARNING", logger="mta.spool"):
        st2, stats = _batch_damaged_after_sync(tmp_path, codec, damage, later=True)
    taken = [qid(3)] if damage == "message" else [qid(2), qid(3)]
    assert queued(st2) == sorted([qid(1), qid(9), *taken, qid(4)])
    assert st2.index.recipient(qid(1), 0)[0] == store_mod.PENDING   # (its update not read)
    assert stats["damaged"] >= 1
    assert stats["mended_batch"] == len(taken) and stats["mended"] == len(taken)
    assert contents(st2)[qid(3)] == body(3)
    msgs = [r.getMessage() for r in caplog.records if "synced" in r.getMessage()]
    assert len(msgs) == 1 and f": {len(taken)} message record(s) of a batch damaged after" \
        in msgs[0]


@pytest.mark.parametrize("damage", ["events", "message", "done", "commit"])
def test_a_damaged_batch_at_the_end_of_its_segment_is_still_dropped_whole(tmp_path, codec,
                                                                           damage):
    """Nothing follows it: it may be the batch a power cut tore during its fdatasync, never
    acknowledged -- none of it counts, as before."""
    st2, stats = _batch_damaged_after_sync(tmp_path, codec, damage, later=False)
    assert queued(st2) == [qid(1), qid(9)]
    assert stats["mended_batch"] == 0


# ------------------------------------------- an arrival in range that no clock read

@pytest.mark.parametrize("arrival", [-1.0, 0.0, -5e10, "ahead-2y", 9e10],
                         ids=["minus-one", "zero", "year-386", "two-years-ahead",
                              "year-4822"])
def test_an_arrival_no_clock_read_is_mended(tmp_path, codec, arrival, caplog):
    """An arrival within MAX_TIME but at or before 1970, or more than a year ahead of the
    clock, was taken as it was: the message expired at once without an attempt (its age
    counted from then) or, far ahead, made the recovery step every recipient's due time
    of the shard back as if the clock had been set back by centuries.  It is mended as an
    arrival out of range is: the time its queue id was made."""
    if arrival == "ahead-2y":
        arrival = time.time() + 2 * 365 * 86400.0
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1))])
    m = meta(7, 2)
    m.arrival = arrival
    put(st, [(m, body(7))])
    with caplog.at_level("WARNING", logger="mta.spool"):
        st2, stats = restart(tmp_path, codec)
    assert queued(st2) == [qid(1), qid(7)]
    assert stats["mended_time"] == 1 and stats["unreadable"] == 0
    at = TAKEN + 7e-6
    info = st2.index.info(qid(7))
    assert info[4] == info[5] == pytest.approx(at, abs=1e-6)
    assert st2.index.recipient(qid(7), 1)[2] == pytest.approx(at, abs=1e-6)
    assert st2.latest_arrival == meta(1).arrival     # (not the damaged one: no step back)
    assert st2.read_record(qid(7))[0].arrival == info[4] == st2.read_meta(qid(7)).arrival
    assert any(f"has a time out of range (arrival); mended: {qid(7)} arrives at {at:.6f}"
               in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ahead", [60.0, 86400.0, 200 * 86400.0])
def test_an_arrival_a_clock_ahead_read_is_kept(tmp_path, codec, ahead):
    """A clock that ran ahead (set right since) wrote arrivals later than now: those are
    what the clock read, kept (the shard steps its due times back: _clock_behind_spool)."""
    st = new_store(tmp_path, codec)
    m = meta(7)
    m.arrival = time.time() + ahead
    put(st, [(m, body(7))])
    st2, stats = restart(tmp_path, codec)
    assert stats["mended_time"] == 0 and st2.index.info(qid(7))[4] == m.arrival
    assert st2.read_meta(qid(7)).arrival == m.arrival


def test_arrivals_are_kept_when_the_clock_was_set_back_over_a_year(tmp_path, codec,
                                                                   monkeypatch, caplog):
    """A clock set back more than ARRIVAL_AHEAD_MAX while the daemon was down (a board
    whose real-time clock lost its time boots at 1970 or 2000) puts every arrival on disk
    more than a year ahead of it.  They were what the clock read when the mail came: kept
    (the shard steps its due times back, _clock_behind_spool, and ages count from them),
    not each mended to its segment file's time with a warning per message.  A damaged
    arrival still takes its queue id's time, not the file's."""
    st = new_store(tmp_path, codec)
    put(st, [(meta(1), body(1)), (meta(2), body(2))])
    m = meta(3)
    m.arrival = -1.0
    put(st, [(m, body(3))])
    monkeypatch.setattr(store_mod.time, "time", lambda: 946_684_800.0)    # 2000-01-01
    with caplog.at_level("WARNING", logger="mta.spool"):
        st2, stats = restart(tmp_path, codec)
    monkeypatch.undo()
    assert queued(st2) == [qid(1), qid(2), qid(3)]
    assert stats["mended_time"] == 1 and stats["mended"] == 1, stats
    for n in (1, 2):
        assert st2.index.info(qid(n))[4] == meta(n).arrival
        assert st2.read_meta(qid(n)).arrival == meta(n).arrival
    assert st2.index.info(qid(3))[4] == pytest.approx(TAKEN + 3e-6, abs=1e-6)
    assert st2.latest_arrival == meta(2).arrival
    assert sum("mended" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("client", [5, None, ["a"], b"\xff"], ids=["int", "nil", "list", "bin"])
def test_a_message_whose_client_is_damaged_is_mended_not_passed_over(tmp_path, codec, client,
                                                                    caplog):
    """The client a message came from (reported in its events, nothing else) that is no
    text made the whole record unreadable: acknowledged, never delivered, bounced nor
    reported.  It is taken with the client unknown (empty), logged, counted (client)."""
    st = new_store(tmp_path, codec)
    put_raw(st, REC_MESSAGE, _raw.encode([qid(7), "s@example.com", ["r@example.net"],
                                          1_700_000_100.0, {}, client]), b"body")
    with caplog.at_level("WARNING", logger="mta.spool"):
        st2, stats = restart(tmp_path, codec)
    assert contents(st2) == {qid(7): b"body"}
    assert stats["mended_client"] == 1 and stats["unreadable"] == 0
    m = st2.read_meta(qid(7))
    assert (m.client, m.arrival, m.sender) == ("", 1_700_000_100.0, "s@example.com")
    assert any(r.getMessage().endswith(f"has its client out of range (client); mended: "
                                       f"{qid(7)} arrives at 1700000100.000000")
               for r in caplog.records)
