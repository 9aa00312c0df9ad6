"""Out-of-band bounces and complaints against the real daemon (feedback.bounce_domains).

The pipeline: mail injected over HTTP and delivered to a sink (aiosmtpd on
loopback); then, over SMTP from a client that may not relay, reports addressed
to the bounce domain -- an RFC 3464 DSN quoting the original Message-ID, a DSN
sent to a VERP return path (``bounces+<queue id>@``) that quotes nothing, an
RFC 5965 ARF complaint, and a message that is no report at all.  What must
follow: ``out_of_band`` and ``spam_complaint`` events in GET
/api/v1/events/message carrying the original message's transmission_id and
campaign_id; suppression entries "Bounce Rule" (hard invalid-recipient
out-of-band bounce) and "Spam Complaint"; nothing relayed to the sink; the
daemon still running.
"""
from __future__ import annotations

import http.client
import json
import os
import smtplib
import time
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import HOST, Client, free_port, wait_until
from sinks import AioSink

KEY = "oob-key"
BOUNCES = "bounces.example.com"


def call(d, path: str) -> tuple[int, object]:
    conn = http.client.HTTPConnection(HOST, d.http_port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": KEY})
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    return r.status, json.loads(raw) if raw else raw


def events(d, **params) -> list[dict]:
    params.setdefault("from", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                            time.gmtime(time.time() - 3600)))
    params.setdefault("to", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                          time.gmtime(time.time() + 3600)))
    status, body = call(d, "/api/v1/events/message?" + urllib.parse.urlencode(params))
    assert status == 200, body
    return body["results"]


