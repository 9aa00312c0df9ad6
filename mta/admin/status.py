"""What the status page shows, as one JSON document (``GET /api/admin/status``).

Built from the same figures as ``/metrics`` (the children's reports merged by
:class:`mta.admin.metrics.Reports`, the host's figures from :mod:`mta.admin.host`)
plus the queue view (:mod:`mta.obs.queue`) the admin API already serves.

Rates and the charts' series come from :class:`History`, a ring of samples of a
few cumulative totals taken once per ``admin.push_interval`` (at most
``HISTORY_POINTS``); a rate is the difference of the newest sample and the one
``RATE_WINDOW`` seconds older, divided by their time apart.  Latency percentiles
are read from the merged fixed-bucket histograms: the upper bound of the bucket
holding the p-th observation (``null`` without observations; the last finite
bound when it lies above every bucket).
"""
from __future__ import annotations

import collections
import time

from mta.obs.catalog import FAMILIES

HISTORY_POINTS = 600        # samples kept (10 minutes at the default push interval)
RATE_WINDOW = 10.0          # seconds a rate is measured over
PERCENTILES = (0.5, 0.9, 0.99)
LATENCIES = {"smtp_transaction": "mta_smtp_transaction_seconds",
             "http_request": "mta_http_request_seconds",
             "delivery_job": "mta_delivery_job_seconds",
             "spool_fsync": "mta_spool_fsync_seconds",
             "dns_lookup": "mta_dns_lookup_seconds"}


