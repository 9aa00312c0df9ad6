"""The SMTP session on the fake transport: what reaches the spool, flow control, limits.

The conversations themselves are data (``dialogues/``, played by test_dialogues.py);
these tests look at what a dialogue cannot show: the message and envelope handed
to the acceptor, the Received header, reading paused and resumed, connection limits.
"""
from __future__ import annotations

import dataclasses
import re

import msgspec
import pytest

from acceptor import fake
from mta.acceptor import replies as R
from mta.acceptor import smtp
from mta.config.schema import RouteConfig

IMPLS = ["compiled", "pure"]
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]{20})\r\n")
MESSAGE = b"Subject: test\r\n\r\nbody\r\n"


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


class Client:
    """One connection to a session on the fake transport."""

    def __init__(self, acceptor, peer=fake.PEER):
        self.acceptor = acceptor
        self.loop = acceptor.loop
        self.transport = fake.Transport(peer)
        self.session = smtp.Session(acceptor)
        self.transport.connect(self.session)
        self.seen = 0

    def send(self, data: bytes) -> bytes:
        """Write *data*, let the loop run, return what the server wrote meanwhile."""
        self.session.data_received(data)
        self.loop.run_ready()
        return self.output()

    def output(self) -> bytes:
        written = self.session.transport.written
        out = b"".join(written[self.seen:])
        self.seen = len(written)
        return out

    def transaction(self, sender="s@example.com", rcpts=("r@example.net",),
                    message=MESSAGE, mail_params=b"") -> bytes:
        data = b"MAIL FROM:<%s>%s\r\n" % (sender.encode(), mail_params)
        data += b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts)
        return self.send(data + b"DATA\r\n" + message + b".\r\n")


def make(impl, smtp_cfg=None, auth=None, tls=False, peer=fake.PEER):
    """An acceptor on the fake loop and one client connected to it (greeting read)."""
    loop = fake.Loop()
    acc = fake.Acceptor(fake.settings(smtp_cfg, auth), loop, pure=impl == "pure", tls=tls)
    c = Client(acc, peer)
    assert c.output() == b"220 mx.test ESMTP\r\n"
    return acc, c


# ------------------------------------------------------------ the submission


def test_envelope_and_message_reach_the_spool(impl):
    acc, c = make(impl)
    c.send(b"EHLO client.example\r\n")
    out = c.transaction(rcpts=("a@example.net", "b@example.org"),
                        mail_params=b" SIZE=100 BODY=8BITMIME",
                        message=b"Subject: x\r\n\r\n..dot\r\n")
    qid = QUEUED.search(out).group(1).decode()
    [m] = acc.submitted
    assert m.qid == qid
    assert (m.sender, m.rcpts) == ("s@example.com", ["a@example.net", "b@example.org"])
    assert m.params == {"BODY": "8BITMIME"}          # SIZE is not kept with the message
    assert m.client == "client.example [127.0.0.1]"
    assert m.peer == "127.0.0.1"
    assert m.message == b"Subject: x\r\n\r\n.dot\r\n"  # unstuffed, otherwise byte-exact


def test_received_header(impl):
    acc, c = make(impl)
    c.send(b"EHLO client.example\r\n")
    c.transaction(rcpts=("one@example.net",))
    c.transaction(rcpts=("one@example.net", "two@example.net"))
    one, two = acc.submitted
    assert re.fullmatch(
        rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby mx\.test \(mta\) with ESMTP id " + one.qid.encode() + rb"\r\n"
        rb"\tfor <one@example\.net>;\r\n\t[A-Z][a-z]{2}, [ 0-9]\d [A-Z][a-z]{2} \d{4} "
        rb"\d\d:\d\d:\d\d [+-]\d{4}\r\n", one.received), one.received
    # More than one recipient: none is named.
    assert two.received.startswith(
        b"Received: from client.example ([127.0.0.1])\r\n\tby mx.test (mta) with ESMTP id "
        + two.qid.encode() + b";\r\n\t")


