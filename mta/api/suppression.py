"""SparkPost's suppression-list API (``/api/v1/suppression-list``) over :mod:`mta.feedback.suppression`.

No sockets: :func:`handle` takes the request's method, path, query and body
and returns (status, body) or raises :class:`~mta.api.replies.ApiError`; the
HTTP server (:mod:`mta.acceptor.http`) routes here and authorizes the caller
as for transmissions.

Calls (SparkPost's shapes and messages):

- ``PUT /api/v1/suppression-list`` ``{"recipients": [...]}``: at most
  MAX_BULK entries, each ``recipient`` (or the deprecated ``email``) and
  ``type`` (or the deprecated booleans ``transactional`` /
  ``non_transactional``; both true: two records), optional ``description``.
  All or nothing: nothing is written when an entry is bad.  Malformed
  recipients are SparkPost's 400 "PUT body contains N invalid or malformed
  recipient(s): a, b" (all of them named; the description names the first
  one's field); a bad or missing type is its 400 "Type must be one of: ..." /
  "Must supply a suppression type", as on the single PUT.
- ``PUT /api/v1/suppression-list/{recipient}``: ``type`` or the booleans,
  ``description``.
- ``GET /api/v1/suppression-list/{recipient}[?types=]``: its records (one
  per type); 404 "Recipient could not be found".
- ``DELETE /api/v1/suppression-list/{recipient}``: optional body
  ``{"type": ...}`` (none: both types); 204; 404 when there was none; 403
  for a Compliance entry.
- ``GET /api/v1/suppression-list?from&to&types&sources&domain&description&
  description_strict&sort&per_page|limit&page|cursor``: search by updated
  time, newest first unless ``sort=asc``; ``page`` up to MAX_PAGED results,
  past that ``cursor=initial`` and the ``next`` link; lists as repeated keys,
  comma-separated or ``types[0]=``.
- ``GET /api/v1/suppression-list/summary``: records per source and total.

The recipient in the path is percent-decoded (``+`` stays a plus: the
official clients put addresses in the path unencoded).  Errors that SparkPost
documents keep its status and message (400 for the PUT errors above, an
invalid ``from``/``to`` date and ``list_id``); other bad input is 422
(``invalid data format/type``, code 1300); every error's description names
the field; a full list is 507.  Entries added here get the source "Manually Added"; list-specific
entries (``list_id``) and subaccounts are not supported (a ``list_id`` in a
PUT is a 422; ``X-MSYS-SUBACCOUNT`` is ignored).  A search or DELETE with
``list_id=x`` asks for that list's entries, so it finds none (an empty page,
404) and never touches the account-level entries; ``list_id=`` (empty) is the
account-level entries, i.e. all of them; a malformed id is 400 "invalid
list_id".  A ``domain`` searched for in U-labels is matched in A-labels, the
form the list keeps.
"""
from __future__ import annotations

import datetime
import re
import urllib.parse

import orjson

from mta.api import replies as R
from mta.feedback import suppression as S

PATH = b"/api/v1/suppression-list"
MAX_BULK = 10_000          # entries in one bulk PUT (SparkPost's limit)
MAX_PER_PAGE = 10_000
DEFAULT_PER_PAGE = 1000
MAX_PAGED = 10_000         # results reachable with page=; beyond, cursor paging

NOT_FOUND = R.Error(404, "Recipient could not be found", "1600")
COMPLIANCE = R.Error(403, "Recipient could not be removed - Compliance", "1100")
FULL = R.Error(507, "Unable to update suppression list", "1902")
BAD_METHOD = R.Error(405, "invalid HTTP method", "1102")
BAD_LIST_ID = R.Error(400, "invalid list_id", "1300")
BAD_TYPE = R.Error(400, "Type must be one of: 'transactional', 'non_transactional'", "1300")
NO_TYPE = R.Error(400, "Must supply a suppression type", "1400")

# SparkPost's list_id: RFC 2919-style, alphanumerics, "-", "_" and "." without a
# leading, trailing or doubled dot, 1-255 characters
_LIST_ID = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def matches(path: bytes) -> bool:
    return path == PATH or path.startswith(PATH + b"/")


def _json(status: int, obj) -> tuple[int, bytes]:
    return status, orjson.dumps(obj)


def _message(text: str) -> tuple[int, bytes]:
    return _json(200, {"results": {"message": text}})


