#!/usr/bin/env python3
"""End-to-end SMTP acceptance load harness: our daemon against Postfix and smtp-sink.

What it measures
    How fast a server *accepts* mail over SMTP from Postfix's ``smtp-source``, and how much
    CPU it spends per accepted message.  Three targets run in the same invocation, on the same
    machine, with the same ``smtp-source`` settings:

    mta      ``mta serve`` (``python -m mta serve -c CONFIG`` by default).  Says 250 only once
             the message is on disk (group-committed fdatasync).
    postfix  a private Postfix instance (own config and queue directory in a temporary
             directory) whose smtpd tags every message HOLD: cleanup writes and fsyncs the
             queue file, moves it to the hold queue, and only then does smtpd answer 250.
             Nothing is ever scheduled for delivery.  After each run the hold queue must hold
             exactly the messages sent, or the run is reported as an error.
    sink     ``smtp-sink`` (keeps nothing, not durable): the ceiling of the generator and the
             loopback path on this machine.

Method
    * Every run starts a fresh instance of the target (empty queue), sends one probe message
      with smtplib, an unmeasured warm-up batch with smtp-source, then the measured batch.
      Rounds interleave the targets (the order rotates each round) so that drift of the
      machine hits all of them alike.  Figures are medians over ``--runs`` rounds.
    * Throughput = measured messages / wall time of the smtp-source process.
    * CPU per message, system-wide (works for every target, including Postfix's short-lived
      processes): busy time from /proc/stat (user+nice+system+irq+softirq) over the run,
      minus smtp-source's own CPU (rusage from os.wait4), minus this harness's CPU, minus the
      machine's background busy rate sampled for ``--idle-sample`` seconds before the target
      was started (after waiting up to ``--wait-idle`` seconds for the machine to be idle)
      times the wall time; divided by the messages.  Robust to short-lived processes, not to
      other work on the machine: use a quiet machine, or read the tree figure.
    * CPU per message, server process tree: sum of utime+stime+cutime+cstime from
      /proc/PID/stat over the server's root process and all its live descendants, after minus
      before.  Children that exit during the run are counted through their parent's
      cutime/cstime once reaped (the Postfix master and the mta supervisor reap promptly).
      Roots: mta supervisor PID, Postfix master PID, smtp-sink PID.
    * Each smtp-source run is bounded by ``--timeout`` seconds; on expiry its process group
      is killed and the run is an error.  Server start-up and shutdown are bounded too.

End-to-end mode (``--e2e``, issue 3)
    smtp-source -> server -> smtp-sink: how fast the server accepts *and delivers* the same
    load.  Targets mta and postfix; the receiver for both is an ``smtp-sink -c`` started by the
    harness for each run on its own 127.0.0.1 port, whose counter ("mesg=N", updated at every
    "." received) says exactly how many messages arrived.

    mta      ``delivery.hold = false``, one static route ``[[delivery.route]] domain = "*"
             hosts = ["127.0.0.1:SINKPORT"]`` (an IP literal: no DNS), connections_per_domain
             = ``--concurrency``; everything else default.
    postfix  the same private instance, without the HOLD, delivering with its smtp client to
             ``relayhost = [127.0.0.1]:SINKPORT`` (bracketed IP literal, and
             ``smtp_dns_support_level = disabled``: no DNS), destination concurrency limit
             ``--concurrency``, ``delay_logging_resolution_limit = 6`` (microsecond delays).

    Each run: fresh receiver and target, probe + warm-up, wait until they are all delivered,
    then the measured batch.  A run is done when the receiver has counted every message sent
    and the server has recorded every delivery: for the mta, its event log holds a
    "delivery" line for each (the spool writes it after the outcome is on disk); for Postfix,
    its queue directories (maildrop, incoming, active, deferred, hold) are empty.  After
    that, ``mta queue --json`` must report 0 messages (polled, bounded), and the receiver
    must have exactly the messages sent (more would be duplicates).

    * msgs/s = measured messages / (done - start of smtp-source).
    * CPU per message: as above, over the same window, system-wide additionally minus the
      receiver's CPU (/proc/PID/stat of smtp-sink), and the server tree.
    * Latency, acceptance to delivery, p50/p99 over the measured messages: mta from its
      event log, delivery.timestamp - reception.timestamp per (queue_id, recipient)
      (reception = end of DATA in the acceptor, before the fsync; delivery = when the spool
      recorded the outcome, after its fsync; microseconds).  Postfix from its maillog:
      ``delay=`` of the "status=sent" line, which Postfix counts from the message's arrival
      (MAIL FROM in smtpd) to the end of the delivery (the receiver's reply to ".").  Postfix
      prints it with two significant digits (delay_logging_resolution_limit = 6 only lifts
      the default cap of 2 decimals): 1 ms steps from 0.1 to 1 s, 0.1 s steps from 1 to 10 s,
      i.e. within 5 %.  The maillog's own timestamps are whole seconds, so no finer figure
      is available from Postfix.

Network
    All traffic goes to 127.0.0.1.  By default (``--netns auto``) the harness first moves
    itself into a private network namespace holding only a loopback interface (needs
    CAP_SYS_ADMIN), so nothing it starts -- including a daemon that tries to resolve or
    deliver -- can reach anything but loopback.

Usage
    python bench/load.py [--sessions 20] [--messages 20000] [--size 2048] [--runs 3]
        [--targets mta,postfix,sink] [--per-connection] [--mta-config-extra TOML]
        [--mta-cmd CMD | --mta-head] [--record]
    python bench/load.py --e2e [--concurrency 20] [--targets mta,postfix] ... [--record]

``--mta-head`` runs the mta from HEAD's mta/ (git archive) and this checkout's compiled
extensions, so uncommitted work in the tree does not leak into a recorded result.

``--record`` appends a dated section to bench/RESULTS.md.  Standard library only.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import fcntl
import io
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import smtplib
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "bench" / "RESULTS.md"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin"

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")  # ticks per second in /proc/*/stat and /proc/stat

# Time bounds, in seconds.
READY_TIMEOUT_S = 60.0      # server start until its 220 banner
STOP_TIMEOUT_S = 30.0       # SIGTERM (or postfix stop) until exit, then SIGKILL
POSTFIX_CMD_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 30.0
SETTLE_S = 0.5              # pause after the warm-up, before the measured batch
BACKGROUND_WARN_CORES = 0.05  # warn when the idle machine is busier than this

SINK_BACKLOG = 1000


# --------------------------------------------------------------------------------------------
# Small helpers: tools, ports, processes, CPU accounting


def tool(name: str) -> str:
    """Return the path of a Postfix tool, or exit with a hint."""
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        sys.exit(f"load.py: {name} not found; install Debian's postfix "
                 "(see tests/setup-deps.d/bench.sh)")
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def system_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


def steal_s() -> float:
    """CPU seconds the hypervisor gave to other guests since boot (/proc/stat steal).

    The machines are shared virtual machines: when the host is oversubscribed
    this grows and every figure of the run is slowed, whatever its target.
    Each run reports it so that such runs can be recognised."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / CLK_TCK if len(fields) > 8 else 0.0


