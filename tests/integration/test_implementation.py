"""The daemon runs the hot-path implementation the environment asks for, and says so.

With ``MTA_PUREPYTHON=1`` every process of ``mta serve`` must run the pure-Python
twins (scanner, record codec, mime), otherwise the compiled modules; the log line
of each acceptor and spool shard names what it really imported.  scripts/run-tests
runs this file in both passes, so the twin pass is shown to test the twins.
"""
from __future__ import annotations

import os
import re

import smtplib

EXPECTED = ("pure-python" if os.environ.get("MTA_PUREPYTHON", "") not in ("", "0")
            else "compiled")


def test_every_process_runs_the_implementation_asked_for(make_daemon):
    d = make_daemon(acceptors=2, shards=2)
    # A message through it, so the acceptor's scanner and the spool's codec have done work.
    with smtplib.SMTP("127.0.0.1", d.port, local_hostname="client.test", timeout=30) as s:
        s.sendmail("a@example.com", ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n")
    lines = re.findall(r"(acceptor|spool)\[(\d+)\]\[\d+\]: starting \S+; hot-path "
                       r"implementation (.+)", d.log())
    seen = {(role, int(n)) for role, n, _ in lines}
    assert seen == {("acceptor", 0), ("acceptor", 1), ("spool", 0), ("spool", 1)}, lines
    assert {impl.strip() for _, _, impl in lines} == {EXPECTED}, lines
