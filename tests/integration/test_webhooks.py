"""Webhooks against the real daemon: the /api/v1/webhooks API (raw HTTP and the npm
``sparkpost`` client), and batches pushed by the ``webhooks`` process to a receiver the
test starts on loopback (tests/webhooks/receiver.py).

Most delivery tests append events to the daemon's events store themselves
(``EventStore.append``, as the events process does) so that counts and ids are
known; ``test_mail_to_webhook_pipeline`` runs the whole way: mail injected over HTTP
and SMTP, delivered to (or refused by) a sink, recorded by the spool, turned into
SparkPost events by the events process, stored, and pushed by the webhooks process.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from daemon import HOST, wait_until

from mta.api import webhooks as W
from mta.feedback.events_store import EventStore

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "webhooks"))
from receiver import Receiver  # noqa: E402

KEY = "wh-key"
JS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "js-http")
TEST_ID = "77c2b630-d712-11e4-9642-efc2723b99c1"


def call(d, method: str, path: str, body=None, key: str = KEY):
    return d.api(method, path, body, key)


def child_pid(d, role: str) -> int | None:
    """The pid of the daemon's child with the title 'mta: <role>[0]' (None: none now)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if ppid == d.proc.pid and cmd.startswith(f"mta: {role}[0]".encode()):
            return int(pid)
    return None


