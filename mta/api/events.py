"""SparkPost's Events API (``GET /api/v1/events/message``) over :mod:`mta.feedback.events_store`.

No sockets: :func:`handle` takes the request's method, path and query and
returns (status, JSON body) or raises :class:`~mta.api.replies.ApiError`; the
HTTP server (:mod:`mta.acceptor.http`) routes here and authorizes the caller
as for transmissions.

- ``GET /api/v1/events/message?from&to&events&recipients&...&delimiter&
  per_page&cursor``: flat message events, newest first, with an ISO-8601
  ``timestamp`` (``2016-04-18T14:25:07.000+00:00``); ``total_count``; the
  ``links.next`` address repeats the query's parameters with the cursor of
  the next page (``links`` is ``{}`` on the last page).  ``from`` (inclusive)
  defaults to 24 hours ago, ``to`` (exclusive) to one minute ago, as
  SparkPost's.  Filters are comma-separated lists (or ``delimiter``); those
  marked keyword in :data:`mta.feedback.events_store.FILTERS` match whole tokens.
- ``GET /api/v1/events/message/documentation``: per event type, its fields
  with a description and a sample value.
- ``GET /api/v1/events/message/samples?events=``: one sample event per type.

Bad parameters are a 400 naming the parameter (a date that does not parse,
``per_page`` outside 1-10000, an unknown event type or parameter, a cursor
not from a links entry, a URI over 4096 characters).
"""
from __future__ import annotations

import datetime
import re
import time
import urllib.parse

import orjson

from mta.api import replies as R
from mta.feedback import events_store as S

PATH = b"/api/v1/events/message"
MAX_URI = 4096
MAX_PER_PAGE = 10_000
DEFAULT_PER_PAGE = 1000
DEFAULT_SPAN = 86400.0     # from: 24 hours before now
TO_LAG = 60.0              # to: one minute before now

BAD_PARAM = R.Error(400, "invalid params", "1200")
BAD_METHOD = R.Error(405, "invalid HTTP method", "1102")

_OFFSET = re.compile(r"[0-9]{2}(:?[0-9]{2})?")
PARAMS = frozenset(("from", "to", "cursor", "per_page", "delimiter")) | frozenset(S.FILTERS)

