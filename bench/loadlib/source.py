"""The load: Postfix's smtp-source, the same settings for every target, and the probe."""
from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .common import LOOPBACK, PROBE_TIMEOUT_S, tool


def source_command(args, port: int, count: int) -> list[str]:
    cmd = [tool("smtp-source"), "-s", str(args.sessions), "-m", str(count),
           "-l", str(args.size)]
    if not args.per_connection:
        cmd.append("-d")  # reuse connections
    if getattr(args, "wait", 0) > 0:
        cmd += ["-w", str(args.wait)]  # a fixed pause after each message: a paced load
    if getattr(args, "random_wait", 0) > 0:
        cmd += ["-R", str(args.random_wait)]  # a random pause: paced, sessions out of step
    if getattr(args, "rcpts", 1) > 1:
        cmd += ["-r", str(args.rcpts)]
    cmd += ["-c", "-f", args.sender, "-t", args.rcpt, f"{LOOPBACK}:{port}"]
    return cmd


def pacing(args) -> str:
    """How --wait / --random-wait pace the sessions, for reports ("" when they do not)."""
    if getattr(args, "wait", 0) > 0:
        return (f"each session pausing {args.wait} s after each message (-w {args.wait}: "
                f"about {args.sessions / args.wait:,.0f} msgs/s offered)")
    if getattr(args, "random_wait", 0) > 0:
        return (f"each session pausing a random 0-{args.random_wait} s after each message "
                f"(-R {args.random_wait}: about {2 * args.sessions / args.random_wait:,.0f} "
                "msgs/s offered)")
    return ""


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
