"""Webhook targets and OAuth2 tokens URLs that misbehave, against the real sender in-process:
raw HTTP servers on loopback (asyncio, in the sender's own loop) that answer in pieces,
answer a status and then nothing, or never answer.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from mta.api import webhookdb
from mta.api import webhooks as W
from mta.feedback.events_store import EventStore
from mta.webhooks.sender import Sender

sys.path.insert(0, os.path.dirname(__file__))
from receiver import Receiver  # noqa: E402
from test_sender import _cfg, _events, _hook  # noqa: E402


@pytest.fixture
def env(tmp_path):
    store = EventStore(str(tmp_path / "events"), map_size=64 << 20, retention=86400)
    db = webhookdb.WebhookDB(webhookdb.path_in(str(tmp_path)))
    rec = Receiver()
    yield store, db, rec, tmp_path
    rec.close()
    db.close()
    store.close()


class RawServer:
    """A loopback HTTP/1.1 server whose answer is *answer(writer)* (a coroutine), after
    the request was read whole; it counts the requests and keeps each connection open
    until the test ends (one request each: an answer that leaves the connection
    reusable says Connection: close)."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[bytes] = []
        self.server = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return "http://127.0.0.1:%d/hook" % self.server.sockets[0].getsockname()[1]

    async def _conn(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":", 1)[1])
            body = await reader.readexactly(n)
            self.requests.append(head + body)
            await self.answer(writer)
            await asyncio.sleep(30)          # (held open: the client's timeouts decide)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _oauth2_run(env_, tokens_answer, **cfg):
    """A sender whose OAuth2 tokens URL answers with *tokens_answer*, and whose target
    is the Receiver; runs until a batch is acknowledged or an attempt failed."""
    store, db, rec, _ = env_

    async def main():
        tokens = RawServer(tokens_answer)
        url = await tokens.start()
        hook = _hook(rec, auth_type="oauth2", auth_request_details={
            "url": url, "body": {"client_id": "cid", "client_secret": "secret",
                                 "grant_type": "client_credentials"}})
        db.set_cursor(hook.id, 0)
        store.append(_events(4))
        session = W.new_session()
        s = Sender(hook, db, store, session, _cfg(**cfg))
        s.load()
        s.start()
        try:
            await _until(lambda: s.stats.batches or s.stats.failures, 10,
                         "a batch acknowledged or an attempt failed")
        finally:
            await s.stop()
            await session.close()
            tokens.close()
        return s
    return asyncio.run(main())


def test_a_tokens_url_answering_200_without_a_token_sends_nothing_counted_sent(env):
    """A tokens URL that answers 200 with no token in it (an HTML login page, an error
    document): no POST went to the target, yet the batch was counted sent (the tokens
    URL's 200 taken for the target's), removed, and its events lost.  It is a failed
    attempt now, retried, and the status says it was the tokens URL."""
    store, db, rec, _ = env

    async def login_page(writer):
        body = b"<html>please log in</html>"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
    s = _oauth2_run(env, login_page, timeout=3.0, retry_schedule=[60.0])
    assert rec.batches(ok_only=False) == []
    assert (s.stats.batches, s.stats.events, s.stats.failures) == (0, 0, 1)
    assert len(s.pending) == 1 and len(db.pending("hook-1")) == 1
    st = s.status()
    assert st["retrying_batches"] == 1
    assert "tokens URL" in st["last_failure"]["response"]
    rows = db.batch_status("hook-1", 10)
    assert len(rows) == 1 and rows[0]["failure_code"] == "oauth2"


def test_a_token_answer_in_two_segments_is_read_whole(env):
    """A tokens URL whose JSON arrives in two TCP segments (a chunked answer, a TLS record
    boundary, a slow server): the token is the whole answer's.  Only the first segment
    was read, the JSON did not parse, and no batch could be sent."""
    _, _, rec, _ = env

    async def split(writer):
        body = b'{"access_token": "tok-split", "token_type": "bearer", "expires_in": 3600}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:12])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(body[12:])
        await writer.drain()
    s = _oauth2_run(env, split, timeout=3.0, retry_schedule=[60.0])
    assert s.stats.failures == 0, s.status()["last_failure"]
    assert [h.headers["authorization"] for h in rec.batches()] == ["Bearer tok-split"]
    assert s.stats.batches == 1


