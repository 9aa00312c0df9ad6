"""What a hostile or careless client can do to the daemon, tried against ``mta serve``.

The relay client is 127.0.0.1 (``smtp.relay_networks``); a client from 127.0.0.2 may
not relay.  Each test asserts on the replies, the queue and the daemon's log.
"""
import time

import pytest

from daemon import QUEUED_RE
from mxlab import IPS, mx


@pytest.fixture(scope="module")
def mta(make_module_daemon):
    return make_module_daemon(acceptors=1, shards=1,
                              smtp={"relay_networks": ["127.0.0.1/32"]})


def _injected(d) -> list[str]:
    return [line for line in d.log().splitlines() if "X-Injected" in line and
            not line.startswith("20")]


@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.2"])
def test_an_ipv6_literal_zone_cannot_carry_a_line_break(mta, source):
    # RCPT TO:<v@[IPv6:::1%\nX-Injected: yes]>: ipaddress takes any zone, a bare LF is no
    # line end; it got 250 and its LF went into the Received header (a relay client) or
    # the "relay access denied" log line (anyone) as a line of the client's choosing.
    c = mta.connect(source=source)
    try:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd(b"RCPT TO:<v@[IPv6:::1%\nX-Injected: yes]>")[0] == 501
        assert c.cmd(b"RCPT TO:<v@[IPv6:fe80::1%eth0]>")[0] == 501
        assert c.cmd("RSET")[0] == 250
        assert c.cmd(b"MAIL FROM:<v@[IPv6:::1%\nX-Injected: yes]>")[0] == 501
        # the same transaction with a literal that is one still goes through
        if source == "127.0.0.1":
            assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<v@[IPv6:::1]>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            code, text = c.cmd(b"Subject: t\r\n\r\nbody\r\n.")
            assert code == 250 and QUEUED_RE.search(text[0])
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    assert _injected(mta) == []


FORGED = "2026-01-01 00:00:00,000 INFO delivery[0][1]: FORGED: to=<x@y.test> status=delivered"


def test_a_receiving_servers_reply_cannot_write_lines_into_the_log(lab):
    # The delivery log line quotes the server's reply; a multi-line reply (its lines joined
    # with LF) wrote the server's second line as a log line of its own, and a bare CR, an
    # ESC or a NUL inside a line went into the log as it came.
    replies = {"lf@dest.test": f"550-5.1.1 no such user\r\n550 5.1.1 {FORGED}",
               "cr@dest.test": f"550 5.1.1 no such user\r{FORGED}",
               "esc@dest.test": "550 5.1.1 no such user \x1b[2J\x1b[H\x00 cleared"}
    lab.aio(IPS[0], rcpt=lambda s, a, f: replies.get(a))
    lab.serve(mx("dest.test", "mx.dest.test", IPS[0]))
    d = lab.daemon()
    qid = d.send("alice@sender.test", list(replies), b"Subject: t\r\n\r\nbody\r\n")
    for rcpt in replies:
        d.wait_log(rf"{qid}: to=<{rcpt}> .*status=failed")
    log = d.log()
    for line in log.split("\n"):
        assert not line.startswith("2026-01-01"), line
        if qid in line and "status=failed" in line:
            assert line.isprintable(), repr(line)
            assert "FORGED" in line or "esc@" in line
    assert "\r" not in log and "\x1b" not in log and "\x00" not in log


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def test_a_refused_bdat_chunk_is_read_not_held(mta):
    # BDAT with no transaction (a client that may not relay has no RCPT taken) must be
    # read all the same (RFC 3030); it was held whole, up to smtp.max_message_size: 50 MiB
    # per connection, max_connections_per_ip (200) connections at a time per acceptor.
    [pid] = [p for name, p in mta.children().items() if name.startswith("acceptor")]
    before = _rss_mib(pid)
    clients = []
    size, piece = 40 << 20, b"A" * (1 << 20)
    try:
        for _ in range(4):
            c = mta.connect(source="127.0.0.2")
            clients.append(c)
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<b@example.net>")[0] == 554     # no relay
            c.send(b"BDAT %d LAST\r\n" % size)
            for _ in range(size // len(piece) - 1):
                c.send(piece)
        time.sleep(0.5)
        grown = _rss_mib(pid) - before
        assert grown < 40, f"the acceptor grew by {grown} MiB"    # it held 4 x 39 MiB
        for c in clients:       # each chunk ends: refused, and the session goes on
            c.send(piece)
            assert c.reply()[0] == 503
            assert c.cmd("NOOP")[0] == 250
    finally:
        for c in clients:
            c.close()
