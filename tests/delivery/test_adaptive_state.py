"""Response rules, automatic back-off and their durable store (mta/delivery/adaptive.py),
in process: two Adaptive objects on one state directory stand for two delivery processes."""
from __future__ import annotations

import os

import msgspec
import pytest

from mta.config import ConfigError, resolve
from mta.config.schema import Config
from mta.delivery import adaptive as ad
from mta.shaping import Limits, load_response_presets

BASE = Limits(connection_limit=10, max_deliveries_per_connection=100, max_message_rate=None,
              max_connection_rate=None, idle_timeout=5.0, starttls="none", rules=())


class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def config(tmp_path, rules=(), **backoff):
    return resolve(msgspec.convert({"server": {"state_dir": str(tmp_path)},
                                    "response_rule": list(rules), "backoff": backoff},
                                   Config), None)


def make(tmp_path, clock, rules=(), presets=False, **backoff):
    s = config(tmp_path, rules, **backoff)
    return ad.Adaptive(s.config, s.state_dir, presets=presets, now=clock)


RATE_RULE = {"name": "tss04", "code": 421, "text": r"\[TSS04\]", "action": "suspend",
             "scope": "source_site", "duration": 600}


def test_rule_matching_by_stage_code_enhanced_text_and_mx(tmp_path):
    a = make(tmp_path, Clock(), [
        RATE_RULE,
        {"name": "busy", "enhanced": "4.7.500", "stages": ["rcpt"], "action": "throttle",
         "connection_limit": 1, "duration": 60},
        {"name": "google-only", "code": 421, "mx": "*.google.com", "action": "defer",
         "delay": 30},
    ])
    m = a.rules.match
    assert m("mail", 421, "4.7.0", "[TSS04] Messages from 1.2.3.4 deferred", ["mx.y"]).name \
        == "tss04"
    assert m("mail", 421, "4.7.0", "[tss04] lower case too", ["mx.y"]).name == "tss04"
    assert m("mail", 451, "4.7.500", "Server busy", ["mx"]) is None      # wrong stage
    assert m("rcpt", 451, "4.7.500", "Server busy", ["mx"]).name == "busy"
    assert m("mail", 421, "4.7.0", "closing", ["mx.other"]) is None       # not Google
    assert m("mail", 421, "4.7.0", "closing", ["alt1.aspmx.l.google.com"]).name == "google-only"
    assert m("mail", 250, "", "[TSS04]", ["mx"]) is None                  # not a failure


def test_presets_load_and_match_provider_replies(tmp_path):
    names = [r.name for r in load_response_presets()]
    assert {"gmail-ip-rate-limited", "yahoo-tss04", "outlook-server-busy",
            "outlook-rp-001"} <= set(names)
    a = make(tmp_path, Clock(), presets=True)
    m = a.rules.match
    yahoo = ["mta5.am0.yahoodns.net"]
    assert m("mail", 421, "4.7.0", "[TSS04] Messages from 127.0.0.2 temporarily deferred due "
             "to unexpected volume or user complaints", yahoo).name == "yahoo-tss04"
    gmail = ["gmail-smtp-in.l.google.com"]
    assert m("data", 421, "4.7.28", "Our system has detected an unusual rate of unsolicited "
             "mail originating from your IP address.", gmail).name == "gmail-ip-rate-limited"
    assert m("data", 421, "4.7.28", "Gmail has detected an unusual rate of unsolicited mail "
             "originating from your DKIM domain.", gmail).name == "gmail-rate-limited"
    ms = ["example-com.mail.protection.outlook.com"]
    assert m("rcpt", 451, "4.7.500", "Server busy. Please try again later", ms).name == \
        "outlook-server-busy"
    # The Yahoo reply from a site that is not Yahoo's: no preset fires.
    assert m("mail", 421, "4.7.0", "[TSS04] Messages from x", ["mx.example.net"]) is None


