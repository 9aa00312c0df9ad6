"""Header fields' common cases: the compiled module and its pure twin, case by case and by
hypothesis, against mta.api.build's general way (which they must answer as)."""

import binascii
import quopri
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta import native
from mta.api import build

PURE = native.load("fields", pure=True)
COMPILED = native.load("fields", pure=False)
IMPLS = {"pure": PURE, "compiled": COMPILED}
PROPS = settings(max_examples=500, deadline=None)
# the address check's regular expression as it was (the specification of plain_email)
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
PLAIN = re.compile(rf"{ATOM}(?:\.{ATOM})*@{LABEL}(?:\.{LABEL})*\Z")


@pytest.fixture(params=sorted(IMPLS))
def mod(request):
    return IMPLS[request.param]


def spec(addr):
    if PLAIN.match(addr) and len(addr) <= 320 and addr.index("@") <= 64:
        return 1 if "n--" not in addr and "N--" not in addr else 2
    return 0


class Sub(str):
    pass


@pytest.mark.parametrize("addr, want", [
    ("a@b.c", 1), ("a.b+c@x-y.example", 1), ("!#$%&'*+/=?^_`{|}~-@a.b", 1),
    ("x@xn--bcher-kva.example", 2), ("xN--@b.c", 2), ("a-n-@b.c", 1),
    ("", 0), ("a", 0), ("@b.c", 0), ("a@", 0), ("a.@b.c", 0), (".a@b.c", 0), ("a..b@c.d", 0),
    ("a@b..c", 0), ("a@.b", 0), ("a@b.", 0), ("a@-b.c", 0), ("a@b-.c", 0), ("a@b_c.d", 0),
    ("a b@c.d", 0), ("a@b@c.d", 0), ("ü@b.c", 0), ("a@bü.c", 0), ("a@b.c\n", 0),
    ("l" * 64 + "@b.c", 1), ("l" * 65 + "@b.c", 0), ("a@" + "d" * 63 + ".c", 1),
    ("a@" + "d" * 64 + ".c", 0), ("a@" + "d." * 158 + "c", 1), ("a@" + "d." * 159 + "c", 0),
])
def test_plain_email(mod, addr, want):
    assert spec(addr) == want
    assert mod.plain_email(addr) == want
    assert mod.plain_email(Sub(addr)) == want


def test_plain_email_refuses_what_is_not_text(mod):
    with pytest.raises(TypeError):
        mod.plain_email(None)
    with pytest.raises(TypeError):
        mod.plain_email(b"a@b.c")


@PROPS
@given(st.one_of(st.text(alphabet="aZ09.-@_+!'\" nN\tü", max_size=24),
                 st.from_regex(PLAIN, fullmatch=True)))
def test_plain_email_is_the_regular_expression(addr):
    want = spec(addr)
    assert PURE.plain_email(addr) == want
    assert COMPILED.plain_email(addr) == want


def general_mailbox(name, email):
    return build._fold("To", build.mailbox(name, email))


@pytest.mark.parametrize("name, email, common", [
    (None, "r@e.net", True), ("", "r@e.net", True), ("A Reader", "r@e.net", True),
    ("A  Reader", "r@e.net", True), ("O'Brien!", "r@e.net", True), ("A" * 60, "r@e.net", True),
    ("A" * 70, "r@e.net", False), ("A" + " " * 64 + "B", "r@e", False),
    ("A" + " " * 63 + "B", "r@e", True), (" A", "r@e.net", False), ("A ", "r@e.net", False),
    ("Müller", "r@e.net", False), ("A, B", "r@e.net", False), ('A "B"', "r@e.net", False),
    ("A.B", "r@e.net", False), ("A\tB", "r@e.net", False), ("A", "ü@e.net", False),
    ("A", "r@bücher.example", False), (None, "r@" + "e" * 80, False), (Sub("A"), "r@e.net", False),
    ("A", Sub("r@e.net"), False),
])
def test_mailbox_line(mod, name, email, common):
    got = mod.mailbox_line("To", name, email)
    assert (got is not None) == common
    if got is not None:
        assert got == general_mailbox(name, email)


@PROPS
@given(st.one_of(st.none(), st.text(alphabet="Ab 9.,\"ü<>()'!-~", max_size=40)),
       st.sampled_from(["r@e.net", "r@" + "e" * 50 + ".net", "ü@e.net", "a@b"]))
def test_mailbox_line_is_the_general_way(name, email):
    a, b = PURE.mailbox_line("To", name, email), COMPILED.mailbox_line("To", name, email)
    assert a == b
    if a is not None:
        assert a == general_mailbox(name, email)


@PROPS
@given(st.text(max_size=90), st.sampled_from(["Subject", "X-Long-Field-Name"]))
def test_short_line_is_unstructured(value, field):
    a, b = PURE.short_line(field, value), COMPILED.short_line(field, value)
    assert a == b
    if a is not None:
        assert a == build.unstructured(field, value)
    else:
        assert not value.isascii() or len(field) + 2 + len(value) > build.FOLD_AT
    assert PURE.short_line(field, Sub(value)) is None
    assert COMPILED.short_line(field, Sub(value)) is None


