"""events: reads every spool shard's durable events and publishes them (one process).

Reads:   each shard's segment files (``<spool>/shard-<n>/*.seg``, read-only),
         its synced watermark (``synced``, mmap'ed) and its events cursor
         (``events.cursor``); the configuration ([events], server.event_log).
Writes:  the JSON-lines event log (server.event_log, rotated, :mod:`mta.obs.events`);
         the events store when one is configured (``self.sink``); each shard's
         ``events.cursor`` (write to a temporary file, fsync, rename, fsync dir).
Peers:   the spool shards, through their files only; the admin process (statistics
         pushed over the bus, like every child).
Config:  [events] (all keys), [server] event_log, log_level; [spool] nothing
         (the shard count comes from the spool directory's settings).

How: every ``events.poll_interval`` (at once while there is more), for each
shard, from its cursor, walk the segments in number order and take every
REC_EVENTS record up to the shard's watermark -- in the segment the shard is
writing, a record that does not decode yet ends the walk (it is retried
later); in an older segment a damaged record is skipped like recovery does.
A record that decodes but whose events cannot be read or shaped (a bug, or a
version the reader does not know) is logged with its place, counted
(mta_events_unreadable_records_total) and passed over: it would otherwise stop
every event behind it, and the spool's reclamation with them, for good.
Each internal event becomes a SparkPost message event (:mod:`mta.events.shape`)
with an ``event_id`` made from (shard, segment, record offset, index), so a
record read again after a restart gives the same ids.  The events go to the
log and to the store.  Every ``events.checkpoint_interval``: fdatasync the
log, sync the store, then write the cursors.  A kill -9 of this process (or of
anything else) makes it resume from the cursors: events may repeat, with the
same event_id (at least once), never go missing.  The log is rotated only just
after a checkpoint, so every event in a rotated file is behind the cursors and
retention can delete it (nothing downstream reads the log).

The shards hold back reclamation of the segments the cursor has not passed
(bounded by ``events.max_backlog_bytes``, :meth:`mta.spool.shard.Shard.events_hold`).

Signals: SIGTERM: a last checkpoint, exit 0.  SIGUSR1 (passed on by the
supervisor): reopen the event log by name (logrotate).  SIGHUP: ignored.
"""
from __future__ import annotations

import logging
import mmap
import os
import signal
import time

from mta import bus, native, proc
from mta.api import webhookdb
from mta.feedback.events_store import StoreDamaged, StoreFull
from mta.events.shape import event_ids, sparkpost_entries
from mta.obs import events as ev
from mta.obs.stats import Pusher, Registry
from mta.store import (Watermark, read_cursor, read_events, segment_numbers, segment_path,
                       shard_dir, sync_dir, write_cursor)

log = logging.getLogger("mta.events")

MAX_RECORDS_PER_POLL = 256      # REC_EVENTS records taken from one shard per turn
PRUNE_INTERVAL = 60.0           # seconds between two prunes of the events store
ERROR_RETRY = 1.0               # seconds before trying again after a write failure


class NullSink:
    """No events store configured: events go to the log only."""

    def append(self, events: list[dict]) -> int:
        return 0

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

    def prune(self, now: float, keep_from_seq: int, full: bool = False,
              sweep: bool = True, finish: bool = True) -> int:
        return 0

    def pruning(self) -> bool:
        return False

    def prune_piece(self) -> bool:
        return False

    def sweeping(self) -> bool:
        return False

    def sweep(self) -> bool:
        return False

    def last_seq(self) -> int:
        return 0


def open_sink(settings):
    """The events store when ``[events] store`` is on (brief B's EventStore), else a NullSink.

    A store a power cut left damaged (it is written without a sync per commit) is set
    aside as ``<dir>.damaged-<UTC time>`` and a new one made, with an error logged: it
    holds events also in the event log, and a process that cannot start would publish
    none at all.  The readers (the webhooks process, the acceptors) see that the data
    file at the path is another one and open it (EventStore.successor); the webhooks see
    the new store's id and start at its beginning.
    """
    cfg = settings.config.events
    if not getattr(cfg, "store", False):
        return NullSink()
    from mta.feedback.events_store import EventStore, path_in  # noqa: PLC0415 (when configured)

    # (where the readers -- webhooks, acceptors -- open it: one function decides)
    path = path_in(settings)

    def make():
        return EventStore(path, map_size=getattr(cfg, "store_max_size", 1 << 30),
                          retention=getattr(cfg, "retention", 10 * 86400.0))
    try:
        return make()
    except StoreDamaged as exc:
        set_aside(path, exc)
        return make()


