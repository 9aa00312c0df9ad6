"""STARTTLS and AUTH for the SMTP session: the two verbs and the exchanges they start.

Both verbs are handlers in the session's verb table (``smtp.VERBS``), called
as ``handler(session, arg)`` like the session's own; they use the session's
handler interface (``state``, ``out``, ``reply_error()``, ``flush()``,
``process()``) and two hooks it has for them, ``tls_started()`` and
``authenticated()``.

STARTTLS (RFC 3207) is offered when ``smtp.tls_certificate`` is set.  After
"220 Ready to start TLS" the session discards what the client pipelined in
plaintext, stops reading, and the handshake runs on the loop (bounded by
``smtp.command_timeout``).  Then the session starts over on the TLS transport
as if the client had just connected: no EHLO, no transaction (RFC 3207 4.2).
A failed handshake aborts the connection.

AUTH PLAIN (RFC 4616) and LOGIN, with an initial response or on continuation
lines (RFC 4954), are offered only over TLS and only when ``smtp.auth_file``
has users.  The password is checked with :func:`mta.passwords.check_password`
in a worker thread (PBKDF2 costs tens of milliseconds by design) while the
session holds its input.  An authenticated client may relay from any address;
its user name goes into the Received header (ESMTPSA) and the message's client
description.  A failed check is an error reply (counted towards
``smtp.max_errors``); a check that raises is 454 4.7.0, not counted.

What the client's credentials may not do:

- guess without end.  ``smtp.max_errors`` ends one connection, but a client may
  open another (``max_connections_per_ip`` at a time), and each guess costs a
  PBKDF2 in the acceptor's worker threads -- shared with the reading of
  reports and the HTTP API's store calls.  So every 535 counts against the
  client (:class:`Failures`; an IPv6 client by its network, as
  ``peers.client_key`` says): past ``smtp.max_auth_failures`` within
  ``smtp.auth_failure_window`` seconds, AUTH from it gets 454 4.7.0 without a
  check, whatever the password, until the window has passed.  Per acceptor
  process (as ``max_connections_per_ip``), and forgotten when the acceptor is
  replaced (a reload).  The right password is refused too: otherwise the
  reply would still tell a guess from the others.
- act as someone else.  A PLAIN authorization identity (authzid) other than
  the user is refused (535): RFC 4616 2 allows it only where the user may act
  as that identity, and nobody may here; the same name, or none, is the user.
- write the logs.  A user name is the client's text, and one with a line break
  would put a line of its choosing after "authentication failed for" (a
  forged "authenticated as", or an address for a log watcher to ban).  No
  user in ``smtp.auth_file`` has a control character in its name (the file
  is read line by line), so such a name is refused without a check and logged
  escaped.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable

from mta.acceptor import replies as R
from mta.passwords import check_password
from mta.acceptor.state import State

log = logging.getLogger("mta.acceptor")

# (plain ints, as a session's state is: see mta/acceptor/smtp.py)
_CONNECTED = int(State.CONNECTED)
_READY = int(State.READY)
_WAITING = int(State.WAITING)
_AUTH = int(State.AUTH)
_TLS = int(State.TLS)

PLAIN = b"PLAIN"
LOGIN = b"LOGIN"


# -------------------------------------------------------------------- STARTTLS


def starttls(session, arg: bytes) -> None:
    """STARTTLS: say go, drop the plaintext input, stop reading and start the handshake."""
    a = session.a
    if a.ssl_context is None or not session.esmtp and session.state == _CONNECTED:
        session.reply_error(R.NOT_IMPLEMENTED if a.ssl_context is None else R.NEED_HELO)
        return
    if session.tls:
        session.reply_error(R.ALREADY_TLS)
        return
    if arg:
        session.reply_error(R.SYNTAX)
        return
    session.out.append(R.TLS_GO)
    session.flush()
    # RFC 3207 4.2: nothing the client sent before the handshake may count.
    # Stop reading plaintext now; start_tls resumes reading through TLS.
    session.scanner.discard()
    session.state = _TLS
    session.transport.pause_reading()
    a.loop.create_task(_handshake(session))


async def _handshake(session) -> None:
    """Run the TLS handshake; the session starts over on the new transport, or is aborted."""
    a = session.a
    session.scanner.discard()
    try:
        transport = await a.loop.start_tls(session.transport, session, a.ssl_context,
                                           server_side=True,
                                           ssl_handshake_timeout=a.smtp.command_timeout)
    except (OSError, ConnectionError, asyncio.TimeoutError, Exception) as exc:
        log.info("TLS handshake with %s failed: %s", session.peer_ip, type(exc).__name__)
        if session.transport is not None:
            session.transport.abort()
        return
    if transport is None:
        return
    session.tls_started(transport)


# ------------------------------------------------------------------------ AUTH


class Exchange:
    """An AUTH exchange waiting for the client's next line (the session is in State.AUTH)."""

    __slots__ = ("mech", "user")

    def __init__(self, mech: bytes):
        self.mech = mech
        self.user: str | None = None     # LOGIN: the user name, once given


