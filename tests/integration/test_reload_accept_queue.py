"""A reload that lowers smtp.acceptors and the connections waiting in the removed
acceptors' accept queues.

The removed slots' listening sockets are closed; the kernel resets what waits in
their queues unless ``net.ipv4.tcp_migrate_req`` is 1, which hands it to the sockets
of the acceptors that stay (contrib/60-mta.conf sets it).  In a private network
namespace (accept_queue_job.py: the sysctl is the namespace's own), SMTP and HTTP
clients connect without pause through two reloads from 2 acceptors to 1 and back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from dkimtools.verifiers import netns

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accept_queue_job.py")
WARNING = "reload: smtp.acceptors lowered from 2 to 1: connections waiting in the accept queues"


def run_job(tmp_path, migrate: int) -> dict:
    r = subprocess.run(netns() + [sys.executable, JOB, str(tmp_path / "d"), str(migrate)],
                       capture_output=True, timeout=240)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-4000:]
    out = json.loads(r.stdout)
    log = out["log"]
    assert log.count("reloaded: ") == 4, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    for kind, c in out["counts"].items():
        assert not c["other"], (kind, c["other"][:5])
        assert c["served"] > 100, (kind, c)
    return out


def test_with_tcp_migrate_req_no_queued_connection_is_reset(tmp_path):
    out = run_job(tmp_path, 1)
    assert {k: c["reset"] for k, c in out["counts"].items()} == {"smtp": 0, "http": 0}, \
        out["counts"]
    assert WARNING not in out["log"]


def test_without_it_the_reload_says_that_queued_connections_are_reset(tmp_path):
    out = run_job(tmp_path, 0)
    lines = [x for x in out["log"].splitlines() if WARNING in x]
    assert len(lines) == 2, out["log"][-4000:]     # (each reload that lowers them)
    assert "net.ipv4.tcp_migrate_req is 0" in lines[0] and "contrib/60-mta.conf" in lines[0]
