"""The webhooks process's log lines, and the API's view of a [[webhook]] table, never
carry its credentials."""
from __future__ import annotations

import asyncio
import logging
import types

import orjson

from mta.api import webhookdb
from mta.api import webhooks as W
from mta.config.schema import Config
from mta.feedback.events_store import EventStore
from mta.webhooks.main import Webhooks


def test_target_userinfo_and_query_are_not_logged(tmp_path, caplog):
    # (anymail's documented SparkPost setup puts basic-auth credentials in the target)
    caplog.set_level(logging.INFO, "mta.webhooks")
    store = EventStore(str(tmp_path / "ev"), map_size=64 << 20, retention=86400)
    db = webhookdb.WebhookDB(webhookdb.path_in(str(tmp_path)))
    db.create(W.check_doc({"name": "anymail", "events": ["delivery"],
                           "target": "http://anyuser:S3CRET@127.0.0.1:9/anymail/tracking/"
                                     "?token=QS3CRET"}), 10)
    settings = types.SimpleNamespace(config=Config(), state_dir=str(tmp_path))

    async def go():
        s = W.new_session()
        w = Webhooks(settings, db, store, s)
        await w.refresh()
        for x in w.senders.values():
            await x.stop()
        await s.close()
    try:
        asyncio.run(go())
    finally:
        db.close()
        store.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("to http://127.0.0.1:9/anymail/tracking/ from seq" in m for m in msgs), msgs
    assert not [m for m in msgs if "S3CRET" in m or "anyuser" in m]


def test_a_config_webhooks_secrets_are_not_shown_through_the_api(tmp_path):
    """A [[webhook]] table is the operator's: its password, client secret, header values
    and the credentials and query of its target are not shown to API key holders (list
    and get), as SparkPost shows a webhook's auth_token as ""."""
    from mta.acceptor import http as H
    from mta.config.schema import WebhookEntry

    cfg = Config(webhook=[
        WebhookEntry(name="crm", target="http://ops:S3CRET1@127.0.0.1:9/in?k=QS3CRET",
                     events=["delivery"], custom_headers={"X-Api-Key": "S3CRET3"}),
        WebhookEntry(name="pw", target="http://127.0.0.1:9/in", events=["delivery"],
                     auth_type="basic",
                     auth_credentials={"username": "hookuser", "password": "S3CRET2"}),
        WebhookEntry(name="idp", target="http://127.0.0.1:9/in", events=["bounce"],
                     auth_type="oauth2", auth_request_details={
                         "url": "http://127.0.0.1:9/token",
                         "body": {"client_id": "cid", "client_secret": "S3CRET4",
                                  "grant_type": "client_credentials"}},
                     # (a token written in the table: as the one SparkPost keeps)
                     auth_credentials={"access_token": "S3CRET5", "expires_in": "3600"})])

    async def go():
        api = W.Api(str(tmp_path), cfg, asyncio.get_running_loop())
        try:
            out = [await H._webhooks_call(api, b"GET", b"/api/v1/webhooks", b"", b"")]
            for name in ("crm", "pw", "idp"):
                path = f"/api/v1/webhooks/{W.config_id(name)}".encode()
                out.append(await H._webhooks_call(api, b"GET", path, b"", b""))
            # what the sender and validate use is left whole
            docs = dict(api.toml)
            assert docs[W.config_id("pw")]["auth_credentials"]["password"] == "S3CRET2"
            assert docs[W.config_id("crm")]["target"].startswith("http://ops:S3CRET1@")
            assert docs[W.config_id("crm")]["custom_headers"] == {"X-Api-Key": "S3CRET3"}
            assert docs[W.config_id("idp")]["auth_request_details"]["body"][
                "client_secret"] == "S3CRET4"
            return out
        finally:
            await api.close()
    answers = asyncio.run(go())
    for status, body, _, _ in answers:
        assert status == 200 and b"S3CRET" not in body, body
    views = {w["name"]: w for w in orjson.loads(answers[0][1])["results"]}
    crm, pw, idp = views["crm"], views["pw"], views["idp"]
    assert crm["target"] == "http://127.0.0.1:9/in" and crm["read_only"] is True
    assert crm["custom_headers"] == {"X-Api-Key": ""}
    assert pw["auth_type"] == "basic" and pw["auth_credentials"] == {"username": "hookuser",
                                                                     "password": ""}
    assert idp["auth_request_details"]["url"] == "http://127.0.0.1:9/token"
    assert idp["auth_request_details"]["body"]["client_id"] == "cid"
