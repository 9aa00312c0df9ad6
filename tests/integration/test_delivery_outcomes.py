"""Delivery outcomes reach their spool shard: back-pressure on a full bus, and the reaper.

Two scenarios with the real daemon, a real DNS server and aiosmtpd receivers
(the ``lab`` fixture, tests/integration/mxlab.py):

- A spool shard stops reading (SIGSTOP) while its delivery process completes
  many deliveries, one after another.  The outcomes fill the bus to the shard (a
  small ``spool.queue_high_water``, big outcomes); the delivery process must hold
  the rest back and hand them over when the shard reads again (SIGCONT):
  every recipient is delivered once, recorded once, and nothing is sent again.
- A delivery process stops (SIGSTOP) with a job in its socket: its connection
  stays up, so only the shard's timer reaper (``Shard.expire_jobs``: delivery
  timeouts + ``delivery.job_timeout_margin``) can notice; the job is sent again
  and the message is delivered, at most once more.
"""
from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import smtplib
import threading

from daemon import HOST, queued_id, smtp_transaction, wait_until
from mxlab import IPS, mx
from sinks import AioSink, _Handler, qid_of
# the delivery scenarios' checks: bytes as submitted, one terminal event per recipient
from test_delivery import check_events, message, received_ok, wait_queue_empty

IP_A = IPS[0]


class _GatedHandler(_Handler):
    """The receiver's handler, holding every end of data until *gate* is set; then
    answering them one by one, *stagger* seconds apart, in the order they came (so the
    delivery process finishes each job in a loop turn of its own: outcomes finished in
    the same turn travel in one bus message)."""

    def __init__(self, sink: AioSink, gate: threading.Event, stagger: float = 0.05):
        super().__init__(sink)
        self.gate = gate
        self.stagger = stagger
        self.entered = 0      # transactions waiting at (or past) the end of data

    async def handle_DATA(self, server, session, envelope):
        with self.sink.lock:
            turn = self.entered
            self.entered += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.02)
        await asyncio.sleep(self.stagger * turn)
        return await super().handle_DATA(server, session, envelope)


def gated_sink(lab, ip: str, gate: threading.Event, **kw) -> tuple[AioSink, _GatedHandler]:
    sink = AioSink(ip, lab.port, **kw)
    handler = sink.ctl.handler = _GatedHandler(sink, gate)
    lab.sinks.append(sink)
    sink.start()
    return sink, handler


# A long multi-line reply to the end of data: every recipient's result carries
# its text, so a job's outcome is big and a few fill the kernel's socket buffer.
LONG_REPLY = "\r\n".join(
    [f"250-{i} " + "queued and accounted for; " * 15 for i in range(6)] + ["250 2.0.0 ok"])


