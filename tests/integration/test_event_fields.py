"""Fields every event of a message repeats, against the real daemon.

``friendly_from`` and ``subject`` are read once at injection (SMTP, HTTP inline
content, HTTP ``email_rfc822``) and kept with the message on disk: the delivery
events written after a restart still carry them.  ``outbound_tls`` tells on each
delivery and delay whether the receiver's session was encrypted.
"""
from __future__ import annotations

import re
import smtplib
import ssl

import trustme
from daemon import HOST, free_port, wait_until
from sinks import AioSink

KEY = "fields-key"


def events_of(d, kind: str) -> dict[str, dict]:
    """The events of type *kind*, by recipient (the last one of each)."""
    return {e["raw_rcpt_to"]: e for e in d.events() if e["type"] == kind}


def inject(d) -> None:
    """Three messages: SMTP, HTTP inline content (rendered), HTTP email_rfc822."""
    msg = (b"From: \"Desk, News\" <News@Example.ORG>\r\nTo: smtp@dest.test\r\n"
           b"Subject: =?utf-8?q?Caf=C3=A9?=\r\n deals\r\n\r\nbody\r\n")
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
        assert s.sendmail("bounces@example.org", ["smtp@dest.test"], msg) == {}
    st, _, out = d.post({"recipients": [{"address": "inline@dest.test",
                                         "substitution_data": {"n": "Ann"}}],
                         "content": {"from": {"name": "Shop", "email": "shop@example.org"},
                                     "subject": "Hello {{n}}", "text": "t"}},
                        headers={"Authorization": KEY})
    assert st == 200, out
    st, _, out = d.post({"recipients": ["rfc@dest.test"],
                         "content": {"email_rfc822": "From: Raw <raw@example.org>\r\n"
                                                     "Subject: raw {{address.email}}\r\n\r\n"
                                                     "text\r\n"}},
                        headers={"Authorization": KEY})
    assert st == 200, out


EXPECTED = {"smtp@dest.test": ("News@Example.ORG", "Caf\u00e9 deals"),
            "inline@dest.test": ("shop@example.org", "Hello Ann"),
            "rfc@dest.test": ("raw@example.org", "raw rfc@dest.test")}


def test_from_and_subject_in_every_event_across_a_restart(make_daemon):
    sink = AioSink(HOST, free_port()).start()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]})
        inject(d)
        inj = wait_until(lambda: (lambda e: e if len(e) == 3 else None)(
            events_of(d, "injection")), 20, "the injection events")
        assert {r: (e.get("friendly_from"), e.get("subject")) for r, e in inj.items()} == \
            EXPECTED
        # Delivered only by the next run: the fields come back from the spool's records.
        d.stop()
        d.sections["delivery"].update({"hold": False, "route": [
            {"domain": "*", "starttls": "none", "hosts": [f"{HOST}:{sink.port}"]}]})
        d.write_config()
        d.start()
        dlv = wait_until(lambda: (lambda e: e if len(e) == 3 else None)(
            events_of(d, "delivery")), 30, "the delivery events")
        assert {r: (e.get("friendly_from"), e.get("subject")) for r, e in dlv.items()} == \
            EXPECTED
        assert all(e["outbound_tls"] == "0" for e in dlv.values())   # starttls = "none"
        # message_id_header: the Message-ID field of the message the receiver got (over
        # HTTP one the mta made: inline content's recorded as the builder made it, without
        # reading the header again), in both events; the SMTP message has none
        got = {t.rcpt_tos[0]: re.search(rb"(?im)^Message-ID:[ \t]*(\S+)", t.data)
               for t in sink.snapshot()}
        assert set(got) == set(EXPECTED) and got["smtp@dest.test"] is None, got
        for r in ("inline@dest.test", "rfc@dest.test"):
            assert inj[r]["message_id_header"] == dlv[r]["message_id_header"] == \
                got[r].group(1).decode(), r
        assert not inj["smtp@dest.test"].get("message_id_header")
    finally:
        sink.stop()


