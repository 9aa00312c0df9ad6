"""SMTP input scanner: command lines, DATA and BDAT chunks (compiled).

The pure-Python twin ``mta._pure.scanner`` is the readable specification of
this module, and its docstring states the rules; both have the same public
API and produce the same events, payloads, flags and ``buffered`` counts.

In short: the protocol ``feed()``s raw bytes and pulls ``(event, payload,
flags)`` tuples with ``next()``, switching the mode with ``start_data()`` or
``start_chunk(size, last)`` after a command.  Only CR LF ends a line in any
mode; DATA ends only at CRLF "." CRLF; bare CR / bare LF, over-long lines,
8-bit octets and over-size messages are reported as flags; results do not
depend on how the input is split.  The event, mode and flag names are declared
once, in ``mta/scancodes.py``, and re-exported here.

Cost: the unprocessed input lives in one malloc'd buffer, compacted (one
memmove of the unprocessed tail) only when a feed() needs room, and shrunk
back when it empties.  Command mode finds line ends with memchr and resumes
the search where the previous call stopped, so a line arriving one byte at a
time is scanned once.  DATA mode walks the input line by line with memchr
(LF, then CR only until a bare CR has been seen); the word-at-a-time 8-bit
test, the NUL search and the copy into one growable message buffer are done
once per run of lines between two dot-stuffed lines, not per line.  No Python
object is created per line, only the final payload.  BDAT chunks are scanned the same
way and, when a whole chunk is already buffered, returned with a single copy.
Past ``max_message`` content is not copied at all.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy, memmove

# Events, modes and flags as C enum constants, so the loops below test
# immediates.  ext/scancodes.pxd is written by setup.py from mta/scancodes.py,
# the one declaration, which the pure twin imports.  (C ints copied from the
# Python module at import measured 7% slower in DATA mode.)
from scancodes cimport (
    EV_CHUNK as _EV_CHUNK, EV_COMMAND as _EV_COMMAND,
    EV_COMMAND_TOO_LONG as _EV_COMMAND_TOO_LONG, EV_DATA as _EV_DATA,
    FLAG_8BIT as _FLAG_8BIT, FLAG_BARE_CR as _FLAG_BARE_CR, FLAG_BARE_LF as _FLAG_BARE_LF,
    FLAG_LONG_LINE as _FLAG_LONG_LINE, FLAG_NUL as _FLAG_NUL, FLAG_TOO_BIG as _FLAG_TOO_BIG,
    MODE_CHUNK as _MODE_CHUNK, MODE_COMMAND as _MODE_COMMAND, MODE_DATA as _MODE_DATA)

import operator
import sys

from mta.scancodes import (  # the public names: the same Python ints as the pure twin's
    EV_CHUNK, EV_COMMAND, EV_COMMAND_TOO_LONG, EV_DATA, FLAG_8BIT, FLAG_BARE_CR, FLAG_BARE_LF,
    FLAG_LONG_LINE, FLAG_NUL, FLAG_TOO_BIG, MODE_CHUNK, MODE_COMMAND, MODE_DATA)

if (_EV_COMMAND, _EV_COMMAND_TOO_LONG, _EV_DATA, _EV_CHUNK, _MODE_COMMAND, _MODE_DATA,
        _MODE_CHUNK, _FLAG_BARE_LF, _FLAG_BARE_CR, _FLAG_LONG_LINE, _FLAG_TOO_BIG, _FLAG_8BIT,
        _FLAG_NUL) != (EV_COMMAND, EV_COMMAND_TOO_LONG, EV_DATA, EV_CHUNK, MODE_COMMAND,
                       MODE_DATA, MODE_CHUNK, FLAG_BARE_LF, FLAG_BARE_CR, FLAG_LONG_LINE,
                       FLAG_TOO_BIG, FLAG_8BIT, FLAG_NUL):
    raise ImportError("mta._ext.scanner was built before mta/scancodes.py changed; rebuild it")


cdef extern from "Python.h":
    bint PyBytes_CheckExact(object o)


cdef enum:
    # Octets.
    _CR = 0x0D
    _LF = 0x0A
    _DOT = 0x2E
    _CRLF_LEN = 2
    _DATA_END_LEN = 3                       # ".\r\n"

    # Buffer tuning, in bytes.
    _BUFFER_MIN_BYTES = 4096                # first allocation of the input buffer
    _BUFFER_KEEP_BYTES = 64 * 1024          # larger empty input buffers are freed
    _OUT_MIN_BYTES = 4096                   # first allocation of the message buffer
    _OUT_KEEP_BYTES = 64 * 1024             # larger message buffers are freed after use

cdef uint64_t _HIGH_BITS = 0x8080808080808080ULL


def _limit(name, value, lowest):
    """Return *value* as an int >= *lowest*; values past sys.maxsize mean "no limit"."""
    value = operator.index(value)
    if value < lowest:
        raise ValueError(f"{name} must be at least {lowest}")
    return min(value, sys.maxsize)


cdef inline bint _has_8bit(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Say whether any of n octets at p is >= 0x80; eight octets per step."""
    cdef uint64_t word
    cdef uint64_t acc = 0
    cdef unsigned char tail = 0
    while n >= 8:
        memcpy(&word, p, 8)                 # unaligned load
        acc |= word
        p += 8
        n -= 8
    while n > 0:
        tail |= p[0]
        p += 1
        n -= 1
    return (acc & _HIGH_BITS) != 0 or (tail & 0x80) != 0


