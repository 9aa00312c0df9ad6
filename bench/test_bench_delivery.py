"""Microbenchmark: the delivery process's per-message path, in process, on real sockets.

Run: python -m pytest bench/test_bench_delivery.py --benchmark-only
 or: python bench/test_bench_delivery.py --messages 4000      (CPU time per message)
 or: valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
         python bench/test_bench_delivery.py --messages 4000  (instruction counts)

Real: a :class:`mta.delivery.main.Delivery` (its bus socket, its engine with the
node limiter, adaptive state and shaping presets, its metrics, its log lines at
``info`` through the daemon's handler -- written to /dev/null) on uvloop, as
``delivery[0]`` of a node of one delivery process, configured as ``bench/load.py
--e2e`` configures the mta: one static route ``*`` to Postfix's ``smtp-sink`` on
127.0.0.1 (an IP literal: no DNS lookup), [delivery] defaults otherwise
(connection_limit 10, connection reuse, cross-transaction pipelining).  The
sink is a real process on a real TCP socket; each message is ~2 KB, one
recipient, as smtp-source's.

Stood in for: the spool shard.  A DEALER socket on the same ZeroMQ context and
loop (:class:`Dealer`) sends the jobs as a shard does -- DELIVERY_JOBS
of up to ``bus.MAX_JOBS_PER_SEND``, keeping at most WINDOW jobs out (a shard's
bulk window for one domain, ``max_in_flight_per_domain``) -- and counts the
outcomes that come back, each checked delivered.  Its cost (building and
encoding the jobs, decoding the outcomes) is in the figures, a few percent.

For instruction counts, run two message counts and take the difference, which
cancels start-up, the connections' set-up and the shutdown:
(I(N2) - I(N1)) / (N2 - N1) instructions per message (``/tmp/s46/ir.sh`` style).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time

import msgspec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import uvloop  # noqa: E402
import zmq  # noqa: E402

from mta import bus, proc  # noqa: E402
from mta.config import resolve  # noqa: E402
from mta.config.schema import Config  # noqa: E402
from mta.delivery.main import Delivery  # noqa: E402
from mta.queueid import new_qid  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
MESSAGE_BYTES = 2048
WINDOW = 500            # jobs out at once (a shard's per-domain bulk window, the default)
SENDER = "bench@src.test.example"
DOMAIN = "dst.test.example"
RCPT = "sink@" + DOMAIN
log = logging.getLogger("bench.delivery")


def message() -> bytes:
    """A ~2 KB message: headers, then 78-octet lines."""
    head = (b"Received: from client.example ([127.0.0.1])\r\n\tby bench.example (mta) "
            b"with ESMTP id 0123456789ABCDEFGHIJ\r\n\tfor <" + RCPT.encode() + b">;\r\n\t"
            b"Thu, 1 Jan 2026 00:00:00 +0000\r\nFrom: <" + SENDER.encode() + b">\r\n"
            b"To: <" + RCPT.encode() + b">\r\nSubject: delivery benchmark\r\n"
            b"Message-Id: <1@src.test.example>\r\n\r\n")
    count = (MESSAGE_BYTES - len(head)) // 78
    return head + b"".join(b"%04d " % i + b"x" * 71 + b"\r\n" for i in range(count))


BODY = message()


def start_sink() -> tuple[subprocess.Popen, int]:
    """A running smtp-sink on loopback (stop it by its PID)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [SMTP_SINK] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [
        f"127.0.0.1:{port}", "100"]
    sink = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return sink, port
        except OSError:
            if sink.poll() is not None or time.monotonic() > deadline:
                sink.kill()
                raise RuntimeError("smtp-sink did not start") from None
            time.sleep(0.02)


def settings_for(state_dir: str, port: int):
    cfg = msgspec.convert({
        "server": {"state_dir": state_dir, "hostname": "bench.example"},
        "delivery": {"processes": 1, "nameservers": ["127.0.0.1:9"],
                     "route": [{"domain": "*", "hosts": [f"127.0.0.1:{port}"]}]},
    }, Config)
    return resolve(cfg, None)


def quiet_logging() -> None:
    """The daemon's logging (lines held to the end of a loop turn), into /dev/null."""
    proc.setup_logging("info", "delivery[0]")
    for h in logging.getLogger().handlers:
        h.setStream(open(os.devnull, "w"))