def set_aside(path: str, exc: OSError) -> None:
    """Rename the damaged store *path* out of the way (durably) and say so."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = f"{path.rstrip(os.sep)}.damaged-{stamp}"
    n = 1
    while os.path.exists(target):
        target = f"{path.rstrip(os.sep)}.damaged-{stamp}.{n}"
        n += 1
    os.rename(path, target)
    sync_dir(os.path.dirname(os.path.abspath(path)))
    log.error("%s; set aside as %s, a new, empty store is made (its events are in the "
              "event log; delete the damaged copy when it is not needed)", exc.strerror,
              target)


class Tail:
    """One shard's events: where we are, what is durable, the segment being read."""

    def __init__(self, shard: int, directory: str, codec):
        self.shard = shard
        self.dir = directory
        self.codec = codec
        self.wm: Watermark | None = None
        cur = read_cursor(directory) if os.path.isdir(directory) else None
        self.seg, self.off = cur if cur is not None else (0, 0)
        self.durable = cur                 # the cursor as last written
        self.mm: mmap.mmap | None = None
        self.mm_seg = 0
        self.skipped = 0
        self.unreadable = 0                # records passed over: their events unreadable

    def _watermark(self) -> tuple[int, int] | None:
        if self.wm is None:
            try:
                self.wm = Watermark(self.dir, False)
            except (FileNotFoundError, NotADirectoryError):
                return None
        return self.wm.get()

    def _map(self, number: int, need: int) -> mmap.mmap | None:
        """The segment *number* mapped (again when it grew beyond the mapping); None if gone."""
        if self.mm is not None and self.mm_seg == number and len(self.mm) >= need:
            return self.mm
        self._unmap()
        try:
            with open(segment_path(self.dir, number), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    return None
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            return None
        self.mm_seg = number
        return self.mm

    def _unmap(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None

    def _next_segment(self) -> int | None:
        """The first segment after the current one; None if there is none yet."""
        nums = segment_numbers(self.dir)
        later = [n for n in nums if n > self.seg]
        if later:
            return later[0]
        if nums and nums[-1] < self.seg and self.seg > 0:
            # Numbers restarted below the cursor: the spool was removed and made anew.
            log.warning("shard %d: the spool's segments start again at %d below the events "
                        "cursor %d; reading them from the start", self.shard, nums[0],
                        self.seg)
            self.seg = 0
            return nums[0]
        return None

    def poll(self, out: list) -> bool:
        """Append the new durable events to *out*; True if there may be more right away."""
        wm = self._watermark()
        if wm is None:
            return False
        wm_seg, wm_off = wm
        if self.seg == 0:
            nxt = self._next_segment()
            if nxt is None:
                return False
            self.seg, self.off = nxt, 0
        shard = self.shard
        taken = [0]

        def on_events(offset: int, meta) -> None:
            taken[0] += 1
            try:
                entries = sparkpost_entries(ev.decode(meta), event_ids(shard, self.seg, offset))
            except MemoryError:
                raise                 # (not the record's fault: read it again later)
            except Exception as exc:  # noqa: BLE001 -- see the module's docstring
                # (the record stays in its segment until reclamation, for a bug report)
                self.unreadable += 1
                log.error("shard %d segment %d: the events of the record at offset %d cannot "
                          "be read (%s: %s); passed over", shard, self.seg, offset,
                          type(exc).__name__, exc)
                return
            out.extend(entries)

        def on_skip(offset: int, n: int) -> None:
            self.skipped += n
            log.warning("shard %d segment %d: damaged record at offset %d, %d bytes skipped",
                        shard, self.seg, offset, n)

        while True:
            if self.seg > wm_seg:
                return False          # nothing durable there yet
            last = self.seg == wm_seg
            if last:
                mm = self._map(self.seg, wm_off)
            else:
                try:   # an older segment is complete: map all of it
                    size = os.stat(segment_path(self.dir, self.seg)).st_size
                except FileNotFoundError:
                    size = 0
                mm = self._map(self.seg, size) if size else None
            if mm is None:
                if last:
                    return False      # (not made yet, or empty)
                nxt = self._next_segment()
                if nxt is None:
                    return False
                if not os.path.exists(segment_path(self.dir, self.seg)):
                    log.error("shard %d: segment %d was removed before its events were all "
                              "read (events.max_backlog_bytes); continuing with segment %d",
                              shard, self.seg, nxt)
                self.seg, self.off = nxt, 0
                continue
            end = min(wm_off, len(mm)) if last else len(mm)
            self.off = read_events(self.codec, mm, self.off, end, last, on_events, on_skip,
                                   limit=MAX_RECORDS_PER_POLL - taken[0], segment=self.seg)
            if taken[0] >= MAX_RECORDS_PER_POLL:
                return True           # there may be more at once
            if last:
                return False          # at the watermark, or at a record still on its way
            nxt = self._next_segment()    # an older segment read to its end
            if nxt is None:
                return False
            self._unmap()
            self.seg, self.off = nxt, 0

    def position(self) -> tuple[int, int] | None:
        return (self.seg, self.off) if self.seg else None

    def close(self) -> None:
        self._unmap()
        if self.wm is not None:
            self.wm.close()


class Events:
    """The loop of the events process."""

    def __init__(self, settings):
        self.settings = settings
        cfg = settings.config.events
        self.cfg = cfg
        codec = native.load("record")
        self.tails = [Tail(n, shard_dir(settings.spool_dir, n), codec)
                      for n in range(settings.shards)]
        self.log = ev.RotatingLog(settings.event_log, rotate_bytes=cfg.rotate_bytes,
                                  rotate_age=cfg.rotate_age, keep_files=cfg.keep_files,
                                  max_total_bytes=cfg.max_total_bytes)
        self.sink = open_sink(settings)
        self.stopping = False
        self.reopen = False
        self.next_checkpoint = time.monotonic() + cfg.checkpoint_interval
        self.next_prune = 0.0
        self.webhooks_enabled = settings.config.webhooks.enabled
        self.state_dir = settings.state_dir
        self.failed = False
        # events written to the log but not to the store yet (it was full): the append
        # is retried with these, not the log write (a read again from the cursors would
        # write them to the log once more on every retry)
        self.unstored: list[dict] = []
        self.store_full = False
        self.reg = Registry(settings.config.admin.max_label_values)
        self.published = self.reg.counter("mta_events_published_total")
        self.unreadable = self.reg.counter("mta_events_unreadable_records_total")
        self.pusher = None          # statistics to the admin process (memory, CPU, counts)

    def step(self) -> bool:
        """Read and publish what is new; True if there may be more at once."""
        more = False
        if self.unstored:
            self.sink.append(self.unstored)     # StoreFull again: still full
            self.published.value += len(self.unstored)
            self.unstored = []
        for t in self.tails:
            out: list[dict] = []
            before = t.unreadable
            more |= t.poll(out)
            self.unreadable.value += t.unreadable - before
            if out:
                self.log.write(out)
                self.unstored = out
                self.sink.append(out)     # the events store (brief B), when configured
                self.unstored = []
                self.published.value += len(out)
                if self.log.rotation_due(time.time()):
                    self.checkpoint()     # (rotates: the file ends within one read of the bound)
        return more

    def checkpoint(self) -> None:
        """Log and store durable, then the cursors; rotate the log if due."""
        self.log.sync()
        self.sink.sync()
        # (events not in the store yet keep the cursors, and the log file, where they are)
        if not self.unstored:
            for t in self.tails:
                pos = t.position()
                if pos is not None and pos != t.durable:
                    write_cursor(t.dir, *pos)
                    t.durable = pos
            if self.log.rotation_due(time.time()):
                self.log.rotate()
        if time.monotonic() >= self.next_prune:
            self.prune_store()

    def prune_store(self, full: bool = False) -> None:
        """Begin the store's prune for its retention and size bound (or give the one under
        way the new time and seqs to keep); run() runs it a transaction at a time (*full*:
        an append raised StoreFull, the oldest go too, one transaction of them at once).
        keep_from_seq: the lowest seq a webhook has not consumed yet (the webhooks process
        publishes it; with webhooks off, or before it first ran: nothing is held)."""
        self.next_prune = time.monotonic() + PRUNE_INTERVAL
        keep = self.sink.last_seq() + 1
        if self.webhooks_enabled:
            need = webhookdb.read_min_seq(self.state_dir)
            if need is not None:
                keep = min(keep, need)
        # (its deletions, and a sweep for damaged events' entries it leaves pending, run a
        # piece at a time between two turns of run(): the appends do not wait for
        # millions of deletions -- a lowered retention, a downtime -- or a walk of the store)
        self.sink.prune(time.time(), keep, full=full, sweep=False, finish=False)

    def rewind(self) -> None:
        """After a write failure: read again from the durable cursors."""
        self.unstored = []         # (read again, they are written to the log again)
        for t in self.tails:
            t._unmap()
            if t.durable is not None:
                t.seg, t.off = t.durable
            else:
                t.seg, t.off = 0, 0

    def run(self) -> None:
        poll = self.cfg.poll_interval
        while not self.stopping:
            try:
                if self.reopen:
                    self.reopen = False
                    self.log.reopen()
                more = self.step()
                # one piece of the prune, else of the sweep (a transaction of bounded
                # deletions or entries, and time), then the shards again: at once, no
                # sleep while there is more
                if self.sink.pruning():
                    # (and the sweep its last piece may have left: at the next turn)
                    more |= self.sink.prune_piece() or self.sink.sweeping()
                elif self.sink.sweeping():
                    more |= self.sink.sweep()
                now = time.monotonic()
                if now >= self.next_checkpoint:
                    self.checkpoint()
                    self.next_checkpoint = now + self.cfg.checkpoint_interval
                if self.failed:
                    log.info("event log writes are succeeding again")
                    self.failed = False
                if self.store_full:
                    log.info("the events store takes events again")
                    self.store_full = False
                if self.pusher is not None:
                    self.pusher.due(now)
            except StoreFull as exc:
                # Only a prune makes room, and checkpoint() (which prunes) comes after a
                # step that succeeded: prune here (one transaction of the oldest at once,
                # the rest between the turns), then retry the append alone (the events are
                # in the log already; the cursors stay where they are): at once while the
                # prune goes on, else after ERROR_RETRY (nothing more to delete, or the
                # pages are held by a reader).
                if not self.store_full:
                    log.error("%s; pruning, then storing again every %.0fs", exc.strerror,
                              ERROR_RETRY)
                self.store_full = True
                going = False      # (a prune under way deleted some just now)
                try:
                    self.prune_store(full=True)
                    going = self.sink.pruning()
                except OSError as exc2:
                    log.error("pruning the full events store failed: %s",
                              exc2.strerror or exc2)
                if not going:
                    time.sleep(ERROR_RETRY)
                continue
            except StoreDamaged as exc:
                # (found by a write, not at the open: a power cut damaged a page the
                # open does not read) made anew like at the start, then everything
                # since the cursors goes to the new store (and the log) again
                self.sink.close()
                set_aside(self.sink.path, exc)
                self.sink = open_sink(self.settings)
                self.rewind()
                continue
            except OSError as exc:
                if not self.failed:
                    log.error("event log or cursor write failed: %s; reading again from the "
                              "last checkpoint in %.0fs", exc.strerror or exc, ERROR_RETRY)
                self.failed = True
                self.rewind()
                time.sleep(ERROR_RETRY)
                continue
            if not more:
                time.sleep(poll)
        try:
            self.checkpoint()
        except OSError as exc:
            log.error("last checkpoint failed: %s", exc.strerror or exc)

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.push()      # the final totals
            self.pusher.close()
        self.log.close()
        self.sink.close()
        for t in self.tails:
            t.close()


def main(settings, index: int, ready_fd: int | None) -> None:
    """Entry point of the events child."""
    name = proc.start_role("events", index, settings.config.server.log_level)
    log.info("starting %s", name)
    proc.keep_heap()
    e = Events(settings)

    def stop(signum, frame):
        e.stopping = True

    def reopen(signum, frame):
        e.reopen = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, reopen)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctx = bus.new_context()
    try:
        e.pusher = Pusher.create(e.reg, ctx, settings, "events", index)
        proc.report_ready(ready_fd)
        e.run()
    finally:
        e.close()
        bus.close_context(ctx)
    log.info("stopped")
