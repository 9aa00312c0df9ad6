"""SparkPost's message-event shape, made from the spool's internal events (a pure function).

:func:`sparkpost_event` turns one internal event (:mod:`mta.obs.events`, one
recipient) into the flat object SparkPost puts under ``msys.message_event`` of a
webhook batch and in ``results[]`` of the events API.  Conventions followed
(``sparkpost-feedback.md`` sections 0 and 2): scalars as JSON *strings*
(``bounce_class``, ``error_code``, ``num_retries``, ``queue_time``,
``msg_size``, ``transactional``, ``event_id``), ``timestamp`` in Unix seconds
as a string, ``injection_time`` in ISO-8601 UTC, ``rcpt_to`` lower-cased and
``raw_rcpt_to`` as received.

Types: the spool's ``injection``, ``delivery``, ``delay`` and ``bounce`` keep
their names (they are SparkPost's).  An **expiry** (the message waited longer
than ``delivery.max_age``) is a ``bounce`` of class **24** (Timeout, "message
timed out"): it is the table's class for a message that ran out of time, and
what the shipped bounce rules give a receiver's own 4.4.7 / 5.4.7 "delivery
time expired"; the transient class of the last reply (often 70) would tell a
consumer the message is still being tried, and 24 is a *soft* class, so
consumers that suppress only hard and admin bounces keep the address.  Its
reason names the expiry: ``554 5.4.7 [internal] message expired: ...`` with the
last reply, when there was one, after it.  A **suppressed** recipient gets an
``injection`` and a class-25 ``bounce`` (SparkPost's current behaviour, as the
suppression code does).

Refusals at injection (made by an acceptor, :data:`mta.obs.events.REFUSAL_TYPES`)
have only the fields SparkPost lists for their type (``sparkpost-feedback.md``
section 2): a ``policy_rejection`` (an SMTP refusal by this node's policy:
``suppression.smtp_action = "refuse"``, an unknown ``ip_pool`` in X-MSYS-API)
has no ``msg_size``, ``subject`` or ``routing_domain``, and has
``remote_addr`` (the client) with ``bounce_class`` 25 and the reply given as
``raw_reason``; a ``generation_failure`` / ``generation_rejection`` (an HTTP
recipient whose message could not be rendered / was refused while rendered)
has no ``message_id``, ``injection_time``, ``msg_from`` or ``msg_size`` (no
message was made), has ``rcpt_subs``, and the rejection also ``subject`` and
``bounce_class`` 25.

Reports: an ``out_of_band`` or ``spam_complaint`` (a DSN or ARF report sent
to a bounce domain) is shaped by the acceptor that read it
(:mod:`mta.feedback.oob`, repeating the original message's fields); here it
only gets its ``event_id`` and its ``reason`` made from ``raw_reason`` as
every other event's is.

Ids: ``message_id`` is the spool's queue id in lower case (20 hex digits, the
format of SparkPost's own message ids); ``transmission_id`` is the HTTP API's
transmission id, and for a message injected over SMTP its queue id as a
decimal number (SparkPost's are numeric strings).  The
``Message-ID`` header is ``message_id_header``.

Our own fields, named so that they clash with none of SparkPost's:
``queue_id``, ``bounce_rule`` (the rule that decided ``bounce_class``;
``expired`` for an expiry, whose last reply's class and rule are
``last_bounce_class`` / ``last_bounce_rule``; an expiry found at dispatch quotes
the last deferral the spool process saw, and none after a restart),
``response_rule`` with ``_action``, ``_scope`` and ``_until`` (the response rule a
receiver's reply matched, mta/delivery/adaptive.py),
``egress_source``, ``site``, ``remote_host``, ``event_time`` (the timestamp
with milliseconds, a string), ``message_id_header``, ``next_attempt`` (delay: Unix
seconds of the next try with milliseconds, a string), ``suppressed`` (``"1"``), ``client``.

A ``delivery`` also carries ``error_code`` and ``raw_reason`` (the receiver's
2xx reply; SparkPost lists them for delays and bounces only; anymail reads
``raw_reason`` as the MTA's response).

``friendly_from`` (the address of the From header, as written) and
``subject`` (the Subject header, RFC 2047 words decoded, at most
``mta.obs.events.MAX_SUBJECT`` characters) are read once at injection and
carried in the message's params; a message without them has no such field.

``outbound_tls`` (``delivery`` and ``delay``, the types SparkPost gives it):
``"1"`` the receiver's session was encrypted (STARTTLS), ``"0"`` it was not
(STARTTLS not offered, or turned off for the route), ``"-1"`` STARTTLS was
offered but refused or its handshake failed; absent when no SMTP session was
reached (a connection or DNS failure).

Not carried: the template, subaccount and tracking fields (no such features).
"""
from __future__ import annotations

import itertools
import re

from mta import native

SPARKPOST_TYPES = ("injection", "delivery", "delay", "bounce", "policy_rejection",
                   "out_of_band", "spam_complaint")
REPORT_KINDS = ("out_of_band", "spam_complaint")   # mta.obs.events.REPORT_TYPES, pre-shaped
# mta.obs.events.REFUSAL_TYPES -> the fields of the common set SparkPost leaves out
REFUSAL_KINDS = {
    "policy_rejection": ("msg_size", "subject", "routing_domain"),
    "generation_failure": ("message_id", "injection_time", "msg_from", "msg_size", "subject",
                           "queue_id", "message_id_header"),
    "generation_rejection": ("message_id", "injection_time", "msg_from", "msg_size",
                             "queue_id", "message_id_header"),
}
EXPIRY_CLASS = "24"
EXPIRY_CODE = "554"
EXPIRY_TEXT = "5.4.7 [internal] message expired: too long in the queue"
EXPIRY_RULE = "expired"    # bounce_rule of an expiry (the last reply's: last_bounce_rule)
MAX_REASON = 200          # characters of ``reason`` before the rest is elided with "..."

