"""The suppression list against the real daemon: its API, injection checks, Bounce Rule feeding.

Real clients (the PyPI and npm ``sparkpost`` clients, base address changed
only) manage the list; injections over HTTP and SMTP go to an aiosmtpd sink,
which shows what was delivered; the event log shows the class-25 bounces.
"""
from __future__ import annotations

import http.client
import json
import os
import platform
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time

import pytest
from daemon import HOST, NotifySocket, free_port, mta_children, wait_until
from sinks import AioSink
from sparkpost import SparkPost
from sparkpost.exceptions import SparkPostAPIException

from mta.feedback import suppression as S

KEY = "sup-key"
JS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "js-http")
SENDER = "sender@example.com"


def call(d, method: str, path: str, body=None, key: str = KEY) -> tuple[int, dict, object]:
    """One request to the daemon's HTTP API: (status, headers, decoded JSON or raw bytes)."""
    conn = http.client.HTTPConnection(HOST, d.http_port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) \
            else body
        conn.request(method, path, body=data,
                     headers={"Authorization": key, "Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        headers = {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()
    try:
        return r.status, headers, json.loads(raw) if raw else raw
    except ValueError:
        return r.status, headers, raw


def error_of(body) -> str:
    assert list(body) == ["errors"], body
    return body["errors"][0]["description"]


def refuse_unknown(sink, address, mail_from):
    """The sinks' RCPT answer: unknown* addresses are refused 550 5.1.1."""
    if address.startswith("unknown"):
        return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
    return None


def listed(path: str, address: str) -> bool:
    """Whether the suppression list at *path* has *address* (non-transactional)."""
    lst = S.SuppressionList(path, 1 << 24)
    try:
        return lst.check(address, False)
    finally:
        lst.close()


_FUTEX = {"x86_64": 202, "aarch64": 98}[platform.machine()]    # its system call number


def at_the_lock(pid: int, path: str) -> int:
    """How many threads of process *pid* wait for the write lock of the LMDB environment
    at *path*: blocked in futex() on an address in their mapping of its lock.mdb (the
    lock is a process-shared mutex there).  A thread merely idle in a pool waits on
    another address; a test that holds the lock knows from this, not from a pause, that
    the daemon's requests have reached it."""
    lock = os.path.realpath(os.path.join(path, "lock.mdb"))
    spans = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == lock:
                lo, hi = fields[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                call = f.read().split()
        except OSError:
            continue        # (a thread that ended meanwhile)
        if len(call) > 1 and call[0] == str(_FUTEX) and \
                any(lo <= int(call[1], 16) < hi for lo, hi in spans):
            n += 1
    return n


@pytest.fixture(scope="module")
def lab(make_module_daemon):
    """A daemon that delivers to a sink; the sink refuses unknown@ with 550 5.1.1."""
    sink = AioSink(HOST, free_port(), rcpt=refuse_unknown).start()
    d = None
    try:
        d = make_module_daemon(
            subdir="sup", acceptors=1, shards=1, http={"api_keys": [KEY]},
            delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                 "hosts": [f"{HOST}:{sink.port}"]}]})
        yield d, sink
    finally:
        if d is not None:
            d.cleanup()
        sink.stop()


def test_python_client_manages_the_list(lab):
    d, _ = lab
    sp = SparkPost(KEY)
    sl = sp.suppression_list
    sl.base_uri = d.http_base + "/api/v1"   # the only change from a SparkPost set-up
    # create(dict): PUT /suppression-list/{email} with only the deprecated booleans
    assert sl.create({"email": "Py.One+tag@Example.NET", "transactional": False,
                      "non_transactional": True, "description": "py single"}) == \
        {"message": "Suppression list successfully updated"}
    # create(list): bulk PUT, email + booleans as the client's examples write them
    assert sl.create([{"email": "py2@example.net", "transactional": True,
                       "non_transactional": True, "description": "both"},
                      {"recipient": "py3@example.net", "type": "transactional"}]) == \
        {"message": "Suppression List successfully updated"}
    one = sl.get("py.one+tag@example.net")       # the "+" unencoded in the path
    assert [(e["recipient"], e["type"], e["source"], e["description"], e["non_transactional"])
            for e in one] == [("py.one+tag@example.net", "non_transactional", "Manually Added",
                               "py single", True)]
    assert one[0]["created"].endswith("+00:00") and one[0]["updated"] == one[0]["created"]
    assert sorted(e["type"] for e in sl.get("py2@example.net")) == \
        ["non_transactional", "transactional"]
    listed = sl.list(types=["transactional"], limit=100)
    assert {e["recipient"] for e in listed} >= {"py2@example.net", "py3@example.net"}
    assert all(e["type"] == "transactional" for e in listed)
    assert sl.update({"email": "py3@example.net", "transactional": True,
                      "description": "changed"})
    assert sl.get("py3@example.net")[0]["description"] == "changed"
    assert sl.delete("py2@example.net") is True          # 204
    with pytest.raises(SparkPostAPIException) as e:
        sl.get("py2@example.net")
    assert e.value.status == 404
    with pytest.raises(SparkPostAPIException) as e:
        sl.create([{"email": "ok@example.net", "type": "transactional"},
                   {"email": "bad@example.net", "type": "sometimes"}])
    assert e.value.status == 400 and "recipients[1].type" in str(e.value)
    with pytest.raises(SparkPostAPIException) as e:
        sl.get("ok@example.net")        # all or nothing: the good entry was not written
    assert e.value.status == 404


def test_npm_client_manages_the_list(lab):
    """Its own entries only: three non_transactional ones (js1, js3, js4), so that a
    page of two has a next link whatever else the shared daemon holds (it counted on
    the Python client's test's entries, and failed run alone or on another worker)."""
    d, _ = lab
    calls = [["upsert", {"recipient": "js1@example.net", "transactional": False,
                         "non_transactional": True, "description": "from node"}],
             ["upsert", [{"recipient": "js2@example.net", "type": "transactional"},
                         {"recipient": "js3@example.net", "type": "non_transactional"},
                         {"recipient": "js4@example.net", "type": "non_transactional"}]],
             ["get", "js1@example.net"],
             ["list", {"types": "non_transactional", "per_page": 2, "sources": "Manually Added"}],
             ["delete", "js3@example.net"],
             ["get", "js3@example.net"],
             ["upsert", {"recipient": "not an address", "type": "transactional"}]]
    r = subprocess.run(["node", os.path.join(JS, "suppression.js")], cwd=JS,
                       capture_output=True, timeout=60,
                       input=json.dumps({"origin": d.http_base, "key": KEY,
                                         "calls": calls}).encode())
    assert r.returncode == 0, r.stderr.decode()
    up1, up2, got, listed, deleted, gone, bad = json.loads(r.stdout)
    assert up1 == up2 == {"ok": True, "body": {"results": {
        "message": "Suppression List successfully updated"}}}
    assert got["ok"] and got["body"]["total_count"] == 1
    assert got["body"]["results"][0]["description"] == "from node"
    assert listed["ok"] and len(listed["body"]["results"]) == 2
    assert listed["body"]["total_count"] >= 3
    assert all(e["type"] == "non_transactional" for e in listed["body"]["results"])
    assert any(link["rel"] == "next" for link in listed["body"]["links"])
    assert deleted["ok"]
    assert gone["ok"] is False and gone["status"] == 404
    assert bad["ok"] is False and bad["status"] == 400
    assert "recipients[0].recipient" in bad["errors"][0]["description"]