@pytest.mark.parametrize("rule, key", [
    ({"code": 421, "action": "suspend"}, "response_rule[0].name"),
    ({"name": "x", "action": "suspend"}, "response_rule[0]: set at least one"),
    ({"name": "x", "text": "(", "action": "suspend"}, "response_rule[0].text"),
    ({"name": "x", "code": 421, "action": "explode"}, "response_rule[0].action"),
    ({"name": "x", "code": 421, "action": "throttle"}, "response_rule[0]: a throttle"),
    ({"name": "x", "code": 421, "action": "bounce"}, "response_rule[0].bounce_class"),
    ({"name": "x", "code": 421, "action": "defer"}, "response_rule[0].delay"),
    ({"name": "x", "code": 421, "stages": ["helo"]}, "response_rule[0].stages[0]"),
    ({"name": "x", "enhanced": "4.7", "action": "suspend"}, "response_rule[0].enhanced"),
])
def test_bad_rules_are_refused_naming_the_key(tmp_path, rule, key):
    with pytest.raises(ConfigError) as exc:
        config(tmp_path, [rule])
    assert key in str(exc.value)


def test_suspension_is_durable_and_seen_by_another_process_and_cancelled(tmp_path):
    clock = Clock()
    one, two = make(tmp_path, clock, [RATE_RULE]), make(tmp_path, clock, [RATE_RULE])
    rule = one.rules.match("mail", 421, "4.7.0", "[TSS04] x", ["mx"])
    e = one.fire(rule, "ip-2", "mx.site", "421 4.7.0 [TSS04] x", "mail")
    assert e.until == clock.t + 600 and one.suspended("ip-2", "mx.site") is e
    assert one.suspended("ip-3", "mx.site") is None                   # other source
    assert one.suspended("ip-2", "mx.other") is None                  # other site
    assert two.suspended("ip-2", "mx.site") is None                   # not read yet
    assert two.tick() is True
    assert two.suspended("ip-2", "mx.site").rule == "tss04"
    # A third "process" started later (a restart) reads it from disk.
    three = make(tmp_path, clock, [RATE_RULE])
    assert three.suspended("ip-2", "mx.site").reply == "421 4.7.0 [TSS04] x"
    [listed] = ad.list_entries(os.path.join(tmp_path, ad.STORE_DIR), clock.t)
    assert (listed.rule, listed.source, listed.site) == ("tss04", "ip-2", "mx.site")
    # Cancelled by name: every process sees it go at its next tick.
    assert [x.id for x in ad.cancel_entries(os.path.join(tmp_path, ad.STORE_DIR), "tss04",
                                                 clock.t)] \
        == [e.id]
    assert one.tick() and two.tick()
    assert one.suspended("ip-2", "mx.site") is None and two.suspended("ip-2", "mx.site") is None
    # Expiry: removed from disk by whoever sees it first.
    one.fire(rule, "ip-2", "mx.site", "421 again", "mail")
    clock.t += 601
    assert one.suspended("ip-2", "mx.site") is None
    assert one.tick() is True and ad.list_entries(os.path.join(tmp_path, ad.STORE_DIR),
                                                            clock.t) == []


def test_site_and_source_scopes(tmp_path):
    clock = Clock()
    a = make(tmp_path, clock, [
        {"name": "site-wide", "code": 421, "text": "site", "scope": "site", "duration": 60},
        {"name": "source-wide", "code": 421, "text": "source", "scope": "source",
         "duration": 60}])
    a.fire(a.rules.match("mail", 421, "", "site", []), "ip-2", "s1", "421 site", "mail")
    assert a.suspended("ip-2", "s1") and a.suspended("ip-3", "s1") and not a.suspended("ip-2", "s2")
    a.fire(a.rules.match("mail", 421, "", "source", []), "ip-4", "s1", "421 source", "mail")
    assert a.suspended("ip-4", "s9") and not a.suspended("ip-5", "s9")


