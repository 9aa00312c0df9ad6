"""MIME header and body primitives: the readable twin of ``ext/mime.pyx``.

A message is a bytes-like object holding an RFC 5322 message as it travels
over SMTP: a header block, an empty line, a body.  Lines end in CRLF; a bare
LF is accepted everywhere as a line end too (HTTP injection and files), and is
treated as CRLF by the DKIM canonicalisations, as it will be on the wire.
Nothing here builds a MIME tree or decodes anything: every function works on
offsets into the caller's buffer and copies only what it returns.

Public API (identical in ``mta._ext.mime`` and ``mta._pure.mime``)::

    split_message(buf) -> (header_end, body_start)
        Offsets of the end of the header block (after the last field's line
        end) and of the start of the body (after the empty line).  A message
        without an empty line is all header: both are len(buf).

    parse_headers(buf, end=-1) -> list[(name, raw, start, end)]
        Every field of the header block (up to ``end``, default: found with
        split_message) in order.  ``raw`` is buf[start:end]: the whole field,
        folded lines and final line end included.  ``name`` is the bytes
        before the colon, as written (trailing WSP dropped); a line that has
        no colon yields name b"".
    iter_headers(buf) -> iterator over the same tuples.

    find_header(buf, name) -> bytes | None
        Value of the first field called ``name`` (bytes or str, compared
        case-insensitively), unfolded and trimmed of surrounding WSP.
    find_headers(buf, name) -> list[bytes]      every such value, in order.
    find_first(buf, names) -> list[bytes | None]
        For each of ``names``, in their order, the value find_header gives
        (None: no such field), from one pass over the header block that
        stops once every name is found.
    field_value(raw) -> bytes                   the value of one raw field.
    unfold(value) -> bytes                      drop line breaks (CRLF or LF).

    insert_header(buf, field, index=0) -> bytes
        A new message with ``field`` (one field, its line end optional: the
        message's own line end is used if missing) placed before the
        index-th field; index=-1 places it after the last field.  Every
        other byte is kept as it was.
    remove_headers(buf, name) -> bytes
        A new message without any field called ``name`` (the same object when
        there is none).

    from_domain(buf) -> str | None
        Lower-cased domain of the first address of the first From field
        (comments, quoted strings, display names and group syntax skipped);
        None when there is no From or no address in it.

    simple_address(value) -> str | None
        The address of an address field's value (From) in one of the two
        forms nearly every one takes: ``a@b`` and ``Name <a@b>`` (a display
        name without quotes or comments, blanks after the ">"), where the
        address is one "@" between runs of octets other than whitespace and
        ``<>()[]",;:@``; decoded as UTF-8 with U+FFFD for what is not.  None
        for any other value (``mta.mime.first_address`` then asks
        ``email.utils``).

    scan_body(buf, start=0, max_line=998) -> int
        Flags for buf[start:]: FLAG_8BIT (a byte >= 0x80), FLAG_LONG_LINE (a
        line longer than max_line octets, line end excluded), FLAG_BARE_LF,
        FLAG_BARE_CR, FLAG_NUL.  0 means 7-bit clean with short CRLF lines.
        The flags are declared in ``mta/scancodes.py``: one bit layout with
        the SMTP scanner's.

    canon_header(raw, relaxed) -> bytes
        DKIM canonical form of one field (RFC 6376 3.4.1/3.4.2), ending in
        CRLF.  simple: the field with bare LFs made CRLF; relaxed: lower-case
        name, ':', value unfolded with WSP runs made one SP and trimmed.
    select_names(fields, wanted) -> list[bytes]
        Lower-case names of the fields (parse_headers' list), in order, that
        are in the set ``wanted``: the h= list of the fields a signer signs.
    canon_headers(fields, names, relaxed) -> bytes
        The header part of a DKIM hash input: for each name of an h= list
        (lower-case bytes), the lowest field of that name not used yet
        (RFC 6376 5.4.2), canonicalised; a name with no field left adds
        nothing (over-signing).  ``fields`` is parse_headers' list.

    canon_body(body, relaxed) -> bytes
    BodyCanonicalizer(relaxed, sink=None)
        .update(chunk)   feed the next piece of the body (any split point);
        .finish() -> bytes
        .length          canonical octets produced so far.
        DKIM body canonicalisation (RFC 6376 3.4.3/3.4.4), streaming.  With a
        ``sink`` (a callable such as ``hashlib.sha256().update``) canonical
        bytes are handed to it as they are ready and finish() returns b"";
        without one they are kept and finish() returns them all.  Empty lines
        are held back until a non-empty line follows, so trailing ones vanish.
        A body that does not end with a line end is canonicalised as if CRLF
        were appended, which is what SMTP transmission does.

Differences from dkimpy's canonicalisation, on input dkimpy does not handle
the RFC's way: dkimpy keeps WSP at the end of a final line that has no line
end (relaxed) and strips every kind of Python whitespace (VT, FF, a lone CR)
from the ends of header values, where the RFC says WSP (SP, HTAB) only.
"""

