"""RSS per queued recipient of the spool's queue index.

Issue "node at scale", item 1: at most 200 bytes of RAM per queued recipient
with 10 million queued.  Each case runs in a fresh child process, one after the
other, and fills one structure the way a shard's recovery would (a message:
add, due-queue push, deadline), with a Zipf-ish mix of DOMAINS recipient
domains (weight 1/rank), a few campaigns and pools, 5 % transactional:

- ``a``: the compiled index, 1,000,000 messages x 10 recipients;
- ``b``: the compiled index, 10,000,000 single-recipient messages;
- ``c``: the compiled index, 1,000,000 single-recipient messages;
- ``e``: as ``c``, but every message waits behind its domain's per-domain job
  cap (a throttled burst: not in the due queue, in its domain's FIFO of
  blocked messages, mta.spool.dispatch) -- the compiled ``QidFifo``;
- ``f``: as ``e`` with the FIFO the shard used before the compiled one (a deque
  of queue-id strings and a set, :class:`StrFifo`).

(A case ``d`` measured the structures the index replaced -- ``Entry`` around a
decoded ``MessageMeta``, ``Lanes``, ``Deadlines`` -- until the shard was ported
onto the index, which removed them: 1,728 B per single-recipient message at
commit 0947a24, bench/RESULTS.md.  The whole shard's RSS per queued message
is bench/restart.py's.)

Reported: VmRSS growth over the fill per queued recipient and per message,
the fill time, and (compiled cases) the cost per operation of insert, pop
due, recipient update and delete, timed over OPS operations on the full
index (each timing includes one Python call per operation).  No network; no
files.  Run it niced on a shared machine:

    nice -n 10 python bench/queue_memory.py            # a, b, c, e, f in turn
    nice -n 10 python bench/queue_memory.py --cases c --messages-scale 0.1
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOMAINS = 3000
CAMPAIGNS = ["spring-sale", "newsletter-48", "welcome", None]
POOLS = ["default", "mkt", "mkt", "transactional"]
MAX_AGE = 5 * 86400.0
OPS = 200_000
CASES = {"a": ("qindex", 1_000_000, 10), "b": ("qindex", 10_000_000, 1),
         "c": ("qindex", 1_000_000, 1), "e": ("qindex+blocked", 1_000_000, 1),
         "f": ("qindex+blocked (deque+set FIFO)", 1_000_000, 1)}
T0 = 1_760_000_000.0
QID_BASE = int(T0 * 1e6) << 28


class StrFifo:
    """The blocked-message FIFO before the compiled QidFifo: a deque of qid strings and a set."""

    def __init__(self):
        from collections import deque
        self.order, self.members = deque(), set()

    def __len__(self) -> int:
        return len(self.members)

    def add(self, qid: str) -> None:
        if qid not in self.members:
            self.members.add(qid)
            self.order.append(qid)

    def memory(self) -> dict:
        return {}


def rss() -> int:
    """This process's resident set, in octets."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def domain_table(rng: random.Random) -> list[str]:
    """65,536 draws from the Zipf-ish domain mix: index with 16 random bits."""
    names = [f"mail{k}.example" if k else "gmail.example" for k in range(DOMAINS)]
    weights = [1.0 / (k + 1) for k in range(DOMAINS)]
    return rng.choices(names, weights, k=1 << 16)


def fill_index(messages: int, rcpts: int, rng: random.Random, fifo: str = ""):
    """Fill an index; with *fifo* ("compiled", or "strings": :class:`StrFifo`), each message
    waits in its (first) domain's FIFO of blocked messages instead of the due queue."""
    from mta import native
    qindex = native.load("qindex", pure=False)
    Fifo = (None if not fifo else StrFifo if fifo == "strings"
            else native.load("qindex", pure=False).QidFifo)
    blocked: dict = {}
    doms = domain_table(rng)
    q = qindex.QueueIndex(MAX_AGE / 1000)
    bits = rng.getrandbits
    before = rss()
    t = time.perf_counter()
    add, push, deadline = q.add, q.push, q.set_deadline
    for i in range(messages):
        qid = "%020X" % (QID_BASE + (i << 8))
        arrival = T0 + i * 1e-4
        r = bits(32)
        domains = [doms[bits(16)] for _ in range(rcpts)] if rcpts > 1 else [doms[r & 0xFFFF]]
        add(qid, 1 + i // 20000, (i % 20000) * 3000, 180, 2048, arrival, arrival,
            1 if r >> 16 & 31 == 0 else 0, POOLS[r >> 21 & 3], CAMPAIGNS[r >> 23 & 3],
            domains)
        if Fifo is None:
            push(qid, arrival)
        else:
            f = blocked.get(domains[0])
            if f is None:
                f = blocked[domains[0]] = Fifo()
            f.add(qid)
        deadline(qid, arrival + MAX_AGE)
    fill = time.perf_counter() - t
    gc.collect()
    return q, before, rss(), fill, blocked


