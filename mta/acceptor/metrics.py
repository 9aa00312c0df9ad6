"""The acceptor's statistics (families in :mod:`mta.obs.catalog`), pushed to the admin process.

The sessions touch only the handles here: ``m.smtp_accepted.value += 1``,
``m.smtp_txn.observe(seconds)``.  Values the acceptor already keeps (its
sessions, its ``stats`` dicts) are read at snapshot time.
"""
from __future__ import annotations

from mta.obs.stats import COUNTER, GAUGE, Registry


class AcceptorMetrics:
    def __init__(self, acceptor, max_label_values: int = 50):
        self.reg = reg = Registry(max_label_values)
        self.acceptor = acceptor
        self.smtp_txn = reg.histogram("mta_smtp_transaction_seconds")
        self.smtp_accepted = reg.counter("mta_smtp_messages_accepted_total")
        self.smtp_rejected = reg.counter("mta_smtp_messages_rejected_total")
        self.smtp_rcpt_ok = reg.counter("mta_smtp_recipients_accepted_total")
        self.smtp_connections = reg.counter("mta_smtp_connections_total")
        self.smtp_rcpt_seen = 0         # RCPT commands; refused = seen - accepted
        self.http_request = reg.histogram("mta_http_request_seconds")
        self.http_codes = reg.keyed("mta_http_requests_total")
        reg.collect(self._collect)

    def http_response(self, status: int, seconds: float) -> None:
        """A response was queued for a request that started *seconds* ago."""
        self.http_request.observe(seconds)
        self.http_codes.inc((str(status),))

    def _collect(self) -> list:
        a = self.acceptor
        rows = [
            (COUNTER, "mta_smtp_recipients_rejected_total", (),
             self.smtp_rcpt_seen - self.smtp_rcpt_ok.value),
            (COUNTER, "mta_smtp_connections_rejected_total", (), a.stats["rejected_connections"]),
            (GAUGE, "mta_smtp_connections_open", (), len(a.sessions)),
            (GAUGE, "mta_acceptor_transactions_open", (), a.transactions_open()),
            (GAUGE, "mta_acceptor_space_low", (), 1 if a.space_low else 0),
        ]
        rs = a.report_stats
        if a.bounce_domains:
            rows += [(COUNTER, "mta_feedback_reports_total", (kind,), rs[kind])
                     for kind in ("dsn", "arf", "unparsed", "deferred")]
            rows += [(COUNTER, "mta_feedback_reports_matched_total", (), rs["matched"]),
                     (GAUGE, "mta_feedback_reports_unread", (), a.reports_unread)]
        signer = a.signer
        if signer is not None:
            rows += [
                (COUNTER, "mta_dkim_signatures_total", (), signer.signatures),
                (COUNTER, "mta_dkim_signing_failures_total", (), a.stats["dkim_failed"]),
                (COUNTER, "mta_dkim_signing_cpu_seconds_total", (), signer.cpu_seconds),
                (COUNTER, "mta_dkim_key_cpu_seconds_total", (), signer.key_cpu_seconds),
            ]
        if a.http is not None:
            st = a.http.stats
            rows += [
                # One message per recipient (SparkPost's transmissions).
                (COUNTER, "mta_http_messages_accepted_total", (), st["accepted"]),
                (COUNTER, "mta_http_recipients_accepted_total", (), st["accepted"]),
                (COUNTER, "mta_http_recipients_rejected_total", (), st["rejected"]),
            ]
        return rows
