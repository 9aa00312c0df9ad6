"""The admin API's reads and the node drain, behind the admin listener (mta/admin/main.py).

Routes (JSON; errors are ``{"errors": [{"message": ...}]}``):

``GET /api/admin/queue``
    the node's queue (:func:`mta.obs.queue.merge`): totals, per shard, and by
    domain, site, pool, source and campaign, and each webhook's backlog
    (``webhooks``).  A spool shard that does not answer within [admin] shard_timeout is
    named in ``not_answering`` and left out of the totals, which say ``partial``
    (so does a shard still reading its queue at start: ``state`` "recovering");
    503 when none answers.
``GET /api/admin/messages/QID``
    one queued message: envelope, each recipient's state, attempts and next
    attempt, and what holds a pending one back (``suspended``: the operator's
    suspension of its domain, campaign or pool, or delivery's of every source
    of its pool at its site); 400 for a malformed queue id, 404 when the
    message is not queued, 503 (Retry-After) when its shard is still reading its
    queue at start ("recovering").
``GET /api/admin/status``
    everything the status page shows (:mod:`mta.admin.status`).
``GET /api/admin/drain``, ``POST /api/admin/drain``, ``DELETE /api/admin/drain``
    the drain: whether the node is draining, since when, and what remains
    (messages, recipients, jobs in flight; ``partial`` and ``not_answering`` as in
    the queue view: never ``done`` while a shard is not counted); POST starts it,
    DELETE cancels it (done also when no shard answers: the 503 then says that it was).
``GET /api/admin/suspensions``, ``POST /api/admin/suspensions?FIELD=VALUE...``, ``DELETE /api/admin/suspensions/ID``
    the operator's suspensions: list, add, resume.  A suspension names any of
    ``domain``, ``campaign`` and ``pool`` (held back in the spool at dispatch,
    :mod:`mta.controls`), or ``site`` and/or ``source`` (a delivery
    suspension: an entry of rule ``admin`` in the adaptive store, which the
    delivery processes see within a second); with ``reason`` and ``duration``
    (seconds; none: until resumed).  The same selector again replaces its
    suspension.  Resuming a site or source suspension also makes the messages
    delivery handed back meanwhile due at once.  400 names a bad field (a
    ``source`` or ``pool`` the configuration does not have too).
``POST /api/admin/bounce?FIELD=VALUE...``, ``GET /api/admin/bounce[/ID]``
    a bulk bounce of every queued recipient that ``domain``, ``site`` (the
    domains the delivery processes know it serves), ``campaign`` and ``pool``
    match (at least one of them): each gets a ``bounce`` event of class 25 and,
    with ``dsn=1``, a DSN to the sender.  POST answers at once with the
    operation's id and total; GET reports ``done`` of ``total`` per operation
    until ``finished``.
``POST /api/admin/flush[?domain=D][&qid=QID...]``
    ``mta queue flush``: every deferred recipient (none of the fields), those at
    recipient domain ``domain``, of the messages ``qid`` (repeated; at most
    FLUSH_QIDS), or both, is due now; the delivery processes end their dead-site
    holds (after every host of a site failed) of those domains' sites only.
    Suspensions stay.  ``{"flushed": N, "not_queued": [QID...], "recovering": [SHARD...]}``
    (a shard still reading its queue at start answers at once and flushes once it
    has: not counted, with a ``note``); 400 for a malformed domain or queue id, 404
    when none of the ``qid`` is queued.
``GET /api/admin/rules``, ``DELETE /api/admin/rules/NAME-OR-ID``
    the suspensions, throttles, back-offs and warm-ups in effect (the response
    rule, reply, source, site, time left; as ``mta rules list --json``), read
    from ``<state_dir>/adaptive/``; DELETE ends those of rule NAME, or the one
    entry ID, as ``mta rules cancel`` (the delivery processes see it within a
    second); 404 when nothing in effect has that name.  Ending a suspension,
    throttle or back-off also makes what delivery handed back for it meanwhile due
    at once (``flushed``): what the lanes of its scope handed back (the spool's
    HandedBack), no other message.

The drain is the file ``<run>/drain``: each acceptor looks for it twice a
second and, while it exists, answers new SMTP connections and transactions
``421 4.3.2`` and HTTP injections 503 with Retry-After; delivery goes on.  The
supervisor removes it when it starts (a fresh start accepts mail).

The spool shards are asked over the bus (SPOOL_QUEUE_SUMMARY, SPOOL_MESSAGE_SHOW)
in a thread pool (a thread per shard: all are asked at once), so a slow shard never
stalls the listener; answers to the status page are cached for
``QUEUE_CACHE_SECONDS`` and made once for the status requests that come
meanwhile, so a page left open costs the shards at most one summary per that
time, and shards that do not answer hold ``mta status`` for ``[admin] shard_timeout``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import os
import secrets
import time
import urllib.parse

import orjson

from mta import bus
from mta import config as mconfig
from mta.admin import status as st
from mta.admin.metrics import DRAIN_FLAG   # (run/drain; read by the acceptors)
from mta.obs import queue as q
from mta.queueid import QID_SHAPE, is_qid, normal_qid, recipient_domain, shard_of
from mta.shaping import state as adaptive
from mta import controls as ctl

log = logging.getLogger("mta.admin")

QUEUE_CACHE_SECONDS = 1.0       # the status page's queue view is at most this old
WORKERS = 2                     # threads asking the spool shards, at least (one per shard:
                                # every shard is asked at once, so shards that do not
                                # answer hold a request for one [admin] shard_timeout, not one each)
SUSPEND_FIELDS = ("domain", "campaign", "pool", "site", "source")
BOUNCE_FIELDS = ("domain", "site", "campaign", "pool")
MAX_DURATION = 10 * 366 * 86400.0   # seconds a suspension may be given
FOREVER = 100 * 366 * 86400.0     # a delivery suspension "until resumed" lasts this long
FLUSH_QIDS = 100                # queue ids one flush request names at most
RECOVERING = "recovering (reading its queue: retry shortly)"
DELIVERY_SEES = 10.0            # seconds to wait, at most, for every delivery process
                                # to have read the store (they do once a second)


class ServerError(Exception):
    """A problem of this node's own files (503, with what it is)."""


