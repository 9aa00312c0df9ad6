"""Adaptive delivery in the real daemon (issue 12): response rules, back-off, durability.

A test world on loopback: unbound serves the test domains, smart sinks
(tests/smartsink.py) on 127.0.0.10/.11 answer like a provider that limits each
client IP, egress sources bind 127.0.0.2/.3.  ``delivery.time_scale`` shrinks
the rule durations, the retry schedule and the back-off timings so that the
tests take seconds.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import time

from daemon import wait_until
from mxlab import mx
from smartsink import Policy, SmartSink

SENDER = "sender@example.com"
LIMITED = "limited.test"          # MX on 127.0.0.10: the provider that limits client IPs
OTHER = "other.test"              # MX on 127.0.0.11: accepts everything
SITE = "mx.limited.test"
SETTLED = 3.0   # seconds: a rule one process fires holds in the other by then (1 s reads)

TSS04_RULE = {"name": "tss04-suspend", "code": 421, "text": r"\[TSS04\]", "stages": ["mail"],
              "mx": "*.limited.test", "action": "suspend", "scope": "source_site",
              "duration": 3000}


def smart(lab, ip, default=None, **kw) -> SmartSink:
    s = SmartSink(ip, lab.port, default, **kw).start()
    lab.sinks.append(s)
    return s


def egress() -> dict:
    return {"source": [{"name": "ip-2", "source_address": "127.0.0.2"},
                       {"name": "ip-3", "source_address": "127.0.0.3"}],
            "pool": [{"name": "default", "sources": [{"source": "ip-2", "weight": 1},
                                                     {"source": "ip-3", "weight": 1}]}]}


def send_many(d, domain: str, n: int, tag: str) -> None:
    for i in range(n):
        d.send(SENDER, [f"{tag}{i}@{domain}"], f"Subject: {tag}{i}\r\n\r\nhi\r\n".encode())


def rules(d) -> list[dict]:
    out = d.cli("rules", "list", "--json").stdout.decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def clients(sink: SmartSink, tag: str) -> collections.Counter:
    return collections.Counter(a.client_ip for a in sink.deliveries()
                               if a.rcpts[0].startswith(tag))


def test_rule_suspends_source_x_site_visible_durable_and_cancellable(lab):
    """The provider's 421 [TSS04] to ip-2 fires the rule: ip-2 stops sending to that site
    (ip-3 carries its mail), ip-2 keeps sending to another site; mta rules list shows the
    rule, the reply and the time left; kill -9 of the whole tree keeps it; cancel ends it."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10") + mx(OTHER, "mx.other.test", "127.0.0.11"))
    limited = smart(lab, "127.0.0.10", by_client={
        "127.0.0.2": Policy(max_per_window=3, window=600)})
    other = smart(lab, "127.0.0.11")
    d = lab.daemon(processes=2, time_scale=0.01, sections={
        "egress": egress(), "response_rule": [TSS04_RULE], "backoff": {"enabled": False}})
    send_many(d, LIMITED, 30, "a")
    send_many(d, OTHER, 10, "o")
    wait_until(lambda: len(clients(limited, "a")) and sum(clients(limited, "a").values()) >= 30,
               90, "30 deliveries to the limited site", interval=0.2)
    wait_until(lambda: sum(clients(other, "o").values()) >= 10, 60, "10 to the other site")
    by_ip = clients(limited, "a")
    assert by_ip["127.0.0.2"] <= 3, by_ip          # never more than the provider allowed
    assert by_ip["127.0.0.3"] >= 27, by_ip
    refused = [s for s in limited.snapshot() if s.reply.startswith("421")]
    # The first refusal a delivery process reads fires the rule there at once (it begins
    # no transaction from ip-2 to the site after that); the other process does the same
    # on its own first refusal, or reads the rule from the node's store within a second.
    # Refused besides are only the transactions already begun then, one per connection
    # open (the 421 closes it): the 30 messages queued at once may open the site's whole
    # connection_limit (10, node-wide) from ip-2 before any reply, and a slot one process
    # frees the other may fill before it knows. Never more, and never a retry storm.
    assert 1 <= len(refused) <= 2 * 10, refused
    assert {s.client_ip for s in refused} == {"127.0.0.2"}
    first = refused[0].at
    assert refused[-1].at - first <= SETTLED, refused
    # The same source keeps sending to another site.
    assert set(clients(other, "o")) == {"127.0.0.2", "127.0.0.3"}, clients(other, "o")

    [r] = rules(d)
    assert (r["rule"], r["kind"], r["scope"], r["source"], r["site"]) == \
        ("tss04-suspend", "suspend", "source_site", "ip-2", SITE)
    assert "[TSS04]" in r["reply"] and "127.0.0.2" in r["reply"] and r["stage"] == "mail"
    assert 0 < r["left"] <= 30.0                   # 3000 s x time_scale 0.01
    table = d.cli("rules", "list").stdout.decode()
    assert "tss04-suspend" in table and "ip-2" in table and "[TSS04]" in table
    # The deferred delivery names the rule in the delivery log.
    assert re.search(r"source=ip-2\[127\.0\.0\.2\] site=mx\.limited\.test status=deferred "
                     r"\(421 4\.7\.0 .*TSS04.*\) rule=tss04-suspend\(suspend\)", d.log())
    # ... and so does its delay event (log, store, webhooks), with the rule's action
    def fired_events():
        return [e for e in d.events() if e.get("response_rule") == "tss04-suspend"]
    evs = wait_until(fired_events, 20, "the delay event naming the rule")
    assert {(e["type"], e["response_rule_action"], e["response_rule_scope"], e["sending_ip"])
            for e in evs} == {("delay", "suspend", "source_site", "127.0.0.2")}, evs
    assert "TSS04" in evs[0]["raw_reason"] and float(evs[0]["response_rule_until"]) > 0

    # kill -9 of the whole tree: the suspension holds after the restart.
    d.kill9()
    d.start()
    restarted = time.time()
    assert [x["id"] for x in rules(d)] == [r["id"]]
    limited.set_policy(client="127.0.0.2", max_per_window=0)   # the provider would take it now
    send_many(d, LIMITED, 10, "b")
    wait_until(lambda: sum(clients(limited, "b").values()) >= 10, 60, "10 more deliveries")
    assert set(clients(limited, "b")) == {"127.0.0.3"}, clients(limited, "b")
    # ... and ip-2 has not even opened a connection to the site since the restart.
    late = [c for c in limited.connections_from("127.0.0.2") if c[0] > restarted]
    assert late == [], late

    # Cancelled: ip-2 sends to the site again.
    out = d.cli("rules", "cancel", "tss04-suspend").stdout.decode()
    assert "cancelled suspend tss04-suspend" in out
    assert rules(d) == []
    # Both delivery processes see the cancel within a second (and say so).
    d.wait_log(r"suspend tss04-suspend source=ip-2 site=mx\.limited\.test \(id [0-9a-f]+\) "
               r"cancelled", count=2, timeout=10)
    send_many(d, LIMITED, 20, "c")
    wait_until(lambda: sum(clients(limited, "c").values()) >= 20, 60, "20 after the cancel")
    assert clients(limited, "c")["127.0.0.2"] >= 5, clients(limited, "c")
    assert d.cli("rules", "cancel", "tss04-suspend", check=False).returncode == 1


