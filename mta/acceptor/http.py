"""The HTTP injection server: SparkPost's ``POST /api/v1/transmissions`` on httptools.

One :class:`Session` (an ``asyncio.Protocol``) per connection, fed to an
``httptools.HttpRequestParser``; one :class:`Service` per acceptor holds what
the sessions share (keys, limits, the idempotency store, pending counts).

HTTP/1.1 with keep-alive.  Pipelined requests are parsed as they arrive and
answered strictly in order, one at a time: a request whose messages are on
their way to the spool holds the ones behind it (at most ``http.max_pipelined`` are
read ahead, or ``http.max_pipelined_bytes`` octets of their bodies, then reading pauses).  ``Expect: 100-continue`` is answered when
the request is next in line, its announced size is acceptable and its API key
is accepted -- otherwise that refusal is the answer, with its body unread and the
connection closed (never to an HTTP/1.0 request: 1.0 clients know no interim
responses).  Without the expectation too, a request with a body whose API key
is refused gets that answer once its header is in, its body unread, and the
connection closes: only a caller with a key has its body held.  A transfer coding other than ``chunked`` is a 501, and the
connection closes (RFC 9112 6.1).

Limits, each answered with a SparkPost-shaped JSON error, after which the
connection is closed: a request URI over ``http.max_header_size`` → 414,
request line + header fields over it → 431; a body over ``http.max_body_size`` → 413 (as
soon as Content-Length says so, or when the chunks add up; a suppression-list PUT with
a valid key may be as large as ``suppression.max_body_size``, SparkPost's 50 MB, when
that is more); a request not
complete within ``http.request_timeout`` of its first byte → 408 (slow
clients); more than ``http.max_connections`` per acceptor, or than
``http.max_connections_per_ip`` from one client (counted as SMTP's per-client
limits count it: ``peers.client_key``; 0, the default, is no limit) → 503 with
Retry-After, and the connection is closed -- as SMTP's listener answers 421 and
closes, not a silent close at accept.  Idle
keep-alive connections are closed after ``http.keepalive_timeout``.  Timeouts
are checked by the acceptor's sweep (every 0.5 s): no timer per request.

A transmission (see :mod:`mta.api`): authorize (``http.api_keys``; none
configured → loopback clients only), Content-Type ``application/json`` and
no content coding (a compressed body is a 415 with ``Accept-Encoding:
identity``), decode and check, then ``Idempotency-Key``, then one message per recipient
built and handed to ``Acceptor.submit`` — the same path, bus and group-committed
spool as SMTP — ``BUILD_SLICE`` recipients per loop iteration, or fewer when
they have taken ``http.build_slice_time`` (costly templates), so a large request does not
stall other connections.  The response is sent only when
every message has its answer from the spool:

- all durable → 200; invalid recipients → 200 with SparkPost's partial shape
  (code 2000, ``rcpt_to_errors``), and, the transmission being created, each
  of them that names an address gets a ``generation_failure`` (its message
  could not be rendered) or ``generation_rejection`` (its data broke a rule)
  event, made durable through a spool shard before the response
  (``Acceptor.commit_events``; if the spool does not take them the response
  is the same and a warning is logged: the accepted recipients are durable);
- some durable, others refused by the spool (storage error, timeout, full
  queue) → 200 partial: the refused ones are in ``rcpt_to_errors`` with code
  1901 "temporary failure" and count as rejected — retry those recipients;
- none durable because of the spool → 503 with Retry-After; none because
  every recipient is invalid → 422 naming the first one.

Back-pressure: a request that would take the acceptor's messages waiting for
the spool over ``http.max_pending_messages`` → 429 with Retry-After; low
spool space → 503 with Retry-After.  While the acceptor drains (SIGTERM,
reload) requests in progress finish and responses say ``Connection: close``.

Hot path cost per single-recipient request: one parse, one msgspec decode,
one message build, one ``submit`` (batched per shard per loop iteration), one
write.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import functools
import hashlib
import logging
import os
import time
from email.utils import formatdate

import httptools

from mta import browser
from mta.acceptor.closing import close_lingering
from mta.acceptor import proxy
from mta.acceptor.peers import client_key, peer_address
from mta.config import DEFAULT as DEFAULT_POOL
from mta.feedback import suppression as suppression_list
from mta.api import build, idempotency, transmissions
from mta.api import events as events_api
from mta.api import suppression as suppression_api
from mta.api import webhooks as webhooks_api
from mta.feedback import events_store
from mta.idn import ascii_address
from mta.api import replies as R
from mta.obs import events as ev

log = logging.getLogger("mta.acceptor")

BODY_PARTS = 64          # pieces of a body kept as they came; the rest is copied into the last
BUILD_SLICE = 256        # recipients built and submitted per loop iteration, at most
# (http.max_pipelined, max_pipelined_bytes, loop_prepare_size, build_slice_time: read once
# into the Service's attributes, as the header bounds of mta.api.build are)
DRAIN_IDLE = 1.0         # seconds: on shutdown, a connection idle this long is closed
PURGE_INTERVAL = 60.0    # seconds between deletions of expired idempotency keys
MAX_IDEMPOTENCY_KEY = 255
STALE_MARGIN = 10.0      # seconds added to the longest a request can take, for stale keys

PATH = b"/api/v1/transmissions"


class TransmissionIds:
    """Decimal transmission ids that fit a signed 64-bit integer, as SparkPost's do
    (17-18 digits): customers keep them in BIGINT columns.  The bits, high to low:
    milliseconds since 2020-01-01 (41 bits: until 2089), the acceptor slot (8), a
    counter within the millisecond (14), which starts at a random point in each
    process: during a reload the old and the new acceptor of one slot both answer
    for a moment.  Ids of later milliseconds are larger; the last millisecond is
    kept while the wall clock is behind it, and when a millisecond's 16,384 ids
    are used up the next one is taken."""

    EPOCH_MS = 1_577_836_800_000
    SLOT_BITS = 8
    COUNT_BITS = 14

    def __init__(self, slot: int, clock=time.time_ns):
        self.slot = (slot & ((1 << self.SLOT_BITS) - 1)) << self.COUNT_BITS
        self.clock = clock
        self.start = int.from_bytes(os.urandom(2), "big") & ((1 << self.COUNT_BITS) - 1)
        self.ms = 0
        self.n = 0                  # ids given in self.ms

    def next(self) -> str:
        ms = self.clock() // 1_000_000 - self.EPOCH_MS
        if ms > self.ms:
            self.ms, self.n = ms, 0
        elif self.n >> self.COUNT_BITS:
            self.ms, self.n = self.ms + 1, 0
        count = (self.start + self.n) & ((1 << self.COUNT_BITS) - 1)
        self.n += 1
        return str((self.ms << (self.SLOT_BITS + self.COUNT_BITS)) | self.slot | count)


_WANTED = frozenset((b"content-type", b"content-length", b"authorization", b"idempotency-key",
                     b"expect", b"content-encoding", b"transfer-encoding", b"host",
                     b"origin", b"sec-fetch-site"))

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    429: "Too Many Requests", 431: "Request Header Fields Too Large",
    501: "Not Implemented", 503: "Service Unavailable", 507: "Insufficient Storage",
}
_STATUS_LINES = {code: f"HTTP/1.1 {code} {text}\r\n".encode() for code, text in REASONS.items()}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _json_body(h: dict[bytes, bytes]) -> None:
    """A request body must be JSON (Content-Type) and not compressed (Content-Encoding):
    ApiError 415 otherwise."""
    ctype = h.get(b"content-type", b"").partition(b";")[0].strip().lower()
    if ctype != b"application/json":
        raise R.ApiError(R.UNSUPPORTED_TYPE, "Content-Type must be application/json")
    if b"content-encoding" in h:
        _identity_only(h[b"content-encoding"])


def _chunked_only(codings: bytes) -> None:
    """A transfer coding other than chunked (RFC 9112 6.1): ApiError 501, after which the
    connection closes.  httptools takes ``gzip, chunked`` apart as chunks, and the gzip
    stream inside would be answered as broken JSON."""
    for c in codings.split(b","):
        c = c.strip().lower()
        if c and c != b"chunked":
            raise _Reject(R.ApiError(R.NOT_IMPLEMENTED, f"the transfer coding "
                                     f"{c[:64].decode('latin-1')} is not supported: send "
                                     "the body as it is, or chunked"))


SUPPRESSION_GRANT = "suppression_lists:manage"
EVENTS_GRANT = "message_events:view"
WEBHOOKS_VIEW = "webhooks:view"
WEBHOOKS_MODIFY = "webhooks:modify"
TRANSMISSIONS_GRANT = "transmissions:modify"


def _grant_of(method: bytes, route: bytes) -> str | None:
    """The grant (http.key_grants) a request for *route* needs, as the routes ask it;
    None for a route there is not: any valid key, then 404 (whether a route exists
    does not depend on the key's grants)."""
    if route == PATH:       # (the common request first: no other route is it)
        return TRANSMISSIONS_GRANT
    if suppression_api.matches(route):
        return SUPPRESSION_GRANT
    if events_api.matches(route):
        return EVENTS_GRANT
    if webhooks_api.matches(route):
        return WEBHOOKS_VIEW if method in (b"GET", b"HEAD") else WEBHOOKS_MODIFY
    if route == PATH or route.rstrip(b"/") == PATH:
        return TRANSMISSIONS_GRANT
    return None


def _grants(listed: list[str]) -> frozenset[str]:
    """A limited key's grants (http.key_grants); webhooks:modify includes webhooks:view."""
    grants = set(listed)
    if "webhooks:modify" in grants:
        grants.add("webhooks:view")
    return frozenset(grants)


def _identity_only(coding: bytes) -> None:
    """A Content-Encoding other than identity: ApiError 415 with Accept-Encoding (RFC 9110
    15.5.16).  A gzip body would otherwise be answered as broken JSON, and a plain body
    labelled gzip taken as it is."""
    coding = coding.strip().lower()
    if coding and coding != b"identity":
        raise R.ApiError(R.UNSUPPORTED_TYPE, f"Content-Encoding "
                         f"{coding[:64].decode('latin-1')} is not supported: send the body "
                         "uncompressed", accept_encoding="identity")


class _HttpDate:
    """The Date header's value, rebuilt at most once a second."""

    __slots__ = ("second", "line")

    def __init__(self):
        self.second = -1
        self.line = b""

    def header(self) -> bytes:
        s = int(time.time())
        if s != self.second:
            self.second = s
            self.line = f"Date: {formatdate(s, usegmt=True)}\r\n".encode()
        return self.line


_date = _HttpDate()


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; carries the error to answer."""

    def __init__(self, err: R.ApiError):
        super().__init__(err.description)
        self.err = err


class Request:
    """One complete request (or a parse error to answer in its place)."""

    __slots__ = ("method", "url", "grant", "scope", "headers", "body", "keep_alive", "http10",
                 "error", "begun")

    def __init__(self):
        self.begun = 0.0        # loop time of its first byte (for /metrics)
        self.method = b""
        self.url = b""
        # what its route asks of the API key (_grant_of; it also names the route), and
        # the key's idempotency scope once authorized for it (Session._authorized)
        self.grant: str | None = None
        self.scope: str | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.keep_alive = False
        self.http10 = False
        self.error: R.ApiError | None = None


class Service:
    """The HTTP side of one acceptor: settings, API keys, idempotency store, sessions."""

    def __init__(self, acceptor):
        self.a = acceptor
        self.tids = TransmissionIds(acceptor.slot)
        self.cfg = cfg = acceptor.settings.config.http
        self.loop = acceptor.loop
        self.hostname = acceptor.hostname
        # sha256 of a key -> (its idempotency scope, its grants or None for all)
        self.keys = {self._digest(k.encode()): (self._digest(k.encode())[:32], None)
                     for k in cfg.api_keys}
        self.keys.update({self._digest(k.encode()): (self._digest(k.encode())[:32],
                                                     _grants(grants))
                          for k, grants in cfg.key_grants.items()})
        self.sessions: set = set()
        # connections per client (peers.client_key), kept only with a per-client limit
        self.per_ip_limit = cfg.max_connections_per_ip
        self.ipv6_prefix = acceptor.settings.config.smtp.ipv6_client_prefix \
            if self.per_ip_limit else 0
        self.per_ip: dict[str, int] = {}
        # bounds read once (each new acceptor at a reload takes the file's): a connection's
        # requests and body octets read ahead, a body compiled on the loop, a build slice
        self.max_queued = cfg.max_pipelined
        self.read_ahead = cfg.max_pipelined_bytes
        self.prepare_on_loop = cfg.loop_prepare_size
        self.build_time = cfg.build_slice_time
        self.field_limits = (cfg.max_header_field_length, cfg.max_header_block_size)
        self.pending = 0            # messages handed to the spool, not yet answered
        self.pending_bytes = 0      # ... their octets (built, held until answered)
        self.paused: collections.deque = collections.deque()  # injections waiting for room
        self.stats = {"requests": 0, "accepted": 0, "rejected": 0, "errors": 0}
        self.store: idempotency.Store | None = None
        self.next_purge = 0.0
        # The events store: the acceptor's read-only handle (Acceptor.events_store),
        # opened at the first events API request or report.
        self.webhooks: webhooks_api.Api | None = None   # made at the first webhooks request
        # Suppression-list requests in a pool of their own (made at the first): a bulk
        # PUT waits for the list's write lock and a search may read a million records,
        # which in the loop's default executor (a few threads) kept large transmissions
        # and the events API waiting for a thread; and fewer threads take the GIL from
        # the loop at once
        self.suppression_pool: concurrent.futures.ThreadPoolExecutor | None = None

    @staticmethod
    def _digest(key: bytes) -> str:
        return hashlib.sha256(key).hexdigest()

    def open(self) -> None:
        """Open the idempotency database (after fork)."""
        smtp = self.a.smtp
        stale = self.cfg.request_timeout + smtp.spool_timeout + STALE_MARGIN
        self.store = idempotency.Store(
            os.path.join(self.a.settings.state_dir, "idempotency.sqlite"),
            self.cfg.idempotency_window, stale)

    def close(self) -> None:
        if self.suppression_pool is not None:
            # (as the default executor: what was started finishes before the exit)
            self.suppression_pool.shutdown(wait=False)
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.webhooks is not None:
            api, self.webhooks = self.webhooks, None
            try:
                if not self.loop.is_running() and not self.loop.is_closed():
                    self.loop.run_until_complete(api.close())
            except Exception as exc:   # closing at exit: log, go on
                log.warning("webhooks API: closing failed: %s", exc)

    def events_store(self) -> events_store.EventStore | None:
        """The events store (read-only), None while it does not exist yet; in a worker thread."""
        return self.a.events_store()

    def is_loopback(self, ip: str) -> bool:
        addr = peer_address(ip)
        return addr is not None and addr.is_loopback

    def resume_paused(self) -> None:
        """Injections that waited for room (http.max_pending_bytes) build again, in turn."""
        room = self.cfg.max_pending_bytes
        while self.paused and self.pending_bytes < room:
            self.loop.call_soon(self.paused.popleft().step)

    def authorize(self, header: bytes | None, peer_ip: str, h: dict | None = None,
                  grant: str | None = None) -> str:
        """The idempotency scope of the caller's key ("" without keys); ApiError 401/403.

        *grant*: what the request needs of the key (http.key_grants); None: a valid key.

        Without keys, loopback clients are served -- but not a browser's request (*h*:
        the request's header fields) whose Host names another machine: a page of the
        attacker's whose name was rebound to 127.0.0.1 (DNS rebinding) would send mail
        through this node and read its events (:mod:`mta.browser`)."""
        if not self.keys:
            if self.is_loopback(peer_ip):
                # (a browser's request carries one of these: others go straight through)
                why = browser.rebound(h) if h and (b"sec-fetch-site" in h or b"origin" in h) \
                    else None
                if why is None:
                    return ""
                raise R.ApiError(R.FORBIDDEN, f"no API keys are configured (http.api_keys): "
                                 f"{why}")
            raise R.ApiError(R.FORBIDDEN, "no API keys are configured (http.api_keys): only "
                             "loopback clients are served")
        if not header:
            raise R.ApiError(R.UNAUTHORIZED, "an API key is required in the Authorization "
                             "header")
        key = header.strip()
        if key[:6].lower() == b"basic ":
            try:
                key = base64.b64decode(key[6:].strip(), validate=True).partition(b":")[0]
            except (binascii.Error, ValueError):
                raise R.ApiError(R.UNAUTHORIZED, "the Authorization header is not valid "
                                 "Basic credentials") from None
        found = self.keys.get(self._digest(key))
        if found is None:
            raise R.ApiError(R.UNAUTHORIZED, "the API key in the Authorization header is not "
                             "valid")
        scope, grants = found
        if grants is not None and grant is not None and grant not in grants:
            raise R.ApiError(R.FORBIDDEN, f"the API key has no {grant} grant "
                             "(http.key_grants)")
        return scope

    def sweep(self, now: float, draining: bool, force: bool) -> None:
        for s in list(self.sessions):
            s.idle_check(now, draining, force)
        if self.store is not None and now >= self.next_purge:
            self.next_purge = now + PURGE_INTERVAL
            try:
                n = self.store.purge()
            except Exception as exc:   # sqlite3.Error: log, keep serving
                log.warning("idempotency store: purge failed: %s", exc)
            else:
                if n:
                    log.info("idempotency store: %d expired key(s) deleted", n)


class Session(asyncio.Protocol):
    """One HTTP connection, fed to httptools."""

    def __init__(self, svc: Service):
        self.svc = svc
        self.a = svc.a
        self.cfg = svc.cfg
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.peer_ip = ""
        self.queue: collections.deque[Request] = collections.deque()
        self.cur: Request | None = None
        self.url_parts: list[bytes] = []
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.body_limit = self.cfg.max_body_size    # of the request being read
        self.head_size = 0
        self.head_bytes = 0        # raw octets read while the header block was incomplete
        self.in_head = True
        self.started: float | None = None   # when the request being read began
        self.begun = 0.0           # when the request being answered began (for /metrics)
        self.last_activity = 0.0
        self.busy = False          # a transmission is on its way to the spool
        self.broken = False        # a parse error was queued: read nothing more
        self.closing = False
        self.lingering = False     # the close has begun (_close)
        self.lost = False          # connection_lost came
        self.peer_eof = False      # the client shut its side with requests unanswered
        self.reading_paused = False
        self.writing_paused = False
        self.write_paused_at = 0.0
        self.expect_continue = False
        self.http10 = False        # the request being answered is HTTP/1.0
        self.out: list[bytes] = []
        self.proxy: proxy.Reader | None = None   # a balancer's PROXY header, being read
        self.client_key: str | None = None   # counted in svc.per_ip (a per-client limit)

    # ------------------------------------------------------------- transport

    def connection_made(self, transport) -> None:
        self.transport = transport
        svc = self.svc
        self.last_activity = svc.loop.time()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        if proxy.begin(self, self.cfg.max_connections):
            return      # a load balancer: its PROXY header names the client
        self._admit()

    def _proxy_failed(self, why: str) -> None:
        log.warning("HTTP connection from %s, a proxy_protocol_from network: %s; closed",
                    self.peer_ip, why)
        proxy.forget(self)
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def _proxy_refused(self) -> None:
        log.warning("HTTP connection from %s: a PROXY protocol header, from an address not in "
                    "server.proxy_protocol_from; closed", self.peer_ip)
        self._fail(R.ApiError(R.BAD_REQUEST, "a PROXY protocol header is not accepted from "
                              "this address"))
        self._run()

    def _admit(self) -> None:
        svc = self.svc
        if len(svc.sessions) >= self.cfg.max_connections:
            svc.stats["errors"] += 1
            self._respond(R.ApiError(R.UNAVAILABLE, "too many connections (http.max_connections)",
                                     R.RETRY_AFTER_UNAVAILABLE), keep_alive=False)
            self._flush()
            return
        if svc.per_ip_limit:
            key = client_key(self.peer_ip, svc.ipv6_prefix)
            n = svc.per_ip.get(key, 0)
            if n >= svc.per_ip_limit:
                svc.stats["errors"] += 1
                self._respond(R.ApiError(R.UNAVAILABLE, "too many connections from your "
                                         "address (http.max_connections_per_ip)",
                                         R.RETRY_AFTER_UNAVAILABLE), keep_alive=False)
                self._flush()
                return
            svc.per_ip[key] = n + 1
            self.client_key = key
        svc.sessions.add(self)

    def connection_lost(self, exc) -> None:
        proxy.forget(self)
        svc = self.svc
        svc.sessions.discard(self)
        key = self.client_key
        if key is not None:
            self.client_key = None
            n = svc.per_ip.get(key, 1) - 1
            if n:
                svc.per_ip[key] = n
            else:
                svc.per_ip.pop(key, None)
        self.closing = True
        self.lost = True
        self.queue.clear()
        self.a.session_gone()

    def pause_writing(self) -> None:
        # The client does not read its answers as fast as it sends requests: read
        # nothing more until it does (else the answers would pile up without bound).
        self.writing_paused = True
        self.write_paused_at = self.svc.loop.time()
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        q = len(self.queue)
        svc = self.svc
        if q < svc.max_queued and (q < 2 or self._read_ahead() < svc.read_ahead):
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.closing:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closing and not self.broken \
                and not self.writing_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def eof_received(self):
        if self.busy or self.queue:
            # The client shut its side after its last request (a half-close): its
            # answers -- a transmission on its way to the spool -- still go out, then
            # the connection closes (_run).
            self.peer_eof = True
            return True
        return False   # close our side too; answers already queued are still written

    def _close(self) -> None:
        """Close once the answers are written, lingering (mta.acceptor.closing:
        http.linger_timeout, then the connection is aborted, answered or not)."""
        if self.lingering or self.transport is None:
            return
        self.lingering = True
        close_lingering(self, self.svc.loop, self.cfg.linger_timeout, self.peer_eof)

    def data_received(self, data: bytes) -> None:
        if self.broken or self.closing:
            return
        if self.proxy is not None:
            proxy.take(self, data)
            return
        self.last_activity = self.svc.loop.time()
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            err = cause.err if isinstance(cause, _Reject) else \
                R.ApiError(R.BAD_REQUEST, "malformed HTTP request")
            self._fail(err)
        except httptools.HttpParserUpgrade:
            if not self.broken:
                self._fail(R.ApiError(R.BAD_REQUEST, "protocol upgrades are not supported"))
        except httptools.HttpParserError:
            self._fail(R.ApiError(R.BAD_REQUEST, "malformed HTTP request"))
        else:
            if self.in_head and self.head_bytes > self.cfg.max_header_size:
                self._fail(self._too_many_header_octets())
        self._run()
        q = len(self.queue)
        if q > 1:
            svc = self.svc
            if q >= svc.max_queued or self._read_ahead() >= svc.read_ahead:
                self._pause_reading()

    def _read_ahead(self) -> int:
        """Octets of the bodies of the requests read behind the one being handled (that
        one alone is no read-ahead: the callers look only when two or more are queued,
        not in the common keep-alive case)."""
        q = self.queue
        return sum([len(r.body) for r in q]) - len(q[0].body) if q else 0

    def _fail(self, err: R.ApiError) -> None:
        """Answer *err* after the requests before it, then close; read nothing more."""
        self.broken = True
        self.started = None
        req = Request()
        req.error = err
        self.queue.append(req)
        self._pause_reading()

    def _too_many_header_octets(self) -> R.ApiError:
        return R.ApiError(R.HEADERS_TOO_LARGE, f"the request line and header fields exceed "
                          f"{self.cfg.max_header_size} octets (http.max_header_size)")

    # ------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self.cur = Request()
        self.url_parts = []
        self.body_parts = []
        self.body_size = 0
        self.head_size = 0
        self.in_head = True
        self.started = self.cur.begun = self.svc.loop.time()

    def on_url(self, url: bytes) -> None:
        self.url_parts.append(url)
        self.head_size += len(url)
        if self.head_size > self.cfg.max_header_size:
            # (only the URI is counted yet: it alone is too long)
            raise _Reject(R.ApiError(R.URI_TOO_LONG, "the request URI exceeds "
                                     f"{self.cfg.max_header_size} octets "
                                     "(http.max_header_size)"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.cfg.max_header_size:
            raise _Reject(self._too_many_header_octets())
        name = name.lower()
        if name in _WANTED:
            req = self.cur
            h = req.headers
            if name in h and name == b"transfer-encoding":
                value = h[name] + b"," + value     # (one list over several lines)
            h[name] = value
            if not self.in_head:
                # a chunked body's trailer field: the key's answer, taken at the head,
                # is asked again with it (as each route's handler always asked it)
                req.scope = None

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        req = self.cur
        h = req.headers
        req.method = method = self.parser.get_method()
        req.url = url = b"".join(self.url_parts)
        req.grant = grant = _grant_of(method, url.partition(b"?")[0])
        self.body_limit = limit = self.cfg.max_body_size
        if method == b"PUT" and grant == SUPPRESSION_GRANT and self._refusal(req) is None:
            # a bulk suppression-list PUT: up to SparkPost's 50 MB (10,000 entries); only
            # for a caller with a key, so that anyone who can connect cannot make each
            # connection hold more than http.max_body_size
            self.body_limit = limit = max(
                limit, self.a.settings.config.suppression.max_body_size)
        length = h.get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise _Reject(self._too_large())
        if b"transfer-encoding" in h:
            _chunked_only(h[b"transfer-encoding"])
        if b"expect" in h and h[b"expect"].strip().lower() == b"100-continue" and \
                self.parser.get_http_version() != "1.0":   # (no 1xx to HTTP/1.0: RFC 9110 15.2)
            if not self.queue and not self.busy:
                err = self._refusal(req)
                if err is not None:
                    raise _Reject(err)
                self.transport.write(CONTINUE)
            else:
                self.expect_continue = True
        elif b"transfer-encoding" in h or (length is not None and length.strip() != b"0"):
            # A body is read and held only for a caller the key will let in: anyone who
            # can connect could otherwise make every connection hold http.max_body_size.
            err = self._refusal(req)
            if err is not None:
                raise _Reject(err)

    def _authorized(self, req: Request) -> str:
        """The idempotency scope of *req*'s API key for what its route needs
        (Service.authorize, asked once per request: the keys do not change); ApiError."""
        scope = req.scope
        if scope is None:
            h = req.headers
            req.scope = scope = self.svc.authorize(h.get(b"authorization"), self.peer_ip, h,
                                                   req.grant)
        return scope

    def _refusal(self, req: Request) -> R.ApiError | None:
        """Why a request will be refused whatever its body (the API key: every resource
        asks for it), or None.  A request that expects 100-continue then gets that
        answer instead of the 100 and the connection closes, its body unread (RFC 9110
        10.1.1), rather than uploading it for nothing; a suppression-list PUT gets its
        larger body bound only when it is not refused."""
        try:
            self._authorized(req)
        except R.ApiError as err:
            return err
        return None

    def _too_large(self) -> R.ApiError:
        what = "http.max_body_size" if self.body_limit == self.cfg.max_body_size else \
            "suppression.max_body_size"
        return R.ApiError(R.TOO_LARGE, f"the request body exceeds {self.body_limit} "
                          f"octets ({what})")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.body_limit:
            raise _Reject(self._too_large())
        parts = self.body_parts
        if len(parts) < BODY_PARTS:
            parts.append(body)
            return
        # Many small pieces (tiny chunks): into one buffer, not an object each (which
        # took 27 times the octets of a body in 2-octet chunks)
        last = parts[-1]
        if type(last) is not bytearray:
            parts[-1] = last = bytearray(last)
        last += body

    def on_message_complete(self) -> None:
        req = self.cur
        p = self.parser
        parts = self.body_parts
        req.body = parts[0] if len(parts) == 1 else b"".join(parts)
        req.keep_alive = p.should_keep_alive()
        req.http10 = p.get_http_version() == "1.0"
        if p.should_upgrade():
            # llhttp stops at the end of an upgrade request's header: its body, if
            # any, would be read as the next request.
            req.error = R.ApiError(R.BAD_REQUEST, "protocol upgrades are not supported")
            self.broken = True
        self.queue.append(req)
        self.cur = None
        self.body_parts = []
        self.started = None
        self.in_head = True
        self.head_bytes = 0
        self.expect_continue = False

    # -------------------------------------------------------------- requests

    def _run(self) -> None:
        """Answer queued requests in order until one has to wait for the spool."""
        while self.queue and not self.busy and not self.closing:
            self._handle(self.queue.popleft())
        if self.peer_eof and not self.busy and not self.queue:
            self.closing = True     # every request of a client that shut its side: answered
        self._flush()
        if self.closing:
            return
        if not self.busy and not self.queue and self.expect_continue and self.cur is not None:
            self.expect_continue = False
            err = self._refusal(self.cur)
            if err is not None:
                self._fail(err)
                self._run()
                return
            self.transport.write(CONTINUE)
        q = len(self.queue)
        svc = self.svc
        if q < svc.max_queued // 2 and (q < 2 or self._read_ahead() < svc.read_ahead // 2):
            self._resume_reading()

    def _flush(self) -> None:
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out.clear()
        if self.closing and self.transport is not None:
            self._close()

    def _respond(self, err_or_status, body=None, keep_alive: bool = True,
                 retry_after: int | None = None, extra: bytes = b"",
                 head_only: bool = False) -> None:
        """Queue a response: an ApiError, or (status, JSON body); *head_only*: to a HEAD
        request, whose answer has the Content-Length of the body but not the body
        (RFC 9110 9.3.2: the client reads no body after it)."""
        if isinstance(err_or_status, R.ApiError):
            status, body, retry_after = err_or_status.status, err_or_status.body(), \
                err_or_status.retry_after
        else:
            status = err_or_status
        keep_alive = keep_alive and not self.a.draining
        now = self.a.loop.time()
        self.a.m.http_response(status, now - (self.begun or self.started or now))
        self.begun = 0.0
        if status == 204:    # no body, no Content-Length (RFC 9110 8.6)
            head = [_STATUS_LINES[status], _date.header()]
            body = b""
        else:
            head = [_STATUS_LINES[status], _date.header(),
                    b"Content-Type: application/json\r\nContent-Length: ",
                    str(len(body)).encode(), b"\r\n"]
        if retry_after is not None:
            head.append(b"Retry-After: %d\r\n" % retry_after)
        if extra:
            head.append(extra)
        if not keep_alive:
            head.append(b"Connection: close\r\n")
            self.closing = True
        elif self.http10:
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        self.out.append(b"".join(head) if head_only else b"".join(head) + body)

    def _handle(self, req: Request) -> None:
        svc = self.svc
        svc.stats["requests"] += 1
        self.begun = req.begun or svc.loop.time()
        self.http10 = req.http10
        if req.error is not None:
            svc.stats["errors"] += 1
            self._respond(req.error, keep_alive=False)
            return
        try:
            # (the grant its route needs names the route: on_headers_complete)
            _ROUTES.get(req.grant, Session._transmission)(self, req)
        except R.ApiError as err:
            # (no resource takes HEAD: its answer is an error, here or _suppression_done)
            svc.stats["errors"] += 1
            self._respond(err.status, err.body(), req.keep_alive, err.retry_after,
                          err.header_lines(), req.method == b"HEAD")
        except Exception:   # a bug or the idempotency database: answer, keep serving
            log.exception("HTTP request from %s failed", self.peer_ip)
            svc.stats["errors"] += 1
            if self.busy:
                # Its injection started: its answer may still come, so no other
                # answer can be given in order on this connection.
                self.closing = True
                self.transport.abort()
                return
            self._respond(R.ApiError(R.UNAVAILABLE, "the request could not be processed; "
                                     "retry later", R.RETRY_AFTER_UNAVAILABLE), keep_alive=False,
                          head_only=req.method == b"HEAD")

    def _suppression(self, req: Request) -> None:
        """``/api/v1/suppression-list`` (mta.api.suppression), or ApiError.

        Answered from a worker thread (Service.suppression_pool, suppression.api_threads
        of them: more requests wait for one): a bulk PUT of 10,000 entries or a
        search that reads many index rows takes tens of milliseconds to seconds,
        which the other sessions of this acceptor must not wait for.  The
        connection's next request waits, as behind a transmission.
        """
        svc = self.svc
        self._authorized(req)
        store = self.a.suppression
        if store is None:
            raise R.ApiError(R.NOT_FOUND, "the suppression list is disabled "
                             "(suppression.enabled)")
        if req.method == b"PUT":
            _json_body(req.headers)
        path, _, query = req.url.partition(b"?")
        self.busy = True
        if svc.suppression_pool is None:
            # (read once: each new acceptor at a reload takes the file's)
            svc.suppression_pool = concurrent.futures.ThreadPoolExecutor(
                self.a.settings.config.suppression.api_threads,
                thread_name_prefix="suppression")
        cfg = self.a.settings.config.suppression
        fut = svc.loop.run_in_executor(svc.suppression_pool, _suppression_call, store,
                                       req.method, path, query, req.body,
                                       cfg.max_search_scan, cfg.max_search_time)
        fut.add_done_callback(functools.partial(self._suppression_done, req.keep_alive,
                                                 req.method == b"HEAD"))

    def _suppression_done(self, keep_alive: bool, head_only: bool, fut) -> None:
        status, body, retry_after, extra = fut.result()
        if status >= 400:
            self.svc.stats["errors"] += 1
        self.injected(status, body, keep_alive, retry_after, head_only, extra)

    def _events(self, req: Request) -> None:
        """``/api/v1/events/message`` (mta.api.events), or ApiError; in a worker thread."""
        svc = self.svc
        self._authorized(req)
        cfg = self.a.settings.config.events
        if not cfg.store:
            raise R.ApiError(R.NOT_FOUND, "the events store is disabled ([events] store)")
        self.busy = True
        fut = svc.loop.run_in_executor(None, _events_call, svc, req.method, req.url,
                                       cfg.query_max_scan)
        fut.add_done_callback(functools.partial(self._suppression_done, req.keep_alive,
                                                 req.method == b"HEAD"))

    def _webhooks(self, req: Request) -> None:
        """``/api/v1/webhooks`` (mta.api.webhooks), or ApiError.

        A coroutine on this acceptor's loop: create, update and validate POST
        to the target (up to webhooks.timeout); the SQLite calls run in a
        worker thread.  The connection's next request waits, as behind a
        transmission.
        """
        svc = self.svc
        self._authorized(req)
        # (a webhook made or changed here would get 200 and never a batch; the ones there
        # are may still be listed and deleted)
        cfg = self.a.settings.config
        if req.method in (b"POST", b"PUT"):
            if not cfg.webhooks.enabled:
                raise R.ApiError(R.NOT_FOUND, "webhooks are disabled ([webhooks] enabled)")
            if not cfg.events.store:
                raise R.ApiError(R.NOT_FOUND, "webhooks send the events store's events, and "
                                 "it is disabled ([events] store)")
        if req.method in (b"POST", b"PUT"):
            _json_body(req.headers)
        if svc.webhooks is None:
            svc.webhooks = webhooks_api.Api(self.a.settings.state_dir, self.a.settings.config,
                                            svc.loop, self.a.settings.admin_listen,
                                            self.a.settings.nameservers)
        path, _, query = req.url.partition(b"?")
        self.busy = True
        task = svc.loop.create_task(_webhooks_call(svc.webhooks, req.method, path, query,
                                                   req.body))
        task.add_done_callback(functools.partial(self._suppression_done, req.keep_alive,
                                                 req.method == b"HEAD"))

    def _transmission(self, req: Request) -> None:
        """Check a request and start its injection, or raise ApiError."""
        svc = self.svc
        path, _, query = req.url.partition(b"?")
        if path != PATH and path.rstrip(b"/") != PATH:
            # no such resource: for any valid key (whatever its grants), after the
            # key is checked as for every route (401/403 without a valid one)
            self._authorized(req)
            raise R.ApiError(R.NOT_FOUND, "no such resource: "
                             + path[:200].decode("latin-1") + "; use POST /api/v1/transmissions")
        # (the key first, as on every route: without a valid one, 401/403 whatever the
        # method, so a client without a key learns nothing of what the resource takes)
        scope = self._authorized(req)
        if req.method != b"POST":
            raise R.ApiError(R.BAD_METHOD, f"{req.method.decode('latin-1')} is not allowed on "
                             "/api/v1/transmissions; use POST", allow="POST")
        h = req.headers
        ctype = h.get(b"content-type", b"")
        if ctype != b"application/json" and \
                ctype.partition(b";")[0].strip().lower() != b"application/json":
            raise R.ApiError(R.UNSUPPORTED_TYPE, "Content-Type must be application/json")
        if b"content-encoding" in h:
            _identity_only(h[b"content-encoding"])
        if self.a.space_low:
            raise R.ApiError(R.UNAVAILABLE, "the spool is low on disk space; retry later",
                             R.RETRY_AFTER_UNAVAILABLE)
        if self.a.node_draining:
            raise R.ApiError(R.UNAVAILABLE, "this node is draining (mta drain) and accepts "
                             "no new mail; retry later or elsewhere", R.RETRY_AFTER_UNAVAILABLE)
        limit = _num_rcpt_errors(query)    # (before an Idempotency-Key is taken)
        if len(req.body) > svc.prepare_on_loop:
            # decoded, checked and compiled in a worker thread: a 20 MB template of
            # substitutions takes seconds (~4 us each), this acceptor's other
            # connections are answered meanwhile; this one's next request waits
            self.busy = True
            fut = svc.loop.run_in_executor(None, self._prepare, req.body)
            fut.add_done_callback(functools.partial(self._prepared, req, scope, limit))
            return
        # (the common small body: as _prepare does, without its call and tuple)
        tx = transmissions.decode(req.body)
        transmissions.check(tx, self.cfg.max_recipients, self.cfg.max_json_depth)
        self._inject(req, scope, limit, tx,
                     build.Builder(tx, svc.hostname, self.cfg.max_message_size,
                                   svc.field_limits))

    def _prepare(self, body: bytes) -> tuple:
        """(Transmission, Builder) of a request body, or ApiError (on the loop, or in
        a worker thread for a large body)."""
        tx = transmissions.decode(body)
        transmissions.check(tx, self.cfg.max_recipients, self.cfg.max_json_depth)
        svc = self.svc
        return tx, build.Builder(tx, svc.hostname, self.cfg.max_message_size,
                                 svc.field_limits)

    def _prepared(self, req: Request, scope: str, limit: int | None, fut) -> None:
        """A large body's transmission is ready (or refused): inject it, or answer."""
        self.busy = False
        if self.closing:
            return      # (gone, or closing: no answer can be given, nothing is sent)
        try:
            self._inject(req, scope, limit, *fut.result())
        except R.ApiError as err:
            self.svc.stats["errors"] += 1
            self.injected(err.status, err.body(), req.keep_alive, err.retry_after,
                          extra=err.header_lines())
        except Exception:   # as in _handle
            log.exception("HTTP request from %s failed", self.peer_ip)
            self.svc.stats["errors"] += 1
            if self.busy:
                self.closing = True
                self.transport.abort()
                return
            err = R.ApiError(R.UNAVAILABLE, "the request could not be processed; retry later",
                             R.RETRY_AFTER_UNAVAILABLE)
            self.injected(err.status, err.body(), False, err.retry_after)

    def _inject(self, req: Request, scope: str, limit: int | None, tx,
                builder: build.Builder) -> None:
        """Take the Idempotency-Key and start the injection of a checked transmission."""
        svc = self.svc
        h = req.headers
        requested = self._options(tx, builder)
        key = h.get(b"idempotency-key")
        if key is not None:
            key = key.strip()
            if not key or len(key) > MAX_IDEMPOTENCY_KEY:
                raise R.ApiError(R.BAD_REQUEST, f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY} "
                                 "octets")
            key = key.decode("latin-1")
            verdict, status, body = svc.store.begin(scope, key,
                                                    idempotency.body_hash(req.body))
            if verdict == idempotency.REPLAY:
                self._respond(status, body, req.keep_alive, extra=b"Idempotent-Replayed: true\r\n")
                return
            if verdict == idempotency.MISMATCH:
                raise R.ApiError(R.KEY_REUSED, "Idempotency-Key: already used with a different "
                                 "request body")
            if verdict == idempotency.IN_FLIGHT:
                raise R.ApiError(R.IN_PROGRESS, "Idempotency-Key: a request with this key is "
                                 "still being processed", R.RETRY_AFTER_BUSY)
        n = len(tx.recipients)
        if svc.pending and svc.pending + n > self.cfg.max_pending_messages:
            if key is not None:
                svc.store.abandon(scope, key)
            raise R.ApiError(R.TOO_MANY_REQUESTS, "too many messages are waiting for the "
                             "spool (http.max_pending_messages); retry later",
                             R.RETRY_AFTER_BUSY)
        self.busy = True
        Injection(self, req, tx, builder, scope, key, limit, requested).step()

    def _options(self, tx, builder: build.Builder) -> str | None:
        """Check options.ip_pool and options.start_time (ApiError 422 naming the field).

        Returns the requested pool (None: each message's pool follows its
        sender, :meth:`mta.config.Settings.pool_for`); a start time in the
        future goes into the messages' params as ``start_at`` (epoch seconds).
        """
        o = tx.options
        if o is None:
            return None
        requested = o.ip_pool or None
        if requested is not None and self.a.settings.pool_for(requested, "") is None:
            raise R.ApiError(R.INVALID, f"options.ip_pool: no IP pool is called "
                             f"{requested[:64]!r}")
        if o.start_time:
            at = transmissions.start_at(o.start_time, time.time())
            if at is not None:
                builder.base_params["start_at"] = at
        return requested

    def injected(self, status: int, body: bytes, keep_alive: bool,
                 retry_after: int | None, head_only: bool = False, extra: bytes = b"") -> None:
        """An injection's answer: send it, then go on with the requests behind it."""
        self.busy = False
        if self.closing:
            return
        self.last_activity = self.svc.loop.time()
        self._respond(status, body, keep_alive, retry_after, extra, head_only)
        if self.cur is not None:
            self.started = self.svc.loop.time()   # its clock starts now that it is next
        self._run()

    # ---------------------------------------------------------- housekeeping

    def idle_check(self, now: float, draining: bool, force: bool) -> None:
        """Called by the acceptor's sweep: request and keep-alive timeouts, drain."""
        if self.writing_paused and not self.lost and \
                now - self.write_paused_at > self.cfg.request_timeout:
            # answers unread for request_timeout, requests queued behind them: gone
            self.closing = True
            self.transport.abort()
            return
        if self.closing or self.busy:
            return
        if self.started is not None:
            if now - self.started > self.cfg.request_timeout or force:
                self.svc.stats["errors"] += 1
                self.broken = True
                self._respond(R.ApiError(R.REQUEST_TIMEOUT, "the request was not received "
                                         f"within {self.cfg.request_timeout:g} seconds "
                                         "(http.request_timeout)"), keep_alive=False)
                self._flush()
            return
        if self.queue:
            return
        idle = now - self.last_activity
        if force or idle > self.cfg.keepalive_timeout or (draining and idle >= DRAIN_IDLE):
            self.closing = True
            self._close()


# The grant a route needs -> its handler; any other: Session._transmission (which answers
# 404 for a route there is not)
_ROUTES = {SUPPRESSION_GRANT: Session._suppression, EVENTS_GRANT: Session._events,
           WEBHOOKS_VIEW: Session._webhooks, WEBHOOKS_MODIFY: Session._webhooks}


def _suppression_call(store, method: bytes, path: bytes, query: bytes, body: bytes,
                      max_scan: int, max_seconds: float) -> tuple[int, bytes, int | None, bytes]:
    """One suppression-list request, in a worker thread: (status, body, Retry-After,
    header field lines to add)."""
    try:
        status, out = suppression_api.handle(store, method, path, query, body, max_scan,
                                             max_seconds)
        return status, out, None, b""
    except R.ApiError as err:
        return err.status, err.body(), err.retry_after, err.header_lines()
    except Exception:   # lmdb.Error, a bug: answered, logged, the acceptor keeps serving
        log.exception("suppression list request %s %s failed", method.decode("latin-1"),
                      path[:200].decode("latin-1"))
        return 503, R.error_body(R.UNAVAILABLE, "the suppression list could not be read or "
                                 "written; retry later"), R.RETRY_AFTER_UNAVAILABLE, b""


async def _webhooks_call(api, method: bytes, path: bytes, query: bytes,
                         body: bytes) -> tuple[int, bytes, int | None, bytes]:
    """One webhooks API request: (status, body, Retry-After, header field lines)."""
    try:
        status, out = await api.handle(method, path, query, body)
        return status, out, None, b""
    except R.ApiError as err:
        return err.status, err.body(), err.retry_after, err.header_lines()
    except Exception:   # sqlite3.Error, a bug: answered, logged, the acceptor keeps serving
        log.exception("webhooks API request %s %s failed", method.decode("latin-1"),
                      path[:200].decode("latin-1"))
        return 503, R.error_body(R.UNAVAILABLE, "the webhooks could not be read or written; "
                                 "retry later"), R.RETRY_AFTER_UNAVAILABLE, b""


