"""Spool storage for one shard: append-only segment files of checksummed records.

Leaf library: the spool shard (``mta.spool``) writes and reads its queue
through :class:`Store`; ``mta spool-dump`` reads a stopped daemon's files with
it.  It imports no role and talks to no other process.

Layout: ``<spool>/shard-<n>/<number>.seg`` (:func:`shard_dir`); numbers grow,
so file order is time order.  A segment is a sequence of records framed by the record codec
(``mta.native.load("record")``: magic, type, lengths, CRC-32).  Records:

    REC_MESSAGE  meta = MessageMeta (msgspec msgpack), body = the message
    REC_DONE     meta = DoneMeta: these queue ids are finished
    REC_RCPT     meta = RcptMeta: recipient state changes of one message
                 (delivered / failed / expired, or attempts and next due time;
                 RCPT_* flags, and what an owed bounce will say)
    REC_EVENTS   meta = the batch's events (one orjson array of the internal
                 event dicts of :mod:`mta.obs.events`), body empty; written
                 first in its batch, covered by the batch's fdatasync.  The
                 queue ignores it (recovery skips it, compaction never copies
                 it); the ``events`` process reads it (:func:`read_events`).
    REC_COMMIT   meta = (offset of the batch's first record, its number of records):
                 ends every batch.  A segment made by this version begins with one
                 of no records, written and synced when the segment is made: it is
                 *batched*, and its records count only once their batch's
                 REC_COMMIT has been read.  A power cut during a batch's fdatasync
                 may keep some of its pages and not others; without the rule a
                 later record of the torn batch (a DONE, an update) could be
                 replayed while an earlier one (its events, the DSN it made) was
                 lost.  The batch was never acknowledged, so it goes whole.  (One
                 that lost records with a whole batch of its segment after it was
                 synced -- acknowledged -- and damaged since: its intact message
                 records are taken, :meth:`Store._take_broken`.)

Events: ``<shard dir>/synced`` is the shard's *synced watermark*, a small
mmap'ed file (:class:`Watermark`): after every successful fdatasync the shard
stores there (segment number, offset) -- everything before it is durable --
with a plain memory write, no system call.  At start, after recovery, it is
set to the end of what was recovered.  The events process reads REC_EVENTS
records only up to it, so a power cut can never leave an event for a change
that was not durable.  ``<shard dir>/events.cursor`` is the events process's
durable position (:func:`write_cursor` / :func:`read_cursor`; it always
names an existing segment); reclamation never unlinks a segment the cursor has
not passed (:meth:`Store.reclaim_plan` *hold*), so segment numbers never
restart below the cursor and event ids are never reused.

Writes: the shard loop collects every request that arrived while the previous
fsync ran and hands them to :meth:`Store.write` as one batch: one ``pwritev``
and one ``fdatasync`` per batch (group commit).  Only after :meth:`Store.sync`
returns may the shard acknowledge the batch.  Segment files are preallocated
(:class:`Spare`: a finished segment's file reused, else one zero-filled and
synced ahead of use), so that fdatasync has only data to write.  Records are
written with their segment's number in the checksum (record version 2), so the
end of a segment's data is where its records stop: at zeros, or at a record
of an older segment that used the file before (STALE).

Recovery (:meth:`Store.recover`) reads the segments in order.  A record whose
checksum fails or whose tail is missing (a torn write at a crash) is skipped;
the reader resynchronises on the next record that decodes, so one bad record
never hides the good ones after it (and if that next one is an older
segment's, this segment's data ended at the bad record).  A record whose
checksum holds but whose content cannot be read (:meth:`Store._apply`) is
logged and passed over too -- but a message record whose only fault is a time
out of range (its arrival, a recipient's due time) is taken with those times
mended (:func:`mend_times`), logged and counted: it was acknowledged.  A message seen twice (a copy made by compaction)
keeps its newest location; a DONE record removes it.

Reclamation works from the oldest segment forward so that a DONE record is
never deleted while the message it finishes still exists on disk: the oldest
segment is unlinked (or its file becomes a spare) when nothing in it is
queued; when few of its messages are still queued they are copied forward into
the current segment first (and synced) — a log-structured compaction.  New
segment files are made durable with a directory fsync before anything in them
is acknowledged, and so is a new shard directory in the spool directory
(:func:`make_dirs`).

Failure: an OSError from write or fsync (EIO, ENOSPC) is raised to the shard,
which answers the batch with a storage error; the segment is abandoned and the
next batch starts a fresh one, so the shard recovers by itself once the cause
is gone.  Anything the failed batch left on disk may reappear after a restart
as a duplicate of a message the client was told to retry — never a loss.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from typing import Annotated, Any

import msgspec

from mta import native
from mta.queueid import is_qid, recipient_domain

log = logging.getLogger("mta.spool")

REC_MESSAGE = 1
REC_DONE = 2
REC_RCPT = 3
REC_EVENTS = 4
REC_COMMIT = 5
_REC_NAMES = {REC_MESSAGE: "message", REC_DONE: "done", REC_RCPT: "recipient update"}
_COMMIT = struct.Struct("<QI")      # REC_COMMIT: (offset of the batch's first record, records)
_OPENING = _COMMIT.pack(0, 0)       # a batched segment's first record's meta

WATERMARK = "synced"                # <shard dir>/synced: the synced watermark
CURSOR = "events.cursor"            # <shard dir>/events.cursor: the events process's position
_POS = struct.Struct("<QQ")         # (segment number, offset)

IOV_MAX = 1024          # iovecs per writev (Linux limit)
MAX_READERS = 64        # segment files kept open for reading bodies
SEGMENT_SUFFIX = ".seg"
SPARE_READY = "spare.ready"       # a zero-filled, synced segment waiting to be used
SPARE_TMP = "spare.tmp"           # one being filled (removed at start: state unknown)
SPARE_REUSED = "spare.reused"     # a finished segment's file waiting to be used again
ZERO_CHUNK = 1 << 20              # octets compared with zeros per step (reading)
# Octets of a spare segment zero-filled and synced per step: a group commit's fdatasync
# issued meanwhile waits behind at most this much of the fill's writes.  256 KiB rather
# than 1 MiB: the HTTP p99 on 10,000 connections at half rate, deliveries held (so
# every segment is filled beside the load), fell from a median of 26.7 to 20.1 ms over
# ten alternating pairs (bench/RESULTS.md, "The spare segment's fill in smaller steps").
FILL_STEP = 256 << 10
SPARE_RETRY = 30.0                # seconds before trying again after a failure
RELEASE_STEP = 8 << 20            # recovery lets go of a segment's pages read, per this much
# A time read from a record (epoch seconds: an arrival, a due time, a start) lies strictly
# within +-this (the year 5138): a NaN, an infinity or a value beyond it is damage (or a
# writer's bug), and would stall or stop the shard's due queue -- the record is passed over
# (a recipient update's due time: that update; mta/_ext qindex's _DUE_MAX, the same).
MAX_TIME = 1e11
Time = Annotated[float, msgspec.Meta(gt=-MAX_TIME, lt=MAX_TIME)]
# A recipient's state read from a record is one of PENDING .. EXPIRED (below): another
# broke what names the states (``mta queue list`` ended the shard); qindex's update()
# refuses one too.
State = Annotated[int, msgspec.Meta(ge=0, le=3)]


class MessageMeta(msgspec.Struct, array_like=True):
    """Envelope stored with every message record.

    ``state``/``attempts``/``due`` are per recipient and present only in a
    copy made by compaction, which must carry the recipients' progress with it
    (a fresh message has every recipient pending and due at :func:`start_of`:
    its arrival, or its scheduled start time, ``params["start_at"]``).
    """

    qid: str
    sender: str
    rcpts: list[str]
    arrival: Time
    params: dict
    client: str
    state: list[State] | None = None
    attempts: list[int] | None = None
    due: list[Time] | None = None
    flags: list[int] | None = None      # per recipient RCPT_* bits; None: all 0
    # a copy's owed bounces: the report of each recipient with RCPT_BOUNCE_OWED (RcptMeta)
    owed: list[list] | None = None


START_AT = "start_at"   # params: epoch seconds of options.start_time, when in the future

def start_of(meta: MessageMeta) -> float:
    """When a message may first be sent: its arrival, or its scheduled start if later.

    Every recipient's first due time, and where its age (delivery.max_age)
    counts from.  Read from the record on every recovery, so a schedule
    survives restarts.
    """
    at = meta.params.get(START_AT)
    if type(at) is float or type(at) is int:
        if meta.arrival < at < MAX_TIME:        # (one beyond it: damage, ignored)
            return float(at)
    return meta.arrival


class DoneMeta(msgspec.Struct, array_like=True):
    qids: list[str]


class RcptMeta(msgspec.Struct, array_like=True):
    """Recipient updates of one message: [[index, state, attempts, due(, flags)], ...].

    The fifth element, when present, replaces the recipient's RCPT_* flags.
    *owed*: for each update that sets RCPT_BOUNCE_OWED, what its bounce will say:
    [index, status, remote host, diagnostic, last attempt (None: never tried)(, True:
    the diagnostic is ours, not the host's reply -- only then)] (a trailing field: a
    version without it ignores it, and reads None from one without).
    """

    qid: str
    updates: list[list]
    owed: list[list] | None = None


class _MendableMeta(msgspec.Struct, array_like=True):
    """A message record read again when :class:`MessageMeta`'s decoder refused it: the
    same fields, its times and its recipients' progress of any value (see :func:`mend`)."""

    qid: str
    sender: str
    rcpts: list[str]
    arrival: Any
    params: dict
    client: Any
    state: list[Any] | None = None
    attempts: list[Any] | None = None
    due: list[Any] | None = None
    flags: list[Any] | None = None
    owed: list[list] | None = None


# An arrival read from a record lies after the epoch and at most this far ahead of the clock
# at the recovery or of its segment file's last change, whichever is later (a clock set
# back since, even by years -- a real-time clock that lost its time boots at 1970 --
# wrote them when the file was written: kept); one out of these bounds is no time a
# clock read, and is mended as one out of range is.
ARRIVAL_AHEAD_MAX = 365 * 86400.0


def good_time(t) -> bool:
    """Whether *t*, read from a record, is a time a clock reads (a number within MAX_TIME)."""
    return (type(t) is float or type(t) is int) and -MAX_TIME < t < MAX_TIME


def qid_time(qid: str) -> float | None:
    """The time a queue id was made (:mod:`mta.queueid`: its first 13 digits are
    microseconds since the epoch), None when *qid* is not one or holds no such time."""
    if not is_qid(qid):
        return None
    t = int(qid[:13], 16) / 1e6
    return t if 0 < t < MAX_TIME else None


def _taken_at(qid: str, path: str, latest: float) -> float:
    """When a message whose arrival is lost was taken, as near as can be told: when its
    queue id was made (before *latest*, the arrivals' bound); else when its segment file
    (*path*) last changed (after it was written); else now."""
    t = qid_time(qid)
    if t is not None and t < latest:
        return t
    try:
        t = os.stat(path).st_mtime
    except OSError:
        t = None
    return t if good_time(t) and t > 0 else time.time()


def good_arrival(t, latest: float) -> bool:
    """Whether *t* is an arrival a clock read: a number after the epoch, before *latest*."""
    return (type(t) is float or type(t) is int) and 0 < t < latest


def mend_times(m: _MendableMeta, arrival, latest: float) -> tuple[MessageMeta, list[str]]:
    """*m* as a MessageMeta with its times out of range mended, and the names of the
    fields mended: an arrival that is no time a clock read (:func:`good_arrival`, before
    *latest*) becomes *arrival*() (when the message was taken, as near as the caller knows
    it), a recipient's due time the message's start (its first due time:
    so due at once unless a schedule, options.start_time, holds it).  Its expiry follows:
    it counts from the start, as every message's does."""
    mended = []
    if not good_arrival(m.arrival, latest):
        mended.append("arrival")
        at = float(arrival())
    else:
        at = float(m.arrival)
    out = MessageMeta(m.qid, m.sender, m.rcpts, at, m.params, m.client, m.state,
                      m.attempts, None, m.flags, m.owed)
    if m.due is not None:
        if all(map(good_time, m.due)):
            out.due = [float(t) for t in m.due]
        else:
            mended.append("due")
            start = start_of(out)
            out.due = [float(t) if good_time(t) else start for t in m.due]
    return out, mended


MAX_ATTEMPTS = 0xFFFF    # the index saturates attempts at this (qindex's MAX_ATTEMPTS)


def mend_progress(m: MessageMeta) -> list[str]:
    """Mend *m*'s recipients' progress (a compaction copy's) in place where it is out of
    range -- a state no version writes, attempts beyond MAX_ATTEMPTS or no number, flags
    beyond RCPT_* or no number, a list that is not one value per recipient -- and return
    the names of the lists mended.  A recipient whose state is unknown is pending (at least
    once: it may be sent again, as after a damaged recipient update); unknown attempts are
    0, too many MAX_ATTEMPTS; unknown flags none but RCPT_BOUNCE_OWED where *m*'s owed
    reports name the recipient (so its bounce is still sent); a list not one per recipient
    is dropped (a fresh message's: pending, 0, due at its start, no flags)."""
    n = len(m.rcpts)
    mended = []
    state = m.state
    if state is not None and (len(state) != n or not all(
            type(v) is int and PENDING <= v <= EXPIRED for v in state)):
        mended.append("state")
        m.state = None if len(state) != n else [
            v if type(v) is int and PENDING <= v <= EXPIRED else PENDING for v in state]
    attempts = m.attempts
    if attempts is not None and (len(attempts) != n or not all(
            type(v) is int and 0 <= v <= MAX_ATTEMPTS for v in attempts)):
        mended.append("attempts")
        m.attempts = None if len(attempts) != n else [
            (min(max(v, 0), MAX_ATTEMPTS) if type(v) is int else 0) for v in attempts]
    if m.due is not None and len(m.due) != n:
        mended.append("due")
        m.due = None
    flags = m.flags
    if flags is not None and (len(flags) != n or not all(
            type(v) is int and 0 <= v <= 0xFF for v in flags)):
        mended.append("flags")
        owed = {r[0] for r in m.owed or () if type(r) is list and r and type(r[0]) is int}
        m.flags = [v if len(flags) == n and type(v) is int and 0 <= v <= 0xFF else
                   RCPT_BOUNCE_OWED if i in owed else 0
                   for i, v in enumerate(flags if len(flags) == n else [None] * n)]
    return mended


def mend(m: _MendableMeta, arrival, latest: float) -> tuple[MessageMeta, list[str]]:
    """*m* as a MessageMeta with its times (:func:`mend_times`), its client (no text:
    unknown, empty) and its recipients' progress (:func:`mend_progress`) mended where
    they are out of range; and the names of the fields mended."""
    out, mended = mend_times(m, arrival, latest)
    if type(out.client) is not str:
        # (where it came from: reported in its events, used for nothing else)
        out.client = ""
        mended.append("client")
    return out, mended + mend_progress(out)


TIME_FIELDS = ("arrival", "due")


_enc = msgspec.msgpack.Encoder()
_dec_msg = msgspec.msgpack.Decoder(MessageMeta)
_dec_mendable = msgspec.msgpack.Decoder(_MendableMeta)
_dec_done = msgspec.msgpack.Decoder(DoneMeta)
_dec_rcpt = msgspec.msgpack.Decoder(RcptMeta)

# Recipient states, as stored in records (declared here, with the format).
PENDING = 0
DELIVERED = 1
FAILED = 2
EXPIRED = 3
TERMINAL = (DELIVERED, FAILED, EXPIRED)
# Recipient flags, as stored in records (a bit set; absent = 0).
RCPT_DELAY_NOTIFIED = 1     # the sender was sent a delay notice for it (RFC 3464 "delayed")
# It failed while other delivery jobs of its message were out: a bounce (DSN) to the
# sender is owed for it, and the record that set the flag holds what it will say
# (RcptMeta.owed).  Cleared in the batch that queues the DSN (mta.spool.outcomes).
RCPT_BOUNCE_OWED = 2
STATE_NAMES = {PENDING: "pending", DELIVERED: "delivered", FAILED: "failed", EXPIRED: "expired"}


def sync_dir(path: str) -> None:
    """fsync directory *path*: the entries made, renamed or removed in it become durable."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_dirs(path: str) -> None:
    """Create directory *path* and its missing parents so that they survive a power cut.

    Like ``os.makedirs(path, exist_ok=True)``, and each directory made here is
    made durable in its parent (an fsync of the parent): until then a crash
    may take the new directory away with everything synced inside it.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        make_dirs(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    sync_dir(parent)


WRITER_LOCK = "writer.lock"


class WriterBusy(OSError):
    """Another process writes this shard directory."""


def lock_writer(directory: str) -> int:
    """Take *directory*'s writer lock, or raise WriterBusy; returns the descriptor that
    holds it (kept open for the process's life: the kernel drops the lock when the
    process ends, however it ends).

    One writer per shard is what the format's durability rests on (each appends to
    its own segment and reclaims what it thinks finished).  A shard whose supervisor
    was killed and that lives on, or a second daemon started on the same state
    directory with other ports, must not write beside it.  flock(2), not fcntl
    locks: held by the open file description, not lost when some other descriptor
    of the file is closed.  The file holds the writer's pid, for the message.
    """
    # (durably: the directory made here is the one the segments go in, and Store's own
    # make_dirs would find it made and not sync its entry -- a power cut took it all)
    make_dirs(directory)
    fd = os.open(os.path.join(directory, WRITER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o644)
    try:
        holder = flock_pid(fd)
    except OSError:
        os.close(fd)
        raise
    if holder is not None:
        os.close(fd)
        raise WriterBusy(errno.EBUSY, f"{directory} is written by another process (pid "
                                      f"{holder}): another mta on this state directory, or "
                                      f"one left running by a supervisor that was killed")
    return fd


def flock_pid(fd: int) -> str | None:
    """Take an exclusive flock(2) on *fd* without waiting, and write this process's pid
    in its file: None.  When another process holds it: the pid its file names ("?"
    when none can be read), nothing taken.  Other errors raise."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        try:
            return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        except OSError:
            return "?"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return None


def lock_holder(directory: str) -> int | None:
    """Whether another process holds *directory*'s writer lock (lock_writer): None when
    nobody does (the lock is taken and let go at once), else the pid the file names (0
    if it names none)."""
    try:
        fd = os.open(os.path.join(directory, WRITER_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        try:
            return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or 0)
        except ValueError:
            return 0
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def shard_dir(spool_dir: str, shard: int) -> str:
    """The directory of shard *shard*'s segment files under *spool_dir*."""
    return os.path.join(spool_dir, f"shard-{shard:02d}")


def index_message(index, m: MessageMeta, seg: int, moff: int, mlen: int, blen: int) -> bool:
    """Put a message record into a QueueIndex (True: it replaced an older copy).

    Only what scheduling, counting and selecting need is kept; the envelope
    stays on disk, read again with the body (:meth:`Store.read_record`): its
    start (:func:`start_of`), its dispatch lane (mta.spool.dispatch: BULK 0,
    TRANSACTIONAL 1 when ``transactional`` is true), its egress pool
    (``ip_pool``, else "default", as delivery and selectors), its campaign, and
    each recipient's domain.  (Taken apart here, not by a helper each: this runs
    for every message a shard takes in.)
    """
    p = m.params
    pool = p.get("ip_pool")
    campaign = p.get("campaign_id")
    return index.add(m.qid, seg, moff, mlen, blen, m.arrival,
                     start_of(m) if START_AT in p else m.arrival,
                     1 if p.get("transactional") is True else 0,
                     pool if type(pool) is str and pool else "default",
                     campaign if type(campaign) is str and campaign else None,
                     list(map(recipient_domain, m.rcpts)), m.state, m.attempts, m.due,
                     m.flags)


class Located(msgspec.Struct, array_like=True):
    """A message record just written: its envelope and where it lies (for :meth:`Store.commit`)."""

    meta: MessageMeta
    seg: int
    meta_offset: int
    meta_len: int
    body_len: int


class Segment:
    __slots__ = ("number", "path", "fd", "size", "synced", "live", "total", "failed",
                 "prezeroed", "reusable", "batched", "base")

    def __init__(self, number: int, path: str, fd: int | None, size: int):
        self.number = number
        self.path = path
        self.fd = fd
        self.size = size   # the write position (a recovered segment: the file's size)
        self.synced = size  # the end of what the last successful fdatasync covered
        self.live = 0      # queued messages whose current copy is here
        self.total = 0     # message records written here
        self.failed = False
        self.prezeroed = False   # written into an allocated file (zero-filled or reused)
        # Its file may become the spare when it is finished: its records are of version 2
        # (written by this version of the code), so none of them can be read as a later
        # segment's.
        self.reusable = False
        self.batched = False     # began with an opening REC_COMMIT: batches end with one
        self.base = 0            # where its first batch begins (after that opening record)


class Spare:
    """The next segment file, allocated and written ahead of use.

    Why: the fdatasync of an append must also write the file's new size and
    block map; overwriting blocks that already exist writes only the data.  On
    the project's ext4 that is 124 µs instead of 231 µs per group commit, and
    about half the kernel CPU (bench/RESULTS.md), and the shard's clients wait
    for that fsync on every message.

    Two kinds, each linked into place as a segment when the shard needs one:

    - ``spare.reused``: a finished segment's own file (:meth:`offer`, from
      :meth:`Store.unlink`).  Its blocks are allocated and written already, so
      reusing it costs a rename instead of writing the whole segment size
      again.  Its old records stay in it; the records of version 2 carry their
      segment's number, and readers take an older segment's record as the end
      of the new one's (the record codec's STALE).  Taken first.
    - ``spare.ready``: a file zero-filled and synced by a background thread
      under a name that recovery does not read, renamed once synced; made at
      start and again whenever the shard took the last one.  While finished
      segments keep coming (a node that delivers what it accepts) it stays
      where it is and nothing more is zero-filled beside the load.

    Only speed depends on it: if no spare is ready (still being filled, disk
    too full, an I/O error), the shard starts an empty segment as before and
    switches to a spare as soon as one is ready.  The thread only touches its
    own file.  Disk: up to two segments' worth beyond the queue.
    """

    def __init__(self, directory: str, size: int, reserve: int = 0):
        self.dir = directory
        self.size = size
        self.reserve = reserve          # leave at least this much free space
        self.ready_path = os.path.join(directory, SPARE_READY)
        self.tmp_path = os.path.join(directory, SPARE_TMP)
        self.reused_path = os.path.join(directory, SPARE_REUSED)
        self.ready = False              # spare.ready is there
        self.reused = False             # spare.reused is there
        self.recycled = 0               # finished segment files offered (for /metrics, tests)
        self.filled = 0                 # files zero-filled
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._complained = False
        try:
            os.unlink(self.tmp_path)    # half filled by an earlier run
        except FileNotFoundError:
            pass
        # Ready spares of an earlier run were synced before they were renamed (a finished
        # segment's file may be longer than the segment size).
        # A spare name on a file that has another one (a segment's: left by an earlier
        # version's link-then-unlink cut short by a crash) is dropped, never used.
        for attr, path, good in (("ready", self.ready_path, lambda n: n == size),
                                 ("reused", self.reused_path, lambda n: n >= size)):
            try:
                st = os.stat(path)
                if good(st.st_size) and st.st_nlink == 1:
                    setattr(self, attr, True)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        self._thread = threading.Thread(target=self._run, name="spool-spare", daemon=True)
        self._thread.start()
        self._wake.set()

    @property
    def available(self) -> bool:
        return self.reused or self.ready

    def take(self, path: str) -> bool:
        """Give a ready spare the name *path* (which must not exist); False if none."""
        with self._lock:
            if self.reused:
                self.reused = False
                source = self.reused_path
            elif self.ready:
                self.ready = False
                source = self.ready_path
            else:
                return False
        try:
            # A rename, not a link and an unlink: at every moment the file has one name,
            # so a crash can never leave it both a segment and a spare (two segments in
            # one file).  Only the shard makes segment names, so *path* is free.
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "exists", path)
            os.rename(source, path)
        except OSError as exc:
            log.warning("could not use the spare segment file: %s", exc.strerror or exc)
            return False
        finally:
            if source == self.ready_path:
                self._wake.set()        # fill the next one
        return True

    def offer(self, path: str) -> bool:
        """Make the finished segment file *path* (at least ``size`` octets, its records of
        version 2) a spare; False if one is there already.  The caller syncs the
        directory, as after an unlink (until then a crash may leave it a segment)."""
        with self._lock:
            if self.reused:
                return False
            os.rename(path, self.reused_path)
            self.reused = True
            self.recycled += 1
        return True

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            if self.ready:
                continue
            try:
                made = self._fill()
            except OSError as exc:
                made = False
                if not self._complained:
                    log.warning("cannot prepare a spare segment file: %s; new segments "
                                "start empty (slower fsyncs) until it works",
                                exc.strerror or exc)
                    self._complained = True
            if not made:
                # A fill cut short (an error, or close() meanwhile) leaves its file half
                # filled: of no use, so it goes now rather than at the next start.
                try:
                    os.unlink(self.tmp_path)
                except OSError:
                    pass
                if self._stop:
                    return
            if made:
                with self._lock:
                    self.ready = True
                    self.filled += 1
                self._complained = False
            else:
                # Try again later; a take() also wakes us.
                timer = threading.Timer(SPARE_RETRY, self._wake.set)
                timer.daemon = True
                timer.start()

    def _fill(self) -> bool:
        st = os.statvfs(self.dir)
        if st.f_bavail * st.f_frsize < self.size + self.reserve:
            return False   # not worth crowding out messages for speed
        zero = bytes(FILL_STEP)
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            off = 0
            while off < self.size:
                if self._stop:
                    return False
                n = os.pwrite(fd, zero[:min(FILL_STEP, self.size - off)], off)
                off += n
                # Synced in steps, so the shard's own fsyncs never queue behind
                # a whole segment of dirty pages.
                os.fdatasync(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.tmp_path, self.ready_path)
        return True


def _release(mm: mmap.mmap, start: int, end: int) -> int:
    """Drop the pages of *mm* in [start, end) from the process (page-aligned); the new start.

    Why: the pages of a mapped file that were read count in the process's RSS
    until it is unmapped, and recovery reads a whole segment (64 MiB by default)
    through one mapping: that was over a quarter of a shard's peak RSS per queued
    message at a million messages (bench/RESULTS.md).  They stay in the page
    cache; reading them again (a torn record's search) faults them back in.
    """
    end -= end % mmap.PAGESIZE
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        return end
    return start


def _zero_from(buf, off: int, end: int) -> bool:
    """True if buf[off:end] is all zero octets (checked a chunk at a time)."""
    if buf[off:off + 32].count(0) != min(32, end - off):
        return False   # the common case of a damaged record: answered at once
    zero = bytes(ZERO_CHUNK)
    while off < end:
        n = min(ZERO_CHUNK, end - off)
        if buf[off:off + n] != (zero if n == ZERO_CHUNK else zero[:n]):
            return False
        off += n
    return True


def _find_from(buf, needle: bytes, off: int, end: int) -> int:
    """buf.find(needle, off, end) for an mmap, searched in copied chunks instead.

    CPython before 3.11.5 (Debian 12 ships 3.11.2) can read past the end of the
    mapping in mmap.find and crash with SIGSEGV when the mapping ends at a page
    boundary (CPython gh-105235); recovery searches the damaged tail of a
    preallocated segment, as does the events process reading one (read_events).
    A slice of an mmap is a bytes copy, and bytes.find stays inside it.  Only a
    damaged record takes this path.
    """
    step = ZERO_CHUNK
    keep = len(needle) - 1   # chunks overlap so a match across a boundary is found
    while off < end:
        stop = min(end, off + step + keep)
        i = buf[off:stop].find(needle)
        if i >= 0:
            return off + i
        if stop == end:
            break
        off += step
    return -1


def _own_header(codec, buf, off: int, end: int, segment: int) -> bool:
    """Whether the octets at *off* begin a record header written for *segment*, whole or
    cut short (by *end*, or by zeros where a write into a preallocated file stopped):
    then a record there that does not decode is a torn or damaged record of this
    segment, not what a reused file still holds beyond the segment's last record.
    (Only the log and the counts depend on it: either way nothing there is read.)"""
    head = bytes(buf[off:min(off + 8, end)])
    own = codec.MAGIC + bytes((0, 0)) + (segment & 0xFFFF).to_bytes(2, "little")
    for i, octet in enumerate(head):
        if i == 4:
            continue                    # any record type
        if i == 5:
            good = octet == codec.VERSION_SEGMENT or (
                octet == codec.VERSION and not any(head[6:]))
        else:
            good = octet == own[i] or (i >= 6 and head[5] == codec.VERSION)
        if not good:
            return not any(head[i:])    # cut short there: the rest is still zeros
    return True


def _batched(codec, buf, segment: int) -> bool:
    """Whether a segment's bytes *buf* begin with the opening REC_COMMIT of no records
    (this version makes its segments so): its records count only once their batch's
    REC_COMMIT follows (the module docstring)."""
    got = codec.decode(buf, 0, segment=segment)
    return got[0] == codec.OK and got[1] == REC_COMMIT and bytes(got[2]) == _OPENING


def _numbered(codec, buf) -> bool:
    """Whether a segment's bytes *buf* begin with a version-2 record: all its records are
    of version 2 (a file's records are all of one version), so a version-1 record found
    in it is not one of its own -- it can only be old bytes (say, inside the body of a
    message the file held before it was reused) -- and must not be read as a record."""
    return len(buf) >= 6 and buf[:4] == codec.MAGIC and buf[5] == codec.VERSION_SEGMENT


def _decode(codec, buf, off: int, segment: int, numbered: bool) -> tuple:
    """codec.decode for segment *segment*, with a version-1 record in a *numbered* segment
    (see _numbered) answered CORRUPT."""
    got = codec.decode(buf, off, segment=segment)
    if numbered and got[0] == codec.OK and buf[off + 5] != codec.VERSION_SEGMENT:
        return (codec.CORRUPT, 0, None, 0, 0, 0)
    return got


def _next_record(codec, buf, off: int, end: int, segment: int,
                 numbered: bool = False) -> tuple[int, int]:
    """After a record at *off* that does not decode: (offset, status) of the next record
    that does, OK (this segment's) or STALE (an older one's, in a reused file);
    (-1, CORRUPT) if none does before *end*."""
    while True:
        off = _find_from(buf, codec.MAGIC, off + 1, end)
        if off < 0:
            return -1, codec.CORRUPT
        status = _decode(codec, buf, off, segment, numbered)[0]
        if status == codec.OK or status == codec.STALE:
            return off, status


def _after_bad_record(codec, buf, off: int, end: int, segment: int,
                      numbered: bool) -> tuple[int, bool, bool]:
    """In a finished segment, at a record that does not decode (and is not the zeroed or
    older rest of the file): (the offset of the next record that decodes, -1 if none;
    whether this segment's data ends here; whether it ends with a torn record of its own).

    It ends if no record decodes after it, or the next that does is an older segment's
    (STALE: a reused file's old contents).  It ends *torn* if the octets here begin a
    header of this segment's (:func:`_own_header`); before old records, only a header
    that has its magic counts, since zeros among old contents pass for one cut short."""
    again, found = _next_record(codec, buf, off, end, segment, numbered)
    if found == codec.STALE:
        return again, True, (buf[off:off + 4] == codec.MAGIC
                             and _own_header(codec, buf, off, end, segment))
    if again < 0:
        return -1, True, _own_header(codec, buf, off, end, segment)
    return again, False, False


def _sync_recovered(path: str) -> None:
    """fdatasync a segment file before its records are recovered.

    An earlier run killed between a write and its fdatasync (kill -9 of the shard, not
    a power cut) left the write in the page cache, not on disk: recovery would read it
    as durable, publish its events and act on it -- reclaim the segment of messages
    whose compaction copies it holds -- and a power cut later would take it away.  A
    segment with nothing unwritten costs one cache flush.  An error is logged: there is
    nothing better to read than what the file gives.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.error("segment %s: cannot open it to sync it: %s", path, exc.strerror or exc)
        return
    try:
        os.fdatasync(fd)
    except OSError as exc:
        log.error("segment %s: fdatasync before recovery failed: %s; what it holds "
                  "beyond its last sync may not be on disk", path, exc.strerror or exc)
    finally:
        os.close(fd)


class Watermark:
    """The shard's synced watermark: (segment number, offset) in a 16-octet mmap'ed file.

    The writer (the shard) stores a position with a memory write after each
    fdatasync; readers (the events process) map the same file read-only.  A
    reader takes a value only when two reads in a row agree (the 16 octets
    are not written atomically) and never goes backwards itself.  The file is
    not synced: after a power cut the shard sets it again from what it
    recovers before anything reads past it.
    """

    def __init__(self, directory: str, writable: bool):
        self.path = os.path.join(directory, WATERMARK)
        self.writable = writable
        if writable:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size != _POS.size:
                    os.ftruncate(fd, _POS.size)
                self.mm = mmap.mmap(fd, _POS.size)
            finally:
                os.close(fd)
        else:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)   # FileNotFoundError: not yet
            try:
                if os.fstat(fd).st_size < _POS.size:
                    raise FileNotFoundError(self.path)
                self.mm = mmap.mmap(fd, _POS.size, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)

    def set(self, number: int, offset: int) -> None:
        _POS.pack_into(self.mm, 0, number, offset)

    def get(self) -> tuple[int, int]:
        mm = self.mm
        while True:
            a = mm[:16]
            if mm[:16] == a:
                return _POS.unpack(a)

    def close(self) -> None:
        self.mm.close()


def read_cursor(directory: str) -> tuple[int, int] | None:
    """The events process's durable position in shard *directory*; None if it has none."""
    try:
        with open(os.path.join(directory, CURSOR), "rb") as f:
            data = f.read(64)
    except FileNotFoundError:
        return None
    if len(data) != _POS.size + 4 or zlib.crc32(data[:16]) != int.from_bytes(data[16:], "little"):
        return None      # (never half-written: it is replaced by a rename)
    return _POS.unpack(data[:16])


def write_cursor(directory: str, number: int, offset: int) -> None:
    """Make (segment *number*, *offset*) the durable events cursor of shard *directory*.

    Written to a temporary file, fsynced, renamed over the old one and the
    directory fsynced: after a crash the cursor is the old one or the new one.
    """
    data = _POS.pack(number, offset)
    data += zlib.crc32(data).to_bytes(4, "little")
    tmp = os.path.join(directory, CURSOR + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, CURSOR))
    sync_dir(directory)


def segment_numbers(directory: str) -> list[int]:
    """The numbers of the segment files in *directory*, oldest first."""
    return sorted(int(n[: -len(SEGMENT_SUFFIX)]) for n in os.listdir(directory)
                  if n.endswith(SEGMENT_SUFFIX) and n[: -len(SEGMENT_SUFFIX)].isdigit())


def segment_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"{number:016d}{SEGMENT_SUFFIX}")


