"""smtp.add_missing_headers: SMTP mail without a Message-ID or Date gets them (Postfix's
always_add_missing_headers / local_header_rewrite_clients), before DKIM signing.

The daemon receives over SMTP (smtplib, and BDAT on a raw socket), delivers through the
test's DNS server on loopback to an aiosmtpd sink, and the bytes the sink received are
checked: a Message-ID ``<qid@server.hostname>`` and a Date (UTC, +0000) right after the
Received field (and the signature), each exactly once, the message's own bytes after
them; nothing added to a message that has both, nor with the setting off (the default:
byte-exact after Received).  The events carry the added Message-ID as message_id_header,
as they carry the one the HTTP builder makes.
"""
from __future__ import annotations

import email.utils
import re
import smtplib
import socket
import time

import pytest

from daemon import HOST, split_received, wait_until
from dkimtools.verifiers import dkimpy_verify
from mta.dkim import public_record
from mxlab import IPS, mx
from sinks import qid_of

SINK_IP = IPS[0]
BALANCER = "127.0.0.4"      # the PROXY-header client of the "local" test

BARE = (b"From: News <news@signer.test>\r\nTo: reader@dest.test\r\nSubject: bare\r\n\r\n"
        b"no Message-ID, no Date\r\n")
WHOLE = (b"From: news@signer.test\r\nTo: reader@dest.test\r\nSubject: whole\r\n"
         b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nmessage-id: <own@signer.test>\r\n\r\n"
         b"has both\r\n")
NO_DATE = (b"From: news@signer.test\r\nMessage-ID:\r\n <folded@signer.test>\r\n"
           b"Subject: no date\r\n\r\nDate: in the body is no Date field\r\n")
NO_ID = (b"DATE: Mon, 23 Nov 2026 10:00:00 +0000\r\nFrom: news@signer.test\r\n"
         b"Subject: no id\r\n\r\nMessage-ID: <in-the-body@x>\r\n")

_DATE_RE = rb"Date: (?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000\r\n"


def _lab_daemon(lab, **smtp):
    sink = lab.aio(SINK_IP)
    lab.serve(mx("dest.test", "mx.dest.test", SINK_IP))
    return sink, lab.daemon(sections={"smtp": smtp} if smtp else None)


def _send_all(d, messages: dict[str, bytes]) -> None:
    """Each message to <name@dest.test>, over one smtplib session."""
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
        for name, msg in messages.items():
            s.sendmail("bounces@signer.test", [f"{name}@dest.test"], msg)


def _delivered(sink, d, names) -> dict[str, bytes]:
    """What the sink received for each name, without our Received field."""
    wait_until(lambda: sink.received() >= len(names), 30, "every message at the sink",
               interval=0.05, details=lambda: d.log()[-3000:])
    out = {}
    for t in sink.snapshot():
        [rcpt] = t.rcpt_tos
        out[rcpt.partition("@")[0]] = t.data
    assert sorted(out) == sorted(names)
    return out


def _added(rest: bytes, sent: bytes) -> bytes:
    """The fields in front of what the client sent (the sent bytes end the message)."""
    assert rest.endswith(sent), rest[:400]
    return rest[:len(rest) - len(sent)]


def test_missing_message_id_and_date_are_added_once(lab):
    sink, d = _lab_daemon(lab, add_missing_headers="all")
    sent = {"bare": BARE, "whole": WHOLE, "nodate": NO_DATE, "noid": NO_ID}
    _send_all(d, sent)
    got = _delivered(sink, d, sent)
    made = {}
    for name, raw in got.items():
        qid = qid_of(raw)
        _, rest = split_received(raw)
        added = _added(rest, sent[name])
        if name == "whole":
            assert added == b""                     # both there: byte-exact
            continue
        want_id = f"Message-ID: <{qid}@mta.test>\r\n".encode()
        if name == "bare":
            assert added.startswith(want_id), added
            assert re.fullmatch(_DATE_RE, added[len(want_id):]), added
            made[qid] = f"<{qid}@mta.test>"
        elif name == "nodate":
            assert re.fullmatch(_DATE_RE, added), added
            made[qid] = "<folded@signer.test>"
        else:
            assert added == want_id
            made[qid] = f"<{qid}@mta.test>"
        header = rest.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        assert len(re.findall(rb"(?im)^message-id:", header)) == 1, header
        assert len(re.findall(rb"(?im)^date:", header)) == 1, header
    # the Date is now (within the test's minute), parsed by the standard library
    date = re.search(rb"\r\nDate: ([^\r]+)\r\n", b"\r\n" + split_received(got["bare"])[1])
    when = email.utils.parsedate_to_datetime(date.group(1).decode()).timestamp()
    assert abs(when - time.time()) < 120
    # the events carry the Message-ID the message left with, the added one too
    wait_until(lambda: sum(e["type"] == "delivery" for e in d.events()) == 4, 30,
               "four delivery events")
    by_qid = {e["queue_id"]: e for e in d.events() if e["type"] == "delivery"}
    for qid, mid in made.items():
        assert by_qid[qid]["message_id_header"] == mid
    [whole_qid] = set(by_qid) - set(made)
    assert by_qid[whole_qid]["message_id_header"] == "<own@signer.test>"