def test_search_paging_summary_and_errors(lab):
    d, _ = lab
    n = 25
    st, _, body = call(d, "PUT", "/api/v1/suppression-list/", {"recipients": [
        {"recipient": f"page{i:02d}@paging.test", "type": "non_transactional",
         "description": f"entry {i}"} for i in range(n)]})
    assert st == 200, body
    seen = []
    st, _, body = call(d, "GET", "/api/v1/suppression-list?domain=paging.test&per_page=10"
                                 "&cursor=initial")
    while True:
        assert st == 200, body
        assert body["total_count"] == n
        seen += [e["recipient"] for e in body["results"]]
        nxt = [x["href"] for x in body["links"] if x["rel"] == "next"]
        if not nxt:
            break
        st, _, body = call(d, "GET", nxt[0])
    assert sorted(seen) == sorted(f"page{i:02d}@paging.test" for i in range(n))
    assert len(seen) == n
    st, _, body = call(d, "GET", "/api/v1/suppression-list?domain=paging.test&per_page=10"
                                 "&page=3&sort=asc")
    assert st == 200 and len(body["results"]) == 5
    st, _, body = call(d, "GET", "/api/v1/suppression-list?description=entry%2013"
                                 "&description_strict=true")
    assert [e["recipient"] for e in body["results"]] == ["page13@paging.test"]
    st, _, body = call(d, "GET", "/api/v1/suppression-list?from=2000-01-01T00:00:00Z"
                                 "&to=2001-01-01T00:00:00%2B0000")
    assert st == 200 and body["results"] == [] and body["total_count"] == 0
    st, _, body = call(d, "GET", "/api/v1/suppression-list/summary")
    assert st == 200 and body["results"]["manually_added"] >= n
    assert body["results"]["total"] == sum(v for k, v in body["results"].items()
                                           if k != "total")
    # bad input: SparkPost's 400s where it documents them, else 422; naming the field;
    # unknown key: 401; DELETE of nothing: 404
    for path, words, status in (("?from=yesterday", "from", 400), ("?types=sometimes", "types", 400),
                                ("?per_page=0", "per_page", 422),
                                ("?sources=Nobody", "sources", 422),
                                ("?cursor=zz", "cursor", 422),
                                ("?page=2000&per_page=10", "page", 422)):
        st, _, body = call(d, "GET", "/api/v1/suppression-list" + path)
        assert st == status and words in error_of(body), (path, body)
    st, _, body = call(d, "PUT", "/api/v1/suppression-list", {"recipients": [{}] * 10_001})
    assert st == 422 and "10000" in error_of(body)
    st, _, body = call(d, "PUT", "/api/v1/suppression-list", b"{not json")
    assert st == 400
    st, _, body = call(d, "PUT", "/api/v1/suppression-list/x@y.test", {"description": "no type"})
    assert st == 400 and "type" in error_of(body)
    st, _, body = call(d, "GET", "/api/v1/suppression-list/summary", key="wrong")
    assert st == 401
    st, headers, body = call(d, "DELETE", "/api/v1/suppression-list/page00@paging.test",
                             {"type": "transactional"})
    assert st == 404
    st, headers, body = call(d, "DELETE", "/api/v1/suppression-list/page00@paging.test")
    assert st == 204 and body == b"" and "content-length" not in headers
    st, _, body = call(d, "POST", "/api/v1/suppression-list", {})
    assert st == 405


def transmission(rcpts, **options) -> dict:
    return {"recipients": rcpts, "options": options,
            "content": {"from": SENDER, "subject": "s", "text": "t"}}


def bounces(d, rcpt: str) -> list[dict]:
    return [e for e in d.events() if e["type"] == "bounce" and e["raw_rcpt_to"] == rcpt]


def test_http_injection_skips_suppressed_recipients(lab):
    d, sink = lab
    st, _, body = call(d, "PUT", "/api/v1/suppression-list", {"recipients": [
        {"recipient": "Blocked@Example.NET", "type": "non_transactional"},
        {"recipient": "tx-blocked@example.net", "type": "transactional"}]})
    assert st == 200, body
    st, _, out = d.post(transmission(["blocked@example.net", "fine@example.net",
                                      "tx-blocked@example.net"]), headers={"Authorization": KEY})
    assert st == 200 and out["results"]["total_accepted_recipients"] == 3, out
    sink.wait_for("fine@example.net")
    sink.wait_for("tx-blocked@example.net")   # blocked only for transactional mail
    ev = wait_until(lambda: bounces(d, "blocked@example.net"), 20, "the suppressed bounce")
    assert len(ev) == 1
    b = ev[0]
    assert b["bounce_class"] == "25" and b["error_code"] == "554" and b["suppressed"] == "1"
    assert b["reason"] == "554 5.7.1 recipient address was suppressed due to customer policy"
    recv = [e for e in d.events() if e["type"] == "injection"
            and e["raw_rcpt_to"] == "blocked@example.net"]
    assert len(recv) == 1 and recv[0]["queue_id"] == b["queue_id"]
    # transactional mail: the transactional list applies
    st, _, out = d.post(transmission(["tx-blocked@example.net", "blocked@example.net"],
                                     transactional=True), headers={"Authorization": KEY})
    assert st == 200 and out["results"]["total_accepted_recipients"] == 2
    wait_until(lambda: bounces(d, "tx-blocked@example.net"), 20, "the transactional bounce")
    wait_until(lambda: sum(r == "blocked@example.net" for _, r, _ in sink.deliveries()) == 1,
               20, "the transactional message to blocked@")
    # skip_suppression: delivered
    st, _, out = d.post(transmission(["tx-blocked@example.net"], transactional=True,
                                     skip_suppression=True), headers={"Authorization": KEY})
    assert st == 200
    wait_until(lambda: sum(r == "tx-blocked@example.net" for _, r, _ in sink.deliveries()) == 2,
               20, "the skip_suppression message")
    time.sleep(1.0)
    # never delivered while suppressed; no DSN to the sender for a suppression
    assert sum(r == "tx-blocked@example.net" for _, r, _ in sink.deliveries()) == 2
    assert sum(r == "blocked@example.net" for _, r, _ in sink.deliveries()) == 1
    assert not [t for t in sink.snapshot() if SENDER in t.rcpt_tos]
    assert len(bounces(d, "blocked@example.net")) == 1


def smtp_send(d, rcpts, headers: str = "") -> str:
    msg = (f"From: {SENDER}\r\nSubject: smtp\r\n{headers}\r\nbody\r\n").encode()
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=30) as s:
        refused = s.sendmail(SENDER, rcpts, msg)
    return refused