def smtp_send(d, sender: str, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """One transaction from 127.0.0.1 (not in relay_networks): the reply to its end of data."""
    with smtplib.SMTP(HOST, d.port, local_hostname="mx.isp.test", timeout=30) as s:
        s.ehlo()
        code, text = s.mail(sender)
        assert code == 250, text
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        return s.data(data)


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def dsn(message_id: str, rcpt: str, status: str, diagnostic: str) -> bytes:
    quoted = (f"Message-ID: {message_id}\n" if message_id else "")
    return crlf(f"""\
From: MAILER-DAEMON@mx.receiver.test (Mail Delivery System)
To: bounces@{BOUNCES}
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B1"

--B1
Content-Type: text/plain; charset=us-ascii

Your message could not be delivered.

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.receiver.test
Arrival-Date: Wed, 2 Dec 2026 10:00:00 +0000

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: {status}
Remote-MTA: dns; inbox.receiver.test
Diagnostic-Code: smtp; {diagnostic}

--B1
Content-Type: text/rfc822-headers

{quoted}From: news@sender.example.org
To: {rcpt}
Subject: Pipeline

--B1--
""")


def arf(message_id: str, rcpt: str) -> bytes:
    return crlf(f"""\
From: <staff@fbl.provider.test>
Date: Wed, 2 Dec 2026 11:00:00 +0000
Subject: FW: Pipeline
To: <fbl@{BOUNCES}>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="P1"

--P1
Content-Type: text/plain; charset="US-ASCII"

This is an email abuse report.

--P1
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Rcpt-To: <{rcpt}>
Reported-Domain: sender.example.org
Source-IP: 127.0.0.1

--P1
Content-Type: message/rfc822

From: <news@sender.example.org>
To: <{rcpt}>
Subject: Pipeline
Message-ID: {message_id}

hello
--P1--
""")


def test_dsn_and_arf_reports_become_events_and_suppressions_and_are_not_relayed(make_daemon):
    sink = AioSink(HOST, free_port()).start()
    try:
        d = make_daemon(acceptors=1, shards=2, http={"api_keys": [KEY]},
                        smtp={"relay_networks": ["192.0.2.0/24"]},   # loopback may not relay
                        feedback={"bounce_domains": [BOUNCES.upper()]},
                        delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                             "hosts": [f"{HOST}:{sink.port}"]}]})
        ids = {}
        for campaign, rcpts in (("oob-a", ["ok@example.com", "gone@example.com"]),
                                ("oob-b", ["full@example.com"])):
            status, _, body = d.post({"campaign_id": campaign,
                                      "recipients": [{"address": r} for r in rcpts],
                                      "content": {"from": "news@sender.example.org",
                                                  "subject": "Pipeline", "text": "hello"}},
                                     headers={"Authorization": KEY})
            assert status == 200, body
            ids[campaign] = body["results"]["id"]
        for r in ("ok@example.com", "gone@example.com", "full@example.com"):
            sink.wait_for(r)

        def delivery_of(rcpt):
            found = [e for e in events(d, recipients=rcpt, events="delivery")]
            return found[0] if found else None
        a = wait_until(lambda: delivery_of("gone@example.com"), 60, "delivery event of A")
        b = wait_until(lambda: delivery_of("full@example.com"), 60, "delivery event of B")
        # (the HTTP API makes one message, with a Message-ID of its own, per recipient)
        a_ok = wait_until(lambda: delivery_of("ok@example.com"), 60, "delivery to ok@")
        assert a["transmission_id"] == ids["oob-a"] and a["message_id_header"]
        received = sink.received()

        # 1. A DSN quoting A's Message-ID: user unknown (5.1.1, class 10).
        code, text = smtp_send(d, "", [f"bounces@{BOUNCES}"],
                               dsn(a["message_id_header"], "gone@example.com", "5.1.1",
                                   "550 5.1.1 <gone@example.com>: User unknown"))
        assert code == 250, text
        # 2. A DSN to B's VERP return path that quotes no Message-ID: mailbox full (5.2.2).
        code, text = smtp_send(d, "", [f"bounces+{b['message_id']}@{BOUNCES}"],
                               dsn("", "full@example.com", "5.2.2",
                                   "552 5.2.2 <full@example.com>: Mailbox full"))
        assert code == 250, text
        # 3. An ARF complaint about A from ok@example.com.
        code, text = smtp_send(d, "staff@fbl.provider.test", [f"fbl@{BOUNCES}"],
                               arf(a_ok["message_id_header"], "ok@example.com"))
        assert code == 250, text
        # 4. Not a report at all: accepted (250), dropped, logged; the daemon goes on.
        code, text = smtp_send(d, "someone@else.test", [f"fbl@{BOUNCES}"],
                               b"Subject: hi\r\n\r\nthis is not a report\r\n")
        assert code == 250, text
        d.wait_log(r"is not a DSN or ARF report; accepted, not relayed, dropped")

        # The events, in the API, with the original message's ids.
        oob = wait_until(lambda: events(d, events="out_of_band") if len(
            events(d, events="out_of_band")) == 2 else None, 60, "two out_of_band events")
        by_rcpt = {e["rcpt_to"]: e for e in oob}
        gone = by_rcpt["gone@example.com"]
        assert gone["bounce_class"] == "10" and gone["error_code"] == "550", gone
        assert gone["transmission_id"] == ids["oob-a"] and gone["campaign_id"] == "oob-a"
        assert gone["message_id"] == a["message_id"] and gone["matched"] == "1"
        assert gone["event_id"] and "5.1.1" in gone["raw_reason"]
        # reason is canonicalised as for an in-band bounce (addresses as ...@...), and the
        # fields SparkPost gives an out_of_band event from the delivery come from it
        assert gone["raw_reason"] == "550 5.1.1 <gone@example.com>: User unknown", gone
        assert gone["reason"] == "550 5.1.1 <...@...>: User unknown", gone
        assert (gone["ip_address"], gone["num_retries"]) == \
            (a["ip_address"], a["num_retries"]), (gone, a)
        full = by_rcpt["full@example.com"]
        assert full["bounce_class"] == "22", full           # Mailbox Full (soft)
        assert full["transmission_id"] == ids["oob-b"] and full["campaign_id"] == "oob-b"
        assert full["message_id"] == b["message_id"] and full["matched"] == "1"
        spam = wait_until(lambda: events(d, events="spam_complaint"), 60,
                          "the spam_complaint event")
        assert len(spam) == 1
        spam = spam[0]
        assert spam["rcpt_to"] == "ok@example.com" and spam["fbtype"] == "abuse"
        assert spam["transmission_id"] == ids["oob-a"] and spam["campaign_id"] == "oob-a"
        assert spam["message_id"] == a_ok["message_id"] and spam["matched"] == "1"
        assert spam["report_by"] == "staff@fbl.provider.test"
        assert (spam["ip_address"], spam["num_retries"]) == \
            (a_ok["ip_address"], a_ok["num_retries"]), (spam, a_ok)
        # the messages filter finds them with the original message's other events
        kinds = {e["type"] for e in events(d, messages=a["message_id"])}
        assert kinds >= {"injection", "delivery", "out_of_band"}, kinds
        kinds = {e["type"] for e in events(d, messages=a_ok["message_id"])}
        assert kinds >= {"injection", "delivery", "spam_complaint"}, kinds

        # The suppression list: the complainer and the hard bounce, not the soft one.
        status, body = call(d, "/api/v1/suppression-list/ok@example.com")
        assert status == 200 and body["results"][0]["source"] == "Spam Complaint", body
        assert body["results"][0]["type"] == "non_transactional"
        status, body = call(d, "/api/v1/suppression-list/gone@example.com")
        assert status == 200 and body["results"][0]["source"] == "Bounce Rule", body
        assert "5.1.1" in body["results"][0]["description"]
        status, body = call(d, "/api/v1/suppression-list/full@example.com")
        assert status == 404, body

        # Nothing was relayed: the sink got the three originals only.
        time.sleep(1.0)
        assert sink.received() == received
        assert all(BOUNCES not in r for t in sink.snapshot() for r in t.rcpt_tos)
        assert not any(b"multipart/report" in t.data or b"not a report" in t.data
                       for t in sink.snapshot())
        # The daemon runs on; mail to relay from this client is still refused.
        assert d.proc.poll() is None
        with smtplib.SMTP(HOST, d.port, timeout=30) as s:
            s.ehlo()
            s.mail("someone@else.test")
            assert s.rcpt("r@example.net")[0] == 554
            # and a report transaction keeps other recipients out (452 4.5.3)
            s.rset()
            s.mail("")
            assert s.rcpt(f"x@{BOUNCES}")[0] == 250
            code, text = s.rcpt("r@example.net")
            assert code == 452 and b"4.5.3" in text, text
        assert "Traceback" not in d.log(), d.log()[-4000:]
    finally:
        sink.stop()


