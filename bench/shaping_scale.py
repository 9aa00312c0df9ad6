"""Shaping at the scale of a breaking-news send: one site, many recipient domains.

What one re-limit costs the delivery process's loop (Engine._relimit: the limits of
every lane asked again, as a throttle or back-off step does once a second at most) when
one site -- a provider's MX hosts, shared by its customers' domains -- holds N queued
domains, and what one Shaping.limits() call costs (the answer for a domain list, a
pass over it).  With the shipped presets, four egress sources (four lanes on the site).
Nothing is sent: the engine's resolver is a table in this process (no DNS, no socket).

Run: .venv/bin/python bench/shaping_scale.py [--domains 20000,100000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import msgspec

from mta.config import resolve
from mta.config.schema import Config
from mta.delivery import engine as engine_mod
from mta.delivery.engine import Engine
from mta.dns import MxResult

HOSTS = ["aspmx.l.google.com", "alt1.aspmx.l.google.com", "alt2.aspmx.l.google.com"]
SOURCES = ["ip-1", "ip-2", "ip-3", "ip-4"]


class Table:
    """MX answers from a table: every domain on the same three hosts."""

    async def resolve_mx(self, domain):
        return MxResult("ok", [HOSTS], domain=domain)

    async def resolve_addresses(self, host):
        return ["127.0.0.1"]

    async def resolve_addresses_ttl(self, host):
        return ["127.0.0.1"], 300.0


def settings(tmp: str):
    cfg = msgspec.convert({
        "server": {"hostname": "mta.bench", "state_dir": tmp},
        "egress": {"source": [{"name": s} for s in SOURCES],
                   "pool": [{"name": "default", "sources": [{"source": s} for s in SOURCES]}]},
        "delivery": {"shaping_presets": True}}, Config)
    return resolve(cfg, None)


async def one(n: int, rounds: int, tmp: str) -> dict:
    loop = asyncio.get_running_loop()
    os.makedirs(f"{tmp}/{n}")
    engine = Engine(settings(f"{tmp}/{n}"), Table(), None, loop)
    engine.rule_domains = []        # (the presets' domains: not looked up here)
    site = None
    for i in range(n - 1):
        site = await engine._site_of(f"customer{i}.example")
    site = await engine._site_of("gmail.com")       # (a preset's domain: its rule applies)
    for s in SOURCES:
        site.lanes[s] = engine_mod.Lane(engine.sources[s], site,
                                        engine._limits(engine.sources[s], site))
    relimit = []
    for _ in range(rounds):
        t = time.perf_counter()
        engine._relimit()
        relimit.append(time.perf_counter() - t)
    sh = engine.shaping
    calls = []
    for _ in range(rounds):
        t = time.perf_counter()
        sh.limits(site.name, site.hosts, site.shaped, "ip-1")
        calls.append(time.perf_counter() - t)
    rules = ", ".join(site.lanes["ip-1"].limits.rules)
    site.lanes.clear()
    await engine.close()
    return {"domains": len(site.shaped), "relimit_ms": statistics.median(relimit) * 1e3,
            "limits_ms": statistics.median(calls) * 1e3, "rules": rules}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", default="20000,100000")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shaping-scale-") as tmp:
        for n in (int(x) for x in a.domains.split(",")):
            r = asyncio.run(asyncio.wait_for(one(n, a.rounds, tmp), 600))
            print(f"{r['domains']:>7} domains on one site, 4 lanes: re-limit "
                  f"{r['relimit_ms']:.3f} ms, one Shaping.limits() {r['limits_ms']:.2f} ms "
                  f"(median of {a.rounds}; rules: {r['rules']})")


if __name__ == "__main__":
    main()
