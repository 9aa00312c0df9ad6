"""Internationalised domain names in mail addresses (RFC 5890, UTS #46): leaf library.

One check for every place a domain comes in or goes out, so that what the acceptor
takes is what delivery can route:

- :func:`normalize_domain`: a domain's ASCII form -- A-labels (``bücher.example`` ->
  ``xn--bcher-kva.example``, UTS #46 mapping, IDNA 2008), lower case, no final dot --
  or None when it is not a valid one (LDH labels of 1-63 octets, at most 253 octets,
  a TLD that is not all digits).  The resolver looks names up in this form.
- :func:`domain_problem`: why an address's domain is not an internationalised name
  that can be routed (bad punycode, a disallowed code point, a label too long once
  encoded), or None.  A plain ASCII name without an ``xn--`` label is not looked at
  (the callers' own syntax check covers it): the common case costs an ``isascii`` and
  two substring tests, no IDNA work.
- :func:`ascii_address`: an address in the all-ASCII form a server without SMTPUTF8
  takes (its domain in A-labels), or None when it has none (a UTF-8 local part:
  RFC 6530 has no ASCII equivalent for it).

The IDNA encoding of a name (~14 us) is made once per name (a bounded cache,
IDNA_CACHE names): an HTTP transmission asks about each recipient's domain three
times (its check, its To field, our Received field), a list of thousands at one
U-label domain would otherwise cost tens of microseconds a recipient.

Reads and writes nothing; imports only ``idna``.
"""
from __future__ import annotations

import functools
import re

import idna

MAX_NAME_OCTETS = 253  # RFC 1035, without the final dot
MAX_LABEL_OCTETS = 63
IDNA_CACHE = 4096      # names whose IDNA encoding is kept (least recently used dropped)

_LDH_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_ALL_DIGITS = re.compile(r"[0-9]+")


def normalize_domain(domain: str) -> str | None:
    """The ASCII (A-label), lower-case form of a domain without its final dot, or None if invalid."""
    if not isinstance(domain, str):
        return None
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        return None
    if name.isascii():
        name = name.lower()
        # fast path: plain LDH names (no idna work); xn-- labels still get checked
        if "xn--" not in name:
            ok = _LDH_NAME.fullmatch(name) is not None
            return name if ok and _tld_ok(name) and len(name) <= MAX_NAME_OCTETS else None
    name = _encoded(name)[0]
    if name is None:
        return None
    name = name.lower()
    if len(name) > MAX_NAME_OCTETS or _LDH_NAME.fullmatch(name) is None or not _tld_ok(name):
        return None
    return name


@functools.lru_cache(maxsize=IDNA_CACHE)
def _encoded(name: str) -> tuple[str | None, str]:
    """(*name* in A-labels as UTS #46 / IDNA 2008 make it, or None; why not)."""
    try:
        return idna.encode(name, uts46=True).decode("ascii"), ""
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        return None, str(exc)


def alabels(name: str) -> str | None:
    """*name* in A-labels as UTS #46 / IDNA 2008 make it (not lower-cased, no LDH or
    length check: :func:`normalize_domain` for those), or None when IDNA cannot encode
    it.  Cached, as every question here."""
    return _encoded(name)[0]


def _tld_ok(name: str) -> bool:
    return _ALL_DIGITS.fullmatch(name.rsplit(".", 1)[-1]) is None


def domain_problem(domain: str) -> str | None:
    """Why *domain* (of an address) is not a valid internationalised name, or None.

    Only a name with a non-ASCII character or an ``xn--`` label (any case) is
    checked; an address literal and any other ASCII name are the caller's to judge.
    The text is for an API error or a log ("... is not ..."), not for an SMTP reply.
    """
    if domain.isascii() and "n--" not in domain and "N--" not in domain:
        return None                 # (the common case: no IDNA work)
    if domain[:1] == "[" or normalize_domain(domain) is not None:
        return None
    name = domain[:-1] if domain.endswith(".") else domain
    alabels, why = _encoded(name)
    if alabels is None:
        return f"is not a valid internationalised domain name ({why})"
    if len(alabels) > MAX_NAME_OCTETS:
        return f"is longer than {MAX_NAME_OCTETS} octets in its A-label form"
    return "is not a valid domain name in its A-label form (" + alabels + ")"


def ascii_address(address: str) -> str | None:
    """*address* with its domain in A-labels (``jo@bücher.example`` ->
    ``jo@xn--bcher-kva.example``), as it is when already ASCII; None when there is
    no all-ASCII form (a UTF-8 local part, a domain that is not a valid IDN)."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    ascii_domain = normalize_domain(domain)
    return None if ascii_domain is None else f"{local}@{ascii_domain}"
