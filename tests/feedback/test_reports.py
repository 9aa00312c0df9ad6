"""The report parser: asynchronous DSNs (RFC 3464) and ARF complaints (RFC 5965).

The samples are written here in the shapes the RFCs define and the large
receivers send (Postfix-style and Exchange-style DSNs, a Yahoo/Microsoft-style
ARF report), including the malformed variations that occur in practice.
"""
import pytest

from mta.feedback import reports
from mta.feedback.classify import Classifier
from mta.idn import ascii_address

CRLF = "\r\n"


def msg(text: str) -> bytes:
    return text.replace("\n", CRLF).encode()


POSTFIX_DSN = msg("""\
From: MAILER-DAEMON@mx.receiver.test (Mail Delivery System)
To: bounces@bounce.sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="B1"

--B1
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--B1
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.receiver.test
X-Postfix-Queue-ID: 4ABCD
Arrival-Date: Wed,  2 Dec 2026 10:00:00 +0000 (UTC)

Final-Recipient: rfc822; gone@receiver.test
Original-Recipient: rfc822;Gone@receiver.test
Action: failed
Status: 5.1.1
Remote-MTA: dns; inbox.receiver.test
Diagnostic-Code: smtp; 550 5.1.1 <gone@receiver.test>: Recipient address
    rejected: User unknown in local recipient table

Final-Recipient: rfc822; slow@receiver.test
Action: delayed
Status: 4.4.1
Diagnostic-Code: X-Postfix; connect to inbox.receiver.test timed out

--B1
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <bounces+abc@bounce.sender.test>
Message-ID: <orig-1@sender.test>
From: News <news@sender.test>
To: gone@receiver.test
Subject: Weekly news

--B1--
""")


ARF_REPORT = msg("""\
From: <staff@fbl.provider.test>
Date: Wed, 2 Dec 2026 11:00:00 +0000
Subject: FW: Weekly news
To: <fbl@bounce.sender.test>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
192.0.2.10 on Wed, 2 Dec 2026 10:00:00 +0000.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <bounces+abc@bounce.sender.test>
Original-Rcpt-To: <Reader@receiver.test>
Arrival-Date: Wed, 2 Dec 2026 10:00:00 +0000
Reporting-MTA: dns; mail.provider.test
Source-IP: 192.0.2.10
Reported-Domain: sender.test
Authentication-Results: mail.provider.test; spf=pass smtp.mail=sender.test

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

From: <news@sender.test>
Received: from mta1.sender.test (192.0.2.10) by mail.provider.test
To: <Reader@receiver.test>
Subject: Weekly news
Message-ID: <orig-2@sender.test>
Date: Wed, 2 Dec 2026 09:59:00 +0000

Hello.
--part1_13d.2e68ed54_boundary--
""")


def test_a_postfix_dsn_gives_each_recipient_block():
    r = reports.parse(POSTFIX_DSN)
    assert r is not None and r.kind == reports.DSN
    assert r.reporting_mta == "mx.receiver.test"
    assert [x.final_recipient for x in r.recipients] == ["gone@receiver.test", "slow@receiver.test"]
    gone, slow = r.recipients
    assert gone.failed and not slow.failed
    assert gone.original_recipient == "Gone@receiver.test"
    assert gone.status == "5.1.1"
    assert gone.remote_mta == "inbox.receiver.test"
    # The folded Diagnostic-Code is one line, its type prefix removed.
    assert gone.diagnostic.startswith("550 5.1.1 <gone@receiver.test>: Recipient address rejected")
    assert gone.diagnostic.endswith("User unknown in local recipient table")
    assert slow.action == "delayed" and slow.status == "4.4.1"
    # The returned headers identify the original message.
    assert r.message_id == "orig-1@sender.test"
    assert r.subject == "Weekly news"
    assert r.header_from == "news@sender.test"
    assert r.original_mail_from == "bounces+abc@bounce.sender.test"
    assert r.report_to == "bounces@bounce.sender.test"


