"""Events: the internal records the spool shard makes durable, and the JSON-lines log file.

**Internal events** (built by the spool shard, :mod:`mta.spool.shard` and
:mod:`mta.spool.outcomes`): plain dicts, one per recipient state change --
``type`` one of ``injection`` (one dict per *message*, its recipients in
``rcpts``), ``delivery``, ``delay``, ``bounce``, ``expiration``, the
``out_of_band`` / ``spam_complaint`` of a report sent to a bounce domain
(already in SparkPost's shape, under ``event``: see :data:`REPORT_TYPES`), and
the refusals an acceptor makes at injection (:data:`REFUSAL_TYPES`) -- with
``timestamp`` (epoch seconds), ``queue_id``, ``message_id``, ``sender``,
``recipient``, ``arrival``, ``size``, ``client`` and where known
``remote_host``, ``remote_ip``, ``response`` {code, enhanced, text},
``attempt``, ``next_attempt``, ``source``, ``sending_ip``, ``site``, ``outbound_tls``,
``bounce_class``, ``bounce_rule``, ``suppressed``, and the message's carried
injection attributes (:data:`CARRIED`, its From address and Subject included).  A batch's events are encoded once
(:func:`encode`: one orjson array) into a ``REC_EVENTS`` record written in the
same group commit as the state changes they describe (:mod:`mta.store`), so
an event is durable exactly when its change is.  The ``events`` process
(:mod:`mta.events.main`) reads them back, turns each into SparkPost's message
event shape (:mod:`mta.events.shape`) and writes the log below.

**The log** (:class:`RotatingLog`): one JSON object per line, appended by the
events process only.  It rotates by size (``events.rotate_bytes``) and age
(``events.rotate_age``): the file is renamed ``<name>-<UTC time>.jsonl`` next
to it (``events-20261202T195000-123456.jsonl``: sorted by name is sorted by time) and a new one started; rotated files beyond ``events.keep_files`` or
beyond ``events.max_total_bytes`` together are deleted, oldest first.  Disk
use is therefore at most ``rotate_bytes`` (plus one read of the events
process: at most 256 spool records) for the current file and ``max_total_bytes`` for the rotated ones.  SIGUSR1 makes the events
process reopen the file by name (after an external ``logrotate`` renamed it).
Nothing is lost by a rotation or a deletion: the events store and webhooks
consume events from the spool's records through the events process, not from
this file, so "consumed" means "the events cursor passed it"; the file is
rotated only right after a checkpoint (log synced, cursors advanced), so every
event in a rotated file is behind every cursor.
"""
from __future__ import annotations

import glob
import logging
import os
import time

import orjson

from mta.store import make_dirs, sync_dir

log = logging.getLogger("mta.events")

# Internal event types (the spool's); the SparkPost names are made in mta.events.shape.
INJECTION = "injection"
DELIVERY = "delivery"
DELAY = "delay"
BOUNCE = "bounce"
EXPIRATION = "expiration"
# Reports read by an acceptor (mta.acceptor.reports): the SparkPost event is made
# there (mta.feedback.oob) and travels whole, under "event"; the internal record
# is {"type": OUT_OF_BAND | SPAM_COMPLAINT, "timestamp": ..., "event": {...}}.
OUT_OF_BAND = "out_of_band"
SPAM_COMPLAINT = "spam_complaint"
REPORT_TYPES = (OUT_OF_BAND, SPAM_COMPLAINT)
# Refusals an acceptor makes at injection, about a recipient that never becomes a
# queued message (SparkPost's names): made durable like reports, through a spool
# shard's group commit (SpoolEventsCommit), and shaped by mta.events.shape from
# these fields: ``timestamp``, ``recipient``, ``sender``, ``client``,
# ``response`` {code, enhanced, text}, ``bounce_class``, where known ``queue_id``
# (the id given to the refused message), ``remote_addr``, ``rcpt_subs`` and the
# carried attributes (:data:`CARRIED`).
POLICY_REJECTION = "policy_rejection"           # SMTP: refused by this node's policy
GENERATION_FAILURE = "generation_failure"       # HTTP: the recipient's message could not
GENERATION_REJECTION = "generation_rejection"   # be rendered / was refused while rendered
REFUSAL_TYPES = (POLICY_REJECTION, GENERATION_FAILURE, GENERATION_REJECTION)
POLICY_CLASS = "25"     # bounce_class of a refusal by policy (SparkPost's Admin Failure)
# What an acceptor may hand a spool shard in a SpoolEventsCommit.
ACCEPTOR_TYPES = REPORT_TYPES + REFUSAL_TYPES