def test_outcomes_wait_for_a_shard_that_is_not_reading(lab):
    jobs, per_job = 16, 30
    gate = threading.Event()
    dest, handler = gated_sink(lab, IP_A, gate, data=lambda s, t: LONG_REPLY)
    domains = [f"d{i}.test" for i in range(jobs)]
    lab.serve([line for dom in domains for line in mx(dom, f"mx.{dom}", IP_A)])
    # One shard, and a bus of two messages between it and the delivery process.
    d = lab.daemon(shards=1, command_timeout=60.0, data_timeout=60.0,
                   sections={"spool": {"queue_high_water": 2}})
    sent = {}
    with smtplib.SMTP(HOST, d.port, timeout=30) as s:
        s.ehlo("client.test")
        for dom in domains:       # one message (one job, one connection) per domain
            m = message(f"to {dom}")
            rcpts = [f"u{k}@{dom}" for k in range(per_job)]
            code, text = smtp_transaction(s, "alice@sender.test", rcpts, m)
            assert code == 250, (code, text)
            sent[queued_id(text.decode())] = (m, rcpts)
    # Every job is in the delivery process's hands, each at the end of its data.
    wait_until(lambda: handler.entered == jobs, 30, "every job at the receiver")
    shard = d.children()["spool[0]"]
    os.kill(shard, signal.SIGSTOP)
    try:
        gate.set()
        wait_until(lambda: dest.received() == jobs, 30, "every delivery done")
        # Each recipient's result is logged once its outcome is handed back or held.
        d.wait_log(r"status=delivered", count=jobs * per_job, timeout=30)
    finally:
        os.kill(shard, signal.SIGCONT)
    wait_queue_empty(d, timeout=30)

    # Every recipient was delivered exactly once and its delivery recorded once.
    got = collections.Counter()
    for t in dest.snapshot():
        qid = qid_of(t.data)
        received_ok(t.data, sent[qid][0], qid)
        for r in t.rcpt_tos:
            got[(qid, r)] += 1
    expected = {(qid, r) for qid, (_, rcpts) in sent.items() for r in rcpts}
    assert set(got) == expected and set(got.values()) == {1}
    check_events(d, {key: "delivery" for key in expected})
    # The bus really was full: outcomes were held back, then handed over (logged once
    # the delivery process's loop turn ends, after handing them over: waited for).
    log = d.wait_log(r"\d+ held-back outcome\(s\) handed back after [\d.]+s; taking jobs again")
    assert "a spool shard is not taking outcomes (bus full)" in log
    # Nothing was lost and left to the reaper, nor dropped.
    assert "got no outcome" not in log
    assert "outcome not handed back" not in log and "outcome dropped" not in log


def test_a_job_whose_outcome_never_comes_is_sent_again(lab):
    dest = lab.aio(IP_A)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A))
    # The shard gives up on an outcome after 2 + 2 x 2 + 2 + 2 = 10 s.
    d = lab.daemon(shards=1, connect_timeout=2.0, command_timeout=2.0, data_timeout=2.0,
                   job_timeout_margin=2.0)
    victim = d.children()["delivery[0]"]
    # One message delivered first: the delivery process's link to the shard is up
    # (stopped before it connects, the shard would only park the job, never send it).
    warm = d.send("alice@sender.test", ["warm@dest.test"], message("warm"))
    dest.wait_for("warm@dest.test")
    # And its outcome is back at the shard: the receiver has the message before the
    # delivery process hands the outcome over (at the end of its loop turn), and a
    # stop in between would leave two jobs for the reaper.
    wait_queue_empty(d, timeout=20)
    # Stopped, not dead: its connection to the shard stays up, so the shard
    # sees no disconnect (which would send the job again at once).
    os.kill(victim, signal.SIGSTOP)
    try:
        m = message("stuck")
        qid = d.send("alice@sender.test", ["bob@dest.test"], m)
        d.wait_log(r"1 delivery job\(s\) got no outcome in 10s; they will be sent again",
                   timeout=60)
        # From the reaper's log line the shard has no job out until it has
        # dispatched this one again.
        wait_until(lambda: d.queue_summary()["shards"][0]["in_flight"] == 1, 20,
                   "the job dispatched again")
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_queue_empty(d, timeout=30)
    # Both the first job (still in the stopped process's socket) and the one
    # sent again reached the receiver: at-least-once, and once more at most.
    copies = [t for t in dest.snapshot() if qid_of(t.data) == qid]
    assert len(copies) == 2, [qid_of(t.data) for t in dest.snapshot()]
    for t in copies:
        received_ok(t.data, m, qid)
        assert t.rcpt_tos == ["bob@dest.test"]
    # The spool recorded the delivery once; the later outcome was a repeat.
    check_events(d, {(qid, "bob@dest.test"): "delivery", (warm, "warm@dest.test"): "delivery"})
    # (a delivery's log line is written after its outcome is handed over)
    log = d.wait_log(rf"{qid}: to=<bob@dest.test> .*status=delivered", count=2)
    assert "went away" not in log      # no disconnect: it was the reaper
    assert len(re.findall(rf"{qid}: to=<bob@dest.test> .*status=delivered", log)) == 2
