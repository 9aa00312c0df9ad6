"""The SparkPost message-event shape (mta.events.shape), and a real consumer reading it.

django-anymail's SparkPost webhook parser is what many Django senders run: it must read
our events, wrapped as a webhook batch, with the right type, recipient, ids and reason.
"""
from __future__ import annotations

import json
import time

from mta.events import shape
from mta.events.shape import (canonical_reason, event_id, event_ids, sparkpost_event,
                              sparkpost_events)

T0 = 1_700_000_000.25
QID = "018C1A2B3C4D5E6F7A8B"

BASE = {"timestamp": T0 + 2.5, "arrival": T0, "queue_id": QID, "message_id": "<m1@x.test>",
        "sender": "bounces@sender.test", "size": 2911, "client": "client.test [127.0.0.1]"}


def internal(**kw) -> dict:
    return {**BASE, **kw}


def test_injection_is_one_event_per_recipient_with_string_numbers():
    inj = {**BASE, "type": "injection", "timestamp": T0, "rcpts": ["Ann@Dest.TEST", "bob@x.test"],
           "campaign_id": "spring", "metadata": {"k": "v"}, "tags": ["t"], "ip_pool": "mkt",
           "transactional": True}
    evs = sparkpost_events(inj, event_ids(0, 1, 64))
    assert [e["event_id"] for e in evs] == [event_id(0, 1, 64, i) for i in range(2)]
    assert [e["raw_rcpt_to"] for e in evs] == ["Ann@Dest.TEST", "bob@x.test"]
    a = evs[0]
    assert a["type"] == "injection" and a["rcpt_to"] == "ann@dest.test"
    assert a["recipient_domain"] == a["routing_domain"] == "dest.test"
    assert a["timestamp"] == str(int(T0)) and a["event_time"] == "%.3f" % T0
    assert a["injection_time"] == "2023-11-14T22:13:20.250Z"
    assert a["message_id"] == QID.lower() and a["queue_id"] == QID
    assert a["transmission_id"] == str(int(QID, 16))          # SMTP: numeric, from the qid
    assert a["message_id_header"] == "<m1@x.test>" and a["msg_from"] == "bounces@sender.test"
    assert (a["rcpt_meta"], a["rcpt_tags"], a["campaign_id"]) == ({"k": "v"}, ["t"], "spring")
    assert (a["ip_pool"], a["transactional"], a["msg_size"]) == ("mkt", "1", "2911")
    assert a["recv_method"] == "esmtp"
    for k in ("num_retries", "bounce_class", "error_code", "raw_reason", "delv_method"):
        assert k not in a
    assert evs[0]["event_id"] != evs[1]["event_id"]
    assert "friendly_from" not in a and "subject" not in a     # none carried: none shown
    http = sparkpost_event(internal(type="injection", recipient="c@x.test",
                                    client="http [127.0.0.1]", transmission_id="7001"),
                           event_id="1")
    assert (http["recv_method"], http["transmission_id"]) == ("rest", "7001")
    assert (http["ip_pool"], http["transactional"], http["rcpt_meta"]) == ("default", "0", {})


def test_delivery_delay_and_bounce_fields():
    reply = {"code": 250, "enhanced": "2.0.0", "text": "ok queued"}
    d = sparkpost_event(internal(type="delivery", recipient="a@x.test", attempt=1,
                                 response=reply, remote_ip="192.0.2.7", remote_host="mx.x.test",
                                 source="ip-2", sending_ip="127.0.0.2", site="mx.x.test"),
                        event_id="9")
    assert (d["type"], d["num_retries"], d["queue_time"]) == ("delivery", "0", "2500")
    assert (d["ip_address"], d["sending_ip"], d["delv_method"]) == \
        ("192.0.2.7", "127.0.0.2", "esmtp")
    assert (d["egress_source"], d["site"], d["remote_host"]) == ("ip-2", "mx.x.test", "mx.x.test")
    assert d["error_code"] == "250" and d["raw_reason"] == "250 2.0.0 ok queued"
    assert "bounce_class" not in d and "reason" not in d
    y = sparkpost_event(internal(type="delay", recipient="a@x.test", attempt=3,
                                 response={"code": 451, "enhanced": "4.7.1", "text": "later"},
                                 bounce_class=70, bounce_rule="enh-4-transient",
                                 next_attempt=T0 + 60.125), event_id="10")
    assert (y["type"], y["bounce_class"], y["error_code"], y["num_retries"]) == \
        ("delay", "70", "451", "2")
    assert y["next_attempt"] == "%.3f" % (T0 + 60.125) and y["bounce_rule"] == "enh-4-transient"
    b = sparkpost_event(internal(type="bounce", recipient="a@x.test", attempt=1,
                                 response={"code": 550, "enhanced": "5.1.1",
                                           "text": "<a@x.test>: no such user at 192.0.2.7"},
                                 bounce_class=10, bounce_rule="r"), event_id="11")
    assert (b["type"], b["bounce_class"], b["error_code"]) == ("bounce", "10", "550")
    assert b["raw_reason"] == "550 5.1.1 <a@x.test>: no such user at 192.0.2.7"
    assert b["reason"] == "550 5.1.1 <...@...>: no such user at a.b.c.d"
    # every scalar is a string, as SparkPost sends them
    for e in (d, y, b):
        assert all(isinstance(v, (str, dict, list)) for v in e.values()), e


