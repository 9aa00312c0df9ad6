"""Differential target: the spool record codec, compiled vs pure.

Four modes, chosen by the first byte:

0. ``decode()`` of arbitrary bytes at an offset with a max_record: the same
   result or the same error class;
1. ``encode()``/``encode_header()`` of (rtype, meta, body) give the same bytes,
   ``decode()`` gives them back, and a record with one byte changed decodes the
   same way in both (never OK with other content);
2. ``Decoder`` over a stream of records (some good, then arbitrary bytes) fed in
   pieces: the same records, ``corrupt``, ``consumed`` and ``pending`` after
   every piece, and the records are the ones encoded;
3. ``decode()`` of a header built from the input's fields, with the CRC right or
   wrong, so the length and CRC checks are reached with any lengths.
"""
from __future__ import annotations

import struct
import zlib

from fuzz.common import Divergence, Input, cut, outcome, same, twins

COMPILED, PURE = twins("record")
MAX_RECORDS = (0, 1, 19, 20, 64, 1 << 16, 1 << 31, -1)
RTYPES = (0, 1, 7, 255, 256, -1)
BUFFER_TYPES = (bytes, bytearray, memoryview)

SEEDS = [
    b"\x00\x00\x06" + PURE.encode(3, b"meta", b"body"),
    b"\x01\x03\x10\x02\x04meta" + b"body bytes",
    b"\x02\x02\x03\x05\x00\x09\x00" + b"x" * 40,
    b"\x03\x01\x05\x00\x00\x00\x10\x00\x00\x00\x00" + b"z" * 30,
]


def _buffer(inp: Input, data: bytes):
    return inp.pick(BUFFER_TYPES)(data)


def one_input(data: bytes) -> None:
    inp = Input(data)
    mode = inp.byte() % 4
    if mode == 0:
        offset = inp.byte() % 48 - 2
        max_record = inp.pick(MAX_RECORDS)
        payload = inp.rest()
        buf_c = _buffer(inp, payload)
        same("decode", outcome(COMPILED.decode, buf_c, offset, max_record),
             outcome(PURE.decode, payload, offset, max_record))
    elif mode == 1:
        rtype = inp.pick(RTYPES)
        split = inp.byte()
        flip_at = inp.u16()
        flip = inp.byte() or 1
        payload = inp.rest()
        meta, body = payload[:split], payload[split:]
        enc = outcome(COMPILED.encode, rtype, meta, body)
        same("encode", enc, outcome(PURE.encode, rtype, bytearray(meta), memoryview(body)))
        same("encode_header", outcome(COMPILED.encode_header, rtype, meta, body),
             outcome(PURE.encode_header, rtype, meta, body))
        if enc[0] != "ok":
            return
        record = enc[1]
        want = (PURE.OK, rtype, meta, PURE.HEADER_SIZE + len(meta), len(body), len(record))
        for mod in (COMPILED, PURE):
            got = mod.decode(record)
            if got != want:
                raise Divergence(f"decode(encode()) in {mod.__name__}: {got!r:.300}")
        altered = bytearray(record)
        altered[flip_at % len(altered)] ^= flip
        c = outcome(COMPILED.decode, bytes(altered))
        same("decode of an altered record", c, outcome(PURE.decode, altered))
        if c[0] == "ok" and c[1][0] == PURE.OK:
            # CRC-32 catches every one-byte change of what it covers, the magic
            # is compared, a changed length moves the end: never OK.
            raise Divergence(f"a record with byte {flip_at % len(altered)} changed decoded OK")
    elif mode == 2:
        max_record = inp.pick(MAX_RECORDS[:-1])
        n = inp.byte() % 4
        stream = bytearray()
        records = []
        for _ in range(n):
            rtype = inp.byte()
            meta = inp.take(inp.byte() % 8)
            body = inp.take(inp.byte() % 24)
            records.append((rtype, meta, body))
            stream += PURE.encode(rtype, meta, body)
        npieces = inp.byte() % 8
        cuts_raw = [inp.u16() for _ in range(npieces)]
        stream += inp.rest()
        size = len(stream)
        cuts = sorted({1 + c % (size - 1) for c in cuts_raw}) if size > 1 else []
        pieces = cut(bytes(stream), cuts)
        dc, dp = COMPILED.Decoder(max_record), PURE.Decoder(max_record)
        got = []
        for piece in pieces:
            rc = dc.feed(piece)
            rp = dp.feed(bytearray(piece))
            same("Decoder.feed", rc, rp)
            same("Decoder state", (dc.corrupt, dc.consumed, dc.pending),
                 (dp.corrupt, dp.consumed, dp.pending))
            got.extend(rc)
        if max_record >= max((len(m) + len(b) for _, m, b in records), default=0):
            if got[:len(records)] != records:
                raise Divergence(f"Decoder lost or changed records: {got!r:.300}")
    else:
        rtype = inp.byte()
        version = inp.pick((1, 1, 1, 0, 2))
        reserved = inp.pick((0, 0, 0, 1, 0x8000))
        meta_len = inp.u16() % 64
        body_len = inp.pick((0, 1, 10, 100, 1 << 16, 0xFFFFFFFF, 0x7FFFFFFF))
        right_crc = inp.flag()
        max_record = inp.pick(MAX_RECORDS[:-1])
        payload = inp.rest()
        checked = struct.pack("<BBHII", rtype, version, reserved, meta_len, body_len)
        crc = zlib.crc32(payload[:meta_len + body_len], zlib.crc32(checked)) if right_crc \
            else zlib.crc32(payload)
        buf = PURE.MAGIC + checked + struct.pack("<I", crc) + payload
        same("decode of a built header", outcome(COMPILED.decode, buf, 0, max_record),
             outcome(PURE.decode, memoryview(buf), 0, max_record))
