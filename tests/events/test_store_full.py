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


def test_a_full_store_is_pruned_and_events_are_logged_once(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "ERROR_RETRY", 0.01)
    store = S.EventStore(str(tmp_path / "st"), map_size=2 << 20, retention=86400)
    e = M.Events.__new__(M.Events)
    e.tails = [FakeTail()]
    e.log = FakeLog()
    e.sink = store
    e.cfg = types.SimpleNamespace(poll_interval=0.01, checkpoint_interval=3600)
    e.stopping = e.reopen = e.failed = e.store_full = False
    e.unstored = []
    e.pusher = None
    e.next_checkpoint = time.monotonic() + 3600     # no checkpoint (and so no prune) on its own
    e.next_prune = time.monotonic() + 3600
    e.webhooks_enabled = False
    e.state_dir = str(tmp_path)
    e.published = types.SimpleNamespace(value=0)
    e.unreadable = types.SimpleNamespace(value=0)
    t = threading.Thread(target=e.run)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and \
                not (e.tails[0].n >= TOTAL and not e.unstored and store.last_seq() >= TOTAL):
            time.sleep(0.05)
    finally:
        e.stopping = True
        t.join()
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
