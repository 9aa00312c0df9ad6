"""MIME primitives: the compiled module and its pure twin, case by case and by hypothesis.

Every case runs against both ``mta._ext.mime`` and ``mta._pure.mime``; the
property tests check that the two agree with each other on arbitrary bytes,
with dkimpy's canonicalisation on generated messages, and that the streaming
body canonicaliser gives the same bytes whether fed whole, one byte at a time
or split at random points.
"""
import hashlib
import os
import subprocess
import sys

import dkim
import dkim.canonicalization as dkim_canon
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta import mime, native

EXT = native.load("mime", pure=False)
PURE = native.load("mime", pure=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = [pytest.param(EXT, id="compiled"), pytest.param(PURE, id="pure")]

PROPS = settings(max_examples=400, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

MSG = (b"From: \"Doe, J\" <j@Example.COM>\r\n"
       b"Subject:  hello\r\n  world \r\n"
       b"X-Empty:\r\n"
       b"to: a@b.example\r\n"
       b"To: c@d.example\r\n"
       b"\r\n"
       b"body  line \r\n\r\n\r\n")


@pytest.fixture(params=IMPLS)
def m(request):
    return request.param


# -- splitting and fields ----------------------------------------------------

@pytest.mark.parametrize("buf, expected", [
    (MSG, (MSG.index(b"\r\n\r\n") + 2, MSG.index(b"\r\n\r\n") + 4)),
    (b"A: 1\n\nbody\n", (5, 6)),
    (b"A: 1\r\nB: 2\r\n", (12, 12)),          # all header, no empty line
    (b"A: 1\r\nB: 2", (10, 10)),              # ... and no final line end
    (b"\r\nbody", (0, 2)),                    # no header at all
    (b"", (0, 0)),
    (b"A: 1\r\n \r\n\r\nb", (9, 11)),         # a WSP-only line is a continuation
    (b"A: 1\r\n\r\r\n", (9, 9)),              # CR CR LF is not an empty line
])
def test_split_message(m, buf, expected):
    assert m.split_message(buf) == expected


def test_parse_headers(m):
    fields = m.parse_headers(MSG)
    assert [f[0] for f in fields] == [b"From", b"Subject", b"X-Empty", b"to", b"To"]
    for _name, raw, start, end in fields:
        assert MSG[start:end] == raw
    assert fields[1][1] == b"Subject:  hello\r\n  world \r\n"
    assert fields[-1][3] == MSG.index(b"\r\n\r\n") + 2
    assert list(m.iter_headers(MSG)) == fields


def test_parse_headers_odd_lines(m):
    buf = b"From x@y Mon Jan  1\r\nName : v\r\n\tmore\r\nNoColonHere\r\nA:\r\n"
    fields = m.parse_headers(buf)
    assert [(f[0], f[1]) for f in fields] == [
        (b"", b"From x@y Mon Jan  1\r\n"),  # an mbox line has no colon: no name
        (b"Name", b"Name : v\r\n\tmore\r\n"),
        (b"", b"NoColonHere\r\n"),
        (b"A", b"A:\r\n"),
    ]
    assert m.parse_headers(b"A: 1\nB: 2\n continued\n\nbody") == [
        (b"A", b"A: 1\n", 0, 5), (b"B", b"B: 2\n continued\n", 5, 21)]
    assert m.parse_headers(b"") == []
    assert m.parse_headers(bytearray(b"A: 1\r\n\r\n")) == [(b"A", b"A: 1\r\n", 0, 6)]
    assert m.parse_headers(b"A: 1\r\nB: 2\r\n", 6) == [(b"A", b"A: 1\r\n", 0, 6)]


def test_find_header(m):
    assert m.find_header(MSG, b"subject") == b"hello  world"
    assert m.find_header(MSG, "SUBJECT") == b"hello  world"
    assert m.find_header(MSG, "to") == b"a@b.example"
    assert m.find_headers(MSG, b"TO") == [b"a@b.example", b"c@d.example"]
    assert m.find_header(MSG, b"x-empty") == b""
    assert m.find_header(MSG, b"x-missing") is None
    assert m.find_headers(MSG, b"x-missing") == []
    assert m.find_header(MSG, b"body  line") is None  # the body is not searched
    assert m.find_header(memoryview(MSG), b"from") == b'"Doe, J" <j@Example.COM>'


def test_find_headers_counts_the_hops(m):
    # the acceptor's hop count (smtp.max_hops) is len(find_headers(.., b"Received"))
    assert len(m.find_headers(MSG, b"x-missing")) == 0
    hops = b"Received: a\r\n\tfolded\r\nRECEIVED: b\r\nreceived:c\r\nX: y\r\n\r\n" \
        b"Received: in the body\r\n"
    assert len(m.find_headers(hops, b"Received")) == 3
    assert len(m.find_headers(memoryview(hops), b"received")) == 3
    assert m.find_headers(b"", b"Received") == []


def test_find_first(m):
    names = (b"Message-ID", b"from", "SUBJECT", b"to", b"x-empty")
    assert m.find_first(MSG, names) == [None, b'"Doe, J" <j@Example.COM>', b"hello  world",
                                        b"a@b.example", b""]
    assert m.find_first(MSG, ()) == []
    assert m.find_first(MSG, (b"to", b"to")) == [b"a@b.example", b"a@b.example"]
    assert m.find_first(b"", (b"from",)) == [None]
    # the body is not searched; a line without a colon names no field
    assert m.find_first(b"NoColon\r\n\r\nFrom: x@y\r\n", (b"NoColon", b"From")) == [None, None]
    assert m.find_first(memoryview(MSG), (b"to",)) == [b"a@b.example"]


ACCEPTOR_NAMES = (b"Message-ID", b"From", b"Subject", b"Date")   # mta.acceptor.main


@pytest.mark.parametrize("msg, want", [
    (b"DATE :  Mon, 1 Jan 2026 \r\n\t10:00 +0000\r\nmessage-id: <m>\r\n\r\n",
     [b"<m>", None, None, b"Mon, 1 Jan 2026 \t10:00 +0000"]),
    (b"Resent-Date: x\r\nX-Date: y\r\nDates: z\r\n\r\nDate: body\r\n", [None] * 4),
    (b"Date:\r\nDate: second\r\nFrom: f\r\n", [None, b"f", None, b""]),
    (b"Subject: s\r\nDate\r\n: no name\r\nDate: d\r\n\r\n", [None, None, b"s", b"d"]),
    (b"Subject: s\nDate: lf\n\nb\n", [None, None, b"s", b"lf"]),
    (b"", [None] * 4),
])
def test_find_first_notices_date_in_the_acceptors_pass(m, msg, want):
    """smtp.add_missing_headers looks for Date in the pass that finds the events' fields:
    both implementations give find_header's answer for each name."""
    assert m.find_first(msg, ACCEPTOR_NAMES) == want
    assert want == [PURE.find_header(msg, n) for n in ACCEPTOR_NAMES]
    assert EXT.find_first(msg, ACCEPTOR_NAMES) == PURE.find_first(msg, ACCEPTOR_NAMES)


def test_field_value_and_unfold(m):
    assert m.field_value(b"Subject: a\r\n\tb \r\n") == b"a\tb"
    assert m.field_value(b"X:\r\n") == b""
    assert m.unfold(b"a\r\n b\n c") == b"a b c"
    assert m.unfold(b"a\rb") == b"a\rb"  # a bare CR is not a line break


def test_insert_header(m):
    out = m.insert_header(MSG, b"Received: by mta; now")
    assert out == b"Received: by mta; now\r\n" + MSG
    out = m.insert_header(MSG, b"X-A: 1\r\n", 2)
    assert out == MSG.replace(b"X-Empty", b"X-A: 1\r\nX-Empty", 1)
    out = m.insert_header(MSG, b"X-Last: 1", -1)
    assert out == MSG.replace(b"\r\n\r\nbody", b"\r\nX-Last: 1\r\n\r\nbody", 1)
    assert m.insert_header(MSG, b"X-Last: 1", 99) == out
    # LF message: the message's own line end is used
    assert m.insert_header(b"A: 1\n\nb\n", b"B: 2", -1) == b"A: 1\nB: 2\n\nb\n"
    # all header, last field without a line end
    assert m.insert_header(b"A: 1", b"B: 2", -1) == b"A: 1\r\nB: 2\r\n"
    assert m.insert_header(b"", b"B: 2") == b"B: 2\r\n"


def test_remove_headers(m):
    out = m.remove_headers(MSG, "TO")
    assert out == MSG.replace(b"to: a@b.example\r\nTo: c@d.example\r\n", b"")
    assert m.remove_headers(MSG, b"subject") == MSG.replace(b"Subject:  hello\r\n  world \r\n", b"")
    assert m.remove_headers(MSG, b"nope") is MSG
    assert m.remove_headers(b"A: 1\r\nB: 2", b"b") == b"A: 1\r\n"


@pytest.mark.parametrize("value, domain", [
    (b"news@Example.COM", "example.com"),
    (b"\"Doe, John\" <j@example.org>", "example.org"),
    (b"John Doe <john@sub.example.net> (comment)", "sub.example.net"),
    (b"(comment <x@evil.example>) j@good.example", "good.example"),
    (b"\"a@quoted.example\" <real@domain.example>", "domain.example"),
    (b"\"quoted local\"@domain.example", "domain.example"),
    (b"=?utf-8?q?R=C3=A9daction?= <news@example.com>", "example.com"),
    (b"first@one.example, second@two.example", "one.example"),
    (b"Team: a@team.example, b@other.example;", "team.example"),
    (b"undisclosed-recipients:;", None),
    (b"nobody", None),
    (b"<@route.example:user@final.example>", "final.example"),
    (b"user@example.com (Comment)", "example.com"),
    (b"user@[192.0.2.1]", "[192.0.2.1]"),
    ("R\u00e9daction <news@b\u00fccher.example>".encode(), "b\u00fccher.example"),
])
def test_from_domain(m, value, domain):
    assert m.from_domain(b"Subject: x\r\nFrom: " + value + b"\r\n\r\nFrom: body@no.example\r\n") == domain


def test_from_domain_missing(m):
    assert m.from_domain(b"Subject: x\r\n\r\nFrom: a@b.example\r\n") is None
    assert m.from_domain(b"") is None
    assert m.from_domain(b"FROM:\r\n news@Folded.Example\r\n") == "folded.example"


@pytest.mark.parametrize("body, flags", [
    (b"plain\r\ntext\r\n", 0),
    (b"caf\xc3\xa9\r\n", "FLAG_8BIT"),
    (b"x" * 998 + b"\r\n", 0),
    (b"x" * 999 + b"\r\n", "FLAG_LONG_LINE"),
    (b"ok\r\n" + b"x" * 999, "FLAG_LONG_LINE"),  # the last line counts too
    (b"bare\nlf\r\n", "FLAG_BARE_LF"),
    (b"bare\rcr\r\n", "FLAG_BARE_CR"),
    (b"nul\x00\r\n", "FLAG_NUL"),
    (b"\xff" + b"y" * 1000 + b"\n", "FLAG_8BIT|FLAG_LONG_LINE|FLAG_BARE_LF"),
])
def test_scan_body(m, body, flags):
    want = 0
    if flags:
        for name in flags.split("|"):
            want |= getattr(m, name)
    assert m.scan_body(body) == want
    assert m.scan_body(b"H: v\r\n\r\n" + body, 8) == want


def test_scan_body_max_line(m):
    assert m.scan_body(b"12345\r\n", 0, 4) == m.FLAG_LONG_LINE
    assert m.scan_body(b"1234\r\n", 0, 4) == 0


# -- canonicalisation --------------------------------------------------------

def test_canon_rfc6376_example(m):
    # RFC 6376 section 3.4.6
    headers = b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
    body = b" C \r\nD \t E\r\n\r\n\r\n"
    fields = m.parse_headers(headers + b"\r\n")
    assert b"".join(m.canon_header(f[1], True) for f in fields) == b"a:X\r\nb:Y Z\r\n"
    assert b"".join(m.canon_header(f[1], False) for f in fields) == headers
    assert m.canon_body(body, True) == b" C\r\nD E\r\n"
    assert m.canon_body(body, False) == b" C \r\nD \t E\r\n"


@pytest.mark.parametrize("body, simple, relaxed", [
    (b"", b"\r\n", b""),
    (b"\r\n", b"\r\n", b""),
    (b"\r\n\r\n\r\n", b"\r\n", b""),
    (b"  \r\n\t\r\n", b"  \r\n\t\r\n", b""),
    (b"abc", b"abc\r\n", b"abc\r\n"),
    (b"abc  ", b"abc  \r\n", b"abc\r\n"),  # treated as if CRLF followed (SMTP adds it)
    (b"a\nb\n\n", b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\rb\r\n", b"a\rb\r\n", b"a\rb\r\n"),
    (b"a\r", b"a\r\r\n", b"a\r\r\n"),
    (b"\r\n\r\nx\r\n", b"\r\n\r\nx\r\n", b"\r\n\r\nx\r\n"),
    (b"x \t y\t\r\n", b"x \t y\t\r\n", b"x y\r\n"),
])
def test_canon_body_cases(m, body, simple, relaxed):
    assert m.canon_body(body, False) == simple
    assert m.canon_body(body, True) == relaxed


def test_canon_header_cases(m):
    assert m.canon_header(b"Subject: a\r\n", False) == b"Subject: a\r\n"
    assert m.canon_header(b"Subject: a\n b\n", False) == b"Subject: a\r\n b\r\n"
    assert m.canon_header(b"Subject: a", False) == b"Subject: a\r\n"
    assert m.canon_header(b"SUBJECT \t: \t a \r\n  b\t\r\n", True) == b"subject:a b\r\n"
    assert m.canon_header(b"X-Empty:\r\n", True) == b"x-empty:\r\n"
    assert m.canon_header(b"X:  \r\n \r\n", True) == b"x:\r\n"
    assert m.canon_header(bytearray(b"A: b\r\n"), True) == b"a:b\r\n"


def test_canon_headers_selection(m):
    buf = b"A: 1\r\nB: x\r\nA: 2\r\nC: 3\r\n\r\n"
    fields = m.parse_headers(buf)
    # bottom-up: the first "a" takes the last A field; an extra "a" adds nothing
    assert m.canon_headers(fields, [b"a", b"c", b"a", b"a", b"missing"], True) == b"a:2\r\nc:3\r\na:1\r\n"
    assert m.canon_headers(fields, [b"B"], False) == b"B: x\r\n"


def test_canon_headers_many_fields_of_one_name(m):
    """Each h= entry takes the lowest field of its name not taken yet (in any case of the
    name); linear in the fields, however many share a name (the compiled one searched
    from the bottom each time: quadratic)."""
    buf = b"To: 1\r\nFrom: f\r\nto: 2\r\nTO: 3\r\nSubject: s\r\n\r\n"
    fields = m.parse_headers(buf)
    assert m.canon_headers(fields, [b"to", b"from", b"To", b"subject", b"to", b"to"], True) == \
        b"to:3\r\nfrom:f\r\nto:2\r\nsubject:s\r\nto:1\r\n"
    n = 200_000
    fields = m.parse_headers(b"To: x\r\n" * n + b"\r\n")
    assert m.canon_headers(fields, [b"to"] * (n + 1), True) == b"to:x\r\n" * n


def test_select_names(m):
    fields = m.parse_headers(b"From: a\r\nX-Skip: 1\r\nSUBJECT: s\r\nnocolon\r\nsubject: t\r\n\r\n")
    assert m.select_names(fields, frozenset({b"from", b"subject"})) == [b"from", b"subject", b"subject"]
    assert m.select_names(fields, set()) == []


def test_body_canonicalizer_sink_and_length(m):
    h = hashlib.sha256()
    c = m.BodyCanonicalizer(True, h.update)
    c.update(b"a  b \r\n")
    c.update(memoryview(b"\r\n\r\n"))
    c.update(bytearray(b"c\r\n\r\n"))
    assert c.finish() == b""
    want = b"a b\r\n\r\n\r\nc\r\n"
    assert h.digest() == hashlib.sha256(want).digest()
    assert c.length == len(want)
    c = m.BodyCanonicalizer(False)
    assert c.finish() == b"\r\n"
    assert c.length == 2


def test_body_canonicalizer_chunks(m):
    body = b"x  \r\n\r\n \t y\r\r\n\r\nlast \t"
    for relaxed in (False, True):
        want = m.canon_body(body, relaxed)
        c = m.BodyCanonicalizer(relaxed)
        for i in range(len(body)):
            c.update(body[i:i + 1])
        assert c.finish() == want
        for cut in range(len(body) + 1):
            c = m.BodyCanonicalizer(relaxed)
            c.update(body[:cut])
            c.update(b"")
            c.update(body[cut:])
            assert c.finish() == want, (relaxed, cut)


@pytest.mark.parametrize("value, address", [
    (b"news@example.org", "news@example.org"),
    (b"News Desk <News@Example.ORG>", "News@Example.ORG"),       # as written
    (b'"Doe, J" <j@example.com>', "j@example.com"),
    (b"(the desk) desk@example.com (Desk)", "desk@example.com"),
    (b"=?utf-8?q?Caf=C3=A9?= <cafe@example.com>", "cafe@example.com"),
    (b"Team: a@x.example, b@y.example;", "a@x.example"),
    (b"undisclosed-recipients:;", ""),
    (b"no address here", ""),
    (b"", ""),
    (b"\xc3\xa9t\xc3\xa9 <\xc3\xa9@example.com>", "\xe9@example.com"),   # SMTPUTF8
])
def test_first_address(value, address):
    assert mime.first_address(value) == address


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value, address", [
    (b"news@example.org", "news@example.org"),
    (b"News Desk <News@Example.ORG> \t", "News@Example.ORG"),
    (b"<s@example.com>", "s@example.com"),
    (b"a\r\nb <c@d>", "c@d"),                 # a display name may hold anything but " < (
    (b"\xff <\xfe@example.com>", "\ufffd@example.com"),
    (b'"Doe, J" <j@example.com>', None),       # the other forms: None, for email.utils
    (b"(c) <a@b>", None),
    (b"N <a@b> x", None),
    (b"N <a@b>\r\n", None),
    (b"N <a@@b>", None),
    (b"a@b@c", None),
    (b"a @b", None),
    (b"@b", None),
    (b"a@", None),
    (b"N <a@b", None),
    (b"N <<a@b>", None),
    (b"", None),
    (bytearray(b"a@b"), "a@b"),
    (memoryview(b"N <a@b>"), "a@b"),
])
def test_simple_address(impl, value, address):
    assert impl.simple_address(value) == address


ADDRESS_PARTS = st.lists(st.sampled_from([b"a", b"Z", b"@", b"<", b">", b" ", b"\t", b"\r\n",
                                          b"\x0b", b"\x0c", b"\"", b"(", b")", b"[", b"]",
                                          b",", b";", b":", b"\xc3\xa9", b"\xff", b"."]),
                         max_size=30).map(b"".join)


@PROPS
@given(st.one_of(ADDRESS_PARTS, st.binary(max_size=40)))
def test_simple_address_twins_agree(value):
    assert EXT.simple_address(value) == PURE.simple_address(value)


@pytest.mark.parametrize("value, text", [
    (b"Summer deals", "Summer deals"),
    (b"=?utf-8?q?Caf=C3=A9?= au lait", "Caf\xe9 au lait"),
    (b"=?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=", "If you can read this yo"),
    (b"\xc3\xa9t\xc3\xa9 sale", "\xe9t\xe9 sale"),                 # RFC 6532 UTF-8
    (b"\xff broken", "\ufffd broken"),
    (b"=?x-no-such-charset?q?abc?=", "=?x-no-such-charset?q?abc?="),  # kept, never raised
])
def test_header_text(value, text):
    assert mime.header_text(value) == text


def test_header_block_helpers():
    from mta import mime
    assert mime.header_block(MSG) == MSG[:MSG.index(b"\r\n\r\n") + 2]
    assert bytes(mime.body_of(MSG)) == b"body  line \r\n\r\n\r\n"
    assert mime.impl in (EXT, PURE)


# -- properties ---------------------------------------------------------------

ANY_BYTES = st.binary(max_size=600)
# bytes that make interesting messages: line ends, WSP, colons, 8-bit
MESSY = st.lists(st.sampled_from([b"a", b"Z", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ",
                                  b"\r\n\r\n", b"\xc3\xa9", b"\x00", b"@", b"<", b">", b"\"",
                                  b"(", b")", b",", b"From: ", b"from:", b"x" * 40]),
                 max_size=80).map(b"".join)


@PROPS
@given(st.one_of(ANY_BYTES, MESSY))
def test_twins_agree_on_anything(buf):
    assert EXT.split_message(buf) == PURE.split_message(buf)
    fields = EXT.parse_headers(buf)
    assert fields == PURE.parse_headers(buf)
    assert EXT.from_domain(buf) == PURE.from_domain(buf)
    assert EXT.scan_body(buf) == PURE.scan_body(buf)
    assert EXT.scan_body(buf, 3, 7) == PURE.scan_body(buf, 3, 7)
    assert EXT.find_headers(buf, b"from") == PURE.find_headers(buf, b"from")
    names = (b"from", b"a", b"Z", b"x" * 40)
    firsts = EXT.find_first(buf, names)
    assert firsts == PURE.find_first(buf, names)
    assert firsts == [EXT.find_header(buf, n) for n in names]
    assert EXT.remove_headers(buf, b"from") == PURE.remove_headers(buf, b"from")
    assert EXT.insert_header(buf, b"X: y", 1) == PURE.insert_header(buf, b"X: y", 1)
    assert EXT.unfold(buf) == PURE.unfold(buf)
    wanted = {b"from", b"a", b"z"}
    assert EXT.select_names(fields, wanted) == PURE.select_names(fields, wanted)
    assert EXT.field_value(buf) == PURE.field_value(buf)
    for relaxed in (False, True):
        assert EXT.canon_header(buf, relaxed) == PURE.canon_header(buf, relaxed)
        assert EXT.canon_body(buf, relaxed) == PURE.canon_body(buf, relaxed)
        names = [f[0].lower() for f in fields] + [b"from", b"from"]
        assert EXT.canon_headers(fields, names, relaxed) == PURE.canon_headers(fields, names, relaxed)


# text without CR or NUL (the compiled scan_body's fast path: lines by memchr, 8-bit
# octets eight at a time): lines of every length around the limits, 8-bit octets
# anywhere, any start
LF_TEXT = st.lists(st.sampled_from([b"a", b"\n", b"\n\n", b" ", b"\xc3\xa9", b"\x80", b"\x7f",
                                    b"\x01", b"x" * 7, b"y" * 9, b"z" * 40]),
                   max_size=60).map(b"".join)


@PROPS
@given(LF_TEXT, st.integers(-2, 70), st.integers(0, 50))
def test_twins_agree_on_body_scans_of_lf_text(buf, start, max_line):
    assert EXT.scan_body(buf, start, max_line) == PURE.scan_body(buf, start, max_line)
    assert EXT.scan_body(bytearray(buf)) == PURE.scan_body(buf)


def _fed(m, body, relaxed, cuts):
    out = []
    c = m.BodyCanonicalizer(relaxed, out.append)
    pos = 0
    for cut in sorted(cuts):
        c.update(body[pos:cut])
        pos = cut
    c.update(body[pos:])
    c.finish()
    return b"".join(out)


@PROPS
@given(st.one_of(ANY_BYTES, MESSY).flatmap(
    lambda b: st.tuples(st.just(b), st.lists(st.integers(0, len(b)), max_size=8))))
def test_body_pieces_agree(case):
    body, cuts = case
    for relaxed in (False, True):
        whole = EXT.canon_body(body, relaxed)
        assert PURE.canon_body(body, relaxed) == whole
        assert _fed(EXT, body, relaxed, cuts) == whole
        assert _fed(PURE, body, relaxed, cuts) == whole
        assert _fed(EXT, body, relaxed, range(len(body))) == whole  # one byte at a time


def _dkimpy_body(body, relaxed):
    # dkimpy reads bare LF as a line end, like we do; a body that does not end
    # in a line end is given the CRLF that SMTP transmission adds, which is
    # what we canonicalise (dkimpy keeps WSP before a missing final CRLF).
    if body and not body.endswith(b"\n"):
        body += b"\r\n"
    _h, norm = dkim.rfc822_parse(b"X: y\r\n\r\n" + body)
    algo = dkim_canon.Relaxed if relaxed else dkim_canon.Simple
    return algo.canonicalize_body(norm)


BODY_TEXT = st.lists(st.sampled_from([b"a", b"b c", b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r\n\r\n",
                                      b" \r\n", b"\t\r\n", b"\xc3\xa9", b".", b"\r"]),
                     max_size=60).map(b"".join)


@PROPS
@given(BODY_TEXT, st.lists(st.integers(0, 200), max_size=5))
def test_body_matches_dkimpy(body, cuts):
    cuts = [c for c in cuts if c <= len(body)]
    for relaxed in (False, True):
        want = _dkimpy_body(body, relaxed)
        for m in (EXT, PURE):
            assert m.canon_body(body, relaxed) == want
            assert _fed(m, body, relaxed, cuts) == want


FIELD_NAME = st.sampled_from([b"From", b"to", b"SUBJECT", b"X-Test", b"Content-Type", b"a"])
VALUE_PART = st.sampled_from([b"x", b"Hello", b" ", b"  ", b"\t", b"\r\n ", b"\r\n\t", b"\n ",
                              b":", b";", b"\xc3\xa9", b"=?utf-8?q?a?="])
FIELD = st.tuples(FIELD_NAME, st.lists(VALUE_PART, max_size=12).map(b"".join)).filter(
    # a value that ends with a fold would swallow the next line into it
    lambda f: not f[1].endswith((b"\r\n ", b"\r\n\t", b"\n ")) or f[1].rstrip(b" \t\r\n") != b"")


@PROPS
@given(st.lists(FIELD, min_size=1, max_size=8), BODY_TEXT)
def test_headers_match_dkimpy(fields, body):
    msg = b"".join(name + b":" + value + b"\r\n" for name, value in fields) + b"\r\n" + body
    dk_headers, _ = dkim.rfc822_parse(msg)
    for m in (EXT, PURE):
        ours = m.parse_headers(msg)
        assert [f[0] for f in ours] == [h[0] for h in dk_headers]
        for relaxed in (False, True):
            algo = dkim_canon.Relaxed if relaxed else dkim_canon.Simple
            want = [n + b":" + v for n, v in algo.canonicalize_headers(dk_headers)]
            got = [m.canon_header(f[1], relaxed) for f in ours]
            assert got == want


# -- divergences the fuzzer found (fuzz/mime_headers.py; inputs in tests/fuzz/regressions) --


def test_parse_headers_end_past_the_buffer_is_the_whole_buffer():
    buf = b"A: b\nTo: c\n\nbody"
    for mod in (EXT, PURE):
        fields = mod.parse_headers(buf, 95)
        assert fields[-1] == (b"", b"body", 12, 16)
        assert all(end <= len(buf) for _, _, _, end in fields)


def test_scan_body_negative_start_is_the_start():
    buf = b"y" * 20 + b"\xd2" + b"y" * 3000 + b"\r\n"
    for mod in (EXT, PURE):
        assert mod.scan_body(buf, -1, 2) == mod.scan_body(buf, 0, 2) == \
            mod.FLAG_8BIT | mod.FLAG_LONG_LINE


def test_a_line_without_colon_is_not_a_field_with_an_empty_name():
    buf = b"\x00From@b, c@d;\r\n: empty name\r\n\r\nbody"
    for mod in (EXT, PURE):
        assert mod.find_header(buf, b"") == b"empty name"
        assert mod.find_headers(buf, b"") == [b"empty name"]
        assert mod.remove_headers(buf, b"") == b"\x00From@b, c@d;\r\n\r\nbody"
        assert mod.find_header(b"no colon here\r\n\r\n", b"") is None


def test_body_canonicalisation_of_many_bare_lfs_stays_in_its_buffer():
    """A found-by-fuzzing heap overflow (fuzz/mime_canon.py, atheris; the process died with
    "malloc(): invalid size"): the compiled canonicaliser reserved one output octet per input
    octet, but a bare LF becomes CRLF, two.  Run in a child process, since the overflow
    corrupts the heap rather than raising; the child also allocates afterwards, where the
    corruption shows."""
    code = (
        "import gc, sys\n"
        "from mta import native\n"
        "m = native.load('mime', pure=False)\n"
        "for n in (3000, 100_000, 1_000_000):\n"
        "    body = b'\\n' * n + b'x'\n"
        "    want = b'\\r\\n' * n + b'x\\r\\n'\n"
        "    for relaxed in (False, True):\n"
        "        assert m.canon_body(body, relaxed) == want\n"
        "        c = m.BodyCanonicalizer(relaxed)\n"
        "        c.update(b'a\\n\\n\\n')\n"
        "        c.update(b'\\n' * n)\n"
        "        c.update(b'\\r')\n"
        "        c.update(b'\\n\\nb')\n"
        "        assert c.finish() == b'a' + b'\\r\\n' * (n + 5) + b'b\\r\\n'\n"
        "    junk = [bytes(64) for _ in range(200_000)]\n"
        "    gc.collect()\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), (r.returncode, r.stderr[-2000:])