def test_message_id(mod):
    ids = [mod.message_id("mta.example", 0x1234) for _ in range(3)]
    parts = [re.fullmatch(r"<([0-9a-f]+)\.1234\.([0-9a-f]+)@mta\.example>", i) for i in ids]
    assert all(parts), ids
    counts = [int(p.group(2), 16) for p in parts]
    assert counts == [counts[0], counts[0] + 1, counts[0] + 2]
    times = [int(p.group(1), 16) for p in parts]
    assert times == sorted(times) and abs(times[0] / 1e9 - __import__("time").time()) < 60


def test_the_builder_writes_what_the_general_way_writes():
    """A message built with the common cases taken has the fields the general way writes."""
    from mta.api import transmissions
    tx = transmissions.decode(
        b'{"recipients": [{"address": {"email": "r@e.net", "name": "A Reader"}}],'
        b' "content": {"from": "s@x.y", "subject": "Hi {{address.name}}", "text": "t"}}')
    m = build.Builder(tx, "h.example").build(0, tx.recipients[0])
    assert general_mailbox("A Reader", "r@e.net") in m.message
    assert build.unstructured("Subject", "Hi A Reader") in m.message
    assert re.search(rb"\r\nMessage-ID: <[0-9a-f]+\.[0-9a-f]+\.[0-9a-f]+@h\.example>\r\n",
                     m.message)


@pytest.mark.parametrize("text, common", [
    ("Hello\nworld\n", True), ("", True), ("one line", True), ("\n\n", True),
    ("x" * 998 + "\n" + "y" * 998, True), ("x" * 999, False), ("x" * 999 + "\nshort", False),
    ("short\n" + "x" * 999 + "\n", False), ("a\r\nb", False), ("a\rb", False), ("a\0b", False),
    ("Grüße", False), ("\ud800", False), (Sub("a\nb"), True),
])
def test_text_part_7bit(mod, text, common):
    got = mod.text_part_7bit("plain", text)
    assert (got is not None) == common
    if common:
        assert got == build.text_part("plain", text)
        assert b"Content-Transfer-Encoding: 7bit\r\n" in got


@PROPS
@given(st.one_of(st.text(alphabet="ab \n\r\t\0ü", max_size=60),
                 st.lists(st.integers(990, 1005), max_size=3).map(
                     lambda ns: "\n".join("x" * n for n in ns))),
       st.sampled_from(["plain", "html", "x-amp-html"]))
def test_text_part_7bit_is_text_part(text, subtype):
    a, b = PURE.text_part_7bit(subtype, text), COMPILED.text_part_7bit(subtype, text)
    assert a == b
    if a is not None:
        assert a == build.text_part(subtype, text)
    elif text.isascii() and "\0" not in text and "\r" not in text:
        assert b"quoted-printable" in build.text_part(subtype, text)


def qp_spec(data: bytes) -> bytes:
    return binascii.b2a_qp(data, quotetabs=False, istext=True,
                           header=False).replace(b"\n", b"\r\n")


@pytest.mark.parametrize("data", [
    b"", b"plain ascii\n", b".", b".\n", b"a\n.\n", b".a", b"a.", b"\n.", b".\0", b"=",
    b"\0", b"\x7f", b"\xff", b"a \n", b"a\t\n", b"a ", b"a\t", b" ", b"x " * 50,
    b"x" * 75, b"x" * 76, b"x" * 77, b"x" * 76 + b"\n", b"x" * 77 + b"\n", b"x" * 150,
    b"x" * 74 + b"=", b"x" * 75 + b"=", b"x" * 75 + b" ", b"x" * 74 + b" \n",
    b"x" * 73 + b"\xc3\xa9", b"x" * 72 + b"\xc3\xa9", b"x" * 76 + b"\xe9", b"x" * 75 + b".\n",
    "Chère lectrice, cher lecteur\n".encode() * 20,
])
def test_qp_lf_writes_binascii_octets(mod, data):
    got = mod.qp_lf(data)
    assert got == qp_spec(data)
    assert quopri.decodestring(got.replace(b"\r\n", b"\n")) == data


def test_qp_lf_leaves_a_cr_to_binascii(mod):
    assert mod.qp_lf(b"a\rb") is None and mod.qp_lf(b"a\r\nb") is None


@PROPS
@given(st.lists(st.sampled_from([b"x", b" ", b"\t", b".", b"\n", b"=", b"\xc3\xa9", b"\0",
                                 b"\x7f", b"~", b"x" * 37, b" \n", b".\n"]), max_size=120)
       .map(b"".join) | st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"")))
def test_qp_lf_is_binascii(data):
    want = qp_spec(data)
    assert COMPILED.qp_lf(data) == want
    assert PURE.qp_lf(data) == want
