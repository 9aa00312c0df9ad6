"""One spool shard's loop: group commit, dispatch to delivery, housekeeping.

Hot path (group commit): wait for the bus; take every request and outcome
that is waiting (up to the batch bounds); append all their records -- the
batch's events first (one REC_EVENTS record, encoded once), then new
messages, recipient updates, bounces, DONE markers -- with one writev; one
fdatasync; publish the synced watermark (a memory write, :mod:`mta.store`);
then acknowledge and schedule.  The ``events`` process reads the events
from the segments up to the watermark and writes the log; an event is
therefore durable exactly when the change it describes is, and a kill at any
moment loses neither.  Requests that
arrive during the fsync are the next batch.  A message is acknowledged only
after the fsync that covers it has returned; a recipient counts as delivered,
failed or expired only once that record is durable.  What an outcome does to
a recipient is decided in :mod:`mta.spool.outcomes`; the operator's queries
are answered by :mod:`mta.spool.queries`.

Reports and refusals: a ``SpoolEventsCommit`` (an acceptor read a DSN or ARF
report sent to a bounce domain, or refused a recipient at injection: a
policy_rejection, a generation_failure or _rejection) carries only events;
they are checked, written in the batch's REC_EVENTS record and acknowledged
after the same fsync (nothing is written for them while no events process
reads this shard).

Dispatch: due recipients are grouped by domain (one SMTP transaction per
message and domain) and sent to a delivery process, transactional messages
first (a due queue of their own), each lane at most ``delivery.max_in_flight``
jobs at once, bulk at most ``delivery.max_in_flight_per_domain`` per domain,
a domain's jobs to its home process until ``delivery.spread_threshold`` are
out there, then spread (:mod:`mta.spool.dispatch`).  A job carries the
message's egress pool (``params["ip_pool"]``, else "default") and priority.
A REQUEUED outcome (delivery could not attempt it) makes the recipients due
again after its ``retry_after`` (spread by ``delivery.retry_jitter``), with no
attempt counted and no event, and, when it names no source (none of the pool's
may send to the site), the other messages of its domain and pool wait until
then as well (``Window.pause``; each spread likewise).  Each is noted with the
lane that handed it back (``dispatch.HandedBack``: site, source, domain): when a
limit of some lanes rises (``mta rules cancel``: SpoolQueueFlush requeued with
their lanes; a reload that raises them: SIGUSR1, :mod:`mta.spool.release`) only
what they handed back is due again.  The
operator's flush (``mta queue flush``) goes to every delivery process too
(DELIVERY_QUEUE_FLUSH, ahead of the jobs it makes due: their dead-site holds end; with
``--domain`` or ``--queue-id``, those of the sites of the domains flushed).  A job whose outcome never comes back
is dispatched again: at once when its delivery process disconnects (it died;
see :meth:`Shard.follow_links`), else after the delivery timeouts plus
``delivery.job_timeout_margin`` (:meth:`Shard.expire_jobs`): at-least-once.

Failure: a write or fsync error answers the whole batch STATUS_STORAGE (the
acceptor says 451 4.3.0) and leaves the outcomes unrecorded (the recipients are
tried again); the next batch starts a new segment, so the shard heals by itself
when the disk does.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import logging
import os
import queue
import threading
import time

import msgspec

from mta import bus, feedback, proc
from mta import config as mconfig
from mta.feedback import suppression as sup
from mta.obs import events as ev
from mta.obs.stats import Pusher
from mta.queueid import domain_shard, new_qid_for_shard
from mta import controls as ctl
from mta.spool import dispatch as dsp
from mta.spool import queries
from mta.spool import release
from mta.spool import schedule as sch
from mta.spool.metrics import ShardMetrics
from mta.spool.outcomes import READ_RETRY, REQUEUE_MAX, REQUEUE_MIN, Plan
from mta.store import MessageMeta, Store, lock_writer, read_cursor, shard_dir

log = logging.getLogger("mta.spool")

POLL_INTERVAL_MS = 200          # longest sleep between housekeeping checks
LIMITS_SLICE = 0.02             # seconds of a reload's lane comparison per loop turn
RECLAIM_INTERVAL = 1.0          # seconds between reclamation passes
RECLAIM_MAX_COPY = 2000         # messages copied forward per pass (bounds the pause)
DISPATCH_BATCH = 500            # due messages looked at per dispatch pass
BUSY_RETRY = 1.0                # seconds before retrying a job the bus would not take
GC_YOUNG_THRESHOLD = 10_000     # allocations between young GC collections (CPython: 700)
DRAIN_ON_DISCONNECT = 100       # batches read from a link that went away, at most
# reception parameters a delivery job needs; DSN's NOTIFY and ORCPT (lists parallel to
# the message's recipients) go with a job as lists parallel to its own (_job_params)
SPOOLED_DELIVERY_PARAMS = ("BODY", "SMTPUTF8", "ENVID", "RET")
_SPOOLED_DELIVERY_KEYS = frozenset(SPOOLED_DELIVERY_PARAMS)
DSN_RCPT_PARAMS = ("NOTIFY", "ORCPT")
REQUEUE_LOG_INTERVAL = 10.0     # seconds between log lines about REQUEUED outcomes
OP_IDLE = 0.2                   # seconds a bulk bounce waits when only jobs out are left
DEADLINE_BUCKETS = 1000         # a message expires at most max_age / this late
# QueueIndex.info fields
_START, _POOL, _CAMPAIGN, _OUT = 5, 7, 8, 9
PRIORITY = {dsp.BULK: bus.PRIORITY_BULK, dsp.TRANSACTIONAL: bus.PRIORITY_TRANSACTIONAL}


def _job_params(params: dict, msg_params: dict, idxs: list[int]) -> dict:
    """A job's params: *params*, and the DSN NOTIFY / ORCPT of its recipients *idxs*."""
    if "NOTIFY" not in msg_params:
        return params
    out = dict(params)
    for key in DSN_RCPT_PARAMS:
        values = msg_params.get(key)
        if type(values) is list:
            out[key] = [values[i] if i < len(values) else "" for i in idxs]
    return out


def _selector_text(sel: ctl.Selector) -> str:
    parts = []
    if sel.domains:
        parts.append("domain " + ",".join(sorted(sel.domains)[:5])
                     + (" ..." if len(sel.domains) > 5 else ""))
    if sel.campaign:
        parts.append(f"campaign {sel.campaign}")
    if sel.pool:
        parts.append(f"pool {sel.pool}")
    return ", ".join(parts) or "everything"


def _suppressed_state(n: int, idxs) -> list[int] | None:
    """Recipient states of a new message whose recipients *idxs* are suppressed (FAILED)."""
    if not isinstance(idxs, list):
        return None
    state = [sch.PENDING] * n
    hit = False
    for i in idxs:
        if type(i) is int and 0 <= i < n:
            state[i] = sch.FAILED
            hit = True
    return state if hit else None


def _job_timeout(d) -> float:
    """Seconds after which a job's outcome is not coming (its delivery process is gone
    or stuck): the job is sent again."""
    return d.connect_timeout + 2 * d.command_timeout + d.data_timeout + d.job_timeout_margin


class ListWriter:
    """A shard's writes to the suppression list (Bounce Rule entries), in a thread of
    their own, in order: additions, and the handle's replacement at a reload and its
    close at the end (LMDB: one handle on a list per process, used by this thread only).

    An addition waits for the list's write lock, which an acceptor's bulk PUT holds
    while it writes and syncs (~0.1 s for SparkPost's 10,000 entries): taken in the
    commit loop, it held the acknowledgements of that batch and every batch behind it
    (the node's injections on this shard) for as long.  Nothing waits for an addition
    (it was logged, not acknowledged, before too).
    """

    def __init__(self, handle):
        self.handle = handle
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        # (a daemon thread: a write that never gets the lock does not hold the exit)
        self.thread = threading.Thread(target=self._run, name="suppression-list", daemon=True)
        self.thread.start()

    def add(self, items: list) -> None:
        self.jobs.put((self._add, items))

    def reopen(self, settings) -> None:
        """Close the list in use and open the one *settings* name (None: none)."""
        self.jobs.put((self._reopen, settings))

    def close(self, timeout: float) -> None:
        """Close the list after the additions queued before; wait up to *timeout*."""
        self.jobs.put((self._reopen, None))
        self.jobs.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("suppression list: its last writes not done after %g s (its write "
                        "lock held elsewhere); Bounce Rule entries of this run may be "
                        "missing", timeout)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, arg = job
            try:
                fn(arg)
            except Exception:    # (a bug: the next jobs still run)
                log.exception("suppression list: a write failed")

    def _add(self, items: list) -> None:
        if self.handle is None:
            log.error("suppression list: %d bounced recipient(s) not added: the list "
                      "could not be opened at the reload", len(items))
            return
        try:
            self.handle.put_many(
                [(rcpt, sup.NON_TRANSACTIONAL, desc) for rcpt, desc in items], sup.BOUNCE_RULE)
        except Exception as exc:   # ListFull, lmdb.Error: logged; delivery goes on
            log.error("suppression list: %d bounced recipient(s) not added: %s",
                      len(items), exc)
        else:
            log.info("suppression list: added %s (Bounce Rule)",
                     ", ".join(r for r, _ in items[:10]) + (" ..." if len(items) > 10 else ""))

    def _reopen(self, settings) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if settings is not None:
            try:
                self.handle = sup.open_for(settings)
            except OSError as exc:
                log.error("reload: %s; the Bounce Rule adds nothing until a restart", exc)