def test_throttle_lowers_limits_then_they_return(tmp_path):
    clock = Clock()
    a = make(tmp_path, clock, [{"name": "slow", "code": 451, "action": "throttle",
                                "connection_limit": 2, "max_message_rate": "60/m",
                                "duration": 100}])
    a.fire(a.rules.match("rcpt", 451, "", "busy", []), "ip-2", "s", "451 busy", "rcpt")
    lim = a.adjust("ip-2", "s", BASE)
    assert (lim.connection_limit, lim.max_message_rate) == (2, 1.0)
    assert "throttle slow" in lim.rules
    assert a.adjust("ip-3", "s", BASE) is BASE
    clock.t += 101
    assert a.adjust("ip-2", "s", BASE) is BASE


def test_backoff_enters_on_deferrals_and_recovers_step_by_step(tmp_path):
    clock = Clock()
    a = make(tmp_path, clock, window=10, min_attempts=10, threshold=0.2, decrease=0.5,
             recover_step=0.25, recover_interval=5, min_rate="6/m")
    shaped = msgspec.structs.replace(BASE, max_message_rate=20.0)
    # 10 attempts over 5 s, 5 accepted: 50 % deferred, the site took about 1/s.
    for i in range(10):
        clock.t += 0.5
        changed = a.record("ip-2", "s", ok=i % 2 == 0, base=shaped)
    assert changed is True
    [e] = a.store.entries.values()
    assert e.kind == "backoff" and e.level == 1 and e.ceiling == 20.0
    # half of what the site took over the window: 5 in 10 s
    assert e.rate == pytest.approx(0.25)
    lim = a.adjust("ip-2", "s", shaped)
    assert lim.max_message_rate == pytest.approx(e.rate)
    assert lim.connection_limit == 1                  # in proportion to the rate
    # Another process sees the same rate (state on disk).
    b = make(tmp_path, clock, window=10, min_attempts=10, threshold=0.2, decrease=0.5,
             recover_step=0.25, recover_interval=5, min_rate="6/m")
    assert b.adjust("ip-2", "s", shaped).max_message_rate == pytest.approx(e.rate)
    # Recovery: one step every 5 s while nothing is deferred.
    rates = []
    for _ in range(3):
        clock.t += 5
        a.tick()
        rates.append(a.adjust("ip-2", "s", shaped).max_message_rate)
    # the step: 25 % of the decreased rate, but at least min_rate (6/m)
    assert e.step == pytest.approx(max(0.1, 0.25 * e.rate))
    assert rates == pytest.approx([e.rate + e.step, e.rate + 2 * e.step, e.rate + 3 * e.step])
    # Deferrals again: deeper (level 2), from the current rate.
    for i in range(20):
        clock.t += 0.1
        a.record("ip-2", "s", ok=i % 3 == 0, base=shaped)
    [e2] = a.store.entries.values()
    assert e2.level == 2 and e2.rate < rates[-1]
    # Recovery to the ceiling ends back-off: the entry is gone and the limits are shaping's.
    clock.t += 5 * (int((20.0 - e2.rate) / e2.step) + 2)
    assert a.tick() is True
    assert a.store.entries == {} and a.adjust("ip-2", "s", shaped) is shaped


def test_backoff_ignores_few_attempts_and_low_share(tmp_path):
    clock = Clock()
    a = make(tmp_path, clock, window=10, min_attempts=10, threshold=0.2)
    for _ in range(9):
        clock.t += 0.1
        a.record("ip-2", "s", ok=False, base=BASE)
    assert not a.store.entries                        # fewer than min_attempts
    for i in range(40):
        clock.t += 0.1
        a.record("ip-3", "s", ok=i % 10 != 0, base=BASE)
    assert not a.store.entries                        # 10 % deferred: below the threshold
    a2 = make(tmp_path, clock, enabled=False)
    for _ in range(50):
        a2.record("ip-4", "s", ok=False, base=BASE)
    assert not a2.store.entries


def test_store_is_bounded_and_ignores_garbage(tmp_path):
    clock = Clock()
    a = make(tmp_path, clock, [RATE_RULE], max_entries=2)
    rule = a.rules.match("mail", 421, "", "[TSS04]", [])
    assert a.fire(rule, "a", "s", "r", "mail") and a.fire(rule, "b", "s", "r", "mail")
    assert a.fire(rule, "c", "s", "r", "mail") is None
    d = os.path.join(tmp_path, ad.STORE_DIR)
    with open(os.path.join(d, "0000.json"), "w") as fh:
        fh.write("{not json")
    b = make(tmp_path, clock, [RATE_RULE])
    assert len(b.store.entries) == 2


