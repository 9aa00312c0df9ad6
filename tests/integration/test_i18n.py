"""Internationalised addresses end to end against the real daemon (RFC 5890, 6531, 6532).

Mail in over SMTP (with SMTPUTF8) and over HTTP to U-label domains, delivered to
aiosmtpd sinks on loopback: one that offers SMTPUTF8 (``u8.example``) and one that
does not (every other domain), which is what most of a large audience's servers
still are.  The events show what happened to each recipient.
"""
from __future__ import annotations

import email
import smtplib
from email import policy

import pytest
from daemon import HOST, free_port, wait_until
from sinks import AioSink

KEY = "i18n-key"
AUTH = {"Authorization": KEY}


@pytest.fixture(scope="module")
def lab(make_module_daemon):
    """(daemon, sink with SMTPUTF8, sink without): u8.example goes to the first; the
    second refuses unknown* with 550 5.1.1."""
    u8 = AioSink(HOST, free_port(), name="u8").start()
    def rcpt(sink, address, mail_from):
        if address.startswith("unknown"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        return None
    plain = AioSink(HOST, free_port(), name="plain", smtputf8=False, rcpt=rcpt).start()
    d = None
    try:
        d = make_module_daemon(
            subdir="i18n", acceptors=1, shards=1, http={"api_keys": [KEY]},
            delivery={"hold": False, "route": [
                {"domain": "u8.example", "starttls": "none", "hosts": [f"{HOST}:{u8.port}"]},
                {"domain": "*", "starttls": "none", "hosts": [f"{HOST}:{plain.port}"]}]})
        yield d, u8, plain
    finally:
        if d is not None:
            d.cleanup()
        u8.stop()
        plain.stop()


def events_of(d, rcpt: str, kind: str) -> list[dict]:
    return [e for e in d.events() if e["type"] == kind and e["rcpt_to"] == rcpt]


def test_idn_domains_reach_a_server_without_smtputf8(lab):
    # A U-label domain with an ASCII local part has an all-ASCII form, its A-labels: a
    # server without SMTPUTF8 gets the mail in that form (as Postfix sends it), not
    # a 553 5.6.7 bounce -- the envelope, our Received field, and over HTTP the From,
    # To and Reply-To fields built from the transmission.  A UTF-8 local part has no
    # ASCII form: that recipient alone bounces (553 5.6.7), the others are delivered.
    d, u8, plain = lab
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("smtputf8")
        refused = s.sendmail("news@bäckerei.example", ["smtp-1@bücher.example"],
                             b"From: news@example.com\r\nSubject: plain\r\n\r\nbody\r\n",
                             mail_options=["SMTPUTF8"])
        assert refused == {}
        refused = s.sendmail("news@example.com", ["smtp-2@bücher.example", "jörg@bücher.example"],
                             b"From: news@example.com\r\nSubject: two\r\n\r\nbody\r\n",
                             mail_options=["SMTPUTF8"])
        assert refused == {}
    st, _, body = d.post({
        "recipients": [{"address": {"email": "http-1@bücher.example", "name": "Jörg Ü"}}],
        "content": {"from": {"email": "news@bäckerei.example", "name": "Bäckerei"},
                    "reply_to": "reply@bäckerei.example", "subject": "Grüße", "text": "t"}},
        headers=AUTH)
    assert st == 200 and body["results"]["total_accepted_recipients"] == 1, body

    one = plain.wait_for("smtp-1@xn--bcher-kva.example")
    assert one.mail_from == "news@xn--bckerei-5wa.example"
    assert "SMTPUTF8" not in [o.upper() for o in one.mail_options]
    assert one.data.isascii() and b"for <smtp-1@xn--bcher-kva.example>" in one.data

    two = plain.wait_for("smtp-2@xn--bcher-kva.example")
    assert two.rcpt_tos == ["smtp-2@xn--bcher-kva.example"] and two.data.isascii()
    bounce = wait_until(lambda: events_of(d, "jörg@bücher.example", "bounce"), 20,
                        "the bounce of the UTF-8 local part")[0]
    assert bounce["error_code"] == "553" and "5.6.7" in bounce["reason"], bounce

    three = plain.wait_for("http-1@xn--bcher-kva.example")
    assert three.mail_from == "news@xn--bckerei-5wa.example" and three.data.isascii()
    msg = email.message_from_bytes(three.data, policy=policy.default)
    assert [(a.display_name, a.addr_spec) for a in msg["From"].addresses] == \
        [("Bäckerei", "news@xn--bckerei-5wa.example")]
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == \
        [("Jörg Ü", "http-1@xn--bcher-kva.example")]
    assert msg["Reply-To"].addresses[0].addr_spec == "reply@xn--bckerei-5wa.example"
    assert msg["Subject"] == "Grüße"
    # The events name each recipient as it was given.
    for rcpt in ("smtp-1@bücher.example", "smtp-2@bücher.example", "http-1@bücher.example"):
        wait_until(lambda r=rcpt: events_of(d, r, "delivery"), 20, f"the delivery to {rcpt}")
    assert not [e for e in d.events() if e["type"] == "bounce" and "smtp-" in e["rcpt_to"]]


def test_utf8_local_parts_go_with_smtputf8_where_it_is_offered(lab):
    d, u8, plain = lab
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
        refused = s.sendmail("jörg@bäckerei.example", ["ünï@u8.example"],
                             "From: jörg@bäckerei.example\r\nSubject: Grüße\r\n\r\nbody\r\n"
                             .encode(), mail_options=["SMTPUTF8"])
        assert refused == {}
    got = u8.wait_for("ünï@u8.example")
    assert got.mail_from == "jörg@bäckerei.example"
    assert "SMTPUTF8" in [o.upper() for o in got.mail_options]


BAD_DOMAINS = ("xn--zz.example",            # not valid punycode
               "☃.example",                 # a code point IDNA 2008 does not allow
               "一凥嗊妯嶔慹敞楃洨焍瓲磗粼股蒆衫豐逵鐚響.example",  # 60 octets of UTF-8, over 63 as A-labels
               "ü" * 60 + ".example")       # 60 characters (the API counted characters)


def test_invalid_idn_domains_are_refused_at_injection_not_bounced_later(lab):
    # Accepted, each of these bounced after the 250 / 200 (or went to a smarthost as
    # it was); now SMTP answers 553 5.1.3 (5.1.7 for the sender) and the API names the
    # recipient (partial acceptance) or content.from.email (422).
    d, u8, plain = lab
    before = len(d.events())
    c = d.session()
    try:
        assert c.cmd("MAIL FROM:<s@☃.example> SMTPUTF8")[:2] == \
            (553, ["5.1.7 Invalid internationalised domain name in sender address"])
        assert c.cmd("MAIL FROM:<s@example.com> SMTPUTF8")[0] == 250
        for dom in BAD_DOMAINS[:3]:
            code, lines = c.cmd(f"RCPT TO:<r@{dom}>")
            assert (code, lines) == \
                (553, ["5.1.3 Invalid internationalised domain name in recipient address"]), dom
        assert c.cmd("RCPT TO:<r@XN--BCHER-KVA.example>")[0] == 250
    finally:
        c.close()
    st, _, body = d.post({"recipients": ["ok@bücher.example"] + [f"r@{x}" for x in BAD_DOMAINS],
                          "content": {"from": "s@example.com", "subject": "s", "text": "t"}},
                         headers=AUTH)
    assert st == 200, body
    res = body["results"]
    assert (res["total_accepted_recipients"], res["total_rejected_recipients"]) == (1, 4), body
    for i, err in enumerate(res["rcpt_to_errors"], 1):
        assert err["code"] == "1300", err
        assert err["description"].startswith(f"recipients[{i}].address.email: ") and \
            "invalid domain" in err["description"], err
    st, _, body = d.post({"recipients": ["ok2@example.net"],
                          "content": {"from": "s@xn--zz.example", "subject": "s", "text": "t"}},
                         headers=AUTH)
    assert st == 422 and "content.from.email" in body["errors"][0]["description"], body
    plain.wait_for("ok@xn--bcher-kva.example")
    assert not [e for e in d.events()[before:] if e["type"] == "bounce"]


def test_the_bounce_to_an_idn_sender_reaches_its_server_without_smtputf8(lab):
    # The notice to news@bäckerei.example of a failed unknown-1@bücher.example was a global
    # (RFC 6533) one -- "To: <news@bäckerei.example>", message/global-delivery-status --
    # only for their U-labels; the sender's server, without SMTPUTF8, could not be
    # sent it and the sender never learnt of the bounce.  It is a 7-bit notice now.
    d, u8, plain = lab
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
        refused = s.sendmail("news@bäckerei.example", ["unknown-1@bücher.example"],
                             b"From: news@example.com\r\nSubject: gone\r\n\r\nbody\r\n",
                             mail_options=["SMTPUTF8"])
        assert refused == {}
    notice = plain.wait_for("news@xn--bckerei-5wa.example")
    assert notice.mail_from == "" and notice.data.isascii()
    msg = email.message_from_bytes(notice.data, policy=policy.default)
    assert msg.get_content_type() == "multipart/report"
    status = msg.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    assert b"Final-Recipient: rfc822; unknown-1@xn--bcher-kva.example" in notice.data
