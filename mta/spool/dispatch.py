"""Which delivery jobs a spool shard may send now, and to which delivery process.

Pure bookkeeping, no I/O: :class:`Window` counts the jobs a shard has out and
decides, for the next job, whether it may go and where
(tests/spool/test_dispatch.py tests it without a shard).

- **Two lanes.** Transactional messages (``options.transactional``) and bulk
  ones each have a window of ``delivery.max_in_flight`` jobs; the shard takes
  due transactional messages first (their own due queue), so a password reset
  never waits behind a newsletter, neither in the spool nor for a window slot.
- **Per-domain cap (bulk).** At most ``delivery.max_in_flight_per_domain``
  bulk jobs to one recipient domain are out at once, so one slow or hung
  site cannot take the whole window.  A message over the cap is *blocked*:
  it leaves the due queue (the loop does not spin on it) and waits in its
  domain's FIFO until a job of that domain comes back (:meth:`Window.released`).
  Transactional jobs are not capped per domain.
- **Requeued as a whole.** A job that delivery REQUEUED naming no source (no
  source of the message's pool may send to the site now: a response rule's
  suspension, warm-up caps) says the same of every message of
  that domain and pool until its ``retry_after``: they wait in the spool
  until then (:meth:`Window.pause`), requeued as delivery would have, rather
  than each being read and sent to be told so -- a freed slot of the cap
  would otherwise take the next one, and a suspended site's whole backlog
  would go through delivery once per suspension.  A queue flush ends every
  pause (a flush of some domains or messages, those of their domains); a
  suspension cancelled by the operator ends those of the domains its lanes
  handed back (:class:`HandedBack`).
- **Spreading.** A domain's jobs go to its home delivery process
  (``domain_shard(domain, n)``) until ``delivery.spread_threshold`` are out
  there; then each next job goes to the process with the fewest jobs out for
  that domain, so a domain busier than one process uses several (the
  delivery processes hold site limits across the node with shared counters).
"""
from __future__ import annotations

import time
from typing import NamedTuple

from mta import native

# The messages waiting for a slot of one domain are a FIFO without repeats, the
# queue index module's QidFifo (loaded when a Window is made, with the index):
# compiled, ~24-48 octets per message instead of a string and a deque's and a
# set's entries (~120), and a throttled burst keeps most of the queue there
# (bench/queue_memory.py, cases e and f).  Not a dict used as an ordered set:
# taking from a dict's front walks over the slots of the keys deleted before
# (CPython keeps them until the dict grows again), so a backlog of N cost O(N)
# per message taken -- measured in a 5-million burst, 88 % of the shard's CPU,
# injection down from 2,390 to 331 msgs/s.

BULK = 0
TRANSACTIONAL = 1
GHOSTS_PER_PASS = 10_000   # blocked messages no longer queued, dropped per domain per release
LANES = (TRANSACTIONAL, BULK)       # the order the shard dispatches them in


class Job(NamedTuple):
    """One delivery job out: what it carries and where it went."""

    qid: str
    idxs: list
    sent_at: float          # time.monotonic()
    proc: int               # the delivery process it was sent to
    domain: str
    lane: int
    meta: object = None     # the message's envelope as read to make the job (MessageMeta):
                            # its outcome needs it again, without a read (jobs out are
                            # bounded by max_in_flight, so are these)


