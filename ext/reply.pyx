"""SMTP client reply reader: whole one-line replies in one read (compiled).

The pure-Python twin ``mta._pure.reply`` is the readable specification of
this module and its docstring states what ``parts`` and
``one_line_replies`` return; both have the same public API and results.

Why compiled: the delivery client reads, per message, one segment holding
the final reply of a message and the MAIL, RCPT and DATA replies of the next
(cross-transaction pipelining).  Taken apart in Python -- a split, five
checks per line, a cache look-up and a call per reply -- that was about
25,000 instructions per read of four replies (Python 3.11, x86-64); here one
C loop over the octets finds the lines, checks their codes, and matches the
RFC 3463 status with plain compares instead of a regular expression, and only
the cache key, the parts of a new line and the replies are Python objects.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_Clear, PyDict_Size
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr


cdef inline bint _digit(unsigned char c) noexcept:
    return 0x30 <= c <= 0x39


cdef Py_ssize_t _digits(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The end of a run of 1 to 3 ASCII digits at p[i], or -1 (none, or more than 3)."""
    cdef Py_ssize_t j = i
    while j < n and j - i < 4 and _digit(p[j]):
        j += 1
    if j == i or j - i > 3:
        return -1
    return j


cdef tuple _parts(const unsigned char* line, Py_ssize_t n):
    """(code, enhanced, text) of the reply line line[:n] (n >= 3, three digits first)."""
    cdef int code = (line[0] - 0x30) * 100 + (line[1] - 0x30) * 10 + (line[2] - 0x30)
    cdef const unsigned char* t = line + 3
    cdef Py_ssize_t tn = n - 3, j, k
    if tn > 0 and (t[0] == 0x20 or t[0] == 0x2D):
        t += 1
        tn -= 1
    # ([245])\.(\d{1,3})\.(\d{1,3})(?: |$), its class the code's
    if tn >= 5 and t[0] == 0x30 + code // 100 and 0x32 <= t[0] <= 0x35 and t[0] != 0x33 \
            and t[1] == 0x2E:
        j = _digits(t, 2, tn)
        if j > 0 and j < tn and t[j] == 0x2E:
            k = _digits(t, j + 1, tn)
            if k > 0 and (k == tn or t[k] == 0x20):
                return (code, PyUnicode_DecodeUTF8(<const char*>t, k, NULL),
                        PyUnicode_DecodeUTF8(<const char*>t + k + (k < tn),
                                             tn - k - (k < tn), "replace"))
    return (code, None, PyUnicode_DecodeUTF8(<const char*>t, tn, "replace"))


def parts(bytes line not None):
    """(code, enhanced, text) of one reply line (see the twin's docstring)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(line)
    if PyBytes_GET_SIZE(line) < 3 or not (_digit(p[0]) and _digit(p[1]) and _digit(p[2])):
        raise ValueError("a reply line begins with three digits")
    return _parts(<const unsigned char*>PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line))


def one_line_replies(data, make, dict cache not None, Py_ssize_t cache_max, Py_ssize_t cache_line):
    """The replies of *data* when it is whole one-line replies, else None."""
    if type(data) is not bytes:
        return None
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), start = 0, nl, size
    cdef const unsigned char* line
    cdef const void* hit
    cdef PyObject* found
    if n < 2 or p[n - 2] != 0x0D or p[n - 1] != 0x0A:
        return None
    out = []
    while start < n:
        hit = memchr(p + start, 0x0A, n - start)
        nl = <const unsigned char*>hit - p          # (found: the data ends in LF)
        size = nl - 1 - start
        if nl == start or p[nl - 1] != 0x0D or size < 3:
            return None                             # a bare LF, or a short line
        line = p + start
        if not (0x32 <= line[0] <= 0x35 and _digit(line[1]) and _digit(line[2])) or \
                (size > 3 and line[3] == 0x2D):
            return None
        key = PyBytes_FromStringAndSize(<const char*>line, size)
        found = PyDict_GetItem(cache, key)
        if found is NULL:
            got = _parts(line, size)
            if size <= cache_line:
                if PyDict_Size(cache) >= cache_max:
                    PyDict_Clear(cache)
                PyDict_SetItem(cache, key, got)
        else:
            got = <object>found
        out.append(make(*got))
        start = nl + 1
    return out
