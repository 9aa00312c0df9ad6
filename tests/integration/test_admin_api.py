"""The admin API's reads (/api/admin/queue, /messages/QID, /status) and the commands on them.

The real daemon, mail in over SMTP and HTTP (campaigns and pools from the
SparkPost options), read back over HTTP from the admin listener and through
``mta queue summary``, ``mta inspect`` and ``mta status``; the numbers must be
what was sent.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys

from daemon import HOST, wait_until
from mxlab import IPS, mx

from mta.queueid import new_qid


def admin_call(d, method: str, path: str, token: str | None = None, headers=None):
    """(status, headers with lower-case names, decoded JSON body) from the admin listener."""
    conn = http.client.HTTPConnection(HOST, d.admin_port, timeout=30)
    try:
        conn.request(method, path, headers={
            **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})
        r = conn.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(body)
    finally:
        conn.close()


def message(subject: str) -> bytes:
    return (f"From: a@sender.test\r\nTo: x\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@client.test>\r\n\r\nhello\r\n").encode()


def transmit(d, rcpts, campaign=None, pool=None):
    body = {"recipients": rcpts, "content": {"from": "a@sender.test", "subject": "s",
                                             "text": "x"}}
    if campaign:
        body["campaign_id"] = campaign
    if pool:
        body["options"] = {"ip_pool": pool}
    st, _, res = d.post(body)
    assert st == 200 and res["results"]["total_accepted_recipients"] == len(rcpts), res


def test_queue_by_domain_pool_campaign_and_one_message(make_daemon):
    d = make_daemon(acceptors=1, shards=2,
                    egress={"pool": [{"name": "bulk", "sources": [{"source": "default"}]}]})
    qids = [d.send("a@sender.test", ["x1@one.test", "x2@two.test"], message(f"m{i}"))
            for i in range(3)]
    transmit(d, ["y1@one.test", "y2@one.test"], campaign="spring")
    transmit(d, ["z1@two.test"], campaign="spring", pool="bulk")
    transmit(d, ["w1@three.test"], campaign="autumn")
    # Over SMTP the campaign comes in X-MSYS-API.
    d.send("a@sender.test", ["v1@three.test"],
           b'X-MSYS-API: {"campaign_id": "autumn"}\r\n' + message("msys"))

    st, _, q = admin_call(d, "GET", "/api/admin/queue")
    assert st == 200, q
    # 3 SMTP messages (2 recipients each) + 4 HTTP messages (one per recipient) + 1.
    assert q["total"]["messages"] == 8 and q["total"]["recipients"] == 11
    assert sum(s["messages"] for s in q["shards"]) == 8 and len(q["shards"]) == 2
    assert {k: v["recipients"] for k, v in q["by_domain"].items()} == {
        "one.test": 5, "two.test": 4, "three.test": 2}
    assert q["by_campaign"] == {"spring": {"messages": 3, "recipients": 3},
                                "autumn": {"messages": 2, "recipients": 2},
                                "(none)": {"messages": 3, "recipients": 6}}
    assert q["by_pool"]["bulk"] == {"messages": 1, "recipients": 1}
    assert q["by_pool"]["default"] == {"messages": 7, "recipients": 10}
    assert set(q) >= {"by_site", "by_source", "lanes"}

    # The command line shows the same.
    out = json.loads(d.cli("queue", "summary", "--json").stdout)
    assert out["total"] == {**q["total"], "next_attempt": out["total"]["next_attempt"]}
    assert out["by_campaign"] == q["by_campaign"]
    text = d.cli("queue", "summary", "--by", "campaign").stdout.decode()
    assert "spring" in text and "autumn" in text and "CAMPAIGN" in text

    # One message: envelope, recipients' states and attempts.
    st, _, m = admin_call(d, "GET", f"/api/admin/messages/{qids[1]}")
    assert st == 200, m
    assert m["queue_id"] == qids[1] and m["sender"] == "a@sender.test"
    assert [r["address"] for r in m["recipients"]] == ["x1@one.test", "x2@two.test"]
    assert all(r["state"] == "pending" and r["attempts"] == 0 for r in m["recipients"])
    assert m["message_size"] > 0 and m["arrival_time"] > 0
    out = json.loads(d.cli("inspect", qids[1], "--json").stdout)
    assert [(r["address"], r["state"], r["attempts"]) for r in out["recipients"]] == [
        ("x1@one.test", "pending", 0), ("x2@two.test", "pending", 0)]
    assert (out["queue_id"], out["sender"]) == (qids[1], "a@sender.test")
    text = d.cli("queue", "inspect", qids[1]).stdout.decode()
    assert "x2@two.test" in text and "pending" in text

    # Bad input: a clear JSON error, the right status, no crash.
    st, _, err = admin_call(d, "GET", "/api/admin/messages/not-a-qid")
    assert st == 400 and err["errors"][0]["field"] == "qid"
    gone = new_qid(0)                   # well formed, never queued
    st, _, err = admin_call(d, "GET", f"/api/admin/messages/{gone}")
    assert st == 404 and "not queued" in err["errors"][0]["message"], err
    r = d.cli("inspect", gone, check=False)
    assert r.returncode == 1 and b"not queued" in r.stderr
    r = d.cli("inspect", "not-a-qid", check=False)
    assert r.returncode == 1 and b"not a queue id" in r.stderr
    for odd in ("a b", "\u00e9t\u00e9", "x/../../health"):   # quoted into the path, not a traceback
        r = d.cli("inspect", odd, check=False)
        assert r.returncode == 1 and b"not a queue id" in r.stderr, (odd, r.stderr)
        assert b"Traceback" not in r.stderr
    st, hdrs, err = admin_call(d, "PUT", "/api/admin/queue")
    assert st == 405 and "errors" in err
    st, hdrs, err = admin_call(d, "POST", "/api/admin/queue")
    assert st == 405 and hdrs["allow"] == "GET", hdrs
    assert "Traceback" not in d.log()


def test_status_and_health_report_every_child(make_daemon):
    d = make_daemon(acceptors=2, shards=2)
    for i in range(4):
        d.send("a@sender.test", [f"r{i}@example.net"], message(f"s{i}"))

    def settled():
        st, _, s = admin_call(d, "GET", "/api/admin/status")
        assert st == 200, s
        return s if s["totals"]["accepted_messages"] == 4 and s["queue"]["total"][
            "messages"] == 4 and s["ok"] and len(s["processes"]) == 7 else None
    s = wait_until(settled, 20, "the status with 4 accepted messages and every child",
                   interval=0.3)
    roles = sorted((p["role"], p["index"]) for p in s["processes"])
    assert roles == [("acceptor", 0), ("acceptor", 1), ("delivery", 0), ("events", 0),
                     ("spool", 0), ("spool", 1), ("webhooks", 0)]
    assert all(p["up"] and p["pid"] and p["memory_bytes"] > 0 for p in s["processes"])
    lat = s["latency_seconds"]["smtp_transaction"]
    assert lat["count"] == 4 and 0 < lat["p50"] <= lat["p99"]
    assert s["spool_free_bytes"] > 0 and s["draining"] is False
    assert s["tcp"]["connections_established"] is not None
    out = json.loads(d.cli("status", "--json").stdout)
    assert out["totals"]["accepted_messages"] == 4
    text = d.cli("status").stdout.decode()
    assert "state: ok" in text and "spool[1]" in text and "acceptor[1]" in text


def test_status_says_why_the_node_is_degraded_and_that_delivery_is_held(make_daemon):
    """The spool's disk below spool.min_free_bytes (MAIL gets 452) and [delivery] hold:
    `mta status` said "state: DEGRADED" with every process "up" and nothing on why, and
    "ok" for a node that sends nothing (the page likewise)."""
    free = os.statvfs(os.path.dirname(os.path.abspath(__file__))).f_bavail
    d = make_daemon(acceptors=1, shards=1, spool={"min_free_bytes": 1 << 60},
                    delivery={"hold": True})
    with d.session() as c:
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 452

    def degraded():
        st, _, s = admin_call(d, "GET", "/api/admin/status")
        return s if st == 200 and not s["ok"] and all(p["up"] for p in s["processes"]) \
            else None
    s = wait_until(degraded, 20, "the status with every child up and not ok", interval=0.3)
    assert s["delivery_held"] is True
    assert any("acceptor[0]" in p and "min_free" in p for p in s["problems"]), s["problems"]
    assert any("hold" in p for p in s["problems"]), s["problems"]
    acc = next(p for p in s["processes"] if p["role"] == "acceptor")
    assert acc["healthy"] is False
    text = d.cli("status").stdout.decode()
    assert "state: DEGRADED" in text, text
    assert re.search(r"^problem: acceptor\[0\].*min_free", text, re.M), text
    assert re.search(r"^problem: .*hold", text, re.M), text
    assert re.search(r"^acceptor\[0\] .*up, space low", text, re.M), text
    assert re.search(r"^spool: .* free of ", text, re.M) and free, text
    # with room again and delivery let go, it is ok and says nothing of either
    d.reload(spool={"min_free_bytes": 0}, delivery={"hold": False})
    d.wait_ready()
    s = wait_until(lambda: (lambda x: x if x["ok"] and not x["problems"] else None)(
        admin_call(d, "GET", "/api/admin/status")[2]), 30, "the status ok", interval=0.3)
    assert s["delivery_held"] is False
    text = d.cli("status").stdout.decode()
    assert "state: ok" in text and "problem:" not in text, text


def test_api_needs_the_token_and_the_cli_sends_it(make_daemon):
    d = make_daemon(admin={"tokens": ["t0ken"]})
    for method, path in (("GET", "/api/admin/queue"), ("GET", "/api/admin/status"),
                         ("POST", "/api/admin/drain")):
        st, _, body = admin_call(d, method, path)
        assert st == 401, (method, path, st)
    assert not d.log().count("drain started")
    assert "a bearer token is required" in body["errors"][0]["message"]
    # a wrong token is told apart from a missing one
    st, headers, body = admin_call(d, "GET", "/api/admin/queue", token="wrong")
    assert st == 401 and "not one of [admin] tokens" in body["errors"][0]["message"], body
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert admin_call(d, "GET", "/api/admin/queue", token="t0ken")[0] == 200
    # The page itself holds no data and loads without a token.
    st, headers, _ = d.admin_get("/")
    assert st == 200 and headers["content-type"].startswith("text/html")
    assert json.loads(d.cli("queue", "summary", "--json").stdout)["total"]["messages"] == 0


def test_a_page_of_another_site_cannot_act_through_the_operators_browser(make_daemon):
    """Without tokens the admin listener serves loopback.  An operator's browser there
    (or at the end of an SSH tunnel to it, how the status page is looked at) runs any
    site's scripts: a form of another site POSTed to /api/admin/drain (the answer cannot
    be read, the drain is done), or a name rebound to 127.0.0.1 (DNS rebinding) reading
    and changing everything.  Both are refused; the mta commands and same-origin
    requests of the status page are not."""
    d = make_daemon()
    me = f"{HOST}:{d.admin_port}"
    for extra in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                  {"Sec-Fetch-Site": "cross-site", "Origin": f"http://{me}"},
                  {"Sec-Fetch-Site": "same-site"}):
        for method, path in (("POST", "/api/admin/drain"),
                             ("POST", "/api/admin/bounce?domain=example.net"),
                             ("DELETE", "/api/admin/drain")):
            st, _, body = admin_call(d, method, path, headers=extra)
            assert st == 403, (extra, method, path, st, body)
            assert "cross-site" in body["errors"][0]["message"]
    assert not d.log().count("drain started")
    assert admin_call(d, "GET", "/api/admin/drain")[2]["draining"] is False
    # DNS rebinding: the page's own origin, but the Host is the attacker's name
    rebound = {"Host": f"rebind.evil.example:{d.admin_port}", "Sec-Fetch-Site": "same-origin"}
    for path in ("/api/admin/queue", "/api/admin/status", "/metrics", "/"):
        st, _, body = admin_call(d, "GET", path, headers=rebound)
        assert st == 403 and "Host rebind.evil.example" in body["errors"][0]["message"], \
            (path, st)
    # a program that is not a browser may use another name of this machine
    assert admin_call(d, "GET", "/api/admin/queue", headers={"Host": "mta.internal:8026"})[0] \
        == 200
    st, _, _ = admin_call(d, "POST", "/api/admin/drain",
                          headers={"Host": f"rebind.evil.example:{d.admin_port}",
                                   "Origin": f"http://rebind.evil.example:{d.admin_port}"})
    assert st == 403 and not d.log().count("drain started")
    # the status page's own request (same origin), a tunnel's localhost, and the CLI
    for extra in ({"Origin": f"http://{me}", "Sec-Fetch-Site": "same-origin"},
                  {"Host": "localhost:9000"}, {"Host": f"[::1]:{d.admin_port}"}):
        assert admin_call(d, "GET", "/api/admin/queue", headers=extra)[0] == 200, extra
    st, _, body = admin_call(d, "POST", "/api/admin/drain",
                             headers={"Origin": f"http://{me}", "Sec-Fetch-Site": "same-origin"})
    assert st == 200 and body["draining"] is True
    assert d.cli("drain", "--cancel").returncode == 0
    assert admin_call(d, "GET", "/api/admin/drain")[2]["draining"] is False


def test_site_and_source_come_from_the_delivery_processes(lab):
    """With delivery running, the queue view names the site and the source of queued jobs."""
    ip = IPS[0]
    sink = lab.aio(ip)
    sink.delay = 2.0                     # the jobs stay a moment in the delivery process
    lab.serve(mx("site.test", "mx.site.test", ip))
    d = lab.daemon(acceptors=1, shards=1)
    transmit(d, [f"r{i}@site.test" for i in range(3)], campaign="c1")

    def seen():
        st, _, q = admin_call(d, "GET", "/api/admin/queue")
        sites = [s for s in q["by_site"].values() if "site.test" in s["domains"]]
        return q if sites and q["by_source"] else None
    q = wait_until(seen, 30, "the site and source in the queue view", interval=0.3)
    assert "default" in q["by_source"]
    wait_until(lambda: sink.received() == 3, 30, "all delivered")


def test_rules_in_effect_listed_and_cancelled_through_the_admin_api(make_daemon):
    """A suspension written into the daemon's state directory the way a delivery process
    writes it (mta.delivery.adaptive): GET /api/admin/rules shows it as `mta rules list`
    does, DELETE /api/admin/rules/NAME ends it (gone from disk and from the CLI), an
    unknown name is 404, a wrong method 405."""
    import os

    import msgspec

    from mta.config import resolve
    from mta.config.schema import Config
    from mta.delivery import adaptive as ad

    d = make_daemon()
    rule = {"name": "tss04", "code": 421, "text": r"\[TSS04\]", "action": "suspend",
            "scope": "source_site", "duration": 600}
    s = resolve(msgspec.convert({"server": {"state_dir": d.state_dir},
                                 "response_rule": [rule]}, Config), None)
    a = ad.Adaptive(s.config, s.state_dir, presets=False)
    fired = a.fire(a.rules.match("mail", 421, "4.7.0", "[TSS04] try later", ["mx"]),
                   "ip-2", "mx.site.test", "421 4.7.0 [TSS04] try later", "mail")
    st, _, body = admin_call(d, "GET", "/api/admin/rules")
    assert st == 200, body
    [e] = body["results"]
    assert (e["rule"], e["id"], e["kind"], e["source"], e["site"], e["stage"]) == \
        ("tss04", fired.id, "suspend", "ip-2", "mx.site.test", "mail")
    assert "[TSS04]" in e["reply"] and 590 < e["left"] <= 600
    cli = [json.loads(x) for x in d.cli("rules", "list", "--json").stdout.decode().splitlines()]
    assert [x["id"] for x in cli] == [fired.id]
    assert admin_call(d, "DELETE", "/api/admin/rules/no-such-rule")[0] == 404
    assert admin_call(d, "POST", "/api/admin/rules")[0] == 405
    st, _, body = admin_call(d, "DELETE", "/api/admin/rules/tss04")
    assert st == 200 and [x["id"] for x in body["cancelled"]] == [fired.id], body
    assert admin_call(d, "GET", "/api/admin/rules")[2]["results"] == []
    assert d.cli("rules", "list", "--json").stdout.strip() == b""
    assert ad.list_entries(os.path.join(d.state_dir, ad.STORE_DIR)) == []   # off the disk
    assert "cancelled through the admin API: suspend tss04" in d.log()


def test_the_config_file_may_be_named_before_the_command(make_daemon):
    """`mta -c FILE queue` (as postfix -c / postqueue -c are typed) reads FILE, as
    `mta queue -c FILE` does; without it the command reads the built-in defaults,
    which name another state directory."""
    d = make_daemon()
    qid = d.send("a@example.com", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
    env = {k: v for k, v in {**os.environ, **d.env}.items() if k != "MTA_CONFIG"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True,
                              timeout=60, env=env, cwd=d.dir)
    before = run("-c", d.config_path, "queue", "list")
    assert before.returncode == 0, before.stderr
    assert [json.loads(x)["queue_id"] for x in before.stdout.decode().splitlines()] == [qid]
    after = run("-c", d.config_path, "status", "--json")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["queue"]["total"]["messages"] == 1
    # the command's own -c wins over the one before it
    wrong = run("-c", "/nonexistent/mta.toml", "queue", "list", "-c", d.config_path)
    assert wrong.returncode == 0, wrong.stderr
    assert [json.loads(x)["queue_id"] for x in wrong.stdout.decode().splitlines()] == [qid]


def test_inspect_shows_a_deferred_recipients_last_reply(make_daemon):
    """As Postfix's mailq shows why a message waits: the last deferral's reply, its host."""
    from daemon import free_port
    port = free_port()          # nobody listens there: each attempt is refused
    d = make_daemon(delivery={"hold": False, "route": [
        {"domain": "*", "starttls": "none", "hosts": [f"{HOST}:{port}"]}]})
    qid = d.send("a@sender.test", ["x@refused.test"], message("refused"))

    def deferred():
        st, _, m = admin_call(d, "GET", f"/api/admin/messages/{qid}")
        return m if st == 200 and m["recipients"][0]["attempts"] >= 1 else None
    m = wait_until(deferred, 30, "the first attempt deferred")
    last = m["recipients"][0]["last_reply"]
    assert last["code"] == 451 and last["enhanced"].startswith("4.") and last["text"], last
    assert f"{HOST}" in (last["host"] + last["ip"] + last["text"]), last
    for cmd in (("inspect", qid), ("queue", "show", qid)):
        text = d.cli(*cmd).stdout.decode()
        assert re.search(r"recipient: <x@refused.test> pending, \d+ attempt\(s\), next "
                         r"attempt .*\n  last reply: 451 4\.\d+\.\d+ ", text), (cmd, text)


def test_a_read_token_reads_everything_and_changes_nothing(make_daemon):
    """Every admin token could act: the token given to Prometheus or a load balancer's
    check could drain the node or bounce its whole queue.  A token of admin.read_tokens
    reads (metrics, health, status, queue) and its POST or DELETE gets 403."""
    d = make_daemon(admin={"tokens": ["act-t0ken"], "read_tokens": ["read-t0ken"]})
    for path in ("/metrics", "/api/admin/health", "/api/admin/status", "/api/admin/queue",
                 "/api/admin/drain"):
        st, _, _ = d.admin_get(path, token="read-t0ken")
        assert st in (200, 503), (path, st)       # (health: 503 until every child reports)
        assert d.admin_get(path)[0] == 401, path
    for method, path in (("POST", "/api/admin/drain"),
                         ("POST", "/api/admin/bounce?domain=example.net"),
                         ("DELETE", "/api/admin/drain")):
        st, headers, body = admin_call(d, method, path, token="read-t0ken")
        assert st == 403 and "may only read" in body["errors"][0]["message"], (path, st, body)
        assert 'error="insufficient_scope"' in headers["www-authenticate"]
    assert not d.log().count("drain started")
    assert admin_call(d, "GET", "/api/admin/drain", token="read-t0ken")[2]["draining"] is False
    # the acting token acts
    st, _, body = admin_call(d, "POST", "/api/admin/drain", token="act-t0ken")
    assert st == 200 and body["draining"] is True
    # the mta commands send a read token when that is all the config has
    d.sections["admin"] = {"listen": d.sections["admin"]["listen"],
                           "read_tokens": ["read-t0ken"]}
    d.write_config()
    assert "draining" in d.cli("status").stdout.decode()
    r = d.cli("drain", "--cancel", check=False)
    assert r.returncode == 1 and "may only read" in (r.stdout + r.stderr).decode(), r


def test_read_tokens_are_checked(make_daemon):
    for admin, key in (({"listen": ["0.0.0.0:8026"], "read_tokens": ["ok"]}, None),
                       ({"read_tokens": ["has space"]}, "admin.read_tokens[0]"),
                       ({"tokens": ["same"], "read_tokens": ["same"]}, "admin.read_tokens[0]")):
        d = make_daemon(start=False, admin=admin)
        r = d.cli("check-config", check=False)
        if key is None:
            assert r.returncode == 0, r
        else:
            assert r.returncode == 78 and key in r.stderr.decode(), r


def test_status_answers_within_the_shard_timeout_when_the_shards_do_not_answer(make_daemon):
    """Every spool shard stalled (a disk that hangs their writes: when the operator runs
    `mta status`): the shards were asked two at a time, 5 s each, and every request
    that came meanwhile asked them all again behind the others -- the answer came
    after (shards / 2) x 5 s and more for each status page or `mta status` open,
    past the command's 30 s with 16 shards.  It comes after one shard timeout, saying
    which shard does not answer."""
    import signal
    import threading
    import time
    from mta.admin.api import QUEUE_CACHE_SECONDS
    from mta.config.schema import AdminConfig
    SHARD_TIMEOUT = AdminConfig().shard_timeout     # (the default, which this daemon has)
    d = make_daemon(acceptors=1, shards=4)
    wait_until(lambda: admin_call(d, "GET", "/api/admin/status")[2]["ok"], 20,
               "the status ok", interval=0.3)
    spools = [pid for title, pid in d.children().items() if title.startswith("spool[")]
    assert len(spools) == 4
    took, answers = [], []

    def ask():
        t0 = time.monotonic()
        st, _, s = admin_call(d, "GET", "/api/admin/status")
        took.append(time.monotonic() - t0)
        answers.append((st, s))
    for pid in spools:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(QUEUE_CACHE_SECONDS + 0.2)       # (no answer from before served)
        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        t0 = time.monotonic()
        r = d.cli("status", check=False)
        cli_took = time.monotonic() - t0
        for t in threads:
            t.join(60)
    finally:
        for pid in spools:
            os.kill(pid, signal.SIGCONT)
    assert r.returncode == 0, r
    assert "queue: unknown (spool[" in r.stdout.decode(), r.stdout
    assert cli_took < SHARD_TIMEOUT + 3, cli_took
    assert len(answers) == 3 and all(st == 200 and s["queue"] is None
                                     and "did not answer" in s["queue_error"]
                                     for st, s in answers), answers
    assert max(took) < SHARD_TIMEOUT + 3, took


def test_a_hung_admin_process_is_named_within_seconds_and_a_slow_answer_still_waited_for(
        make_daemon):
    """The supervisor holds the admin listener's socket, so against a stopped (or wedged)
    admin process the connect succeeds and nothing answers: `mta status` waited its 30 s
    and said only that the listener was not answering.  It must say within a few seconds
    that the admin process does not answer, naming it; an answer that takes longer
    because the admin process waits for a spool shard must still be waited for."""
    import signal
    import time
    d = make_daemon(acceptors=1, shards=1)
    admin = d.children()["admin[0]"]
    os.kill(admin, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = d.cli("status", check=False, timeout=60)
        took = time.monotonic() - t0
    finally:
        os.kill(admin, signal.SIGCONT)
    err = r.stderr.decode()
    assert r.returncode == 69, r
    assert f"the admin process (pid {admin}) is not answering" in err, err
    assert took < 10, took
    assert "state: ok" in d.cli("status").stdout.decode()
    # a spool shard that does not answer: the admin process answers after its
    # [admin] shard_timeout (5 s), later than the CLI's first wait, and that answer is shown
    spool = d.children()["spool[0]"]
    os.kill(spool, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = d.cli("queue", "summary", check=False, timeout=60)
        took = time.monotonic() - t0
    finally:
        os.kill(spool, signal.SIGCONT)
    out = (r.stdout + r.stderr).decode()
    assert "admin process" not in out and "spool[0] did not answer" in out, (r, took)
    assert took >= 4, took
