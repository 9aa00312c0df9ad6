"""Node-wide limits per (egress source x site): connection slots, rates, demand.

Several delivery processes on one machine may send to the same site from the
same source.  The limits of a ``[[shaping]]`` rule -- simultaneous
connections, message rate, connection rate -- hold for the node as a whole,
however many processes there are, and a process killed with ``kill -9``
(nothing of ours runs) leaks nothing.  The engine talks to the abstract
:class:`Limiter`; :class:`NodeLimiter` is the node-local implementation, and a
cluster-wide one (several nodes sharing sources or sites, state in Redis) can
be put behind the same six calls later.

Keys are opaque strings chosen by the caller; :func:`limit_key` builds the
conventional ones (``"source|site|kind"``).  One key carries connection slots
and a "someone waits" mark; a rate uses a key of its own (the message rate and
the connection rate of one source x site are two keys).

How (and why this way)
----------------------
State lives in the kernel and in the page cache, never in a daemon, so there
is nothing to start, nothing to crash, and nothing to clean up after a crash:

* **One small file per key** in ``<directory>/<boot id>/``, named by a 128-bit
  BLAKE2b hash of the key (no collisions in practice: two keys never share
  limits by accident, which a fixed-size hashed table would do).  The
  per-boot subdirectory makes the CLOCK_MONOTONIC times stored in the files
  meaningful (the clock restarts at boot) and lets a new boot remove the old
  boot's files, which no live process can still use -- after carrying over
  their counts (warm-up caps), which are wall-clock windows and stay true.  Within one boot files
  are never deleted: unlinking a file that another process still has open
  would split the key into two independent states.  A file costs one inode
  and one block (a few KB), so a node with 10,000 active (source x site x
  kind) keys keeps ~40 MB of them until the next reboot or until an operator
  empties the directory while delivery is stopped.

* **Connection slots are OFD byte-range locks** (``F_OFD_SETLK``, Linux 3.15+):
  slot *i* of a key is byte ``SLOT_BASE + i`` of its file, and acquiring a
  connection means write-locking, non-blocking, a free byte below the limit
  (found by asking the kernel with ``F_OFD_GETLK``, one call per lock found,
  rather than trying every slot).  About 9 us for acquire + release with 19 of
  20 slots held elsewhere (bench/test_bench_limits.py).  The kernel drops a process's locks when it dies, however it dies,
  so kill -9 frees its slots at once.  OFD locks (unlike classic POSIX
  ``F_SETLK`` locks, which belong to the process) belong to the open file
  description, so two :class:`NodeLimiter` objects in one process exclude
  each other like two processes do; within one limiter, one description per
  key is shared by its callers and the slots it holds are tracked in memory.
  A lowered limit (config reload) applies at the next acquisition: slots at or
  above the new limit stay with their holders until released, and while any
  is held an acquisition also counts all held slots (one extra ``F_OFD_GETLK``)
  and backs off if the total would exceed the limit.

* **Rates are GCRA** (the generic cell rate algorithm, a token bucket kept as
  one number): the file holds the theoretical arrival time ``tat`` and the
  emission interval ``T = 1/rate`` as two float64 read and written through a
  shared ``mmap``, under a short exclusive OFD lock on byte ``RATE_LOCK``
  (two ``fcntl`` calls, about 3.5 us per admitted unit; the time is read after
  the lock is taken, so the arrivals the file sees are in time order).  A unit is
  admitted at ``now`` when ``max(tat, now) - now <= (burst - 1) * T``; then
  ``tat = max(tat, now) + T``.  **Burst**: ``burst`` units may be taken at
  once after an idle spell, and in any window of ``w`` seconds at most
  ``rate * w + burst`` units are admitted -- ``burst = 1`` is strict spacing
  ``T``, so any one-second window holds at most ``rate + 1``.  A refusal is
  the number of seconds until a unit can be taken; nothing sleeps, nothing
  blocks (if the rate lock is busy, which lasts microseconds, the answer is a
  one-millisecond wait).  A refusal costs no system call: an unlocked read of
  ``tat`` may be stale, but ``tat`` only grows, so a stale value can only
  shorten the wait, never admit.  A changed rate (reload) rescales the
  backlog (``tat - now``, in units) to the new interval; a value that is not a
  finite time or lies impossibly far ahead (corruption) is reset.

* **"Someone is waiting"**: a process that wants a slot for a key and got
  none holds a shared (read) OFD lock on byte ``WAIT_LOCK``
  (:meth:`Limiter.set_waiting`).  :meth:`Limiter.others_waiting` asks the
  kernel (``F_OFD_GETLK``) whether a write lock on that byte would conflict,
  i.e. whether another process (another open file description) is waiting.
  A process holding an *idle* connection to the site closes it early when
  this is true, so process A's idle connections do not hold every slot for
  ``idle_timeout`` while process B's mail waits.  The mark goes when the
  waiter clears it, closes its limiter, or dies.  Within one process the
  kernel shows nothing (the lock is its own description's), yet two lanes
  there can share a key (two sites of one name: an MX site per preference
  order, a route per TLS policy): the marks are counted per key, the lock
  held while any lane waits, and ``others_waiting(key, waiting)`` also counts
  this process's other waiting lanes (*waiting*: whether the asking lane is one).

* **"Someone is waiting with none"**: a process that waits for a slot of a key
  and holds none of its slots also holds a shared lock on byte ``STARVE_LOCK``;
  the limiter keeps it so itself (one ``fcntl`` when that changes: a mark set
  or cleared, the first slot taken or the last one given back).
  :meth:`Limiter.others_starving` probes it: with fewer slots than processes
  the holders take turns, and they give a slot up only to a process that has
  none (not to one that has some and wants more, which would only trade
  connections back and forth).

* **Cheap and bounded**: open files (each a descriptor and a 64-byte shared
  mapping, which holds a duplicate descriptor of its own: two descriptors per
  file) are cached per process, at most ``max_open_files`` of them, least
  recently used first out.  The mapping makes an admitted unit cost two system
  calls (lock, unlock) instead of four with ``pread``/``pwrite``.  A
  key with a held slot or a waiting mark is pinned (closing its file would
  release the lock); when the cache is all pinned, :meth:`acquire_connection`
  answers None (as if the limit were reached) and :meth:`set_waiting` does
  not mark (logged once per limiter), while rates and queries use a file
  opened for the one call.

* **Fork**: a limiter's files are created in the process that uses it.  A
  child forked from a process that has one forgets the inherited files
  (without unlocking: the locks are the parent's) and opens its own.

Not thread-safe: one limiter per event loop.

How the engine uses it
----------------------
Per connection to (source, site) with ``connection_limit`` N::

    key = limit_key(source, site, CONNECTIONS)
    slot = limiter.acquire_connection(key, N)
    if slot is None:                  # node-wide limit reached: wait, retry
        limiter.set_waiting(key, True)
        ...retry after a short delay or when one of our own slots is released...
    else:
        limiter.set_waiting(key, False)       # once nothing of ours waits
        wait = limiter.take(limit_key(source, site, CONNECTION_RATE), conn_rate)
        ...if wait > 0: release the slot (or keep it) and retry after `wait`...
        ...connect; per message:
        wait = limiter.take(limit_key(source, site, MESSAGE_RATE), msg_rate, burst)
        ...when idle: if limiter.others_waiting(key): close now...
        ...when busy: above its share while others wait, or after a turn while
           limiter.others_starving(key): end after the message in flight...
        limiter.release(slot)         # after the connection is closed
"""
from __future__ import annotations

