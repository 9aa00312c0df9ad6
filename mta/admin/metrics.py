"""The admin process's view of every child: latest reports, merged into metric families.

Each child pushes a cumulative snapshot (:mod:`mta.obs.stats`); :class:`Reports`
keeps the latest per (role, index) and process.  When a slot's process is
replaced (a new pid), the old one's latest report stays counted beside the new
one's (at a reload the old acceptor finishes its sessions, still reporting,
while its successor runs: each process's latest counts are added once, not its
every report), so a summed counter never goes down because a child was
restarted; past ``MAX_OLDER`` replaced processes the oldest one's counts are
folded into the slot's base.  Gauges are taken from fresh reports only, and of
a replaced process only while it runs (a restarted shard's queue is not the dead
one's last report plus its own), summed or, for a family that says so (``combine``: a node-wide 0/1 state), their
highest value.

:class:`Collector` is a prometheus_client custom collector: at each scrape it
sums the series over the children (families in :mod:`mta.obs.catalog`), adds
per-process CPU and memory, the spool device's I/O, free space and TCP
counters (:mod:`mta.admin.host`), and prometheus_client writes the text format.
"""
from __future__ import annotations

import json
import os
import time

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from mta import proc
from mta.admin import host
from mta.obs.catalog import COUNTER, FAMILIES, HISTOGRAM, MAX, OTHER, SUM
from mta.obs.stats import top_n


def _combine(name: str) -> str:
    fam = FAMILIES.get(name)
    return fam.combine if fam is not None else SUM


DRAIN_FLAG = "drain"     # run/drain: the node is drained (written by mta.admin.api)
SEEN_DRAIN = 1.0     # seconds, at most, until every acceptor has seen a drain begin
                    # (they look for run/drain twice a second)


MAX_OLDER = 8       # replaced processes of a slot whose latest report is kept as it is


class Slot:
    __slots__ = ("role", "index", "pid", "report", "at", "older", "folded", "base_counters",
                 "base_hist")

    def __init__(self, role: str, index: int):
        self.role = role
        self.index = index
        self.pid = 0                # the slot's newest process
        self.report = None
        self.at = 0.0               # monotonic time of its last report
        # pid -> (latest report, its time) of the processes it replaced: one may still
        # report (an acceptor finishing its sessions after a reload)
        self.older: dict[int, tuple] = {}
        self.folded: list[int] = []     # pids whose counts are in the base (bounded)
        self.base_counters: dict[tuple, float] = {}
        self.base_hist: dict[tuple, tuple[list, float]] = {}

    def reports(self):
        """(report, time) of the newest process and of the ones it replaced."""
        if self.report is not None:
            yield self.report, self.at
        yield from self.older.values()

    def running(self, r) -> bool:
        """Whether report *r*'s process may still be at work: the slot's newest, or one
        it replaced that has not exited (an acceptor finishing its sessions after a
        reload; a crashed or killed one's last gauges are not the slot's any more)."""
        return r is self.report or proc.alive(r.pid)


def expected_slots(settings) -> list[tuple[str, int]]:
    """The children the supervisor runs for *settings*, as (role, index)."""
    out = [("spool", i) for i in range(settings.shards)]
    out += [("delivery", i) for i in range(settings.deliveries)]
    out += [("acceptor", i) for i in range(settings.acceptors)]
    if settings.events_enabled:
        out.append(("events", 0))
    if settings.config.webhooks.enabled:
        out.append(("webhooks", 0))
    return out


