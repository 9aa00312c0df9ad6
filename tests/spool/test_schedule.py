"""The spool's retry policy (mta/spool/schedule.py), on its own.

The due queues and deadline buckets are the queue index's (tests/spool/test_qindex.py).

Pure logic: no daemon, no clock (times are plain numbers), and a seeded
random.Random where jitter is involved, so every figure here is exact.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from mta import config
from mta.spool.schedule import RetryPolicy

SCHEDULE = [60.0, 300.0, 900.0]


def policy(schedule=SCHEDULE, jitter=0.0, scale=1.0, max_age=86400.0, rng=None) -> RetryPolicy:
    """A RetryPolicy over a [delivery] section with just the keys it reads."""
    cfg = SimpleNamespace(retry_schedule=list(schedule), retry_jitter=jitter,
                          time_scale=scale, max_age=max_age)
    return RetryPolicy(cfg, rng)


# ------------------------------------------------------------ RetryPolicy.delay


@pytest.mark.parametrize("attempts, expected", [
    (1, 60.0),      # after the first failed attempt: the first entry
    (2, 300.0),
    (3, 900.0),
    (4, 900.0),     # past the end: the last entry repeats
    (50, 900.0),
])
def test_delay_per_attempt_with_the_last_entry_repeating(attempts, expected):
    assert policy().delay(attempts) == expected


@pytest.mark.parametrize("attempts", [0, -3])
def test_delay_before_any_attempt_is_the_first_entry(attempts):
    """A count below 1 (nothing recorded yet) is read as the first attempt, not the last."""
    assert policy().delay(attempts) == 60.0


def test_single_entry_schedule_repeats_from_the_start():
    p = policy(schedule=[120.0])
    assert [p.delay(n) for n in (1, 2, 10)] == [120.0, 120.0, 120.0]


def test_schedule_is_copied_from_the_config():
    """The policy keeps its own list: changing the config object later changes nothing."""
    cfg = SimpleNamespace(retry_schedule=[10.0, 20.0], retry_jitter=0.0, time_scale=1.0,
                          max_age=100.0)
    p = RetryPolicy(cfg)
    cfg.retry_schedule.append(99.0)
    assert p.delay(3) == 20.0


def test_time_scale_multiplies_every_delay():
    p = policy(scale=0.001)
    assert [p.delay(n) for n in (1, 2, 3, 4)] == pytest.approx([0.06, 0.3, 0.9, 0.9])


# ------------------------------------------------------------ jitter


def test_jitter_stays_within_its_bounds_and_spreads():
    """delay = base * (1 + jitter * u), u in [0, 1): never below base, always below
    base * (1 + jitter); over many draws it covers most of that range."""
    p = policy(jitter=0.25, rng=random.Random(1234))
    for attempts, base in ((1, 60.0), (2, 300.0), (3, 900.0), (9, 900.0)):
        draws = [p.delay(attempts) for _ in range(2000)]
        assert all(base <= d < base * 1.25 for d in draws), (attempts, min(draws), max(draws))
        # spread: a uniform u puts some draws near each end of the range
        assert min(draws) < base * 1.01 and max(draws) > base * 1.24, (min(draws), max(draws))


def test_jitter_is_exactly_the_rng_draw():
    """With a seeded rng the delays are reproducible: base * (1 + jitter * rng.random())."""
    expected_rng = random.Random(42)
    p = policy(jitter=0.1, rng=random.Random(42))
    for attempts in (1, 2, 3, 4, 5):
        base = SCHEDULE[min(attempts, len(SCHEDULE)) - 1]
        assert p.delay(attempts) == base * (1.0 + 0.1 * expected_rng.random())


def test_same_seed_same_delays_other_seed_other_delays():
    a = policy(jitter=0.5, rng=random.Random(7))
    b = policy(jitter=0.5, rng=random.Random(7))
    c = policy(jitter=0.5, rng=random.Random(8))
    da = [a.delay(n) for n in range(1, 20)]
    assert da == [b.delay(n) for n in range(1, 20)]
    assert da != [c.delay(n) for n in range(1, 20)]


def test_jitter_is_scaled_with_the_delay():
    p = policy(jitter=0.5, scale=0.01, rng=random.Random(3))
    for _ in range(500):
        d = p.delay(2)
        assert 3.0 <= d < 4.5


def test_zero_jitter_does_not_depend_on_the_rng():
    assert [policy(rng=random.Random(s)).delay(2) for s in range(5)] == [300.0] * 5


def test_without_an_rng_the_policy_makes_its_own():
    p = policy(jitter=0.1)
    assert isinstance(p.rng, random.Random)
    assert 60.0 <= p.delay(1) < 66.0


# ------------------------------------------------------------ deadline / expired


def test_deadline_is_arrival_plus_max_age():
    assert policy(max_age=3600.0).deadline(1_000_000.0) == 1_003_600.0


def test_expired_at_the_boundary():
    """A recipient expires at arrival + max_age exactly, not a moment later."""
    p = policy(max_age=100.0)
    arrival = 5_000.0
    assert not p.expired(arrival, arrival)
    assert not p.expired(arrival, arrival + 99.999)
    assert p.expired(arrival, arrival + 100.0)
    assert p.expired(arrival, arrival + 100.001)
    assert p.expired(arrival, p.deadline(arrival))


def test_time_scale_shrinks_max_age():
    p = policy(max_age=800.0, scale=0.001)
    assert p.deadline(10.0) == pytest.approx(10.8)
    assert not p.expired(10.0, 10.79)
    assert p.expired(10.0, 10.81)


def test_a_retry_due_after_the_deadline_is_recognisable():
    """The spool makes the last attempt at the deadline when the next one would come
    at or after it: the policy gives it the two numbers to compare."""
    p = policy(schedule=[100.0], max_age=250.0)
    arrival = 0.0
    due = [arrival]
    for attempts in (1, 2, 3):
        due.append(due[-1] + p.delay(attempts))
    assert due == [0.0, 100.0, 200.0, 300.0]
    assert [d >= p.deadline(arrival) for d in due] == [False, False, False, True]


def test_policy_from_the_default_config():
    """The shipped defaults: 60 s first, 4 h repeating, 10 % jitter, 5 days."""
    d = config.load(None).config.delivery
    p = RetryPolicy(d, random.Random(0))
    assert 60.0 <= p.delay(1) < 66.0
    assert 14400.0 <= p.delay(7) < 15840.0
    assert 14400.0 <= p.delay(100) < 15840.0
    assert p.deadline(0.0) == 5 * 86400.0