def _events(n: int, start: int) -> list[dict]:
    now = str(int(time.time()))
    types = ["injection", "delivery", "bounce", "delay"]
    return [{"type": types[i % 4], "event_id": str(900_000 + i), "timestamp": now,
             "message_id": "%020x" % i, "rcpt_to": f"r{i}@example.com",
             "bounce_class": "10" if types[i % 4] == "bounce" else None}
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def rec():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def apid(make_module_daemon, rec):
    """A daemon with one [[webhook]] table, for the API tests."""
    return make_module_daemon(
        http={"api_keys": [KEY]},
        webhook=[{"name": "from-toml", "target": rec.url, "events": ["delivery"]}])


def _new(rec, **kw):
    doc = {"name": "crm", "target": rec.url, "events": ["delivery", "bounce"],
           "custom_headers": {"X-Tenant": "t1"}}
    doc.update(kw)
    return doc


def test_create_list_get_update_delete(apid, rec):
    before = len(rec.hits)
    st, body = call(apid, "POST", "/api/v1/webhooks", _new(rec))
    assert st == 200, body
    wid = body["results"]["id"]
    assert body["results"]["links"] == [{"href": f"/api/v1/webhooks/{wid}",
                                         "rel": "urn.msys.webhooks.webhook",
                                         "method": ["GET", "PUT"]}]
    test_post = rec.hits[before]               # the test POST reached the target
    assert test_post.headers["x-messagesystems-batch-id"] == TEST_ID
    assert test_post.json == [{"msys": {}}] and test_post.headers["x-tenant"] == "t1"
    st, body = call(apid, "GET", "/api/v1/webhooks?timezone=America/New_York")
    assert st == 200
    by_name = {w["name"]: w for w in body["results"]}
    w = by_name["crm"]
    assert w["id"] == wid and w["events"] == ["delivery", "bounce"] and w["active"] is True
    assert w["auth_type"] == "none" and w["auth_token"] == "" and \
        w["custom_headers"] == {"X-Tenant": "t1"}
    assert "last_successful" in w and "last_failure" in w
    toml = by_name["from-toml"]
    assert toml["read_only"] is True and toml["id"] == W.config_id("from-toml")
    st, body = call(apid, "GET", f"/api/v1/webhooks/{wid}")
    assert st == 200 and body["results"]["name"] == "crm"
    assert {link["rel"] for link in body["results"]["links"]} == \
        {"urn.msys.webhooks.validate", "urn.msys.webhooks.batches"}
    st, body = call(apid, "PUT", f"/api/v1/webhooks/{wid}", {"name": "crm2",
                                                              "events": ["bounce"]})
    assert st == 200 and body["results"]["id"] == wid
    st, body = call(apid, "GET", f"/api/v1/webhooks/{wid}")
    assert body["results"]["name"] == "crm2" and body["results"]["events"] == ["bounce"]
    st, body = call(apid, "DELETE", f"/api/v1/webhooks/{wid}")
    assert st == 204 and body == b""
    st, body = call(apid, "GET", f"/api/v1/webhooks/{wid}")
    assert st == 404 and body["errors"][0]["message"] == "resource not found"


def test_create_refused_when_the_target_fails(apid, rec):
    rec.status = 500
    try:
        st, body = call(apid, "POST", "/api/v1/webhooks", _new(rec, name="broken"))
    finally:
        rec.status = 200
    assert st == 400
    err = body["errors"][0]
    assert err["message"] == "Test POST to endpoint failed" and "target" in err["description"]
    assert err["response"]["status"] == 500
    st, body = call(apid, "GET", "/api/v1/webhooks")
    assert "broken" not in {w["name"] for w in body["results"]}


def test_update_tests_a_changed_target(apid, rec):
    st, body = call(apid, "POST", "/api/v1/webhooks", _new(rec, name="moving"))
    wid = body["results"]["id"]
    dead = "http://127.0.0.1:9/nothing-listens"
    st, body = call(apid, "PUT", f"/api/v1/webhooks/{wid}", {"target": dead})
    assert st == 400 and "target" in body["errors"][0]["description"]
    st, body = call(apid, "GET", f"/api/v1/webhooks/{wid}")
    assert body["results"]["target"] == rec.url          # unchanged
    call(apid, "DELETE", f"/api/v1/webhooks/{wid}")


@pytest.mark.parametrize("doc,field,status", [
    ({"target": "http://127.0.0.1:1/", "events": ["delivery"]}, "name", 422),
    ({"name": "x", "events": ["delivery"]}, "target", 422),
    ({"name": "x", "target": "ftp://127.0.0.1/", "events": ["delivery"]}, "target", 422),
    ({"name": "x", "target": "http://127.0.0.1:1/", "events": ["delivery", "nope"]},
     "events[1]", 422),
    ({"name": "x", "target": "http://127.0.0.1:1/", "events": []}, "events", 422),
    ({"name": "x", "target": "http://127.0.0.1:1/", "events": ["bounce"],
      "auth_type": "basic"}, "auth_credentials.username", 422),
    ({"name": "x", "target": "http://127.0.0.1:1/", "events": ["bounce"],
      "auth_type": "kerberos"}, "auth_type", 422),
    ({"name": "x", "target": "http://127.0.0.1:1/", "events": ["bounce"],
      "auth_type": "oauth2", "auth_request_details": {}}, "auth_request_details.url", 422),
    ({"name": "x", "target": "http://127.0.0.1:1/", "events": ["bounce"],
      "custom_headers": {"Content-Length": "1"}}, "custom_headers.Content-Length", 422),
])
def test_bad_input_names_the_field(apid, doc, field, status):
    st, body = call(apid, "POST", "/api/v1/webhooks", doc)
    assert st == status, body
    assert body["errors"][0]["description"].startswith(field), body


def test_bad_json_and_unknown_id(apid):
    st, body = call(apid, "POST", "/api/v1/webhooks", b"{not json")
    assert st == 400 and body["errors"][0]["code"] == "1300"
    st, body = call(apid, "GET", "/api/v1/webhooks/nope/batch-status")
    assert st == 404
    st, body = call(apid, "GET", "/api/v1/webhooks?timezone=Mars/Olympus")
    assert st == 422 and body["errors"][0]["description"].startswith("timezone")


def test_toml_webhook_is_read_only(apid):
    wid = W.config_id("from-toml")
    st, body = call(apid, "PUT", f"/api/v1/webhooks/{wid}", {"name": "x"})
    assert st == 403
    st, body = call(apid, "DELETE", f"/api/v1/webhooks/{wid}")
    assert st == 403
    st, body = call(apid, "GET", f"/api/v1/webhooks/{wid}")
    assert st == 200 and body["results"]["read_only"] is True


def test_validate_both_forms(apid, rec):
    st, body = call(apid, "POST", "/api/v1/webhooks", _new(rec, name="val"))
    wid = body["results"]["id"]
    n = len(rec.hits)
    st, body = call(apid, "POST", f"/api/v1/webhooks/{wid}/validate",
                    {"message": {"msys": {}}})
    assert st == 200, body
    assert body["results"]["msg"] == "Test POST to endpoint succeeded"
    assert body["results"]["response"]["status"] == 200 and \
        body["results"]["response"]["body"] == "OK"
    assert rec.hits[n].json == {"msys": {}}
    st, body = call(apid, "POST", f"/api/v1/webhooks/{wid}/validate", [{"msys": {}}])
    assert st == 200 and rec.hits[n + 1].json == [{"msys": {}}]
    rec.status = 503
    try:
        st, body = call(apid, "POST", f"/api/v1/webhooks/{wid}/validate", [{"msys": {}}])
    finally:
        rec.status = 200
    assert st == 400 and body["errors"][0]["response"]["status"] == 503
    call(apid, "DELETE", f"/api/v1/webhooks/{wid}")


def _draining(d) -> bool:
    st, _, raw = d.admin_get("/api/admin/drain")
    assert st == 200, raw[:300]
    return json.loads(raw)["draining"]


def _undrain(d) -> None:
    conn = http.client.HTTPConnection(HOST, d.admin_port, timeout=30)
    try:
        conn.request("DELETE", "/api/admin/drain")
        conn.getresponse().read()
    finally:
        conn.close()


def test_an_api_key_does_not_reach_the_admin_listener_through_a_webhook(apid, rec):
    """The admin listener on loopback asks no token; the webhooks' POSTs come from this
    node, so a webhook (or OAuth2 tokens URL) aimed at it would let any API key holder
    drain the node, suspend or bulk-bounce its queue (the create's test POST alone does
    it).  The node never connects there: create answers 400 and nothing is created."""
    assert not _draining(apid)
    drain = "http://{}:%d/api/admin/drain" % apid.admin_port
    creds = {"client_id": "cid", "client_secret": "secret",
             "grant_type": "client_credentials"}
    docs = [_new(rec, name="admin-1", target=drain.format(HOST)),
            _new(rec, name="admin-2", target=drain.format("0.0.0.0")),
            _new(rec, name="admin-3", target=drain.format("[::ffff:127.0.0.1]")),
            _new(rec, name="admin-4", auth_type="oauth2", auth_request_details={
                "url": drain.format(HOST), "body": creds})]
    try:
        for doc in docs:
            st, body = call(apid, "POST", "/api/v1/webhooks", doc)
            assert st == 400, (doc, body)
            assert "admin listener" in body["errors"][0]["description"], body
            assert not _draining(apid), doc
        # an existing webhook cannot be moved there either
        st, body = call(apid, "POST", "/api/v1/webhooks", _new(rec, name="admin-5"))
        assert st == 200, body
        wid = body["results"]["id"]
        st, body = call(apid, "PUT", f"/api/v1/webhooks/{wid}",
                        {"target": drain.format(HOST)})
        assert st == 400 and not _draining(apid), body
        call(apid, "DELETE", f"/api/v1/webhooks/{wid}")
    finally:
        _undrain(apid)
    st, body = call(apid, "GET", "/api/v1/webhooks")
    assert not {"admin-1", "admin-2", "admin-3", "admin-4"} & \
        {w["name"] for w in body["results"]}


def test_documentation_and_samples(apid):
    st, body = call(apid, "GET", "/api/v1/webhooks/events/documentation")
    assert st == 200
    bounce = body["results"]["message_event"]["events"]["bounce"]
    assert bounce["event"]["bounce_class"]["sampleValue"] == "1"
    st, body = call(apid, "GET", "/api/v1/webhooks/events/samples?events=bounce,delivery")
    assert st == 200
    assert [s["msys"]["message_event"]["type"] for s in body["results"]] == \
        ["bounce", "delivery"]
    st, body = call(apid, "GET", "/api/v1/webhooks/events/samples?events=nope")
    assert st == 422 and body["errors"][0]["description"].startswith("events")


def test_npm_client_webhooks_calls(apid, rec):
    req = {"origin": f"http://{HOST}:{apid.http_port}", "key": KEY, "calls": [
        ["create", {"name": "from node", "target": rec.url, "events": ["delivery"],
                    "auth_token": "abc"}],
        ["list", {"timezone": "UTC"}],
        ["get", "$id", {"timezone": "UTC"}],
        ["update", "$id", {"name": "from node 2", "events": ["delivery", "bounce"]}],
        ["validate", "$id", {"message": {"msys": {}}}],
        ["getBatchStatus", "$id", {"limit": 10}],
        ["getDocumentation"],
        ["getSamples", {"events": "delivery"}],
        ["delete", "$id"],
        ["get", "$id"],
    ]}
    r = subprocess.run(["node", os.path.join(JS, "webhooks.js")], cwd=JS,
                       input=json.dumps(req), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert all(x["ok"] for x in out[:9]), out
    create, lst, get, upd, val, status, doc, samples, delete, gone = out
    wid = create["body"]["results"]["id"]
    assert wid in {w["id"] for w in lst["body"]["results"]}
    assert get["body"]["results"]["name"] == "from node"
    assert upd["body"]["results"]["id"] == wid
    assert val["body"]["results"]["msg"] == "Test POST to endpoint succeeded"
    assert status["body"]["results"] == []
    assert "message_event" in doc["body"]["results"]
    assert samples["body"]["results"][0]["msys"]["message_event"]["type"] == "delivery"
    assert gone["ok"] is False and gone["status"] == 404


# ---------------------------------------------------------------- delivery

@pytest.fixture
def pushd(make_daemon):
    """A daemon with a webhook for every message event type, fast retries."""
    r = Receiver()
    d = make_daemon(webhooks={"time_scale": 0.01, "retry_schedule": [50.0, 100.0, 100.0,
                                                                      100.0, 100.0],
                              "poll_interval": 0.1, "batch_size": 25},
                    webhook=[{"name": "all", "target": r.url,
                              "events": ["injection", "delivery", "bounce", "delay"],
                              "auth_type": "basic",
                              "auth_credentials": {"username": "hook", "password": "pw"}}])
    store = EventStore(os.path.join(d.state_dir, "events"), map_size=256 << 20,
                       retention=86400)
    yield d, r, store
    store.close()
    r.close()


def _received_ids(r: Receiver) -> set:
    return {e["event_id"] for e in r.events()}


def test_events_pushed_in_sparkpost_batches(pushd):
    d, r, store = pushd
    evs = _events(120, 0)
    store.append(evs)
    store.sync()
    want = {e["event_id"] for e in evs}
    r.wait(lambda rr: want <= _received_ids(rr), 60, "every event")
    for h in r.batches():
        assert h.headers["authorization"] == "Basic aG9vazpwdw=="
        assert h.headers["user-agent"] == "SparkPost"
        assert 1 <= len(h.json) <= 25
        for el in h.json:
            ev = el["msys"]["message_event"]
            assert ev["type"] in ("injection", "delivery", "bounce", "delay")
    status = json.load(open(os.path.join(d.state_dir, "webhooks", "status.json")))
    assert status["webhooks"][0]["name"] == "all"
    wait_until(lambda: json.load(open(os.path.join(d.state_dir, "webhooks", "status.json")))
               ["min_seq"] == 121, 10, "min_seq past the sent events")


def test_failing_endpoint_then_ok_keeps_batch_ids(pushd):
    d, r, store = pushd
    r.status = 500
    evs = _events(60, 1000)
    store.append(evs)
    store.sync()
    r.wait(lambda rr: len({h.headers["x-messagesystems-batch-id"] for h in rr.hits
                           if h.status == 500}) >= 3, 60, "failed batches")
    failed = {h.headers["x-messagesystems-batch-id"]: h.body for h in r.hits
              if h.status == 500}
    r.status = 200
    want = {e["event_id"] for e in evs}
    r.wait(lambda rr: want <= _received_ids(rr), 60, "every event after the failures")
    ok = {h.headers["x-messagesystems-batch-id"]: h.body for h in r.batches()}
    for bid, body in failed.items():
        assert ok.get(bid) == body, "a failed batch came back with another id or body"
    # the batches that failed are listed by batch-status (the API on the acceptor)
    def listed():
        st, body = call(d, "GET", f"/api/v1/webhooks/{W.config_id('all')}/batch-status",
                        key="")
        assert st == 200
        rows = {row["batch_id"]: row for row in body["results"]}
        # (the sender records the 200 just after the receiver has answered it)
        done = set(failed) <= set(rows) and all(
            rows[b]["attempts"] >= 2 and rows[b]["response_code"] == "200" for b in failed)
        return rows if done else None
    wait_until(listed, 10, "batch-status listing the failed batches as delivered")

    # /metrics shows the webhook's figures (pushed by the webhooks process)
    def figures():
        conn = http.client.HTTPConnection(HOST, d.admin_port, timeout=30)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        got = {}
        for name in ("backlog_events", "pending_batches", "events_sent_total",
                     "failed_attempts_total", "dropped_events_total"):
            m = re.search(rf'^mta_webhook_{name}{{webhook="all"}} ([0-9.e+]+)$', text, re.M)
            got[name] = float(m.group(1)) if m else None
        return got if got["events_sent_total"] and got["events_sent_total"] >= 60 and \
            got["backlog_events"] == 0 and got["pending_batches"] == 0 else None
    got = wait_until(figures, 15, "the webhook's figures in /metrics")
    assert got["failed_attempts_total"] >= 3 and got["dropped_events_total"] == 0, got


def test_kill9_of_the_webhooks_process_loses_nothing(pushd):
    d, r, store = pushd
    want = set()
    for i in range(6):
        evs = _events(50, 5000 + 50 * i)
        want |= {e["event_id"] for e in evs}
        store.append(evs)
        store.sync()
        if i in (1, 3):
            pid = wait_until(lambda: child_pid(d, "webhooks"), 30, "the webhooks child")
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda old=pid: child_pid(d, "webhooks") not in (None, old), 30,
                       "webhooks restarted")
    r.wait(lambda rr: want <= _received_ids(rr), 90, "every event across kill -9")


def test_mail_to_webhook_pipeline(make_daemon):
    """Real mail -> spool -> delivery -> events process -> store -> webhooks process ->
    the receiver, for a mixed load: delivered, deferred then delivered, refused 550 5.1.1,
    suppressed (an injection and a class-25 bounce, never at the sink): every event of
    the event log reaches the webhook in SparkPost's batch shape, each event_id once."""
    from daemon import free_port
    from sinks import AioSink

    deferred_once = set()

    def rcpt(sink, address, mail_from):
        if address.startswith("unknown"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if address.startswith("later") and address not in deferred_once:
            deferred_once.add(address)
            return "451 4.3.0 <%s>: try again later" % address
        return None
    sink = AioSink(HOST, free_port(), rcpt=rcpt).start()
    r = Receiver()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        webhooks={"poll_interval": 0.1},
                        webhook=[{"name": "crm", "target": r.url,
                                  "events": ["injection", "delivery", "bounce", "delay"]}],
                        delivery={"hold": False, "time_scale": 0.01,
                                  "route": [{"domain": "*", "starttls": "none",
                                             "hosts": [f"{HOST}:{sink.port}"]}]})
        st, _ = call(d, "PUT", "/api/v1/suppression-list/blocked@example.com",
                     {"type": "non_transactional", "description": "asked to stop"})
        assert st == 200
        st, _, body = d.post({"campaign_id": "hooked",
                              "recipients": [{"address": "ok@example.com"},
                                             {"address": "unknown@example.com"},
                                             {"address": "later@example.com"},
                                             {"address": "blocked@example.com"}],
                              "content": {"from": "news@sender.example.org",
                                          "subject": "Hooked", "text": "hello"}},
                             headers={"Authorization": KEY})
        assert st == 200, body
        tid = body["results"]["id"]
        d.send("news@sender.example.org", ["smtp@example.com"],
               b"From: news@sender.example.org\r\nTo: smtp@example.com\r\n"
               b"Subject: Over SMTP\r\n\r\nhello\r\n")
        want = {("injection", "ok@example.com"), ("delivery", "ok@example.com"),
                ("injection", "unknown@example.com"), ("bounce", "unknown@example.com"),
                ("injection", "later@example.com"), ("delay", "later@example.com"),
                ("delivery", "later@example.com"),
                ("injection", "blocked@example.com"), ("bounce", "blocked@example.com"),
                ("injection", "smtp@example.com"), ("delivery", "smtp@example.com")}

        def got(rr):
            return {(e["type"], e["rcpt_to"]) for e in rr.events()}
        r.wait(lambda rr: want <= got(rr), 60, "the eleven events at the webhook")
        # exactly what the event log has: every event of the log, no other -- once the
        # log is complete (the queue empty and every injection's recipient with its
        # end: the bounce of unknown@ has a DSN of its own, injected and delivered)
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 30, "an empty queue")

        def complete():
            evs = d.events()
            ends = {(e.get("queue_id"), e.get("raw_rcpt_to")) for e in evs
                    if e["type"] in ("delivery", "bounce")}
            started = {(e.get("queue_id"), e.get("raw_rcpt_to")) for e in evs
                       if e["type"] == "injection"}
            return {e["event_id"] for e in evs} \
                if len(evs) >= len(want) and started <= ends else None
        log_ids = wait_until(complete, 20, "the event log")
        r.wait(lambda rr: log_ids <= {e["event_id"] for e in rr.events()}, 30,
               "every event of the log at the webhook")
        assert {e["event_id"] for e in r.events()} == log_ids
        blocked = [e for e in r.events() if e["rcpt_to"] == "blocked@example.com"
                   and e["type"] == "bounce"][0]
        assert blocked["bounce_class"] == "25", blocked
        assert not [t for t in sink.snapshot() if "blocked@example.com" in t.rcpt_tos]
        sink.wait_for("ok@example.com")
        evs = r.events()
        by = {(e["type"], e["rcpt_to"]): e for e in evs}
        assert by[("delivery", "ok@example.com")]["transmission_id"] == tid
        assert by[("delivery", "ok@example.com")]["campaign_id"] == "hooked"
        bounce = by[("bounce", "unknown@example.com")]
        assert bounce["bounce_class"] == "10" and bounce["error_code"] == "550", bounce
        assert {e["type"] for e in evs} <= {"injection", "delivery", "bounce", "delay"}
        for h in r.batches():
            assert h.headers["x-messagesystems-batch-id"]
            assert all(set(el) == {"msys"} and set(el["msys"]) == {"message_event"}
                       for el in h.json)
        # each event_id once: nothing was retried, so no duplicate either
        ids = [e["event_id"] for e in evs]
        assert len(ids) == len(set(ids)), ids
    finally:
        r.close()
        sink.stop()


