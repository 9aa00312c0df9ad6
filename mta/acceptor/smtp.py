"""The SMTP server session of the acceptor: one asyncio.Protocol per client connection.

What it does: speaks RFC 5321 with one client — EHLO/HELO, MAIL, RCPT, DATA,
BDAT (CHUNKING), RSET, NOOP, QUIT, VRFY (252), HELP, with PIPELINING, SIZE,
8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES and DSN (RFC 3461: ENVID and RET on
MAIL, NOTIFY and ORCPT on RCPT, checked here -- a bad value gets 501 5.5.4 --
and kept in the message's params: "ENVID", "RET", and "NOTIFY" / "ORCPT" as
lists parallel to the recipients); STARTTLS and AUTH are in
``tls_auth.py``.  Every verb is a row of :data:`VERBS`, every state a member of
:class:`~mta.acceptor.state.State`, every reply a constant in ``replies.py``.
Relay: recipients are accepted only from ``smtp.relay_networks`` or from
authenticated clients; otherwise 554 5.7.1.  Reports: a recipient at a
``feedback.bounce_domains`` domain is accepted from any client (DSNs and ARF
reports come back to the return path from anywhere); such a transaction holds
only such recipients (a recipient of the other kind: 452 4.5.3, sent again by
the client in a transaction of its own) and is read, not relayed
(``Acceptor.take_report``, ``reports.py``).  ``RCPT TO:<Postmaster>`` (no
domain, any case: RFC 5321 4.5.1) stands for ``smtp.postmaster``
(postmaster@ server.hostname by default) and is then a recipient like any
other, relay rules included: this MTA has no local mailboxes.  A domain in
U-labels or with an ``xn--`` label that is not a valid IDN (``mta.idn``) gets
553 5.1.3 at RCPT (5.1.7 at MAIL) instead of a bounce after the 250.

Reads:   the client's bytes, through the SMTP input scanner
         (``native.load("scanner")``: ``ext/scanner.pyx`` or its pure twin).
Writes:  replies to the client, collected and written once per read.
Hands over: each finished message as one :class:`Submission` to
         ``Acceptor.commit`` (``main.py``), which sends it to its spool shard
         over the bus; the session itself talks to no other process.
Peers:   the SMTP client; the spool shards only through ``Acceptor``.
Config:  [smtp] max_connections, max_connections_per_ip (per client as
         ``peers.client_key`` counts it: ipv6_client_prefix), max_command_line,
         max_text_line, max_message_size, max_recipients, max_errors,
         max_junk_commands,
         max_buffered_input, command_timeout, data_timeout, linger_timeout,
         postmaster; through the
         acceptor relay_networks, banner, tls_certificate/tls_key, auth_file,
         max_auth_failures, auth_failure_window (tls_auth.py).

Hot path: ``data_received`` feeds the scanner, then :meth:`Session.process`
pulls events one at a time, so pipelined commands are handled in order and a
command that switches mode (DATA, BDAT, STARTTLS) takes effect before the next
byte is looked at.  Per pipelined transaction: three command parses (a dict
lookup per verb), one Received header from a per-session cached head, one
Submission, one write; no per-line Python work inside DATA (the scanner
unstuffs and flags in C).

Messages: only CRLF "." CRLF ends DATA (the scanner guarantees it).  A message
that contains a bare CR or LF is rejected with 550 5.6.0 — never normalised —
so no second message can be smuggled inside one; so is one with a NUL or an
over-long line (550 5.6.0) or over the size limit (552 5.3.4).  A Received
header is prepended; the rest of the message is kept byte-exact (unless
``smtp.add_missing_headers`` puts a missing Message-ID and Date in front, and
DKIM signing its fields: ``Acceptor.submit``).

Failure and pressure: while the spool has its message, the session holds
further input (buffered, not processed); 250 only once the shard says the
message is on disk, 451 4.3.0 on a storage error, on back-pressure or when no
answer comes within ``smtp.spool_timeout``; 452 4.3.1 at MAIL while the spool
is low on space.  Too many error replies (``smtp.max_errors``) or an idle
client (``command_timeout``, ``data_timeout`` in DATA/BDAT) end the session
with 421; so does shutdown (idle sessions after a second, the rest after
``server.shutdown_timeout``).  A session the server closes lingers: the write
side is shut after the reply and the client's input is dropped for up to
``smtp.linger_timeout``, so a command that crossed the 421 does not turn it
into a connection reset.  Input beyond ``smtp.max_buffered_input`` while
waiting, or a client that does not read, pauses reading.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec

from mta import dsn, native, rfcdate
from mta.idn import ascii_address, domain_problem
from mta.acceptor import replies as R
from mta.acceptor.closing import close_lingering
from mta.acceptor.peers import client_key
from mta.acceptor import proxy
from mta.acceptor import tls_auth
from mta.acceptor.state import State
from mta.scancodes import (EV_COMMAND, EV_COMMAND_TOO_LONG, EV_DATA, FLAG_BARE_CR, FLAG_BARE_LF,
                           FLAG_LONG_LINE, FLAG_NUL, FLAG_TOO_BIG, MODE_COMMAND)

log = logging.getLogger("mta.acceptor")

# The states as plain module globals for the hot path: ``State.READY`` is an
# attribute lookup on the enum's metaclass (about 75 ns on 3.11, against 15 ns
# for a global), and every event compares the state several times.  They are
# the members' values, plain ints (a session's ``state`` is one): 3.11 compares
# two ints in the interpreter's loop, an IntEnum member through the generic
# rich comparison, a call.
_CONNECTED = int(State.CONNECTED)
_READY = int(State.READY)
_MAIL = int(State.MAIL)
_RCPT = int(State.RCPT)
_BDAT = int(State.BDAT)
_WAITING = int(State.WAITING)
_AUTH = int(State.AUTH)
_TLS = int(State.TLS)
_CLOSED = int(State.CLOSED)

# Scanner flags that make a message rejected (FLAG_8BIT does not); see _check_flags().
_BARE_LINE_END = FLAG_BARE_LF | FLAG_BARE_CR
_REJECTED_FLAGS = FLAG_TOO_BIG | _BARE_LINE_END | FLAG_NUL | FLAG_LONG_LINE

# R.QUEUED split around its queue id, so the reply is two concatenations.
_QUEUED_HEAD, _, _QUEUED_TAIL = R.QUEUED.partition("{qid}")

DRAIN_IDLE = 1.0   # seconds: on shutdown, a session idle between transactions this long is closed
CHUNK_PARTS = 64   # BDAT chunks of a message kept as they came; the rest is copied into the last


class Submission(msgspec.Struct, frozen=True):
    """A finished message, handed by the session to ``Acceptor.commit`` as one value.

    ``client`` describes the client for the envelope and the logs
    ("helo [ip]", plus " user=name" when authenticated); ``peer_ip`` is its
    address.  ``payload`` is the message as received (unstuffed, no Received
    header yet).  ``received(qid)`` returns the Received header to prepend once
    the message has its queue id; ``committed(qid, ok)`` is the spool's answer,
    called exactly once: ok only when the message is on disk; or instead
    ``refused(reply)``: the message is refused by policy with *reply* (its
    policy_rejection events are on disk, or *reply* is a temporary failure).

    A msgspec Struct: slots and a constructor in C, one per message for about
    a third of what a Python ``__init__`` of eight fields costs.
    """

    sender: str
    rcpts: list[str]
    params: dict            # MAIL parameters, upper-case keys
    client: str
    peer_ip: str
    payload: bytes
    received: Callable[[str], bytes]
    committed: Callable[[str, bool], None]
    refused: Callable[[bytes], None]


MAX_HELO = 255

# The path check of MAIL and RCPT (RFC 5321 4.1.2 and 4.5.3.1, RFC 6531 for UTF-8):
# parse_path(raw, utf8) is the address, '' for <>, or None; a source route is dropped.
# Compiled (ext/smtppath.pyx): a regular expression's fullmatch, twice per transaction,
# cost ~10 % of it; the pure twin (mta/_pure/smtppath.py) has the patterns.
parse_path = native.load("smtppath").parse_path


def parse_params(raw: bytes, utf8: bool = False) -> dict[str, str] | None:
    """Split ESMTP parameters ``KEY=VALUE KEY`` into an upper-cased dict.

    None on bad syntax, and when a keyword is given twice.  Values are ASCII;
    *utf8* (a transaction with SMTPUTF8) lets them be UTF-8 (RFC 6533 3's ORCPT).
    """
    out = {}
    for word in raw.split():
        key, _, value = word.partition(b"=")
        if not key or not key.isalnum():
            return None
        try:
            k = key.decode("ascii").upper()
            if k in out:
                return None
            out[k] = value.decode("utf-8" if utf8 else "ascii")
        except UnicodeDecodeError:
            return None
    return out


_date = rfcdate.DateCache()


class Session(asyncio.Protocol):
    """One SMTP connection.

    Verb handlers (here and in ``tls_auth.py``) are called as ``handler(session,
    arg)`` and use: ``state``, ``out`` (replies to send, written once per
    read), ``reply_error()``, ``flush()``, ``close_with()``, ``process()``, the
    client's ``tls``, ``user``, ``esmtp``, ``peer_ip``, and ``scanner``.
    """

    # Slots: a session has more attributes than 3.11 keeps in an instance's inline
    # values (30), so without them each session's attributes went to a dict of its
    # own, and every self.x on the hot path was a dict lookup instead of a slot read.
    # Every attribute a session is given is named here (tests/acceptor/test_slots.py).
    __slots__ = ("a", "scanner", "state", "transport", "out", "peer_ip", "client_key",
                 "relay_ok", "tls", "user", "helo", "esmtp", "errors", "junk", "last_activity",
                 "reading_paused", "writing_paused", "closing", "lost", "peer_eof", "proxy",
                 "auth_exchange", "chunk_size", "chunk_last", "chunk_ok", "_now",
                 "_received_head", "_client", "sender", "rcpts", "params", "chunks",
                 "chunk_flags", "report", "mail_at")

    def __init__(self, acceptor):
        self.a = acceptor
        cfg = acceptor.smtp
        self.scanner = acceptor.scanner_mod.Scanner(
            cfg.max_command_line, cfg.max_text_line, cfg.max_message_size)
        self.state = _CONNECTED
        self.transport = None
        self.out: list[bytes] = []
        self.peer_ip = ""
        self.client_key = ""        # the client as per-client limits count it (peers.py)
        self.relay_ok = False
        self.tls = False
        self.user: str | None = None
        self.helo = ""
        self.esmtp = False
        self.errors = 0
        self.junk = 0               # NOOP, RSET, VRFY, HELP since the last message queued
        self.last_activity = 0.0
        self.reading_paused = False
        self.writing_paused = False
        self.closing = False
        self.lost = False          # connection_lost came
        self.peer_eof = False      # the client shut its side while an answer was owed
        self.proxy: proxy.Reader | None = None   # a balancer's PROXY header, being read
        self.auth_exchange: tls_auth.Exchange | None = None
        self.chunk_size = 0         # BDAT: the size of the chunk being read
        self.chunk_last = False     # BDAT: it is the LAST one
        self.chunk_ok = False       # BDAT: it belongs to a transaction (else it is read and refused)
        self._now = acceptor.loop.time
        # What the session says about its client (the Received header up to the
        # queue id, the client description) depends only on helo, peer, ESMTP,
        # TLS and AUTH: built once, and dropped by client_changed() wherever
        # one of those changes.
        self._received_head: str | None = None
        self._client: str | None = None
        self._reset_transaction()

    # ------------------------------------------------------------- transport

    def connection_made(self, transport) -> None:
        self.transport = transport
        a = self.a
        self.last_activity = self._now()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        if proxy.begin(self, a.smtp.max_connections):
            return      # a load balancer: its PROXY header names the client
        self._admit()

    def _proxy_failed(self, why: str) -> None:
        log.warning("connection from %s, a proxy_protocol_from network: %s; closed",
                    self.peer_ip, why)
        proxy.forget(self)
        self.closing = True
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    def _proxy_refused(self) -> None:
        log.warning("connection from %s: a PROXY protocol header, from an address not in "
                    "server.proxy_protocol_from; closed", self.peer_ip)
        self.close_with(R.PROXY_NOT_ACCEPTED)

    def _admit(self) -> None:
        a = self.a
        transport = self.transport
        # While draining, a connection accepted just before the listener closed
        # is served like any other; the drain closes it once it is idle.
        if a.node_draining:         # mta drain: the node takes no new mail
            a.stats["rejected_connections"] += 1
            self.close_with(R.NODE_DRAINING)
            return
        if len(a.sessions) >= a.smtp.max_connections:
            a.stats["rejected_connections"] += 1
            self.close_with(R.TOO_MANY_CONNECTIONS)
            return
        key = self.client_key = client_key(self.peer_ip, a.smtp.ipv6_client_prefix)
        n = a.per_ip.get(key, 0)
        if n >= a.smtp.max_connections_per_ip:
            a.stats["rejected_connections"] += 1
            self.close_with(R.TOO_MANY_FROM_IP)
            return
        a.per_ip[key] = n + 1
        a.sessions.add(self)
        a.m.smtp_connections.value += 1
        self.relay_ok = a.relay_allowed(self.peer_ip)
        transport.write(a.greeting)

    def connection_lost(self, exc) -> None:
        a = self.a
        proxy.forget(self)
        if self in a.sessions:
            a.sessions.discard(self)
            n = a.per_ip.get(self.client_key, 1) - 1
            if n:
                a.per_ip[self.client_key] = n
            else:
                a.per_ip.pop(self.client_key, None)
        self.state = _CLOSED
        self.closing = True
        self.lost = True
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
        if self.proxy is not None:
            proxy.take(self, data)
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
            self.process()
        elif self.scanner.buffered > self.a.smtp.max_buffered_input:
            self._pause_reading()

    def eof_received(self):
        if self.state == _WAITING and not self.closing and not self.tls:
            # A half-close after a pipelined session (printf ... | nc -N): the message
            # handed over still gets its answer, and the input held meanwhile (QUIT)
            # its own; process() closes once nothing waits.  Over TLS the transport
            # closes on a close_notify whatever this returns.
            self.peer_eof = True
            return True
        return False  # close our side too; replies already written still go out

    def flush(self) -> None:
        """Write the replies collected so far."""
        out = self.out
        if out:
            # Usually one reply: write it as is rather than join a list of one.
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def close_with(self, reply: bytes) -> None:
        """Send *reply* (after what is collected) and close the connection, lingering.

        Closing a socket with unread input makes the kernel answer with a
        reset, and a client whose next command crossed our 421 then reads
        ECONNRESET instead of the reply.  So the write side is shut down
        after the reply (the client reads it, then end of file) and whatever
        the client still sends is read and dropped until it closes too, or
        for at most ``smtp.linger_timeout`` seconds (then the connection is
        aborted).  Over TLS the transport's own close (close_notify) is used,
        aborted as well if the connection is still there then
        (:mod:`mta.acceptor.closing`).
        """
        self.out.append(reply)
        self.flush()
        self.closing = True
        self.state = _CLOSED
        close_lingering(self, self.a.loop, self.a.smtp.linger_timeout, self.peer_eof)

    def _junk(self, reply: bytes) -> None:
        """Answer a command that moves no mail (NOOP, RSET, VRFY, HELP): past
        ``smtp.max_junk_commands`` of them since the session's last message queued, each
        counts as an error, so that a client that only talks is closed after
        ``max_errors`` more (Postfix's smtpd_junk_command_limit).  A client that keeps
        sending mail -- an RSET before each MAIL -- is never closed by it."""
        self.junk += 1
        if self.junk > self.a.smtp.max_junk_commands:
            self.reply_error(reply)
        else:
            self.out.append(reply)

    def reply_error(self, reply: bytes) -> None:
        """Send an error reply; too many of them end the session."""
        self.errors += 1
        if self.errors >= self.a.smtp.max_errors:
            self.out.append(reply)
            self.close_with(R.TOO_MANY_ERRORS)
        else:
            self.out.append(reply)

    def _reset_transaction(self) -> None:
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.params: dict = {}
        self.chunks: list[bytes | bytearray] = []
        self.chunk_flags = 0
        self.report = False     # its recipients are at a bounce domain (a report)

    # ------------------------------------------------------------ main loop

    def process(self) -> None:
        """Handle every complete event in the input, in order, until one needs to wait."""
        # (scanner.next() each time, not a bound method kept in a local: that one is an
        # object made and freed at every call of process(), where the interpreter calls
        # a method of the scanner's type without making one)
        scanner = self.scanner
        handlers = COMMANDS
        while True:
            st = self.state
            if st >= _WAITING and st != _AUTH:
                break
            ev = scanner.next()
            if ev is None:
                break
            kind, payload, flags = ev
            if kind == EV_COMMAND:
                if st == _AUTH:
                    tls_auth.auth_continue(self, payload)
                    continue
                verb, _, arg = payload.partition(b" ")
                h = handlers.get(verb)
                if h is None:
                    # Clients mostly send verbs in upper case: upper() only when needed.
                    verb = verb.upper()
                    h = handlers.get(verb)
                if h is None:
                    self.reply_error(R.UNKNOWN)
                elif st == _BDAT and verb not in BDAT_ALLOWED:
                    self.reply_error(R.BAD_SEQUENCE)
                else:
                    h(self, arg)
            elif kind == EV_COMMAND_TOO_LONG:
                self.reply_error(R.LINE_TOO_LONG)
            elif kind == EV_DATA:
                self._message_complete(payload, flags)
            else:  # EV_CHUNK
                self._chunk_complete(payload, flags)
            if self.closing:
                return
        if not self.closing:
            out = self.out
            if out:     # self.flush(), inlined: this runs after every read
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
                out.clear()
            if self.peer_eof and self.state != _WAITING:
                # The client shut its side and has every answer it waited for.
                self.closing = True
                self.state = _CLOSED
                close_lingering(self, self.a.loop, self.a.smtp.linger_timeout, True)
                return
            # AUTH waits for a continuation line from the client: read on, too.
            if self.reading_paused and not self.writing_paused:
                st = self.state
                if st < _WAITING or st == _AUTH:
                    self._resume_reading()

    # ------------------------------------------------- the client, TLS and AUTH

    def client_changed(self) -> None:
        """Forget what was built from helo, TLS or AUTH (they changed)."""
        self._received_head = None
        self._client = None

    def tls_started(self, transport) -> None:
        """The TLS handshake is done: go on over *transport* as a new session (RFC 3207 4.2)."""
        self.transport = transport
        self.reading_paused = False
        self.tls = True
        self.scanner.reset_message()
        self._reset_transaction()
        self.helo = ""
        self.esmtp = False
        self.client_changed()
        self.state = _CONNECTED
        self.last_activity = self._now()
        self.process()  # decrypted commands that arrived with the handshake

    def authenticated(self, user: str) -> None:
        """AUTH succeeded for *user*: it may relay, and it is named in what follows."""
        self.user = user
        self.client_changed()

    # -------------------------------------------------------------- commands

    def cmd_helo(self, arg: bytes, esmtp: bool = False) -> None:
        name = arg.strip()
        if not name or len(name) > MAX_HELO or not all(0x21 <= c < 0x7F for c in name):
            self.reply_error(R.SYNTAX)
            return
        self.helo = name.decode("ascii")
        self.esmtp = esmtp
        self.client_changed()
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
            self.reply_error(R.NEED_HELO)
            return
        if st != _READY:
            self.reply_error(R.NESTED_MAIL)
            return
        if arg[:5].upper() != b"FROM:":
            self.reply_error(R.SYNTAX)
            return
        a = self.a
        if a.draining:
            self.close_with(R.SHUTTING_DOWN)
            return
        if a.node_draining:
            self.close_with(R.NODE_DRAINING)
            return
        if a.space_low:
            self.out.append(R.STORAGE_FULL)
            return
        rest = arg[5:].lstrip(b" ")
        end = rest.find(b">")
        if end < 0:
            self.reply_error(R.BAD_SENDER)
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
                self.reply_error(R.NEED_SMTPUTF8)
            else:
                self.reply_error(R.BAD_SENDER)
            return
        if (not sender.isascii() or "n--" in sender or "N--" in sender) and \
                domain_problem(sender.rpartition("@")[2]) is not None:
            self.reply_error(R.BAD_SENDER_DOMAIN)     # (an IDN: its bounces could not go)
            return
        self.sender = sender
        self.params = params
        self.state = _MAIL
        self.mail_at = self.last_activity   # the transaction's first byte came in this read
        self.out.append(R.SENDER_OK)

    def _mail_params(self, raw: bytes) -> dict | None:
        """Parse and check MAIL parameters; None when refused (the error reply is sent)."""
        params = parse_params(raw) if self.esmtp else ({} if not raw.strip() else None)
        if params is None:
            self.reply_error(R.SYNTAX)
            return None
        for key, value in params.items():
            if key == "SIZE":
                if not value.isdigit():
                    self.reply_error(R.SYNTAX)
                    return None
                if int(value) > self.a.smtp.max_message_size:
                    self.reply_error(R.TOO_BIG)
                    return None
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self.reply_error(R.BAD_PARAM)
                    return None
            elif key == "SMTPUTF8":
                if value:
                    self.reply_error(R.SYNTAX)
                    return None
            elif key == "AUTH":
                pass  # RFC 4954 5: accepted, not trusted
            elif key == "ENVID":
                if dsn.parse_envid(value) is None:
                    self.reply_error(R.BAD_ENVID)
                    return None
            elif key == "RET":
                ret = dsn.parse_ret(value)
                if ret is None:
                    self.reply_error(R.BAD_RET)
                    return None
                params[key] = ret
            else:
                self.reply_error(R.BAD_PARAM)
                return None
        return params

    def cmd_rcpt(self, arg: bytes) -> None:
        self.a.m.smtp_rcpt_seen += 1
        st = self.state
        if st != _MAIL and st != _RCPT:
            self.reply_error(R.NEED_HELO if st == _CONNECTED else R.NEED_MAIL)
            return
        if arg[:3].upper() != b"TO:":
            self.reply_error(R.SYNTAX)
            return
        rest = arg[3:].lstrip(b" ")
        end = rest.find(b">")
        if end < 0:
            self.reply_error(R.BAD_RCPT)
            return
        tail = rest[end + 1:]
        notify = orcpt = ""
        if tail.strip():
            got = self._rcpt_params(tail)
            if got is None:
                return
            notify, orcpt = got
        utf8 = "SMTPUTF8" in self.params
        path = rest[:end + 1]
        rcpt = parse_path(path, utf8)
        if not rcpt:
            if path[1:-1].lower() == b"postmaster":
                # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted.
                # It stands for smtp.postmaster and is checked as that address
                # below (relay rules included), so it opens no relay.
                rcpt = self.a.postmaster
            elif not utf8 and any(c >= 0x80 for c in path) and parse_path(path, True):
                self.reply_error(R.NEED_SMTPUTF8)
            else:
                self.reply_error(R.BAD_RCPT)
            if not rcpt:
                return
        if (not rcpt.isascii() or "n--" in rcpt or "N--" in rcpt) and \
                domain_problem(rcpt.rpartition("@")[2]) is not None:
            self.reply_error(R.BAD_RCPT_DOMAIN)       # (an IDN delivery could not route)
            return
        domains = self.a.bounce_domains
        # A report to a return path (feedback.bounce_domains) is taken from anyone;
        # reports and mail to relay never share a transaction (the first decides).
        report = bool(domains) and rcpt.rpartition("@")[2].lower().rstrip(".") in domains
        if self.rcpts and report != self.report:
            self.out.append(R.REPORT_SEPARATELY)
            return
        if not (report or self.relay_ok or self.user is not None):
            # (no event is made of it; the log is where an operator finds a client that
            # should be in relay_networks -- a refusal costs this line, not an accepted RCPT)
            log.info("client=%s: relay access denied: from=<%s> to=<%s> (not in "
                     "smtp.relay_networks, not authenticated)", self.peer_ip, self.sender,
                     rcpt)
            self.reply_error(R.RELAY_DENIED)
            return
        if rcpt[-1] == "]" and self.a.ipv6_literal_routes is not None:
            literal = rcpt.rpartition("@")[2].lower()
            if ":" in literal and literal not in self.a.ipv6_literal_routes:
                self.out.append(R.NO_IPV6_ROUTE)     # ([IPv6:...]: it would bounce later)
                return
        if len(self.rcpts) >= self.a.smtp.max_recipients:
            self.out.append(R.TOO_MANY_RCPTS)
            return
        refuse = self.a.refuse_suppressed   # suppression.smtp_action = "refuse"
        if refuse is not None and not report and refuse.check(rcpt, False):
            self._refuse_rcpt(rcpt, R.SUPPRESSED)
            return
        self.report = report
        if notify or orcpt or "NOTIFY" in self.params:
            self._rcpt_dsn(notify, orcpt)
        self.rcpts.append(rcpt)
        self.state = _RCPT
        self.out.append(R.RCPT_OK)
        self.a.m.smtp_rcpt_ok.value += 1

    def _refuse_rcpt(self, rcpt: str, reply: bytes) -> None:
        """Refuse *rcpt* by policy with *reply*, once its policy_rejection event is on disk.

        Input waits (as for a message) until the spool has the event; if it
        cannot be recorded the client gets 451 4.3.0 and sends the RCPT again
        later, so that every refusal it sees is in the events.
        """
        resume = self.state
        a = self.a

        def recorded(ok: bool) -> None:
            if self.closing:
                return
            self.out.append(reply if ok else R.STORAGE_TEMP)
            self.state = resume
            self.last_activity = self._now()
            self.process()

        self.state = _WAITING
        if not a.refuse(self.sender, [rcpt], self.client_text(), self.peer_ip, reply, {},
                        recorded):
            self.state = resume
            self.out.append(reply)      # events are off: nothing to record

    def _rcpt_params(self, raw: bytes) -> tuple[str, str] | None:
        """Parse and check RCPT parameters (RFC 3461 NOTIFY, ORCPT): (notify, orcpt).

        "" for one not given; None when refused (the error reply is sent).
        """
        utf8 = "SMTPUTF8" in self.params
        params = parse_params(raw, utf8) if self.esmtp else None
        if params is None:
            self.reply_error(R.SYNTAX)
            return None
        notify = orcpt = ""
        for key, value in params.items():
            if key == "NOTIFY":
                notify = dsn.parse_notify(value)
                if notify is None:
                    self.reply_error(R.BAD_NOTIFY)
                    return None
            elif key == "ORCPT":
                orcpt = dsn.parse_orcpt(value, utf8)
                if orcpt is None:
                    self.reply_error(R.BAD_ORCPT)
                    return None
            else:
                self.reply_error(R.BAD_PARAM)
                return None
        return notify, orcpt

    def _rcpt_dsn(self, notify: str, orcpt: str) -> None:
        """Record the next recipient's NOTIFY and ORCPT ("" = not given).

        Kept in the transaction's params as two lists parallel to the
        recipients ("NOTIFY", "ORCPT"), made at the first recipient that has
        either, so a message without DSN parameters carries nothing extra.
        """
        p = self.params
        if "NOTIFY" not in p:
            n = len(self.rcpts)
            p["NOTIFY"] = [""] * n
            p["ORCPT"] = [""] * n
        p["NOTIFY"].append(notify)
        p["ORCPT"].append(orcpt)

    def cmd_data(self, arg: bytes) -> None:
        st = self.state
        if arg:
            self.reply_error(R.SYNTAX)
        elif st == _RCPT:
            self.out.append(R.START_DATA)
            self.scanner.start_data()
        elif st == _MAIL:
            self.reply_error(R.NO_VALID_RCPTS)
        elif st == _CONNECTED:
            self.reply_error(R.NEED_HELO)
        else:
            self.reply_error(R.NEED_MAIL)

    def cmd_bdat(self, arg: bytes) -> None:
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or \
                (len(words) == 2 and words[1].upper() != b"LAST"):
            # The chunk size is unknown, so the input cannot be resynchronised.
            self.close_with(R.SYNTAX)
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
            self.scanner.start_chunk(size, last)
        else:
            # RFC 3030: the chunk must still be read, then rejected -- read, not held:
            # a client that may not relay (no RCPT taken) made the session hold up
            # to max_message_size per connection, max_connections_per_ip at a time.
            self.chunk_last = last
            self.chunk_ok = False
            self.scanner.start_chunk(size, last, False)

    def cmd_rset(self, arg: bytes) -> None:
        if arg.strip():
            # RSET takes no argument (RFC 5321 4.1.1.5); as with Postfix, the
            # transaction stays as it was.
            self.reply_error(R.SYNTAX)
            return
        if self.state not in (_CONNECTED,):
            self.state = _READY
        self._reset_transaction()
        self.scanner.reset_message()
        self._junk(R.OK)

    def cmd_noop(self, arg: bytes) -> None:
        self._junk(R.OK)

    def cmd_quit(self, arg: bytes) -> None:
        self.close_with(R.BYE)

    def cmd_vrfy(self, arg: bytes) -> None:
        if not arg.strip():
            self.reply_error(R.SYNTAX)
        else:
            self._junk(R.VRFY)

    def cmd_expn(self, arg: bytes) -> None:
        self.reply_error(R.NOT_IMPLEMENTED)

    def cmd_help(self, arg: bytes) -> None:
        self._junk(R.HELP)

    # -------------------------------------------------------------- messages

    def _message_complete(self, payload: bytes, flags: int) -> None:
        """DATA ended: reject it, or hand it over and wait for the spool's answer."""
        if flags & _REJECTED_FLAGS:
            self.a.m.smtp_rejected.value += 1
            self._reset_transaction()
            self.state = _READY
            self.reply_error(self._check_flags(flags))
            return
        self._submit(payload)

    def _chunk_complete(self, payload: bytes, flags: int) -> None:
        """A BDAT chunk ended: acknowledge it, or (LAST) reject or hand over the message."""
        if not self.chunk_ok:
            self.reply_error(R.BAD_SEQUENCE if self.state != _CONNECTED else R.NEED_HELO)
            return
        self.chunk_flags |= flags
        if payload:
            chunks = self.chunks
            if len(chunks) < CHUNK_PARTS:
                chunks.append(payload)
            else:
                # Many small chunks: into one buffer, not an object each (which took
                # over 20 times the octets of a message sent in 2-octet chunks)
                last = chunks[-1]
                if type(last) is not bytearray:
                    chunks[-1] = last = bytearray(last)
                last += payload
        if not self.chunk_last:
            # The chunk's size: the payload is b"" once the message is too big.
            self.out.append(R.CHUNK_OK.format(n=self.chunk_size).encode())
            return
        reply = self._check_flags(self.chunk_flags)
        if reply is not None:
            self.a.m.smtp_rejected.value += 1
            self._reset_transaction()
            self.state = _READY
            self.reply_error(reply)
            return
        body = b"".join(self.chunks)
        self.chunks = []
        self._submit(body)

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

    def client_text(self) -> str:
        """The client as the envelope and the logs describe it ("helo [ip] user=name")."""
        client = self._client
        if client is None:
            client = f"{self.helo} [{self.peer_ip}]"
            if self.user is not None:
                client += f" user={self.user}"
            self._client = client
        return client

    def _submit(self, payload: bytes) -> None:
        """Hand the finished message to the acceptor; input waits for committed()."""
        self.state = _WAITING
        refused = self.a.commit(Submission(self.sender, self.rcpts, self.params,
                                           self.client_text(), self.peer_ip, payload,
                                           self.received_header, self.committed,
                                           self.refused))
        if refused is not None:
            self._refused(refused)

    def refused(self, reply: bytes) -> None:
        """The message handed over was refused by policy with *reply* (after its events)."""
        if self.closing:
            return
        self._refused(reply)
        self.last_activity = self._now()
        self.process()

    def _refused(self, reply: bytes) -> None:
        self.a.m.smtp_rejected.value += 1
        self._reset_transaction()
        self.state = _READY
        self.reply_error(reply)

    def received_header(self, qid: str) -> bytes:
        """The Received header for the current message, which gets queue id *qid*."""
        head = self._received_head
        if head is None:
            with_ = "ESMTP" if self.esmtp else "SMTP"
            if self.tls:
                with_ += "S"
            if self.user is not None:
                with_ += "A"
            ip = self.peer_ip
            # (a balancer's LOCAL / UNKNOWN header: no address to give, RFC 5321 TCP-info)
            tcp = "unknown" if ip == proxy.UNKNOWN_CLIENT else \
                f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
            head = self._received_head = (f"Received: from {self.helo} ({tcp})\r\n"
                                          f"\tby {self.a.hostname} (mta) with {with_} id ")
        rcpts = self.rcpts
        if len(rcpts) == 1:
            # (in its ASCII form where it has one: a U-label domain in this field alone
            # would make the message need SMTPUTF8 on its way to every server)
            rcpt = ascii_address(rcpts[0]) or rcpts[0]
            return f"{head}{qid}\r\n\tfor <{rcpt}>;\r\n\t{_date.now()}\r\n".encode()
        return f"{head}{qid};\r\n\t{_date.now()}\r\n".encode()

    def committed(self, qid: str, ok: bool) -> None:
        """The spool's answer (or a timeout) for the message this session handed over."""
        if self.closing:
            return
        m = self.a.m
        if ok:
            self.out.append((_QUEUED_HEAD + qid + _QUEUED_TAIL).encode())
            m.smtp_accepted.value += 1
            self.junk = 0
        else:
            self.out.append(R.STORAGE_TEMP)
            m.smtp_rejected.value += 1
        m.smtp_txn.observe(self._now() - self.mail_at)
        self._reset_transaction()
        self.state = _READY
        self.last_activity = self._now()
        # The reply goes out with whatever the pipelined input that waited
        # meanwhile brings: process() writes self.out once at its end, or
        # on every path that closes the session.
        self.process()

    # ---------------------------------------------------------- housekeeping

    def idle_check(self, now: float, draining: bool, force: bool) -> None:
        """Called about once a second: time out idle clients, close on shutdown."""
        st = self.state
        if st in (_CLOSED, _TLS) or self.closing:
            return
        if force:
            if st == _WAITING:
                return  # the spool answer (or its timeout) comes first
            self.close_with(R.SHUTTING_DOWN)
            return
        idle = now - self.last_activity
        if draining and st in (_CONNECTED, _READY) and idle >= DRAIN_IDLE \
                and not self.scanner.buffered:
            self.close_with(R.SHUTTING_DOWN)
            return
        if st == _WAITING:
            return
        in_data = self.scanner.mode != MODE_COMMAND
        limit = self.a.smtp.data_timeout if in_data else self.a.smtp.command_timeout
        if idle > limit:
            self.close_with(R.TIMEOUT)


# ---------------------------------------------------------------- the verbs

# Verb flags.
IN_BDAT = 1     # may come between the chunks of a BDAT sequence (RFC 3030 2)
LISTED = 2      # named in the HELP reply (R.HELP), in this table's order

# Every verb the session knows: its handler, called as handler(session, arg),
# and its flags.  A verb not here gets 500 5.5.2.
VERBS = {
    b"EHLO": (Session.cmd_ehlo, LISTED),
    b"HELO": (Session.cmd_helo, LISTED),
    b"MAIL": (Session.cmd_mail, LISTED),
    b"RCPT": (Session.cmd_rcpt, LISTED),
    b"DATA": (Session.cmd_data, LISTED),
    b"BDAT": (Session.cmd_bdat, LISTED | IN_BDAT),
    b"RSET": (Session.cmd_rset, LISTED | IN_BDAT),
    b"NOOP": (Session.cmd_noop, LISTED | IN_BDAT),
    b"QUIT": (Session.cmd_quit, LISTED | IN_BDAT),
    b"VRFY": (Session.cmd_vrfy, LISTED),
    b"EXPN": (Session.cmd_expn, 0),
    b"HELP": (Session.cmd_help, LISTED),
    b"STARTTLS": (tls_auth.starttls, LISTED),
    b"AUTH": (tls_auth.auth, LISTED),
}

# The table as Session.process() looks it up: one dict get per command, one set test in BDAT.
COMMANDS = {verb: handler for verb, (handler, _) in VERBS.items()}
BDAT_ALLOWED = frozenset(verb for verb, (_, flags) in VERBS.items() if flags & IN_BDAT)
