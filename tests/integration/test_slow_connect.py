"""A receiver whose connection phase (greeting, EHLO) is slower than the time a job may
wait in a delivery process (``delivery.job_timeout_margin`` / 2, the lane sweep's bound).

Postfix's ``smtp-sink`` with ``-W CONNECT:2 -W EHLO:2`` (it greets, and answers EHLO,
two seconds late) behind a real DNS server; ``delivery.idle_timeout = 0``: the
connection is closed once the lane has nothing more for it (as Postfix's client does
without a backlog), so a job sent back to the spool finds no connection open when it
comes again.  The job used to be handed back (REQUEUED: no attempt counted) every time
its connection opened, and came back to open another one, every three seconds, for as
long as the message could live (``mta queue list``: 0 attempts, no delay event, no
back-off).  Now the job is sent on its connection when its transaction still ends
within the spool's job timeout, and deferred as an attempt that timed out when not.
"""
from __future__ import annotations

import re
import time

from daemon import split_received, wait_until
from mxlab import IPS, mx
from test_delivery import check_events, message, wait_queue_empty

IP_A = IPS[0]
SLOW = ["-W", "CONNECT:2", "-W", "EHLO:2"]       # 4 s from connect to the EHLO reply


def statuses(d, qid: str) -> list[str]:
    return re.findall(rf"{qid}: to=<[^>]*> .* status=(\w+)", d.log())


def test_a_slow_greeting_with_time_left_is_delivered_on_its_connection(lab):
    sink = lab.smtp_sink(IP_A, SLOW)
    lab.serve(mx("slow.test", "mx.slow.test", IP_A))
    # max_wait 1 s; the job's transaction may begin up to connect + command timeouts
    # (15 s) after the job came: its 4 s connection leaves time enough
    d = lab.daemon(job_timeout_margin=2.0, idle_timeout=0.0, connect_timeout=5.0,
                   command_timeout=10.0, retry_schedule=[3600.0])
    m = message("slow greeting")
    qid = d.send("alice@sender.test", ["u1@slow.test"], m)
    wait_until(lambda: sink.count() == 1, 20, "the message at the slow receiver")
    wait_queue_empty(d)
    [dump] = sink.messages()
    assert dump.rcpt_tos == ["u1@slow.test"]
    assert split_received(dump.message)[1] == m.replace(b"\r\n", b"\n")
    # sent on the first connection: never handed back to the spool
    assert statuses(d, qid) == ["delivered"], d.log()[-3000:]
    ev = check_events(d, {(qid, "u1@slow.test"): "delivery"})
    assert ev[(qid, "u1@slow.test")]["terminal"]["num_retries"] == "0"


def test_a_connection_phase_past_the_job_timeout_is_a_deferred_attempt(lab):
    sink = lab.smtp_sink(IP_A, SLOW)
    lab.serve(mx("slow.test", "mx.slow.test", IP_A))
    # each step within command_timeout (2.5 s), the four seconds together past connect +
    # command timeouts (3 s): the transaction could end after the spool sent the job
    # again, so it is not begun
    d = lab.daemon(job_timeout_margin=2.0, idle_timeout=0.0, connect_timeout=0.5,
                   command_timeout=2.5, retry_schedule=[3600.0], retry_jitter=0.0)
    qid = d.send("alice@sender.test", ["u1@slow.test"], message("too slow"))
    wait_until(lambda: statuses(d, qid), 20, "the job's outcome")
    t0 = time.monotonic()
    # It used to come back every ~3 s (1 s requeue + a 2-4 s connection): watch 10 s.
    time.sleep(10.0)
    assert statuses(d, qid) == ["deferred"], d.log()[-3000:]
    assert time.monotonic() - t0 >= 10.0
    assert sink.count() == 0
    [entry] = d.queue_list()
    [state] = entry["recipient_state"]
    assert state["state"] == "pending" and state["attempts"] == 1, state
    assert state["next_attempt"] > time.time() + 3000
    [delay] = [e for e in d.events() if e["type"] == "delay"]
    assert delay["error_code"] == "451" and delay["num_retries"] == "0", delay
    assert delay["raw_reason"].startswith("451 4.4.1 mx.slow.test[127.0.0.10]: "), delay
    assert re.search(r"connection setup \(greeting, EHLO, STARTTLS\) took [4-9]\.\d+s: too slow",
                     delay["raw_reason"]), delay
