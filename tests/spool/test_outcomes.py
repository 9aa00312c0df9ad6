"""What delivery outcomes and expiry do to a shard's recipients (mta/spool/outcomes.py).

Pure logic: a real queue index and a real retry policy (seeded), no disk, no bus.
"""
from __future__ import annotations

import itertools
import logging
import random
import re
from types import SimpleNamespace

import pytest

from mta import bus
from mta.obs import events as ev
from mta.spool import schedule as sch
from mta.spool.outcomes import Plan
from mta.events.shape import sparkpost_event
from mta import native
from mta.store import RCPT_BOUNCE_OWED, MessageMeta, Store, index_message

NOW = 1_800_000_000.0
ARRIVAL = NOW - 60.0
SENDER = "sender@example.com"
HOST = "mta.test"
ORIGINAL = (b"Received: from c\r\nFrom: <sender@example.com>\r\nSubject: hello\r\n"
            b"Message-ID: <orig@example.com>\r\n\r\nbody\r\n")


def policy(max_age: float = 3600.0) -> sch.RetryPolicy:
    cfg = SimpleNamespace(retry_schedule=[60, 300], retry_jitter=0.0, time_scale=1.0,
                          max_age=max_age)
    return sch.RetryPolicy(cfg, random.Random(1))


def entry(qid: str, rcpts: list[str], sender: str = SENDER, **params) -> MessageMeta:
    return MessageMeta(qid, sender, rcpts, ARRIVAL, {"message_id": "<orig@example.com>",
                                                     "campaign_id": "c1", **params},
                       "c [127.0.0.1]")


class Queue:
    """A shard's queue as a Plan sees it: the index, and the envelopes its records hold."""

    def __init__(self, *metas: MessageMeta):
        self.index = native.load("qindex").QueueIndex(1.0)
        self.metas = {m.qid: m for m in metas}
        for m in metas:
            index_message(self.index, m, 0, 0, 0, len(ORIGINAL))

    def set(self, qid: str, idx: int, state: int | None = None,
            attempts: int | None = None) -> None:
        """Change recipient *idx*'s state or attempts (its due time stays)."""
        st, at, due, _, _, _ = self.index.recipient(qid, idx)
        self.index.update(qid, idx, st if state is None else state,
                          at if attempts is None else attempts, due)


def plan_of(q: Queue, pol: sch.RetryPolicy, new_qid) -> Plan:
    return Plan(q.index, q.metas.__getitem__, pol, lambda qid: ORIGINAL, new_qid, HOST)


def result(index: int, outcome: str, code: int, enh: str = "", text: str = "ok") -> bus.Result:
    return bus.Result(index, outcome, code, enh, text, "mx.example.net", "127.0.0.2")


def make(entries: Queue, max_age: float = 3600.0) -> Plan:
    qids = iter(f"BOUNCE{n:04d}" for n in range(100))
    return plan_of(entries, policy(max_age), lambda: next(qids))


def test_delivered_recipients_finish_the_message():
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.DELIVERED, 250), result(1, bus.DELIVERED, 250)], NOW)
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.DELIVERED, 1, 0.0], [1, sch.DELIVERED, 1, 0.0]]}
    assert plan.done == ["Q1"] and plan.bounces == [] and plan.reschedule == []
    assert [e["type"] for e in plan.events] == [ev.DELIVERY, ev.DELIVERY]
    e = plan.events[0]
    assert (e["recipient"], e["remote_host"], e["response"]["code"], e["attempt"],
            e["message_id"], e["campaign_id"], e["time_in_queue"]) == \
        ("a@example.net", "mx.example.net", 250, 1, "<orig@example.com>", "c1", 60.0)


def test_a_message_with_a_job_still_out_is_not_done():
    entries = Queue(entry("Q1", ["a@example.net"]))
    entries.index.add_out("Q1", 1)
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.DELIVERED, 250)], NOW)
    plan.finish(NOW)
    assert plan.done == []


def test_deferred_recipient_is_rescheduled_by_the_retry_schedule():
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    entries.set("Q1", 0, attempts=1)          # its second failure: the second delay
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.DEFERRED, 451, "4.3.0", "try later")], NOW)
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.PENDING, 2, NOW + 300]]}
    # b is still due at arrival; the message is due at the earlier of the two.
    assert plan.reschedule == [(ARRIVAL, "Q1")] and plan.done == []
    (e,) = plan.events
    assert e["type"] == ev.DELAY and e["next_attempt"] == NOW + 300
    assert plan.bounces == []


def test_failed_recipient_is_bounced_to_the_sender_with_a_dsn():
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.FAILED, 550, "5.1.1", "no such user"),
                        result(1, bus.FAILED, 550, "", "rejected")], NOW)
    plan.finish(NOW)
    assert plan.done == ["Q1"]
    (meta, dsn), = plan.bounces           # one DSN for both recipients
    assert (meta.qid, meta.sender, meta.rcpts, meta.arrival) == \
        ("BOUNCE0000", "", [SENDER], NOW)
    assert b"Final-Recipient: rfc822; a@example.net" in dsn
    assert b"Status: 5.1.1" in dsn and b"Status: 5.0.0" in dsn
    assert b"550 5.1.1 no such user" in dsn and b"Subject: hello" in dsn
    # The envelope records the bounce's own Message-ID (the spool reads no content).
    header = re.search(rb"\r\nMessage-ID: (\S+)\r\n", b"\r\n" + dsn).group(1).decode()
    assert meta.params == {"message_id": header} and header.endswith(f"@{HOST}>")
    assert [e["type"] for e in plan.events] == [ev.BOUNCE, ev.BOUNCE]


def test_deferral_past_max_age_expires_and_bounces_as_permanent():
    entries = Queue(entry("Q1", ["a@example.net"]))
    entries.set("Q1", 0, attempts=3)
    plan = make(entries, max_age=60.0)     # deferred at ARRIVAL + 60: the last attempt
    plan.outcome("Q1", [result(0, bus.DEFERRED, 421, "4.7.0", "slow down")], NOW)
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.EXPIRED, 4, 0.0]]}
    assert plan.events[0]["type"] == ev.EXPIRATION and plan.done == ["Q1"]
    (_, dsn), = plan.bounces
    assert b"Status: 4.4.7" in dsn                    # delivery time expired
    assert b"gave up after 4 attempt(s); last reply: 421 4.7.0 slow down" in dsn


def test_a_retry_past_max_age_is_made_at_max_age_and_expires_if_deferred_again():
    # max_age 1 h, retries after 5, 10, 20, 40 min: the fourth try (at 35 min) is
    # deferred; the next would be at 75 min.  It is made at 60 min, the message's
    # deadline, not given up at 35; deferred at 60 min too, the recipient expires.
    cfg = SimpleNamespace(retry_schedule=[300, 600, 1200, 2400], retry_jitter=0.0,
                          time_scale=1.0, max_age=3600.0)
    entries = Queue(entry("Q1", ["a@example.net"]))
    entries.set("Q1", 0, attempts=3)
    at = ARRIVAL + 35 * 60
    qids = iter(["BOUNCE0000"])
    plan = plan_of(entries, sch.RetryPolicy(cfg), lambda: next(qids))
    plan.outcome("Q1", [result(0, bus.DEFERRED, 451, "4.3.0", "later")], at)
    plan.finish(at)
    assert plan.updates == {"Q1": [[0, sch.PENDING, 4, ARRIVAL + 3600.0]]}
    assert plan.reschedule == [(ARRIVAL + 3600.0, "Q1")] and plan.bounces == []
    (e,) = plan.events
    assert e["type"] == ev.DELAY and e["next_attempt"] == ARRIVAL + 3600.0
    entries.index.update("Q1", 0, sch.PENDING, 4, ARRIVAL + 3600.0)
    at = ARRIVAL + 3600.2                   # the last attempt's deferral
    plan = plan_of(entries, sch.RetryPolicy(cfg), lambda: next(qids))
    plan.outcome("Q1", [result(0, bus.DEFERRED, 451, "4.3.0", "later")], at)
    plan.finish(at)
    assert plan.updates == {"Q1": [[0, sch.EXPIRED, 5, 0.0]]}
    assert plan.events[0]["type"] == ev.EXPIRATION and plan.done == ["Q1"]
    (_, dsn), = plan.bounces
    assert b"gave up after 5 attempt(s)" in dsn


