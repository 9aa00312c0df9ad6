"""The HAProxy agent check's line (mta/admin/agent.py) for each state of the node, from
the admin process's health report as Reports builds it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mta import bus
from mta.admin.agent import line
from mta.admin.metrics import Reports
from mta.obs.stats import GAUGE, Registry

MiB = 1 << 20


def _settings(run_dir, shards=2, webhooks=True):
    return SimpleNamespace(
        shards=shards, deliveries=1, acceptors=2, spool_dir="/nonexistent",
        run_dir=str(run_dir), events_enabled=True,
        config=SimpleNamespace(admin=SimpleNamespace(push_interval=1.0),
                               webhooks=SimpleNamespace(enabled=webhooks)))


def _report(rep, pid, role, index, gauges=()):
    reg = Registry()
    if gauges:
        reg.collect(lambda: list(gauges))
    r = reg.snapshot(pid, role, index)
    r.pid = pid
    rep.add(bus.decode(bus.encode(r)))


def _all_up(rep, skip=()):
    for pid, (role, index) in enumerate(sorted(rep.slots), 40):
        if (role, index) in skip:
            continue
        gauges = [(GAUGE, "mta_spool_healthy", (str(index),), 1)] if role == "spool" else []
        _report(rep, pid, role, index, gauges)


SPOOL = SimpleNamespace(min_free_bytes=100 * MiB, min_free_percent=0.0)
PLENTY = (10_000 * MiB, 20_000 * MiB)


@pytest.fixture
def rep(tmp_path):
    return Reports(_settings(tmp_path))


def test_a_node_that_takes_mail_is_up_ready_at_full_weight(rep):
    _all_up(rep)
    assert line(rep.health(), PLENTY, SPOOL) == "up ready 100%\n"
    assert line(rep.health(), None, SPOOL) == "up ready 100%\n"     # free space unknown


def test_webhooks_events_and_delivery_down_do_not_change_the_answer(rep):
    # not on the way in: /api/admin/health says 503, the balancer keeps sending mail
    _all_up(rep, skip={("webhooks", 0), ("events", 0), ("delivery", 0)})
    assert rep.health()["ok"] is False
    assert line(rep.health(), PLENTY, SPOOL) == "up ready 100%\n"


def test_a_drained_node_says_drain(rep, tmp_path):
    _all_up(rep)
    (tmp_path / "drain").write_text("")
    got = line(rep.health(), PLENTY, SPOOL)
    assert got.split()[0] == "drain" and " #" in got and got.endswith("\n")
    assert got.count("\n") == 1
    (tmp_path / "drain").unlink()          # cancelled: "ready" ends HAProxy's DRAIN
    assert line(rep.health(), PLENTY, SPOOL) == "up ready 100%\n"


def test_no_shard_that_can_write_is_down(rep):
    _all_up(rep, skip={("spool", 0), ("spool", 1)})
    assert line(rep.health(), PLENTY, SPOOL) == \
        "down ready #no spool shard is up and able to write\n"
    for i in (0, 1):                         # up, but neither can write
        _report(rep, 80 + i, "spool", i, [(GAUGE, "mta_spool_healthy", (str(i),), 0)])
    assert line(rep.health(), PLENTY, SPOOL).startswith("down ready #no spool shard")


def test_one_shard_of_two_that_cannot_write_halves_the_weight(rep):
    _all_up(rep)
    _report(rep, 81, "spool", 1, [(GAUGE, "mta_spool_healthy", ("1",), 0)])
    assert line(rep.health(), PLENTY, SPOOL) == "up ready 50%\n"


def test_no_acceptor_up_is_down(rep):
    _all_up(rep, skip={("acceptor", 0), ("acceptor", 1)})
    assert line(rep.health(), PLENTY, SPOOL) == "down ready #no acceptor is up\n"


def test_every_acceptor_below_min_free_is_down_one_is_not(rep):
    _all_up(rep)
    low = [(GAUGE, "mta_acceptor_space_low", (), 1)]
    _report(rep, 90, "acceptor", 0, low)
    assert line(rep.health(), PLENTY, SPOOL) == "up ready 100%\n"
    _report(rep, 91, "acceptor", 1, low)
    got = line(rep.health(), PLENTY, SPOOL)
    assert got.startswith("down ready #") and "min_free" in got


@pytest.mark.parametrize("free, weight", [
    (300 * MiB, 100), (200 * MiB, 100), (150 * MiB, 55), (110 * MiB, 19), (100 * MiB, 10),
    (50 * MiB, 10)])
def test_free_space_between_min_free_and_twice_it_lowers_the_weight(rep, free, weight):
    _all_up(rep)
    assert line(rep.health(), (free, 20_000 * MiB), SPOOL) == f"up ready {weight}%\n"


def test_min_free_percent_counts_and_the_floor_holds_with_a_shard_out(rep):
    _all_up(rep)
    spool = SimpleNamespace(min_free_bytes=0, min_free_percent=10.0)    # 100 MiB of 1000
    assert line(rep.health(), (150 * MiB, 1000 * MiB), spool) == "up ready 55%\n"
    off = SimpleNamespace(min_free_bytes=0, min_free_percent=0.0)       # no limit set
    assert line(rep.health(), (1, 1000 * MiB), off) == "up ready 100%\n"
    _report(rep, 81, "spool", 1, [(GAUGE, "mta_spool_healthy", ("1",), 0)])
    assert line(rep.health(), (101 * MiB, 1000 * MiB), spool) == "up ready 10%\n"


def test_a_restarted_admin_process_takes_children_not_heard_from_yet_as_up(tmp_path):
    # the admin process was restarted (kill -9, crash): until its children's next
    # reports a child it has not heard from is not taken as down, or every restart of it
    # would take the node out of the balancer
    now = [100.0]
    rep = Reports(_settings(tmp_path), clock=lambda: now[0])
    assert line(rep.health(), PLENTY, SPOOL, young=True) == "up ready 100%\n"
    assert line(rep.health(), PLENTY, SPOOL).startswith("down ready #no spool shard")
    _all_up(rep, skip={("acceptor", 0), ("acceptor", 1)})
    assert line(rep.health(), PLENTY, SPOOL, young=True) == "up ready 100%\n"
    _all_up(rep)
    now[0] += 10                            # the acceptors went quiet: they are down
    _all_up(rep, skip={("acceptor", 0), ("acceptor", 1)})
    for young in (True, False):
        assert line(rep.health(), PLENTY, SPOOL, young=young) == \
            "down ready #no acceptor is up\n"
