"""sd_notify: tell systemd about readiness, reloads and shutdown (Type=notify).

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
named by $NOTIFY_SOCKET ('@' means the abstract namespace).  Without that
variable every call is a no-op, so the daemon runs the same outside systemd.
"""
import os
import socket
import time


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


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")