def test_mta_queue_shows_each_webhooks_backlog(make_daemon):
    """`mta queue` (and --json), `mta queue summary` and /api/admin/queue: per webhook the
    events not yet delivered, the backlog bound, and that it is retrying while its target
    fails; back to nothing undelivered once the target answers again."""
    r = Receiver()
    r.status = 500
    try:
        d = make_daemon(acceptors=1, shards=1,
                        webhooks={"poll_interval": 0.1, "time_scale": 0.01,
                                  "max_backlog_events": 5000},
                        webhook=[{"name": "crm", "target": r.url, "events": ["injection"]}])
        for i in range(3):
            d.send("news@example.org", [f"r{i}@example.net"],
                   b"From: news@example.org\r\nSubject: s\r\n\r\nbody\r\n")

        def crm(view):
            hooks = [w for w in view["webhooks"]["webhooks"] if w["name"] == "crm"]
            return hooks[0] if hooks else None

        # (status.json is rewritten once a second: a copy taken after the first 500 but
        # before all three events were scanned shows "retrying" with fewer; wait for the
        # whole state, which holds while the target keeps answering 500)
        w = wait_until(lambda: (lambda x: x if x and x["state"] == "retrying" and
                                x["undelivered_events"] == 3 and x["backlog_events"] == 0
                                else None)(crm(d.queue_summary())), 30,
                       "the webhook retrying with all 3 events in mta queue --json")
        assert w["undelivered_events"] == 3 and w["max_backlog_events"] == 5000
        assert w["retrying_batches"] >= 1 and w["last_failure"]["response"] == "HTTP 500"
        text = d.cli("queue").stdout.decode()
        row = [x for x in text.splitlines() if x.startswith("crm ")]
        assert row and row[0].split()[1:5] == ["3", "0", "5000", "0%"], text
        assert "retrying" in row[0] and "HTTP 500" in row[0]
        assert "WEBHOOK" in d.cli("queue", "summary").stdout.decode()
        st, _, body = d.admin_get("/api/admin/queue")
        assert st == 200 and crm(json.loads(body))["undelivered_events"] == 3
        r.status = 200
        w = wait_until(lambda: (lambda x: x if x and x["state"] == "ok" and
                                x["undelivered_events"] == 0 else None)(
            crm(d.queue_summary())), 30, "the backlog delivered")
        assert {e["rcpt_to"] for e in r.events()} == {f"r{i}@example.net" for i in range(3)}
    finally:
        r.close()


