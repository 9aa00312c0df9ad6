"""The delivery engine (mta/delivery/engine.py): jobs in, per-recipient results out.

A real SMTP peer (aiosmtpd on loopback, in the test's own event loop) and a
stand-in resolver that answers MX and address questions from a table, so each
routing outcome (null MX, NXDOMAIN, SERVFAIL, hosts down) is certain.  What is
checked is what the spool relies on: one result per recipient with the right
outcome word, code and remote host, and the bytes the peer received.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import time

import msgspec
import pytest
import uvloop
from aiosmtpd.smtp import SMTP as AiosmtpdServer
from daemon import free_port

from mta import bus
from mta.config import resolve
from mta.config.schema import Config
from mta.delivery import engine as engine_mod
from mta.delivery.engine import Engine, Job
from mta import dns as mdns
from mta.dns import DnsTempError, MxResult

QID = "0123456789ABCDEFGHIJ"
BODY = b"From: <s@example.com>\r\nSubject: engine\r\n\r\nhello\r\n"
LOOP_BOUND = 20.0


class Peer:
    """An SMTP server whose answer to RCPT depends on the local part: ok / later / bad."""

    def __init__(self):
        self.connections = 0
        self.messages = []        # (mail_from, rcpt_tos, content)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("later"):
            return "450 4.2.1 mailbox busy"
        if local.startswith("bad"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 queued"

    def protocol(self):
        self.connections += 1
        return AiosmtpdServer(self, hostname="peer.test", decode_data=False)


HANG = object()     # a host whose address lookup never ends (the stand-in resolver's)


class Resolver:
    """Answers from a table: domain -> MxResult, host -> [ip] or DnsTempError."""

    def __init__(self, mx: dict, addresses: dict):
        self.mx = mx
        self.addresses = addresses
        self.ttl: dict = {}         # host -> seconds its addresses hold (default 300)
        self.deadline = 5.0         # seconds resolve_hosts waits for all of them

    async def resolve_mx(self, domain):
        mx = self.mx[domain]
        if isinstance(mx, tuple):   # (seconds the DNS takes to answer, the answer)
            await asyncio.sleep(mx[0])
            mx = mx[1]
        return mx

    async def resolve_addresses(self, host):
        a = self.addresses[host]
        if a is HANG:           # the DNS never answers for this name
            await asyncio.sleep(3600)
        if isinstance(a, Exception):
            raise a
        return a

    async def resolve_addresses_ttl(self, host):
        return await self.resolve_addresses(host), self.ttl.get(host, 300.0)

    async def resolve_hosts(self, hosts, since=None):
        # as mta.dns.Resolver's: concurrently, bounded, within one lookup's bound (what is
        # left of it since *since*, at least the floor)
        deadline = self.deadline
        if since is not None:
            deadline = max(deadline - (time.monotonic() - since),
                           mdns.ROUTE_ADDRESS_FLOOR_SECONDS)
        return await mdns.gather_hosts(self.resolve_addresses_ttl, hosts,
                                       in_flight=mdns.HOSTS_IN_FLIGHT, deadline=deadline)


# Each engine's state directory, under one directory removed when the tests end.
_STATE_DIRS = tempfile.TemporaryDirectory(prefix="engine-")


def settings(port: int, shaping=(), smtp=None, hostname="mta.test", **delivery):
    """Settings for an engine delivering to 127.0.0.1:*port*; "PORT" in a route's hosts
    is that port; *shaping*: [[shaping]] tables (the presets are left out); *smtp*: the
    [smtp] section (its listeners are this MTA's own addresses)."""
    for r in delivery.get("route", ()):
        r["hosts"] = [h.replace("PORT", str(port)) for h in r["hosts"]]
    rules = delivery.pop("response_rule", ())     # ([[response_rule]], not [delivery])
    cfg = msgspec.convert({"response_rule": list(rules),
                           "server": {"hostname": hostname,
                                      "state_dir": tempfile.mkdtemp(dir=_STATE_DIRS.name)},
                           "delivery": {"mx_port": port, "starttls": "none",
                                        "shaping_presets": False, **delivery},
                           "shaping": list(shaping), **({"smtp": smtp} if smtp else {})},
                          Config)
    return resolve(cfg, None)


def job(domain: str, *locals_: str, n: int = 0, body: bytes = BODY, params=None) -> Job:
    rcpts = [bus.JobRecipient(i, f"{lp}@{domain}") for i, lp in enumerate(locals_)]
    return Job(bus.DeliveryMessageReady(n, QID, "s@example.com", domain, rcpts,
                                        params or {}, 1, body), b"spool-peer")


def deliver(jobs, resolver, peer=None, port: int | None = None, bound: float = LOOP_BOUND,
            peers: dict | None = None, report_retry: bool = False, **delivery):
    """Run the engine on *jobs* until every one has reported; return [(job, results)]
    (*report_retry*: [(job, results, retry_after)]).

    *peer*: a Peer, or a protocol factory, served on loopback in the same loop;
    *peers*: {loopback address: Peer}, each served on *port*.
    """
    async def main():
        loop = asyncio.get_running_loop()
        server = None
        p = port
        others = [await loop.create_server(x.protocol, ip, port)
                  for ip, x in (peers or {}).items()]
        if peer is not None:
            factory = peer.protocol if isinstance(peer, Peer) else peer
            server = await loop.create_server(factory, "127.0.0.1", 0)
            p = server.sockets[0].getsockname()[1]
        reports = []
        done = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append((j, results, retry_after) if report_retry else (j, results))
            if len(reports) == len(jobs):
                done.set()

        engine = Engine(settings(p or free_port(), **delivery), resolver, report, loop)
        for j in jobs:
            engine.submit(j)
        await done.wait()
        await engine.close()
        for s in [server, *others]:
            if s is not None:
                s.close()
        assert engine.in_flight == 0
        return reports

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(main(), bound))


def mx_to_loopback(*domains) -> Resolver:
    return Resolver({d: MxResult("ok", [["mx." + d]], domain=d) for d in domains},
                    {"mx." + d: ["127.0.0.1"] for d in domains})


def test_each_recipient_gets_the_outcome_of_its_own_reply():
    peer = Peer()
    (j, results), = deliver([job("example.net", "ok1", "later", "bad", "ok2")],
                            mx_to_loopback("example.net"), peer)
    assert [(r.index, r.outcome, r.code, r.enhanced) for r in results] == [
        (0, bus.DELIVERED, 250, "2.0.0"), (1, bus.DEFERRED, 450, "4.2.1"),
        (2, bus.FAILED, 550, "5.1.1"), (3, bus.DELIVERED, 250, "2.0.0")]
    assert {(r.host, r.ip) for r in results} == {("mx.example.net", "127.0.0.1")}
    assert j.tls == "0"         # starttls = "none": plaintext (the outcome's outbound_tls)
    # One transaction, to the accepted recipients, with the job's bytes.
    assert peer.messages == [("s@example.com", ["ok1@example.net", "ok2@example.net"], BODY)]


def test_a_smarthost_is_not_shaped_by_the_rules_of_the_domains_it_carries():
    """With a '*' route, a domain rule for one of the domains it carries does not limit
    the smarthost's site (a 1-a-minute rate would hold these five messages for minutes,
    past the loop's bound); a domain with a route of its own is shaped by its rule."""
    peer = Peer()
    jobs = [job("slow.test", "ok", n=n) for n in range(5)]
    reports = deliver(jobs, Resolver({}, {}), peer,
                      route=[{"domain": "*", "hosts": ["127.0.0.1:PORT"]}],
                      shaping=[{"domain": "slow.test", "max_message_rate": "1/m"}])
    assert all(r.outcome == bus.DELIVERED for _, rs in reports for r in rs)
    assert len(peer.messages) == 5


def test_a_domain_with_its_own_route_is_shaped_by_its_rule():
    peer = Peer()
    jobs = [job("own.test", "ok", n=n) for n in range(3)]
    # 1 a minute: the others would wait past max_wait (30 s) for theirs, and go back to
    # the spool untried
    reports = deliver(jobs, Resolver({}, {}), peer, bound=5.0,
                      route=[{"domain": "own.test", "hosts": ["127.0.0.1:PORT"]}],
                      shaping=[{"domain": "own.test", "max_message_rate": "1/m"}])
    assert sorted(rs[0].outcome for _, rs in reports) == \
        [bus.DELIVERED, bus.REQUEUED, bus.REQUEUED]
    assert len(peer.messages) == 1


def test_two_routes_to_one_host_keep_their_own_tls_policy():
    """A route that requires STARTTLS and a smarthost route to the same host:port without
    it are two sites.  When they shared one, each lookup replaced the site's targets, so
    the domain that requires TLS went in plaintext after the other's lookup (or the other
    was deferred for want of TLS).  The peer offers no STARTTLS."""
    peer = Peer()
    for first in ("other.test", "partner.test"):        # the lookups in either order
        peer.messages.clear()
        jobs = [job(first, "ok", n=0),
                job({"other.test": "partner.test"}.get(first, "other.test"), "ok", n=1)]
        reports = deliver(jobs, Resolver({}, {}), peer,
                          route=[{"domain": "partner.test", "hosts": ["127.0.0.1:PORT"],
                                  "starttls": "required"},
                                 {"domain": "*", "hosts": ["127.0.0.1:PORT"],
                                  "starttls": "none"}])
        out = {j.msg.domain: rs[0] for j, rs in reports}
        assert out["other.test"].outcome == bus.DELIVERED, out
        assert out["partner.test"].outcome == bus.DEFERRED, out
        assert "TLS" in out["partner.test"].text, out["partner.test"].text
        assert [m[1] for m in peer.messages] == [["ok@other.test"]]


@pytest.mark.parametrize("route_domain, domain", [
    ("bücher.test", "xn--bcher-kva.test"), ("xn--bcher-kva.test", "bücher.test"),
    ("BÜCHER.test", "bücher.test")])
def test_a_route_for_an_idn_domain_takes_its_mail_in_either_form(route_domain, domain):
    """A U-label and its A-label (RFC 5890) are one domain: a route written in one form
    takes the mail addressed in the other (SMTPUTF8 senders write U-labels, the others
    A-labels).  Such mail went past the route, to the domain's public MX hosts (here the
    resolver knows none: it would be deferred)."""
    peer = Peer()

    def utf8_peer():
        peer.connections += 1
        return AiosmtpdServer(peer, hostname="peer.test", decode_data=False,
                              enable_SMTPUTF8=True)

    params = {} if domain.isascii() else {"SMTPUTF8": ""}
    (j, results), = deliver([job(domain, "ok", params=params)], Resolver({}, {}), utf8_peer,
                            route=[{"domain": route_domain, "hosts": ["127.0.0.1:PORT"]}])
    assert [r.outcome for r in results] == [bus.DELIVERED], results
    assert [m[1] for m in peer.messages] == [[f"ok@{domain}"]]


def test_jobs_for_one_domain_share_a_connection():
    peer = Peer()
    jobs = [job("example.net", "ok", n=n) for n in range(5)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer,
                      connection_limit=1, max_deliveries_per_connection=100)
    assert sorted(j.msg.req for j, _ in reports) == [0, 1, 2, 3, 4]
    assert all(r.outcome == bus.DELIVERED for _, rs in reports for r in rs)
    assert len(peer.messages) == 5 and peer.connections == 1


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_busy_connection_takes_no_new_transaction_past_its_max_age(pipeline):
    """delivery.connection_max_age: a connection kept busy (never idle, far from
    max_deliveries_per_connection) gives up after that many seconds -- its transaction
    ends, it is closed with QUIT and the next message goes on a new one (which follows
    a DNS change) -- whether the next envelope would go behind the final dot or not."""
    class SlowPeer(Peer):
        quits = 0

        async def handle_DATA(self, server, session, envelope):
            await asyncio.sleep(0.3)
            return await super().handle_DATA(server, session, envelope)

        async def handle_QUIT(self, server, session, envelope):
            self.quits += 1
            return "221 bye"

    peer = SlowPeer()
    jobs = [job("example.net", "ok", n=n) for n in range(8)]      # 2.4 s of messages
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1,
                      connection_max_age=1.0, pipeline_transactions=pipeline)
    assert all(r.outcome == bus.DELIVERED for _, rs in reports for r in rs)
    assert len(peer.messages) == 8
    # (about 1 s of messages each: 2 or 3, more only on a very slow machine)
    assert 2 <= peer.connections < 8 and peer.quits == peer.connections, \
        (peer.connections, peer.quits)


