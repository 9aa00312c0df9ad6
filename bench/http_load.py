#!/usr/bin/env python3
"""HTTP injection load: wrk posting 2 KB transmissions to the mta and to nginx, same run.

What it measures
    How many single-recipient transmissions per second the mta's HTTP API accepts *and makes
    durable*, and with what latency, against nginx answering 200 to the same request: the
    ceiling of an HTTP server on this machine with this load generator.

    mta    ``python -m mta serve -c CONFIG``: every 200 is sent only after the message is
           on disk (group-committed fdatasync in the spool).  ``delivery.hold = true``, so
           the messages stay queued; after the run ``mta queue --json`` must count at least
           every 200 that wrk saw (the durable count).
    nginx  ``nginx -c CONF -p DIR`` with 2 worker processes, access log off, and
           ``location = /api/v1/transmissions { return 200 '{"results": ...}'; }``.
           ``return`` answers in the rewrite phase; nginx then reads the request body off the
           socket and discards it (``ngx_http_discard_request_body``) so that the connection
           can be reused: the body is received but not buffered or parsed.  That is the peer
           the project's baseline uses (baselines.md: nginx 1.22, 2 workers, wrk, 2 KB JSON).

    Both get the same wrk command, body and Lua script (bench/http_post.lua):
        wrk -t THREADS -c CONNECTIONS -d DURATION --latency -s bench/http_post.lua URL

Method
    Each round starts a fresh instance of each target (rotating their order), runs an
    unmeasured ``--warmup`` wrk, then the measured one.  Figures are medians over ``--runs``
    rounds: requests/s and latency percentiles as wrk reports them (p50/p90/p99), and for
    the mta durable messages/s = increase of the queue count over the measured run / wrk's
    duration.  A run with socket errors or non-2xx responses is reported as an error.
    For the mta the report also says where its CPU goes per durable message, process
    by process (utime+stime and context switches from /proc), under wrk and at each
    fixed rate: a paced message costs about twice one under wrk's closed loop, which
    serves many messages per wake-up (RESULTS.md, "Item 4's half rate is nearly a full
    machine").

Network
    Everything listens on and connects to 127.0.0.1; wrk runs for a bounded duration.

Usage
    python bench/http_load.py [--runs 3] [--duration 10] [--connections 64] [--threads 1]
        [--acceptors 2] [--shards 0] [--targets mta,nginx] [--mta-config-extra TOML]
        [--record]

``--record`` appends a dated section to bench/RESULTS.md.  Standard library only.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadlib.procs import cost_per_message, run_group, start_mta, tree_costs  # noqa: E402
from loadlib.targets.mta import merge, toml_dumps  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "bench" / "RESULTS.md"
LUA = REPO / "bench" / "http_post.lua"
HERE = REPO / "bench"
HOST = "127.0.0.1"
PATH = "/api/v1/transmissions"

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
BODY_SIZE = 2048
NGINX_REPLY = ('{"results":{"total_rejected_recipients":0,"total_accepted_recipients":1,'
               '"id":"1"}}')


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


SENDER = "news@example.com"     # the transmissions' From address


def make_body(size: int = BODY_SIZE, sender: str = SENDER) -> bytes:
    """A single-recipient transmission of exactly *size* octets, with substitutions."""
    def doc(pad: str) -> bytes:
        return json.dumps({
            "recipients": [{"address": {"email": "reader@example.net", "name": "A Reader"},
                            "substitution_data": {"first": "Ada"}}],
            "content": {"from": {"email": sender, "name": "The News"},
                        "subject": "Today's news for {{first}}",
                        "text": "Hello {{first}},\n\n" + pad + "\n\nTo unsubscribe: "
                                "https://example.com/u?e={{address.email}}\n"},
            "campaign_id": "bench", "metadata": {"list": "daily"}}).encode()

    words = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
             "incididunt ut labore et dolore magna aliqua.\n")
    pad = (words * (size // len(words) + 1))[:max(0, size - len(doc("")))]
    while len(doc(pad)) > size:          # "\n" takes two octets in JSON
        pad = pad[:-(len(doc(pad)) - size)]
    pad += " " * (size - len(doc(pad)))
    body = doc(pad)
    assert len(body) == size, len(body)
    return body


def wait_http(port: int, alive, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited while starting")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout_s}s")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT_S)


# ------------------------------------------------------------------------------ targets


class Mta:
    name = "mta"

    def __init__(self, args, workdir: Path):
        self.args = args
        self.dir = workdir / "mta"
        self.port = free_port()
        self.smtp_port = free_port()
        self.conf = self.dir / "mta.toml"

    def config(self) -> str:
        a = self.args
        doc = {"server": {"state_dir": str(self.dir / "state"), "log_level": "info",
                          "hostname": "mta.bench"},
               "smtp": {"listen": [f"{HOST}:{self.smtp_port}"], "acceptors": a.acceptors},
               "http": {"listen": [f"{HOST}:{self.port}"]},
               "spool": {"shards": a.shards},
               "delivery": {"hold": True, "processes": 1}}
        if a.mta_http_max_connections:
            doc["http"]["max_connections"] = a.mta_http_max_connections
        # --mta-config-extra is merged key by key: it may set keys of the tables above
        # ([spool] preallocate, [http] ...) as well as add tables of its own.
        for extra in a.mta_config_extra:
            merge(doc, tomllib.loads(extra))
        return toml_dumps(doc)

    def start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.conf.write_text(self.config())
        self.proc, self.log = start_mta(self.conf, self.dir, self.dir / "mta.log")
        wait_http(self.port, lambda: self.proc.poll() is None)

    def queued(self) -> int:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-m", "mta", "queue", "--json", "-c", str(self.conf)],
                           capture_output=True, timeout=120, env=env, check=True)
        return json.loads(r.stdout)["total"]["messages"]

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()

    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"

    def describe(self) -> str:
        return (f"mta: `python -m mta serve` from this checkout, `[smtp] acceptors = "
                f"{self.args.acceptors}` (each also serves HTTP), `[spool] shards = "
                f"{self.args.shards}` (0 = default), `[delivery] hold = true`" + (f", extra: `{'; '.join(self.args.mta_config_extra)}`"
                              if self.args.mta_config_extra else ""))


class Nginx:
    name = "nginx"

    def __init__(self, args, workdir: Path):
        self.args = args
        self.dir = workdir / "nginx"
        self.port = free_port()

    def config(self) -> str:
        d = self.dir
        return f"""