def test_smtp_injection_skips_suppressed_recipients(lab):
    d, sink = lab
    st, _, body = call(d, "PUT", "/api/v1/suppression-list/smtp-blocked@example.net",
                       {"type": "non_transactional"})
    assert st == 200, body
    assert smtp_send(d, ["smtp-blocked@example.net", "smtp-fine@example.net"]) == {}
    sink.wait_for("smtp-fine@example.net")
    ev = wait_until(lambda: bounces(d, "smtp-blocked@example.net"), 20, "the SMTP bounce")
    assert ev[0]["bounce_class"] == "25"
    smtp_send(d, ["smtp-blocked@example.net"],
              'X-MSYS-API: {"options": {"skip_suppression": true}}\r\n')
    txn = sink.wait_for("smtp-blocked@example.net")
    assert b"X-MSYS-API" not in txn.data
    assert len(bounces(d, "smtp-blocked@example.net")) == 1
    assert not [t for t in sink.snapshot() if SENDER in t.rcpt_tos]


def test_a_550_5_1_1_bounce_adds_the_address(lab):
    d, sink = lab
    st, _, _ = d.post(transmission(["unknown-user@example.net"]), headers={"Authorization": KEY})
    assert st == 200
    wait_until(lambda: bounces(d, "unknown-user@example.net"), 30, "the 5.1.1 bounce")

    def listed():
        s, _, b = call(d, "GET", "/api/v1/suppression-list/unknown-user@example.net")
        return b if s == 200 else None
    entry = wait_until(listed, 20, "the Bounce Rule entry")["results"]
    assert [(e["type"], e["source"]) for e in entry] == [("non_transactional", "Bounce Rule")]
    assert "550" in entry[0]["description"] and "5.1.1" in entry[0]["description"]
    st, _, body = call(d, "GET", "/api/v1/suppression-list?sources=Bounce%20Rule")
    assert "unknown-user@example.net" in [e["recipient"] for e in body["results"]]
    # and the next message to it is not delivered
    st, _, _ = d.post(transmission(["unknown-user@example.net"]), headers={"Authorization": KEY})
    ev = wait_until(lambda: [e for e in bounces(d, "unknown-user@example.net")
                             if e.get("bounce_class") == "25"], 20, "the suppressed bounce")
    assert len(ev) == 1


def test_a_bounce_rule_addition_waiting_for_the_list_holds_no_injection(lab):
    """The spool shard adds a 5.1.1 bounce's recipient to the list in a thread of its
    own: while that waits for the list's write lock (held here, as an acceptor's bulk
    PUT holds it while it writes and syncs), the shard still acknowledges injections
    (it held them all until the lock was free); then the entry is added."""
    d, sink = lab
    path = S.path_in(d.state_dir)
    holder = S.SuppressionList(path, 8 << 30)
    txn = holder.env.begin(write=True)
    try:
        st, _, _ = d.post(transmission(["unknown-waiting@example.net"]),
                          headers={"Authorization": KEY})
        assert st == 200
        wait_until(lambda: bounces(d, "unknown-waiting@example.net"), 30, "the 5.1.1 bounce")
        wait_until(lambda: at_the_lock(d.children()["spool[0]"], path) == 1, 20,
                   "the shard's addition at the lock")
        msg = f"From: {SENDER}\r\nSubject: s\r\n\r\nbody\r\n".encode()
        with smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=10) as s:
            assert s.sendmail(SENDER, ["while-adding@example.net"], msg) == {}
        st, _, out = d.post(transmission(["while-adding-http@example.net"]),
                            headers={"Authorization": KEY}, timeout=10)
        assert st == 200 and out["results"]["total_accepted_recipients"] == 1, out
        s, _, _ = call(d, "GET", "/api/v1/suppression-list/unknown-waiting@example.net")
        assert s == 404                     # not yet: the addition still waits
    finally:
        txn.abort()
        holder.close()

    def listed():
        s, _, b = call(d, "GET", "/api/v1/suppression-list/unknown-waiting@example.net")
        return b if s == 200 else None
    entry = wait_until(listed, 20, "the Bounce Rule entry")["results"]
    assert [(e["type"], e["source"]) for e in entry] == [("non_transactional", "Bounce Rule")]
    sink.wait_for("while-adding@example.net")
    sink.wait_for("while-adding-http@example.net")


def test_smtp_refuse_mode(make_daemon):
    d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                    suppression={"smtp_action": "refuse", "max_size": 16 * 1024 * 1024})
    st, _, body = call(d, "PUT", "/api/v1/suppression-list", {"recipients": [
        {"recipient": "refused@example.net", "type": "non_transactional"}]})
    assert st == 200, body
    with d.session() as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        code, lines = c.cmd("RCPT TO:<Refused@Example.net>")
        assert code == 550 and lines[0].startswith("5.7.1"), lines
        # the same mailbox spelt with quotes that change nothing
        code, lines = c.cmd('RCPT TO:<"refused"@example.net>')
        assert code == 550 and lines[0].startswith("5.7.1"), lines
        assert c.cmd("RCPT TO:<other@example.net>")[0] == 250
    assert smtp_send(d, ["other@example.net"]) == {}
    assert os.path.isdir(os.path.join(d.state_dir, "suppression"))


def test_list_full_is_a_clear_error(make_daemon):
    d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                    suppression={"max_size": 1024 * 1024})
    big = [{"recipient": f"u{i:06d}-{'x' * 200}@full.test", "type": "non_transactional",
            "description": "d" * 1000} for i in range(5000)]
    st, _, body = call(d, "PUT", "/api/v1/suppression-list", {"recipients": big})
    assert st == 507 and "suppression.max_size" in error_of(body)
    st, _, body = call(d, "GET", "/api/v1/suppression-list/summary")
    assert st == 200 and body["results"]["total"] == 0     # nothing of it was kept
    st, _, body = call(d, "PUT", "/api/v1/suppression-list/small@full.test",
                       {"type": "transactional"})
    assert st == 200, body
    assert S.SuppressionList(os.path.join(d.state_dir, "suppression"),
                             1024 * 1024).check("small@full.test", True)


def test_list_id_selects_list_specific_entries_only(lab):
    """``list_id=x`` on search and DELETE means that list's entries only (none here:
    list-specific entries are not kept); it must not reach the account-level entry."""
    d, sink = lab
    st, _, body = call(d, "PUT", "/api/v1/suppression-list/listed@lists.test",
                       {"type": "non_transactional"})
    assert st == 200, body
    st, _, body = call(d, "DELETE", "/api/v1/suppression-list/listed@lists.test?list_id=news")
    assert st == 404 and body["errors"][0]["message"] == "Recipient could not be found"
    st, _, body = call(d, "GET", "/api/v1/suppression-list/listed@lists.test")
    assert st == 200 and [e["type"] for e in body["results"]] == ["non_transactional"]
    st, _, body = call(d, "GET", "/api/v1/suppression-list?domain=lists.test&list_id=news")
    assert st == 200 and body["results"] == [] and body["total_count"] == 0
    st, _, body = call(d, "GET", "/api/v1/suppression-list?domain=lists.test&list_id=")
    assert st == 200 and [e["recipient"] for e in body["results"]] == ["listed@lists.test"]
    for bad in ("..news", "news.", "a..b", "x" * 256, "n%40ws"):
        st, _, body = call(d, "GET", f"/api/v1/suppression-list?list_id={bad}")
        assert st == 400 and "list_id" in body["errors"][0]["message"], (bad, body)
        st, _, body = call(d, "DELETE", f"/api/v1/suppression-list/listed@lists.test"
                                        f"?list_id={bad}")
        assert st == 400, (bad, body)
    st, _, body = call(d, "DELETE", "/api/v1/suppression-list/listed@lists.test?list_id=")
    assert st == 204
    assert smtp_send(d, ["listed@lists.test"]) == {}
    sink.wait_for("listed@lists.test")      # off the list: delivered


