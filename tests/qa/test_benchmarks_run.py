"""The microbenchmarks (bench/test_bench_*.py, `tox -e bench`) still run against the code.

They drive the roles' internals in process -- a delivery process fed by a stood-in
shard, an acceptor on a fake transport -- and the suite does not import them, so a
change to those internals broke two of them unnoticed (the acceptors' bus.Client,
gone with their move to a stream; StreamClient asking its transport is_closing()).
Here each runs once, as `tox -e bench` runs it; their figures are not looked at
(benchmarks are measured on a quiet machine, not in the suite): that they run, and
their own checks (every message delivered, every reply as expected) hold.
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_microbenchmark_runs(tmp_path):
    # (a run of its own: under this suite's xdist workers PYTEST_XDIST_WORKER would tell
    # pytest-benchmark that xdist is on, and it refuses to measure there)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
         "-o", f"cache_dir={tmp_path}", "bench"],
        cwd=REPO, capture_output=True, text=True, timeout=280, env=env)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "failed" not in r.stdout, tail
