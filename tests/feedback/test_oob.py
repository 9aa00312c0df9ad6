"""Out-of-band bounces and complaints become events that repeat the original message's fields."""
from mta.feedback import oob, reports
from mta.feedback.classify import Classifier

from tests.feedback.test_reports import ARF_REPORT, POSTFIX_DSN

ORIGINAL = [
    {"type": "injection", "rcpt_to": "gone@receiver.test", "raw_rcpt_to": "Gone@receiver.test",
     "message_id": "0123456789abcdef0123", "transmission_id": "42", "campaign_id": "weekly",
     "rcpt_meta": {"user": "7"}, "rcpt_tags": ["news"], "ip_pool": "marketing",
     "msg_from": "bounces@bounce.sender.test", "timestamp": "1796200000",
     "injection_time": "2026-12-02T10:00:00.000Z", "queue_id": "0123456789ABCDEF0123"},
    {"type": "delivery", "rcpt_to": "gone@receiver.test", "raw_rcpt_to": "Gone@receiver.test",
     "message_id": "0123456789abcdef0123", "transmission_id": "42", "campaign_id": "weekly",
     "rcpt_meta": {"user": "7"}, "rcpt_tags": ["news"], "ip_pool": "marketing",
     "sending_ip": "127.0.0.5", "msg_from": "bounces@bounce.sender.test",
     "timestamp": "1796200001", "injection_time": "2026-12-02T10:00:00.000Z",
     "queue_id": "0123456789ABCDEF0123"},
]


def test_a_failed_dsn_recipient_is_an_out_of_band_event_of_the_original_message():
    r = reports.parse(POSTFIX_DSN)
    events, suppress = oob.report_events(r, ORIGINAL, Classifier(), now=1796200100.0)
    assert len(events) == 1           # the "delayed" block is not a bounce
    ev = events[0]
    assert ev["type"] == "out_of_band"
    assert ev["rcpt_to"] == "gone@receiver.test"
    assert ev["message_id"] == "0123456789abcdef0123"
    assert ev["transmission_id"] == "42" and ev["campaign_id"] == "weekly"
    assert ev["rcpt_meta"] == {"user": "7"} and ev["rcpt_tags"] == ["news"]
    assert ev["sending_ip"] == "127.0.0.5" and ev["ip_pool"] == "marketing"
    assert ev["bounce_class"] == "10" and ev["error_code"] == "550"
    assert ev["raw_reason"].startswith("550 5.1.1 <gone@receiver.test>")
    assert ev["matched"] == "1"
    assert ev["timestamp"] == "1796200100"
    assert suppress == [("Gone@receiver.test", oob.BOUNCE_SOURCE, suppress[0][2])]
    assert suppress[0][2].startswith("550: 550 5.1.1")


def test_an_unmatched_report_still_gives_its_event_with_what_the_report_says():
    r = reports.parse(POSTFIX_DSN)
    events, _ = oob.report_events(r, [], Classifier(), now=1796200100.0)
    ev = events[0]
    assert ev["matched"] == "0"
    assert ev["message_id_header"] == "orig-1@sender.test"
    assert ev["subject"] == "Weekly news"
    assert "message_id" not in ev


def test_an_arf_report_is_a_spam_complaint_and_suppresses_the_address():
    r = reports.parse(ARF_REPORT)
    orig = [dict(e, rcpt_to="reader@receiver.test", raw_rcpt_to="Reader@receiver.test")
            for e in ORIGINAL]
    events, suppress = oob.report_events(r, orig, Classifier(), now=1796200100.0)
    assert [e["type"] for e in events] == ["spam_complaint"]
    ev = events[0]
    assert ev["fbtype"] == "abuse" and ev["report_by"] == "staff@fbl.provider.test"
    assert ev["report_to"] == "fbl@bounce.sender.test"
    assert ev["campaign_id"] == "weekly" and ev["message_id"] == "0123456789abcdef0123"
    assert suppress == [("Reader@receiver.test", oob.SPAM_SOURCE, suppress[0][2])]


def test_a_soft_out_of_band_bounce_does_not_suppress():
    data = POSTFIX_DSN.replace(b"Status: 5.1.1", b"Status: 5.2.2").replace(
        b"550 5.1.1 <gone@receiver.test>: Recipient address\r\n"
        b"    rejected: User unknown in local recipient table",
        b"552 5.2.2 <gone@receiver.test>: mailbox full")
    assert data != POSTFIX_DSN
    r = reports.parse(data)
    events, suppress = oob.report_events(r, ORIGINAL, Classifier(), now=1.0)
    assert events[0]["bounce_class"] != "10" and suppress == []


def test_verp_queue_id():
    assert oob.verp_queue_id("bounces+0123ABCD@bounce.sender.test") == "0123abcd"
    assert oob.verp_queue_id("bounces@bounce.sender.test") == ""
    assert oob.verp_queue_id("bounces+xyz@bounce.sender.test") == ""