import re

from mta.scancodes import FLAG_8BIT, FLAG_BARE_CR, FLAG_BARE_LF, FLAG_LONG_LINE, FLAG_NUL

MAX_LINE = 998  # octets, line end excluded (RFC 5322 2.1.1)

_CR = 13
_LF = 10
_SP = 32
_HT = 9
_WSP = (b" ", b"\t")


def _name_bytes(name):
    if isinstance(name, str):
        return name.encode("ascii")
    return bytes(name)


def split_message(buf):
    """Return (header_end, body_start) offsets of a message."""
    n = len(buf)
    pos = 0
    while pos < n:
        c = buf[pos]
        if c == _LF:
            return pos, pos + 1
        if c == _CR and pos + 1 < n and buf[pos + 1] == _LF:
            return pos, pos + 2
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return n, n
        pos = nl + 1
    return n, n


def _field_name(line):
    colon = line.find(b":")
    if colon < 0:
        return b""
    return line[:colon].rstrip(b" \t")


def parse_headers(buf, end=-1):
    """Return [(name, raw, start, end)] for every field of the header block."""
    buf = bytes(buf)
    if end < 0:
        end = split_message(buf)[0]
    elif end > len(buf):
        end = len(buf)      # an end past the buffer: the whole buffer (as the compiled module)
    fields = []
    pos = 0
    while pos < end:
        start = pos
        nl = buf.find(b"\n", pos, end)
        first_end = end if nl < 0 else nl + 1
        pos = first_end
        # continuation lines start with WSP
        while pos < end and buf[pos] in (_SP, _HT):
            nl = buf.find(b"\n", pos, end)
            pos = end if nl < 0 else nl + 1
        name = _field_name(buf[start:first_end])
        fields.append((name, buf[start:pos], start, pos))
    return fields


def iter_headers(buf):
    """Iterate over (name, raw, start, end) for every field of the header block."""
    return iter(parse_headers(buf))


def unfold(value):
    """Return value with its line breaks (CRLF or LF) removed."""
    return bytes(value).replace(b"\r\n", b"").replace(b"\n", b"")


def field_value(raw):
    """Return the unfolded value of one raw field, trimmed of WSP."""
    raw = bytes(raw)
    colon = raw.find(b":")
    value = raw[colon + 1:] if colon >= 0 else raw
    return unfold(value).strip(b" \t")


def _same_name(fname, raw, name):
    """Field (fname, raw) is called *name*; a line without a colon is called nothing."""
    if len(fname) != len(name) or fname.lower() != name.lower():
        return False
    return bool(fname) or b":" in raw.partition(b"\n")[0]


def find_headers(buf, name):
    """Return the values of every field called name, in order."""
    name = _name_bytes(name)
    return [field_value(raw) for fname, raw, _s, _e in parse_headers(buf) if _same_name(fname, raw, name)]


def find_header(buf, name):
    """Return the value of the first field called name, or None."""
    name = _name_bytes(name)
    for fname, raw, _s, _e in parse_headers(buf):
        if _same_name(fname, raw, name):
            return field_value(raw)
    return None


def find_first(buf, names):
    """Return, for each of names, the value of its first field or None (one pass)."""
    wanted = [_name_bytes(n) for n in names]
    out = [None] * len(wanted)
    left = len(wanted)
    if not left:
        return out
    for fname, raw, _s, _e in parse_headers(buf):
        for i, name in enumerate(wanted):
            if out[i] is None and _same_name(fname, raw, name):
                out[i] = field_value(raw)
                left -= 1
        if not left:
            break
    return out


def _line_end(buf):
    nl = buf.find(b"\n")
    if nl > 0 and buf[nl - 1] == _CR:
        return b"\r\n"
    if nl >= 0:
        return b"\n"
    return b"\r\n"


