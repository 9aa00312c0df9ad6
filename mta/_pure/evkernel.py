"""The events process's per-event kernels (pure-Python twin).

The readable specification of ``mta._ext.evkernel``: both have the same public
API and results, and the same tests run against both
(tests/events/test_evkernel.py, with random inputs).  The compiled module does
the common case (``str`` values of ASCII characters, a float or decimal-digit
timestamp) in typed C loops and anything else the way this module does.

- :func:`key`: an events-store index key (the value as text, lower case, UTF-8
  with surrogates escaped, at most MAX_KEY octets);
- :func:`timestamp_ms`: Unix seconds (a number, or a string ``float()``
  reads) as milliseconds;
- :func:`event_keys`: what the store's append needs of one event apart from the
  indexes it caches (type, bounce class, campaign, transmission), in one call;
- :func:`stamps`: the three time strings of a shaped event;
- :func:`shape_common`: the fields every shaped event has
  (:func:`mta.events.shape.sparkpost_event` before the type's own), and
  :func:`attempt_fields`: those of a delivery attempt (with :func:`reply`);
  :func:`shape_entries`: a record's entries shaped in one loop.
"""
import time

MAX_KEY = 400                       # octets of an indexed value kept (LMDB keys: at most 511)
MAX_TIME_MS = 253_402_300_799_999   # 9999-12-31T23:59:59.999Z: a later timestamp is no time


def key(value) -> bytes:
    """The index key of *value*: ``str(value)`` lower-cased, UTF-8 (surrogates escaped),
    its first MAX_KEY octets."""
    return str(value).lower().encode("utf-8", "surrogateescape")[:MAX_KEY]


def _ms(seconds) -> int:
    try:
        ms = int(seconds * 1000)
    except (ValueError, OverflowError):     # NaN, infinity
        return -1
    return max(0, ms) if ms <= MAX_TIME_MS else -1


def timestamp_ms(ts) -> int:
    """Unix seconds *ts* (a number other than a bool, or a string ``float()`` reads) in
    milliseconds, 0 for a time before 1970; -1 when it is none of these, is not finite or
    is beyond MAX_TIME_MS."""
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return _ms(ts)
    if isinstance(ts, str) and ts:
        try:
            return _ms(float(ts))
        except ValueError:
            return -1
    return -1


def mid_key(value) -> bytes | None:
    """The ``mid`` index key of a Message-ID header value: :func:`key` of it without its
    angle brackets and blanks; None when nothing is left.  (The store's writer, its index
    rebuild and its look-up by Message-ID all take it from here.)"""
    if not value:
        return None
    v = str(value).strip().strip("<>").strip().lower()
    return key(v) if v else None


def event_keys(ev: dict, index_mid: bool) -> tuple:
    """(time in ms or -1, ``event_id`` key, ``rcpt_to`` key, ``message_id`` key,
    ``mid`` key, ``transmission_id`` key, its counter prefix) of a flat event; a key is
    None when its field is absent, None or "" (the ``mid`` key also unless *index_mid* and
    the event is an ``injection`` with a Message-ID).  The time is :func:`timestamp_ms` of
    ``timestamp``; the counter prefix is the ``tx`` index's (``tx``, NUL, key, NUL)."""
    get = ev.get
    v = get("timestamp")
    ms = timestamp_ms(v)
    v = get("event_id")
    eid = None if v is None or v == "" else key(v)
    v = get("rcpt_to")
    rcpt = None if v is None or v == "" else key(v)
    v = get("message_id")
    msg = None if v is None or v == "" else key(v)
    mid = mid_key(get("message_id_header")) if index_mid and get("type") == "injection" \
        else None
    v = get("transmission_id")
    if v is None or v == "":
        return ms, eid, rcpt, msg, mid, None, None
    tx = key(v)
    return ms, eid, rcpt, msg, mid, tx, b"tx\x00" + tx + b"\x00"


_iso_second: tuple[int, str] = (-1, "")   # the last whole second iso() formatted, and its text


def iso(ts: float) -> str:
    """ISO-8601 UTC with milliseconds, as SparkPost writes ``injection_time``."""
    global _iso_second
    sec, ms = divmod(int(round(ts * 1000)), 1000)
    last, text = _iso_second
    if sec != last:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _iso_second = (sec, text)
    return "%s.%03dZ" % (text, ms)


def stamps(ts: float, arrival: float) -> tuple[str, str, str]:
    """(``timestamp``, ``event_time``, ``injection_time``) of a shaped event: *ts* in whole
    Unix seconds, *ts* with milliseconds, *arrival* in ISO-8601 UTC with milliseconds."""
    return str(int(ts)), "%.3f" % ts, iso(arrival)


def _decimal(qid: str) -> str:
    """A queue id (hex) as a decimal string, the transmission id of an SMTP injection."""
    try:
        return str(int(qid, 16))
    except ValueError:
        return qid


