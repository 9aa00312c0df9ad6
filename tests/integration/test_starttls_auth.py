"""STARTTLS, AUTH PLAIN/LOGIN over TLS only, relay control, and their config checks.

The daemon gets a certificate from a throw-away CA (trustme) and an auth_file
made with ``mta passwd``; clients are a raw socket wrapped with ssl after
STARTTLS, and smtplib.  relay_networks is 127.0.0.2/32 only, so a client on
127.0.0.1 relays only once authenticated.
"""
import base64
import json
import smtplib
import ssl
import time

import pytest
import trustme

from daemon import HOST, Daemon
from mta.acceptor import replies as R
from mta.passwords import hash_password

USER, PASSWORD = "alice", "correct horse battery staple"
SLOW_USER = "slow"      # hashed with the default (slow) iteration count


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def client_ctx(ca):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def tls_daemon(factory, tmp, ca, **smtp):
    """A daemon (made by *factory* in *tmp*) with STARTTLS and AUTH for USER and SLOW_USER;
    *smtp*: more [smtp] keys."""
    cert = ca.issue_cert("mta.test", HOST)
    cert_path, key_path, auth_path = tmp / "cert.pem", tmp / "key.pem", tmp / "users"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    d = factory(
        start=False, acceptors=1, shards=1,
        smtp={"tls_certificate": str(cert_path), "tls_key": str(key_path),
              "auth_file": str(auth_path), "relay_networks": ["127.0.0.2/32"], **smtp})
    line = d.cli("passwd", "--iterations", "10000", USER,
                 input=PASSWORD.encode() + b"\n").stdout.decode()
    assert line.startswith(USER + ":pbkdf2_sha256$10000$")
    auth_path.write_text(f"# test users\n{line}{SLOW_USER}:{hash_password(PASSWORD)}\n")
    return d.start()


@pytest.fixture(scope="module")
def mta(make_module_daemon, tmp_path_factory, ca):
    return tls_daemon(make_module_daemon, tmp_path_factory.mktemp("tls"), ca,
                      max_connections_per_ip=4, max_buffered_input=4096)


