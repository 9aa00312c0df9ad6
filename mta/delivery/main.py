"""delivery[d]: sends the messages of the recipient domains that hash to d.

Reads:   DELIVERY_MESSAGE_READY from the spool shards (ROUTER ``delivery-<d>``):
         one message's recipients for one domain, with the message.
Writes:  DELIVERY_OUTCOME back to the spool shard that sent the job (the
         message's owner), one per job, per-recipient results inside.
Peers:   receiving mail servers over SMTP; DNS servers (``delivery.nameservers``).
Config:  [delivery] (all keys), [server] hostname.

Sharding by domain keeps a domain's connections and limits in one process.
The in-flight window is bounded: with ``delivery.max_in_flight`` jobs in hand
the process stops reading its socket, the bus queue fills to its high-water
mark and the spool shards hold further jobs back.  Nothing here is durable:
a job lost in a crash is still pending in its spool shard and is sent again
(at-least-once).  SIGTERM: stop taking jobs, let transactions in progress
finish (``server.shutdown_timeout``), exit.
"""
from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
import zmq

from mta import bus, proc
from mta.delivery.engine import Engine, Job

log = logging.getLogger("mta.delivery")


class Delivery:
    def __init__(self, settings, index: int, loop, ctx):
        from mta import dns

        cfg = settings.config.delivery
        self.settings = settings
        self.cfg = cfg
        self.loop = loop
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        hwm = settings.config.spool.queue_high_water
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.bind(settings.endpoint(f"delivery-{index}"))
        self.fd = self.sock.getsockopt(zmq.FD)
        self.reading = False
        self.drain_scheduled = False
        ns = [ip for ip, _ in settings.nameservers] or None
        port = settings.nameservers[0][1] if settings.nameservers else 53
        self.resolver = dns.Resolver(ns, port=port, timeout=cfg.dns_timeout)
        self.engine = Engine(settings, self.resolver, self.report, loop)
        self.stopping = False

    def start(self) -> None:
        self._resume()
        self.loop.call_soon(self._drain)

    def _resume(self) -> None:
        if not self.reading:
            self.reading = True
            self.loop.add_reader(self.fd, self._drain)

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def _drain(self) -> None:
        self.drain_scheduled = False
        sock = self.sock
        cap = self.cfg.max_in_flight
        while not self.stopping and self.engine.in_flight < cap:
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                break
            try:
                peer, *frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                m, f, body = bus.decode(frames)
            except bus.BusError as exc:
                log.warning("dropped a malformed job: %s", exc)
                continue
            if m.name != "DELIVERY_MESSAGE_READY":
                log.warning("unexpected %s ignored", m.name)
                continue
            req, qid, sender, domain, rcpts, params, attempt = f
            self.engine.submit(Job(req, qid, sender, domain, rcpts, params, attempt, body, peer))
        if self.engine.in_flight >= cap:
            self._pause()

    def report(self, job: Job, results: list) -> None:
        try:
            self.sock.send_multipart([job.peer, *bus.encode("DELIVERY_OUTCOME", job.req, job.qid,
                                                            results)], zmq.NOBLOCK)
        except zmq.Again:
            # The spool shard is not reading; it will find the recipients still
            # pending and send them again.
            log.warning("%s: outcome not handed back (spool busy); it will be retried", job.qid)
        for i, outcome, code, enh, text, host, ip in results:
            log.info("%s: to=<%s> relay=%s[%s] status=%s (%d %s %s)", job.qid,
                     next(a for k, a in job.rcpts if k == i), host or "none", ip or "",
                     outcome, code, enh, text)
        if not self.stopping and self.engine.in_flight < self.cfg.max_in_flight:
            # Also when reading: ZeroMQ's FD is edge-triggered and the send above
            # can consume the edge of jobs that arrived meanwhile, so the reader
            # would never fire again.  Look at the socket once more.
            self._resume()
            if not self.drain_scheduled:
                self.drain_scheduled = True
                self.loop.call_soon(self._drain)

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        self._pause()
        deadline = self.loop.time() + timeout
        while self.engine.in_flight and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.engine.close()


def main(settings, index: int, ready_fd: int | None) -> None:
    """Entry point of the delivery[d] child."""
    name = proc.start_role("delivery", index, settings.config.server.log_level)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("starting %s", name)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    ctx = bus.new_context()
    d = Delivery(settings, index, loop, ctx)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def run():
        d.start()
        proc.report_ready(ready_fd)
        await stop.wait()
        await d.stop(settings.config.server.shutdown_timeout)

    try:
        loop.run_until_complete(run())
    finally:
        d.sock.close(0)
        ctx.term()
        loop.close()
    log.info("stopped: %s", dict(d.engine.stats))