# ------------------------------------------------------------ the data table
# field -> (description, sample value); then which fields each type carries.
FIELDS = {
    "type": ("Type of the event", "delivery"),
    "event_id": ("Unique identifier of this event", "92356927693813856"),
    "timestamp": ("When the event happened (ISO-8601, UTC)", "2016-04-18T14:25:07.000+00:00"),
    "message_id": ("Identifier of the message the event belongs to", "000443ee14578172be22"),
    "transmission_id": ("Identifier of the transmission (request) the message came in",
                        "65832150921904138"),
    "campaign_id": ("Campaign the sender gave the message", "spring-sale"),
    "template_id": ("Template the message was built from", "templ-1234"),
    "template_version": ("Version of that template", "0"),
    "customer_id": ("Account the message belongs to", "1"),
    "subaccount_id": ("Subaccount the message belongs to", "0"),
    "rcpt_to": ("Recipient address, lower-cased", "recipient@example.com"),
    "raw_rcpt_to": ("Recipient address as given", "Recipient@example.com"),
    "recipient_domain": ("Domain of the recipient address", "example.com"),
    "routing_domain": ("Domain the message was routed to", "example.com"),
    "rcpt_meta": ("Metadata of the transmission and the recipient, merged",
                  {"customKey": "customValue"}),
    "rcpt_tags": ("Tags of the recipient", ["male", "US"]),
    "friendly_from": ("Address in the From header", "sender@example.org"),
    "msg_from": ("Envelope sender (return path)", "bounces@example.org"),
    "subject": ("Subject header of the message", "Summer deals are here!"),
    "msg_size": ("Size of the message in octets", "1337"),
    "ip_pool": ("IP pool the message was sent from", "default"),
    "sending_ip": ("Address the message left from", "127.0.0.1"),
    "ip_address": ("Address of the receiving mail server", "127.0.0.2"),
    "injection_time": ("When the message was accepted", "2016-04-18T14:25:07.000Z"),
    "scheduled_time": ("Unix time the message was scheduled for (options.start_time); "
                       "only on a scheduled message's events", "1460989507"),
    "queue_time": ("Milliseconds from injection to this attempt", "12"),
    "num_retries": ("Failed attempts before this one", "0"),
    "delv_method": ("How the message was delivered", "esmtp"),
    "recv_method": ("How the message was received (rest or esmtp)", "rest"),
    "transactional": ("\"1\" when the message was sent as transactional", "1"),
    "bounce_class": ("Classification of the failure (see the bounce classes)", "10"),
    "error_code": ("SMTP reply code of the failure", "550"),
    "raw_reason": ("The receiver's reply, verbatim",
                   "550 5.1.1 <recipient@example.com>: Recipient address rejected"),
    "reason": ("The receiver's reply, canonicalised",
               "550 5.1.1 <...@...>: Recipient address rejected"),
    "fbtype": ("Feedback type of the complaint report", "abuse"),
    "report_by": ("Who sent the complaint report", "server.emailprovider.com"),
    "report_to": ("Where the complaint report was sent", "abuse.example.com"),
    "remote_addr": ("Address of the client that injected the message", "127.0.0.1"),
}
_COMMON = ("type", "event_id", "timestamp", "transmission_id", "campaign_id", "template_id",
           "template_version", "customer_id", "subaccount_id", "rcpt_to", "raw_rcpt_to",
           "recipient_domain", "rcpt_meta", "rcpt_tags", "friendly_from", "ip_pool",
           "sending_ip", "transactional")
_MSG = ("message_id", "injection_time", "msg_from", "msg_size", "subject", "routing_domain",
        "scheduled_time", "recv_method")
_ATTEMPT = ("delv_method", "ip_address", "num_retries", "queue_time")
_FAILURE = ("bounce_class", "error_code", "raw_reason", "reason")
TYPES = {
    "injection": _COMMON + _MSG,
    "delivery": _COMMON + _MSG + _ATTEMPT,
    "delay": _COMMON + _MSG + _ATTEMPT + _FAILURE,
    "bounce": _COMMON + _MSG + _ATTEMPT + _FAILURE,
    "out_of_band": _COMMON + _MSG + _ATTEMPT + _FAILURE,
    "spam_complaint": _COMMON + _MSG + ("fbtype", "report_by", "report_to"),
    "policy_rejection": _COMMON + ("message_id", "injection_time", "msg_from", "recv_method",
                                   "remote_addr") + _FAILURE,
    "generation_failure": _COMMON + ("routing_domain", "scheduled_time", "recv_method",
                                     "error_code", "raw_reason", "reason"),
    "generation_rejection": _COMMON + ("routing_domain", "scheduled_time", "recv_method",
                                       "subject") + _FAILURE,
}
# Types a filter may name: the message events above and SparkPost's others.
EVENT_TYPES = frozenset(TYPES) | frozenset((
    "list_unsubscribe", "link_unsubscribe", "open", "initial_open", "click", "amp_open",
    "amp_initial_open", "amp_click", "relay_injection", "relay_rejection", "relay_delivery",
    "relay_tempfail", "relay_permfail", "sms_status"))
