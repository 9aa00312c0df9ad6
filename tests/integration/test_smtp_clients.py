"""Real clients (smtplib, swaks, Postfix's smtp-source) against the real daemon."""
import smtplib
import subprocess

from daemon import HOST
from loadclient import smtp_source_argv


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


def test_swaks_pipelined(daemon):
    r = subprocess.run(
        ["swaks", "--server", f"{HOST}:{daemon.port}", "--from", "s@example.com",
         "--to", "r@example.net", "--pipeline", "--header", "Subject: swaks test",
         "--body", "hello from swaks"], capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "250 2.0.0 Ok: queued as" in out
    q = daemon.queue_list()
    assert [x["recipients"] for x in q] == [["r@example.net"]]


def test_smtp_source_20_sessions_1000_each(daemon):
    d = daemon
    n = 20_000
    r = subprocess.run(smtp_source_argv(d.port, 20, n, "load@example.com", "sink@example.net"),
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    summary = d.queue_summary()
    assert summary["total"]["messages"] == n
    assert summary["total"]["recipients"] == n
    listed = d.queue_list()
    ids = [x["queue_id"] for x in listed]
    assert len(ids) == n and len(set(ids)) == n
    assert d.stop() == 0
    dumped = d.spool_dump()
    assert sorted(x["queue_id"] for x in dumped) == sorted(ids)
