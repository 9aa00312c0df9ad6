"""The webhooks API's query parameters in-process (mta.api.webhooks, no daemon)."""
from __future__ import annotations

import asyncio

import orjson

from mta.acceptor import http as H
from mta.api import webhooks as W
from mta.config.schema import Config


def test_batch_status_limit_takes_ascii_digits_only(tmp_path):
    async def go():
        api = W.Api(str(tmp_path), Config(), asyncio.get_running_loop())
        try:
            wid = await api.db(lambda db: db.create({"name": "x", "target": "http://127.0.0.1:9/",
                                                     "events": ["delivery"]}, 10))
            path = f"/api/v1/webhooks/{wid}/batch-status".encode()
            return [await H._webhooks_call(api, b"GET", path, q, b"")
                    for q in (b"limit=0", b"limit=%C2%B9", b"limit=" + b"9" * 40, b"limit=5")]
        finally:
            await api.close()
    zero, sup, huge, ok = asyncio.run(go())
    for r in (zero, sup, huge):   # ('¹' is a digit to str.isdigit(), not to int())
        assert r[0] == 422        # (the answer this API gives a bad limit)
        [err] = orjson.loads(r[1])["errors"]
        assert err["description"].startswith("limit:")
    assert ok[0] == 200 and orjson.loads(ok[1]) == {"results": []}


def test_a_target_with_credentials_takes_no_other_authorization():
    """aiohttp sends a target's user:password@ as Basic credentials and refuses a request
    that also has an Authorization header (auth_type basic or oauth2, or a custom
    Authorization): every POST of such a webhook failed without reaching the target, and
    a [[webhook]] table's batches were dropped after the last retry.  The API and the
    configuration refuse it, naming the target."""
    base = {"name": "n", "target": "http://user:pw@127.0.0.1:9/", "events": ["delivery"]}
    for extra in ({"auth_type": "basic", "auth_credentials": {"username": "u",
                                                              "password": "p"}},
                  {"auth_type": "oauth2", "auth_request_details": {
                      "url": "http://127.0.0.1:9/token", "body": {"client_id": "c"}}},
                  {"custom_headers": {"authorization": "Bearer x"}}):
        try:
            W.check_doc(dict(base, **extra))
        except W.R.ApiError as err:
            assert err.status == 422 and err.description.startswith("target:"), extra
        else:
            raise AssertionError(f"accepted: {extra}")
    # a target's credentials alone are the Basic credentials sent (anymail's setup)
    assert W.check_doc(base)["target"] == base["target"]


def test_the_tokens_urls_answer_is_shown_within_max_response_body(tmp_path):
    """webhooks.max_response_body bounds what the API shows of a target's answer (an
    operator lowers it to limit what validate reveals of internal services); the tokens
    URL's answer to a failed OAuth2 request was shown up to 64 KiB all the same."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import orjson

    from mta.acceptor import http as H
    from mta.api import webhooks as W
    from mta.config.schema import Config, WebhooksConfig

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"SECRET-PAGE " * 2000          # 24 KB
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    doc = {"name": "h", "target": f"http://127.0.0.1:{port}/in", "events": ["delivery"],
           "auth_type": "oauth2", "auth_request_details": {
               "url": f"http://127.0.0.1:{port}/token",
               "body": {"client_id": "c", "client_secret": "s",
                        "grant_type": "client_credentials"}}}

    async def go():
        api = W.Api(str(tmp_path), Config(webhooks=WebhooksConfig(max_response_body=100)),
                    asyncio.get_running_loop())
        try:
            return await H._webhooks_call(api, b"POST", b"/api/v1/webhooks", b"",
                                          orjson.dumps(doc))
        finally:
            await api.close()
    try:
        status, body, _, _ = asyncio.run(go())
    finally:
        srv.shutdown()
        srv.server_close()
    err = orjson.loads(body)["errors"][0]
    assert status == 400 and err["response"]["status"] == 401, (status, err)
    assert 0 < len(err["response"]["body"]) <= 100, len(err["response"]["body"])