def test_backoff_recovery_pauses_under_the_rate_that_failed_then_probes(tmp_path):
    clock = Clock()
    a = make(tmp_path, clock, window=1, min_attempts=10, threshold=0.2, decrease=0.8,
             recover_step=1.0, recover_interval=1, hold_intervals=3)
    shaped = msgspec.structs.replace(BASE, max_message_rate=100.0)
    for i in range(10):
        clock.t += 0.1                       # 10/s attempted, half of it deferred
        a.record("ip-2", "s", ok=i % 2 == 0, base=shaped)
    [e] = a.store.entries.values()
    assert e.failed_at == pytest.approx(10.0) and e.hold == 3
    assert e.rate == pytest.approx(4.0) and e.step == pytest.approx(4.0)
    rates = []
    for _ in range(5):
        clock.t += 1
        rates.append(a.adjust("ip-2", "s", shaped).max_message_rate)
    # 4 + 4/step, held at 0.9 x 10 for the first 3 steps, then probing upwards
    assert rates == pytest.approx([8.0, 9.0, 16.0, 20.0, 24.0])


def test_warmup_stages_caps_windows_and_durable_first_use(tmp_path):
    from mta.delivery.limits import NodeLimiter

    clock = Clock()
    s = resolve(msgspec.convert({
        "server": {"state_dir": str(tmp_path)},
        "egress": {"source": [{"name": "new", "source_address": "127.0.0.1"}],
                   "pool": [{"name": "default", "sources": [{"source": "new"}]}]},
        "warmup": [{"source": "new", "mx": "*.big.test", "schedule": [
            {"day": 1, "hourly": 3, "daily": 5}, {"day": 3, "hourly": 100}]}]}, Config), None)
    store = ad.Store(os.path.join(tmp_path, ad.STORE_DIR))
    limiter = NodeLimiter(str(tmp_path / "limits"))
    w = ad.Warmup(s.config, store, limiter, now=clock)
    hosts = ["mx1.big.test"]
    assert w.stage("new", ["mx.small.test"], clock.t) is None      # not that site
    assert w.stage("other", hosts, clock.t) is None                # not warming
    assert [w.take("new", "big", hosts, clock.t) for _ in range(4)][:3] == [0.0] * 3
    assert w.capped("new", "big", hosts, clock.t) == pytest.approx(3600.0)
    assert w.take("new", "big", hosts, clock.t) == pytest.approx(3600.0)
    assert w.take("new", "other-site", hosts, clock.t) == 0.0       # per site
    clock.t += 3600                                                 # next hour: 2 more
    assert [w.take("new", "big", hosts, clock.t) for _ in range(3)] == \
        [0.0, 0.0, pytest.approx(86400.0 - 3600.0)]                 # the daily cap (5)
    # The first use is durable: another process (or a restart) counts days from it.
    w2 = ad.Warmup(s.config, ad.Store(os.path.join(tmp_path, ad.STORE_DIR)), limiter, now=clock)
    clock.t += 2 * 86400
    day, stage, _ = w2.stage("new", hosts, clock.t)
    assert day == 3 and stage.hourly == 100 and stage.daily == 0
    st = w2.status([type("S", (), {"name": "big", "hosts": hosts})()])
    assert st["new"]["day"] == 3 and st["new"]["sites"]["big"] == {"hour": 0}
    limiter.close()


