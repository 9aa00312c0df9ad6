"""Injection options of issue 10 against the real daemon: options.ip_pool (HTTP and
X-MSYS-API over SMTP) and options.start_time (scheduled sending, across kill -9).

Real ``mta serve``, real HTTP and SMTP over loopback; the scheduled case delivers
through the lab (unbound on loopback, an aiosmtpd receiver).
"""
from __future__ import annotations

import datetime
import json
import smtplib
import time

from daemon import HOST, wait_until
from mxlab import IPS, mx

from mta.api import replies as R

POOLS = {"pool": [{"name": "mkt", "sources": [{"source": "default", "weight": 1}]}],
         "domain_pool": {"news.example": "mkt"}}


def tx(rcpt: str, **options) -> dict:
    body = {"recipients": [rcpt],
            "content": {"from": "s@sender.example", "subject": "s", "text": "t"}}
    if options:
        body["options"] = options
    return body


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


def assert_422(st, body, field: str):
    assert st == 422, (st, body)
    [err] = body["errors"]
    assert err["code"] == R.INVALID.code and err["message"] == R.INVALID.message, err
    assert err["description"].startswith(field + ":"), err


def reception(d, rcpt: str) -> dict:
    return wait_until(lambda: next((e for e in d.events() if e["type"] == "injection"
                                    and e["raw_rcpt_to"] == rcpt), None),
                      15, f"the injection event of {rcpt}", interval=0.05)


def test_http_ip_pool_and_start_time_are_checked_at_injection(make_daemon):
    d = make_daemon(acceptors=1, shards=1, egress=POOLS)
    st, _, body = d.post(tx("a@dest.example", ip_pool="nope"))
    assert_422(st, body, "options.ip_pool")
    assert "'nope'" in body["errors"][0]["description"]
    now = time.time()
    for bad in ("tomorrow", "2026-12-03", "2026-12-03T10:00:00", "2026-13-40T10:00:00Z",
                iso(now + 4 * 86400)):
        st, _, body = d.post(tx("b@dest.example", start_time=bad))
        assert_422(st, body, "options.start_time")
    assert d.queue_summary()["total"]["messages"] == 0        # nothing was queued
    # A configured pool is accepted and recorded; so is the sending domain's pool.
    assert d.post(tx("c@dest.example", ip_pool="mkt"))[0] == 200
    assert reception(d, "c@dest.example")["ip_pool"] == "mkt"
    body = tx("d@dest.example")
    body["content"]["from"] = "editor@news.example"
    assert d.post(body)[0] == 200
    assert reception(d, "d@dest.example")["ip_pool"] == "mkt"
    # The default pool (not written into the record): the events name it.
    assert d.post(tx("e@dest.example", ip_pool="default"))[0] == 200
    assert reception(d, "e@dest.example")["ip_pool"] == "default"
    # A start time in the past (or "now") is now: not scheduled.
    assert d.post(tx("f@dest.example", start_time=iso(now - 3600)))[0] == 200
    assert d.post(tx("g@dest.example", start_time="now"))[0] == 200
    assert d.queue_summary()["total"]["scheduled"] == 0


def test_smtp_x_msys_api_unknown_pool_is_550_after_data_and_nothing_is_queued(make_daemon):
    d = make_daemon(acceptors=1, shards=1, egress=POOLS)

    def msg(pool: str) -> bytes:
        hdr = json.dumps({"options": {"ip_pool": pool}})
        return (f"From: s@sender.example\r\nTo: r@dest.example\r\nX-MSYS-API: {hdr}\r\n"
                f"Subject: pool\r\n\r\nbody\r\n").encode()

    with smtplib.SMTP(HOST, d.port) as s:
        s.ehlo("client.test")
        s.mail("s@sender.example")
        s.rcpt("unknown@dest.example")
        code, text = s.data(msg("nope"))
        assert (code, text) == (550, b'5.7.1 Unknown ip_pool "nope" in X-MSYS-API')
        # The session goes on; a known pool is accepted.
        s.sendmail("s@sender.example", ["known@dest.example"], msg("mkt"))
    listed = [x["recipients"] for x in d.queue_list()]
    assert listed == [["known@dest.example"]]
    assert reception(d, "known@dest.example")["ip_pool"] == "mkt"


def test_start_time_holds_the_message_until_then_across_kill9(lab):
    ip = IPS[0]
    rx = lab.aio(ip)
    lab.serve(mx("dest.test", "mx.dest.test", ip))
    d = lab.daemon()
    start = int(time.time()) + 20           # the figure
    st, _, body = d.post({"recipients": ["later@dest.test"],
                          "content": {"from": "s@sender.test", "subject": "later",
                                      "text": "scheduled"},
                          "options": {"start_time": iso(start)}})
    assert st == 200, body
    # A message without a start time goes at once: delivery works meanwhile.
    assert d.post({"recipients": ["now@dest.test"],
                   "content": {"from": "s@sender.test", "subject": "now", "text": "at once"}}
                  )[0] == 200
    rx.wait_for("now@dest.test", 15)
    total = d.queue_summary()["total"]
    assert (total["scheduled"], total["scheduled_messages"]) == (1, 1)
    assert total["next_start"] == start
    assert "scheduled: 1 message(s), 1 recipient(s)" in d.cli("queue").stdout.decode()
    # kill -9 of the whole tree; the schedule comes back from the record.
    d.kill9()
    d.start()
    assert d.queue_summary()["total"]["scheduled"] == 1
    assert not [t for t in rx.snapshot() if "later@dest.test" in t.rcpt_tos]
    t = rx.wait_for("later@dest.test", start - time.time() + 30)
    assert t.at >= start, (t.at, start)
    assert b"scheduled" in t.data
    wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 15, "an empty queue")
    ev = wait_until(lambda: [e for e in d.events() if e.get("raw_rcpt_to") == "later@dest.test"
                             and e["type"] == "delivery"], 10, "the delivery event")
    assert len(ev) == 1 and float(ev[0]["event_time"]) >= start and \
        ev[0]["num_retries"] == "0"


def test_a_scheduled_message_s_events_carry_scheduled_time(make_daemon):
    """SparkPost's events of a message sent with options.start_time carry
    ``scheduled_time`` (Unix seconds, a string, like every number of theirs); one sent
    at once has none.  The acceptor kept start_time in the message's params "for
    events", and no event said it."""
    d = make_daemon(acceptors=1, shards=1)
    start = int(time.time()) + 3600
    assert d.post(tx("later@dest.example", start_time=iso(start)))[0] == 200
    assert d.post(tx("now@dest.example"))[0] == 200
    later, now = reception(d, "later@dest.example"), reception(d, "now@dest.example")
    assert later.get("scheduled_time") == str(start), later
    assert "scheduled_time" not in now, now
