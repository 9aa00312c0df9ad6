"""Header and body primitives for messages in wire form (leaf library).

Exposes the live implementation of the MIME hot path, ``mta._ext.mime`` or its
pure-Python twin ``mta._pure.mime`` (``MTA_PUREPYTHON=1``), chosen once by
:func:`mta.native.load`.  The API is documented in ``mta/_pure/mime.py``.
Used by the acceptors (Received, Message-ID, From and Subject for the
events, X-MSYS-API), by DKIM and by bounces (the original headers).  No MIME tree is built here: DSN and ARF
parsing off the hot path use the standard library's ``email``.
"""
import email.errors
import email.header
import email.utils

from mta import native

impl = native.load("mime")

FLAG_8BIT = impl.FLAG_8BIT          # scan_body's flags (declared in mta/scancodes.py)
FLAG_LONG_LINE = impl.FLAG_LONG_LINE
FLAG_BARE_LF = impl.FLAG_BARE_LF
FLAG_BARE_CR = impl.FLAG_BARE_CR
FLAG_NUL = impl.FLAG_NUL
MAX_LINE = impl.MAX_LINE

split_message = impl.split_message
parse_headers = impl.parse_headers
iter_headers = impl.iter_headers
find_header = impl.find_header
find_headers = impl.find_headers
find_first = impl.find_first
field_value = impl.field_value
unfold = impl.unfold
insert_header = impl.insert_header
remove_headers = impl.remove_headers
from_domain = impl.from_domain
simple_address = impl.simple_address
scan_body = impl.scan_body
canon_header = impl.canon_header
canon_headers = impl.canon_headers
select_names = impl.select_names
canon_body = impl.canon_body
BodyCanonicalizer = impl.BodyCanonicalizer


def header_block(buf) -> bytes:
    """Return the header block of a message (the fields, without the empty line)."""
    return bytes(buf[: split_message(buf)[0]])


def body_of(buf) -> memoryview:
    """Return a zero-copy view of the body of a message."""
    return memoryview(buf)[split_message(buf)[1]:]


def first_address(value) -> str:
    """The address of the first mailbox of an address field's value (From), '' if none.

    Display names, comments and group syntax are skipped; the address is
    given as written (not lower-cased).  The two common forms ("a@b", "Name
    <a@b>") are decided by ``simple_address`` (compiled: a regular expression's
    two fullmatches cost ~7,000 instructions a message); only other values pay
    for ``email.utils``.
    """
    addr = simple_address(value)
    if addr is not None:
        return addr
    for _name, addr in email.utils.getaddresses([bytes(value).decode("utf-8", "replace")]):
        if "@" in addr:
            return addr
    return ""


def header_text(value) -> str:
    """An unstructured field's value (Subject) as text: RFC 2047 encoded words decoded.

    Raw UTF-8 (RFC 6532) is taken as it is; undecodable octets, unknown
    charsets and malformed encoded words are kept or replaced, never raised.
    Only a value that contains ``=?`` is given to ``email.header``.
    """
    text = bytes(value).decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text


__all__ = [
    "FLAG_8BIT", "FLAG_LONG_LINE", "FLAG_BARE_LF", "FLAG_BARE_CR", "FLAG_NUL", "MAX_LINE",
    "split_message", "parse_headers", "iter_headers", "find_header", "find_headers", "find_first",
    "field_value", "unfold", "insert_header", "remove_headers", "from_domain",
    "scan_body", "canon_header", "canon_headers", "select_names", "canon_body", "BodyCanonicalizer",
    "header_block", "body_of", "first_address", "header_text", "impl",
]
