"""SMTP client reply reader: whole one-line replies in one read (pure-Python twin).

This is the readable specification of ``mta._ext.reply``; both modules have
the same public API and results, and the same tests run against both
(tests/test_reply.py).

The delivery client's :class:`mta.delivery.client.ReplyParser` hands a read
here first when it holds nothing of an earlier read: the usual arrival is
whole one-line replies, CRLF-ended (pipelined MAIL, RCPT and DATA answered at
once, with the previous message's final reply).  Anything else -- a
continuation line ("250-"), a bare LF, a line without a three-digit code
2xx-5xx, an empty line, data not ending in CRLF, data of another type than
bytes -- gives None, and the parser's general path (line by line through its
buffer) reads the same octets; it must give the same replies this does.

``parts(line)`` is ``(code, enhanced, text)`` of one reply line (CR LF
removed, checked by the caller): ``code`` the int of its three digits;
``text`` the octets after the code and its separator (a space or a hyphen;
right after the code when neither follows it: "550User unknown" keeps all of
its text); ``enhanced`` the RFC 3463 status opening ``text`` ("5.1.1",
followed by a space or the end of the line, its class the reply's: "4.1.1" on
a 550 is text), which is then cut from ``text``, or None.  ``text`` is
decoded as UTF-8 with U+FFFD for what is not.

``one_line_replies(data, make, cache, cache_max, cache_line)`` is the list of
``make(code, enhanced, text)`` for the replies of *data*, or None (see
above).  *cache* maps a line's octets to its parts: a server says the same
few lines again and again ("250 2.1.0 Ok" to every MAIL).  A line of at most
*cache_line* octets is remembered; when *cache* holds *cache_max* lines, it
is emptied first.  Each reply is a new object, made by *make*.
"""
import re

# "5.1.1 " at the start of a reply's text (RFC 3463: class.subject.detail).
_ENHANCED = re.compile(rb"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


def parts(line: bytes) -> tuple[int, str | None, str]:
    """(code, enhanced, text) of one reply line (see the module's docstring)."""
    if type(line) is not bytes or len(line) < 3 or not line[:3].isdigit():
        raise ValueError("a reply line begins with three digits")
    code = int(line[:3])
    text = line[4:] if line[3:4] in (b" ", b"-") else line[3:]
    m = _ENHANCED.match(text)
    if m is None or m.group(1)[0] != 0x30 + code // 100:
        return code, None, text.decode("utf-8", "replace")
    prefix = m.group(0)
    return code, prefix.rstrip().decode("ascii"), text[len(prefix):].decode("utf-8", "replace")


def one_line_replies(data, make, cache: dict, cache_max: int, cache_line: int):
    """The replies of *data* when it is whole one-line replies, else None."""
    if type(data) is not bytes or data[-2:] != b"\r\n":
        return None
    out = []
    for line in data[:-2].split(b"\r\n"):
        if len(line) < 3 or line[3:4] == b"-" or line.find(b"\n") >= 0 or \
                not (0x32 <= line[0] <= 0x35) or not line[:3].isdigit():
            return None
        got = cache.get(line)
        if got is None:
            got = parts(line)
            if len(line) <= cache_line:
                if len(cache) >= cache_max:
                    cache.clear()
                cache[line] = got
        out.append(make(*got))
    return out
