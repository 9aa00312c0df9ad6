"""The template renderer's kernel (pure-Python twin).

The readable specification of ``mta._ext.render``: both have the same public
API and results, and tests/test_render.py runs the same cases (and random
ones) through both.  :func:`render` is the inner loop of
:meth:`mta.api.build.Template.render` for the templates made of text and
plain substitutions (``{{ a.b }}``, ``{{{ a }}}``, a value in a link): no
statements, no defaults, no indexes, no dynamic content (mta.api.build renders
those itself).
"""
from __future__ import annotations

import re
from html import escape
from urllib.parse import quote

# what a value in a link is written with: RFC 3986's unreserved characters as they are,
# every other octet %XX (quote(value, safe=""))
_URL_UNSAFE = re.compile(r"[^A-Za-z0-9_.~-]")
_URL_TABLE = {c: f"%{c:02X}" if _URL_UNSAFE.match(chr(c)) else chr(c) for c in range(128)}


class TooLarge(Exception):
    """A recipient's message would pass the builder's size bound (http.max_message_size)."""


def octets(value: str) -> int:
    """*value*'s length in octets as the message has it: UTF-8, a surrogate U+DC80 to
    U+DCFF 1 (an octet that was not UTF-8, "surrogateescape"), another 3."""
    if value.isascii():     # (a flag of the str)
        return len(value)
    data = value.encode("utf-8", "surrogatepass")
    # (U+DC80 to U+DCFF are ED B2 xx and ED B3 xx: ED leads only U+D000 to U+DFFF)
    return len(data) - 2 * (data.count(b"\xed\xb2") + data.count(b"\xed\xb3"))


def render(parts: list, scopes: tuple, html: bool, links: bool, limit: int, n: int,
           text_of) -> str:
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
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
            continue
        path, raw = p
        value = None
        head = path[0]
        for scope in scopes:
            if head in scope:
                value = scope[head]
                for name in path[1:]:
                    if isinstance(value, dict) and name in value:
                        value = value[name]
                    else:
                        value = None
                        break
                break
        value = text_of(value)
        if raw == 2 and links:
            if _URL_UNSAFE.search(value) is not None:
                value = value.translate(_URL_TABLE) if value.isascii() else \
                    quote(value, safe="")
        elif html and raw != 1:
            value = escape(value)
        out.append(value)
        n += octets(value)
        if limit and n > limit:
            raise TooLarge(n)
    return "".join(out)
