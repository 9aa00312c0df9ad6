"""The ``Idempotency-Key`` store: one SQLite database shared by every acceptor.

A request with an ``Idempotency-Key`` header is looked up by (scope, key),
where the scope identifies the API key that made it (a hash, never the key
itself).  :meth:`Store.begin` decides, in one write transaction:

- NEW: nobody has used the key within ``http.idempotency_window``; a row
  marking the request *in flight* (owner pid) is inserted, so a concurrent
  duplicate — in this acceptor or another — cannot inject too;
- REPLAY: the key was used with the same body and answered; the stored
  response is returned and nothing is injected;
- MISMATCH: the key was used with a different body → 422;
- IN_FLIGHT: the first request with this key is still being processed → 409.

:meth:`finish` stores the response of a request that injected something
(200); :meth:`abandon` forgets a request that injected nothing (an error), so
that it can be retried with the same key.  An in-flight row whose owner
process is gone (kill -9) or that is older than *stale_after* seconds is
taken over by the next request with that key: whatever the dead owner made
durable stays queued, so such a retry may duplicate — at least once, never
lost.

The database lives in the state directory (``idempotency.sqlite``), in WAL
mode with ``synchronous=NORMAL``: a commit survives the crash of any process
(not a power cut), and readers never block the writer.  Each acceptor opens it
after fork.  Calls are synchronous and short (one small transaction); rows
older than the window are deleted by :meth:`purge`.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import time

from mta import proc

NEW, REPLAY, MISMATCH, IN_FLIGHT = "new", "replay", "mismatch", "in_flight"

BUSY_TIMEOUT_MS = 5000     # wait for another acceptor's transaction at most this long
OPEN_ATTEMPTS = 100        # tries, 50 ms apart, to set up the database at start

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    scope     TEXT NOT NULL,
    key       TEXT NOT NULL,
    body_hash BLOB NOT NULL,
    created   REAL NOT NULL,
    owner     INTEGER NOT NULL,
    status    INTEGER,            -- NULL while the request is in flight
    response  BLOB,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_created ON requests (created);
"""


def body_hash(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


class Store:
    """One process's connection to the shared idempotency database."""

    def __init__(self, path: str, window: float, stale_after: float):
        self.path = path
        self.window = window
        self.stale_after = stale_after
        self.pid = os.getpid()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Several acceptors start at once: switching to WAL needs the database
        # to itself for a moment and may report "locked" instead of waiting.
        for attempt in range(OPEN_ATTEMPTS):
            try:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = NORMAL")
                self.db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError:
                if attempt == OPEN_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    def begin(self, scope: str, key: str, digest: bytes,
              now: float | None = None) -> tuple[str, int | None, bytes | None]:
        """Claim (scope, key) for a request with body hash *digest*: (verdict, status, body)."""
        now = time.time() if now is None else now
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT body_hash, created, owner, status, response FROM requests "
                             "WHERE scope = ? AND key = ?", (scope, key)).fetchone()
            if row is not None and row[1] >= now - self.window:
                stored_hash, created, owner, status, response = row
                if stored_hash != digest:
                    db.execute("COMMIT")
                    return MISMATCH, None, None
                if status is not None:
                    db.execute("COMMIT")
                    return REPLAY, status, response
                if (owner == self.pid or proc.alive(owner)) and created >= now - self.stale_after:
                    db.execute("COMMIT")
                    return IN_FLIGHT, None, None
            db.execute("INSERT OR REPLACE INTO requests (scope, key, body_hash, created, owner, "
                       "status, response) VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                       (scope, key, digest, now, self.pid))
            db.execute("COMMIT")
            return NEW, None, None
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def finish(self, scope: str, key: str, status: int, response: bytes) -> None:
        """Store the response of a request that injected something."""
        self.db.execute("UPDATE requests SET status = ?, response = ? WHERE scope = ? AND key = ? "
                        "AND owner = ?", (status, response, scope, key, self.pid))

    def touch(self, scope: str, key: str, now: float | None = None) -> None:
        """The request holding (scope, key) is still at work (a long injection: many
        recipients, or building paced by the spool's answers): its row is not stale."""
        now = time.time() if now is None else now
        self.db.execute("UPDATE requests SET created = ? WHERE scope = ? AND key = ? "
                        "AND owner = ? AND status IS NULL", (now, scope, key, self.pid))

    def abandon(self, scope: str, key: str) -> None:
        """Forget a request that injected nothing, so that it may be retried."""
        self.db.execute("DELETE FROM requests WHERE scope = ? AND key = ? AND owner = ? "
                        "AND status IS NULL", (scope, key, self.pid))

    def purge(self, now: float | None = None) -> int:
        """Delete rows older than the window; returns how many."""
        now = time.time() if now is None else now
        cur = self.db.execute("DELETE FROM requests WHERE created < ?", (now - self.window,))
        return cur.rowcount