def handle(store: S.SuppressionList, method: bytes, path: bytes, query: bytes, body: bytes,
           max_scan: int = S.MAX_SCAN, max_seconds: float | None = None) -> tuple[int, bytes]:
    """Answer one request under PATH: (status, JSON body; b"" for 204) or ApiError.
    *max_scan*, *max_seconds*: a search's bounds (SuppressionList.search)."""
    rest = path[len(PATH):].strip(b"/")
    q = _query(query)
    if not rest:
        if method == b"GET":
            return search(store, q, max_scan, max_seconds)
        if method == b"PUT":
            return bulk(store, _body(body))
        raise R.ApiError(BAD_METHOD, f"{method.decode('latin-1')} is not allowed on "
                         "/api/v1/suppression-list; use GET or PUT", allow="GET, PUT")
    try:
        recipient = urllib.parse.unquote_to_bytes(rest).decode("utf-8")
    except UnicodeDecodeError:
        raise R.ApiError(R.INVALID, "recipient: the path's address is not valid UTF-8") \
            from None
    if recipient == "summary" and method == b"GET":
        return _json(200, {"results": store.summary()})
    if method == b"GET":
        types = _types(q, "types")
        found = store.get(_address(recipient, "recipient"), types)
        if not found:
            raise R.ApiError(NOT_FOUND, f"{recipient[:320]} is not on the suppression list")
        return _json(200, {"results": found, "links": [], "total_count": len(found)})
    if method == b"PUT":
        doc = _body(body)
        if not isinstance(doc, dict):
            raise R.ApiError(R.INVALID, "body: expected a JSON object")
        tbits, desc = _entry_fields(doc, "")
        store_put(store, [(_address(recipient, "recipient"), tbits, desc)])
        return _message("Suppression list successfully updated")
    if method == b"DELETE":
        if _list_specific(q):
            # (no list-specific entry is kept, so that list has none of this recipient;
            # the account-level entry is not that list's and stays)
            raise R.ApiError(NOT_FOUND, f"{recipient[:320]} is not on that list")
        tbits = S.BOTH
        if body.strip():
            doc = _body(body)
            if not isinstance(doc, dict):
                raise R.ApiError(R.INVALID, "body: expected a JSON object")
            if doc.get("type") is not None:
                tbits = _type_name(doc["type"], "type")
        address = _address(recipient, "recipient")
        found = store.get(address, tbits)
        if not found:
            raise R.ApiError(NOT_FOUND, f"{recipient[:320]} is not on the suppression list")
        if any(e["source"] == "Compliance" for e in found):
            raise R.ApiError(COMPLIANCE, "a Compliance entry cannot be removed")
        store.delete(address, tbits)
        return 204, b""
    raise R.ApiError(BAD_METHOD, f"{method.decode('latin-1')} is not allowed on "
                     "/api/v1/suppression-list/{recipient}; use GET, PUT or DELETE",
                     allow="GET, PUT, DELETE")


def store_put(store: S.SuppressionList, items: list) -> int:
    try:
        return store.put_many(items, S.MANUAL)
    except S.ListFull as exc:
        raise R.ApiError(FULL, str(exc)) from None


def bulk(store: S.SuppressionList, doc) -> tuple[int, bytes]:
    if not isinstance(doc, dict):
        raise R.ApiError(R.INVALID, "body: expected a JSON object with recipients")
    rcpts = doc.get("recipients")
    if not isinstance(rcpts, list):
        raise R.ApiError(R.REQUIRED, "recipients: an array of entries is required")
    if len(rcpts) > MAX_BULK:
        raise R.ApiError(R.INVALID, f"recipients: {len(rcpts)} entries; at most {MAX_BULK} "
                         "in one request")
    # Every malformed recipient first, named in one 400 as SparkPost does (the
    # description names the first one's field); then each entry's other fields.
    bad: list[str] = []
    first = None
    addresses = []
    for i, e in enumerate(rcpts):
        addr = e.get("recipient", e.get("email")) if isinstance(e, dict) else None
        try:
            if addr is None:
                where = f"recipients[{i}]"
                raise R.ApiError(R.REQUIRED, f"{where}.recipient is required"
                                 if isinstance(e, dict) else f"{where}: expected an object")
            addresses.append(_address(addr, "recipients[%d].recipient", i))
        except R.ApiError as exc:
            bad.append(addr[:320] if isinstance(addr, str) and addr.strip()
                       else f"recipients[{i}]")
            first = first or exc
    if bad:
        shown = ", ".join(bad[:20]) + (", ..." if len(bad) > 20 else "")
        raise R.ApiError(R.Error(400, f"PUT body contains {len(bad)} invalid or malformed "
                                 f"recipient(s): {shown}", first.error.code),
                         first.description)
    items = []
    for i, (e, address) in enumerate(zip(rcpts, addresses)):
        tbits, desc = _entry_fields(e, "recipients[%d]." % i)
        items.append((address, tbits, desc))
    store_put(store, items)
    return _message("Suppression List successfully updated")