@pytest.mark.parametrize("mx, outcome, code, enhanced", [
    (MxResult("null_mx", domain="example.net"), bus.FAILED, 556, "5.1.10"),
    (MxResult("nxdomain", domain="example.net"), bus.FAILED, 550, "5.1.2"),
    (MxResult("no_address", domain="example.net"), bus.FAILED, 550, "5.1.2"),
    (MxResult("temp_fail", reason="SERVFAIL", domain="example.net"), bus.DEFERRED, 451,
     "4.4.3"),
])
def test_routing_failures_answer_for_every_recipient(mx, outcome, code, enhanced):
    (j, results), = deliver([job("example.net", "a", "b")],
                            Resolver({"example.net": mx}, {}))
    assert [(r.index, r.outcome, r.code, r.enhanced, r.host) for r in results] == [
        (0, outcome, code, enhanced, ""), (1, outcome, code, enhanced, "")]


def test_an_mx_host_without_address_is_skipped_for_the_next():
    peer = Peer()
    resolver = Resolver({"example.net": MxResult("ok", [["mx1.example.net"],
                                                        ["mx2.example.net"]])},
                        {"mx1.example.net": DnsTempError("timeout"),
                         "mx2.example.net": ["127.0.0.1"]})
    (j, results), = deliver([job("example.net", "ok")], resolver, peer)
    assert [(r.outcome, r.host) for r in results] == [(bus.DELIVERED, "mx2.example.net")]


def test_mx_hosts_that_all_have_no_address_bounce_and_a_lookup_failure_defers():
    """Every MX host of the domain exists in the MX records only (NXDOMAIN or no A/AAAA):
    a retry cannot help, so the recipients bounce 5.4.4 at once, as Postfix does, not
    after max_age of retries.  If any of them could not be looked up, they wait."""
    mx = MxResult("ok", [["mx1.example.net"], ["mx2.example.net"]])
    (j, results), = deliver([job("example.net", "a", "b")], Resolver(
        {"example.net": mx}, {"mx1.example.net": [], "mx2.example.net": []}))
    assert [(r.outcome, r.code, r.enhanced) for r in results] == \
        [(bus.FAILED, 550, "5.4.4")] * 2, results
    assert "no MX host of example.net has an address" in results[0].text
    (j, results), = deliver([job("example.net", "a")], Resolver(
        {"example.net": mx}, {"mx1.example.net": [],
                              "mx2.example.net": DnsTempError("timeout")}))
    assert [(r.outcome, r.code, r.enhanced) for r in results] == [(bus.DEFERRED, 451, "4.4.3")]


@pytest.mark.parametrize("listen", ["0.0.0.0", "[::]", "127.0.0.1"])
def test_an_mx_that_is_a_listener_of_ours_bounces_as_a_loop(listen):
    """The domain's MX host resolves to this MTA (a wildcard listener on mx_port takes
    every local address): 554 5.4.6 at once, nothing is sent anywhere."""
    port = free_port()
    (j, results), = deliver([job("example.net", "a")], mx_to_loopback("example.net"),
                            port=port, smtp={"listen": [f"{listen}:{port}"]})
    (r,) = results
    assert (r.outcome, r.code, r.enhanced) == (bus.FAILED, 554, "5.4.6"), r
    assert "loops back to myself" in r.text


@pytest.mark.parametrize("listen, ip", [
    ("0.0.0.0", "0.0.0.0"), ("127.0.0.1", "0.0.0.0"), ("[::]", "::"),
    ("127.0.0.1", "::ffff:127.0.0.1"), ("0.0.0.0", "::ffff:127.0.0.1")])
def test_an_mx_address_that_reaches_this_host_in_disguise_bounces_as_a_loop(listen, ip):
    """An MX host whose address is 0.0.0.0 or :: (a connection to them goes to this
    host's loopback) or an IPv4-mapped IPv6 one (goes to that IPv4 address): the same
    loop as 127.0.0.1, which a listener on 127.0.0.1 relays for by default.  Anyone
    whose domain's MX said so made every message to it go round max_hops times."""
    port = free_port()
    resolver = Resolver({"example.net": MxResult("ok", [["mx.example.net"]])},
                        {"mx.example.net": [ip]})
    (j, results), = deliver([job("example.net", "a")], resolver, port=port,
                            smtp={"listen": [f"{listen}:{port}"]}, connect_timeout=2.0)
    (r,) = results
    assert (r.outcome, r.code, r.enhanced) == (bus.FAILED, 554, "5.4.6"), r
    assert "loops back to myself" in r.text


@pytest.mark.parametrize("ipv6", [True, False])
def test_with_ipv6_off_a_routes_ipv6_address_is_not_connected_to(ipv6):
    """delivery.ipv6 = false: an IPv6 address a route names (no lookup, so not left out
    with the AAAA records) is not connected to either: the route's mail waits (4.4.3) and
    the peer there sees nothing; with the default it gets the mail."""
    peer = Peer()
    (j, results), = deliver([job("routed.test", "ok")], Resolver({}, {}), port=free_port(),
                            peers={"::1": peer}, ipv6=ipv6,
                            route=[{"domain": "routed.test", "hosts": ["[::1]:PORT"]}])
    (r,) = results
    if ipv6:
        assert r.outcome == bus.DELIVERED and len(peer.messages) == 1, r
    else:
        assert (r.outcome, r.code, r.enhanced) == (bus.DEFERRED, 451, "4.4.3"), r
        assert peer.connections == 0


def test_an_mx_host_that_greets_with_our_own_name_bounces_as_a_loop():
    """The MX host's address is not ours, but the server there greets with our own host
    name (server.hostname): it is this MTA behind a NAT, a port forward or a load
    balancer.  As Postfix ("host ... greeted me with my own hostname"), the mail bounces
    554 5.4.6 instead of being relayed to ourselves round and round up to max_hops."""
    peer = Peer()

    def us():
        peer.connections += 1
        return AiosmtpdServer(peer, hostname="MTA.test", decode_data=False)

    (j, results), = deliver([job("example.net", "ok")], mx_to_loopback("example.net"), us)
    (r,) = results
    assert (r.outcome, r.code, r.enhanced) == (bus.FAILED, 554, "5.4.6"), r
    assert "loops back to myself" in r.text
    # We are MX 20 (RFC 5321 5.1: only better hosts may get the mail) and MX 10 does not
    # answer now: deferred until it does, not bounced, and never sent to ourselves.
    resolver = Resolver({"example.net": MxResult("ok", [["mx1.example.net"],
                                                        ["mx2.example.net"]])},
                        {"mx1.example.net": ["127.0.0.2"], "mx2.example.net": ["127.0.0.1"]})
    (j, results), = deliver([job("example.net", "ok")], resolver, us)
    (r,) = results
    assert (r.outcome, r.code) == (bus.DEFERRED, 451), r
    assert "mx1.example.net[127.0.0.2]" in r.text, r
    assert peer.messages == []
    # "localhost" names no host in particular: many small servers greet with it
    (j, results), = deliver([job("example.net", "ok")], mx_to_loopback("example.net"),
                            lambda: AiosmtpdServer(peer, hostname="localhost",
                                                   decode_data=False), hostname="localhost")
    assert [r.outcome for r in results] == [bus.DELIVERED], results


def test_a_better_mx_whose_lookup_failed_defers_a_loop():
    """We are MX 20; MX 10's addresses are unknown for now (SERVFAIL): deferred, not
    bounced as a loop -- MX 10 may well take the mail on the next try."""
    port = free_port()
    resolver = Resolver({"example.net": MxResult("ok", [["mx1.example.net"],
                                                        ["mx2.example.net"]])},
                        {"mx1.example.net": DnsTempError("SERVFAIL"),
                         "mx2.example.net": ["127.0.0.1"]})
    (j, results), = deliver([job("example.net", "a")], resolver, port=port,
                            smtp={"listen": [f"127.0.0.1:{port}"]})
    (r,) = results
    assert (r.outcome, r.code, r.enhanced) == (bus.DEFERRED, 451, "4.4.3"), r


def test_the_mx_hosts_looked_up_and_the_addresses_tried_are_bounded():
    """A domain with 30 MX hosts of 3 addresses each (none listening): at most
    MAX_MX_HOSTS hosts are looked up and one attempt tries MAX_CONNECT_ADDRESSES."""
    hosts = [f"mx{n}.example.net" for n in range(30)]
    resolver = Resolver({"example.net": MxResult("ok", [[h] for h in hosts])},
                        {h: ["127.0.0.1", "127.0.0.2", "127.0.0.3"] for h in hosts})
    looked_up = []
    plain = resolver.resolve_addresses

    async def counted(host):
        looked_up.append(host)
        return await plain(host)

    resolver.resolve_addresses = counted
    (j, results), = deliver([job("example.net", "a")], resolver, port=free_port())
    (r,) = results
    assert (r.outcome, r.code) == (bus.DEFERRED, 451), r
    assert looked_up == hosts[:engine_mod.MAX_MX_HOSTS]


def test_mx_hosts_whose_lookups_hang_cost_one_lookup_bound_not_one_each():
    """4 MX hosts whose address lookups never end: the mail is deferred after one
    resolve_hosts deadline (1 s here), not four of them (the lookups ran one by one)."""
    hosts = [f"mx{n}.example.net" for n in range(4)]
    resolver = Resolver({"example.net": MxResult("ok", [[h] for h in hosts])},
                        dict.fromkeys(hosts, HANG))
    resolver.deadline = 1.0
    t0 = time.monotonic()
    (j, results), = deliver([job("example.net", "a")], resolver, port=free_port())
    elapsed = time.monotonic() - t0
    (r,) = results
    assert (r.outcome, r.code, r.enhanced) == (bus.DEFERRED, 451, "4.4.3"), r
    assert elapsed < 2 * resolver.deadline, elapsed


def test_a_slow_mx_answer_and_hanging_addresses_share_one_lookup_bound():
    """The MX query answers just before its bound (0.8 s of 1 s), its hosts' address
    lookups never end: the mail is deferred about one bound after the MX query began,
    not one for the MX query and one more for the addresses (~1.8 s)."""
    hosts = [f"mx{n}.example.net" for n in range(3)]
    resolver = Resolver({"example.net": (0.8, MxResult("ok", [[h] for h in hosts]))},
                        dict.fromkeys(hosts, HANG))
    resolver.deadline = 1.0
    t0 = time.monotonic()
    (j, results), = deliver([job("example.net", "a")], resolver, port=free_port())
    elapsed = time.monotonic() - t0
    (r,) = results
    assert (r.outcome, r.code, r.enhanced) == (bus.DEFERRED, 451, "4.4.3"), r
    assert elapsed < 0.8 + mdns.ROUTE_ADDRESS_FLOOR_SECONDS + 0.3, elapsed


def test_an_mx_host_whose_lookup_hangs_leaves_the_mail_to_the_next_in_preference():
    """MX 10 and 20 hang, MX 30 and 40 answer: the mail goes to MX 30 (the best that
    answered), within about one lookup bound."""
    port = free_port()
    best, worse = Peer(), Peer()
    resolver = Resolver({"example.net": MxResult("ok", [["mx10.example.net"],
                                                        ["mx20.example.net"],
                                                        ["mx30.example.net"],
                                                        ["mx40.example.net"]])},
                        {"mx10.example.net": HANG, "mx20.example.net": HANG,
                         "mx30.example.net": ["127.0.0.2"], "mx40.example.net": ["127.0.0.3"]})
    resolver.deadline = 1.0
    t0 = time.monotonic()
    (j, results), = deliver([job("example.net", "a")], resolver, port=port,
                            peers={"127.0.0.2": best, "127.0.0.3": worse})
    elapsed = time.monotonic() - t0
    (r,) = results
    assert (r.outcome, r.host, r.ip) == (bus.DELIVERED, "mx30.example.net", "127.0.0.2"), r
    assert best.messages == [("s@example.com", ["a@example.net"], BODY)] and not worse.messages
    assert elapsed < 2 * resolver.deadline, elapsed


