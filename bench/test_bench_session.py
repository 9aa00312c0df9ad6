"""Microbenchmark: the acceptor's CPU per SMTP transaction, in process, without sockets.

Run: python -m pytest bench/test_bench_session.py --benchmark-only
 or: python bench/test_bench_session.py [--transactions N] [--pure]   (prints µs/transaction)

What one transaction is: what Postfix's ``smtp-source -d`` (the load benchmark's
client; it cannot pipeline) sends on a reused connection — ``MAIL FROM``,
``RCPT TO``, ``DATA``, then a 2 KB message ending in CRLF "." CRLF — each in its
own ``data_received()`` call, as the replies come back one by one.

What is real: :class:`mta.acceptor.smtp.Session`, :class:`mta.acceptor.main.Acceptor`
(commit, submit, the per-iteration outbox flush, the reply handler), the bus
codec and :class:`mta.bus.StreamClient` (framing included).  What is not: the TCP
transport, the event loop, the spool stream's socket and the spool shard
(bench/acceptor_rig.py: the stubs of ``tests/acceptor/fake.py``, the fakes of the
session's unit tests, and this process answering every commit at once with STATUS_OK,
as a shard does after its fsync).

For figures that do not depend on the machine's load, count instructions:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/test_bench_session.py --transactions 200
    (the same with 2200; the difference / 2000 is instructions per transaction)
"""
from __future__ import annotations

import sys

import pytest

from acceptor_rig import AcceptorRig, Transport, cpu_per
from mta import native
from mta.acceptor import smtp

IMPLS = ["compiled", "pure"]
TRANSACTIONS = 100
MESSAGE_BYTES = 2048

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


class Bench(AcceptorRig):
    """One acceptor with one SMTP session after EHLO, and one spool shard that says yes."""

    def __init__(self, pure: bool):
        super().__init__()
        self.acceptor.scanner_mod = native.load("scanner", pure=pure)
        self.transport = Transport()
        self.session = s = smtp.Session(self.acceptor)
        self.transport.connect(s)
        s.data_received(b"EHLO client.example\r\n")
        self.transport.written.clear()

    def transaction(self) -> None:
        """One smtp-source transaction, ending with the spool's answer written to the client."""
        s = self.session
        s.data_received(MAIL)
        s.data_received(RCPT)
        s.data_received(DATA)
        s.data_received(BODY)
        self.commit()

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
    cpu_per(Bench(pure="--pure" in argv), n, "transaction")


if __name__ == "__main__":
    main(sys.argv[1:])
