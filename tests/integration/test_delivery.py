"""Delivery end to end: real DNS, real receiving servers, the real daemon.

Each test starts a lab (the fixture ``lab``, tests/integration/mxlab.py): unbound
on loopback (tests/dnsserver.py) serving test zones whose MX records point at
127.0.0.x, receiving servers on those addresses (aiosmtpd with scripted replies,
Postfix's smtp-sink dumping every transaction; tests/sinks.py), and ``mta serve``
with ``delivery.hold = false``, ``delivery.nameservers`` = that unbound and
``delivery.mx_port`` = the port every receiver listens on.  Nothing resolves or connects anywhere else: every
recipient and bounce-receiving sender domain is in a served zone, every
address is 127.0.0.x.

What is checked is what a user would see: the bytes and envelope each
receiver got (our Received header + the message exactly as submitted), the
replies that decided each recipient, the DSNs that reach the sender's own MX,
``mta queue`` while mail is deferred, and the event log: one injection and one
terminal event per recipient, agreeing with the receivers.
"""
from __future__ import annotations

import collections
import email
import email.policy
import json
import os
import random
import re
import signal
import smtplib
import socket
import threading
import time

import dns.message
import dns.query
from daemon import (HOST, event_kind, fd_table, queued_id, smtp_transaction, split_received,
                    wait_until)
from mta import proc
from mta.delivery import limits
from mta.queueid import domain_shard
from mxlab import IPS, mx
from sinks import qid_of

IP_A, IP_B, IP_C, IP_D, IP_E, IP_F = IPS
TERMINAL = ("delivery", "bounce", "expiration")


# ---------------------------------------------------------------------------- helpers

def message(subject: str, body: bytes = b"hello\r\n", extra: bytes = b"") -> bytes:
    mid = f"<{subject.replace(' ', '-')}.{time.monotonic_ns()}@client.test>"
    return (f"From: Alice <alice@sender.test>\r\nTo: someone\r\nSubject: {subject}\r\n"
            f"Message-ID: {mid}\r\n").encode() + extra + b"\r\n" + body


def queue_empty(d) -> bool:
    return d.queue_summary()["total"]["messages"] == 0


def wait_queue_empty(d, timeout=20.0):
    wait_until(lambda: queue_empty(d), timeout, "the queue to empty", interval=0.2)


def bounce_receptions(d) -> list[dict]:
    """Injection events of the DSNs the daemon generated (client 'bounce of QID')."""
    return [e for e in d.events()
            if e["type"] == "injection" and e.get("client", "").startswith("bounce of ")]


def wait_bounce_receptions(d, n: int, timeout: float = 15.0) -> list[dict]:
    """The injection events of the daemon's DSNs, once there are *n* of them (an empty
    queue does not mean the events process has written them yet)."""
    wait_until(lambda: len(bounce_receptions(d)) >= n, timeout, f"{n} DSN injection event(s)",
               interval=0.1)
    return bounce_receptions(d)


def check_events(d, expected: dict) -> dict:
    """The event log holds exactly one injection and one terminal event per expected
    (qid, recipient), of the expected type (:func:`event_kind`: an expiry is
    "expiration"), and nothing for anything else; each event_id once.

    Returns {(qid, rcpt): {"reception": ev, "terminal": ev, "transient": [ev, ...]}}.
    The events process publishes within a poll interval of the spool's commit:
    first wait (bounded) until every expected pair has a terminal event.
    """
    def complete():
        done = {(e["queue_id"], e["raw_rcpt_to"]) for e in d.events()
                if event_kind(e) in TERMINAL}
        return set(expected) <= done
    wait_until(complete, 15, "the terminal events in the event log", interval=0.1)
    by: dict = collections.defaultdict(lambda: {"reception": [], "terminal": [],
                                                 "transient": []})
    for e in d.events():
        key = (e["queue_id"], e["raw_rcpt_to"])
        if e["type"] == "injection":
            by[key]["reception"].append(e)
        elif event_kind(e) in TERMINAL:
            by[key]["terminal"].append(e)
        elif e["type"] == "delay":
            by[key]["transient"].append(e)
        else:
            raise AssertionError(f"unknown event type {e}")
    assert set(by) == set(expected), (sorted(by), sorted(expected))
    out = {}
    for key, want in expected.items():
        got = by[key]
        assert len(got["reception"]) == 1, (key, got["reception"])
        assert len(got["terminal"]) == 1, (key, got["terminal"])
        assert event_kind(got["terminal"][0]) == want, (key, got["terminal"])
        assert float(got["reception"][0]["event_time"]) <= \
            float(got["terminal"][0]["event_time"])
        out[key] = {"reception": got["reception"][0], "terminal": got["terminal"][0],
                    "transient": got["transient"]}
    return out


def parse_dsn(data: bytes):
    """A DSN as the sender's MX got it: (message, per-message fields, [per-recipient])."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"], \
        [p.get_content_type() for p in parts]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, blocks
    return msg, blocks[0], blocks[1:]


def received_ok(data: bytes, original: bytes, qid: str) -> None:
    """*data* is our Received header (naming *qid*) followed by *original*, byte for byte."""
    head, rest = split_received(data)
    assert rest == original, (rest[:300], original[:300])
    assert qid_of(data) == qid, (qid_of(data), qid, head)
    assert re.match(rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\tby mta\.test ",
                    head), head


# ------------------------------------------------------------------ basic delivery

def test_mx_delivery_is_byte_identical_with_envelope_kept(lab):
    ai = lab.aio(IP_A)
    sink = lab.smtp_sink(IP_B)
    lab.serve(mx("ai.test", "mx.ai.test", IP_A) + mx("sink.test", "mx.sink.test", IP_B)
              + mx("sender.test", "mx.sender.test", IP_C))
    d = lab.daemon()
    body = (b"first line\r\n.a line starting with a dot\r\n.\r\n..two dots\r\n"
            b"trailing spaces   \r\n\ttab\r\n" + b"x" * 990 + b"\r\n\r\n\r\nlast\r\n")
    m1 = message("to two domains", body, extra=b"X-Custom:  folded\r\n  value\r\n")
    rcpts = ["ann@ai.test", "bob@ai.test", "cat@sink.test", "dan@sink.test"]
    q1 = d.send("alice@sender.test", rcpts, m1)
    # 8-bit message, submitted with BODY=8BITMIME
    m2 = message("eight bit", "Grüße, ça va?\r\n".encode())
    q2 = d.send("alice@sender.test", ["eve@ai.test"], m2, ["BODY=8BITMIME"])

    wait_until(lambda: ai.received() == 2 and sink.count() == 1, 15, "both receivers")
    wait_queue_empty(d)

    # aiosmtpd: exact bytes; the two recipients of one message and domain share
    # one transaction with two RCPTs.
    txns = {qid_of(t.data): t for t in ai.snapshot()}
    assert set(txns) == {q1, q2}
    t1 = txns[q1]
    assert t1.mail_from == "alice@sender.test"
    assert t1.rcpt_tos == ["ann@ai.test", "bob@ai.test"]
    received_ok(t1.data, m1, q1)
    t2 = txns[q2]
    assert t2.mail_from == "alice@sender.test" and t2.rcpt_tos == ["eve@ai.test"]
    assert "BODY=8BITMIME" in [o.upper() for o in t2.mail_options], t2.mail_options
    received_ok(t2.data, m2, q2)

    # smtp-sink: its dump has LF line ends; otherwise identical.
    [dump] = sink.messages()
    assert dump.mail_from == "alice@sender.test"
    assert dump.rcpt_tos == ["cat@sink.test", "dan@sink.test"]
    assert dump.client_ip.startswith("127.")
    head, rest = split_received(dump.message)
    assert rest == m1.replace(b"\r\n", b"\n")
    assert qid_of(dump.message) == q1

    ev = check_events(d, {(q1, r): "delivery" for r in rcpts} | {(q2, "eve@ai.test"): "delivery"})
    for r in rcpts:
        t = ev[(q1, r)]["terminal"]
        want_ip, want_host = (IP_A, "mx.ai.test") if r.endswith("ai.test") else \
            (IP_B, "mx.sink.test")
        assert (t["ip_address"], t["remote_host"]) == (want_ip, want_host), t
        assert t["error_code"] == "250" and t["num_retries"] == "0"
        assert ev[(q1, r)]["reception"]["msg_from"] == "alice@sender.test"
        assert ev[(q1, r)]["reception"]["message_id"] == q1.lower()
        assert ev[(q1, r)]["reception"]["transmission_id"] == str(int(q1, 16))
        assert ev[(q1, r)]["reception"]["message_id_header"] == re.search(
            rb"Message-ID: (\S+)", m1).group(1).decode()


def test_first_mx_down_second_mx_used(lab):
    """MX 10 refuses connections (nothing listens) or greets 421: MX 20 gets the mail
    in the same attempt."""
    good = lab.aio(IP_A)
    lab.smtp_sink(IP_C, ["-Q", "CONNECT"])          # greets 421 and hangs up
    lab.serve(mx("refused.test", "mx1.refused.test", IP_B, 10)
              + mx("refused.test", "mx2.refused.test", IP_A, 20)
              + mx("busy.test", "mx1.busy.test", IP_C, 10)
              + mx("busy.test", "mx2.busy.test", IP_A, 20))
    d = lab.daemon()
    m1 = message("refused first")
    m2 = message("busy first")
    q1 = d.send("alice@sender.test", ["a@refused.test"], m1)
    q2 = d.send("alice@sender.test", ["b@busy.test"], m2)
    wait_until(lambda: good.received() == 2, 15, "delivery to the second MX")
    wait_queue_empty(d)
    got = {qid_of(t.data): t for t in good.snapshot()}
    received_ok(got[q1].data, m1, q1)
    received_ok(got[q2].data, m2, q2)
    assert got[q1].rcpt_tos == ["a@refused.test"] and got[q2].rcpt_tos == ["b@busy.test"]
    ev = check_events(d, {(q1, "a@refused.test"): "delivery", (q2, "b@busy.test"): "delivery"})
    for key, host in (((q1, "a@refused.test"), "mx2.refused.test"),
                      ((q2, "b@busy.test"), "mx2.busy.test")):
        t = ev[key]["terminal"]
        assert (t["remote_host"], t["ip_address"], t["num_retries"]) == (host, IP_A, "0"), t
        assert ev[key]["transient"] == []


def test_each_nameserver_is_asked_on_its_own_port(lab):
    """delivery.nameservers = [silent:p1, unbound:p2]: the first never answers, the second
    is asked on its own port (not the first's) in the same lookup, and the mail goes."""
    good = lab.aio(IP_A)
    dns = lab.serve(mx("ports.test", "mx.ports.test", IP_A))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.156", 0))   # receives the queries, never answers
        silent_port = silent.getsockname()[1]
        assert silent_port != dns.port
        d = lab.daemon(nameservers=[f"127.0.0.156:{silent_port}",
                                    f"{dns.address}:{dns.port}"])
        q = d.send("alice@sender.test", ["a@ports.test"], message("two ports"))
        wait_until(lambda: good.received() == 1, 15, "delivery through the second nameserver")
        silent.settimeout(1.0)
        assert silent.recv(512)           # the first one was asked first
    wait_queue_empty(d)
    ev = check_events(d, {(q, "a@ports.test"): "delivery"})
    assert ev[(q, "a@ports.test")]["transient"] == []   # in the first attempt


class DeadZoneDns:
    """A DNS server on loopback (UDP) in front of the lab's unbound: a query for a name
    under *dead* gets no answer at all (a dead authoritative server for that zone),
    every other one is passed to unbound and its answer back.  A thread of the test,
    bounded: each receive waits at most 0.2 s, and it stops with the test."""

    def __init__(self, upstream, dead: str, address: str = "127.0.0.157", slow=None):
        self.upstream = upstream
        self.slow = {k.lower(): v for k, v in (slow or {}).items()}  # name.: seconds late
        self.timers: list[threading.Timer] = []
        self.dead = dead.rstrip(".").lower() + "."
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.2)
        self.nameserver = f"{address}:{self.sock.getsockname()[1]}"
        self.dropped: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self.stopping.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            q = dns.message.from_wire(wire)
            name = q.question[0].name.to_text().lower()
            if name.endswith("." + self.dead):
                self.dropped.append(name)
                continue
            try:
                r = dns.query.udp(q, self.upstream.address, port=self.upstream.port, timeout=2.0)
            except Exception:
                continue
            late = self.slow.get(name)
            if late:    # answered, but that late (a slow authoritative server)
                t = threading.Timer(late, self._send, (r.to_wire(), peer))
                t.daemon = True
                self.timers.append(t)
                t.start()
            else:
                self.sock.sendto(r.to_wire(), peer)

    def _send(self, wire, peer):
        try:
            self.sock.sendto(wire, peer)
        except OSError:
            pass    # stopped meanwhile

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(5.0)
        for t in self.timers:
            t.cancel()
        self.sock.close()


