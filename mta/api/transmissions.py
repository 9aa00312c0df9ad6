"""Decode and check a transmission (``POST /api/v1/transmissions``) and ``X-MSYS-API``.

The request body is decoded by msgspec straight into the Structs below, which
declare the subset of SparkPost's fields that senders use.  Unknown fields are
ignored, as SparkPost ignores them; a field of the wrong type is a 422 whose
description names it (``content.subject: Expected `str`, got `int```).
Recipients are decoded leniently (``address.email`` optional in the Struct) so
that one bad recipient is a ``rcpt_to_errors`` entry, not a failed request.

:func:`check` applies the rules that do not depend on the recipient: required
fields, stored templates and lists (not supported), size limits.

Nesting: the free-form values (``metadata``, ``substitution_data``, at the
transmission and at each recipient, and a dict of ``recipients``) may nest
objects and arrays at most ``http.max_json_depth`` levels (the value itself is
level 1); deeper is a 422 naming the field.  They are checked level by level,
without recursion, because everything downstream that walks them (msgspec on
the bus, orjson in the event log, substitution) recurses.  A body nested
deeper than the decoder itself goes (about 1,000 levels, wherever it is) is
a 422 too, never a RecursionError.

``options.start_time`` (:func:`start_at`): SparkPost's ISO 8601 date and time
with a UTC offset (``2026-12-03T10:00:00+00:00``, ``...Z``) or ``now``; at
most MAX_START_AHEAD (3 days) ahead, a time in the past means now.  The
acceptor keeps the string in the params as ``start_time`` (for events) and
the epoch seconds as ``start_at`` (only when it is in the future), which the
spool reads as every recipient's first due time (:mod:`mta.store`).

``X-MSYS-API`` (SMTP parity): :func:`parse_msys_api` takes the header's JSON
and returns the attributes this MTA records — campaign_id, metadata, tags,
options.ip_pool, options.transactional — ignoring anything else (metadata
nested too deep included).
"""
from __future__ import annotations

import datetime
import re
from typing import Any

import msgspec
import orjson
from msgspec import Struct

from mta.api import replies as R

MAX_CAMPAIGN_ID = 64          # octets, SparkPost's limit
MAX_DESCRIPTION = 1024        # octets
MAX_METADATA = 10 * 1024      # octets of JSON, transmission or recipient
MAX_SUBSTITUTION_DATA = 100 * 1024
MAX_TAGS = 10                 # per recipient
MAX_START_AHEAD = 3 * 86400   # seconds: options.start_time at most 3 days ahead (SparkPost)


class Address(Struct):
    email: str | None = None
    name: str | None = None
    header_to: str | None = None


class Recipient(Struct):
    address: str | Address | None = None
    return_path: str | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    substitution_data: dict[str, Any] | None = None


class Attachment(Struct):
    name: str | None = None
    type: str | None = None
    data: str | None = None


class Content(Struct):
    from_: str | Address | None = msgspec.field(default=None, name="from")
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    amp_html: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] | None = None
    attachments: list[Attachment] | None = None
    inline_images: list[Attachment] | None = None
    email_rfc822: str | None = None
    template_id: str | None = None
    ab_test_id: str | None = None


class Options(Struct):
    start_time: str | None = None
    transactional: bool | None = None
    sandbox: bool | None = None
    skip_suppression: bool | None = None
    ip_pool: str | None = None
    perform_substitutions: bool | None = None


class Transmission(Struct):
    recipients: list[str | Recipient] | dict[str, Any] | None = None
    content: Content | None = None
    substitution_data: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    campaign_id: str | None = None
    description: str | None = None
    return_path: str | None = None
    options: Options | None = None


_decoder = msgspec.json.Decoder(Transmission)


