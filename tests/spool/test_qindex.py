"""Tests of the spool's queue index, run against the compiled module and its pure twin.

The unit tests state each operation's behaviour; the differential tests drive
both implementations with the same random operation sequences (hypothesis,
and one long seeded run that makes the compiled arena rebuild itself) and
require the same answers and the same final state.
"""

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta import native
from mta.spool import dispatch
from mta.store import (DELIVERED, EXPIRED, FAILED, PENDING, RCPT_BOUNCE_OWED,
                       RCPT_DELAY_NOTIFIED)

PURE = native.load("qindex", pure=True)
COMPILED = native.load("qindex", pure=False)
IMPLS = {"pure": PURE, "compiled": COMPILED}

Q1 = "18A3F2C4B1D2E0300001"
Q2 = "18A3F2C4B1D2E0300002"
Q3 = "18A3F2C4B1D2E0300003"
T0 = 1_700_000_000.0


@pytest.fixture(params=sorted(IMPLS))
def mod(request):
    return IMPLS[request.param]


def put(q, qid, domains=("a.example",), seg=1, lane=dispatch.BULK, start=T0, pool="default",
        campaign=None, **kw):
    return q.add(qid, seg, 100, 10, 2000, T0, start, lane, pool, campaign, list(domains), **kw)


def test_sorted_qids_pages_walk_the_queue_once_in_order(mod):
    # mta queue list asks a page at a time: the smallest *limit* ids after the last one
    # seen, whatever order they were added in, each once
    q = mod.QueueIndex(1.0)
    rnd = random.Random(7)
    qids = ["%020X" % rnd.randrange(16 ** 20) for _ in range(500)]
    for i, qid in enumerate(qids):
        put(q, qid, seg=1 + i % 5)
    for qid in qids[::3]:
        q.remove(qid)
    want = sorted(set(qids) - set(qids[::3]))
    for limit in (1, 7, 64, 333, 1000):
        got, after = [], ""
        while True:
            page = q.sorted_qids(limit, after)
            assert len(page) <= limit
            if not page:
                break
            got += page
            after = page[-1]
        assert got == want
    assert q.sorted_qids(5, want[10]) == want[11:16]
    assert q.sorted_qids(5, "%020X" % (int(want[10], 16) + 1)) == want[11:16]   # not queued


def test_constants_match_the_spool():
    for impl in IMPLS.values():
        assert impl.PENDING == PENDING
        assert impl.LANES == len(dispatch.LANES)
        assert {dispatch.BULK, dispatch.TRANSACTIONAL} == set(range(impl.LANES))


def test_add_lookup_and_remove(mod):
    q = mod.QueueIndex(1.0)
    assert put(q, Q1, ["a.example", "b.example"]) is False
    assert Q1 in q and Q2 not in q and len(q) == 1
    assert q.info(Q1) == (1, 100, 10, 2000, T0, T0, 0, "default", None, 0, 2, 2)
    assert q.location(Q1) == (1, 100, 10, 2000)
    assert q.progress(Q1) == ([PENDING] * 2, [0, 0], [T0, T0], [0, 0])
    assert q.domains(Q1) == ["a.example", "b.example"]
    assert q.recipient(Q1, 1) == (PENDING, 0, T0, 0, "b.example", None)
    assert q.recipient(Q1, 2) is None and q.recipient(Q1, -1) is None
    assert (q.recipients, q.body_bytes) == (2, 2000)
    assert q.remove(Q1) is True and q.remove(Q1) is False
    assert Q1 not in q and len(q) == 0 and q.info(Q1) is None
    assert (q.recipients, q.body_bytes) == (0, 0)
    assert q.tables() == (0, 0, 0, 0)


def test_unknown_ids_answer_none(mod):
    q = mod.QueueIndex(1.0)
    for call in (q.info, q.location, q.progress, q.domains, q.pending_idxs, q.first_due,
                 q.scheduled):
        assert call(Q1) is None
    assert q.ready(Q1, T0) is None and q.matching(Q1) is None
    assert not q.update(Q1, 0, DELIVERED, 1, 0.0) and not q.set_due(Q1, 0, T0)
    assert not q.push(Q1, T0) and not q.set_deadline(Q1, T0) and q.add_out(Q1, 1) == -1
    assert 12345 not in q


def test_progress_given_with_the_record(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b", "c"], state=[DELIVERED, PENDING, FAILED], attempts=[1, 2, 70000],
        due=[0.0, T0 + 5, 0.0], flags=[0, RCPT_DELAY_NOTIFIED, 0])
    assert q.progress(Q1) == ([DELIVERED, PENDING, FAILED], [1, 2, 0xFFFF], [0.0, T0 + 5, 0.0],
                              [0, RCPT_DELAY_NOTIFIED, 0])
    assert q.info(Q1)[-1] == 1
    assert q.pending_idxs(Q1) == [1] and q.first_due(Q1) == T0 + 5