def test_domain_search_takes_either_spelling_of_an_idn_domain(lab):
    d, sink = lab
    st, _, body = call(d, "PUT", "/api/v1/suppression-list", {"recipients": [
        {"recipient": "u1@b\u00fccher.example", "type": "non_transactional"},
        {"recipient": "u2@xn--bcher-kva.example", "type": "non_transactional"}]})
    assert st == 200, body
    for dom in ("b%C3%BCcher.example", "xn--bcher-kva.example", "XN--BCHER-KVA.example"):
        st, _, body = call(d, "GET", f"/api/v1/suppression-list?domain={dom}")
        assert st == 200 and sorted(e["recipient"] for e in body["results"]) == \
            ["u1@xn--bcher-kva.example", "u2@xn--bcher-kva.example"], (dom, body)
    # and both spellings are suppressed at injection, whichever was listed
    assert smtp_send(d, ["u1@xn--bcher-kva.example", "ok@xn--bcher-kva.example"]) == {}
    st, _, out = d.post(transmission(["u2@b\u00fccher.example"]),
                        headers={"Authorization": KEY})
    assert st == 200, out
    sink.wait_for("ok@xn--bcher-kva.example")
    wait_until(lambda: bounces(d, "u1@xn--bcher-kva.example"), 20, "the SMTP bounce")
    wait_until(lambda: [e for e in d.events() if e["type"] == "bounce"
                        and e["rcpt_to"].startswith("u2@")], 20, "the HTTP bounce")
    assert not [r for _, r, _ in sink.deliveries() if r.startswith(("u1@", "u2@"))]


def test_bulk_put_errors_are_sparkposts_400s(lab):
    """SparkPost's answers to a bad PUT: 400, the message naming every malformed
    recipient (or the type rule); nothing of the request is written."""
    d, _ = lab
    st, _, body = call(d, "PUT", "/api/v1/suppression-list", {"recipients": [
        {"recipient": "good@bad-put.test", "type": "transactional"},
        {"recipient": "not-an-address", "type": "transactional"},
        {"email": "also bad@bad-put.test", "type": "non_transactional"},
        {"type": "transactional"}]})
    assert st == 400, body
    assert body["errors"][0]["message"] == (
        "PUT body contains 3 invalid or malformed recipient(s): not-an-address, "
        "also bad@bad-put.test, recipients[3]"), body
    st, _, body = call(d, "PUT", "/api/v1/suppression-list", {"recipients": [
        {"recipient": "good@bad-put.test", "type": "sometimes"}]})
    assert st == 400 and body["errors"][0]["message"] == \
        "Type must be one of: 'transactional', 'non_transactional'", body
    st, _, body = call(d, "PUT", "/api/v1/suppression-list/good@bad-put.test",
                       {"description": "no type"})
    assert st == 400 and body["errors"][0]["message"] == "Must supply a suppression type", body
    st, _, body = call(d, "GET", "/api/v1/suppression-list?from=yesterday")
    assert st == 400 and body["errors"][0]["message"] == "from must be a valid date", body
    st, _, body = call(d, "GET", "/api/v1/suppression-list/good@bad-put.test")
    assert st == 404


