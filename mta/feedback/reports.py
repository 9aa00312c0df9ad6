"""Reading the reports that come back after delivery: asynchronous DSNs and ARF complaints.

Leaf library: the acceptor hands it the bytes of a message addressed to a
bounce domain (``feedback.bounce_domains``); it returns what the report says,
and the caller turns that into ``out_of_band`` / ``spam_complaint`` events and
suppression entries.  It imports no role and does no I/O.

Two report kinds are understood, both ``multipart/report`` (RFC 6522):

- **Delivery status notifications** (RFC 3464; ``report-type=delivery-status``,
  and the internationalised ``message/global-delivery-status`` of RFC 6533):
  the per-message fields (``Reporting-MTA``, ``Arrival-Date``, ``Original-Envelope-Id``)
  and one block of per-recipient fields for each recipient (``Final-Recipient``,
  ``Original-Recipient``, ``Action``, ``Status``, ``Diagnostic-Code``,
  ``Remote-MTA``).  Only recipients whose ``Action`` is ``failed`` are bounces;
  ``delayed``, ``delivered``, ``relayed`` and ``expanded`` are reported as they
  are, so the caller can ignore them.
- **Abuse reports** (ARF, RFC 5965; ``report-type=feedback-report``): the
  machine-readable part ``message/feedback-report`` with ``Feedback-Type``,
  ``User-Agent``, ``Version``, ``Original-Mail-From``, ``Original-Rcpt-To``,
  ``Reported-Domain``, ``Source-IP``, ``Arrival-Date``.

Both usually carry the original message or its headers (``message/rfc822``,
``text/rfc822-headers``, or their RFC 6532 ``global`` forms); from those come
the original ``Message-ID``, ``From``, ``To`` and ``Subject``, and the
``Return-Path`` / the envelope sender a VERP address was built into.

Anything else (a plain-text bounce, a challenge-response, an auto-reply) is
not a report: :func:`parse` returns ``None`` and the caller counts it as
unparsed.  The parser uses the standard library's ``email`` package — this is
not a hot path (reports are a small share of traffic) and it copes with the
malformed MIME real reports contain; every size it reads is bounded.
"""
from __future__ import annotations

import binascii
import email
import email.errors
import email.policy
import quopri
import re
from dataclasses import dataclass, field

from mta.dsn import utf8_addr_decode

__all__ = ["Report", "ReportedRecipient", "parse", "status_code", "MAX_REPORT_SIZE",
           "MAX_RECIPIENTS"]

MAX_REPORT_SIZE = 10 << 20     # octets of a report that are read at all
MAX_RECIPIENTS = 1000          # per-recipient blocks read from one DSN
MAX_FIELD = 2000               # characters kept of one field's value

DSN = "dsn"
ARF = "arf"

_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_ARF_TYPES = ("message/feedback-report",)
_MESSAGE_TYPES = ("message/rfc822", "message/global")
_HEADER_TYPES = ("text/rfc822-headers", "message/global-headers")
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY_CODE = re.compile(r"^\s*([245]\d\d)\b")


@dataclass
class ReportedRecipient:
    """One per-recipient block of a DSN."""
    final_recipient: str = ""       # the address only (type prefix "rfc822;" removed)
    original_recipient: str = ""
    action: str = ""                # failed, delayed, delivered, relayed, expanded (lower case)
    status: str = ""                # the enhanced status code, "5.1.1"
    diagnostic: str = ""            # Diagnostic-Code text (type prefix "smtp;" removed)
    remote_mta: str = ""

    @property
    def failed(self) -> bool:
        return self.action == "failed"


@dataclass
class Report:
    kind: str                                   # DSN or ARF
    recipients: list[ReportedRecipient] = field(default_factory=list)   # DSN
    reporting_mta: str = ""
    envelope_id: str = ""                       # DSN Original-Envelope-Id (our ENVID)
    arrival_date: str = ""
    feedback_type: str = ""                     # ARF: abuse, fraud, virus, other, ...
    user_agent: str = ""
    reported_domain: str = ""
    source_ip: str = ""
    original_mail_from: str = ""                # ARF Original-Mail-From, else Return-Path
    original_rcpt_to: list[str] = field(default_factory=list)   # ARF Original-Rcpt-To
    # From the returned original message (or its headers):
    message_id: str = ""                        # without angle brackets
    subject: str = ""
    header_from: str = ""
    header_to: str = ""
    report_from: str = ""                       # the From of the report itself (report_by)
    report_to: str = ""                         # the address the report was sent to