def test_received_header_follows_helo_tls_and_auth(impl):
    acc, c = make(impl, auth={"alice": "secret"}, tls=True, peer=("::1", 4000))
    c.send(b"HELO plain.example\r\n")
    c.transaction()
    assert acc.submitted[-1].received.startswith(
        b"Received: from plain.example ([IPv6:::1])\r\n\tby mx.test (mta) with SMTP id ")
    assert c.send(b"EHLO tls.example\r\nSTARTTLS\r\n").endswith(R.TLS_GO)
    c.send(b"EHLO tls.example\r\n")
    c.transaction()
    assert b"from tls.example ([IPv6:::1])\r\n\tby mx.test (mta) with ESMTPS id " \
        in acc.submitted[-1].received
    assert c.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n") == R.AUTH_OK
    c.transaction()
    assert b"with ESMTPSA id " in acc.submitted[-1].received
    assert acc.submitted[-1].client == "tls.example [::1] user=alice"


def test_x_msys_api_header_becomes_params(impl):
    acc, c = make(impl)
    c.send(b"EHLO client.example\r\n")
    c.transaction(message=b'X-MSYS-API: {"campaign_id": "spring", "metadata": {"k": 1}}\r\n'
                          b"Subject: s\r\n\r\nbody\r\n")
    m = acc.submitted[-1]
    assert m.params["campaign_id"] == "spring"
    assert m.params["metadata"] == {"k": 1}
    assert m.message == b"Subject: s\r\n\r\nbody\r\n"
    # Not a JSON object: ignored (and logged), still removed, the message still accepted.
    out = c.transaction(message=b"X-MSYS-API: [1]\r\nSubject: s\r\n\r\nbody\r\n")
    assert QUEUED.search(out)
    assert acc.submitted[-1].message == b"Subject: s\r\n\r\nbody\r\n"
    assert "campaign_id" not in acc.submitted[-1].params


class _List:
    """A stand-in for the suppression list: *listed* maps an address to (transactional, bulk)."""

    def __init__(self, listed: dict):
        self.listed = listed

    def check(self, address: str, transactional: bool) -> bool:
        return self.listed.get(address.lower(), (False, False))[0 if transactional else 1]


def test_suppressed_recipients_are_marked_for_the_spool(impl):
    acc, c = make(impl)
    acc.suppression = _List({"bulk@example.net": (False, True), "tx@example.net": (True, False)})
    c.send(b"EHLO client.example\r\n")
    out = c.transaction(rcpts=("ok@example.net", "Bulk@example.net", "tx@example.net"))
    assert QUEUED.search(out)
    assert acc.submitted[-1].params["suppressed"] == [1]
    out = c.transaction(rcpts=("ok@example.net", "Bulk@example.net", "tx@example.net"),
                        message=b'X-MSYS-API: {"options": {"transactional": true}}\r\n'
                                b"Subject: x\r\n\r\nbody\r\n")
    assert QUEUED.search(out) and acc.submitted[-1].params["suppressed"] == [2]
    out = c.transaction(rcpts=("bulk@example.net",),
                        message=b'X-MSYS-API: {"options": {"skip_suppression": true}}\r\n'
                                b"Subject: x\r\n\r\nbody\r\n")
    assert QUEUED.search(out) and "suppressed" not in acc.submitted[-1].params


def test_suppressed_rcpt_is_refused_when_configured(impl):
    acc, c = make(impl)
    acc.suppression = acc.refuse_suppressed = _List({"bulk@example.net": (False, True)})
    c.send(b"EHLO client.example\r\n")
    out = c.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<BULK@example.net>\r\n"
                 b"RCPT TO:<ok@example.net>\r\nDATA\r\n" + MESSAGE + b".\r\n")
    assert out.startswith(R.SENDER_OK + R.SUPPRESSED + R.RCPT_OK), out
    assert acc.submitted[-1].rcpts == ["ok@example.net"]
    assert "suppressed" not in acc.submitted[-1].params
    # the refusal is a policy_rejection event, handed to the spool before the 550
    [(key, [e])] = acc.events
    assert (e["type"], e["recipient"], e["sender"], e["queue_id"]) == \
        ("policy_rejection", "BULK@example.net", "s@example.com", key)
    assert (e["response"], e["bounce_class"], e["remote_addr"], e["client"]) == (
        {"code": 550, "enhanced": "5.7.1",
         "text": "Recipient address was suppressed due to customer policy"},
        "25", "127.0.0.1", "client.example [127.0.0.1]")


