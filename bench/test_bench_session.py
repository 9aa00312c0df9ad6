"""Microbenchmark: the acceptor's CPU per SMTP transaction, in process, without sockets.

Run: python -m pytest bench/test_bench_session.py --benchmark-only
 or: python bench/test_bench_session.py [--transactions N] [--pure]   (prints µs/transaction)

What one transaction is: what Postfix's ``smtp-source -d`` (the load benchmark's
client; it cannot pipeline) sends on a reused connection — ``MAIL FROM``,
``RCPT TO``, ``DATA``, then a 2 KB message ending in CRLF "." CRLF — each in its
own ``data_received()`` call, as the replies come back one by one.

What is real: :class:`mta.acceptor.smtp.Session`, :class:`mta.acceptor.main.Acceptor`
(commit, submit, the per-iteration outbox flush, the reply handler), the bus
codec and :class:`mta.bus.Client` on a real ZeroMQ DEALER socket.  What is not:
the TCP transport (a stub that collects what is written), the event loop (a
stub that runs ``call_soon`` callbacks when the benchmark says an iteration
ends; both from ``tests/acceptor/fake.py``, the fakes of the session's unit
tests) and the spool shard (an ``inproc`` ROUTER in this process that answers
every commit at once with STATUS_OK, as a shard does after its fsync).  The
spool's side is kept small, since it is not the acceptor's work: two raw recv
and two raw send calls on the ROUTER, with the replies encoded beforehand.

For figures that do not depend on the machine's load, count instructions:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/test_bench_session.py --transactions 200
    (the same with 2200; the difference / 2000 is instructions per transaction)
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import pytest
import zmq

from mta import bus, config, native
from mta.acceptor import main as acceptor_main
from mta.acceptor import smtp

# The session's unit tests and this benchmark drive it through the same fake loop and transport.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from acceptor.fake import Loop, Transport  # noqa: E402

IMPLS = ["compiled", "pure"]
TRANSACTIONS = 100
MESSAGE_BYTES = 2048
HOSTNAME = "mx.bench.example"
ENDPOINT = "inproc://bench-spool-0"
PREENCODED_REPLIES = 20_000         # spool answers encoded before measuring (req 1..n)
_SNDMORE = int(zmq.SNDMORE)

MAIL = b"MAIL FROM:<s@example.com>\r\n"
RCPT = b"RCPT TO:<r@example.net>\r\n"
DATA = b"DATA\r\n"


def message() -> bytes:
    """A ~2 KB message ending in CRLF "." CRLF, every eighth line starting with a (stuffed) dot."""
    head = (b"From: <s@example.com>\r\nTo: <r@example.net>\r\n"
            b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-Id: <1@example.com>\r\n\r\n")
    count = (MESSAGE_BYTES - len(head)) // 78
    lines = b"".join((b".." if i % 8 == 7 else b"") + b"%04d " % i + b"X" * 71 + b"\r\n"
                     for i in range(count))
    return head + lines + b".\r\n"


BODY = message()
REPLIES = (b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n")


class Bench:
    """One acceptor with one SMTP session after EHLO, and one spool shard that says yes."""

    def __init__(self, pure: bool):
        settings = dataclasses.replace(config.load(None), hostname=HOSTNAME)
        self.loop = Loop()
        acc = self.acceptor = acceptor_main.Acceptor(settings, 0, self.loop)
        acc.scanner_mod = native.load("scanner", pure=pure)
        self.ctx = zmq.Context()
        self.spool = self.ctx.socket(zmq.ROUTER)
        self.spool.bind(ENDPOINT)
        self.replies = [self._reply(req) for req in range(PREENCODED_REPLIES)]
        client = bus.Client(self.ctx, self.loop, ENDPOINT, 1000, (bus.SpoolMessageCommitted,),
                            acc._on_reply, logging.getLogger("bench.session"))
        acc.clients.append(client)
        acc.outbox.append([])
        self.client = client
        self.loop.run_ready()
        self.transport = Transport()
        self.session = s = smtp.Session(acc)
        self.transport.connect(s)
        s.data_received(b"EHLO client.example\r\n")
        self.transport.written.clear()

    @staticmethod
    def _reply(req: int) -> bytes:
        return bus.encode(bus.SpoolMessageCommitted(req, bus.STATUS_OK))

    def transaction(self) -> None:
        """One smtp-source transaction, ending with the spool's answer written to the client."""
        s = self.session
        s.data_received(MAIL)
        s.data_received(RCPT)
        s.data_received(DATA)
        s.data_received(BODY)
        self.loop.run_ready()                       # the outbox flush: one bus send
        # The spool shard: take the commit, answer it (after its fsync).
        spool = self.spool
        ident = spool.recv()
        spool.recv()                                # the commit (always one frame)
        req = next(iter(self.acceptor.pending))
        spool.send(ident, _SNDMORE)
        spool.send(self.replies[req] if req < PREENCODED_REPLIES else self._reply(req))
        self.client._drain()                        # the bus socket became readable
        self.loop.run_ready()

    def run(self, n: int) -> None:
        for _ in range(n):
            self.transaction()
        self.check(n)

    def check(self, n: int) -> None:
        """Every transaction got 250, 250, 354 and 250 queued, and nothing else was written."""
        out = self.transport.written
        assert len(out) == 4 * n, out[:8]
        for i in range(n):
            assert tuple(out[4 * i:4 * i + 3]) == REPLIES, out[4 * i:4 * i + 4]
            assert out[4 * i + 3].startswith(b"250 2.0.0 Ok: queued as "), out[4 * i + 3]
        out.clear()

    def close(self) -> None:
        for c in self.acceptor.clients:
            c.close()
        self.spool.close(0)
        self.ctx.term()


@pytest.fixture(params=IMPLS)
def bench_session(request):
    b = Bench(pure=request.param == "pure")
    yield b
    b.close()


def test_session_transactions(benchmark, bench_session):
    benchmark.group = f"acceptor: {TRANSACTIONS} smtp-source transactions (MAIL, RCPT, DATA, 2 KB)"
    benchmark.extra_info["transactions"] = TRANSACTIONS
    benchmark(bench_session.run, TRANSACTIONS)


def main(argv: list[str]) -> None:
    n = TRANSACTIONS
    if "--transactions" in argv:
        n = int(argv[argv.index("--transactions") + 1])
    b = Bench(pure="--pure" in argv)
    b.run(10)                                       # warm up
    t0 = time.process_time()
    b.run(n)
    cpu = time.process_time() - t0
    b.close()
    if n:
        print(f"{n} transactions: {cpu / n * 1e6:.2f} µs CPU per transaction")


if __name__ == "__main__":
    main(sys.argv[1:])
