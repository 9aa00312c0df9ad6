# distutils: libraries = z
"""Spool record codec: framing and checksum (compiled).

The pure-Python twin ``mta._pure.record`` is the readable specification of
this module and its docstring states the format; both have the same public
API and results.

Layout (little-endian, struct ``"<4sBBHIII"``): magic b"\\x89MTA", rtype u8,
version u8, generation u16, meta_len u32, body_len u32, crc32 u32, then meta,
then body.  Version 1: generation 0, the CRC-32 covers header bytes [4:16],
meta and body.  Version 2 (written with a segment number): generation is the
segment number's low 16 bits and the CRC-32 starts with the segment number
as 8 little-endian bytes, so a record read back in another segment's file (a
reused segment file) is told apart: STALE.

Cost: ``decode()`` and ``Decoder.feed()`` borrow the caller's buffer through
the buffer protocol (no copy of the input), parse the header with plain loads
and run one CRC-32 pass over meta and body; they allocate the meta bytes, and
``Decoder`` the body bytes.  ``Decoder`` parses records straight from the fed
buffer and copies only an unfinished tail into its own.  ``encode()`` builds
the record in one bytes object with two memcpy's.

The CRC is zlib's crc32() called through its C API: this module links
libz, the library CPython's own zlib module already uses (that module exports
no C API capsule).  Measured for one 2 KB record (Python 3.11, zlib 1.2.13,
x86-64): header fields plus meta+body through the C calls 0.86 us; the same
through zlib.crc32 bound at import, on memoryview slices, 0.96 us.  The CRC
itself dominates either way; the C call saves the ~0.1 us of slices and
Python calls, about 10% of a decode.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memmove

import operator


cdef extern from "Python.h":
    # exc NULL: out-of-range values are clipped to the Py_ssize_t range, not raised.
    Py_ssize_t PyNumber_AsSsize_t(object o, PyObject* exc) except? -1
    Py_ssize_t PY_SSIZE_T_MAX


cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int len)


cdef enum:
    # Statuses, exported below under their public names.
    _OK = 0
    _INCOMPLETE = 1
    _CORRUPT = 2
    _STALE = 3

    # Header layout, in bytes.
    _HEADER_SIZE = 20
    _MAGIC_SIZE = 4
    _RTYPE_AT = 4
    _VERSION_AT = 5
    _GENERATION_AT = 6
    _META_LEN_AT = 8
    _BODY_LEN_AT = 12
    _CRC_AT = 16                            # header bytes [4:16] are covered by the CRC

    _VERSION = 1                            # no segment number in the checksum
    _VERSION_SEGMENT = 2                    # the segment number in the checksum
    _MAX_RTYPE = 0xFF

    # Tuning, in bytes.
    _CRC_STEP = 1 << 30                     # zlib takes at most a uInt per call
    _BUFFER_MIN_BYTES = 4096                # first allocation of Decoder's buffer
    _BUFFER_KEEP_BYTES = 64 * 1024          # larger empty Decoder buffers are freed

MAGIC = b"\x89MTA"
HEADER_SIZE = _HEADER_SIZE
VERSION = _VERSION
VERSION_SEGMENT = _VERSION_SEGMENT
OK = _OK
INCOMPLETE = _INCOMPLETE
CORRUPT = _CORRUPT
STALE = _STALE
DEFAULT_MAX_RECORD = 1 << 31                # bytes of meta + body

cdef uint64_t _MAX_LENGTH = 0xFFFFFFFF
cdef const unsigned char* _MAGIC_BYTES = b"\x89MTA"

_INCOMPLETE_RESULT = (_INCOMPLETE, 0, None, 0, 0, 0)
_CORRUPT_RESULT = (_CORRUPT, 0, None, 0, 0, 0)
_STALE_RESULT = (_STALE, 0, None, 0, 0, 0)


cdef struct Parsed:
    int rtype
    Py_ssize_t meta_at      # offsets from the start of the buffer
    Py_ssize_t body_at
    Py_ssize_t body_len
    Py_ssize_t end


cdef inline uint32_t _load_u32(const unsigned char* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _store_u32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef unsigned long _crc(unsigned long crc, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """CRC-32 of n bytes, in steps zlib's uInt length can take."""
    cdef Py_ssize_t step
    while n > 0:
        step = n if n < _CRC_STEP else _CRC_STEP
        crc = crc32(crc, p, <unsigned int>step)
        p += step
        n -= step
    return crc


