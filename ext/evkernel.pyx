# cython: language_level=3
"""The events process's per-event kernels (compiled).

The pure-Python twin ``mta._pure.evkernel`` is the readable specification of
this module; both have the same public API and results (tests/events/test_evkernel.py
runs the same random inputs through both).

Why compiled: the events process is the largest single process per message
(about a third of all instructions end to end), and of its cost per event the
store's index keys (five ``str(v).lower().encode(...)[:400]`` an event, a
``float()`` of the timestamp, the Message-ID's strips, each a Python call) were
interpreter work around tiny string operations.  Here the common case -- an
exact ``str`` of ASCII characters, a float or a decimal-digit timestamp -- is a
typed loop over the characters that writes the result object directly;
anything else (non-ASCII text, other types, str subclasses, odd numbers) goes
the twin's way, through the same Python operations.  Measured
(bench/test_bench_events.py, callgrind): the store's keys and time in one
:func:`event_keys` call a event, -7.9 % of the events process's instructions
per HTTP injection event, -6.0 % end to end.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint8_t

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)
    bint PyUnicode_CheckExact(object o)
    bint PyFloat_CheckExact(object o)
    double PyFloat_AS_DOUBLE(object o)


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
            return _ms(float(ts))
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
    ``mid`` key) of a flat event; a key is None when its field is absent, None or "" (the
    ``mid`` key also unless *index_mid* and the event is an ``injection`` with a
    Message-ID).  The time is :func:`timestamp_ms` of ``timestamp``."""
    ms = _timestamp_ms(ev.get("timestamp"))
    eid = _opt_key(ev.get("event_id"))
    rcpt = _opt_key(ev.get("rcpt_to"))
    msg = _opt_key(ev.get("message_id"))
    mid = None
    if index_mid and ev.get("type") == "injection":
        mid = _mid(ev.get("message_id_header"))
    return ms, eid, rcpt, msg, mid
