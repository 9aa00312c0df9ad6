"""Reports sent to a bounce domain: read them, find their message, make their events.

What it does: SMTP mail whose recipients are at a ``feedback.bounce_domains``
domain (the return paths of the mail sent) is a report, not a message to
relay.  :func:`read` parses it (:mod:`mta.feedback.reports`: an RFC 3464 DSN
or an RFC 5965 ARF report), looks up the original message's events in the
events store (read-only; by the queue id a VERP return path
``localpart+<queue id>@bounce-domain`` carries -- in a recipient of the report
or in the return path it quotes -- else by the ``Message-ID`` header the report
returns) and turns it into ``out_of_band`` / ``spam_complaint`` events and
suppression entries (:mod:`mta.feedback.oob`).  No I/O of its own beyond the
store lookup; the acceptor (``main.py``) makes the events durable through the
spool shard's group commit (``SpoolEventsCommit``) and adds the suppression
entries before it answers 250.

Mixed transactions: the first recipient decides what a transaction is; a
recipient of the other kind gets 452 4.5.3 (the client sends it again in a
transaction of its own), so a report transaction holds only bounce-domain
recipients and nothing of it is ever relayed.

Runs in a worker thread (parsing and LMDB reads block): pure but for the store.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mta.feedback import oob
from mta.feedback import reports as rpt
from mta.obs import events as ev

log = logging.getLogger("mta.acceptor")

MAX_VERP_CANDIDATES = 8     # queue ids looked up for one report


@dataclass
class Reading:
    """What one report gave."""

    kind: str = ""                          # rpt.DSN, rpt.ARF, or "" (not a report)
    events: list[dict] = field(default_factory=list)      # internal events (REPORT_TYPES)
    suppress: list[tuple[str, str, str]] = field(default_factory=list)  # (addr, source, desc)
    matched: bool = False                   # the original message was found
    queue_id: str = ""                      # its queue id ("" when not found)


def bounce_domain(address: str, domains) -> bool:
    """Whether *address* is at one of *domains* (a set of lower-case names)."""
    return bool(domains) and address.rpartition("@")[2].lower().rstrip(".") in domains


def normalize_domains(domains) -> frozenset[str]:
    return frozenset(d.strip().lower().rstrip(".") for d in domains if d.strip())


def verp_candidates(rcpts: list[str], report: rpt.Report | None) -> list[str]:
    """The queue ids VERP return paths carry: the report's recipients, then the return path
    of the original message the report quotes (ARF Original-Mail-From, Return-Path)."""
    out: list[str] = []
    for addr in [*rcpts, report.original_mail_from if report is not None else ""]:
        qid = oob.verp_queue_id(addr or "")
        if qid and qid not in out:
            out.append(qid)
    return out[:MAX_VERP_CANDIDATES]


def find_originals(store, qids: list[str], message_id: str, rcpts=()) -> list[dict]:
    """The stored events of the original message ([] without a store or a match); those
    of *rcpts* (the addresses the report names) when it has any."""
    if store is None or not (qids or message_id):
        return []
    try:
        return store.originals(queue_ids=qids, message_id=message_id, recipients=rcpts)
    except Exception as exc:    # lmdb.Error, a damaged store: match nothing, log
        log.warning("events store lookup for a report failed: %s", exc)
        return []


def read(payload: bytes, rcpts: list[str], store, classifier,
         now: float | None = None, unmatched: bool = False) -> Reading:
    """Parse one report and make its events and suppression entries.

    *store*: the events store (``originals()``) or None; *classifier*: a
    :class:`mta.feedback.Classifier`.  Never raises for what the report
    contains: anything that is not a DSN or ARF report gives an empty Reading.
    """
    now = time.time() if now is None else now
    try:
        report = rpt.parse(payload)
    except Exception:       # the parser copes with malformed MIME; belt and braces
        log.exception("report parser failed")
        report = None
    if report is None:
        return Reading()
    originals = find_originals(store, verp_candidates(rcpts, report), report.message_id,
                               oob.named(report))
    events, suppress = oob.report_events(report, originals, classifier, now, unmatched)
    internal = [{"type": e["type"], "timestamp": now, "event": e} for e in events
                if e.get("type") in ev.REPORT_TYPES]
    qid = originals[0].get("message_id", "") if originals else ""
    return Reading(report.kind, internal, suppress, bool(originals), qid)
