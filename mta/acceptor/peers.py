"""Client addresses, parsed once: what the relay check and loopback-only access compare.

An IPv4 client reaching an IPv6 socket shows up as ``::ffff:a.b.c.d``; it is
unwrapped so that ``127.0.0.0/8`` and ``is_loopback`` mean the same for both.
"""
import functools
import ipaddress

CACHE_SIZE = 65536   # distinct client addresses remembered per acceptor


@functools.lru_cache(maxsize=CACHE_SIZE)
def peer_address(ip: str):
    """The client's address as an ``ip_address``, IPv4-mapped unwrapped; None if unparsable."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr
