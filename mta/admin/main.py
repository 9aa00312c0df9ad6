"""admin[0]: the admin listener -- ``/metrics``, the admin API and the status page.

A child of the supervisor like the other roles (so the supervisor itself stays
free of ZeroMQ and event loops), forked first and stopped last.

Reads:   ADMIN_STATS_REPORT from every child on the bus endpoint ``admin-stats`` (PULL;
         each child pushes a cumulative snapshot every ``admin.push_interval``
         seconds, dropped when this process is absent or slow); HTTP requests on
         the listening sockets the supervisor made for ``admin.listen``, and
         HAProxy's agent checks on those for ``admin.agent_listen``
         (:mod:`mta.admin.agent`; both kept open by the supervisor across
         restarts of this process); at scrape
         time /proc (the children's CPU and memory, the spool device's
         /proc/diskstats line, /proc/net/snmp and /proc/net/netstat) and the
         spool file system's free space.
Writes:  HTTP responses; the agent-check line; log lines; ``<run>/drain`` (POST/DELETE
         /api/admin/drain).
Peers:   every child (reports in); the spool shards (asked for queue summaries and
         single messages over the bus, :mod:`mta.admin.api`); HTTP clients
         (Prometheus, curl, the ``mta`` commands, the status page).
Config:  [admin] (all keys); [spool] directory, shards; [delivery] processes;
         [smtp] acceptors (the children expected in the health report); [egress]
         source and pool names and backoff.max_entries (suspensions), from the
         supervisor's record of what it applies now (run/active-config.json).

HTTP: GET, HEAD, POST and DELETE; one request per connection (``Connection:
close``; a request body is not read).  ``/metrics``: Prometheus text format
(prometheus_client, custom collector, :mod:`mta.admin.metrics`).
``/api/admin/health``: JSON, per child: role, index, pid, up (a report within
3 x push_interval + 2 s), last report age.  ``/``: the live status page
(:mod:`mta.admin.page`).  The rest of ``/api/admin/`` (queue, messages,
status, drain) is :mod:`mta.admin.api`; it asks the spool shards over the bus.
With ``admin.tokens`` or ``admin.read_tokens`` set every request needs
``Authorization: Bearer TOKEN`` (401 otherwise); a read token's POST or DELETE gets 403.  A POST or DELETE that a browser marks as another site's
(``Sec-Fetch-Site``, ``Origin``) gets 403, and so does, without tokens, a browser's
request whose ``Host`` is not a loopback name (DNS rebinding; :mod:`mta.browser`).  A request head over 16 KiB gets 431; other paths 404;
other methods 405; every error is a JSON body.  A POST or DELETE whose client has
closed the connection before it is acted on (it gave up waiting: this process was stopped
or wedged while the request waited in the listener's queue) is not done, and logged.
SIGTERM: close the listener, exit.  SIGHUP is ignored ([admin] changes need a
restart; the supervisor says so).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket

import orjson
import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mta import browser, bus, proc
from mta.admin import page
from mta.admin.agent import AgentSession
from mta.admin.api import Api
from mta.admin.metrics import Collector, Reports

log = logging.getLogger("mta.admin")

MAX_HEAD = 16 * 1024        # octets of request line and header fields
NONE, READ, ACT = 0, 1, 2   # what a request's token allows (Admin.access)
REQUEST_TIMEOUT = 10.0      # seconds a client has to send its request head
ANSWER_STALL = 10.0         # seconds an answer may wait unread (its buffer not draining)
                            # before the connection is aborted

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class Admin:
    def __init__(self, settings, loop):
        self.settings = settings
        self.cfg = settings.config.admin
        self.loop = loop
        self.reports = Reports(settings)
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = Collector(self.reports, settings)
        self.registry.register(self.collector)
        self.api = None             # mta.admin.api.Api, set by main() once the bus is up
        self.tokens = [t.encode() for t in self.cfg.tokens]
        self.read_tokens = [t.encode() for t in self.cfg.read_tokens]
        self.sessions: set = set()
        # the HAProxy agent's (mta.admin.agent), bounded apart: they ask for no token
        self.agent_sessions: set = set()

    def access(self, headers: dict) -> int:
        """What the request's token allows: ACT (any token of admin.tokens, or none is
        asked for), READ (one of admin.read_tokens) or NONE."""
        if not self.tokens and not self.read_tokens:
            return ACT
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return NONE
        token = token.strip()
        act = read = False
        for t in self.tokens:       # every token compared: no early exit to time
            act |= hmac.compare_digest(t, token)
        for t in self.read_tokens:
            read |= hmac.compare_digest(t, token)
        return ACT if act else READ if read else NONE

    def from_a_browser_elsewhere(self, method: bytes, headers: dict) -> str | None:
        """Why a request is another site's page acting through a browser (mta.browser),
        or None: a POST or DELETE that Sec-Fetch-Site or Origin marks as cross-site,
        and -- when no token is asked for -- a browser's request whose Host is not a
        loopback name (DNS rebinding)."""
        if method in (b"POST", b"DELETE"):
            why = browser.cross_site(headers)
            if why:
                return f"a cross-site request is refused ({why})"
        if not self.tokens and not self.read_tokens:
            return browser.rebound(headers)
        return None

    async def respond(self, method: bytes, target: bytes,
                      headers: dict) -> tuple[int, dict, bytes]:
        path = target.partition(b"?")[0]
        if method not in (b"GET", b"HEAD", b"POST", b"DELETE"):
            return _json(405, {"errors": [{"message": "only GET, POST and DELETE are served "
                                                      "here"}]},
                         {"Allow": "GET, HEAD, POST, DELETE"})
        refused = self.from_a_browser_elsewhere(method, headers)
        if refused:
            return _json(403, {"errors": [{"message": refused}]})
        if path in (b"/", b"/index.html") and method in (b"GET", b"HEAD"):
            # The page holds no data (its script asks the API, with the token
            # from the URL fragment), so it is served without a token.
            return 200, {"Content-Type": "text/html; charset=utf-8",
                         "Cache-Control": "no-store"}, page.HTML
        access = self.access(headers)
        if access == NONE:
            given = b"authorization" in headers
            return _json(401, {"errors": [{"message": (
                "the token is not one of [admin] tokens" if given else
                "a bearer token is required (Authorization: Bearer TOKEN)")}]},
                {"WWW-Authenticate": 'Bearer realm="mta admin"' + (
                    ', error="invalid_token"' if given else "")})
        if access == READ and method not in (b"GET", b"HEAD"):
            return _json(403, {"errors": [{"message": (
                "this token may only read (admin.read_tokens): a POST or DELETE needs one "
                "of admin.tokens")}]},
                {"WWW-Authenticate": 'Bearer realm="mta admin", error="insufficient_scope"'})
        if path in (b"/metrics", b"/api/admin/health", b"/", b"/index.html"):
            if method not in (b"GET", b"HEAD"):
                return _json(405, {"errors": [{"message": "only GET is served here"}]},
                             {"Allow": "GET, HEAD"})
            if path == b"/metrics":
                return 200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(
                    self.registry)
            if path == b"/api/admin/health":
                # (503 when not ok: a load balancer's HTTP check takes the node out)
                h = self.reports.health()
                return _json(200 if h["ok"] else 503, h)
            return 200, {"Content-Type": "text/html; charset=utf-8",
                         "Cache-Control": "no-store"}, page.HTML
        if path.startswith(b"/api/admin/") and self.api is not None:
            return await self.api.handle(method, path, target.partition(b"?")[2])
        return _json(404, {"errors": [{"message": f"no such resource: "
                                                  f"{path.decode('latin-1')[:200]}"}]})


def _json(status: int, body, extra: dict | None = None) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json", **(extra or {})}, orjson.dumps(body)


class Session(asyncio.Protocol):
    """One HTTP connection: read the request head, answer once, close."""

    def __init__(self, admin: Admin):
        self.admin = admin
        self.buf = b""
        self.transport = None
        self.done = False
        self.timer = None
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        a = self.admin
        if len(a.sessions) >= a.cfg.max_connections:
            self.answer(503, {"Content-Type": "application/json"},
                        b'{"errors":[{"message":"too many connections"}]}', b"GET")
            return
        a.sessions.add(self)
        self.timer = a.loop.call_later(REQUEST_TIMEOUT, self._timeout)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.admin.sessions.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def _timeout(self) -> None:
        if not self.done:
            self.answer(*_json(408, {"errors": [{"message": "request not received in "
                                                            "time"}]}), b"GET")

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self.answer(*_json(431, {"errors": [{"message": "request head too large"}]}),
                            b"GET")
            return
        if end > MAX_HEAD:
            self.answer(*_json(431, {"errors": [{"message": "request head too large"}]}),
                        b"GET")
            return
        lines = self.buf[:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.answer(*_json(400, {"errors": [{"message": "malformed request line"}]}),
                        b"GET")
            return
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                self.answer(*_json(400, {"errors": [{"message": "malformed header"}]}),
                            b"GET")
                return
            headers[name.strip().lower()] = value.strip()
        method, target = parts[0], parts[1]
        self.done = True
        self.admin.loop.create_task(self._respond(method, target, headers))

    async def _respond(self, method: bytes, target: bytes, headers: dict) -> None:
        if method in (b"POST", b"DELETE") and self._client_gone():
            # Its client gave up waiting (this process was stopped or wedged meanwhile,
            # and the request waited in the listener's queue) and told the operator it
            # was not answered: doing it now would be a change nobody is told about.
            log.warning("admin %s %s not done: its client closed the connection before "
                        "it was acted on (it gave up waiting)", method.decode("latin-1"),
                        target[:200].decode("latin-1"))
            self.transport.abort()
            return
        try:
            status, hdrs, body = await self.admin.respond(method, target, headers)
        except Exception:
            log.exception("admin request %s failed", target[:200])
            status, hdrs, body = _json(503, {"errors": [{"message": "internal error; see "
                                                                    "the log"}]})
        if not self.transport.is_closing():
            self.answer(status, hdrs, body, method)

    def _client_gone(self) -> bool:
        """Whether the client has closed its side (end of stream, or a reset) after its
        request: a peek at the socket, which does not block."""
        if self.lost:
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            with socket.fromfd(sock.fileno(), sock.family, socket.SOCK_STREAM) as s:
                return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def answer(self, status: int, headers: dict, body: bytes, method: bytes) -> None:
        self.done = True
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                f"Content-Length: {len(body)}", "Connection: close",
                *(f"{k}: {v}" for k, v in headers.items())]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
                             + (body if method != b"HEAD" else b""))
        self.transport.close()
        # A close waits for the unsent answer for ever: a client that never reads a
        # large one (a queue view, /metrics) would keep its slot of max_connections.
        self.admin.loop.call_later(ANSWER_STALL, self._unread,
                                   self.transport.get_write_buffer_size())

    def _unread(self, before: int) -> None:
        """Abort the connection when its answer did not drain since the last look."""
        if self.lost:
            return
        left = self.transport.get_write_buffer_size()
        if left < before:
            self.admin.loop.call_later(ANSWER_STALL, self._unread, left)
        else:
            self.transport.abort()


def main(settings, index: int, ready_fd: int | None, fds=(), http_fds=()) -> None:
    """Entry point of the admin child; *http_fds* are its listening sockets, *fds* the
    HAProxy agent-check ones (admin.agent_listen, :mod:`mta.admin.agent`)."""
    name = proc.start_role("admin", index, settings.config.server.log_level)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("starting %s", name)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    ctx = bus.new_context()
    admin = Admin(settings, loop)
    receiver = bus.StatsReceiver(ctx, loop, settings.stats_endpoint(),
                                 admin.reports.add, log)
    admin.api = Api(settings, loop, ctx, admin.reports, admin.collector)
    socks = [socket.socket(fileno=fd) for fd in http_fds]
    agent_socks = [socket.socket(fileno=fd) for fd in fds]
    stop = asyncio.Event()
    proc.on_sigterm(loop, stop.set)

    async def run():
        servers = [await loop.create_server(lambda: Session(admin), sock=s) for s in socks]
        servers += [await loop.create_server(lambda: AgentSession(admin), sock=s)
                    for s in agent_socks]
        admin.api.start()
        proc.report_ready(ready_fd)
        await stop.wait()
        for srv in servers:
            srv.close()

    try:
        loop.run_until_complete(run())
    finally:
        admin.api.close()
        receiver.close()
        bus.close_context(ctx)
        loop.close()
    log.info("stopped")
