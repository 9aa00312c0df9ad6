#!/usr/bin/env python3
"""Issue 10 benchmarks: egress sources x sites, rate shaping, the transactional lane.

Scenarios (one per subcommand; each prints a summary, ``--record`` appends a section to
bench/RESULTS.md):

spread     4 egress sources (127.0.0.2-.5, one pool, equal weights) x 3 sites (3 recipient
           domains, each a static route to its own ``smtp-sink -c`` on 127.0.0.10/.11/.12).
           N messages (``--messages``, default 30,000, ``--size`` 2 KB) injected by three
           ``smtp-source -d`` processes (one per domain) while deliveries run.  In the same
           run, interleaved, the *reference*: the same load to the built-in single source and
           one site (all three generators to one domain routed to one smtp-sink).  Reported
           per layout: messages/s end to end (start of injection -> the last delivery is in
           the event log and at the sinks), CPU per message of the whole mta process tree
           (and system-wide), the split per source (event log ``egress_source``/``sending_ip``)
           and per site (event log ``site``, and each sink's own counter), and the ratio
           4x3 / reference.
rate       one site with ``[[shaping]] max_message_rate = "50/s"`` (``--rate``), one source;
           ``--messages`` (3,000) injected at once, so the limit makes them queue.  The
           receiver is this file's own asyncio sink, which stamps every message when its
           final "." arrives (``time.time()``): reported are the largest number of messages
           in any one-second window (the limit's documented bound is rate + burst, burst 1)
           and the average rate from the first to the last arrival as a share of the limit.
hol        head of line: a site whose receiver accepts TCP and never greets, and another
           site; ``--messages`` (200) by HTTP to the good site, evenly over 5 s, with and
           without ``--hung`` (200) messages to the hung site queued first (which then hold
           its ``connection_limit`` connections); HTTP 200 -> arrival at the good site's
           receiver, p50/p99/max per run, layouts interleaved over ``--runs`` pairs.
priority   a site that answers slowly (the asyncio sink waits ``--delay-ms`` 75 ms before its
           reply to the end of data), ``connection_limit`` 5; ``--bulk`` 50,000 messages
           injected over SMTP, then ``--transactional`` 100 messages by HTTP POST
           /api/v1/transmissions with ``options.transactional = true``, one recipient each,
           spaced evenly over ``--spread-s`` 5 s.  Reported per transactional message, p50,
           p99 and max: HTTP 200 -> arrival at the sink, and reception -> delivery from the
           event log.  The run stops once the 100 are delivered (the bulk need not finish).

All traffic is on loopback: with ``--netns auto`` (default) the harness first moves into a
private network namespace holding only ``lo`` (127.0.0.0/8 is all on it, so the sources can
bind 127.0.0.2-.5).  The daemon delivers only through static routes to IP literals (no DNS).
Every load is bounded in count and in time (``--timeout``); only processes started here are
stopped, by PID (the daemon: SIGTERM, then SIGKILL to what remains of its snapshot tree).

Usage
    python bench/egress.py spread [--messages 30000] [--runs 1] [--record]
    python bench/egress.py rate [--messages 3000] [--rate 50] [--record]
    python bench/egress.py priority [--bulk 50000] [--transactional 100] [--record]
    python bench/egress.py hol [--messages 200] [--hung 200] [--runs 2] [--record]

The asyncio sink is also this file: ``python bench/egress.py sink --listen HOST:PORT
--log FILE [--delay-ms MS]`` (one line per message: arrival time, client address, open
connections, recipients).  Standard library only.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/, for loadlib

from loadlib.common import LOOPBACK, REPO, SINK_BACKLOG, fs_type, tail, tool  # noqa: E402
from loadlib.cpu import (background_busy_rate, self_cpu_s, steal_s, system_busy_s,  # noqa: E402
                         tree_cpu_s)
from loadlib.netns import enter_private_netns  # noqa: E402
from loadlib.procs import kill_leftovers, process_tree, stop_child  # noqa: E402
from loadlib.report import append_results, machine  # noqa: E402
from loadlib.revision import source_revision  # noqa: E402
from loadlib.run import percentile  # noqa: E402

SOURCES = [("src-2", "127.0.0.2"), ("src-3", "127.0.0.3"), ("src-4", "127.0.0.4"),
           ("src-5", "127.0.0.5")]
SINK_HOSTS = ["127.0.0.10", "127.0.0.11", "127.0.0.12"]
SENDER = "bench@sender.bench.example"
POLL_S = 0.02
READY_S = 60.0


# ------------------------------------------------------------------------------------------
# Small helpers


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_greeting(host: str, port: int, alive, timeout_s: float = READY_S) -> None:
    """Connect until a 220 greeting arrives; alive() raises if the server died."""
    deadline = time.monotonic() + timeout_s
    err = "no attempt"
    while time.monotonic() < deadline:
        alive()
        try:
            with socket.create_connection((host, port), timeout=2.0) as s:
                data = s.recv(512)
                if data.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                err = f"greeting {data[:60]!r}"
        except OSError as e:
            err = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"no 220 from {host}:{port} within {timeout_s:.0f} s ({err})")


def toml_str(s: str) -> str:
    return json.dumps(s)


def load_note() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"


def fmt_ms(s: float) -> str:
    ms = 1000.0 * s
    return f"{ms:,.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def fmt_lat(s: float) -> str:
    return "not delivered" if s == float("inf") else fmt_ms(s)


# ------------------------------------------------------------------------------------------
# Processes: the daemon, smtp-sink, the asyncio sink, smtp-source


class Daemon:
    """`python -m mta serve -c CONFIG` from this checkout, in its own session."""

    def __init__(self, rundir: Path, config_text: str, smtp_port: int):
        self.rundir = rundir
        self.config = rundir / "mta.toml"
        self.config.write_text(config_text)
        self.log = rundir / "mta.log"
        self.port = smtp_port
        self.proc: subprocess.Popen | None = None
        self.events_path = rundir / "state" / "log" / "events.jsonl"

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start(self) -> None:
        (self.rundir / "state").mkdir(exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "-c",
                                          str(self.config)], cwd=REPO, env=self.env(),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_greeting(LOOPBACK, self.port, self.alive)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mta exited with {self.proc.returncode}:\n{tail(self.log)}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        snapshot = process_tree(self.proc.pid)
        stop_child(self.proc, timeout_s)
        killed = kill_leftovers(snapshot)
        if killed:
            print(f"  killed leftover mta processes {killed}", file=sys.stderr)
        self.proc = None


class SmtpSink:
    """Postfix's smtp-sink -c on host:port; its "mesg=N" counter says what arrived."""

    def __init__(self, rundir: Path, host: str):
        self.host = host
        self.port = free_port(host)
        self.out = rundir / f"smtp-sink-{host}.out"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.cmd = [tool("smtp-sink"), "-c", *user, f"{host}:{self.port}", str(SINK_BACKLOG)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_greeting(self.host, self.port, self.alive)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {self.proc.returncode}: {tail(self.out)}")

    def count(self) -> int:
        try:
            data = self.out.read_bytes()[-256:]
        except OSError:
            return 0
        i = data.rfind(b"mesg=")
        if i < 0:
            return 0
        digits = data[i + 5:].split(b"\r")[0]
        return int(digits) if digits.isdigit() else 0

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None


class PySink:
    """This file's asyncio sink (`egress.py sink`), stamping each message's arrival."""

    def __init__(self, rundir: Path, host: str, delay_ms: float):
        self.host = host
        self.port = free_port(host)
        self.log = rundir / f"pysink-{host}.log"
        self.out = rundir / f"pysink-{host}.out"
        self.cmd = [sys.executable, str(Path(__file__).resolve()), "sink", "--listen",
                    f"{host}:{self.port}", "--log", str(self.log), "--delay-ms", str(delay_ms)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_greeting(self.host, self.port, self.alive)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"sink exited with {self.proc.returncode}: {tail(self.out)}")

    def records(self) -> list[tuple[float, str, int, list[str]]]:
        """(arrival time, client ip, open connections, recipients) per message so far."""
        out = []
        try:
            text = self.log.read_text()
        except OSError:
            return out
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) == 4:   # a line being written has fewer fields: skipped
                out.append((float(parts[0]), parts[1], int(parts[2]), parts[3].split(",")))
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None


