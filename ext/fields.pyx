# cython: language_level=3
"""Header fields of a built message, their common cases (compiled).

The pure-Python twin ``mta._pure.fields`` is the readable specification of this
module; both have the same public API and results (tests/test_fields.py).

Why native: per recipient of a transmission, mta.api.build checked the address
with a regular expression (~6,000 instructions, twice per transmission: the From
and the recipient), and wrote the To field (mailbox() and _fold(): ~9,000), the
Subject (~3,000) and the Message-ID (~6,000) through Python calls and string
formatting.  Here each is one call with typed loops over the characters; what
is not the common case returns 0 or None, and build takes its general way.
"""
from libc.stdint cimport uint64_t
from libc.time cimport time_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_GET_LENGTH, PyUnicode_READ_CHAR
from libc.string cimport memchr, memcpy

cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clk_id, timespec *tp)
    enum: CLOCK_REALTIME

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)

DEF FOLD_AT = 78


cdef inline bint _alnum(Py_UCS4 c) noexcept:
    return (c >= 97 and c <= 122) or (c >= 65 and c <= 90) or (c >= 48 and c <= 57)


cdef inline bint _atext(Py_UCS4 c) noexcept:
    # RFC 5322 atext: letters, digits and !#$%&'*+-/=?^_`{|}~
    if _alnum(c):
        return True
    return c == 33 or (c >= 35 and c <= 39) or c == 42 or c == 43 or c == 45 or c == 47 \
        or c == 61 or c == 63 or (c >= 94 and c <= 96) or (c >= 123 and c <= 126)


def plain_email(addr):
    """1 when *addr* is a plain ASCII address (dot-atoms, a local part of at most 64
    characters, at most 320 in all, labels of 1 to 63 letters, digits and inner
    hyphens); 2 when it is that and holds "n--" or "N--" (a label may be an IDN's
    A-label); 0 when it is not plain."""
    cdef Py_ssize_t n, i = 0, at, label
    cdef Py_UCS4 c, prev
    if not isinstance(addr, str):
        raise TypeError(f"expected string, got {type(addr).__name__}")
    n = PyUnicode_GET_LENGTH(addr)
    if n > 320 or not PyUnicode_IS_ASCII(addr):
        return 0
    # the local part: atoms joined by single dots
    while True:
        if i >= n or not _atext(PyUnicode_READ_CHAR(addr, i)):
            return 0
        while i < n and _atext(PyUnicode_READ_CHAR(addr, i)):
            i += 1
        if i < n and PyUnicode_READ_CHAR(addr, i) == 46:      # .
            i += 1
            continue
        break
    if i >= n or PyUnicode_READ_CHAR(addr, i) != 64 or i > 64:  # @ (at most 64 before)
        return 0
    at = i
    i += 1
    # the domain: labels joined by single dots
    while True:
        if i >= n or not _alnum(PyUnicode_READ_CHAR(addr, i)):
            return 0
        label = i
        prev = 0
        while i < n:
            c = PyUnicode_READ_CHAR(addr, i)
            if not (_alnum(c) or c == 45):
                break
            prev = c
            i += 1
        if prev == 45 or i - label > 63:
            return 0
        if i < n and PyUnicode_READ_CHAR(addr, i) == 46:
            i += 1
            continue
        break
    if i != n:
        return 0
    for i in range(n - 2):
        if PyUnicode_READ_CHAR(addr, i + 1) == 45 and PyUnicode_READ_CHAR(addr, i + 2) == 45:
            c = PyUnicode_READ_CHAR(addr, i)
            if c == 110 or c == 78:         # n-- or N--
                return 2
    return 1


