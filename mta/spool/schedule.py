"""When to try a recipient again, and when to give up: the spool's retry policy.

Pure logic, no I/O: tests/spool/test_schedule.py tests it without a shard.
The spool shard owns the state (attempt counts and due times live in its
records); delivery processes only report what happened, and
:mod:`mta.spool.outcomes` applies this policy to each outcome.

- A temporary failure schedules the next attempt ``retry_schedule[n]`` seconds
  later (n = attempts so far - 1, the last entry repeating), stretched by a
  random ``retry_jitter`` fraction so retries of a large batch spread out
  instead of arriving together.  ``time_scale`` multiplies every delay and
  ``max_age`` (tests run a whole schedule in seconds).
- A recipient older than ``max_age`` expires: at dispatch time, or when a
  failure comes at or after the deadline.  A next attempt that would come after
  the deadline is made at the deadline instead (the last one; the shard
  dispatches a recipient due exactly then though the deadline is reached, see
  :meth:`RetryPolicy.last_attempt`).  Age counts from the
  message's start (:func:`mta.store.start_of`: its arrival, or its
  ``options.start_time`` when later): callers pass that as *arrival*.
"""
from __future__ import annotations

import random

# Recipient states: part of the spool's record format, declared in mta.store.
from mta.store import DELIVERED, EXPIRED, FAILED, PENDING, STATE_NAMES, TERMINAL  # noqa: F401


LAST_TRY_GRACE = 10.0   # seconds a last attempt due at the deadline may wait to go
# The longest max_age taken (about 317 years; a longer one, or inf, is taken as this): a
# deadline, and with it every due time a deferral gets, stays below mta.store.MAX_TIME,
# which a recipient update's due time must be (else the index refused the update the
# shard had written: no attempt counted, due again at once)
MAX_AGE = 1e10


class RetryPolicy:
    def __init__(self, cfg, rng: random.Random | None = None):
        self.schedule = list(cfg.retry_schedule)
        self.jitter = cfg.retry_jitter
        self.scale = cfg.time_scale
        self.max_age = min(cfg.max_age * cfg.time_scale, MAX_AGE)
        # delay notices after this many seconds still deferred; 0 = off
        self.delay_warning = getattr(cfg, "delay_warning_time", 0.0) * cfg.time_scale
        self.rng = rng or random.Random()

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the *attempts*-th failed attempt (1-based)."""
        return self.spread(self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]
                           * self.scale)

    def spread(self, delay: float) -> float:
        """*delay* with the jitter added (the schedule's, and a response rule's): the
        messages deferred together are not all due again in the same second (a job's
        recipients share one draw: :meth:`mta.spool.outcomes.Plan.outcome`)."""
        return delay * (1.0 + self.jitter * self.rng.random())

    def deadline(self, arrival: float) -> float:
        return arrival + self.max_age

    def first_look(self) -> float:
        """Seconds after its start at which the shard's expiry sweep first looks at a
        message: when its delay notice is due (``delay_warning_time``), if that comes
        before its deadline, else the deadline."""
        warn = self.delay_warning
        return min(warn, self.max_age) if warn else self.max_age

    def expired(self, arrival: float, now: float) -> bool:
        return now >= arrival + self.max_age

    def last_attempt(self, arrival: float, due: float, now: float) -> bool:
        """A recipient due at *due* waits for its last attempt, set at the deadline
        (:mod:`mta.spool.outcomes`): it is sent though the deadline is reached, until
        LAST_TRY_GRACE after it (not again and again: a job of it that got no outcome)."""
        deadline = arrival + self.max_age
        return due == deadline and now < deadline + LAST_TRY_GRACE
