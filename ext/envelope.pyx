"""SMTP client writer: the MAIL and RCPT lines of a plain transaction, and the
message's data (compiled).

The pure-Python twin ``mta._pure.envelope`` is the readable specification of
this module and its docstring states what ``plain`` and ``data`` return;
both have the same public API and results.

Why compiled: ``SmtpConnection.prepare`` runs once per message.  Its checks
of the addresses (ASCII, no character that must not reach the wire, by a
regular expression) and the formatting and encoding of each command line
were Python steps per address; here one C pass over each address's octets
checks it and copies it into its line.  ``data``: in Python, doubling the
dots was a ``bytes.replace``, whose search for LF "." steps through the
message octet by octet (about 10,000 instructions for a 2 KB message), and
two concatenations copied it twice more; here memchr finds the LFs and the
message is copied once, into the write's one buffer (12.6k -> 3.4k
instructions for a 2 KB message and the next envelope).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.string cimport memchr, memcpy


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)


cdef inline bint _plain(object s) noexcept:
    """*s* is an exact str, ASCII, and free of C0 controls, DEL, "<" and ">"."""
    cdef const unsigned char* p
    cdef Py_ssize_t i, n
    cdef unsigned char c
    if type(s) is not str or not PyUnicode_IS_ASCII(s):
        return False
    p = <const unsigned char*>PyUnicode_DATA(s)
    n = PyUnicode_GET_LENGTH(s)
    for i in range(n):
        c = p[i]
        if c < 0x20 or c == 0x7F or c == 0x3C or c == 0x3E:
            return False
    return True


cdef bytes _line(const char* head, Py_ssize_t hn, object a, object b):
    """head + a (+ b) + CRLF as bytes; a and b ASCII str (b may be None)."""
    cdef Py_ssize_t an = PyUnicode_GET_LENGTH(a)
    cdef Py_ssize_t bn = PyUnicode_GET_LENGTH(b) if b is not None else 0
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hn + an + bn + 3)
    cdef char* q = PyBytes_AS_STRING(out)
    memcpy(q, head, hn)
    memcpy(q + hn, PyUnicode_DATA(a), an)
    q[hn + an] = b">"
    if bn:
        memcpy(q + hn + an + 1, PyUnicode_DATA(b), bn)
    q[hn + an + 1 + bn] = b"\r"
    q[hn + an + 2 + bn] = b"\n"
    return out


def plain(sender, recipients, params):
    """(MAIL line, [RCPT lines]) of a plain transaction, else None."""
    cdef Py_ssize_t i, n
    if type(recipients) is not list or type(params) is not str \
            or not PyUnicode_IS_ASCII(params) or not _plain(sender):
        return None
    n = PyList_GET_SIZE(recipients)
    if n == 0:
        return None
    for i in range(n):
        r = <object>PyList_GET_ITEM(recipients, i)
        if not _plain(r) or PyUnicode_GET_LENGTH(r) == 0:
            return None
    rcpts = [_line(b"RCPT TO:<", 9, <object>PyList_GET_ITEM(recipients, i), None)
             for i in range(n)]
    return _line(b"MAIL FROM:<", 11, sender, params), rcpts


def data(message, after):
    """dot_stuff(message) + after, in one pass and one allocation, or None (not bytes)."""
    if type(message) is not bytes or type(after) is not bytes:
        return None
    cdef const char* m = PyBytes_AS_STRING(message)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(message), an = PyBytes_GET_SIZE(after)
    cdef Py_ssize_t extra = 0, i = 0, j, tn
    cdef const char* hit
    cdef const char* tail
    # dots to add: one before a leading dot, one after each LF followed by a dot
    if n and m[0] == b".":
        extra = 1
    while i < n:
        hit = <const char*>memchr(m + i, b"\n", n - i)
        if hit is NULL:
            break
        j = hit - m + 1
        if j < n and m[j] == b".":
            extra += 1
        i = j
    if n == 0 or (n >= 2 and m[n - 2] == b"\r" and m[n - 1] == b"\n"):
        tail, tn = b".\r\n", 3
    else:
        tail, tn = b"\r\n.\r\n", 5
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + extra + tn + an)
    cdef char* q = PyBytes_AS_STRING(out)
    if extra == 0:
        memcpy(q, m, n)
        q += n
    else:
        i = 0
        if m[0] == b".":
            q[0] = b"."
            q += 1
        while i < n:
            hit = <const char*>memchr(m + i, b"\n", n - i)
            j = n if hit is NULL else hit - m + 1
            memcpy(q, m + i, j - i)
            q += j - i
            if j < n and m[j] == b".":
                q[0] = b"."
                q += 1
            i = j
    memcpy(q, tail, tn)
    memcpy(q + tn, PyBytes_AS_STRING(after), an)
    return out
