"""Outbound SMTP client: one connection to one receiving server (RFC 5321).

:meth:`SmtpConnection.open` connects (binding ``source_address`` when given,
or through a SOCKS5 proxy, see ``mta.delivery.socks``), reads the greeting,
says EHLO (HELO when EHLO is refused with 5xx), and upgrades with STARTTLS
(RFC 3207) when the server offers it, then says EHLO again.
:meth:`SmtpConnection.send_message` runs one mail transaction and
returns a :class:`DeliveryResult`: one reply per recipient, in order, and the
reply to the end of data.  The delivery engine owns policy — routing, retries,
bounces, pools; this module only speaks the protocol and reports what the
server said.

Extensions used: PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
SMTPUTF8 (RFC 6531), ENHANCEDSTATUSCODES (RFC 2034), STARTTLS (RFC 3207), DSN (RFC 3461:
NOTIFY, ORCPT, ENVID and RET passed on to a server that offers it).

Hot path cost, per message with PIPELINING: two round trips.  One write of
``MAIL``, every ``RCPT`` and ``DATA``; one read of their replies; one write
of the dot-stuffed message (made in one compiled pass, ``mta._ext.envelope``:
memchr finds the line ends and the body is copied once -- no per-line Python
work on it); one read of the final reply.  When the caller has the next message
for the connection at hand (``send_prepared``'s *then*), its envelope goes out
in the same write as the final dot and its replies come back with the final
reply: one write and one read per message.  Replies are
parsed from the connection's own buffer in ``data_received`` (an
``asyncio.Protocol``, no stream reader), a read of whole one-line replies in
one compiled loop (``mta._ext.reply``); a plain transaction's MAIL and RCPT
lines are written by ``mta._ext.envelope`` too; a waiting call is woken once, when
every reply it waits for has arrived.  A transaction that leaves the server
with an open envelope (no recipient accepted, DATA refused) is cleaned up with
an ``RSET`` pipelined in front of the next transaction, so it costs no extra
round trip.

Failure: every failure is an :class:`SmtpError` carrying ``.reply`` (the
server's reply, or a synthetic one, or None) and ``.temporary``.
- :class:`SourceUnavailable`: the *sending source* is the trouble, not the
  destination: its address cannot be bound (not on the host, no local port
  free), or its SOCKS5 proxy refuses, does not answer, hangs up, refuses the
  credentials or fails ("general failure", "not allowed by ruleset", ...).
  The engine suspends the source and sends its mail from others; it is not a
  kind of SmtpConnectError, so ``except SmtpConnectError`` never takes it for
  a destination's failure.
- :class:`SmtpConnectError`: connect refused or timed out (directly, or as
  reported by the proxy: network/host unreachable, refused, TTL expired, or
  no CONNECT reply in time), greeting 4xx/5xx,
  EHLO and HELO refused, STARTTLS required but not possible or failed.
- :class:`SmtpTimeout`: the server did not answer within ``command_timeout``
  (``data_timeout`` for the message and its final reply).  The connection is
  aborted.
- :class:`SmtpConnectionLost`: the server hung up mid-conversation.  If that
  happens after the final "." was sent, the message may have been delivered
  anyway (RFC 1047): a retry can duplicate it, never lose it.  Once the message
  was on its way, ``rcpt_replies`` says which recipients it was for.  Not raised when
  it hung up after refusing MAIL or a RCPT with 5xx (Exim's "drop"): that is a
  :class:`DeliveryResult` with its refusals, and ``REPLY_LOST`` (451 4.4.2)
  for what it left unanswered.
- :class:`SmtpProtocolError` (a kind of SmtpConnectionLost): an unparseable
  or over-long reply (``MAX_REPLY_BYTES``), an unsolicited reply, or RSET
  refused; the connection is aborted.
- :class:`Unsupported8Bit` / :class:`UnsupportedSmtpUtf8`: the message needs
  an extension the server does not offer; nothing was sent and the
  connection stays usable.  A non-ASCII envelope goes to a server without
  SMTPUTF8 in its all-ASCII form when it has one (U-label domains as A-labels,
  ASCII local parts); a recipient without one gets ``REPLY_NEED_SMTPUTF8``
  (553 5.6.7) while the others go; a sender without one, no recipient with
  one, or a UTF-8 header raises.
Refusals of single commands are not exceptions: they are replies in the
:class:`DeliveryResult`.  A 421 reply (the server is closing) ends the
transaction: every command not yet answered gets that 421, and the
connection is no longer usable.  A message larger than the server's SIZE gets
a synthetic ``552 5.3.4`` for every recipient without being sent.
Recipients refused with 452 after another of the transaction was accepted
(the server's recipient limit, RFC 5321 4.5.3.1.10) are named by
``DeliveryResult.over_limit()``; the caller sends them in the next transaction,
and no envelope is sent ahead behind that message's final dot.
"""
from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import re
import socket
import ssl
from collections import deque

from mta import dsn, native
from mta.delivery import socks
from mta.idn import ascii_address
from mta.config import hostport, load_ca
from mta.delivery.socks import Socks5Proxy

__all__ = [
    "DeliveryResult", "LocalReply", "SmtpConnectError", "SmtpConnection", "SmtpConnectionLost",
    "SmtpError", "SmtpProtocolError", "SmtpReply", "SmtpTimeout", "Socks5Proxy",
    "SourceUnavailable", "Unsupported8Bit", "UnsupportedSmtpUtf8", "ReplyParser", "dot_stuff",
]

# Tuning and limits (units in the names or comments).
MAX_REPLY_BYTES = 64 * 1024     # one reply, all its lines together; longer is a protocol error
QUIT_TIMEOUT_MAX = 30.0         # seconds: QUIT waits at most this long (or command_timeout if less)
SINGLE_WRITE_MAX = 1 << 20      # bytes: up to this size body and "." go out in one write

STARTTLS_MODES = ("none", "opportunistic", "required")
# Whether a session was encrypted, as SparkPost's ``outbound_tls`` event field says it
# (:attr:`SmtpConnection.outbound_tls`, :attr:`SmtpConnectError.tls`):
TLS_USED = "1"          # STARTTLS succeeded
TLS_NONE = "0"          # plaintext: STARTTLS not offered, or not asked for (starttls = "none")
TLS_FAILED = "-1"       # offered, but refused or the handshake failed


# --- replies ---------------------------------------------------------------------------------

def _expected(r: "SmtpReply") -> bool:
    """Whether *r* is a reply a command of a transaction may get: 2xx, 4xx or 5xx."""
    return 200 <= r.code < 300 or 400 <= r.code < 600


def _over_limit(replies: list) -> list[int]:
    """Indexes of the recipients refused for the server's recipient limit: a 452 (or
    4.5.3 "too many recipients", or RFC 821's 552 with 5.5.3) after a recipient of
    the same transaction was accepted.

    RFC 5321 4.5.3.1.10: a server out of room for more RCPTs says 452 (RFC 821
    said 552: clients SHOULD take that as temporary); the
    client sends the others in another transaction, at once.  A 452 before
    any acceptance is not read so: nothing shows a limit then (the server may
    be out of storage), and another transaction could only get the same; nor
    is a 452 whose enhanced code names another trouble (4.2.2 mailbox full).
    """
    out = []
    seen_ok = False
    for i, r in enumerate(replies):
        if r is None:
            continue
        if r.is_ok:
            seen_ok = True
        elif seen_ok and ((r.code == 452 and r.enhanced in (None, "4.5.3"))
                          or (r.is_temp and r.enhanced == "4.5.3")
                          or (r.code == 552 and r.enhanced == "5.5.3")):
            out.append(i)
    return out


def _as_failure(r: "SmtpReply", what: str) -> "SmtpReply":
    """*r* when expected (:func:`_expected`), else a temporary failure that names it."""
    if _expected(r):
        return r
    return LocalReply(451, "4.5.0", f"unexpected reply to {what}: {r}")


