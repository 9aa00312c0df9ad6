"""MX routing resolution with a TTL cache (RFC 5321 §5.1, RFC 7505): leaf library.

What it does: tells delivery where mail for a domain goes.  ``resolve_mx``
turns a recipient domain into MX host names grouped by preference (or a
permanent or temporary reason why there are none); ``resolve_addresses``
turns a host name into its IPv4 then IPv6 addresses; ``resolve_hosts`` does so
for several hosts (a domain's MX hosts) concurrently, at most ``hosts_in_flight``
(delivery.dns_hosts_in_flight) at a time and all within one lookup's bound, so hosts whose zone's server is dead
cost one timeout together, not one each.  A whole route lookup (the MX query,
then its hosts' or the implicit MX's addresses) has one deadline: ``timeout``
plus DEADLINE_SLACK_SECONDS from its start, and, when the MX answer came so late
that less is left, ROUTE_ADDRESS_FLOOR_SECONDS for the addresses (at most
``timeout`` + 0.75 s in all, not a timeout for the MX query and another for the
addresses).
Reads: the nameservers, port and limits it is constructed with (the delivery
role passes its slice of the config).  Only when no nameserver is configured
does it read the system resolver configuration (/etc/resolv.conf).
Writes nothing.  Talks to: the configured DNS servers (UDP, TCP on truncation),
through dnspython's asyncio resolver.  Created after fork, in the process that
uses it, like every resolver (DESIGN invariant 5).

Rules, in order (``MxResult.status``):

- The domain is IDNA-encoded (``mta.idn``: UTS #46, IDNA 2008) and checked
  (LDH labels of 1-63 octets, at most 253 octets, a TLD that is not all
  digits); a bad one is ``nxdomain`` (permanent; the reason says "invalid
  domain name") without a query.  A host name whose addresses are looked up
  (an MX target) is checked so too, but may hold underscores (RFC 2181 §11).  An address literal
  (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) is its own route: no lookup.
- MX query.  NXDOMAIN -> ``nxdomain`` (permanent).  SERVFAIL, REFUSED, a
  timeout, a network error or an answer truncated over TCP too (TC) ->
  ``temp_fail`` (retry later).
- MX records whose exchanges are all "." -> ``null_mx`` (RFC 7505: the domain
  takes no mail; permanent).  A "." among real MX records is ignored, and so
  is an exchange that is an IP address (``MX 10 192.0.2.1.``: not a host name,
  never used as an address); when no other is left, ``no_address``.
- MX records -> ``ok``: host names grouped by preference, lowest first; each
  group is shuffled on every call, so equal preferences share the load.
- No MX (NODATA) -> the domain itself is the implicit MX if it has an A or
  AAAA record (``ok``, ``implicit=True``); if it has neither, ``no_address``
  (permanent); if that lookup fails temporarily, ``temp_fail``.

Cache: one entry per (name, type) looked up, so MX, A and AAAA answers are
shared by every domain and host that needs them.  Positive answers live for
their TTL (the smallest along a CNAME chain) clamped to [min_ttl, max_ttl];
NXDOMAIN and NODATA for the SOA's negative TTL (min of its TTL and MINIMUM,
RFC 2308), or ``negative_ttl`` when there is no SOA, clamped to
[min_ttl, min(negative_ttl, max_ttl)]; temporary failures for
``temp_fail_ttl`` seconds only (a few: enough to absorb a burst of deliveries
to one broken domain, never long enough to delay mail after the DNS recovers).
At most ``cache_size`` entries, least recently used evicted first.
A result says how long it holds (``MxResult.ttl``, ``resolve_addresses_ttl``):
what is left of the TTL of the answers it was made from, at least ``min_ttl``,
so a caller keeping it (delivery's sites) lets it go when the DNS does.
Single-flight: concurrent lookups of one (name, type) share one query, and a
caller that gives up (is cancelled) does not cancel it for the others.

Hot path: a cached lookup is a dict probe, an LRU move and, for MX, a copy and
shuffle of the host groups; no allocation beyond the result.  An uncached
lookup costs one dnspython query (about 220 µs of CPU) bounded by ``timeout``
seconds in all (dnspython's ``lifetime``, with an asyncio deadline behind it).

Failure: never raises for DNS trouble from ``resolve_mx``;
``resolve_addresses`` raises ``DnsTempError`` only when it found no address
and a lookup failed temporarily (an empty list means there is none).
"""
from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mta.idn import MAX_LABEL_OCTETS, MAX_NAME_OCTETS  # noqa: F401 (this module's API too)
from mta.idn import normalize_domain  # noqa: F401 (part of this module's API)
from mta.literal import address_literal  # noqa: F401 (part of this module's API)