class Reports:
    def __init__(self, settings, clock=time.monotonic):
        self.settings = settings
        self.clock = clock
        interval = settings.config.admin.push_interval
        self.stale_after = 3 * interval + 2.0
        self.started = clock()
        self.slots: dict[tuple[str, int], Slot] = {
            k: Slot(*k) for k in expected_slots(settings)}
        self.received = 0
        # Label values from traffic (sites) are bounded in each child, but each admits its
        # own, and a restarted one new ones: bounded here too, over the sum.  A counter's
        # label values keep their series once admitted (the rest: "other", for good).
        self.max_label_values = getattr(settings.config.admin, "max_label_values", 50)
        self.admitted: dict[str, set] = {}
        # What the supervisor runs now: a reload can change the acceptors' count (the
        # admin process is not replaced); read from run/active-config.json when it changes.
        self.expected = set(self.slots)
        self.active = None      # that record's Settings, once read (the agent's spool.min_free_*)
        self._active_mtime = None

    def add(self, r) -> None:
        key = (r.role, r.index)
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) > 4096:
                return          # bounded: a stray sender cannot grow this without end
            slot = self.slots[key] = Slot(*key)
        now = self.clock()
        self.received += 1
        if slot.report is None or slot.pid == r.pid:
            pass
        elif r.pid in slot.older:       # a replaced process still at work
            if proc.alive(slot.pid):
                slot.older[r.pid] = (r, now)
                return
            # the one taken for the newest has exited, this one runs: it is the slot's
            # (an admin process started during a reload may hear the old acceptor last)
            del slot.older[r.pid]
            slot.older[slot.pid] = (slot.report, slot.at)
        elif r.pid in slot.folded:      # (its counts are in the base already)
            return
        else:                           # a new process for the slot
            slot.older[slot.pid] = (slot.report, slot.at)
            if len(slot.older) > MAX_OLDER:
                pid = min(slot.older, key=lambda p: slot.older[p][1])
                self._fold(slot, slot.older.pop(pid)[0])
                slot.folded = (slot.folded + [pid])[-4 * MAX_OLDER:]
        slot.pid = r.pid
        slot.report = r
        slot.at = now

    @staticmethod
    def _fold(slot: Slot, old) -> None:
        """A replaced process of *slot*: keep its cumulative values (report *old*) as the
        base."""
        for s in old.counters:
            k = (s.name, tuple(s.labels))
            slot.base_counters[k] = slot.base_counters.get(k, 0) + s.value
        for h in old.histograms:
            k = (h.name, tuple(h.labels))
            counts, total = slot.base_hist.get(k, ([0] * len(h.counts), 0.0))
            if len(counts) == len(h.counts):
                slot.base_hist[k] = ([a + b for a, b in zip(counts, h.counts)], total + h.sum)

    def fresh(self, slot: Slot, now: float) -> bool:
        return slot.report is not None and now - slot.at <= self.stale_after

    def transactions_open(self, since: float) -> tuple[int, bool]:
        """(mail on its way in, summed over the acceptors; whether every acceptor the
        supervisor runs reported it fresh, less than *since* seconds ago minus what an
        acceptor takes to see a drain): a drain that began *since* seconds ago is done
        only when this is (0, True)."""
        now = self.clock()
        n, settled = 0, True
        for key in self._expected_now():
            if key[0] != "acceptor":
                continue
            slot = self.slots.get(key)
            if slot is None or not self.fresh(slot, now) or now - slot.at > since - SEEN_DRAIN:
                settled = False
                continue
            n += sum(int(g.value) for r, at in slot.reports() if now - at <= self.stale_after
                     and slot.running(r)
                     for g in r.gauges if g.name == "mta_acceptor_transactions_open")
        return n, settled

    def _expected_now(self) -> set:
        from mta import config as mconfig
        run = self.settings.run_dir
        try:
            mtime = os.stat(os.path.join(run, mconfig.ACTIVE_NAME)).st_mtime_ns
        except OSError:
            return self.expected
        if mtime != self._active_mtime:
            self._active_mtime = mtime
            active = mconfig.read_active(run)
            if active is not None:
                self.expected = set(expected_slots(active))
                self.active = active
        return self.expected

    def restarts(self) -> dict[str, int]:
        """The supervisor's count of its children's unasked deaths: {"role[index]": n}
        (run/restarts.json; empty when it cannot be read)."""
        from mta.config import RESTARTS_NAME  # noqa: PLC0415 (as _expected_now's)
        try:
            with open(os.path.join(self.settings.run_dir, RESTARTS_NAME), "rb") as fh:
                doc = json.loads(fh.read())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict):
            return {}
        return {k: v for k, v in doc.items() if isinstance(v, int) and not isinstance(v, bool)}

    def health(self) -> dict:
        """Whether the node can and should take mail, for a load balancer's check (the
        admin API answers 503 when not ``ok``): every child the supervisor runs reports,
        every spool shard can write (else its mail gets 451), and no drain is in effect."""
        now = self.clock()
        expected = self._expected_now()
        restarts = self.restarts()
        children = []
        for role, index in sorted(expected | set(self.slots)):
            slot = self.slots.get((role, index))
            up = slot is not None and self.fresh(slot, now)   # (never reported: down)
            if (role, index) not in expected and not up:
                continue            # retired by a reload (its counts are kept for /metrics)
            c = {"role": role, "index": index, "pid": (slot.pid or None) if slot else None,
                 "up": up, "last_report_age": round(now - slot.at, 3)
                 if slot is not None and slot.report else None,
                 "restarts": restarts.get(f"{role}[{index}]", 0)}
            if role == "spool" and up:
                c["healthy"] = all(g.value for g in slot.report.gauges
                                   if g.name == "mta_spool_healthy")
            elif role == "acceptor" and up:
                # the spool's disk below spool.min_free_*: this acceptor's MAIL gets 452
                c["healthy"] = not any(g.value for g in slot.report.gauges
                                       if g.name == "mta_acceptor_space_low")
            children.append(c)
        draining = os.path.exists(os.path.join(self.settings.run_dir, DRAIN_FLAG))
        return {"ok": all(c["up"] and c.get("healthy", True) for c in children)
                and not draining,
                "draining": draining, "children": children,
                "admin": {"pid": os.getpid(), "reports_received": self.received},
                "supervisor": {"pid": os.getppid()}}

    # ----------------------------------------------------------------- merging

    def merged(self):
        """(counters, gauges, histograms) summed over the children: {(name, labels): value}
        (a gauge whose family combines with MAX: the highest child's value)."""
        now = self.clock()
        counters: dict[tuple, float] = {}
        gauges: dict[tuple, float] = {}
        hists: dict[tuple, list] = {}

        def add_hist(k, counts, total):
            cur = hists.get(k)
            if cur is None:
                hists[k] = [list(counts), total]
            elif len(cur[0]) == len(counts):
                cur[0] = [a + b for a, b in zip(cur[0], counts)]
                cur[1] += total
        for slot in self.slots.values():
            for k, v in slot.base_counters.items():
                counters[k] = counters.get(k, 0) + v
            for k, (counts, total) in slot.base_hist.items():
                add_hist(k, counts, total)
            for r, at in slot.reports():
                for s in r.counters:
                    k = (s.name, tuple(s.labels))
                    counters[k] = counters.get(k, 0) + s.value
                for h in r.histograms:
                    add_hist((h.name, tuple(h.labels)), h.counts, h.sum)
                if now - at > self.stale_after or not slot.running(r):
                    continue
                for s in r.gauges:
                    k = (s.name, tuple(s.labels))
                    if k in gauges and _combine(s.name) == MAX:
                        gauges[k] = max(gauges[k], s.value)
                    else:
                        gauges[k] = gauges.get(k, 0) + s.value
        self._bound(counters, gauges)
        return counters, gauges, hists

    def _bound(self, counters: dict, gauges: dict) -> None:
        limit = self.max_label_values
        for k in sorted(k for k in counters if FAMILIES.get(k[0]) is not None
                        and FAMILIES[k[0]].traffic):
            name, labels = k
            other = (OTHER,) * len(labels)
            admitted = self.admitted.setdefault(name, set())
            if labels == other or labels in admitted:
                continue
            if len(admitted) < limit:
                admitted.add(labels)
                continue
            v = counters.pop(k)
            counters[(name, other)] = counters.get((name, other), 0) + v
        by_name: dict[str, dict] = {}
        for k in [k for k in gauges if FAMILIES.get(k[0]) is not None
                  and FAMILIES[k[0]].traffic]:
            by_name.setdefault(k[0], {})[k[1]] = gauges.pop(k)
        for name, values in by_name.items():
            width = len(FAMILIES[name].labels)
            for labels, v in top_n(values, limit, width):
                gauges[(name, labels)] = v


