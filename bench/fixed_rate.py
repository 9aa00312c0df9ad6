#!/usr/bin/env python3
"""A fixed-rate (open-loop) HTTP POST load generator with latency percentiles (issue 15, item 4).

wrk measures the most a server takes with a fixed number of connections each sending
its next request when the last answer came (closed loop); a server that stalls then
simply gets fewer requests, and the stall hides from the percentiles.  Here requests are
*scheduled* at a fixed rate -- request i at start + i / rate -- whatever the answers do
(Debian has no wrk2, which does the same); a request whose time has come while every
connection is busy waits for the next free one, and its latency counts from its
scheduled time (corrected for coordinated omission, as wrk2 does).  Latency is from the
scheduled time to the last octet of the response.

    python bench/fixed_rate.py --url http://127.0.0.1:8025/api/v1/transmissions \\
        --rate 2000 --duration 10 --connections 64 [--auth KEY] [--json out.json]

Connections are opened first (all of them, kept alive); with ``--connections 10000`` the
process raises its own descriptor limit to the hard limit.  One request in flight per
connection (no pipelining), HTTP/1.1 keep-alive, responses with Content-Length.  Reports
the achieved rate, the latency percentiles, non-2xx answers, and connections that were
refused, reset or closed.  Loopback only (the URL must be on 127.0.0.0/8 or ::1);
bounded by --duration plus --drain seconds.  Standard library (uses uvloop if present).

Two engines, the same schedule and the same report: ``--engine c`` (the default when a C
compiler is there: bench/fixed_rate.c, compiled once into the temporary directory) costs
a few microseconds of CPU per request; ``--engine python`` (below) about 0.13 ms, which at
thousands of requests a second on a small machine takes CPU from the server it measures
and shows up in that server's percentiles (bench/RESULTS.md, "The fixed-rate client's own
CPU").
"""
from __future__ import annotations

import argparse
import array
import asyncio
import collections
import hashlib
import ipaddress
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))


class Conn(asyncio.Protocol):
    """One keep-alive connection: send a request, read one response, report, repeat."""

    def __init__(self, gen: "Generator"):
        self.gen = gen
        self.transport = None
        self.buf = bytearray()
        self.need = -1          # octets of the whole response once its head is read
        self.status = 0
        self.sched = 0.0        # the scheduled time of the request in flight
        self.busy = False       # a request is in flight

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, sched: float) -> None:
        self.sched = sched
        self.busy = True
        self.need = -1
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i < 0:
                self.gen.error("response without Content-Length")
                self.transport.close()
                return
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17: j if j > 0 else len(head)])
            self.need = end + 4 + length
        if len(buf) >= self.need:
            del buf[:self.need]
            self.need = -1
            self.busy = False
            self.gen.done(self, self.status)

    def connection_lost(self, exc) -> None:
        self.gen.lost(self, exc)


class Generator:
    def __init__(self, args, body: bytes):
        u = urllib.parse.urlsplit(args.url)
        if u.scheme != "http" or not ipaddress.ip_address(u.hostname).is_loopback:
            raise SystemExit("fixed_rate: the URL must be http:// on a loopback address")
        self.host, self.port = u.hostname, u.port or 80
        path = u.path or "/"
        auth = f"Authorization: {args.auth}\r\n" if args.auth else ""
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\n{auth}"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                        "\r\n").encode() + body
        self.args = args
        self.idle: collections.deque[Conn] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()   # scheduled times
        self.latency: list[float] = []
        self.statuses: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.sent = 0
        self.clock = time.perf_counter

    def error(self, what: str) -> None:
        self.errors[what] += 1

    def done(self, conn: Conn, status: int) -> None:
        now = self.clock()
        self.latency.append(now - conn.sched)
        self.statuses[status] += 1
        if self.waiting:
            conn.send(self.waiting.popleft())
            self.sent += 1
        else:
            self.idle.append(conn)

    def lost(self, conn: Conn, exc) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:        # (an idle keep-alive connection closed by the server is fine)
            self.errors["connection closed" if exc is None else type(exc).__name__] += 1

    async def open(self, loop) -> None:
        n = self.args.connections
        sem = asyncio.Semaphore(256)            # connects at once, at most

        async def one():
            async with sem:
                try:
                    _, c = await loop.create_connection(lambda: Conn(self), self.host,
                                                        self.port)
                    self.idle.append(c)
                except OSError as exc:
                    self.errors[f"connect: {exc.strerror or exc}"] += 1
        await asyncio.gather(*(one() for _ in range(n)))

    async def prime(self, in_flight: int = 64, timeout_s: float = 120.0) -> dict:
        """One unmeasured request on every open connection, at most *in_flight* at once,
        so that the server has accepted and set up each connection before the schedule
        starts (--prime).  Returns the answers' statuses; latencies are not kept."""
        todo = collections.deque(self.idle)
        self.idle.clear()
        n = len(todo)
        deadline = self.clock() + timeout_s
        while (todo or len(self.idle) < n - sum(self.errors.values())) \
                and self.clock() < deadline:
            while todo and n - len(todo) - len(self.idle) < in_flight:
                todo.popleft().send(self.clock())
            await asyncio.sleep(0.001)
        statuses = dict(self.statuses)
        self.latency.clear()
        self.statuses.clear()
        return statuses

    async def run(self, loop) -> dict:
        rate, duration = self.args.rate, self.args.duration
        total = int(rate * duration)
        t0 = self.clock() + 0.05
        i = 0
        while i < total:
            now = self.clock()
            due = min(total, int((now - t0) * rate) + 1) if now >= t0 else 0
            while i < due:
                sched = t0 + i / rate
                if self.idle:
                    c = self.idle.popleft()
                    c.send(sched)
                    self.sent += 1
                else:
                    self.waiting.append(sched)
                i += 1
            await asyncio.sleep(max(0.0, min(0.001, t0 + i / rate - self.clock())))
        end_sched = self.clock()
        deadline = end_sched + self.args.drain
        while len(self.latency) + sum(self.errors.values()) < total and \
                self.clock() < deadline:
            await asyncio.sleep(0.01)
        elapsed = self.clock() - t0
        return summary(self.args, total, self.latency, elapsed, dict(self.statuses),
                       dict(self.errors))


