"""The webhooks process's log lines never carry a target's credentials."""
from __future__ import annotations

import asyncio
import logging
import types

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
