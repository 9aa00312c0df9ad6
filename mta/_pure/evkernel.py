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
- :func:`stamps`: the three time strings of a shaped event.
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


def _mid(value) -> bytes | None:
    """The ``mid`` key of a Message-ID header value (no angle brackets, lower case)."""
    if not value:
        return None
    v = str(value).strip().strip("<>").strip().lower()
    return key(v) if v else None


def event_keys(ev: dict, index_mid: bool) -> tuple:
    """(time in ms or -1, ``event_id`` key, ``rcpt_to`` key, ``message_id`` key,
    ``mid`` key) of a flat event; a key is None when its field is absent, None or "" (the
    ``mid`` key also unless *index_mid* and the event is an ``injection`` with a
    Message-ID).  The time is :func:`timestamp_ms` of ``timestamp``."""
    get = ev.get
    v = get("timestamp")
    ms = timestamp_ms(v)
    v = get("event_id")
    eid = None if v is None or v == "" else key(v)
    v = get("rcpt_to")
    rcpt = None if v is None or v == "" else key(v)
    v = get("message_id")
    msg = None if v is None or v == "" else key(v)
    mid = _mid(get("message_id_header")) if index_mid and get("type") == "injection" \
        else None
    return ms, eid, rcpt, msg, mid


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
