"""The operator's commands against the real daemon where the reviews found them wanting:
a queue id as the events carry it (lower case), a daemon that is not there, what holds
a message back."""
from __future__ import annotations

import json
import time
import urllib.parse

import pytest

from daemon import wait_until
from test_admin_api import admin_call, message


def test_a_queue_id_in_lower_case_as_the_events_carry_it(make_daemon):
    """The events' message_id and the VERP return path carry the queue id in lower case;
    an operator copies it from there.  `mta inspect`, `mta queue show`, `mta queue flush
    --queue-id`, `mta queue delete` and the admin API answered "not a queue id"."""
    d = make_daemon(acceptors=1, shards=2)
    # (a queue id is hex: one of digits only -- its time's digits happened to be, in a
    # CI run -- is its own lower case; the next message's id is taken then)
    for _ in range(50):
        qid = d.send("a@sender.test", ["x@one.test"], message("lower"))
        low = qid.lower()
        if low != qid:
            break
    assert low != qid
    st, _, body = admin_call(d, "GET", f"/api/admin/messages/{low}")
    assert st == 200 and body["queue_id"] == qid, body
    out = d.cli("inspect", low).stdout.decode()
    assert f"queue_id: {qid}" in out, out
    out = d.cli("queue", "show", low).stdout.decode()
    assert f"queue_id: {qid}" in out and "Subject: lower" in out, out
    r = json.loads(d.cli("queue", "flush", "--queue-id", low, "--json").stdout)
    assert r["not_queued"] == [], r
    r = json.loads(d.cli("queue", "delete", low, "--json").stdout)
    assert r["deleted"] == [qid], r
    assert admin_call(d, "GET", f"/api/admin/messages/{qid}")[0] == 404
    # still not a queue id: not hex, or the wrong length
    for bad in ("zz" + low[2:], low[:-1], "ALL".lower()):
        r = d.cli("queue", "show", bad, check=False)
        assert r.returncode == 1 and b"not a queue id" in r.stderr, r


def test_queue_list_and_delete_say_at_once_that_no_daemon_answers(make_daemon):
    """After the daemon died (kill -9: its sockets' files stay), `mta queue list` and
    `mta queue delete` waited 30 s before saying it does not answer; the other
    commands 5 s."""
    d = make_daemon(acceptors=1, shards=2)
    qid = d.send("a@sender.test", ["x@one.test"], message("gone"))
    d.kill9()
    for args in (("queue",), ("queue", "list"), ("queue", "delete", qid)):
        t0 = time.monotonic()
        r = d.cli(*args, check=False)
        took = time.monotonic() - t0
        assert r.returncode == 69 and b"not answering" in r.stderr, (args, r)
        assert took < 8, (args, took)


