"""Microbenchmark: the delivery client (mta.delivery.client) against aiosmtplib.

Run: python -m pytest bench/test_bench_client.py --benchmark-only

Both clients, in the same run, send 1,000 messages of 2 KB (one recipient
each, every eighth line starting with a dot) over one connection to Postfix's
smtp-sink on 127.0.0.1 (no dump files, so the sink is not the bottleneck), on
uvloop.  smtp-sink offers PIPELINING; our client uses it (two round trips per
message), aiosmtplib does not (four: MAIL, RCPT, DATA, end of data).  One
round = open, 1,000 messages, QUIT.  ``extra_info["messages_per_second"]``
is 1,000 divided by the median round time (``..._best_round``: by the fastest).
"""
import asyncio
import os
import socket
import subprocess
import time

import aiosmtplib
import pytest
import uvloop

from mta.delivery.client import SmtpConnection

SMTP_SINK = "/usr/sbin/smtp-sink"
MESSAGES = 1000
MESSAGE_BYTES = 2048
ROUNDS = 10
SENDER = "bench@src.test.example"
RCPT = "sink@dst.test.example"


def message() -> bytes:
    """A ~2 KB message: headers, then 78-octet lines, every eighth one starting with a dot."""
    head = (b"From: Bench <bench@src.test.example>\r\nTo: sink@dst.test.example\r\n"
            b"Subject: client benchmark\r\nMessage-ID: <1@src.test.example>\r\n\r\n")
    count = (MESSAGE_BYTES - len(head)) // 78
    return head + b"".join((b"." if i % 8 == 7 else b"") + b"%04d " % i + b"x" * 71 + b"\r\n"
                           for i in range(count))


MESSAGE = message()


@pytest.fixture(scope="module")
def sink_port():
    """A running smtp-sink on loopback; stopped (by PID) after the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [SMTP_SINK] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [
        f"127.0.0.1:{port}", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("smtp-sink did not start") from None
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=5)


async def ours(port: int) -> int:
    conn = await SmtpConnection.open("127.0.0.1", port, helo_name="bench.test.example",
                                     command_timeout=10, data_timeout=10)
    assert conn.supports_pipelining
    ok = 0
    for _ in range(MESSAGES):
        r = await conn.send_message(SENDER, [RCPT], MESSAGE)
        ok += r.accepted(0)
    await conn.quit()
    return ok


async def theirs(port: int) -> int:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await smtp.connect()
    ok = 0
    for _ in range(MESSAGES):
        errors, _ = await smtp.sendmail(SENDER, [RCPT], MESSAGE)
        ok += not errors
    await smtp.quit()
    return ok


CLIENTS = {"mta.delivery.client": ours, "aiosmtplib": theirs}


@pytest.mark.benchmark(group="smtp-client: 1000 x 2 KB over one connection to smtp-sink")
@pytest.mark.parametrize("client", list(CLIENTS))
def test_bench_client(benchmark, sink_port, client):
    send = CLIENTS[client]

    def one_round():
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(asyncio.wait_for(send(sink_port), 60))

    accepted = benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert accepted == MESSAGES
    median = MESSAGES / benchmark.stats.stats.median
    best = MESSAGES / benchmark.stats.stats.min
    benchmark.extra_info["messages_per_second"] = round(median)
    benchmark.extra_info["messages_per_second_best_round"] = round(best)
    print(f"\n{client}: {median:,.0f} messages/s (median round), {best:,.0f} (best round)")
