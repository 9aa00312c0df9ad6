"""The events process (mta.events.main.Events) when its events store fills up."""
from __future__ import annotations

import threading
import time
import types

from mta.events import main as M
from mta.feedback import events_store as S

TOTAL = 3000            # events the fake shard has (about 3x what a 2 MiB store holds)


class FakeTail:
    """A shard with TOTAL events, 50 per poll, all recent (within the retention)."""

    def __init__(self):
        self.n = 0
        self.durable = None
        self.seg = self.off = 0
        self.unreadable = 0

    def poll(self, out: list) -> bool:
        for _ in range(min(50, TOTAL - self.n)):
            self.n += 1
            out.append({"type": "delivery", "event_id": f"e{self.n}",
                        "timestamp": time.time(), "subject": "x" * 2000,
                        "rcpt_to": f"u{self.n}@x.test"})
        return self.n < TOTAL

    def position(self):
        return None

    def _unmap(self):
        pass

    def close(self):
        pass


class FakeLog:
    def __init__(self):
        self.ids: list[str] = []

    def write(self, out):
        self.ids.extend(e["event_id"] for e in out)

    def sync(self):
        pass

    def rotation_due(self, now):
        return False

    def reopen(self):
        pass


def events_loop(tmp_path, store, first_checkpoint: float) -> M.Events:
    """The events process's loop (Events.run) over a FakeTail and a FakeLog into *store*,
    its first checkpoint and prune at *first_checkpoint* (time.monotonic())."""
    e = M.Events.__new__(M.Events)
    e.tails = [FakeTail()]
    e.log = FakeLog()
    e.sink = store
    e.cfg = types.SimpleNamespace(poll_interval=0.01, checkpoint_interval=3600)
    e.stopping = e.reopen = e.failed = e.store_full = False
    e.unstored = []
    e.pusher = None
    e.next_checkpoint = e.next_prune = first_checkpoint
    e.webhooks_enabled = False
    e.state_dir = str(tmp_path)
    e.published = types.SimpleNamespace(value=0)
    e.unreadable = types.SimpleNamespace(value=0)
    return e


def test_a_full_store_is_pruned_and_events_are_logged_once(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "ERROR_RETRY", 0.01)
    store = S.EventStore(str(tmp_path / "st"), map_size=2 << 20, retention=86400)
    # no checkpoint (and so no prune) on its own
    e = events_loop(tmp_path, store, time.monotonic() + 3600)
    run_until(e, lambda: e.tails[0].n >= TOTAL and not e.unstored
              and store.last_seq() >= TOTAL, 20)
    try:
        # the process went on: every event was stored (the oldest pruned to make room) ...
        assert store.last_seq() == TOTAL
        assert e.published.value == TOTAL
        assert store.read(TOTAL - 1, 1)[0][1]["event_id"] == f"e{TOTAL}"
        assert 0 < store.count() < TOTAL
        # ... and written to the log once each, not again on every retry of the append
        assert e.log.ids == [f"e{i}" for i in range(1, TOTAL + 1)]
    finally:
        store.close()


def expired(old: float, first: int, end: int) -> list[dict]:
    """Delivery events *first*..*end* - 1, from *old* on (past the retention)."""
    return [{"type": "delivery", "event_id": f"old{i}", "timestamp": old + i,
             "rcpt_to": f"u{i % 40}@x.test", "campaign_id": f"c{i % 3}",
             "message_id": f"m{i}"} for i in range(first, end)]


def run_until(e: M.Events, done, seconds: float = 30) -> None:
    """Run *e*'s loop in a thread until *done*() (or *seconds*), then stop it."""
    t = threading.Thread(target=e.run)
    t.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not done():
            time.sleep(0.05)
    finally:
        e.stopping = True
        t.join()


