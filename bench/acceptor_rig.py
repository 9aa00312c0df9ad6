"""The in-process rig of the acceptor microbenchmarks (test_bench_session, test_bench_http).

An :class:`mta.acceptor.main.Acceptor` on the fake loop of ``tests/acceptor/fake.py``
(callbacks run when the benchmark says an iteration ends), with the real bus client
(:class:`mta.bus.StreamClient`: the request's encoding and framing, the reply's
framing and decoding) on a transport that keeps what is written, and in place of the
spool shard this process, which answers each commit at once with STATUS_OK, as a
shard does after its fsync.  The spool's side is kept small, since it is not the
acceptor's work: the answers are framed and encoded beforehand.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time

from mta import bus, config
from mta.acceptor import main as acceptor_main

# The session's unit tests and these benchmarks drive it through the same fake loop and
# transport.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from acceptor.fake import Loop, Transport  # noqa: E402,F401  (Transport: for the benchmarks)

HOSTNAME = "mx.bench.example"
PREENCODED_REPLIES = 20_000         # spool answers encoded before measuring (req 1..n)


class _Written:
    """The client's transport: keeps the last write (the system call's cost is not
    the acceptor's Python work this rig measures)."""

    def __init__(self):
        self.last = None

    def writelines(self, parts) -> None:
        self.last = parts

    def is_closing(self) -> bool:       # (StreamClient.send asks: a shard going away)
        return False

    def close(self) -> None:
        pass


class AcceptorRig:
    """One acceptor, its state in a temporary directory, and one spool shard that says yes."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mta-bench-acceptor-")
        spool = os.path.join(self.dir, "spool")
        os.makedirs(spool)
        settings = dataclasses.replace(config.load(None), hostname=HOSTNAME,
                                       state_dir=self.dir, spool_dir=spool)
        self.loop = Loop()
        acc = self.acceptor = acceptor_main.Acceptor(settings, 0, self.loop)
        self.replies = [self._reply(req) for req in range(PREENCODED_REPLIES)]
        self.client = bus.StreamClient(self.loop, "", 1000, (bus.SpoolMessageCommitted,),
                                       acc._on_reply, logging.getLogger("bench.acceptor"),
                                       connect=False)
        self.written = _Written()
        self.client.connection_made(self.written)
        acc.clients.append(self.client)
        acc.outbox.append([])
        self.loop.run_ready()
        acc.space_low = acc._space_low()        # (serve() measures the spool's space)

    @staticmethod
    def _reply(req: int) -> bytes:
        data = bus.encode(bus.SpoolMessageCommitted(req, bus.STATUS_OK))
        return bus.sockets.frame_head(len(data)) + data

    def commit(self) -> None:
        """End the loop iteration (the outbox flush: one bus send); the shard takes the
        commit and answers it; the answer reaches the acceptor and the client's reply."""
        self.loop.run_ready()
        assert self.written.last is not None        # (else nothing was committed)
        self.written.last = None
        req = next(iter(self.acceptor.pending))
        self.client.data_received(self.replies[req] if req < PREENCODED_REPLIES
                                  else self._reply(req))
        self.loop.run_ready()

    def close(self) -> None:
        if self.acceptor.http is not None:
            self.acceptor.http.close()
        for c in self.acceptor.clients:
            c.close()
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
