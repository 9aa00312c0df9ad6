#!/usr/bin/env python3
"""Issue 11 operator benchmarks: admin API read cost and the zero-downtime upgrade's gap.

One daemon (tests/daemon.py: 2 acceptors, 2 spool shards, delivery held so the queue
stays), ``--queued`` messages (default 20,000) put in the queue with Postfix's
``smtp-source`` first.  Then:

api       GET /api/admin/queue, /api/admin/status and /api/admin/messages/QID, ``--reps``
          times each (sequential, one connection per request, as the CLI and the status
          page do); reported: median and max seconds.  /queue asks every shard for its
          summary, which walks its whole queue: this is the cost a ``mta drain`` poll
          puts on the shards; /status reuses a queue view up to 1 s old (requests back to
          back here mostly hit it, as several open status pages would).
upgrade   four SMTP probe threads, one message per connection, back to back, during
          ``mta upgrade``; reported: connections refused or reset (must be 0), the time from
          SIGUSR2 to the new supervisor's pid file, the longest probe transaction (connect to
          250: how long a client waited while the roles changed hands), and whether every
          acknowledged message is queued once afterwards.

bounce    (``--bounce N``, alone) N messages of campaign ``bench-bounce`` queued with
          ``smtp-source -F`` (the campaign in an X-MSYS-API header), then ``mta bounce
          --campaign bench-bounce --json``; reported: the seconds from the command to
          every recipient bounced (the spool's count), the rate, the seconds until the
          event log holds a class-25 bounce event for every one, and whether it does.

Loopback only; every load is bounded in count and time; only the daemon started here is
stopped (tests/daemon.py stops it by its own PID and process group).

Usage
    python bench/admin_ops.py [--queued 20000] [--reps 20] [--record]
    python bench/admin_ops.py --bounce 100000 [--record]
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from daemon import HOST, Daemon, wait_until  # noqa: E402
from loadclient import smtp_source_argv  # noqa: E402


def get(d, path: str):
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, d.admin_port, timeout=120)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    assert r.status == 200, (path, r.status, body[:300])
    return time.perf_counter() - t0, json.loads(body)


def fill(d, n: int) -> None:
    argv = smtp_source_argv(d.port, 10, n, "bench@sender.test", "r@example.net")
    subprocess.run(argv, check=True, timeout=600, capture_output=True)
    wait_until(lambda: get(d, "/api/admin/queue")[1]["total"]["messages"] >= n, 120,
               f"{n} messages queued", interval=1.0)


def bench_bounce(d, n: int, tmp: str) -> dict:
    campaign = "bench-bounce"
    msg = os.path.join(tmp, "campaign.eml")
    with open(msg, "w") as fh:
        fh.write(f'X-MSYS-API: {{"campaign_id": "{campaign}"}}\nFrom: <bench@sender.test>\n'
                 "To: <r@example.net>\nSubject: bulk bounce bench\n\n" + "x" * 70 + "\n")
    argv = smtp_source_argv(d.port, 10, n, "bench@sender.test", "r@example.net")
    i = argv.index("-l")            # (-F: the message is the file's, not -l octets)
    r = subprocess.run(argv[:1] + ["-F", msg] + argv[1:i] + argv[i + 2:], timeout=900,
                       capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-500:]
    wait_until(lambda: get(d, "/api/admin/queue")[1]["total"]["messages"] >= n, 300,
               f"{n} messages queued", interval=1.0)
    t0 = time.monotonic()
    r = d.cli("bounce", "--campaign", campaign, "--reason", "bench", "--json", timeout=900)
    took = time.monotonic() - t0
    last = json.loads(r.stdout.decode().splitlines()[-1])
    path = os.path.join(d.state_dir, "log", "events.jsonl")

    def bounced() -> int:
        with open(path, "rb") as fh:
            return fh.read().count(b'"bounce_rule":"admin-bounce"')
    wait_until(lambda: bounced() >= last["done"], 600, "the bounce events", interval=1.0)
    events_s = time.monotonic() - t0
    ids = set()
    with open(path, "rb") as fh:
        for line in fh:
            e = json.loads(line)
            if e.get("bounce_rule") == "admin-bounce" and e.get("bounce_class") == "25":
                ids.add(e["queue_id"])
    queued = get(d, "/api/admin/queue")[1]["total"]["messages"]
    return {"n": n, "done": last["done"], "total": last["total"], "finished": last["finished"],
            "bounce_s": took, "events_s": events_s, "events": len(ids), "left": queued}


def bench_api(d, reps: int) -> dict:
    qid = d.queue_list()[0]["queue_id"]
    out = {}
    for path in ("/api/admin/queue", "/api/admin/status", f"/api/admin/messages/{qid}"):
        times = [get(d, path)[0] for _ in range(reps)]
        out[path.replace(qid, "QID")] = (statistics.median(times), max(times))
    return out


def bench_upgrade(d) -> dict:
    acked, refused, worst, stop = [], [], [0.0], threading.Event()
    lock = threading.Lock()

    def probe(name):
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            try:
                with smtplib.SMTP(HOST, d.port, local_hostname="probe.test", timeout=120) as s:
                    s.ehlo()
                    s.mail("p@probe.test")
                    s.rcpt(f"{name}-{n}@example.net")
                    code, text = s.data(b"Subject: probe\r\n\r\nx\r\n")
                if code == 250:
                    with lock:
                        acked.append(re.search(r"queued as (\w+)", text.decode()).group(1))
                        worst[0] = max(worst[0], time.perf_counter() - t0)
            except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException):
                pass                        # 421 from an acceptor stopping: not acked
            except OSError as exc:
                refused.append(repr(exc))
    threads = [threading.Thread(target=probe, args=(f"p{i}",), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    pidfile = os.path.join(d.state_dir, "run", "mta.pid")
    old = int(open(pidfile).read())
    t0 = time.perf_counter()
    d.cli("upgrade", timeout=600)
    took = time.perf_counter() - t0
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(150)
    listed = [e["queue_id"] for e in d.queue_list() if e["sender"] == "p@probe.test"]
    new = int(open(pidfile).read())
    d.proc.wait(30)
    return {"refused": len(refused), "acked": len(acked), "upgrade_s": took,
            "longest_transaction_s": worst[0], "old_pid": old, "new_pid": new,
            "queued_once": sorted(listed) == sorted(acked)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queued", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--bounce", type=int, default=0, help="run the bulk bounce bench only")
    args = ap.parse_args()
    if args.bounce:
        return main_bounce(args)
    with tempfile.TemporaryDirectory(prefix="mta-bench-admin-") as tmp:
        d = Daemon(tmp, acceptors=2, shards=2)
        d.write_config()
        d.start()
        try:
            fill(d, args.queued)
            api = bench_api(d, args.reps)
            up = bench_upgrade(d)
        finally:
            d.cleanup()     # the new supervisor is in the daemon's process group too
    lines = [f"queued: {args.queued} messages, 2 shards, delivery held", "",
             "| request | median s | max s |", "|---|---|---|"]
    for path, (med, mx) in api.items():
        lines.append(f"| GET {path} | {med:.4f} | {mx:.4f} |")
    lines += ["", "(/status: a queue view up to 1 s old is reused)", "",
              f"upgrade: SIGUSR2 -> new supervisor {up['upgrade_s']:.2f} s; probe "
              f"connections refused {up['refused']}; acknowledged {up['acked']}, all queued "
              f"once: {up['queued_once']}; longest probe transaction "
              f"{up['longest_transaction_s']:.2f} s"]
    text = "\n".join(lines)
    print(text)
    if args.record:
        stamp = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
        with open(os.path.join(HERE, "RESULTS.md"), "a") as fh:
            fh.write(f"\n## Admin API reads and zero-downtime upgrade (issue 11) — {stamp}\n\n"
                     f"`python bench/admin_ops.py --queued {args.queued} --reps {args.reps} "
                     f"--record`\n\n{text}\n")
    return 0 if up["refused"] == 0 and up["queued_once"] else 1


def main_bounce(args) -> int:
    with tempfile.TemporaryDirectory(prefix="mta-bench-bounce-") as tmp:
        d = Daemon(tmp, acceptors=2, shards=2)
        d.write_config()
        d.start()
        try:
            b = bench_bounce(d, args.bounce, tmp)
        finally:
            d.cleanup()
    ok = b["finished"] and b["done"] == b["n"] and b["events"] == b["n"] and b["left"] == 0
    text = (f"queued: {b['n']} messages of one campaign, 2 shards, delivery held\n\n"
            f"`mta bounce --campaign`: {b['done']} of {b['total']} recipient(s) bounced in "
            f"{b['bounce_s']:.1f} s ({b['done'] / b['bounce_s']:.0f}/s); a class-25 bounce "
            f"event for {b['events']} distinct message(s) in the event log after "
            f"{b['events_s']:.1f} s; messages left queued: {b['left']}; all bounced with an "
            f"event: {ok}")
    print(text)
    if args.record:
        stamp = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
        with open(os.path.join(HERE, "RESULTS.md"), "a") as fh:
            fh.write(f"\n## Bulk bounce by campaign (issue 11) — {stamp}\n\n"
                     f"`python bench/admin_ops.py --bounce {args.bounce} --record`\n\n"
                     f"{text}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
