"""A webhook receiver for tests: an HTTP server on loopback in a thread that records every POST.

``Receiver()`` listens on 127.0.0.1 (a free port); ``url`` is its target.
Each POST is recorded as a :class:`Hit` (path, headers, body, parsed JSON, the
status answered).  ``status`` decides the answer: an int, or a callable
taking the Hit and returning an int.  ``/token`` is an OAuth2 tokens URL:
it answers ``{"access_token": "tok-N", "expires_in": 3600}`` (N counts the
tokens handed out) to a form-encoded client-credentials request whose
client_id/secret match, else 401.  With ``require_bearer`` set, a POST
without the current token gets 401.
"""
from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Hit:
    path: str
    headers: dict
    body: bytes
    status: int = 0
    json: object = None
    names: list = None      # every header field name as sent, in order (duplicates kept)


@dataclass
class Receiver:
    status: object = 200
    client_id: str = "cid"
    client_secret: str = "secret"
    require_bearer: bool = False
    hits: list = field(default_factory=list)
    token_requests: list = field(default_factory=list)
    tokens: int = 0

    def __post_init__(self):
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                if self.path == "/token":
                    return rec._token(self, body)
                hit = Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                          names=[k.lower() for k in self.headers.keys()])
                try:
                    hit.json = json.loads(body)
                except ValueError:
                    pass
                with rec.lock:
                    if rec.require_bearer and hit.headers.get("authorization") != \
                            f"Bearer tok-{rec.tokens}":
                        hit.status = 401
                    else:
                        hit.status = rec.status(hit) if callable(rec.status) else rec.status
                    rec.hits.append(hit)
                    rec.cond.notify_all()
                self._answer(hit.status, b"OK" if hit.status == 200 else b"no")

            def _answer(self, status, body, ctype="text/plain"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _token(self, handler, body: bytes) -> None:
        form = dict(urllib.parse.parse_qsl(body.decode()))
        with self.lock:
            self.token_requests.append((handler.headers.get("Content-Type"), form))
            ok = form.get("client_id") == self.client_id and \
                form.get("client_secret") == self.client_secret and \
                form.get("grant_type") == "client_credentials"
            if ok:
                self.tokens += 1
                out = json.dumps({"access_token": f"tok-{self.tokens}",
                                  "expires_in": 3600}).encode()
        if ok:
            handler._answer(200, out, "application/json")
        else:
            handler._answer(401, b'{"error":"invalid_client"}', "application/json")

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def batches(self, ok_only: bool = True) -> list[Hit]:
        """The batch POSTs (not the test POSTs of create/validate)."""
        with self.lock:
            return [h for h in self.hits
                    if h.headers.get("x-messagesystems-batch-id") !=
                    "77c2b630-d712-11e4-9642-efc2723b99c1"
                    and (not ok_only or 200 <= h.status < 300)]

    def events(self) -> list[dict]:
        """Every event of the acknowledged batches, in arrival order."""
        out = []
        for h in self.batches():
            for el in h.json:
                for ev in el["msys"].values():
                    out.append(ev)
        return out

    def wait(self, pred, timeout: float, what: str = "condition"):
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self), timeout):
                raise AssertionError(f"receiver: timed out waiting for {what}; "
                                     f"{len(self.hits)} request(s) so far")
            return pred(self)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