def _api_events(d, rcpt: str) -> list[dict]:
    """The events API's events of *rcpt* (from an hour ago to an hour ahead: its default
    ``to`` is one minute ago)."""
    import urllib.parse

    from test_events_api import iso_param
    now = time.time()
    q = urllib.parse.urlencode({"recipients": rcpt, "from": iso_param(now - 3600),
                                "to": iso_param(now + 3600)})
    conn = http.client.HTTPConnection(HOST, d.http_port, timeout=30)
    try:
        conn.request("GET", "/api/v1/events/message?" + q, headers={"Authorization": KEY})
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200, body
    return body["results"]


def _mail(d, rcpt: str) -> None:
    d.send("news@example.org", [rcpt],
           b"From: news@example.org\r\nTo: " + rcpt.encode() + b"\r\nSubject: s\r\n\r\nbody\r\n")


def test_a_store_set_aside_is_read_anew_by_webhooks_and_the_events_api(make_daemon):
    """The events process sets a damaged store aside and makes a new one at the same path
    (mta.events.main.set_aside); the webhooks process and the acceptors, which hold the
    store open, must notice and read the new one -- without a restart of theirs.  They
    used to keep the old, renamed environment: the webhook got no event again and the
    events API answered from the old store until those processes restarted."""
    r = Receiver()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        webhooks={"poll_interval": 0.1},
                        webhook=[{"name": "crm", "target": r.url, "events": ["injection"]}])

        def at_hook(rcpt):
            return [e for e in r.events() if e["rcpt_to"] == rcpt]
        _mail(d, "before@example.net")
        r.wait(lambda rr: at_hook("before@example.net"), 30, "the first injection")
        assert len(wait_until(lambda: _api_events(d, "before@example.net"), 30,
                              "the first injection in the events API")) == 1
        kids = d.children()
        readers = {k: v for k, v in kids.items()
                   if k.startswith(("webhooks", "acceptor", "http"))}
        assert "webhooks[0]" in readers, kids
        # A power cut's damage, as tests/events/test_events_store.py makes it: data.mdb
        # zeros.  (Put in by a rename while the events process is stopped, so that the
        # readers' maps of the old file stay whole; then the events process dies and is
        # started again by the supervisor, which finds the damage at its open.)
        old = kids["events[0]"]
        path = os.path.join(d.state_dir, "events")
        os.kill(old, signal.SIGSTOP)
        try:
            with open(os.path.join(path, "data.mdb.tmp"), "wb") as fh:
                fh.write(bytes(8192))
            os.replace(os.path.join(path, "data.mdb.tmp"), os.path.join(path, "data.mdb"))
        finally:
            os.kill(old, signal.SIGKILL)
        d.wait_restarted("events[0]", old, timeout=30)
        d.wait_log(r"set aside as .*events\.damaged-", timeout=30)
        assert [n for n in os.listdir(d.state_dir) if n.startswith("events.damaged-")]
        _mail(d, "after@example.net")
        r.wait(lambda rr: at_hook("after@example.net"), 30,
               "the injection stored in the new store at the webhook")
        got = wait_until(lambda: _api_events(d, "after@example.net"), 30,
                         "the injection stored in the new store in the events API")
        assert [e["type"] for e in got] == ["injection"]
        assert len(at_hook("after@example.net")) == 1
        # neither reader was restarted for it
        now = d.children()
        assert {k: now.get(k) for k in readers} == readers, (readers, now)
    finally:
        r.close()


