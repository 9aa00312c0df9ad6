"""SOCKS5 client for delivery connections (RFC 1928 CONNECT, RFC 1929 username/password).

An egress source may reach receiving servers through a SOCKS5 proxy whose
outbound address is the source's IP: that is how a fleet sends from more
addresses than one host can bind.  :func:`connect` opens a TCP connection to
the proxy, negotiates the method (no authentication, or username/password
when the :class:`Socks5Proxy` carries a user name), asks it to CONNECT to the
destination and returns the connected socket plus the proxy's BND.ADDR.  The
caller (``mta.delivery.client``) wraps that socket in its asyncio Protocol, so
SMTP and a later STARTTLS run over the stream the proxy relays.

Written here rather than taken from PyPI: the handshake is four short
messages, the async SOCKS packages on PyPI wrap their own stream or socket
types (we need a plain socket to hand to ``loop.create_connection(sock=...)``
under uvloop and asyncio alike), and we need their failures sorted our way:

- :class:`ProxyUnavailable`: the proxy itself is the trouble (refused, no
  answer, hung up or spoke garbage during the handshake, authentication
  refused, "general failure", "not allowed by ruleset", "command not
  supported").  The caller treats the source as unusable for now, not the
  destination.
- :class:`DestinationError` (an OSError with the errno of what the proxy
  reported: ENETUNREACH, EHOSTUNREACH, ECONNREFUSED, ETIMEDOUT, and
  EAFNOSUPPORT for "address type not supported"): the proxy works but could
  not reach the destination.  Also raised when the deadline passes while
  waiting for the CONNECT reply: the proxy answered the method negotiation,
  so it is alive, and the wait is its own connect to the destination.

Bounded: every read is of a known small size (a reply is at most 262
bytes), and the whole exchange, TCP connect included, runs within the
caller's deadline (``connect_timeout``).  Cost: one socket, four small writes,
four or five small reads per connection; nothing per SMTP byte afterwards.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

from mta.config import hostport

__all__ = [
    "DestinationError", "ProxyUnavailable", "Socks5Proxy", "connect", "describe_os_error",
    "encode_address",
    "REPLY_TEXT",
]

VERSION = 5
AUTH_VERSION = 1                   # RFC 1929 sub-negotiation version
METHOD_NONE = 0x00
METHOD_USERPASS = 0x02
METHOD_REFUSED = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04
FIELD_MAX = 255                    # bytes: a user name, a password, a domain name

# REP codes (RFC 1928 section 6): readable text, and for the destination's troubles the
# errno they stand for.  A code without an errno (0x01, 0x02, 0x07, unassigned) is the
# proxy's trouble.
REPLY_TEXT = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}
DESTINATION_ERRNO = {
    0x03: errno.ENETUNREACH,
    0x04: errno.EHOSTUNREACH,
    0x05: errno.ECONNREFUSED,
    0x06: errno.ETIMEDOUT,
    # The proxy cannot reach this kind of address (an IPv4-only proxy, an IPv6 MX host):
    # this destination's trouble, like a direct source of the other IP version; suspending
    # the source for it would stop its mail to every other site.
    0x08: errno.EAFNOSUPPORT,
}


@dataclass(frozen=True, slots=True)
class Socks5Proxy:
    """Where the proxy is and how to log in: ``host``, ``port``, ``username``, ``password``.

    An empty username means no authentication.  Immutable and hashable (a
    source's identity may include it); ``repr`` never shows the password.
    """

    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("SOCKS5 proxy host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"SOCKS5 proxy port {self.port} out of range 1-65535")
        if len(self.username.encode()) > FIELD_MAX or len(self.password.encode()) > FIELD_MAX:
            raise ValueError(f"SOCKS5 user name and password are at most {FIELD_MAX} bytes")
        if self.password and not self.username:
            raise ValueError("SOCKS5 password given without a user name")

    @classmethod
    def parse(cls, hostport: str, username: str = "", password: str = "") -> Socks5Proxy:
        """``"host:port"`` or ``"[v6]:port"`` (the ``socks5_proxy`` config form) -> proxy."""
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"SOCKS5 proxy {hostport!r} is not host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"SOCKS5 proxy {hostport!r}: write an IPv6 address as [addr]:port")
        return cls(host, int(port), username, password)

    @property
    def name(self) -> str:
        """``host:port`` for logs and errors (never the password)."""
        return hostport(self.host, self.port)


class ProxyUnavailable(Exception):
    """The proxy cannot be used: ``.reason`` says why in a readable way; ``.code`` is the
    REP code when the proxy sent one (else None)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class DestinationError(OSError):
    """The proxy works, but reports that the destination could not be reached
    (``errno`` as for a direct connect; ``.code`` the REP code, None for a timeout)."""

    def __init__(self, err: int, reason: str, code: int | None = None) -> None:
        super().__init__(err, reason)
        self.code = code


def describe_os_error(exc: OSError) -> str:
    """The system's text for *exc*'s errno ("Connection refused"), else what it says
    (uvloop's connect errors carry "Connect call failed (...)" as their text)."""
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def encode_address(host: str, port: int) -> bytes:
    """ATYP, DST.ADDR and DST.PORT for *host*: an IPv4 or IPv6 literal, else a domain name
    (which the proxy resolves)."""
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} out of range")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if not name or len(name) > FIELD_MAX:
            raise ValueError(f"destination name {host!r} is empty or longer than "
                             f"{FIELD_MAX} bytes") from None
        return bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((atyp,)) + ip.packed + struct.pack("!H", port)