def self_cpu_s() -> float:
    """CPU seconds this harness process has used."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def read_procs() -> dict[int, tuple[int, int, int]]:
    """Map every live PID to (ppid, starttime, utime+stime+cutime+cstime ticks)."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2:].split()  # fields from 3 (state) on
        procs[int(name)] = (int(rest[1]), int(rest[19]), sum(int(x) for x in rest[11:15]))
    return procs


def process_tree(root: int, procs: dict | None = None) -> dict[int, tuple[int, int, int]]:
    """Return root and its live descendants from read_procs()."""
    procs = read_procs() if procs is None else procs
    children = defaultdict(list)
    for pid, (ppid, _start, _ticks) in procs.items():
        children[ppid].append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in tree:
            tree[pid] = procs[pid]
            todo.extend(children[pid])
    return tree


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by root, its live descendants and their reaped children."""
    return sum(ticks for _ppid, _start, ticks in process_tree(root).values()) / CLK_TCK


def kill_leftovers(snapshot: dict[int, tuple[int, int, int]]) -> list[int]:
    """SIGKILL the processes of an earlier process_tree() snapshot still alive (same PID and
    start time, so a reused PID is never hit).  Returns the PIDs killed."""
    now = read_procs()
    killed = []
    for pid, (_ppid, start, _ticks) in snapshot.items():
        if pid in now and now[pid][1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def start_time(pid: int) -> int | None:
    """Start time (ticks after boot) of a live pid, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(")") + 2:].split()[19])