def test_a_policy_refusal_waits_for_its_event_to_be_durable(impl):
    """Pipelined input waits while the spool writes the event; if it cannot, 451 (the
    client tries again later, so no refusal it sees goes unrecorded)."""
    acc, c = make(impl)
    acc.suppression = acc.refuse_suppressed = _List({"bulk@example.net": (False, True)})
    c.send(b"EHLO client.example\r\n")
    acc.answer = "hold"
    out = c.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<bulk@example.net>\r\n"
                 b"RCPT TO:<ok@example.net>\r\n")
    assert out == R.SENDER_OK and len(acc.events) == 1     # nothing more until it is on disk
    acc.answer_held(True)
    c.loop.run_ready()
    assert c.output() == R.SUPPRESSED + R.RCPT_OK
    acc.answer = "fail"
    assert c.send(b"RCPT TO:<bulk@example.net>\r\n") == R.STORAGE_TEMP
    assert c.send(b"DATA\r\n" + MESSAGE + b".\r\n").startswith(R.START_DATA)
    assert acc.submitted[-1].rcpts == ["ok@example.net"]
    # the client left while it waited: the late answer is dropped
    acc.answer = "hold"
    c.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<bulk@example.net>\r\n")
    c.session.connection_lost(None)
    acc.answer_held(True)
    c.loop.run_ready()
    assert c.output() == b""


def test_an_unknown_pool_refuses_the_message_after_its_events(impl):
    acc, c = make(impl)
    c.send(b"EHLO client.example\r\n")
    out = c.transaction(rcpts=("a@example.net", "b@example.net"),
                        message=b'X-MSYS-API: {"options": {"ip_pool": "nope"}, '
                                b'"campaign_id": "spring"}\r\nFrom: News <news@example.org>'
                                b"\r\nSubject: s\r\n\r\nbody\r\n")
    assert out.endswith(b'550 5.7.1 Unknown ip_pool "nope" in X-MSYS-API\r\n'), out
    assert acc.submitted == []
    [(key, evs)] = acc.events
    assert [(e["type"], e["recipient"], e["queue_id"]) for e in evs] == [
        ("policy_rejection", "a@example.net", key), ("policy_rejection", "b@example.net", key)]
    assert (evs[0]["campaign_id"], evs[0]["friendly_from"], evs[0]["response"]["text"]) == \
        ("spring", "news@example.org", 'Unknown ip_pool "nope" in X-MSYS-API')
    assert "ip_pool" not in evs[0]
    assert c.send(b"RSET\r\n") == R.OK        # the session goes on


def test_answer_after_the_client_left_is_dropped(impl):
    acc, c = make(impl)
    c.send(b"EHLO client.example\r\n")
    acc.answer = "hold"
    c.transaction()
    c.session.connection_lost(None)
    acc.answer_held(True)
    c.loop.run_ready()
    assert c.output() == b""


# ------------------------------------------------------------- flow control


def test_input_beyond_the_buffer_limit_pauses_reading_until_the_spool_answers(impl):
    # (1,000 NOOPs are the filler here: smtp.max_junk_commands would count them as errors)
    acc, c = make(impl, {"max_buffered_input": 4096, "max_junk_commands": 1000})
    c.send(b"EHLO client.example\r\n")
    acc.answer = "hold"
    c.transaction()
    assert c.transport.reading
    c.send(b"NOOP\r\n" * 1000)          # pipelined behind the message: waits
    assert not c.transport.reading
    acc.answer_held(True)
    c.loop.run_ready()
    out = c.output()
    assert QUEUED.match(out)
    assert out[QUEUED.match(out).end():] == R.OK * 1000
    assert c.transport.reading


def test_a_slow_reader_pauses_reading(impl):
    acc, c = make(impl)
    c.session.pause_writing()
    assert not c.transport.reading
    c.session.resume_writing()
    assert c.transport.reading
    # Paused for writing while the spool has the message: reading resumes after both.
    c.send(b"EHLO client.example\r\n")
    acc.answer = "hold"
    c.transaction()
    c.session.pause_writing()
    c.session.resume_writing()
    assert not c.transport.reading
    acc.answer_held(True)
    c.loop.run_ready()
    assert QUEUED.match(c.output())
    assert c.transport.reading