def test_a_busy_warmup_count_is_a_short_wait_never_a_full_cap(tmp_path):
    """Another process holds a count's lock (for microseconds): take() asks to try again
    at once and capped() leaves the decision to take(); before, both answered the rest
    of the hour, as if the cap were reached."""
    import fcntl

    from mta.delivery import limits

    clock = Clock()
    s = resolve(msgspec.convert({
        "server": {"state_dir": str(tmp_path)},
        "egress": {"source": [{"name": "new", "source_address": "127.0.0.1"}],
                   "pool": [{"name": "default", "sources": [{"source": "new"}]}]},
        "warmup": [{"source": "new", "schedule": [{"day": 1, "hourly": 10, "daily": 50}]}]},
        Config), None)
    mine = limits.NodeLimiter(str(tmp_path / "limits"))
    other = limits.NodeLimiter(str(tmp_path / "limits"))
    w = ad.Warmup(s.config, ad.Store(os.path.join(tmp_path, ad.STORE_DIR)), mine, now=clock)
    site = type("S", (), {"name": "site", "hosts": ["mx.site"]})()
    assert w.take("new", "site", site.hosts, clock.t) == 0.0
    for kind in ("warmup-hour", "warmup-day"):
        fd = other._entry(f"new|site|{kind}").fd
        fcntl.fcntl(fd, limits._SETLK, limits._LOCK_RATE)
        assert 0.0 < w.take("new", "site", site.hosts, clock.t) < 1.0
        assert w.capped("new", "site", site.hosts, clock.t) == 0.0
        assert "site" in w.status([site])["new"]["sites"]          # a busy count left out
        fcntl.fcntl(fd, limits._SETLK, limits._UNLOCK_RATE)
    assert w.take("new", "site", site.hosts, clock.t) == 0.0
    assert w.status([site])["new"]["sites"]["site"] == {"hour": 2, "day": 2}
    mine.close()
    other.close()


@pytest.mark.parametrize("warmup, key", [
    ({"source": "nope", "schedule": [{"day": 1, "hourly": 1}]}, "warmup[0].source"),
    ({"source": "new", "schedule": []}, "warmup[0].schedule"),
    ({"source": "new", "schedule": [{"day": 2, "hourly": 1}]}, "warmup[0].schedule"),
    ({"source": "new", "schedule": [{"day": 1}], "overflow": "drop"}, "warmup[0].overflow"),
    # an mx glob no host name can match (a comma for a dot, a space): the warm-up would
    # hold for no site, and the new source send at full volume from its first day
    ({"source": "new", "mx": "*.google,com", "schedule": [{"day": 1, "hourly": 1}]},
     "warmup[0].mx"),
    ({"source": "new", "mx": "*.google .com", "schedule": [{"day": 1, "hourly": 1}]},
     "warmup[0].mx"),
])
def test_bad_warmup_is_refused_naming_the_key(tmp_path, warmup, key):
    with pytest.raises(ConfigError) as exc:
        resolve(msgspec.convert({
            "server": {"state_dir": str(tmp_path)},
            "egress": {"source": [{"name": "new", "source_address": "127.0.0.1"}],
                       "pool": [{"name": "default", "sources": [{"source": "new"}]}]},
            "warmup": [warmup]}, Config), None)
    assert key in str(exc.value)


def test_only_deferrals_about_the_site_count_for_backoff(tmp_path):
    a = make(tmp_path, Clock())
    # the site asks to slow down: a 421 anywhere, any 4xx before RCPT, one to DATA
    # about the system, a 4xx with a rate/policy code
    assert a.slows(421, "4.7.0", "rcpt") and a.slows(421, "", "connect")
    assert a.slows(451, "4.3.0", "mail") and a.slows(452, "4.3.1", "data")
    assert a.slows(451, "4.7.500", "rcpt") and a.slows(450, "4.7.28", "rcpt")
    # about one recipient: greylisting, a full mailbox, a busy mailbox
    assert not a.slows(450, "4.2.0", "rcpt") and not a.slows(451, "4.7.1", "rcpt")
    assert not a.slows(452, "4.2.2", "rcpt") and not a.slows(451, "", "rcpt")
    # after DATA: the system's trouble or no enhanced code counts; greylisting (4.7.1)
    # and a mailbox's (4.2.x) do not, a signal does
    assert a.slows(451, "4.3.0", "data") and a.slows(451, "", "data")
    assert a.slows(451, "4.4.5", "data") and a.slows(451, "4.7.500", "data")
    assert not a.slows(451, "4.7.1", "data") and not a.slows(452, "4.2.2", "data")
    assert a.slows(421, "4.7.1", "data")
    b = make(tmp_path / "b", Clock(), rcpt_signals=["4.2.1"])
    assert b.slows(450, "4.2.1", "rcpt") and not b.slows(451, "4.7.0", "rcpt")
    with pytest.raises(msgspec.ValidationError, match="rcpt_signals"):
        config(tmp_path, rcpt_signals=["5.7.1"])


