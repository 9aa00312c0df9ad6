"""Events store benchmark: fill N realistic message events, then time Events API queries.

    nice python bench/events_store.py [--events 10000000] [--dir DIR] [--queries 200]

Fills an EventStore (mta/feedback/events_store.py) in a temporary directory with
synthetic but realistic events spread over the retention window (10 days):
per message an ``injection`` then a ``delivery`` (90 %), a ``delay`` and a
``delivery`` (5 %) or a ``bounce`` (5 %, mixed classes); recipients drawn from
2 million addresses on 50 domains, 5 campaigns, one transmission per 1,000
messages.  Appends go in batches of 2,000 events with a sync every 50
batches (as the events process does), and the insert rate is reported.

Then it times ``GET /api/v1/events/message`` through the API handler
(mta.api.events.handle: parameter parsing, the store query and the JSON
body; no socket) over the whole window: one recipient, one message id, a
campaign's first page (per_page 1000), an unfiltered page (per_page 1000, the
default last-24-hours window and the whole window), and a cursor page deep
into a campaign.  Prints p50/p99 per query kind.  Bounded: the fill stops at
--events or --max-fill-seconds.  Network: none (no sockets at all).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402

from mta.api import events as api  # noqa: E402
from mta.feedback.events_store import EventStore  # noqa: E402

CAMPAIGNS = ["spring-sale", "weekly-news", "black_friday-deals", "product-update",
             "welcome-series"]
RECIPIENTS = 2_000_000
DOMAINS = 50
SPAN = 10 * 86400.0


def rcpt(n: int) -> str:
    return f"user{n}@mail{n % DOMAINS}.example"


def generate(total: int, start: float, rng: random.Random):
    """Yield batches of events, in time order, *total* in all."""
    step = SPAN / (total / 2.1)
    eid = 10 ** 17
    batch = []
    produced = 0
    for m in itertools.count():
        t = start + m * step
        r = rng.randrange(RECIPIENTS)
        addr = rcpt(r)
        base = {"message_id": "%020x" % (0x4a3e00000000 + m), "transmission_id": str(
            1_000_000 + m // 1000), "rcpt_to": addr, "raw_rcpt_to": addr,
            "recipient_domain": addr.rpartition("@")[2], "routing_domain":
            addr.rpartition("@")[2], "campaign_id": CAMPAIGNS[(m // 1000) % len(CAMPAIGNS)],
            "rcpt_meta": {"list": "main"}, "rcpt_tags": [], "friendly_from":
            "news@sender.example.org", "msg_from": "bounces@sender.example.org",
            "subject": "Your weekly selection", "msg_size": "2911", "ip_pool": "default",
            "sending_ip": "127.0.0.1", "customer_id": "1", "recv_method": "rest",
            "injection_time": datetime.datetime.fromtimestamp(
                int(t), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")}
        u = rng.random()
        kinds = [("injection", 0)]
        if u < 0.90:
            kinds.append(("delivery", 2))
        elif u < 0.95:
            kinds += [("delay", 1), ("delivery", 3)]
        else:
            kinds.append(("bounce", 2))
        for kind, dt in kinds:
            eid += 1
            ev = {"type": kind, "event_id": str(eid), "timestamp": str(int(t + dt)), **base}
            if kind != "injection":
                ev.update(delv_method="esmtp", ip_address="127.0.0.2", num_retries="0",
                          queue_time=str(dt * 1000))
            if kind == "delay":
                ev.update(bounce_class="22", error_code="452",
                          raw_reason="452 4.2.2 mailbox full", reason="452 4.2.2 mailbox full")
            elif kind == "bounce":
                cls = rng.choice(["10", "10", "10", "50", "51", "1"])
                ev.update(bounce_class=cls, error_code="550",
                          raw_reason=f"550 5.1.1 <{addr}>: no such user",
                          reason="550 5.1.1 <...@...>: no such user")
            batch.append(ev)
            produced += 1
            if len(batch) >= 2000:
                yield batch
                batch = []
            if produced >= total:
                yield batch
                return


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--dir", default=None, help="store directory (default: a temporary one)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--max-fill-seconds", type=float, default=1800)
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    ap.add_argument("--reuse", action="store_true", help="query an existing --dir, no fill")
    args = ap.parse_args()
    rng = random.Random(14)
    tmp = args.dir or tempfile.mkdtemp(prefix="events-bench-")
    path = os.path.join(tmp, "events")
    now = time.time()
    start = now - SPAN
    store = EventStore(path, map_size=64 << 30, retention=SPAN + 86400)
    try:
        if not args.reuse:
            t0 = time.perf_counter()
            n = 0
            for i, batch in enumerate(generate(args.events, start, rng)):
                store.append(batch)
                n += len(batch)
                if i % 50 == 49:
                    store.sync()
                if i % 500 == 499:
                    el = time.perf_counter() - t0
                    print(f"  {n:,} events, {n / el:,.0f}/s", flush=True)
                if time.perf_counter() - t0 > args.max_fill_seconds:
                    print("fill stopped at --max-fill-seconds")
                    break
            store.sync()
            el = time.perf_counter() - t0
            print(f"fill: {n:,} events in {el:.0f} s = {n / el:,.0f} events/s (generation "
                  "included)")
        count = store.count()
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print(f"store: {count:,} events, {store.usage() / 1e9:.2f} GB used, file "
              f"{size / 1e9:.2f} GB, {store.usage() / max(count, 1):.0f} octets/event")

        # Sample what to ask for from the stored events.
        sample = [e for _, e in store.read(rng.randrange(max(1, store.last_seq() - 5000)),
                                           5000)]
        sample += [e for _, e in store.read(1, 2000)]
        rcpts = [rng.choice(sample)["rcpt_to"] for _ in range(args.queries)]
        msgs = [rng.choice(sample)["message_id"] for _ in range(args.queries)]
        win = {"from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start - 60)),
               "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 86400))}
        counts = {}

        def call(params: dict, decode: bool = False) -> dict:
            url = ("/api/v1/events/message?" + urllib.parse.urlencode(params)).encode()
            status, body = api.handle(store, b"GET", url, max_scan=500_000, now=now + 120)
            assert status == 200, body
            return orjson.loads(body) if decode else {"len": len(body)}

        def rq(i):
            b = call({**win, "recipients": rcpts[i]}, True)
            counts.setdefault("recipient", []).append(len(b["results"]))

        def mq(i):
            b = call({**win, "messages": msgs[i]}, True)
            counts.setdefault("message", []).append(len(b["results"]))

        def cq(i):
            call({**win, "campaigns": CAMPAIGNS[i % len(CAMPAIGNS)]})

        def uq_day(i):
            call({})

        def uq_all(i):
            call(dict(win))

        deep = {}

        def cursor_q(i):
            c = CAMPAIGNS[i % len(CAMPAIGNS)]
            if c not in deep:
                page, nxt, _ = store.query({"campaigns": [c]}, None, 10_000,
                                           start=start - 60, end=now + 86400)
                deep[c] = nxt
            call({**win, "campaigns": c, "cursor": deep[c]})

        results = []
        for name, fn, n in [("one recipient (whole window)", rq, args.queries),
                            ("one message id (whole window)", mq, args.queries),
                            ("campaign, first page of 1000 (whole window)", cq, 50),
                            ("campaign, page after 10,000 (cursor)", cursor_q, 50),
                            ("unfiltered page of 1000, default window (24 h)", uq_day, 50),
                            ("unfiltered page of 1000, whole window", uq_all, 50)]:
            fn(0)   # warm up the page cache for this kind
            xs = timed(fn, n)
            results.append((name, n, statistics.median(xs), pct(xs, 99), max(xs)))
        print()
        print("| query | n | p50 ms | p99 ms | max ms |")
        print("|---|---:|---:|---:|---:|")
        for name, n, p50, p99, mx in results:
            print(f"| {name} | {n} | {p50:.1f} | {p99:.1f} | {mx:.1f} |")
        for k, v in counts.items():
            print(f"{k}: results per query: median {statistics.median(v)}, max {max(v)}")
    finally:
        store.close()
        if not args.keep and not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