def percentile(bounds: tuple, counts: list, q: float) -> float | None:
    """The upper bound of the bucket holding the *q*-quantile observation."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    acc = 0
    for i, c in enumerate(counts):
        acc += c
        if acc >= rank and c:
            return float(bounds[i]) if i < len(bounds) else float(bounds[-1])
    return float(bounds[-1])


def totals(counters: dict, gauges: dict) -> dict:
    """The cumulative totals sampled into the history (and shown as counts)."""
    def csum(name, **labels):
        out = 0.0
        for (n, lab), v in counters.items():
            if n != name:
                continue
            if labels and tuple(labels.values()) != lab:
                continue
            out += v
        return out

    def gsum(name):
        return sum(v for (n, _), v in gauges.items() if n == name)
    return {
        "accepted_messages": csum("mta_smtp_messages_accepted_total")
        + csum("mta_http_messages_accepted_total"),
        "accepted_smtp": csum("mta_smtp_messages_accepted_total"),
        "accepted_http": csum("mta_http_messages_accepted_total"),
        "delivered": csum("mta_delivery_outcomes_total", result="delivered"),
        "deferred": csum("mta_delivery_outcomes_total", result="deferred"),
        "failed": csum("mta_delivery_outcomes_total", result="failed"),
        "queue_messages": gsum("mta_spool_queue_messages"),
        "queue_recipients": gsum("mta_spool_queue_recipients"),
        "smtp_connections_open": gsum("mta_smtp_connections_open"),
    }


class History:
    def __init__(self, points: int = HISTORY_POINTS, clock=time.time):
        self.samples: collections.deque = collections.deque(maxlen=points)
        self.clock = clock

    def add(self, t: dict) -> None:
        self.samples.append((self.clock(), t))

    def rate(self, key: str, window: float = RATE_WINDOW) -> float:
        if len(self.samples) < 2:
            return 0.0
        t1, last = self.samples[-1]
        first_t, first = self.samples[0]
        for ts, s in reversed(self.samples):
            if t1 - ts >= window:
                first_t, first = ts, s
                break
        dt = t1 - first_t
        return round(max(0.0, last[key] - first[key]) / dt, 3) if dt > 0 else 0.0

    def series(self, keys=("accepted_messages", "delivered", "queue_messages")) -> dict:
        """Per-interval rates of the counters and the values of the gauges, for the charts."""
        out = {"t": [], "injection_rate": [], "delivery_rate": [], "queue_messages": []}
        prev = None
        for ts, s in self.samples:
            if prev is not None:
                dt = ts - prev[0] or 1.0
                out["t"].append(round(ts, 3))
                out["injection_rate"].append(
                    round(max(0.0, s["accepted_messages"] - prev[1]["accepted_messages"]) / dt, 3))
                out["delivery_rate"].append(
                    round(max(0.0, s["delivered"] - prev[1]["delivered"]) / dt, 3))
                out["queue_messages"].append(s["queue_messages"])
            prev = (ts, s)
        return out


def latencies(hists: dict) -> dict:
    out = {}
    for key, name in LATENCIES.items():
        fam = FAMILIES[name]
        counts = None
        for (n, _labels), (c, _total) in hists.items():
            if n == name and len(c) == len(fam.buckets) + 1:
                counts = c if counts is None else [a + b for a, b in zip(counts, c)]
        counts = counts or [0] * (len(fam.buckets) + 1)
        out[key] = {"count": sum(counts),
                    **{f"p{round(q * 100)}": percentile(fam.buckets, counts, q)
                       for q in PERCENTILES}}
    return out


def document(reports, host_rows: dict, history: History, queue: dict | None,
             queue_error: str | None, drain: dict) -> dict:
    """The status document; *host_rows*: name -> [(labels, value)] from the collector."""
    counters, gauges, hists = reports.merged()
    t = totals(counters, gauges)

    def one(name, default=None):
        rows = host_rows.get(name)
        return rows[0][1] if rows else default
    processes = []
    cpu = {lab: v for lab, v in host_rows.get("mta_process_cpu_seconds_total", [])}
    mem = {lab: v for lab, v in host_rows.get("mta_process_resident_memory_bytes", [])}
    health = reports.health()
    for c in health["children"]:
        lab = (c["role"], str(c["index"]))
        processes.append({**c, "cpu_seconds": cpu.get(lab), "memory_bytes": mem.get(lab)})
    # What "not ok" is about, and what ok does not say: the node takes mail but sends
    # nothing while [delivery] hold is on.
    problems = []
    for c in health["children"]:
        name = f"{c['role']}[{c['index']}]"
        if not c["up"]:
            age = c["last_report_age"]
            problems.append(f"{name} is not reporting" + (
                " (never reported)" if age is None else f" (last report {age:.0f}s ago)") + (
                f"; it died {c['restarts']} times since the start (see the log)"
                if c["restarts"] else ""))
        elif c.get("healthy") is False and c["role"] == "spool":
            problems.append(f"{name} cannot write (EIO, ENOSPC; see the log): its mail "
                            "gets 451")
        elif c.get("healthy") is False:
            problems.append(f"{name}: the spool's free space is below spool.min_free_bytes "
                            "or min_free_percent: MAIL gets 452, HTTP injection 503")
    held = None if queue is None else any(x.get("held") for x in queue.get("shards", ()))
    if held:
        problems.append("delivery is held ([delivery] hold = true): mail is accepted and "
                        "queued, none is sent")
    suspensions = []
    if queue is not None:
        for name, src in sorted(queue["by_source"].items()):
            if src["suspended"]:
                suspensions.append({"source": name, "until": src["suspended_until"],
                                    "reason": src["reason"]})
    disk = {}
    for key, name in (("reads", "mta_disk_reads_completed_total"),
                      ("writes", "mta_disk_writes_completed_total"),
                      ("read_bytes", "mta_disk_read_bytes_total"),
                      ("written_bytes", "mta_disk_written_bytes_total"),
                      ("io_seconds", "mta_disk_io_time_seconds_total"),
                      ("in_progress", "mta_disk_io_in_progress")):
        rows = host_rows.get(name)
        if rows:
            disk["device"] = rows[0][0][0] if rows[0][0] else None
            disk[key] = rows[0][1]
    tcp = {key: one(name) for key, name in (
        ("retransmitted_segments", "mta_tcp_retransmitted_segments_total"),
        ("listen_overflows", "mta_tcp_listen_overflows_total"),
        ("listen_drops", "mta_tcp_listen_drops_total"),
        ("resets_sent", "mta_tcp_resets_sent_total"),
        ("connections_established", "mta_tcp_connections_established"))}
    return {
        "time": time.time(),
        "ok": health["ok"],
        "draining": drain.get("draining", False),
        "delivery_held": held,
        "problems": problems,
        "totals": t,
        "rates": {"injection_per_second": history.rate("accepted_messages"),
                  "delivery_per_second": history.rate("delivered"),
                  "window_seconds": RATE_WINDOW},
        "latency_seconds": latencies(hists),
        "queue": None if queue is None else {
            "total": queue["total"], "by_site": queue["by_site"], "by_pool": queue["by_pool"],
            "by_source": queue["by_source"],
            # (total.partial: these shards are not counted; those recovering are in part)
            "not_answering": queue.get("not_answering", []),
            "recovering": [x["shard"] for x in queue.get("shards", ()) if x.get("recovering")]},
        "queue_error": queue_error,
        # [cluster] nodes as the delivery processes apply it: the shaping limits in
        # effect (the queue view's lanes) are 1/nodes of the rules'
        "shaping_share": None if queue is None else {"nodes": queue.get("nodes", 1)},
        "suspensions": suspensions,
        "processes": processes,
        "disk": disk,
        "spool_free_bytes": one("mta_spool_free_bytes"),
        "spool_size_bytes": one("mta_spool_size_bytes"),
        "tcp": tcp,
        "history": history.series(),
    }