_SAMPLE_OVERRIDES = {
    "injection": {},
    "delivery": {},
    "delay": {"bounce_class": "22", "error_code": "452",
              "raw_reason": "452 4.2.2 The email account that you tried to reach is over quota",
              "reason": "452 4.2.2 The email account that you tried to reach is over quota"},
    "bounce": {},
    "out_of_band": {"bounce_class": "10"},
    "spam_complaint": {},
    "policy_rejection": {"bounce_class": "25", "error_code": "554",
                         "raw_reason": "554 5.7.1 recipient address was suppressed due to "
                                       "customer policy",
                         "reason": "554 5.7.1 recipient address was suppressed due to "
                                   "customer policy"},
    "generation_failure": {"error_code": "554",
                           "raw_reason": "554 5.3.3 [internal] Error while rendering part html",
                           "reason": "554 5.3.3 [internal] Error while rendering part html"},
    "generation_rejection": {"bounce_class": "25"},
}


def documentation() -> dict:
    return {t: {f: {"description": FIELDS[f][0], "sampleValue": FIELDS[f][1]} for f in fields}
            for t, fields in TYPES.items()}


def sample(etype: str) -> dict:
    ev = {f: FIELDS[f][1] for f in TYPES[etype]}
    ev.update(_SAMPLE_OVERRIDES.get(etype, {}))
    ev["type"] = etype
    return ev


# ------------------------------------------------------------------- routing

def matches(path: bytes) -> bool:
    return path == PATH or path.startswith(PATH + b"/")


def handle(store: S.EventStore | None, method: bytes, url: bytes,
           max_scan: int = S.MAX_SCAN, now: float | None = None) -> tuple[int, bytes]:
    """Answer one request under PATH: (status, JSON body) or ApiError.

    *store* None: the store is not there yet (nothing was recorded): empty results.
    """
    if len(url) > MAX_URI:
        raise R.ApiError(BAD_PARAM, f"uri: the request URI is {len(url)} characters long; "
                         f"at most {MAX_URI}")
    path, _, query = url.partition(b"?")
    rest = path[len(PATH):].strip(b"/")
    if method != b"GET":
        raise R.ApiError(BAD_METHOD, f"{method.decode('latin-1')} is not allowed on "
                         f"{path[:200].decode('latin-1')}; use GET", allow="GET")
    pairs = _pairs(query)
    if rest == b"documentation":
        return 200, orjson.dumps({"results": documentation()})
    if rest == b"samples":
        q = _lists(pairs, ("events",))
        wanted = _types(q.get("events")) or list(TYPES)
        return 200, orjson.dumps({"results": [sample(t) for t in wanted if t in TYPES]})
    if rest:
        raise R.ApiError(R.NOT_FOUND, "no such resource: " + path[:200].decode("latin-1"))
    return search(store, pairs, max_scan, time.time() if now is None else now)


def _pairs(query: bytes) -> list[tuple[str, str]]:
    try:
        text = query.decode("utf-8")
    except UnicodeDecodeError:
        raise R.ApiError(BAD_PARAM, "query: not UTF-8") from None
    return urllib.parse.parse_qsl(text, keep_blank_values=True)


def _lists(pairs, names=None) -> dict[str, list[str]]:
    """Parameters by name (lists split on the delimiter); 400 for an unknown parameter.

    A filter given more than once (``events=a&events=b``, node's
    ``events[0]=a``) adds to its list; other parameters keep their last value.
    """
    raw: dict[str, list[str]] = {}
    for k, v in pairs:
        name = k.split("[", 1)[0]
        if name not in PARAMS or (names is not None and name not in names):
            raise R.ApiError(BAD_PARAM, f"{name[:64]}: not a parameter of this call")
        raw.setdefault(name, []).append(v)
    delim = (raw.pop("delimiter", None) or [","])[-1] or ","
    if len(delim) > 8:
        raise R.ApiError(BAD_PARAM, "delimiter: at most 8 characters")
    out: dict[str, list[str]] = {}
    for name, vals in raw.items():
        if name in S.FILTERS:
            parts = [p.strip() for v in vals for p in v.split(delim)]
            parts = [p for p in parts if p]
            if parts:
                out[name] = parts
        else:
            out[name] = [vals[-1]]
    return out