daemon off;
master_process on;
worker_processes {self.args.nginx_workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 40000;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    server {{
        listen {HOST}:{self.port};
        client_max_body_size 1m;
        client_body_buffer_size 64k;
        location = {PATH} {{
            default_type application/json;
            return 200 '{NGINX_REPLY}';
        }}
    }}
}}
"""

    def start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config())
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_http(self.port, lambda: self.proc.poll() is None)

    def queued(self) -> int:
        return 0

    def stop(self) -> None:
        stop(self.proc, signal.SIGQUIT)   # graceful shutdown of master and workers

    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"

    def describe(self) -> str:
        return (f"nginx: {nginx_version()}, {self.args.nginx_workers} worker processes, "
                "access log off, `return 200` with a SparkPost-shaped body (request body "
                "read and discarded)")


TARGETS = {"mta": Mta, "nginx": Nginx}


# --------------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(out: str) -> dict:
    """req/s, latency percentiles (ms), request count, errors from wrk --latency output."""
    res = {"errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if m:
            res[f"p{pct}"] = float(m.group(1)) * _UNITS[m.group(2)]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    return res


def wrk_command(args, url: str, duration: float) -> list[str]:
    return ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{duration:g}s",
            "--latency", "-s", str(LUA), url]


def run_wrk(args, url: str, duration: float, body_file: Path, auth: str = "") -> dict:
    env = {**os.environ, "WRK_BODY_FILE": str(body_file), "WRK_AUTH": auth}
    t0 = time.monotonic()
    r = subprocess.run(wrk_command(args, url, duration), capture_output=True, text=True,
                       env=env, timeout=duration + 60)
    res = parse_wrk(r.stdout)
    res["wall"] = time.monotonic() - t0
    res["raw"] = r.stdout + r.stderr
    if r.returncode != 0:
        res["errors"] += 1
    return res


def one_run(target, args, body_file: Path) -> dict:
    target.start()
    try:
        if args.warmup > 0:
            run_wrk(args, target.url(), args.warmup, body_file)
        q0 = target.queued()
        c0 = tree_costs(target.proc.pid) if target.name == "mta" else None
        res = run_wrk(args, target.url(), args.duration, body_file)
        if target.name == "mta":
            c1 = tree_costs(target.proc.pid)
            time.sleep(0.5)   # answers still in flight when wrk stopped
            res["durable"] = target.queued() - q0
            res["cost"] = cost_per_message(c0, c1, res["durable"])
            res["durable_rate"] = res["durable"] / args.duration
            if res["durable"] < res.get("requests", 0) - res["non2xx"]:
                res["errors"] += 1
                res["raw"] += f"\nqueue grew by {res['durable']}, fewer than the 200s\n"
        return res
    finally:
        target.stop()


# ------------------------------------------------------------------------ fixed rate


def fixed_rate_runs(args, names: list, results: dict, workdir: Path) -> list[dict]:
    """Each target afresh, warmed up with wrk, then bench/fixed_rate.py at
    args.fixed_rate x its median wrk rate, once per connection count."""
    counts = [int(x) for x in args.fixed_connections.split(",") if x.strip()] or \
        [args.connections]
    out = []
    for n in names:
        rate = round(median(results[n], "rps") * args.fixed_rate)
        for conns in counts:
            target = TARGETS[n](args, workdir)
            target.start()
            try:
                if args.warmup > 0:
                    run_wrk(args, target.url(), args.warmup, workdir / "body.json")
                c0 = tree_costs(target.proc.pid) if n == "mta" else None
                r = run_group(
                    [sys.executable, str(HERE / "fixed_rate.py"), "--url", target.url(),
                     "--rate", str(rate), "--duration", f"{args.duration:g}",
                     "--connections", str(conns)] + (["--prime"] if args.fixed_prime else []),
                    args.duration + 300, text=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                if c0 is not None:
                    # (the priming requests count too: each made a message durable)
                    made = res["completed"] + (conns if args.fixed_prime else 0)
                    res["cost"] = cost_per_message(c0, tree_costs(target.proc.pid), made)
            finally:
                target.stop()
            res["target"] = n
            print(f"fixed rate {n}: {rate}/s over {conns} connections: "
                  f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, errors {res['errors']}, "
                  f"non-2xx {res['non_2xx']}, unanswered {res['unanswered']}", flush=True)
            out.append(res)
    return out


def fixed_report(args, fixed: list[dict]) -> str:
    engines = sorted({f.get("engine", "python") for f in fixed})
    engine = f", its {' and '.join(engines)} engine"
    lines = ["", f"**Fixed rate** (bench/fixed_rate.py{engine}, open loop, latency from the scheduled "
             f"time to the last octet; {args.fixed_rate:g} × each target's median wrk rate, "
             f"{args.duration:g} s, a fresh instance warmed up with wrk"
             f"{'; every connection primed with one unmeasured request first (--fixed-prime)' if args.fixed_prime else ''}"
             "):", "",
             "| target | connections | rate/s | answered | p50 ms | p90 ms | p99 ms | "
             "p99.9 ms | max ms | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in fixed:
        lines.append(f"| {f['target']} | {f['connections']:,} | {f['rate']:,.0f} | "
                     f"{f['completed']:,} of {f['scheduled']:,} | {f['p50_ms']} | "
                     f"{f['p90_ms']} | {f['p99_ms']} | {f['p999_ms']} | {f['max_ms']} | "
                     f"{sum(f['errors'].values()) + f['non_2xx']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ report

COST_ROLES = ("acceptor", "spool", "events")


def _by_role(cost: dict) -> dict[str, tuple[float, float]]:
    """A run's per-process cost summed by role: acceptor[0] and acceptor[1] are
    "acceptor", everything but COST_ROLES is "other"."""
    out: dict[str, tuple[float, float]] = {}
    for title, (us, sw) in cost.items():
        role = title.split("[", 1)[0]
        role = role if role in COST_ROLES else "other"
        u0, s0 = out.get(role, (0.0, 0.0))
        out[role] = (u0 + us, s0 + sw)
    return out


def cost_report(results: dict, fixed: list[dict]) -> str:
    """Where the mta's CPU goes per durable message, wrk against the fixed rates."""
    rows = []
    wrk = [_by_role(r["cost"]) for r in results.get("mta", []) if r.get("cost")]
    if wrk:
        rows.append((f"wrk, {len(wrk)} run(s), median", {
            role: (statistics.median(c.get(role, (0.0, 0.0))[0] for c in wrk),
                   statistics.median(c.get(role, (0.0, 0.0))[1] for c in wrk))
            for role in COST_ROLES + ("other",)}))
    for f in fixed:
        if f.get("cost"):
            rows.append((f"fixed {f['rate']:,.0f}/s, {f['connections']:,} conns",
                         _by_role(f["cost"])))
    if not rows:
        return ""
    lines = ["", "**Where the mta's CPU goes, per durable message** (utime+stime of each "
             "process, and its context switches over every thread, from /proc: over the "
             "measured wrk run, and over the whole fixed-rate client run, its priming "
             "included; a paced message costs more than one under wrk's closed loop, "
             "with fewer messages per wake-up):", "",
             "| load | acceptors µs | spool µs | events µs | other µs | all µs | "
             "context switches: acceptors / spool / all |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, c in rows:
        get = [c.get(role, (0.0, 0.0)) for role in COST_ROLES + ("other",)]
        lines.append(f"| {label} | " + " | ".join(f"{us:.0f}" for us, _ in get) +
                     f" | {sum(us for us, _ in get):.0f} | {get[0][1]:.2f} / {get[1][1]:.2f}"
                     f" / {sum(sw for _, sw in get):.2f} |")
    return "\n".join(lines) + "\n"


def nginx_version() -> str:
    r = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return (r.stderr or r.stdout).strip().replace("nginx version: ", "")


def machine() -> str:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    wrk_v = wrk_v.split(" Copyright")[0]
    return (f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {wrk_v.strip()}, load average at start "
            f"{load:.2f}")


def median(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else float("nan")


def report(args, results: dict, body_size: int, start_machine: str) -> str:
    today = datetime.date.today().isoformat()
    command = shlex.join(wrk_command(args, "URL", args.duration)).replace(str(REPO) + "/", "")
    lines = [f"## HTTP injection: wrk against the mta and nginx (issue 4), {today}", "",
             f"**Machine:** {start_machine}.", "",
             f"**Load:** `{command}` with "
             f"`WRK_BODY_FILE` = a {body_size}-octet single-recipient transmission (inline "
             f"text, substitutions, campaign_id, metadata); {args.warmup:g} s unmeasured "
             f"warm-up per run; median of {args.runs} runs, targets interleaved.", "",
             "| target | requests/s | durable msgs/s | p50 ms | p90 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        durable = f"{median(runs, 'durable_rate'):,.0f}" if name == "mta" else "—"
        lines.append(f"| {name} | {median(runs, 'rps'):,.0f} | {durable} | "
                     f"{median(runs, 'p50'):.2f} | {median(runs, 'p90'):.2f} | "
                     f"{median(runs, 'p99'):.2f} |")
    if "mta" in results and "nginx" in results:
        ratio = median(results["mta"], "durable_rate") / median(results["nginx"], "rps")
        lines += ["", f"**mta durable msgs/s ÷ nginx req/s = {ratio:.1%}** (target for this "
                  "stage ≥ 5%, long-term goal 20%)."]
    lines += ["", "Per run (req/s; mta durable msgs/s):", ""]
    for name, runs in results.items():
        vals = ", ".join(f"{r['rps']:,.0f}" + (f" ({r['durable_rate']:,.0f})"
                                                if "durable_rate" in r else "") for r in runs)
        lines.append(f"- {name}: {vals}")
    lines += ["", "Targets:", ""]
    for cls in TARGETS.values():
        if cls.name in results:
            lines.append("- " + cls(args, Path("/nonexistent")).describe())
    lines += ["", f"Command: `python bench/http_load.py {shlex.join(sys.argv[1:])}`", ""]
    return "\n".join(lines)


def record(text: str) -> None:
    with open(RESULTS_MD, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write("\n" + text)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--size", type=int, default=BODY_SIZE, metavar="OCTETS",
                   help="size of the transmission posted (JSON; the message's text fills "
                        "it), at least 600 and at most 1,000,000 (nginx takes up to 1 MB)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--acceptors", type=int, default=2)
    p.add_argument("--shards", type=int, default=0)
    p.add_argument("--nginx-workers", type=int, default=2)
    p.add_argument("--targets", default="mta,nginx")
    p.add_argument("--mta-config-extra", action="append", default=[],
                   help="TOML appended to the mta's config (repeatable)")
    p.add_argument("--workdir", default=None, help="parent of the temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--record", action="store_true", help="append a section to RESULTS.md")
    p.add_argument("--fixed-prime", action="store_true",
                   help="fixed-rate runs: one unmeasured request on every connection before "
                        "the schedule (fixed_rate.py --prime): the steady state of that many "
                        "open connections, not the server accepting them all at once")
    p.add_argument("--fixed-rate", type=float, default=0.0, metavar="FRACTION",
                   help="then, per target, bench/fixed_rate.py at FRACTION of its median "
                        "wrk rate (e.g. 0.5): open-loop p50/p90/p99")
    p.add_argument("--mta-http-max-connections", type=int, default=0,
                   help="[http] max_connections of the mta (per acceptor; 0: its default)")
    p.add_argument("--fixed-connections", default="", metavar="N[,N...]",
                   help="connection counts for the fixed-rate runs (default: --connections); "
                        "e.g. 64,10000 (the mta needs [http] max_connections that high)")
    args = p.parse_args(argv)
    if not 1 <= args.duration <= 600 or not 1 <= args.runs <= 20:
        p.error("--duration must be 1..600 s and --runs 1..20")
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    for n in names:
        if n not in TARGETS:
            p.error(f"unknown target {n!r}")
    for tool in ["wrk"] + (["nginx"] if "nginx" in names else []):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            p.error(f"{tool} is not installed (see tests/setup-deps.d/http.sh)")
    start_machine = machine()
    if not 600 <= args.size <= 1_000_000:
        p.error("--size must be from 600 to 1,000,000 octets")
    workdir = Path(tempfile.mkdtemp(prefix="http-load-", dir=args.workdir))
    body = make_body(args.size)
    body_file = workdir / "body.json"
    body_file.write_bytes(body)
    results: dict[str, list[dict]] = {n: [] for n in names}
    failed = False
    try:
        for rnd in range(args.runs):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for n in order:
                res = one_run(TARGETS[n](args, workdir), args, body_file)
                ok = not res["errors"] and not res["non2xx"]
                print(f"round {rnd + 1} {n}: {res['rps']:,.0f} req/s"
                      + (f", {res['durable_rate']:,.0f} durable msgs/s" if "durable_rate" in res
                         else "")
                      + f", p50 {res.get('p50', float('nan')):.2f} ms, p99 "
                        f"{res.get('p99', float('nan')):.2f} ms" + ("" if ok else "  ERROR"),
                      flush=True)
                if not ok:
                    failed = True
                    print(res["raw"], file=sys.stderr)
                results[n].append(res)
        fixed = fixed_rate_runs(args, names, results, workdir) if args.fixed_rate else []
        failed = failed or any(f["errors"] or f["non_2xx"] or f["unanswered"] for f in fixed)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, results, len(body), start_machine)
    if fixed:
        text += fixed_report(args, fixed)
    text += cost_report(results, fixed)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({n: [{k: v for k, v in r.items() if k != "raw"} for r in runs]
                       for n, runs in results.items()}, fh, indent=1)
    if failed:
        print("some runs failed; nothing recorded", file=sys.stderr)
        return 1
    if args.record:
        record(text)
        print(f"recorded in {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