def auth(session, arg: bytes) -> None:
    """AUTH mechanism [initial-response]: check or ask for the credentials."""
    if not session.a.auth_users:
        session.reply_error(R.AUTH_NOT_AVAILABLE)
        return
    if not session.tls:
        session.reply_error(R.ENCRYPTION_REQUIRED)
        return
    if session.state == _CONNECTED:
        session.reply_error(R.NEED_HELO)
        return
    if session.user is not None:
        session.reply_error(R.ALREADY_AUTH)
        return
    if session.state != _READY:
        session.reply_error(R.BAD_SEQUENCE)
        return
    words = arg.split()
    if not words or len(words) > 2:
        session.reply_error(R.SYNTAX)
        return
    mech = words[0].upper()
    initial = words[1] if len(words) == 2 else None
    if mech == PLAIN:
        if initial is None:
            _ask(session, Exchange(PLAIN), R.AUTH_CHALLENGE_EMPTY)
        else:
            _plain(session, initial)
    elif mech == LOGIN:
        if initial is None:
            _ask(session, Exchange(LOGIN), R.AUTH_USERNAME)
        else:
            _login_user(session, Exchange(LOGIN), initial)
    else:
        session.reply_error(R.BAD_MECHANISM)


def auth_continue(session, line: bytes) -> None:
    """The client's line in an AUTH exchange: "*" cancels, else base64 credentials."""
    exchange = session.auth_exchange
    session.auth_exchange = None
    session.state = _READY
    if line == b"*":
        session.reply_error(R.AUTH_CANCELLED)
    elif exchange.mech == PLAIN:
        _plain(session, line)
    elif exchange.user is None:
        _login_user(session, exchange, line)
    else:
        try:
            password = _decode(line)
        except (binascii.Error, ValueError):
            session.reply_error(R.AUTH_BAD_BASE64)
            return
        _check(session, exchange.user, password)


def _ask(session, exchange: Exchange, challenge: bytes) -> None:
    """Send a 334 challenge and read the client's next line as the answer."""
    session.auth_exchange = exchange
    session.state = _AUTH
    session.out.append(challenge)


def _decode(b64: bytes) -> bytes:
    """A SASL response: base64, where a single "=" is the empty response (RFC 4954,
    section 4: an initial response of zero length is sent as "=").  Raises
    binascii.Error when it is not base64."""
    if b64 == b"=":
        return b""
    return base64.b64decode(b64, validate=True)


def _login_user(session, exchange: Exchange, b64: bytes) -> None:
    try:
        exchange.user = _decode(b64).decode("utf-8")
    except (binascii.Error, ValueError):
        session.state = _READY
        session.reply_error(R.AUTH_BAD_BASE64)
        return
    _ask(session, exchange, R.AUTH_PASSWORD)


