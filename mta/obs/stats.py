"""A child's statistics: plain numbers kept in memory, pushed to the admin process.

Hot path cost: a counter is ``c.value += 1`` on a slotted object; a histogram
observation is a bisect into a short tuple of bucket bounds, an int add and a
float add.  No prometheus_client object lives in a child (its multiprocess mode
costs more per increment and grows files with every restart; see
../shared/reference/ecosystem.md 2.2): each child sends a cumulative snapshot
(:class:`mta.bus.StatsReport`) about once a second, non-blocking, to the admin
process, which renders ``/metrics`` (:mod:`mta.admin.metrics`).  A snapshot
the admin process is not there (or too slow) to take is dropped; the next one
carries the same cumulative totals, so nothing is lost.

Families are declared in :mod:`mta.obs.catalog`; a name not declared there is
a programming error (KeyError at start, not at scrape time).

Use::

    reg = Registry()
    accepted = reg.counter("mta_smtp_messages_accepted_total")
    txn = reg.histogram("mta_smtp_transaction_seconds")
    accepted.value += 1
    txn.observe(0.004)
    reg.collect(lambda: [(GAUGE, "mta_smtp_connections_open", (), len(sessions))])
    pusher = Pusher.start(reg, ctx, settings, "acceptor", 0, loop)   # None when disabled
"""
from __future__ import annotations

import logging
import os
from bisect import bisect_left

from mta import bus
from mta.obs.catalog import COUNTER, FAMILIES, GAUGE, HISTOGRAM, OTHER

__all__ = ["Counter", "Histogram", "KeyedCounter", "Registry", "Pusher", "top_n",
           "COUNTER", "GAUGE", "OTHER"]

log = logging.getLogger("mta.obs")


class Counter:
    """A cumulative count: ``c.value += n``."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


class Histogram:
    """Fixed buckets: ``counts[i]`` observations <= ``bounds[i]`` (and > the bound before);
    ``counts[-1]`` those above the last bound."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class KeyedCounter:
    """Counters by a label tuple, at most *limit* distinct tuples; the rest count as ``other``.

    A tuple keeps its own series for the life of the process once it has one
    (counters must not move between series, or ``other`` would go down);
    tuples are admitted in the order they first carry traffic.
    """

    __slots__ = ("limit", "values", "_other")

    def __init__(self, limit: int, width: int):
        self.limit = limit
        self.values: dict[tuple, int] = {}
        self._other = (OTHER,) * width

    def inc(self, key: tuple, n: int = 1) -> None:
        values = self.values
        if key in values:
            values[key] += n
        elif len(values) < self.limit:
            values[key] = n
        else:
            values[self._other] = values.get(self._other, 0) + n


def top_n(values: dict, limit: int, width: int = 1) -> list[tuple[tuple, float]]:
    """Gauge values by key: the *limit* largest keep their key, the rest are summed as ``other``.

    Keys are label tuples (or single strings when *width* is 1).
    """
    items = sorted(values.items(), key=lambda kv: kv[1], reverse=True)
    out = []
    rest = 0
    spilled = False         # (an "other" among the keys, as in sums of children, is kept)
    for k, v in items:
        key = k if isinstance(k, tuple) else (k,)
        if len(out) < limit and key != (OTHER,) * width:
            out.append((key, v))
        else:
            rest += v
            spilled = True
    if spilled:
        out.append(((OTHER,) * width, rest))
    return out


def _family(name: str, kind: str):
    fam = FAMILIES[name]
    if fam.kind != kind:
        raise TypeError(f"{name} is a {fam.kind}, not a {kind}")
    return fam


