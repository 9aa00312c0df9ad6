"""The node's small stores survive a power cut from their very first commit.

Each of them makes its directory inside the state directory on first use.  A
commit it makes durable (an fsync of its file) is worth nothing after a power
cut if the directory's name, or the file's name in it, was never made durable
(a directory fsync): the whole store is gone.  crashfs (tests/crashfs.py) keeps
exactly what fsync and directory fsync made durable; the state directory itself
is made durably here (as the supervisor makes it), the stores make theirs.
"""
from __future__ import annotations

import os

import pytest

from crashfs import CrashFS

from mta.api import webhookdb
from mta.feedback.suppression import SuppressionList
from mta.shaping.state import Entry, Store
from mta.store import make_dirs


@pytest.fixture
def fs(tmp_path):
    fs = CrashFS(str(tmp_path / "mnt"), str(tmp_path / "image"), str(tmp_path / "crashfs.log"))
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


@pytest.fixture
def state(fs):
    path = os.path.join(fs.mountpoint, "state")
    make_dirs(path)
    return path


def test_a_stored_webhook_batch_and_cursor_survive_a_power_cut(fs, state):
    """add_batch commits the batch and the cursor past its events (synchronous=FULL)
    before the first POST; a power cut that took the database let the cursor's events
    go unsent and the batch with them."""
    db = webhookdb.WebhookDB(webhookdb.path_in(state))
    db.add_batch(webhookdb.Batch("b1", "w1", "http://127.0.0.1:1/", 1, 5, 5, b"[]"), 5)
    db.close()
    fs.crash()
    db = webhookdb.WebhookDB(webhookdb.path_in(state))
    try:
        assert db.cursor("w1") is not None and db.cursor("w1")[0] == 5
        assert [b.id for b in db.pending("w1")] == ["b1"]
    finally:
        db.close()


def test_the_webhooks_min_seq_survives_a_power_cut(fs, state):
    db = webhookdb.WebhookDB(webhookdb.path_in(state))
    db.close()
    webhookdb.write_min_seq(state, 42)
    fs.crash()
    assert webhookdb.read_min_seq(state) == 42


def test_a_suppression_entry_survives_a_power_cut(fs, state):
    """An entry added through the API (answered 200 after the synced commit) must hold
    after a power cut, also when it was the list's first."""
    sl = SuppressionList(os.path.join(state, "suppression"), 1 << 24)
    assert sl.put_many([("someone@example.com", 3, "asked")]) == 2   # (one per type)
    sl.close()
    fs.crash()
    sl = SuppressionList(os.path.join(state, "suppression"), 1 << 24)
    try:
        assert sl.check("someone@example.com", transactional=True)
    finally:
        sl.close()


def test_an_adaptive_entry_survives_a_power_cut(fs, state):
    """put() fsyncs the entry and its directory, but the directory's own name in the state
    directory was never made durable: the first suspension went with it."""
    st = Store(os.path.join(state, "adaptive"))
    e = Entry(id="e1", kind="suspend", scope="site", site="mx.example.com", rule="r",
              until=4_000_000_000.0)
    assert st.put(e)
    fs.crash()
    assert list(Store(os.path.join(state, "adaptive")).entries) == ["e1"]


def test_the_state_directory_the_supervisor_makes_survives_a_power_cut(fs, tmp_path):
    """The supervisor made the state directory with os.makedirs, then the spool in it
    durably: the spool's own name was synced, the state directory's name was not, and a
    power cut after the first start took the spool and every store with it."""
    from mta import config as mconfig
    from mta.supervisor.main import Supervisor

    state = os.path.join(fs.mountpoint, "var", "mta")
    path = tmp_path / "mta.toml"
    path.write_text(f'[server]\nstate_dir = "{state}"\n')
    sup = Supervisor(mconfig.load(str(path)), str(path))
    sup.prepare()
    fs.crash()
    assert os.path.isfile(os.path.join(state, "spool", "SHARDS"))


def test_an_event_a_reader_was_given_keeps_its_seq_after_a_power_cut(fs, state):
    """The webhooks read the events store up to its newest commit and move their cursor
    past what they read, durably (add_batch), at once.  A commit whose meta page was not
    synced (NOMETASYNC) went at a power cut: after it the events process stored other
    events under the same seqs, and the webhooks' cursor skipped them, never sent."""
    from mta.feedback.events_store import EventStore

    def event(i):
        return {"type": "delivery", "event_id": str(i), "timestamp": "1700000000",
                "message_id": "%020x" % i, "rcpt_to": f"r{i}@example.com"}

    path = os.path.join(state, "events")
    st = EventStore(path, map_size=1 << 24, retention=86400.0)
    st.append([event(1)])
    st.sync()                       # a checkpoint of the events process
    st.append([event(2), event(3)])
    # (what a reader -- the webhooks process -- is given once the commit returned; LMDB
    # opens an environment once per process, so this handle reads it)
    given = [(seq, e["event_id"]) for seq, e in st.read(0, 100)]
    st.close()
    fs.crash()
    st = EventStore(path, map_size=1 << 24, retention=86400.0)
    try:
        st.append([event(4)])       # (the first event the node makes after the restart)
        now = dict((seq, e["event_id"]) for seq, e in st.read(0, 100))
        assert [(seq, now.get(seq)) for seq, _ in given] == given
    finally:
        st.close()


def test_a_cancelled_adaptive_entry_stays_cancelled_after_a_power_cut(fs, state):
    """An operator's cancel (DELETE /api/admin/rules/..., POST .../resume, mta rules cancel)
    unlinked the entry's file and answered, but the directory was not synced: a power cut
    brought the suspension back, holding the site's mail again until it ran out."""
    from mta.shaping.state import cancel_entries, list_entries

    d = os.path.join(state, "adaptive")
    st = Store(d)
    assert st.put(Entry(id="e1", kind="suspend", scope="site", site="mx.example.com",
                        rule="r", until=4_000_000_000.0))
    assert [e.id for e in cancel_entries(d, "e1")] == ["e1"]
    fs.crash()
    assert list_entries(d) == []
