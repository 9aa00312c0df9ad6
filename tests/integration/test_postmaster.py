"""RCPT TO:<Postmaster> (RFC 5321 4.5.1), with real clients against the real daemon.

A bare ``<Postmaster>`` (no domain, any case) must be accepted.  It stands for
``smtp.postmaster`` (postmaster@ server.hostname by default) and is then an
ordinary recipient: it is queued, delivered to that address, and relay rules
apply to it (a client that may not relay gets 554 5.7.1, not an open door).
"""
import re
import smtplib
import subprocess

import pytest
from daemon import HOST, free_port, wait_until
from sinks import AioSink

from mta.acceptor import replies as R

MSG = b"From: s@example.com\r\nTo: postmaster\r\nSubject: to the postmaster\r\n\r\nhello\r\n"


@pytest.fixture
def sink():
    s = AioSink(HOST, free_port()).start()
    yield s
    s.stop()


def delivering(make_daemon, sink, **smtp):
    return make_daemon(acceptors=1, shards=1, smtp=smtp, delivery={
        "hold": False, "route": [{"domain": "*", "starttls": "none",
                                  "hosts": [f"{HOST}:{sink.port}"]}]})


def test_bare_postmaster_any_case_goes_to_postmaster_at_hostname(make_daemon, sink):
    d = delivering(make_daemon, sink)
    with smtplib.SMTP(HOST, d.port) as s:
        s.ehlo("client.test")
        for rcpt in ("Postmaster", "POSTMASTER", "postmaster"):
            # smtplib sends RCPT TO:<Postmaster>
            assert s.sendmail("s@example.com", [rcpt], MSG) == {}
        assert s.mail("s@example.com")[0] == 250
        assert s.rcpt("<PostMaster>") == (250, R.RCPT_OK[4:-2])
        s.rset()
        # Not the reserved name: still refused as bad syntax.
        assert s.mail("s@example.com")[0] == 250
        assert s.rcpt("<postmasterx>") == (501, R.BAD_RCPT[4:-2])
    # swaks, pipelined.
    r = subprocess.run(["swaks", "--server", f"{HOST}:{d.port}", "--from", "s@example.com",
                        "--to", "Postmaster", "--pipeline", "--header",
                        "Subject: swaks to postmaster", "--body", "hi"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert b"RCPT TO:<Postmaster>" in r.stdout and b"250 2.1.5 Ok" in r.stdout
    got = wait_until(lambda: [t for t in sink.snapshot() if t.rcpt_tos == ["postmaster@mta.test"]]
                     if sink.received() >= 4 else None, 30, "four deliveries to the postmaster")
    assert len(got) == 4, [t.rcpt_tos for t in sink.snapshot()]
    assert sum(t.data.endswith(MSG) for t in got) == 3
    assert all(b"\tfor <postmaster@mta.test>;" in t.data for t in got)


def test_postmaster_is_configurable_and_relay_rules_apply(make_daemon, sink):
    d = delivering(make_daemon, sink, postmaster="abuse-desk@ops.example")
    with smtplib.SMTP(HOST, d.port) as s:
        assert s.sendmail("s@example.com", ["Postmaster"], MSG) == {}
    txn = sink.wait_for("abuse-desk@ops.example")
    assert txn.data.endswith(MSG)
    assert d.stop() == 0
    # A client that may not relay may not reach it either: 554 5.7.1, not 501.
    d2 = make_daemon(subdir="norelay", acceptors=1, shards=1,
                     smtp={"relay_networks": ["192.0.2.0/24"]})
    with smtplib.SMTP(HOST, d2.port) as s:
        s.ehlo("client.test")
        assert s.mail("s@example.com")[0] == 250
        assert s.rcpt("<Postmaster>") == (554, R.RELAY_DENIED[4:-2])
    assert d2.queue_summary()["total"]["messages"] == 0


def test_a_relay_refusal_is_logged_with_the_client_sender_and_recipient(make_daemon):
    # The most common misconfiguration (an application server missing from
    # smtp.relay_networks, as from Postfix's mynetworks) left no trace: no event (by
    # design) and no log line, so the operator had only the client's word for the 554.
    d = make_daemon(acceptors=1, shards=1, smtp={"relay_networks": ["192.0.2.0/24"]})
    with smtplib.SMTP(HOST, d.port) as s:
        s.ehlo("client.test")
        assert s.mail("app@example.com")[0] == 250
        assert s.rcpt("<user@example.net>") == (554, R.RELAY_DENIED[4:-2])
    wait_until(lambda: "relay access denied" in d.log(), 10, "the refusal logged")
    assert re.search(r"INFO acceptor\[0\]\[\d+\]: client=127\.0\.0\.1: relay access denied: "
                     r"from=<app@example\.com> to=<user@example\.net> \(not in "
                     r"smtp\.relay_networks, not authenticated\)", d.log()), d.log()


@pytest.mark.parametrize("value", ["no-at-sign", "two@@example.org", "a b@example.org"])
def test_bad_postmaster_setting_names_the_key(make_daemon, value):
    d = make_daemon(start=False, smtp={"postmaster": value})
    r = d.cli("check-config", check=False)
    assert r.returncode != 0
    assert b"smtp.postmaster" in r.stdout + r.stderr, r