def wait_pid_gone(pid: int, start: int | None, timeout_s: float) -> bool:
    """Wait until pid has exited (or been replaced); True if it did within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = start_time(pid)
        if now is None or (start is not None and now != start):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_child(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM a child started in its own session, wait, then SIGKILL its process group."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"  pid {proc.pid} ignored SIGTERM for {timeout_s:.0f} s; SIGKILL to its group",
              file=sys.stderr)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout_s)


def wait_banner(port: int, alive, timeout_s: float = READY_TIMEOUT_S) -> str:
    """Connect to 127.0.0.1:port until a '220 ' greeting arrives; return it.

    alive() is called between attempts and may raise if the server died."""
    deadline = time.monotonic() + timeout_s
    last_error = "no attempt"
    while time.monotonic() < deadline:
        alive()
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2.0) as s:
                data = b""
                while not re.search(rb"(^|\n)220 [^\n]*\n", data) and len(data) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if re.search(rb"(^|\n)220 ", data):
                    s.sendall(b"QUIT\r\n")
                    return data.decode("ascii", "replace").strip()
                last_error = f"greeting {data[:80]!r}"
        except OSError as e:
            last_error = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"no 220 greeting on 127.0.0.1:{port} within {timeout_s:.0f} s "
                       f"({last_error})")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def fs_type(path: Path) -> str:
    """File system type holding path, from /proc/mounts (longest matching mount point)."""
    best, best_type = "", "unknown"
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt, typ = parts[1].replace("\\040", " "), parts[2]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, best_type = mnt, typ
    return best_type


# --------------------------------------------------------------------------------------------
# Private network namespace


CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sh22x"  # struct ifreq on Linux: name + short flags, padded to 40 octets


def enter_private_netns(mode: str) -> bool:
    """Move this process into a new network namespace with only loopback up.

    mode: 'no' (never), 'yes' (or exit), 'auto' (when permitted).  Returns True if done."""
    if mode == "no":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        msg = f"cannot create a network namespace: {os.strerror(err)}"
        if mode == "yes":
            sys.exit(f"load.py: {msg}")
        print(f"warning: {msg}; running in the host's network namespace "
              "(traffic still goes to 127.0.0.1 only)", file=sys.stderr)
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack(IFREQ, fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))
    return True


# --------------------------------------------------------------------------------------------
# Targets


class Target:
    """A server under test.  start() sets port and root_pid; stop() must always be safe."""

    name = "?"
    durable = False
    port = 0
    root_pid = 0
    sink_port = 0   # --e2e: where the target delivers (the harness's smtp-sink)

    def __init__(self, args, rundir: Path):
        self.args = args
        self.rundir = rundir

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def check(self, expected: int) -> str | None:
        """After a run: an error text if the server did not keep what it accepted."""
        return None

    def describe(self) -> list[str]:
        """Command lines and settings, for RESULTS.md."""
        return []


class SinkTarget(Target):
    name = "sink"
    durable = False

    def __init__(self, args, rundir):
        super().__init__(args, rundir)
        self.proc = None

    def command(self, port) -> list[str]:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses root
        return [tool("smtp-sink"), *user, f"{LOOPBACK}:{port}", str(SINK_BACKLOG)]

    def start(self):
        self.port = free_port()
        log = open(self.rundir / "smtp-sink.log", "wb")
        self.proc = subprocess.Popen(self.command(self.port), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self.root_pid = self.proc.pid
        wait_banner(self.port, self._alive)

    def _alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {self.proc.returncode}: "
                               f"{tail(self.rundir / 'smtp-sink.log')}")

    def stop(self):
        if self.proc is not None:
            stop_child(self.proc)

    def describe(self):
        return [shlex.join(self.command(0)).replace(":0", ":PORT")]


class PostfixTarget(Target):
    """A private Postfix instance that holds everything it accepts, or (--e2e) delivers it
    all to the harness's smtp-sink."""

    name = "postfix"
    durable = True
    OTHER_QUEUES = ("maildrop", "incoming", "active", "deferred", "corrupt")
    # --e2e: a message still to be delivered is in one of these.
    PENDING_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, args, rundir):
        super().__init__(args, rundir)
        self.etc = rundir / "etc"
        self.queue = rundir / "queue"
        self.started = False
        self.master_start = None

    def main_cf(self) -> dict[str, str]:
        """main.cf: every setting that differs from Postfix's defaults."""
        limit = max(100, 2 * self.args.sessions + self.args.concurrency + 20)
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            # Not created by us: post-install must create it owned by the mail owner.
            "data_directory": str(self.rundir / "data"),
            "maillog_file": str(self.rundir / "maillog"),
            "maillog_file_prefixes": str(self.rundir),
            "myhostname": "postfix.bench.invalid",
            "mydomain": "bench.invalid",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "relay_domains": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
            # Every message goes to the hold queue and is never scheduled.
            "smtpd_client_restrictions": "check_client_access static:HOLD",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            # Belt and braces: should anything leave hold, it is discarded, not sent; the
            # hold-queue count after the run would then report the error.  (An error: or
            # retry: transport would make smtpd reject the recipient at RCPT.)
            "default_transport": "discard:bench instance never delivers",
            "relay_transport": "discard:bench instance never delivers",
            "default_process_limit": str(limit),
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_recipient_rate_limit": "0",
            "smtpd_client_new_tls_session_rate_limit": "0",
            "smtpd_client_event_limit_exceptions": "127.0.0.0/8",
            "biff": "no",
        }
        if self.args.e2e:
            del cf["smtpd_client_restrictions"]  # no HOLD: deliver everything
            c = str(self.args.concurrency)
            cf.update({
                "default_transport": "smtp",
                "relay_transport": "smtp",
                # A bracketed IP literal: no MX and no address lookup; DNS off for good measure.
                "relayhost": f"[{LOOPBACK}]:{self.sink_port}",
                "smtp_dns_support_level": "disabled",
                "smtp_host_lookup": "native",
                "smtp_address_preference": "ipv4",
                "default_destination_concurrency_limit": c,
                "smtp_destination_concurrency_limit": c,
                # delay= in the maillog to the microsecond (default: 2 decimals).
                "delay_logging_resolution_limit": "6",
            })
        return cf

    def master_cf(self, port: int) -> str:
        """master.cf: an smtpd on 127.0.0.1:port and the daemons it needs, no chroot; no
        delivery agent that could talk to the network, except (--e2e) the smtp client, which
        only ever talks to the relayhost 127.0.0.1:SINKPORT."""
        e2e = ["smtp       unix  - - n - - smtp"] if self.args.e2e else []
        return "\n".join([
            "# service type  private unpriv  chroot  wakeup  maxproc command",
            f"{LOOPBACK}:{port} inet n - n - - smtpd",
            "pickup     unix  n - n 60 1 pickup",
            "cleanup    unix  n - n - 0 cleanup",
            "qmgr       unix  n - n 300 1 qmgr",
            "rewrite    unix  - - n - - trivial-rewrite",
            "bounce     unix  - - n - 0 bounce",
            "defer      unix  - - n - 0 bounce",
            "trace      unix  - - n - 0 bounce",
            "verify     unix  - - n - 1 verify",
            "flush      unix  n - n 1000? 0 flush",
            "proxymap   unix  - - n - - proxymap",
            "proxywrite unix  - - n - 1 proxymap",
            "showq      unix  n - n - - showq",
            "error      unix  - - n - - error",
            "retry      unix  - - n - - error",
            "discard    unix  - - n - - discard",
            "anvil      unix  - - n - 1 anvil",
            "scache     unix  - - n - 1 scache",
            "postlog    unix-dgram n - n - 1 postlogd",
            *e2e,
            "",
        ])

    def postfix(self, *cmd: str) -> None:
        r = subprocess.run([tool("postfix"), "-c", str(self.etc), *cmd],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=POSTFIX_CMD_TIMEOUT_S)
        if r.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(cmd)} failed ({r.returncode}): "
                               f"{(r.stdout + r.stderr).strip()}\n{tail(self.rundir / 'maillog')}")

    def start(self):
        self.port = free_port()
        self.etc.mkdir()
        self.queue.mkdir()
        (self.etc / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main_cf().items()))
        (self.etc / "master.cf").write_text(self.master_cf(self.port))
        self.started = True
        self.postfix("start")  # runs 'postfix check', which creates the queue directories
        self.root_pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        self.master_start = start_time(self.root_pid)
        wait_banner(self.port, self._alive)

    def _alive(self):
        if wait_pid_gone(self.root_pid, self.master_start, 0):
            raise RuntimeError(f"postfix master exited: {tail(self.rundir / 'maillog')}")

    def stop(self):
        if not self.started:
            return
        self.started = False
        snapshot = process_tree(self.root_pid) if self.root_pid else {}
        try:
            self.postfix("stop")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"  postfix stop: {e}", file=sys.stderr)
        if self.root_pid and not wait_pid_gone(self.root_pid, self.master_start, STOP_TIMEOUT_S):
            print("  postfix master still running; killing its processes", file=sys.stderr)
        # The master signals its children on exit; kill whatever of the tree is left.
        time.sleep(0.2)
        killed = kill_leftovers(snapshot)
        if killed:
            print(f"  killed leftover postfix processes {killed}", file=sys.stderr)

    def count_queue(self, name: str) -> int:
        return sum(len(files) for _d, _s, files in os.walk(self.queue / name))

    def pending(self) -> int:
        """--e2e: messages still in the queue (not yet delivered, or stuck)."""
        return sum(self.count_queue(q) for q in self.PENDING_QUEUES)

    def queue_counts(self) -> dict[str, int]:
        return {q: self.count_queue(q) for q in (*self.PENDING_QUEUES, "corrupt")}

    def check(self, expected):
        if self.args.e2e:
            return None  # measure_e2e() checks the queues and the receiver
        held = self.count_queue("hold")
        if held == expected:
            return None
        others = {q: self.count_queue(q) for q in self.OTHER_QUEUES}
        return (f"postfix hold queue has {held} messages, expected {expected} "
                f"(other queues: {others})")

    def describe(self):
        cf = self.main_cf()
        for key in ("queue_directory", "data_directory", "maillog_file", "maillog_file_prefixes"):
            cf[key] = cf[key].replace(str(self.rundir), "TMP")
        if self.args.e2e:
            cf["relayhost"] = f"[{LOOPBACK}]:SINKPORT"
        agents = ("smtp delivery agent (talks only to the relayhost), no lmtp/local"
                  if self.args.e2e else "no smtp/lmtp/local delivery agents")
        return [
            "postfix -c TMP/etc start   (as root; stopped with postfix -c TMP/etc stop)",
            "main.cf: " + "; ".join(f"{k} = {v}" for k, v in cf.items()),
            f"master.cf: smtpd on 127.0.0.1:PORT, chroot n everywhere, postlogd, {agents}",
        ]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} as a TOML value")


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def toml_dumps(doc: dict) -> str:
    """Write a TOML document of top-level keys, one level of tables, and arrays of tables
    inside those ([[section.key]], e.g. [[delivery.route]])."""
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"]
            arrays = []
            for k, v in table.items():
                if _is_table_array(v):
                    arrays.append((k, v))
                    continue
                if isinstance(v, dict):
                    raise ValueError(f"nested table {section}.{k} is not supported")
                lines.append(f"{k} = {toml_value(v)}")
            for k, items in arrays:
                for item in items:
                    lines += ["", f"[[{section}.{k}]]"]
                    for ik, iv in item.items():
                        if isinstance(iv, dict) or _is_table_array(iv):
                            raise ValueError(f"nested table {section}.{k}.{ik} is not supported")
                        lines.append(f"{ik} = {toml_value(iv)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


class MtaTarget(Target):
    """Our daemon: `mta serve -c CONFIG`, stopped with SIGTERM to the supervisor."""

    name = "mta"
    durable = True
    QUEUED = re.compile(r"^2\.0\.0 Ok: queued as \S+$")

    def __init__(self, args, rundir):
        super().__init__(args, rundir)
        self.proc = None
        self.config_path = rundir / "mta.toml"
        self.log = rundir / "mta.log"

    def command(self) -> list[str]:
        """--mta-cmd, else `python -m mta` from this checkout (or from the --mta-head copy),
        else `mta` from PATH."""
        if self.args.mta_cmd:
            base = shlex.split(self.args.mta_cmd)
        elif self.args.mta_src:
            base = [sys.executable, "-m", "mta"]
        elif (REPO / "mta" / "__main__.py").exists() or not shutil.which("mta"):
            base = [sys.executable, "-m", "mta"]
        else:
            base = [shutil.which("mta")]
        return base + ["serve", "-c", str(self.config_path)]

    def env(self) -> tuple[dict, Path]:
        """Environment and working directory for the daemon and `mta queue`."""
        src = Path(self.args.mta_src) if self.args.mta_src else REPO
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        env.pop("NOTIFY_SOCKET", None)
        return env, src

    def config(self, port, sink_port=None) -> dict:
        if self.args.e2e:
            # Deliver everything to the harness's smtp-sink: a static route for every domain
            # to an IP literal, so no DNS lookup is ever made.
            delivery = {"hold": False, "connections_per_domain": self.args.concurrency,
                        "route": [{"domain": "*", "hosts": [
                            f"{LOOPBACK}:{self.sink_port if sink_port is None else sink_port}"
                        ]}]}
        else:
            # Deliveries held, like the Postfix peer's hold queue: both only accept durably.
            delivery = {"hold": True}
        doc = {"server": {"state_dir": str(self.rundir / "state")},
               "smtp": {"listen": [f"{LOOPBACK}:{port}"]},
               "delivery": delivery}
        for extra in self.args.mta_config_extra:
            merge(doc, tomllib.loads(extra))
        return doc

    def event_log(self) -> Path | None:
        """Path of the daemon's event log under the generated config, or None if disabled."""
        server = self.config(0)["server"]
        name = server.get("event_log", "log/events.jsonl")
        if not name:
            return None
        path = Path(name)
        return path if path.is_absolute() else Path(server["state_dir"]) / path

    def start(self):
        self.port = free_port()
        (self.rundir / "state").mkdir()
        self.config_path.write_text(toml_dumps(self.config(self.port)))
        env, cwd = self.env()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.root_pid = self.proc.pid
        wait_banner(self.port, self._alive)

    def _alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"mta exited with {self.proc.returncode}:\n{tail(self.log)}")

    def queue_total(self) -> dict:
        """`mta queue --json` of the running daemon: its "total" object."""
        return self.queue_json()["total"]

    def queue_json(self) -> dict:
        """`mta queue --json` of the running daemon."""
        base = self.command()[:-3]   # the command without "serve -c CONFIG"
        env, cwd = self.env()
        r = subprocess.run(base + ["queue", "--json", "-c", str(self.config_path)], cwd=cwd,
                           env=env, capture_output=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"mta queue failed: {r.stderr.decode()[-500:]}")
        return json.loads(r.stdout)

    def wait_queue_empty(self, timeout_s: float) -> float:
        """Poll `mta queue --json` until it reports 0 messages; return the seconds it took.

        Raises RuntimeError (with the last answer) if it does not within timeout_s."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while True:
            total = self.queue_total()
            if total["messages"] == 0:
                return time.perf_counter() - t0
            if time.monotonic() >= deadline:
                raise RuntimeError(f"mta queue still reports {json.dumps(total)} after "
                                   f"{timeout_s:.0f} s")
            time.sleep(0.2)

    def check(self, expected: int) -> str | None:
        """Ask the running daemon how many messages it holds: it must be every one sent."""
        if self.args.e2e:
            return None  # measure_e2e() checks the queue and the receiver
        try:
            held = self.queue_total()["messages"]
        except RuntimeError as e:
            return str(e)
        if held == expected:
            return None
        return f"mta queue has {held} messages, expected {expected}"

    def stop(self):
        if self.proc is None:
            return
        snapshot = process_tree(self.proc.pid)
        stop_child(self.proc)
        killed = kill_leftovers(snapshot)
        if killed:
            print(f"  killed leftover mta processes {killed}", file=sys.stderr)
        self.proc = None

    def describe(self):
        cfg = toml_dumps(self.config("PORT", "SINKPORT")).replace(str(self.rundir), "TMP")
        cmd = shlex.join(self.command()).replace(str(self.rundir), "TMP")
        if self.args.mta_src:
            cmd = (f"cd SRC && PYTHONPATH=SRC {cmd}   (SRC: git archive of {self.args.revision}'s "
                   "mta/ + this checkout's mta/_ext/*.so)")
        return [cmd, "config: " + " ".join(cfg.split())]


TARGETS = {"mta": MtaTarget, "postfix": PostfixTarget, "sink": SinkTarget}
E2E_TARGETS = ("mta", "postfix")


class Receiver:
    """--e2e: the smtp-sink every target delivers to, with -c counters on its stdout.

    smtp-sink rewrites "sess=S quit=Q mesg=M\\r" whenever a session ends, QUIT is executed or
    "." is received; mesg is the number of messages received so far."""

    COUNTER = re.compile(rb"mesg=(\d+)\r")

    def __init__(self, rundir: Path):
        self.out = rundir / "receiver.out"
        self.proc = None
        self.port = 0
        self.fd = -1

    @staticmethod
    def command(port) -> list[str]:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses root
        return [tool("smtp-sink"), "-c", *user, f"{LOOPBACK}:{port}", str(SINK_BACKLOG)]

    def start(self) -> None:
        self.port = free_port()
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(self.command(self.port), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.fd = os.open(self.out, os.O_RDONLY | os.O_CLOEXEC)
        wait_banner(self.port, self._alive)

    def _alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {self.proc.returncode}: "
                               f"{tail(self.out)}")

    def count(self) -> int:
        """Messages received so far (the last complete counter line)."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, 256, max(0, size - 256))
        found = self.COUNTER.findall(data)
        return int(found[-1]) if found else 0

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None