class Dealer(bus.sockets._LoopSocket):
    """A DEALER on the loop for the stood-in shard (the bus's own DEALER on a loop, the
    acceptors' Client, went when their commits moved to a stream)."""

    def __init__(self, ctx, loop, endpoint: str, on_reply):
        sock = bus.sockets._socket(ctx, zmq.DEALER, 10_000)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(endpoint)
        self._on_reply = on_reply
        super().__init__(sock, loop)

    def send(self, msg) -> bool:
        return self._send(None, msg)

    def connected(self) -> bool:
        return bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)

    def _received(self, frames: list) -> None:
        msg = bus.receive(frames, bus.DELIVERY_OUTCOMES, log, "outcome")
        if msg is not None:
            self._on_reply(msg)


class Shard:
    """The stood-in spool shard: jobs out in batches, outcomes counted."""

    def __init__(self, ctx, loop, endpoint: str, total: int):
        self.client = Dealer(ctx, loop, endpoint, self._on_outcome)
        self.total = total
        self.sent = 0
        self.done = 0
        self.bad = 0
        self.finished = loop.create_future()

    def top_up(self) -> None:
        """Send jobs while the window has room, MAX_JOBS_PER_SEND to a message."""
        while self.sent < self.total and self.sent - self.done < WINDOW:
            n = min(bus.MAX_JOBS_PER_SEND, self.total - self.sent, WINDOW - (self.sent - self.done))
            jobs = [bus.DeliveryMessageReady(self.sent + i, new_qid(0), SENDER, DOMAIN,
                                             [bus.JobRecipient(0, RCPT)], {}, 1, BODY)
                    for i in range(n)]
            if not self.client.send(jobs[0] if n == 1 else bus.DeliveryJobs(jobs)):
                raise RuntimeError("the delivery process's queue is full")
            self.sent += n

    def _on_outcome(self, msg) -> None:
        outcomes = msg.outcomes if type(msg) is bus.DeliveryOutcomes else (msg,)
        for o in outcomes:
            self.done += 1
            if any(r.outcome != bus.DELIVERED for r in o.results):
                self.bad += 1
        if self.done >= self.total:
            if not self.finished.done():
                self.finished.set_result(None)
        else:
            self.top_up()


class Rig:
    """A delivery process, its stood-in shard and an smtp-sink."""

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-delivery-")
        self.sink, port = start_sink()
        self.settings = s = settings_for(self.tmp.name, port)
        os.makedirs(s.run_dir, exist_ok=True)
        quiet_logging()
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.ctx = bus.new_context()
        self.delivery = Delivery(s, 0, self.loop, self.ctx)

    def run(self, messages: int) -> int:
        """Deliver *messages* through the process; the outcomes that were not delivered."""
        shard = Shard(self.ctx, self.loop, self.settings.delivery_endpoint(0), messages)

        async def go():
            deadline = self.loop.time() + 10
            while not shard.client.connected():
                if self.loop.time() > deadline:
                    raise RuntimeError("the stood-in shard did not connect")
                await asyncio.sleep(0.005)
            shard.top_up()
            await asyncio.wait_for(shard.finished, 60 + messages / 100)

        try:
            self.loop.run_until_complete(go())
        finally:
            shard.client.close()
        return shard.bad

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.delivery.engine.close())
            self.delivery.server.close()
            bus.close_context(self.ctx)
            self.loop.close()
        finally:
            self.sink.terminate()
            self.sink.wait(timeout=5)
            self.tmp.cleanup()


MESSAGES = 2000


def test_bench_delivery(benchmark):
    benchmark.group = f"delivery: {MESSAGES} x 2 KB through the delivery process to smtp-sink"
    rig = Rig()
    try:
        bad = benchmark.pedantic(rig.run, args=(MESSAGES,), rounds=5, iterations=1,
                                 warmup_rounds=1)
        assert bad == 0
        benchmark.extra_info["us_per_message"] = round(
            benchmark.stats.stats.median / MESSAGES * 1e6, 1)
    finally:
        rig.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=4000)
    args = ap.parse_args()
    rig = Rig()
    try:
        rig.run(min(200, args.messages))    # warm: connections open, caches filled
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        bad = rig.run(args.messages)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        rig.close()
    print(f"messages={args.messages} not_delivered={bad} "
          f"cpu_us_per_message={cpu / args.messages * 1e6:.1f} "
          f"wall_us_per_message={wall / args.messages * 1e6:.1f}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
