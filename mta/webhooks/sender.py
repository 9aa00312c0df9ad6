"""One webhook's sender: cursor over the events store, durable batches, POSTs, retries.

A :class:`Sender` runs as one asyncio task per active webhook in the
``webhooks`` process.  Its loop:

1. posts every stored batch whose next attempt is due (at most
   ``webhooks.max_in_flight`` batches are stored and unacknowledged at once);
2. while there is room, reads the events after its cursor
   (``store.read(after_seq, limit)``), takes up to ``batch_size`` events whose
   ``type`` is in the webhook's ``events``, gives them a batch id (UUID 4),
   and stores the batch -- id, seq range, the exact body -- and the new cursor
   in one durable SQLite commit (:meth:`WebhookDB.add_batch`) *before* the
   first POST.  Events that do not match only move the cursor;
3. checks the backlog (events of the store after its cursor) against
   ``max_backlog_events``: warnings at 50 % and 90 %, and at the bound
   ``drop_oldest`` (the cursor jumps forward, the skipped events are counted
   and logged) or ``pause`` (see :meth:`keep_from`);
4. sleeps until the next due retry, a finished POST, or ``poll_interval``.

A POST that answers 2xx finishes the batch; anything else (no answer within
``timeout``, a connection error, another status) schedules the next attempt
after ``retry_schedule[attempt - 1] * time_scale`` seconds, keeping the id and
the body; after ``1 + len(retry_schedule)`` attempts the batch is dropped
(logged, counted).  OAuth2: a token is fetched before the first POST and
again when the target answers 400 or 401 (that POST is then repeated once at
once with the new token).  After kill -9 the stored batches are sent again
with their ids and bodies, and reading resumes after the stored cursor: at
least once.  A webhook made active again after ``active: false`` does not get
the events of its inactive time (:meth:`Sender.resume`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import urllib.parse
import uuid

import orjson

from mta.api import webhook_docs
from mta.api import webhooks as W
from mta.api.webhookdb import Batch

log = logging.getLogger("mta.webhooks")

READ_LIMIT = 1000          # events read from the store per call, at most
READ_MIN = 64              # and at least (a filtered webhook skips events)
MAX_READS = 20             # store reads per batch made (then the loop yields)
CURSOR_SAVE_INTERVAL = 1.0  # seconds: a cursor moved only by non-matching events
ERROR_PAUSE = 1.0          # seconds: next attempt after a send that failed (no retry_schedule)


class Stats:
    def __init__(self):
        self.events = 0           # events sent in acknowledged batches
        self.batches = 0          # batches acknowledged
        self.failures = 0         # failed attempts
        self.dropped_batches = 0  # batches given up after the last attempt
        self.dropped_events = 0   # events never sent: in dropped batches, skipped at the
        #                           backlog bound, lost to pruning, not writable as JSON


class Sender:
    def __init__(self, hook: W.Hook, db, store, session, cfg, clock=time.time):
        self.hook = hook
        self.db = db
        self.store = store
        self.session = session
        self.cfg = cfg
        self.clock = clock
        self.pending: dict[str, Batch] = {}
        self.inflight: dict[str, asyncio.Task] = {}
        self.scan_seq = 0          # events up to here are batched or not wanted
        self.saved_seq = 0         # the scan_seq last written to the database
        self.saved_at = 0.0
        self.token: str | None = None
        self.token_expires = 0.0
        self.token_lock = asyncio.Lock()
        self.token_failures = 0     # token fetches that failed
        self.token_error: W.TokenError | None = None    # how the last one failed
        self.level = 0             # backlog warning level: 0, 50 or 90
        self.last_failure: dict | None = None    # {"at", "response"} of the last failed POST
        self.head = 0
        self.stats = Stats()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.stopping = False

    # ------------------------------------------------------------ lifecycle

    def load(self, created: float | None = None) -> None:
        """Read the cursor and the stored batches; a new webhook starts at the events
        stored since *created* (None: at the newest event)."""
        cur = self.db.cursor(self.hook.id)
        if cur is None:
            seq = self.start_seq(created)
            self.db.set_cursor(self.hook.id, seq)
        else:
            seq = cur[0]
        # A store deleted and made anew (the recovery of a damaged one, another
        # store_path) numbers its events from 1 again: a cursor saved for the old one
        # would skip every new event up to it, unsaid.  Its id tells; a cursor beyond
        # the newest event (saved before stores had ids) tells too.
        sid = self.store.store_id()
        had = self.db.cursor_store(self.hook.id) if sid else None
        head = self.store.last_seq()
        if seq and ((had is not None and had != sid) or seq > head):
            log.warning("webhook %s: the events store was made anew (%s); its cursor goes "
                        "from seq %d back to the start of the new one", self.hook.name,
                        "another store id" if had is not None and had != sid else
                        "its newest event is seq %d" % head, seq)
            seq = 0
            self.db.set_cursor(self.hook.id, seq)
        if sid and had != sid:
            self.db.set_cursor_store(self.hook.id, sid)
        seq = self.resume(seq)
        self.scan_seq = self.saved_seq = seq
        self.pending = {b.id: b for b in self.db.pending(self.hook.id)}
        if self.pending:
            log.info("webhook %s: %d stored batch(es) to send again", self.hook.name,
                     len(self.pending))

    def resume(self, seq: int) -> int:
        """The cursor of a webhook that was inactive since its sender last ran: past the
        events stored before it was made active again (WebhookDB.inactive), *seq* if later.

        ``active: false`` means "do not send me these" (the reference does not say what
        SparkPost does): the events of its inactive time are not sent when it is made
        active again, nor those it had not read yet when it was made inactive (the
        store is not held back for an inactive webhook either: min_seq counts the
        running senders only).  Batches already stored are still sent: they were made
        while it was active.  A [[webhook]] table made active by a new configuration
        starts at the events since this process's start.
        """
        row = self.db.inactive(self.hook.id)
        if row is None:
            return seq
        since = row[0] if row[0] is not None else self.clock()
        start = self.start_seq(since)
        if start > seq:
            log.info("webhook %s: active again; the %d event(s) stored while it was inactive "
                     "are not sent", self.hook.name, start - seq)
            seq = start
        self.db.resume(self.hook.id, seq)
        return seq

    def start_seq(self, created: float | None) -> int:
        """The seq after which a new webhook starts: the last event older than *created*
        (binary search on the events' timestamps), or the newest event."""
        head = self.store.last_seq()
        if created is None or head <= 0:
            return max(head, 0)
        lo, hi = 0, head          # answer in [lo, hi]: events after it are new enough
        while lo < hi:
            mid = (lo + hi + 1) // 2
            rows = self.store.read(mid - 1, 1)
            if not rows:
                hi = mid - 1
                continue
            ts = _timestamp(rows[0][1])
            if ts is not None and ts < created - 1:
                lo = rows[0][0]
                if lo >= hi:
                    break
            else:
                hi = mid - 1
        return lo

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        tasks = list(self.inflight.values()) + ([self.task] if self.task else [])
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self.save_cursor(force=True)

    # ----------------------------------------------------------------- loop

    async def run(self) -> None:
        while not self.stopping:
            try:
                delay = self.step()
            except Exception:
                log.exception("webhook %s: reading events or storing a batch failed",
                              self.hook.name)
                delay = 1.0
            self.wake.clear()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)

    def step(self) -> float:
        """One pass; returns how long to sleep (0: there is more to do at once)."""
        cfg = self.cfg
        now = self.clock()
        for b in self.pending.values():
            if b.id not in self.inflight and b.next_at <= now and \
                    len(self.inflight) < cfg.max_in_flight:
                self.launch(b)
        made = 0
        more = False
        while len(self.pending) < cfg.max_in_flight:
            b, more = self.make_batch(now)
            if b is None:
                break
            made += 1
            self.launch(b)
            if not more:
                break
        self.check_backlog()
        self.save_cursor()
        if more and len(self.pending) < cfg.max_in_flight:
            return 0.0
        due = [b.next_at for b in self.pending.values() if b.id not in self.inflight]
        delay = cfg.poll_interval
        if due:
            delay = min(delay, max(0.0, min(due) - self.clock()))
        return delay

    def make_batch(self, now: float) -> tuple[Batch | None, bool]:
        """Read after the cursor and store the next batch; (batch or None, more to read)."""
        want = self.hook.events
        size = self.cfg.batch_size
        # (a report nobody's message was found for -- anyone can send one -- is the
        # operator's, in the event log, unless webhooks.unmatched_reports)
        unmatched = self.cfg.unmatched_reports
        events = []
        first = None
        scan = self.scan_seq
        more = False
        for _ in range(MAX_READS):
            # no more than the batch still takes (rows read past a full batch would be
            # read and decoded again for the next one); more when a filter skips some
            limit = min(READ_LIMIT, max(READ_MIN, size - len(events)))
            rows = self.store.read(scan, limit)
            for seq, ev in rows:
                if seq > scan + 1 and scan >= self.scan_seq:
                    self.lost(seq - scan - 1)
                scan = seq
                t = ev.get("type")
                # (a type that is no string -- a damaged event that still decodes -- is
                # none the webhook takes; a list's hash raised here at every read)
                if type(t) is str and t in want and \
                        (unmatched or ev.get("matched") != "0"):
                    events.append(ev)
                    if first is None:
                        first = seq
                    if len(events) >= size:
                        break
            if len(events) >= size:
                more = True
                break
            if len(rows) < limit:
                break
        else:
            more = True
        body = None
        if events:
            try:
                body = orjson.dumps([webhook_docs.element(ev) for ev in events])
            except orjson.JSONEncodeError:
                events, body = self._writable(events)
        if not events:
            self.scan_seq = scan
            return None, more
        b = Batch(str(uuid.uuid4()), self.hook.id, self.hook.target, first, scan, len(events),
                  body, 0, now, 0)
        self.db.add_batch(b, scan)
        self.scan_seq = self.saved_seq = scan
        self.saved_at = now
        self.pending[b.id] = b
        return b, more

    def _writable(self, events: list[dict]) -> tuple[list[dict], bytes]:
        """The events of a batch that JSON can write, and the batch's body of them.

        One that it cannot (a key that is no string, say: from a damaged or foreign
        record) made every try of the batch raise, each second, and the webhook sent
        nothing more for good; it is logged and counted as dropped, not sent."""
        kept, parts = [], []
        for ev in events:
            try:
                parts.append(orjson.dumps(webhook_docs.element(ev)))
            except orjson.JSONEncodeError as exc:
                self.stats.dropped_events += 1
                log.error("webhook %s: event %s cannot be written as JSON (%s); not sent",
                          self.hook.name, str(ev.get("event_id"))[:40], exc)
                continue
            kept.append(ev)
        return kept, b"[" + b",".join(parts) + b"]"

    def lost(self, n: int) -> None:
        """Events that were pruned from the store before this webhook read them."""
        self.stats.dropped_events += n
        log.warning("webhook %s: %d event(s) were removed from the events store before "
                    "they were sent (events retention)", self.hook.name, n)

    def check_backlog(self) -> None:
        cfg = self.cfg
        self.head = head = self.store.last_seq()
        lag = head - self.scan_seq
        bound = cfg.max_backlog_events
        if lag > bound and cfg.on_backlog_full == "drop_oldest":
            new = head - bound
            n = new - self.scan_seq
            self.scan_seq = new
            self.stats.dropped_events += n
            self.db.set_cursor(self.hook.id, new, n)
            self.saved_seq = new
            log.warning("webhook %s: backlog over webhooks.max_backlog_events (%d): %d "
                        "oldest event(s) dropped, not sent", self.hook.name, bound, n)
            lag = bound
        level = 90 if lag >= 0.9 * bound else 50 if lag >= 0.5 * bound else 0
        if level > self.level:
            log.warning("webhook %s: backlog of %d events is %d%% of "
                        "webhooks.max_backlog_events (%d); at the bound: %s", self.hook.name,
                        lag, level, bound, cfg.on_backlog_full)
        elif level < self.level and level == 0:
            log.info("webhook %s: backlog back to %d events", self.hook.name, lag)
        self.level = level

    def keep_from(self) -> int:
        """The lowest seq of the events store this webhook still needs."""
        keep = self.scan_seq + 1
        if self.cfg.on_backlog_full == "pause":
            keep = max(keep, self.head - self.cfg.max_backlog_events + 1)
        return keep

    def save_cursor(self, force: bool = False) -> None:
        if self.scan_seq == self.saved_seq:
            return
        now = self.clock()
        if force or now - self.saved_at >= CURSOR_SAVE_INTERVAL:
            self.db.set_cursor(self.hook.id, self.scan_seq)
            self.saved_seq = self.scan_seq
            self.saved_at = now

    # ---------------------------------------------------------------- sends

    def launch(self, b: Batch) -> None:
        self.inflight[b.id] = asyncio.get_running_loop().create_task(self.send(b))

    async def send(self, b: Batch) -> None:
        try:
            await self._send(b)
        except asyncio.CancelledError:
            raise
        except Exception:
            # (recording the attempt failed -- disk full, the database locked -- or
            # something unexpected: a batch left due would be POSTed again at once, in
            # a loop; it waits like after a failed POST)
            if b.id in self.pending and b.next_at <= self.clock():
                b.next_at = self.clock() + self._pause(b)
            log.exception("webhook %s: batch %s: sending failed", self.hook.name, b.id)
        finally:
            self.inflight.pop(b.id, None)
            self.wake.set()

    def _pause(self, b: Batch) -> float:
        """Seconds until *b*'s next attempt after its attempt failed: its retry schedule's
        step (the last one past the end, for an attempt whose answer was not handled)."""
        sched = self.cfg.retry_schedule
        if not sched:
            return ERROR_PAUSE
        return sched[min(max(b.attempts, 1), len(sched)) - 1] * self.cfg.time_scale

    async def _token(self, refresh: str | None) -> str | None:
        """The OAuth2 token; a new one when there is none, it expired, or *refresh* (the
        token the target refused) is still the current one.  One fetch at a time."""
        if self.hook.auth_type != "oauth2":
            return None
        failed = self.token_failures
        async with self.token_lock:
            if self.token_failures != failed:
                # (a fetch failed while this one waited: its failure is this attempt's
                # too -- each waiter fetching in turn made the last of max_in_flight
                # batches wait as many timeouts, and asked a dead tokens URL as often)
                raise self.token_error
            if (refresh is not None and refresh == self.token) or self.token is None or \
                    self.clock() >= self.token_expires:
                try:
                    token, expires = await W.fetch_token(self.session, self.hook,
                                                         self.cfg.timeout)
                except W.TokenError as exc:
                    self.token_error = exc
                    self.token_failures += 1
                    raise
                self.token = token
                self.token_expires = self.clock() + max(1, expires - 30)
            return self.token

    async def _send(self, b: Batch) -> None:
        cfg = self.cfg
        hook = self.hook
        b.attempts += 1
        to = _with_target(hook, b.target)
        try:
            # (the answer's status is all that counts: its body is not read, so a 2xx
            # whose body trickles or never comes is the acknowledgement it is, not a
            # timeout that had the batch POSTed again until it was dropped)
            token = await self._token(None) if to.auth_type == "oauth2" else None
            resp = await W.post(self.session, to, b.body, b.id, cfg.timeout, token, 0)
            if to.auth_type == "oauth2" and resp.status in (400, 401):
                token = await self._token(token)
                resp = await W.post(self.session, to, b.body, b.id, cfg.timeout, token, 0)
        except W.TokenError as exc:
            # (no POST went: whatever the tokens URL answered -- a 200 without a token
            # too, which was taken for the target's 2xx -- the attempt failed)
            token_failed = exc.resp.failure or "no answer"   # (its own: timeout...)
            resp = dataclasses.replace(exc.resp, failure="oauth2")
        else:
            token_failed = ""
        now = self.clock()
        code = str(resp.status)
        # Memory first, then the database: when recording fails (send() logs it), the
        # batch is still done with (delivered, dropped) or waits for its next attempt.
        if resp.ok and not token_failed:
            self.pending.pop(b.id, None)
            self.stats.batches += 1
            self.stats.events += b.n
            if b.failed:
                log.info("webhook %s: batch %s delivered at attempt %d", hook.name, b.id,
                         b.attempts)
            self.db.attempted(b, True, now, code, "", resp.latency_ms, None)
            return
        self.stats.failures += 1
        sched = cfg.retry_schedule
        what = f"HTTP {resp.status}" if resp.status else (
            token_failed or resp.failure or "no answer")
        if not resp.status and resp.body:   # why: the connection's error (refused, TLS...)
            what += f" ({_scrubbed(resp.body)})"
        if token_failed:
            what = "the OAuth2 tokens URL got " + (
                what if resp.status != 200 else "HTTP 200 without an access_token")
        self.last_failure = {"at": now, "response": what}
        if b.attempts > len(sched):
            self.pending.pop(b.id, None)
            self.stats.dropped_batches += 1
            self.stats.dropped_events += b.n     # (never sent, as the skipped ones)
            log.warning("webhook %s: batch %s (%d events, seq %d-%d) dropped after %d "
                        "attempts; the last got %s", hook.name, b.id, b.n, b.first_seq,
                        b.last_seq, b.attempts, what)
            self.db.attempted(b, False, now, code, resp.failure, resp.latency_ms, None)
            return
        b.next_at = now + self._pause(b)
        b.failed = 1
        log.info("webhook %s: batch %s attempt %d got %s; next attempt in %.1fs", hook.name,
                 b.id, b.attempts, what, b.next_at - now)
        self.db.attempted(b, False, now, code, resp.failure, resp.latency_ms, b.next_at)

    def status(self) -> dict:
        """What status.json says of this webhook: backlog (events after the cursor, which
        max_backlog_events bounds), stored batches not yet acknowledged, those waiting
        for a retry (failed at least once) and when the next one is due, the last failed
        POST, counters."""
        s = self.stats
        retrying = [b for b in self.pending.values() if b.failed]
        return {"id": self.hook.id, "name": self.hook.name, "cursor": self.scan_seq,
                "head": self.head, "backlog_events": max(0, self.head - self.scan_seq),
                "pending_batches": len(self.pending),
                "pending_events": sum(b.n for b in self.pending.values()),
                "retrying_batches": len(retrying),
                "next_retry": min((b.next_at for b in retrying if b.id not in self.inflight),
                                  default=None),
                "last_failure": self.last_failure,
                "events_sent": s.events, "batches_sent": s.batches,
                "failed_attempts": s.failures, "dropped_batches": s.dropped_batches,
                "dropped_events": s.dropped_events,
                "max_backlog_events": self.cfg.max_backlog_events,
                "on_backlog_full": self.cfg.on_backlog_full}


