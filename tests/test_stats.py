"""Unit tests of the statistics kept by each child (mta/obs/stats.py) and their merge and
rendering in the admin process (mta/admin/metrics.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mta import bus
from mta.admin.metrics import Collector, Reports
from mta.obs.catalog import FAMILIES, LATENCY, OTHER
from mta.obs.stats import GAUGE, Histogram, KeyedCounter, Registry, top_n


def test_histogram_buckets_are_upper_inclusive():
    h = Histogram((1, 2, 5))
    for v in (0.5, 1, 1.5, 2, 5, 5.01, 100):
        h.observe(v)
    # <=1: 0.5, 1 | <=2: 1.5, 2 | <=5: 5 | +Inf: 5.01, 100
    assert h.counts == [2, 2, 1, 2]
    assert h.count == 7
    assert h.sum == pytest.approx(0.5 + 1 + 1.5 + 2 + 5 + 5.01 + 100)


def test_keyed_counter_admits_up_to_the_limit_then_counts_other():
    k = KeyedCounter(limit=2, width=2)
    k.inc(("s1", "a"))
    k.inc(("s1", "b"), 3)
    k.inc(("s2", "c"))          # over the limit
    k.inc(("s3", "d"), 2)
    k.inc(("s1", "a"))          # admitted keys keep counting on their own
    assert k.values == {("s1", "a"): 2, ("s1", "b"): 3, (OTHER, OTHER): 3}
    # Bounded: 2 admitted keys + other, whatever comes.
    for i in range(1000):
        k.inc((f"x{i}", "y"))
    assert len(k.values) == 3 and k.values[(OTHER, OTHER)] == 1003


def test_top_n_keeps_the_largest_and_sums_the_rest():
    assert top_n({"a": 5, "b": 1, "c": 3, "d": 2}, 2) == [(("a",), 5), (("c",), 3),
                                                       ((OTHER,), 3)]
    assert top_n({"a": 1}, 2) == [(("a",), 1)]
    pairs = top_n({("s", "x"): 4, ("s", "y"): 9}, 1, 2)
    assert pairs == [(("s", "y"), 9), ((OTHER, OTHER), 4)]
    # an "other" among the keys (children's values summed) is kept, not dropped
    assert top_n({"a": 5, OTHER: 3}, 2) == [(("a",), 5), ((OTHER,), 3)]


def test_registry_rejects_undeclared_and_mislabelled_families():
    reg = Registry()
    with pytest.raises(KeyError):
        reg.counter("mta_no_such_total")
    with pytest.raises(TypeError):
        reg.counter("mta_smtp_transaction_seconds")      # a histogram
    with pytest.raises(ValueError):
        reg.counter("mta_spool_written_bytes_total")     # needs its shard label
    reg.collect(lambda: [(GAUGE, "mta_spool_queue_messages", (), 1)])   # label missing
    with pytest.raises(ValueError):
        reg.snapshot(1, "spool", 0)


def _report(pid: int, role="acceptor", index=0, accepted=0, txn=(), queue=None, seq=1):
    reg = Registry()
    reg.counter("mta_smtp_messages_accepted_total").value = accepted
    h = reg.histogram("mta_smtp_transaction_seconds")
    for v in txn:
        h.observe(v)
    if queue is not None:
        reg.collect(lambda: [(GAUGE, "mta_spool_queue_messages", ("0",), queue)])
    r = reg.snapshot(seq, role, index)
    r.pid = pid
    # Over the wire and back, as the admin process gets it.
    return bus.decode(bus.encode(r))


def _settings():
    admin = SimpleNamespace(push_interval=1.0)
    return SimpleNamespace(shards=1, deliveries=1, acceptors=2, spool_dir="/nonexistent",
                           run_dir="/nonexistent", events_enabled=False,
                           config=SimpleNamespace(admin=admin,
                                                  webhooks=SimpleNamespace(enabled=False)))


def test_reports_sum_children_and_keep_a_replaced_process_counts():
    now = [100.0]
    rep = Reports(_settings(), clock=lambda: now[0])
    rep.add(_report(11, index=0, accepted=5, txn=[0.001, 0.2]))
    rep.add(_report(12, index=1, accepted=7, txn=[0.003]))
    counters, _, hists = rep.merged()
    assert counters[("mta_smtp_messages_accepted_total", ())] == 12
    counts, total = hists[("mta_smtp_transaction_seconds", ())]
    assert sum(counts) == 3 and total == pytest.approx(0.204)
    # acceptor[0] is replaced (new pid, counting from zero): its old counts stay.
    rep.add(_report(21, index=0, accepted=1, txn=[0.002]))
    counters, _, hists = rep.merged()
    assert counters[("mta_smtp_messages_accepted_total", ())] == 5 + 7 + 1
    assert sum(hists[("mta_smtp_transaction_seconds", ())][0]) == 4
    # The same process reporting again replaces its own previous report.
    rep.add(_report(21, index=0, accepted=2, txn=[0.002, 0.002], seq=2))
    counters, _, _ = rep.merged()
    assert counters[("mta_smtp_messages_accepted_total", ())] == 5 + 7 + 2


def test_a_replaced_process_still_reporting_is_counted_once():
    """At a reload the old acceptor of a slot finishes its sessions, reporting, while its
    successor runs: each report of one was taken for a restart of the other and its
    whole count added to the slot's base again."""
    now = [100.0]
    rep = Reports(_settings(), clock=lambda: now[0])
    rep.add(_report(11, index=0, accepted=5, txn=[0.001]))
    rep.add(_report(21, index=0, accepted=1, txn=[0.002], seq=1))      # the successor
    for seq in range(2, 6):             # both report, in turn
        rep.add(_report(11, index=0, accepted=6, txn=[0.001, 0.001], seq=seq))
        rep.add(_report(21, index=0, accepted=2, txn=[0.002], seq=seq))
    counters, _, hists = rep.merged()
    assert counters[("mta_smtp_messages_accepted_total", ())] == 6 + 2
    assert sum(hists[("mta_smtp_transaction_seconds", ())][0]) == 3
    acc = next(c for c in rep.health()["children"] if c["role"] == "acceptor"
               and c["index"] == 0)
    assert acc["pid"] == 21             # the newest process is the slot's
    # The old one leaves; its last counts stay.  Many restarts later (its report folded
    # into the base) the sum is still every process's last count, once.
    now[0] += 60
    for pid in range(100, 120):
        rep.add(_report(pid, index=0, accepted=1, seq=1))
    counters, _, _ = rep.merged()
    assert counters[("mta_smtp_messages_accepted_total", ())] == 6 + 2 + 20
    assert len(rep.slots[("acceptor", 0)].older) <= 8


