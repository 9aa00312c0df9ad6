"""The operator's commands against the real daemon where the reviews found them wanting:
a queue id as the events carry it (lower case), a daemon that is not there, what holds
a message back."""
from __future__ import annotations

import json
import time

from test_admin_api import admin_call, message


def test_a_queue_id_in_lower_case_as_the_events_carry_it(make_daemon):
    """The events' message_id and the VERP return path carry the queue id in lower case;
    an operator copies it from there.  `mta inspect`, `mta queue show`, `mta queue flush
    --queue-id`, `mta queue delete` and the admin API answered "not a queue id"."""
    d = make_daemon(acceptors=1, shards=2)
    qid = d.send("a@sender.test", ["x@one.test"], message("lower"))
    low = qid.lower()
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
