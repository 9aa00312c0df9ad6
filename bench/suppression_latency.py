#!/usr/bin/env python3
"""SMTP transaction latency on an acceptor while it serves suppression-list work.

    unshare --net sh -c 'ip link set lo up; python bench/suppression_latency.py \
        [--entries 300000] [--puts 30] [--put-size 10000] [--put-clients 2] [--searches 3] \
        [--seconds 20]'

Starts a real ``mta serve`` (tests/daemon.py: one SMTP acceptor, one shard, delivery
held, loopback only) on a list of *entries* built beforehand (bench/suppression_list.py's
addresses, through load_sorted), then times SMTP transactions (MAIL, RCPT, DATA, the
message, RSET on one connection, one after another) from a loopback client:

- idle: nothing else runs;
- put: while *puts* bulk PUTs of *put-size* new entries run, *put-clients* at a time;
- search: while *searches* GET /api/v1/suppression-list?description=<nothing matches>
  run one after another (each reads up to [suppression] max_search_scan records).

Prints the median and p99 of each phase's transactions, and what the API calls took.
Each phase is bounded by *seconds*.  Loopback only; run it inside a network namespace.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from daemon import HOST, Daemon  # noqa: E402

from mta.feedback import suppression as S  # noqa: E402

KEY = "bench-key"
MSG = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: probe\r\n\r\nprobe\r\n"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def probe(d: Daemon, stop: threading.Event, seconds: float) -> tuple[list, list]:
    """SMTP transactions one after another until *stop* (or *seconds*): their times, and
    the times of their DATA commands (the message and its 250: the spool's commit)."""
    out = []
    datas = []
    end = time.monotonic() + seconds
    with smtplib.SMTP(HOST, d.port, local_hostname="probe.test", timeout=30) as s:
        s.ehlo()
        while not stop.is_set() and time.monotonic() < end and len(out) < 100_000:
            t = time.perf_counter()
            s.mail("a@example.com")
            s.rcpt(f"p{len(out)}@example.net")
            t2 = time.perf_counter()
            code, _ = s.data(MSG)
            assert code == 250, code
            done = time.perf_counter()
            out.append(done - t)
            datas.append(done - t2)
            s.rset()
    return out, datas


def phase(d: Daemon, name: str, work, seconds: float) -> None:
    stop = threading.Event()
    took: list[float] = []

    def run():
        try:
            work(took)
        finally:
            stop.set()
    th = threading.Thread(target=run) if work else None
    if th is None:
        timer = threading.Timer(seconds / 4, stop.set)
        timer.start()
    else:
        th.start()
    times, datas = probe(d, stop, seconds)
    if th is not None:
        th.join(600)
    ms = [t * 1000 for t in times]
    rest = [(t - u) * 1000 for t, u in zip(times, datas)]
    extra = f"; calls took {statistics.median(took):.2f} s (median), max {max(took):.2f} s" \
        if took else ""
    print(f"{name:7s} {len(ms):6d} transactions: median {statistics.median(ms):6.2f} ms, "
          f"p99 {pct(ms, 0.99):6.2f} ms, max {max(ms):7.2f} ms (without DATA: median "
          f"{statistics.median(rest):5.2f}, p99 {pct(rest, 0.99):6.2f}){extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=300_000)
    ap.add_argument("--puts", type=int, default=30)
    ap.add_argument("--put-size", type=int, default=10_000)
    ap.add_argument("--put-clients", type=int, default=2)
    ap.add_argument("--searches", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--keep", action="store_true", help="keep the daemon's directory")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="suplat-")
    d = Daemon(tmp, acceptors=1, shards=1, http={"api_keys": [KEY]},
               suppression={"max_search_scan": max(1000, args.entries)})
    sl = S.SuppressionList(S.path_in(d.state_dir), 4 << 30, sync=False)
    sl.load_sorted((f"user{i:09d}@domain{i % 1000:04d}.test" for i in range(args.entries)),
                   S.NON_TRANSACTIONAL, description="benchmark")
    sl.env.sync(True)
    sl.close()
    d.start()
    try:
        phase(d, "idle", None, args.seconds)

        # (made before the phase: encoding them beside the probe would slow it)
        bodies = [json.dumps({"recipients": [
            {"recipient": f"bulk{p}-{i}@example.org", "type": "non_transactional",
             "description": f"bulk put {p}"} for i in range(args.put_size)]}).encode()
            for p in range(args.puts)]

        def puts(took):
            def client(mine):
                for body in mine:
                    t = time.monotonic()
                    st, res = d.api("PUT", "/api/v1/suppression-list", body, key=KEY,
                                    timeout=300)
                    took.append(time.monotonic() - t)
                    assert st == 200, (st, res)
            ths = [threading.Thread(target=client, args=(bodies[c::args.put_clients],))
                   for c in range(args.put_clients)]
            for th in ths:
                th.start()
            for th in ths:
                th.join(600)
        phase(d, "put", puts, args.seconds)

        def searches(took):
            for _ in range(args.searches):
                t = time.monotonic()
                st, res = d.api("GET", "/api/v1/suppression-list?description=zzz-none&"
                                "per_page=10", key=KEY, timeout=300)
                took.append(time.monotonic() - t)
                assert st == 200 and res["results"] == [], (st, res)
        phase(d, "search", searches, args.seconds)
    finally:
        d.stop()
        if args.keep:
            print(f"daemon dir {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
