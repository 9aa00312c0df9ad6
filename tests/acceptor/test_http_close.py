"""How the HTTP session closes and holds back, in process (the fake loop, transport and
spool of fake.py; the real Session and Service): a close that lingers and then aborts, a
client that does not read its answers, and a client that half-closes after its request.
"""
from __future__ import annotations

import json

from test_http_pending import post, response, service

from mta.acceptor import closing


def simple() -> dict:
    return {"recipients": ["r@example.net"],
            "content": {"from": "s@example.com", "subject": "s", "text": "hi"}}


def test_a_refused_request_is_answered_then_the_connection_lingers_and_is_aborted(tmp_path):
    """413 with the body still coming: the write side is shut after the answer (not the
    whole socket: the client's unread body would make the kernel send a reset instead
    of it), what the client still sends is dropped, and after http.linger_timeout the
    connection is aborted -- also when the client never reads, which a plain close()
    waited for forever, keeping the session and its place under max_connections."""
    loop, acc, svc, session, transport = service(tmp_path, max_body_size=1024,
                                                 linger_timeout=2.0)
    session.data_received(b"POST /api/v1/transmissions HTTP/1.1\r\nHost: t\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 99999\r\n\r\n")
    status, body = response(transport)
    assert status == 413 and "max_body_size" in body["errors"][0]["description"]
    assert transport.eof_written and not transport.aborted
    assert transport.reading                    # reads on, to drop what still comes
    session.data_received(b"x" * 5000)          # dropped: no second answer
    assert response(transport)[0] == 413
    (delay, cb, args), = [t for t in loop.timers if t[1] is closing._abort_unless_lost]
    assert delay == 2.0
    cb(*args)
    assert transport.aborted


def test_no_more_is_read_while_the_client_does_not_read_its_answers(tmp_path):
    loop, acc, svc, session, transport = service(tmp_path)
    acc.answer = "ok"
    session.pause_writing()                     # the transport's buffer is full
    assert not transport.reading
    post(session, simple())
    loop.run_ready()
    loop.run_ready()
    assert response(transport)[0] == 200
    assert not transport.reading                # answering did not resume reading
    session.resume_writing()
    assert transport.reading


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(tmp_path):
    loop, acc, svc, session, transport = service(tmp_path)   # (answers held)
    post(session, simple())
    loop.run_ready()
    assert session.eof_received() is True       # keep our side open: an answer is owed
    assert not transport.closed
    acc.answer_held(True)
    loop.run_ready()
    loop.run_ready()
    status, body = response(transport)
    assert status == 200 and body["results"]["total_accepted_recipients"] == 1
    assert transport.closed                     # and then the connection goes
    assert json.loads(b"".join(transport.written).partition(b"\r\n\r\n")[2])