def test_a_shorter_suspension_does_not_replace_a_longer_one_in_effect(tmp_path):
    clock = Clock()
    a = make(tmp_path, clock, [
        {"name": "day-block", "text": "TS03", "action": "suspend", "duration": 86400},
        {"name": "hour-block", "text": "TSS04", "action": "suspend", "duration": 3600}])
    long = a.fire(a.rules.match("mail", 421, "", "TS03", []), "ip-2", "s", "421 TS03", "mail")
    clock.t += 10
    kept = a.fire(a.rules.match("mail", 421, "", "TSS04", []), "ip-2", "s", "421 TSS04",
                  "mail")
    assert kept is long and not a.fired_new
    assert a.suspended("ip-2", "s").rule == "day-block"
    assert a.suspended("ip-2", "s", clock.t + 3700) is not None
    # ... while a longer one does replace a shorter one (the site said more)
    b = make(tmp_path / "b", clock, [
        {"name": "day-block", "text": "TS03", "action": "suspend", "duration": 86400},
        {"name": "hour-block", "text": "TSS04", "action": "suspend", "duration": 3600}])
    b.fire(b.rules.match("mail", 421, "", "TSS04", []), "ip-2", "s", "421 TSS04", "mail")
    e = b.fire(b.rules.match("mail", 421, "", "TS03", []), "ip-2", "s", "421 TS03", "mail")
    assert e.rule == "day-block" and e.until == clock.t + 86400 and b.fired_new


def new_source_warmup(tmp_path, clock, hourly: int, daily: int, nodes: int = 1):
    """(Warmup, its limiter) for a source "new" on day 1 of a schedule of *hourly* and
    *daily* caps."""
    from mta.delivery.limits import NodeLimiter

    s = resolve(msgspec.convert({
        "server": {"state_dir": str(tmp_path)},
        "egress": {"source": [{"name": "new", "source_address": "127.0.0.1"}],
                   "pool": [{"name": "default", "sources": [{"source": "new"}]}]},
        "warmup": [{"source": "new",
                    "schedule": [{"day": 1, "hourly": hourly, "daily": daily}]}]},
        Config), None)
    limiter = NodeLimiter(str(tmp_path / "limits"))
    store = ad.Store(os.path.join(tmp_path, ad.STORE_DIR))
    return ad.Warmup(s.config, store, limiter, now=clock, nodes=nodes), limiter


def test_a_warmup_count_given_back_frees_the_cap_in_its_window_only(tmp_path):
    clock = Clock()
    w, limiter = new_source_warmup(tmp_path, clock, hourly=2, daily=3)
    counted: list = []
    assert w.take("new", "s", [], clock.t, counted) == 0.0
    assert w.take("new", "s", [], clock.t) == 0.0
    assert w.capped("new", "s", [], clock.t) > 0 and len(counted) == 2   # hour and day
    w.give_back(counted)                 # that message was not sent: room again
    assert w.capped("new", "s", [], clock.t) == 0.0
    assert w.take("new", "s", [], clock.t, counted) == 0.0
    clock.t += 3600                      # next hour: its count starts at 0 regardless
    w.give_back(counted[2:])
    assert w.status([type("S", (), {"name": "s", "hosts": []})()])["new"]["sites"]["s"] == \
        {"hour": 0, "day": 1}
    assert w.take("new", "s", [], clock.t) == 0.0
    assert w.take("new", "s", [], clock.t) == 0.0
    assert w.take("new", "s", [], clock.t) > 0      # the daily cap of 3, less one given back
    limiter.close()