def op_costs(q, messages: int, rng: random.Random) -> dict:
    """Seconds per operation on the full index, each over OPS operations."""
    n = min(OPS, messages)
    qids = ["%020X" % (QID_BASE + (rng.randrange(messages) << 8)) for _ in range(n)]
    fresh = ["%020X" % (QID_BASE + ((messages + i) << 8) + 1) for i in range(n)]
    doms = ["mail7.example"]
    out = {}
    t = time.perf_counter()
    for i, qid in enumerate(fresh):
        q.add(qid, 999, i, 180, 2048, T0, T0, 0, "default", None, doms)
    out["insert"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for qid in fresh:
        q.push(qid, T0 - 1.0)
    out["push"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    got = 0
    while got < n:
        got += len(q.pop_due(0, T0 + 1e9, 500))
    out["pop due"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for qid in qids:
        q.update(qid, 0, 0, 1, T0 + 300.0)
    out["update"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for qid in qids:
        q.info(qid)
    out["lookup (info)"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for qid in fresh:
        q.remove(qid)
    out["delete"] = (time.perf_counter() - t) / n
    return out


def run_case(name: str, scale: float) -> dict:
    kind, messages, rcpts = CASES[name]
    messages = max(1000, int(messages * scale))
    rng = random.Random(15)
    result = {"case": name, "kind": kind, "messages": messages, "rcpts": rcpts}
    fifo = {"e": "compiled", "f": "strings"}.get(name, "")
    q, before, after, fill, blocked = fill_index(messages, rcpts, rng, fifo)
    result["memory"] = q.memory()
    if fifo:
        result["blocked"] = {"fifos": len(blocked), "messages": sum(map(len, blocked.values())),
                             "allocated": sum(sum(v for k, v in f.memory().items()
                                                  if k != "sizes") for f in blocked.values())}
    result["tables"] = q.tables()
    grown = after - before
    result.update(rss_before=before, rss_after=after, fill_s=round(fill, 2),
                  bytes_per_rcpt=round(grown / (messages * rcpts), 1),
                  bytes_per_msg=round(grown / messages, 1),
                  fill_us_per_msg=round(fill / messages * 1e6, 2))
    result["op_ns"] = {k: round(v * 1e9) for k, v in op_costs(q, messages, rng).items()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="a,b,c,e,f", help="which of a,b,c,e,f [all]")
    ap.add_argument("--messages-scale", type=float, default=1.0,
                    help="multiply every case's message count (a quick look: 0.01)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.messages_scale)))
        return
    with open("/proc/loadavg") as fh:
        print("load average before:", fh.read().strip())
    results = []
    for name in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--messages-scale",
                              str(args.messages_scale)], capture_output=True, text=True,
                             timeout=3600, check=True)
        r = json.loads(out.stdout)
        results.append(r)
        print(f"{name}: {r['kind']} {r['messages']:,} messages x {r['rcpts']}: RSS "
              f"+{(r['rss_after'] - r['rss_before']) / 2**20:,.0f} MiB = "
              f"{r['bytes_per_rcpt']} B/recipient, {r['bytes_per_msg']} B/message; fill "
              f"{r['fill_s']} s ({r['fill_us_per_msg']} us/message)", flush=True)
        if "op_ns" in r:
            print("   ns/op: " + ", ".join(f"{k} {v}" for k, v in r["op_ns"].items()))
            print(f"   allocated: {r['memory']}; interned: {r['tables']}")
        if "blocked" in r:
            print(f"   blocked: {r['blocked']}")
    with open("/proc/loadavg") as fh:
        print("load average after:", fh.read().strip())


if __name__ == "__main__":
    main()