def test_outbound_tls_says_how_each_session_went(make_daemon):
    """"1" over STARTTLS, "0" to a receiver that offers none, "-1" when it is offered and
    the handshake fails (here: a certificate the route verifies and cannot trust)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mx.tls.test").configure_cert(ctx)
    tls_sink = AioSink(HOST, free_port(), tls_context=ctx).start()
    # (a receiver of its own: routes to the same hosts share one site, and its options)
    verify_sink = AioSink(HOST, free_port(), tls_context=ctx).start()
    plain_sink = AioSink(HOST, free_port()).start()
    try:
        d = make_daemon(acceptors=1, shards=1, delivery={
            "hold": False, "route": [
                {"domain": "tls.test", "hosts": [f"{HOST}:{tls_sink.port}"]},
                {"domain": "verify.test", "hosts": [f"{HOST}:{verify_sink.port}"],
                 "tls_verify": True},
                {"domain": "plain.test", "hosts": [f"{HOST}:{plain_sink.port}"]}]})
        msg = b"From: a@example.org\r\nSubject: tls\r\n\r\nbody\r\n"
        for rcpt in ("a@tls.test", "b@verify.test", "c@plain.test"):
            d.send("a@example.org", [rcpt], msg)
        got = wait_until(lambda: (lambda e: e if len(e) == 3 else None)(
            {r: e for r, e in {**events_of(d, "delay"), **events_of(d, "delivery")}.items()}),
            30, "a delivery or delay for each")
        assert {r: (e["type"], e["outbound_tls"]) for r, e in got.items()} == {
            "a@tls.test": ("delivery", "1"), "b@verify.test": ("delay", "-1"),
            "c@plain.test": ("delivery", "0")}
        assert "certificate" in got["b@verify.test"]["raw_reason"].lower()
        assert [t.rcpt_tos for t in tls_sink.snapshot()] == [["a@tls.test"]]
        assert verify_sink.snapshot() == []
    finally:
        tls_sink.stop()
        verify_sink.stop()
        plain_sink.stop()


def test_tls_ca_file_lets_tls_verify_trust_a_private_ca(make_daemon, tmp_path):
    """A smarthost whose certificate a private CA signed could not be verified at all:
    tls_verify trusted only the system's CAs, so such a route deferred every message
    (or the operator turned verification off).  delivery.tls_ca_file adds that CA; a
    certificate of another CA is still refused."""
    private, other = trustme.CA(), trustme.CA()
    good_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    private.issue_cert(HOST).configure_cert(good_ctx)
    bad_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other.issue_cert(HOST).configure_cert(bad_ctx)
    good, bad = (AioSink(HOST, free_port(), tls_context=c).start() for c in (good_ctx, bad_ctx))
    ca_file = tmp_path / "private-ca.pem"
    private.cert_pem.write_to_path(str(ca_file))
    try:
        d = make_daemon(acceptors=1, shards=1, delivery={
            "hold": False, "tls_ca_file": str(ca_file), "route": [
                {"domain": "good.test", "hosts": [f"{HOST}:{good.port}"], "tls_verify": True},
                {"domain": "bad.test", "hosts": [f"{HOST}:{bad.port}"], "tls_verify": True}]})
        msg = b"From: a@example.org\r\nSubject: ca\r\n\r\nbody\r\n"
        for rcpt in ("a@good.test", "b@bad.test"):
            d.send("a@example.org", [rcpt], msg)
        got = wait_until(lambda: (lambda e: e if len(e) == 2 else None)(
            {**events_of(d, "delay"), **events_of(d, "delivery")}), 30, "both outcomes")
        assert {r: (e["type"], e["outbound_tls"]) for r, e in got.items()} == {
            "a@good.test": ("delivery", "1"), "b@bad.test": ("delay", "-1")}
        assert [t.rcpt_tos for t in good.snapshot()] == [["a@good.test"]]
        assert bad.snapshot() == []
    finally:
        good.stop()
        bad.stop()
    # a file that is no CA bundle is named by check-config
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    d2 = make_daemon(start=False, delivery={"tls_ca_file": str(tmp_path / "junk.pem")})
    r = d2.cli("check-config", check=False)
    assert r.returncode == 78 and "delivery.tls_ca_file" in r.stderr.decode(), r


def verifying_sink(ca) -> AioSink:
    """A started sink whose STARTTLS certificate *ca* (trustme) signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(ctx)
    return AioSink(HOST, free_port(), tls_context=ctx).start()


