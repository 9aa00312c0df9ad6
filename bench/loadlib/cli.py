"""Options, then the interleaved rounds: every target once per round, the order rotating,
a fresh instance per run; at the end the medians, and --record / --json."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import tomllib
from collections import defaultdict
from pathlib import Path

from .common import BACKGROUND_WARN_CORES, RESULTS_MD, fs_type, tool
from .netns import enter_private_netns
from .report import (Summary, append_results, print_run, print_run_e2e, ratios, ratios_e2e,
                     results_section, results_section_e2e, table, table_e2e, write_json)
from .revision import build_base, copy_base, snapshot_head_mta, source_revision
from .run import measure, measure_e2e
from .source import pacing
from .targets import (BASE_TARGET, DEFAULT_TARGETS, E2E_DEFAULT_TARGETS, E2E_TARGETS,
                      TARGETS)


def parse_args(argv, description: str = ""):
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (-s)")
    p.add_argument("--messages", type=int, default=20000, help="measured messages per run (-m)")
    p.add_argument("--size", type=int, default=2048, help="message payload octets (-l)")
    p.add_argument("--runs", type=int, default=3, help="runs per target; figures are medians")
    p.add_argument("--targets", default=None,
                   help="comma-separated subset of mta,postfix,sink (default: all; with --e2e: "
                        "mta,postfix); with --mta-base also mta-base, which it adds")
    p.add_argument("--e2e", action="store_true",
                   help="end to end: the targets deliver to an smtp-sink started by the "
                        "harness; timed until it has every message and the queue is empty")
    p.add_argument("--concurrency", type=int, default=20,
                   help="--e2e: connections to the receiver, at most (mta "
                        "delivery.connection_limit (node-wide), Postfix destination concurrency "
                        "limit)")
    p.add_argument("--per-connection", action="store_true",
                   help="one message per connection (smtp-source without -d)")
    p.add_argument("--wait", type=int, default=0, metavar="SECONDS",
                   help="each session waits this many whole seconds after each message "
                        "(smtp-source -w): an offered rate of about --sessions / SECONDS "
                        "msgs/s, the same for every target, instead of as fast as it accepts; "
                        "to compare CPU per message at one rate (raise `ulimit -n` and the "
                        "mta's [smtp] max_connections_per_ip for many sessions)")
    p.add_argument("--random-wait", type=int, default=0, metavar="SECONDS",
                   help="each session waits a random 0 to SECONDS whole seconds after each "
                        "message (smtp-source -R): a paced load like --wait, about --sessions "
                        "/ (SECONDS / 2) msgs/s, whose sessions do not send in step")
    p.add_argument("--warmup", type=int, default=500,
                   help="unmeasured messages sent before each measured batch")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one smtp-source run may take before it is killed (--e2e: "
                        "also the bound for the warm-up's and the measured batch's delivery)")
    p.add_argument("--idle-sample", type=float, default=1.0,
                   help="seconds of background CPU sampling before each run (0 = none)")
    p.add_argument("--wait-idle", type=float, default=30.0,
                   help="seconds to wait, at most, for an idle machine before each run")
    p.add_argument("--sender", default="sender@example.com")
    p.add_argument("--rcpt", default="rcpt@example.net")
    p.add_argument("--rcpts", type=int, default=1,
                   help="recipients per message (smtp-source -r: 1rcpt@..., 2rcpt@...; one "
                        "domain, so one delivery transaction per message)")
    p.add_argument("--mta-cmd", default=None,
                   help="command that runs the daemon, e.g. 'mta' (default: python -m mta "
                        "from this checkout, or mta from PATH if there is no mta/__main__.py)")
    p.add_argument("--mta-head", action="store_true",
                   help="run the mta from a copy of HEAD's mta/ (git archive) plus this "
                        "checkout's compiled extensions, unaffected by uncommitted work")
    p.add_argument("--mta-base", default=None, metavar="REV",
                   help="add the target mta-base: the mta exactly as at git revision REV (its "
                        "tree from git archive, its own ext/ compiled, cached in "
                        "bench/.cache/), measured in the same rounds as mta")
    p.add_argument("--mta-config-extra", action="append", default=[], metavar="TOML",
                   help="TOML merged into the generated mta config, e.g. "
                        "'smtp = {acceptors = 2}' (repeatable)")
    p.add_argument("--netns", choices=("auto", "yes", "no"), default="auto",
                   help="run everything in a private network namespace with only loopback")
    p.add_argument("--workdir", default=None,
                   help="parent of the temporary directory (default: system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    p.add_argument("--record", action="store_true", help="append a section to bench/RESULTS.md")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="--e2e: a remark recorded in the RESULTS.md section (repeatable)")
    args = p.parse_args(argv)
    if args.targets is None:
        args.targets = ",".join(E2E_DEFAULT_TARGETS if args.e2e else DEFAULT_TARGETS)
    choices = E2E_TARGETS if args.e2e else tuple(TARGETS)
    if not args.mta_base:
        choices = tuple(c for c in choices if c != BASE_TARGET)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in choices]
    if unknown or not names:
        p.error(f"unknown targets {unknown}; choose from {','.join(choices)}"
                + (" (the sink is the receiver with --e2e)" if args.e2e else "")
                + ("" if args.mta_base else f" ({BASE_TARGET} comes with --mta-base REV)"))
    args.target_names = list(dict.fromkeys(names))
    if args.mta_base and BASE_TARGET not in args.target_names:
        # --mta-base adds its target, next to the mta it is compared with.
        at = args.target_names.index("mta") + 1 if "mta" in args.target_names else 0
        args.target_names.insert(at, BASE_TARGET)
    if args.mta_head and args.mta_cmd:
        p.error("--mta-head and --mta-cmd exclude each other")
    args.mta_src = None
    args.mta_base_src = None
    for extra in args.mta_config_extra:
        try:
            tomllib.loads(extra)
        except tomllib.TOMLDecodeError as e:
            p.error(f"--mta-config-extra {extra!r}: {e}")
    if args.wait and args.random_wait:
        p.error("--wait and --random-wait exclude each other")
    if min(args.sessions, args.messages, args.size, args.runs, args.concurrency) < 1 \
            or args.warmup < 0 or args.wait < 0 or args.random_wait < 0:
        p.error("--sessions, --messages, --size, --runs and --concurrency must be positive, "
                "--warmup, --wait and --random-wait not negative")
    return args


def main(argv=None, description: str = "") -> int:
    args = parse_args(argv, description)
    if "postfix" in args.target_names and os.geteuid() != 0:
        sys.exit("load.py: the postfix target must run as root (postfix start)")
    for name in ("smtp-source",
                 *(["smtp-sink"] if "sink" in args.target_names or args.e2e else []),
                 *(["postfix"] if "postfix" in args.target_names else [])):
        tool(name)

    if BASE_TARGET in args.target_names:   # before the temporary directory: may exit
        base_build, args.base_revision, args.base_subject = build_base(args.mta_base)

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    netns = enter_private_netns(args.netns)
    top = Path(tempfile.mkdtemp(prefix="mta-load-", dir=args.workdir))
    top.chmod(0o755)  # Postfix daemons (user postfix) must reach their queue directory
    args.revision = source_revision()
    if args.mta_head and "mta" in args.target_names:
        args.mta_src = str(top / "mta-src")
        args.revision = snapshot_head_mta(Path(args.mta_src))
    if BASE_TARGET in args.target_names:
        args.mta_base_src = str(top / "mta-base-src")
        copy_base(base_build, Path(args.mta_base_src))
    fstype = fs_type(top)
    if fstype in ("tmpfs", "ramfs"):
        print(f"warning: {top} is on {fstype}: fsync is free there, durable figures are not "
              "meaningful (use --workdir on a disk)", file=sys.stderr)
    print(f"load.py: {'end to end, ' if args.e2e else ''}"
          f"targets {','.join(args.target_names)}, {args.runs} run(s), "
          f"{args.sessions} sessions, {args.messages} msgs x {args.size} B, "
          f"{'one per connection' if args.per_connection else 'reused connections'}, "
          f"{pacing(args) + ', ' if pacing(args) else ''}"
          f"netns={'private' if netns else 'host'}, workdir {top} ({fstype})")

    summaries = {n: Summary(n) for n in args.target_names}
    bg_rates: dict[str, list[float]] = defaultdict(list)
    describe, errors = {}, []
    try:
        for rnd in range(args.runs):
            k = rnd % len(args.target_names)
            for name in args.target_names[k:] + args.target_names[:k]:
                rundir = top / f"{name}-{rnd + 1}"
                try:
                    run = (measure_e2e if args.e2e else measure)(args, name, rundir)
                except (RuntimeError, OSError, subprocess.SubprocessError, smtplib.SMTPException,
                        tomllib.TOMLDecodeError, ValueError) as e:
                    errors.append(f"{name} run {rnd + 1}: {e}")
                    print(f"  {name:8} run {rnd + 1}: ERROR {e}", file=sys.stderr)
                    continue
                describe.setdefault(name, TARGETS[name](args, rundir).describe())
                bg_rates[name].append(run.background_cpu_s / run.wall_s)
                if run.error:
                    errors.append(f"{name} run {rnd + 1}: {run.error}")
                else:
                    summaries[name].runs.append(run)
                (print_run_e2e if args.e2e else print_run)(run, rnd + 1)
                if run.background_cpu_s / run.wall_s > BACKGROUND_WARN_CORES:
                    print("  warning: the machine was busy before this run (something else is "
                          "running); figures are noisy", file=sys.stderr)
    except KeyboardInterrupt as e:
        errors.append(f"interrupted ({e})")
    finally:
        if args.keep:
            print(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)

    done = {n: s for n, s in summaries.items() if s.runs}
    if done:
        print()
        print("\n".join(table_e2e(done) if args.e2e else table(done)))
        print("\n".join(ratios_e2e(done) if args.e2e else ratios(done)))
    if args.json:
        write_json(args.json, summaries)
    if errors:
        print("\nerrors:\n  " + "\n  ".join(errors), file=sys.stderr)
        if args.record:
            print("not recorded: fix the errors first", file=sys.stderr)
        return 1
    if args.record:
        section = results_section_e2e if args.e2e else results_section
        append_results(section(args, done, describe, netns, bg_rates, fstype))
        print(f"appended to {RESULTS_MD}")
    return 0