class EventTail:
    """--e2e: follow the mta's event log, counting lines by type as they are appended."""

    TYPES = (b"reception", b"delivery", b"transient_failure", b"bounce", b"expiration")

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1
        self.offset = 0
        self.counts = dict.fromkeys(self.TYPES, 0)
        self.first_failure = None   # the first non-delivery outcome line, for the report

    def poll(self) -> None:
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
        size = os.fstat(self.fd).st_size
        if size <= self.offset:
            return
        data = os.pread(self.fd, size - self.offset, self.offset)
        end = data.rfind(b"\n") + 1   # whole lines only; the rest is read next time
        if not end:
            return
        chunk = data[:end]
        self.offset += end
        for t in self.TYPES:
            self.counts[t] += chunk.count(b'"type":"' + t + b'"')
        if self.first_failure is None:
            for t in self.TYPES[2:]:
                i = chunk.find(b'"type":"' + t + b'"')
                if i >= 0:
                    line = chunk[chunk.rfind(b"\n", 0, i) + 1:chunk.find(b"\n", i)]
                    self.first_failure = line.decode(errors="replace")
                    break

    @property
    def delivered(self) -> int:
        return self.counts[b"delivery"]

    @property
    def failures(self) -> int:
        return sum(self.counts[t] for t in self.TYPES[2:])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------------------------
