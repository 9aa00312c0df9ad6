"""A spool shard takes mail while it rebuilds a large queue at start (issue 15, item 2).

The queue a previous run left -- many messages written by the store itself -- is read a
slice at a time (``spool.recovery_slice``; 1 here, so that reading takes seconds); a
message sent meanwhile is acknowledged (after its fsync, into a new segment) before the
shard has read the old ones, which the queue summary says.  Then nothing is lost: every
old message and the new one are queued; and the same after a kill -9 in the middle of
the recovery.
"""
from __future__ import annotations

import os
import time

from daemon import Daemon, wait_until
from mta.queueid import new_qid_for_shard
from mta.store import MessageMeta, Store, shard_dir
from test_admin_api import admin_call, message

QUEUED = 200_000     # read one record per slice: ~3 s, well past the first 250 (~1 s)


def fill(d: Daemon, n: int) -> set[str]:
    """n single-recipient messages in shard 0, as a previous run would have left them."""
    st = Store(shard_dir(os.path.join(d.state_dir, "spool"), 0), 64 << 20, fsync=False)
    st.recover()
    qids = set()
    body = message("queued before the start")
    for first in range(0, n, 5000):
        items = []
        for i in range(first, min(n, first + 5000)):
            q = new_qid_for_shard(0, 1)
            qids.add(q)
            items.append((MessageMeta(q, "old@sender.test", [f"r{i}@held.test"], time.time(),
                                      {}, "client.test [127.0.0.1]"), body))
        new = st.write(items, [])
        st.sync()
        st.commit(new, [])
    st.close()
    assert len(qids) == n
    return qids


def shard0(d: Daemon) -> dict:
    st, _, q = admin_call(d, "GET", "/api/admin/queue")
    assert st == 200, q
    return q["shards"][0]


def test_a_shard_takes_mail_while_it_rebuilds_a_large_queue_and_loses_nothing(tmp_path):
    d = Daemon(tmp_path, acceptors=1, shards=1, spool={"recovery_slice": 1})
    old = fill(d, QUEUED)
    try:
        d.start()                                  # ready: the 220 banner answers
        qid = d.send("new@sender.test", ["new@held.test"], message("during recovery"))
        s = shard0(d)
        assert s["recovering"] is True, s          # the 250 came before the old queue was read
        assert "recovered queue" not in d.log(since_start=True)
        # A delete, and a question that needs the whole queue, wait for it; then answered.
        t = time.monotonic()
        gone = max(old)              # (the last one written: the last one the shard reads)
        assert d.cli("queue", "delete", gone).stdout.decode().strip() == "deleted 1 message(s)"
        old.discard(gone)
        assert f"recovered queue: messages={QUEUED + 1} segments=1 records={QUEUED} " in \
            d.log(since_start=True)
        s = shard0(d)
        assert (s["recovering"], s["messages"]) == (False, QUEUED), (s, time.monotonic() - t)
        for q in (qid, min(old)):
            assert admin_call(d, "GET", f"/api/admin/messages/{q}")[0] == 200, q
        assert admin_call(d, "GET", f"/api/admin/messages/{gone}")[0] == 404

        # kill -9 while the next start is still reading: the message taken meanwhile and the
        # whole old queue are there after the one after.
        d.stop()
        d.start()
        qid2 = d.send("new@sender.test", ["new2@held.test"], message("during recovery 2"))
        assert shard0(d)["recovering"] is True
        d.kill9()
        d.sections["spool"]["recovery_slice"] = 2000
        d.write_config()
        d.start()
        wait_until(lambda: not shard0(d)["recovering"], 60, "the recovery")
        assert shard0(d)["messages"] == QUEUED + 1      # the old ones but one, and two new
        for q in (qid, qid2, min(old), max(old)):
            assert admin_call(d, "GET", f"/api/admin/messages/{q}")[0] == 200, q
        d.stop()
    finally:
        d.cleanup()


def test_a_flush_while_a_shard_reads_its_queue_is_answered_at_once_and_done_after(tmp_path):
    """`mta queue flush` (--queue-id, or all) while a shard still read its queue at start
    waited for the end of that reading without a word, and after 5 s said the shard "did
    not answer" and that nothing was flushed there -- while the shard flushed it later all
    the same.  It is now answered at once, says the shard is recovering, and is done
    once the queue is read."""
    import json
    import re

    d = Daemon(tmp_path, acceptors=1, shards=1, spool={"recovery_slice": 1})
    old = fill(d, QUEUED)
    try:
        d.start()
        assert shard0(d)["recovering"] is True
        last = max(old)              # (the last one the shard reads)
        t = time.monotonic()
        r = d.cli("queue", "flush", "--queue-id", last, "--json")
        took = time.monotonic() - t
        assert json.loads(r.stdout) == {"flushed": 0, "not_queued": [],
                                        "recovering_shards": [0]}, r
        r = d.cli("queue", "flush", "--queue-id", last)
        assert b"spool shard(s) 0 still reading their queue after a start: the flush is " \
            b"done there once they have" in r.stderr, r
        r = d.cli("queue", "flush")
        assert b"1 spool shard(s) still reading their queue" in r.stderr, r
        assert shard0(d)["recovering"] is True, took     # answered before the end of it
        assert took < 5, took
        wait_until(lambda: not shard0(d)["recovering"], 60, "the recovery")
        log = d.log(since_start=True)
        end = log.index("recovered queue:")
        assert re.search(rf"queue flush \(queue_id={last}\): \d+ deferred", log[end:]), log[end:]
        assert re.search(r"queue flush: \d+ deferred", log[end:]), log[end:]
        d.stop()
    finally:
        d.cleanup()


def test_show_and_inspect_while_a_shard_reads_its_queue_say_it_is_recovering(tmp_path):
    """`mta queue show QID` and `mta inspect QID` (GET /api/admin/messages/QID) while the
    shard owning QID still read its queue at start waited 5 s and then said the daemon
    (the spool) was "not answering" -- though it was, and would know in a moment.  The
    shard now answers at once that it is recovering, with the status an older reader
    takes as "try again" (never "not queued"); the commands say so (exit 69), the API
    answers 503 with Retry-After; once the queue is read, the message is shown."""
    # (read for longer than the commands' bound: [admin] shard_timeout, 1 s here)
    d = Daemon(tmp_path, acceptors=1, shards=1, spool={"recovery_slice": 1},
               admin={"shard_timeout": 1.0})
    old = fill(d, QUEUED)
    last = max(old)
    try:
        d.start()
        assert shard0(d)["recovering"] is True
        t = time.monotonic()
        r = d.cli("queue", "show", last, check=False)
        assert r.returncode == 69, r
        assert b"spool[0] (the shard of " in r.stderr and \
            b"is recovering (reading its queue: retry shortly)" in r.stderr, r
        r = d.cli("inspect", last, check=False)
        assert r.returncode == 69, r
        assert b"is recovering (reading its queue: retry shortly)" in r.stderr, r
        st, headers, body = admin_call(d, "GET", f"/api/admin/messages/{last}")
        assert st == 503 and "recovering" in body["errors"][0]["message"], (st, body)
        assert shard0(d)["recovering"] is True          # answered before the end of it
        assert time.monotonic() - t < 5, time.monotonic() - t
        wait_until(lambda: not shard0(d)["recovering"], 60, "the recovery")
        out = d.cli("queue", "show", last).stdout.decode()
        assert f"queue_id: {last}" in out, out
        assert admin_call(d, "GET", f"/api/admin/messages/{last}")[0] == 200
        d.stop()
    finally:
        d.cleanup()
