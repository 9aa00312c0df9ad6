"""Every metric family the MTA exposes, declared once: name, kind, help, labels, buckets.

The children keep plain numbers for these (:mod:`mta.obs.stats`) and push
them to the admin process, which renders ``/metrics`` from this table
(:mod:`mta.admin.metrics`).  Names follow the Prometheus conventions: the
``mta_`` prefix, base units in the name (``_seconds``, ``_bytes``), ``_total``
on counters.  Label values are bounded: by configuration (shards, sources,
outcomes) or by ``admin.max_label_values`` (sites, source x site), the rest
summed under ``other``.
"""
from __future__ import annotations

from dataclasses import dataclass

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

# Latency buckets, seconds: from half a millisecond (a group commit on a fast
# disk) to a minute (a slow receiving server).
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)
# Messages in one group commit.
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

OTHER = "other"     # the label value that stands for every value beyond the bound

# How the admin process combines one gauge's values from several children: SUM (each
# child's share: connections, jobs) or MAX (a state every child reports for the whole
# node: summed, a 0/1 flag would read the number of processes).
SUM = "sum"
MAX = "max"


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    help: str
    labels: tuple = ()
    buckets: tuple = ()
    combine: str = SUM          # gauges only: SUM or MAX over the children
    # label values from traffic (sites): bounded by admin.max_label_values in each child
    # and again over the children summed (each child admits its own)
    traffic: bool = False


