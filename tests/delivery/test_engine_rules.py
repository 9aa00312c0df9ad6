"""Response rules in the delivery engine, in process: bounce, defer and suspend actions
against a real SMTP peer on loopback (tests/delivery/test_engine.py's Peer: local parts
"later*" get 450 4.2.1 at RCPT, "bad*" 550 5.1.1)."""
from __future__ import annotations

import asyncio
import time
import tempfile

import msgspec
import uvloop
from test_engine import LOOP_BOUND, Peer, job, mx_to_loopback

from mta import bus
from mta.config import resolve
from mta.config.schema import Config
from mta.delivery.engine import Engine


# Each engine's state directory, under one directory removed when the tests end.
_STATE_DIRS = tempfile.TemporaryDirectory(prefix="rules-")


def run(jobs, rules, sections=None, protocol=None, domains=("a.test",), first=0, **delivery):
    """Deliver *jobs* with the [[response_rule]] tables *rules*; [(job, results)], engine,
    and the peer (*protocol*: the server's protocol factory instead of the Peer's;
    *domains*: those whose MX is the peer; *first*: that many jobs submitted, and the
    rest half a second later, once their sites are known)."""
    async def main():
        loop = asyncio.get_running_loop()
        peer = Peer()
        server = await loop.create_server(protocol or peer.protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = msgspec.convert({
            "server": {"hostname": "mta.test", "state_dir": tempfile.mkdtemp(dir=_STATE_DIRS.name)},
            "delivery": {"mx_port": port, "starttls": "none", "shaping_presets": False,
                         **delivery},
            "response_rule": rules, **(sections or {})}, Config)
        reports = []
        done = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append((j, results, retry_after))
            if len(reports) == len(jobs):
                done.set()

        engine = Engine(resolve(cfg, None), mx_to_loopback(*domains), report, loop)
        for n, j in enumerate(jobs):
            if first and n == first:
                await asyncio.sleep(0.5)
            engine.submit(j)
        await done.wait()
        await engine.close()
        server.close()
        return reports, engine, peer

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(main(), LOOP_BOUND))


# a pool of two sources of weight 1, bound to two loopback addresses
TWO_SOURCES = {"egress": {"source": [{"name": "s1", "source_address": "127.0.0.1"},
                                     {"name": "s2", "source_address": "127.0.0.2"}],
                          "pool": [{"name": "default", "sources": [
                              {"source": "s1"}, {"source": "s2"}]}]}}


def test_bounce_action_fails_the_recipient_now_with_its_class():
    rules = [{"name": "busy-is-dead", "code": 450, "enhanced": "4.2.1", "stages": ["rcpt"],
              "action": "bounce", "bounce_class": "51"}]
    [(j, results, _)], engine, _ = run([job("a.test", "later1", "ok1")], rules)
    by = {r.index: r for r in results}
    assert (by[0].outcome, by[0].code, by[0].bounce_class) == (bus.FAILED, 450, "51")
    assert by[1].outcome == bus.DELIVERED and by[1].bounce_class == ""
    assert j.fired is not None and (j.fired.name, j.fired.action, j.fired.stage) == \
        ("busy-is-dead", "bounce", "rcpt")
    assert "450 4.2.1" in j.fired.reply
    assert engine.stats["rule:busy-is-dead"] == 1


class DataLater(Peer):
    """The Peer, answering every message's end of data "451 4.3.0" (try again later)."""

    async def handle_DATA(self, server, session, envelope):
        return "451 4.3.0 try again later"


def test_a_bounce_rule_fired_by_one_rcpt_reply_leaves_the_others_replies_alone():
    # later1's RCPT reply fires the bounce rule; ok1 was accepted and its message got a
    # 451 at the end of data: deferred -- it used to fail with later1's rule and class.
    rules = [{"name": "busy-is-dead", "code": 450, "enhanced": "4.2.1", "stages": ["rcpt"],
              "action": "bounce", "bounce_class": "51"}]
    [(j, results, _)], _, _ = run([job("a.test", "later1", "ok1")], rules,
                                  protocol=DataLater().protocol)
    by = {r.index: r for r in results}
    assert (by[0].outcome, by[0].code, by[0].bounce_class) == (bus.FAILED, 450, "51")
    assert (by[1].outcome, by[1].code, by[1].bounce_class) == (bus.DEFERRED, 451, "")
    assert j.fired is not None and j.fired.name == "busy-is-dead"


