"""The admin listener: Prometheus /metrics and /api/admin/health from the real daemon.

Traffic goes in over SMTP and HTTP and out through the lab (real DNS, real
receiving servers on 127.0.0.x); ``/metrics`` is read over HTTP like
Prometheus would and parsed with prometheus_client's text parser; the counts
must be what the test sent and what the receivers got.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

from daemon import wait_until
from test_admin_api import admin_call
from mxlab import IPS, mx
from prometheus_client.parser import text_string_to_metric_families

IP_A, IP_B = IPS[0], IPS[1]


def scrape(d, token: str | None = None) -> dict:
    """{(sample name, sorted label items): value} of the daemon's /metrics."""
    status, headers, body = d.admin_get("/metrics", token)
    assert status == 200, (status, body[:500])
    assert headers["content-type"].startswith("text/plain"), headers
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


def total(m: dict, name: str, **labels) -> float:
    """The sum of every series of *name* whose labels include *labels*."""
    want = set(labels.items())
    return sum(v for (n, lb), v in m.items() if n == name and want <= set(lb))


def message(subject: str) -> bytes:
    return (f"From: a@sender.test\r\nTo: x\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@client.test>\r\n\r\nhello\r\n").encode()


def spool_device_stats(path: str) -> list[int] | None:
    """The /proc/diskstats fields of the device *path* is on, read here independently."""
    st = os.stat(path)
    try:
        with open("/proc/diskstats") as fh:
            for line in fh:
                f = line.split()
                if (int(f[0]), int(f[1])) == (os.major(st.st_dev), os.minor(st.st_dev)):
                    return [f[2]] + [int(x) for x in f[3:14]]
    except OSError:
        return None
    return None