def test_stale_children_gauges_are_left_out_and_health_says_so():
    now = [100.0]
    rep = Reports(_settings(), clock=lambda: now[0])
    rep.add(_report(31, role="spool", queue=42))
    assert rep.merged()[1][("mta_spool_queue_messages", ("0",))] == 42
    h = rep.health()
    spool = next(c for c in h["children"] if c["role"] == "spool")
    assert spool["up"] is True and spool["pid"] == 31
    assert h["ok"] is False          # the delivery process and acceptors never reported
    never = next(c for c in h["children"] if c["role"] == "delivery")
    assert never == {"role": "delivery", "index": 0, "pid": None, "up": False,
                     "last_report_age": None, "restarts": 0}
    now[0] += 60
    assert ("mta_spool_queue_messages", ("0",)) not in rep.merged()[1]
    spool = next(c for c in rep.health()["children"] if c["role"] == "spool")
    assert spool["up"] is False and spool["last_report_age"] == 60


def test_health_is_not_ok_while_a_shard_cannot_write_or_the_node_drains(tmp_path):
    # what a load balancer's check needs: every child up is not enough when a shard's
    # disk fails (its mail gets 451) or the operator drains the node
    settings = _settings()
    settings.run_dir = str(tmp_path)
    rep = Reports(settings)

    def everyone(healthy):
        for pid, (role, index) in enumerate(sorted(rep.slots), 40):
            reg = Registry()
            if role == "spool":
                reg.collect(lambda: [(GAUGE, "mta_spool_healthy", ("0",), healthy)])
            r = reg.snapshot(1, role, index)
            r.pid = pid
            rep.add(bus.decode(bus.encode(r)))
    everyone(1)
    h = rep.health()
    assert h["ok"] is True and h["draining"] is False
    everyone(0)
    h = rep.health()
    spool = next(c for c in h["children"] if c["role"] == "spool")
    assert spool["up"] is True and spool["healthy"] is False and h["ok"] is False
    everyone(1)
    (tmp_path / "drain").write_text("")
    h = rep.health()
    assert h["ok"] is False and h["draining"] is True
    (tmp_path / "drain").unlink()
    # an acceptor whose spool disk is below spool.min_free_* answers MAIL 452
    reg = Registry()
    reg.collect(lambda: [(GAUGE, "mta_acceptor_space_low", (), 1)])
    r = reg.snapshot(2, "acceptor", 0)
    r.pid = 90
    rep.add(bus.decode(bus.encode(r)))
    h = rep.health()
    acc = next(c for c in h["children"] if c["role"] == "acceptor" and c["index"] == 0)
    assert acc["healthy"] is False and h["ok"] is False