def assert_only_stored(store, total: int) -> None:
    """Every index entry names a stored event; the ids and the counts are *total*'s."""
    with store.env.begin() as txn:
        for name in ("rcpt", "msg", "camp", "type"):
            for _, tk in txn.cursor(db=store.idx[name]).iternext():
                assert txn.get(tk[8:], db=store.ev) is not None, (name, tk)
        assert txn.stat(store.ids)["entries"] == total
        assert sum(S._U64.unpack(v)[0] for k, v in txn.cursor(db=store.count_db)
                   if k.startswith(S._ALL)) == total


def test_the_sweep_runs_between_appends(tmp_path, monkeypatch):
    """A prune that deleted unreadable stored events left a walk of every index of the
    store (seconds at millions of events) in its transaction, and the events process's
    appends waited for it.  The process now prunes without it and runs the sweep a piece
    (a transaction) at a time between two turns of its reading: the shards' events are
    stored between the pieces, and the sweep ends with nothing of the damaged events
    left."""
    store = S.EventStore(str(tmp_path / "st"), map_size=64 << 20, retention=86400)
    old = time.time() - 2 * 86400
    store.append(expired(old, 0, 1000))
    for seq in range(5, 1000, 10):
        with store.env.begin(write=True, db=store.ev) as txn:
            k = S._U64.pack(seq)
            txn.put(k, bytes(txn.get(k)[:8]) + b"\xc1")
    pieces: list[int] = []              # last seq at each piece
    sweep = store.sweep

    def piece():
        pieces.append(store.last_seq())
        return sweep(max_entries=40)

    monkeypatch.setattr(store, "sweep", piece)
    e = events_loop(tmp_path, store, 0.0)     # a checkpoint (and its prune) at the first turn
    run_until(e, lambda: e.tails[0].n >= TOTAL and store.last_seq() >= 1000 + TOTAL
              and pieces and not store.sweeping())
    try:
        assert store.last_seq() == 1000 + TOTAL and store.count() == TOTAL
        # the sweep took many pieces, with the shards' events stored between them
        assert len(pieces) > 10 and pieces[-1] > pieces[0], pieces
        assert not store.sweeping()
        assert_only_stored(store, TOTAL)
    finally:
        store.close()


def test_the_prune_runs_between_appends(tmp_path, monkeypatch):
    """The events process pruned its store in one call of up to 1000 transactions back to
    back: after a lowered retention or a downtime, millions of deletions (tens of seconds)
    with no event stored meanwhile -- the shards' reports waited, webhooks and the Events
    API lagged.  It now runs the prune a transaction (bounded in deletions and time) at a
    time between two turns of its reading: the shards' events are stored between them,
    and in the end every expired event is gone, with its index entries and counts, and
    none of the recent ones."""
    store = S.EventStore(str(tmp_path / "st"), map_size=64 << 20, retention=86400)
    old = time.time() - 2 * 86400
    for i in range(0, 4000, 1000):
        store.append(expired(old, i, i + 1000))
    txns: list[int] = []                # last seq at each prune transaction
    prune_txn = store._prune_txn

    def txn(stop, keep_from_seq, chunk, *args, **kw):
        txns.append(store.last_seq())
        # (small transactions: many of them for 4,000 expired events)
        return prune_txn(stop, keep_from_seq, min(chunk, 40), *args, **kw)

    monkeypatch.setattr(store, "_prune_txn", txn)
    e = events_loop(tmp_path, store, 0.0)     # a checkpoint (and its prune) at the first turn
    run_until(e, lambda: e.tails[0].n >= TOTAL and store.last_seq() >= 4000 + TOTAL
              and store.count() == TOTAL)
    try:
        assert store.last_seq() == 4000 + TOTAL and store.count() == TOTAL
        # the prune took many transactions, with the shards' events stored between them
        assert len(txns) >= 100 and txns[-1] > txns[0], (len(txns), txns[:3], txns[-3:])
        assert_only_stored(store, TOTAL)
    finally:
        store.close()
