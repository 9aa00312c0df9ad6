"""HAProxy's PROXY protocol ahead of an SMTP or HTTP connection (``server.proxy_protocol_from``).

Behind a TCP load balancer every client would be the balancer's address: one
client for the per-IP limits, the Received header and the events, and -- with
the balancer on the node itself -- a loopback client, whom ``smtp.relay_networks``
(127.0.0.0/8 by default) lets relay and the HTTP API serves without a key.
With ``send-proxy`` (v1, text) or ``send-proxy-v2`` (binary) the balancer
starts each connection with a header that names the client; a connection from
a network in ``proxy_protocol_from`` must begin with one (else it is closed
without a word: a balancer that does not send it is misconfigured, and a client
there must not pass as the balancer), and the address it names is the client's
from then on.  A connection from anywhere else is served as before, but one
whose first read is a PROXY header is closed (SMTP 421, HTTP 400) and logged: a
balancer missing from ``proxy_protocol_from`` (its clients would pass as the
balancer's address), or a client that names itself another.

Facts from the protocol's specification (haproxy's doc/proxy-protocol.txt):

- v1: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``,
  at most 107 octets;
- v2: the 12-octet signature ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``, a version/command octet
  (0x20 LOCAL, 0x21 PROXY), a family/transport octet (0x11 TCP over IPv4, 0x21 TCP
  over IPv6, ...), a 2-octet big-endian length, then the addresses and TLVs;
- LOCAL (v2) and UNKNOWN (v1) are the balancer's own connections (health checks) or
  clients it cannot name: they are served as a client of no known address (no relay,
  not the API's loopback client), never as the balancer's own address.

Written here rather than taken from a library: ~60 lines, and the acceptor needs
it incrementally (the header may come in pieces) with a hard bound on what it
buffers.
"""
from __future__ import annotations

import ipaddress
import struct