def test_backoff_lowers_the_rate_and_recovers_step_by_step(lab):
    """A site deferring a client IP beyond 10 per 2 s (no rule matches its reply): the
    source x site enters back-off (its rate lowered, in the log and mta rules list), and
    after the site stops deferring the rate climbs back step by step to the shaping
    limit; the back-off state survives a restart."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10"))
    slow_reply = "421 4.7.0 Slow down please"
    limited = smart(lab, "127.0.0.10", by_client={
        "127.0.0.2": Policy(max_per_window=10, window=2.0, rate_reply=slow_reply)})
    d = lab.daemon(processes=2, time_scale=0.1, sections={
        "egress": {"source": [{"name": "ip-2", "source_address": "127.0.0.2"}],
                   "pool": [{"name": "default", "sources": [{"source": "ip-2", "weight": 1}]}]},
        "shaping": [{"mx": "*.limited.test", "max_message_rate": "40/s"}],
        # x time_scale 0.1: judge 3 s of attempts, a step every 1 s
        "backoff": {"window": 30, "min_attempts": 8, "threshold": 0.2, "decrease": 0.8,
                    "recover_step": 0.25, "recover_interval": 10,
                    "hold_intervals": 2}})
    send_many(d, LIMITED, 120, "m")
    d.wait_log(r"back-off begins source=ip-2 site=mx\.limited\.test", timeout=60)
    [b] = wait_until(lambda: rules(d) or None, 10, "the back-off entry")
    assert b["kind"] == "backoff" and b["source"] == "ip-2" and b["site"] == SITE
    assert b["rate"] < 40.0 and b["ceiling"] == 40.0
    # The site took at most 10 in any 2 s (judged over at least 1 s, at most 3 s): at most
    # 10/s; back-off sets 0.8 x what it took.
    assert b["rate"] <= 0.8 * 10.0 + 1e-6, b
    # Restart: the back-off is still there (same entry, same level or deeper).
    d.kill9()
    d.start()
    again = rules(d)
    assert again and again[0]["id"] == b["id"] and again[0]["level"] >= b["level"]
    # The provider stops deferring: steps up, logged, until back at the shaping limit.
    mark = len(d.log())
    limited.set_policy(client="127.0.0.2", max_per_window=0)
    d.wait_log(r"back-off over: source=ip-2 site=mx\.limited\.test back at 40\.000/s",
               timeout=120)
    # The recovery after the last decrease: each step's rate above the one before (both
    # delivery processes log each step: the same step, the same rate).
    tail = d.log()[mark:]
    tail = max(tail.rpartition("back-off deeper")[2], tail, key=len) \
        if "back-off deeper" not in tail else tail.rpartition("back-off deeper")[2]
    steps: dict[int, set] = collections.defaultdict(set)
    for n, rate in re.findall(r"back-off source=ip-2 site=mx\.limited\.test: step (\d+), "
                              r"rate ([0-9.]+)/s", tail):
        steps[int(n)].add(float(rate))
    assert all(len(v) == 1 for v in steps.values()), steps
    rates = [steps[n].pop() for n in sorted(steps)]
    assert len(rates) >= 2 and rates == sorted(set(rates)) and rates[-1] < 40.0, rates
    wait_until(lambda: sum(clients(limited, "m").values()) >= 120, 120, "all 120 delivered")
    assert rules(d) == []


def test_greylisting_after_data_does_not_put_a_new_sender_in_back_off(lab):
    """A receiver that greylists after DATA (451 4.7.1, as Exim's and milter-greylist's
    set-ups do) defers every first attempt of a new sender: that is about the message,
    not the rate.  A burst to it (breaking news to a company's staff) is not slowed to
    [backoff] min_rate; every message goes at its first retry."""
    import threading
    seen: set = set()
    lock = threading.Lock()

    def greylist(sink, txn):
        with lock:
            if tuple(txn.rcpt_tos) not in seen:
                seen.add(tuple(txn.rcpt_tos))
                return "451 4.7.1 Greylisted, please try again later"
        return None

    sink = lab.aio("127.0.0.10", data=greylist)
    lab.serve(mx(LIMITED, SITE, "127.0.0.10"))
    # retries after 1 s; back-off's window 0.6 s, its steps every 0.6 s (x time_scale)
    d = lab.daemon(retry_schedule=[100.0, 200.0], retry_jitter=0.0, time_scale=0.01)
    send_many(d, LIMITED, 40, "g")
    # without back-off each goes at its first retry, a second after its greylisting; at
    # min_rate (1/m, growing by 1/m a step) the last would take over a minute
    wait_until(lambda: sink.received() >= 40, 20, "all 40 delivered at their retry",
               details=lambda: f"{sink.received()} delivered, {len(sink.rejected)} "
               f"greylisted\n" + d.log()[-2000:])
    assert len(sink.rejected) == 40     # each was greylisted once
    assert "back-off begins" not in d.log()
    assert rules(d) == []


def delivery_status(d) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(d.state_dir, "run", "delivery-*.status.json"))):
        with open(path, "rb") as fh:
            out.append(json.loads(fh.read()))
    return out


def test_warmup_caps_a_new_source_per_site_and_keeps_its_day_across_kill9(lab):
    """Day 1 of ip-3's schedule: at most 10 messages per hour to a site (an hour is 360 s
    at time_scale 0.1).  Of 40 messages to a site, ip-3 sends 10 and the pool's other
    source (ip-2) the rest; another site has its own 10; the delivery status (mta queue's
    source) shows the day, the caps and the counts; the first-use date survives kill -9
    of the whole tree, and the cap still holds after it (counts are node-wide)."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10") + mx(OTHER, "mx.other.test", "127.0.0.11"))
    limited = smart(lab, "127.0.0.10")
    other = smart(lab, "127.0.0.11")
    d = lab.daemon(processes=2, time_scale=0.1, sections={
        "egress": egress(),
        "warmup": [{"source": "ip-3", "overflow": "other_sources",
                    "schedule": [{"day": 1, "hourly": 10, "daily": 100},
                                 {"day": 2, "hourly": 1000}]}],
        "backoff": {"enabled": False}})
    send_many(d, LIMITED, 40, "w")
    send_many(d, OTHER, 30, "x")
    wait_until(lambda: sum(clients(limited, "w").values()) >= 40, 60, "40 to the site")
    wait_until(lambda: sum(clients(other, "x").values()) >= 30, 60, "30 to the other site")
    w, x = clients(limited, "w"), clients(other, "x")
    assert w == {"127.0.0.3": 10, "127.0.0.2": 30}, w
    assert x == {"127.0.0.3": 10, "127.0.0.2": 20}, x
    [entry] = [r for r in rules(d) if r["kind"] == "warmup"]
    assert entry["source"] == "ip-3" and entry["day"] == 1

    def warm():
        for st in delivery_status(d):
            ip3 = st.get("warmup", {}).get("ip-3", {})
            if ip3.get("sites", {}).get(SITE) == {"hour": 10, "day": 10}:
                return ip3
        return None
    ip3 = wait_until(warm, 10, "the warm-up in the delivery status")
    assert (ip3["day"], ip3["hourly"], ip3["daily"]) == (1, 10, 100)
    # mta queue shows it (node-wide counts per site)
    q = d.queue_summary()["delivery"]["warmup"]["ip-3"]
    assert q["day"] == 1 and q["sites"][SITE] == {"hour": 10, "day": 10}
    table = d.cli("queue").stdout.decode()
    assert re.search(r"ip-3\s+1\s+10/100\s+mx\.limited\.test\s+10\s+10", table), table
    first = entry["created"]
    d.kill9()
    d.start()
    [again] = [r for r in rules(d) if r["kind"] == "warmup"]
    assert again["created"] == first
    send_many(d, LIMITED, 10, "y")
    wait_until(lambda: sum(clients(limited, "y").values()) >= 10, 60, "10 more")
    assert clients(limited, "y") == {"127.0.0.2": 10}      # ip-3 is still at its cap


