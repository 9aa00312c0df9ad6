"""spool[n]: the writer process of one spool shard, and the owner of its messages' state.

Owns every message whose queue id maps to shard n.  It alone writes the
shard's segment files (see :mod:`mta.spool.store`) and decides what happens to
each recipient next (see :mod:`mta.spool.schedule`).

Reads:   SPOOL_MESSAGE_COMMIT from acceptors; queue requests from the CLI
         (SPOOL_QUEUE_SUMMARY / _LIST / _FLUSH, SPOOL_MESSAGE_SHOW / _DELETE)
         on the ROUTER socket ``spool-<n>``; DELIVERY_OUTCOME from delivery
         processes.
Writes:  segment files under ``<spool>/shard-<n>/``; replies; DELIVERY_MESSAGE_READY
         to the delivery process of each recipient domain; the event log.
Config:  [spool] (all keys), [delivery] retry_schedule, retry_jitter, max_age,
         time_scale, max_in_flight, *_timeout; [server] hostname, event_log.

Hot path (group commit): wait for the sockets; take every request and outcome
that is waiting (up to the batch bounds); append all their records — new
messages, recipient updates, bounces, DONE markers — with one writev; one
fdatasync; then acknowledge, log the events, and schedule.  Requests that
arrive during the fsync are the next batch.  A message is acknowledged only
after the fsync that covers it has returned; a recipient counts as delivered,
failed or expired only once that record is durable.

Delivery: due recipients are grouped by domain (one SMTP transaction per
message and domain) and sent to the delivery process for that domain, at most
``delivery.max_in_flight`` jobs at once.  Outcomes: delivered → done;
failed (5xx, null MX, NXDOMAIN) → bounce; deferred → next attempt after the
retry schedule, or expired and bounced when that would pass ``max_age``.
Bounces (RFC 3464) are new messages in this shard with a null sender; a
message with a null sender is never bounced (the failure is logged).  A job
whose outcome never comes back is dispatched again: at once when its delivery
process disconnects (it died; see ``watch_deliveries``), else after a bounded
wait: at-least-once.

Failure: a write or fsync error answers the whole batch STATUS_STORAGE (the
acceptor says 451 4.3.0) and leaves the outcomes unrecorded (the recipients are
tried again); the next batch starts a new segment, so the shard heals by itself
when the disk does.  SIGTERM: finish the batch in hand, close, exit 0.
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import re
import signal
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from mta import bus, proc
from mta.dsn import RecipientFailure, build_dsn
from mta.obs import events as ev
from mta.queueid import domain_shard, new_qid_for_shard
from mta.spool import schedule as sch
from mta.store import MessageMeta, Store

log = logging.getLogger("mta.spool")

POLL_INTERVAL_MS = 200          # longest sleep between housekeeping checks
RECLAIM_INTERVAL = 1.0          # seconds between reclamation passes
RECLAIM_MAX_COPY = 2000         # messages copied forward per pass (bounds the pause)
LIST_LIMIT_MAX = 1_000_000
DISPATCH_BATCH = 500            # due messages looked at per dispatch pass
BUSY_RETRY = 1.0                # seconds before retrying a job the bus would not take
MAX_HEADER_SCAN = 64 * 1024     # octets searched for Message-ID
GC_YOUNG_THRESHOLD = 10_000     # allocations between young GC collections (CPython: 700)

# Plain ints: pyzmq's enum members cost an object construction per use.
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
# What a socket in the poll set carries (Shard.poll_kind).
_REQUESTS, _OUTCOMES, _CONNECTIONS = 0, 1, 2


def shard_dir(spool_dir: str, shard: int) -> str:
    return os.path.join(spool_dir, f"shard-{shard:02d}")


_MESSAGE_ID = re.compile(rb"\nmessage-id:", re.IGNORECASE)


def _message_id(body: bytes) -> str:
    """The Message-ID header's value, or '' (searched in the header block only)."""
    end = body.find(b"\r\n\r\n", 0, MAX_HEADER_SCAN)
    if end < 0:
        end = MAX_HEADER_SCAN
    # Searched in place, ASCII case-insensitively: no lower-cased copy of the header.
    found = _MESSAGE_ID.search(body, 0, end)
    if found is None:
        return ""
    i = found.end()
    j = body.find(b"\r\n", i, end)
    return body[i:j if j >= 0 else end].strip().decode("utf-8", "replace")[:998]