def test_starttls_stops_reading_until_the_handshake(impl):
    acc, c = make(impl, tls=True)
    c.send(b"EHLO client.example\r\n")
    c.session.data_received(b"STARTTLS\r\n")
    assert not c.transport.reading
    c.loop.run_ready()
    assert c.session.transport.tls and c.session.transport.reading


# --------------------------------------------------------- connection limits


def test_connection_limits(impl):
    acc, first = make(impl, {"max_connections": 3, "max_connections_per_ip": 2})
    second = Client(acc)
    assert second.output() == b"220 mx.test ESMTP\r\n"
    third = Client(acc)
    assert third.output() == R.TOO_MANY_FROM_IP and third.transport.closed
    other = Client(acc, ("127.0.0.2", 5))
    assert other.output() == b"220 mx.test ESMTP\r\n"
    fourth = Client(acc, ("127.0.0.3", 5))
    assert fourth.output() == R.TOO_MANY_CONNECTIONS and fourth.transport.closed
    assert acc.stats["rejected_connections"] == 2
    # Refused connections were never counted; one that leaves makes room.
    assert acc.per_ip == {"127.0.0.1": 2, "127.0.0.2": 1}
    first.session.connection_lost(None)
    assert acc.per_ip == {"127.0.0.1": 1, "127.0.0.2": 1}
    assert Client(acc).output() == b"220 mx.test ESMTP\r\n"


def test_idle_session_is_left_alone_while_the_spool_works(impl):
    acc, c = make(impl, {"command_timeout": 10})
    c.send(b"EHLO client.example\r\n")
    acc.answer = "hold"
    c.transaction()
    c.loop.now += 60
    c.session.idle_check(c.loop.now, False, False)
    c.session.idle_check(c.loop.now, True, True)      # shutdown: the answer comes first
    assert c.output() == b"" and not c.transport.closed
    acc.answer_held(False)
    c.loop.run_ready()
    assert c.output() == R.STORAGE_TEMP
    c.session.idle_check(c.loop.now, True, True)
    assert c.output() == R.SHUTTING_DOWN and c.transport.closed


def test_a_password_check_that_fails_is_a_temporary_error(impl):
    acc, c = make(impl, auth={"alice": "secret"}, tls=True)
    c.send(b"EHLO client.example\r\nSTARTTLS\r\n")
    c.send(b"EHLO client.example\r\n")
    acc.auth_users = {"alice": ("not a number", b"salt", b"hash")}   # check_password raises
    assert c.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n") == R.AUTH_TEMP
    assert c.session.errors == 0 and c.session.user is None
    assert c.send(b"NOOP\r\n") == R.OK


def test_failed_auth_is_bounded_per_client_across_sessions(impl):
    """smtp.max_auth_failures: past them AUTH gets 454 4.7.0, the right password too and
    in a new session, without a check; another client is not affected.  An IPv6 client
    counts by its /64 (smtp.ipv6_client_prefix)."""
    def tls_client(acc, peer):
        c = Client(acc, peer)
        c.send(b"EHLO client.example\r\nSTARTTLS\r\n")
        c.send(b"EHLO client.example\r\n")
        return c

    acc, c = make(impl, {"max_auth_failures": 2}, auth={"alice": "secret"}, tls=True,
                  peer=("2001:db8::1", 4000))
    c.send(b"EHLO client.example\r\nSTARTTLS\r\n")
    c.send(b"EHLO client.example\r\n")
    wrong = b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n"
    right = b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"
    assert c.send(wrong) == R.AUTH_FAILED
    c = tls_client(acc, ("2001:db8::ffff:2", 4001))     # the same /64: the same client
    assert c.send(wrong) == R.AUTH_FAILED
    assert c.send(right) == R.AUTH_LOCKED
    assert tls_client(acc, ("2001:db8::3", 4002)).send(right) == R.AUTH_LOCKED
    assert c.session.user is None and c.session.errors == 2
    assert tls_client(acc, ("2001:db8:1::1", 4003)).send(right) == R.AUTH_OK
    assert tls_client(acc, fake.PEER).send(right) == R.AUTH_OK


