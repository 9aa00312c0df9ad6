"""Delivery engine: per-domain queues, routing, connection reuse, outcomes.

A job is one message's recipients for one domain (they go in one SMTP
transaction).  Jobs queue per destination domain; each domain has at most
``delivery.connection_limit`` connections, each a worker task that takes
jobs from the domain's queue, reuses its connection for up to
``max_deliveries_per_connection`` messages and keeps it open ``idle_timeout``
seconds for the next one.

Routing: a static route (``[[delivery.route]]``, exact domain first, then
``*``) wins; otherwise MX lookup (:mod:`mta.dns`): preference order, random
among equals, the domain's own address records when it has no MX.  Hosts are
tried in order: a refused connection, a timeout or a 4xx/5xx greeting moves on
to the next host.  Null MX, NXDOMAIN and a domain without addresses fail the
recipients permanently; a DNS timeout or SERVFAIL defers them.

Outcome per recipient — ``delivered``, ``deferred`` (4xx, connection or DNS
trouble) or ``failed`` (5xx) — with the reply and the remote host; the
spool shard that owns the message decides when to retry and when to bounce.

8-bit messages: a server without 8BITMIME gets nothing; the recipients fail
with 554 5.6.3 (we do not down-convert: rewriting a signed message would break
its DKIM signature).  Likewise SMTPUTF8 (553 5.6.7).
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time

from mta.bus import DEFERRED, DELIVERED, FAILED, DeliveryMessageReady, Result
from mta.config import parse_hostport
from mta.delivery import client as smtpc
from mta.dns import DnsTempError

log = logging.getLogger("mta.delivery")


class Job:
    """One message's recipients for one domain: the spool's job and who sent it."""

    __slots__ = ("msg", "peer", "queued_at")

    def __init__(self, msg: DeliveryMessageReady, peer: bytes):
        self.msg = msg              # req, qid, sender, domain, rcpts, params, attempt, body
        self.peer = peer            # the spool shard to report to
        self.queued_at = time.monotonic()

    def results(self, outcome: str, code: int, enhanced: str, text: str, host: str = "",
                ip: str = "") -> list[Result]:
        """The same result for every recipient of the job."""
        return [Result(index=r.index, outcome=outcome, code=code, enhanced=enhanced, text=text,
                       host=host, ip=ip)
                for r in self.msg.rcpts]


class Target:
    """Where to connect, with the options that apply."""

    __slots__ = ("host", "ip", "port", "starttls", "tls_verify", "source")

    def __init__(self, host, ip, port, starttls, tls_verify, source):
        self.host = host
        self.ip = ip
        self.port = port
        self.starttls = starttls
        self.tls_verify = tls_verify
        self.source = source or None


class RouteError(Exception):
    """Routing failed for every recipient of the domain."""

    def __init__(self, outcome: str, code: int, enhanced: str, text: str):
        super().__init__(text)
        self.outcome = outcome
        self.code = code
        self.enhanced = enhanced
        self.text = text


class Destination:
    __slots__ = ("domain", "queue", "active", "wakeup")

    def __init__(self, domain: str):
        self.domain = domain
        self.queue: collections.deque[Job] = collections.deque()
        self.active = 0
        self.wakeup = asyncio.Event()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class Engine:
    def __init__(self, settings, resolver, report, loop):
        self.cfg = settings.config.delivery
        self.helo = settings.helo_name
        self.resolver = resolver
        self.report = report        # report(job, results) -> None
        self.loop = loop
        self.dests: dict[str, Destination] = {}
        self.routes = {r.domain.lower().rstrip("."): r for r in self.cfg.route}
        self.in_flight = 0
        self.stats = collections.Counter()
        self.workers: set[asyncio.Task] = set()
        self.stopping = False

    # --------------------------------------------------------------- intake

    def submit(self, job: Job) -> None:
        domain = job.msg.domain
        d = self.dests.get(domain)
        if d is None:
            d = self.dests[domain] = Destination(domain)
        d.queue.append(job)
        self.in_flight += 1
        if d.active < self.cfg.connection_limit and \
                (d.active == 0 or len(d.queue) > d.active):
            self._spawn(d)
        else:
            d.wakeup.set()

    def _spawn(self, d: Destination) -> None:
        d.active += 1
        task = self.loop.create_task(self._worker(d))
        self.workers.add(task)
        task.add_done_callback(self.workers.discard)

    def _finish(self, job: Job, results: list[Result]) -> None:
        self.in_flight -= 1
        for r in results:
            self.stats[r.outcome] += 1
        self.report(job, results)

    # -------------------------------------------------------------- routing

    async def targets(self, domain: str) -> list[Target]:
        """Candidate hosts for *domain*, in the order to try them."""
        cfg = self.cfg
        route = self.routes.get(domain) or self.routes.get("*")
        out: list[Target] = []
        if route is not None:
            for h in route.hosts:
                if h.startswith("[") or h.count(":") == 1:
                    host, port = parse_hostport(h)
                else:
                    host, port = h, cfg.mx_port
                try:
                    ips = [host] if _is_ip(host) else await self.resolver.resolve_addresses(host)
                except DnsTempError as exc:
                    log.info("address lookup for route host %s failed: %s", host, exc)
                    continue
                for ip in ips:
                    out.append(Target(host, ip, port, route.starttls, route.tls_verify,
                                      route.source_address))
            if not out:
                raise RouteError(DEFERRED, 451, "4.4.3", f"no address for route hosts of {domain}")
            return out
        mx = await self.resolver.resolve_mx(domain)
        if mx.status == "null_mx":
            raise RouteError(FAILED, 556, "5.1.10", f"{domain} does not accept mail (null MX)")
        if mx.status == "nxdomain":
            raise RouteError(FAILED, 550, "5.1.2", f"domain {domain} does not exist")
        if mx.status == "no_address":
            raise RouteError(FAILED, 550, "5.1.2", f"domain {domain} has no mail server address")
        if mx.status != "ok":
            raise RouteError(DEFERRED, 451, "4.4.3",
                             f"DNS lookup for {domain} failed: {mx.reason or mx.status}")
        for group in mx.hosts:
            for host in group:
                try:
                    ips = [host] if _is_ip(host) else await self.resolver.resolve_addresses(host)
                except DnsTempError as exc:  # one MX host's addresses: try the next host
                    log.info("address lookup for %s failed: %s", host, exc)
                    continue
                for ip in ips:
                    out.append(Target(host, ip, cfg.mx_port, cfg.starttls, cfg.tls_verify,
                                      cfg.source_address))
        if not out:
            raise RouteError(DEFERRED, 451, "4.4.3", f"no address found for the MX hosts of {domain}")
        return out

    async def connect(self, domain: str):
        """Open a connection to the first host of *domain* that answers properly.

        Returns (connection, Target); raises RouteError when no host will do.
        """
        cfg = self.cfg
        last = None
        for t in await self.targets(domain):
            try:
                conn = await smtpc.SmtpConnection.open(
                    t.ip, t.port, helo_name=self.helo, source_address=t.source,
                    connect_timeout=cfg.connect_timeout, command_timeout=cfg.command_timeout,
                    data_timeout=cfg.data_timeout, starttls=t.starttls, tls_verify=t.tls_verify,
                    tls_server_hostname=t.host if not _is_ip(t.host) else None)
                return conn, t
            except smtpc.SmtpConnectError as exc:
                last = (exc.reply.code if exc.reply else 451,
                        (exc.reply.enhanced if exc.reply else None) or "4.4.1",
                        f"{t.host}[{t.ip}]: {exc.reply.text if exc.reply else exc}")
            except (smtpc.SmtpError, OSError) as exc:
                last = (451, "4.4.1", f"{t.host}[{t.ip}]: {type(exc).__name__} {exc}".strip())
            log.info("connect to %s[%s]:%d for %s failed: %s", t.host, t.ip, t.port, domain,
                     last[2])
        code, enh, text = last
        # Every host failed: try again later, whatever the last one said.
        raise RouteError(DEFERRED, 451 if code >= 500 else code, "4.4.1" if code >= 500 else enh,
                         text)

    # -------------------------------------------------------------- workers

    async def _worker(self, d: Destination) -> None:
        cfg = self.cfg
        conn = target = None
        try:
            while True:
                if not d.queue:
                    if self.stopping:
                        return
                    d.wakeup.clear()
                    try:
                        await asyncio.wait_for(d.wakeup.wait(), cfg.idle_timeout)
                    except asyncio.TimeoutError:
                        return
                    if not d.queue:
                        continue
                job = d.queue.popleft()
                if conn is not None and (not conn.is_usable or
                                         conn.messages_sent >= cfg.max_deliveries_per_connection):
                    await conn.quit()
                    conn = None
                if conn is None:
                    try:
                        conn, target = await self.connect(d.domain)
                    except RouteError as exc:
                        # The same answer holds for everything queued for this domain now.
                        self._fail_route(job, exc)
                        while d.queue:
                            self._fail_route(d.queue.popleft(), exc)
                        return
                conn = await self._send(conn, target, job)
        except Exception:
            log.exception("delivery worker for %s failed", d.domain)
        finally:
            d.active -= 1
            if conn is not None:
                await conn.quit()
            if d.queue and d.active == 0 and not self.stopping:
                self._spawn(d)
            elif not d.queue and d.active == 0 and self.dests.get(d.domain) is d:
                del self.dests[d.domain]

    def _fail_route(self, job: Job, exc: RouteError) -> None:
        self._finish(job, job.results(exc.outcome, exc.code, exc.enhanced, exc.text))

    async def _send(self, conn, t: Target, job: Job):
        """Send one job over *conn*; return the connection if it can be reused, else None."""
        host, ip = t.host, t.ip
        m = job.msg
        addrs = [r.address for r in m.rcpts]
        eight = m.params.get("BODY", "").upper() == "8BITMIME"
        utf8 = "SMTPUTF8" in m.params
        try:
            res = await conn.send_message(m.sender, addrs, m.body, eight_bit=eight,
                                          smtputf8=utf8)
        except smtpc.Unsupported8Bit:
            self._finish(job, job.results(
                FAILED, 554, "5.6.3", f"{host} does not accept 8-bit messages (no 8BITMIME)",
                host, ip))
            return conn if conn.is_usable else None
        except smtpc.UnsupportedSmtpUtf8:
            self._finish(job, job.results(
                FAILED, 553, "5.6.7", f"{host} does not support SMTPUTF8", host, ip))
            return conn if conn.is_usable else None
        except (smtpc.SmtpError, OSError) as exc:
            self._finish(job, job.results(
                DEFERRED, 451, "4.4.2", f"{host}[{ip}]: {type(exc).__name__}: {exc}", host, ip))
            conn.close()
            return None
        results = []
        for k, rcpt in enumerate(m.rcpts):
            r = res.rcpt_replies[k]
            if r.code < 400 and res.data_reply is not None:
                r = res.data_reply
            outcome = DELIVERED if r.code < 400 else DEFERRED if r.code < 500 else FAILED
            results.append(Result(index=rcpt.index, outcome=outcome, code=r.code,
                                  enhanced=r.enhanced or "", text=r.text, host=host, ip=ip))
        self._finish(job, results)
        if not conn.is_usable:
            conn.close()
            return None
        return conn

    async def close(self, timeout: float = 10.0) -> None:
        """Let idle workers end (QUIT their connections); cancel what is still busy."""
        self.stopping = True
        for d in self.dests.values():
            d.wakeup.set()
        if self.workers:
            done, busy = await asyncio.wait(set(self.workers), timeout=timeout)
            for t in busy:
                t.cancel()
            if busy:
                await asyncio.wait(busy, timeout=1.0)
