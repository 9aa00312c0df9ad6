"""Receivers that misbehave on purpose, against the real daemon (``mta serve``), a real
DNS server on loopback and scripted receiving servers.

A receiver's reply may be up to the client's MAX_REPLY_BYTES (64 KiB, so that a long
EHLO list is read whole); a refusal that long, different for each recipient, went into
every recipient's outcome as it was said: into its event (raw_reason), the DSN to the
sender (one Diagnostic-Code each) and the suppression list -- a thousandfold
amplification of a normal reply, from one hostile receiver, at every attempt.
"""
from __future__ import annotations

from daemon import wait_until
from mxlab import IPS, mx
from test_delivery import message, parse_dsn, wait_queue_empty

IP_A, IP_B = IPS[0], IPS[1]
LINES = 80                  # lines of each refusal
LINE = 500                  # octets of text a line (RFC 5321 4.5.3.1.5: 512 with the code)
RCPTS = 12
KEPT = 4096                 # characters of a reply an outcome may keep, at most (generous)


def _long_refusal(s, address, mail_from):
    who = address.split("@")[0]
    text = [f"5.1.1 {who} line {i} ".ljust(LINE, "x") for i in range(LINES)]
    return "\r\n".join(f"550-{t}" for t in text[:-1]) + f"\r\n550 {text[-1]}"


def test_a_very_long_refusal_is_kept_short_in_events_and_the_dsn(lab):
    lab.aio(IP_A, rcpt=_long_refusal)
    sender_mx = lab.aio(IP_B)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B))
    d = lab.daemon()
    rcpts = [f"r{i:02d}@dest.test" for i in range(RCPTS)]
    qid = d.send("alice@sender.test", rcpts, message("long refusals"))
    wait_queue_empty(d)
    wait_until(lambda: sender_mx.received() >= 1, 20, "the DSN at the sender's MX")

    def bounces():
        return {e["raw_rcpt_to"]: e for e in d.events()
                if e["queue_id"] == qid and e["type"] == "bounce"}
    ev = wait_until(lambda: len(bounces()) == RCPTS and bounces(), 15, "the bounce events")
    for rcpt, e in ev.items():
        who = rcpt.split("@")[0]
        # the reply is still the server's (its code, enhanced code, first words)...
        assert e["raw_reason"].startswith(f"550 5.1.1 {who} line 0 "), e["raw_reason"][:80]
        assert e["error_code"] == "550" and e["bounce_class"] == "10", e
        # ...but not all 40 KB of it
        assert len(e["raw_reason"]) <= KEPT, (rcpt, len(e["raw_reason"]))
    [b] = sender_mx.snapshot()
    _, _, per_rcpt = parse_dsn(b.data)
    assert len(per_rcpt) == RCPTS
    for r in per_rcpt:
        assert r["Diagnostic-Code"].startswith("smtp; 550 5.1.1 r"), r["Diagnostic-Code"][:80]
    # the returned message is a few hundred octets; twelve 40 KB diagnostics were 480 KB
    assert len(b.data) < RCPTS * KEPT + 20_000, len(b.data)
