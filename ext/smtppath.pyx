"""SMTP path check for MAIL FROM and RCPT TO (compiled).

The pure-Python twin ``mta._pure.smtppath`` is the readable specification of
this module (its regular expressions are the grammar) and its docstring
states what ``parse_path`` returns; both have the same public API and
results.

Why compiled: every MAIL and RCPT of the SMTP acceptor checks its path.  In
Python that was a function call, slices, a regular-expression fullmatch and
its match object: about 9,700 instructions a path (Python 3.11, x86-64),
twice per transaction, ~10 % of an SMTP transaction (bench/test_bench_session.py).
Here one C pass over the octets with a class table checks the same grammar;
only the returned str is made (an address literal is still checked by
:func:`mta.literal.address_literal`, as in the twin).

The grammar, as the twin's patterns match it (a fullmatch): a local part --
a dot-atom, or a quoted string ``"..."`` whose octets are 0x20-0x7e (and
0x80-0xff with *utf8*), quotes and "@" included -- then "@", then a domain --
dot-separated labels of 1 to 63 letters, digits (and 0x80-0xff with *utf8*)
and hyphens, neither starting nor ending with a hyphen, or "[" one or more
octets other than brackets "]".  For a quoted local part the pattern's greedy
match picks the last closing quote after which "@" and a domain end the
address; so does this.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8

from mta.literal import address_literal

DEF MAX_PATH = 256
DEF MAX_LOCAL_PART = 64
DEF MAX_DOMAIN = 255

# Octet classes (ASCII; 0x80-0xff are in all three with utf8).
DEF C_ATOM = 1      # dot-atom text (RFC 5321 atext)
DEF C_LABEL = 2     # letter or digit
DEF C_QTEXT = 4     # inside a quoted local part: 0x20-0x7e

cdef unsigned char _CLASS[256]


cdef void _init_classes() noexcept:
    cdef int c
    cdef bytes specials = b"!#$%&'*+/=?^_`{|}~-"
    cdef Py_ssize_t i
    for c in range(256):
        _CLASS[c] = 0
    for c in range(0x20, 0x7f):
        _CLASS[c] = C_QTEXT
    for c in range(ord("0"), ord("9") + 1):
        _CLASS[c] |= C_ATOM | C_LABEL
    for c in range(ord("A"), ord("Z") + 1):
        _CLASS[c] |= C_ATOM | C_LABEL
    for c in range(ord("a"), ord("z") + 1):
        _CLASS[c] |= C_ATOM | C_LABEL
    for i in range(len(specials)):
        _CLASS[<unsigned char>specials[i]] |= C_ATOM


_init_classes()


cdef inline bint _is(unsigned char c, unsigned char cls, bint utf8) noexcept:
    return (_CLASS[c] & cls) != 0 or (utf8 and c >= 0x80)


cdef bint _domain(const unsigned char* p, Py_ssize_t i, Py_ssize_t end, bint utf8) noexcept:
    """Whether p[i:end] is a whole domain (labels, or a bracketed literal's syntax)."""
    cdef Py_ssize_t start
    cdef unsigned char c
    if i >= end:
        return False
    if p[i] == 0x5B:    # "[" one or more octets but brackets "]"
        if end - i < 3 or p[end - 1] != 0x5D:
            return False
        for start in range(i + 1, end - 1):
            c = p[start]
            if c == 0x5B or c == 0x5D:
                return False
        return True
    while True:
        start = i
        while i < end and (p[i] == 0x2D or _is(p[i], C_LABEL, utf8)):
            i += 1
        if i == start or i - start > 63 or p[start] == 0x2D or p[i - 1] == 0x2D:
            return False
        if i == end:
            return True
        if p[i] != 0x2E:
            return False
        i += 1
        if i == end:
            return False


def parse_path(bytes raw not None, bint utf8):
    """Check an SMTP path like ``<user@example.com>``; return the address, '' for ``<>``.

    Returns None when the syntax is not acceptable (see mta._pure.smtppath).
    """
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef Py_ssize_t a0, a1, i, at, q
    if n < 2 or n > MAX_PATH or p[0] != 0x3C or p[n - 1] != 0x3E:
        return None
    a0 = 1
    a1 = n - 1
    if a0 == a1:
        return ""
    if p[a0] == 0x40:   # a source route, dropped
        i = a0
        while i < a1 and p[i] != 0x3A:
            i += 1
        if i == a1:
            return None
        a0 = i + 1
    if a0 >= a1:
        return None
    at = -1
    if p[a0] == 0x22:
        # A quoted string: the last closing quote that "@" and a whole domain follow,
        # among the quoted-text octets that open the address.
        q = a0 + 1
        while q < a1 and _is(p[q], C_QTEXT, utf8):
            q += 1
        i = q - 1
        while i > a0:
            if p[i] == 0x22 and i + 1 < a1 and p[i + 1] == 0x40 and \
                    _domain(p, i + 2, a1, utf8):
                at = i + 1
                break
            i -= 1
        if at < 0:
            return None
    else:
        i = a0
        while True:
            q = i
            while i < a1 and _is(p[i], C_ATOM, utf8):
                i += 1
            if i == q:
                return None
            if i < a1 and p[i] == 0x2E:
                i += 1
                continue
            break
        if i >= a1 or p[i] != 0x40 or not _domain(p, i + 1, a1, utf8):
            return None
        at = i
    # (offsets from the address's start, as the twin counts them)
    if at - a0 > MAX_LOCAL_PART or a1 - at - 1 > MAX_DOMAIN:
        return None
    if p[at + 1] == 0x5B and address_literal(
            raw[at + 1:a1].decode("ascii", "replace")) is None:
        return None
    try:
        return PyUnicode_DecodeUTF8(<const char*>(p + a0), a1 - a0, NULL)
    except UnicodeDecodeError:
        return None