def test_an_expiry_reports_delivery_time_expired_not_the_last_reply_made_permanent():
    # RFC 3463: X.4.7 "delivery time expired" is "useful only as a persistent transient
    # error"; class 4 is the one for a temporary condition that persisted until we gave
    # up.  The last reply's code made permanent told the sender what no server said: a
    # "450 4.1.1" of a recipient check that could not be made (Postfix's unverified
    # recipient, temporary) became "5.1.1 bad destination mailbox", which a sender's
    # bounce processing takes as an address to drop for good.
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    entries.set("Q1", 0, attempts=3)
    plan = make(entries, max_age=60.0)     # deferred at ARRIVAL + 60: the last attempt
    plan.outcome("Q1", [result(0, bus.DEFERRED, 450, "4.1.1",
                               "Recipient address rejected: unverified address")], NOW)
    plan.expire("Q1", [1], NOW)             # never tried: found too old
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    assert dsn.count(b"Action: failed") == 2
    assert dsn.count(b"Status: 4.4.7") == 2 and b"Status: 5." not in dsn
    # the receiver's last reply is still quoted
    assert b"last reply: 450 4.1.1 Recipient address rejected" in b" ".join(dsn.split())


def test_a_repeated_or_out_of_range_outcome_changes_nothing():
    entries = Queue(entry("Q1", ["a@example.net"]))
    entries.set("Q1", 0, state=sch.DELIVERED)
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.FAILED, 550), result(5, bus.FAILED, 550),
                        result(-1, bus.DELIVERED, 250)], NOW)
    plan.outcome("GONE", [result(0, bus.DELIVERED, 250)], NOW)
    plan.finish(NOW)
    assert plan.updates == {} and plan.events == [] and plan.bounces == []
    assert plan.done == ["Q1"]    # it came back and has nothing pending: finished


def test_the_first_of_two_outcomes_in_one_batch_counts():
    entries = Queue(entry("Q1", ["a@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.DELIVERED, 250)], NOW)
    plan.outcome("Q1", [result(0, bus.FAILED, 550)], NOW)
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.DELIVERED, 1, 0.0]]} and plan.bounces == []


def test_null_sender_failures_are_not_bounced():
    entries = Queue(entry("Q1", ["a@example.net"], sender=""))
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.FAILED, 550)], NOW)
    plan.finish(NOW)
    assert plan.bounces == [] and plan.done == ["Q1"]
    assert plan.updates == {"Q1": [[0, sch.FAILED, 1, 0.0]]}


def test_an_expiry_is_logged_with_its_queue_id_and_recipient(caplog):
    # The delivery process logs the last attempt "status=deferred"; the spool expires the
    # recipient: the diagnostic log says so, as Postfix's "status=expired", or an operator
    # following the queue id sees a deferral and then nothing.
    caplog.set_level(logging.INFO, "mta.spool")
    entries = Queue(entry("Q1", ["a@example.net"]), entry("Q2", ["b@example.net"]))
    entries.set("Q1", 0, attempts=3)
    plan = make(entries, max_age=60.0)
    plan.outcome("Q1", [result(0, bus.DEFERRED, 421, "4.7.0", "slow down")], NOW)
    plan.expire("Q2", [0], NOW)
    plan.finish(NOW)
    lines = [r.getMessage() for r in caplog.records if "status=expired" in r.getMessage()]
    assert lines == ["Q1: to=<a@example.net> status=expired, gave up after 4 attempt(s) "
                     "(421 4.7.0 slow down)",
                     "Q2: to=<b@example.net> status=expired, gave up after 0 attempt(s)"]


def test_expire_bounces_pending_recipients_only():
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net", "c@example.net"]))
    entries.set("Q1", 1, state=sch.DELIVERED)
    entries.set("Q1", 0, attempts=2)
    plan = make(entries)
    plan.expire("Q1", [0, 1, 2], NOW)
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.EXPIRED, 2, 0.0], [2, sch.EXPIRED, 0, 0.0]]}
    assert [e["recipient"] for e in plan.events] == ["a@example.net", "c@example.net"]
    (_, dsn), = plan.bounces
    assert dsn.count(b"Status: 4.4.7") == 2
    assert b"Final-Recipient: rfc822; c@example.net" in dsn
    assert b"Final-Recipient: rfc822; b@example.net" not in dsn
    assert plan.done == ["Q1"]


def test_an_expiry_found_at_dispatch_quotes_the_last_deferral_and_its_class():
    # a deferred, b never tried: both are found too old later (at dispatch, in the
    # waiting sweep, or REQUEUED past max_age), not by an outcome of their own
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.DEFERRED, 452, "4.2.2", "mailbox full")], NOW)
    entries.index.apply("Q1", plan.updates["Q1"])
    plan = make(entries)
    plan.expire("Q1", [0, 1], NOW + 10)
    plan.finish(NOW + 10)
    a, b = plan.events
    assert (a["type"], a["attempt"], a["response"], a["remote_host"], a["remote_ip"]) == \
        (ev.EXPIRATION, 1, {"code": 452, "enhanced": "4.2.2", "text": "mailbox full"},
         "mx.example.net", "127.0.0.2")
    assert (a["bounce_class"], a["bounce_rule"]) == (22, "temp-mailbox-full")
    # b has no reply to quote: the expiry's own status and class
    assert "response" not in b and (b["attempt"], b["bounce_class"]) == (0, 24)
    shaped = sparkpost_event(a, event_id="1")
    assert (shaped["bounce_class"], shaped["last_bounce_class"], shaped["last_bounce_rule"]) \
        == ("24", "22", "temp-mailbox-full")
    assert "last reply: 452 4.2.2 mailbox full" in shaped["raw_reason"]
    (_, dsn), = plan.bounces
    assert dsn.count(b"Status: 4.4.7") == 2 and b"Status: 5." not in dsn
    assert b"gave up after 1 attempt(s); last reply: 452 4.2.2 mailbox full" in dsn


def test_a_recipient_never_tried_has_no_last_attempt_date_in_its_bounce():
    """RFC 3464 2.3.7: Last-Attempt-Date is the time of the last delivery attempt; a
    recipient that expired or was bounced by the operator before any attempt had none,
    so its report has no such field (it said the time of the expiry or bounce)."""
    import datetime
    import email
    import email.utils

    def last_attempt(dsn: bytes) -> dict:
        _, *per_rcpt = email.message_from_bytes(dsn).get_payload()[1].get_payload()
        return {r["Final-Recipient"].split("; ")[1]: r["Last-Attempt-Date"] for r in per_rcpt}

    def tried_at(qid: str, when: float) -> Queue:
        """a deferred at *when* (in this process), b never tried."""
        entries = Queue(entry(qid, ["a@example.net", "b@example.net"]))
        entries.set(qid, 0, attempts=1)
        plan = make(entries)
        plan.outcome(qid, [result(0, bus.DEFERRED, 451, "4.3.0", "later")], when)
        entries.index.apply(qid, plan.updates[qid])
        return entries

    def date(ts: float) -> str:
        return email.utils.format_datetime(
            datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)).replace("-0000", "+0000")

    # the time of that attempt, not the expiry's or the operator's bounce's
    plan = make(tried_at("Q1", NOW - 50))
    plan.expire("Q1", [0, 1], NOW)
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    got = last_attempt(dsn)
    assert got["a@example.net"] == date(NOW - 50) and got["b@example.net"] is None

    plan = make(tried_at("Q2", NOW - 40))
    assert plan.admin_bounce("Q2", [0, 1], NOW, "bounced by the operator: stop", True) == 2
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    got = last_attempt(dsn)
    assert got["a@example.net"] == date(NOW - 40) and got["b@example.net"] is None


def test_an_expiry_after_a_restart_makes_up_no_last_attempt_date():
    """Tried twice before a restart: when is not known (the record keeps no time, the
    last reply is in memory only), so the expiry's bounce has no Last-Attempt-Date --
    it said the time of the expiry, an attempt that never was."""
    import email
    entries = Queue(entry("Q1", ["a@example.net"]))      # (as recovered: no last reply)
    entries.set("Q1", 0, attempts=2)
    plan = make(entries)
    plan.expire("Q1", [0], NOW)
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    _, a = email.message_from_bytes(dsn).get_payload()[1].get_payload()
    assert a["Final-Recipient"] == "rfc822; a@example.net" and a["Action"] == "failed"
    assert a["Last-Attempt-Date"] is None


@pytest.mark.parametrize("outcome", [bus.DELIVERED, bus.DEFERRED, bus.FAILED])
def test_abandon_names_every_message_that_came_back_once(outcome):
    entries = Queue(entry("Q1", ["a@example.net"]), entry("Q2", ["b@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [result(0, outcome, 250)], NOW)
    plan.outcome("Q2", [result(0, outcome, 250)], NOW)
    plan.outcome("Q1", [result(0, outcome, 250)], NOW)
    assert plan.abandon() == ["Q1", "Q2"]


# ------------------------------------------------------------ REQUEUED, sources


def test_requeued_is_not_an_attempt_and_logs_no_event():
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.REQUEUED, 0, text="suspended"),
                        result(1, bus.REQUEUED, 0, text="suspended")], NOW, retry_after=45.0)
    plan.finish(NOW)
    assert plan.updates == {} and plan.events == [] and plan.bounces == []
    assert plan.requeues == {"Q1": [(0, NOW + 45.0), (1, NOW + 45.0)]}
    assert plan.reschedule == [(NOW + 45.0, "Q1")] and plan.done == []