cdef inline unsigned long _seed(uint64_t segment) noexcept nogil:
    """The CRC-32 of the segment number as 8 little-endian bytes (version 2's start)."""
    cdef unsigned char le[8]
    _store_u32(le, <uint32_t>segment)                # (the low 32 bits)
    _store_u32(le + 4, <uint32_t>(segment >> 32))
    return crc32(0, le, 8)


cdef int _parse(const unsigned char* buf, Py_ssize_t size, Py_ssize_t offset,
                Py_ssize_t max_record, int64_t segment, Parsed* out) noexcept nogil:
    """Check the record at buf[offset:size]; fill *out* and return a status.

    *segment*: the number of the segment the buffer is, or -1 if unknown (a
    version-2 record is then CORRUPT: it cannot be checked).
    """
    cdef const unsigned char* p = buf + offset
    cdef uint64_t meta_len, body_len, owner
    cdef uint32_t generation
    cdef Py_ssize_t end
    cdef unsigned long crc
    cdef bint stale = False
    if size - offset < _HEADER_SIZE:
        return _INCOMPLETE
    meta_len = _load_u32(p + _META_LEN_AT)
    body_len = _load_u32(p + _BODY_LEN_AT)
    if (memcmp(p, _MAGIC_BYTES, _MAGIC_SIZE) != 0
            or meta_len + body_len > <uint64_t>max_record):
        return _CORRUPT
    generation = <uint32_t>p[_GENERATION_AT] | (<uint32_t>p[_GENERATION_AT + 1] << 8)
    if p[_VERSION_AT] == _VERSION:
        if generation != 0:
            return _CORRUPT
        crc = 0
    elif p[_VERSION_AT] == _VERSION_SEGMENT and segment >= 0:
        owner = <uint64_t>segment
        if generation != (owner & 0xFFFF):
            # Another segment's record: the nearest lower number with this generation.
            owner = (owner & ~(<uint64_t>0xFFFF)) | generation
            if owner > <uint64_t>segment:
                if owner < 0x10000:
                    return _CORRUPT
                owner -= 0x10000
            stale = True
        crc = _seed(owner)
    else:
        return _CORRUPT
    end = offset + _HEADER_SIZE + <Py_ssize_t>(meta_len + body_len)
    if end > size:
        return _INCOMPLETE
    crc = crc32(crc, p + _RTYPE_AT, _CRC_AT - _RTYPE_AT)
    crc = _crc(crc, p + _HEADER_SIZE, <Py_ssize_t>(meta_len + body_len))
    if crc != _load_u32(p + _CRC_AT):
        return _CORRUPT
    if stale:
        return _STALE
    out.rtype = p[_RTYPE_AT]
    out.meta_at = offset + _HEADER_SIZE
    out.body_at = out.meta_at + <Py_ssize_t>meta_len
    out.body_len = <Py_ssize_t>body_len
    out.end = end
    return _OK


cdef int _check_rtype(object rtype) except -1:
    cdef Py_ssize_t value = PyNumber_AsSsize_t(rtype, NULL)
    if value < 0 or value > _MAX_RTYPE:
        raise ValueError("rtype must be in 0..255")
    return <int>value


cdef int64_t _check_segment(object segment) except -2:
    """-1 for None, else the segment number (0 .. 2**63 - 1)."""
    cdef Py_ssize_t value
    if segment is None:
        return -1
    value = PyNumber_AsSsize_t(segment, NULL)
    if value < 0 or value == PY_SSIZE_T_MAX:
        raise ValueError("segment must be in 0..2**63 - 2")
    return <int64_t>value