@pytest.mark.parametrize("unmatched", [False, True])
def test_reports_are_matched_by_nothing_when_the_events_store_is_off(make_daemon, unmatched):
    """[events] store = false: the report is still read; its events (matched "0") go to
    the event log; the complaint suppresses only with feedback.suppress_unmatched (a
    report comes from anyone: see the test below)."""
    d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                    server={"event_log": "events.jsonl"}, events={"store": False},
                    feedback={"bounce_domains": [BOUNCES], "suppress_unmatched": unmatched})
    code, text = smtp_send(d, "staff@fbl.provider.test", [f"fbl@{BOUNCES}"],
                           arf("<nowhere@sender.example.org>", "reader@example.com"))
    assert code == 250, text
    log_path = d.state_dir + "/events.jsonl"

    def complaint():
        try:
            with open(log_path, "rb") as fh:
                lines = [json.loads(x) for x in fh if x.strip()]
        except FileNotFoundError:
            return None
        return next((e for e in lines if e.get("type") == "spam_complaint"), None)
    ev = wait_until(complaint, 60, "the spam_complaint event in the event log")
    assert ev["matched"] == "0" and ev["rcpt_to"] == "reader@example.com"
    assert ev["message_id_header"] == "nowhere@sender.example.org" and ev["event_id"]
    status, body = call(d, "/api/v1/suppression-list/reader@example.com")
    if unmatched:
        assert status == 200 and body["results"][0]["source"] == "Spam Complaint", body
    else:
        assert status == 404, body