def summary(args, total: int, latency, elapsed: float, statuses: dict, errors: dict) -> dict:
    """The report of a run: achieved rate, latency percentiles (ms), answers, errors."""
    lat = sorted(latency)

    def pct(p):
        return round(1000 * lat[min(len(lat) - 1, int(len(lat) * p / 100))], 3) \
            if lat else None
    return {"rate": args.rate, "duration": args.duration, "connections": args.connections,
            "engine": args.engine, "scheduled": total, "completed": len(lat),
            "achieved_per_second": round(len(lat) / elapsed, 1),
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "p999_ms": pct(99.9),
            "max_ms": round(1000 * lat[-1], 3) if lat else None,
            "non_2xx": sum(v for k, v in statuses.items() if not 200 <= int(k) < 300),
            "statuses": statuses, "errors": errors, "unanswered": total - len(lat)}


def c_engine() -> str | None:
    """The compiled C engine (built once per version of its source), or None without a
    C compiler."""
    src = os.path.join(HERE, "fixed_rate.c")
    with open(src, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    binary = os.path.join(tempfile.gettempdir(), f"mta-bench-fixed-rate-{digest}")
    if os.access(binary, os.X_OK):
        return binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tmp = f"{binary}.{os.getpid()}"
    subprocess.run([cc, "-O2", "-Wall", "-o", tmp, src], check=True)
    os.replace(tmp, binary)
    return binary


def run_c(args, binary: str, request: bytes) -> dict:
    """One run of the C engine: the same schedule and report as :class:`Generator`."""
    u = urllib.parse.urlsplit(args.url)
    with tempfile.TemporaryDirectory(prefix="fixed-rate-") as tmp:
        req, lat = os.path.join(tmp, "request"), os.path.join(tmp, "latency")
        with open(req, "wb") as fh:
            fh.write(request)
        r = subprocess.run([binary, u.hostname, str(u.port or 80), req, repr(args.rate),
                            repr(args.duration), str(args.connections), repr(args.drain),
                            "1" if args.prime else "0", lat], capture_output=True, text=True,
                           timeout=300 + args.duration + args.drain)
        if r.returncode != 0:
            raise SystemExit(f"fixed_rate: the C engine failed: {r.stderr.strip()}")
        counts = json.loads(r.stdout)
        latency = array.array("d")
        with open(lat, "rb") as fh:
            latency.frombytes(fh.read())
    out = summary(args, counts["scheduled"], latency, counts["elapsed"],
                  {int(k) if k.isdigit() else k: v for k, v in counts["statuses"].items()},
                  counts["errors"])
    out["opened"] = counts["opened"]
    if args.prime:
        out["primed"] = {"answered": counts["primed"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--auth", default="", help="Authorization header value")
    p.add_argument("--body-size", type=int, default=2048)
    p.add_argument("--from", dest="sender", default=None,
                   help="the transmission's From address (default: bench/http_load.py's)")
    p.add_argument("--drain", type=float, default=10.0,
                   help="seconds to wait for answers after the last scheduled request")
    p.add_argument("--prime", action="store_true",
                   help="first send one unmeasured request on every connection (64 at a "
                        "time), so that the measured schedule meets connections the server "
                        "has already accepted and set up, not a storm of new ones")
    p.add_argument("--json", default=None)
    p.add_argument("--engine", choices=("auto", "c", "python"), default="auto",
                   help="c: bench/fixed_rate.c (a few us of CPU per request); python: this "
                        "file's asyncio client (~0.13 ms per request); auto: c if a C "
                        "compiler is there")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.connections + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.path.insert(0, HERE)
    from http_load import SENDER, make_body   # the same transmission http_load.py posts
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    gen = Generator(args, make_body(args.body_size, args.sender or SENDER))
    binary = c_engine() if args.engine != "python" else None
    if args.engine == "c" and binary is None:
        p.error("--engine c needs a C compiler (cc or gcc)")
    args.engine = "c" if binary else "python"

    async def go():
        loop = asyncio.get_running_loop()
        await gen.open(loop)
        opened = len(gen.idle)
        primed = await gen.prime() if args.prime else None
        out = await gen.run(loop)
        out["opened"] = opened
        if primed is not None:
            out["primed"] = primed    # statuses of the unmeasured requests
        return out
    out = run_c(args, binary, gen.request) if binary else asyncio.run(go())
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh)
    return 0 if not out["errors"] and not out["non_2xx"] and not out["unanswered"] else 1


if __name__ == "__main__":
    sys.exit(main())
