"""SMTP path check for MAIL FROM and RCPT TO (pure-Python twin).

This is the readable specification of ``mta._ext.smtppath``; both modules
have the same public API and results, and the same tests run against both
(tests/acceptor/test_smtppath.py).

``parse_path(raw, utf8)`` checks an SMTP path like ``<user@example.com>``
(RFC 5321 4.1.2; RFC 6531 for UTF-8 when *utf8*) and returns the address as a
str, '' for ``<>``, or None when the syntax is not acceptable.  A source
route (``<@a,@b:user@c>``) is accepted and dropped, as RFC 5321 asks.  The
limits are those of RFC 5321 4.5.3.1: the path at most 256 octets with its
angle brackets, the local part 64, the domain 255.  An address literal
(``[192.0.2.1]``, ``[IPv6:...]``) must be one the resolver's own parser
(:func:`mta.literal.address_literal`) can route to.  An address that is not
valid UTF-8 is refused.
"""
from __future__ import annotations

import re

from mta.literal import address_literal

MAX_PATH = 256          # RFC 5321 4.5.3.1.3, octets in a forward/reverse path, <> included
MAX_LOCAL_PART = 64     # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255        # RFC 5321 4.5.3.1.2

# Address syntax (RFC 5321 4.1.2, RFC 6531 for UTF-8), as compiled patterns.
_LABEL = rb"[A-Za-z0-9{u}](?:[A-Za-z0-9{u}-]{{0,61}}[A-Za-z0-9{u}])?"
_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{u}-]+"
_QUOTED = rb'"[\x20-\x7e{u}]*"'


def _address_re(u: bytes):
    label = _LABEL.replace(b"{u}", u).replace(b"{{", b"{").replace(b"}}", b"}")
    atom = _ATOM.replace(b"{u}", u).replace(b"{{", b"{").replace(b"}}", b"}")
    quoted = _QUOTED.replace(b"{u}", u)
    local = rb"(?:" + atom + rb"(?:\." + atom + rb")*|" + quoted + rb")"
    domain = rb"(?:" + label + rb"(?:\." + label + rb")*|\[[^\[\]]+\])"
    return re.compile(rb"(" + local + rb")@(" + domain + rb")", re.S)


_ADDR_ASCII = _address_re(b"")
_ADDR_UTF8 = _address_re(b"\x80-\xff")


def _valid_literal(d: bytes) -> bool:
    # The resolver's own parser: a literal accepted here is one it can route to
    # ([::1] without "IPv6:", or [IPv6:192.0.2.1], would bounce later).
    return address_literal(d.decode("ascii", "replace")) is not None


def parse_path(raw: bytes, utf8: bool) -> str | None:
    """Check an SMTP path like ``<user@example.com>``; return the address, '' for ``<>``.

    Returns None when the syntax is not acceptable (see the module's docstring).
    """
    if not 2 <= len(raw) <= MAX_PATH or raw[0] != 0x3C or raw[-1] != 0x3E:
        return None
    addr = raw[1:-1]
    if not addr:
        return ""
    if addr[0] == 0x40:  # source route
        colon = addr.find(b":")
        if colon < 0:
            return None
        addr = addr[colon + 1:]
    m = (_ADDR_UTF8 if utf8 else _ADDR_ASCII).fullmatch(addr)
    if m is None:
        return None
    # The match starts at 0, so the end of the local part is its length, and
    # the domain follows its "@" (one call, no group objects built).
    at = m.end(1)
    if at > MAX_LOCAL_PART or len(addr) - at - 1 > MAX_DOMAIN:
        return None
    if addr[at + 1] == 0x5B and not _valid_literal(addr[at + 1:]):
        return None
    try:
        return addr.decode("utf-8")
    except UnicodeDecodeError:
        return None