class Window:
    """The jobs one shard has out, per lane, per domain and per delivery process."""

    def __init__(self, processes: int, max_in_flight: int, per_domain: int,
                 spread_threshold: int):
        self.processes = processes
        self.max_in_flight = max_in_flight
        self.per_domain = per_domain
        self.spread = spread_threshold
        self.jobs: dict[int, Job] = {}              # req -> Job
        # qid -> the domains of its jobs out: its recipients at other domains may go
        # meanwhile (one a flush made due, or whose domain had no slot then)
        self.qid_out: dict[str, list[str]] = {}
        self.out = [0, 0]                           # jobs out per lane
        self.wants = [0, 0]     # jobs the lane's first message waits to have room for
        self.bulk_out: dict[str, int] = {}          # domain -> bulk jobs out
        self.at: dict[str, list[int]] = {}          # domain -> jobs out per process
        self.fifo = native.load("qindex").QidFifo
        self.blocked: dict[str, object] = {}        # domain -> QidFifo of qids waiting
        self.freed: set[str] = set()                # domains that had a bulk job come back
        self.paused: dict[tuple, float] = {}        # (domain, pool) -> until (time.time())
        self.pause_site: dict[tuple, str] = {}      # (domain, pool) -> the site it was for

    def __len__(self) -> int:
        return len(self.jobs)

    def room(self, lane: int) -> int:
        """How many more jobs of *lane* may go out now."""
        return self.max_in_flight - self.out[lane]

    def open(self, lane: int) -> bool:
        """Room in *lane* for its first message: one job, or as many as that message was
        found to need (at most the whole window); a lane waiting for room is not woken
        for (its due message would spin the loop)."""
        return self.room(lane) >= max(1, min(self.wants[lane], self.max_in_flight))

    def domain_full(self, domain: str, lane: int) -> bool:
        """Whether a job of *lane* to *domain* must wait (bulk only: the per-domain cap)."""
        return lane == BULK and self.bulk_out.get(domain, 0) >= self.per_domain

    def target(self, domain: str, home: int, up) -> int:
        """The delivery process for the next job to *domain* (*home*: its domain shard).

        *up[d]* says whether delivery[d] is connected.  The home process while
        it has fewer than spread_threshold jobs of the domain out (or is down:
        the caller parks the job for it); else the connected process with the
        fewest jobs of the domain out, the home one on a tie.
        """
        counts = self.at.get(domain)
        if counts is None or counts[home] < self.spread or not up[home]:
            return home
        best = home
        for d in range(self.processes):
            if up[d] and counts[d] < counts[best]:
                best = d
        return best

    def add(self, req: int, qid: str, idxs: list, proc: int, domain: str, lane: int,
            meta=None) -> None:
        """Job *req* was sent (*meta*: the envelope it was made from)."""
        self.jobs[req] = Job(qid, idxs, time.monotonic(), proc, domain, lane, meta)
        self.out[lane] += 1
        doms = self.qid_out.get(qid)
        if doms is None:
            self.qid_out[qid] = [domain]
        else:
            doms.append(domain)
        counts = self.at.get(domain)
        if counts is None:
            counts = self.at[domain] = [0] * self.processes
        counts[proc] += 1
        if lane == BULK:
            self.bulk_out[domain] = self.bulk_out.get(domain, 0) + 1

    def remove(self, req: int) -> Job | None:
        """Job *req* is no longer out (its outcome came, or it is being sent again)."""
        job = self.jobs.pop(req, None)
        if job is None:
            return None
        domain = job.domain
        self.out[job.lane] -= 1
        doms = self.qid_out[job.qid]
        if len(doms) == 1:
            del self.qid_out[job.qid]
        else:
            doms.remove(domain)
        counts = self.at[domain]
        counts[job.proc] -= 1
        if not any(counts):
            del self.at[domain]
        if job.lane == BULK:
            n = self.bulk_out[domain] - 1
            if n:
                self.bulk_out[domain] = n
            else:
                del self.bulk_out[domain]
            if domain in self.blocked:
                self.freed.add(domain)
        return job

    def pause(self, domain: str, pool, until: float, site: str = "") -> None:
        """Delivery REQUEUED a job of *pool* to *domain* (at *site*) until *until*: so are
        the others."""
        self.paused[(domain, pool)] = until
        self.pause_site[(domain, pool)] = site

    def step_back(self, now: float, by: float) -> None:
        """The wall clock went back by *by* seconds: the pauses end that much earlier."""
        for key, until in self.paused.items():
            self.paused[key] = max(now, until - by)

    def paused_until(self, domain: str, pool, now: float) -> float:
        """Until when jobs of *pool* to *domain* wait (0.0: they may go now)."""
        until = self.paused.get((domain, pool))
        if until is None:
            return 0.0
        if until <= now:
            del self.paused[(domain, pool)]
            self.pause_site.pop((domain, pool), None)
            return 0.0
        return until

    def unpause(self, now: float | None = None, domains=None) -> None:
        """End the pauses that ran out by *now* (None: all of them; of *domains* only,
        when given)."""
        if domains is not None:
            gone = [k for k in self.paused if k[0] in domains]
        elif now is None:
            gone = list(self.paused)
        else:
            gone = [k for k, until in self.paused.items() if until <= now]
        for key in gone:
            del self.paused[key]
            self.pause_site.pop(key, None)

    def block(self, domain: str, qid: str) -> None:
        """Message *qid* waits until a bulk job to *domain* comes back."""
        fifo = self.blocked.get(domain)
        if fifo is None:
            fifo = self.blocked[domain] = self.fifo()
        fifo.add(qid)

    def released(self, everything: bool = False, release=None) -> list[str]:
        """Blocked messages that may try again: as many per domain as it has free slots.

        Only the domains whose jobs came back since the last call, unless
        *everything* (the shard's once-a-second pass, which also frees slots
        that a released message did not use, e.g. it had been deleted).
        *release(qid)*: makes the message due and says whether it is still
        queued; those that are not (deleted, bounced or expired while they
        waited) are dropped without taking a slot -- else a bulk bounce of a
        throttled domain's backlog would leave its new mail waiting behind the
        ghosts, a slot's worth a second -- at most GHOSTS_PER_PASS per domain
        and call (taken a slot's worth at a time: a million ghosts cost ~100
        passes of ~5 ms, not one pause of the shard).
        """
        domains = list(self.blocked) if everything else self.freed
        out: list[str] = []
        for domain in domains:
            waiting = self.blocked.get(domain)
            if not waiting:
                continue
            free = self.per_domain - self.bulk_out.get(domain, 0)
            skip = GHOSTS_PER_PASS
            while free > 0 and waiting and skip > 0:
                for qid in waiting.take(free):
                    if release is None or release(qid):
                        out.append(qid)
                        free -= 1
                    else:
                        skip -= 1
            if not waiting:
                del self.blocked[domain]
        self.freed = set()
        return out

    def blocked_count(self) -> int:
        return sum(map(len, self.blocked.values()))

    def of_process(self, proc: int) -> list[int]:
        """The jobs out at delivery[proc]."""
        return [r for r, j in self.jobs.items() if j.proc == proc]

    def older_than(self, seconds: float) -> list[int]:
        now = time.monotonic()
        return [r for r, j in self.jobs.items() if now - j.sent_at > seconds]


