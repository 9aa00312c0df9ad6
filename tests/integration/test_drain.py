"""mta drain on the real daemon: no new mail (SMTP 421, HTTP 503 + Retry-After), the queue
still delivered to a receiving server, the report down to zero, and --cancel accepting again.

The receiver answers 451 until the test lets it take mail, so the queue is not
empty when the drain starts; ``mta queue flush`` then makes the deferred
recipients due at once.
"""
from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

from daemon import queued_id, wait_until
from mxlab import IPS, mx
from test_admin_api import admin_call, message


def banner(d) -> tuple[int, str]:
    c = d.connect()
    try:
        return c.banner[0], " ".join(c.banner[1])
    finally:
        c.close()


def acceptors_logged(d, text: str) -> set[str]:
    """The indexes of the acceptors whose log lines hold *text* (each logs what it sees)."""
    return set(re.findall(r"acceptor\[(\d+)\]\[\d+\]: " + re.escape(text), d.log()))


def on_a_terminal(d, *args) -> str:
    """Run ``mta ARGS`` with its output on a pseudo-terminal; what it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mta", *args], stdout=slave, stderr=slave,
                            env={**d.env, "MTA_CONFIG": d.config_path, "COLUMNS": "120",
                                 "TERM": "xterm"}, cwd=d.dir)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:             # EIO: the other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(60) == 0, out
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode("utf-8", "replace"))


def test_drain_refuses_new_mail_delivers_the_queue_and_reports_zero(lab):
    ip = IPS[0]
    blocked = {"on": True}
    sink = lab.aio(ip, rcpt=lambda s, addr, frm: "451 4.3.0 not now" if blocked["on"] else None)
    lab.serve(mx("drain.test", "mx.drain.test", ip))
    d = lab.daemon(acceptors=2, shards=2)
    n = 5
    qids = [d.send("a@sender.test", [f"r{i}@drain.test"], message(f"d{i}")) for i in range(n)]

    def deferred():
        st, _, q = admin_call(d, "GET", "/api/admin/queue")
        return q if q["total"]["deferred"] == n else None
    wait_until(deferred, 30, "every recipient deferred once", interval=0.3)
    before = d.session()                 # open before the drain, idle

    st, _, rep = admin_call(d, "POST", "/api/admin/drain")
    assert st == 200 and rep["draining"] is True and rep["done"] is False
    assert rep["remaining"]["messages"] == n and rep["remaining"]["recipients"] == n
    assert rep["since"] > 0 and rep["delivery_held"] is False

    # New connections: 421 4.3.2 (the acceptors look for the drain twice a second).
    # Each acceptor on its own sweep: wait until every one refuses, whichever the kernel picks.
    # (six banners may all come from the one acceptor that has looked: each acceptor
    # logs when it sees the flag, so wait for both lines too)
    wait_until(lambda: acceptors_logged(d, "node draining:") == {"0", "1"}, 10,
               "both acceptors logging the drain")
    seen = wait_until(lambda: (lambda b: b if all(x[0] == 421 for x in b) else None)(
        [banner(d) for _ in range(6)]), 10, "421 at connect from every acceptor")
    assert all("4.3.2" in text for _, text in seen), seen
    # A session opened before: a new transaction gets 421 4.3.2 -- once its own acceptor
    # has looked (the six connections above may all have gone to the other one).
    def refused():
        reply = before.cmd("MAIL FROM:<a@sender.test>")
        if reply[0] == 250:
            assert before.cmd("RSET")[0] == 250
            return None
        return reply
    code, lines = wait_until(refused, 5, "421 to MAIL in the session opened before",
                             interval=0.2)
    assert code == 421 and "4.3.2" in lines[0], lines
    before.close()
    # HTTP injection: 503 with Retry-After, a JSON error.
    st, headers, body = d.post({"recipients": ["h@drain.test"],
                                "content": {"from": "a@sender.test", "subject": "s",
                                            "text": "x"}})
    assert st == 503 and int(headers["retry-after"]) > 0, (st, headers, body)
    assert "draining" in body["errors"][0]["description"] + body["errors"][0]["message"]

    # The report, as JSON lines, until zero; meanwhile the receiver takes mail again.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mta", "drain", "--json", "--interval", "0.3",
         "--timeout", "90"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**d.env, "MTA_CONFIG": d.config_path}, cwd=d.dir)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["remaining"]["messages"] == n and first["draining"]
        blocked["on"] = False
        d.cli("queue", "flush")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    reports = [first] + [json.loads(x) for x in out.decode().splitlines()]
    last = reports[-1]
    assert last["done"] is True and last["remaining"]["messages"] == 0
    assert last["remaining"]["recipients"] == 0
    remaining = [r["remaining"]["messages"] for r in reports]
    assert remaining == sorted(remaining, reverse=True), remaining
    # Every queued message was delivered, once; nothing new got in.
    got = sorted((q, rc) for q, rc, _ in sink.deliveries())
    assert got == sorted((q, f"r{i}@drain.test") for i, q in enumerate(qids)), got

    # The plain report (not a terminal) says it is drained.
    r = d.cli("drain", "--timeout", "30")
    text = r.stdout.decode()
    assert "remaining: 0 message(s)" in text and "drained" in text, text
    # In a terminal: a progress bar (rich) with the counts.
    text = on_a_terminal(d, "drain", "--timeout", "30")
    assert "draining" in text and "0 left" in text and "drained" in text, text
    # Still refusing until cancelled.
    assert banner(d)[0] == 421

    r = d.cli("drain", "--cancel")
    assert "accepting mail" in r.stdout.decode()
    wait_until(lambda: acceptors_logged(d, "node drain cancelled:") == {"0", "1"}, 10,
               "both acceptors logging the cancel")
    wait_until(lambda: all(banner(d)[0] == 220 for _ in range(6)), 10,
               "220 from every acceptor after --cancel")
    d.send("a@sender.test", ["after@drain.test"], message("after"))
    wait_until(lambda: sink.received() == n + 1, 30, "the new message delivered")
    st, _, rep = admin_call(d, "GET", "/api/admin/drain")
    assert rep["draining"] is False
    assert "Traceback" not in d.log()


def test_a_drain_is_not_done_while_a_message_is_on_its_way_in(make_daemon):
    # A DATA begun before the drain is still taken (its client gets 250); until it is
    # answered the drain is not done, or an operator would take the node down with it
    # (the queue looked empty, so the report said done).
    d = make_daemon(acceptors=1, shards=1)     # deliveries held: what lands stays queued
    with d.session() as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.net>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: late\r\n\r\nstill coming\r\n")
        st, _, rep = admin_call(d, "POST", "/api/admin/drain")
        assert st == 200

        def report():
            return admin_call(d, "GET", "/api/admin/drain")[2]
        rep = wait_until(lambda: (lambda r: r if r["remaining"]["transactions_open"] == 1
                                  else None)(report()), 20, "the open transaction reported")
        assert rep["done"] is False and rep["remaining"]["messages"] == 0
        code, lines = c.cmd(".")
        assert code == 250, lines
    rep = wait_until(lambda: (lambda r: r if r["remaining"]["transactions_open"] == 0
                              else None)(report()), 20, "no transaction open any more")
    assert rep["remaining"]["messages"] == 1 and rep["done"] is False
    assert rep["delivery_held"] is True
    # held, it would wait for ever; `mta drain` says why instead of only counting
    r = d.cli("drain", "--timeout", "1", "--interval", "0.2", check=False)
    assert r.returncode == 1
    assert b"delivery is held ([delivery] hold = true)" in r.stderr, r.stderr
    assert b"still draining" in r.stderr and b"mta drain --cancel" in r.stderr, r.stderr
    # the operator deletes it, and the node is empty
    d.cli("queue", "delete", queued_id(" ".join(lines)))
    wait_until(lambda: report()["done"], 20, "the drain done")


def test_mta_drain_says_the_drain_took_effect_when_the_spool_does_not_answer(make_daemon):
    """A shard not answering (a stalled disk, the moment an operator drains the node):
    `mta drain` failed with only "the spool is not answering", exit 69, though the node
    was draining -- refusing all new mail until someone cancels it; --cancel likewise,
    with the node accepting mail again.  The error says what was done."""
    import signal
    d = make_daemon(acceptors=1, shards=1)
    spool = d.children()["spool[0]"]
    os.kill(spool, signal.SIGSTOP)
    try:
        r = d.cli("drain", "--no-wait", check=False)
        assert r.returncode == 69, r
        assert b"did not answer" in r.stderr, r.stderr
        assert b"the drain is started" in r.stderr, r.stderr
        assert b"mta drain --cancel" in r.stderr, r.stderr
        wait_until(lambda: banner(d)[0] == 421, 10, "new connections refused")
        r = d.cli("drain", "--cancel", check=False)
        assert r.returncode == 69, r
        assert b"the drain is cancelled" in r.stderr, r.stderr
        wait_until(lambda: banner(d)[0] == 220, 10, "new connections taken again")
    finally:
        os.kill(spool, signal.SIGCONT)
