"""The delivery process's bus side (mta/delivery/main.py): outcomes are never dropped.

A real Delivery on its real bus socket and a stand-in spool shard (a DEALER
that sends a job, then reads or stops reading); the engine's intake is
replaced by a list, and outcomes are reported as the engine would.  What is
checked is what the shard relies on: every outcome arrives, once, in order,
however long the shard stopped reading; no job is taken while outcomes are
held back; an outcome for a shard that is gone is dropped, not held forever.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

import msgspec
import pytest
import uvloop
import zmq

from mta import bus
from mta.config import resolve
from mta.config.schema import Config
from mta.delivery.engine import Job
from mta.delivery.main import Delivery

QID = "0123456789ABCDEFGHIJ"
TEXT = "queued and accounted for; " * 60     # 1.6 KB outcomes: 400 are 3 x the buffers


def job(req: int) -> bus.DeliveryMessageReady:
    return bus.DeliveryMessageReady(req, QID, "s@example.com", "example.net",
                                    [bus.JobRecipient(0, "r@example.net")], {}, 1, b"x")


def delivered(req: int) -> list[bus.Result]:
    return [bus.Result(0, bus.DELIVERED, 250, "2.0.0", f"{req} {TEXT}", "mx.test", "127.0.0.1")]


@pytest.fixture
def rig(tmp_path):
    cfg = msgspec.convert({"server": {"state_dir": str(tmp_path)},
                           "spool": {"queue_high_water": 2},
                           "delivery": {"max_in_flight": 10_000}}, Config)
    settings = resolve(cfg, None)
    os.makedirs(settings.run_dir)
    loop = uvloop.new_event_loop()
    ctx = bus.new_context()
    d = Delivery(settings, 0, loop, ctx)
    taken = []

    def submit(j):                       # the engine's intake: take the job, hold it
        taken.append(j)
        d.engine.in_flight += 1
    d.engine.submit = submit
    shard = ctx.socket(zmq.DEALER)
    shard.setsockopt(zmq.LINGER, 0)
    shard.setsockopt(zmq.RCVHWM, 2)
    shard.setsockopt(zmq.RCVBUF, 4096)
    shard.connect(settings.delivery_endpoint(0))
    yield d, loop, shard, taken
    shard.close(0)
    d.server.close()
    ctx.term()
    loop.close()


def run_until(loop, pred, what: str, timeout: float = 10.0) -> None:
    """Turn the loop until *pred()* holds (the rig's events happen on it)."""
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        loop.run_until_complete(_tick())


async def _tick():
    await asyncio.sleep(0.01)


def finish(d, j: Job, req: int) -> None:
    """What the engine does when a job is done: one fewer in hand, report."""
    d.engine.in_flight -= 1
    d.report(j, delivered(req))


def read_messages(shard, wait_ms: int = 200) -> list[list[int]]:
    """The reqs of the outcomes the shard has, per bus message (a DeliveryOutcome or a
    DeliveryOutcomes), reading until none came for *wait_ms*."""
    out = []
    while shard.poll(wait_ms):
        msg = bus.decode(shard.recv())
        if type(msg) is bus.DeliveryOutcomes:
            assert 1 < len(msg.outcomes) <= bus.MAX_OUTCOMES_PER_SEND
            out.append([o.req for o in msg.outcomes])
        else:
            assert type(msg) is bus.DeliveryOutcome
            out.append([msg.req])
    return out


def read_outcomes(shard, wait_ms: int = 200) -> list[int]:
    """The reqs of the outcomes the shard has, in the order they came."""
    return [req for m in read_messages(shard, wait_ms) for req in m]


def test_outcomes_wait_for_a_full_shard_and_arrive_in_order(rig, caplog):
    d, loop, shard, taken = rig
    shard.send(bus.encode(job(1)))
    run_until(loop, lambda: taken, "the first job")
    peer = taken[0].peer
    with caplog.at_level(logging.INFO, "mta.delivery"):
        # The shard stops reading while 400 jobs finish, 10 in each loop turn (40
        # messages): far more than HWM + buffers.
        for req in range(1, 401):
            finish(d, Job(job(req), peer), req)
            if req % 10 == 0:
                loop.run_until_complete(_tick())
        # Outcomes are held back, and no new job is taken meanwhile.
        shard.send(bus.encode(job(1000)))
        for _ in range(20):
            loop.run_until_complete(_tick())
        assert len(taken) == 1, "a job was taken while outcomes were held back"
        # The shard reads again: every outcome arrives, once, in order ...
        got = []
        run_until(loop, lambda: (got.extend(read_outcomes(shard, 0)), len(got) >= 400)[1],
                  "every outcome")
        got += read_outcomes(shard)
        assert got == list(range(1, 401))
        # ... and then the job that waited is taken.
        run_until(loop, lambda: len(taken) == 2, "the waiting job")
        assert taken[1].msg.req == 1000
    assert "a spool shard is not taking outcomes (bus full)" in caplog.text
    assert "held-back outcome(s) handed back" in caplog.text


def test_an_outcome_for_a_shard_that_is_gone_is_dropped_and_logged(rig, caplog):
    d, loop, shard, taken = rig
    d.engine.in_flight += 1
    with caplog.at_level(logging.WARNING, "mta.delivery"):
        finish(d, Job(job(7), b"\0gone-shard"), 7)     # a shard that restarted since
        loop.run_until_complete(_tick())             # (sent at the end of the loop turn)
    assert f"{QID}: outcome dropped: the spool shard that sent the job is gone" in caplog.text
    # Nothing is held for it: jobs are taken as before.
    shard.send(bus.encode(job(8)))
    run_until(loop, lambda: taken, "the next job")
    assert taken[0].msg.req == 8


def test_outcomes_of_one_loop_turn_go_in_one_message_in_order(rig):
    d, loop, shard, taken = rig
    shard.send(bus.encode(job(1)))
    run_until(loop, lambda: taken, "the first job")
    peer = taken[0].peer
    finish(d, Job(job(1), peer), 1)
    loop.run_until_complete(_tick())
    for req in range(2, 2 + bus.MAX_OUTCOMES_PER_SEND + 3):   # one turn: a batch and a bit
        finish(d, Job(job(req), peer), req)
    loop.run_until_complete(_tick())
    finish(d, Job(job(1000), peer), 1000)
    loop.run_until_complete(_tick())
    n = bus.MAX_OUTCOMES_PER_SEND
    assert read_messages(shard) == [[1], list(range(2, 2 + n)), [2 + n, 3 + n, 4 + n], [1000]]


def test_the_sites_file_is_rewritten_when_a_site_gains_a_domain_not_every_second(tmp_path,
                                                                                monkeypatch):
    # A provider's site (MX rollup) holds hundreds of thousands of domains after a
    # broadcast: every domain of every site, sorted, went into the status file every
    # second -- a third of the delivery loop's time and 16 MB a second to write, parsed
    # again by the admin process for each queue view.  They go to a file of their own,
    # rewritten only when a site gains or loses a domain.
    from test_engine import Peer, Resolver, job

    from mta.delivery import engine as engine_mod
    from mta.delivery import main as delivery_main
    from mta.dns import MxResult
    from mta.obs import queue as q

    monkeypatch.setattr(delivery_main, "SITES_INTERVAL", 1.0)
    domains = ("a.test", "b.test", "c.test")
    peer = Peer()
    loop = uvloop.new_event_loop()
    server = loop.run_until_complete(loop.create_server(peer.protocol, "127.0.0.1", 0))
    cfg = msgspec.convert({"server": {"state_dir": str(tmp_path), "hostname": "mta.test"},
                           "delivery": {"mx_port": server.sockets[0].getsockname()[1],
                                        "starttls": "none", "shaping_presets": False}}, Config)
    settings = resolve(cfg, None)
    os.makedirs(settings.run_dir)
    ctx = bus.new_context()
    d = Delivery(settings, 0, loop, ctx)
    d.engine.resolver = Resolver({x: MxResult("ok", [["mx.big.test"]], domain=x)
                                  for x in domains}, {"mx.big.test": ["127.0.0.1"]})
    reports = []
    d.engine.report = lambda j, results, retry_after=0.0: reports.append(results)
    sites_path = os.path.join(settings.run_dir, "delivery-0.sites.json")

    def site_domains():
        try:
            with open(sites_path, "rb") as fh:
                return set(json.loads(fh.read())["sites"]["mx.big.test"]["domains"])
        except (OSError, KeyError):
            return set()

    async def until(pred, what, timeout):
        deadline = loop.time() + timeout
        while not pred():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def send(*to):
        n = len(reports)
        for x in to:
            d.engine.submit(job(x, "ok"))
        await until(lambda: len(reports) == n + len(to), "the deliveries", 10)

    async def main():
        upkeep = loop.create_task(d.upkeep())
        try:
            await send("a.test", "b.test")
            await until(lambda: site_domains() == {"a.test", "b.test"}, "the sites file", 5)
            was = os.stat(sites_path)
            status_was = os.stat(d.status_path).st_mtime_ns
            # mail keeps flowing to the domains the site has: the status file is
            # rewritten each second, the sites file is not
            end = loop.time() + 2.5
            while loop.time() < end:
                await send("a.test", "b.test")
                await asyncio.sleep(0.1)
            now = os.stat(sites_path)       # (though SITES_INTERVAL passed twice)
            assert (now.st_ino, now.st_mtime_ns, now.st_size) == \
                (was.st_ino, was.st_mtime_ns, was.st_size)
            assert os.stat(d.status_path).st_mtime_ns != status_was
            with open(d.status_path, "rb") as fh:
                assert "sites" not in json.loads(fh.read())
            # a domain joins the site: the sites file says so within SITES_INTERVAL
            await send("c.test")
            await until(lambda: site_domains() == set(domains), "c.test in the sites file",
                        delivery_main.SITES_INTERVAL + 2)
            # (the admin's and mta queue's view: the site's full list, for bounce --site)
            await until(lambda: os.stat(d.status_path).st_mtime_ns > os.stat(
                sites_path).st_mtime_ns, "a status file after the sites file", 3)
            assert q.delivery_status(settings.run_dir)["sites"]["mx.big.test"]["domains"] \
                == list(domains)
            # the domains are forgotten (unused for SITE_FORGET): the file says so too
            monkeypatch.setattr(engine_mod, "SITE_FORGET", -1.0)
            d.engine.forget_old_sites()
            await until(lambda: not site_domains(), "the domains gone from the sites file",
                        delivery_main.SITES_INTERVAL + 2)
        finally:
            upkeep.cancel()
            await d.engine.close()

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 30))
        assert len(peer.messages) == len(reports) and all(
            r.outcome == bus.DELIVERED for results in reports for r in results)
    finally:
        server.close()
        d.server.close()
        ctx.term()
        loop.close()
