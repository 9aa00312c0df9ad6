"""Transmissions that cost much work for their size: the work is bounded per
message, and one request does not hold the acceptor's event loop for the others."""
from __future__ import annotations

import itertools
import json
import socket
import string
import threading
import time

import pytest

from daemon import HOST, wait_until

from mta.api import build
from mta.api import replies as R

KEY = "test-key-1"
AUTH = {"Authorization": KEY}


@pytest.fixture(scope="module")
def api(make_module_daemon):
    """One held daemon, one acceptor: every connection shares its event loop."""
    return make_module_daemon(subdir="heavy", acceptors=1, shards=1, http={"api_keys": [KEY]})


def looping_headers(n_headers: int, items: int, rcpts: int = 1, loops: int = 1) -> bytes:
    """*n_headers* header fields, each *loops* {{ each }} over *items* items that render
    nothing: little to send, *n_headers* x *loops* x *items* loop steps per recipient."""
    return json.dumps({"recipients": [{"address": f"r{i}@example.net"} for i in range(rcpts)],
            "content": {"from": "a@example.com", "subject": "s", "text": "t",
                        "headers": {f"X-H{i}": "{{each a}}{{end}}" * loops
                                    for i in range(n_headers)}},
            "substitution_data": {"a": [0] * items}}, separators=(",", ":")).encode()


def while_posting(api, body, probe, count: int | None = None, settle: float = 0.0):
    """POST *body* in a thread and time calls of *probe* meanwhile: *count* of them after
    *settle* seconds, or (None) as many as fit while the POST runs (at least one, at most
    50, 10 s).  Returns (the POST's reply, the seconds it took, each probe's seconds)."""
    out = {}

    def run():
        t = time.monotonic()
        out["reply"] = api.post(body, headers=AUTH, timeout=120)
        out["took"] = time.monotonic() - t

    th = threading.Thread(target=run)
    th.start()
    waits = []
    try:
        time.sleep(settle)
        end = time.monotonic() + 10
        while len(waits) < count if count is not None else \
                (th.is_alive() or not waits) and time.monotonic() < end and len(waits) < 50:
            t = time.monotonic()
            probe(len(waits))
            waits.append(time.monotonic() - t)
    finally:
        th.join(120)
    return out["reply"], out["took"], waits


def light_post(api):
    """A probe: a one-recipient transmission, answered 200."""
    def probe(i: int) -> None:
        st, _, res = api.post({"recipients": [{"address": f"light{i}@example.net"}],
                               "content": {"from": "a@example.com", "subject": "s",
                                           "text": "t"}}, headers=AUTH)
        assert st == 200, res
    return probe


def smtp_greeting(api):
    """A probe: an SMTP connection's banner, EHLO and QUIT."""
    def probe(i: int) -> None:
        with api.connect(timeout=30) as c:
            assert c.banner[0] == 220
            assert c.cmd("EHLO probe.test")[0] == 250
            c.cmd("QUIT")
    return probe


def test_loop_steps_are_bounded_per_message_not_per_text(api):
    # 60 fields of 40,000 steps each: each text under MAX_LOOP_STEPS, the message
    # 2.4 million (seconds of CPU on the event loop for a 100 KB request)
    assert 40_000 < build.MAX_LOOP_STEPS < 60 * 40_000
    st, _, res = api.post(looping_headers(60, 40_000), headers=AUTH)
    assert st == 422, res
    assert res["errors"][0]["code"] == R.INVALID.code
    assert "{{ each }} loops would render more than" in res["errors"][0]["description"]
    # within the bound across its texts, a message is built
    st, _, res = api.post(looping_headers(2, 40_000), headers=AUTH)
    assert st == 200, res
    assert res["results"]["total_accepted_recipients"] == 1


def test_a_costly_transmission_does_not_stall_other_clients(api):
    # 96 recipients of 90,000 steps each (within the bound): seconds of building,
    # which must leave the loop to the other connections between recipients
    assert 90_000 <= build.MAX_LOOP_STEPS
    heavy = looping_headers(1, 45_000, rcpts=96, loops=2)
    # (after 0.3 s the heavy request is being built)
    (st, _, res), took, waits = while_posting(api, heavy, light_post(api), 3, 0.3)
    assert st == 200, res
    assert res["results"]["total_accepted_recipients"] == 96
    # the heavy one took seconds; a light one waits for at most a slice of it
    assert took > 1.0, took
    assert max(waits) < min(0.6, took / 2), (waits, took)


def heavy_html(n: int) -> str:
    """*n* substitutions, each a value of its own (four letters), one a line: a template
    whose compile takes seconds.  (The same value n times would not: a value's compiled
    form is kept for the next, mta.api.build._value.)"""
    names = itertools.islice(itertools.product(string.ascii_letters, repeat=4), n)
    return "".join("{{%s}}\n" % "".join(name) for name in names)


