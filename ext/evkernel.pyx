# cython: language_level=3
"""The events process's per-event kernels (compiled).

The pure-Python twin ``mta._pure.evkernel`` is the readable specification of
this module; both have the same public API and results (tests/events/test_evkernel.py
runs the same random inputs through both).

Why compiled: the events process is the largest single process per message
(about a third of all instructions end to end), and much of its cost per event
was interpreter work around small string and dict operations: the store's index
keys (``str(v).lower().encode(...)[:400]`` five times, a ``float()`` of the
timestamp, the Message-ID's strips) and the shaped event's fields.  Here the
common case -- an exact ``str`` of ASCII characters, a float or a decimal-digit
timestamp, a plain dict -- is typed C (loops over the characters writing the
result object directly, dict lookups and stores without the interpreter);
anything else (non-ASCII text, other types, str subclasses, odd numbers) goes
the twin's way, through the same Python operations.

Measured (bench/test_bench_events.py under callgrind, instructions per event of
the events process, HTTP injection / end to end; each step on top of the last):

- :func:`event_keys`, the store's keys and time in one call: -7.9 % / -6.0 %;
- :func:`stamps`, the shape's three time strings (the ISO date from the day
  number, not strftime): -3.8 % / -2.7 %;
- :func:`shape_common`, the fields every shaped event has: -6.9 % / -5.4 %;
- :func:`attempt_fields`, a delivery attempt's fields: 0 / -2.6 %;
- the transmission id's key and counter prefix in :func:`event_keys`: -2.8 % / -3.0 %;
- :func:`shape_entries`, a record's injections and deliveries shaped in one loop
  (no Python frame per event): -3.0 % / -2.2 %.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.math cimport isfinite, rint
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)
    bint PyUnicode_CheckExact(object o)
    bint PyFloat_CheckExact(object o)
    double PyFloat_AS_DOUBLE(object o)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    char* PyOS_double_to_string(double val, char format_code, int precision, int flags,
                                int *ptype) except NULL
    void PyMem_Free(void *p)
    Py_ssize_t PyUnicode_FindChar(object s, Py_UCS4 ch, Py_ssize_t start, Py_ssize_t end,
                                  int direction) except -2

import builtins
import time as _time


DEF C_MAX_KEY = 400
DEF C_MAX_TIME_MS = 253402300799999

MAX_KEY = C_MAX_KEY
MAX_TIME_MS = C_MAX_TIME_MS


# ------------------------------------------------------------------ keys

cdef inline bytes _ascii_lower(const uint8_t* p, Py_ssize_t n):
    """The ASCII characters p[0:n] lower-cased, as bytes (at most MAX_KEY of them)."""
    cdef Py_ssize_t i
    cdef uint8_t c
    if n > C_MAX_KEY:
        n = C_MAX_KEY
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* d = <uint8_t*>PyBytes_AS_STRING(out)
    for i in range(n):
        c = p[i]
        d[i] = c + 32 if 65 <= c <= 90 else c
    return out


cdef bytes _key(object value):
    if PyUnicode_CheckExact(value) and PyUnicode_IS_ASCII(value):
        return _ascii_lower(<const uint8_t*>PyUnicode_DATA(value), PyUnicode_GET_LENGTH(value))
    return str(value).lower().encode("utf-8", "surrogateescape")[:C_MAX_KEY]


def key(value) -> bytes:
    """The index key of *value*: ``str(value)`` lower-cased, UTF-8 (surrogates escaped),
    its first MAX_KEY octets."""
    return _key(value)


cdef inline bint _space(uint8_t c):
    # str.strip()'s whitespace among the ASCII characters
    return c == 32 or 9 <= c <= 13 or 28 <= c <= 31


cdef object _mid(object value):
    cdef const uint8_t* p
    cdef Py_ssize_t a, b
    if PyUnicode_CheckExact(value) and PyUnicode_IS_ASCII(value):
        p = <const uint8_t*>PyUnicode_DATA(value)
        a = 0
        b = PyUnicode_GET_LENGTH(value)
        while a < b and _space(p[a]):
            a += 1
        while b > a and _space(p[b - 1]):
            b -= 1
        while a < b and (p[a] == 60 or p[a] == 62):        # < >
            a += 1
        while b > a and (p[b - 1] == 60 or p[b - 1] == 62):
            b -= 1
        while a < b and _space(p[a]):
            a += 1
        while b > a and _space(p[b - 1]):
            b -= 1
        return _ascii_lower(p + a, b - a) if b > a else None
    if not value:
        return None
    v = str(value).strip().strip("<>").strip().lower()
    return _key(v) if v else None


def mid_key(value):
    """The ``mid`` index key of a Message-ID header value (see the twin), or None."""
    return _mid(value)


# ------------------------------------------------------------------ times

cdef int64_t _ms_double(double seconds):
    cdef double d = seconds * 1000.0
    if not isfinite(d):
        return -1
    if d <= 0.0:
        return 0            # (int() truncates toward zero; before 1970 is 0)
    if d >= <double>(C_MAX_TIME_MS + 1):
        return -1
    return <int64_t>d


def _ms(seconds) -> int:
    try:
        ms = int(seconds * 1000)
    except (ValueError, OverflowError):
        return -1
    return max(0, ms) if ms <= C_MAX_TIME_MS else -1


# Python's own float(): for a str, Cython's float() is its own parser, which takes
# strings Python refuses ("1e+_1": an underscore after the exponent's sign), so a
# timestamp the twin refuses would be read here (found by the review of stop 47's diff).
_pyfloat = builtins.float


cdef inline double _to_double(object v) except? -1.0:
    if PyFloat_CheckExact(v):
        return PyFloat_AS_DOUBLE(v)
    return _pyfloat(v)


cdef int64_t _timestamp_ms(object ts) except -2:
    cdef const uint8_t* p
    cdef Py_ssize_t n, i
    cdef int64_t v
    if PyFloat_CheckExact(ts):
        return _ms_double(PyFloat_AS_DOUBLE(ts))
    if PyUnicode_CheckExact(ts) and PyUnicode_IS_ASCII(ts):
        n = PyUnicode_GET_LENGTH(ts)
        if 0 < n <= 15:
            # decimal digits only: float() reads them exactly (below 2**53), and their
            # thousandfold too (MAX_TIME_MS is below 2**53)
            p = <const uint8_t*>PyUnicode_DATA(ts)
            v = 0
            for i in range(n):
                if not 48 <= p[i] <= 57:
                    break
                v = v * 10 + (p[i] - 48)
            else:
                v *= 1000
                if v <= C_MAX_TIME_MS:
                    return v
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return _ms(ts)
    if isinstance(ts, str) and ts:
        try:
            return _ms(_to_double(ts))
        except ValueError:
            return -1
    return -1


def timestamp_ms(ts) -> int:
    """Unix seconds *ts* (a number other than a bool, or a string ``float()`` reads) in
    milliseconds, 0 for a time before 1970; -1 when it is none of these, is not finite or
    is beyond MAX_TIME_MS."""
    return _timestamp_ms(ts)


cdef inline object _opt_key(object v):
    if v is None:
        return None
    if PyUnicode_CheckExact(v):
        if PyUnicode_GET_LENGTH(v) == 0:
            return None
    elif v == "":
        return None
    return _key(v)


def event_keys(dict ev, bint index_mid) -> tuple:
    """(time in ms or -1, ``event_id`` key, ``rcpt_to`` key, ``message_id`` key,
    ``mid`` key, ``transmission_id`` key, its counter prefix) of a flat event; a key is
    None when its field is absent, None or "" (the ``mid`` key also unless *index_mid* and
    the event is an ``injection`` with a Message-ID).  The time is :func:`timestamp_ms` of
    ``timestamp``; the counter prefix is the ``tx`` index's (``tx``, NUL, key, NUL)."""
    ms = _timestamp_ms(ev.get("timestamp"))
    eid = _opt_key(ev.get("event_id"))
    rcpt = _opt_key(ev.get("rcpt_to"))
    msg = _opt_key(ev.get("message_id"))
    mid = None
    if index_mid and ev.get("type") == "injection":
        mid = _mid(ev.get("message_id_header"))
    tx = _opt_key(ev.get("transmission_id"))
    if tx is None:
        return ms, eid, rcpt, msg, mid, None, None
    return ms, eid, rcpt, msg, mid, tx, _tx_prefix(tx)


