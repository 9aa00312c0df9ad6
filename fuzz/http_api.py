"""Whole-request target: the HTTP acceptor (httptools framing, Transmissions and
suppression-list JSON) on a fake transport, input split anywhere.

The real :class:`mta.acceptor.http.Session` and :class:`Service` run on the
fake loop and transport of tests/acceptor/fake.py, with a fresh in-memory
idempotency store per input and one suppression list (LMDB, in a temporary
directory) per process; the spool answers every message ok.  The first byte
chooses what the payload is:

0. raw bytes on the connection (framing: request line, headers, chunked
   bodies, pipelining, upgrades);
1. the body of a well-framed ``POST /api/v1/transmissions`` (optionally with
   an API key, Idempotency-Key, Expect: 100-continue, chunked, a second
   request pipelined behind it);
2. a suppression-list request: method, path, query and body from the input;
3. a transmission whose JSON is generated from the input with the API's field
   names, so deep and odd structures reach the checks.

It fails when any exception leaves the session, anything is logged at ERROR
(the catch-all's traceback), the output is not a sequence of HTTP/1.1
responses with a JSON body, or a response is 5xx (a full suppression list,
507, aside).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile

import msgspec
import orjson

from fuzz.common import Divergence, Input, cut, tests_on_path

tests_on_path()
from acceptor import fake  # noqa: E402  (tests/acceptor/fake.py)

from mta.acceptor import http  # noqa: E402
from mta.api import idempotency  # noqa: E402
from mta.feedback import suppression as suppression_list  # noqa: E402

API_KEY = "fuzz-key-1"
PEERS = (("127.0.0.1", 5000), ("192.0.2.9", 5000), ("::1", 5000, 0, 0))
STATUS = re.compile(rb"HTTP/1\.1 ([0-9]{3}) [A-Za-z -]+\r\n")
SUPPRESSION_PATHS = (b"/api/v1/suppression-list", b"/api/v1/suppression-list/",
                     b"/api/v1/suppression-list/summary", b"/api/v1/suppression-list/")
METHODS = (b"GET", b"PUT", b"DELETE", b"POST", b"PATCH", b"HEAD")
KEYS = ("recipients", "content", "from", "subject", "text", "html", "address", "email",
        "name", "header_to", "substitution_data", "metadata", "options", "ip_pool",
        "start_time", "transactional", "skip_suppression", "campaign_id", "return_path",
        "tags", "headers", "attachments", "type", "data", "email_rfc822", "template_id",
        "reply_to", "description", "list_id", "sandbox", "inline_images", "x")
STRINGS = ("a@example.com", "", "now", "2026-12-03T10:00:00Z", "{{x}}", "{{{y}}}", "default",
           "text/plain", "aGVsbG8=", "Subject: x\r\n\r\nbody\r\n", "\u00e9", "x" * 70,
           "Name <n@example.org>", "@", "non_transactional", "transactional")


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(self.format(record))


ERRORS = _Errors()     # attached to the "mta" logger only while a conversation runs

_STATE: dict = {}


def _settings(keys: bool):
    s = _STATE.get(("settings", keys))
    if s is None:
        base = fake.settings()
        if "dir" not in _STATE:
            _STATE["dir"] = tempfile.TemporaryDirectory(prefix="mta-fuzz-http-")
        cfg = base.config
        cfg = msgspec.structs.replace(
            cfg,
            http=msgspec.structs.replace(cfg.http, api_keys=[API_KEY] if keys else [],
                                         max_header_size=2048, max_body_size=65536,
                                         max_recipients=20, max_json_depth=8),
            suppression=msgspec.structs.replace(cfg.suppression, max_size=64 << 20))
        s = dataclasses.replace(base, config=cfg, state_dir=_STATE["dir"].name)
        _STATE[("settings", keys)] = s
    return s


def _suppression(settings):
    if "suppression" not in _STATE:
        _STATE["suppression"] = suppression_list.open_for(settings)
    return _STATE["suppression"]


def gen_json(inp: Input, depth: int = 0):
    """A JSON value whose shape and names come from the input."""
    b = inp.byte()
    kind = b % 10 if depth < 40 else 5 + b % 5
    if kind in (0, 1, 2):
        return {inp.pick(KEYS): gen_json(inp, depth + 1) for _ in range(inp.byte() % 5)}
    if kind == 3:
        return [gen_json(inp, depth + 1) for _ in range(inp.byte() % 4)]
    if kind == 4:
        return inp.pick(STRINGS)
    if kind == 5:
        return inp.take(inp.byte() % 16).decode("utf-8", "replace")
    if kind == 6:
        return inp.pick((0, -1, 1.5, 2 ** 64, 10 ** 30, 1e308))
    if kind == 7:
        return inp.pick((True, False, None))
    if kind == 8:
        return inp.pick(STRINGS)
    return {"address": {"email": inp.pick(STRINGS)}, "substitution_data": gen_json(inp, depth + 1)}


def requests(inp: Input) -> tuple[bytes, bool]:
    """The bytes the client sends and whether it authenticates."""
    mode = inp.byte() % 4
    auth = inp.flag()
    headers = b""
    if auth:
        headers += b"Authorization: " + (API_KEY.encode() if inp.flag() else b"wrong") + b"\r\n"
    if mode == 0:
        return inp.rest(), auth
    if mode == 2:
        method = inp.pick(METHODS)
        path = inp.pick(SUPPRESSION_PATHS)
        if path.endswith(b"/"):
            path += inp.take(inp.byte() % 24).replace(b" ", b"%20").replace(b"\r", b"") \
                .replace(b"\n", b"")
        query = inp.take(inp.byte() % 48).replace(b" ", b"+").replace(b"\r", b"") \
            .replace(b"\n", b"")
        body = inp.rest()
        return (method + b" " + path + (b"?" + query if query else b"") + b" HTTP/1.1\r\n"
                b"Host: x\r\nContent-Type: application/json\r\n" + headers
                + b"Content-Length: %d\r\n\r\n" % len(body) + body), auth
    key = inp.flag()
    expect = inp.flag()
    chunked = inp.flag()
    twice = inp.flag()
    if key:
        headers += b"Idempotency-Key: k" + bytes([48 + inp.byte() % 4]) + b"\r\n"
    if expect:
        headers += b"Expect: 100-continue\r\n"
    if mode == 3:
        doc = gen_json(inp)
        body = json.dumps(doc).encode()   # json: integers past 64 bits too
    else:
        body = inp.rest()
    if chunked:
        framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    else:
        framed = b"Content-Length: %d\r\n\r\n" % len(body) + body
    one = (b"POST /api/v1/transmissions?num_rcpt_errors=3 HTTP/1.1\r\nHost: x\r\n"
           b"Content-Type: application/json\r\n" + headers + framed)
    return (one * 2 if twice else one), auth


def converse(data: bytes) -> tuple[bytes, bytes]:
    """(the server's output, the request bytes sent) for one fuzz input."""
    inp = Input(data)
    keys = inp.flag()
    peer = inp.pick(PEERS)
    cuts_raw = [inp.u16() for _ in range(inp.byte() % 8)]
    payload, _ = requests(inp)
    size = len(payload)
    cuts = sorted({1 + c % (size - 1) for c in cuts_raw}) if size > 1 else []
    settings = _settings(keys)
    loop = fake.Loop()
    acc = fake.Acceptor(settings, loop)
    acc.suppression = _suppression(settings)
    svc = acc.http = http.Service(acc)
    cfg = svc.cfg
    svc.store = idempotency.Store(":memory:", cfg.idempotency_window, 60.0)
    transport = fake.Transport(peer)
    session = http.Session(svc)
    transport.connect(session)
    ERRORS.records.clear()
    mta_log = logging.getLogger("mta")
    mta_log.addHandler(ERRORS)
    try:
        for piece in cut(payload, cuts):
            if transport.closed:
                break
            if not transport.reading:
                loop.run_ready()
                if not transport.reading and not transport.closed:
                    raise Divergence("reading paused with nothing to wait for")
            session.data_received(piece)
            loop.run_ready()
        if not transport.closed:
            session.eof_received()
        session.connection_lost(None)
        loop.run_ready()
    finally:
        mta_log.removeHandler(ERRORS)
        svc.store.close()
    if ERRORS.records:
        raise Divergence("logged at ERROR:\n" + "\n".join(ERRORS.records)[:2000])
    return b"".join(transport.written), payload


def head_requests(requests: bytes) -> int:
    """How many request lines of *requests* are HEAD: at most that many answers carry a
    Content-Length and no body (RFC 9110 9.3.2)."""
    return len(re.findall(rb"(?:^|\n)HEAD ", requests))


def check_responses(out: bytes, heads: int = 0) -> None:
    """Every response well formed: a status line, a head, its JSON body (none for a 204,
    nor for the answer to one of *heads* HEAD requests)."""
    at = 0
    while at < len(out):
        m = STATUS.match(out, at)
        if m is None:
            raise Divergence(f"not an HTTP/1.1 status line at {at}: {out[at:at + 80]!r}")
        status = int(m.group(1))
        end = out.find(b"\r\n\r\n", at)
        if end < 0:
            raise Divergence(f"a response head without its end: {out[at:at + 200]!r}")
        head = out[at:end]
        at = end + 4
        if status == 100:
            continue
        length = re.search(rb"\r\nContent-Length: ([0-9]+)", head)
        if status == 204:
            if length:
                raise Divergence("a 204 with a Content-Length")
            continue
        if length is None:
            raise Divergence(f"a response without Content-Length: {head!r:.200}")
        if heads and int(length.group(1)) and (at == len(out) or STATUS.match(out, at)):
            heads -= 1          # the answer to a HEAD: its length, not its body
            continue
        body = out[at:at + int(length.group(1))]
        at += len(body)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Divergence(f"a {status} response body is not JSON: {body!r:.200}") from None
        # (a 501 is the answer RFC 9112 6.1 asks for to a transfer coding not known)
        if status >= 500 and not (status == 507 and b"suppression" in body) \
                and not (status == 501 and b"transfer coding" in body):
            raise Divergence(f"a {status} for bad input: {body!r:.300}")
        if status >= 400 and not (isinstance(doc, dict) and doc.get("errors")):
            raise Divergence(f"a {status} without errors: {body!r:.300}")


def one_input(data: bytes) -> None:
    out, sent = converse(data)
    check_responses(out, head_requests(sent))


def _seed(mode: int, body: bytes, flags: bytes = b"\x00\x00\x00\x00") -> bytes:
    return b"\x00\x00\x00" + bytes([mode]) + b"\x00" + flags + body


SEEDS = [
    b"\x00\x00\x00\x00\x00GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    _seed(1, b'{"recipients":[{"address":{"email":"a@example.com"}}],"content":{"from":'
          b'"s@example.org","subject":"x","text":"hi {{name}}"},"substitution_data":'
          b'{"name":"n"},"options":{"transactional":true}}'),
    _seed(1, b'{"recipients":["a@example.com","bad"],"content":{"email_rfc822":'
          b'"Subject: x\\r\\n\\r\\nbody\\r\\n"},"metadata":{"a":[1,{"b":null}]}}',
          b"\x01\x01\x01\x01\x02"),
    b"\x00\x00\x00\x02\x00\x01\x00\x00\x00PUT /api/v1/suppression-list" + b"",
    _seed(2, b'{"recipients":[{"recipient":"x@example.com","type":"transactional"}]}',
          b"\x01\x00\x00"),
    _seed(3, b"\x00\x03\x00\x02\x04\x01\x01\x03\x01\x00\x05\x08"),
]