def test_a_webhook_made_active_again_does_not_send_what_happened_while_inactive(make_daemon):
    """``active: false`` means "do not send me these" (the reference says nothing of what
    SparkPost does with them): events that happen while a webhook is inactive are not sent
    when a PUT makes it active again; the events after that are.  It used to resume from
    its old cursor and send the whole backlog of its inactive time."""
    r = Receiver()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        webhooks={"poll_interval": 0.1})
        st, body = call(d, "POST", "/api/v1/webhooks",
                        {"name": "crm", "target": r.url, "events": ["injection"]})
        assert st == 200, body
        wid = body["results"]["id"]

        def at_hook(rcpt):
            return [e for e in r.events() if e["rcpt_to"] == rcpt]
        _mail(d, "first@example.net")
        r.wait(lambda rr: at_hook("first@example.net"), 30, "the first injection")
        st, _ = call(d, "PUT", f"/api/v1/webhooks/{wid}", {"active": False})
        assert st == 200
        d.wait_log(r"webhook crm \(.*\): removed or inactive", timeout=30)
        _mail(d, "while@example.net")
        _mail(d, "while2@example.net")
        wait_until(lambda: _api_events(d, "while2@example.net"), 30,
                   "the inactive time's injections stored")
        time.sleep(2.2)           # (event times are whole seconds)
        st, _ = call(d, "PUT", f"/api/v1/webhooks/{wid}", {"active": True})
        assert st == 200
        st, body = call(d, "GET", f"/api/v1/webhooks/{wid}")
        assert body["results"]["active"] is True
        _mail(d, "after@example.net")
        # (a sender reads in seq order: an event of the inactive time would come before)
        r.wait(lambda rr: at_hook("after@example.net"), 30, "the injection after re-activation")
        assert {e["rcpt_to"] for e in r.events()} == {"first@example.net", "after@example.net"}
    finally:
        r.close()