class _Policy(email.policy.Compat32):
    """compat32 that keeps only MAX_FIELD characters of a header field's value.

    The email package reads a Content-Type's parameters (the boundary of every
    multipart part, as it parses) in time quadratic in the field's length: one
    folded field of thousands of ``;`` cost minutes of a report reader.  No field
    is kept longer than MAX_FIELD anyway (:func:`_clip`).
    """

    def header_source_parse(self, sourcelines):
        name, value = super().header_source_parse(sourcelines)
        return name, value[:MAX_FIELD]


_POLICY = _Policy()


def _clip(value) -> str:
    s = str(value or "").strip()
    return s[:MAX_FIELD]


def _strip_type(value: str) -> str:
    """``rfc822; user@example.com`` -> ``user@example.com``; ``smtp; 550 ...`` -> ``550 ...``."""
    value = _clip(value)
    head, sep, rest = value.partition(";")
    if sep and head.strip() and " " not in head.strip():
        return rest.strip()
    return value


def _recipient(value: str) -> str:
    """A Final- or Original-Recipient's address: ``rfc822; a@b`` -> ``a@b``; a ``utf-8``
    one decoded from utf-8-addr-xtext or -unitext (``j\\x{FC}rgen@b`` -> ``jürgen@b``,
    RFC 6533 3)."""
    value = _clip(value)
    head, sep, rest = value.partition(";")
    if sep and head.strip().lower() == "utf-8":
        return _bare(utf8_addr_decode(rest.strip()))
    return _bare(_strip_type(value))


def _bare(address: str) -> str:
    """``<a@b>`` or ``Name <a@b>`` -> ``a@b``."""
    address = _clip(address)
    if "<" in address and ">" in address:
        address = address[address.index("<") + 1:address.rindex(">")]
    return address.strip()


def _field_groups(payload: str) -> list[dict[str, str]]:
    """RFC 3464 §2.1: groups of header-style fields separated by blank lines.

    Parsed by hand because the groups are not one header block: folded lines
    continue a field, names are case-insensitive, the first occurrence wins.
    """
    groups: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = None
    for line in payload.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            if current:
                groups.append(current)
                current, last = {}, None
            if len(groups) > MAX_RECIPIENTS:
                break
            continue
        if line[:1] in (" ", "\t") and last is not None:
            current[last] = _clip(current[last] + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        if key not in current:
            current[key] = _clip(value)
            last = key
        else:
            last = None
    if current:
        groups.append(current)
    return groups


def _part_text(part) -> str:
    """The text of a machine-readable part, whatever the sender made of it.

    The email package parses ``message/delivery-status`` as a message whose
    payload is a list of header blocks; some senders send it base64 or as
    plain text.  Rebuild the text form in every case.
    """
    payload = part.get_payload()
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if isinstance(payload, list) and cte in ("base64", "quoted-printable"):
        # Parsed as header blocks before decoding: the encoded text is put together
        # again (base64 is the body of one header-less block; quoted-printable keeps
        # the blank lines, and so the fields, of the groups) and decoded here.
        raw = _decode(cte, "\n\n".join(_block_source(b) for b in payload
                                        if isinstance(b, email.message.Message)))
        return raw[:MAX_REPORT_SIZE].decode("utf-8", "replace")
    if isinstance(payload, list):
        blocks = []
        for block in payload[:MAX_RECIPIENTS + 1]:
            if isinstance(block, email.message.Message):
                # (raw_items: items() would turn 8-bit octets into U+FFFD before _utf8)
                blocks.append(_utf8("\n".join(f"{k}: {v}" for k, v in block.raw_items())))
                # message/global-delivery-status (RFC 6533) is parsed as one embedded
                # message: the per-message fields are its header, and the per-recipient
                # blocks its body, which must not be lost
                # (as octets: get_payload() would read them as ASCII, 8-bit ones as U+FFFD)
                rest = None if block.is_multipart() else block.get_payload(decode=True)
                if isinstance(rest, bytes) and rest.strip():
                    blocks.append(rest[:MAX_REPORT_SIZE].decode("utf-8", "replace"))
        return "\n\n".join(blocks)
    raw = part.get_payload(decode=True)
    if isinstance(raw, bytes):
        return raw[:MAX_REPORT_SIZE].decode("utf-8", "replace")
    return str(payload or "")


def _decode(cte: str, encoded: str) -> bytes:
    """*encoded* decoded from base64 or quoted-printable (b"" when it is broken)."""
    try:
        if cte == "base64":
            return binascii.a2b_base64("".join(encoded.split()))
        return quopri.decodestring(encoded.encode("ascii", "replace"))
    except (binascii.Error, ValueError):
        return b""


def _block_source(block) -> str:
    """The text one header block of a part parsed before it was decoded was read from:
    its fields, then its body -- right after them when a line that is no field began it,
    else after the blank line that ended them (a message/* part other than
    message/delivery-status, parsed as one embedded message)."""
    head = "\n".join(f"{k}: {v}" for k, v in block.raw_items())
    body = str(block.get_payload() or "")
    if not head or not body:
        return head or body
    joined = any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect)
                 for d in block.defects)
    return head + ("\n" if joined else "\n\n") + body