class BadRequest(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


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
        self.pool = concurrent.futures.ThreadPoolExecutor(max(WORKERS, settings.shards),
                                                          "admin-spool")
        self.history = st.History()
        self.shard_timeout = settings.config.admin.shard_timeout
        self.drain_path = os.path.join(settings.run_dir, DRAIN_FLAG)
        # when a drain was last cancelled here: the agent check (mta.admin.agent) says
        # drain SEEN_DRAIN more, until the acceptors have seen it too
        self.drain_cancelled = float("-inf")
        self._cached: tuple[float, dict] | None = None
        self._asking: asyncio.Future | None = None     # the status's queue view being made
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
        endpoint = self.settings.spool_endpoint(shard)
        if not os.path.exists(endpoint[len("ipc://"):]):
            raise Unavailable(f"spool[{shard}] is not running")
        cl = bus.SyncClient(self.ctx, endpoint)
        try:
            return cl.call(request, *values, timeout=self.shard_timeout)
        except TimeoutError:
            raise Unavailable(f"spool[{shard}] did not answer within {self.shard_timeout:g}s") \
                from None
        finally:
            cl.close()

    async def _ask(self, shard: int, request, *values):
        return await self.loop.run_in_executor(self.pool, self._call, shard, request, *values)

    async def queue(self) -> dict:
        """The queue view (:func:`mta.obs.queue.merge`) of the shards that answered within
        [admin] shard_timeout, the others named in ``not_answering`` (``total.partial``);
        Unavailable when none did."""
        replies = await asyncio.gather(*(self._ask(n, bus.SpoolQueueSummary)
                                         for n in range(self.settings.shards)),
                                       return_exceptions=True)
        answered, missing = [], []
        for n, r in enumerate(replies):
            if isinstance(r, Unavailable):
                missing.append({"shard": n, "error": str(r)})
            elif isinstance(r, BaseException):
                raise r
            else:
                answered.append(r.summary)
        if not answered:
            raise Unavailable("; ".join(x["error"] for x in missing))
        view = q.merge(answered, q.delivery_status(self.settings.run_dir),
                       q.webhook_status(self.settings.state_dir,
                                        self.settings.config.webhooks.enabled), missing)
        self._cached = (time.monotonic(), view)
        return view

    async def cached_queue(self) -> dict:
        """The queue view, at most QUEUE_CACHE_SECONDS old; status requests that come while
        it is being made wait for that one (they asked every shard again each, behind
        one another in the pool, when shards did not answer)."""
        if self._cached is not None and time.monotonic() - self._cached[0] < QUEUE_CACHE_SECONDS:
            return self._cached[1]
        if self._asking is None or self._asking.done():
            self._asking = self.loop.create_task(self.queue())
        return await asyncio.shield(self._asking)

    # -------------------------------------------------------------- drain

    def draining(self) -> dict:
        try:
            with open(self.drain_path, "rb") as fh:
                info = orjson.loads(fh.read() or b"{}")
        except FileNotFoundError:
            return {"draining": False, "since": None}
        except (OSError, ValueError):
            info = {}
        since = info.get("since") if isinstance(info, dict) else None
        if since is None:
            try:        # (a flag made by hand: its time)
                since = os.stat(self.drain_path).st_mtime
            except OSError:
                pass
        return {"draining": True, "since": since}

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
            self.drain_cancelled = time.monotonic()
            log.warning("drain cancelled: the node accepts mail again")

    async def drain_report(self) -> dict:
        out = self.draining()
        view = await self.queue()
        t = view["total"]
        out["remaining"] = {"messages": t["messages"], "recipients": t["recipients"],
                            "in_flight": t["in_flight"], "deferred": t["deferred"]}
        # Mail still on its way in (a DATA begun before the drain) lands after the queue
        # looked empty: done also needs every acceptor to say none is open.
        since = time.time() - out["since"] if out["since"] else 0.0
        busy, settled = self.reports.transactions_open(since)
        out["remaining"]["transactions_open"] = busy
        # ([delivery] hold: the queue does not empty, so the drain is never done)
        out["delivery_held"] = any(x.get("held") for x in view.get("shards", ()))
        # (a shard that did not answer, or is still reading its queue: its messages are
        # not counted, so zero is not the node's queue)
        out["partial"] = t["partial"]
        out["not_answering"] = view["not_answering"]
        out["recovering"] = [x["shard"] for x in view["shards"] if x.get("recovering")]
        out["done"] = (out["draining"] and t["messages"] == 0 and not t["partial"]
                       and not t.get("recovering") and busy == 0 and settled)
        return out

    # -------------------------------------------------------------- routes

    async def handle(self, method: bytes, path: bytes,
                     query: bytes = b"") -> tuple[int, dict, bytes]:
        """Answer an /api/admin/ request other than health; (status, headers, body)."""
        try:
            if path == b"/api/admin/suspensions":
                _only(method, b"GET", b"POST")
                if method == b"POST":
                    view = self.suspend(_query(query))
                    if view["kind"] == "spool":
                        await self._refresh_shards()
                    else:        # answered once the delivery processes hold to it
                        await self._delivery_sees(view["id"], True)
                    return _json(200, {"suspension": view})
                return _json(200, {"results": self.suspensions()})
            if path.startswith(b"/api/admin/suspensions/"):
                _only(method, b"DELETE")
                sid = urllib.parse.unquote(path[len(b"/api/admin/suspensions/"):]
                                           .decode("latin-1"))
                return await self.resume(sid)
            if path == b"/api/admin/bounce":
                _only(method, b"GET", b"POST")
                if method == b"POST":
                    return _json(200, await self.bounce(_query(query)))
                return _json(200, {"results": await self.bounce_progress("")})
            if path.startswith(b"/api/admin/bounce/"):
                _only(method, b"GET")
                op = urllib.parse.unquote(path[len(b"/api/admin/bounce/"):].decode("latin-1"))
                found = await self.bounce_progress(op) if op else []
                if not found:
                    return _json(404, {"errors": [{"message": f"no bulk bounce {op[:80]!r} "
                                                              "is known"}]})
                return _json(200, found[0])
            if path == b"/api/admin/flush":
                _only(method, b"POST")
                return await self.flush(query)
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
                log.warning("cancelled through the admin API: %s", ", ".join(
                    f"{e.kind} {e.rule} ({e.id})" for e in gone))
                # as resume(): what delivery handed back for these limits (a suspension,
                # a throttle's or a back-off's rate, a warm-up cap) is due again now
                flushed = await self._release(gone)
                now = time.time()
                return _json(200, {"cancelled": [
                    adaptive.entry_view(e, now, self.settings.config.delivery.time_scale)
                    for e in gone], "flushed": flushed})
            if path == b"/api/admin/drain":
                _only(method, b"GET", b"POST", b"DELETE")
                if method == b"POST":
                    self.set_drain(True)
                elif method == b"DELETE":
                    self.set_drain(False)
                try:
                    return _json(200, await self.drain_report())
                except Unavailable as exc:
                    if method == b"GET":
                        raise
                    # (done all the same: the error must not read as if it were not)
                    raise Unavailable(f"{exc}; the drain is " + (
                        "started: the node refuses new mail until 'mta drain --cancel'"
                        if method == b"POST" else "cancelled: the node accepts mail "
                        "again")) from None
        except BadRequest as exc:
            return _json(400, {"errors": [{"message": str(exc), "field": exc.field}]})
        except ServerError as exc:
            return _json(503, {"errors": [{"message": str(exc)}]}, {"Retry-After": "5"})
        except _MethodNotAllowed as exc:
            return _json(405, {"errors": [{"message": f"use {' or '.join(exc.allowed)} here"}]},
                         {"Allow": ", ".join(exc.allowed)})
        except Unavailable as exc:
            return _json(503, {"errors": [{"message": f"the spool is not answering: {exc}"}]},
                         {"Retry-After": "5"})
        return _json(404, {"errors": [{"message": "no such resource: "
                                                  + path.decode("latin-1")[:200]}]})

    # ------------------------------------------------------- suspensions

    def _suspensions_path(self) -> str:
        return ctl.path_of(self.settings.state_dir)

    def suspensions(self) -> list[dict]:
        """Every suspension the operator put in effect (spool and delivery ones)."""
        now = time.time()
        try:
            items = ctl.in_effect(ctl.load(self._suspensions_path()), now)
        except (OSError, ValueError) as exc:
            raise ServerError(f"the suspensions file cannot be read: {exc}") from None
        out = [_spool_view(x) for x in items]
        for e in adaptive.list_entries(self.adaptive_dir, now):
            if e.kind == adaptive.SUSPEND and e.rule == adaptive.ADMIN_RULE:
                out.append(_delivery_view(e))
        return out

    async def _refresh_shards(self) -> None:
        """Have every running shard read the suspensions file now (one that is not
        running reads it when it starts)."""
        await asyncio.gather(*(self._ask(n, bus.SpoolAdminRefresh)
                               for n in range(self.settings.shards)), return_exceptions=True)

    def suspend(self, params: dict) -> dict:
        fields, reason, extra = _fields(params, SUSPEND_FIELDS, ("duration",))
        duration = extra["duration"]
        if not fields:
            raise BadRequest("domain", "name what to suspend: " + ", ".join(SUSPEND_FIELDS))
        seconds = 0.0
        if duration:
            try:
                seconds = float(duration)
            except ValueError:
                seconds = -1.0
            if not (0 < seconds <= MAX_DURATION) or not math.isfinite(seconds):
                raise BadRequest("duration", f"duration: seconds, more than 0 and at most "
                                             f"{MAX_DURATION:.0f}")
        # A typo would be stored and hold nothing: only what the configuration has -- the
        # one the supervisor applies now (a reload adds and removes sources and pools, and
        # this process is not replaced); as at start when its record cannot be read.
        active = mconfig.read_active(self.settings.run_dir) or self.settings
        for k, known in (("source", active.sources), ("pool", active.pools)):
            if k in fields and fields[k] not in known:
                names = sorted(known)
                raise BadRequest(k, f"{k}: no {k} {fields[k]!r} is configured (there are "
                                    f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
        now = time.time()
        delivery = {k for k in fields if k in ("site", "source")}
        if delivery and len(delivery) != len(fields):
            other = sorted(set(fields) - delivery)[0]
            raise BadRequest(other, f"{other}: a site or source suspension is delivery's and "
                                    "takes no domain, campaign or pool")
        if delivery:
            site, source = fields.get("site", ""), fields.get("source", "")
            scope = "source_site" if site and source else ("site" if site else "source")
            e = adaptive.Entry(id=adaptive.entry_id(adaptive.SUSPEND, scope, source, site),
                               kind=adaptive.SUSPEND, scope=scope, source=source, site=site,
                               rule=adaptive.ADMIN_RULE, reply=reason[:adaptive.MAX_REPLY],
                               stage="admin", created=now,
                               until=now + (seconds or FOREVER))
            store = adaptive.Store(self.adaptive_dir, active.config.backoff.max_entries)
            try:
                if not store.put(e, strict=True):
                    raise ServerError("the adaptive store is full (backoff.max_entries)")
            except OSError as exc:
                raise ServerError(f"the adaptive store cannot be written: {exc}") from None
            view = _delivery_view(e)
            if site:
                known = q.delivery_status(self.settings.run_dir)["sites"]
                if site not in known:
                    # Kept all the same (a site is named once delivery routes mail to
                    # it), but a typo would hold nothing: say so.
                    view["note"] = (f"no delivery process routes mail to a site named "
                                    f"{site!r} now (mta queue summary --by site lists "
                                    "them); the suspension holds when one does")
        else:
            key = "|".join(fields.get(k, "") for k in ctl.SPOOL_FIELDS)
            sid = "s" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                        digest_size=5).hexdigest()
            path = self._suspensions_path()
            try:
                items = [x for x in ctl.in_effect(ctl.load(path), now) if x.id != sid]
            except (OSError, ValueError) as exc:
                raise ServerError(f"the suspensions file cannot be read: {exc}") from None
            if len(items) >= ctl.MAX_SUSPENSIONS:
                raise BadRequest("domain", f"{ctl.MAX_SUSPENSIONS} suspensions are in effect "
                                           "already; resume some first")
            s = ctl.Suspension(id=sid, reason=reason, created=now,
                               until=now + seconds if seconds else 0.0, **fields)
            try:
                ctl.save(path, items + [s])
            except OSError as exc:
                raise ServerError(f"the suspensions file cannot be written: {exc}") from None
            view = _spool_view(s)
        log.warning("suspended by the operator: %s (id %s)%s: %s",
                    " ".join(f"{k}={v}" for k, v in fields.items()), view["id"],
                    f" for {seconds:g}s" if seconds else " until resumed", reason or "-")
        return view

    async def _delivery_sees(self, eid: str, present: bool) -> None:
        """Wait until every delivery process has read the adaptive store since now and
        holds entry *eid* (*present*) or no longer does: its status file says when it
        last read the store and what it holds.  At most DELIVERY_SEES seconds (a
        process that is restarting reads the store when it starts)."""
        since = time.time()
        paths = [q.delivery_status_path(self.settings.run_dir, d)
                 for d in range(self.settings.deliveries)]
        deadline = time.monotonic() + DELIVERY_SEES
        while True:
            behind = [p for p in paths if not _holds(p, eid, since, present)]
            if not behind:
                return
            if time.monotonic() > deadline:
                log.warning("%d delivery process(es) did not show the change to %s within "
                            "%.0fs", len(behind), eid, DELIVERY_SEES)
                return
            await asyncio.sleep(0.05)

    async def resume(self, sid: str) -> tuple[int, dict, bytes]:
        path = self._suspensions_path()
        try:
            items = ctl.load(path)
        except (OSError, ValueError) as exc:
            raise ServerError(f"the suspensions file cannot be read: {exc}") from None
        gone = [x for x in items if x.id == sid]
        if gone:
            try:
                ctl.save(path, [x for x in items if x.id != sid])
            except OSError as exc:
                raise ServerError(f"the suspensions file cannot be written: {exc}") from None
            log.warning("resumed by the operator: suspension %s", sid)
            await self._refresh_shards()
            return _json(200, {"resumed": _spool_view(gone[0]), "flushed": 0})
        for e in adaptive.list_entries(self.adaptive_dir):
            if e.id == sid and e.kind == adaptive.SUSPEND and e.rule == adaptive.ADMIN_RULE:
                adaptive.cancel_entries(self.adaptive_dir, sid)
                log.warning("resumed by the operator: suspension %s", sid)
                flushed = await self._release([e])
                return _json(200, {"resumed": _delivery_view(e), "flushed": flushed})
        return _json(404, {"errors": [{"message": f"no suspension {sid[:80]!r} is in effect"}]})

    async def _release(self, ended: list) -> int:
        """After the adaptive entries *ended* (suspensions, throttles, back-offs) were
        deleted from the store: make what delivery handed back for them due at once --
        only what the lanes they limited handed back, (site, source) of their scope, and
        what no source of a pool could take there; how many recipients."""
        if not ended:
            return 0
        # the delivery processes read the store once a second: once they have,
        for e in ended:
            await self._delivery_sees(e.id, False)
        lanes = release_lanes(ended)
        replies = await asyncio.gather(*(
            self._ask(n, bus.SpoolQueueFlush, True, [], [], lanes)
            for n in range(self.settings.shards)), return_exceptions=True)
        return sum(r.count for r in replies if isinstance(r, bus.SpoolQueueFlushReply))

    # ------------------------------------------------------------- flush

    async def flush(self, query: bytes) -> tuple[int, dict, bytes]:
        """``mta queue flush [--domain D] [--queue-id QID...]`` (the module's doc)."""
        try:
            pairs = urllib.parse.parse_qsl(query.decode("utf-8"), keep_blank_values=True,
                                           max_num_fields=FLUSH_QIDS + 1)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest("query", f"query: {exc} (at most {FLUSH_QIDS} queue ids in "
                                      "one request)") from None
        domains: list[str] = []
        qids: list[str] = []
        for k, v in pairs:
            if k == "domain":
                if domains:
                    raise BadRequest(k, "domain: one domain a request")
                try:
                    d = ctl.check_field(k, v)
                except ValueError as exc:
                    raise BadRequest(k, str(exc)) from None
                if not _is_domain(d):
                    raise BadRequest(k, f"domain: not a domain name: {v[:100]!r}")
                domains.append(d)
            elif k == "qid":
                if not is_qid(normal_qid(v)):
                    raise BadRequest(k, f"qid: not a queue id ({QID_SHAPE}): {v[:100]!r}")
                v = normal_qid(v)
                if v not in qids:
                    qids.append(v)
            else:
                raise BadRequest(k, f"{k[:100]}: not a field here (use domain, qid)")
        if len(qids) > FLUSH_QIDS:
            raise BadRequest("qid", f"qid: at most {FLUSH_QIDS} queue ids in one request")
        by_shard: dict[int, list[str]] = {}
        for qid in qids:
            by_shard.setdefault(shard_of(qid, self.settings.shards), []).append(qid)
        asked = list(by_shard) if qids else list(range(self.settings.shards))
        replies = await asyncio.gather(*(
            self._ask(n, bus.SpoolQueueFlush, False, domains, by_shard.get(n, []))
            for n in asked), return_exceptions=True)
        failed = [r for r in replies if isinstance(r, BaseException)]
        # a shard still reading its queue at start answers at once and flushes then
        recovering = [n for n, r in zip(asked, replies)
                      if not isinstance(r, BaseException) and r.recovering]
        replies = [r for r in replies if not isinstance(r, BaseException)]
        for exc in failed:
            if not isinstance(exc, Unavailable):
                raise exc
        body = {"flushed": sum(r.count for r in replies),
                "not_queued": [q for r in replies for q in r.unknown],
                "recovering": recovering}
        if failed:
            # The shards that answered flushed their mail: said, not lost in the error
            # of the one that did not (the operator runs it again once that one is back).
            what = "; ".join(str(e) for e in failed)
            if replies:
                what += (f"; the other spool shard(s) flushed {body['flushed']} deferred "
                         "recipient(s)")
            log.warning("queue flush through the admin API: %s", what)
            raise Unavailable(what)
        log.info("queue flushed through the admin API%s: %d recipient(s) due now",
                 "".join(f" domain={d}" for d in domains) + "".join(f" qid={q}" for q in qids),
                 body["flushed"])
        if recovering:
            body["note"] = (f"spool shard(s) {recovering} are still reading their queue "
                            "after a start: the flush is done there once they have (not "
                            "counted in flushed; a queue id not queued there is not named)")
        if qids and len(body["not_queued"]) == len(qids):
            body["errors"] = [{"message": f"not queued: {' '.join(qids)}", "field": "qid"}]
            return _json(404, body)
        return _json(200, body)

    # ------------------------------------------------------- bulk bounce

    async def bounce(self, params: dict) -> dict:
        sel, reason, extra = _fields(params, BOUNCE_FIELDS, ("dsn",))
        dsn = extra["dsn"] or "0"
        if dsn not in ("0", "1", "true", "false"):
            raise BadRequest("dsn", "dsn: 0 or 1")
        if not sel:
            raise BadRequest("domain", "name what to bounce: domain, site, campaign or pool")
        domains = [sel["domain"]] if "domain" in sel else []
        if "site" in sel:
            known = q.delivery_status(self.settings.run_dir)["sites"].get(sel["site"])
            if not known or not known["domains"]:
                raise BadRequest("site", f"site: no delivery process knows site "
                                         f"{sel['site']!r} (mta queue summary --by site); "
                                         "a site is known once delivery routes mail to it "
                                         "since its last start or reload: --domain names "
                                         "the recipient domains themselves")
            site_domains = sorted(known["domains"])
            domains = [d for d in site_domains if not domains or d in domains]
            if not domains:
                return {"id": "", "total": 0, "done": 0, "finished": True}
        selector = {"domains": domains, "campaign": sel.get("campaign", ""),
                    "pool": sel.get("pool", "")}
        # Every shard must be able to start it now: one still reading its queue would
        # hold the request past our timeout and start it unseen.
        view = await self.queue()
        if view["not_answering"]:       # (started nowhere rather than on some shards)
            raise Unavailable("; ".join(x["error"] for x in view["not_answering"]))
        recovering = [x["shard"] for x in view["shards"] if x.get("recovering")]
        if recovering:
            raise ServerError(f"spool shard(s) {recovering} are still reading their queue "
                              "after a start; try again in a few seconds")
        op = f"b{int(time.time()):x}{secrets.token_hex(3)}"
        replies = await asyncio.gather(*(
            self._ask(n, bus.SpoolAdminBounce, op, selector, reason, dsn in ("1", "true"))
            for n in range(self.settings.shards)), return_exceptions=True)
        failed = [f"spool[{n}]: {r}" for n, r in enumerate(replies)
                  if isinstance(r, BaseException)]
        if failed:
            raise ServerError(f"bulk bounce {op} did not start everywhere ({'; '.join(failed)});"
                              f" the shards that answered are running it (GET "
                              f"/api/admin/bounce/{op})")
        for r in replies:
            if r.status != bus.STATUS_OK:
                raise BadRequest("selector", r.error or "a spool shard refused the selector")
        return _combine(op, [o for r in replies for o in r.ops])

    async def bounce_progress(self, op: str) -> list[dict]:
        replies = await asyncio.gather(*(self._ask(n, bus.SpoolAdminProgress, op)
                                         for n in range(self.settings.shards)))
        by_op: dict[str, list] = {}
        for r in replies:
            for o in r.ops:
                by_op.setdefault(o["id"], []).append(o)
        return [_combine(k, v) for k, v in sorted(by_op.items(),
                                                  key=lambda kv: min(o["started"]
                                                                     for o in kv[1]))]

    async def message(self, raw: bytes) -> tuple[int, dict, bytes]:
        given = raw.decode("latin-1")
        qid = normal_qid(given)
        if not is_qid(qid):
            return _json(400, {"errors": [{"message": f"not a queue id ({QID_SHAPE}): {given[:100]!r}",
                                           "field": "qid"}]})
        n = shard_of(qid, self.settings.shards)
        reply = await self._ask(n, bus.SpoolMessageShow, qid)
        if reply.recovering:
            return _json(503, {"errors": [{"message": f"spool[{n}] (the shard of {qid}) is "
                                           f"{RECOVERING}"}]}, {"Retry-After": "5"})
        if reply.status == bus.STATUS_STORAGE:
            return _json(503, {"errors": [{"message": f"{qid} is queued but its record "
                                           "cannot be read (see the log)"}]})
        if reply.status != bus.STATUS_OK or reply.entry is None:
            return _json(404, {"errors": [{"message": f"{qid} is not queued"}]})
        view = q.recipients_view(reply.entry)
        self._delivery_holds(view)
        return _json(200, view)

    def _delivery_holds(self, view: dict, now: float | None = None) -> None:
        """Mark the pending recipients of *view* that delivery holds back: every source of
        the message's pool suspended, for the recipient's site or as a whole -- by a
        response rule, by the operator (``mta suspend --site/--source``) or because it
        cannot connect.  Delivery hands such mail back without an attempt, so the spool
        knows only its next look; the recipient's ``suspended`` (otherwise the spool's
        suspension that holds it) names the one of these that ends first, with the
        ``site`` and ``source``.  Read from the adaptive store and the delivery
        processes' status files: nothing on a delivery path pays for it."""
        pending = [r for r in view["recipients"]
                   if r["next_attempt"] is not None and r["suspended"] is None]
        if not pending:
            return
        now = time.time() if now is None else now
        entries = {e.id: e for e in adaptive.list_entries(self.adaptive_dir, now)
                   if e.kind == adaptive.SUSPEND and e.until > now}
        status = q.delivery_status(self.settings.run_dir, now)
        down = {name: s for name, s in status["sources"].items()
                if s["suspended_until"] > now}
        warm = status.get("warmup") or {}
        if not entries and not down and not warm:
            return
        active = mconfig.read_active(self.settings.run_dir) or self.settings
        # (as delivery picks: the recorded pool, "default" when none is; one removed
        # since: egress.default_pool)
        pool = view.get("ip_pool") or mconfig.DEFAULT
        if pool not in active.pools:
            pool = active.config.egress.default_pool
        members = [s for s, _ in active.pools.get(pool, ())]
        if not members:
            return
        dcfg = getattr(active.config, "delivery", None)
        scale = getattr(dcfg, "time_scale", 1.0)
        if warm:
            # a warming source at its cap for the site holds the mail as a suspension
            # does -- unless it overflows to a pool with a source that may send
            over = {p.name: p.overflow_pool for p in active.config.egress.pool
                    if p.overflow_pool}.get(pool)
            if over and any(w.overflow == "other_sources" for w in active.config.warmup
                            if w.source in members):
                members = members + [s for s, _ in active.pools.get(over, ())
                                     if s not in members]
        wanted = {recipient_domain(r["address"]) for r in pending}
        site_of = {}                  # (a site's domains: up to hundreds of thousands)
        for name, s in status["sites"].items():
            for d in s["domains"]:
                if d in wanted:
                    site_of[d] = name
        for r in pending:
            site = site_of.get(recipient_domain(r["address"]), "")
            holds = []
            for src in members:
                hold = None
                for eid in ((adaptive.entry_id(adaptive.SUSPEND, "source_site", src, site),
                             adaptive.entry_id(adaptive.SUSPEND, "site", "", site))
                            if site else ()) + (
                        adaptive.entry_id(adaptive.SUSPEND, "source", src, ""),):
                    e = entries.get(eid)
                    if e is not None:
                        who = "the operator" if e.rule == adaptive.ADMIN_RULE \
                            else f"rule {e.rule}"
                        view_e = _delivery_view(e)
                        hold = {"id": e.id, "until": view_e["until"], "site": site or None,
                                "source": src,
                                "reason": f"{_hold_scope(e, src, site)} suspended by {who}"
                                          + (f": {e.reply}" if e.reply else "")}
                        break
                if hold is None and src in down:
                    hold = {"id": None, "until": down[src]["suspended_until"],
                            "site": site or None, "source": src,
                            "reason": f"source {src} cannot send: {down[src]['reason']}"}
                if hold is None and site and src in warm:
                    hold = _warmup_hold(warm[src], src, site, scale, now)
                if hold is None:
                    break           # this source may send: nothing holds the recipient
                holds.append(hold)
            else:
                # every source held: the first to end frees it ("until resumed" last)
                r["suspended"] = min(holds, key=lambda h: (h["until"] is None,
                                                           h["until"] or 0.0))

    async def status(self) -> dict:
        view, error = None, None
        try:
            view = await self.cached_queue()
        except Unavailable as exc:
            error = str(exc)
        doc = st.document(self.reports, self.collector.host_rows(), self.history, view,
                          error, self.draining())
        try:       # the operator's suspensions too (as "source": what it holds back)
            for x in self.suspensions():
                what = " ".join(f"{k}={x[k]}" for k in SUSPEND_FIELDS if x.get(k))
                doc["suspensions"].append({"source": f"operator: {what}", "until": x["until"],
                                           "reason": x["reason"], "id": x["id"]})
        except ServerError as exc:
            log.warning("status: %s", exc)
        return doc


def _is_domain(d: str) -> bool:
    """Whether *d* (lower case) can be a recipient domain: a domain literal, or labels
    of letters (an IDN's too), digits, '-' and '_' of at most 63 characters each."""
    if d.startswith("[") and d.endswith("]"):
        return 2 < len(d) <= 255 and not any(c.isspace() for c in d)
    return 0 < len(d) <= 255 and all(
        0 < len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)
        for label in d.split("."))