def _events_call(svc: Service, method: bytes, url: bytes,
                 max_scan: int) -> tuple[int, bytes, int | None, bytes]:
    """One events API request, in a worker thread: (status, body, Retry-After, header
    field lines)."""
    try:
        store = svc.events_store() if method == b"GET" else None
        status, out = events_api.handle(store, method, url, max_scan)
        return status, out, None, b""
    except R.ApiError as err:
        return err.status, err.body(), err.retry_after, err.header_lines()
    except Exception:   # lmdb.Error, a bug: answered, logged, the acceptor keeps serving
        log.exception("events API request %s %s failed", method.decode("latin-1"),
                      url[:200].decode("latin-1"))
        return 503, R.error_body(R.UNAVAILABLE, "the events store could not be read; retry "
                                 "later"), R.RETRY_AFTER_UNAVAILABLE, b""


def _num_rcpt_errors(query: bytes) -> int | None:
    """SparkPost's ``num_rcpt_errors`` query parameter: how many rcpt_to_errors to return
    (0: none; None: all); ApiError 422 naming it when its value is not a count (empty: not
    given)."""
    if not query:
        return None
    for item in query.split(b"&"):
        k, _, v = item.partition(b"=")
        if k == b"num_rcpt_errors" and v:
            if not v.isdigit():
                raise R.ApiError(R.INVALID, f"num_rcpt_errors: {v[:32].decode('latin-1')!r} "
                                 "is not a number of errors (0 or more)")
            # (a number of thousands of digits is "all of them", not a ValueError)
            return int(v) if len(v) <= 9 else 10 ** 9
    return None


