"""What delivery outcomes and expiry do to a shard's recipients: the spool's policy.

Pure logic over the shard's queue index (:mod:`mta.store`'s QueueIndex), with
no socket and no file descriptor of its own (envelopes and bodies come through
the callables it is given): :class:`Plan` collects, for one group-commit batch, the records
to write (recipient updates, bounce messages, finished messages), the events
to make durable with them (a REC_EVENTS record in the same batch) and the messages to schedule again.  The shard
(:mod:`mta.spool.shard`) writes, syncs and then applies them; if the write
fails, :meth:`Plan.abandon` says which messages to try again.

Per recipient, on its first outcome (a repeated outcome -- deliveries are at
least once -- finds it no longer pending and is ignored):

- ``delivered`` -> DELIVERED;
- ``failed`` (5xx, null MX, NXDOMAIN) -> FAILED, and the sender gets a bounce;
- ``deferred`` -> pending again after the retry schedule
  (:class:`~mta.spool.schedule.RetryPolicy`) or a response rule's delay, at the
  latest at the message's deadline (start + ``delivery.max_age``), when its last
  attempt is made; EXPIRED and bounced when it is deferred at or past the
  deadline (that last attempt, or one dispatched just before);
- ``requeued`` (delivery could not attempt it: no source of its pool may send
  now, or the site's queue is full) -> due again after the outcome's
  ``retry_after`` (REQUEUE_MIN..REQUEUE_MAX seconds) plus up to ``retry_jitter``
  of it (one due time for the job's recipients), in memory only
  (:attr:`Plan.requeues`): no attempt counted, no record, no event.  Only a
  recipient already past ``max_age`` expires; one that is not yet is never
  expired early because of the wait (the age check wherever it waits takes it
  at its deadline).

Bounce, delay and expiration events carry SparkPost's
``bounce_class`` and the name of the rule that decided it (``bounce_rule``),
from :func:`mta.feedback.classify` over the reply (an expiry found at dispatch
is classified as our own ``4.4.7`` "message expired").

Age counts from the message's start (:func:`mta.store.start_of`: arrival, or
``options.start_time`` when later).  Events carry the ``source``,
``sending_ip`` and ``site`` the delivery process reported, when it did.

DSN (RFC 3461) parameters received with the message (``params``: ``ENVID``,
``RET``; ``NOTIFY`` and ``ORCPT`` as lists parallel to the recipients) shape
the notices: a recipient whose NOTIFY lacks FAILURE (NEVER, or e.g. SUCCESS
only) is not bounced (the failure is logged); one with SUCCESS that was
delivered to a next hop that does not offer DSN (``Result.dsn`` false) gets a
success notice with Action ``relayed`` (RFC 3461 §6.2.6; a next hop that
offers DSN was given NOTIFY and reports itself); RET=FULL returns the whole
message in a bounce (within ``mta.dsn.MAX_RETURNED_MESSAGE``), otherwise the
headers; ENVID and ORCPT go into the report (Original-Envelope-Id,
Original-Recipient).

Delay notices (``delivery.delay_warning_time``, 0 = off): for a recipient
still pending whose message has waited at least that long (counted from its
start), once per recipient, unless its NOTIFY lacks DELAY (no NOTIFY: yes).
"Once" is durable: the recipient's update record carries the flag
``RCPT_DELAY_NOTIFIED`` (:mod:`mta.store`), so a restart does not send it
again.  By time in queue, as Postfix and PowerMTA warn: at a deferral after the
warning time, and for recipients that are not being deferred -- handed back
(REQUEUED) again and again, held by the operator's suspension, never tried --
when the shard's expiry sweep, which files each message for its warning time
before its deadline, finds it (:meth:`Plan.remind`; at most a deadline bucket,
``max_age`` / 1000, late).  One notice per message and ``delay_warning_time``
at most: a message whose recipients are deferred in several batches (several
sites) gets one for those of the first; the others are named in the next, an
interval later, at their deferral or by the sweep (the time of a message's last
notice is kept in memory while it has recipients left to name; after a
restart, one with a recipient named already waits an interval from the start).
A recipient never deferred (or not since the process started) is reported with
our own Status 4.0.0 and words; a deferred one with its last reply.

Recipients found too old at dispatch expire the same way (:meth:`Plan.expire`).
A bounce is an RFC 3464 DSN to the envelope sender, queued as a new message
with a null sender; a message with a null sender is never bounced (the
failure is logged).  A message none of whose recipients is pending, and with
no delivery job out, is done.

One bounce per message for every recipient that failed while any of its
delivery jobs were out (as Postfix sends one per queue pass), not one per
batch: a message of several domains has a job per domain, and their outcomes
come back in different batches.  A failure whose message still has other jobs
out after the batch's outcomes (the index's out count) is *held*: its update
record sets ``RCPT_BOUNCE_OWED`` (:mod:`mta.store`) and carries what the
bounce will say (``RcptMeta.owed``).  The batch in which the message has no
job out any more -- its last outcome, an expiry, a bulk bounce, its end found
at dispatch, its delete, or the first batch after a restart (no job is out
then; :meth:`Plan.settle`) -- queues one DSN for the held recipients and this
batch's failures, and writes updates clearing their flags, in the same group
commit as the DSN message: a crash before it leaves the flags, and the bounce
is sent after the restart; a crash after it leaves the DSN queued and the
flags cleared: never lost, never twice.  A message is never finished with a
bounce owed (its DONE goes with the DSN).  Success and delay notices are not
held: one per message and batch, each its own.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

from mta.bus import DELIVERED, FAILED, REQUEUED, FiredRule, Result
from mta.dsn import (RecipientFailure, build_dsn, new_message_id, notify_allows, orcpt_text,
                     xtext_decode)
from mta.feedback import classify
from mta.feedback import suppression as sup
from mta.obs import events as ev
from mta import controls as ctl
from mta.spool import schedule as sch
from mta.store import RCPT_BOUNCE_OWED, RCPT_DELAY_NOTIFIED, MessageMeta

log = logging.getLogger("mta.spool")

REQUEUE_MIN = 1.0        # seconds: a REQUEUED recipient waits at least this long
DEFER_MAX = 7 * 86400.0  # a rule's defer delay is bounded by this (and by max_age)
REQUEUE_MAX = 3600.0     # and at most this (the outcome's retry_after is bounded)
READ_RETRY = 60.0        # seconds: an expiry that could not read the record tries again
DELETED_TEXT = "deleted by the operator (mta queue delete)"
EXPIRED_STATUS = "4.4.7"  # an expiry found at dispatch: no reply, our own status and text
EXPIRED_TEXT = "message expired: too long in the queue"
# a delay notice of a recipient with no temporary reply to quote (never tried, or not
# since this process started): our own status and text
WAITING_STATUS = "4.0.0"
WAITING_TEXT = "not delivered yet: still waiting in the queue"
# QueueIndex.info fields
_BODY_LEN, _START, _OUT = 3, 5, 9


class Plan:
    """What one batch's outcomes and expiries change.

    *index*: the shard's queue (a QueueIndex); *read_meta(qid)*: a message's
    envelope (MessageMeta), read from its record -- the index keeps none;
    *policy*: its RetryPolicy; *read_body(qid)*: the message as spooled (for
    bounces); *new_qid()*: a queue id in this shard for a bounce; *hostname*:
    the reporting MTA named in bounces; *owed*: the bounces owed
    (:attr:`mta.store.Store.owed`: qid -> {recipient index: report}), read only;
    *sign(message)*: the notice with its DKIM-Signature field(s) (None: unsigned).
    The index is only read here, but for the last temporary replies (set at a
    deferral, as before a commit).
    """

    def __init__(self, index, read_meta, policy: sch.RetryPolicy, read_body, new_qid,
                 hostname: str, bounce_domains: frozenset = frozenset(),
                 owed: dict | None = None, noticed: dict | None = None,
                 started: float = 0.0, sign=None):
        self.index = index
        self.sign = sign
        self.owed = {} if owed is None else owed
        # qid -> when its last delay notice went (Shard.delay_noticed: kept only while it
        # has recipients a later one could name), read here but for entries over the
        # interval; *started*: when the shard started (an earlier notice's time is lost)
        self.noticed = {} if noticed is None else noticed
        self.started = started
        self._notice_ok: dict[str, bool] = {}   # qid -> a delay notice may go in this batch
        self.notice_more: list[str] = []        # qids noticed with recipients left to name
        # feedback.bounce_domains (lower case): a return path there is this node's own
        self.bounce_domains = bounce_domains
        self._read_meta = read_meta
        self._metas: dict[str, MessageMeta] = {}    # read once per batch
        self.policy = policy
        self.read_body = read_body
        self.new_qid = new_qid
        self.hostname = hostname
        self.updates: dict[str, list] = {}     # qid -> [[idx, state, attempts, due], ...]
        self.states: dict[str, list[int]] = {}  # qid -> states after this batch
        self.failures: dict[str, list] = {}    # qid -> [(idx, RecipientFailure), ...] failed
        self.owe: dict[str, list] = {}         # qid -> [[idx, report...], ...]: held (RcptMeta)
        self.settling: list[str] = []          # qids whose owed bounce is looked at (settle)
        # qids whose owed bounce could not be queued (their record unreadable): not to be
        # finished in this batch (the caller leaves out of its DONE those it decided on)
        self.unsettled: list[str] = []
        self.events: list[dict] = []
        self.deleted_qids: set[str] = set()     # (deleted in this batch: events once)
        # deleted in this batch with recipients in jobs still out (Plan.deleted)
        self.deleted_out: dict[str, DeletedOut] = {}
        self.reschedule: list[tuple[float, str]] = []   # (due, qid)
        self.bounces: list = []                # (MessageMeta, DSN bytes)
        self.done: list[str] = []
        self.returned: list[str] = []          # qids whose jobs came back in this batch
        self.requeues: dict[str, list] = {}    # qid -> [(idx, due), ...]: REQUEUED, not written
        self.successes: dict[str, list] = {}   # qid -> [RecipientFailure, ...]: "relayed"
        self.delays: dict[str, list] = {}      # qid -> [RecipientFailure, ...]: delay notice
        self.look: dict[str, float] = {}       # qid -> when the expiry sweep looks again
        # (recipient, description): failed as invalid recipients, for the suppression list
        self.suppress: list[tuple[str, str]] = []
        # recipients ended by the spool itself, not by a delivery outcome (counted for
        # mta_spool_recipients_ended_total once the batch is written)
        self.expired = 0
        self.operator_bounced = 0

    def _state(self, qid):
        st = self.states.get(qid)
        if st is None:
            st = self.states[qid] = self.index.progress(qid)[0]
        return st

    def known(self, qid: str, meta: MessageMeta) -> None:
        """*meta*: the envelope of *qid* as read from its record (by the dispatch of the
        job whose outcome this is), so that it is not read again."""
        self._metas.setdefault(qid, meta)

    def _lookup(self, qid: str) -> tuple | None:
        """(index info, envelope) of *qid*; None if it is not queued, or (logged) when its
        record cannot be read: the message is then looked at again later, like one whose
        outcome was not recorded."""
        info = self.index.info(qid)
        if info is None:
            return None
        m = self._metas.get(qid)
        if m is None:
            try:
                m = self._metas[qid] = self._read_meta(qid)
            except OSError as exc:
                log.error("%s: cannot read the message: %s", qid, exc.strerror or exc)
                self.returned.append(qid)
                return None
        return info, m

    def outcome(self, qid: str, results: list[Result], now: float, source: str = "",
                source_ip: str = "", site: str = "", retry_after: float = 0.0,
                rule: FiredRule | None = None, outbound_tls: str = "") -> None:
        """Record what one delivery job did to its recipients.

        *source*, *source_ip*, *site*, *retry_after*, *rule*, *outbound_tls*:
        the DeliveryOutcome's fields (the egress source used, its address, the
        receiving site; how long REQUEUED recipients wait, and DEFERRED ones
        when a response rule's ``defer`` action set it; the job's first fired
        rule; whether the session used TLS, recorded in each recipient's event).
        A recipient's event names the rule its own reply fired (``Result.rule``,
        ``response_rule``); a result that carries a ``bounce_class`` (a rule's
        ``bounce`` action) keeps it, with the rule's name as ``bounce_rule``.
        """
        index = self.index
        got = self._lookup(qid)
        if got is None:
            return
        info, m = got
        self.returned.append(qid)
        st = self._state(qid)
        base = _outcome_base(qid, m, info[_BODY_LEN], now, source, source_ip, site,
                             outbound_tls)
        policy = self.policy
        start = info[_START]
        requeue_due = 0.0
        defer_due: dict[int, float] = {}   # attempts -> due: one draw of the jitter per job
        for r in results:
            idx = r.index
            if not 0 <= idx < len(st) or st[idx] != sch.PENDING:
                continue  # a repeated outcome (at-least-once): the first one counts
            if r.outcome == REQUEUED:
                if not policy.expired(start, now):
                    if not requeue_due:
                        # spread by the retry jitter, as a deferral is (never before the
                        # wait asked for); one due time for the job: one transaction again
                        requeue_due = now + policy.spread(
                            min(max(retry_after, REQUEUE_MIN), REQUEUE_MAX))
                    self.requeues.setdefault(qid, []).append((idx, requeue_due))
                    continue
                self.expire(qid, [idx], now)   # past max_age already: not tried again
                continue
            rc = index.recipient(qid, idx)
            attempts = rc[1] + 1
            event = dict(base, recipient=m.rcpts[idx], remote_host=r.host, remote_ip=r.ip,
                         response={"code": r.code, "enhanced": r.enhanced, "text": r.text},
                         attempt=attempts, time_in_queue=round(now - m.arrival, 3))
            if r.rule is not None:
                event["response_rule"] = _rule_field(r.rule)
            if r.outcome == DELIVERED:
                st[idx] = sch.DELIVERED
                self._update(qid, idx, sch.DELIVERED, attempts, 0.0)
                event["type"] = ev.DELIVERY
                if not r.dsn and notify_allows(_notify(m, idx), "SUCCESS"):
                    # RFC 3461 6.2.6: passed to a server that does not do DSN: "relayed"
                    self._notice(self.successes, qid, m, idx, RecipientFailure(
                        recipient=m.rcpts[idx], status="2.0.0", remote_host=r.host or None,
                        diagnostic=f"{r.code} {r.enhanced} {r.text}".strip(),
                        last_attempt=now, action="relayed"))
            elif r.outcome == FAILED:
                st[idx] = sch.FAILED
                self._update(qid, idx, sch.FAILED, attempts, 0.0)
                event["type"] = ev.BOUNCE
                self._bounce(qid, idx, r.code, r.enhanced, r.text, r.host, now, local=r.local)
            else:
                # a rule's defer action gives the delay (e.g. a short one for a
                # greylisting reply); otherwise the retry schedule does -- at the
                # latest the message's deadline: its last attempt is made then, and a
                # deferral of that one (or of any past the deadline) expires it
                # (recipients deferred together are due together -- one transaction
                # again -- so the jitter is drawn once per job and schedule step)
                deadline = policy.deadline(start)
                due = defer_due.get(attempts)
                if due is None:
                    due = defer_due[attempts] = min(
                        now + (policy.spread(min(retry_after, DEFER_MAX)) if retry_after > 0
                               else policy.delay(attempts)), deadline)
                if now >= deadline:
                    st[idx] = sch.EXPIRED
                    self._update(qid, idx, sch.EXPIRED, attempts, 0.0)
                    self.expired += 1
                    event["type"] = ev.EXPIRATION
                    _log_expired(qid, m.rcpts[idx], attempts, r.code, r.enhanced, r.text)
                    self._bounce(qid, idx, r.code, r.enhanced, r.text, r.host, now,
                                 note=f"gave up after {attempts} attempt(s)", expired=True,
                                 local=r.local)
                else:
                    flags = rc[3]
                    if (policy.delay_warning and now - start >= policy.delay_warning
                            and not flags & RCPT_DELAY_NOTIFIED
                            and self._may_notice(qid, now)):
                        # once per recipient: the flag is written with this update
                        flags |= RCPT_DELAY_NOTIFIED
                        self._update(qid, idx, sch.PENDING, attempts, due, flags)
                        if notify_allows(_notify(m, idx), "DELAY"):
                            diag = f"{r.code} {r.enhanced} {r.text}".strip() if r.code \
                                else r.text
                            self._notice(self.delays, qid, m, idx, RecipientFailure(
                                recipient=m.rcpts[idx], status=_delay_status(r.enhanced),
                                remote_host=r.host or None, diagnostic=diag,
                                last_attempt=now, action="delayed",
                                retry_until=deadline, local=r.local))
                    else:
                        self._update(qid, idx, sch.PENDING, attempts, due)
                    event["type"] = ev.DELAY
                    event["next_attempt"] = round(due, 3)
            if r.outcome != DELIVERED:
                if r.bounce_class:       # decided by the response rule that fired
                    event["bounce_class"] = int(r.bounce_class) if \
                        r.bounce_class.isdigit() else r.bounce_class
                    event["bounce_rule"] = _bounce_rule(r, rule)
                else:
                    event["bounce_class"], event["bounce_rule"] = classify(
                        r.code, r.enhanced, r.text)
                if st[idx] == sch.FAILED and sup.adds_bounce_rule(event["bounce_class"]):
                    # the class the event reports decides (the operator's rules and a
                    # response rule's bounce_class included), not a second reading
                    self.suppress.append((m.rcpts[idx],
                                          sup.bounce_description(r.code, r.enhanced, r.text)))
                if st[idx] == sch.PENDING:   # deferred: what an expiry at dispatch quotes,
                    # and when (its Last-Attempt-Date, to the second as the field says it);
                    # interned by the index: recipients given the same reply in the same
                    # second share it
                    index.set_last(qid, idx, (r.code, r.enhanced, r.text, r.host, r.ip,
                                              event["bounce_class"], event["bounce_rule"],
                                              int(now)))
            self.events.append(event)

    def outcome_of_deleted(self, qid: str, gone: "DeletedOut", results: list[Result],
                           now: float, source: str = "", source_ip: str = "", site: str = "",
                           rule: FiredRule | None = None, outbound_tls: str = "") -> None:
        """The outcome of a job that was out when the operator deleted its message.

        Its recipients got no event at the delete (they could still be delivered):
        this is their last word.  Delivered: a delivery event.  Failed: a bounce
        event with the server's reply and class (and the suppression a hard bounce
        adds), no DSN.  Anything else (deferred, requeued): the delete's class-25
        bounce event.  Each recipient once; *gone* forgets those answered."""
        m, size, attempts = gone.meta, gone.size, gone.attempts
        base = _outcome_base(qid, m, size, now, source, source_ip, site, outbound_tls)
        for r in results:
            idx = r.index
            tried = attempts.pop(idx, None)
            if tried is None:
                continue        # not out at the delete, or answered already
            if r.outcome == DELIVERED or r.outcome == FAILED:
                event = dict(base, recipient=m.rcpts[idx], remote_host=r.host,
                             remote_ip=r.ip, attempt=tried + 1,
                             response={"code": r.code, "enhanced": r.enhanced,
                                       "text": r.text},
                             time_in_queue=round(now - m.arrival, 3))
                if r.rule is not None:
                    event["response_rule"] = _rule_field(r.rule)
                if r.outcome == DELIVERED:
                    event["type"] = ev.DELIVERY
                else:
                    event["type"] = ev.BOUNCE
                    if r.bounce_class:
                        event["bounce_class"] = int(r.bounce_class) if \
                            r.bounce_class.isdigit() else r.bounce_class
                        event["bounce_rule"] = _bounce_rule(r, rule)
                    else:
                        event["bounce_class"], event["bounce_rule"] = classify(
                            r.code, r.enhanced, r.text)
                    if sup.adds_bounce_rule(event["bounce_class"]):
                        self.suppress.append((m.rcpts[idx], sup.bounce_description(
                            r.code, r.enhanced, r.text)))
                self.events.append(event)
            else:
                self._admin_event(qid, idx, size, m, tried, now, DELETED_TEXT)

    def expire(self, qid: str, idxs: list[int], now: float) -> None:
        """Recipients *idxs* of *qid* are too old to try again: expire and bounce them."""
        index = self.index
        got = self._lookup(qid)
        if got is None:
            if index.info(qid) is not None:
                # its record could not be read (logged): its deadline was taken, so it
                # is filed again, or it would stay queued past max_age for good
                index.set_deadline(qid, now + READ_RETRY)
            return
        info, m = got
        st = self._state(qid)
        bounce_class, bounce_rule = classify(0, EXPIRED_STATUS, EXPIRED_TEXT)
        for idx in idxs:
            if st[idx] != sch.PENDING:
                continue
            st[idx] = sch.EXPIRED
            _, attempts, _, _, _, r = index.recipient(qid, idx)
            self._update(qid, idx, sch.EXPIRED, attempts, 0.0)
            self.expired += 1
            event = {"type": ev.EXPIRATION, "timestamp": now, "queue_id": qid,
                     "message_id": m.params.get("message_id", ""), **ev.carried(m.params),
                     "arrival": m.arrival, "size": info[_BODY_LEN], "client": m.client,
                     "sender": m.sender, "recipient": m.rcpts[idx], "attempt": attempts,
                     "time_in_queue": round(now - m.arrival, 3),
                     "bounce_class": bounce_class, "bounce_rule": bounce_rule}
            if r is None:
                # never tried, or tried before this process started: when is not known
                # (the record keeps no time), so no Last-Attempt-Date is made up
                _log_expired(qid, m.rcpts[idx], attempts, 0, "", "")
                self.events.append(event)
                self._bounce(qid, idx, 0, EXPIRED_STATUS, EXPIRED_TEXT, "", None,
                             expired=True)
                continue
            # Deferred before (since this process started): the expiry quotes that
            # reply and carries its class, as one decided by the deferral itself does.
            code, enhanced, text, host, ip, r_class, r_rule, tried_at = r
            _log_expired(qid, m.rcpts[idx], attempts, code, enhanced, text)
            event.update(response={"code": code, "enhanced": enhanced, "text": text},
                         remote_host=host, remote_ip=ip, bounce_class=r_class,
                         bounce_rule=r_rule)
            self.events.append(event)
            self._bounce(qid, idx, code, enhanced, text, host, tried_at,
                         note=f"gave up after {attempts} attempt(s)", expired=True)
        self.returned.append(qid)

    def remind(self, qid: str, now: float) -> None:
        """Delay notices by time in queue: the recipients of *qid* still pending and not
        named in one yet, its message having waited ``delay_warning_time`` -- deferred,
        handed back (REQUEUED), held by a suspension or never tried alike (those this
        batch's outcomes decided on are theirs; one with a job out waits for its outcome).
        Same rules as at a deferral: the flag written, NOTIFY obeyed, one notice per
        message and interval.  :attr:`look` says when the shard's expiry sweep looks at
        *qid* again."""
        index, policy = self.index, self.policy
        info = index.info(qid)
        if info is None:
            return
        if qid in self.deleted_qids:
            # (deleted in this batch: its recipients out are not "delayed"; filed again
            # should the batch not be written)
            self.look[qid] = now
            return
        start = info[_START]
        deadline = policy.deadline(start)
        warn = policy.delay_warning
        if not warn or now < start + warn:
            self.look[qid] = start + policy.first_look()    # (off since, or not yet)
            return
        if info[_OUT]:
            # a job of it is out: its recipients may be delivered in a moment, and a
            # deferral names them (that outcome decides); looked at again after it
            self.look[qid] = min(now + 1.0, deadline)
            return
        st = self._state(qid)
        flags = index.progress(qid)[3]
        # (recipient -> named by this batch's outcomes; those they decided on are theirs)
        decided = {u[0]: len(u) > 4 and u[4] & RCPT_DELAY_NOTIFIED
                   for u in self.updates.get(qid, ())}
        left = [i for i, s in enumerate(st) if s == sch.PENDING
                and not flags[i] & RCPT_DELAY_NOTIFIED and not decided.get(i)]
        if not left:
            self.look[qid] = deadline
            return
        waiting = [i for i in left if i not in decided]
        if not waiting or not self._may_notice(qid, now):
            # (one deferred in this batch and not named: within the interval of the
            # message's last notice; looked at again when it is over)
            last = self.noticed.get(qid, self.started)
            self.look[qid] = min(max(last + warn, now + 1.0), deadline)
            return
        got = self._lookup(qid)
        if got is None:
            self.look[qid] = min(now + READ_RETRY, deadline)
            return
        m = got[1]
        for idx in waiting:
            _, attempts, due, fl, _, last = index.recipient(qid, idx)
            # once per recipient: the flag is written with this update
            self._update(qid, idx, sch.PENDING, attempts, due, fl | RCPT_DELAY_NOTIFIED)
            if not notify_allows(_notify(m, idx), "DELAY"):
                continue
            if last is None:
                r = RecipientFailure(recipient=m.rcpts[idx], status=WAITING_STATUS,
                                     remote_host=None, diagnostic=WAITING_TEXT,
                                     last_attempt=None, action="delayed",
                                     retry_until=deadline, local=True)
            else:       # deferred before (since this process started): that reply
                code, enhanced, text, host, _, _, _, tried_at = last
                r = RecipientFailure(recipient=m.rcpts[idx], status=_delay_status(enhanced),
                                     remote_host=host or None,
                                     diagnostic=f"{code} {enhanced} {text}".strip() if code
                                     else text,
                                     last_attempt=tried_at, action="delayed",
                                     retry_until=deadline)
            self._notice(self.delays, qid, m, idx, r)
        # (recipients this batch's outcomes left unnamed: the next notice, an interval on)
        self.look[qid] = min(now + warn, deadline)

    def admin_bounce(self, qid: str, idxs: list[int], now: float, text: str,
                     dsn: bool) -> int:
        """The operator bounces recipients *idxs* of *qid* (a bulk bounce,
        :mod:`mta.controls`): failed, a class-25 bounce event each, and a DSN
        to the sender when *dsn*.  How many were pending; None when its record could not
        be read (logged): the caller takes it again later."""
        index = self.index
        got = self._lookup(qid)
        if got is None:
            return None if index.info(qid) is not None else 0
        info, m = got
        st = self._state(qid)
        n = 0
        for idx in idxs:
            if not 0 <= idx < len(st) or st[idx] != sch.PENDING:
                continue
            st[idx] = sch.FAILED
            _, attempts, _, _, _, last = index.recipient(qid, idx)
            self._update(qid, idx, sch.FAILED, attempts, 0.0)
            self._admin_event(qid, idx, info[_BODY_LEN], m, attempts, now, text)
            if dsn:
                # (its last attempt's time if it was deferred since this process started)
                self._bounce(qid, idx, ctl.BOUNCE_CODE, ctl.BOUNCE_STATUS, text, "",
                             last[7] if last is not None else None)
            n += 1
        if n:
            self.returned.append(qid)
            self.operator_bounced += n
        return n

    def deleted(self, qid: str, now: float, out=()) -> None:
        """The operator deletes *qid* (``mta queue delete``): a class-25 bounce event for
        each recipient still pending, no DSN, so that the event stream and the webhooks
        see every message end (Postfix logs "removed").  The caller writes its DONE; a
        record that cannot be read (logged) is deleted without events.  Recipients
        *out* (in a delivery job still out) get none now: they may be delivered yet.
        Their outcome says what happened: in this batch, as for any message; in a
        later one, from what is kept of them in ``deleted_out`` (the caller keeps it
        once the batch is written; :meth:`outcome_of_deleted`)."""
        if qid in self.deleted_qids:
            return
        self.deleted_qids.add(qid)
        got = self._lookup(qid)
        if got is None:
            return
        info, m = got
        st = self._state(qid)
        index = self.index
        kept: dict[int, int] = {}
        for idx in range(len(st)):
            if st[idx] != sch.PENDING:
                continue
            if idx in out:
                kept[idx] = index.recipient(qid, idx)[1]
                continue
            # (ended here: an outcome, expiry or bulk bounce later in the same batch
            # -- the deletes are taken first -- finds it no longer pending; nothing
            # is written for it, its message's DONE is)
            st[idx] = sch.FAILED
            self._admin_event(qid, idx, info[_BODY_LEN], m, index.recipient(qid, idx)[1],
                              now, DELETED_TEXT)
        if kept:
            self.deleted_out[qid] = DeletedOut(m, info[_BODY_LEN], kept)

    def _admin_event(self, qid, idx, size, m, attempts, now, text) -> None:
        self.events.append({"type": ev.BOUNCE, "timestamp": now, "queue_id": qid,
                            "message_id": m.params.get("message_id", ""),
                            **ev.carried(m.params),
                            "arrival": m.arrival, "size": size,
                            "client": m.client,
                            "sender": m.sender, "recipient": m.rcpts[idx],
                            "attempt": attempts,
                            "time_in_queue": round(now - m.arrival, 3),
                            "response": {"code": ctl.BOUNCE_CODE,
                                         "enhanced": ctl.BOUNCE_STATUS, "text": text},
                            "bounce_class": ctl.BOUNCE_CLASS,
                            "bounce_rule": ctl.BOUNCE_RULE})

    def _may_notice(self, qid: str, now: float) -> bool:
        """A delay notice of *qid* may go in this batch: none went in the last
        ``delay_warning_time`` (one per message and interval, however many batches
        its deferrals come in; the recipients it could not name wait for the next)."""
        ok = self._notice_ok.get(qid)
        if ok is None:
            last = self.noticed.get(qid)
            if last is None and any(f & RCPT_DELAY_NOTIFIED for f in self.index.progress(qid)[3]):
                last = self.started     # (one went before this process started, or not long)
            ok = last is None or now - last >= self.policy.delay_warning
            if ok and qid in self.noticed:
                del self.noticed[qid]   # (over: this batch's notice decides again)
            self._notice_ok[qid] = ok
        return ok

    def _update(self, qid, idx, state, attempts, due, flags=None) -> None:
        u = [idx, state, attempts, due]
        if flags is not None:
            u.append(flags)
        self.updates.setdefault(qid, []).append(u)

    def _notice(self, into: dict, qid: str, m: MessageMeta, idx: int,
                r: RecipientFailure) -> None:
        """Add *r* (for recipient *idx*) to a notice of *qid*, with its ORCPT if it had one."""
        _orcpt(m, idx, r)
        into.setdefault(qid, []).append(r)

    def _bounce(self, qid, idx, code, enh, text, host, tried_at, note="",
                expired=False, local=False) -> None:
        """Add recipient *idx* to the bounce of *qid*; *tried_at*: the time of its last
        delivery attempt, its Last-Attempt-Date (None: never tried, or not known -- the
        report has none); *expired*: it is given up for its age (delivery.max_age), not
        failed by a reply; *local*: *host* said none of *text* (Result.local)."""
        m = self._metas[qid]
        rcpt = m.rcpts[idx]
        if not notify_allows(_notify(m, idx), "FAILURE"):
            log.info("%s: <%s> failed; no bounce: NOTIFY=%s", qid, rcpt, _notify(m, idx))
            return
        diag = f"{code} {enh} {text}".strip() if code else text
        if note:
            # Our words are not the server's: not inside its reply (an "smtp;"
            # Diagnostic-Code quotes what the server said, RFC 3464 2.3.6).
            diag = f"{note}; last reply: {diag}"
        if expired:
            # RFC 3463: X.4.7 "delivery time expired", a persistent transient failure
            # (class 4: a temporary condition lasted until we gave up).  Not the last
            # reply's code made permanent: "450 4.1.1" (a recipient check that could not
            # be made) is no "5.1.1 bad mailbox"; the diagnostic quotes that reply.
            status = EXPIRED_STATUS
        else:
            status = enh if enh and enh[0] in "45" else ("5.0.0" if code >= 500 or not code
                                                         else "4.0.0")
            if status.startswith("4"):
                status = "5" + status[1:]  # a 4xx a response rule bounced: permanent
        r = RecipientFailure(recipient=rcpt, status=status, remote_host=host or None,
                             diagnostic=diag, last_attempt=tried_at, local=local)
        _orcpt(m, idx, r)
        self.failures.setdefault(qid, []).append((idx, r))

    def settle(self, qid: str) -> None:
        """Look at *qid*'s owed bounce in this batch though no outcome of it came: the
        first batch after a restart (no job is out), or its end found at dispatch."""
        if qid in self.owed:
            self.settling.append(qid)

    def _bounceable(self, m: MessageMeta) -> bool:
        """A bounce of *m* would be sent (:meth:`_report` says why not when not)."""
        return bool(m.sender) and \
            m.sender.rpartition("@")[2].lower() not in self.bounce_domains

    def _bounces(self, now: float) -> None:
        """Hold this batch's failures whose message still has jobs out; queue one bounce
        for each message that has none (or is deleted) with the failures held before."""
        index, owed, failures = self.index, self.owed, self.failures
        qids = dict.fromkeys(failures)
        if owed:
            for qid in (*self.returned, *self.deleted_qids, *self.settling):
                if qid in owed:
                    qids[qid] = None
        for qid in qids:
            info = index.info(qid)
            if info is None:
                continue
            new = failures.get(qid, ())
            if qid in self.deleted_qids or not info[_OUT]:
                self._release(qid, new, now)
            elif new:
                m = self._metas[qid]
                if self._bounceable(m):
                    self._hold(qid, new, info[_OUT])
                else:
                    self._report("bounce", qid, [r for _, r in new], now)   # (logged)

    def _hold(self, qid: str, new: list, out: int) -> None:
        """Recipients of *new* ((idx, RecipientFailure)) failed while *out* other jobs
        of *qid* are out: their updates set RCPT_BOUNCE_OWED and carry the report."""
        ups = {u[0]: u for u in self.updates.get(qid, ())}
        notes = self.owe.setdefault(qid, [])
        for idx, r in new:
            u = ups[idx]        # (every failure is an update of this batch)
            if len(u) > 4:
                u[4] |= RCPT_BOUNCE_OWED
            else:                # (the flags it had, e.g. a delay notice sent, stay)
                u.append(self.index.recipient(qid, idx)[3] | RCPT_BOUNCE_OWED)
            note = [idx, r.status, r.remote_host or "", r.diagnostic, r.last_attempt]
            if r.local:
                note.append(True)   # (only then: a report of a real reply keeps 5 items)
            notes.append(note)
        log.info("%s: bounce for %d recipient(s) held: %d delivery job(s) of the message "
                 "still out", qid, len(new), out)

    def _release(self, qid: str, new, now: float) -> None:
        """Queue *qid*'s one bounce: the recipients whose bounce was owed, then *new*; the
        owed ones' flags are cleared in the same batch (unless the message ends in it)."""
        held = self.owed.get(qid)
        fails = []
        if held:
            if qid not in self._metas and self._lookup(qid) is None:
                # (its record cannot be read, logged: the bounce stays owed, and the
                # message is not finished without it -- but for an operator's delete)
                if qid not in self.deleted_qids:
                    self.unsettled.append(qid)
                    if qid in self.done:
                        self.done.remove(qid)
                return
            m = self._metas[qid]
            index = self.index
            ending = qid in self.deleted_qids or qid in self.done
            for idx, (status, host, diag, last, *local) in sorted(held.items()):
                r = RecipientFailure(recipient=m.rcpts[idx], status=status,
                                     remote_host=host or None, diagnostic=diag,
                                     last_attempt=last, local=bool(local))
                _orcpt(m, idx, r)
                fails.append(r)
                if not ending:
                    st, attempts, due, flags = index.recipient(qid, idx)[:4]
                    self._update(qid, idx, st, attempts, due, flags & ~RCPT_BOUNCE_OWED)
            self.returned.append(qid)   # (a batch not written: looked at again)
        fails += [r for _, r in new]
        if fails:
            self._report("bounce", qid, fails, now)

    def finish(self, now: float) -> None:
        """Turn recipient states into bounces, finished messages and reschedules."""
        index = self.index
        for qid in dict.fromkeys(self.returned):
            info = index.info(qid)
            if info is None or qid in self.deleted_qids:
                continue            # (a deleted one: the caller writes its DONE)
            st = self.states.get(qid) or index.progress(qid)[0]
            if sch.PENDING not in st:
                if not info[_OUT]:
                    self.done.append(qid)
                continue
            new_due = {u[0]: u[3] for u in self.updates.get(qid, ())}
            new_due.update(self.requeues.get(qid, ()))
            due = index.progress(qid)[2]
            dues = [new_due.get(i, due[i]) for i in range(len(st)) if st[i] == sch.PENDING]
            self.reschedule.append((min(dues) if dues else now, qid))
        self._bounces(now)
        for kind, notices in (("success notice", self.successes),
                              ("delay notice", self.delays)):
            for qid, fails in notices.items():
                self._report(kind, qid, fails, now)
        for qid in self.delays:
            # recipients still pending that this notice did not name (in another job,
            # not yet deferred): the message's next notice waits an interval
            st = self.states.get(qid)
            if st is None or sch.PENDING not in st:
                continue
            flags = self.index.progress(qid)[3]
            named = {u[0] for u in self.updates.get(qid, ())
                     if len(u) > 4 and u[4] & RCPT_DELAY_NOTIFIED}
            if any(s == sch.PENDING and i not in named and not flags[i] & RCPT_DELAY_NOTIFIED
                   for i, s in enumerate(st)):
                self.notice_more.append(qid)

    def _report(self, kind: str, qid: str, fails: list, now: float) -> None:
        """Queue one DSN (*kind*: bounce, success notice, delay notice) for *qid*."""
        m = self._metas[qid]
        if not m.sender:
            what = "bouncing a failure" if kind == "bounce" else f"sending a {kind}"
            log.info("%s: not %s of a message with a null sender (recipients: %s)",
                     qid, what, ", ".join(f.recipient for f in fails))
            return
        if m.sender.rpartition("@")[2].lower() in self.bounce_domains:
            # The return path is one of this node's bounce domains (an HTTP transmission's
            # return_path, typically): a DSN sent there would come back here as a report,
            # an out_of_band event repeating the bounce event that already says it all
            # (SparkPost sends none either).  One such DSN per failed recipient of a
            # large send would also double its work.
            log.info("%s: no %s to <%s>, a bounce domain of this node: the events report "
                     "it (recipients: %s)", qid, kind, m.sender,
                     ", ".join(f.recipient for f in fails))
            return
        message_id = new_message_id(qid, self.hostname, now)
        envid = m.params.get("ENVID")
        try:
            dsn = build_dsn(
                original=self.read_body(qid), envelope_sender=m.sender, failed=fails,
                reporting_mta=self.hostname, arrival_time=m.arrival, queue_id=qid,
                message_id=message_id, delayed=kind == "delay notice",
                envid=xtext_decode(envid) if isinstance(envid, str) else None,
                ret_full=m.params.get("RET") == "FULL")
        except Exception:
            log.exception("%s: could not build the %s", qid, kind)
            return
        if self.sign is not None:
            try:
                dsn = self.sign(dsn)
            except Exception:
                log.exception("%s: DKIM signing of the %s failed; it is queued unsigned",
                              qid, kind)
        bqid = self.new_qid()
        self.bounces.append((MessageMeta(bqid, "", [m.sender], now,
                                         {"message_id": message_id}, f"{kind} of {qid}"),
                             dsn))
        log.info("%s: %s %s to <%s> for %d recipient(s)", qid, kind, bqid, m.sender,
                 len(fails))

    def abandon(self) -> list[str]:
        """The batch was not recorded: the messages whose outcomes must be tried again."""
        return list(dict.fromkeys(self.returned))


class DeletedOut(NamedTuple):
    """What is kept of a deleted message whose recipients were in delivery jobs still
    out: enough for their outcome's events (:meth:`Plan.outcome_of_deleted`)."""

    meta: MessageMeta
    size: int
    attempts: dict          # recipient index -> attempts before the job; popped as answered


def _outcome_base(qid: str, m: MessageMeta, size: int, now: float, source: str,
                  source_ip: str, site: str, outbound_tls: str) -> dict:
    """The fields every recipient's event of one job's outcome shares."""
    base = {"timestamp": now, "queue_id": qid,
            "message_id": m.params.get("message_id", ""), "sender": m.sender,
            "arrival": m.arrival, "size": size, "client": m.client,
            **ev.carried(m.params)}
    if source:
        base["source"] = source
    if source_ip:
        base["sending_ip"] = source_ip
    if site:
        base["site"] = site
    if outbound_tls:
        base["outbound_tls"] = outbound_tls
    return base


def _rule_field(rule: FiredRule) -> dict:
    """An event's ``response_rule``: the rule a recipient's own reply fired."""
    return {"name": rule.name, "action": rule.action, "scope": rule.scope,
            "stage": rule.stage, "until": rule.until}


def _log_expired(qid: str, rcpt: str, attempts: int, code: int, enh: str, text: str) -> None:
    """The diagnostic log's line for a recipient given up for its age, as the delivery
    processes' for an attempt (the last of which they logged "status=deferred")."""
    reply = " (%s)" % " ".join(filter(None, (str(code), enh, text))) if code else ""
    log.info("%s: to=<%s> status=expired, gave up after %d attempt(s)%s", qid, rcpt,
             attempts, reply)


def _bounce_rule(r: Result, rule: FiredRule | None) -> str:
    """The ``bounce_rule`` of a result whose class a rule's bounce action set: that rule
    (the job's *rule* from a delivery process of the version before, which names none
    per result)."""
    rule = r.rule or rule
    return rule.name if rule is not None else "response_rule"


def _param(m: MessageMeta, key: str, idx: int) -> str:
    """Recipient *idx*'s DSN parameter *key* (NOTIFY, ORCPT) as received; "" if none."""
    values = m.params.get(key)
    if type(values) is list and idx < len(values) and type(values[idx]) is str:
        return values[idx]
    return ""


def _orcpt(m: MessageMeta, idx: int, r: RecipientFailure) -> None:
    """Recipient *idx*'s ORCPT, if it had one, into its report *r*."""
    orcpt = _param(m, "ORCPT", idx)
    if orcpt:
        r.original_recipient = orcpt_text(orcpt)


def _notify(m: MessageMeta, idx: int) -> str:
    return _param(m, "NOTIFY", idx)


def _delay_status(enhanced: str) -> str:
    """The Status of a deferred recipient in a delay notice, from its reply's enhanced
    code: always 4.x.x, as its Action ("delayed") says -- a 5xx that a response rule's
    defer action kept in the queue too (the server's reply is quoted as it was in
    Diagnostic-Code); WAITING_STATUS without one."""
    if enhanced and enhanced[0] in "45":
        return "4" + enhanced[1:]
    return WAITING_STATUS