def test_defer_action_asks_for_its_delay():
    rules = [{"name": "later-later", "code": 450, "action": "defer", "delay": 1200}]
    [(j, results, _)], _, _ = run([job("a.test", "later1")], rules, time_scale=0.5)
    assert results[0].outcome == bus.DEFERRED
    assert j.retry_after == 600.0                  # 1200 s x time_scale
    assert j.fired.name == "later-later" and j.fired.id == ""


class Busy(asyncio.Protocol):
    """A server that greets every connection with 421 "too many connections" and closes."""

    def connection_made(self, transport):
        transport.write(b"421 4.7.0 too many connections from your IP, try again later\r\n")
        transport.close()


def test_a_defer_rule_on_the_greeting_asks_for_its_delay_for_the_whole_lane():
    # A site that says "try later" at the greeting says it of every job queued for it:
    # a defer rule matching that reply must give its delay to them all, not let the
    # retry schedule bring them back in a minute to be refused again.
    rules = [{"name": "busy-site", "code": 421, "stages": ["greeting"], "action": "defer",
              "delay": 1200}]
    jobs = [job("a.test", "ok1", n=0), job("a.test", "ok2", n=1), job("a.test", "ok3", n=2)]
    reports, _, _ = run(jobs, rules, protocol=Busy, time_scale=0.5, connection_limit=1)
    assert len(reports) == 3
    for j, results, retry_after in reports:
        assert [r.outcome for r in results] == [bus.DEFERRED]
        assert results[0].code == 421 and "too many connections" in results[0].text
        assert max(retry_after, j.retry_after) == 600.0     # 1200 s x time_scale
        assert j.fired is not None and (j.fired.name, j.fired.action, j.fired.stage) == \
            ("busy-site", "defer", "greeting")


class Refusing(asyncio.Protocol):
    """A server that greets every connection with 554 (this source is refused) and closes."""

    def connection_made(self, transport):
        transport.write(b"554 5.7.1 Service unavailable; client host blocked using "
                        b"zen.example\r\n")
        transport.close()


def test_a_bounce_rule_on_the_greeting_fails_the_jobs():
    # A bounce rule says what a reply means wherever it comes: one that matched the
    # greeting only deferred the jobs (connect() ended every host's failure in a
    # deferral), so they came back until they expired.
    rules = [{"name": "blocked-for-good", "code": 554, "stages": ["greeting"],
              "action": "bounce", "bounce_class": "51"}]
    jobs = [job("a.test", "ok1", n=0), job("a.test", "ok2", n=1)]
    reports, _, _ = run(jobs, rules, protocol=Refusing, connection_limit=1)
    assert len(reports) == 2
    for j, results, _ in reports:
        assert [(r.outcome, r.code, r.enhanced, r.bounce_class) for r in results] == [
            (bus.FAILED, 554, "5.7.1", "51")], results
        assert "blocked" in results[0].text
        assert j.fired is not None and (j.fired.name, j.fired.action) == \
            ("blocked-for-good", "bounce")


def test_no_rule_no_record_and_5xx_without_a_rule_is_unchanged():
    [(j, results, _)], _, _ = run([job("a.test", "bad1", "later1")], [
        {"name": "other", "code": 421, "action": "defer", "delay": 5}])
    assert [r.outcome for r in sorted(results, key=lambda r: r.index)] == \
        [bus.FAILED, bus.DEFERRED]
    assert j.fired is None and j.retry_after == 0.0


def test_suspend_action_requeues_the_rest_of_the_lane():
    rules = [{"name": "stop-it", "code": 450, "action": "suspend", "scope": "source_site",
              "duration": 600}]
    jobs = [job("a.test", "later1", n=0)] + [job("a.test", f"ok{i}", n=i) for i in range(1, 6)]
    reports, engine, _ = run(jobs, rules, connection_limit=1)
    outcomes = [r[1][0].outcome for r in sorted(reports, key=lambda r: r[0].msg.req)]
    assert outcomes[0] == bus.DEFERRED
    # The jobs behind it in the (only) source's lane wait in the spool (not an attempt)
    # for as long as the suspension lasts.
    assert bus.REQUEUED in outcomes[1:]
    requeued = [r for r in reports if r[1][0].outcome == bus.REQUEUED]
    assert all(500 <= r[2] <= 600 for r in requeued), [r[2] for r in requeued]
    [entry] = engine.adaptive.status()
    assert (entry["rule"], entry["kind"], entry["source"]) == ("stop-it", "suspend", "default")