cdef class Scanner:
    """Pull-based scanner of one SMTP session's input."""

    # Limits, in octets.
    cdef Py_ssize_t _max_command_line
    cdef Py_ssize_t _max_text_line
    cdef Py_ssize_t _max_message

    # Unprocessed input is _buf[_start:_end]; _cap bytes are allocated.
    cdef unsigned char* _buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end

    cdef int _mode
    cdef Py_ssize_t _scan           # command mode: LF search resumes at _start + _scan
    cdef bint _overflow             # command mode: discarding an over-long line
    cdef bint _at_line_start        # DATA mode: the next byte starts a line
    cdef Py_ssize_t _chunk_left     # BDAT mode: chunk bytes still to come
    cdef bint _chunk_last
    cdef bint _chunk_keep           # BDAT mode: false, the chunk is read and dropped

    # The message in progress.
    cdef int _flags
    cdef Py_ssize_t _size           # octets after unstuffing, across chunks
    cdef Py_ssize_t _line_len       # octets of the current text line so far
    cdef bint _cr_pending           # the last content byte was a CR of unknown kind
    cdef unsigned char* _out        # content kept for the payload
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t _out_cap

    def __cinit__(self):
        self._buf = NULL
        self._out = NULL

    def __init__(self, max_command_line, max_text_line, max_message):
        self._max_command_line = _limit("max_command_line", max_command_line, 1)
        self._max_text_line = _limit("max_text_line", max_text_line, 1)
        self._max_message = _limit("max_message", max_message, 0)
        self._mode = _MODE_COMMAND
        self._at_line_start = True
        self._chunk_keep = True
        self.reset_message()

    def __dealloc__(self):
        free(self._buf)
        free(self._out)

    # -- public API ---------------------------------------------------------

    @property
    def buffered(self):
        """Bytes held and not yet turned into events (input plus message so far)."""
        return (self._end - self._start) + self._out_len

    @property
    def mode(self):
        """The current mode, one of the MODE_* constants."""
        return self._mode

    def feed(self, data):
        """Append bytes-like *data* to the input."""
        cdef Py_buffer view
        if PyBytes_CheckExact(data):
            self._append(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._append(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def next(self):
        """Return the next event tuple, or None when more input is needed."""
        if self._mode == _MODE_COMMAND:
            result = self._next_command()
        elif self._mode == _MODE_DATA:
            result = self._next_data()
        else:
            result = self._next_chunk()
        self._settle()
        return result

    def start_data(self):
        """Switch to DATA mode; the next byte starts the first line of a new message."""
        self._enter(_MODE_DATA)
        self.reset_message()
        self._at_line_start = True

    def start_chunk(self, size, last, keep=True):
        """Switch to BDAT mode for exactly *size* bytes; *last* ends the message;
        *keep* false: read and drop the chunk (see the pure twin)."""
        cdef Py_ssize_t n = _limit("size", size, 0)
        self._enter(_MODE_CHUNK)
        self._chunk_left = n
        self._chunk_last = bool(last)
        self._chunk_keep = bool(keep)

    def reset_message(self):
        """Forget the message in progress (flags, size, line state, content)."""
        self._flags = 0
        self._size = 0
        self._line_len = 0
        self._cr_pending = False
        self._drop_out()

    def discard(self):
        """Drop all unprocessed input (after STARTTLS); return how many bytes."""
        cdef Py_ssize_t dropped = self._end - self._start
        self._start = self._end = 0
        self._scan = 0
        self._overflow = False
        self._settle()
        return dropped

    # -- input buffer -------------------------------------------------------

    cdef int _append(self, const unsigned char* data, Py_ssize_t n) except -1:
        """Copy n bytes to the end of the input, compacting or growing it."""
        cdef Py_ssize_t live = self._end - self._start
        cdef Py_ssize_t cap
        cdef unsigned char* grown
        if n == 0:
            return 0
        if self._end + n > self._cap:
            if live + n <= self._cap:
                memmove(self._buf, self._buf + self._start, live)
            else:
                cap = max(live + n, 2 * self._cap, <Py_ssize_t>_BUFFER_MIN_BYTES)
                grown = <unsigned char*>malloc(cap)
                if grown == NULL:
                    raise MemoryError()
                if live:
                    memcpy(grown, self._buf + self._start, live)
                free(self._buf)
                self._buf = grown
                self._cap = cap
            self._start = 0
            self._end = live
        memcpy(self._buf + self._end, data, n)
        self._end += n
        return 0

    cdef void _settle(self) noexcept:
        """Rewind an empty input buffer, freeing it if it grew large."""
        if self._start == self._end:
            self._start = self._end = 0
            if self._cap > _BUFFER_KEEP_BYTES:
                free(self._buf)
                self._buf = NULL
                self._cap = 0

    cdef void _enter(self, int mode) noexcept:
        self._mode = mode
        self._scan = 0
        self._overflow = False

    # -- command mode -------------------------------------------------------

    cdef object _next_command(self):
        cdef const unsigned char* base = self._buf + self._start
        cdef Py_ssize_t n = self._end - self._start
        cdef Py_ssize_t i = self._scan
        cdef const unsigned char* lf
        cdef Py_ssize_t length
        cdef Py_ssize_t keep
        cdef bint too_long
        while i < n:
            lf = <const unsigned char*>memchr(base + i, _LF, n - i)
            if lf == NULL:
                break
            if lf > base and (lf - 1)[0] == _CR:
                length = lf - base - 1                      # without the CRLF
                too_long = self._overflow or length + _CRLF_LEN > self._max_command_line
                self._start += length + _CRLF_LEN
                self._scan = 0
                self._overflow = False
                if too_long:
                    return (_EV_COMMAND_TOO_LONG, None, 0)
                return (_EV_COMMAND, PyBytes_FromStringAndSize(<const char*>base, length), 0)
            i = lf - base + 1                               # a bare LF is part of the line
        if self._overflow or n >= self._max_command_line:
            # Too long whatever comes next: keep only a CR that may start the
            # CRLF, so memory stays bounded.
            self._overflow = True
            keep = 1 if n > 0 and base[n - 1] == _CR else 0
            self._start = self._end - keep
            self._scan = keep
        else:
            self._scan = n
        return None

    # -- DATA mode ----------------------------------------------------------

    cdef object _next_data(self):
        cdef const unsigned char* p = self._buf + self._start
        cdef const unsigned char* end = self._buf + self._end
        cdef const unsigned char* run = p      # content from here to p is not yet taken
        cdef const unsigned char* lf
        cdef const unsigned char* stop
        cdef Py_ssize_t n
        cdef bint done = False
        while True:
            if self._at_line_start:
                if p == end:
                    break
                if p[0] == _DOT:
                    if end - p < _DATA_END_LEN:
                        if end - p == 1 or p[1] == _CR:
                            break                           # "." or ".\r": wait
                    elif p[1] == _CR and p[2] == _LF:
                        self._take(run, p - run)
                        p += _DATA_END_LEN
                        run = p
                        done = True
                        break
                    self._take(run, p - run)
                    p += 1                                  # dot-unstuffing
                    run = p
                self._at_line_start = False
            lf = <const unsigned char*>memchr(p, _LF, end - p)
            if lf == NULL:
                # No line end yet: take it all but a final CR, which may start CRLF.
                stop = end
                if stop > p and (stop - 1)[0] == _CR:
                    stop -= 1
                n = stop - p
                self._line_text(p, n, n, False)
                p = stop
                break
            stop = lf + 1
            n = stop - p
            if lf > p and (lf - 1)[0] == _CR:
                self._line_text(p, n, n - _CRLF_LEN, True)
                self._at_line_start = True
            else:
                self._flags |= _FLAG_BARE_LF
                self._line_text(p, n, n, False)
            p = stop
        self._take(run, p - run)
        self._start = p - self._buf
        if done:
            return self._finish(_EV_DATA)
        return None

    # -- BDAT mode ----------------------------------------------------------

    cdef object _next_chunk(self):
        cdef const unsigned char* p = self._buf + self._start
        cdef Py_ssize_t take = min(self._chunk_left, self._end - self._start)
        cdef object payload = None
        cdef int flags
        if take:
            if self._chunk_keep:
                self._account_text(p, take)
                if self._grow_size(take):
                    if take == self._chunk_left and self._out_len == 0:
                        payload = PyBytes_FromStringAndSize(<const char*>p, take)
                    else:
                        self._keep(p, take)
            self._start += take
            self._chunk_left -= take
        if self._chunk_left:
            return None
        if not self._chunk_keep:
            self._mode = _MODE_COMMAND
            return (_EV_CHUNK, b"", 0)
        if payload is None:
            payload = self._payload()
        if not self._chunk_last:
            self._out_len = 0
            self._mode = _MODE_COMMAND
            return (_EV_CHUNK, payload, self._flags)
        if self._cr_pending:
            self._cr_pending = False
            self._flags |= _FLAG_BARE_CR
        flags = self._flags
        self.reset_message()
        self._mode = _MODE_COMMAND
        return (_EV_CHUNK, payload, flags)

    # -- message content ----------------------------------------------------

    cdef object _payload(self):
        if self._flags & _FLAG_TOO_BIG:
            return b""
        return PyBytes_FromStringAndSize(<const char*>self._out, self._out_len)

    cdef object _finish(self, int event):
        """Return the message's final event and go back to command mode."""
        cdef object result = (event, self._payload(), self._flags)
        self.reset_message()
        self._mode = _MODE_COMMAND
        return result

    cdef void _scan_text(self, const unsigned char* p, Py_ssize_t n,
                         Py_ssize_t cr_scan, bint ends_line) noexcept:
        """Flag n octets of content that hold at most one line end, at their end.

        Every CR among the first cr_scan octets is known to be bare; ends_line
        says the octets end with the CRLF that ends the current line.
        """
        self._line_text(p, n, cr_scan, ends_line)
        self._flag_octets(p, n)

    cdef inline void _line_text(self, const unsigned char* p, Py_ssize_t n,
                                Py_ssize_t cr_scan, bint ends_line) noexcept:
        """The line part of _scan_text: bare CRs and the line length."""
        if not (self._flags & _FLAG_BARE_CR) and cr_scan > 0 \
                and memchr(p, _CR, cr_scan) != NULL:
            self._flags |= _FLAG_BARE_CR
        self._line_len += n
        if self._line_len > self._max_text_line:
            self._flags |= _FLAG_LONG_LINE
        if ends_line:
            self._line_len = 0

    cdef inline void _flag_octets(self, const unsigned char* p, Py_ssize_t n) noexcept:
        """The octet part of _scan_text: 8-bit octets and NULs, in any span of content."""
        if not (self._flags & _FLAG_8BIT) and _has_8bit(p, n):
            self._flags |= _FLAG_8BIT
        if not (self._flags & _FLAG_NUL) and memchr(p, 0, n) != NULL:
            self._flags |= _FLAG_NUL

    cdef int _take(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Flag, count and keep n octets of DATA content (whole lines, already
        through _line_text): one call per run of lines between dot-stuffed ones."""
        if n == 0:
            return 0
        self._flag_octets(p, n)
        if self._grow_size(n):
            self._keep(p, n)
        return 0

    cdef void _account_text(self, const unsigned char* p, Py_ssize_t n) noexcept:
        """Flag any span of content, carrying a CR at its end into the next span."""
        cdef const unsigned char* end = p + n
        cdef const unsigned char* lf
        cdef Py_ssize_t seg
        if n == 0:
            return
        if self._cr_pending:
            self._cr_pending = False
            if p[0] == _LF:
                self._scan_text(p, 1, 0, True)          # completes a split CRLF
                p += 1
            else:
                self._flags |= _FLAG_BARE_CR
        while p < end:
            lf = <const unsigned char*>memchr(p, _LF, end - p)
            if lf == NULL:
                seg = end - p
                if (end - 1)[0] == _CR:
                    self._cr_pending = True
                    self._scan_text(p, seg, seg - 1, False)
                else:
                    self._scan_text(p, seg, seg, False)
                return
            seg = lf + 1 - p
            if lf > p and (lf - 1)[0] == _CR:
                self._scan_text(p, seg, seg - _CRLF_LEN, True)
            else:
                self._flags |= _FLAG_BARE_LF
                self._scan_text(p, seg, seg, False)
            p += seg

    cdef bint _grow_size(self, Py_ssize_t n) noexcept:
        """Count n more message octets; say whether to keep them."""
        self._size += n
        if self._flags & _FLAG_TOO_BIG:
            return False
        if self._size > self._max_message:
            self._flags |= _FLAG_TOO_BIG
            self._drop_out()
            return False
        return True

    cdef int _keep(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Append n octets to the message buffer (bounded by max_message)."""
        cdef Py_ssize_t need = self._out_len + n
        cdef Py_ssize_t cap
        cdef unsigned char* grown
        if n == 0:
            return 0
        if need > self._out_cap:
            cap = max(need, min(max(2 * self._out_cap, <Py_ssize_t>_OUT_MIN_BYTES),
                                self._max_message))
            grown = <unsigned char*>realloc(self._out, cap)
            if grown == NULL:
                raise MemoryError()
            self._out = grown
            self._out_cap = cap
        memcpy(self._out + self._out_len, p, n)
        self._out_len = need
        return 0

    cdef void _drop_out(self) noexcept:
        """Empty the message buffer, freeing it if it grew large."""
        self._out_len = 0
        if self._out_cap > _OUT_KEEP_BYTES:
            free(self._out)
            self._out = NULL
            self._out_cap = 0
