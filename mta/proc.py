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
import time

import setproctitle

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _Formatter(logging.Formatter):
    """logging.Formatter's line, with the time's text made once a second.

    A delivery process logs a line per recipient (as Postfix's smtp does); the
    stock formatTime calls localtime() and strftime() for each of them.
    """

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._text, record.msecs)


def setup_logging(level: str, name: str) -> None:
    """Diagnostic log to stderr: time, level, process name and id, message.

    The process id is written into the format here, in the process that logs
    (each role calls this after the fork), so records need not look it up;
    nor the thread, the multiprocessing name or the calling function, which
    the line does not show.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None         # (documented: skips the caller's frame lookup)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(
        f"%(asctime)s %(levelname)s {name}[{os.getpid()}]: %(message)s"))
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
