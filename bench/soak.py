#!/usr/bin/env python3
"""Chaos soak (issue 13): mixed SMTP and HTTP injection at a steady rate while a random
process of the daemon -- acceptor, spool shard, delivery process, HTTP front, and now and
then the whole tree -- is killed with SIGKILL every few seconds; then the books are checked.

    python bench/soak.py --duration 1800 --record        # the 30-minute run
    python bench/soak.py --duration 120 --json out.json  # the short one (CI runs it)

What runs (everything on loopback, bounded in count and time):

- ``mta serve`` from this checkout, in its own session, with one static route ``*`` to the
  sink (an IP literal: no DNS), ``delivery.time_scale`` small so that retries and
  expirations happen within the run, and short delivery timeouts;
- the sink: this file's asyncio SMTP server (``soak.py sink``, its own process, never
  killed).  What it answers depends on the recipient's local part: ``ok.*`` accepted,
  ``defer.*`` 451 at the first RCPT and accepted on retry, ``bounce.*`` 550, ``never.*``
  always 451 (they expire after ``max_age``); anything else (the DSNs to the sender)
  accepted.  It logs every completed transaction: start (MAIL), end (after its 250), the
  queue id from the mta's Received header and the recipients;
- the injectors: ``--smtp-clients`` smtplib sessions and ``--http-clients`` HTTP clients
  (``POST /api/v1/transmissions``), paced to ``--rate`` messages per second in all, each
  message 1-3 recipients of mixed kinds over three recipient domains; every recipient
  address is unique in the run.  They record what was acknowledged (SMTP 250 after DATA
  with its queue id, HTTP 200 minus its ``rcpt_to_errors``), refused, or uncertain (the
  connection broke before the answer);
- the killer: every ``--kill-interval`` seconds one random child of the supervisor gets
  SIGKILL (the supervisor restarts it); every ``--tree-every``-th kill is the whole process
  group instead, after which the harness restarts ``mta serve`` on the same state;
- the sampler: every ``--sample-interval`` seconds the RSS and open file descriptors of
  every process of the tree (``/proc/PID/status``, ``/proc/PID/fd``).

At the end injection and kills stop, the queue is drained (every recipient received has
a terminal event and ``mta queue --json`` says 0; bounded by ``--drain-timeout``), the
daemon is stopped with SIGTERM, and the event log, the acknowledgements and the sink's
log are compared:

- **lost**: an acknowledged recipient with no terminal event (delivery, bounce,
  expiration), or a delivery event the sink never saw -- must be 0;
- **terminal events**: every recipient the spool received (acknowledged or not) has
  exactly one, of the kind its local part asks for;
- **duplicates**: (queue id, recipient) received by the sink more than once; each must have
  been *in flight* at a kill of a delivery process, a spool shard or the tree (its
  transaction at the sink started before the kill or at most ``--in-flight-window`` s
  after it, and its delivery was not yet in the event log), and their number at most the
  count of such in-flight deliveries;
- **resources**: RSS and descriptors of the tree idle before the load and idle after the
  drain, and per process that lived through several samples: first / last / max.

Files in the run directory (``--workdir``, kept with ``--keep``): ``mta.toml``, ``mta.log``,
``state/`` (with ``log/events.jsonl``), ``acks.jsonl`` (one line per injected recipient),
``sink.log``, ``kills.jsonl``, ``samples.jsonl``, ``report.json``.

The sink is also this file: ``python bench/soak.py sink --listen HOST:PORT --log FILE``.
Standard library only.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/, for loadlib

from loadlib.common import LOOPBACK, REPO, free_port, tail, wait_banner  # noqa: E402
from loadlib.netns import enter_private_netns  # noqa: E402
from loadlib.procs import kill_leftovers, process_tree, read_procs, stop_child  # noqa: E402
from loadlib.report import append_results, machine  # noqa: E402
from loadlib.revision import source_revision  # noqa: E402

SENDER = "soak@sender.soak.test"
DOMAINS = ["a.soak.test", "b.soak.test", "c.soak.test"]
# Recipient kinds and their share of the recipients; what the sink does with each.
KINDS = [("ok", 0.70), ("defer", 0.15), ("bounce", 0.10), ("never", 0.05)]
EXPECTED = {"ok": "delivery", "defer": "delivery", "bounce": "bounce", "never": "expiration"}
# SparkPost's names; an expiry is a bounce whose reason names it ("expiration" in the books)
TERMINAL = ("delivery", "bounce", "expiration")
EXPIRY_REASON = "[internal] message expired"
# Roles whose death can repeat a delivery (the outcome of a finished transaction may not
# have reached the spool's disk yet).
REPEATING_ROLES = ("delivery", "spool", "tree")

QUEUED_RE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]{20})")
RECEIVED_QID_RE = re.compile(rb"^Received: [^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*?[ \t]*by \S+ "
                             rb"\(mta\) with [A-Z]+ id ([0-9A-F]{20})[;\r\n]")
MESSAGE_ID_RE = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.M | re.I)
READY_S = 60.0
EMPTY_CONFIRM_S = 10.0   # the drain: the queue empty this long ends it, events or not
STOP_S = 30.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def toml_str(s: str) -> str:
    return json.dumps(s)


# ------------------------------------------------------------------------------------------
# The sink (a subcommand, run in its own process)


def run_sink(listen: str, log_path: str) -> None:
    host, port = listen.rsplit(":", 1)
    out = open(log_path, "a", buffering=1)
    deferred: set[str] = set()     # defer.* addresses already answered 451 once

    def rcpt_reply(addr: str) -> tuple[bytes, bool]:
        local = addr.split("@", 1)[0].lower()
        kind = local.split(".", 1)[0]
        if kind == "bounce":
            return b"550 5.1.1 <%s>: no such user\r\n" % addr.encode(), False
        if kind == "never":
            return b"451 4.3.2 <%s>: try again later (never)\r\n" % addr.encode(), False
        if kind == "defer" and addr not in deferred:
            deferred.add(addr)
            return b"451 4.7.1 <%s>: greylisted, try again\r\n" % addr.encode(), False
        return b"250 2.1.5 Ok\r\n", True

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        rcpts: list[str] = []
        started = 0.0
        try:
            writer.write(b"220 soak-sink ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-soak-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250-SMTPUTF8\r\n250 SIZE 104857600\r\n")
                elif verb == b"HELO":
                    writer.write(b"250 soak-sink\r\n")
                elif verb == b"MAIL":
                    rcpts, started = [], time.time()
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    m = re.match(rb"RCPT TO:\s*<([^>]*)>", line, re.I)
                    addr = m.group(1).decode("utf-8", "replace") if m else ""
                    reply, ok = rcpt_reply(addr)
                    if ok:
                        rcpts.append(addr)
                    writer.write(reply)
                elif verb == b"DATA":
                    if not rcpts:
                        writer.write(b"554 5.5.1 no valid recipients\r\n")
                        await writer.drain()
                        continue
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await writer.drain()
                    head = b""
                    while True:
                        data = await reader.readline()
                        if not data:
                            return      # cut before the end: not received
                        if data == b".\r\n":
                            break
                        if len(head) < 4096:
                            head += data
                    m = RECEIVED_QID_RE.match(head)
                    if m:
                        qid = m.group(1).decode()
                    else:   # a DSN made by the mta itself: no Received; its Message-ID
                        m = MESSAGE_ID_RE.search(head)
                        qid = "mid:" + m.group(1).decode("ascii", "replace") if m else "-"
                    writer.write(b"250 2.0.0 Ok: stored\r\n")
                    await writer.drain()
                    out.write(f"D {started:.6f} {time.time():.6f} {qid} {','.join(rcpts)}\n")
                    rcpts = []
                elif verb in (b"RSET", b"NOOP"):
                    rcpts = [] if verb == b"RSET" else rcpts
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
            writer.close()

    async def main():
        server = await asyncio.start_server(session, host, int(port), limit=1 << 20,
                                            backlog=512)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())
    out.close()


class Sink:
    def __init__(self, rundir: Path):
        self.port = free_port()
        self.log = rundir / "sink.log"
        self.out = rundir / "sink.out"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "sink", "--listen",
                 f"{LOOPBACK}:{self.port}", "--log", str(self.log)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_banner(self.port, self.alive)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"sink exited with {self.proc.returncode}: {tail(self.out)}")

    def records(self) -> list[tuple[float, float, str, list[str]]]:
        """(start, end, queue id, recipients) of every transaction completed."""
        out = []
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) == 5 and parts[0] == "D":
                out.append((float(parts[1]), float(parts[2]), parts[3], parts[4].split(",")))
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc, STOP_S)
            self.proc = None


# ------------------------------------------------------------------------------------------
# The daemon


HOOK_TYPES = ("injection", "delivery", "delay", "bounce")
HOOK_FAIL_SHARE = 0.05      # POSTs the webhook receiver answers 500 (retried, same batch)
HOOK_WAIT_S = 120.0         # after the drain: how long the webhooks may take to catch up


class Hooks:
    """The webhook receiver: an HTTP server on loopback that answers 500 to a share of
    the POSTs (seeded) and records every batch it took in ``webhook.jsonl`` (batch id,
    a hash of the body, the event ids and types); a retried batch must come back with
    the same body."""

    def __init__(self, rundir: Path, seed: int):
        self.path = rundir / "webhook.jsonl"
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.posts = self.failed = self.taken = 0
        self.bodies: dict[str, str] = {}     # batch id -> body hash (first POST)
        self.changed: list[str] = []         # batch ids that came back with another body
        self.ids: set[str] = set()
        self.events = 0
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                bid = self.headers.get("X-MessageSystems-Batch-ID", "")
                digest = hashlib.sha256(body).hexdigest()
                with hooks.lock:
                    hooks.posts += 1
                    first = hooks.bodies.setdefault(bid, digest)
                    if first != digest:
                        hooks.changed.append(bid)
                    fail = hooks.rng.random() < HOOK_FAIL_SHARE
                    if fail:
                        hooks.failed += 1
                    else:
                        try:
                            evs = [el["msys"]["message_event"] for el in json.loads(body)]
                        except (ValueError, KeyError, TypeError):
                            evs = []
                        hooks.taken += 1
                        hooks.events += len(evs)
                        hooks.ids.update(e.get("event_id", "") for e in evs)
                        with open(hooks.path, "a") as f:
                            f.write(json.dumps({"batch": bid, "sha256": digest,
                                                "ids": [e.get("event_id") for e in evs],
                                                "types": [e.get("type") for e in evs]}) + "\n")
                code = 500 if fail else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{LOOPBACK}:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="hooks")
        self.thread.start()

    def missing(self, log_path: Path) -> list[str]:
        """Event ids of the event log (of HOOK_TYPES) the receiver has not taken yet."""
        want = set()
        try:
            data = log_path.read_bytes()
        except FileNotFoundError:
            return []
        for line in data.splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue                       # a torn last line
            if e.get("type") in HOOK_TYPES:
                want.add(e["event_id"])
        with self.lock:
            return sorted(want - self.ids)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def config_text(state: Path, smtp_port: int, http_port: int, sink_port: int, args,
                hook_url: str = "") -> str:
    d = {
        "hold": False, "processes": args.delivery_processes, "time_scale": args.time_scale,
        "max_age": args.max_age, "connect_timeout": 5.0, "command_timeout": 10.0,
        "data_timeout": 20.0, "job_timeout_margin": 5.0, "idle_timeout": 2.0,
        "connection_limit": 5,
    }
    lines = ["[server]", f"state_dir = {toml_str(str(state))}", 'hostname = "mta.soak.test"',
             "shutdown_timeout = 5.0", "restart_backoff_max = 1.0", "",
             "[smtp]", f"listen = [{toml_str(f'{LOOPBACK}:{smtp_port}')}]",
             f"acceptors = {args.acceptors}", "spool_timeout = 3.0", "",
             "[http]", f"listen = [{toml_str(f'{LOOPBACK}:{http_port}')}]", "",
             "[spool]", f"shards = {args.shards}", "min_free_bytes = 0",
             "segment_size = 1048576", "",
             "[delivery]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in d.items()]
    lines += ["", "[[delivery.route]]", 'domain = "*"',
              f"hosts = [{toml_str(f'{LOOPBACK}:{sink_port}')}]", 'starttls = "none"']
    if hook_url:
        # every event pushed to the receiver; retries 100 x faster than in production
        lines += ["", "[webhooks]", "time_scale = 0.01", "poll_interval = 0.2", "",
                  "[[webhook]]", 'name = "soak"', f"target = {toml_str(hook_url)}",
                  "events = [" + ", ".join(toml_str(t) for t in HOOK_TYPES) + "]"]
    for extra in args.mta_config_extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


class Daemon:
    """`python -m mta serve -c CONFIG` from this checkout, in its own session (so that the
    whole tree is one process group, killed with one killpg of the supervisor's PID)."""

    def __init__(self, rundir: Path, config: str, smtp_port: int, http_port: int):
        self.rundir = rundir
        self.config = rundir / "mta.toml"
        self.config.write_text(config)
        self.log = rundir / "mta.log"
        self.state = rundir / "state"
        self.events_path = self.state / "log" / "events.jsonl"
        self.port, self.http_port = smtp_port, http_port
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.snapshots: list[dict] = []   # process trees seen, for the final cleanup

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start(self) -> None:
        self.state.mkdir(exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "-c",
                                          str(self.config)], cwd=REPO, env=self.env(),
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        wait_banner(self.port, self.alive, READY_S)
        deadline = time.monotonic() + READY_S
        while len(self.children()) < self.expected_children:
            if time.monotonic() > deadline:
                raise RuntimeError(f"children {sorted(self.children())} after {READY_S} s")
            time.sleep(0.1)

    expected_children = 0

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mta exited with {self.proc.returncode}:\n{tail(self.log)}")

    def children(self) -> dict[str, int]:
        """Process title ('spool[0]') -> PID of the supervisor's live children."""
        out = {}
        if self.proc is None:
            return out
        for pid, (ppid, _start, _ticks) in read_procs().items():
            if ppid != self.proc.pid:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith("mta: "):
                out[title[5:].strip()] = pid
        return out

    def kill_tree(self) -> None:
        """SIGKILL the supervisor's process group (ours: it was started in its own session),
        and wait until nothing of it is left."""
        snap = process_tree(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        kill_leftovers(snap)

    def cli(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        env = {**self.env(), "MTA_CONFIG": str(self.config)}
        return subprocess.run([sys.executable, "-m", "mta", *argv], capture_output=True,
                              timeout=timeout, env=env, cwd=REPO)

    def queue_count(self) -> int | None:
        try:
            r = self.cli("queue", "--json", timeout=30)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        try:
            data = json.loads(r.stdout)
        except ValueError:
            return None
        return data.get("total", {}).get("messages")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        snap = process_tree(self.proc.pid)
        stop_child(self.proc, STOP_S)
        killed = kill_leftovers(snap)
        if killed:
            log(f"killed leftover mta processes {killed}")
        rc, self.proc = self.proc.returncode, None
        return rc


# ------------------------------------------------------------------------------------------
# The injectors


class Books:
    """What the injectors were told, one entry per recipient address (unique in the run)."""

    def __init__(self, path: Path):
        self.lock = threading.Lock()
        self.rcpts: dict[str, dict] = {}
        self.out = open(path, "w", buffering=1)
        self.seq = 0
        self.messages = Counter()

    def next_id(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def record(self, channel: str, addrs: list[str], status: str, qid: str = "",
               detail: str = "") -> None:
        with self.lock:
            self.messages[f"{channel}:{status}"] += 1
            for a in addrs:
                entry = {"rcpt": a, "channel": channel, "status": status, "qid": qid,
                         "detail": detail[:200]}
                self.rcpts[a] = entry
                self.out.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        self.out.close()


def pick_recipients(rng: random.Random, channel: str, n: int) -> list[str]:
    out = []
    for _ in range(rng.randint(1, 3)):
        r, acc = rng.random(), 0.0
        kind = KINDS[-1][0]
        for k, share in KINDS:
            acc += share
            if r < acc:
                kind = k
                break
        out.append(f"{kind}.{channel}{n}x{len(out)}@{rng.choice(DOMAINS)}")
    return out


class Pacer:
    """One injector's share of --rate: a fixed interval, no catch-up burst."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    def wait(self, stop: threading.Event) -> bool:
        now = time.monotonic()
        if self.next < now - 1.0:
            self.next = now
        delay = self.next - now
        self.next += self.interval
        return not stop.wait(delay) if delay > 0 else not stop.is_set()


def smtp_injector(idx: int, port: int, rate: float, books: Books, stop: threading.Event,
                  seed: int) -> None:
    rng = random.Random(seed)
    pacer = Pacer(rate)
    s: smtplib.SMTP | None = None
    while pacer.wait(stop):
        if s is None:
            try:
                s = smtplib.SMTP(LOOPBACK, port, local_hostname="soak.test", timeout=15)
                s.ehlo()
            except (OSError, smtplib.SMTPException):
                s = None
                stop.wait(0.5)
                continue
        n = books.next_id()
        rcpts = pick_recipients(rng, "s", n)
        msg = (f"From: <{SENDER}>\r\nTo: soak\r\nSubject: soak {n}\r\nX-Soak: s{n}\r\n\r\n"
               + f"soak message s{n}\r\n" * 20).encode()
        accepted: list[str] = []
        try:
            code, text = s.mail(SENDER)
            if code != 250:
                books.record("smtp", rcpts, "refused", detail=f"MAIL {code} {text!r}")
                s.rset()
                continue
            for r in rcpts:
                code, text = s.rcpt(r)
                if code == 250:
                    accepted.append(r)
                else:
                    books.record("smtp", [r], "refused", detail=f"RCPT {code} {text!r}")
            if not accepted:
                s.rset()
                continue
            code, text = s.data(msg)
        except smtplib.SMTPDataError as exc:
            books.record("smtp", accepted, "refused", detail=f"DATA {exc.smtp_code}")
            continue
        except (OSError, smtplib.SMTPException) as exc:
            # The connection broke before the answer: maybe queued, maybe not.
            books.record("smtp", accepted or rcpts, "uncertain", detail=repr(exc))
            try:
                s.close()
            except OSError:
                pass
            s = None
            continue
        m = QUEUED_RE.search(text.decode("utf-8", "replace"))
        if code == 250 and m:
            books.record("smtp", accepted, "acked", qid=m.group(1))
        else:
            books.record("smtp", accepted, "refused", detail=f"DATA {code} {text!r}")
    if s is not None:
        try:
            s.quit()
        except (OSError, smtplib.SMTPException):
            pass


def http_injector(idx: int, port: int, rate: float, books: Books, stop: threading.Event,
                  seed: int) -> None:
    rng = random.Random(seed)
    pacer = Pacer(rate)
    conn: http.client.HTTPConnection | None = None
    while pacer.wait(stop):
        n = books.next_id()
        rcpts = pick_recipients(rng, "h", n)
        body = json.dumps({
            "recipients": [{"address": r} for r in rcpts],
            "content": {"from": SENDER, "subject": f"soak h{n}",
                        "text": f"soak message h{n}\n" * 20},
            "metadata": {"soak": n}}).encode()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(LOOPBACK, port, timeout=15)
            conn.request("POST", "/api/v1/transmissions", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        except ConnectionRefusedError as exc:    # nothing was sent
            books.record("http", rcpts, "refused", detail=repr(exc))
            conn = None
            stop.wait(0.2)
            continue
        except (OSError, http.client.HTTPException) as exc:
            books.record("http", rcpts, "uncertain", detail=repr(exc))
            if conn is not None:
                conn.close()
            conn = None
            stop.wait(0.2)
            continue
        try:
            doc = json.loads(data)
        except ValueError:
            books.record("http", rcpts, "uncertain", detail=f"{status} not JSON {data[:100]!r}")
            continue
        if status != 200:
            books.record("http", rcpts, "refused", detail=f"{status} {data[:150]!r}")
            continue
        res = doc.get("results", {})
        bad: dict[int, str] = {}
        for e in res.get("rcpt_to_errors", []):
            m = re.match(r"recipients\[(\d+)\]", e.get("description", ""))
            if m:
                bad[int(m.group(1))] = str(e.get("code"))
            else:       # an error we cannot place: all of it is uncertain
                bad = {i: "?" for i in range(len(rcpts))}
                break
        ok = [r for i, r in enumerate(rcpts) if i not in bad]
        if len(ok) != res.get("total_accepted_recipients"):
            books.record("http", rcpts, "uncertain", detail=f"200 {data[:150]!r}")
            continue
        books.record("http", ok, "acked", qid=str(res.get("id", "")))
        for i, code in sorted(bad.items()):
            # 1901: the spool could not make it durable (a temporary failure)
            books.record("http", [rcpts[i]], "refused",
                         detail=f"rcpt_to_errors {'503' if code == '1901' else code}")
    if conn is not None:
        conn.close()


# ------------------------------------------------------------------------------------------
# The killer and the sampler


def role_of(title: str) -> str:
    return title.split("[", 1)[0]


class Killer:
    def __init__(self, daemon: Daemon, interval: float, tree_every: int, path: Path,
                 seed: int, roles: list[str] | None):
        self.d = daemon
        self.interval = interval
        self.tree_every = tree_every
        self.rng = random.Random(seed)
        self.roles = roles
        self.kills: list[dict] = []
        self.out = open(path, "w", buffering=1)
        self.errors: list[str] = []
        self.lock = threading.Lock()    # held while the tree is down / restarting

    def run(self, stop: threading.Event) -> None:
        n = 0
        while not stop.wait(self.interval):
            n += 1
            try:
                if self.tree_every and n % self.tree_every == 0:
                    self.kill_tree()
                else:
                    self.kill_one()
            except Exception as exc:   # noqa: BLE001 -- reported, and the run fails
                self.errors.append(f"{type(exc).__name__}: {exc}")
                log(f"killer: {exc}")
                return

    def kill_one(self) -> None:
        kids = self.d.children()
        if self.roles:
            kids = {t: p for t, p in kids.items() if role_of(t) in self.roles}
        if not kids:
            return      # all of them are being restarted just now
        title = self.rng.choice(sorted(kids))
        pid = kids[title]
        t = time.time()
        try:
            # still the supervisor's child we listed (not a reused PID)?
            if read_procs().get(pid, (None,))[0] != self.d.proc.pid:
                return
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        k = {"t": t, "role": role_of(title), "title": title, "pid": pid}
        self.kills.append(k)
        self.out.write(json.dumps(k) + "\n")

    def kill_tree(self) -> None:
        with self.lock:
            t = time.time()
            pid = self.d.proc.pid
            self.d.kill_tree()
            k = {"t": t, "role": "tree", "title": "tree", "pid": pid}
            self.kills.append(k)
            self.out.write(json.dumps(k) + "\n")
            self.d.start()
            k["restarted_after_s"] = round(time.time() - t, 3)

    def by_role(self) -> dict[str, int]:
        return dict(Counter(k["role"] for k in self.kills))


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(RSS in KiB, open descriptors) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(x.split()[1]) for x in f if x.startswith("VmRSS:")), 0)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return rss, fds


def sample_tree(d: Daemon) -> dict:
    """{'t', 'procs': {"title pid start": [rss_kib, fds]}} of the supervisor and children."""
    procs = {}
    if d.proc is not None:
        pid = d.proc.pid
        tree = process_tree(pid)
        titles = {p: t for t, p in d.children().items()}
        for p, (_ppid, start, _ticks) in tree.items():
            s = proc_sample(p)
            if s is None:
                continue
            title = "supervisor" if p == pid else titles.get(p, "other")
            procs[f"{title} {p} {start}"] = list(s)
    return {"t": time.time(), "procs": procs}


def tree_totals(sample: dict) -> tuple[int, int, int]:
    v = sample["procs"].values()
    return sum(x[0] for x in v), sum(x[1] for x in v), len(sample["procs"])


class Sampler:
    def __init__(self, daemon: Daemon, interval: float, path: Path, killer: Killer):
        self.d, self.interval, self.killer = daemon, interval, killer
        self.samples: list[dict] = []
        self.out = open(path, "w", buffering=1)

    def take(self, label: str = "") -> dict:
        with self.killer.lock:
            s = sample_tree(self.d)
        if label:
            s["label"] = label
        self.samples.append(s)
        self.out.write(json.dumps(s) + "\n")
        return s

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.take()


def resource_summary(samples: list[dict], idle_before: dict, idle_after: dict) -> dict:
    """Tree totals idle before / after, over the run (first, last, max), and per process
    that was seen in at least 3 samples."""
    run = [s for s in samples if not s.get("label")]
    totals = [tree_totals(s) for s in run] or [(0, 0, 0)]
    per: dict[str, list] = defaultdict(list)
    for s in run + [idle_after]:
        for key, v in s["procs"].items():
            per[key].append(v)
    survivors = {}
    for key, vs in per.items():
        if len(vs) >= 3:
            title, pid, _start = key.split(" ")
            survivors[f"{title} pid {pid}"] = {
                "samples": len(vs),
                "rss_kib": [vs[0][0], vs[-1][0], max(v[0] for v in vs)],
                "fds": [vs[0][1], vs[-1][1], max(v[1] for v in vs)]}
    b, a = tree_totals(idle_before), tree_totals(idle_after)
    return {
        "idle_before": {"rss_kib": b[0], "fds": b[1], "processes": b[2]},
        "idle_after": {"rss_kib": a[0], "fds": a[1], "processes": a[2]},
        "run_tree_rss_kib": [totals[0][0], totals[-1][0], max(x[0] for x in totals)],
        "run_tree_fds": [totals[0][1], totals[-1][1], max(x[1] for x in totals)],
        "samples": len(run),
        "survivors": survivors,
    }


# ------------------------------------------------------------------------------------------
# The books


def book_view(e: dict) -> dict:
    """A SparkPost-shaped event (the log's line) as the books read it.

    ``type``: SparkPost's, but an expiry (a bounce whose reason names it) is
    "expiration"; ``recipient``: ``raw_rcpt_to``; ``message_id``: the Message-ID
    header (``message_id_header``); ``sender``: ``msg_from``; ``timestamp``:
    ``event_time`` (Unix seconds with milliseconds; SparkPost's own is whole seconds).
    """
    kind = e.get("type")
    if kind == "bounce" and EXPIRY_REASON in e.get("raw_reason", ""):
        kind = "expiration"
    return {"type": kind, "event_id": e.get("event_id"), "queue_id": e.get("queue_id"),
            "recipient": e.get("raw_rcpt_to"), "message_id": e.get("message_id_header", ""),
            "sender": e.get("msg_from", ""),
            "timestamp": float(e.get("event_time") or e.get("timestamp") or 0.0)}


def read_events(path: Path) -> tuple[list[dict], int]:
    """The event log's lines as :func:`book_view`s, each event_id once (the events process
    delivers at least once: the same id twice is a replay after a restart, not a second
    event); a torn last line (a kill mid-write) is counted, not parsed."""
    out, torn = [], 0
    seen = set()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out, 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            e = book_view(json.loads(line))
        except ValueError:
            torn += 1
            continue
        if e["event_id"] in seen:
            continue
        seen.add(e["event_id"])
        out.append(e)
    return out, torn


class EventTail:
    """Follows the event log during the drain: the (queue id, recipient) pairs received and
    those with a terminal event, reading only what was appended since the last look."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.received: set[tuple] = set()
        self.terminal: set[tuple] = set()

    def poll(self) -> int:
        """Read what is new; the number of received pairs without a terminal event."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1      # whole lines only
        self.offset += end
        for line in data[:end].splitlines():
            try:
                e = book_view(json.loads(line))
            except ValueError:
                continue
            key = (e.get("queue_id"), e.get("recipient"))
            if e.get("type") == "injection":
                self.received.add(key)
            elif e.get("type") in TERMINAL:
                self.terminal.add(key)
        return len(self.received - self.terminal)


def drained(d: Daemon, tail_: EventTail, empty_since: list) -> tuple[bool, int, int | None]:
    """(done, received recipients without a terminal event, mta queue count).

    Done when every received recipient has its terminal event and the queue is empty; or
    when the queue has been empty for EMPTY_CONFIRM_S although some events are still
    missing (they will not come: the books report them)."""
    open_ = tail_.poll()
    q = d.queue_count()
    if q != 0:
        empty_since.clear()
        return False, open_, q
    if not open_:
        return True, open_, q
    if not empty_since:
        empty_since.append(time.monotonic())
    return time.monotonic() - empty_since[0] >= EMPTY_CONFIRM_S, open_, q


def analyse(books: Books, events: list[dict], sink_recs, kills: list[dict],
            window: float = 1.0) -> dict:
    acked = {a: e for a, e in books.rcpts.items() if e["status"] == "acked"}
    uncertain = {a for a, e in books.rcpts.items() if e["status"] == "uncertain"}
    refused = {a for a, e in books.rcpts.items() if e["status"] == "refused"}

    received: dict[tuple, float] = {}      # (qid, rcpt) -> injection time
    terminal: dict[tuple, list[dict]] = defaultdict(list)
    by_type = Counter()
    for e in events:
        t = e.get("type")
        by_type[t] += 1
        key = (e.get("queue_id"), e.get("recipient"))
        if t == "injection":
            received.setdefault(key, e.get("timestamp", 0.0))
        elif t in TERMINAL:
            terminal[key].append(e)
    qids_of = defaultdict(set)                 # injected address -> queue ids it was queued under
    for (qid, rcpt) in set(received) | set(terminal):
        if rcpt in books.rcpts:
            qids_of[rcpt].add(qid)

    qid_of_mid = {e["message_id"]: e.get("queue_id") for e in events
                  if e.get("message_id") and (e.get("type") == "injection"
                                              or e.get("type") in TERMINAL)}
    sink_count = Counter()
    sink_first: dict[tuple, tuple[float, float]] = {}
    for start, end, qid, rcpts in sink_recs:
        if qid.startswith("mid:"):
            qid = qid_of_mid.get(qid[4:], qid)
        for r in rcpts:
            sink_count[(qid, r)] += 1
            sink_first.setdefault((qid, r), (start, end))

    # Messages a DSN was made for: its Message-ID starts with "<QID." of the original.
    dsn_for = {m.group(1) for m in (re.match(r"<([0-9A-F]{20})\.", e.get("message_id", ""))
                                    for e in events if e.get("sender") == "") if m}
    dsn_for |= {m.group(1) for m in (re.match(r"mid:<([0-9A-F]{20})\.", q)
                                     for _s, _e, q, _r in sink_recs) if m}
    problems: dict[str, list] = defaultdict(list)
    # Acknowledged recipients: exactly one queue id, exactly one terminal event of the
    # expected kind; a delivery the sink really got.
    for a, e in acked.items():
        qids = qids_of.get(a, set())
        if e["channel"] == "smtp" and e["qid"] and qids and e["qid"] not in qids:
            problems["acked under another queue id"].append(a)
        if not qids:
            problems["lost (acked, no event at all)"].append(a)
            continue
        if len(qids) > 1:
            problems["queued more than once"].append((a, sorted(qids)))
        for qid in qids:
            evs = terminal.get((qid, a), [])
            if not evs and (sink_count[(qid, a)] or (qid in dsn_for
                                                     and a.startswith(("bounce.", "never.")))):
                # delivered (or bounced: its DSN went out), and the spool knows it (it was
                # never tried again): the message is not lost, its terminal event is
                problems["terminal event missing (acked; at the sink, or its DSN)"].append(
                    (a, qid))
            elif not evs:
                problems["lost (acked, no terminal event)"].append((a, qid))
            elif len(evs) > 1:
                problems["more than one terminal event"].append((a, qid, [x["type"] for x in evs]))
            if (qid, a) not in received:
                problems["acked without an injection event"].append((a, qid))
    # Everything the spool received, acknowledged or not: exactly one terminal event, the
    # kind the address asks for; deliveries at the sink.
    for key in set(received) | set(terminal):
        qid, rcpt = key
        evs = terminal.get(key, [])
        if not evs:
            if rcpt not in acked:
                problems["received (not acked), no terminal event"].append(key)
            continue
        if len(evs) > 1 and rcpt not in acked:
            problems["more than one terminal event"].append((rcpt, qid, [x["type"] for x in evs]))
        kind = rcpt.split("@", 1)[0].split(".", 1)[0]
        want = EXPECTED.get(kind, "delivery")
        if evs[0]["type"] != want:
            problems["wrong terminal event"].append((rcpt, qid, evs[0]["type"], want))
        if evs[0]["type"] == "delivery" and sink_count[key] == 0:
            problems["lost (delivery event, never at the sink)"].append(key)
        if evs[0]["type"] != "delivery" and sink_count[key]:
            problems["at the sink, but the event says " + evs[0]["type"]].append(key)
    for key in sink_count:
        if key not in terminal:
            problems["at the sink, no terminal event"].append(key)
    # A 4xx is "not taken, try again", yet when the spool shard dies after its commit and
    # before its answer the acceptor can only say 451: the message is queued all the same
    # (like a connection that breaks after the commit).  Counted, not a failure; it must
    # still end like every other.  A 5xx refusal that was queued is a failure.
    tempfailed_queued = 0
    for a in refused:
        if qids_of.get(a):
            if re.match(r"(DATA|RCPT|MAIL) 4\d\d\b|(rcpt_to_errors )?(429|503)\b",
                        books.rcpts[a]["detail"]):
                tempfailed_queued += 1
            else:
                problems["refused (5xx), but queued"].append((a, sorted(qids_of[a])))

    # Duplicates and what was in flight at the kills that can repeat a delivery: a delivery
    # whose first transaction at the sink started no later than *window* s after the kill
    # (a job already handed to a delivery process goes on after its shard died; its
    # outcome has nowhere to go) and whose delivery event was written after the kill.
    dups = {k: n for k, n in sink_count.items() if n > 1}
    dup_extra = sum(n - 1 for n in dups.values())
    done_at = {k: min(x.get("timestamp", 0.0) for x in evs) for k, evs in terminal.items()
               if any(x["type"] == "delivery" for x in evs)}
    in_flight: set[tuple] = set()
    kill_times = sorted(k["t"] for k in kills if k["role"] in REPEATING_ROLES)
    if kill_times:
        import bisect
        for key, (start, _end) in sink_first.items():
            done = done_at.get(key, float("inf"))
            i = bisect.bisect_left(kill_times, start - window)
            if i < len(kill_times) and kill_times[i] <= done:
                in_flight.add(key)
    unexplained = [k for k in dups if k not in in_flight]
    if dup_extra > len(in_flight):
        problems["duplicates above the in-flight bound"].append((dup_extra, len(in_flight)))
    for k in unexplained:
        problems["duplicate not in flight at any kill"].append(k)

    missing_events = len(problems["terminal event missing (acked; at the sink, or its DSN)"])
    lost = (len(problems["lost (acked, no event at all)"])
            + len(problems["lost (acked, no terminal event)"])
            + len(problems["lost (delivery event, never at the sink)"]))
    outcome = Counter()
    for a in acked:
        for qid in qids_of.get(a, ()):
            evs = terminal.get((qid, a))
            if evs:
                outcome[evs[0]["type"]] += 1
    queued_unacked = sum(1 for a in uncertain if qids_of.get(a))
    return {
        "messages": dict(books.messages),
        "recipients": {"injected": len(books.rcpts), "acked": len(acked),
                       "acked_smtp": sum(1 for e in acked.values() if e["channel"] == "smtp"),
                       "acked_http": sum(1 for e in acked.values() if e["channel"] == "http"),
                       "refused": len(refused), "uncertain": len(uncertain),
                       "uncertain_but_queued": queued_unacked,
                       "tempfailed_but_queued": tempfailed_queued},
        "acked_outcomes": {t: outcome.get(t, 0) for t in TERMINAL},
        "events": dict(by_type),
        "sink": {"transactions": len(sink_recs), "deliveries": sum(sink_count.values()),
                 "distinct": len(sink_count)},
        "lost": lost,
        "missing_terminal_events": missing_events,
        "duplicates": dup_extra,
        "duplicate_pairs": len(dups),
        "in_flight_at_kills": len(in_flight),
        "problems": {k: v[:20] for k, v in problems.items() if v},
        "problem_counts": {k: len(v) for k, v in problems.items() if v},
    }


# ------------------------------------------------------------------------------------------
# The run


def soak(args, rundir: Path) -> dict:
    sink = Sink(rundir)
    hooks = Hooks(rundir, args.seed) if args.webhook else None
    smtp_port, http_port = free_port(), free_port()
    books = Books(rundir / "acks.jsonl")
    stop_inject, stop_chaos = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    daemon = None
    report: dict = {"errors": []}
    try:
        sink.start()
        daemon = Daemon(rundir, config_text(rundir / "state", smtp_port, http_port, sink.port,
                                            args, hooks.url if hooks else ""),
                        smtp_port, http_port)
        daemon.start()
        daemon.expected_children = len(daemon.children())
        log(f"mta up: {sorted(daemon.children())}; sink on {LOOPBACK}:{sink.port}")
        roles = args.roles.split(",") if args.roles else None
        killer = Killer(daemon, args.kill_interval, args.tree_every, rundir / "kills.jsonl",
                        args.seed, roles)
        sampler = Sampler(daemon, args.sample_interval, rundir / "samples.jsonl", killer)
        idle_before = sampler.take("idle-before")

        n_inj = args.smtp_clients + args.http_clients
        per = args.rate / max(1, n_inj)
        for i in range(args.smtp_clients):
            threads.append(threading.Thread(target=smtp_injector, name=f"smtp-{i}", daemon=True,
                                             args=(i, smtp_port, per, books, stop_inject,
                                                   args.seed * 1000 + i)))
        for i in range(args.http_clients):
            threads.append(threading.Thread(target=http_injector, name=f"http-{i}", daemon=True,
                                            args=(i, http_port, per, books, stop_inject,
                                                  args.seed * 1000 + 500 + i)))
        chaos = [threading.Thread(target=killer.run, args=(stop_chaos,), name="killer",
                                  daemon=True),
                 threading.Thread(target=sampler.run, args=(stop_chaos,), name="sampler",
                                  daemon=True)]
        t0 = time.time()
        for t in threads + chaos:
            t.start()
        while time.time() - t0 < args.duration:
            time.sleep(min(10.0, max(0.1, args.duration - (time.time() - t0))))
            log(f"{time.time() - t0:6.0f} s: {dict(books.messages)}; kills {killer.by_role()}")
            if killer.errors:
                break
        stop_inject.set()
        for t in threads:
            t.join(60)
        stop_chaos.set()
        for t in chaos:
            t.join(READY_S + 30)
        report["injected_s"] = round(time.time() - t0, 1)
        report["errors"] += killer.errors
        if any(t.is_alive() for t in threads + chaos):
            report["errors"].append("an injector or the killer did not finish")
        if daemon.proc is None or daemon.proc.poll() is not None:
            report["errors"].append("the supervisor is gone; restarting it for the drain")
            daemon.start()

        # Drain: every received recipient has its terminal event and the queue is empty.
        log("injection and kills stopped; draining")
        t1 = time.time()
        deadline = time.monotonic() + args.drain_timeout
        state = (False, -1, None)
        follow, empty_since = EventTail(daemon.events_path), []
        while time.monotonic() < deadline:
            state = drained(daemon, follow, empty_since)
            if state[0]:
                break
            time.sleep(1.0)
        report["drain_s"] = round(time.time() - t1, 1)
        if not state[0]:
            report["errors"].append(f"not drained in {args.drain_timeout} s: {state[1]} "
                                    f"recipients without a terminal event, mta queue {state[2]}")
        elif state[1]:
            log(f"the queue is empty, {state[1]} recipients without a terminal event")
        if hooks is not None:
            # Every event of the log reaches the webhook (at least once), across the kills.
            t2 = time.monotonic()
            missing = hooks.missing(daemon.events_path)
            while missing and time.monotonic() - t2 < HOOK_WAIT_S:
                time.sleep(1.0)
                missing = hooks.missing(daemon.events_path)
            with hooks.lock:
                report["webhook"] = {
                    "missing": len(missing), "missing_ids": missing[:10],
                    "posts": hooks.posts, "answered_500": hooks.failed,
                    "batches_taken": hooks.taken, "events_taken": hooks.events,
                    "distinct_events": len(hooks.ids), "changed_batches": len(hooks.changed),
                    "catch_up_s": round(time.monotonic() - t2, 1)}
            if missing:
                report["errors"].append(f"{len(missing)} events of the log never reached the "
                                        f"webhook in {HOOK_WAIT_S:.0f} s")
            if hooks.changed:
                report["errors"].append(f"{len(hooks.changed)} batch ids came back with "
                                        "another body")
        # Idle: delivery connections time out, then the idle sample.
        time.sleep(args.idle_wait)
        idle_after = sampler.take("idle-after")
        rc = daemon.stop()
        if rc != 0:
            report["errors"].append(f"mta serve exited {rc} after SIGTERM")
        daemon_log = daemon.log.read_text(errors="replace")
        tracebacks = daemon_log.count("Traceback (most recent call last)")
        events, torn = read_events(daemon.events_path)
        books.close()
        report.update(analyse(books, events, sink.records(), killer.kills,
                              args.in_flight_window))
        report["event_log_torn_lines"] = torn
        report["kills"] = killer.by_role()
        report["kills_total"] = len(killer.kills)
        report["tree_restarts"] = daemon.starts - 1
        report["resources"] = resource_summary(sampler.samples, idle_before, idle_after)
        report["tracebacks"] = tracebacks
        report["log_errors"] = sorted(set(
            re.sub(r"\d+", "N", x) for x in re.findall(r"^.* ERROR .*$", daemon_log, re.M)))[:30]
    finally:
        stop_inject.set()
        stop_chaos.set()
        if daemon is not None and daemon.proc is not None:
            daemon.stop()
        sink.stop()
        if hooks is not None:
            hooks.stop()
    return report


def ok(report: dict) -> bool:
    return (not report["errors"] and report.get("lost", 1) == 0
            and not report.get("problem_counts"))


def summary_lines(r: dict) -> list[str]:
    rc = r["recipients"]
    res = r["resources"]
    out = [
        f"- injected {rc['injected']} recipients ({r['messages']}); acknowledged {rc['acked']} "
        f"(SMTP {rc['acked_smtp']}, HTTP {rc['acked_http']}), refused {rc['refused']}, "
        f"uncertain {rc['uncertain']} (of which queued {rc['uncertain_but_queued']}); "
        f"answered 4xx but queued all the same {rc['tempfailed_but_queued']}",
        f"- acknowledged recipients' terminal events: delivered {r['acked_outcomes']['delivery']}, "
        f"bounced {r['acked_outcomes']['bounce']}, expired {r['acked_outcomes']['expiration']}; "
        f"**lost {r['lost']}**; delivered but no terminal event {r['missing_terminal_events']}",
        f"- event log: {r['events']}; torn lines {r['event_log_torn_lines']}",
        f"- sink: {r['sink']['transactions']} transactions, {r['sink']['deliveries']} "
        f"deliveries ({r['sink']['distinct']} distinct queue id + recipient)",
        f"- duplicates {r['duplicates']} ({r['duplicate_pairs']} pairs); deliveries in flight "
        f"at kills of delivery/spool/tree: {r['in_flight_at_kills']}",
        f"- kills {r['kills_total']} by role {r['kills']}; whole-tree restarts "
        f"{r['tree_restarts']}",
        f"- tree RSS KiB first/last/max over the run {res['run_tree_rss_kib']}, fds "
        f"{res['run_tree_fds']} ({res['samples']} samples); idle before "
        f"{res['idle_before']}, idle after the drain {res['idle_after']}",
        f"- drain {r.get('drain_s')} s; tracebacks in mta.log {r['tracebacks']}",
    ]
    if "webhook" in r:
        w = r["webhook"]
        out.append(f"- webhook: {w['distinct_events']} distinct events in {w['batches_taken']} "
                   f"batches ({w['posts']} POSTs, {w['answered_500']} answered 500 and "
                   f"retried); **missing {w['missing']}**; batches changed on retry "
                   f"{w['changed_batches']}; caught up {w['catch_up_s']} s after the drain")
    longest = sorted(res["survivors"].items(), key=lambda kv: -kv[1]["samples"])
    if len(longest) > 8:
        out.append(f"  - the 8 longest-lived of {len(longest)} processes seen in 3+ samples:")
    for name, v in longest[:8]:
        out.append(f"  - {name}: {v['samples']} samples, RSS KiB first/last/max {v['rss_kib']}, "
                   f"fds {v['fds']}")
    if r.get("problem_counts"):
        out.append(f"- PROBLEMS: {r['problem_counts']}")
        for k, v in r["problems"].items():
            out.append(f"  - {k}: {v[:5]}")
    if r["errors"]:
        out.append(f"- ERRORS: {r['errors']}")
    return out


def reanalyse(rundir: Path, window: float) -> int:
    """Print the books of a kept run directory (acks, event log, sink log, kills)."""
    books = Books(Path(os.devnull))
    for line in (rundir / "acks.jsonl").read_text().splitlines():
        e = json.loads(line)
        books.rcpts[e["rcpt"]] = e
    books.close()
    sink = Sink.__new__(Sink)
    sink.log = rundir / "sink.log"
    events, torn = read_events(rundir / "state" / "log" / "events.jsonl")
    kills = [json.loads(x) for x in (rundir / "kills.jsonl").read_text().splitlines()]
    r = analyse(books, events, sink.records(), kills, window)
    r["event_log_torn_lines"] = torn
    print(json.dumps(r, indent=1, default=str))
    return 0 if not r["problem_counts"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("sink", help="the deferring/bouncing asyncio sink (internal)")
    s.add_argument("--listen", required=True)
    s.add_argument("--log", required=True)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of injection [120]")
    p.add_argument("--rate", type=float, default=20.0,
                   help="messages per second, all injectors together [20]")
    p.add_argument("--smtp-clients", type=int, default=2)
    p.add_argument("--http-clients", type=int, default=2)
    p.add_argument("--kill-interval", type=float, default=2.0, help="seconds between kills [2]")
    p.add_argument("--tree-every", type=int, default=15,
                   help="every Nth kill is the whole process tree (0: never) [15]")
    p.add_argument("--roles", default="",
                   help="only these child roles, comma-separated (acceptor,spool,delivery,http)")
    p.add_argument("--sample-interval", type=float, default=5.0)
    p.add_argument("--in-flight-window", type=float, default=1.0,
                   help="a delivery whose transaction at the sink started up to this many "
                        "seconds after a kill (and was recorded after it) was in flight [1]")
    p.add_argument("--time-scale", type=float, default=0.01,
                   help="delivery.time_scale: retry_schedule x this [0.01]")
    p.add_argument("--max-age", type=float, default=3000.0,
                   help="delivery.max_age before time_scale [3000: 30 s at 0.01]")
    p.add_argument("--acceptors", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--delivery-processes", type=int, default=2)
    p.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--idle-wait", type=float, default=5.0,
                   help="seconds after the drain before the idle sample [5]")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--mta-config-extra", action="append", default=[],
                   help="TOML appended to the generated config (repeatable)")
    p.add_argument("--webhook", action="store_true",
                   help="push every event to a webhook receiver that answers 500 to 5 %% of "
                        "the POSTs, and check that each event of the log reached it")
    p.add_argument("--netns", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--record", action="store_true")
    p.add_argument("--note", default="")
    a = sub.add_parser("analyse", help="the books of a kept run directory, again")
    a.add_argument("rundir")
    a.add_argument("--in-flight-window", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.cmd == "sink":
        run_sink(args.listen, args.log)
        return 0
    if args.cmd == "analyse":
        return reanalyse(Path(args.rundir), args.in_flight_window)
    netns = enter_private_netns(args.netns)
    rundir = Path(tempfile.mkdtemp(prefix="soak-", dir=args.workdir))
    log(f"run directory {rundir}; seed {args.seed}; netns {netns}")
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        report = soak(args, rundir)
    except BaseException:
        log(f"failed; the run directory is kept: {rundir}")
        raise
    report["ok"] = ok(report)
    report["seed"] = args.seed
    report["args"] = {k: v for k, v in vars(args).items() if k != "cmd"}
    report["rundir"] = str(rundir)
    (rundir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    for line in summary_lines(report):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.record:   # a failed run is recorded too, with its problems and verdict
        rev = source_revision()
        sec = [f"## Chaos soak (issue 13), {started:%Y-%m-%d %H:%M} UTC", "",
               f"Machine: {machine()}; revision {rev}.", "",
               f"`python bench/soak.py {' '.join(sys.argv[1:])}`", ""]
        sec += summary_lines(report)
        sec += ["", "Verdict: " + ("passed (no errors, no problems)." if report["ok"] else
                                   "FAILED: see the problems above.")]
        if args.note:
            sec += ["", args.note]
        append_results("\n" + "\n".join(sec) + "\n")
    if report["ok"] and not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    else:
        log(f"run directory kept: {rundir}")
    log("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