# Load generation and one measured run


def source_command(args, port: int, count: int) -> list[str]:
    cmd = [tool("smtp-source"), "-s", str(args.sessions), "-m", str(count),
           "-l", str(args.size)]
    if not args.per_connection:
        cmd.append("-d")  # reuse connections
    cmd += ["-c", "-f", args.sender, "-t", args.rcpt, f"{LOOPBACK}:{port}"]
    return cmd


@dataclass
class SourceRun:
    wall_s: float
    cpu_s: float
    sent: int


def run_source(args, port: int, count: int, out_path: Path, started=None) -> SourceRun:
    """Run smtp-source once, bounded by args.timeout; return wall time, its CPU and count.

    started: a list to which (pid, perf_counter at start) is appended once it runs."""
    cmd = source_command(args, port, count)
    timed_out = threading.Event()

    def expire(pid):
        timed_out.set()
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    with open(out_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        if started is not None:
            started.append((proc.pid, t0))
        timer = threading.Timer(args.timeout, expire, [proc.pid])
        timer.start()
        try:
            _pid, status, ru = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: never leave the generator running
            expire(proc.pid)
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = out_path.read_bytes()
    counts = re.findall(rb"(\d+)\r", output)
    sent = int(counts[-1]) if counts else 0
    if timed_out.is_set():
        raise RuntimeError(f"smtp-source timed out after {args.timeout:.0f} s "
                           f"({sent} of {count} sent); killed")
    if proc.returncode != 0 or sent != count:
        last = output.replace(b"\r", b"\n").decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"smtp-source exit {proc.returncode}, {sent} of {count} sent: "
                           f"{last[0] if last else ''}")
    return SourceRun(wall, ru.ru_utime + ru.ru_stime, sent)


def probe(port: int) -> str:
    """Send one message with smtplib; return the text of the reply to DATA."""
    msg = (b"From: <sender@example.com>\r\nTo: <rcpt@example.net>\r\n"
           b"Subject: load.py probe\r\n\r\nprobe\r\n")
    with smtplib.SMTP(LOOPBACK, port, local_hostname="load.bench.invalid",
                      timeout=PROBE_TIMEOUT_S) as s:
        s.ehlo()
        for step, (code, text) in (("MAIL", s.mail("sender@example.com")),
                                   ("RCPT", s.rcpt("rcpt@example.net"))):
            if code != 250:
                raise RuntimeError(f"probe {step}: {code} {text.decode(errors='replace')}")
        code, text = s.data(msg)
        if code != 250:
            raise RuntimeError(f"probe DATA: {code} {text.decode(errors='replace')}")
        return text.decode(errors="replace")


def background_busy_rate(sample_s: float, wait_s: float) -> float:
    """Busy CPU seconds per second of the machine while we sleep, in sample_s windows.

    Repeats the window (for at most wait_s) until the machine is idle, so that a run does
    not start while something else (or the previous run's writeback) is using the CPU."""
    if sample_s <= 0:
        return 0.0
    deadline = time.monotonic() + wait_s
    while True:
        b0, t0 = system_busy_s(), time.perf_counter()
        time.sleep(sample_s)
        rate = (system_busy_s() - b0) / (time.perf_counter() - t0)
        if rate <= BACKGROUND_WARN_CORES or time.monotonic() >= deadline:
            return rate


@dataclass
class Run:
    target: str
    messages: int
    wall_s: float
    system_busy_s: float
    generator_cpu_s: float
    harness_cpu_s: float
    background_cpu_s: float
    tree_cpu_s: float
    probe_reply: str = ""
    error: str | None = None
    # --e2e only
    receiver_cpu_s: float = 0.0     # smtp-sink's CPU over the window
    accept_wall_s: float = 0.0      # wall time of smtp-source (acceptance only)
    queue_confirm_s: float = 0.0    # mta: done until `mta queue --json` said 0 (incl. its start)
    lat_n: int = 0
    lat_p50_ms: float = 0.0
    lat_p99_ms: float = 0.0
    lat_max_ms: float = 0.0
    steal_s: float = 0.0            # CPU taken by the hypervisor over the window

    @property
    def steal_cores(self) -> float:
        return self.steal_s / self.wall_s

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.wall_s

    @property
    def server_ms_system(self) -> float:
        """System-wide busy CPU not spent by the generator, harness or background, per msg."""
        rest = (self.system_busy_s - self.generator_cpu_s - self.harness_cpu_s
                - self.background_cpu_s - self.receiver_cpu_s)
        return 1000.0 * rest / self.messages

    @property
    def accept_msgs_per_s(self) -> float:
        return self.messages / self.accept_wall_s if self.accept_wall_s else 0.0

    @property
    def receiver_ms(self) -> float:
        return 1000.0 * self.receiver_cpu_s / self.messages

    @property
    def server_ms_tree(self) -> float:
        return 1000.0 * self.tree_cpu_s / self.messages

    @property
    def generator_ms(self) -> float:
        return 1000.0 * self.generator_cpu_s / self.messages