def read_events(codec, buf, off: int, end: int, last: bool, on_events, on_skip=None,
                limit: int = 0, *, segment: int | None) -> int:
    """Walk the records of one segment's bytes *buf* from *off*; return where to go on.

    *end*: read no record that ends after it (the watermark in the newest
    segment, else the file's length).  *segment*: the segment's number (its
    version-2 records are checked against it; required, since without it -- None --
    only version-1 records are read and every version-2 record is damage).  Each REC_EVENTS record is
    passed to ``on_events(offset, meta)``.  A record that does not decode: in
    the segment being written (*last*) it may still be on its way (or be the
    zero-filled rest), so the walk stops there and is tried again later; in
    an older segment the segment's own records end there if the rest is zero
    (a preallocated file) or the next record that decodes belongs to an older
    segment (a reused file: STALE), and the returned offset is then *end*;
    else it is skipped up to the next record that decodes like recovery does
    (``on_skip(offset, n)``).  *limit* > 0: stop after that many REC_EVENTS
    records.
    """
    OK, STALE = codec.OK, codec.STALE
    numbered = _numbered(codec, buf)
    # In a batched segment a batch's events count once its REC_COMMIT is read (a batch
    # torn at a crash was never acknowledged: its events describe nothing that happened).
    batched = segment is not None and _batched(codec, buf, segment)
    pending: list = []          # (offset, meta) of the events of the batch being read
    records = 0                 # records of that batch so far
    batch_at = -1
    taken = 0
    while off < end:
        status, rtype, meta, boff, blen, nxt = _decode(codec, buf, off, segment, numbered)
        if status == OK and nxt <= end:
            if not batched:
                if rtype == REC_EVENTS:
                    on_events(off, meta)
                    taken += 1
                    if taken == limit:
                        return nxt
            elif rtype != REC_COMMIT:
                if not records:
                    batch_at = off
                records += 1
                if rtype == REC_EVENTS:
                    pending.append((off, meta))
            else:
                first, count = _COMMIT.unpack(meta)
                if records and first == batch_at and count == records:
                    for at, events in pending:
                        on_events(at, events)
                        taken += 1
                elif (records or count) and on_skip is not None:
                    on_skip(batch_at if records else off, nxt - (batch_at if records else off))
                pending = []
                records = 0
                if limit and taken >= limit:
                    return nxt
            off = nxt
            continue
        if last:
            # (a record still on its way, or the zeros after the last: from the start
            # of the batch under way, again later)
            return batch_at if records else off
        # a damaged record; with a batch under way, that batch is broken: none of it
        had = records > 0
        broken_at = batch_at if had else off
        pending = []
        records = 0
        if status == STALE or _zero_from(buf, off, end):
            if had and on_skip is not None:
                on_skip(broken_at, off - broken_at)      # (a batch torn at its end)
            return end
        nxt, ends, torn = _after_bad_record(codec, buf, off, end, segment, numbered)
        if ends:
            if (torn or had) and on_skip is not None:
                on_skip(broken_at, (nxt if nxt >= 0 else end) - broken_at)
            return end
        if on_skip is not None:
            on_skip(broken_at, nxt - broken_at)
        off = nxt
    return batch_at if records else off