def _entry_fields(e: dict, where: str) -> tuple[int, str]:
    """(type bits, description) of an entry: ``type`` or the deprecated booleans."""
    if e.get("list_id"):
        raise R.ApiError(R.INVALID, f"{where}list_id: list-specific entries are not supported")
    t = e.get("type")
    if t is not None:
        tbits = _type_name(t, where + "type")
    else:
        tbits = 0
        for name, bit in S.TYPES.items():
            v = e.get(name)
            if v is None:
                continue
            if not isinstance(v, bool):
                raise R.ApiError(R.INVALID, f"{where}{name}: expected true or false")
            if v:
                tbits |= bit
        if not tbits:
            raise R.ApiError(NO_TYPE, f"{where}type: Must supply a suppression type "
                             "(type, or transactional / non_transactional: true)")
    desc = e.get("description")
    if desc is None:
        desc = ""
    elif not isinstance(desc, str):
        raise R.ApiError(R.INVALID, f"{where}description: expected a string")
    elif len(desc) > S.MAX_DESCRIPTION:
        raise R.ApiError(R.INVALID, f"{where}description: longer than {S.MAX_DESCRIPTION} "
                         "characters")
    return tbits, desc


def _type_name(t, where: str) -> int:
    bit = S.TYPES.get(t) if isinstance(t, str) else None
    if bit is None:
        raise R.ApiError(BAD_TYPE, f"{where}: Type must be one of: 'transactional', "
                         "'non_transactional'")
    return bit


# a character an address may not hold: white space (str.isspace's set) or a control
_NOT_IN_ADDRESS = re.compile(r"[\s\x00-\x1f\x7f]")


def _address(addr, where: str, i: int | None = None) -> str:
    """The address, stripped, or ApiError naming *where* (``where % i`` with an index:
    the field's name is made only for an error)."""
    a = addr.strip() if isinstance(addr, str) else None
    if a is not None:
        local, at, domain = a.rpartition("@")
        # (ASCII, nearly all: printable and no space says the same as the expression)
        if at and local and domain and len(a) <= S.MAX_ADDRESS and \
                (a.isprintable() and " " not in a if a.isascii() else
                 _NOT_IN_ADDRESS.search(a) is None and
                 len(a.encode("utf-8", "surrogateescape")) <= S.MAX_ADDRESS):
            return a
    if i is not None:
        where = where % i
    if a is None:
        raise R.ApiError(R.INVALID, f"{where}: expected an email address string")
    raise R.ApiError(R.INVALID, f"{where}: {addr[:320]!r} is not a valid email address")


def _body(body: bytes):
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise R.ApiError(R.BAD_JSON, "Problems parsing request as json") from None


# ------------------------------------------------------------------- search

_LISTS = frozenset(("types", "sources"))     # the parameters that are comma-separated lists


def _query(query: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if not query:
        return out
    for k, v in urllib.parse.parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True):
        k = k.split("[", 1)[0]          # node's qs: types[0]=a
        if k not in _LISTS:             # (a description or domain may hold a comma)
            out.setdefault(k, []).append(v.strip())
            continue
        for part in v.split(","):
            out.setdefault(k, []).append(part.strip())
    return out


def _one(q: dict, name: str) -> str | None:
    v = q.get(name)
    return v[-1] if v else None


def _types(q: dict, name: str) -> int:
    vals = [v for v in q.get(name, ()) if v]
    if not vals:
        return S.BOTH
    bits = 0
    for v in vals:
        bits |= _type_name(v, name)
    return bits


def _date(q: dict, name: str) -> float | None:
    v = _one(q, name)
    if not v:
        return None
    text = v[:-1] + "+00:00" if v.endswith(("Z", "z")) else v
    d = None
    # (a "+" of the UTC offset sent unencoded arrives as a space; a Python
    # datetime sent by the python client has a space between date and time)
    for form in (text, text[:-5] + "+" + text[-4:] if text[-5:-4] == " " else None,
                 text[:-6] + "+" + text[-5:] if text[-6:-5] == " " else None):
        if form is None or len(form) > 64:
            continue
        try:
            d = datetime.datetime.fromisoformat(form)
            break
        except ValueError:
            pass
    if d is None:
        raise R.ApiError(R.Error(400, f"{name} must be a valid date", "1300"),
                         f"{name}: {v[:64]!r} must be a valid date "
                         "(YYYY-MM-DDTHH:MM:SS with a UTC offset)")
    if d.tzinfo is None:
        d = d.replace(tzinfo=datetime.timezone.utc)
    return d.timestamp()


