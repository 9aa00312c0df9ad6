"""Delivery status notifications (RFC 3464, RFC 6522, RFC 3834; RFC 6533 for UTF-8).

What it does: ``build_dsn`` writes the bounce (or delay notice) that goes back
to a message's envelope sender: a complete RFC 5322 message, as bytes, with
CRLF line ends and no line over 998 octets.  Pure function: reads and writes
nothing, talks to no peer.  The caller sends it with a null reverse-path
(``MAIL FROM:<>``) and never builds one for a message whose own envelope sender
is null (``build_dsn`` refuses: no bounces of bounces, RFC 5321 §4.5.5).

Layout (``multipart/report; report-type=delivery-status``):

1. ``text/plain``: what happened, per recipient: the address, the remote host
   and what it replied.
2. ``message/delivery-status``: ``Reporting-MTA``, ``Original-Envelope-Id``
   (when the client gave ENVID), ``X-Queue-ID``, ``Arrival-Date``; per
   recipient ``Original-Recipient`` (ORCPT, when given), ``Final-Recipient``,
   ``Action``, ``Status``, ``Remote-MTA``, ``Diagnostic-Code``,
   ``Last-Attempt-Date`` (when it was attempted), ``Will-Retry-Until`` (delay notices).
3. ``text/rfc822-headers``: the original header block only (up to the first
   empty line, CRLF CRLF -- or LF LF in a message with bare LFs; all of the
   message when there is none), line ends made CRLF, capped at
   ``MAX_RETURNED_HEADERS`` octets at a line boundary.

Status: the recipient's enhanced code when it has one, else the one in its
server reply (``550 5.1.1 ...``), else the class of the basic code (``550`` ->
``5.0.0``), else ``5.0.0`` for failed and ``4.0.0`` for delayed recipients.
Diagnostic-Code is ``smtp;`` when the diagnostic is an SMTP reply of the
recipient's ``remote_host`` (a multi-line reply is joined into one line, its
repeated codes dropped) and ``x-local;`` for our own explanations (DNS
failure, connection refused, ...), those with a reply code included (the loop
check's "554 5.4.6", a dead site's "451 4.4.1": no remote host said them; a
``local`` one about a host: "553 5.6.7 mx does not support SMTPUTF8").

8-bit data.  The notice itself is 7-bit whenever it can be, so that it reaches
any sender's server, with or without 8BITMIME:

- Original headers with 8-bit octets (UTF-8 subjects sent raw, or broken
  bytes) are returned as ``text/rfc822-headers`` in quoted-printable, with
  ``charset=utf-8`` when they are valid UTF-8 and ``unknown-8bit`` (RFC 1428)
  otherwise.  Readers decode it back to the exact original octets.  (Our
  choice over ``message/global-headers``: that type needs 8-bit transport and
  is meant for SMTPUTF8 mail only.)  The same happens to header lines longer
  than 998 octets.
- Only when the envelope sender or a recipient address is not ASCII and has
  no ASCII form (a UTF-8 local part: an address whose domain alone is in
  U-labels is written with its A-labels) is the notice an RFC 6533 "global"
  DSN: ``message/global-delivery-status`` with ``utf-8`` address types,
  ``message/global-headers``, UTF-8 text, ``8bit`` transfer encoding.  Such a
  notice must be sent with SMTPUTF8 (``needs_smtputf8(dsn)`` tells).
- An ORCPT of type ``utf-8`` (or one whose address is not ASCII) does not make
  the notice global: its Original-Recipient is ``utf-8;`` with the address as
  utf-8-addr-xtext (``\\x{FC}``) in a 7-bit notice, as utf-8-addr-unitext (the
  UTF-8 itself) in a global one (RFC 6533 §3).
- Remote replies are reduced to printable text (control characters and, in
  7-bit notices, non-ASCII characters become ``?``).
"""
from __future__ import annotations

import dataclasses
import datetime
import re
import secrets
import textwrap
from dataclasses import dataclass

from mta.idn import ascii_address