def test_requeued_waits_at_least_the_floor_and_at_most_the_ceiling():
    from mta.spool.outcomes import REQUEUE_MAX, REQUEUE_MIN
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.REQUEUED, 0)], NOW, retry_after=0.0)
    plan.outcome("Q1", [result(1, bus.REQUEUED, 0)], NOW, retry_after=1e9)
    assert plan.requeues == {"Q1": [(0, NOW + REQUEUE_MIN), (1, NOW + REQUEUE_MAX)]}


def test_requeued_waits_are_spread_by_the_retry_jitter_a_jobs_recipients_together():
    # 200 jobs handed back in one batch with the same retry_after (a rate limit's wait)
    # are not all due again in the same second, in lockstep at every repeat: each waits
    # retry_after plus up to retry_jitter of it (never less: delivery said "not before");
    # a job's recipients keep one due time (one transaction again, not one each)
    metas = [entry(f"Q{n:03d}", ["a@example.net", "b@example.net"]) for n in range(200)]
    entries = Queue(*metas)
    cfg = SimpleNamespace(retry_schedule=[60, 300], retry_jitter=0.1, time_scale=1.0,
                          max_age=86400.0)
    plan = plan_of(entries, sch.RetryPolicy(cfg, random.Random(7)), lambda: "BOUNCE0000")
    for m in metas:
        plan.outcome(m.qid, [result(0, bus.REQUEUED, 0), result(1, bus.REQUEUED, 0)], NOW,
                     retry_after=600.0)
    plan.finish(NOW)
    dues = []
    for m in metas:
        (_, a), (_, b) = plan.requeues[m.qid]
        assert a == b and NOW + 600.0 <= a <= NOW + 660.0
        dues.append(a)
    assert len({int(d) for d in dues}) >= 30


def test_requeued_past_max_age_expires_but_not_before():
    # 60 s old, max_age 100 s, retry_after 3600 s: not expired now (the age
    # check where it waits takes it at its deadline).
    entries = Queue(entry("Q1", ["a@example.net"]))
    plan = make(entries, max_age=100.0)
    plan.outcome("Q1", [result(0, bus.REQUEUED, 0)], NOW, retry_after=3600.0)
    assert plan.updates == {} and "Q1" in plan.requeues
    # Older than max_age: expired and bounced.
    plan = make(entries, max_age=30.0)
    plan.outcome("Q1", [result(0, bus.REQUEUED, 0)], NOW, retry_after=5.0)
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.EXPIRED, 0, 0.0]]}
    assert [e["type"] for e in plan.events] == [ev.EXPIRATION] and len(plan.bounces) == 1


def test_events_name_the_source_its_ip_and_the_site():
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    entries.metas["Q1"].params["ip_pool"] = "mkt"
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.DELIVERED, 250), result(1, bus.DEFERRED, 451)], NOW,
                 source="ip-1", source_ip="127.0.0.2", site="mx.example.net")
    for e in plan.events:
        assert (e["source"], e["sending_ip"], e["site"], e["ip_pool"]) == \
            ("ip-1", "127.0.0.2", "mx.example.net", "mkt")
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.FAILED, 550)], NOW)
    assert not {"source", "sending_ip", "site"} & set(plan.events[0])


def test_age_counts_from_the_start_time():
    # Arrived 60 s ago, scheduled to start 50 s ago; max_age 100 s; a deferral
    # with its next attempt 60 s later: 60 + 60 > 100 from arrival, but from the
    # start (10 + 60 < 100) it is kept, due then.
    e = entry("Q1", ["a@example.net"], start_at=NOW - 10.0)
    plan = make(Queue(e), max_age=100.0)
    plan.outcome("Q1", [result(0, bus.DEFERRED, 451)], NOW)
    assert plan.updates["Q1"][0][1:] == [sch.PENDING, 1, NOW + 60.0]
    # Counted from arrival, the next attempt is its last, at arrival + max_age; one
    # deferred at that age expires.
    e2 = entry("Q2", ["a@example.net"])
    plan = make(Queue(e2), max_age=100.0)
    plan.outcome("Q2", [result(0, bus.DEFERRED, 451)], NOW)
    assert plan.updates["Q2"][0][1:] == [sch.PENDING, 1, ARRIVAL + 100.0]
    plan = make(Queue(e2), max_age=60.0)
    plan.outcome("Q2", [result(0, bus.DEFERRED, 451)], NOW)
    assert plan.updates["Q2"][0][1] == sch.EXPIRED


# ------------------------------------------------------------ DSN (RFC 3461 / 3464)

def dsn_entry(qid, rcpts, notify, orcpt=None, **params):
    return entry(qid, rcpts, **params, NOTIFY=notify, ORCPT=orcpt or [""] * len(rcpts))


def test_notify_decides_who_is_bounced_and_who_gets_a_relayed_notice():
    import email

    e = dsn_entry("Q1", ["a@x.test", "b@x.test", "c@x.test", "d@x.test"],
                  ["NEVER", "", "SUCCESS", "SUCCESS"],
                  ["", "rfc822;B+2Bo@orig.test", "", ""], ENVID="E+2B1", RET="HDRS")
    plan = make(Queue(e))
    plan.outcome("Q1", [result(0, bus.FAILED, 550, "5.1.1"), result(1, bus.FAILED, 550, "5.1.1"),
                        result(2, bus.DELIVERED, 250, "2.0.0"),
                        bus.Result(3, bus.DELIVERED, 250, "2.0.0", "ok", "mx", "127.0.0.2",
                                   dsn=True)], NOW)
    plan.finish(NOW)
    assert len(plan.bounces) == 2       # b's bounce, c's success notice; a: NEVER; d: next hop
    reports = {}
    for meta, data in plan.bounces:
        assert meta.sender == "" and meta.rcpts == [SENDER]
        msg = email.message_from_bytes(data)
        per_msg, *per_rcpt = msg.get_payload()[1].get_payload()
        assert per_msg["Original-Envelope-Id"] == "E+1"
        [r] = per_rcpt
        reports[r["Action"]] = r
    assert reports["failed"]["Final-Recipient"] == "rfc822; b@x.test"
    assert reports["failed"]["Original-Recipient"] == "rfc822; B+o@orig.test"
    assert reports["relayed"]["Final-Recipient"] == "rfc822; c@x.test"
    assert reports["relayed"]["Status"] == "2.0.0"


def test_a_utf8_orcpt_is_written_back_in_the_form_of_its_notice():
    r"""RFC 6533 3: an ORCPT of type utf-8 comes as utf-8-addr-xtext (non-ASCII and
    "+", "=", "\", space as \x{HEX}).  A global DSN (a recipient not ASCII) gives it
    back as utf-8-addr-unitext: the UTF-8 characters themselves, only the ASCII
    specials escaped; a 7-bit DSN as utf-8-addr-xtext."""
    orcpt = r"utf-8;J\x{FC}rgen\x{2B}tag@b\x{FC}cher.test"

    def original_recipient(rcpt: str) -> tuple[bytes, bytes]:
        e = dsn_entry("Q1", [rcpt], [""], [orcpt])
        plan = make(Queue(e))
        plan.outcome("Q1", [result(0, bus.FAILED, 550, "5.1.1")], NOW)
        plan.finish(NOW)
        (_, dsn), = plan.bounces
        return re.search(rb"\r\nOriginal-Recipient: (.*)\r\n", dsn).group(1), dsn

    got, dsn = original_recipient("jürgen@bücher.test")
    assert b"Content-Type: message/global-delivery-status" in dsn
    assert got == r"utf-8; Jürgen\x{2B}tag@bücher.test".encode()
    got, dsn = original_recipient("jw@example.net")
    assert dsn.isascii() and b"Content-Type: message/delivery-status" in dsn
    assert got == rb"utf-8; J\x{FC}rgen\x{2B}tag@b\x{FC}cher.test"


