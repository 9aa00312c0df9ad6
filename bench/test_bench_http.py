"""Microbenchmark: the acceptor's CPU per HTTP transmission, in process, without sockets.

Run: python -m pytest bench/test_bench_http.py --benchmark-only
 or: python bench/test_bench_http.py [--transmissions N]   (prints µs/transmission)

What one transmission is: bench/http_load.py's request — a POST of a 2 KB
single-recipient transmission (inline text with substitutions, campaign_id,
metadata) on a kept-alive connection — from its bytes to the 200 written back.

What is real: :class:`mta.acceptor.http.Session` and ``Service`` (httptools parsing,
the transmission's decoding and checks, the message built), :class:`mta.acceptor.main.Acceptor`
(submit, the per-iteration outbox flush, the reply handler) and :class:`mta.bus.Client`
on a real ZeroMQ DEALER socket.  What is not: the TCP transport and the event loop
(the stubs of ``tests/acceptor/fake.py``, as in bench/test_bench_session.py) and the
spool shard (an ``inproc`` ROUTER in this process that answers each commit at once
with STATUS_OK, as a shard does after its fsync).  The acceptor's state (the
idempotency store) lives in a temporary directory.

Where this time goes (2026-12-05): no single hot spot; ~340 Python-level calls per
transmission (bench/RESULTS.md, "Where the CPU goes, measured with perf").
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time

import pytest
import zmq

from mta import bus, config
from mta.acceptor import http
from mta.acceptor import main as acceptor_main

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
from acceptor.fake import Loop, Transport  # noqa: E402
from http_load import make_body  # noqa: E402

TRANSMISSIONS = 100
ENDPOINT = "inproc://bench-spool-http"
BODY = make_body(2048)
REQUEST = (b"POST /api/v1/transmissions HTTP/1.1\r\nHost: 127.0.0.1:8025\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
_SNDMORE = int(zmq.SNDMORE)


class Bench:
    """One acceptor with one kept-alive HTTP connection, and one spool shard that says yes."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mta-bench-http-")
        spool = os.path.join(self.dir, "spool")
        os.makedirs(spool)
        settings = dataclasses.replace(config.load(None), hostname="mx.bench.example",
                                       state_dir=self.dir, spool_dir=spool)
        self.loop = Loop()
        acc = self.acceptor = acceptor_main.Acceptor(settings, 0, self.loop)
        self.ctx = zmq.Context()
        self.spool = self.ctx.socket(zmq.ROUTER)
        self.spool.bind(ENDPOINT)
        self.client = bus.Client(self.ctx, self.loop, ENDPOINT, 1000,
                                 (bus.SpoolMessageCommitted,), acc._on_reply,
                                 logging.getLogger("bench.http"))
        acc.clients.append(self.client)
        acc.outbox.append([])
        self.loop.run_ready()
        svc = acc.http = http.Service(acc)
        svc.open()
        acc.space_low = acc._space_low()        # (serve() measures the spool's space)
        self.transport = Transport()
        self.session = http.Session(svc)
        self.transport.connect(self.session)

    def transmission(self) -> None:
        """One request, ending with the 200 written to the client."""
        self.session.data_received(REQUEST)
        self.loop.run_ready()                       # the outbox flush: one bus send
        spool = self.spool
        ident = spool.recv(zmq.NOBLOCK)             # (zmq.Again: nothing was committed)
        spool.recv()
        req = next(iter(self.acceptor.pending))
        spool.send(ident, _SNDMORE)
        spool.send(bus.encode(bus.SpoolMessageCommitted(req, bus.STATUS_OK)))
        self.client._drain()                        # the bus socket became readable
        self.loop.run_ready()

    def run(self, n: int) -> None:
        for _ in range(n):
            self.transmission()
        out = b"".join(self.transport.written)
        self.transport.written.clear()
        assert out.count(b"HTTP/1.1 200 OK\r\n") == n, out[:400]
        assert out.count(b'"total_accepted_recipients":1') == n, out[:400]

    def close(self) -> None:
        self.acceptor.http.close()
        for c in self.acceptor.clients:
            c.close()
        self.spool.close(0)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def bench_http():
    b = Bench()
    yield b
    b.close()


def test_http_transmissions(benchmark, bench_http):
    benchmark.group = f"acceptor: {TRANSMISSIONS} HTTP transmissions (2 KB, one recipient)"
    benchmark.extra_info["transmissions"] = TRANSMISSIONS
    benchmark(bench_http.run, TRANSMISSIONS)


def main(argv: list[str]) -> None:
    n = 3000
    if "--transmissions" in argv:
        n = int(argv[argv.index("--transmissions") + 1])
    b = Bench()
    b.run(200)                                      # warm up
    t0 = time.process_time()
    b.run(n)
    cpu = time.process_time() - t0
    b.close()
    if n:
        print(f"{n} transmissions: {cpu / n * 1e6:.2f} µs CPU per transmission")


if __name__ == "__main__":
    main(sys.argv[1:])
