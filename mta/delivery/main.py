"""delivery[d]: sends the messages of the recipient domains that hash to d.

Reads:   DELIVERY_MESSAGE_READY from the spool shards (ROUTER ``delivery-<d>``):
         one message's recipients for one domain, with the message;
         DELIVERY_QUEUE_FLUSH (``mta queue flush``): the dead-site holds end (of the
         sites of the domains it names, if any).
Writes:  DELIVERY_OUTCOME back to the spool shard that sent the job (the
         message's owner), one per job, per-recipient results inside; the
         outcomes finished in one loop turn go to a shard together, as one
         DELIVERY_OUTCOMES (at most ``bus.MAX_OUTCOMES_PER_SEND`` each).
Peers:   receiving mail servers over SMTP; DNS servers (``delivery.nameservers``).
Config:  [delivery] (all keys), [server] hostname.

The spool sends a domain's jobs to its home process (by hash), and spreads a
domain busier than that over the others; the limits of a (source x site) hold
node-wide whatever the split (:mod:`mta.delivery.limits`).  Once a second the
process writes what it is doing -- lanes, suspended sources -- to
``<run_dir>/delivery-<d>.status.json`` for ``mta queue``; the sites with their
domains (a provider's site can hold hundreds of thousands) go to
``<run_dir>/delivery-<d>.sites.json``, rewritten only when a site gained or lost
a domain, at most every ``SITES_INTERVAL`` seconds.
The in-flight window is bounded: with 2 x ``delivery.max_in_flight`` jobs in hand
the process stops reading its socket, the bus queue fills to its high-water
mark and the spool shards hold further jobs back.  Nothing here is durable:
a job lost in a crash is still pending in its spool shard and is sent again
(at-least-once).  SIGTERM: stop taking jobs, hand every job whose transaction
has not begun back to its shard untried (queued in a lane, paced, waiting for a
connection or a greeting), let transactions in progress finish and their
outcomes go back (``server.shutdown_timeout``), exit.

Outcomes are never dropped while their shard is there: when a shard is not
reading (its queue from us is at the high-water mark, ``spool.queue_high_water``)
an outcome is held back, no new job is taken until every held outcome is
handed over, and they are sent again every ``OUTCOME_RETRY`` seconds.  The
backlog is bounded by the window: one outcome per job in hand.  (The bus's
high-water mark counts messages, so a batch of outcomes counts once.)  An outcome
for a shard that is gone (restarted: its queue id for us is unknown) is
dropped and logged; the shard re-dispatches everything it had out.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import signal
import time

import orjson
import uvloop

from mta import bus, proc
from mta.delivery import engine as engine_mod
from mta.delivery import limits
from mta.delivery.engine import Engine, Job
from mta.delivery.metrics import DeliveryMetrics
from mta.obs import queue as queue_view
from mta.obs.stats import Pusher

log = logging.getLogger("mta.delivery")

OUTCOME_RETRY = 0.02    # seconds between attempts to hand held-back outcomes to a busy shard
STATUS_INTERVAL = 1.0   # seconds between writes of the status file
SITES_INTERVAL = 5.0    # seconds at least between two writes of the sites file (when changed)
FORGET_BUDGET = 5000    # domain -> site entries (or sites) the upkeep looks at a second


def rule_domains_path(run_dir: str, index: int) -> str:
    """Where delivery[*index*] shares the domains of its mail that a wildcard shaping
    rule matches (RuleDomainShare)."""
    return os.path.join(run_dir, f"delivery-{index}.rule-domains.json")


class RuleDomainShare:
    """The domains a wildcard shaping rule (``*.x.example``) matches, shared between the
    delivery processes of the node: each writes those of its own mail to a file of its
    own (``Engine.rule_seen``, when they changed) and reads the others' (when a file
    changed: one stat a file a second), and its engine looks those up as rule domains.
    The spool sends a domain's mail to one process; without this only that one applied
    the rule to the domain's site, and the others sent to the same site at the
    [delivery] limits -- a wildcard rule's connection limit of 1 saw 5 connections.
    A domain is shared within a second or two of its first lookup; meanwhile another
    process may send to its site at the limits it had."""

    def __init__(self, run_dir: str, index: int, count: int):
        self.path = rule_domains_path(run_dir, index)
        self.others = [rule_domains_path(run_dir, i) for i in range(count) if i != index]
        self.written = -1                       # the engine's rule_seen_version in our file
        self.stamps: dict[str, tuple] = {}      # path -> (mtime_ns, size, inode) last read
        self.lists: dict[str, frozenset] = {}   # path -> its domains
        self.retired = False                    # stopping: the file is the successor's

    def retire(self) -> None:
        """This process stops (SIGTERM: a reload's roll starts its successor now, with
        the same file): it writes its domains no more, else its list, written while it
        drains, would replace the successor's (which is written again only when it
        changes)."""
        self.retired = True

    def tick(self, engine) -> None:
        if engine.rule_seen_version != self.written and not self.retired:
            version = engine.rule_seen_version
            _write(self.path, {"pid": os.getpid(), "domains": list(engine.rule_seen)})
            self.written = version
        changed = False
        for path in self.others:
            try:
                st = os.stat(path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp == self.stamps.get(path, ()):
                continue
            self.stamps[path] = stamp
            domains: frozenset = frozenset()
            if stamp is not None:
                try:
                    with open(path, "rb") as fh:
                        listed = orjson.loads(fh.read())["domains"]
                    domains = frozenset(d for d in listed[:engine_mod.MAX_SHARED_RULE_DOMAINS]
                                        if isinstance(d, str) and d)
                except FileNotFoundError:
                    self.stamps.pop(path, None)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("cannot read %s (another delivery process's shared shaping "
                                "domains): %s", path, exc)
            if domains != self.lists.get(path, frozenset()):
                self.lists[path] = domains
                changed = True
        if changed:
            engine.take_shared_rule_domains(frozenset().union(*self.lists.values()))


def resolver(settings):
    """The delivery process's resolver, as [delivery] says (each (ip, port) pair of
    delivery.nameservers asked on its own port)."""
    from mta import dns

    cfg = settings.config.delivery
    return dns.Resolver(list(settings.nameservers) or None, timeout=cfg.dns_timeout,
                        ipv6=cfg.ipv6, hosts_in_flight=cfg.dns_hosts_in_flight)


class Delivery:
    def __init__(self, settings, index: int, loop, ctx):
        cfg = settings.config.delivery
        self.settings = settings
        self.cfg = cfg
        self.loop = loop
        self.resolver = resolver(settings)
        self.engine = Engine(settings, self.resolver, self.report, loop)
        self.share = RuleDomainShare(settings.run_dir, index, max(1, settings.deliveries)) \
            if self.engine.wildcards and settings.deliveries > 1 else None
        self.m = DeliveryMetrics(self, settings.config.admin.max_label_values)   # /metrics
        # Jobs in hand before the socket pauses: a shard's bulk and transactional
        # windows (the shards bound what they send; this bounds the process).
        self.window = 2 * cfg.max_in_flight
        self.status_path = queue_view.delivery_status_path(settings.run_dir, index)
        self.sites_path = queue_view.delivery_sites_path(settings.run_dir, index)
        self.sites_written = -1                 # the engine's sites_version in the sites file
        self.sites_written_at = float("-inf")   # when (loop time)
        self.stopping = False
        # Outcomes a shard did not take yet (its queue was full), per shard, in order.
        self.held: dict[bytes, collections.deque] = {}
        self.held_count = 0         # outcomes in self.held
        self.held_total = 0         # outcomes held back since the backlog was last empty
        self.held_since = 0.0
        self.outbox: dict[bytes, list] = {}     # outcomes of this loop turn, per shard
        self._flush_due = False
        self._retry = None          # the timer of the next attempt, while any are held
        if self.engine.warmup.plans:
            self._carry_warmup_sites()
        self.server = bus.AsyncServer(ctx, loop, settings.delivery_endpoint(index),
                                      settings.config.spool.queue_high_water, bus.DELIVERY_JOBS,
                                      self._on_job, log, "job")

    def _carry_warmup_sites(self) -> None:
        """The sites whose warm-up counts this process's predecessor (before a reload or
        a restart) showed: shown here too (the counts are node-wide and outlive it),
        not only those this process sends to (read once, before its first status)."""
        st = queue_view.read_status(self.status_path)
        if st is None:
            return
        hosts = queue_view.read_sites(self.status_path, st)
        names = {}
        for w in (st.get("warmup") or {}).values():
            if isinstance(w, dict) and isinstance(w.get("sites"), dict):
                names.update(dict.fromkeys(w["sites"]))
        for name in names:
            site = hosts.get(name)
            h = site.get("hosts") if isinstance(site, dict) else None
            self.engine.warmup.remember(name, h if isinstance(h, list) else ())

    def _on_job(self, peer: bytes, msg: bus.DeliveryMessageReady | bus.DeliveryJobs |
                bus.DeliveryQueueFlush) -> None:
        if self.stopping:
            return   # not taken: the spool sends it again
        if type(msg) is bus.DeliveryJobs:
            submit = self.engine.submit
            for one in msg.jobs:
                submit(Job(one, peer))
        elif type(msg) is bus.DeliveryQueueFlush:
            self.engine.flush(msg.domains)  # (ahead of the jobs the flush made due)
            return
        else:
            self.engine.submit(Job(msg, peer))
        if self.engine.in_flight >= self.window:
            # The window is full (a batch may pass it by fewer than MAX_JOBS_PER_SEND;
            # the shard's own window bounds what is out): jobs wait in the bus.
            self.server.pause()

    def report(self, job: Job, results: list[bus.Result], retry_after: float = 0.0) -> None:
        """Hand one job's outcome back to its spool shard (or hold it until it reads)."""
        m = job.msg
        self.m.job_done(job, results)
        self._hand_back(job.peer, bus.DeliveryOutcome(
            m.req, m.qid, results, source=job.source, source_ip=job.source_ip, site=job.site,
            retry_after=retry_after or job.retry_after, rule=job.fired, outbound_tls=job.tls))
        address = {r.index: r.address for r in m.rcpts}
        rule = f" rule={job.fired.name}({job.fired.action})" if job.fired is not None else ""
        for r in results:
            log.info("%s: to=<%s> relay=%s[%s] source=%s[%s] site=%s status=%s (%d %s %s)%s",
                     m.qid, address.get(r.index, ""), r.host or "none", r.ip or "",
                     job.source or "none", job.source_ip, job.site or "none",
                     r.outcome, r.code, r.enhanced, r.text, rule)
        self._open_window()

    def _open_window(self) -> None:
        """Take jobs again when the window has room and no outcome is held back."""
        if not self.stopping and not self.held and self.engine.in_flight < self.window:
            self.server.resume()

    def _hand_back(self, peer: bytes, outcome: bus.DeliveryOutcome) -> None:
        """Send *outcome* to shard *peer* at the end of this loop turn, with the others
        finished in it (one DeliveryOutcomes), or hold it back, in order, while that
        shard is full."""
        if peer in self.held:
            self._hold(peer, [outcome])
            return
        box = self.outbox.get(peer)
        if box is None:
            box = self.outbox[peer] = []
        box.append(outcome)
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the outcomes of this loop turn, per shard, in batches."""
        self._flush_due = False
        outbox, self.outbox = self.outbox, {}
        for peer, items in outbox.items():
            for i in range(0, len(items), bus.MAX_OUTCOMES_PER_SEND):
                if peer in self.held or not self._send(
                        peer, items[i:i + bus.MAX_OUTCOMES_PER_SEND]):
                    self._hold(peer, items[i:])
                    break

    def _hold(self, peer: bytes, items: list) -> None:
        """Keep *items* for shard *peer* (its queue is full) and take no new jobs meanwhile."""
        waiting = self.held.get(peer)
        if waiting is None:
            waiting = self.held[peer] = collections.deque()
        waiting.extend(items)
        if not self.held_count:
            self.held_since = self.loop.time()
            self.held_total = 0
            log.warning("%s: a spool shard is not taking outcomes (bus full); holding them "
                        "back and taking no new jobs until it does", items[0].qid)
        self.held_count += len(items)
        self.held_total += len(items)
        self.server.pause()
        if self._retry is None:
            self._retry = self.loop.call_later(OUTCOME_RETRY, self._resend_held)

    def _send(self, peer: bytes, items: list) -> bool:
        """True when *items* (outcomes for one shard) are done with: sent, or their shard
        is gone; False: try later."""
        msg = items[0] if len(items) == 1 else bus.DeliveryOutcomes(items)
        try:
            return self.server.send(peer, msg)
        except bus.PeerGone:
            # A shard that went away lost its job table; its successor (or the
            # same shard, seeing the link drop) dispatches the job again.
            log.warning("%s%s: outcome dropped: the spool shard that sent the job is gone; "
                        "it sends the job again", items[0].qid,
                        f" and {len(items) - 1} more" if len(items) > 1 else "")
            return True

    def _resend_held(self) -> None:
        """Hand the held-back outcomes over, each shard's in order, as far as it reads."""
        self._retry = None
        for peer in list(self.held):
            waiting = self.held[peer]
            while waiting:
                chunk = list(itertools.islice(waiting, bus.MAX_OUTCOMES_PER_SEND))
                if not self._send(peer, chunk):
                    break
                for _ in chunk:
                    waiting.popleft()
                self.held_count -= len(chunk)
            if not waiting:
                del self.held[peer]
        if self.held:
            self._retry = self.loop.call_later(OUTCOME_RETRY, self._resend_held)
            return
        log.info("%d held-back outcome(s) handed back after %.1fs; taking jobs again",
                 self.held_total, self.loop.time() - self.held_since)
        self._open_window()

    async def upkeep(self) -> None:
        """Once a second: write the status file ``mta queue`` reads; forget old sites."""
        n = 0
        while True:
            self.engine.adaptive_tick()
            self.engine.sweep()
            if self.share is not None:
                try:
                    self.share.tick(self.engine)
                except OSError as exc:
                    log.warning("cannot share the shaping rules' domains: %s", exc)
            try:
                self.write_status()
            except OSError as exc:
                log.warning("cannot write %s: %s", exc.filename or self.status_path, exc)
            n += 1
            if n % 60 == 0 or self.engine.sweeping:
                # (a pass a minute, FORGET_BUDGET entries a second: a site of a
                # million domains is no half-second stall)
                self.engine.forget_old_sites(FORGET_BUDGET)
            await asyncio.sleep(STATUS_INTERVAL)

    def write_status(self) -> None:
        """Write the status file; first the sites file, if a site changed and the last
        one is SITES_INTERVAL old (a process started anew writes it before its first
        status, so a fresh status never goes with its predecessor's sites)."""
        version = self.engine.sites_version
        now = self.loop.time()
        if version != self.sites_written and now - self.sites_written_at >= SITES_INTERVAL:
            _write(self.sites_path, {"time": time.time(), "pid": os.getpid(),
                                     "sites": self.engine.sites_status()})
            self.sites_written, self.sites_written_at = version, now
        status = self.engine.status()
        status["pid"] = os.getpid()
        _write(self.status_path, status)

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        if self.share is not None:
            self.share.retire()       # (its successor may run now: the file is its)
        self.server.pause()
        self.engine.begin_stop()      # jobs not yet in a transaction go back at once
        deadline = self.loop.time() + timeout
        while (self.engine.in_flight or self.held) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.engine.close()
        self._flush()
        if self.held:
            log.warning("%d outcome(s) not handed back at exit (spool busy); the shards "
                        "send those jobs again", self.held_count)


