"""Webhook push rate: events per second from the events store to a fast local receiver.

In-process: a real events store (LMDB) filled with N SparkPost-shaped events, the real
SQLite state (one durable commit per batch made and per batch finished), one Sender per
webhook, and an aiohttp receiver on 127.0.0.1 that answers 200 at once.  Loopback only;
bounded by N.

    python3 bench/webhooks.py [--events 50000] [--batch-size 100] [--in-flight 4]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aiohttp import web  # noqa: E402

from mta.api import webhookdb  # noqa: E402
from mta.api import webhooks as W  # noqa: E402
from mta.config.schema import WebhooksConfig  # noqa: E402
from mta.feedback.events_store import EventStore  # noqa: E402
from mta.webhooks.sender import Sender  # noqa: E402


def events(n: int) -> list[dict]:
    now = str(int(time.time()))
    types = ["injection", "delivery", "delivery", "bounce"]
    return [{"type": types[i % 4], "event_id": str(10**12 + i), "timestamp": now,
             "message_id": "%020x" % i, "transmission_id": "1234567", "rcpt_to":
             f"user{i}@example.com", "raw_rcpt_to": f"user{i}@example.com",
             "recipient_domain": "example.com", "routing_domain": "example.com",
             "friendly_from": "news@example.org", "msg_from": "bounces@example.org",
             "subject": "Weekly news", "msg_size": "2911", "ip_pool": "default",
             "sending_ip": "127.0.0.1", "queue_time": "366", "num_retries": "0",
             "rcpt_meta": {}, "rcpt_tags": [], "campaign_id": "weekly"}
            for i in range(n)]


async def main(args) -> None:
    got = {"events": 0, "batches": 0}

    async def hook(request):
        body = await request.json()
        got["events"] += len(body)
        got["batches"] += 1
        return web.Response(text="OK")
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        store = EventStore(os.path.join(d, "events"), map_size=4 << 30, retention=86400)
        for i in range(0, args.events, 5000):
            store.append(events(args.events)[i:i + 5000])
        db = webhookdb.WebhookDB(webhookdb.path_in(d))
        cfg = WebhooksConfig(batch_size=args.batch_size, max_in_flight=args.in_flight,
                             poll_interval=0.05)
        hook_def = W.Hook(id="bench", name="bench", target=f"http://127.0.0.1:{port}/hook",
                          events=frozenset(["injection", "delivery", "bounce"]))
        db.set_cursor("bench", 0)
        session = W.new_session()
        s = Sender(hook_def, db, store, session, cfg)
        s.load(None)
        t0 = time.perf_counter()
        s.start()
        while got["events"] < args.events:
            await asyncio.sleep(0.01)
        dt = time.perf_counter() - t0
        await s.stop()
        await session.close()
        db.close()
        store.close()
    await runner.cleanup()
    print(f"events={args.events} batch_size={args.batch_size} in_flight={args.in_flight} "
          f"batches={got['batches']} seconds={dt:.2f} events_per_second={args.events / dt:,.0f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--in-flight", type=int, default=4)
    asyncio.run(main(p.parse_args()))