# -- statuses --------------------------------------------------------------------------

OK = "ok"
NULL_MX = "null_mx"
NXDOMAIN = "nxdomain"
NO_ADDRESS = "no_address"
TEMP_FAIL = "temp_fail"
PERMANENT = frozenset({NULL_MX, NXDOMAIN, NO_ADDRESS})

# Enhanced status codes (RFC 3463) for DSNs and logs, as Postfix uses them.
DSN_STATUS = {
    OK: "2.0.0",
    NULL_MX: "5.1.10",  # RFC 7505 §4.2: recipient address has null MX
    NXDOMAIN: "5.1.2",  # bad destination system address
    NO_ADDRESS: "5.4.4",  # unable to route
    TEMP_FAIL: "4.4.3",  # directory server failure
}

# -- limits (units in the names) -------------------------------------------------------

TEMP_FAIL_TTL_SECONDS = 2.0  # default life of a cached temporary failure
MAX_TEMP_FAIL_TTL_SECONDS = 10.0  # "a few seconds", never more
DEADLINE_SLACK_SECONDS = 0.25  # the asyncio deadline behind dnspython's lifetime
# A route lookup's address lookups get what is left of its deadline (timeout + slack since
# its MX query began), at least this: an MX answer that came just in time still leaves the
# cached addresses (and answers a fast server gives) a chance.
ROUTE_ADDRESS_FLOOR_SECONDS = 0.5
EDNS_PAYLOAD_OCTETS = 1232  # DNS flag day 2020 value
MIN_SERVER_TIMEOUT_SECONDS = 1.0  # the least one nameserver is given (within the lookup's bound)
# resolve_hosts: the host names whose addresses are looked up at once for one caller (a
# domain's MX hosts: each host is an A and an AAAA query, so twice as many queries); the
# default of delivery.dns_hosts_in_flight and of the Resolver's hosts_in_flight.  As many
# as the MX hosts delivery looks up (mta.delivery.engine.MAX_MX_HOSTS): a host past the
# window is asked only when one before it is answered, so behind that many hosts whose
# DNS is dead it was asked when their lookups timed out, at or past the route's deadline
# (what the MX query left of it): not at all.  Twice the queries at once for a domain
# with more than 5 MX hosts not cached, none more for the others.
HOSTS_IN_FLIGHT = 10

_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA
_MX = dns.rdatatype.MX
_TC = dns.flags.TC

_LK_OK = 0  # records found
_LK_NXDOMAIN = 1
_LK_NODATA = 2
_LK_TEMP = 3

# Failure kinds counted in cache_stats() (for /metrics): by outcome, and a
# temporary failure by what its reason says (see _query).
_FAILURE_KIND = {_LK_NXDOMAIN: "nxdomain", _LK_NODATA: "nodata"}


def _temp_kind(reason: str) -> str:
    if "timed out" in reason:
        return "timeout"
    if "server failure" in reason:
        return "servfail"
    return "error"


class DnsTempError(Exception):
    """A name's addresses are unknown for now (SERVFAIL, timeout, network error)."""


@dataclass(slots=True)
class MxResult:
    """Where mail for a domain goes, or why it goes nowhere."""

    status: str
    hosts: list[list[str]] = field(default_factory=list)  # by preference, lowest first
    reason: str = ""
    domain: str = ""  # ASCII (A-label) form
    implicit: bool = False  # no MX: the domain itself is the MX
    # seconds the answer holds (what is left of its cached TTL, at least min_ttl);
    # None: no DNS answer behind it (an address literal, an invalid name, a failure)
    ttl: float | None = None

    @property
    def permanent(self) -> bool:
        """True when the mail must bounce (null MX, NXDOMAIN or invalid name, no address)."""
        return self.status in PERMANENT

    @property
    def temporary(self) -> bool:
        return self.status == TEMP_FAIL

    @property
    def dsn_status(self) -> str:
        """RFC 3463 enhanced status code for a DSN or log line."""
        return DSN_STATUS[self.status]