_FAMILIES = [
    # --- injection (acceptors)
    Family("mta_smtp_transaction_seconds", HISTOGRAM,
           "SMTP transactions, from the first byte of MAIL to the last byte of the reply "
           "to the message", buckets=LATENCY),
    Family("mta_smtp_messages_accepted_total", COUNTER, "messages answered 250 after DATA/BDAT"),
    Family("mta_smtp_messages_rejected_total", COUNTER,
           "messages refused or failed after DATA/BDAT (4xx or 5xx)"),
    Family("mta_smtp_recipients_accepted_total", COUNTER, "RCPT commands answered 250"),
    Family("mta_smtp_recipients_rejected_total", COUNTER, "RCPT commands refused"),
    Family("mta_smtp_connections_total", COUNTER, "SMTP connections accepted"),
    Family("mta_smtp_connections_rejected_total", COUNTER,
           "SMTP connections refused with 421 (too many)"),
    Family("mta_smtp_connections_open", GAUGE, "SMTP sessions open"),
    Family("mta_acceptor_space_low", GAUGE,
           "1 while the spool's free space is below spool.min_free_* and MAIL gets 452 "
           "(HTTP 503)", combine=MAX),
    Family("mta_acceptor_transactions_open", GAUGE,
           "mail on its way in: SMTP transactions begun (MAIL accepted) and not yet "
           "answered, HTTP messages handed to the spool or waiting to be; a drain is done "
           "only when this is 0 on every acceptor"),
    Family("mta_http_request_seconds", HISTOGRAM,
           "HTTP requests, from the first byte of the request to the last byte of the "
           "response", buckets=LATENCY),
    Family("mta_http_requests_total", COUNTER, "HTTP requests answered, by status code",
           ("code",)),
    Family("mta_http_messages_accepted_total", COUNTER,
           "messages of HTTP transmissions made durable"),
    Family("mta_http_recipients_accepted_total", COUNTER,
           "recipients of HTTP transmissions accepted"),
    Family("mta_http_recipients_rejected_total", COUNTER,
           "recipients of HTTP transmissions rejected"),
    # --- DKIM signing (acceptors; only with [dkim] keys)
    Family("mta_dkim_signatures_total", COUNTER, "DKIM signatures made (one per key per message)"),
    Family("mta_dkim_signing_failures_total", COUNTER,
           "messages whose signing failed and that were queued unsigned (see the log)"),
    Family("mta_dkim_signing_cpu_seconds_total", COUNTER,
           "CPU time spent signing: header and body canonicalisation, hashing and the "
           "private-key operations"),
    Family("mta_dkim_key_cpu_seconds_total", COUNTER,
           "CPU time of the private-key operations alone (part of "
           "mta_dkim_signing_cpu_seconds_total)"),
    # --- reports to the bounce domains (feedback.bounce_domains), read by the acceptors
    Family("mta_feedback_reports_total", COUNTER,
           "mail to a bounce domain, by what it was: dsn or arf (a report read), unparsed "
           "(neither; accepted and dropped), deferred (451: feedback.max_waiting_reports "
           "already waiting)", ("kind",)),
    Family("mta_feedback_reports_matched_total", COUNTER,
           "reports whose original message was found in the events store"),
    Family("mta_feedback_reports_unread", GAUGE,
           "reports being parsed or waiting for a reader (feedback.report_readers)"),
    # --- the events process
    Family("mta_events_published_total", COUNTER,
           "message events written to the event log (and the events store); replays after "
           "a restart count again"),
    Family("mta_events_unreadable_records_total", COUNTER,
           "spool records whose events could not be decoded or shaped: each is logged (shard, "
           "segment, offset) and passed over, its events not published"),
    # --- the webhooks process (labels: the webhook's name; at most webhooks.max_webhooks
    #     plus the [[webhook]] tables)
    Family("mta_webhook_backlog_events", GAUGE,
           "events of the events store not yet put in a batch for the webhook (its cursor's "
           "lag; bounded by webhooks.max_backlog_events)", ("webhook",)),
    Family("mta_webhook_pending_batches", GAUGE,
           "batches stored for the webhook and not yet acknowledged (being sent or waiting "
           "for a retry)", ("webhook",)),
    Family("mta_webhook_events_sent_total", COUNTER,
           "events in batches the webhook's target acknowledged with a 2xx", ("webhook",)),
    Family("mta_webhook_failed_attempts_total", COUNTER,
           "POSTs to the webhook's target that failed (no 2xx in time)", ("webhook",)),
    Family("mta_webhook_dropped_events_total", COUNTER,
           "events never sent: in batches dropped after the last retry, or skipped at the "
           "backlog bound (on_backlog_full = drop_oldest)", ("webhook",)),
    # --- spool shards
    Family("mta_spool_fsync_seconds", HISTOGRAM, "group commit fdatasync latency",
           ("shard",), LATENCY),
    Family("mta_spool_commit_batch_messages", HISTOGRAM,
           "messages written by one group commit", ("shard",), BATCH),
    Family("mta_spool_written_bytes_total", COUNTER, "bytes appended to segment files",
           ("shard",)),
    Family("mta_spool_commit_errors_total", COUNTER, "group commits that failed (EIO, ENOSPC)",
           ("shard",)),
    Family("mta_spool_recipients_ended_total", COUNTER,
           "recipients the spool ended without a delivery outcome: expired (delivery.max_age) "
           "or bounced_by_operator (mta bounce)", ("shard", "reason")),
    Family("mta_spool_skipped_records_total", COUNTER,
           "records the shard's recovery passed over at its start, each logged with its "
           "segment and offset: damaged (checksum), torn (the tail a crash cut short) or "
           "unreadable (checksummed, but its content is not what its type says)",
           ("shard", "reason")),
    Family("mta_spool_mended_records_total", COUNTER,
           "message records the shard's recovery took with damaged fields mended, each "
           "logged with its segment, offset and queue id: time (an arrival or due time out "
           "of range: the arrival from its queue id, a due time its start), client (no "
           "text: empty), progress (a "
           "compaction copy's recipient states, attempts or flags out of range: an unknown "
           "state pending, so it may be sent again) or batch (an intact message record of "
           "a batch damaged after it was synced: a whole batch follows it); a record mended "
           "for two reasons counts under each (the recovery's log line counts records)",
           ("shard", "reason")),
    Family("mta_spool_segment_files_total", COUNTER,
           "files made ready for the next segment, by source: reused (a finished segment's "
           "file) or zero_filled (written by the spare thread)", ("shard", "source")),
    Family("mta_spool_healthy", GAUGE,
           "1 while the shard can write; 0 after a failed write or sync (EIO, ENOSPC), "
           "while the acceptors answer 451 for it", ("shard",)),
    Family("mta_spool_bounce_rules_stale", GAUGE,
           "1 while the shard classifies bounces by the rules it had: the "
           "feedback.bounce_rules file could not be read at the last reload (logged; "
           "a reload after it is repaired reads it)", ("shard",)),
    Family("mta_spool_queue_messages", GAUGE, "messages queued", ("shard",)),
    Family("mta_spool_queue_recipients", GAUGE, "recipients of the queued messages",
           ("shard",)),
    Family("mta_spool_queue_bytes", GAUGE, "bytes of the queued messages", ("shard",)),
    Family("mta_spool_jobs_in_flight", GAUGE, "delivery jobs out", ("shard",)),
    # --- delivery
    Family("mta_delivery_attempts_total", COUNTER,
           "delivery jobs attempted (one message to one domain), requeued ones not counted"),
    Family("mta_delivery_outcomes_total", COUNTER, "recipient outcomes, by result",
           ("result",)),
    Family("mta_delivery_job_seconds", HISTOGRAM,
           "delivery jobs, from their arrival in a delivery process to their outcome",
           buckets=LATENCY),
    Family("mta_delivery_connection_attempts_total", COUNTER,
           "connections tried, by source and site", ("source", "site"), traffic=True),
    Family("mta_delivery_connections_open", GAUGE, "connections open, by source and site",
           ("source", "site"), traffic=True),
    Family("mta_delivery_queue_jobs", GAUGE, "jobs waiting in the delivery processes, by site",
           ("site",), traffic=True),
    Family("mta_delivery_jobs_in_flight", GAUGE, "jobs in hand in the delivery processes"),
    Family("mta_delivery_source_suspended", GAUGE, "1 while an egress source is suspended",
           ("source",), combine=MAX),
    # --- DNS (the delivery processes' resolvers)
    Family("mta_dns_lookups_total", COUNTER, "DNS queries sent"),
    Family("mta_dns_lookup_seconds", HISTOGRAM, "DNS query latency", buckets=LATENCY),
    Family("mta_dns_cache_hits_total", COUNTER, "lookups answered from the cache"),
    Family("mta_dns_cache_misses_total", COUNTER, "lookups not in the cache"),
    Family("mta_dns_failures_total", COUNTER,
           "DNS queries without an answer, by kind (nxdomain, nodata, timeout, servfail, "
           "error)", ("kind",)),
    # --- rendered by the admin process itself
    Family("mta_child_up", GAUGE, "1 while the child reports (its last report is recent)",
           ("role", "index")),
    Family("mta_child_report_age_seconds", GAUGE, "seconds since the child's last report",
           ("role", "index")),
    Family("mta_child_restarts_total", COUNTER,
           "times the child's process died unasked and was started again (since the "
           "supervisor started): one that keeps rising is a crash loop", ("role", "index")),
    Family("mta_process_cpu_seconds_total", COUNTER, "CPU time of the process (user + system)",
           ("role", "index")),
    Family("mta_process_resident_memory_bytes", GAUGE, "resident memory of the process",
           ("role", "index")),
    Family("mta_spool_free_bytes", GAUGE,
           "bytes free to unprivileged users on the spool file system"),
    Family("mta_spool_size_bytes", GAUGE, "size of the spool file system"),
    Family("mta_disk_reads_completed_total", COUNTER, "reads completed by the spool's device",
           ("device",)),
    Family("mta_disk_writes_completed_total", COUNTER,
           "writes completed by the spool's device", ("device",)),
    Family("mta_disk_read_bytes_total", COUNTER, "bytes read by the spool's device",
           ("device",)),
    Family("mta_disk_written_bytes_total", COUNTER, "bytes written by the spool's device",
           ("device",)),
    Family("mta_disk_io_time_seconds_total", COUNTER,
           "time the spool's device was busy (rate = utilisation)", ("device",)),
    Family("mta_disk_io_time_weighted_seconds_total", COUNTER,
           "time spent by I/O requests on the spool's device (rate = average queue depth)",
           ("device",)),
    Family("mta_disk_io_in_progress", GAUGE, "I/O requests in flight on the spool's device",
           ("device",)),
    Family("mta_tcp_retransmitted_segments_total", COUNTER, "TCP segments retransmitted (host)"),
    Family("mta_tcp_listen_overflows_total", COUNTER,
           "connections dropped because a listen queue was full (host)"),
    Family("mta_tcp_listen_drops_total", COUNTER,
           "SYNs to a listening socket dropped (host)"),
    Family("mta_tcp_resets_sent_total", COUNTER, "TCP segments sent with RST (host)"),
    Family("mta_tcp_established_resets_total", COUNTER,
           "established connections reset (host)"),
    Family("mta_tcp_connections_established", GAUGE, "TCP connections established (host)"),
    Family("mta_tcp_active_opens_total", COUNTER, "outgoing TCP connections opened (host)"),
    Family("mta_tcp_passive_opens_total", COUNTER, "incoming TCP connections opened (host)"),
]

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}