def _settle_gc() -> None:
    """Collect cyclic garbage, then exempt everything that survived from later collections.

    The queue is tens of thousands of long-lived objects (per message an Entry
    with its envelope, lists and dicts).  Left in the collector's oldest
    generation, every full collection walks all of them, and a growing queue
    triggers one per 25 % of growth: the collector was ~5 % of the shard's
    CPU under load, the more the longer the queue.  Frozen objects are still
    freed by reference counting when their message is finished; the queue's
    objects form no reference cycles, so freezing them loses nothing.  Run
    once a second, each collection here walks only that second's survivors.
    """
    gc.collect()
    gc.freeze()


def _domain(addr: str) -> str:
    return addr.rpartition("@")[2].lower()


class Shard:
    """The request loop of one shard."""

    def __init__(self, settings, shard: int):
        cfg = settings.config.spool
        self.settings = settings
        self.cfg = cfg
        self.dcfg = settings.config.delivery
        self.shard = shard
        self.store = Store(shard_dir(settings.spool_dir, shard), cfg.segment_size, cfg.fsync,
                           preallocate=cfg.preallocate, reserve=cfg.min_free_bytes)
        self.endpoint = settings.endpoint(f"spool-{shard}")
        self.policy = sch.RetryPolicy(self.dcfg)
        self.due = sch.DueQueue()
        self.jobs: dict[int, tuple] = {}      # req -> (qid, [indexes], sent_at, delivery)
        self.reqs = itertools.count(1)
        self.expire_work: list[tuple[str, list[int]]] = []
        self.stopping = False
        self.healthy = True
        self.last_error = ""
        d = self.dcfg
        # An outcome later than this means the delivery process is gone.
        self.job_timeout = d.connect_timeout + 2 * d.command_timeout + d.data_timeout + 60.0

    def open(self, ctx: zmq.Context) -> None:
        stats = self.store.recover()
        log.info("recovered queue: messages=%d segments=%d records=%d skipped_bytes=%d "
                 "seconds=%s", stats["messages"], stats["segments"], stats["records"],
                 stats["skipped_bytes"], stats["seconds"])
        self.finished_at_start = []
        for qid, e in self.store.entries.items():
            dues = [e.due[i] for i, s in enumerate(e.state) if s == sch.PENDING]
            if dues:
                self.due.push(min(dues), qid)
            else:
                self.finished_at_start.append(qid)
        # Fewer young collections: each walks the batch's objects still alive,
        # and a batch allocates thousands (measured: 1 % fewer instructions).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        _settle_gc()  # the recovered queue is never walked by the collector
        self.events = ev.EventLog(self.settings.event_log)
        self.server = bus.Server(ctx, self.endpoint, self.cfg.queue_high_water)
        self.deliveries = []
        self.monitors = []     # connection events of each delivery socket
        self.up = []           # delivery[d] is connected
        self.parked = []       # qids due while delivery[d] was away (a dict as ordered set)
        for d in range(self.settings.deliveries):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, self.cfg.queue_high_water)
            s.setsockopt(zmq.RCVHWM, self.cfg.queue_high_water)
            s.setsockopt(zmq.IMMEDIATE, 1)  # no jobs queued towards a dead process
            self.monitors.append(s.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED))
            s.connect(self.settings.endpoint(f"delivery-{d}"))
            self.deliveries.append(s)
            self.up.append(False)
            self.parked.append({})

    def run(self) -> None:
        self.start()
        if self.finished_at_start:
            self.batch(extra_done=self.finished_at_start)
        while not self.stopping:
            self.step()
        # Anything that arrived but was not taken is not acknowledged: the
        # acceptors time out and answer 451, so nothing is lost.
        self.events.close()
        self.store.close()
        self.server.close()
        for s in self.deliveries + self.monitors:
            s.close(0)

    def start(self) -> None:
        """Prepare the poll set for :meth:`step` (after :meth:`open`)."""
        self.poll_items = [(s, _POLLIN) for s in [self.server.sock, *self.deliveries,
                                                  *self.monitors]]
        # What a ready socket is: the poll result says which sockets have work,
        # so a turn looks only at those.  A look at an idle ZeroMQ socket is not
        # free: a recv that finds nothing raises zmq.Again (an exception built
        # in Python) and, like ZMQ_EVENTS, makes a system call.
        self.poll_kind = {self.server.sock: _REQUESTS}
        self.poll_kind.update((s, _OUTCOMES) for s in self.deliveries)
        self.poll_kind.update((s, _CONNECTIONS) for s in self.monitors)
        self.next_reclaim = time.monotonic() + RECLAIM_INTERVAL

    def step(self) -> None:
        """One turn of the loop: wait for work, group-commit it, dispatch, housekeeping."""
        timeout = POLL_INTERVAL_MS
        nd = self.due.next_due()
        # Wake for the next due recipient only when dispatch can act on it;
        # otherwise (held, unhealthy, window full) a past due time would spin.
        if nd is not None and self.can_dispatch():
            timeout = max(0, min(timeout, int((nd - time.time()) * 1000) + 1))
        if self.expire_work:
            timeout = 0
        ready = zmq.zmq_poll(self.poll_items, timeout)
        outcomes = []          # delivery sockets with outcomes waiting
        connections = False    # a delivery socket's monitor has an event
        kind = self.poll_kind
        for sock, _ in ready:
            k = kind[sock]
            if k == _OUTCOMES:
                outcomes.append(sock)
            elif k == _CONNECTIONS:
                connections = True
        if ready or self.expire_work:
            self.batch(outcomes=outcomes)
        if connections:
            self.watch_deliveries()
        self.dispatch()
        now = time.monotonic()
        if now >= self.next_reclaim:
            self.next_reclaim = now + RECLAIM_INTERVAL
            self.reclaim()
            self.expire_jobs()
            _settle_gc()

    # ------------------------------------------------------------ group commit

    def batch(self, extra_done: list[str] | None = None, outcomes: list | None = None) -> None:
        """Take every waiting request and outcome, write them together, sync once, answer.

        *outcomes*: the delivery sockets to read (those the poll found ready);
        None reads them all.
        """
        cfg = self.cfg
        server = self.server
        now = time.time()
        messages = []      # (MessageMeta, body)
        commit_peers = []  # (peer, req): one answer per request, whatever it carried
        done: list[str] = list(extra_done or ())
        delete_peers = []  # (peer, req, qids)
        plan = _Plan(self)
        size = 0
        while len(messages) < cfg.max_batch_messages and size < cfg.max_batch_bytes:
            got = server.recv()
            if got is None:
                break
            peer, frames = got
            try:
                m, f, body = bus.decode(frames)
            except bus.BusError as exc:
                log.warning("dropped a malformed request: %s", exc)
                continue
            if m.name == "SPOOL_MESSAGE_COMMIT":
                req, envelopes = f
                # (bus.decode checked the envelopes and that each has its body.)
                for (qid, sender, rcpts, params, client, arrival), b in zip(envelopes, body):
                    params["message_id"] = _message_id(b)
                    messages.append((MessageMeta(qid, sender, rcpts, arrival, params, client), b))
                    size += len(b)
                commit_peers.append((peer, req))
            elif m.name == "SPOOL_MESSAGE_DELETE":
                qids = [q for q in f[1] if q in self.store.entries]
                done += qids
                delete_peers.append((peer, f[0], qids))
            else:
                self.query(peer, m.name, f)
        for sock in self.deliveries if outcomes is None else outcomes:
            while len(plan.updates) < cfg.max_batch_messages:
                try:
                    frames = sock.recv_multipart(_NOBLOCK)
                except zmq.Again:
                    break
                try:
                    m, f, _ = bus.decode(frames)
                except bus.BusError as exc:
                    log.warning("dropped a malformed outcome: %s", exc)
                    continue
                if m.name == "DELIVERY_OUTCOME":
                    plan.outcome(f[0], f[1], f[2], now)
        work, self.expire_work = self.expire_work, []
        for qid, idxs in work:
            plan.expire(qid, idxs, now)
        plan.finish(now)
        messages += plan.bounces
        done += plan.done
        if not messages and not done and not plan.updates:
            return
        status = bus.STATUS_OK
        try:
            new = self.store.write(messages, done, plan.updates)
            self.store.sync()
        except OSError as exc:
            status = bus.STATUS_STORAGE
            if self.healthy or exc.strerror != self.last_error:
                log.error("spool write failed: %s; answering 451 until it recovers",
                          exc.strerror or exc)
            self.healthy = False
            self.last_error = exc.strerror or str(exc)
            plan.abandon(now)
        else:
            removed = self.store.commit(new, done, plan.updates)
            deleted = set(removed) - set(plan.done) - set(extra_done or ())
            if deleted:
                log.info("deleted by operator: %s", " ".join(sorted(deleted)))
            if not self.healthy:
                log.info("spool writes are succeeding again")
            self.healthy = True
            self.last_error = ""
            self._after_commit(new, plan, now)
        encode = bus.encode
        for peer, req in commit_peers:
            server.send(peer, encode("SPOOL_MESSAGE_COMMITTED", req, status))
        for peer, req, qids in delete_peers:
            server.send(peer, encode("SPOOL_MESSAGE_DELETE_REPLY", req, status,
                                     qids if status == bus.STATUS_OK else []))

    def _after_commit(self, new: list, plan: "_Plan", now: float) -> None:
        """Log the batch's events and schedule its messages (after the sync)."""
        events = self.events
        if events.enabled:
            emit = events.emit
            carried = ev.carried
            for e in new:
                m = e.meta
                if m.state is None:  # a new message, not a compaction copy
                    extra = carried(m.params)
                    message_id = m.params.get("message_id", "")
                    for r in m.rcpts:
                        emit({"type": ev.RECEPTION, "timestamp": m.arrival, "queue_id": m.qid,
                              "message_id": message_id, "sender": m.sender,
                              "recipient": r, "size": e.length, "client": m.client, **extra})
            for event in plan.events:
                emit(event)
            events.flush()
        due = self.due
        due.push_many([(min(e.due), e.meta.qid) for e in new])
        for qid, when in plan.reschedule:
            due.push(when, qid)

    # --------------------------------------------------------------- dispatch

    def can_dispatch(self) -> bool:
        return self.healthy and not self.dcfg.hold and len(self.jobs) < self.dcfg.max_in_flight

    def dispatch(self) -> None:
        """Send due recipients to delivery, grouped by message and domain."""
        if not self.can_dispatch():
            return
        budget = self.dcfg.max_in_flight - len(self.jobs)
        if budget <= 0:
            return
        now = time.time()
        entries = self.store.entries
        nd = len(self.deliveries)
        for qid in self.due.pop_due(now, min(budget, DISPATCH_BATCH)):
            e = entries.get(qid)
            if e is None or e.out:
                continue  # finished, or its outcome is awaited (it reschedules then)
            ready = [i for i, s in enumerate(e.state) if s == sch.PENDING and e.due[i] <= now]
            later = [e.due[i] for i, s in enumerate(e.state) if s == sch.PENDING and e.due[i] > now]
            if later:
                self.due.push(min(later), qid)
            if not ready:
                continue
            if self.policy.expired(e.meta.arrival, now):
                self.expire_work.append((qid, ready))
                continue
            groups: dict[str, list[int]] = {}
            for i in ready:
                groups.setdefault(_domain(e.meta.rcpts[i]), []).append(i)
            try:
                body = self.store.read_body(e)
            except OSError as exc:
                log.error("%s: cannot read the message: %s", qid, exc.strerror)
                self.due.push(now + BUSY_RETRY, qid)
                continue
            m = e.meta
            for domain, idxs in groups.items():
                d = domain_shard(domain, nd)
                if not self.up[d]:
                    self.parked[d][qid] = None   # sent when delivery[d] is back
                    continue
                req = next(self.reqs)
                attempt = max(e.attempts[i] for i in idxs) + 1
                frames = bus.encode("DELIVERY_MESSAGE_READY", req, qid, m.sender, domain,
                                    [[i, m.rcpts[i]] for i in idxs],
                                    {k: v for k, v in m.params.items()
                                     if k in ("BODY", "SMTPUTF8")},
                                    attempt, body=body)
                try:
                    self.deliveries[d].send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    self.due.push(now + BUSY_RETRY, qid)
                    continue
                self.jobs[req] = (qid, idxs, time.monotonic(), d)
                e.out += 1
            budget -= 1
            if budget <= 0:
                break

    def expire_jobs(self) -> None:
        """Jobs whose outcome never came (a delivery process died) are sent again."""
        now = time.monotonic()
        lost = [r for r, (_, _, t, _) in self.jobs.items() if now - t > self.job_timeout]
        self._resend(lost)
        if lost:
            log.warning("%d delivery job(s) got no outcome in %.0fs; they will be sent again",
                        len(lost), self.job_timeout)

    def _resend(self, reqs: list[int]) -> None:
        for r in reqs:
            qid = self.jobs.pop(r)[0]
            e = self.store.entries.get(qid)
            if e is not None:
                e.out = max(0, e.out - 1)
                self.due.push(time.time(), qid)

    def watch_deliveries(self) -> None:
        """Follow the delivery processes' connections (socket monitor events).

        A delivery process that dies takes the jobs it was given with it (they
        live in its memory; IMMEDIATE drops what was still queued towards it),
        so they are sent again at once rather than after ``job_timeout``:
        at-least-once, the transactions in flight at the crash may repeat.
        While it is away its due messages are parked, and released when a
        new one has connected.
        """
        for d, mon in enumerate(self.monitors):
            while mon.get(_EVENTS) & _POLLIN:
                event = recv_monitor_message(mon)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.up[d] = True
                    now = time.time()
                    for qid in self.parked[d]:
                        self.due.push(now, qid)
                    self.parked[d].clear()
                elif event == zmq.EVENT_DISCONNECTED:
                    self.up[d] = False
                    # Take the outcomes it sent before it went away first.
                    sock = self.deliveries[d]
                    for _ in range(100):
                        if not sock.get(_EVENTS) & _POLLIN:
                            break
                        self.batch()
                    lost = [r for r, j in self.jobs.items() if j[3] == d]
                    self._resend(lost)
                    if lost:
                        log.warning("delivery[%d] went away with %d job(s) out; they will "
                                    "be sent again", d, len(lost))

    # ----------------------------------------------------------------- queries

    def query(self, peer: bytes, name: str, f: list) -> None:
        store = self.store
        if name == "SPOOL_QUEUE_SUMMARY":
            s = store.summary()
            pending = deferred = 0
            domains: dict[str, list] = {}
            next_attempt = None
            for e in store.entries.values():
                for i, st in enumerate(e.state):
                    if st != sch.PENDING:
                        continue
                    pending += 1
                    d = domains.setdefault(_domain(e.meta.rcpts[i]), [0, 0, None])
                    d[0] += 1
                    if e.attempts[i]:
                        deferred += 1
                        d[1] += 1
                        due = e.due[i]
                        if d[2] is None or due < d[2]:
                            d[2] = due
                        if next_attempt is None or due < next_attempt:
                            next_attempt = due
            s.update(shard=self.shard, healthy=self.healthy, error=self.last_error,
                     held=self.dcfg.hold,
                     pending=pending, deferred=deferred, next_attempt=next_attempt,
                     in_flight=len(self.jobs),
                     domains={k: {"recipients": v[0], "deferred": v[1], "next_attempt": v[2]}
                              for k, v in domains.items()})
            self.server.send(peer, bus.encode("SPOOL_QUEUE_SUMMARY_REPLY", f[0], s))
        elif name == "SPOOL_QUEUE_LIST":
            limit = min(int(f[1] or LIST_LIMIT_MAX), LIST_LIMIT_MAX)
            out = []
            for qid in sorted(store.entries)[:limit]:
                e = store.entries[qid]
                out.append([qid, e.meta.sender, e.meta.rcpts, e.meta.arrival, e.length,
                            [sch.STATE_NAMES[s] for s in e.state], e.attempts, e.due])
            self.server.send(peer, bus.encode("SPOOL_QUEUE_LIST_REPLY", f[0], out))
        elif name == "SPOOL_QUEUE_FLUSH":
            now = time.time()
            count = 0
            for qid, e in store.entries.items():
                hit = False
                for i, st in enumerate(e.state):
                    if st == sch.PENDING and e.due[i] > now:
                        e.due[i] = now
                        hit = True
                        count += 1
                if hit:
                    self.due.push(now, qid)
            log.info("queue flush: %d deferred recipient(s) due now", count)
            self.server.send(peer, bus.encode("SPOOL_QUEUE_FLUSH_REPLY", f[0], count))
        elif name == "SPOOL_MESSAGE_SHOW":
            e = store.entries.get(f[1])
            if e is None:
                reply = bus.encode("SPOOL_MESSAGE_SHOW_REPLY", f[0], bus.STATUS_UNKNOWN, None,
                                   body=b"")
            else:
                m = e.meta
                entry = {"qid": m.qid, "sender": m.sender, "recipients": m.rcpts,
                         "arrival": m.arrival, "size": e.length, "params": m.params,
                         "client": m.client,
                         "state": [sch.STATE_NAMES[s] for s in e.state],
                         "attempts": e.attempts, "due": e.due}
                reply = bus.encode("SPOOL_MESSAGE_SHOW_REPLY", f[0], bus.STATUS_OK, entry,
                                   body=store.read_body(e))
            self.server.send(peer, reply)
        else:
            log.warning("unexpected request %s ignored", name)

    # ------------------------------------------------------------- reclamation

    def reclaim(self) -> None:
        """Free segments whose messages are finished; compact the oldest if mostly empty."""
        if not self.healthy:
            return
        try:
            copies, unlink = self.store.reclaim_plan(self.cfg.compact_live_ratio,
                                                     RECLAIM_MAX_COPY)
            if not unlink:
                return
            if copies:
                new = self.store.write(copies, [])
                self.store.sync()
                self.store.commit(new, [])
            freed = self.store.unlink(unlink)
            if freed:
                log.info("reclaimed %d segment(s), %d bytes; copied forward %d message(s)",
                         len(unlink), freed, len(copies))
        except OSError as exc:
            log.error("reclamation failed: %s", exc.strerror or exc)