def shape_common(internal: dict, kind, event_id: str, recipient) -> tuple[dict, float, float]:
    """(the fields every shaped event of *internal* has, its time, its arrival): the part of
    :func:`mta.events.shape.sparkpost_event` before the type's own fields, in its order.

    *recipient*: the one of an injection's ``rcpts``; None: the event's own ``recipient``.
    """
    get = internal.get
    ts = float(get("timestamp") or 0.0)
    arrival = float(get("arrival") or ts)
    rcpt = get("recipient", "") if recipient is None else recipient
    qid = get("queue_id", "")
    domain = rcpt.rpartition("@")[2].lower() if "@" in rcpt else ""
    stamp, etime, injected = stamps(ts, arrival)
    out = {
        "type": kind,
        "event_id": event_id,
        "timestamp": stamp,
        "event_time": etime,
        "message_id": qid.lower(),
        "transmission_id": str(get("transmission_id") or _decimal(qid)),
        "campaign_id": get("campaign_id") or "",
        "rcpt_to": rcpt.lower(),
        "raw_rcpt_to": rcpt,
        "recipient_domain": domain,
        "routing_domain": domain,
        "rcpt_meta": get("metadata") or {},
        "rcpt_tags": get("tags") or [],
        "msg_from": get("sender", ""),
        "ip_pool": get("ip_pool") or "default",
        "transactional": "1" if get("transactional") is True else "0",
        "injection_time": injected,
        "recv_method": "rest" if str(get("client", "")).startswith("http") else "esmtp",
        "queue_id": qid,
    }
    v = get("friendly_from")
    if v:
        out["friendly_from"] = v
    v = get("subject")
    if v:
        out["subject"] = v
    if "size" in internal:
        out["msg_size"] = str(int(internal["size"]))
    v = get("start_at")
    if v:
        out["scheduled_time"] = str(int(v))   # options.start_time
    v = get("message_id")
    if v:
        out["message_id_header"] = v
    v = get("sending_ip")
    if v:
        out["sending_ip"] = v
    v = get("source")
    if v:
        out["egress_source"] = v
    v = get("site")
    if v:
        out["site"] = v
    v = get("client")
    if v:
        out["client"] = v
    rule = get("response_rule")
    if rule:
        # the response rule a receiver's reply matched during this attempt (ours, not
        # SparkPost's): its name, action (suspend throttle bounce defer), scope and end
        out["response_rule"] = rule.get("name", "")
        out["response_rule_action"] = rule.get("action", "")
        out["response_rule_scope"] = rule.get("scope", "")
        if rule.get("until"):
            out["response_rule_until"] = "%.3f" % rule["until"]
    return out, ts, arrival


def reply(internal: dict) -> tuple[int, str]:
    """(code, "code enhanced text") of an internal event's ``response``."""
    resp = internal.get("response") or {}
    code = int(resp.get("code") or 0)
    enhanced = resp.get("enhanced") or ""
    text = resp.get("text") or ""
    return code, " ".join(x for x in (str(code) if code else "", enhanced, text) if x)


def attempt_fields(out: dict, internal: dict, kind, ts: float, arrival: float) -> tuple:
    """Add a delivery attempt's fields to *out* (a ``delivery``, ``delay``, ``bounce`` or
    ``expiration``, after :func:`shape_common`): (attempt, reply code, reply text).

    A ``delivery`` is then complete; the others' own fields are added by
    :func:`mta.events.shape.sparkpost_event`.
    """
    attempt = int(internal.get("attempt") or 0)
    # failed attempts before this one; an expiry is no attempt: all of them failed
    out["num_retries"] = str(attempt if kind == "expiration" else max(0, attempt - 1))
    out["queue_time"] = str(max(0, int(round((ts - arrival) * 1000))))
    if internal.get("suppressed"):
        out["suppressed"] = "1"
    else:
        out["delv_method"] = "esmtp"
    if internal.get("remote_ip"):
        out["ip_address"] = internal["remote_ip"]
    if internal.get("remote_host"):
        out["remote_host"] = internal["remote_host"]
    code, raw = reply(internal)
    if internal.get("outbound_tls") and kind in ("delivery", "delay"):
        out["outbound_tls"] = str(internal["outbound_tls"])
    if kind == "delivery":
        # (SparkPost lists these for delay and bounce; the receiver's 250 is as useful)
        out["error_code"] = str(code) if code else ""
        out["raw_reason"] = raw
    return attempt, code, raw


def shape_entries(entries, ids, slow) -> list[dict]:
    """The flat SparkPost events of a record's entries, in order, their ids from *ids*:
    each entry's one event, or an injection's one per recipient of its ``rcpts``.

    An ``injection`` or a ``delivery`` is shaped here (:func:`shape_common`,
    :func:`attempt_fields`); any other type by *slow* (``slow(internal, event_id=...,
    recipient=...)``, :func:`mta.events.shape.sparkpost_event`).
    """
    out = []
    for internal in entries:
        kind = internal.get("type", "")
        rcpts = internal.get("rcpts")
        for r in (None,) if rcpts is None else rcpts:
            if kind == "injection" or kind == "delivery":
                ev, ts, arrival = shape_common(internal, kind, next(ids), r)
                if kind == "delivery":
                    attempt_fields(ev, internal, kind, ts, arrival)
            else:
                ev = slow(internal, event_id=next(ids), recipient=r)
            out.append(ev)
    return out