def test_recipient_flags_are_a_bit_set_kept_as_recorded(mod):
    # the bounce owed (mta.spool.outcomes) beside the delay notice sent: an update's
    # fifth element replaces the bits, one without it keeps them, a copy carries them
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b"], flags=[RCPT_DELAY_NOTIFIED, 0])
    both = RCPT_DELAY_NOTIFIED | RCPT_BOUNCE_OWED
    assert q.apply(Q1, [[0, FAILED, 2, 0.0, both], [1, FAILED, 1, 0.0, RCPT_BOUNCE_OWED]]) == 2
    assert q.progress(Q1)[3] == [both, RCPT_BOUNCE_OWED]
    assert q.apply(Q1, [[1, FAILED, 1, 0.0]]) == 1 and q.recipient(Q1, 1)[3] == RCPT_BOUNCE_OWED
    state, attempts, due, flags = q.progress(Q1)
    put(q, Q1, ["a", "b"], state=state, attempts=attempts, due=due, flags=flags)
    assert q.progress(Q1)[3] == [both, RCPT_BOUNCE_OWED]
    assert q.apply(Q1, [[0, FAILED, 2, 0.0, both & ~RCPT_BOUNCE_OWED]]) == 1
    assert q.progress(Q1)[3] == [RCPT_DELAY_NOTIFIED, RCPT_BOUNCE_OWED]


def test_bad_arguments(mod):
    q = mod.QueueIndex(1.0)
    with pytest.raises(ValueError):
        mod.QueueIndex(0)
    with pytest.raises(TypeError):
        q.add(b"x", 1, 0, 0, 0, T0, T0, 0, None, None, [])
    with pytest.raises(ValueError):
        put(q, Q1, lane=2)
    with pytest.raises(ValueError):
        put(q, Q1, ["a", "b"], state=[PENDING])
    with pytest.raises(ValueError):
        put(q, Q1, state=[256])
    with pytest.raises(TypeError):
        put(q, Q1, [b"a"])
    with pytest.raises(TypeError):
        put(q, Q1, pool=1)
    with pytest.raises(OverflowError):
        put(q, Q1, seg=-1)
    with pytest.raises(ValueError):
        put(q, Q2)
        q.update(Q2, 0, 300, 0, 0.0)
    assert len(q) == 1 and q.progress(Q2) == ([PENDING], [0], [T0], [0])


def test_odd_queue_ids_live_in_a_side_table(mod):
    q = mod.QueueIndex(1.0)
    # (twenty characters: lower case, one- two- and four-octet kinds, a digit past '9'
    # and a letter past 'F', the characters either side of each range)
    odd = ["18a3f2c4b1d2e0300001", "short", "18A3F2C4B1D2E03000010", "", "ÄÖ" * 10,
           "18A3F2C4B1D2E0300\u01000", "18A3F2C4B1D2E0300\U0001F6000",
           "18A3F2C4B1D2E030000G", "18A3F2C4B1D2E030000:", "/8A3F2C4B1D2E0300000",
           "18A3F2C4B1D2E030000@", "18A3F2C4B1D2E030000\x00"]
    for i, qid in enumerate(odd):
        put(q, qid, seg=i + 1)
    put(q, Q2)
    put(q, Q1)
    assert all(qid in q for qid in odd) and len(q) == len(odd) + 2
    assert not any(mod.is_canonical(x) for x in odd)
    assert all(mod.is_canonical(x) for x in ("0123456789ABCDEF0000", "FFFFFFFFFFFFFFFFFFFF",
                                             "00000000000000000000"))
    assert q.sorted_qids() == [Q1, Q2] + sorted(odd)
    assert q.sorted_qids(3) == [Q1, Q2, sorted(odd)[0]]
    assert [mod.is_canonical(x) for x in (Q1, odd[0], odd[1], 5)] == [True, False, False,
                                                                      False]
    # pages: after a queue id (queued or not, canonical or odd), at most a limit
    assert q.sorted_qids(2, Q1) == [Q2, sorted(odd)[0]]
    assert q.sorted_qids(0, Q3) == sorted(odd)
    assert q.sorted_qids(0, sorted(odd)[2]) == sorted(odd)[3:]
    assert q.sorted_qids(0, sorted(odd)[-1]) == []
    assert q.info("short")[0] == 2
    for qid in odd:
        q.push(qid, T0)
    assert sorted(q.pop_due(0, T0, 20)) == sorted(odd)
    assert q.remove("short") and "short" not in q and len(q) == len(odd) + 1


def test_every_character_of_a_queue_id_is_checked_and_read():
    # (the compiled module reads eight octets at a time: each position, with each
    # character around the hex digits' ranges, is a canonical id exactly when the pure
    # twin says so, and its value -- its place in the order -- is that of its digits)
    base = "18A3F2C4B1D2E0300001"
    for pos in range(20):
        for c in [*range(0, 0x100), 0x100, 0x660, 0xFF10, 0x1F600]:
            qid = base[:pos] + chr(c) + base[pos + 1:]
            assert COMPILED.is_canonical(qid) == PURE.is_canonical(qid), (pos, c)
    ids = [f"{n:020X}" for n in (0, 1, 0xF, 0x10, 0xFFFF, 0x10000, 2**64 - 1, 2**64,
                                 2**79, 2**80 - 1, 0x0123456789ABCDEF0123)]
    rnd = random.Random(7)
    ids += [f"{rnd.getrandbits(80):020X}" for _ in range(300)]
    for impl in (COMPILED, PURE):
        q = impl.QueueIndex(60.0)
        for i, qid in enumerate(ids):
            put(q, qid, seg=i + 1)
        assert q.sorted_qids() == sorted(set(ids))
        for i, qid in enumerate(ids):
            # the same id as another string object, and this one again: the same entry
            assert q.info("".join(qid))[0] == q.info(qid)[0] == i + 1


