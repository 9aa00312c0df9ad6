#!/usr/bin/env python3
"""Build a large suppression list fast, and measure its lookups (mta.feedback.suppression).

    python bench/suppression_list.py build DIR [--count 10000000] [--max-size 8G]
    python bench/suppression_list.py lookup DIR [--count 10000000] [--lookups 1000000]
    python bench/suppression_list.py search DIR [--rounds 3]

``build`` writes DIR (an LMDB environment in the daemon's format: point
``suppression.path`` at it) with *count* entries ``user%09d@domain%04d.test``
(type non_transactional, source "Manually Added") through
:meth:`SuppressionList.load_sorted`: sorted keys appended in batches, not the
HTTP API.  ``lookup`` times :meth:`SuppressionList.check`, the injection
path's call, for random present and random absent addresses (one read
transaction each, as at injection), and reports the median of 5 rounds.
``search`` times :meth:`SuppressionList.search` as GET /api/v1/suppression-list
calls it (first page of 1000, total counted) on a list that ``build`` wrote:
by source (every entry matches, and none does), and, for comparison, by type
(read from the index key alone) and by description (reads every record);
the median of *rounds* runs each.
Everything is local files; no network.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mta.feedback import suppression as S  # noqa: E402


def address(i: int) -> str:
    return f"user{i:09d}@domain{i % 1000:04d}.test"


def size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KMGkmg")) * mult


def build(args) -> None:
    sl = S.SuppressionList(args.dir, size(args.max_size), sync=False)
    t0 = time.perf_counter()
    n = sl.load_sorted((address(i) for i in range(args.count)), S.NON_TRANSACTIONAL,
                       description="benchmark")
    sl.env.sync(True)
    dt = time.perf_counter() - t0
    info = sl.env.info()
    used = sl.env.stat()["psize"] * info["last_pgno"]
    print(f"built {n} entries in {dt:.1f} s ({n / dt:,.0f}/s); {used / 2**20:,.0f} MiB used "
          f"({used / max(n, 1):.0f} octets per entry)")
    sl.close()


def lookup(args) -> None:
    sl = S.SuppressionList(args.dir, size(args.max_size))
    rng = random.Random(1)
    present = [address(rng.randrange(args.count)) for _ in range(args.lookups)]
    absent = [f"nobody{rng.randrange(10**9)}@domain{rng.randrange(1000):04d}.test"
              for _ in range(args.lookups)]
    n = sl.count()
    assert n == 0 or all(sl.check(a, False) for a in present[:1000])
    assert not any(sl.check(a, False) for a in absent[:1000])
    check = sl.check
    for name, addrs in ((("present", present),) if n else ()) + (("absent", absent),):
        rounds = []
        for _ in range(5):
            t0 = time.perf_counter()
            for a in addrs:
                check(a, False)
            rounds.append((time.perf_counter() - t0) / len(addrs) * 1e6)
        print(f"{name}: median {statistics.median(rounds):.2f} us per lookup "
              f"(rounds: {', '.join(f'{r:.2f}' for r in rounds)}; {sl.count()} entries)")
    sl.close()


def search(args) -> None:
    sl = S.SuppressionList(args.dir, size(args.max_size))
    n = sl.count()
    cases = (("sources=Manually Added (all)", {"sources": frozenset({S.MANUAL})}, n),
             ("sources=Bounce Rule (none)", {"sources": frozenset({S.BOUNCE_RULE})}, 0),
             ("types=transactional (none)", {"types": S.TRANSACTIONAL}, 0),
             ("description=benchmark (all)", {"description": "benchmark"}, n))
    for name, query, want in cases:
        rounds = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            rows, total, _ = sl.search(per_page=1000, cursor=b"", **query)
            rounds.append(time.perf_counter() - t0)
            assert total == want and len(rows) == min(want, 1000), (name, total, len(rows))
        print(f"{name}: median {statistics.median(rounds):.2f} s (rounds: "
              f"{', '.join(f'{r:.2f}' for r in rounds)}; {n} entries)")
    sl.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("action", choices=("build", "lookup", "search"))
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=10_000_000)
    p.add_argument("--lookups", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-size", default="8G")
    args = p.parse_args()
    {"build": build, "lookup": lookup, "search": search}[args.action](args)


if __name__ == "__main__":
    main()
