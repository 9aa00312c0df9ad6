"""The smart sink itself: each provider-like behaviour, seen by a real SMTP client."""
from __future__ import annotations

import smtplib
import socket
import time

import pytest
from sinks import common_port
from smartsink import Policy, SmartSink, rate_per_window

IP = "127.0.0.20"


@pytest.fixture
def sink():
    made = []

    def make(default=None, **kw):
        s = SmartSink(IP, common_port([IP]), default, **kw).start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def send(s: SmartSink, rcpts, source="127.0.0.1", sender="a@example.com", count=1):
    """*count* messages on one connection; the reply to each (code, text) or the error."""
    out = []
    with smtplib.SMTP(s.ip, s.port, source_address=(source, 0), timeout=10) as c:
        c.ehlo("client.test")
        for _ in range(count):
            try:
                refused = c.sendmail(sender, rcpts, b"Subject: t\r\n\r\nbody\r\n")
                out.append(("ok", refused))
            except smtplib.SMTPRecipientsRefused as exc:
                out.append(("refused", exc.recipients))
            except smtplib.SMTPSenderRefused as exc:
                out.append(("sender", exc.smtp_code, exc.smtp_error.decode()))
                break
            except smtplib.SMTPServerDisconnected:
                out.append(("closed",))
                break
    return out


def test_accepts_and_records(sink):
    s = sink()
    assert send(s, ["u@d.test"]) == [("ok", {})]
    [a] = s.deliveries()
    assert a.client_ip == "127.0.0.1" and a.rcpts == ["u@d.test"] and a.size > 0
    stages = [(x.stage, x.rcpt, x.reply[:3]) for x in s.snapshot()]
    assert stages == [("rcpt", "u@d.test", "250"), ("data", "u@d.test", "250")]


def test_421_after_n_messages_per_connection(sink):
    s = sink(Policy(max_per_connection=3))
    got = send(s, ["u@d.test"], count=5)
    assert got[:3] == [("ok", {})] * 3
    assert got[3][0] in ("sender", "closed") and (got[3][0] == "closed" or got[3][1] == 421)
    assert s.received() == 3
    # A new connection may send again.
    assert send(s, ["u@d.test"]) == [("ok", {})]


def test_rate_per_client_ip_window_with_other_client_unaffected(sink):
    s = sink(Policy(), by_client={"127.0.0.21": Policy(max_per_window=4, window=1.5)})
    for _ in range(4):
        assert send(s, ["u@d.test"], source="127.0.0.21") == [("ok", {})]
    got = send(s, ["u@d.test"], source="127.0.0.21")
    assert got[0][0] == "sender" and got[0][1] == 421 and "[TSS04]" in got[0][2], got
    assert "127.0.0.21" in got[0][2]
    # Another client IP is not limited.
    for _ in range(6):
        assert send(s, ["u@d.test"], source="127.0.0.22") == [("ok", {})]
    time.sleep(1.6)     # the window slides past the first four
    assert send(s, ["u@d.test"], source="127.0.0.21") == [("ok", {})]
    counts = rate_per_window(s.deliveries(), 1.5)
    assert counts["127.0.0.21"] == 4 and counts["127.0.0.22"] == 6
    rejected = [x for x in s.snapshot() if x.reply.startswith("421")]
    assert len(rejected) == 1 and rejected[0].client_ip == "127.0.0.21"
    assert rejected[0].stage == "mail"


def test_greylisting_per_triplet(sink):
    s = sink(by_domain={"grey.test": Policy(greylist=True, greylist_delay=0.3)})
    assert send(s, ["u@grey.test"])[0][0] == "refused"
    assert send(s, ["u@plain.test"]) == [("ok", {})]
    assert send(s, ["u@grey.test"])[0][0] == "refused"        # too soon
    time.sleep(0.4)
    assert send(s, ["u@grey.test"]) == [("ok", {})]
    assert send(s, ["u@grey.test"], sender="b@example.com")[0][0] == "refused"  # new triplet
    codes = [x.reply[:3] for x in s.snapshot() if x.rcpt == "u@grey.test" and x.stage == "rcpt"]
    assert codes == ["450", "450", "250", "450"]


def test_unknown_users_share_is_stable(sink):
    s = sink(Policy(unknown_share=0.5))
    rcpts = [f"user{n}@d.test" for n in range(200)]
    first = {r: send(s, [r])[0][0] for r in rcpts[:40]}
    again = {r: send(s, [r])[0][0] for r in rcpts[:40]}
    assert first == again
    refused = sum(1 for v in first.values() if v == "refused")
    assert 8 <= refused <= 32, refused
    assert send(s, ["unknown-x@d.test"])[0][0] == "refused"
    assert any(x.reply.startswith("550 5.1.1") for x in s.snapshot())


def test_slow_replies_and_hang(sink):
    s = sink(Policy(reply_delay=0.2))
    t0 = time.monotonic()
    assert send(s, ["u@d.test"]) == [("ok", {})]
    assert time.monotonic() - t0 >= 0.2 * 5      # greeting, EHLO, MAIL, RCPT, DATA, ...
    s.set_policy(hang=True)
    with socket.create_connection((s.ip, s.port), timeout=10) as c:
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c.recv(100)                           # no greeting
    assert s.snapshot()[-1].reply == "(hang)"


def test_policy_change_while_running(sink):
    s = sink(Policy(rcpt_reply="451 4.7.500 Server busy. Please try again later from [{ip}]."))
    assert send(s, ["u@d.test"])[0][0] == "refused"
    assert "[127.0.0.1]" in s.snapshot()[-1].reply
    s.set_policy(rcpt_reply="")
    assert send(s, ["u@d.test"]) == [("ok", {})]
