"""A fast webhook receiver for benchmarks: answers every POST 200 at once and counts.

    python bench/webhook_sink.py --port 18090 --out counts.json [--seconds 600]

Listens on 127.0.0.1 only.  Each POST body is a SparkPost batch (a JSON array);
the receiver counts batches and events (the array's length) by event type and
rewrites ``--out`` once a second and at exit: ``{"batches", "events", "types",
"first", "last"}`` (first/last: Unix times of the first and last POST).  It stops
by itself after ``--seconds`` (bounded, like every load loop here) or on SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import time

import orjson
from aiohttp import web


async def main(args) -> None:
    got = {"batches": 0, "events": 0, "types": collections.Counter(), "first": None,
           "last": None}

    async def hook(request):
        body = orjson.loads(await request.read())   # (cheaper than json: shared cores)
        now = time.time()
        got["first"] = got["first"] or now
        got["last"] = now
        got["batches"] += 1
        got["events"] += len(body)
        for el in body:
            got["types"][el.get("msys", {}).get("message_event", {}).get("type", "?")] += 1
        return web.Response(text="OK")

    def write():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**got, "types": dict(got["types"])}, f)
        os.replace(tmp, args.out)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    deadline = time.monotonic() + args.seconds
    while not stop.is_set() and time.monotonic() < deadline:
        write()
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    write()
    await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=600.0)
    asyncio.run(main(p.parse_args()))
