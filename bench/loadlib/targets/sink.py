"""Target sink: Postfix's smtp-sink, which keeps nothing -- the ceiling of the generator and
loopback on this machine."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from ..common import LOOPBACK, SINK_BACKLOG, free_port, tail, tool, wait_banner
from ..procs import stop_child
from .base import Target


def smtp_sink_command(port, *options: str) -> list[str]:
    """smtp-sink on 127.0.0.1:port with its listen backlog, as nobody when we are root."""
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses root
    return [tool("smtp-sink"), *options, *user, f"{LOOPBACK}:{port}", str(SINK_BACKLOG)]


def start_smtp_sink(out: Path, *options: str) -> tuple[int, subprocess.Popen]:
    """Start smtp-sink (with options) on a free port in its own session, its output to out.
    Returns (port, process); the caller waits for its 220 with sink_alive()."""
    port = free_port()
    with open(out, "wb") as f:
        proc = subprocess.Popen(smtp_sink_command(port, *options), stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return port, proc


def sink_alive(proc: subprocess.Popen, out: Path) -> None:
    """Raise if the smtp-sink has exited (with the end of its output)."""
    if proc.poll() is not None:
        raise RuntimeError(f"smtp-sink exited with {proc.returncode}: {tail(out)}")


class SinkTarget(Target):
    name = "sink"
    durable = False

    def __init__(self, args, rundir):
        super().__init__(args, rundir)
        self.proc = None

    def command(self, port) -> list[str]:
        return smtp_sink_command(port)

    def start(self):
        log = self.rundir / "smtp-sink.log"
        self.port, self.proc = start_smtp_sink(log)
        self.root_pid = self.proc.pid
        wait_banner(self.port, lambda: sink_alive(self.proc, log))

    def stop(self):
        if self.proc is not None:
            stop_child(self.proc)

    def describe(self):
        return [shlex.join(self.command(0)).replace(":0", ":PORT")]