DNS_TIMEOUT = 3.0   # delivery.dns_timeout of the tests whose MX hosts' lookups hang


def test_mx_hosts_whose_lookups_hang_defer_after_one_timeout_not_one_each(lab):
    """hang.test has 4 MX hosts in a zone whose server never answers: the mail is
    deferred after about one lookup timeout (their lookups run concurrently), not four
    (one after another: a domain with 10 such hosts waited ~55 s, its lane held)."""
    up = lab.serve(mx("sender.test", "mx.sender.test", IP_B)
                   + [f"hang.test. 300 IN MX {10 * n} mx{n}.dead.test." for n in range(1, 5)])
    with DeadZoneDns(up, "dead.test") as srv:
        d = lab.daemon(nameservers=[srv.nameserver], dns_timeout=DNS_TIMEOUT)
        t0 = time.monotonic()
        d.send("alice@sender.test", ["a@hang.test"], message("hanging MX hosts"))
        wait_until(lambda: any(e["type"] == "delay" for e in d.events()), 30, "the deferral")
        elapsed = time.monotonic() - t0
        assert {f"mx{n}.dead.test." for n in range(1, 5)} <= set(srv.dropped)
    [e] = [e for e in d.events() if e["type"] == "delay"]
    assert e["error_code"] == "451" and "4.4.3" in e["raw_reason"], e
    assert elapsed < 2 * DNS_TIMEOUT, elapsed


def test_a_late_mx_answer_and_hanging_mx_hosts_defer_within_one_timeout_not_two(lab):
    """late.test's MX answer comes 0.8 of a timeout late, its hosts' zone never answers:
    the route lookup has one deadline (about one timeout from the MX query), so the mail
    is deferred then, not after the MX query's timeout and one more for the addresses."""
    up = lab.serve(mx("sender.test", "mx.sender.test", IP_B)
                   + [f"late.test. 300 IN MX {10 * n} mx{n}.dead.test." for n in range(1, 4)])
    with DeadZoneDns(up, "dead.test", slow={"late.test.": 0.8 * DNS_TIMEOUT}) as srv:
        d = lab.daemon(nameservers=[srv.nameserver], dns_timeout=DNS_TIMEOUT)
        t0 = time.monotonic()
        d.send("alice@sender.test", ["a@late.test"], message("late MX, hanging hosts"))
        wait_until(lambda: any(e["type"] == "delay" for e in d.events()), 30, "the deferral")
        elapsed = time.monotonic() - t0
        assert {f"mx{n}.dead.test." for n in range(1, 4)} <= set(srv.dropped)
    [e] = [e for e in d.events() if e["type"] == "delay"]
    assert e["error_code"] == "451" and "4.4.3" in e["raw_reason"], e
    # one timeout plus the slack (0.25 s), the address floor (0.5 s) and the daemon's own
    # time; two timeouts were ~5.9 s
    assert elapsed < DNS_TIMEOUT + 1.5, elapsed


def test_the_best_mx_host_that_answers_gets_the_mail_when_better_ones_hang(lab):
    """MX 10, 20, 30 in a zone that never answers, MX 40 and 50 answer: MX 40 gets the
    mail, within about one lookup timeout."""
    best, worse = lab.aio(IP_A), lab.aio(IP_C)
    up = lab.serve(mx("sender.test", "mx.sender.test", IP_B)
                   + [f"half.test. 300 IN MX {10 * n} mx{n}.dead.test." for n in range(1, 4)]
                   + mx("half.test", "mx4.half.test", IP_A, 40)
                   + mx("half.test", "mx5.half.test", IP_C, 50))
    with DeadZoneDns(up, "dead.test") as srv:
        d = lab.daemon(nameservers=[srv.nameserver], dns_timeout=DNS_TIMEOUT)
        m = message("better MX hosts hang")
        t0 = time.monotonic()
        qid = d.send("alice@sender.test", ["a@half.test"], m)
        wait_until(lambda: best.received() == 1, 30, "delivery to MX 40")
        elapsed = time.monotonic() - t0
    [t] = best.snapshot()
    received_ok(t.data, m, qid)
    assert t.rcpt_tos == ["a@half.test"] and worse.received() == 0
    ev = check_events(d, {(qid, "a@half.test"): "delivery"})
    assert ev[(qid, "a@half.test")]["terminal"]["remote_host"] == "mx4.half.test"
    assert elapsed < 2 * DNS_TIMEOUT, elapsed