def test_warmup_wait_overflow_requeues_until_the_hour_rolls_over():
    sections = {"egress": {"source": [{"name": "new", "source_address": "127.0.0.1"}],
                           "pool": [{"name": "default", "sources": [{"source": "new"}]}]},
                "warmup": [{"source": "new", "overflow": "wait",
                            "schedule": [{"day": 1, "hourly": 2}]}]}
    jobs = [job("a.test", f"ok{i}", n=i) for i in range(5)]
    reports, engine, _ = run(jobs, [], sections=sections, time_scale=0.5)
    outcomes = sorted(r[1][0].outcome for r in reports)
    assert outcomes.count(bus.DELIVERED) == 2 and outcomes.count(bus.REQUEUED) == 3
    waits = [r[2] for r in reports if r[1][0].outcome == bus.REQUEUED]
    assert all(1700 <= w <= 1800 for w in waits), waits      # the rest of the hour (x 0.5)
    assert "warm-up cap" in [r for r in reports if r[1][0].outcome == bus.REQUEUED][0][1][0].text


def test_a_suspension_stops_the_lanes_other_workers_before_they_connect():
    """Workers of the lane waiting for its connection rate when a rule suspends it open no
    connection and begin no transaction: their jobs wait in the spool (REQUEUED)."""
    rules = [{"name": "stop-it", "code": 450, "action": "suspend", "scope": "source_site",
              "duration": 600}]
    sections = {"shaping": [{"mx": "*", "connection_limit": 6, "max_connection_rate": "2/s"}]}
    jobs = [job("a.test", "later1", n=0)] + [job("a.test", f"ok{i}", n=i) for i in range(1, 6)]
    reports, _, peer = run(jobs, rules, sections=sections)
    outcomes = {r[0].msg.req: r[1][0].outcome for r in reports}
    assert outcomes[0] == bus.DEFERRED
    assert [outcomes[i] for i in range(1, 6)] == [bus.REQUEUED] * 5, outcomes
    assert peer.connections == 1


def test_a_warmup_count_busy_in_another_process_is_not_a_full_cap():
    """Another delivery process inside its few-microsecond count of the same warm-up key:
    the job comes back in a second, not when the hour rolls over (the busy lock was read
    as a full cap: overflow "wait" requeued it for the rest of the hour)."""
    from mta.delivery import limits

    async def main():
        loop = asyncio.get_running_loop()
        peer = Peer()
        server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = msgspec.convert({
            "server": {"hostname": "mta.test", "state_dir": tempfile.mkdtemp(dir=_STATE_DIRS.name)},
            "delivery": {"mx_port": port, "starttls": "none", "shaping_presets": False},
            "egress": {"source": [{"name": "new", "source_address": "127.0.0.1"}],
                       "pool": [{"name": "default", "sources": [{"source": "new"}]}]},
            "warmup": [{"source": "new", "overflow": "wait",
                        "schedule": [{"day": 1, "hourly": 1000}]}]}, Config)
        s = resolve(cfg, None)
        reports = []
        got = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append((results[0].outcome, retry_after))
            got.set()

        engine = Engine(s, mx_to_loopback("a.test"), report, loop)
        other = limits.NodeLimiter(f"{s.run_dir}/limits")       # another delivery process
        fd = other._entry("new|mx.a.test|warmup-hour").fd
        limits.fcntl.fcntl(fd, limits._SETLK, limits._LOCK_RATE)
        engine.submit(job("a.test", "ok1", n=0))
        await got.wait()
        limits.fcntl.fcntl(fd, limits._SETLK, limits._UNLOCK_RATE)
        got.clear()
        engine.submit(job("a.test", "ok2", n=1))
        await got.wait()
        await engine.close()
        other.close()
        server.close()
        return reports, peer

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports, peer = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    (first, wait), second = reports
    assert first == bus.REQUEUED and wait <= 1.0, reports
    assert second == (bus.DELIVERED, 0.0) and len(peer.messages) == 1