import abc
import errno
import fcntl
import hashlib
import logging
import math
import mmap
import os
import re
import resource
import shutil
import struct
import time
import weakref
from collections import OrderedDict

log = logging.getLogger("mta.delivery.limits")

__all__ = [
    "CONNECTIONS", "CONNECTION_RATE", "MESSAGE_RATE", "MAX_BURST", "MAX_SLOTS",
    "Limiter", "NodeLimiter", "Slot", "limit_key",
]

CONNECTIONS = "connections"          # slots and the waiting mark
MESSAGE_RATE = "message-rate"
CONNECTION_RATE = "connection-rate"

MAX_SLOTS = 65536                    # highest connection limit accepted
MAX_BURST = 1_000_000                # highest burst accepted

# Layout of a key's file.  Locks are advisory and independent of the data, so
# the data and the lock bytes may overlap; they are kept apart for clarity.
FILE_SIZE = 64                       # bytes: tat (float64), interval (float64), spare
RATE_LOCK = 0                        # byte: exclusive while the rate state is updated
WAIT_LOCK = 1                        # byte: read-locked by each waiting process
STARVE_LOCK = 2                      # byte: read-locked by each one that waits holding none
SLOT_BASE = 64                       # byte SLOT_BASE + i: connection slot i
_STATE = struct.Struct("=dd")        # tat, interval
_COUNT = struct.Struct("=qq")        # window number, count (warm-up caps)
_COUNT_AT = _STATE.size              # where the count pair starts