def _int(q: dict, name: str, lo: int, hi: int, default: int) -> int:
    v = _one(q, name)
    if v is None or v == "":
        return default
    # (ASCII digits: str.isdigit() also takes "²", which int() refuses)
    if not (v.isascii() and v.isdigit() and len(v) <= 12) or not lo <= int(v) <= hi:
        raise R.ApiError(R.INVALID, f"{name}: expected a whole number from {lo} to {hi}")
    return int(v)


def _list_specific(q: dict) -> bool:
    """Whether the query's ``list_id`` names a list (SparkPost: left out, every entry;
    ``list_id=`` empty, the account-level entries only; ``list_id=x``, list x's only).
    An id that is not one is 400 "invalid list_id"."""
    v = _one(q, "list_id")
    if not v:
        return False
    if len(v) > 255 or not _LIST_ID.fullmatch(v):
        raise R.ApiError(BAD_LIST_ID, f"list_id: {v[:64]!r} is not a list id (letters, "
                         "digits, '-', '_' and single inner dots; 1-255 characters)")
    return True


def search(store: S.SuppressionList, q: dict, max_scan: int = S.MAX_SCAN,
           max_seconds: float | None = None) -> tuple[int, bytes]:
    list_only = _list_specific(q)
    start = _date(q, "from")
    end = _date(q, "to")
    if start is not None and end is not None and start > end:
        raise R.ApiError(R.INVALID, "from: must not be later than to")
    types = _types(q, "types")
    sources = frozenset(s for s in q.get("sources", ()) if s) or None
    if sources:
        unknown = sorted(sources - set(S.SOURCES))
        if unknown:
            raise R.ApiError(R.INVALID, f"sources: {unknown[0][:64]!r} is not one of: "
                             + ", ".join(S.SOURCES))
    sort = (_one(q, "sort") or "desc").lower()
    if sort not in ("asc", "desc"):
        raise R.ApiError(R.INVALID, "sort: expected asc or desc")
    per_page = _int(q, "per_page", 1, MAX_PER_PAGE,
                    _int(q, "limit", 1, MAX_PER_PAGE, DEFAULT_PER_PAGE))
    cursor_text = _one(q, "cursor")
    cursor = None
    total = None
    page = 1
    if cursor_text:
        cursor = b""
        if cursor_text != "initial":
            # "<index key in hex>.<total>": a later page seeks straight to its key, and the
            # total counted by the first page comes with it (see SuppressionList.search)
            key, _, count = cursor_text.partition(".")
            try:
                cursor = bytes.fromhex(key)
                total = int(count) if count.isascii() and count.isdigit() \
                    and len(count) <= 12 else None
            except ValueError:
                raise R.ApiError(R.INVALID, "cursor: not a cursor from a links entry") from None
            if len(cursor) < 9 or (count and total is None):
                raise R.ApiError(R.INVALID, "cursor: not a cursor from a links entry")
    else:
        page = _int(q, "page", 1, MAX_PAGED, 1)
        if (page - 1) * per_page >= MAX_PAGED:
            raise R.ApiError(R.INVALID, f"page: only the first {MAX_PAGED} results can be "
                             "paged to; use cursor=initial and the next links")
    domain = _one(q, "domain") or None       # (either spelling: SuppressionList.search)
    desc = _one(q, "description") or None
    strict = (_one(q, "description_strict") or "").lower() == "true"
    if list_only:
        # one list's entries: none are kept (a PUT with a list_id is refused)
        rows, total, nxt = [], 0, None
    else:
        rows, total, nxt = store.search(start=start, end=end, types=types, sources=sources,
                                        domain=domain, description=desc,
                                        description_strict=strict,
                                        descending=sort == "desc", per_page=per_page,
                                        page=page, cursor=cursor, total=total,
                                        max_scan=max_scan, max_seconds=max_seconds)
    links = []
    base = {k: ",".join(v) for k, v in q.items() if k not in ("cursor", "page")}
    if cursor_text:
        links.append({"href": _href({**base, "cursor": "initial"}), "rel": "first"})
        if nxt is not None:
            links.append({"href": _href({**base, "cursor": f"{nxt.hex()}.{total}"}),
                          "rel": "next"})
    else:
        links.append({"href": _href({**base, "page": "1"}), "rel": "first"})
        if page > 1:
            links.append({"href": _href({**base, "page": str(page - 1)}), "rel": "previous"})
        if nxt is not None and page * per_page < MAX_PAGED:
            links.append({"href": _href({**base, "page": str(page + 1)}), "rel": "next"})
        last = max(1, min(-(-total // per_page), MAX_PAGED // per_page))
        links.append({"href": _href({**base, "page": str(last)}), "rel": "last"})
    return _json(200, {"results": rows, "links": links, "total_count": total})


def _href(params: dict) -> str:
    return PATH.decode() + "?" + urllib.parse.urlencode(params)
