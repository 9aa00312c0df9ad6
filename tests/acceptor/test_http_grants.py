"""http.key_grants and routes that do not exist, in process (the fake loop and
transport of fake.py; the real Session and Service).

A key limited by http.key_grants that asked for an unknown route with a body (or
Expect: 100-continue) got 403 "no transmissions:modify grant", where a key with
every grant got 404: whether a route exists depended on the key.  Now an unknown
route is 404 for every valid key, after the key is checked: without a valid key
the answer is 401 (403 without keys configured, from another machine), as for
every route, and nothing is said about which routes exist.
"""
from __future__ import annotations

import json

from test_http_pending import service

from fake import Transport
from mta.acceptor import http

HOOKS = "hooks-only"
ALL = "every-grant"


def ask(svc, method: str, path: str, key: str | None, body: bytes = b"",
        expect: bool = False) -> tuple[int, dict, Transport]:
    t = Transport()
    t.connect(http.Session(svc))
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    if key is not None:
        head += f"Authorization: {key}\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    if expect:
        head += "Expect: 100-continue\r\n"
    t.protocol.data_received(head.encode() + b"\r\n")
    if not expect or t.written == [http.CONTINUE]:
        t.protocol.data_received(body)
    out = b"".join(t.written).removeprefix(http.CONTINUE)
    h, _, b = out.partition(b"\r\n\r\n")
    return int(h.split()[1]), json.loads(b), t


def keyed(tmp_path):
    return service(tmp_path, api_keys=[ALL], key_grants={HOOKS: ["webhooks:view"]})[2]


def test_an_unknown_route_is_404_whatever_the_keys_grants(tmp_path):
    svc = keyed(tmp_path)
    body = json.dumps({"recipients": ["r@example.net"]}).encode()
    for method, path, data, expect in (
            ("POST", "/api/v1/nothing", body, False),
            ("POST", "/api/v1/nothing", body, True),
            ("PUT", "/api/v1/transmission", body, False),     # (a typo)
            ("GET", "/api/v1/nothing", b"", False),
            ("DELETE", "/", b"", False)):
        for key in (HOOKS, ALL):
            st, got, _ = ask(svc, method, path, key, data, expect)
            assert st == 404, (method, path, key, expect, st, got)
            assert "no such resource" in got["errors"][0]["description"]


def test_an_unknown_route_without_a_valid_key_is_401_as_any_other(tmp_path):
    svc = keyed(tmp_path)
    body = b'{"recipients": []}'
    for method, path, data in (("POST", "/api/v1/nothing", body),
                               ("GET", "/api/v1/nothing", b""),
                               ("GET", "/", b"")):
        for key in (None, "not-a-key"):
            st, got, _ = ask(svc, method, path, key, data)
            assert st == 401, (method, path, key, st, got)


def test_grants_still_bound_the_routes_there_are(tmp_path):
    svc = keyed(tmp_path)
    body = json.dumps({"recipients": ["r@example.net"], "content": {
        "from": "s@example.com", "subject": "s", "text": "t"}}).encode()
    for path, expect in (("/api/v1/transmissions", False), ("/api/v1/transmissions/", True)):
        st, got, t = ask(svc, "POST", path, HOOKS, body, expect)
        assert st == 403 and "transmissions:modify" in got["errors"][0]["description"], got
        assert not svc.a.submitted
    st, got, _ = ask(svc, "GET", "/api/v1/events/message", HOOKS)
    assert st == 403 and "message_events:view" in got["errors"][0]["description"], got


def test_without_keys_a_loopback_client_gets_404_for_an_unknown_route(tmp_path):
    svc = service(tmp_path)[2]
    assert ask(svc, "POST", "/api/v1/nothing", None, b"{}")[0] == 404
    assert ask(svc, "GET", "/nothing", None)[0] == 404


def test_a_key_in_a_chunked_bodys_trailer_is_checked_as_the_key_in_the_head(tmp_path):
    # The key is checked once, at the end of the head, and that answer is kept for the
    # route; an Authorization field in a chunked body's trailer (merged into the
    # request's fields, as every route's handler has always read them) was then not
    # checked at all: a head with a valid key and a trailer with a key that lacks the
    # grant, or no valid key, got the transmission taken (it got 403 / 401 before).
    svc = keyed(tmp_path)
    body = json.dumps({"recipients": ["r@example.net"], "content": {
        "from": "s@example.com", "subject": "s", "text": "t"}}).encode()

    def post(trailer: bytes) -> tuple[int, dict]:
        t = Transport()
        t.connect(http.Session(svc))
        t.protocol.data_received(
            b"POST /api/v1/transmissions HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nAuthorization: " + ALL.encode() +
            b"\r\nTransfer-Encoding: chunked\r\n\r\n" +
            b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + trailer + b"\r\n")
        out = b"".join(t.written)
        if not out:
            return 0, {}        # (taken: its answer waits for the spool's)
        h, _, b = out.partition(b"\r\n\r\n")
        return int(h.split()[1]), json.loads(b)

    st, got = post(b"Authorization: " + HOOKS.encode() + b"\r\n")
    assert st == 403 and "transmissions:modify" in got["errors"][0]["description"], got
    st, got = post(b"Authorization: not-a-key\r\n")
    assert st == 401, got
    assert not svc.a.submitted
    st, got = post(b"")         # (the head's key alone: taken)
    assert st == 0 and len(svc.a.submitted) == 1, got


def test_another_method_on_transmissions_asks_the_key_before_it_gets_405(tmp_path):
    # GET / HEAD / PUT on /api/v1/transmissions got 405 "use POST" before the key was
    # checked: a client without a valid key learnt what the resource takes, where every
    # other route answers it 401.  Now: 401 without a valid key, 403 for a key without
    # the grant, 405 (with Allow) for a key that may send.
    svc = keyed(tmp_path)
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        for key, want in ((None, 401), ("not-a-key", 401), (HOOKS, 403), (ALL, 405)):
            if method == "HEAD":
                t = Transport()
                t.connect(http.Session(svc))
                auth = f"Authorization: {key}\r\n" if key else ""
                t.protocol.data_received(f"HEAD /api/v1/transmissions HTTP/1.1\r\nHost: t"
                                         f"\r\n{auth}\r\n".encode())
                head = b"".join(t.written).partition(b"\r\n\r\n")[0]
                st = int(head.split()[1])
                assert st == want, (method, key, head)
                assert (b"\r\nAllow: POST\r\n" in head + b"\r\n") == (want == 405), head
                continue
            st, got, t = ask(svc, method, "/api/v1/transmissions", key)
            assert st == want, (method, key, st, got)
            head = b"".join(t.written).partition(b"\r\n\r\n")[0]
            assert (b"\r\nAllow: POST\r\n" in head + b"\r\n") == (want == 405), head
    assert not svc.a.submitted
