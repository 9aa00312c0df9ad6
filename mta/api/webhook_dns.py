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
  RFC 6761 §6.3.  /etc/hosts is not read (nor any other NSS source).
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

import socket

import dns.exception
from aiohttp.abc import AbstractResolver, ResolveResult

from mta import dns as node_dns

# Names (A and AAAA answers) kept: targets and tokens URLs are a few per webhook
# (webhooks.max_webhooks); beyond that the least recently used is asked again.
CACHE_SIZE = 4096
_LOOPBACK = ("127.0.0.1", "::1")
_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


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

    def __init__(self, nameservers=(), timeout: float = 5.0, ipv6: bool = True):
        self._nameservers = list(nameservers)
        self._timeout = timeout
        self._ipv6 = ipv6
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