class Generators:
    """smtp-source processes run at once (one per recipient domain), bounded in time."""

    def __init__(self, rundir: Path, tag: str, port: int, plan: list[tuple[str, int]],
                 sessions: int, size: int, timeout_s: float):
        self.procs = []
        self.cmds = []
        self.rundir = rundir
        self.tag = tag
        for _i, (rcpt, count) in enumerate(plan):
            cmd = [tool("smtp-source"), "-s", str(sessions), "-m", str(count), "-l", str(size),
                   "-d", "-c", "-f", SENDER, "-t", rcpt, f"{LOOPBACK}:{port}"]
            self.cmds.append(cmd)
        self.timeout_s = timeout_s
        self.counts = [c for _r, c in plan]

    def start(self) -> None:
        for i, cmd in enumerate(self.cmds):
            out = open(self.rundir / f"{self.tag}-source-{i}.out", "wb")
            self.procs.append((subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True), out))

    def running(self) -> bool:
        return any(p.poll() is None for p, _ in self.procs)

    def wait(self) -> None:
        """Wait for every generator (bounded); raise unless each sent all its messages."""
        deadline = time.monotonic() + self.timeout_s
        try:
            for i, (p, out) in enumerate(self.procs):
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"smtp-source {i} did not finish in "
                                       f"{self.timeout_s:.0f} s") from None
                out.close()
                data = (self.rundir / f"{self.tag}-source-{i}.out").read_bytes()
                counts = [int(x) for x in data.replace(b"\r", b"\n").split() if x.isdigit()]
                sent = counts[-1] if counts else 0
                if p.returncode != 0 or sent != self.counts[i]:
                    raise RuntimeError(f"smtp-source {i}: exit {p.returncode}, {sent} of "
                                       f"{self.counts[i]} sent")
        finally:
            self.kill()

    def kill(self) -> None:
        for p, out in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
            out.close()

    def describe(self) -> list[str]:
        return [shlex.join(c).replace(c[-1], "127.0.0.1:PORT") for c in self.cmds]


# ------------------------------------------------------------------------------------------
# The event log


class Events:
    """Follow the daemon's event log: counts by type, and every line kept for the end."""

    FAILURES = ("delay", "bounce")      # SparkPost's names (an expiry is a bounce)

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.rows: list[dict] = []
        self.counts: Counter = Counter()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if not end:
            return
        self.offset += end
        for line in data[:end].splitlines():
            e = json.loads(line)
            self.rows.append(e)
            self.counts[e.get("type")] += 1

    @property
    def delivered(self) -> int:
        return self.counts["delivery"]

    @property
    def failures(self) -> int:
        return sum(self.counts[t] for t in self.FAILURES)

    def first_failure(self) -> dict | None:
        return next((e for e in self.rows if e.get("type") in self.FAILURES), None)


# ------------------------------------------------------------------------------------------
# Config


def base_config(state: Path, smtp_port: int, http_port: int | None = None,
                delivery: dict | None = None) -> list[str]:
    lines = ["[server]", f"state_dir = {toml_str(str(state))}", "",
             "[smtp]", f"listen = [{toml_str(f'{LOOPBACK}:{smtp_port}')}]", "",
             "[http]",
             f"listen = [{toml_str(f'{LOOPBACK}:{http_port}')}]" if http_port else "listen = []",
             "", "[delivery]", "hold = false"]
    for k, v in (delivery or {}).items():
        lines.append(f"{k} = {json.dumps(v)}")
    return lines


def route(domain: str, host: str, port: int) -> list[str]:
    return ["", "[[delivery.route]]", f"domain = {toml_str(domain)}",
            f"hosts = [{toml_str(f'{host}:{port}')}]", 'starttls = "none"']