def _where(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.a.b`" as "a.b: Expected `str`, got `int`"."""
    text, sep, path = str(exc).rpartition(" - at `$")
    if not sep:
        return f"body: {exc}"
    path = path.rstrip("`").lstrip(".")
    return f"{path or 'body'}: {text}"


def _why(exc: msgspec.DecodeError) -> str:
    """What is wrong with a body that is not JSON, in the decoder's words ("JSON is
    malformed: trailing comma in object (byte 7)", "Input data was truncated")."""
    text = str(exc)
    if "UTF-8" in text:
        # JSON is UTF-8 (RFC 8259 8.1), whatever charset the Content-Type names
        return "the body is not valid UTF-8 (JSON text is UTF-8)"
    return text[:200]


def decode(body: bytes) -> Transmission:
    """Decode a request body; ApiError 400 (not JSON) or 422 (a field of the wrong type).

    msgspec decodes (and skips unknown fields) recursively, up to Python's
    recursion limit: a deeper body is refused here as too deep (422).
    """
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise R.ApiError(R.INVALID, _where(exc)) from None
    except msgspec.DecodeError as exc:
        raise R.ApiError(R.BAD_JSON, "Problems parsing request as json: " + _why(exc)) \
            from None
    except RecursionError:
        raise R.ApiError(R.INVALID, "body: JSON objects and arrays nested too deep "
                         "(see http.max_json_depth)") from None


def too_deep(value, max_depth: int) -> bool:
    """Whether *value* nests dicts and lists more than *max_depth* levels (itself is 1).

    Level by level, not recursively: a value nested deeper than Python's
    recursion limit is answered, not raised.  Cost: one type test per member
    of a dict or list (a flat metadata object of ten keys: about 1 us).
    """
    if type(value) is dict and max_depth >= 1:
        # (the common case, a flat object: one pass over its values, no lists made)
        for x in value.values():
            t = type(x)
            if t is dict or t is list:
                break
        else:
            return False
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            return True
        inner = []
        for v in level:
            for x in (v.values() if type(v) is dict else v):
                t = type(x)
                if t is dict or t is list:
                    inner.append(x)
        level = inner
    return False


def _nested_too_deep(field: str, max_depth: int) -> R.ApiError:
    return R.ApiError(R.INVALID, f"{field}: JSON objects and arrays nested more than "
                      f"{max_depth} levels deep (http.max_json_depth)")


def json_len(value) -> int | None:
    """Octets of *value* as JSON; None when it holds an integer beyond 64 bits, which
    JSON decodes but nothing downstream carries (msgpack on the bus, orjson in the event
    log)."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return None


def json_size(field: str, value) -> int:
    """:func:`json_len`, or ApiError 422 naming *field* when it has no size."""
    n = json_len(value)
    if n is None:
        raise R.ApiError(R.INVALID, f"{field}: a number is outside the 64-bit integer range")
    return n


def check(tx: Transmission, max_recipients: int, max_depth: int) -> None:
    """The rules every transmission must pass; ApiError 422 naming the field.

    *max_depth* (``http.max_json_depth``) bounds the nesting of the free-form values.
    """
    rcpts = tx.recipients
    if rcpts is None:
        raise R.ApiError(R.REQUIRED, "recipients is required")
    # First, before anything serialises these values (the size checks below).
    if tx.metadata and too_deep(tx.metadata, max_depth):
        raise _nested_too_deep("metadata", max_depth)
    if tx.substitution_data and too_deep(tx.substitution_data, max_depth):
        raise _nested_too_deep("substitution_data", max_depth)
    if type(rcpts) is dict:
        if rcpts and too_deep(rcpts, max_depth):
            raise _nested_too_deep("recipients", max_depth)
        if "list_id" in rcpts:
            raise R.ApiError(R.NOT_SUPPORTED,
                             "recipients.list_id: stored recipient lists are not supported")
        raise R.ApiError(R.INVALID, "recipients: expected an array of recipients")
    for i, r in enumerate(rcpts):
        if type(r) is Recipient:
            if r.metadata and too_deep(r.metadata, max_depth):
                raise _nested_too_deep(f"recipients[{i}].metadata", max_depth)
            if r.substitution_data and too_deep(r.substitution_data, max_depth):
                raise _nested_too_deep(f"recipients[{i}].substitution_data", max_depth)
    if not rcpts:
        raise R.ApiError(R.REQUIRED, "recipients: at least one recipient is required")
    if len(rcpts) > max_recipients:
        raise R.ApiError(R.INVALID, f"recipients: {len(rcpts)} recipients; at most "
                         f"{max_recipients} in one transmission (http.max_recipients)")
    c = tx.content
    if c is None:
        raise R.ApiError(R.REQUIRED, "content is required")
    if c.template_id is not None:
        raise R.ApiError(R.NOT_SUPPORTED,
                         "content.template_id: stored templates are not supported")
    if c.ab_test_id is not None:
        raise R.ApiError(R.NOT_SUPPORTED, "content.ab_test_id: A/B tests are not supported")
    if c.email_rfc822 is None:
        if c.from_ is None:
            raise R.ApiError(R.REQUIRED, "content.from is required")
        if isinstance(c.from_, Address) and not c.from_.email:
            raise R.ApiError(R.REQUIRED, "content.from.email is required")
        if c.subject is None:
            raise R.ApiError(R.REQUIRED, "content.subject is required")
        if c.text is None and c.html is None:
            raise R.ApiError(R.REQUIRED, "content.html or content.text is required")
        if c.inline_images and c.html is None:
            # (shown by <img src="cid:NAME"> in the HTML part: without one, every
            # message would go out without them)
            raise R.ApiError(R.INVALID, "content.inline_images: inline images need "
                             "content.html, whose <img src=\"cid:NAME\"> shows them")
        if c.attachments or c.inline_images:
            for field, items in (("attachments", c.attachments),
                                 ("inline_images", c.inline_images)):
                for i, a in enumerate(items or ()):
                    for attr in ("name", "type", "data"):
                        if getattr(a, attr) is None:
                            raise R.ApiError(R.REQUIRED,
                                             f"content.{field}[{i}].{attr} is required")
    elif not c.email_rfc822.strip():
        raise R.ApiError(R.REQUIRED, "content.email_rfc822 is empty")
    if tx.campaign_id is not None and len(tx.campaign_id.encode()) > MAX_CAMPAIGN_ID:
        raise R.ApiError(R.INVALID, f"campaign_id: longer than {MAX_CAMPAIGN_ID} bytes")
    if tx.description is not None and len(tx.description.encode()) > MAX_DESCRIPTION:
        raise R.ApiError(R.INVALID, f"description: longer than {MAX_DESCRIPTION} bytes")
    if tx.metadata and json_size("metadata", tx.metadata) > MAX_METADATA:
        raise R.ApiError(R.INVALID, f"metadata: larger than {MAX_METADATA} bytes")
    if tx.substitution_data and \
            json_size("substitution_data", tx.substitution_data) > MAX_SUBSTITUTION_DATA:
        raise R.ApiError(R.INVALID,
                         f"substitution_data: larger than {MAX_SUBSTITUTION_DATA} bytes")


# YYYY-MM-DDTHH:MM[:SS[.fff]] followed by Z or +-HH:MM (a time zone is required:
# without one the instant is ambiguous).
_START_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?"
                         r"([Zz]|[+-]\d{2}:?\d{2})\Z")


def start_at(text: str, now: float) -> float | None:
    """``options.start_time`` as epoch seconds, or None when it is now or past.

    ApiError 422 naming ``options.start_time`` when it is malformed (not an
    ISO 8601 date and time with a UTC offset, nor "now") or more than
    MAX_START_AHEAD seconds after *now*.
    """
    if text.strip().lower() == "now":
        return None
    if len(text) > 64 or not _START_TIME.match(text):
        raise R.ApiError(R.INVALID, f"options.start_time: {text[:64]!r} is not a date and time "
                         "in ISO 8601 format with a UTC offset, such as "
                         "2026-12-03T10:00:00+00:00, or \"now\"")
    value = text[:-1] + "+00:00" if text[-1] in "Zz" else text
    try:
        at = datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise R.ApiError(R.INVALID, f"options.start_time: {text!r} is not a valid date and "
                         "time") from None
    if at > now + MAX_START_AHEAD:
        raise R.ApiError(R.INVALID, f"options.start_time: {text!r} is more than "
                         f"{MAX_START_AHEAD // 86400} days ahead")
    return at if at > now else None


def parse_msys_api(value: bytes, max_depth: int) -> dict | None:
    """The attributes recorded from an ``X-MSYS-API`` header; None when it is not a JSON object.

    Keeps ``campaign_id`` (string), ``metadata`` (object, nested at most
    *max_depth* levels, at most MAX_METADATA octets), ``tags``
    (strings), ``options.ip_pool`` (string), ``options.transactional``
    (boolean) and ``options.skip_suppression`` (kept when true); a member of
    another type is dropped.  Everything else in the
    header (tracking options, cc/bcc, archive) is ignored.
    """
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:      # orjson refuses more than 1024 levels itself
        return None
    if not isinstance(obj, dict):
        return None
    out: dict = {}
    cid = obj.get("campaign_id")
    if isinstance(cid, str) and len(cid.encode()) <= MAX_CAMPAIGN_ID:
        out["campaign_id"] = cid
    meta = obj.get("metadata")
    if isinstance(meta, dict) and meta and not too_deep(meta, max_depth) and \
            (json_len(meta) or MAX_METADATA + 1) <= MAX_METADATA:
        out["metadata"] = meta    # (a number beyond 64 bits: ignored, like one too deep)
    tags = obj.get("tags")
    if isinstance(tags, list):
        tags = [t for t in tags if isinstance(t, str)][:MAX_TAGS]
        if tags:
            out["tags"] = tags
    opts = obj.get("options")
    if isinstance(opts, dict):
        pool = opts.get("ip_pool")
        if isinstance(pool, str) and pool:
            out["ip_pool"] = pool
        tr = opts.get("transactional")
        if isinstance(tr, bool):
            out["transactional"] = tr
        skip = opts.get("skip_suppression")
        if skip is True:
            out["skip_suppression"] = True
    return out
