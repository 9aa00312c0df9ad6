"""The files a delivery (or webhooks) process keeps in the run / state directory are
written by the old (draining) and the new process of one index at once during a reload:
each must write through a temporary name of its own."""
from __future__ import annotations

import os
import subprocess
import sys

import orjson

from mta.api import webhookdb
from mta.delivery import main as delivery_main

ROUNDS = 800

WRITER = """
import sys
from mta.api import webhookdb
from mta.delivery import main as delivery_main
path, state, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(rounds):
    delivery_main._write(path, {"pid": "other", "n": i, "pad": "y" * 3000})
    webhookdb.write_min_seq(state, 10 ** 9 + i)
"""


def test_two_processes_writing_the_same_status_files_at_once_both_succeed(tmp_path):
    path = str(tmp_path / "delivery-0.status.json")
    state = str(tmp_path / "state")
    os.makedirs(webhookdb.dir_in(state))
    webhookdb.write_min_seq(state, 1)
    other = subprocess.Popen([sys.executable, "-c", WRITER, path, state, str(ROUNDS)],
                             stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    errors = []
    try:
        for i in range(ROUNDS):
            try:
                delivery_main._write(path, {"pid": "me", "n": i, "pad": "x" * 5000})
                webhookdb.write_min_seq(state, i)
            except OSError as exc:      # (the other's rename took our .tmp away)
                errors.append(exc)
            with open(path, "rb") as fh:
                doc = orjson.loads(fh.read())       # never a mix of the two
            assert doc["pad"] in ("x" * 5000, "y" * 3000)
            assert webhookdb.read_min_seq(state) is not None
    finally:
        _, err = other.communicate(timeout=120)
    assert errors == [] and other.returncode == 0, (errors[:3], err.decode()[-2000:])
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