_RATE_BUSY_WAIT = 0.001              # seconds: the answer when the rate lock is busy
_RATE_LOCK_TRIES = 3
_ROUNDING = 1e-9                     # of an interval: tolerance for float rounding of tat
_RESET_HORIZON = 1.0                 # seconds of tat beyond now + burst * T that mean corruption
_FLOCK = struct.Struct("hhqqi4x")    # struct flock on 64-bit Linux: type, whence, start, len, pid
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_BOOT_DIR = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

try:
    _SETLK = fcntl.F_OFD_SETLK
    _GETLK = fcntl.F_OFD_GETLK
except AttributeError:               # not Linux, or Python without OFD constants
    _SETLK = _GETLK = None


def limit_key(source: str, site: str, kind: str) -> str:
    """The conventional key of one limit: ``"source|site|kind"``."""
    return f"{source}|{site}|{kind}"


def _flock(kind: int, start: int, length: int = 1) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


_LOCK_RATE = _flock(fcntl.F_WRLCK, RATE_LOCK)
_UNLOCK_RATE = _flock(fcntl.F_UNLCK, RATE_LOCK)
_LOCK_WAIT = _flock(fcntl.F_RDLCK, WAIT_LOCK)
_UNLOCK_WAIT = _flock(fcntl.F_UNLCK, WAIT_LOCK)
_PROBE_WAIT = _flock(fcntl.F_WRLCK, WAIT_LOCK)
_LOCK_STARVE = _flock(fcntl.F_RDLCK, STARVE_LOCK)
_UNLOCK_STARVE = _flock(fcntl.F_UNLCK, STARVE_LOCK)
_PROBE_STARVE = _flock(fcntl.F_WRLCK, STARVE_LOCK)
_SLOT_CACHE = 256                    # pre-packed lock requests for the first slots
_LOCK_SLOT = [_flock(fcntl.F_WRLCK, SLOT_BASE + i) for i in range(_SLOT_CACHE)]
_UNLOCK_SLOT = [_flock(fcntl.F_UNLCK, SLOT_BASE + i) for i in range(_SLOT_CACHE)]


def _lock_rate(fd: int) -> bool:
    """Take a key's rate lock, which another process holds for microseconds at a time:
    False when it was still busy after _RATE_LOCK_TRIES attempts (the caller answers
    "busy", never waits: a process stopped while holding it must not stall this one's
    event loop)."""
    for _ in range(_RATE_LOCK_TRIES):
        try:
            fcntl.fcntl(fd, _SETLK, _LOCK_RATE)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
    return False


def _lock_slot(i: int) -> bytes:
    return _LOCK_SLOT[i] if i < _SLOT_CACHE else _flock(fcntl.F_WRLCK, SLOT_BASE + i)


def _unlock_slot(i: int) -> bytes:
    return _UNLOCK_SLOT[i] if i < _SLOT_CACHE else _flock(fcntl.F_UNLCK, SLOT_BASE + i)


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SLOTS:
        raise ValueError(f"connection limit must be an integer from 1 to {MAX_SLOTS}, "
                         f"not {limit!r}")