CRLF = b"\r\n"
MAX_LINE = 998  # octets per line, RFC 5322 §2.1.1, without CRLF
FOLD_WIDTH = 78  # preferred line width of the fields and text we write
QP_WIDTH = 76  # quoted-printable line width, RFC 2045 §6.7
MAX_RETURNED_HEADERS = 256 * 1024  # octets of the original header block returned

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")  # RFC 3464 §2.3.3
SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_SUCCESS = "Successful Mail Delivery Report"
MAX_RETURNED_MESSAGE = 1024 * 1024  # octets: RET=FULL returns a larger message's headers only
FROM_NAME = "Mail Delivery System"

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_BASIC = re.compile(r"[245]\d\d")
_REPLY = re.compile(r"([245])\d\d(?:[ -]|$)(?:([245]\.\d{1,3}\.\d{1,3})(?:\s|$))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_SPACES = re.compile(r"[ \t]*(?:\r\n|\r|\n)[ \t]*")
_REPLY_LINE = re.compile(r"([245]\d\d)[ -](?:([245]\.\d{1,3}\.\d{1,3})(?:\s|$))?")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass(slots=True)
class RecipientFailure:
    """One recipient's outcome to report."""

    recipient: str  # the address we tried (Final-Recipient)
    status: str | None  # enhanced ("5.1.1") or basic ("550") code, if known
    remote_host: str | None  # the server that replied, if any ("mx1.example.com")
    diagnostic: str  # its reply ("550 5.1.1 <a@b>: no such user") or our explanation
    last_attempt: float | None  # Unix time of the last attempt; None: never attempted
    action: str = "failed"
    original_recipient: str | None = None  # ORCPT as given by the client (type; address)
    retry_until: float | None = None  # delay notices: when we give up
    local: bool = False  # the diagnostic is ours, not a reply of remote_host (x-local)


# -- RFC 3461 parameters (NOTIFY, ORCPT on RCPT; ENVID, RET on MAIL) -------------------------

NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")   # or NEVER alone
MAX_ENVID = 100      # octets of the ENVID value, xtext-encoded (RFC 3461 §4.4)
MAX_ORCPT = 500      # octets of the ORCPT value, addr-type and xtext (RFC 3461 §4.2)
# 33-126 but "+" and "=", or +HH (RFC 3461 asks for upper-case hex; lower case is read too)
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")   # RFC 6533 EmbeddedUnicodeChar
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")   # an RFC 822 atom
# RFC 6533 utf-8-addr-unitext: printable ASCII but "+", "=", "\\", or UTF-8, or \\x{HEX}
_UNITEXT = re.compile(r"(?:[!-*,-<>-\[\]-~\x80-\U0010FFFF]|\\x\{[0-9A-Fa-f]{1,6}\})+")


def parse_notify(value: str) -> str | None:
    """A NOTIFY value normalised ("NEVER" or e.g. "SUCCESS,FAILURE"); None when invalid.

    Keywords are case-insensitive; NEVER stands alone; a keyword may not repeat.
    """
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if not all(w in NOTIFY_KEYWORDS for w in words) or len(set(words)) != len(words):
        return None
    return ",".join(w for w in NOTIFY_KEYWORDS if w in words)


def notify_allows(notify: str | None, kind: str) -> bool:
    """Whether a recipient with NOTIFY *notify* ("" or None: not given) gets a *kind* DSN.

    *kind* is SUCCESS, FAILURE or DELAY.  Without NOTIFY a recipient gets
    failure and delay notices, no success notice (RFC 3461 §4.1).
    """
    if not notify:
        return kind != "SUCCESS"
    return kind in notify.split(",")


def valid_xtext(value: str) -> bool:
    """True when *value* is xtext (RFC 3461 §4): printable ASCII, "+" and "=" as +HH."""
    return _XTEXT.fullmatch(value) is not None


def xtext_decode(value: str) -> str:
    """Decode xtext ("+2B" -> "+"); the caller has checked it with :func:`valid_xtext`."""
    if "+" not in value:
        return value
    raw = re.sub(rb"\+([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 value.encode("ascii", "replace"))
    return raw.decode("utf-8", "replace")


def xtext_encode(value: str) -> str:
    """Encode text as xtext: "+", "=", controls, space and non-ASCII as +HH (UTF-8 octets)."""
    out = []
    for ch in value:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend("+%02X" % b for b in ch.encode("utf-8"))
    return "".join(out)


def parse_orcpt(value: str, utf8: bool = False) -> str | None:
    """An ORCPT value ("rfc822;user+2Bx@example.com") checked, as given; None when invalid.

    *utf8*: the transaction uses SMTPUTF8, so a ``utf-8`` address may be
    utf-8-addr-unitext, UTF-8 itself (RFC 6533 3); otherwise the value is xtext.
    """
    if len(value) > MAX_ORCPT:
        return None
    addr_type, sep, addr = value.partition(";")
    if not sep or not addr or _ADDR_TYPE.fullmatch(addr_type) is None:
        return None
    if addr.isascii():
        return value if valid_xtext(addr) else None
    if not utf8 or addr_type.lower() != "utf-8" or len(value.encode("utf-8")) > MAX_ORCPT \
            or _UNITEXT.fullmatch(addr) is None:
        return None
    return value


def utf8_addr_decode(value: str) -> str:
    """A utf-8-addr-xtext or -unitext (RFC 6533 3) decoded: "\\x{FC}" -> "ü"."""
    if "\\x{" not in value:
        return value

    def char(m: re.Match) -> str:
        n = int(m.group(1), 16)
        return chr(n) if n <= 0x10FFFF and not 0xD800 <= n <= 0xDFFF else m.group(0)
    return _EMBEDDED.sub(char, value)


def utf8_addr_encode(addr: str, unitext: bool) -> str:
    """*addr* as utf-8-addr-xtext (RFC 6533 3: all but printable ASCII other than
    "+", "=", "\\" as \\x{HEX}), or as utf-8-addr-unitext (non-ASCII kept)."""
    return "".join(ch if ("!" <= ch <= "~" and ch not in "+=\\") or (unitext and ch > "\x7f")
                   else "\\x{%02X}" % ord(ch) for ch in addr)


def orcpt_text(value: str) -> str:
    """An ORCPT as it goes into Original-Recipient: "rfc822; user+x@example.com"."""
    addr_type, _, addr = value.partition(";")
    return f"{addr_type.strip()}; {xtext_decode(addr)}"


def parse_envid(value: str) -> str | None:
    """An ENVID value checked (xtext, at most MAX_ENVID octets), as given; None when invalid."""
    if not value or len(value) > MAX_ENVID or not valid_xtext(value):
        return None
    return value


def parse_ret(value: str) -> str | None:
    """A RET value normalised (FULL or HDRS); None when invalid."""
    value = value.upper()
    return value if value in ("FULL", "HDRS") else None


def new_message_id(queue_id: str, reporting_mta: str, now: float) -> str:
    """A unique Message-ID for the DSN of *queue_id*, angle brackets included."""
    return f"<{_clean(queue_id)}.{int(now)}.{secrets.token_hex(6)}@{_clean(reporting_mta).strip()}>"


def build_dsn(*, original: bytes, envelope_sender: str, failed: list[RecipientFailure],
              reporting_mta: str, arrival_time: float, queue_id: str, delayed: bool = False,
              envid: str | None = None, now: float | None = None,
              message_id: str | None = None, ret_full: bool = False) -> bytes:
    """The complete DSN message (bytes, CRLF) for ``failed`` recipients of ``original``.

    ``delayed=True`` makes it a delay notice: its subject and text say so
    and every recipient's Action is ``delayed``.  ``envid`` is the client's
    ENVID (xtext-decoded); ``now`` the Date to use (default: the clock);
    ``message_id`` its Message-ID (default: :func:`new_message_id`).
    When every recipient's Action is ``delivered`` or ``relayed`` it is a
    success notice (RFC 3461 NOTIFY=SUCCESS).  ``ret_full`` (RET=FULL, for
    a failure notice) returns the whole message as ``message/rfc822`` when
    it is 7-bit, has no line over 998 octets and is at most
    ``MAX_RETURNED_MESSAGE`` octets; otherwise, and by default, the headers.
    """
    sender = _clean(envelope_sender).strip()
    if not sender or sender == "<>":
        raise ValueError("no DSN for a message with a null envelope sender")
    if not failed:
        raise ValueError("a DSN needs at least one recipient")
    mta = _clean(reporting_mta).strip()
    if not mta or not mta.isascii() or " " in mta:
        raise ValueError(f"reporting_mta must be an ASCII host name: {reporting_mta!r}")
    now = datetime.datetime.now(datetime.timezone.utc).timestamp() if now is None else now
    # An address in U-labels with an ASCII local part is written in its A-label form:
    # only an address without an ASCII form makes the notice a global one, which a
    # server without SMTPUTF8 may not take.  (An ORCPT does not decide: in a 7-bit
    # notice it is utf-8-addr-xtext.)
    sender = ascii_address(sender) or sender
    failed = [r if r.recipient.isascii() else _in_ascii(r) for r in failed]
    rcpts = []
    for r in failed:
        action = "delayed" if delayed else r.action
        if action not in ACTIONS:
            raise ValueError(f"unknown DSN action {r.action!r}")
        rcpts.append((r, action, dsn_status(r.status, r.diagnostic, action)))
    utf8 = not sender.isascii() or any(not r.recipient.isascii() for r in failed)

    success = all(a in ("delivered", "relayed") for _, a, _ in rcpts)
    text = _text_part(mta, rcpts, delayed, utf8, success)
    status = _status_part(mta, queue_id, envid, arrival_time, rcpts, utf8)
    if ret_full and not delayed and not success and _returnable(original):
        returned = _message_part(original)
    else:
        returned = _headers_part(original_headers(original), utf8)
    subject = SUBJECT_DELAYED if delayed else SUBJECT_SUCCESS if success else SUBJECT_FAILED
    parts = [text, status, returned]
    boundary = _boundary(queue_id, parts)

    out = [
        b"From: " + _enc(f"{FROM_NAME} <MAILER-DAEMON@{mta}>"),
        b"To: " + _enc(f"<{sender}>"),
        b"Subject: " + _enc(subject),
        b"Date: " + _enc(rfc5322_date(now)),
        b"Message-ID: " + _enc(_clean(message_id or new_message_id(queue_id, mta, now))),
        b"Auto-Submitted: auto-replied",
        b"MIME-Version: 1.0",
        b"Content-Type: multipart/report; report-type=delivery-status;",
        b'\tboundary="' + boundary + b'"',
        b"Content-Transfer-Encoding: " + (b"8bit" if utf8 else b"7bit"),
        b"",
        b"This is a MIME-encapsulated message.",
        b"",
    ]
    body = CRLF.join(out) + CRLF
    for part in parts:
        body += b"--" + boundary + CRLF + part
    body += b"--" + boundary + b"--" + CRLF
    return body


def _in_ascii(r: RecipientFailure) -> RecipientFailure:
    """*r* with its recipient in its all-ASCII form when it has one (mta.idn)."""
    a = ascii_address(r.recipient)
    return r if a is None else dataclasses.replace(r, recipient=a)


def needs_smtputf8(dsn: bytes) -> bool:
    """True when the notice has UTF-8 addresses (an RFC 6533 global DSN)."""
    return not dsn.isascii()


# -- pieces ----------------------------------------------------------------------------------

def original_headers(message: bytes) -> bytes:
    """The header block of ``message`` with CRLF line ends, ending in CRLF (b"" if empty)."""
    if message.startswith((b"\r\n", b"\n")):
        block = b""
    else:
        # the first empty line; CRLF is what the spool keeps, bare LF is tolerated
        m = _BLANK_LINE.search(message)
        block = message if m is None else message[:m.start()]
    if len(block) > MAX_RETURNED_HEADERS:
        cut = block.rfind(b"\n", 0, MAX_RETURNED_HEADERS)
        block = block[:cut + 1] if cut > 0 else block[:MAX_RETURNED_HEADERS]
    lines = re.split(rb"\r\n|\r|\n", block)
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + CRLF for line in lines)


def dsn_status(status: str | None, diagnostic: str | None, action: str = "failed") -> str:
    """The RFC 3463 status for a recipient (see the module doc for the order of sources)."""
    status = (status or "").strip()
    if _ENHANCED.fullmatch(status):
        return status
    m = _REPLY.match((diagnostic or "").strip())
    if m:
        return m.group(2) or f"{m.group(1)}.0.0"
    if _BASIC.fullmatch(status):
        return f"{status[0]}.0.0"
    return "4.0.0" if action == "delayed" else "5.0.0"


def rfc5322_date(ts: float) -> str:
    """An RFC 5322 date-time in UTC ("Mon, 05 Oct 2026 12:00:00 +0000")."""
    dt = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
              "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    return (f"{days[dt.weekday()]}, {dt.day:02d} {months[dt.month - 1]} {dt.year:04d} "
            f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d} +0000")


