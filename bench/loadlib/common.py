"""Paths, loopback, time bounds, and the small helpers every part of the harness uses."""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
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
POLL_S = 0.005              # --e2e: how often the harness checks whether a run is done
CONFIRM_TIMEOUT_S = 30.0    # --e2e: after done, until `mta queue` must say 0 / logs complete

SINK_BACKLOG = 1000


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
