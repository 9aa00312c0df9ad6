"""Real clients (smtplib, swaks, Postfix's smtp-source) against the real daemon."""
import base64
import re
import smtplib
import socket
import subprocess
import time

from daemon import HOST, free_port, queued_id, split_received
from loadclient import smtp_source_argv
from sinks import SmtpSink

SOURCE_SIZE = 2048


def smtp_source_reference(size: int) -> bytes:
    """The payload (after its header) smtp-source sends with -l *size*, CRLF line ends.

    smtp-sink, an independent peer, is the oracle: one message of *size* to it,
    and its dump gives the payload smtp-source generates (dumps have LF line
    ends; the wire has CRLF).
    """
    sink = SmtpSink(HOST, free_port()).start()
    try:
        r = subprocess.run(smtp_source_argv(sink.port, 1, 1, "load@example.com",
                                            "sink@example.net", size),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        [m] = sink.messages()
    finally:
        sink.stop()
    _, _, payload = m.message.partition(b"\n\n")    # (parse_dump took its final empty line)
    return payload.replace(b"\n", b"\r\n")


def test_smtplib_multiple_recipients_byte_exact(daemon):
    body = (b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hello\r\n\r\n"
            b"line one\r\n.line starting with a dot\r\n\r\nlast\r\n")
    with smtplib.SMTP(HOST, daemon.port) as s:
        code, text = s.ehlo("client.test")
        assert code == 250
        for ext in (b"PIPELINING", b"SIZE", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SMTPUTF8",
                    b"CHUNKING"):
            assert ext in text
        assert b"AUTH" not in text and b"STARTTLS" not in text
        s.sendmail("a@example.com", ["b@example.net", "c@example.org"], body)
    q = daemon.queue_list()
    assert len(q) == 1
    assert q[0]["sender"] == "a@example.com"
    assert q[0]["recipients"] == ["b@example.net", "c@example.org"]
    raw = daemon.cli("queue", "show", "--raw", q[0]["queue_id"]).stdout
    assert raw.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mta.test (mta) with ESMTP id "
                          + q[0]["queue_id"].encode())
    # Everything after our Received header is what the client sent (dot-unstuffed).
    assert raw.endswith(b"\r\n" + body)
    assert raw.count(b"Received:") == 1


def half_closed_session(port: int, sent: bytes) -> tuple[list[bytes], float]:
    """Send *sent* after the greeting, shut the write side (printf ... | nc -N), read to
    the end: (the reply lines, seconds from the shutdown to the server's end of file)."""
    with socket.create_connection((HOST, port), timeout=20) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(sent)
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        got = f.read()
        return got.splitlines(), time.monotonic() - t0


def test_a_client_that_half_closes_after_a_pipelined_session_gets_every_reply(make_daemon):
    """The 250s of messages still on their way to the spool (and the 221 of the QUIT
    held behind them) are written after the client shut its side, then the server
    closes: a client that got no 250 would send the message again."""
    d = make_daemon(smtp={"linger_timeout": 30.0})
    msg = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" \
          b"Subject: x\r\n\r\nbody\r\n.\r\n"
    lines, took = half_closed_session(d.port, b"EHLO c.test\r\n" + msg + msg + b"QUIT\r\n")
    queued = [queued_id(x[4:].decode()) for x in lines if b"queued as" in x]
    assert len(queued) == 2 and lines[-1].startswith(b"221"), lines
    assert sorted(x["queue_id"] for x in d.queue_list()) == sorted(queued)
    assert took < 10     # closed once answered, not at linger_timeout
    # With nothing pending, or in the middle of a message, the connection closes at once
    # (the replies already due still go out).
    lines, took = half_closed_session(d.port, b"EHLO c.test\r\n")
    assert lines[-1].startswith(b"250 ") and took < 10, lines
    lines, took = half_closed_session(d.port, b"EHLO c.test\r\n" + msg[:-5])
    assert lines[-1].startswith(b"354") and took < 10, lines
    assert len(d.queue_list()) == 2


def test_address_literals_the_resolver_cannot_route_are_refused_at_rcpt(daemon):
    # [::1] lacks the "IPv6:" tag, [IPv6:192.0.2.1] is IPv4 with it: a 250 would bounce later
    with smtplib.SMTP(HOST, daemon.port) as s:
        s.ehlo("client.test")
        s.mail("a@example.com")
        assert s.rcpt("b@[::1]")[0] == 501
        assert s.rcpt("b@[IPv6:192.0.2.1]")[0] == 501
        assert s.rcpt("b@[IPv6:2001:db8::1]")[0] == 250


def test_swaks_pipelined(daemon, tmp_path):
    message = (b"From: <s@example.com>\r\nTo: <r@example.net>\r\nSubject: swaks test\r\n"
               b"Message-ID: <swaks.1@example.com>\r\n\r\nhello from swaks\r\n"
               b".a line that needs dot-stuffing\r\n\r\nend\r\n")
    data = tmp_path / "message.eml"
    data.write_bytes(message[:-2])     # swaks ends the data with CRLF "." CRLF itself
    r = subprocess.run(
        ["swaks", "--server", f"{HOST}:{daemon.port}", "--from", "s@example.com",
         "--to", "r@example.net", "--pipeline", "--data", f"@{data}"],
        capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    qid = re.search(r"250 2\.0\.0 Ok: queued as (\S+)", out).group(1)
    q = daemon.queue_list()
    assert [(x["queue_id"], x["recipients"]) for x in q] == [(qid, ["r@example.net"])]
    raw = daemon.cli("queue", "show", "--raw", qid).stdout
    # Byte for byte what swaks sent, after our Received header.
    assert split_received(raw)[1] == message


def test_smtp_source_20_sessions_1000_each(daemon):
    d = daemon
    n = 20_000
    r = subprocess.run(smtp_source_argv(d.port, 20, n, "load@example.com", "sink@example.net",
                                        SOURCE_SIZE),
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    summary = d.queue_summary()
    assert summary["total"]["messages"] == n
    assert summary["total"]["recipients"] == n
    listed = d.queue_list()
    ids = [x["queue_id"] for x in listed]
    assert len(ids) == n and len(set(ids)) == n
    assert d.stop() == 0
    dumped = d.spool_dump(bodies=True)
    assert sorted(x["queue_id"] for x in dumped) == sorted(ids)
    # Every stored message is byte for byte what smtp-source sent: its four
    # header lines (Date and Message-Id vary), then the payload smtp-sink saw.
    payload = smtp_source_reference(SOURCE_SIZE)
    head = re.compile(rb"From: <load@example\.com>\r\nTo: <sink@example\.net>\r\n"
                      rb"Date: [^\r\n]+\r\nMessage-Id: <([^\r\n>]+)>\r\n\r\n")
    message_ids = set()
    for x in dumped:
        body = split_received(base64.b64decode(x["message"]))[1]
        m = head.match(body)
        assert m, body[:300]
        assert body[m.end():] == payload, x["queue_id"]
        message_ids.add(m.group(1))
    assert len(message_ids) == n