def _types(values) -> list[str]:
    for t in values or ():
        if t not in EVENT_TYPES:
            raise R.ApiError(BAD_PARAM, f"events: {t[:64]!r} is not an event type; expected "
                             "one of " + ", ".join(sorted(EVENT_TYPES)))
    return list(values or ())


def _date(q: dict, name: str) -> float | None:
    v = q.get(name)
    if not v or not v[0]:
        return None
    text = v[0].strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # a "+" of an offset sent unencoded arrives as a space (+00:00, +0000, +00)
    head, space, tail = text.rpartition(" ")
    if space and _OFFSET.fullmatch(tail) and ("T" in head or ":" in head):
        text = head + "+" + tail
    try:
        if len(text) > 40:
            raise ValueError
        d = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise R.ApiError(BAD_PARAM, f"{name}: {v[0][:64]!r} is not a valid date; expected "
                         "YYYY-MM-DDTHH:MM:SSZ (UTC)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=datetime.timezone.utc)
    ts = d.timestamp()
    if ts < 0:      # (the store's times are unsigned: no event is older)
        raise R.ApiError(BAD_PARAM, f"{name}: {v[0][:64]!r} is before 1970-01-01T00:00:00Z")
    return ts


def search(store: S.EventStore | None, pairs, max_scan: int, now: float) -> tuple[int, bytes]:
    q = _lists(pairs)
    start = _date(q, "from")
    end = _date(q, "to")
    pin = []            # defaults, written into links.next so that paging is stable
    if end is None:
        end = float(int(now - TO_LAG))
        pin.append(("to", _iso_param(end)))
    if start is None:
        start = float(int(now - DEFAULT_SPAN))
        pin.append(("from", _iso_param(start)))
    if start >= end:
        # (one of them given: name that one, and say what the other is by default)
        if pin and pin[0][0] == "from":
            raise R.ApiError(BAD_PARAM, "to: must be later than from (by default 24 hours "
                             f"before now: {pin[0][1]})")
        if pin:
            raise R.ApiError(BAD_PARAM, "from: must be earlier than to (by default one "
                             f"minute before now: {pin[0][1]})")
        raise R.ApiError(BAD_PARAM, "from: must be earlier than to")
    per_page = DEFAULT_PER_PAGE
    if "per_page" in q:
        v = q["per_page"][0].strip()
        # (ASCII digits only: str.isdigit() also takes '²', which int() refuses)
        if not (v.isascii() and v.isdigit() and len(v) <= 9) or \
                not 1 <= int(v) <= MAX_PER_PAGE:
            raise R.ApiError(BAD_PARAM, f"per_page: {v[:32]!r}; expected a whole number from 1 "
                             f"to {MAX_PER_PAGE}")
        per_page = int(v)
    cursor = q.get("cursor", ["initial"])[0] or "initial"
    filters = {k: v for k, v in q.items() if k in S.FILTERS}
    _types(filters.get("events"))
    if "ab_test_versions" in filters and "ab_tests" not in filters:
        raise R.ApiError(BAD_PARAM, "ab_test_versions: requires ab_tests")
    if cursor != "initial":
        try:
            S.decode_cursor(cursor)
        except S.BadCursor:
            raise R.ApiError(BAD_PARAM, "cursor: not a cursor from a links.next address") \
                from None
    if store is None:
        return 200, orjson.dumps({"results": [], "total_count": 0, "links": {}})
    events, nxt, total = store.query(filters, cursor, per_page, start=start, end=end,
                                     max_scan=max_scan)
    for ev in events:
        ev["timestamp"] = S.iso(ev.pop("_ts"))
    links = {}
    if nxt is not None:
        # the original parameters, in their order, with the next cursor
        params = [(k, v) for k, v in pairs if k != "cursor"] + pin + [("cursor", nxt)]
        links["next"] = PATH.decode() + "?" + urllib.parse.urlencode(params)
    return 200, orjson.dumps({"results": events, "total_count": total, "links": links})


def _iso_param(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