@given(st.text(alphabet="0123456789ABCDEFGabcdef@:/\x00\xff\u0100", min_size=19,
               max_size=21))
def test_canonical_queue_ids_agree(text):
    assert COMPILED.is_canonical(text) == PURE.is_canonical(text)
    q1, q2 = COMPILED.QueueIndex(60.0), PURE.QueueIndex(60.0)
    put(q1, text)
    put(q2, text)
    assert text in q1 and q1.sorted_qids() == q2.sorted_qids() == [text]


def test_replace_keeps_what_is_not_on_disk(mod):
    """A compaction copy: new location and progress; jobs out, due entry, deadline and
    last replies stay."""
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b"])
    q.add_out(Q1, 2)
    q.push(Q1, T0 + 10)
    q.set_deadline(Q1, T0 + 100)
    q.set_last(Q1, 1, ("421", "busy"))
    assert q.add(Q1, 7, 500, 11, 2000, T0, T0, 0, "default", None, ["a", "b"],
                 state=[DELIVERED, PENDING], attempts=[1, 1], due=[0.0, T0 + 10]) is True
    assert len(q) == 1 and q.location(Q1) == (7, 500, 11, 2000)
    assert q.info(Q1)[9] == 2 and q.scheduled(Q1) == T0 + 10 and q.queued(0) == 1
    assert q.last(Q1, 1) == ("421", "busy")
    assert q.passed(T0 + 101) == [Q1]
    assert (q.recipients, q.body_bytes) == (2, 2000)
    assert q.tables() == (2, 1, 0, 1)
    # another recipient count: the replies go (they are per recipient)
    put(q, Q1, ["a"])
    assert q.last(Q1, 0) is None and q.tables() == (1, 1, 0, 0)


def test_replace_into_the_other_lane_moves_the_due_entry(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1)
    q.push(Q1, T0 + 3)
    put(q, Q1, lane=dispatch.TRANSACTIONAL)
    assert (q.queued(0), q.queued(1)) == (0, 1)
    assert q.pop_due(0, T0 + 9, 9) == [] and q.pop_due(1, T0 + 9, 9) == [Q1]


def test_a_malformed_update_changes_nothing_and_apply_skips_it(mod):
    # A REC_RCPT record whose checksum holds but whose update cannot be one (an index past
    # 2**63, a state that is no byte): recovery's apply() skips it as it skips a bad index
    # (the compiled twin raised OverflowError out of recovery), and a failed update()
    # leaves the recipient as it was (the pure twin had changed its state and counts)
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b"])
    before = q.progress(Q1), q.info(Q1)
    # -- and, since a state no version writes broke `mta queue list` (KeyError in the
    # shard, which died) and a NaN or infinite due time stalled or stopped its loop:
    # those too
    for bad in ([0, DELIVERED, 1, "x"], [0, 999, 1, 0.0], [0, DELIVERED, "many", 0.0],
                [0, DELIVERED, 1, 0.0, 300], [0, 9, 1, 0.0], [0, PENDING, 1, float("nan")],
                [0, PENDING, 1, float("inf")], [0, PENDING, 1, -1e300]):
        with pytest.raises((TypeError, ValueError, OverflowError)):
            q.update(Q1, *bad)
        assert (q.progress(Q1), q.info(Q1)) == before, bad
    assert q.apply(Q1, [[1 << 64, DELIVERED, 1, 0.0], [0, 999, 1, 0.0], [0],
                        [1, DELIVERED, 1, 0.0]]) == 1
    assert q.progress(Q1)[0] == [PENDING, DELIVERED] and q.info(Q1)[-1] == 1


