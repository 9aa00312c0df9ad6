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
from mta.queueid import recipient_domain
from mta.spool import schedule as sch
from mta.spool.dispatch import TRANSACTIONAL
from mta.store import start_of

log = logging.getLogger("mta.spool")

LIST_LIMIT_MAX = 1_000_000      # entries one SPOOL_QUEUE_LIST reply may carry
CAMPAIGNS_MAX = 1000            # campaigns named in one summary; the rest count as "(other)"
OTHER_CAMPAIGN = "(other)"
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
    ``pools``: messages and pending recipients per egress pool; ``campaigns``: the
    same per ``campaign_id`` (``(none)`` without one; at most CAMPAIGNS_MAX named,
    the rest under ``(other)``); ``events_backlog_bytes`` / ``_segments``: spool
    segments the events process has not read yet (``events_backlog_warning``:
    over half of ``events.max_backlog_bytes``).
    """
    store = shard.store
    s = store.summary()
    pending = deferred = scheduled = scheduled_messages = 0
    domains: dict[str, list] = {}
    pools: dict[str, list] = {}      # pool -> [messages, pending recipients]
    campaigns: dict[str, list] = {}  # campaign_id -> [messages, pending recipients]
    next_attempt = next_start = None
    now = time.time()
    for e in store.entries.values():
        p = pools.setdefault(e.meta.params.get("ip_pool", "default"), [0, 0])
        p[0] += 1
        n_pending = e.state.count(sch.PENDING)
        p[1] += n_pending
        camp = e.meta.params.get("campaign_id") or NO_CAMPAIGN
        c = campaigns.get(camp)
        if c is None:
            if len(campaigns) >= CAMPAIGNS_MAX:
                camp = OTHER_CAMPAIGN
            c = campaigns.setdefault(camp, [0, 0])
        c[0] += 1
        c[1] += n_pending
        start = start_of(e.meta)
        later = start > now
        counted = False
        for i, st in enumerate(e.state):
            if st != sch.PENDING:
                continue
            pending += 1
            if later and not e.attempts[i] and e.due[i] > now:
                scheduled += 1
                if not counted:
                    counted = True
                    scheduled_messages += 1
                    if next_start is None or start < next_start:
                        next_start = start
            d = domains.setdefault(recipient_domain(e.meta.rcpts[i]), [0, 0, None])
            d[0] += 1
            if e.attempts[i]:
                deferred += 1
                d[1] += 1
                due = e.due[i]
                if d[2] is None or due < d[2]:
                    d[2] = due
                if next_attempt is None or due < next_attempt:
                    next_attempt = due
    s.update(shard=shard.shard, healthy=shard.healthy, error=shard.last_error,
             held=shard.dcfg.hold, pending=pending, deferred=deferred,
             next_attempt=next_attempt, in_flight=len(shard.jobs),
             in_flight_transactional=shard.window.out[TRANSACTIONAL],
             blocked=shard.window.blocked_count(),
             suspended_messages=len(shard.held), recovering=shard.recovering,
             scheduled=scheduled, scheduled_messages=scheduled_messages, next_start=next_start,
             domains={k: {"recipients": v[0], "deferred": v[1], "next_attempt": v[2]}
                      for k, v in domains.items()},
             pools={k: {"messages": v[0], "recipients": v[1]} for k, v in pools.items()},
             campaigns={str(k): {"messages": v[0], "recipients": v[1]}
                        for k, v in campaigns.items()},
             events_backlog_bytes=shard.backlog[0], events_backlog_segments=shard.backlog[1],
             events_backlog_warning=shard.backlog_level > 0)
    return bus.SpoolQueueSummaryReply(req, s)


def listing(store, req: int, limit: int) -> bus.SpoolQueueListReply:
    """The queued messages in queue-id order, at most *limit* (0: up to LIST_LIMIT_MAX)."""
    limit = min(limit or LIST_LIMIT_MAX, LIST_LIMIT_MAX)
    out = []
    for qid in sorted(store.entries)[:limit]:
        e = store.entries[qid]
        out.append(bus.QueueEntry(qid=qid, sender=e.meta.sender, rcpts=e.meta.rcpts,
                                  arrival=e.meta.arrival, size=e.length,
                                  states=[sch.STATE_NAMES[s] for s in e.state],
                                  attempts=e.attempts, due=e.due))
    return bus.SpoolQueueListReply(req, out)


def flush(store, due, req: int, qids=None) -> bus.SpoolQueueFlushReply:
    """Make every deferred recipient due now (of messages *qids* only, when given); reply
    with how many there were."""
    now = time.time()
    count = 0
    entries = store.entries
    items = entries.items() if qids is None else \
        [(q, entries[q]) for q in qids if q in entries]
    for qid, e in items:
        hit = False
        for i, st in enumerate(e.state):
            if st == sch.PENDING and e.due[i] > now:
                e.due[i] = now
                hit = True
                count += 1
        if hit:
            due.push(now, qid)
    log.info("queue flush%s: %d deferred recipient(s) due now",
             "" if qids is None else " (requeued by delivery)", count)
    return bus.SpoolQueueFlushReply(req, count)


def show(store, req: int, qid: str) -> bus.SpoolMessageShowReply:
    """One message's envelope, recipients' progress and body."""
    e = store.entries.get(qid)
    if e is None:
        return bus.SpoolMessageShowReply(req, bus.STATUS_UNKNOWN, None, b"")
    m = e.meta
    entry = {"qid": m.qid, "sender": m.sender, "recipients": m.rcpts,
             "arrival": m.arrival, "size": e.length, "params": m.params,
             "client": m.client,
             "state": [sch.STATE_NAMES[s] for s in e.state],
             "attempts": e.attempts, "due": e.due}
    return bus.SpoolMessageShowReply(req, bus.STATUS_OK, entry, store.read_body(e))
