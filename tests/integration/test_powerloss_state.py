"""Power loss and the state beside the spool: the events store, the event log.

The events process moves each shard's events cursor (in the spool, here on the
ordinary disk, so it survives) only after it has synced the event log and the
events store.  Everything the cursor has passed must therefore still be in the
log and in the store after a power cut -- what is past it is read again from
the spool.  Here the store (``events.store_path``) and the event log
(``server.event_log``) are on crashfs (tests/crashfs.py), which keeps only
what fsync made durable (file contents) and what a directory fsync made
durable (names), and a power cut (kill -9 of the daemon, then crashfs
unmounted and mounted again) is made after the cursors passed every event.
"""
from __future__ import annotations

import json
import os
import smtplib
import time

import pytest

from crashfs import CrashFS
from daemon import HOST, wait_until

from mta.feedback.events_store import EventStore

MESSAGES = 12


@pytest.fixture
def crashfs(tmp_path):
    fs = CrashFS(str(tmp_path / "statefs"), str(tmp_path / "statefs.image"),
                 str(tmp_path / "crashfs.log"))
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


def cursors(d) -> list[str]:
    spool = os.path.join(d.state_dir, "spool")
    return sorted(os.path.join(spool, n, "events.cursor") for n in os.listdir(spool)
                  if n.startswith("shard-")
                  and os.path.exists(os.path.join(spool, n, "events.cursor")))


def injections_in_log(path: str) -> set[str]:
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return set()
    return {e["message_id"] for e in map(json.loads, lines) if e.get("type") == "injection"}


def injections_in_store(path: str) -> set[str]:
    try:
        st = EventStore(path, map_size=1 << 26, retention=86400.0, readonly=True)
    except (FileNotFoundError, OSError):
        return set()
    try:
        return {e["message_id"] for _, e in st.read(0, 100_000) if e["type"] == "injection"}
    finally:
        st.close()


def test_power_cut_after_a_checkpoint_keeps_every_event_the_cursors_passed(make_daemon,
                                                                          crashfs):
    log_path = os.path.join(crashfs.mountpoint, "log", "events.jsonl")
    store_path = os.path.join(crashfs.mountpoint, "events")
    d = make_daemon(start=False, acceptors=1, shards=2,
                    server={"event_log": log_path},
                    events={"store": True, "store_path": store_path,
                            "checkpoint_interval": 0.1, "store_max_size": 1 << 26})
    try:
        d.start()
        with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
            for i in range(MESSAGES):
                assert not s.sendmail("a@sender.test", [f"r{i}@dest.test"],
                                      b"Subject: p\r\n\r\nbody\r\n")
        listed = d.queue_list()
        qids = {x["queue_id"].lower() for x in listed}
        assert len(qids) == MESSAGES
        # every injection event written and synced, the cursors moved past them
        wait_until(lambda: injections_in_log(log_path) >= qids, 20, "the injection events")
        wait_until(lambda: len(cursors(d)) == 2, 20, "both shards' events cursors")
        time.sleep(1.0)          # (several checkpoints: nothing is left unsynced)
        d.kill9()
        crashfs.crash()
        d.start()
        # what the cursors passed is not read again: it must have survived
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not injections_in_log(log_path) >= qids:
            time.sleep(0.1)
        in_log = injections_in_log(log_path)
        assert d.stop() == 0, d.log()[-3000:]
        in_store = injections_in_store(store_path)
        assert not qids - in_log, f"injection events gone from the event log: {qids - in_log}"
        assert not qids - in_store, \
            f"injection events gone from the events store: {qids - in_store}"
    finally:
        d.cleanup()
        d.kill9()

