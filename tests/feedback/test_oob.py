"""Out-of-band bounces and complaints become events that repeat the original message's fields."""
import pytest

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
     "queue_id": "0123456789ABCDEF0123", "ip_address": "127.0.0.9", "num_retries": "2"},
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
    # the receiving host and the attempts of the delivery it bounced after
    assert (ev["ip_address"], ev["num_retries"]) == ("127.0.0.9", "2")
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


def _arf_without_rcpt_to(to_field: bytes, rcpt_to_field: bytes = b"") -> bytes:
    data = ARF_REPORT.replace(b"Original-Rcpt-To: <Reader@receiver.test>\r\n", rcpt_to_field)
    data = data.replace(b"\nTo: <Reader@receiver.test>\r\n", b"\n" + to_field)
    assert data.count(b"Reader@receiver.test") == 0
    return data


def _originals(*rcpts: str) -> list[dict]:
    return [dict(e, rcpt_to=r.lower(), raw_rcpt_to=r) for r in rcpts for e in ORIGINAL]


@pytest.mark.parametrize("to_field,rcpt_to_field", [
    (b"To: redacted\r\n", b""),                              # Yahoo, Microsoft
    (b"To: <list@receiver.test>\r\n", b""),                  # sent to them by Cc or Bcc
    (b"To: <list@receiver.test>\r\n", b"Original-Rcpt-To: redacted\r\n")])
def test_a_complaint_without_its_recipient_suppresses_the_matched_originals(to_field,
                                                                            rcpt_to_field):
    r = reports.parse(_arf_without_rcpt_to(to_field, rcpt_to_field))
    events, suppress = oob.report_events(r, _originals("Reader@receiver.test"), Classifier(),
                                         now=1796200100.0)
    assert [a for a, _, _ in suppress] == ["Reader@receiver.test"]
    assert events[0]["rcpt_to"] == "reader@receiver.test" and events[0]["matched"] == "1"
    assert events[0]["campaign_id"] == "weekly"


def test_a_complaint_that_names_nobody_suppresses_nobody():
    # redacted, and the original went to two recipients: which one complained is unknown
    r = reports.parse(_arf_without_rcpt_to(b"To: redacted\r\n"))
    events, suppress = oob.report_events(
        r, _originals("Reader@receiver.test", "Other@receiver.test"), Classifier(), now=1.0)
    assert suppress == [] and len(events) == 1
    # not found: "redacted" is no address either
    events, suppress = oob.report_events(r, [], Classifier(), now=1.0)
    assert suppress == [] and events[0]["matched"] == "0"
    # two recipients, the To field names one of them: that one
    r = reports.parse(_arf_without_rcpt_to(b"To: <other@receiver.test>\r\n"))
    _, suppress = oob.report_events(
        r, _originals("Reader@receiver.test", "Other@receiver.test"), Classifier(), now=1.0)
    assert [a for a, _, _ in suppress] == ["other@receiver.test"]


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


def test_only_a_recipient_of_the_message_found_is_suppressed():
    # A report to a bounce domain comes from anyone, unauthenticated: a made-up DSN or
    # complaint naming addresses the message never went to (or naming a message not
    # found) put them all on the suppression list.
    dsn = reports.parse(POSTFIX_DSN.replace(b"gone@receiver.test", b"victim@else.test")
                        .replace(b"Gone@receiver.test", b"Victim@else.test"))
    events, suppress = oob.report_events(dsn, ORIGINAL, Classifier(), now=1.0)
    assert events and events[0]["rcpt_to"] == "victim@else.test" and suppress == []
    arf = reports.parse(ARF_REPORT)            # Original-Rcpt-To: Reader@receiver.test
    orig = [dict(e, rcpt_to="someone@receiver.test", raw_rcpt_to="someone@receiver.test")
            for e in ORIGINAL]
    events, suppress = oob.report_events(arf, orig, Classifier(), now=1.0)
    assert events and suppress == []
    # not found: nothing, unless feedback.suppress_unmatched
    for r in (reports.parse(POSTFIX_DSN), arf):
        events, suppress = oob.report_events(r, [], Classifier(), now=1.0)
        assert events[0]["matched"] == "0" and suppress == []
        _, suppress = oob.report_events(r, [], Classifier(), now=1.0, unmatched=True)
        assert [a.lower() for a, _, _ in suppress] in (["gone@receiver.test"],
                                                        ["reader@receiver.test"])