def _utf8(text: str) -> str:
    """*text* as parsed from bytes (8-bit octets as surrogates) with its UTF-8 read as such.

    The global types of RFC 6533 carry UTF-8 addresses unencoded."""
    if text.isascii():
        return text
    return text.encode("ascii", "surrogateescape").decode("utf-8", "replace") \
        if all(ord(c) < 128 or 0xDC80 <= ord(c) <= 0xDCFF for c in text) else text


def _header(msg, name: str) -> str:
    """The first *name* field (lower case) of the returned message, its UTF-8 read as such
    (RFC 6532 header fields of message/global, or raw 8-bit ones): ``get()`` would give
    each 8-bit octet as U+FFFD."""
    for key, value in msg.raw_items():
        if key.lower() == name:
            return _utf8(str(value))
    return ""


def _original_headers(part):
    """The returned message's header block as a Message, or None."""
    ctype = part.get_content_type()
    payload = part.get_payload()
    if ctype in _MESSAGE_TYPES + _HEADER_TYPES and isinstance(payload, list) and payload \
            and isinstance(payload[0], email.message.Message):
        cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if cte in ("base64", "quoted-printable"):
            # (message/global and message/global-headers may come encoded, RFC 6532 3.7:
            # parsed as a message before decoding, so read again from the decoded text)
            raw = _decode(cte, _block_source(payload[0]))
            return email.message_from_bytes(raw[:MAX_REPORT_SIZE], policy=_POLICY)
    if ctype in _MESSAGE_TYPES:
        if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
            return payload[0]
        raw = part.get_payload(decode=True)
        if isinstance(raw, bytes):
            return email.message_from_bytes(raw[:MAX_REPORT_SIZE], policy=_POLICY)
        return None
    if ctype in _HEADER_TYPES:
        if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
            return payload[0]      # message/global-headers, parsed as an embedded message
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes):
            raw = str(part.get_payload() or "").encode("utf-8", "replace")
        return email.message_from_bytes(raw[:MAX_REPORT_SIZE], policy=_POLICY)
    return None