def _write(path: str, doc: dict) -> None:
    """Replace the file *path* with *doc* in JSON (readers see the old or the new one)."""
    proc.replace_file(path, orjson.dumps(doc))


def main(settings, index: int, ready_fd: int | None) -> None:
    """Entry point of the delivery[d] child."""
    name = proc.start_role("delivery", index, settings.config.server.log_level)
    # Before any thread (the bus's) starts: the table for the jobs of a full window, each
    # on its own connection, and every file the node limiter may keep open (each
    # doubling of the table in a threaded process stalls it, proc.presize_fd_table).
    proc.presize_fd_table(2 * settings.config.delivery.max_in_flight +
                          2 * limits.MAX_OPEN_FILES + proc.FD_TABLE_MARGIN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("starting %s", name)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    ctx = bus.new_context()
    d = Delivery(settings, index, loop, ctx)
    stop = asyncio.Event()
    proc.on_sigterm(loop, stop.set)

    pusher = Pusher.create(d.m.reg, ctx, settings, "delivery", index)

    async def run():
        if pusher is not None:
            pusher.run_on(loop)
        proc.report_ready(ready_fd)
        upkeep = loop.create_task(d.upkeep())
        await stop.wait()
        upkeep.cancel()
        await d.stop(settings.config.server.shutdown_timeout)

    try:
        loop.run_until_complete(run())
    finally:
        d.server.close()
        if pusher is not None:
            pusher.push()       # the final totals
            pusher.close()
        bus.close_context(ctx)
        loop.close()
    log.info("stopped: %s", dict(d.engine.stats))
