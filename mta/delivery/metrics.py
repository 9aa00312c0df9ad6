"""A delivery process's statistics (families in :mod:`mta.obs.catalog`), for the admin process.

Per job: its time in this process (arrival to outcome) and whether it was an
attempt; per connection attempt: (source x site), admitted as label values up
to ``admin.max_label_values`` (the rest count as ``other``).  Outcomes, DNS
counters, connections open and jobs waiting per site are read from the engine
and the resolver at snapshot time; connections and queues by site are gauges,
the largest ``admin.max_label_values`` with their own series, the rest summed
as ``other``.
"""
from __future__ import annotations

import time

from mta.bus import OUTCOMES, REQUEUED
from mta.obs.stats import COUNTER, GAUGE, Registry, top_n


class DeliveryMetrics:
    def __init__(self, delivery, max_label_values: int = 50):
        self.reg = reg = Registry(max_label_values)
        self.limit = max_label_values
        self.delivery = delivery
        self.job_seconds = reg.histogram("mta_delivery_job_seconds")
        self.attempts = reg.counter("mta_delivery_attempts_total")
        delivery.engine.connect_attempts = reg.keyed("mta_delivery_connection_attempts_total")
        delivery.resolver.query_seconds = reg.histogram("mta_dns_lookup_seconds")
        reg.collect(self._collect)

    def job_done(self, job, results) -> None:
        self.job_seconds.observe(time.monotonic() - job.queued_at)
        for r in results:
            if r.outcome != REQUEUED:
                self.attempts.value += 1
                break

    def _collect(self) -> list:
        eng = self.delivery.engine
        rows = [(COUNTER, "mta_delivery_outcomes_total", (o,), eng.stats.get(o, 0))
                for o in OUTCOMES]
        conns: dict[tuple, int] = {}
        queued: dict[str, int] = {}
        for site in eng.sites.values():
            for lane in site.lanes.values():
                if lane.active:
                    key = (lane.source.name, site.name)
                    conns[key] = conns.get(key, 0) + lane.active
                q = lane.queued()
                if q:
                    queued[site.name] = queued.get(site.name, 0) + q
        rows += [(GAUGE, "mta_delivery_connections_open", k, v)
                 for k, v in top_n(conns, self.limit, 2)]
        rows += [(GAUGE, "mta_delivery_queue_jobs", k, v)
                 for k, v in top_n(queued, self.limit)]
        rows.append((GAUGE, "mta_delivery_jobs_in_flight", (), eng.in_flight))
        rows += [(GAUGE, "mta_delivery_source_suspended", (name,), 0 if s.usable() else 1)
                 for name, s in eng.sources.items()]
        st = self.delivery.resolver.cache_stats()
        rows += [
            (COUNTER, "mta_dns_lookups_total", (), st["queries"]),
            (COUNTER, "mta_dns_cache_hits_total", (), st["hits"]),
            (COUNTER, "mta_dns_cache_misses_total", (), st["misses"]),
        ]
        rows += [(COUNTER, "mta_dns_failures_total", (k,), st[k])
                 for k in ("nxdomain", "nodata", "timeout", "servfail", "error")]
        return rows