def test_x_msys_api_ip_pool_is_checked_and_recorded(impl):
    """The pool: X-MSYS-API options.ip_pool, else by sending domain; unknown -> 550 after DATA."""
    import dataclasses

    import msgspec

    acc, c = make(impl)
    s = acc.settings
    cfg = msgspec.structs.replace(s.config, egress=msgspec.structs.replace(
        s.config.egress, domain_pool={"bulk.example": "mkt"}))
    acc.settings = dataclasses.replace(s, config=cfg, pools={**s.pools, "mkt": (("default", 1),)})
    c.send(b"EHLO client.example\r\n")

    def msys(pool: str) -> bytes:
        return (b'X-MSYS-API: {"options": {"ip_pool": "' + pool.encode() + b'"}}\r\n'
                + MESSAGE)

    assert QUEUED.search(c.transaction(message=msys("mkt")))
    assert acc.submitted[-1].params["ip_pool"] == "mkt"
    # Unknown: refused after DATA, nothing spooled, the session goes on.
    head = R.SENDER_OK + R.RCPT_OK + R.START_DATA
    assert c.transaction(message=msys("nope")) == \
        head + R.UNKNOWN_POOL_NAMED.format(name="nope").encode()
    # A name that is not tame is not echoed.
    assert c.transaction(message=msys("x\\r\\n250 ok")) == head + R.UNKNOWN_POOL
    assert len(acc.submitted) == 1
    # No pool asked for: the sending domain's (egress.domain_pool), else none recorded.
    assert QUEUED.search(c.transaction(sender="news@bulk.example"))
    assert acc.submitted[-1].params.get("ip_pool") == "mkt"
    assert QUEUED.search(c.transaction(message=msys("default")))
    assert "ip_pool" not in acc.submitted[-1].params
    assert QUEUED.search(c.transaction())
    assert "ip_pool" not in acc.submitted[-1].params


def test_dsn_parameters_reach_the_spool(impl):
    """RFC 3461: ENVID and RET with the message; NOTIFY and ORCPT per recipient, in order."""
    acc, c = make(impl)
    c.send(b"EHLO client.example\r\n")
    out = c.send(b"MAIL FROM:<s@example.com> RET=hdrs ENVID=QQ+2B1\r\n"
                 b"RCPT TO:<a@example.net>\r\n"
                 b"RCPT TO:<b@example.net> NOTIFY=delay,never\r\n"     # refused: 501
                 b"RCPT TO:<b@example.net> NOTIFY=failure,success\r\n"
                 b"RCPT TO:<c@example.net> ORCPT=rfc822;C+2Bx@example.net NOTIFY=NEVER\r\n"
                 b"DATA\r\n" + MESSAGE + b".\r\n")
    assert out.count(R.RCPT_OK) == 3 and R.BAD_NOTIFY in out and QUEUED.search(out)
    [m] = acc.submitted
    assert m.rcpts == ["a@example.net", "b@example.net", "c@example.net"]
    assert m.params == {"RET": "HDRS", "ENVID": "QQ+2B1",
                        "NOTIFY": ["", "SUCCESS,FAILURE", "NEVER"],
                        "ORCPT": ["", "", "rfc822;C+2Bx@example.net"]}
    # the next transaction starts clean
    c.transaction(rcpts=("d@example.net",))
    assert acc.submitted[-1].params == {}


def test_a_utf8_orcpt_is_taken_with_smtputf8_only(impl):
    """RFC 6533 3: with SMTPUTF8, ORCPT's utf-8 address may be utf-8-addr-unitext (the
    UTF-8 itself); without it, or malformed, it is refused."""
    acc, c = make(impl)
    c.send(b"EHLO client.example\r\n")
    orcpt = "ORCPT=utf-8;j\u00fcrgen\\x{E9}@example.net".encode()
    out = c.send(b"MAIL FROM:<s@example.com> SMTPUTF8\r\n"
                 b"RCPT TO:<a@example.net> " + orcpt + b"\r\n"
                 b"RCPT TO:<b@example.net> ORCPT=rfc822;b\xc3\xbc@example.net\r\n"
                 b"RCPT TO:<b@example.net> ORCPT=utf-8;b+\xc3\xbc@example.net\r\n"
                 b"RCPT TO:<b@example.net> ORCPT=utf-8;b\\\xc3\xbc@example.net\r\n"
                 b"RCPT TO:<b@example.net> ORCPT=utf-8;b\xff@example.net\r\n"
                 b"DATA\r\n" + MESSAGE + b".\r\n")
    assert out.count(R.RCPT_OK) == 1 and out.count(R.BAD_ORCPT) == 3 and \
        out.count(R.SYNTAX) == 1 and QUEUED.search(out), out
    [m] = acc.submitted
    assert m.params["ORCPT"] == ["utf-8;j\u00fcrgen\\x{E9}@example.net"]
    # without SMTPUTF8: refused (xtext, ASCII only), the xtext form taken
    out = c.send(b"MAIL FROM:<s@example.com>\r\n"
                 b"RCPT TO:<a@example.net> " + orcpt + b"\r\n"
                 b"RCPT TO:<a@example.net> ORCPT=utf-8;j\\x{FC}rgen@example.net\r\n"
                 b"DATA\r\n" + MESSAGE + b".\r\n")
    assert out.count(R.RCPT_OK) == 1 and R.SYNTAX in out and QUEUED.search(out), out
    assert acc.submitted[-1].params["ORCPT"] == ["utf-8;j\\x{FC}rgen@example.net"]