def test_a_dsn_recipient_is_classified_from_its_diagnostic():
    r = reports.parse(POSTFIX_DSN)
    code, enhanced, text = reports.status_code(r.recipients[0])
    assert (code, enhanced) == (550, "5.1.1")
    cls, rule = Classifier().classify(code, enhanced, text)
    assert cls == 10, rule       # Invalid Recipient


def test_status_without_a_reply_code_decides_the_code():
    rec = reports.ReportedRecipient(final_recipient="a@b", action="failed", status="5.2.2",
                                    diagnostic="mailbox full")
    assert reports.status_code(rec)[:2] == (550, "5.2.2")
    rec = reports.ReportedRecipient(final_recipient="a@b", action="failed", status="",
                                    diagnostic="")
    assert reports.status_code(rec)[0] == 550


def test_an_arf_report_gives_the_complaint():
    r = reports.parse(ARF_REPORT)
    assert r is not None and r.kind == reports.ARF
    assert r.feedback_type == "abuse"
    assert r.user_agent == "SomeGenerator/1.0"
    assert r.source_ip == "192.0.2.10"
    assert r.reported_domain == "sender.test"
    assert r.original_mail_from == "bounces+abc@bounce.sender.test"
    assert r.original_rcpt_to == ["Reader@receiver.test"]
    assert r.message_id == "orig-2@sender.test"
    assert r.subject == "Weekly news"
    assert r.report_from == "staff@fbl.provider.test"
    assert r.recipients == []


def test_a_dsn_without_a_per_message_block_and_base64_encoded():
    import base64
    status = ("Final-Recipient: rfc822;x@r.test\r\nAction: failed\r\nStatus: 5.7.1\r\n"
              "Diagnostic-Code: smtp;554 5.7.1 blocked\r\n")
    body = base64.b64encode(status.encode()).decode()
    data = msg(f"""\
From: postmaster@r.test
To: b@bounce.sender.test
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary=X

--X
Content-Type: text/plain

failed
--X
Content-Type: message/delivery-status
Content-Transfer-Encoding: base64

{body}
--X--
""")
    r = reports.parse(data)
    assert r is not None and [x.final_recipient for x in r.recipients] == ["x@r.test"]
    assert r.recipients[0].diagnostic == "554 5.7.1 blocked"
    assert r.message_id == ""


@pytest.mark.parametrize("ctype", ["message/delivery-status",
                                   "message/global-delivery-status"])
def test_a_quoted_printable_delivery_status_gives_every_block(ctype):
    # A global DSN (RFC 6533: UTF-8, so a transfer encoding on a 7-bit path) or any
    # delivery-status part in quoted-printable: its blank lines stay blank, so the email
    # package reads its groups as header blocks, the encoded text is not one body
    status = """\
Reporting-MTA: dns; mx.r.test

Final-Recipient: utf-8; j=C3=BCrgen@r.test
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <j=C3=BCrgen@r.test>: the mailbox does not exist=
 here, no such user

Final-Recipient: rfc822; x@r.test
Action: failed
Status: 5.2.2
Diagnostic-Code: smtp; 552 5.2.2 over quota
"""
    data = msg(f"""\
From: postmaster@r.test
To: b@bounce.sender.test
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary=X

--X
Content-Type: text/plain

failed
--X
Content-Type: {ctype}
Content-Transfer-Encoding: quoted-printable

{status}
--X--
""")
    r = reports.parse(data)
    assert r is not None and r.reporting_mta == "mx.r.test"
    assert [(x.final_recipient, x.action, x.status) for x in r.recipients] == [
        ("jürgen@r.test", "failed", "5.1.1"), ("x@r.test", "failed", "5.2.2")]
    assert r.recipients[0].diagnostic == \
        "550 5.1.1 <jürgen@r.test>: the mailbox does not exist here, no such user"


