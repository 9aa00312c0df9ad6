"""One measured run of one target: acceptance (measure) or end to end (measure_e2e)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .common import POLL_S, SETTLE_S, STOP_TIMEOUT_S
from .cpu import background_busy_rate, self_cpu_s, steal_s, system_busy_s, tree_cpu_s
from .source import probe, run_source
from .targets import TARGETS, Receiver, Target


@dataclass
class Run:
    target: str
    messages: int
    wall_s: float
    system_busy_s: float
    generator_cpu_s: float
    harness_cpu_s: float
    background_cpu_s: float
    tree_cpu_s: float
    probe_reply: str = ""
    error: str | None = None
    # --e2e only
    receiver_cpu_s: float = 0.0     # smtp-sink's CPU over the window
    accept_wall_s: float = 0.0      # wall time of smtp-source (acceptance only)
    queue_confirm_s: float = 0.0    # mta: done until `mta queue --json` said 0 (incl. its start)
    lat_n: int = 0
    lat_p50_ms: float = 0.0
    lat_p99_ms: float = 0.0
    lat_max_ms: float = 0.0
    steal_s: float = 0.0            # CPU taken by the hypervisor over the window

    @property
    def steal_cores(self) -> float:
        return self.steal_s / self.wall_s

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.wall_s

    @property
    def server_ms_system(self) -> float:
        """System-wide busy CPU not spent by the generator, harness or background, per msg."""
        rest = (self.system_busy_s - self.generator_cpu_s - self.harness_cpu_s
                - self.background_cpu_s - self.receiver_cpu_s)
        return 1000.0 * rest / self.messages

    @property
    def accept_msgs_per_s(self) -> float:
        return self.messages / self.accept_wall_s if self.accept_wall_s else 0.0

    @property
    def receiver_ms(self) -> float:
        return 1000.0 * self.receiver_cpu_s / self.messages

    @property
    def server_ms_tree(self) -> float:
        return 1000.0 * self.tree_cpu_s / self.messages

    @property
    def generator_ms(self) -> float:
        return 1000.0 * self.generator_cpu_s / self.messages


def measure(args, name: str, rundir: Path) -> Run:
    """One run: fresh target, probe, warm-up, measured batch, check, stop."""
    rundir.mkdir()
    bg_rate = background_busy_rate(args.idle_sample, args.wait_idle)
    target = TARGETS[name](args, rundir)
    try:
        target.start()
        reply = probe(target.port)
        warning = target.check_probe(reply)
        if warning:
            print(f"  warning: {warning}", file=sys.stderr)
        if args.warmup:
            run_source(args, target.port, args.warmup, rundir / "warmup.out")
        time.sleep(SETTLE_S)

        busy0, self0, tree0 = system_busy_s(), self_cpu_s(), tree_cpu_s(target.root_pid)
        steal0 = steal_s()
        src = run_source(args, target.port, args.messages, rundir / "source.out")
        busy1, self1, tree1 = system_busy_s(), self_cpu_s(), tree_cpu_s(target.root_pid)

        run = Run(name, args.messages, src.wall_s, busy1 - busy0, src.cpu_s, self1 - self0,
                  bg_rate * src.wall_s, tree1 - tree0, reply, steal_s=steal_s() - steal0)
        run.error = target.check(1 + args.warmup + args.messages)
        return run
    finally:
        target.stop()



# --------------------------------------------------------------------------------------------
# End to end (--e2e)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 < p <= 100) of an ascending list."""
    k = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return sorted_values[int(k) - 1]


class Drain:
    """--e2e: when has a target delivered everything?  done(expected) is cheap; call often."""

    def __init__(self, target: Target, receiver: Receiver):
        self.target = target
        self.receiver = receiver
        target.open_deliveries()

    def done(self, expected: int) -> bool:
        if self.receiver.count() < expected:
            self.target.poll_deliveries()
            return False
        self.target.poll_deliveries()
        return self.target.delivered_all(expected)

    def state(self) -> str:
        return f"receiver has {self.receiver.count()}; {self.target.delivery_state()}"

    def wait(self, expected: int, deadline: float, what: str) -> float:
        """Poll until done(expected); return perf_counter then.  Bounded by deadline."""
        while not self.done(expected):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{what}: not all {expected} delivered in time ({self.state()})")
            time.sleep(POLL_S)
        return time.perf_counter()