def test_a_bulk_put_up_to_sparkposts_50_mb_is_taken(lab):
    """10,000 entries with long non-ASCII descriptions (21 MB: over the transmissions'
    http.max_body_size, within SparkPost's 50 MB for this call) are all written; a body
    announced over 50 MB is still a 413."""
    d, _ = lab
    body = json.dumps({"recipients": [
        {"recipient": f"bulk{i:05d}@big-put.test", "type": "non_transactional",
         "description": "\u00e9" * S.MAX_DESCRIPTION} for i in range(10_000)]},
        ensure_ascii=False).encode()
    assert 20 * 1024 * 1024 < len(body) < 50_000_000
    st, _, out = call(d, "PUT", "/api/v1/suppression-list", body)
    assert st == 200, out
    st, _, out = call(d, "GET", "/api/v1/suppression-list?domain=big-put.test&per_page=1")
    assert st == 200 and out["total_count"] == 10_000
    # over 50 MB; over http.max_body_size without a valid key (the larger bound is the
    # customer's, not anyone's who can connect): 413 at once, the body not read
    for key, length in ((KEY, 60_000_000), ("wrong", 30_000_000), ("", 30_000_000)):
        with socket.create_connection((HOST, d.http_port), timeout=10) as s:
            s.sendall(b"PUT /api/v1/suppression-list HTTP/1.1\r\nHost: x\r\n"
                      + (b"Authorization: " + key.encode() + b"\r\n" if key else b"")
                      + b"Content-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % length)
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 413 "), (key, reply[:200])


def test_smtp_and_reads_are_answered_while_a_bulk_put_is_in_progress(lab):
    """A bulk PUT of SparkPost's 10,000 entries is written in a worker thread: while it
    waits for the list's write lock (held here, by a write transaction of this process),
    the same acceptor (the daemon's only one) takes an SMTP message and answers a read of
    the list; once the lock is free the PUT is answered and every entry is there."""
    d, sink = lab
    body = json.dumps({"recipients": [
        {"recipient": f"busy{i:05d}@busy-put.test", "type": "non_transactional",
         "description": f"busy {i}"} for i in range(10_000)]}).encode()
    before = call(d, "GET", "/api/v1/suppression-list/summary")[2]["results"]
    path = S.path_in(d.state_dir)
    holder = S.SuppressionList(path, 8 << 30)
    txn = holder.env.begin(write=True)
    answer = {}
    th = threading.Thread(target=lambda: answer.update(
        put=call(d, "PUT", "/api/v1/suppression-list", body)))
    try:
        th.start()
        wait_until(lambda: at_the_lock(d.children()["acceptor[0]"], path) == 1, 20,
                   "the PUT's worker at the lock")
        assert th.is_alive() and not answer
        assert smtp_send(d, ["while-busy@example.net"]) == {}
        st, _, got = call(d, "GET", "/api/v1/suppression-list/summary")
        assert st == 200 and got["results"] == before
        assert th.is_alive() and not answer     # all of that while the PUT waited
    finally:
        txn.abort()
        holder.close()
        th.join(60)
    st, _, out = answer["put"]
    assert st == 200, out
    sink.wait_for("while-busy@example.net")
    st, _, got = call(d, "GET", "/api/v1/suppression-list/summary")
    assert got["results"]["manually_added"] == before["manually_added"] + 10_000
    assert got["results"]["total"] == before["total"] + 10_000
    st, _, out = call(d, "GET", "/api/v1/suppression-list?domain=busy-put.test&sort=asc"
                      "&per_page=10000")
    assert st == 200 and out["total_count"] == 10_000
    assert sorted((e["recipient"], e["description"]) for e in out["results"]) == \
        [(f"busy{i:05d}@busy-put.test", f"busy {i}") for i in range(10_000)]


def test_suppression_requests_waiting_for_the_list_leave_threads_for_transmissions(lab):
    """Suppression-list requests have a pool of threads of their own: eight bulk PUTs
    waiting for the list's write lock (held here, as a long write holds it) left none of
    the acceptor's default executor for a large transmission, whose body is decoded
    and compiled there; it is answered meanwhile, and the PUTs once the lock is free."""
    d, sink = lab
    path = S.path_in(d.state_dir)
    holder = S.SuppressionList(path, 8 << 30)
    txn = holder.env.begin(write=True)
    answers: list = []
    puts = [threading.Thread(target=lambda i=i: answers.append(call(
        d, "PUT", "/api/v1/suppression-list",
        {"recipients": [{"recipient": f"queued{i}@pool.test", "type": "transactional"}]})))
        for i in range(8)]
    try:
        for th in puts:
            th.start()
        # (both threads of suppression.api_threads at the lock, the six others waiting
        # for one of them)
        wait_until(lambda: at_the_lock(d.children()["acceptor[0]"], path) == 2, 20,
                   "two PUTs at the lock")
        time.sleep(0.5)     # (the six others taken too)
        assert not answers
        big = {"recipients": [{"address": "large-while-busy@example.net"}],
               "content": {"from": SENDER, "subject": "s", "text": "x" * 70_000}}
        st, _, out = d.post(big, headers={"Authorization": KEY}, timeout=10)
        assert st == 200 and out["results"]["total_accepted_recipients"] == 1, out
        assert not answers
    finally:
        txn.abort()
        holder.close()
        for th in puts:
            th.join(60)
    assert sorted(a[0] for a in answers) == [200] * 8
    assert all(call(d, "GET", f"/api/v1/suppression-list/queued{i}@pool.test")[0] == 200
               for i in range(8))
    sink.wait_for("large-while-busy@example.net")


def test_api_threads_and_writer_close_wait_are_taken(make_daemon):
    """[suppression] api_threads and writer_close_wait (they were constants: 2 threads,
    5 s).  With api_threads = 3, two bulk PUTs waiting for the list's write lock (held
    here) leave a thread for a read, answered meanwhile (with 2 it waited for the lock);
    with writer_close_wait = 0.5, a shard stopping while its Bounce Rule addition waits
    for the lock gives up after 0.5 s (not 5) and says so."""
    sink = AioSink(HOST, free_port(), rcpt=refuse_unknown).start()
    try:
        d = make_daemon(
            acceptors=1, shards=1, http={"api_keys": [KEY]},
            suppression={"api_threads": 3, "writer_close_wait": 0.5},
            delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                 "hosts": [f"{HOST}:{sink.port}"]}]})
        path = S.path_in(d.state_dir)
        holder = S.SuppressionList(path, 8 << 30)
        txn = holder.env.begin(write=True)
        answers: list = []
        puts = [threading.Thread(target=lambda i=i: answers.append(call(
            d, "PUT", "/api/v1/suppression-list",
            {"recipients": [{"recipient": f"held{i}@threads.test", "type": "transactional"}]})))
            for i in range(2)]
        read: dict = {}
        reader = threading.Thread(target=lambda: read.update(
            got=call(d, "GET", "/api/v1/suppression-list/summary")))
        try:
            for th in puts:
                th.start()
            wait_until(lambda: at_the_lock(d.children()["acceptor[0]"], path) == 2, 20,
                       "both PUTs at the lock, each in a thread")
            assert not answers
            reader.start()
            reader.join(5)
            assert not reader.is_alive() and read["got"][0] == 200, read
            assert not answers              # (the PUTs still wait)
        finally:
            txn.abort()
            for th in [*puts, reader]:
                th.join(60)
        assert sorted(a[0] for a in answers) == [200, 200]

        # the shard's Bounce Rule addition waits for the lock at the stop
        txn = holder.env.begin(write=True)
        try:
            st, _, _ = d.post(transmission(["unknown-at-stop@example.net"]),
                              headers={"Authorization": KEY})
            assert st == 200
            wait_until(lambda: bounces(d, "unknown-at-stop@example.net"), 30, "the bounce")
            wait_until(lambda: at_the_lock(d.children()["spool[0]"], path) == 1, 20,
                       "the shard's addition at the lock")
            t0 = time.monotonic()
            assert d.stop(30) == 0
            took = time.monotonic() - t0
        finally:
            txn.abort()
            holder.close()
        assert "its last writes not done after 0.5 s" in d.log(), d.log()[-3000:]
        assert took < 4.5, took
        assert not listed(S.path_in(d.state_dir), "unknown-at-stop@example.net")
    finally:
        sink.stop()


def test_a_search_past_max_search_time_answers_what_it_read_with_a_cursor(make_daemon):
    """suppression.max_search_time bounds a search in time (before, only max_search_scan's
    count of rows bounded it: a search by description on a slow disk held an API thread
    for seconds): past it the daemon answers the page so far and, with cursor paging, a
    next link from the last row read; the links lead to every matching entry."""
    d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                    suppression={"max_search_time": 0.01})
    for b in range(0, 30_000, 10_000):
        st, _, out = call(d, "PUT", "/api/v1/suppression-list", {"recipients": [
            {"recipient": f"t{i:05d}@timed.test", "type": "non_transactional",
             "description": "needle" if i % 1000 == 3 else "hay"} for i in range(b, b + 10_000)]})
        assert st == 200, out
    want = sorted(f"t{i:05d}@timed.test" for i in range(30_000) if i % 1000 == 3)
    path = "/api/v1/suppression-list?description=needle&per_page=100&cursor=initial"
    seen, pages = [], 0
    while pages < 2000:
        pages += 1
        st, _, out = call(d, "GET", path)
        assert st == 200, out
        if pages == 1:      # (30,000 records to read: more than 10 ms)
            assert len(out["results"]) < len(want) and out["total_count"] < len(want), out
        seen += [e["recipient"] for e in out["results"]]
        nxt = [link["href"] for link in out["links"] if link["rel"] == "next"]
        if not nxt:
            break
        path = nxt[0]
    assert pages > 2 and sorted(seen) == want and len(seen) == len(want)


def test_a_domain_search_finds_entries_kept_in_either_spelling(make_daemon):
    """A list written before domains were kept in A-labels has U-label keys: a domain
    search finds them and the A-label ones, spelt either way."""
    d = make_daemon(start=False, acceptors=1, shards=1, http={"api_keys": [KEY]})
    old = S.SuppressionList(os.path.join(d.state_dir, "suppression"), 1 << 24)
    with old.env.begin(write=True) as txn:        # as an earlier version stored it
        old._put(txn, "old@b\u00fccher.example", S.NON_TRANSACTIONAL, S.MANUAL, "", 1000.0)
    old.put_many([("new@b\u00fccher.example", S.NON_TRANSACTIONAL, "")])
    old.close()
    d.start()
    for dom in ("b%C3%BCcher.example", "xn--bcher-kva.example"):
        st, _, body = call(d, "GET", f"/api/v1/suppression-list?domain={dom}")
        assert st == 200 and sorted(e["recipient"] for e in body["results"]) == \
            ["new@xn--bcher-kva.example", "old@b\u00fccher.example"], (dom, body)