def mailbox_line(str field not None, name, email):
    """``field: name <email>`` (or ``field: email`` without a name) as one line, when
    *email* is ASCII, *name* is None or ASCII atoms and spaces (none first or last,
    fewer than 64 in a row) and the line fits FOLD_AT octets; else None."""
    cdef Py_ssize_t i, n, run = 0
    cdef Py_UCS4 c
    if type(email) is not str or not PyUnicode_IS_ASCII(email):
        return None
    if not name:
        if PyUnicode_GET_LENGTH(field) + 2 + PyUnicode_GET_LENGTH(email) > FOLD_AT:
            return None
        return (field + ": " + email + "\r\n").encode("ascii")
    if type(name) is not str or not PyUnicode_IS_ASCII(name):
        return None
    n = PyUnicode_GET_LENGTH(name)
    if PyUnicode_GET_LENGTH(field) + 2 + n + 2 + PyUnicode_GET_LENGTH(email) + 1 > FOLD_AT:
        return None
    if PyUnicode_READ_CHAR(name, 0) == 32 or PyUnicode_READ_CHAR(name, n - 1) == 32:
        return None
    for i in range(n):
        c = PyUnicode_READ_CHAR(name, i)
        if c == 32:
            run += 1
            if run >= 64:
                return None
        elif _atext(c):
            run = 0
        else:
            return None
    return (field + ": " + name + " <" + email + ">\r\n").encode("ascii")


def short_line(str field not None, value):
    """``field: value`` when *value* is ASCII and the line fits FOLD_AT octets; else None."""
    if type(value) is str and PyUnicode_IS_ASCII(value) and \
            PyUnicode_GET_LENGTH(field) + 2 + PyUnicode_GET_LENGTH(value) <= FOLD_AT:
        return (field + ": " + value + "\r\n").encode("ascii")
    return None


cdef uint64_t _count = 0


cdef Py_ssize_t _hex(char* out, uint64_t v) noexcept:
    """*v* in lower-case hex digits into *out*; their number."""
    cdef char tmp[16]
    cdef Py_ssize_t k = 0, j
    cdef const char* digits = b"0123456789abcdef"
    while True:
        tmp[k] = digits[v & 15]
        k += 1
        v >>= 4
        if v == 0:
            break
    for j in range(k):
        out[j] = tmp[k - 1 - j]
    return k


def message_id(str hostname not None, uint64_t pid):
    """A new Message-ID: ``<time in ns.pid.count@hostname>``, the numbers in hex."""
    global _count
    cdef timespec ts
    cdef char buf[64]
    cdef Py_ssize_t k = 1
    clock_gettime(CLOCK_REALTIME, &ts)
    buf[0] = 60     # <
    k += _hex(buf + k, <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec)
    buf[k] = 46
    k += 1
    k += _hex(buf + k, pid)
    buf[k] = 46
    k += 1
    k += _hex(buf + k, _count)
    _count += 1
    buf[k] = 64     # @
    k += 1
    return buf[:k].decode("ascii") + hostname + ">"


DEF MAX_LINE = 998        # octets per line, RFC 5322 2.1.1
cdef bytes _CT = b"Content-Type: text/"
cdef bytes _CTE = b"; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"


def text_part_7bit(str subtype not None, text):
    """The text/*subtype* entity of *text* (its fields, blank line, body with CRLF line
    ends) when it can go as 7bit: ASCII, no NUL, no line over MAX_LINE octets once its
    line ends are LF; else None (quoted-printable, or a CR in it: not here).

    (Here a text with a CR is None too: text_part, whose answer is the same, makes its
    line ends LF with two bytes.replace, faster than a loop over the octets.)"""
    cdef const char* p
    cdef const char* q
    cdef char* o
    cdef Py_ssize_t n, i, ends = 0, size, k, m
    cdef bytes st, out
    if not isinstance(text, str) or not PyUnicode_IS_ASCII(text):
        return None
    p = <const char*>PyUnicode_DATA(text)
    n = PyUnicode_GET_LENGTH(text)
    if memchr(p, 13, n) != NULL or memchr(p, 0, n) != NULL:
        return None
    # the lines, by memchr (vectorised): their lengths and number
    i = 0
    while True:
        q = <const char*>memchr(p + i, 10, n - i)
        if q == NULL:
            break
        if (q - p) - i > MAX_LINE:
            return None
        ends += 1
        i = (q - p) + 1
    if n - i > MAX_LINE:
        return None
    st = subtype.encode("ascii")
    size = len(_CT) + len(st) + len(_CTE) + n + ends
    out = PyBytes_FromStringAndSize(NULL, size)
    o = PyBytes_AS_STRING(out)
    memcpy(o, <const char*>_CT, len(_CT))
    k = len(_CT)
    memcpy(o + k, <const char*>st, len(st))
    k += len(st)
    memcpy(o + k, <const char*>_CTE, len(_CTE))
    k += len(_CTE)
    i = 0
    while True:
        q = <const char*>memchr(p + i, 10, n - i)
        m = (n if q == NULL else q - p) - i
        memcpy(o + k, p + i, m)
        k += m
        if q == NULL:
            break
        o[k] = 13
        o[k + 1] = 10
        k += 2
        i += m + 1
    return out


