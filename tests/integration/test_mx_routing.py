"""How delivery finds the receiving servers (RFC 5321 §5.1), end to end.

Each test starts a lab (tests/integration/mxlab.py): unbound on loopback serving
the test zones, receivers on 127.0.0.x, and ``mta serve`` resolving only through
that unbound.  What is checked is what a sender and a receiver see: which
server got the mail, and the DSN a bounce sends back.
"""
from __future__ import annotations

import re
import time

from daemon import wait_until
from mxlab import IPS, mx
from test_delivery import parse_dsn

IP_A, IP_B, IP_C, IP_D, IP_E, IP_F = IPS


def message(subject: str) -> bytes:
    mid = f"<{subject.replace(' ', '-')}.{time.monotonic_ns()}@client.test>"
    return (f"From: Alice <alice@sender.test>\r\nTo: someone\r\nSubject: {subject}\r\n"
            f"Message-ID: {mid}\r\n\r\nhello\r\n").encode()


def wait_queue_empty(d, timeout=20.0):
    wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, timeout, "the queue to empty",
               interval=0.2)


def test_equal_preference_mx_hosts_share_the_connections(lab):
    """Two MX hosts of one preference: each new connection picks one of them at random
    (RFC 5321 §5.1), not the first of one shuffled list for as long as the site is known."""
    a, b = lab.aio(IP_A), lab.aio(IP_B)
    lab.serve(mx("pair.test", "mx1.pair.test", IP_A, 10)
              + mx("pair.test", "mx2.pair.test", IP_B, 10))
    # one message a connection: every message opens its own
    d = lab.daemon(max_deliveries_per_connection=1)
    n = 24
    for i in range(n):
        d.send("alice@sender.test", [f"r{i}@pair.test"], message(f"pair {i}"))
    wait_until(lambda: a.received() + b.received() == n, 30, "every message delivered")
    wait_queue_empty(d)
    # 2 * 2**-24 chance of a false failure
    assert a.received() > 0 and b.received() > 0, (a.received(), b.received())


def dsn_statuses(sink) -> dict:
    """{recipient: its per-recipient DSN fields} of every DSN *sink* received."""
    out = {}
    for t in sink.snapshot():
        assert t.mail_from == "" and t.rcpt_tos == ["alice@sender.test"]
        for r in parse_dsn(t.data)[2]:
            out[r["Final-Recipient"].split(";", 1)[1].strip()] = r
    return out


def test_an_mx_that_is_this_mta_bounces_instead_of_looping(lab):
    """The domain's only MX host is this MTA itself (its address and port are one of our
    SMTP listeners): like Postfix, the mail bounces "loops back to myself" (5.4.6) at
    once, instead of being accepted from ourselves and sent round again and again."""
    sender_mx = lab.aio(IP_B)
    lab.serve(mx("loop.test", "mx.loop.test", IP_E) + mx("sender.test", "mx.sender.test", IP_B))
    d = lab.daemon(start=False)
    d.sections["smtp"]["listen"].append(f"{IP_E}:{lab.port}")   # MX host = ourselves
    d.write_config()
    d.start()
    qid = d.send("alice@sender.test", ["lou@loop.test"], message("loop"))
    wait_until(lambda: sender_mx.received() >= 1, 20, "the DSN at the sender's MX")
    r = dsn_statuses(sender_mx)["lou@loop.test"]
    assert r["Action"] == "failed" and r["Status"] == "5.4.6", r
    assert "loops back to myself" in r["Diagnostic-Code"], r
    # the message went nowhere: the only other message accepted is the DSN (its event
    # may come a little after the DSN itself)
    def others():
        return [e.get("client", "") for e in d.events()
                if e["type"] == "injection" and e["queue_id"] != qid]
    wait_until(others, 15, "the DSN's injection event")
    wait_queue_empty(d)
    assert others() == [f"bounce of {qid}"], others()


