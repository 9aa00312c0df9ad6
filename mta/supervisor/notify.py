"""sd_notify: tell systemd about readiness, reloads and shutdown (Type=notify),
and keep its watchdog (WatchdogSec=) fed.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
named by $NOTIFY_SOCKET ('@' means the abstract namespace).  Without that
variable every call is a no-op, so the daemon runs the same outside systemd.

Watchdog: systemd passes the interval in $WATCHDOG_USEC (and the process it is
for in $WATCHDOG_PID) and kills the unit when no WATCHDOG=1 came within it.
:func:`take_watchdog` takes both out of the environment (children must not
inherit them); :func:`watchdog` sends WATCHDOG=1 when half the interval has
passed since the last one.  The supervisor calls it from each wait of its loop
(none longer than a TICK), never from a thread: a loop that wedges stops it.
So an interval below :data:`MIN_WATCHDOG_USEC` (1 s) may be missed by a loop
that is a TICK late: the supervisor warns of it at start (it cannot change it).
"""
import os
import socket
import time

_watchdog = {"usec": 0, "every": 0.0, "next": 0.0}
MIN_WATCHDOG_USEC = 1_000_000   # shorter WatchdogSec= than this: warned of at start


def notify(*lines: str) -> bool:
    """Send *lines* to systemd; False when not under systemd or the send failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), path)
        return True
    except OSError:
        return False


def enabled() -> bool:
    """Whether there is a systemd to tell ($NOTIFY_SOCKET)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def take_watchdog(environ=os.environ) -> int:
    """Take $WATCHDOG_USEC and $WATCHDOG_PID out of *environ*; the interval in
    microseconds when the watchdog is this process's (no $WATCHDOG_PID, or it names
    this process), else 0.  From then on :func:`watchdog` pings at half of it."""
    usec = environ.pop("WATCHDOG_USEC", "")
    pid = environ.pop("WATCHDOG_PID", "")
    n = int(usec) if usec.isdigit() else 0
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        n = 0
    _watchdog.update(usec=n, every=n / 2e6, next=0.0)
    return n


def watchdog_usec() -> int:
    """The watchdog interval taken by :func:`take_watchdog` (0: none), for a process
    that takes over from this one (``mta upgrade``)."""
    return _watchdog["usec"]


def watchdog() -> None:
    """WATCHDOG=1 if half the interval has passed since the last one (a clock read
    otherwise)."""
    if not _watchdog["usec"]:
        return
    now = time.monotonic()
    if now >= _watchdog["next"]:
        _watchdog["next"] = now + _watchdog["every"]
        notify("WATCHDOG=1")