def _query(query: bytes) -> dict[str, str]:
    """A query string's fields (the last of a repeated one); BadRequest when undecodable."""
    try:
        pairs = urllib.parse.parse_qsl(query.decode("utf-8"), keep_blank_values=True,
                                       strict_parsing=False, max_num_fields=20)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("query", f"query: {exc}") from None
    return dict(pairs)


def _fields(params: dict, selectors: tuple, others: tuple) -> tuple[dict, str, dict]:
    """(the selector fields given, checked; reason; the *others*, "" when absent) from a
    query; BadRequest names a field that is bad or not one of these."""
    sel = {}
    for k in (*selectors, "reason"):
        v = params.pop(k, None)
        if v is not None or k == "reason":
            try:
                v = ctl.check_field(k, v or "")
            except ValueError as exc:
                raise BadRequest(k, str(exc)) from None
            if k != "reason":
                if not v:      # (a blank field must not widen the selector to everything)
                    raise BadRequest(k, f"{k}: empty")
                if k == "domain" and not _is_domain(v):
                    # (as the flush's: one with a space would be kept and match nothing)
                    raise BadRequest(k, f"domain: not a domain name: {v[:100]!r}")
                sel[k] = v
    extra = {k: params.pop(k, "") for k in others}
    if params:
        k = sorted(params)[0]
        raise BadRequest(k, f"{k}: not a field here (use {', '.join(selectors)}, reason, "
                            f"{', '.join(others)})")
    return sel, v, extra