def measure(args, name: str, rundir: Path) -> Run:
    """One run: fresh target, probe, warm-up, measured batch, check, stop."""
    rundir.mkdir()
    bg_rate = background_busy_rate(args.idle_sample, args.wait_idle)
    target = TARGETS[name](args, rundir)
    try:
        target.start()
        reply = probe(target.port)
        if name == "mta" and not MtaTarget.QUEUED.match(reply):
            print(f"  warning: mta reply to DATA {reply!r} does not match "
                  "'250 2.0.0 Ok: queued as QUEUEID'", file=sys.stderr)
        if args.warmup:
            run_source(args, target.port, args.warmup, rundir / "warmup.out")
        time.sleep(SETTLE_S)

        busy0, self0, tree0 = system_busy_s(), self_cpu_s(), tree_cpu_s(target.root_pid)
        steal0 = steal_s()
        src = run_source(args, target.port, args.messages, rundir / "source.out")
        busy1, self1, tree1 = system_busy_s(), self_cpu_s(), tree_cpu_s(target.root_pid)

        run = Run(name, args.messages, src.wall_s, busy1 - busy0, src.cpu_s, self1 - self0,
                  bg_rate * src.wall_s, tree1 - tree0, reply, steal_s=steal_s() - steal0)
        run.error = target.check(1 + args.warmup + args.messages)
        return run
    finally:
        target.stop()


# --------------------------------------------------------------------------------------------
# End to end (--e2e)


POLL_S = 0.005              # --e2e: how often the harness checks whether a run is done
CONFIRM_TIMEOUT_S = 30.0    # --e2e: after done, until `mta queue` must say 0 / logs complete


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 < p <= 100) of an ascending list."""
    k = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return sorted_values[int(k) - 1]


class Drain:
    """--e2e: when has a target delivered everything?  done(expected) is cheap; call often."""

    def __init__(self, target: Target, receiver: Receiver):
        self.target = target
        self.receiver = receiver
        self.events = None
        if isinstance(target, MtaTarget):
            path = target.event_log()
            if path is None:
                raise RuntimeError("--e2e needs the mta's event log (server.event_log)")
            self.events = EventTail(path)

    def done(self, expected: int) -> bool:
        if self.receiver.count() < expected:
            if self.events is not None:
                self.events.poll()
                self._fail_fast()
            return False
        if self.events is not None:
            self.events.poll()
            self._fail_fast()
            return self.events.delivered >= expected
        return self.target.pending() == 0

    def _fail_fast(self) -> None:
        """A deferred or bounced recipient would wait for a retry: report it at once."""
        if self.events.failures:
            raise RuntimeError(f"mta logged {self.events.failures} non-delivery outcome(s); "
                               f"first: {self.events.first_failure}")

    def state(self) -> str:
        text = f"receiver has {self.receiver.count()}"
        if self.events is not None:
            self.events.poll()
            counts = {k.decode(): v for k, v in self.events.counts.items()}
            try:
                doc = self.target.queue_json()
                doc["shards"] = [{k: v for k, v in x.items() if k != "domains"}
                                 for x in doc.get("shards", [])]
                doc.pop("domains", None)
                queue = json.dumps(doc)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                queue = f"? ({e})"
            return f"{text}; mta event log counts {counts}; mta queue --json {queue}"
        return f"{text}; postfix queues {self.target.queue_counts()}"

    def wait(self, expected: int, deadline: float, what: str) -> float:
        """Poll until done(expected); return perf_counter then.  Bounded by deadline."""
        while not self.done(expected):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{what}: not all {expected} delivered in time ({self.state()})")
            time.sleep(POLL_S)
        return time.perf_counter()


def mta_latencies(events_path: Path, since: float) -> list[float]:
    """Seconds from reception to delivery per (queue_id, recipient) received at or after
    since (epoch seconds), from the mta's event log."""
    received, delivered = {}, {}
    with open(events_path, "rb") as f:
        for line in f:
            e = json.loads(line)
            key = (e.get("queue_id"), e.get("recipient"))
            if e.get("type") == "reception" and e["timestamp"] >= since:
                received[key] = e["timestamp"]
            elif e.get("type") == "delivery":
                delivered.setdefault(key, e["timestamp"])  # at-least-once: the first counts
    return [delivered[k] - t for k, t in received.items() if k in delivered]


POSTFIX_CLIENT = re.compile(r"postfix/smtpd\[\d+\]: ([0-9A-Za-z]+): client=")
POSTFIX_SENT = re.compile(r"postfix/smtp\[\d+\]: ([0-9A-Za-z]+): to=<[^>]*>, .*?"
                          r"\bdelay=([0-9.]+), .*\bstatus=sent ")


