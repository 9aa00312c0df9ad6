"""The webhooks' durable state: API-created webhooks, cursors and batches (SQLite).

Leaf library (no sockets, no bus), shared by the acceptors (the
``/api/v1/webhooks`` API writes webhook definitions and reads batch status)
and the ``webhooks`` process (cursors and batches).  One file,
``<state_dir>/webhooks/webhooks.sqlite`` (:func:`path_in`), in WAL mode with
``synchronous=FULL``: a commit returns after the WAL is fsynced, so a batch
stored before its first POST survives kill -9 and power loss.  SQLite because
several processes write it (every acceptor, the webhooks process) with
transactions across tables, the write rate is one row per batch (not per
event), and the batch-status call is a query; LMDB would need hand-made
indexes for the same.

Tables:

- ``webhook``: ``id`` (UUID), ``doc`` (the webhook as JSON, the shape the API
  returns minus ``id`` and the timestamps), created / updated times.
- ``cursor``: per webhook id, ``seq``: every event of the events store with a
  seq at or below it is either in a stored batch or did not match the
  webhook's filter (or was dropped at the backlog bound); ``last_successful`` /
  ``last_failure`` (Unix seconds); ``dropped`` (events dropped, counted).
- ``batch``: one row per batch: id (UUID, the ``X-MessageSystems-Batch-ID``),
  webhook id, target, seq range, event count, the body (the exact JSON array
  POSTed on every attempt), attempts, next attempt time, state (PENDING,
  DELIVERED, DROPPED), the last attempt's time, response code, failure code
  and latency, and ``failed`` (some attempt failed).  A batch delivered at
  its first attempt is deleted; one that failed at least once is kept (for
  ``batch-status``) until ``status_retention`` after its last attempt.
- ``seen``: when each ``[[webhook]]`` table was first seen (a new one gets the
  events stored since then, even if the process restarts before it read any).
- ``cursor_store``: per webhook id, the id of the events store its cursor's
  seq refers to (:meth:`mta.feedback.events_store.EventStore.store_id`).
- ``inactive``: per webhook id made inactive (``active: false``, by the API or
  seen so in a ``[[webhook]]`` table), ``until``: when it was made active again
  (NULL while it is inactive, or when a configuration change made it active:
  then the start of the webhooks process that sees it active).  The sender that
  starts for it moves its cursor past the events stored before ``until``
  (:meth:`mta.webhooks.sender.Sender.load`) and deletes the row.
- ``meta``: ``generation``, bumped by every API change of a webhook, so the
  webhooks process notices changes with one cheap read.
"""
from __future__ import annotations

import os
import sqlite3
import time
import uuid

import orjson

from mta import proc
from mta.store import make_dirs, sync_dir

