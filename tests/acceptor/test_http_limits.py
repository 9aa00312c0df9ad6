"""The HTTP listener's per-client connection limit, in process (the fake loop and
transport of fake.py; the real Session and Service): http.max_connections_per_ip.

One client address could take every http.max_connections slot of an acceptor, and
nothing answered the others; SMTP bounds it with smtp.max_connections_per_ip.
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


def test_one_client_cannot_take_more_than_its_share_of_connections(tmp_path):
    loop, acc, svc, first, _ = service(tmp_path, max_connections=10,
                                       max_connections_per_ip=2)
    # (service() made the first connection, from 127.0.0.1)
    second = connect(svc, ("127.0.0.1", 2))
    third = connect(svc, ("127.0.0.1", 3))
    assert not second.written and not second.closed
    status, head, body = answer(third)
    assert status == 503 and b"Retry-After: " in head and b"Connection: close" in head
    assert "http.max_connections_per_ip" in body["errors"][0]["description"]
    assert third.eof_written or third.closed
    assert len(svc.sessions) == 2
    # another address is served; an IPv4 client behind ::ffff: is the same client
    other = connect(svc, ("192.0.2.7", 1))
    assert not other.written and len(svc.sessions) == 3
    mapped = connect(svc, ("::ffff:127.0.0.1", 4))
    assert answer(mapped)[0] == 503
    # an IPv6 client counts as its /64 (smtp.ipv6_client_prefix): a new address of it
    # for every connection gains nothing
    a = connect(svc, ("2001:db8::1", 1))
    b = connect(svc, ("2001:db8::2", 1))
    c = connect(svc, ("2001:db8::ffff:3", 1))
    assert not a.written and not b.written and answer(c)[0] == 503
    assert not connect(svc, ("2001:db8:0:1::1", 1)).written    # another /64
    # a closed connection frees its place; the refused ones took none
    for t in (third, mapped, c):
        t.protocol.connection_lost(None)
    assert svc.per_ip == {"127.0.0.1": 2, "192.0.2.7": 1, "2001:db8::/64": 2,
                          "2001:db8:0:1::/64": 1}
    second.protocol.connection_lost(None)
    assert not connect(svc, ("127.0.0.1", 5)).written
    for s in list(svc.sessions):
        s.connection_lost(None)
    assert svc.per_ip == {} and not svc.sessions


def test_without_the_limit_one_client_holds_every_connection(tmp_path):
    """0, the default: injectors holding thousands of connections from a few addresses
    keep working after an upgrade; nothing is counted."""
    loop, acc, svc, first, _ = service(tmp_path, max_connections=300)
    assert svc.cfg.max_connections_per_ip == 0
    ts = [connect(svc, ("127.0.0.1", i)) for i in range(299)]
    assert not any(t.written for t in ts) and len(svc.sessions) == 300
    assert svc.per_ip == {}
    assert answer(connect(svc, ("127.0.0.1", 9999)))[0] == 503   # max_connections still


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