def postfix_latencies(maillog: Path, offset: int) -> list[float]:
    """delay= (seconds) of every status=sent line for the queue ids whose smtpd client= line
    comes after byte offset of the maillog."""
    with open(maillog, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    ids = set(POSTFIX_CLIENT.findall(text))
    delays = {}
    for qid, delay in POSTFIX_SENT.findall(text):
        if qid in ids:
            delays.setdefault(qid, float(delay))
    return list(delays.values())


def measure_e2e(args, name: str, rundir: Path) -> Run:
    """One end-to-end run: fresh receiver and target, probe + warm-up delivered, then the
    measured batch, timed until the receiver has it all and the target's queue is empty."""
    rundir.mkdir()
    bg_rate = background_busy_rate(args.idle_sample, args.wait_idle)
    receiver = Receiver(rundir)
    target = TARGETS[name](args, rundir)
    source_pid: list = []
    result: dict = {}
    thread = drain = None
    try:
        receiver.start()
        target.sink_port = receiver.port
        target.start()
        drain = Drain(target, receiver)
        reply = probe(target.port)
        if args.warmup:
            run_source(args, target.port, args.warmup, rundir / "warmup.out")
        warm = 1 + args.warmup
        drain.wait(warm, time.monotonic() + args.timeout, "probe and warm-up")
        if isinstance(target, MtaTarget):
            target.wait_queue_empty(CONFIRM_TIMEOUT_S)
        time.sleep(SETTLE_S)

        expected = warm + args.messages
        maillog = rundir / "maillog"
        log_offset = maillog.stat().st_size if maillog.exists() else 0

        def source():
            try:
                result["src"] = run_source(args, target.port, args.messages,
                                           rundir / "source.out", source_pid)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                result["error"] = e

        t0_wall = time.time()
        busy0, self0, tree0 = system_busy_s(), self_cpu_s(), tree_cpu_s(target.root_pid)
        steal0 = steal_s()
        sink0 = receiver.cpu_s()
        thread = threading.Thread(target=source, name="smtp-source", daemon=True)
        thread.start()
        deadline = time.monotonic() + args.timeout
        while not source_pid and thread.is_alive():
            time.sleep(0.001)
        while True:
            if "error" in result:
                raise result["error"]
            if drain.done(expected):
                t_done = time.perf_counter()
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"not delivered within --timeout {args.timeout:.0f} s "
                                   f"({drain.state()})")
            time.sleep(POLL_S)
        busy1, self1, tree1 = system_busy_s(), self_cpu_s(), tree_cpu_s(target.root_pid)
        steal1 = steal_s()
        sink1 = receiver.cpu_s()
        thread.join(args.timeout)
        if "error" in result:
            raise result["error"]
        if thread.is_alive() or "src" not in result:
            raise RuntimeError("smtp-source did not finish")
        src = result["src"]
        wall = t_done - source_pid[0][1]

        run = Run(name, args.messages, wall, busy1 - busy0, src.cpu_s, self1 - self0,
                  bg_rate * wall, tree1 - tree0, reply,
                  receiver_cpu_s=sink1 - sink0, accept_wall_s=src.wall_s,
                  steal_s=steal1 - steal0)

        # Confirmation, outside the measured window.
        errors = []
        if isinstance(target, MtaTarget):
            try:
                run.queue_confirm_s = target.wait_queue_empty(CONFIRM_TIMEOUT_S)
            except RuntimeError as e:
                errors.append(str(e))
            lats = mta_latencies(drain.events.path, t0_wall)
        else:
            if target.pending():
                errors.append(f"postfix queues not empty: {target.queue_counts()}")
            confirm = time.monotonic() + CONFIRM_TIMEOUT_S
            while True:  # postlogd writes asynchronously
                lats = postfix_latencies(maillog, log_offset)
                if len(lats) >= args.messages or time.monotonic() >= confirm:
                    break
                time.sleep(0.2)
        time.sleep(SETTLE_S)
        got = receiver.count()
        if got != expected:
            errors.append(f"receiver got {got} messages, expected exactly {expected}"
                          + (" (duplicates)" if got > expected else ""))
        if len(lats) != args.messages:
            errors.append(f"latency for {len(lats)} of {args.messages} measured messages")
        if lats:
            lats.sort()
            run.lat_n = len(lats)
            run.lat_p50_ms = 1000.0 * percentile(lats, 50)
            run.lat_p99_ms = 1000.0 * percentile(lats, 99)
            run.lat_max_ms = 1000.0 * lats[-1]
        run.error = "; ".join(errors) or None
        return run
    finally:
        if thread is not None and thread.is_alive() and source_pid:
            try:  # interrupted or failed mid-run: never leave the generator running (the
                # thread still waits for it, so the pid is not reaped and still ours)
                os.killpg(source_pid[0][0], signal.SIGKILL)
            except ProcessLookupError:
                pass
            thread.join(STOP_TIMEOUT_S)
        if drain is not None and drain.events is not None:
            drain.events.close()
        target.stop()
        receiver.stop()


# --------------------------------------------------------------------------------------------
# Reporting


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
    def med(name, attr):
        return summaries[name].median(attr) if name in summaries else None

    lines = []
    for peer in ("postfix", "sink"):
        lines.append(
            f"- mta/{peer}: throughput {ratio(med('mta', 'msgs_per_s'), med(peer, 'msgs_per_s'))}, "
            f"CPU/msg system-wide "
            f"{ratio(med('mta', 'server_ms_system'), med(peer, 'server_ms_system'))}, "
            f"CPU/msg server tree "
            f"{ratio(med('mta', 'server_ms_tree'), med(peer, 'server_ms_tree'))}")
    return lines


def results_section(args, summaries, describe, netns, bg_rates, fstype) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    mode = ("one message per connection" if args.per_connection
            else "reused connections (-d)")
    src = shlex.join(source_command(args, 0, args.messages)).replace(":0", ":PORT")
    lines = [
        "",
        f"## End-to-end SMTP acceptance, {mode} — {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}. Generator and servers on the same machine, loopback only"
        f"{' (private network namespace)' if netns else ''}; work directory on {fstype}.",
        "",
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


def fmt_ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:,.0f} ms"


def git(*cmd: str) -> str:
    """Output of a read-only git command in this repository ("" if git fails)."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.decode(errors="replace").strip() if r.returncode == 0 else ""


def snapshot_head_mta(dst: Path) -> str:
    """--mta-head: extract HEAD's mta/ (git archive, read-only) into dst, add this checkout's
    compiled extensions; return HEAD's short hash."""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        sys.exit("load.py: --mta-head: cannot read HEAD with git")
    r = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD", "mta"],
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        sys.exit(f"load.py: git archive failed: {r.stderr.decode(errors='replace')}")
    dst.mkdir()
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        tar.extractall(dst, filter="data")
    built = sorted((REPO / "mta" / "_ext").glob("*.so"))
    if not built:
        sys.exit("load.py: --mta-head: no compiled extensions in mta/_ext (build them first)")
    if git("--no-optional-locks", "status", "--porcelain", "--", "mta/_pure",
           "mta/_ext/__init__.py"):
        print("warning: mta/_pure has uncommitted changes; the compiled extensions copied for "
              "--mta-head may not match HEAD", file=sys.stderr)
    for so in built:
        shutil.copy2(so, dst / "mta" / "_ext" / so.name)
    return head


