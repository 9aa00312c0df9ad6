"""Delivery status notifications (mta.dsn): built, then read back with the stdlib parser."""
import email
import email.policy
import email.utils
import re

import pytest

from mta import dsn
from mta.dsn import (MAX_LINE, RecipientFailure, build_dsn, dsn_status,
                              needs_smtputf8, original_headers, quoted_printable)

NOW = 1_790_000_000.0  # 2026-09-21
ORIGINAL = (b"Return-Path: <alice@sender.test>\r\n"
            b"From: Alice <alice@sender.test>\r\n"
            b"To: bob@rcpt.test, carol@rcpt.test\r\n"
            b"Subject: Quarterly numbers\r\n"
            b"Message-ID: <orig-1@sender.test>\r\n"
            b"Date: Mon, 21 Sep 2026 10:00:00 +0000\r\n"
            b"\r\n"
            b"The body is never returned.\r\n")


def failures():
    return [
        RecipientFailure("bob@rcpt.test", "5.1.1", "mx1.rcpt.test",
                         "550 5.1.1 <bob@rcpt.test>: Recipient address rejected", NOW - 5),
        RecipientFailure("carol@rcpt.test", None, "mx2.rcpt.test",
                         "552-5.2.2 Mailbox full\r\n552 5.2.2 Try again much later", NOW - 3),
        RecipientFailure("dave@rcpt.test", None, None,
                         "Host or domain name not found (NXDOMAIN)", NOW - 1),
    ]


def make(**kw):
    args = dict(original=ORIGINAL, envelope_sender="alice@sender.test", failed=failures(),
                reporting_mta="mta.sender.test", arrival_time=NOW - 600, queue_id="18A3F2C4B1D2E03000A1",
                now=NOW)
    args.update(kw)
    return build_dsn(**args)


def parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def assert_wire_clean(raw):
    """CRLF line ends only, no line over 998 octets, a final CRLF."""
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", raw) is None, "bare CR"
    assert raw.endswith(b"\r\n")
    assert max(len(line) for line in raw.split(b"\r\n")) <= MAX_LINE


def status_blocks(msg):
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    return blocks[0], blocks[1:]


def test_structure_and_top_level_headers():
    raw = make()
    assert_wire_clean(raw)
    assert raw.isascii() and not needs_smtputf8(raw)
    msg = parse(raw)
    assert msg.is_multipart()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    frm = msg["From"].addresses[0]
    assert (frm.display_name, frm.addr_spec) == ("Mail Delivery System",
                                                 "MAILER-DAEMON@mta.sender.test")
    assert msg["To"].addresses[0].addr_spec == "alice@sender.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    mid = msg["Message-ID"]
    assert mid.startswith("<18A3F2C4B1D2E03000A1.") and mid.endswith("@mta.sender.test>")


def test_delivery_status_fields():
    per_msg, rcpts = status_blocks(parse(make(envid="ENV-42")))
    assert per_msg["Reporting-MTA"] == "dns; mta.sender.test"
    assert per_msg["X-Queue-ID"] == "18A3F2C4B1D2E03000A1"
    assert per_msg["Original-Envelope-Id"] == "ENV-42"
    assert email.utils.parsedate_to_datetime(per_msg["Arrival-Date"]).timestamp() == NOW - 600
    assert len(rcpts) == 3
    bob, carol, dave = rcpts
    assert bob["Final-Recipient"] == "rfc822; bob@rcpt.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.rcpt.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@rcpt.test>: Recipient address rejected"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 5
    # enhanced code taken from the reply; the multi-line reply joined on one line
    assert carol["Status"] == "5.2.2"
    assert carol["Diagnostic-Code"] == "smtp; 552 5.2.2 Mailbox full Try again much later"
    # no remote host, no SMTP reply: our own reason, class from the action
    assert dave["Status"] == "5.0.0"
    assert dave["Remote-MTA"] is None
    assert dave["Diagnostic-Code"] == "x-local; Host or domain name not found (NXDOMAIN)"


def test_human_part_names_each_recipient():
    text = parse(make()).get_payload()[0].get_content()
    for needle in ("bob@rcpt.test", "mx1.rcpt.test", "550 5.1.1 <bob@rcpt.test>: Recipient",
                   "carol@rcpt.test", "mx2.rcpt.test", "dave@rcpt.test", "NXDOMAIN",
                   "mta.sender.test"):
        assert needle in text


def test_headers_part_is_the_original_header_block():
    part = parse(make()).get_payload()[2]
    got = part.get_content()
    assert "Subject: Quarterly numbers" in got
    assert "Message-ID: <orig-1@sender.test>" in got
    assert "never returned" not in got
    assert got.splitlines() == ORIGINAL.split(b"\r\n\r\n")[0].decode().split("\r\n")