def test_reports_to_a_bounce_domain_are_taken_from_anyone_and_never_relayed(impl):
    """feedback.bounce_domains: RCPT to a return path needs no relay permission; such a
    transaction holds only report recipients (452 4.5.3 for the other kind) and goes to
    take_report(), not to the spool as a message."""
    acc, c = make(impl, peer=("192.0.2.7", 4000))      # not in relay_networks
    acc.bounce_domains = frozenset({"bounces.example.com"})
    taken = []
    acc.take_report = taken.append
    c.send(b"EHLO isp.example\r\n")
    out = c.send(b"MAIL FROM:<>\r\nRCPT TO:<bounces+00ab@Bounces.Example.com>\r\n"
                 b"RCPT TO:<r@example.net>\r\nRCPT TO:<fbl@bounces.example.com>\r\n"
                 b"DATA\r\n" + MESSAGE + b".\r\n")
    assert out == R.SENDER_OK + R.RCPT_OK + R.REPORT_SEPARATELY + R.RCPT_OK + R.START_DATA, out
    assert acc.submitted == [] and len(taken) == 1
    assert taken[0].rcpts == ["bounces+00ab@Bounces.Example.com", "fbl@bounces.example.com"]
    assert taken[0].payload == MESSAGE and taken[0].sender == ""
    taken[0].committed("0" * 18 + "AB", True)   # the report's events are on disk: 250
    assert QUEUED.search(c.output())
    # Mail to relay from this client is still refused, and first decides the kind.
    out = c.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nRSET\r\n")
    assert out == R.SENDER_OK + R.RELAY_DENIED + R.OK, out


def test_a_relay_client_keeps_reports_and_mail_apart(impl):
    acc, c = make(impl)
    acc.bounce_domains = frozenset({"bounces.example.com"})
    taken = []
    acc.take_report = taken.append
    c.send(b"EHLO client.example\r\n")
    out = c.transaction(rcpts=("r@example.net", "fbl@bounces.example.com"))
    assert out.startswith(R.SENDER_OK + R.RCPT_OK + R.REPORT_SEPARATELY), out
    assert QUEUED.search(out) and acc.submitted[-1].rcpts == ["r@example.net"]
    assert taken == []


def test_a_half_close_while_the_spool_answers_keeps_the_replies(impl):
    """The client pipelines a message and QUIT, then shuts its side: the session keeps
    its own side open until the spool's answer (250) and QUIT's 221 are written, then
    closes (the client shut its side: a plain close, no lingering)."""
    acc, c = make(impl)
    acc.answer = "hold"
    c.send(b"EHLO client.example\r\n")
    c.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
           + MESSAGE + b".\r\nQUIT\r\n")
    t = c.session.transport
    assert c.session.eof_received() is True      # an answer is owed
    assert not t.closed
    acc.answer_held(True)
    c.loop.run_ready()
    out = c.output()
    assert QUEUED.search(out) and out.endswith(b"221 2.0.0 Bye\r\n"), out
    assert t.closed and not t.eof_written
    # Nothing owed, or in the middle of a message: closed at once (as before).
    for sent in (b"", b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                      b"Subject: half\r\n"):
        acc, c = make(impl)
        c.send(b"EHLO client.example\r\n" + sent)
        assert c.session.eof_received() is False