cdef bytes _tx_prefix(bytes k):
    """b"tx\\x00" + k + b"\\x00": the ``tx`` index's counter prefix of key *k*."""
    cdef Py_ssize_t n = len(k)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + 4)
    cdef char* d = PyBytes_AS_STRING(out)
    d[0] = 116      # t
    d[1] = 120      # x
    d[2] = 0
    memcpy(d + 3, PyBytes_AS_STRING(k), n)
    d[n + 3] = 0
    return out


# ------------------------------------------------------------------ shaped times

cdef int64_t _iso_last = -1       # the last whole second iso() formatted, and its text
cdef str _iso_text = ""


cdef inline void _two(uint8_t* d, int v):
    d[0] = 48 + v // 10
    d[1] = 48 + v % 10


cdef str _civil(int64_t sec):
    """'YYYY-MM-DDTHH:MM:SS' of Unix second *sec* (0 <= sec, year at most 9999)."""
    cdef int64_t days = sec // 86400
    cdef int64_t rem = sec % 86400
    # days since 1970-01-01 -> proleptic Gregorian date (eras of 400 years from 0000-03-01)
    cdef int64_t z = days + 719468
    cdef int64_t era = z // 146097
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t y = yoe + era * 400
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    cdef int day = <int>(doy - (153 * mp + 2) // 5 + 1)
    cdef int month = <int>(mp + 3 if mp < 10 else mp - 9)
    if month <= 2:
        y += 1
    cdef str out = PyUnicode_New(19, 127)
    cdef uint8_t* d = <uint8_t*>PyUnicode_DATA(out)
    _two(d, <int>(y // 100))
    _two(d + 2, <int>(y % 100))
    d[4] = 45
    _two(d + 5, month)
    d[7] = 45
    _two(d + 8, day)
    d[10] = 84
    _two(d + 11, <int>(rem // 3600))
    d[13] = 58
    _two(d + 14, <int>(rem // 60 % 60))
    d[16] = 58
    _two(d + 17, <int>(rem % 60))
    return out


cdef str _iso(double ts):
    global _iso_last, _iso_text
    cdef double r = rint(ts * 1000.0)          # round(): half to even, as rint by default
    cdef int64_t total, sec
    cdef int ms
    if not (0.0 <= r < 253402300800000.0):
        return _iso_py(ts)
    total = <int64_t>r
    sec = total // 1000
    ms = <int>(total % 1000)
    if sec != _iso_last:
        _iso_text = _civil(sec)
        _iso_last = sec
    cdef str out = PyUnicode_New(24, 127)
    cdef uint8_t* d = <uint8_t*>PyUnicode_DATA(out)
    cdef const uint8_t* s = <const uint8_t*>PyUnicode_DATA(_iso_text)
    cdef int i
    for i in range(19):
        d[i] = s[i]
    d[19] = 46
    d[20] = 48 + ms // 100
    _two(d + 21, ms % 100)
    d[23] = 90
    return out


def _iso_py(ts):
    sec, ms = divmod(int(round(ts * 1000)), 1000)
    text = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(sec))
    return "%s.%03dZ" % (text, ms)


def iso(double ts) -> str:
    """ISO-8601 UTC with milliseconds, as SparkPost writes ``injection_time``."""
    return _iso(ts)


def stamps(double ts, double arrival) -> tuple:
    """(``timestamp``, ``event_time``, ``injection_time``) of a shaped event: *ts* in whole
    Unix seconds, *ts* with milliseconds, *arrival* in ISO-8601 UTC with milliseconds."""
    return _stamps(ts, arrival)


cdef tuple _stamps(double ts, double arrival):
    cdef char* buf = PyOS_double_to_string(ts, b'f', 3, 0, NULL)
    try:
        etime = buf.decode("ascii")
    finally:
        PyMem_Free(buf)
    if isfinite(ts) and -9.0e15 < ts < 9.0e15:
        whole = <int64_t>ts
    else:
        whole = int(ts)
    return str(whole), etime, _iso(arrival)


# ------------------------------------------------------------------ shaped fields

cdef object _lower_ascii(object s):
    """*s* lower-cased when it is an exact str of ASCII characters (a new str); else None."""
    if not (PyUnicode_CheckExact(s) and PyUnicode_IS_ASCII(s)):
        return None
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s), i
    cdef const uint8_t* p = <const uint8_t*>PyUnicode_DATA(s)
    cdef uint8_t c
    for i in range(n):
        c = p[i]
        if 65 <= c <= 90:
            break
    else:
        return s            # (str.lower() of a lower-case str is an equal str)
    cdef str out = PyUnicode_New(n, 127)
    cdef uint8_t* d = <uint8_t*>PyUnicode_DATA(out)
    for i in range(n):
        c = p[i]
        d[i] = c + 32 if 65 <= c <= 90 else c
    return out


def _decimal(qid):
    try:
        return str(int(qid, 16))
    except ValueError:
        return qid


cdef inline bint _truthy(object v) except -1:
    if v is None:
        return False
    if PyUnicode_CheckExact(v):
        return PyUnicode_GET_LENGTH(v) != 0
    return bool(v)


def shape_common(dict internal, kind, event_id, recipient) -> tuple:
    """(the fields every shaped event of *internal* has, its time, its arrival): the part of
    :func:`mta.events.shape.sparkpost_event` before the type's own fields, in its order.

    *recipient*: the one of an injection's ``rcpts``; None: the event's own ``recipient``.
    """
    return _shape_common(internal, kind, event_id, recipient)


cdef tuple _shape_common(dict internal, kind, event_id, recipient):
    cdef Py_ssize_t at
    v = internal.get("timestamp")
    cdef double ts = _to_double(v) if _truthy(v) else 0.0
    v = internal.get("arrival")
    cdef double arrival = _to_double(v) if _truthy(v) else ts
    rcpt = internal.get("recipient", "") if recipient is None else recipient
    qid = internal.get("queue_id", "")
    rcpt_to = _lower_ascii(rcpt)
    if rcpt_to is not None:
        at = PyUnicode_FindChar(rcpt, 64, 0, PyUnicode_GET_LENGTH(rcpt), -1)
        domain = rcpt_to[at + 1:] if at >= 0 else ""
    else:
        domain = rcpt.rpartition("@")[2].lower() if "@" in rcpt else ""
    stamp, etime, injected = _stamps(ts, arrival)
    message_id = _lower_ascii(qid)
    if message_id is None:
        message_id = qid.lower()
    v = internal.get("transmission_id")
    if not _truthy(v):
        v = _decimal(qid)
    tx = v if PyUnicode_CheckExact(v) else str(v)
    if rcpt_to is None:
        rcpt_to = rcpt.lower()
    campaign = internal.get("campaign_id")
    meta = internal.get("metadata")
    tags = internal.get("tags")
    pool = internal.get("ip_pool")
    client = internal.get("client", "")
    if not PyUnicode_CheckExact(client):
        client = str(client)
    cdef dict out = {
        "type": kind,
        "event_id": event_id,
        "timestamp": stamp,
        "event_time": etime,
        "message_id": message_id,
        "transmission_id": tx,
        "campaign_id": campaign if _truthy(campaign) else "",
        "rcpt_to": rcpt_to,
        "raw_rcpt_to": rcpt,
        "recipient_domain": domain,
        "routing_domain": domain,
        "rcpt_meta": meta if _truthy(meta) else {},
        "rcpt_tags": tags if _truthy(tags) else [],
        "msg_from": internal.get("sender", ""),
        "ip_pool": pool if _truthy(pool) else "default",
        "transactional": "1" if internal.get("transactional") is True else "0",
        "injection_time": injected,
        "recv_method": "rest" if client.startswith("http") else "esmtp",
        "queue_id": qid,
    }
    v = internal.get("friendly_from")
    if _truthy(v):
        out["friendly_from"] = v
    v = internal.get("subject")
    if _truthy(v):
        out["subject"] = v
    if "size" in internal:
        out["msg_size"] = str(int(internal["size"]))
    v = internal.get("start_at")
    if _truthy(v):
        out["scheduled_time"] = str(int(v))
    v = internal.get("message_id")
    if _truthy(v):
        out["message_id_header"] = v
    v = internal.get("sending_ip")
    if _truthy(v):
        out["sending_ip"] = v
    v = internal.get("source")
    if _truthy(v):
        out["egress_source"] = v
    v = internal.get("site")
    if _truthy(v):
        out["site"] = v
    v = internal.get("client")
    if _truthy(v):
        out["client"] = v
    rule = internal.get("response_rule")
    if _truthy(rule):
        out["response_rule"] = rule.get("name", "")
        out["response_rule_action"] = rule.get("action", "")
        out["response_rule_scope"] = rule.get("scope", "")
        if rule.get("until"):
            out["response_rule_until"] = "%.3f" % rule["until"]
    return out, ts, arrival


cdef tuple _reply(dict internal):
    resp = internal.get("response")
    if not _truthy(resp):
        resp = {}
    v = resp.get("code")
    code = int(v) if _truthy(v) else 0
    enhanced = resp.get("enhanced")
    text = resp.get("text")
    cdef list parts = []
    if code:
        parts.append(str(code))
    if _truthy(enhanced):
        parts.append(enhanced)
    if _truthy(text):
        parts.append(text)
    return code, " ".join(parts)


def reply(dict internal) -> tuple:
    """(code, "code enhanced text") of an internal event's ``response``."""
    return _reply(internal)


def attempt_fields(dict out, dict internal, kind, double ts, double arrival) -> tuple:
    """Add a delivery attempt's fields to *out* (a ``delivery``, ``delay``, ``bounce`` or
    ``expiration``, after :func:`shape_common`): (attempt, reply code, reply text).

    A ``delivery`` is then complete; the others' own fields are added by
    :func:`mta.events.shape.sparkpost_event`.
    """
    return _attempt_fields(out, internal, kind, ts, arrival)


cdef tuple _attempt_fields(dict out, dict internal, kind, double ts, double arrival):
    cdef double r
    v = internal.get("attempt")
    attempt = int(v) if _truthy(v) else 0
    is_delivery = kind == "delivery"
    out["num_retries"] = str(attempt if kind == "expiration" else max(0, attempt - 1))
    r = rint((ts - arrival) * 1000.0)
    if -4.0e18 < r < 4.0e18:
        out["queue_time"] = str(<int64_t>r if r > 0.0 else 0)
    else:
        out["queue_time"] = str(max(0, int(round((ts - arrival) * 1000))))
    if _truthy(internal.get("suppressed")):
        out["suppressed"] = "1"
    else:
        out["delv_method"] = "esmtp"
    v = internal.get("remote_ip")
    if _truthy(v):
        out["ip_address"] = v
    v = internal.get("remote_host")
    if _truthy(v):
        out["remote_host"] = v
    code, raw = _reply(internal)
    v = internal.get("outbound_tls")
    if _truthy(v) and (is_delivery or kind == "delay"):
        out["outbound_tls"] = v if PyUnicode_CheckExact(v) else str(v)
    if is_delivery:
        out["error_code"] = str(code) if code else ""
        out["raw_reason"] = raw
    return attempt, code, raw


def shape_entries(entries, ids, slow) -> list:
    """The flat SparkPost events of a record's entries, in order, their ids from *ids*:
    each entry's one event, or an injection's one per recipient of its ``rcpts``.

    An ``injection`` or a ``delivery`` is shaped here (:func:`shape_common`,
    :func:`attempt_fields`); any other type by *slow* (``slow(internal, event_id=...,
    recipient=...)``, :func:`mta.events.shape.sparkpost_event`).
    """
    cdef list out = []
    cdef dict ev
    cdef tuple common
    cdef int fast
    for internal in entries:
        kind = internal.get("type", "")
        rcpts = internal.get("rcpts")
        fast = 2 if kind == "injection" else (1 if kind == "delivery" else 0)
        for r in (None,) if rcpts is None else rcpts:
            if fast:
                common = _shape_common(internal, kind, next(ids), r)
                ev = <dict>common[0]
                if fast == 1:
                    _attempt_fields(ev, internal, kind, common[1], common[2])
                out.append(ev)
            else:
                out.append(slow(internal, event_id=next(ids), recipient=r))
    return out