@pytest.mark.parametrize("status,diagnostic,action,want", [
    ("5.7.1", "550 5.1.1 whatever", "failed", "5.7.1"),  # the given enhanced code wins
    (None, "550 5.7.1 Relaying denied", "failed", "5.7.1"),
    (None, "552 Requested mail action aborted", "failed", "5.0.0"),
    ("550", "user unknown", "failed", "5.0.0"),
    ("", "451 4.3.0 Temporary failure", "delayed", "4.3.0"),
    (None, "421 Service not available", "delayed", "4.0.0"),
    (None, "connection timed out", "delayed", "4.0.0"),
    (None, "", "failed", "5.0.0"),
    ("4.4.7", "", "failed", "4.4.7"),  # expired after transient failures: kept as it was
])
def test_status_derivation(status, diagnostic, action, want):
    assert dsn_status(status, diagnostic, action) == want


def test_delay_notice():
    f = [RecipientFailure("bob@rcpt.test", "4.2.1", "mx1.rcpt.test", "450 4.2.1 Try later",
                          NOW - 5, retry_until=NOW + 5 * 86400)]
    raw = make(failed=f, delayed=True)
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg["Subject"].startswith("Delayed Mail")
    _, (bob,) = status_blocks(msg)
    assert bob["Action"] == "delayed" and bob["Status"] == "4.2.1"
    assert email.utils.parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp() == NOW + 5 * 86400


def test_no_last_attempt_date_for_a_recipient_never_tried():
    f = failures()
    f[2].last_attempt = None           # expired (or bounced by the operator) untried
    raw = make(failed=f)
    assert_wire_clean(raw)
    _, (bob, carol, dave) = status_blocks(parse(raw))
    assert bob["Last-Attempt-Date"] and carol["Last-Attempt-Date"]
    assert "Last-Attempt-Date" not in dave


def test_utf8_original_headers_stay_7bit_and_round_trip():
    original = (b"From: =?utf-8?q?J=C3=BCrgen?= <j@sender.test>\r\n"
                b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x80\x94 \xf0\x9f\x93\xa8\r\n"
                b"Message-ID: <utf8@sender.test>\r\n\r\nK\xc3\xb6rper\r\n")
    raw = make(original=original)
    assert_wire_clean(raw)
    assert raw.isascii()
    part = parse(raw).get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_content_charset() == "utf-8"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == original.split(b"\r\n\r\n")[0] + b"\r\n"
    assert "Subject: Grüße aus Köln — 📨" in part.get_content()


def test_invalid_8bit_headers_are_unknown_8bit_and_round_trip():
    original = b"Subject: caf\xe9 \xff\xfe\r\nMessage-ID: <latin1@sender.test>\r\n\r\nbody"
    raw = make(original=original)
    assert_wire_clean(raw)
    assert raw.isascii()
    part = parse(raw).get_payload()[2]
    assert part.get_content_charset() == "unknown-8bit"
    assert part.get_payload(decode=True) == original.split(b"\r\n\r\n")[0] + b"\r\n"


def test_overlong_header_line_is_folded_by_quoted_printable():
    original = b"Subject: " + b"x" * 3000 + b"\r\nMessage-ID: <long@sender.test>\r\n\r\nbody\r\n"
    raw = make(original=original)
    assert_wire_clean(raw)
    part = parse(raw).get_payload()[2]
    assert part.get_payload(decode=True) == original.split(b"\r\n\r\n")[0] + b"\r\n"


def test_long_diagnostic_is_folded():
    reply = "550 5.7.1 " + " ".join(["blocked"] * 300) + " " + "y" * 2500
    f = [RecipientFailure("bob@rcpt.test", None, "mx1.rcpt.test", reply, NOW)]
    raw = make(failed=f)
    assert_wire_clean(raw)
    _, (bob,) = status_blocks(parse(raw))
    diag = bob["Diagnostic-Code"]
    assert diag.startswith("smtp; 550 5.7.1 blocked blocked")
    assert diag.replace(" ", "") == ("smtp;" + reply).replace(" ", "")


def test_header_block_without_blank_line_or_with_bare_lf():
    assert original_headers(b"Subject: only headers\r\nX-A: 1") == \
        b"Subject: only headers\r\nX-A: 1\r\n"
    assert original_headers(b"Subject: lf\nX-B: 2\n\nbody\n") == b"Subject: lf\r\nX-B: 2\r\n"
    assert original_headers(b"\r\nbody only") == b""
    raw = make(original=b"Subject: lf only\nMessage-ID: <lf@sender.test>\n\nbody\n")
    assert_wire_clean(raw)
    assert "Message-ID: <lf@sender.test>" in parse(raw).get_payload()[2].get_content()
    raw = make(original=b"")
    assert_wire_clean(raw)


