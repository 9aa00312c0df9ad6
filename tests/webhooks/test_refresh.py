"""The webhooks process starts every webhook's sender, whatever one of them does."""
from __future__ import annotations

import asyncio
import types

from mta.api import webhookdb
from mta.api import webhooks as W
from mta.config.schema import Config
from mta.feedback.events_store import EventStore
from mta.webhooks import main as wmain


def test_a_sender_that_cannot_load_holds_back_neither_the_others_nor_itself(tmp_path,
                                                                          monkeypatch):
    # Sender.load reads SQLite: a locked or full database raised out of refresh() with
    # the generation already marked seen, so the webhooks after it got no sender (and
    # it none) until the next API change
    store = EventStore(str(tmp_path / "ev"), map_size=64 << 20, retention=86400)
    db = webhookdb.WebhookDB(webhookdb.path_in(str(tmp_path)))
    ids = [db.create(W.check_doc({"name": f"h{i}", "events": ["delivery"],
                                  "target": f"http://127.0.0.1:9/h{i}"}), 10)
           for i in range(3)]
    settings = types.SimpleNamespace(config=Config(), state_dir=str(tmp_path))
    real_load = wmain.Sender.load
    failing = {"name": "h0", "times": 1}

    def load(self, created):
        if self.hook.name == failing["name"] and failing["times"]:
            failing["times"] -= 1
            raise OSError("database is locked")
        return real_load(self, created)
    monkeypatch.setattr(wmain.Sender, "load", load)

    async def go():
        s = W.new_session()
        w = wmain.Webhooks(settings, db, store, s)
        await w.refresh()
        first = sorted(x.hook.name for x in w.senders.values())
        await w.refresh()                   # no API change meanwhile: tried again
        second = sorted(x.hook.name for x in w.senders.values())
        for x in w.senders.values():
            await x.stop()
        await s.close()
        return first, second
    try:
        first, second = asyncio.run(go())
    finally:
        db.close()
        store.close()
    assert len(ids) == 3
    assert first == ["h1", "h2"]
    assert second == ["h0", "h1", "h2"]


def _change(tmp_path, change: dict, prime=None):
    """One API webhook "crm" with its sender running; *change* applied through the API
    (PUT), then refresh(): (the sender before, the sender after), both stopped.
    *prime(sender)* runs on the first sender before the change."""
    store = EventStore(str(tmp_path / "ev"), map_size=64 << 20, retention=86400)
    db = webhookdb.WebhookDB(webhookdb.path_in(str(tmp_path)))
    doc = W.check_doc({"name": "crm", "events": ["delivery"],
                       "target": "http://127.0.0.1:9/crm"})
    wid = db.create(doc, 10)
    settings = types.SimpleNamespace(config=Config(), state_dir=str(tmp_path))

    async def go():
        s = W.new_session()
        w = wmain.Webhooks(settings, db, store, s)
        await w.refresh()
        before = w.senders[wid]
        if prime is not None:
            prime(before)
        db.update(wid, W.check_doc(change, doc))
        await w.refresh()
        after = w.senders[wid]
        for x in w.senders.values():
            await x.stop()
        await s.close()
        return before, after
    try:
        return asyncio.run(go())
    finally:
        db.close()
        store.close()


def test_a_renamed_webhook_is_shown_by_its_new_name(tmp_path):
    # PUT /api/v1/webhooks/{id} {"name": ...} changes nothing the sender sends, so its
    # sender goes on (no restart: a POST in flight is not abandoned); but status.json,
    # `mta queue`, the metrics' name label and the log lines kept the old name until the
    # process restarted
    before, after = _change(tmp_path, {"name": "crm-eu"})
    assert before is after
    assert [x.status()["name"] for x in (before, after)] == ["crm-eu", "crm-eu"]


def test_a_changed_webhooks_counters_go_on(tmp_path):
    # A change of what a sender sends (its target, its auth) restarts the sender; its
    # counters (mta_webhook_*_total) must go on from where they were, not start at 0:
    # a counter that goes down is read by Prometheus as a reset, and the sum of two
    # webhooks of one name would drop part-way.
    def prime(sender):
        sender.stats.batches, sender.stats.events, sender.stats.failures = 3, 250, 2
    before, after = _change(tmp_path, {"target": "http://127.0.0.1:9/crm-v2"}, prime)
    assert before is not after              # restarted: its target changed
    assert (after.stats.batches, after.stats.events, after.stats.failures) == (3, 250, 2)


def test_the_status_goes_on_being_written_after_the_wall_clock_is_stepped_back(
        tmp_path, monkeypatch):
    # The status file (each webhook's backlog, for `mta queue` and the status page) is
    # written once a second: an interval of the process, which NTP stepping the wall
    # clock back an hour must not stop for an hour.
    store = EventStore(str(tmp_path / "ev"), map_size=64 << 20, retention=86400)
    db = webhookdb.WebhookDB(webhookdb.path_in(str(tmp_path)))
    settings = types.SimpleNamespace(config=Config(), state_dir=str(tmp_path))
    real = wmain.time.time
    writes = []

    async def go():
        s = W.new_session()
        w = wmain.Webhooks(settings, db, store, s)
        w.publish = lambda: writes.append(wmain.time.time())
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))
        for _ in range(100):
            if writes:
                break
            await asyncio.sleep(0.05)
        monkeypatch.setattr(wmain.time, "time", lambda: real() - 3600.0)
        before = len(writes)
        await asyncio.sleep(3 * wmain.STATUS_INTERVAL + 2 * settings.config.webhooks.poll_interval)
        stop.set()
        await asyncio.wait_for(task, 10)
        await s.close()
        return before
    try:
        before = asyncio.run(go())
    finally:
        monkeypatch.setattr(wmain.time, "time", real)
        db.close()
        store.close()
    assert before >= 1
    # (the last one is run's at its stop)
    assert len(writes) - 1 - before >= 2, writes
