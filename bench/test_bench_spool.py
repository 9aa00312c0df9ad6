"""Microbenchmark: one spool shard's group commit, in process, on real sockets.

Run: python -m pytest bench/test_bench_spool.py --benchmark-only
 or: python bench/test_bench_spool.py --rounds 1000       (CPU time per batch)
 or: valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
         python bench/test_bench_spool.py --rounds 1000    (instruction counts)

A real :class:`mta.spool.shard.Shard` (fsync off, so the disk does not
dominate; deliveries held; two delivery processes configured, each stood in
for by a bound ROUTER so the shard's delivery sockets are connected) on a real
ZeroMQ context.  Two DEALER sockets play the acceptors: per round each sends
one SPOOL_MESSAGE_COMMIT of three ~2 KB messages (Received header, Message-ID),
encoded as the acceptor's ``_flush_outbox`` does; the shard takes one turn of
its loop (:meth:`Shard.step`: poll, group commit, housekeeping) and both
replies are read.  So one round is one batch of 2 requests and 6 messages,
the shape the acceptance load produces.

The acceptors talk to the shard over ``inproc://`` (bound next to its ipc
endpoint): an inproc message is in the ROUTER's queue as soon as it is sent,
so every round is exactly one batch, and the shard's side of a receive is the
same as for ipc.  The queue is pre-filled (PREFILL messages, recovered at
open) because the cost of cyclic GC grows with the number of queued entries.

``--deliver`` counts the whole per-message path of an end-to-end run: deliveries
not held, the shard dispatches each round's new messages to the stood-in
delivery processes (DeliveryJobs on their ROUTERs), which answer every job
DELIVERED (one DeliveryOutcomes each per round); the shard takes those outcomes
in the next round's batch (recipient updates, DONE, the delivery events).  The
pre-filled messages then start a day later, so that they are queued, not due.

For instruction counts, run two round counts and take the difference, which
cancels start-up, pre-fill and recovery:
(I(2N) - I(N)) / N instructions per round.  ``--echo`` replaces the shard with
a ROUTER that only answers, to measure the harness's own share.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time

import msgspec
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mta import bus  # noqa: E402
from mta.config import resolve  # noqa: E402
from mta.config.schema import Config  # noqa: E402
from mta.queueid import new_qid  # noqa: E402
from mta.spool.shard import Shard  # noqa: E402
from mta.store import MessageMeta, Store, shard_dir  # noqa: E402

ACCEPTORS = 2
MESSAGES_PER_COMMIT = 3
MESSAGE_BYTES = 2048
PREFILL = 20_000
INPROC = "inproc://bench-spool-0"
SENDER = "sender@client.example"
RCPTS = ["rcpt@example.net"]
CLIENT = "client.example [127.0.0.1]"
ECHO_REPLY = bus.SpoolMessageCommitted(0, bus.STATUS_OK)
log = logging.getLogger("bench.spool")


def body(qid: str, n: int) -> bytes:
    """A ~2 KB message as the acceptor hands it over: Received header first."""
    head = (f"Received: from client.example ([127.0.0.1])\r\n\tby bench.example (mta) "
            f"with ESMTP id {qid}\r\n\tfor <{RCPTS[0]}>;\r\n\t"
            f"Thu, 1 Jan 2026 00:00:00 +0000\r\n"
            f"From: <{SENDER}>\r\nTo: <{RCPTS[0]}>\r\n"
            f"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
            f"Message-Id: <{n}.{qid}@client.example>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * ((MESSAGE_BYTES - len(head)) // len(line))


def settings_for(state_dir: str, deliver: bool = False):
    cfg = msgspec.convert({
        "server": {"state_dir": state_dir, "hostname": "bench.example"},
        "smtp": {"acceptors": ACCEPTORS},
        "spool": {"shards": 1, "fsync": False},
        "delivery": {"hold": not deliver, "processes": 2},
    }, Config)
    return resolve(cfg, None)


def prefill(settings, count: int, later: bool = False) -> None:
    """Queue *count* messages in shard 0's segments, for recovery to load (*later*: to
    start in a day, not due meanwhile)."""
    store = Store(shard_dir(settings.spool_dir, 0), settings.config.spool.segment_size, False)
    now = time.time()
    for start in range(0, count, 1000):
        batch = []
        for i in range(start, min(count, start + 1000)):
            qid = new_qid(0)
            params = {"message_id": f"<{i}>"}
            if later:
                params["start_at"] = now + 86400.0
            batch.append((MessageMeta(qid, SENDER, list(RCPTS), now, params,
                                      CLIENT), body(qid, i)))
        store.commit(store.write(batch, []), [])
    store.close()


class Rig:
    """A shard (or an echoing stand-in) and two acceptor sockets."""

    def __init__(self, prefilled: int = PREFILL, echo: bool = False, deliver: bool = False):
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-spool-")
        self.settings = s = settings_for(self.tmp.name, deliver)
        self.deliver = deliver and not echo
        self.answered: set[int] = set()     # jobs answered, their outcome not taken yet
        self.delivered = 0
        os.makedirs(s.run_dir, exist_ok=True)
        self.ctx = bus.new_context()
        self.echo = echo
        # Stand-ins for the delivery processes, so the shard's sockets connect.
        self.delivery = [bus.Server(self.ctx, s.delivery_endpoint(d), 1000,
                                    bus.DELIVERY_JOBS, log)
                         for d in range(s.deliveries)]
        if echo:
            self.shard = None
            self.server = bus.Server(self.ctx, INPROC, 10_000, bus.SPOOL_REQUESTS, log)
        else:
            if prefilled:
                prefill(s, prefilled, later=deliver)
            self.shard = Shard(s, 0)
            self.shard.open(self.ctx)
            self.shard.server.sock.bind(INPROC)
            self.shard.start()
        self.clients = [bus.SyncClient(self.ctx, INPROC) for _ in range(ACCEPTORS)]
        self.n = 0
        self.round()  # connects the pipes (the first message goes through the io thread)
        # (the shard connects them once its queue is recovered: under valgrind, the
        # pre-fill's recovery alone takes seconds)
        deadline = time.monotonic() + 120
        while self.shard is not None and not all(self.shard.links.up):
            self.shard.step()
            if time.monotonic() > deadline:
                raise RuntimeError("the delivery sockets did not connect")

    def commit(self, req: int) -> bytes:
        envelopes, bodies = [], []
        for _ in range(MESSAGES_PER_COMMIT):
            qid = new_qid(1)
            self.n += 1
            envelopes.append(bus.Envelope(qid, SENDER, RCPTS, {}, CLIENT, time.time(),
                                          f"<{self.n}.{qid}@client.example>"))
            bodies.append(body(qid, self.n))
        return bus.encode(bus.SpoolMessageCommit(req, envelopes, bodies))

    def round(self) -> int:
        """Two commits in, one turn of the shard, two replies out; returns the batches taken."""
        for i, c in enumerate(self.clients):
            c.sock.send(self.commit(self.n + i))
        turns = 0
        for c in self.clients:
            while not c.sock.poll(0):
                if turns > 100:
                    raise RuntimeError("no reply from the shard")
                turns += 1
                if self.shard is not None:
                    self.shard.step()
                else:
                    for _ in range(ACCEPTORS):
                        got = self.server.recv()
                        if got is not None:
                            self.server.send(got[0], ECHO_REPLY)
            reply = bus.decode(c.sock.recv())
            assert type(reply) is bus.SpoolMessageCommitted and reply.status == bus.STATUS_OK, \
                reply
        if self.deliver:
            self.answer_jobs()
        return turns

    def answer_jobs(self) -> None:
        """Read every job the shard has out and not answered yet; answer each DELIVERED."""
        jobs = self.shard.jobs
        self.answered &= jobs.keys()
        want = len(jobs) - len(self.answered)
        servers = {d.sock: d for d in self.delivery}
        items = [(d.sock, zmq.POLLIN) for d in self.delivery]
        while want > 0:
            ready = zmq.zmq_poll(items, 5000)
            if not ready:
                raise RuntimeError(f"{want} job(s) out never reached the delivery stand-ins")
            for sock, _ in ready:
                server = servers[sock]
                r = server.recv()
                if r is None:
                    continue
                peer, msg = r
                outcomes = []
                for job in (msg.jobs if type(msg) is bus.DeliveryJobs else [msg]):
                    outcomes.append(bus.DeliveryOutcome(
                        job.req, job.qid,
                        [bus.Result(rc.index, bus.DELIVERED, 250, "2.0.0", "2.0.0 Ok: queued",
                                    "mx.example.net", "127.0.0.1") for rc in job.rcpts],
                        site="example.net", outbound_tls="0"))
                    self.answered.add(job.req)
                    want -= 1
                server.send(peer, bus.DeliveryOutcomes(outcomes))
                self.delivered += len(outcomes)

    def close(self) -> None:
        if self.shard is not None:
            sh = self.shard
            sh.store.close()
            sh.server.close()
            sh.links.close()
            if sh.pusher is not None:
                sh.pusher.close()       # (else ctx.term() waits for it for ever)
        else:
            self.server.close()
        for c in self.clients:
            c.close()
        for d in self.delivery:
            d.close()
        self.ctx.term()
        self.tmp.cleanup()


def test_spool_group_commit(benchmark):
    benchmark.group = "spool: one group commit, 2 requests x 3 messages of 2 KB"
    rig = Rig()
    try:
        turns = benchmark(rig.round)
        assert turns == 1
    finally:
        rig.close()


BACKLOG = 200_000       # messages blocked behind one site's per-domain cap
RELEASED = 20_000       # released one at a time per round
QID0 = 0x18A3F2C4B1D2E0300000


def _blocked_window():
    from mta.spool import dispatch as dsp
    w = dsp.Window(processes=1, max_in_flight=10, per_domain=1, spread_threshold=10)
    w.add(0, "first", [0], 0, "slow.example", dsp.BULK)
    for i in range(BACKLOG):
        w.block("slow.example", "%020X" % (QID0 + i))      # queue ids of mta.queueid's shape
    return (w,), {}


def _release_one_at_a_time(w) -> int:
    from mta.spool import dispatch as dsp
    n = 0
    for req in range(RELEASED):
        w.remove(req)
        qid = w.released()[0]
        w.add(req + 1, qid, [0], 0, "slow.example", dsp.BULK)
        w.block("slow.example", "%020X" % (QID0 + BACKLOG + req))    # new mail arrives at the back
        n += 1
    return n


def test_blocked_backlog_release(benchmark):
    """A throttled site's backlog drained one message per returning job (Window.released):
    the cost per message must not grow with the backlog (it did: a dict popped from
    its front walks its deleted slots)."""
    benchmark.group = f"spool: release {RELEASED:,} of {BACKLOG:,} blocked, one at a time"
    n = benchmark.pedantic(_release_one_at_a_time, setup=_blocked_window, rounds=5)
    assert n == RELEASED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--prefill", type=int, default=PREFILL)
    ap.add_argument("--echo", action="store_true", help="harness only: an echoing ROUTER")
    ap.add_argument("--deliver", action="store_true",
                    help="the whole path: jobs dispatched, answered DELIVERED, outcomes taken")
    args = ap.parse_args()
    rig = Rig(args.prefill, args.echo, args.deliver)
    gc.collect()
    turns = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(args.rounds):
        turns += rig.round()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    msgs = args.rounds * ACCEPTORS * MESSAGES_PER_COMMIT
    print(f"rounds={args.rounds} turns={turns} messages={msgs} "
          f"cpu_us_per_batch={cpu / args.rounds * 1e6:.1f} "
          f"cpu_us_per_message={cpu / msgs * 1e6:.2f} "
          f"wall_us_per_batch={wall / args.rounds * 1e6:.1f}" +
          (f" delivered={rig.delivered}" if rig.deliver else ""))
    rig.close()


if __name__ == "__main__":
    main()