def test_warmup_overflow_goes_to_the_pools_overflow_pool(lab):
    """Pool "warm" has only ip-3 (day 1: 10 an hour per site) and overflow_pool
    "seasoned" (ip-2): of 30 messages, ip-3 sends 10 and the overflow pool the rest; a
    pool without an overflow pool keeps its mail waiting for the cap to roll over."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10"))
    limited = smart(lab, "127.0.0.10")
    d = lab.daemon(processes=2, time_scale=0.1, sections={
        "egress": {"source": [{"name": "ip-2", "source_address": "127.0.0.2"},
                              {"name": "ip-3", "source_address": "127.0.0.3"}],
                   "pool": [{"name": "warm", "sources": [{"source": "ip-3"}],
                             "overflow_pool": "seasoned"},
                            {"name": "seasoned", "sources": [{"source": "ip-2"}]},
                            {"name": "alone", "sources": [{"source": "ip-3"}]}],
                   "default_pool": "warm"},
        "warmup": [{"source": "ip-3", "overflow": "other_sources",
                    "schedule": [{"day": 1, "hourly": 10}, {"day": 2, "hourly": 1000}]}],
        "backoff": {"enabled": False}})
    send_many(d, LIMITED, 30, "o")
    wait_until(lambda: sum(clients(limited, "o").values()) >= 30, 60, "30 to the site")
    assert clients(limited, "o") == {"127.0.0.3": 10, "127.0.0.2": 20}, clients(limited, "o")
    # Pool "alone" (ip-3 only, no overflow pool): ip-3 is at its cap, so its mail waits.
    for i in range(3):
        d.send(SENDER, [f"a{i}@{LIMITED}"], f"X-MSYS-API: {{\"options\": {{\"ip_pool\": "
               f"\"alone\"}}}}\r\nSubject: a{i}\r\n\r\nhi\r\n".encode())
    wait_until(lambda: d.queue_summary()["total"]["messages"] == 3, 20, "three queued")
    time.sleep(2.0)     # a few dispatch rounds (the cap holds for 360 s)
    assert not clients(limited, "a"), clients(limited, "a")
    assert d.queue_summary()["total"]["messages"] == 3
    # mta inspect names the cap as what holds it, and when it lifts (hour 1's end)
    # (once the delivery process's sites file, rewritten every 5 s at most, has the domain)
    qid = d.queue_list()[0]["queue_id"]
    said = re.compile(r"next attempt: suspended until \S+ \(source ip-3 at its warm-up cap "
                      r"for site mx\.limited\.test \(10 of 10 this hour\)\)")
    wait_until(lambda: said.search(d.cli("queue", "inspect", qid).stdout.decode()), 15,
               "mta inspect naming the warm-up cap", interval=0.5)


def test_a_shorter_rule_does_not_cut_short_a_longer_suspension_in_effect(lab):
    """One transaction's recipients draw two replies: the first fires a day-long
    suspension (a "permanently deferred" block), the second a rule that suspends the same
    source x site for an hour.  The day-long suspension stays in effect: a later reply
    matching a shorter rule (a transaction already under way, another process that has
    not read the store yet) must not end a longer suspension early."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10"))

    def rcpt(sink, address, mail_from):
        if address.startswith("blocked"):
            return "450 4.7.1 [TS03] All messages from you permanently deferred"
        if address.startswith("busy"):
            return "450 4.7.0 [TSS04] Messages temporarily deferred"
        return None
    sink = lab.aio("127.0.0.10", rcpt=rcpt)
    rules_cfg = [{"name": "day-block", "text": r"\[TS03\]", "mx": "*.limited.test",
                  "action": "suspend", "scope": "source_site", "duration": 86400},
                 {"name": "hour-block", "text": r"\[TSS04\]", "mx": "*.limited.test",
                  "action": "suspend", "scope": "source_site", "duration": 3600}]
    d = lab.daemon(time_scale=0.01, sections={
        "egress": {"source": [{"name": "ip-2", "source_address": "127.0.0.2"}],
                   "pool": [{"name": "default", "sources": [{"source": "ip-2"}]}]},
        "response_rule": rules_cfg, "backoff": {"enabled": False}})
    d.send(SENDER, [f"blocked1@{LIMITED}", f"busy1@{LIMITED}"],
           b"Subject: two replies\r\n\r\nhi\r\n")
    wait_until(lambda: len(sink.rcpt_log) >= 2, 30, "both recipients answered")
    assert [a for _, a, _ in sink.rcpt_log] == [f"blocked1@{LIMITED}", f"busy1@{LIMITED}"]
    [r] = wait_until(lambda: rules(d) or None, 10, "the suspension in mta rules list")
    # 86400 s x time_scale 0.01 = 864 s; the hour-long rule would leave 36 s
    assert (r["kind"], r["source"], r["site"]) == ("suspend", "ip-2", SITE), r
    assert r["rule"] == "day-block" and r["left"] > 600, r