def test_a_damaged_entry_neither_fails_injection_nor_blocks_the_api(make_daemon):
    """LMDB keeps no checksums: an entry whose value is not what is written (no flags
    octet; flags then no msgpack) must not fail the injections or the searches that meet
    it, and can be deleted or put again through the API."""
    sink = AioSink(HOST, free_port()).start()
    try:
        d = make_daemon(
            start=False, acceptors=1, shards=1, http={"api_keys": [KEY]},
            delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                 "hosts": [f"{HOST}:{sink.port}"]}]})
        sl = S.SuppressionList(os.path.join(d.state_dir, "suppression"), 1 << 24)
        sl.put_many([("empty@example.net", S.BOTH, ""), ("junk@example.net", S.BOTH, ""),
                     ("kept@example.net", S.NON_TRANSACTIONAL, "")])
        with sl.env.begin(write=True) as txn:
            txn.put(b"empty@example.net", b"", db=sl.rcpt)
            txn.put(b"junk@example.net", b"\x02\xc1junk", db=sl.rcpt)
        sl.close()
        d.start()
        # damaged entries still suppress (both types when the flags octet is gone)
        assert smtp_send(d, ["empty@example.net", "ok1@example.net"]) == {}
        st, _, out = d.post(transmission(["empty@example.net", "junk@example.net",
                                          "ok2@example.net"]),
                            headers={"Authorization": KEY})
        assert st == 200 and out["results"]["total_accepted_recipients"] == 3, out
        sink.wait_for("ok1@example.net")
        sink.wait_for("ok2@example.net")
        wait_until(lambda: len(bounces(d, "empty@example.net")) == 2 and
                   bounces(d, "junk@example.net"), 20, "the suppressed bounces")
        assert {b["bounce_class"] for b in bounces(d, "empty@example.net")} == {"25"}
        # the search goes past them; each one is shown, deleted or put again
        st, _, body = call(d, "GET", "/api/v1/suppression-list?per_page=10")
        assert st == 200 and "kept@example.net" in [e["recipient"] for e in body["results"]]
        st, _, body = call(d, "GET", "/api/v1/suppression-list/junk@example.net")
        assert st == 200 and [e["type"] for e in body["results"]] == ["non_transactional"]
        assert call(d, "DELETE", "/api/v1/suppression-list/empty@example.net")[0] == 204
        st, _, body = call(d, "PUT", "/api/v1/suppression-list/junk@example.net",
                           {"type": "transactional"})
        assert st == 200, body
        st, _, body = call(d, "GET", "/api/v1/suppression-list?sort=asc")
        assert st == 200 and sorted((e["recipient"], e["type"]) for e in body["results"]) == \
            [("junk@example.net", "transactional"), ("kept@example.net", "non_transactional")]
        assert smtp_send(d, ["empty@example.net", "junk@example.net"]) == {}
        sink.wait_for("empty@example.net")
        sink.wait_for("junk@example.net")   # (non-transactional mail: no longer suppressed)
    finally:
        sink.stop()


def _put_many(d, first: int, n: int, tries: int = 1) -> None:
    """n entries u<i>@example.net (both types) through the node's API; a bulk PUT whose
    connection an acceptor's end cut is sent again (*tries* times: the same entries)."""
    for at in range(first, first + n, 1000):
        body = {"recipients": [
            {"recipient": f"u{i:05d}@example.net", "type": t, "description": "x" * 50}
            for i in range(at, min(at + 1000, first + n))
            for t in ("transactional", "non_transactional")]}
        for left in range(tries - 1, -1, -1):
            try:
                st, _, out = call(d, "PUT", "/api/v1/suppression-list", body)
                break
            except (ConnectionError, http.client.HTTPException):
                if not left:
                    raise
                time.sleep(0.2)
        assert st == 200, out


@pytest.mark.parametrize("cut", ["meta", "pages"])
def test_a_truncated_list_is_moved_aside_and_rebuilt_at_the_start(make_daemon, cut,
                                                                   tmp_path):
    """data.mdb of a stopped node cut short (a partial copy or restore, a full disk):
    every process that read it died of SIGBUS (cut into its pages) or could not open it
    (into its meta pages), so the node did not start.  The supervisor finds it before
    any child opens the list: the node starts, with the entries still on the surviving
    pages (they suppress), the damaged list kept aside and an ERROR line saying so."""
    sink = AioSink(HOST, free_port()).start()
    try:
        d = make_daemon(
            acceptors=1, shards=1, http={"api_keys": [KEY]},
            delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                 "hosts": [f"{HOST}:{sink.port}"]}]})
        _put_many(d, 0, 3000)
        assert d.stop() == 0
        path = os.path.join(d.state_dir, "suppression")
        data = os.path.join(path, "data.mdb")
        size = os.path.getsize(data)
        with open(data, "r+b") as fh:
            fh.truncate(4096 if cut == "meta" else size // 2)
        ns = NotifySocket(str(tmp_path / "notify.sock"))
        try:
            d.start(env={"NOTIFY_SOCKET": ns.path})
            ready = ns.expect("READY=1")[0]
        finally:
            ns.close()
        # systemd is asked for more time for the start while the list is rebuilt
        asked = {pid for t, pid, lines in ns.got if t < ready and
                 any(x.startswith("EXTEND_TIMEOUT_USEC=") for x in lines)}
        assert asked == {d.proc.pid}, ns.got
        st, _, body = call(d, "GET", "/api/v1/suppression-list?per_page=10000")
        assert st == 200, body
        kept = sorted({e["recipient"] for e in body["results"]})
        assert len(kept) < 3000 and (cut == "meta" or len(kept) > 100), len(kept)
        # what was read back suppresses; the rest of the node works
        assert smtp_send(d, kept[:1] + ["fresh@example.net"]) == {}
        sink.wait_for("fresh@example.net")
        if kept:
            ev = wait_until(lambda: bounces(d, kept[0]), 20, "the suppressed bounce")
            assert ev[0]["bounce_class"] == "25"
            assert not [r for _, r, _ in sink.deliveries() if r == kept[0]]
        st, _, body = call(d, "PUT", "/api/v1/suppression-list/new@example.net",
                           {"type": "non_transactional"})
        assert st == 200, body
        log = d.log(since_start=True)
        assert "ERROR" in log and f"suppression list {path}: " in log and \
            f"moved to {path}.damaged-" in log, log[-3000:]
        assert "signal 7" not in log and "died" not in log and "cannot start" not in log
        aside = [n for n in os.listdir(d.state_dir) if n.startswith("suppression.damaged-")]
        assert len(aside) == 1
        assert os.path.getsize(os.path.join(d.state_dir, aside[0], "data.mdb")) < size
        # a next start finds the rebuilt list sound
        assert d.stop() == 0
        d.start()
        assert "moved to" not in d.log(since_start=True)
        assert call(d, "GET", "/api/v1/suppression-list/new@example.net")[0] == 200
    finally:
        sink.stop()


def test_a_reload_onto_another_truncated_list_rebuilds_it_first(make_daemon):
    """A reload that points suppression.path at another list (the new acceptors open
    it): a truncated one is rebuilt before they are forked, as at a start; they start
    and read what was saved.  The running list is not checked again."""
    d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]})
    other = os.path.join(d.state_dir, "restored")
    sl = S.SuppressionList(other, 1 << 24)
    sl.put_many([(f"r{i:05d}@example.net", S.BOTH, "x" * 50) for i in range(3000)])
    sl.close()
    data = os.path.join(other, "data.mdb")
    with open(data, "r+b") as fh:
        fh.truncate(os.path.getsize(data) // 2)
    log = d.reload(suppression={"path": "restored"})
    assert f"suppression list {other}: data.mdb is " in log and \
        f"moved to {other}.damaged-" in log, log[-3000:]
    assert "died" not in log and "reload failed" not in log

    def listed() -> set[str]:
        st, _, body = call(d, "GET", "/api/v1/suppression-list?per_page=10000")
        assert st == 200, body
        return {e["recipient"] for e in body["results"]}

    # (an old acceptor may answer a last request: it had the empty list)
    kept = wait_until(listed, 20, "the new acceptor's answer")
    assert 100 < len(kept) < 3000 and all(r.startswith("r") for r in kept), len(kept)
    log = d.reload(smtp={"max_recipients": 900})
    assert log.count("moved to") == 1


def test_a_list_being_written_is_never_taken_for_a_damaged_one(make_daemon):
    """The check reads the list only in the supervisor, before any child is forked: a
    child never checks it (acceptors and spool shards create and grow it at their
    start, side by side), nor a child restarted or replaced while the API writes it.
    Fresh nodes, started again and again, and a node whose list grows meanwhile all
    start, and a healthy list is never touched."""
    d = make_daemon(start=False, acceptors=2, shards=2, http={"api_keys": [KEY]})
    path = os.path.join(d.state_dir, "suppression")
    for run in range(6):                    # a fresh state directory each time
        if run:
            subprocess.run(["rm", "-rf", d.state_dir], check=True)
        d.start()
        _put_many(d, 0, 200)
        assert d.stop() == 0
    assert "moved to" not in d.log() and "suppression list" not in d.log()
    d.start()
    ino = os.stat(os.path.join(path, "data.mdb")).st_ino
    # the list grows while an acceptor is killed and restarted, and at a reload
    # (new acceptors open it while the spool shards and the others write it)
    done_at: list[float] = []
    stop = threading.Event()

    errors: list[BaseException] = []

    def write() -> None:
        try:
            for k in range(60):
                if stop.is_set():
                    return
                _put_many(d, 1000 + 100 * k, 100, tries=20)
                done_at.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=write)
    t.start()
    try:
        wait_until(lambda: done_at, 20, "a first write")
        began = time.monotonic()
        pid = d.children()["acceptor[0]"]
        os.kill(pid, 9)
        d.wait_restarted("acceptor[0]", pid)
        d.reload(smtp={"max_recipients": 900})
        ended = time.monotonic()
    finally:
        stop.set()
        t.join(120)
    assert not errors and not t.is_alive() and [x for x in done_at if began < x < ended], (began, done_at)
    written = 200 + 100 * len(done_at)
    for _ in range(3):
        assert d.stop() == 0
        d.start()
    log = d.log()
    assert "moved to" not in log and "signal 7" not in log and "not checked" not in log
    assert os.stat(os.path.join(path, "data.mdb")).st_ino == ino
    assert not [n for n in os.listdir(d.state_dir) if ".damaged-" in n]
    st, _, body = call(d, "GET", "/api/v1/suppression-list/summary")
    assert st == 200 and body["results"]["total"] == 2 * written, body


