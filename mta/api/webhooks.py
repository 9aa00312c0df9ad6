"""Webhooks: SparkPost's ``/api/v1/webhooks`` API, and what the API and the sender share.

Library (no bus).  Used by the acceptors (the API, routed from
:mod:`mta.acceptor.http`) and by the ``webhooks`` process (which pushes the
batches): the definition of a webhook (:func:`check_doc`, :class:`Hook`),
the HTTP requests made to a target (:func:`post`, :func:`fetch_token`; aiohttp,
imported when first used; host names looked up through the node's DNS resolver,
:mod:`mta.api.webhook_dns`), and the durable state (:mod:`mta.api.webhookdb`).

Calls (all under ``/api/v1``; shapes from the reference's tables):

- ``POST /webhooks``: ``name``, ``target``, ``events`` required; ``active``,
  ``auth_type`` (none/basic/oauth2), ``auth_credentials``,
  ``auth_request_details``, ``custom_headers``, the deprecated ``auth_token``.
  The target is test-POSTed (``[{"msys":{}}]``) and must answer 200, else 400
  and nothing is created; oauth2 fetches a token first (a failure is 400 "POST
  to webhook tokens URL failed" with the tokens URL's response).
- ``GET /webhooks[?timezone=]``, ``GET /webhooks/{id}[?timezone=]``
  (``last_successful`` / ``last_failure`` as ``YYYY-MM-DD HH:MM:SS`` in the zone).
- ``PUT /webhooks/{id}``: any create field; a changed target (or auth) is
  tested again.  ``active: false`` stops its sender; made active again, it
  starts at the events since then: those of its inactive time are not sent
  (:meth:`mta.webhooks.sender.Sender.resume`).  ``DELETE /webhooks/{id}``:
  204; its pending batches are not sent.
- ``POST /webhooks/{id}/validate``: ``{"message": payload}`` or a bare array;
  200 with the target's response, or 400 when it did not answer 200.
- ``GET /webhooks/{id}/batch-status[?limit=]``: batches that failed at least
  once (kept ``webhooks.status_retention``), newest first.
- ``GET /webhooks/events/documentation``, ``GET /webhooks/events/samples[?events=]``.

Webhooks from the configuration file (``[[webhook]]``) are listed and can be
read, validated and asked for their batch status; their id is derived from
the name (:func:`config_id`) and they carry ``"read_only": true`` and show no
secrets (:meth:`Api._view`); PUT and DELETE on them are 403.  Unknown fields are ignored (as SparkPost does);
``exception_subaccounts`` and ``subaccount_id`` are accepted and ignored (no
subaccounts).  Any port is accepted in a target (SparkPost allows 80 and 443
only; an MTA's operator points webhooks at their own services), and any address
but the admin listener's (:func:`admin_guard`).
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import errno
import ipaddress
import re
import socket
import threading
import time
import urllib.parse
import uuid
import zoneinfo
from dataclasses import dataclass, field, replace as dataclass_replace

import orjson

from mta.api import replies as R
from mta.api import webhook_docs as docs
from mta.api import webhookdb

PATH = b"/api/v1/webhooks"
TEST_BATCH_ID = "77c2b630-d712-11e4-9642-efc2723b99c1"
TEST_BODY = b'[{"msys":{}}]'
USER_AGENT = "SparkPost"
MAX_NAME = 1024
MAX_TARGET = 2048
MAX_HEADERS = 32
MAX_HEADER_VALUE = 4096
MAX_STATUS_LIMIT = 1000
_CONFIG_NS = uuid.UUID("5b0e3c9e-3f5e-4a57-9a57-6d7461776868")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
RESERVED_HEADERS = frozenset(("content-type", "content-length", "host", "transfer-encoding",
                              "connection", "x-messagesystems-batch-id"))

TEST_FAILED = R.Error(400, "Test POST to endpoint failed", "1300")
TOKEN_FAILED = R.Error(400, "POST to webhook tokens URL failed", "1300")
NOT_FOUND = R.Error(404, "resource not found", "1600")
READ_ONLY = R.Error(403, "webhook is defined in the configuration file", "1100")
TOO_MANY = R.Error(409, "too many webhooks", "1300")


def matches(path: bytes) -> bool:
    return path == PATH or path.startswith(PATH + b"/")


def config_id(name: str) -> str:
    """The API id of a ``[[webhook]]`` table: a UUID derived from its name."""
    return str(uuid.uuid5(_CONFIG_NS, name))


# --------------------------------------------------------------- definition

@dataclass(frozen=True)
class Hook:
    """A webhook as the sender uses it (built from a stored doc or a [[webhook]] table)."""

    id: str
    name: str
    target: str
    events: frozenset
    active: bool = True
    auth_type: str = "none"
    auth_credentials: dict = field(default_factory=dict)
    auth_request_details: dict = field(default_factory=dict)
    custom_headers: dict = field(default_factory=dict)
    auth_token: str = ""
    read_only: bool = False

    @classmethod
    def from_doc(cls, wid: str, doc: dict, read_only: bool = False) -> "Hook":
        return cls(id=wid, name=doc["name"], target=doc["target"],
                   events=frozenset(doc["events"]), active=doc.get("active", True),
                   auth_type=doc.get("auth_type", "none"),
                   auth_credentials=dict(doc.get("auth_credentials") or {}),
                   auth_request_details=dict(doc.get("auth_request_details") or {}),
                   custom_headers=dict(doc.get("custom_headers") or {}),
                   auth_token=doc.get("auth_token") or "", read_only=read_only)

    def key(self) -> bytes:
        """What identifies this definition: a change restarts its sender."""
        return orjson.dumps([self.target, sorted(self.events), self.active, self.auth_type,
                             self.auth_credentials.get("username"),
                             self.auth_credentials.get("password"),
                             self.auth_request_details, self.custom_headers, self.auth_token],
                            option=orjson.OPT_SORT_KEYS)


def config_docs(entries) -> list[tuple[str, dict]]:
    """(id, doc) of every [[webhook]] table (msgspec Structs from the config)."""
    out = []
    for e in entries:
        doc = {"name": e.name, "target": e.target, "events": list(e.events),
               "active": e.active, "auth_type": e.auth_type,
               "auth_credentials": dict(e.auth_credentials),
               "auth_request_details": dict(e.auth_request_details),
               "custom_headers": dict(e.custom_headers)}
        out.append((config_id(e.name), doc))
    return out


def check_doc(doc, base: dict | None = None, where: str = "") -> dict:
    """A complete, normalised webhook doc from *doc* (merged over *base* for an update);
    ApiError 422 naming the field."""
    if not isinstance(doc, dict):
        raise R.ApiError(R.INVALID, "body: expected a JSON object")
    out = dict(base or {})
    for k in ("name", "target", "events", "active", "auth_type", "auth_credentials",
              "auth_request_details", "custom_headers", "auth_token"):
        if k in doc:
            out[k] = doc[k]
    for k in ("name", "target", "events"):
        if out.get(k) is None:
            raise R.ApiError(R.REQUIRED, f"{where}{k} is required")
    name = out["name"]
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise R.ApiError(R.INVALID, f"{where}name: expected a non-empty string of at most "
                         f"{MAX_NAME} characters")
    out["target"] = check_target(out["target"], where + "target")
    events = out["events"]
    if not isinstance(events, list) or not events:
        raise R.ApiError(R.INVALID, f"{where}events: expected a non-empty array of event "
                         "types")
    for i, t in enumerate(events):
        if not isinstance(t, str) or t not in docs.CATEGORY_OF:
            raise R.ApiError(R.INVALID, f"{where}events[{i}]: {str(t)[:64]!r} is not an event "
                             "type (" + ", ".join(docs.CATEGORY_OF) + ")")
    out["events"] = list(dict.fromkeys(events))
    active = out.get("active", True)
    if not isinstance(active, bool):
        raise R.ApiError(R.INVALID, f"{where}active: expected true or false")
    out["active"] = active
    at = out.get("auth_type") or "none"
    if at not in ("none", "basic", "oauth2"):
        raise R.ApiError(R.INVALID, f"{where}auth_type: expected none, basic or oauth2")
    out["auth_type"] = at
    creds = out.get("auth_credentials") or {}
    if not isinstance(creds, dict):
        raise R.ApiError(R.INVALID, f"{where}auth_credentials: expected an object")
    details = out.get("auth_request_details") or {}
    if not isinstance(details, dict):
        raise R.ApiError(R.INVALID, f"{where}auth_request_details: expected an object")
    if at == "basic":
        u = creds.get("username")
        if not isinstance(u, str) or not u:
            raise R.ApiError(R.REQUIRED, f"{where}auth_credentials.username is required for "
                             "auth_type basic")
        p = creds.get("password", "")
        if not isinstance(p, str):
            raise R.ApiError(R.INVALID, f"{where}auth_credentials.password: expected a "
                             "string")
        if ":" in u:
            raise R.ApiError(R.INVALID, f"{where}auth_credentials.username: must not "
                             "contain ':'")
        creds = {"username": u, "password": p}
        details = {}
    elif at == "oauth2":
        check_target(details.get("url"), f"{where}auth_request_details.url")
        body = details.get("body", {})
        if not isinstance(body, dict) or not all(
                isinstance(v, (str, int, float)) for v in body.values()):
            raise R.ApiError(R.INVALID, f"{where}auth_request_details.body: expected an object "
                             "of strings (client_id, client_secret, grant_type)")
        details = {"url": details["url"], "body": body}
        creds = {k: creds[k] for k in ("access_token", "expires_in") if k in creds}
    else:
        creds, details = {}, {}
    out["auth_credentials"] = creds
    out["auth_request_details"] = details
    headers = out.get("custom_headers") or {}
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise R.ApiError(R.INVALID, f"{where}custom_headers: expected an object of at most "
                         f"{MAX_HEADERS} header fields")
    seen: set[str] = set()
    for k, v in headers.items():
        if k.lower() in seen:
            # Field names are case-insensitive: the request would carry one of the two.
            raise R.ApiError(R.INVALID, f"{where}custom_headers.{k[:64]}: given twice "
                             "(header field names do not depend on case)")
        seen.add(k.lower())
        if not _TOKEN.match(k) or k.lower() in RESERVED_HEADERS:
            raise R.ApiError(R.INVALID, f"{where}custom_headers.{k[:64]}: not a header field "
                             "name that may be set")
        if not isinstance(v, str) or len(v) > MAX_HEADER_VALUE or "\r" in v or "\n" in v:
            raise R.ApiError(R.INVALID, f"{where}custom_headers.{k[:64]}: expected a "
                             f"one-line string of at most {MAX_HEADER_VALUE} characters")
    out["custom_headers"] = dict(headers)
    if "@" in urllib.parse.urlsplit(out["target"]).netloc and \
            (at != "none" or "authorization" in seen):
        # (aiohttp sends the target's user:password@ as Basic credentials and refuses a
        # request that has an Authorization header too: no POST would reach the target)
        raise R.ApiError(R.INVALID, f"{where}target: carries user:password@ credentials; "
                         "they are the Basic credentials sent, so auth_type must be none "
                         "and custom_headers without Authorization")
    token = out.get("auth_token") or ""
    if not isinstance(token, str) or "\r" in token or "\n" in token or len(token) > 1024:
        raise R.ApiError(R.INVALID, f"{where}auth_token: expected a one-line string")
    out["auth_token"] = token
    return out


def loggable(url: str) -> str:
    """*url* for a log line: without its user:password@ and its query and fragment (a
    target may carry credentials there, as anymail's documented setup does)."""
    try:
        u = urllib.parse.urlsplit(url)
        host = u.netloc.rpartition("@")[2]
    except ValueError:
        return "(a target that is not a URL)"
    return urllib.parse.urlunsplit((u.scheme, host, u.path, "", ""))[:200]


def check_target(url, where: str) -> str:
    if not isinstance(url, str) or not url or len(url) > MAX_TARGET:
        raise R.ApiError(R.INVALID if url is not None else R.REQUIRED,
                         f"{where}: expected an http:// or https:// URL")
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        raise R.ApiError(R.INVALID, f"{where}: {url[:200]!r} is not a valid URL") from None
    if u.scheme not in ("http", "https") or not u.hostname or any(c.isspace() for c in url):
        raise R.ApiError(R.INVALID, f"{where}: {url[:200]!r} is not an http:// or https:// "
                         "URL")
    del port
    return url


# --------------------------------------------------------------- requests

@dataclass
class Response:
    status: int                 # 0: no response
    headers: dict
    body: str
    latency_ms: int
    failure: str = ""           # "" (an HTTP response), "timeout", "connection", "oauth2"

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class TokenError(Exception):
    def __init__(self, resp: Response):
        super().__init__(f"tokens URL answered {resp.status or resp.failure}")
        self.resp = resp


def new_session(admin: tuple = (), resolver=None):
    """An aiohttp ClientSession for webhook requests (no proxies from the environment)
    that never connects to this node's admin listener (*admin*: its (ip, port) pairs,
    Settings.admin_listen; :func:`admin_guard`) and looks names up with *resolver*
    (:func:`new_resolver`; default: one asking /etc/resolv.conf's servers, as dnspython
    reads them), never with getaddrinfo (:mod:`mta.api.webhook_dns`).  Closing the
    session does not close *resolver*: its owner does.

    Its pool has no bound of its own (aiohttp's *limit*): one shared by every webhook
    let targets that never answer fill it (4 webhooks at max_in_flight 64 took 256),
    and the other webhooks' POSTs waited for a connection until their timeout.  The
    connections are bounded by their users: a sender holds at most
    webhooks.max_in_flight POSTs and one token fetch, the API one per request.
    aiohttp's DNS cache is off: the resolver's keeps each answer for its TTL."""
    import aiohttp

    return aiohttp.ClientSession(trust_env=False, skip_auto_headers=("User-Agent",),
                                 connector=aiohttp.TCPConnector(
                                     limit=0, use_dns_cache=False,
                                     resolver=resolver or new_resolver(),
                                     socket_factory=admin_guard(admin)))


def new_resolver(nameservers=(), timeout: float = 5.0, ipv6: bool = True):
    """The resolver of webhook sessions: the node's DNS resolver (mta.dns) asking
    *nameservers* (Settings.nameservers; empty: /etc/resolv.conf's), each lookup within
    *timeout* seconds (delivery.dns_timeout), AAAA too with *ipv6* (delivery.ipv6)."""
    from mta.api.webhook_dns import WebhookResolver

    return WebhookResolver(nameservers, timeout, ipv6)


def resolver_for(settings):
    """:func:`new_resolver` with a node's [delivery] DNS settings."""
    d = settings.config.delivery
    return new_resolver(settings.nameservers, d.dns_timeout, d.ipv6)


def admin_guard(admin: tuple):
    """aiohttp's socket_factory for webhook requests: a socket, or OSError for an address
    that reaches the admin listener (*admin*: its (ip, port) pairs).

    That listener asks no token on loopback, and the webhook POSTs (the create's
    test POST, validate, the OAuth2 tokens URL, the batches) come from this node:
    aimed at it, an API key would drain the node or suspend or bulk-bounce its
    queue.  Checked on the address connected to (after name resolution): an admin
    port on a loopback or unspecified address (0.0.0.0 connects to this host), an
    IPv4-mapped one, or an admin listener's own address.  Other addresses, internal
    ones included, are the operator's to reach (README, Webhooks).
    """
    if not admin:
        return None
    ports = frozenset(p for _, p in admin)
    hosts = frozenset(ipaddress.ip_address(h) for h, _ in admin)

    def factory(addr_info):
        family, type_, proto, _, sockaddr = addr_info
        if sockaddr[1] in ports:
            try:
                ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            except ValueError:
                ip = None
            if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if ip is not None and (ip.is_loopback or ip.is_unspecified or ip in hosts):
                raise OSError(errno.EACCES, f"{sockaddr[0]} port {sockaddr[1]} is this "
                              "node's admin listener ([admin] listen): not connected to")
        return socket.socket(family, type_, proto)
    return factory


def headers_for(hook: Hook, batch_id: str, token: str | None) -> dict:
    h = dict(hook.custom_headers)
    h["Content-Type"] = "application/json"
    h["X-MessageSystems-Batch-ID"] = batch_id
    h["User-Agent"] = USER_AGENT
    if hook.auth_type == "basic":
        pair = f"{hook.auth_credentials['username']}:" \
               f"{hook.auth_credentials.get('password', '')}"
        h["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    elif hook.auth_type == "oauth2" and token:
        h["Authorization"] = "Bearer " + token
    if hook.auth_token:
        h["X-MessageSystems-Webhook-Token"] = hook.auth_token
    return h


async def _request(session, url: str, data: bytes, headers: dict, timeout: float,
                   max_body: int, whole: bool = False) -> Response:
    """POST; the answer with up to *max_body* octets of its body: what has come with its
    header (a POST's answer is for people to read), or with *whole* the body up to its
    end or *max_body* (a token's JSON: its segments may come apart, within *timeout*)."""
    import aiohttp

    t0 = time.monotonic()
    try:
        async with session.post(url, data=data, headers=headers, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            body = await _read_body(r.content, max_body, whole) if max_body else b""
            return Response(r.status, {str(k): str(v) for k, v in r.headers.items()},
                            body.decode("utf-8", "replace"),
                            int((time.monotonic() - t0) * 1000))
    except asyncio.TimeoutError:
        return Response(0, {}, "", int((time.monotonic() - t0) * 1000), "timeout")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return Response(0, {}, str(exc)[:200], int((time.monotonic() - t0) * 1000),
                        "connection")


async def _read_body(content, max_body: int, whole: bool) -> bytes:
    """Up to *max_body* octets of an answer's body (see _request).  The status has come
    by then: when the timeout ends the read, the answer is still that status, with the
    part of the body that came (a 200 whose body was slow was taken for no answer)."""
    buf = bytearray()
    try:
        while len(buf) < max_body:
            more = await content.read(max_body - len(buf))
            if not more:
                break
            buf += more
            if not whole:
                break
    except asyncio.TimeoutError:
        pass
    return bytes(buf)


async def post(session, hook: Hook, body: bytes, batch_id: str, timeout: float,
               token: str | None = None, max_body: int = 4096) -> Response:
    """POST one batch to the hook's target."""
    return await _request(session, hook.target, body, headers_for(hook, batch_id, token),
                          timeout, max_body)


async def fetch_token(session, hook: Hook, timeout: float) -> tuple[str, int]:
    """OAuth2 client credentials: POST auth_request_details.body (form-encoded, RFC 6749
    4.4) to its url; (access_token, expires_in) or TokenError."""
    d = hook.auth_request_details
    form = urllib.parse.urlencode({k: str(v) for k, v in (d.get("body") or {}).items()})
    resp = await _request(session, d["url"], form.encode(),
                          {"Content-Type": "application/x-www-form-urlencoded",
                           "Accept": "application/json", "User-Agent": USER_AGENT},
                          timeout, 64 * 1024, whole=True)
    if resp.status != 200:
        raise TokenError(resp)
    try:
        doc = orjson.loads(resp.body)
        token = doc["access_token"]
        if not isinstance(token, str) or not token:
            raise ValueError
        expires = int(doc.get("expires_in") or 3600)
    except (ValueError, KeyError, TypeError):
        resp.failure = "oauth2"
        raise TokenError(resp) from None
    return token, expires


# ------------------------------------------------------------------ the API

class Api:
    """What the API needs in one acceptor: the state file, an HTTP session, the config."""

    def __init__(self, state_dir: str, config, loop, admin: tuple = (),
                 nameservers: tuple = ()):
        self.state_dir = state_dir
        self.admin = admin          # the admin listener's (ip, port) pairs: never a target
        self.nameservers = nameservers      # Settings.nameservers: target names asked there
        self.config = config
        self.cfg = config.webhooks
        self.toml = config_docs(config.webhook)
        self.loop = loop
        self._db: webhookdb.WebhookDB | None = None
        self._session = None
        self._resolver = None
        self._lock = threading.Lock()

    async def db(self, fn, *args):
        """Run fn(db, *args) in a worker thread (SQLite waits on fsync and locks)."""
        def call():
            with self._lock:
                if self._db is None:
                    self._db = webhookdb.WebhookDB(webhookdb.path_in(self.state_dir))
                return fn(self._db, *args)
        return await self.loop.run_in_executor(None, call)

    def session(self):
        if self._session is None:
            d = self.config.delivery
            self._resolver = new_resolver(self.nameservers, d.dns_timeout, d.ipv6)
            self._session = new_session(self.admin, self._resolver)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            await self._resolver.close()
            self._session = self._resolver = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def handle(self, method: bytes, path: bytes, query: bytes,
                     body: bytes) -> tuple[int, bytes]:
        """One request under PATH: (status, JSON body; b"" for 204), or ApiError."""
        rest = path[len(PATH):].strip(b"/").decode("utf-8", "replace")
        parts = [urllib.parse.unquote(p) for p in rest.split("/")] if rest else []
        q = dict(urllib.parse.parse_qsl(query.decode("utf-8", "replace"),
                                        keep_blank_values=True))
        if not parts:
            if method == b"GET":
                return await self.list(q)
            if method == b"POST":
                return await self.create(_body(body))
            raise _bad_method(method, "/api/v1/webhooks", "GET or POST")
        if parts[0] == "events" and len(parts) == 2:
            if method != b"GET":
                raise _bad_method(method, "/api/v1/webhooks/events/" + parts[1], "GET")
            if parts[1] == "documentation":
                return _json(200, {"results": docs.documentation()})
            if parts[1] == "samples":
                types = [t.strip() for t in q.get("events", "").split(",") if t.strip()]
                for t in types:
                    if t not in docs.TYPE_FIELDS:
                        raise R.ApiError(R.INVALID, f"events: {t[:64]!r} is not an event "
                                         "type with samples (" + ", ".join(docs.TYPE_FIELDS)
                                         + ")")
                return _json(200, {"results": docs.samples(types)})
        wid = parts[0]
        if len(parts) == 1:
            if method == b"GET":
                return await self.get(wid, q)
            if method == b"PUT":
                return await self.update(wid, _body(body))
            if method == b"DELETE":
                return await self.delete(wid)
            raise _bad_method(method, "/api/v1/webhooks/{id}", "GET, PUT or DELETE")
        if len(parts) == 2 and parts[1] == "validate":
            if method != b"POST":
                raise _bad_method(method, "/api/v1/webhooks/{id}/validate", "POST")
            return await self.validate(wid, _body(body))
        if len(parts) == 2 and parts[1] == "batch-status":
            if method != b"GET":
                raise _bad_method(method, "/api/v1/webhooks/{id}/batch-status", "GET")
            return await self.batch_status(wid, q)
        raise R.ApiError(R.NOT_FOUND, "no such resource: " + path[:200].decode("latin-1"))

    # ---------------------------------------------------------------- calls

    async def _find(self, wid: str) -> tuple[dict, bool]:
        for tid, doc in self.toml:
            if tid == wid:
                return doc, True
        doc = await self.db(webhookdb.WebhookDB.get, wid)
        if doc is None:
            raise R.ApiError(NOT_FOUND, f"no webhook has the id {wid[:64]!r}")
        return doc, False

    def _view(self, wid: str, doc: dict, read_only: bool, cur, tz) -> dict:
        out = {"id": wid, "name": doc["name"], "target": doc["target"],
               "events": doc["events"], "auth_type": doc.get("auth_type", "none"),
               "auth_request_details": doc.get("auth_request_details") or {},
               "auth_credentials": doc.get("auth_credentials") or {}, "auth_token": "",
               "custom_headers": doc.get("custom_headers") or {},
               "active": doc.get("active", True),
               "last_successful": _when(cur[1] if cur else None, tz),
               "last_failure": _when(cur[2] if cur else None, tz)}
        if read_only:
            # A [[webhook]] table is the operator's: its secrets are not an API key
            # holder's to read (SparkPost shows auth_token as "" too); the sender and
            # validate use them from the configuration.
            out["read_only"] = True
            out["target"] = loggable(out["target"])
            out["auth_credentials"] = {k: "" if k in ("password", "access_token") else v
                                       for k, v in out["auth_credentials"].items()}
            details = dict(out["auth_request_details"])      # (a copy: the config's)
            if isinstance(details.get("body"), dict) and "client_secret" in details["body"]:
                details["body"] = dict(details["body"], client_secret="")
            if isinstance(details.get("url"), str):
                details["url"] = loggable(details["url"])
            out["auth_request_details"] = details
            out["custom_headers"] = {k: "" for k in out["custom_headers"]}
        return out

    async def list(self, q: dict) -> tuple[int, bytes]:
        tz = _zone(q)
        rows, cursors = await self.db(lambda db: (db.webhooks(), db.cursors()))
        items = [(wid, doc, True) for wid, doc in self.toml] + \
            [(wid, doc, False) for wid, doc, _, _ in rows]
        results = []
        for wid, doc, ro in items:
            v = self._view(wid, doc, ro, cursors.get(wid), tz)
            v["links"] = [{"href": f"/api/v1/webhooks/{wid}", "rel": "urn.msys.webhooks.webhook",
                           "method": ["GET", "PUT"]}]
            results.append(v)
        return _json(200, {"results": results})

    async def get(self, wid: str, q: dict) -> tuple[int, bytes]:
        tz = _zone(q)
        doc, ro = await self._find(wid)
        cur = await self.db(webhookdb.WebhookDB.cursor, wid)
        v = self._view(wid, doc, ro, cur, tz)
        v["exception_subaccounts"] = []
        v["links"] = [{"href": f"/api/v1/webhooks/{wid}/validate",
                       "rel": "urn.msys.webhooks.validate", "method": ["POST"]},
                      {"href": f"/api/v1/webhooks/{wid}/batch-status",
                       "rel": "urn.msys.webhooks.batches", "method": ["GET"]}]
        return _json(200, {"results": v})

    async def _test(self, doc: dict) -> dict:
        """Fetch an OAuth2 token (kept in auth_credentials) and test-POST the target;
        ApiError 400 unless it answers 200."""
        hook = Hook.from_doc("", doc)
        token = None
        if hook.auth_type == "oauth2":
            try:
                token, expires = await fetch_token(self.session(), hook, self.cfg.timeout)
            except TokenError as exc:
                raise _ResponseError(TOKEN_FAILED, "auth_request_details.url: the tokens URL "
                                     f"answered {_said(exc.resp)}",
                                     _cut(exc.resp, self.cfg.max_response_body)) from None
            doc = dict(doc, auth_credentials={"access_token": token, "expires_in": expires})
        resp = await post(self.session(), hook, TEST_BODY, TEST_BATCH_ID, self.cfg.timeout,
                          token, self.cfg.max_response_body)
        if resp.status != 200:
            raise _ResponseError(TEST_FAILED, f"target: the test POST to {hook.target[:200]} "
                                 f"got {_said(resp)}; it must answer 200", resp)
        return doc

    async def create(self, doc) -> tuple[int, bytes]:
        doc = check_doc(doc)
        if any(d["name"] == doc["name"] for _, d in self.toml):
            raise R.ApiError(R.INVALID, f"name: {doc['name'][:64]!r} is the name of a "
                             "[[webhook]] table of the configuration file")
        doc = await self._test(doc)
        wid = await self.db(webhookdb.WebhookDB.create, doc, self.cfg.max_webhooks)
        if wid is None:
            raise R.ApiError(TOO_MANY, f"there are {self.cfg.max_webhooks} webhooks already "
                             "(webhooks.max_webhooks)")
        return _json(200, {"results": {"id": wid, "links": [
            {"href": f"/api/v1/webhooks/{wid}", "rel": "urn.msys.webhooks.webhook",
             "method": ["GET", "PUT"]}]}})

    async def update(self, wid: str, body) -> tuple[int, bytes]:
        old, ro = await self._find(wid)
        if ro:
            raise R.ApiError(READ_ONLY, f"webhook {wid} is a [[webhook]] table of the "
                             "configuration file; change it there")
        doc = check_doc(body, old)
        if any(doc.get(k) != old.get(k) for k in ("target", "auth_type", "auth_credentials",
                                                   "auth_request_details")):
            doc = await self._test(doc)     # a changed target or auth is tested again
        if not await self.db(webhookdb.WebhookDB.update, wid, doc):
            raise R.ApiError(NOT_FOUND, f"no webhook has the id {wid[:64]!r}")
        return _json(200, {"results": {"id": wid, "links": [
            {"href": f"/api/v1/webhooks/{wid}/validate", "rel": "urn.msys.webhooks.validate",
             "method": ["POST"]}]}})

    async def delete(self, wid: str) -> tuple[int, bytes]:
        _, ro = await self._find(wid)
        if ro:
            raise R.ApiError(READ_ONLY, f"webhook {wid} is a [[webhook]] table of the "
                             "configuration file; remove it there")
        if not await self.db(webhookdb.WebhookDB.delete, wid):
            raise R.ApiError(NOT_FOUND, f"no webhook has the id {wid[:64]!r}")
        return 204, b""

    async def validate(self, wid: str, body) -> tuple[int, bytes]:
        doc, _ = await self._find(wid)
        payload = body.get("message") if isinstance(body, dict) else body
        if isinstance(body, dict) and "message" not in body:
            raise R.ApiError(R.REQUIRED, "message is required (or send the sample batch as "
                             "a bare JSON array)")
        if not isinstance(payload, (list, dict)):
            raise R.ApiError(R.INVALID, "message: expected a JSON object or array")
        hook = Hook.from_doc(wid, doc)
        token = None
        if hook.auth_type == "oauth2":
            try:
                token, _ = await fetch_token(self.session(), hook, self.cfg.timeout)
            except TokenError as exc:
                raise _ResponseError(TOKEN_FAILED, "auth_request_details.url: the tokens URL "
                                     f"answered {_said(exc.resp)}",
                                     _cut(exc.resp, self.cfg.max_response_body)) from None
        resp = await post(self.session(), hook, orjson.dumps(payload), TEST_BATCH_ID,
                          self.cfg.timeout, token, self.cfg.max_response_body)
        view = {"status": resp.status, "headers": resp.headers, "body": resp.body}
        if resp.status != 200:
            raise _ResponseError(TEST_FAILED, f"the POST to {hook.target[:200]} got "
                                 f"{_said(resp)}", resp)
        return _json(200, {"results": {"msg": "Test POST to endpoint succeeded",
                                       "response": view}})

    async def batch_status(self, wid: str, q: dict) -> tuple[int, bytes]:
        await self._find(wid)
        v = q.get("limit", "")
        if v == "":
            limit = MAX_STATUS_LIMIT
        # (ASCII digits only: str.isdigit() also takes '¹', which int() refuses)
        elif not (v.isascii() and v.isdigit() and len(v) <= 9) or \
                not 1 <= int(v) <= MAX_STATUS_LIMIT:
            raise R.ApiError(R.INVALID, f"limit: expected a whole number from 1 to "
                             f"{MAX_STATUS_LIMIT}")
        else:
            limit = int(v)
        rows = await self.db(webhookdb.WebhookDB.batch_status, wid, limit)
        return _json(200, {"results": rows})


class _ResponseError(R.ApiError):
    """A 400 that carries the target's (or tokens URL's) response in its error entry."""

    def __init__(self, error: R.Error, description: str, resp: Response):
        super().__init__(error, description)
        self.resp = resp

    def body(self) -> bytes:
        entry = R.error_entry(self.error, self.description)
        entry["response"] = {"status": self.resp.status, "headers": self.resp.headers,
                             "body": self.resp.body}
        return orjson.dumps({"errors": [entry]})


def _cut(resp: Response, max_body: int) -> Response:
    """*resp* with at most *max_body* characters of its body: the tokens URL's answer is
    read up to 64 KiB (its token), but what the API shows of it is bounded as the
    target's is (webhooks.max_response_body)."""
    if len(resp.body) <= max_body:
        return resp
    return dataclass_replace(resp, body=resp.body[:max_body])


def _said(resp: Response) -> str:
    if resp.status:
        return f"HTTP {resp.status}"
    return {"timeout": "no answer in time", "connection": "no connection"}.get(
        resp.failure, resp.failure or "no answer") + (f" ({resp.body})" if resp.body else "")


def _bad_method(method: bytes, where: str, allowed: str) -> R.ApiError:
    return R.ApiError(R.BAD_METHOD, f"{method.decode('latin-1')} is not allowed on {where}; "
                      f"use {allowed}", allow=allowed.replace(" or ", ", "))


def _body(body: bytes):
    if not body.strip():
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise R.ApiError(R.BAD_JSON, "Problems parsing request as json") from None


def _json(status: int, obj) -> tuple[int, bytes]:
    return status, orjson.dumps(obj)


def _zone(q: dict):
    name = q.get("timezone") or "UTC"
    try:
        if len(name) > 64 or ".." in name:
            raise ValueError
        return zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise R.ApiError(R.INVALID, f"timezone: {name[:64]!r} is not a known time zone "
                         "(e.g. UTC, America/New_York)") from None


def _when(ts: float | None, tz) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M:%S")
