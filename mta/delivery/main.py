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
        ns = [ip for ip, _ in settings.nameservers] or None
        port = settings.nameservers[0][1] if settings.nameservers else 53
        self.resolver = dns.Resolver(ns, port=port, timeout=cfg.dns_timeout)
        self.engine = Engine(settings, self.resolver, self.report, loop)
        self.stopping = False
        self.server = bus.AsyncServer(ctx, loop, settings.endpoint(f"delivery-{index}"),
                                      settings.config.spool.queue_high_water, bus.DELIVERY_JOBS,
                                      self._on_job, log, "job")

    def _on_job(self, peer: bytes, msg: bus.DeliveryMessageReady) -> None:
        if self.stopping:
            return   # not taken: the spool sends it again
        self.engine.submit(Job(msg, peer))
        if self.engine.in_flight >= self.cfg.max_in_flight:
            self.server.pause()   # the window is full; jobs wait in the bus

    def report(self, job: Job, results: list[bus.Result]) -> None:
        m = job.msg
        if not self.server.send(job.peer, bus.DeliveryOutcome(m.req, m.qid, results)):
            # The spool shard is not reading; it will find the recipients still
            # pending and send them again.
            log.warning("%s: outcome not handed back (spool busy); it will be retried", m.qid)
        address = {r.index: r.address for r in m.rcpts}
        for r in results:
            log.info("%s: to=<%s> relay=%s[%s] status=%s (%d %s %s)", m.qid,
                     address.get(r.index, ""), r.host or "none", r.ip or "",
                     r.outcome, r.code, r.enhanced, r.text)
        if not self.stopping and self.engine.in_flight < self.cfg.max_in_flight:
            self.server.resume()

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        self.server.pause()
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
        proc.report_ready(ready_fd)
        await stop.wait()
        await d.stop(settings.config.server.shutdown_timeout)

    try:
        loop.run_until_complete(run())
    finally:
        d.server.close()
        ctx.term()
        loop.close()
    log.info("stopped: %s", dict(d.engine.stats))