def test_a_config_webhook_made_active_does_not_send_what_happened_while_inactive(make_daemon):
    """The same for a [[webhook]] table: ``active = false`` in the configuration, mail sent,
    then the daemon restarted with ``active = true``: the events of its inactive time are
    not sent (they used to be: the webhook started at its first sight, while inactive)."""
    r = Receiver()
    try:
        hook = {"name": "crm", "target": r.url, "events": ["injection"], "active": False}
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        webhooks={"poll_interval": 0.1}, webhook=[hook])
        _mail(d, "while@example.net")
        wait_until(lambda: _api_events(d, "while@example.net"), 30,
                   "the inactive time's injection stored")
        assert d.stop() == 0
        time.sleep(2.2)           # (event times are whole seconds)
        d.sections["webhook"] = [dict(hook, active=True)]
        d.write_config()
        d.start()
        _mail(d, "after@example.net")
        r.wait(lambda rr: [e for e in rr.events() if e["rcpt_to"] == "after@example.net"], 30,
               "the injection after the webhook was made active")
        assert {e["rcpt_to"] for e in r.events()} == {"after@example.net"}
    finally:
        r.close()


@pytest.mark.parametrize("sections,key", [
    ({"webhooks": {"enabled": False}}, "[webhooks] enabled"),
    ({"events": {"store": False}}, "[events] store"),
])
def test_no_webhook_is_taken_when_none_can_be_sent(make_daemon, rec, sections, key):
    """With the webhooks process off, or no events store for it to read, a webhook made
    through the API would get 200 and never a batch: the API answers 404 naming the key,
    as the events API does without its store, and the receiver is not even tested."""
    d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]}, **sections)
    before = len(rec.hits)
    for method, path, body in (("POST", "/api/v1/webhooks", _new(rec)),
                               ("PUT", f"/api/v1/webhooks/{TEST_ID}", {"name": "x"})):
        st, got = call(d, method, path, body)
        assert st == 404 and key in got["errors"][0]["description"], (method, st, got)
    assert len(rec.hits) == before
    # the webhooks there are may still be listed (and deleted) while none is sent
    st, got = call(d, "GET", "/api/v1/webhooks")
    assert st == 200 and got["results"] == [], got