def test_delay_notice_once_per_recipient_and_the_flag_is_in_the_update():
    from mta.store import RCPT_DELAY_NOTIFIED
    e = dsn_entry("Q1", ["a@x.test", "b@x.test", "c@x.test"], ["", "FAILURE", "DELAY"])
    pol = policy()
    pol.delay_warning = 30.0            # ARRIVAL is NOW - 60: past it
    qids = iter(["N1", "N2"])
    q = Queue(e)
    plan = plan_of(q, pol, lambda: next(qids))
    plan.outcome("Q1", [result(i, bus.DEFERRED, 451, "4.2.0") for i in range(3)], NOW)
    plan.finish(NOW)
    [(meta, data)] = plan.bounces
    assert b"Action: delayed" in data and data.count(b"Final-Recipient:") == 2
    assert b"b@x.test" not in data      # NOTIFY=FAILURE: no delay notice
    ups = plan.updates["Q1"]
    assert all(len(u) == 5 and u[4] == RCPT_DELAY_NOTIFIED for u in ups)  # b too: decided
    q.index.apply("Q1", ups)
    for i in range(3):
        q.set("Q1", i, state=sch.PENDING)
    plan = plan_of(q, pol, lambda: "N3")
    plan.outcome("Q1", [result(i, bus.DEFERRED, 451, "4.2.0") for i in range(3)], NOW + 5)
    plan.finish(NOW + 5)
    assert plan.bounces == []           # once
    assert all(len(u) == 4 for u in plan.updates["Q1"])


def test_one_delay_notice_per_message_and_interval_whatever_the_batches():
    # A message to two sites: a's job is deferred in one batch, b's in the next.  One
    # notice (naming a); b is named in the next, not before the warning time has passed
    # again -- then b alone (a was named).  A shard that restarted does not know when a
    # notice went: a message with a recipient named already waits an interval from then.
    from mta.store import RCPT_DELAY_NOTIFIED
    e = entry("Q1", ["a@x.test", "b@y.test"])
    pol = policy()
    pol.delay_warning = 30.0            # ARRIVAL is NOW - 60: past it
    q = Queue(e)
    noticed = {}
    qids = iter(f"N{n}" for n in range(10))

    def batch(idx, at, started=0.0):
        plan = Plan(q.index, q.metas.__getitem__, pol, lambda qid: ORIGINAL,
                    lambda: next(qids), HOST, noticed=noticed, started=started)
        plan.outcome("Q1", [result(idx, bus.DEFERRED, 451, "4.2.0")], at)
        plan.finish(at)
        q.index.apply("Q1", plan.updates["Q1"])
        for qid in plan.notice_more:    # (as the shard does once the batch is written)
            noticed[qid] = at
        return [d for _, d in plan.bounces]

    [n1] = batch(0, NOW)
    assert b"a@x.test" in n1 and b"b@y.test" not in n1
    assert noticed == {"Q1": NOW}       # b is still to be named
    assert batch(1, NOW + 2) == []      # another batch, the same interval: none
    assert not q.index.recipient("Q1", 1)[3] & RCPT_DELAY_NOTIFIED
    assert batch(0, NOW + 10) == [] and batch(1, NOW + 29) == []
    [n2] = batch(1, NOW + 31)
    assert b"b@y.test" in n2 and b"a@x.test" not in n2
    assert batch(0, NOW + 100) == [] and batch(1, NOW + 100) == []   # each once
    # after a restart: no time kept; one recipient named already
    q2 = Queue(entry("Q1", ["a@x.test", "b@y.test"]))
    q2.index.update("Q1", 0, sch.PENDING, 1, NOW, RCPT_DELAY_NOTIFIED)
    q, noticed = q2, {}
    assert batch(1, NOW, started=NOW - 10) == []
    [n3] = batch(1, NOW + 21, started=NOW - 10)
    assert b"b@y.test" in n3


def test_a_delay_notice_reports_a_deferred_5xx_with_a_temporary_status():
    """A 5xx that a response rule's defer action kept in the queue is still being
    retried: its delay notice says 4.x.x (RFC 3463), not the permanent 5.x.x that a
    sender's mail program would read as a failure."""
    import email
    e = entry("Q1", ["a@x.test", "b@x.test"])
    pol = policy()
    pol.delay_warning = 30.0            # ARRIVAL is NOW - 60: past it
    plan = plan_of(Queue(e), pol, lambda: "N1")
    plan.outcome("Q1", [result(0, bus.DEFERRED, 550, "5.7.1", "rate limited, try later"),
                        result(1, bus.DEFERRED, 554, "", "too busy")], NOW,
                 retry_after=600.0, rule=fired("defer", "rate-5xx"))
    plan.finish(NOW)
    [(_, data)] = plan.bounces
    per_msg, a, b = email.message_from_bytes(data).get_payload()[1].get_payload()
    assert (a["Action"], a["Status"]) == ("delayed", "4.7.1")
    assert (b["Action"], b["Status"]) == ("delayed", "4.0.0")
    # what the server said is quoted as it was
    assert a["Diagnostic-Code"] == "smtp; 550 5.7.1 rate limited, try later"


def test_no_delay_notice_before_the_warning_time_or_when_off():
    e = entry("Q1", ["a@x.test"])
    for warning in (0.0, 120.0):        # off; not yet (the message is 60 s old)
        pol = policy()
        pol.delay_warning = warning
        plan = plan_of(Queue(e), pol, lambda: "N1")
        plan.outcome("Q1", [result(0, bus.DEFERRED, 451, "4.2.0")], NOW)
        plan.finish(NOW)
        assert plan.bounces == [] and len(plan.updates["Q1"][0]) == 4


def test_a_recipient_waiting_untried_gets_its_delay_notice_by_time_in_queue():
    """The expiry sweep's look (Plan.remind) names in a delay notice every recipient still
    pending past delay_warning_time and not named yet, whether it was deferred (its reply
    quoted) or never tried (held by a suspension, handed back: our own words); the flag
    is written for each, NOTIFY obeyed; a second look names no one again."""
    import email
    from mta.store import RCPT_DELAY_NOTIFIED
    e = dsn_entry("Q1", ["a@x.test", "b@x.test", "c@x.test", "d@x.test"],
                  ["", "FAILURE", "", ""])
    pol = policy()
    pol.delay_warning = 30.0            # ARRIVAL is NOW - 60: past it
    q = Queue(e)
    q.index.set_last("Q1", 2, (451, "4.2.0", "mailbox busy", "mx.x.test", "127.0.0.2",
                               "21", "soft", int(NOW - 20)))
    q.set("Q1", 2, attempts=1)
    q.set("Q1", 3, state=sch.DELIVERED)
    qids = iter(["N1", "N2"])
    plan = plan_of(q, pol, lambda: next(qids))
    plan.remind("Q1", NOW)
    plan.finish(NOW)
    [(meta, data)] = plan.bounces
    assert meta.rcpts == [SENDER]
    per_msg, a, c = email.message_from_bytes(data).get_payload()[1].get_payload()
    assert (a["Final-Recipient"], a["Action"], a["Status"]) == \
        ("rfc822; a@x.test", "delayed", "4.0.0")
    assert a["Last-Attempt-Date"] is None and a["Will-Retry-Until"]
    assert (c["Final-Recipient"], c["Status"]) == ("rfc822; c@x.test", "4.2.0")
    assert c["Diagnostic-Code"] == "smtp; 451 4.2.0 mailbox busy" and c["Last-Attempt-Date"]
    ups = plan.updates["Q1"]
    assert [(u[0], u[1], u[2], u[4]) for u in ups] == \
        [(0, sch.PENDING, 0, RCPT_DELAY_NOTIFIED), (1, sch.PENDING, 0, RCPT_DELAY_NOTIFIED),
         (2, sch.PENDING, 1, RCPT_DELAY_NOTIFIED)]      # b too (NOTIFY=FAILURE: decided)
    assert plan.reschedule == [] and plan.events == []  # (nothing else changes)
    q.index.apply("Q1", ups)
    plan = plan_of(q, pol, lambda: next(qids))
    plan.remind("Q1", NOW + 100)
    plan.finish(NOW + 100)
    assert plan.bounces == [] and plan.updates == {}    # once
    assert plan.look == {"Q1": ARRIVAL + 3600.0}        # (next: at its deadline)


