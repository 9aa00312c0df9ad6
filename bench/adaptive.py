#!/usr/bin/env python3
"""Issue 12 benchmark: automatic back-off against a provider that limits each client IP.

A smart sink (bench/loadlib/smartsink.py, in this process) on 127.0.0.10 accepts at most
``--limit`` R messages per client IP in any sliding window of ``--window`` W seconds and
answers MAIL beyond that with ``421 4.7.0 ... too much mail from <ip>`` (a reply no
response rule matches, so only automatic back-off can react) and closes the connection.
The MTA sends from ``--sources`` egress sources (127.0.0.2, .3, ...; one pool) to that one
site through a static route; ``--messages`` N messages are injected at once with Postfix's
smtp-source.  Time is scaled: W = 60 s x ``--scale`` (the default 0.1: R per 6 s stands
for R per minute), and the MTA runs with ``delivery.time_scale`` = the same scale, so its
retry schedule and back-off timings shrink alike (60 s retry -> 6 s).

Reported, from the sink's own record of every MAIL it answered (time, client IP, reply):
per source the attempts and acceptances per window, the share of deferred attempts (421)
per window, the time until the share stays under 5 % (convergence, in scaled minutes),
the share of deferrals from then on, and the most acceptances in any sliding window
(the sink enforces R, so that cannot exceed R: the point is how many attempts the MTA
wasted to get there).  ``--mta postfix`` runs the same harness against Postfix
(bench/loadlib/targets) when it is installed; without ``--mta`` only ours runs.

Everything on loopback (a private network namespace with ``--netns auto``); every load
bounded in count and time (``--timeout``); only processes started here are stopped, by PID.

Usage
    python bench/adaptive.py [--messages 2400] [--limit 60] [--sources 2] [--scale 0.1]
                             [--record]
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))     # bench/, for loadlib and egress

from egress import (Daemon, Events, Generators, base_config, config_text,  # noqa: E402
                    free_port, load_note, route, toml_str)
from loadlib.common import REPO, fs_type  # noqa: E402
from loadlib.netns import enter_private_netns  # noqa: E402
from loadlib.report import append_results, machine  # noqa: E402
from loadlib.revision import source_revision  # noqa: E402
from loadlib import smartsink  # noqa: E402
from loadlib.targets.postfix import PostfixTarget  # noqa: E402

SINK_HOST = "127.0.0.10"
DOMAIN = "limited.bench.example"
REPLY = "421 4.7.0 Too much mail from {ip}, slow down"


def sources(n: int) -> list[tuple[str, str]]:
    return [(f"src-{i}", f"127.0.0.{i}") for i in range(2, 2 + n)]


def mta_config(rundir: Path, smtp_port: int, sink_port: int, args) -> list[str]:
    lines = base_config(rundir / "state", smtp_port, None,
                        {"time_scale": args.scale, "processes": args.processes})
    lines += route(DOMAIN, SINK_HOST, sink_port)
    lines += ["", "[egress]", 'default_pool = "bench"']
    for name, addr in sources(args.sources):
        lines += ["", "[[egress.source]]", f"name = {toml_str(name)}",
                  f"source_address = {toml_str(addr)}"]
    members = ", ".join(f"{{ source = {toml_str(n)}, weight = 1 }}"
                        for n, _ in sources(args.sources))
    lines += ["", "[[egress.pool]]", 'name = "bench"', f"sources = [{members}]"]
    lines += ["", "[backoff]"]
    for kv in args.backoff:
        k, _, v = kv.partition("=")
        lines.append(f"{k} = {v}")
    return lines


def analyse(seen, accepted, window: float, limit: int, t0: float) -> dict:
    """Per source: attempts (MAIL answered) and deferrals per window; convergence."""
    mails = [s for s in seen if s.stage == "mail" and s.reply.startswith("421")]
    by_ip: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for a in accepted:
        by_ip[a.client_ip].append((a.at, True))
    for s in mails:
        by_ip[s.client_ip].append((s.at, False))
    out = {}
    for ip, events in sorted(by_ip.items()):
        events.sort()
        buckets: dict[int, Counter] = defaultdict(Counter)
        for t, ok in events:
            buckets[int((t - t0) // window)]["ok" if ok else "deferred"] += 1
        last = max(buckets)
        rows = []
        for b in range(last + 1):
            c = buckets.get(b, Counter())
            n = c["ok"] + c["deferred"]
            rows.append((b, c["ok"], c["deferred"], c["deferred"] / n if n else 0.0))
        # converged: the first window from which the share of deferred attempts, over
        # all the (full) windows from there to the end, is under 5 %
        full = rows[:-1] if len(rows) > 1 else rows
        conv = None
        for i in range(len(full)):
            n_ok = sum(r[1] for r in full[i:])
            n_def = sum(r[2] for r in full[i:])
            if n_ok + n_def and n_def / (n_ok + n_def) < 0.05:
                conv = i
                break
        after = full[conv:] if conv is not None else []
        ok_after = sum(r[1] for r in after)
        def_after = sum(r[2] for r in after)
        # the sink counts a message in its window when it accepts MAIL; so does this
        times = sorted(a.mail_at for a in accepted if a.client_ip == ip)
        best = j = 0
        for i, t in enumerate(times):
            while times[j] <= t - window:
                j += 1
            best = max(best, i - j + 1)
        worst = max(after, key=lambda r: r[3], default=None)
        out[ip] = {"windows": rows, "converged_window": conv,
                   "worst_after": "-" if worst is None else
                   f"{worst[2]} of {worst[1] + worst[2]} ({100 * worst[3]:.0f} %)",
                   "deferred_after": def_after / (ok_after + def_after)
                   if ok_after + def_after else None,
                   "attempts_after_per_window": (ok_after + def_after) / len(after)
                   if after else None,
                   "max_accepted_in_window": best,
                   "accepted": sum(r[1] for r in rows), "deferred": sum(r[2] for r in rows)}
    return out


def run_mta(args, rundir: Path) -> tuple[dict, str, list[str]]:
    window = 60.0 * args.scale
    sink_port = free_port(SINK_HOST)
    policy = smartsink.Policy(max_per_window=args.limit, window=window, rate_reply=REPLY)
    sink = smartsink.SmartSink(SINK_HOST, sink_port, policy).start()
    smtp_port = free_port()
    lines = mta_config(rundir, smtp_port, sink_port, args)
    daemon = Daemon(rundir, "\n".join(lines) + "\n", smtp_port)
    gens = None
    try:
        daemon.start()
        events = Events(daemon.events_path)
        gens = Generators(rundir, "inject", smtp_port, [(f"r@{DOMAIN}", args.messages)],
                          args.sessions, args.size, args.timeout)
        t0 = time.time()
        gens.start()
        gens.wait()
        deadline = time.monotonic() + args.timeout
        while sink.received() < args.messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sink.received()} of {args.messages} delivered in time")
            time.sleep(0.5)
        t_end = time.time()
        events.poll()
        log = daemon.log.read_text(errors="replace")
    finally:
        if gens is not None:
            gens.kill()
        daemon.stop()
        sink.stop()
    res = analyse(sink.snapshot(), sink.deliveries(), window, args.limit, t0)
    res = {"per_source": res, "seconds": t_end - t0, "window": window,
           "backoff_lines": [line for line in log.splitlines()
                             if "back-off begins" in line or "back-off deeper" in line][:40],
           "events": dict(events.counts)}
    return res, config_text(rundir, lines), gens.describe()


class AdaptivePostfix(PostfixTarget):
    """Postfix delivering everything to the smart sink from one bound address (the first
    source's), its retry timers scaled like ours; otherwise its defaults (Postfix has no
    reply-driven back-off: a 4xx to MAIL defers that message for the retry schedule)."""

    def __init__(self, args, rundir, sink_port: int, scale: float, concurrency: int):
        super().__init__(argparse.Namespace(e2e=True, sessions=args.sessions,
                                            concurrency=concurrency), rundir)
        self.sink_port = sink_port
        self.scale = scale

    def main_cf(self) -> dict[str, str]:
        cf = super().main_cf()
        s = self.scale
        cf.update({
            "relayhost": f"[{SINK_HOST}]:{self.sink_port}",
            "smtp_bind_address": sources(1)[0][1],
            # Postfix's defaults, x scale (Postfix takes whole seconds)
            "minimal_backoff_time": f"{max(1, round(300 * s))}s",
            "maximal_backoff_time": f"{max(1, round(4000 * s))}s",
            "queue_run_delay": f"{max(1, round(300 * s))}s",
        })
        return cf


def run_postfix(args, rundir: Path) -> tuple[dict, str, list[str]]:
    window = 60.0 * args.scale
    sink_port = free_port(SINK_HOST)
    policy = smartsink.Policy(max_per_window=args.limit, window=window, rate_reply=REPLY)
    sink = smartsink.SmartSink(SINK_HOST, sink_port, policy).start()
    pf = AdaptivePostfix(args, rundir, sink_port, args.scale, concurrency=20)
    gens = None
    try:
        pf.start()
        gens = Generators(rundir, "inject", pf.port, [(f"r@{DOMAIN}", args.messages)],
                          args.sessions, args.size, args.timeout)
        t0 = time.time()
        gens.start()
        gens.wait()
        deadline = time.monotonic() + args.timeout
        while sink.received() < args.messages and time.monotonic() < deadline:
            time.sleep(0.5)
        t_end = time.time()
    finally:
        if gens is not None:
            gens.kill()
        pf.stop()
        sink.stop()
    res = analyse(sink.snapshot(), sink.deliveries(), window, args.limit, t0)
    cf = "\n".join(f"{k} = {v}" for k, v in pf.main_cf().items()).replace(str(rundir), "TMP")
    return ({"per_source": res, "seconds": t_end - t0, "window": window, "backoff_lines": [],
             "events": {}, "delivered": sink.received()}, cf, gens.describe())


def report(res: dict, args) -> list[str]:
    w = res["window"]
    got = res.get("delivered", args.messages)
    done = ("all delivered in" if got >= args.messages
            else f"only {got:,} delivered within the time bound,")
    out = [f"R = {args.limit} per client IP per {w:g} s (scaled minute, scale {args.scale:g}); "
           f"{args.messages:,} messages, {args.sources} source(s), {done} "
           f"{res['seconds']:.1f} s ({res['seconds'] / w:.1f} scaled minutes).", "",
           "| source | accepted | deferred (all) | converged after (scaled min) | attempts/window "
           "after | deferred after | worst window after | max accepted in any window |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for ip, r in res["per_source"].items():
        conv = r["converged_window"]
        after = r["deferred_after"]
        # the bar: under 5 % deferred within two (scaled) minutes, and after
        ok &= conv is not None and conv <= 2 and after is not None and after < 0.05
        out.append(f"| {ip} | {r['accepted']} | {r['deferred']} | "
                   f"{'never' if conv is None else conv} | "
                   f"{r['attempts_after_per_window'] or 0:.1f} | "
                   f"{'-' if after is None else f'{100 * after:.1f} %'} | "
                   f"{r['worst_after']} | "
                   f"{r['max_accepted_in_window']} (R = {args.limit}) |")
    out += ["", "Per window (scaled minute) and source: accepted / deferred:", "```"]
    for ip, r in res["per_source"].items():
        out.append(f"{ip}: " + " ".join(f"{a}/{d}" for _, a, d, _ in r["windows"]))
    out += ["```", "", "Back-off decisions (daemon log, first 40):", "```"]
    out += [line.split("WARNING ", 1)[-1][:200] for line in res["backoff_lines"]] or ["(none)"]
    out += ["```"]
    res["ok"] = ok
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2400)
    p.add_argument("--limit", type=int, default=60, help="R: messages per client IP per window")
    p.add_argument("--sources", type=int, default=2)
    p.add_argument("--scale", type=float, default=0.1,
                   help="window = 60 s x scale; also delivery.time_scale")
    p.add_argument("--processes", type=int, default=2, help="delivery.processes")
    p.add_argument("--backoff", action="append", default=[],
                   help="a [backoff] key=value (TOML value), repeatable")
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--netns", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--postfix", action="store_true",
                   help="also run Postfix in the same harness (one source: use --sources 1)")
    p.add_argument("--record", action="store_true")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    load_before = load_note()
    netns = enter_private_netns(args.netns)
    workdir = Path(tempfile.mkdtemp(prefix="mta-adaptive-"))
    workdir.chmod(0o755)    # Postfix's daemons (user postfix) must reach their directories
    try:
        rundir = workdir / "mta"
        rundir.mkdir()
        try:
            res, cfg, cmds = run_mta(args, rundir)
        except RuntimeError as exc:
            print(f"adaptive.py: FAILED: {exc}", file=sys.stderr)
            return 1
        lines = ["### mta", ""] + report(res, args)
        if args.postfix:
            pdir = workdir / "postfix"
            pdir.mkdir()
            try:
                pres, pcfg, pcmds = run_postfix(args, pdir)
            except RuntimeError as exc:
                print("\n".join(lines))
                print(f"adaptive.py: Postfix run FAILED: {exc}", file=sys.stderr)
                return 1
            lines += ["", "### Postfix (same sink, same load, one bound address)", ""]
            lines += report(pres, args)
            cfg += "\n# Postfix main.cf (the bench's private instance; see "
            cfg += "bench/loadlib/targets/postfix.py)\n" + pcfg
        print("\n".join(lines))
        print(json.dumps({ip: {k: v for k, v in r.items() if k != "windows"}
                          for ip, r in res["per_source"].items()}))
        if args.record:
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            cmd = "python bench/adaptive.py " + " ".join(argv or sys.argv[1:])
            section = [f"## Adaptive delivery (issue 12): automatic back-off against a "
                       f"per-IP limit — {now}", "",
                       f"Machine: {machine()}; loopback only "
                       f"({'private network namespace' if netns else 'host namespace'}); "
                       f"work directory on {fs_type(workdir)}; {load_before} before.", "",
                       f"mta: this checkout at {source_revision()}.", "",
                       "Receiver: bench/loadlib/smartsink.py, 421 at MAIL beyond R accepted "
                       "per client IP in a sliding window (no response rule matches its "
                       "reply, so this is back-off alone, with the default [backoff] "
                       "settings unless listed in the command).", ""] + lines + [
                       "", "Command and configuration (TMP: the run's directory):", "```",
                       cmd.strip()] + cmds + ["# mta.toml", cfg.rstrip(), "```", ""]
            append_results("\n" + "\n".join(section))
            print(f"recorded in {REPO / 'bench' / 'RESULTS.md'}")
        return 0 if res["ok"] else 2
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
