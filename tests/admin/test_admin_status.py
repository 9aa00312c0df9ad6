"""The admin process's pure parts: percentiles, rates, the queue view, routes and the drain flag."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import types

import pytest

from mta import config as mconfig
from mta.admin import api as admin_api
from mta.admin import status as st
from mta.obs import queue as q


def test_percentile_is_the_upper_bound_of_the_bucket_holding_it():
    bounds = (0.001, 0.01, 0.1, 1.0)
    assert st.percentile(bounds, [0, 0, 0, 0, 0], 0.5) is None
    # 10 observations: 5 <= 1 ms, 4 <= 10 ms, 1 <= 1 s.
    counts = [5, 4, 0, 1, 0]
    assert st.percentile(bounds, counts, 0.5) == 0.001
    assert st.percentile(bounds, counts, 0.9) == 0.01
    assert st.percentile(bounds, counts, 0.99) == 1.0
    # Above every bound: the last finite one (it is at least that).
    assert st.percentile(bounds, [0, 0, 0, 0, 3], 0.5) == 1.0


def test_rates_come_from_samples_a_window_apart():
    now = [1000.0]
    h = st.History(points=5, clock=lambda: now[0])
    assert h.rate("accepted_messages") == 0.0
    for i in range(8):                  # one sample a second, 10 more messages each
        h.add({"accepted_messages": 10 * i, "delivered": 5 * i, "queue_messages": i})
        now[0] += 1.0
    assert len(h.samples) == 5          # bounded
    assert h.rate("accepted_messages", window=2.0) == 10.0
    assert h.rate("delivered", window=100.0) == 5.0      # the oldest sample kept
    s = h.series()
    assert s["injection_rate"] == [10.0] * 4 and s["delivery_rate"] == [5.0] * 4
    assert s["queue_messages"] == [4, 5, 6, 7]
    # A counter that went down (a reset) never gives a negative rate.
    h.add({"accepted_messages": 0, "delivered": 0, "queue_messages": 0})
    assert h.rate("accepted_messages", window=1.0) == 0.0


def test_totals_sum_the_series():
    counters = {("mta_smtp_messages_accepted_total", ()): 3,
                ("mta_http_messages_accepted_total", ()): 4,
                ("mta_delivery_outcomes_total", ("delivered",)): 6,
                ("mta_delivery_outcomes_total", ("deferred",)): 2}
    gauges = {("mta_spool_queue_messages", ("0",)): 1, ("mta_spool_queue_messages", ("1",)): 2}
    t = st.totals(counters, gauges)
    assert (t["accepted_messages"], t["delivered"], t["deferred"], t["failed"],
            t["queue_messages"]) == (7, 6, 2, 0, 3)


def shard(n, messages, domains, pools, campaigns, **kw):
    return {"shard": n, "messages": messages, "recipients": sum(
        v["recipients"] for v in domains.values()), "bytes": 100 * messages,
        "pending": 0, "deferred": 0, "oldest_arrival": 5.0 + n, "next_attempt": None,
        "in_flight": 1, "healthy": True, "error": "", "segments": 1, "domains": domains,
        "pools": pools, "campaigns": campaigns, **kw}


def test_queue_view_merges_shards_and_delivery_status(tmp_path):
    status = {"time": 1e12, "sources": {"ip-1": {"address": "192.0.2.1", "proxy": None,
                                                  "suspended_until": 2e12,
                                                  "reason": "421 too fast"}},
              "sites": {"mx.a.test": {"domains": ["a.test"], "hosts": ["mx.a.test"]}},
              "lanes": [{"source": "ip-1", "site": "mx.a.test", "queued": 4,
                         "transactional": 0, "connections": 2, "node_connections": 2,
                         "rate": 1.5, "connection_limit": 10, "max_message_rate": 0}]}
    (tmp_path / "delivery-0.status.json").write_text(json.dumps(status))
    (tmp_path / "delivery-1.status.json").write_text("{not json")     # ignored
    d = q.delivery_status(str(tmp_path), now=1e12)
    view = q.merge([
        shard(0, 2, {"a.test": {"recipients": 3, "deferred": 1, "next_attempt": 50.0}},
              {"default": {"messages": 2, "recipients": 3}},
              {"c1": {"messages": 2, "recipients": 3}}, blocked=2, suspended_messages=1),
        shard(1, 1, {"a.test": {"recipients": 1, "deferred": 0, "next_attempt": None},
                     "b.test": {"recipients": 2, "deferred": 2, "next_attempt": 40.0}},
              {"default": {"messages": 1, "recipients": 3}},
              {"(none)": {"messages": 1, "recipients": 3}}, blocked=1)], d)
    assert view["total"]["messages"] == 3 and view["total"]["recipients"] == 6
    assert view["total"]["oldest_arrival"] == 5.0 and view["total"]["in_flight"] == 2
    assert (view["total"]["blocked"], view["total"]["suspended_messages"]) == (3, 1)
    assert view["by_domain"]["a.test"] == {"recipients": 4, "deferred": 1, "next_attempt": 50.0}
    assert view["by_domain"]["b.test"]["next_attempt"] == 40.0
    assert view["by_pool"] == {"default": {"messages": 3, "recipients": 6}}
    assert view["by_campaign"] == {"c1": {"messages": 2, "recipients": 3},
                                   "(none)": {"messages": 1, "recipients": 3}}
    assert view["by_site"]["mx.a.test"]["queued"] == 4
    src = view["by_source"]["ip-1"]
    assert src["suspended"] and src["reason"] == "421 too fast" and src["queued"] == 4
    assert "domains" not in view["shards"][0] and view["delivery_processes"] == 1


def test_queue_view_of_some_shards_names_the_others_and_says_partial(tmp_path):
    """A shard that did not answer is named (not counted), one still reading its queue
    is marked; the totals say partial either way, and the view keeps every field."""
    d = q.delivery_status(str(tmp_path), now=1e12)
    whole = q.merge([shard(0, 2, {}, {}, {}), shard(1, 1, {}, {}, {})], d)
    assert whole["total"]["partial"] is False and whole["not_answering"] == []
    assert [x["state"] for x in whole["shards"]] == ["ok", "ok"]
    view = q.merge([shard(0, 2, {}, {}, {}), shard(2, 1, {}, {}, {}, recovering=True)], d,
                   None, [{"shard": 1, "error": "spool[1] did not answer within 5s"}])
    assert view["total"]["partial"] is True and view["total"]["messages"] == 3
    assert [(x["shard"], x["state"]) for x in view["shards"]] == [(0, "ok"), (2, "recovering")]
    assert view["not_answering"] == [{"shard": 1, "state": "not answering",
                                      "error": "spool[1] did not answer within 5s"}]
    assert set(whole) == set(view)
    only = q.merge([shard(0, 0, {}, {}, {}, recovering=True)], d)
    assert only["total"]["partial"] is True and only["total"]["recovering"] is True


def test_queue_view_names_the_largest_domains_and_campaigns_and_sums_the_rest(tmp_path):
    # A queue to 100,000 recipient domains: /api/admin/queue (and mta queue summary
    # --by domain) had a row for every one of them, from every shard.
    n = q.DOMAINS_MAX
    shards = [shard(k, n, {f"d{k}-{i}.test": {"recipients": 1 + (i == 7) * 50, "deferred": 1,
                                              "next_attempt": 100.0 - k - i / n}
                           for i in range(n)},
                    {"default": {"messages": n, "recipients": n + 50}},
                    {f"c{k}-{i}": {"messages": 1 + (i == 9) * 50, "recipients": 1}
                     for i in range(q.CAMPAIGNS_MAX)}) for k in range(3)]
    view = q.merge(shards, q.delivery_status(str(tmp_path)))
    doms, camps = view["by_domain"], view["by_campaign"]
    assert len(doms) == n + 1 and len(camps) == q.CAMPAIGNS_MAX + 1
    assert all(doms[f"d{k}-7.test"]["recipients"] == 51 for k in range(3))
    assert all(camps[f"c{k}-9"]["messages"] == 51 for k in range(3))
    # nothing is lost: the rest is under (other), with the earliest next attempt
    assert sum(v["recipients"] for v in doms.values()) == 3 * (n + 50)
    assert sum(v["deferred"] for v in doms.values()) == 3 * n
    assert sum(v["messages"] for v in camps.values()) == 3 * (q.CAMPAIGNS_MAX + 50)
    assert doms[q.OTHER]["next_attempt"] == min(
        x["next_attempt"] for s in shards for x in s["domains"].values()
        if x["recipients"] == 1)
    # a shard's own (other) is summed into the node's
    small = q.merge([shard(0, 1, {"a.test": {"recipients": 2, "deferred": 0, "next_attempt": None},
                                  q.OTHER: {"recipients": 9, "deferred": 1, "next_attempt": 5.0}},
                           {}, {})], q.delivery_status(str(tmp_path)))
    assert small["by_domain"][q.OTHER] == {"recipients": 9, "deferred": 1, "next_attempt": 5.0}


def test_queue_view_names_the_most_queued_sites_and_lanes_and_sums_the_rest(tmp_path):
    # A broadcast to many domains has thousands of sites in delivery at once:
    # /api/admin/queue and the status page listed every site and every lane.
    n = q.SITES_MAX + 500
    status = {"time": 1e12, "sources": {"ip-1": {"address": "192.0.2.1", "proxy": None,
                                                  "suspended_until": 0, "reason": ""}},
              "sites": {f"mx.s{i}.test": {"domains": [f"s{i}.test"], "hosts": [f"mx.s{i}.test"]}
                        for i in range(n)},
              "lanes": [{"source": "ip-1", "site": f"mx.s{i}.test", "queued": 1 + (i % 7 == 0) * 9,
                         "transactional": 0, "connections": 1, "node_connections": 1,
                         "rate": 0.5, "connection_limit": 10, "max_message_rate": 0}
                        for i in range(n)]}
    (tmp_path / "delivery-0.status.json").write_text(json.dumps(status))
    view = q.merge([shard(0, 1, {}, {}, {})], q.delivery_status(str(tmp_path), now=1e12))
    sites, lanes = view["by_site"], view["lanes"]
    assert len(sites) == q.SITES_MAX + 1 and len(lanes) == q.LANES_MAX
    assert view["lanes_omitted"] == 500
    # the busiest are named; nothing is lost from the sums
    assert all(sites[f"mx.s{i}.test"]["queued"] == 10 for i in range(0, n, 7))
    assert sum(v["queued"] for v in sites.values()) == sum(ln["queued"]
                                                           for ln in status["lanes"])
    assert sites[q.OTHER]["sites"] == 500 and sites[q.OTHER]["connections"] == 500
    assert all(ln["queued"] == 10 for ln in lanes if ln["site"].endswith(("s0.test",)))
    assert lanes == sorted(lanes, key=lambda x: (x["site"], x["source"]))
    assert view["by_source"]["ip-1"]["queued"] == sum(ln["queued"] for ln in status["lanes"])


def test_queue_view_names_a_few_domains_of_a_site_and_counts_them(tmp_path):
    # MX rollup puts every domain hosted by one provider in its site: after a broadcast
    # a site held hundreds of thousands of domains, every one of them in /api/admin/queue
    # and in the status document the page fetches every 2 seconds (megabytes each time)
    n = 50_000
    status = {"time": 1e12, "sources": {},
              "sites": {"mx.big.test": {"domains": sorted(f"d{i}.test" for i in range(n)),
                                        "hosts": ["mx.big.test"]},
                        "mx.a.test": {"domains": ["a.test"], "hosts": ["mx.a.test"]}},
              "lanes": []}
    (tmp_path / "delivery-0.status.json").write_text(json.dumps(status))
    view = q.merge([shard(0, 1, {}, {}, {})], q.delivery_status(str(tmp_path), now=1e12))
    big = view["by_site"]["mx.big.test"]
    assert big["domains_total"] == n
    assert len(big["domains"]) == q.SITE_DOMAINS_MAX
    assert set(big["domains"]) <= {f"d{i}.test" for i in range(n)}
    assert view["by_site"]["mx.a.test"]["domains"] == ["a.test"]
    assert view["by_site"]["mx.a.test"]["domains_total"] == 1
    assert len(json.dumps(view)) < 100_000


def test_sites_come_from_the_sites_files_parsed_again_only_when_they_change(tmp_path,
                                                                          monkeypatch):
    # The delivery processes write their sites (a provider's can hold hundreds of
    # thousands of domains) to a file of their own when they change, not to the status
    # file each second; the admin process parsed megabytes on its event loop for each
    # queue view.  A site's full list is still there (mta bounce --site bounces them).
    big = [f"d{i}.test" for i in range(3 * q.SITE_DOMAINS_MAX)]
    for n, domains in enumerate((big[::2], big[1::2])):
        status = {"time": 1e12, "sources": {}, "lanes": [
            {"source": "ip-1", "site": "mx.big.test", "queued": 2, "transactional": 0,
             "connections": 1, "node_connections": 2, "rate": 1.0,
             "connection_limit": 10, "max_message_rate": 0}]}
        (tmp_path / f"delivery-{n}.status.json").write_text(json.dumps(status))
        (tmp_path / f"delivery-{n}.sites.json").write_text(json.dumps(
            {"time": 1.0, "pid": 1, "sites": {"mx.big.test": {"domains": domains,
                                                              "hosts": ["mx.big.test"]}}}))
    parsed = []

    class Counting:
        @staticmethod
        def loads(data):
            parsed.append(len(data))
            return json.loads(data)
    monkeypatch.setattr(q, "orjson", Counting)
    for _ in range(3):
        d = q.delivery_status(str(tmp_path), now=1e12)
        assert d["sites"]["mx.big.test"]["domains"] == sorted(big)
        assert d["sites"]["mx.big.test"]["queued"] == 4
        view = q.merge([shard(0, 1, {}, {}, {})], d)
        assert view["by_site"]["mx.big.test"]["domains_total"] == len(big)
    assert len(parsed) == 2             # each sites file once
    # a process writes its sites file again: that one is parsed again
    new = tmp_path / "delivery-1.sites.json.tmp"
    new.write_text(json.dumps({"time": 2.0, "pid": 1, "sites": {
        "mx.big.test": {"domains": big[1::2] + ["new.test"], "hosts": ["mx.big.test"]}}}))
    os.replace(new, tmp_path / "delivery-1.sites.json")
    d = q.delivery_status(str(tmp_path), now=1e12)
    assert d["sites"]["mx.big.test"]["domains"] == sorted(big + ["new.test"])
    assert len(parsed) == 3
    # a lane to a site newer than its process's sites file is counted all the same
    status["lanes"][0]["site"] = "mx.newer.test"
    (tmp_path / "delivery-1.status.json").write_text(json.dumps(status))
    d = q.delivery_status(str(tmp_path), now=1e12)
    assert d["sites"]["mx.newer.test"]["queued"] == 2
    assert d["sites"]["mx.big.test"]["queued"] == 2


def test_webhook_backlog_from_the_webhooks_status_file(tmp_path):
    """mta queue and /api/admin/queue: per webhook the events not delivered yet, the bound
    and whether it is retrying; a stale file says the process is not reporting."""
    import json
    import os

    from mta.api import webhookdb

    now = 1_800_000_000.0
    os.makedirs(webhookdb.dir_in(str(tmp_path)))
    hooks = [{"id": "w1", "name": "crm", "backlog_events": 500, "pending_events": 100,
              "pending_batches": 1, "retrying_batches": 1, "next_retry": now + 12,
              "last_failure": {"at": now - 1, "response": "HTTP 500"},
              "max_backlog_events": 1000, "on_backlog_full": "drop_oldest",
              "dropped_events": 0},
             {"id": "w2", "name": "full", "backlog_events": 1000, "pending_events": 0,
              "max_backlog_events": 1000, "on_backlog_full": "pause"},
             {"id": "w3", "name": "fine", "backlog_events": 0, "pending_events": 0,
              "max_backlog_events": 1000}]

    def write(t):
        with open(webhookdb.status_path(str(tmp_path)), "w") as fh:
            json.dump({"time": t, "head": 10, "webhooks": hooks}, fh)
    write(now - 1)
    st = q.webhook_status(str(tmp_path), now=now)
    assert st["reporting"] is True
    crm, full, fine = st["webhooks"]
    assert (crm["undelivered_events"], crm["backlog_events"], crm["max_backlog_events"],
            crm["backlog_percent"], crm["state"]) == (600, 500, 1000, 50.0, "retrying")
    assert (crm["next_retry"], crm["last_failure"]["response"]) == (now + 12, "HTTP 500")
    assert (full["state"], fine["state"]) == ("at bound", "ok")
    rows = q.webhook_rows(st, lambda ts: "in 0:00:12")
    assert rows[0] == ("WEBHOOK", "UNDELIVERED", "BACKLOG", "BOUND", "USED", "STATE")
    assert rows[1] == ("crm", "600", "500", "1000", "50%",
                       "retrying (1 batch(es), next in 0:00:12; last: HTTP 500)")
    assert rows[2][-1] == "at bound (pause)"
    write(now - 60)             # the webhooks process is gone: its last figures, said so
    st = q.webhook_status(str(tmp_path), now=now)
    assert not st["reporting"] and {w["state"] for w in st["webhooks"]} == {"not reporting"}
    assert q.webhook_status(str(tmp_path), enabled=False)["webhooks"] == []
    assert q.webhook_status(str(tmp_path / "none"))["webhooks"] == []
    with open(webhookdb.status_path(str(tmp_path)), "w") as fh:
        fh.write("{not json")
    assert q.webhook_status(str(tmp_path), now=now) == {"reporting": False, "time": None,
                                                        "webhooks": []}


def test_one_message_view():
    entry = {"qid": "Q", "sender": "s@x", "recipients": ["a@x", "b@x", "c@x"],
             "arrival": 1.0, "size": 10, "params": {"campaign_id": "c", "ip_pool": "p"},
             "client": "h [127.0.0.1]", "state": ["pending", "delivered", "pending"],
             "attempts": [2, 1, 0], "due": [130.0, 0.0, 90.0]}
    v = q.recipients_view(entry, now=100.0)
    assert v["campaign_id"] == "c" and v["ip_pool"] == "p"
    assert [r["next_attempt"] for r in v["recipients"]] == [130.0, None, 90.0]
    assert v["recipients"][0]["due_in_seconds"] == 30.0
    assert v["next_attempt"] == 90.0


@pytest.fixture
def api(tmp_path):
    settings = mconfig.load(None)
    settings = dataclasses.replace(settings, run_dir=str(tmp_path))
    loop = asyncio.new_event_loop()
    a = admin_api.Api(settings, loop, None, types.SimpleNamespace(), None)
    yield a, loop
    a.close()
    loop.close()


def test_drain_flag_is_written_and_removed(api, tmp_path):
    a, _ = api
    assert a.draining() == {"draining": False, "since": None}
    a.set_drain(True)
    flag = tmp_path / admin_api.DRAIN_FLAG
    assert flag.exists()
    since = a.draining()["since"]
    a.set_drain(True)                   # idempotent: the first time stays
    assert a.draining() == {"draining": True, "since": since}
    a.set_drain(False)
    assert not flag.exists() and not a.draining()["draining"]
    a.set_drain(False)                  # cancelling twice is fine
    flag.write_text("garbage")          # a flag someone else wrote still counts
    assert a.draining()["draining"] is True


def test_routes_answer_bad_methods_and_paths_with_json(api):
    a, loop = api
    for method, path, code in ((b"POST", b"/api/admin/queue", 405),
                               (b"PUT", b"/api/admin/drain", 405),
                               (b"GET", b"/api/admin/nothing", 404),
                               (b"GET", b"/api/admin/messages/x%00y", 400)):
        status, headers, body = loop.run_until_complete(a.handle(method, path))
        assert status == code, (method, path, status)
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["errors"][0]["message"]
    # No spool running: the queue is a 503 that says so, with Retry-After.
    status, headers, body = loop.run_until_complete(a.handle(b"GET", b"/api/admin/queue"))
    assert status == 503 and headers["Retry-After"] and b"spool[0]" in body
    assert not os.path.exists(a.drain_path)


def test_suspensions_take_configured_sources_and_pools_and_the_stores_own_bound(tmp_path):
    """A source or pool the configuration does not have is a 400 naming the field (a typo
    was stored and held nothing).  A delivery suspension is refused only at the
    configured backoff.max_entries: with 10,000 entries in the store and room for
    20,000 it is recorded (the admin store used the default bound: 503 'store full')."""
    import msgspec

    from mta.config.schema import Config
    from mta.shaping import state

    settings = mconfig.resolve(msgspec.convert({
        "server": {"state_dir": str(tmp_path / "state")},
        "egress": {"source": [{"name": "ip-1", "source_address": "127.0.0.1"}],
                   "pool": [{"name": "p1", "sources": [{"source": "ip-1"}]}]},
        "backoff": {"max_entries": 20_000}}, Config), None)
    store_dir = os.path.join(settings.state_dir, state.STORE_DIR)
    os.makedirs(store_dir)
    enc = msgspec.json.Encoder()
    for i in range(10_000):
        e = state.Entry(id=f"e{i:05d}", kind="suspend", scope="site", site=f"mx{i}.test",
                        rule="r", created=1.0, until=4e9)
        with open(os.path.join(store_dir, e.id + ".json"), "wb") as fh:
            fh.write(enc.encode(e))
    loop = asyncio.new_event_loop()
    a = admin_api.Api(settings, loop, None, types.SimpleNamespace(), None)

    async def nobody(*args):      # no spool shard or delivery process runs here
        return None
    a._ask = a._delivery_sees = nobody
    try:
        def post(query):
            status, _, body = loop.run_until_complete(
                a.handle(b"POST", b"/api/admin/suspensions", query))
            return status, json.loads(body)
        for query, field in ((b"source=ip-9", "source"), (b"pool=nope", "pool"),
                             (b"pool=P1", "pool")):
            status, body = post(query)
            assert status == 400 and body["errors"][0]["field"] == field, (query, body)
            assert field in body["errors"][0]["message"]
        status, body = post(b"pool=p1")
        assert status == 200 and body["suspension"]["pool"] == "p1", body
        status, body = post(b"source=ip-1")
        assert status == 200 and body["suspension"]["source"] == "ip-1", body
        assert len(os.listdir(store_dir)) == 10_001
    finally:
        a.close()
        loop.close()


def test_a_delivery_suspension_that_cannot_be_written_is_not_answered_as_made(tmp_path,
                                                                           monkeypatch):
    """The store's put() logged a failed write (disk full, EIO) and answered True, meant
    for a delivery process, whose own copy holds in memory: the admin API then answered
    200 "suspended" for an entry no delivery process would ever read, and mail went on.
    It says 503, as for a spool suspension whose file cannot be written."""
    import errno

    import msgspec

    from mta.config.schema import Config
    from mta.shaping import state

    settings = mconfig.resolve(msgspec.convert({
        "server": {"state_dir": str(tmp_path / "state")},
        "egress": {"source": [{"name": "ip-1", "source_address": "127.0.0.1"}],
                   "pool": [{"name": "p1", "sources": [{"source": "ip-1"}]}]}}, Config), None)
    loop = asyncio.new_event_loop()
    a = admin_api.Api(settings, loop, None, types.SimpleNamespace(), None)

    async def nobody(*args):      # no spool shard or delivery process runs here
        return None
    a._ask = a._delivery_sees = nobody
    store_dir = os.path.join(settings.state_dir, state.STORE_DIR)
    os.makedirs(store_dir)

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")
    try:
        monkeypatch.setattr(state.os, "fsync", eio)
        status, _, body = loop.run_until_complete(
            a.handle(b"POST", b"/api/admin/suspensions", b"source=ip-1"))
        monkeypatch.undo()
        on_disk = state.list_entries(store_dir)
        assert (status, on_disk != []) in ((200, True), (503, False)), (status, body)
        assert status == 503 and b"cannot" in body, body
    finally:
        a.close()
        loop.close()


@pytest.mark.parametrize("now", [1796553647.7887235, 1800000000.0])
def test_a_delivery_suspension_until_resumed_reads_so_whatever_the_clock(now):
    # 'mta suspend --site S' without --duration lasts FOREVER from now; whether it read
    # "until resumed" hung on (now + FOREVER) - now, which float rounding makes a little
    # less than FOREVER for about one start time in eight: the operator was told "ends
    # in 36599 days, 23:59:59" (and the API's until was a date a century on).
    from mta.shaping import state as adaptive

    e = adaptive.Entry(id="x", kind=adaptive.SUSPEND, scope="site", site="mx.example",
                       created=now, until=now + admin_api.FOREVER)
    assert admin_api._delivery_view(e)["until"] is None
    e = adaptive.Entry(id="x", kind=adaptive.SUSPEND, scope="site", site="mx.example",
                       created=now, until=now + 3600.0)
    assert admin_api._delivery_view(e)["until"] == now + 3600.0


def test_a_recipient_is_held_by_delivery_only_when_every_source_of_its_pool_is(tmp_path):
    # GET /api/admin/messages/QID names delivery's suspensions (rules, mta suspend --site
    # or --source, a source that cannot connect) only when they stop every source of the
    # message's pool for the recipient's site: one source free sends the mail
    from mta.shaping import state as adaptive
    run_dir, store_dir = tmp_path / "run", tmp_path / "adaptive"
    run_dir.mkdir()
    now = 1_000_000.0
    (run_dir / "delivery-0.status.json").write_text(json.dumps({
        "time": now, "lanes": [], "sources": {
            "ip-3": {"address": "192.0.2.3", "suspended_until": now + 50.0,
                     "reason": "cannot bind 192.0.2.3"}}}))
    (run_dir / "delivery-0.sites.json").write_text(json.dumps({"sites": {
        "mx.big.test": {"domains": ["big.test", "big2.test"], "hosts": ["mx.big.test"]}}}))
    store = adaptive.Store(str(store_dir))

    def suspend(scope, source, site, until, rule="tss04"):
        store.put(adaptive.Entry(id=adaptive.entry_id(adaptive.SUSPEND, scope, source, site),
                                 kind=adaptive.SUSPEND, scope=scope, source=source,
                                 site=site, rule=rule, reply="421 [TSS04] try later",
                                 created=now - 1, until=until))
    settings = types.SimpleNamespace(
        run_dir=str(run_dir), pools={"default": (("default", 1),),
                                     "p": (("ip-1", 1), ("ip-2", 1), ("ip-3", 1))},
        config=types.SimpleNamespace(egress=types.SimpleNamespace(default_pool="default")))
    api = types.SimpleNamespace(settings=settings, adaptive_dir=str(store_dir))

    def holds(pool, *addresses, spool_held=None):
        view = {"ip_pool": pool, "recipients": [
            {"address": a, "next_attempt": now + 60, "suspended": spool_held}
            for a in addresses]}
        admin_api.Api._delivery_holds(api, view, now)
        return [r["suspended"] for r in view["recipients"]]

    suspend("source_site", "ip-1", "mx.big.test", now + 100.0)
    # ip-2 free, ip-3 down: nothing holds the mail of pool p
    assert holds("p", "a@big.test") == [None]
    suspend("site", "", "mx.big.test", now + 30.0, rule=adaptive.ADMIN_RULE)
    # now all three are held there: the first to end is named (ip-2's, the site's)
    [h] = holds("p", "a@big2.test")
    assert (h["site"], h["source"], h["until"]) == ("mx.big.test", "ip-2", now + 30.0), h
    assert h["reason"] == "site mx.big.test suspended by the operator: 421 [TSS04] try later"
    # another site's domain (or one delivery has not routed yet) is not held by them
    assert holds("p", "a@small.test") == [None]
    # (a site's suspension holds every source: the pool "default", none recorded, too)
    assert holds(None, "a@big.test")[0]["source"] == "default"
    assert holds(None, "a@small.test") == [None]
    # a source suspension holds at every site, known or not
    suspend("source", "default", "", now + 7200.0)
    [h] = holds(None, "a@small.test")
    assert (h["site"], h["source"], h["until"]) == (None, "default", now + 7200.0), h
    assert h["reason"].startswith("source default suspended by rule tss04: 421 ")
    # the spool's own suspension (a domain's, by the operator) is kept as it is
    spool = {"id": "s1", "until": None, "reason": "complaints"}
    assert holds(None, "a@small.test", spool_held=spool) == [spool]


def test_a_warming_source_at_its_cap_holds_a_recipient_as_a_suspension_does(tmp_path):
    # GET /api/admin/messages/QID (mta inspect) names a warm-up cap that holds the mail
    # (every source of its pool capped or suspended for the site), with when it lifts
    run_dir, store_dir = tmp_path / "run", tmp_path / "adaptive"
    run_dir.mkdir()
    now = 1_000_000.0
    first = now - 3600.0 * 0.1 * 2.5        # hour 2 of its use (time_scale 0.1: 360 s)

    def write(hour):
        (run_dir / "delivery-0.status.json").write_text(json.dumps({
            "time": now, "lanes": [], "sources": {}, "warmup": {"ip-3": {
                "first_use": first, "day": 1, "hourly": 10, "daily": 100,
                "sites": {"mx.big.test": {"hour": hour, "day": 40}}}}}))
    (run_dir / "delivery-0.sites.json").write_text(json.dumps({"sites": {
        "mx.big.test": {"domains": ["big.test"], "hosts": ["mx.big.test"]}}}))
    write(10)
    pool = types.SimpleNamespace
    settings = types.SimpleNamespace(
        run_dir=str(run_dir), pools={"warm": (("ip-3", 1),), "both": (("ip-2", 1), ("ip-3", 1)),
                                     "over": (("ip-3", 1),), "seasoned": (("ip-2", 1),)},
        config=types.SimpleNamespace(
            egress=types.SimpleNamespace(default_pool="warm", pool=[
                pool(name="warm", overflow_pool=""), pool(name="both", overflow_pool=""),
                pool(name="over", overflow_pool="seasoned"),
                pool(name="seasoned", overflow_pool="")]),
            warmup=[types.SimpleNamespace(source="ip-3", overflow="other_sources")],
            delivery=types.SimpleNamespace(time_scale=0.1)))
    api = types.SimpleNamespace(settings=settings, adaptive_dir=str(store_dir))

    def holds(pool, *addresses):
        view = {"ip_pool": pool, "recipients": [
            {"address": a, "next_attempt": now + 60, "suspended": None} for a in addresses]}
        admin_api.Api._delivery_holds(api, view, now)
        return [r["suspended"] for r in view["recipients"]]

    [h] = holds("warm", "a@big.test")
    assert (h["site"], h["source"]) == ("mx.big.test", "ip-3"), h
    assert h["until"] == pytest.approx(first + 3 * 360.0)       # the end of hour 2
    assert h["reason"] == "source ip-3 at its warm-up cap for site mx.big.test (10 of 10 " \
                          "this hour)"
    assert holds("warm", "a@small.test") == [None]      # another site: its own count
    assert holds("both", "a@big.test") == [None]        # ip-2 sends it
    assert holds("over", "a@big.test") == [None]        # the overflow pool sends it
    write(9)
    assert holds("warm", "a@big.test") == [None]        # under the cap
