"""The in-process rig of the acceptor microbenchmarks (test_bench_session, test_bench_http).

An :class:`mta.acceptor.main.Acceptor` on the fake loop of ``tests/acceptor/fake.py``
(callbacks run when the benchmark says an iteration ends), with the real bus client
on a ZeroMQ DEALER socket, and in place of the spool shard an ``inproc`` ROUTER in
this process that answers each commit at once with STATUS_OK, as a shard does after
its fsync.  The spool's side is kept small, since it is not the acceptor's work: two
raw recv and two raw send calls, with the answers encoded beforehand.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time

import zmq

from mta import bus, config
from mta.acceptor import main as acceptor_main

# The session's unit tests and these benchmarks drive it through the same fake loop and
# transport.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from acceptor.fake import Loop, Transport  # noqa: E402,F401  (Transport: for the benchmarks)

HOSTNAME = "mx.bench.example"
PREENCODED_REPLIES = 20_000         # spool answers encoded before measuring (req 1..n)
_SNDMORE = int(zmq.SNDMORE)


class AcceptorRig:
    """One acceptor, its state in a temporary directory, and one spool shard that says yes."""

    def __init__(self, endpoint: str):
        self.dir = tempfile.mkdtemp(prefix="mta-bench-acceptor-")
        spool = os.path.join(self.dir, "spool")
        os.makedirs(spool)
        settings = dataclasses.replace(config.load(None), hostname=HOSTNAME,
                                       state_dir=self.dir, spool_dir=spool)
        self.loop = Loop()
        acc = self.acceptor = acceptor_main.Acceptor(settings, 0, self.loop)
        self.ctx = zmq.Context()
        self.spool = self.ctx.socket(zmq.ROUTER)
        self.spool.bind(endpoint)
        self.replies = [self._reply(req) for req in range(PREENCODED_REPLIES)]
        self.client = bus.Client(self.ctx, self.loop, endpoint, 1000,
                                 (bus.SpoolMessageCommitted,), acc._on_reply,
                                 logging.getLogger("bench.acceptor"))
        acc.clients.append(self.client)
        acc.outbox.append([])
        self.loop.run_ready()
        acc.space_low = acc._space_low()        # (serve() measures the spool's space)

    @staticmethod
    def _reply(req: int) -> bytes:
        return bus.encode(bus.SpoolMessageCommitted(req, bus.STATUS_OK))

    def commit(self) -> None:
        """End the loop iteration (the outbox flush: one bus send); the shard takes the
        commit and answers it; the answer reaches the acceptor and the client's reply."""
        self.loop.run_ready()
        spool = self.spool
        ident = spool.recv(zmq.NOBLOCK)             # (zmq.Again: nothing was committed)
        spool.recv()                                # the commit (always one frame)
        req = next(iter(self.acceptor.pending))
        spool.send(ident, _SNDMORE)
        spool.send(self.replies[req] if req < PREENCODED_REPLIES else self._reply(req))
        self.client._drain()                        # the bus socket became readable
        self.loop.run_ready()

    def close(self) -> None:
        if self.acceptor.http is not None:
            self.acceptor.http.close()
        for c in self.acceptor.clients:
            c.close()
        self.spool.close(0)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_per(bench, n: int, what: str, warm: int = 10) -> None:
    """Run *bench* (``run(n)``, ``close()``) *warm* times, then *n* times; print the CPU per one."""
    bench.run(warm)
    t0 = time.process_time()
    bench.run(n)
    cpu = time.process_time() - t0
    bench.close()
    if n:
        print(f"{n} {what}s: {cpu / n * 1e6:.2f} µs CPU per {what}")