# The message's From address and Subject, read once at injection (the acceptor,
# mta.acceptor.main.Acceptor.submit) and kept in its params, so that every later
# event repeats them without reading the message again.  Bounded, because each
# event of the message and each queued message in the spool's memory holds them:
# a longer Subject is cut (the first MAX_SUBJECT characters are kept), a longer
# From address (none is valid: RFC 5321 allows 64 + 1 + 255) is left out.
FRIENDLY_FROM = "friendly_from"
SUBJECT = "subject"
MAX_SUBJECT = 256               # characters of a Subject kept for the events
MAX_FRIENDLY_FROM = 320         # characters of a From address kept for the events

# Injection attributes (SparkPost's campaign_id, metadata, tags; X-MSYS-API on
# SMTP; the HTTP API's transmission id and options.start_time as start_at, epoch
# seconds, when it was ahead; the From address and Subject above) stored in a
# message's params and repeated in each of its events.
CARRIED = ("campaign_id", "metadata", "tags", "ip_pool", "transactional", "transmission_id",
           FRIENDLY_FROM, SUBJECT, "start_at")
_CARRIED_KEYS = frozenset(CARRIED)

_dumps = orjson.dumps
_LINE = orjson.OPT_APPEND_NEWLINE


def carried(params: dict) -> dict:
    """The injection attributes of a message that every event about it repeats."""
    if _CARRIED_KEYS.isdisjoint(params):
        return {}  # the common case, decided in C (no loop over CARRIED)
    return {k: params[k] for k in CARRIED if k in params}


def put_headers(params: dict, friendly_from: str | None, subject: str | None) -> None:
    """Record a message's From address and Subject in its *params*, bounded (see above).

    Empty values are not recorded (the events then leave the field out).
    """
    if friendly_from and len(friendly_from) <= MAX_FRIENDLY_FROM:
        params[FRIENDLY_FROM] = friendly_from
    if subject:
        params[SUBJECT] = subject[:MAX_SUBJECT]


def encode(events: list[dict]) -> bytes:
    """A batch's internal events as one REC_EVENTS payload (one encode per batch)."""
    return _dumps(events)


def decode(payload) -> list[dict]:
    return orjson.loads(payload)


