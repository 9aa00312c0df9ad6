"""An upgrade in place: this version's ``mta serve`` starts on a state directory an older
version wrote, with mail queued, and nothing is lost, sent twice or forgotten.

The state is a checked-in fixture (tests/integration/fixtures/README.md says which commit
made it and how): tests/qa/upgrade_check.py ran that commit's daemon, gave it an HTTP
transmission (campaign "upgrade", metadata tier=gold) whose recipients were delivered
(ok-h@), deferred by the receiver's 451 (later-h@, later-h2@), refused 550 (unknown-h@:
a bounce, and a Bounce Rule suppression entry) or suppressed (blocked@), an SMTP message
half delivered (ok-s@) and half deferred (later-s@), one deferred whole (later-s2@), a
transmission scheduled for later (sched@), two suppression entries made through the API
(blocked@a.test, and user@bücher.test, whose stored form the list has changed since), and
a webhook made through the API; then stopped it with SIGTERM.  That commit predates record
format 2, the batches' commit records, the suppression index's source octet and the
webhooks' store ids (see the README).

Started on it (same shard count), this version must deliver each queued recipient once
and no delivered one again, answer the events API for the old events, keep suppressing
the old list's entries, keep the webhook and push the new events to it, and log no
traceback.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import tarfile
import time
import urllib.parse

from daemon import HOST, free_port, wait_until
from sinks import AioSink

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "webhooks"))
from receiver import Receiver  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "upgrade-ab8aacf.tar.gz")
KEY = "upgrade-key"
DELIVERED_BEFORE = ["ok-h@a.test", "ok-s@a.test"]
QUEUED = ["later-h@a.test", "later-h2@b.test", "later-s@a.test", "later-s2@c.test",
          "sched@a.test"]
SUPPRESSED = ["blocked@a.test", "unknown-h@a.test", "user@bücher.test"]


def iso(t: float) -> str:
    return urllib.parse.quote(time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t)))


def test_a_state_directory_of_an_older_version(make_daemon, tmp_path):
    base = tmp_path / "d"
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(base)      # (our own fixture: names inside base only)
    manifest = json.loads((base / "manifest.json").read_text())
    tid, wid = manifest["transmission_id"], manifest["webhook_id"]
    sink = AioSink(HOST, free_port()).start()
    rec = Receiver()
    try:
        d = make_daemon(
            subdir="d", start=False, acceptors=1, shards=2,     # the fixture's shard count
            http={"api_keys": [KEY]},
            webhooks={"poll_interval": 0.1},
            # the fixture's mail and events must neither expire nor be pruned however
            # old the fixture is (events: the longest retention there is, a year)
            events={"retention": 366 * 86400.0},
            delivery={"hold": True, "max_age": 100 * 365 * 86400.0,
                      "nameservers": ["127.0.0.1:9"],
                      "route": [{"domain": "*", "starttls": "none",
                                 "hosts": [f"{HOST}:{sink.port}"]}]})
        d.start()
        # the queue the old version left, as this version reads it
        # (five messages, six recipients: ok-s@'s message has later-s@ left; the four
        # later-* deferred, sched@ never tried)
        total = d.queue_summary()["total"]
        assert (total["messages"], total["recipients"], total["pending"],
                total["deferred"]) == (5, 6, 5, 4), total
        # the webhook made through the old API, pointed at this test's receiver
        st, body = d.api("GET", f"/api/v1/webhooks/{wid}", key=KEY)
        assert st == 200 and body["results"]["name"] == "crm", (st, body)
        st, body = d.api("PUT", f"/api/v1/webhooks/{wid}", {"target": rec.url}, KEY)
        assert st == 200, (st, body)
        d.reload(delivery={"hold": False})

        wait_until(lambda: set(QUEUED) <= {r for _, r, _ in sink.deliveries()}, 60,
                   "the queued recipients at the receiver", details=lambda: d.log()[-3000:])
        wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 30, "an empty queue")
        got = collections.Counter(r for _, r, _ in sink.deliveries())
        for r in QUEUED:
            assert got[r] == 1, (r, got)
        for r in DELIVERED_BEFORE + SUPPRESSED:
            assert got[r] == 0, (r, got)

        # the events API: the old events, and the new deliveries with the old message's
        # campaign and metadata
        path = (f"/api/v1/events/message?transmissions={tid}"
                f"&from={iso(manifest['made'] - 3600)}&to={iso(time.time() + 3600)}")

        def events():
            st, body = d.api("GET", path, key=KEY)
            assert st == 200, (st, body)
            evs = body["results"]
            return evs if {e["rcpt_to"] for e in evs if e["type"] == "delivery"} >= \
                {"later-h@a.test", "later-h2@b.test"} else None
        evs = wait_until(events, 30, "the new deliveries in the events API")
        kinds = collections.Counter((e["type"], e["rcpt_to"]) for e in evs)
        assert kinds[("delivery", "ok-h@a.test")] == 1, kinds       # an old event
        assert kinds[("delay", "later-h@a.test")] >= 1, kinds       # an old event
        assert kinds[("bounce", "unknown-h@a.test")] == 1, kinds    # an old event
        assert kinds[("delivery", "later-h@a.test")] == 1, kinds    # a new one
        for e in evs:
            assert e["campaign_id"] == "upgrade" and e["rcpt_meta"] == {"tier": "gold"}, e

        # the webhook gets the new events
        rec.wait(lambda r: {e["rcpt_to"] for e in r.events() if e["type"] == "delivery"}
                 >= set(QUEUED), 30, "the new deliveries at the webhook")

        # the old list's entries (made through the API, by a bounce rule, and one in
        # U-labels) still suppress, and searches by source still find them
        st, _, body = d.post({"recipients": [{"address": a} for a in SUPPRESSED],
                              "content": {"from": "news@sender.test", "subject": "again",
                                          "text": "again"}},
                             headers={"Authorization": KEY})
        assert st == 200, body
        tid2 = body["results"]["id"]
        wait_until(lambda: {e["rcpt_to"] for e in d.events() if e["type"] == "bounce"
                            and e.get("transmission_id") == tid2} == set(SUPPRESSED), 30,
                   "the suppressed recipients' bounces")
        assert all(e["bounce_class"] == "25" for e in d.events()
                   if e.get("transmission_id") == tid2 and e["type"] == "bounce")
        for source, who in (("Manually Added", "blocked@a.test"),
                            ("Bounce Rule", "unknown-h@a.test")):
            st, body = d.api("GET", "/api/v1/suppression-list?sources="
                             + urllib.parse.quote(source), key=KEY)
            assert st == 200 and who in {x["recipient"] for x in body["results"]}, body
        time.sleep(0.5)     # pacing only: a leak would have reached the receiver by now
        got = collections.Counter(r for _, r, _ in sink.deliveries())
        assert not any(got[r] for r in SUPPRESSED), got

        assert d.stop() == 0
        assert "Traceback" not in d.log(), d.log()[-4000:]
    finally:
        sink.stop()
        rec.close()


def test_a_config_with_keys_renamed_since_starts_and_says_so(make_daemon):
    # [delivery] connections_per_domain and messages_per_connection (before 556bb7e): the
    # daemon refused to start on the file of a node set up before the rename
    d = make_daemon(delivery={"connections_per_domain": 3, "messages_per_connection": 50})
    log = d.log()
    assert "config: delivery.connections_per_domain is now delivery.connection_limit" \
        in log, log
    assert "delivery.messages_per_connection is now delivery.max_deliveries_per_connection" \
        in log, log
    out = d.cli("check-config").stdout.decode()
    assert "note: delivery.connections_per_domain is now delivery.connection_limit" in out
    doc = json.loads(d.cli("check-config", "--json").stdout)
    assert len(doc["notes"]) == 2, doc
    d.reload()
    assert d.log().count("config: delivery.connections_per_domain is now") == 2
    assert d.stop() == 0
    assert "Traceback" not in d.log()


def test_a_banner_with_a_tab_starts_and_is_sent(make_daemon):
    # every version before d55edbb took it (RFC 5321's reply text may hold HT); the check
    # that came then refused it and the daemon did not start
    d = make_daemon(smtp={"banner": "ESMTP\tready"})
    with d.connect() as c:
        assert c.banner == (220, ["mta.test ESMTP\tready"]), c.banner


def test_a_host_name_with_its_final_dot_starts_and_is_sent_without_it(make_daemon):
    # every version before d55edbb took 'mx.example.com.' (and sent it so); the check that
    # came then refused it and the daemon did not start
    d = make_daemon(server={"hostname": "mx.example.com."})
    with d.connect() as c:
        assert c.banner == (220, ["mx.example.com ESMTP"]), c.banner
    assert "config: server.hostname 'mx.example.com.' is sent as 'mx.example.com'" \
        in d.log()
