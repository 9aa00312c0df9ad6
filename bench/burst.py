#!/usr/bin/env python3
"""A sustained burst (issue 15, item 6): SMTP and HTTP injection together, as fast as the node
accepts, while it delivers to per-site receivers at the rate each site allows.

    unshare --net python3 bench/burst.py --messages 1000000 [--http-share 0.4] [--sites 3]
        [--site-rate 500] [--timeout 3600] [--record]

What runs (loopback only: start it inside ``unshare --net``; it brings ``lo`` up):
- ``--sites`` receiving sites, each one Postfix smtp-sink on its own 127.0.0.1 port; the mta
  has a static route per site domain (``siteN.example``) and a ``[[shaping]]`` rule
  ``max_message_rate = "<site-rate>/s"`` for it: the rate a throttling receiver allows,
  which the shaping holds to (smtp-sink itself answers every message with 250).
- ``mta serve`` from this checkout: 2 acceptors (SMTP and HTTP), deliveries on.
- Per site, one smtp-source (20 sessions, reused connections, 2 KB messages, one
  recipient) sending its share of the SMTP messages, and one wrk (8 connections) posting
  single-recipient 2 KB transmissions until the HTTP share is accepted (then stopped).

Every ``--interval`` seconds it scrapes the admin listener's /metrics and records: messages
accepted over SMTP and over HTTP, recipients delivered, messages queued; the sum of the
resident memory of the mta's processes; and the octets under the spool directory.  It stops
when everything was injected and the queue is empty, or at ``--timeout`` (a failure).

Reports: the injection rate per interval from start to end (does it sag as the queue
grows?), peak memory and disk, the time until the queue was empty, and what was lost
(accepted − delivered, which must be 0).  ``--record`` appends it to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from loadlib.common import free_port, tool, wait_banner  # noqa: E402
from loadlib.procs import stop_child, tree_memory  # noqa: E402
from loadlib.targets.mta import toml_dumps  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

SESSIONS = 20          # smtp-source sessions per site
WRK_CONNECTIONS = 8    # wrk connections per site
READY_TIMEOUT_S = 60.0


def metrics(port: int) -> dict[str, float]:
    """The admin /metrics counters and gauges this harness reads, summed over their labels
    (recipient outcomes: only result="delivered")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "mta_delivery_outcomes_total" and \
                    sample.labels.get("result") != "delivered":
                continue
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def http_body(domain: str) -> bytes:
    from http_load import make_body
    body = make_body(2048)
    return body.replace(b"example.net", domain.encode())


