"""Process control: the servers' process trees from /proc, stopping children, leftovers.

A tree is a snapshot {pid: (ppid, start time, CPU ticks)}; the start time tells a
process from a later one that reuses its PID, so nothing but our own is ever signalled.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from .common import CLK_TCK, READY_TIMEOUT_S, REPO, STOP_TIMEOUT_S


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


def tree_memory(root: int) -> tuple[int, int]:
    """(resident, anonymous) memory of root and its live descendants, in octets, summed.

    Resident (VmRSS) counts the file-backed pages a process maps -- an LMDB map, shared
    libraries -- once per process that maps them; anonymous (RssAnon) is each process's
    own memory, what a queue costs."""
    rss = anon = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                text = f.read()
        except OSError:
            continue
        for key, kb in re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", text, re.M):
            if key == "VmRSS":
                rss += int(kb) * 1024
            else:
                anon += int(kb) * 1024
    return rss, anon


def tree_costs(root: int) -> dict[str, tuple[int, int]]:
    """{title: (CPU ticks, context switches)} of root and each live descendant: ticks as
    :func:`read_procs` counts them (all threads, and children reaped: the supervisor's
    include a child that died meanwhile), context switches voluntary and not, summed
    over its threads (/proc/PID/task/*/status).  The title is the first word of the
    command line with an ``mta: `` prefix dropped ("acceptor[0]"); processes with the
    same title are summed.  Compare two snapshots with :func:`cost_per_message`."""
    out: dict[str, tuple[int, int]] = {}
    for pid, (_ppid, _start, ticks) in process_tree(root).items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode("utf-8", "replace")
            switches = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches",
                                            "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
        except OSError:
            continue        # (gone meanwhile)
        title = title.strip().removeprefix("mta: ") or f"pid {pid}"
        t0, s0 = out.get(title, (0, 0))
        out[title] = (t0 + ticks, s0 + switches)
    return out


def cost_per_message(before: dict, after: dict, messages: int) -> dict[str, tuple[float, float]]:
    """{title: (µs of CPU per message, context switches per message)} between two
    :func:`tree_costs` snapshots, for the processes in both (one that was restarted
    between them is left out: its counters began again)."""
    out = {}
    if messages <= 0:
        return out
    for title, (t1, s1) in after.items():
        if title in before:
            t0, s0 = before[title]
            if t1 >= t0 and s1 >= s0:
                out[title] = ((t1 - t0) / CLK_TCK * 1e6 / messages, (s1 - s0) / messages)
    return out


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


def run_group(cmd: list[str], timeout_s: float, *, check: bool = False, text: bool = False,
              **kw) -> subprocess.CompletedProcess:
    """subprocess.run with captured output, but the command runs in its own session and a
    timeout SIGKILLs its whole process group (subprocess.run kills only the child, and a
    load generator's own children -- fixed_rate.py's C engine -- would run on)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        r.check_returncode()
    return r


def start_mta(config: Path, cwd: Path, log_path: Path,
              timeout_s: float = READY_TIMEOUT_S) -> tuple[subprocess.Popen, object]:
    """`python -m mta serve -c CONFIG` from this checkout, in its own session, its output
    appended to *log_path*; returns (process, open log file) once the log says "ready:
    accepting" (every child up).  A daemon that exits or is not ready within *timeout_s*
    is stopped and RuntimeError carries the log's tail."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(log_path, "ab")
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "-c", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while b"ready: accepting" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mta did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(0.05)
    except BaseException:
        if proc is not None:
            stop_child(proc)
        log.close()
        raise
    return proc, log
