"""The operator's hands on the queue: suspensions by domain, campaign or pool, bulk bounces.

A library (no role imports): the admin process writes the suspensions, every
spool shard reads them.

Suspensions live in one small JSON file, ``<state_dir>/suspensions.json``,
written by the admin listener only (``POST`` / ``DELETE
/api/admin/suspensions``; a temporary file, fsync'd, renamed, the directory
fsync'd), so they survive restarts.  Each spool shard looks at the file once
a second (a stat; re-read only when it changed) and holds back, at dispatch,
the recipients a suspension matches: they stay queued (and age: ``max_age``
still expires them) and are looked at again when a suspension ends.  A
suspension names any of ``domain`` (the recipient's), ``campaign``
(``campaign_id``) and ``pool`` (``ip_pool``, "default" without one); it
matches a recipient when every field it names matches.  Suspensions of a
receiving *site* or an egress *source* belong to delivery: they are entries
of the adaptive store (:mod:`mta.shaping.state`, rule ``admin``).

A bulk bounce (:class:`BounceOp`) fails every pending recipient a
:class:`Selector` matches, a batch at a time through the shard's group
commit, each with a ``bounce`` event of class 25 (Admin Failure) and, when
asked, a DSN to the sender.
"""
from __future__ import annotations

import collections
import os
import time

import msgspec

from mta.queueid import recipient_domain
from mta.store import sync_dir

FILE = "suspensions.json"
MAX_SUSPENSIONS = 1000            # in effect at once (bounded: matched at every dispatch)
MAX_FIELD = 255                   # characters of a selector field or a reason
SPOOL_FIELDS = ("domain", "campaign", "pool")
BOUNCE_CODE, BOUNCE_STATUS = 550, "5.0.0"
BOUNCE_CLASS = 25                 # SparkPost's Admin Failure
BOUNCE_RULE = "admin-bounce"
OPS_KEPT = 16                     # finished bulk bounces a shard still reports on


class Suspension(msgspec.Struct, kw_only=True):
    id: str
    domain: str = ""
    campaign: str = ""
    pool: str = ""
    reason: str = ""
    created: float = 0.0
    until: float = 0.0            # wall clock; 0: until resumed


_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(list[Suspension])


def path_of(state_dir: str) -> str:
    return os.path.join(state_dir, FILE)


def load(path: str) -> list[Suspension]:
    """The suspensions in the file (none when it is missing; ValueError when unreadable)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    try:
        return _DEC.decode(data) if data.strip() else []
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: {exc}") from None


def save(path: str, items: list[Suspension]) -> None:
    """Replace the file with *items*, durably (temporary file, fsync, rename, fsync dir)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, _ENC.encode(items))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    sync_dir(os.path.dirname(path) or ".")


def in_effect(items: list[Suspension], now: float) -> list[Suspension]:
    """The suspensions not yet run out (one that names nothing is never in effect: it
    would hold everything)."""
    return [s for s in items if (not s.until or s.until > now)
            and (s.domain or s.campaign or s.pool)]


def check_field(name: str, value: str) -> str:
    """A selector field as given by the operator, checked; ValueError names what is wrong."""
    if len(value) > MAX_FIELD:
        raise ValueError(f"{name}: longer than {MAX_FIELD} characters")
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"{name}: control characters are not allowed")
    return value.strip().lower() if name in ("domain", "site") else value.strip()


class Watcher:
    """A shard's view of the suspensions file: re-read when it changes, matched at dispatch."""

    def __init__(self, path: str, log):
        self.path = path
        self.log = log
        self.stamp = None
        self.items: list[Suspension] = []
        self.next_end = 0.0           # the earliest 'until' still ahead (0: none)

    def refresh(self, now: float) -> bool:
        """Look at the file; True when what is in effect changed (a suspension came, went
        or ran out)."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        changed = False
        if stamp != self.stamp:
            try:
                items = load(self.path)
            except (OSError, ValueError) as exc:
                self.log.error("suspensions: %s; keeping the ones read before", exc)
                self.stamp = stamp
                return False
            self.stamp = stamp
            self.items = items
            changed = True
        if self.next_end and now >= self.next_end:
            changed = True
        if changed:
            self.items = in_effect(self.items, now)
            ends = [s.until for s in self.items if s.until]
            self.next_end = min(ends) if ends else 0.0
        return changed

    def match(self, domain: str, params: dict) -> Suspension | None:
        """The suspension that holds back a message's recipients at *domain*, if any."""
        return self.match_values(domain, params.get("campaign_id"),
                                 params.get("ip_pool") or "default")

    def match_values(self, domain: str, campaign, pool: str) -> Suspension | None:
        """:meth:`match` given the message's campaign and pool (as the queue index keeps
        them: the envelope is not in memory at dispatch)."""
        for s in self.items:
            if s.domain and s.domain != domain:
                continue
            if s.campaign and s.campaign != campaign:
                continue
            if s.pool and s.pool != pool:
                continue
            return s
        return None


class Selector(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which queued recipients a bulk operation takes (every named field must match;
    one that names nothing is refused by the shard: it would take the whole queue)."""

    domains: frozenset[str] = frozenset()   # recipient domains (a site's, when one was named)
    campaign: str = ""
    pool: str = ""

    def empty(self) -> bool:
        return not (self.domains or self.campaign or self.pool)

    def matches(self, rcpt: str, params: dict) -> bool:
        if self.domains and recipient_domain(rcpt) not in self.domains:
            return False
        if self.campaign and self.campaign != params.get("campaign_id"):
            return False
        if self.pool and self.pool != (params.get("ip_pool") or "default"):
            return False
        return True


class BounceOp:
    """One bulk bounce in a shard: the messages still to do, and counts for progress."""

    def __init__(self, op: str, selector: Selector, reason: str, dsn: bool):
        self.op = op
        self.selector = selector
        self.reason = reason
        self.dsn = dsn
        self.todo: collections.deque[str] = collections.deque()
        self.total = 0                # recipients matched when it started
        self.done = 0                 # of them bounced (durably)
        self.started = time.time()
        self.finished = 0.0

    def text(self) -> str:
        return f"bounced by the operator: {self.reason}" if self.reason else \
            "bounced by the operator"

    def view(self) -> dict:
        return {"id": self.op, "total": self.total, "done": self.done,
                "finished": bool(self.finished), "started": self.started}
