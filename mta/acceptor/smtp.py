"""The SMTP server session: an asyncio.Protocol fed by the Cython scanner.

One :class:`Session` per connection.  ``data_received`` feeds the scanner and
then pulls events one at a time (:meth:`Session._process`), so pipelined
commands are handled in order and a command that switches mode (DATA, BDAT,
STARTTLS) takes effect before the next byte is looked at.  Replies are
collected and written once per read, which is what makes PIPELINING cheap.

When a message is complete it goes to its spool shard (``Acceptor.commit``)
and the session stops processing input until the shard answers: 250 only once
the shard says the message is on disk, 451 4.3.0 on a storage error, on
back-pressure (the bus queue is full) or when no answer comes within
``smtp.spool_timeout``.

Protocol notes:
- Only CRLF "." CRLF ends DATA (the scanner guarantees it).  A message that
  contains a bare CR or a bare LF is rejected with 550 5.6.0 — it is never
  normalised — so no second message can be smuggled inside one.
- After STARTTLS, anything the client pipelined in plaintext is discarded and
  the session starts over (RFC 3207 §4.2); AUTH is offered only over TLS.
- Relay: recipients are accepted only from ``smtp.relay_networks`` or
  authenticated sessions; otherwise 554 5.7.1.
- A Received header is prepended; the rest of the message is kept byte-exact.

Hot path cost: per pipelined transaction three command parses, one header
build, one bus send, one write; no per-line Python work inside DATA.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import ipaddress
import logging
import re

from mta import rfcdate
from mta.acceptor import replies as R
from mta.acceptor.auth import check_password
from mta.scancodes import (EV_COMMAND, EV_COMMAND_TOO_LONG, EV_DATA, FLAG_BARE_CR, FLAG_BARE_LF,
                           FLAG_LONG_LINE, FLAG_NUL, FLAG_TOO_BIG, MODE_COMMAND)

log = logging.getLogger("mta.acceptor")


class State(enum.IntEnum):
    CONNECTED = 0   # greeting sent, no EHLO/HELO yet
    READY = 1       # EHLO done, no transaction
    MAIL = 2        # MAIL accepted
    RCPT = 3        # at least one RCPT accepted
    BDAT = 4        # inside a BDAT sequence
    WAITING = 5     # waiting for the spool (or AUTH check); input is held
    AUTH = 6        # reading an AUTH continuation line
    TLS = 7         # STARTTLS under way; input is discarded
    CLOSED = 8


# The states as plain module globals for the hot path: ``State.READY`` is an
# attribute lookup on the enum's metaclass (about 75 ns on 3.11, against 15 ns
# for a global), and every event compares the state several times.
_CONNECTED = State.CONNECTED
_READY = State.READY
_MAIL = State.MAIL
_RCPT = State.RCPT
_BDAT = State.BDAT
_WAITING = State.WAITING
_AUTH = State.AUTH
_TLS = State.TLS
_CLOSED = State.CLOSED


MAX_PATH = 256          # RFC 5321 4.5.3.1.3, octets in a forward/reverse path
MAX_LOCAL_PART = 64     # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255        # RFC 5321 4.5.3.1.2
MAX_HELO = 255

# Address syntax (RFC 5321 4.1.2, RFC 6531 for UTF-8), as compiled patterns: one
# match per address instead of a Python loop over its octets (2.5-6.5 us -> <1 us).
_LABEL = rb"[A-Za-z0-9{u}](?:[A-Za-z0-9{u}-]{{0,61}}[A-Za-z0-9{u}])?"
_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{u}-]+"
_QUOTED = rb'"[\x20-\x7e{u}]*"'


def _address_re(u: bytes):
    label = _LABEL.replace(b"{u}", u).replace(b"{{", b"{").replace(b"}}", b"}")
    atom = _ATOM.replace(b"{u}", u).replace(b"{{", b"{").replace(b"}}", b"}")
    quoted = _QUOTED.replace(b"{u}", u)
    local = rb"(?:" + atom + rb"(?:\." + atom + rb")*|" + quoted + rb")"
    domain = rb"(?:" + label + rb"(?:\." + label + rb")*|\[[^\[\]]+\])"
    return re.compile(rb"(" + local + rb")@(" + domain + rb")", re.S)


_ADDR_ASCII = _address_re(b"")
_ADDR_UTF8 = _address_re(b"\x80-\xff")


def _valid_literal(d: bytes) -> bool:
    lit = d[1:-1].decode("ascii", "replace")
    if lit[:5].lower() == "ipv6:":
        lit = lit[5:]
    try:
        ipaddress.ip_address(lit)
    except ValueError:
        return False
    return True


def parse_path(raw: bytes, utf8: bool) -> str | None:
    """Check an SMTP path like ``<user@example.com>``; return the address, '' for ``<>``.

    Returns None when the syntax is not acceptable.  A source route
    (``<@a,@b:user@c>``) is accepted and dropped, as RFC 5321 asks.
    """
    if not 2 <= len(raw) <= MAX_PATH + 2 or raw[0] != 0x3C or raw[-1] != 0x3E:
        return None
    addr = raw[1:-1]
    if not addr:
        return ""
    if addr[0] == 0x40:  # source route
        colon = addr.find(b":")
        if colon < 0:
            return None
        addr = addr[colon + 1:]
    m = (_ADDR_UTF8 if utf8 else _ADDR_ASCII).fullmatch(addr)
    if m is None:
        return None
    # The match starts at 0, so the end of the local part is its length, and
    # the domain follows its "@" (one call, no group objects built).
    at = m.end(1)
    if at > MAX_LOCAL_PART or len(addr) - at - 1 > MAX_DOMAIN:
        return None
    if addr[at + 1] == 0x5B and not _valid_literal(addr[at + 1:]):
        return None
    try:
        return addr.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_params(raw: bytes) -> dict[str, str] | None:
    """Split ESMTP parameters ``KEY=VALUE KEY`` into an upper-cased dict; None on bad syntax."""
    out = {}
    for word in raw.split():
        key, _, value = word.partition(b"=")
        if not key or not key.isalnum():
            return None
        try:
            out[key.decode("ascii").upper()] = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return out


_date = rfcdate.DateCache()


class Session(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, acceptor):
        self.a = acceptor
        cfg = acceptor.smtp
        self.scanner = acceptor.scanner_mod.Scanner(
            cfg.max_command_line, cfg.max_text_line, cfg.max_message_size)
        self.state = _CONNECTED
        self.transport = None
        self.out: list[bytes] = []
        self.peer_ip = ""
        self.relay_ok = False
        self.tls = False
        self.user: str | None = None
        self.helo = ""
        self.esmtp = False
        self.errors = 0
        self.last_activity = 0.0
        self.reading_paused = False
        self.writing_paused = False
        self.closing = False
        self._now = acceptor.loop.time
        # The Received header up to the queue id depends only on the session's
        # client (helo, peer, ESMTP, TLS, AUTH): built once, and dropped
        # (set to None) wherever one of those changes.
        self._received_head: str | None = None
        self._reset_transaction()

    # ------------------------------------------------------------- transport

    def connection_made(self, transport) -> None:
        self.transport = transport
        a = self.a
        self.last_activity = self._now()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        # While draining, a connection accepted just before the listener closed
        # is served like any other; the drain closes it once it is idle.
        if len(a.sessions) >= a.smtp.max_connections:
            a.stats["rejected_connections"] += 1
            self._close_with(R.TOO_MANY_CONNECTIONS)
            return
        n = a.per_ip.get(self.peer_ip, 0)
        if n >= a.smtp.max_connections_per_ip:
            a.stats["rejected_connections"] += 1
            self._close_with(R.TOO_MANY_FROM_IP)
            return
        a.per_ip[self.peer_ip] = n + 1
        a.sessions.add(self)
        self.relay_ok = a.relay_allowed(self.peer_ip)
        transport.write(a.greeting)

    def connection_lost(self, exc) -> None:
        a = self.a
        if self in a.sessions:
            a.sessions.discard(self)
            n = a.per_ip.get(self.peer_ip, 1) - 1
            if n:
                a.per_ip[self.peer_ip] = n
            else:
                a.per_ip.pop(self.peer_ip, None)
        self.state = _CLOSED
        self.closing = True
        a.session_gone()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.state not in (_WAITING, _CLOSED):
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closing:
            self.reading_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = self._now()
        self.scanner.feed(data)
        st = self.state
        if st == _TLS:
            # Reading was paused at STARTTLS, so this is already decrypted data
            # that arrived with the end of the handshake; it is handled once
            # the upgrade is complete.
            return
        if st != _WAITING:
            self._process()
        elif self.scanner.buffered > self.a.smtp.max_buffered_input:
            self._pause_reading()

    def eof_received(self):
        return False  # close our side too

    def _flush(self) -> None:
        out = self.out
        if out:
            # Usually one reply: write it as is rather than join a list of one.
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _close_with(self, reply: bytes) -> None:
        self.out.append(reply)
        self._flush()
        self.closing = True
        self.state = _CLOSED
        self.transport.close()

    def _reply_error(self, reply: bytes) -> None:
        """Send an error reply; too many of them end the session."""
        self.errors += 1
        if self.errors >= self.a.smtp.max_errors:
            self.out.append(reply)
            self._close_with(R.TOO_MANY_ERRORS)
        else:
            self.out.append(reply)

    def _reset_transaction(self) -> None:
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.params: dict = {}
        self.chunks: list[bytes] = []
        self.chunk_flags = 0

    # ------------------------------------------------------------ main loop

    def _process(self) -> None:
        """Handle every complete event in the input, in order, until one needs to wait."""
        nxt = self.scanner.next
        handlers = COMMANDS
        while True:
            st = self.state
            if st >= _WAITING and st != _AUTH:
                break
            ev = nxt()
            if ev is None:
                break
            kind, payload, flags = ev
            if kind == EV_COMMAND:
                if st == _AUTH:
                    self._auth_continue(payload)
                    continue
                verb, _, arg = payload.partition(b" ")
                h = handlers.get(verb)
                if h is None:
                    # Clients mostly send verbs in upper case: upper() only when needed.
                    verb = verb.upper()
                    h = handlers.get(verb)
                if h is None:
                    self._reply_error(R.UNKNOWN)
                elif st == _BDAT and verb not in BDAT_ALLOWED:
                    self._reply_error(R.BAD_SEQUENCE)
                else:
                    h(self, arg)
            elif kind == EV_COMMAND_TOO_LONG:
                self._reply_error(R.LINE_TOO_LONG)
            elif kind == EV_DATA:
                self._message_complete(payload, flags)
            else:  # EV_CHUNK
                self._chunk_complete(payload, flags)
            if self.closing:
                return
        if not self.closing:
            out = self.out
            if out:     # self._flush(), inlined: this runs after every read
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
                out.clear()
            # AUTH waits for a continuation line from the client: read on, too.
            if self.reading_paused and not self.writing_paused:
                st = self.state
                if st < _WAITING or st == _AUTH:
                    self._resume_reading()

    # -------------------------------------------------------------- commands

    def cmd_helo(self, arg: bytes, esmtp: bool = False) -> None:
        name = arg.strip()
        if not name or len(name) > MAX_HELO or not all(0x21 <= c < 0x7F for c in name):
            self._reply_error(R.SYNTAX)
            return
        self.helo = name.decode("ascii")
        self.esmtp = esmtp
        self._received_head = None
        self._reset_transaction()
        self.scanner.reset_message()
        self.state = _READY
        if esmtp:
            self.out.append(self.a.ehlo_reply(self.tls, self.user is not None))
        else:
            self.out.append(self.a.helo_reply)

    def cmd_ehlo(self, arg: bytes) -> None:
        self.cmd_helo(arg, esmtp=True)

    def cmd_mail(self, arg: bytes) -> None:
        st = self.state
        if st == _CONNECTED:
            self._reply_error(R.NEED_HELO)
            return
        if st != _READY:
            self._reply_error(R.NESTED_MAIL)
            return
        if arg[:5].upper() != b"FROM:":
            self._reply_error(R.SYNTAX)
            return
        a = self.a
        if a.draining:
            self._close_with(R.SHUTTING_DOWN)
            return
        if a.space_low:
            self.out.append(R.STORAGE_FULL)
            return
        rest = arg[5:].lstrip(b" ")
        end = rest.find(b">")
        if end < 0:
            self._reply_error(R.BAD_SENDER)
            return
        tail = rest[end + 1:]
        if tail:
            params = self._mail_params(tail)
            if params is None:
                return
            utf8 = "SMTPUTF8" in params
        else:
            params = {}     # the common case: nothing to parse or check
            utf8 = False
        path = rest[:end + 1]
        sender = parse_path(path, utf8)
        if sender is None:
            if not utf8 and any(c >= 0x80 for c in path) and parse_path(path, True) is not None:
                self._reply_error(R.NEED_SMTPUTF8)
            else:
                self._reply_error(R.BAD_SENDER)
            return
        self.sender = sender
        self.params = params
        self.state = _MAIL
        self.out.append(R.SENDER_OK)

    def _mail_params(self, raw: bytes) -> dict | None:
        """Parse and check MAIL parameters; None when refused (the error reply is sent)."""
        params = parse_params(raw) if self.esmtp else ({} if not raw.strip() else None)
        if params is None:
            self._reply_error(R.SYNTAX)
            return None
        for key, value in params.items():
            if key == "SIZE":
                if not value.isdigit():
                    self._reply_error(R.SYNTAX)
                    return None
                if int(value) > self.a.smtp.max_message_size:
                    self._reply_error(R.TOO_BIG)
                    return None
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self._reply_error(R.BAD_PARAM)
                    return None
            elif key == "SMTPUTF8":
                if value:
                    self._reply_error(R.SYNTAX)
                    return None
            elif key == "AUTH":
                pass  # RFC 4954 5: accepted, not trusted
            else:
                self._reply_error(R.BAD_PARAM)
                return None
        return params

    def cmd_rcpt(self, arg: bytes) -> None:
        st = self.state
        if st != _MAIL and st != _RCPT:
            self._reply_error(R.NEED_HELO if st == _CONNECTED else R.NEED_MAIL)
            return
        if arg[:3].upper() != b"TO:":
            self._reply_error(R.SYNTAX)
            return
        rest = arg[3:].lstrip(b" ")
        end = rest.find(b">")
        if end < 0:
            self._reply_error(R.BAD_RCPT)
            return
        if rest[end + 1:].strip():
            self._reply_error(R.BAD_PARAM)  # NOTIFY/ORCPT: DSN is not offered
            return
        utf8 = "SMTPUTF8" in self.params
        path = rest[:end + 1]
        rcpt = parse_path(path, utf8)
        if not rcpt:
            if not utf8 and any(c >= 0x80 for c in path) and parse_path(path, True):
                self._reply_error(R.NEED_SMTPUTF8)
            else:
                self._reply_error(R.BAD_RCPT)
            return
        if not (self.relay_ok or self.user is not None):
            self._reply_error(R.RELAY_DENIED)
            return
        if len(self.rcpts) >= self.a.smtp.max_recipients:
            self.out.append(R.TOO_MANY_RCPTS)
            return
        self.rcpts.append(rcpt)
        self.state = _RCPT
        self.out.append(R.RCPT_OK)

    def cmd_data(self, arg: bytes) -> None:
        st = self.state
        if arg:
            self._reply_error(R.SYNTAX)
        elif st == _RCPT:
            self.out.append(R.START_DATA)
            self.scanner.start_data()
        elif st == _MAIL:
            self._reply_error(R.NO_VALID_RCPTS)
        elif st == _CONNECTED:
            self._reply_error(R.NEED_HELO)
        else:
            self._reply_error(R.NEED_MAIL)

    def cmd_bdat(self, arg: bytes) -> None:
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or \
                (len(words) == 2 and words[1].upper() != b"LAST"):
            # The chunk size is unknown, so the input cannot be resynchronised.
            self._close_with(R.SYNTAX)
            return
        size = int(words[0])
        last = len(words) == 2
        self.chunk_size = size
        if self.state in (_RCPT, _BDAT):
            if self.state == _RCPT:
                self.scanner.reset_message()
                self.chunks = []
                self.chunk_flags = 0
            self.state = _BDAT
            self.chunk_last = last
            self.chunk_ok = True
        else:
            # RFC 3030: the chunk must still be read, then rejected.
            self.chunk_last = last
            self.chunk_ok = False
        self.scanner.start_chunk(size, last)

    def cmd_rset(self, arg: bytes) -> None:
        if self.state not in (_CONNECTED,):
            self.state = _READY
        self._reset_transaction()
        self.scanner.reset_message()
        self.out.append(R.OK)

    def cmd_noop(self, arg: bytes) -> None:
        self.out.append(R.OK)

    def cmd_quit(self, arg: bytes) -> None:
        self._close_with(R.BYE)

    def cmd_vrfy(self, arg: bytes) -> None:
        if not arg.strip():
            self._reply_error(R.SYNTAX)
        else:
            self.out.append(R.VRFY)

    def cmd_expn(self, arg: bytes) -> None:
        self._reply_error(R.NOT_IMPLEMENTED)

    def cmd_help(self, arg: bytes) -> None:
        self.out.append(R.HELP)

    def cmd_starttls(self, arg: bytes) -> None:
        a = self.a
        if a.ssl_context is None or not self.esmtp and self.state == _CONNECTED:
            self._reply_error(R.NOT_IMPLEMENTED if a.ssl_context is None else R.NEED_HELO)
            return
        if self.tls:
            self._reply_error(R.ALREADY_TLS)
            return
        if arg:
            self._reply_error(R.SYNTAX)
            return
        self.out.append(R.TLS_GO)
        self._flush()
        # RFC 3207 4.2: nothing the client sent before the handshake may count.
        # Stop reading plaintext now; start_tls resumes reading through TLS.
        self.scanner.discard()
        self.state = _TLS
        self.transport.pause_reading()
        a.loop.create_task(self._start_tls())

    async def _start_tls(self) -> None:
        a = self.a
        self.scanner.discard()
        try:
            transport = await a.loop.start_tls(self.transport, self, a.ssl_context,
                                               server_side=True,
                                               ssl_handshake_timeout=a.smtp.command_timeout)
        except (OSError, ConnectionError, asyncio.TimeoutError, Exception) as exc:
            log.info("TLS handshake with %s failed: %s", self.peer_ip, type(exc).__name__)
            if self.transport is not None:
                self.transport.abort()
            return
        if transport is None:
            return
        self.transport = transport
        self.reading_paused = False
        self.tls = True
        self.scanner.reset_message()
        self._reset_transaction()
        self.helo = ""
        self.esmtp = False
        self._received_head = None
        self.state = _CONNECTED
        self.last_activity = a.loop.time()
        self._process()  # decrypted commands that arrived with the handshake

    def cmd_auth(self, arg: bytes) -> None:
        a = self.a
        if not a.auth_users:
            self._reply_error(R.AUTH_NOT_AVAILABLE)
            return
        if not self.tls:
            self._reply_error(R.ENCRYPTION_REQUIRED)
            return
        if self.state == _CONNECTED:
            self._reply_error(R.NEED_HELO)
            return
        if self.user is not None:
            self._reply_error(R.ALREADY_AUTH)
            return
        if self.state != _READY:
            self._reply_error(R.BAD_SEQUENCE)
            return
        words = arg.split()
        if not words or len(words) > 2:
            self._reply_error(R.SYNTAX)
            return
        mech = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if mech == b"PLAIN":
            self.auth_mech = b"PLAIN"
            if initial is None:
                self.state = _AUTH
                self.out.append(R.AUTH_CHALLENGE_EMPTY)
            else:
                self._auth_plain(initial)
        elif mech == b"LOGIN":
            self.auth_mech = b"LOGIN"
            self.auth_user = None
            if initial is None:
                self.state = _AUTH
                self.out.append(R.AUTH_USERNAME)
            else:
                self._auth_login_user(initial)
        else:
            self._reply_error(R.BAD_MECHANISM)

    def _auth_continue(self, line: bytes) -> None:
        self.state = _READY
        if line == b"*":
            self._reply_error(R.AUTH_CANCELLED)
        elif self.auth_mech == b"PLAIN":
            self._auth_plain(line)
        elif self.auth_user is None:
            self._auth_login_user(line)
        else:
            try:
                password = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                self._reply_error(R.AUTH_BAD_BASE64)
                return
            self._auth_check(self.auth_user, password)

    def _auth_login_user(self, b64: bytes) -> None:
        try:
            self.auth_user = base64.b64decode(b64, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            self.state = _READY
            self._reply_error(R.AUTH_BAD_BASE64)
            return
        self.state = _AUTH
        self.out.append(R.AUTH_PASSWORD)

    def _auth_plain(self, b64: bytes) -> None:
        try:
            raw = base64.b64decode(b64, validate=True)
            _authzid, authcid, password = raw.split(b"\0")
            user = authcid.decode("utf-8")
        except (binascii.Error, ValueError):
            self._reply_error(R.AUTH_BAD_BASE64)
            return
        self._auth_check(user, password)

    def _auth_check(self, user: str, password: bytes) -> None:
        """Check the password in a worker thread; hold the session meanwhile."""
        self.state = _WAITING
        a = self.a
        fut = a.loop.run_in_executor(None, check_password, a.auth_users, user, password)
        fut.add_done_callback(lambda f: self._auth_done(f, user))

    def _auth_done(self, fut, user: str) -> None:
        if self.closing:
            return
        self.state = _READY
        try:
            ok = fut.result()
        except Exception:
            self.out.append(R.AUTH_TEMP)
            ok = None
        if ok:
            self.user = user
            self._received_head = None
            self.out.append(R.AUTH_OK)
            log.info("client=%s authenticated as %s", self.peer_ip, user)
        elif ok is False:
            log.info("client=%s authentication failed for %s", self.peer_ip, user)
            self._reply_error(R.AUTH_FAILED)
        self._flush()
        if not self.closing:
            self._process()

    # -------------------------------------------------------------- messages

    def _message_complete(self, payload: bytes, flags: int) -> None:
        """DATA ended: reject it, or send it to the spool and wait for the answer."""
        if flags & _REJECTED_FLAGS:
            self._reset_transaction()
            self.state = _READY
            self._reply_error(self._check_flags(flags))
            return
        self.state = _WAITING
        self.a.commit(self, payload)

    def _chunk_complete(self, payload: bytes, flags: int) -> None:
        if not self.chunk_ok:
            self._reply_error(R.BAD_SEQUENCE if self.state != _CONNECTED else R.NEED_HELO)
            return
        self.chunk_flags |= flags
        if payload:
            self.chunks.append(payload)
        if not self.chunk_last:
            # The chunk's size: the payload is b"" once the message is too big.
            self.out.append(R.CHUNK_OK.format(n=self.chunk_size).encode())
            return
        reply = self._check_flags(self.chunk_flags)
        if reply is not None:
            self._reset_transaction()
            self.state = _READY
            self._reply_error(reply)
            return
        body = b"".join(self.chunks)
        self.chunks = []
        self._commit(body)

    def _check_flags(self, flags: int) -> bytes | None:
        """The rejection for a message with scanner *flags*, or None (see _REJECTED_FLAGS)."""
        if flags & FLAG_TOO_BIG:
            return R.TOO_BIG
        if flags & _BARE_LINE_END:
            return R.BARE_LINE_END
        if flags & FLAG_NUL:    # a downstream server that drops NULs could see a line
            return R.NUL_IN_TEXT  # "." that we did not: refuse it (RFC 6152 text)
        if flags & FLAG_LONG_LINE:
            return R.LONG_TEXT_LINE.format(n=self.a.smtp.max_text_line).encode()
        return None

    def _received(self, qid: str) -> bytes:
        """The Received header for the current message, which gets queue id *qid*."""
        head = self._received_head
        if head is None:
            with_ = "ESMTP" if self.esmtp else "SMTP"
            if self.tls:
                with_ += "S"
            if self.user is not None:
                with_ += "A"
            lit = ("IPv6:" + self.peer_ip) if ":" in self.peer_ip else self.peer_ip
            head = self._received_head = (f"Received: from {self.helo} ([{lit}])\r\n"
                                          f"\tby {self.a.hostname} (mta) with {with_} id ")
        rcpts = self.rcpts
        if len(rcpts) == 1:
            return f"{head}{qid}\r\n\tfor <{rcpts[0]}>;\r\n\t{_date.now()}\r\n".encode()
        return f"{head}{qid};\r\n\t{_date.now()}\r\n".encode()

    def _commit(self, payload: bytes) -> None:
        self.state = _WAITING
        self.a.commit(self, payload)

    def committed(self, qid: str, ok: bool) -> None:
        """The spool's answer (or a timeout) for the message this session sent."""
        if self.closing:
            return
        if ok:
            self.out.append((_QUEUED_HEAD + qid + _QUEUED_TAIL).encode())
        else:
            self.out.append(R.STORAGE_TEMP)
        self._reset_transaction()
        self.state = _READY
        self.last_activity = self._now()
        # The reply goes out with whatever the pipelined input that waited
        # meanwhile brings: _process() writes self.out once at its end, or
        # on every path that closes the session.
        self._process()

    # ---------------------------------------------------------- housekeeping

    def idle_check(self, now: float, draining: bool, force: bool) -> None:
        """Called about once a second: time out idle clients, close on shutdown."""
        st = self.state
        if st in (_CLOSED, _TLS) or self.closing:
            return
        if force:
            if st == _WAITING:
                return  # the spool answer (or its timeout) comes first
            self._close_with(R.SHUTTING_DOWN)
            return
        idle = now - self.last_activity
        if draining and st in (_CONNECTED, _READY) and idle >= DRAIN_IDLE \
                and not self.scanner.buffered:
            self._close_with(R.SHUTTING_DOWN)
            return
        if st == _WAITING:
            return
        in_data = self.scanner.mode != MODE_COMMAND
        limit = self.a.smtp.data_timeout if in_data else self.a.smtp.command_timeout
        if idle > limit:
            self._close_with(R.TIMEOUT)


