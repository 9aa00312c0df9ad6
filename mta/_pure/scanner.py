"""SMTP input scanner: command lines, DATA and BDAT chunks (pure-Python twin).

This is the readable specification of ``mta._ext.scanner``; both modules have
the same public API and produce the same results, and the same tests run
against both.

The SMTP server protocol ``feed()``s raw bytes as they arrive and pulls events
with ``next()``.  After handling a command it may switch the scanner's mode
(DATA accepted: ``start_data()``; BDAT n: ``start_chunk(n, last)``) before it
pulls the next event, so pipelined input is processed one command at a time.
Events are tuples ``(event, payload, flags)``:

``EV_COMMAND``
    payload is the command line without its CRLF; flags 0.
``EV_COMMAND_TOO_LONG``
    a command line longer than ``max_command_line`` octets (counting its CRLF)
    was discarded through its CRLF; payload None; flags 0.  Emitted when that
    CRLF arrives, once per over-long line.
``EV_DATA``
    the dot-unstuffed message, including the CRLF that precedes the
    terminating ``.<CRLF>`` (b"" for an empty message); back to command mode.
``EV_CHUNK``
    exactly the chunk's bytes (not unstuffed); back to command mode.

Security rules (RFC 5321 sections 2.3.8 and 4.1.1.4; "SMTP smuggling"): only
CR LF ends a line, in every mode.  A bare LF or bare CR is content (and is
flagged), never a line end, so DATA ends only at CRLF "." CRLF where the first
CRLF ends the previous line (or the "." is the first byte of DATA).  A CR that
is the last buffered byte is not classified until the next byte arrives, so
the results never depend on how the input was split.

The names of events, modes and flags are declared in ``mta/scancodes.py``
(one bit layout with ``mime.scan_body``'s flags) and re-exported here.

Message flags (``FLAG_*``) are cumulative for one message: for BDAT, each
chunk event reports the flags of the message so far; a CR that ends a chunk is
classified by the first byte of the next chunk, or counts as bare at the end
of the ``last`` chunk.  A text line is too long when its octets, counting its
CRLF and not counting an unstuffed dot, exceed ``max_text_line``.  Once the
message (after unstuffing, across all chunks) exceeds ``max_message`` octets,
its content is dropped as it arrives, payloads are b"" and ``FLAG_TOO_BIG`` is
set, while scanning for the end continues in constant memory.  Per-message
state is reset by ``start_data()``, ``reset_message()`` and after each
``EV_DATA`` and each ``last`` ``EV_CHUNK``.

Cost: bytes.find/count/split over each span of input, one bytearray for the
unprocessed input (consumed bytes are deleted from its front, which CPython
does without moving the rest) and one for the message being received.
"""

import operator
import sys

from mta.scancodes import (  # declared once for this module and the compiled one
    EV_CHUNK, EV_COMMAND, EV_COMMAND_TOO_LONG, EV_DATA, FLAG_8BIT, FLAG_BARE_CR, FLAG_BARE_LF,
    FLAG_LONG_LINE, FLAG_NUL, FLAG_TOO_BIG, MODE_CHUNK, MODE_COMMAND, MODE_DATA)

__all__ = [
    "Scanner", "EV_COMMAND", "EV_COMMAND_TOO_LONG", "EV_DATA", "EV_CHUNK",
    "MODE_COMMAND", "MODE_DATA", "MODE_CHUNK", "FLAG_BARE_LF", "FLAG_BARE_CR",
    "FLAG_LONG_LINE", "FLAG_TOO_BIG", "FLAG_8BIT", "FLAG_NUL",
]

_CR = 0x0D
_LF = 0x0A
_DOT = 0x2E
_CRLF = b"\r\n"
_DATA_END = b".\r\n"     # the last line of DATA, at the start of a line
_CRLF_DOT = b"\r\n."     # the end of a line followed by a line that starts with a dot