def test_updates(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b"])
    assert q.update(Q1, 0, DELIVERED, 1, 0.0)
    assert q.info(Q1)[-1] == 1
    assert q.update(Q1, 1, PENDING, 2, T0 + 60, RCPT_DELAY_NOTIFIED)
    assert q.recipient(Q1, 1)[:4] == (PENDING, 2, T0 + 60, RCPT_DELAY_NOTIFIED)
    assert q.update(Q1, 1, PENDING, 3, T0 + 90)            # flags unchanged
    assert q.recipient(Q1, 1)[3] == RCPT_DELAY_NOTIFIED
    assert not q.update(Q1, 2, DELIVERED, 1, 0.0)
    assert q.apply(Q1, [[1, EXPIRED, 3, 0.0, 0], [5, DELIVERED, 1, 0.0], [-1, 1, 1, 0]]) == 1
    assert q.progress(Q1) == ([DELIVERED, EXPIRED], [1, 3], [0.0, 0.0], [0, 0])
    assert q.info(Q1)[-1] == 0 and q.first_due(Q1) is None
    assert q.update(Q1, 0, PENDING, -4, T0)                # attempts kept in 0..MAX
    assert q.info(Q1)[-1] == 1 and q.recipient(Q1, 0)[1] == 0
    assert q.set_due(Q1, 1, 5.0) and q.recipient(Q1, 1)[2] == 5.0


def test_ready_and_first_due(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b", "c", "d"], state=[PENDING, PENDING, DELIVERED, PENDING],
        due=[T0, T0 + 50, T0 - 10, T0 + 20])
    assert q.ready(Q1, T0) == ([0], T0 + 20)
    assert q.ready(Q1, T0 + 20) == ([0, 3], T0 + 50)
    assert q.ready(Q1, T0 + 99) == ([0, 1, 3], None)
    assert q.ready(Q1, T0 - 1) == ([], T0)
    assert q.first_due(Q1) == T0


def test_in_flight_count(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1)
    assert q.add_out(Q1, 1) == 1 and q.add_out(Q1, 1) == 2
    assert q.add_out(Q1, -5) == 0
    assert q.add_out(Q1, 1 << 20) == mod.MAX_OUT


def test_last_replies_are_shared_and_released(mod):
    q = mod.QueueIndex(1.0)
    reply = (421, "4.7.0", "try later", "mx", "127.0.0.1", 21, "rule")
    put(q, Q1, ["a", "b"])
    put(q, Q2, ["a"])
    for qid, idx in ((Q1, 0), (Q1, 1), (Q2, 0)):
        assert q.set_last(qid, idx, tuple(reply))
    assert q.last(Q1, 1) == reply and q.last(Q1, 1) is q.last(Q2, 0)
    assert q.tables()[3] == 1
    q.set_last(Q1, 0, ("other",))
    assert q.tables()[3] == 2
    q.remove(Q1)
    assert q.tables()[3] == 1
    q.set_last(Q2, 0, None)
    assert q.tables()[3] == 0 and q.last(Q2, 0) is None
    assert not q.set_last(Q2, 1, reply)


def test_interned_tables_follow_the_queue(mod):
    q = mod.QueueIndex(1.0)
    for i in range(200):
        qid = "%020X" % i
        put(q, qid, [f"d{i % 7}.example", f"x{i}.example"], pool=f"p{i % 3}",
            campaign=f"c{i}" if i % 2 else "")
    assert q.tables() == (7 + 200, 3, 100, 0)
    for i in range(200):
        q.remove("%020X" % i)
    assert q.tables() == (0, 0, 0, 0)


def test_due_queue_order_and_lanes(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1)
    put(q, Q2)
    put(q, Q3, lane=dispatch.TRANSACTIONAL)
    q.push(Q2, T0 + 5)
    q.push(Q1, T0 + 5)          # a tie: the first pushed comes first
    q.push(Q3, T0 + 1)
    assert q.queued(0) == 2 and q.queued(1) == 1
    assert q.next_due() == T0 + 1 and q.next_due([0]) == T0 + 5 and q.next_due([]) is None
    assert q.pop_due(0, T0 + 4, 10) == []
    assert q.pop_due(0, T0 + 5, 1) == [Q2]
    assert q.pop_due(0, T0 + 5, 10) == [Q1]
    assert q.pop_due(1, T0 + 5, 10) == [Q3]
    assert q.next_due() is None and q.scheduled(Q1) is None


def test_a_message_is_queued_once_at_its_earliest_time(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1)
    put(q, Q2)
    q.push(Q1, T0 + 10)
    q.push(Q1, T0 + 20)          # later: no change
    assert q.scheduled(Q1) == T0 + 10 and q.queued(0) == 1
    q.push(Q2, T0 + 5)
    q.push(Q1, T0 + 5)           # earlier: moved up, behind Q2 (pushed before)
    assert q.scheduled(Q1) == T0 + 5 and q.queued(0) == 2
    assert q.pop_due(0, T0 + 100, 10) == [Q2, Q1]
    q.push(Q1, T0 + 7)
    q.push(Q2, T0 + 7)
    q.push(Q1, T0 + 7)           # the same time again: it keeps its place
    assert q.pop_due(0, T0 + 100, 10) == [Q1, Q2]
    q.push(Q1, math.nan)         # (a NaN from disk: due at once)
    assert q.scheduled(Q1) == 0.0


def test_removed_messages_leave_the_due_queue(mod):
    q = mod.QueueIndex(1.0)
    for i in range(50):
        put(q, "%020X" % i)
        q.push("%020X" % i, T0 + (i * 7919) % 50)
    for i in range(0, 50, 3):
        q.remove("%020X" % i)
    assert q.queued(0) == 50 - len(range(0, 50, 3))
    got = q.pop_due(0, T0 + 100, 100)
    assert got == sorted(("%020X" % i for i in range(50) if i % 3),
                         key=lambda x: (int(x, 16) * 7919) % 50)
    # a reused slot is not mistaken for the message that had it
    put(q, Q1)
    assert q.pop_due(0, T0 + 100, 100) == []


def test_deadlines(mod):
    q = mod.QueueIndex(10.0)
    for qid in (Q1, Q2, Q3):
        put(q, qid)
    q.set_deadline(Q1, T0 + 15)       # bucket (T0+10, T0+20]: reported from T0+20 on
    q.set_deadline(Q2, T0 + 12)
    q.set_deadline(Q3, T0 + 45)
    assert q.passed(T0 + 19) == []
    assert q.passed(T0 + 20) == [Q1, Q2]        # in the order they came into the bucket
    assert q.passed(T0 + 20) == []
    q.set_deadline(Q1, T0 + 41)
    q.set_deadline(Q3, T0 + 44)                 # moved within its bucket: now last
    q.set_deadline(Q2, T0 + 43)
    assert q.clear_deadline(Q2) and not q.clear_deadline(Q2)
    q.remove(Q1)
    assert q.passed(T0 + 1000) == [Q3]
    put(q, Q1)
    q.set_deadline(Q1, math.inf)
    q.set_deadline(Q2, -math.inf)
    assert q.passed(T0) == [Q2]


def test_schedule_recovered(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b"], due=[T0 + 9, T0 + 3], seg=1)
    put(q, Q2, ["a"], state=[DELIVERED], seg=2)
    put(q, Q3, ["a"], seg=5, lane=dispatch.TRANSACTIONAL)
    assert q.schedule_recovered(2, 100.0) == [Q2]
    assert q.scheduled(Q1) == T0 + 3 and q.scheduled(Q3) is None
    assert q.passed(T0 + 101) == [Q1]


def test_flush(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b", "c"], state=[PENDING, PENDING, DELIVERED],
        due=[T0 + 50, T0 - 5, T0 + 50])
    put(q, Q2, ["a"], due=[T0 + 70])
    assert q.flush(T0, [Q2, "nope"]) == 1
    assert q.scheduled(Q2) == T0 and q.scheduled(Q1) is None
    assert q.flush(T0) == 1
    assert q.progress(Q1)[2] == [T0, T0 - 5, T0 + 50] and q.scheduled(Q1) == T0


def test_flush_of_domains_makes_only_their_recipients_due(mod):
    # mta queue flush --domain: the message's recipients elsewhere keep waiting
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b", "a"], due=[T0 + 50, T0 + 60, T0 + 70])
    put(q, Q2, ["b"], due=[T0 + 80])
    assert q.flush(T0, None, ["nowhere"]) == 0
    assert q.scheduled(Q1) is None and q.scheduled(Q2) is None
    assert q.flush(T0, None, ["a"]) == 2
    assert q.progress(Q1)[2] == [T0, T0 + 60, T0] and q.scheduled(Q1) == T0
    assert q.progress(Q2)[2] == [T0 + 80] and q.scheduled(Q2) is None
    assert q.flush(T0, [Q1], ["b"]) == 1 and q.progress(Q2)[2] == [T0 + 80]


def test_flush_leaves_a_message_whose_start_is_ahead(mod):
    # options.start_time still ahead: never tried, so nothing to retry now
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a"], start=T0 + 3600, due=[T0 + 3600])
    put(q, Q2, ["a"], due=[T0 + 70])
    assert q.flush(T0) == 1
    assert q.progress(Q1)[2] == [T0 + 3600] and q.scheduled(Q1) is None
    assert q.flush(T0, [Q1]) == 0
    assert q.flush(T0 + 3600, [Q1]) == 0        # (due at its start: nothing later)


def test_select_and_matching(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b", "a"], campaign="spring", pool="mkt",
        state=[PENDING, PENDING, DELIVERED])
    put(q, Q2, ["a"], campaign="autumn")
    put(q, Q3, ["c"])
    assert q.select({"a"}) == [(Q1, 1), (Q2, 1)]
    assert q.select(frozenset({"a", "b", "zz"}), campaign="spring") == [(Q1, 2)]
    assert q.select(pool="default") == [(Q2, 1), (Q3, 1)]
    assert q.select(campaign="nope") == [] and q.select(pool="nope") == []
    assert q.select({"zz"}) == []
    assert q.matching(Q1, {"a", "b"}, "spring", "mkt") == [0, 1]
    assert q.matching(Q1, {"a"}, "autumn") == []


def test_segments(mod):
    q = mod.QueueIndex(1.0)
    put(q, Q1, seg=3)
    put(q, Q2, seg=3)
    put(q, Q3, seg=4)
    assert q.in_segment(3) == [Q1, Q2] and q.in_segment(9) == []
    assert q.segment_counts() == {3: 2, 4: 1}
    put(q, Q1, seg=4)
    assert q.segment_counts() == {3: 1, 4: 2}


def test_summary(mod):
    q = mod.QueueIndex(1.0)
    now = T0 + 100
    put(q, Q1, ["a", "b"], attempts=[2, 0], due=[T0 + 300, T0], campaign="c1")
    q.add(Q2, 1, 0, 0, 10, T0 + 1, T0 + 500, 0, "mkt", None, ["a", "c"])   # scheduled
    put(q, Q3, ["a"], state=[DELIVERED])
    s = q.summary(now)
    assert s == {"messages": 3, "recipients": 5, "bytes": 4010, "oldest_arrival": T0,
                 "pending": 4, "deferred": 1, "next_attempt": T0 + 300, "scheduled": 2,
                 "scheduled_messages": 1, "next_start": T0 + 500,
                 "domains": {"a": [2, 1, T0 + 300], "b": [1, 0, None], "c": [1, 0, None]},
                 "pools": {"default": [2, 2], "mkt": [1, 2]},
                 "campaigns": {"c1": [1, 2], None: [2, 2]}}
    assert mod.QueueIndex(1.0).summary(now)["oldest_arrival"] is None


def test_compiled_memory_is_reported():
    q = COMPILED.QueueIndex(1.0)
    put(q, Q1)
    mem = q.memory()
    assert mem["sizes"] == (96, 20, 16)
    assert mem["messages"] >= 96 and mem["recipients"] >= 20
    assert PURE.QueueIndex(1.0).memory() == {}


# ------------------------------------------------------------ differential

QIDS = ["%020X" % (0x18A3F2C4B1D2E0300000 + i) for i in range(12)] + ["odd-1", "x"]
DOMAINS = ["a.example", "b.example", "c.example", "d.example"]
TIMES = [T0 + d for d in (-5.0, 0.0, 0.0, 1.5, 3.0, 10.0, 10.0, 60.0)]
REPLIES = [None, (421, "busy"), (451, "later"), (421, "busy")]

qid_s = st.sampled_from(QIDS)
time_s = st.sampled_from(TIMES)
idx_s = st.integers(-1, 4)


add_s = st.integers(0, 4).flatmap(lambda n: st.tuples(
    st.just("add"), qid_s, st.integers(1, 4), st.integers(0, 3),
    st.sampled_from([dispatch.BULK, dispatch.TRANSACTIONAL]),
    st.sampled_from([None, "", "default", "mkt"]), st.sampled_from([None, "", "c1", "c2"]),
    st.lists(st.sampled_from(DOMAINS), min_size=n, max_size=n), time_s,
    st.one_of(st.none(), st.lists(st.sampled_from([PENDING, PENDING, DELIVERED, FAILED]),
                                  min_size=n, max_size=n)),
    st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=n, max_size=n)),
    st.one_of(st.none(), st.lists(time_s, min_size=n, max_size=n)),
    st.one_of(st.none(), st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))))