class Registry:
    """The statistics of one process."""

    def __init__(self, max_label_values: int = 50):
        self.max_label_values = max_label_values
        self._counters: dict[tuple, Counter] = {}
        self._histograms: dict[tuple, Histogram] = {}
        self._keyed: dict[str, KeyedCounter] = {}
        self._collectors: list = []

    def counter(self, name: str, *labels: str) -> Counter:
        fam = _family(name, COUNTER)
        if len(labels) != len(fam.labels):
            raise ValueError(f"{name} takes labels {fam.labels}")
        key = (name, labels)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = Counter()
        return c

    def histogram(self, name: str, *labels: str) -> Histogram:
        fam = _family(name, HISTOGRAM)
        if len(labels) != len(fam.labels):
            raise ValueError(f"{name} takes labels {fam.labels}")
        key = (name, labels)
        h = self._histograms.get(key)
        if h is None:
            h = self._histograms[key] = Histogram(fam.buckets)
        return h

    def keyed(self, name: str) -> KeyedCounter:
        """A counter family whose label values come from traffic (bounded, see KeyedCounter)."""
        fam = _family(name, COUNTER)
        k = self._keyed.get(name)
        if k is None:
            k = self._keyed[name] = KeyedCounter(self.max_label_values, len(fam.labels))
        return k

    def collect(self, fn) -> None:
        """Add *fn*, called at each snapshot: it returns [(kind, name, labels, value), ...]
        for values read from the role's own state (queue sizes, existing counters)."""
        self._collectors.append(fn)

    def snapshot(self, seq: int, role: str, index: int) -> bus.StatsReport:
        counters = [bus.StatSample(name, list(labels), c.value)
                    for (name, labels), c in self._counters.items()]
        for name, k in self._keyed.items():
            counters += [bus.StatSample(name, list(key), v) for key, v in k.values.items()]
        gauges = []
        for fn in self._collectors:
            try:
                rows = fn()
            except Exception:
                log.exception("a statistics collector failed; its values are left out")
                continue
            for kind, name, labels, value in rows:
                fam = FAMILIES.get(name)
                if fam is None or fam.kind != kind or len(labels) != len(fam.labels):
                    raise ValueError(f"undeclared or mislabelled metric {name}{labels}")
                sample = bus.StatSample(name, [str(x) for x in labels], float(value))
                (counters if kind == COUNTER else gauges).append(sample)
        histograms = [bus.StatHistogram(name, list(labels), list(h.counts), h.sum)
                      for (name, labels), h in self._histograms.items()]
        return bus.StatsReport(seq, role, index, os.getpid(), counters, gauges, histograms)


RETRY_DROPPED = 0.2     # seconds: the next try after a snapshot was dropped


class Pusher:
    """Sends a process's snapshot to the admin process every ``admin.push_interval`` seconds."""

    def __init__(self, registry: Registry, ctx, settings, role: str, index: int):
        self.registry = registry
        self.role = role
        self.index = index
        self.interval = settings.config.admin.push_interval
        self.sender = bus.StatsSender(ctx, settings.stats_endpoint())
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self.next_at = 0.0
        self._timer = None

    @classmethod
    def create(cls, registry: Registry, ctx, settings, role: str, index: int):
        """A Pusher, or None when the admin listener is disabled (``admin.enabled``)."""
        if not settings.config.admin.enabled:
            return None
        return cls(registry, ctx, settings, role, index)

    def push(self) -> bool:
        """Send one snapshot now; False when it was dropped (admin absent or busy)."""
        if not self.sender.writable():
            self.dropped += 1           # (not even built)
            return False
        self.seq += 1
        try:
            report = self.registry.snapshot(self.seq, self.role, self.index)
        except Exception:
            log.exception("statistics snapshot failed")
            return False
        if self.sender.send(report):
            self.sent += 1
            return True
        self.dropped += 1
        return False

    def _after(self, sent: bool) -> float:
        """Seconds to the next push.  A dropped one -- above all the first, sent before
        the connection to the admin process is up (nothing queues for an absent admin)
        -- is tried again soon: a child not heard from reads as down (``mta status``:
        DEGRADED; the health check: 503) for as long as the interval."""
        return self.interval if sent else min(self.interval, RETRY_DROPPED)

    def due(self, now: float) -> None:
        """For a synchronous loop: push when the interval has passed (*now*: monotonic)."""
        if now >= self.next_at:
            self.next_at = now + self._after(self.push())

    def run_on(self, loop) -> None:
        """For an asyncio loop: push every interval until :meth:`close`."""
        def tick():
            self._timer = loop.call_later(self._after(self.push()), tick)
        self._timer = loop.call_later(min(self.interval, RETRY_DROPPED), tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.sender.close()