def test_metrics_count_what_was_injected_and_delivered(lab):
    ai = lab.aio(IP_A)
    lab.serve(mx("ai.test", "mx.ai.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B))
    d = lab.daemon(acceptors=1, shards=2)
    n_smtp = 5
    # The refused recipient and the HTTP request come first and the SMTP transactions
    # last: the one acceptor (SMTP and HTTP) reports once a second, so a report that
    # counts all n_smtp transactions (waited for below) also counts everything before.
    # Refused recipient: relay denied is not possible from loopback; a bad address is.
    with d.session() as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert c.cmd("RCPT TO:<not an address>")[0] >= 500
        assert c.cmd("QUIT")[0] == 221
    http_rcpts = [f"h{i}@ai.test" for i in range(3)]
    st, _, res = d.post({"recipients": http_rcpts,
                         "content": {"from": "a@sender.test", "subject": "hi", "text": "x"}})
    assert st == 200 and res["results"]["total_accepted_recipients"] == 3, res
    for i in range(n_smtp):
        d.send("a@sender.test", [f"r{i}@ai.test"], message(f"smtp{i}"))
    delivered = n_smtp + len(http_rcpts)
    wait_until(lambda: ai.received() == delivered, 30, "every message delivered")

    def settled():
        m = scrape(d)
        return m if value(m, "mta_delivery_outcomes_total", result="delivered") == delivered \
            else None
    m = wait_until(settled, 20, "the delivery outcomes in /metrics", interval=0.3)
    # Each child reports once a second on its own: wait until both shards have reported
    # after their last batch (a shard that has not reported yet has no series at all),
    # and the acceptor after its last transaction (its count is checked exactly below).
    def spool_settled():
        x = scrape(d)
        shards_empty = all(value(x, "mta_spool_queue_messages", shard=s) == 0
                           for s in ("0", "1"))
        return x if shards_empty and total(x, "mta_spool_commit_batch_messages_sum") == \
            delivered and (value(x, "mta_smtp_transaction_seconds_count") or 0) >= n_smtp \
            else None
    m = wait_until(spool_settled, 20, "both shards' and the acceptor's reports after their "
                   "last batch", interval=0.3)

    # Injection: exactly what was sent.
    assert value(m, "mta_smtp_messages_accepted_total") == n_smtp
    assert value(m, "mta_smtp_messages_rejected_total") == 0
    assert value(m, "mta_smtp_recipients_accepted_total") == n_smtp
    assert value(m, "mta_smtp_recipients_rejected_total") == 1
    # (+ the session above, + the harness's readiness probes)
    assert value(m, "mta_smtp_connections_total") >= n_smtp + 1
    assert value(m, "mta_smtp_transaction_seconds_count") == n_smtp
    assert value(m, "mta_smtp_transaction_seconds_bucket", le="+Inf") == n_smtp
    assert 0 < value(m, "mta_smtp_transaction_seconds_sum") < 60 * n_smtp
    assert value(m, "mta_http_messages_accepted_total") == len(http_rcpts)
    assert value(m, "mta_http_recipients_accepted_total") == len(http_rcpts)
    assert value(m, "mta_http_recipients_rejected_total") == 0
    assert value(m, "mta_http_requests_total", code="200") == 1
    assert value(m, "mta_http_request_seconds_count") == 1

    # Spool: both shards wrote, synced and emptied; the batches hold every message
    # accepted (no bounce was generated: everything was delivered).
    assert total(m, "mta_spool_fsync_seconds_count") > 0
    assert total(m, "mta_spool_commit_batch_messages_sum") == delivered
    assert total(m, "mta_spool_written_bytes_total") > 0
    for shard in ("0", "1"):
        assert value(m, "mta_spool_queue_messages", shard=shard) == 0
        assert value(m, "mta_spool_queue_recipients", shard=shard) == 0
        assert value(m, "mta_spool_queue_bytes", shard=shard) == 0
    assert value(m, "mta_spool_free_bytes") > 0

    # Delivery: every recipient delivered, nothing else; connections from the default
    # source to the site of ai.test; a DNS lookup for it.
    assert value(m, "mta_delivery_outcomes_total", result="deferred") == 0
    assert value(m, "mta_delivery_outcomes_total", result="failed") == 0
    assert value(m, "mta_delivery_attempts_total") == delivered   # one recipient per job
    assert value(m, "mta_delivery_job_seconds_count") == delivered
    attempts = {dict(lb)["site"]: v for (n, lb), v in m.items()
                if n == "mta_delivery_connection_attempts_total"}
    assert list(attempts) == ["mx.ai.test"] and attempts["mx.ai.test"] >= 1, attempts
    assert value(m, "mta_delivery_source_suspended", source="default") == 0
    assert value(m, "mta_dns_lookups_total") >= 1
    assert value(m, "mta_dns_lookup_seconds_count") == value(m, "mta_dns_lookups_total")
    assert value(m, "mta_dns_cache_misses_total") >= 1

    # Processes: every child up, with CPU time and memory.
    for title in d.children():
        role, _, index = title.partition("[")
        labels = {"role": role, "index": index.rstrip("]")}
        assert value(m, "mta_process_resident_memory_bytes", **labels) > 0, title
        assert value(m, "mta_process_cpu_seconds_total", **labels) > 0, title
        if role != "admin":
            assert value(m, "mta_child_up", **labels) == 1, title
    # Host: TCP counters (this test made connections), the spool's block device.
    assert value(m, "mta_tcp_active_opens_total") > 0
    assert value(m, "mta_tcp_passive_opens_total") > 0
    disk = spool_device_stats(d.state_dir)     # read before the scrape: counters only grow
    if disk is not None:     # a file system on a block device (not tmpfs)
        name = disk[0]
        m2 = scrape(d)
        assert value(m2, "mta_disk_writes_completed_total", device=name) >= disk[5]
        assert value(m2, "mta_disk_written_bytes_total", device=name) >= disk[7] * 512
        assert value(m2, "mta_disk_io_time_seconds_total", device=name) >= disk[10] / 1000

    # Health: every child the supervisor runs, up, with its pid.
    st, _, body = d.admin_get("/api/admin/health")
    assert st == 200
    health = json.loads(body)
    kids = d.children()
    got = {f"{c['role']}[{c['index']}]": c for c in health["children"]}
    assert set(got) == set(kids) - {"admin[0]"}
    for title, c in got.items():
        assert c["up"] is True and c["pid"] == kids[title], c
        assert 0 <= c["last_report_age"] < 10, c
    assert health["ok"] is True and health["draining"] is False
    assert all(c["healthy"] for c in health["children"] if c["role"] == "spool")
    assert health["admin"]["pid"] == kids["admin[0]"]
    # a drained node is taken out by a load balancer's HTTP check: 503 until undrained
    assert admin_call(d, "POST", "/api/admin/drain")[0] == 200
    st, _, body = d.admin_get("/api/admin/health")
    assert st == 503 and json.loads(body)["draining"] is True
    assert admin_call(d, "DELETE", "/api/admin/drain")[0] == 200
    assert d.admin_get("/api/admin/health")[0] == 200


def test_health_follows_a_reload_that_retires_an_acceptor(make_daemon):
    # The admin process is not replaced by a reload: it learns the new process table
    # from the supervisor's record of it (it kept waiting for acceptor[1] for good)
    d = make_daemon(acceptors=2, shards=1)
    wait_until(lambda: d.admin_get("/api/admin/health")[0] == 200, 20, "health ok")
    d.reload(smtp={"acceptors": 1})

    def ok():     # (the retired acceptor is listed while it still reports, then not)
        st, _, body = d.admin_get("/api/admin/health")
        h = json.loads(body)
        return h if st == 200 and [c["index"] for c in h["children"]
                                   if c["role"] == "acceptor"] == [0] else None
    h = wait_until(ok, 30, "health ok with one acceptor", interval=0.3)
    assert h["ok"] is True
    # /metrics agrees: the retired acceptor is not a child that is down (an alert on
    # mta_child_up == 0 fired for good after such a reload), and its counts stay
    m = scrape(d)
    ups = {dict(lb)["index"]: v for (n, lb), v in m.items()
           if n == "mta_child_up" and dict(lb)["role"] == "acceptor"}
    assert ups == {"0": 1}, ups
    assert not [lb for (n, lb), v in m.items() if n == "mta_child_report_age_seconds"
                and dict(lb) == {"role": "acceptor", "index": "1"}]
    assert value(m, "mta_smtp_connections_total") >= 1


def test_admin_killed_is_restarted_and_counters_continue(make_daemon):
    d = make_daemon(acceptors=1, shards=1)
    for i in range(4):
        d.send("a@example.com", [f"b{i}@example.net"], message(f"m{i}"))
    m = wait_until(lambda: (lambda x: x if value(x, "mta_smtp_messages_accepted_total") == 4
                            and value(x, "mta_spool_queue_messages", shard="0") == 4
                            else None)(scrape(d)), 20, "4 messages in /metrics", interval=0.3)
    written = value(m, "mta_spool_written_bytes_total", shard="0")
    assert written > 0
    old = d.children()["admin[0]"]
    os.kill(old, signal.SIGKILL)
    new = d.wait_restarted("admin[0]", old)
    assert new != old
    # The children kept running: their cumulative counters come back as they were.
    m = wait_until(lambda: (lambda x: x if value(x, "mta_smtp_messages_accepted_total")
                            and value(x, "mta_spool_queue_messages", shard="0")
                            else None)(scrape(d)), 20, "metrics after the restart",
                   interval=0.3)
    assert value(m, "mta_smtp_messages_accepted_total") == 4
    assert value(m, "mta_spool_written_bytes_total", shard="0") >= written
    assert value(m, "mta_spool_queue_messages", shard="0") == 4
    d.send("a@example.com", ["c@example.net"], message("after"))
    wait_until(lambda: value(scrape(d), "mta_smtp_messages_accepted_total") == 5, 20,
               "the fifth message counted", interval=0.3)


def test_restarted_child_does_not_take_its_counts_away(make_daemon):
    """A child killed and restarted: the sums keep what the old process had counted."""
    d = make_daemon(acceptors=1, shards=1)
    for i in range(3):
        d.send("a@example.com", [f"b{i}@example.net"], message(f"m{i}"))
    wait_until(lambda: value(scrape(d), "mta_smtp_messages_accepted_total") == 3, 20,
               "3 messages in /metrics", interval=0.3)
    old = d.children()["acceptor[0]"]
    os.kill(old, signal.SIGKILL)
    d.wait_restarted("acceptor[0]", old)
    d.wait_ready()
    d.send("a@example.com", ["c@example.net"], message("after"))
    wait_until(lambda: value(scrape(d), "mta_smtp_messages_accepted_total") == 4, 20,
               "3 + 1 messages in /metrics", interval=0.3)


def test_a_reload_does_not_multiply_the_counters_of_an_acceptor_finishing_its_sessions(
        make_daemon):
    """At a reload the new acceptor of a slot starts before the old one leaves, and the
    old one finishes its sessions meanwhile: both report for the same slot.  Each was
    taken for the slot's restart, its counts added once more at every report: with no
    traffic, mta_smtp_messages_accepted_total grew by its whole value every second."""
    d = make_daemon(acceptors=1, shards=1)
    for i in range(3):
        d.send("a@example.com", [f"b{i}@example.net"], message(f"m{i}"))
    wait_until(lambda: value(scrape(d), "mta_smtp_messages_accepted_total") == 3, 20,
               "3 messages in /metrics", interval=0.3)
    old = d.children()["acceptor[0]"]
    with d.session() as c:          # a transaction open on the old acceptor
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        d.reload()
        new = wait_until(lambda: (lambda p: p if p != old else None)(
            d.children().get("acceptor[0]")), 20, "the new acceptor[0]")
        assert new != old
        seen = set()
        for _ in range(12):         # both report (once a second) for a few seconds
            seen.add(value(scrape(d), "mta_smtp_messages_accepted_total"))
            time.sleep(0.3)
        assert seen == {3}, seen
        assert c.cmd("RCPT TO:<late@example.net>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(message("late") + b".\r\n")
        assert c.reply()[0] == 250
    # the old acceptor's last message counts once, and the sum stays put after it left
    wait_until(lambda: value(scrape(d), "mta_smtp_messages_accepted_total") == 4, 20,
               "the old acceptor's last message counted", interval=0.3)
    time.sleep(2.5)
    assert value(scrape(d), "mta_smtp_messages_accepted_total") == 4


def test_tokens_are_required_when_configured(make_daemon):
    d = make_daemon(admin={"tokens": ["s3cret-token"]})
    for path in ("/metrics", "/api/admin/health"):
        st, headers, body = d.admin_get(path)
        assert st == 401, (path, st)
        assert headers["www-authenticate"].startswith("Bearer"), headers
        assert "token" in json.loads(body)["errors"][0]["message"]
        assert d.admin_get(path, token="wrong")[0] == 401
    m = scrape(d, token="s3cret-token")
    assert value(m, "mta_spool_free_bytes") > 0
    st, _, body = d.admin_get("/nothing-here", token="s3cret-token")
    assert st == 404 and "errors" in json.loads(body)


def test_non_loopback_listen_without_tokens_is_a_config_error(make_daemon):
    d = make_daemon(start=False, admin={"listen": ["0.0.0.0:8026"]})
    r = d.cli("check-config", check=False)
    assert r.returncode == 78, r
    assert "admin.tokens" in r.stderr.decode()
    r = d.cli("serve", check=False)
    assert r.returncode == 78 and "admin.tokens" in r.stderr.decode()


def test_admin_disabled_runs_no_admin_process(make_daemon):
    d = make_daemon(admin={"enabled": False})
    assert "admin[0]" not in d.children()
    assert {"spool[0]", "acceptor[0]", "delivery[0]"} <= set(d.children())
    d.send("a@example.com", ["b@example.net"], message("no admin"))
    assert len(d.queue_list()) == 1


def test_every_child_reports_soon_after_start_with_a_long_push_interval(make_daemon):
    """A child's first statistics snapshot may be sent before its connection to the
    admin process is up (it is then dropped: nothing queues for an absent admin).  It
    must be sent again soon, not a whole push interval later: until then the child
    reads as down, `mta status` says DEGRADED and the health check answers 503 to the
    load balancer, for a node that is up."""
    d = make_daemon(admin={"push_interval": 20.0})
    t0 = time.monotonic()

    def ok():
        st, _, body = d.admin_get("/api/admin/health")
        return json.loads(body) if st == 200 else None
    h = wait_until(ok, 10, "health ok", interval=0.1)
    assert h["ok"] is True and all(c["up"] for c in h["children"]), h
    assert time.monotonic() - t0 < 10


def test_a_restarted_shard_gauges_are_not_counted_twice(make_daemon):
    """A shard killed and restarted: its queue is the new process's, not the new one's
    plus what the dead one last reported (counted for seconds after it died: the queue
    read doubled and mta_spool_healthy read 2)."""
    d = make_daemon(acceptors=1, shards=1)
    for i in range(4):
        d.send("a@example.com", [f"b{i}@example.net"], message(f"m{i}"))
    wait_until(lambda: value(scrape(d), "mta_spool_queue_messages", shard="0") == 4, 20,
               "4 messages queued in /metrics", interval=0.3)
    old = d.children()["spool[0]"]
    os.kill(old, signal.SIGKILL)
    d.wait_restarted("spool[0]", old)
    seen_queue, seen_healthy = set(), set()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        m = scrape(d)
        seen_queue.add(value(m, "mta_spool_queue_messages", shard="0"))
        seen_healthy.add(value(m, "mta_spool_healthy", shard="0"))
        time.sleep(0.2)
    assert max(v for v in seen_queue if v is not None) == 4, seen_queue
    assert max(v for v in seen_healthy if v is not None) == 1, seen_healthy
    assert value(scrape(d), "mta_spool_queue_messages", shard="0") == 4


def test_label_values_from_the_configuration_are_escaped_in_the_exposition(make_daemon):
    """A webhook's name is free text (a [[webhook]] table, or the webhooks API): quotes,
    a backslash, a newline and non-ASCII in it must come out escaped as the text format
    says, so that Prometheus's parser reads every family and the name back as it is."""
    from daemon import free_port
    name = 'ops "main" \\ hook\nété ☃'
    d = make_daemon(acceptors=1, shards=1, webhooks={"poll_interval": 0.1},
                    webhook=[{"name": name, "target": f"http://127.0.0.1:{free_port()}/",
                              "events": ["injection"]}])
    d.send("a@example.com", ["b@example.net"], message("m"))

    def failed():
        m = scrape(d)
        return m if (value(m, "mta_webhook_failed_attempts_total", webhook=name) or 0) >= 1 \
            else None
    m = wait_until(failed, 30, "the webhook's failed POST in /metrics", interval=0.3)
    assert value(m, "mta_webhook_events_sent_total", webhook=name) == 0
    assert value(m, "mta_smtp_messages_accepted_total") == 1
    # HELP and TYPE once per family, before its samples
    _, _, body = d.admin_get("/metrics")
    text = body.decode()
    for kind in ("HELP", "TYPE"):
        names = [ln.split()[2] for ln in text.splitlines() if ln.startswith(f"# {kind} ")]
        assert len(names) == len(set(names)), kind


def test_child_deaths_are_counted_and_a_reload_is_not_one(make_daemon):
    """mta_child_restarts_total: each process that died unasked and was started again
    (a crash loop is a counter that keeps rising); a reload replacing processes, or the
    supervisor stopping them, is not counted.  The health JSON says it per child."""
    d = make_daemon(acceptors=1, shards=1)
    m = wait_until(lambda: (lambda x: x if value(x, "mta_child_up", role="spool", index="0")
                            else None)(scrape(d)), 20, "spool[0] up", interval=0.3)
    assert value(m, "mta_child_restarts_total", role="acceptor", index="0") == 0
    assert value(m, "mta_child_restarts_total", role="spool", index="0") == 0
    for _ in range(2):
        old = d.children()["acceptor[0]"]
        os.kill(old, signal.SIGKILL)
        d.wait_restarted("acceptor[0]", old)
    old = d.children()["spool[0]"]
    os.kill(old, signal.SIGKILL)
    d.wait_restarted("spool[0]", old)
    m = wait_until(lambda: (lambda x: x if value(x, "mta_child_restarts_total", role="spool",
                                                 index="0") == 1 else None)(scrape(d)),
                   20, "the spool's death counted", interval=0.3)
    assert value(m, "mta_child_restarts_total", role="acceptor", index="0") == 2
    assert value(m, "mta_child_restarts_total", role="events", index="0") == 0
    h = json.loads(d.admin_get("/api/admin/health")[2])
    assert {(c["role"], c["index"]): c["restarts"] for c in h["children"]}[
        ("acceptor", 0)] == 2
    text = d.cli("status").stdout.decode()          # (the operator's command says it too)
    assert re.search(r"^PROCESS +PID +STATE +RESTARTS ", text, re.M), text
    assert re.search(r"^acceptor\[0\] +\d+ +up +2 ", text, re.M), text
    # a reload replaces the acceptors (and their old processes exit): not a death
    old = d.children()["acceptor[0]"]
    d.reload(smtp={"max_connections_per_ip": 77})
    wait_until(lambda: d.children().get("acceptor[0]") not in (None, old), 30,
               "a new acceptor[0]")
    d.wait_ready()
    d.send("a@example.com", ["b@example.net"], message("after the reload"))
    m = scrape(d)
    assert value(m, "mta_child_restarts_total", role="acceptor", index="0") == 2
    assert value(m, "mta_child_restarts_total", role="spool", index="0") == 1