@pytest.mark.slow     # (its module goes first: see tests/conftest.py)
def test_an_answer_never_read_does_not_keep_its_admin_connection(make_daemon):
    """The admin listener closed a connection after writing its answer with no bound: a
    client that never reads a large answer (a message's view, /metrics) kept its slot among
    admin.max_connections for ever, and once all were taken every request got 503."""
    import socket

    from daemon import HOST
    from mta.admin.main import ANSWER_STALL

    d = make_daemon(acceptors=1, shards=1, admin={"max_connections": 3},
                    smtp={"max_recipients": 30000})
    # a message of 30,000 recipients: its view is ~7 MB, more than the kernel buffers
    # (a smaller answer is taken whole by the kernel, and the connection closed)
    qid = d.send("a@sender.test", [f"{'r' * 58}{i}@{'d' * 60}.test" for i in range(30000)],
                 message("big"))
    st, _, _ = admin_call(d, "GET", f"/api/admin/messages/{qid}")
    assert st == 200
    hogs = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect((HOST, d.admin_port))
            s.sendall(f"GET /api/admin/messages/{qid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            hogs.append(s)
        time.sleep(1.0)
        assert admin_call(d, "GET", "/api/admin/status")[0] == 503   # every slot taken
        t0 = time.monotonic()
        while True:
            st = admin_call(d, "GET", "/api/admin/status")[0]
            if st == 200:
                break
            assert time.monotonic() - t0 < ANSWER_STALL + 5, st
            time.sleep(0.5)
    finally:
        for s in hogs:
            s.close()


def test_inspect_says_what_holds_a_message_instead_of_now(make_daemon, lab):
    """`mta inspect` said "next attempt: now" (and `mta queue` NEXT RETRY "now") for mail
    that cannot go now: [delivery] hold, or its domain suspended by the operator."""
    d = make_daemon(acceptors=1, shards=1)          # ([delivery] hold = true)
    qid = d.send("a@sender.test", ["x@one.test"], message("held"))
    out = d.cli("inspect", qid).stdout.decode()
    assert "next attempt: held ([delivery] hold)" in out and ": now" not in out, out
    body = json.loads(d.cli("inspect", qid, "--json").stdout)
    assert body["held"] == "[delivery] hold", body

    from mxlab import IPS, mx
    ip = IPS[0]
    lab.aio(ip, rcpt=lambda s, a, f: "451 4.3.0 later" if a.startswith("later@") else None)
    lab.serve(mx("held.test", "mx.held.test", ip))
    d = lab.daemon(shards=1, retry_schedule=[1.0], retry_jitter=0.0)
    # deferred once, its retry due in a second; then [delivery] hold by a reload
    qid = d.send("a@sender.test", ["later@held.test"], message("deferred"))
    wait_until(lambda: json.loads(d.cli("inspect", qid, "--json").stdout)["recipients"][0]
               ["attempts"] == 1, 20, "the first attempt")
    d.reload(delivery={"hold": True})
    time.sleep(1.5)
    rows = d.cli("queue").stdout.decode().splitlines()
    shard = next(r for r in rows if r.startswith("0 "))
    assert " held " in shard and " now " not in shard, rows
    out = d.cli("inspect", qid).stdout.decode()
    assert "next attempt: held ([delivery] hold)" in out and "now" not in out, out
    d.reload(delivery={"hold": False})
    s = json.loads(d.cli("suspend", "--domain", "held.test", "--reason", "complaints",
                         "--json").stdout.decode().splitlines()[-1])
    qid = d.send("a@sender.test", ["r@held.test"], message("suspended"))
    out = d.cli("inspect", qid).stdout.decode()
    assert "next attempt: suspended until resumed (complaints)" in out, out
    assert ", now" not in out and ": now" not in out, out
    body = json.loads(d.cli("inspect", qid, "--json").stdout)
    assert body["recipients"][0]["suspended"] == {
        "id": s["id"], "until": None, "reason": "complaints"}, body


def test_a_queue_id_spelled_loosely_is_refused_not_matched(make_daemon):
    """is_qid took whatever int(text, 16) takes: a "0X" prefix, a space around, "_"
    between digits.  `mta queue show/delete/flush --queue-id` and the admin API then
    looked such an id up ("not in the queue", 0 deleted) instead of saying that it is
    not a queue id."""
    import urllib.parse

    d = make_daemon(acceptors=1, shards=1)
    qid = d.send("a@sender.test", ["x@one.test"], message("loose"))
    for bad in ("0x" + qid[2:], " " + qid[1:], qid[:-1] + " ", qid[:6] + "_" + qid[7:]):
        r = d.cli("queue", "show", bad, check=False)
        assert r.returncode == 1 and b"is not a queue id (20 hexadecimal digits)" \
            in r.stderr, (bad, r)
        for args in (("queue", "delete", bad), ("queue", "flush", "--queue-id", bad)):
            r = d.cli(*args, check=False)
            assert r.returncode == 1 and b"not queue ids: " in r.stderr and \
                b"(20 hexadecimal digits each)" in r.stderr, (args, r)
        st, _, err = admin_call(d, "GET", "/api/admin/messages/" + urllib.parse.quote(bad))
        assert st == 400 and err["errors"][0]["field"] == "qid", (bad, st, err)
        st, _, err = admin_call(d, "POST", "/api/admin/flush?" + urllib.parse.urlencode(
            {"qid": bad}))
        assert st == 400 and "not a queue id" in err["errors"][0]["message"], (bad, st, err)
    # the message is still there, found by its id
    out = d.cli("queue", "show", qid).stdout.decode()
    assert f"queue_id: {qid}" in out, out


def test_queue_list_and_delete_answer_soon_with_a_shard_stopped(make_daemon):
    """A spool shard that is stopped (or wedged: alive, not reading its socket) cost
    `mta queue list` and `mta queue delete` 30 s each, and then they said only that it
    did not answer: the other shards' messages went unlisted and undeleted.  They now
    wait --timeout (5 s) for it, give the others' answers, and name it (exit 69)."""
    import os
    import signal

    from mta.queueid import shard_of

    # ([admin] shard_timeout: the commands' default wait, shorter than its 5 s)
    d = make_daemon(acceptors=1, shards=2, admin={"shard_timeout": 0.7})
    qids = [d.send("a@sender.test", [f"x{i}@one.test"], message(f"m{i}")) for i in range(6)]
    on = {n: [q for q in qids if shard_of(q, 2) == n] for n in (0, 1)}
    assert on[0] and on[1], qids
    stopped = d.children()["spool[1]"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = d.cli("queue", "list", check=False)
        took = time.monotonic() - t0
        assert r.returncode == 69 and b"spool[1]: did not answer within 0.7s" in r.stderr, r
        assert b"its messages are not listed" in r.stderr, r
        listed = [json.loads(line)["queue_id"] for line in r.stdout.splitlines()]
        assert sorted(listed) == sorted(on[0]) and took < 12, (listed, took)
        t0 = time.monotonic()
        r = d.cli("queue", "list", "--timeout", "0.5", check=False)
        assert r.returncode == 69 and len(r.stdout.splitlines()) == len(on[0]), r
        assert time.monotonic() - t0 < 6, time.monotonic() - t0
        t0 = time.monotonic()
        r = d.cli("queue", "delete", "--json", "--timeout", "0.5", on[0][0], on[1][0],
                  check=False)
        assert time.monotonic() - t0 < 6, time.monotonic() - t0
        assert r.returncode == 69 and json.loads(r.stdout)["deleted"] == [on[0][0]], r
        assert b"spool[1]: did not answer within" in r.stderr and \
            b"1 of the queue id(s) are its and not confirmed deleted" in r.stderr, r
    finally:
        os.kill(stopped, signal.SIGCONT)
    # once it runs again, it answers (and did the delete it was sent meanwhile)
    r = d.cli("queue", "list")
    listed = sorted(json.loads(line)["queue_id"] for line in r.stdout.splitlines())
    assert on[0][0] not in listed and set(on[0][1:] + on[1][1:]) <= set(listed), listed


def test_queue_summary_and_flush_with_shards_stopped_say_what_the_others_say(make_daemon):
    """`mta queue` with a spool shard stopped waited 5 s per shard that did not answer
    and then printed nothing but "not answering"; `mta queue flush` waited 5 s per
    such shard, one after the other.  Both now ask the shards at once: one bound in
    all, the others' answers given, the stopped ones named (exit 69)."""
    import os
    import signal

    from mta.queueid import shard_of

    # ([admin] shard_timeout: the bound of the admin API and the commands, 5 s unset)
    d = make_daemon(acceptors=1, shards=3, admin={"shard_timeout": 1.5})
    for i in range(6):
        d.send("a@sender.test", [f"x{i}@one.test"], message(f"m{i}"))
    kids = d.children()
    stopped = [kids["spool[1]"], kids["spool[2]"]]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = d.cli("queue", check=False)
        took = time.monotonic() - t0
        out = r.stdout.decode()
        assert r.returncode == 69 and took < 8, (took, r)
        assert b"spool[1] did not answer within 1.5s" in r.stderr and \
            b"spool[2] did not answer within 1.5s" in r.stderr, r
        assert out.startswith("SHARD") and "\n0 " in out, out      # shard 0's row
        assert "did not answer" in out, out                          # and theirs say so
        t0 = time.monotonic()
        r = d.cli("queue", "flush", check=False)
        took = time.monotonic() - t0
        assert r.returncode == 69 and took < 8, (took, r)
        assert b"spool[1] did not answer" in r.stderr and b"spool[2] did not answer" \
            in r.stderr, r
        # mta queue list asks every shard's first page at once too: one bound in all
        t0 = time.monotonic()
        r = d.cli("queue", "list", "--timeout", "2", check=False)
        took = time.monotonic() - t0
        assert r.returncode == 69 and took < 5, (took, r)
        assert b"spool[1]: did not answer within 2s" in r.stderr and \
            b"spool[2]: did not answer within 2s" in r.stderr, r
        assert all(shard_of(json.loads(x)["queue_id"], 3) == 0
                   for x in r.stdout.splitlines()), r
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert d.cli("queue").returncode == 0


def test_the_queue_view_with_a_shard_stopped_shows_the_others_and_names_it(make_daemon):
    """GET /api/admin/queue, `mta queue summary`, `mta status` (and the status page)
    answered 503 / "queue: unknown" when one spool shard did not answer, though the
    others had: the operator saw nothing of the queue.  They now show the shards that
    answered, name the one that did not, and say the totals are partial; the drain is
    never done while a shard is not counted, whatever the others' totals say."""
    import os
    import signal

    from mta.queueid import shard_of

    # (delivery held: what lands stays queued; [admin] shard_timeout: the bound is 0.7 s)
    d = make_daemon(acceptors=1, shards=3, admin={"shard_timeout": 0.7})
    qids = [d.send("a@sender.test", [f"x{i}@one.test"], message(f"m{i}")) for i in range(9)]
    on = {n: [q for q in qids if shard_of(q, 3) == n] for n in range(3)}
    assert on[1] and on[0] + on[2], qids
    # (only the stopped shard holds mail: the others' totals are 0)
    d.cli("queue", "delete", *(on[0] + on[2]))
    stopped = d.children()["spool[1]"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        st, _, v = admin_call(d, "GET", "/api/admin/queue")
        assert st == 200, v
        assert v["total"]["partial"] is True and v["total"]["messages"] == 0, v["total"]
        assert [x["shard"] for x in v["shards"]] == [0, 2], v["shards"]
        assert all(x["state"] == "ok" for x in v["shards"]), v["shards"]
        assert [(x["shard"], x["state"]) for x in v["not_answering"]] == \
            [(1, "not answering")], v["not_answering"]
        assert "did not answer within 0.7s" in v["not_answering"][0]["error"], v
        for k in ("by_domain", "by_site", "by_pool", "by_source", "lanes", "webhooks"):
            assert k in v, k        # (the fields consumers read are all there)
        r = d.cli("queue", "summary", check=False)
        out = r.stdout.decode()
        assert r.returncode == 69 and out.startswith("total: 0 message(s)"), r
        assert "partial: spool[1] not answering, not counted" in out, out
        assert b"spool[1] not answering" in r.stderr, r
        r = d.cli("status")
        out = r.stdout.decode()
        assert "queue: 0 message(s)" in out and "(partial: spool[1] not answering" in out, out
        assert "queue: unknown" not in out, out
        st, _, doc = admin_call(d, "GET", "/api/admin/status")
        assert st == 200 and doc["queue"]["total"]["partial"] is True, doc["queue"]
        assert [x["shard"] for x in doc["queue"]["not_answering"]] == [1], doc["queue"]
        st, _, rep = admin_call(d, "POST", "/api/admin/drain")
        assert st == 200, rep
        assert rep["remaining"]["messages"] == 0 and rep["partial"] is True, rep
        assert rep["done"] is False, rep            # (shard 1 holds mail: not drained)
        assert [x["shard"] for x in rep["not_answering"]] == [1], rep
        r = d.cli("drain", "--timeout", "1", "--interval", "0.5", check=False)
        assert r.returncode == 1 and b"still draining" in r.stderr, r
        assert b"partial: spool[1] not answering" in r.stdout, r
    finally:
        os.kill(stopped, signal.SIGCONT)
    st, _, v = admin_call(d, "GET", "/api/admin/queue")
    assert st == 200 and v["total"]["partial"] is False and v["not_answering"] == [], v
    assert v["total"]["messages"] == len(on[1]), v["total"]
    st, _, rep = admin_call(d, "GET", "/api/admin/drain")
    assert rep["done"] is False and rep["remaining"]["messages"] == len(on[1]), rep
    admin_call(d, "DELETE", "/api/admin/drain")


def test_a_change_the_command_gave_up_on_is_not_made_later(make_daemon):
    """With the admin process stopped (or wedged), `mta drain` and `mta suspend` said it
    did not answer (exit 69) and gave up; the request stayed in the listener's queue, and
    once the process ran again it was done all the same: the node stopped accepting mail
    (or a domain was held back) an hour later, though the operator had been told no.  A
    POST or DELETE whose client has gone before it is acted on is now not done."""
    import os
    import signal
    import subprocess
    import sys

    d = make_daemon(acceptors=1, shards=1)
    admin = d.children()["admin[0]"]
    os.kill(admin, signal.SIGSTOP)
    try:
        env = {**d.env, "MTA_CONFIG": d.config_path}
        runs = [subprocess.Popen([sys.executable, "-m", "mta", *args], env=env, cwd=d.dir,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for args in (("drain", "--no-wait"), ("suspend", "--domain", "held.test"))]
        for p in runs:
            _, err = p.communicate(timeout=30)
            assert p.returncode == 69 and b"is not answering" in err, (p.returncode, err)
    finally:
        os.kill(admin, signal.SIGCONT)
    st, _, body = admin_call(d, "GET", "/api/admin/drain")      # (answered after the two)
    assert st == 200 and body["draining"] is False, body
    st, _, body = admin_call(d, "GET", "/api/admin/suspensions")
    assert st == 200 and body["results"] == [], body
    assert d.send("a@sender.test", ["x@held.test"], message("still accepted"))
    assert "not done: its client" in d.log()


def test_queue_list_limit_out_of_range_is_refused_clearly(make_daemon):
    """`mta queue list --limit 99999999999999999999` ended in an OverflowError traceback
    (the bus cannot carry the number), and a negative --limit listed every message as if
    none was given; both are now refused, naming the option (exit 2); a limit beyond any
    queue lists them all."""
    d = make_daemon(acceptors=1, shards=1)
    qids = [d.send("a@sender.test", [f"x{i}@one.test"], message(f"m{i}")) for i in range(3)]
    for bad in ("-5", "99999999999999999999"):
        r = d.cli("queue", "list", "--limit", bad, check=False)
        assert r.returncode == 2 and b"--limit" in r.stderr, r
        assert b"Traceback" not in r.stderr and not r.stdout, r
    r = d.cli("queue", "list", "--limit", str(1 << 62))
    assert sorted(json.loads(x)["queue_id"] for x in r.stdout.splitlines()) == sorted(qids)
    r = d.cli("queue", "list", "--limit", "2")
    assert len(r.stdout.splitlines()) == 2, r


def test_suspend_and_bounce_refuse_what_is_no_domain_as_flush_does(make_daemon):
    """`mta queue flush --domain "bad domain.test"` was refused (not a domain name), but
    `mta suspend` kept such a suspension (listed, holding nothing) and `mta bounce` said
    "done: 0 of 0"; both now refuse it, naming the field."""
    d = make_daemon(acceptors=1, shards=1)
    for bad in ("bad domain.test", "a..test", "x.test/y"):
        for path in ("/api/admin/suspensions", "/api/admin/bounce"):
            st, _, body = admin_call(d, "POST", f"{path}?domain={urllib.parse.quote(bad)}")
            assert st == 400 and body["errors"][0]["field"] == "domain", (bad, path, body)
            assert "not a domain name" in body["errors"][0]["message"], body
        for cmd in ("suspend", "bounce"):
            r = d.cli(cmd, "--domain", bad, check=False)
            assert r.returncode == 1 and b"not a domain name" in r.stderr, (cmd, r)
    assert admin_call(d, "GET", "/api/admin/suspensions")[2]["results"] == []
    # a domain in capitals, an IDN and a literal are domains
    for good in ("Held.Test", "bücher.test", "[127.0.0.1]"):
        st, _, body = admin_call(d, "POST",
                                 f"/api/admin/suspensions?domain={urllib.parse.quote(good)}")
        assert st == 200, (good, body)


def test_drain_cancel_with_a_shard_stopped_says_its_count_is_partial(make_daemon):
    """`mta drain --cancel` with a spool shard stopped said "N message(s) queued" of the
    other shards' messages only, as if that were the node's queue (`mta drain --no-wait`
    says "partial: spool[N] not answering"); it now says so too."""
    import os
    import signal

    from mta.queueid import shard_of

    d = make_daemon(acceptors=1, shards=2, admin={"shard_timeout": 0.7})
    qids = [d.send("a@sender.test", [f"x{i}@one.test"], message(f"m{i}")) for i in range(6)]
    on0 = [q for q in qids if shard_of(q, 2) == 0]
    d.cli("drain", "--no-wait")
    stopped = d.children()["spool[1]"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        r = d.cli("drain", "--cancel", check=False)
    finally:
        os.kill(stopped, signal.SIGCONT)
    out = r.stdout.decode()
    assert r.returncode == 0 and f"{len(on0)} message(s) queued" in out, r
    assert "partial: spool[1] not answering" in out, r


def test_queue_delete_of_an_id_not_queued_says_so_and_fails(make_daemon):
    """`mta queue delete ID` of a queue id that is not queued (delivered, deleted, never
    there) said "deleted 0 message(s)" and exited 0, where `mta queue flush --queue-id`
    of it exits 1: an operator's script could not tell.  It now names the ids not
    queued and exits 1, a partial delete too (the others deleted, and said so); the
    other commands that take an id fail on an unknown one as well."""
    d = make_daemon(acceptors=1, shards=2)
    qids = [d.send("a@sender.test", [f"x{i}@one.test"], message(f"m{i}")) for i in range(3)]
    gone = qids[0]
    d.cli("queue", "delete", gone)
    r = d.cli("queue", "delete", gone, check=False)
    assert r.returncode == 1, r
    assert f"mta: not queued: {gone}".encode() in r.stderr, r
    r = d.cli("queue", "delete", "--json", gone, check=False)
    assert r.returncode == 1 and json.loads(r.stdout) == {"deleted": [], "not_queued": [gone]}, r
    # partial: the queued one deleted (and said), the other named, exit 1
    r = d.cli("queue", "delete", qids[1], gone, check=False)
    assert r.returncode == 1 and b"deleted 1 message(s)" in r.stdout, r
    assert f"mta: not queued: {gone}".encode() in r.stderr and qids[1].encode() not in r.stderr, r
    r = d.cli("queue", "delete", "--json", qids[2], gone, qids[2].lower(), check=False)
    assert r.returncode == 1, r
    assert json.loads(r.stdout) == {"deleted": [qids[2]], "not_queued": [gone]}, r
    st, _, body = admin_call(d, "GET", "/api/admin/queue")
    assert body["total"]["messages"] == 0, body["total"]
    # the same exit status as flush of it; the other commands that take an id fail too
    r = d.cli("queue", "flush", "--queue-id", gone, check=False)
    assert r.returncode == 1 and b"not queued" in r.stderr, r
    for args in (("queue", "show", gone), ("inspect", gone), ("resume", "nosuch"),
                 ("rules", "cancel", "nosuch")):
        r = d.cli(*args, check=False)
        assert r.returncode == 1 and r.stderr, (args, r)
    # ALL of an empty queue is no error: nothing was named
    r = d.cli("queue", "delete", "ALL")
    assert b"deleted 0 message(s)" in r.stdout, r


def test_queue_show_without_a_daemon_fails_at_once(make_daemon):
    """`mta queue show QID` with no daemon running waited 6.4 s (the shard's bound, then
    a second's probe) before it said so; `mta queue` and `mta queue flush` waited the
    bound too after a kill -9 (the sockets' files stay).  Nothing listens on the spool
    shard's socket: they now fail as soon as `mta status` does, with the message and
    exit status (69) of the other commands.  A daemon that runs but is slow to answer
    (its shard stopped) still gets the whole bound."""
    import os
    import signal

    from mta.queueid import shard_of

    d = make_daemon(acceptors=1, shards=2, admin={"shard_timeout": 2.0})
    qid = d.send("a@sender.test", ["x@one.test"], message("gone"))
    stopped = d.children()[f"spool[{shard_of(qid, 2)}]"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = d.cli("queue", "show", qid, check=False)
        took = time.monotonic() - t0
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert r.returncode == 69 and b"not answering" in r.stderr and took >= 2.0, (took, r)
    assert d.cli("queue", "show", qid).returncode == 0

    def timed(*args):
        t0 = time.monotonic()
        r = d.cli(*args, check=False)
        return r, time.monotonic() - t0

    for how in ("kill -9", "stopped"):
        if how == "kill -9":
            d.kill9()           # (its sockets' files and pid file stay)
        else:
            d.start()
            assert d.stop() == 0
        r, base = timed("status")           # (nothing listens: refused at once)
        assert r.returncode == 69 and b"is 'mta serve' running?" in r.stderr, r
        for args in (("queue", "show", qid), ("queue",), ("queue", "flush"),
                     ("queue", "list"), ("queue", "delete", qid)):
            r, took = timed(*args)
            assert r.returncode == 69 and b"is 'mta serve' running" in r.stderr, (how, args, r)
            assert b"Traceback" not in r.stderr, r
            assert took < base + 0.5, (how, args, took, base)


def test_a_bulk_bounce_that_matches_nothing_says_so_and_fails(make_daemon):
    """`mta bounce --campaign X` of a campaign with nothing queued (a typo, the wrong case
    of a domain, mail already gone) said "done: 0 of 0 recipient(s) bounced" and exited
    0: a script, or an operator reading only the exit status, took the bounce as done.
    Like `mta queue delete` of an id not queued, it now says on stderr that nothing
    queued matches and exits 1 (the --json object as before); a bounce that matched
    bounces and exits 0.  `mta queue flush --domain` of a domain with nothing deferred
    stays exit 0: a flush changes nothing for good, and nothing deferred is the usual
    state of a domain whose mail went."""
    d = make_daemon(acceptors=1, shards=2)      # (delivery held: the mail stays queued)
    hdr = b'X-MSYS-API: {"campaign_id": "spring"}\r\n'
    spring = [d.send("a@sender.test", [f"s{i}@x.test"], hdr + message(f"s{i}"))
              for i in range(3)]
    for args in (("bounce", "--campaign", "sprnig"),
                 ("bounce", "--domain", "nosuch.test", "--no-wait"),
                 ("queue", "bounce", "--campaign", "spring", "--domain", "y.test")):
        r = d.cli(*args, check=False)
        assert r.returncode == 1, (args, r)
        assert b"0 of 0 recipient(s) bounced" in r.stdout, (args, r)
        assert b"mta: no queued recipient matches" in r.stderr, (args, r)
    r = d.cli("bounce", "--campaign", "sprnig", "--json", check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["total"] == 0, r
    assert b"no queued recipient matches" in r.stderr, r
    # nothing was bounced; the real campaign is, with exit 0
    assert {m["queue_id"] for m in d.queue_list()} == set(spring)
    r = d.cli("bounce", "--campaign", "spring")
    assert b"done: 3 of 3 recipient(s) bounced" in r.stdout and not r.stderr, r
    wait_until(lambda: not d.queue_list(), 15, "the bounced messages gone")
    # a flush of a domain with nothing deferred is no error
    r = d.cli("queue", "flush", "--domain", "nosuch.test")
    assert b"0 deferred recipient(s) at nosuch.test" in r.stdout, r