def test_a_throttle_holds_its_connection_limit_node_wide(lab):
    """Two delivery processes send to one site (two of its domains, one per process) over
    four connections; the site answers "451 4.7.500 Server busy" once and the rule
    throttles the source x site to one connection.  From then on the node keeps one
    connection open to the site, not one per delivery process."""
    from test_egress import finish, inject, on_two_processes

    one, two = on_two_processes([f"b{n}.test" for n in range(40)])
    records = [f"{one}. 300 IN MX 10 mx.busy.test.", f"{two}. 300 IN MX 10 mx.busy.test.",
               "mx.busy.test. 300 IN A 127.0.0.10"]
    lab.serve(records, zones=[one, two, "busy.test"])
    state = {"busy": False, "said": 0}

    def data(sink, txn):
        if state["busy"] and not state["said"]:
            state["said"] += 1
            return "451 4.7.500 Server busy. Please try again later"
        return None
    sink = lab.aio("127.0.0.10", data=data)
    sink.delay = 0.2                       # slow: the connections stay busy
    d = lab.daemon(processes=2, time_scale=0.1, sections={
        "shaping": [{"mx": "*.busy.test", "connection_limit": 4}],
        "response_rule": [{"name": "server-busy", "enhanced": "4.7.500",
                           "mx": "*.busy.test", "action": "throttle",
                           "connection_limit": 1, "duration": 3600}],
        "backoff": {"enabled": False}})
    finish(inject(d, f"a@{one}", 150), inject(d, f"b@{two}", 150))
    # both processes send, over more than one connection each at times
    wait_until(lambda: sink.max_open >= 3 and len({t.rcpt_tos[0].split("@")[1]
                                                   for t in sink.snapshot()}) == 2,
               60, "both processes sending over several connections", interval=0.1)
    state["busy"] = True
    [r] = wait_until(lambda: [x for x in rules(d) if x["kind"] == "throttle"] or None, 30,
                     "the throttle in mta rules list", interval=0.1)
    assert r["connection_limit"] == 1 and r["site"] == "mx.busy.test", r
    time.sleep(SETTLED + 1.0)              # every process has read it; workers over it quit
    before = sink.received()
    samples = []
    for _ in range(60):
        samples.append(sink.open_now)
        time.sleep(0.05)
    assert sink.received() > before        # mail still flows meanwhile
    # (a hand-over between the processes may overlap for a moment; two for good is not)
    assert sum(n >= 2 for n in samples) <= len(samples) // 4, samples