def test_a_look_for_delay_notices_leaves_this_batchs_outcomes_and_keeps_the_interval():
    e = entry("Q1", ["a@x.test", "b@x.test", "c@x.test"])
    pol = policy()
    pol.delay_warning = 30.0            # ARRIVAL is NOW - 60: past it
    # not yet (a message 20 s old): looked at again at its warning time
    q = Queue(MessageMeta("Q2", SENDER, ["a@x.test"], NOW - 20, {}, ""))
    plan = plan_of(q, pol, lambda: "N0")
    plan.remind("Q2", NOW)
    assert plan.updates == {} and plan.look == {"Q2": NOW + 10}
    # a notice went 10 s ago: none now, looked at again when the interval is over
    q = Queue(e)
    plan = Plan(q.index, q.metas.__getitem__, pol, lambda qid: ORIGINAL, lambda: "N1", HOST,
                noticed={"Q1": NOW - 10})
    plan.remind("Q1", NOW)
    plan.finish(NOW)
    assert plan.bounces == [] and plan.updates == {} and plan.look == {"Q1": NOW + 20}
    # in the same batch: a delivered, b REQUEUED, c deferred (its own notice): one
    # notice naming b and c
    plan = plan_of(q, pol, lambda: "N2")
    plan.outcome("Q1", [result(0, bus.DELIVERED, 250), result(1, bus.REQUEUED, 0),
                        result(2, bus.DEFERRED, 451, "4.2.0", "later")], NOW, retry_after=5)
    plan.remind("Q1", NOW)
    plan.finish(NOW)
    [(_, data)] = plan.bounces
    assert re.findall(rb"Final-Recipient: rfc822; (\S+)", data) == [b"c@x.test", b"b@x.test"]
    assert sorted(u[0] for u in plan.updates["Q1"]) == [0, 1, 2]   # each once


def test_a_look_for_delay_notices_comes_back_for_one_deferred_in_its_batch_unnamed():
    # After a restart (a notice of the message went before it: a recipient's flag), the
    # first look and b's deferral come in one batch, both within the interval from the
    # start: b is not named, and the look must come back when the interval is over --
    # it was filed for the deadline, so b, never deferred again (its site suspended,
    # handed back), got no notice at all.
    from mta.store import RCPT_DELAY_NOTIFIED
    pol = policy()
    pol.delay_warning = 30.0            # ARRIVAL is NOW - 60: past it
    q = Queue(entry("Q1", ["a@x.test", "b@y.test"]))
    q.index.apply("Q1", [[0, sch.PENDING, 1, NOW + 100, RCPT_DELAY_NOTIFIED]])
    plan = Plan(q.index, q.metas.__getitem__, pol, lambda qid: ORIGINAL, lambda: "N1", HOST,
                noticed={}, started=NOW - 10)
    plan.outcome("Q1", [result(1, bus.DEFERRED, 451, "4.3.0", "later")], NOW)
    plan.remind("Q1", NOW)
    plan.finish(NOW)
    assert plan.bounces == []                           # (within the interval)
    assert plan.look == {"Q1": NOW - 10 + 30}           # then b is named
    q.index.apply("Q1", plan.updates["Q1"])
    plan = Plan(q.index, q.metas.__getitem__, pol, lambda qid: ORIGINAL, lambda: "N2", HOST,
                noticed={}, started=NOW - 10)
    plan.remind("Q1", NOW + 20)
    plan.finish(NOW + 20)
    [(_, data)] = plan.bounces
    assert re.findall(rb"Final-Recipient: rfc822; (\S+)", data) == [b"b@y.test"]


def fired(action: str, name: str = "gmail-rate", until: float = 0.0) -> bus.FiredRule:
    return bus.FiredRule(name, "", action, "source_site", "421 4.7.28 unusual rate", "rcpt",
                         until)


def test_a_rules_defer_delay_replaces_the_retry_schedule_and_is_recorded():
    entries = Queue(entry("Q1", ["a@example.net"]))
    plan = make(entries)
    # the schedule would say 60 s; the rule's defer action said 900 s
    grey = fired("defer", "greylist")
    plan.outcome("Q1", [bus.Result(0, bus.DEFERRED, 451, "4.7.1", "greylisted",
                                   "mx.example.net", "127.0.0.2", rule=grey)], NOW,
                 retry_after=900.0, rule=grey)
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.PENDING, 1, NOW + 900.0]]}
    (e,) = plan.events
    assert e["type"] == ev.DELAY and e["next_attempt"] == NOW + 900.0
    assert e["response_rule"]["name"] == "greylist" and e["response_rule"]["action"] == "defer"
    # a shorter delay than the schedule's is kept too (greylisting: try again soon)
    entries = Queue(entry("Q2", ["a@example.net"]))
    entries.set("Q2", 0, attempts=1)                         # the schedule: 300 s
    plan = make(entries)
    plan.outcome("Q2", [result(0, bus.DEFERRED, 451)], NOW, retry_after=30.0,
                 rule=fired("defer"))
    plan.finish(NOW)
    assert plan.updates == {"Q2": [[0, sch.PENDING, 2, NOW + 30.0]]}


def test_a_rules_defer_delay_is_spread_by_the_retry_jitter():
    # 200 messages a rule deferred in one batch are not all due in the same second:
    # each waits the rule's delay plus up to retry_jitter of it (never less)
    metas = [entry(f"Q{i}", [f"r{i}@example.net"]) for i in range(200)]
    entries = Queue(*metas)
    cfg = SimpleNamespace(retry_schedule=[60, 300], retry_jitter=0.1, time_scale=1.0,
                          max_age=86400.0)
    plan = plan_of(entries, sch.RetryPolicy(cfg, random.Random(7)), lambda: "BOUNCE0000")
    for m in metas:
        plan.outcome(m.qid, [result(0, bus.DEFERRED, 421, "4.7.0", "slow down")], NOW,
                     retry_after=600.0, rule=fired("defer"))
    plan.finish(NOW)
    dues = [u[3] for ups in plan.updates.values() for u in ups]
    assert len(dues) == 200
    assert all(NOW + 600.0 <= d <= NOW + 660.0 for d in dues)
    assert len({int(d) for d in dues}) >= 30


@pytest.mark.parametrize("retry_after", [0.0, 600.0])
def test_the_recipients_of_one_job_deferred_together_are_due_together(retry_after):
    # one transaction refused with 4xx (or a rule's defer) is tried again as one
    # transaction: a draw of the jitter per recipient split a 20-recipient message into
    # up to 20 transactions at the next attempt (the queue takes only recipients due)
    rcpts = [f"r{i}@example.net" for i in range(20)]
    entries = Queue(entry("Q1", rcpts))
    cfg = SimpleNamespace(retry_schedule=[600, 1200], retry_jitter=0.1, time_scale=1.0,
                          max_age=86400.0)
    plan = plan_of(entries, sch.RetryPolicy(cfg, random.Random(7)), lambda: "BOUNCE0000")
    plan.outcome("Q1", [result(i, bus.DEFERRED, 451, "4.3.0", "try later")
                        for i in range(20)], NOW, retry_after=retry_after,
                 rule=fired("defer") if retry_after else None)
    plan.finish(NOW)
    dues = {u[3] for u in plan.updates["Q1"]}
    assert len(dues) == 1 and NOW + 600.0 <= dues.pop() <= NOW + 660.0
    # ... and another message of the same batch draws its own
    entries = Queue(*[entry(f"Q{i}", rcpts[:2]) for i in range(30)])
    plan = plan_of(entries, sch.RetryPolicy(cfg, random.Random(7)), lambda: "BOUNCE0000")
    for i in range(30):
        plan.outcome(f"Q{i}", [result(j, bus.DEFERRED, 451, "4.3.0", "later")
                                for j in range(2)], NOW, retry_after=retry_after,
                     rule=fired("defer") if retry_after else None)
    plan.finish(NOW)
    assert len({ups[0][3] for ups in plan.updates.values()}) >= 20
    assert all(ups[0][3] == ups[1][3] for ups in plan.updates.values())


def test_a_rule_delay_past_max_age_expires_the_recipient():
    # (after its last attempt, made at the deadline rather than the rule's delay)
    entries = Queue(entry("Q1", ["a@example.net"]))
    plan = make(entries, max_age=600.0)
    plan.outcome("Q1", [result(0, bus.DEFERRED, 451)], NOW, retry_after=3600.0,
                 rule=fired("defer"))
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.PENDING, 1, ARRIVAL + 600.0]]}
    entries.index.update("Q1", 0, sch.PENDING, 1, ARRIVAL + 600.0)
    plan = make(entries, max_age=600.0)
    plan.outcome("Q1", [result(0, bus.DEFERRED, 451)], ARRIVAL + 600.0, retry_after=3600.0,
                 rule=fired("defer"))
    plan.finish(ARRIVAL + 600.0)
    assert plan.updates == {"Q1": [[0, sch.EXPIRED, 2, 0.0]]}
    assert [e["type"] for e in plan.events] == [ev.EXPIRATION]


def test_a_rules_bounce_class_is_kept_with_the_rule_as_bounce_rule():
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    plan = make(entries)
    block = fired("bounce", "reputation-block")
    res = bus.Result(0, bus.FAILED, 554, "5.7.1", "blocked: poor reputation",
                     "mx.example.net", "127.0.0.2", bounce_class="51", rule=block)
    plan.outcome("Q1", [res, result(1, bus.FAILED, 550, "5.1.1", "no such user")], NOW,
                 rule=block)
    a, b = plan.events
    assert (a["bounce_class"], a["bounce_rule"]) == (51, "reputation-block")
    assert b["bounce_class"] == 10 and b["bounce_rule"] != "reputation-block"
    assert a["response_rule"]["action"] == "bounce" and "response_rule" not in b
    # a result of a delivery process of the version before names no rule of its own:
    # its class's rule is the job's
    entries = Queue(entry("Q2", ["a@example.net"]))
    plan = make(entries)
    res.rule = None
    plan.outcome("Q2", [res], NOW, rule=block)
    assert plan.events[0]["bounce_rule"] == "reputation-block"