def _clean(text: str | None) -> str:
    """One line of text: line breaks folded to a space, other control characters to '?'."""
    if not text:
        return ""
    return _CONTROL.sub("?", _SPACES.sub(" ", text))


def _flatten_reply(text: str) -> str:
    """A multi-line SMTP reply as one line: "550 5.1.1 first line second line"."""
    lines = [x for x in re.split(r"\r\n|\r|\n", text.strip()) if x.strip()]
    if len(lines) < 2:
        return text
    heads = [_REPLY_LINE.match(x) for x in lines]
    if not all(heads) or len({h.group(1) for h in heads}) != 1:
        return text
    code, enh = heads[0].group(1), heads[0].group(2)
    words = [code] + ([enh] if enh else [])
    words += [x[h.end():].strip() for x, h in zip(lines, heads, strict=True)]
    return " ".join(w for w in words if w)


def _said_by_server(r: RecipientFailure, said: str) -> bool:
    """Whether *said* (r's diagnostic) is a reply its remote server gave: "smtp" in a
    Diagnostic-Code (RFC 3464 2.3.6).  Our own errors ("554 5.4.6 ... loops back to
    myself") have a reply code but no host, or are *local* ("553 5.6.7 mx does not
    support SMTPUTF8")."""
    return bool(r.remote_host) and not r.local and _REPLY.match(said) is not None


