"""How a webhook target's name is looked up (mta.api.webhook_dns), in-process on uvloop:
through the node's DNS resolver, asking a scripted DNS server on loopback (ScriptedDns of
tests/test_dns.py), never getaddrinfo; the POSTs go to a receiver on loopback.

The daemon's side (a webhook whose name answers is not held up by five whose names never
do; the machine's resolver never asked) is in tests/integration/test_webhooks.py.
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import time

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop

from mta.api import webhooks as W
from mta.config.schema import Config

sys.path.insert(0, os.path.dirname(__file__))
from receiver import Receiver  # noqa: E402
from test_dns import ScriptedDns  # noqa: E402

TIMEOUT = 1.0       # delivery.dns_timeout of these tests


def _answer(q, tcp):
    """good.hooks.test and admin.hooks.test: 127.0.0.1 (TTL 300, no AAAA); v6.hooks.test:
    ::1 only; silent-*: no answer; every other name NXDOMAIN."""
    name = q.question[0].name.to_text(omit_final_dot=True)
    rdtype = q.question[0].rdtype
    if name.startswith("silent-"):
        return None
    r = dns.message.make_response(q)
    if name in ("good.hooks.test", "admin.hooks.test"):
        if rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "A", "127.0.0.1"))
    elif name == "v6.hooks.test":
        if rdtype == dns.rdatatype.AAAA:
            r.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "AAAA", "::1"))
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r


def _run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@pytest.fixture
def rec():
    r = Receiver()
    yield r
    r.close()


def _port(rec) -> int:
    return int(rec.url.rsplit(":", 1)[1].split("/")[0])


def _hook(url: str) -> W.Hook:
    return W.Hook(id="h", name="h", target=url, events=frozenset(["delivery"]))


async def _with_session(fn, admin=(), ipv6=True):
    """fn(session, srv) with a session whose resolver asks a ScriptedDns; closes both."""
    async with ScriptedDns(_answer) as srv:
        resolver = W.new_resolver([("127.0.0.1", srv.port)], TIMEOUT, ipv6)
        session = W.new_session(admin, resolver)
        try:
            return await fn(session, srv, resolver)
        finally:
            await session.close()
            await resolver.close()


def test_a_target_name_is_asked_of_the_nodes_dns_servers(rec):
    async def go(session, srv, resolver):
        resp = await W.post(session, _hook(f"http://good.hooks.test:{_port(rec)}/a"),
                            b"[]", "b1", 5.0)
        # a second connection within the TTL asks nothing more (the resolver's cache;
        # aiohttp's own is off)
        again = await resolver.resolve("good.hooks.test", 80, 0)
        return resp, list(srv.queries), again, session.connector.use_dns_cache
    resp, queries, again, aiohttp_cache = _run(_with_session(go))
    assert resp.status == 200 and [h.path for h in rec.hits] == ["/a"]
    assert sorted(queries) == [("good.hooks.test.", "A", False),
                               ("good.hooks.test.", "AAAA", False)]
    assert [(a["host"], a["port"], a["family"]) for a in again] == \
        [("127.0.0.1", 80, socket.AF_INET)]
    assert aiohttp_cache is False


def test_names_that_never_answer_fail_within_the_dns_timeout_and_hold_up_nothing(rec):
    """Eight POSTs to names the DNS never answers, and one to a name it answers: that one
    is done at once, the eight fail as a "connection" failure naming the DNS timeout
    within about delivery.dns_timeout (not the POST's 10 s)."""
    async def go(session, srv, resolver):
        silent = [asyncio.ensure_future(
            W.post(session, _hook(f"http://silent-{i}.hooks.test:{_port(rec)}/s"), b"[]",
                   "b", 10.0)) for i in range(8)]
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        good = await W.post(session, _hook(f"http://good.hooks.test:{_port(rec)}/g"),
                            b"[]", "b", 10.0)
        good_took = time.monotonic() - t0
        pending = sum(not t.done() for t in silent)
        failed = await asyncio.gather(*silent)
        return good, good_took, pending, failed, time.monotonic() - t0
    good, good_took, pending, failed, all_took = _run(_with_session(go))
    # the good one did not wait for them: done while the eight still wait for their DNS
    # (a bound on its time would only measure how busy the machine is)
    assert good.status == 200 and good_took < TIMEOUT, good_took
    assert pending == 8
    assert all_took < TIMEOUT + 1.0
    for i, resp in enumerate(failed):
        assert resp.status == 0 and resp.failure == "connection", resp
        assert f"silent-{i}.hooks.test" in resp.body and "DNS lookup failed" in resp.body
        assert "timed out after 1s" in resp.body
    assert [h.path for h in rec.hits] == ["/g"]


def test_a_name_without_an_address_is_a_connection_failure(rec):
    async def go(session, srv, resolver):
        return await W.post(session, _hook(f"http://nope.hooks.test:{_port(rec)}/"), b"[]",
                            "b", 5.0)
    resp = _run(_with_session(go))
    assert resp.status == 0 and resp.failure == "connection"
    assert "nope.hooks.test: no such name, or no address" in resp.body
    assert rec.hits == []


def test_ipv6_off_asks_no_aaaa_and_a_v6_only_name_has_no_address(rec):
    async def go(session, srv, resolver):
        resp = await W.post(session, _hook(f"http://v6.hooks.test:{_port(rec)}/"), b"[]",
                            "b", 5.0)
        return resp, list(srv.queries)
    resp, queries = _run(_with_session(go, ipv6=False))
    assert queries == [("v6.hooks.test.", "A", False)]
    assert resp.failure == "connection" and "no such name, or no address" in resp.body


@pytest.mark.parametrize("host", ["localhost", "LocalHost.", "api.localhost"])
def test_localhost_is_loopback_without_a_query(rec, host):
    """RFC 6761 §6.3: localhost and names under it are the loopback addresses, and no
    query is sent (127.0.0.1 first: the receiver listens there)."""
    async def go(session, srv, resolver):
        resp = await W.post(session, _hook(f"http://{host}:{_port(rec)}/l"), b"[]", "b",
                            5.0)
        got = await resolver.resolve(host, 80, 0)
        return resp, list(srv.queries), [a["host"] for a in got]
    resp, queries, addrs = _run(_with_session(go))
    assert resp.status == 200 and [h.path for h in rec.hits] == ["/l"]
    assert queries == [] and addrs == ["127.0.0.1", "::1"]


def test_a_name_that_resolves_to_the_admin_listener_is_not_connected_to(rec):
    """admin_guard checks the address connected to: a name the DNS points at this node's
    admin listener (here the receiver's port stands for it) is refused."""
    async def go(session, srv, resolver):
        return await W.post(session, _hook(f"http://admin.hooks.test:{_port(rec)}/x"),
                            b"[]", "b", 5.0)
    resp = _run(_with_session(go, admin=(("127.0.0.1", _port(rec)),)))
    assert resp.status == 0 and resp.failure == "connection"
    assert "admin listener" in resp.body
    assert rec.hits == []


def test_the_apis_create_tests_a_named_target_through_the_nodes_dns_servers(tmp_path, rec):
    """The API (in the acceptors) takes Settings.nameservers: the create's test POST to a
    named target resolves through them; a name they never answer is a 400 naming the
    lookup, not a hang."""
    async def go():
        async with ScriptedDns(_answer) as srv:
            api = W.Api(str(tmp_path), Config(), asyncio.get_running_loop(),
                        nameservers=(("127.0.0.1", srv.port),))
            api.config.delivery.dns_timeout = TIMEOUT
            try:
                doc = {"name": "n", "target": f"http://good.hooks.test:{_port(rec)}/t",
                       "events": ["delivery"]}
                ok = await api.create(doc)
                t0 = time.monotonic()
                with pytest.raises(W.R.ApiError) as err:
                    await api.create(dict(doc, name="m", target=doc["target"].replace(
                        "good", "silent-1")))
                return ok, err.value, time.monotonic() - t0
            finally:
                await api.close()
    (status, _), err, took = _run(go())
    assert status == 200 and [h.path for h in rec.hits] == ["/t"]
    assert err.status == 400 and "silent-1.hooks.test A: timed out" in err.description
    assert took < TIMEOUT + 1.0


def test_without_any_dns_server_a_name_fails_and_ip_targets_still_work(rec):
    """No [delivery] nameservers and no usable /etc/resolv.conf (a container without
    one; here conftest.py's no_system_resolver): a named target fails as a connection
    failure saying what to set; the session is made and IP-address targets are reached."""
    async def go():
        session = W.new_session()
        try:
            named = await W.post(session, _hook(f"http://good.hooks.test:{_port(rec)}/n"),
                                 b"[]", "b", 5.0)
            literal = await W.post(session, _hook(rec.url), b"[]", "b", 5.0)
        finally:
            await session.close()
        return named, literal
    named, literal = _run(go())
    assert named.failure == "connection" and "set [delivery] nameservers" in named.body
    assert literal.status == 200 and len(rec.hits) == 1


def test_a_name_in_the_hosts_file_is_answered_from_it_without_a_query(tmp_path, rec):
    """/etc/hosts is read first, as the system's resolver reads it ("hosts: files dns"):
    a target an operator named there before keeps working; other names go to the DNS."""
    from mta.api.webhook_dns import HostsFile, WebhookResolver

    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n127.0.0.1 old.internal Alias.Internal  # tail\n"
                     "::1 old.internal\nnot-an-address broken.internal\n"
                     "fe80::1%eth0 link.internal\n")
    now = [0.0]

    async def go():
        async with ScriptedDns(_answer) as srv:
            resolver = WebhookResolver([("127.0.0.1", srv.port)], TIMEOUT, True,
                                       HostsFile(str(hosts), clock=lambda: now[0]))
            session = W.new_session((), resolver)
            try:
                resp = await W.post(session, _hook(f"http://old.internal:{_port(rec)}/h"),
                                    b"[]", "b", 5.0)
                first = [a["host"] for a in await resolver.resolve("ALIAS.internal.", 80, 0)]
                dns_name = [a["host"] for a in await resolver.resolve("good.hooks.test", 80, 0)]
                queries = sorted(q[0] for q in srv.queries)
                with pytest.raises(OSError):
                    await resolver.resolve("broken.internal", 80, 0)
                link = [a["host"] for a in await resolver.resolve("link.internal", 80, 0)]
                # edited: seen at the next look (HOSTS_RECHECK), not before
                hosts.write_text("127.0.0.9 old.internal\n")
                before = [a["host"] for a in await resolver.resolve("old.internal", 80, 0)]
                now[0] += 5
                after = [a["host"] for a in await resolver.resolve("old.internal", 80, 0)]
                return resp, first, dns_name, queries, link, before, after
            finally:
                await session.close()
                await resolver.close()
    resp, first, dns_name, queries, link, before, after = _run(go())
    assert resp.status == 200 and [h.path for h in rec.hits] == ["/h"]
    assert first == ["127.0.0.1"]       # (an alias; the ::1 line names old.internal only)
    assert dns_name == ["127.0.0.1"]
    assert queries == ["good.hooks.test.", "good.hooks.test."]    # (A, AAAA): no other
    assert link == ["fe80::1"]
    assert before == ["127.0.0.1", "::1"] and after == ["127.0.0.9"]


