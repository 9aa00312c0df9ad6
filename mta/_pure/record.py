"""Spool record codec: framing and checksum (pure-Python twin).

This is the readable specification of ``mta._ext.record``; both modules have
the same public API and results, and the same tests run against both.

A spool segment file is a sequence of records.  Each record is a 20-byte
little-endian header (struct ``"<4sBBHIII"``)::

    magic b"\\x89MTA" | rtype u8 | version u8 | generation u16
    | meta_len u32 | body_len u32 | crc32 u32

followed by ``meta_len`` bytes of meta and ``body_len`` bytes of body.  The
CRC-32 (zlib's) covers header bytes [4:16], then meta, then body: everything
but the magic and the CRC field itself.  Two versions:

- 1: generation 0; the CRC starts from 0.  Written without a segment number.
- 2: written for the segment file numbered ``segment``: generation is
  ``segment & 0xFFFF`` and the CRC starts with the CRC of ``segment`` as 8
  little-endian bytes.  So a record is valid only in its own segment.  This
  is what lets the spool reuse a finished segment's file (already allocated
  and written, so its fsyncs write only data) without zeroing it: the old
  records beyond the new end are still well formed, but they belong to an
  older segment.

``decode()`` checks one record in any buffer (bytes, bytearray, memoryview,
mmap) without copying the body and returns ``(status, rtype, meta,
body_offset, body_len, next_offset)``; fields other than the status are
0/None unless it is ``OK``.  ``INCOMPLETE``: fewer than 20 bytes remain, or
fewer than the header announces (a torn tail).  ``CORRUPT``: bad magic,
version or generation, ``meta_len + body_len`` above ``max_record``, a CRC
mismatch, or a version-2 record when no *segment* is given.  ``STALE``: a
whole, valid version-2 record of an older segment — the one of the nearest
number below *segment* with the record's generation (a record of a segment
65,536 or more numbers older fails its CRC instead: CORRUPT); a reader of a
reused file takes it as the end of the segment's own records.  ``Decoder``
does the same over a stream fed in pieces and stops for good at the first
corrupt or stale record.

Cost: one CRC-32 pass over the record (zlib, in C), one copy of meta, and for
``Decoder`` one copy of the body; ``encode()`` copies meta and body once.
"""

import operator
import struct
import zlib

MAGIC = b"\x89MTA"
HEADER_SIZE = 20
VERSION = 1

VERSION_SEGMENT = 2

OK = 0
INCOMPLETE = 1
CORRUPT = 2
STALE = 3

DEFAULT_MAX_RECORD = 1 << 31     # bytes of meta + body

_HEADER = struct.Struct("<4sBBHIII")
_CHECKED = struct.Struct("<BBHII")   # header bytes [4:16], covered by the CRC
_CHECKED_START = len(MAGIC)
_CRC_OFFSET = _CHECKED_START + _CHECKED.size
_MAX_RTYPE = 0xFF
_MAX_LENGTH = 0xFFFFFFFF

_NOT_OK = {
    INCOMPLETE: (INCOMPLETE, 0, None, 0, 0, 0),
    CORRUPT: (CORRUPT, 0, None, 0, 0, 0),
    STALE: (STALE, 0, None, 0, 0, 0),
}
_GENERATION = 0xFFFF
_MAX_SEGMENT = (1 << 63) - 2


def _rtype(rtype):
    rtype = operator.index(rtype)
    if not 0 <= rtype <= _MAX_RTYPE:
        raise ValueError("rtype must be in 0..255")
    return rtype


def _length(name, data):
    size = memoryview(data).nbytes
    if size > _MAX_LENGTH:
        raise ValueError(f"{name} is longer than 4 GiB - 1")
    return size


def _max_record(max_record):
    max_record = operator.index(max_record)
    if max_record < 0:
        raise ValueError("max_record must not be negative")
    return max_record


def _segment(segment):
    if segment is None:
        return -1
    segment = operator.index(segment)
    if not 0 <= segment <= _MAX_SEGMENT:
        raise ValueError("segment must be in 0..2**63 - 2")
    return segment


def _seed(segment):
    return zlib.crc32(segment.to_bytes(8, "little"))