class Shard:
    """The request loop of one shard."""

    def __init__(self, settings, shard: int):
        cfg = settings.config.spool
        self.settings = settings
        self.cfg = cfg
        self.dcfg = settings.config.delivery
        self.log_level = settings.config.server.log_level    # a reload may change it
        self.shard = shard
        self.events_on = settings.events_enabled    # an events process reads our events
        self.policy = sch.RetryPolicy(self.dcfg)
        self.bounce_domains = frozenset(d.lower() for d in
                                        settings.config.feedback.bounce_domains)
        self.rules_digest = ""      # of the bounce rules file read (_open, a reload)
        # why the rules file of the active configuration could not be read at the last
        # reload ("": this shard runs its rules); the old rules stay meanwhile
        self.rules_error = ""
        # The notices this shard writes (bounces, delay and success notices, From
        # MAILER-DAEMON@server.hostname) are signed as the acceptors sign mail: [dkim],
        # by the From domain (a key for the host name's domain, or a fallback)
        self.dkim = None
        self.signer = None
        self.keys_digest = ""       # of the key files the signer was made from
        self._set_signer(settings.config.dkim, settings.dkim_key_files,
                         settings.dkim_keys_digest)
        # The queue (store.index): per lane a due queue, and every queued message's
        # deadline (start + max_age) in buckets of max_age / DEADLINE_BUCKETS: age is
        # checked wherever a message waits -- held, parked for an absent delivery
        # process, or behind an unhealthy disk -- not only when it is dispatched.
        # (before anything of the directory is read or written: one writer per shard)
        self.writer_lock = lock_writer(shard_dir(settings.spool_dir, shard))
        self.store = Store(shard_dir(settings.spool_dir, shard), cfg.segment_size, cfg.fsync,
                           preallocate=cfg.preallocate, reserve=cfg.min_free_bytes,
                           events=self.events_on,
                           deadline_width=max(self.policy.max_age / DEADLINE_BUCKETS, 1e-3))
        self.q = self.store.index
        self.backlog = (0, 0)                   # events backlog: (bytes, segments)
        self.backlog_level = 0                  # 0 fine, 1 warned, 2 over the bound
        # a reload lowered events.max_backlog_bytes below the backlog then held: that many
        # bytes are kept until read below the new bound (_set_backlog_bound; 0: none)
        self.backlog_floor = 0
        self.endpoint = settings.spool_endpoint(shard)
        self.window = dsp.Window(settings.deliveries, self.dcfg.max_in_flight,
                                 self.dcfg.max_in_flight_per_domain, self.dcfg.spread_threshold)
        self.jobs = self.window.jobs          # req -> dispatch.Job
        # deleted messages with recipients in jobs still out (Plan.outcome_of_deleted)
        self.deleted_out: dict = {}
        # messages waiting elsewhere than the due queue (held, parked; blocked behind a
        # domain's cap in the Window): the queue index's compact FIFOs without repeats
        self.new_fifo = self.window.fifo
        self.reqs = itertools.count(1)
        self.requeued = 0                     # recipients REQUEUED since the last log line
        self.requeue_logged = 0.0
        self.expire_work: list[tuple[str, list[int]]] = []
        # messages the sweep found waiting past delay_warning_time (Plan.remind)
        self.notice_work: collections.deque[str] = collections.deque()
        # messages with no pending recipient left whose DONE is still to be written (found
        # at dispatch: their last job's outcome never came and it was taken back)
        self.finish_work: list[str] = []
        # messages with a bounce owed (Store.owed) that may have no job out any more (the
        # first batch after a restart, a job taken back): their bounce is looked at in
        # the next batch (Plan.settle)
        self.settle_work: list[str] = []
        # (monotonic) settle_work waits until then after a batch that could not be written:
        # taken again at once, a storage failure would make the loop spin on it
        self.settle_after = 0.0
        self.stopping = False
        self.reload_wanted = False            # SIGHUP: apply_reload() at the next turn
        self.limits_wanted = False            # SIGUSR1: apply_limits() at the next turn
        # the configuration whose delivery limits the lanes' hand-backs were made under
        # (a reload that raises them releases those lanes' mail: apply_limits)
        self.limits_cfg = settings.config
        self.limits_work = None                # apply_limits()'s comparison not yet done
        self.limits_from = settings.config     # ... and the configuration it compares from
        self.healthy = True
        self.last_error = ""
        self.job_timeout = _job_timeout(self.dcfg)
        # the operator's suspensions (by domain, campaign, pool) and the messages
        # they hold back (looked at again when one ends); bulk bounces by id
        self.controls = ctl.Watcher(ctl.path_of(self.settings.state_dir), log)
        self.held = self.new_fifo()
        self.ops: dict[str, ctl.BounceOp] = {}
        self.op_idle_until = 0.0
        # messages with recipients delivery REQUEUED, by the lane (site, source, domain)
        # that handed them back: made due at once when a limit of that lane rises (a
        # suspension, throttle or back-off cancelled: SpoolQueueFlush requeued=True with
        # its lanes)
        self.handed_back = dsp.HandedBack(self.new_fifo)
        self.requeue_lanes: list[tuple] = []   # this batch's (qid, site, source, domain)
        # qid -> when its last delay notice went, while it has recipients a later one
        # could name (one per message and delay_warning_time; outcomes.Plan._may_notice)
        self.delay_noticed: dict[str, float] = {}
        self.started = time.time()
        self.clock = proc.ClockStepWatch()     # the wall clock stepped back (watch_clock)
        # delivery processes a flush's DeliveryQueueFlush did not reach yet (their queue
        # was full): it goes before the next jobs sent to them (_send_flush)
        # (process -> the domains whose sites' holds end; None: every site's)
        self.flush_owed: dict[int, set[str] | None] = {}
        self.recovering = False               # reading the segment files (open())
        self.gc_was_enabled = True
        # Once a second (housekeeping): collect cyclic garbage, then exempt what survived
        # from later collections.  The shard keeps many long-lived objects (its queue used
        # to be several per message; the queue index holds none, but jobs, plans and the
        # interning tables remain); left in the oldest generation, every full collection
        # walked all of them, one per 25 % of queue growth: ~5 % of the shard's CPU under
        # load.  They form no reference cycles (frozen, they are still freed by reference
        # counting), so nothing is ever unfrozen here.
        self.gc = proc.GcSettler(full_interval=None)
        self.recovered_up_to = 0              # the last segment found at start
        # requests that wait for it (peer None: a flush, answered when it came)
        self.deferred: list[tuple[bytes | None, bus.Message]] = []
        self.finished_at_start: list[str] = []
        self.m = ShardMetrics(self, settings.config.admin.max_label_values)   # /metrics
        self.pusher = None

    def open(self, ctx, wait: bool = False) -> None:
        """Open the bus (requests and delivery links) and begin rebuilding the queue from
        disk; the loop reads it a slice at a time (:meth:`recover_slice`), taking new
        mail meanwhile.  *wait*: read it all before returning."""
        # The recovered queue is made of acyclic objects: the collector would walk
        # them again and again while they are made, for nothing (10 % of the time).
        self.gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._open(ctx, wait)
        except BaseException:
            self._restore_gc()
            raise

    def _restore_gc(self) -> None:
        if self.gc_was_enabled:
            gc.enable()

    def _open(self, ctx, wait: bool) -> None:
        self.store.recover_start()
        self.recovering = True
        self.recovered_up_to = max(self.store.segments, default=0)
        # Fewer young collections: each walks the batch's objects still alive,
        # and a batch allocates thousands (measured: 1 % fewer instructions).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        # bounce classes, by the rules the supervisor validated (its copy in run/: the
        # operator's file may have been broken since); the digest of the rules file
        # read (a reload compares it)
        self.rules_digest = feedback.configure(feedback.validated_file(
            self.settings.run_dir, self.settings.config.feedback.bounce_rules,
            self.settings.bounce_rules_digest)).digest
        self.suppression = ListWriter(sup.open_for(self.settings))
        self.bounce_rule = self.suppression.handle is not None and \
            self.settings.config.suppression.bounce_rule
        hwm = self.cfg.queue_high_water
        self.server = bus.Server(ctx, self.endpoint, hwm, bus.SPOOL_REQUESTS, log,
                                 stream=self.settings.stream_path(self.shard))
        self.links = bus.DeliveryLinks(
            ctx, [self.settings.delivery_endpoint(d)
                  for d in range(self.settings.deliveries)], hwm, log)
        self.poller = bus.Poller(self.server, self.links)
        self.pusher = Pusher.create(self.m.reg, ctx, self.settings, "spool", self.shard)
        # qids due while delivery[d] was away, per d
        self.parked = [self.new_fifo() for _ in range(len(self.links))]
        self.controls.refresh(time.time())
        self.recover_slice(1 << 62 if wait else self.cfg.recovery_slice)

    def recover_slice(self, records: int) -> None:
        """Read the next *records* records of the old segments; once all are read,
        schedule the recovered queue and answer the requests that waited for it.

        While it reads, new mail is taken and made durable as always (into a new
        segment: nothing read is ever appended to), and acknowledged only after its
        fsync, so nothing is lost or misreported; what needs the whole queue --
        dispatch, delivery outcomes, expiry, reclamation, deletes and the
        operator's questions other than the summary -- waits until the end (a flush
        is answered at once, ``recovering``, and done then).
        """
        if not self.store.recover_step(records):
            return
        stats = self.store.recover_finish()
        log.info("recovered queue: messages=%d segments=%d records=%d skipped_bytes=%d "
                 "unreadable_records=%d mended_records=%d seconds=%s", stats["messages"],
                 stats["segments"], stats["records"], stats["skipped_bytes"],
                 stats["unreadable"],
                 stats["mended"],
                 stats["seconds"])
        # each recovered message at its earliest pending due time, with its deadline;
        # those none of whose recipients is pending are finished now
        # (or, before it, when its delay notice is due: RetryPolicy.first_look)
        self.finished_at_start += self.q.schedule_recovered(self.recovered_up_to,
                                                            self.policy.first_look())
        self._clock_behind_spool()
        self.recovering = False
        # the recovered queue is never walked by the collector (frozen without a
        # collection first: it made no cycles, and walking a million entries takes ~1 s)
        gc.freeze()
        self._restore_gc()
        waiting, self.deferred = self.deferred, []
        for peer, msg in waiting:
            if type(msg) is bus.SpoolMessageDelete:
                self.batch(deletes=[(peer, msg)])
            elif peer is None:          # (a flush, answered when it came)
                self.flush(msg)
            else:
                self.query(peer, msg)
        # bounces owed at the crash or stop: no job is out now, so they go in this batch
        self.settle_work += self.store.owed
        if self.finished_at_start or self.settle_work:
            # (through finish_work: a batch that fails leaves them due again, not lost)
            self.finish_work += self.finished_at_start
            self.finished_at_start = []
            self.batch()

    def run(self) -> None:
        self.start()
        try:
            while not self.stopping:
                self.step()
        finally:
            if self.recovering:      # stopped before the queue was read
                self._restore_gc()
        # Anything that arrived but was not taken is not acknowledged: the
        # acceptors time out and answer 451, so nothing is lost.
        if self.suppression is not None:
            # (suppression.writer_close_wait: the file's, a reload's too)
            self.suppression.close(self.settings.config.suppression.writer_close_wait)
        self.store.close()
        os.close(self.writer_lock)     # (last: the directory is another writer's now)
        self.server.close()
        self.links.close()
        if self.pusher is not None:
            self.pusher.push()      # the final totals
            self.pusher.close()

    def start(self) -> None:
        """Prepare the loop for :meth:`step` (after :meth:`open`).

        The supervisor's record of the active configuration is taken at the first
        turn (:meth:`apply_reload`): a reload applied between this process's fork
        and the moment its SIGHUP handler was set (a SIGHUP is ignored until then,
        mta.proc.start_role) would otherwise leave this shard on the [delivery] it
        was forked with until the next reload."""
        self.next_reclaim = time.monotonic() + RECLAIM_INTERVAL
        if mconfig.read_active(self.settings.run_dir) is not None:
            self.reload_wanted = True

    def _set_signer(self, cfg, files: dict | None = None, digest: str = "") -> None:
        """Sign this shard's notices with the keys of *cfg* ([dkim]) from now on (*files*:
        the key files' bytes the supervisor checked, Settings.dkim_key_files, at the
        start; at a reload they are read here).  *digest*: that of the key files the
        supervisor checked (Settings.dkim_keys_digest; "": not recorded), which the
        files read here must match.  Keys that cannot be loaded, or files that changed
        on disk since the configuration was checked, leave the signer as it was (none
        at start): logged, and the shard goes on (the next reload tries again)."""
        signer = None
        if cfg.enabled and cfg.keys:
            from mta.dkim import DkimConfigError, Signer, files_digest, read_key_files
            try:
                if files is None:
                    files = read_key_files(cfg)
                    if digest and files_digest(files) != digest:
                        raise DkimConfigError(["the key files changed on disk since the "
                                               "supervisor checked them (a reload "
                                               "checks them again)"])
                signer = Signer.from_config(cfg, files=files)
            except ValueError as exc:   # DkimConfigError too
                log.error("DKIM: %s; notices (DSNs) are signed as before", exc)
                return
        self.dkim, self.signer, self.keys_digest = cfg, signer, digest

    def _set_suppression(self, cfg) -> None:
        """Take [suppression] enabled, path, max_size, bounce_rule and writer_close_wait of
        *cfg* (a reload):
        the new acceptors check injections against the list they name and add the
        out-of-band Bounce Rule entries to it, so this shard's in-band ones go there too.
        The list is replaced in the writer's thread, after the additions queued
        before (ListWriter); one that cannot be opened (the acceptors opened it a
        moment ago) is logged, and the Bounce Rule adds nothing until a restart."""
        cur = self.settings.config.suppression
        if cfg == cur:
            return
        settings = dataclasses.replace(self.settings, config=msgspec.structs.replace(
            self.settings.config, suppression=cfg))
        if (cfg.enabled, cfg.path, cfg.max_size) != (cur.enabled, cur.path, cur.max_size):
            self.suppression.reopen(settings if cfg.enabled else None)
        # (writer_close_wait too, read at the stop)
        self.settings = settings
        if (cfg.enabled, cfg.path, cfg.max_size, cfg.bounce_rule) == \
                (cur.enabled, cur.path, cur.max_size, cur.bounce_rule):
            return
        self.bounce_rule = cfg.enabled and cfg.bounce_rule
        log.info("reload: suppression list %s, Bounce Rule %s",
                 os.path.join(settings.state_dir, cfg.path) if cfg.enabled else "off",
                 "on" if self.bounce_rule else "off")

    def _set_feedback(self, cfg, digest: str) -> None:
        """Take feedback.bounce_rules and bounce_domains of *cfg* (a reload), as the new
        acceptors (out-of-band reports) and delivery processes (the VERP domain) do: the
        in-band bounces are classified by the same rules.  The rules file is read again
        when its name changed or its content did (*digest*, of the file the supervisor
        checked, differs from that of the file this shard read: edited in place); what
        is read is the supervisor's copy of the file it checked (feedback.validated_file),
        the operator's file only when there is none.  A rules file that cannot be read
        now (the copy gone, and the file broken since the supervisor's check) leaves the
        rules in use: logged, and said (``rules_error``: its answer to the supervisor,
        mta_spool_bounce_rules_stale) until a reload reads it."""
        cur = self.settings.config.feedback
        # (a file that could not be read at the last reload: its digest is still not ours)
        edited = cfg.bounce_rules == cur.bounce_rules and digest != self.rules_digest
        self.rules_error = ""
        if (cfg.bounce_rules, cfg.bounce_domains) == (cur.bounce_rules, cur.bounce_domains) \
                and not edited:
            return
        if cfg.bounce_rules != cur.bounce_rules or edited:
            try:
                self.rules_digest = feedback.configure(feedback.validated_file(
                    self.settings.run_dir, cfg.bounce_rules, digest)).digest
            except Exception as exc:    # RuleError, OSError: the old rules stay
                self.rules_error = f"{cfg.bounce_rules or '(shipped only)'}: {exc}"
                log.error("reload: feedback.bounce_rules: %s; the bounce rules stay as they "
                          "were (%s) until a reload reads the file; the rest of the "
                          "configuration is taken", exc, cur.bounce_rules or "shipped only")
                cfg = msgspec.structs.replace(cfg, bounce_rules=cur.bounce_rules)
            else:
                log.info("reload: bounce rules %s%s", cfg.bounce_rules or "(shipped only)",
                         " (edited in place: read again)" if edited else "")
        self.bounce_domains = frozenset(d.lower() for d in cfg.bounce_domains)
        self.settings = dataclasses.replace(self.settings, config=msgspec.structs.replace(
            self.settings.config, feedback=cfg))

    def apply_reload(self) -> None:
        """SIGHUP: take the [delivery] keys a running shard can change, the log level and
        [dkim] (the notices' signer) from the active configuration the supervisor
        recorded (the others stay as at start)."""
        self.reload_wanted = False
        active = mconfig.read_active(self.settings.run_dir)
        if active is None:
            log.warning("reload: the active configuration cannot be read; "
                        "[delivery] stays as it was")
            return
        if active.config.server.log_level != self.log_level:
            self.log_level = active.config.server.log_level
            proc.set_log_level(self.log_level)
        if active.config.dkim != self.dkim or active.dkim_keys_digest != self.keys_digest:
            self._set_signer(active.config.dkim, digest=active.dkim_keys_digest)
        self._set_suppression(active.config.suppression)
        self._set_feedback(active.config.feedback, active.bounce_rules_digest)
        self._set_backlog_bound(active.config.events.max_backlog_bytes)
        self._set_delivery(active.config.delivery)
        self._say_applied(active.serial)

    def _say_applied(self, serial: float) -> None:
        """Tell the supervisor (run/spool-<n>.applied.json) that this shard took the
        record *serial*: it starts a reload's new acceptors only then, so that no Bounce
        Rule entry of this shard goes to a list they no longer read."""
        try:
            mconfig.write_applied(self.settings.run_dir, self.shard, {
                "pid": os.getpid(), "serial": serial,
                "bounce_rules": self.settings.config.feedback.bounce_rules,
                "bounce_rules_digest": self.rules_digest,
                "bounce_rules_stale": bool(self.rules_error),
                "bounce_rules_error": self.rules_error,
                "dkim_keys_digest": self.keys_digest})
        except OSError as exc:
            log.error("reload: cannot tell the supervisor the new configuration is taken "
                      "(%s): it starts the new acceptors after its wait", exc)

    def _set_delivery(self, cfg) -> None:
        """Take the [delivery] keys of *cfg* a running shard can change (a reload)."""
        old = self.dcfg
        new = msgspec.structs.replace(cfg, **{
            k: getattr(old, k) for k in mconfig.SPOOL_START_KEYS})
        if new == old:
            return
        self.dcfg = new
        first_look = self.policy.first_look()
        self.policy = sch.RetryPolicy(new)
        if self.policy.first_look() < first_look:
            self._look_sooner()
        # Never lowered while running: the delivery processes are replaced after this
        # SIGHUP, one at a time, and the old ones finish their jobs (and take new ones
        # meanwhile) under the old timeouts; a job out longer than a lowered bound would
        # be sent again while its first copy may still be delivered.  (Raised: at once.)
        self.job_timeout = max(self.job_timeout, _job_timeout(new))
        if new.hold != old.hold:
            log.warning("reload: delivery %s", "held: no new job goes out (those out "
                        "finish)" if new.hold else "no longer held")
        else:
            log.info("reload: [delivery] retry schedule and timeouts taken")

    def apply_limits(self) -> None:
        """SIGUSR1 (the supervisor, once a reload's new delivery processes run): what the
        lanes whose limits the new configuration raised handed back is due again now
        (mta.spool.release); the others' keeps its wait."""
        self.limits_wanted = False
        active = mconfig.read_active(self.settings.run_dir)
        if active is None:
            log.warning("reload: the active configuration cannot be read; mail delivery "
                        "handed back waits for its time")
            return
        # (a comparison a reload before left unfinished is started again from the
        # configuration it compared from: its lanes not yet looked at are not missed)
        old = self.limits_from if self.limits_work is not None else self.limits_cfg
        self.limits_cfg = active.config
        self.limits_work = None
        if not self.handed_back.lanes:
            return
        self.limits_from = old
        self.limits_work = release.compare(old, active.config, self.handed_back.by_lane())
        self.limits_slice()

    def limits_slice(self) -> None:
        """A slice of apply_limits()'s comparison, LIMITS_SLICE seconds at most (then the
        loop's other work; the rest at the next turns): its lanes are released."""
        work = self.limits_work
        lanes = []
        deadline = time.monotonic() + LIMITS_SLICE
        try:
            for lane in work:
                if lane is not None:
                    lanes.append(lane)
                elif time.monotonic() >= deadline:
                    break
            else:
                self.limits_work = None
        except Exception:       # (never the shard's end: the mail waits for its time)
            self.limits_work = None
            log.exception("reload: cannot compare the lanes' limits; mail delivery handed "
                          "back waits for its time")
        if lanes:
            self.release_lanes(0, lanes)

    def step(self) -> None:
        """One turn of the loop: wait for work, group-commit it, dispatch, housekeeping."""
        if self.reload_wanted:
            self.apply_reload()
        if self.limits_wanted:
            self.apply_limits()
        elif self.limits_work is not None:
            self.limits_slice()
        timeout = 0 if self.limits_work is not None else POLL_INTERVAL_MS
        if self.recovering:
            self.recover_slice(self.cfg.recovery_slice)
            timeout = 0
        # Wake for the next due recipient only when dispatch can act on it;
        # otherwise (held, unhealthy, window full) a past due time would spin.
        lanes = self.open_lanes()
        nd = self.q.next_due(lanes) if lanes else None
        if nd is not None:
            timeout = max(0, min(timeout, int((nd - time.time()) * 1000) + 1))
        ops = self.op_pending()
        settle = bool(self.settle_work)
        if settle:
            wait = self.settle_after - time.monotonic()
            if wait > 0:
                settle = False
                timeout = min(timeout, int(wait * 1000) + 1)
        # (delay-notice looks wait while writes fail: taken at once, a batch's worth at a
        # time, they would make the loop spin on a full disk)
        notices = self.healthy and bool(self.notice_work)
        work = self.expire_work or notices or self.finish_work or settle or ops
        if work:
            timeout = 0
        requests, outcomes, changes = self.poller.wait(timeout)
        if requests or outcomes or changes or work:
            self.batch(outcomes=outcomes)
            self.server.flush()         # (the answers, before dispatch's work)
        if changes and not self.recovering:
            self.follow_links()
        self.dispatch()
        now = time.monotonic()
        if self.pusher is not None:
            self.pusher.due(now)
        if now >= self.next_reclaim and not self.recovering:
            self.next_reclaim = now + RECLAIM_INTERVAL
            self.watch_clock()
            if not self.healthy:
                self.probe()
            self.reclaim()
            self.expire_jobs()
            self.expire_waiting()
            if self.controls.refresh(time.time()):
                self.release_held()
            self.release_blocked(everything=True)
            self.window.unpause(time.time())
            self.log_requeued()
            self.gc.settle()

    # ------------------------------------------------------------ group commit

    def batch(self, extra_done: list[str] | None = None, outcomes: list | None = None,
              deletes: list | None = None) -> None:
        """Take every waiting request and outcome, write them together, sync once, answer.

        *outcomes*: the delivery links to read (those the poll found ready);
        None reads them all (none while the queue is being recovered).  *deletes*:
        SpoolMessageDelete requests that waited for the recovery, (peer, msg).
        """
        cfg = self.cfg
        server = self.server
        now = time.time()
        finished: list[str] = []
        if self.finish_work and not self.recovering:
            q = self.q
            for qid in dict.fromkeys(self.finish_work):
                info = q.info(qid)
                if info is not None and not info[_OUT]:
                    finished.append(qid)
            self.finish_work = []
            extra_done = list(extra_done or ()) + finished
        messages = []      # (MessageMeta, body)
        commit_peers = []  # (peer, req): one answer per request, whatever it carried
        done: list[str] = list(extra_done or ())
        delete_peers = []  # (peer, req, qids)
        suppressed_done: list[str] = []   # new messages whose every recipient is suppressed
        reports: list[dict] = []   # events of reports read by an acceptor (SpoolEventsCommit)
        plan = self.plan()
        for qid in finished:
            plan.settle(qid)        # (its DONE goes with the bounce it owes)
        if self.settle_work and not self.recovering and time.monotonic() >= self.settle_after:
            for qid in dict.fromkeys(self.settle_work):
                plan.settle(qid)
            self.settle_work = []
        size = 0
        recovering = self.recovering
        for peer, msg in deletes or ():
            done += self._delete(plan, now, peer, msg, delete_peers)
        while len(messages) < cfg.max_batch_messages and size < cfg.max_batch_bytes:
            got = server.recv()
            if got is None:
                break
            peer, msg = got
            if recovering and type(msg) not in (bus.SpoolMessageCommit, bus.SpoolEventsCommit,
                                                bus.SpoolQueueSummary, bus.SpoolAdminRefresh):
                if type(msg) is bus.SpoolQueueFlush:
                    # answered now (the operator is told, not kept waiting for a recovery
                    # that may take minutes), done once the queue is whole
                    server.send(peer, bus.SpoolQueueFlushReply(msg.req, 0, recovering=True))
                    peer = None
                elif type(msg) is bus.SpoolMessageShow:
                    # (mta queue show, mta inspect: "recovering, retry shortly" now, not
                    # "not answering" after their 5 s)
                    server.send(peer, bus.SpoolMessageShowReply(
                        msg.req, bus.STATUS_STORAGE, None, b"", recovering=True))
                    continue
                self.deferred.append((peer, msg))   # answered once the queue is whole
                continue
            if type(msg) is bus.SpoolMessageCommit:
                for env, b in zip(msg.envelopes, msg.bodies):
                    params = env.params
                    params["message_id"] = env.message_id
                    state = None
                    if sup.PARAM in params:
                        state = _suppressed_state(len(env.rcpts), params[sup.PARAM])
                        if state is not None and sch.PENDING not in state:
                            suppressed_done.append(env.qid)
                    messages.append((MessageMeta(env.qid, env.sender, env.rcpts, env.arrival,
                                                 params, env.client, state), b))
                    size += len(b)
                commit_peers.append((peer, msg.req))
            elif type(msg) is bus.SpoolEventsCommit:
                if self._take_report(msg, reports):
                    commit_peers.append((peer, msg.req))
                else:
                    server.send(peer, bus.SpoolMessageCommitted(msg.req, bus.STATUS_UNKNOWN))
            elif type(msg) is bus.SpoolMessageDelete:
                done += self._delete(plan, now, peer, msg, delete_peers)
            else:
                self.query(peer, msg)
        links = self.links
        if recovering:
            outcomes = ()       # (nothing was sent; a job of the last run waits)
        for d in range(len(links)) if outcomes is None else outcomes:
            while len(plan.updates) < cfg.max_batch_messages:
                msg = links.recv(d)
                if msg is None:
                    break
                job = self.returned(msg.req, msg.qid)
                # deleted while this job was out (mta queue delete), in an earlier batch
                # or in this one: its outcome is its recipients' last word
                gone = self.deleted_out.get(msg.qid) or plan.deleted_out.get(msg.qid)
                if gone is not None:
                    if job is not None:
                        plan.outcome_of_deleted(msg.qid, gone, msg.results, now,
                                                source=msg.source, source_ip=msg.source_ip,
                                                site=msg.site, rule=msg.rule,
                                                outbound_tls=msg.outbound_tls)
                        self._forget_deleted(msg.qid)
                    continue
                requeued = 0     # (counted in a loop: a generator per outcome cost more)
                if job is not None:
                    if job.meta is not None:
                        plan.known(msg.qid, job.meta)       # (not read again)
                    for r in msg.results:
                        if r.outcome == bus.REQUEUED:
                            requeued += 1
                if job is not None and not msg.source and msg.results and \
                        requeued == len(msg.results):
                    # (no source: none of the pool's may send to the site; one named is
                    # that source's own answer -- a warm-up cap with overflow "wait" --
                    # and the pool's other sources take their share meanwhile)
                    info = self.q.info(msg.qid)
                    if info is not None:      # the same answer for the domain and pool
                        wait = min(max(msg.retry_after, REQUEUE_MIN), REQUEUE_MAX)
                        self.window.pause(job.domain, info[_POOL], now + wait, msg.site)
                if job is not None:
                    if requeued:
                        self.requeue_lanes.append((msg.qid, msg.site, msg.source,
                                                   job.domain))
                    elif msg.qid in self.handed_back:
                        # tried since: not what that lane handed back any more (a release
                        # would retry a deferral before its time)
                        self.handed_back.discard(msg.qid, job.domain)
                plan.outcome(msg.qid, msg.results, now, source=msg.source,
                             source_ip=msg.source_ip, site=msg.site,
                             retry_after=msg.retry_after, rule=msg.rule,
                             outbound_tls=msg.outbound_tls)
        work, self.expire_work = self.expire_work, []
        for qid, idxs in work:
            plan.expire(qid, idxs, now)
        op_taken = self.op_work(plan, now) if self.ops else []
        if self.notice_work and self.healthy:   # (after the outcomes and the operator's
            n = cfg.max_batch_messages          # bounces: those they decide on are theirs)
            work = self.notice_work     # (a deque: a backlog of a million is not copied
            for _ in range(min(n, len(work))):      # again for each batch taken from it)
                plan.remind(work.popleft(), now)
        plan.finish(now)
        if plan.unsettled and finished:
            # found finished at dispatch, but the bounce they owe could not be made (their
            # record unreadable now): not finished without it; found again later
            keep = set(plan.unsettled) & set(finished)
            if keep:
                done = [x for x in done if x not in keep]
                extra_done = [x for x in extra_done if x not in keep]
                finished = [x for x in finished if x not in keep]
                for qid in keep:
                    self.q.push(qid, now + READ_RETRY)     # (as an expiry's read error)
        messages += plan.bounces
        done += plan.done
        # (written after their message records: finished in the same batch)
        done += suppressed_done
        if not messages and not done and not plan.updates and not reports \
                and not plan.events:
            # Nothing to write (REQUEUED outcomes, repeated ones; reports' events
            # while no events process reads them): schedule only.
            self._requeue(plan)
            self._push(plan.reschedule)
            self._look_again(plan.look)
            for peer, req in commit_peers:
                server.send(peer, bus.SpoolMessageCommitted(req, bus.STATUS_OK))
            # (a delete of messages no longer queued: nothing to write, and the answer
            # is that none was deleted -- left unanswered, the CLI timed out)
            for peer, req, qids in delete_peers:
                server.send(peer, bus.SpoolMessageDeleteReply(req, bus.STATUS_OK, qids))
            return
        status = bus.STATUS_OK
        events = None
        if self.events_on:
            batch_events = self._batch_events(messages, plan) + reports
            if batch_events:
                events = ev.encode(batch_events)
        try:
            new = self.store.write(messages, done, plan.updates, events, plan.owe)
            t = time.perf_counter()
            self.store.sync()
            self.m.fsync.observe(time.perf_counter() - t)
            if messages:
                self.m.batch.observe(len(messages))
        except OSError as exc:
            self.m.errors.value += 1
            status = bus.STATUS_STORAGE
            if self.healthy or exc.strerror != self.last_error:
                log.error("spool write failed: %s; answering 451 until it recovers",
                          exc.strerror or exc)
            self.healthy = False
            self.last_error = exc.strerror or str(exc)
            abandoned = plan.abandon()
            q = self.q
            first_look = self.policy.first_look()
            owed = self.store.owed
            settle = list(plan.settling)
            for qid in abandoned:
                info = q.info(qid)
                if info is not None:
                    q.push(qid, now + BUSY_RETRY)
                    # (an expiry, or a delay notice, that was not recorded is looked
                    # at again)
                    q.set_deadline(qid, info[_START] + first_look)
                    if qid in owed and not info[_OUT]:
                        # (its last job came back in this batch: its bounce owed is looked
                        # at as for a job taken back -- it may not be sent again soon)
                        settle.append(qid)
            for op, qid, n in reversed(op_taken):     # (bounced with the next batch)
                op.todo.appendleft((qid, n))
            for qid in finished:        # (found at dispatch again, finished then)
                if q.info(qid) is not None:
                    q.push(qid, now + BUSY_RETRY)
            if settle:              # (their bounce is looked at again, in a moment)
                self.settle_work += settle
                self.settle_after = time.monotonic() + BUSY_RETRY
            # (a delay notice not written: looked for again in a moment)
            self._look_again(dict.fromkeys(plan.look, now + BUSY_RETRY))
        else:
            self._untrack(done)
            removed = self.store.commit(new, done, plan.updates, plan.owe)
            deleted = set(removed) - set(plan.done) - set(extra_done or ()) - \
                set(suppressed_done)
            if deleted:
                log.info("deleted by operator: %s", " ".join(sorted(deleted)))
            if not self.healthy:
                log.info("spool writes are succeeding again")
            self.healthy = True
            self.last_error = ""
            self._requeue(plan)
            self._after_commit(new, plan)
            self._look_again(plan.look)
            if plan.expired or plan.operator_bounced:
                self.m.ended(plan)
            for qid in plan.notice_more:
                self.delay_noticed[qid] = now
            if plan.deleted_out:
                self._keep_deleted(plan.deleted_out)
            if op_taken:
                self.op_committed(op_taken)
            if plan.suppress and self.bounce_rule:
                self.add_bounce_rule(plan.suppress)
        for peer, req in commit_peers:
            server.send(peer, bus.SpoolMessageCommitted(req, status))
        for peer, req, qids in delete_peers:
            server.send(peer, bus.SpoolMessageDeleteReply(
                req, status, qids if status == bus.STATUS_OK else []))

    def _take_report(self, msg: bus.SpoolEventsCommit, out: list) -> bool:
        """Add an acceptor's events to the batch (*out*); False when they cannot be encoded.

        Only the types an acceptor makes are taken (``ev.ACCEPTOR_TYPES``: a
        report's ``out_of_band`` / ``spam_complaint``, a refusal's
        ``policy_rejection`` / ``generation_*``; the shard must not die on its
        input, so they are encoded once here).  Nothing is added while no
        events process reads this shard's events.
        """
        try:
            if any(e.get("type") not in ev.ACCEPTOR_TYPES for e in msg.events):
                raise ValueError("not an event an acceptor makes")
            ev.encode(msg.events)
        except (TypeError, ValueError) as exc:
            log.warning("dropped a report's events from an acceptor: %s", exc)
            return False
        if self.events_on:
            out += msg.events
        return True

    def plan(self) -> Plan:
        """A fresh Plan over this shard's queue, for one batch."""
        return Plan(self.q, self.store.read_meta, self.policy, self.store.read_body,
                    lambda: new_qid_for_shard(self.shard, self.settings.shards),
                    self.settings.hostname, self.bounce_domains, self.store.owed,
                    self.delay_noticed, self.started,
                    self.signer.sign_message if self.signer is not None else None)

    def returned(self, req: int, qid: str) -> dsp.Job | None:
        """The outcome of job *req* came back: it is no longer out; the job (None if it
        was not out: a repeated outcome, or one from before a restart)."""
        job = self.window.remove(req)
        if job is not None:
            self.q.add_out(qid, -1)
        return job

    def _push(self, items) -> None:
        """Make each (due, qid) of *items* due then (unless due earlier already)."""
        push = self.q.push
        for due, qid in items:
            push(qid, due)

    def _look_again(self, look: dict) -> None:
        """File each message of *look* (qid -> time) for the sweep to look at then."""
        set_deadline = self.q.set_deadline
        for qid, t in look.items():
            set_deadline(qid, t)

    def _look_sooner(self) -> None:
        """``delay_warning_time`` was turned on or lowered (a reload): every message filed
        for the sweep is filed again at its new first look (RetryPolicy.first_look), as
        the queue was filed for the old one, or for its deadline; the sweep files each
        again as it finds it (once, on a reload: a walk of the queue)."""
        q = self.q
        first_look = self.policy.first_look()
        for qid in q.passed(float("inf")):
            info = q.info(qid)
            if info is not None:
                q.set_deadline(qid, info[_START] + first_look)

    def _requeue(self, plan: Plan) -> None:
        """REQUEUED recipients: their new due time, in memory only (not an attempt).

        Not written: after a restart such a recipient is due at its recorded
        time, which has passed, so it is simply tried again.
        """
        q = self.q
        for qid, items in plan.requeues.items():
            if qid not in q:
                continue
            for idx, due in items:
                r = q.recipient(qid, idx)
                if r is not None and r[0] == sch.PENDING:
                    q.set_due(qid, idx, due)
                    self.requeued += 1
        lanes, self.requeue_lanes = self.requeue_lanes, []
        add = self.handed_back.add
        for qid, site, source, domain in lanes:
            if qid in plan.requeues and qid in q:
                add(qid, site, source, domain)

    def log_requeued(self) -> None:
        """One INFO line at most every REQUEUE_LOG_INTERVAL about REQUEUED recipients."""
        now = time.monotonic()
        if self.requeued and now - self.requeue_logged >= REQUEUE_LOG_INTERVAL:
            log.info("%d recipient(s) were not attempted by delivery (no source may send "
                     "now, or the site's queue is full); they are due again later",
                     self.requeued)
            self.requeued = 0
            self.requeue_logged = now

    def _delete(self, plan: Plan, now: float, peer, msg, delete_peers: list) -> list[str]:
        """A SpoolMessageDelete in a batch: the ids of it still queued (their DONE is
        written with the batch; each pending recipient's event by plan.deleted), and its
        answer noted in *delete_peers*."""
        qids = [q for q in msg.qids if q in self.q]
        for qid in qids:
            plan.deleted(qid, now, self._out_idxs(qid))
        delete_peers.append((peer, msg.req, qids))
        return qids

    def _keep_deleted(self, deleted_out: dict) -> None:
        """Deleted messages (now written) with recipients in jobs still out: kept until
        those jobs answer or are given up, so that their outcome still makes events
        (at most max_in_flight, like the jobs).  Recipients whose outcome came in the
        delete's own batch are no longer out, and are not kept."""
        for qid, gone in deleted_out.items():
            out = {i for j in self.jobs.values() if j.qid == qid for i in j.idxs}
            for idx in [i for i in gone.attempts if i not in out]:
                del gone.attempts[idx]
            if gone.attempts:
                self.deleted_out[qid] = gone

    def _forget_deleted(self, qid: str) -> None:
        """A job of deleted *qid* answered or was given up: forget it once none is out."""
        gone = self.deleted_out.get(qid)
        if gone is not None and not any(j.qid == qid for j in self.jobs.values()):
            if gone.attempts:
                log.info("%s: deleted, and %d recipient(s) of it in a delivery job that "
                         "never answered: no event for them", qid, len(gone.attempts))
            del self.deleted_out[qid]

    def _out_idxs(self, qid: str) -> set:
        """The recipients of *qid* in delivery jobs still out (a delete is rare: the jobs
        out, at most max_in_flight, are looked through)."""
        info = self.q.info(qid)
        if info is None or not info[_OUT]:
            return set()
        return {i for j in self.jobs.values() if j.qid == qid for i in j.idxs}

    def _batch_events(self, messages: list, plan: Plan) -> list[dict]:
        """The batch's internal events (:mod:`mta.obs.events`), written with its records.

        One ``injection`` per new message (its recipients in ``rcpts``), the
        class-25 bounce of each suppressed recipient, then the outcomes' and
        expiries' events.
        """
        out = []
        carried = ev.carried
        for m, body in messages:
            extra = carried(m.params)
            out.append({"type": ev.INJECTION, "timestamp": m.arrival, "arrival": m.arrival,
                        "queue_id": m.qid, "message_id": m.params.get("message_id", ""),
                        "sender": m.sender, "rcpts": m.rcpts, "size": len(body),
                        "client": m.client, **extra})
            if m.state is not None:
                self._suppressed_events(out, m, len(body), extra)
        out += plan.events
        return out

    def _after_commit(self, new: list, plan: Plan) -> None:
        """Schedule the batch's messages and give them their deadline (after the sync)."""
        q = self.q
        first_look = self.policy.first_look()   # (the deadline, or the delay notice's time)
        for n in new:
            qid = n.meta.qid
            info = q.info(qid)
            if info is None:
                continue                    # (finished at once: every recipient suppressed)
            first = q.first_due(qid)
            q.push(qid, info[_START] if first is None else first)
            if n.meta.attempts is None:     # (a compaction copy keeps its message's deadline)
                q.set_deadline(qid, info[_START] + first_look)
        self._push(plan.reschedule)

    def _suppressed_events(self, out: list, m: MessageMeta, size: int, extra: dict) -> None:
        """The class-25 bounce of each recipient found on the suppression list (no DSN)."""
        now = time.time()
        reason = f"{sup.REASON_CODE} {sup.REASON_ENHANCED} {sup.REASON_TEXT}"
        for idx, s in enumerate(m.state):
            if s == sch.FAILED:
                out.append({"type": ev.BOUNCE, "timestamp": now, "arrival": m.arrival,
                            "queue_id": m.qid, "message_id": m.params.get("message_id", ""),
                            "sender": m.sender, "recipient": m.rcpts[idx], "size": size,
                            "client": m.client, "bounce_class": sup.BOUNCE_CLASS,
                            "response": {"code": sup.REASON_CODE,
                                         "enhanced": sup.REASON_ENHANCED,
                                         "text": sup.REASON_TEXT},
                            "reason": reason, "suppressed": True, "attempt": 0, **extra})

    def add_bounce_rule(self, items: list) -> None:
        """Put recipients whose delivery failed as invalid on the list ("Bounce Rule"):
        in the list's own thread (ListWriter), the batch's acknowledgements not held."""
        self.suppression.add(items)

    # --------------------------------------------------------------- dispatch

    def open_lanes(self) -> list[int]:
        """The lanes that may dispatch now (healthy, not held, room in their window)."""
        if not self.healthy or self.dcfg.hold or self.recovering:
            return []
        is_open = self.window.open
        return [lane for lane in dsp.LANES if is_open(lane)]

    def can_dispatch(self) -> bool:
        return bool(self.open_lanes())

    def release_blocked(self, everything: bool = False) -> None:
        """Blocked bulk messages whose domain has free slots again become due now."""
        w = self.window
        if w.freed or (everything and w.blocked):
            now = time.time()
            push = self.q.push          # False for a message no longer queued
            w.released(everything, lambda qid: push(qid, now))

    def dispatch(self) -> None:
        """Send due recipients to delivery, transactional messages first."""
        if not self.healthy or self.dcfg.hold or self.recovering:
            return
        self.release_blocked()
        out: dict[int, list] = {}
        for lane in dsp.LANES:
            self._dispatch_lane(lane, out)
        if out:
            self._send_jobs(out)

    def _send_jobs(self, out: dict[int, list]) -> None:
        """Send the jobs of a dispatch pass, per delivery process, several to a bus message.

        They were counted out when made (so the pass saw its own jobs in the
        window's limits); a job its process's queue did not take is no longer
        out and its message is due again shortly, as if it had not been made.
        """
        links, w, q = self.links, self.window, self.q
        retry = time.time() + BUSY_RETRY
        if self.flush_owed:
            self._send_flush()
        for d, jobs in out.items():
            # (none behind a flush that has not reached the process: they would find
            # the dead-site holds it ends)
            sent = links.send_jobs(d, jobs) if d not in self.flush_owed else 0
            for job in jobs[sent:]:
                w.remove(job.req)
                if q.add_out(job.qid, -1) == 0:
                    self._settle_later(job.qid)
                q.push(job.qid, retry)

    def _send_flush(self) -> None:
        """Tell the delivery processes in ``flush_owed`` that the queue was flushed; those
        whose queue is full stay owed.  One that is away has no hold to end (a new one
        starts without)."""
        links = self.links
        for d, domains in list(self.flush_owed.items()):
            if not links.up[d] or links.send(d, bus.DeliveryQueueFlush(
                    sorted(domains) if domains is not None else [])):
                del self.flush_owed[d]

    def _owe_flush(self, domains: set[str] | None) -> None:
        """Every delivery process is to end the dead-site holds of the sites of *domains*
        (None: all of them) before the next jobs this shard sends it."""
        owed = self.flush_owed
        for d in range(len(self.links)):
            if d in owed and owed[d] is None:
                continue
            merged = None if domains is None else domains | owed.get(d, set())
            # (more than one message may name: every site's)
            owed[d] = merged if merged is None or len(merged) <= bus.MAX_FLUSH_NAMES else None

    def _dispatch_lane(self, lane: int, out: dict[int, list]) -> None:
        """Make jobs of the due recipients of one lane, grouped by message and domain,
        into *out* (per delivery process)."""
        w = self.window
        budget = w.room(lane)
        if budget <= 0:
            return
        w.wants[lane] = 0
        now = time.time()
        q = self.q
        store = self.store
        links = self.links
        up = links.up
        nd = len(links)
        priority = PRIORITY[lane]
        lanes = (lane,)
        for _ in range(DISPATCH_BATCH):
            # One at a time: a message whose jobs do not fit goes back with its own due
            # time, still first in line.
            at = q.next_due(lanes)
            taken = q.pop_due(lane, now, 1) if at is not None and at <= now else None
            if not taken:
                break
            qid = taken[0]
            info = q.info(qid)
            if info is None:
                continue  # finished
            busy = None
            if info[_OUT]:
                busy = w.qid_out.get(qid)
                if busy is None or self.policy.expired(info[_START], now):
                    continue  # its outcome is awaited (it reschedules then)
            ready, later = q.ready(qid, now)
            if later is not None:
                q.push(qid, later)
            if busy is not None:
                # A job of it is out: its recipients at that job's domain wait for its
                # outcome (which reschedules the message); the others -- made due by a
                # flush, or whose domain had no slot when that job went -- go now.
                domains = q.domains(qid)
                ready = [i for i in ready if domains[i] not in busy]
                if not ready:
                    continue
            if not ready:
                if later is None:
                    # no pending recipient left, and no job out: its DONE was waiting for
                    # an outcome that never came (its delivery process went away)
                    self.finish_work.append(qid)
                continue
            if self.policy.expired(info[_START], now):
                # past its deadline: expired, but for the last attempt of a recipient a
                # deferral made due at the deadline itself (outcomes.Plan.outcome), as
                # the sweep leaves it (RetryPolicy.last_attempt)
                start, last = info[_START], self.policy.last_attempt
                gone = [i for i in ready if not last(start, q.recipient(qid, i)[2], now)]
                if gone:
                    self.expire_work.append((qid, gone))
                    if len(gone) == len(ready):
                        continue
                    ready = [i for i in ready if i not in gone]
            domains = q.domains(qid)
            groups: dict[str, list[int]] = {}
            for i in ready:
                groups.setdefault(domains[i], []).append(i)
            pool = info[_POOL]
            if self.controls.items:
                match = self.controls.match_values
                campaign = info[_CAMPAIGN]
                for domain in [d for d in groups if match(d, campaign, pool) is not None]:
                    del groups[domain]      # suspended by the operator: held back
                    self.held.add(qid)
                if not groups:
                    continue
            if w.paused:
                # delivery REQUEUED a job of this domain and pool a moment ago: these
                # wait too, as it would have requeued them (in memory, no attempt)
                for domain in [d for d in groups if w.paused_until(d, pool, now)]:
                    # (spread by the retry jitter as a requeue is: a suspended site's
                    # backlog is not all due again in the second its pause ends)
                    until = now + self.policy.spread(w.paused[(domain, pool)] - now)
                    for i in groups.pop(domain):
                        q.set_due(qid, i, until)
                        self.requeued += 1
                    self.handed_back.add(qid, w.pause_site.get((domain, pool), ""), "",
                                         domain)
                    q.push(qid, until)
                if not groups:
                    continue
            if lane == dsp.BULK:
                full = []       # (a loop, not a list comprehension: its function per message)
                for d in groups:
                    if w.domain_full(d, lane):
                        full.append(d)
                for domain in full:
                    del groups[domain]
                    w.block(domain, qid)    # due again when a job of the domain returns
                if not groups:
                    continue
            # The window counts jobs (one per domain of a message): they are what a
            # crash may repeat, so max_in_flight bounds them exactly.  A message whose
            # jobs do not fit waits, due, until enough come back (unless nothing is
            # out: a message of more domains than the window goes alone).  (A domain
            # whose delivery process is away counts too, though it is parked below:
            # rare, and it only makes the message wait for a slot it did not need.)
            if len(groups) > budget and w.out[lane] > 0:
                q.push(qid, at)
                w.wants[lane] = len(groups)     # the lane opens again once they fit
                break
            try:
                m, body = store.read_record(qid)     # the envelope and the body: one read
            except OSError as exc:
                log.error("%s: cannot read the message: %s", qid, exc.strerror)
                q.push(qid, now + BUSY_RETRY)
                continue
            if _SPOOLED_DELIVERY_KEYS.isdisjoint(m.params):
                params = {}     # (the common case, without a comprehension over every param)
            else:
                params = {k: v for k, v in m.params.items() if k in SPOOLED_DELIVERY_PARAMS}
            for domain, idxs in groups.items():
                home = domain_shard(domain, nd)
                if not up[home]:
                    self.parked[home].add(qid)      # sent when delivery[home] is back
                    continue
                d = w.target(domain, home, up)
                req = next(self.reqs)
                # the recipients, and the most attempts among them + 1 (one loop: not
                # max() of a generator and a list comprehension, a function each per job)
                rcpts = []
                attempt = 0
                for i in idxs:
                    rcpts.append(bus.JobRecipient(index=i, address=m.rcpts[i]))
                    a = q.recipient(qid, i)[1]
                    if a > attempt:
                        attempt = a
                attempt += 1
                job = bus.DeliveryMessageReady(
                    req=req, qid=qid, sender=m.sender, domain=domain, rcpts=rcpts,
                    params=_job_params(params, m.params, idxs), attempt=attempt, body=body,
                    pool=pool, priority=priority)
                w.add(req, qid, idxs, d, domain, lane, m)
                q.add_out(qid, 1)
                jobs = out.get(d)
                if jobs is None:
                    jobs = out[d] = []
                jobs.append(job)
                budget -= 1
            if budget <= 0:
                break

    def _untrack(self, qids: list[str]) -> None:
        """Finished or deleted messages are no longer held or requeued (the index drops
        their schedule and deadline itself when the store removes them)."""
        held, noticed = self.held, self.delay_noticed
        requeued = self.handed_back if len(self.handed_back) else ()
        for qid in qids:
            held.discard(qid)
            if qid in requeued:
                requeued.discard(qid)
            noticed.pop(qid, None)

    def expire_waiting(self) -> None:
        """Expire the pending recipients of messages past ``delivery.max_age``, wherever they wait.

        A message with a delivery job out is looked at again a little later:
        its outcome decides (a deferral past the age limit expires it then).
        One not yet expired but past ``delivery.delay_warning_time`` (filed for
        then: RetryPolicy.first_look) is looked at in the next batch for delay
        notices (:meth:`Plan.remind`), which files it again.
        """
        now = time.time()
        q = self.q
        for qid in q.passed(now):
            info = q.info(qid)
            if info is None:
                continue                  # finished
            start = info[_START]
            if not self.policy.expired(start, now):
                warn = self.policy.delay_warning
                if warn and now >= start + warn:
                    # waited delay_warning_time: a delay notice for those who had none,
                    # deferred or not (handed back, held, never tried); filed again then
                    self.notice_work.append(qid)
                else:
                    q.set_deadline(qid, start + self.policy.first_look())
                continue
            if info[_OUT]:
                q.set_deadline(qid, now + BUSY_RETRY)
                continue
            idxs = q.pending_idxs(qid)
            if idxs:
                # a recipient made due at the deadline for its last attempt gets it:
                # this sweep may come before the dispatch pass that sends it
                last = self.policy.last_attempt
                keep = [i for i in idxs if last(start, q.recipient(qid, i)[2], now)]
                if keep:
                    q.set_deadline(qid, now + BUSY_RETRY)
                    idxs = [i for i in idxs if i not in keep]
            if idxs:
                self.expire_work.append((qid, idxs))

    def watch_clock(self) -> None:
        """Once a second: when the wall clock was stepped back, the due times set before
        (retries, hand-backs, pauses, delay notices' intervals) come as much earlier.

        They are wall-clock instants (durable: a restart keeps them); left as they
        were, every deferred recipient would wait the step longer -- an hour's step
        back, an hour's stall.  A start_time still ahead is the client's instant and
        stays; deadlines stay (a message expires no sooner for it).  Cost: one pass
        over the queue index per step (milliseconds for a million messages).
        """
        back = self.clock.stepped_back()
        if not back:
            return
        now = time.time()
        moved = self.q.step_back(now, back)
        self.window.step_back(now, back)
        noticed = self.delay_noticed
        for qid, at in noticed.items():
            noticed[qid] = at - back
        self.started -= back
        log.warning("the wall clock went back %.0fs: %d recipient(s) waiting to be retried "
                    "are due that much earlier", back, moved)

    def _clock_behind_spool(self) -> None:
        """After recovery: when the newest message on disk arrived later than now, the
        clock was set back while the daemon was down (it ran ahead before); the due
        times recorded then come that much earlier, as :meth:`watch_clock` does for a
        step while running -- else the mail taken meanwhile (never tried: due at its
        arrival) would wait until the clock caught up, and `mta queue flush` would
        leave it as scheduled.  Ages still count from the recorded arrival.

        A step back the clock watch saw while the spool was read is this one, or part
        of it (the clock ran ahead before the restart and is set right meanwhile): it
        is taken here, by the larger of the two, and not again by :meth:`watch_clock`.
        """
        now = time.time()
        stepped = self.clock.stepped_back()
        if stepped:
            self.started -= stepped
        ahead = self.store.latest_arrival - now
        behind = max(ahead, stepped)
        if behind < proc.CLOCK_STEP:
            return
        moved = self.q.step_back(now, behind)
        if ahead >= stepped:
            log.warning("the clock is behind the spool: its newest message arrived %.0fs "
                        "from now (the clock was set back while the daemon was down?); %d "
                        "recipient(s) due later are due that much earlier", behind, moved)
        else:
            log.warning("the wall clock went back %.0fs while the spool was read: %d "
                        "recipient(s) waiting to be retried are due that much earlier",
                        behind, moved)

    def probe(self) -> None:
        """While unhealthy, see whether the disk takes writes again (once a second).

        Without this the shard would recover only when new mail arrived to be
        written, and until then deliver nothing it had already acknowledged.
        """
        try:
            self.store.probe()
        except OSError as exc:
            self.last_error = exc.strerror or str(exc)
            return
        log.info("spool writes are succeeding again")
        self.healthy = True
        self.last_error = ""

    def expire_jobs(self) -> None:
        """Jobs whose outcome never came (a delivery process died) are sent again."""
        lost = self.window.older_than(self.job_timeout)
        self._resend(lost)
        if lost:
            log.warning("%d delivery job(s) got no outcome in %.0fs; they will be sent again",
                        len(lost), self.job_timeout)

    def _resend(self, reqs: list[int]) -> None:
        for r in reqs:
            qid = self.window.remove(r).qid
            if qid in self.deleted_out:
                self._forget_deleted(qid)       # (deleted meanwhile: not sent again)
            else:
                left = self.q.add_out(qid, -1)
                if left >= 0:
                    self.q.push(qid, time.time())
                if left == 0:
                    self._settle_later(qid)

    def _settle_later(self, qid: str) -> None:
        """*qid* has no job out any more though no outcome said so (a job taken back or
        not sent): a bounce it owes is looked at in the next batch -- its message may
        not be sent again soon (held by a suspension, parked, behind a full domain)."""
        if qid in self.store.owed:
            self.settle_work.append(qid)

    def follow_links(self) -> None:
        """Follow the delivery processes' connections.

        A delivery process that dies takes the jobs it was given with it (they
        live in its memory; IMMEDIATE drops what was still queued towards it),
        so they are sent again at once rather than after ``job_timeout``:
        at-least-once, the transactions in flight at the crash may repeat.
        While it is away its due messages are parked, and released when a
        new one has connected.
        """
        links = self.links
        for d, connected in links.changes():
            if connected:
                now = time.time()
                parked = self.parked[d]
                self._push([(now, qid) for qid in parked.take(len(parked))])
                continue
            # Take the outcomes it sent before it went away first.
            for _ in range(DRAIN_ON_DISCONNECT):
                if not links.waiting(d):
                    break
                self.batch(outcomes=[d])
            lost = self.window.of_process(d)
            self._resend(lost)
            if lost:
                log.warning("delivery[%d] went away with %d job(s) out; they will "
                            "be sent again", d, len(lost))

    # ----------------------------------------------------------------- queries

    def query(self, peer: bytes, msg: bus.Message) -> None:
        """Answer one of the operator's requests (everything but commits and deletes)."""
        t = type(msg)
        if t is bus.SpoolQueueSummary:
            reply = queries.summary(self, msg.req)
        elif t is bus.SpoolQueueList:
            reply = queries.listing(self.store, msg.req, msg.limit, msg.after)
        elif t is bus.SpoolQueueFlush:
            reply = self.flush(msg)
        elif t is bus.SpoolAdminBounce:
            reply = self.start_bounce(msg)
        elif t is bus.SpoolAdminRefresh:
            self.controls.stamp = None          # asked: read it whatever its stamp says
            if self.controls.refresh(time.time()):
                self.release_held()
            reply = bus.SpoolAdminReply(msg.req, bus.STATUS_OK, [])
        elif t is bus.SpoolAdminProgress:
            ops = [op.view() for op in self.ops.values() if not msg.op or op.op == msg.op]
            reply = bus.SpoolAdminReply(msg.req, bus.STATUS_OK if ops or not msg.op
                                        else bus.STATUS_UNKNOWN, ops)
        elif t is bus.SpoolMessageShow:
            reply = queries.show(self.store, msg.req, msg.qid, self.dcfg.hold, self.controls)
        else:
            log.warning("unexpected request %s ignored", msg.NAME)
            return
        self.server.send(peer, reply)

    def flush(self, msg: bus.SpoolQueueFlush) -> bus.SpoolQueueFlushReply:
        """``mta queue flush`` (all, --domain, --queue-id) or the flush of what delivery
        handed back (*requeued*): make it due now; the reply."""
        if msg.requeued:
            return self.release_lanes(msg.req, msg.lanes or None)
        if msg.domains or msg.qids:
            # (mta queue flush --domain / --queue-id) as below, for those domains only
            reply, domains = queries.flush_some(self.store, msg.req, msg.domains, msg.qids)
            if domains:
                self.window.unpause(domains=domains)
                self._owe_flush(domains)
                self._send_flush()
            return reply
        self.window.unpause()       # (what delivery answered may have changed)
        # every delivery process ends its dead-site holds, before the jobs
        # this flush makes due reach it (Postfix's flush re-enables dead sites)
        self._owe_flush(None)
        self._send_flush()
        return queries.flush(self.store, msg.req)

    # --------------------------------------------------- the operator's controls

    def release_lanes(self, req: int, lanes=None) -> bus.SpoolQueueFlushReply:
        """A limit of *lanes* ((site, source) patterns; None: every lane) rose: what they
        handed back is due now -- those messages' recipients at the lane's domain, no
        other message looked at -- and the pauses of their domains end (a lane still
        limited hands them back again).  The reply counts the recipients."""
        now = time.time()
        flush = self.q.flush
        count = 0
        domains = set()
        taken = self.handed_back.take(lanes)
        for (_, _, domain), qids in taken:
            count += flush(now, qids, [domain])
            domains.add(domain)
        if lanes is None:
            self.window.unpause()
        elif domains and self.window.paused:
            self.window.unpause(domains=domains)
        log.info("limits rose for %s: %d recipient(s) delivery handed back are due now",
                 "every lane" if lanes is None else ", ".join(
                     f"{site}/{source}" for site, source in lanes[:5])
                 + (" ..." if lanes is not None and len(lanes) > 5 else ""), count)
        return bus.SpoolQueueFlushReply(req, count)

    def release_held(self) -> None:
        """A suspension came, went or ran out: the messages held back are due again now
        (those still suspended are held again at dispatch)."""
        held = self.held
        if held:
            now = time.time()
            n = len(held)
            self._push([(now, qid) for qid in held.take(n)])
            log.info("suspensions changed: %d held message(s) looked at again", n)

    def start_bounce(self, msg: bus.SpoolAdminBounce) -> bus.SpoolAdminReply:
        """Begin a bulk bounce: note the matching messages now, bounce them batch by batch."""
        try:
            sel = msgspec.convert(msg.selector, ctl.Selector)
        except msgspec.ValidationError as exc:
            return bus.SpoolAdminReply(msg.req, bus.STATUS_UNKNOWN, [], f"selector: {exc}")
        if sel.empty():
            return bus.SpoolAdminReply(msg.req, bus.STATUS_UNKNOWN, [],
                                       "selector: names nothing (it would take every message)")
        old = self.ops.get(msg.op)
        if old is not None:                       # asked again (a retried request)
            return bus.SpoolAdminReply(msg.req, bus.STATUS_OK, [old.view()])
        op = ctl.BounceOp(msg.op, sel, msg.reason, msg.dsn)
        for qid, n in self.q.select(sel.domains, sel.campaign, sel.pool):
            op.todo.append((qid, n))
            op.total += n
        finished = [k for k, o in self.ops.items() if o.finished]
        for k in finished[:max(0, len(finished) - ctl.OPS_KEPT + 1)]:
            del self.ops[k]
        self.ops[op.op] = op
        if not op.todo:
            op.finished = time.time()
        log.warning("bulk bounce %s: %d recipient(s) in %d message(s) (%s) by the operator: %s",
                    op.op, op.total, len(op.todo), _selector_text(sel), msg.reason or "-")
        return bus.SpoolAdminReply(msg.req, bus.STATUS_OK, [op.view()])

    def op_pending(self) -> bool:
        """A bulk bounce has messages to take now (not only ones whose job is out)."""
        if not self.ops or time.monotonic() < self.op_idle_until or not self.healthy:
            return False
        return any(op.todo for op in self.ops.values())

    def op_work(self, plan: Plan, now: float) -> list:
        """Put up to a batch of each running bulk bounce's messages into *plan*:
        [(op, qid, recipients)].  A message with a delivery job out waits for its
        outcome (its recipients may be delivered: they are not bounced twice)."""
        q = self.q
        budget = self.cfg.max_batch_messages
        taken = []
        for op in self.ops.values():
            if not op.todo or budget <= 0:
                continue
            waiting = []
            sel = op.selector
            text = op.text()
            while op.todo and budget > 0:
                qid, n = op.todo.popleft()
                info = q.info(qid)
                if info is None:
                    op.total -= n                 # finished meanwhile
                    continue
                if info[_OUT]:
                    waiting.append((qid, n))
                    continue
                idxs = q.matching(qid, sel.domains, sel.campaign, sel.pool)
                got = plan.admin_bounce(qid, idxs, now, text, op.dsn) if idxs else 0
                if got is None:                   # (its record could not be read: later)
                    waiting.append((qid, n))
                    continue
                op.total -= n - got               # delivered or expired meanwhile
                if got:
                    taken.append((op, qid, got))
                    budget -= 1
            op.todo.extend(waiting)
        if not taken:
            self.op_idle_until = time.monotonic() + OP_IDLE   # only jobs out: wait for them
            for op in self.ops.values():
                self._op_finish(op)
        return taken

    def op_committed(self, taken: list) -> None:
        """The batch holding these bounces is durable: count them."""
        for op, _qid, n in taken:
            op.done += n
        for op in self.ops.values():     # (also one whose last messages finished by themselves)
            self._op_finish(op)

    def _op_finish(self, op: ctl.BounceOp) -> None:
        if not op.todo and not op.finished:
            op.finished = time.time()
            log.warning("bulk bounce %s: done, %d recipient(s) bounced in %.1fs", op.op,
                        op.done, op.finished - op.started)

    # ------------------------------------------------------------- reclamation

    def events_hold(self) -> int | None:
        """The segment reclamation must stop at: the events cursor's (None: no hold).

        Read once a second from ``events.cursor``.  The events backlog -- the
        segment bytes from the cursor on -- is bounded by
        ``events.max_backlog_bytes``: at half of it a warning is logged (and
        ``mta queue`` shows it); beyond it reclamation no longer waits for the
        events process (it is down or too slow), so the spool does not fill
        the disk, and the events of the segments reclaimed unread are missing
        from the log (an error is logged).
        """
        if not self.events_on:
            return None
        hold, size, count = self._events_backlog()
        self.backlog = (size, count)
        bound = self.settings.config.events.max_backlog_bytes
        if self.backlog_floor:
            # a reload lowered the bound below the backlog then held (_set_backlog_bound):
            # that backlog is kept while the events process reads it below the new bound
            self.backlog_floor = min(self.backlog_floor, size)
            if self.backlog_floor <= bound:
                self.backlog_floor = 0
            bound = max(bound, self.backlog_floor)
        level = 2 if size > bound else 1 if size > bound // 2 else 0
        if level != self.backlog_level:
            if level == 2:
                log.error("events backlog %d bytes in %d segment(s) is over "
                          "events.max_backlog_bytes (%d): segments are reclaimed without "
                          "waiting for the events process; their events will be missing",
                          size, count, bound)
            elif level == 1:
                log.warning("events backlog %d bytes in %d segment(s): the events process "
                            "is behind or down (bound events.max_backlog_bytes %d)",
                            size, count, bound)
            else:
                log.info("events backlog back to %d bytes", size)
            self.backlog_level = level
        return None if level == 2 else hold

    def _events_backlog(self) -> tuple[int, int, int]:
        """(the segment the events cursor is in, the bytes from the cursor on, the
        segments from it on)."""
        segs = self.store.segments
        cur = read_cursor(self.store.dir)
        if cur is None:      # no events process has read this shard yet: hold everything
            hold, off = (min(segs) if segs else 0), 0
        else:
            hold, off = cur
        size = sum(seg.size for n, seg in segs.items() if n >= hold)
        if hold in segs:
            size -= min(off, segs[hold].size)
        return hold, size, sum(1 for n in segs if n >= hold)

    def _set_backlog_bound(self, bound: int) -> None:
        """Take events.max_backlog_bytes *bound* (a reload).  Lowered below the backlog
        the events process has not read yet, it would reclaim that backlog at once and
        its events would be lost because of a reload: the backlog held now is kept (the
        bound is it, not more) until the events process has read it below *bound*
        (events_hold).  One already over the old bound was being reclaimed anyway."""
        cur = self.settings.config.events
        if bound == cur.max_backlog_bytes:
            return
        held = self._events_backlog()[1] if self.events_on else 0
        if bound < held and self.backlog_level < 2:
            self.backlog_floor = held
            log.warning("reload: events.max_backlog_bytes %d is below the backlog of %d "
                        "bytes the events process has not read: that backlog is kept until "
                        "it is read below %d (it may not grow meanwhile)", bound, held, bound)
        else:
            self.backlog_floor = 0
            log.info("reload: events.max_backlog_bytes %d", bound)
        self.settings = dataclasses.replace(self.settings, config=msgspec.structs.replace(
            self.settings.config, events=msgspec.structs.replace(cur, max_backlog_bytes=bound)))

    def reclaim(self) -> None:
        """Free segments whose messages are finished; compact the oldest if mostly empty."""
        if not self.healthy:
            return
        try:
            copies, unlink = self.store.reclaim_plan(self.cfg.compact_live_ratio,
                                                     RECLAIM_MAX_COPY, self.events_hold())
            if not unlink:
                return
            if copies:
                new = self.store.write(copies, [])
                self.store.sync()
                self.store.commit(new, [])
            freed, kept = self.store.unlink(unlink)
            if freed:
                log.info("reclaimed %d segment(s), %d bytes%s; copied forward %d message(s)",
                         len(unlink), freed,
                         f" ({kept} file kept as the next segment's)" if kept else "",
                         len(copies))
        except OSError as exc:
            log.error("reclamation failed: %s", exc.strerror or exc)