def test_a_made_up_report_from_anyone_suppresses_nobody(make_daemon):
    """A client with no right to relay and no authentication sent a made-up complaint and
    a made-up hard bounce to the bounce domain, naming addresses of its choice (about a
    message never sent): every one of them was on the suppression list two seconds later,
    and the sender's mail to them was refused from then on.  Their events still come
    (matched "0"), so the operator sees them; the list is untouched."""
    d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                    smtp={"relay_networks": ["192.0.2.0/24"]},   # loopback may not relay
                    feedback={"bounce_domains": [BOUNCES]})
    victims = ["ceo@customer.example", "buyer@customer.example"]
    code, text = smtp_send(d, "staff@fbl.provider.test", [f"fbl@{BOUNCES}"],
                           arf("<forged@sender.example.org>", victims[0]))
    assert code == 250, text
    code, text = smtp_send(d, "", [f"bounces@{BOUNCES}"],
                           dsn("forged-2@sender.example.org", victims[1], "5.1.1",
                               f"550 5.1.1 <{victims[1]}>: User unknown"))
    assert code == 250, text
    got = wait_until(lambda: events(d, events="spam_complaint,out_of_band") if len(
        events(d, events="spam_complaint,out_of_band")) == 2 else None, 60,
        "the two reports' events")
    assert sorted(e["rcpt_to"] for e in got) == sorted(victims)
    assert all(e["matched"] == "0" for e in got), got
    time.sleep(1.0)         # (an addition would be there by now: see the store-off test)
    for v in victims:
        status, body = call(d, f"/api/v1/suppression-list/{v}")
        assert status == 404, (v, body)


