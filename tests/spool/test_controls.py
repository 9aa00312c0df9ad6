"""The operator's suspensions file and selectors (mta/controls.py)."""
from __future__ import annotations

import logging
import os

from mta import controls as ctl


def test_watcher_reads_changes_matches_all_named_fields_and_drops_what_ran_out(tmp_path):
    path = str(tmp_path / ctl.FILE)
    w = ctl.Watcher(path, logging.getLogger("t"))
    assert w.refresh(100.0) is False and w.items == []         # no file: nothing held
    ctl.save(path, [ctl.Suspension(id="s1", domain="a.test"),
                    ctl.Suspension(id="s2", campaign="spring", pool="bulk", until=150.0)])
    assert w.refresh(101.0) is True
    assert w.match("a.test", {}).id == "s1"
    assert w.match("b.test", {"campaign_id": "spring"}) is None      # pool "default"
    assert w.match("b.test", {"campaign_id": "spring", "ip_pool": "bulk"}).id == "s2"
    assert w.refresh(120.0) is False                              # nothing changed
    assert w.refresh(150.0) is True                               # s2 ran out
    assert w.match("b.test", {"campaign_id": "spring", "ip_pool": "bulk"}) is None
    os.unlink(path)
    assert w.refresh(151.0) is True and w.items == []


def test_an_unreadable_file_keeps_what_was_read_and_logs(tmp_path, caplog):
    path = str(tmp_path / ctl.FILE)
    ctl.save(path, [ctl.Suspension(id="s1", domain="a.test")])
    w = ctl.Watcher(path, logging.getLogger("t"))
    w.refresh(1.0)
    with open(path, "wb") as fh:
        fh.write(b"[{not json")
    assert w.refresh(2.0) is False and w.match("a.test", {}).id == "s1"
    assert "suspensions:" in caplog.text


def test_selector_needs_every_named_field():
    s = ctl.Selector(domains=["x.test", "y.test"], campaign="c")
    assert s.matches("u@Y.test", {"campaign_id": "c"})
    assert not s.matches("u@z.test", {"campaign_id": "c"})
    assert not s.matches("u@x.test", {"campaign_id": "d"})
    assert ctl.Selector(pool="default").matches("u@z.test", {})


def test_a_suspension_that_names_nothing_holds_nothing(tmp_path):
    path = str(tmp_path / ctl.FILE)
    ctl.save(path, [ctl.Suspension(id="s0", reason="hand-edited")])
    w = ctl.Watcher(path, logging.getLogger("t"))
    w.refresh(1.0)
    assert w.items == [] and w.match("a.test", {}) is None
    assert ctl.Selector().empty() and not ctl.Selector(pool="p").empty()


def test_the_queue_index_selects_what_the_selector_matches():
    """A bulk bounce takes its recipients from the queue index (the shard keeps no
    envelope in memory): the same ones Selector.matches picks from the envelopes."""
    import random

    from mta import native
    from mta.store import FAILED, MessageMeta, index_message

    rng = random.Random(5)
    index = native.load("qindex").QueueIndex(1.0)
    metas = []
    for n in range(200):
        params = {}
        if rng.random() < 0.6:
            params["campaign_id"] = rng.choice(["c", "d", ""])
        if rng.random() < 0.6:
            params["ip_pool"] = rng.choice(["default", "mkt", ""])
        rcpts = [f"u{i}@{rng.choice(['x.test', 'Y.test', 'z.test'])}"
                 for i in range(rng.randint(1, 4))]
        state = [rng.choice([0, 0, FAILED]) for _ in rcpts]
        m = MessageMeta("%020X" % n, "s@a.test", rcpts, 1.0, params, "c", state)
        index_message(index, m, 1, 0, 0, 0)
        metas.append(m)
    for sel in (ctl.Selector(domains=frozenset({"x.test", "y.test"}), campaign="c"),
                ctl.Selector(pool="default"), ctl.Selector(pool="mkt", campaign="d"),
                ctl.Selector(domains=frozenset({"z.test"})), ctl.Selector(campaign="none")):
        want = {}
        for m in metas:
            idxs = [i for i, r in enumerate(m.rcpts)
                    if m.state[i] == 0 and sel.matches(r, m.params)]
            if idxs:
                want[m.qid] = idxs
        got = index.select(sel.domains, sel.campaign, sel.pool)
        assert {q: n for q, n in got} == {q: len(i) for q, i in want.items()}, sel
        for q, idxs in want.items():
            assert index.matching(q, sel.domains, sel.campaign, sel.pool) == idxs