def test_expiry_is_a_class_24_bounce_naming_the_expiry():
    last = {"code": 421, "enhanced": "4.7.28", "text": "rate limited"}
    e = sparkpost_event(internal(type="expiration", recipient="a@x.test", attempt=4,
                                 response=last, bounce_class=70, bounce_rule="temp-rate"),
                        event_id="12")
    assert (e["type"], e["bounce_class"], e["error_code"]) == ("bounce", "24", "554")
    assert e["raw_reason"] == ("554 5.4.7 [internal] message expired: too long in the queue "
                               "(4 attempt(s); last reply: 421 4.7.28 rate limited)")
    assert e["num_retries"] == "4"          # all four attempts failed
    assert (e["bounce_rule"], e["last_bounce_class"], e["last_bounce_rule"]) == \
        ("expired", "70", "temp-rate")
    held = sparkpost_event(internal(type="expiration", recipient="a@x.test", attempt=0),
                           event_id="13")
    assert held["raw_reason"] == "554 5.4.7 [internal] message expired: too long in the queue"
    assert held["num_retries"] == "0" and "last_bounce_class" not in held


def test_suppressed_recipient_bounce():
    e = sparkpost_event(internal(type="bounce", recipient="S@x.test", attempt=0,
                                 bounce_class="25", suppressed=True,
                                 response={"code": 554, "enhanced": "5.7.1",
                                           "text": "recipient address was suppressed due to "
                                                   "customer policy"}), event_id="14")
    assert (e["bounce_class"], e["error_code"], e["suppressed"]) == ("25", "554", "1")
    assert e["reason"] == "554 5.7.1 recipient address was suppressed due to customer policy"
    assert "delv_method" not in e and e["num_retries"] == "0"


def test_reason_is_bounded_and_event_ids_are_unique_and_stable():
    assert len(canonical_reason("x" * 5000)) == 200
    ids = {event_id(s, g, o, i) for s in (0, 1, 255) for g in (1, 2, 10**6)
           for o in (0, 17, 2**32 - 1) for i in (0, 1, 2**32 - 1)}
    assert len(ids) == 3 * 3 * 3 * 3
    assert event_id(3, 7, 4096, 2) == event_id(3, 7, 4096, 2)
    assert all(i.isdigit() for i in ids)