op_s = st.one_of(
    add_s, add_s,
    st.tuples(st.just("remove"), qid_s),
    st.tuples(st.just("update"), qid_s, idx_s, st.sampled_from([PENDING, DELIVERED, EXPIRED]),
              st.integers(0, 5), time_s, st.sampled_from([None, 0, 1])),
    st.tuples(st.just("set_due"), qid_s, idx_s, time_s),
    st.tuples(st.just("set_last"), qid_s, idx_s, st.sampled_from(REPLIES)),
    st.tuples(st.just("add_out"), qid_s, st.integers(-2, 2)),
    st.tuples(st.just("push"), qid_s, time_s),
    st.tuples(st.just("push"), qid_s, time_s),
    st.tuples(st.just("push"), qid_s, st.sampled_from(TIMES[1:3])),
    st.tuples(st.just("pop_due"), st.integers(0, 1), time_s, st.integers(0, 5)),
    st.tuples(st.just("next_due")),
    st.tuples(st.just("set_deadline"), qid_s, time_s),
    st.tuples(st.just("clear_deadline"), qid_s),
    st.tuples(st.just("passed"), time_s),
    st.tuples(st.just("ready"), qid_s, time_s),
    st.tuples(st.just("flush"), time_s, st.one_of(st.none(), st.lists(qid_s, max_size=4)),
              st.one_of(st.none(), st.sets(st.sampled_from(DOMAINS + ["nowhere"])))),
    st.tuples(st.just("select"), st.one_of(st.none(), st.sets(st.sampled_from(DOMAINS))),
              st.sampled_from(["", "c1"]), st.sampled_from(["", "mkt"])),
    st.tuples(st.just("matching"), qid_s, st.sets(st.sampled_from(DOMAINS)),
              st.sampled_from(["", "c2"]), st.sampled_from(["", "default"])),
    st.tuples(st.just("schedule_recovered"), st.integers(0, 4), st.sampled_from([5.0, 60.0])),
    st.tuples(st.just("in_segment"), st.integers(1, 4)),
    st.tuples(st.just("summary"), time_s),
)


