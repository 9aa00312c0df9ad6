"""mta.api.events in-process: parameters, defaults, paging links, errors (no daemon)."""
from __future__ import annotations

import urllib.parse

import orjson
import pytest

from mta.api import events as api
from mta.api import replies as R
from mta.feedback.events_store import EventStore

NOW = 1_700_100_000.0


@pytest.fixture
def store(tmp_path):
    s = EventStore(str(tmp_path / "ev"), map_size=64 << 20, retention=10 * 86400)
    evs = []
    for i in range(30):
        evs.append({"type": "delivery" if i % 3 else "injection", "event_id": str(i),
                    "timestamp": str(int(NOW) - 3000 + i * 60), "rcpt_to": f"r{i % 2}@x.example",
                    "campaign_id": "c-1", "message_id": f"m{i}"})
    s.append(evs)
    yield s
    s.close()


def call(store, query: str) -> dict:
    status, body = api.handle(store, b"GET", b"/api/v1/events/message?" + query.encode(),
                              now=NOW)
    assert status == 200
    return orjson.loads(body)


def test_default_window_excludes_the_last_minute(store):
    b = call(store, "")
    # events at NOW-3000 .. NOW-1260, one a minute; to = NOW - 60 excludes none of them
    assert b["total_count"] == 30
    store.append([{"type": "delivery", "event_id": "late", "timestamp": str(int(NOW) - 30)}])
    assert call(store, "")["total_count"] == 30
    assert call(store, "to=" + api._iso_param(NOW))["total_count"] == 31


def test_links_repeat_the_filters_and_pin_the_window(store):
    b = call(store, "events=delivery&per_page=7&recipients=r1@x.example")
    assert len(b["results"]) == 7 and b["total_count"] == 10
    nxt = b["links"]["next"]
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(nxt).query)
    assert q["events"] == ["delivery"] and q["recipients"] == ["r1@x.example"]
    assert q["from"] and q["to"] and q["cursor"]
    b2 = call(store, urllib.parse.urlsplit(nxt).query)
    assert len(b2["results"]) == 3 and b2["links"] == {}
    assert b2["total_count"] == 10
    got = [e["event_id"] for e in b["results"] + b2["results"]]
    assert got == [str(i) for i in range(29, -1, -1) if i % 3 and i % 2]


def test_repeated_keys_and_node_array_keys(store):
    b = call(store, "messages=m1&messages=m2&messages%5B0%5D=m4")
    assert sorted(e["message_id"] for e in b["results"]) == ["m1", "m2", "m4"]


def test_timestamp_is_iso(store):
    e = call(store, "messages=m0")["results"][0]
    assert e["timestamp"] == api.S.iso((int(NOW) - 3000) * 1000)
    assert "_ts" not in e


def test_errors_name_the_parameter(store):
    for query, param in [("from=2023-11-01", None), ("from=x", "from"), ("per_page=-1", "per_page"),
                         ("delimiter=123456789", "delimiter"), ("events=", None),
                         ("events=bogus", "events")]:
        url = b"/api/v1/events/message?" + query.encode()
        if param is None:
            assert api.handle(store, b"GET", url, now=NOW)[0] == 200
            continue
        with pytest.raises(R.ApiError) as e:
            api.handle(store, b"GET", url, now=NOW)
        assert e.value.status == 400 and e.value.description.startswith(param + ":")


def test_from_and_to_with_an_offset_however_its_plus_was_sent(store):
    # An offset's "+" typed into the URL arrives as a space; "+00:00" was taken so, but
    # "+0000" (the suppression list's documented form, and what clients build) and "+00"
    # were a 400 "not a valid date" while the same time in Z was fine.
    import datetime

    def text(ts, fmt):
        return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(fmt)

    start, end = NOW - 1500, NOW - 600
    want = call(store, f"from={text(start, '%Y-%m-%dT%H:%M:%SZ')}"
                       f"&to={text(end, '%Y-%m-%dT%H:%M:%SZ')}")["total_count"]
    assert 0 < want < 30
    for off in ("+0000", "+00:00", "+00", "%2B0000", "-0000"):
        got = call(store, f"from={text(start, '%Y-%m-%dT%H:%M:%S')}{off}"
                          f"&to={text(end, '%Y-%m-%dT%H:%M:%S')}{off}")
        assert got["total_count"] == want, off
    east = text(start + 5400, "%Y-%m-%dT%H:%M:%S") + "+0130"     # (the same instant)
    assert call(store, f"from={east}&to={text(end, '%Y-%m-%dT%H:%M')}Z")["total_count"] == want
    # a space that is no offset is still a 400 naming the parameter
    with pytest.raises(R.ApiError) as e:
        api.handle(store, b"GET", b"/api/v1/events/message?from=2023-11-16T00:00:00+abc",
                   now=NOW)
    assert e.value.status == 400 and e.value.description.startswith("from:")