class _Plan:
    """What one batch's outcomes change: recipient updates, bounces, finished messages."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.updates: dict[str, list] = {}     # qid -> [[idx, state, attempts, due], ...]
        self.states: dict[str, list[int]] = {}  # qid -> states after this batch
        self.failures: dict[str, list] = {}    # qid -> [RecipientFailure, ...] to bounce
        self.events: list[dict] = []
        self.reschedule: list[tuple[str, float]] = []
        self.bounces: list = []
        self.done: list[str] = []
        self.returned: list[str] = []          # qids whose jobs came back in this batch

    def _state(self, qid, e):
        st = self.states.get(qid)
        if st is None:
            st = self.states[qid] = list(e.state)
        return st

    def outcome(self, req: int, qid: str, results: list, now: float) -> None:
        sh = self.shard
        job = sh.jobs.pop(req, None)
        e = sh.store.entries.get(qid)
        if e is None:
            return
        if job is not None:
            e.out = max(0, e.out - 1)
        self.returned.append(qid)
        st = self._state(qid, e)
        m = e.meta
        base = {"queue_id": qid, "message_id": m.params.get("message_id", ""),
                "sender": m.sender, **ev.carried(m.params)}
        for idx, outcome, code, enh, text, host, ip in results:
            if not 0 <= idx < len(st) or st[idx] != sch.PENDING:
                continue  # a repeated outcome (at-least-once): the first one counts
            attempts = e.attempts[idx] + 1
            event = dict(base, recipient=m.rcpts[idx], remote_host=host, remote_ip=ip,
                         response={"code": code, "enhanced": enh, "text": text},
                         attempt=attempts, time_in_queue=round(now - m.arrival, 3))
            if outcome == "delivered":
                st[idx] = sch.DELIVERED
                self._update(qid, idx, sch.DELIVERED, attempts, 0.0)
                event["type"] = ev.DELIVERY
            elif outcome == "failed":
                st[idx] = sch.FAILED
                self._update(qid, idx, sch.FAILED, attempts, 0.0)
                event["type"] = ev.BOUNCE
                self._bounce(qid, m.rcpts[idx], code, enh, text, host, now)
            else:
                due = now + sh.policy.delay(attempts)
                if due >= sh.policy.deadline(m.arrival):
                    st[idx] = sch.EXPIRED
                    self._update(qid, idx, sch.EXPIRED, attempts, 0.0)
                    event["type"] = ev.EXPIRATION
                    self._bounce(qid, m.rcpts[idx], code, enh, text, host, now,
                                 note=f"gave up after {attempts} attempt(s)")
                else:
                    self._update(qid, idx, sch.PENDING, attempts, due)
                    event["type"] = ev.TRANSIENT_FAILURE
                    event["next_attempt"] = round(due, 3)
            self.events.append(event)

    def expire(self, qid: str, idxs: list[int], now: float) -> None:
        e = self.shard.store.entries.get(qid)
        if e is None:
            return
        st = self._state(qid, e)
        m = e.meta
        for idx in idxs:
            if st[idx] != sch.PENDING:
                continue
            st[idx] = sch.EXPIRED
            self._update(qid, idx, sch.EXPIRED, e.attempts[idx], 0.0)
            self.events.append({"type": ev.EXPIRATION, "queue_id": qid,
                                "message_id": m.params.get("message_id", ""),
                                **ev.carried(m.params),
                                "sender": m.sender, "recipient": m.rcpts[idx],
                                "attempt": e.attempts[idx],
                                "time_in_queue": round(now - m.arrival, 3)})
            self._bounce(qid, m.rcpts[idx], 0, "4.4.7",
                         "message expired: too long in the queue", "", now)
        self.returned.append(qid)

    def _update(self, qid, idx, state, attempts, due) -> None:
        self.updates.setdefault(qid, []).append([idx, state, attempts, due])

    def _bounce(self, qid, rcpt, code, enh, text, host, now, note="") -> None:
        diag = f"{code} {enh} {text}".strip() if code else text
        if note:
            # Our words are not the server's: not inside its reply (an "smtp;"
            # Diagnostic-Code quotes what the server said, RFC 3464 2.3.6).
            diag = f"{note}; last reply: {diag}"
        status = enh if enh and enh[0] in "45" else ("5.0.0" if code >= 500 or not code
                                                     else "4.0.0")
        if status.startswith("4"):
            status = "5" + status[1:]  # expired after temporary failures: now permanent
        self.failures.setdefault(qid, []).append(
            RecipientFailure(recipient=rcpt, status=status, remote_host=host or None,
                             diagnostic=diag, last_attempt=now))

    def finish(self, now: float) -> None:
        """Turn recipient states into bounces, finished messages and reschedules."""
        sh = self.shard
        entries = sh.store.entries
        for qid in dict.fromkeys(self.returned):
            e = entries.get(qid)
            if e is None:
                continue
            st = self.states.get(qid, e.state)
            if all(s != sch.PENDING for s in st):
                if not e.out:
                    self.done.append(qid)
                continue
            new_due = {idx: due for idx, _, _, due in self.updates.get(qid, ())}
            dues = [new_due.get(i, e.due[i]) for i in range(len(st)) if st[i] == sch.PENDING]
            self.reschedule.append((qid, min(dues) if dues else now))
        for qid, fails in self.failures.items():
            e = entries[qid]
            m = e.meta
            if not m.sender:
                log.info("%s: not bouncing a failure of a message with a null sender "
                         "(recipients: %s)", qid, ", ".join(f.recipient for f in fails))
                continue
            try:
                original = sh.store.read_body(e)
                dsn = build_dsn(original=original, envelope_sender=m.sender, failed=fails,
                                reporting_mta=sh.settings.hostname, arrival_time=m.arrival,
                                queue_id=qid)
            except Exception:
                log.exception("%s: could not build the bounce", qid)
                continue
            bqid = new_qid_for_shard(sh.shard, sh.settings.shards)
            params = {"message_id": _message_id(dsn)}
            self.bounces.append((MessageMeta(bqid, "", [m.sender], now, params,
                                             f"bounce of {qid}"), dsn))
            log.info("%s: bounce %s to <%s> for %d recipient(s)", qid, bqid, m.sender,
                     len(fails))

    def abandon(self, now: float) -> None:
        """The batch was not recorded: everything that came back is tried again."""
        for qid in dict.fromkeys(self.returned):
            self.shard.due.push(now + BUSY_RETRY, qid)


def main(settings, shard: int, ready_fd: int | None) -> None:
    """Entry point of the spool[n] child."""
    name = proc.start_role("spool", shard, settings.config.server.log_level)
    from mta import native
    log.info("starting %s; codec implementation %s", name, native.implementation())
    s = Shard(settings, shard)

    def stop(signum, frame):
        s.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctx = bus.new_context()
    try:
        s.open(ctx)
        proc.report_ready(ready_fd)
        s.run()
    finally:
        ctx.term()
    log.info("stopped")