class SmtpReply:
    """One server reply: ``code``, ``enhanced`` status ("5.1.1" or None), ``text``.

    ``text`` holds the text of every line (without code and enhanced code),
    joined with "\\n".  ``str(reply)`` gives the reply as one line, the way a
    DSN's Diagnostic-Code wants it.
    """

    __slots__ = ("code", "enhanced", "text")
    local = False           # made up by this client (LocalReply), not said by the server

    def __init__(self, code: int, enhanced: str | None, text: str) -> None:
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def is_ok(self) -> bool:
        """A positive completion (2xx)."""
        return 200 <= self.code < 300

    @property
    def is_perm(self) -> bool:
        """A permanent failure (5xx)."""
        return self.code >= 500

    @property
    def is_temp(self) -> bool:
        """A transient failure: 4xx, or any unexpected code that is neither 2xx nor 5xx."""
        return self.code < 500 and not 200 <= self.code < 300

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SmtpReply):
            return NotImplemented
        return (self.code, self.enhanced, self.text) == (other.code, other.enhanced, other.text)

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.text))

    def __str__(self) -> str:
        text = self.text.replace("\n", " ")
        if self.enhanced:
            return f"{self.code} {self.enhanced} {text}"
        return f"{self.code} {text}"

    def __repr__(self) -> str:
        return f"SmtpReply({self.code}, {self.enhanced!r}, {self.text!r})"


class LocalReply(SmtpReply):
    """A reply this client made up (no server said it): a DSN quotes it as our own
    words (``x-local``), not as the server's (``smtp``, RFC 3464 2.3.6)."""

    __slots__ = ()
    local = True


# Synthetic replies: what the client reports when it decides not to send.
REPLY_TOO_BIG = LocalReply(552, "5.3.4", "Message size exceeds fixed maximum message size")
REPLY_NEED_8BITMIME = LocalReply(
    554, "5.6.3", "Conversion required but not supported: server does not offer 8BITMIME")
REPLY_NEED_SMTPUTF8 = LocalReply(
    553, "5.6.7", "Non-ASCII address or header: server does not offer SMTPUTF8")
REPLY_BAD_SENDER = LocalReply(553, "5.1.7", "Bad sender address syntax")
REPLY_BAD_RCPT = LocalReply(553, "5.1.3", "Bad recipient address syntax")
REPLY_LOST = LocalReply(451, "4.4.2", "connection lost before the server answered")

