# cython: language_level=3
"""The template renderer's kernel (compiled).

The pure-Python twin ``mta._pure.render`` is the readable specification of
this module; both have the same public API and results (tests/test_render.py).

Why native: rendering a transmission's parts was the largest piece of building
a message (bench/test_bench_http.py's 2 KB text with two substitutions and its
Subject with one: ~32,000 instructions, of which ~7,000 were ``str.translate``
URL-encoding one address through a dict, one lookup per character).  Here the
loop over the parts, the lookup of each path in the scopes, the writing of a
str, None, bool or int value, the test for characters HTML escapes and the
URL-encoding of an ASCII value are C; a value of another type goes through
*text_of*, one with characters to escape through html.escape, a non-ASCII
value in a link through urllib.parse.quote (as the twin).
"""
from cpython.dict cimport PyDict_GetItemWithError
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_GET_LENGTH

import re
from html import escape
from urllib.parse import quote


class TooLarge(Exception):
    """A recipient's message would pass the builder's size bound (http.max_message_size)."""


cdef inline bint _url_safe(Py_UCS4 c) noexcept:
    # RFC 3986's unreserved characters
    return (c >= 97 and c <= 122) or (c >= 65 and c <= 90) or (c >= 48 and c <= 57) or \
        c == 95 or c == 46 or c == 126 or c == 45


cdef str _url_encode(str value):
    """*value* with every character but the unreserved ones written %XX (UTF-8 octets)."""
    cdef Py_UCS4 c
    cdef bint ascii = True, clean = True
    for c in value:
        if c >= 128:
            ascii = False
            break
        if not _url_safe(c):
            clean = False
    if not ascii:
        return quote(value, safe="")
    if clean:
        return value
    cdef bytearray buf = bytearray(3 * PyUnicode_GET_LENGTH(value))
    cdef unsigned char* out = buf
    cdef Py_ssize_t k = 0
    cdef const char* digits = b"0123456789ABCDEF"
    cdef unsigned int o
    for c in value:
        o = <unsigned int>c
        if _url_safe(c):
            out[k] = <unsigned char>o
            k += 1
        else:
            out[k] = 37     # %
            out[k + 1] = digits[o >> 4]
            out[k + 2] = digits[o & 15]
            k += 3
    return out[:k].decode("ascii")


cdef inline bint _needs_escape(str value) noexcept:
    cdef Py_UCS4 c
    for c in value:
        if c == 38 or c == 60 or c == 62 or c == 34 or c == 39:     # & < > " '
            return True
    return False


_URL_UNSAFE = re.compile(r"[^A-Za-z0-9_.~-]")
_URL_TABLE = {c: f"%{c:02X}" if _URL_UNSAFE.match(chr(c)) else chr(c) for c in range(128)}


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)


cdef inline Py_ssize_t _octets(str value):
    if PyUnicode_IS_ASCII(value):       # (a flag of the str)
        return PyUnicode_GET_LENGTH(value)
    cdef Py_ssize_t k = 0
    cdef Py_UCS4 c
    for c in value:
        if c < 0x80:
            k += 1
        elif c < 0x800:
            k += 2
        elif c < 0x10000:
            k += 1 if 0xDC80 <= c <= 0xDCFF else 3
        else:
            k += 4
    return k


def octets(str value):
    """*value*'s length in octets as the message has it: UTF-8, a surrogate U+DC80 to
    U+DCFF 1 (an octet that was not UTF-8, "surrogateescape"), another 3."""
    return _octets(value)


cdef object _python_way(value, long raw, bint html, bint links):
    if raw == 2 and links:
        if _URL_UNSAFE.search(value) is not None:
            return value.translate(_URL_TABLE) if value.isascii() else quote(value, safe="")
    elif html and raw != 1:
        return escape(value)
    return value


cdef object _lookup(tuple path, tuple scopes):
    cdef object head, value, name
    cdef PyObject* found
    cdef Py_ssize_t i, k = len(path)
    if k == 0:
        raise IndexError("a substitution's path is empty")
    head = path[0]
    for scope in scopes:
        if type(scope) is dict:
            found = PyDict_GetItemWithError(scope, head)
            if found == NULL:
                continue
            value = <object>found
        elif head in scope:
            value = scope[head]
        else:
            continue
        for i in range(1, k):
            name = path[i]
            if type(value) is dict:
                found = PyDict_GetItemWithError(value, name)
                if found == NULL:
                    return None
                value = <object>found
            elif isinstance(value, dict) and name in value:
                value = value[name]
            else:
                return None
        return value
    return None


def render(list parts, tuple scopes, bint html, bint links, Py_ssize_t limit, Py_ssize_t n,
           text_of):
    """*parts* rendered for *scopes*.

    *parts*: constant text (str) and substitutions ``(path, raw)``, *path* a tuple
    of keys (str), looked up in the first scope (a dict) that has its first key;
    *raw* 0 (HTML-escaped when *html*), 1 (as it is) or 2 (in a link: URL-encoded
    when *links*, else as 0).  A value is written as ``text_of(value)`` writes it
    (a str as it is, None as "", true and false as words, an int in its digits).
    *limit* (octets, as :func:`octets` counts them; 0: none): TooLarge as soon as
    the text would pass it, counting from *n* (the constant parts' octets), checked
    after each value -- a value repeated 2,000 times is not written 2,000 times first.
    """
    cdef list out = []
    cdef object p, value
    cdef tuple t
    cdef long raw
    for p in parts:
        if type(p) is str:
            out.append(p)
            continue
        if isinstance(p, str):
            out.append(p)
            continue
        t = <tuple?>p
        if len(t) != 2:     # (the module is built without bounds checks)
            raise ValueError("a substitution is (path, raw)")
        raw = t[1]
        value = _lookup(<tuple?>t[0], scopes)
        if type(value) is str:
            pass
        elif value is None:
            value = ""
        elif value is True:
            value = "true"
        elif value is False:
            value = "false"
        elif type(value) is int:
            value = str(value)
        else:
            value = text_of(value)
        if type(value) is not str:
            # (a str subclass from text_of: as the twin writes it)
            value = _python_way(value, raw, html, links)
        elif raw == 2 and links:
            value = _url_encode(value)
        elif html and raw != 1:
            if _needs_escape(value):
                value = escape(value)
        out.append(value)
        n += _octets(value)
        if limit and n > limit:
            raise TooLarge(n)
    return "".join(out)
