"""Refusals at injection as SparkPost events, against the real daemon.

A ``policy_rejection`` for an SMTP recipient this node's policy refuses (a
suppressed RCPT with ``suppression.smtp_action = "refuse"``; a message whose
X-MSYS-API names an unknown ip_pool), durable before the client hears the
refusal: it is in the event log after a kill -9 that follows the 550 at once,
and reaches the events API and a webhook like every other event.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import urllib.parse

from daemon import wait_until

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "webhooks"))
from receiver import Receiver  # noqa: E402

KEY = "refusal-key"
SENDER = "news@sender.example.org"
REFUSALS = ["policy_rejection", "generation_failure", "generation_rejection"]


def call(d, method: str, path: str, body=None):
    return d.api(method, path, body, KEY)


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def api_events(d, types: str) -> list[dict]:
    now = time.time()
    q = urllib.parse.urlencode({"events": types, "from": iso(now - 600), "to": iso(now + 600)})
    st, body = call(d, "GET", "/api/v1/events/message?" + q)
    assert st == 200, body
    return body["results"]


def of_type(events, kind: str) -> dict[str, dict]:
    return {e["raw_rcpt_to"]: e for e in events if e["type"] == kind}


def test_policy_rejections_are_durable_and_reach_log_api_and_webhook(make_daemon):
    r = Receiver()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        suppression={"smtp_action": "refuse", "max_size": 16 * 1024 * 1024},
                        webhooks={"poll_interval": 0.1},
                        webhook=[{"name": "refusals", "target": r.url, "events": REFUSALS}])
        st, body = call(d, "PUT", "/api/v1/suppression-list/refused@example.net",
                        {"type": "non_transactional"})
        assert st == 200, body
        with d.session() as c:
            assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
            code, lines = c.cmd("RCPT TO:<Refused@Example.net>")
            assert (code, lines[0]) == (550, "5.7.1 Recipient address was suppressed due to "
                                             "customer policy")
            d.kill9()           # at once: the refusal the client saw must not be lost
        d.start()
        with d.session() as c:
            assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
            assert c.cmd("RCPT TO:<a@example.net>")[0] == 250
            assert c.cmd("RCPT TO:<b@example.net>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            code, lines = c.cmd("X-MSYS-API: {\"campaign_id\": \"spring\", \"options\": "
                                "{\"ip_pool\": \"nope\"}}\r\nFrom: News <news@example.org>\r\n"
                                "Subject: s\r\n\r\nbody\r\n.")
            assert (code, lines[0]) == (550, '5.7.1 Unknown ip_pool "nope" in X-MSYS-API')
        want = {"Refused@Example.net", "a@example.net", "b@example.net"}
        log = wait_until(lambda: (lambda x: x if set(x) == want else None)(
            of_type(d.events(), "policy_rejection")), 20, "the three policy rejections")
        sup = log["Refused@Example.net"]
        assert (sup["rcpt_to"], sup["msg_from"], sup["bounce_class"], sup["error_code"],
                sup["recv_method"], sup["remote_addr"]) == (
            "refused@example.net", SENDER, "25", "550", "esmtp", "127.0.0.1")
        assert sup["raw_reason"] == \
            "550 5.7.1 Recipient address was suppressed due to customer policy"
        assert len(sup["message_id"]) == 20 and sup["transmission_id"].isdigit()
        pool = log["a@example.net"]
        assert (pool["campaign_id"], pool["friendly_from"], pool["ip_pool"]) == \
            ("spring", "news@example.org", "default")
        assert pool["message_id"] == log["b@example.net"]["message_id"]   # one message
        assert pool["raw_reason"] == '550 5.7.1 Unknown ip_pool "nope" in X-MSYS-API'
        assert not [e for e in d.events() if e["type"] == "injection"]   # nothing spooled
        # the events store answers the events API with them ...
        got = wait_until(lambda: (lambda x: x if set(x) == want else None)(
            of_type(api_events(d, "policy_rejection"), "policy_rejection")), 20,
            "the events API")
        assert {k: e["event_id"] for k, e in got.items()} == \
            {k: e["event_id"] for k, e in log.items()}
        # ... and the webhook gets them under msys.message_event
        r.wait(lambda rr: want <= {e["raw_rcpt_to"] for e in rr.events()}, 30,
               "the webhook batch")
        elements = [el for h in r.batches() for el in h.json]
        assert all(list(el["msys"]) == ["message_event"] for el in elements)
    finally:
        r.close()


def test_generation_events_for_the_recipients_of_a_created_transmission(make_daemon):
    """A transmission created for some recipients: the others get generation_failure (a
    substitution broke the rendering) or generation_rejection (their data broke a rule),
    in the log, the events API and under msys.gen_event at a webhook; a recipient with
    no address gets none, and a transmission created for nobody makes no event."""
    r = Receiver()
    try:
        d = make_daemon(acceptors=1, shards=1, http={"api_keys": [KEY]},
                        webhooks={"poll_interval": 0.1},
                        webhook=[{"name": "gen", "target": r.url, "events": REFUSALS}])
        st, _, out = d.post({
            "campaign_id": "spring",
            "recipients": [{"address": "ok@example.net"},
                           {"address": "Broken@Example.net",
                            "substitution_data": {"n": "x\r\nBcc: evil@example.org"}},
                           {"address": "not an address"},
                           {"address": {"name": "nobody"}}],
            "content": {"from": SENDER, "subject": "Hi {{n}}", "text": "t"},
            "substitution_data": {"n": "there"}}, headers={"Authorization": KEY})
        assert st == 200, out
        res = out["results"]
        assert (res["total_accepted_recipients"], res["total_rejected_recipients"]) == (1, 3)
        tid = res["id"]
        want = {("generation_failure", "Broken@Example.net"),
                ("generation_rejection", "not an address")}
        log = wait_until(lambda: (lambda x: x if set(x) == want else None)(
            {(e["type"], e["raw_rcpt_to"]): e for e in d.events()
             if e["type"].startswith("generation")}), 20, "the generation events")
        gfl = log[("generation_failure", "Broken@Example.net")]
        assert (gfl["transmission_id"], gfl["campaign_id"], gfl["recv_method"],
                gfl["error_code"], gfl["friendly_from"]) == (tid, "spring", "rest", "554", SENDER)
        assert gfl["rcpt_subs"] == {"n": "x\r\nBcc: evil@example.org"}
        assert gfl["raw_reason"].startswith("554 5.3.3 [internal] Error while rendering")
        assert "content.subject" in gfl["raw_reason"]
        assert "bounce_class" not in gfl and "message_id" not in gfl
        grj = log[("generation_rejection", "not an address")]
        assert (grj["bounce_class"], grj["transmission_id"]) == ("25", tid)
        api = wait_until(lambda: (lambda x: x if len(x) == 2 else None)(
            api_events(d, "generation_failure,generation_rejection")), 20, "the events API")
        assert {e["event_id"] for e in api} == {e["event_id"] for e in log.values()}
        r.wait(lambda rr: len(rr.events()) >= 2, 30, "the webhook batch")
        elements = [el for h in r.batches() for el in h.json]
        assert sorted((list(el["msys"])[0], el["msys"]["gen_event"]["type"])
                      for el in elements) == [("gen_event", "generation_failure"),
                                              ("gen_event", "generation_rejection")]
        # created for nobody: a 422 and no event
        st, _, out = d.post({"recipients": [{"address": "bad address"}],
                             "content": {"from": SENDER, "subject": "s", "text": "t"}},
                            headers={"Authorization": KEY})
        assert st == 422, out
        time.sleep(1.0)
        assert not [e for e in d.events() if e["raw_rcpt_to"] == "bad address"]
        assert [e["raw_rcpt_to"] for e in d.events() if e["type"] == "injection"] == \
            ["ok@example.net"]
    finally:
        r.close()
