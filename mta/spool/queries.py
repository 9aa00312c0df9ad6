"""The operator's questions to a shard (``mta queue ...``), answered from its queue.

Each function takes the shard's state and one CLI request and returns the
reply message; none of them writes to disk (deletion is a record, written by
the shard's group commit like any other).  ``flush`` changes only in-memory
due times: a flushed recipient's next attempt is not persisted until its
outcome is (after a restart it is due at its recorded time again).
"""
from __future__ import annotations

import logging
import time

from mta import bus
from mta.obs.queue import CAMPAIGNS_MAX, DOMAINS_MAX, top
from mta.queueid import recipient_domain
from mta.spool import schedule as sch
from mta.spool.dispatch import TRANSACTIONAL

log = logging.getLogger("mta.spool")

LIST_PAGE = 1000                # messages one SPOOL_QUEUE_LIST reply carries at most,
LIST_PAGE_RECIPIENTS = 20_000   # and recipients (a message is never split over two)
NO_CAMPAIGN = "(none)"


def summary(shard, req: int) -> bus.SpoolQueueSummaryReply:
    """Counts of the shard's queue: messages, recipients pending and deferred, per domain.

    ``scheduled`` / ``scheduled_messages``: recipients / messages not yet
    attempted because their ``options.start_time`` is still ahead
    (``next_start``: the earliest); ``blocked``: messages waiting for their
    domain's bulk cap (``delivery.max_in_flight_per_domain``);
    ``in_flight_transactional``: the jobs out in the transactional lane;
    ``recovering``: the shard is still reading its segment files (the counts are
    of what it has read so far, and the mail it took meanwhile);
    ``suspended_messages``: messages held back at dispatch by the operator's
    suspensions (:mod:`mta.controls`);
    ``domains``: per recipient domain, recipients pending, deferred, next attempt (the
    DOMAINS_MAX with the most recipients named, the rest summed under ``(other)``);
    ``pools``: messages and pending recipients per egress pool; ``campaigns``: the
    same per ``campaign_id`` (``(none)`` without one; the CAMPAIGNS_MAX with the most
    messages named, the rest under ``(other)``); ``events_backlog_bytes`` / ``_segments``: spool
    segments the events process has not read yet (``events_backlog_warning``:
    over half of ``events.max_backlog_bytes``).
    """
    s = shard.store.summary(time.time())
    campaigns: dict = {}
    for camp, v in s["campaigns"].items():
        c = campaigns.setdefault(str(camp or NO_CAMPAIGN), {"messages": 0, "recipients": 0})
        c["messages"] += v[0]
        c["recipients"] += v[1]
    domains, pools = s["domains"], s["pools"]
    s.update(shard=shard.shard, healthy=shard.healthy, error=shard.last_error,
             held=shard.dcfg.hold, in_flight=len(shard.jobs),
             in_flight_transactional=shard.window.out[TRANSACTIONAL],
             blocked=shard.window.blocked_count(),
             suspended_messages=len(shard.held), recovering=shard.recovering,
             domains=top({k: {"recipients": v[0], "deferred": v[1], "next_attempt": v[2]}
                          for k, v in domains.items()}, DOMAINS_MAX, "recipients"),
             pools={k: {"messages": v[0], "recipients": v[1]} for k, v in pools.items()},
             campaigns=top(campaigns, CAMPAIGNS_MAX, "messages"),
             events_backlog_bytes=shard.backlog[0], events_backlog_segments=shard.backlog[1],
             events_backlog_warning=shard.backlog_level > 0)
    return bus.SpoolQueueSummaryReply(req, s)


def listing(store, req: int, limit: int, after: str = "") -> bus.SpoolQueueListReply:
    """One page of the queued messages in queue-id order: those after queue id *after*
    ("": from the first), at most *limit* (0, or more than LIST_PAGE: LIST_PAGE) and about
    LIST_PAGE_RECIPIENTS recipients.  The reply's ``last`` is the next page's *after*
    ("": this was the last page).

    A page, not the queue: the envelopes are read from disk (the index keeps none), and
    the shard takes no mail while it reads them; a page costs it milliseconds, and
    ``mta queue list`` asks for the next one when it has this one.  A message whose
    record cannot be read is left out (logged).
    """
    page = min(limit, LIST_PAGE) if limit > 0 else LIST_PAGE
    index = store.index
    qids = index.sorted_qids(page, after)
    out = []
    rcpts = 0
    last = ""
    for qid in qids:
        last = qid
        try:
            m = store.read_meta(qid)
        except OSError as exc:
            log.error("%s: cannot read the message: %s", qid, exc.strerror or exc)
            continue
        state, attempts, due, _ = index.progress(qid)
        out.append(bus.QueueEntry(qid=qid, sender=m.sender, rcpts=m.rcpts,
                                  arrival=m.arrival, size=index.info(qid)[3],
                                  states=[sch.STATE_NAMES[s] for s in state],
                                  attempts=attempts, due=due))
        rcpts += len(m.rcpts)
        if rcpts >= LIST_PAGE_RECIPIENTS:
            break
    if len(qids) < page and (not qids or last == qids[-1]):
        last = ""           # the queue's end
    return bus.SpoolQueueListReply(req, out, last)