def test_no_header_injection_from_addresses_or_replies():
    f = [RecipientFailure("bob@rcpt.test\r\nBcc: victim@x.test", None, "mx\r\nX-Evil: 1",
                          "550 no\r\nX-Evil: 2\r\n\r\nBody-Smuggle: 3", NOW)]
    raw = make(failed=f, envelope_sender="alice@sender.test\r\nBcc: victim@x.test")
    assert_wire_clean(raw)
    msg = parse(raw)
    assert msg["Bcc"] is None
    _, rcpts = status_blocks(msg)
    assert len(rcpts) == 1
    assert rcpts[0]["X-Evil"] is None and rcpts[0]["Body-Smuggle"] is None


def test_utf8_addresses_make_a_global_dsn():
    f = [RecipientFailure("jürgen@bücher.test", "5.1.1", "mx.xn--bcher-kva.test",
                          "550 5.1.1 unknown", NOW, original_recipient="utf-8;jürgen@bücher.test")]
    raw = make(failed=f, envelope_sender="álvaro@sender.test")
    assert_wire_clean(raw)
    assert needs_smtputf8(raw)
    assert b"Content-Type: message/global-delivery-status" in raw
    assert "Final-Recipient: utf-8; jürgen@bücher.test".encode() in raw
    assert "Original-Recipient: utf-8;jürgen@bücher.test".encode() in raw
    assert b"Content-Type: message/global-headers" in raw
    assert b"Subject: Quarterly numbers" in raw
    assert "To: <álvaro@sender.test>\r\n".encode() in raw
    assert parse(raw).get_content_type() == "multipart/report"


def test_a_non_ascii_original_recipient_keeps_a_notice_7bit_as_utf8_addr_xtext():
    # RFC 6533 3: utf-8-addr-xtext in a 7-bit notice; its addresses alone decide
    # whether the notice must be a global one (sent only with SMTPUTF8)
    f = [RecipientFailure("jw@rcpt.test", "5.1.1", "mx.rcpt.test", "550 5.1.1 unknown", NOW,
                          original_recipient="utf-8; jürgen+x=1@bücher.test")]
    raw = make(failed=f)
    assert_wire_clean(raw)
    assert raw.isascii() and not needs_smtputf8(raw)
    _, (r,) = status_blocks(parse(raw))
    assert r["Original-Recipient"] == r"utf-8; j\x{FC}rgen\x{2B}x\x{3D}1@b\x{FC}cher.test"
    assert r["Final-Recipient"] == "rfc822; jw@rcpt.test"


def test_original_recipient_and_orcpt_type():
    f = [RecipientFailure("bob@rcpt.test", "5.1.1", None, "550 5.1.1 no", NOW,
                          original_recipient="rfc822;Bob@Rcpt.test")]
    _, (bob,) = status_blocks(parse(make(failed=f)))
    assert bob["Original-Recipient"] == "rfc822;Bob@Rcpt.test"


def test_refusals():
    with pytest.raises(ValueError):
        make(envelope_sender="")  # never bounce a bounce
    with pytest.raises(ValueError):
        make(envelope_sender="<>")
    with pytest.raises(ValueError):
        make(failed=[])
    with pytest.raises(ValueError):
        make(failed=[RecipientFailure("b@r.test", None, None, "x", NOW, action="lost")])
    with pytest.raises(ValueError):
        make(reporting_mta="bad host")


def test_quoted_printable():
    assert quoted_printable(b"a=b \t\r\nend \r\n") == b"a=3Db =09\r\nend=20\r\n"
    long = quoted_printable(b"z" * 200 + b"\r\n")
    assert all(len(line) <= 76 for line in long.split(b"\r\n"))


# -- RFC 3461 parameters ---------------------------------------------------------------------

@pytest.mark.parametrize("value, want", [
    ("NEVER", "NEVER"), ("never", "NEVER"), ("delay,Success", "SUCCESS,DELAY"),
    ("FAILURE", "FAILURE"), ("SUCCESS,FAILURE,DELAY", "SUCCESS,FAILURE,DELAY"),
    ("NEVER,FAILURE", None), ("FAILURE,NEVER", None), ("SOMETIMES", None), ("", None),
    ("SUCCESS,SUCCESS", None), ("SUCCESS,", None)])
def test_parse_notify(value, want):
    assert dsn.parse_notify(value) == want


