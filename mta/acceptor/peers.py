"""Client addresses, parsed once: what the relay check and loopback-only access compare,
and what the per-client limits count.

An IPv4 client reaching an IPv6 socket shows up as ``::ffff:a.b.c.d``; it is
unwrapped so that ``127.0.0.0/8`` and ``is_loopback`` mean the same for both.

Per-client limits (``smtp.max_connections_per_ip``, ``smtp.max_auth_failures``)
count an IPv4 client by its address but an IPv6 client by its network of
``smtp.ipv6_client_prefix`` bits (64 by default): an IPv6 host usually has a
/64 to itself and can take a new address of it for every connection, so a
limit per address would bound nothing.  A network of clients then shares the
limit, as clients behind one IPv4 NAT do.
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


@functools.lru_cache(maxsize=CACHE_SIZE)
def client_key(ip: str, ipv6_prefix: int) -> str:
    """The client *ip* as the per-client limits count it: an IPv4 address as it is, an
    IPv6 one as its network of *ipv6_prefix* bits ("2001:db8::/64"); *ip* itself when it
    is not an address (a balancer's client it could not name)."""
    addr = peer_address(ip)
    if addr is None:
        return ip
    if addr.version == 4:
        return str(addr)
    return str(ipaddress.IPv6Network((int(addr), ipv6_prefix), strict=False))
