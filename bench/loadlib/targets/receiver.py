"""--e2e: the receiver every target delivers to, an smtp-sink counting what it gets."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..cpu import tree_cpu_s
from ..common import wait_banner
from ..procs import stop_child
from .sink import sink_alive, smtp_sink_command, start_smtp_sink


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
        return smtp_sink_command(port, "-c")

    def start(self) -> None:
        self.port, self.proc = start_smtp_sink(self.out, "-c")
        self.fd = os.open(self.out, os.O_RDONLY | os.O_CLOEXEC)
        wait_banner(self.port, lambda: sink_alive(self.proc, self.out))

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