def test_a_large_template_is_compiled_without_stalling_other_clients(api):
    # 3.4 MB of html, 375,000 substitutions: compiled once per request, which takes
    # seconds; the acceptor's other connections are answered meanwhile
    heavy = json.dumps({"recipients": [{"address": "big@example.net"}],
                        "content": {"from": "a@example.com", "subject": "s",
                                    "html": heavy_html(375_000)},
                        "substitution_data": {"a": "b"}}).encode()
    # (after 0.3 s the heavy request is being compiled)
    (st, _, res), took, waits = while_posting(api, heavy, light_post(api), 3, 0.3)
    assert st == 200, res
    assert res["results"]["total_accepted_recipients"] == 1
    assert took > 1.0, took
    assert max(waits) < min(0.6, took / 2), (waits, took)
    # an error found off the loop is answered as one found on it, and the
    # connection goes on
    bad = json.dumps({"recipients": [{"address": "big@example.net"}],
                      "content": {"from": "a@example.com", "subject": "s",
                                  "html": "{{a}} x\n" * 20_000 + "{{ if }}"}}).encode()
    st, _, res = api.post(bad, headers=AUTH)
    assert st == 422, res
    assert "content.html" in res["errors"][0]["description"], res


def request_bytes(body: bytes) -> bytes:
    return (f"POST /api/v1/transmissions HTTP/1.1\r\nHost: mta.test\r\n"
            f"Content-Type: application/json\r\nAuthorization: {KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_requests_read_ahead_on_a_connection_are_bounded_in_octets(api):
    # behind a request that takes seconds, 15 pipelined bodies of 4 MB: read ahead
    # up to MAX_QUEUED requests, the acceptor would hold 60 MB for one connection
    first = json.dumps({"recipients": [{"address": "big@example.net"}],
                        "content": {"from": "a@example.com", "subject": "s",
                                    "html": heavy_html(375_000)},
                        "substitution_data": {"a": "b"}}).encode()
    pad = json.dumps({"recipients": [{"address": "pad@example.net"}],
                      "content": {"from": "a@example.com", "subject": "s",
                                  "text": "x" * (4 << 20)}}).encode()
    data = request_bytes(first) + request_bytes(pad) * 15
    s = socket.create_connection((HOST, api.http_port))
    sent = [0]

    def send():
        view = memoryview(data)
        try:
            while sent[0] < len(data):
                sent[0] += s.send(view[sent[0]:sent[0] + 65536])
        except OSError:
            pass

    th = threading.Thread(target=send, daemon=True)
    try:
        th.start()
        time.sleep(1.0)     # (the first request is still being compiled)
        ahead = sent[0]
        f = s.makefile("rb")
        s.settimeout(60)
        statuses = []
        for _ in range(16):
            line = f.readline()
            statuses.append(int(line.split()[1]))
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
        th.join(30)
    finally:
        s.close()
    assert statuses == [200] * 16
    # what the socket buffers take, and a few MB: not the 60 MB
    assert ahead < 30 << 20, ahead


def dynamic_refs(refs: int, pieces: int) -> dict:
    return {"recipients": [{"address": "dyn@example.net"}],
            "content": {"from": "a@example.com", "subject": "s",
                        "html": "{{render_dynamic_content(dynamic_html.a)}}" * refs},
            "substitution_data": {"dynamic_html": {"a": "{{x}}" * pieces}, "x": ""}}


def test_dynamic_content_work_is_bounded_per_message(api):
    # an 18 KB request: 200 references to a chunk of 2,000 substitutions, each
    # compiled and rendered anew (1 s of the loop a recipient, 10,000 recipients)
    t = time.monotonic()
    st, _, res = api.post(dynamic_refs(200, 2000), headers=AUTH)
    took = time.monotonic() - t
    assert st == 422, res
    assert "loops would render more than" in res["errors"][0]["description"], res
    assert took < 0.5, took
    st, _, res = api.post(dynamic_refs(20, 2000), headers=AUTH)
    assert st == 200, res


def test_a_header_field_substituted_to_megabytes_is_refused_naming_it(api):
    # a 10 KB request: a Subject of 50 references to a 90 KB value, 4.5 MB to fold
    # (0.4 s of the loop a recipient; 500 references: 46 MB, 4 s)
    body = {"recipients": [{"address": "subj@example.net"}],
            "content": {"from": "a@example.com", "subject": "{{v}}" * 50, "text": "t"},
            "substitution_data": {"v": "y " * 45_000}}
    t = time.monotonic()
    st, _, res = api.post(body, headers=AUTH)
    took = time.monotonic() - t
    assert st == 422, res
    d = res["errors"][0]["description"]
    assert "content.subject" in d and str(build.MAX_FIELD_VALUE) in d, res
    assert took < 0.3, took
    # a long one within the bound goes out
    body["content"]["subject"] = "{{v}}"
    st, _, res = api.post(body, headers=AUTH)
    assert st == 200, res


def test_a_recipient_whose_message_passes_the_size_bound_is_stopped_as_it_is_rendered(api):
    # a 190 KB request: two recipients' value of 30,000 "€" (90 KB) substituted 600
    # times -- 18 million characters, within http.max_message_size (50 MiB) counted in
    # characters; 54 MB in UTF-8, 162 MB as quoted-printable, built on the acceptor's
    # loop before its size was seen.  Rendering stops at the bound: those recipients are
    # generation_failures, the others of the request are queued, and an SMTP client of
    # the same acceptor is answered meanwhile.
    body = {"recipients": [{"address": "fit0@example.net"},
                           {"address": "huge@example.net",
                            "substitution_data": {"v": "€" * 30_000}},
                           {"address": "huge2@example.net",
                            "substitution_data": {"v": "€" * 30_000}},
                           {"address": "fit3@example.net"}],
            "content": {"from": "a@example.com", "subject": "s", "text": "{{{v}}}" * 600},
            "substitution_data": {"v": "fits "}}
    (st, _, res), took, waits = while_posting(api, body, smtp_greeting(api))
    assert st == 200, res
    r = res["results"]
    assert (r["total_accepted_recipients"], r["total_rejected_recipients"]) == (2, 2), res
    for i, err in enumerate(r["rcpt_to_errors"], 1):
        assert err["code"] == R.RCPT_INVALID.code, err
        assert err["description"].startswith(f"recipients[{i}]: the message would be larger "
                                             f"than {50 * 1024 * 1024} octets "
                                             "(http.max_message_size)"), err
    assert took < 1.0, took
    assert max(waits) < 0.5, waits
    # the event of the refused one, the messages of the others
    want = {("generation_failure", "huge@example.net"),
            ("generation_failure", "huge2@example.net"), ("injection", "fit0@example.net"),
            ("injection", "fit3@example.net")}
    wait_until(lambda: want <= {(e["type"], e["raw_rcpt_to"]) for e in api.events()}, 20,
               "the events of the request")
    queued = [m["recipients"] for m in api.queue_list()
              if m["recipients"][0] in ("fit0@example.net", "fit3@example.net")]
    assert sorted(queued) == [["fit0@example.net"], ["fit3@example.net"]], queued


def test_many_header_fields_substituted_to_megabytes_are_refused_as_they_are_built(api):
    # a 90 KB request: 2,000 header fields of a 50 KB value, each within the bound of
    # a field -- 100 MB of fields folded (9 s of the loop) before the message's size
    # was seen; the header block's bound stops it after 1 MB
    body = {"recipients": [{"address": "hdrs@example.net"}],
            "content": {"from": "a@example.com", "subject": "s", "text": "t",
                        "headers": {f"X-H{k}": "{{v}}" for k in range(2000)}},
            "substitution_data": {"v": "y " * 25_000}}
    t = time.monotonic()
    st, _, res = api.post(body, headers=AUTH, timeout=120)
    took = time.monotonic() - t
    assert st == 422, res
    d = res["errors"][0]["description"]
    assert "content.headers" in d and str(build.MAX_HEADER_BLOCK) in d, res
    assert took < 1.0, took


def test_the_header_bounds_lowered_in_the_config_refuse_at_their_new_size(make_daemon):
    # http.max_header_field_length and max_header_block_size, once constants of
    # mta.api.build: a daemon started with them lowered refuses at the values it was
    # given, naming the field, the bound and its key; within them the mail is queued
    d = make_daemon(subdir="bounds", acceptors=1, shards=1,
                    http={"api_keys": [KEY], "max_header_field_length": 5000,
                          "max_header_block_size": 20_000})
    base = {"recipients": [{"address": "b@example.net"}],
            "content": {"from": "a@example.com", "subject": "s", "text": "t"}}
    st, _, res = d.post({**base, "content": {**base["content"], "subject": "x" * 5001}},
                        headers=AUTH)
    assert st == 422, res
    assert res["errors"][0]["description"].endswith(
        "recipients[0]: content.subject would be longer than 5000 characters "
        "(http.max_header_field_length)"), res
    headers = {f"X-H{k}": "v " * 2000 for k in range(6)}       # 6 x ~4 KB: within 5000 each
    st, _, res = d.post({**base, "content": {**base["content"], "headers": headers}},
                        headers=AUTH)
    assert st == 422, res
    assert res["errors"][0]["description"].endswith(
        "recipients[0]: content.headers would make the header fields longer than 20000 "
        "octets (http.max_header_block_size)"), res
    # within them: a Subject at the bound, half of the fields
    for i, content in enumerate(({"subject": "x" * 5000},
                                 {"headers": dict(list(headers.items())[:3])})):
        body = {"recipients": [{"address": f"ok{i}@example.net"}],
                "content": {**base["content"], **content}}
        st, _, res = d.post(body, headers=AUTH)
        assert st == 200 and res["results"]["total_accepted_recipients"] == 1, res
    wait_until(lambda: sorted(r for m in d.queue_list() for r in m["recipients"]) ==
               ["ok0@example.net", "ok1@example.net"], 20, "the messages within the bounds")