def test_a_warmup_wait_requeue_names_its_source_and_the_pools_others_deliver():
    # The spool holds a domain and pool back as a whole after a REQUEUED that names no
    # source (none of the pool's may send); a warming source at its cap with overflow
    # "wait" speaks for itself alone: it names itself, and the others deliver meanwhile.
    sections = {"egress": {"source": [{"name": "new", "source_address": "127.0.0.1"},
                                      {"name": "old"}],
                           "pool": [{"name": "default", "sources": [{"source": "new"},
                                                                    {"source": "old"}]}]},
                "warmup": [{"source": "new", "overflow": "wait",
                            "schedule": [{"day": 1, "hourly": 1}]}]}
    jobs = [job("a.test", f"ok{i}", n=i) for i in range(6)]
    reports, _, peer = run(jobs, [], sections=sections)
    requeued = [j for j, results, _ in reports if results[0].outcome == bus.REQUEUED]
    delivered = [j for j, results, _ in reports if results[0].outcome == bus.DELIVERED]
    assert requeued and {j.source for j in requeued} == {"new"}, [j.source for j in requeued]
    assert len(delivered) == 6 - len(requeued) and len(peer.messages) == len(delivered)
    assert {j.source for j in delivered} == {"new", "old"}


def test_each_result_carries_the_rule_its_own_reply_fired():
    # the spool's events name each recipient's rule: later1's RCPT reply fired the bounce
    # rule; ok1's end-of-data 451 fired none
    rules = [{"name": "busy-is-dead", "code": 450, "enhanced": "4.2.1", "stages": ["rcpt"],
              "action": "bounce", "bounce_class": "51"}]
    [(j, results, _)], _, _ = run([job("a.test", "later1", "ok1")], rules,
                                  protocol=DataLater().protocol)
    by = {r.index: r for r in results}
    assert by[0].rule is not None and (by[0].rule.name, by[0].rule.action) == \
        ("busy-is-dead", "bounce")
    assert by[1].rule is None


def test_a_rule_on_the_greeting_is_each_results_rule():
    rules = [{"name": "busy-site", "code": 421, "stages": ["greeting"], "action": "defer",
              "delay": 1200}]
    [(j, results, _)], _, _ = run([job("a.test", "ok1", "ok2")], rules, protocol=Busy,
                                  time_scale=0.5)
    assert [r.rule.name for r in results] == ["busy-site", "busy-site"]


class CutAfterDot(Peer):
    """The Peer, hanging up once it has a message, before its reply: it may have been
    delivered (RFC 1047)."""

    async def handle_DATA(self, server, session, envelope):
        server.transport.abort()
        return "250 2.0.0 never said"


def test_a_connection_lost_after_the_dot_is_no_reply_for_the_rules():
    # A broad rule of the operator's for a 451 (no stage named): a connection lost after
    # the dot is no server's reply and must not fire it -- ok1's message may have been
    # delivered.  With bad1 refused at RCPT the lost connection went through the rules
    # (bounced with the rule's class, suppressed) and was not counted for back-off; with
    # ok1 alone it was deferred.
    rules = [{"name": "451-is-gone", "code": 451, "action": "bounce", "bounce_class": "10"}]
    for rcpts in (("ok1",), ("ok1", "bad1")):
        [(j, results, _)], engine, _ = run([job("a.test", *rcpts)], rules,
                                           protocol=CutAfterDot().protocol)
        by = {r.index: r for r in results}
        assert (by[0].outcome, by[0].code, by[0].enhanced, by[0].bounce_class) == \
            (bus.DEFERRED, 451, "4.4.2", ""), (rcpts, by[0])
        if len(rcpts) > 1:
            assert (by[1].outcome, by[1].code, by[1].enhanced) == (bus.FAILED, 550, "5.1.1")
        assert j.fired is None and engine.stats["rule:451-is-gone"] == 0
        # the site failed this attempt: back-off hears of it, as of any lost connection
        (w,) = engine.adaptive.attempts.values()
        assert (len(w.q), w.fails) == (1, 1), (rcpts, w.q)


class OneAtATimeCutSecond(Peer):
    """One recipient a transaction ("452 4.5.3" to more); the second message's connection
    cut before its reply."""

    def __init__(self):
        super().__init__()
        self.n = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if envelope.rcpt_tos:
            return "452 4.5.3 Too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        if self.n == 2:
            server.transport.abort()
            return "250 2.0.0 never said"
        return await super().handle_DATA(server, session, envelope)


