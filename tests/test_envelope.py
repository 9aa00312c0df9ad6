"""Tests of the delivery client's envelope writer, run against the compiled module and
its pure twin, and against the client's general path (SmtpConnection.prepare)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta import native

PURE = native.load("envelope", pure=True)
COMPILED = native.load("envelope", pure=False)
IMPLS = {"pure": PURE, "compiled": COMPILED}


@pytest.fixture(params=sorted(IMPLS))
def mod(request):
    return IMPLS[request.param]


class Sub(str):
    def __str__(self):
        return "other@x.example"


def test_plain_lines(mod):
    assert mod.plain("s@x.example", ["a@b.example", "c@d.example"], " SIZE=10") == (
        b"MAIL FROM:<s@x.example> SIZE=10\r\n",
        [b"RCPT TO:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n"])
    assert mod.plain("", ["a@b"], "") == (b"MAIL FROM:<>\r\n", [b"RCPT TO:<a@b>\r\n"])


@pytest.mark.parametrize("sender, recipients, params", [
    ("s@x", [], ""),                                    # no recipient
    ("s@x", [""], ""),                                  # an empty recipient
    ("s@x", ("a@b",), ""),                              # not a list
    ("\u00fc@x", ["a@b"], ""), ("s@x", ["a@\u00e9x"], ""), ("s@x", ["a@b"], " \u00fc"),
    ("s\udcff@x", ["a@b"], ""),
    ("s<@x", ["a@b"], ""), ("s@x", ["a>@b"], ""), ("s\r\n@x", ["a@b"], ""),
    ("s@x", ["a\x00@b"], ""), ("s@x", ["a\x7f@b"], ""), ("s@x", ["a\t@b"], ""),
    (Sub("s@x"), ["a@b"], ""), ("s@x", [Sub("a@b")], ""), ("s@x", ["a@b"], Sub("")),
    (b"s@x", ["a@b"], ""), ("s@x", [None], ""), (None, ["a@b"], ""), ("s@x", ["a@b"], None),
])
def test_anything_else_goes_the_general_way(mod, sender, recipients, params):
    assert mod.plain(sender, recipients, params) is None


_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x17F), max_size=12)


@settings(max_examples=500, deadline=None)
@given(_text, st.lists(_text, max_size=4), st.sampled_from(["", " SIZE=123", " SIZE=9 BODY=8BITMIME"]))
def test_twins_agree(sender, recipients, params):
    assert PURE.plain(sender, recipients, params) == COMPILED.plain(sender, recipients, params)


@settings(max_examples=300, deadline=None)
@given(_text, st.lists(_text, max_size=4), st.booleans(), st.booleans())
def test_prepare_writes_what_the_general_way_writes(sender, recipients, eight_bit, dsn):
    """prepare's transaction (the plain one's lines from the kernel) is what the general
    way makes of the same input when the kernel is bypassed."""
    from mta.delivery import client as smtpc

    def prepared(kernel):
        conn = smtpc.SmtpConnection.__new__(smtpc.SmtpConnection)
        conn.extensions = {"PIPELINING": "", "SIZE": "1000", "8BITMIME": ""}
        if dsn:
            conn.extensions["DSN"] = ""
        old = smtpc._plain_envelope
        smtpc._plain_envelope = kernel
        try:
            t = conn.prepare(sender, list(recipients), b"Subject: x\r\n\r\nx\r\n",
                             eight_bit=eight_bit)
        except smtpc.SmtpError as exc:
            return type(exc)
        finally:
            smtpc._plain_envelope = old
        r = t.result
        return (t.mail, t.rcpts, t.send_idx, t.replies, t.dsn,
                None if r is None else (r.rcpt_replies, r.data_reply))

    general = prepared(lambda *a: None)
    assert prepared(COMPILED.plain) == general
    assert prepared(PURE.plain) == general


DATA_CASES = [b"", b".", b"..", b"\n", b"\r\n", b".\r\n", b"\r\n.", b"\n.", b"\r\n.\r\n",
              b"a\r\n.b\r\n..c\r\n", b"a\n.b", b"x" * 3000 + b"\r\n.", b"\n" * 10, b"\xff.\n.",
              b"Subject: x\r\n\r\n" + b"line\r\n" * 400]


def test_data_is_dot_stuff_then_after(mod):
    from mta.delivery.client import dot_stuff
    for message in DATA_CASES:
        for after in (b"", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"):
            assert mod.data(message, after) == dot_stuff(message) + after, message
    assert mod.data(b".x\r\n", b"") == b"..x\r\n.\r\n"
    assert mod.data(b"a\r\n.\r\n", b"") == b"a\r\n..\r\n.\r\n"
    assert mod.data(b"a", b"N") == b"a\r\n.\r\nN"


def test_data_of_another_type_goes_the_general_way(mod):
    for message, after in ((bytearray(b"a\r\n"), b""), (memoryview(b"a\r\n"), b""),
                           (b"a\r\n", bytearray()), ("a\r\n", b""), (None, b"")):
        assert mod.data(message, after) is None


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\n", b"\r", b"a", b"\r\n", b"\n.", b"\r\n.", b"\xff"]),
                max_size=30).map(b"".join), st.binary(max_size=8))
def test_data_twins_agree_with_dot_stuff(message, after):
    from mta.delivery.client import dot_stuff
    want = dot_stuff(message) + after
    assert PURE.data(message, after) == want
    assert COMPILED.data(message, after) == want
