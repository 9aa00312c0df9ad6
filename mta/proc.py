"""What every role does when it starts in a freshly forked child.

``start_role`` sets the process title (``mta: spool[2]``), resets the signal
dispositions inherited from the supervisor and configures logging.
``report_ready`` tells the supervisor, over the pipe it handed down, that the
role has finished starting (sockets bound, spool recovered).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import setproctitle

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup_logging(level: str, name: str) -> None:
    """Diagnostic log to stderr: time, level, process name, message."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {name}[%(process)d]: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))


def start_role(role: str, index: int | None, log_level: str) -> str:
    """Title, signals and logging for a new child; returns its display name."""
    name = f"{role}[{index}]" if index is not None else role
    setproctitle.setproctitle(f"mta: {name}")
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C in a terminal reaches the whole process group; only the supervisor acts on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(log_level, name)
    return name


def report_ready(fd: int | None) -> None:
    """Tell the supervisor this child is up."""
    if fd is None:
        return
    try:
        os.write(fd, b"R")
    finally:
        os.close(fd)
