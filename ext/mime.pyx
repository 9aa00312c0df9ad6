"""MIME header and body primitives, compiled.

The API and its semantics are documented once, in the pure-Python twin
``mta/_pure/mime.py``; this module implements the same functions over raw
byte pointers.  Costs: header parsing allocates one tuple, one name and one
raw slice per field and nothing else; lookups (find_header, from_domain)
allocate only what they return; body canonicalisation copies each byte once
(into a scratch buffer reused across updates) and makes one bytes object per
update(); canon_headers writes every selected field into one buffer.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact,
                            PyBytes_FromStringAndSize, PyBytes_GET_SIZE)
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport free, malloc, realloc
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcpy

# scan_body's flags as C enum constants for its loop (ext/scancodes.pxd is
# written by setup.py from mta/scancodes.py, where they are declared).
from scancodes cimport (
    FLAG_8BIT as _FLAG_8BIT, FLAG_BARE_CR as _FLAG_BARE_CR, FLAG_BARE_LF as _FLAG_BARE_LF,
    FLAG_LONG_LINE as _FLAG_LONG_LINE, FLAG_NUL as _FLAG_NUL)

from mta.scancodes import (  # one bit layout with the SMTP scanner's flags
    FLAG_8BIT, FLAG_BARE_CR, FLAG_BARE_LF, FLAG_LONG_LINE, FLAG_NUL)

if (_FLAG_8BIT, _FLAG_BARE_CR, _FLAG_BARE_LF, _FLAG_LONG_LINE, _FLAG_NUL) != (
        FLAG_8BIT, FLAG_BARE_CR, FLAG_BARE_LF, FLAG_LONG_LINE, FLAG_NUL):
    raise ImportError("mta._ext.mime was built before mta/scancodes.py changed; rebuild it")

MAX_LINE = 998  # octets, line end excluded (RFC 5322 2.1.1)

cdef enum:
    C_CR = 13
    C_LF = 10
    C_SP = 32
    C_HT = 9
    C_COLON = 58


# -- buffers ---------------------------------------------------------------

cdef class _View:
    """Borrowed read-only pointer into a bytes-like object (no copy)."""
    cdef const unsigned char* p
    cdef Py_ssize_t n
    cdef Py_buffer view
    cdef bint held
    cdef object obj

    def __cinit__(self, object obj):
        self.held = False
        self.obj = obj
        if PyBytes_CheckExact(obj):
            self.p = <const unsigned char*>PyBytes_AS_STRING(obj)
            self.n = PyBytes_GET_SIZE(obj)
        else:
            PyObject_GetBuffer(obj, &self.view, PyBUF_SIMPLE)
            self.held = True
            self.p = <const unsigned char*>self.view.buf
            self.n = self.view.len

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)


cdef inline bint _is_wsp(unsigned char c) nogil:
    return c == C_SP or c == C_HT


cdef inline unsigned char _lower(unsigned char c) nogil:
    if 65 <= c <= 90:
        return c + 32
    return c


cdef inline bytes _bytes(const unsigned char* p, Py_ssize_t n):
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef bytes _name_bytes(object name):
    # A field name is mostly given as bytes (the SMTP acceptor's three calls a message):
    # as it is.  bytes(name) of a bytes object is the same object, found through
    # bytes.__bytes__, a method call of ~660 instructions (Python 3.11).
    if type(name) is bytes:
        return <bytes>name
    if isinstance(name, str):
        return (<str>name).encode("ascii")
    return bytes(name)


# -- splitting and fields ----------------------------------------------------

cdef inline Py_ssize_t _next_line(const unsigned char* p, Py_ssize_t pos,
                                  Py_ssize_t end) nogil:
    """Offset just past the line end of the line at pos (end if none)."""
    cdef const void* nl = memchr(p + pos, C_LF, end - pos)
    if nl == NULL:
        return end
    return (<const unsigned char*>nl - p) + 1


cdef Py_ssize_t _header_end(const unsigned char* p, Py_ssize_t n,
                            Py_ssize_t* body_start) nogil:
    cdef Py_ssize_t pos = 0
    cdef unsigned char c
    while pos < n:
        c = p[pos]
        if c == C_LF:
            body_start[0] = pos + 1
            return pos
        if c == C_CR and pos + 1 < n and p[pos + 1] == C_LF:
            body_start[0] = pos + 2
            return pos
        pos = _next_line(p, pos, n)
    body_start[0] = n
    return n


def split_message(buf):
    """Return (header_end, body_start) offsets of a message."""
    cdef _View v = _View(buf)
    cdef Py_ssize_t body_start = 0
    cdef Py_ssize_t he = _header_end(v.p, v.n, &body_start)
    return he, body_start


cdef inline Py_ssize_t _field_end(const unsigned char* p, Py_ssize_t pos,
                                  Py_ssize_t end, Py_ssize_t* first_end) nogil:
    """End of the field starting at pos (continuation lines included)."""
    pos = _next_line(p, pos, end)
    first_end[0] = pos
    while pos < end and _is_wsp(p[pos]):
        pos = _next_line(p, pos, end)
    return pos


cdef inline Py_ssize_t _name_end(const unsigned char* p, Py_ssize_t start,
                                 Py_ssize_t first_end) nogil:
    """End of the field name (WSP before the colon dropped); -1: no colon."""
    cdef const void* colon = memchr(p + start, C_COLON, first_end - start)
    cdef Py_ssize_t k
    if colon == NULL:
        return -1
    k = <const unsigned char*>colon - p
    while k > start and _is_wsp(p[k - 1]):
        k -= 1
    return k


cdef inline bint _name_is(const unsigned char* p, Py_ssize_t start,
                          Py_ssize_t name_end, const unsigned char* want,
                          Py_ssize_t wn) nogil:
    cdef Py_ssize_t i
    if name_end < 0 or name_end - start != wn:
        return False
    for i in range(wn):
        if _lower(p[start + i]) != _lower(want[i]):
            return False
    return True


cdef list _parse(const unsigned char* p, Py_ssize_t end):
    cdef list fields = []
    cdef Py_ssize_t pos = 0, start, first_end = 0, ne
    cdef bytes name
    while pos < end:
        start = pos
        pos = _field_end(p, pos, end, &first_end)
        ne = _name_end(p, start, first_end)
        name = b"" if ne < 0 else _bytes(p + start, ne - start)
        fields.append((name, _bytes(p + start, pos - start), start, pos))
    return fields


def parse_headers(buf, Py_ssize_t end=-1):
    """Return [(name, raw, start, end)] for every field of the header block."""
    cdef _View v = _View(buf)
    cdef Py_ssize_t body_start = 0
    if end < 0:
        end = _header_end(v.p, v.n, &body_start)
    elif end > v.n:
        end = v.n
    return _parse(v.p, end)


def iter_headers(buf):
    """Iterate over (name, raw, start, end) for every field of the header block."""
    return iter(parse_headers(buf))


cdef bytes _unfold(const unsigned char* p, Py_ssize_t n, bint trim):
    """Copy p[:n] without line breaks; trim: also drop WSP at both ends."""
    cdef Py_ssize_t i = 0, o = 0, a, b
    cdef unsigned char c
    cdef unsigned char* out
    cdef bytes res
    out = <unsigned char*>malloc(n + 1)
    if out == NULL:
        raise MemoryError()
    try:
        while i < n:
            c = p[i]
            if c == C_LF or (c == C_CR and i + 1 < n and p[i + 1] == C_LF):
                i += 1
                continue
            out[o] = c
            o += 1
            i += 1
        a = 0
        b = o
        if trim:
            while a < b and _is_wsp(out[a]):
                a += 1
            while b > a and _is_wsp(out[b - 1]):
                b -= 1
        res = _bytes(out + a, b - a)
    finally:
        free(out)
    return res


def unfold(value):
    """Return value with its line breaks (CRLF or LF) removed."""
    cdef _View v = _View(value)
    return _unfold(v.p, v.n, False)


cdef bytes _value(const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    cdef const void* colon = memchr(p + start, C_COLON, end - start)
    if colon != NULL:
        start = (<const unsigned char*>colon - p) + 1
    return _unfold(p + start, end - start, True)


def field_value(raw):
    """Return the unfolded value of one raw field, trimmed of WSP."""
    cdef _View v = _View(raw)
    return _value(v.p, 0, v.n)


def find_headers(buf, name):
    """Return the values of every field called name, in order."""
    cdef bytes want = _name_bytes(name)
    cdef _View v = _View(buf)
    cdef Py_ssize_t body_start = 0, end, pos = 0, start, first_end = 0, ne
    cdef list out = []
    end = _header_end(v.p, v.n, &body_start)
    while pos < end:
        start = pos
        pos = _field_end(v.p, pos, end, &first_end)
        ne = _name_end(v.p, start, first_end)
        if _name_is(v.p, start, ne, <const unsigned char*>PyBytes_AS_STRING(want),
                    PyBytes_GET_SIZE(want)):
            out.append(_value(v.p, start, pos))
    return out


cdef Py_ssize_t _find(const unsigned char* p, Py_ssize_t n, bytes want,
                      Py_ssize_t* fend) noexcept:
    """Start of the first field called want (its end in fend), or -1."""
    cdef Py_ssize_t body_start = 0, end, pos = 0, start, first_end = 0, ne
    cdef const unsigned char* w = <const unsigned char*>PyBytes_AS_STRING(want)
    cdef Py_ssize_t wn = PyBytes_GET_SIZE(want)
    end = _header_end(p, n, &body_start)
    while pos < end:
        start = pos
        pos = _field_end(p, pos, end, &first_end)
        ne = _name_end(p, start, first_end)
        if _name_is(p, start, ne, w, wn):
            fend[0] = pos
            return start
    return -1


def find_header(buf, name):
    """Return the value of the first field called name, or None."""
    cdef bytes want = _name_bytes(name)
    cdef _View v = _View(buf)
    cdef Py_ssize_t fend = 0
    cdef Py_ssize_t start = _find(v.p, v.n, want, &fend)
    if start < 0:
        return None
    return _value(v.p, start, fend)


def find_first(buf, names):
    """Return, for each of names, the value of its first field or None (one pass)."""
    cdef _View v = _View(buf)
    cdef list wants = [_name_bytes(n) for n in names]
    cdef Py_ssize_t k = len(wants), left = len(wants), i
    cdef list out = [None] * k
    cdef Py_ssize_t body_start = 0, end, pos = 0, start, first_end = 0, ne
    cdef bytes w
    end = _header_end(v.p, v.n, &body_start)
    while pos < end and left > 0:
        start = pos
        pos = _field_end(v.p, pos, end, &first_end)
        ne = _name_end(v.p, start, first_end)
        if ne < 0:
            continue
        for i in range(k):
            if out[i] is None:
                w = <bytes>wants[i]
                if _name_is(v.p, start, ne, <const unsigned char*>PyBytes_AS_STRING(w),
                            PyBytes_GET_SIZE(w)):
                    out[i] = _value(v.p, start, pos)
                    left -= 1
    return out


# -- editing -----------------------------------------------------------------

cdef bytes _line_end(const unsigned char* p, Py_ssize_t n):
    cdef const void* nl = memchr(p, C_LF, n)
    cdef Py_ssize_t k
    if nl == NULL:
        return b"\r\n"
    k = <const unsigned char*>nl - p
    if k > 0 and p[k - 1] == C_CR:
        return b"\r\n"
    return b"\n"


def insert_header(buf, field, Py_ssize_t index=0):
    """Return a new message with field placed before the index-th field."""
    cdef bytes data = bytes(buf)
    cdef bytes fld = bytes(field)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t body_start = 0, end, pos = 0, first_end = 0, k = 0, at
    cdef bytes eol = _line_end(p, n)
    if not fld.endswith(b"\n"):
        fld += eol
    end = _header_end(p, n, &body_start)
    at = end
    if index >= 0:
        while pos < end:
            if k == index:
                at = pos
                break
            pos = _field_end(p, pos, end, &first_end)
            k += 1
    if at > 0 and p[at - 1] != C_LF:
        fld = eol + fld
    return data[:at] + fld + data[at:]


def remove_headers(buf, name):
    """Return a new message without the fields called name."""
    cdef bytes want = _name_bytes(name)
    cdef _View v = _View(buf)
    cdef const unsigned char* w = <const unsigned char*>PyBytes_AS_STRING(want)
    cdef Py_ssize_t wn = PyBytes_GET_SIZE(want)
    cdef Py_ssize_t body_start = 0, end, pos = 0, start, first_end = 0, ne, kept = 0
    cdef list parts = []
    end = _header_end(v.p, v.n, &body_start)
    while pos < end:
        start = pos
        pos = _field_end(v.p, pos, end, &first_end)
        ne = _name_end(v.p, start, first_end)
        if _name_is(v.p, start, ne, w, wn):
            parts.append(_bytes(v.p + kept, start - kept))
            kept = pos
    if not parts:
        return buf
    parts.append(_bytes(v.p + kept, v.n - kept))
    return b"".join(parts)


# -- From domain -----------------------------------------------------------

cdef object _domain_of(const unsigned char* a, Py_ssize_t n):
    cdef Py_ssize_t at = n - 1, i, o = 0
    cdef int depth = 0
    cdef unsigned char c
    cdef bytes res = b""
    while at >= 0 and a[at] != 64:  # '@'
        at -= 1
    if at < 0:
        return None
    cdef unsigned char* out = <unsigned char*>malloc(n - at)
    if out == NULL:
        raise MemoryError()
    try:
        for i in range(at + 1, n):
            c = a[i]
            if c == 40:  # '('
                depth += 1
            elif c == 41:  # ')'
                if depth:
                    depth -= 1
            elif depth == 0 and not (c == C_SP or c == C_HT or c == C_CR
                                     or c == C_LF or c == 62):
                out[o] = _lower(c)
                o += 1
        if o == 0:
            return None
        res = _bytes(out, o)
    finally:
        free(out)
    return res.decode("utf-8", "surrogateescape")


cdef object _address_domain(const unsigned char* v, Py_ssize_t n):
    cdef Py_ssize_t i = 0, o = 0, j, close
    cdef int depth
    cdef unsigned char c, d
    cdef unsigned char* plain = <unsigned char*>malloc(2 * n + 2)
    if plain == NULL:
        raise MemoryError()
    try:
        while i < n:
            c = v[i]
            if c == 34:  # '"': quoted string skipped
                i += 1
                while i < n and v[i] != 34:
                    i += 2 if v[i] == 92 else 1
                plain[o] = 34
                plain[o + 1] = 34
                o += 2
                i += 1
                continue
            if c == 40:  # '(': comment, may nest
                depth = 1
                i += 1
                while i < n and depth:
                    d = v[i]
                    if d == 92:
                        i += 1
                    elif d == 40:
                        depth += 1
                    elif d == 41:
                        depth -= 1
                    i += 1
                continue
            if c == 60:  # '<': angle-addr
                close = -1
                for j in range(i + 1, n):
                    if v[j] == 62:
                        close = j
                        break
                if close < 0:
                    close = n
                return _domain_of(v + i + 1, close - i - 1)
            if c == C_COLON:
                o = 0
            elif c == 44 or c == 59:  # ',' ';'
                for j in range(o):
                    if not (plain[j] == C_SP or plain[j] == C_HT
                            or plain[j] == C_CR or plain[j] == C_LF):
                        return _domain_of(plain, o)
                o = 0
            else:
                plain[o] = c
                o += 1
            i += 1
        return _domain_of(plain, o)
    finally:
        free(plain)


# -- the address of a From field's common forms -------------------------------

cdef inline bint _addr_octet(unsigned char c) noexcept:
    """Whether c may be in an address of simple_address's forms (not whitespace,
    not one of <>()[]",;:@)."""
    return not (c == 0x20 or 0x09 <= c <= 0x0D or c == 0x3C or c == 0x3E or c == 0x28
                or c == 0x29 or c == 0x5B or c == 0x5D or c == 0x22 or c == 0x2C
                or c == 0x3B or c == 0x3A or c == 0x40)