def test_a_tls_session_the_server_closes_is_aborted_unless_the_client_went(impl):
    """Over TLS (no half-close) QUIT's 221 is followed by the transport's own close,
    which waits for unsent output: a client that stopped reading kept the connection
    (and its place under max_connections) for good.  Now, as the lingering close of a
    plaintext session, it is aborted after smtp.linger_timeout unless it went by then
    (mta.acceptor.closing, shared with the HTTP sessions)."""
    from mta.acceptor import closing
    for went in (False, True):
        acc, c = make(impl, tls=True)
        c.send(b"EHLO client.example\r\n")
        c.session.data_received(b"STARTTLS\r\n")
        c.loop.run_ready()
        c.output()
        t = c.session.transport
        assert t.tls
        assert c.send(b"QUIT\r\n").startswith(b"221")
        assert t.closed and not t.eof_written and not t.aborted
        (delay, cb, args), = [x for x in c.loop.timers if x[1] is closing._abort_unless_lost]
        assert delay == acc.smtp.linger_timeout
        if went:
            c.session.connection_lost(None)
        cb(*args)
        assert t.aborted is not went


def test_an_empty_sasl_response_is_an_equals_sign(impl):
    """RFC 4954: a zero-length response is sent as "=".  It is the empty response, not
    bad base64 (501): for PLAIN it is no credentials (535), for LOGIN an empty user name.
    A PLAIN response that decodes but is not authzid NUL authcid NUL password is a 535
    too; only what is not base64 stays a 501."""
    import base64

    acc, c = make(impl, auth={"alice": "secret"}, tls=True)
    c.send(b"EHLO client.example\r\nSTARTTLS\r\n")
    c.send(b"EHLO client.example\r\n")
    assert c.send(b"AUTH PLAIN =\r\n") == R.AUTH_FAILED
    assert c.send(b"AUTH PLAIN\r\n") == R.AUTH_CHALLENGE_EMPTY
    assert c.send(b"=\r\n") == R.AUTH_FAILED
    two_parts = base64.b64encode(b"alice\0secret")
    assert c.send(b"AUTH PLAIN " + two_parts + b"\r\n") == R.AUTH_FAILED
    not_utf8 = base64.b64encode(b"\0\xffalice\0secret")
    assert c.send(b"AUTH PLAIN " + not_utf8 + b"\r\n") == R.AUTH_FAILED
    assert c.send(b"AUTH PLAIN !!\r\n") == R.AUTH_BAD_BASE64
    assert c.send(b"AUTH LOGIN =\r\n") == R.AUTH_PASSWORD
    assert c.send(base64.b64encode(b"secret") + b"\r\n") == R.AUTH_FAILED
    assert c.session.user is None
    # A password of zero length, sent as "=", is checked (and is not alice's).
    assert c.send(b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n") == R.AUTH_PASSWORD
    assert c.send(b"=\r\n") == R.AUTH_FAILED
    assert c.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n") == R.AUTH_OK


def test_more_received_fields_than_max_hops_is_a_loop(impl):
    """RFC 5321 6.3: over smtp.max_hops Received fields, the end of DATA gets 554 5.4.6,
    nothing is submitted, and the session goes on; at the limit the message is taken."""
    acc, c = make(impl, {"max_hops": 3})
    c.send(b"EHLO client.example\r\n")
    head = R.SENDER_OK + R.RCPT_OK + R.START_DATA
    assert c.transaction(message=b"Received: a\r\nreceived: b\r\nRECEIVED: c\r\n"
                                 b"Received: d\r\n" + MESSAGE) == head + R.TOO_MANY_HOPS
    assert acc.submitted == []
    assert QUEUED.search(c.transaction(message=b"Received: a\r\nReceived: b\r\n"
                                               b"Received: c\r\n" + MESSAGE))
    assert len(acc.submitted) == 1


def test_failed_auth_memory_is_bounded():
    """tls_auth.Failures remembers at most *capacity* addresses: windows that have passed
    go first, then the oldest quarter; a window lasts *window* seconds from its first
    failure."""
    from mta.acceptor.tls_auth import Failures

    clock = [0.0]
    f = Failures(2, 10.0, lambda: clock[0], capacity=8)
    f.failed("victim")
    assert not f.locked("victim")
    f.failed("victim")
    assert f.locked("victim")
    clock[0] = 5.0
    for n in range(100):
        f.failed(f"10.0.0.{n}")
        assert len(f.by_ip) <= 8
    assert "victim" not in f.by_ip        # the oldest window went first
    f.failed("a")
    f.failed("a")
    assert f.locked("a")
    clock[0] = 15.0                       # every window opened at 5.0 has passed
    assert not f.locked("a")
    for n in range(8):
        f.failed(f"10.1.0.{n}")           # room made by dropping the passed windows
    assert set(f.by_ip) == {f"10.1.0.{n}" for n in range(8)}


@pytest.mark.parametrize("header", [b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 25\r\n",
                                    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12)])