PENDING = 0
DELIVERED = 1
DROPPED = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook (
    id TEXT PRIMARY KEY, doc BLOB NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cursor (
    webhook_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, last_successful REAL,
    last_failure REAL, dropped INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS batch (
    id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, target TEXT NOT NULL,
    first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, n INTEGER NOT NULL,
    body BLOB NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL, state INTEGER NOT NULL DEFAULT 0, ts REAL,
    response_code TEXT NOT NULL DEFAULT '', failure_code TEXT NOT NULL DEFAULT '',
    latency INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS batch_by_hook ON batch (webhook_id, state, next_at);
CREATE INDEX IF NOT EXISTS batch_by_ts ON batch (failed, ts);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (webhook_id TEXT PRIMARY KEY, t REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cursor_store (webhook_id TEXT PRIMARY KEY, store_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS inactive (webhook_id TEXT PRIMARY KEY, until REAL);
"""

DB_NAME = "webhooks.sqlite"
MIN_SEQ_NAME = "min_seq"


def dir_in(state_dir: str) -> str:
    return os.path.join(state_dir, "webhooks")


def status_path(state_dir: str) -> str:
    """The webhooks process's status file (rewritten every second; mta.obs.queue reads it)."""
    return os.path.join(dir_in(state_dir), "status.json")


def path_in(state_dir: str) -> str:
    return os.path.join(dir_in(state_dir), DB_NAME)


def read_min_seq(state_dir: str) -> int | None:
    """The lowest seq of the events store the webhooks still need (``prune``'s
    ``keep_from_seq``), from ``<state_dir>/webhooks/min_seq``; None when the
    file is missing (no webhooks process has run: nothing is held back)."""
    try:
        with open(os.path.join(dir_in(state_dir), MIN_SEQ_NAME), "rb") as fh:
            text = fh.read(64).strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def write_min_seq(state_dir: str, seq: int) -> None:
    """Replace the min_seq file atomically and durably (write, fsync, rename, fsync dir)."""
    d = dir_in(state_dir)
    proc.replace_file(os.path.join(d, MIN_SEQ_NAME), b"%d\n" % seq, durable=True)
    sync_dir(d)


class Batch:
    """One stored batch, as the webhooks process handles it."""

    __slots__ = ("id", "webhook_id", "target", "first_seq", "last_seq", "n", "body",
                 "attempts", "next_at", "failed")

    def __init__(self, id, webhook_id, target, first_seq, last_seq, n, body, attempts=0,
                 next_at=0.0, failed=0):
        self.id = id
        self.webhook_id = webhook_id
        self.target = target
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.n = n
        self.body = body
        self.attempts = attempts
        self.next_at = next_at
        self.failed = failed


class WebhookDB:
    """One connection to the webhooks' SQLite file (open it after fork)."""

    def __init__(self, path: str, timeout: float = 10.0):
        # (durably: SQLite syncs the file and, when it makes the WAL, the directory's
        # entries, never the directory's own name -- a power cut took them all)
        make_dirs(os.path.dirname(path))
        self.path = path
        self.db = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------- webhooks

    def generation(self) -> int:
        row = self.db.execute("SELECT v FROM meta WHERE k='generation'").fetchone()
        return row[0] if row else 0

    def _bump(self) -> None:
        self.db.execute("INSERT INTO meta (k, v) VALUES ('generation', 1) "
                        "ON CONFLICT (k) DO UPDATE SET v = v + 1")

    def webhooks(self) -> list[tuple[str, dict, float, float]]:
        """Every API-created webhook: (id, doc, created, updated), oldest first."""
        rows = self.db.execute("SELECT id, doc, created, updated FROM webhook "
                               "ORDER BY created, id").fetchall()
        return [(i, orjson.loads(d), c, u) for i, d, c, u in rows]

    def get(self, wid: str) -> dict | None:
        row = self.db.execute("SELECT doc FROM webhook WHERE id=?", (wid,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM webhook").fetchone()[0]

    def create(self, doc: dict, max_webhooks: int) -> str | None:
        """Store a new webhook; its id, or None when there are max_webhooks already."""
        wid = str(uuid.uuid4())
        now = time.time()
        with self._tx():
            if self.count() >= max_webhooks:
                return None
            self.db.execute("INSERT INTO webhook (id, doc, created, updated) VALUES (?,?,?,?)",
                            (wid, orjson.dumps(doc), now, now))
            if not doc.get("active", True):
                self._set_inactive(wid, None)
            self._bump()
        return wid

    def update(self, wid: str, doc: dict) -> bool:
        """Replace the doc of *wid*; a change of ``active`` is recorded (``inactive``)."""
        now = time.time()
        with self._tx():
            row = self.db.execute("SELECT doc FROM webhook WHERE id=?", (wid,)).fetchone()
            cur = self.db.execute("UPDATE webhook SET doc=?, updated=? WHERE id=?",
                                  (orjson.dumps(doc), now, wid))
            if row is not None:
                was = orjson.loads(row[0]).get("active", True)
                now_active = doc.get("active", True)
                if was and not now_active:
                    self._set_inactive(wid, None)
                elif now_active and not was:
                    self._set_inactive(wid, now)
            self._bump()
        return cur.rowcount > 0

    def _set_inactive(self, wid: str, until: float | None) -> None:
        self.db.execute("INSERT INTO inactive (webhook_id, until) VALUES (?,?) "
                        "ON CONFLICT (webhook_id) DO UPDATE SET until=excluded.until",
                        (wid, until))

    def mark_inactive(self, wid: str) -> None:
        """The webhooks process saw *wid* inactive (a [[webhook]] table: the API records
        its own changes); a row already there is kept."""
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO inactive (webhook_id, until) VALUES (?, NULL)",
                            (wid,))

    def inactive(self, wid: str) -> tuple[float | None] | None:
        """(until,) when *wid* was inactive since its sender last started, else None."""
        return self.db.execute("SELECT until FROM inactive WHERE webhook_id=?",
                               (wid,)).fetchone()

    def resume(self, wid: str, seq: int) -> None:
        """A webhook active again: its cursor at *seq* and its inactive row gone, at once."""
        with self._tx():
            self._set_cursor(wid, seq)
            self.db.execute("DELETE FROM inactive WHERE webhook_id=?", (wid,))

    def delete(self, wid: str) -> bool:
        """Remove a webhook, its cursor and its batches (pending ones are not sent)."""
        with self._tx():
            cur = self.db.execute("DELETE FROM webhook WHERE id=?", (wid,))
            if cur.rowcount:
                self.db.execute("DELETE FROM cursor WHERE webhook_id=?", (wid,))
                self.db.execute("DELETE FROM cursor_store WHERE webhook_id=?", (wid,))
                self.db.execute("DELETE FROM inactive WHERE webhook_id=?", (wid,))
                self.db.execute("DELETE FROM batch WHERE webhook_id=?", (wid,))
            self._bump()
        return cur.rowcount > 0

    def first_seen(self, wid: str, now: float) -> float:
        """When the webhook *wid* was first seen (recorded now if never)."""
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO seen (webhook_id, t) VALUES (?,?)",
                            (wid, now))
            return self.db.execute("SELECT t FROM seen WHERE webhook_id=?",
                                   (wid,)).fetchone()[0]

    def _tx(self):
        return _Tx(self.db)

    # ------------------------------------------------------ cursors, batches

    def cursor(self, wid: str) -> tuple[int, float | None, float | None, int] | None:
        """(seq, last_successful, last_failure, dropped) or None for a new webhook."""
        return self.db.execute("SELECT seq, last_successful, last_failure, dropped FROM cursor "
                               "WHERE webhook_id=?", (wid,)).fetchone()

    def cursors(self) -> dict[str, tuple]:
        return {r[0]: r[1:] for r in self.db.execute(
            "SELECT webhook_id, seq, last_successful, last_failure, dropped FROM cursor")}

    def cursor_store(self, wid: str) -> int | None:
        """The id of the events store the cursor of *wid* was saved for (None: not known)."""
        row = self.db.execute("SELECT store_id FROM cursor_store WHERE webhook_id=?",
                              (wid,)).fetchone()
        return row[0] if row else None

    def set_cursor_store(self, wid: str, store_id: int) -> None:
        with self._tx():
            self.db.execute("INSERT INTO cursor_store (webhook_id, store_id) VALUES (?,?) "
                            "ON CONFLICT (webhook_id) DO UPDATE SET store_id=excluded.store_id",
                            (wid, store_id))

    def set_cursor(self, wid: str, seq: int, dropped: int = 0) -> None:
        with self._tx():
            self._set_cursor(wid, seq, dropped)

    def _set_cursor(self, wid: str, seq: int, dropped: int = 0) -> None:
        self.db.execute("INSERT INTO cursor (webhook_id, seq, dropped) VALUES (?,?,?) "
                        "ON CONFLICT (webhook_id) DO UPDATE SET seq=excluded.seq, "
                        "dropped=dropped+excluded.dropped", (wid, seq, dropped))

    def add_batch(self, b: Batch, cursor_seq: int) -> None:
        """Store *b* and move the webhook's cursor to *cursor_seq*, in one durable commit."""
        with self._tx():
            self.db.execute("INSERT INTO batch (id, webhook_id, target, first_seq, last_seq, n, "
                            "body, created, attempts, next_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (b.id, b.webhook_id, b.target, b.first_seq, b.last_seq, b.n, b.body,
                             time.time(), b.attempts, b.next_at))
            self._set_cursor(b.webhook_id, cursor_seq)

    def pending(self, wid: str) -> list[Batch]:
        rows = self.db.execute(
            "SELECT id, webhook_id, target, first_seq, last_seq, n, body, attempts, next_at, "
            "failed FROM batch WHERE webhook_id=? AND state=? ORDER BY first_seq",
            (wid, PENDING)).fetchall()
        return [Batch(*r) for r in rows]

    def pending_counts(self) -> dict[str, tuple[int, int]]:
        """Per webhook: (pending batches, events in them)."""
        return {r[0]: (r[1], r[2]) for r in self.db.execute(
            "SELECT webhook_id, count(*), coalesce(sum(n), 0) FROM batch WHERE state=? "
            "GROUP BY webhook_id", (PENDING,))}

    def attempted(self, b: Batch, ok: bool, now: float, response_code: str, failure_code: str,
                  latency_ms: int, next_at: float | None) -> None:
        """Record an attempt: delivered (*ok*), failed with a retry at *next_at*, or failed
        for the last time (*next_at* None: dropped)."""
        with self._tx():
            if ok:
                if b.failed:
                    self.db.execute("UPDATE batch SET state=?, attempts=?, ts=?, "
                                    "response_code=?, failure_code='', latency=?, body=x'' "
                                    "WHERE id=?", (DELIVERED, b.attempts, now, response_code,
                                                   latency_ms, b.id))
                else:
                    self.db.execute("DELETE FROM batch WHERE id=?", (b.id,))
                self.db.execute("UPDATE cursor SET last_successful=? WHERE webhook_id=?",
                                (now, b.webhook_id))
            else:
                state = PENDING if next_at is not None else DROPPED
                self.db.execute("UPDATE batch SET state=?, attempts=?, next_at=?, ts=?, "
                                "response_code=?, failure_code=?, latency=?, failed=1"
                                + (", body=x''" if state == DROPPED else "") + " WHERE id=?",
                                (state, b.attempts, next_at or now, now, response_code,
                                 failure_code, latency_ms, b.id))
                # (a dropped batch's events are dropped events, as those skipped at
                # the backlog bound)
                self.db.execute("UPDATE cursor SET last_failure=?, dropped=dropped+? "
                                "WHERE webhook_id=?",
                                (now, b.n if state == DROPPED else 0, b.webhook_id))

    def batch_status(self, wid: str, limit: int) -> list[dict]:
        rows = self.db.execute(
            "SELECT id, ts, attempts, response_code, failure_code, latency, n FROM batch "
            "WHERE webhook_id=? AND failed=1 ORDER BY ts DESC LIMIT ?", (wid, limit)).fetchall()
        return [{"batch_id": i, "ts": _iso(ts), "attempts": a, "response_code": rc,
                 "failure_code": fc, "latency": lat, "batch_size": n, "webhook_id": wid}
                for i, ts, a, rc, fc, lat, n in rows]

    def purge(self, now: float, retention: float) -> int:
        """Delete finished batches whose last attempt is older than *retention* seconds."""
        with self._tx():
            cur = self.db.execute("DELETE FROM batch WHERE state!=? AND ts<?",
                                  (PENDING, now - retention))
        return cur.rowcount

    def forget(self, keep: set[str]) -> int:
        """Delete cursors and batches of webhooks not in *keep* (removed from the TOML)."""
        ids = [r[0] for r in self.db.execute("SELECT webhook_id FROM cursor")] + \
            [r[0] for r in self.db.execute("SELECT DISTINCT webhook_id FROM batch")] + \
            [r[0] for r in self.db.execute("SELECT webhook_id FROM inactive")]
        gone = set(ids) - keep
        with self._tx():
            for wid in gone:
                self.db.execute("DELETE FROM seen WHERE webhook_id=?", (wid,))
                self.db.execute("DELETE FROM cursor WHERE webhook_id=?", (wid,))
                self.db.execute("DELETE FROM cursor_store WHERE webhook_id=?", (wid,))
                self.db.execute("DELETE FROM inactive WHERE webhook_id=?", (wid,))
                self.db.execute("DELETE FROM batch WHERE webhook_id=?", (wid,))
        return len(gone)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception)."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, et, ev, tb):
        self.db.execute("COMMIT" if et is None else "ROLLBACK")
        return False


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    t = time.gmtime(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + ".%03dZ" % (int(ts * 1000) % 1000)
