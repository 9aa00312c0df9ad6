"""Claims of the README that no other test checked, against the real daemon over sockets.

- ``smtp.max_connections`` (per acceptor): the connection over the limit gets
  421 4.7.0 and is closed; once another one closes, a new one is served.
  (``max_connections_per_ip`` is in test_smtp_limits.py.)
- ``http.keepalive_timeout``: an idle keep-alive connection is closed by the
  server, one that keeps sending requests is not.
- EIO from the spool's disk (write or fsync; test_backpressure.py injects only
  ENOSPC): SMTP gets 451 4.3.0, never 5xx, the message is not queued, and the
  shard heals by itself (its once-a-second probe) when the disk works again.
  The spool is on crashfs (tests/crashfs.py) with its error-injection switch.

The loopback-only rule of the HTTP API without API keys is in
test_loopback_only.py (a client on a non-loopback address, inside a private
network namespace).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import pytest
from crashfs import CrashFS
from daemon import HOST, QUEUED_RE

from mta.acceptor import replies as R

KEEPALIVE = 1.0     # http.keepalive_timeout of the shared daemon (seconds)


@pytest.fixture(scope="module")
def limits(make_module_daemon):
    """One acceptor that serves two SMTP connections at most and closes idle HTTP
    keep-alive connections after a second."""
    return make_module_daemon(subdir="limits", acceptors=1, shards=1,
                              smtp={"max_connections": 2},
                              http={"keepalive_timeout": KEEPALIVE})


# ------------------------------------------------------ smtp.max_connections


def test_smtp_max_connections_refuses_with_421_then_serves_again(limits):
    d = limits
    # Three client addresses: the limit is the acceptor's, not one address's.
    a = d.connect(source="127.0.0.2")
    b = d.connect(source="127.0.0.3")
    try:
        assert a.banner[0] == b.banner[0] == 220
        with d.connect(source="127.0.0.4") as third:
            assert third.banner == (421, [R.TOO_MANY_CONNECTIONS[4:-2].decode()])
            assert third.closed()
        # The two it serves are not disturbed.
        assert a.cmd("NOOP") == (250, ["2.0.0 Ok"])
        assert b.cmd("NOOP") == (250, ["2.0.0 Ok"])
        assert a.cmd("QUIT")[0] == 221
        assert a.closed()
        # A slot is free once the server has seen the close: a new client is served
        # (retried only until the acceptor has noticed; the outcome is what counts).
        deadline = time.monotonic() + 10
        while True:
            with d.connect(source="127.0.0.4") as again:
                if again.banner[0] == 220 or time.monotonic() > deadline:
                    assert again.banner[0] == 220, again.banner
                    assert again.cmd("EHLO client.test")[0] == 250
                    # ...and it is the second of two again: the next one is refused.
                    with d.connect(source="127.0.0.5") as over:
                        assert over.banner[0] == 421
                    break
            time.sleep(0.05)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------- http.keepalive_timeout

BAD_JSON = b"{oops"     # answered 400; the connection stays open (keep-alive)


def request(body: bytes) -> bytes:
    return (b"POST /api/v1/transmissions HTTP/1.1\r\nHost: mta.test\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


def read_response(f) -> tuple[int, bytes]:
    """(status, body) of one response; the connection stays usable."""
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, f.read(length)


def test_http_keepalive_timeout_closes_idle_connections_only(limits):
    d = limits
    idle = socket.create_connection((HOST, d.http_port), timeout=30)
    busy = socket.create_connection((HOST, d.http_port), timeout=30)
    with idle, busy:
        fi, fb = idle.makefile("rb"), busy.makefile("rb")
        for s, f in ((idle, fi), (busy, fb)):
            s.sendall(request(BAD_JSON))
            status, body = read_response(f)
            assert status == 400, body
            assert json.loads(body)["errors"], body
        # The busy connection sends a request every third of the timeout for
        # three timeouts; each is answered on the same connection.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * KEEPALIVE:
            time.sleep(KEEPALIVE / 3)
            busy.sendall(request(BAD_JSON))
            assert read_response(fb)[0] == 400
        # Meanwhile the idle one has been closed by the server: EOF, not a timeout
        # of ours (30 s), and no response bytes.
        assert fi.read() == b""
        # The busy one is still open and served.
        busy.sendall(request(BAD_JSON))
        assert read_response(fb)[0] == 400
        # ...until it goes idle too.
        assert fb.read() == b""


# ------------------------------------------------------------ EIO on the spool

MSG = b"Subject: eio\r\n\r\nbody of the message\r\n"


def transaction(c, n: int) -> bytes:
    """One whole SMTP transaction on session *c*; the reply to the end of DATA, exactly."""
    replies = c.exchange(b"MAIL FROM:<eio@example.com>\r\nRCPT TO:<r%d@example.net>\r\n"
                         b"DATA\r\n" % n, 3)
    assert replies == [R.SENDER_OK, R.RCPT_OK, R.START_DATA], replies
    c.send(MSG + b"X-N: %d\r\n.\r\n" % n)
    return c.reply_bytes()


def qid(reply: bytes) -> str:
    m = QUEUED_RE.search(reply.decode())
    assert m and reply.startswith(b"250 "), reply
    return m.group(1)


@pytest.fixture
def eio_spool(make_daemon, tmp_path):
    """(a daemon whose spool is on crashfs, the CrashFS), one acceptor and one shard."""
    fs = CrashFS(str(tmp_path / "spoolfs"), str(tmp_path / "spoolfs.image"),
                 str(tmp_path / "crashfs.log"))
    fs.mount()
    d = make_daemon(start=False, acceptors=1, shards=1,
                    spool={"directory": os.path.join(fs.mountpoint, "spool"),
                           "segment_size": 1 << 20})
    try:
        d.start()
        yield d, fs
    finally:
        fs.fail()
        d.cleanup()
        d.kill9()
        fs.unmount()


@pytest.mark.parametrize("op", ["write", "fsync"])
def test_eio_answers_451_stores_nothing_and_heals_by_itself(eio_spool, op):
    d, fs = eio_spool
    with d.session() as c:
        first = qid(transaction(c, 1))
        fs.fail(op)
        # Every message while the disk fails: 451 4.3.0, exactly (never 5xx),
        # and the session goes on.
        for n in (2, 3):
            assert transaction(c, n) == R.STORAGE_TEMP
        d.wait_log(r"spool write failed: Input/output error; answering 451")
        assert c.cmd("NOOP") == (250, ["2.0.0 Ok"])
        # The shard is unhealthy and says why; the refused messages are not queued.
        shard = d.queue_summary()["shards"][0]
        assert shard["healthy"] is False and shard["error"] == "Input/output error", shard
        assert [x["queue_id"] for x in d.queue_list()] == [first]
        # The disk works again: the shard finds out by itself (no mail to write).
        fs.fail()
        d.wait_log(r"spool writes are succeeding again")
        shard = d.queue_summary()["shards"][0]
        assert shard["healthy"] is True and shard["error"] == "", shard
        second = qid(transaction(c, 4))
    assert {x["queue_id"] for x in d.queue_list()} == {first, second}
    assert d.stop() == 0
    stored = {x["queue_id"] for x in d.spool_dump()}
    assert {first, second} <= stored, sorted(stored)
    if op == "write":
        # A failed write leaves nothing behind: read back from disk, only the two are there.
        assert stored == {first, second}, sorted(stored)


# ------------------------------------------------- HTTP: the spool refuses some or all

def test_http_partial_spool_failure_and_the_all_refused_503(make_daemon):
    """Some messages of a request not made durable: 200 partial, those recipients in
    rcpt_to_errors with code 1901 (retry them); none made durable: 503 with Retry-After."""
    d = make_daemon(acceptors=1, shards=2, smtp={"spool_timeout": 1.0})
    n = 24
    body = {"recipients": [f"r{i:02d}@example.net" for i in range(n)],
            "content": {"from": "http@example.com", "subject": "partial", "text": "hi"}}
    kids = d.children()
    os.kill(kids["spool[1]"], signal.SIGSTOP)        # one shard stops answering
    try:
        st, _, res = d.post(body)
    finally:
        os.kill(kids["spool[1]"], signal.SIGCONT)
    assert st == 200, res
    r = res["results"]
    errors = r["rcpt_to_errors"]
    assert r["total_accepted_recipients"] + r["total_rejected_recipients"] == n, r
    # (queue ids spread over both shards: with 24 messages both halves are all but certain)
    assert r["total_accepted_recipients"] > 0 and r["total_rejected_recipients"] > 0, r
    assert len(errors) == r["total_rejected_recipients"]
    refused = set()
    for e in errors:
        assert (e["code"], e["message"]) == ("1901", "temporary failure"), e
        refused.add(int(re.match(r"recipients\[(\d+)\]: ", e["description"]).group(1)))
    accepted = {f"r{i:02d}@example.net" for i in range(n) if i not in refused}
    # Every recipient answered as accepted is queued (a refused one may be too, once the
    # stopped shard catches up: a possible duplicate of a retry, never a loss).
    queued = {x["recipients"][0] for x in d.queue_list()}
    assert accepted <= queued, sorted(accepted - queued)

    for name in ("spool[0]", "spool[1]"):             # now every shard is silent
        os.kill(kids[name], signal.SIGSTOP)
    try:
        st, headers, res = d.post(body)
    finally:
        for name in ("spool[0]", "spool[1]"):
            os.kill(kids[name], signal.SIGCONT)
    assert st == 503 and int(headers["retry-after"]) > 0, (st, headers, res)
    assert res["errors"][0]["code"] == "1901", res
