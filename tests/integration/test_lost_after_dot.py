"""A connection lost after the final dot of a message, before the server's reply: the
message may have been delivered (RFC 1047), so its recipients are deferred -- sent again
later, a duplicate rather than a loss -- and nothing says they bounced.

The real daemon, a real DNS server and an aiosmtpd receiver that takes two recipients
per transaction ("452 4.5.3 Too many recipients" for more, RFC 5321 4.5.3.1.10: the
daemon sends those in the next transaction on the same connection), refuses a full
mailbox with "452 4.2.2" (which the operator's response rule bounces), and cuts the
connection after the second transaction's message, never answering it.  The recipient
of that transaction was bounced with the full mailbox's rule and class (the rule that
fired for another recipient's RCPT reply was applied to every later failure of the job
whose reply was not an RCPT reply): a bounce event, a DSN saying it failed and, the
rule's class being a hard bounce, an entry in the suppression list, for a message its
server may well have taken.
"""
from __future__ import annotations

from daemon import wait_until
from mxlab import IPS, mx
from sinks import AioSink, _Handler
from test_delivery import message, parse_dsn

IP_A, IP_B = IPS[0], IPS[1]
FULL = "452 4.2.2 Mailbox full"
BAD = "550 5.1.1 No such user"
RULES = [{"name": "full-is-gone", "code": 452, "enhanced": "4.2.2", "stages": ["rcpt"],
          "action": "bounce", "bounce_class": "10"}]


class _CutAfterDot(_Handler):
    """Two recipients a transaction; full@ and bad@ refused; the message of transaction
    number *cut* received (its recipients kept in ``cut``) and its connection aborted
    before the reply."""

    def __init__(self, sink: AioSink, cut: int):
        super().__init__(sink)
        self.at = cut
        self.n = 0
        self.cut: list = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("full@"):
            return FULL
        if address.startswith("bad@"):
            return BAD
        if len(envelope.rcpt_tos) >= 2:
            return "452 4.5.3 Too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        if self.n == self.at:
            self.cut.append(list(envelope.rcpt_tos))
            server.transport.abort()
            return "250 2.0.0 never said"
        return await super().handle_DATA(server, session, envelope)


def cutting_sink(lab, cut: int) -> tuple[AioSink, _CutAfterDot]:
    dest = AioSink(IP_A, lab.port)
    handler = dest.ctl.handler = _CutAfterDot(dest, cut)
    lab.sinks.append(dest)
    dest.start()
    return dest, handler


def test_a_recipient_whose_reply_was_lost_after_the_dot_is_deferred_not_bounced(lab):
    dest, handler = cutting_sink(lab, 2)
    sender_mx = lab.aio(IP_B)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B))
    d = lab.daemon(retry_schedule=[3600.0], retry_jitter=0.0,
                   sections={"response_rule": RULES})
    rcpts = ["ann@dest.test", "full@dest.test", "bob@dest.test", "cat@dest.test"]
    qid = d.send("alice@sender.test", rcpts, message("lost after the dot"))
    wait_until(lambda: sender_mx.received() >= 1, 20, "the DSN at the sender's MX")

    [t] = dest.snapshot()
    assert t.rcpt_tos == ["ann@dest.test", "bob@dest.test"]
    assert handler.cut == [["cat@dest.test"]]      # sent; its server said nothing of it
    def ended():
        return {e["raw_rcpt_to"]: e for e in d.events()
                if e["queue_id"] == qid and e["type"] in ("delivery", "bounce")}
    wait_until(lambda: len(ended()) >= 3, 15, "the three terminal events")
    ev = ended()
    assert {r: e["type"] for r, e in ev.items()} == {
        "ann@dest.test": "delivery", "full@dest.test": "bounce", "bob@dest.test": "delivery"}
    full = ev["full@dest.test"]
    assert full["bounce_class"] == "10" and full["raw_reason"].startswith(FULL), full
    # cat: deferred, an attempt counted, due again by the retry schedule
    delays = [e for e in d.events() if e["type"] == "delay" and e["queue_id"] == qid]
    assert [e["raw_rcpt_to"] for e in delays] == ["cat@dest.test"], delays
    assert delays[0]["raw_reason"].startswith("451 4.4.2 "), delays[0]
    assert not [e for e in d.events() if e["type"] == "bounce"
                and e["raw_rcpt_to"] == "cat@dest.test"]
    [entry] = d.queue_list()
    states = {s["address"]: s for s in entry["recipient_state"]}
    assert states["cat@dest.test"]["state"] == "pending", states
    assert states["cat@dest.test"]["attempts"] == 1, states
    # The DSN names the full mailbox alone.
    [b] = sender_mx.snapshot()
    _, _, per_rcpt = parse_dsn(b.data)
    assert [r["Final-Recipient"] for r in per_rcpt] == ["rfc822; full@dest.test"]
    assert "cat@dest.test" not in b.data.decode()
    # Only the full mailbox went on the suppression list (the rule's class 10 is a hard
    # bounce): cat's next mail is not refused at injection.

    def suppressed():
        status, body = d.api("GET", "/api/v1/suppression-list?domain=dest.test")
        assert status == 200, body
        return sorted(e["recipient"] for e in body["results"]) or None
    assert wait_until(suppressed, 10, "the full mailbox suppressed") == ["full@dest.test"]


def test_a_recipient_refused_before_a_connection_lost_after_the_dot_is_bounced(lab):
    """One transaction: ann accepted, bad refused "550 5.1.1", the connection lost after
    the message.  ann is deferred (possibly delivered); the server's 550 for bad stands
    -- it was deferred with ann's lost connection, got a delay event instead of its
    bounce, and came back to be refused again (or, past max_age, expired as a 4.4.7 with
    no hard bounce class, so not suppressed)."""
    dest, handler = cutting_sink(lab, 1)
    sender_mx = lab.aio(IP_B)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B))
    d = lab.daemon(retry_schedule=[3600.0], retry_jitter=0.0)
    qid = d.send("alice@sender.test", ["ann@dest.test", "bad@dest.test"],
                 message("refused, then lost"))
    wait_until(lambda: [e for e in d.events() if e["queue_id"] == qid
                        and e["type"] in ("delay", "bounce")], 20, "the outcome's events")
    assert handler.cut == [["ann@dest.test"]] and dest.snapshot() == []
    wait_until(lambda: sender_mx.received() >= 1, 20, "the DSN at the sender's MX")
    ev = {e["raw_rcpt_to"]: e for e in d.events()
          if e["queue_id"] == qid and e["type"] in ("delay", "bounce")}
    assert {r: e["type"] for r, e in ev.items()} == {"ann@dest.test": "delay",
                                                     "bad@dest.test": "bounce"}, ev
    assert ev["bad@dest.test"]["raw_reason"].startswith(BAD), ev
    assert ev["bad@dest.test"]["bounce_class"] == "10", ev
    assert ev["ann@dest.test"]["raw_reason"].startswith("451 4.4.2 "), ev
    [entry] = d.queue_list()
    states = {s["address"]: s for s in entry["recipient_state"]}
    assert states["ann@dest.test"]["state"] == "pending", states
    assert states["ann@dest.test"]["attempts"] == 1, states
    assert states["bad@dest.test"]["state"] != "pending", states
    [b] = sender_mx.snapshot()
    _, _, per_rcpt = parse_dsn(b.data)
    assert [(r["Final-Recipient"], r["Status"]) for r in per_rcpt] == [
        ("rfc822; bad@dest.test", "5.1.1")]