def test_a_backup_mx_that_is_this_mta_sends_only_to_the_better_ones(lab):
    """We are MX 20 of the domain: the mail goes to MX 10, and when MX 10 is down it
    waits (deferred) -- never to ourselves or to MX 30 (RFC 5321 §5.1)."""
    worse = lab.aio(IP_C)
    lab.serve(mx("backup.test", "mx1.backup.test", IP_A, 10)
              + mx("backup.test", "mx2.backup.test", IP_E, 20)
              + mx("backup.test", "mx3.backup.test", IP_C, 30))
    # retries every 0.3 s (300 s scaled by 0.001)
    d = lab.daemon(start=False, retry_schedule=[300.0], time_scale=0.001, retry_jitter=0.0)
    d.sections["smtp"]["listen"].append(f"{IP_E}:{lab.port}")   # MX 20 = ourselves
    d.write_config()
    d.start()
    qid = d.send("alice@sender.test", ["bea@backup.test"], message("backup"))
    wait_until(lambda: any(e["type"] == "delay" for e in d.events()), 20,
               "a delay event (MX 10 is down)")
    good = lab.aio(IP_A)
    wait_until(lambda: good.received() == 1, 30, "delivery to MX 10 once it is up")
    wait_queue_empty(d)
    assert worse.received() == 0
    delays = [e for e in d.events() if e["type"] == "delay"]
    assert delays and all("mx1.backup.test" in e["raw_reason"] for e in delays), delays
    # nothing came back to us
    assert [e["queue_id"] for e in d.events() if e["type"] == "injection"] == [qid]


def test_an_mx_record_naming_an_ip_address_is_not_used(lab):
    """``MX 10 127.0.0.12.`` is not a host name (RFC 5321 §5.1): like Postfix and Exim
    the record is ignored and the mail goes to the next MX, never to that address."""
    numeric, good = lab.aio(IP_C), lab.aio(IP_A)
    lab.serve([f"numeric.test. 300 IN MX 10 {IP_C}."]
              + mx("numeric.test", "mx2.numeric.test", IP_A, 20))
    d = lab.daemon()
    d.send("alice@sender.test", ["nic@numeric.test"], message("numeric mx"))
    wait_until(lambda: good.received() == 1, 20, "delivery to the MX with a name")
    wait_queue_empty(d)
    assert numeric.received() == 0 and numeric.connections == 0


def test_one_attempt_tries_a_bounded_number_of_mx_addresses(lab):
    """A domain whose MX host has 30 addresses, none answering: one attempt tries a few
    (as Postfix's smtp_mx_address_limit), so that an attempt costs a bounded number of
    connect timeouts -- the spool sends a job again when its outcome takes longer."""
    lab.serve(["many.test. 300 IN MX 10 mx.many.test."]
              + [f"mx.many.test. 300 IN A 127.0.1.{n}" for n in range(1, 31)])
    d = lab.daemon()
    qid = d.send("alice@sender.test", ["mo@many.test"], message("many addresses"))
    wait_until(lambda: any(e["type"] == "delay" for e in d.events()), 20, "the delay event")
    [delay] = [e for e in d.events() if e["type"] == "delay"]
    assert delay["queue_id"] == qid
    tried = re.findall(r"connect to mx\.many\.test\[(127\.0\.1\.\d+)\]", d.log())
    assert 1 <= len(tried) <= 5, tried


def test_a_refusing_greeting_sends_the_mail_to_the_next_mx_and_when_all_refuse_defers(lab):
    """A 5xx greeting (RFC 5321 3.1: "554 no SMTP service here") from the best MX host:
    the mail goes to the next one, as for a host that does not answer.  When every host
    refuses so, the message is deferred (a delay event), not bounced: a refusal at the
    greeting is about the connecting address, not the message -- as Postfix's default
    (smtp_skip_5xx_greeting = yes: "skip" the server, a soft error)."""
    lab.smtp_sink(IP_A, ["-f", "CONNECT"])        # 5xx greeting
    b = lab.aio(IP_B)
    lab.serve(mx("refuse.test", "mx1.refuse.test", IP_A, 10)
              + mx("refuse.test", "mx2.refuse.test", IP_B, 20)
              + mx("allrefuse.test", "mx.allrefuse.test", IP_A, 10))
    d = lab.daemon()
    d.send("alice@sender.test", ["r@refuse.test"], message("greeting refused"))
    b.wait_for("r@refuse.test", 20)
    qid = d.send("alice@sender.test", ["a@allrefuse.test"], message("all refuse"))
    wait_until(lambda: any(e["type"] == "delay" and e["queue_id"] == qid
                           for e in d.events()), 20, "the delay event")
    assert not any(e["type"] == "bounce" for e in d.events())
    [delay] = [e for e in d.events() if e["type"] == "delay" and e["queue_id"] == qid]
    assert delay["error_code"].startswith("4"), delay