def test_a_dsn_whose_original_recipient_is_the_senders_orcpt_matches_its_final_recipient():
    # The client's ORCPT (the address before its own list or alias expansion) is passed
    # on to the next hop, whose DSN quotes it as Original-Recipient; the address the
    # message went to is the Final-Recipient.  The event is of that recipient, matched.
    dsn = reports.parse(POSTFIX_DSN.replace(b"Original-Recipient: rfc822;Gone@receiver.test",
                                            b"Original-Recipient: rfc822;team@sender.test"))
    events, suppress = oob.report_events(dsn, ORIGINAL, Classifier(), now=1796200100.0)
    assert len(events) == 1
    ev = events[0]
    assert ev["matched"] == "1" and ev["rcpt_to"] == "gone@receiver.test"
    assert ev["transmission_id"] == "42" and ev["campaign_id"] == "weekly"
    assert [a for a, _, _ in suppress] == ["gone@receiver.test"]


def test_a_complaint_about_a_utf8_message_reads_its_returned_header_fields_as_utf8():
    # The returned message of SMTPUTF8 mail (message/global, RFC 6532) has its header
    # fields in UTF-8: the To field names the complainer, the Subject and From are the
    # event's when the message is not found -- each octet was read as U+FFFD
    data = _arf_without_rcpt_to("To: <Jürgen@receiver.test>\r\n".encode())
    data = data.replace(b"Content-Type: message/rfc822", b"Content-Type: message/global")
    data = data.replace(b"Subject: Weekly news\r\nMessage-ID",
                        "Subject: Grüße\r\nMessage-ID".encode())
    data = data.replace(b"From: <news@sender.test>", "From: <nöws@sender.test>".encode())
    r = reports.parse(data)
    _, suppress = oob.report_events(
        r, _originals("Reader@receiver.test", "Jürgen@receiver.test"), Classifier(), now=1.0)
    assert [a for a, _, _ in suppress] == ["Jürgen@receiver.test"]
    events, _ = oob.report_events(r, [], Classifier(), now=1.0)
    assert events[0]["rcpt_to"] == "jürgen@receiver.test"
    assert events[0]["subject"] == "Grüße" and events[0]["friendly_from"] == "nöws@sender.test"


@pytest.mark.parametrize("fbtype", [b"not-spam", b"auth-failure"])
def test_an_arf_report_that_is_no_complaint_neither_suppresses_nor_counts_as_one(fbtype):
    # RFC 6430 not-spam: the recipient says the message is NOT spam; RFC 6591
    # auth-failure: a receiver's SPF/DKIM/DMARC failure report, nobody complained --
    # a spam_complaint event and a Spam Complaint suppression for them are wrong
    r = reports.parse(ARF_REPORT.replace(b"Feedback-Type: abuse", b"Feedback-Type: " + fbtype))
    orig = [dict(e, rcpt_to="reader@receiver.test", raw_rcpt_to="Reader@receiver.test")
            for e in ORIGINAL]
    events, suppress = oob.report_events(r, orig, Classifier(), now=1796200100.0)
    assert suppress == [] and [e["type"] for e in events] == []
    # the RFC 5965 complaint types are complaints
    for t in (b"abuse", b"fraud", b"virus", b"other"):
        r = reports.parse(ARF_REPORT.replace(b"Feedback-Type: abuse", b"Feedback-Type: " + t))
        events, suppress = oob.report_events(r, orig, Classifier(), now=1796200100.0)
        assert [e["type"] for e in events] == ["spam_complaint"] and len(suppress) == 1


def test_a_report_naming_a_recipient_in_a_labels_matches_its_u_label_original():
    """Mail to jo@bücher.test goes to a server without SMTPUTF8 as jo@xn--bcher-kva.test
    (the events keep the address as it was given): its bounce, and a DSN of ours read back,
    name the A-label form.  It is the same recipient: matched, and suppressed."""
    dsn = POSTFIX_DSN.replace(b"gone@receiver.test", b"gone@xn--bcher-kva.test") \
        .replace(b"Gone@receiver.test", b"Gone@xn--bcher-kva.test")
    assert b"gone@receiver" not in dsn.lower()
    r = reports.parse(dsn)
    events, suppress = oob.report_events(r, _originals("Gone@bücher.test"), Classifier(),
                                         now=1796200100.0)
    assert events[0]["matched"] == "1" and events[0]["campaign_id"] == "weekly"
    # (either form: the suppression list keeps a domain in A-labels and matches both)
    assert [a.lower() for a, _, _ in suppress] in (["gone@bücher.test"],
                                                   ["gone@xn--bcher-kva.test"])