class Store:
    """The on-disk queue of one shard and its in-memory index."""

    def __init__(self, directory: str, segment_size: int, fsync: bool = True,
                 preallocate: bool = False, reserve: int = 0, events: bool = False,
                 deadline_width: float = 1.0):
        self.dir = directory
        self.segment_size = segment_size
        self.fsync = fsync
        self.preallocate = preallocate and fsync
        self.reserve = reserve
        self.spare: Spare | None = None
        self.codec = native.load("record")
        # The queue in memory: no envelope, no Python object per message or recipient
        # (docs/queue-index.md); *deadline_width*: seconds per deadline bucket.
        self.index = native.load("qindex").QueueIndex(deadline_width)
        self.segments: dict[int, Segment] = {}   # by number, insertion = age order
        self.current: Segment | None = None
        self.written = 0                      # octets appended since start (for /metrics)
        self._readers: dict[int, int] = {}   # segment number -> O_RDONLY fd
        if fsync:
            make_dirs(directory)
        else:
            os.makedirs(directory, exist_ok=True)
        # The synced watermark, when an events process reads this shard's events.
        self.watermark = Watermark(directory, True) if events else None
        self._replay_budget = 1 << 62     # records per recover_step (set by each call)
        # Bounces owed (RCPT_BOUNCE_OWED): qid -> {recipient index: [status, remote host,
        # diagnostic, last attempt(, True: local)]}, as the records that set the flags said; kept in step
        # with the index's flags by whatever applies records (recovery, commit), so that a
        # restart finds every owed bounce without a walk of the queue.
        self.owed: dict[str, dict[int, list]] = {}
        # What the recovery read and passed over (recover_start .. recover_finish): counts for
        # the log and, the records skipped, for /metrics (mta_spool_skipped_records_total)
        # The message records taken with fields mended are counted here too: mended, and
        # by reason mended_time, mended_progress (mta_spool_mended_records_total; _mended)
        self.recovery_stats = {"segments": 0, "records": 0, "skipped_bytes": 0, "torn": 0,
                               "damaged": 0, "unreadable": 0, "mended": 0,
                               "mended_time": 0, "mended_client": 0, "mended_progress": 0,
                               "mended_batch": 0}
        # The latest arrival of the message records recovered: the clock read at least
        # that when the daemon last ran (later than now: it was set back meanwhile)
        self.latest_arrival = 0.0
        # A record's arrival at or after this is no time a clock read (ARRIVAL_AHEAD_MAX;
        # set again by recover_start); the recovery raises it for each segment whose file
        # changed later than the clock reads now (_replay: _seg_bound)
        self.arrival_bound = time.time() + ARRIVAL_AHEAD_MAX
        self._seg_bound = self.arrival_bound

    @property
    def recipients(self) -> int:
        return self.index.recipients

    @property
    def bytes(self) -> int:
        return self.index.body_bytes

    # ----------------------------------------------------------------- recovery

    def recover(self) -> dict:
        """Rebuild the index from the segment files; return counts for the log."""
        self.recover_start()
        while not self.recover_step(1 << 62):
            pass
        return self.recover_finish()

    def recover_start(self) -> None:
        """Begin rebuilding the index: find the segment files (their records are read by
        :meth:`recover_step`).  From here on the store may be written: new records go to
        a new segment after every one found, so nothing recovered is ever appended to,
        and a new message (a new queue id) never meets a recovered one.  Until
        :meth:`recover_finish` the index holds only what has been read so far."""
        self._t0 = time.monotonic()
        self.arrival_bound = time.time() + ARRIVAL_AHEAD_MAX
        found = []
        for name in os.listdir(self.dir):
            if not name.endswith(SEGMENT_SUFFIX):
                continue
            stem = name[: -len(SEGMENT_SUFFIX)]
            if stem.isascii() and stem.isdigit() and os.path.isfile(os.path.join(self.dir,
                                                                                 name)):
                found.append((int(stem), name))
            else:
                # (not one of ours -- a copy an operator left, say: its int() ended the
                # shard at every start; segment_numbers, the events process's, skips it)
                log.warning("%s: not a segment file (its name is not a number); ignored",
                            os.path.join(self.dir, name))
        self.recovery_stats = dict.fromkeys(self.recovery_stats, 0)
        todo = []
        for number, name in sorted(found):
            path = os.path.join(self.dir, name)
            if self.fsync:
                _sync_recovered(path)
            seg = Segment(number, path, None, os.path.getsize(path))
            self.segments[number] = seg
            self.recovery_stats["segments"] += 1
            todo.append(seg)
        self._replaying = self._replay_all(todo, self.recovery_stats)
        if self.watermark is not None:
            # Everything recovered is on disk already: whatever an earlier run had
            # not synced was either lost at the crash or was synced above.
            last = max(self.segments, default=0)
            self.watermark.set(last, self.segments[last].size if last else 0)

    def recover_step(self, records: int) -> bool:
        """Read about *records* more records into the index; True once every one is read."""
        self._replay_budget = records
        try:
            next(self._replaying)
        except StopIteration:
            return True
        return False

    def recover_finish(self) -> dict:
        """The index is complete: count each segment's live messages; the stats for the log."""
        counts = self.index.segment_counts()
        for seg in self.segments.values():
            seg.live = counts.get(seg.number, 0)
        stats = self.recovery_stats
        stats["messages"] = len(self.index)
        stats["seconds"] = round(time.monotonic() - self._t0, 3)
        self._start_spare()
        return stats

    def _replay_all(self, todo: list, stats: dict):
        """Replay *todo* in order, pausing (a yield) after every _replay_budget records."""
        for seg in todo:
            yield from self._replay(seg, stats)

    def _start_spare(self) -> None:
        if self.preallocate and self.spare is None:
            self.spare = Spare(self.dir, self.segment_size, self.reserve)

    def _replay(self, seg: Segment, stats: dict):
        """Apply *seg*'s records to the index (a generator: it pauses after every
        ``_replay_budget`` records, so a shard can serve requests between slices)."""
        if seg.size == 0:
            return
        codec = self.codec
        OK, INCOMPLETE, STALE = codec.OK, codec.INCOMPLETE, codec.STALE
        number = seg.number
        n = 0
        with open(seg.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            # (its records' arrivals were read by the clock before the file last changed:
            # one set back since, by any amount, does not make them "ahead")
            changed = os.fstat(fh.fileno()).st_mtime
            self._seg_bound = max(self.arrival_bound, changed + ARRIVAL_AHEAD_MAX
                                  if good_time(changed) else 0.0)
            off = 0
            end = len(mm)
            # Written by a version that numbers its records (all of a file's records are
            # of one version): its file may be reused once the segment is finished.
            numbered = seg.reusable = _numbered(codec, mm)
            # A batched segment's records count once their batch's REC_COMMIT is read.
            batched = seg.batched = _batched(codec, mm, number)
            pending: list = []      # the records of the batch being read
            batch_at = -1           # where it began
            # the message records of broken batches since the last whole one: taken if
            # a whole batch follows them (they were synced: see _take_broken)
            broken: list = []
            released = 0
            while off < end:
                status, rtype, meta, boff, blen, nxt = _decode(codec, mm, off, number, numbered)
                if status == OK:
                    if rtype != REC_COMMIT:
                        stats["records"] += 1       # (the queue's records, not the frames)
                    if not batched:
                        self._apply(seg, off, rtype, meta, boff, blen)
                        n += 1
                    elif rtype != REC_COMMIT:
                        if not pending:
                            batch_at = off
                        pending.append((off, rtype, meta, boff, blen))
                    else:
                        first, count = _COMMIT.unpack(meta)
                        if pending and first == batch_at and count == len(pending):
                            batch, pending = pending, []
                            if broken:
                                batch[:0] = self._take_broken(seg, broken)
                                broken = []
                            for p in batch:
                                self._apply(seg, *p)
                                n += 1
                                if n >= self._replay_budget:     # (a slice's bound)
                                    n = 0
                                    yield
                        elif pending or count:
                            # records of the batch were lost to damage: none of it counts
                            # (but its messages, if a whole batch follows: _take_broken)
                            broken += [p for p in pending if p[1] == REC_MESSAGE]
                            lost = nxt - (batch_at if pending else off)
                            stats["skipped_bytes"] += lost
                            stats["damaged"] += 1
                            log.warning("segment %s: the batch ending at offset %d lost "
                                        "records to damage; its %d bytes are ignored",
                                        seg.path, off, lost)
                        pending = []
                    off = nxt
                    if off - released >= RELEASE_STEP:
                        released = _release(mm, released, off)
                    if n >= self._replay_budget:
                        n = 0
                        yield
                    continue
                if status == STALE or _zero_from(mm, off, end):
                    # the unused end of a preallocated segment: zeros, or in a reused
                    # file the records of the segment it was before
                    break
                # Torn tail or damaged record: skip to the next record that decodes.
                again, ends, torn = _after_bad_record(codec, mm, off, end, number, numbered)
                if ends and not torn:
                    break  # (a reused file's old contents after this segment's last record)
                skipped = (again if again >= 0 else end) - off
                if pending:         # the batch under way is broken: none of it counts
                    broken += [p for p in pending if p[1] == REC_MESSAGE]
                    skipped += off - batch_at
                    off = batch_at
                    pending = []
                stats["skipped_bytes"] += skipped
                if ends:
                    # Nothing of this segment follows: the last write was cut short
                    # by a crash (a short file; in a preallocated one a record whose
                    # rest is still zeros, in a reused one a record whose rest is the
                    # file's older contents: either fails its checksum).
                    stats["torn"] += 1
                    log.warning("segment %s: %d bytes at offset %d are incomplete or "
                                "damaged (torn tail: %s); ignored", seg.path, skipped, off,
                                "short" if status == INCOMPLETE else "bad checksum")
                    break
                stats["damaged"] += 1
                log.warning("segment %s: damaged record at offset %d, %d bytes skipped",
                            seg.path, off, skipped)
                off = again
            if pending:
                # The data ends inside a batch: a write cut short by a crash (its
                # fdatasync had not returned: the batch was never acknowledged).
                stats["skipped_bytes"] += off - batch_at
                stats["torn"] += 1
                log.warning("segment %s: the batch at offset %d is incomplete (torn tail: "
                            "%d bytes); ignored", seg.path, batch_at, off - batch_at)
                pending = []

    def _take_broken(self, seg: Segment, broken: list) -> list:
        """A whole batch follows batches of *seg* that lost records to damage: those were
        synced -- the shard writes a batch only after the one before it is synced, and a
        segment whose sync failed takes no more -- so acknowledged, and damaged since (not
        torn by a crash).  Their intact message records (*broken*) are to be taken, not
        lost with the rest; their recipient updates and DONE records are not (which of
        their changes were lost with the damaged records is not known: those recipients
        may be sent again -- at least once).  Logged and counted (stats mended_batch)."""
        self.recovery_stats["mended"] += len(broken)
        self.recovery_stats["mended_batch"] += len(broken)
        log.warning("segment %s: %d message record(s) of a batch damaged after it was "
                    "synced (a whole batch follows it) are taken, at offset(s) %s; its "
                    "recipient updates and DONE records are not (they may be sent again)",
                    seg.path, len(broken), ", ".join(str(p[0]) for p in broken))
        return broken

    def _apply(self, seg: Segment, off: int, rtype: int, meta: bytes, boff: int,
               blen: int) -> None:
        """Apply the record at *off* of *seg* to the index.  One whose checksum holds but
        whose content cannot be read -- not the struct its type says, or a recipient
        update's time out of range (MAX_TIME) -- is logged with its place, counted (stats
        "unreadable") and
        passed over, as a damaged one is: raised, it would end the shard at every start.
        (It stays in its segment until reclamation; ``mta spool-dump`` reports it.)  Each kind
        is read whole before it changes anything, so a record passed over changed nothing.
        A message record whose only fault is a time out of range is taken with it mended
        (:meth:`_mend`; logged, counted: stats "mended_time")."""
        try:
            if rtype == REC_MESSAGE:
                try:
                    m, mended = _dec_msg.decode(meta), None
                except msgspec.ValidationError as exc:
                    m, mended = self._mend(meta, seg, exc)
                else:
                    if not good_arrival(m.arrival, self._seg_bound):
                        # (in range, but no clock read it: mended as one out of range)
                        m.arrival = _taken_at(m.qid, seg.path, self._seg_bound)
                        mended = ["arrival"]
                moff = boff - len(meta)
                try:
                    self._add(m, seg.number, moff, len(meta), blen)
                except (ValueError, OverflowError):
                    # (the index refused its progress: attempts beyond 64 bits, flags
                    # beyond a byte, lists not one per recipient; it changed nothing)
                    more = mend_progress(m)
                    if not more:
                        raise
                    self._add(m, seg.number, moff, len(meta), blen)
                    mended = (mended or []) + more
                seg.total += 1
                if m.arrival > self.latest_arrival:
                    self.latest_arrival = m.arrival
                if mended:
                    self._mended(seg, off, m, mended)
            elif rtype == REC_DONE:
                remove = self.index.remove
                owed = self.owed
                for qid in _dec_done.decode(meta).qids:
                    remove(qid)
                    if owed:
                        owed.pop(qid, None)
            elif rtype == REC_RCPT:
                r = _dec_rcpt.decode(meta)
                self.index.apply(r.qid, r.updates)
                if r.owed or r.qid in self.owed:
                    self._owe(r.qid, r.owed)
            elif rtype == REC_EVENTS:
                pass        # for the events process only
            else:
                log.warning("segment %s: unknown record type %d ignored", seg.path, rtype)
        except MemoryError:
            raise           # (not the record's fault)
        except Exception as exc:  # noqa: BLE001 -- see the docstring
            self.recovery_stats["unreadable"] += 1
            log.error("segment %s: the %s record at offset %d cannot be read (%s: %s); "
                      "passed over", seg.path, _REC_NAMES.get(rtype, rtype), off,
                      type(exc).__name__, exc)

    def _mended(self, seg: Segment, off: int, m: MessageMeta, mended: list[str]) -> None:
        """Log and count a message record taken with the fields *mended*."""
        times = [f for f in mended if f in TIME_FIELDS]
        client = [f for f in mended if f == "client"]
        progress = [f for f in mended if f not in TIME_FIELDS and f != "client"]
        stats = self.recovery_stats
        stats["mended"] += 1
        for reason, fields in (("time", times), ("client", client), ("progress", progress)):
            if fields:
                stats["mended_" + reason] += 1
        log.warning("segment %s: the message record at offset %d has %s out of range (%s); "
                    "mended: %s arrives at %.6f", seg.path, off,
                    " and ".join(what for what, fields in (
                        ("a time", times), ("its client", client),
                        ("its recipients' progress", progress)) if fields),
                    ", ".join(mended), m.qid, m.arrival)

    def _mend(self, meta: bytes, seg: Segment, exc: Exception) -> tuple[MessageMeta, list[str]]:
        """A message record MessageMeta's decoder refused: when only its times are out of
        range (damage the checksum could not see: a writer's bug, memory damaged before
        the record was summed), the message with them mended (:func:`mend_times`) -- its
        queue id, sender and recipients are there, it was acknowledged, and passed over
        none of them would ever be delivered, bounced or reported.  Its arrival: the time
        its queue id was made, else the segment file's last change, else now.  Anything
        else it cannot be read for is raised (the record is unreadable)."""
        try:
            loose = _dec_mendable.decode(meta)
        except msgspec.ValidationError:
            raise exc from None             # (what MessageMeta's decoder said)
        bound = self._seg_bound
        m, mended = mend(loose, lambda: _taken_at(loose.qid, seg.path, bound), bound)
        if not mended:
            raise exc
        return m, mended

    def _add(self, m: MessageMeta, seg: int, moff: int, mlen: int, blen: int) -> bool:
        replaced = index_message(self.index, m, seg, moff, mlen, blen)
        if m.owed or self.owed and m.qid in self.owed:
            self._owed_copy(m)
        return replaced

    def _owed_copy(self, m: MessageMeta) -> None:
        """*m*, just indexed, has bounces owed, or replaced a message that had."""
        self.owed.pop(m.qid, None)      # a copy says it all (its flags, its reports)
        self._owe(m.qid, m.owed)

    def _owe(self, qid: str, notes: list | None) -> None:
        """Keep :attr:`owed` in step with *qid*'s RCPT_BOUNCE_OWED flags in the index,
        after a record changed them; *notes*: the record's reports ([index, status,
        remote host, diagnostic, last attempt], ...).  A report of a recipient whose flag
        is not set (any more) is dropped, as is one that is malformed."""
        held = self.owed.get(qid) or {}
        for n in notes or ():
            # (an index beyond what a recipient can have is malformed too: the index's
            # look-up below raised for one beyond 63 bits, after it was kept)
            if type(n) is list and (len(n) == 5 or len(n) == 6 and n[5] is True) and \
                    type(n[0]) is int and 0 <= n[0] <= 0xFFFFFFFF:
                status, host, diag, last = n[1:5]
                if (status is None or type(status) is str) and type(host) is str and \
                        type(diag) is str and (last is None or type(last) in (int, float)):
                    held[n[0]] = n[1:]
        recipient = self.index.recipient
        for idx in list(held):
            r = recipient(qid, idx)
            if r is None or not r[3] & RCPT_BOUNCE_OWED:
                del held[idx]
        if held:
            self.owed[qid] = held
        else:
            self.owed.pop(qid, None)

    # ------------------------------------------------------------------ writing

    def _open_segment(self) -> Segment:
        number = (max(self.segments) + 1) if self.segments else 1
        path = os.path.join(self.dir, f"{number:016d}{SEGMENT_SUFFIX}")
        self._start_spare()
        prezeroed = self.spare is not None and self.spare.take(path)
        # Written with pwritev at the segment's own write position, not
        # O_APPEND: in a preallocated file the end of the data is not the end
        # of the file.
        if prezeroed and not self._fit_for(path, number):
            prezeroed = False
        flags = os.O_WRONLY | os.O_CLOEXEC
        if not prezeroed:
            flags |= os.O_CREAT | os.O_EXCL
        fd = os.open(path, flags, 0o600)
        seg = Segment(number, path, fd, 0)
        seg.prezeroed = prezeroed
        seg.reusable = True
        self.segments[number] = seg
        try:
            # The opening REC_COMMIT (no records): the segment is batched (see the
            # module docstring), on disk before its first batch can be torn.
            cm = _OPENING
            hdr = self.codec.encode_header(REC_COMMIT, cm, b"", number)
            self._writev(fd, [hdr, cm], len(hdr) + len(cm), 0)
            seg.size = seg.synced = seg.base = len(hdr) + len(cm)
            seg.batched = True
            if self.fsync:
                os.fdatasync(fd)
                # The new directory entry must be durable before its records are
                # acknowledged.
                self._sync_dir()
        except OSError:
            os.close(fd)
            seg.fd = None
            self._drop(seg)
            raise
        return seg

    def _fit_for(self, path: str, number: int) -> bool:
        """Whether the spare just named *path* may become segment *number*: zero-filled,
        or a finished segment's file whose first record is of an older segment (STALE),
        so that no record left in it can be read as one of the new segment's.  Numbers
        grow while segments exist; once every segment was reclaimed (an emptied queue
        at a restart) they start again at 1, and a reused file from a higher number is
        not fit.  If not fit, the file is removed."""
        try:
            with open(path, "rb") as fh, \
                    mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                head = mm[:self.codec.HEADER_SIZE]
                if not any(head) or \
                        self.codec.decode(mm, 0, segment=number)[0] == self.codec.STALE:
                    return True
        except (OSError, ValueError):
            pass
        log.info("the spare segment file's records are not of a segment older than %d: "
                 "removed, a new file is used", number)
        try:
            os.unlink(path)
        except OSError:
            pass
        return False

    def _sync_dir(self) -> None:
        sync_dir(self.dir)

    def _drop(self, seg: Segment) -> None:
        """Forget an empty segment and remove its file (best effort)."""
        self.segments.pop(seg.number, None)
        try:
            os.unlink(seg.path)
        except OSError:
            pass

    def _close_current(self) -> None:
        seg = self.current
        if seg is not None and seg.fd is not None:
            try:
                os.close(seg.fd)
            except OSError:
                pass
            seg.fd = None
        self.current = None

    def write(self, messages: list, done: list[str], updates: dict | None = None,
              events: bytes | None = None, owed: dict | None = None) -> list[Located]:
        """Append events, message, recipient-update and DONE records; not yet durable.

        *messages* is a list of (MessageMeta, body); *updates* maps a queue id
        to its [[index, state, attempts, due(, flags)], ...]; *owed* a queue id
        (one of *updates*) to the reports of the bounces its updates make owed
        (RcptMeta.owed); *events*, the batch's encoded events, go first (one
        REC_EVENTS record).  Returns where the new messages lie, which become
        visible in the index only after :meth:`commit`.
        """
        seg = self._writable()
        number = seg.number
        codec = self.codec
        bufs = []
        start = pos = seg.size
        new = []
        if events:
            hdr = codec.encode_header(REC_EVENTS, events, b"", number)
            bufs += (hdr, events)
            pos += len(hdr) + len(events)
        for meta, body in messages:
            mb = _enc.encode(meta)
            hdr = codec.encode_header(REC_MESSAGE, mb, body, number)
            moff = pos + len(hdr)
            bufs += (hdr, mb, body)
            pos = moff + len(mb) + len(body)
            new.append(Located(meta, number, moff, len(mb), len(body)))
        if updates:
            for qid, ups in updates.items():
                mb = _enc.encode(RcptMeta(qid, ups, owed.get(qid) if owed else None))
                hdr = codec.encode_header(REC_RCPT, mb, b"", number)
                bufs += (hdr, mb)
                pos += len(hdr) + len(mb)
        if done:
            mb = _enc.encode(DoneMeta(done))
            hdr = codec.encode_header(REC_DONE, mb, b"", number)
            bufs += (hdr, mb)
            pos += len(hdr) + len(mb)
        if seg.batched:
            count = bool(events) + len(messages) + len(updates or ()) + bool(done)
            cm = _COMMIT.pack(start, count)
            hdr = codec.encode_header(REC_COMMIT, cm, b"", number)
            bufs += (hdr, cm)
            pos += len(hdr) + len(cm)
        self._append(seg, bufs, pos)
        return new

    def _writable(self) -> Segment:
        """The segment to append to: the current one, or a new one when it is full or failed."""
        seg = self.current
        if seg is None or seg.failed or seg.size >= self.segment_size or (
                not seg.prezeroed and self.spare is not None and self.spare.available):
            # (An empty segment started while no spare was ready is left as
            # soon as one is: from then on each fsync writes only data.)
            self._close_current()
            seg = self.current = self._open_segment()
        return seg

    def _append(self, seg: Segment, bufs: list, end: int) -> None:
        """Write *bufs* at the end of *seg*, which then ends at *end*."""
        try:
            self._writev(seg.fd, bufs, end - seg.size, seg.size)
        except OSError:
            self._write_failed(seg)
            raise
        self.written += end - seg.size
        seg.size = end

    def _write_failed(self, seg: Segment) -> None:
        """A write into *seg* failed: no more writes there; cut off what it left."""
        self._abandon(seg, seg.size)

    def _abandon(self, seg: Segment, keep: int) -> None:
        """No more writes into *seg*: cut it back to *keep* octets (best effort: the
        partial or unsynced batch goes, so the file stays clean), and remove it when
        nothing of its own would be left -- not a file behind for every failed batch
        (and every probe) while the disk fails."""
        seg.failed = True
        try:
            os.ftruncate(seg.fd, keep)
        except OSError:
            pass
        if keep <= seg.base:
            self._close_current()
            self._drop(seg)

    @staticmethod
    def _writev(fd: int, bufs: list, total: int, offset: int) -> None:
        """Write all of *bufs* at *offset* with as few pwritev calls as possible."""
        views = bufs
        while views:
            n = os.pwritev(fd, views[:IOV_MAX], offset)
            if n == total:
                return      # (the common case: all of it at once, nothing to walk)
            offset += n
            total -= n
            if n == 0 and total > 0:
                raise OSError(errno.ENOSPC, "short write")
            k = 0
            while k < len(views) and n >= len(views[k]):
                n -= len(views[k])
                k += 1
            views = views[k:]
            if n:  # a partial write stopped inside views[0]
                views[0] = memoryview(views[0])[n:]

    def probe(self) -> None:
        """Write and sync one record that changes nothing; OSError while the disk still fails.

        A DONE record naming no message: replayed, it removes nothing.  The
        shard calls this while it is unhealthy, so that it notices by itself
        that the disk works again, without waiting for new mail to write.
        """
        seg = self._writable()
        mb = _enc.encode(DoneMeta([]))
        hdr = self.codec.encode_header(REC_DONE, mb, b"", seg.number)
        bufs = [hdr, mb]
        end = seg.size + len(hdr) + len(mb)
        if seg.batched:
            cm = _COMMIT.pack(seg.size, 1)
            chdr = self.codec.encode_header(REC_COMMIT, cm, b"", seg.number)
            bufs += (chdr, cm)
            end += len(chdr) + len(cm)
        self._append(seg, bufs, end)
        self.sync()

    def sync(self) -> None:
        """Make everything written so far durable (fdatasync)."""
        seg = self.current
        if seg is None:
            return
        if self.fsync:
            try:
                os.fdatasync(seg.fd)
            except OSError:
                # After a failed fsync the kernel may have dropped the dirty pages:
                # nothing in this segment since the last good sync can be trusted.  Its
                # pages stay readable in the page cache, marked clean, though never
                # written: a restart of the shard (not of the machine) would recover
                # them as if durable -- say, a compaction's copies, and then reclaim
                # the segment of the originals, and a reboot would lose both.  So the
                # unsynced end is cut off now (best effort, as after a failed write).
                self._abandon(seg, seg.synced)
                raise
        seg.synced = seg.size
        if self.watermark is not None:
            self.watermark.set(seg.number, seg.size)   # a memory write: no system call

    def commit(self, new: list[Located], done: list[str],
               updates: dict | None = None, owed: dict | None = None) -> list[str]:
        """Publish a synced batch in the index; return the queue ids actually removed.

        A compaction copy replaces its message's entry and keeps what is not on
        disk -- the jobs out (else a message being delivered could be sent again,
        or bounced by an operator's bulk bounce), its place in the due queue, its
        deadline and the last temporary replies (QueueIndex.add).
        """
        index = self.index
        segments = self.segments
        if updates:
            for qid, ups in updates.items():
                index.apply(qid, ups)
                notes = owed.get(qid) if owed else None
                if notes or qid in self.owed:
                    self._owe(qid, notes)
        owed_before = self.owed
        for n in new:
            m = n.meta
            old = index.location(m.qid)
            if old is not None:
                segments[old[0]].live -= 1
            index_message(index, m, n.seg, n.meta_offset, n.meta_len, n.body_len)
            if m.owed or owed_before and m.qid in owed_before:
                self._owed_copy(m)
            seg = segments[n.seg]
            seg.live += 1
            seg.total += 1
        removed = []
        for qid in done:
            loc = index.location(qid)
            if loc is not None:
                index.remove(qid)
                segments[loc[0]].live -= 1
                removed.append(qid)
                if self.owed:
                    self.owed.pop(qid, None)
        return removed

    # ----------------------------------------------------------------- reading

    def _reader(self, seg: int) -> int:
        """A read descriptor of segment *seg* (cached, at most MAX_READERS open)."""
        fd = self._readers.get(seg)
        if fd is None:
            if len(self._readers) >= MAX_READERS:
                for old in list(self._readers)[: MAX_READERS // 2]:
                    os.close(self._readers.pop(old))
            fd = self._readers[seg] = os.open(self.segments[seg].path,
                                              os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def _pread(self, seg: int, n: int, off: int) -> bytes:
        data = os.pread(self._reader(seg), n, off)
        if len(data) != n:
            raise OSError(errno.EIO, f"segment {seg}: short read at offset {off}")
        return data

    def read_record(self, qid: str) -> tuple[MessageMeta, bytes]:
        """A queued message's envelope and bytes: one read (the meta lies right before the
        body).  KeyError if it is not queued; OSError if the disk fails."""
        loc = self.index.location(qid)
        if loc is None:
            raise KeyError(qid)
        seg, off, mlen, blen = loc
        data = self._pread(seg, mlen + blen, off)
        return self._envelope(qid, memoryview(data)[:mlen]), data[mlen:]

    def read_meta(self, qid: str) -> MessageMeta:
        """A queued message's envelope, read from its record (KeyError, OSError)."""
        loc = self.index.location(qid)
        if loc is None:
            raise KeyError(qid)
        return self._envelope(qid, self._pread(loc[0], loc[2], loc[1]))

    def _envelope(self, qid: str, meta) -> MessageMeta:
        """The envelope of queued message *qid* from its record's meta octets; one whose
        times the recovery mended (:meth:`_mend`) is mended again the same way, its
        arrival the one the index holds.  (Cost: nothing unless it is such a record.)"""
        try:
            m = _dec_msg.decode(meta)
        except msgspec.ValidationError:
            m, mended = mend(_dec_mendable.decode(meta), lambda: self.index.info(qid)[4],
                             self.arrival_bound)
            if not mended:
                raise
            return m
        if not good_arrival(m.arrival, self.arrival_bound):
            # (mended by the recovery if it read it: the index holds what it took; one
            # it kept, its segment written before the clock was set back, or taken
            # since, arrived after the bound, is as the index holds it too)
            m.arrival = self.index.info(qid)[4]
        return m

    def read_body(self, qid: str) -> bytes:
        """A queued message's bytes, read from its record (KeyError, OSError)."""
        loc = self.index.location(qid)
        if loc is None:
            raise KeyError(qid)
        seg, off, mlen, blen = loc
        return self._pread(seg, blen, off + mlen)

    def progress_meta(self, qid: str) -> tuple[MessageMeta, bytes]:
        """(the envelope with its recipients' progress, the body): a compaction copy."""
        m, body = self.read_record(qid)
        state, attempts, due, flags = self.index.progress(qid)
        held = self.owed.get(qid)
        return MessageMeta(m.qid, m.sender, m.rcpts, m.arrival, m.params, m.client, state,
                           attempts, due, flags if any(flags) else None,
                           [[i, *n] for i, n in held.items()] if held else None), body

    # ------------------------------------------------------------- reclamation

    def reclaim_plan(self, live_ratio: float, max_copy: int,
                     hold: int | None = None) -> tuple[list, list[Segment]]:
        """Decide what to free: (messages to copy forward, segments to unlink after sync).

        Walks from the oldest segment; stops at the first one that is still
        too full to compact, at the current segment, and at segment number
        *hold*: the events process's cursor is in it (it has not read past it
        yet; and since the cursor's segment stays, segment numbers never
        restart below it, so event ids and cursors are never reused).
        """
        copies: list = []
        unlink: list[Segment] = []
        for seg in list(self.segments.values()):
            if seg is self.current or (hold is not None and seg.number >= hold):
                break
            if seg.live == 0:
                unlink.append(seg)
                continue
            if seg.total and seg.live / seg.total < live_ratio and \
                    len(copies) + seg.live <= max_copy:
                for qid in self.index.in_segment(seg.number):
                    copies.append(self.progress_meta(qid))
                unlink.append(seg)
                continue
            break
        return copies, unlink

    def unlink(self, segments: list[Segment]) -> tuple[int, int]:
        """Delete segments that no longer hold a queued message; return (bytes freed,
        files kept as the next spare instead of deleted: 0 or 1).

        *segments* is oldest first.  The first one that still holds a queued
        message stops the pass: a newer segment may hold the DONE records of
        other messages in it, and deleting those first would bring the
        finished messages back at the next restart.
        """
        freed = kept = 0
        for seg in segments:
            if seg.live:
                break  # still needed (e.g. its copies were not made): keep it and all newer
            fd = self._readers.pop(seg.number, None)
            if fd is not None:
                os.close(fd)
            if self._reuse(seg):
                kept += 1
            else:
                try:
                    os.unlink(seg.path)
                except FileNotFoundError:
                    pass
            freed += seg.size
            del self.segments[seg.number]
        if freed and self.fsync:
            self._sync_dir()
        return freed, kept

    def _reuse(self, seg: Segment) -> bool:
        """Offer a finished segment's file as the next spare instead of removing it."""
        spare = self.spare
        if spare is None or spare.reused or not seg.reusable or seg.fd is not None:
            return False
        try:
            # At least the segment size (the last batch of a segment may go past it;
            # the file is not shortened: that would be a second metadata change that
            # a crash could separate from the rename).
            st = os.stat(seg.path)
            if st.st_size < self.segment_size or st.st_nlink != 1:
                return False
            return spare.offer(seg.path)
        except OSError as exc:
            log.warning("could not reuse segment file %s: %s", seg.path, exc.strerror or exc)
            return False

    def close(self) -> None:
        self._close_current()
        if self.watermark is not None:
            self.watermark.close()
            self.watermark = None
        if self.spare is not None:
            self.spare.close()
            self.spare = None
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()

    # ---------------------------------------------------------------- queries

    def summary(self, now: float | None = None) -> dict:
        """The queue's counts (QueueIndex.summary: per domain, pool, campaign, ...) and the
        segments'."""
        s = self.index.summary(time.time() if now is None else now)
        s["segments"] = len(self.segments)
        s["disk_bytes"] = sum(seg.size for seg in self.segments.values())
        return s