class _Exchange:
    """One handshake on a connected non-blocking socket; ``stage`` says how far it got."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 proxy: Socks5Proxy) -> None:
        self.loop = loop
        self.sock = sock
        self.proxy = proxy
        self.stage = "method negotiation"

    async def _recv(self, n: int) -> bytes:
        """Exactly *n* bytes; ProxyUnavailable if the proxy hangs up first."""
        buf = b""
        while len(buf) < n:
            try:
                chunk = await self.loop.sock_recv(self.sock, n - len(buf))
            except OSError as exc:
                raise ProxyUnavailable(f"proxy {self.proxy.name} connection failed during "
                                       f"{self.stage} ({describe_os_error(exc)})") from None
            if not chunk:
                raise ProxyUnavailable(f"proxy {self.proxy.name} closed the connection during "
                                       f"{self.stage}")
            buf += chunk
        return buf

    async def _send(self, data: bytes) -> None:
        try:
            await self.loop.sock_sendall(self.sock, data)
        except OSError as exc:
            raise ProxyUnavailable(f"proxy {self.proxy.name} connection failed during "
                                   f"{self.stage} ({describe_os_error(exc)})") from None

    async def run(self, request: bytes) -> tuple[str, int]:
        """Negotiate, authenticate, CONNECT; return BND.ADDR and BND.PORT."""
        p = self.proxy
        # 1. Method: offer only what we can do; username/password only when configured.
        method = METHOD_USERPASS if p.username else METHOD_NONE
        await self._send(bytes((VERSION, 1, method)))
        ver, chosen = await self._recv(2)
        if ver != VERSION:
            raise ProxyUnavailable(f"proxy {p.name} is not a SOCKS5 server (version {ver})")
        if chosen != method:
            what = "username/password" if method == METHOD_USERPASS else "no authentication"
            raise ProxyUnavailable(f"proxy {p.name} refused {what} (method 0x{chosen:02x})")
        # 2. RFC 1929 username/password.
        if method == METHOD_USERPASS:
            self.stage = "authentication"
            user, pw = p.username.encode(), p.password.encode()
            await self._send(bytes((AUTH_VERSION, len(user))) + user + bytes((len(pw),)) + pw)
            _, status = await self._recv(2)
            if status != 0:
                raise ProxyUnavailable(f"proxy {p.name} refused the credentials of user "
                                       f"{p.username!r}")
        # 3. CONNECT; the reply comes after the proxy's own connect to the destination.
        self.stage = "connect request"
        await self._send(bytes((VERSION, CMD_CONNECT, 0)) + request)
        ver, rep, _, atyp = await self._recv(4)
        if ver != VERSION:
            raise ProxyUnavailable(f"proxy {p.name} sent a malformed reply (version {ver})")
        if rep != 0:
            text = REPLY_TEXT.get(rep, f"unassigned reply 0x{rep:02x}")
            err = DESTINATION_ERRNO.get(rep)
            if err is not None:
                raise DestinationError(err, f"{text} (proxy {p.name})", rep)
            raise ProxyUnavailable(f"proxy {p.name}: {text}", rep)
        if atyp == ATYP_IPV4:
            addr = socket.inet_ntop(socket.AF_INET, await self._recv(4))
        elif atyp == ATYP_IPV6:
            addr = socket.inet_ntop(socket.AF_INET6, await self._recv(16))
        elif atyp == ATYP_DOMAIN:
            (n,) = await self._recv(1)
            addr = (await self._recv(n)).decode("ascii", "replace")
        else:
            raise ProxyUnavailable(f"proxy {p.name} sent a reply with address type "
                                   f"0x{atyp:02x}")
        (bport,) = struct.unpack("!H", await self._recv(2))
        return addr, bport


async def connect(proxy: Socks5Proxy, host: str, port: int, timeout: float, *,
                  loop: asyncio.AbstractEventLoop | None = None
                  ) -> tuple[socket.socket, str, int]:
    """Connect to *host*:*port* through *proxy* within *timeout* seconds.

    Returns (the connected non-blocking socket, BND.ADDR, BND.PORT): what the
    proxy reports as its outbound address, "0.0.0.0"/"::" when it does not say
    (microsocks, for one, always sends zeros).  Raises ProxyUnavailable or
    DestinationError; ValueError for a destination that cannot be encoded.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    request = encode_address(host, port)    # a bad destination fails before any I/O
    # 1. TCP to the proxy.  An address literal needs no lookup (the usual case, and no
    #    executor round trip per connection); a name is the operator's, looked up by the
    #    system (getaddrinfo: /etc/hosts, the system resolver).
    try:
        ip = ipaddress.ip_address(proxy.host)
    except ValueError:
        ip = None
    if ip is not None:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        infos = [(family, socket.SOCK_STREAM, 0, "", (proxy.host, proxy.port))]
    else:
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM),
                max(deadline - loop.time(), 0))
        except (asyncio.TimeoutError, TimeoutError):
            raise ProxyUnavailable(f"proxy {proxy.name}: address lookup timed out") from None
        except OSError as exc:
            raise ProxyUnavailable(f"proxy {proxy.name}: address lookup failed ({exc})") from None
    sock = None
    last = ""
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr),
                                   max(deadline - loop.time(), 0))
            break
        except (asyncio.TimeoutError, TimeoutError):
            sock.close()
            raise ProxyUnavailable(f"proxy {proxy.name} did not accept the connection within "
                                   f"{timeout:g} s") from None
        except OSError as exc:
            sock.close()
            sock = None
            last = describe_os_error(exc)
    if sock is None:
        raise ProxyUnavailable(f"proxy {proxy.name} unreachable ({last or 'no address'})")
    # 2. The SOCKS exchange, within what is left of the deadline.
    ex = _Exchange(loop, sock, proxy)
    try:
        bnd_addr, bnd_port = await asyncio.wait_for(ex.run(request),
                                                    max(deadline - loop.time(), 0))
    except (asyncio.TimeoutError, TimeoutError):
        sock.close()
        if ex.stage == "connect request":
            raise DestinationError(errno.ETIMEDOUT, f"connect to {hostport(host, port)} through proxy "
                                   f"{proxy.name} timed out") from None
        raise ProxyUnavailable(f"proxy {proxy.name} did not answer the {ex.stage} within "
                               f"{timeout:g} s") from None
    except BaseException:
        sock.close()
        raise
    return sock, bnd_addr, bnd_port