def test_a_2xx_whose_body_does_not_come_counts_as_sent_once(env):
    """A target that answers 200 with its header and then sends no body (or trickles it
    for longer than the timeout) has acknowledged the batch: it is counted sent and not
    POSTed again.  The sender waited for a body it never uses, the timeout made the 200
    a failure, and the target got the batch once per attempt until it was dropped."""
    store, db, _, _ = env

    async def header_only(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n"
                     b"\r\n")
        await writer.drain()

    async def main():
        target = RawServer(header_only)
        url = await target.start()
        hook = W.Hook(id="hook-1", name="test", target=url, events=frozenset(["delivery"]))
        db.set_cursor(hook.id, 0)
        store.append(_events(4))
        session = W.new_session()
        s = Sender(hook, db, store, session,
                   _cfg(timeout=0.5, retry_schedule=[0.05, 0.05]))
        s.load()
        s.start()
        try:
            await _until(lambda: s.stats.batches or s.stats.dropped_batches, 10,
                         "the batch sent or dropped")
            await asyncio.sleep(0.3)
        finally:
            await s.stop()
            await session.close()
            target.close()
        return s, target
    s, target = asyncio.run(main())
    assert (s.stats.batches, s.stats.failures, s.stats.dropped_batches) == (1, 0, 0)
    assert len(target.requests) == 1
    assert not s.pending and db.pending("hook-1") == []