def test_greylisting_receiver_gets_the_message_on_a_retry(lab):
    first_seen: dict = {}
    lock = threading.Lock()

    def greylist(sink, address, mail_from):
        with lock:
            t0 = first_seen.setdefault((mail_from, address), time.monotonic())
        if time.monotonic() - t0 < 0.25:
            return "451 4.7.1 Greylisted, try again later"
        return None

    gl = lab.aio(IP_A, rcpt=greylist)
    lab.serve(mx("grey.test", "mx.grey.test", IP_A))
    # retries after 0.3 s (300 s scaled by 0.001)
    d = lab.daemon(retry_schedule=[300.0, 600.0], time_scale=0.001, retry_jitter=0.0)
    m = message("greylisted")
    qid = d.send("alice@sender.test", ["gary@grey.test"], m)
    wait_until(lambda: gl.received() == 1, 15, "delivery after greylisting")
    wait_queue_empty(d)
    [t] = gl.snapshot()
    received_ok(t.data, m, qid)
    assert t.rcpt_tos == ["gary@grey.test"] and t.mail_from == "alice@sender.test"
    replies = [r for _, a, r in gl.rcpt_log if a == "gary@grey.test"]
    assert [r[:3] for r in replies] == ["451", "250"], replies
    ev = check_events(d, {(qid, "gary@grey.test"): "delivery"})[(qid, "gary@grey.test")]
    [tf] = ev["transient"]
    assert tf["error_code"] == "451" and tf["raw_reason"].startswith("451 4.7.1 "), tf
    assert tf["num_retries"] == "0" and tf["ip_address"] == IP_A
    assert ev["terminal"]["num_retries"] == "1"
    # the retry came when the schedule said, not before
    assert abs(float(tf["next_attempt"]) - (float(tf["event_time"]) + 0.3)) < 0.1, tf
    assert float(ev["terminal"]["event_time"]) >= float(tf["next_attempt"]) - 0.01


# --------------------------------------------------------------------------- bounces

def test_550_for_one_of_three_recipients_bounces_only_that_one(lab):
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "550 5.1.1 <bob@dest.test>: user unknown"
                   if a == "bob@dest.test" else None)
    sender_mx = lab.aio(IP_B)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B))
    d = lab.daemon()
    m = message("three recipients")
    rcpts = ["ann@dest.test", "bob@dest.test", "cat@dest.test"]
    qid = d.send("alice@sender.test", rcpts, m)
    wait_until(lambda: sender_mx.received() >= 1, 15, "the DSN at the sender's MX")
    wait_queue_empty(d)

    [t] = dest.snapshot()
    assert t.rcpt_tos == ["ann@dest.test", "cat@dest.test"]
    received_ok(t.data, m, qid)

    [b] = sender_mx.snapshot()
    assert b.mail_from == "" and b.rcpt_tos == ["alice@sender.test"]
    dsn, per_msg, per_rcpt = parse_dsn(b.data)
    assert dsn["To"] == "alice@sender.test" or "alice@sender.test" in dsn["To"]
    assert "MAILER-DAEMON@mta.test" in dsn["From"]
    assert per_msg["Reporting-MTA"] == "dns; mta.test"
    assert per_msg["X-Queue-ID"] == qid
    [r] = per_rcpt
    assert r["Final-Recipient"] == "rfc822; bob@dest.test"
    assert r["Action"] == "failed" and r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; mx.dest.test"
    assert r["Diagnostic-Code"].startswith("smtp; 550 5.1.1"), r["Diagnostic-Code"]
    returned = dsn.get_payload()[2].get_payload()
    assert "Subject: three recipients" in returned
    assert "ann@dest.test" not in b.data.decode() and "cat@dest.test" not in b.data.decode()

    [br] = wait_bounce_receptions(d, 1)
    assert br["client"] == f"bounce of {qid}" and br["msg_from"] == ""
    ev = check_events(d, {(qid, "ann@dest.test"): "delivery", (qid, "bob@dest.test"): "bounce",
                          (qid, "cat@dest.test"): "delivery",
                          (br["queue_id"], "alice@sender.test"): "delivery"})
    bounce = ev[(qid, "bob@dest.test")]["terminal"]
    assert bounce["error_code"] == "550" and bounce["ip_address"] == IP_A
    assert ev[(br["queue_id"], "alice@sender.test")]["terminal"]["ip_address"] == IP_B


def test_null_mx_and_nxdomain_bounce(lab):
    sender_mx = lab.aio(IP_B)
    lab.serve(["nullmx.test. 300 IN MX 0 ."] + mx("sender.test", "mx.sender.test", IP_B),
              nxdomain_zones=["void.test"])
    d = lab.daemon()
    m = message("nowhere to go")
    rcpts = ["nina@nullmx.test", "xavier@nothere.void.test"]
    qid = d.send("alice@sender.test", rcpts, m)
    wait_queue_empty(d)
    reported = {}
    for t in sender_mx.snapshot():
        assert t.mail_from == "" and t.rcpt_tos == ["alice@sender.test"]
        _, per_msg, per_rcpt = parse_dsn(t.data)
        assert per_msg["X-Queue-ID"] == qid
        for r in per_rcpt:
            addr = r["Final-Recipient"].split(";", 1)[1].strip()
            assert addr not in reported, f"{addr} reported twice"
            reported[addr] = r
    assert set(reported) == set(rcpts)
    assert reported["nina@nullmx.test"]["Status"] == "5.1.10"
    assert reported["xavier@nothere.void.test"]["Status"] == "5.1.2"
    assert all(r["Action"] == "failed" for r in reported.values())
    expected = {(qid, r): "bounce" for r in rcpts}
    for br in wait_bounce_receptions(d, len(sender_mx.snapshot())):
        assert br["client"] == f"bounce of {qid}"
        expected[(br["queue_id"], "alice@sender.test")] = "delivery"
    ev = check_events(d, expected)
    assert ev[(qid, "nina@nullmx.test")]["terminal"]["error_code"] == "556"
    assert ev[(qid, "xavier@nothere.void.test")]["terminal"]["error_code"] == "550"


def test_an_mx_host_without_an_address_bounces_at_once(lab):
    # ghost.test's only MX host has no address record: a retry cannot help, so the
    # recipient bounces 5.4.4 at the first attempt (as Postfix does), not after max_age.
    sender_mx = lab.aio(IP_B)
    lab.serve(["ghost.test. 300 IN MX 10 mx.ghost.test."]
              + mx("sender.test", "mx.sender.test", IP_B))
    d = lab.daemon()
    qid = d.send("alice@sender.test", ["gina@ghost.test"], message("ghost"))
    wait_queue_empty(d)
    [t] = [t for t in sender_mx.snapshot() if t.rcpt_tos == ["alice@sender.test"]]
    _, per_msg, (r,) = parse_dsn(t.data)
    assert per_msg["X-Queue-ID"] == qid
    assert (r["Action"], r["Status"]) == ("failed", "5.4.4"), r
    [e] = [e for e in d.events() if e["type"] == "bounce" and e["rcpt_to"] == "gina@ghost.test"]
    assert e["error_code"] == "550" and e["num_retries"] == "0", e


def test_smtputf8_mail_that_needs_none_goes_to_a_server_without_it(lab):
    # Some clients say SMTPUTF8 on every MAIL.  With ASCII addresses and headers nothing
    # in the message needs it: Postfix's smtp-sink (no SMTPUTF8 in its EHLO) gets it,
    # without the parameter.  One with a UTF-8 header does need it and bounces 5.6.7.
    sink = lab.smtp_sink(IP_B)
    lab.serve(mx("sink.test", "mx.sink.test", IP_B) + mx("sender.test", "mx.sender.test",
                                                          IP_B))
    d = lab.daemon()
    plain = d.send("alice@sender.test", ["bob@sink.test"], message("ascii only"),
                   ["SMTPUTF8"])
    d.send("alice@sender.test", ["cat@sink.test"],
           message("ascii", extra="X-Greeting: Grüße\r\n".encode()), ["SMTPUTF8"])
    wait_queue_empty(d)
    got = {q: m for q, _, m in sink.deliveries() if m.rcpt_tos != ["alice@sender.test"]}
    assert list(got) == [plain], got
    assert got[plain].rcpt_tos == ["bob@sink.test"]
    assert "SMTPUTF8" not in got[plain].mail_args.upper(), got[plain].mail_args
    ends = {e["rcpt_to"]: e for e in d.events() if e["type"] in ("delivery", "bounce")
            and e["rcpt_to"] != "alice@sender.test"}
    assert ends["bob@sink.test"]["type"] == "delivery"
    assert (ends["cat@sink.test"]["type"], ends["cat@sink.test"]["error_code"]) == \
        ("bounce", "553"), ends["cat@sink.test"]


