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
    shard.connect(settings.endpoint("delivery-0"))
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
