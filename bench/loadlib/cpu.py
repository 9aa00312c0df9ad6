"""CPU accounting: busy time of the whole machine, hypervisor steal, this harness's own
CPU, a process tree's CPU, and the background rate sampled before each run."""
from __future__ import annotations

import resource
import time

from .common import BACKGROUND_WARN_CORES, CLK_TCK
from .procs import process_tree


def system_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


def steal_s() -> float:
    """CPU seconds the hypervisor gave to other guests since boot (/proc/stat steal).

    The machines are shared virtual machines: when the host is oversubscribed
    this grows and every figure of the run is slowed, whatever its target.
    Each run reports it so that such runs can be recognised."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / CLK_TCK if len(fields) > 8 else 0.0


def self_cpu_s() -> float:
    """CPU seconds this harness process has used."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by root, its live descendants and their reaped children."""
    return sum(ticks for _ppid, _start, ticks in process_tree(root).values()) / CLK_TCK


def background_busy_rate(sample_s: float, wait_s: float) -> float:
    """Busy CPU seconds per second of the machine while we sleep, in sample_s windows.

    Repeats the window (for at most wait_s) until the machine is idle, so that a run does
    not start while something else (or the previous run's writeback) is using the CPU."""
    if sample_s <= 0:
        return 0.0
    deadline = time.monotonic() + wait_s
    while True:
        b0, t0 = system_busy_s(), time.perf_counter()
        time.sleep(sample_s)
        rate = (system_busy_s() - b0) / (time.perf_counter() - t0)
        if rate <= BACKGROUND_WARN_CORES or time.monotonic() >= deadline:
            return rate
