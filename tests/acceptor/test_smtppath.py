"""Tests of the SMTP path check of MAIL and RCPT (mta._ext.smtppath and its pure twin):
known answers through both, and the compiled module against the twin's patterns on
generated paths."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta import native

PURE = native.load("smtppath", pure=True)
COMPILED = native.load("smtppath", pure=False)
IMPLS = {"pure": PURE, "compiled": COMPILED}


@pytest.fixture(params=sorted(IMPLS))
def mod(request):
    return IMPLS[request.param]


KNOWN = [
    (b"<s@example.com>", False, "s@example.com"),
    (b"<>", False, ""),
    (b"<", False, None),
    (b"s@example.com", False, None),
    (b"<@a,@b:user@c.example>", False, "user@c.example"),
    (b"<@a,@b>", False, None),
    (b"<@a:>", False, None),
    (b"<first.last+tag@sub.example.org>", False, "first.last+tag@sub.example.org"),
    (b"<.a@example.com>", False, None),
    (b"<a.@example.com>", False, None),
    (b"<a..b@example.com>", False, None),
    (b"<a@example.com.>", False, None),
    (b"<a@-example.com>", False, None),
    (b"<a@example-.com>", False, None),
    (b"<a@ex-ample.com>", False, "a@ex-ample.com"),
    (b"<a@" + b"x" * 63 + b".com>", False, "a@" + "x" * 63 + ".com"),
    (b"<a@" + b"x" * 64 + b".com>", False, None),
    (b"<" + b"l" * 64 + b"@example.com>", False, "l" * 64 + "@example.com"),
    (b"<" + b"l" * 65 + b"@example.com>", False, None),
    (b'<"a b"@example.com>', False, '"a b"@example.com'),
    (b'<"a"b"@example.com>', False, '"a"b"@example.com'),
    (b'<"a@b"@example.com>', False, '"a@b"@example.com'),
    (b'<"a"@b"@example.com>', False, '"a"@b"@example.com'),
    (b'<"a\tb"@example.com>', False, None),
    (b"<a@[192.0.2.1]>", False, "a@[192.0.2.1]"),
    (b"<a@[IPv6:2001:db8::1]>", False, "a@[IPv6:2001:db8::1]"),
    (b"<a@[::1]>", False, None),
    (b"<a@[]>", False, None),
    (b"<a@[1[2]>", False, None),
    (b"<a@b@example.com>", False, None),
    ("<j\u00f6@b\u00fccher.example>".encode(), False, None),
    ("<j\u00f6@b\u00fccher.example>".encode(), True, "j\u00f6@b\u00fccher.example"),
    (b"<\xff@example.com>", True, None),          # not UTF-8
    (b"<a@example.com\x00>", False, None),
    (b"<a@exa\nmple.com>", False, None),
    (b"<" + b"a" * 60 + b"@" + b"b" * 200 + b">", False, None),   # over 256 octets
]


@pytest.mark.parametrize("raw,utf8,want", KNOWN)
def test_known_paths(mod, raw, utf8, want):
    assert mod.parse_path(raw, utf8) == want


# Octets the grammar cares about, and some it refuses.
ALPHABET = b'aZ9-._@"[]:<> \t\x00\x7f\x80\xc3\xa9\xff!~'


@st.composite
def paths(draw):
    body = draw(st.lists(st.sampled_from(list(ALPHABET)), max_size=40))
    return b"<" + bytes(body) + b">" if draw(st.booleans()) else bytes(body)


@settings(max_examples=3000, deadline=None)
@given(paths(), st.booleans())
def test_compiled_agrees_with_the_patterns(raw, utf8):
    assert COMPILED.parse_path(raw, utf8) == PURE.parse_path(raw, utf8)


def test_compiled_agrees_on_mutated_addresses():
    """Valid addresses with one or two octets changed, inserted or dropped: near the
    grammar's edges, where generated octets seldom land."""
    rnd = random.Random(5321)
    seeds = [b"<s@example.com>", b'<"q@x"@example.com>', b"<a@[192.0.2.1]>",
             b"<@r.example:u.v@w.example>", "<\u00fc@\u00e9.example>".encode(),
             b"<a@" + b"b" * 63 + b".c>", b"<" + b"l" * 64 + b"@d.example>"]
    for _ in range(20000):
        raw = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 2)):
            i = rnd.randrange(len(raw) + 1)
            op = rnd.randrange(3)
            c = rnd.choice(ALPHABET)
            if op == 0 and i < len(raw):
                raw[i] = c
            elif op == 1:
                raw.insert(i, c)
            elif i < len(raw):
                del raw[i]
        raw = bytes(raw)
        for utf8 in (False, True):
            assert COMPILED.parse_path(raw, utf8) == PURE.parse_path(raw, utf8), (raw, utf8)