def flush(store, req: int, qids=None) -> bus.SpoolQueueFlushReply:
    """Make every deferred recipient due now (of messages *qids* only, when given; a message
    whose options.start_time is still ahead stays scheduled: it was never tried); reply
    with how many there were."""
    count = store.index.flush(time.time(), qids)
    log.info("queue flush%s: %d deferred recipient(s) due now",
             "" if qids is None else " (requeued by delivery)", count)
    return bus.SpoolQueueFlushReply(req, count)


def flush_some(store, req: int, domains: list, qids: list):
    """``mta queue flush --domain / --queue-id``: make the deferred recipients at *domains*
    (any, when none is given) of the messages *qids* (any, when none is given) due now.
    (The reply, which names the *qids* not queued; the domains whose sites' dead-site
    holds end: *domains*, else those of the named messages' pending recipients.)"""
    index = store.index
    known = [q for q in qids if q in index]
    unknown = [q for q in qids if q not in index]
    count = index.flush(time.time(), known if qids else None, domains or None)
    holds = set(domains)
    if not domains:
        for qid in known:
            at = index.domains(qid)
            # (a domain DELIVERY_QUEUE_FLUSH cannot carry has no site anyway)
            holds.update(d for d in (at[i] for i in index.pending_idxs(qid))
                         if 0 < len(d) <= 255)
    log.info("queue flush (%s): %d deferred recipient(s) due now",
             " ".join([f"domain={d}" for d in domains] + [f"queue_id={q}" for q in qids])[:500],
             count)
    return bus.SpoolQueueFlushReply(req, count, unknown), holds


def show(store, req: int, qid: str, hold: bool = False,
         controls=None) -> bus.SpoolMessageShowReply:
    """One message's envelope, recipients' progress and body (read from its record);
    what holds it back from its next attempt: ``held`` ([delivery] *hold*) and each
    pending recipient's operator's suspension (``suspended``, from *controls*)."""
    index = store.index
    if qid not in index:
        return bus.SpoolMessageShowReply(req, bus.STATUS_UNKNOWN, None, b"")
    try:
        m, body = store.read_record(qid)
    except OSError as exc:      # (the operator's question must not stop the shard)
        log.error("%s: cannot read the message: %s", qid, exc.strerror or exc)
        return bus.SpoolMessageShowReply(req, bus.STATUS_STORAGE, None, b"")
    state, attempts, due, _ = index.progress(qid)
    last = []               # each recipient's last deferral (since this process started)
    for i in range(len(state)):
        # (only while it waits: a recipient delivered or failed since keeps its last
        # deferral in the index, which is not its last reply)
        got = index.recipient(qid, i) if state[i] == sch.PENDING else None
        r = got[5] if got is not None else None
        last.append(None if r is None else {"code": r[0], "enhanced": r[1], "text": r[2],
                                            "host": r[3], "ip": r[4]})
    suspended = []
    for i, rcpt in enumerate(m.rcpts):
        x = controls.match(recipient_domain(rcpt), m.params) \
            if controls is not None and state[i] == sch.PENDING else None
        suspended.append(None if x is None else {"id": x.id, "until": x.until or None,
                                                 "reason": x.reason})
    entry = {"qid": m.qid, "sender": m.sender, "recipients": m.rcpts,
             "arrival": m.arrival, "size": len(body), "params": m.params,
             "client": m.client,
             "state": [sch.STATE_NAMES[s] for s in state],
             "attempts": attempts, "due": due, "last": last,
             "held": "[delivery] hold" if hold else None, "suspended": suspended}
    return bus.SpoolMessageShowReply(req, bus.STATUS_OK, entry, body)