def _reply_text(text: str | None, utf8: bool) -> str:
    out = _clean(_flatten_reply(text or "")).strip()
    return out if utf8 else _NON_ASCII.sub("?", out)


def _enc(text: str) -> bytes:
    return text.encode("utf-8")


def _fold(name: str, value: str, width: int = FOLD_WIDTH) -> list[str]:
    """A header field ``name: value`` folded at spaces; no line over MAX_LINE octets."""
    head = f"{name}:"
    lines: list[str] = []
    cur = head
    for word in value.split(" "):
        if not word:
            continue
        if cur != head and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = " " + word
        else:
            cur += " " + word
    lines.append(cur)
    out = []
    for line in lines:
        # a word too long for any line: break it hard (the value gains a space there)
        while len(line.encode("utf-8")) > MAX_LINE:
            cut = _cut_at(line, MAX_LINE)
            out.append(line[:cut])
            line = " " + line[cut:]
        out.append(line)
    return out


def _cut_at(text: str, limit: int) -> int:
    """The largest character index whose UTF-8 prefix fits in ``limit`` octets."""
    n = min(len(text), limit)
    while len(text[:n].encode("utf-8")) > limit:
        n -= 1
    return n


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, width=FOLD_WIDTH - 2, initial_indent=indent,
                         subsequent_indent=indent, break_long_words=True,
                         break_on_hyphens=False) or [indent.rstrip()]


