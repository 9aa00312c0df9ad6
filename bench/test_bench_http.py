"""Microbenchmark: the acceptor's CPU per HTTP transmission, in process, without sockets.

Run: python -m pytest bench/test_bench_http.py --benchmark-only
 or: python bench/test_bench_http.py [--transmissions N] [--size OCTETS]   (prints µs/transmission)

What one transmission is: bench/http_load.py's request — a POST of a 2 KB (and a
100 KB) single-recipient transmission (inline text with substitutions, campaign_id,
metadata) on a kept-alive connection — from its bytes to the 200 written back.

What is real: :class:`mta.acceptor.http.Session` and ``Service`` (httptools parsing,
the transmission's decoding and checks, the message built), :class:`mta.acceptor.main.Acceptor`
(submit, the per-iteration outbox flush, the reply handler) and :class:`mta.bus.StreamClient`
(framing included).  What is not: the TCP transport, the event loop, the spool
stream's socket and the spool shard (bench/acceptor_rig.py, shared with
bench/test_bench_session.py).
The acceptor's state (the idempotency store) lives in a temporary directory.

Where this time goes (2026-12-05): no single hot spot; ~340 Python-level calls per
transmission (bench/RESULTS.md, "Where the CPU goes, measured with perf").  Measured
by callgrind (2026-12-06, /tmp/s46/ir.sh-style differencing of 200 and 1,200
transmissions): 443,000 instructions per transmission before stop 46's steps, 396,000
after (cProfile: 380 -> 349 calls, C functions included); 357,000 after its second round
(no exception raised and cleared in C per transmission any more: gdb on _PyErr_SetObject).
Stop 47 (typed kernels): 355,200 at its start; 333,200 with the template renderer's loop
compiled (ext/render.pyx); 310,300 with the common header fields' (ext/fields.pyx);
303,200 with a 7bit text part written in one call (there too).
"""
from __future__ import annotations

import os
import sys

import pytest

from acceptor_rig import AcceptorRig, Transport, cpu_per
from mta.acceptor import http

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_load import make_body  # noqa: E402

TRANSMISSIONS = 100


def request(size: int) -> bytes:
    body = make_body(size)
    return (b"POST /api/v1/transmissions HTTP/1.1\r\nHost: 127.0.0.1:8025\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


class Bench(AcceptorRig):
    """One acceptor with one kept-alive HTTP connection, and one spool shard that says yes."""

    def __init__(self, size: int = 2048):
        super().__init__()
        self.size = size
        self.request = request(size)
        svc = self.acceptor.http = http.Service(self.acceptor)
        svc.open()
        self.transport = Transport()
        self.session = http.Session(svc)
        self.transport.connect(self.session)

    def transmission(self) -> None:
        """One request, ending with the 200 written to the client."""
        self.session.data_received(self.request)
        self.commit()

    def run(self, n: int) -> None:
        for _ in range(n):
            self.transmission()
        out = b"".join(self.transport.written)
        self.transport.written.clear()
        assert out.count(b"HTTP/1.1 200 OK\r\n") == n, out[:400]
        assert out.count(b'"total_accepted_recipients":1') == n, out[:400]


@pytest.fixture(params=[2048, 102400], ids=["2KB", "100KB"])
def bench_http(request):
    b = Bench(request.param)
    yield b
    b.close()


def test_http_transmissions(benchmark, bench_http):
    # (100 KB: a text over the template cache's bound, compiled for every request)
    benchmark.group = (f"acceptor: {TRANSMISSIONS} HTTP transmissions "
                       f"({bench_http.size // 1024} KB, one recipient)")
    benchmark.extra_info["transmissions"] = TRANSMISSIONS
    benchmark(bench_http.run, TRANSMISSIONS)


def main(argv: list[str]) -> None:
    n = 3000
    if "--transmissions" in argv:
        n = int(argv[argv.index("--transmissions") + 1])
    size = int(argv[argv.index("--size") + 1]) if "--size" in argv else 2048
    cpu_per(Bench(size), n, "transmission", warm=200)


if __name__ == "__main__":
    main(sys.argv[1:])