def _cut_torn_tail(fd: int, size: int, step: int = 65536) -> int:
    """Cut a file of lines back to its last complete line; its new size.

    A kill -9 in the middle of a write of many lines leaves part of one (the kernel
    stops a write at a fatal signal between pages), and so does a power cut (a
    tail of zeros).  Both are past the last checkpoint (a checkpoint syncs the
    log after its writes returned), so the events process writes those events
    again from its cursors; cut here, the fragment does not glue itself to the
    first of them, which would make two events one line no reader can parse."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - step)
        i = os.pread(fd, end - start, start).rfind(b"\n")
        if i >= 0:
            end = start + i + 1
            break
        end = start
    log.warning("event log: cut %d octet(s) of a torn last line (written again from the "
                "cursors)", size - end)
    os.ftruncate(fd, end)
    return end


class RotatingLog:
    """The JSON-lines log: buffered appends, sync, rotation by size and age, retention.

    *path* None: no file (every method does nothing).  Errors are raised to
    the caller (the events process keeps its cursor and tries again).
    """

    def __init__(self, path: str | None, *, rotate_bytes: int, rotate_age: float,
                 keep_files: int, max_total_bytes: int):
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.rotate_age = rotate_age
        self.keep_files = keep_files
        self.max_total_bytes = max_total_bytes
        self.fd = -1
        self.size = 0
        self.synced = 0          # the file's size when the last fdatasync returned
        self.started = 0.0       # when the current file's first line was written
        if path:
            # (durably, the directory and the file's name in it: the events process moves
            # its cursors past what it synced here, a power cut must not take the file)
            make_dirs(os.path.dirname(path) or ".")
            self._open()
            sync_dir(os.path.dirname(path) or ".")

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                          0o640)
        self.size = self.synced = _cut_torn_tail(self.fd, os.fstat(self.fd).st_size)
        self.started = self._first_timestamp() if self.size else 0.0

    def _open_named(self) -> None:
        """_open(), then its name made durable; left closed if that fails (the events
        process moves its cursors past what it synced in this file: a power cut must not
        take the file's name)."""
        self._open()
        try:
            sync_dir(os.path.dirname(self.path) or ".")
        except OSError:
            os.close(self.fd)
            self.fd = -1
            raise

    def _first_timestamp(self) -> float:
        """The timestamp of the first line of an existing file (its age), else now."""
        try:
            with open(self.path, "rb") as f:
                first = f.readline(65536)
            return float(orjson.loads(first)["timestamp"])
        except (OSError, ValueError, KeyError, TypeError):
            return time.time()

    def write(self, events: list[dict]) -> None:
        """Append *events*, one line each (one write for all of them)."""
        if not self.path or not events:
            return
        if self.fd < 0:
            # (a reopen or a rotation failed once the old file was closed: the events
            # process reads again from its cursors and writes here, into the file opened
            # anew -- not nowhere while its cursors move on)
            self._open_named()
        data = b"".join([_dumps(e, option=_LINE) for e in events])
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError:
            # (a short write, then ENOSPC: the part written is cut off again, best
            # effort, so that the retry starts on a line boundary, not after a torn line)
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            raise
        if not self.size:
            self.started = time.time()
        self.size += len(data)

    def sync(self) -> None:
        if self.fd >= 0:
            try:
                os.fdatasync(self.fd)
            except OSError:
                # The kernel may have dropped the pages written since the last good
                # sync while the file keeps its size; the events process writes those
                # events again (from its cursors), and behind a stretch that is zeros
                # on disk the first of them would be a line no reader can parse.  Cut
                # back to what the last good sync covered (best effort, as after a
                # failed write; never longer: copytruncate may have emptied the file).
                try:
                    if os.fstat(self.fd).st_size > self.synced:
                        os.ftruncate(self.fd, self.synced)
                        self.size = self.synced
                except OSError:
                    pass
                raise
            self.synced = self.size

    def rotation_due(self, now: float) -> bool:
        if self.fd < 0 or not self.size:
            return False
        return self.size >= self.rotate_bytes or (
            self.rotate_age > 0 and now - self.started >= self.rotate_age)

    def rotate(self) -> str | None:
        """Rename the current file aside, start a new one, apply retention; the new name.

        Call after a checkpoint (every event in the file behind every cursor).
        """
        if self.fd < 0:
            return None
        self.sync()
        base, ext = os.path.splitext(self.path)
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + \
            "-%06d" % int(now % 1 * 1_000_000)
        target = f"{base}-{stamp}{ext}"
        n = 1
        while os.path.exists(target):
            target = f"{base}-{stamp}.{n}{ext}"
            n += 1
        os.rename(self.path, target)
        os.close(self.fd)
        self.fd = -1
        self._open_named()
        log.info("event log rotated to %s", target)
        self.prune()
        return target

    def rotated(self) -> list[str]:
        """The rotated files of this log, oldest first."""
        base, ext = os.path.splitext(self.path)
        names = glob.glob(glob.escape(base) + "-*" + glob.escape(ext))
        skip = len(os.path.basename(base)) + 1

        def key(p):     # <base>-<stamp>[.<n>]<ext>: by time, then n
            stamp, _, n = os.path.basename(p)[skip:len(os.path.basename(p)) - len(ext)] \
                .partition(".")
            return (stamp, int(n) if n.isdigit() else 0)
        return sorted(names, key=key)

    def prune(self) -> list[str]:
        """Delete the oldest rotated files beyond keep_files / max_total_bytes; their names."""
        files = []
        for p in self.rotated():
            try:
                files.append((p, os.path.getsize(p)))
            except OSError:
                pass
        total = sum(s for _, s in files)
        gone = []
        while files and (len(files) > self.keep_files or total > self.max_total_bytes):
            p, s = files.pop(0)
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            total -= s
            gone.append(p)
        if gone:
            log.info("event log retention removed %d file(s): %s", len(gone),
                     ", ".join(os.path.basename(p) for p in gone))
        return gone

    def reopen(self) -> None:
        """Open the file by its name again (it was renamed by someone else)."""
        if self.fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self.fd)
            self.fd = -1
        self._open_named()     # (a new file's name: as at start)
        log.info("event log reopened: %s", self.path)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self.fd)
                self.fd = -1