def test_warmup_counts_what_a_source_sends_not_what_waited_and_went_back(lab):
    """ip-3 may send 10 an hour to the site (day 1) and 2 a second ([[shaping]]); 10
    messages come at once.  The ones that wait in ip-3's lane past the delivery process's
    limit go back to the spool unsent and come again: they must not use up the hour's
    cap, else ip-3 sends two or three of its ten and the rest waits for the next hour."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10"))
    limited = smart(lab, "127.0.0.10")
    d = lab.daemon(time_scale=0.1, job_timeout_margin=2.0, sections={
        "egress": {"source": [{"name": "ip-3", "source_address": "127.0.0.3"}],
                   "pool": [{"name": "default", "sources": [{"source": "ip-3"}]}]},
        "shaping": [{"mx": "*.limited.test", "source": "ip-3", "max_message_rate": "2/s"}],
        "warmup": [{"source": "ip-3", "overflow": "wait",
                    "schedule": [{"day": 1, "hourly": 10}, {"day": 2, "hourly": 1000}]}],
        "backoff": {"enabled": False}})
    send_many(d, LIMITED, 10, "h")
    # (the hour is 360 s at time_scale 0.1: what ip-3 sends within a minute is this hour's)
    wait_until(lambda: sum(clients(limited, "h").values()) >= 10, 60,
               "the ten messages within ip-3's hourly cap", interval=0.2)
    assert clients(limited, "h") == {"127.0.0.3": 10}
    assert re.search(r"handed back|waited over|message rate of site", d.log()), \
        "no job went back to the spool (waited over max_wait, or for the rate)"


def _throttled_once(lab, duration: int):
    """A sink that says "451 4.7.500 Server busy" to the first DATA only, and a daemon
    (time_scale 0.1) whose response rule throttles the site to 1/h for *duration*
    unscaled seconds on that reply: (sink, daemon)."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10"))
    state = {"said": 0}

    def data(sink, txn):
        if not state["said"]:
            state["said"] += 1
            return "451 4.7.500 Server busy. Please try again later"
        return None
    sink = lab.aio("127.0.0.10", data=data)
    d = lab.daemon(time_scale=0.1, job_timeout_margin=2.0, sections={
        "response_rule": [{"name": "server-busy", "enhanced": "4.7.500",
                           "mx": "*.limited.test", "action": "throttle",
                           "max_message_rate": "1/h", "duration": duration}],
        "backoff": {"enabled": False}})
    return sink, d