def test_a_looser_throttle_does_not_replace_a_stricter_one_in_effect(tmp_path):
    # Gmail's "try again later" (2 connections, no rate) came after its rate limit (60/m
    # and 2 connections) on the same source x site: the rate limit stays until its end.
    clock = Clock()
    rules = [{"name": "rate-limited", "text": "4.7.28", "action": "throttle",
              "max_message_rate": "60/m", "connection_limit": 2, "duration": 900},
             {"name": "try-later", "text": "try again later", "action": "throttle",
              "connection_limit": 2, "duration": 600},
             {"name": "one-conn", "text": "one at a time", "action": "throttle",
              "connection_limit": 1, "duration": 600}]
    a = make(tmp_path, clock, rules)
    strict = a.fire(a.rules.match("mail", 421, "", "4.7.28", []), "ip-2", "s", "421 4.7.28",
                    "mail")
    clock.t += 10
    kept = a.fire(a.rules.match("mail", 421, "", "try again later", []), "ip-2", "s",
                  "421 try again later", "mail")
    assert kept is strict and not a.fired_new
    lim = a.adjust("ip-2", "s", BASE)
    assert (lim.connection_limit, lim.max_message_rate) == (2, 1.0)
    # one stricter in one limit and looser in the other takes the stricter of each:
    # 1 connection, and still 60/m, until the rate limit's own (later) end
    e = a.fire(a.rules.match("mail", 421, "", "one at a time", []), "ip-2", "s",
               "421 one at a time", "mail")
    assert e.rule == "one-conn + rate-limited" and a.fired_new
    assert (e.connection_limit, e.max_message_rate, e.until) == (1, 1.0, strict.until)
    lim = a.adjust("ip-2", "s", BASE)
    assert (lim.connection_limit, lim.max_message_rate) == (1, 1.0)
    # and one as loose that holds longer keeps the rate limit until its own end: the
    # site's "try again later" must not lift the rate limit it set before
    b = make(tmp_path / "b", clock, rules[1:2] + [dict(rules[0], duration=300)])
    b.fire(b.rules.match("mail", 421, "", "4.7.28", []), "ip-2", "s", "421 4.7.28", "mail")
    clock.t += 100
    e = b.fire(b.rules.match("mail", 421, "", "try again later", []), "ip-2", "s",
               "421 try again later", "mail")
    assert e.rule == "try-later + rate-limited" and b.fired_new
    assert (e.connection_limit, e.max_message_rate, e.until) == (2, 1.0, clock.t + 600)
    lim = b.adjust("ip-2", "s", BASE)
    assert (lim.connection_limit, lim.max_message_rate) == (2, 1.0)
    clock.t += 250                       # past the rate limit's own end: still held
    assert b.adjust("ip-2", "s", BASE).max_message_rate == 1.0
    # the same reply again extends it, and names each rule once
    e = b.fire(b.rules.match("mail", 421, "", "try again later", []), "ip-2", "s",
               "421 try again later", "mail")
    assert (e.rule, e.max_message_rate, e.until) == ("try-later + rate-limited", 1.0,
                                                     clock.t + 600)
    clock.t += 601                       # past the merged end: the shaping limits again
    lim = b.adjust("ip-2", "s", BASE)
    assert (lim.connection_limit, lim.max_message_rate) == \
        (BASE.connection_limit, BASE.max_message_rate)


def test_temporary_files_of_a_writer_killed_mid_write_are_removed(tmp_path):
    # put() writes <id>.json.<pid>.tmp, syncs, renames; a kill -9 between left the file
    # in the store for ever.  The next process to open the store removes those whose
    # writer is gone, and leaves a live writer's alone.
    import subprocess
    import sys
    d = tmp_path / "adaptive"
    d.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = d / f"abc123.json.{p.pid}.tmp"
    live = d / f"def456.json.{os.getpid()}.tmp"
    for f in (dead, live):
        f.write_text('{"id": "abc123", "kind": "suspe')
    store = ad.Store(str(d))
    assert not dead.exists() and live.exists()
    assert store.entries == {}