def insert_header(buf, field, index=0):
    """Return a new message with field placed before the index-th field."""
    buf = bytes(buf)
    field = bytes(field)
    eol = _line_end(buf)
    if not field.endswith(b"\n"):
        field += eol
    header_end = split_message(buf)[0]
    fields = parse_headers(buf, header_end)
    if index < 0 or index >= len(fields):
        at = header_end
    else:
        at = fields[index][2]
    if at > 0 and buf[at - 1] != _LF:
        # the last field has no line end (a message that is all header)
        field = eol + field
    return buf[:at] + field + buf[at:]


def remove_headers(buf, name):
    """Return a new message without the fields called name."""
    name = _name_bytes(name)
    fields = parse_headers(buf)
    gone = [(s, e) for fname, raw, s, e in fields if _same_name(fname, raw, name)]
    if not gone:
        return buf
    buf = bytes(buf)
    parts = []
    pos = 0
    for s, e in gone:
        parts.append(buf[pos:s])
        pos = e
    parts.append(buf[pos:])
    return b"".join(parts)


def _address_domain(value):
    """Return the domain of the first address in an address-list value."""
    n = len(value)
    i = 0
    plain = bytearray()  # top-level text of the current mailbox
    while i < n:
        c = value[i]
        if c == 0x22:  # '"' quoted string: skipped (display name or local part)
            i += 1
            while i < n and value[i] != 0x22:
                i += 2 if value[i] == 0x5C else 1
            plain += b'""'
            i += 1
            continue
        if c == 0x28:  # '(' comment, may nest
            depth = 1
            i += 1
            while i < n and depth:
                d = value[i]
                if d == 0x5C:
                    i += 1
                elif d == 0x28:
                    depth += 1
                elif d == 0x29:
                    depth -= 1
                i += 1
            continue
        if c == 0x3C:  # '<' angle-addr: this is the address
            close = value.find(b">", i + 1)
            addr = value[i + 1:] if close < 0 else value[i + 1:close]
            return _domain_of(addr)
        if c == 0x3A:  # ':' group name ends; its mailboxes follow
            plain = bytearray()
        elif c in (0x2C, 0x3B):  # ',' or ';' ends the first mailbox
            if plain.strip(b" \t\r\n"):
                return _domain_of(bytes(plain))
            plain = bytearray()
        else:
            plain.append(c)
        i += 1
    return _domain_of(bytes(plain))


def _domain_of(addr):
    at = addr.rfind(b"@")
    if at < 0:
        return None
    dom = addr[at + 1:]
    # drop comments and whitespace inside the domain
    out = bytearray()
    depth = 0
    for c in dom:
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            if depth:
                depth -= 1
        elif depth == 0 and c not in (_SP, _HT, _CR, _LF, 0x3E):
            out.append(c)
    if not out:
        return None
    return bytes(out).lower().decode("utf-8", "surrogateescape")


_ADDR = rb"[^\s<>()\[\]\",;:@]+@[^\s<>()\[\]\",;:@]+"
_BARE = re.compile(_ADDR)
_NAMED = re.compile(rb"[^\"<(]*<(" + _ADDR + rb")>[ \t]*")


def simple_address(value):
    v = bytes(value)
    if _BARE.fullmatch(v):
        return v.decode("utf-8", "replace")
    m = _NAMED.fullmatch(v)
    if m is not None:
        return m.group(1).decode("utf-8", "replace")
    return None


def from_domain(buf):
    """Return the lower-cased domain of the RFC 5322 From address, or None."""
    for fname, raw, _s, _e in parse_headers(buf):
        if _same_name(fname, raw, b"from"):
            return _address_domain(field_value(raw))
    return None


def scan_body(buf, start=0, max_line=MAX_LINE):
    """Return FLAG_8BIT|FLAG_LONG_LINE|FLAG_BARE_LF|FLAG_BARE_CR|FLAG_NUL for buf[start:]."""
    buf = bytes(buf)
    flags = 0
    n = len(buf)
    if start < 0:
        start = 0           # as the compiled module: not an index from the end
    line_start = start
    i = start
    while i < n:
        c = buf[i]
        if c >= 0x80:
            flags |= FLAG_8BIT
        elif c == _LF:
            length = i - line_start
            if i > start and buf[i - 1] == _CR:
                length -= 1
            else:
                flags |= FLAG_BARE_LF
            if length > max_line:
                flags |= FLAG_LONG_LINE
            line_start = i + 1
        elif c == _CR:
            if i + 1 >= n or buf[i + 1] != _LF:
                flags |= FLAG_BARE_CR
        elif c == 0:
            flags |= FLAG_NUL
        i += 1
    if n - line_start > max_line:
        flags |= FLAG_LONG_LINE
    return flags


