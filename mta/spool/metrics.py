"""A spool shard's statistics (families in :mod:`mta.obs.catalog`), pushed to the admin process.

The group commit observes its fdatasync time and batch size here; the queue's
size (kept up to date by the store), the bytes appended and the jobs out are
read at snapshot time, so nothing is walked.
"""
from __future__ import annotations

from mta.obs.stats import COUNTER, GAUGE, Registry


class ShardMetrics:
    def __init__(self, shard, max_label_values: int = 50):
        self.reg = reg = Registry(max_label_values)
        self.shard = shard
        label = str(shard.shard)
        self.label = (label,)
        self.fsync = reg.histogram("mta_spool_fsync_seconds", label)
        self.batch = reg.histogram("mta_spool_commit_batch_messages", label)
        self.errors = reg.counter("mta_spool_commit_errors_total", label)
        self.expired = reg.counter("mta_spool_recipients_ended_total", label, "expired")
        self.operator_bounced = reg.counter("mta_spool_recipients_ended_total", label,
                                            "bounced_by_operator")
        reg.collect(self._collect)

    def ended(self, plan) -> None:
        """A written batch's recipients ended by the spool (expired, the operator's bounce)."""
        self.expired.value += plan.expired
        self.operator_bounced.value += plan.operator_bounced

    def _collect(self) -> list:
        sh = self.shard
        st = sh.store
        lb = self.label
        spare = st.spare
        skipped = st.recovery_stats
        return [
            (COUNTER, "mta_spool_segment_files_total", lb + ("reused",),
             spare.recycled if spare is not None else 0),
            (COUNTER, "mta_spool_segment_files_total", lb + ("zero_filled",),
             spare.filled if spare is not None else 0),
            (COUNTER, "mta_spool_written_bytes_total", lb, st.written),
            (COUNTER, "mta_spool_skipped_records_total", lb + ("damaged",), skipped["damaged"]),
            (COUNTER, "mta_spool_skipped_records_total", lb + ("torn",), skipped["torn"]),
            (COUNTER, "mta_spool_skipped_records_total", lb + ("unreadable",),
             skipped["unreadable"]),
            *[(COUNTER, "mta_spool_mended_records_total", lb + (k[7:],), v)
              for k, v in skipped.items() if k.startswith("mended_")],
            (GAUGE, "mta_spool_healthy", lb, 1 if sh.healthy else 0),
            (GAUGE, "mta_spool_bounce_rules_stale", lb, 1 if sh.rules_error else 0),
            (GAUGE, "mta_spool_queue_messages", lb, len(st.index)),
            (GAUGE, "mta_spool_queue_recipients", lb, st.recipients),
            (GAUGE, "mta_spool_queue_bytes", lb, st.bytes),
            (GAUGE, "mta_spool_jobs_in_flight", lb, len(sh.jobs)),
        ]