class _Lookup:
    """The outcome of one (name, type) query, as cached."""

    __slots__ = ("kind", "records", "ttl", "reason", "expires")

    def __init__(self, kind: int, records: tuple, ttl: float, reason: str = ""):
        self.kind = kind
        self.records = records  # MX: ((preference, host), ...); A/AAAA: (address, ...)
        self.ttl = ttl
        self.reason = reason
        self.expires = 0.0  # on the resolver's clock, set when it is fetched


def normalize_host(host: str) -> str | None:
    """``normalize_domain`` for a host name from the DNS (an MX or CNAME target) or a
    route: its labels may also hold underscores (RFC 2181 §11), a mail domain's not."""
    name = normalize_domain(host)
    if name is None and isinstance(host, str) and "_" in host and host.isascii():
        # each underscore checked as a letter would be (an ASCII name only changes case)
        if normalize_domain(host.replace("_", "x")) is not None:
            name = (host[:-1] if host.endswith(".") else host).lower()
    return name


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


class Resolver:
    """MX and address resolution through explicit nameservers, with a TTL cache."""

    def __init__(self, nameservers: list[str | tuple[str, int]] | None, *, port: int = 53,
                 timeout: float = 5.0, cache_size: int = 100_000, negative_ttl: float = 300.0,
                 min_ttl: float = 5.0, max_ttl: float = 86400.0,
                 temp_fail_ttl: float = TEMP_FAIL_TTL_SECONDS, ipv6: bool = True,
                 hosts_in_flight: int = HOSTS_IN_FLIGHT,
                 loop: asyncio.AbstractEventLoop | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """Set up; no I/O except reading /etc/resolv.conf when ``nameservers`` is empty.

        Each nameserver is an IP address (asked on ``port``) or an ``(ip, port)`` pair.
        ``timeout`` bounds one lookup in all (retries and failover included); each
        nameserver is given an equal share of it (at least MIN_SERVER_TIMEOUT_SECONDS).
        ``ipv6=False`` skips AAAA lookups.  ``hosts_in_flight``: ``resolve_hosts``'
        default window (hosts looked up at once).  ``loop`` pins the loop the shared queries
        run on (default: the running loop at call time).  ``clock`` is the monotonic
        clock the cache ages by (tests pass their own).
        """
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        if negative_ttl < 0:
            raise ValueError("negative_ttl must be >= 0")
        if not 0 <= temp_fail_ttl <= MAX_TEMP_FAIL_TTL_SECONDS:
            raise ValueError(f"temp_fail_ttl must be in [0, {MAX_TEMP_FAIL_TTL_SECONDS}]")
        if hosts_in_flight < 1:
            raise ValueError("hosts_in_flight must be >= 1")
        self._hosts_in_flight = hosts_in_flight
        if nameservers:
            servers = []
            for ns in nameservers:
                host, ns_port = (ns, port) if isinstance(ns, str) else ns
                ip = _ip(host)
                if ip is None:
                    raise ValueError(f"nameserver {host!r} is not an IP address")
                if not 0 < ns_port < 65536:
                    raise ValueError(f"nameserver {host!r}: port {ns_port} out of range")
                # a Nameserver object carries its own port (Resolver.port is one for all)
                servers.append(dns.nameserver.Do53Nameserver(ip, ns_port))
            # explicit servers only: never read the system configuration
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = servers
        else:
            res = dns.asyncresolver.Resolver(configure=True)
        res.port = port
        # ``lifetime`` bounds the lookup; ``timeout`` is one server's share of it, so a
        # silent first nameserver leaves time to ask the next one.
        share = timeout / max(1, len(res.nameservers))
        res.timeout = max(share, min(timeout, MIN_SERVER_TIMEOUT_SECONDS))
        res.lifetime = timeout
        res.cache = None  # ours is below
        res.retry_servfail = False
        res.use_edns(0, 0, EDNS_PAYLOAD_OCTETS)
        self._dns = res
        self._timeout = timeout
        self._cache_size = cache_size
        self._negative_ttl = negative_ttl
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._temp_fail_ttl = temp_fail_ttl
        self._ipv6 = ipv6
        self._loop = loop
        self._clock = clock
        self._cache: OrderedDict[tuple[str, int], tuple[float, _Lookup]] = OrderedDict()
        self._inflight: dict[tuple[str, int], asyncio.Future] = {}
        self._stats = dict.fromkeys(
            ("hits", "misses", "queries", "coalesced", "evictions", "expired", "temp_failures",
             "nxdomain", "nodata", "timeout", "servfail", "error"), 0)
        # Set by the owner to an object with observe(seconds): each query's latency.
        self.query_seconds = None

    # -- public API ------------------------------------------------------------------------

    async def resolve_mx(self, domain: str) -> MxResult:
        """Resolve a recipient domain to MX host groups (see the module doc for the rules)."""
        literal = address_literal(domain)
        if literal is not None:
            return MxResult(OK, [[literal]], "", domain, implicit=True)
        name = normalize_domain(domain)
        if name is None:
            return MxResult(NXDOMAIN, [], f"invalid domain name {domain!r}", domain)
        started = time.monotonic()
        mx = await self._lookup(name, _MX)
        if mx.kind == _LK_TEMP:
            return MxResult(TEMP_FAIL, [], mx.reason, name)
        if mx.kind == _LK_NXDOMAIN:
            return MxResult(NXDOMAIN, [], f"{name}: domain does not exist (NXDOMAIN)", name)
        if mx.kind == _LK_OK:
            groups = _groups(mx.records)
            if not groups:
                if any(host != "." for _, host in mx.records):
                    return MxResult(NO_ADDRESS, [], f"{name}: MX records name no host "
                                    "(an IP address is not a host name)", name)
                return MxResult(NULL_MX, [], f"{name}: null MX, the domain accepts no mail", name)
            for g in groups:
                if len(g) > 1:
                    random.shuffle(g)
            return MxResult(OK, groups, "", name, ttl=self._left((mx,)))
        # NODATA: the domain itself is the implicit MX (RFC 5321 §5.1), looked up within
        # what is left of the route's deadline, as MX hosts are (the queries go on for
        # the cache)
        (got,) = await self.resolve_hosts([name], since=started)
        if isinstance(got, DnsTempError):
            return MxResult(TEMP_FAIL, [], str(got), name)
        addresses, ttl = got
        if not addresses:
            return MxResult(NO_ADDRESS, [], f"{name}: no MX and no A/AAAA record", name)
        # as long as both hold: the MX records may appear, the addresses change
        return MxResult(OK, [[name]], "", name, implicit=True,
                        ttl=min(ttl, self._left((mx,))))

    async def resolve_addresses(self, host: str) -> list[str]:
        """A host's IPv4 then IPv6 addresses ([] when it has none).

        An IP literal is returned as it is.  Raises ``DnsTempError`` when no
        address was found and a lookup failed temporarily.
        """
        return (await self.resolve_addresses_ttl(host))[0]

    async def resolve_addresses_ttl(self, host: str) -> tuple[list[str], float]:
        """A host's addresses as ``resolve_addresses``, and the seconds they hold.

        The seconds are what is left of the TTL of the answers that gave an
        address (at least ``min_ttl``; ``max_ttl`` for an IP literal or none).
        """
        answer, name = self._without_query(host)
        if answer is not None:
            return answer
        if self._ipv6:
            a, aaaa = self._cached((name, _A)), self._cached((name, _AAAA))
            if a is None and aaaa is None:  # both in parallel; no task when cached
                a, aaaa = await asyncio.gather(self._lookup(name, _A), self._lookup(name, _AAAA))
            elif a is None:
                a = await self._lookup(name, _A)
            elif aaaa is None:
                aaaa = await self._lookup(name, _AAAA)
            return self._addresses_of((a, aaaa))
        return self._addresses_of((await self._lookup(name, _A),))

    def _addresses_of(self, used) -> tuple[list[str], float]:
        """A host's addresses and the seconds they hold, from its A (and AAAA) lookups."""
        found = [ip for lk in used for ip in lk.records]
        if not found:
            failed = [lk.reason for lk in used if lk.kind == _LK_TEMP]
            if failed:
                raise DnsTempError("; ".join(failed))
        return found, self._left([lk for lk in used if lk.kind == _LK_OK])

    def route_left(self, started: float) -> float:
        """Seconds left for the address lookups of a route lookup whose MX query began at
        *started* (``time.monotonic()``): what is left of ``timeout`` plus
        DEADLINE_SLACK_SECONDS since then, at least ROUTE_ADDRESS_FLOOR_SECONDS."""
        spent = time.monotonic() - started
        return max(self._timeout + DEADLINE_SLACK_SECONDS - spent, ROUTE_ADDRESS_FLOOR_SECONDS)

    async def resolve_hosts(self, hosts: list[str], *, in_flight: int | None = None,
                            deadline: float | None = None, since: float | None = None) -> list:
        """Each host's ``resolve_addresses_ttl`` (its addresses and the seconds they
        hold) or the ``DnsTempError`` it raised, in the order of *hosts*.

        The lookups run concurrently, at most *in_flight* hosts at a time (default: the
        resolver's ``hosts_in_flight``), all within
        *deadline* seconds (default: one lookup's bound, ``timeout`` plus
        DEADLINE_SLACK_SECONDS): hosts whose names the DNS does not answer for cost
        one timeout together, not one each.  *since*: the ``time.monotonic()`` at which
        the route lookup they belong to began (its MX query): the deadline is then
        ``route_left(since)``, so the MX query and the addresses share one bound.  A
        host not answered by the deadline
        (its lookup still waiting, or not begun) is a ``DnsTempError``; a query cut
        short goes on for the cache (single-flight).  Answers all in the cache: no
        task, no wait.
        """
        out: list = [None] * len(hosts)
        todo = []
        for i, host in enumerate(hosts):
            got = self._addresses_now(host)
            if got is None:
                todo.append(i)
            else:
                out[i] = got
        if todo:
            if deadline is None:
                deadline = (self._timeout + DEADLINE_SLACK_SECONDS if since is None
                            else self.route_left(since))
            got = await gather_hosts(self.resolve_addresses_ttl, [hosts[i] for i in todo],
                                     in_flight=in_flight or self._hosts_in_flight,
                                     deadline=deadline)
            for i, r in zip(todo, got):
                out[i] = r
        return out

    def _without_query(self, host: str) -> tuple:
        """(*host*'s addresses and the seconds they hold, None) when no query can tell
        more -- an IP address is its own, an invalid name has none -- else (None, the
        name to look up)."""
        ip = _ip(host)
        if ip is not None:
            return ([ip], self._max_ttl), None
        name = normalize_host(host)
        if name is None:
            return ([], self._max_ttl), None
        return None, name

    def _addresses_now(self, host: str):
        """``resolve_hosts``' answer for *host* when no query is needed (an IP address,
        an invalid name, cached answers), else None."""
        answer, name = self._without_query(host)
        if answer is not None:
            return answer
        keys = ((name, _A), (name, _AAAA)) if self._ipv6 else ((name, _A),)
        now = self._clock()
        cache = self._cache
        used = []
        for key in keys:   # every answer live (looked at without counting a hit)
            entry = cache.get(key)
            if entry is None or entry[0] <= now:
                return None
            used.append(entry[1])
        for key in keys:   # (the answers read, by the one reading of the clock above)
            cache.move_to_end(key)
            self._stats["hits"] += 1
        try:
            return self._addresses_of(used)
        except DnsTempError as e:
            return e

    def cache_stats(self) -> dict[str, int]:
        """Counters since start, for metrics.

        hits: answered from the cache; misses: not in it (or expired), of
        which ``coalesced`` joined a query already in flight and ``queries``
        were sent; expired, evictions (LRU), temp_failures (queries that
        failed temporarily); nxdomain, nodata, timeout, servfail, error: queries
        without an answer by kind; size, capacity and inflight are current values.
        """
        out = dict(self._stats)
        out["size"] = len(self._cache)
        out["capacity"] = self._cache_size
        out["inflight"] = len(self._inflight)
        return out

    def _left(self, lookups) -> float:
        """Seconds the answers of *lookups* still hold, the least of them, clamped to
        [min_ttl, max_ttl] (max_ttl for none)."""
        now = self._clock()
        left = min((lk.expires - now for lk in lookups), default=self._max_ttl)
        return min(max(left, self._min_ttl), self._max_ttl)

    def clear(self) -> None:
        """Forget every cached answer (e.g. on reload)."""
        self._cache.clear()

    def close(self) -> None:
        """Cancel the queries in flight (their waiters see CancelledError)."""
        for fut in list(self._inflight.values()):
            fut.cancel()
        self._inflight.clear()

    # -- cache and single-flight ------------------------------------------------------------

    def _cached(self, key: tuple[str, int]) -> _Lookup | None:
        """The live cache entry for key (counted as a hit), or None."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry[0] > self._clock():
            self._cache.move_to_end(key)
            self._stats["hits"] += 1
            return entry[1]
        del self._cache[key]
        self._stats["expired"] += 1
        return None

    async def _lookup(self, name: str, rdtype: int) -> _Lookup:
        """The cached or shared answer for (name, type), querying once if needed."""
        key = (name, rdtype)
        hit = self._cached(key)
        if hit is not None:
            return hit
        self._stats["misses"] += 1
        fut = self._inflight.get(key)
        if fut is None:
            loop = self._loop or asyncio.get_running_loop()
            fut = loop.create_task(self._fetch(key))
            self._inflight[key] = fut
            fut.add_done_callback(lambda f, k=key: self._settled(k, f))
        else:
            self._stats["coalesced"] += 1
        # shield: one waiter's cancellation must not cancel the query for the others
        return await asyncio.shield(fut)

    def _settled(self, key, fut) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            fut.exception()  # retrieved here, so a query nobody waits for any more logs nothing

    async def _fetch(self, key: tuple[str, int]) -> _Lookup:
        self._stats["queries"] += 1
        t = time.monotonic()
        result = await self._query(*key)
        result.expires = self._clock() + result.ttl
        if self.query_seconds is not None:
            self.query_seconds.observe(time.monotonic() - t)
        if result.kind != _LK_OK:
            self._stats[_FAILURE_KIND.get(result.kind) or _temp_kind(result.reason)] += 1
        if result.kind == _LK_TEMP:
            self._stats["temp_failures"] += 1
        self._store(key, result)
        return result

    def _store(self, key, result: _Lookup) -> None:
        if self._cache_size == 0 or result.ttl <= 0:
            return
        cache = self._cache
        cache[key] = (self._clock() + result.ttl, result)
        cache.move_to_end(key)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)
            self._stats["evictions"] += 1

    # -- one query ----------------------------------------------------------------------------

    def _positive_ttl(self, ttl: float) -> float:
        return min(max(ttl, self._min_ttl), self._max_ttl)

    def _negative(self, kind: int, response) -> _Lookup:
        """NXDOMAIN/NODATA, cached per the SOA in the authority section (RFC 2308 §5)."""
        ttl = self._negative_ttl
        if response is not None:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                    ttl = min(rrset.ttl, rrset[0].minimum)
                    break
        ttl = min(max(ttl, self._min_ttl), min(self._negative_ttl, self._max_ttl))
        return _Lookup(kind, (), ttl)

    async def _query(self, name: str, rdtype: int) -> _Lookup:
        """Ask the nameservers once; classify the outcome (never raises for DNS trouble)."""
        what = f"{name} {dns.rdatatype.to_text(rdtype)}"
        temp = self._temp_fail_ttl
        try:
            qname = dns.name.from_text(name, origin=dns.name.root)
            async with asyncio.timeout(self._timeout + DEADLINE_SLACK_SECONDS):
                answer = await self._dns.resolve(qname, rdtype, raise_on_no_answer=False,
                                                 lifetime=self._timeout, search=False)
        except dns.resolver.NXDOMAIN as e:
            responses = e.kwargs.get("responses") or {}
            return self._negative(_LK_NXDOMAIN, next(iter(responses.values()), None))
        except dns.resolver.NoNameservers as e:
            return _Lookup(_LK_TEMP, (), temp, f"{what}: {_server_errors(e)}")
        except (dns.exception.Timeout, TimeoutError):
            return _Lookup(_LK_TEMP, (), temp, f"{what}: timed out after {self._timeout:g}s")
        except (dns.exception.DNSException, OSError, ValueError) as e:
            return _Lookup(_LK_TEMP, (), temp, f"{what}: lookup failed ({type(e).__name__})")
        if answer.response.flags & _TC:
            # Truncated over TCP as well (dnspython retries a truncated UDP answer over
            # TCP, and takes what TCP gives): a part of the records, maybe none of them.
            # Read as an answer, an empty one was NODATA -- the implicit MX instead of
            # the MX hosts, or a host "without addresses" and a bounce.
            return _Lookup(_LK_TEMP, (), temp, f"{what}: truncated answer (TC) over TCP")
        rrset = answer.rrset
        if rrset is None or len(rrset) == 0:
            return self._negative(_LK_NODATA, answer.response)
        ttl = self._positive_ttl(answer.chaining_result.minimum_ttl)
        if rdtype == _MX:
            records = tuple((rd.preference, _host(rd.exchange)) for rd in rrset)
        else:
            records = tuple(dict.fromkeys(rd.address for rd in rrset))  # server's order
        return _Lookup(_LK_OK, records, ttl)


async def gather_hosts(lookup, hosts: list[str], *, in_flight: int, deadline: float) -> list:
    """``lookup(host)`` for each of *hosts*, at most *in_flight* at a time, all within
    *deadline* seconds: each one's result or the ``DnsTempError`` it raised, in the order
    of *hosts*; one not done by the deadline (waiting, or not begun) is a DnsTempError."""
    if in_flight < 1:
        raise ValueError("in_flight must be >= 1")
    if not hosts:
        return []
    gate = asyncio.Semaphore(in_flight)
    out: list = [None] * len(hosts)

    async def one(i: int, host: str) -> None:
        async with gate:
            try:
                out[i] = await lookup(host)
            except DnsTempError as e:
                out[i] = e

    tasks = [asyncio.ensure_future(one(i, h)) for i, h in enumerate(hosts)]
    try:
        await asyncio.wait(tasks, timeout=deadline)
    finally:
        for t in tasks:
            t.cancel()   # (a query of the resolver is shielded: it goes on for the cache)
    for t in tasks:      # a bug, not DNS trouble: raised, as a lookup one at a time did
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()
    for i, host in enumerate(hosts):
        if out[i] is None:
            out[i] = DnsTempError(f"{host}: no answer within {deadline:g}s")
    return out


def _host(exchange: dns.name.Name) -> str:
    """An MX exchange as a lower-case name without the final dot; "." for the root (null MX)."""
    if exchange == dns.name.root:
        return "."
    return exchange.to_text(omit_final_dot=True).lower()


def _groups(records: tuple) -> list[list[str]]:
    """MX (preference, host) pairs as host groups by preference, lowest first; "." and
    IP addresses dropped (an MX names a host, RFC 5321 §5.1; Postfix and Exim ignore
    an MX record whose "name" is an address)."""
    best: dict[str, int] = {}
    for pref, host in records:
        if host == "." or not host or _ip(host) is not None:
            continue
        if host not in best or pref < best[host]:
            best[host] = pref
    by_pref: dict[int, list[str]] = {}
    for host, pref in best.items():
        by_pref.setdefault(pref, []).append(host)
    return [sorted(by_pref[p]) for p in sorted(by_pref)]


def _server_errors(e: dns.resolver.NoNameservers) -> str:
    """What each nameserver said, without internals: 'SERVFAIL', 'REFUSED', 'no reply'."""
    said = []
    for err in e.kwargs.get("errors") or ():
        what = err[3] if len(err) > 3 else err
        if isinstance(what, str):
            said.append(what)
        elif isinstance(what, OSError):
            said.append("unreachable")
        elif isinstance(what, dns.exception.Timeout):
            said.append("no reply")
        else:
            said.append("bad reply")
    return "server failure (" + ", ".join(dict.fromkeys(said) or ["no server"]) + ")"
