"""Differential target: the spool record codec, compiled vs pure.

Four modes, chosen by the first byte:

0. ``decode()`` of arbitrary bytes at an offset with a max_record: the same
   result or the same error class;
1. ``encode()``/``encode_header()`` of (rtype, meta, body) give the same bytes,
   ``decode()`` gives them back, and a record with one byte changed decodes the
   same way in both (never OK with other content); the same for a record of a
   numbered segment (version 2), read in its own segment (OK), in later ones
   (STALE, or CORRUPT 65,536 numbers on), in an earlier one and with no number
   (never OK), whole and with the byte changed;
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
SEGMENTS = (0, 1, 2, 0xFFFF, 0x10000, 0x10001, 70_000, 1 << 40, (1 << 63) - 2)
READ_IN = (0, 1, 2, 0xFFFF, 0x10000, 0x1FFFF, -1, -2)    # segment read in - written
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
        # The same record written for a numbered segment (the numbers are drawn from
        # bytes read above, so the other paths' inputs keep their meaning).
        written = SEGMENTS[flip % len(SEGMENTS)]
        numbered = outcome(COMPILED.encode, rtype, meta, body, written)
        same("encode with a segment", numbered, outcome(PURE.encode, rtype, meta, body, written))
        record = numbered[1]
        altered = bytearray(record)
        altered[flip_at % len(altered)] ^= flip
        for delta in (0, READ_IN[flip_at % len(READ_IN)], None):
            read = None if delta is None else written + delta
            if read is not None and not 0 <= read <= (1 << 63) - 2:
                continue
            for rec in (record, bytes(altered)):
                c = outcome(COMPILED.decode, rec, 0, 1 << 31, read)
                same("decode in a segment", c, outcome(PURE.decode, rec, 0, 1 << 31, read))
                status = c[1][0] if c[0] == "ok" else None
                if status == PURE.OK and (rec is not record or read != written):
                    raise Divergence(f"a version-2 record decoded OK outside its own "
                                     f"segment or altered: {written} read in {read}")
                if rec is record and read == written and status != PURE.OK:
                    raise Divergence(f"a version-2 record did not decode in its segment: {c}")
                if rec is record and delta is not None and 0 < delta < 0x10000 and \
                        status != PURE.STALE:
                    raise Divergence(f"a record of {written} read in {read} was not stale")
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
        # ... and read in a numbered segment (the version-2 checks and their owner
        # arithmetic with any generation; the number from the header's own fields).
        segment = SEGMENTS[(rtype + meta_len) % len(SEGMENTS)]
        same("decode of a built header in a segment",
             outcome(COMPILED.decode, buf, 0, max_record, segment),
             outcome(PURE.decode, memoryview(buf), 0, max_record, segment))
