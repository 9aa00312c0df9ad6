"""Transmission ids: decimal, below 2**63 (SparkPost's fit a BIGINT column), unique and
increasing per acceptor, whatever the wall clock does."""
from __future__ import annotations

import time

from mta.acceptor.http import TransmissionIds


def test_ids_fit_a_signed_64_bit_integer_until_2089():
    year_2089 = int(time.mktime((2089, 6, 1, 0, 0, 0, 0, 0, 0))) * 10**9
    for slot in (0, 1, 255):
        ids = TransmissionIds(slot, clock=lambda: year_2089)
        for _ in range(20000):
            v = ids.next()
            assert v.isdigit() and int(v) < 2**63, v
    today = TransmissionIds(3).next()
    assert 17 <= len(today) <= 19 and int(today) < 2**63


def test_ids_are_unique_and_increasing_in_one_millisecond_and_across_slots():
    now = time.time_ns()
    a, b = TransmissionIds(0, clock=lambda: now), TransmissionIds(1, clock=lambda: now)
    got_a = [int(a.next()) for _ in range(40000)]     # more than one millisecond's counter
    got_b = [int(b.next()) for _ in range(100)]
    assert got_a == sorted(got_a) and len(set(got_a)) == len(got_a)
    assert not set(got_a) & set(got_b)


def test_a_clock_stepping_back_gives_no_repeat():
    t = [time.time_ns()]
    ids = TransmissionIds(7, clock=lambda: t[0])
    seen = []
    for step in (0, 5_000_000, -60_000_000_000, 1_000_000, 0, 70_000_000_000):
        t[0] += step
        seen += [int(ids.next()) for _ in range(3)]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