def _returnable(message: bytes) -> bool:
    """Whether RET=FULL can return *message* whole in a 7-bit notice."""
    if len(message) > MAX_RETURNED_MESSAGE or not message.isascii():
        return False
    return all(len(line) <= MAX_LINE for line in message.split(CRLF))


def _message_part(message: bytes) -> bytes:
    """The whole original message (RET=FULL), then the CRLF that belongs to the boundary."""
    if not message.endswith(CRLF):
        message += CRLF
    return CRLF.join([b"Content-Description: Undelivered Message",
                      b"Content-Type: message/rfc822", b""]) + CRLF + message + CRLF


def _text_part(mta: str, rcpts, delayed: bool, utf8: bool, success: bool = False) -> bytes:
    lines = [f"This is the mail system at {mta}.", ""]
    if success:
        intro = ("Your message was successfully delivered to the destination(s) below. "
                 "\"relayed\" means it was passed on to a server that sends no further "
                 "delivery notices of its own.")
    elif delayed:
        intro = ("Your message has not been delivered yet to the recipients below. "
                 "It is still in the queue and delivery will be retried: you do not "
                 "need to send it again.")
    else:
        intro = ("Your message could not be delivered to the recipients below. "
                 "The delivery report and the headers of your message are attached. "
                 "Please contact your postmaster for help, and include this report.")
    lines += _wrap(intro, "") + [""]
    for r, action, status in rcpts:
        lines.append(f"<{_reply_text(r.recipient, utf8)}>: {action} ({status})")
        if r.remote_host:
            lines += _wrap(f"Remote host: {_reply_text(r.remote_host, utf8)}", "    ")
        said = _reply_text(r.diagnostic, utf8)
        if said:
            label = "Reply" if _said_by_server(r, said) else "Reason"
            lines += _wrap(f"{label}: {said}", "    ")
        if action == "delayed" and r.retry_until:
            lines.append(f"    Will retry until: {rfc5322_date(r.retry_until)}")
        lines.append("")
    charset = "utf-8" if utf8 else "us-ascii"
    head = ["Content-Description: Notification",
            f"Content-Type: text/plain; charset={charset}",
            "Content-Transfer-Encoding: " + ("8bit" if utf8 else "7bit"), ""]
    return _lines(head + lines)


def _address(addr: str, utf8: bool) -> str:
    addr = _clean(addr).strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return ("utf-8; " if utf8 and not addr.isascii() else "rfc822; ") + addr