cdef Py_ssize_t _check_max_record(object max_record) except -1:
    cdef Py_ssize_t value = PyNumber_AsSsize_t(max_record, NULL)
    if value < 0:
        raise ValueError("max_record must not be negative")
    return value


cdef void _fill_header(unsigned char* h, int rtype, const unsigned char* meta, Py_ssize_t meta_len,
                       const unsigned char* body, Py_ssize_t body_len,
                       int64_t segment) noexcept nogil:
    """Write the 20-byte header for meta and body (which need not follow it);
    version 2 for *segment* >= 0, else version 1."""
    cdef unsigned long crc
    memcpy(h, _MAGIC_BYTES, _MAGIC_SIZE)
    h[_RTYPE_AT] = <unsigned char>rtype
    if segment >= 0:
        h[_VERSION_AT] = _VERSION_SEGMENT
        h[_GENERATION_AT] = segment & 0xFF
        h[_GENERATION_AT + 1] = (segment >> 8) & 0xFF
        crc = _seed(<uint64_t>segment)
    else:
        h[_VERSION_AT] = _VERSION
        h[_GENERATION_AT] = 0
        h[_GENERATION_AT + 1] = 0
        crc = 0
    _store_u32(h + _META_LEN_AT, <uint32_t>meta_len)
    _store_u32(h + _BODY_LEN_AT, <uint32_t>body_len)
    crc = crc32(crc, h + _RTYPE_AT, _CRC_AT - _RTYPE_AT)
    crc = _crc(crc, meta, meta_len)
    crc = _crc(crc, body, body_len)
    _store_u32(h + _CRC_AT, <uint32_t>crc)


cdef int _check_lengths(Py_ssize_t meta_len, Py_ssize_t body_len) except -1:
    if <uint64_t>meta_len > _MAX_LENGTH:
        raise ValueError("meta is longer than 4 GiB - 1")
    if <uint64_t>body_len > _MAX_LENGTH:
        raise ValueError("body is longer than 4 GiB - 1")
    return 0


def encode_header(rtype, meta, body, segment=None):
    """Return the 20-byte header of a record, for writing meta and body after it
    (version 2 for the segment numbered *segment*, version 1 without one)."""
    cdef int t = _check_rtype(rtype)
    cdef int64_t seg = _check_segment(segment)
    cdef Py_buffer m, b
    cdef bytes header
    PyObject_GetBuffer(meta, &m, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(body, &b, PyBUF_SIMPLE)
        try:
            _check_lengths(m.len, b.len)
            header = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE)
            _fill_header(<unsigned char*>PyBytes_AS_STRING(header), t,
                         <const unsigned char*>m.buf, m.len, <const unsigned char*>b.buf, b.len,
                         seg)
        finally:
            PyBuffer_Release(&b)
    finally:
        PyBuffer_Release(&m)
    return header


def encode(rtype, meta, body, segment=None):
    """Return a whole record: header, meta, body (see encode_header)."""
    cdef int t = _check_rtype(rtype)
    cdef int64_t seg = _check_segment(segment)
    cdef Py_buffer m, b
    cdef bytes record
    cdef unsigned char* out
    PyObject_GetBuffer(meta, &m, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(body, &b, PyBUF_SIMPLE)
        try:
            _check_lengths(m.len, b.len)
            record = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + m.len + b.len)
            out = <unsigned char*>PyBytes_AS_STRING(record)
            memcpy(out + _HEADER_SIZE, m.buf, m.len)
            memcpy(out + _HEADER_SIZE + m.len, b.buf, b.len)
            _fill_header(out, t, out + _HEADER_SIZE, m.len, out + _HEADER_SIZE + m.len, b.len,
                         seg)
        finally:
            PyBuffer_Release(&b)
    finally:
        PyBuffer_Release(&m)
    return record