class Injection:
    """One transmission on its way to the spool: build, submit, count, answer."""

    def __init__(self, session: Session, req: Request, tx, builder: build.Builder, scope: str,
                 key: str | None, limit: int | None, pool: str | None = None):
        self.session = session
        self.pool = pool            # options.ip_pool; None: by sender (egress.domain_pool)
        self.pool_for = session.a.settings.pool_for
        self.svc = svc = session.svc
        self.a = session.a
        self.keep_alive = req.keep_alive
        self.rcpts = tx.recipients
        self.builder = builder
        self.scope = scope
        self.key = key
        self.limit = limit
        self.next = 0
        self.waiting = 0
        self.accepted = 0
        self.tempfailed = 0
        self.errors: list[tuple[int, dict]] = []
        # generation_failure / _rejection events of the recipients that could not be
        # built, recorded (made durable) before the answer if the transmission is created
        self.refusals: list[dict] = []
        self.built_all = False
        self.touched = time.monotonic()   # the idempotency row's last touch (begin: now)
        self.tid = svc.tids.next()
        self.client = f"http [{session.peer_ip}]"
        self.peer = session.peer_ip
        # The suppression list applies unless options.skip_suppression; the type
        # looked up follows options.transactional.
        base = builder.base_params
        self.suppression = None if base.get("skip_suppression") is True else \
            session.a.suppression
        self.transactional = base.get("transactional") is True
        svc.pending += len(self.rcpts)

    def step(self) -> None:
        """Build and submit the next slice of recipients (or wait for room: at
        http.max_pending_bytes of built messages not yet answered, the spool's answers
        resume the waiting injections, :meth:`done`)."""
        svc = self.svc
        submit = self.a.submit
        build_one = self.builder.build
        room = svc.cfg.max_pending_bytes
        if self.key is not None:
            now = time.monotonic()
            if now - self.touched > svc.store.stale_after / 4:
                # still at work: another request with its key must get 409, not take
                # it over as stale and inject every recipient again
                self.touched = now
                try:
                    svc.store.touch(self.scope, self.key)
                except Exception as exc:   # sqlite3.Error: the injection goes on
                    log.error("transmission %s: idempotency store: %s", self.tid, exc)
        end = min(self.next + BUILD_SLICE, len(self.rcpts))
        first = self.next
        clock = time.monotonic
        # (one recipient: no clock read, the slice ends with it anyway)
        deadline = clock() + svc.build_time if end - first > 1 else 0.0
        for i in range(first, end):
            if svc.pending_bytes >= room:
                self.next = i
                svc.paused.append(self)
                return
            if i > first and clock() >= deadline:
                end = i         # the rest after the other connections' turn
                break
            try:
                m = build_one(i, self.rcpts[i])
            except build.RecipientError as exc:
                self.errors.append((i, exc.entry()))
                svc.pending -= 1
                if exc.event is not None:
                    self._refused(i, exc.event, exc.description)
                continue
            except Exception:
                log.exception("transmission %s: recipient %d could not be built", self.tid, i)
                what = f"recipients[{i}]: the message could not be built"
                self.errors.append((i, R.error_entry(R.RCPT_INVALID, what)))
                svc.pending -= 1
                self._refused(i, ev.GENERATION_FAILURE, what)
                continue
            params = m.params
            params["transmission_id"] = self.tid
            sup = self.suppression
            if sup is not None and sup.check(m.rcpt, self.transactional):
                # Accepted and spooled, never delivered: the spool records it
                # failed at the commit and logs its class-25 bounce (no DSN).
                params[suppression_list.PARAM] = [0]
            # The pool in the params only when it is not "default" (smaller records).
            pool = self.pool or self.pool_for(None, m.sender)
            if pool != DEFAULT_POOL:
                params["ip_pool"] = pool
            else:
                params.pop("ip_pool", None)
            self.waiting += 1
            size = len(m.message)
            svc.pending_bytes += size
            submit(m.sender, [m.rcpt], m.params, self.client, m.message,
                   functools.partial(self.trace, m.rcpt), functools.partial(self.done, i, size),
                   self.peer, m.message_id)
        self.next = end
        if end < len(self.rcpts):
            self.a.loop.call_soon(self.step)
        else:
            self.built_all = True
            self.finish()

    def _refused(self, i: int, kind: str, description: str) -> None:
        """Keep the generation event of recipient *i* (sent if the transmission is created)."""
        try:
            e = self.builder.refusal_event(self.rcpts[i], kind, description)
        except Exception:       # (a bug must not cost the other recipients their answer)
            log.exception("transmission %s: no event for recipient %d", self.tid, i)
            return
        if e is not None:
            e.update(timestamp=time.time(), transmission_id=self.tid, client=self.client)
            if self.pool:
                e["ip_pool"] = self.pool
            self.refusals.append(e)

    def trace(self, rcpt: str, qid: str) -> bytes:
        lit = ("IPv6:" + self.peer) if ":" in self.peer else self.peer
        # (the recipient's ASCII form where it has one: a U-label domain in this field
        # alone would make the message need SMTPUTF8 on its way to every server)
        rcpt = ascii_address(rcpt) or rcpt
        return (f"Received: from [{lit}]\r\n\tby {self.a.hostname} (mta) with HTTP id {qid}"
                f"\r\n\tfor <{rcpt}>;\r\n\t{build._date.now()}\r\n").encode("utf-8")

    def done(self, i: int, size: int, qid: str, ok: bool) -> None:
        """The spool's answer (or a timeout) for recipient *i*'s message of *size* octets."""
        self.waiting -= 1
        svc = self.svc
        svc.pending -= 1
        svc.pending_bytes -= size
        if svc.paused:
            svc.resume_paused()
        if ok:
            self.accepted += 1
        else:
            self.tempfailed += 1
            self.errors.append((i, R.error_entry(
                R.RCPT_TEMPFAIL, f"recipients[{i}]: the message could not be made durable; "
                "retry this recipient")))
        self.finish()

    def finish(self) -> None:
        if not self.built_all or self.waiting:
            return
        if self.accepted and self.refusals and self.a.settings.events_enabled:
            # The transmission is created: its recipients that could not be built get
            # their generation_* events, on disk before the answer names them.
            refusals, self.refusals = self.refusals, []
            self.waiting += 1
            self.a.commit_events(self.tid, refusals, self._refusals_recorded,
                                 f"transmission {self.tid}: {len(refusals)} generation "
                                 "event(s)")
            return
        svc = self.svc
        retry_after = None
        if self.accepted:
            errors = [e for _, e in sorted(self.errors, key=lambda x: x[0])]
            if self.limit is not None:
                errors = errors[:self.limit]
            status = 200
            body = R.success_body(self.accepted, len(self.errors), self.tid, errors)
        elif self.tempfailed:
            status, retry_after = 503, R.RETRY_AFTER_UNAVAILABLE
            body = R.error_body(R.UNAVAILABLE, "no message could be made durable; retry later")
        else:
            i, first = min(self.errors, key=lambda x: x[0])
            err = R.RCPT_REQUIRED if first["code"] == R.RCPT_REQUIRED.code else R.INVALID
            status = err.status
            body = R.error_body(err, "no valid recipient: " + first["description"])
        svc.stats["accepted"] += self.accepted
        svc.stats["rejected"] += len(self.errors)
        if self.key is not None:
            try:
                if status == 200:
                    svc.store.finish(self.scope, self.key, status, body)
                else:
                    svc.store.abandon(self.scope, self.key)
            except Exception as exc:   # sqlite3.Error: the answer still goes out
                log.error("transmission %s: idempotency store: %s", self.tid, exc)
        if self.accepted and log.isEnabledFor(logging.DEBUG):
            log.debug("transmission %s: accepted=%d rejected=%d client=%s", self.tid,
                      self.accepted, len(self.errors), self.peer)
        self.session.injected(status, body, self.keep_alive, retry_after)

    def _refusals_recorded(self, ok: bool) -> None:
        """The spool's answer for the generation events; the response goes out either way
        (its accepted recipients are durable; the others are named in rcpt_to_errors)."""
        self.waiting -= 1
        if not ok:
            log.warning("transmission %s: the events of the recipients that could not be "
                        "built were not recorded (the spool did not take them)", self.tid)
        self.finish()
