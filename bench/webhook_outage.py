#!/usr/bin/env python3
"""Issue 14: a webhook endpoint that answers 500 for a minute, then 200, gets everything.

One daemon (tests/daemon.py, delivery held) with a ``[[webhook]]`` for injection events
pointing at a receiver on loopback (tests/webhooks/receiver.py) that answers 500 for
``--outage`` seconds from the first POST, then 200.  ``--messages`` messages are sent over
SMTP during the outage (each acknowledged 250, so each has an injection event in the log).
Reported: the POSTs refused and the distinct batches among them; whether the receiver
then got every event of the event log (by event_id); whether every batch that failed came
back with the same id and the same body; and when the last one arrived.

Loopback only; bounded by ``--timeout``.

    python bench/webhook_outage.py [--outage 60] [--messages 300] [--record]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "webhooks"))

from daemon import Daemon  # noqa: E402
from receiver import Receiver  # noqa: E402


def message(i: int) -> bytes:
    return (f"From: a@sender.test\r\nTo: r@example.net\r\nSubject: outage {i}\r\n"
            f"Message-ID: <outage{i}@client.test>\r\n\r\nhello\r\n").encode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    first = []
    lock = threading.Lock()

    def status(hit) -> int:
        with lock:
            if not first:
                first.append(time.monotonic())
        return 500 if time.monotonic() - first[0] < args.outage else 200

    r = Receiver(status=status)
    with tempfile.TemporaryDirectory(prefix="mta-bench-outage-") as tmp:
        # retries at 6, 18, 48, 108, ... s (the default schedule x 0.1): a batch refused
        # during the minute is taken at its first try after it
        d = Daemon(tmp, acceptors=1, shards=2,
                   webhooks={"time_scale": 0.1, "poll_interval": 0.2},
                   webhook=[{"name": "outage", "target": r.url, "events": ["injection"]}])
        d.start()
        try:
            t0 = time.monotonic()
            sent = 0
            # spread over the outage's first half, so batches are made all through it
            while sent < args.messages and time.monotonic() - t0 < args.timeout:
                d.send("a@sender.test", ["r@example.net"], message(sent))
                sent += 1
                time.sleep(max(0.0, (args.outage / 2) / args.messages))
            deadline = t0 + args.timeout
            logged: set = set()
            while len(logged) < sent and time.monotonic() < deadline:   # the log, whole
                logged = {e["event_id"] for e in d.events() if e["type"] == "injection"}
                time.sleep(0.2)
            while time.monotonic() < deadline:
                got = {e["event_id"] for e in r.events()}
                if logged and logged <= got:
                    break
                time.sleep(0.5)
            done_at = time.monotonic() - t0
            got = {e["event_id"] for e in r.events()}
            failed = {}
            for h in r.hits:
                if h.status == 500:
                    failed.setdefault(h.headers["x-messagesystems-batch-id"], h.body)
            ok = {h.headers["x-messagesystems-batch-id"]: h.body for h in r.batches()}
            refused = sum(1 for h in r.hits if h.status == 500)
        finally:
            d.cleanup()
            r.close()
    same = all(ok.get(b) == body for b, body in failed.items())
    complete = bool(logged) and logged <= got
    text = (f"{sent} messages over SMTP during a {args.outage:g} s outage (the receiver "
            f"answered 500 from its first POST for {args.outage:g} s, then 200); retries on "
            "the default schedule × 0.1.\n\n"
            f"- POSTs refused: {refused}, in {len(failed)} distinct batches\n"
            f"- injection events in the log: {len(logged)}; received by the endpoint: "
            f"{len(got & logged)} — **every one: {complete}**\n"
            f"- every refused batch later accepted with the same id and body: **{same}** "
            f"({sum(1 for b in failed if b in ok)} of {len(failed)})\n"
            f"- the last event arrived {done_at:.0f} s after the first message")
    print(text)
    if args.record:
        stamp = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
        with open(os.path.join(HERE, "RESULTS.md"), "a") as fh:
            fh.write(f"\n## A webhook endpoint down for a minute (issue 14) — {stamp}\n\n"
                     f"`python bench/webhook_outage.py --outage {args.outage:g} --messages "
                     f"{args.messages} --record`\n\n{text}\n")
    return 0 if complete and same and failed else 1


if __name__ == "__main__":
    sys.exit(main())