def measure_e2e(args, name: str, rundir: Path) -> Run:
    """One end-to-end run: fresh receiver and target, probe + warm-up delivered, then the
    measured batch, timed until the receiver has it all and the target's queue is empty."""
    rundir.mkdir()
    bg_rate = background_busy_rate(args.idle_sample, args.wait_idle)
    receiver = Receiver(rundir)
    target = TARGETS[name](args, rundir)
    source_pid: list = []
    result: dict = {}
    thread = drain = None
    try:
        receiver.start()
        target.sink_port = receiver.port
        target.start()
        drain = Drain(target, receiver)
        reply = probe(target.port)
        if args.warmup:
            run_source(args, target.port, args.warmup, rundir / "warmup.out")
        warm = 1 + args.warmup
        drain.wait(warm, time.monotonic() + args.timeout, "probe and warm-up")
        target.settle()
        time.sleep(SETTLE_S)

        expected = warm + args.messages
        target.mark()

        def source():
            try:
                result["src"] = run_source(args, target.port, args.messages,
                                           rundir / "source.out", source_pid)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                result["error"] = e

        t0_wall = time.time()
        busy0, self0, tree0 = system_busy_s(), self_cpu_s(), tree_cpu_s(target.root_pid)
        steal0 = steal_s()
        sink0 = receiver.cpu_s()
        thread = threading.Thread(target=source, name="smtp-source", daemon=True)
        thread.start()
        deadline = time.monotonic() + args.timeout
        while not source_pid and thread.is_alive():
            time.sleep(0.001)
        while True:
            if "error" in result:
                raise result["error"]
            if drain.done(expected):
                t_done = time.perf_counter()
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"not delivered within --timeout {args.timeout:.0f} s "
                                   f"({drain.state()})")
            time.sleep(POLL_S)
        busy1, self1, tree1 = system_busy_s(), self_cpu_s(), tree_cpu_s(target.root_pid)
        steal1 = steal_s()
        sink1 = receiver.cpu_s()
        thread.join(args.timeout)
        if "error" in result:
            raise result["error"]
        if thread.is_alive() or "src" not in result:
            raise RuntimeError("smtp-source did not finish")
        src = result["src"]
        wall = t_done - source_pid[0][1]

        run = Run(name, args.messages, wall, busy1 - busy0, src.cpu_s, self1 - self0,
                  bg_rate * wall, tree1 - tree0, reply,
                  receiver_cpu_s=sink1 - sink0, accept_wall_s=src.wall_s,
                  steal_s=steal1 - steal0)

        # Confirmation, outside the measured window.
        errors, lats = target.confirm(run, t0_wall)
        time.sleep(SETTLE_S)
        got = receiver.count()
        if got != expected:
            errors.append(f"receiver got {got} messages, expected exactly {expected}"
                          + (" (duplicates)" if got > expected else ""))
        n_rcpts = args.messages * getattr(args, "rcpts", 1)   # (one latency per recipient)
        if len(lats) != n_rcpts:
            errors.append(f"latency for {len(lats)} of {n_rcpts} measured recipients")
        if lats:
            lats.sort()
            run.lat_n = len(lats)
            run.lat_p50_ms = 1000.0 * percentile(lats, 50)
            run.lat_p99_ms = 1000.0 * percentile(lats, 99)
            run.lat_max_ms = 1000.0 * lats[-1]
        run.error = "; ".join(errors) or None
        return run
    finally:
        if thread is not None and thread.is_alive() and source_pid:
            try:  # interrupted or failed mid-run: never leave the generator running (the
                # thread still waits for it, so the pid is not reaped and still ours)
                os.killpg(source_pid[0][0], signal.SIGKILL)
            except ProcessLookupError:
                pass
            thread.join(STOP_TIMEOUT_S)
        target.close_deliveries()
        target.stop()
        receiver.stop()

