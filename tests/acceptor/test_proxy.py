"""The PROXY protocol header a load balancer sends ahead of a connection (mta/acceptor/proxy.py)."""
import struct

import pytest

from mta.acceptor import proxy

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(cmd=0x21, fam=0x11, addrs=None, tlv=b"") -> bytes:
    if addrs is None:
        addrs = bytes([192, 0, 2, 7, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 25)
    body = addrs + tlv
    return SIG + bytes([cmd, fam]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("data,want", [
    (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\nEHLO x\r\n", (41, "192.0.2.7")),
    (b"PROXY TCP6 2001:db8::7 ::1 40000 25\r\n", (37, "2001:db8::7")),
    (b"PROXY UNKNOWN\r\n", (15, None)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", (35, None)),
    (v2(), (28, "192.0.2.7")),
    (v2(tlv=b"\x03\x00\x04abcd") + b"rest", (35, "192.0.2.7")),
    (v2(fam=0x21, addrs=bytes(15) + b"\x01" + bytes(16) + b"\x00\x19\x00\x19"),
     (52, "::1")),
    # an IPv4 client taken on the balancer's IPv6 socket: named by its IPv4 address
    (b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:127.0.0.1 40000 25\r\n", (55, "192.0.2.7")),
    (v2(fam=0x21, addrs=bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7]) + bytes(10)
        + b"\xff\xff" + bytes([127, 0, 0, 1]) + b"\x00\x19\x00\x19"), (52, "192.0.2.7")),
    (v2(cmd=0x20, fam=0x00, addrs=b""), (16, None)),       # LOCAL: a health check
    (v2(fam=0x31, addrs=bytes(216)), (232, None)),         # AF_UNIX: the balancer's own
])
def test_whole_headers(data, want):
    assert proxy.parse(data) == want


@pytest.mark.parametrize("whole", [b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n", v2()])
def test_a_header_in_pieces_waits_for_the_rest(whole):
    for i in range(1, len(whole)):
        assert proxy.parse(whole[:i]) is None, i
    assert proxy.parse(whole)[0] == len(whole)


@pytest.mark.parametrize("data", [
    b"EHLO client.test\r\n", b"POST /api/v1/transmissions HTTP/1.1\r\n", b"PROXZ", b"\r\n\r\nx",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 40000\r\n",            # a field short
    b"PROXY TCP4 2001:db8::7 127.0.0.1 1 2\r\n",            # v6 address under TCP4
    b"PROXY TCP4 192.0.2.7 127.0.0.1 1 70000\r\n",          # port out of range
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",                 # an IPv6 zone: no balancer sends one
    b"PROXY TCP6 2001:db8::7 ::1%x\nX:y 1 2\r\n",
    b"PROXY UDP4 192.0.2.7 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 " + b"1" * 200,                            # no CRLF within 107 octets
    SIG + b"\x11\x11\x00\x0c" + bytes(12),                  # version 1 in a v2 header
    SIG + b"\x22\x11\x00\x0c" + bytes(12),                  # command 2
    SIG + b"\x21\x11\xff\xff",                              # 65,535 octets announced
    SIG + b"\x21\x11\x00\x04" + bytes(4),                   # IPv4 block too short
])
def test_what_is_not_a_header_is_refused(data):
    with pytest.raises(proxy.ProxyError):
        proxy.parse(data)