def test_expiry_bounces(lab):
    slow = lab.aio(IP_A, rcpt=lambda s, a, f: "451 4.3.0 not now")
    sender_mx = lab.aio(IP_B)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B))
    # retries every 0.1 s; the message may stay queued 0.8 s
    d = lab.daemon(retry_schedule=[100.0], time_scale=0.001, max_age=800.0)
    m = message("never accepted")
    qid = d.send("alice@sender.test", ["sam@dest.test"], m)
    wait_until(lambda: sender_mx.received() >= 1, 15, "the expiry DSN")
    wait_queue_empty(d)
    assert slow.snapshot() == []
    tries = [r for _, a, r in slow.rcpt_log if a == "sam@dest.test"]
    assert len(tries) >= 3 and all(r.startswith("451") for r in tries), tries
    [b] = sender_mx.snapshot()
    assert b.mail_from == "" and b.rcpt_tos == ["alice@sender.test"]
    _, per_msg, [r] = parse_dsn(b.data)
    assert r["Final-Recipient"] == "rfc822; sam@dest.test"
    assert r["Action"] == "failed"
    diag = " ".join(r["Diagnostic-Code"].split())
    # delivery time expired (RFC 3463: a persistent transient failure), either way
    assert r["Status"] == "4.4.7", r.items()
    if "last reply" in diag:        # the last reply is known: it is quoted
        assert diag == (f"x-local; gave up after {len(tries)} attempt(s); "
                        "last reply: 451 4.3.0 not now"), diag
    else:
        assert "expired" in diag, r.items()
    [br] = wait_bounce_receptions(d, 1)
    ev = check_events(d, {(qid, "sam@dest.test"): "expiration",
                          (br["queue_id"], "alice@sender.test"): "delivery"})
    e = ev[(qid, "sam@dest.test")]
    # One event per try, the expiry in one of its two ways (which one is timing: the
    # retry jitter puts the last due time just before or past max_age; the DSN's status
    # does not tell them apart, as it quotes the last reply either way):
    transient, term = e["transient"], e["terminal"]
    assert [t["num_retries"] for t in transient] == [str(k) for k in range(len(transient))]
    if len(transient) == len(tries) - 1:
        # the last try's deferral was itself the expiration: its next try would pass max_age
        assert "next_attempt" not in term
    else:
        # every try was a transient failure; the message was found past max_age when it
        # came due again, not before
        assert len(transient) == len(tries), (len(transient), len(tries))
        assert float(term["event_time"]) >= float(transient[-1]["next_attempt"]) - 0.001
    assert term["num_retries"] == str(len(tries))    # every attempt failed
    assert int(term["queue_time"]) < 5000
    # the operator's counter of recipients the spool ended (the delivery processes'
    # outcomes count the attempts, an expiry is none of them)
    wait_until(lambda: labelled(d, "mta_spool_recipients_ended_total", reason="expired") == 1,
               10, "the expiry counted")


def test_the_last_retry_is_made_at_max_age_not_one_interval_before(lab):
    """A deferral whose next retry would come after delivery.max_age does not expire the
    recipient at once: its last attempt is made at the message's deadline (arrival +
    max_age), and it expires when that one is deferred too.  max_age 1 h, retries after
    5, 10, 20 and 40 min (scaled by 0.001): tries at 0, 5, 15 and 35 min, then the next
    would be at 75 min -- the recipient used to be bounced at 35 min; it is tried at 60."""
    tried = []

    def defer(s, a, f):
        tried.append(time.time())
        return "451 4.3.0 not now"
    lab.aio(IP_A, rcpt=defer)
    sender_mx = lab.aio(IP_B)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B))
    d = lab.daemon(retry_schedule=[300.0, 600.0, 1200.0, 2400.0], time_scale=0.001,
                   retry_jitter=0.0, max_age=3600.0)
    sent = time.time()
    qid = d.send("alice@sender.test", ["sam@dest.test"], message("last retry at max_age"))
    wait_until(lambda: sender_mx.received() >= 1, 20, "the expiry DSN")
    wait_queue_empty(d)
    [br] = wait_bounce_receptions(d, 1)
    ev = check_events(d, {(qid, "sam@dest.test"): "expiration",
                          (br["queue_id"], "alice@sender.test"): "delivery"})
    ev = ev[(qid, "sam@dest.test")]
    offsets = [round(t - sent, 2) for t in tried]
    assert len(tried) == 5, offsets
    assert 3.59 <= tried[-1] - sent < 4.0, offsets          # at max_age (3.6 s), not 2.1 s
    assert len(ev["transient"]) == 4                        # the last deferral expired it
    last_due = float(ev["transient"][-1]["next_attempt"]) - sent
    assert 3.59 <= last_due < 3.7, last_due
    assert ev["terminal"]["num_retries"] == "5"


def test_held_messages_expire_too(make_daemon):
    """Age is checked wherever a message waits: held (delivery.hold) as well as queued.

    The message expires after max_age and is bounced to its sender; the bounce,
    held as well, expires in turn (and, with its null sender, is not bounced).
    """
    # max_age 1.5 s; hold keeps every message from being dispatched.
    d = make_daemon(acceptors=1, shards=1,
                    delivery={"hold": True, "max_age": 1500.0, "time_scale": 0.001})
    qid = d.send("alice@sender.test", ["sam@dest.test"], message("held"))
    wait_until(lambda: len(bounce_receptions(d)) == 1, 20, "the expiry bounce")
    [br] = bounce_receptions(d)
    assert br["msg_from"] == "" and br["raw_rcpt_to"] == "alice@sender.test"
    wait_queue_empty(d)
    ev = check_events(d, {(qid, "sam@dest.test"): "expiration",
                          (br["queue_id"], "alice@sender.test"): "expiration"})
    t = ev[(qid, "sam@dest.test")]["terminal"]
    assert t["num_retries"] == "0" and 1500 <= int(t["queue_time"]) < 15000, t
    d.wait_log(rf"{br['queue_id']}: not bouncing a failure of a message with a null sender")


def test_null_sender_failure_is_not_bounced(lab):
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "550 5.1.1 no such user"
                   if a == "bob@dest.test" else None)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A))
    d = lab.daemon()
    m = message("a bounce from elsewhere")
    qid = d.send("", ["bob@dest.test", "ann@dest.test"], m)
    wait_until(lambda: dest.received() == 1, 15, "the accepted recipient's copy")
    wait_queue_empty(d)
    time.sleep(0.5)   # a bounce, if one were made, would be queued by now
    assert queue_empty(d)
    [t] = dest.snapshot()
    assert t.mail_from == "" and t.rcpt_tos == ["ann@dest.test"]     # null sender kept
    received_ok(t.data, m, qid)
    assert bounce_receptions(d) == []
    check_events(d, {(qid, "bob@dest.test"): "bounce", (qid, "ann@dest.test"): "delivery"})
    assert "not bouncing a failure of a message with a null sender" in d.log()
    assert dest.connections == 1


# -------------------------------------------------------------------------- routing

def test_routes_take_precedence_over_mx(lab):
    mx_host = lab.aio(IP_A)       # what MX says for both domains
    relay = lab.aio(IP_B)         # route for routed.test (by name)
    smarthost = lab.aio(IP_C)     # "*"
    lab.serve(mx("routed.test", "mx.routed.test", IP_A) + mx("other.test", "mx.other.test", IP_A)
              + [f"relay.route.test. 300 IN A {IP_B}"])
    d = lab.daemon(route=[
        # the first route host is down (nothing listens on IP_D): the next is used
        {"domain": "routed.test", "hosts": [f"{IP_D}:{lab.port}", "relay.route.test"],
         "starttls": "none"},
        {"domain": "*", "hosts": [f"{IP_C}:{lab.port}"], "starttls": "none"},
    ])
    m1, m2 = message("routed"), message("smarthost")
    q1 = d.send("alice@sender.test", ["r@routed.test"], m1)
    q2 = d.send("alice@sender.test", ["o@other.test"], m2)
    wait_until(lambda: relay.received() == 1 and smarthost.received() == 1, 15, "routed mail")
    wait_queue_empty(d)
    assert mx_host.connections == 0 and mx_host.snapshot() == []
    [t1] = relay.snapshot()
    [t2] = smarthost.snapshot()
    received_ok(t1.data, m1, q1)
    received_ok(t2.data, m2, q2)
    assert t1.rcpt_tos == ["r@routed.test"] and t2.rcpt_tos == ["o@other.test"]
    ev = check_events(d, {(q1, "r@routed.test"): "delivery", (q2, "o@other.test"): "delivery"})
    assert ev[(q1, "r@routed.test")]["terminal"]["ip_address"] == IP_B
    assert ev[(q2, "o@other.test")]["terminal"]["ip_address"] == IP_C


# ---------------------------------------------------------------- connection reuse

