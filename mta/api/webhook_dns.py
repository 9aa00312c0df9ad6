"""Name resolution for webhook requests: aiohttp's resolver interface over the node's DNS.

Library, imported with aiohttp (when the first webhook session is made,
:func:`mta.api.webhooks.new_session`).  A webhook target's (or OAuth2 tokens
URL's) host name is looked up as delivery looks up an MX host: through
:class:`mta.dns.Resolver` on the event loop, asking ``[delivery] nameservers``
(empty: those of /etc/resolv.conf, read by dnspython) within
``delivery.dns_timeout``, A and AAAA (AAAA only with ``delivery.ipv6``), answers
cached for their TTL (clamped to [5 s, 1 day]), failures for 2 s.  Not aiohttp's
default, ``getaddrinfo`` in a thread: under uvloop those are libuv's 4 worker
threads, and four target names whose DNS never answers held them for the
system resolver's whole timeout (10 s and more each), so every other webhook's
lookups -- and the API's test POSTs -- waited behind them.

- An IP address is its own answer (aiohttp does not even ask for one).
- ``localhost`` and names under ``.localhost`` are the loopback addresses,
  127.0.0.1 then ::1 (::1 only with ``delivery.ipv6``), without a query:
  RFC 6761 §6.3.
- A name in /etc/hosts is answered from it, without a query, as the system's
  resolver does first ("hosts: files dns"): targets an operator named there
  before this resolver kept working (with ``delivery.ipv6`` off, a name it gives
  IPv6 addresses only is asked of the DNS).  The file is read again when it changes
  (looked at once a second at most; its first MAX_HOSTS_FILE octets).  No other
  NSS source is read.
- No address (NXDOMAIN, no A/AAAA record, an invalid name): ``socket.gaierror``
  EAI_NONAME; the DNS not answering in time (timeout, SERVFAIL, REFUSED):
  EAI_AGAIN, its text naming the query and what the servers did.  aiohttp makes
  either a ``ClientConnectorDNSError``: the POST's failure is "connection"
  ("Cannot connect to host NAME:PORT ssl:default [NAME: ...]"), retried on the
  webhook's schedule like a refused connection, and shown as its last failure.

The addresses go on to aiohttp's connect, so :func:`mta.api.webhooks.admin_guard`
still sees (and refuses) the admin listener's address whatever name led to it.

Cost: a cached name is a dict probe per new connection (aiohttp's own DNS
cache is off: this one keeps the answers' TTLs); an uncached one is one or two
UDP queries on the event loop, no thread.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import time

import dns.exception
from aiohttp.abc import AbstractResolver, ResolveResult

from mta import dns as node_dns

# Names (A and AAAA answers) kept: targets and tokens URLs are a few per webhook
# (webhooks.max_webhooks); beyond that the least recently used is asked again.
CACHE_SIZE = 4096
_LOOPBACK = ("127.0.0.1", "::1")
_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
HOSTS_FILE = "/etc/hosts"
MAX_HOSTS_FILE = 1 << 20    # octets of it read (a larger file's rest is not)
HOSTS_RECHECK = 1.0         # seconds between looks at whether it changed


class HostsFile:
    """The names of a hosts file (``address name [aliases...]`` lines, ``#`` comments)
    and their addresses, IPv4 ones first; read again when its inode, size or time
    changed, looked at every HOSTS_RECHECK seconds at most.  A line whose address is
    not one is passed over; no file is no names."""

    def __init__(self, path: str = HOSTS_FILE, clock=time.monotonic):
        self.path = path
        self.clock = clock
        self._next = 0.0
        self._stamp = None
        self._names: dict[str, list[str]] = {}

    def addresses(self, host: str) -> list[str]:
        now = self.clock()
        if now >= self._next:
            self._next = now + HOSTS_RECHECK
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                stamp = None
            if stamp != self._stamp:
                self._stamp = stamp
                self._names = self._read() if stamp is not None else {}
        return self._names.get(host.rstrip(".").lower(), [])

    def _read(self) -> dict[str, list[str]]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_HOSTS_FILE)
        except OSError:
            return {}
        names: dict[str, list[str]] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            fields = line.partition("#")[0].split()
            if len(fields) < 2:
                continue
            try:
                ip = ipaddress.ip_address(fields[0].partition("%")[0])
            except ValueError:
                continue
            for name in fields[1:]:
                got = names.setdefault(name.rstrip(".").lower(), [])
                if str(ip) not in got:
                    got.append(str(ip))
        for got in names.values():
            got.sort(key=lambda a: ":" in a)      # (stable: IPv4 first, else as written)
        return names


def is_localhost(host: str) -> bool:
    """True for ``localhost`` and names under it (RFC 6761 §6.3), any case, with or
    without the final dot."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


class WebhookResolver(AbstractResolver):
    """aiohttp's resolver for webhook sessions: ``mta.dns.Resolver``, made at the first
    lookup (in the loop that uses it), with *nameservers* ((ip, port) pairs, as
    ``Settings.nameservers``; empty: /etc/resolv.conf), *timeout* seconds per lookup,
    *ipv6*: AAAA too."""

    def __init__(self, nameservers=(), timeout: float = 5.0, ipv6: bool = True,
                 hosts: HostsFile | None = None):
        self._nameservers = list(nameservers)
        self._timeout = timeout
        self._ipv6 = ipv6
        self._hosts = hosts if hosts is not None else HostsFile()
        self._dns: node_dns.Resolver | None = None

    def _resolver(self) -> node_dns.Resolver:
        if self._dns is None:
            try:
                self._dns = node_dns.Resolver(self._nameservers or None,
                                              timeout=self._timeout, ipv6=self._ipv6,
                                              cache_size=CACHE_SIZE)
            except (dns.exception.DNSException, OSError, ValueError) as exc:
                # (no /etc/resolv.conf, or no server named in it)
                raise socket.gaierror(socket.EAI_AGAIN, "no DNS server to ask (set "
                                      f"[delivery] nameservers): {exc}") from None
        return self._dns

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if is_localhost(host):
            addresses = list(_LOOPBACK if self._ipv6 else _LOOPBACK[:1])
        else:
            addresses = [a for a in self._hosts.addresses(host) if self._ipv6 or ":" not in a]
            if not addresses:
                # (not in the file, or only with IPv6 addresses and IPv6 off: glibc's
                # "files" answers nothing for that family, and "dns" is asked)
                (got,) = await self._resolver().resolve_hosts([host])
                if isinstance(got, node_dns.DnsTempError):
                    raise socket.gaierror(socket.EAI_AGAIN, f"DNS lookup failed: {got}")
                addresses = got[0]
        out = []
        for ip in addresses:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            if family in (0, fam):
                out.append(ResolveResult(hostname=host, host=ip, port=port, family=fam,
                                         proto=0, flags=_FLAGS))
        if not out:
            # (aiohttp takes an empty list for a bug, not for a name without addresses)
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: no such name, or no address "
                                  "for it (asked the node's DNS servers)")
        return out

    async def close(self) -> None:
        """Cancel the queries in flight."""
        if self._dns is not None:
            self._dns.close()