def test_bdat_mail_gets_them_too(lab):
    sink, d = _lab_daemon(lab, add_missing_headers="all")
    c = d.session()
    assert c.cmd("MAIL FROM:<bounces@signer.test>")[0] == 250
    assert c.cmd("RCPT TO:<bdat@dest.test>")[0] == 250
    half = len(BARE) // 2
    c.send(b"BDAT %d\r\n" % half + BARE[:half])
    assert c.reply()[0] == 250
    c.send(b"BDAT %d LAST\r\n" % (len(BARE) - half) + BARE[half:])
    assert c.reply()[0] == 250
    c.close()
    raw = _delivered(sink, d, ["bdat"])["bdat"]
    added = _added(split_received(raw)[1], BARE)
    assert added.startswith(f"Message-ID: <{qid_of(raw)}@mta.test>\r\nDate: ".encode()), added


def test_off_by_default_the_message_is_byte_exact(lab):
    sink, d = _lab_daemon(lab)
    sent = {"bare": BARE, "noid": NO_ID}
    _send_all(d, sent)
    for name, raw in _delivered(sink, d, sent).items():
        assert split_received(raw)[1] == sent[name]
    assert "message_id_header" not in next(
        e for e in d.events() if e["type"] == "injection" and e["rcpt_to"] == "bare@dest.test")


def test_the_signature_covers_the_added_fields(lab, dkim_keys):
    sink = lab.aio(SINK_IP)
    lab.serve(mx("dest.test", "mx.dest.test", SINK_IP))
    d = lab.daemon(sections={"smtp": {"add_missing_headers": "all"}, "dkim": {"keys": [
        {"domain": "signer.test", "selector": "rsa1", "key_file": dkim_keys.files["rsa"]}]}})
    _send_all(d, {"bare": BARE})
    raw = _delivered(sink, d, ["bare"])["bare"]
    _, rest = split_received(raw)
    assert rest.startswith(b"DKIM-Signature:")
    sig, _, after = rest.partition(b"\r\nMessage-ID: <")
    assert after.endswith(BARE) and b"\r\nDate: " in b"\r\n" + after.split(b"\r\n", 1)[1]
    h = sig.split(b"h=", 1)[1].split(b";", 1)[0].replace(b"\r\n\t", b"").replace(b" ", b"")
    assert {b"message-id", b"date"} <= set(h.split(b":")), h
    records = {"rsa1._domainkey.signer.test": public_record(dkim_keys.rsa)}
    assert dkimpy_verify(raw, records) == [True]
    # the signature would not survive the Message-ID made after it
    assert dkimpy_verify(raw.replace(b"@mta.test>", b"@mta.tesu>", 1), records) == [False]


@pytest.mark.parametrize("mode", ["local", "all"])
def test_local_means_loopback_clients(lab, mode):
    """"local": a client on loopback gets them, a client a balancer names by its PROXY
    header elsewhere (TEST-NET-1, in relay_networks) does not; "all": both do."""
    sink = lab.aio(SINK_IP)
    lab.serve(mx("dest.test", "mx.dest.test", SINK_IP))
    d = lab.daemon(sections={
        "server": {"proxy_protocol_from": [f"{BALANCER}/32"]},
        "smtp": {"add_missing_headers": mode,
                 "relay_networks": ["127.0.0.0/8", "192.0.2.0/24"]}})
    _send_all(d, {"near": BARE})
    s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0), timeout=15)
    try:
        f = s.makefile("rb")
        s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO far.test\r\nMAIL FROM:<bounces@signer.test>\r\n"
                  b"RCPT TO:<far@dest.test>\r\nDATA\r\n")
        replies = []
        while len(replies) < 4:
            line = f.readline()
            assert line, replies
            if line[3:4] == b" ":
                replies.append(line)
        assert replies[-1].startswith(b"354"), replies
        s.sendall(BARE + b".\r\nQUIT\r\n")
        assert f.readline().startswith(b"250 "), "queued"
    finally:
        s.close()
    got = _delivered(sink, d, ["near", "far"])
    assert b"[192.0.2.7]" in split_received(got["far"])[0]
    assert _added(split_received(got["near"])[1], BARE).startswith(b"Message-ID: <")
    far = _added(split_received(got["far"])[1], BARE)
    assert far.startswith(b"Message-ID: <") if mode == "all" else far == b""