def _with_target(hook: W.Hook, target: str) -> W.Hook:
    """A stored batch keeps the target it was made for.  When the webhook has moved to
    another origin (scheme, host, port) since, its credentials (auth, custom headers,
    token) are its new target's: the batch goes to the old one without them, as a
    browser drops Authorization on a redirect elsewhere (the old target's own
    user:password@ in its URL is its own)."""
    if hook.target == target:
        return hook
    from dataclasses import replace

    moved = _origin(target) != _origin(hook.target)
    u = urllib.parse.urlsplit(target)
    # (an old target's own user:password@ is sent as Basic, and aiohttp will not send it
    # beside another Authorization: the request would never go)
    if not moved and u.username is None and u.password is None:
        return replace(hook, target=target)
    return replace(hook, target=target, auth_type="none", auth_credentials={},
                   auth_request_details={}, auth_token="" if moved else hook.auth_token,
                   custom_headers={} if moved else {
                       k: v for k, v in hook.custom_headers.items()
                       if k.lower() != "authorization"})


def _origin(url: str) -> tuple:
    u = urllib.parse.urlsplit(url)
    try:
        port = u.port
    except ValueError:
        port = None
    return u.scheme.lower(), (u.hostname or "").lower(), port or (
        443 if u.scheme.lower() == "https" else 80)


def _timestamp(ev: dict) -> float | None:
    ts = ev.get("timestamp")
    try:
        return float(ts)
    except (TypeError, ValueError):
        return None


_URL_SECRETS = re.compile(r"(?<=//)[^/@\s]*@|\?[^\s\]'\")]*")


def _scrubbed(text: str) -> str:
    """An error's text for the log and status: without the user:password@ and the query
    of a URL it may quote (a target's credentials are never logged)."""
    return _URL_SECRETS.sub("", text)[:200]

