"""What the SMTP input scanner and the MIME body scan report, declared once.

Both implementations of each scanner read these: the pure twins
(``mta/_pure/scanner.py``, ``mta/_pure/mime.py``) import them; the compiled
modules (``ext/scanner.pyx``, ``ext/mime.pyx``) cimport them as C enum
constants from ``ext/scancodes.pxd``, which setup.py writes from this file (so
keep it to plain ``NAME = int`` lines), and refuse to import if they were
built from other values.  Both scanner modules re-export them under the same
names, so ``native.load("scanner").EV_DATA`` is ``scancodes.EV_DATA``.

Message flags are one bit layout for both scanners: a flag means the same
property of the text whichever scanner reports it.  Only the limits differ:
the SMTP scanner counts a line with its CRLF against ``max_text_line``,
``mime.scan_body`` counts it without against ``max_line`` (RFC 5322's 998).
"""

# Scanner events: Scanner.next() returns (event, payload, flags).
EV_COMMAND = 1              # a command line, without its CRLF
EV_COMMAND_TOO_LONG = 2     # a command line over max_command_line was discarded
EV_DATA = 3                 # the message after DATA, dot-unstuffed
EV_CHUNK = 4                # the bytes of one BDAT chunk

# Scanner modes: Scanner.mode.
MODE_COMMAND = 0
MODE_DATA = 1
MODE_CHUNK = 2

# Message text flags (for one message, cumulative across BDAT chunks).
FLAG_BARE_LF = 1            # an LF not preceded by CR
FLAG_BARE_CR = 2            # a CR not followed by LF
FLAG_LONG_LINE = 4          # a line longer than the limit
FLAG_TOO_BIG = 8            # the message is over max_message (SMTP scanner only)
FLAG_8BIT = 16              # an octet >= 0x80
FLAG_NUL = 32               # a NUL octet: not text in 7BIT or 8BITMIME (RFC 6152)