def test_connection_reuse(lab):
    dest = lab.aio(IP_A)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A))
    d = lab.daemon(connection_limit=2, idle_timeout=30.0)
    sent = {}
    # one at a time: the idle connection is used for the next message
    for i in range(5):
        m = message(f"one at a time {i}")
        sent[d.send("alice@sender.test", [f"u{i}@dest.test"], m)] = m
        wait_until(lambda n=i + 1: dest.received() == n, 10, "delivery")
    assert dest.connections == 1
    # a burst over one SMTP session: at most connection_limit connections
    with smtplib.SMTP(HOST, d.port, timeout=30) as s:
        s.ehlo("client.test")
        for i in range(40):
            m = message(f"burst {i}")
            code, text = smtp_transaction(s, "alice@sender.test", [f"v{i}@dest.test"], m)
            assert code == 250, (code, text)
            sent[queued_id(text.decode())] = m
    wait_until(lambda: dest.received() == 45, 20, "the burst")
    wait_queue_empty(d)
    txns = dest.snapshot()
    assert {qid_of(t.data) for t in txns} == set(sent)
    for t in txns:
        received_ok(t.data, sent[qid_of(t.data)], qid_of(t.data))
    assert dest.connections <= 2, dest.connections
    assert len({t.conn for t in txns}) == dest.connections
    check_events(d, {(qid_of(t.data), t.rcpt_tos[0]): "delivery" for t in txns})


def test_a_delivery_process_sizes_its_descriptor_table_before_a_burst_of_connections(lab):
    """A delivery process sizes its descriptor table at start, before its threads (the
    bus's) exist, for a full window of jobs each on its own connection plus the node
    limiter's files: in a threaded process every doubling of the table waits for an RCU
    grace period, and an acceptor was measured stalling 20-95 ms at each.  A burst that
    holds ~160 connections open at once (a slow receiver: the engine opens a connection
    while its queue for the site is longer than its connections) leaves it as it was."""
    window = 200                     # max_in_flight: 2 x 200 jobs in hand at most
    dest = lab.aio(IP_A)
    dest.delay = 6.0                 # each end of data waits: the connections pile up
    lab.serve(mx("dest.test", "mx.dest.test", IP_A))
    d = lab.daemon(connection_limit=400, max_in_flight=window, idle_timeout=30.0)
    pid = d.children()["delivery[0]"]
    size, limit = fd_table(pid)
    want = 2 * window + 2 * limits.MAX_OPEN_FILES + proc.FD_TABLE_MARGIN
    assert size >= min(want, limit), (size, want, limit)
    n, sessions = 320, 8
    replies = []

    def inject(k):
        with smtplib.SMTP(HOST, d.port, timeout=30) as s:
            s.ehlo("client.test")
            for i in range(k, n, sessions):
                replies.append(smtp_transaction(s, "alice@sender.test", [f"b{i}@dest.test"],
                                                message(f"burst {i}"))[0])
    threads = [threading.Thread(target=inject, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert replies == [250] * n, replies
    # more descriptors open than a default table (64 slots) holds after one doubling ...
    wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) > 160, 10,
               "the delivery process to hold more than 160 descriptors")
    wait_until(lambda: dest.received() == n, 60, "the burst at the receiver")
    assert dest.max_open >= 100, dest.max_open     # (they were its connections)
    assert fd_table(pid)[0] == size                # ... and the table did not grow
    wait_queue_empty(d)


# ------------------------------------------------------------------ the queue CLI

def test_queue_shows_deferred_and_flush_makes_them_due(lab):
    mode = {"defer": True}
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "451 4.3.2 try later" if mode["defer"] else None)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A))
    d = lab.daemon(retry_schedule=[3600.0], retry_jitter=0.0)
    m = message("deferred")
    rcpts = ["u1@dest.test", "u2@dest.test"]
    qid = d.send("alice@sender.test", rcpts, m)
    wait_until(lambda: sum(e["type"] == "delay" for e in d.events()) == 2, 15,
               "two delays")
    tried = {e["raw_rcpt_to"]: e for e in d.events() if e["type"] == "delay"}
    due = float(tried["u1@dest.test"]["next_attempt"])
    assert abs(due - (float(tried["u1@dest.test"]["event_time"]) + 3600)) < 2

    q = d.queue_summary()
    assert q["total"]["messages"] == 1 and q["total"]["pending"] == 2
    assert q["total"]["deferred"] == 2
    assert abs(q["total"]["next_attempt"] - due) < 1
    assert q["domains"]["dest.test"]["deferred"] == 2
    assert abs(q["domains"]["dest.test"]["next_attempt"] - due) < 1
    [entry] = d.queue_list()
    assert entry["queue_id"] == qid and entry["sender"] == "alice@sender.test"
    states = {s["address"]: s for s in entry["recipient_state"]}
    for r in rcpts:
        assert states[r]["state"] == "pending" and states[r]["attempts"] == 1
        assert abs(states[r]["next_attempt"] - due) < 1
    text = d.cli("queue", "--domains").stdout.decode()
    assert re.search(r"dest\.test\s+2\s+2\s+in 0:59:\d\d", text), text
    shown = d.cli("queue", "show", qid).stdout.decode()
    assert "recipient: <u1@dest.test> pending, 1 attempt(s), next attempt in 0:59:" in shown

    time.sleep(0.3)
    assert len(dest.rcpt_log) == 2 and dest.snapshot() == []   # nothing before it is due
    mode["defer"] = False
    out = d.cli("queue", "flush").stdout.decode()
    assert out.strip() == "2 deferred recipient(s) scheduled for delivery now"
    wait_until(lambda: dest.received() == 1, 10, "delivery after the flush")
    wait_queue_empty(d)
    [t] = dest.snapshot()
    assert t.rcpt_tos == rcpts
    received_ok(t.data, m, qid)
    ev = check_events(d, {(qid, r): "delivery" for r in rcpts})
    assert all(ev[(qid, r)]["terminal"]["num_retries"] == "1" for r in rcpts)


def test_flush_ends_the_dead_site_hold_of_a_site_that_answers_again(lab):
    """A site none of whose hosts answered is not connected to again for the first retry
    interval (the dead-site hold in each delivery process).  The operator who fixed the
    receiving side and runs ``mta queue flush`` gets an attempt now (Postfix's flush
    re-enables a dead destination too), not a deferral "delivery temporarily suspended"
    without a connection."""
    lab.serve(mx("dest.test", "mx.dest.test", IP_A))
    # nothing listens at IP_A yet: every connection is refused, the site is held
    d = lab.daemon(retry_schedule=[3600.0], retry_jitter=0.0)
    m = message("dead site")
    qid = d.send("alice@sender.test", ["u1@dest.test"], m)
    wait_until(lambda: any(e["type"] == "delay" for e in d.events()), 20, "the deferral")
    dest = lab.aio(IP_A)                    # the receiving side is fixed
    out = d.cli("queue", "flush").stdout.decode()
    assert out.strip() == "1 deferred recipient(s) scheduled for delivery now"
    wait_until(lambda: dest.received() == 1 or
               sum(e["type"] == "delay" for e in d.events()) > 1, 15,
               "an attempt after the flush")
    delays = [e for e in d.events() if e["type"] == "delay"]
    assert dest.received() == 1, [e["raw_reason"] for e in delays]
    [t] = dest.snapshot()
    assert t.rcpt_tos == ["u1@dest.test"]
    received_ok(t.data, m, qid)
    wait_queue_empty(d)
    check_events(d, {(qid, "u1@dest.test"): "delivery"})