def test_mail_handed_back_for_a_throttled_rate_comes_back_when_the_throttle_ends(lab):
    """A rule throttles the site to one message an hour for 12 s (120 x time_scale 0.1).
    The messages that cannot have a unit of that rate in time go back to the spool; they
    are due again when the throttle ends (not an hour later, at the throttled rate's next
    unit), and go out then without an operator's flush -- and not before it ends."""
    sink, d = _throttled_once(lab, 120)
    send_many(d, LIMITED, 1, "first")
    [r] = wait_until(lambda: [x for x in rules(d) if x["kind"] == "throttle"] or None, 30,
                     "the throttle in mta rules list", interval=0.1)
    ends = r["until"]
    send_many(d, LIMITED, 4, "t")
    d.wait_log(r"message rate of site mx\.limited\.test", timeout=30)

    def sent(tag):
        return [t for t in sink.snapshot() if t.rcpt_tos[0].startswith(tag)]
    # while the throttle holds: at most the one unit of its rate goes out
    while time.time() < ends - 1.0:
        assert len(sent("t")) <= 1, "the throttle's rate did not hold"
        time.sleep(0.2)
    # after it: the rest within seconds (the requeue's wait ended with the throttle)
    wait_until(lambda: len(sent("t")) >= 4, 25, "the four messages after the throttle ended",
               interval=0.2)
    assert time.time() < ends + 25