def test_a_throttle_is_this_nodes_share_with_several_nodes(tmp_path):
    """[cluster] nodes = 3: a throttle's "2 connections, 60/m" is for the nodes together:
    this node keeps to 1 connection (2 // 3, at least 1) and 20/m; the shaping base is
    already the share and is not divided again."""
    clock = Clock()
    s = config(tmp_path, [{"name": "slow", "code": 451, "action": "throttle",
                           "connection_limit": 2, "max_message_rate": "60/m",
                           "duration": 100}])
    a = ad.Adaptive(s.config, s.state_dir, presets=False, now=clock, nodes=3)
    a.fire(a.rules.match("rcpt", 451, "", "busy", []), "ip-2", "s", "451 busy", "rcpt")
    lim = a.adjust("ip-2", "s", BASE)
    assert lim.connection_limit == 1
    assert lim.max_message_rate == pytest.approx(1 / 3)
    # the entry keeps the rule's own limits (mta rules list shows what the rule says)
    [e] = a.store.entries.values()
    assert (e.connection_limit, e.max_message_rate) == (2, 1.0)
    # a base stricter than the throttle's share holds
    base = msgspec.structs.replace(BASE, connection_limit=1, max_message_rate=0.1)
    lim = a.adjust("ip-2", "s", base)
    assert (lim.connection_limit, lim.max_message_rate) == (1, 0.1)


def test_warmup_caps_are_this_nodes_share_with_several_nodes(tmp_path):
    """[cluster] nodes = 2: day 1's caps of 5 an hour and 9 a day are 2 and 4 on this
    node (rounded down); the status shows the caps in effect."""
    clock = Clock()
    w, limiter = new_source_warmup(tmp_path, clock, hourly=5, daily=9, nodes=2)
    hosts = ["mx.site"]
    assert [w.take("new", "site", hosts, clock.t) for _ in range(3)] == \
        [0.0, 0.0, pytest.approx(3600.0)]
    clock.t += 3600
    assert [w.take("new", "site", hosts, clock.t) for _ in range(2)] == [0.0, 0.0]
    clock.t += 3600                                          # the day's 4 are taken
    assert w.take("new", "site", hosts, clock.t) == pytest.approx(86400.0 - 2 * 3600.0)
    st = w.status([type("S", (), {"name": "site", "hosts": hosts})()])
    assert (st["new"]["hourly"], st["new"]["daily"]) == (2, 4)
    limiter.close()


def test_rate_rises_at_the_throttles_end_or_the_back_offs_next_step(tmp_path):
    """When the rate a throttle or back-off lowered rises again: what a job handed back
    for that rate waits for at most (Engine._hand_back); None when nothing lowers it."""
    clock = Clock()
    a = make(tmp_path, clock, [{"name": "slow", "code": 451, "action": "throttle",
                                "max_message_rate": "1/h", "duration": 100}],
             window=1, min_attempts=10, threshold=0.2, decrease=0.8, recover_step=1.0,
             recover_interval=1, hold_intervals=3)
    a.fire(a.rules.match("rcpt", 451, "", "busy", []), "ip-2", "s", "451 busy", "rcpt")
    assert a.rate_rises_at("ip-2", "s", None) == pytest.approx(clock.t + 100)
    assert a.rate_rises_at("ip-2", "s", 10.0) == pytest.approx(clock.t + 100)
    assert a.rate_rises_at("ip-2", "s", 1 / 7200) is None     # shaping's is stricter
    assert a.rate_rises_at("ip-3", "s", None) is None
    shaped = msgspec.structs.replace(BASE, max_message_rate=100.0)
    for i in range(10):
        clock.t += 0.1
        a.record("ip-3", "s", ok=i % 2 == 0, base=shaped)
    [b] = [e for e in a.store.entries.values() if e.kind == ad.BACKOFF]
    clock.t = b.decreased + 1.5                     # step 1 (8/s): step 2 raises it
    assert a.rate_rises_at("ip-3", "s", 100.0) == pytest.approx(b.decreased + 2)
    clock.t += 100                                  # the throttle is over
    assert a.rate_rises_at("ip-2", "s", None) is None