DEF QP_WIDTH = 76         # quoted-printable line width, RFC 2045 6.7 (as binascii counts it)
cdef const char* _HEX = b"0123456789ABCDEF"
cdef unsigned char _PLAIN[256]     # printable octets written as they are, but "=" and "."
for _c in range(256):
    _PLAIN[_c] = 32 < _c < 127 and _c != 61 and _c != 46


def qp_lf(bytes data not None):
    """*data* (a text's UTF-8 octets, its line ends LF) as quoted-printable with CRLF line
    ends: the octets of ``binascii.b2a_qp(data, quotetabs=False, istext=True,
    header=False).replace(b"\\n", b"\\r\\n")``, in one pass where those are two (and
    b2a_qp's own two); None when *data* has a CR (that way keeps binascii's reading).

    Why native: a text part with one 8-bit character goes as quoted-printable, at
    ~5 ns an octet through binascii and the replace: 0.55 ms a recipient for a
    100 KB html part with substitutions.

    binascii's choices, kept so that the two ways write the same octets:
    - encoded: octets over 126, "=", controls other than TAB and LF, a TAB or SPACE
      ending the data, a "." alone on its line (first, and the data or line ends
      after it or a NUL follows);
    - a TAB or SPACE written before a line end is re-written encoded at the line
      end (that line may then have 77 characters);
    - a soft line break ("=" CRLF) before an encoded octet when the line has 73
      characters or more, before a literal one at 75 or more unless a line end or
      the data's end follows it."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = len(data), i, k = 0, line = 0
    cdef unsigned char c, nx
    cdef bint enc
    cdef char* o
    cdef bytes out
    if memchr(p, 13, n) != NULL:
        return None
    # at most 3 octets out for one in, a soft break (3) per 24 in, a line end 2
    out = PyBytes_FromStringAndSize(NULL, 4 * n + 16)
    o = PyBytes_AS_STRING(out)
    i = 0
    while i < n:
        c = p[i]
        if _PLAIN[c] and line < QP_WIDTH - 2:
            # the common case: a printable octet that a soft break cannot come before
            o[k] = <char>c
            k += 1
            line += 1
            i += 1
            continue
        if c == 10:
            if k and (o[k - 1] == 32 or o[k - 1] == 9):
                c = <unsigned char>o[k - 1]
                o[k - 1] = 61
                o[k] = _HEX[c >> 4]
                o[k + 1] = _HEX[c & 15]
                k += 2
            o[k] = 13
            o[k + 1] = 10
            k += 2
            line = 0
            i += 1
            continue
        nx = p[i + 1] if i + 1 < n else 10
        if c > 126 or c == 61:
            enc = True
        elif c == 46:
            enc = line == 0 and (i + 1 == n or nx == 10 or nx == 0)
        elif c == 32 or c == 9:
            enc = i + 1 == n
        else:
            enc = c < 32
        if enc:
            if line + 3 >= QP_WIDTH:
                o[k] = 61
                o[k + 1] = 13
                o[k + 2] = 10
                k += 3
                line = 0
            o[k] = 61
            o[k + 1] = _HEX[c >> 4]
            o[k + 2] = _HEX[c & 15]
            k += 3
            line += 3
        else:
            if line + 1 >= QP_WIDTH and i + 1 < n and nx != 10:
                o[k] = 61
                o[k + 1] = 13
                o[k + 2] = 10
                k += 3
                line = 0
            o[k] = <char>c
            k += 1
            line += 1
        i += 1
    return out[:k]