cdef Py_ssize_t _addr_end(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The end of an address (octets, "@", octets) at p[i], or -1."""
    cdef Py_ssize_t j = i
    while j < n and _addr_octet(p[j]):
        j += 1
    if j == i or j >= n or p[j] != 0x40:
        return -1
    j += 1
    i = j
    while j < n and _addr_octet(p[j]):
        j += 1
    return -1 if j == i else j


def simple_address(value):
    """The address of "a@b" or "Name <a@b>", else None (see mta._pure.mime).

    Compiled: the twin's two regular-expression fullmatches and a match object
    cost ~7,000 instructions per SMTP message (its From field, for the events).
    """
    cdef bytes v = <bytes>value if type(value) is bytes else bytes(value)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(v)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(v), i = 0, end, j
    if _addr_end(p, 0, n) == n:
        return PyUnicode_DecodeUTF8(<const char*>p, n, "replace")
    # Name <a@b>: the first of '"', '<', '(' must be '<'
    while i < n and p[i] != 0x3C and p[i] != 0x22 and p[i] != 0x28:
        i += 1
    if i == n or p[i] != 0x3C:
        return None
    end = _addr_end(p, i + 1, n)
    if end < 0 or end >= n or p[end] != 0x3E:
        return None
    for j in range(end + 1, n):
        if p[j] != 0x20 and p[j] != 0x09:
            return None
    return PyUnicode_DecodeUTF8(<const char*>(p + i + 1), end - i - 1, "replace")


def from_domain(buf):
    """Return the lower-cased domain of the RFC 5322 From address, or None."""
    cdef _View v = _View(buf)
    cdef Py_ssize_t fend = 0
    cdef Py_ssize_t start = _find(v.p, v.n, b"from", &fend)
    cdef bytes value
    if start < 0:
        return None
    value = _value(v.p, start, fend)
    return _address_domain(<const unsigned char*>PyBytes_AS_STRING(value),
                           PyBytes_GET_SIZE(value))


# -- body scan ---------------------------------------------------------------

def scan_body(buf, Py_ssize_t start=0, Py_ssize_t max_line=MAX_LINE):
    """Return FLAG_8BIT|FLAG_LONG_LINE|FLAG_BARE_LF|FLAG_BARE_CR|FLAG_NUL for buf[start:]."""
    cdef _View v = _View(buf)
    cdef const unsigned char* p = v.p
    cdef Py_ssize_t n = v.n, i, line_start, length
    cdef int flags = 0
    cdef unsigned char c
    cdef const unsigned char* q
    cdef uint64_t word, seen = 0
    if start < 0:
        start = 0
    line_start = start
    with nogil:
        if start < n and memchr(p + start, C_CR, n - start) == NULL and \
                memchr(p + start, 0, n - start) == NULL:
            # No CR and no NUL (text_body's text, its lines ended by LF): every LF is a
            # bare one, the lines are found by memchr and the 8-bit octets by an OR of
            # eight octets at a time -- not a test of each octet (13 instructions an
            # octet: half of text_body's cost)
            i = start
            while i + 8 <= n:
                memcpy(&word, p + i, 8)
                seen |= word
                i += 8
            while i < n:
                seen |= p[i]
                i += 1
            if seen & 0x8080808080808080ULL:
                flags |= _FLAG_8BIT
            i = start
            while True:
                q = <const unsigned char*>memchr(p + i, C_LF, n - i)
                if q == NULL:
                    break
                i = q - p
                flags |= _FLAG_BARE_LF
                if i - line_start > max_line:
                    flags |= _FLAG_LONG_LINE
                i += 1
                line_start = i
        else:
            i = start
            while i < n:
                c = p[i]
                if c >= 0x80:
                    flags |= _FLAG_8BIT
                elif c == C_LF:
                    length = i - line_start
                    if i > start and p[i - 1] == C_CR:
                        length -= 1
                    else:
                        flags |= _FLAG_BARE_LF
                    if length > max_line:
                        flags |= _FLAG_LONG_LINE
                    line_start = i + 1
                elif c == C_CR:
                    if i + 1 >= n or p[i + 1] != C_LF:
                        flags |= _FLAG_BARE_CR
                elif c == 0:
                    flags |= _FLAG_NUL
                i += 1
        if n - line_start > max_line:
            flags |= _FLAG_LONG_LINE
    return flags


# -- DKIM canonicalisation -------------------------------------------------

cdef Py_ssize_t _simple_into(const unsigned char* p, Py_ssize_t n,
                             unsigned char* out) noexcept nogil:
    """Write the simple form of a field (bare LF made CRLF, CRLF at the end).

    out must hold 2 * n + 2 octets; returns the octets written.
    """
    cdef Py_ssize_t i, o = 0, body = n
    if n >= 1 and p[n - 1] == C_LF:
        body = n - 2 if (n >= 2 and p[n - 2] == C_CR) else n - 1
    for i in range(body):
        if p[i] == C_LF and (i == 0 or p[i - 1] != C_CR):
            out[o] = C_CR
            o += 1
        out[o] = p[i]
        o += 1
    out[o] = C_CR
    out[o + 1] = C_LF
    return o + 2


cdef Py_ssize_t _relaxed_into(const unsigned char* p, Py_ssize_t n,
                              unsigned char* out) noexcept nogil:
    """Write the relaxed form of a field: lower-case name ':' value unfolded,
    WSP runs made one SP, trimmed, CRLF.  out must hold n + 3 octets.
    """
    cdef const void* colon = memchr(p, C_COLON, n)
    cdef Py_ssize_t ne, i, o = 0, vstart, value_at
    cdef bint sp = False
    cdef unsigned char c
    if colon == NULL:
        ne = n
        vstart = n
    else:
        ne = <const unsigned char*>colon - p
        vstart = ne + 1
    for i in range(ne):
        out[o] = _lower(p[i])
        o += 1
    while o > 0 and _is_wsp(out[o - 1]):
        o -= 1
    out[o] = C_COLON
    o += 1
    value_at = o
    i = vstart
    while i < n:
        c = p[i]
        if c == C_LF or (c == C_CR and i + 1 < n and p[i + 1] == C_LF):
            i += 1
            continue
        if c == C_SP or c == C_HT:
            sp = True
        else:
            if sp and o > value_at:
                out[o] = C_SP
                o += 1
            sp = False
            out[o] = c
            o += 1
        i += 1
    out[o] = C_CR
    out[o + 1] = C_LF
    return o + 2


cdef inline Py_ssize_t _put_pending(unsigned char* out, Py_ssize_t o, Py_ssize_t nl,
                                    bint sp) noexcept nogil:
    """Write the held-back line ends (a CRLF each), then the held-back space, at out[o];
    return the new write position."""
    cdef Py_ssize_t k
    for k in range(nl):
        out[o] = C_CR
        out[o + 1] = C_LF
        o += 2
    if sp:
        out[o] = C_SP
        o += 1
    return o


cdef inline bint _simple_is_identity(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """True when a field is already in simple form (CRLF ends, no bare LF)."""
    cdef const void* nl
    cdef Py_ssize_t pos = 0, k
    if n < 2 or p[n - 1] != C_LF or p[n - 2] != C_CR:
        return False
    while pos < n:
        nl = memchr(p + pos, C_LF, n - pos)
        if nl == NULL:
            break
        k = <const unsigned char*>nl - p
        if k == 0 or p[k - 1] != C_CR:
            return False
        pos = k + 1
    return True


def canon_header(raw, bint relaxed):
    """Return the DKIM canonical form of one raw header field, ending in CRLF."""
    cdef _View v = _View(raw)
    cdef unsigned char* out
    cdef Py_ssize_t o
    cdef bytes res
    if not relaxed and _simple_is_identity(v.p, v.n) and PyBytes_CheckExact(raw):
        return <bytes>raw  # already canonical: no copy
    out = <unsigned char*>malloc(2 * v.n + 4)
    if out == NULL:
        raise MemoryError()
    try:
        if relaxed:
            o = _relaxed_into(v.p, v.n, out)
        else:
            o = _simple_into(v.p, v.n, out)
        res = _bytes(out, o)
    finally:
        free(out)
    return res


def select_names(list fields, wanted):
    """Return the lower-case names of fields, in order, that are in wanted (a set)."""
    cdef list out = []
    cdef unsigned char small[64]
    cdef const unsigned char* p
    cdef Py_ssize_t n, i
    cdef tuple f
    cdef object name
    for f in fields:
        name = f[0]
        if not PyBytes_CheckExact(name) or PyBytes_GET_SIZE(name) > 64:
            key = bytes(name).lower()
        else:
            p = <const unsigned char*>PyBytes_AS_STRING(name)
            n = PyBytes_GET_SIZE(name)
            if n == 0:
                continue
            for i in range(n):
                small[i] = _lower(p[i])
            key = _bytes(small, n)
        if key and key in wanted:
            out.append(key)
    return out


cdef struct _Field:
    const unsigned char* name
    Py_ssize_t name_n
    const unsigned char* raw
    Py_ssize_t raw_n
    bint used


def canon_headers(list fields, names, bint relaxed):
    """Return the canonical header data a DKIM h= list selects from fields."""
    cdef tuple wanted
    cdef Py_ssize_t nf = len(fields), nw, i, j, o = 0, cap = 16
    cdef _Field* fs = NULL
    cdef unsigned char* out = NULL
    cdef const unsigned char* w
    cdef Py_ssize_t wn
    cdef tuple f
    cdef object n, start
    cdef bytes res
    # Where the next search for a name starts: below the field its last search took
    # (every field of that name further down is used), -1 once none is left.  h= names
    # each occurrence of a field, so without it a header block of many fields of one
    # name was walked again past the used ones for each: quadratic (250,000 To fields
    # held the acceptor's loop for seconds).
    cdef dict cursor = {}
    if type(names) is tuple:
        wanted = <tuple>names
    else:
        wanted = tuple(names)
    nw = len(wanted)
    for n in wanted:
        if not PyBytes_CheckExact(n):
            wanted = tuple([bytes(x) for x in wanted])
            break
    # the fields' bytes stay alive in the caller's list while we point into them
    for f in fields:
        if not (PyBytes_CheckExact(f[0]) and PyBytes_CheckExact(f[1])):
            return _canon_headers_generic(fields, wanted, relaxed)
        cap += 2 * PyBytes_GET_SIZE(<bytes>f[1]) + 4
    fs = <_Field*>malloc((nf + 1) * sizeof(_Field))
    out = <unsigned char*>malloc(cap)
    try:
        if fs == NULL or out == NULL:
            raise MemoryError()
        for i in range(nf):
            f = <tuple>fields[i]
            fs[i].name = <const unsigned char*>PyBytes_AS_STRING(<bytes>f[0])
            fs[i].name_n = PyBytes_GET_SIZE(<bytes>f[0])
            fs[i].raw = <const unsigned char*>PyBytes_AS_STRING(<bytes>f[1])
            fs[i].raw_n = PyBytes_GET_SIZE(<bytes>f[1])
            fs[i].used = False
        for j in range(nw):
            n = wanted[j]
            w = <const unsigned char*>PyBytes_AS_STRING(<bytes>n)
            wn = PyBytes_GET_SIZE(<bytes>n)
            start = cursor.get(n)
            i = nf - 1 if start is None else <Py_ssize_t>start
            while i >= 0:  # bottom-up: the lowest unused field of that name
                if (not fs[i].used and fs[i].name_n == wn
                        and _name_is(fs[i].name, 0, wn, w, wn)):
                    fs[i].used = True
                    if relaxed:
                        o += _relaxed_into(fs[i].raw, fs[i].raw_n, out + o)
                    else:
                        o += _simple_into(fs[i].raw, fs[i].raw_n, out + o)
                    break
                i -= 1
            cursor[n] = i - 1 if i >= 0 else -1
        res = _bytes(out, o)
    finally:
        free(fs)
        free(out)
    return res


cdef bytes _canon_headers_generic(list fields, tuple names, bint relaxed):
    cdef dict by_name = {}
    cdef list out = []
    for f in fields:
        by_name.setdefault(bytes(f[0]).lower(), []).append(f[1])
    for name in names:
        stack = by_name.get(name.lower())
        if stack:
            out.append(canon_header(stack.pop(), relaxed))
    return b"".join(out)


# Octets that body canonicalisation copies as they are (1) and those it
# looks at (0): CR and LF always, SP and HTAB in relaxed mode.
cdef unsigned char _PLAIN_SIMPLE[256]
cdef unsigned char _PLAIN_RELAXED[256]


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        _PLAIN_SIMPLE[c] = 0 if c == C_CR or c == C_LF else 1
        _PLAIN_RELAXED[c] = 0 if c == C_CR or c == C_LF or c == C_SP or c == C_HT else 1


_init_tables()


cdef class BodyCanonicalizer:
    """Streaming DKIM body canonicalisation (simple or relaxed)."""

    cdef bint _relaxed
    cdef object _sink
    cdef list _kept
    cdef Py_ssize_t _pending_nl  # line ends since the last content byte
    cdef bint _pending_sp  # relaxed: WSP since the last content byte
    cdef bint _pending_cr  # a CR that ended the last chunk
    cdef bint _content  # any content emitted at all
    cdef unsigned char* _buf  # scratch output, reused across updates
    cdef Py_ssize_t _cap
    cdef readonly Py_ssize_t length

    def __cinit__(self, relaxed, sink=None):
        self._relaxed = bool(relaxed)
        self._sink = sink
        self._kept = []
        self._pending_nl = 0
        self._pending_sp = False
        self._pending_cr = False
        self._content = False
        self._buf = NULL
        self._cap = 0
        self.length = 0

    def __dealloc__(self):
        if self._buf != NULL:
            free(self._buf)

    cdef int _reserve(self, Py_ssize_t need) except -1:
        cdef unsigned char* nb
        if need <= self._cap:
            return 0
        if need < 4096:
            need = 4096
        nb = <unsigned char*>realloc(self._buf, need)
        if nb == NULL:
            raise MemoryError()
        self._buf = nb
        self._cap = need
        return 0

    cdef int _emit(self, Py_ssize_t n) except -1:
        cdef bytes data
        if n == 0:
            return 0
        self.length += n
        data = _bytes(self._buf, n)
        if self._sink is not None:
            self._sink(data)
        else:
            self._kept.append(data)
        return 0

    def update(self, chunk):
        """Canonicalise the next piece of the body."""
        cdef _View v = _View(chunk)
        cdef const unsigned char* p = v.p
        cdef Py_ssize_t n = v.n, i = 0, o = 0
        cdef Py_ssize_t pending_nl = self._pending_nl
        cdef bint pending_sp = self._pending_sp
        cdef bint relaxed = self._relaxed
        cdef bint content = self._content
        cdef unsigned char c
        cdef unsigned char* out
        cdef const unsigned char* plain = &_PLAIN_SIMPLE[0]
        if relaxed:
            plain = &_PLAIN_RELAXED[0]
        # Worst case: every octet of the chunk is a bare LF, written as CRLF (2 octets),
        # after the held-back line ends (2 each), space and CR of the previous chunk.
        self._reserve(2 * n + 2 * pending_nl + 4)
        out = self._buf
        with nogil:
            if self._pending_cr and n > 0:
                self._pending_cr = False
                if p[0] == C_LF:
                    pending_nl += 1
                    pending_sp = False
                    i = 1
                else:  # the CR was bare: content
                    o = _put_pending(out, o, pending_nl, pending_sp)
                    pending_nl = 0
                    pending_sp = False
                    out[o] = C_CR
                    o += 1
                    content = True
            while i < n:
                c = p[i]
                if c == C_LF:
                    pending_nl += 1
                    pending_sp = False
                    i += 1
                    continue
                if c == C_CR:
                    if i + 1 == n:
                        self._pending_cr = True  # decided by the next chunk
                        break
                    if p[i + 1] == C_LF:
                        pending_nl += 1
                        pending_sp = False
                        i += 2
                        continue
                elif relaxed and (c == C_SP or c == C_HT):
                    pending_sp = True
                    i += 1
                    continue
                if pending_nl or pending_sp:
                    o = _put_pending(out, o, pending_nl, pending_sp)
                    pending_nl = 0
                    pending_sp = False
                out[o] = c
                o += 1
                content = True
                i += 1
                # the rest of the run of plain bytes: one table look-up each
                while i < n and plain[p[i]]:
                    out[o] = p[i]
                    o += 1
                    i += 1
        self._pending_nl = pending_nl
        self._pending_sp = pending_sp
        self._content = content
        self._emit(o)

    def finish(self):
        """End the body; return the kept output (b"" when a sink was given)."""
        cdef Py_ssize_t o = 0
        self._reserve(2 * self._pending_nl + 4)
        if self._pending_cr:
            self._pending_cr = False
            o = _put_pending(self._buf, o, self._pending_nl, self._pending_sp)
            self._buf[o] = C_CR
            o += 1
            self._content = True
        if self._content or not self._relaxed:
            self._buf[o] = C_CR
            self._buf[o + 1] = C_LF
            o += 2
        self._pending_nl = 0
        self._pending_sp = False
        self._emit(o)
        kept = b"".join(self._kept)
        self._kept = []
        return kept


def canon_body(body, bint relaxed):
    """Return the DKIM canonical form of a whole body."""
    cdef BodyCanonicalizer c = BodyCanonicalizer(relaxed)
    c.update(body)
    return c.finish()
