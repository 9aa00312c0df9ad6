"""The operator's queue commands on a queue larger than one answer (mta/spool/queries.py).

The real daemon, delivery held, its spool filled by the store itself while it was
stopped (records as a shard writes them), so that a queue of a few thousand
messages costs no SMTP: ``mta queue list`` and ``mta queue delete ALL`` must go
through it a page (and a chunk) at a time and still see every message once.
"""
from __future__ import annotations

import json
import os
import re
import time

from mta.cli import DELETE_CHUNK
from mta.queueid import new_qid_for_shard
from mta.spool import queries
from mta.store import MessageMeta, Store, shard_dir

BODY = b"Subject: queued\r\n\r\nhello\r\n"


def fill(d, shards: int, per_shard: int, arrival: float | None = None) -> set[str]:
    qids = set()
    for n in range(shards):
        st = Store(shard_dir(os.path.join(d.state_dir, "spool"), n), 64 << 20, fsync=False)
        st.recover()
        items = []
        for i in range(per_shard):
            qid = new_qid_for_shard(n, shards)
            qids.add(qid)
            items.append((MessageMeta(qid, "old@sender.test", [f"r{i}@d{i % 5}.test"],
                                      arrival or time.time(), {}, "client.test [127.0.0.1]"),
                          BODY))
        st.commit(st.write(items, []), [])
        st.sync()
        st.close()
    return qids


def test_queue_list_and_delete_all_go_a_page_at_a_time(make_daemon):
    d = make_daemon(acceptors=1, shards=2)
    d.stop()
    per_shard = 2 * queries.LIST_PAGE + 150
    qids = fill(d, 2, per_shard)
    d.start()
    d.wait_log(r"recovered queue: messages=%d" % per_shard, count=2, timeout=60)
    listed = [e["queue_id"] for e in d.queue_list()]
    assert len(listed) == len(qids) and set(listed) == qids
    limited = [json.loads(x)["queue_id"] for x in d.cli(
        "queue", "list", "--limit", str(queries.LIST_PAGE + 7)).stdout.splitlines()]
    assert len(limited) == 2 * (queries.LIST_PAGE + 7) and set(limited) <= qids
    deleted = json.loads(d.cli("queue", "delete", "--json", "ALL").stdout)["deleted"]
    assert sorted(deleted) == sorted(qids)
    # each delete was a batch of at most DELETE_CHUNK messages
    batches = re.findall(r"deleted by operator: ([0-9A-F ]+)", d.log(since_start=True))
    assert batches and max(len(b.split()) for b in batches) <= DELETE_CHUNK
    assert sum(len(b.split()) for b in batches) == len(qids)
    assert d.queue_list() == []


def test_delete_all_deletes_what_was_queued_when_it_began(make_daemon):
    """``queue delete ALL`` deletes as the listing's pages come (it no longer holds the ids
    of the whole queue first: millions of them in the command's memory), so mail queued
    after it began would be listed too: it stays.  Stand-in for such mail: messages
    whose arrival is later than the command's start."""
    d = make_daemon(acceptors=1, shards=2)
    d.stop()
    old = fill(d, 2, queries.LIST_PAGE + 20)
    d.start()
    d.wait_log(r"recovered queue: messages=%d" % (queries.LIST_PAGE + 20), count=2,
               timeout=60)
    d.stop()
    later = fill(d, 2, 30, arrival=time.time() + 3600)
    d.start()
    d.wait_log(r"recovered queue: messages=%d" % (queries.LIST_PAGE + 50), count=2,
               timeout=60)
    out = d.cli("queue", "delete", "ALL").stdout
    assert out.strip() == f"deleted {len(old)} message(s)".encode(), out
    assert {e["queue_id"] for e in d.queue_list()} == later