# Scanner flags that make _check_flags() reject a message (FLAG_8BIT does not).
_BARE_LINE_END = FLAG_BARE_LF | FLAG_BARE_CR
_REJECTED_FLAGS = FLAG_TOO_BIG | _BARE_LINE_END | FLAG_NUL | FLAG_LONG_LINE

# R.QUEUED split around its queue id, so the reply is two concatenations.
_QUEUED_HEAD, _, _QUEUED_TAIL = R.QUEUED.partition("{qid}")

DRAIN_IDLE = 1.0   # seconds: on shutdown, a session idle between transactions this long is closed

COMMANDS = {
    b"EHLO": Session.cmd_ehlo,
    b"HELO": Session.cmd_helo,
    b"MAIL": Session.cmd_mail,
    b"RCPT": Session.cmd_rcpt,
    b"DATA": Session.cmd_data,
    b"BDAT": Session.cmd_bdat,
    b"RSET": Session.cmd_rset,
    b"NOOP": Session.cmd_noop,
    b"QUIT": Session.cmd_quit,
    b"VRFY": Session.cmd_vrfy,
    b"EXPN": Session.cmd_expn,
    b"HELP": Session.cmd_help,
    b"STARTTLS": Session.cmd_starttls,
    b"AUTH": Session.cmd_auth,
}

# Inside a BDAT sequence only these may come between chunks (RFC 3030).
BDAT_ALLOWED = frozenset((b"BDAT", b"RSET", b"QUIT", b"NOOP"))