def test_warmup_status_keeps_the_sites_counted_before_a_reload(lab):
    """ip-3 (warming) sent to two sites; a reload (SIGHUP) replaces the delivery
    processes: the warm-up status (mta queue --json, the admin API) still shows the
    counts of both sites, though no mail went to them since."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10") + mx(OTHER, "mx.other.test", "127.0.0.11"))
    limited = smart(lab, "127.0.0.10")
    other = smart(lab, "127.0.0.11")
    d = lab.daemon(time_scale=0.1, sections={
        "egress": {"source": [{"name": "ip-3", "source_address": "127.0.0.3"}],
                   "pool": [{"name": "default", "sources": [{"source": "ip-3"}]}]},
        "warmup": [{"source": "ip-3", "overflow": "wait",
                    "schedule": [{"day": 1, "hourly": 100}, {"day": 2, "hourly": 1000}]}],
        "backoff": {"enabled": False}})
    send_many(d, LIMITED, 3, "w")
    send_many(d, OTHER, 2, "x")
    wait_until(lambda: sum(clients(limited, "w").values()) >= 3, 60, "3 to the site")
    wait_until(lambda: sum(clients(other, "x").values()) >= 2, 60, "2 to the other site")
    want = {SITE: {"hour": 3}, "mx.other.test": {"hour": 2}}

    def sites():
        got = d.queue_summary()["delivery"]["warmup"].get("ip-3", {}).get("sites", {})
        return got if got == want else None
    wait_until(sites, 15, "both sites' counts in the warm-up status")
    pid = d.children()["delivery[0]"]
    d.reload(delivery={"connect_timeout": 6.0})       # (a [delivery] change: replaced)
    wait_until(lambda: d.children().get("delivery[0]") not in (None, pid), 30,
               "a new delivery process")
    wait_until(lambda: any(st.get("pid") not in (None, pid) for st in delivery_status(d)),
               30, "the new process's status")
    time.sleep(2.5)         # (a few status writes of the new process)
    assert d.queue_summary()["delivery"]["warmup"]["ip-3"]["sites"] == want


def test_mail_handed_back_for_a_throttled_rate_comes_back_when_the_throttle_is_cancelled(lab):
    """A rule throttles the site to one message an hour for an hour (36000 x time_scale
    0.1); the messages that cannot have a unit of it in time go back to the spool.  The
    operator cancels the throttle (mta rules cancel): they are due again at once and go
    out within seconds, not at the throttle's end nor at its rate's next unit."""
    sink, d = _throttled_once(lab, 36000)
    send_many(d, LIMITED, 1, "first")
    wait_until(lambda: [x for x in rules(d) if x["kind"] == "throttle"] or None, 30,
               "the throttle in mta rules list", interval=0.1)
    send_many(d, LIMITED, 4, "t")
    d.wait_log(r"message rate of site mx\.limited\.test", timeout=30)

    def sent(tag):
        return [t for t in sink.snapshot() if t.rcpt_tos[0].startswith(tag)]
    time.sleep(3.0)
    assert len(sent("t")) <= 1, "the throttle's rate did not hold"
    out = d.cli("rules", "cancel", "server-busy").stdout.decode()
    assert "cancelled throttle server-busy" in out, out
    cancelled = time.time()
    wait_until(lambda: len(sent("t")) >= 4, 20, "the four messages after the cancel",
               interval=0.2)
    assert time.time() < cancelled + 20


def test_mail_handed_back_for_a_shaping_rate_comes_back_when_a_reload_raises_it(lab):
    """A [[shaping]] rule lets one message an hour go to the site; the others cannot have
    a unit of it in time and go back to the spool (up to an hour).  A reload removes the
    rule: they are due again once the new delivery processes run, and go out within
    seconds; before it, the rate held."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10"))
    limited = smart(lab, "127.0.0.10")
    d = lab.daemon(time_scale=0.1, job_timeout_margin=2.0, sections={
        "shaping": [{"mx": "*.limited.test", "max_message_rate": "1/h"}],
        "backoff": {"enabled": False}})
    send_many(d, LIMITED, 4, "r")
    d.wait_log(r"message rate of site mx\.limited\.test", timeout=30)
    time.sleep(2.0)
    assert sum(clients(limited, "r").values()) <= 1, "the shaping rate did not hold"
    d.sections["shaping"] = [{"mx": "*.limited.test", "max_message_rate": "100/s"}]
    d.reload()
    reloaded = time.time()
    wait_until(lambda: sum(clients(limited, "r").values()) >= 4, 20,
               "the messages after the reload raised the rate", interval=0.2)
    assert time.time() < reloaded + 20


