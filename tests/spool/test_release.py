"""Which lanes a reload lets send more (mta.spool.release): their handed-back mail is
due again; the others' keeps its wait."""
from __future__ import annotations

import msgspec

from mta.config.schema import Config
from mta.delivery.engine import site_name
from mta.spool import release

SITE = "(alt1.|)mx.limited.test"


def config(**sections) -> Config:
    return msgspec.convert({"delivery": {"shaping_presets": False}, **sections}, Config)


def test_site_hosts_is_the_inverse_of_site_name():
    for hosts in (("mx.a.test",), ("alt1.mx.a.test", "mx.a.test"),
                  ("a.one.test", "b.two.test"), ("mx1.a.test", "mx2.a.test", "x.a.test")):
        assert release.site_hosts(site_name(hosts)) == tuple(sorted(hosts))
    assert release.site_hosts(site_name([f"host{i}.x{i}.test" for i in range(40)])) is None


def test_a_reload_releases_the_lanes_whose_limits_rose_only():
    lanes = {(SITE, "ip-2"): ["limited.test"], (SITE, "ip-3"): ["limited.test"],
             ("mx.other.test", "ip-2"): ["other.test"], (SITE, ""): ["limited.test"]}
    slow = config(shaping=[{"mx": "*.limited.test", "max_message_rate": "1/h"}])
    assert release.risen(slow, slow, lanes) == []
    # the rule raised (or removed): that site's lanes, not the other site's
    for faster in (config(shaping=[{"mx": "*.limited.test", "max_message_rate": "10/s"}]),
                   config()):
        assert sorted(release.risen(slow, faster, lanes)) == [(SITE, "ip-2"), (SITE, "ip-3")]
    # lowered: nothing (the lanes' mail keeps its wait)
    slower = config(shaping=[{"mx": "*.limited.test", "max_message_rate": "1/d"}])
    assert release.risen(slow, slower, lanes) == []
    # one source's rule: that lane only; connections count too
    one = config(shaping=[{"mx": "*.limited.test", "max_message_rate": "1/h"},
                          {"mx": "*.limited.test", "source": "ip-3", "connection_limit": 50}])
    assert release.risen(slow, one, lanes) == [(SITE, "ip-3")]
    # a domain rule
    dom = config(shaping=[{"domain": "other.test", "max_message_rate": "1/h"}])
    assert release.risen(dom, config(), {("mx.other.test", "ip-2"): ["other.test"],
                                         (SITE, "ip-2"): ["limited.test"]}) == \
        [("mx.other.test", "ip-2")]


def test_a_changed_warmup_plan_releases_its_source_and_what_no_source_could_take():
    lanes = {(SITE, "ip-2"): ["limited.test"], (SITE, "ip-3"): ["limited.test"],
             (SITE, ""): ["limited.test"]}
    plan = {"source": "ip-3", "overflow": "wait", "schedule": [{"day": 1, "hourly": 2}]}
    old = config(warmup=[plan])
    assert release.risen(old, old, lanes) == []
    raised = config(warmup=[dict(plan, schedule=[{"day": 1, "hourly": 100}])])
    assert sorted(release.risen(old, raised, lanes)) == [(SITE, ""), (SITE, "ip-3")]
    assert sorted(release.risen(old, config(), lanes)) == [(SITE, ""), (SITE, "ip-3")]


def test_a_reload_looks_up_in_full_only_the_lanes_a_changed_rule_matches(monkeypatch):
    # 100,000 lanes x 200 rules took seconds of the shard's loop: every lane was looked
    # up twice against every rule.  Now the changed rules pick the lanes to look up.
    rules = [{"mx": f"*.mx{i}.test", "max_message_rate": "1/h"} for i in range(50)]
    rules += [{"domain": f"d{i}.test", "max_message_rate": "1/h"} for i in range(50)]
    lanes = {(f"mx.site{i}.test", "ip-1"): [f"site{i}.test"] for i in range(3000)}
    lanes[("a.mx7.test", "ip-1")] = ["seven.test"]
    lanes[("mx.d3host.test", "ip-2")] = ["d3.test", "other.test"]
    calls = []
    real = release.Shaping.limits
    monkeypatch.setattr(release.Shaping, "limits",
                        lambda self, *a: calls.append(a) or real(self, *a))
    old = config(shaping=rules)
    raised = list(rules)
    raised[7] = {"mx": "*.mx7.test", "max_message_rate": "5/h"}
    raised[53] = {"domain": "d3.test", "max_message_rate": "5/h"}
    assert sorted(release.risen(old, config(shaping=raised), lanes)) == \
        [("a.mx7.test", "ip-1"), ("mx.d3host.test", "ip-2")]
    assert len(calls) == 4
    # the defaults changed: every lane may have other limits, each is looked up
    calls.clear()
    assert release.risen(old, config(shaping=rules, delivery={
        "shaping_presets": False, "connection_limit": 99}), lanes) != []
    assert len(calls) == 2 * len(lanes)
    # rules kept but in another order: the same
    calls.clear()
    release.risen(old, config(shaping=rules[1:] + rules[:1]), lanes)
    assert len(calls) == 2 * len(lanes)


def test_the_comparison_pauses_every_so_many_lanes_and_releases_the_same():
    lanes = {(f"mx.site{i}.test", "ip-1"): [f"site{i}.test"] for i in range(5000)}
    old = config(shaping=[{"mx": "*.test", "max_message_rate": "1/h"}])
    steps = list(release.compare(old, config(), lanes))
    assert steps.count(None) == 5000 // release.PAUSE_EVERY
    assert sorted(s for s in steps if s is not None) == sorted(lanes)