def _plain(session, b64: bytes) -> None:
    """PLAIN: authzid NUL authcid NUL password (RFC 4616); an authzid, if any, must be
    the authcid (the module docstring says why).

    A response that is not base64 is a 501; one that is, but is no PLAIN message
    (not three parts, a user name that is not UTF-8, the empty response "="), is a
    535 like wrong credentials (RFC 4954, section 6)."""
    try:
        raw = _decode(b64)
    except (binascii.Error, ValueError):
        session.reply_error(R.AUTH_BAD_BASE64)
        return
    try:
        authzid, authcid, password = raw.split(b"\0")
        user = authcid.decode("utf-8")
    except ValueError:
        log.info("client=%s sent a malformed AUTH PLAIN response", session.peer_ip)
        _failed(session)
        return
    if authzid and authzid != authcid:
        log.info("client=%s: AUTH PLAIN asked to act as another user (authzid); refused",
                 session.peer_ip)
        _failed(session)
        return
    _check(session, user, password)


def _check(session, user: str, password: bytes) -> None:
    """Check the password in a worker thread; hold the session meanwhile.

    Not for a client past its failed attempts (454), nor for a user name that
    cannot be in the file (535): see the module docstring."""
    a = session.a
    if a.auth_failures.locked(session.client_key):
        log.info("client=%s: AUTH refused unchecked, too many failed attempts from it",
                 session.peer_ip)
        session.reply_error(R.AUTH_LOCKED)
        return
    if not user.isprintable():
        log.info("client=%s authentication failed for %s (a user name with control "
                 "characters, refused unchecked)", session.peer_ip, ascii(user))
        _failed(session)
        return
    session.state = _WAITING
    fut = a.loop.run_in_executor(None, check_password, a.auth_users, user, password)
    fut.add_done_callback(lambda f: _checked(session, f, user))


def _checked(session, fut, user: str) -> None:
    """The check is done: answer, and go on with the input that waited."""
    if session.closing:
        return
    session.state = _READY
    try:
        ok = fut.result()
    except Exception:
        session.out.append(R.AUTH_TEMP)
        ok = None
    if ok:
        session.authenticated(user)
        session.out.append(R.AUTH_OK)
        log.info("client=%s authenticated as %s", session.peer_ip, user)
    elif ok is False:
        log.info("client=%s authentication failed for %s", session.peer_ip, user)
        _failed(session)
    session.flush()
    if not session.closing:
        session.process()


def _failed(session) -> None:
    """Answer 535, and count the failure against the client's address."""
    session.a.auth_failures.failed(session.client_key)
    session.reply_error(R.AUTH_FAILED)


class Failures:
    """Failed AUTH attempts per client address, in windows of *window* seconds.

    A window opens at an address's first failure and holds *limit* of them;
    once it is full, :meth:`locked` is true until *window* seconds after it
    opened.  At most *capacity* addresses are remembered: when full, the
    windows that have passed are dropped, then the quarter that failed least
    recently (a client with many addresses can push its own out, which gives it
    no more guesses than its addresses already do).  Every address counts,
    loopback and relay_networks too: an application that keeps failing from
    behind one address (a NAT, a balancer without PROXY, 127.0.0.1) locks AUTH
    for every client there until the window has passed.
    """

    __slots__ = ("limit", "window", "now", "capacity", "by_ip")

    def __init__(self, limit: int, window: float, now: Callable[[], float],
                 capacity: int = 65536):
        self.limit = limit
        self.window = window
        self.now = now
        self.capacity = capacity
        self.by_ip: dict[str, tuple[float, int]] = {}   # ip -> (window opened, failures)

    def locked(self, ip: str) -> bool:
        got = self.by_ip.get(ip)
        if got is None:
            return False
        if self.now() - got[0] >= self.window:
            del self.by_ip[ip]
            return False
        return got[1] >= self.limit

    def failed(self, ip: str) -> None:
        now = self.now()
        by_ip = self.by_ip
        got = by_ip.pop(ip, None)
        if got is None or now - got[0] >= self.window:
            if len(by_ip) >= self.capacity:
                self._make_room(now)
            got = (now, 0)
        by_ip[ip] = (got[0], got[1] + 1)    # (re-inserted: last failure last, so room is
        #                                     made from the least recently failed)

    def _make_room(self, now: float) -> None:
        by_ip = self.by_ip
        for ip in [ip for ip, (opened, _) in by_ip.items() if now - opened >= self.window]:
            del by_ip[ip]
        if len(by_ip) >= self.capacity:
            for ip in list(by_ip)[:max(1, self.capacity // 4)]:
                del by_ip[ip]