def test_no_rule_no_response_rule_field():
    entries = Queue(entry("Q1", ["a@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [result(0, bus.DEFERRED, 451)], NOW)
    assert "response_rule" not in plan.events[0]


def test_an_operators_bounce_fails_pending_recipients_with_class_25_and_a_dsn_when_asked():
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net", "c@example.org"]))
    entries.set("Q1", 1, state=sch.DELIVERED)
    entries.set("Q1", 0, attempts=2)
    plan = make(entries)
    assert plan.admin_bounce("Q1", [0, 1, 2], NOW, "bounced by the operator: stop", True) == 2
    plan.finish(NOW)
    assert plan.updates == {"Q1": [[0, sch.FAILED, 2, 0.0], [2, sch.FAILED, 0, 0.0]]}
    a, c = plan.events
    assert (a["type"], a["recipient"], a["bounce_class"], a["bounce_rule"], a["attempt"]) == \
        (ev.BOUNCE, "a@example.net", 25, "admin-bounce", 2)
    assert a["response"] == {"code": 550, "enhanced": "5.0.0",
                             "text": "bounced by the operator: stop"}
    assert c["recipient"] == "c@example.org" and plan.done == ["Q1"]
    (_, dsn), = plan.bounces
    assert b"Final-Recipient: rfc822; c@example.org" in dsn and b"Status: 5.0.0" in dsn
    assert b"b@example.net" not in dsn
    # without a DSN: the events only
    entries = Queue(entry("Q2", ["a@example.net"]))
    plan = make(entries)
    assert plan.admin_bounce("Q2", [0], NOW, "x", False) == 1
    plan.finish(NOW)
    assert plan.bounces == [] and len(plan.events) == 1 and plan.done == ["Q2"]


def test_the_sessions_tls_and_the_messages_headers_reach_the_events():
    """outbound_tls (delivery and delay only, as SparkPost) and the From address and
    Subject kept in the message's params, in the SparkPost shape of each event."""
    e = entry("Q1", ["a@example.net", "b@example.net", "c@example.net"],
              friendly_from="news@example.org", subject="Spring")
    plan = make(Queue(e))
    plan.outcome("Q1", [result(0, bus.DELIVERED, 250), result(1, bus.DEFERRED, 451),
                        result(2, bus.FAILED, 550)], NOW, outbound_tls="-1")
    shaped = [sparkpost_event(x, event_id=str(i)) for i, x in enumerate(plan.events)]
    assert [(x["type"], x.get("outbound_tls")) for x in shaped] == \
        [("delivery", "-1"), ("delay", "-1"), ("bounce", None)]
    assert {(x["friendly_from"], x["subject"]) for x in shaped} == {("news@example.org",
                                                                     "Spring")}
    plan = make(Queue(entry("Q2", ["a@example.net"])))
    plan.outcome("Q2", [result(0, bus.DEFERRED, 451)], NOW)     # no session: no field
    assert "outbound_tls" not in sparkpost_event(plan.events[0], event_id="9")


def test_the_bounce_rule_entry_follows_the_class_the_event_reports():
    # Hard bounces with no enhanced code (class 10 by their text), a 5.1.1 that is a
    # block of the sender (class 50), a policy refusal under Postfix's "Recipient address
    # rejected:" prefix, and a response rule's own bounce_class: what goes on the list is
    # exactly what the bounce events call Invalid Recipient.
    rcpts = ["a@example.net", "b@example.net", "c@example.net", "d@example.net",
             "e@example.net", "f@example.net"]
    entries = Queue(entry("Q1", rcpts))
    plan = make(entries)
    plan.outcome("Q1", [
        result(0, bus.FAILED, 550, "", "No such user here"),
        result(1, bus.FAILED, 554, "", "delivery error: dd This user doesn't have a "
                                       "yahoo.com account (b@yahoo.com) [0]"),
        result(2, bus.FAILED, 550, "5.1.1", "sender blocked"),
        result(3, bus.FAILED, 550, "5.7.23", "<d@example.net>: Recipient address rejected: "
                                             "Message rejected due to: SPF fail"),
        bus.Result(4, bus.FAILED, 554, "5.7.1", "no", "mx.example.net", "127.0.0.2",
                   bounce_class="10"),
        result(5, bus.DEFERRED, 450, "4.1.1", "mailbox unknown, try later"),
    ], NOW, rule=fired("bounce", "rule-10"))
    plan.finish(NOW)
    classes = {e["recipient"]: e["bounce_class"] for e in plan.events}
    assert classes == {"a@example.net": 10, "b@example.net": 10, "c@example.net": 50,
                       "d@example.net": 50, "e@example.net": 10, "f@example.net": 70}
    assert [a for a, _ in plan.suppress] == ["a@example.net", "b@example.net",
                                             "e@example.net"]
    assert plan.suppress[0][1] == "550: 550 No such user here"


def test_no_dsn_to_a_return_path_on_a_bounce_domain_of_this_node():
    # an HTTP transmission's return_path at the node's bounce domain: the bounce event is
    # the report; a DSN would come back to the node as an out_of_band event repeating it
    entries = Queue(entry("Q1", ["a@example.net"], sender="Bounces@Bounce.Example.ORG"),
                    entry("Q2", ["b@example.net"]))
    qids = iter(f"BOUNCE{n:04d}" for n in range(100))
    plan = Plan(entries.index, entries.metas.__getitem__, policy(), lambda qid: ORIGINAL,
                lambda: next(qids), HOST, frozenset({"bounce.example.org"}))
    plan.outcome("Q1", [result(0, bus.FAILED, 550, "5.1.1", "no such user")], NOW)
    plan.outcome("Q2", [result(0, bus.FAILED, 550, "5.1.1", "no such user")], NOW)
    plan.finish(NOW)
    assert [e["type"] for e in plan.events] == [ev.BOUNCE, ev.BOUNCE]
    assert [m.rcpts for m, _ in plan.bounces] == [[SENDER]]     # Q2's sender only
    assert sorted(plan.done) == ["Q1", "Q2"]


def test_a_deleted_message_gets_one_terminal_event_per_recipient_in_its_batch():
    # `mta queue delete` and the outcome of a job still out for the message, read in the
    # same batch: the deletes are taken first (class-25 bounce events), and the outcome
    # must not give the same recipients a second terminal event, nor a DSN, nor list the
    # message twice as done.
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    plan = make(entries)
    plan.deleted("Q1", NOW)
    plan.outcome("Q1", [result(0, bus.DELIVERED, 250), result(1, bus.FAILED, 550, "5.1.1")],
                 NOW)
    plan.expire("Q1", [0, 1], NOW)
    plan.finish(NOW)
    assert [(e["type"], e["recipient"]) for e in plan.events] == [
        (ev.BOUNCE, "a@example.net"), (ev.BOUNCE, "b@example.net")]
    assert all(e["bounce_class"] == 25 for e in plan.events)
    assert plan.bounces == [] and plan.updates == {} and plan.done == []


# ------------------------------------------- one bounce per message, held across batches

class Spool:
    """A shard's store on disk and the plans of its batches, each written, synced and
    published as the shard does (mta.spool.shard.Shard.batch); :meth:`restart` reads it
    back from disk alone, as after kill -9."""

    def __init__(self, path, *metas: MessageMeta):
        self.path = str(path)
        self.bounce_qids = (f"BOUNCE{n:04d}" for n in itertools.count())
        self.st = self._open()
        new = self.st.write([(m, ORIGINAL) for m in metas], [])
        self.st.sync()
        self.st.commit(new, [])

    def _open(self) -> Store:
        st = Store(self.path, 1 << 20, fsync=True)
        st.recover()
        return st

    def restart(self) -> None:
        self.st = self._open()      # (the old one dropped unclosed: a crash)

    def plan(self) -> Plan:
        st = self.st
        return Plan(st.index, st.read_meta, policy(), st.read_body,
                    lambda: next(self.bounce_qids), HOST, owed=st.owed)

    def commit(self, plan: Plan, done=()) -> None:
        done = [*plan.done, *done]
        new = self.st.write(plan.bounces, done, plan.updates, None, plan.owe)
        self.st.sync()
        self.st.commit(new, done, plan.updates, plan.owe)

    def flags(self, qid: str) -> list[int]:
        return self.st.index.progress(qid)[3]


def two_domains(tmp_path, sender: str = SENDER, **params) -> Spool:
    """Q1 to a@one.example and b@two.example, a delivery job out for each."""
    sp = Spool(tmp_path, entry("Q1", ["a@one.example", "b@two.example"], sender=sender,
                               **params))
    sp.st.index.add_out("Q1", 2)
    return sp


def first_fails(sp: Spool) -> Plan:
    """The batch of the first job's outcome (a@one.example refused); the other job is
    still out."""
    sp.st.index.add_out("Q1", -1)              # (Shard.returned)
    plan = sp.plan()
    plan.outcome("Q1", [result(0, bus.FAILED, 550, "5.1.1", "no such user")], NOW)
    plan.finish(NOW)
    return plan


def rcpts_of(dsn: bytes) -> list[str]:
    return re.findall(r"Final-Recipient: rfc822; (\S+)", dsn.decode())


def test_a_failure_while_another_job_is_out_is_held_and_bounced_with_the_next(tmp_path):
    sp = two_domains(tmp_path)
    plan = first_fails(sp)
    assert plan.bounces == [] and plan.done == []
    assert [e["type"] for e in plan.events] == [ev.BOUNCE]    # the event is not held
    assert plan.updates == {"Q1": [[0, sch.FAILED, 1, 0.0, RCPT_BOUNCE_OWED]]}
    sp.commit(plan)
    assert sp.st.owed == {"Q1": {0: ["5.1.1", "mx.example.net", "550 5.1.1 no such user",
                                     NOW]}}
    # the other job's outcome, a later batch: no job out, one DSN for both
    sp.st.index.add_out("Q1", -1)
    plan = sp.plan()
    plan.outcome("Q1", [result(1, bus.FAILED, 550, "5.7.1", "blocked")], NOW + 9)
    plan.finish(NOW + 9)
    (meta, dsn), = plan.bounces
    assert meta.rcpts == [SENDER] and meta.sender == ""
    assert rcpts_of(dsn) == ["a@one.example", "b@two.example"]
    assert b"550 5.1.1 no such user" in dsn and b"550 5.7.1 blocked" in dsn
    assert plan.done == ["Q1"] and plan.owe == {}
    sp.commit(plan)
    assert sp.st.owed == {}
    sp.restart()
    assert "Q1" not in sp.st.index and sp.st.read_body(meta.qid) == dsn


def test_a_held_bounce_is_sent_once_after_a_crash(tmp_path):
    # kill -9 after the failure was recorded, before the DSN: the restarted shard's first
    # batch sends it (Plan.settle), with what the server said; the flags are cleared in
    # that same batch, so another crash after it sends nothing again.
    sp = two_domains(tmp_path, ORCPT=["rfc822;a@orig.example", ""],
                     NOTIFY=["FAILURE", "FAILURE"])
    sp.commit(first_fails(sp))
    sp.restart()                                # no job out any more
    assert sp.flags("Q1") == [RCPT_BOUNCE_OWED, 0]
    assert set(sp.st.owed) == {"Q1"}
    plan = sp.plan()
    plan.settle("Q1")
    plan.finish(NOW + 5)
    (meta, dsn), = plan.bounces
    assert rcpts_of(dsn) == ["a@one.example"]
    assert b"550 5.1.1 no such user" in dsn and b"Remote-MTA: dns; mx.example.net" in dsn
    assert b"Original-Recipient: rfc822; a@orig.example" in dsn
    assert b"Last-Attempt-Date" in dsn
    assert plan.updates == {"Q1": [[0, sch.FAILED, 1, 0.0, 0]]}
    assert plan.done == []                      # b@two.example is still to be tried
    sp.commit(plan)
    sp.restart()
    assert sp.st.owed == {} and sp.flags("Q1") == [0, 0]
    assert meta.qid in sp.st.index and "Q1" in sp.st.index
    plan = sp.plan()
    plan.settle("Q1")
    plan.finish(NOW + 6)
    assert plan.bounces == [] and plan.updates == {}


def test_a_crash_before_the_held_bounce_was_written_loses_nothing(tmp_path):
    # the batch that would have sent it was not written (a failed write, or kill -9
    # before its fsync): the bounce is still owed, and sent by the next batch
    sp = two_domains(tmp_path)
    sp.commit(first_fails(sp))
    sp.st.index.add_out("Q1", -1)
    plan = sp.plan()
    plan.outcome("Q1", [result(1, bus.FAILED, 550, "5.7.1", "blocked")], NOW + 9)
    plan.finish(NOW + 9)
    assert len(plan.bounces) == 1 and "Q1" in plan.abandon()   # ... never written
    sp.restart()
    plan = sp.plan()
    plan.settle("Q1")
    plan.finish(NOW + 10)
    (_, dsn), = plan.bounces
    assert rcpts_of(dsn) == ["a@one.example"]   # b's outcome was lost: it is tried again


def test_a_deferral_of_the_last_job_out_sends_the_held_bounce(tmp_path):
    sp = two_domains(tmp_path)
    sp.commit(first_fails(sp))
    sp.st.index.add_out("Q1", -1)
    plan = sp.plan()
    plan.outcome("Q1", [result(1, bus.DEFERRED, 451, "4.3.0", "later")], NOW + 9)
    plan.finish(NOW + 9)
    (_, dsn), = plan.bounces
    assert rcpts_of(dsn) == ["a@one.example"]
    assert plan.updates == {"Q1": [[1, sch.PENDING, 1, NOW + 9 + 60],
                                   [0, sch.FAILED, 1, 0.0, 0]]}
    assert plan.done == [] and plan.reschedule == [(NOW + 9 + 60, "Q1")]
    sp.commit(plan)
    assert sp.st.owed == {}


def test_a_held_bounce_and_an_expiry_at_dispatch_make_one_dsn(tmp_path):
    # the other job was taken back (its process died); the message, found too old at
    # dispatch, expires: one DSN for the held failure and the expiry
    sp = two_domains(tmp_path)
    sp.commit(first_fails(sp))
    sp.st.index.add_out("Q1", -1)               # (Shard._resend)
    plan = sp.plan()
    plan.expire("Q1", [1], NOW + 7200)
    plan.finish(NOW + 7200)
    (_, dsn), = plan.bounces
    assert rcpts_of(dsn) == ["a@one.example", "b@two.example"]
    assert plan.done == ["Q1"]


def test_a_deleted_message_sends_the_bounce_it_owed(tmp_path):
    sp = two_domains(tmp_path)
    sp.commit(first_fails(sp))
    plan = sp.plan()
    plan.deleted("Q1", NOW + 3, out={1})        # b's job is still out
    plan.finish(NOW + 3)
    (_, dsn), = plan.bounces
    assert rcpts_of(dsn) == ["a@one.example"]
    assert plan.updates == {}                   # (its DONE is written with the DSN)
    sp.commit(plan, done=["Q1"])
    assert sp.st.owed == {}


def test_a_finished_message_found_at_dispatch_sends_the_bounce_it_owed(tmp_path):
    # b's outcome never came: its job was taken back, then b expired ... the message's
    # end is found at dispatch (Shard.finish_work) and settled with its DONE
    sp = two_domains(tmp_path)
    sp.commit(first_fails(sp))
    sp.st.index.add_out("Q1", -1)
    sp.st.index.update("Q1", 1, sch.DELIVERED, 1, 0.0)
    plan = sp.plan()
    plan.settle("Q1")
    plan.finish(NOW + 3)
    (_, dsn), = plan.bounces
    assert rcpts_of(dsn) == ["a@one.example"]


@pytest.mark.parametrize("sender,params", [
    ("", {}),                                                     # a null sender
    ("bounces@bounce.example.org", {}),                           # a bounce domain's
    (SENDER, {"NOTIFY": ["NEVER", "FAILURE"], "ORCPT": ["", ""]}),  # NOTIFY=NEVER
])
def test_nothing_is_held_for_a_failure_that_gets_no_bounce(tmp_path, sender, params):
    sp = two_domains(tmp_path, sender=sender, **params)
    sp.st.index.add_out("Q1", -1)
    plan = Plan(sp.st.index, sp.st.read_meta, policy(), sp.st.read_body,
                lambda: "BOUNCE", HOST, frozenset({"bounce.example.org"}), sp.st.owed)
    plan.outcome("Q1", [result(0, bus.FAILED, 550, "5.1.1", "no such user")], NOW)
    plan.finish(NOW)
    assert plan.bounces == [] and plan.owe == {}
    assert plan.updates == {"Q1": [[0, sch.FAILED, 1, 0.0]]}


def test_failures_in_one_batch_with_no_job_left_out_bounce_at_once(tmp_path):
    # both jobs' outcomes in the same batch: nothing held, one DSN (as before)
    sp = two_domains(tmp_path)
    sp.st.index.add_out("Q1", -2)
    plan = sp.plan()
    plan.outcome("Q1", [result(0, bus.FAILED, 550, "5.1.1", "no such user")], NOW)
    plan.outcome("Q1", [result(1, bus.FAILED, 550, "5.7.1", "blocked")], NOW)
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    assert rcpts_of(dsn) == ["a@one.example", "b@two.example"]
    assert plan.owe == {} and all(len(u) == 4 for u in plan.updates["Q1"])


def test_our_own_errors_are_x_local_diagnostics_and_only_a_servers_reply_is_smtp():
    """RFC 3464 2.3.6: diagnostic-type "smtp" is for a reply received from the remote
    server.  Our own errors (the loop check, a dead site's hold: a result with no
    remote host) carry a reply code too, but no server said them: "x-local"."""
    import email

    def diagnostics(dsn: bytes) -> dict:
        _, *per_rcpt = email.message_from_bytes(dsn).get_payload()[1].get_payload()
        return {r["Final-Recipient"].split("; ")[1]:
                (r["Diagnostic-Code"], r["Remote-MTA"]) for r in per_rcpt}

    def ours(index, outcome, code, enh, text):
        return bus.Result(index, outcome, code, enh, text, "", "")

    entries = Queue(entry("Q1", ["a@example.net", "b@example.net"]))
    plan = make(entries)
    plan.outcome("Q1", [ours(0, bus.FAILED, 554, "5.4.6",
                             "mail for example.net loops back to myself"),
                        result(1, bus.FAILED, 550, "5.1.1", "no such user")], NOW)
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    assert diagnostics(dsn) == {
        "a@example.net": ("x-local; 554 5.4.6 mail for example.net loops back to myself",
                          None),
        "b@example.net": ("smtp; 550 5.1.1 no such user", "dns; mx.example.net")}

    pol = policy()
    pol.delay_warning = 30.0            # ARRIVAL is NOW - 60: past it
    plan = plan_of(Queue(entry("Q2", ["a@example.net"])), pol, lambda: "N1")
    plan.outcome("Q2", [ours(0, bus.DEFERRED, 451, "4.4.1",
                             "delivery temporarily suspended: mx.example.net[192.0.2.1]: "
                             "ConnectionRefusedError")], NOW)
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    [(diag, mta)] = diagnostics(dsn).values()
    assert diag.startswith("x-local; 451 4.4.1 delivery temporarily suspended") and mta is None


def test_each_recipients_event_names_the_rule_its_own_reply_fired():
    # one RCPT reply fired a bounce rule: the recipient delivered in the same job, and
    # the one deferred by a reply no rule matched, name no rule (the job's first rule,
    # DeliveryOutcome.rule, is no one else's); one deferred by another rule names that one
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net", "c@example.net",
                                 "d@example.net"]))
    plan = make(entries)
    full, grey = fired("bounce", "mailbox-full"), fired("defer", "greylist")
    res = [bus.Result(0, bus.FAILED, 452, "4.2.2", "mailbox full", "mx.example.net",
                      "127.0.0.2", bounce_class="22", rule=full),
           result(1, bus.DELIVERED, 250, "2.0.0", "ok"),
           result(2, bus.DEFERRED, 451, "4.3.0", "try later"),
           bus.Result(3, bus.DEFERRED, 450, "4.7.1", "greylisted", "mx.example.net",
                      "127.0.0.2", rule=grey)]
    plan.outcome("Q1", res, NOW, retry_after=300.0, rule=full)
    a, b, c, d = plan.events
    assert a["response_rule"]["name"] == "mailbox-full" and a["bounce_rule"] == "mailbox-full"
    assert "response_rule" not in b and "response_rule" not in c
    assert c["bounce_rule"] != "mailbox-full"
    assert d["response_rule"]["name"] == "greylist" and d["response_rule"]["action"] == "defer"