def source_revision() -> str:
    """The repository's HEAD and whether mta/ has uncommitted changes (read-only git)."""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    dirty = git("--no-optional-locks", "status", "--porcelain", "--", "mta")
    return head + (" with uncommitted changes in mta/" if dirty else "")


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
    def med(name, attr):
        return summaries[name].median(attr) if name in summaries else None

    pairs = [("throughput", "msgs_per_s"), ("acceptance", "accept_msgs_per_s"),
             ("CPU/msg system-wide", "server_ms_system"), ("CPU/msg server tree",
                                                           "server_ms_tree"),
             ("latency p50", "lat_p50_ms"), ("latency p99", "lat_p99_ms")]
    return ["- mta/postfix: " + ", ".join(f"{label} {ratio(med('mta', a), med('postfix', a))}"
                                          for label, a in pairs)]


def print_run_e2e(run: Run, rnd: int) -> None:
    print(f"  {run.target:8} run {rnd}: {run.msgs_per_s:9,.0f} msgs/s end to end  "
          f"wall {run.wall_s:6.2f} s (acceptance {run.accept_wall_s:.2f} s)  "
          f"CPU/msg system-wide {run.server_ms_system:.3f} ms  tree {run.server_ms_tree:.3f} ms"
          f"  sink {run.receiver_ms:.3f} ms  generator {run.generator_ms:.3f} ms  "
          f"latency p50 {fmt_ms(run.lat_p50_ms)} p99 {fmt_ms(run.lat_p99_ms)} max "
          f"{fmt_ms(run.lat_max_ms)} (n={run.lat_n})  background {run.background_cpu_s / run.wall_s:.3f} cores"
          f"  steal {run.steal_cores:.2f} cores"
          + (f"  mta queue 0 after +{run.queue_confirm_s:.2f} s" if run.target == "mta" else "")
          + (f"  ERROR {run.error}" if run.error else ""), flush=True)


def results_section_e2e(args, summaries, describe, netns, bg_rates, fstype) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    mode = ("one message per connection" if args.per_connection
            else "reused connections (-d)")
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
        f"Scenario: smtp-source → server → smtp-sink; {args.sessions} smtp-source sessions, "
        f"{mode}, {args.messages} messages of {args.size} bytes, one recipient each, all to "
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


# --------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (-s)")
    p.add_argument("--messages", type=int, default=20000, help="measured messages per run (-m)")
    p.add_argument("--size", type=int, default=2048, help="message payload octets (-l)")
    p.add_argument("--runs", type=int, default=3, help="runs per target; figures are medians")
    p.add_argument("--targets", default=None,
                   help="comma-separated subset of mta,postfix,sink (default: all; with --e2e: "
                        "mta,postfix)")
    p.add_argument("--e2e", action="store_true",
                   help="end to end: the targets deliver to an smtp-sink started by the "
                        "harness; timed until it has every message and the queue is empty")
    p.add_argument("--concurrency", type=int, default=20,
                   help="--e2e: connections to the receiver, at most (mta "
                        "delivery.connections_per_domain, Postfix destination concurrency "
                        "limit)")
    p.add_argument("--per-connection", action="store_true",
                   help="one message per connection (smtp-source without -d)")
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
    p.add_argument("--mta-cmd", default=None,
                   help="command that runs the daemon, e.g. 'mta' (default: python -m mta "
                        "from this checkout, or mta from PATH if there is no mta/__main__.py)")
    p.add_argument("--mta-head", action="store_true",
                   help="run the mta from a copy of HEAD's mta/ (git archive) plus this "
                        "checkout's compiled extensions, unaffected by uncommitted work")
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
        args.targets = ",".join(E2E_TARGETS if args.e2e else TARGETS)
    choices = E2E_TARGETS if args.e2e else tuple(TARGETS)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in choices]
    if unknown or not names:
        p.error(f"unknown targets {unknown}; choose from {','.join(choices)}"
                + (" (the sink is the receiver with --e2e)" if args.e2e else ""))
    args.target_names = list(dict.fromkeys(names))
    if args.mta_head and args.mta_cmd:
        p.error("--mta-head and --mta-cmd exclude each other")
    args.mta_src = None
    for extra in args.mta_config_extra:
        try:
            tomllib.loads(extra)
        except tomllib.TOMLDecodeError as e:
            p.error(f"--mta-config-extra {extra!r}: {e}")
    if min(args.sessions, args.messages, args.size, args.runs, args.concurrency) < 1 \
            or args.warmup < 0:
        p.error("--sessions, --messages, --size, --runs and --concurrency must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "postfix" in args.target_names and os.geteuid() != 0:
        sys.exit("load.py: the postfix target must run as root (postfix start)")
    for name in ("smtp-source",
                 *(["smtp-sink"] if "sink" in args.target_names or args.e2e else []),
                 *(["postfix"] if "postfix" in args.target_names else [])):
        tool(name)

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
    fstype = fs_type(top)
    if fstype in ("tmpfs", "ramfs"):
        print(f"warning: {top} is on {fstype}: fsync is free there, durable figures are not "
              "meaningful (use --workdir on a disk)", file=sys.stderr)
    print(f"load.py: {'end to end, ' if args.e2e else ''}"
          f"targets {','.join(args.target_names)}, {args.runs} run(s), "
          f"{args.sessions} sessions, {args.messages} msgs x {args.size} B, "
          f"{'one per connection' if args.per_connection else 'reused connections'}, "
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
                if args.e2e:
                    print_run_e2e(run, rnd + 1)
                else:
                    print(f"  {name:8} run {rnd + 1}: {run.msgs_per_s:9,.0f} msgs/s  "
                          f"wall {run.wall_s:6.2f} s  CPU/msg system-wide "
                          f"{run.server_ms_system:.3f} ms  tree {run.server_ms_tree:.3f} ms  "
                          f"generator {run.generator_ms:.3f} ms  background "
                          f"{run.background_cpu_s / run.wall_s:.3f} cores  steal "
                          f"{run.steal_cores:.2f} cores"
                          + (f"  ERROR {run.error}" if run.error else ""), flush=True)
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
        Path(args.json).write_text(json.dumps(
            [{**r.__dict__, "msgs_per_s": r.msgs_per_s, "server_ms_system": r.server_ms_system,
              "server_ms_tree": r.server_ms_tree, "generator_ms": r.generator_ms,
              "accept_msgs_per_s": r.accept_msgs_per_s, "receiver_ms": r.receiver_ms}
             for s in summaries.values() for r in s.runs], indent=1))
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


if __name__ == "__main__":
    sys.exit(main())
