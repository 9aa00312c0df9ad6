"""Reading a report sent to a bounce domain (mta.acceptor.reports), in-process, with a real
events store: which original message is found, the events and suppression entries made."""
from __future__ import annotations

import pytest

from mta.acceptor import reports
from mta.feedback import Classifier
from mta.feedback import events_store as S
from mta.feedback import reports as rpt

T0 = 1_700_000_000
QID = "018c1a2b3c4d5e6f7a8b"


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def dsn(headers: str, status: str = "5.1.1", action: str = "failed",
        text: str = "user unknown") -> bytes:
    return crlf(f"""\
From: MAILER-DAEMON@mx.receiver.test
To: bounces@bounces.sender.test
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

failed
--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.receiver.test

Final-Recipient: rfc822; Gone@receiver.test
Action: {action}
Status: {status}
Diagnostic-Code: smtp; 550 {status} {text}

--B
Content-Type: text/rfc822-headers

{headers}
--B--
""")


def arf(mail_from: str) -> bytes:
    return crlf(f"""\
From: <fbl@provider.test>
To: <fbl@bounces.sender.test>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="P"

--P
Content-Type: text/plain

abuse report
--P
Content-Type: message/feedback-report

Feedback-Type: abuse
Version: 1
Original-Mail-From: <{mail_from}>
Original-Rcpt-To: <reader@receiver.test>

--P
Content-Type: text/rfc822-headers

Subject: News

--P--
""")


@pytest.fixture
def store(tmp_path):
    s = S.EventStore(str(tmp_path / "events"), map_size=1 << 26, retention=10 * 86400)
    common = {"timestamp": str(T0), "message_id": QID, "transmission_id": "42",
              "campaign_id": "spring", "message_id_header": "<orig@sender.test>",
              "recipient_domain": "receiver.test", "injection_time": "2023-11-14T22:13:20.000Z"}
    s.append([{**common, "type": "injection", "event_id": "1", "rcpt_to": "gone@receiver.test",
               "raw_rcpt_to": "Gone@receiver.test"},
              {**common, "type": "injection", "event_id": "2",
               "rcpt_to": "reader@receiver.test", "raw_rcpt_to": "reader@receiver.test"},
              {**common, "type": "delivery", "event_id": "3", "rcpt_to": "gone@receiver.test",
               "raw_rcpt_to": "Gone@receiver.test"}])
    yield s
    s.close()


def test_bounce_domains_are_matched_without_case_or_trailing_dot():
    domains = reports.normalize_domains([" Bounces.Sender.TEST. ", ""])
    assert domains == frozenset({"bounces.sender.test"})
    assert reports.bounce_domain("x+1@BOUNCES.sender.test", domains)
    assert reports.bounce_domain("x@bounces.sender.test.", domains)
    assert not reports.bounce_domain("x@sub.bounces.sender.test", domains)
    assert not reports.bounce_domain("x@bounces.sender.test", frozenset())


def test_verp_candidates_come_from_the_recipients_then_the_quoted_return_path():
    report = rpt.Report(kind=rpt.ARF, original_mail_from=f"bounces+{QID.upper()}@b.test")
    assert reports.verp_candidates(["bounces+00ff@b.test", "fbl@b.test"], report) == \
        ["00ff", QID]
    assert reports.verp_candidates(["bounces+not-hex@b.test"], None) == []


def test_a_dsn_quoting_the_message_id_matches_and_suppresses_the_hard_bounce(store):
    got = reports.read(dsn("Message-ID: <ORIG@sender.test>"), ["bounces@b.test"], store,
                       Classifier(), now=T0 + 60)
    assert (got.kind, got.matched, got.queue_id) == (rpt.DSN, True, QID)
    [e] = got.events
    assert e["type"] == "out_of_band" and e["timestamp"] == T0 + 60
    sp = e["event"]
    assert sp["type"] == "out_of_band" and sp["bounce_class"] == "10"
    assert (sp["transmission_id"], sp["campaign_id"], sp["message_id"]) == ("42", "spring", QID)
    assert sp["queue_time"] == "60000"
    assert got.suppress == [("Gone@receiver.test", "Bounce Rule",
                             "550: 550 5.1.1 user unknown")]