_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:@]+@[A-Za-z0-9.-]+")


_kernel = native.load("evkernel")
# iso(ts): ISO-8601 UTC with milliseconds, as SparkPost writes ``injection_time`` (typed; the
# date and time of the last second kept: most events are within the same second as the one
# before)
iso = _kernel.iso
_common = _kernel.shape_common
_attempt_fields = _kernel.attempt_fields
_entries = _kernel.shape_entries
_reply = _kernel.reply        # (code, "code enhanced text") of an internal event's response


def canonical_reason(raw: str) -> str:
    """``reason``: the reply with IPv4 addresses as a.b.c.d, mail addresses as ...@..., and
    text beyond MAX_REASON characters elided (SparkPost's observed canonicalisation)."""
    text = _ADDRESS.sub("...@...", _IPV4.sub("a.b.c.d", raw))
    if len(text) > MAX_REASON:
        text = text[:MAX_REASON - 3] + "..."
    return text


def event_id(shard: int, segment: int, offset: int, index: int) -> str:
    """The id of the *index*-th event of the REC_EVENTS record at (*segment*, *offset*).

    A decimal integer string, unique per durable record position and the
    same each time the record is read again (at-least-once readers dedupe by
    it): offsets are below 2**32 (segments end before spool.segment_size <=
    4 GiB), at most 2**32 events per record and 256 shards.
    """
    return str((((segment << 32 | offset) << 32 | index) << 8) | shard)


def event_ids(shard: int, segment: int, offset: int):
    """:func:`event_id` of the events of one record, index 0, 1, 2, ... (an iterator)."""
    base = (segment << 32 | offset) << 40 | shard
    return map(str, itertools.count(base, 1 << 8))


def sparkpost_entries(entries, ids) -> list[dict]:
    """The flat SparkPost events of a record's entries, in order, their ids from *ids*
    (:func:`event_ids`): each entry's one, or an injection's one per recipient of its
    ``rcpts`` -- :func:`sparkpost_event` of each, an injection and a delivery shaped in
    one typed loop (mta._pure.evkernel.shape_entries: the per-recipient rule is there
    only)."""
    return _entries(entries, ids, sparkpost_event)


def sparkpost_events(internal: dict, ids) -> list[dict]:
    """:func:`sparkpost_entries` of one record entry (the events process's own path)."""
    return _entries((internal,), ids, sparkpost_event)


def _refusal(out: dict, internal: dict, kind: str) -> dict:
    """A refusal at injection: the common fields its type has, and the refusal's own."""
    for k in REFUSAL_KINDS[kind]:
        out.pop(k, None)
    code, raw = _reply(internal)
    out["error_code"] = str(code) if code else ""
    out["raw_reason"] = raw
    out["reason"] = canonical_reason(raw)
    if kind != "generation_failure":
        out["bounce_class"] = str(internal.get("bounce_class") or "25")
    if kind == "policy_rejection":
        if internal.get("remote_addr"):
            out["remote_addr"] = internal["remote_addr"]
    else:
        out["rcpt_subs"] = internal.get("rcpt_subs") or {}
    return out


def sparkpost_event(internal: dict, *, event_id: str, recipient: str | None = None) -> dict:
    """The flat SparkPost message event for one internal event of one recipient.

    *recipient*: the one of an injection's ``rcpts`` (:func:`sparkpost_events`);
    None: the event's own ``recipient``.
    """
    kind = internal.get("type", "")
    if kind in REPORT_KINDS:
        # made by the acceptor that read the report (mta.feedback.oob.report_events)
        out = dict(internal.get("event") or {})
        out["type"] = kind
        out["event_id"] = event_id
        out.setdefault("timestamp", str(int(float(internal.get("timestamp") or 0.0))))
        if out.get("raw_reason"):
            # (canonicalised as every other event's: a DSN quotes addresses and IPs)
            out["reason"] = canonical_reason(out["raw_reason"])
        return out
    # (the fields every type has, typed: mta._pure.evkernel.shape_common is their spec)
    out, ts, arrival = _common(internal, kind, event_id, recipient)
    if kind == "injection":
        return out
    if kind in REFUSAL_KINDS:
        return _refusal(out, internal, kind)
    # (typed: mta._pure.evkernel.attempt_fields is the spec; a delivery is then complete)
    attempt, code, raw = _attempt_fields(out, internal, kind, ts, arrival)
    if kind == "delivery":
        return out
    if kind == "expiration":
        out["type"] = "bounce"
        out["bounce_class"] = EXPIRY_CLASS
        out["error_code"] = EXPIRY_CODE
        raw = f"{EXPIRY_CODE} {EXPIRY_TEXT}" + (
            f" ({attempt} attempt(s); last reply: {raw})" if raw else "")
        out["bounce_rule"] = EXPIRY_RULE
        if code and internal.get("bounce_class"):     # how the last reply was classified
            out["last_bounce_class"] = str(internal["bounce_class"])
            out["last_bounce_rule"] = internal.get("bounce_rule", "")
    else:
        out["bounce_class"] = str(internal.get("bounce_class") or "1")
        out["error_code"] = str(code) if code else ""
        if internal.get("bounce_rule"):
            out["bounce_rule"] = internal["bounce_rule"]
    out["raw_reason"] = raw
    out["reason"] = canonical_reason(raw)
    if kind == "delay" and internal.get("next_attempt"):
        out["next_attempt"] = "%.3f" % internal["next_attempt"]
    return out