def test_our_own_errors_about_a_remote_host_are_x_local_diagnostics():
    """A result with a remote host whose text we made up (Result.local: the host lacks
    8BITMIME, the connection was lost after the message went) is no reply received:
    its Diagnostic-Code is x-local (RFC 3464 2.3.6), its Remote-MTA stays; in a bounce,
    a bounce held for another job of the message, and a delay notice."""
    import email

    def diagnostics(dsn: bytes) -> dict:
        _, *per_rcpt = email.message_from_bytes(dsn).get_payload()[1].get_payload()
        return {r["Final-Recipient"].split("; ")[1]:
                (" ".join(r["Diagnostic-Code"].split()), r["Remote-MTA"]) for r in per_rcpt}

    def ours(index, outcome, code, enh, text):
        return bus.Result(index, outcome, code, enh, text, "mx.example.net", "127.0.0.2",
                          local=True)

    eight = "mx.example.net does not accept 8-bit messages (no 8BITMIME)"
    entries = Queue(entry("Q1", ["a@example.net", "b@example.net", "c@example.org"]))
    plan = make(entries)
    plan.outcome("Q1", [ours(0, bus.FAILED, 554, "5.6.3", eight),
                        result(1, bus.FAILED, 550, "5.1.1", "no such user")], NOW)
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    assert diagnostics(dsn) == {
        "a@example.net": (f"x-local; 554 5.6.3 {eight}", "dns; mx.example.net"),
        "b@example.net": ("smtp; 550 5.1.1 no such user", "dns; mx.example.net")}
    assert b"Reason: 554 5.6.3" in dsn and b"Reply: 550 5.1.1" in dsn

    pol = policy()
    pol.delay_warning = 30.0            # ARRIVAL is NOW - 60: past it
    plan = plan_of(Queue(entry("Q2", ["a@example.net"])), pol, lambda: "N1")
    lost = ("mx.example.net[127.0.0.2]: connection lost waiting for the end of data reply")
    plan.outcome("Q2", [ours(0, bus.DEFERRED, 451, "4.4.2", lost)], NOW)
    plan.finish(NOW)
    (_, dsn), = plan.bounces
    assert diagnostics(dsn) == {"a@example.net": (f"x-local; 451 4.4.2 {lost}",
                                                  "dns; mx.example.net")}