def test_the_hosts_files_ipv6_addresses_are_left_out_with_ipv6_off(tmp_path):
    """With delivery.ipv6 off a name's IPv6 addresses in the file are not used; a name it
    gives only IPv6 ones is asked of the DNS (glibc's "files" has nothing for IPv4)."""
    from mta.api.webhook_dns import HostsFile, WebhookResolver

    hosts = tmp_path / "hosts"
    hosts.write_text("::1 six.internal both.internal good.hooks.test\n"
                     "127.0.0.2 both.internal\n")

    async def go():
        async with ScriptedDns(_answer) as srv:
            r = WebhookResolver([("127.0.0.1", srv.port)], TIMEOUT, False,
                                HostsFile(str(hosts)))
            try:
                both = [a["host"] for a in await r.resolve("both.internal", 80, 0)]
                asked = list(srv.queries)
                good = [a["host"] for a in await r.resolve("good.hooks.test", 80, 0)]
                with pytest.raises(OSError) as six:
                    await r.resolve("six.internal", 80, 0)
                return both, asked, good, six.value, list(srv.queries)
            finally:
                await r.close()
    both, asked, good, six, queries = _run(go())
    assert both == ["127.0.0.2"] and asked == []
    assert good == ["127.0.0.1"]            # the DNS's answer, not the file's ::1
    assert "no such name, or no address" in str(six)
    assert queries == [("good.hooks.test.", "A", False), ("six.internal.", "A", False)]
