"""The SMTP DSN extension (RFC 3461) end to end: the real daemon, real DNS, real receivers.

A client gives NOTIFY / ORCPT per recipient and ENVID / RET per message; what
the sender's own MX then receives (or does not) is checked as a user would:
the DSNs parsed with the stdlib ``email`` package (RFC 3464 fields), and what a
next hop that offers DSN was given on MAIL and RCPT.
"""
from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import smtplib
import time

from daemon import HOST, queued_id, split_received, wait_until
from mxlab import IPS, mx

from mta.queueid import shard_of

IP_A, IP_B = IPS[0], IPS[1]
ZONES = mx("dest.test", "mx.dest.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B)


def message(subject: str, body: bytes = b"the body text\r\n") -> bytes:
    return (f"From: Alice <alice@sender.test>\r\nTo: someone\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.monotonic_ns()}@client.test>\r\n\r\n").encode() + body


def send(d, rcpts: list[tuple[str, str]], msg: bytes, mail_params: str = "") -> str:
    """One message from alice@sender.test; *rcpts*: (address, RCPT parameters)."""
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("dsn")
        code, text = s.docmd(f"MAIL FROM:<alice@sender.test>{mail_params}")
        assert code == 250, (code, text)
        for addr, params in rcpts:
            code, text = s.docmd(f"RCPT TO:<{addr}>{params}")
            assert code == 250, (addr, code, text)
        code, text = s.data(msg)
    assert code == 250, (code, text)
    return queued_id(text.decode())


def report(data: bytes):
    """A DSN as the sender's MX got it: (message, per-message fields, [per-recipient
    fields], the returned part), checked to be an RFC 3464 multipart/report."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = msg.get_payload()
    assert len(parts) == 3, [p.get_content_type() for p in parts]
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    assert len(blocks) >= 2, blocks
    per_msg, per_rcpt = blocks[0], blocks[1:]
    assert per_msg["Reporting-MTA"] == "dns; mta.test"
    for r in per_rcpt:
        assert r["Final-Recipient"] and r["Action"] and r["Status"], r.items()
    return msg, per_msg, per_rcpt, parts[2]


def queue_empty(d) -> bool:
    return d.queue_summary()["total"]["messages"] == 0


def test_notify_never_success_and_envid_orcpt_without_dsn_at_the_next_hop(lab):
    """aiosmtpd does not offer DSN: NOTIFY=SUCCESS gets a "relayed" notice from us;
    NOTIFY=NEVER gets no bounce; no NOTIFY gets the usual bounce; ENVID and ORCPT
    appear in both reports; RET=HDRS returns only the headers."""
    refused = {"bob@dest.test", "cat@dest.test"}
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "550 5.1.1 no such user" if a in refused
                   else None)
    sender_mx = lab.aio(IP_B)
    lab.serve(ZONES)
    d = lab.daemon()
    m = message("dsn three ways")
    qid = send(d, [("ann@dest.test", " NOTIFY=SUCCESS ORCPT=rfc822;Ann+2Bx@orig.test"),
                   ("bob@dest.test", " NOTIFY=NEVER"),
                   ("cat@dest.test", " ORCPT=rfc822;cat@orig.test")],
               m, " RET=HDRS ENVID=QQ314159+2Bx")
    wait_until(lambda: sender_mx.received() >= 2, 20, "two DSNs at the sender's MX")
    wait_until(lambda: queue_empty(d), 20, "the queue to empty", interval=0.2)
    [t] = dest.snapshot()
    assert t.rcpt_tos == ["ann@dest.test"]
    assert not any("NOTIFY" in o or "ENVID" in o or "RET" in o for o in t.mail_options)

    got = sender_mx.snapshot()
    assert len(got) == 2, [x.data[:300] for x in got]   # bob (NEVER) has none
    by_action = {}
    for x in got:
        assert x.mail_from == "" and x.rcpt_tos == ["alice@sender.test"]
        msg, per_msg, per_rcpt, returned = report(x.data)
        assert per_msg["X-Queue-ID"] == qid
        assert per_msg["Original-Envelope-Id"] == "QQ314159+x"
        [r] = per_rcpt
        by_action[r["Action"]] = (msg, r, returned)

    msg, r, returned = by_action["relayed"]
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert r["Final-Recipient"] == "rfc822; ann@dest.test"
    assert r["Original-Recipient"] == "rfc822; Ann+x@orig.test"
    assert r["Status"] == "2.0.0"
    assert r["Remote-MTA"] == "dns; mx.dest.test"

    msg, r, returned = by_action["failed"]
    assert r["Final-Recipient"] == "rfc822; cat@dest.test"
    assert r["Original-Recipient"] == "rfc822; cat@orig.test"
    assert r["Status"] == "5.1.1"
    assert returned.get_content_type() == "text/rfc822-headers"
    text = returned.get_payload()
    assert "Subject: dsn three ways" in text and "the body text" not in text
    assert all(b"bob@dest.test" not in y.data for y in got)


def test_ret_full_returns_the_whole_message(lab):
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "550 5.1.1 no such user")
    sender_mx = lab.aio(IP_B)
    lab.serve(ZONES)
    d = lab.daemon()
    m = message("return it all", b"line one\r\nline two of the body\r\n")
    qid = send(d, [("zed@dest.test", "")], m, " RET=FULL")
    wait_until(lambda: sender_mx.received() >= 1, 20, "the bounce at the sender's MX")
    [b] = sender_mx.snapshot()
    msg, per_msg, [r], returned = report(b.data)
    assert per_msg["X-Queue-ID"] == qid and "Original-Envelope-Id" not in per_msg
    assert r["Action"] == "failed" and "Original-Recipient" not in r
    assert returned.get_content_type() == "message/rfc822"
    [inner] = returned.get_payload()
    assert inner["Subject"] == "return it all"
    assert inner.get_payload().replace("\r\n", "\n") == "line one\nline two of the body\n"
    # byte for byte: our Received header, then the message exactly as it was sent
    mark = b"Content-Type: message/rfc822\r\n\r\n"
    start = b.data.index(mark) + len(mark)
    head, rest = split_received(b.data[start:].split(b"\r\n--=_dsn_")[0])
    assert rest == m and qid.encode() in head
    assert dest.received() == 0


def test_a_next_hop_that_offers_dsn_gets_the_parameters_and_we_send_no_notice(lab):
    dest = lab.aio(IP_A, dsn=True)
    sender_mx = lab.aio(IP_B)
    lab.serve(ZONES)
    d = lab.daemon()
    m = message("pass it on")
    send(d, [("ann@dest.test", " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;ann+2B1@orig.test"),
             ("bob@dest.test", ""),
             ("cy@dest.test", " NOTIFY=NEVER")],
         m, " ENVID=env-42 RET=FULL")
    t = dest.wait_for("ann@dest.test")
    wait_until(lambda: queue_empty(d), 20, "the queue to empty", interval=0.2)
    assert t.rcpt_tos == ["ann@dest.test", "bob@dest.test", "cy@dest.test"]
    # aiosmtpd upper-cases the parameters it records
    assert "RET=FULL" in t.mail_options and "ENVID=ENV-42" in t.mail_options, t.mail_options
    assert dict(dest.rcpt_params) == {
        "ann@dest.test": ["NOTIFY=SUCCESS,DELAY", "ORCPT=RFC822;ANN+2B1@ORIG.TEST"],
        "bob@dest.test": [],
        "cy@dest.test": ["NOTIFY=NEVER"]}
    # the next hop does DSN: a success notice is its job, not ours
    assert sender_mx.received() == 0


def test_delay_notice_once_and_not_again_after_a_restart(lab):
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "451 4.2.0 try again later")
    sender_mx = lab.aio(IP_B)
    lab.serve(ZONES)
    d = lab.daemon(retry_schedule=[1.0], delay_warning_time=2.0, max_age=3600.0)

    def attempts():
        with dest.lock:
            return sum(1 for _, a, _ in dest.rcpt_log if a == "dee@dest.test")

    m = message("slow going")
    qid = send(d, [("dee@dest.test", " ORCPT=rfc822;dee@orig.test"),
                   ("fay@dest.test", " NOTIFY=FAILURE")], m, " ENVID=slow-1")
    wait_until(lambda: sender_mx.received() >= 1, 30, "the delay notice")
    [n] = sender_mx.snapshot()
    msg, per_msg, per_rcpt, returned = report(n.data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert per_msg["X-Queue-ID"] == qid and per_msg["Original-Envelope-Id"] == "slow-1"
    [r] = per_rcpt                     # fay asked for failure notices only
    assert r["Final-Recipient"] == "rfc822; dee@dest.test"
    assert r["Original-Recipient"] == "rfc822; dee@orig.test"
    assert r["Action"] == "delayed" and r["Status"] == "4.2.0"
    assert r["Will-Retry-Until"]
    assert returned.get_content_type() == "text/rfc822-headers"

    # more deferrals: no second notice
    seen = attempts()
    wait_until(lambda: attempts() >= seen + 2, 30, "two more attempts")
    assert sender_mx.received() == 1
    # and none after a restart (the flag is on disk)
    d.stop()
    d.start()
    seen = attempts()
    wait_until(lambda: attempts() >= seen + 3, 30, "three attempts after the restart")
    assert sender_mx.received() == 1
    assert [q["queue_id"] for q in d.queue_list()] == [qid]   # still deferred, not lost


def test_a_recipient_never_tried_gets_its_delay_notice_by_time_in_queue(lab):
    """A recipient whose site the operator suspended is never tried, so never deferred:
    it still gets its delay notice once it has waited delay_warning_time (as Postfix and
    PowerMTA warn by time in queue), once, and not for NOTIFY without DELAY."""
    dest = lab.aio(IP_A)
    sender_mx = lab.aio(IP_B)
    lab.serve(ZONES)
    d = lab.daemon(delay_warning_time=2.0, max_age=3600.0)
    d.cli("suspend", "--domain", "dest.test", "--reason", "complaints")
    qid = send(d, [("dee@dest.test", " ORCPT=rfc822;dee@orig.test"),
                   ("fay@dest.test", " NOTIFY=FAILURE")], message("held back"), " ENVID=held-1")
    wait_until(lambda: sender_mx.received() >= 1, 30, "the delay notice")
    [n] = sender_mx.snapshot()
    msg, per_msg, per_rcpt, _ = report(n.data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert per_msg["X-Queue-ID"] == qid and per_msg["Original-Envelope-Id"] == "held-1"
    [r] = per_rcpt                     # fay asked for failure notices only
    assert r["Final-Recipient"] == "rfc822; dee@dest.test"
    assert r["Original-Recipient"] == "rfc822; dee@orig.test"
    assert r["Action"] == "delayed" and r["Status"].startswith("4.")
    assert r["Will-Retry-Until"] and "Last-Attempt-Date" not in r   # (never tried)
    time.sleep(5.0)                    # (two more intervals: no second notice)
    assert sender_mx.received() == 1 and dest.received() == 0
    assert [q["queue_id"] for q in d.queue_list()] == [qid]


# ---------------------------------------- one bounce per message for several domains

IP_C = IPS[2]
TWO_DOMAINS = ZONES + mx("other.test", "mx.other.test", IP_C)


def final_recipients(per_rcpt) -> list[str]:
    return sorted(r["Final-Recipient"] for r in per_rcpt)


def test_a_message_deferred_at_two_sites_gets_one_delay_notice_per_interval(lab):
    """A message to two domains is two delivery jobs; both deferred past
    delay_warning_time, their outcomes come in different group commits (one site is
    slower).  The sender gets at most one delay notice per message in each
    delay_warning_time, not one per batch; a recipient left out of one is in the next
    (each recipient's once)."""
    warning = 3.0
    notices = []                          # (arrival time, recipients)

    def took(s, txn):
        _, _, per_rcpt, _ = report(txn.data)
        notices.append((time.time(), sorted(r["Final-Recipient"] for r in per_rcpt)))
    lab.aio(IP_A, rcpt=lambda s, a, f: "451 4.2.0 try again later")
    slow = lab.aio(IP_C, data=lambda s, t: "451 4.3.0 busy, later")
    slow.delay = 1.0                      # its deferrals come a second after the other's
    lab.aio(IP_B, data=took)
    lab.serve(TWO_DOMAINS)
    d = lab.daemon(retry_schedule=[0.5], retry_jitter=0.0, delay_warning_time=warning,
                   max_age=3600.0)
    qid = send(d, [("ann@dest.test", ""), ("bob@other.test", "")], message("two sites"))
    wait_until(lambda: len({r for _, rs in notices for r in rs}) == 2, 30,
               "delay notices naming both recipients")
    time.sleep(2.0)                       # (more deferrals of both: nothing more is sent)
    times = [t for t, _ in notices]
    assert sorted(r for _, rs in notices for r in rs) == \
        ["rfc822; ann@dest.test", "rfc822; bob@other.test"], notices    # each once
    assert all(b - a >= warning - 0.3 for a, b in zip(times, times[1:])), \
        [round(t - times[0], 2) for t in times]
    assert len(notices) <= 2
    assert qid in {q["queue_id"] for q in d.queue_list()}


def test_failures_at_two_domains_at_different_times_make_one_bounce(lab):
    """A message to two domains is two delivery jobs; the first fails at once, the
    other minutes -- here seconds -- later: their outcomes come in different group
    commits, and the sender gets one DSN listing both (as Postfix: one per pass)."""
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "550 5.1.1 no such user")
    slow = lab.aio(IP_C, data=lambda s, t: "554 5.7.1 refused after a while")
    slow.delay = 3.0
    sender_mx = lab.aio(IP_B)
    lab.serve(TWO_DOMAINS)
    d = lab.daemon()
    qid = send(d, [("ann@dest.test", ""), ("bob@other.test", " ORCPT=rfc822;bob@orig.test")],
               message("two domains, two refusals"))
    wait_until(lambda: sender_mx.received() >= 1, 30, "the bounce at the sender's MX")
    wait_until(lambda: queue_empty(d), 30, "the queue to empty", interval=0.2)
    assert len(slow.rejected) == 1 and dest.received() == 0
    [b] = sender_mx.snapshot()            # (every DSN queued was delivered: queue empty)
    msg, per_msg, per_rcpt, returned = report(b.data)
    assert per_msg["X-Queue-ID"] == qid
    assert final_recipients(per_rcpt) == ["rfc822; ann@dest.test", "rfc822; bob@other.test"]
    by = {r["Final-Recipient"]: r for r in per_rcpt}
    ann, bob = by["rfc822; ann@dest.test"], by["rfc822; bob@other.test"]
    assert ann["Status"] == "5.1.1" and ann["Remote-MTA"] == "dns; mx.dest.test"
    assert "550 5.1.1 no such user" in ann["Diagnostic-Code"]
    assert bob["Status"] == "5.7.1" and bob["Remote-MTA"] == "dns; mx.other.test"
    assert bob["Original-Recipient"] == "rfc822; bob@orig.test"
    # the first failure was held while the other job was out (not bounced in its batch)
    assert re.search(rf"{qid}: bounce for 1 recipient\(s\) held", d.log())
    bounces = [e for e in d.events() if e["type"] == "bounce" and e.get("message_id")
               and e["rcpt_to"] in ("ann@dest.test", "bob@other.test")]
    assert len(bounces) == 2            # the events are not held: one each, at once


def test_a_held_bounce_survives_kill9_of_the_spool_shard_and_is_sent_once(lab):
    """kill -9 of the message's spool shard after the first failure is durable and
    while the other domain's job is still out (a slow receiver): the bounce was
    owed, not sent; the restarted shard sends it in its first batch.  A second kill
    after that sends nothing again (the flags were cleared with the DSN)."""
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "550 5.1.1 no such user")
    slow = lab.aio(IP_C)
    slow.delay = 12.0                     # bob's job stays out through the kills
    sender_mx = lab.aio(IP_B)
    lab.serve(TWO_DOMAINS)
    d = lab.daemon(data_timeout=40.0)
    qid = send(d, [("ann@dest.test", ""), ("bob@other.test", "")],
               message("held across a crash"))
    title = f"spool[{shard_of(qid, 2)}]"

    def ann_bounced():                    # the event is durable once it is in the log
        return any(e["type"] == "bounce" and e["rcpt_to"] == "ann@dest.test"
                   for e in d.events())

    wait_until(ann_bounced, 30, "ann's failure recorded", interval=0.1)
    time.sleep(1.5)       # (a bounce queued with the failure would have arrived by now)
    assert sender_mx.received() == 0      # held: bob's job is out
    assert re.search(rf"{qid}: bounce for 1 recipient\(s\) held", d.log())
    for _ in range(2):
        old = d.children()[title]
        os.kill(old, signal.SIGKILL)
        new = d.wait_restarted(title, old)
        d.wait_log(rf"{re.escape(title)}\[{new}\]: recovered queue", timeout=20)
        wait_until(lambda: sender_mx.received() >= 1, 20, "the bounce after the restart")
        # (sent by the restart, not by bob's outcome: his job is still out, he pending)
        assert slow.received() == 0 and qid in {q["queue_id"] for q in d.queue_list()}
    slow.delay = 0.0
    slow.wait_for("bob@other.test", timeout=60)
    wait_until(lambda: queue_empty(d), 60, "the queue to empty", interval=0.2)
    [b] = sender_mx.snapshot()
    msg, per_msg, per_rcpt, returned = report(b.data)
    assert per_msg["X-Queue-ID"] == qid
    [r] = per_rcpt
    assert r["Final-Recipient"] == "rfc822; ann@dest.test" and r["Status"] == "5.1.1"
    assert "550 5.1.1 no such user" in r["Diagnostic-Code"]
    assert r["Remote-MTA"] == "dns; mx.dest.test" and r["Last-Attempt-Date"]
    assert dest.received() == 0
