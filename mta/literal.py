"""RFC 5321 4.1.3 address literals: one parser for the SMTP session (which answers RCPT
and MAIL), the resolver (which routes to the address) and the configuration's EHLO names.

A literal is ``[`` a dotted-quad IPv4 address ``]`` or ``[IPv6:`` an IPv6 address ``]``;
an IPv6 address without its tag, or an IPv4 address with it, is not one; nor is an IPv6
address with a zone (``fe80::1%eth0``): RFC 5321's IPv6-addr has none, and ``ipaddress``
takes a zone of any characters but "%" -- a line break, a NUL, "RCPT TO:" -- which the
SMTP session would take into the Received header, the logs and the envelope.
"""
from __future__ import annotations

import ipaddress


def address_literal(domain: str) -> str | None:
    """The IP address of an address literal (``[192.0.2.1]``, ``[IPv6:...]``), else None."""
    if len(domain) < 3 or domain[0] != "[" or domain[-1] != "]":
        return None
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:
                return None
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None
