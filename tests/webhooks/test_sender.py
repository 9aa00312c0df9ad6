"""The webhook sender in-process: a real events store (LMDB), the real SQLite state, a real
HTTP receiver on loopback (tests/webhooks/receiver.py).

Batching and filters, headers and auth, the retry schedule, dropping after the last
attempt, batches surviving a restart of the sender with their ids and bodies, OAuth2
token refresh, and the backlog bound.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import sqlite3
import sys
import time
import uuid

import pytest

from mta.api import webhookdb
from mta.api import webhooks as W
from mta.config.schema import WebhooksConfig
from mta.feedback.events_store import EventStore
from mta.webhooks.sender import Sender

sys.path.insert(0, os.path.dirname(__file__))
from receiver import Receiver  # noqa: E402

TYPES = ["injection", "delivery", "delay", "bounce"]


def _events(n: int, start: int = 0, ts: float | None = None) -> list[dict]:
    now = int(ts if ts is not None else time.time())
    return [{"type": TYPES[i % 4], "event_id": str(10_000 + i), "timestamp": str(now),
             "message_id": "%020x" % i, "rcpt_to": f"r{i}@example.com",
             "bounce_class": "10" if TYPES[i % 4] == "bounce" else None}
            for i in range(start, start + n)]


@pytest.fixture
def env(tmp_path):
    store = EventStore(str(tmp_path / "events"), map_size=64 << 20, retention=86400)
    db = webhookdb.WebhookDB(webhookdb.path_in(str(tmp_path)))
    rec = Receiver()
    yield store, db, rec, tmp_path
    rec.close()
    db.close()
    store.close()


def _cfg(**kw) -> WebhooksConfig:
    base = dict(batch_size=100, max_in_flight=4, timeout=5.0, retry_schedule=[0.05, 0.1],
                time_scale=1.0, poll_interval=0.05)
    base.update(kw)
    return WebhooksConfig(**base)


def _hook(rec: Receiver, events=("delivery", "bounce"), **kw) -> W.Hook:
    return W.Hook(id=kw.pop("id", "hook-1"), name="test", target=rec.url,
                  events=frozenset(events), **kw)


async def _run(hook, db, store, cfg, until, timeout=20.0, created=None):
    """Run a sender until until() is true; returns the sender (stopped)."""
    session = W.new_session()
    s = Sender(hook, db, store, session, cfg)
    s.load(created)
    s.start()
    deadline = time.monotonic() + timeout
    try:
        while not until(s):
            if time.monotonic() > deadline:
                raise AssertionError(f"sender: timed out; status {s.status()}")
            await asyncio.sleep(0.02)
    finally:
        await s.stop()
        await session.close()
    return s


def test_batches_filter_shape_and_headers(env):
    store, db, rec, _ = env
    hook = _hook(rec, custom_headers={"X-Customer": "acme"}, auth_token="legacy-token")
    async def go():
        s = Sender(hook, db, store, None, _cfg())
        s.load(None)                        # a new webhook starts at the newest event
        store.append(_events(500))
        # with the cursor at 0 (before the events), every matching event is sent
        db.set_cursor(hook.id, 0)
    asyncio.run(go())
    want = {e["event_id"] for e in _events(500) if e["type"] in ("delivery", "bounce")}
    # until the sender has also handled every 200 (the receiver records a POST before
    # its answer reaches the sender)
    s = asyncio.run(_run(hook, db, store, _cfg(),
                         lambda s: len(rec.events()) >= len(want) and not s.pending))
    got = rec.events()
    assert sorted(e["event_id"] for e in got) == sorted(want)      # each once, no others
    assert {e["type"] for e in got} == {"delivery", "bounce"}
    batches = rec.batches()
    assert all(len(h.json) <= 100 for h in batches)
    assert len(batches) == 3                # 250 events: 100 + 100 + 50
    for h in batches:
        assert h.headers["content-type"] == "application/json"
        assert h.headers["user-agent"] == "SparkPost"
        assert h.headers["x-customer"] == "acme"
        assert h.headers["x-messagesystems-webhook-token"] == "legacy-token"
        assert uuid.UUID(h.headers["x-messagesystems-batch-id"])
        assert "authorization" not in h.headers
        assert all(list(el) == ["msys"] and list(el["msys"]) == ["message_event"]
                   for el in h.json)
    assert len({h.headers["x-messagesystems-batch-id"] for h in batches}) == 3
    assert s.status()["events_sent"] == 250
    # every acknowledged batch that never failed is gone from the state file
    assert db.pending(hook.id) == [] and db.batch_status(hook.id, 100) == []
    assert db.cursor(hook.id)[0] == 500


def test_basic_auth_header(env):
    store, db, rec, _ = env
    hook = _hook(rec, auth_type="basic", auth_credentials={"username": "u", "password": "p:w"})
    db.set_cursor(hook.id, 0)
    store.append(_events(8))
    asyncio.run(_run(hook, db, store, _cfg(), lambda s: len(rec.events()) == 4))
    for h in rec.batches():
        assert h.headers["authorization"] == "Basic " + base64.b64encode(b"u:p:w").decode()


def test_custom_headers_never_double_the_senders_own(env):
    """A custom header named like one the sender sets, in another case ("authorization",
    "user-agent"), is replaced by the sender's, not sent beside it: a receiver would see
    two Authorization fields (most frameworks keep the first, the customer's)."""
    store, db, rec, _ = env
    hook = _hook(rec, auth_type="basic", auth_credentials={"username": "u", "password": "p"},
                 custom_headers={"authorization": "Bearer stale", "user-agent": "mine",
                                 "x-messagesystems-webhook-token": "custom", "X-Customer": "a"},
                 auth_token="legacy")
    db.set_cursor(hook.id, 0)
    store.append(_events(8))
    asyncio.run(_run(hook, db, store, _cfg(), lambda s: len(rec.events()) == 4))
    for h in rec.batches():
        assert h.names.count("authorization") == 1
        assert h.names.count("user-agent") == 1
        assert h.names.count("x-messagesystems-webhook-token") == 1
        assert h.headers["authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
        assert h.headers["user-agent"] == "SparkPost"
        assert h.headers["x-messagesystems-webhook-token"] == "legacy"
        assert h.headers["x-customer"] == "a"


def test_custom_headers_of_one_name_in_two_cases_are_refused():
    """Header field names are case-insensitive: two custom headers that differ only in
    case would be sent as two fields, so the API refuses them (422 naming the field)."""
    doc = {"name": "n", "target": "http://127.0.0.1:9/", "events": ["delivery"],
           "custom_headers": {"X-Tenant": "a", "x-tenant": "b"}}
    with pytest.raises(W.R.ApiError) as err:
        W.check_doc(doc)
    assert err.value.status == 422
    assert err.value.description.startswith("custom_headers.x-tenant:")
    # Without an auth type, a custom Authorization is the customer's own and is sent.
    hook = W.Hook(id="h", name="n", target="http://127.0.0.1:9/", events=frozenset(["delivery"]),
                  custom_headers={"authorization": "Bearer theirs"})
    h = W.headers_for(hook, "b", None)
    assert [k for k in h if k.lower() == "authorization"] == ["authorization"]
    assert h["authorization"] == "Bearer theirs"


def test_retry_keeps_id_and_body_then_succeeds(env):
    store, db, rec, _ = env
    hook = _hook(rec)
    db.set_cursor(hook.id, 0)
    store.append(_events(40))
    seen: dict[str, int] = {}

    def status(hit):
        bid = hit.headers["x-messagesystems-batch-id"]
        seen[bid] = seen.get(bid, 0) + 1
        return 500 if seen[bid] <= 2 else 200      # each batch fails twice, then succeeds
    rec.status = status
    asyncio.run(_run(hook, db, store, _cfg(batch_size=10),
                     lambda s: len(rec.events()) == 20 and not s.pending))
    by_id: dict[str, set] = {}
    for h in rec.hits:
        by_id.setdefault(h.headers["x-messagesystems-batch-id"], set()).add(h.body)
    assert len(by_id) == 2 and all(len(bodies) == 1 for bodies in by_id.values())
    assert all(n == 3 for n in seen.values())
    rows = db.batch_status(hook.id, 10)
    assert {r["batch_id"] for r in rows} == set(by_id)
    assert all(r["attempts"] == 3 and r["response_code"] == "200" and r["batch_size"] == 10
               for r in rows)


def test_status_tells_what_is_undelivered_and_retrying(env):
    """status.json (mta queue, /api/admin/queue): stored batches waiting for a retry, when
    the next one is due and what the last failed POST got."""
    store, db, rec, _ = env
    hook = _hook(rec)
    db.set_cursor(hook.id, 0)
    store.append(_events(8))
    rec.status = 503
    s = asyncio.run(_run(hook, db, store, _cfg(batch_size=2, retry_schedule=[60.0]),
                         lambda s: s.status()["retrying_batches"] == 2))
    st = s.status()
    assert (st["pending_batches"], st["pending_events"], st["retrying_batches"]) == (2, 4, 2)
    assert st["next_retry"] > time.time() + 50
    assert st["last_failure"]["response"] == "HTTP 503"
    assert st["on_backlog_full"] == "drop_oldest" and st["max_backlog_events"] > 0


def test_retry_schedule_then_drop(env, caplog):
    store, db, rec, _ = env
    hook = _hook(rec)
    db.set_cursor(hook.id, 0)
    store.append(_events(4))
    rec.status = 503
    sched = [0.2, 0.4]
    attempts: list[float] = []

    def status(hit):
        attempts.append(time.monotonic())
        return 503
    rec.status = status
    caplog.set_level(logging.INFO, logger="mta.webhooks")
    s = asyncio.run(_run(hook, db, store, _cfg(retry_schedule=sched, time_scale=1.0),
                         lambda s: s.stats.dropped_batches == 1))
    assert len(attempts) == 1 + len(sched)          # 12 attempts with the default schedule
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= sched[0] - 0.02 and gaps[1] >= sched[1] - 0.02   # growing back-off
    assert gaps[1] > gaps[0] - 0.05
    rows = db.batch_status(hook.id, 10)
    assert len(rows) == 1 and rows[0]["attempts"] == 3 and rows[0]["response_code"] == "503"
    assert db.pending(hook.id) == []
    assert s.stats.dropped_batches == 1
    assert any("dropped after 3 attempts" in r.getMessage() for r in caplog.records)
    assert len({h.headers["x-messagesystems-batch-id"] for h in rec.hits}) == 1


def test_default_schedule_is_12_attempts_over_about_8_hours():
    sched = WebhooksConfig().retry_schedule
    assert len(sched) == 11
    assert sched == sorted(sched)
    assert 7 * 3600 <= sum(sched) <= 8 * 3600


def test_batches_survive_a_restart(env, tmp_path):
    store, db, rec, _ = env
    hook = _hook(rec)
    db.set_cursor(hook.id, 0)
    store.append(_events(80))
    rec.status = 500
    # The first sender stores batches and gets only 500s; then it is abandoned
    # without a clean stop (its tasks are cancelled, nothing more is written).
    s1 = asyncio.run(_run(hook, db, store, _cfg(batch_size=10, max_in_flight=3,
                                               retry_schedule=[1.0]),
                          lambda s: len({h.headers["x-messagesystems-batch-id"]
                                         for h in rec.hits}) == 3))
    del s1
    first = {h.headers["x-messagesystems-batch-id"]: h.body for h in rec.hits}
    assert len(first) == 3
    # A new process: a new connection to the state file; the stored batches are due
    # 1 s after their failed attempt (the stored next attempt time is kept).
    db2 = webhookdb.WebhookDB(webhookdb.path_in(str(tmp_path)))
    assert {b.id for b in db2.pending(hook.id)} == set(first)
    rec.status = 200
    asyncio.run(_run(hook, db2, store, _cfg(batch_size=10, retry_schedule=[0.0]),
                     lambda s: len(rec.events()) == 40))
    ok = {h.headers["x-messagesystems-batch-id"]: h.body for h in rec.batches()}
    for bid, body in first.items():
        assert ok[bid] == body                     # same id, same contents
    ids = [e["event_id"] for e in rec.events()]
    assert sorted(ids) == sorted(e["event_id"] for e in _events(80)
                                 if e["type"] in ("delivery", "bounce"))
    db2.close()


def test_oauth2_token_and_refresh_on_401(env):
    store, db, rec, _ = env
    rec.require_bearer = True
    hook = _hook(rec, auth_type="oauth2", auth_request_details={
        "url": rec.token_url, "body": {"client_id": "cid", "client_secret": "secret",
                                       "grant_type": "client_credentials"}})
    db.set_cursor(hook.id, 0)
    store.append(_events(4))

    def revoke_then_more(s):
        n = len(rec.events())
        if n == 2 and not hasattr(s, "revoked"):
            # The target revokes the token (a new one was issued elsewhere): the next
            # POST gets 401, the sender fetches a token and repeats the POST at once.
            s.revoked = True
            with rec.lock:
                rec.tokens += 1
            store.append(_events(4, start=100))
        return n == 4
    asyncio.run(_run(hook, db, store, _cfg(), revoke_then_more))
    assert len(rec.token_requests) == 2
    for ctype, form in rec.token_requests:
        assert ctype == "application/x-www-form-urlencoded"
        assert form == {"client_id": "cid", "client_secret": "secret",
                        "grant_type": "client_credentials"}
    ok = rec.batches()
    assert [h.headers["authorization"] for h in ok] == ["Bearer tok-1", "Bearer tok-3"]
    refused = [h for h in rec.hits if h.status == 401]
    assert len(refused) == 1 and refused[0].headers["authorization"] == "Bearer tok-1"
    assert refused[0].headers["x-messagesystems-batch-id"] == \
        ok[1].headers["x-messagesystems-batch-id"]


def test_backlog_drop_oldest(env, caplog):
    store, db, rec, _ = env
    hook = _hook(rec, events=TYPES)
    db.set_cursor(hook.id, 0)
    rec.status = 500
    store.append(_events(1000))
    caplog.set_level(logging.INFO, logger="mta.webhooks")
    s = asyncio.run(_run(hook, db, store, _cfg(max_backlog_events=200, max_in_flight=1,
                                               batch_size=10, retry_schedule=[60.0]),
                         lambda s: s.stats.dropped_events > 0))
    st = s.status()
    assert st["backlog_events"] <= 200
    assert st["dropped_events"] >= 1000 - 200 - 10
    assert db.cursor(hook.id)[3] == st["dropped_events"]        # counted durably
    msgs = [r.getMessage() for r in caplog.records]
    assert any("oldest event(s) dropped" in m for m in msgs)
    assert any("90% of webhooks.max_backlog_events" in m for m in msgs)


def test_pause_keeps_cursor_and_releases_store(env):
    store, db, rec, _ = env
    hook = _hook(rec, events=TYPES)
    db.set_cursor(hook.id, 0)
    rec.status = 500
    store.append(_events(1000))
    s = asyncio.run(_run(hook, db, store, _cfg(max_backlog_events=200, max_in_flight=1,
                                               batch_size=10, retry_schedule=[60.0],
                                               on_backlog_full="pause"),
                         lambda s: s.head == 1000))
    assert s.stats.dropped_events == 0 and s.scan_seq == 10
    assert s.keep_from() == 1000 - 200 + 1         # the store may prune below this


def test_new_webhook_starts_at_events_since_its_creation(env):
    store, db, rec, _ = env
    old = time.time() - 100
    store.append(_events(50, ts=old))
    created = time.time()
    store.append(_events(20, start=50, ts=created))
    hook = _hook(rec, events=TYPES, id="hook-new")
    s = Sender(hook, db, store, None, _cfg())
    s.load(created)
    assert s.scan_seq == 50
    hook2 = _hook(rec, events=TYPES, id="hook-toml")
    s2 = Sender(hook2, db, store, None, _cfg())
    s2.load(None)
    assert s2.scan_seq == 70


class _UnwritableDB(webhookdb.WebhookDB):
    """The state file takes new batches but no attempt (disk full, database locked)."""

    def attempted(self, *a, **kw):
        raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize("answer,sched", [(200, [60.0]), (503, [60.0]), (503, [])])
def test_a_failed_attempt_record_does_not_post_again_at_once(env, tmp_path, answer, sched):
    """A POST whose attempt cannot be recorded: acknowledged, the batch is done with in
    memory; refused, it waits for its retry, or is dropped after its last attempt; never
    POSTed again in a loop."""
    store, _, rec, _ = env
    db = _UnwritableDB(webhookdb.path_in(str(tmp_path / "bad")))
    hook = _hook(rec)
    db.set_cursor(hook.id, 0)
    store.append(_events(2))                       # one delivery: one batch
    rec.status = answer
    t0 = time.time()
    s = asyncio.run(_run(hook, db, store, _cfg(retry_schedule=sched),
                         lambda s: time.time() - t0 > 1.0))
    db.close()
    assert len(rec.hits) == 1
    if answer == 200:
        assert not s.pending and s.stats.batches == 1 and s.stats.events == 1
    elif not sched:
        assert not s.pending and s.stats.dropped_batches == 1
    else:
        [b] = s.pending.values()
        assert b.next_at > time.time() + 50 and s.stats.failures == 1


@pytest.mark.parametrize("new_events", [1200, 300])
def test_a_store_made_anew_resets_the_cursor(env, tmp_path, caplog, new_events):
    """The events store deleted and made anew (seqs from 1 again): every new event is
    sent, whether the new store already holds more events than the old cursor (its id
    tells) or fewer."""
    store, db, rec, _ = env
    hook = _hook(rec, events=TYPES)
    db.set_cursor(hook.id, 0)
    store.append(_events(1000))
    asyncio.run(_run(hook, db, store, _cfg(), lambda s: len(rec.events()) == 1000 and
                     not s.pending))
    assert db.cursor(hook.id)[0] == 1000
    path = store.path
    store.close()
    shutil.rmtree(path)
    store = EventStore(path, map_size=64 << 20, retention=86400)
    try:
        store.append(_events(new_events, start=5000))
        caplog.set_level(logging.INFO, logger="mta.webhooks")
        asyncio.run(_run(hook, db, store, _cfg(), lambda s: len(rec.events()) >= 1000 +
                         new_events and not s.pending, timeout=5.0))
        sent = [e["event_id"] for e in rec.events()[1000:]]
        assert sorted(sent) == sorted(e["event_id"] for e in _events(new_events, start=5000))
        assert db.cursor(hook.id)[0] == new_events
        assert any("events store was made anew" in r.getMessage() for r in caplog.records)
    finally:
        store.close()


def test_a_webhook_created_inactive_starts_at_its_activation(env):
    """A webhook created with ``active: false`` and made active later by a PUT: its first
    sender starts at the events stored since the activation, not since its creation (the
    events of its inactive time are not sent); a PUT that changes something else keeps
    no such mark."""
    store, db, rec, _ = env
    t0 = time.time()
    wid = db.create({"name": "test", "target": rec.url, "events": ["delivery"],
                     "active": False}, 10)
    store.append(_events(8, 0, ts=t0 - 5))            # while inactive (made at t0 - 20)
    assert db.inactive(wid) == (None,)
    doc = db.get(wid)
    assert db.update(wid, dict(doc, name="renamed"))   # (still inactive: no change)
    assert db.inactive(wid) == (None,)
    db.update(wid, dict(doc, active=True))
    until = db.inactive(wid)[0]
    assert until is not None and until >= t0
    store.append(_events(8, 100, ts=until + 5))         # after the activation
    hook = _hook(rec, events=("delivery",), id=wid)
    asyncio.run(_run(hook, db, store, _cfg(), lambda s: s.stats.events >= 2,
                     created=t0 - 20))
    assert {e["event_id"] for e in rec.events()} == {"10101", "10105"}
    assert db.inactive(wid) is None and db.cursor(wid)[0] == 16
    db.update(wid, dict(db.get(wid), name="again"))
    assert db.inactive(wid) is None


def test_a_failed_connection_is_logged_with_its_reason(env, caplog):
    """A batch that found no connection was logged as "got connection": the reason
    (refused, name unknown, TLS) was in the attempt's record only.  It is logged now, and
    a user:password@ of the target stays out of the log."""
    store, db, _, _ = env
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                   # nothing listens there: refused
    hook = W.Hook(id="hook-1", name="test", target=f"http://u:S3CRET@127.0.0.1:{port}/in",
                  events=frozenset(["delivery"]))
    db.set_cursor(hook.id, 0)
    store.append(_events(4))
    caplog.set_level(logging.INFO, logger="mta.webhooks")
    asyncio.run(_run(hook, db, store, _cfg(retry_schedule=[0.05]),
                     lambda s: s.stats.dropped_batches == 1))
    msgs = [r.getMessage() for r in caplog.records]
    failed = [m for m in msgs if "attempt 1 got connection" in m]
    assert failed and f"127.0.0.1:{port}" in failed[0], msgs
    assert not [m for m in msgs if "S3CRET" in m], msgs


def test_a_batch_for_the_old_target_does_not_carry_the_new_targets_credentials(env):
    """A PUT moved the webhook to another host with new credentials: its batches still
    retrying keep their old target (as SparkPost's do) but were sent there with the
    new basic-auth password and custom headers.  They now go without them."""
    store, db, old, _ = env
    new = Receiver()
    try:
        first = _hook(old)
        db.set_cursor(first.id, 0)
        store.append(_events(8))
        old.status = 503
        asyncio.run(_run(first, db, store, _cfg(retry_schedule=[0.3]),
                         lambda s: len(old.hits) >= 1))
        assert db.pending(first.id)
        old.status = 200
        moved = _hook(new, auth_type="basic",
                      auth_credentials={"username": "u", "password": "NEW-S3CRET"},
                      custom_headers={"X-Api-Key": "NEW-KEY"})
        asyncio.run(_run(moved, db, store, _cfg(retry_schedule=[0.3]),
                         lambda s: not db.pending(moved.id)))
        sent = [h for h in old.hits if h.status == 200]
        assert sent, old.hits
        for h in sent:
            assert "authorization" not in h.headers and "x-api-key" not in h.headers, h.headers
    finally:
        new.close()


def test_a_batch_for_an_old_target_with_its_own_credentials_is_still_sent(env):
    """The old target carried user:password@ and an update moved the webhook (same host)
    to basic auth: its retrying batches went with both, which aiohttp refuses to send, so
    they failed as 'connection' until dropped.  They go with the old target's own."""
    store, db, rec, _ = env
    base = rec.url.split("//", 1)[1]
    first = W.Hook(id="hook-1", name="test", target=f"http://old:OLDPW@{base}",
                   events=frozenset(["delivery"]))
    db.set_cursor(first.id, 0)
    store.append(_events(8))
    rec.status = 503
    asyncio.run(_run(first, db, store, _cfg(retry_schedule=[0.3]),
                     lambda s: len(rec.hits) >= 1))
    rec.status = 200
    moved = W.Hook(id="hook-1", name="test", target=rec.url + "moved",
                   events=frozenset(["delivery"]), auth_type="basic",
                   auth_credentials={"username": "new", "password": "NEWPW"})
    s = asyncio.run(_run(moved, db, store, _cfg(retry_schedule=[0.3]),
                         lambda s: not db.pending(moved.id)))
    assert s.stats.batches >= 1 and s.stats.dropped_batches == 0
    ok = [h for h in rec.hits if h.status == 200]
    assert ok and all(h.headers["authorization"] == "Basic " + base64.b64encode(
        b"old:OLDPW").decode() for h in ok), [h.headers.get("authorization") for h in ok]


def test_a_stored_event_that_cannot_be_read_does_not_stop_the_webhook(env, caplog):
    """A stored event that is no msgpack map (damage LMDB does not see) made every read of
    the sender raise: the webhook tried again each second, at the same event, for good,
    and nothing behind it was ever sent.  The event is now passed over, logged."""
    from mta.feedback import events_store as ES
    store, db, rec, _ = env
    hook = _hook(rec)
    store.append(_events(8))
    with store.env.begin(write=True, db=store.ev) as txn:
        k = ES._U64.pack(2)                          # a delivery event
        txn.put(k, bytes(txn.get(k)[:8]) + b"\x93\x01\x02\x03")
    db.set_cursor(hook.id, 0)
    want = {e["event_id"] for e in _events(8) if e["type"] in ("delivery", "bounce")}
    want.discard("10001")
    with caplog.at_level("ERROR"):
        asyncio.run(_run(hook, db, store, _cfg(),
                         lambda s: {e["event_id"] for e in rec.events()} >= want and
                         not s.pending, timeout=10))
    assert sorted(e["event_id"] for e in rec.events()) == sorted(want)
    assert any("the event of seq 2 cannot be read" in r.getMessage() for r in caplog.records)
    assert not any("reading events or storing a batch failed" in r.getMessage()
                   for r in caplog.records)


def test_an_event_json_cannot_write_is_dropped_and_the_others_are_sent(env, caplog):
    """An event with a key that is no string (from a damaged or foreign record) made the
    batch's JSON raise at every try, each second: the webhook sent nothing more, for good.
    It is now left out of its batch, logged and counted as dropped."""
    store, db, rec, _ = env
    hook = _hook(rec)
    evs = _events(8)
    evs[1] = dict(evs[1], metadata={7: "x"})          # a delivery event
    store.append(evs)
    db.set_cursor(hook.id, 0)
    want = {e["event_id"] for e in evs if e["type"] in ("delivery", "bounce")} - {"10001"}
    with caplog.at_level("ERROR"):
        s = asyncio.run(_run(hook, db, store, _cfg(),
                             lambda s: {e["event_id"] for e in rec.events()} >= want and
                             not s.pending, timeout=10))
    assert sorted(e["event_id"] for e in rec.events()) == sorted(want)
    assert s.stats.dropped_events == 1
    assert any("event 10001 cannot be written as JSON" in r.getMessage()
               for r in caplog.records)
    assert not any("reading events or storing a batch failed" in r.getMessage()
                   for r in caplog.records)


def test_a_stored_event_whose_type_is_no_string_does_not_stop_the_webhook(env, caplog):
    """A stored event that is a msgpack map but whose ``type`` is a list or a map (damage
    that still decodes: LMDB has no checksums) made the type filter raise (unhashable) at
    every read, each second, for good: nothing behind it was sent, and the events
    store's pruning stayed held.  It is passed over as an event of no known type."""
    import msgspec

    from mta.feedback import events_store as ES
    store, db, rec, _ = env
    hook = _hook(rec)
    store.append(_events(8))
    with store.env.begin(write=True, db=store.ev) as txn:
        for seq, bad in ((2, ["delivery"]), (3, {"t": "bounce"})):    # a delivery, a bounce
            k = ES._U64.pack(seq)
            ev = dict(ES._dec.decode(bytes(txn.get(k)[8:])), type=bad)
            txn.put(k, bytes(txn.get(k)[:8]) + msgspec.msgpack.encode(ev))
    db.set_cursor(hook.id, 0)
    want = {e["event_id"] for e in _events(8) if e["type"] in ("delivery", "bounce")}
    want -= {"10001", "10002"}
    with caplog.at_level("ERROR"):
        asyncio.run(_run(hook, db, store, _cfg(),
                         lambda s: {e["event_id"] for e in rec.events()} >= want and
                         not s.pending, timeout=10))
    assert sorted(e["event_id"] for e in rec.events()) == sorted(want)
    assert not any("reading events or storing a batch failed" in r.getMessage()
                   for r in caplog.records)
