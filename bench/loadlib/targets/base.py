"""What the harness asks of a server under test; each target module implements it."""
from __future__ import annotations

from pathlib import Path


class Target:
    """A server under test.  start() sets port and root_pid; stop() must always be safe.

    --e2e adds the questions of a delivering server, asked in this order: open_deliveries()
    once it has started; poll_deliveries() and delivered_all() while the harness waits;
    settle() after the warm-up was delivered; mark() just before the measured batch;
    confirm() once it is delivered; close_deliveries() always, at the end."""

    name = "?"
    durable = False
    queue_confirm = False   # --e2e: the run line reports how long the queue took to say 0
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

    def check_probe(self, reply: str) -> str | None:
        """A warning if the reply to the probe's DATA is not what this server should say."""
        return None

    def check(self, expected: int) -> str | None:
        """After a run: an error text if the server did not keep what it accepted."""
        return None

    def describe(self) -> list[str]:
        """Command lines and settings, for RESULTS.md."""
        return []

    # --e2e ---------------------------------------------------------------------------------

    def open_deliveries(self) -> None:
        """Start following the server's own record of its deliveries."""

    def poll_deliveries(self) -> None:
        """Read what the server recorded since the last call (cheap; called every few ms).
        Raises RuntimeError at once on an outcome that would only be retried later."""

    def delivered_all(self, expected: int) -> bool:
        """Has the server recorded a delivery of everything (once the receiver has it all)?"""
        raise NotImplementedError

    def delivery_state(self) -> str:
        """What the server says it holds, for the error when a run is not done in time."""
        return ""

    def settle(self) -> None:
        """After the probe and warm-up are delivered: wait until the server is idle."""

    def mark(self) -> None:
        """Just before the measured batch: note where its records start."""

    def confirm(self, run, since: float) -> tuple[list[str], list[float]]:
        """After the measured batch, outside the window: (errors, latencies in seconds of
        the messages received at or after since, epoch seconds).  May fill in run."""
        raise NotImplementedError

    def close_deliveries(self) -> None:
        """Release what open_deliveries() holds; safe to call more than once."""
