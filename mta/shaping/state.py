"""The durable, node-wide state of adaptive delivery: suspensions, throttles, back-offs.

One small JSON file per entry in ``<state_dir>/adaptive/`` (written to a
temporary file, fsync'd, renamed; the directory fsync'd), named by a hash of
what it applies to, so that a new decision about the same thing replaces the
old one.  Every delivery process reads the directory about once a second
(:meth:`Store.refresh`: a listing and a stat per file, a file re-read only
when it changed); ``mta rules list`` / ``cancel`` read and delete the same
files.  A library (no role imports), so the ``mta`` command may use it too.
The decisions themselves are made in :mod:`mta.delivery.adaptive`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time

import msgspec

from mta import proc
from mta.store import sync_dir

log = logging.getLogger("mta.delivery.adaptive")

__all__ = ["ADMIN_RULE", "Entry", "Store", "entry_id", "list_entries", "cancel_entries", "STORE_DIR",
           "SUSPEND", "THROTTLE", "BACKOFF", "WARMUP"]

STORE_DIR = "adaptive"
ADMIN_RULE = "admin"            # the rule name of a suspension the operator put in effect
SUSPEND, THROTTLE, BACKOFF, WARMUP = "suspend", "throttle", "backoff", "warmup"
MAX_REPLY = 300                 # characters of a matched reply kept in an entry
MAX_FILE = 64 * 1024            # an entry file larger than this is not read
PLATEAU = 0.9                   # of the rate that failed: where back-off recovery pauses


class Entry(msgspec.Struct, kw_only=True):
    """One suspension, throttle or back-off in effect (one file in the store)."""

    id: str
    kind: str                       # suspend | throttle | backoff | warmup
    scope: str                      # source_site | site | source
    source: str = ""                # "" when the scope is site
    site: str = ""                  # "" when the scope is source
    rule: str = ""                  # the rule's name; "backoff" for automatic back-off
    reply: str = ""                 # the reply that fired it
    stage: str = ""
    created: float = 0.0            # wall clock (warmup: the source's first use)
    until: float = 0.0              # wall clock end; 0: none (back-off ends by recovery)
    connection_limit: int | None = None
    max_message_rate: float | None = None     # per second
    # back-off
    rate: float = 0.0               # the rate set at the last decrease (per second)
    ceiling: float = 0.0            # where recovery ends (per second)
    decreased: float = 0.0          # wall clock of the last decrease
    step: float = 0.0               # per second added each recover_interval
    interval: float = 0.0           # seconds between steps (scaled)
    conn_base: int = 0              # the connection limit when back-off began
    level: int = 0                  # decreases so far
    failed_at: float = 0.0          # the rate that drew too many deferrals (per second)
    hold: int = 0                   # steps that stay under 0.9 x failed_at before probing

    def current_rate(self, now: float) -> float:
        """A back-off's rate now: the rate set at the last decrease plus the steps since;
        for the first ``hold`` steps no higher than 0.9 x the rate that failed (so it
        stays just under what the site takes), then probing upwards again."""
        n = self.steps(now)
        r = self.rate + n * self.step
        if n < self.hold and self.failed_at > 0:
            r = min(r, max(self.rate, PLATEAU * self.failed_at))
        return min(self.ceiling, r)

    def steps(self, now: float) -> int:
        return max(0, math.floor((now - self.decreased) / self.interval)) if self.interval else 0


@functools.lru_cache(maxsize=4096)     # (asked at every delivery attempt; a hash each time)
def entry_id(kind: str, scope: str, source: str, site: str) -> str:
    key = f"{kind if kind in (BACKOFF, WARMUP) else 'rule'}|{kind}|{scope}|{source}|{site}"
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()


_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(Entry)


class Store:
    """The entries in ``<state_dir>/adaptive/``, as this process last read them."""

    def __init__(self, directory: str, max_entries: int = 10_000):
        self.directory = directory
        self.max_entries = max_entries
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            # (its name made durable: put() syncs the entries in it, not the directory's
            # own name in its parent -- a power cut took the first entries with it)
            sync_dir(os.path.dirname(os.path.abspath(directory)))
        self.entries: dict[str, Entry] = {}
        self._seen: dict[str, int] = {}          # file name -> st_mtime_ns read
        self.removed: list[Entry] = []           # gone from disk since the caller looked
        self._warned = False
        self._sweep_temporary()
        self.refresh()

    def _sweep_temporary(self) -> None:
        """Remove the temporary files of writers that died mid-write (kill -9 between
        the open and the rename of :meth:`put`: ``<id>.json.<pid>.tmp``).  A file
        whose writer is alive is left to it.  Nothing reads them, but without this they
        would pile up in the directory for ever, one per killed write."""
        try:
            names = [n for n in os.listdir(self.directory) if n.endswith(".tmp")]
        except OSError:
            return
        for name in names:
            pid = name[:-4].rpartition(".")[2]
            if not pid.isdigit():
                continue
            if proc.alive(int(pid)):
                continue                        # its writer is alive (or the pid reused)
            try:
                os.unlink(os.path.join(self.directory, name))
            except OSError:
                pass

    def path(self, eid: str) -> str:
        return os.path.join(self.directory, eid + ".json")

    def refresh(self) -> bool:
        """Read what changed on disk; True when the set of entries changed."""
        try:
            names = [n for n in os.listdir(self.directory) if n.endswith(".json")]
        except OSError as exc:
            log.warning("cannot read %s: %s", self.directory, exc)
            return False
        changed = False
        present = set()
        for name in names:
            eid = name[:-5]
            present.add(eid)
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                present.discard(eid)
                continue
            if self._seen.get(eid) == st.st_mtime_ns and eid in self.entries:
                continue
            entry = self._read(path)
            self._seen[eid] = st.st_mtime_ns
            if entry is None or entry.id != eid:
                continue
            if self.entries.get(eid) != entry:
                self.entries[eid] = entry
                changed = True
        for eid in list(self.entries):
            if eid not in present:
                gone = self.entries.pop(eid)
                self._seen.pop(eid, None)
                self.removed.append(gone)
                changed = True
        return changed

    @staticmethod
    def _read(path: str) -> Entry | None:
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE + 1)
        except OSError:
            return None
        if len(data) > MAX_FILE:
            log.warning("%s: larger than %d bytes; ignored", path, MAX_FILE)
            return None
        try:
            return _DEC.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("%s: not an adaptive entry (%s); ignored", path, exc)
            return None

    def reread(self, eid: str) -> Entry | None:
        """The entry *eid* as it is on disk now (another process may have just written
        it); updates this store's copy."""
        path = self.path(eid)
        try:
            st = os.stat(path)
        except OSError:
            return None
        if self._seen.get(eid) == st.st_mtime_ns and eid in self.entries:
            return self.entries[eid]
        entry = self._read(path)
        if entry is None or entry.id != eid:
            return None
        self.entries[eid] = entry
        self._seen[eid] = st.st_mtime_ns
        return entry

    def put(self, entry: Entry, strict: bool = False) -> bool:
        """Write *entry* durably (replacing one with the same id); False when full.

        A write that fails is logged and the entry held in this process only (a
        delivery process's own); *strict*: the OSError is raised instead and nothing
        is held (a process that only writes it for the others: the admin API)."""
        if entry.id not in self.entries and len(self.entries) >= self.max_entries:
            if not self._warned:
                self._warned = True
                log.warning("adaptive store full (%d entries, backoff.max_entries): %s %s "
                            "for %s/%s not recorded", self.max_entries, entry.kind, entry.rule,
                            entry.source, entry.site)
            return False
        path = self.path(entry.id)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, _ENC.encode(entry))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            sync_dir(self.directory)
        except OSError as exc:
            log.warning("cannot record %s %s for %s/%s: %s", entry.kind, entry.rule,
                        entry.source, entry.site, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if strict:
                raise
            # Still holds in this process.
        self.entries[entry.id] = entry
        try:
            self._seen[entry.id] = os.stat(path).st_mtime_ns
        except OSError:
            pass
        return True

    def remove(self, eid: str) -> None:
        self.entries.pop(eid, None)
        self._seen.pop(eid, None)
        try:
            os.unlink(self.path(eid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.path(eid), exc)


def entry_view(e: Entry, now: float, time_scale: float = 1.0) -> dict:
    """One entry as the operator sees it (``mta rules list --json``, GET
    /api/admin/rules): its fields, ``left`` (seconds, None without an end), a
    back-off's ``current_rate`` and ``step_no``, a warm-up's ``day``."""
    d = msgspec.to_builtins(e)
    d["left"] = round(e.until - now, 1) if e.until else None
    if e.kind == "backoff":
        d["current_rate"] = e.current_rate(now)
        d["step_no"] = e.steps(now)
    if e.kind == "warmup":
        d["day"] = int(max(0.0, now - e.created) // (86400.0 * time_scale)) + 1
    return d


def list_entries(directory: str, now: float | None = None) -> list[Entry]:
    """The entries on disk (for ``mta rules list``), expired ones left out."""
    if not os.path.isdir(directory):
        return []
    now = time.time() if now is None else now
    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            e = Store._read(os.path.join(directory, name))
            if e is not None and (not e.until or e.until > now):
                out.append(e)
    return out


def cancel_entries(directory: str, what: str, now: float | None = None) -> list[Entry]:
    """Delete the entries whose id or rule name is *what*; the ones deleted."""
    gone = []
    for e in list_entries(directory, now):
        if what in (e.id, e.rule):
            try:
                os.unlink(os.path.join(directory, e.id + ".json"))
                gone.append(e)
            except FileNotFoundError:
                pass
    if gone:
        # (durably: the operator is told it is cancelled, and a power cut must not
        # bring a suspension back)
        sync_dir(directory)
    return gone