def _limit(name, value, lowest):
    """Return *value* as an int >= *lowest*; values past sys.maxsize mean "no limit"."""
    value = operator.index(value)
    if value < lowest:
        raise ValueError(f"{name} must be at least {lowest}")
    return min(value, sys.maxsize)


class Scanner:
    """Pull-based scanner of one SMTP session's input."""

    __slots__ = (
        "_max_command_line", "_max_text_line", "_max_message",
        "_buf", "_mode", "_scan", "_overflow", "_at_line_start",
        "_chunk_left", "_chunk_last", "_chunk_keep",
        "_flags", "_size", "_line_len", "_cr_pending", "_out",
    )

    def __init__(self, max_command_line, max_text_line, max_message):
        self._max_command_line = _limit("max_command_line", max_command_line, 1)
        self._max_text_line = _limit("max_text_line", max_text_line, 1)
        self._max_message = _limit("max_message", max_message, 0)
        self._buf = bytearray()     # unprocessed input, always from its first byte
        self._mode = MODE_COMMAND
        self._scan = 0              # command mode: where the CRLF search resumes
        self._overflow = False      # command mode: discarding an over-long line
        self._at_line_start = True  # DATA mode: the next byte starts a line
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_keep = True
        self._out = bytearray()
        self.reset_message()

    # -- public API ---------------------------------------------------------

    @property
    def buffered(self):
        """Bytes held and not yet turned into events (input plus message so far)."""
        return len(self._buf) + len(self._out)

    @property
    def mode(self):
        """The current mode, one of the MODE_* constants."""
        return self._mode

    def feed(self, data):
        """Append bytes-like *data* to the input."""
        self._buf += data

    def next(self):
        """Return the next event tuple, or None when more input is needed."""
        if self._mode == MODE_COMMAND:
            return self._next_command()
        if self._mode == MODE_DATA:
            return self._next_data()
        return self._next_chunk()

    def start_data(self):
        """Switch to DATA mode; the next byte starts the first line of a new message."""
        self._enter(MODE_DATA)
        self.reset_message()
        self._at_line_start = True

    def start_chunk(self, size, last, keep=True):
        """Switch to BDAT mode for exactly *size* bytes; *last* ends the message.

        *keep* false: a chunk to be refused, which RFC 3030 asks to be read all
        the same (its size is all that tells where the next command starts): its
        octets are dropped as they come, neither scanned nor held, its event has
        an empty payload and no flags, and a message in progress stays as it was.
        """
        size = _limit("size", size, 0)
        self._enter(MODE_CHUNK)
        self._chunk_left = size
        self._chunk_last = bool(last)
        self._chunk_keep = bool(keep)

    def reset_message(self):
        """Forget the message in progress (flags, size, line state, content)."""
        self._flags = 0
        self._size = 0
        self._line_len = 0          # octets of the current text line so far
        self._cr_pending = False    # the last content byte was a CR of unknown kind
        self._out = bytearray()

    def discard(self):
        """Drop all unprocessed input (after STARTTLS); return how many bytes."""
        dropped = len(self._buf)
        self._buf.clear()
        self._scan = 0
        self._overflow = False
        return dropped

    # -- command mode -------------------------------------------------------

    def _enter(self, mode):
        self._mode = mode
        self._scan = 0
        self._overflow = False

    def _next_command(self):
        buf = self._buf
        end = buf.find(_CRLF, self._scan)
        if end < 0:
            if self._overflow or len(buf) >= self._max_command_line:
                # Too long whatever comes next: keep only a CR that may start
                # the CRLF, so memory stays bounded.
                self._overflow = True
                keep = 1 if buf.endswith(b"\r") else 0
                del buf[:len(buf) - keep]
                self._scan = 0
            else:
                self._scan = max(len(buf) - 1, 0)
            return None
        too_long = self._overflow or end + len(_CRLF) > self._max_command_line
        line = None if too_long else bytes(buf[:end])
        del buf[:end + len(_CRLF)]
        self._scan = 0
        self._overflow = False
        if too_long:
            return (EV_COMMAND_TOO_LONG, None, 0)
        return (EV_COMMAND, line, 0)

    # -- DATA mode ----------------------------------------------------------

    def _next_data(self):
        buf = self._buf
        while True:
            if self._at_line_start:
                if not buf:
                    return None
                if buf[0] == _DOT:
                    head = bytes(buf[:len(_DATA_END)])
                    if head == _DATA_END:
                        del buf[:len(_DATA_END)]
                        return self._finish(EV_DATA)
                    if _DATA_END.startswith(head):
                        return None             # "." or ".\r": wait for the next byte
                    del buf[:1]                 # dot-unstuffing
                self._at_line_start = False
            # Inside a line: everything up to the next line that starts with a
            # dot is plain content.
            cut = buf.find(_CRLF_DOT)
            if cut >= 0:
                self._consume(cut + len(_CRLF))
                self._at_line_start = True
                continue
            if buf.endswith(_CRLF):
                self._consume(len(buf))
                self._at_line_start = True
                continue
            # Hold back a final CR: it may be the start of CRLF.
            self._consume(len(buf) - 1 if buf.endswith(b"\r") else len(buf))
            return None

    def _consume(self, count):
        """Move the first *count* input bytes into the message."""
        piece = bytes(self._buf[:count])
        del self._buf[:count]
        self._account(piece)

    # -- BDAT mode ----------------------------------------------------------

    def _next_chunk(self):
        take = min(self._chunk_left, len(self._buf))
        if take:
            if self._chunk_keep:
                self._consume(take)
            else:
                del self._buf[:take]
            self._chunk_left -= take
        if self._chunk_left:
            return None
        if not self._chunk_keep:
            self._mode = MODE_COMMAND
            return (EV_CHUNK, b"", 0)
        if not self._chunk_last:
            event = (EV_CHUNK, self._payload(), self._flags)
            self._out = bytearray()
            self._mode = MODE_COMMAND
            return event
        if self._cr_pending:
            self._cr_pending = False
            self._flags |= FLAG_BARE_CR
        return self._finish(EV_CHUNK)

    # -- message content ----------------------------------------------------

    def _payload(self):
        return b"" if self._flags & FLAG_TOO_BIG else bytes(self._out)

    def _finish(self, event):
        """Return the message's final event and go back to command mode."""
        result = (event, self._payload(), self._flags)
        self.reset_message()
        self._mode = MODE_COMMAND
        return result

    def _account(self, piece):
        """Fold one span of message content into the flags, size and payload."""
        flags = self._flags
        limit = self._max_text_line
        text = piece
        if self._cr_pending and text:
            self._cr_pending = False
            if text[0] == _LF:
                # A CRLF split between spans ends the line (its CR was counted).
                if self._line_len + 1 > limit:
                    flags |= FLAG_LONG_LINE
                self._line_len = 0
                text = text[1:]
            else:
                flags |= FLAG_BARE_CR
        if text:
            crlf = text.count(_CRLF)
            if text.count(b"\n") > crlf:
                flags |= FLAG_BARE_LF
            crs = text.count(b"\r")
            if text.endswith(b"\r"):
                crs -= 1                    # classified by the next byte
                self._cr_pending = True
            if crs > crlf:
                flags |= FLAG_BARE_CR
            if not text.isascii():
                flags |= FLAG_8BIT
            if b"\0" in text:
                flags |= FLAG_NUL
            lines = text.split(_CRLF)       # all but the last end with CRLF
            if len(lines) > 1:
                first = self._line_len + len(lines[0])
                inner = max(map(len, lines[1:-1]), default=0)
                if max(first, inner) + len(_CRLF) > limit:
                    flags |= FLAG_LONG_LINE
                self._line_len = 0
            self._line_len += len(lines[-1])
            if self._line_len > limit:
                flags |= FLAG_LONG_LINE
        self._size += len(piece)
        if not flags & FLAG_TOO_BIG:
            if self._size > self._max_message:
                flags |= FLAG_TOO_BIG
                self._out = bytearray()     # stop holding content
            else:
                self._out += piece
        self._flags = flags