def run(q, op):
    name, args = op[0], op[1:]
    if name == "add":
        qid, seg, off, lane, pool, campaign, domains, start, state, attempts, due, flags = args
        return q.add(qid, seg, off * 100, off, 10 * seg, T0, start, lane, pool, campaign,
                     domains, state, attempts, due, flags)
    if name == "next_due":
        return q.next_due(), q.next_due([0]), q.next_due([1])
    if name == "pop_due":
        return q.pop_due(*args)
    return getattr(q, name)(*args)


def snapshot(q):
    """Everything observable about an index's state."""
    out = {"len": len(q), "recipients": q.recipients, "bytes": q.body_bytes,
           "tables": q.tables(), "queued": (q.queued(0), q.queued(1)),
           "sorted": q.sorted_qids(), "segments": q.segment_counts(), "summary": q.summary(T0)}
    for qid in QIDS:
        if qid in q:
            n = q.info(qid)[10]
            out[qid] = (q.info(qid), q.progress(qid), q.domains(qid), q.scheduled(qid),
                        [q.last(qid, i) for i in range(n)], q.pending_idxs(qid))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_s, max_size=60))
def test_compiled_and_pure_agree(ops):
    a, b = PURE.QueueIndex(2.5), COMPILED.QueueIndex(2.5)
    for op in ops:
        assert run(a, op) == run(b, op), op
    assert snapshot(a) == snapshot(b)
    # and everything left comes out of the queues the same way
    assert a.passed(math.inf) == b.passed(math.inf)
    for lane in (0, 1):
        assert a.pop_due(lane, math.inf, 100) == b.pop_due(lane, math.inf, 100)