def test_a_receivers_recipient_limit_delivers_every_recipient_in_one_attempt(lab):
    """A receiver taking two recipients per transaction answers the others "452 4.5.3 Too
    many recipients": the daemon sends them in further transactions at once (RFC 5321
    4.5.3.1.10), so all five are delivered in the one attempt -- delivery events, no delay
    (before, three were deferred and waited for a retry, one limit's worth per attempt)."""
    taken = [0]

    def rcpt(sink, address, mail_from):
        if taken[0] >= 2:
            return "452 4.5.3 Too many recipients"
        taken[0] += 1
        return None

    def data(sink, txn):
        taken[0] = 0
        return None

    sink = lab.aio(IP_A, rcpt=rcpt, data=data)
    lab.serve(mx("limit.test", "mx.limit.test", IP_A, 10))
    d = lab.daemon()
    rcpts = [f"r{i}@limit.test" for i in range(5)]
    qid = d.send("alice@sender.test", rcpts, message("recipient limit"))
    wait_until(lambda: sum(e["type"] == "delivery" and e["queue_id"] == qid
                           for e in d.events()) == 5, 20, "five delivery events")
    assert not [e for e in d.events() if e["type"] == "delay"]
    assert sorted(r for t in sink.snapshot() for r in t.rcpt_tos) == rcpts
    assert [len(t.rcpt_tos) for t in sink.snapshot()] == [2, 2, 1]


def test_transactions_for_a_recipient_limit_take_units_of_the_sites_message_rate(lab):
    """The site's max_message_rate is one message every 2 s; its server takes two
    recipients per transaction.  The five recipients of one message go in three
    transactions (the receiver counts three messages): each takes a unit of the rate, so
    they are 2 s apart -- they used to follow each other at once, and a sender passed any
    site's rate by giving its messages more recipients than the server takes at once."""
    taken = [0]

    def rcpt(sink, address, mail_from):
        if taken[0] >= 2:
            return "452 4.5.3 Too many recipients"
        taken[0] += 1
        return None

    def data(sink, txn):
        taken[0] = 0
        return None

    sink = lab.aio(IP_A, rcpt=rcpt, data=data)
    lab.serve(mx("limit.test", "mx.limit.test", IP_A, 10))
    d = lab.daemon(sections={"shaping": [{"mx": "mx.limit.test",
                                          "max_message_rate": "30/m"}]})
    rcpts = [f"r{i}@limit.test" for i in range(5)]
    qid = d.send("alice@sender.test", rcpts, message("recipient limit, paced"))
    wait_until(lambda: sum(e["type"] == "delivery" and e["queue_id"] == qid
                           for e in d.events()) == 5, 30, "five delivery events")
    assert not [e for e in d.events() if e["type"] == "delay"]   # still the one attempt
    txns = sink.snapshot()
    assert sorted(r for t in txns for r in t.rcpt_tos) == rcpts
    assert [len(t.rcpt_tos) for t in txns] == [2, 2, 1]
    gaps = [b.at - a.at for a, b in zip(txns, txns[1:])]
    assert all(g >= 1.8 for g in gaps), gaps


def test_a_receiver_failing_over_by_dns_gets_the_next_mail_once_the_ttl_is_over(lab):
    """A receiver moves its MX host to a new address (failover by DNS) and publishes it
    with a short TTL: once that TTL is over, the next message goes to the new address at
    once -- not to the dead old one (deferred) for as long as the daemon kept the site
    (its own 300 s, whatever the TTL said)."""
    ttl = 5       # seconds: the resolver's min_ttl, the least it keeps an answer
    old, new = lab.aio(IP_A), lab.aio(IP_B)
    dns = lab.serve(["failover.test. 300 IN MX 10 mx.failover.test.",
                     f"mx.failover.test. {ttl} IN A {IP_A}"])
    d = lab.daemon()
    d.send("alice@sender.test", ["first@failover.test"], message("before failover"))
    old.wait_for("first@failover.test", 20)
    old.stop()
    dns.remove("mx.failover.test")
    dns.add([f"mx.failover.test. {ttl} IN A {IP_B}"])
    time.sleep(ttl + 1)
    qid = d.send("alice@sender.test", ["next@failover.test"], message("after failover"))
    new.wait_for("next@failover.test", 15)
    wait_queue_empty(d)
    assert not [e for e in d.events() if e["type"] == "delay" and e["queue_id"] == qid]


