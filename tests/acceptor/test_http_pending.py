"""The HTTP injection's memory bounds, in process: http.max_pending_bytes and
http.max_message_size (the fake loop and spool of fake.py; the real Session, Service,
Injection and Builder).

A transmission of one large message to many recipients is built a few recipients at a
time: at max_pending_bytes of built messages the spool has not answered, building waits,
and each answer lets it go on.  A recipient whose substitutions would build a message
larger than max_message_size is refused before the text is joined.
"""
from __future__ import annotations

import dataclasses
import json

import msgspec

from fake import Acceptor, Loop, Transport, settings
from mta.acceptor import http

MiB = 1 << 20


def service(tmp_path, **http_cfg):
    base = settings()
    cfg = base.config
    cfg = msgspec.structs.replace(cfg, http=msgspec.structs.replace(cfg.http, **http_cfg))
    s = dataclasses.replace(base, config=cfg, state_dir=str(tmp_path))
    loop = Loop()
    acc = Acceptor(s, loop)
    acc.answer = "hold"
    svc = acc.http = http.Service(acc)
    svc.open()
    transport = Transport()
    session = http.Session(svc)
    transport.connect(session)
    return loop, acc, svc, session, transport


def post(session, body: dict) -> None:
    raw = json.dumps(body).encode()
    session.data_received(b"POST /api/v1/transmissions HTTP/1.1\r\nHost: t\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                          % len(raw) + raw)


def response(transport) -> tuple[int, dict]:
    out = b"".join(transport.written)
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_large_message_to_many_recipients_is_built_a_few_at_a_time(tmp_path):
    loop, acc, svc, session, transport = service(tmp_path, max_pending_bytes=1 * MiB)
    n = 40
    text = ("x" * 76 + "\n") * 3000             # ~230 KB of text: each message ~235 KB
    post(session, {"recipients": [f"r{i}@example.net" for i in range(n)],
                   "content": {"from": "s@example.com", "subject": "big", "text": text}})
    loop.run_ready()
    size = len(acc.submitted[0].message)
    assert size > 200_000
    highest = 0
    rounds = 0
    while len(acc.submitted) < n or acc.held:
        # what is built and unanswered stays within the bound and one message
        built = len(acc.submitted)
        assert svc.pending_bytes == sum(len(m.message) for m in acc.submitted[-len(acc.held):]) \
            if acc.held else svc.pending_bytes == 0
        assert svc.pending_bytes < 1 * MiB + size, (svc.pending_bytes, built)
        highest = max(highest, len(acc.held))
        assert not transport.written                # no answer before every one is durable
        acc.answer_held(True)
        loop.run_ready()
        loop.run_ready()
        rounds += 1
        assert rounds <= n, "building did not go on after the answers"
    assert highest == 1 * MiB // size + 1           # 5: the bound, then one message more
    assert svc.pending_bytes == 0 and svc.pending == 0 and not svc.paused
    status, body = response(transport)
    assert status == 200 and body["results"]["total_accepted_recipients"] == n
    assert sorted(m.rcpts[0] for m in acc.submitted) == sorted(f"r{i}@example.net"
                                                               for i in range(n))


def test_substitution_past_max_message_size_refuses_the_recipient_without_building_it(
        tmp_path):
    loop, acc, svc, session, transport = service(tmp_path, max_message_size=1 * MiB)
    acc.answer = "ok"
    value = "v" * 90_000
    post(session, {"recipients": [
        {"address": "big@example.net", "substitution_data": {"x": value}},
        {"address": "small@example.net", "substitution_data": {"x": "v"}}],
        "content": {"from": "s@example.com", "subject": "s", "text": "{{x}}" * 2000}})
    loop.run_ready()
    loop.run_ready()
    status, body = response(transport)
    assert status == 200
    res = body["results"]
    assert (res["total_accepted_recipients"], res["total_rejected_recipients"]) == (1, 1)
    assert res["rcpt_to_errors"][0]["description"] == (
        f"recipients[0]: the message would be larger than {1 * MiB} octets "
        "(http.max_message_size)")
    assert [m.rcpts for m in acc.submitted] == [["small@example.net"]]
    # its generation_failure event went to the spool with the accepted one
    assert [e["type"] for _, evs in acc.events for e in evs] == ["generation_failure"]


def test_a_long_injection_keeps_its_idempotency_key_from_being_taken_over(tmp_path):
    """An Idempotency-Key row older than its stale bound is taken over by the next
    request with that key (its owner is presumed stuck), which injects every recipient
    again.  A long injection -- many recipients, building paced by the spool -- touches
    its row as it goes, so a retry meanwhile gets 409, not a second injection."""
    import time

    from mta.api import idempotency as I
    # (slices of BUILD_SLICE recipients: a slow machine must not end one early at
    # http.build_slice_time)
    loop, acc, svc, session, transport = service(tmp_path, api_keys=["k"],
                                                 build_slice_time=60.0)
    svc.store.stale_after = 0.4
    raw = json.dumps({"recipients": [f"r{i}@example.net" for i in range(300)],
                      "content": {"from": "s@example.com", "subject": "s", "text": "hi"}})
    session.data_received(b"POST /api/v1/transmissions HTTP/1.1\r\nHost: t\r\n"
                          b"Authorization: k\r\nIdempotency-Key: long-one\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                          % len(raw) + raw.encode())
    assert len(acc.submitted) == 256                # the first slice; the next one is due
    time.sleep(0.5)                                  # (longer than the stale bound)
    loop.run_ready()                                 # the second slice: it touches the row
    assert len(acc.submitted) == 300
    other = I.Store(str(tmp_path / "idempotency.sqlite"), 86400.0, 0.4)   # another acceptor
    scope = svc.authorize(b"k", "127.0.0.1")        # (the key's scope, as the request had)
    verdict = other.begin(scope, "long-one", I.body_hash(raw.encode()))[0]
    other.close()
    assert verdict == I.IN_FLIGHT, verdict