CHECK_SPY = '''
import os
import re
from mta.feedback import suppression as _s
_check = _s.check_store


def _spy(path):
    with open(os.environ["MTA_TEST_CHECKS"], "a") as fh:
        fh.write(f"{os.getpid()} {path}\\n")
    return _check(path)


_s.check_store = _spy
'''


def test_only_the_supervisor_reads_the_list_at_its_start(make_daemon, tmp_path):
    """Which processes check the list (a spy wraps check_store in every python process
    of the node): the supervisor, once per start, before its children; never a child
    (neither at its start, nor restarted, nor replaced at a reload), nor the new
    supervisor of an upgrade (the list is open in the node then)."""
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(CHECK_SPY)
    checks = tmp_path / "checks"
    d = make_daemon(start=False, acceptors=2, shards=2, http={"api_keys": [KEY]})
    d.env["PYTHONPATH"] = str(spy) + os.pathsep + d.env["PYTHONPATH"]
    d.env["MTA_TEST_CHECKS"] = str(checks)
    path = os.path.join(d.state_dir, "suppression")

    def seen() -> list[str]:
        return checks.read_text().splitlines() if checks.exists() else []

    d.start()
    assert seen() == [f"{d.proc.pid} {path}"]
    _put_many(d, 0, 100)
    pid = d.children()["spool[0]"]
    os.kill(pid, 9)
    d.wait_restarted("spool[0]", pid)
    pid = d.children()["acceptor[1]"]
    os.kill(pid, 9)
    d.wait_restarted("acceptor[1]", pid)
    d.reload(smtp={"max_recipients": 900})
    _put_many(d, 100, 100)
    assert len(seen()) == 1
    old = d.proc.pid
    assert d.stop() == 0
    d.start()
    assert seen() == [f"{old} {path}", f"{d.proc.pid} {path}"]
    d.cli("upgrade", timeout=180)
    assert d.proc.wait(30) == 0
    new = int(open(os.path.join(d.state_dir, "run", "mta.pid")).read())
    try:
        assert new != d.proc.pid
        wait_until(lambda: call(d, "GET", "/api/v1/suppression-list/summary")[0] == 200,
                   30, "the upgraded node's API")
        st, _, body = call(d, "GET", "/api/v1/suppression-list/summary")
        assert body["results"]["total"] == 400, body
        assert len(seen()) == 2
    finally:
        os.kill(new, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(f"/proc/{new}") or
                   open(f"/proc/{new}/stat").read().rpartition(")")[2].split()[0] == "Z",
                   60, "the new supervisor to stop")


