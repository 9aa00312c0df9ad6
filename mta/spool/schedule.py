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
  failure's next attempt would come after the deadline.  Age counts from the
  message's start (:func:`mta.store.start_of`: its arrival, or its
  ``options.start_time`` when later): callers pass that as *arrival*.
"""
from __future__ import annotations

import heapq
import itertools
import random

# Recipient states: part of the spool's record format, declared in mta.store.
from mta.store import DELIVERED, EXPIRED, FAILED, PENDING, STATE_NAMES, TERMINAL  # noqa: F401


class RetryPolicy:
    def __init__(self, cfg, rng: random.Random | None = None):
        self.schedule = list(cfg.retry_schedule)
        self.jitter = cfg.retry_jitter
        self.scale = cfg.time_scale
        self.max_age = cfg.max_age * cfg.time_scale
        # delay notices after this many seconds still deferred; 0 = off
        self.delay_warning = getattr(cfg, "delay_warning_time", 0.0) * cfg.time_scale
        self.rng = rng or random.Random()

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the *attempts*-th failed attempt (1-based)."""
        base = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1] * self.scale
        return base * (1.0 + self.jitter * self.rng.random())

    def deadline(self, arrival: float) -> float:
        return arrival + self.max_age

    def expired(self, arrival: float, now: float) -> bool:
        return now >= arrival + self.max_age


class DueQueue:
    """A heap of (due time, queue id); stale entries are skipped by the caller.

    (The shard's own due queues and deadlines are the queue index's now,
    docs/queue-index.md; this and :class:`Deadlines` are the plain-Python
    forms they were made from.)
    """

    def __init__(self):
        self.heap: list = []
        self.seq = itertools.count()

    def push(self, due: float, qid: str) -> None:
        heapq.heappush(self.heap, (due, next(self.seq), qid))

    def push_many(self, items) -> None:
        """push() each (due, qid) of *items*, in order."""
        heap, seq, push = self.heap, self.seq, heapq.heappush
        for due, qid in items:
            push(heap, (due, next(seq), qid))

    def extend(self, items) -> None:
        """push() every (due, qid) of *items* at once: one heapify, O(n) (a whole
        recovered queue), rather than n pushes."""
        heap, seq = self.heap, self.seq
        heap.extend([(due, next(seq), qid) for due, qid in items])
        heapq.heapify(heap)

    def pop_due(self, now: float, limit: int) -> list[str]:
        out = []
        heap = self.heap
        while heap and heap[0][0] <= now and len(out) < limit:
            out.append(heapq.heappop(heap)[2])
        return out

    def next_due(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def __len__(self) -> int:
        return len(self.heap)


class Deadlines:
    """The queued messages, by when their age limit passes: expiry wherever they wait.

    Buckets of ``width`` seconds (``max_age / BUCKETS``), each a set of queue
    ids, so a finished message is taken out at once (:meth:`discard`) and
    memory follows the queue, not everything received within ``max_age``; a
    bucket is looked at once its last second has passed, so a message expires
    at most ``width`` late (0.1 % of ``max_age``).  Empty buckets stay until
    they pass, which bounds them to about BUCKETS.
    """

    BUCKETS = 1000

    def __init__(self, max_age: float):
        self.width = max(max_age / self.BUCKETS, 1e-3)
        self.buckets: dict[int, set] = {}
        self.keys: list[int] = []           # heap of the buckets' keys

    def _key(self, deadline: float) -> int:
        return int(deadline / self.width) + 1     # every deadline in bucket k is < k * width

    def add(self, deadline: float, qid: str) -> None:
        k = self._key(deadline)
        b = self.buckets.get(k)
        if b is None:
            b = self.buckets[k] = set()
            heapq.heappush(self.keys, k)
        b.add(qid)

    def discard(self, deadline: float, qid: str) -> None:
        b = self.buckets.get(self._key(deadline))
        if b is not None:
            b.discard(qid)

    def passed(self, now: float) -> list[str]:
        """Take out and return every queue id whose deadline is before *now*."""
        out: list[str] = []
        keys = self.keys
        while keys and keys[0] * self.width <= now:
            out += self.buckets.pop(heapq.heappop(keys), ())
        return out

    def __len__(self) -> int:
        return sum(map(len, self.buckets.values()))