class Collector:
    """prometheus_client custom collector over :class:`Reports` and the host."""

    def __init__(self, reports: Reports, settings):
        self.reports = reports
        self.settings = settings
        self.spool_dir = settings.spool_dir
        self._device = None
        self._device_checked = 0.0

    def collect(self):
        out: dict[str, list] = {}      # name -> [(labels, value)]

        def put(name, labels, value):
            out.setdefault(name, []).append((tuple(labels), value))
        counters, gauges, hists = self.reports.merged()
        for (name, labels), v in counters.items():
            put(name, labels, v)
        for (name, labels), v in gauges.items():
            put(name, labels, v)
        self._host(put)
        for name, rows in out.items():
            fam = FAMILIES.get(name)
            if fam is None or fam.kind == HISTOGRAM:
                continue        # from a newer or older child: not ours to describe
            cls = CounterMetricFamily if fam.kind == COUNTER else GaugeMetricFamily
            mf = cls(name, fam.help, labels=list(fam.labels))
            for labels, v in sorted(rows):
                if len(labels) == len(fam.labels):
                    mf.add_metric(list(labels), v)
            yield mf
        by_name: dict[str, list] = {}
        for (name, labels), (counts, total) in hists.items():
            by_name.setdefault(name, []).append((labels, counts, total))
        for name, rows in by_name.items():
            fam = FAMILIES.get(name)
            if fam is None or fam.kind != HISTOGRAM:
                continue
            mf = HistogramMetricFamily(name, fam.help, labels=list(fam.labels))
            for labels, counts, total in sorted(rows):
                if len(counts) != len(fam.buckets) + 1 or len(labels) != len(fam.labels):
                    continue
                buckets, acc = [], 0
                for bound, c in zip([*map(_le, fam.buckets), "+Inf"], counts):
                    acc += c
                    buckets.append((bound, acc))
                mf.add_metric(list(labels), buckets, total)
            yield mf

    def host_rows(self) -> dict[str, list]:
        """The host's and the processes' figures: name -> [(labels, value)] (status page)."""
        out: dict[str, list] = {}
        self._host(lambda name, labels, value: out.setdefault(name, []).append(
            (tuple(labels), value)))
        return out

    def _host(self, put) -> None:
        now = self.reports.clock()
        # Processes: every child that reported, the supervisor and this process.
        # As the health check: the children the supervisor runs now (one added by a
        # reload that never reported is down; one retired by a reload is not listed
        # once it stopped reporting: its counts stay in the sums).
        procs = [("supervisor", "0", os.getppid()), ("admin", "0", os.getpid())]
        expected = self.reports._expected_now()
        restarts = self.reports.restarts()
        for key in sorted(expected | set(self.reports.slots)):
            slot = self.reports.slots.get(key)
            up = slot is not None and self.reports.fresh(slot, now)
            if key not in expected and not up:
                continue
            put("mta_child_up", (key[0], str(key[1])), 1 if up else 0)
            put("mta_child_restarts_total", (key[0], str(key[1])),
                restarts.get(f"{key[0]}[{key[1]}]", 0))
            if slot is not None and slot.report is not None:
                put("mta_child_report_age_seconds", (slot.role, str(slot.index)),
                    round(now - slot.at, 3))
                if up:
                    procs.append((slot.role, str(slot.index), slot.pid))
        for role, index, pid in procs:
            st = host.process_stat(pid)
            if st is not None:
                put("mta_process_cpu_seconds_total", (role, index), st[0])
                put("mta_process_resident_memory_bytes", (role, index), st[1])
        fs = host.free_space(self.spool_dir)
        if fs is not None:
            put("mta_spool_free_bytes", (), fs[0])
            put("mta_spool_size_bytes", (), fs[1])
        if self._device is None and now - self._device_checked > 60:
            self._device_checked = now
            self._device = host.device_of(self.spool_dir)
        if self._device is not None:
            major, minor, name = self._device
            d = host.diskstats(major, minor)
            if d is not None:
                put("mta_disk_reads_completed_total", (name,), d["reads"])
                put("mta_disk_writes_completed_total", (name,), d["writes"])
                put("mta_disk_read_bytes_total", (name,), d["read_bytes"])
                put("mta_disk_written_bytes_total", (name,), d["written_bytes"])
                put("mta_disk_io_time_seconds_total", (name,), d["io_seconds"])
                put("mta_disk_io_time_weighted_seconds_total", (name,), d["weighted_seconds"])
                put("mta_disk_io_in_progress", (name,), d["in_progress"])
        t = host.tcp()
        for key, name in _TCP:
            if key in t:
                put(name, (), t[key])


_TCP = (("RetransSegs", "mta_tcp_retransmitted_segments_total"),
        ("ListenOverflows", "mta_tcp_listen_overflows_total"),
        ("ListenDrops", "mta_tcp_listen_drops_total"),
        ("OutRsts", "mta_tcp_resets_sent_total"),
        ("EstabResets", "mta_tcp_established_resets_total"),
        ("CurrEstab", "mta_tcp_connections_established"),
        ("ActiveOpens", "mta_tcp_active_opens_total"),
        ("PassiveOpens", "mta_tcp_passive_opens_total"))


def _le(bound: float) -> str:
    return repr(float(bound))
