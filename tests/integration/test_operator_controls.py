"""The operator's hands on the real daemon: suspend and resume by domain (durable across a
restart) and by source (delivery hands the mail back; resuming makes it due at once),
and a bulk bounce by campaign with its events, DSNs and progress bar (mta suspend,
resume, bounce; /api/admin/suspensions and /api/admin/bounce)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from daemon import wait_until
from mxlab import IPS, mx
from test_admin_api import admin_call, message
from test_drain import on_a_terminal


def cli_json(d, *args) -> dict:
    r = d.cli(*args, "--json")
    return json.loads(r.stdout.decode().splitlines()[-1])


def campaign_message(subject: str, campaign: str) -> bytes:
    return f'X-MSYS-API: {{"campaign_id": "{campaign}"}}\r\n'.encode() + message(subject)


def test_suspend_a_domain_across_a_restart_then_resume_and_a_source(lab):
    ip = IPS[0]
    sink = lab.aio(ip)
    lab.serve(mx("held.test", "mx.held.test", ip) + mx("free.test", "mx.free.test", ip))
    d = lab.daemon(shards=2)

    # Bad input: a JSON error naming the field.
    for query, field in (("bogus=1", "bogus"), ("", "domain"), ("domain=a.test&duration=x",
                                                                "duration"),
                         ("site=s&campaign=c", "campaign"), ("domain=+", "domain"),
                         ("campaign=%20&reason=x", "campaign")):
        st, _, body = admin_call(d, "POST", f"/api/admin/suspensions?{query}")
        assert st == 400 and body["errors"][0]["field"] == field, (query, body)

    s = cli_json(d, "suspend", "--domain", "Held.Test", "--reason", "complaints")
    assert (s["kind"], s["domain"], s["reason"], s["until"]) == \
        ("spool", "held.test", "complaints", None)
    held = [d.send("a@sender.test", [f"r{i}@held.test"], message(f"h{i}")) for i in range(3)]
    free = d.send("a@sender.test", ["f@free.test"], message("free"))
    wait_until(lambda: any(q == free for q, _, _ in sink.deliveries()), 20, "free.test mail")

    def suspended(n):
        t = cli_json(d, "queue", "summary")["total"]
        return t if t["suspended_messages"] == n else None
    wait_until(lambda: suspended(3), 10, "the held.test messages held back", interval=0.3)
    assert [q for q, _, _ in sink.deliveries()] == [free]
    # the text of both queue views says so too (it was in --json only)
    for cmd in (("queue",), ("queue", "summary")):
        out = d.cli(*cmd).stdout.decode()
        assert "suspended: 3 message(s) held back by the operator's suspensions" in out, out
    # A held message deleted is no longer counted as held back (nor sent on resume).
    gone = d.send("a@sender.test", ["gone@held.test"], message("gone"))
    wait_until(lambda: suspended(4), 10, "a fourth message held back", interval=0.3)
    assert cli_json(d, "queue", "delete", gone)["deleted"] == [gone]
    wait_until(lambda: suspended(3), 10, "the deleted one no longer held", interval=0.3)

    # Durable: after a restart still suspended, still held, still listed.
    d.stop()
    d.start()
    wait_until(lambda: suspended(3), 15, "held back again after the restart", interval=0.3)
    time.sleep(1.0)
    assert [q for q, _, _ in sink.deliveries()] == [free]
    listed = cli_json(d, "suspend", "--list")["results"]
    assert [x["id"] for x in listed] == [s["id"]]
    shown = admin_call(d, "GET", "/api/admin/status")[2]["suspensions"]   # the status page's
    assert [(x["source"], x["reason"]) for x in shown] == \
        [("operator: domain=held.test", "complaints")], shown

    r = cli_json(d, "resume", s["id"])
    assert r["resumed"]["id"] == s["id"]
    wait_until(lambda: len(sink.deliveries()) == 4, 20, "the held.test mail after resume")
    assert sorted(q for q, _, _ in sink.deliveries()) == sorted(held + [free])
    st, _, body = admin_call(d, "DELETE", f"/api/admin/suspensions/{s['id']}")
    assert st == 404, body

    # A source suspension is delivery's: the mail is handed back (REQUEUED, no attempt
    # counted) and is due at once when the operator resumes, not after its requeue delay.
    src = cli_json(d, "suspend", "--source", "default", "--reason", "ip listed")
    assert (src["kind"], src["source"]) == ("delivery", "default")
    # mta queue shows it in the source's state (it said "ok")
    shown = json.loads(d.cli("queue", "--json").stdout)["delivery"]["sources"]
    assert shown["default"]["suspended_until"] and "ip listed" in shown["default"]["reason"]
    assert re.search(r"^default\s.*suspended until resumed: admin: ip listed",
                     d.cli("queue").stdout.decode(), re.M)
    rules = admin_call(d, "GET", "/api/admin/rules")[2]["results"]
    assert [(x["rule"], x["scope"]) for x in rules] == [("admin", "source")]
    # (the table says so too, not "36599 days, 23:59:58" left)
    assert re.search(r"^admin\s.*\suntil resumed\s", d.cli("rules", "list").stdout.decode(),
                     re.M), d.cli("rules", "list").stdout.decode()
    late = d.send("a@sender.test", ["late@free.test"], message("late"))
    d.wait_log(r"not attempted by delivery|REQUEUED|requeued", timeout=20)
    time.sleep(1.5)
    assert late not in [q for q, _, _ in sink.deliveries()]
    # mta inspect says what holds it (it said "next attempt: in 0:00:0x", the hand-back's
    # wait, as for a suspension of a domain it names the operator's)
    out = d.cli("inspect", late).stdout.decode()
    assert re.search(r"^next attempt: suspended until resumed \(source default suspended by "
                     r"the operator: ip listed\)$", out, re.M), out
    [shown] = cli_json(d, "inspect", late)["recipients"]
    assert (shown["suspended"]["source"], shown["suspended"]["until"]) == \
        ("default", None), shown
    r = cli_json(d, "resume", src["id"])
    assert r["flushed"] >= 1, r
    wait_until(lambda: late in [q for q, _, _ in sink.deliveries()], 15,
               "the requeued message right after resume")
    # (the receiver has the message before the spool records the outcome and its event)
    events = wait_until(lambda: (lambda ev: ev if len(ev) >= 6 else None)(
        [e for e in d.events() if e["type"] != "injection"]), 20, "six outcome events")
    # five deliveries (no bounce, no delay), and the deleted message's end: a class-25
    # (Admin Failure) bounce, so that the event stream sees every message end
    assert sorted(e["type"] for e in events) == ["bounce"] + ["delivery"] * 5, events
    [gone_ev] = [e for e in events if e["type"] == "bounce"]
    assert (gone_ev["rcpt_to"], gone_ev["bounce_class"]) == ("gone@held.test", "25"), gone_ev
    assert "deleted by the operator" in gone_ev["raw_reason"], gone_ev

    # A site no delivery process routes mail to (a typo?) is suspended all the same, but
    # the answer says so; a site delivery knows gets no such note.
    r = d.cli("suspend", "--site", "mx.free.tset")
    assert r.stdout.decode().startswith("suspended: ")
    assert "note: no delivery process routes mail to a site named 'mx.free.tset'" \
        in r.stderr.decode(), r.stderr
    wait_until(lambda: "mx.free.test" in json.loads(
        d.cli("queue", "--json").stdout)["delivery"]["sites"], 10, "the site in the status")
    known = cli_json(d, "suspend", "--site", "mx.free.test")
    assert known["site"] == "mx.free.test" and "note" not in known, known
    # mail to the site waits, and mta inspect names the site's suspension
    site_held = d.send("a@sender.test", ["s@free.test"], message("site held"))
    [shown] = wait_until(lambda: (lambda rs: rs if rs[0]["suspended"] else None)(
        cli_json(d, "inspect", site_held)["recipients"]), 10, "the site's hold shown")
    assert (shown["suspended"]["site"], shown["suspended"]["until"],
            shown["suspended"]["reason"]) == \
        ("mx.free.test", None, "site mx.free.test suspended by the operator"), shown
    assert site_held not in [q for q, _, _ in sink.deliveries()]


def test_bulk_bounce_by_campaign_with_events_dsns_and_a_progress_bar(tmp_path):
    from daemon import Daemon
    d = Daemon(tmp_path, shards=2)       # delivery held: everything stays queued
    d.start()
    try:
        spring = [d.send("a@sender.test", [f"s{i}@x.test", f"t{i}@y.test"],
                         campaign_message(f"s{i}", "spring")) for i in range(20)]
        autumn = [d.send("b@sender.test", [f"a{i}@x.test"], campaign_message(f"a{i}", "autumn"))
                  for i in range(5)]
        st, _, body = admin_call(d, "POST", "/api/admin/bounce?source=default")
        assert st == 400 and body["errors"][0]["field"] == "source", body
        # (delivery held: no site is known yet; the answer says how to name the mail)
        st, _, body = admin_call(d, "POST", "/api/admin/bounce?site=mx.x.test")
        assert st == 400 and body["errors"][0]["field"] == "site", body
        assert "--domain names the recipient domains" in body["errors"][0]["message"], body
        st, _, body = admin_call(d, "POST", "/api/admin/bounce?reason=x")
        assert st == 400 and body["errors"][0]["field"] == "domain", body
        # a blank field never widens the bounce to the whole queue
        st, _, body = admin_call(d, "POST", "/api/admin/bounce?campaign=%20")
        assert st == 400 and body["errors"][0]["field"] == "campaign", body

        out = d.cli("bounce", "--campaign", "spring", "--reason", "campaign cancelled",
                    "--dsn", "--json").stdout.decode()
        last = json.loads(out)             # one JSON object, no progress lines before it
        assert last["finished"] and (last["done"], last["total"]) == (40, 40), out

        def bounces():
            return {(e["queue_id"], e["rcpt_to"]): e for e in d.events()
                    if e["type"] == "bounce"}
        got = wait_until(lambda: (lambda b: b if len(b) == 40 else None)(bounces()), 20,
                         "40 bounce events")
        assert {q for q, _ in got} == set(spring)
        for e in got.values():
            assert (e["bounce_class"], e["bounce_rule"], e["error_code"]) == \
                ("25", "admin-bounce", "550"), e
            assert "campaign cancelled" in e["raw_reason"] and e["campaign_id"] == "spring"
        # Queued now: autumn's five and one DSN per spring message (two recipients each).
        q = {m["queue_id"]: m for m in d.queue_list()}
        dsns = [m for m in q.values() if m["sender"] == ""]
        assert sorted(m["recipients"] for m in dsns) == [["a@sender.test"]] * 20
        assert set(q) - {m["queue_id"] for m in dsns} == set(autumn)
        assert all(d.cli("queue", "show", m["queue_id"]).stdout.count(
            b"campaign cancelled") >= 1 for m in dsns[:3])

        # In a terminal: the progress bar; no DSN this time.
        text = on_a_terminal(d, "bounce", "--campaign", "autumn")
        assert "bouncing" in text and "5/5" in text and "done: 5 of 5" in text, text
        wait_until(lambda: len(bounces()) == 45, 20, "45 bounce events")
        assert {m["queue_id"] for m in d.queue_list()} == {m["queue_id"] for m in dsns}
        ops = admin_call(d, "GET", "/api/admin/bounce")[2]["results"]
        assert [(o["done"], o["finished"]) for o in ops] == [(40, True), (5, True)]

        # Every command answers --json: flush, delete, check-config.
        assert cli_json(d, "queue", "flush") == {"flushed": 0}     # (nothing was deferred)
        gone = cli_json(d, "queue", "delete", *[m["queue_id"] for m in dsns[:2]])
        assert sorted(gone["deleted"]) == sorted(m["queue_id"] for m in dsns[:2])
        c = cli_json(d, "check-config")
        assert (c["ok"], c["running"], c["shards"], c["needs_restart"]) == (True, True, 2, [])
    finally:
        d.stop()


def test_mail_blocked_behind_a_bounced_backlog_goes_when_a_slot_frees(make_daemon):
    # A slow site at its per-domain cap (2 jobs out), a campaign's backlog blocked behind
    # it, then bounced; a message of another campaign, blocked behind the backlog, goes
    # as soon as the jobs out come back -- not after the bounced ones have been released
    # a slot's worth at a time (100 of them, ~2 a second: ~50 s).
    from sinks import AioSink, common_port

    port = common_port(["127.0.0.1"])
    sink = AioSink("127.0.0.1", port).start()
    sink.delay = 4.0                    # each end of data waits: the two jobs stay out
    try:
        d = make_daemon(acceptors=1, shards=1, delivery={
            "hold": False, "processes": 1, "max_in_flight_per_domain": 2,
            "route": [{"domain": "*", "hosts": [f"127.0.0.1:{port}"], "starttls": "none"}]})
        out = [d.send("a@sender.test", [f"o{i}@slow.test"], message(f"o{i}")) for i in range(2)]
        backlog = [d.send("a@sender.test", [f"b{i}@slow.test"], campaign_message(f"b{i}", "gone"))
                   for i in range(100)]
        new = d.send("a@sender.test", ["n@slow.test"], message("new"))
        total = wait_until(lambda: (lambda t: t if t["blocked"] == 101 else None)(
            cli_json(d, "queue", "summary")["total"]), 20, "101 messages blocked", interval=0.3)
        assert (total["messages"], total["in_flight"]) == (103, 2), total
        last = json.loads(d.cli("bounce", "--campaign", "gone", "--json")
                          .stdout.decode().splitlines()[-1])
        assert last["finished"] and last["done"] == 100, last
        assert {m["queue_id"] for m in d.queue_list()}.isdisjoint(backlog)
        bounced = time.monotonic()
        wait_until(lambda: new in [q for q, _, _ in sink.deliveries()], 30,
                   "the blocked message after the jobs out came back")
        # the two jobs out take up to 8 s more (one connection), then its own 4 s
        assert time.monotonic() - bounced < 20
        assert sorted(q for q, _, _ in sink.deliveries()) == sorted(out + [new])
    finally:
        sink.stop()


def test_cancelling_a_rules_suspension_makes_the_mail_it_held_due_at_once(lab):
    """A response rule's suspension hands mail back to the spool until it ends; cancelling
    it (mta rules cancel, DELETE /api/admin/rules/...) makes that mail due at once, as
    resuming an operator's suspension does, not after the rest of the rule's duration.
    Without the daemon the cancel says the mail waits for its retry time."""
    import os

    from mta.shaping import state

    ip = IPS[0]
    sink = lab.aio(ip)
    lab.serve(mx("free.test", "mx.free.test", ip))
    d = lab.daemon()
    store = state.Store(os.path.join(d.state_dir, state.STORE_DIR))

    def suspend_site(rule):
        now = time.time()
        store.put(state.Entry(id=state.entry_id("suspend", "site", "", "mx.free.test"),
                              kind="suspend", scope="site", site="mx.free.test", rule=rule,
                              reply="421 4.7.0 [TSS04] try later", created=now,
                              until=now + 600))

    def delivered():
        return [q for q, _, _ in sink.deliveries()]

    for n, (rule, cancel) in enumerate((
            ("tss04", lambda: d.cli("rules", "cancel", "tss04").stdout.decode()),
            ("tss05", lambda: admin_call(d, "DELETE", "/api/admin/rules/tss05")[2]))):
        suspend_site(rule)
        time.sleep(1.5)                       # the delivery process reads the store
        held = d.send("a@sender.test", [f"h{n}@free.test"], message(f"held{n}"))
        d.wait_log(r"not attempted by delivery|REQUEUED|requeued", count=n + 1, timeout=20)
        time.sleep(1.0)
        assert held not in delivered()
        out = cancel()
        if isinstance(out, str):
            assert f"cancelled suspend {rule}" in out and "due now" in out, out
        else:
            assert [x["rule"] for x in out["cancelled"]] == [rule] and out["flushed"] >= 1, out
        wait_until(lambda q=held: q in delivered(), 15, "the held message right after the cancel")

    d.stop()
    suspend_site("tss06")
    out = d.cli("rules", "cancel", "tss06").stdout.decode()
    assert "cancelled suspend tss06" in out and "waits for its retry time" in out, out


def test_a_message_deleted_while_its_delivery_is_out_ends_with_that_delivery(lab):
    # `mta queue delete` while the message is in a delivery job: the job goes on (the
    # receiver has it), and what it did is the recipient's last event -- here a
    # delivery, once -- not silence after the injection, nor a "deleted" bounce for
    # mail the receiver took.  The other recipient, not in a job, ends with the delete.
    ip = IPS[0]
    sink = lab.aio(ip)
    sink.delay = 4.0                    # the end of data waits: the job stays out
    lab.serve(mx("slow.test", "mx.slow.test", ip))
    d = lab.daemon(shards=1)
    cli_json(d, "suspend", "--domain", "later.test")       # b's recipient waits
    qid = d.send("a@sender.test", ["r@slow.test", "w@later.test"], message("slow"))
    wait_until(lambda: any(a == "r@slow.test" for _, a, _ in sink.rcpt_log), 20,
               "the recipient's RCPT at the receiver")
    assert cli_json(d, "queue", "delete", qid)["deleted"] == [qid]
    sink.wait_for("r@slow.test", timeout=20)
    ends = wait_until(lambda: (lambda ev: ev if len(ev) >= 2 else None)(
        [e for e in d.events() if e["type"] != "injection"]), 20, "both recipients' ends")
    time.sleep(1.0)                     # (nothing more comes)
    ends = [e for e in d.events() if e["type"] != "injection"]
    got = sorted((e["rcpt_to"], e["type"], e.get("bounce_class")) for e in ends)
    assert got == [("r@slow.test", "delivery", None), ("w@later.test", "bounce", "25")], ends
    d.wait_log(r"deleted by operator: " + qid, timeout=5)


def test_mail_handed_back_by_a_suspended_source_is_due_again_spread_not_in_lockstep(lab):
    """Every source of the pool suspended: delivery hands each job back (REQUEUED, no
    source) and the spool holds the domain's other mail until the wait ends.  Their
    due times are spread by delivery.retry_jitter, as a deferral's are -- not all in
    the one second the wait ends (a site's whole backlog at once, at every repeat) --
    and none before the wait delivery asked for (here the spool's ceiling, an hour)."""
    ip = IPS[0]
    sink = lab.aio(ip)
    lab.serve(mx("free.test", "mx.free.test", ip))
    d = lab.daemon(shards=1, retry_jitter=0.1)
    cli_json(d, "suspend", "--source", "default", "--reason", "ip listed")
    t0 = time.time()
    qids = [d.send("a@sender.test", [f"r{i}@free.test"], message(f"m{i}")) for i in range(30)]

    def dues():
        got = {}
        for qid in qids:        # (GET /api/admin/messages/QID: each recipient's next try)
            st, _, body = admin_call(d, "GET", f"/api/admin/messages/{qid}")
            assert st == 200, body
            got[qid] = body["recipients"][0]["next_attempt"]
        return got if all(t and t > t0 + 60 for t in got.values()) else None
    got = wait_until(dues, 30, "every message handed back or held", interval=0.5)
    assert sorted(got) == sorted(qids)
    t1 = time.time()
    assert all(t0 + 3600.0 <= t <= t1 + 3600.0 * 1.1 for t in got.values()), got
    assert len({round(t) for t in got.values()}) >= 15, sorted(got.values())
    assert sink.deliveries() == []


def test_suspend_resume_and_bounce_also_answer_under_mta_queue(make_daemon):
    """The operator's verbs are also ``mta queue suspend|resume|bounce`` (DESIGN.md's
    "queue summary/inspect/flush/suspend/resume/bounce"), as ``queue inspect`` is
    ``inspect``; with the group's own -c (``mta queue -c FILE suspend``) too."""
    d = make_daemon(acceptors=1, shards=1)
    qid = d.send("s@src.test", ["r@held.test"], message("held"))
    r = subprocess.run([sys.executable, "-m", "mta", "queue", "-c", d.config_path, "suspend",
                        "--domain", "held.test", "--json"], capture_output=True, timeout=60,
                       env={k: v for k, v in d.env.items() if k != "MTA_CONFIG"}, cwd=d.dir)
    assert r.returncode == 0, r.stderr.decode()
    s = json.loads(r.stdout)
    assert s["domain"] == "held.test", s
    listed = cli_json(d, "queue", "suspend", "--list")["results"]
    assert [x["id"] for x in listed] == [s["id"]], listed
    assert cli_json(d, "queue", "resume", s["id"])["resumed"]["id"] == s["id"]
    assert cli_json(d, "suspend", "--list")["results"] == []
    done = cli_json(d, "queue", "bounce", "--domain", "held.test", "--reason", "gone")
    assert (done["total"], done["done"], done["finished"]) == (1, 1, True), done
    wait_until(lambda: [(e["type"], e.get("bounce_class")) for e in d.events()
                        if e["queue_id"] == qid] == [("injection", None), ("bounce", "25")],
               10, "the bounce event")
    # ... and counted, as an expiry is (an operator alerts on recipients ended untried)
    wait_until(lambda: ended(d, "bounced_by_operator") == 1, 10, "the counter")
    assert ended(d, "expired") == 0


def ended(d, reason: str) -> float:
    """mta_spool_recipients_ended_total{reason}: recipients the spool itself ended."""
    from prometheus_client.parser import text_string_to_metric_families
    status, _, body = d.admin_get("/metrics")
    assert status == 200
    return sum(s.value for fam in text_string_to_metric_families(body.decode())
               for s in fam.samples if s.name == "mta_spool_recipients_ended_total"
               and s.labels.get("reason") == reason)