def test_flush_of_a_domain_or_a_queue_id_makes_only_that_mail_go(lab):
    """``mta queue flush --domain D`` (postqueue -s) and ``--queue-id QID`` (postqueue -i):
    only the deferred recipients at that domain, of that message, are tried now; the
    other deferred mail, of the same message too, waits for its retry time."""
    from test_admin_api import admin_call

    mode = {"defer": True}
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "451 4.3.2 try later" if mode["defer"] else None)
    lab.serve(mx("one.test", "mx.one.test", IP_A) + mx("two.test", "mx.two.test", IP_A))
    d = lab.daemon(retry_schedule=[3600.0], retry_jitter=0.0)
    both = d.send("alice@sender.test", ["u1@one.test", "u2@two.test"], message("both"))
    m2 = d.send("alice@sender.test", ["v@two.test"], message("m2"))
    m3 = d.send("alice@sender.test", ["x@two.test"], message("m3"))
    wait_until(lambda: sum(e["type"] == "delay" for e in d.events()) == 4, 20, "four delays")
    mode["defer"] = False

    def delivered():
        return sorted(r for _, r, _ in dest.deliveries())

    out = d.cli("queue", "flush", "--domain", "One.Test").stdout.decode()
    assert out.strip() == "1 deferred recipient(s) at one.test scheduled for delivery now"
    wait_until(lambda: delivered() == ["u1@one.test"], 10, "u1@one.test after the flush")
    time.sleep(1.0)
    assert delivered() == ["u1@one.test"]            # two.test waits, of `both` too
    assert d.queue_summary()["total"]["deferred"] == 3

    r = json.loads(d.cli("queue", "flush", "--queue-id", m2, "--json").stdout)
    assert r == {"flushed": 1, "not_queued": []}
    wait_until(lambda: delivered() == ["u1@one.test", "v@two.test"], 10, "m2 after the flush")
    time.sleep(1.0)
    assert delivered() == ["u1@one.test", "v@two.test"]
    assert d.queue_summary()["total"]["deferred"] == 2

    # Bad input: exit status 1 and what is wrong; nothing flushed.
    gone = "18A3F2C4B1D2E0300009"
    r = d.cli("queue", "flush", "--queue-id", gone, check=False)
    assert r.returncode == 1 and f"not queued: {gone}" in r.stderr.decode(), r
    assert "0 deferred recipient(s) of 0 message(s)" in r.stdout.decode(), r
    r = d.cli("queue", "flush", "--queue-id", "nonsense", check=False)
    assert r.returncode == 1 and "not queue ids: nonsense" in r.stderr.decode(), r
    r = d.cli("queue", "flush", "--domain", "u@two.test", check=False)
    assert r.returncode == 1 and "domain: not a domain name: 'u@two.test'" in \
        r.stderr.decode(), r
    r = d.cli("queue", "flush", "--domain", "nowhere.test")       # (nothing queued there)
    assert r.stdout.decode().strip() == \
        "0 deferred recipient(s) at nowhere.test scheduled for delivery now"
    for query, field in (("domain=a%40b.test", "domain"), ("domain=", "domain"),
                         ("domain=a..test", "domain"), ("qid=xyz", "qid"),
                         ("domain=a.test&domain=b.test", "domain"), ("bogus=1", "bogus"),
                         ("qid=" + "&qid=".join([gone] * 102), "query")):
        st, _, body = admin_call(d, "POST", f"/api/admin/flush?{query}")
        assert st == 400 and body["errors"][0]["field"] == field, (query, body)
    st, _, body = admin_call(d, "POST", f"/api/admin/flush?qid={gone}")
    assert st == 404 and body["not_queued"] == [gone] and body["flushed"] == 0, body
    st, _, body = admin_call(d, "GET", "/api/admin/flush")
    assert st == 405, body
    time.sleep(0.5)
    assert delivered() == ["u1@one.test", "v@two.test"]

    out = d.cli("queue", "flush").stdout.decode()
    assert out.strip() == "2 deferred recipient(s) scheduled for delivery now"
    wait_queue_empty(d)
    assert delivered() == ["u1@one.test", "u2@two.test", "v@two.test", "x@two.test"]
    check_events(d, {(both, "u1@one.test"): "delivery", (both, "u2@two.test"): "delivery",
                     (m2, "v@two.test"): "delivery", (m3, "x@two.test"): "delivery"})


