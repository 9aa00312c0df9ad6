"""CPU per request and reply between an acceptor and a spool shard: ZeroMQ against the stream.

Run: python bench/bus_roundtrip.py [--rate 5000] [--requests 20000] [--rounds 2]

Two processes, as in the daemon: a "shard" that waits on its socket(s), takes every
request waiting and answers each at once (no disk), and an "acceptor" on uvloop that
sends a 2 KB SpoolMessageCommit at a fixed rate and counts the replies.  Each round
runs both transports, alternating:

- ``zmq``: a DEALER on the acceptor's loop (its ZeroMQ fd read when it signals, as
  the acceptors did before the stream) and a ROUTER polled by the shard;
- ``stream``: the bus's own :class:`mta.bus.StreamClient` and :class:`mta.bus.Server`
  with its stream socket, :class:`mta.bus.Poller` and ``Server.flush``.

Printed: the CPU (user + system, every thread) of each process over the run, per
round trip, and their voluntary context switches.  A paced rate is the point: under
a closed loop many requests share each wake-up, at a fixed rate each one pays for its
own (bench/RESULTS.md, "Item 4's half rate is nearly a full machine").
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import uvloop  # noqa: E402
import zmq  # noqa: E402

from mta import bus  # noqa: E402

LOG = logging.getLogger("bench.bus")


def _request(req: int) -> bus.SpoolMessageCommit:
    env = bus.Envelope("0" * 20, "s@example.com", ["r@example.net"], {}, "c [127.0.0.1]", 1.0)
    return bus.SpoolMessageCommit(req, [env], [b"x" * 2048])


def _cpu() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_nvcsw


def shard(mode: str, path: str, n: int, ready_w: int, out_w: int) -> None:
    ctx = bus.new_context()
    if mode == "zmq":
        sock = ctx.socket(zmq.ROUTER)
        sock.bind("ipc://" + path)
        items = [(sock, zmq.POLLIN)]
    else:
        server = bus.Server(ctx, "ipc://" + path + ".router", 10_000, bus.SPOOL_REQUESTS, LOG,
                            stream=path)
        poller = bus.Poller(server, bus.DeliveryLinks(ctx, [], 10_000, LOG))
    os.write(ready_w, b"r")
    cpu0, cs0 = _cpu()
    done = 0
    while done < n:
        if mode == "zmq":
            if not zmq.zmq_poll(items, 1000):
                continue
            while True:
                try:
                    peer = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = bus.decode(sock.recv())
                sock.send(peer, zmq.SNDMORE)
                sock.send(bus.encode(bus.SpoolMessageCommitted(msg.req, bus.STATUS_OK)))
                done += 1
        else:
            if not poller.wait(1000)[0]:
                continue
            while (got := server.recv()) is not None:
                server.send(got[0], bus.SpoolMessageCommitted(got[1].req, bus.STATUS_OK))
                done += 1
            server.flush()
    cpu1, cs1 = _cpu()
    os.write(out_w, f"{cpu1 - cpu0} {cs1 - cs0}\n".encode())


def acceptor(mode: str, path: str, n: int, rate: float) -> tuple[float, int, float]:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    got = [0]
    done = loop.create_future()

    def on_reply(msg) -> None:
        got[0] += 1
        if got[0] == n:
            done.set_result(None)

    if mode == "zmq":
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("ipc://" + path)

        def drain() -> None:
            while zmq.zmq_poll([(sock, zmq.POLLIN)], 0):
                on_reply(bus.decode(sock.recv(zmq.NOBLOCK)))

        loop.add_reader(sock.getsockopt(zmq.FD), drain)

        def send(msg) -> None:
            sock.send(bus.encode(msg), zmq.NOBLOCK)
            loop.call_soon(drain)       # (an edge a send consumed)
    else:
        client = bus.StreamClient(loop, path, 10_000, (bus.SpoolMessageCommitted,), on_reply,
                                  LOG)
        while not client.connected():
            loop.run_until_complete(asyncio.sleep(0.001))
        send = client.send
    loop.run_until_complete(asyncio.sleep(0.2))
    interval = 1.0 / rate

    async def paced() -> None:
        start = time.monotonic()
        for i in range(n):
            wait = start + i * interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            send(_request(i))
        await done

    cpu0, cs0 = _cpu()
    t0 = time.monotonic()
    loop.run_until_complete(asyncio.wait_for(paced(), n / rate + 30))
    wall = time.monotonic() - t0
    cpu1, cs1 = _cpu()
    loop.close()
    return cpu1 - cpu0, cs1 - cs0, wall


def run(mode: str, n: int, rate: float) -> None:
    with tempfile.TemporaryDirectory(prefix="mta-bench-bus-") as d:
        path = os.path.join(d, "spool-0")
        ready_r, ready_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                shard(mode, path, n, ready_w, out_w)
            finally:
                os._exit(0)
        os.read(ready_r, 1)
        a_cpu, a_cs, wall = acceptor(mode, path, n, rate)
        s_cpu, s_cs = os.read(out_r, 100).decode().split()
        os.waitpid(pid, 0)
    s_cpu = float(s_cpu)
    print(f"{mode:6} {n} round trips at {rate:,.0f}/s in {wall:.2f} s: acceptor "
          f"{a_cpu / n * 1e6:5.1f} µs, shard {s_cpu / n * 1e6:5.1f} µs, both "
          f"{(a_cpu + s_cpu) / n * 1e6:5.1f} µs per round trip; voluntary context switches "
          f"{a_cs / n:.2f} + {int(s_cs) / n:.2f} per round trip")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=5000.0, help="requests a second")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    for _ in range(args.rounds):
        for mode in ("zmq", "stream"):
            run(mode, args.requests, args.rate)


if __name__ == "__main__":
    main()