def decode(buf, offset=0, max_record=DEFAULT_MAX_RECORD, segment=None):
    """Check the record at *offset* in *buf* (segment *segment*'s bytes, if known); see the
    module docstring for the result."""
    cdef Py_buffer view
    cdef Parsed rec
    cdef int status
    cdef Py_ssize_t off = PyNumber_AsSsize_t(offset, NULL)
    cdef Py_ssize_t limit = _check_max_record(max_record)
    cdef int64_t seg = _check_segment(segment)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if off < 0 or off > view.len:
            raise ValueError("offset is outside the buffer")
        status = _parse(<const unsigned char*>view.buf, view.len, off, limit, seg, &rec)
        if status == _INCOMPLETE:
            return _INCOMPLETE_RESULT
        if status == _CORRUPT:
            return _CORRUPT_RESULT
        if status == _STALE:
            return _STALE_RESULT
        meta = PyBytes_FromStringAndSize(<const char*>view.buf + rec.meta_at,
                                         rec.body_at - rec.meta_at)
        return (_OK, rec.rtype, meta, rec.body_at, rec.body_len, rec.end)
    finally:
        PyBuffer_Release(&view)


cdef class Decoder:
    """Streaming decoder: feed bytes, get the records they complete."""

    cdef Py_ssize_t _max_record
    cdef int64_t _segment
    cdef unsigned char* _buf        # an unfinished record: _buf[0:_len]
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef bint _corrupt
    cdef Py_ssize_t _consumed
    cdef Py_ssize_t _lost           # bytes received at or after a corrupt record

    def __cinit__(self):
        self._buf = NULL

    def __init__(self, max_record=DEFAULT_MAX_RECORD, segment=None):
        self._max_record = _check_max_record(max_record)
        self._segment = _check_segment(segment)

    def __dealloc__(self):
        free(self._buf)

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
        return self._len + self._lost

    def feed(self, data):
        """Add bytes-like *data*; return [(rtype, meta, body), ...] completed by it."""
        cdef Py_buffer view
        cdef list records = []
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if self._corrupt:
                self._lost += view.len
            elif self._len == 0:
                # Parse straight from the caller's buffer; keep only the tail.
                self._take(<const unsigned char*>view.buf, view.len, records)
            else:
                self._append(<const unsigned char*>view.buf, view.len)
                self._take(self._buf, self._len, records)
        finally:
            PyBuffer_Release(&view)
        return records

    cdef int _take(self, const unsigned char* p, Py_ssize_t n, list records) except -1:
        """Append the records complete in p[0:n] to *records*; keep the rest."""
        cdef Parsed rec
        cdef Py_ssize_t offset = 0
        cdef int status
        while True:
            status = _parse(p, n, offset, self._max_record, self._segment, &rec)
            if status != _OK:
                break
            records.append((
                rec.rtype,
                PyBytes_FromStringAndSize(<const char*>p + rec.meta_at, rec.body_at - rec.meta_at),
                PyBytes_FromStringAndSize(<const char*>p + rec.body_at, rec.body_len),
            ))
            offset = rec.end
        self._consumed += offset
        if status == _CORRUPT or status == _STALE:
            self._corrupt = True
            self._lost = n - offset
            self._len = 0
        elif p == self._buf:
            if offset:
                memmove(self._buf, self._buf + offset, n - offset)
                self._len = n - offset
        else:
            self._len = 0
            self._append(p + offset, n - offset)
        if self._len == 0 and self._cap > _BUFFER_KEEP_BYTES:
            free(self._buf)
            self._buf = NULL
            self._cap = 0
        return 0

    cdef int _append(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Copy n bytes to the end of the buffer, growing it."""
        cdef Py_ssize_t cap
        cdef unsigned char* grown
        if n == 0:
            return 0
        if self._len + n > self._cap:
            cap = max(self._len + n, 2 * self._cap, <Py_ssize_t>_BUFFER_MIN_BYTES)
            grown = <unsigned char*>malloc(cap)
            if grown == NULL:
                raise MemoryError()
            if self._len:
                memcpy(grown, self._buf, self._len)
            free(self._buf)
            self._buf = grown
            self._cap = cap
        memcpy(self._buf + self._len, p, n)
        self._len += n
        return 0