def _spool_view(s: ctl.Suspension) -> dict:
    return {"id": s.id, "kind": "spool", "domain": s.domain or None,
            "campaign": s.campaign or None, "pool": s.pool or None, "site": None,
            "source": None, "reason": s.reason, "created": s.created, "until": s.until or None}


def release_lanes(entries) -> list[tuple[str, str]]:
    """The lanes ((site, source) patterns of the spool's HandedBack, "*" any) whose mail
    delivery handed back because of the adaptive *entries* (their scope), and, at those
    sites, what no source of a pool could take (source ""); at most MAX_FLUSH_NAMES
    (more: every lane)."""
    out: dict = {}
    for e in entries:
        site = e.site or "*"
        out[(site, e.source or "*")] = None
        out[(site, "")] = None
    lanes = list(out)
    return lanes if len(lanes) <= bus.MAX_FLUSH_NAMES else [("*", "*")]


def _holds(path: str, eid: str, since: float, present: bool) -> bool:
    """Whether the delivery status file *path* was made from a read of the adaptive
    store at or after *since* and lists entry *eid* (*present*) or does not."""
    status = q.read_status(path)
    if status is None or status.get("adaptive_read", 0.0) < since:
        return False
    return any(e.get("id") == eid for e in status.get("adaptive", ())) == present