def test_a_reload_moves_every_process_to_the_new_list_together(make_daemon):
    """A reload that points suppression.path at another list, then turns the list off:
    the new acceptors checked injections against the new list while the spool shards
    (not replaced) went on putting their Bounce Rule entries on the old one until a
    restart -- one list checked, another fed.  Now the shards take the new list at the
    reload too (their log says so), and nothing is named as waiting for a restart."""
    sink = AioSink(HOST, free_port(), rcpt=refuse_unknown).start()
    try:
        d = make_daemon(
            acceptors=1, shards=1, http={"api_keys": [KEY]},
            delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                 "hosts": [f"{HOST}:{sink.port}"]}]})
        first = os.path.join(d.state_dir, "suppression")
        other = os.path.join(d.state_dir, "other")
        st, _, body = call(d, "PUT", "/api/v1/suppression-list/old-only@example.net",
                           {"type": "non_transactional"})
        assert st == 200, body
        sl = S.SuppressionList(other, 1 << 24)
        sl.put_many([("new-only@example.net", S.BOTH, "restored")], "Manually Added")
        sl.close()

        log = d.reload(suppression={"path": "other"})
        d.wait_log(r"reload: suppression list " + re.escape(other) + ", Bounce Rule on")
        assert "suppression.path" not in log and "reload failed" not in log, log[-3000:]

        st, _, out = d.post(transmission(["new-only@example.net", "old-only@example.net",
                                          "unknown-1@example.net"]),
                            headers={"Authorization": KEY})
        assert st == 200 and out["results"]["total_accepted_recipients"] == 3, out
        sink.wait_for("old-only@example.net")       # only on the old list: delivered
        ev = wait_until(lambda: bounces(d, "new-only@example.net"), 20, "the class-25")
        assert ev[0]["bounce_class"] == "25"
        wait_until(lambda: bounces(d, "unknown-1@example.net"), 30, "the 5.1.1 bounce")

        # the shard's Bounce Rule entry is on the list the acceptors check
        wait_until(lambda: listed(other, "unknown-1@example.net"), 20, "the Bounce Rule entry")
        assert not listed(first, "unknown-1@example.net")
        st, _, body = call(d, "GET", "/api/v1/suppression-list/unknown-1@example.net")
        assert st == 200 and body["results"][0]["source"] == "Bounce Rule", body
        assert smtp_send(d, ["unknown-1@example.net"]) == {}
        wait_until(lambda: [e for e in bounces(d, "unknown-1@example.net")
                            if e.get("bounce_class") == "25"], 20, "the suppressed bounce")
        assert sum(r == "new-only@example.net" for _, r, _ in sink.deliveries()) == 0

        # the list turned off: no process adds to it (nor checks it) any more
        d.reload(suppression={"enabled": False})
        d.wait_log(r"reload: suppression list off, Bounce Rule off")
        st, _, out = d.post(transmission(["unknown-2@example.net", "new-only@example.net"]),
                            headers={"Authorization": KEY})
        assert st == 200, out
        sink.wait_for("new-only@example.net")
        wait_until(lambda: bounces(d, "unknown-2@example.net"), 30, "the 5.1.1 bounce")
        time.sleep(0.5)
        assert not listed(other, "unknown-2@example.net")
        assert "suppression list: added unknown-2" not in d.log()
    finally:
        sink.stop()


def test_no_bounce_rule_entry_goes_to_the_old_list_while_the_acceptors_roll(make_daemon):
    """A reload that points suppression.path at another list: the supervisor started the
    new acceptors (they read the new list) and only then signalled the spool shards, so
    a 5.1.1 bounce meanwhile put its Bounce Rule entry on the old list, which no acceptor
    reads after the reload -- the address was mailed again.  The new acceptor is held
    (SIGSTOP) as soon as it is forked, which holds that window open: a bounce then must
    land on the new list (the shards are moved, and have said so, before the acceptors)."""
    sink = AioSink(HOST, free_port(), rcpt=refuse_unknown).start()
    held = None
    try:
        d = make_daemon(
            acceptors=1, shards=1, http={"api_keys": [KEY]}, server={"ready_timeout": 60},
            delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                 "hosts": [f"{HOST}:{sink.port}"]}]})
        first = os.path.join(d.state_dir, "suppression")
        other = os.path.join(d.state_dir, "other")
        S.SuppressionList(other, 1 << 24).close()
        before = {pid for _, pid in mta_children(d.proc.pid, zombies=True)}
        done = len(re.findall(r"reloaded: ", d.log()))
        d.sections["suppression"] = {"path": "other"}
        d.write_config()
        d.proc.send_signal(signal.SIGHUP)

        def forked():
            new = [pid for _, pid in mta_children(d.proc.pid, zombies=True)
                   if pid not in before]
            return new[0] if new else None
        held = wait_until(forked, 30, "the new acceptor's fork", interval=0.002)
        os.kill(held, signal.SIGSTOP)
        # the window: the new acceptor forked (it opens the new list), the reload not over
        st, _, out = d.post(transmission(["unknown-1@example.net"]),
                            headers={"Authorization": KEY})
        assert st == 200, out
        wait_until(lambda: bounces(d, "unknown-1@example.net"), 30, "the 5.1.1 bounce")

        wait_until(lambda: listed(other, "unknown-1@example.net") or
                   listed(first, "unknown-1@example.net"), 20, "the Bounce Rule entry")
        os.kill(held, signal.SIGCONT)
        held = None
        d.wait_log(r"reloaded: ", count=done + 1, timeout=60)
        assert listed(other, "unknown-1@example.net"), \
            "the Bounce Rule entry went to the list the acceptors no longer read"
        assert not listed(first, "unknown-1@example.net")
        # and the address is not mailed again
        st, _, out = d.post(transmission(["unknown-1@example.net"]),
                            headers={"Authorization": KEY})
        assert st == 200, out
        wait_until(lambda: [e for e in bounces(d, "unknown-1@example.net")
                            if e.get("bounce_class") == "25"], 20, "the suppressed bounce")
        assert sum(r == "unknown-1@example.net" for _, r, _ in sink.deliveries()) == 0
    finally:
        if held is not None:
            os.kill(held, signal.SIGCONT)
        sink.stop()


FAILING_ACCEPTOR_WRAPPER = """
import os, runpy, sys
from mta import proc
flag = sys.argv.pop(1)
start_role = proc.start_role
def start(role, index, log_level):
    if role == "acceptor" and os.path.exists(flag):
        raise SystemExit(3)
    return start_role(role, index, log_level)
proc.start_role = start
sys.argv = sys.argv[2:]
runpy.run_module("mta", run_name="__main__")
"""


def test_a_reload_whose_acceptor_does_not_start_moves_the_shards_back(make_daemon, tmp_path):
    """The spool shards take a new suppression.path before the new acceptors start; a
    new acceptor that does not start fails the reload, and the old acceptors (the old
    list) keep serving: the shards go back to the old list too, so a Bounce Rule entry
    lands where injections are checked."""
    import sys

    sink = AioSink(HOST, free_port(), rcpt=refuse_unknown).start()
    try:
        wrapper = tmp_path / "failing_acceptor.py"
        wrapper.write_text(FAILING_ACCEPTOR_WRAPPER)
        flag = tmp_path / "fail"
        d = make_daemon(
            acceptors=1, shards=1, start=False, http={"api_keys": [KEY]},
            server={"ready_timeout": 5},
            delivery={"hold": False, "route": [{"domain": "*", "starttls": "none",
                                                 "hosts": [f"{HOST}:{sink.port}"]}]})
        d.start(python=[sys.executable, str(wrapper), str(flag)])
        first = os.path.join(d.state_dir, "suppression")
        other = os.path.join(d.state_dir, "other")
        flag.touch()
        d.sections["suppression"] = {"path": "other"}
        d.write_config()
        r = d.cli("reload", check=False, timeout=120)
        assert r.returncode == 1 and "did not start" in r.stderr.decode(), r
        d.wait_log(r"spool\[0\].*reload: suppression list " + re.escape(other))
        d.wait_log(r"spool\[0\].*reload: suppression list " + re.escape(first) +
                   ", Bounce Rule on")
        os.unlink(flag)
        st, _, out = d.post(transmission(["unknown-1@example.net"]),
                            headers={"Authorization": KEY})
        assert st == 200, out
        wait_until(lambda: bounces(d, "unknown-1@example.net"), 30, "the 5.1.1 bounce")

        wait_until(lambda: listed(first, "unknown-1@example.net"), 20, "the Bounce Rule entry")
        assert not listed(other, "unknown-1@example.net")
    finally:
        sink.stop()
