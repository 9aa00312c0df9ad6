"""Header fields of a built message, their common cases (pure-Python twin).

The readable specification of ``mta._ext.fields``: both have the same public API
and results (tests/test_fields.py runs the same cases, and random ones, through
both).  Each function answers the common case only -- a plain address, a display
name of atoms, a field that fits one line -- and says so with 0 or None otherwise,
when :mod:`mta.api.build` takes its general way (which gives the same answer for
the common case: the tests compare them).
"""
from __future__ import annotations

import binascii
import itertools
import re
import time

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*\Z")
_PHRASE_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+\Z")
_SPACE_RUN = " " * 64     # spaces in a row that a display name keeps only encoded
FOLD_AT = 78              # octets per header line where a space allows it

_msgids = itertools.count()


def plain_email(addr: str) -> int:
    """1 when *addr* is a plain ASCII address (dot-atoms, a local part of at most 64
    characters, at most 320 in all, labels of 1 to 63 letters, digits and inner
    hyphens); 2 when it is that and holds "n--" or "N--" (a label may be an IDN's
    A-label); 0 when it is not plain."""
    if _PLAIN_EMAIL.match(addr) and len(addr) <= 320 and addr.index("@") <= 64:
        return 1 if "n--" not in addr and "N--" not in addr else 2
    return 0


def mailbox_line(field: str, name, email: str) -> bytes | None:
    """``field: name <email>`` (or ``field: email`` without a name) as one line, when
    *email* is ASCII, *name* is None or ASCII atoms and spaces (none first or last,
    fewer than 64 in a row) and the line fits FOLD_AT octets; else None."""
    if type(email) is not str or not email.isascii():
        return None
    if not name:
        line = f"{field}: {email}"
    elif type(name) is str and name.isascii() and _PHRASE_ATOMS.match(name) and \
            name.strip() == name and _SPACE_RUN not in name:
        line = f"{field}: {name} <{email}>"
    else:
        return None
    return (line + "\r\n").encode("utf-8") if len(line) <= FOLD_AT else None


def short_line(field: str, value: str) -> bytes | None:
    """``field: value`` when *value* is ASCII and the line fits FOLD_AT octets; else None."""
    if type(value) is str and value.isascii() and len(field) + 2 + len(value) <= FOLD_AT:
        return f"{field}: {value}\r\n".encode("ascii")
    return None


def message_id(hostname: str, pid: int) -> str:
    """A new Message-ID: ``<time in ns.pid.count@hostname>``, the numbers in hex."""
    return f"<{time.time_ns():x}.{pid:x}.{next(_msgids):x}@{hostname}>"


MAX_LINE = 998            # octets per line, RFC 5322 2.1.1


def text_part_7bit(subtype: str, text: str) -> bytes | None:
    """The text/*subtype* entity of *text* (its fields, blank line, body with CRLF line
    ends) when it can go as 7bit: ASCII, no NUL, no line over MAX_LINE octets once its
    line ends are LF; else None (quoted-printable, or a CR in it: not here).

    (Here a text with a CR is None too: mta.api.build.text_part, whose answer is the
    same, makes its line ends LF with two bytes.replace, faster than a loop over the
    octets.)"""
    if not isinstance(text, str) or not text.isascii() or "\0" in text or "\r" in text:
        return None
    if any(len(line) > MAX_LINE for line in text.split("\n")):
        return None
    return (b"Content-Type: text/" + subtype.encode() + b"; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 7bit\r\n\r\n" +
            text.replace("\n", "\r\n").encode("ascii"))


def qp_lf(data: bytes) -> bytes | None:
    """*data* (a text's UTF-8 octets, its line ends LF) as quoted-printable with CRLF line
    ends, as binascii writes it; None when *data* has a CR (the caller's general way
    keeps binascii's reading of it).  The compiled twin writes the same octets in one
    pass."""
    if b"\r" in data:
        return None
    return binascii.b2a_qp(data, quotetabs=False, istext=True,
                           header=False).replace(b"\n", b"\r\n")