def ca_daemon(make_daemon, ca_file, sink):
    """One delivery process trusting delivery.tls_ca_file *ca_file*, good.test routed to
    *sink* with tls_verify."""
    return make_daemon(acceptors=1, shards=1, delivery={
        "hold": False, "processes": 1, "tls_ca_file": str(ca_file), "route": [
            {"domain": "good.test", "hosts": [f"{HOST}:{sink.port}"], "tls_verify": True}]})


def assert_delivered_verified(d, sink) -> None:
    """A message to a@good.test is delivered over TLS the route verified."""
    d.send("a@example.org", ["a@good.test"],
           b"From: a@example.org\r\nSubject: ca\r\n\r\nbody\r\n")
    got = wait_until(lambda: events_of(d, "delivery") or events_of(d, "delay"), 30,
                     "an outcome")
    assert {r: (e["type"], e["outbound_tls"]) for r, e in got.items()} == {
        "a@good.test": ("delivery", "1")}, got
    assert [t.rcpt_tos for t in sink.snapshot()] == [["a@good.test"]]


def test_a_delivery_process_restarted_after_its_ca_file_is_gone_verifies_with_the_checked_one(
        make_daemon, tmp_path):
    """delivery.tls_ca_file was read and checked by the supervisor at the start; the file
    is then deleted without a reload and the delivery process dies (kill -9).  The one
    started in its place read the file at its start: it died there, again and again, and
    nothing was delivered.  It now loads the bytes the supervisor checked, and verifies
    the smarthost's certificate with them.  A reload reads the file again: refused,
    naming it."""
    import os
    import signal

    private = trustme.CA()
    good = verifying_sink(private)
    ca_file = tmp_path / "private-ca.pem"
    private.cert_pem.write_to_path(str(ca_file))
    try:
        d = ca_daemon(make_daemon, ca_file, good)
        ca_file.unlink()
        old = d.children()["delivery[0]"]
        os.kill(old, signal.SIGKILL)
        new = d.wait_restarted("delivery[0]", old)
        assert_delivered_verified(d, good)
        assert f"delivery[0] pid={new} died" not in d.log()
        text = d.reload(pattern=r"reload refused")
        refused = [x for x in text.splitlines() if "reload refused" in x][-1]
        assert "delivery.tls_ca_file" in refused and str(ca_file) in refused, refused
        assert d.children()["delivery[0]"] == new
    finally:
        good.stop()


def test_a_ca_file_replaced_in_place_is_taken_by_the_delivery_processes_at_a_reload(
        make_daemon, tmp_path):
    """delivery.tls_ca_file's content replaced (a CA bundle updated, same path): a reload
    read and checked the new bytes, but replaced the delivery processes only when the
    configuration's text changed, so they verified with the old CA -- mail to a host
    whose certificate the new CA signed deferred -- while one restarted after a crash
    took the new CA.  A changed CA content now replaces them, as a changed [delivery]."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    sink = verifying_sink(new_ca)
    ca_file = tmp_path / "ca.pem"
    old_ca.cert_pem.write_to_path(str(ca_file))
    try:
        d = ca_daemon(make_daemon, ca_file, sink)
        before = d.children()["delivery[0]"]
        new_ca.cert_pem.write_to_path(str(ca_file))
        text = d.reload()
        assert_delivered_verified(d, sink)
        assert "delivery.tls_ca_file (its content) changed" in text, text[-2000:]
        now = d.children()["delivery[0]"]
        assert now != before
        d.reload()      # the same bytes: nothing to replace
        assert d.children()["delivery[0]"] == now
    finally:
        sink.stop()