def test_targets_that_never_answer_do_not_hold_up_another_webhook(env):
    """Four webhooks whose target accepts and never answers, each with max_in_flight
    POSTs open (64, the bound), and a fifth webhook whose target answers at once: its
    batches go at once.  The session's pool of 256 connections was shared by every
    webhook: the hung ones filled it, and the healthy one's POSTs waited for a
    connection until their timeout, failed, and waited again."""
    store, db, _, _ = env
    n_hung, in_flight = 4, 64

    async def never(writer):
        await asyncio.sleep(30)

    async def at_once(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()

    async def main():
        hung = RawServer(never)
        url = await hung.start()
        fine = RawServer(at_once)
        fine_url = await fine.start()
        store.append(_events(4 * in_flight))     # in_flight of each type
        cfg = _cfg(batch_size=1, max_in_flight=in_flight, timeout=6.0,
                   retry_schedule=[60.0])
        session = W.new_session()
        senders = []
        try:
            for i in range(n_hung):
                hook = W.Hook(id=f"hung-{i}", name=f"hung-{i}", target=url,
                              events=frozenset(["delivery"]))
                db.set_cursor(hook.id, 0)
                s = Sender(hook, db, store, session, cfg)
                s.load()
                s.start()
                senders.append(s)
            await _until(lambda: len(hung.requests) >= n_hung * in_flight, 10,
                         "every hung POST open")
            ok = W.Hook(id="healthy", name="healthy", target=fine_url,
                        events=frozenset(["bounce"]))
            db.set_cursor(ok.id, 0)
            healthy = Sender(ok, db, store, session, cfg)
            healthy.load()
            healthy.start()
            senders.append(healthy)
            t0 = time.monotonic()
            await _until(lambda: healthy.stats.batches >= in_flight or healthy.stats.failures,
                         10, "the healthy webhook's batches")
            took = time.monotonic() - t0
        finally:
            for s in senders:
                await s.stop()
            await session.close()
            hung.close()
            fine.close()
        return healthy, took, fine
    healthy, took, fine = asyncio.run(main())
    assert healthy.stats.failures == 0, healthy.status()["last_failure"]
    assert healthy.stats.batches == in_flight and took < 4.0
    assert len(fine.requests) == in_flight


def test_a_batch_dropped_after_its_last_attempt_counts_its_events_as_dropped(env):
    """A target answering 5xx to every attempt: the batch is dropped after the last one,
    and its events are counted in dropped_events (status.json, `mta queue`, and
    mta_webhook_dropped_events_total, whose help says so).  Only dropped_batches went up:
    the events counter, which an operator alerts on, said nothing was lost."""
    store, db, _, _ = env

    async def unavailable(writer):
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()

    async def main():
        target = RawServer(unavailable)
        url = await target.start()
        hook = W.Hook(id="hook-1", name="test", target=url,
                      events=frozenset(["delivery", "bounce"]))
        db.set_cursor(hook.id, 0)
        store.append(_events(8))
        session = W.new_session()
        s = Sender(hook, db, store, session, _cfg(retry_schedule=[0.05, 0.05]))
        s.load()
        s.start()
        try:
            await _until(lambda: s.stats.dropped_batches == 1 and not s.pending, 10,
                         "the batch dropped")
        finally:
            await s.stop()
            await session.close()
            target.close()
        return s, target
    s, target = asyncio.run(main())
    assert len(target.requests) == 3
    st = s.status()
    assert (st["dropped_batches"], st["events_sent"], st["pending_events"]) == (1, 0, 0)
    assert st["dropped_events"] == 4
    assert db.cursor("hook-1")[3] == 4          # counted durably too


def test_a_tokens_url_that_never_answers_fails_each_attempt_within_the_timeout(env):
    """A tokens URL that accepts and never answers, with four batches to send: each
    attempt fails after one timeout and the tokens URL is asked once for them all.  The
    batches took the token lock in turn and each fetched anew after the one before it
    had failed: the fourth attempt took four timeouts (64 at max_in_flight 64, ten
    minutes at the default timeout), and every round of retries asked the tokens URL
    once per batch."""
    store, db, rec, _ = env

    async def never(writer):
        await asyncio.sleep(30)

    async def main():
        tokens = RawServer(never)
        url = await tokens.start()
        hook = _hook(rec, auth_type="oauth2", auth_request_details={
            "url": url, "body": {"client_id": "cid", "client_secret": "secret",
                                 "grant_type": "client_credentials"}})
        db.set_cursor(hook.id, 0)
        store.append(_events(8))
        session = W.new_session()
        s = Sender(hook, db, store, session,
                   _cfg(batch_size=1, max_in_flight=4, timeout=0.5, retry_schedule=[60.0]))
        s.load()
        t0 = time.monotonic()
        s.start()
        try:
            await _until(lambda: s.stats.failures >= 4, 10, "four failed attempts")
            took = time.monotonic() - t0
        finally:
            await s.stop()
            await session.close()
            tokens.close()
        return s, took, tokens
    s, took, tokens = asyncio.run(main())
    assert rec.batches(ok_only=False) == []
    assert s.stats.failures == 4 and s.status()["retrying_batches"] == 4
    assert took < 1.2, f"the last attempt failed after {took:.1f}s (timeout 0.5s)"
    assert len(tokens.requests) == 1
    assert "tokens URL got timeout" in s.status()["last_failure"]["response"]


def test_the_apis_test_post_takes_a_200_whose_body_does_not_come(tmp_path):
    """Creating a webhook test-POSTs its target and validate POSTs a sample: a target
    that answers 200 and then sends its body slowly (or never) answered 200.  The wait
    for the body ran into the timeout and the API said the target gave no answer in
    time: the create was refused.  The answer is the 200, with the body that came."""
    import orjson

    from mta.acceptor import http as H
    from mta.config.schema import Config, WebhooksConfig

    async def slow_body(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()

    async def go():
        target = RawServer(slow_body)
        url = await target.start()
        api = W.Api(str(tmp_path), Config(webhooks=WebhooksConfig(timeout=0.5)),
                    asyncio.get_running_loop())
        try:
            made = await H._webhooks_call(api, b"POST", b"/api/v1/webhooks", b"",
                                          orjson.dumps({"name": "slow", "target": url,
                                                        "events": ["delivery"]}))
            wid = orjson.loads(made[1]).get("results", {}).get("id")
            checked = None
            if wid:
                checked = await H._webhooks_call(
                    api, b"POST", f"/api/v1/webhooks/{wid}/validate".encode(), b"",
                    orjson.dumps({"message": {"msys": {}}}))
            return made, checked, len(target.requests)
        finally:
            await api.close()
            target.close()
    made, checked, n = asyncio.run(go())
    assert made[0] == 200, made[1]
    assert checked[0] == 200, checked[1]
    view = orjson.loads(checked[1])["results"]["response"]
    assert view["status"] == 200 and view["body"] == ""
    assert n == 2