def test_an_mx_host_name_with_an_underscore_gets_the_mail(lab):
    """MX hosts named with an underscore (``mx_1.example.com``: legal in the DNS, RFC 2181
    §11, and found in the wild), directly and as a CNAME's target: the mail goes to them
    (before, their addresses were never looked up and the mail bounced 5.4.4 "no MX host
    has an address")."""
    a, b = lab.aio(IP_A), lab.aio(IP_B)
    lab.serve(mx("under.test", "mx_1.under.test", IP_A)
              + ["alias.test. 300 IN MX 10 smtp_alias.alias.test.",
                 "smtp_alias.alias.test. 300 IN CNAME smtp_in.alias.test.",
                 f"smtp_in.alias.test. 300 IN A {IP_B}"])
    d = lab.daemon()
    d.send("alice@sender.test", ["u@under.test"], message("underscore mx"))
    d.send("alice@sender.test", ["c@alias.test"], message("underscore cname"))
    a.wait_for("u@under.test", 20)
    b.wait_for("c@alias.test", 20)
    wait_queue_empty(d)
    assert not [e for e in d.events() if e["type"] in ("bounce", "delay")]


def test_with_ipv6_off_an_mx_hosts_ipv6_address_is_never_used(lab):
    """``delivery.ipv6 = false`` (a host without IPv6 egress, Postfix's inet_protocols =
    ipv4): an MX host with an A and an AAAA record is sent to at its IPv4 address only --
    while that address refuses connections, the mail waits for it (deferred), it does not
    go to the IPv6 one; with the default, the IPv6 address takes it."""
    v6 = lab.aio("::1")
    lab.serve(mx("dual.test", "mx.dual.test", IP_A) + ["mx.dual.test. 300 IN AAAA ::1"])
    # the default: IPv4 refuses, so the IPv6 address gets the mail
    d = lab.daemon()
    d.send("alice@sender.test", ["both@dual.test"], message("ipv6 on"))
    v6.wait_for("both@dual.test", 20)
    wait_queue_empty(d)
    d.stop()
    assert v6.received() == 1
    d = lab.daemon(ipv6=False, retry_schedule=[2000.0], time_scale=0.001, retry_jitter=0.0)
    qid = d.send("alice@sender.test", ["four@dual.test"], message("ipv6 off"))
    wait_until(lambda: any(e["type"] == "delay" and e["queue_id"] == qid
                           for e in d.events()), 20, "the delay event")
    [delay] = [e for e in d.events() if e["type"] == "delay"]
    assert IP_A in delay["raw_reason"] and "::1" not in delay["raw_reason"], delay
    v4 = lab.aio(IP_A)
    v4.wait_for("four@dual.test", 20)
    wait_queue_empty(d)
    assert v6.received() == 1 and v6.connections == 1
    assert "[::1]" not in d.log()


def test_a_connection_kept_open_ends_at_its_max_age_and_the_next_mail_follows_the_dns(lab):
    """A receiver moves its MX host to a new address while our connection to the old one
    is open (idle_timeout long, the old server still up): the connection is closed with
    QUIT once it is delivery.connection_max_age old, and the next message, after the
    TTL, goes to the new address -- before, it went over that connection to the old
    address for as long as idle_timeout (or max_deliveries_per_connection) let it."""
    ttl = 5
    old, new = lab.aio(IP_A), lab.aio(IP_B)
    dns = lab.serve(["moved.test. 300 IN MX 10 mx.moved.test.",
                     f"mx.moved.test. {ttl} IN A {IP_A}"])
    d = lab.daemon(idle_timeout=60.0, connection_max_age=3.0)
    d.send("alice@sender.test", ["first@moved.test"], message("before the move"))
    old.wait_for("first@moved.test", 20)
    dns.remove("mx.moved.test")
    dns.add([f"mx.moved.test. {ttl} IN A {IP_B}"])
    wait_until(lambda: old.open_now == 0, 10, "the old connection closed at its max age")
    time.sleep(ttl + 1)
    d.send("alice@sender.test", ["next@moved.test"], message("after the move"))
    new.wait_for("next@moved.test", 15)
    wait_queue_empty(d)
    assert (old.received(), old.connections) == (1, 1)
