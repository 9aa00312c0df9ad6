"""Differential target: DKIM canonicalisation of the mime module, compiled vs pure.

The first byte chooses: canon_header of one raw field, select_names and
canon_headers over parse_headers' fields with an h= list from the input
(repeats and absent names: over-signing), canon_body, or BodyCanonicalizer fed
in pieces (with and without a sink).  Both twins must give the same bytes;
and the streaming canonicaliser must not depend on how the body is split:
it must give canon_body's result, and ``length`` must be its length.
"""
from __future__ import annotations

from fuzz.common import Divergence, Input, cut, outcome, same, twins

COMPILED, PURE = twins("mime")
MODES = ("canon_header", "canon_headers", "canon_body", "streaming")
NAMES = (b"from", b"to", b"subject", b"date", b"x", b"message-id", b"from", b"")

SEEDS = [
    b"\x00\x01Subject:  a \t b \r\n\tc  \r\n",
    b"\x01\x01\x05\x00\x01\x02\x00\x05From: a\r\nTo: b\r\nFrom: c\r\nSubject: \r\n s\r\n\r\n",
    b"\x02\x01 a  b \t\r\n\r\n\r\nc \r\n\r\n",
    b"\x03\x00\x03\x02\x00\x05\x00\x09\x00line \r\n\r\n\n x\r\r\n\r\n",
]


def one_input(data: bytes) -> None:
    inp = Input(data)
    mode = inp.pick(MODES)
    relaxed = inp.flag()
    if mode == "canon_header":
        raw = inp.rest()
        same(mode, outcome(COMPILED.canon_header, bytearray(raw), relaxed),
             outcome(PURE.canon_header, raw, relaxed))
    elif mode == "canon_headers":
        names = [inp.pick(NAMES) for _ in range(inp.byte() % 8)]
        buf = inp.rest()
        fc, fp = COMPILED.parse_headers(buf), PURE.parse_headers(buf)
        same("parse_headers", fc, fp)
        wanted = set(names)
        same("select_names", outcome(COMPILED.select_names, fc, wanted),
             outcome(PURE.select_names, fp, wanted))
        same(mode, outcome(COMPILED.canon_headers, fc, names, relaxed),
             outcome(PURE.canon_headers, fp, names, relaxed))
    elif mode == "canon_body":
        body = inp.rest()
        same(mode, outcome(COMPILED.canon_body, memoryview(body), relaxed),
             outcome(PURE.canon_body, body, relaxed))
    else:
        sink = inp.flag()
        cuts_raw = [inp.u16() for _ in range(inp.byte() % 9)]
        body = inp.rest()
        size = len(body)
        cuts = sorted({1 + c % (size - 1) for c in cuts_raw}) if size > 1 else []
        whole = PURE.canon_body(body, relaxed)
        for mod in (COMPILED, PURE):
            got = []
            bc = mod.BodyCanonicalizer(relaxed, got.append if sink else None)
            for piece in cut(body, cuts):
                bc.update(piece)
            tail = bc.finish()
            out = b"".join(got) + tail
            if sink and tail:
                raise Divergence(f"{mod.__name__}: finish() returned bytes with a sink")
            if out != whole or bc.length != len(whole):
                raise Divergence(f"{mod.__name__} BodyCanonicalizer split at {cuts}: "
                                 f"{out!r:.300} (length {bc.length}) != canon_body "
                                 f"{whole!r:.300}")
