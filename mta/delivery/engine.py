"""Delivery engine: sites, egress sources and pools, per (source x site) lanes, shaping.

A job is one message's recipients for one domain (they go in one SMTP
transaction).  What happens to it:

1. **Site.**  The recipient domain is resolved to its *site*: the set of
   hosts its mail goes to -- the MX hosts (or the domain's own address when
   it has no MX), or the hosts of a static route (``[[delivery.route]]``,
   exact domain first, then ``*``).  Domains whose MX hosts are the same set
   share one site (MX rollup: every domain Google hosts is one site), so they
   share connections and limits.  A site is named from its host names, e.g.
   ``(alt1.|alt2.|)gmail-smtp-in.l.google.com``, so operators can read it.  A
   domain's site is trusted for as long as the DNS answers it was made from hold
   (the least TTL of its MX and address records, at least the resolver's
   min_ttl, at most SITE_TTL seconds); the next job then waits for it to be
   looked up again, so a receiver that fails over by DNS gets its mail at the new
   address once the old one's TTL is over; when that lookup fails for now (a
   timeout, SERVFAIL), the expired site is used STALE_TTL more at a time (RFC
   8767), at most SITE_FORGET after its last answer.  Null MX, NXDOMAIN and a domain
   without addresses fail its jobs permanently; a DNS timeout or SERVFAIL
   defers them.  An MX host whose address and port are one of our own SMTP
   listeners, or whose server greets with our own host name, is this MTA: only
   better MX hosts are used, and when it is the best the jobs fail with 5.4.6
   (the mail would loop).  With ``delivery.ipv6`` off no AAAA record is looked
   up and no IPv6 address (a route's, an address literal) is a host's.
2. **Source.**  The message's pool (``DeliveryMessageReady.pool``, checked at
   injection) names weighted egress sources; the job goes to one of those that
   may send now, by smooth weighted round robin (so 3:1 weights give exactly
   3:1 over any four messages of the pool, not only on average).  A source
   that cannot be used -- its address is not on this host, its SOCKS5 proxy
   does not answer -- is suspended (``egress.suspend_time``, doubling up to
   ``suspend_time_max``) and its queued jobs move to the pool's other
   sources; when no source of the pool may send, the job goes back to the
   spool as REQUEUED (not an attempt) until the earliest suspension ends.
3. **Lane.**  Jobs wait per (source x site) in a lane: transactional ones
   before bulk ones.  A lane has at most ``connection_limit`` connections
   *node-wide* (slots in :mod:`mta.delivery.limits`, shared by every
   delivery process and freed by the kernel when a process dies), sends at
   most ``max_message_rate`` messages and opens at most
   ``max_connection_rate`` connections (node-wide too), reuses a connection
   for ``max_deliveries_per_connection`` messages and keeps it
   ``idle_timeout`` seconds -- less when another process is waiting for a
   slot of that lane.  A busy lane keeps its share of the slots (the limit over
   the processes, rounded up) while another process waits, and one above the
   share rounded down gives one up to a process that holds none -- with a limit
   below the processes, after ``delivery.slot_turn`` seconds on it: they take
   turns (Engine._yield_slot).  A connection ``delivery.connection_max_age`` seconds
   old takes no new transaction (its current one ends, then QUIT): the next
   message of the lane goes on a new one, to the site's hosts as the DNS now
   says.  A reused connection that the server ends before it
   answers the next envelope (closed, or a 421 to MAIL that no response rule
   takes) sends that job once on a new connection, not counted as an
   attempt.  The limits come from :mod:`mta.shaping` (rules by
   domain, MX pattern or site, optionally per source; presets for the large
   providers; [delivery] defaults).  Lanes are independent tasks: a slow,
   hung or suspended site delays nothing but itself.

Hosts are tried in order (the MX hosts of one preference in a new random order
for each connection): a refused connection, a timeout or a 4xx/5xx greeting
moves on to the next host.  When every host failed, the job and
everything queued in its lane are deferred (the same answer holds for them),
and, unless another connection of that (source x site) works, so are the jobs
for it that come in the next ``retry_schedule[0]`` seconds, without a
connection each ("delivery temporarily suspended: ...", like Postfix's dead
destination); the first job after that tries the site again, as does the first
after ``mta queue flush`` (:meth:`Engine.flush`; ``--domain``/``--queue-id``: of the
sites of the domains flushed).

Outcome per recipient -- ``delivered``, ``deferred`` (4xx, connection or DNS
trouble; a message a worker failed on twice in a row, WORKER_FAILED_AGAIN),
``failed`` (5xx) or ``requeued`` (not attempted) -- with the reply,
the remote host, the source, its address and the site; the spool shard that
owns the message decides when to retry and when to bounce.  Recipients a
server refuses for its recipient limit ("452 4.5.3 too many recipients" after
it accepted others) are sent in further transactions on the same connection
within the same attempt (RFC 5321 4.5.3.1.10; Engine._send_over_limit), each
one more message to the site: a unit of its ``max_message_rate``.

8-bit messages: a server without 8BITMIME gets nothing; the recipients fail
with 554 5.6.3 (we do not down-convert: rewriting a signed message would break
its DKIM signature).  Likewise SMTPUTF8 (553 5.6.7) when an address or a header
needs it; mail received with SMTPUTF8 that needs none goes without it.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import ipaddress
import logging
import random
import time

from mta.bus import (DEFERRED, DELIVERED, FAILED, PRIORITY_TRANSACTIONAL, REQUEUED,
                     DeliveryMessageReady, FiredRule, Result)
from mta.config import hostport, is_ip, parse_hostport
from mta.delivery import client as smtpc
from mta.delivery.adaptive import Adaptive, Warmup
from mta.delivery.limits import CONNECTION_RATE, CONNECTIONS, MESSAGE_RATE, NodeLimiter, limit_key
from mta.delivery.client import Socks5Proxy, SourceUnavailable
from mta.dns import DnsTempError, normalize_domain
from mta.shaping import Shaping

log = logging.getLogger("mta.delivery")

SITE_TTL = 300.0          # seconds a domain's site is used at most (less when its TTL says)
SITE_FORGET = 3600.0      # seconds an unused domain -> site entry is kept at all
STALE_TTL = 30.0          # seconds an expired site is used again when its lookup failed
SLOT_RETRY = 0.05         # seconds between tries for a connection slot another process holds
IDLE_CHECK = 0.25         # seconds between looks, while idle, for another process's demand
MAX_SITE_NAME = 200       # longest site name shown; longer ones end in a hash
STOPPING = "the delivery process is stopping; not attempted"
MIN_REQUEUE = 1.0         # seconds, at least, before a requeued job comes back
# A message whose job a worker failed on (an unexpected error) again within this many
# seconds is deferred, not requeued: the error is likely its own (an envelope it cannot
# make), and requeued it came back each second for good; deferred, the retry schedule
# spaces its tries and max_age ends them with a bounce.  At most WORKER_FAILED_MAX
# messages are remembered (the oldest forgotten first).
WORKER_FAILED_AGAIN = 600.0
WORKER_FAILED_MAX = 1000
YIELD_CHECK = 0.05        # seconds between a busy lane's looks for another process's demand
TURN_DEFER = 1.0          # seconds a lane that gave its slot to a process holding none
                          # leaves it to that one (which asks every SLOT_RETRY)
LEARN_WAIT = 2.0          # seconds the first lookups wait for the shaping rules' domains
# Domains a wildcard domain rule (*.x.example) matches that one process shares with the
# others of the node (Engine.rule_seen), at most: past it the rest are logged, not shared.
MAX_SHARED_RULE_DOMAINS = 10_000
# Opportunistic STARTTLS whose handshake failed: that host is sent to in plaintext for
# this long (as Postfix's "may" level does), at most so many hosts remembered at once.
TLS_FALLBACK_SECONDS = 3600.0
MAX_TLS_FALLBACKS = 10_000
# A domain's MX hosts whose addresses are looked up (the best first), and the addresses
# one connection attempt to an MX site tries (Postfix: smtp_mx_address_limit = 5): a
# domain with a hundred unreachable MX addresses costs one attempt at most this many
# connect timeouts (the spool waits for a job's outcome about one), not a hundred.
MAX_MX_HOSTS = 10
# Characters of a reply's text (or of our own text quoting one) an outcome keeps: what
# its events (raw_reason), the DSN's Diagnostic-Code, the suppression list and the
# spool's last reply carry.  RFC 5321 4.5.3.1.5 gives a reply line 512 octets; a
# refusal of a few lines fits whole.  The client reads replies up to MAX_REPLY_BYTES
# (64 KiB, for a long EHLO list): a hostile receiver's 64 KiB refusal, different for
# each recipient, went whole into each of their outcomes, at every attempt.
MAX_RESULT_TEXT = 2000
_CUT_MARK = " [...]"
MAX_CONNECT_ADDRESSES = 5


def _in_words(exc: BaseException) -> str:
    """What a connection's failure was, for the sender's notice: the error's own words
    ("connection lost waiting for the end of data reply", "Connection refused"), no
    class name."""
    if isinstance(exc, smtpc.SmtpError):
        return str(exc) or "connection failed"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or "connection failed"
    return str(exc) or "failed"


def _decisive(res, k: int):
    """(reply, stage) that decides recipient *k* of a DeliveryResult: its RCPT reply
    ("mail" when MAIL was refused) unless accepted, then the reply to the data."""
    r = res.rcpt_replies[k]
    if r.code < 400 and res.data_reply is not None:
        return res.data_reply, "data"
    return r, "mail" if res.mail_refused else "rcpt"


class Job:
    """One message's recipients for one domain: the spool's job and who sent it."""

    __slots__ = ("msg", "peer", "queued_at", "source", "source_ip", "site", "fired",
                 "retry_after", "tls", "reported", "refreshed", "warm")

    def __init__(self, msg: DeliveryMessageReady, peer: bytes):
        self.msg = msg              # req, qid, sender, domain, rcpts, params, attempt, body, ...
        self.peer = peer            # the spool shard to report to
        self.queued_at = time.monotonic()
        self.source = ""            # the egress source it was (last) given to
        self.source_ip = ""         # the address it left from
        self.site = ""              # the name of its site
        self.fired = None           # bus.FiredRule: the response rule its replies matched
        self.retry_after = 0.0      # a rule's defer: seconds before the next try
        self.tls = ""               # outbound_tls of its session (client.TLS_*); "": none
        self.reported = False       # its outcome went to the spool (once, _finish)
        self.refreshed = False      # sent again on a new connection after a reused one died
        self.warm: list = []        # warm-up counts taken for it, until it is sent (Warmup)

    def results(self, outcome: str, code: int, enhanced: str, text: str, host: str = "",
                ip: str = "", local: bool = False) -> list[Result]:
        """The same result for every recipient of the job; *local*: *host* said none of
        it, the text is ours (Result.local)."""
        if len(text) > MAX_RESULT_TEXT:
            text = _shortened(text)
        return [Result(index=r.index, outcome=outcome, code=code, enhanced=enhanced, text=text,
                       host=host, ip=ip, local=local)
                for r in self.msg.rcpts]


def _shortened(text: str) -> str:
    """*text* cut to MAX_RESULT_TEXT characters, the cut marked."""
    return text[:MAX_RESULT_TEXT - len(_CUT_MARK)] + _CUT_MARK


class Target:
    """Where to connect, with the options that apply."""

    __slots__ = ("host", "ip", "port", "starttls", "tls_verify", "source", "rank")

    def __init__(self, host, ip, port, starttls, tls_verify, source, rank: int = 0):
        self.host = host
        self.ip = ip
        self.port = port
        self.starttls = starttls        # None: the lane's shaping decides
        self.tls_verify = tls_verify
        self.source = source or None    # a static route's own source_address
        self.rank = rank                # an MX host's preference group (0: the first)


class _Stopping(Exception):
    """A connection attempt given up because the process is stopping (Engine.begin_stop)."""


class RouteError(Exception):
    """Routing failed for every recipient of the domain."""

    def __init__(self, outcome: str, code: int, enhanced: str, text: str, fired=None,
                 tls: str = ""):
        super().__init__(text)
        self.outcome = outcome
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.fired = fired          # bus.FiredRule when a response rule matched the reply
        self.tls = tls              # outbound_tls of the last host's failure ("": no session)


class Site:
    """A set of receiving hosts, shared by every domain whose mail goes to them."""

    __slots__ = ("key", "name", "hosts", "targets", "family", "domains", "shaped", "matched",
                 "_matched_key", "lanes", "down", "rotation")

    def __init__(self, key: tuple, name: str, hosts: tuple[str, ...]):
        self.key = key
        self.name = name
        self.hosts = hosts                      # host names (lower case), for shaping's mx rules
        self.targets: list[Target] = []         # in the order to try them
        self.family = 0     # 4 or 6: every target is an address of that IP version (_family)
        self.domains: set[str] = set()
        # The domains shaping rules are matched against: all of an MX site's; for a
        # static route's site only the domains with a route of their own -- mail that a
        # smarthost ('*') carries for gmail.com must not shape the smarthost as Gmail.
        self.shaped: set[str] = set()
        # Those of shaped that a domain rule matches (Shaping.shapes_domain), sorted out as
        # they come and go: the lanes' limits are asked by these and whether shaped holds
        # others, not by a pass over all of shaped (a provider's site: 100,000 domains).
        self.matched: set[str] = set()
        self._matched_key: frozenset | None = frozenset()   # matched, frozen (None: stale)
        self.lanes: dict[str, Lane] = {}        # by source name
        # source name -> (until, on time.monotonic(); RouteError): every host failed from
        # that source; the jobs that come meanwhile get the same answer without a
        # connection (Engine.down)
        self.down: dict[str, tuple[float, RouteError]] = {}
        self.rotation: dict[str, dict[str, int]] = {}   # pool name -> its Pool.pick state

    def forget(self, domain: str) -> bool:
        """*domain* no longer goes to this site (forgotten, unrouted, or moved).  Whether
        the lanes' limits may change: a rule matched it, or it was the last domain that
        none matches (a rule's looser starttls may now speak for all that are left)."""
        self.domains.discard(domain)
        if domain not in self.shaped:
            return False
        self.shaped.discard(domain)
        if domain in self.matched:
            self.matched.discard(domain)
            self._matched_key = None
            return True
        return len(self.shaped) == len(self.matched)

    def shape(self, domain: str, matched: bool) -> bool:
        """*domain* (not yet in shaped) is shaped with the site's domains; *matched*: a
        domain rule matches it.  Whether the lanes' limits may change: a rule may now
        apply, or the domain is the first that no rule matches (a rule's looser starttls
        no longer speaks for all of them); another domain changes nothing."""
        self.shaped.add(domain)
        if matched:
            self.matched.add(domain)
            self._matched_key = None
            return True
        return len(self.shaped) - len(self.matched) == 1

    def shaping_key(self) -> tuple[frozenset, bool]:
        """(matched, whether shaped holds others), as Shaping.site_limits takes them; the
        frozenset is made again only after matched changed."""
        key = self._matched_key
        if key is None:
            key = self._matched_key = frozenset(self.matched)
        return key, len(self.shaped) > len(key)


class Source:
    """An egress source and its suspension."""

    __slots__ = ("name", "address", "ehlo", "proxy", "family", "resume_at", "failures",
                 "reason")

    def __init__(self, cfg, default_ehlo: str):
        self.name = cfg.name
        self.address = cfg.source_address or None
        self.ehlo = cfg.ehlo_name or default_ehlo
        self.proxy = None
        if cfg.socks5_proxy:
            self.proxy = Socks5Proxy.parse(cfg.socks5_proxy, cfg.socks5_username,
                                           cfg.socks5_password)
        # 4 or 6: bound to an address of that IP version, which reaches none of the other
        # (0: the system's choice, or a proxy that connects for it)
        self.family = 0 if not self.address or self.proxy else \
            6 if ":" in self.address else 4
        # time.monotonic() at which a suspension ends (0.0: none): an interval of this
        # process, which a step of the wall clock must not stretch or cut
        self.resume_at = 0.0
        self.failures = 0
        self.reason = ""

    def usable(self) -> bool:
        return not self.resume_at or time.monotonic() >= self.resume_at

    def suspended_until(self, now: float) -> float:
        """The wall-clock instant (*now*: time.time()) the suspension ends; 0.0: none."""
        if not self.resume_at:
            return 0.0
        left = self.resume_at - time.monotonic()
        return now + left if left > 0 else 0.0


class Pool:
    """A weighted set of sources; picks by smooth weighted round robin among the usable ones."""

    __slots__ = ("name", "members", "bound", "current")

    def __init__(self, name: str, members):
        self.name = name
        self.members = list(members)            # [(source name, weight)]
        self.bound = False      # a member is bound to one IP version (Source.family)
        # the rotation of the sites' first picks, whose state a site's own starts from
        # (each starting afresh, every site's first message went from one source)
        self.current: dict[str, int] = {}

    def pick(self, usable, current: dict) -> str | None:
        """*current*: the rotation's state, one per site (Site.rotation): the weights hold
        for each site, whatever the order of the jobs of several sites (one rotation
        for all gave a site one source when its jobs alternated with another's)."""
        total = 0
        best = None
        for src, weight in self.members:
            if not usable(src):
                continue
            current[src] = current.get(src, 0) + weight
            total += weight
            if best is None or current[src] > current[best]:
                best = src
        if best is not None:
            current[best] -= total
        return best


class Lane:
    """The jobs of one (source x site), with their connections and limits."""

    __slots__ = ("source", "site", "key", "connect_key", "message_key", "limits", "urgent", "bulk", "active", "idle",
                 "wakeup", "sent", "retry", "waiting", "rate", "rate_sent", "rate_at",
                 "yield_check", "yielding", "turn_over")

    def __init__(self, source: Source, site: Site, limits):
        self.source = source
        self.site = site
        self.key = limit_key(source.name, site.name, CONNECTIONS)
        self.connect_key = limit_key(source.name, site.name, CONNECTION_RATE)
        self.message_key = limit_key(source.name, site.name, MESSAGE_RATE)
        self.limits = limits
        self.urgent: collections.deque[Job] = collections.deque()   # transactional
        self.bulk: collections.deque[Job] = collections.deque()
        self.active = 0            # workers (each holds a connection slot)
        self.idle = 0              # of which waiting for a job
        self.wakeup = asyncio.Event()
        self.sent = 0              # messages handed to a receiver (any reply)
        self.retry = None          # timer: try for a slot again
        self.waiting = False       # marked as waiting for a slot (node-wide)
        self.rate = 0.0            # messages a second, over the last status interval
        self.rate_sent = 0
        self.rate_at = time.monotonic()
        self.yield_check = 0.0     # when to look next for another process wanting a slot
        self.yielding = 0          # of the workers, those that decided to give theirs up
        self.turn_over = 0.0       # gave a slot to a process holding none: until when
                                   # (monotonic) not to take one back while one such waits

    def queued(self) -> int:
        return len(self.urgent) + len(self.bulk)

    def pop(self) -> Job | None:
        if self.urgent:
            return self.urgent.popleft()
        if self.bulk:
            return self.bulk.popleft()
        return None

    def put_back(self, jobs: list[Job]) -> None:
        """Jobs taken but not sent: back at the front of their queues, in order."""
        for j in reversed(jobs):
            (self.urgent if j.msg.priority >= PRIORITY_TRANSACTIONAL else self.bulk).appendleft(j)

    def drain(self) -> list[Job]:
        jobs = list(self.urgent) + list(self.bulk)
        self.urgent.clear()
        self.bulk.clear()
        return jobs


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _route_key(domain: str) -> str:
    """A route's domain as the routes are looked up by: its A-label form, in lower case
    and without the final dot ("*" and an address literal as they are)."""
    domain = domain.lower().rstrip(".")
    return normalize_domain(domain) or domain


LOCAL_ADDRESSES_TTL = 60.0      # seconds: this host's addresses are read again after it
_local = [0.0, frozenset()]     # (when read, the addresses)


def _read_local_addresses() -> frozenset:
    """This host's own addresses, from the kernel's tables: every IPv4 address the local
    routing table marks "host LOCAL" (/proc/net/fib_trie) and every IPv6 address of an
    interface (/proc/net/if_inet6).  Not "can it be bound": with ip_nonlocal_bind (usual
    beside keepalived) any address can, and every MX would look like this MTA.  Empty
    where the tables cannot be read: then only loopback and the listeners' own
    addresses are known as ours (a loop missed, never a bounce for nothing)."""
    out = set()
    try:
        with open("/proc/net/fib_trie") as f:
            last = None
            for line in f:
                if "|--" in line:
                    last = line.rsplit(None, 1)[-1]
                elif "/32 host LOCAL" in line and last is not None:
                    out.add(last)
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                word = line.split(None, 1)[0] if line.strip() else ""
                if len(word) == 32:
                    out.add(str(ipaddress.IPv6Address(int(word, 16))))
    except (OSError, ValueError):
        pass
    return frozenset(out)


def _local_address(ip: str) -> bool:
    """True when *ip* is an address of this host (loopback, or one of its interfaces')."""
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback:
        return True
    now = time.monotonic()
    if now - _local[0] > LOCAL_ADDRESSES_TTL or not _local[0]:
        _local[0], _local[1] = now, _read_local_addresses()
    return str(addr) in _local[1]


def _connects_to(ip: str) -> str:
    """The address a connection to *ip* reaches: an IPv4-mapped IPv6 address's IPv4 one,
    and for 0.0.0.0 or :: (which name no host) this host's loopback, as the kernel does."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return "127.0.0.1" if addr.version == 4 else "::1"
    return str(addr)


def _family(targets: list[Target]) -> int:
    """4 or 6 when every one of *targets* is an address of that IP version and none has a
    source address of its own (a route's), else 0."""
    v6 = {":" in t.ip for t in targets}
    if len(v6) != 1 or any(t.source for t in targets):
        return 0
    return 6 if v6.pop() else 4


def _shuffled_by_preference(targets: list[Target]) -> list[Target]:
    """An MX site's targets with the hosts of each preference in a new random order.

    RFC 5321 §5.1: equal preferences share the load.  The site's list lives as long
    as its DNS answers (up to SITE_TTL), so it is shuffled for each connection, not
    once; each host's addresses stay together, its IPv4 ones first, each family in a
    new random order too (Postfix's smtp_randomize_addresses): a host published with
    several addresses gets its connections spread over them, not all at the first
    address of the cached answer.
    """
    out: list[Target] = []
    i, n = 0, len(targets)
    while i < n:
        rank = targets[i].rank
        hosts: dict[str, list[Target]] = {}
        while i < n and targets[i].rank == rank:
            hosts.setdefault(targets[i].host, []).append(targets[i])
            i += 1
        group = list(hosts.values())
        if len(group) > 1:
            random.shuffle(group)
        for h in group:
            if len(h) > 1:
                v4 = [t for t in h if ":" not in t.ip]
                v6 = [t for t in h if ":" in t.ip]
                random.shuffle(v4)
                random.shuffle(v6)
                h = v4 + v6
            out.extend(h)
    return out


def site_name(hosts) -> str:
    """A readable name for a set of host names: their common suffix after the alternatives.

    ('alt1.gmail-smtp-in.l.google.com', 'gmail-smtp-in.l.google.com') ->
    '(alt1.|)gmail-smtp-in.l.google.com'; one host is its own name.
    """
    hosts = sorted(hosts)
    if len(hosts) == 1:
        name = hosts[0]
    else:
        rev = [h[::-1] for h in hosts]
        n = 0
        shortest = min(len(r) for r in rev)
        while n < shortest and all(r[n] == rev[0][n] for r in rev):
            n += 1
        suffix = rev[0][:n][::-1]
        cut = suffix.find(".")          # keep whole labels in the suffix
        suffix = suffix[cut:] if cut > 0 else ("" if cut < 0 else suffix)
        if suffix.startswith("."):
            suffix = suffix[1:]
            heads = [h[:len(h) - len(suffix)] for h in hosts]
        else:
            heads = [h[:len(h) - len(suffix)] for h in hosts] if suffix else hosts
        name = "(" + "|".join(heads) + ")" + suffix if suffix else "|".join(hosts)
    if len(name) > MAX_SITE_NAME:
        digest = hashlib.blake2b(name.encode(), digest_size=6).hexdigest()
        name = name[:MAX_SITE_NAME - 13] + "~" + digest
    return name


class Engine:
    def __init__(self, settings, resolver, report, loop, limiter=None, shaping=None,
                 adaptive=None):
        self.settings = settings
        self.cfg = settings.config.delivery
        # tls_verify's context when delivery.tls_ca_file adds CAs (else the client's shared
        # one), from the bytes the supervisor checked (the file may be gone since)
        self.verify_ctx = smtpc.verifying_tls_context(
            self.cfg.tls_ca_file, settings.tls_ca_data) if self.cfg.tls_ca_file else None
        # the longest a job waits in this process before it is handed back (sweep)
        self.max_wait = self.cfg.job_timeout_margin / 2
        self.max_age = self.cfg.connection_max_age     # a connection's, for new transactions
        # the latest (since it came) a job's transaction may begin: it ends (command +
        # data timeouts) a margin before the spool's job timeout sends the job again
        self.send_by = self.cfg.connect_timeout + self.cfg.command_timeout
        self.helo = settings.helo_name
        # our own greeting's name: an MX server that greets with it is this MTA (connect());
        # not "localhost", which many small servers greet with and names no host of ours
        name = (settings.hostname or "").lower().rstrip(".")
        self.own_name = "" if name in ("localhost", "localhost.localdomain") else name
        self.resolver = resolver
        self.report = report        # report(job, results, retry_after=0.0) -> None
        self.loop = loop
        # by the domain's A-label form (RFC 5890): a route written "bücher.de" takes the
        # mail to "xn--bcher-kva.de" too, and the other way round (see _route_of)
        self.routes = {_route_key(r.domain): r for r in self.cfg.route}
        self.sources = {name: Source(cfg, self.helo) for name, cfg in settings.sources.items()}
        fb = settings.config.feedback
        # VERP: the return path names the message (feedback.verp at the first bounce domain)
        self.verp = (fb.verp, fb.bounce_domains[0].lower()) if fb.verp else None
        self.pools = {name: Pool(name, members) for name, members in settings.pools.items()}
        for pool in self.pools.values():
            pool.bound = any(self.sources[s].family for s, _ in pool.members)
        self.unknown_pools: set[str] = set()     # pools of queued mail not configured: warned
        # warm-up overflow: pool -> the pool that takes its mail when its sources are capped
        self.overflow = {p.name: p.overflow_pool for p in settings.config.egress.pool
                         if p.overflow_pool}
        self.egress = settings.config.egress
        self.nodes = settings.config.cluster.nodes   # limits are this node's share
        self.shaping = shaping or Shaping(settings.config.shaping, self.cfg,
                                          presets=self.cfg.shaping_presets, nodes=self.nodes)
        self.limiter = limiter or NodeLimiter(f"{settings.run_dir}/limits")
        # Response rules, back-off, and their durable node-wide state (adaptive.py).
        self.adaptive_read = 0.0          # when adaptive_tick last read the store (time.time())
        self.adaptive = adaptive or Adaptive(settings.config, settings.state_dir,
                                             scale=self.cfg.time_scale,
                                             presets=self.cfg.shaping_presets,
                                             processes=max(1, settings.deliveries),
                                             nodes=self.nodes)
        self.warmup = Warmup(settings.config, self.adaptive.store, self.limiter,
                             scale=self.cfg.time_scale, nodes=self.nodes)
        # Domains named by exact-domain shaping rules: their sites are looked up once
        # delivery starts, so that every process applies a domain's rule to the site
        # of that domain, whichever domains of the site it happens to see itself.
        self.rule_domains = sorted({r.domain.lower().rstrip(".") for r in self._rules()
                                    if r.domain and not r.domain.startswith("*")})
        self.learning: asyncio.Future | None = None
        # A wildcard rule's (*.x.example) domains cannot be looked up ahead: the process
        # that has mail for one of them shares it (rule_seen, written to a file of its own
        # by main.RuleDomainShare), and every other process looks it up as a rule domain
        # (shared_domains), so that the rule shapes its site node-wide -- otherwise only
        # the processes with that domain's mail held its limits, the others sent to the
        # same site at [delivery]'s.  Nothing of it runs without a wildcard rule.
        self.wildcards = any(r.domain and r.domain.strip().startswith("*")
                             for r in self._rules())
        self._exact_rule_domains = frozenset(self.rule_domains)
        self.rule_seen: dict[str, float] = {}   # domain -> loop time of its last lookup for mail
        self.rule_seen_version = 0              # bumped when rule_seen gains or loses a domain
        self.rule_seen_full = False             # MAX_SHARED_RULE_DOMAINS reached (logged once)
        self.shared_domains: frozenset = frozenset()    # the other processes' rule_seen
        self.sites: dict[tuple, Site] = {}
        # forget_old_sites' pass in progress: the domains, then the site keys, it has yet
        # to look at (None: the sites not taken yet)
        self._sweep_domains: list[str] = []
        self._sweep_sites: list[tuple] | None = []
        # Bumped when a site gains or loses a domain, or comes or goes: the caller rewrites
        # the sites file (sites_status()) only then, not with every status.
        self.sites_version = 0
        # domain -> (site, looked up at, until when (loop time) its DNS answers hold)
        self.domain_site: dict[str, tuple[Site, float, float]] = {}
        self.resolving: dict[str, list[Job]] = {}                # domain -> jobs waiting for it
        self.in_flight = 0
        self.stats = collections.Counter()
        self.worker_failed: dict[str, float] = {}   # qid -> when a worker last failed on it
        self.connect_attempts = None    # set for /metrics: .inc((source, site))
        # (ip, port) -> until when opportunistic STARTTLS is skipped: its handshake failed
        self.tls_fallback: dict[tuple[str, int], float] = {}
        self.tasks: set[asyncio.Task] = set()
        self.workers: set[asyncio.Task] = set()
        self.stopping = False
        self.stop_event = asyncio.Event()   # set by begin_stop(): connection attempts give up
        self.pacing: set[asyncio.Future] = set()   # _pace's waits, which begin_stop ends
        self.processes = max(1, settings.deliveries)   # delivery processes sharing the slots
        # Our own SMTP listeners: an MX address (at mx_port) that is one of them is this
        # MTA -- sending there would loop (see targets()).
        own = [(ipaddress.ip_address(h), p) for h, p in settings.listen]
        self.own_listeners = {(str(a), p) for a, p in own if not a.is_unspecified}
        self.own_any_address = {p for a, p in own if a.is_unspecified}
        # cross-transaction pipelining: the next envelope behind the last final dot
        self.pipeline = self.cfg.pipeline_transactions
        # Seconds a (source x site) none of whose hosts took a connection is not tried
        # again (Postfix's "dead destination"): the first retry interval.  The spool
        # sends the next jobs for it as soon as the failed ones come back; each would
        # cost a connection to a site that is down (one per dispatch pass when it
        # refuses: hundreds a second), for as long as its mail is queued.
        self.down = self.cfg.retry_schedule[0] * self.cfg.time_scale

    # --------------------------------------------------------------- intake

    def submit(self, job: Job) -> None:
        self.in_flight += 1
        if self.stopping:
            self._give_back([job], STOPPING)
            return
        domain = job.msg.domain
        waiting = self.resolving.get(domain)
        if waiting is not None:
            waiting.append(job)
            return
        known = self.domain_site.get(domain)
        if known is not None and self.loop.time() < known[2]:
            self._route(job, known[0])
            return
        # unknown, or its DNS answers expired: not to the old hosts, which the
        # receiver may have left (failover by DNS), but to the ones looked up now
        self.resolving[domain] = [job]
        self._task(self._resolve(domain))

    def _rules(self) -> list:
        from mta import shaping

        rules = list(self.settings.config.shaping)
        if self.cfg.shaping_presets and hasattr(shaping, "load_presets"):
            rules = list(shaping.load_presets()) + rules
        return rules

    async def _learn(self, domain: str) -> None:
        """Look up the site of a shaping rule's domain.  When the domain no longer has
        one (NXDOMAIN, null MX: a permanent failure), its rule no longer shapes the site
        it had; a temporary failure keeps that site, as mail's lookups do, up to
        SITE_FORGET after its last answer (the rule's limits hold meanwhile), and the
        upkeep tries again each minute."""
        try:
            await self._site_of(domain)
        except RouteError as exc:
            old = self.domain_site.get(domain)
            if old is not None and (exc.outcome != DEFERRED or
                                    self.loop.time() - old[1] > SITE_FORGET):
                log.info("shaping rule domain %s: %s; its rule no longer shapes site %s",
                         domain, exc.text, old[0].name)
                self._unroute(domain)
            else:
                log.debug("shaping rule domain %s: %s", domain, exc.text)
        except Exception:
            log.exception("looking up the shaping rule domain %s failed", domain)

    async def _learn_rule_domains(self) -> None:
        # (A domain without a route of its own would be learnt through the smarthost
        # ('*'), whose site its rule does not shape: not looked up at all then.)
        learn = self._learn
        await asyncio.gather(*(learn(d) for d in self.rule_domains
                               if d not in self.domain_site and d not in self.resolving
                               and (self._route_of(d) is not None
                                    or "*" not in self.routes)))

    def _task(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _finish(self, job: Job, results: list[Result], retry_after: float = 0.0) -> None:
        if job.reported:        # (a bug: one outcome per job, in_flight counted once)
            log.error("%s: a second outcome for the job was not sent", job.msg.qid)
            return
        job.reported = True
        self.in_flight -= 1
        for r in results:
            self.stats[r.outcome] += 1
        self.report(job, results, retry_after)

    # -------------------------------------------------------------- routing

    async def _resolve(self, domain: str) -> None:
        """Find *domain*'s site; route the jobs that waited for it."""
        try:
            try:
                if self.rule_domains and not (self.learning and self.learning.done()):
                    # First (once): the sites the domain rules name, waited for at most
                    # LEARN_WAIT (a lookup that hangs must not hold up delivery).
                    if self.learning is None:
                        self.learning = self.loop.create_task(self._learn_rule_domains())
                    try:
                        await asyncio.wait_for(asyncio.shield(self.learning),
                                               min(self.cfg.dns_timeout, LEARN_WAIT))
                    except asyncio.TimeoutError:
                        pass
                site = await self._site_of(domain)
            except RouteError as exc:
                old = self.domain_site.get(domain)
                if exc.outcome == DEFERRED and old is not None:
                    # Its answers expired and the lookup fails for now (a timeout,
                    # SERVFAIL): the hosts they named take the mail meanwhile, STALE_TTL
                    # at a time (RFC 8767's serve-stale; at most SITE_FORGET after the
                    # last answer), rather than every job to the domain deferred.
                    log.info("looking up %s again failed (%s); its hosts of %.0f s ago "
                             "are used %.0f s more", domain, exc.text,
                             self.loop.time() - old[1], STALE_TTL)
                    self.domain_site[domain] = (old[0], old[1], self.loop.time() + STALE_TTL)
                    for job in self.resolving.pop(domain, ()):
                        self._route(job, old[0])
                    return
                self._unroute(domain)
                for job in self.resolving.pop(domain, ()):
                    self._fail_route(job, exc)
                return
            except Exception as exc:   # never leave the waiting jobs without an outcome
                log.exception("looking up %s failed", domain)
                err = RouteError(DEFERRED, 451, "4.4.3", f"routing {domain} failed: {exc}")
                self._unroute(domain)
                for job in self.resolving.pop(domain, ()):
                    self._fail_route(job, err)
                return
            if self.wildcards:
                self._seen(domain)
            for job in self.resolving.pop(domain, ()):
                self._route(job, site)
        finally:
            self.resolving.pop(domain, None)

    def _seen(self, domain: str) -> None:
        """This process has mail for *domain* (looked up for it): shared with the others
        when a wildcard rule matches it (an exact rule's domain every process looks up)."""
        if domain in self._exact_rule_domains or not self.shaping.shapes_domain(domain):
            return
        if domain not in self.rule_seen:
            if len(self.rule_seen) >= MAX_SHARED_RULE_DOMAINS:
                if not self.rule_seen_full:
                    self.rule_seen_full = True
                    log.warning("more than %d domains that a wildcard shaping rule matches "
                                "have mail here (%s not shared): the other delivery "
                                "processes apply the rule to the sites of the first %d only",
                                MAX_SHARED_RULE_DOMAINS, domain, MAX_SHARED_RULE_DOMAINS)
                return
            self.rule_seen_version += 1
        self.rule_seen[domain] = self.loop.time()

    def take_shared_rule_domains(self, domains: frozenset) -> None:
        """The domains a wildcard rule matches that other processes of the node have mail
        for: looked up (and then again, not forgotten, as an exact rule's domain is) so
        that their rules shape their sites here too."""
        # (one the smarthost ('*') carries is not: its rule does not shape that site)
        smarthost = "*" in self.routes
        self.shared_domains = frozenset(d for d in domains if not smarthost
                                        or self._route_of(d) is not None)
        for d in self.shared_domains:
            if d not in self.domain_site and d not in self.resolving:
                self._task(self._learn(d))

    def _unroute(self, domain: str) -> None:
        """*domain* has no site now (its lookup failed): out of the one it had too, so
        that site's rules stop shaping for it and the site can be forgotten."""
        old = self.domain_site.pop(domain, None)
        if old is not None:
            self._forget_domain(old[0], domain)
            self.sites_version += 1

    def _forget_domain(self, site: Site, domain: str) -> None:
        """*domain* leaves *site*: the site's lanes have their limits asked again when a
        rule matched it -- a rule's domain whose MX hosts moved left its rule on the lanes
        of the site it had left (gmail.com's rule on hosts Google no longer uses)."""
        if site.forget(domain):
            self._relimit_site(site)

    async def _site_of(self, domain: str) -> Site:
        targets, ttl = await self.targets(domain)
        own = self._route_of(domain)
        route = own or self.routes.get("*")
        if route is not None:
            # Lower case, as the MX site's names are (DNS names are case-insensitive): an
            # operator's site suspension or bounce names the site in lower case.  An
            # IPv6 host in brackets: "::1:2525" would be an address of its own.
            hosts = tuple(hostport(t.host.lower(), t.port) for t in targets)
            # A route's TLS policy and source address are part of its site: two routes to
            # one host with different ones must not share the site's targets (each lookup
            # replaces them, so one route's mail would go with the other's TLS policy).
            # They share its name, and so its node-wide limits and adaptive state.
            key = ("route", route.starttls, route.tls_verify, route.source_address) + \
                tuple(sorted(set(hosts)))
            hostnames = tuple(sorted({t.host.lower() for t in targets}))
        else:
            hostnames = tuple(sorted({t.host.lower().rstrip(".") for t in targets}))
            # The hosts with their preference groups: domains whose MX records name the
            # same hosts in another order of preference are two sites (each lookup
            # replaces a site's targets: one domain's mail would try its backup first).
            # They share the name, so the node-wide limits and adaptive state too.
            key = ("mx", self.cfg.mx_port) + tuple(sorted(
                {(t.rank, t.host.lower().rstrip(".")) for t in targets}))
        site = self.sites.get(key)
        if site is None:
            name = site_name(hosts if route is not None else hostnames)
            site = self.sites[key] = Site(key, name, hostnames)
            self.sites_version += 1
        site.targets = targets
        site.family = _family(targets)
        old = self.domain_site.get(domain)
        if old is not None and old[0] is not site:
            self._forget_domain(old[0], domain)
            self.sites_version += 1
        now = self.loop.time()
        self.domain_site[domain] = (site, now, now + min(ttl, SITE_TTL))
        if domain not in site.domains:
            site.domains.add(domain)
            self.sites_version += 1
        if domain not in site.shaped and (route is None or own is not None):
            # A domain rule may now apply to the site, or (the first of its domains that
            # no domain rule matches) no longer speak for all of them; another domain
            # changes nothing -- asking at each, a provider's site gaining thousands of
            # domains an hour cost a pass over all of them per domain.
            if site.shape(domain, self.shaping.shapes_domain(domain)):
                for lane in site.lanes.values():
                    lane.limits = self._limits(lane.source, site)
        return site

    def _limits(self, source: Source, site: Site):
        return self.adaptive.adjust(source.name, site.name,
                                    self._shaping_limits(source.name, site))

    def _base_limits(self, lane: Lane):
        return self._shaping_limits(lane.source.name, lane.site)

    def _shaping_limits(self, source: str, site: Site):
        # (a cache look-up: the site keeps its domains sorted for it, see Site.shape)
        matched, others = site.shaping_key()
        return self.shaping.site_limits(site.name, site.hosts, matched, others, source)

    def _held(self, source: str, site: str, now: float) -> float:
        """Until when (wall clock) *source* may not send to *site*; 0.0: it may now."""
        src = self.sources[source]
        if not src.resume_at and not self.adaptive.store.entries:
            return 0.0      # (nothing suspended anywhere: asked a few times per message)
        until = src.suspended_until(now)
        e = self.adaptive.suspended(source, site, now)
        if e is not None:
            until = max(until, e.until)
        return until

    def _route(self, job: Job, site: Site) -> None:
        """Give *job* to a usable source of its pool, in that (source x site)'s lane."""
        if self.stopping:
            self._give_back([job], STOPPING)
            return
        if job.warm:     # routed again, unsent (its source was suspended): not its count
            self.warmup.give_back(job.warm)
            job.warm = []
        now = time.time()
        pool = self.pools.get(job.msg.pool)
        if pool is None:       # checked at injection; a pool removed since: its default
            if job.msg.pool not in self.unknown_pools:
                # (once per pool: a line per job, each retry again, flooded the log)
                self.unknown_pools.add(job.msg.pool)
                log.warning("pool %r is not configured (any more); its queued mail (%s "
                            "first) goes by egress.default_pool %r", job.msg.pool,
                            job.msg.qid, self.egress.default_pool)
            pool = self.pools[self.egress.default_pool]
        sources = self.sources
        held = self._held
        warm = self.warmup
        capped: dict[str, float] = {}     # warming sources at a cap: seconds to the rollover
        # Sources bound to the other IP version than every address of the site reach none
        # of them (each attempt deferred: "cannot reach an IPv4 address"): passed over
        # while another source of the pool may send (a pool with a bound source only).
        fam = site.family
        avoid = [s for s, _ in pool.members if sources[s].family not in (0, fam)] \
            if fam and pool.bound else ()

        def usable(s):
            if s in avoid or held(s, site.name, now) > now or s in capped:
                return False
            if s in warm.plans and warm.overflow(s) == "other_sources":
                wait = warm.capped(s, site.name, site.hosts, now)
                if wait > 0:
                    capped[s] = wait
                    return False
            return True

        job.site = site.name
        first = pool
        while True:
            current = site.rotation.get(pool.name)
            if current is None:
                name = pool.pick(usable, pool.current)
                site.rotation[pool.name] = dict(pool.current)
            else:
                name = pool.pick(usable, current)
            if name is None and capped and pool is first and first.name in self.overflow:
                # every usable source of the pool is at its warm-up cap for this site:
                # the pool's overflow pool takes the mail (one hop) -- before a source of
                # the other IP version would (it reaches none of the site's addresses)
                pool = self.pools[self.overflow[first.name]]
                continue
            if name is None and avoid:
                avoid = ()      # no other may send now: as before (each says why)
                continue
            if name is None or name not in warm.plans:
                break
            wait = warm.take(name, site.name, site.hosts, now, job.warm)
            if wait <= 0:
                break
            if warm.overflow(name) == "wait":
                # (this source's answer, named: the spool holds back this job alone, the
                # pool's other sources take their share of the site's mail meanwhile)
                job.source = name
                self._finish(job, job.results(
                    REQUEUED, 451, "4.4.5",
                    f"source {name} is at its warm-up cap for site {site.name}; "
                    f"next try in {wait:.0f}s"), max(MIN_REQUEUE, wait))
                return
            capped[name] = wait
        if name is None:
            until = min([held(s, site.name, now) - now for s, _ in pool.members
                         if s not in capped] + list(capped.values()))
            wait = max(MIN_REQUEUE, until)
            job.source = ""
            why = "suspended or at its warm-up cap" if capped else "suspended"
            self._finish(job, job.results(
                REQUEUED, 451, "4.4.5",
                f"every source of pool {pool.name} is {why} for site {site.name}; "
                f"next try in {wait:.0f}s"), wait)
            return
        source = sources[name]
        job.source = name
        if site.down:
            down = site.down.get(name)
            if down is not None:
                if down[0] > time.monotonic():  # every host failed a moment ago: the same answer
                    self._fail_route(job, down[1])
                    return
                del site.down[name]
        lane = site.lanes.get(name)
        if lane is None:
            lane = site.lanes[name] = Lane(source, site, self._limits(source, site))

        if job.msg.priority >= PRIORITY_TRANSACTIONAL:
            lane.urgent.append(job)
        else:
            lane.bulk.append(job)
        if lane.retry is None:
            self._kick(lane)
        elif lane.idle:
            # Another process holds the slots this lane asked for: its timer asks
            # again (SLOT_RETRY) -- asking on every job cost a few fcntl calls each.
            lane.wakeup.set()

    def _kick(self, lane: Lane) -> None:
        """Start connections for *lane* while its queue asks for more and the limits allow."""
        if lane.retry is not None:
            lane.retry.cancel()
            lane.retry = None
        if self.stopping:
            return
        if lane.queued() and self._held(lane.source.name, lane.site.name, time.time()):
            self._reroute(lane, None)      # suspended (source x site): other sources, or back
            if lane.active == 0 and not lane.queued():
                self._forget(lane)
            return
        limit = lane.limits.connection_limit
        # (an empty queue ends the loop through its else: no waiting mark stays behind)
        while lane.active < limit and lane.queued() and \
                (lane.active == 0 or lane.queued() > lane.active):
            deferring = False
            if lane.active >= self._fair(lane) and \
                    self.limiter.others_waiting(lane.key, lane.waiting):
                slot = None         # our share is taken and another process waits: leave it
            elif lane.turn_over and self._leave_turn(lane):
                slot, deferring = None, True
            else:
                slot = self.limiter.acquire_connection(lane.key, limit)
            if slot is None and deferring:
                # This lane just gave a slot up to a process that held none: leave it
                # to that one (released and taken back at once here, it never would
                # get it), without a mark -- "waiting with none" would make the new
                # holder give it up again at once; look again shortly.
                if lane.waiting:
                    lane.waiting = False
                    self.limiter.set_waiting(lane.key, False)
                lane.retry = self.loop.call_later(SLOT_RETRY, self._kick, lane)
                break
            if slot is None:
                # Every slot is held by other processes (or our fair share is used and
                # another process waits): ask them to let idle ones (and busy ones above
                # their share) go, and look again shortly; our own workers carry on.
                if not lane.waiting:
                    # (only a mark that was set is this lane's to clear: with every
                    # limiter file pinned none is, and clearing would take another's)
                    lane.waiting = self.limiter.set_waiting(lane.key, True)
                lane.retry = self.loop.call_later(SLOT_RETRY, self._kick, lane)
                break
            lane.active += 1
            task = self.loop.create_task(self._worker(lane, slot))
            self.workers.add(task)
            task.add_done_callback(self.workers.discard)
        else:
            if lane.waiting:
                lane.waiting = False
                self.limiter.set_waiting(lane.key, False)
        if lane.idle and lane.queued():
            lane.wakeup.set()

    async def targets(self, domain: str) -> tuple[list[Target], float]:
        """Candidate hosts for *domain*, in the order to try them, and the seconds the
        DNS answers they come from hold (the least TTL left of them; SITE_TTL: none)."""
        cfg = self.cfg
        route = self._route_of(domain) or self.routes.get("*")
        out: list[Target] = []
        ttl = SITE_TTL
        if route is not None:
            pairs = [parse_hostport(h) if h.startswith("[") or h.count(":") == 1
                     else (h, cfg.mx_port) for h in route.hosts]
            found = await self._addresses_all([host for host, _ in pairs])
            for (host, port), got in zip(pairs, found):
                if isinstance(got, DnsTempError):
                    log.info("address lookup for route host %s failed: %s", host, got)
                    continue
                ips, left = got
                if ips:
                    ttl = min(ttl, left)
                for ip in ips:
                    out.append(Target(host, ip, port, route.starttls, route.tls_verify,
                                      route.source_address))
            if not out:
                raise RouteError(DEFERRED, 451, "4.4.3", f"no address for route hosts of {domain}")
            return out, ttl
        started = time.monotonic()   # the MX query and the addresses share one deadline
        mx = await self.resolver.resolve_mx(domain)
        if mx.status == "null_mx":
            raise RouteError(FAILED, 556, "5.1.10", f"{domain} does not accept mail (null MX)")
        if mx.status == "nxdomain":
            raise RouteError(FAILED, 550, "5.1.2", f"domain {domain} does not exist")
        if mx.status == "no_address":
            raise RouteError(FAILED, 550, "5.1.2", f"domain {domain} has no mail server address")
        if mx.status != "ok":
            raise RouteError(DEFERRED, 451, "4.4.3",
                             f"DNS lookup for {domain} failed: {mx.reason or mx.status}")
        if mx.ttl is not None:
            ttl = min(ttl, mx.ttl)
        unknown = len(mx.hosts)     # the best preference with a host whose lookup failed
        hosts = [(rank, host) for rank, group in enumerate(mx.hosts) for host in group]
        # looked up all at once, within what is left of the route lookup's deadline (about
        # one lookup's timeout from the MX query's start; not one per host, nor one more)
        found = await self._addresses_all([host for _, host in hosts[:MAX_MX_HOSTS]], started)
        for (rank, host), got in zip(hosts, found):
            if isinstance(got, DnsTempError):  # one MX host's addresses: try the next host
                log.info("address lookup for %s failed: %s", host, got)
                unknown = min(unknown, rank)
                continue
            ips, left = got
            if ips:
                ttl = min(ttl, left)
            for ip in ips:
                out.append(Target(host, ip, cfg.mx_port, None, cfg.tls_verify, None, rank))
        # An MX host that is this MTA: only the better ones may get the mail (RFC 5321
        # §5.1: we are their backup); when we are the best, the mail has nowhere to go
        # but round again (Postfix: "loops back to myself").
        mine = [t.rank for t in out if self._is_self(t.ip, t.port)]
        if mine:
            out = [t for t in out if t.rank < min(mine)]
            if not out and unknown >= min(mine):
                raise RouteError(FAILED, 554, "5.4.6", f"mail for {domain} loops back to myself")
        if not out:
            if unknown == len(mx.hosts) and len(hosts) <= MAX_MX_HOSTS:
                # Every MX host was looked up and none has an address (NXDOMAIN or no
                # A/AAAA, not a failure to ask): nothing will change on a retry but the
                # DNS itself; Postfix bounces it too ("Host not found", 5.4.4).
                raise RouteError(FAILED, 550, "5.4.4",
                                 f"no MX host of {domain} has an address")
            raise RouteError(DEFERRED, 451, "4.4.3", f"no address found for the MX hosts of {domain}")
        return out, ttl

    async def _addresses_all(self, hosts: list[str], since: float | None = None) -> list:
        """Each host's addresses and the seconds they hold, or the DnsTempError of its
        lookup, in the order of *hosts* (an address: itself, SITE_TTL; an IPv6 one nothing
        when delivery.ipv6 is off).  The names are looked up concurrently, at most
        delivery.dns_hosts_in_flight at a time, all within one lookup's timeout (the
        resolver's resolve_hosts), or what is left of it since *since* (the start of the
        route lookup's MX query); cached answers cost no task."""
        out: list = [None] * len(hosts)
        names, where = [], []
        for i, host in enumerate(hosts):
            if is_ip(host):
                out[i] = ([host] if self.cfg.ipv6 or ":" not in host else []), SITE_TTL
            else:
                names.append(host)
                where.append(i)
        if names:
            for i, got in zip(where, await self.resolver.resolve_hosts(names, since=since)):
                out[i] = got
        return out

    def _route_of(self, domain: str):
        """*domain*'s own [[delivery.route]] (not '*'), or None."""
        return self.routes.get(_route_key(domain)) if self.routes else None

    def _is_self(self, ip: str, port: int) -> bool:
        """True when *ip*:*port* is one of this MTA's own SMTP listeners."""
        ip = _connects_to(ip)
        return (ip, port) in self.own_listeners or (
            port in self.own_any_address and _local_address(ip))

    async def connect(self, lane: Lane):
        """Open a connection from the lane's source to the first host of its site that answers.

        Returns (connection, Target); raises RouteError when no host will do,
        SourceUnavailable when the source itself cannot be used.
        """
        src = lane.source
        limits = lane.limits
        last = None
        lane_fired = fired_reply = None
        tls = ""                    # how the last host's TLS went, for the events
        targets = list(lane.site.targets)
        if lane.site.key[0] == "mx":
            if src.address and src.proxy is None:
                # A source bound to one IP version reaches no address of the other: they
                # must not fill the attempt's MAX_CONNECT_ADDRESSES (kept when they are
                # all there is, for the reason the deferral gives).
                v6 = ":" in src.address
                targets = [t for t in targets if (":" in t.ip) == v6] or targets
            targets = _shuffled_by_preference(targets)[:MAX_CONNECT_ADDRESSES]
        for t in targets:
            # A static route's own source_address applies to the built-in source only.
            address = t.source if (t.source and src.name == "default"
                                   and src.proxy is None) else src.address
            if self.connect_attempts is not None:
                self.connect_attempts.inc((src.name, lane.site.name))
            starttls = t.starttls or limits.starttls
            if t.tls_verify:
                # A verified certificate or nothing (Postfix's "verify" level): neither a
                # server that stops offering STARTTLS, nor a certificate that fails, nor
                # a "none" of delivery.starttls or a shaping rule may turn it into
                # plaintext.
                starttls = "required"
            try:
                if starttls == "opportunistic" and self._tls_broken(t.ip, t.port):
                    starttls = "none"
                try:
                    conn = await self._open(t, src, address, starttls)
                except smtpc.SmtpConnectError as exc:
                    if not (exc.tls_failed and starttls == "opportunistic"):
                        raise
                    # Opportunistic means the mail goes anyway: the handshake failed (an
                    # old or broken TLS stack), so this host gets it in plaintext, now and
                    # for TLS_FALLBACK_SECONDS.  Never for "required".
                    log.info("STARTTLS to %s[%s]:%d failed (%s); sending in plaintext "
                             "(opportunistic TLS)", t.host, t.ip, t.port, exc)
                    self._remember_tls_broken(t.ip, t.port)
                    if self.connect_attempts is not None:
                        self.connect_attempts.inc((src.name, lane.site.name))
                    conn = await self._open(t, src, address, "none")
                if lane.site.key[0] == "mx" and self._greets_as_me(conn):
                    # This MTA behind a NAT, a port forward or a load balancer: only the
                    # better MX hosts may take the mail (see targets()), and they failed.
                    await conn.quit()
                    log.warning("%s[%s]:%d greeted me with my own hostname %s", t.host, t.ip,
                                t.port, self.own_name)
                    if any(o.rank < t.rank for o in targets):
                        break
                    raise RouteError(FAILED, 554, "5.4.6",
                                     f"mail for {lane.site.name} loops back to myself "
                                     f"({t.host}[{t.ip}] greeted me with my own hostname)")
                return conn, t
            except SourceUnavailable:
                raise
            except smtpc.SmtpConnectError as exc:
                tls = exc.tls
                last = (exc.reply.code if exc.reply else 451,
                        (exc.reply.enhanced if exc.reply else None) or "4.4.1",
                        f"{t.host}[{t.ip}]: {exc.reply.text if exc.reply else exc}")
                if exc.reply is not None:
                    fired = self._apply_rule(lane, exc.stage, exc.reply.code,
                                             exc.reply.enhanced or "", exc.reply.text)
                    if fired is not None:
                        log.info("connect to %s[%s]:%d from %s: %s", t.host, t.ip, t.port,
                                 src.name, last[2])
                        code, enh, text = last
                        if fired.action == "suspend":     # no other host of the site now
                            raise RouteError(DEFERRED, code if code < 500 else 451,
                                             enh if code < 500 else "4.4.1", text,
                                             fired, tls) from None
                        lane_fired, fired_reply = fired, last
            except (smtpc.SmtpError, OSError) as exc:
                tls = ""
                last = (451, "4.4.1", f"{t.host}[{t.ip}]: {_in_words(exc)}")
            log.info("connect to %s[%s]:%d from %s failed: %s", t.host, t.ip, t.port, src.name,
                     last[2])
        if last is None:
            raise RouteError(DEFERRED, 451, "4.4.3", f"no address for site {lane.site.name}")
        if lane_fired is not None and lane_fired.action == "bounce":
            # the operator's rule says what that reply (a 554 greeting of a site that
            # refuses this source for good) means: the jobs fail, as at the envelope
            code, enh, text = fired_reply
            raise RouteError(FAILED, code, enh, text, lane_fired, tls)
        code, enh, text = last
        # Every host failed: try again later, whatever the last one said.
        raise RouteError(DEFERRED, 451 if code >= 500 else code, "4.4.1" if code >= 500 else enh,
                         text, lane_fired, tls)

    async def _open(self, t: Target, src, address, starttls: str):
        cfg = self.cfg
        return await smtpc.SmtpConnection.open(
            t.ip, t.port, helo_name=src.ehlo, source_address=address, socks5=src.proxy,
            connect_timeout=cfg.connect_timeout, command_timeout=cfg.command_timeout,
            data_timeout=cfg.data_timeout, starttls=starttls, tls_verify=t.tls_verify,
            tls_server_hostname=t.host if not is_ip(t.host) else None,
            tls_context=self.verify_ctx if t.tls_verify else None)

    @staticmethod
    def _in_clear(lane: Lane, conn) -> bool:
        """True when *conn* is not encrypted and the site's rules (its limits say
        "required") decide its STARTTLS: a rule that requires TLS came to apply to the
        site after *conn* opened (a domain of a wildcard rule got mail), and the
        connection must not carry the mail.  A route's own starttls decides for itself."""
        if lane.limits.starttls != "required" or conn.tls_active:
            return False
        targets = lane.site.targets
        return not (targets and targets[0].starttls)

    def _greets_as_me(self, conn) -> bool:
        """True when *conn*'s server greeted with our own host name (Postfix's check)."""
        greeting = conn.greeting
        if greeting is None or not self.own_name:
            return False
        words = greeting.text.split(None, 1)
        return bool(words) and words[0].lower() == self.own_name

    def _tls_broken(self, ip: str, port: int) -> bool:
        until = self.tls_fallback.get((ip, port))
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self.tls_fallback[(ip, port)]
        return False

    def _remember_tls_broken(self, ip: str, port: int) -> None:
        fb = self.tls_fallback
        if len(fb) >= MAX_TLS_FALLBACKS:
            now = time.monotonic()
            for k in [k for k, v in fb.items() if v <= now]:
                del fb[k]
            while len(fb) >= MAX_TLS_FALLBACKS:
                del fb[next(iter(fb))]          # the oldest remembered first
        fb[(ip, port)] = time.monotonic() + TLS_FALLBACK_SECONDS

    # -------------------------------------------------------------- sources

    def _suspend(self, src: Source, exc: Exception) -> None:
        if not src.usable():
            return      # another lane found out first
        eg = self.egress
        period = min(eg.suspend_time * (2 ** min(src.failures, 30)), eg.suspend_time_max)
        src.failures += 1
        src.resume_at = time.monotonic() + period
        src.reason = str(exc)
        log.warning("source %s suspended for %.0fs: %s; its mail goes to the other sources "
                    "of its pools", src.name, period, src.reason)

    def _reroute(self, lane: Lane, job: Job | None) -> None:
        """The lane's source cannot be used: its jobs go to other sources of their pools."""
        jobs = ([job] if job is not None else []) + lane.drain()
        for j in jobs:
            self._route(j, lane.site)

    # -------------------------------------------------------------- workers

    async def _pace(self, key: str, rate: float | None, until: float | None = None,
                    late: list | None = None) -> bool:
        """Wait for the node-wide rate *rate* (per second) of *key* to allow one more:
        True.  False, nothing taken, when the process stops meanwhile (begin_stop ends
        the wait at once), or with *until* (time.monotonic()) when that would come later
        (then the seconds until a unit is due go in *late*)."""
        if not rate:
            return True
        while True:
            wait = self.limiter.take(key, rate)
            if wait <= 0:
                return True
            if self.stopping:
                return False
            if until is not None and time.monotonic() + wait > until:
                if late is not None:
                    late.append(wait)
                return False
            # (asyncio.sleep's own future and timer, which begin_stop can end)
            fut = self.loop.create_future()
            timer = self.loop.call_later(wait, _wake, fut)
            self.pacing.add(fut)
            try:
                await fut
            finally:
                self.pacing.discard(fut)
                timer.cancel()

    async def _idle(self, lane: Lane, conn=None, slot=None) -> bool:
        """Wait for the lane's next job; False when the connection should close instead
        (*conn*, the worker's: no longer than until it is max_age old; *slot*, its: not
        once the lane's limit was lowered below it)."""
        lane.wakeup.clear()
        lane.idle += 1
        try:
            deadline = self.loop.time() + lane.limits.idle_timeout
            if conn is not None:
                deadline = min(deadline, conn.opened_at + self.max_age)
            while not lane.queued() and not self.stopping:
                left = deadline - self.loop.time()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(lane.wakeup.wait(), min(left, IDLE_CHECK))
                except asyncio.TimeoutError:
                    # Another process waits for a slot of this lane: let ours go.
                    if not lane.queued() and \
                            self.limiter.others_waiting(lane.key, lane.waiting):
                        return False
                lane.wakeup.clear()
                if slot is not None and self._over_limit(lane, slot):
                    # a throttle or back-off lowered the limit: an idle connection over
                    # it goes now, not at idle_timeout (the site asked for fewer)
                    return False
            return not self.stopping or bool(lane.queued())
        finally:
            lane.idle -= 1

    async def _worker(self, lane: Lane, slot) -> None:
        conn = target = job = None
        yielded = False
        src = lane.source
        # The next job, taken while the last message went out (_ahead), with its
        # transaction when its envelope went out behind that message's final dot.
        ahead: list = []
        give_up = [False]       # _ahead found the slot should go to another process

        def chain(c):
            return self._ahead(lane, c, ahead, give_up, slot)

        try:
            while True:
                if ahead:
                    # its transaction has begun on this connection: the envelope is on
                    # the wire (_after_send left nothing else here)
                    job, txn = ahead.pop()
                    if time.monotonic() - job.queued_at > self.max_wait:
                        # the last message's reply took long: the spool's turn (its
                        # DATA may be open, so the connection goes, not QUIT)
                        conn.close()
                        conn = None
                        self._hand_back([job], lane)
                        continue
                    conn = await self._send(conn, target, job, lane, txn, chain)
                    if self._after_send(lane, conn, ahead, give_up, slot):
                        yielded = give_up[0]
                        return
                    continue
                job = lane.pop()
                if job is None:
                    if self.stopping or not await self._idle(lane, conn, slot):
                        return
                    continue
                if self._over_limit(lane, slot):
                    lane.put_back([job])      # the limit was lowered while this one idled
                    return
                limits = lane.limits
                # (max_age: the one clock read a transaction costs, here or in _ahead)
                took = 0.0      # seconds its own connection took to open (none: 0)
                if conn is not None and (not conn.is_usable or
                                         conn.transactions >= limits.max_deliveries_per_connection
                                         or self.loop.time() - conn.opened_at >= self.max_age
                                         or self._in_clear(lane, conn)):
                    await conn.quit()
                    conn = None
                if conn is None:
                    try:
                        await self._pace(lane.connect_key, limits.max_connection_rate)
                        if self._held(src.name, lane.site.name, time.time()):
                            # a rule suspended the lane while this worker waited (another
                            # connection's reply): no connection to a site that said stop
                            self._reroute(lane, job)
                            return
                        began = time.monotonic()
                        conn, target = await self._connect_unless_stopping(lane)
                        took = time.monotonic() - began
                    except _Stopping:
                        self._give_back([job], STOPPING)
                        return
                    except SourceUnavailable as exc:
                        self._suspend(src, exc)
                        self._reroute(lane, job)
                        return
                    except RouteError as exc:
                        self._attempted(lane, False)
                        if exc.outcome == DEFERRED and exc.fired is None and \
                                self.down > 0 and lane.active == 1:
                            # (not while another connection of the lane works: a site
                            # that refuses one more connection is not down)
                            lane.site.down[src.name] = (time.monotonic() + self.down, RouteError(
                                DEFERRED, exc.code, exc.enhanced,
                                f"delivery temporarily suspended: {exc.text}"))
                        self._fail_route(job, exc)
                        if self._held(src.name, lane.site.name, time.time()):
                            self._reroute(lane, None)     # a rule suspended this lane
                            return
                        # The same answer holds for everything queued for this site now.
                        for j in lane.drain():
                            self._fail_route(j, exc)
                        return
                    if src.failures:
                        src.failures = 0
                    if lane.site.down:
                        lane.site.down.pop(src.name, None)     # (it answers again)
                    if took > self.max_wait and \
                            time.monotonic() - job.queued_at > self.send_by:
                        self._opened_too_late(job, lane, conn, target, took)
                        continue
                # Waited for only while the job may still be sent (below): a unit taken
                # by a job then handed back is lost, and the next job waits a whole
                # interval for its own -- at a rate slower than one per max_wait, none
                # would ever be sent.  Handed back untaken, the unit is the next job's.
                late: list = []
                paced = await self._pace(
                    lane.message_key, lane.limits.max_message_rate,
                    job.queued_at + (self.send_by if took > self.max_wait else self.max_wait),
                    late)
                if self.stopping:       # its transaction has not begun: the spool keeps it
                    self._give_back([job], STOPPING)
                    return
                if self._held(src.name, lane.site.name, time.time()):
                    # A rule fired (on another connection of this process, or read from
                    # the node's store) while this connection opened or the job waited
                    # for its rate: the transaction is not begun, the job goes elsewhere.
                    self._reroute(lane, job)
                    return
                waited = time.monotonic() - job.queued_at
                if not paced or \
                        waited > self.max_wait and (took <= self.max_wait or waited > self.send_by):
                    # paced too long: the spool's turn -- not for the time its own
                    # connection took (a site slow to greet: it would come back to
                    # another slow connection, and again, never an attempt); one that
                    # cannot have a unit of the rate in time comes again when one is due
                    # (in a second, a slow site's queue went back and forth each second)
                    self._hand_back([job], lane, late[0] if late else MIN_REQUEUE,
                                    None if paced else "rate")
                    continue
                conn = await self._send(conn, target, job, lane, None, chain)
                if self._after_send(lane, conn, ahead, give_up, slot):
                    yielded = give_up[0]
                    return
        except Exception as exc:
            log.exception("delivery worker for %s failed", lane.key)
            if job is not None and not job.reported:
                # its outcome must still go back (else the spool waits job_timeout and
                # this process's window stays one job smaller for good); REQUEUED: tried
                # again soon (at least once: its message may have gone out) -- DEFERRED
                # when a worker failed on its message a moment ago (WORKER_FAILED_AGAIN)
                self._worker_failed(job, exc)
        finally:
            # the next job, taken but not run (an unexpected error): back to the front
            # of its lane; nothing of its message was sent (its envelope may have
            # been: the connection is closed below, not quit)
            lane.put_back([j for j, _ in ahead])
            lane.active -= 1
            if give_up[0]:
                lane.yielding -= 1
            # The slot is the connection: given back once it is closed, not before
            # (another process waiting for it would open one more while the
            # receiver still counts this one, over the site's connection_limit).
            try:
                if conn is not None:
                    await conn.quit()
            finally:
                self.limiter.release(slot)
            # A worker that yields its slot leaves the lane to the others; when several
            # decided so at once (each saw the others still counted) the last ones keep
            # the lane going at its fair share, or waiting for a slot with its mark set.
            if lane.queued() and not self.stopping and (
                    not yielded or lane.active < self._fair(lane)):
                self._kick(lane)
            elif not lane.queued() and lane.active == 0:
                self._forget(lane)

    def _after_send(self, lane: Lane, conn, ahead: list, give_up: list, slot=None) -> bool:
        """After a transaction: True when the worker should stop (give_up: to yield its slot).

        A next job whose envelope is on this (still usable) connection is run
        next whatever follows (_ahead made these checks for it); any other goes
        back to the front of the lane, and the checks are made now.
        """
        held = self._held(lane.source.name, lane.site.name, time.time())
        if ahead and (held or ahead[0][1] is None or conn is None or not conn.is_usable):
            # (an envelope sent ahead here dies with its connection: the connection is
            # gone, or the lane is held and the worker stops, closing it)
            lane.put_back([ahead[0][0]])
            ahead.clear()
        if held:
            self._reroute(lane, None)     # a rule suspended this lane: stop here
            return True
        if ahead:
            return False            # the next one is under way: _ahead made its checks
        if give_up[0] or self._yield_slot(lane, slot):
            give_up[0] = True
            return True
        return self._over_limit(lane, slot)     # a throttle lowered the limit

    def _over_limit(self, lane: Lane, slot) -> bool:
        """Whether the worker holding *slot* is one too many now that the lane's connection
        limit was lowered (a throttle, a back-off): the limit holds node-wide, so the
        connections that stay are those on the slots below it, whichever processes hold
        them -- not up to the limit in each process."""
        index = getattr(slot, "index", None)
        if index is None:           # (a limiter without slot numbers: this process's count)
            return lane.active > lane.limits.connection_limit
        return index >= lane.limits.connection_limit

    def _ahead(self, lane: Lane, conn, ahead: list, give_up: list, slot=None):
        """Called as a message goes out: the transaction to write behind it, or None.

        Takes the lane's next job when this connection would send it next anyway
        -- it may carry another message, no rule holds the lane, the slot stays
        here, the rate has a unit free now -- and, when the connection can send
        it as it is, prepares its transaction (the caller writes its envelope
        behind the final dot).  The job is left in *ahead* either way.
        """
        if not self.pipeline or self.stopping or give_up[0] or not lane.queued():
            return None
        limits = lane.limits
        # (transactions begun, this one's included: refused or deferred ones count too,
        # as a site that limits messages per connection counts them)
        if conn.transactions >= limits.max_deliveries_per_connection \
                or self.loop.time() - conn.opened_at >= self.max_age \
                or self._over_limit(lane, slot) \
                or self._in_clear(lane, conn):
            return None
        if self._held(lane.source.name, lane.site.name, time.time()):
            return None
        if self._yield_slot(lane, slot):
            give_up[0] = True
            return None
        rate = limits.max_message_rate
        if rate and self.limiter.take(lane.message_key, rate) > 0:
            return None
        job = lane.pop()
        ahead.append((job, None))           # the worker's next job, whatever follows
        if time.monotonic() - job.queued_at > self.max_wait:
            return None                     # the worker hands it back
        try:
            sender, addrs, eight, utf8, dsn = self._envelope(job)
            txn = conn.prepare(sender, addrs, job.msg.body, eight_bit=eight, smtputf8=utf8,
                               dsn=dsn)
        except Exception:
            return None     # (8-bit to a 7-bit server...): the worker sends it the usual way
        if txn.result is not None:
            return None
        ahead[-1] = (job, txn)
        self.stats["sent_ahead"] += 1     # (in the log line at stop)
        return txn

    def _yield_slot(self, lane: Lane, slot=None) -> bool:
        """True when this worker (holding *slot*) should give its connection slot to
        another process.

        Slots are node-wide; a process whose connections are never idle (it has
        bulk queued) would otherwise keep every slot while another process's
        jobs for the site -- a spread domain, a transactional message -- wait
        until it has drained.  So, at most every YIELD_CHECK seconds, a busy lane
        that holds more than its fair share (connection_limit divided among the
        delivery processes, rounded up) while another process waits for a slot
        lets one go.  Rounded up, the shares can add up to more than the limit (1
        of 1 each for two processes, 2 of 4 each for three): a lane holding more
        than the share rounded down gives one up too when a process holding none
        waits -- at once when that share is at least 1, else after its turn
        (slot_turn) on the slot, so that the processes take turns.
        """
        now = time.monotonic()
        if now < lane.yield_check:
            return False
        lane.yield_check = now + YIELD_CHECK
        # (a worker that decided to go still counts in active until its reply is in:
        # without the yielding ones the next would go too, down past the fair share)
        held = lane.active - lane.yielding
        floor = lane.limits.connection_limit // self.processes
        if held <= floor or not self.limiter.others_waiting(lane.key, lane.waiting):
            return False        # (limit a multiple of the processes: no more than before)
        if held > self._fair(lane):
            lane.yielding += 1
            return True
        if floor == 0 and now - getattr(slot, "since", now) < self._turn():
            return False
        if self.limiter.others_starving(lane.key):
            lane.yielding += 1
            lane.turn_over = now + TURN_DEFER
            return True
        return False

    def _turn(self) -> float:
        """Seconds a slot is kept at most while a process holding none waits (when the
        limit is below the processes): slot_turn, at most max_wait over the processes
        (each gets a turn before its jobs would go back to the spool)."""
        return min(self.cfg.slot_turn, self.max_wait / self.processes)

    def _leave_turn(self, lane: Lane) -> bool:
        """Whether *lane*, which gave a slot up to a process holding none, should leave
        the free slot to it still (TURN_DEFER at most, while one such waits)."""
        if time.monotonic() < lane.turn_over and self.limiter.others_starving(lane.key):
            return True
        lane.turn_over = 0.0
        return False

    def _fair(self, lane: Lane) -> int:
        """A lane's share of its node-wide connection slots when other processes want them."""
        return max(1, -(-lane.limits.connection_limit // self.processes))

    def _forget(self, lane: Lane) -> None:
        if lane.retry is not None:
            lane.retry.cancel()
            lane.retry = None
        if lane.waiting:
            lane.waiting = False
            self.limiter.set_waiting(lane.key, False)
        site = lane.site
        if site.lanes.get(lane.source.name) is lane:
            del site.lanes[lane.source.name]

    def _fail_route(self, job: Job, exc: RouteError) -> None:
        job.tls = exc.tls
        if job.warm:
            # no transaction began (no connection, or the site refused it before MAIL):
            # the warm-up cap is for what the source sends
            self.warmup.give_back(job.warm)
            job.warm = []
        fired = exc.fired
        if fired is not None:
            # (every job of the lane it fails: the site said it of them all)
            job.fired = fired
            if fired.action == "defer" and exc.outcome == DEFERRED:
                # a defer rule matching a connect, greeting or EHLO reply: its delay, as
                # for one matching a reply to the envelope (_send)
                job.retry_after = max(job.retry_after, self._delay(fired.name))
        results = job.results(exc.outcome, exc.code, exc.enhanced, exc.text)
        if fired is not None:
            bounce_class = self._bounce_class(fired.name) \
                if fired.action == "bounce" and exc.outcome == FAILED else ""
            for r in results:
                r.rule = fired
                r.bounce_class = bounce_class
        self._finish(job, results)

    def _envelope(self, job: Job):
        """sender, recipient addresses, 8-bit, SMTPUTF8 and DSN parameters of *job*."""
        m = job.msg
        sender = m.sender
        if self.verp is not None and sender:
            sender = f"{self.verp[0]}+{m.qid.lower()}@{self.verp[1]}"
        params = m.params
        if not params:          # (most mail: none of BODY, SMTPUTF8 and the DSN ones)
            return sender, [r.address for r in m.rcpts], False, False, None
        return (sender, [r.address for r in m.rcpts],
                params.get("BODY", "").upper() == "8BITMIME", "SMTPUTF8" in params,
                smtpc.DsnParams.from_params(params))

    async def _send(self, conn, t: Target, job: Job, lane: Lane, txn=None, chain=None):
        """Send one job over *conn*; return the connection if it can be reused, else None.

        *txn*: its transaction, already on the wire (see _ahead).  *chain*: the
        connection's ``then`` (the next job's envelope behind this message).
        """
        host, ip = t.host, t.ip
        m = job.msg
        job.source_ip = getattr(conn, "local_ip", "") or ""
        job.tls = conn.outbound_tls
        lane.sent += 1
        lost = None         # the reply made up for a connection lost once the message went
        try:
            if txn is not None:
                res = await conn.send_prepared(txn, then=chain)
            else:
                sender, addrs, eight, utf8, dsn = self._envelope(job)
                res = await conn.send_message(sender, addrs, m.body, eight_bit=eight,
                                              smtputf8=utf8, dsn=dsn, then=chain)
        except smtpc.Unsupported8Bit:
            self._finish(job, job.results(
                FAILED, 554, "5.6.3", f"{host} does not accept 8-bit messages (no 8BITMIME)",
                host, ip, True))
            return conn if conn.is_usable else None
        except smtpc.UnsupportedSmtpUtf8:
            self._finish(job, job.results(
                FAILED, 553, "5.6.7", f"{host} does not support SMTPUTF8", host, ip, True))
            return conn if conn.is_usable else None
        except (smtpc.SmtpError, OSError) as exc:
            if type(exc) is smtpc.SmtpConnectionLost and exc.unsent and \
                    conn.transactions > 1 and not job.refreshed:
                # A reused connection the server closed (one message per connection, its
                # idle timeout) before it answered this envelope: nothing of the message
                # went out and the server said nothing of it -- not an attempt.
                return self._send_again(conn, job, lane)
            conn.close()
            text = f"{host}[{ip}]: {_in_words(exc)}"
            said = exc.rcpt_replies if isinstance(exc, smtpc.SmtpError) else None
            if said is None or all(r.is_ok for r in said):
                self._attempted(lane, False)
                self._finish(job, job.results(DEFERRED, 451, "4.4.2", text, host, ip, True))
                return None
            # Lost (or timed out) once the message was on its way: the recipients it
            # was for are deferred (possibly delivered, RFC 1047); those the server had
            # refused keep its answer, as when the transaction ends.
            # (no server said it: no response rule matches it, and the site failed)
            res = smtpc.DeliveryResult(said, lost := smtpc.LocalReply(451, "4.4.2", text))
        if res.mail_refused and conn.transactions > 1 and not job.refreshed and \
                res.rcpt_replies and self._closed_at_mail(res.rcpt_replies[0], lane):
            # A reused connection that the server ends with a 421 to this MAIL (its
            # messages-per-session limit or idle timeout, in words): it said nothing of
            # this message.  As for a connection lost before its envelope was answered,
            # the job goes first on a new connection, once -- no attempt, no back-off
            # evidence; a 421 there too is the server's answer, and defers it.
            return self._send_again(conn, job, lane)
        decided = [_decisive(res, k) for k in range(len(m.rcpts))]
        if len(decided) > 1:        # (a limit shows only after an acceptance: one of two)
            over = res.over_limit()
            if over:
                await self._send_over_limit(conn, job, lane, decided, f"{host}[{ip}]", over)
        results = []
        delivered = False     # a recipient's outcome is DELIVERED
        slowed = False        # a deferral that asks the site's sender to slow down
        matched = None        # (id(reply), stage) -> the rule it fired (None: none)
        for k, rcpt in enumerate(m.rcpts):
            r, stage = decided[k]
            outcome = DELIVERED if r.code < 400 else DEFERRED if r.code < 500 else FAILED
            if outcome == DEFERRED and not slowed:
                slowed = self.adaptive.slows(r.code, r.enhanced or "", stage)
            bounce_class = ""
            fired = None
            # (a reply the client made up -- a connection lost, too big for the server's
            # SIZE, out of step -- is no server's: no response rule matches it)
            if r.code >= 400 and not isinstance(r, smtpc.LocalReply):
                # Each reply is matched once, and decides only the recipients it was given
                # (MAIL's, the data reply: all of them): a rule that another recipient's
                # RCPT reply fired says nothing of this one (a bounce rule for one
                # "mailbox full" failed the rest of the job's deferrals, a connection lost
                # after the dot -- possibly delivered -- too, with its class).
                if matched is None:
                    matched = {}
                key = (id(r), stage)
                if key in matched:
                    fired = matched[key]
                else:
                    fired = matched[key] = self._apply_rule(lane, stage, r.code,
                                                            r.enhanced or "", r.text)
                if fired is not None:
                    if job.fired is None:
                        job.fired = fired
                    if fired.action == "bounce":
                        outcome = FAILED
                        bounce_class = self._bounce_class(fired.name)
                    elif fired.action == "defer":
                        outcome = DEFERRED
                        job.retry_after = max(job.retry_after, self._delay(fired.name))
            if outcome == DELIVERED:
                delivered = True
            text = r.text
            if len(text) > MAX_RESULT_TEXT:
                text = _shortened(text)
            results.append(Result(index=rcpt.index, outcome=outcome, code=r.code,
                                  enhanced=r.enhanced or "", text=text, host=host, ip=ip,
                                  dsn=res.dsn, bounce_class=bounce_class, rule=fired,
                                  local=r.local))
        # Back-off judges the site, not the recipients: a transaction that delivered
        # counts as taken; one whose deferrals were all about their recipients (a
        # greylisted address, a full mailbox) counts neither way.
        if lost is not None:
            self._attempted(lane, False)
        elif delivered:
            self._attempted(lane, True)
        elif slowed:
            self._attempted(lane, False)
        self._finish(job, results)
        if not conn.is_usable:
            conn.close()
            return None
        return conn

    async def _send_over_limit(self, conn, job: Job, lane: Lane, decided: list, where: str,
                               pending: list[int]) -> None:
        """Send the recipients the server refused for its recipient limit (*pending*: 452
        after an acceptance, ``DeliveryResult.over_limit``) again, in the next transactions on
        *conn*, updating *decided* (reply, stage per recipient).

        RFC 5321 4.5.3.1.10 and Postfix: a server's "too many recipients" is no
        deferral -- the rest go in another transaction, at once, within the same
        attempt (deferring them would cost an attempt per hundred recipients and
        bounce the tail of a large job).  Bounded: each transaction run here
        delivered at least one recipient, so the rest shrink every round; and one
        starts only when, even at its own timeouts (command + data), it ends within
        the spool's job timeout (connect + 2 x command + data timeouts, + margin,
        counted from the job's arrival here): else the spool, having sent the job
        again, and this process could both deliver.  The rest keep the 452.  A
        failure of the connection on the way defers those not sent, as any
        connection failure does.  Each transaction is one more message to the site:
        it takes a unit of the lane's message rate first, as the first did (a sender
        must not pass a site's rate by giving a message more recipients than its
        server takes at once), waited for only while that bound allows.
        """
        rounds = 0
        until = job.queued_at + self.send_by
        while pending and rounds < len(decided):
            rounds += 1
            if not conn.is_usable or time.monotonic() > until or \
                    not await self._pace(lane.message_key, lane.limits.max_message_rate,
                                         until) or not conn.is_usable:
                break
            sender, addrs, eight, utf8, dsn = self._envelope(job)
            try:
                sub = await conn.send_message(
                    sender, [addrs[k] for k in pending], job.msg.body, eight_bit=eight,
                    smtputf8=utf8, dsn=dsn.subset(pending) if dsn is not None else None)
            except (smtpc.SmtpError, OSError) as exc:
                lost = (smtpc.LocalReply(451, "4.4.2", f"{where}: {_in_words(exc)}"),
                        "data")       # (one reply, given to each: one match of the rules)
                said = exc.rcpt_replies if isinstance(exc, smtpc.SmtpError) else None
                for j, k in enumerate(pending):
                    # (a refusal said before the message went stands)
                    decided[k] = lost if said is None or said[j].is_ok else (said[j], "rcpt")
                conn.close()
                return
            for j, k in enumerate(pending):
                decided[k] = _decisive(sub, j)
            pending = [pending[j] for j in sub.over_limit()]
        for k in pending:
            # not sent again: RFC 821's 552 5.5.3 is temporary too (4.5.3.1.10), a deferral
            r, stage = decided[k]
            if r.code == 552:
                decided[k] = (smtpc.SmtpReply(452, "4.5.3", r.text), stage)

    # ------------------------------------------------------------- adaptive

    def _apply_rule(self, lane: Lane, stage: str, code: int, enhanced: str, text: str):
        """Match a reply against the response rules; put a suspension or throttle in
        effect.  The bus.FiredRule, or None when no rule matched."""
        ad = self.adaptive
        rule = ad.rules.match(stage, code, enhanced, text, lane.site.hosts)
        if rule is None:
            return None
        reply = f"{code} {enhanced + ' ' if enhanced else ''}{text}".replace("\n", " ")
        entry = ad.fire(rule, lane.source.name, lane.site.name, reply, stage)
        self.stats["rule:" + rule.name] += 1
        if entry is not None and ad.fired_new and rule.action == "throttle":
            self._relimit()
        return FiredRule(name=rule.name, id=entry.id if entry else "", action=rule.action,
                         scope=rule.scope, reply=reply[:300], stage=stage,
                         until=entry.until if entry else 0.0)

    def _send_again(self, conn, job: Job, lane: Lane) -> None:
        """*job* goes first on a new connection (once: a failure there defers it), the
        reused *conn* that the server ended before it said anything of the job closed."""
        conn.close()
        job.refreshed = True
        if self.stopping:
            self._give_back([job], STOPPING)
        else:
            lane.put_back([job])
        return None

    def _closed_at_mail(self, r, lane: Lane) -> bool:
        """A 421 to MAIL that no response rule takes (a rule's 421 -- Gmail's "try again
        later" -- is the site asking to slow down, and goes the way of every deferral)."""
        return r.code == 421 and self.adaptive.rules.match(
            "mail", 421, r.enhanced or "", r.text, lane.site.hosts) is None

    def _rule(self, name: str):
        for r in self.adaptive.rules.rules:
            if r.name == name:
                return r
        return None

    def _bounce_class(self, name: str) -> str:
        r = self._rule(name)
        return r.bounce_class if r is not None else ""

    def _delay(self, name: str) -> float:
        r = self._rule(name)
        return r.delay if r is not None else 0.0

    def _attempted(self, lane: Lane, ok: bool) -> None:
        """Feed automatic back-off one attempt's result; apply a change at once."""
        if self.adaptive.record(lane.source.name, lane.site.name, ok,
                                attempted_rate=lane.rate or None,
                                base=lambda: self._base_limits(lane)):
            self._relimit()

    def _relimit(self) -> None:
        """Limits again for every lane (a throttle or back-off began, stepped or ended)."""
        for site in self.sites.values():
            self._relimit_site(site)

    def _relimit_site(self, site: Site) -> None:
        for lane in list(site.lanes.values()):
            limits = self._limits(lane.source, site)
            if limits != lane.limits:
                lane.limits = limits
                if lane.queued():
                    self._kick(lane)

    def sweep(self) -> int:
        """Jobs that have waited in a lane longer than ``max_wait`` go back to the spool
        (REQUEUED: no attempt counted, due again after a short wait); the count.

        The spool sends a job again when its outcome has not come within
        ``job_timeout`` (connect + 2 x command + data timeouts + job_timeout_margin),
        counted from when it sent it.  A lane that a rate limit, a back-off or a
        slow site holds back could otherwise keep a job past that: the spool would
        send it again and the two copies could both be delivered, or one expire
        while the other is delivered.  Handing a job back before half the margin
        has passed keeps "an outcome within job_timeout" true whatever the wait.
        """
        limit = self.max_wait
        now = time.monotonic()
        n = 0
        for site in list(self.sites.values()):
            for lane in list(site.lanes.values()):
                stale = []
                for q in (lane.urgent, lane.bulk):
                    for _ in range(len(q)):       # one pass, order kept
                        j = q.popleft()
                        (stale if now - j.queued_at > limit else q).append(j)
                if stale:
                    self._hand_back(stale, lane)
                    n += len(stale)
                    if lane.active == 0 and not lane.queued():
                        self._forget(lane)    # (its waiting mark and retry timer too)
        if n:
            log.info("%d job(s) waited in their lanes over %.1fs; handed back to the spool",
                     n, limit)
        return n

    def _opened_too_late(self, job: Job, lane: Lane, conn, t: Target, took: float) -> None:
        """*job*'s own connection took *took* seconds to open (greeting, EHLO, STARTTLS),
        so long that its transaction could outlast the spool's job timeout: an attempt
        that timed out (deferred, fed to back-off), not a job handed back untried.  The
        connection stays for the lane's next jobs."""
        self._attempted(lane, False)
        job.source_ip = getattr(conn, "local_ip", "") or ""
        job.tls = conn.outbound_tls
        self._finish(job, job.results(
            DEFERRED, 451, "4.4.1", f"{t.host}[{t.ip}]: connection setup (greeting, EHLO, "
            f"STARTTLS) took {took:.1f}s: too slow to send the message", t.host, t.ip, True))

    def _hand_back(self, jobs: list, lane: Lane, wait: float = MIN_REQUEUE,
                   why: str | None = None) -> None:
        """*jobs* back to the spool untried, saying why (the last reply `mta inspect`
        shows): they waited too long for a connection, or (*why* "rate") no unit of the
        site's message rate comes before they must be sent."""
        if why == "rate":
            # The rate a throttle or back-off lowered rises before the next unit of it
            # is due: the job comes back then, not up to an hour later at the old rate
            # (what is sent still keeps to the limits then in effect).  Only on this
            # path (a job that cannot have a unit in time): two entry look-ups.
            rises = self.adaptive.rate_rises_at(lane.source.name, lane.site.name,
                                                self._base_limits(lane).max_message_rate)
            if rises is not None:
                wait = max(MIN_REQUEUE, min(wait, rises - time.time()))
            text = (f"message rate of site {lane.site.name} from {lane.source.name}: the "
                    f"next send in {wait:.0f}s, after this job's turn")
        else:
            text = (f"waited over {self.max_wait:.0f}s for a connection to site "
                    f"{lane.site.name} from {lane.source.name}")
        self._give_back(jobs, text, wait=wait)

    def _worker_failed(self, job: Job, exc: Exception) -> None:
        """The outcome of *job*, whose worker failed (an unexpected error)."""
        now = time.monotonic()
        failed = self.worker_failed
        qid = job.msg.qid
        before = failed.pop(qid, None)
        if len(failed) >= WORKER_FAILED_MAX:
            del failed[next(iter(failed))]
        failed[qid] = now
        if before is None or now - before > WORKER_FAILED_AGAIN:
            self._give_back([job], f"the delivery worker failed: {exc}", unsent=False)
            return
        log.warning("%s: the delivery worker failed on this message again; deferred",
                    qid)
        job.warm = []           # (its message may have gone out: the counts stay taken)
        self._finish(job, job.results(
            DEFERRED, 451, "4.3.0",
            f"the delivery worker failed on this message again: {exc}"[:400], local=True))

    def _give_back(self, jobs: list, text: str, unsent: bool = True,
                   wait: float = MIN_REQUEUE) -> None:
        """Return *jobs*, not attempted, to their spool shards (REQUEUED: no attempt counted,
        due again in *wait* seconds); *unsent*: nothing of them went out, so the warm-up
        counts they took are given back."""
        for job in jobs:
            self.stats["handed_back"] += 1
            if job.warm:
                if unsent:
                    self.warmup.give_back(job.warm)
                job.warm = []
            self._finish(job, job.results(REQUEUED, 451, "4.4.5", text),
                         max(MIN_REQUEUE, wait))

    async def _connect_unless_stopping(self, lane: Lane):
        """connect(), given up (raising _Stopping) as soon as begin_stop() is called: a
        receiver that is slow to answer, or never greets, must not hold up a stop for up to
        ``connect_timeout``, and nothing is lost (the job goes back to the spool untried)."""
        if self.stopping:
            raise _Stopping
        attempt = self.loop.create_task(self.connect(lane))
        stop = self.loop.create_task(self.stop_event.wait())
        try:
            await asyncio.wait((attempt, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not attempt.done():
            attempt.cancel()
            await asyncio.wait((attempt,))
        if attempt.cancelled():
            raise _Stopping
        conn, target = attempt.result()        # raises what connect() raised
        if self.stopping:
            conn.abort()
            raise _Stopping
        return conn, target

    def begin_stop(self) -> None:
        """Stop (SIGTERM): take no new job, and give every job whose transaction has not
        begun -- waiting for its site's address, in a lane, being paced, or waiting for a
        connection -- back to its spool shard at once.  Transactions under way go on;
        :meth:`close` ends the rest."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_event.set()
        for fut in self.pacing:
            _wake(fut)
        for domain, jobs in list(self.resolving.items()):
            self.resolving[domain] = []
            self._give_back(jobs, STOPPING)
        for site in self.sites.values():
            for lane in site.lanes.values():
                self._give_back(lane.drain(), STOPPING)
                lane.wakeup.set()
                if lane.retry is not None:
                    lane.retry.cancel()
                    lane.retry = None

    def flush(self, domains=()) -> int:
        """The operator flushed the queue: every (source x site) held after all its hosts
        failed is tried again by its next job (with *domains*: only those of the sites
        this process routes these domains to; one it has not routed yet has no hold
        here); how many were held."""
        if domains:
            sites = {k[0] for k in map(self.domain_site.get, domains) if k is not None}
        else:
            sites = self.sites.values()
        n = 0
        for site in sites:
            if site.down:
                n += len(site.down)
                site.down.clear()
        if n:
            log.info("queue flush: %d (source x site) hold(s) after failed connections "
                     "ended%s", n, f" (of {len(domains)} domain(s))" if domains else "")
        return n

    def adaptive_tick(self) -> None:
        """Once a second (the caller's upkeep): read the node's adaptive state (other
        processes' decisions, cancellations), log back-off steps, apply what changed;
        jobs queued in a lane that is now suspended go elsewhere."""
        started = time.time()
        try:
            changed = self.adaptive.tick()
        except Exception:
            log.exception("adaptive state upkeep failed")
            return
        self.adaptive_read = started     # the status file says so (the admin API waits on it)
        if changed:
            self._relimit()
            now = time.time()
            for site in self.sites.values():
                for lane in list(site.lanes.values()):
                    if lane.queued() and self._held(lane.source.name, site.name, now):
                        self._reroute(lane, None)
                        if lane.active == 0 and not lane.queued():
                            self._forget(lane)

    # -------------------------------------------------------------- upkeep

    def forget_old_sites(self, budget: int | None = None) -> bool:
        """Drop domain -> site entries unused for SITE_FORGET, and sites nobody uses;
        look the rules' domains up again when their answers expired.  True when a pass
        over every entry ended in this call.

        With *budget*, at most that many entries (domains, then sites) are looked at
        in this call, and the next call goes on where it stopped (a pass takes its
        entries as they were when it began; one that went meanwhile is passed over):
        the upkeep's, each second while a pass lasts.  Whole, a provider's site of
        100,000 domains stalled the loop 50 ms a minute, 1,000,000 half a second."""
        if not self._sweep_domains and not self._sweep_sites:
            self._sweep_domains = list(self.domain_site)
            self._sweep_sites = None        # (taken when the domains are done)
        left = 1 << 62 if budget is None else max(1, budget)
        now = self.loop.time()
        rule_domains = set(self.rule_domains) | self.shared_domains
        pending = self._sweep_domains
        while pending and left > 0:
            take = pending[-left:]
            del pending[-left:]
            left -= len(take)
            for domain in take:
                entry = self.domain_site.get(domain)
                if entry is None or domain in self.resolving:
                    continue
                site, at, until = entry
                if domain in rule_domains:
                    # A domain rule's domain, learnt for its rule to shape its site
                    # here whether or not this process has mail for it: looked up
                    # again once its answers expired (its MX hosts may have moved),
                    # not forgotten -- without it, the lanes made here after an hour
                    # had the site's limits without the rule.  Not only after an hour:
                    # a rule's domain that moved to other MX hosts left the new site
                    # without its rule in the processes without its mail (the node's
                    # limit not held there) and the old one with it.
                    if now >= until:
                        self._task(self._learn(domain))
                    continue
                if now - at > SITE_FORGET:
                    del self.domain_site[domain]
                    self._forget_domain(site, domain)
                    self.sites_version += 1
        if pending:
            return False
        if self._sweep_sites is None:
            self._sweep_sites = list(self.sites)
        sites = self._sweep_sites
        while sites and left > 0:
            take = sites[-left:]
            del sites[-left:]
            left -= len(take)
            for key in take:
                site = self.sites.get(key)
                if site is not None and not site.domains and not site.lanes:
                    del self.sites[key]
                    self.sites_version += 1
        if sites:
            return False
        self._sweep_sites = []
        for domain, at in list(self.rule_seen.items()):
            if now - at > SITE_FORGET:      # no mail here for an hour: shared no more
                del self.rule_seen[domain]
                self.rule_seen_version += 1
        if self.rule_domains and self.learning is not None and self.learning.done():
            # (and those whose lookup failed, at start or since: tried again)
            self._task(self._learn_rule_domains())
        for domain in self.shared_domains:      # (the same for the shared ones)
            if domain not in self.domain_site and domain not in self.resolving:
                self._task(self._learn(domain))
        return True

    @property
    def sweeping(self) -> bool:
        """A pass of forget_old_sites with a budget has begun and not ended."""
        return bool(self._sweep_domains or self._sweep_sites)

    def sites_status(self) -> dict:
        """Site name -> its domains (in no order) and hosts, for the sites file (routes to
        one host with different TLS policies are two sites of one name: their domains
        together).  A provider's site can hold hundreds of thousands of domains: the
        caller writes this when sites_version changed, not every second."""
        out: dict = {}
        for s in self.sites.values():
            entry = out.get(s.name)
            if entry is None:
                out[s.name] = {"domains": s.domains, "hosts": list(s.hosts)}
            else:
                entry["domains"] = entry["domains"] | s.domains
        for entry in out.values():
            entry["domains"] = list(entry["domains"])
        return out

    def status(self) -> dict:
        """What this process is doing, for ``mta queue`` (written to a file by the caller
        each second; the sites and their domains are in :meth:`sites_status`)."""
        now = time.time()
        lanes = []
        mono = time.monotonic()
        for site in self.sites.values():
            for lane in site.lanes.values():
                lim = lane.limits
                if mono - lane.rate_at >= 0.5:
                    lane.rate = (lane.sent - lane.rate_sent) / (mono - lane.rate_at)
                    lane.rate_sent, lane.rate_at = lane.sent, mono
                lanes.append({
                    "source": lane.source.name, "site": site.name,
                    "queued": lane.queued(), "transactional": len(lane.urgent),
                    "connections": lane.active,
                    "node_connections": self.limiter.connections(lane.key),
                    "sent": lane.sent, "rate": round(lane.rate, 2),
                    "connection_limit": lim.connection_limit,
                    "max_message_rate": lim.max_message_rate,
                    "max_connection_rate": lim.max_connection_rate,
                })
        return {
            "time": now,
            "nodes": self.nodes,        # the lanes' limits are 1/nodes of the rules'
            "in_flight": self.in_flight,
            "lanes": lanes,
            "adaptive": self.adaptive.status(),
            "adaptive_read": self.adaptive_read,
            "warmup": self.warmup.status() if self.warmup.plans else {},
            "sources": {s.name: {"address": s.address or "", "proxy": bool(s.proxy),
                                 "suspended_until": s.suspended_until(now),
                                 "reason": s.reason if not s.usable() else ""}
                        for s in self.sources.values()},
        }

    async def close(self, timeout: float = 10.0) -> None:
        """Let idle workers end (QUIT their connections); cancel what is still busy."""
        self.stopping = True
        for site in self.sites.values():
            for lane in site.lanes.values():
                lane.wakeup.set()
                if lane.retry is not None:
                    lane.retry.cancel()
                    lane.retry = None
        if self.workers:
            done, busy = await asyncio.wait(set(self.workers), timeout=timeout)
            for t in busy:
                t.cancel()
            if busy:
                await asyncio.wait(busy, timeout=1.0)
        for t in list(self.tasks):
            t.cancel()
        self.limiter.close()