@pytest.mark.parametrize("cte", ["base64", "quoted-printable"])
@pytest.mark.parametrize("ctype", ["message/global-headers", "message/global"])
def test_returned_global_headers_in_a_transfer_encoding_are_decoded(ctype, cte):
    # message/global and message/global-headers (RFC 6532, 6533) may be sent in base64
    # or quoted-printable: their Message-ID (the match to our message when no VERP
    # address names it) and To were read from the encoded text, i.e. not at all
    import base64
    import quopri
    headers = "Message-ID: <orig-9@sender.test>\r\nTo: <jürgen@r.test>\r\n" \
        "Subject: Grüße\r\n\r\n".encode()
    body = base64.encodebytes(headers) if cte == "base64" else quopri.encodestring(headers)
    data = POSTFIX_DSN.split(b"--B1\r\nContent-Description: Undelivered Message Headers")[0]
    data += (f"--B1\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
             .encode() + body.replace(b"\n", b"\r\n").replace(b"\r\r", b"\r")
             + b"\r\n--B1--\r\n")
    r = reports.parse(data)
    assert r is not None and len(r.recipients) == 2
    assert (r.message_id, r.header_to, r.subject) == ("orig-9@sender.test", "jürgen@r.test",
                                                     "Grüße")


@pytest.mark.parametrize("data", [
    b"",
    b"From: a@b\r\nSubject: out of office\r\n\r\nI am away.\r\n",
    msg("From: a@b\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=Q\n\n--Q\n"
        "Content-Type: text/plain\n\nhi\n--Q--\n"),
    # A report with a delivery-status part that names no recipient.
    msg("MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; "
        "boundary=Q\n\n--Q\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n--Q--\n"),
    # Broken MIME: no closing boundary, garbage.
    msg("MIME-Version: 1.0\nContent-Type: multipart/report; boundary=\n\n\x00\x01--"),
    bytes(range(256)) * 4,
])
def test_what_is_not_a_report_gives_none(data):
    assert reports.parse(data) is None


def test_sizes_are_bounded():
    blocks = "".join(f"Final-Recipient: rfc822; u{i}@r.test\nAction: failed\nStatus: 5.1.1\n\n"
                     for i in range(reports.MAX_RECIPIENTS + 500))
    data = msg("MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; "
               f"boundary=Q\n\n--Q\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n"
               f"{blocks}--Q--\n")
    r = reports.parse(data)
    assert r is not None and len(r.recipients) == reports.MAX_RECIPIENTS
    long = "x" * 10_000
    data = msg("MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; "
               "boundary=Q\n\n--Q\nContent-Type: message/delivery-status\n\n"
               f"Final-Recipient: rfc822; a@r.test\nAction: failed\nDiagnostic-Code: smtp; {long}\n\n--Q--\n")
    r = reports.parse(data)
    assert len(r.recipients[0].diagnostic) <= reports.MAX_FIELD


def test_a_crafted_content_type_costs_no_more_than_its_size():
    """A Content-Type of thousands of parameters, or of one unclosed quote before
    thousands of ';', folded into short lines: the email package reads its parameters
    in time quadratic in its length (a 100 kB one took ~10 s, 1 MiB a quarter of an
    hour of a report reader); only MAX_FIELD characters of a field are read."""
    import time
    dsn = ("--Q\nContent-Type: message/delivery-status\n\n"
           "Final-Recipient: rfc822; a@r.test\nAction: failed\nStatus: 5.1.1\n\n--Q--\n")
    for params in (";\n a=b" * 15_000, '; a="' + (";\n " + ";" * 76) * 1300):
        data = msg("MIME-Version: 1.0\nContent-Type: multipart/report; "
                   f"report-type=delivery-status; boundary=Q{params}\n\n{dsn}")
        took = time.process_time()
        reports.parse(data)
        assert time.process_time() - took < 1.0, len(data)
    # A part's own header, inside the report, likewise.
    data = msg("MIME-Version: 1.0\nContent-Type: multipart/report; "
               "report-type=delivery-status; boundary=Q\n\n--Q\n"
               'Content-Type: multipart/mixed; boundary=R; a="' + (";\n " + ";" * 76) * 1300
               + f"\n\n--R--\n{dsn}")
    took = time.process_time()
    reports.parse(data)
    assert time.process_time() - took < 1.0