def egress_lines(pool: str = "bench") -> list[str]:
    lines = ["", "[egress]", f"default_pool = {toml_str(pool)}"]
    for name, addr in SOURCES:
        lines += ["", "[[egress.source]]", f"name = {toml_str(name)}",
                  f"source_address = {toml_str(addr)}"]
    members = ", ".join(f'{{ source = {toml_str(n)}, weight = 1 }}' for n, _ in SOURCES)
    lines += ["", "[[egress.pool]]", f"name = {toml_str(pool)}", f"sources = [{members}]"]
    return lines


def config_text(rundir: Path, lines: list[str]) -> str:
    return "\n".join(lines).replace(str(rundir), "TMP") + "\n"


# ------------------------------------------------------------------------------------------
# Machine state around a measurement


class Window:
    """CPU of the daemon's tree, of the machine, of our children, steal, over a window."""

    def __init__(self, root_pid: int, sinks):
        self.root = root_pid
        self.sinks = sinks

    def _snap(self):
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (time.perf_counter(), tree_cpu_s(self.root), system_busy_s(), steal_s(),
                self_cpu_s(), ch.ru_utime + ch.ru_stime, sum(s.cpu_s() for s in self.sinks))

    def begin(self):
        self.a = self._snap()

    def end(self):
        self.b = self._snap()

    def children_end(self):
        """After the generators are reaped (just after end()): their CPU, in the window."""
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.b = self.b[:5] + (ch.ru_utime + ch.ru_stime,) + self.b[6:]

    def figures(self, bg_rate: float, messages: int) -> dict:
        d = [y - x for x, y in zip(self.a, self.b)]
        wall, tree, busy, steal, own, children, sinks = d
        system = busy - own - children - sinks - bg_rate * wall
        return {"tree_ms": 1000 * tree / messages, "system_ms": 1000 * system / messages,
                "generator_ms": 1000 * children / messages, "sink_ms": 1000 * sinks / messages,
                "steal_cores": steal / wall if wall > 0 else 0.0}


# ------------------------------------------------------------------------------------------
# Scenario: spread (4 sources x 3 sites) against the reference (1 source, 1 site)