def _original_recipient(value: str, utf8: bool) -> str:
    """An ORCPT ("type; address") as its Original-Recipient field says it: a utf-8 one,
    or one whose address is not ASCII, as utf-8-addr-unitext in a global notice and
    utf-8-addr-xtext in a 7-bit one (RFC 6533 3); others as given."""
    orcpt = _clean(value).strip()
    addr_type, sep, addr = orcpt.partition(";")
    if not sep:
        return _address(orcpt, utf8)
    if addr_type.strip().lower() != "utf-8" and addr.isascii():
        return orcpt
    space = addr[:len(addr) - len(addr.lstrip())]
    return f"utf-8;{space}{utf8_addr_encode(utf8_addr_decode(addr.strip()), utf8)}"


def _status_part(mta, queue_id, envid, arrival, rcpts, utf8: bool) -> bytes:
    fields = []
    fields += _fold("Reporting-MTA", f"dns; {mta}")
    if envid:
        fields += _fold("Original-Envelope-Id", _reply_text(envid, False))
    fields += _fold("X-Queue-ID", _clean(queue_id))
    fields += _fold("Arrival-Date", rfc5322_date(arrival))
    for r, action, status in rcpts:
        fields.append("")
        if r.original_recipient:
            fields += _fold("Original-Recipient", _original_recipient(r.original_recipient,
                                                                      utf8))
        fields += _fold("Final-Recipient", _address(r.recipient, utf8))
        fields += _fold("Action", action)
        fields += _fold("Status", status)
        if r.remote_host:
            fields += _fold("Remote-MTA", f"dns; {_reply_text(r.remote_host, utf8)}")
        said = _reply_text(r.diagnostic, utf8)
        if said:
            kind = "smtp" if _said_by_server(r, said) else "x-local"
            fields += _fold("Diagnostic-Code", f"{kind}; {said}")
        if r.last_attempt is not None:  # (none for a recipient never tried, RFC 3464 2.3.7)
            fields += _fold("Last-Attempt-Date", rfc5322_date(r.last_attempt))
        if action == "delayed" and r.retry_until:
            fields += _fold("Will-Retry-Until", rfc5322_date(r.retry_until))
    ctype = "message/global-delivery-status" if utf8 else "message/delivery-status"
    head = ["Content-Description: Delivery report", f"Content-Type: {ctype}"]
    if utf8:
        head.append("Content-Transfer-Encoding: 8bit")
    return _lines(head + [""] + fields + [""])


def _headers_part(headers: bytes, utf8: bool) -> bytes:
    desc = b"Content-Description: Undelivered Message Headers"
    long_line = any(len(line) > MAX_LINE for line in headers.split(CRLF))
    if utf8 and not long_line:
        return CRLF.join([desc, b"Content-Type: message/global-headers",
                          b"Content-Transfer-Encoding: 8bit", b""]) + CRLF + headers + CRLF
    if headers.isascii() and not long_line:
        return CRLF.join([desc, b"Content-Type: text/rfc822-headers", b""]) + CRLF + headers + CRLF
    try:
        headers.decode("utf-8")
        charset = b"utf-8"
    except UnicodeDecodeError:
        charset = b"unknown-8bit"
    return CRLF.join([desc, b"Content-Type: text/rfc822-headers; charset=" + charset,
                      b"Content-Transfer-Encoding: quoted-printable", b""]) + CRLF + \
        quoted_printable(headers) + CRLF


def quoted_printable(data: bytes) -> bytes:
    """RFC 2045 §6.7 quoted-printable of CRLF-separated lines (hard line breaks kept)."""
    out = []
    lines = data.split(CRLF)
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        enc = []
        for i, byte in enumerate(line):
            if (33 <= byte <= 126 and byte != 61) or (byte in (9, 32) and i < len(line) - 1):
                enc.append(chr(byte))
            else:
                enc.append("=%02X" % byte)
        cur = ""
        for piece in enc:
            if len(cur) + len(piece) > QP_WIDTH - 1:  # room for the soft break "="
                out.append(cur + "=")
                cur = ""
            cur += piece
        out.append(cur)
    return b"".join(line.encode("ascii") + CRLF for line in out)


def _lines(lines: list[str]) -> bytes:
    return b"".join(_enc(line) + CRLF for line in lines)


def _boundary(queue_id: str, parts: list[bytes]) -> bytes:
    """A boundary that occurs in no part."""
    while True:
        b = f"=_dsn_{secrets.token_hex(12)}".encode("ascii")
        if not any(b in p for p in parts):
            return b