def test_a_flush_with_a_shard_not_answering_flushes_the_others_and_says_so(lab):
    """``mta queue flush`` while one spool shard does not answer: the shards before it
    were flushed, those after it not even asked, and the error read "the daemon is not
    answering ... is 'mta serve' running?"; through the admin API (--domain) the others
    were flushed but the answer said only that the spool was not answering.  Every
    shard that answers is flushed now, and the error names the one that did not."""
    from mta.queueid import shard_of

    mode = {"defer": True}
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: "451 4.3.2 try later" if mode["defer"] else None)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A))
    d = lab.daemon(shards=2, retry_schedule=[3600.0], retry_jitter=0.0)
    qids = [d.send("alice@sender.test", [f"u{i}@dest.test"], message(f"m{i}"))
            for i in range(12)]
    on = {n: sorted(q for q in qids if shard_of(q, 2) == n) for n in (0, 1)}
    assert on[0] and on[1], on                       # (12 messages: both shards hold some)
    wait_until(lambda: sum(e["type"] == "delay" for e in d.events()) == 12, 20,
               "twelve delays")
    mode["defer"] = False

    def delivered():
        return sorted(q for q, _, _ in dest.deliveries())

    # through the admin API: spool[1] stopped, spool[0]'s mail goes
    stopped = d.children()["spool[1]"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        r = d.cli("queue", "flush", "--domain", "dest.test", check=False, timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 69, r                 # EX_UNAVAILABLE
        assert f"spool[1] did not answer within 5s; the other spool shard(s) flushed " \
               f"{len(on[0])} deferred recipient(s)" in err, err
        wait_until(lambda: delivered() == on[0], 10, "spool[0]'s mail, flushed")
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_until(lambda: d.queue_summary()["total"]["messages"] == len(on[1]), 10,
               "spool[0]'s deliveries recorded")
    # the CLI's own flush: spool[0] stopped now, the shard after it is asked all the same
    stopped = d.children()["spool[0]"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        r = d.cli("queue", "flush", check=False, timeout=60)
        assert r.returncode == 69, r
        assert r.stdout.decode().strip() == \
            f"{len(on[1])} deferred recipient(s) scheduled for delivery now", r
        assert "mta: spool[0] did not answer within 5s: its deferred mail was not flushed" \
            in r.stderr.decode(), r
        wait_until(lambda: delivered() == sorted(qids), 10, "spool[1]'s mail, flushed")
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_queue_empty(d)
    assert delivered() == sorted(qids)


# ------------------------------------------------------------------- event log

def test_event_log_matches_what_the_receivers_saw(lab):
    """A mixed batch: delivered, refused (bounced), at two MXs; bounces to the sender's MX."""
    refuse = lambda s, a, f: "550 5.7.1 refused" if a.startswith("x") else None  # noqa: E731
    a = lab.aio(IP_A, rcpt=refuse)
    b = lab.smtp_sink(IP_B)
    sender_mx = lab.aio(IP_C)
    lab.serve(mx("one.test", "mx.one.test", IP_A) + mx("two.test", "mx.two.test", IP_B)
              + mx("sender.test", "mx.sender.test", IP_C))
    d = lab.daemon()
    expected = {}
    for i in range(15):
        rcpts = [f"p{i}@one.test", f"q{i}@two.test"] + ([f"x{i}@one.test"] if i % 3 == 0 else [])
        qid = d.send("alice@sender.test", rcpts, message(f"mixed {i}"))
        for r in rcpts:
            expected[(qid, r)] = "bounce" if r.startswith("x") else "delivery"
    wait_until(lambda: sender_mx.received() == 5, 20, "five DSNs")
    wait_queue_empty(d)
    for br in wait_bounce_receptions(d, 5):
        expected[(br["queue_id"], "alice@sender.test")] = "delivery"
    ev = check_events(d, expected)

    seen = collections.Counter()
    where = {}
    for q, r, _ in a.deliveries():
        seen[(q, r)] += 1
        where[(q, r)] = IP_A
    for q, r, _ in b.deliveries():
        seen[(q, r)] += 1
        where[(q, r)] = IP_B
    for t in sender_mx.snapshot():
        # DSNs carry no Received header: find them by the bounce's injection event
        [br] = [e for e in bounce_receptions(d) if e.get("message_id_header")
                and e["message_id_header"] in t.data.decode("utf-8", "replace")]
        seen[(br["queue_id"], t.rcpt_tos[0])] += 1
        where[(br["queue_id"], t.rcpt_tos[0])] = IP_C
    delivered = {k for k, v in expected.items() if v == "delivery"}
    assert set(seen) == delivered and set(seen.values()) == {1}
    for k in delivered:
        assert ev[k]["terminal"]["ip_address"] == where[k], (k, ev[k]["terminal"])
    refused = {(f, r) for f, r, reply in a.rcpt_log if reply.startswith("550")}
    for k, v in expected.items():
        if v == "bounce":
            assert ("alice@sender.test", k[1]) in refused
            assert ev[k]["terminal"]["error_code"] == "550"


# --------------------------------------------------------------- kill -9 mid-load

MAX_IN_FLIGHT = 16
SHARDS = 2


class Injector:
    """K SMTP connections submitting numbered messages (bounded count and time).

    ``accepted``: seq -> (qid, recipients) for every message answered 250.
    A connection that breaks (the daemon was killed) stops.
    """

    def __init__(self, port, rcpts_of, count, conns=4, time_limit=30.0):
        self.port, self.rcpts_of, self.count = port, rcpts_of, count
        self.time_limit = time_limit
        self.seqs = iter(range(count))
        self.lock = threading.Lock()
        self.accepted: dict[int, tuple[str, list]] = {}
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(conns)]

    @staticmethod
    def body(seq: int) -> bytes:
        return (f"From: <load@sender.test>\r\nSubject: load {seq}\r\nX-Tag: load-{seq}\r\n\r\n"
                + f"message {seq}\r\n" * 20).encode()

    def start(self):
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def join(self, timeout=60.0):
        for t in self.threads:
            t.join(timeout)
        assert self.done()

    def _run(self):
        try:
            s = smtplib.SMTP(HOST, self.port, timeout=20)
            s.ehlo("load.client.test")
        except (OSError, smtplib.SMTPException) as exc:
            self.errors.append(repr(exc))
            return
        try:
            while time.monotonic() - self.t0 < self.time_limit:
                with self.lock:
                    seq = next(self.seqs, None)
                if seq is None:
                    break
                rcpts = self.rcpts_of(seq)
                code, text = smtp_transaction(s, "load@sender.test", rcpts, self.body(seq))
                if code == 250:
                    with self.lock:
                        self.accepted[seq] = (queued_id(text.decode()), rcpts)
                else:
                    self.errors.append(f"message {seq}: {code} {text!r}")
            s.quit()
        except (OSError, smtplib.SMTPException, AssertionError) as exc:
            self.errors.append(repr(exc))
        finally:
            s.close()


def two_domains_per_delivery_shard(processes):
    """Two load domains that go to different delivery processes (when there are two)."""
    picked = {}
    for i in range(100):
        dom = f"load{i}.test"
        picked.setdefault(domain_shard(dom, processes), dom)
        if len(picked) == processes:
            break
    doms = list(picked.values())
    return (doms * 2)[:2]


def load_lab(lab, processes):
    doms = two_domains_per_delivery_shard(processes)
    sinks = [lab.smtp_sink(IP_A), lab.smtp_sink(IP_B)]
    sender_mx = lab.aio(IP_C)
    lab.serve(mx(doms[0], f"mx.{doms[0]}", IP_A) + mx(doms[1], f"mx.{doms[1]}", IP_B)
              + mx("sender.test", "mx.sender.test", IP_C))
    d = lab.daemon(acceptors=2, shards=SHARDS, processes=processes, max_in_flight=MAX_IN_FLIGHT,
                   retry_schedule=[200.0], time_scale=0.001)
    return d, doms, sinks, sender_mx


def check_after_crash(d, inj, sinks, sender_mx, report_path, strict_events, at_kill,
                      in_flight=SHARDS * MAX_IN_FLIGHT):
    """Every accepted (qid, recipient) arrived; at most twice; at most *in_flight* jobs twice.

    A job is one message's recipients at one domain (one transaction): the window
    bounds jobs, and a crash may repeat every job out, each with all its recipients.
    """
    counts = collections.Counter()
    for sink in sinks:
        for m in sink.messages():
            qid = qid_of(m.message)
            tag = re.search(rb"^X-Tag: load-(\d+)$", m.message, re.M)
            assert qid and tag, m.message[:300]
            seq = int(tag.group(1))
            # the content is intact: our Received header + exactly what was sent
            _, rest = split_received(m.message)
            assert rest == Injector.body(seq).replace(b"\r\n", b"\n"), m.path
            assert m.mail_from == "load@sender.test"
            if seq in inj.accepted:
                assert inj.accepted[seq][0] == qid
            for r in m.rcpt_tos:
                counts[(qid, r)] += 1
    accepted = {(q, r) for q, rcpts in inj.accepted.values() for r in rcpts}
    missing = sorted(accepted - set(counts))
    dupes = sorted(k for k, n in counts.items() if n > 1)
    # only jobs in flight at the kill may repeat; with one delivery process both
    # load domains are the same, so a job there carries both of a message's recipients
    repeated_jobs = {(q, r.rpartition("@")[2]) for q, r in dupes}
    with open(report_path, "w") as f:
        json.dump({"at_kill": at_kill, "accepted": len(accepted),
                   "received": sum(counts.values()),
                   "duplicates": dupes,
                   "repeated_jobs": len(repeated_jobs),
                   "unknown": sorted(set(counts) - accepted)}, f, indent=1)
    assert not missing, f"{len(missing)} accepted recipients never arrived: {missing[:10]}"
    assert max(counts.values()) <= 2, counts.most_common(3)
    assert len(repeated_jobs) <= in_flight <= SHARDS * MAX_IN_FLIGHT, (in_flight, dupes)
    assert sender_mx.snapshot() == [], "nothing should have bounced"
    # Events are records of the spool's own group commits, published from a durable
    # cursor: a kill -9 of anything loses none (strict_events is kept for the callers;
    # every crash is strict now).  Replays have the same event_id (d.events() keeps one).
    def terms():
        return {(e["queue_id"], e["raw_rcpt_to"]) for e in d.events() if e["type"] in TERMINAL}
    wait_until(lambda: terms() >= set(counts), 20, "every delivery's event", interval=0.2)
    ev = d.events()
    rec = collections.Counter((e["queue_id"], e["raw_rcpt_to"]) for e in ev
                              if e["type"] == "injection")
    term = collections.Counter((e["queue_id"], e["raw_rcpt_to"]) for e in ev
                               if e["type"] in TERMINAL)
    assert all(e["type"] in ("injection", "delivery") for e in ev), \
        collections.Counter(e["type"] for e in ev)
    assert set(term) == set(counts) and set(rec) >= set(counts), (set(term) ^ set(counts))
    assert set(rec.values()) == {1} and set(term.values()) == {1}
    return dupes


def test_kill9_delivery_process_mid_load(lab, tmp_path):
    d, doms, sinks, sender_mx = load_lab(lab, processes=2)
    inj = Injector(d.port, lambda i: [f"a{i}@{doms[0]}", f"b{i}@{doms[1]}"], 600).start()
    wait_until(lambda: sum(s.count() for s in sinks) >= 100, 20, "deliveries under way")
    assert not inj.done(), "the load ended before the kill: make it bigger"
    victim = d.children()["delivery[0]"]
    os.kill(victim, signal.SIGKILL)
    at_kill = {"accepted": len(inj.accepted), "received": sum(s.count() for s in sinks)}
    inj.join()
    assert not inj.errors, inj.errors
    assert len(inj.accepted) == 600
    d.wait_log(rf"delivery\[0\] pid={victim} died \(signal 9\)", timeout=10)
    wait_queue_empty(d, timeout=40)
    # each spool shard says how many jobs it had out with the dead process
    at_kill["jobs_out"] = [int(n) for n in re.findall(
        r"delivery\[0\] went away with (\d+) job\(s\) out", d.log())]
    check_after_crash(d, inj, sinks, sender_mx, tmp_path / "dupes.json", True, at_kill,
                      in_flight=sum(at_kill["jobs_out"]))


def test_kill9_whole_tree_mid_load(lab, tmp_path):
    d, doms, sinks, sender_mx = load_lab(lab, processes=1)
    inj = Injector(d.port, lambda i: [f"a{i}@{doms[0]}", f"b{i}@{doms[1]}"], 800).start()
    wait_until(lambda: sum(s.count() for s in sinks) >= 100, 20, "deliveries under way")
    assert not inj.done(), "the load ended before the kill: make it bigger"
    d.kill9()
    at_kill = {"accepted": len(inj.accepted), "received": sum(s.count() for s in sinks)}
    inj.join()
    assert len(inj.accepted) >= 75
    d.start()
    wait_queue_empty(d, timeout=40)
    check_after_crash(d, inj, sinks, sender_mx, tmp_path / "dupes.json", False, at_kill)


# ----------------------------------------------------- reused segment files, kill -9

def labelled(d, name: str, **labels) -> float:
    """The sum of /metrics samples *name* with these label values."""
    from prometheus_client.parser import text_string_to_metric_families
    status, _, body = d.admin_get("/metrics")
    assert status == 200
    return sum(s.value for fam in text_string_to_metric_families(body.decode())
               for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class BigInjector(Injector):
    """The Injector's load with 16 KB messages: 1 MiB segments fill after ~60 of them."""

    @staticmethod
    def body(seq: int) -> bytes:
        return (f"From: <load@sender.test>\r\nSubject: load {seq}\r\nX-Tag: load-{seq}\r\n\r\n"
                .encode() + (b"%06d " % seq + b"x" * 70 + b"\r\n") * 210)


def segment_numbers(shard: str) -> list[int]:
    return sorted(int(n[:-4]) for n in os.listdir(shard) if n.endswith(".seg"))


def delivered_and_reclaimed(d, dom: str, sink, shard: str) -> int:
    """Load numbers 0-299 (16 KB each: 4 or more 1 MiB segments) queued behind a suspension
    of *dom*, then delivered: their DONE records lie in the newest segment, the older ones
    are finished -- one file becomes the spare, the others are removed.  Returns the
    newest (the one segment left)."""
    from test_operator_controls import cli_json
    held = cli_json(d, "suspend", "--domain", dom, "--reason", "test")
    first = BigInjector(d.port, lambda i: [f"a{i}@{dom}"], 300, conns=2,
                        time_limit=60.0).start()
    first.join(90)
    assert not first.errors and len(first.accepted) == 300, first.errors
    assert len(segment_numbers(shard)) >= 4 and sink.count() == 0
    cli_json(d, "resume", held["id"])
    wait_queue_empty(d, timeout=60)
    wait_until(lambda: labelled(d, "mta_spool_segment_files_total", source="reused") >= 1,
               20, "a finished segment's file reused", interval=0.3)
    wait_until(lambda: len(segment_numbers(shard)) == 1, 20, "the finished segments reclaimed",
               interval=0.3)
    return segment_numbers(shard)[-1]


def assert_reused(path: str) -> None:
    """*path*, a segment that holds only its first few records, is a finished segment's
    file: whole (the segment size), its old records still there beyond the new ones
    (a zero-filled spare would be all zeros there)."""
    assert os.path.getsize(path) >= 1 << 20
    with open(path, "rb") as fh:
        fh.seek(768 << 10)
        assert any(fh.read(64 << 10)), f"{path} is not a reused file"


def check_arrivals(sink, accepted) -> collections.Counter:
    """Every message at *sink* intact; each of the 300 delivered before the crash there
    exactly once (one read back from the reused file would come again), each of
    *accepted* (acknowledged since) at least once and at most twice (jobs out at the
    crash).  Returns how often each load number arrived."""
    counts = collections.Counter()
    for m in sink.messages():
        tag = re.search(rb"^X-Tag: load-(\d+)$", m.message, re.M)
        assert tag, m.message[:300]
        seq = int(tag.group(1))
        _, rest = split_received(m.message)
        assert rest == BigInjector.body(seq).replace(b"\r\n", b"\n"), m.path
        counts[seq] += 1
    assert all(counts[q] == 1 for q in range(300)), \
        [(q, counts[q]) for q in range(300) if counts[q] != 1][:10]
    assert all(1 <= counts[q] <= 2 for q in accepted), \
        [(q, counts[q]) for q in accepted if not 1 <= counts[q] <= 2][:10]
    return counts


def test_reused_segment_files_and_kill9_bring_back_nothing_delivered(lab, tmp_path):
    """A finished segment's file becomes a later segment with its old records still in
    it.  The old messages' DONE records lie in another segment (they were delivered after
    a suspension), so if recovery ever read those old records back, the messages would be
    queued and delivered again.  After a kill -9 and a restart, each arrives once."""
    dom = two_domains_per_delivery_shard(1)[0]
    sink = lab.smtp_sink(IP_A)
    sender_mx = lab.aio(IP_C)
    lab.serve(mx(dom, f"mx.{dom}", IP_A) + mx("sender.test", "mx.sender.test", IP_C))
    d = lab.daemon(acceptors=1, shards=1, processes=1, max_in_flight=MAX_IN_FLIGHT,
                   retry_schedule=[200.0], time_scale=0.001,
                   sections={"spool": {"segment_size": 1 << 20, "preallocate": True}})
    spool = os.path.join(d.state_dir, "spool", "shard-00")

    def segments() -> list[int]:
        return segment_numbers(spool)

    newest = delivered_and_reclaimed(d, dom, sink, spool)
    # More mail, into the reused file (the next segment); killed before it is full.
    s = smtplib.SMTP(HOST, d.port, timeout=20)
    s.ehlo("load.client.test")
    second: dict[int, str] = {}

    def send(n: int) -> None:
        code, text = smtp_transaction(s, "load@sender.test", [f"a{n}@{dom}"],
                                      BigInjector.body(n))
        assert code == 250, (code, text)
        second[n] = queued_id(text.decode())

    for n in range(300, 600):
        send(n)
        if segments()[-1] > newest:
            break
    assert segments()[-1] > newest, "no new segment after 300 messages"
    last = max(second)
    for m in range(last + 1, last + 6):
        send(m)
    s.close()
    assert_reused(os.path.join(spool, "%016d.seg" % segments()[-1]))
    d.kill9()
    d.start()
    wait_queue_empty(d, timeout=60)
    counts = check_arrivals(sink, second)
    assert set(counts) == set(range(300)) | set(second)
    assert sender_mx.snapshot() == [], "nothing should have bounced"


def test_power_loss_while_a_reused_segment_file_is_written(lab, tmp_path):
    """The same with the spool on crashfs (tests/crashfs.py), cut during a load into the
    reused file: what was not synced is lost -- the reused file's unsynced octets come back
    as its old records, unsynced directory entries as they were -- and what was synced is
    all there is.  Nothing acknowledged is lost, nothing delivered before comes back.
    (Checked meaningful: with records written without their segment's number and the
    spare's check off, messages delivered before come again; without the directory sync
    after a spare is renamed into place, acknowledged messages are lost in most runs.)"""
    from crashfs import CrashFS
    fs = CrashFS(str(tmp_path / "spoolfs"), str(tmp_path / "spoolfs.image"),
                 str(tmp_path / "crashfs.log"))
    fs.mount()
    d = None
    try:
        dom = two_domains_per_delivery_shard(1)[0]
        sink = lab.smtp_sink(IP_A)
        sender_mx = lab.aio(IP_C)
        lab.serve(mx(dom, f"mx.{dom}", IP_A) + mx("sender.test", "mx.sender.test", IP_C))
        spool = os.path.join(fs.mountpoint, "spool")
        d = lab.daemon(acceptors=1, shards=1, processes=1, max_in_flight=MAX_IN_FLIGHT,
                       retry_schedule=[200.0], time_scale=0.001,
                       sections={"spool": {"directory": spool, "segment_size": 1 << 20,
                                           "preallocate": True},
                                 "smtp": {"spool_timeout": 5.0}})
        shard = os.path.join(spool, "shard-00")

        def segments() -> list[int]:
            return segment_numbers(shard)

        newest = delivered_and_reclaimed(d, dom, sink, shard)
        # Into the next segment, the reused file: one message at a time until it is there,
        s = smtplib.SMTP(HOST, d.port, timeout=20)
        s.ehlo("load.client.test")
        accepted: dict[int, object] = {}
        n = 300
        while segments()[-1] == newest and n < 600:
            code, text = smtp_transaction(s, "load@sender.test", [f"a{n}@{dom}"],
                                          BigInjector.body(n))
            assert code == 250, (code, text)
            accepted[n] = queued_id(text.decode())
            n += 1
        s.quit()
        assert segments()[-1] > newest, "no new segment after 300 messages"
        assert_reused(os.path.join(shard, "%016d.seg" % segments()[-1]))
        # then a load of at most 40 more (with the one already there, well under the
        # segment's MiB: the file's old records still lie beyond the new ones), and the
        # power is cut while it runs, after a random number of them were acknowledged.
        second = BigInjector(d.port, lambda i: [f"a{i}@{dom}"], 40, conns=2,
                             time_limit=60.0)
        second.seqs = iter(range(n, n + 40))
        seed = int(os.environ.get("POWERLOSS_SEED") or random.randrange(1 << 32))
        print(f"POWERLOSS_SEED={seed}")
        cut_after = random.Random(seed).randint(3, 10)
        second.start()
        wait_until(lambda: len(second.accepted) >= cut_after, 60,
                   f"{cut_after} messages of the load acknowledged", interval=0.01)
        d.kill9()
        fs.crash()
        second.join(60)
        assert len(second.accepted) < 40, "the cut came after the load"
        accepted.update(second.accepted)
        d.start()
        wait_queue_empty(d, timeout=90)
        counts = check_arrivals(sink, accepted)
        # Sent but not acknowledged: there or not, at most twice too.
        assert all(c <= 2 for c in counts.values()), counts.most_common(3)
        assert set(counts) <= set(range(n + 40))
        assert sender_mx.snapshot() == [], "nothing should have bounced"
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        if d is not None:
            d.cleanup()
            d.kill9()
        fs.unmount()


def test_a_flush_sends_a_message_s_flushed_recipients_while_another_job_of_it_is_out(lab):
    """A flushed recipient of a message with a delivery job out (another domain's, at a
    slow site) waited for that job's outcome -- up to the data timeout -- before it was
    sent: the shard skipped, at dispatch, every message with a job out.  The recipients
    at other domains than the jobs out now go at once."""
    mode = {"defer": True}
    slow = lab.aio(IP_A, rcpt=lambda s, a, f: "451 4.3.2 try later" if mode["defer"] else None)
    other = lab.aio(IP_B, rcpt=lambda s, a, f: "451 4.3.2 try later" if mode["defer"] else None)
    lab.serve(mx("slow.test", "mx.slow.test", IP_A) + mx("two.test", "mx.two.test", IP_B))
    d = lab.daemon(shards=1, retry_schedule=[3600.0], retry_jitter=0.0, data_timeout=60.0)
    qid = d.send("alice@sender.test", ["u@slow.test", "v@two.test"], message("both"))
    wait_until(lambda: sum(e["type"] == "delay" for e in d.events()) == 2, 20, "two delays")
    mode["defer"] = False
    slow.delay = 6.0                  # its end of data answered after 6 s
    d.cli("queue", "flush", "--domain", "slow.test")
    wait_until(lambda: any(a == "u@slow.test" and r.startswith("250")
                           for _, a, r in slow.rcpt_log), 10, "the slow job at its data")
    t0 = time.monotonic()
    out = d.cli("queue", "flush", "--queue-id", qid).stdout.decode()
    assert out.startswith("1 deferred recipient(s)"), out
    other.wait_for("v@two.test", timeout=30)
    took = time.monotonic() - t0
    assert took < 6 and not slow.snapshot(), (took, slow.snapshot())
    slow.wait_for("u@slow.test", timeout=30)
    wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 20, "the message done")
    assert sorted(r for _, r, _ in slow.deliveries() + other.deliveries()) == \
        ["u@slow.test", "v@two.test"]