def test_a_connection_lost_in_a_recipient_limit_transaction_is_no_reply_for_the_rules():
    # ok2 goes in the second transaction (the server takes one recipient at a time),
    # whose connection is lost after the dot: possibly delivered, deferred -- not
    # bounced by the operator's rule for a 451, which no server said
    rules = [{"name": "451-is-gone", "code": 451, "action": "bounce", "bounce_class": "10"}]
    peer = OneAtATimeCutSecond()
    [(j, results, _)], engine, _ = run([job("a.test", "ok1", "ok2")], rules,
                                       protocol=peer.protocol)
    by = {r.index: r for r in results}
    assert by[0].outcome == bus.DELIVERED and len(peer.messages) == 1
    assert (by[1].outcome, by[1].code, by[1].enhanced, by[1].bounce_class) == \
        (bus.DEFERRED, 451, "4.4.2", ""), by[1]
    assert j.fired is None and engine.stats["rule:451-is-gone"] == 0


def test_a_pools_source_of_the_other_ip_version_than_the_site_does_not_take_its_mail():
    # A dual-stack pool (one source bound to an IPv6 address, one to an IPv4 one) and a
    # site whose only address is IPv4: the IPv6 source reaches nothing there ("source ::1
    # cannot reach an IPv4 address"), and every other message the round robin gave it was
    # deferred to its next retry.  The pool's source that can reach the site takes them.
    sections = {"egress": {"source": [{"name": "v6", "source_address": "::1"},
                                      {"name": "v4", "source_address": "127.0.0.1"}],
                           "pool": [{"name": "default", "sources": [{"source": "v6"},
                                                                    {"source": "v4"}]}]}}
    jobs = [job("a.test", f"ok{i}", n=i) for i in range(6)]
    reports, _, peer = run(jobs, [], sections=sections)
    assert [results[0].outcome for _, results, _ in reports] == [bus.DELIVERED] * 6, reports
    assert {j.source for j, _, _ in reports} == {"v4"} and len(peer.messages) == 6


def test_a_warming_pools_overflow_goes_before_a_source_of_the_other_ip_version():
    # A dual-stack pool whose IPv4 source warms up (at its cap after one message) and an
    # IPv4-only site: the pool's overflow pool takes the rest, not the IPv6 source, which
    # reaches none of the site's addresses (each message it took was deferred: "source
    # ::1 cannot reach an IPv4 address")
    sections = {"egress": {"source": [{"name": "v4", "source_address": "127.0.0.1"},
                                      {"name": "v6", "source_address": "::1"},
                                      {"name": "spill", "source_address": "127.0.0.1"}],
                           "pool": [{"name": "default", "overflow_pool": "extra",
                                     "sources": [{"source": "v4"}, {"source": "v6"}]},
                                    {"name": "extra", "sources": [{"source": "spill"}]}]},
                "warmup": [{"source": "v4", "overflow": "other_sources",
                            "schedule": [{"day": 1, "hourly": 1}]}]}
    jobs = [job("a.test", f"ok{i}", n=i) for i in range(4)]
    reports, _, peer = run(jobs, [], sections=sections)
    assert [results[0].outcome for _, results, _ in reports] == [bus.DELIVERED] * 4, \
        [(j.source, results[0].text) for j, results, _ in reports]
    assert sorted(j.source for j, _, _ in reports) == ["spill"] * 3 + ["v4"]
    assert len(peer.messages) == 4


def test_a_warming_source_whose_connection_fails_keeps_its_cap_for_what_it_sends():
    """The site greets with 421 (nothing of the five messages is sent): the warm-up counts
    the jobs took are given back, as for a job handed back.  They were kept -- one per
    job failed with the connection, and per job queued in the lane then -- so a receiver
    down for a moment used up a warming source's hour (or day) with nothing sent."""
    sections = {"egress": {"source": [{"name": "new", "source_address": "127.0.0.1"}],
                           "pool": [{"name": "default", "sources": [{"source": "new"}]}]},
                "warmup": [{"source": "new", "overflow": "wait",
                            "schedule": [{"day": 1, "hourly": 10, "daily": 100}]}]}
    jobs = [job("a.test", f"ok{i}", n=i) for i in range(5)]
    reports, engine, _ = run(jobs, [], sections=sections, protocol=Busy)
    assert [r[1][0].outcome for r in reports] == [bus.DEFERRED] * 5
    first = engine.warmup.first_use("new", create=False)
    for kind, window, _, cap in engine.warmup._caps(
            engine.warmup.stage("new", ("mx.a.test",), first)[1], first, time.time()):
        assert engine.limiter.count(f"new|mx.a.test|{kind}", window, cap, take=False) == 0


