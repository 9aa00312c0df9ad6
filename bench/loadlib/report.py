"""Medians over the runs, the tables and ratios printed at the end, the run lines, the
dated RESULTS.md sections (--record) and the JSON of every run (--json)."""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .common import BACKGROUND_WARN_CORES, POLL_S, REPO, RESULTS_MD, tool
from .run import Run
from .source import pacing, source_command
from .targets import BASE_TARGET, TARGETS, MtaTarget, Receiver


@dataclass
class Summary:
    target: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    def span(self, attr: str) -> tuple[float, float]:
        values = [getattr(r, attr) for r in self.runs]
        return min(values), max(values)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def med(summaries: dict[str, Summary], name: str, attr: str) -> float | None:
    """The median of attr over a target's runs, None if the target has none."""
    return summaries[name].median(attr) if name in summaries else None


def peers(summaries: dict[str, Summary], fixed: tuple[str, ...]) -> tuple[str, ...]:
    """The targets the mta is compared with: mta-base first when it ran, then fixed."""
    return ((BASE_TARGET,) if BASE_TARGET in summaries else ()) + fixed


def machine() -> str:
    os_name = "Linux"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    try:
        pf = subprocess.run([tool("postconf"), "-dh", "mail_version"], capture_output=True,
                            text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pf = "?"
    return (f"{os.cpu_count()} cores, {os_name}, kernel {platform.release()}, "
            f"Python {platform.python_version()}, Postfix {pf}")


def machine_load(summaries: dict[str, Summary], bg_rates: dict) -> list[str]:
    """Method lines on what else used the machine: before the runs, and the hypervisor during."""
    return [
        "- Background busy rate before runs (cores): "
        + ", ".join(f"{n} {statistics.median(v):.3f}" for n, v in bg_rates.items()) + ".",
        "- CPU taken by the hypervisor (/proc/stat steal) during each measured run, in cores "
        "(the machine is a shared VM; a run with high steal is slowed whatever its target): "
        + "; ".join(f"{n} " + ", ".join(f"{r.steal_cores:.2f}" for r in sm.runs)
                    for n, sm in summaries.items()) + ".",
    ]


def table(summaries: dict[str, Summary]) -> list[str]:
    rows = ["| target | durable | msgs/s median (min–max) | CPU/msg system-wide | "
            "CPU/msg server tree | generator CPU/msg |",
            "|---|---|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        lo, hi = s.span("msgs_per_s")
        rows.append(
            f"| {name} | {'yes' if TARGETS[name].durable else 'no'} "
            f"| {s.median('msgs_per_s'):,.0f} ({lo:,.0f}–{hi:,.0f}) "
            f"| {s.median('server_ms_system'):.3f} ms | {s.median('server_ms_tree'):.3f} ms "
            f"| {s.median('generator_ms'):.3f} ms |")
    return rows


def ratios(summaries: dict[str, Summary]) -> list[str]:
    pairs = [("throughput", "msgs_per_s"), ("CPU/msg system-wide", "server_ms_system"),
             ("CPU/msg server tree", "server_ms_tree")]
    return [f"- mta/{peer}: " + ", ".join(
                f"{label} {ratio(med(summaries, 'mta', a), med(summaries, peer, a))}"
                for label, a in pairs)
            for peer in peers(summaries, ("postfix", "sink"))]


def results_section(args, summaries, describe, netns, bg_rates, fstype) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    mode = ("one message per connection" if args.per_connection
            else "reused connections (-d)")
    if pacing(args):
        mode += ", " + pacing(args)
    src = shlex.join(source_command(args, 0, args.messages)).replace(":0", ":PORT")
    lines = [
        "",
        f"## End-to-end SMTP acceptance, {mode} — {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}. Generator and servers on the same machine, loopback only"
        f"{' (private network namespace)' if netns else ''}; work directory on {fstype}.",
        "",
        *base_note(args),
        f"Scenario: smtp-source, {args.sessions} sessions, {args.messages} messages of "
        f"{args.size} bytes, {mode}, no command pipelining (smtp-source cannot pipeline); "
        f"median of {args.runs} run(s); targets interleaved; fresh instance per run; "
        f"1 probe + {args.warmup} unmeasured warm-up messages before each measured batch.",
        "",
        *table(summaries),
        "",
        "Ratios (medians; < 1 means the mta is slower / uses less CPU):",
        *ratios(summaries),
        "",
        "Method:",
        "- msgs/s: measured messages / wall time of the smtp-source process.",
        "- CPU/msg system-wide: busy time from /proc/stat (user+nice+system+irq+softirq) over "
        "the run, minus smtp-source's CPU (os.wait4 rusage), minus the harness's own CPU, minus "
        "the background busy rate sampled for "
        f"{args.idle_sample:g} s before each run (after waiting up to {args.wait_idle:g} s for "
        f"it to fall below {BACKGROUND_WARN_CORES} cores) × wall time; per message. Includes kernel "
        "loopback/TCP work done on behalf of the server and anything else that ran.",
        "- CPU/msg server tree: utime+stime+cutime+cstime (/proc/PID/stat) over the server's "
        "root process and its live descendants, after minus before; per message. Roots: mta "
        "supervisor, Postfix master (reaped children counted via cutime), smtp-sink.",
        *(["- Postfix durability: every message is tagged HOLD (check_client_access "
           "static:HOLD); cleanup fsyncs the queue file and moves it to the hold queue before "
           "smtpd answers 250; after each run the hold queue was counted and matched the "
           "messages sent."] if "postfix" in summaries else []),
        *machine_load(summaries, bg_rates),
        "",
        "Commands:",
        "```",
        f"python bench/load.py {shlex.join(sys.argv[1:])}",
        src,
    ]
    for name, desc in describe.items():
        lines += [f"# {name}"] + desc
    lines += ["```", ""]
    return "\n".join(lines)


def base_note(args) -> list[str]:
    """--mta-base: the paragraph saying which two revisions of the mta ran side by side."""
    if not args.mta_base_src:
        return []
    mta = (f"HEAD {args.revision} via --mta-head" if args.mta_src
           else f"this checkout at {args.revision}")
    return [f"mta-base: {args.base_revision} exactly (`--mta-base {args.mta_base}`: its tree "
            "from `git archive`, its own ext/ compiled into its mta/_ext), in the same rounds "
            f"as mta ({mta}).", ""]


def print_run(run: Run, rnd: int) -> None:
    """The line printed after each acceptance run."""
    print(f"  {run.target:8} run {rnd}: {run.msgs_per_s:9,.0f} msgs/s  "
          f"wall {run.wall_s:6.2f} s  CPU/msg system-wide "
          f"{run.server_ms_system:.3f} ms  tree {run.server_ms_tree:.3f} ms  "
          f"generator {run.generator_ms:.3f} ms  background "
          f"{run.background_cpu_s / run.wall_s:.3f} cores  steal "
          f"{run.steal_cores:.2f} cores"
          + (f"  ERROR {run.error}" if run.error else ""), flush=True)


def fmt_ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:,.0f} ms"



def table_e2e(summaries: dict[str, Summary]) -> list[str]:
    rows = ["| target | msgs/s end to end, median (min–max) | acceptance msgs/s | "
            "CPU/msg system-wide | CPU/msg server tree | latency p50 | latency p99 | "
            "smtp-sink CPU/msg | generator CPU/msg |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        lo, hi = s.span("msgs_per_s")
        rows.append(
            f"| {name} | {s.median('msgs_per_s'):,.0f} ({lo:,.0f}–{hi:,.0f}) "
            f"| {s.median('accept_msgs_per_s'):,.0f} "
            f"| {s.median('server_ms_system'):.3f} ms | {s.median('server_ms_tree'):.3f} ms "
            f"| {fmt_ms(s.median('lat_p50_ms'))} | {fmt_ms(s.median('lat_p99_ms'))} "
            f"| {s.median('receiver_ms'):.3f} ms | {s.median('generator_ms'):.3f} ms |")
    return rows


def ratios_e2e(summaries: dict[str, Summary]) -> list[str]:
    pairs = [("throughput", "msgs_per_s"), ("acceptance", "accept_msgs_per_s"),
             ("CPU/msg system-wide", "server_ms_system"), ("CPU/msg server tree",
                                                           "server_ms_tree"),
             ("latency p50", "lat_p50_ms"), ("latency p99", "lat_p99_ms")]
    return [f"- mta/{peer}: " + ", ".join(
                f"{label} {ratio(med(summaries, 'mta', a), med(summaries, peer, a))}"
                for label, a in pairs)
            for peer in peers(summaries, ("postfix",))]


def print_run_e2e(run: Run, rnd: int) -> None:
    print(f"  {run.target:8} run {rnd}: {run.msgs_per_s:9,.0f} msgs/s end to end  "
          f"wall {run.wall_s:6.2f} s (acceptance {run.accept_wall_s:.2f} s)  "
          f"CPU/msg system-wide {run.server_ms_system:.3f} ms  tree {run.server_ms_tree:.3f} ms"
          f"  sink {run.receiver_ms:.3f} ms  generator {run.generator_ms:.3f} ms  "
          f"latency p50 {fmt_ms(run.lat_p50_ms)} p99 {fmt_ms(run.lat_p99_ms)} max "
          f"{fmt_ms(run.lat_max_ms)} (n={run.lat_n})  background {run.background_cpu_s / run.wall_s:.3f} cores"
          f"  steal {run.steal_cores:.2f} cores"
          + (f"  mta queue 0 after +{run.queue_confirm_s:.2f} s"
             if TARGETS[run.target].queue_confirm else "")
          + (f"  ERROR {run.error}" if run.error else ""), flush=True)


def results_section_e2e(args, summaries, describe, netns, bg_rates, fstype) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    mode = ("one message per connection" if args.per_connection
            else "reused connections (-d)")
    if pacing(args):
        mode += ", " + pacing(args)
    src = shlex.join(source_command(args, 0, args.messages)).replace(":0", ":PORT")
    sink = shlex.join(Receiver.command(0)).replace(":0", ":SINKPORT")
    lines = [
        "",
        f"## End to end (issue 3) — {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}. Generator, servers and receiver on the same machine, loopback "
        f"only{' (private network namespace)' if netns else ''}; work directory on {fstype}.",
        "",
        (f"mta: HEAD {args.revision} exactly (--mta-head: its mta/ from `git archive`, plus "
         "this checkout's compiled extensions)." if args.mta_src else
         f"Repository at the start: {args.revision}; mta run as "
         f"`{shlex.join(MtaTarget(args, REPO).command()[:-3])}`"
         + (" (--mta-cmd)." if args.mta_cmd else " from this checkout.")),
        "",
        *([" ".join(args.note), ""] if args.note else []),
        *base_note(args),
        f"Scenario: smtp-source → server → smtp-sink; {args.sessions} smtp-source sessions, "
        f"{mode}, {args.messages} messages of {args.size} bytes, "
        f"{'one recipient' if args.rcpts == 1 else f'{args.rcpts} recipients'} each, all to "
        f"one domain; delivery concurrency {args.concurrency} for both servers; median of "
        f"{args.runs} run(s); targets interleaved (order rotating); fresh server and receiver "
        f"per run; 1 probe + {args.warmup} warm-up messages delivered before each measured "
        "batch.",
        "",
        *table_e2e(summaries),
        "",
        "Ratios (medians; throughput above 1 means the mta is faster; CPU and latency below 1 "
        "mean the mta uses less / is quicker):",
        *ratios_e2e(summaries),
        "",
        "Method:",
        "- Receiver: one smtp-sink per run on its own 127.0.0.1 port, `-c` counters on its "
        "stdout (mesg=N is updated at every \".\" received); the harness reads the last counter. "
        "After each run it must equal exactly the messages sent (probe + warm-up + measured).",
        "- Done: the receiver has every message and the server has recorded every delivery — "
        "mta: its event log (`<state_dir>/log/events.jsonl`, written by the spool after the "
        "outcome is on disk) has a \"delivery\" line for every message; Postfix: maildrop, "
        "incoming, active, deferred and hold are empty (qmgr removes a queue file once "
        "delivered). Polled every "
        f"{POLL_S * 1000:g} ms. Afterwards, outside the measured window, `mta queue --json` "
        "must report 0 messages (it did, within the seconds shown by the harness as "
        "\"mta queue 0 after\"), and Postfix's queues must still be empty.",
        "- msgs/s end to end: measured messages / (done − start of smtp-source). Acceptance "
        "msgs/s: measured messages / wall time of smtp-source (the server accepts while it "
        "delivers).",
        "- CPU/msg system-wide: /proc/stat busy time (user+nice+system+irq+softirq) over the "
        "same window, minus smtp-source's CPU (os.wait4 rusage), minus smtp-sink's CPU "
        "(/proc/PID/stat), minus the harness's own CPU, minus the background busy rate sampled "
        f"for {args.idle_sample:g} s before each run × wall time; per message. Includes kernel "
        "TCP work on both sides of the server.",
        "- CPU/msg server tree: utime+stime+cutime+cstime over the mta supervisor's or Postfix "
        "master's process tree (reaped children via cutime/cstime), after minus before.",
        "- Latency, acceptance to delivery, nearest-rank p50/p99 over the measured messages. "
        "mta: event log, delivery.timestamp − reception.timestamp per (queue_id, recipient); "
        "reception is stamped by the acceptor at the end of DATA (before the fsync), delivery "
        "when the spool records the outcome (after its fsync); microsecond precision. Postfix: "
        "`delay=` of each `status=sent` maillog line (queue ids whose smtpd `client=` line "
        "follows the warm-up), Postfix's own measure from the message's arrival (MAIL FROM in "
        "smtpd) to the receiver's reply to \".\". Postfix prints two significant digits "
        "(`delay_logging_resolution_limit = 6` only lifts the cap of 2 decimals): 1 ms steps "
        "from 0.1 to 1 s, 0.1 s steps from 1 to 10 s, within 5 %; the maillog's timestamps are "
        "whole seconds, so nothing finer is available. Postfix's figure starts a little "
        "earlier (it includes the client's RCPT/DATA exchange) and ends a little earlier (before "
        "qmgr updates or removes the queue file) than the mta's.",
        *machine_load(summaries, bg_rates),
        "",
        "Commands:",
        "```",
        f"python bench/load.py {shlex.join(sys.argv[1:])}",
        src,
        "# receiver (one per run)",
        sink,
    ]
    for name, desc in describe.items():
        lines += [f"# {name}"] + desc
    lines += ["```", ""]
    return "\n".join(lines)


def append_results(text: str) -> None:
    """Append to bench/RESULTS.md under an exclusive lock (others append too)."""
    with open(RESULTS_MD, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if not f.read(1):
            f.write("# Benchmark results\n\nDated sections, newest last; each says its machine "
                    "and method.\n")
        f.seek(0, os.SEEK_END)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: str, summaries: dict[str, Summary]) -> None:
    """--json: every successful run with its derived figures."""
    Path(path).write_text(json.dumps(
        [{**r.__dict__, "msgs_per_s": r.msgs_per_s, "server_ms_system": r.server_ms_system,
          "server_ms_tree": r.server_ms_tree, "generator_ms": r.generator_ms,
          "accept_msgs_per_s": r.accept_msgs_per_s, "receiver_ms": r.receiver_ms}
         for s in summaries.values() for r in s.runs], indent=1))