def test_every_host_down_defers():
    resolver = mx_to_loopback("example.net")
    (j, results), = deliver([job("example.net", "a")], resolver, port=free_port(),
                            connect_timeout=2.0)
    (r,) = results
    assert (r.outcome, r.code, r.enhanced) == (bus.DEFERRED, 451, "4.4.1")
    assert "mx.example.net[127.0.0.1]" in r.text
    assert j.tls == ""          # no session: the events say nothing of TLS


def test_tls_required_but_not_offered_defers_and_says_so():
    (j, results), = deliver([job("example.net", "a")], mx_to_loopback("example.net"), Peer(),
                            starttls="required")
    (r,) = results
    assert r.outcome == bus.DEFERRED and "STARTTLS required but not offered" in r.text
    assert j.tls == "0"


class SevenBitPeer(asyncio.Protocol):
    """A minimal SMTP server that announces no 8BITMIME; it records the commands it got."""

    commands: list = []

    def connection_made(self, transport):
        self.t = transport
        transport.write(b"220 peer.test ESMTP\r\n")

    def data_received(self, data):
        for line in data.split(b"\r\n")[:-1]:
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.t.write(b"250-peer.test\r\n250 PIPELINING\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
            else:
                self.t.write(b"250 ok\r\n")


def test_an_8bit_message_is_not_sent_to_a_server_without_8bitmime():
    SevenBitPeer.commands = []
    body = "From: <s@example.com>\r\nSubject: \u00e9\r\n\r\ncaf\u00e9\r\n".encode()
    (j, results), = deliver([job("example.net", "ok", body=body, params={"BODY": "8BITMIME"})],
                            mx_to_loopback("example.net"), SevenBitPeer)
    assert [(r.outcome, r.code, r.enhanced) for r in results] == [(bus.FAILED, 554, "5.6.3")]
    assert results[0].local and results[0].host     # our verdict on that host, no reply
    assert SevenBitPeer.commands[0].upper().startswith(b"EHLO")
    assert not any(c.upper().startswith((b"MAIL", b"DATA")) for c in SevenBitPeer.commands)


class SlowPeer(Peer):
    """Accepts everything, each DATA after *delay* seconds."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


def test_jobs_that_wait_too_long_in_a_lane_are_handed_back_never_also_sent():
    """One connection, 0.4 s a message, 8 jobs, max_wait 1 s (job_timeout_margin 2): the
    jobs the site could not take in time go back to the spool as REQUEUED (no attempt),
    and none of them is also delivered -- the spool would otherwise send it again after
    job_timeout while it still waited here."""
    peer = SlowPeer(0.4)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
        reports = []
        engine = Engine(settings(server.sockets[0].getsockname()[1], connection_limit=1,
                                 job_timeout_margin=2.0),
                        mx_to_loopback("example.net"),
                        lambda j, rs, retry_after=0.0: reports.append((j, rs)), loop)
        assert engine.max_wait == 1.0
        for n in range(8):
            engine.submit(job("example.net", f"ok{n}", n=n))
        deadline = loop.time() + 20
        while len(reports) < 8 and loop.time() < deadline:
            await asyncio.sleep(0.2)
            engine.sweep()
        await engine.close()
        server.close()
        return reports

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert sorted(j.msg.req for j, _ in reports) == list(range(8))   # each once
    outcomes = {j.msg.req: rs[0] for j, rs in reports}
    delivered = {n for n, r in outcomes.items() if r.outcome == bus.DELIVERED}
    back = {n for n, r in outcomes.items() if r.outcome == bus.REQUEUED}
    assert delivered | back == set(range(8)) and 2 <= len(delivered) <= 5, outcomes
    assert back and all("waited over 1s" in outcomes[n].text for n in back)
    got = {rcpts[0] for _, rcpts, _ in peer.messages}
    assert got == {f"ok{n}@example.net" for n in delivered}       # nothing handed back went


# --- cross-transaction pipelining (delivery.pipeline_transactions) ---------------------------

class PipeSession(asyncio.Protocol):
    """One connection of PipePeer: a line-by-line SMTP server offering PIPELINING."""

    def __init__(self, peer):
        self.peer = peer
        self.buf = b""
        self.data: list[bytes] | None = None
        self.mail = b""
        self.rcpts: list[bytes] = []
        self.waiting = False            # a delayed answer is due: read nothing more yet
        self.conn = peer.connections = peer.connections + 1

    def connection_made(self, transport):
        self.t = transport
        transport.write(b"220 pipe.test ESMTP\r\n")

    def data_received(self, data):
        self.buf += data
        self.process()

    def process(self):
        # one command at a time, each answered before the next is looked at (a
        # delayed answer holds the rest in the buffer, as a real server's would)
        while b"\r\n" in self.buf and not self.t.is_closing() and not self.waiting:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if self.data is not None:
                if line == b".":
                    self.end_of_data()
                else:
                    self.data.append(line[1:] if line.startswith(b".") else line)
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.t.write(b"250-pipe.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self.mail, self.rcpts = line, []
                self.t.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                self.rcpts.append(line)
                self.t.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                self.data = []
                self.t.write(b"354 go\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
            else:
                self.t.write(b"250 ok\r\n")

    def end_of_data(self):
        peer = self.peer
        n = len(peer.ends)
        # what the client had sent behind the final dot by the time it was read
        peer.ends.append((self.conn, self.buf.startswith(b"MAIL FROM:")))
        self.data = None
        action = peer.script.get(n)
        if action == "421":
            self.t.write(b"421 4.3.2 going away\r\n")
            self.t.close()
            return
        if action == "drop":
            self.t.abort()
            return
        if isinstance(action, float):       # answer after that many seconds
            self.waiting = True
            asyncio.get_running_loop().call_later(action, self.resume)
            return
        self.accept()

    def resume(self):
        self.waiting = False
        if not self.t.is_closing():
            self.accept()
            self.process()

    def accept(self):
        peer = self.peer
        peer.messages.append((self.conn, self.rcpts[0].split(b"<")[1].split(b">")[0].decode()))
        self.t.write(b"250 2.0.0 queued\r\n")


class PipePeer:
    """PipeSession's server: ``script`` maps the n-th final dot (0-based, all connections)
    to "421" (answer 421 and close), "drop" (close without an answer) or a number of
    seconds to wait before the 250."""

    def __init__(self, script=None):
        self.script = script or {}
        self.connections = 0
        self.ends: list[tuple[int, bool]] = []    # (connection, next MAIL already there)
        self.messages: list[tuple[int, str]] = []  # (connection, recipient) accepted

    def __call__(self):            # the protocol factory deliver() serves
        return PipeSession(self)


def test_a_pipelining_peer_gets_each_next_envelope_behind_the_final_dot():
    peer = PipePeer()
    jobs = [job("example.net", f"ok{n}", n=n) for n in range(20)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1)
    assert all(r.outcome == bus.DELIVERED for _, rs in reports for r in rs)
    assert sorted(r for _, r in peer.messages) == sorted(f"ok{n}@example.net" for n in range(20))
    assert peer.connections == 1
    # every message but the last had the next one's MAIL right behind its final dot
    assert [ahead for _, ahead in peer.ends] == [True] * 19 + [False]


def test_without_pipeline_transactions_each_envelope_waits_for_the_reply():
    peer = PipePeer()
    jobs = [job("example.net", f"ok{n}", n=n) for n in range(6)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1,
                      pipeline_transactions=False)
    assert all(r.outcome == bus.DELIVERED for _, rs in reports for r in rs)
    assert [ahead for _, ahead in peer.ends] == [False] * 6


@pytest.mark.parametrize("action", ["421", "drop"])
def test_a_connection_lost_after_a_message_sends_the_next_once_on_a_new_one(action):
    """The 4th message's final dot gets a 421 (or the connection drops there): that
    message is deferred; the 5th, whose envelope went out behind that dot, is sent on a
    new connection, once; nothing is lost or sent twice."""
    peer = PipePeer({3: action})
    jobs = [job("example.net", f"ok{n}", n=n) for n in range(8)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1)
    outcome = {j.msg.req: rs[0] for j, rs in reports}
    assert sorted(outcome) == list(range(8))                    # each job reported once
    assert outcome[3].outcome == bus.DEFERRED
    if action == "421":
        assert outcome[3].code == 421
    assert all(outcome[n].outcome == bus.DELIVERED for n in range(8) if n != 3)
    got = [r for _, r in peer.messages]
    assert sorted(got) == sorted(f"ok{n}@example.net" for n in range(8) if n != 3)  # no dup
    assert peer.connections == 2
    assert {c for c, r in peer.messages if r == "ok4@example.net"} == {2}


def test_a_job_sent_ahead_that_then_waited_too_long_goes_back_not_out():
    """max_wait 1 s; the first message's reply takes 1.5 s, while the second's envelope
    is on the wire behind it: the second is handed back to the spool (REQUEUED, no
    attempt), its DATA abandoned with the connection -- never sent after the spool may
    have given up on it; the third, which waited in the lane, goes back too."""
    peer = PipePeer({0: 1.5})
    jobs = [job("example.net", f"ok{n}", n=n) for n in range(3)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1,
                      job_timeout_margin=2.0)
    outcome = {j.msg.req: rs[0] for j, rs in reports}
    assert outcome[0].outcome == bus.DELIVERED
    assert outcome[1].outcome == outcome[2].outcome == bus.REQUEUED, outcome
    assert "waited over 1s" in outcome[1].text
    assert [r for _, r in peer.messages] == ["ok0@example.net"]
    assert peer.ends[0] == (1, True)        # the second's envelope did go out ahead
    assert len(peer.ends) == 1              # ... and none of its message


def test_domains_with_the_same_mx_hosts_in_another_order_each_try_their_own_first():
    """a.test prefers mx1 (backup mx2), b.test the other way round.  They shared one
    site, whose targets each lookup replaced: one of the two domains' mail went to its
    backup first.  Now each tries its own first host."""
    peer = Peer()
    port = free_port()

    async def main():
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(peer.protocol, ip, port)
                   for ip in ("127.0.0.1", "127.0.0.2")]
        reports = []
        done = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append((j, results))
            if len(reports) == 4:
                done.set()

        resolver = Resolver({"a.test": MxResult("ok", [["mx1.test"], ["mx2.test"]]),
                             "b.test": MxResult("ok", [["mx2.test"], ["mx1.test"]])},
                            {"mx1.test": ["127.0.0.1"], "mx2.test": ["127.0.0.2"]})
        engine = Engine(settings(port), resolver, report, loop)
        for n, domain in enumerate(("a.test", "b.test", "a.test", "b.test")):
            engine.submit(job(domain, "ok", n=n))
        await done.wait()
        await engine.close()
        for s in servers:
            s.close()
        return reports

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    got = {(j.msg.domain, rs[0].outcome, rs[0].host) for j, rs in reports}
    assert got == {("a.test", bus.DELIVERED, "mx1.test"), ("b.test", bus.DELIVERED, "mx2.test")}


@pytest.mark.parametrize("ttl_of", ["mx", "address", "route"])
def test_a_site_is_looked_up_again_when_its_dns_answers_expire(ttl_of):
    """The MX host moves from 127.0.0.1 to 127.0.0.2 (failover by DNS) and the answer
    that said 127.0.0.1 had a TTL of 0.3 s (its MX records', its host's addresses' or a
    route host's): the first job after that goes to 127.0.0.2.  The site was kept 300 s
    whatever the TTL, and the job that found it old still went to the old host."""
    peers = {"127.0.0.1": Peer(), "127.0.0.2": Peer()}
    port = free_port()
    ttl = 0.3

    async def main():
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(p.protocol, ip, port) for ip, p in peers.items()]
        reports = []
        got = asyncio.Queue()

        def report(j, results, retry_after=0.0):
            reports.append((j, results))
            got.put_nowait(j)

        resolver = Resolver({"example.net": MxResult("ok", [["mx.example.net"]], ttl=ttl
                                                     if ttl_of == "mx" else 300.0)},
                            {"mx.example.net": ["127.0.0.1"]})
        if ttl_of != "mx":
            resolver.ttl["mx.example.net"] = ttl
        route = [{"domain": "example.net", "hosts": ["mx.example.net"]}] \
            if ttl_of == "route" else []
        # one message a connection: each job connects to the site's hosts of the time
        engine = Engine(settings(port, route=route, max_deliveries_per_connection=1),
                        resolver, report, loop)
        engine.submit(job("example.net", "ok", n=0))
        await got.get()
        resolver.addresses["mx.example.net"] = ["127.0.0.2"]
        engine.submit(job("example.net", "ok", n=1))      # within the TTL: the old host
        await got.get()
        await asyncio.sleep(ttl + 0.1)
        engine.submit(job("example.net", "ok", n=2))
        await got.get()
        await engine.close()
        for s in servers:
            s.close()
        return reports

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert [rs[0].outcome for _, rs in reports] == [bus.DELIVERED] * 3
    # the first two at the old address, the last (after the TTL) at the new one
    assert [len(p.messages) for p in peers.values()] == [2, 1]


def test_an_expired_site_whose_lookup_fails_for_now_still_takes_the_mail():
    """RFC 8767 (serve-stale): the domain's answers expired and the resolver times out or
    says SERVFAIL for a while: its last hosts take the mail, STALE_TTL at a time, rather
    than every job to the domain deferred; NXDOMAIN (permanent) is not served stale."""
    peer = Peer()
    port = free_port()
    ttl = 0.3

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(peer.protocol, "127.0.0.1", port)
        reports = []
        got = asyncio.Queue()

        def report(j, results, retry_after=0.0):
            reports.append((j, results))
            got.put_nowait(j)

        resolver = Resolver({"example.net": MxResult("ok", [["mx.example.net"]], ttl=ttl)},
                            {"mx.example.net": ["127.0.0.1"]})
        engine = Engine(settings(port), resolver, report, loop)
        engine.submit(job("example.net", "ok", n=0))
        await got.get()
        await asyncio.sleep(ttl + 0.1)
        resolver.mx["example.net"] = MxResult("temp", reason="SERVFAIL")
        engine.submit(job("example.net", "ok", n=1))          # expired, lookup fails: stale
        await got.get()
        assert engine.domain_site["example.net"][2] > loop.time() + 20   # STALE_TTL more
        engine.domain_site["example.net"] = engine.domain_site["example.net"][:2] + (0.0,)
        resolver.mx["example.net"] = MxResult("nxdomain", reason="NXDOMAIN")
        engine.submit(job("example.net", "ok", n=2))          # the domain is gone: bounce
        await got.get()
        await engine.close()
        server.close()
        return reports

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert [rs[0].outcome for _, rs in reports] == [bus.DELIVERED, bus.DELIVERED, bus.FAILED]
    assert len(peer.messages) == 2


def test_the_addresses_of_one_mx_host_share_the_connections():
    """One MX host with two addresses (DNS round robin, as large receivers publish their
    MX hosts): each new connection picks one of them at random, as Postfix does
    (smtp_randomize_addresses).  They were tried in the order of the cached answer, so
    every connection went to the first address for as long as the site was known."""
    peers = {"127.0.0.1": Peer(), "127.0.0.2": Peer()}
    n = 24
    resolver = Resolver({"example.net": MxResult("ok", [["mx.example.net"]])},
                        {"mx.example.net": ["127.0.0.1", "127.0.0.2"]})
    # one message a connection: every message opens its own
    reports = deliver([job("example.net", "ok", n=i) for i in range(n)], resolver,
                      port=free_port(), peers=peers, max_deliveries_per_connection=1)
    assert all(rs[0].outcome == bus.DELIVERED for _, rs in reports)
    got = {ip: len(p.messages) for ip, p in peers.items()}
    # 2 * 2**-24 chance of a false failure
    assert sum(got.values()) == n and min(got.values()) > 0, got


def test_an_operator_site_suspension_holds_a_route_site_whose_host_has_capitals():
    """The admin API lower-cases a site it is given; a route's site is named after its
    hosts in lower case too (DNS names are case-insensitive), so suspending the site
    named as `mta queue summary --by site` shows it holds its mail.  Before, the site
    kept the configured case ("Relay.Example.COM:PORT") and the suspension never
    matched: the message went out."""
    from mta.admin.api import Api

    async def main():
        loop = asyncio.get_running_loop()
        peer = Peer()
        server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        s = settings(port, route=[{"domain": "r.test", "hosts": ["Relay.Example.COM:PORT"]}])
        Api(s, loop, None, None, None).suspend({"site": f"Relay.Example.COM:{port}"})
        reports = []
        done = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append(results)
            done.set()

        engine = Engine(s, Resolver({}, {"Relay.Example.COM": ["127.0.0.1"]}), report, loop)
        engine.submit(job("r.test", "ok"))
        await done.wait()
        names = [site.name for site in engine.sites.values()]
        await engine.close()
        server.close()
        return reports, peer, names, port

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports, peer, names, port = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert names == [f"relay.example.com:{port}"]
    assert [r.outcome for rs in reports for r in rs] == [bus.REQUEUED]
    assert peer.messages == []


def test_a_route_without_its_own_starttls_keeps_a_rules_required():
    # [[shaping]] requires TLS for the domain; its route says nothing of STARTTLS: the
    # rule holds (the route's default used to be "opportunistic", which won, and the mail
    # went in plaintext to a server offering no STARTTLS)
    peer = Peer()
    (j, results), = deliver([job("bank.test", "ok")], Resolver({}, {}), peer,
                            route=[{"domain": "bank.test", "hosts": ["127.0.0.1:PORT"]}],
                            shaping=[{"domain": "bank.test", "starttls": "required"}])
    (r,) = results
    assert r.outcome == bus.DEFERRED and "STARTTLS required but not offered" in r.text
    assert peer.messages == []
    # a route that says so itself still decides
    (j, results), = deliver([job("bank.test", "ok")], Resolver({}, {}), peer,
                            route=[{"domain": "bank.test", "hosts": ["127.0.0.1:PORT"],
                                    "starttls": "none"}],
                            shaping=[{"domain": "bank.test", "starttls": "required"}])
    assert results[0].outcome == bus.DELIVERED and len(peer.messages) == 1


class HookedPipeSession(PipeSession):
    """A PipeSession (PIPELINING, no STARTTLS) that calls its peer's ``on_rcpt`` when a
    RCPT comes, and reads what came with it a moment later."""

    def data_received(self, data):
        rcpts = [line[8:] for line in data.split(b"\r\n") if line[:8].upper() == b"RCPT TO:"]
        if not rcpts:
            return super().data_received(data)
        for r in rcpts:
            self.peer.on_rcpt(r.decode())
        asyncio.get_running_loop().call_later(0.2, super().data_received, data)


@pytest.mark.parametrize("when", ["idle", "ahead"])
def test_a_plaintext_connection_is_not_reused_once_the_site_requires_tls(when):
    # shop.test and x.bank.test share their MX host, so one site; a rule requires TLS for
    # *.bank.test (a wildcard: its sites are known only once such a domain has mail).
    # shop.test's mail went first, in plaintext (the server offers no STARTTLS); when
    # x.bank.test's mail came, the site's STARTTLS became "required" -- and shop.test's
    # plaintext connection took the mail all the same: kept open, idle ("idle"), or
    # still sending, with x.bank.test's envelope written behind shop.test's final dot
    # ("ahead": pipelined transactions).
    engine = None
    peer = PipePeer()

    def on_rcpt(address):
        if address == "<ok@shop.test>" and when == "ahead":
            engine.submit(job("x.bank.test", "ok", n=1))

    peer.on_rcpt = on_rcpt
    resolver = Resolver({d: MxResult("ok", [["mx.shared.test"]], domain=d)
                         for d in ("shop.test", "x.bank.test")},
                        {"mx.shared.test": ["127.0.0.1"]})

    async def main():
        nonlocal engine
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: HookedPipeSession(peer), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reports = []
        got = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append((j, results))
            got.set()

        engine = Engine(settings(port, starttls="opportunistic", idle_timeout=30,
                                 connection_limit=1,
                                 shaping=[{"domain": "*.bank.test", "starttls": "required"}]),
                        resolver, report, loop)
        engine.submit(job("shop.test", "ok"))
        await got.wait()
        got.clear()
        if when == "idle":
            engine.submit(job("x.bank.test", "ok", n=1))
        while len(reports) < 2:
            await got.wait()
            got.clear()
        await engine.close()
        server.close()
        return reports

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert [(j.msg.domain, rs[0].outcome) for j, rs in reports] == \
        [("shop.test", bus.DELIVERED), ("x.bank.test", bus.DEFERRED)], reports
    assert "STARTTLS required" in reports[1][1][0].text
    assert [rcpt for _, rcpt in peer.messages] == ["ok@shop.test"]


class BrokenTlsPeer(asyncio.Protocol):
    """Offers STARTTLS, answers it 220, then sends what is not TLS and hangs up (an old or
    broken TLS stack); a session that does not ask for TLS is served in plaintext."""

    connections = 0
    starttls = 0
    delivered: list = []

    def connection_made(self, transport):
        BrokenTlsPeer.connections += 1
        self.t = transport
        self.in_data = False
        transport.write(b"220 peer.test ESMTP\r\n")

    def data_received(self, data):
        for line in data.split(b"\r\n")[:-1]:
            if self.in_data:
                if line == b".":
                    self.in_data = False
                    BrokenTlsPeer.delivered.append(self.rcpt)
                    self.t.write(b"250 2.0.0 queued\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.t.write(b"250-peer.test\r\n250 STARTTLS\r\n")
            elif verb == b"STAR":
                BrokenTlsPeer.starttls += 1
                self.t.write(b"220 2.0.0 go ahead\r\n")
                self.t.pause_reading()       # the client's ClientHello: answered with junk
                asyncio.get_running_loop().call_later(0.05, self.junk)
                return
            elif verb == b"RCPT":
                self.rcpt = line[8:]
                self.t.write(b"250 ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.t.write(b"354 go\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 bye\r\n")
                self.t.close()
                return
            else:
                self.t.write(b"250 ok\r\n")

    def junk(self):
        self.t.write(b"this is not a TLS record\r\n" * 4)
        self.t.close()


@pytest.mark.parametrize("policy,outcome", [("opportunistic", bus.DELIVERED),
                                            ("required", bus.DEFERRED)])
def test_opportunistic_tls_whose_handshake_fails_goes_in_plaintext(policy, outcome):
    # As Postfix's "may" level: the mail goes, in plaintext, rather than waiting until it
    # expires; the host is then sent to in plaintext for a while (no handshake to fail
    # before each delivery).  "required" never falls back.
    BrokenTlsPeer.connections = BrokenTlsPeer.starttls = 0
    BrokenTlsPeer.delivered = []
    jobs = [job("example.net", "a", n=0), job("example.net", "b", n=1)]
    # one connection at a time, one message each: the second message's connection comes
    # after the first one's fallback
    reports = deliver(jobs, mx_to_loopback("example.net"), BrokenTlsPeer, starttls=policy,
                      connection_limit=1, max_deliveries_per_connection=1)
    outs = sorted((j.msg.rcpts[0].address, rs[0].outcome) for j, rs in reports)
    assert outs == [("a@example.net", outcome), ("b@example.net", outcome)], reports
    if policy == "required":
        assert BrokenTlsPeer.delivered == []
        assert all("TLS" in rs[0].text for _, rs in reports)
        assert BrokenTlsPeer.starttls == BrokenTlsPeer.connections
    else:
        assert sorted(BrokenTlsPeer.delivered) == [b"<a@example.net>", b"<b@example.net>"]
        assert BrokenTlsPeer.starttls == 1          # tried once, then remembered
        assert BrokenTlsPeer.connections == 3
        assert all(j.tls == "0" for j, _ in reports)


def test_a_verified_route_never_falls_back_to_plaintext():
    # tls_verify: a server that offers no STARTTLS (or whose TLS fails) gets nothing, so
    # that a man in the middle cannot strip it
    peer = Peer()                       # offers no STARTTLS
    (j, results), = deliver([job("bank.test", "ok")], Resolver({}, {}), peer,
                            starttls="opportunistic",
                            route=[{"domain": "bank.test", "hosts": ["127.0.0.1:PORT"],
                                    "tls_verify": True}])
    assert results[0].outcome == bus.DEFERRED and "STARTTLS required" in results[0].text
    assert peer.messages == []
    BrokenTlsPeer.connections = BrokenTlsPeer.starttls = 0
    BrokenTlsPeer.delivered = []
    (j, results), = deliver([job("bank.test", "a")], Resolver({}, {}), BrokenTlsPeer,
                            starttls="opportunistic",
                            route=[{"domain": "bank.test", "hosts": ["127.0.0.1:PORT"],
                                    "tls_verify": True}])
    assert results[0].outcome == bus.DEFERRED and BrokenTlsPeer.delivered == []


@pytest.mark.parametrize("where", ["route", "delivery"])
def test_tls_verify_is_not_undone_by_starttls_none(where):
    # tls_verify says "a verified certificate or nothing": a starttls = "none" from
    # delivery.starttls or a shaping rule (the route says none of its own) must not send
    # the mail in clear to a server that offers no STARTTLS
    peer = Peer()                       # offers no STARTTLS
    if where == "route":
        kw = {"route": [{"domain": "bank.test", "hosts": ["127.0.0.1:PORT"],
                         "tls_verify": True}]}
        resolver = Resolver({}, {})
    else:
        kw = {"tls_verify": True}
        resolver = mx_to_loopback("bank.test")
    (j, results), = deliver([job("bank.test", "ok")], resolver, peer, starttls="none", **kw)
    assert results[0].outcome == bus.DEFERRED and "STARTTLS required" in results[0].text
    assert peer.messages == []


class OneMessageSession(PipeSession):
    """Takes one message per connection: its 250, then it reads nothing more and hangs
    up a moment later (the next envelope, if any, is never answered).  With
    ``refuse_all``, connections after the first hang up at the first MAIL."""

    def accept(self):
        super().accept()
        self.waiting = True
        asyncio.get_running_loop().call_later(0.02, self.t.close)

    def process(self):
        if self.peer.refuse_all and self.conn > 1 and b"MAIL" in self.buf:
            self.t.close()
            return
        super().process()


class OneMessagePeer(PipePeer):
    def __init__(self, refuse_all=False):
        super().__init__()
        self.refuse_all = refuse_all

    def __call__(self):
        return OneMessageSession(self)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_reused_connection_the_server_closed_before_answering_sends_the_next_on_a_new_one(
        pipeline):
    """A server that takes one message per connection and hangs up just after its 250
    (a legal policy).  The connection still looked usable, so the next envelope went
    out on it (behind the final dot, or just after the reply) and was never answered:
    that job was deferred -- an attempt, a delay event, a retry minutes later -- every
    second message, though nothing of it was sent and the server said nothing of it.
    It now goes out at once on a new connection."""
    peer = OneMessagePeer()
    _four_delivered_one_per_connection(peer, pipeline)


def _four_delivered_one_per_connection(peer, pipeline):
    """Four messages to *peer*, one connection at a time: each delivered once, on a
    connection of its own."""
    jobs = [job("example.net", f"ok{n}", n=n) for n in range(4)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1,
                      pipeline_transactions=pipeline)
    outcome = {j.msg.req: rs[0] for j, rs in reports}
    assert sorted(outcome) == [0, 1, 2, 3]
    assert all(r.outcome == bus.DELIVERED for r in outcome.values()), outcome
    assert sorted(r for _, r in peer.messages) == [f"ok{n}@example.net" for n in range(4)]
    assert peer.connections == 4


def test_a_job_whose_new_connection_dies_too_is_deferred_once():
    """The retry on a new connection is made once: when that one is lost before its
    envelope is answered too, the job is deferred (no loop)."""
    peer = OneMessagePeer(refuse_all=True)
    jobs = [job("example.net", f"ok{n}", n=n) for n in range(2)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1)
    outcome = {j.msg.req: rs[0] for j, rs in reports}
    assert outcome[0].outcome == bus.DELIVERED
    # said in words, with the host: ours, not the server's reply (x-local in a DSN)
    lost = outcome[1]
    assert lost.outcome == bus.DEFERRED and "connection lost" in lost.text, lost
    assert "Smtp" not in lost.text and "Error" not in lost.text and lost.local
    assert lost.text.startswith(f"{lost.host}[{lost.ip}]: ") and lost.host
    assert not outcome[0].local
    assert peer.connections == 2


class ClosingAtMailSession(PipeSession):
    """Takes one message per connection, then answers the next MAIL with 421 and closes
    (a server's messages-per-session limit or idle timeout, said in words).  With
    ``refuse_all``, connections after the first give the 421 to their first MAIL."""

    def process(self):
        # a line at a time through PipeSession's loop, looking at each MAIL first
        p = self.peer
        while b"\r\n" in self.buf and not self.t.is_closing() and not self.waiting:
            line, _, rest = self.buf.partition(b"\r\n")
            if self.data is None and line[:4].upper() == b"MAIL" and \
                    (self.done or (p.refuse_all and self.conn > 1)):
                self.t.write(b"421 4.7.0 pipe.test Too many messages for this session, "
                             b"closing connection\r\n")
                self.t.close()
                p.closed_at_mail += 1
                return
            self.buf = line + b"\r\n"
            super().process()
            self.buf += rest

    def end_of_data(self):
        super().end_of_data()
        self.done = True

    done = False


class ClosingAtMailPeer(PipePeer):
    def __init__(self, refuse_all=False):
        super().__init__()
        self.refuse_all = refuse_all
        self.closed_at_mail = 0

    def __call__(self):
        return ClosingAtMailSession(self)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_421_to_mail_on_a_reused_connection_sends_the_job_on_a_new_one(pipeline):
    """A server that closes a reused connection with a 421 to its next MAIL (Exchange's
    "Too many messages for this session", an idle timeout) said nothing of that message:
    it was deferred -- an attempt, a delay event, back-off evidence against the site and
    a retry minutes later -- every second message.  With no response rule for that
    reply, it now goes out at once on a new connection, as for a connection lost
    before its envelope was answered."""
    peer = ClosingAtMailPeer()
    _four_delivered_one_per_connection(peer, pipeline)
    assert peer.closed_at_mail == 3


def test_a_421_to_mail_that_a_response_rule_takes_is_a_deferral_as_before():
    """A 421 a response rule matches is the site asking to slow down (Gmail's "try again
    later"): the rule fires and the job is deferred, not sent again at once."""
    peer = ClosingAtMailPeer()
    jobs = [job("example.net", f"ok{n}", n=n) for n in range(2)]
    rule = {"name": "too-many", "code": 421, "text": "too many messages", "action": "defer",
            "delay": 60}
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1,
                      pipeline_transactions=False, response_rule=[rule])
    outcome = {j.msg.req: (j, rs[0]) for j, rs in reports}
    assert outcome[0][1].outcome == bus.DELIVERED
    j1, r1 = outcome[1]
    assert r1.outcome == bus.DEFERRED and r1.code == 421 and j1.fired.name == "too-many"
    assert peer.connections == 1


def test_a_421_to_mail_on_the_new_connection_too_defers_once():
    """The new connection is tried once: a 421 to its first MAIL defers the job with the
    server's reply (no loop of connections)."""
    peer = ClosingAtMailPeer(refuse_all=True)
    jobs = [job("example.net", f"ok{n}", n=n) for n in range(2)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1)
    outcome = {j.msg.req: rs[0] for j, rs in reports}
    assert outcome[0].outcome == bus.DELIVERED
    assert outcome[1].outcome == bus.DEFERRED and outcome[1].code == 421, outcome[1]
    assert "Too many messages" in outcome[1].text
    assert peer.connections == 2


def test_an_address_this_host_could_bind_is_not_taken_for_its_own(monkeypatch):
    """With ip_nonlocal_bind (usual beside keepalived), any address can be bound: asked
    that way, every MX of a wildcard listener's node looked like this MTA, and all mail
    bounced 5.4.6 as a loop.  Ours are the kernel's own addresses (and loopback)."""
    import socket

    from mta.delivery import engine
    monkeypatch.setattr(socket.socket, "bind", lambda self, address: None)
    monkeypatch.setattr(engine, "_local", [0.0, frozenset()])
    assert not engine._local_address("192.0.2.55")
    assert not engine._local_address("2001:db8::55")
    assert engine._local_address("127.0.0.1") and engine._local_address("::1")
    assert "127.0.0.1" in engine._read_local_addresses()


# --- a server's recipient limit (RFC 5321 4.5.3.1.10) -----------------------------------------

class RcptLimitSession(PipeSession):
    """Takes at most ``peer.limit`` recipients per transaction; the next get 452 4.5.3."""

    def data_received(self, data):
        # one line at a time to PipeSession, but a RCPT over the limit is answered here
        self.pending = getattr(self, "pending", b"") + data
        while b"\r\n" in self.pending and not self.t.is_closing():
            line, self.pending = self.pending.split(b"\r\n", 1)
            if self.data is None and line[:4].upper() == b"RCPT" and \
                    len(self.rcpts) >= self.peer.limit:
                self.t.write(self.peer.reply)
                continue
            self.buf += line + b"\r\n"
            self.process()

    def accept(self):
        self.peer.transactions.append(
            (self.conn, [r.split(b"<")[1].split(b">")[0].decode() for r in self.rcpts]))
        self.t.write(b"250 2.0.0 queued\r\n")


class RcptLimitPeer(PipePeer):
    def __init__(self, limit: int, reply: bytes = b"452 4.5.3 Too many recipients\r\n"):
        super().__init__()
        self.limit = limit
        self.reply = reply
        self.transactions: list[tuple[int, list[str]]] = []

    def __call__(self):
        return RcptLimitSession(self)


@pytest.mark.parametrize("pipeline", [True, False])
def test_recipients_over_the_servers_limit_go_in_another_transaction_at_once(pipeline):
    """A server that takes two recipients per transaction answers the others 452 4.5.3
    "too many recipients": they are sent in the next transactions on the same connection,
    in the same attempt (RFC 5321 4.5.3.1.10), not deferred; the job behind gets its own
    transaction after them (its envelope is not sent ahead of theirs)."""
    peer = RcptLimitPeer(2)
    jobs = [job("example.net", "a", "b", "c", "d", "e", n=0), job("example.net", "f", n=1)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1,
                      pipeline_transactions=pipeline)
    outcomes = {r.index: (r.outcome, r.code) for j, rs in reports if j.msg.req == 0 for r in rs}
    assert outcomes == {i: (bus.DELIVERED, 250) for i in range(5)}
    assert peer.connections == 1
    assert peer.transactions == [(1, ["a@example.net", "b@example.net"]),
                                 (1, ["c@example.net", "d@example.net"]),
                                 (1, ["e@example.net"]), (1, ["f@example.net"])]


def test_a_452_to_the_first_recipient_is_a_deferral():
    """With nothing accepted in the transaction, a 452 is the server's state (out of
    room), not a recipient limit: the recipients are deferred as before."""
    peer = RcptLimitPeer(0)
    (j, results), = deliver([job("example.net", "a", "b")], mx_to_loopback("example.net"),
                            peer, connection_limit=1)
    assert [(r.outcome, r.code) for r in results] == [(bus.DEFERRED, 452)] * 2
    assert peer.transactions == []


class DroppingSession(PipeSession):
    """Refuses a RCPT for "bad..." with 550 and hangs up at once (Exim's "drop")."""

    def data_received(self, data):
        self.pending = getattr(self, "pending", b"") + data
        while b"\r\n" in self.pending and not self.t.is_closing():
            line, self.pending = self.pending.split(b"\r\n", 1)
            if self.data is None and line[:4].upper() == b"RCPT" and b"<bad" in line:
                self.t.write(b"550 5.7.1 Go away\r\n")
                self.t.close()
                return
            self.buf += line + b"\r\n"
            self.process()


class DroppingPeer(PipePeer):
    def __call__(self):
        return DroppingSession(self)


def test_a_recipient_refused_before_the_server_hangs_up_fails_the_others_are_deferred():
    peer = DroppingPeer()
    (j, results), = deliver([job("example.net", "ok", "bad", "other")],
                            mx_to_loopback("example.net"), peer, connection_limit=1)
    assert [(r.outcome, r.code, r.enhanced) for r in results] == [
        (bus.DEFERRED, 451, "4.4.2"), (bus.FAILED, 550, "5.7.1"), (bus.DEFERRED, 451, "4.4.2")]
    assert peer.messages == []


# --- the server's SIZE (RFC 1870) --------------------------------------------------------------

class SizedSession(PipeSession):
    """Offers ``SIZE <peer.size>`` (the keyword alone when size is None); keeps MAIL lines."""

    def data_received(self, data):
        self.pending = getattr(self, "pending", b"") + data
        while b"\r\n" in self.pending and not self.t.is_closing():
            line, self.pending = self.pending.split(b"\r\n", 1)
            if self.data is None and line[:4].upper() == b"EHLO":
                size = b"" if self.peer.size is None else b" %d" % self.peer.size
                self.t.write(b"250-pipe.test\r\n250-PIPELINING\r\n250-SIZE%s\r\n"
                             b"250 8BITMIME\r\n" % size)
                continue
            if self.data is None and line[:4].upper() == b"MAIL":
                self.peer.mails.append(line)
            self.buf += line + b"\r\n"
            self.process()


class SizedPeer(PipePeer):
    def __init__(self, size):
        super().__init__()
        self.size = size
        self.mails: list[bytes] = []

    def __call__(self):
        return SizedSession(self)


BIG = BODY + b"x" * 2000 + b"\r\n"


@pytest.mark.parametrize("size, big_outcome", [
    (1000, (bus.FAILED, 552, "5.3.4")), (None, (bus.DELIVERED, 250, "2.0.0")),
    (0, (bus.DELIVERED, 250, "2.0.0"))])
def test_a_message_over_the_servers_size_bounces_unsent_and_size_goes_on_mail(size, big_outcome):
    """SIZE 1000: the 2 kB message is not sent (a bounce, 552 5.3.4, RFC 1870), the small
    ones before and after it go, each MAIL with SIZE=; SIZE alone or SIZE 0 is no limit."""
    peer = SizedPeer(size)
    jobs = [job("example.net", f"r{n}", n=n, body=BIG if n == 1 else BODY) for n in range(3)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1)
    got = {j.msg.req: [(r.outcome, r.code, r.enhanced) for r in rs] for j, rs in reports}
    assert got == {0: [(bus.DELIVERED, 250, "2.0.0")], 1: [big_outcome],
                   2: [(bus.DELIVERED, 250, "2.0.0")]}
    sent = [len(BODY), len(BIG), len(BODY)] if big_outcome[0] == bus.DELIVERED else \
        [len(BODY)] * 2
    assert peer.mails == [b"MAIL FROM:<s@example.com> SIZE=%d" % n for n in sent]
    assert peer.connections == 1


@pytest.mark.parametrize("reply", [b"452 4.5.3 Too many recipients\r\n",
                                   b"552 5.5.3 Too many recipients\r\n"])
def test_recipients_over_the_limit_are_not_sent_again_past_the_spools_job_timeout(reply):
    """Another transaction for the rest starts only if, even at its own timeouts, it ends
    before the spool's job timeout (connect + 2 x command + data timeouts, + margin): else
    the spool, having sent the job again, and this one could both deliver.  Here the
    first message's reply took longer than connect + command timeouts: the rest are
    deferred with the server's 452 (RFC 821's 552 5.5.3 too: a temporary), not sent."""
    peer = RcptLimitPeer(2, reply)
    peer.script = {0: 1.5}          # the first final dot is answered after 1.5 s
    (j, results), = deliver([job("example.net", "a", "b", "c")], mx_to_loopback("example.net"),
                            peer, connection_limit=1, connect_timeout=0.1,
                            command_timeout=0.5, data_timeout=5.0)
    assert [(r.outcome, r.code) for r in results] == [
        (bus.DELIVERED, 250), (bus.DELIVERED, 250), (bus.DEFERRED, 452)]
    assert peer.transactions == [(1, ["a@example.net", "b@example.net"])]


def test_a_552_5_5_3_too_many_recipients_is_the_same_limit_not_a_bounce():
    """RFC 5321 4.5.3.1.10: RFC 821 had 552 for "too many recipients", and clients SHOULD
    take it as temporary so that the rest go in another transaction: 552 5.5.3 (RFC 3463
    X.5.3, too many recipients) after an acceptance is that limit, not a bounce; before
    any acceptance it is the server's policy for the message, and a bounce."""
    peer = RcptLimitPeer(2, b"552 5.5.3 Too many recipients\r\n")
    (j, results), = deliver([job("example.net", "a", "b", "c")], mx_to_loopback("example.net"),
                            peer, connection_limit=1)
    assert [(r.outcome, r.code) for r in results] == [(bus.DELIVERED, 250)] * 3
    assert [rs for _, rs in peer.transactions] == [["a@example.net", "b@example.net"],
                                                   ["c@example.net"]]
    peer = RcptLimitPeer(0, b"552 5.5.3 Too many recipients\r\n")
    (j, results), = deliver([job("example.net", "a")], mx_to_loopback("example.net"),
                            peer, connection_limit=1)
    assert [(r.outcome, r.code) for r in results] == [(bus.FAILED, 552)]


class Down(asyncio.Protocol):
    """A site that is down: every connection is greeted with 421 and closed (counted)."""

    connections = 0

    def connection_made(self, transport):
        Down.connections += 1
        transport.write(b"421 4.3.2 service not available, closing channel\r\n")
        transport.close()


def test_a_site_down_is_not_connected_to_again_for_each_job_until_its_first_retry():
    # Postfix's "dead destination": once every host of a site failed, the jobs that come
    # for it in the next moments (the spool sends the next ones as soon as these come
    # back) get the same answer without a connection each; a site that refuses would
    # otherwise see a connection per dispatch pass, hundreds a second, for as long as
    # its mail is queued.  After the first retry interval it is tried again.
    Down.connections = 0

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Down, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reports = []
        got = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append(results)
            got.set()

        async def one(n):
            got.clear()
            engine.submit(job("down.test", f"r{n}", n=n))
            await got.wait()

        engine = Engine(settings(port, time_scale=0.01, connection_limit=1),
                        mx_to_loopback("down.test"), report, loop)
        for n in range(5):
            await one(n)
        seen = Down.connections
        await asyncio.sleep(0.7)            # the first retry interval: 60 s x time_scale
        await one(5)
        await engine.close()
        server.close()
        return reports, seen

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports, seen = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert len(reports) == 6
    for results in reports:
        [r] = results
        assert (r.outcome, r.code, r.enhanced) == (bus.DEFERRED, 421, "4.3.2"), r
        assert "service not available" in r.text
    assert seen == 1                        # one connection for the five jobs
    assert Down.connections == 2            # tried again once the interval passed


@pytest.mark.parametrize("domains", [None, ["other.test", "down.test"]])
def test_a_flush_ends_the_hold_of_a_site_that_was_down(domains):
    # mta queue flush (a DeliveryQueueFlush from the spool, ahead of the jobs it made
    # due): the next job for a held site connects at once, within the first interval.
    # --domain / --queue-id: the message names the domains; a site of other domains
    # stays held.
    Down.connections = 0

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Down, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reports = []
        got = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append(results)
            got.set()

        async def one(n):
            got.clear()
            engine.submit(job("down.test", f"r{n}", n=n))
            await got.wait()

        engine = Engine(settings(port, connection_limit=1),       # a 60 s hold
                        mx_to_loopback("down.test"), report, loop)
        await one(0)
        await one(1)                        # held: no connection
        if domains:
            assert engine.flush(["other.test"]) == 0
            await one(2)                    # still held
        held = Down.connections
        assert (engine.flush(domains) if domains else engine.flush()) == 1
        assert engine.flush() == 0
        await one(3)                        # tried again
        await engine.close()
        server.close()
        return reports, held

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports, held = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert "temporarily suspended" in reports[-2][0].text
    assert "temporarily suspended" not in reports[-1][0].text
    assert (held, Down.connections) == (1, 2)


class OneAtATimeSession(PipeSession):
    """A PipeSession while no other connection of its peer is open; else the site's
    "421 too many connections" greeting (many receivers limit a sender's connections)."""

    def connection_made(self, transport):
        self.t = transport
        if self.peer.open:
            self.busy = True
            transport.write(b"421 4.7.0 too many connections from your address\r\n")
            transport.close()
            return
        self.busy = False
        self.peer.open += 1
        transport.write(b"220 pipe.test ESMTP\r\n")

    def connection_lost(self, exc):
        if not self.busy:
            self.peer.open -= 1


class OneAtATimePeer(PipePeer):
    open = 0

    def __call__(self):
        return OneAtATimeSession(self)


def test_a_refused_extra_connection_does_not_hold_a_site_whose_connection_works():
    # The dead-site hold is for a site none of whose hosts answers.  A second connection
    # refused ("421 too many connections") while the first one delivers says nothing of
    # the site: the jobs that come next go out over the working connection, as before,
    # not deferred "delivery temporarily suspended" for the first retry interval.
    peer = OneAtATimePeer()

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reports = []
        got = asyncio.Event()

        def report(j, results, retry_after=0.0):
            reports.append(results)
            got.set()

        engine = Engine(settings(port, connection_limit=2, idle_timeout=30),
                        mx_to_loopback("busy.test"), report, loop)
        engine.submit(job("busy.test", "a0", n=0))    # the first connection: kept open
        while len(reports) < 1:
            got.clear()
            await got.wait()
        for n in range(1, 5):               # a burst: the lane opens a second connection
            engine.submit(job("busy.test", f"a{n}", n=n))
        while len(reports) < 5:
            got.clear()
            await got.wait()
        first = peer.connections
        for n in range(5, 8):               # more mail while the first connection is open
            engine.submit(job("busy.test", f"b{n}", n=n))
            while len(reports) < n + 1:
                got.clear()
                await got.wait()
        await engine.close()
        server.close()
        return reports, first

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports, first = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert first == 2                       # the second connection was refused
    later = [r for results in reports[5:] for r in results]
    assert [(r.outcome, r.code) for r in later] == [(bus.DELIVERED, 250)] * 3, later
    assert {rcpt for _, rcpt in peer.messages} >= {"b5@busy.test", "b6@busy.test",
                                                    "b7@busy.test"}


def test_an_ipv6_source_reaches_the_ipv6_address_of_a_host_with_many_ipv4_ones():
    """A source sending from an IPv6 address (delivery.source_address = ::1) to an MX host
    with six A records and one AAAA (as big providers publish): the addresses it cannot
    reach from there are not among the MAX_CONNECT_ADDRESSES of an attempt, so the mail
    goes to the IPv6 one -- it was deferred for ever ("source ::1 cannot reach an IPv4
    address"), the five tried being IPv4 ones."""
    peer = Peer()
    v4 = [f"127.0.0.{n}" for n in range(2, 8)]
    resolver = Resolver({"example.net": MxResult("ok", [["mx.example.net"]])},
                        {"mx.example.net": v4 + ["::1"]})
    (j, results), = deliver([job("example.net", "ok")], resolver, port=free_port(),
                            peers={"::1": peer}, source_address="::1")
    (r,) = results
    assert (r.outcome, r.ip) == (bus.DELIVERED, "::1"), r
    assert len(peer.messages) == 1


def test_a_route_to_an_ipv6_host_names_its_site_with_the_address_in_brackets():
    """The site of a route to [::1]:PORT (its name is what logs, /metrics labels, the
    status page and the queue commands show): "[::1]:PORT" -- "::1:PORT" is an IPv6
    address of its own, and said nothing of the port."""
    peer = Peer()
    port = free_port()
    (j, results), = deliver([job("routed.test", "ok")], Resolver({}, {}), port=port,
                            peers={"::1": peer},
                            route=[{"domain": "routed.test", "hosts": ["[::1]:PORT"]}])
    assert [r.outcome for r in results] == [bus.DELIVERED]
    assert j.site == f"[::1]:{port}"


def test_a_refused_connection_to_an_ipv6_host_names_it_in_brackets():
    """The reason of a deferral (the delay event's raw_reason, a bounce's Diagnostic-Code
    after max_age) names where the connection went: "[::1]:PORT", not "::1:PORT" (an
    IPv6 address of its own)."""
    port = free_port()
    (j, results), = deliver([job("routed.test", "ok")], Resolver({}, {}), port=port,
                            route=[{"domain": "routed.test", "hosts": ["[::1]:PORT"]}])
    (r,) = results
    assert (r.outcome, r.code) == (bus.DEFERRED, 451), r
    assert f"connect to [::1]:{port} failed" in r.text, r


def test_a_rate_slower_than_max_wait_still_sends_at_that_rate():
    """max_message_rate 1/s (one unit a second), max_wait 0.5 s (job_timeout_margin 1):
    a job that would wait for its unit longer than max_wait goes back to the spool, and
    the unit it would have used stays for the next job.  When the wait took the unit
    and then handed the job back, every later job waited a whole interval for its own
    (the unit before was just taken): the site got the first message and then none, the
    spool's jobs coming and going for ever (max_wait is 30 s by default: "1/m" sent one
    message to the site, "100/h" next to nothing)."""
    peer = Peer()

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
        engine = Engine(settings(server.sockets[0].getsockname()[1], job_timeout_margin=1.0,
                                 shaping=[{"domain": "example.net",
                                           "max_message_rate": "1/s"}]),
                        mx_to_loopback("example.net"), None, loop)
        assert engine.max_wait == 0.5

        def report(j, rs, retry_after=0.0):
            if rs[0].outcome == bus.REQUEUED:     # the spool sends it again shortly
                loop.call_later(0.1, engine.submit,
                                job("example.net", *(r.address.split("@")[0]
                                                     for r in j.msg.rcpts), n=j.msg.req))
        engine.report = report
        for n in range(6):
            engine.submit(job("example.net", f"ok{n}", n=n))
        await asyncio.sleep(4.6)
        await engine.close()
        server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    # one at once, then one a second: 5 in 4.6 s (4 at least on a slow machine)
    assert 4 <= len(peer.messages) <= 5, [m[1] for m in peer.messages]


def test_a_stop_gives_back_at_once_a_job_waiting_for_its_sites_message_rate():
    """begin_stop() gives every job whose transaction has not begun back to the spool at
    once, "being paced" included: one waiting for a unit of its site's max_message_rate
    (one each 10 s here) came back only when the unit was due -- a stop (and each
    delivery process a reload replaces) waited that long, or was cut off at its
    shutdown_timeout and the job left to the spool's job timeout."""
    peer = Peer()

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
        outcomes = []
        engine = Engine(settings(server.sockets[0].getsockname()[1],
                                 shaping=[{"domain": "example.net",
                                           "max_message_rate": "6/m"}]),
                        mx_to_loopback("example.net"),
                        lambda j, rs, retry_after=0.0: outcomes.append(
                            (rs[0].outcome, loop.time())), loop)
        for n in range(2):
            engine.submit(job("example.net", f"ok{n}", n=n))
        while not outcomes:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)            # the second one waits for its unit
        stopped = loop.time()
        engine.begin_stop()
        while len(outcomes) < 2 and loop.time() - stopped < 15:
            await asyncio.sleep(0.05)
        await engine.close()
        server.close()
        return outcomes, stopped

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        outcomes, stopped = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert [o for o, _ in outcomes] == [bus.DELIVERED, bus.REQUEUED], outcomes
    assert outcomes[1][1] - stopped < 1.0, outcomes[1][1] - stopped
    assert len(peer.messages) == 1


def test_domains_joining_a_site_do_not_each_recompute_its_limits():
    """3,000 domains on one provider's MX host join its site, which has a lane: its limits
    are asked for again when a domain rule matches the one that joins (and once for the
    first that none matches), not at each -- each was a pass over all the site's domains,
    quadratic in them (a provider's site gains thousands an hour)."""
    domains = [f"company{i}.example" for i in range(3000)] + ["partner.example"]
    resolver = Resolver({d: MxResult("ok", [["aspmx.l.google.test"]], domain=d)
                         for d in domains}, {"aspmx.l.google.test": ["127.0.0.1"]})

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(settings(free_port(), shaping=[
            {"domain": "partner.example", "connection_limit": 3}]), resolver, None, loop)
        site = await engine._site_of(domains[0])
        lane = site.lanes["default"] = engine_mod.Lane(
            engine.sources["default"], site, engine._limits(engine.sources["default"], site))
        asked = []
        real = engine.shaping.site_limits
        engine.shaping.site_limits = lambda *a: asked.append(a) or real(*a)
        for d in domains[1:-1]:
            await engine._site_of(d)
        before_partner = len(asked), lane.limits.connection_limit
        await engine._site_of(domains[-1])
        site.lanes.clear()
        await engine.close()
        return before_partner, len(asked), lane.limits.connection_limit

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        (asked_before, limit_before), asked, limit = runner.run(
            asyncio.wait_for(main(), LOOP_BOUND))
    assert asked_before <= 1 and limit_before == 10, asked_before
    assert asked == asked_before + 1 and limit == 3


def test_a_relimit_costs_no_pass_over_a_sites_domains():
    """20,000 domains on one provider's MX host, a lane from each of two sources: a
    re-limit (a throttle or back-off step, up to once a second) asked the limits of each
    lane by a pass over the site's domains -- 24 ms at 20,000, 100 ms at 100,000, per
    lane, the loop stalled each time.  Now no domain is looked at again, and the limits
    still follow the domains the rules match: a rule's domain joining and leaving."""
    domains = [f"company{i}.example" for i in range(20_000)]
    resolver = Resolver({d: MxResult("ok", [["aspmx.l.google.test"]], domain=d)
                         for d in domains + ["partner.example"]},
                        {"aspmx.l.google.test": ["127.0.0.1"]})

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(settings(free_port(), shaping=[
            {"domain": "partner.example", "connection_limit": 3}]), resolver, None, loop)
        for d in domains:
            site = await engine._site_of(d)
        for name in ("default",):
            site.lanes[name] = engine_mod.Lane(engine.sources[name], site,
                                               engine._limits(engine.sources[name], site))
        lane = site.lanes["default"]
        looked = []
        real = engine.shaping.shapes_domain
        engine.shaping.shapes_domain = lambda d: looked.append(d) or real(d)
        engine._relimit()
        first = (len(looked), lane.limits.connection_limit)
        await engine._site_of("partner.example")       # joins: the rule applies
        joined = (len(looked), lane.limits.connection_limit)
        engine._relimit()
        again = len(looked)
        site.forget("partner.example")
        engine._relimit()                               # (left: the rule no longer does)
        left = (len(looked), lane.limits.connection_limit)
        site.lanes.clear()
        await engine.close()
        return first, joined, again, left

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        first, joined, again, left = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert first == (0, 10)
    assert joined == (1, 3)         # the one that joined, once
    assert again == 1 and left == (1, 10)


async def _learnt_rule_engine(resolver):
    """An engine with a rule (connection_limit 2) for rule.test, once it has looked up the
    rule's domain as at start; the site of other.test and the default source."""
    loop = asyncio.get_running_loop()
    engine = Engine(settings(free_port(), shaping=[
        {"domain": "rule.test", "connection_limit": 2}]), resolver, None, loop)
    engine.learning = loop.create_task(engine._learn_rule_domains())
    await engine.learning
    return engine, await engine._site_of("other.test"), engine.sources["default"]


def test_a_domain_rules_site_is_not_forgotten_by_a_process_without_mail_for_it():
    """A rule for rule.test shapes the site of its MX host, which other.test shares; this
    process has mail for other.test only.  It looked rule.test up at start so the rule
    applies here too -- but an hour later forget_old_sites dropped rule.test (no mail for
    it here, so never looked up again) and a lane made after that had the default
    limits: this process then opened up to 10 connections where the node's limit was 2."""
    domains = ["rule.test", "other.test"]
    resolver = Resolver({d: MxResult("ok", [["mx.shared.test"]], domain=d) for d in domains},
                        {"mx.shared.test": ["127.0.0.1"]})

    async def main():
        engine, site, src = await _learnt_rule_engine(resolver)
        assert engine._limits(src, site).connection_limit == 2
        # an hour on: other.test was looked up again (its mail), rule.test was not
        for d, (s, at, until) in list(engine.domain_site.items()):
            if d == "rule.test":
                engine.domain_site[d] = (s, at - engine_mod.SITE_FORGET - 1, until)
        engine.forget_old_sites()
        await asyncio.sleep(0.1)
        limit = engine._limits(src, site).connection_limit
        await engine.close()
        return limit

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(asyncio.wait_for(main(), LOOP_BOUND)) == 2


def _moving_rule_resolver():
    """rule.test (a rule: connection_limit 2) and other.test on mx.one.test, two.test on
    mx.two.test."""
    return Resolver({"rule.test": MxResult("ok", [["mx.one.test"]], domain="rule.test"),
                     "other.test": MxResult("ok", [["mx.one.test"]], domain="other.test"),
                     "two.test": MxResult("ok", [["mx.two.test"]], domain="two.test")},
                    {"mx.one.test": ["127.0.0.1"], "mx.two.test": ["127.0.0.1"]})


async def _lanes_after(resolver, answer, age: float):
    """The connection limits of a lane on mx.one.test's site and one on mx.two.test's,
    after rule.test's MX lookup answers *answer* once its answers expired and *age*
    seconds after its last answer (the upkeep's minute); and whether rule.test has a
    site then."""
    engine, one, src = await _learnt_rule_engine(resolver)
    two = await engine._site_of("two.test")
    lanes = []
    for site in (one, two):
        lanes.append(engine_mod.Lane(src, site, engine._limits(src, site)))
        site.lanes["default"] = lanes[-1]
    before = [lane.limits.connection_limit for lane in lanes]
    resolver.mx["rule.test"] = answer
    s, at, _ = engine.domain_site["rule.test"]
    now = engine.loop.time()
    engine.domain_site["rule.test"] = (s, now - age, now - 1)
    engine.forget_old_sites()
    await asyncio.sleep(0.1)
    after = [lane.limits.connection_limit for lane in lanes]
    known = "rule.test" in engine.domain_site
    one.lanes.clear()
    two.lanes.clear()
    await engine.close()
    return before, after, known


@pytest.mark.parametrize("age", [400.0, engine_mod.SITE_FORGET + 1])
def test_a_rule_domain_that_moved_to_other_mx_hosts_takes_its_rule_along(age):
    """This process has no mail for rule.test; its MX moved from mx.one.test to
    mx.two.test.  It was looked up again only an hour after its last answer, whatever
    its TTL: for that hour the rule did not shape its new site here (other processes'
    limit 2, this one's 10: the node's limit not held); and when it was, the old site's
    lanes kept the rule's limit (a domain leaving a site did not have its lanes' limits
    asked again).  Now: looked up again once its answers expire (the upkeep's minute);
    the rule leaves the old site's lanes and goes to the new site's."""
    moved = MxResult("ok", [["mx.two.test"]], domain="rule.test")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        before, after, known = runner.run(asyncio.wait_for(
            _lanes_after(_moving_rule_resolver(), moved, age), LOOP_BOUND))
    assert before == [2, 10]
    assert after == [10, 2] and known


@pytest.mark.parametrize("answer, age, limits, known", [
    # gone (NXDOMAIN, null MX): its rule no longer shapes the site it had
    (MxResult("nxdomain", domain="rule.test"), 400.0, [10, 10], False),
    (MxResult("null_mx", domain="rule.test"), 400.0, [10, 10], False),
    # a lookup that fails for now: the site it had keeps the rule (as mail's lookups
    # use the hosts they had), for an hour after the last answer at most
    (MxResult("temp_fail", reason="timeout", domain="rule.test"), 400.0, [2, 10], True),
    (MxResult("temp_fail", reason="timeout", domain="rule.test"),
     engine_mod.SITE_FORGET + 1, [10, 10], False),
])
def test_a_rule_domain_that_no_longer_resolves(answer, age, limits, known):
    """rule.test no longer resolves: its entry kept its old site for good (looked up every
    minute, the rule shaping hosts the domain may have left long ago)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        before, after, has_site = runner.run(asyncio.wait_for(
            _lanes_after(_moving_rule_resolver(), answer, age), LOOP_BOUND))
    assert before == [2, 10]
    assert (after, has_site) == (limits, known)


def test_a_domain_rules_site_not_found_at_start_is_looked_up_again():
    """The lookup of a rule's domain failed at start (a DNS timeout): it was never tried
    again, and in a process without mail for that domain its rule never shaped its site."""
    resolver = Resolver({"rule.test": MxResult("temp_fail", reason="timeout",
                                               domain="rule.test"),
                         "other.test": MxResult("ok", [["mx.shared.test"]],
                                                domain="other.test")},
                        {"mx.shared.test": ["127.0.0.1"]})

    async def main():
        engine, site, src = await _learnt_rule_engine(resolver)
        before = engine._limits(src, site).connection_limit
        resolver.mx["rule.test"] = MxResult("ok", [["mx.shared.test"]], domain="rule.test")
        engine.forget_old_sites()           # (the upkeep's, once a minute)
        await asyncio.sleep(0.1)
        after = engine._limits(src, site).connection_limit
        await engine.close()
        return before, after

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(asyncio.wait_for(main(), LOOP_BOUND)) == (10, 2)


@pytest.mark.parametrize("pipeline", [True, False])
def test_max_deliveries_per_connection_counts_transactions_the_server_refused(pipeline):
    """max_deliveries_per_connection 1: every message on a connection of its own, also
    after one whose recipients the server refused (no DATA: nothing accepted).  Only
    accepted messages counted, so a connection took transactions without end while the
    server refused or deferred them (a greylisting site, a list of unknown users) -- past
    the limit a site sets per connection."""
    peer = Peer()
    jobs = [job("example.net", "bad1", n=0), job("example.net", "later1", n=1),
            job("example.net", "ok1", n=2)]
    reports = deliver(jobs, mx_to_loopback("example.net"), peer, connection_limit=1,
                      max_deliveries_per_connection=1, pipeline_transactions=pipeline)
    assert sorted(rs[0].outcome for _, rs in reports) == \
        sorted([bus.DELIVERED, bus.DEFERRED, bus.FAILED])
    assert peer.connections == 3


def test_a_job_handed_back_for_its_sites_message_rate_comes_again_when_a_unit_is_due():
    """One message every 10 s, max_wait 0.5 s: the jobs that cannot have a unit in time
    go back to the spool asking to come again when the next one is due -- asked for in
    a second, a deep queue to a slow site went back and forth every second (the lane
    hands back every job it cannot send in time at once)."""
    peer = Peer()
    reports = deliver([job("example.net", f"ok{n}", n=n) for n in range(3)],
                      mx_to_loopback("example.net"), peer, job_timeout_margin=1.0,
                      shaping=[{"domain": "example.net", "max_message_rate": "6/m"}],
                      report_retry=True)
    outcomes = sorted((rs[0].outcome, retry) for _, rs, retry in reports)
    assert [o for o, _ in outcomes] == [bus.DELIVERED, bus.REQUEUED, bus.REQUEUED], outcomes
    assert all(8.0 <= retry <= 10.0 for o, retry in outcomes if o == bus.REQUEUED), outcomes
    assert len(peer.messages) == 1
    # and they say why (mta inspect shows it as the last reply): the site's rate, not a
    # wait of over max_wait for a connection, which they did not have
    texts = [rs[0].text for _, rs, _ in reports if rs[0].outcome == bus.REQUEUED]
    assert all("message rate" in t and "waited over" not in t for t in texts), texts


def test_a_domain_forgotten_and_back_on_its_site_keeps_a_domain_rules_looser_tls_off():
    """tls.example has a rule with starttls = "none"; other.example, without one, shares
    its MX host, so the site's lanes require TLS (the rule speaks for its domain alone).
    other.example unused for an hour is forgotten; a lane made then has the rule's "none";
    when other.example's mail comes back its domain joins the site again -- and the lane
    must require TLS again: it kept "none", other.example's mail sent in clear."""
    resolver = Resolver({d: MxResult("ok", [["mx.shared.test"]], domain=d)
                         for d in ("tls.example", "other.example")},
                        {"mx.shared.test": ["127.0.0.1"]})

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(settings(free_port(), shaping=[
            {"domain": "tls.example", "starttls": "none"}], starttls="required"),
            resolver, None, loop)
        src = engine.sources["default"]
        site = await engine._site_of("tls.example")
        await engine._site_of("other.example")
        assert engine._limits(src, site).starttls == "required"
        old, _, expires = engine.domain_site["other.example"]
        engine.domain_site["other.example"] = (old, loop.time() - engine_mod.SITE_FORGET - 1,
                                               expires)
        engine.forget_old_sites()
        assert "other.example" not in site.shaped
        lane = site.lanes["default"] = engine_mod.Lane(src, site, engine._limits(src, site))
        before = lane.limits.starttls
        await engine._site_of("other.example")
        site.lanes.clear()
        await engine.close()
        return before, lane.limits.starttls

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        before, after = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert (before, after) == ("none", "required")


def test_a_source_suspension_lasts_its_period_whatever_the_wall_clock_does(monkeypatch):
    # A source that could not be used is suspended for egress.suspend_time: an interval
    # of this process.  The wall clock stepped back an hour meanwhile (NTP) must not
    # keep it suspended an hour longer -- its mail handed back to the spool with a
    # wait of an hour -- nor one stepped forward end it at once.
    real_wall, real_mono = engine_mod.time.time, engine_mod.time.monotonic

    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(settings(free_port()), mx_to_loopback("x.test"),
                        lambda *a, **k: None, loop)
        src = next(iter(engine.sources.values()))
        period = engine.egress.suspend_time
        engine._suspend(src, engine_mod.SourceUnavailable("cannot bind"))
        out = []
        for step in (-3600.0, 0.0, 86400.0):
            monkeypatch.setattr(engine_mod.time, "time", lambda s=step: real_wall() + s)
            now = engine_mod.time.time()
            out.append((engine._held(src.name, "x.test", now) - now,
                        engine.status()["sources"][src.name]["suspended_until"] - now))
        monkeypatch.setattr(engine_mod.time, "monotonic", lambda: real_mono() + period + 1)
        out.append((engine._held(src.name, "x.test", engine_mod.time.time()),
                    engine.status()["sources"][src.name]["suspended_until"]))
        monkeypatch.setattr(engine_mod.time, "monotonic", real_mono)
        monkeypatch.setattr(engine_mod.time, "time", real_wall)
        await engine.close()
        return out, period

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out, period = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    for left, shown in out[:3]:
        assert 0 < left <= period and 0 < shown <= period
    assert out[3] == (0.0, 0.0)


class _Overlapping(Peer):
    """A Peer that holds each DATA 0.2 s and counts its simultaneous connections."""

    def __init__(self):
        super().__init__()
        self.open = 0
        self.most = 0

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.2)
        return await super().handle_DATA(server, session, envelope)

    def protocol(self):
        peer = self

        class Counted(AiosmtpdServer):
            def connection_made(self, transport):
                peer.open += 1
                peer.most = max(peer.most, peer.open)
                super().connection_made(transport)

            def connection_lost(self, exc):
                peer.open -= 1
                super().connection_lost(exc)

        self.connections += 1
        return Counted(self, hostname="peer.test", decode_data=False)


def test_a_wildcard_rule_limits_its_domains_site_in_every_delivery_process(tmp_path):
    """Two delivery processes (two engines on one node limiter, as two processes are) and
    a rule *.x.example: connection_limit 1; a.x.example's mail goes to the first (the
    spool sends a domain to its home process), b.test's to the second, both on one MX
    host.  Only the first knew the rule applied to the site: the second opened four
    connections beside the first's one (5 at once, limit 1).  Now the first shares the
    domain (its file in run_dir), the second looks it up as a rule domain."""
    from mta.delivery.main import RuleDomainShare

    peer = _Overlapping()
    resolver = Resolver({d: MxResult("ok", [["mx.shared.test"]], domain=d)
                         for d in ("a.x.example", "b.test")},
                        {"mx.shared.test": ["127.0.0.1"]})

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
        st = settings(server.sockets[0].getsockname()[1],
                      shaping=[{"domain": "*.x.example", "connection_limit": 1}])
        reports = []

        def report(j, results, retry_after=0.0):
            reports.append(results)
        first, second = Engine(st, resolver, report, loop), Engine(st, resolver, report, loop)
        shares = [RuleDomainShare(str(tmp_path), i, 2) for i in range(2)]
        first.submit(job("a.x.example", "ok", n=0))
        for _ in range(100):        # (its lookup: then the upkeep's second, in each)
            if "a.x.example" in first.rule_seen:
                break
            await asyncio.sleep(0.02)
        for share, engine in zip(shares, (first, second)):
            share.tick(engine)
        await asyncio.sleep(0.1)    # (the second's lookup of the shared domain)
        for n in range(4):
            second.submit(job("b.test", "ok", n=n + 1))
        for n in range(2):
            first.submit(job("a.x.example", "ok", n=n + 5))
        for _ in range(400):
            if len(reports) == 7:
                break
            await asyncio.sleep(0.05)
        site = second.domain_site["b.test"][0]
        limit = second._limits(second.sources["default"], site).connection_limit
        await first.close()
        await second.close()
        server.close()
        return len(reports), limit, sorted(os.listdir(tmp_path))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        done, limit, files = runner.run(asyncio.wait_for(main(), LOOP_BOUND))
    assert done == 7 and len(peer.messages) == 7
    assert limit == 1
    assert peer.most == 1, peer.most
    assert files == ["delivery-0.rule-domains.json", "delivery-1.rule-domains.json"]


def test_forgetting_old_sites_goes_a_budget_at_a_time():
    """A pass over every domain -> site entry (20,000 on one provider's site) ran whole
    in one loop turn, once a minute: 50 ms at 100,000 domains.  With a budget a call
    looks at that many entries and the next goes on; the pass still forgets every old
    entry, keeps the recent ones and the rule's domain, and the empty site goes."""
    old = [f"old{i}.example" for i in range(20_000)]
    fresh = [f"new{i}.example" for i in range(50)]
    resolver = Resolver({d: MxResult("ok", [["mx.big.test"]], domain=d)
                         for d in old + fresh + ["rule.test", "other.test"]} |
                        {"gone.test": MxResult("ok", [["mx.gone.test"]], domain="gone.test")},
                        {"mx.big.test": ["127.0.0.1"], "mx.gone.test": ["127.0.0.1"]})

    async def main():
        engine, site, src = await _learnt_rule_engine(resolver)
        for d in old + fresh + ["gone.test"]:
            await engine._site_of(d)
        gone_site = engine.domain_site["gone.test"][0]
        now = engine.loop.time()
        for d in old + ["gone.test"]:
            s, at, until = engine.domain_site[d]
            engine.domain_site[d] = (s, now - engine_mod.SITE_FORGET - 1, until)
        calls, counts = 0, []
        while True:
            calls += 1
            done = engine.forget_old_sites(budget=1000)
            counts.append(len(engine.domain_site))
            if done or calls > 100:
                break
        swept = engine.sweeping
        kept = set(engine.domain_site)
        await engine.close()
        return calls, counts, swept, kept, gone_site in engine.sites.values(), site

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        calls, counts, swept, kept, gone_kept, site = runner.run(
            asyncio.wait_for(main(), LOOP_BOUND))
    total = 20_000 + 50 + 3         # old, fresh, rule.test, other.test, gone.test
    assert calls == 21 and not swept        # 20,053 entries, then 2 sites: 1,000 a call
    assert all(a - b <= 1000 for a, b in zip([total] + counts, counts))
    assert kept == set(fresh) | {"rule.test", "other.test"}
    assert not gone_kept
    assert site.domains == kept


def test_a_retiring_delivery_process_leaves_the_shared_rule_domains_to_its_successor(
        tmp_path):
    """A reload replaces delivery[0]: the old process drains beside its successor, and both
    have delivery-0.rule-domains.json.  The old one's writes (its rule_seen still changes
    while it drains) replaced the new one's list, which the new one wrote only when its own
    changed: the others kept the old configuration's domains, a new wildcard rule's not
    shared (its site sent at the [delivery] limits), and the two wrote one .tmp at once.
    A process that stops writes no more."""
    import types
    from mta.delivery.main import RuleDomainShare

    def engine(*domains):
        return types.SimpleNamespace(rule_seen=dict.fromkeys(domains), rule_seen_version=1,
                                     take_shared_rule_domains=lambda d: taken.append(d))
    taken: list = []
    old, new = engine("a.old.example"), engine("a.new.example")
    old_share = RuleDomainShare(str(tmp_path), 0, 2)
    old_share.tick(old)
    old_share.retire()                  # SIGTERM: it drains
    RuleDomainShare(str(tmp_path), 0, 2).tick(new)      # its successor starts
    old.rule_seen["b.old.example"] = None               # a lookup while it drains
    old.rule_seen_version += 1
    old_share.tick(old)
    RuleDomainShare(str(tmp_path), 1, 2).tick(engine())  # the other process reads
    assert taken[-1] == frozenset({"a.new.example"})
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