def test_django_anymail_reads_our_events():
    import django     # django-anymail (a test extra) brings it
    from django.conf import settings
    if not settings.configured:
        settings.configure(ANYMAIL={"WEBHOOK_SECRET": "user:pass"}, USE_TZ=True)
        django.setup()
    from anymail.signals import EventType, RejectReason
    from anymail.webhooks.sparkpost import SparkPostTrackingWebhookView

    reply = {"code": 550, "enhanced": "5.1.1", "text": "no such user"}
    evs = [
        sparkpost_event(internal(type="injection", recipient="Ann@X.test", transmission_id="77",
                                 campaign_id="spring", metadata={"k": "v"}), event_id="1"),
        sparkpost_event(internal(type="delivery", recipient="Ann@X.test", transmission_id="77",
                                 attempt=1, response={"code": 250, "enhanced": "",
                                                      "text": "ok"}), event_id="2"),
        sparkpost_event(internal(type="bounce", recipient="Bob@X.test", transmission_id="77",
                                 attempt=1, response=reply, bounce_class=10), event_id="3"),
        sparkpost_event(internal(type="delay", recipient="Cy@X.test", transmission_id="77",
                                 attempt=1, response={"code": 451, "enhanced": "4.7.1",
                                                      "text": "later"}, bounce_class=70),
                        event_id="4"),
        sparkpost_event(internal(type="expiration", recipient="Di@X.test", attempt=3,
                                 transmission_id="77"), event_id="5"),
    ]

    class Request:
        body = json.dumps([{"msys": {"message_event": e}} for e in evs]).encode()

    got = SparkPostTrackingWebhookView().parse_events(Request())
    assert [g.event_type for g in got] == [EventType.QUEUED, EventType.DELIVERED,
                                           EventType.BOUNCED, EventType.DEFERRED,
                                           EventType.BOUNCED]
    assert [g.recipient for g in got] == ["Ann@X.test", "Ann@X.test", "Bob@X.test", "Cy@X.test",
                                          "Di@X.test"]
    assert {g.message_id for g in got} == {"77"}          # anymail's message id: transmission
    assert [g.event_id for g in got] == ["1", "2", "3", "4", "5"]
    assert got[0].tags == ["spring"] and got[0].metadata == {"k": "v"}
    assert got[2].reject_reason == RejectReason.INVALID
    assert got[2].mta_response == "550 5.1.1 no such user"
    assert got[4].reject_reason == RejectReason.TIMED_OUT
    assert "message expired" in got[4].mta_response
    assert int(got[1].timestamp.timestamp()) == int(T0 + 2.5)


def test_a_reports_event_is_carried_whole_and_gets_its_event_id():
    """out_of_band / spam_complaint: shaped by the acceptor (mta.feedback.oob); the events
    process only numbers them."""
    made = {"type": "out_of_band", "timestamp": "1700000002", "rcpt_to": "gone@x.test",
            "bounce_class": "10", "transmission_id": "77", "matched": "1"}
    out = sparkpost_event({"type": "out_of_band", "timestamp": T0, "event": made},
                          event_id=event_id(1, 2, 3, 4))
    assert out == {**made, "event_id": event_id(1, 2, 3, 4)}
    spam = sparkpost_event({"type": "spam_complaint", "timestamp": T0, "event": {}},
                           event_id="9")
    assert spam == {"type": "spam_complaint", "event_id": "9", "timestamp": str(int(T0))}
    # (an entry that is not an injection is one event)
    assert sparkpost_events({"type": "spam_complaint", "timestamp": T0, "event": {}},
                            iter(["9"])) == [spam]
    # its reason is canonicalised like an in-band bounce's (a DSN quotes addresses, IPs)
    raw = "550 5.1.1 <gone@x.test>: host 192.0.2.7 said: no such user"
    out = sparkpost_event({"type": "out_of_band", "timestamp": T0,
                           "event": dict(made, raw_reason=raw, reason=raw)}, event_id="10")
    assert out["raw_reason"] == raw
    assert out["reason"] == "550 5.1.1 <...@...>: host a.b.c.d said: no such user"


def test_friendly_from_and_subject_come_from_the_message_params():
    """Read once at injection and carried (mta.obs.events.CARRIED): every event shows them."""
    fields = {"friendly_from": "News@Example.ORG", "subject": "Caf\u00e9 deals"}
    reply = {"code": 250, "enhanced": "2.0.0", "text": "ok"}
    for kind in ("injection", "delivery", "delay", "bounce", "expiration"):
        e = sparkpost_event(internal(type=kind, recipient="a@x.test", attempt=1,
                                     response=reply, **fields), event_id="1")
        assert (e["friendly_from"], e["subject"]) == ("News@Example.ORG", "Caf\u00e9 deals"), kind


REFUSED = {"code": 550, "enhanced": "5.7.1",
           "text": "Recipient address was suppressed due to customer policy"}