# "5.1.1 " at the start of a reply line (RFC 3463: class.subject.detail).
_ENHANCED = re.compile(rb"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
# Characters that must never reach the wire inside an address (command injection).
_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
# The MAIL and RCPT lines of a plain transaction (SmtpConnection.prepare).
_plain_envelope = native.load("envelope").plain
# dot_stuff(message) + the next envelope, as one bytes (SmtpConnection._send_data).
_data_block = native.load("envelope").data


class ReplyParser:
    """Incremental parser of server replies; bounded to ``MAX_REPLY_BYTES`` per reply.

    ``feed(data)`` returns the replies completed by *data* (often none or
    one; several when the server answered pipelined commands at once).
    Lines end in CRLF (a bare LF is tolerated).  A line that does not start
    with a three-digit code 2xx-5xx, or a reply longer than the bound, raises
    :class:`SmtpProtocolError`; the parser is unusable after that.  The replies
    *data* completed before the bad line are the exception's ``replies``: they
    were said (a 250 to the final dot followed by a stray empty line in the same
    segment is still a delivery).
    """

    __slots__ = ("_buf", "_lines", "_size")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[bytes] = []   # lines of the reply being assembled, without CR LF
        self._size = 0                  # bytes in _lines

    def clear(self) -> None:
        """Forget everything buffered (after STARTTLS, RFC 3207 §4.2)."""
        self._buf.clear()
        self._lines.clear()
        self._size = 0

    def feed(self, data: bytes) -> list[SmtpReply]:
        """Add *data*; return the replies it completes."""
        if not self._buf and not self._lines and len(data) <= MAX_REPLY_BYTES:
            # The usual arrival: whole one-line replies, CRLF-ended (pipelined MAIL, RCPT
            # and DATA answered at once), taken apart in one compiled loop
            # (mta._ext.reply: 25k -> 9.5k instructions for four replies).
            # Anything else -- a continuation line, a bare LF, a bad line -- gives None
            # and goes the general way, which this must match reply for reply
            # (tests/delivery/test_client.py, tests/test_reply.py).
            out = _one_line_replies(data, SmtpReply, _reply_parts, REPLY_CACHE_MAX,
                                    REPLY_CACHE_LINE)
            if out is not None:
                return out
        buf = self._buf
        buf += data
        out: list[SmtpReply] = []
        start = 0
        # Per line: one find, one slice; per reply: one regex match and one decode.
        while (nl := buf.find(b"\n", start)) >= 0:
            end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
            line = bytes(buf[start:end])
            start = nl + 1
            self._size += len(line) + 2
            if self._size > MAX_REPLY_BYTES:
                raise SmtpProtocolError("reply longer than %d bytes" % MAX_REPLY_BYTES,
                                        replies=out)
            if len(line) < 3 or not (0x32 <= line[0] <= 0x35) or not line[:3].isdigit():
                raise SmtpProtocolError("malformed reply line %r" % line[:40], replies=out)
            self._lines.append(line)
            if line[3:4] != b"-":
                out.append(self._finish())
        if start:
            del buf[:start]
        if self._size + len(buf) > MAX_REPLY_BYTES:
            raise SmtpProtocolError("reply longer than %d bytes" % MAX_REPLY_BYTES, replies=out)
        return out

    def _finish(self) -> SmtpReply:
        """Build the reply from the collected lines (the last one ends it)."""
        lines = self._lines
        self._lines = []
        self._size = 0
        code = int(lines[-1][:3])
        texts = [_line_text(line) for line in lines]
        enhanced = None
        prefix = _enhanced_prefix(code, texts[0])
        if prefix is not None:
            enhanced = prefix.rstrip().decode("ascii")
            cut = len(prefix)
            texts = [t[cut:] if t.startswith(prefix) or t == prefix.rstrip() else t
                     for t in texts]
        return SmtpReply(code, enhanced, b"\n".join(texts).decode("utf-8", "replace"))


def _enhanced_prefix(code: int, text: bytes) -> bytes | None:
    """The RFC 3463 enhanced status code opening *text* with its space, or None (absent,
    or of another class than the reply's *code*)."""
    m = _ENHANCED.match(text)
    if m is not None and m.group(1)[0] == 0x30 + code // 100:
        return m.group(0)
    return None


def _line_text(line: bytes) -> bytes:
    """The text of a reply line: after the code and its separator (space or hyphen), or
    right after the code when neither follows it ("550User unknown": a broken server's
    line ends its reply and keeps all of its text)."""
    return line[4:] if line[3:4] in (b" ", b"-") else line[3:]


# One-line replies taken apart before, by their octets (mta._pure.reply.one_line_replies):
# a server says the same few again and again ("250 2.1.0 Ok" to every MAIL).  The parts
# are a function of the octets alone; each reply is a new object as before.
# Bounded: lines up to REPLY_CACHE_LINE octets, REPLY_CACHE_MAX of them, then forgotten
# all at once (a server whose every final reply names its queue id fills it in that many
# messages, and the common ones are parsed again once).
REPLY_CACHE_MAX = 256
REPLY_CACHE_LINE = 128
_reply_parts: dict[bytes, tuple[int, str | None, str]] = {}
_one_line_replies = native.load("reply").one_line_replies


class DsnParams:
    """The RFC 3461 parameters of one transaction, as received (xtext kept as it came).

    *envid*, *ret*: ENVID and RET of MAIL ("" = none); *notify*, *orcpt*:
    per recipient, in the order given to ``send_message`` ("" = none).
    """

    __slots__ = ("envid", "ret", "notify", "orcpt")

    def __init__(self, envid: str = "", ret: str = "", notify: list[str] | None = None,
                 orcpt: list[str] | None = None) -> None:
        self.envid = envid
        self.ret = ret
        self.notify = notify or []
        self.orcpt = orcpt or []

    @classmethod
    def from_params(cls, params: dict) -> DsnParams | None:
        """The DSN parameters of a job's params (ENVID, RET; NOTIFY, ORCPT lists), or None.

        Values are checked again (a value that would not be a valid parameter
        is dropped), so nothing but RFC 3461 syntax reaches a command line.
        """
        envid, ret = params.get("ENVID"), params.get("RET")
        notify, orcpt = params.get("NOTIFY"), params.get("ORCPT")
        if envid is None and ret is None and notify is None:
            return None
        envid = envid if isinstance(envid, str) and dsn.parse_envid(envid) else ""
        ret = ret if isinstance(ret, str) and dsn.parse_ret(ret) == ret else ""
        notify = [x if isinstance(x, str) and dsn.parse_notify(x) == x else ""
                  for x in (notify if isinstance(notify, list) else ())]
        orcpt = [x if isinstance(x, str) and dsn.parse_orcpt(x) else _orcpt_xtext(x)
                 for x in (orcpt if isinstance(orcpt, list) else ())]
        return cls(envid, ret, notify, orcpt)

    def subset(self, indexes: list[int]) -> DsnParams:
        """These parameters for the recipients at *indexes* only (in that order)."""
        def pick(values: list[str]) -> list[str]:
            return [values[i] if i < len(values) else "" for i in indexes]
        return DsnParams(self.envid, self.ret, pick(self.notify), pick(self.orcpt))

    def mail_params(self) -> str:
        out = ""
        if self.ret:
            out += " RET=" + self.ret
        if self.envid:
            out += " ENVID=" + self.envid
        return out

    def rcpt_params(self, i: int) -> str:
        out = ""
        if i < len(self.notify) and self.notify[i]:
            out += " NOTIFY=" + self.notify[i]
        if i < len(self.orcpt) and self.orcpt[i]:
            out += " ORCPT=" + self.orcpt[i]
        return out


def _orcpt_xtext(value) -> str:
    """A utf-8 ORCPT taken as UTF-8 (utf-8-addr-unitext, a transaction with SMTPUTF8) as
    utf-8-addr-xtext, which any server takes (RFC 6533 3); "" for anything else."""
    if not isinstance(value, str) or dsn.parse_orcpt(value, True) is None:
        return ""
    return "utf-8;" + dsn.utf8_addr_encode(dsn.utf8_addr_decode(value.partition(";")[2]), False)


class DeliveryResult:
    """The outcome of one transaction.

    ``rcpt_replies[i]`` is the reply to recipient i (in the order given to
    ``send_message``); ``data_reply`` the reply after the message (or to a
    refused DATA), None when no recipient was accepted so no data was sent.

    ``dsn`` is True when the server offers DSN (RFC 3461) and so was given
    the transaction's NOTIFY / ORCPT / ENVID / RET: its notices are its own.
    """

    __slots__ = ("rcpt_replies", "data_reply", "dsn", "mail_refused")

    def __init__(self, rcpt_replies: list[SmtpReply], data_reply: SmtpReply | None,
                 dsn: bool = False, mail_refused: bool = False) -> None:
        self.rcpt_replies = rcpt_replies
        self.data_reply = data_reply
        self.dsn = dsn
        # True when MAIL (or the RSET before it) was refused: every recipient's reply is
        # that one (response rules match it at the "mail" stage)
        self.mail_refused = mail_refused

    def accepted(self, i: int) -> bool:
        """True when the server took the message for recipient i (RCPT and data both 2xx)."""
        d = self.data_reply
        return d is not None and d.is_ok and self.rcpt_replies[i].is_ok

    def reply(self, i: int) -> SmtpReply:
        """The reply that decides recipient i: its RCPT reply if refused, else the data reply."""
        r = self.rcpt_replies[i]
        if not r.is_ok or self.data_reply is None:
            return r
        return self.data_reply

    def over_limit(self) -> list[int]:
        """The recipients to send again now, in another transaction: refused only for the
        server's recipient limit (see _over_limit) in a transaction that delivered."""
        d = self.data_reply
        if d is None or not d.is_ok:
            return []
        return _over_limit(self.rcpt_replies)

    @property
    def all_accepted(self) -> bool:
        """True when every recipient was accepted."""
        return all(self.accepted(i) for i in range(len(self.rcpt_replies)))

    def __repr__(self) -> str:
        return f"DeliveryResult({self.rcpt_replies!r}, {self.data_reply!r})"


class Transaction:
    """One mail transaction made ready for a connection (:meth:`SmtpConnection.prepare`).

    ``result``: the answer when it needs nothing from the server (nothing is
    sent then); else ``mail`` and ``rcpts`` are the envelope's command lines
    and ``send_idx`` the indexes of the recipients they name.  ``sent``: the
    envelope went out ahead, behind the previous message's final dot.
    """

    __slots__ = ("message", "result", "replies", "send_idx", "mail", "rcpts", "dsn", "sent")

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.result: DeliveryResult | None = None
        self.replies: list[SmtpReply | None] = []
        self.send_idx: list[int] = []
        self.mail = b""
        self.rcpts: list[bytes] = []
        self.dsn = False
        self.sent = False

    @property
    def count(self) -> int:
        """Replies the pipelined envelope gets: MAIL, each RCPT, DATA."""
        return len(self.rcpts) + 2

    def envelope(self) -> bytes:
        """The pipelined envelope: MAIL, every RCPT and DATA, in one piece."""
        return self.mail + b"".join(self.rcpts) + b"DATA\r\n"


# --- errors ----------------------------------------------------------------------------------

class SmtpError(Exception):
    """Base of every client error: ``.reply`` (SmtpReply or None), ``.temporary``.

    ``rcpt_replies``: when raised once the message was on its way (the envelope
    answered, DATA 354), each recipient's reply to its RCPT (as in
    ``DeliveryResult.rcpt_replies``): the server's refusals stand; else None.
    """

    rcpt_replies: list | None = None

    def __init__(self, message: str, reply: SmtpReply | None = None,
                 temporary: bool | None = None) -> None:
        super().__init__(message if reply is None else f"{message}: {reply}")
        self.reply = reply
        if temporary is None:
            temporary = reply is None or not reply.is_perm
        self.temporary = temporary


class SmtpConnectError(SmtpError):
    """No usable session: connect failed, greeting/EHLO/HELO refused, STARTTLS impossible.

    ``tls_failed`` is True when the TLS handshake (or the STARTTLS command)
    failed; the engine may retry that host without TLS.  ``tls`` is what the
    delivery's events say of it: TLS_FAILED, TLS_NONE (required, not offered), or
    "" when the failure had nothing to do with TLS.
    """

    def __init__(self, message: str, reply: SmtpReply | None = None,
                 temporary: bool | None = None, tls_failed: bool = False,
                 stage: str = "connect", tls: str = "") -> None:
        super().__init__(message, reply, temporary)
        self.tls_failed = tls_failed
        self.stage = stage          # connect | greeting | ehlo (where it failed)
        self.tls = tls or (TLS_FAILED if tls_failed else "")


class SourceUnavailable(SmtpError):
    """The sending source cannot be used now, whatever the destination (always temporary).

    ``reason`` is readable ("cannot bind 192.0.2.10 (Cannot assign requested
    address)", "proxy 127.0.0.1:1080 refused the credentials of user 'u'");
    ``source`` names the source: its address, or the proxy's ``host:port``.
    """

    def __init__(self, reason: str, source: str = "") -> None:
        super().__init__(reason, None, True)
        self.reason = reason
        self.source = source


class SmtpTimeout(SmtpError):
    """The server did not answer in time; the connection was aborted."""

    def __init__(self, message: str) -> None:
        super().__init__(message, None, True)


class SmtpConnectionLost(SmtpError):
    """The connection is gone mid-session (the server hung up, or see SmtpProtocolError).

    ``unsent`` is True when it went during a transaction before any of its message
    was written (while its envelope was answered): nothing of it can have been
    delivered.
    """

    unsent = False

    def __init__(self, message: str, reply: SmtpReply | None = None) -> None:
        SmtpError.__init__(self, message, reply, True)


class SmtpProtocolError(SmtpConnectionLost):
    """The server broke the protocol (malformed or over-long reply, RSET refused), so the
    client dropped the connection: handled like a lost connection.  ``replies``: those
    the parser completed before the bad part (they were said)."""

    def __init__(self, message: str, reply: SmtpReply | None = None, *,
                 replies: list | tuple = ()) -> None:
        SmtpConnectionLost.__init__(self, message, reply)
        self.replies = list(replies)


class Unsupported8Bit(SmtpError):
    """The message is 8-bit and the server does not offer 8BITMIME; nothing was sent."""

    def __init__(self) -> None:
        super().__init__("server does not offer 8BITMIME", REPLY_NEED_8BITMIME, False)


def _ascii_envelope(sender: str, recipients: list[str], message: bytes):
    """(sender, recipients, indexes of the recipients without an ASCII form) of an envelope
    for a server without SMTPUTF8: each address in its all-ASCII form (mta.idn), a
    recipient without one as "" in the list and its index in the third.

    Raises UnsupportedSmtpUtf8 when the message cannot go at all: its header block is
    not ASCII, the sender or every recipient has no ASCII form.
    """
    if not _header_block(message).isascii():
        raise UnsupportedSmtpUtf8()
    ascii_sender = ascii_address(sender)
    if ascii_sender is None:
        raise UnsupportedSmtpUtf8()
    out, missing = [], []
    for i, r in enumerate(recipients):
        a = ascii_address(r) if r else r
        if a is None:
            missing.append(i)
            a = ""
        out.append(a)
    if len(missing) == len(recipients):
        raise UnsupportedSmtpUtf8()
    return ascii_sender, out, missing


def _header_block(message: bytes) -> bytes:
    """The message's header block: up to its first empty line (all of it when none)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    return message if end < 0 else message[:end]


class UnsupportedSmtpUtf8(SmtpError):
    """The transaction needs SMTPUTF8 and the server does not offer it; nothing was sent."""

    def __init__(self) -> None:
        super().__init__("server does not offer SMTPUTF8", REPLY_NEED_SMTPUTF8, False)


# --- the wire --------------------------------------------------------------------------------

def dot_stuff(message: bytes) -> bytes:
    """Return *message* ready to follow DATA: dots doubled, CRLF ensured, "." CRLF appended.

    *message* has CRLF line ends.  A dot is doubled after any LF, so a bare
    LF in a broken message cannot end the data early on a lenient server
    (SMTP smuggling); for CRLF text that is exactly RFC 5321 §4.5.2.  Cost:
    one ``bytes.replace`` (no copy when no line starts with a dot) and one
    concatenation.
    """
    body = message.replace(b"\n.", b"\n..")
    if body[:1] == b".":
        body = b"." + body
    if not body or body[-2:] == b"\r\n":
        return body + b".\r\n"
    return body + b"\r\n.\r\n"


class _Wire(asyncio.Protocol):
    """The connection's Protocol: parses replies into a queue and wakes one waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ReplyParser()
        self.replies: deque[SmtpReply] = deque()
        self.owed = 1                   # replies the server owes us; 1 for the greeting
        self.want = 0                   # wake the waiter when this many replies are queued
        self.waiter: asyncio.Future | None = None
        self.drainer: asyncio.Future | None = None
        self.error: SmtpError | None = None     # set once the connection broke the protocol
        self.closing = False            # a 421 arrived: the server is ending the session
        self.goodbye: SmtpReply | None = None   # that 421
        self.lost = False
        self.paused = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        broken = None
        try:
            replies = self.parser.feed(data)
        except SmtpProtocolError as exc:
            # the replies before the bad line were said: they count (a 250 to the final
            # dot is a delivery whatever follows it in the same segment)
            broken, replies = exc, exc.replies
        self._take(replies)
        if broken is not None and self.error is None:
            self._fail(broken)

    def _take(self, replies: list[SmtpReply]) -> None:
        if not replies:
            return
        for reply in replies:
            if self.closing:
                break                   # nothing counts after a 421
            if self.owed <= 0:
                # Unsolicited: an idle server's 421 is normal; anything else is not.
                if reply.code == 421:
                    self.closing = True
                    self.goodbye = reply
                    continue
                self._fail(SmtpProtocolError("unexpected reply", reply))
                return
            self.owed -= 1
            self.replies.append(reply)
            if reply.code == 421:
                self.closing = True
                self.goodbye = reply
        w = self.waiter
        if w is not None and not w.done() and (len(self.replies) >= self.want or self.closing):
            w.set_result(None)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        d = self.drainer
        if d is not None and not d.done():
            d.set_result(None)

    # helpers
    def _fail(self, exc: SmtpError) -> None:
        self.error = exc
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        for f in (self.waiter, self.drainer):
            if f is not None and not f.done():
                f.set_result(None)


def _timed_out(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


_TLS_CONTEXTS: dict[bool, ssl.SSLContext] = {}


def verifying_tls_context(ca_file: str, data: bytes | None = None) -> ssl.SSLContext:
    """A verifying client SSLContext as the shared one, that trusts *ca_file*'s CAs
    besides the system's (delivery.tls_ca_file); *data*: that file's bytes as the
    supervisor checked them (Settings.tls_ca_data), loaded instead of the file."""
    ctx = _new_tls_context(True)
    load_ca(ctx, ca_file, data)
    return ctx


def _default_tls_context(verify: bool) -> ssl.SSLContext:
    """The shared client SSLContext: verifying (system CAs) or opportunistic (CERT_NONE).

    Floor: TLS 1.2 for both, set here (as the acceptor's), not left to the host's
    OpenSSL policy, which decides whether an old server gets TLS 1.0 or nothing.
    A server that speaks only TLS 1.0/1.1 fails the handshake; opportunistically
    the engine then sends to it in plaintext (engine.TLS_FALLBACK_SECONDS), as to
    any host whose handshake fails -- Postfix's "may" level would use TLS 1.0
    there; we keep one floor (those plaintext sessions say outbound_tls 0).
    """
    ctx = _TLS_CONTEXTS.get(verify)
    if ctx is None:
        ctx = _TLS_CONTEXTS[verify] = _new_tls_context(verify)
    return ctx


def _new_tls_context(verify: bool) -> ssl.SSLContext:
    if verify:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _State(enum.IntEnum):
    READY = 0       # no transaction open on the server
    DIRTY = 1       # the server may hold an envelope: RSET before the next MAIL
    BUSY = 2        # a call is in progress
    CLOSED = 3


# The states by module names: a member looked up through its enum class costs four times
# a global (3.11), and a connection looks at its state about fifteen times a message.
_READY, _DIRTY, _BUSY, _CLOSED = _State.READY, _State.DIRTY, _State.BUSY, _State.CLOSED
_OPEN = (_READY, _DIRTY)       # may take a call (is_usable)


# --- the connection --------------------------------------------------------------------------

class SmtpConnection:
    """One SMTP session to one server.  Create with :meth:`open`; one call at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wire: _Wire, command_timeout: float,
                 data_timeout: float) -> None:
        self._loop = loop
        self._wire = wire
        self.host = ""
        self.port = 0
        self.local_ip: str | None = None    # the sending IP the server sees (see open())
        self.socks5: Socks5Proxy | None = None
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self._state = _BUSY
        self._state_before = _READY   # the state when the current call began
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls_refused = False        # STARTTLS was offered and refused (plaintext)
        self.greeting: SmtpReply | None = None
        self.messages_sent = 0          # messages the server accepted (final 2xx)
        self.opened_at = loop.time()    # when the session was set up (the loop's clock)
        self.transactions = 0           # transactions started (MAIL sent)
        self._ahead: Transaction | None = None  # sent ahead, not run yet (send_prepared)
        self._body_sent = False         # the current transaction's message is being written

    # -- properties --

    @property
    def supports_pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def supports_8bitmime(self) -> bool:
        return "8BITMIME" in self.extensions

    @property
    def supports_dsn(self) -> bool:
        return "DSN" in self.extensions

    @property
    def supports_smtputf8(self) -> bool:
        return "SMTPUTF8" in self.extensions

    @property
    def max_size(self) -> int | None:
        """The SIZE the server announced, None when it announced none (or 0: no limit)."""
        param = self.extensions.get("SIZE")
        if not param:
            return None
        try:
            n = int(param.split()[0])
        except ValueError:
            return None
        return n if n > 0 else None

    @property
    def tls_active(self) -> bool:
        t = self._wire.transport
        return t is not None and t.get_extra_info("ssl_object") is not None

    @property
    def outbound_tls(self) -> str:
        """TLS_USED, TLS_FAILED (offered, refused: the session went on in plaintext) or
        TLS_NONE, for the events of what this session sends."""
        if self.tls_active:
            return TLS_USED
        return TLS_FAILED if self.tls_refused else TLS_NONE

    @property
    def is_usable(self) -> bool:
        """Open, not told to go away, not mid-call: ready for another message.

        A transaction left open on the server (no recipient accepted, DATA
        refused) does not count against it: the next send_message resets it.
        """
        w = self._wire
        return (self._state in _OPEN and not w.lost and not w.closing
                and w.error is None)

    # -- opening --

    @classmethod
    async def open(cls, host: str, port: int, *, helo_name: str,
                   source_address: str | None = None, socks5: Socks5Proxy | None = None,
                   connect_timeout: float = 30, command_timeout: float = 300,
                   data_timeout: float = 600, starttls: str = "opportunistic",
                   tls_verify: bool = False, tls_server_hostname: str | None = None,
                   tls_context: ssl.SSLContext | None = None,
                   loop: asyncio.AbstractEventLoop | None = None) -> SmtpConnection:
        """Connect, read the greeting, EHLO (or HELO), STARTTLS as asked; return the session.

        Directly, the socket is bound to ``source_address`` (when given) before
        connecting.  With ``socks5`` the connection goes through that proxy
        and ``source_address`` is *not* bound here: it names the proxy's
        outbound address (the ``[[egress.source]]`` meaning), which is
        usually not an address of this host.  ``connect_timeout`` bounds the
        TCP connect and, through a proxy, the whole SOCKS handshake.
        ``local_ip`` is then the proxy's BND.ADDR, or ``source_address`` when
        the proxy reports none (0.0.0.0, as microsocks does).

        ``starttls``: "none" never, "opportunistic" when offered, "required"
        (SmtpConnectError when not offered or not working).  ``tls_context``
        overrides the shared context chosen by ``tls_verify``.
        Raises SourceUnavailable (the source's trouble), SmtpConnectError,
        SmtpTimeout, SmtpConnectionLost or SmtpProtocolError.
        """
        if starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {STARTTLS_MODES}")
        if not helo_name or not helo_name.isascii() or _BAD_ADDRESS.search(helo_name):
            raise ValueError("helo_name must be an ASCII hostname (A-labels) or address literal")
        if loop is None:
            loop = asyncio.get_running_loop()
        if socks5 is not None:
            sock, local_ip = await _connect_via_proxy(loop, host, port, socks5, source_address,
                                                      connect_timeout)
        else:
            sock, local_ip = await _connect_direct(loop, host, port, source_address,
                                                   connect_timeout)
        try:
            _, wire = await loop.create_connection(_Wire, sock=sock)
        except OSError as exc:
            sock.close()
            why = socks.describe_os_error(exc)
            raise SmtpConnectError(f"connect to {hostport(host, port)} failed ({why})",
                                   temporary=True) from None
        conn = cls(loop, wire, command_timeout, data_timeout)
        conn.host, conn.port = host, port
        conn.local_ip = local_ip
        conn.socks5 = socks5
        try:
            await conn._handshake(helo_name, starttls, tls_verify,
                                  tls_server_hostname or host, tls_context)
        except BaseException:
            conn.close()
            raise
        conn._state = _READY
        return conn

    async def _handshake(self, helo_name: str, starttls: str, verify: bool,
                         server_hostname: str, ctx: ssl.SSLContext | None) -> None:
        """Greeting, EHLO/HELO, and the STARTTLS upgrade."""
        greeting = (await self._read(1, self.command_timeout, "greeting"))[0]
        self.greeting = greeting
        if greeting.code != 220:
            await self._quit_quietly()
            raise SmtpConnectError("greeting refused", greeting, stage="greeting")
        await self._hello(helo_name)
        if starttls == "none":
            return
        if "STARTTLS" not in self.extensions:
            if starttls == "required":
                await self._quit_quietly()
                raise SmtpConnectError("STARTTLS required but not offered", temporary=True,
                                       tls_failed=True, tls=TLS_NONE)
            return
        reply = (await self._command(b"STARTTLS\r\n", "STARTTLS"))[0]
        if reply.code != 220:
            if starttls == "required" or reply.code == 421:
                await self._quit_quietly()
                raise SmtpConnectError("STARTTLS refused", reply, temporary=True,
                                       tls_failed=reply.code != 421, stage="ehlo")
            self.tls_refused = True
            return          # opportunistic: carry on in plaintext
        await self._start_tls(ctx or _default_tls_context(verify), server_hostname)
        await self._hello(helo_name)

    async def _hello(self, helo_name: str) -> None:
        """EHLO, falling back to HELO on 5xx; fills ``extensions``."""
        name = helo_name.encode("ascii")     # checked in open()
        reply = (await self._command(b"EHLO " + name + b"\r\n", "EHLO"))[0]
        if reply.is_ok:
            self.esmtp = True
            self.extensions = _parse_extensions(reply.text)
            return
        if reply.code == 421 or not reply.is_perm:
            await self._quit_quietly()
            raise SmtpConnectError("EHLO refused", reply, stage="ehlo")
        reply = (await self._command(b"HELO " + name + b"\r\n", "HELO"))[0]
        if not reply.is_ok:
            await self._quit_quietly()
            raise SmtpConnectError("HELO refused", reply, stage="ehlo")
        self.esmtp = False
        self.extensions = {}

    async def _start_tls(self, ctx: ssl.SSLContext, server_hostname: str) -> None:
        """Upgrade the transport; anything received in plaintext before is discarded."""
        w = self._wire
        if w.error is not None or w.lost:
            # e.g. a reply injected behind the 220 (the parser refused it as unsolicited)
            self.abort()
            raise SmtpConnectError("connection broken at STARTTLS", w.error and w.error.reply,
                                   temporary=True, tls_failed=True)
        w.parser.clear()
        w.replies.clear()
        try:
            transport = await asyncio.wait_for(
                self._loop.start_tls(w.transport, w, ctx, server_hostname=server_hostname,
                                     ssl_handshake_timeout=self.command_timeout),
                self.command_timeout)
        except (asyncio.TimeoutError, TimeoutError, OSError, ssl.SSLError,
                ConnectionError) as exc:
            raise SmtpConnectError(f"TLS handshake failed ({type(exc).__name__}: {exc})",
                                   temporary=True, tls_failed=True) from None
        if transport is None:
            raise SmtpConnectError("TLS handshake failed (connection closed)", temporary=True,
                                   tls_failed=True)
        w.transport = transport
        self.extensions = {}

    # -- the transaction --

    async def send_message(self, sender: str, recipients: list[str], message: bytes, *,
                           eight_bit: bool = False, smtputf8: bool = False,
                           dsn: DsnParams | None = None, then=None) -> DeliveryResult:
        """Run one mail transaction; return one reply per recipient and the data reply.

        *message* is the whole message with CRLF line ends, not dot-stuffed.
        An 8-bit message (``eight_bit`` or any byte >= 0x80) is sent with
        BODY=8BITMIME; SMTPUTF8 is used when asked or when an address is
        not ASCII.  *dsn*: the RFC 3461 parameters received with the message,
        passed on when the server offers DSN (``result.dsn`` says it did).
        *then*: see :meth:`send_prepared`.
        Raises Unsupported8Bit / UnsupportedSmtpUtf8 (nothing sent),
        SmtpTimeout, SmtpConnectionLost, SmtpProtocolError.
        """
        self._begin()
        try:
            txn = self.prepare(sender, recipients, message, eight_bit=eight_bit,
                               smtputf8=smtputf8, dsn=dsn)
        except BaseException:
            self._state = self._state_before
            raise
        return await self._run(txn, then)

    async def send_prepared(self, txn: Transaction, then=None) -> DeliveryResult:
        """Run a transaction made by :meth:`prepare` (its envelope may be on the wire already).

        *then*: None, or a function called with this connection just before
        the message goes out; it may return the next :class:`Transaction` of
        this connection (made by :meth:`prepare`), whose envelope is then
        written behind this message's final dot in the same write (RFC 2920
        allows message content first in a group: cross-transaction
        pipelining).  That transaction must be the next one run on this
        connection, with ``send_prepared``; if this one fails and the
        connection is no longer usable, it was never run: nothing of its
        message was sent.  Returns None when nothing should follow.
        """
        self._begin()
        return await self._run(txn, then)

    async def _run(self, txn: Transaction, then) -> DeliveryResult:
        self._body_sent = False
        try:
            result = await self._transaction(txn, then)
        except BaseException as exc:
            if isinstance(exc, SmtpConnectionLost) and not self._body_sent:
                exc.unsent = True               # (lost during the envelope)
            if self._state == _BUSY:      # state on the server unknown: give up on it
                self.close()
            raise
        if self._state == _BUSY:
            self._state = _READY
        return result

    def prepare(self, sender: str, recipients: list[str], message: bytes, *,
                eight_bit: bool = False, smtputf8: bool = False,
                dsn: DsnParams | None = None) -> Transaction:
        """The transaction's checks and envelope, for this connection; nothing is sent.

        Raises Unsupported8Bit / UnsupportedSmtpUtf8.  A transaction whose
        answer needs nothing from the server (too big for its SIZE, bad
        addresses) has ``result`` set.
        """
        eight_bit = eight_bit or not message.isascii()
        if eight_bit and not self.supports_8bitmime:
            raise Unsupported8Bit()
        ext = self.extensions
        if not smtputf8 and (dsn is None or "DSN" not in ext):
            # The usual transaction: ASCII addresses that need no refusal and no DSN
            # parameters.  Its lines are checked and written in one compiled pass
            # (mta._ext.envelope), the same octets the general way below writes.
            params = " SIZE=%d" % len(message) if "SIZE" in ext else ""
            if eight_bit:
                params += " BODY=8BITMIME"
            lines = _plain_envelope(sender, recipients, params)
            if lines is not None:
                txn = Transaction(message)
                n = len(recipients)
                limit = self.max_size
                if limit is not None and len(message) > limit:
                    txn.result = DeliveryResult([REPLY_TOO_BIG] * n, None)
                    return txn
                txn.mail, txn.rcpts = lines
                txn.replies = [None] * n
                txn.send_idx = list(range(n))
                txn.dsn = "DSN" in ext
                return txn
        utf8 = not sender.isascii() or not all(map(str.isascii, recipients))
        need_utf8: list[int] = []
        if utf8:
            if not self.supports_smtputf8:
                # No SMTPUTF8: the envelope goes in its all-ASCII form where it has one
                # (a U-label domain as its A-labels, RFC 5890 2.3.2.1), as Postfix's
                # client does; an address without one (a UTF-8 local part) is refused
                # here, the others go.  A UTF-8 header needs SMTPUTF8 whatever the
                # envelope: nothing is sent then.  (Only for non-ASCII addresses.)
                sender, recipients, need_utf8 = _ascii_envelope(sender, recipients, message)
                utf8 = False
        elif smtputf8:
            # The client said SMTPUTF8 (some say it on every MAIL), but the addresses
            # are ASCII: only a header that is not needs it.  Where the server offers
            # it, it is passed on as asked; where not, the message goes without it,
            # as Postfix's client does, rather than bouncing mail nothing in which
            # needs it (RFC 6531 3.2 asks for SMTPUTF8 where the message needs it).
            if self.supports_smtputf8:
                utf8 = True
            elif not _header_block(message).isascii():
                raise UnsupportedSmtpUtf8()
        n = len(recipients)
        txn = Transaction(message)
        limit = self.max_size
        if limit is not None and len(message) > limit:
            txn.result = DeliveryResult([REPLY_TOO_BIG] * n, None)
            return txn
        if _BAD_ADDRESS.search(sender):
            txn.result = DeliveryResult([REPLY_BAD_SENDER] * n, None)
            return txn
        replies: list[SmtpReply | None] = [None] * n
        send_idx = []
        for i, r in enumerate(recipients):
            if not r or _BAD_ADDRESS.search(r):
                replies[i] = REPLY_BAD_RCPT
            else:
                send_idx.append(i)
        for i in need_utf8:
            replies[i] = REPLY_NEED_SMTPUTF8
        txn.replies = replies
        txn.send_idx = send_idx
        if not send_idx:
            txn.result = DeliveryResult(replies, None)
            return txn
        params = ""
        if "SIZE" in self.extensions:
            params += " SIZE=%d" % len(message)
        if eight_bit:
            params += " BODY=8BITMIME"
        if utf8:
            params += " SMTPUTF8"
        enc = "utf-8" if utf8 else "ascii"
        txn.dsn = self.supports_dsn
        if txn.dsn and dsn is not None:
            params += dsn.mail_params()
            txn.mail = ("MAIL FROM:<%s>%s\r\n" % (sender, params)).encode(enc)
            txn.rcpts = [("RCPT TO:<%s>%s\r\n" % (recipients[i], dsn.rcpt_params(i))).encode(enc)
                         for i in send_idx]
        else:
            txn.mail = ("MAIL FROM:<%s>%s\r\n" % (sender, params)).encode(enc)
            txn.rcpts = [("RCPT TO:<%s>\r\n" % recipients[i]).encode(enc) for i in send_idx]
        return txn

    async def _transaction(self, txn: Transaction, then) -> DeliveryResult:
        """The steps of a transaction; leaves _state READY, DIRTY, BUSY (= READY) or CLOSED."""
        # 1. An answer that needs nothing from the server.
        if txn.result is not None:
            if txn.sent:
                raise RuntimeError("a transaction with a result was sent")
            self._state = self._idle_state()
            return txn.result
        ahead = self._ahead
        if ahead is not None and ahead is not txn:
            raise RuntimeError("another transaction's envelope is on the wire")
        replies = txn.replies
        send_idx = txn.send_idx
        message = txn.message
        rcpts = txn.rcpts

        # 2. The envelope: MAIL, RCPT..., and DATA too when pipelining.
        if txn.sent:
            # written behind the previous message (cross-transaction pipelining)
            self._ahead = None
            count = txn.count
            try:
                got = await self._read(count, self.command_timeout, "MAIL")
            except SmtpConnectionLost as exc:
                got = self._said_before_lost(exc, count, 0)
            if len(got) < count:
                got.extend([got[-1]] * (count - len(got)))
            mail_reply = got[0]
            rcpt_got = got[1:-1]
            data_cmd_reply: SmtpReply | None = got[-1]
        elif self.supports_pipelining:
            # One write; replies: [RSET] MAIL RCPT... DATA.  A 421 cuts them short:
            # whatever it left unanswered gets the 421.
            rset = self._state_before == _DIRTY
            self.transactions += 1
            count = txn.count + rset
            try:
                got = await self._command(
                    (b"RSET\r\n" if rset else b"") + txn.envelope(), "MAIL", count)
            except SmtpConnectionLost as exc:
                got = self._said_before_lost(exc, count, rset)
            if len(got) < count:
                got.extend([got[-1]] * (count - len(got)))
            if rset:
                self._check_rset(got.pop(0))
            mail_reply = got[0]
            rcpt_got = got[1:-1]
            data_cmd_reply = got[-1]
        else:
            rset = self._state_before == _DIRTY
            self.transactions += 1
            data_cmd_reply = None
            rcpt_got = []
            # One command at a time; the envelope as a whole (RSET, MAIL, every RCPT,
            # DATA) gets command_timeout, as the replies to a pipelined envelope do: the
            # spool counts on an outcome within connect + 2 x command + data timeouts
            # (a server taking 20 s per RCPT of 50 must not keep the job past that, or
            # the spool sends it again while this copy may still be delivered).
            deadline = self._loop.time() + self.command_timeout

            def left() -> float:
                return max(0.0, min(self.command_timeout, deadline - self._loop.time()))

            if rset:
                r = (await self._command(b"RSET\r\n", "RSET", timeout=left()))[0]
                self._check_rset(r)
                mail_reply = r
            if not rset or mail_reply.is_ok:
                mail_reply = (await self._command(txn.mail, "MAIL", timeout=left()))[0]
            if mail_reply.is_ok:
                try:
                    for cmd in rcpts:
                        r = (await self._command(cmd, "RCPT", timeout=left()))[0]
                        rcpt_got.append(r)
                        if r.code == 421:
                            break
                except SmtpConnectionLost:
                    # lost after a refusal (see _said_before_lost): the replies stand
                    if not any(r.is_perm for r in rcpt_got):
                        raise
                    self.abort()
                    rcpt_got.extend([REPLY_LOST] * (len(rcpts) - len(rcpt_got)))
                    data_cmd_reply = REPLY_LOST
                rcpt_got.extend([rcpt_got[-1]] * (len(rcpts) - len(rcpt_got)))

        # 3. Sort out the envelope replies.  A 1xx or 3xx here (a server out of step,
        # or not SMTP) would read as "not refused": it is a temporary failure, and the
        # connection, whose replies can no longer be matched to commands, goes.
        if not _expected(mail_reply) or not all(map(_expected, rcpt_got)):
            self.close()
            mail_reply = _as_failure(mail_reply, "MAIL")
            if not mail_reply.is_ok:
                for i in send_idx:
                    replies[i] = mail_reply
                return DeliveryResult(replies, None, mail_refused=True)
            for i, r in zip(send_idx, rcpt_got, strict=True):
                replies[i] = _as_failure(r, "RCPT")
            # (the recipients it did accept: the message was not sent)
            return DeliveryResult(replies, LocalReply(
                451, "4.5.0", "the server's replies were out of step with the commands (a "
                "1xx or 3xx to MAIL or RCPT); the message was not sent"))
        if not mail_reply.is_ok:
            for i in send_idx:
                replies[i] = mail_reply
            if self._wire.closing or (data_cmd_reply is not None and data_cmd_reply.code == 354):
                self.close()                # going away, or DATA open without MAIL
            return DeliveryResult(replies, None, mail_refused=True)
        accepted = 0
        for i, r in zip(send_idx, rcpt_got, strict=True):
            replies[i] = r
            accepted += r.is_ok
        if self._wire.closing:
            # a 421 somewhere: the server is going away
            self.close()
            return DeliveryResult(replies, self._wire.goodbye if accepted else None)
        if not accepted:
            if data_cmd_reply is not None and data_cmd_reply.code == 354:
                self.close()                # no recipient, yet DATA open: cannot recover
            elif self._state == _BUSY:
                self._state = _DIRTY  # MAIL is open on the server
            return DeliveryResult(replies, None)
        if data_cmd_reply is None:
            try:
                data_cmd_reply = (await self._command(b"DATA\r\n", "DATA", timeout=left()))[0]
            except SmtpConnectionLost:
                if not any(r.is_perm for r in rcpt_got):    # (see _said_before_lost)
                    raise
                self.abort()
                data_cmd_reply = REPLY_LOST
        if data_cmd_reply.code != 354:
            if data_cmd_reply.code < 400:
                # positive, but not "go ahead": nothing was sent, so nothing delivered
                self.close()
                return DeliveryResult(replies, LocalReply(
                    451, "4.5.0", f"unexpected reply to DATA: {data_cmd_reply}"))
            if self._wire.closing:
                self.close()
            elif self._state == _BUSY:    # (not when the connection is gone)
                self._state = _DIRTY
            return DeliveryResult(replies, data_cmd_reply)

        # 4. The message.  Recipients refused for the server's recipient limit go again
        # in the next transaction on this connection (the caller's, DeliveryResult.
        # over_limit): no other envelope may be sent ahead of theirs.
        if then is not None and len(replies) > 1 and _over_limit(replies):
            then = None
        try:
            data_reply = await self._send_data(message, then)
        except SmtpError as exc:
            exc.rcpt_replies = replies      # (lost or timed out: not of the refused ones)
            raise
        if not _expected(data_reply):
            data_reply = _as_failure(data_reply, "the end of data")
            self.close()
        if data_reply.is_ok:
            self.messages_sent += 1
        if self._wire.closing:
            self.close()
        return DeliveryResult(replies, data_reply, txn.dsn)

    async def _send_data(self, message: bytes, then=None) -> SmtpReply:
        """Write the dot-stuffed message and the final dot; return the final reply.

        With *then* (see send_prepared), the next transaction's envelope goes
        out in the same write as the final dot.
        """
        w = self._wire
        self._body_sent = True
        deadline = self._loop.time() + self.data_timeout
        nxt = then(self) if then is not None and self.supports_pipelining else None
        after = b""
        if nxt is not None:
            if nxt.result is not None or nxt.sent:
                raise RuntimeError("the next transaction cannot be sent ahead")
            after = nxt.envelope()
        if len(message) <= SINGLE_WRITE_MAX:
            # (dot_stuff(message) + after, in one compiled pass: mta._ext.envelope.data)
            block = _data_block(message, after)
            self._write(block if block is not None else dot_stuff(message) + after)
        else:
            body = message.replace(b"\n.", b"\n..")
            if body[:1] == b".":
                self._write(b".")
            self._write(body)
            self._write((b".\r\n" if body[-2:] == b"\r\n" else b"\r\n.\r\n") + after)
        w.owed += 1
        if nxt is not None:
            nxt.sent = True
            self._ahead = nxt
            self.transactions += 1
            w.owed += nxt.count
        if w.paused:
            await self._drain(deadline)
        return (await self._read(1, deadline - self._loop.time(), "end of data"))[0]

    def _said_before_lost(self, exc: SmtpConnectionLost, count: int, rset: int
                          ) -> list[SmtpReply]:
        """The *count* replies to a pipelined [RSET] envelope whose connection was lost
        (*exc*) before all came: those that came, the rest REPLY_LOST -- when MAIL or a
        RCPT was refused (5xx) before the loss; else *exc* is raised again.

        A server that refuses and then hangs up (Exim's "drop" ACL verb, a server
        that drops a client after a bad recipient) has said its word on those: its
        refusal decides them, not a lost connection that would defer them, and get
        the same at every retry until the message expires.  Nothing was sent.
        """
        said = list(self._wire.replies)
        self._wire.replies.clear()
        self.abort()
        if rset and (not said or not said[0].is_ok):
            raise exc
        envelope = said[rset:count - 1]
        if not any(r.is_perm for r in envelope):
            raise exc
        return said[:count] + [REPLY_LOST] * (count - len(said))

    def _check_rset(self, reply: SmtpReply) -> None:
        if not reply.is_ok and reply.code != 421:
            self.close()
            raise SmtpProtocolError("RSET refused", reply)

    # -- other commands --

    async def reset(self) -> None:
        """Send RSET: abandon any transaction on the server."""
        self._not_ahead()
        self._begin()
        try:
            reply = (await self._command(b"RSET\r\n", "RSET"))[0]
            self._check_rset(reply)
        except BaseException:
            self.close()
            raise
        if reply.code == 421:
            self.close()
            raise SmtpConnectionLost("server closing: %s" % reply)
        self._state = _READY

    async def noop(self) -> SmtpReply:
        """Send NOOP (a liveness check for an idle pooled connection); return the reply."""
        self._not_ahead()
        self._begin()
        try:
            reply = (await self._command(b"NOOP\r\n", "NOOP"))[0]
        except BaseException:
            self.close()
            raise
        if reply.code == 421:
            self.close()
        else:
            self._state = self._state_before
        return reply

    async def quit(self) -> None:
        """Send QUIT, wait briefly for the reply, close.  Never raises."""
        if self._state == _BUSY:      # a call is in progress: drop the connection under it
            self.abort()
            return
        if self._state == _CLOSED or self._wire.lost or self._ahead is not None:
            # (an envelope sent ahead and never run may have left DATA open: QUIT
            # would be taken for message text; closing makes the server drop it)
            self.close()
            return
        self._state = _BUSY
        await self._quit_quietly()

    async def _quit_quietly(self) -> None:
        try:
            if not (self._wire.lost or self._wire.closing or self._wire.error):
                await self._command(b"QUIT\r\n", "QUIT",
                                    timeout=min(self.command_timeout, QUIT_TIMEOUT_MAX))
        except Exception:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection now (buffered output is still flushed)."""
        self._state = _CLOSED
        t = self._wire.transport
        if t is not None and not t.is_closing():
            t.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        self._state = _CLOSED
        t = self._wire.transport
        if t is not None:
            t.abort()

    # -- plumbing --

    def _begin(self) -> None:
        """Enter a call: check the connection can take one, remember the state."""
        st = self._state
        if st == _BUSY:
            raise RuntimeError("SmtpConnection is already in use")
        w = self._wire
        if st == _CLOSED or w.lost or w.closing or w.error is not None:
            raise SmtpConnectionLost("connection is closed")
        self._state_before = st
        self._state = _BUSY

    def _not_ahead(self) -> None:
        if self._ahead is not None:
            raise RuntimeError("a transaction sent ahead must be run first (send_prepared)")

    def _idle_state(self) -> _State:
        return self._state_before

    def _write(self, data: bytes) -> None:
        t = self._wire.transport
        if t is None or t.is_closing():
            # closed by us for a protocol error (a reply nothing asked for): that is the
            # reason, not a server that hung up
            raise self._wire.error or SmtpConnectionLost("connection closed")
        t.write(data)

    async def _command(self, data: bytes, what: str, count: int = 1,
                       timeout: float | None = None) -> list[SmtpReply]:
        """Write *data* (one or more commands); return their *count* replies (fewer after 421)."""
        self._write(data)
        self._wire.owed += count
        return await self._read(count, self.command_timeout if timeout is None else timeout, what)

    async def _read(self, count: int, timeout: float, what: str) -> list[SmtpReply]:
        """Wait for *count* replies; return them (fewer when a 421 ended the session)."""
        w = self._wire
        if len(w.replies) < count and not w.closing and not w.lost and w.error is None:
            fut = self._loop.create_future()
            w.waiter = fut
            w.want = count
            handle = self._loop.call_later(max(timeout, 0.0), _timed_out, fut)
            try:
                await fut
            finally:
                handle.cancel()
                w.waiter = None
        q = w.replies
        if len(q) >= count:
            return [q.popleft()] if count == 1 else [q.popleft() for _ in range(count)]
        if w.closing and q:
            out = list(q)
            q.clear()
            return out
        if w.error is not None:
            self.abort()
            raise w.error
        if w.lost or w.closing:
            self.abort()
            raise SmtpConnectionLost(f"connection lost waiting for the {what} reply")
        self.abort()
        raise SmtpTimeout(f"no {what} reply within {timeout:g} s")

    async def _drain(self, deadline: float) -> None:
        """Wait until the transport accepts more data, or the deadline."""
        w = self._wire
        while w.paused and not w.lost and w.error is None and not w.replies:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                self.abort()
                raise SmtpTimeout("message not accepted within the data timeout")
            fut = self._loop.create_future()
            w.drainer = fut
            handle = self._loop.call_later(remaining, _timed_out, fut)
            try:
                await fut
            finally:
                handle.cancel()
                w.drainer = None
        if w.replies:
            return                      # the server answered early; the caller reads it
        if w.error is not None:
            self.abort()
            raise w.error
        if w.lost:
            self.abort()
            raise SmtpConnectionLost("connection lost while sending the message")


# --- connecting ------------------------------------------------------------------------------

# Errors of connect() that are the local side's: no ephemeral port left for the
# source address (or the address went away).  Any other errno is the destination's.
_SOURCE_ERRNOS = frozenset((errno.EADDRNOTAVAIL, errno.EADDRINUSE))
# Linux: choose the local port at connect(), not bind(), so that a bound source
# address is not limited to one connection per ephemeral port across all destinations.
# (The option lives at the IP level and applies to IPv6 sockets too.)
_BIND_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)


def _ip_family(address: str) -> int | None:
    """AF_INET / AF_INET6 for an IP literal, None for anything else (a name)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


async def _connect_direct(loop: asyncio.AbstractEventLoop, host: str, port: int,
                          source: str | None, timeout: float) -> tuple[socket.socket, str]:
    """TCP to *host*:*port* from *source* (bound first) within *timeout*: (socket, local IP).

    Binding fails -> SourceUnavailable at once (no other address of *host* is
    tried: no address of it can help).  A source of the other IP version than
    every address of *host* -> SmtpConnectError (this destination, not the source).
    """
    deadline = loop.time() + timeout
    src_family = None
    if source:
        src_family = _ip_family(source)
        if src_family is None:
            raise SourceUnavailable(f"source address {source!r} is not an IP address", source)
    family = _ip_family(host)
    if family is not None:
        addrs = [(family, (host, port))]
    else:
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (asyncio.TimeoutError, TimeoutError, OSError) as exc:
            raise SmtpConnectError(f"connect to {hostport(host, port)}: address lookup failed ({exc})",
                                   temporary=True) from None
        addrs = [(fam, sa) for fam, _, _, _, sa in infos]
    last = None
    for fam, sockaddr in addrs:
        if src_family is not None and fam != src_family:
            last = f"source {source} cannot reach an IPv{4 if fam == socket.AF_INET else 6} address"
            continue
        sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if source:
                if _BIND_NO_PORT is not None:
                    try:
                        sock.setsockopt(socket.IPPROTO_IP, _BIND_NO_PORT, 1)
                    except OSError:
                        pass            # older kernel: the port is chosen at bind()
                try:
                    sock.bind((source, 0))
                except OSError as exc:
                    raise SourceUnavailable(
                        f"cannot bind source address {source} ({socks.describe_os_error(exc)})",
                        source) from None
            try:
                await asyncio.wait_for(loop.sock_connect(sock, sockaddr),
                                       max(deadline - loop.time(), 0))
            except (asyncio.TimeoutError, TimeoutError):
                raise SmtpConnectError(f"connect to {hostport(host, port)} timed out",
                                       temporary=True) from None
            except OSError as exc:
                if exc.errno in _SOURCE_ERRNOS:
                    raise SourceUnavailable(
                        f"no connection from source address {source or '(default)'} "
                        f"({socks.describe_os_error(exc)})", source or "") from None
                last = socks.describe_os_error(exc)
                sock.close()
                continue
        except BaseException:
            sock.close()
            raise
        return sock, sock.getsockname()[0]
    raise SmtpConnectError(f"connect to {hostport(host, port)} failed ({last or 'no address'})",
                           temporary=True)


async def _connect_via_proxy(loop: asyncio.AbstractEventLoop, host: str, port: int,
                             proxy: Socks5Proxy, source: str | None,
                             timeout: float) -> tuple[socket.socket, str | None]:
    """TCP to *host*:*port* through *proxy*: (socket, the sending IP the server sees)."""
    try:
        sock, bnd_addr, _ = await socks.connect(proxy, host, port, timeout, loop=loop)
    except socks.ProxyUnavailable as exc:
        raise SourceUnavailable(exc.reason, proxy.name) from None
    except socks.DestinationError as exc:
        raise SmtpConnectError(f"connect to {hostport(host, port)} failed ({exc.strerror})",
                               temporary=True) from None
    except ValueError as exc:
        raise SmtpConnectError(f"connect to {hostport(host, port)} impossible ({exc})",
                               temporary=True) from None
    unspecified = bnd_addr in ("0.0.0.0", "::") or not bnd_addr
    return sock, (source or None) if unspecified else bnd_addr


def _parse_extensions(text: str) -> dict[str, str]:
    """EHLO reply text (first line is the server's name) -> {KEYWORD: params}."""
    ext: dict[str, str] = {}
    for line in text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            ext[keyword.upper()] = params.strip()
    return ext
