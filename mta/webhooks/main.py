"""webhooks[0]: push SparkPost event batches to the configured webhooks, at least once.

Reads:   the events store (read-only: ``read(after_seq, limit)``, ``last_seq()``; one
         made anew at its path after a set-aside is followed at the next poll,
         :meth:`Webhooks.follow_store`);
         the webhooks' SQLite file ``<state_dir>/webhooks/webhooks.sqlite``
         (the API-created webhooks, written by the acceptors; its
         ``generation`` is polled every ``webhooks.poll_interval`` seconds, so an
         API change is picked up within about a second); ``[[webhook]]`` tables.
Writes:  cursors and batches in that file (:mod:`mta.api.webhookdb`);
         ``<state_dir>/webhooks/min_seq``: the lowest seq of the events store a
         webhook still needs -- whoever prunes the store passes it as
         ``prune(keep_from_seq=...)`` (:func:`mta.api.webhookdb.read_min_seq`);
         ``<state_dir>/webhooks/status.json``: per webhook its cursor, the
         store's newest seq, the backlog, pending and retrying batches, the
         last failure and counters (rewritten every second; ``mta queue`` and
         ``/api/admin/queue`` show it, :func:`mta.obs.queue.webhook_status`);
         log lines.
Peers:   the webhook targets (HTTP POST, aiohttp); OAuth2 tokens URLs; the DNS servers
         their host names are asked of (``[delivery] nameservers``, on the event loop:
         :mod:`mta.api.webhook_dns`).
Config:  [webhooks], [[webhook]], [events] (where the store is); of [delivery]
         ``nameservers``, ``dns_timeout`` and ``ipv6`` (the name lookups).

It never writes the events store nor talks to the spool or the acceptors: a
slow or dead target only makes its cursor lag (bounded by
``webhooks.max_backlog_events``, see :mod:`mta.webhooks.sender`).
SIGTERM: stop sending (in-flight POSTs are abandoned; their batches stay
stored and are sent again at the next start), save cursors, exit.  SIGHUP is
ignored ([[webhook]] changes need a restart; API changes need none).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time

import orjson
import uvloop

from mta import bus, proc
from mta.obs.catalog import COUNTER, GAUGE
from mta.obs.stats import Pusher, Registry
from mta.api import webhookdb
from mta.api import webhooks as W
from mta.webhooks.sender import Sender

log = logging.getLogger("mta.webhooks")

STATUS_INTERVAL = 1.0      # seconds between two status.json / min_seq writes
PURGE_INTERVAL = 60.0      # seconds between two purges of old batch statuses
STORE_RETRY = 1.0          # seconds between two tries to open the events store


def open_store(settings):
    """The events store, read-only (FileNotFoundError while the events process has not
    created it yet); None when [events] store is false."""
    from mta.feedback import events_store as store

    return store.open_for(settings, readonly=True)


class Webhooks:
    def __init__(self, settings, db: webhookdb.WebhookDB, store, session):
        self.settings = settings
        self.cfg = settings.config.webhooks
        self.db = db
        self.store = store
        self.session = session
        self.toml = W.config_docs(settings.config.webhook)
        self.senders: dict[str, Sender] = {}
        self.keys: dict[str, bytes] = {}
        self.carried: dict = {}         # webhook id -> Stats of a sender being replaced
        self.generation = -1
        self.marked: set[str] = set()    # [[webhook]] tables recorded as inactive
        self.last_min_seq: int | None = None
        self.dir = webhookdb.dir_in(settings.state_dir)
        # A [[webhook]] seen for the first time gets the events since this start.
        self.started = time.time()

    def hooks(self) -> list[tuple[W.Hook, float | None]]:
        """Every webhook (TOML ones first) with its creation time (for TOML ones: the
        start of the first webhooks process that saw it)."""
        out = [(W.Hook.from_doc(wid, doc, read_only=True),
                self.db.first_seen(wid, self.started)) for wid, doc in self.toml]
        out += [(W.Hook.from_doc(wid, doc), created)
                for wid, doc, created, _ in self.db.webhooks()]
        return out

    async def refresh(self) -> None:
        """Start, restart or stop senders after a change of the webhooks."""
        gen = self.db.generation()
        if gen == self.generation:
            return
        seen = set()
        complete = True
        for hook, created in self.hooks():
            if not hook.active:
                if hook.read_only and hook.id not in self.marked:
                    # (the API records its own changes; a [[webhook]] table's reach the
                    # process only at its start: what it misses while inactive is not sent
                    # once a new configuration makes it active, Sender.load)
                    self.db.mark_inactive(hook.id)
                    self.marked.add(hook.id)
                continue
            seen.add(hook.id)
            key = hook.key()
            if self.keys.get(hook.id) == key:
                # nothing it sends changed; its name (status.json, metrics, log lines)
                # may have
                self.senders[hook.id].hook = hook
                continue
            old = self.senders.pop(hook.id, None)
            if old is not None:
                await old.stop()
                self.keys.pop(hook.id, None)
                log.info("webhook %s (%s): changed; restarting its sender", hook.name, hook.id)
                # (its counters go on: the mta_webhook_*_total series must not go down)
                self.carried[hook.id] = old.stats
            s = Sender(hook, self.db, self.store, self.session, self.cfg)
            if hook.id in self.carried:
                s.stats = self.carried[hook.id]
            try:
                s.load(created)          # (SQLite: locked, a full disk)
            except Exception:
                # The others still start; this one is tried again at the next look (the
                # generation is left unseen), where it waited for the next API change.
                log.exception("webhook %s (%s): cannot load its sender; trying again",
                              hook.name, hook.id)
                complete = False
                continue
            self.senders[hook.id] = s
            self.keys[hook.id] = key
            self.carried.pop(hook.id, None)
            s.start()
            log.info("webhook %s (%s): sending %s to %s from seq %d", hook.name, hook.id,
                     ",".join(sorted(hook.events)), W.loggable(hook.target), s.scan_seq)
        for wid in [w for w in self.senders if w not in seen]:
            s = self.senders.pop(wid)
            self.keys.pop(wid, None)
            await s.stop()
            log.info("webhook %s (%s): removed or inactive; its sender stopped", s.hook.name,
                     wid)
        if complete:
            self.generation = gen

    async def follow_store(self) -> None:
        """Read the new events store when the events process set the old one aside and
        made another at its path (one stat per look: EventStore.successor).

        Every sender stops (cursor saved, in-flight POSTs abandoned: their batches stay
        stored) and starts again on the new store at the next refresh(): Sender.load
        sees a cursor saved for another store id and starts at the new store's first
        event, so no cursor beyond its end skips its events.  Batches stored from the
        old store are still sent (they hold their bodies); events the events process
        reads again from its cursors into the new store may be sent a second time, with
        the same event_id (at least once, as after any crash).
        """
        new = self.store.successor()
        if new is None:
            return
        for wid, s in list(self.senders.items()):
            await s.stop()
            self.carried[wid] = s.stats      # (counters go on, as for a changed webhook)
        self.senders.clear()
        self.keys.clear()
        self.generation = -1                 # refresh() starts them all again
        self.last_min_seq = None
        old, self.store = self.store, new
        old.close()

    def publish(self) -> None:
        """Write min_seq (when it changed) and status.json."""
        head = self.store.last_seq()
        keep = min((s.keep_from() for s in self.senders.values()), default=head + 1)
        if keep != self.last_min_seq:
            webhookdb.write_min_seq(self.settings.state_dir, keep)
            self.last_min_seq = keep
        doc = {"time": time.time(), "head": head, "min_seq": keep,
               "webhooks": [s.status() for s in self.senders.values()]}
        path = webhookdb.status_path(self.settings.state_dir)
        proc.replace_file(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2))

    async def run(self, stop: asyncio.Event) -> None:
        ids = {wid for wid, _ in self.toml} | {w[0] for w in self.db.webhooks()}
        n = self.db.forget(ids)
        if n:
            log.info("forgot the cursors and batches of %d webhook(s) no longer defined", n)
        next_status = next_purge = 0.0
        while not stop.is_set():
            try:
                await self.follow_store()
                await self.refresh()
                # (intervals of this process: monotonic, so that a step of the wall
                # clock back does not stop the status for as long)
                now = time.monotonic()
                if now >= next_status:
                    next_status = now + STATUS_INTERVAL
                    self.publish()
                if now >= next_purge:
                    next_purge = now + PURGE_INTERVAL
                    self.db.purge(time.time(), self.cfg.status_retention)
            except Exception:
                log.exception("webhooks: housekeeping failed")
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.poll_interval)
            except asyncio.TimeoutError:
                pass
        for s in list(self.senders.values()):
            await s.stop()
        self.publish()


def main(settings, index: int, ready_fd: int | None, fds=(), http_fds=()) -> None:
    name = proc.start_role("webhooks", index, settings.config.server.log_level)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("starting %s", name)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    proc.on_sigterm(loop, stop.set)
    db = webhookdb.WebhookDB(webhookdb.path_in(settings.state_dir))
    # Liveness for the admin process (/api/admin/health, per-process CPU and memory).
    ctx = bus.new_context()
    reg = Registry()
    live: dict = {}          # "w": the Webhooks once the events store is open

    def figures():
        w = live.get("w")
        if w is None:
            return []
        rows = []
        for sender in list(w.senders.values()):
            st = sender.status()
            name = (st["name"],)
            rows += [(GAUGE, "mta_webhook_backlog_events", name, st["backlog_events"]),
                     (GAUGE, "mta_webhook_pending_batches", name, st["pending_batches"]),
                     (COUNTER, "mta_webhook_events_sent_total", name, st["events_sent"]),
                     (COUNTER, "mta_webhook_failed_attempts_total", name,
                      st["failed_attempts"]),
                     (COUNTER, "mta_webhook_dropped_events_total", name,
                      st["dropped_events"])]
        return rows
    reg.collect(figures)
    pusher = Pusher.create(reg, ctx, settings, "webhooks", index)
    if pusher is not None:
        pusher.run_on(loop)

    started = time.time()
    for wid, _ in W.config_docs(settings.config.webhook):
        db.first_seen(wid, started)      # before the store exists: durable at once

    async def run():
        proc.report_ready(ready_fd)
        store = None
        told = False
        while store is None and not stop.is_set():
            try:
                store = open_store(settings)
                if store is None:
                    log.error("webhooks: [events] store is false: there are no events to "
                              "send; nothing is sent")
                    await stop.wait()
                    return
            except Exception as exc:
                if not told:
                    told = True
                    log.info("webhooks: the events store cannot be opened yet (%s); "
                             "trying every %gs", exc, STORE_RETRY)
            if store is None:
                try:
                    await asyncio.wait_for(stop.wait(), STORE_RETRY)
                except asyncio.TimeoutError:
                    pass
        if store is None:
            return
        resolver = W.resolver_for(settings)      # [delivery] nameservers, not getaddrinfo
        session = W.new_session(settings.admin_listen, resolver)
        w = None
        try:
            w = Webhooks(settings, db, store, session)
            w.started = started
            live["w"] = w
            await w.run(stop)
        finally:
            await session.close()
            await resolver.close()
            (w.store if w is not None else store).close()   # (follow_store may replace it)

    try:
        loop.run_until_complete(run())
    finally:
        db.close()
        if pusher is not None:
            pusher.close()
        bus.close_context(ctx)
        loop.close()