def test_health_counts_a_child_that_never_reported(tmp_path):
    # an acceptor the supervisor runs (say, added by a reload) that never reported is
    # down, whether or not the admin process knew its slot
    settings = _settings()
    settings.run_dir = str(tmp_path)
    rep = Reports(settings)
    for pid, (role, index) in enumerate(sorted(rep.slots), 40):
        r = Registry().snapshot(1, role, index)
        r.pid = pid
        rep.add(bus.decode(bus.encode(r)))
    assert rep.health()["ok"] is True
    rep.expected = rep.expected | {("acceptor", 2)}
    rep._active_mtime = -1            # (as if read from the supervisor's record)
    h = rep.health()
    assert h["ok"] is False
    assert {"role": "acceptor", "index": 2, "pid": None, "up": False,
            "last_report_age": None, "restarts": 0} in h["children"]


def test_child_up_lists_the_children_the_supervisor_runs(tmp_path):
    """mta_child_up follows the process table as the health check does: a child added
    by a reload that never reported is 0; one retired by a reload is not listed."""
    settings = _settings()
    settings.run_dir = str(tmp_path)
    now = [100.0]
    rep = Reports(settings, clock=lambda: now[0])
    for pid, (role, index) in enumerate(sorted(rep.slots), 40):
        r = Registry().snapshot(1, role, index)
        r.pid = pid
        rep.add(bus.decode(bus.encode(r)))
    # a reload: acceptor[1] retired, acceptor[2] added
    rep.expected = (rep.expected - {("acceptor", 1)}) | {("acceptor", 2)}
    rep._active_mtime = -1            # (as if read from the supervisor's record)
    now[0] += 60
    for role, index in (("spool", 0), ("delivery", 0), ("acceptor", 0)):
        r = Registry().snapshot(2, role, index)
        r.pid = 60 + index
        rep.add(bus.decode(bus.encode(r)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(rep, settings))
    fams = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    up = {(s.labels["role"], s.labels["index"]): s.value
          for s in fams["mta_child_up"].samples}
    assert up == {("spool", "0"): 1, ("delivery", "0"): 1, ("acceptor", "0"): 1,
                  ("acceptor", "2"): 0}
    ages = {(s.labels["role"], s.labels["index"])
            for s in fams["mta_child_report_age_seconds"].samples}
    assert ages == {("spool", "0"), ("delivery", "0"), ("acceptor", "0")}


def test_a_node_wide_0_or_1_gauge_is_the_highest_childs_not_their_sum():
    """Every delivery process reports a suspended source as 1: /metrics says 1 (not the
    number of delivery processes) while its connections open still add up."""
    settings = _settings()
    settings.deliveries = 4
    rep = Reports(settings)
    for i in range(4):
        reg = Registry()
        reg.collect(lambda i=i: [
            (GAUGE, "mta_delivery_source_suspended", ("ip-1",), 1),
            (GAUGE, "mta_delivery_source_suspended", ("ip-2",), 1 if i == 2 else 0),
            (GAUGE, "mta_delivery_connections_open", ("ip-3", "mx.site"), 2)])
        r = reg.snapshot(1, "delivery", i)
        r.pid = 50 + i
        rep.add(bus.decode(bus.encode(r)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(rep, settings))
    fams = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    assert {s.labels["source"]: s.value
            for s in fams["mta_delivery_source_suspended"].samples} == {"ip-1": 1, "ip-2": 1}
    assert [s.value for s in fams["mta_delivery_connections_open"].samples] == [8]


def test_collector_output_parses_as_prometheus_text():
    rep = Reports(_settings())
    rep.add(_report(41, accepted=3, txn=[0.0004, 0.004, 100]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(rep, _settings()))
    text = generate_latest(registry).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    acc = fams["mta_smtp_messages_accepted"]
    assert acc.type == "counter"
    assert [s.value for s in acc.samples if s.name.endswith("_total")] == [3]
    h = fams["mta_smtp_transaction_seconds"]
    assert h.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in h.samples if s.name.endswith("_bucket")}
    assert len(buckets) == len(LATENCY) + 1
    assert buckets["0.0005"] == 1 and buckets["0.005"] == 2 and buckets["60.0"] == 2
    assert buckets["+Inf"] == 3
    # Cumulative and non-decreasing, as Prometheus requires.
    values = [buckets[k] for k in [*(repr(float(b)) for b in LATENCY), "+Inf"]]
    assert values == sorted(values)
    for name in fams:
        assert name.startswith("mta_"), name


def test_catalog_follows_the_naming_conventions():
    for name, fam in FAMILIES.items():
        assert name.startswith("mta_"), name
        if fam.kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if fam.kind == "histogram":
            assert fam.buckets and list(fam.buckets) == sorted(fam.buckets), name
        assert "ms" not in name.split("_"), name


def test_traffic_labels_stay_bounded_over_processes_and_restarts():
    """Each delivery process admits its own first admin.max_label_values sites; summed in
    the admin process, N processes (and every restart of one: the old counts stay) made
    N times as many series, without end as restarts went on."""
    settings = _settings()
    settings.deliveries = 2
    settings.config.admin.max_label_values = 2
    now = [100.0]
    rep = Reports(settings, clock=lambda: now[0])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(rep, settings))

    def delivery(index, pid, sites):
        reg = Registry(max_label_values=2)
        k = reg.keyed("mta_delivery_connection_attempts_total")
        for site in sites:
            k.inc(("default", site), 3)
        reg.collect(lambda: [(GAUGE, "mta_delivery_connections_open", ("default", s), 1)
                             for s in sites] + [(GAUGE, "mta_delivery_queue_jobs", (s,), 2)
                                                for s in sites])
        r = reg.snapshot(1, "delivery", index)
        r.pid = pid
        rep.add(bus.decode(bus.encode(r)))

    def scrape():
        samples: dict[str, dict] = {}
        for f in text_string_to_metric_families(generate_latest(registry).decode()):
            for s in f.samples:
                if s.name.startswith("mta_delivery_"):
                    samples.setdefault(s.name, {})[s.labels["site"]] = s.value
        return {name: samples[name] for name in ("mta_delivery_connection_attempts_total",
                             "mta_delivery_connections_open", "mta_delivery_queue_jobs")}
    delivery(0, 10, ["a", "b", "c"])
    delivery(1, 11, ["d", "e"])
    m = scrape()
    for name, series in m.items():
        assert len(series) <= 3 and OTHER in series, (name, series)
    attempts = m["mta_delivery_connection_attempts_total"]
    assert sum(attempts.values()) == 5 * 3
    assert m["mta_delivery_connections_open"][OTHER] >= 1
    assert sum(m["mta_delivery_queue_jobs"].values()) == 5 * 2
    # restarts with new sites each time: still bounded, and no series goes down
    for pid in range(20, 30):
        delivery(0, pid, [f"s{pid}", f"t{pid}"])
        m2 = scrape()
        a2 = m2["mta_delivery_connection_attempts_total"]
        assert len(a2) <= 3, a2
        assert all(a2.get(k, 0) >= v for k, v in attempts.items()), (attempts, a2)
        attempts = a2
    assert sum(attempts.values()) == 5 * 3 + 10 * 2 * 3


def test_a_slot_follows_its_running_process_when_reports_came_in_reverse_order():
    """An admin process (re)started while a reload's old acceptor still finishes its
    sessions may hear the old one last and take it for the slot's newest: once it
    exited, the slot read as down for good (health 503, mta_child_up 0) though its
    successor reported every second."""
    import subprocess
    import sys
    new = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = [100.0]
        rep = Reports(_settings(), clock=lambda: now[0])
        rep.add(_report(new.pid, index=0, accepted=2))
        rep.add(_report(old.pid, index=0, accepted=5))     # heard last
        old.kill()
        old.wait()
        for seq in range(2, 8):
            now[0] += 1.0
            rep.add(_report(new.pid, index=0, accepted=2 + seq, seq=seq))
        acc = next(c for c in rep.health()["children"] if c["role"] == "acceptor"
                   and c["index"] == 0)
        assert acc["up"] is True and acc["pid"] == new.pid, acc
        counters, _, _ = rep.merged()
        assert counters[("mta_smtp_messages_accepted_total", ())] == 5 + 2 + 7
    finally:
        new.kill()
        new.wait()