def test_no_store_yet_is_an_empty_answer():
    status, body = api.handle(None, b"GET", b"/api/v1/events/message", now=NOW)
    assert status == 200
    assert orjson.loads(body) == {"results": [], "total_count": 0, "links": {}}


def test_unknown_subresource_is_404(store):
    with pytest.raises(R.ApiError) as e:
        api.handle(store, b"GET", b"/api/v1/events/message/nothing", now=NOW)
    assert e.value.status == 404


def test_unicode_digits_and_pre_1970_dates_are_400_naming_the_parameter(store):
    # ('²' is a digit to str.isdigit(), not to int(); the store's times are unsigned)
    for query, param in [("per_page=%C2%B2", "per_page"), ("per_page=" + "9" * 40, "per_page"),
                         ("from=1969-01-01T00:00:00Z&to=1969-12-31T00:00:00Z", "from"),
                         ("to=1969-12-31T00:00:00Z", "to")]:
        url = b"/api/v1/events/message?" + query.encode()
        with pytest.raises(R.ApiError) as e:
            api.handle(store, b"GET", url, now=NOW)
        assert e.value.status == 400 and e.value.description.startswith(param + ":"), query


def test_many_keyword_values_are_answered_quickly(tmp_path):
    """A keyword filter (subjects, reasons, templates...) of many values -- about 1,300
    fit in the 4096 characters of a URI -- was checked value by value on each event read:
    about 3 s for 4,000 events (thousands of times that for the store's scan bound of
    500,000), a worker thread held all along.  Matches must not change."""
    import itertools
    import string
    import time as _time

    s = EventStore(str(tmp_path / "ev"), map_size=64 << 20, retention=10 * 86400)
    try:
        s.append([{"type": "delivery", "event_id": str(i), "timestamp": str(int(NOW) - 5000 + i),
                   "subject": "hello world %d" % i, "template_id": "tpl-%d-x" % (i % 40)}
                  for i in range(4000)])
        alnum = string.ascii_lowercase + string.digits
        vals = ["".join(p) for n in (1, 2) for p in itertools.product(alnum, repeat=n)]
        q = ",".join(vals)[:4000].rsplit(",", 1)[0]
        for param in ("subjects", "templates"):
            t = _time.monotonic()
            b = call(s, f"{param}={q}&from=2023-11-15T00:00:00Z&per_page=10000")
            assert _time.monotonic() - t < 0.5, param
            got = sorted(int(e["event_id"]) for e in b["results"])
            if param == "subjects":      # "hello world 7" has the token "7", "42" ...
                assert got == [i for i in range(4000) if str(i) in q.split(",")]
            else:                        # "tpl-7-x": the token "x"
                assert got == list(range(4000))
        # several tokens in one value: in order and next to each other
        b = call(s, "subjects=world 12,hello 3,world,x&from=2023-11-15T00:00:00Z&per_page=10000")
        assert b["total_count"] == 4000
        b = call(s, "subjects=world 12,hello 3,12 world,hello world 7&from=2023-11-15T00:00:00Z")
        assert sorted(int(e["event_id"]) for e in b["results"]) == [7, 12]
        b = call(s, "subjects=hello world 7 x,world 12,world 47,,world 7 y,world 12"
                    "&from=2023-11-15T00:00:00Z&per_page=10000&templates=tpl 7 x")
        assert sorted(int(e["event_id"]) for e in b["results"]) == [47]
    finally:
        s.close()


def test_a_window_reversed_by_a_default_names_the_parameter_given(store):
    """``to`` alone, earlier than the default ``from`` (24 hours ago), was a 400 naming
    ``from`` -- a parameter the client did not send; ``from`` alone, later than the default
    ``to`` (a minute ago), names ``from``; both given and reversed name ``from``."""
    for query, param in [("to=2023-01-01T00:00:00Z", "to"),
                         ("from=2099-01-01T00:00:00Z", "from"),
                         ("from=2023-11-02T00:00:00Z&to=2023-11-01T00:00:00Z", "from")]:
        with pytest.raises(R.ApiError) as e:
            api.handle(store, b"GET", b"/api/v1/events/message?" + query.encode(), now=NOW)
        assert e.value.status == 400 and e.value.description.startswith(param + ":"), query
        if query.count("=") == 1:
            assert "default" in e.value.description, e.value.description