def _mutations():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def check(data):
        base = data.draw(st.sampled_from([POSTFIX_DSN, ARF_REPORT]))
        cut = data.draw(st.integers(0, len(base)))
        junk = data.draw(st.binary(max_size=64))
        at = data.draw(st.integers(0, cut))
        mutated = base[:at] + junk + base[at:cut]
        r = reports.parse(mutated)       # never raises
        assert r is None or r.kind in (reports.DSN, reports.ARF)
    return check


test_truncated_and_corrupted_reports_never_raise = _mutations()


@pytest.mark.parametrize("rcpt", ["gone@receiver.test", "jöe@receiver.test",
                                  "gone@bücher.test"])
def test_our_own_dsns_are_read_back_global_ones_too(rcpt):
    # mta/dsn.py writes an RFC 6533 global DSN (message/global-delivery-status, 8-bit
    # UTF-8, message/global-headers) for an address with a UTF-8 local part (one whose
    # domain alone is in U-labels is written in A-labels, the notice 7-bit): coming back to
    # a bounce domain it must still be read, its recipient intact (the A-label form for a
    # U-label domain, which the events' matching takes as the same recipient) and the
    # original's Message-ID kept
    from mta.dsn import RecipientFailure, build_dsn
    data = build_dsn(original=b"Subject: hi\r\nMessage-ID: <a@b.test>\r\n\r\nbody\r\n",
                     envelope_sender="s@x.test",
                     failed=[RecipientFailure(recipient=rcpt, status="5.1.1",
                                              remote_host="mx.r",
                                              diagnostic="550 5.1.1 no such user",
                                              last_attempt=1e9)],
                     reporting_mta="mta.x", arrival_time=1e9, queue_id="abc", now=1e9)
    local = rcpt.rpartition("@")[0]
    assert (b"message/global-delivery-status" in data) is not local.isascii()
    r = reports.parse(data)
    assert r is not None and r.kind == reports.DSN
    assert [b.final_recipient for b in r.recipients] == [ascii_address(rcpt) or rcpt]
    assert r.recipients[0].failed and r.message_id == "a@b.test"
    assert reports.status_code(r.recipients[0])[:2] == (550, "5.1.1")


def test_utf8_recipients_of_a_dsn_are_decoded():
    # RFC 6533 3: a utf-8 address type is utf-8-addr-xtext in a 7-bit report ("\x{FC}"),
    # utf-8-addr-unitext in a global one: the events and the suppression list get the
    # address itself, not its escaped form
    data = msg("""\
From: MAILER-DAEMON@mx.receiver.test
To: bounces@bounce.sender.test
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B1"

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.receiver.test

Original-Recipient: utf-8; J\\x{FC}rgen@receiver.test
Final-Recipient: utf-8; j\\x{FC}rgen@receiver.test
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 no such user

Final-Recipient: utf-8; plain+tag@receiver.test
Action: failed
Status: 5.1.1

--B1--
""")
    r = reports.parse(data)
    assert [(b.final_recipient, b.original_recipient) for b in r.recipients] == [
        ("jürgen@receiver.test", "Jürgen@receiver.test"), ("plain+tag@receiver.test", "")]
    from mta.dsn import RecipientFailure, build_dsn
    dsn = build_dsn(original=b"Subject: hi\r\n\r\nbody\r\n", envelope_sender="s@x.test",
                    failed=[RecipientFailure(recipient="jo@receiver.test", status="5.1.1",
                                             remote_host="mx.r",
                                             diagnostic="550 5.1.1 no such user",
                                             last_attempt=1e9,
                                             original_recipient="utf-8; jö@receiver.test")],
                    reporting_mta="mta.x", arrival_time=1e9, queue_id="abc", now=1e9)
    assert b"\\x{F6}" in dsn
    r = reports.parse(dsn)
    assert [(b.final_recipient, b.original_recipient) for b in r.recipients] == [
        ("jo@receiver.test", "jö@receiver.test")]