@pytest.mark.parametrize("send_them", [False, True])
def test_a_made_up_report_does_not_reach_the_webhooks(make_daemon, send_them):
    """A made-up complaint about an address of the sender's choosing went to every
    webhook as a spam_complaint: a customer's app that unsubscribes complainers (what
    django-anymail's tracking signals are for) acted on it.  Reports whose message is not
    found (matched "0") stay in the event log and the events API, for the operator; the
    webhooks get them with webhooks.unmatched_reports only.  A matched report's events go."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "webhooks"))
    from receiver import Receiver
    rec = Receiver()
    sink = AioSink(HOST, free_port()).start()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        feedback={"bounce_domains": [BOUNCES]},
                        webhooks={"poll_interval": 0.2, "unmatched_reports": send_them},
                        webhook=[{"name": "app", "target": rec.url,
                                  "events": ["delivery", "spam_complaint"]}],
                        delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                             "hosts": [f"{HOST}:{sink.port}"]}]})
        code, text = smtp_send(d, "staff@fbl.provider.test", [f"fbl@{BOUNCES}"],
                               arf("<forged@sender.example.org>", "ceo@customer.example"))
        assert code == 250, text
        wait_until(lambda: events(d, events="spam_complaint"), 60, "the complaint's event")
        # a real message, delivered, then complained about: matched
        qid = d.send("news@sender.example.org", ["reader@example.com"],
                     b"From: news@sender.example.org\r\nMessage-ID: <real-1@sender.example.org>"
                     b"\r\nSubject: real\r\n\r\nhello\r\n")
        sink.wait_for("reader@example.com")
        wait_until(lambda: events(d, recipients="reader@example.com", events="delivery"), 60,
                   "the delivery event")
        code, text = smtp_send(d, "staff@fbl.provider.test", [f"fbl@{BOUNCES}"],
                               arf("<real-1@sender.example.org>", "reader@example.com"))
        assert code == 250, text
        rec.wait(lambda r: any(e["type"] == "spam_complaint" and
                               e["rcpt_to"] == "reader@example.com" for e in r.events()),
                 60, "the matched complaint at the webhook")
        time.sleep(1.0)
        sent = [(e["type"], e["rcpt_to"]) for e in rec.events()]
        assert ("delivery", "reader@example.com") in sent and qid
        assert (("spam_complaint", "ceo@customer.example") in sent) is send_them, sent
    finally:
        sink.stop()
        rec.close()


def test_verp_return_path_names_the_message_and_brings_its_bounce_back(make_daemon):
    """feedback.verp: the receiver sees MAIL FROM:<bounces+<queue id>@bounce domain>; an
    asynchronous bounce sent there, quoting nothing of the original, becomes the
    out_of_band event of that very message; a bounce (null sender) keeps its null path."""
    def rcpt(sink, address, mail_from):
        return "550 5.1.1 no such user" if address.startswith("gone@") else None
    sink = AioSink(HOST, free_port(), rcpt=rcpt).start()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        feedback={"bounce_domains": [BOUNCES], "verp": "bounces"},
                        delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                             "hosts": [f"{HOST}:{sink.port}"]}]})
        qid = d.send("news@sender.example.org", ["reader@example.com"],
                     b"From: news@sender.example.org\r\nSubject: verp\r\n\r\nhello\r\n")
        t = sink.wait_for("reader@example.com")
        assert t.mail_from == f"bounces+{qid.lower()}@{BOUNCES}", t.mail_from
        wait_until(lambda: events(d, recipients="reader@example.com", events="delivery"), 60,
                   "the delivery event")
        code, text = smtp_send(d, "", [t.mail_from],
                               dsn("", "reader@example.com", "5.1.1",
                                   "550 5.1.1 <reader@example.com>: User unknown"))
        assert code == 250, text
        [oob] = wait_until(lambda: events(d, events="out_of_band"), 60, "the out_of_band event")
        assert oob["message_id"] == qid.lower() and oob["matched"] == "1", oob
        assert oob["rcpt_to"] == "reader@example.com" and oob["bounce_class"] == "10"
        # refused in band: our DSN to the sender leaves with the null return path
        d.send("news@sender.example.org", ["gone@example.com"],
               b"From: news@sender.example.org\r\nSubject: gone\r\n\r\nhello\r\n")
        dsn_txn = sink.wait_for("news@sender.example.org")
        assert dsn_txn.mail_from == "", dsn_txn.mail_from
    finally:
        sink.stop()


def test_verp_needs_a_bounce_domain(tmp_path):
    import msgspec
    import pytest

    from mta.config import ConfigError, resolve
    from mta.config.schema import Config

    with pytest.raises(ConfigError, match=r"feedback\.verp: needs feedback\.bounce_domains"):
        resolve(msgspec.convert({"server": {"state_dir": str(tmp_path)},
                                 "feedback": {"verp": "bounces"}}, Config), None)


def crafted_report(parts: int) -> bytes:
    """A DSN whose returned message is *parts* tiny MIME parts: parsing it costs CPU by
    the octet (up to about 1 s per MiB), which a report from anyone must not be free to do."""
    inner = b"--C\r\nContent-Type: text/plain\r\n\r\ny\r\n" * parts
    return dsn("crafted@sender.example.org", "x@example.com", "5.1.1",
               "550 5.1.1 unknown").replace(
        b"--B1\r\nContent-Type: text/rfc822-headers\r\n",
        b"--B1\r\nContent-Type: multipart/mixed; boundary=\"C\"\r\n\r\n" + inner
        + b"--C--\r\n--B1\r\nContent-Type: text/rfc822-headers\r\n")


def test_reports_are_read_one_at_a_time_and_only_their_first_octets(make_daemon):
    """Parsing a report costs CPU by the octet, and anyone may send one: a client with
    many connections had the acceptor parse 10 MB reports in every worker thread at once
    beside its event loop.  Now feedback.report_readers parse at once,
    feedback.max_waiting_reports wait, one more gets 451 4.3.2 at once (and is sent again
    later, as a 4xx is); and only feedback.max_report_size octets of a report are read."""
    limit = 4 << 20
    d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                    smtp={"relay_networks": ["192.0.2.0/24"]},
                    feedback={"bounce_domains": [BOUNCES], "report_readers": 1,
                              "max_waiting_reports": 1, "max_report_size": limit})
    big = crafted_report(200_000)            # 7 MB: its first 4 MiB take a second or more
    assert len(big) > limit + (1 << 20)
    conns = []
    for _ in range(3):
        c = Client(HOST, d.port, timeout=60)
        for line in (b"EHLO mx.isp.test", b"MAIL FROM:<>", f"RCPT TO:<b@{BOUNCES}>".encode(),
                     b"DATA"):
            c.send(line + b"\r\n")
            code, _ = c.reply()
            assert code in (250, 354), (line, code)
        conns.append(c)
    for c in conns:
        c.send(big + b"\r\n.\r\n")
    # the first is being read, the second waits, the third is one too many
    code, text = conns[2].reply()
    assert code == 451 and text[0].startswith("4.3.2"), (code, text)
    for c in conns[:2]:
        code, text = c.reply()
        assert code == 250, (code, text)
        c.close()
    conns[2].close()
    # A report whose delivery-status part starts beyond max_report_size is not read.
    late = dsn("late@sender.example.org", "late@example.com", "5.1.1", "550 5.1.1 unknown")
    late = late.replace(b"Your message could not be delivered.",
                        b"Your message could not be delivered.\r\n" * ((limit // 38) + 10))
    code, text = smtp_send(d, "", [f"bounces@{BOUNCES}"], late)
    assert code == 250, text
    d.wait_log(r"is not a DSN or ARF report", timeout=30)
    got = wait_until(lambda: events(d, events="out_of_band") or None, 60, "the DSN's event")
    assert [e["rcpt_to"] for e in got] == ["x@example.com", "x@example.com"], got
    def counts():
        status, _, body = d.admin_get("/metrics")
        assert status == 200
        got = {s.labels["kind"]: s.value
               for fam in text_string_to_metric_families(body.decode())
               for s in fam.samples if s.name == "mta_feedback_reports_total"}
        return got if got.get("unparsed") else None     # (pushed about once a second)
    assert wait_until(counts, 30, "the report counts in /metrics") == {
        "dsn": 2, "arf": 0, "unparsed": 1, "deferred": 1}


def test_an_acceptor_restarted_after_the_rules_file_is_broken_classifies_by_the_validated_rules(
        make_daemon, tmp_path):
    """The operator's bounce rules file is saved broken without a reload and the acceptor
    is killed (-9) and restarted: it read the operator's file itself at its first report
    and failed (the report was not taken).  Now it reads the supervisor's copy of the
    file it validated: the out-of-band bounce is classified by the operator's rule."""
    import signal

    rules = tmp_path / "bounce_rules.toml"
    rules.write_text('[[rule]]\nname = "lab-odd"\ncode = 550\n'
                     'text = "never seen"\nclass = 51\n')
    sink = AioSink(HOST, free_port()).start()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        feedback={"bounce_domains": [BOUNCES], "verp": "bounces",
                                  "bounce_rules": str(rules)},
                        delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                             "hosts": [f"{HOST}:{sink.port}"]}]})
        rules.write_text('[[rule]]\nname = "broken\n')
        old = d.children()["acceptor[0]"]
        os.kill(old, signal.SIGKILL)
        d.wait_restarted("acceptor[0]", old, timeout=20)
        qid = d.send("news@sender.example.org", ["reader@example.com"],
                     b"From: news@sender.example.org\r\nSubject: verp\r\n\r\nhello\r\n")
        t = sink.wait_for("reader@example.com")
        wait_until(lambda: events(d, recipients="reader@example.com", events="delivery"), 60,
                   "the delivery event")
        code, text = smtp_send(d, "", [t.mail_from],
                               dsn("", "reader@example.com", "5.0.0",
                                   "550 5.0.0 something never seen"))
        assert code == 250, text
        [oob] = wait_until(lambda: events(d, events="out_of_band"), 60, "the out_of_band event")
        assert oob["message_id"] == qid.lower(), oob
        assert (oob["bounce_class"], oob.get("bounce_rule")) == ("51", "lab-odd"), oob
    finally:
        sink.stop()
