"""SparkPost's Events API (GET /api/v1/events/message) against the real daemon.

The tests in the first part seed the events store through
:class:`mta.events.store.EventStore` (the daemon's acceptors read that LMDB
environment read-only, across processes) so that every filter can be checked
on known data; the npm ``sparkpost`` client reads the same events with
``events.searchMessage``.
"""
from __future__ import annotations

import datetime
import http.client
import json
import os
import subprocess
import time
import urllib.parse

import pytest
from daemon import HOST

from mta.events.store import EventStore

KEY = "events-key"
JS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "js-http")
NOW = int(time.time())
BASE = NOW - 3600            # seeded events: one a second from an hour ago


def iso_param(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def iso_event(ts: float) -> str:
    return iso_param(ts)[:-1] + ".000+00:00"


def get(d, path: str, key: str | None = KEY) -> tuple[int, object]:
    conn = http.client.HTTPConnection(HOST, d.http_port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": key} if key else {})
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    return r.status, json.loads(raw) if raw else raw


def seeded(i: int, **kw) -> dict:
    e = {"type": "delivery", "event_id": str(900_000 + i), "timestamp": str(BASE + i),
         "message_id": "%020x" % (0xabc000 + i), "transmission_id": str(7000 + i // 10),
         "rcpt_to": f"rcpt{i % 5}@example.com", "raw_rcpt_to": f"Rcpt{i % 5}@example.com",
         "recipient_domain": "example.com", "campaign_id": "blackfriday-specials",
         "friendly_from": "news@sender.example.org", "subject": "Deals inside",
         "ip_pool": "default", "sending_ip": "127.0.0.1", "rcpt_meta": {"k": "v"},
         "rcpt_tags": ["a"], "num_retries": "0", "queue_time": "12"}
    e.update(kw)
    return e


@pytest.fixture(scope="module")
def daemon(make_module_daemon):
    d = make_module_daemon(subdir="events", acceptors=1, shards=1, http={"api_keys": [KEY]})
    try:
        evs = [seeded(i) for i in range(60)]
        evs[7].update(type="bounce", bounce_class="10", error_code="550",
                      raw_reason="550 5.1.1 <rcpt2@example.com>: no such user",
                      reason="550 5.1.1 <...@...>: no such user")
        evs[8].update(type="delay", bounce_class="22", error_code="452")
        evs[9].update(campaign_id="spring", subject="Spring news")
        store = EventStore(os.path.join(d.state_dir, "events"), map_size=64 << 20,
                           retention=10 * 86400)
        store.append(evs)
        # one event from a few seconds ago: outside the default window (to = 1 minute ago)
        store.append([seeded(1000, timestamp=str(int(time.time()) - 5))])
        store.sync()
        store.close()
        yield d
    finally:
        d.cleanup()


def window(**params) -> str:
    params.setdefault("from", iso_param(BASE))
    params.setdefault("to", iso_param(BASE + 1000))
    return "/api/v1/events/message?" + urllib.parse.urlencode(params)


def test_filters_answer_from_the_store(daemon):
    status, body = get(daemon, window(recipients="RCPT2@example.com"))
    assert status == 200, body
    assert body["total_count"] == 12
    assert [e["event_id"] for e in body["results"]] == \
        [str(900_000 + i) for i in range(59, -1, -1) if i % 5 == 2]
    first = body["results"][-1]
    assert first["timestamp"] == iso_event(BASE + 2)          # ISO-8601 in the API
    assert first["rcpt_meta"] == {"k": "v"} and first["num_retries"] == "0"
    assert body["links"] == {}

    status, body = get(daemon, window(bounce_classes="10,22"))
    assert [(e["type"], e["bounce_class"]) for e in body["results"]] == \
        [("delay", "22"), ("bounce", "10")]
    status, body = get(daemon, window(events="bounce"))
    assert [e["event_id"] for e in body["results"]] == ["900007"]
    assert body["results"][0]["raw_reason"].startswith("550 5.1.1")
    # keyword match: whole tokens of the campaign id, not substrings
    status, body = get(daemon, window(campaigns="blackfriday"))
    assert body["total_count"] == 59
    status, body = get(daemon, window(campaigns="black"))
    assert body["total_count"] == 0
    status, body = get(daemon, window(campaigns="spring", subjects="news"))
    assert [e["event_id"] for e in body["results"]] == ["900009"]
    status, body = get(daemon, window(messages="%020x" % (0xabc000 + 33),
                                      transmissions="7003"))
    assert [e["event_id"] for e in body["results"]] == ["900033"]
    status, body = get(daemon, window(recipients="rcpt1@example.com;rcpt3@example.com",
                                      delimiter=";", per_page="100"))
    assert body["total_count"] == 24


def test_paging_follows_links_next_to_the_end(daemon):
    path = window(events="delivery", per_page="7")
    seen = []
    pages = 0
    while True:
        status, body = get(daemon, path)
        assert status == 200, body
        assert body["total_count"] == 58
        seen += [e["event_id"] for e in body["results"]]
        pages += 1
        if not body["links"]:
            break
        path = body["links"]["next"]
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        assert q["events"] == ["delivery"] and q["per_page"] == ["7"]   # filters repeated
        assert pages < 20
    assert pages == 9
    want = [str(900_000 + i) for i in range(59, -1, -1) if i not in (7, 8)]
    assert seen == want


def test_default_window_is_the_last_day_up_to_one_minute_ago(daemon):
    status, body = get(daemon, "/api/v1/events/message?per_page=1")
    assert status == 200, body
    assert body["total_count"] == 60                   # not the one from 5 seconds ago
    assert body["results"][0]["event_id"] == "900059"
    nxt = urllib.parse.parse_qs(urllib.parse.urlsplit(body["links"]["next"]).query)
    assert set(nxt) == {"per_page", "from", "to", "cursor"}   # the window is pinned


@pytest.mark.parametrize("query, param", [
    ("from=yesterday", "from"),
    ("to=2024-13-01T00:00:00Z", "to"),
    ("from=2024-02-01T00:00:00Z&to=2024-01-01T00:00:00Z", "from"),
    ("per_page=0", "per_page"),
    ("per_page=10001", "per_page"),
    ("per_page=ten", "per_page"),
    ("events=delivery,explosion", "events"),
    ("cursor=bogus", "cursor"),
    ("colour=red", "colour"),
    ("ab_test_versions=1", "ab_test_versions"),
    ("recipients=" + "a" * 4100, "uri"),
])
def test_bad_parameters_are_400_naming_them(daemon, query, param):
    status, body = get(daemon, "/api/v1/events/message?" + query)
    assert status == 400, body
    assert body["errors"][0]["description"].startswith(param + ":"), body


def test_auth_and_method(daemon):
    status, body = get(daemon, window(), key=None)
    assert status == 401
    status, body = get(daemon, window(), key="wrong")
    assert status == 401
    conn = http.client.HTTPConnection(HOST, daemon.http_port, timeout=30)
    try:
        conn.request("POST", "/api/v1/events/message", body=b"{}",
                     headers={"Authorization": KEY, "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 405 and "use GET" in json.loads(r.read())["errors"][0]["description"]
    finally:
        conn.close()


def test_documentation_and_samples(daemon):
    status, body = get(daemon, "/api/v1/events/message/documentation")
    assert status == 200
    doc = body["results"]
    assert {"injection", "delivery", "delay", "bounce", "spam_complaint"} <= set(doc)
    assert doc["bounce"]["bounce_class"]["sampleValue"] == "10"
    assert doc["delivery"]["rcpt_to"]["description"]
    status, body = get(daemon, "/api/v1/events/message/samples?events=bounce,delay")
    assert status == 200
    assert [e["type"] for e in body["results"]] == ["bounce", "delay"]
    assert body["results"][0]["bounce_class"] == "10"
    status, body = get(daemon, "/api/v1/events/message/samples?events=nope")
    assert status == 400 and body["errors"][0]["description"].startswith("events:")


def test_npm_client_search_message(daemon):
    calls = [{"recipients": ["rcpt4@example.com"], "events": ["delivery", "bounce"],
              "from": iso_param(BASE), "to": iso_param(BASE + 1000), "per_page": 5},
             {"events": "explosion"}]
    r = subprocess.run(["node", os.path.join(JS, "events.js")], cwd=JS,
                       capture_output=True, timeout=60,
                       input=json.dumps({"origin": daemon.http_base, "key": KEY,
                                         "calls": calls}).encode())
    assert r.returncode == 0, r.stderr.decode()
    found, bad = json.loads(r.stdout)
    assert found["ok"], found
    body = found["body"]
    assert body["total_count"] == 12
    assert [e["event_id"] for e in body["results"]] == \
        [str(900_000 + i) for i in range(59, 30, -1) if i % 5 == 4][:5]
    assert "cursor=" in body["links"]["next"]
    assert bad["ok"] is False and bad["status"] == 400
    assert bad["errors"][0]["description"].startswith("events:")