def config(work: Path, smtp: int, http: int, admin: int, sinks: list[int], rate: int) -> str:
    domains = [f"site{i}.example" for i in range(len(sinks))]
    return toml_dumps({
        "server": {"state_dir": str(work / "state"), "hostname": "mta.burst"},
        "smtp": {"listen": [f"127.0.0.1:{smtp}"], "acceptors": 2},
        "http": {"listen": [f"127.0.0.1:{http}"]},
        "admin": {"listen": [f"127.0.0.1:{admin}"]},
        "delivery": {"hold": False, "route": [
            {"domain": d, "hosts": [f"127.0.0.1:{port}"]} for d, port in zip(domains, sinks)]},
        "shaping": [{"domain": d, "connection_limit": 10, "max_message_rate": f"{rate}/s"}
                    for d in domains]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1_000_000, help="messages in all")
    p.add_argument("--http-share", type=float, default=0.4,
                   help="share of the messages injected over HTTP (the rest over SMTP)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--site-rate", type=int, default=500, help="msgs/s each site accepts")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--workdir", default=None, help="parent of the work directory (a disk)")
    p.add_argument("--until-injected", action="store_true",
                   help="stop once everything is injected (the queue at its peak: memory "
                        "per queued message) instead of waiting for the queue to drain")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--record", action="store_true", help="append a section to RESULTS.md")
    args = p.parse_args(argv)
    if not (1 <= args.sites <= 20 and 0 <= args.http_share <= 1 and args.messages >= 1000
            and args.site_rate >= 1 and 1 <= args.interval <= 60
            and 10 <= args.timeout <= 86400):
        p.error("out of range: --sites 1..20, --http-share 0..1, --messages >= 1000, "
                "--site-rate >= 1, --interval 1..60, --timeout 10..86400")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_http = int(args.messages * args.http_share)
    n_smtp = args.messages - n_http
    work = Path(tempfile.mkdtemp(prefix="mta-burst-", dir=args.workdir))
    procs: list[subprocess.Popen] = []
    samples: list[dict] = []
    failed = ""
    injected_at = None
    start_wall = datetime.datetime.now(datetime.timezone.utc)
    try:
        sink_ports = []
        for i in range(args.sites):
            port = free_port()
            out = open(work / f"sink{i}.out", "wb")
            procs.append(subprocess.Popen([tool("smtp-sink"), "-u", "nobody",
                                           f"127.0.0.1:{port}", "1000"],
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            sink_ports.append(port)
        smtp_port, http_port, admin_port = free_port(), free_port(), free_port()
        (work / "mta.toml").write_text(config(work, smtp_port, http_port, admin_port,
                                              sink_ports, args.site_rate))
        log = open(work / "mta.log", "wb")
        mta = subprocess.Popen([sys.executable, "-m", "mta", "serve", "-c",
                                str(work / "mta.toml")], stdout=log, stderr=subprocess.STDOUT,
                               cwd=REPO, start_new_session=True)
        procs.append(mta)

        def alive():
            if mta.poll() is not None:
                raise RuntimeError(f"mta exited {mta.returncode}")
        wait_banner(smtp_port, alive, READY_TIMEOUT_S)
        for port in sink_ports:
            wait_banner(port, lambda: None, READY_TIMEOUT_S)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                base = metrics(admin_port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

        idle_rss, idle_anon = tree_memory(mta.pid)
        samples.append({"t": 0.0, "smtp": 0, "http": 0, "delivered": 0, "queued": 0,
                        "disk": dir_bytes(work / "state"), "rss": idle_rss, "anon": idle_anon})
        t0 = time.monotonic()
        sources, wrks = [], []
        for i in range(args.sites):
            share = n_smtp // args.sites + (1 if i < n_smtp % args.sites else 0)
            if share:
                sources.append(subprocess.Popen(
                    [tool("smtp-source"), "-s", str(SESSIONS), "-m", str(share), "-l", "2048",
                     "-d", "-f", "sender@example.com", "-t", f"rcpt@site{i}.example",
                     f"127.0.0.1:{smtp_port}"], stdout=subprocess.DEVNULL,
                    stderr=open(work / f"source{i}.err", "wb"), start_new_session=True))
            if n_http:
                body = work / f"body{i}.json"
                body.write_bytes(http_body(f"site{i}.example"))
                wrks.append(subprocess.Popen(
                    ["wrk", "-t", "1", "-c", str(WRK_CONNECTIONS), "-d", f"{int(args.timeout)}s",
                     "-s", str(HERE / "http_post.lua"),
                     f"http://127.0.0.1:{http_port}/api/v1/transmissions"],
                    stdout=open(work / f"wrk{i}.out", "wb"), stderr=subprocess.STDOUT,
                    env={**os.environ, "WRK_BODY_FILE": str(body)}, start_new_session=True))
        procs += sources + wrks
        while True:
            time.sleep(args.interval)
            now = time.monotonic() - t0
            m = metrics(admin_port)
            s = {"t": round(now, 1),
                 "smtp": int(m.get("mta_smtp_messages_accepted_total", 0)
                             - base.get("mta_smtp_messages_accepted_total", 0)),
                 "http": int(m.get("mta_http_messages_accepted_total", 0)
                             - base.get("mta_http_messages_accepted_total", 0)),
                 "delivered": int(m.get("mta_delivery_outcomes_total", 0)
                                  - base.get("mta_delivery_outcomes_total", 0)),
                 "queued": int(m.get("mta_spool_queue_messages", 0)),
                 "disk": dir_bytes(work / "state")}
            s["rss"], s["anon"] = tree_memory(mta.pid)
            samples.append(s)
            if wrks and s["http"] >= n_http:
                for w in wrks:
                    if w.poll() is None:
                        w.send_signal(signal.SIGINT)
                wrks = []
            sent = all(x.poll() is not None for x in sources) and not wrks
            for x in sources:
                if x.poll() not in (None, 0):
                    raise RuntimeError(f"smtp-source exited {x.returncode}")
            print(f"{s['t']:7.1f} s  smtp {s['smtp']:>9,}  http {s['http']:>9,}  delivered "
                  f"{s['delivered']:>9,}  queued {s['queued']:>9,}  anon {s['anon'] / 2**20:6.0f} MiB  "
                  f"rss {s['rss'] / 2**20:7.0f} MiB  disk {s['disk'] / 2**20:7.0f} MiB", flush=True)
            if sent and injected_at is None:
                injected_at = now
                if args.until_injected:
                    break
            if sent and s["queued"] == 0 and s["delivered"] >= s["smtp"] + s["http"]:
                break
            if now > args.timeout:
                failed = f"not done after {args.timeout:.0f} s"
                break
            alive()
    except Exception as exc:   # reported, then everything we started is stopped
        failed = f"{type(exc).__name__}: {exc}"
    finally:
        for x in reversed(procs):
            if x.poll() is None:
                stop_child(x)
    text = report(args, samples, injected_at, failed, start_wall)
    print(text)
    if args.record:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(text)
    if args.keep or failed:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def report(args, samples: list[dict], injected_at, failed: str, start) -> str:
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    lines = ["", f"## Sustained burst (issue 15, item 6) — {start:%Y-%m-%d %H:%M} UTC", "",
             f"`.venv/bin/python bench/burst.py --messages {args.messages} --http-share "
             f"{args.http_share:g} --sites {args.sites} --site-rate {args.site_rate}"
             f"{' --until-injected' if args.until_injected else ''}` "
             f"(mta at {rev}; inside `unshare --net`). {args.sites} sites, one smtp-sink "
             f"each, the mta shaping each to {args.site_rate} msgs/s; per site one "
             f"smtp-source ({SESSIONS} sessions) and one wrk ({WRK_CONNECTIONS} connections), "
             "2 KB single-recipient messages.", ""]
    if failed:
        lines += [f"**Run failed: {failed}.**", ""]
    if not samples:
        return "\n".join(lines) + "\n"
    last = samples[-1]
    accepted = last["smtp"] + last["http"]
    idle = samples[0]
    lines += ["| t (s) | accepted SMTP | accepted HTTP | injection msgs/s (interval) | "
              "delivered | queued | anonymous memory, all processes | resident incl. "
              "file-backed | spool on disk |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    prev_t, prev_n = 0.0, 0
    step = max(1, len(samples) // 40)
    for k, s in enumerate(samples):
        n = s["smtp"] + s["http"]
        rate = (n - prev_n) / max(1e-9, s["t"] - prev_t)
        prev_t, prev_n = s["t"], n
        if k % step == 0 or k == len(samples) - 1:
            lines.append(f"| {s['t']:.0f} | {s['smtp']:,} | {s['http']:,} | {rate:,.0f} | "
                         f"{s['delivered']:,} | {s['queued']:,} | {s['anon'] / 2**20:,.0f} MiB"
                         f" | {s['rss'] / 2**20:,.0f} MiB | {s['disk'] / 2**20:,.0f} MiB |")
    inj = [s for s in samples if injected_at is None or s["t"] <= injected_at]
    if len(inj) >= 4:
        q = len(inj) // 4
        def rate_of(a, b):
            return ((b["smtp"] + b["http"]) - (a["smtp"] + a["http"])) / max(1e-9, b["t"] - a["t"])
        first = rate_of({"t": 0.0, "smtp": 0, "http": 0}, inj[q])
        lastq = rate_of(inj[-q - 1], inj[-1])
        lines += ["", f"Injection rate, first quarter of the injection {first:,.0f} msgs/s, "
                  f"last quarter {lastq:,.0f} msgs/s (ratio {lastq / max(first, 1e-9):.2f})."]
    if args.until_injected:
        per = (last["anon"] - idle["anon"]) / max(1, last["queued"])
        lines += ["", f"Stopped once everything was injected (`--until-injected`): "
                  f"{last['queued']:,} messages queued, anonymous memory of all mta processes "
                  f"{idle['anon'] / 2**20:,.0f} MiB before the injection and "
                  f"{last['anon'] / 2**20:,.0f} MiB at the end: **{per:,.0f} B per queued "
                  f"message** (single-recipient).", ""]
        return "\n".join(lines) + "\n"
    lines += ["", f"Accepted {accepted:,} (SMTP {last['smtp']:,}, HTTP {last['http']:,}); "
              f"delivered {last['delivered']:,}; "
              f"{'injection done at ' + format(injected_at, '.0f') + ' s; ' if injected_at else ''}"
              f"queue empty at {last['t']:.0f} s" + ("" if not failed else " (not reached)") +
              f"; peak anonymous memory of all mta processes "
              f"{max(s['anon'] for s in samples) / 2**20:,.0f} MiB (resident with file-backed "
              f"pages {max(s['rss'] for s in samples) / 2**20:,.0f} MiB); peak spool on disk {max(s['disk'] for s in samples) / 2**20:,.0f} MiB.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
