"""What keeps a web browser from being turned against the loopback HTTP listeners.

The admin listener and the HTTP API serve loopback clients without a token or
API key when none is configured (the built-in defaults).  Loopback is not only
the operator's own tools: a browser on the same machine, or one whose SSH
tunnel forwards the admin port to it (how the status page is usually looked
at), runs any site's scripts, and two things let such a page act there:

- **Cross-site requests.**  A page elsewhere can make the browser send a
  "simple" POST (a form: no custom header, a form content type) to
  ``http://127.0.0.1:8026/api/admin/drain`` or ``.../bounce?domain=...``.  It
  cannot read the answer, but the drain or the bulk bounce has happened.  The
  browser says where such a request comes from: ``Sec-Fetch-Site`` (every
  current browser) and ``Origin`` (on every cross-origin POST).
  :func:`cross_site` refuses a state-changing request that either marks as
  another site's.  The ``mta`` commands, curl and Prometheus send neither.
  (The HTTP API needs ``Content-Type: application/json`` for what it changes,
  which a page can only send after a CORS preflight that is never granted.)
- **DNS rebinding.**  A name of the attacker's first resolves to its server,
  then to 127.0.0.1: the page is then same-origin with the listener and reads
  and writes as it likes -- but every request names the attacker's host in
  ``Host``.  :func:`rebound` refuses a browser's request (one that carries
  ``Sec-Fetch-Site`` or ``Origin``, as every current browser's fetches and
  POSTs do) whose ``Host`` is not a loopback name.  A program that is not a
  browser may still call the listener by another name of this machine (an
  ``/etc/hosts`` alias): it sends neither header.
"""
from __future__ import annotations

import ipaddress


def _host_part(host: bytes) -> bytes:
    """The host of a ``host[:port]`` value (brackets kept off an IPv6 literal)."""
    host = host.strip()
    if host.startswith(b"["):
        return host[1:host.find(b"]")] if b"]" in host else b""
    if host.count(b":") == 1:
        return host.partition(b":")[0]
    return host


def loopback_host(host: bytes | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback (any port):
    ``localhost`` (and names under it, RFC 6761), 127.0.0.0/8 or ``[::1]``.  No header
    at all is accepted: a browser always sends one (HTTP/1.0 clients may not)."""
    if host is None:
        return True
    name = _host_part(host).rstrip(b".").lower()
    if name == b"localhost" or name.endswith(b".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.decode("ascii")).is_loopback
    except (ValueError, UnicodeDecodeError):
        return False


def cross_site(headers: dict[bytes, bytes]) -> str | None:
    """Why a request (lower-case header names) comes from another site's page, or None.

    ``Sec-Fetch-Site: cross-site`` or ``same-site`` (a page of another origin; a
    user's own typing says ``none``, the status page ``same-origin``), or an
    ``Origin`` that is not the ``Host`` the request went to (``null``: a sandboxed
    or file page)."""
    fetch = headers.get(b"sec-fetch-site", b"").strip().lower()
    if fetch in (b"cross-site", b"same-site"):
        return f"Sec-Fetch-Site: {fetch.decode('latin-1')}"
    origin = headers.get(b"origin")
    if origin is None:
        return None
    origin = origin.strip().lower()
    scheme, sep, rest = origin.partition(b"://")
    host = headers.get(b"host", b"").strip().lower()
    if not sep or not host or rest.rstrip(b"/") != host:
        return f"Origin {origin[:100].decode('latin-1')} is not this listener"
    return None


def rebound(headers: dict[bytes, bytes]) -> str | None:
    """Why a browser's request (lower-case header names) is not for this machine's
    loopback (DNS rebinding), or None: it carries ``Sec-Fetch-Site`` or ``Origin``,
    and its ``Host`` is not a loopback name."""
    if b"sec-fetch-site" not in headers and b"origin" not in headers:
        return None
    host = headers.get(b"host")
    if host is not None and loopback_host(host):
        return None
    return (f"a browser's request for Host {(host or b'(none)')[:100].decode('latin-1')}: "
            "without credentials only 127.0.0.1, [::1] or localhost are served to browsers")