def starttls(c, ctx) -> None:
    """Send STARTTLS on a raw Client and switch it to TLS."""
    assert c.cmd("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
    c.sock = ctx.wrap_socket(c.sock, server_hostname="mta.test")
    c.rfile = c.sock.makefile("rb")


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def plain(user: str, password: str) -> bytes:
    """An AUTH PLAIN response: base64 of authzid NUL authcid NUL password."""
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


def tls_session(mta, ctx, source: str | None = None):
    """A session that said EHLO, STARTTLS and EHLO again: (client, the extensions offered)."""
    c = mta.session(source=source)
    starttls(c, ctx)
    code, ext = c.cmd("EHLO client.test")
    assert code == 250
    return c, ext


def relay(c) -> bytes:
    """MAIL FROM:<x@example.com> (accepted), then RCPT TO:<y@example.net>: the reply to the
    RCPT, exactly -- whether this session may relay."""
    assert c.cmd("MAIL FROM:<x@example.com>")[0] == 250
    return c.exchange(b"RCPT TO:<y@example.net>\r\n")[0]


def test_ehlo_before_tls_offers_starttls_not_auth(mta):
    with mta.connect() as c:
        code, ext = c.cmd("EHLO client.test")
        assert code == 250
        assert "STARTTLS" in ext
        assert not any(x.startswith("AUTH") for x in ext)
        c.send(b"AUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.ENCRYPTION_REQUIRED
        c.send(b"AUTH LOGIN\r\n")
        assert c.reply_bytes() == R.ENCRYPTION_REQUIRED
        # Still unauthenticated: relaying from 127.0.0.1 is refused.
        assert relay(c) == R.RELAY_DENIED


def test_plaintext_pipelined_after_starttls_is_discarded(mta, client_ctx):
    with mta.session() as c:
        c.send(b"STARTTLS\r\nMAIL FROM:<x@example.com>\r\n")
        assert c.reply_bytes() == R.TLS_GO
        c.sock = client_ctx.wrap_socket(c.sock, server_hostname="mta.test")
        c.rfile = c.sock.makefile("rb")
        code, ext = c.cmd("EHLO client.test")
        assert code == 250
        assert "AUTH PLAIN LOGIN" in ext
        assert "STARTTLS" not in ext
        c.send(b"RCPT TO:<y@example.net>\r\n")
        assert c.reply_bytes() == R.NEED_MAIL     # the pipelined MAIL did not count
        c.send(b"STARTTLS\r\n")
        assert c.reply_bytes() == R.ALREADY_TLS
        assert c.cmd("QUIT")[0] == 221


def test_starttls_needs_ehlo_first(mta):
    with mta.connect() as c:
        c.send(b"STARTTLS\r\n")
        assert c.reply_bytes() == R.NEED_HELO
        c.send(b"EHLO client.test\r\nSTARTTLS now\r\n")
        assert c.reply_bytes().startswith(b"250-mta.test\r\n")
        assert c.reply_bytes() == R.SYNTAX


def test_failed_handshakes_release_their_connection_slot(mta):
    """A client that botches the TLS handshake is closed and does not count any more."""
    src = "127.0.0.8"       # max_connections_per_ip = 4
    for _ in range(6):
        with mta.session(source=src) as c:
            starttls_reply = c.cmd("STARTTLS")
            assert starttls_reply[0] == 220
            c.send(b"EHLO this is not a TLS ClientHello\r\n")
            assert c.closed()
    deadline = time.monotonic() + 5
    while True:
        clients = [mta.connect(source=src) for _ in range(4)]
        banners = [c.banner[0] for c in clients]
        for c in clients:
            c.close()
        if banners == [220] * 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert banners == [220] * 4


def test_command_before_ehlo_after_starttls_needs_helo(mta, client_ctx):
    """TLS starts a new session (RFC 3207 4.2): the pre-TLS EHLO no longer counts."""
    with mta.session() as c:
        starttls(c, client_ctx)
        c.send(b"MAIL FROM:<x@example.com>\r\n")
        assert c.reply_bytes() == R.NEED_HELO


def test_auth_plain(mta, client_ctx):
    c, ext = tls_session(mta, client_ctx)
    with c:
        c.send(b"AUTH PLAIN " + plain(USER, "wrong password") + b"\r\n")
        assert c.reply_bytes() == R.AUTH_FAILED
        c.send(b"AUTH PLAIN " + plain("nobody", PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.AUTH_FAILED
        # "=" is the empty response (RFC 4954): no credentials, not undecodable base64.
        c.send(b"AUTH PLAIN =\r\n")
        assert c.reply_bytes() == R.AUTH_FAILED
        # Not authenticated after failures: relaying is refused.
        assert relay(c) == R.RELAY_DENIED
        c.send(b"RSET\r\n")
        assert c.reply_bytes() == R.OK
        # Without an initial response: an empty challenge, then the credentials.
        c.send(b"AUTH PLAIN\r\n")
        assert c.reply_bytes() == R.AUTH_CHALLENGE_EMPTY
        c.send(plain(USER, PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.AUTH_OK
        c.send(b"AUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.ALREADY_AUTH
        code, ext = c.cmd("EHLO client.test")
        assert code == 250 and not any(x.startswith("AUTH") for x in ext)
        # Authenticated, from 127.0.0.1 (not in relay_networks): relaying is allowed.
        assert relay(c) == R.RCPT_OK


def test_auth_login(mta, client_ctx):
    c, _ = tls_session(mta, client_ctx)
    with c:
        c.send(b"AUTH LOGIN\r\n")
        assert c.reply_bytes() == R.AUTH_USERNAME
        c.send(b64(USER).encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_PASSWORD
        c.send(b64("not it").encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_FAILED
        c.send(b"AUTH LOGIN\r\n")
        assert c.reply_bytes() == R.AUTH_USERNAME
        c.send(b"*\r\n")
        assert c.reply_bytes() == R.AUTH_CANCELLED
        c.send(b"AUTH LOGIN\r\n")
        assert c.reply_bytes() == R.AUTH_USERNAME
        c.send(b"!!not base64!!\r\n")
        assert c.reply_bytes() == R.AUTH_BAD_BASE64
        # With the user name as initial response.
        c.send(f"AUTH LOGIN {b64(USER)}\r\n".encode())
        assert c.reply_bytes() == R.AUTH_PASSWORD
        c.send(b64(PASSWORD).encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_OK
        assert relay(c) == R.RCPT_OK


def test_commands_pipelined_after_auth_wait_for_its_result(mta, client_ctx):
    """The password check runs in a thread; commands sent with AUTH are held until it ends."""
    c, _ = tls_session(mta, client_ctx)
    with c:
        c.send(b"AUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n"
               b"MAIL FROM:<x@example.com>\r\nRCPT TO:<y@example.net>\r\nRSET\r\n")
        assert [c.reply_bytes() for _ in range(4)] == [R.AUTH_OK, R.SENDER_OK, R.RCPT_OK, R.OK]
    c, _ = tls_session(mta, client_ctx)
    with c:
        c.send(b"AUTH PLAIN " + plain(USER, "wrong") + b"\r\n"
               b"MAIL FROM:<x@example.com>\r\nRCPT TO:<y@example.net>\r\nRSET\r\n")
        assert [c.reply_bytes() for _ in range(4)] == \
            [R.AUTH_FAILED, R.SENDER_OK, R.RELAY_DENIED, R.OK]


def test_auth_continuation_after_paused_input(mta, client_ctx):
    """Input held back (reading paused) during a password check is read on in AUTH state.

    More than smtp.max_buffered_input (4 KiB here) arrives while the slow
    password check runs, so the session pauses reading; the pipelined input
    ends with AUTH LOGIN, whose continuation lines must still be read.
    """
    c, _ = tls_session(mta, client_ctx)
    with c:
        c.send(b"AUTH PLAIN " + plain(SLOW_USER, "wrong") + b"\r\n")
        time.sleep(0.05)
        c.send((b"NOOP " + b"n" * 1000 + b"\r\n") * 8 + b"AUTH LOGIN\r\n")
        assert [c.reply_bytes() for _ in range(10)] == \
            [R.AUTH_FAILED] + [R.OK] * 8 + [R.AUTH_USERNAME]
        c.send(b64(SLOW_USER).encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_PASSWORD
        c.send(b64(PASSWORD).encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_OK


def test_auth_unknown_mechanism(mta, client_ctx):
    c, _ = tls_session(mta, client_ctx)
    with c:
        c.send(b"AUTH CRAM-MD5\r\n")
        assert c.reply_bytes() == R.BAD_MECHANISM


def test_smtplib_starttls_login_sendmail(mta, client_ctx):
    body = b"From: x@example.com\r\nTo: y@example.net\r\nSubject: tls\r\n\r\nover TLS\r\n"
    with smtplib.SMTP(HOST, mta.port, local_hostname="client.test") as s:
        s.starttls(context=client_ctx)
        s.login(USER, PASSWORD)
        refused = s.sendmail("x@example.com", ["y@example.net"], body)
        assert refused == {}
    q = [x for x in mta.queue_list() if x["recipients"] == ["y@example.net"]]
    assert len(q) == 1 and q[0]["sender"] == "x@example.com"
    raw = mta.cli("queue", "show", "--raw", q[0]["queue_id"]).stdout
    assert raw.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mta.test (mta) "
                          b"with ESMTPSA id " + q[0]["queue_id"].encode())
    assert raw.endswith(b"\r\n" + body)
    mta.cli("queue", "delete", q[0]["queue_id"])


def test_relay_by_network_or_authentication(mta, client_ctx):
    with mta.session() as c:    # 127.0.0.1, not in relay_networks
        assert relay(c) == R.RELAY_DENIED
        c.send(b"DATA\r\n")
        assert c.reply_bytes() == R.NO_VALID_RCPTS
    with mta.session(source="127.0.0.2") as c:
        assert relay(c) == R.RCPT_OK
    c, _ = tls_session(mta, client_ctx)
    with c:
        c.send(b"AUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.AUTH_OK
        assert relay(c) == R.RCPT_OK



def test_auth_plain_authorization_identity_must_be_the_user(mta, client_ctx):
    """RFC 4616 2: an authzid other than the authcid fails unless the user may act as it,
    and no user here may act as another: alice's password with authzid "bob" is a 535.
    An authzid equal to the user is the same as none."""
    c, _ = tls_session(mta, client_ctx, source="127.0.0.10")
    with c:
        as_bob = base64.b64encode(b"bob\0" + USER.encode() + b"\0" + PASSWORD.encode())
        c.send(b"AUTH PLAIN " + as_bob + b"\r\n")
        assert c.reply_bytes() == R.AUTH_FAILED
        assert relay(c) == R.RELAY_DENIED
        assert c.cmd("RSET")[0] == 250
        as_self = base64.b64encode(f"{USER}\0{USER}\0{PASSWORD}".encode())
        c.send(b"AUTH PLAIN " + as_self + b"\r\n")
        assert c.reply_bytes() == R.AUTH_OK
        assert relay(c) == R.RCPT_OK


def test_an_auth_user_name_cannot_forge_log_lines(mta, client_ctx):
    """The user name an AUTH exchange sends is the client's text: one with a line break
    (or any control character) would write a log line of its choosing after "authentication
    failed for" -- a forged "authenticated as" line, or one a log watcher bans an address
    for.  It is refused like wrong credentials, and logged escaped."""
    forged = "2026-01-01 00:00:00,000 INFO acceptor[0][1]: client=203.0.113.9 forged"
    failures = mta.log().count("authentication failed for")
    c, _ = tls_session(mta, client_ctx, source="127.0.0.11")
    with c:
        c.send(b"AUTH PLAIN " + plain("mallory\n" + forged, PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.AUTH_FAILED
        c.send(b"AUTH LOGIN " + b64(USER + "\r" + forged).encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_PASSWORD
        c.send(b64(PASSWORD).encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_FAILED
        assert relay(c) == R.RELAY_DENIED
    text = mta.wait_log("authentication failed for", count=failures + 2)
    assert not [line for line in text.splitlines() if line.startswith(forged[:20])]
    assert "client=203.0.113.9 forged" in text      # escaped, on the failure's own line


def test_failed_auth_from_one_address_is_bounded_across_connections(make_daemon, tmp_path,
                                                                       ca, client_ctx):
    """smtp.max_auth_failures within smtp.auth_failure_window: past that many failed
    attempts from one address, AUTH from it gets 454 4.7.0 without a password check --
    the right password included, in any new connection -- until the window has passed.
    Without it a client guesses without end (max_errors only ends one connection, and
    it may hold max_connections_per_ip of them), each guess a PBKDF2 in the acceptor's
    worker threads.  Other addresses are not affected."""
    d = tls_daemon(make_daemon, tmp_path, ca, max_auth_failures=3, auth_failure_window=3)
    guesser = "127.0.0.12"
    for n in range(3):
        c, _ = tls_session(d, client_ctx, source=guesser)
        with c:
            c.send(b"AUTH PLAIN " + plain(USER, f"guess {n}") + b"\r\n")
            assert c.reply_bytes() == R.AUTH_FAILED
    started = time.monotonic()
    c, _ = tls_session(d, client_ctx, source=guesser)
    with c:
        c.send(b"AUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.AUTH_LOCKED
        c.send(b"AUTH LOGIN " + b64(USER).encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_PASSWORD
        c.send(b64(PASSWORD).encode() + b"\r\n")
        assert c.reply_bytes() == R.AUTH_LOCKED
        assert relay(c) == R.RELAY_DENIED
    c, _ = tls_session(d, client_ctx, source="127.0.0.13")
    with c:
        c.send(b"AUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.AUTH_OK
    assert time.monotonic() - started < 3, "too slow to see the lock inside its window"
    time.sleep(max(0.0, started + 3.2 - time.monotonic()))
    c, _ = tls_session(d, client_ctx, source=guesser)
    with c:
        c.send(b"AUTH PLAIN " + plain(USER, PASSWORD) + b"\r\n")
        assert c.reply_bytes() == R.AUTH_OK
        assert relay(c) == R.RCPT_OK


# ------------------------------------------------------------------ check-config


def _check_config(tmp_path, **smtp):
    d = Daemon(tmp_path, smtp=smtp)
    return d.cli("check-config", "-c", d.config_path, check=False)


def test_check_config_auth_file_needs_tls(tmp_path):
    users = tmp_path / "users"
    users.write_text("")
    r = _check_config(tmp_path, auth_file=str(users))
    assert r.returncode == 78
    assert r.stderr.decode().startswith("mta: configuration error: smtp.auth_file:")


def test_check_config_names_unreadable_certificate_and_key(tmp_path, ca):
    cert = ca.issue_cert("mta.test")
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    r = _check_config(tmp_path, tls_certificate=str(tmp_path / "missing.pem"),
                      tls_key=str(key_path))
    assert r.returncode == 78
    assert r.stderr.decode().startswith("mta: configuration error: smtp.tls_certificate:")
    r = _check_config(tmp_path, tls_certificate=str(cert_path),
                      tls_key=str(tmp_path / "missing-key.pem"))
    assert r.returncode == 78
    assert r.stderr.decode().startswith("mta: configuration error: smtp.tls_key:")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    r = _check_config(tmp_path, tls_certificate=str(garbage), tls_key=str(key_path))
    assert r.returncode == 78
    assert r.stderr.decode().startswith("mta: configuration error: smtp.tls_certificate:")
    r = _check_config(tmp_path, tls_certificate=str(cert_path), tls_key=str(key_path))
    assert r.returncode == 0, r.stderr.decode()


# ------------------------------------------------- the files broken without a reload


@pytest.mark.parametrize("broken", ["deleted", "truncated"])
def test_an_acceptor_restarted_after_its_tls_key_is_broken_starts_with_the_checked_one(
        make_daemon, tmp_path, ca, client_ctx, broken):
    """The supervisor checked the certificate and key at the start; the key file is then
    deleted (or left empty, as by a deploy or a renewal half done) without a reload, and
    the acceptor dies (kill -9).  The one the supervisor started in its place loaded the
    files at its start: it died there, again and again, and its slot took no mail.  It
    now loads the bytes the supervisor checked: STARTTLS works and mail is taken.  A
    reload reads the files again: it is refused, naming the file, and what runs stays."""
    import os
    import signal

    d = tls_daemon(make_daemon, tmp_path, ca)
    key_path = tmp_path / "key.pem"
    if broken == "deleted":
        key_path.unlink()
    else:
        key_path.write_bytes(b"")
    old = d.children()["acceptor[0]"]
    os.kill(old, signal.SIGKILL)
    new = d.wait_restarted("acceptor[0]", old)
    body = b"From: x@example.com\r\nTo: y@example.net\r\nSubject: tls\r\n\r\nkept key\r\n"
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=10) as s:
        s.starttls(context=client_ctx)
        s.login(USER, PASSWORD)
        assert s.sendmail("x@example.com", ["y@example.net"], body) == {}
    assert f"acceptor[0] pid={new} died" not in d.log()
    text = d.reload(pattern=r"reload refused")
    refused = [x for x in text.splitlines() if "reload refused" in x][-1]
    assert "smtp.tls_" in refused and str(key_path) in refused, refused
    assert d.children()["acceptor[0]"] == new
    c, ext = tls_session(d, client_ctx)
    with c:
        assert "AUTH PLAIN LOGIN" in ext
    # (`mta queue list` reads no TLS file: the key is still broken)
    q = [x for x in d.queue_list() if x["recipients"] == ["y@example.net"]]
    assert len(q) == 1 and q[0]["sender"] == "x@example.com"


def test_the_operators_commands_work_while_the_tls_key_is_broken(make_daemon, tmp_path, ca):
    """While the key file is broken (a renewal half done), the daemon runs on with the key
    it checked -- and the operator needs `mta queue`, `mta status`, `mta drain` most then.
    They read only the config's addresses and paths, yet refused (exit 78, naming the
    key) because they checked every file the config names.  `mta check-config` and
    `mta upgrade`, which are about those files, still refuse."""
    d = tls_daemon(make_daemon, tmp_path, ca)
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(b"")
    for args in (("queue", "--json"), ("queue", "list"), ("status", "--json"),
                 ("queue", "summary", "--json"), ("rules", "list", "--json"),
                 ("suspend", "--list"), ("spool-dump",)):
        r = d.cli(*args, check=False)
        assert r.returncode == 0, (args, r.stderr.decode())
    assert json.loads(d.cli("queue", "--json").stdout)["total"]["messages"] == 0
    r = d.cli("check-config", check=False)
    assert r.returncode == 78 and "smtp.tls_" in r.stderr.decode(), r
    r = d.cli("upgrade", "--timeout", "5", check=False)
    assert r.returncode == 78 and "smtp.tls_" in r.stderr.decode(), r


def test_the_tls_files_and_auth_file_replaced_in_place_are_taken_at_a_reload(
        make_daemon, tmp_path, ca, client_ctx):
    """The certificate, key and auth_file are read by the supervisor and handed to the
    acceptors as bytes; files replaced in place (same paths: a renewal, a password
    changed) are taken at the next reload, as every reload replaces the acceptors: the
    new certificate is served and the new password logs in, the old one no longer."""
    d = tls_daemon(make_daemon, tmp_path, ca)
    renewed = ca.issue_cert("mta.test", HOST)
    renewed.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    renewed.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    line = d.cli("passwd", "--iterations", "10000", USER,
                 input=b"a new password\n").stdout.decode()
    (tmp_path / "users").write_text(line)
    d.reload()
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=10) as s:
        s.starttls(context=client_ctx)
        assert s.sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(
            renewed.cert_chain_pems[0].bytes().decode())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login(USER, PASSWORD)
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=10) as s:
        s.starttls(context=client_ctx)
        s.login(USER, "a new password")
