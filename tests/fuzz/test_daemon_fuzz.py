"""Fuzzed input against the real daemon over sockets: it answers, logs no traceback, keeps serving.

The fuzz targets run the SMTP and HTTP sessions in process; this runs mutated
inputs from the same seeds (the client sides of tests/acceptor/dialogues, the
HTTP target's request builder) through ``mta serve`` itself: every connection
gets well-formed replies (or responses), ends within a bound, and afterwards
no child was restarted, nothing was logged at ERROR, and mail is still taken.
"""
from __future__ import annotations

import os
import random
import socket
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from daemon import HOST  # noqa: E402

from fuzz import http_api, smtp_session  # noqa: E402
from fuzz.common import Input, cut  # noqa: E402
from fuzz.mutate import mutate  # noqa: E402

SESSIONS = 150          # per protocol
READ_BOUND = 20.0       # seconds a connection may take to end after the client's last byte
TLS_GO = b"220 2.0.0 Ready to start TLS\r\n"


def _converse(port: int, data: bytes, rng: random.Random) -> bytes:
    """Send *data* in random pieces, end the write side, read until the server closes."""
    s = socket.create_connection((HOST, port), timeout=READ_BOUND)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6)))) \
            if len(data) > 1 else []
        try:
            for piece in cut(data, points):
                s.sendall(piece)
            s.shutdown(socket.SHUT_WR)
        except OSError:         # EPIPE, ECONNRESET, ENOTCONN
            pass        # the server closed first (421 after too many errors, 413, ...)
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"the server neither answered nor closed within "
                                     f"{READ_BOUND:g} s after: {data[:300]!r}") from None
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        s.close()


def _assert_healthy(d, before: dict) -> None:
    assert d.children() == before, "a child was restarted"
    log = d.log()
    assert "Traceback" not in log, log[-4000:]
    assert " ERROR " not in log and "ERROR:" not in log, log[-4000:]
    assert d.send("after@example.com", ["r@example.net"], b"Subject: still\r\n\r\nok\r\n")


def test_fuzzed_smtp_sessions(make_daemon):
    d = make_daemon(acceptors=1, shards=1, smtp={"max_errors": 10, "max_recipients": 100,
                                                 "max_message_size": 65536})
    before = d.children()
    rng = random.Random(20261202)
    corpus = [seed[6:] for seed in smtp_session._dialogue_seeds()]
    for n in range(SESSIONS):
        data = mutate(rng, rng.choice(corpus), corpus, [], 8192) if n >= len(corpus) \
            else corpus[n]
        out = _converse(d.port, data, rng)
        if TLS_GO in out:       # what follows the go-ahead is the TLS layer's business
            out = out[:out.index(TLS_GO) + len(TLS_GO)]
        assert out.startswith(b"220 "), (data[:200], out[:200])
        smtp_session.check_replies(out)
    _assert_healthy(d, before)


def test_fuzzed_http_requests(make_daemon):
    d = make_daemon(acceptors=1, shards=1, http={"max_recipients": 20, "max_body_size": 65536})
    before = d.children()
    rng = random.Random(20261203)
    corpus = list(http_api.SEEDS)
    statuses = set()
    for n in range(SESSIONS):
        data = mutate(rng, rng.choice(corpus), corpus, [], 4096) if n >= len(corpus) \
            else corpus[n]
        inp = Input(data)
        inp.pos = 3 + 2 * (inp.data[2] % 8 if len(data) > 2 else 0)  # skip keys, peer, cuts
        request, _ = http_api.requests(inp)
        out = _converse(d.http_port, request, rng)
        http_api.check_responses(out, http_api.head_requests(request))
        statuses.update(int(out[9:12]) for _ in [0] if out[:5] == b"HTTP/")
    # (A transmission's 200 may not come: the client's end of file arrives with the request,
    # and the server closes without waiting for the spool; the valid request below gets it.)
    assert 400 in statuses and len(statuses - {100}) >= 3, statuses
    _assert_healthy(d, before)
    st, _, res = d.post({"recipients": ["ok@example.net"],
                         "content": {"from": "s@example.com", "subject": "s", "text": "t"}})
    assert st == 200 and res["results"]["total_accepted_recipients"] == 1, (st, res)