def encode_header(rtype, meta, body, segment=None):
    """Return the 20-byte header of a record, for writing meta and body after it
    (version 2 for the segment numbered *segment*, version 1 without one)."""
    segment = _segment(segment)
    if segment >= 0:
        version, generation, crc = VERSION_SEGMENT, segment & _GENERATION, _seed(segment)
    else:
        version, generation, crc = VERSION, 0, 0
    checked = _CHECKED.pack(_rtype(rtype), version, generation, _length("meta", meta),
                            _length("body", body))
    crc = zlib.crc32(body, zlib.crc32(meta, zlib.crc32(checked, crc)))
    return MAGIC + checked + crc.to_bytes(4, "little")


def encode(rtype, meta, body, segment=None):
    """Return a whole record: header, meta, body (see encode_header)."""
    return b"".join((encode_header(rtype, meta, body, segment), meta, body))


def decode(buf, offset=0, max_record=DEFAULT_MAX_RECORD, segment=None):
    """Check the record at *offset* in *buf* (segment *segment*'s bytes, if known); see the
    module docstring for the result."""
    with memoryview(buf) as raw, raw.cast("B") as view:
        offset = operator.index(offset)
        if not 0 <= offset <= len(view):
            raise ValueError("offset is outside the buffer")
        return _decode(view, offset, _max_record(max_record), _segment(segment))


def _decode(view, offset, max_record, segment):
    if len(view) - offset < HEADER_SIZE:
        return _NOT_OK[INCOMPLETE]
    magic, rtype, version, generation, meta_len, body_len, crc = \
        _HEADER.unpack_from(view, offset)
    if magic != MAGIC or meta_len + body_len > max_record:
        return _NOT_OK[CORRUPT]
    stale = False
    if version == VERSION and generation == 0:
        seed = 0
    elif version == VERSION_SEGMENT and segment >= 0:
        owner = segment
        if generation != segment & _GENERATION:
            # Another segment's record: the nearest lower number with this generation.
            owner = (segment & ~_GENERATION) | generation
            if owner > segment:
                owner -= _GENERATION + 1
                if owner < 0:
                    return _NOT_OK[CORRUPT]
            stale = True
        seed = _seed(owner)
    else:
        return _NOT_OK[CORRUPT]
    meta_at = offset + HEADER_SIZE
    body_at = meta_at + meta_len
    end = body_at + body_len
    if end > len(view):
        return _NOT_OK[INCOMPLETE]
    checked = view[offset + _CHECKED_START:offset + _CRC_OFFSET]
    if zlib.crc32(view[meta_at:end], zlib.crc32(checked, seed)) != crc:
        return _NOT_OK[CORRUPT]
    if stale:
        return _NOT_OK[STALE]
    return (OK, rtype, bytes(view[meta_at:body_at]), body_at, body_len, end)


class Decoder:
    """Streaming decoder: feed bytes, get the records they complete."""

    __slots__ = ("_max_record", "_segment", "_buf", "_corrupt", "_consumed", "_lost")

    def __init__(self, max_record=DEFAULT_MAX_RECORD, segment=None):
        self._max_record = _max_record(max_record)
        self._segment = _segment(segment)
        self._buf = bytearray()     # bytes of the record(s) not yet complete
        self._corrupt = False
        self._consumed = 0
        self._lost = 0              # bytes received at or after a corrupt record

    @property
    def corrupt(self):
        """True once a corrupt record has been seen; nothing after it is produced."""
        return self._corrupt

    @property
    def consumed(self):
        """Total bytes of complete good records so far."""
        return self._consumed

    @property
    def pending(self):
        """Bytes received but not part of a complete good record."""
        return len(self._buf) + self._lost

    def feed(self, data):
        """Add bytes-like *data*; return [(rtype, meta, body), ...] completed by it."""
        if self._corrupt:
            self._lost += memoryview(data).nbytes
            return []
        buf = self._buf
        buf += data
        records = []
        offset = 0
        with memoryview(buf) as view:
            while True:
                status, rtype, meta, body_at, body_len, end = _decode(view, offset,
                                                                      self._max_record,
                                                                      self._segment)
                if status != OK:
                    break
                records.append((rtype, meta, bytes(view[body_at:end])))
                offset = end
        del buf[:offset]
        self._consumed += offset
        if status in (CORRUPT, STALE):
            self._corrupt = True
            self._lost = len(buf)
            buf.clear()
        return records