def test_a_held_bounce_of_our_own_error_stays_x_local_across_a_restart(tmp_path):
    sp = two_domains(tmp_path)
    sp.st.index.add_out("Q1", -1)
    plan = sp.plan()
    text = "mx.example.net does not support SMTPUTF8"
    plan.outcome("Q1", [bus.Result(0, bus.FAILED, 553, "5.6.7", text, "mx.example.net",
                                   "127.0.0.2", local=True)], NOW)
    plan.finish(NOW)
    assert plan.bounces == []
    sp.commit(plan)
    sp.restart()                    # (what the bounce will say is read back from disk)
    sp.st.index.add_out("Q1", -1)
    plan = sp.plan()
    plan.outcome("Q1", [result(1, bus.FAILED, 550, "5.7.1", "blocked")], NOW + 9)
    plan.finish(NOW + 9)
    (_, dsn), = plan.bounces
    assert f"Diagnostic-Code: x-local; 553 5.6.7 {text}".encode() in dsn
    assert b"Diagnostic-Code: smtp; 550 5.7.1 blocked" in dsn
    assert dsn.count(b"Remote-MTA: dns; mx.example.net") == 2


def test_a_deferral_under_an_endless_max_age_is_due_at_a_time_the_index_takes():
    """delivery.max_age and retry_schedule have no upper bound: with both beyond some
    3000 years (an operator's "never give up, wait for ever") a deferral's due time
    came out past mta.store.MAX_TIME, which the index refuses since the recovery's
    bounds: the shard wrote the update but its commit left the recipient as it was --
    no attempt counted, due again at once, tried again and again.  The deadline is now
    held below MAX_TIME (max_age at most MAX_AGE)."""
    from mta.store import MAX_TIME
    cfg = SimpleNamespace(retry_schedule=[2e11], retry_jitter=0.0, time_scale=1.0,
                          max_age=1e12)
    entries = Queue(entry("Q1", ["a@example.net"]))
    qids = iter(f"BOUNCE{n:04d}" for n in range(100))
    plan = plan_of(entries, sch.RetryPolicy(cfg, random.Random(1)), lambda: next(qids))
    plan.outcome("Q1", [result(0, bus.DEFERRED, 451, "4.3.0", "try later")], NOW)
    plan.finish(NOW)
    (up,) = plan.updates["Q1"]
    assert NOW < up[3] < MAX_TIME
    assert entries.index.apply("Q1", plan.updates["Q1"]) == 1
    assert entries.index.recipient("Q1", 0)[:3] == (sch.PENDING, 1, up[3])
