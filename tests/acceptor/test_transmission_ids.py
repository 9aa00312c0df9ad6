"""Transmission ids: decimal, below 2**63 (SparkPost's fit a BIGINT column), unique per
acceptor whatever the wall clock does, larger from one millisecond to the next, and
apart between the old and the new acceptor of a slot during a reload."""
from __future__ import annotations

import time

from mta.acceptor.http import TransmissionIds

SHIFT = TransmissionIds.SLOT_BITS + TransmissionIds.COUNT_BITS


def test_ids_fit_a_signed_64_bit_integer_until_2089():
    year_2089 = int(time.mktime((2089, 6, 1, 0, 0, 0, 0, 0, 0))) * 10**9
    for slot in (0, 1, 255):
        ids = TransmissionIds(slot, clock=lambda: year_2089)
        for _ in range(20000):
            v = ids.next()
            assert v.isdigit() and int(v) < 2**63, v
    today = TransmissionIds(3).next()
    assert 17 <= len(today) <= 19 and int(today) < 2**63


def test_ids_are_unique_in_one_millisecond_and_apart_across_slots():
    now = time.time_ns()
    a, b = TransmissionIds(0, clock=lambda: now), TransmissionIds(1, clock=lambda: now)
    got_a = [int(a.next()) for _ in range(40000)]     # more than one millisecond's counter
    got_b = [int(b.next()) for _ in range(100)]
    assert len(set(got_a)) == len(got_a)
    assert [x >> SHIFT for x in got_a] == sorted(x >> SHIFT for x in got_a)
    assert not set(got_a) & set(got_b)
    assert {(x >> TransmissionIds.COUNT_BITS) & 0xFF for x in got_b} == {1}


def test_a_clock_stepping_back_gives_no_repeat():
    t = [time.time_ns()]
    ids = TransmissionIds(7, clock=lambda: t[0])
    seen = []
    for step in (0, 5_000_000, -60_000_000_000, 1_000_000, 0, 70_000_000_000):
        t[0] += step
        seen += [int(ids.next()) for _ in range(3)]
    assert len(set(seen)) == len(seen)
    assert [x >> SHIFT for x in seen] == sorted(x >> SHIFT for x in seen)


def test_two_processes_of_one_slot_in_one_millisecond_rarely_meet():
    # (the old acceptor of a slot still answering while its successor starts)
    now = time.time_ns()
    clashes = 0
    for _ in range(200):
        old, new = TransmissionIds(2, clock=lambda: now), TransmissionIds(2, clock=lambda: now)
        a = {old.next() for _ in range(5)}
        clashes += bool(a & {new.next() for _ in range(5)})
    assert clashes <= 3     # each pair meets with a chance of about 9 in 16,384