def parse(data: bytes) -> Report | None:
    """The report *data* carries, or ``None`` when it is not a DSN or ARF report."""
    if len(data) > MAX_REPORT_SIZE:
        data = data[:MAX_REPORT_SIZE]
    try:
        msg = email.message_from_bytes(data, policy=_POLICY)
    except Exception:       # the email package raises assorted errors on broken MIME
        return None
    if msg.get_content_type() != "multipart/report" or not msg.is_multipart():
        return None
    report_type = (msg.get_param("report-type") or "").lower()
    parts = [p for p in msg.walk() if p is not msg][:64]
    types = [p.get_content_type() for p in parts]
    if report_type == "feedback-report" or any(t in _ARF_TYPES for t in types):
        report = Report(ARF)
    elif report_type in ("delivery-status", "global-delivery-status") or \
            any(t in _DSN_TYPES for t in types):
        report = Report(DSN)
    else:
        return None
    report.report_from = _bare(msg.get("From", ""))
    report.report_to = _bare(msg.get("To", ""))
    original = None
    for part, ctype in zip(parts, types):
        if report.kind == DSN and ctype in _DSN_TYPES:
            _read_dsn(report, _part_text(part))
        elif report.kind == ARF and ctype in _ARF_TYPES:
            _read_arf(report, _part_text(part))
        elif original is None and (ctype in _MESSAGE_TYPES or ctype in _HEADER_TYPES):
            try:
                original = _original_headers(part)
            except Exception:
                original = None
    if original is not None:
        report.message_id = _bare(_header(original, "message-id"))
        report.subject = _clip(_header(original, "subject"))
        report.header_from = _bare(_header(original, "from"))
        report.header_to = _bare(_header(original, "to"))
        if not report.original_mail_from:
            report.original_mail_from = _bare(_header(original, "return-path"))
    if report.kind == DSN and not report.recipients:
        return None     # a delivery-status part with no recipient says nothing usable
    return report


def _read_dsn(report: Report, text: str) -> None:
    groups = _field_groups(text)
    if not groups:
        return
    per_message, blocks = groups[0], groups[1:]
    if "final-recipient" in per_message:    # no per-message block was sent
        per_message, blocks = {}, groups
    report.reporting_mta = _strip_type(per_message.get("reporting-mta", ""))
    report.envelope_id = _clip(per_message.get("original-envelope-id", ""))
    report.arrival_date = _clip(per_message.get("arrival-date", ""))
    for block in blocks[:MAX_RECIPIENTS]:
        if "final-recipient" not in block and "original-recipient" not in block:
            continue
        report.recipients.append(ReportedRecipient(
            final_recipient=_recipient(block.get("final-recipient", "")),
            original_recipient=_recipient(block.get("original-recipient", "")),
            action=_clip(block.get("action", "")).lower().split(" ")[0],
            status=_clip(block.get("status", "")).split(" ")[0],
            diagnostic=_strip_type(block.get("diagnostic-code", "")),
            remote_mta=_strip_type(block.get("remote-mta", ""))))


def _read_arf(report: Report, text: str) -> None:
    groups = _field_groups(text)
    fields: dict[str, str] = {}
    for group in groups:
        for k, v in group.items():
            fields.setdefault(k, v)
    report.feedback_type = fields.get("feedback-type", "").lower().split(" ")[0]
    report.user_agent = fields.get("user-agent", "")
    report.reported_domain = fields.get("reported-domain", "")
    report.source_ip = fields.get("source-ip", "")
    report.arrival_date = fields.get("arrival-date", "") or fields.get("received-date", "")
    report.original_mail_from = _bare(fields.get("original-mail-from", ""))
    # Original-Rcpt-To may repeat (one per recipient); the group parser keeps the
    # first, so read the repeats from the raw text.
    rcpts = re.findall(r"(?im)^original-rcpt-to:\s*(.+)$", text)
    report.original_rcpt_to = [_bare(r) for r in rcpts[:MAX_RECIPIENTS]]


def status_code(recipient: ReportedRecipient) -> tuple[int, str, str]:
    """(reply code, enhanced code, text) for the classifier, from a DSN recipient block.

    The Diagnostic-Code usually is the remote reply (``550 5.1.1 no such user``);
    when it has no reply code, the Status decides: 5.x.x -> 550, 4.x.x -> 450.
    """
    text = recipient.diagnostic
    m = _REPLY_CODE.match(text)
    enhanced = recipient.status if _STATUS.fullmatch(recipient.status or "") else ""
    if not enhanced:
        s = _STATUS.search(text)
        enhanced = s.group(0) if s else ""
    if m:
        code = int(m.group(1))
    elif enhanced:
        code = 550 if enhanced.startswith("5") else 450 if enhanced.startswith("4") else 250
    else:
        code = 550 if recipient.failed else 450
    return code, enhanced, text or recipient.status