def _check_rate(per_second: float, burst: int) -> None:
    if not isinstance(per_second, (int, float)) or not math.isfinite(per_second) \
            or per_second <= 0:
        raise ValueError(f"per_second must be a positive finite number, not {per_second!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
        raise ValueError(f"burst must be an integer from 1 to {MAX_BURST}, not {burst!r}")


class Slot:
    """One connection slot held for a key; give it back with :meth:`Limiter.release`."""

    __slots__ = ("key", "index", "since", "_owner", "_generation", "_held")

    def __init__(self, key: str, index: int, owner: object, generation: int):
        self.key = key
        self.index = index
        self.since = time.monotonic()    # when it was acquired (a turn: see others_starving)
        self._owner = owner
        self._generation = generation
        self._held = True

    def __repr__(self) -> str:
        state = "held" if self._held else "released"
        return f"<Slot {self.key!r} #{self.index} {state}>"


class Limiter(abc.ABC):
    """Limits per key that hold across every process using the same store.

    The seam between the delivery engine and where the limit state lives:
    :class:`NodeLimiter` (this machine), later a Redis one (a cluster).
    No call blocks; all are cheap enough for the delivery hot path.
    """

    @abc.abstractmethod
    def acquire_connection(self, key: str, limit: int) -> Slot | None:
        """A connection slot for ``key`` if fewer than ``limit`` are held, else None."""

    @abc.abstractmethod
    def release(self, slot: Slot) -> None:
        """Give a slot back (idempotent)."""

    @abc.abstractmethod
    def connections(self, key: str) -> int:
        """How many slots of ``key`` are held, by every process (for status)."""

    @abc.abstractmethod
    def take(self, key: str, per_second: float, burst: int = 1,
             now: float | None = None) -> float:
        """Take one unit of the rate ``per_second`` (with ``burst``) of ``key``.

        0.0: taken now.  Greater: seconds until one can be taken (nothing was
        taken).  ``now`` (``time.monotonic()`` seconds) is for tests.
        """

    @abc.abstractmethod
    def set_waiting(self, key: str, waiting: bool) -> bool:
        """Mark (or unmark) that one more (one fewer) lane of this process waits for a
        slot of ``key``; every mark set is cleared once.  Whether a mark was set (False
        when every open file is pinned): a lane clears only a mark it set."""

    @abc.abstractmethod
    def others_waiting(self, key: str, waiting: bool = False) -> bool:
        """Whether another process, or another lane of this one, waits for a slot of
        ``key``; *waiting*: whether the asking lane's own mark is set."""

    def others_starving(self, key: str) -> bool:
        """Whether another process waits for a slot of ``key`` while it holds none (a
        waiting mark set, no slot held: kept by the limiter as marks and slots change).
        With fewer slots than processes, the holders take turns for those."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything this limiter holds."""

    def count(self, key: str, window: int, cap: int, take: bool = True) -> int:
        """Count one unit of ``key`` in fixed window number ``window`` if fewer than
        ``cap`` were; the count before.  (Warm-up caps; see NodeLimiter.count.)"""
        raise NotImplementedError

    def uncount(self, key: str, window: int) -> None:
        """Give back one unit counted in window number ``window`` of ``key`` (nothing
        when that window is over).  (A warm-up count whose message was not sent.)"""
        raise NotImplementedError


class _Entry:
    """One key's open file in this process, and what this process holds of it."""

    __slots__ = ("key", "fd", "mm", "held", "waiting", "starving")

    def __init__(self, key: str, fd: int, mm: mmap.mmap):
        self.key = key
        self.fd = fd
        self.mm = mm
        self.held: set[int] = set()  # slot indexes this process holds
        self.waiting = 0             # lanes of this process that wait (the lock: while > 0)
        self.starving = False        # STARVE_LOCK held: waiting, and no slot held

    def starve(self) -> None:
        """Hold the starving mark exactly while this process waits and holds no slot
        (an fcntl only when that changes)."""
        want = bool(self.waiting) and not self.held
        if want != self.starving:
            fcntl.fcntl(self.fd, _SETLK, _LOCK_STARVE if want else _UNLOCK_STARVE)
            self.starving = want

    def pinned(self) -> bool:
        return bool(self.held) or self.waiting

    def close(self) -> None:
        """Close the file; the kernel drops this description's locks with it."""
        try:
            self.mm.close()
        finally:
            os.close(self.fd)


_live: weakref.WeakSet[NodeLimiter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for limiter in list(_live):
        limiter._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


MAX_OPEN_FILES = 4096      # a NodeLimiter's cached files, by default (two descriptors each)


class NodeLimiter(Limiter):
    """Limits shared by the processes of one machine, in files under ``directory``.

    Every process (every limiter) that should share limits names the same
    directory (the engine: a directory under ``run_dir``).  ``max_open_files``
    bounds the files this limiter keeps open (two descriptors each).
    """

    def __init__(self, directory: str, max_open_files: int = MAX_OPEN_FILES):
        if _SETLK is None:
            raise OSError(errno.ENOSYS, "NodeLimiter needs Linux open file description "
                                        "locks (fcntl.F_OFD_SETLK)")
        if isinstance(max_open_files, bool) or not isinstance(max_open_files, int) \
                or max_open_files < 1:
            raise ValueError(f"max_open_files must be a positive integer, "
                             f"not {max_open_files!r}")
        self.max_open_files = max_open_files
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and 2 * max_open_files > soft // 2:
            log.warning("limiter: max_open_files %d needs up to %d descriptors, more than "
                        "half of this process's limit (%d)", max_open_files,
                        2 * max_open_files, soft)
        boot = _boot_id()
        self.directory = os.path.join(directory, boot)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        _carry_counts_and_remove_other_boots(directory, boot)
        self._entries: dict[str, _Entry] = {}
        self._idle: OrderedDict[str, _Entry] = OrderedDict()  # unpinned, LRU first
        self._generation = 0
        self._warned_full = False
        _live.add(self)

    # -- files ----------------------------------------------------------------

    def path(self, key: str) -> str:
        """The file that holds ``key``'s state."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16)
        return os.path.join(self.directory, digest.hexdigest())

    def _open(self, key: str) -> _Entry:
        if not isinstance(key, str) or not key:
            raise ValueError(f"limit key must be a non-empty string, not {key!r}")
        fd = os.open(self.path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < FILE_SIZE:
                os.ftruncate(fd, FILE_SIZE)   # extends with zeros; never shortens
            mm = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return _Entry(key, fd, mm)

    def _entry(self, key: str) -> _Entry | None:
        """The cached entry of ``key`` (opened if need be), or None when all are pinned."""
        entry = self._entries.get(key)
        if entry is not None:
            if key in self._idle:
                self._idle.move_to_end(key)
            return entry
        while len(self._entries) >= self.max_open_files:
            if not self._idle:
                if not self._warned_full:
                    self._warned_full = True
                    log.warning("limiter: all %d open files hold slots or waiting marks; "
                                "new keys get no connection slot until one is released "
                                "(raise max_open_files)", self.max_open_files)
                return None
            _, old = self._idle.popitem(last=False)
            del self._entries[old.key]
            old.close()
        entry = self._open(key)
        self._entries[key] = entry
        self._idle[key] = entry
        return entry

    def _pin(self, entry: _Entry) -> None:
        self._idle.pop(entry.key, None)

    def _unpin(self, entry: _Entry) -> None:
        if not entry.pinned() and entry.key in self._entries:
            self._idle[entry.key] = entry

    def open_files(self) -> int:
        """How many files this limiter has open (bounded by ``max_open_files``)."""
        return len(self._entries)

    # -- connection slots -----------------------------------------------------

    def acquire_connection(self, key: str, limit: int) -> Slot | None:
        _check_limit(limit)
        entry = self._entry(key)
        if entry is None:
            return None
        fd, held = entry.fd, entry.held
        # Asking the kernel which slots are locked (one F_OFD_GETLK per lock
        # found) is cheaper than trying each in turn (a refused F_OFD_SETLK
        # costs an exception); a slot taken meanwhile is refused and skipped.
        for i in _free_slots(fd, limit, held):
            try:
                fcntl.fcntl(fd, _SETLK, _lock_slot(i))
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    continue
                raise
            if self._over_limit(entry, limit, i):
                fcntl.fcntl(fd, _SETLK, _unlock_slot(i))
                return None
            held.add(i)
            self._pin(entry)
            if entry.starving:
                entry.starve()
            return Slot(key, i, self, self._generation)
        return None

    def _over_limit(self, entry: _Entry, limit: int, new: int) -> bool:
        """After locking slot ``new``: would the held total exceed ``limit``?

        Only possible while slots at or above the limit (from before it was
        lowered) are still held.
        """
        above = any(i >= limit for i in entry.held)
        if not above:
            probe = _FLOCK.unpack(fcntl.fcntl(entry.fd, _GETLK,
                                              _flock(fcntl.F_WRLCK, SLOT_BASE + limit, 0)))
            above = probe[0] != fcntl.F_UNLCK
        if not above:
            return False
        total = len(entry.held) + 1 + _count_locked(entry.fd, SLOT_BASE, SLOT_BASE + MAX_SLOTS)
        # _count_locked sees other descriptions' locks only: ours are in held, plus `new`
        return total > limit

    def release(self, slot: Slot) -> None:
        if slot._owner is not self:
            raise ValueError(f"{slot!r} belongs to another limiter")
        if not slot._held:
            return
        slot._held = False
        if slot._generation != self._generation:
            return                   # from before close() or fork: the lock is gone already
        entry = self._entries.get(slot.key)
        if entry is None or slot.index not in entry.held:
            return
        entry.held.discard(slot.index)
        fcntl.fcntl(entry.fd, _SETLK, _unlock_slot(slot.index))
        if entry.waiting and not entry.held:
            entry.starve()
        self._unpin(entry)

    def connections(self, key: str) -> int:
        entry, transient = self._entry_or_transient(key)
        try:
            return len(entry.held) + _count_locked(entry.fd, SLOT_BASE, SLOT_BASE + MAX_SLOTS)
        finally:
            if transient:
                entry.close()

    def _entry_or_transient(self, key: str) -> tuple[_Entry, bool]:
        entry = self._entry(key)
        if entry is not None:
            return entry, False
        return self._open(key), True

    # -- rates ----------------------------------------------------------------

    def take(self, key: str, per_second: float, burst: int = 1,
             now: float | None = None) -> float:
        _check_rate(per_second, burst)
        interval = 1.0 / per_second
        # a hair of tolerance, so that float rounding of tat (a sum of
        # intervals) never refuses a unit that is due; far below one unit
        allowance = (burst - 1) * interval + interval * _ROUNDING
        entry, transient = self._entry_or_transient(key)
        try:
            mm = entry.mm
            # Refusal without a system call: tat only grows, so a stale read
            # can only make the wait shorter than the truth, never admit.
            tat, stored = _STATE.unpack_from(mm, 0)
            t = time.monotonic() if now is None else now
            if stored == interval and tat - t > allowance \
                    and tat - t <= burst * interval + _RESET_HORIZON:
                return max(tat - t - allowance, 1e-9)
            fd = entry.fd
            if not _lock_rate(fd):
                return min(_RATE_BUSY_WAIT, interval)
            try:
                tat, stored = _STATE.unpack_from(mm, 0)
                if now is None:
                    now = time.monotonic()   # under the lock: arrivals in time order
                changed = False
                if stored != interval:
                    if stored > 0 and math.isfinite(stored) and tat > now:
                        tat = now + (tat - now) * (interval / stored)   # same backlog in units
                    changed = True
                if not math.isfinite(tat) or tat - now > burst * interval + _RESET_HORIZON:
                    tat = now + burst * interval       # corrupt: as if just saturated
                    changed = True
                if tat < now:
                    tat = now
                if tat - now > allowance:
                    if changed:
                        _STATE.pack_into(mm, 0, tat, interval)
                    return max(tat - now - allowance, 1e-9)
                _STATE.pack_into(mm, 0, tat + interval, interval)
                return 0.0
            finally:
                fcntl.fcntl(fd, _SETLK, _UNLOCK_RATE)
        finally:
            if transient:
                entry.close()

    # -- counts per fixed window (warm-up caps) ------------------------------

    def count(self, key: str, window: int, cap: int, take: bool = True) -> int | None:
        """Count one unit of ``key`` in the fixed window number ``window`` if fewer than
        ``cap`` were counted in it; the count before (``cap`` or more: nothing taken).
        A new window number starts from zero.  ``take=False`` only reads.  None: the
        lock was busy (nothing read or taken; ask again shortly).  The pair (window,
        count) lives in the key's file after the rate state, under the same short lock;
        node-wide like the rest."""
        entry, transient = self._entry_or_transient(key)
        try:
            fd, mm = entry.fd, entry.mm
            if not _lock_rate(fd):
                # Busy for microseconds: not full (read as full, a warm-up cap would
                # hold the mail until its hour or day rolled over).
                return None
            try:
                stored, n = _COUNT.unpack_from(mm, _COUNT_AT)
                if stored != window:
                    n = 0
                if take and n < cap:
                    _COUNT.pack_into(mm, _COUNT_AT, window, n + 1)
                return n
            finally:
                fcntl.fcntl(fd, _SETLK, _UNLOCK_RATE)
        finally:
            if transient:
                entry.close()

    def uncount(self, key: str, window: int) -> None:
        entry, transient = self._entry_or_transient(key)
        try:
            fd, mm = entry.fd, entry.mm
            if not _lock_rate(fd):
                return      # (busy: the unit stays counted, the cap errs towards less)
            try:
                stored, n = _COUNT.unpack_from(mm, _COUNT_AT)
                if stored == window and n > 0:
                    _COUNT.pack_into(mm, _COUNT_AT, window, n - 1)
            finally:
                fcntl.fcntl(fd, _SETLK, _UNLOCK_RATE)
        finally:
            if transient:
                entry.close()

    # -- demand ---------------------------------------------------------------

    def set_waiting(self, key: str, waiting: bool) -> bool:
        if waiting:
            entry = self._entry(key)
            if entry is None:
                return False         # all files pinned: cannot mark (see module doc)
            entry.waiting += 1
            if entry.waiting == 1:
                fcntl.fcntl(entry.fd, _SETLK, _LOCK_WAIT)   # shared: never conflicts
                entry.starve()
                self._pin(entry)
            return True
        entry = self._entries.get(key)
        if entry is None or not entry.waiting:
            return False
        entry.waiting -= 1
        if entry.waiting == 0:
            fcntl.fcntl(entry.fd, _SETLK, _UNLOCK_WAIT)
            entry.starve()
            self._unpin(entry)
        return True

    def others_waiting(self, key: str, waiting: bool = False) -> bool:
        entry, transient = self._entry_or_transient(key)
        try:
            if entry.waiting > (1 if waiting else 0):
                return True          # another lane of this process (see module doc)
            probe = _FLOCK.unpack(fcntl.fcntl(entry.fd, _GETLK, _PROBE_WAIT))
            return probe[0] != fcntl.F_UNLCK
        finally:
            if transient:
                entry.close()

    def others_starving(self, key: str) -> bool:
        entry, transient = self._entry_or_transient(key)
        try:
            # (this process's own mark is its own description's: the kernel shows only
            # other processes' -- and a process that asks holds a slot, so starves not)
            probe = _FLOCK.unpack(fcntl.fcntl(entry.fd, _GETLK, _PROBE_STARVE))
            return probe[0] != fcntl.F_UNLCK
        finally:
            if transient:
                entry.close()

    # -- life -----------------------------------------------------------------

    def close(self) -> None:
        """Close every file: the kernel releases every slot and mark held through them."""
        entries = list(self._entries.values())
        self._entries.clear()
        self._idle.clear()
        self._generation += 1
        for entry in entries:
            entry.close()

    def _forget(self) -> None:
        """In a forked child: drop the parent's files without unlocking anything."""
        self.close()                 # closing our copy of an fd leaves the parent's locks


def _locked(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ranges [s, e) within [start, end) write-locked by other open file descriptions.

    ``F_OFD_GETLK`` reports one conflicting lock, not necessarily the lowest,
    so the range is split around each lock found: one call per lock found,
    plus one per gap (the kernel merges a description's adjacent locks).
    """
    found = []
    todo = [(start, end)]
    while todo:
        lo, hi = todo.pop()
        if lo >= hi:
            continue
        kind, _, s, length, _ = _FLOCK.unpack(
            fcntl.fcntl(fd, _GETLK, _flock(fcntl.F_WRLCK, lo, hi - lo)))
        if kind == fcntl.F_UNLCK:
            continue
        e = hi if length == 0 else min(hi, s + length)
        s = max(lo, s)
        found.append((s, e))
        todo.append((lo, s))
        todo.append((e, hi))
    return found


def _count_locked(fd: int, start: int, end: int) -> int:
    """Bytes in [start, end) write-locked by other open file descriptions."""
    return sum(e - s for s, e in _locked(fd, start, end))


def _free_slots(fd: int, limit: int, held: set[int]):
    """Slot indexes below ``limit`` that look free (neither ours nor locked by others)."""
    i = 0
    for s, e in sorted(_locked(fd, SLOT_BASE, SLOT_BASE + limit)) + [(SLOT_BASE + limit,) * 2]:
        while i < s - SLOT_BASE:
            if i not in held:
                yield i
            i += 1
        i = max(i, e - SLOT_BASE)


def _boot_id() -> str:
    try:
        with open(_BOOT_ID, encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        return "boot"
    return boot if _BOOT_DIR.match(boot) else "boot"


def _carry_counts_and_remove_other_boots(directory: str, boot: str) -> None:
    """Remove the state of earlier boots (no process alive now can use it), first
    carrying their counts into this boot's files.

    The counts (warm-up caps: :meth:`NodeLimiter.count`) are per window of wall-clock
    time, so unlike the rate state (CLOCK_MONOTONIC) and the slots (locks) they mean
    the same after a reboot.  Dropped with the old boot's files, a reboot in the
    middle of a warm-up day gave its sources a whole day's cap again.  A file of this
    boot that exists already is left as it is: it was carried by an earlier start
    (one that died before the removal) or counted since.  All under an exclusive
    lock on *directory*, so two processes starting at once carry once; the carried
    files reach the disk (one ``sync``) before the old ones are removed.
    """
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        try:
            names = [n for n in os.listdir(directory) if n != boot and _BOOT_DIR.match(n)]
        except OSError:
            return
        carried = 0
        for name in names:
            carried += _carry_counts(os.path.join(directory, name),
                                     os.path.join(directory, boot))
        if carried:
            os.sync()
            log.info("limiter: %d warm-up count(s) of an earlier boot carried over", carried)
        for name in names:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    finally:
        os.close(dfd)       # (and the lock with it)


def _carry_counts(old: str, new: str) -> int:
    """Copy the non-zero count pairs of the files in *old* into new files of the same
    names in *new*; how many were copied."""
    try:
        names = os.listdir(old)
    except OSError:
        return 0
    n = 0
    for name in names:
        try:
            with open(os.path.join(old, name), "rb") as fh:
                data = fh.read(FILE_SIZE)
        except OSError:
            continue
        if len(data) < _COUNT_AT + _COUNT.size:
            continue
        window, count = _COUNT.unpack_from(data, _COUNT_AT)
        if count <= 0:
            continue
        state = bytearray(FILE_SIZE)
        _COUNT.pack_into(state, _COUNT_AT, window, count)
        try:
            fd = os.open(os.path.join(new, name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            continue        # (exists: carried or counted already)
        try:
            os.write(fd, state)
            n += 1
        except OSError as exc:
            log.warning("limiter: cannot carry a count into %s: %s", new, exc)
        finally:
            os.close(fd)
    return n