def test_mail_waiting_for_a_warmup_cap_comes_back_when_a_reload_changes_the_plan(lab):
    """ip-3 warms up (day 1: 2 an hour per site, overflow "wait"); of 5 messages, 3 wait in
    the spool for the hour to roll over (360 s at time_scale 0.1).  A reload raises the
    day's cap to 100: they are due again once the new delivery processes run and go out
    within seconds, not at the rollover."""
    lab.serve(mx(LIMITED, SITE, "127.0.0.10"))
    limited = smart(lab, "127.0.0.10")
    egress = {"source": [{"name": "ip-3", "source_address": "127.0.0.3"}],
              "pool": [{"name": "default", "sources": [{"source": "ip-3"}]}]}
    d = lab.daemon(time_scale=0.1, sections={
        "egress": egress,
        "warmup": [{"source": "ip-3", "overflow": "wait",
                    "schedule": [{"day": 1, "hourly": 2}, {"day": 2, "hourly": 1000}]}],
        "backoff": {"enabled": False}})
    send_many(d, LIMITED, 5, "w")
    wait_until(lambda: sum(clients(limited, "w").values()) >= 2, 30, "the hour's two")
    d.wait_log(r"at its warm-up cap for site mx\.limited\.test", timeout=30)
    time.sleep(2.0)
    assert sum(clients(limited, "w").values()) == 2, "the warm-up cap did not hold"
    d.sections["warmup"] = [{"source": "ip-3", "overflow": "wait",
                             "schedule": [{"day": 1, "hourly": 100}]}]
    d.reload()
    reloaded = time.time()
    wait_until(lambda: sum(clients(limited, "w").values()) >= 5, 20,
               "the messages after the reload raised the cap", interval=0.2)
    assert time.time() < reloaded + 20