@pytest.mark.parametrize("sections,key", [
    ({"webhooks": {"enabled": False}}, "[webhooks] enabled = false"),
    ({"events": {"store": False}}, "[events] store = false"),
])
def test_webhook_tables_that_cannot_be_sent_are_named_at_start_and_reload(make_daemon, rec,
                                                                          sections, key):
    """[[webhook]] tables while no batch can go (the webhooks process off, or no events
    store for it to read) are kept -- an operator may turn webhooks off for a while --
    but the log says at the start and at each reload that they are not sent (with the
    webhooks process off, nothing at all said so)."""
    d = make_daemon(acceptors=1, shards=1,
                    webhook=[{"name": "crm", "target": rec.url, "events": ["delivery"]}],
                    **sections)
    said = re.escape(f"1 [[webhook]] table(s) are not sent: {key}")
    d.wait_log(said)
    d.reload()
    d.wait_log(said, count=2)


DNS_JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webhook_dns_job.py")


def test_target_names_that_the_dns_never_answers_do_not_hold_up_another_webhook(tmp_path):
    """Target names are looked up through the node's own DNS resolver ([delivery]
    nameservers, dns_timeout) on the event loop.  Through aiohttp's default,
    getaddrinfo in libuv's 4 threads, five webhooks whose names never got an answer held
    every thread for the system resolver's timeout (10 s): the one webhook whose name
    answers at once had no batch after 15 s; and the names went to the machine's
    resolver, not the node's.  In a private network and mount namespace
    (webhook_dns_job.py), where /etc/resolv.conf names a loopback stand-in."""
    from dkimtools.verifiers import netns

    r = subprocess.run(netns() + [sys.executable, DNS_JOB, str(tmp_path / "job")],
                       capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-4000:]
    out = json.loads(r.stdout)
    log = out["log"]
    assert out["good_seconds"] is not None and out["good_seconds"] < 3.0, \
        (out["good_seconds"], log[-4000:])
    ((event,),) = out["good_hits"]
    assert event["msys"]["message_event"]["event_id"] == "700100"
    assert out["other_hits"] == []          # nothing reached a silent name's port
    assert out["system_queries"] == []      # the machine's resolver is never asked
    assert ["good.hooks.test", "A"] in out["node_queries"]
    assert ["silent-4.hooks.test", "A"] in out["node_queries"]
    # each silent webhook's POST failed as a connection failure naming the DNS timeout,
    # and is retried on the schedule
    for i in range(5):
        assert re.search(rf"webhook silent-{i}: batch \S+ attempt 1 got connection "
                         rf"\(Cannot connect to host silent-{i}\.hooks\.test:\d+ ssl:default "
                         rf"\[DNS lookup failed: silent-{i}\.hooks\.test A: timed out after "
                         r"1s.*\]\); next attempt in", log), log[-4000:]
    assert "Traceback" not in log
