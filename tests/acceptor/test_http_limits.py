"""The HTTP listener's connection limits, in process (the fake loop and transport of
fake.py; the real Session and Service): http.max_connections.
"""
from __future__ import annotations

import json

from test_http_pending import post, service

from fake import Transport
from mta.acceptor import http


def connect(svc, peer) -> Transport:
    t = Transport(peer=peer)
    t.connect(http.Session(svc))
    return t


def answer(t: Transport) -> tuple[int, bytes, dict]:
    head, _, body = b"".join(t.written).partition(b"\r\n\r\n")
    return int(head.split()[1]), head, json.loads(body)


def test_a_connection_over_max_connections_is_answered_and_closed_not_served(tmp_path):
    """The 503 of http.max_connections was sent as a keep-alive answer: the connection
    stayed open, uncounted, and its requests were served as any other's."""
    loop, acc, svc, first, _ = service(tmp_path, max_connections=1)
    acc.answer = "ok"
    over = connect(svc, ("192.0.2.1", 1))
    status, head, body = answer(over)
    assert status == 503 and b"Retry-After: " in head and b"Connection: close" in head
    assert "http.max_connections" in body["errors"][0]["description"]
    assert over.eof_written or over.closed
    n = len(over.written)
    post(over.protocol, {"recipients": ["r@example.net"],
                         "content": {"from": "s@example.com", "subject": "s", "text": "t"}})
    loop.run_ready()
    loop.run_ready()
    assert len(over.written) == n and not acc.submitted     # nothing served after it