@pytest.mark.parametrize("value, ok", [
    ("rfc822;a@b.test", True), ("rfc822;a+2Bb@b.test", True), ("RFC822;x", True),
    ("a@b.test", False), ("rfc822;", False), (";a@b.test", False), ("rfc822;a+b@c", False),
    ("rfc822;a=b", False), ("rfc822;a+2", False), ("rfc822;a+ZZ", False),
    ("rfc822;" + "a" * 500, False)])
def test_parse_orcpt(value, ok):
    assert (dsn.parse_orcpt(value) == value) is ok


def test_xtext_round_trip_and_envid_ret():
    for text in ("plain", "a+b=c", "sp ace", "tab\there", "jörg"):
        enc = dsn.xtext_encode(text)
        assert dsn.valid_xtext(enc) and dsn.xtext_decode(enc) == text
    assert dsn.xtext_encode("a+b=c") == "a+2Bb+3Dc"
    assert dsn.orcpt_text("rfc822;A+2Bb@x.test") == "rfc822; A+b@x.test"
    assert dsn.parse_envid("E" * 100) and dsn.parse_envid("E" * 101) is None
    assert dsn.parse_envid("") is None and dsn.parse_envid("a=b") is None
    assert dsn.parse_ret("hdrs") == "HDRS" and dsn.parse_ret("FULL") == "FULL"
    assert dsn.parse_ret("ALL") is None


def test_notify_allows():
    assert dsn.notify_allows("", "FAILURE") and dsn.notify_allows("", "DELAY")
    assert not dsn.notify_allows("", "SUCCESS")
    assert not dsn.notify_allows("NEVER", "FAILURE")
    assert dsn.notify_allows("SUCCESS,DELAY", "DELAY")
    assert not dsn.notify_allows("SUCCESS,DELAY", "FAILURE")


def test_success_notice_and_ret_full():
    r = RecipientFailure(recipient="a@x.test", status="2.0.0", remote_host="mx.x.test",
                         diagnostic="250 2.0.0 ok", last_attempt=0.0, action="relayed")
    out = build_dsn(original=b"Subject: s\r\n\r\nbody\r\n", envelope_sender="s@y.test",
                    failed=[r], reporting_mta="mta.test", arrival_time=0.0, queue_id="Q",
                    ret_full=True)
    assert b"Subject: Successful Mail Delivery Report" in out
    assert b"text/rfc822-headers" in out and b"body" not in out   # never the content
    r.action, r.status = "failed", "5.1.1"
    out = build_dsn(original=b"Subject: s\r\n\r\nbody\r\n", envelope_sender="s@y.test",
                    failed=[r], reporting_mta="mta.test", arrival_time=0.0, queue_id="Q",
                    ret_full=True)
    assert b"Content-Type: message/rfc822\r\n\r\nSubject: s\r\n\r\nbody\r\n\r\n--" in out
    big = b"Subject: s\r\n\r\n" + b"x" * (dsn.MAX_RETURNED_MESSAGE + 1)
    out = build_dsn(original=big, envelope_sender="s@y.test", failed=[r],
                    reporting_mta="mta.test", arrival_time=0.0, queue_id="Q", ret_full=True)
    assert b"message/rfc822" not in out and b"text/rfc822-headers" in out


def test_idn_domains_with_ascii_local_parts_keep_a_notice_7bit():
    # A U-label domain has an ASCII form: the notice names the addresses in A-labels and
    # stays 7-bit, so a sender's server without SMTPUTF8 takes it (a global notice
    # would have needed SMTPUTF8 there only for these domains).
    f = [RecipientFailure("jo@bücher.test", "5.1.1", "mx.xn--bcher-kva.test",
                          "550 5.1.1 unknown", NOW)]
    raw = make(failed=f, envelope_sender="alvaro@bäckerei.test")
    assert_wire_clean(raw)
    assert raw.isascii() and not needs_smtputf8(raw)
    msg = parse(raw)
    assert msg["To"].addresses[0].addr_spec == "alvaro@xn--bckerei-5wa.test"
    _, (r,) = status_blocks(msg)
    assert r["Final-Recipient"] == "rfc822; jo@xn--bcher-kva.test"
    # ... a UTF-8 local part has none: that notice is still a global one
    f.append(RecipientFailure("jörg@bücher.test", "5.1.1", None, "550 5.1.1 unknown", NOW))
    raw = make(failed=f, envelope_sender="alvaro@bäckerei.test")
    assert needs_smtputf8(raw) and "Final-Recipient: utf-8; jörg@bücher.test".encode() in raw
    assert b"Final-Recipient: rfc822; jo@xn--bcher-kva.test" in raw
