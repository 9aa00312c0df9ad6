"""The operator's questions to a shard on a large queue (mta/spool/queries.py): bounded answers.

A real store in tmp_path, filled as a shard writes it; no daemon.  The shard is
single-threaded: while it answers it takes no mail, so no answer may cost it work
(or memory) in proportion to the whole queue.
"""
from __future__ import annotations

import time

from test_dispatch import make_shard

from mta.obs import queue as q
from mta.queueid import new_qid_for_shard
from mta.spool import queries
from mta.store import MessageMeta, Store

BODY = b"Subject: s\r\n\r\nbody\r\n"


def fill(tmp_path, n: int, rcpts: int = 1) -> tuple[Store, list[str]]:
    st = Store(str(tmp_path / "spool"), 64 << 20, fsync=False)
    st.recover()
    qids = []
    for first in range(0, n, 1000):
        items = []
        for i in range(first, min(n, first + 1000)):
            qid = new_qid_for_shard(0, 1)
            qids.append(qid)
            items.append((MessageMeta(qid, "s@sender.example",
                                      [f"r{i}.{j}@d{i % 7}.example" for j in range(rcpts)],
                                      time.time(), {}, "client.test [127.0.0.1]"), BODY))
        st.commit(st.write(items, []), [])
    return st, sorted(qids)


def walk(st: Store, limit: int = 0) -> tuple[list, list]:
    """Every page of the listing from the first: (the pages' entries, their sizes)."""
    got, sizes, after = [], [], ""
    while True:
        reply = queries.listing(st, len(sizes), limit, after)
        got += reply.entries
        sizes.append(len(reply.entries))
        if not reply.last:
            return got, sizes
        assert reply.last > after
        after = reply.last


def test_a_listing_is_a_page_and_the_pages_list_every_message_once(tmp_path):
    # `mta queue list` on a large queue: the shard answered with every queued message in
    # one reply (up to a million), reading each envelope from disk meanwhile -- with
    # 300,000 queued, SMTP acceptance stalled 1.5 s and the shard grew by 240 MiB.
    st, qids = fill(tmp_path, 2 * queries.LIST_PAGE + 300)
    try:
        first = queries.listing(st, 1, 0)
        assert len(first.entries) == queries.LIST_PAGE
        assert first.last == first.entries[-1].qid
        got, sizes = walk(st)
        assert [e.qid for e in got] == qids
        assert max(sizes) == queries.LIST_PAGE and sizes[-1] == 300
        # a limit is a smaller page; one over the page is the page
        assert [e.qid for e in queries.listing(st, 2, 5).entries] == qids[:5]
        assert len(queries.listing(st, 3, 10 * queries.LIST_PAGE).entries) == queries.LIST_PAGE
        # after the last one: nothing, and no next page
        end = queries.listing(st, 4, 0, qids[-1])
        assert end.entries == [] and end.last == ""
    finally:
        st.close()


def test_a_page_is_bounded_by_recipients_too(tmp_path):
    st, qids = fill(tmp_path, 60, rcpts=500)      # 30,000 recipients
    try:
        got, sizes = walk(st)
        assert [e.qid for e in got] == qids
        per_page = queries.LIST_PAGE_RECIPIENTS // 500
        assert sizes[0] == per_page and len(sizes) == -(-60 // per_page)
    finally:
        st.close()


def test_a_summary_names_the_largest_domains_and_campaigns_and_sums_the_rest(tmp_path):
    # Mail to more recipient domains than a view names: the shard's summary had one entry
    # per domain (100,000 domains: 100,000 rows in mta queue summary --by domain), and of
    # the campaigns it named the first CAMPAIGNS_MAX it had seen, not the largest.
    shard = make_shard(tmp_path)
    n = q.DOMAINS_MAX + 200
    items = [(MessageMeta(new_qid_for_shard(0, 1), "s@sender.example", [f"r@d{i}.example"],
                          time.time(), {"campaign_id": f"c{i}"}, "client.test [127.0.0.1]"),
              BODY) for i in range(n)]
    # the last domain and the last campaign seen are the largest
    items += [(MessageMeta(new_qid_for_shard(0, 1), "s@sender.example",
                           [f"r{j}@d{n - 1}.example" for j in range(3)], time.time(),
                           {"campaign_id": f"c{n - 1}"}, "client.test [127.0.0.1]"), BODY)
              for _ in range(5)]
    shard.store.commit(shard.store.write(items, []), [])
    s = queries.summary(shard, 1).summary
    assert len(s["domains"]) == q.DOMAINS_MAX + 1 and len(s["campaigns"]) == q.CAMPAIGNS_MAX + 1
    assert s["domains"][f"d{n - 1}.example"]["recipients"] == 16
    assert s["campaigns"][f"c{n - 1}"] == {"messages": 6, "recipients": 16}
    assert sum(v["recipients"] for v in s["domains"].values()) == s["recipients"] == n + 15
    assert sum(v["messages"] for v in s["campaigns"].values()) == s["messages"] == n + 5
    assert s["domains"][q.OTHER]["recipients"] == 200
