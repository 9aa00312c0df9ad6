"""Differential target: header parsing of the mime module, compiled vs pure.

The first byte chooses the function (split_message, parse_headers with an
end, iter_headers, find_header(s) by a name from the input, field_value,
unfold, insert_header, remove_headers, from_domain, scan_body); both twins get
the same arguments (the compiled one sometimes as bytearray or memoryview)
and must give the same result or the same error class.
"""
from __future__ import annotations

from fuzz.common import Input, outcome, same, twins

COMPILED, PURE = twins("mime")
NAMES = (b"From", b"from", b"SUBJECT", b"Received", b"DKIM-Signature", b"x", b"", "From",
         "subject", "é", b"From ", b"Fr\xc3\xa9m")
BUFFER_TYPES = (bytes, bytearray, memoryview)
FUNCTIONS = ("split_message", "parse_headers", "iter_headers", "find_header",
             "find_headers", "field_value", "unfold", "insert_header", "remove_headers",
             "from_domain", "scan_body")

SEEDS = [
    b"\x00\x00From: A <a@Example.COM>\r\nSubject: x\r\n\tfolded\r\n\r\nbody\r\n",
    b"\x01\x00\x05From: a@b\nTo: c\n\nbody",
    b"\x03\x00\x00From: \"q\\\" <x@y>\" (c) <r@Dom.ain>\r\n\r\n",
    b"\x07\x00\x00\x02X: y\r\nA: b\r\n\r\nz",
    b"\x09\x00From: group: a@b, c@d;\r\n\r\n",
    b"\x0a\x00\x00\x05x\xe9\x00\n\r" + b"y" * 1000 + b"\r\n",
]


def one_input(data: bytes) -> None:
    inp = Input(data)
    fn = inp.pick(FUNCTIONS)
    kind = inp.pick(BUFFER_TYPES)
    c, p = getattr(COMPILED, fn), getattr(PURE, fn)
    if fn in ("split_message", "from_domain", "field_value", "unfold"):
        buf = inp.rest()
        same(fn, outcome(c, kind(buf)), outcome(p, buf))
    elif fn == "parse_headers":
        end = inp.byte() - 2
        buf = inp.rest()
        end = end if end < 200 else len(buf) + (end - 200) % 8 - 4
        same(fn, outcome(c, kind(buf), end), outcome(p, buf, end))
    elif fn == "iter_headers":
        buf = inp.rest()
        same(fn, outcome(lambda b: list(c(b)), kind(buf)), outcome(lambda b: list(p(b)), buf))
    elif fn in ("find_header", "find_headers", "remove_headers"):
        name = inp.pick(NAMES)
        if inp.flag():
            name = inp.take(inp.byte() % 12)
        buf = inp.rest()
        same(fn, outcome(c, kind(buf), name), outcome(p, buf, name))
    elif fn == "insert_header":
        index = inp.byte() % 8 - 2
        field = inp.take(inp.byte() % 40)
        buf = inp.rest()
        same(fn, outcome(c, kind(buf), field, index), outcome(p, buf, field, index))
    else:   # scan_body
        start = inp.byte() % 40 - 2
        max_line = inp.pick((0, 1, 2, 10, 78, 998, 1000))
        buf = inp.rest()
        same(fn, outcome(c, kind(buf), start, max_line), outcome(p, buf, start, max_line))
