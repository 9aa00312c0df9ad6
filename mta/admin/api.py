"""The admin API's reads and the node drain, behind the admin listener (mta/admin/main.py).

Routes (JSON; errors are ``{"errors": [{"message": ...}]}``):

``GET /api/admin/queue``
    the node's queue (:func:`mta.obs.queue.merge`): totals, per shard, and by
    domain, site, pool, source and campaign; 503 when a spool shard does not answer.
``GET /api/admin/messages/QID``
    one queued message: envelope, each recipient's state, attempts and next
    attempt; 400 for a malformed queue id, 404 when the message is not queued.
``GET /api/admin/status``
    everything the status page shows (:mod:`mta.admin.status`).
``GET /api/admin/drain``, ``POST /api/admin/drain``, ``DELETE /api/admin/drain``
    the drain: whether the node is draining, since when, and what remains
    (messages, recipients, jobs in flight); POST starts it, DELETE cancels it.
``GET /api/admin/rules``, ``DELETE /api/admin/rules/NAME-OR-ID``
    the suspensions, throttles, back-offs and warm-ups in effect (the response
    rule, reply, source, site, time left; as ``mta rules list --json``), read
    from ``<state_dir>/adaptive/``; DELETE ends those of rule NAME, or the one
    entry ID, as ``mta rules cancel`` (the delivery processes see it within a
    second); 404 when nothing in effect has that name.

The drain is the file ``<run>/drain``: each acceptor looks for it twice a
second and, while it exists, answers new SMTP connections and transactions
``421 4.3.2`` and HTTP injections 503 with Retry-After; delivery goes on.  The
supervisor removes it when it starts (a fresh start accepts mail).

The spool shards are asked over the bus (SPOOL_QUEUE_SUMMARY, SPOOL_MESSAGE_SHOW)
in a small thread pool, so a slow shard never stalls the listener; answers to
the status page are cached for ``QUEUE_CACHE_SECONDS`` so a page left open costs
the shards at most one summary per that time.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import urllib.parse

import orjson

from mta import bus
from mta.admin import status as st
from mta.obs import queue as q
from mta.queueid import is_qid, shard_of
from mta.shaping import state as adaptive

log = logging.getLogger("mta.admin")

DRAIN_FLAG = "drain"            # in the run directory; read by the acceptors
SHARD_TIMEOUT = 5.0             # seconds a spool shard has to answer one question
QUEUE_CACHE_SECONDS = 1.0       # the status page's queue view is at most this old
WORKERS = 2                     # threads asking the spool shards


class Unavailable(Exception):
    pass


class Api:
    def __init__(self, settings, loop, ctx, reports, collector):
        self.settings = settings
        self.adaptive_dir = os.path.join(settings.state_dir, adaptive.STORE_DIR)
        self.loop = loop
        self.ctx = ctx
        self.reports = reports
        self.collector = collector
        self.pool = concurrent.futures.ThreadPoolExecutor(WORKERS, "admin-spool")
        self.history = st.History()
        self.drain_path = os.path.join(settings.run_dir, DRAIN_FLAG)
        self._cached: tuple[float, dict] | None = None
        self._timer = None

    # ----------------------------------------------------------- sampling

    def start(self) -> None:
        interval = self.settings.config.admin.push_interval

        def tick():
            counters, gauges, _ = self.reports.merged()
            self.history.add(st.totals(counters, gauges))
            self._timer = self.loop.call_later(interval, tick)
        tick()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- spool

    def _call(self, shard: int, request, *values):
        endpoint = self.settings.endpoint(f"spool-{shard}")
        if not os.path.exists(endpoint[len("ipc://"):]):
            raise Unavailable(f"spool[{shard}] is not running")
        cl = bus.SyncClient(self.ctx, endpoint)
        try:
            return cl.call(request, *values, timeout=SHARD_TIMEOUT)
        except TimeoutError:
            raise Unavailable(f"spool[{shard}] did not answer within {SHARD_TIMEOUT:g}s") \
                from None
        finally:
            cl.close()

    async def _ask(self, shard: int, request, *values):
        return await self.loop.run_in_executor(self.pool, self._call, shard, request, *values)

    async def queue(self) -> dict:
        replies = await asyncio.gather(*(self._ask(n, bus.SpoolQueueSummary)
                                         for n in range(self.settings.shards)))
        view = q.merge([r.summary for r in replies], q.delivery_status(self.settings.run_dir))
        self._cached = (time.monotonic(), view)
        return view

    async def cached_queue(self) -> dict:
        if self._cached is not None and time.monotonic() - self._cached[0] < QUEUE_CACHE_SECONDS:
            return self._cached[1]
        return await self.queue()

    # -------------------------------------------------------------- drain

    def draining(self) -> dict:
        try:
            with open(self.drain_path, "rb") as fh:
                info = orjson.loads(fh.read() or b"{}")
        except FileNotFoundError:
            return {"draining": False, "since": None}
        except (OSError, ValueError):
            info = {}
        return {"draining": True, "since": info.get("since") if isinstance(info, dict) else None}

    def set_drain(self, on: bool) -> None:
        if on:
            if os.path.exists(self.drain_path):
                return
            tmp = self.drain_path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps({"since": time.time(), "pid": os.getpid()}))
            os.rename(tmp, self.drain_path)
            log.warning("drain started: the node accepts no new mail (mta drain --cancel "
                        "resumes)")
        else:
            try:
                os.unlink(self.drain_path)
            except FileNotFoundError:
                return
            log.warning("drain cancelled: the node accepts mail again")

    async def drain_report(self) -> dict:
        out = self.draining()
        view = await self.queue()
        t = view["total"]
        out["remaining"] = {"messages": t["messages"], "recipients": t["recipients"],
                            "in_flight": t["in_flight"], "deferred": t["deferred"]}
        out["done"] = out["draining"] and t["messages"] == 0
        return out

    # -------------------------------------------------------------- routes

    async def handle(self, method: bytes, path: bytes) -> tuple[int, dict, bytes]:
        """Answer an /api/admin/ request other than health; (status, headers, body)."""
        try:
            if path == b"/api/admin/queue":
                _only(method, b"GET")
                return _json(200, await self.queue())
            if path.startswith(b"/api/admin/messages/"):
                _only(method, b"GET")
                return await self.message(path[len(b"/api/admin/messages/"):])
            if path == b"/api/admin/status":
                _only(method, b"GET")
                return _json(200, await self.status())
            if path == b"/api/admin/rules":
                _only(method, b"GET")
                now = time.time()
                return _json(200, {"results": [
                    adaptive.entry_view(e, now, self.settings.config.delivery.time_scale)
                    for e in adaptive.list_entries(self.adaptive_dir, now)]})
            if path.startswith(b"/api/admin/rules/"):
                _only(method, b"DELETE")
                what = urllib.parse.unquote(path[len(b"/api/admin/rules/"):].decode("latin-1"))
                gone = adaptive.cancel_entries(self.adaptive_dir, what) if what else []
                if not gone:
                    return _json(404, {"errors": [{"message": f"nothing in effect is called "
                                                              f"{what[:100]!r}"}]})
                now = time.time()
                log.warning("cancelled through the admin API: %s", ", ".join(
                    f"{e.kind} {e.rule} ({e.id})" for e in gone))
                return _json(200, {"cancelled": [
                    adaptive.entry_view(e, now, self.settings.config.delivery.time_scale)
                    for e in gone]})
            if path == b"/api/admin/drain":
                _only(method, b"GET", b"POST", b"DELETE")
                if method == b"POST":
                    self.set_drain(True)
                elif method == b"DELETE":
                    self.set_drain(False)
                return _json(200, await self.drain_report())
        except _MethodNotAllowed as exc:
            return _json(405, {"errors": [{"message": f"use {' or '.join(exc.allowed)} here"}]},
                         {"Allow": ", ".join(exc.allowed)})
        except Unavailable as exc:
            return _json(503, {"errors": [{"message": f"the spool is not answering: {exc}"}]},
                         {"Retry-After": "5"})
        return _json(404, {"errors": [{"message": "no such resource: "
                                                  + path.decode("latin-1")[:200]}]})

    async def message(self, raw: bytes) -> tuple[int, dict, bytes]:
        qid = raw.decode("latin-1")
        if not is_qid(qid):
            return _json(400, {"errors": [{"message": f"not a queue id: {qid[:100]!r}",
                                           "field": "qid"}]})
        reply = await self._ask(shard_of(qid, self.settings.shards), bus.SpoolMessageShow, qid)
        if reply.status != bus.STATUS_OK or reply.entry is None:
            return _json(404, {"errors": [{"message": f"{qid} is not queued"}]})
        return _json(200, q.recipients_view(reply.entry))

    async def status(self) -> dict:
        view, error = None, None
        try:
            view = await self.cached_queue()
        except Unavailable as exc:
            error = str(exc)
        return st.document(self.reports, self.collector.host_rows(), self.history, view,
                           error, self.draining())


class _MethodNotAllowed(Exception):
    def __init__(self, allowed):
        self.allowed = [m.decode() for m in allowed]


def _only(method: bytes, *allowed: bytes) -> None:
    if method == b"HEAD" and b"GET" in allowed:
        return
    if method not in allowed:
        raise _MethodNotAllowed(allowed)


def _json(status: int, body, extra: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json", **(extra or {})}, orjson.dumps(
        body, option=orjson.OPT_NON_STR_KEYS)
