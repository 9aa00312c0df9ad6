"""The HTTP acceptor's bounds that were module constants, now [http] settings, in process
(the fake loop and spool of fake.py; the real Session, Service, Injection and Builder):
each configured value is the one that takes effect -- http.max_pipelined and
max_pipelined_bytes (reading pauses), loop_prepare_size (a body compiled in a worker
thread), build_slice_time (a build slice ends), max_header_field_length and
max_header_block_size (the recipient refused, the message naming the bound and the key).
"""
from __future__ import annotations

import json
import time

from mta.api import build

from test_http_pending import post, response, service   # tests/acceptor is on sys.path


def request(body: dict | bytes) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (b"POST /api/v1/transmissions HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)


def tx(rcpt: str = "r@example.net", text: str = "hi", **content) -> dict:
    return {"recipients": [rcpt],
            "content": {"from": "s@example.com", "subject": "s", "text": text, **content}}


def test_reading_pauses_at_max_pipelined_requests(tmp_path):
    # the first request's message is held by the spool: the ones behind it queue; at
    # max_pipelined of them reading pauses (2, the least: it resumes when none waits)
    for limit in (2, 3, 16):
        loop, acc, svc, session, transport = service(tmp_path / str(limit),
                                                     max_pipelined=limit)
        acc.answer = "hold"
        reading = []
        for n in range(6):
            session.data_received(request(tx(f"r{n}@example.net")))
            reading.append(transport.reading)
        assert reading == [n < limit for n in range(6)], (limit, reading)
        # answered, the queue drains under half of the bound: reading resumes
        for _ in range(12):
            acc.answer_held(True)
            loop.run_ready()
        assert transport.reading, limit
        assert len(acc.submitted) == 6, limit
        session.data_received(request(tx("after@example.net")))
        acc.answer_held(True)
        loop.run_ready()
        loop.run_ready()
        assert len(acc.submitted) == 7, limit


def test_reading_pauses_at_max_pipelined_bytes_of_bodies_read_ahead(tmp_path):
    # behind the request being answered, the next in line is not counted: the third
    # request's ~700 octets are within 1000, with the fourth's they are not; at 0 reading
    # pauses when two wait
    body = tx(text="x" * 600)
    for limit, want in ((1000, [True, True, True, False]), (0, [True, True, False, False]),
                        (1 << 20, [True] * 4)):
        loop, acc, svc, session, transport = service(tmp_path / str(limit),
                                                     max_pipelined_bytes=limit)
        acc.answer = "hold"
        reading = []
        for _ in range(4):
            session.data_received(request(body))
            reading.append(transport.reading)
        assert reading == want, (limit, reading)
        for _ in range(8):
            acc.answer_held(True)
            loop.run_ready()
        assert transport.reading and len(acc.submitted) == 4, limit


def test_a_body_over_loop_prepare_size_is_compiled_in_a_worker_thread(tmp_path):
    for limit, threaded in ((100, True), (64 * 1024, False)):
        loop, acc, svc, session, transport = service(tmp_path / str(limit),
                                                     loop_prepare_size=limit)
        acc.answer = "ok"
        handed = []

        def run_in_executor(ex, fn, *args, handed=handed, real=loop.run_in_executor):
            handed.append(fn)
            return real(ex, fn, *args)
        loop.run_in_executor = run_in_executor
        raw = json.dumps(tx(text="y" * 200)).encode()
        assert len(raw) > 100
        session.data_received(request(raw))
        assert [f.__name__ for f in handed] == (["_prepare"] if threaded else []), handed
        # (a body compiled in a thread is injected when its future is done: next iteration)
        assert len(acc.submitted) == (0 if threaded else 1)
        loop.run_ready()
        loop.run_ready()
        assert len(acc.submitted) == 1
        assert response(transport)[0] == 200


def test_a_build_slice_ends_after_build_slice_time(tmp_path, monkeypatch):
    # each recipient takes 5 ms to build: 20 of them fit one slice of 60 s, not of 12 ms
    slow = build.Builder.build

    def build_slowly(self, i, rcpt):
        time.sleep(0.005)
        return slow(self, i, rcpt)
    monkeypatch.setattr(build.Builder, "build", build_slowly)
    rcpts = [f"r{i}@example.net" for i in range(20)]
    for limit in (60.0, 0.012):
        loop, acc, svc, session, transport = service(tmp_path / str(limit),
                                                     build_slice_time=limit)
        acc.answer = "hold"
        post(session, {**tx(), "recipients": rcpts})
        first = len(acc.submitted)
        if limit == 60.0:
            assert first == 20, first
        else:
            assert first <= 4, first     # the recipient that passed 12 ms ends it
        for _ in range(20):
            loop.run_ready()
        assert len(acc.submitted) == 20


def test_a_header_field_over_max_header_field_length_is_refused_naming_it(tmp_path):
    loop, acc, svc, session, transport = service(tmp_path, max_header_field_length=1000)
    acc.answer = "ok"
    post(session, {**tx(subject="{{v}}"), "substitution_data": {"v": "s" * 1001}})
    loop.run_ready()
    status, body = response(transport)
    assert status == 422, body
    assert body["errors"][0]["description"] == (
        "no valid recipient: recipients[0]: content.subject would be longer than 1000 "
        "characters "
        "(http.max_header_field_length)"), body
    assert not acc.submitted
    # at the bound it goes out
    loop, acc, svc, session, transport = service(tmp_path / "2", max_header_field_length=1000)
    acc.answer = "ok"
    post(session, tx(subject="s" * 1000))
    loop.run_ready()
    loop.run_ready()
    assert response(transport)[0] == 200 and len(acc.submitted) == 1


def test_header_fields_over_max_header_block_size_are_refused_naming_it(tmp_path):
    headers = {f"X-H{k}": "v " * 3000 for k in range(4)}      # ~24 KB folded
    loop, acc, svc, session, transport = service(tmp_path, max_header_block_size=20_000)
    acc.answer = "ok"
    post(session, tx(headers=headers))
    loop.run_ready()
    status, body = response(transport)
    assert status == 422, body
    assert body["errors"][0]["description"] == (
        "no valid recipient: recipients[0]: content.headers would make the header fields "
        "longer than 20000 "
        "octets (http.max_header_block_size)"), body
    # the default bound takes them
    loop, acc, svc, session, transport = service(tmp_path / "2")
    acc.answer = "ok"
    post(session, tx(headers=headers))
    loop.run_ready()
    loop.run_ready()
    assert response(transport)[0] == 200 and len(acc.submitted) == 1