ANY = "*"           # a lane pattern's site or source that matches every one


class HandedBack:
    """The messages delivery handed back untried (REQUEUED), by the lane that did:
    (site, source, recipient domain); source "" when no source of the pool could send.

    When a limit of some lanes rises -- the operator cancels a suspension, throttle or
    back-off, a reload raises a shaping rule or changes a warm-up plan -- the spool
    makes due again only what those lanes handed back (:meth:`take`): the cost is the
    lanes' own messages, not a walk of every message delivery ever handed back.  Per
    message: an entry of a FIFO (the queue index's QidFifo, ~24-48 octets) and one of
    *of* (its lane, shared); a message handed back in several lanes (several domains)
    keeps a list of them.  A message leaves when it is finished or deleted, or when a
    job of it to that domain has another outcome (:meth:`discard`).
    """

    def __init__(self, fifo):
        self.fifo = fifo
        self.lanes: dict[tuple, tuple] = {}       # (site, source, domain) -> (key, QidFifo)
        self.of: dict[str, object] = {}           # qid -> its lane key, or a list of them

    def __len__(self) -> int:
        return len(self.of)

    def __contains__(self, qid) -> bool:
        return qid in self.of

    def add(self, qid: str, site: str, source: str, domain: str) -> None:
        entry = self.lanes.get((site, source, domain))
        if entry is None:
            key = (site, source, domain)
            entry = self.lanes[key] = (key, self.fifo())
        key, fifo = entry
        fifo.add(qid)
        had = self.of.get(qid)
        if had is None:
            self.of[qid] = key
        elif type(had) is list:
            if key not in had:
                had.append(key)
        elif had != key:
            self.of[qid] = [had, key]

    def discard(self, qid: str, domain: str | None = None) -> None:
        """*qid* is no longer handed back (in the lanes of *domain* only, when given)."""
        had = self.of.get(qid)
        if had is None:
            return
        keys = had if type(had) is list else [had]
        keep = []
        for key in keys:
            if domain is None or key[2] == domain:
                self._drop(key, qid)
            else:
                keep.append(key)
        if not keep:
            del self.of[qid]
        else:
            self.of[qid] = keep[0] if len(keep) == 1 else keep

    def _drop(self, key: tuple, qid: str) -> None:
        entry = self.lanes.get(key)
        if entry is not None:
            entry[1].discard(qid)
            if not len(entry[1]):
                del self.lanes[key]

    def by_lane(self) -> dict[tuple[str, str], list[str]]:
        """(site, source) -> the recipient domains of the mail it handed back."""
        out: dict[tuple[str, str], list[str]] = {}
        for site, source, domain in self.lanes:
            out.setdefault((site, source), []).append(domain)
        return out

    def take(self, patterns=None) -> list[tuple[tuple, list[str]]]:
        """The lanes matching *patterns* ((site, source) pairs, ANY matching every one;
        None: every lane) with their messages, which are no longer handed back there."""
        if patterns is None:
            keys = list(self.lanes)
        else:
            # (sets by kind of pattern: each lane is looked up, not compared with every
            # pattern -- a reload's release can name every lane)
            pairs, sites, sources = set(), set(), set()
            every = False
            for site, source in patterns:
                if site == ANY:
                    if source == ANY:
                        every = True
                    sources.add(source)
                elif source == ANY:
                    sites.add(site)
                else:
                    pairs.add((site, source))
            keys = list(self.lanes) if every else \
                [k for k in self.lanes
                 if k[0] in sites or k[1] in sources or (k[0], k[1]) in pairs]
        out = []
        for key in keys:
            _, fifo = self.lanes.pop(key)
            qids = fifo.take(len(fifo))
            for qid in qids:
                had = self.of.get(qid)
                if had is None:
                    continue
                if type(had) is list:
                    if key in had:
                        had.remove(key)
                    if len(had) == 1:
                        self.of[qid] = had[0]
                    elif not had:
                        del self.of[qid]
                elif had == key:
                    del self.of[qid]
            out.append((key, qids))
        return out