def test_refusals_have_the_fields_sparkpost_lists_for_them():
    pol = sparkpost_event(internal(type="policy_rejection", recipient="Sup@X.test",
                                   response=REFUSED, bounce_class="25", remote_addr="192.0.2.9",
                                   timestamp=T0, arrival=T0, campaign_id="spring",
                                   friendly_from="news@example.org", subject="s"),
                          event_id="21")
    assert (pol["type"], pol["rcpt_to"], pol["raw_rcpt_to"]) == \
        ("policy_rejection", "sup@x.test", "Sup@X.test")
    assert (pol["bounce_class"], pol["error_code"], pol["remote_addr"]) == \
        ("25", "550", "192.0.2.9")
    assert pol["raw_reason"] == pol["reason"] == \
        "550 5.7.1 Recipient address was suppressed due to customer policy"
    assert (pol["message_id"], pol["msg_from"], pol["recv_method"], pol["campaign_id"],
            pol["friendly_from"]) == (QID.lower(), "bounces@sender.test", "esmtp", "spring",
                                      "news@example.org")
    assert pol["injection_time"] == "2023-11-14T22:13:20.250Z"
    for k in ("msg_size", "subject", "routing_domain", "num_retries", "delv_method"):
        assert k not in pol, k
    render = {"code": 554, "enhanced": "5.3.3",
              "text": "[internal] Error while rendering content.subject: a line break"}
    gen = dict(type="generation_failure", recipient="Gen@X.test", queue_id="", message_id="",
               client="http [127.0.0.1]", transmission_id="88", response=render,
               rcpt_subs={"name": "x\n"}, subject="hello", friendly_from="shop@example.org")
    gfl = sparkpost_event(internal(**gen), event_id="22")
    assert (gfl["error_code"], gfl["recv_method"], gfl["transmission_id"], gfl["rcpt_subs"]) == \
        ("554", "rest", "88", {"name": "x\n"})
    assert gfl["raw_reason"].startswith("554 5.3.3 [internal] Error while rendering")
    for k in ("bounce_class", "message_id", "injection_time", "msg_from", "msg_size",
              "subject", "queue_id", "remote_addr"):
        assert k not in gfl, k
    grj = sparkpost_event(internal(**{**gen, "type": "generation_rejection",
                                      "bounce_class": "25"}), event_id="23")
    assert (grj["bounce_class"], grj["subject"], grj["routing_domain"]) == \
        ("25", "hello", "x.test")
    assert all(isinstance(v, (str, dict, list)) for e in (pol, gfl, grj) for v in e.values())


def test_django_anymail_reads_our_refusals_in_their_webhook_categories():
    """policy_rejection under msys.message_event, generation_* under msys.gen_event (as the
    webhooks process wraps them), read by anymail as rejected / failed."""
    import django
    from django.conf import settings
    if not settings.configured:
        settings.configure(ANYMAIL={"WEBHOOK_SECRET": "user:pass"}, USE_TZ=True)
        django.setup()
    from anymail.signals import EventType, RejectReason
    from anymail.webhooks.sparkpost import SparkPostTrackingWebhookView

    from mta.api.webhook_docs import element

    evs = [sparkpost_event(internal(type="policy_rejection", recipient="Sup@X.test",
                                    response=REFUSED, bounce_class="25"), event_id="31"),
           sparkpost_event(internal(type="generation_failure", recipient="Gen@X.test",
                                    transmission_id="88", response={"code": 554}),
                           event_id="32"),
           sparkpost_event(internal(type="generation_rejection", recipient="Rej@X.test",
                                    transmission_id="88", response={"code": 554},
                                    bounce_class="25"), event_id="33")]
    batch = [element(e) for e in evs]
    assert [list(b["msys"]) for b in batch] == [["message_event"], ["gen_event"],
                                                ["gen_event"]]

    class Request:
        body = json.dumps(batch).encode()

    got = SparkPostTrackingWebhookView().parse_events(Request())
    assert [(g.event_type, g.recipient, g.event_id) for g in got] == [
        (EventType.REJECTED, "Sup@X.test", "31"), (EventType.FAILED, "Gen@X.test", "32"),
        (EventType.REJECTED, "Rej@X.test", "33")]
    assert got[0].reject_reason == RejectReason.BLOCKED
    assert got[0].mta_response.startswith("550 5.7.1")
    assert got[1].message_id == got[2].message_id == "88"


def test_iso_keeps_one_second_and_agrees_with_strftime_in_any_order():
    def direct(ts):
        ms = int(round(ts * 1000))
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + \
            ".%03dZ" % (ms % 1000)
    base = 1764790000.0
    # Within a second, across its end (rounding up into the next), backwards, far apart.
    times = [base + 0.001, base + 0.5, base + 0.9994, base + 0.9996, base + 1.2, base + 0.3,
             base - 86400 * 365.25, base + 0.3, 0.0, 4102444799.9999, base + 0.4]
    assert [shape.iso(t) for t in times] == [direct(t) for t in times]
    assert shape.iso(base + 0.9996) == "2025-12-03T19:26:41.000Z"