__all__ = ["ProxyError", "parse", "Reader", "DIRECT", "begin", "forget", "take", "MAX_HEADER",
           "UNKNOWN_CLIENT"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
MAX_V1 = 107                 # octets of a v1 line, CRLF included
MAX_HEADER = 16 + 1024       # a v2 header with its TLVs; HAProxy sends far less
UNKNOWN_CLIENT = "unknown"   # the peer of a LOCAL / UNKNOWN header: no address, no rights
_V2 = struct.Struct("!12sBBH")
_FAMILIES = {0x11: (4, 12), 0x12: (4, 12), 0x21: (16, 36), 0x22: (16, 36)}   # TCP/UDP


class ProxyError(ValueError):
    """Not a PROXY header (or one this acceptor will not take)."""


def parse(buf: bytes) -> tuple[int, str | None] | None:
    """Read a PROXY header at the start of *buf*.

    (octets it takes, the client's address -- None for the balancer's own
    connections, LOCAL or UNKNOWN), or None when *buf* is a header's beginning
    that needs more octets.  ProxyError when it cannot be one.
    """
    if buf[:1] == b"P":
        if len(buf) < len(V1_PREFIX):
            if V1_PREFIX.startswith(buf):
                return None
            raise ProxyError("not a PROXY header")
        if not buf.startswith(V1_PREFIX):
            raise ProxyError("not a PROXY header")
        end = buf.find(b"\r\n", 0, MAX_V1)
        if end < 0:
            if len(buf) >= MAX_V1:
                raise ProxyError("PROXY v1 line longer than 107 octets")
            return None
        return end + 2, _v1(buf[len(V1_PREFIX):end])
    if buf[:1] == b"\r":
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyError("not a PROXY header")
        if len(buf) < _V2.size:
            return None
        _, ver_cmd, fam, length = _V2.unpack_from(buf)
        if ver_cmd >> 4 != 2 or ver_cmd & 0xF > 1:
            raise ProxyError(f"PROXY v2: version/command {ver_cmd:#04x}")
        total = _V2.size + length
        if total > MAX_HEADER:
            raise ProxyError(f"PROXY v2 header of {total} octets")
        if len(buf) < total:
            return None
        if ver_cmd & 0xF == 0 or fam not in _FAMILIES:
            return total, None           # LOCAL, or not TCP/UDP over IP: the balancer's own
        size, need = _FAMILIES[fam]
        if length < need:
            raise ProxyError("PROXY v2: address block too short")
        return total, _client(ipaddress.ip_address(buf[_V2.size:_V2.size + size]))
    raise ProxyError("not a PROXY header")


def _v1(line: bytes) -> str | None:
    words = line.split(b" ")
    if words[0] == b"UNKNOWN":
        return None
    if words[0] not in (b"TCP4", b"TCP6") or len(words) != 5:
        raise ProxyError("PROXY v1: expected TCP4, TCP6 or UNKNOWN and four fields")
    # No IPv6 zone ("fe80::1%eth0"): no balancer names one, and ip_address takes a zone of
    # any characters but "%" -- a line break too -- that would follow the address into the
    # Received header and the logs (and "::1%x" is inside ::1/128).
    if b"%" in words[1] or b"%" in words[2]:
        raise ProxyError("PROXY v1: bad address or port")
    try:
        src = ipaddress.ip_address(words[1].decode("ascii"))
        ipaddress.ip_address(words[2].decode("ascii"))
        ports = [int(w) for w in words[3:]]
    except (ValueError, UnicodeDecodeError):
        raise ProxyError("PROXY v1: bad address or port") from None
    if src.version != (4 if words[0] == b"TCP4" else 6) or \
            not all(0 <= p <= 65535 for p in ports):
        raise ProxyError("PROXY v1: bad address or port")
    return _client(src)


def _client(addr) -> str:
    """The client at *addr* as the acceptor names it: an IPv4 client that the balancer
    took on an IPv6 socket (``bind :::25 v4v6``) is sent as ``::ffff:a.b.c.d``, and
    is named by its IPv4 address (Received, logs, events), as it would be directly."""
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class Reader:
    """The PROXY header of one connection, read before its protocol begins.

    The session (SMTP or HTTP) holds one in ``proxy`` from connection_made until
    the header is whole, and in its acceptor's ``proxy_pending`` (counted by the
    drain, bounded by max_connections); it provides ``_admit()`` (what
    connection_made does for a direct client), ``_proxy_failed(why)`` (close
    without a word), ``_proxy_refused()`` (a direct client's header: reply, close,
    log), ``peer_ip`` and ``data_received``.
    """

    __slots__ = ("buf", "timer")

    def __init__(self, loop, timeout: float, on_timeout):
        self.buf = b""
        self.timer = loop.call_later(timeout, on_timeout, "no PROXY header in time")

    def cancel(self) -> None:
        self.timer.cancel()


class _Direct:
    """``proxy`` of a session whose peer is not a balancer, until its first read: a
    PROXY header there is refused (take)."""

    __slots__ = ()

    def cancel(self) -> None:
        pass


DIRECT = _Direct()


def begin(session, limit: int) -> bool:
    """In *session*'s connection_made: True when its peer is a balancer, whose header is
    now awaited (or, past *limit* connections waiting for theirs, refused)."""
    a = session.a
    if not (a.proxy_networks and a.behind_proxy(session.peer_ip)):
        # (its first read passes through take(), as a balancer's does: no cost per read)
        session.proxy = DIRECT
        return False
    if len(a.proxy_pending) >= limit:
        session._proxy_failed("too many connections waiting for their PROXY header")
        return True
    session.proxy = Reader(a.loop, a.proxy_timeout, session._proxy_failed)
    a.proxy_pending.add(session)
    return True


def forget(session) -> None:
    """*session* awaits its header no more (it failed, or the connection is gone)."""
    if session.proxy is not None:
        session.proxy.cancel()
        session.proxy = None
        session.a.proxy_pending.discard(session)


def take(session, data: bytes) -> None:
    """Feed *data* to *session*'s PROXY header; once it is whole, the client it names is
    the session's peer, the session is admitted and gets what followed the header.
    A direct client's first read (DIRECT): refused when it is a PROXY header, else
    the session gets it."""
    reader = session.proxy
    if reader is DIRECT:
        session.proxy = None
        if data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE):
            session._proxy_refused()
        else:
            session.data_received(data)
        return
    reader.buf += data
    try:
        got = parse(reader.buf)
    except ProxyError as exc:
        session._proxy_failed(str(exc))
        return
    if got is None:
        return                  # (parse refuses more than MAX_HEADER)
    forget(session)
    n, client = got
    # LOCAL / UNKNOWN: the balancer's own connection (a health check) or a client it
    # cannot name.  Either way not the balancer's address, which on the node itself
    # would be a loopback client (relay_networks, the keyless API): an unknown one.
    session.peer_ip = client if client is not None else UNKNOWN_CLIENT
    session._admit()
    if reader.buf[n:] and not session.closing:
        session.data_received(reader.buf[n:])