def _warmup_hold(w: dict, source: str, site: str, scale: float, now: float) -> dict | None:
    """The hold of warming *source* (*w*: its delivery status, node-wide) at its hourly or
    daily cap for *site*, in the words of the other holds, until its window rolls over
    (windows count from its first use; None when that is not known); None: not capped."""
    counts = (w.get("sites") or {}).get(site)
    if not counts:
        return None
    first = w.get("first_use")
    until = None
    said = []
    for kind, cap_key, length, words in (("hour", "hourly", 3600.0, "this hour"),
                                          ("day", "daily", 86400.0, "today")):
        cap, n = w.get(cap_key), counts.get(kind)
        if cap and n is not None and n >= cap:
            said.append(f"{n} of {cap} {words}")
            if first is not None:
                length *= scale
                end = first + (int(max(0.0, now - first) // length) + 1) * length
                until = end if until is None else max(until, end)
    if not said:
        return None
    return {"id": None, "until": until, "site": site, "source": source,
            "reason": f"source {source} at its warm-up cap for site {site} "
                      f"({', '.join(said)})"}


def _hold_scope(e, source: str, site: str) -> str:
    """What a delivery suspension *e* holds, in words, for mail from *source* to *site*."""
    if e.scope == "source_site":
        return f"source {source} at site {site}"
    return f"site {site}" if e.scope == "site" else f"source {source}"


def _delivery_view(e) -> dict:
    return {"id": e.id, "kind": "delivery", "domain": None, "campaign": None, "pool": None,
            "site": e.site or None, "source": e.source or None, "reason": e.reply,
            # (half: now + FOREVER - now may round to a little less than FOREVER)
            "created": e.created,
            "until": e.until if e.until - e.created < FOREVER / 2 else None}


def _combine(op: str, parts: list[dict]) -> dict:
    return {"id": op, "total": sum(p["total"] for p in parts),
            "done": sum(p["done"] for p in parts),
            "finished": all(p["finished"] for p in parts),
            "started": min((p["started"] for p in parts), default=None)}


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