def test_a_dsn_to_a_verp_address_matches_without_a_message_id(store):
    got = reports.read(dsn("Subject: News", status="5.2.2", text="mailbox full"), [f"bounces+{QID.upper()}@b.test"],
                       store, Classifier(), now=T0 + 1)
    assert got.matched and got.events[0]["event"]["bounce_class"] == "22"
    assert got.suppress == []           # a soft class suppresses nothing


def test_an_arf_report_matches_by_its_original_return_path(store):
    got = reports.read(arf(f"bounces+{QID}@b.test"), ["fbl@b.test"], store, Classifier())
    assert got.kind == rpt.ARF and got.matched
    [e] = got.events
    assert e["event"]["type"] == "spam_complaint"
    assert e["event"]["rcpt_to"] == "reader@receiver.test"
    assert e["event"]["transmission_id"] == "42"
    assert got.suppress[0][:2] == ("reader@receiver.test", "Spam Complaint")


def test_no_store_or_no_match_still_gives_the_events_unmatched(store):
    got = reports.read(dsn("Message-ID: <other@sender.test>"), ["bounces@b.test"], None,
                       Classifier())
    assert got.kind == rpt.DSN and not got.matched and got.queue_id == ""
    assert got.events[0]["event"]["matched"] == "0"
    assert got.events[0]["event"]["message_id_header"] == "other@sender.test"
    got = reports.read(dsn("Message-ID: <other@sender.test>"), ["bounces@b.test"], store,
                       Classifier())
    assert not got.matched


def test_delayed_notices_and_non_reports_give_nothing(store):
    got = reports.read(dsn("Message-ID: <orig@sender.test>", status="4.4.1", action="delayed"),
                       ["bounces@b.test"], store, Classifier())
    assert got.kind == rpt.DSN and got.events == [] and got.suppress == []
    for junk in (b"", b"Subject: hi\r\n\r\nthanks!\r\n", b"\xff\xfe\x00garbage",
                 b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\n"):
        got = reports.read(junk, ["fbl@b.test"], store, Classifier())
        assert (got.kind, got.events, got.suppress) == ("", [], [])


def test_a_failing_store_matches_nothing():
    class Broken:
        def originals(self, **kw):
            raise OSError("damaged")
    got = reports.read(dsn("Message-ID: <orig@sender.test>"), ["bounces@b.test"], Broken(),
                       Classifier())
    assert got.kind == rpt.DSN and not got.matched and len(got.events) == 1


def test_a_report_about_one_recipient_of_a_message_with_many_finds_that_recipient(tmp_path):
    # An SMTP message of 1,000 recipients (smtp.max_recipients) has thousands of events
    # (injection, delivery, then its readers' opens): the report's recipient, who opened
    # nothing, was looked for among the message's newest 1,000 only (MAX_ORIGINAL_EVENTS),
    # so its bounce or complaint matched nothing and suppressed nobody
    s = S.EventStore(str(tmp_path / "events"), map_size=1 << 27, retention=10 * 86400)
    try:
        evs = []
        for i in range(1000):
            for n, kind in enumerate(("injection", "delivery", "open")):
                if kind == "open" and i < 2:
                    continue
                evs.append({"timestamp": str(T0 + n * 100 + i // 100), "type": kind,
                            "event_id": str(len(evs) + 1), "message_id": QID,
                            "transmission_id": "42", "campaign_id": "spring",
                            "rcpt_to": f"r{i}@receiver.test", "raw_rcpt_to": f"R{i}@receiver.test",
                            "injection_time": "2023-11-14T22:13:20.000Z"})
        s.append(evs)
        got = reports.read(dsn("Subject: News").replace(b"Gone@", b"R0@"),
                           [f"bounces+{QID}@b.test"], s, Classifier(), now=T0 + 300)
        assert got.matched
        assert got.events[0]["event"]["matched"] == "1"
        assert got.events[0]["event"]["campaign_id"] == "spring"
        assert [a for a, _, _ in got.suppress] == ["R0@receiver.test"]
        got = reports.read(arf(f"bounces+{QID}@b.test").replace(b"reader@", b"r1@"),
                           ["fbl@b.test"], s, Classifier(), now=T0 + 300)
        assert [a for a, _, _ in got.suppress] == ["r1@receiver.test"]
        assert got.events[0]["event"]["matched"] == "1"
    finally:
        s.close()