def test_a_proxy_header_from_a_client_is_refused(impl, header):
    # (from a balancer that is not in server.proxy_protocol_from, or a client that
    # names itself another: the session must not go on as this peer's address)
    acc, c = make(impl)
    assert c.send(header + b"EHLO x\r\nMAIL FROM:<a@b.test>\r\n") == R.PROXY_NOT_ACCEPTED
    assert c.transport.closed
    acc, c = make(impl)                 # the first read only: later a command like any
    c.send(b"EHLO x\r\n")
    assert c.send(b"PROXY x\r\n") == R.UNKNOWN and not c.transport.closed


@pytest.mark.parametrize("route", ["", "*", "[IPv6:2001:db8::1]", "[IPv6:2001:db8::2]"])
def test_an_ipv6_address_literal_is_refused_at_rcpt_when_delivery_sends_no_ipv6(impl, route):
    # delivery.ipv6 = false connects to no IPv6 address: RCPT TO:<b@[IPv6:2001:db8::1]>
    # got 250 and the message bounced later ("no MX host of [IPv6:2001:db8::1] has an
    # address"); it is refused now.  A '*' route (a smarthost) or the literal's own route
    # carries it: taken (a route of another literal does not).
    smarthost = route in ("*", "[IPv6:2001:db8::1]")
    s = fake.settings()
    d = msgspec.structs.replace(s.config.delivery, ipv6=False, route=[
        RouteConfig(domain=route, hosts=["192.0.2.25"])] if route else [])
    acc = fake.Acceptor(dataclasses.replace(
        s, config=msgspec.structs.replace(s.config, delivery=d)), fake.Loop(),
        pure=impl == "pure")
    c = Client(acc)
    c.output()
    c.send(b"EHLO client.example\r\n")
    out = c.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<b@[IPv6:2001:db8::1]>\r\n"
                 b"RCPT TO:<c@[192.0.2.1]>\r\n")
    assert out.split(b"\r\n")[1:3] == [
        R.RCPT_OK.rstrip() if smarthost else R.NO_IPV6_ROUTE.rstrip(), R.RCPT_OK.rstrip()]


@pytest.mark.parametrize("literal", [b"[IPv6:::1%\nX-Injected: yes]", b"[IPv6:fe80::1%eth0]",
                                     b"[IPv6:::1%\rDATA]",
                                     b"[IPv6:::1%\x00]"])
@pytest.mark.parametrize("peer", [fake.PEER, ("192.0.2.7", 4000)])
def test_an_ipv6_literal_with_a_zone_is_refused(impl, literal, peer, caplog):
    # ipaddress takes a zone of any characters but "%": RCPT TO:<v@[IPv6:::1%\nX: y]>
    # (a bare LF is no line end) got 250, the LF went into the Received header ("for <...>")
    # and, from a client that may not relay, into the "relay access denied" log line.
    acc, c = make(impl, peer=peer)
    c.send(b"EHLO client.example\r\n")
    with caplog.at_level("INFO", logger="mta.acceptor"):
        out = c.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<v@" + literal + b">\r\n"
                     b"MAIL FROM:<v@" + literal + b">\r\nRSET\r\n")
    assert out == R.SENDER_OK + R.BAD_RCPT + R.NESTED_MAIL + R.OK, out
    out = c.send(b"MAIL FROM:<v@" + literal + b">\r\n")
    assert out == R.BAD_SENDER, out
    assert acc.submitted == []
    assert not any("\n" in r.getMessage() or "\r" in r.getMessage() for r in caplog.records)