def test_the_warmup_status_reads_the_counts_of_the_sites_a_source_was_counted_for():
    """The status (written each second) showed a warming source's counts for every site
    the process knew -- a count read, and a limiter file created, per site and cap each
    second: with the thousands of sites a node sends to in an hour, seconds of the event
    loop's time a second, and files for sites the source never sent to.  It reads those
    of the sites the process counted the source's messages for."""
    import os

    from mta.delivery.engine import Site

    async def main():
        loop = asyncio.get_running_loop()
        peer = Peer()
        server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
        cfg = msgspec.convert({
            "server": {"hostname": "mta.test",
                       "state_dir": tempfile.mkdtemp(dir=_STATE_DIRS.name)},
            "delivery": {"mx_port": server.sockets[0].getsockname()[1], "starttls": "none",
                         "shaping_presets": False},
            "egress": {"source": [{"name": "new", "source_address": "127.0.0.1"}],
                       "pool": [{"name": "default", "sources": [{"source": "new"}]}]},
            "warmup": [{"source": "new", "schedule": [{"day": 1, "hourly": 10,
                                                        "daily": 100}]}]}, Config)
        s = resolve(cfg, None)
        got = asyncio.Event()
        engine = Engine(s, mx_to_loopback("a.test"), lambda j, rs, retry_after=0.0: got.set(),
                        loop)
        engine.submit(job("a.test", "ok1"))
        await got.wait()
        for n in range(200):        # sites of other domains, known, never sent to here
            site = Site(("mx", n), f"mx.other{n}.test", (f"mx.other{n}.test",))
            engine.sites[site.key] = site
        status = engine.status()
        files = len(os.listdir(engine.limiter.directory))
        await engine.close()
        server.close()
        return status, files, peer

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        status, files, peer = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert len(peer.messages) == 1
    assert status["warmup"]["new"]["sites"] == {"mx.a.test": {"hour": 1, "day": 1}}
    assert files < 10, files


def test_a_pools_weights_hold_for_each_site_whatever_the_order_of_the_jobs():
    """Pool of two sources, weights 1:1; the jobs alternate between two sites (each
    message has a recipient at each).  The rotation was the pool's, over all sites: the
    first site got every message from one source and the second from the other -- a
    site saw one of the pool's addresses, and half the pool's connections to it."""
    jobs = [job("a.test" if n % 2 == 0 else "b.test", f"ok{n}", n=n) for n in range(12)]
    # (both sites known before the rest are routed as they come)
    reports, _, _ = run(jobs, [], sections=TWO_SOURCES, domains=("a.test", "b.test"),
                        first=2)
    by_site: dict = {}
    for j, _, _ in reports:
        by_site.setdefault(j.msg.domain, []).append(j.source)
    assert sorted(by_site["a.test"]) == ["s1"] * 3 + ["s2"] * 3, by_site
    assert sorted(by_site["b.test"]) == ["s1"] * 3 + ["s2"] * 3, by_site


def test_mail_of_a_pool_a_reload_removed_goes_by_the_default_pool_with_one_warning(caplog):
    """Queued messages name a pool the configuration no longer has (a reload removed or
    renamed it): they go by egress.default_pool, as the README says, and the log says so
    once per pool -- not once per job, each retry again (a line per queued message)."""
    jobs = [job("a.test", f"ok{n}", n=n) for n in range(5)]
    for j in jobs:
        j.msg = msgspec.structs.replace(j.msg, pool="gone")
    with caplog.at_level("WARNING", logger="mta.delivery"):
        reports, _, peer = run(jobs, [])
    assert [r[1][0].outcome for r in reports] == [bus.DELIVERED] * 5
    assert {r[0].source for r in reports} == {"default"}
    warned = [r for r in caplog.records if "'gone'" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]


def test_a_pools_weights_hold_over_sites_of_one_message_each():
    """Pool of two sources, weights 1:1; ten sites, one message each (the long tail of a
    campaign).  With a rotation per site that starts afresh, each site's first message
    went from the first source: every one of them, the other source sent nothing."""
    domains = [f"d{n}.test" for n in range(10)]
    jobs = [job(d, "ok", n=n) for n, d in enumerate(domains)]
    reports, _, peer = run(jobs, [], sections=TWO_SOURCES, domains=domains)
    assert len(peer.messages) == 10
    assert sorted(j.source for j, _, _ in reports) == ["s1"] * 5 + ["s2"] * 5, \
        [(j.msg.domain, j.source) for j, _, _ in reports]