def test_long_random_run_agrees_and_rebuilds_the_arena():
    """Enough recipients that the compiled arena is rebuilt (over 65,536 records, more
    than half of them free) and the hash table grows and shrinks its chains."""
    rng = random.Random(15)
    a, b = PURE.QueueIndex(1.0), COMPILED.QueueIndex(1.0)
    live: list[str] = []
    for i in range(40_000):
        qid = "%020X" % (0x18A3F2C4B1D2E0300000 + i * 7)
        n = rng.choice((1, 1, 2, 3, 10, 70))
        doms = [f"d{rng.randrange(50)}.example" for _ in range(n)]
        for q in (a, b):
            q.add(qid, 1 + i // 5000, i, 5, 100, T0, T0 + i, i & 1, "default", None, doms)
            q.push(qid, T0 + rng.random() if q is a else a.scheduled(qid))
        live.append(qid)
        if rng.random() < 0.6:
            gone = live.pop(rng.randrange(len(live)))
            assert a.remove(gone) == b.remove(gone)
    before = b.memory()["recipients"]
    rng.shuffle(live)
    for qid in live[: len(live) * 3 // 4]:
        assert a.remove(qid) == b.remove(qid)
    assert b.memory()["recipients"] < before          # rebuilt smaller
    for qid in live[len(live) * 3 // 4:]:
        assert a.progress(qid) == b.progress(qid) and a.domains(qid) == b.domains(qid)
        assert a.info(qid) == b.info(qid)
    assert a.tables() == b.tables() and len(a) == len(b)
    for lane in (0, 1):
        assert a.pop_due(lane, math.inf, 1 << 20) == b.pop_due(lane, math.inf, 1 << 20)


# ------------------------------------------------------------ QidFifo

def test_fifo_keeps_order_and_each_id_once(mod):
    f = mod.QidFifo()
    assert len(f) == 0 and f.take(3) == [] and list(f) == []
    assert f.add(Q2) is True and f.add(Q1) is True and f.add("odd-1") is True
    assert f.add(Q2) is False and f.add("odd-1") is False      # waiting already: no-op
    assert len(f) == 3 and Q1 in f and "odd-1" in f and Q3 not in f and "odd-2" not in f
    assert list(f) == [Q2, Q1, "odd-1"]
    assert f.take(0) == [] and f.take(-1) == []
    assert f.take(2) == [Q2, Q1] and Q2 not in f and len(f) == 1
    assert f.add(Q2) is True                                    # taken: may wait again
    assert f.take(10) == ["odd-1", Q2] and len(f) == 0
    with pytest.raises(TypeError):
        f.add(5)
    assert 5 not in f and b"x" not in f and [] not in f and f.discard(5) is False


def test_fifo_discard(mod):
    f = mod.QidFifo()
    for q in (Q1, "odd-1", Q2, Q3):
        f.add(q)
    assert f.discard(Q2) is True and f.discard(Q2) is False and f.discard("never") is False
    assert f.discard("odd-1") is True
    assert len(f) == 2 and Q2 not in f and list(f) == [Q1, Q3]
    assert f.add(Q2) is True                    # discarded: waits again, at the back
    assert list(f) == [Q1, Q3, Q2]
    assert f.take(2) == [Q1, Q3] and f.take(5) == [Q2] and len(f) == 0
    # a FIFO whose every entry was discarded takes nothing, and fills again from empty
    for q in (Q1, Q2):
        f.add(q)
        f.discard(q)
    assert len(f) == 0 and f.take(3) == [] and list(f) == []
    assert f.add(Q3) and f.take(1) == [Q3]


def test_fifo_a_canonical_id_and_an_odd_one_with_the_same_hash_are_two(mod):
    # lower-case hex is not canonical: kept as a string, apart from its upper-case twin
    f = mod.QidFifo()
    assert f.add(Q1) and f.add(Q1.lower()) and len(f) == 2
    assert f.take(2) == [Q1, Q1.lower()]


def test_compiled_fifo_grows_and_gives_memory_back():
    f = COMPILED.QidFifo()
    small = f.memory()
    assert small["sizes"] == (16,) and small["ring"] == 16 * 16 and small["hash"] == 32 * 4
    ids = ["%020X" % (0x18A3F2C4B1D2E0300000 + i) for i in range(100_000)]
    for q in ids:
        f.add(q)
    big = f.memory()
    assert big["ring"] == 131_072 * 16 and big["hash"] == 262_144 * 4   # ~31 octets per id
    assert f.take(99_990) == ids[:99_990]
    assert f.memory()["ring"] <= 64 * 16 and list(f) == ids[99_990:]
    assert PURE.QidFifo().memory() == {}


fifo_op_s = st.one_of(
    st.tuples(st.just("add"), qid_s),
    st.tuples(st.just("add"), qid_s),
    st.tuples(st.just("add"), qid_s),
    st.tuples(st.just("discard"), qid_s),
    st.tuples(st.just("take"), st.integers(-1, 6)),
    st.tuples(st.just("contains"), qid_s),
    st.tuples(st.just("list")),
)


def run_fifo(f, op):
    if op[0] == "contains":
        return op[1] in f
    if op[0] == "list":
        return list(f), len(f)
    return getattr(f, op[0])(op[1])


@settings(max_examples=300, deadline=None)
@given(st.lists(fifo_op_s, max_size=80))
def test_fifo_compiled_and_pure_agree(ops):
    a, b = PURE.QidFifo(), COMPILED.QidFifo()
    for op in ops:
        assert run_fifo(a, op) == run_fifo(b, op), op
    assert list(a) == list(b) and a.take(100) == b.take(100)


def test_fifo_long_random_run_agrees_across_growth_and_shrinking():
    """Phases of mostly adding and mostly taking, so the compiled ring and hash are
    rebuilt up and down many times, with repeats, discards and odd ids mixed in."""
    rng = random.Random(16)
    ids = ["%020X" % rng.getrandbits(80) for _ in range(30_000)] + [f"odd-{i}" for i in range(300)]
    a, b = PURE.QidFifo(), COMPILED.QidFifo()
    for phase in range(12):
        adding = phase % 2 == 0
        for _ in range(40_000):
            r = rng.random()
            if r < 0.1:
                q = rng.choice(ids)
                assert a.discard(q) == b.discard(q)
            elif r < (0.8 if adding else 0.25):
                q = rng.choice(ids)
                assert a.add(q) == b.add(q)
            else:
                n = rng.randrange(1, 8)
                assert a.take(n) == b.take(n)
        assert len(a) == len(b) and list(a) == list(b)
    assert a.take(10**9) == b.take(10**9) and len(b) == 0


def test_compiled_fifo_discarded_entries_do_not_pile_up():
    # Held back by a suspension, then deleted (a bulk bounce): discarded entries are
    # dropped when the ring fills and is rebuilt, so it does not grow past the live ids.
    f = COMPILED.QidFifo()
    for i in range(200_000):
        q = "%020X" % (0x18A3F2C4B1D2E0300000 + i)
        f.add(q)
        if i >= 10:
            assert f.discard("%020X" % (0x18A3F2C4B1D2E0300000 + i - 10))
    assert len(f) == 10 and f.memory()["ring"] <= 64 * 16
    assert f.take(100) == ["%020X" % (0x18A3F2C4B1D2E0300000 + i) for i in range(199_990, 200_000)]


def test_step_back_moves_the_due_times_after_now_earlier(mod):
    # The wall clock went back 100 s: what was due later than now comes 100 s earlier
    # (not before now); a message whose start_time is ahead keeps it for the
    # recipients never tried; what is done or already due stays.
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b", "c", "d"], state=[PENDING, PENDING, PENDING, DELIVERED],
        due=[T0 + 150, T0 + 50, T0 - 5, T0 + 500])
    q.add(Q2, 1, 100, 10, 2000, T0 - 10, T0 + 3600, dispatch.BULK, "default", None,
          ["a", "b"], attempts=[0, 1], due=[T0 + 3600, T0 + 3600])
    assert q.step_back(T0, 100.0) == 3
    assert q.progress(Q1)[2] == [T0 + 50, T0, T0 - 5, T0 + 500]
    assert q.scheduled(Q1) == T0
    assert q.progress(Q2)[2] == [T0 + 3600, T0 + 3500]
    assert q.scheduled(Q2) == T0 + 3500
    assert q.step_back(T0 + 5000, 100.0) == 0


def test_step_back_brings_a_message_queued_for_later_earlier_too(mod):
    # A message whose recipients were due long ago can still be queued for later: its
    # job was refused by a full delivery queue (due again a second on), or its read
    # failed.  After the wall clock went back an hour that instant is an hour further
    # off; it comes as much earlier as the recipients' due times (not before now).
    # A message held for its options.start_time keeps that instant.
    q = mod.QueueIndex(1.0)
    put(q, Q1, ["a", "b"], due=[T0 - 7200, T0 - 4000])
    q.push(Q1, T0 + 3601)                   # (queued for a second after the old now)
    q.add(Q2, 1, 100, 10, 2000, T0 - 10, T0 + 3600, dispatch.BULK, "default", None,
          ["a"], due=[T0 + 3600])
    q.push(Q2, T0 + 3600)
    assert q.step_back(T0, 3600.0) == 0     # (no recipient due later than now)
    assert q.progress(Q1)[2] == [T0 - 7200, T0 - 4000]
    assert q.scheduled(Q1) == T0 + 1
    assert q.scheduled(Q2) == T0 + 3600
    put(q, Q3, ["a"], due=[T0 - 5])
    q.push(Q3, T0 + 10)
    q.step_back(T0, 3600.0)
    assert q.scheduled(Q3) == T0            # (not before now)