def _crlf(data):
    """Make every line end CRLF (bare LF gets its CR)."""
    if b"\n" not in data:
        return data
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out


def _compress_wsp(data):
    out = bytearray()
    in_wsp = False
    for c in data:
        if c == _SP or c == _HT:
            if not in_wsp:
                out.append(_SP)
                in_wsp = True
        else:
            out.append(c)
            in_wsp = False
    return bytes(out)


def canon_header(raw, relaxed):
    """Return the DKIM canonical form of one raw header field, ending in CRLF."""
    raw = bytes(raw)
    if not relaxed:
        # a bare CR before the final LF stays a CR: "\r\r\n" is CR + CRLF
        if raw.endswith(b"\n"):
            body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        else:
            body = raw
        return _crlf(body) + b"\r\n"
    colon = raw.find(b":")
    if colon < 0:
        name, value = raw, b""
    else:
        name, value = raw[:colon], raw[colon + 1:]
    name = name.lower().rstrip(b" \t")
    value = _compress_wsp(unfold(value)).strip(b" \t")
    return name + b":" + value + b"\r\n"


def select_names(fields, wanted):
    """Return the lower-case names of fields, in order, that are in wanted (a set)."""
    return [n for n in (bytes(f[0]).lower() for f in fields) if n and n in wanted]


def canon_headers(fields, names, relaxed):
    """Return the canonical header data a DKIM h= list selects from fields."""
    by_name = {}
    for fname, raw, _s, _e in fields:
        by_name.setdefault(fname.lower(), []).append(raw)
    out = []
    for name in names:
        stack = by_name.get(bytes(name).lower())
        if stack:
            out.append(canon_header(stack.pop(), relaxed))
    return b"".join(out)


class BodyCanonicalizer:
    """Streaming DKIM body canonicalisation (simple or relaxed)."""

    def __init__(self, relaxed, sink=None):
        self._relaxed = bool(relaxed)
        self._sink = sink
        self._kept = []
        self._pending_nl = 0  # line ends since the last content byte
        self._pending_sp = False  # relaxed: WSP seen since the last content byte
        self._pending_cr = False  # a CR that ended the last chunk
        self._content = False  # any content emitted at all
        self.length = 0

    def _emit(self, data):
        if not data:
            return
        self.length += len(data)
        if self._sink is not None:
            self._sink(data)
        else:
            self._kept.append(data)

    def update(self, chunk):
        """Canonicalise the next piece of the body."""
        relaxed = self._relaxed
        out = bytearray()
        pending_nl = self._pending_nl
        pending_sp = self._pending_sp
        data = bytes(chunk)
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        n = len(data)
        i = 0
        while i < n:
            c = data[i]
            if c == _LF:
                pending_nl += 1
                pending_sp = False
                i += 1
                continue
            if c == _CR:
                if i + 1 == n:
                    self._pending_cr = True  # decided by the next chunk
                    break
                if data[i + 1] == _LF:
                    pending_nl += 1
                    pending_sp = False
                    i += 2
                    continue
                # a bare CR is content
            elif relaxed and (c == _SP or c == _HT):
                pending_sp = True
                i += 1
                continue
            # content byte
            if pending_nl:
                out += b"\r\n" * pending_nl
                pending_nl = 0
            if pending_sp:
                out.append(_SP)
                pending_sp = False
            out.append(c)
            self._content = True
            i += 1
        self._pending_nl = pending_nl
        self._pending_sp = pending_sp
        self._emit(bytes(out))

    def finish(self):
        """End the body; return the kept output (b"" when a sink was given)."""
        if self._pending_cr:
            self._pending_cr = False
            out = b"\r\n" * self._pending_nl
            if self._pending_sp:
                out += b" "
            self._pending_nl = 0
            self._pending_sp = False
            self._content = True
            self._emit(out + b"\r")
        if self._content or not self._relaxed:
            self._emit(b"\r\n")
        self._pending_nl = 0
        self._pending_sp = False
        kept = b"".join(self._kept)
        self._kept = []
        return kept


def canon_body(body, relaxed):
    """Return the DKIM canonical form of a whole body."""
    c = BodyCanonicalizer(relaxed)
    c.update(body)
    return c.finish()