def spread_run(args, rundir: Path, layout: str) -> dict:
    rundir.mkdir()
    bg = background_busy_rate(args.idle_sample, args.wait_idle)
    hosts = SINK_HOSTS if layout == "4x3" else SINK_HOSTS[:1]
    sinks = [SmtpSink(rundir, h) for h in hosts]
    smtp_port = free_port()
    state = rundir / "state"
    delivery = {"connection_limit": args.connection_limit}
    lines = base_config(state, smtp_port, None, delivery)
    if layout == "4x3":
        domains = [f"site{i + 1}.bench.example" for i in range(3)]
        for d, s in zip(domains, sinks):
            lines += route(d, s.host, s.port)
        lines += egress_lines()
    else:
        domains = ["ref.bench.example"] * 3
        lines += route(domains[0], sinks[0].host, sinks[0].port)
    text = "\n".join(lines) + "\n"
    daemon = Daemon(rundir, text, smtp_port)
    result = {"layout": layout, "bg_rate": bg, "config": config_text(rundir, lines)}
    gens = None
    try:
        for s in sinks:
            s.start()
        daemon.start()
        events = Events(daemon.events_path)
        sessions = max(1, args.sessions // 3)

        def plan(total):
            per = [total // 3 + (1 if i < total % 3 else 0) for i in range(3)]
            return [(f"rcpt{i + 1}@{d}", n) for i, (d, n) in enumerate(zip(domains, per))]

        def drain(expected, deadline, what):
            while True:
                events.poll()
                if events.failures:
                    raise RuntimeError(f"{what}: non-delivery event {events.first_failure()}")
                if events.delivered >= expected and sum(s.count() for s in sinks) >= expected:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: {events.delivered} of {expected} delivered "
                                       f"in time; sinks {[s.count() for s in sinks]}")
                time.sleep(POLL_S)

        if args.warmup:
            g = Generators(rundir, "warmup", smtp_port, plan(args.warmup), sessions, args.size,
                           args.timeout)
            g.start()
            g.wait()
            drain(args.warmup, time.monotonic() + args.timeout, "warm-up")
            time.sleep(0.5)
        expected = args.warmup + args.messages
        skip = len(events.rows)
        gens = Generators(rundir, "measured", smtp_port, plan(args.messages), sessions,
                          args.size, args.timeout)
        result["generators"] = gens.describe()
        win = Window(daemon.pid, sinks)
        win.begin()
        t0_epoch = time.time()
        gens.start()
        deadline = time.monotonic() + args.timeout
        drain(expected, deadline, "measured batch")
        win.end()
        gens.wait()     # reaped now: their CPU counts in RUSAGE_CHILDREN
        win.children_end()
        wall = win.b[0] - win.a[0]
        result.update(win.figures(bg, args.messages))
        result["wall_s"] = wall
        result["msgs_per_s"] = args.messages / wall
        measured = [e for e in events.rows[skip:] if e.get("type") == "delivery"]
        last = max(float(e["event_time"]) for e in measured)
        result["msgs_per_s_log"] = args.messages / (last - t0_epoch)
        result["by_source"] = Counter(f"{e.get('egress_source', '?')} ({e.get('sending_ip', '?')})"
                                      for e in measured)
        result["by_site"] = Counter(e.get("site", "?") for e in measured)
        time.sleep(0.3)
        result["by_sink"] = {s.host: s.count() for s in sinks}
        errors = []
        if sum(result["by_sink"].values()) != expected:
            errors.append(f"sinks hold {sum(result['by_sink'].values())}, expected {expected}")
        if len(measured) != args.messages:
            errors.append(f"{len(measured)} delivery events for {args.messages} messages")
        result["error"] = "; ".join(errors) or None
        return result
    finally:
        if gens is not None:
            gens.kill()
        daemon.stop()
        for s in sinks:
            s.stop()


def spread_print(r: dict, rnd: int) -> None:
    print(f"  round {rnd} {r['layout']:>9}: {r['msgs_per_s']:,.0f} msgs/s end to end "
          f"({r['wall_s']:.1f} s), CPU/msg tree {r['tree_ms']:.3f} ms, system "
          f"{r['system_ms']:.3f} ms, steal {r['steal_cores']:.2f} cores, background "
          f"{r['bg_rate']:.2f} cores" + (f"  ERROR {r['error']}" if r.get("error") else ""))
    if r["layout"] == "4x3":
        print("      by source: " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_source"].items())))
        print("      by site:   " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_site"].items())))
        print("      at sinks:  " + ", ".join(f"{k} {v}" for k, v in r["by_sink"].items()))


def scenario_spread(args, workdir: Path) -> tuple[list[str], bool]:
    layouts = ["4x3", "reference"]
    results: dict[str, list[dict]] = {k: [] for k in layouts}
    ok = True
    for rnd in range(args.runs):
        order = layouts if rnd % 2 == 0 else layouts[::-1]
        for layout in order:
            try:
                r = spread_run(args, workdir / f"r{rnd}-{layout}", layout)
            except RuntimeError as e:
                print(f"  round {rnd} {layout}: FAILED {e}", file=sys.stderr)
                ok = False
                continue
            spread_print(r, rnd)
            ok = ok and not r["error"]
            results[layout].append(r)
    if not all(results.values()):
        return [], False

    def med(layout, key):
        return statistics.median(r[key] for r in results[layout])

    def span(layout, key):
        v = [r[key] for r in results[layout]]
        return f"{min(v):,.0f}–{max(v):,.0f}"

    rows = ["| layout | msgs/s end to end, median (min–max) | msgs/s to last delivery event | "
            "CPU/msg mta tree | CPU/msg system-wide | smtp-sink CPU/msg | generator CPU/msg |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"4x3": "4 sources x 3 sites", "reference": "built-in source, 1 site"}
    for layout in layouts:
        rows.append(f"| {names[layout]} | {med(layout, 'msgs_per_s'):,.0f} "
                    f"({span(layout, 'msgs_per_s')}) | {med(layout, 'msgs_per_s_log'):,.0f} | "
                    f"{med(layout, 'tree_ms'):.3f} ms | {med(layout, 'system_ms'):.3f} ms | "
                    f"{med(layout, 'sink_ms'):.3f} ms | {med(layout, 'generator_ms'):.3f} ms |")
    ratios = (f"Ratios 4x3 / reference (medians): throughput "
              f"{med('4x3', 'msgs_per_s') / med('reference', 'msgs_per_s'):.2f}, CPU/msg mta "
              f"tree {med('4x3', 'tree_ms') / med('reference', 'tree_ms'):.2f}, CPU/msg "
              f"system-wide {med('4x3', 'system_ms') / med('reference', 'system_ms'):.2f}.")
    split = []
    for i, r in enumerate(results["4x3"]):
        split.append(f"- run {i + 1}: by source "
                     + ", ".join(f"{k} {v}" for k, v in sorted(r["by_source"].items()))
                     + "; by site " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_site"].items()))
                     + "; at the sinks (incl. warm-up) "
                     + ", ".join(f"{k} {v}" for k, v in r["by_sink"].items()) + ".")
    out = rows + ["", ratios, "", "Split of the measured messages (event log; sinks' counters):"]
    out += split
    steal = {k: ", ".join(f"{r['steal_cores']:.2f}" for r in v) for k, v in results.items()}
    bgs = {k: ", ".join(f"{r['bg_rate']:.2f}" for r in v) for k, v in results.items()}
    out += ["", f"Steal during the measured runs (cores): 4x3 {steal['4x3']}; reference "
            f"{steal['reference']}.  Background busy rate before each run (cores): 4x3 "
            f"{bgs['4x3']}; reference {bgs['reference']}."]
    print("\n".join(out))
    desc = ["Scenario: " + (f"{args.messages} measured messages of {args.size} bytes, one "
                            f"recipient each, injected by 3 smtp-source processes at once (one "
                            f"per recipient domain, {max(1, args.sessions // 3)} sessions each, "
                            f"reused connections -d) while the mta delivers; "
                            f"{args.warmup} warm-up messages delivered first; "
                            f"connection_limit {args.connection_limit} per source x site; "
                            f"{args.runs} round(s), layouts interleaved, fresh daemon and sinks "
                            "per run."),
            "",
            "- 4x3: `[[egress.source]]` src-2..src-5 bound to 127.0.0.2-.5, one pool of the four "
            "(weight 1 each, the default pool); 3 recipient domains, each with a static route to "
            "its own `smtp-sink -c` on 127.0.0.10, .11, .12 (an IP literal: no DNS).",
            "- reference: no [egress] (the built-in default source, the system's choice of "
            "address); the same 3 generators all to one domain, routed to one smtp-sink on "
            "127.0.0.10.",
            "- msgs/s end to end: measured messages / (start of the generators -> the event "
            "log holds a delivery line for every message and the sinks' counters hold every "
            "message; polled every 20 ms).  'to last delivery event': the same from the "
            "delivery events' own timestamps.",
            "- CPU/msg mta tree: utime+stime+cutime+cstime over the supervisor and its "
            "descendants (/proc), same window.  System-wide: /proc/stat busy time minus the "
            "generators' CPU (RUSAGE_CHILDREN), the sinks' CPU, the harness's own and the "
            "background rate x wall time.",
            ""] + out
    cmds = [f"python bench/egress.py spread --messages {args.messages} --runs {args.runs}"
            + (" --record" if args.record else "")] + results["4x3"][0]["generators"]
    cfgs = {k: results[k][0]["config"] for k in layouts}
    return section("spread: 4 egress sources x 3 sites against 1 source x 1 site", args, desc,
                   cmds, cfgs), ok


# ------------------------------------------------------------------------------------------
# Scenario: rate


def scenario_rate(args, workdir: Path) -> tuple[list[str], bool]:
    rundir = workdir / "rate"
    rundir.mkdir()
    bg = background_busy_rate(args.idle_sample, args.wait_idle)
    sink = PySink(rundir, SINK_HOSTS[0], 0)
    smtp_port = free_port()
    domain = "rate.bench.example"
    rate = args.rate
    lines = base_config(rundir / "state", smtp_port, None, {})
    lines += route(domain, sink.host, sink.port)
    lines += ["", "[[shaping]]", f"domain = {toml_str(domain)}",
              f'max_message_rate = "{rate:g}/s"']
    daemon = Daemon(rundir, "\n".join(lines) + "\n", smtp_port)
    gens = None
    try:
        sink.start()
        daemon.start()
        events = Events(daemon.events_path)
        gens = Generators(rundir, "inject", smtp_port, [(f"r@{domain}", args.messages)],
                          args.sessions, args.size, args.timeout)
        st0 = steal_s()
        t0 = time.time()
        gens.start()
        gens.wait()
        t_injected = time.time()
        deadline = time.monotonic() + args.messages / rate * 2 + args.timeout
        while True:
            events.poll()
            if events.failures:
                raise RuntimeError(f"non-delivery event {events.first_failure()}")
            recs = sink.records()
            if len(recs) >= args.messages and events.delivered >= args.messages:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(recs)} of {args.messages} arrived in time")
            time.sleep(0.2)
        t_end = time.time()
        steal = (steal_s() - st0) / (t_end - t0)
        time.sleep(0.5)
        recs = sink.records()
    finally:
        if gens is not None:
            gens.kill()
        daemon.stop()
        sink.stop()
    times = sorted(r[0] for r in recs)
    n = len(times)
    best, i, best_at = 0, 0, 0.0
    for j in range(n):
        while times[j] - times[i] >= 1.0:
            i += 1
        if j - i + 1 > best:
            best, best_at = j - i + 1, times[i]
    span_s = times[-1] - times[0]
    avg = (n - 1) / span_s if span_s > 0 else 0.0
    from_injection = n / (times[-1] - t0)
    per_second = Counter(int(t - times[0]) for t in times)
    full = [per_second[k] for k in range(1, int(span_s))]   # whole seconds, first/last cut
    conns = max(r[2] for r in recs)
    ok = n == args.messages and best <= rate + 1
    out = ["| limit | messages | max in any 1 s window | bound (rate + burst 1) | "
           "average rate first -> last arrival | share of the limit | per whole second "
           "(min–max) | from start of injection |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|",
           f"| {rate:g}/s | {n:,} | {best} | {rate + 1:g} | {avg:.2f}/s over {span_s:.1f} s | "
           f"**{100 * avg / rate:.1f} %** | {min(full) if full else 0}–"
           f"{max(full) if full else 0} | {from_injection:.2f}/s |",
           "",
           f"Injection of the {n:,} messages took {t_injected - t0:.1f} s (the limit made "
           f"them queue); the densest window starts {best_at - times[0]:.2f} s after the first "
           f"arrival; at most {conns} connection(s) were open at the receiver.  Steal "
           f"{steal:.2f} cores, background before {bg:.2f} cores; {load_note()} at the end."]
    if best > rate + 1:
        out.append(f"**LIMIT EXCEEDED**: {best} messages in one second.")
    print("\n".join(out))
    desc = ["Scenario: one site (a static route to this file's asyncio sink on 127.0.0.10, "
            "which stamps each message with time.time() when its final \".\" arrives), the "
            "built-in single source, `[[shaping]] domain = \"rate.bench.example\", "
            f"max_message_rate = \"{rate:g}/s\"`; {args.messages:,} messages of {args.size} "
            f"bytes injected at once by smtp-source ({args.sessions} sessions, -d) with "
            "deliveries on, so the limit makes them queue.",
            "",
            "- Figures from the receiver's timestamps (not the event log).  Max in any 1 s "
            "window: the largest number of arrivals t with t0 <= t < t0 + 1 s over every t0 "
            "(sliding).  Average: (messages - 1) / (last arrival - first arrival).  The "
            "limiter's documented bound (mta/delivery/limits.py, GCRA): in any window of w s at "
            "most rate x w + burst, burst 1.",
            ""] + out
    cmds = [f"python bench/egress.py rate --messages {args.messages} --rate {rate:g}"
            + (" --record" if args.record else "")] + gens.describe()
    return section(f"rate: max_message_rate = {rate:g}/s per source x site", args, desc, cmds,
                   {"rate": config_text(rundir, lines)}), ok


# ------------------------------------------------------------------------------------------
# Scenario: priority


def paced(n: int, spread_s: float):
    """0 .. n-1, each at its time: evenly over *spread_s* seconds from the first."""
    step = spread_s / max(1, n - 1)
    start = time.monotonic()
    for i in range(n):
        delay = start + i * step - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i


def post_transmission(conn: http.client.HTTPConnection, rcpt: str, i: int,
                      transactional: bool = True) -> tuple[int, bytes]:
    body = json.dumps({"recipients": [{"address": rcpt}],
                       "content": {"from": "tx@sender.bench.example",
                                   "subject": f"message {i}",
                                   "text": "Your one-time code is 123456.\n"},
                       "options": {"transactional": transactional}}).encode()
    conn.request("POST", "/api/v1/transmissions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def scenario_priority(args, workdir: Path) -> tuple[list[str], bool]:
    rundir = workdir / "priority"
    rundir.mkdir()
    bg = background_busy_rate(args.idle_sample, args.wait_idle)
    sink = PySink(rundir, SINK_HOSTS[0], args.delay_ms)
    smtp_port, http_port = free_port(), free_port()
    domain = "prio.bench.example"
    delivery = {"connection_limit": args.connection_limit}
    if args.delivery_processes:
        delivery["processes"] = args.delivery_processes
    lines = base_config(rundir / "state", smtp_port, http_port, delivery)
    lines += route(domain, sink.host, sink.port)
    daemon = Daemon(rundir, "\n".join(lines) + "\n", smtp_port)
    gens = None
    sent: dict[str, tuple[float, float]] = {}   # rcpt -> (before POST, at 200)
    try:
        sink.start()
        daemon.start()
        events = Events(daemon.events_path)
        gens = Generators(rundir, "bulk", smtp_port, [(f"bulk@{domain}", args.bulk)],
                          args.sessions, args.size, args.timeout)
        t0 = time.time()
        gens.start()
        gens.wait()
        t_bulk = time.time() - t0
        time.sleep(1.0)
        bulk_before = len(sink.records())
        st0, tx0 = steal_s(), time.time()
        conn = http.client.HTTPConnection(LOOPBACK, http_port, timeout=30)
        for i in paced(args.transactional, args.spread_s):
            rcpt = f"tx-{i}@{domain}"
            a = time.time()
            status, body = post_transmission(conn, rcpt, i)
            b = time.time()
            if status != 200:
                raise RuntimeError(f"POST {i}: HTTP {status} {body[:200]!r}")
            sent[rcpt] = (a, b)
        conn.close()
        deadline = time.monotonic() + args.timeout
        while True:
            recs = sink.records()
            got = {r for rec in recs for r in rec[3] if r in sent}
            events.poll()
            if len(got) >= len(sent):
                break
            if time.monotonic() > deadline:
                print(f"  only {len(got)} of {len(sent)} transactional messages arrived within "
                      f"--timeout {args.timeout:.0f} s; the rest count as not delivered",
                      file=sys.stderr)
                break
            time.sleep(POLL_S)
        t_done = time.time()
        steal = (steal_s() - st0) / (t_done - tx0)
        # the delivery events follow the receiver's 250 by the spool's fsync: wait for them
        ev_deadline = time.monotonic() + 30
        while True:
            events.poll()
            done = {e["raw_rcpt_to"] for e in events.rows
                    if e.get("type") == "delivery" and e.get("raw_rcpt_to") in sent}
            if len(done) >= len(got) or time.monotonic() > ev_deadline:
                break
            time.sleep(POLL_S)
        recs = sink.records()
    finally:
        if gens is not None:
            gens.kill()
        daemon.stop()      # SIGTERM to the supervisor by PID, then SIGKILL to what is left
        sink.stop()
    arrived = {}
    for t, _ip, _c, rcpts in recs:
        for r in rcpts:
            if r in sent:
                arrived.setdefault(r, t)
    missing = len(sent) - len(arrived)
    inf = float("inf")     # not delivered before the run ended: above every percentile
    http_lat = sorted([arrived[r] - sent[r][1] for r in sent if r in arrived] + [inf] * missing)
    recv, deliv = {}, {}
    for e in events.rows:
        r = e.get("raw_rcpt_to")
        if r in sent:
            if e.get("type") == "injection":
                recv[r] = float(e["event_time"])
            elif e.get("type") == "delivery":
                deliv.setdefault(r, float(e["event_time"]))
    ev_lat = sorted([deliv[r] - recv[r] for r in sent if r in recv and r in deliv]
                    + [inf] * (len(sent) - len(deliv)))
    post_s = sorted(b - a for a, b in sent.values())
    bulk_in_window = sum(1 for t, _i, _c, rc in recs
                         if tx0 <= t <= t_done and not any(r in sent for r in rc))
    conns = max(r[2] for r in recs)
    bulk_total = sum(1 for _t, _i, _c, rc in recs if not any(r in sent for r in rc))

    def stats(v):
        if not v:
            return "n/a | n/a | n/a"
        return f"{fmt_lat(percentile(v, 50))} | {fmt_lat(percentile(v, 99))} | {fmt_lat(v[-1])}"

    ok = not missing and bool(http_lat) and percentile(http_lat, 99) <= 1.0
    slow = sorted(((arrived.get(r, inf) - sent[r][1], r) for r in sent), reverse=True)[:3]
    out = ["| transactional messages, one recipient each | n | p50 | p99 | max |",
           "|---|---:|---:|---:|---:|",
           f"| HTTP 200 -> arrival at the receiver | {len(sent)} | {stats(http_lat)} |",
           f"| reception -> delivery (event log) | {len(sent)} | {stats(ev_lat)} |",
           f"| HTTP request -> 200 | {len(post_s)} | {stats(post_s)} |",
           "",
           f"Delivery processes: {args.delivery_processes or 'default (one per CPU)'}.  "
           f"Not delivered within --timeout {args.timeout:.0f} s: {missing}.  Slowest: "
           + ", ".join(f"{r} {fmt_lat(t)}" for t, r in slow)
           + ".",
           "",
           f"Bulk: {args.bulk:,} injected in {t_bulk:.1f} s; {bulk_before:,} delivered before "
           f"the first transactional POST; {bulk_in_window:,} bulk deliveries while the "
           f"{len(sent)} transactional ones were sent and delivered ({t_done - tx0:.1f} s), "
           f"{bulk_total:,} in all before the daemon was stopped; at most {conns} connections "
           f"open at the receiver (connection_limit {args.connection_limit}).  Steal "
           f"{steal:.2f} cores, background before {bg:.2f} cores; {load_note()} at the end."]
    if not ok:
        out.append("**TARGET MISSED**: p99 HTTP 200 -> arrival above 1 s, or messages lost.")
    print("\n".join(out))
    desc = ["Scenario: one site that answers slowly -- this file's asyncio sink on 127.0.0.10 "
            f"waits {args.delay_ms:g} ms before its reply to the end of data -- with "
            f"`connection_limit = {args.connection_limit}`, the built-in single source; "
            f"{args.bulk:,} bulk messages of {args.size} bytes injected by smtp-source "
            f"({args.sessions} sessions, -d) with deliveries on; then {args.transactional} "
            "transactional messages (HTTP POST /api/v1/transmissions, `options.transactional "
            f"= true`, one recipient each) evenly over {args.spread_s:g} s on one keep-alive "
            "connection.  The run stops when all of them have arrived (the bulk does not "
            "finish); the daemon is then stopped by PID.",
            "",
            "- HTTP 200 -> arrival: time.time() when the POST's 200 was read, to the "
            "receiver's time.time() when the message's final \".\" arrived (before its delay).  "
            "Reception -> delivery: the event log's timestamps for that recipient (reception "
            "at injection, delivery when the spool recorded the outcome, after the receiver's "
            "reply).  Nearest-rank percentiles.",
            ""] + out
    cmds = [f"python bench/egress.py priority --bulk {args.bulk} --transactional "
            f"{args.transactional} --delay-ms {args.delay_ms:g} --connection-limit "
            f"{args.connection_limit} --timeout {args.timeout:g}"
            + (f" --delivery-processes {args.delivery_processes}" if args.delivery_processes
               else "")
            + (" --record" if args.record else "")] + gens.describe()
    return section("priority: transactional behind 50,000 bulk to a slow site"
                   if args.bulk == 50000 else
                   f"priority: transactional behind {args.bulk:,} bulk to a slow site",
                   args, desc, cmds, {"priority": config_text(rundir, lines)}), ok


# ------------------------------------------------------------------------------------------
# Scenario: head of line -- a hung site against another site's latency


class HungServer:
    """Accepts TCP connections on host:port and never says a word (a hung receiver)."""

    def __init__(self, host: str):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(SINK_BACKLOG)
        self.host, self.port = self.sock.getsockname()
        self.held: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="hung", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.held.append(c)

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for c in self.held:
            c.close()
        self.sock.close()


def hol_run(args, rundir: Path, hung_site: bool) -> dict:
    """One daemon: optionally --hung messages to a hung site first, then --messages by HTTP
    to a good site, evenly over --spread-s; HTTP 200 -> arrival at the good receiver."""
    rundir.mkdir()
    sink = PySink(rundir, SINK_HOSTS[0], 0.0)
    hung = HungServer(SINK_HOSTS[1])
    smtp_port, http_port = free_port(), free_port()
    delivery = {"connection_limit": args.connection_limit}
    lines = base_config(rundir / "state", smtp_port, http_port, delivery)
    lines += route("good.bench.example", sink.host, sink.port)
    lines += route("hung.bench.example", hung.host, hung.port)
    daemon = Daemon(rundir, "\n".join(lines) + "\n", smtp_port)
    sent: dict[str, float] = {}
    try:
        sink.start()
        daemon.start()
        conn = http.client.HTTPConnection(LOOPBACK, http_port, timeout=30)
        if hung_site:
            for i in range(args.hung):
                status, body = post_transmission(conn, f"h-{i}@hung.bench.example", i, False)
                if status != 200:
                    raise RuntimeError(f"POST hung {i}: HTTP {status} {body[:200]!r}")
            deadline = time.monotonic() + 30
            while len(hung.held) < args.connection_limit:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the hung site got {len(hung.held)} connections, "
                                       f"not {args.connection_limit}, in 30 s")
                time.sleep(POLL_S)
        for i in paced(args.messages, args.spread_s):
            rcpt = f"g-{i}@good.bench.example"
            status, body = post_transmission(conn, rcpt, i, False)
            if status != 200:
                raise RuntimeError(f"POST {i}: HTTP {status} {body[:200]!r}")
            sent[rcpt] = time.time()
        conn.close()
        deadline = time.monotonic() + args.timeout
        while True:
            arrived = {}
            for t, _ip, _c, rcpts in sink.records():
                for r in rcpts:
                    arrived.setdefault(r, t)
            if all(r in arrived for r in sent) or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        held = len(hung.held)
    finally:
        daemon.stop()
        sink.stop()
        hung.stop()
    inf = float("inf")
    lat = sorted(arrived.get(r, inf) - t for r, t in sent.items())
    return {"lat": lat, "missing": sum(1 for r in sent if r not in arrived), "held": held}


def scenario_hol(args, workdir: Path) -> tuple[list[str], bool]:
    bg = background_busy_rate(args.idle_sample, args.wait_idle)
    rows, results = [], {False: [], True: []}
    for rnd in range(args.runs):
        for hung_site in (False, True):
            r = hol_run(args, workdir / f"hol-{rnd}-{'with' if hung_site else 'without'}",
                        hung_site)
            results[hung_site].append(r)
            lat = r["lat"]
            row = (f"| {rnd + 1} | {'with' if hung_site else 'without'} | {len(lat)} | "
                   f"{fmt_lat(percentile(lat, 50))} | {fmt_lat(percentile(lat, 99))} | "
                   f"{fmt_lat(lat[-1])} | {r['held'] if hung_site else '-'} |")
            print(row)
            rows.append(row)

    def p99(runs):
        return max(percentile(r["lat"], 99) for r in runs)

    without, with_ = p99(results[False]), p99(results[True])
    missing = sum(r["missing"] for rs in results.values() for r in rs)
    ok = not missing and with_ <= max(2 * without, without + 0.25)
    out = ["| run | hung site | messages | p50 | p99 | max | connections held by the hung site |",
           "|---:|---|---:|---:|---:|---:|---:|"] + rows + [
           "",
           f"Worst p99 without the hung site {fmt_lat(without)}, with it {fmt_lat(with_)} "
           f"(ratio {with_ / without:.2f}); not delivered: {missing}.  Background before "
           f"{bg:.2f} cores; {load_note()} at the end."]
    if not ok:
        out.append("**TARGET MISSED**: the hung site delayed the other site (p99 more than "
                   "doubled and over 250 ms more), or messages were not delivered.")
    print("\n".join(out[-2:]))
    desc = ["Scenario: two sites, each a static route: `good.bench.example` to this file's "
            "asyncio sink on 127.0.0.10 (no delay), `hung.bench.example` to a receiver on "
            "127.0.0.11 that accepts TCP and never greets.  `connection_limit = "
            f"{args.connection_limit}`.  Each run is a fresh daemon; 'with': {args.hung} "
            "messages to the hung site are posted first and the run waits until the hung "
            f"receiver holds {args.connection_limit} connections; then (both layouts) "
            f"{args.messages} messages to the good site by HTTP POST, evenly over "
            f"{args.spread_s:g} s on one keep-alive connection.  Latency: time.time() at the "
            "POST's 200 -> the receiver's time.time() at the final \".\"; nearest-rank "
            "percentiles.  Layouts interleaved.", ""] + out
    cmds = [f"python bench/egress.py hol --messages {args.messages} --hung {args.hung} "
            f"--runs {args.runs} --connection-limit {args.connection_limit}"
            + (" --record" if args.record else "")]
    return section("head of line: a hung site against another site's latency", args, desc,
                   cmds, {}), ok


# ------------------------------------------------------------------------------------------
# RESULTS.md


def section(title: str, args, desc: list[str], cmds: list[str], configs: dict) -> list[str]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Egress (issue 10) {title} — {now}", "",
             f"Machine: {machine()}. Harness, daemon and receivers on the same machine, "
             f"loopback only ({'private network namespace' if args.netns_done else 'host network namespace'}); "
             f"work directory on {args.fstype}.", "",
             f"mta: this checkout at {source_revision()}.", "",
             f"Machine load: {args.load_before} before the runs (uptime); "
             + (f"note: {'; '.join(args.note)}" if args.note else "")
             + "", ""]
    lines += desc
    lines += ["", "Commands and configuration (TMP: the run's temporary directory):", "```"]
    lines += cmds
    for name, text in configs.items():
        lines += [f"# mta.toml ({name})", text.rstrip()]
    lines += ["```", ""]
    return lines


# ------------------------------------------------------------------------------------------
# The asyncio sink (a subcommand, run in its own process)


def run_sink(listen: str, log_path: str, delay_ms: float) -> None:
    host, port = listen.rsplit(":", 1)
    delay = delay_ms / 1000.0
    log = open(log_path, "a", buffering=1)
    state = {"open": 0}

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername")[0]
        state["open"] += 1
        rcpts: list[str] = []
        try:
            writer.write(b"220 bench-sink ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250 SIZE 104857600\r\n")
                elif verb == b"HELO":
                    writer.write(b"250 bench-sink\r\n")
                elif verb == b"MAIL":
                    rcpts = []
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    addr = line[8:].strip().split(b" ")[0].strip(b"<>:").decode(errors="replace")
                    rcpts.append(addr.replace(",", "_").replace(" ", "_") or "-")
                    writer.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await writer.drain()
                    while True:
                        data = await reader.readline()
                        if not data:
                            return
                        if data == b".\r\n":
                            break
                    t = time.time()
                    log.write(f"{t:.6f} {peer} {state['open']} {','.join(rcpts) or '-'}\n")
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(b"250 2.0.0 Ok: stored\r\n")
                elif verb in (b"RSET", b"NOOP"):
                    if verb == b"RSET":
                        rcpts = []
                    writer.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 5.5.2 Command not recognized\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            state["open"] -= 1
            writer.close()

    async def main():
        server = await asyncio.start_server(session, host, int(port), limit=1 << 20,
                                            backlog=SINK_BACKLOG)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())
    log.close()


# ------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="scenario", required=True)

    def common(sp):
        sp.add_argument("--size", type=int, default=2048, help="message payload octets")
        sp.add_argument("--sessions", type=int, default=21,
                        help="smtp-source sessions in all (spread: split over 3 generators)")
        sp.add_argument("--timeout", type=float, default=300.0,
                        help="seconds any one phase (injection, delivery) may take")
        sp.add_argument("--idle-sample", type=float, default=1.0)
        sp.add_argument("--wait-idle", type=float, default=30.0,
                        help="seconds to wait, at most, for an idle machine before a run")
        sp.add_argument("--netns", choices=("auto", "yes", "no"), default="auto")
        sp.add_argument("--workdir", default=None, help="parent of the temporary directory")
        sp.add_argument("--keep", action="store_true", help="keep the temporary directory")
        sp.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
        sp.add_argument("--note", action="append", default=[], help="remark for RESULTS.md")

    s = sub.add_parser("spread", help="4 sources x 3 sites against 1 source x 1 site")
    common(s)
    s.add_argument("--messages", type=int, default=30000)
    s.add_argument("--warmup", type=int, default=300)
    s.add_argument("--runs", type=int, default=1)
    s.add_argument("--connection-limit", type=int, default=10,
                   help="delivery.connection_limit (per source x site)")
    r = sub.add_parser("rate", help="max_message_rate held at the receiver")
    common(r)
    r.add_argument("--messages", type=int, default=3000)
    r.add_argument("--rate", type=float, default=50.0, help="messages per second")
    q = sub.add_parser("priority", help="transactional messages behind bulk to a slow site")
    common(q)
    q.add_argument("--bulk", type=int, default=50000)
    q.add_argument("--transactional", type=int, default=100)
    q.add_argument("--spread-s", type=float, default=5.0,
                   help="seconds over which the transactional messages are posted")
    q.add_argument("--delay-ms", type=float, default=75.0,
                   help="the receiver's wait before its reply to the end of data")
    q.add_argument("--connection-limit", type=int, default=5)
    q.add_argument("--delivery-processes", type=int, default=0,
                   help="delivery.processes (0: the daemon's default, one per CPU)")
    h = sub.add_parser("hol", help="another site's latency with and without a hung site")
    common(h)
    h.add_argument("--messages", type=int, default=200, help="messages to the good site")
    h.add_argument("--hung", type=int, default=200, help="messages to the hung site first")
    h.add_argument("--spread-s", type=float, default=5.0,
                   help="seconds over which the good site's messages are posted")
    h.add_argument("--runs", type=int, default=2, help="pairs (without, with) of runs")
    h.add_argument("--connection-limit", type=int, default=10)
    k = sub.add_parser("sink", help="(internal) the asyncio receiver")
    k.add_argument("--listen", required=True)
    k.add_argument("--log", required=True)
    k.add_argument("--delay-ms", type=float, default=0.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.scenario == "sink":
        run_sink(args.listen, args.log, args.delay_ms)
        return 0
    args.load_before = load_note()
    args.netns_done = enter_private_netns(args.netns)
    workdir = Path(tempfile.mkdtemp(prefix="mta-egress-", dir=args.workdir))
    args.fstype = fs_type(workdir)
    print(f"egress.py {args.scenario}: netns={'private' if args.netns_done else 'host'}, "
          f"workdir {workdir} ({args.fstype}), {args.load_before}")
    ok = False
    try:
        runner = {"spread": scenario_spread, "rate": scenario_rate,
                  "priority": scenario_priority, "hol": scenario_hol}[args.scenario]
        try:
            lines, ok = runner(args, workdir)
        except RuntimeError as e:
            print(f"egress.py {args.scenario}: FAILED: {e}", file=sys.stderr)
            return 1
        if args.record:
            if lines:
                append_results("\n" + "\n".join(lines))
                print(f"recorded in {REPO / 'bench' / 'RESULTS.md'}")
            else:
                print("nothing recorded: a run failed", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    threading.current_thread().name = "egress"
    sys.exit(main())
