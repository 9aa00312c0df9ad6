"""Adaptive delivery: response rules, automatic back-off, and their durable state.

**Response rules** (``[[response_rule]]`` in the configuration, then the
shipped presets in ``mta/shaping/presets.toml``; the first that matches wins)
look at every 4xx/5xx reply a receiver gives -- at connect, greeting, EHLO,
MAIL, RCPT or DATA -- by code, enhanced code and a text regex, optionally only
for sites whose MX hosts match a glob.  Actions:

- ``suspend``: no mail from the source to the site (``source_site``), from any
  source to the site (``site``) or from the source to any site (``source``)
  for ``duration`` seconds; the jobs go to the pool's other sources, or back to
  the spool (REQUEUED, no attempt counted) until the suspension ends.  In the
  process that saw the reply it holds at once: each of the lane's workers looks
  again before it connects and before it begins a transaction, so only the
  transactions already under way (at most one per open connection) still reach
  the site; the other processes see it within a second, or at their own first
  such reply.  A suspension in effect is extended by a longer one of the same
  scope, never cut short by another rule's shorter one;
- ``throttle``: the (source x site)'s connection limit and/or message rate are
  lowered for ``duration``, then the shaping limits hold again.  A throttle that
  fires while another is in effect for the same source x site merges with it:
  each limit is the stricter of the two, until the later end (``rules list``
  names both rules, newest first);
- ``bounce``: the recipient fails now, with ``bounce_class``;
- ``defer``: the recipient is deferred and the outcome asks for ``delay``
  seconds before the next try (``DeliveryOutcome.retry_after``).

The rule a recipient's reply fired goes back in its ``Result.rule`` (name,
entry id, action, scope, the reply, the stage, the end time), the job's first
in ``DeliveryOutcome.rule``.

**Automatic back-off**, without any rule: each delivery process keeps, per
(source x site), the results of its attempts over the last ``backoff.window``
seconds.  With at least ``min_attempts`` of them and a share of deferrals
above ``threshold``, the (source x site) enters back-off: its message rate
becomes ``decrease`` x the rate the site accepted over the window (never
under ``min_rate``, never above the shaping rate), its connection limit
shrinks in proportion.  Still too many deferrals -- judged only on attempts
made after the last decrease reached every process -- multiply the rate in
effect by ``decrease`` again (deeper).  Recovery is additive: every
``recover_interval`` without a new decrease the rate grows by
``recover_step`` x the rate set at the decrease (at least ``min_rate``), but
for ``hold_intervals`` steps no higher than 0.9 x the rate that drew the
deferrals (it stays just under what the site takes), then it probes upwards
again, until it reaches the shaping limit (or, with no rate limit, the rate
attempted when back-off began): back-off ends there.  The steps are a function of the time since the
last decrease, so every process computes the same rate without writing
anything; each step is logged ("back-off ... step N, rate R/s").

**Node-wide and durable.**  Suspensions, throttles and back-offs are entries,
one small JSON file each in ``<state_dir>/adaptive/`` (written to a temporary
file, fsync'd, renamed; a temporary file whose writer was killed is removed by
the next process that opens the store), named by a hash of what they apply to, so the same
(rule scope, source, site) has one entry that a new firing replaces.  Every
delivery process reads the directory once a second (a listing and a stat per
file; files are re-read only when changed), so a decision one process makes
holds for all of them within a second, and survives kill -9 of the whole tree
and a reboot (unlike the limiter's per-boot files).  The evidence (the window
of attempts) is per process and not kept.  ``mta rules list`` reads the same
files; ``mta rules cancel`` deletes them (the engines see it within a second).
Expired entries are removed by whichever process sees them first.  At most
``backoff.max_entries`` entries exist; beyond that new ones are refused (logged).

All durations (rule ``duration`` and ``delay``, ``backoff.window`` and
``recover_interval``) are multiplied by ``delivery.time_scale`` (tests).
"""
from __future__ import annotations

import collections
import logging
import math
import os
import re
import time

import msgspec

from mta.shaping import (Limits, glob_regex, load_response_presets, parse_rate, share_cap,
                         share_connections, share_rate)
from mta.shaping.state import (ADMIN_RULE, BACKOFF, MAX_REPLY, STORE_DIR, SUSPEND, THROTTLE,
                               WARMUP, Entry, Store, cancel_entries, entry_id, list_entries)

log = logging.getLogger("mta.delivery.adaptive")

SETTLE = 1.5        # seconds for a new back-off rate to reach every process (1 s reads)
MAX_WINDOW = 20_000  # attempts kept per (source x site) window, at most
# Subjects of enhanced status codes (RFC 3463) that speak of the message or its
# recipients, not of the receiving system: mailbox status, security or policy status.
_ABOUT_THE_MESSAGE = (["2"], ["7"])
BUSY_WAIT = 0.001    # seconds: Warmup.take's answer when a count's lock is busy
                    # (held for microseconds by another process; not a full cap)
MAX_STATUS_SITES = 1000  # sites whose warm-up counts a process's status shows, at most


def _stricter(a, b):
    """The stricter of two throttle limits (None: no limit)."""
    return b if a is None else a if b is None else min(a, b)


MAX_MERGED = 4      # rule names a merged throttle keeps (" + "-joined, newest first)


class _Window:
    """One (source x site)'s recent attempts, with a running count of the deferred."""

    __slots__ = ("q", "fails")

    def __init__(self):
        self.q: collections.deque = collections.deque()
        self.fails = 0


__all__ = ["Adaptive", "Warmup", "Entry", "Rule", "ResponseRules", "Store", "entry_id", "STORE_DIR",
           "list_entries", "cancel_entries"]

class Rule:
    """One response rule, compiled."""

    __slots__ = ("name", "stages", "code", "enhanced", "regex", "mx", "action", "scope",
                 "duration", "connection_limit", "max_message_rate", "bounce_class", "delay")

    def __init__(self, r, scale: float):
        self.name = r.name
        self.stages = frozenset(r.stages)
        self.code = r.code
        self.enhanced = r.enhanced
        self.regex = re.compile(r.text, re.IGNORECASE) if r.text else None
        self.mx = glob_regex(r.mx) if r.mx else None
        self.action = r.action
        self.scope = r.scope if r.action == SUSPEND else "source_site"
        self.duration = r.duration * scale
        self.connection_limit = r.connection_limit
        self.max_message_rate = parse_rate(r.max_message_rate) if r.max_message_rate else None
        self.bounce_class = r.bounce_class
        self.delay = r.delay * scale

    def matches(self, stage: str, code: int, enhanced: str, text: str, hosts) -> bool:
        if self.stages and stage not in self.stages:
            return False
        if self.code is not None and code != self.code:
            return False
        if self.enhanced and enhanced != self.enhanced:
            return False
        if self.regex is not None and not self.regex.search(text):
            return False
        if self.mx is not None and not any(self.mx.fullmatch(h) for h in hosts):
            return False
        return True


class ResponseRules:
    """The operator's rules, then the presets; :meth:`match` returns the first that matches."""

    def __init__(self, rules, presets: bool = True, scale: float = 1.0):
        ordered = list(rules) + (load_response_presets() if presets else [])
        self.rules = [Rule(r, scale) for r in ordered]

    def match(self, stage: str, code: int, enhanced: str, text: str, hosts) -> Rule | None:
        if code < 400:
            return None
        for r in self.rules:
            if r.matches(stage, code, enhanced or "", text or "", hosts):
                return r
        return None


class Adaptive:
    """What one delivery process knows and decides: rules, back-off windows, the store."""

    def __init__(self, cfg, state_dir: str, scale: float = 1.0, presets: bool = True,
                 now=time.time, processes: int = 1, nodes: int = 1):
        b = cfg.backoff
        self.rules = ResponseRules(cfg.response_rule, presets, scale)
        self.store = Store(os.path.join(state_dir, STORE_DIR), b.max_entries)
        self.enabled = b.enabled
        self.window = b.window * scale
        self.min_attempts = b.min_attempts
        self.threshold = b.threshold
        self.decrease = b.decrease
        self.recover_step = b.recover_step
        self.interval = b.recover_interval * scale
        self.min_rate = parse_rate(b.min_rate)
        self.rcpt_signals = frozenset(b.rcpt_signals)
        self.hold = b.hold_intervals
        self.processes = max(1, processes)       # delivery processes sharing the lanes
        # [cluster] nodes: a throttle's limits are written, like shaping's, for every
        # node together; this node keeps to its share of them (back-off is not divided:
        # its rates are measured from this node's own sending)
        self.nodes = max(1, nodes)
        self.now = now
        # (source, site) -> deque of (time, ok)
        self.attempts: dict[tuple[str, str], collections.deque] = {}
        self.logged_steps: dict[str, int] = {}
        self.fired_new = False           # the last fire() put a new entry in effect
        self.max_windows = max(1024, 4 * b.max_entries)

    # -- queries ------------------------------------------------------------

    def suspended(self, source: str, site: str, now: float | None = None) -> Entry | None:
        """The suspension that stops (source, site) now, if any."""
        entries = self.store.entries
        if not entries:
            return None
        now = self.now() if now is None else now
        for eid in (entry_id(SUSPEND, "source_site", source, site),
                    entry_id(SUSPEND, "site", "", site),
                    entry_id(SUSPEND, "source", source, "")):
            e = entries.get(eid)
            if e is not None and e.until > now:
                return e
        return None

    def adjust(self, source: str, site: str, base: Limits, now: float | None = None) -> Limits:
        """*base* (shaping) with the throttle and back-off of (source, site) applied."""
        entries = self.store.entries
        if not entries:
            return base
        now = self.now() if now is None else now
        conn, rate = base.connection_limit, base.max_message_rate
        rules = base.rules
        t = entries.get(entry_id(THROTTLE, "source_site", source, site))
        if t is not None and t.until > now:
            if t.connection_limit:
                conn = min(conn, share_connections(t.connection_limit, self.nodes))
            if t.max_message_rate:
                tr = share_rate(t.max_message_rate, self.nodes)
                rate = tr if rate is None else min(rate, tr)
            rules = rules + (f"throttle {t.rule}",)
        b = entries.get(entry_id(BACKOFF, "source_site", source, site))
        if b is not None:
            r = b.current_rate(now)
            rate = r if rate is None else min(rate, r)
            if b.conn_base and b.ceiling > 0:
                conn = min(conn, max(1, math.ceil(b.conn_base * r / b.ceiling)))
            rules = rules + (f"backoff level {b.level} step {b.steps(now)}",)
        if (conn, rate) == (base.connection_limit, base.max_message_rate):
            return base
        return msgspec.structs.replace(base, connection_limit=conn, max_message_rate=rate,
                                       rules=rules)

    def rate_rises_at(self, source: str, site: str, base_rate: float | None,
                      now: float | None = None) -> float | None:
        """When (wall clock) the message rate a throttle or back-off of (source, site)
        lowered below *base_rate* (shaping's) rises next: the throttle's end, the
        back-off's next step that raises it (or its end); None when neither lowers it.
        A job handed back for the rate need not wait past then (Engine._hand_back)."""
        entries = self.store.entries
        if not entries:
            return None
        now = self.now() if now is None else now
        at = None
        t = entries.get(entry_id(THROTTLE, "source_site", source, site))
        if t is not None and t.until > now and t.max_message_rate:
            tr = share_rate(t.max_message_rate, self.nodes)
            if base_rate is None or tr < base_rate:
                at = t.until
        b = entries.get(entry_id(BACKOFF, "source_site", source, site))
        if b is not None and b.interval > 0:
            r = b.current_rate(now)
            if base_rate is None or r < base_rate:
                # the steps are a function of time: the first later one with a higher
                # rate (a plateau's steps do not raise it; bounded look ahead)
                first = b.steps(now) + 1
                for n in range(first, first + max(1, b.hold) + 2):
                    when = b.decreased + n * b.interval
                    if b.current_rate(when) > r:
                        break
                at = when if at is None else min(at, when)
        return at

    # -- rules ----------------------------------------------------------------

    def fire(self, rule: Rule, source: str, site: str, reply: str, stage: str) -> Entry | None:
        """Put *rule*'s suspension or throttle in effect; the entry (None for bounce/defer)."""
        if rule.action not in (SUSPEND, THROTTLE):
            return None
        now = self.now()
        scope = rule.scope
        src = "" if scope == "site" else source
        st = "" if scope == "source" else site
        eid = entry_id(rule.action, scope, src, st)
        old = self.store.entries.get(eid)
        until = now + rule.duration
        self.fired_new = False
        if old is not None and old.until >= until - 1.0 and old.rule == rule.name:
            return old            # already in effect (another job saw the same reply)
        if old is not None and rule.action == SUSPEND and old.rule != ADMIN_RULE \
                and old.until >= until:
            # A longer suspension of the same scope holds (another rule's: a block for a
            # day); a shorter one must not end it early.
            return old
        conn, rate, name = rule.connection_limit, rule.max_message_rate, rule.name
        if old is not None and rule.action == THROTTLE and old.kind == THROTTLE \
                and old.rule != ADMIN_RULE and old.until > now:
            # Throttles of one source x site merge: each limit is the stricter of the two,
            # until the later end.  Gmail's "try again later" (2 connections, 10 min) after
            # its rate limit (60/m and 2 connections, 15 min) must not lift the rate limit,
            # whichever ends first; a stricter connection limit must not either.  The
            # stricter limit may so hold longer than its own rule said: while the site
            # still complains, that errs on the side it asked for.
            conn = _stricter(old.connection_limit, conn)
            rate = _stricter(old.max_message_rate, rate)
            if old.until >= until - 1.0 and \
                    (conn, rate) == (old.connection_limit, old.max_message_rate):
                return old        # as strict, and as long: nothing to write
            until = max(until, old.until)
            names = [name] + [n for n in old.rule.split(" + ") if n != name]
            name = " + ".join(names[:MAX_MERGED])
        if old is not None and old.rule == ADMIN_RULE:
            # The operator's suspension stays the operator's (listed, resumed by its id):
            # a rule that holds longer only makes it end later.
            if old.until >= until or rule.action != SUSPEND:
                return old
            e = msgspec.structs.replace(old, until=until)
            return e if self.store.put(e) else old
        e = Entry(id=eid, kind=rule.action, scope=scope, source=src, site=st, rule=name,
                  reply=reply[:MAX_REPLY], stage=stage, created=now, until=until,
                  connection_limit=conn, max_message_rate=rate)
        if not self.store.put(e):
            return None
        self.fired_new = True
        log.warning("response rule %s: %s %s for %.0fs (source=%s site=%s, id %s) after "
                    "%s reply: %s", name, rule.action,
                    {"source_site": "source x site", "site": "site", "source": "source"}[scope],
                    until - now, src or "*", st or "*", eid, stage, reply[:MAX_REPLY])
        return e

    # -- back-off -------------------------------------------------------------

    def slows(self, code: int, enhanced: str, stage: str) -> bool:
        """Whether a deferral (4xx) says the site wants less from this source, rather
        than something about the message: a 421, any 4xx before RCPT, one with one of
        ``[backoff] rcpt_signals``, and a 4xx to DATA unless its enhanced code is about
        the mailbox (4.2.x) or policy (4.7.x): greylisting after DATA (451 4.7.1) defers
        every first attempt of a new sender and is no rate limit, as at RCPT."""
        if code == 421 or enhanced in self.rcpt_signals:
            return True
        if stage == "rcpt":
            return False
        return stage != "data" or enhanced.split(".")[1:2] not in _ABOUT_THE_MESSAGE

    def record(self, source: str, site: str, ok: bool, attempted_rate: float | None = None,
               base=None) -> bool:
        """One attempt's result for (source, site); True when back-off state changed.

        *base*: the shaping limits (a Limits, or a function returning them, asked only
        when a decision is made)."""
        if not self.enabled:
            return False
        key = (source, site)
        w = self.attempts.get(key)
        if w is None:
            if len(self.attempts) >= self.max_windows:
                self.attempts.pop(next(iter(self.attempts)))
            w = self.attempts[key] = _Window()
        q = w.q
        now = self.now()
        eid = entry_id(BACKOFF, "source_site", source, site)
        old = self.store.entries.get(eid)
        q.append((now, ok))
        w.fails += not ok
        # Evidence counts from the window, and only from after the last decrease had
        # reached every process (they read the store once a second): what was sent at the
        # old rate says nothing about the new one.  At most MAX_WINDOW attempts are kept.
        horizon = now - self.window
        if old is not None:
            horizon = max(horizon, old.decreased + SETTLE)
        while q and (q[0][0] < horizon or len(q) > MAX_WINDOW):
            w.fails -= not q.popleft()[1]
        if ok or len(q) < self.min_attempts:
            return False
        fails = w.fails
        if fails / len(q) <= self.threshold:
            return False
        # Another process may have decided a moment ago (we read the store once a second):
        # look at the file itself before deciding again.
        fresh = self.store.reread(eid)
        if fresh is not None and (old is None or fresh.decreased > old.decreased):
            old = fresh
            if now - old.decreased < SETTLE:
                return False
        # Rates over the whole window (a provider's limit is per period: a burst in the
        # first second says nothing about the minute), for the node: this process sees
        # its share of a (source x site) spread over several processes, so its counts are
        # scaled by their number (an over-estimate when not spread, which the next
        # decrease corrects; an under-estimate would take many steps to recover).
        span = self.window
        accepted = (len(q) - fails) / span * self.processes
        attempted = len(q) / span * self.processes
        if callable(base):
            base = base()
        shaping_rate = base.max_message_rate if base is not None else None
        if old is not None:
            # Deeper: multiplicative decrease of the rate in effect.
            current = old.current_rate(now)
            ceiling, conn_base = old.ceiling, old.conn_base
        else:
            # Begins: from what this process saw attempted (and the site accepted).
            current = min(shaping_rate or attempted, attempted)
            ceiling = shaping_rate or max(attempted, attempted_rate or 0.0)
            conn_base = base.connection_limit if base is not None else 0
        # Down to a share of what the site took (never more than two decreases at once:
        # one process's view of "took" is noisy), or of the rate in effect if lower.
        rate = self.decrease * min(accepted, current)
        if old is not None:
            rate = max(rate, self.decrease ** 2 * current)
        rate = max(self.min_rate, rate)
        step = max(self.min_rate, self.recover_step * rate)
        e = Entry(id=eid, kind=BACKOFF, scope="source_site", source=source, site=site,
                  rule="backoff", reply=f"{fails} of {len(q)} attempts deferred in "
                  f"{span:.1f}s", stage="", created=old.created if old else now, until=0.0,
                  rate=rate, ceiling=max(ceiling, rate), decreased=now,
                  step=step, interval=self.interval, conn_base=conn_base,
                  level=(old.level if old else 0) + 1, failed_at=current, hold=self.hold)
        if not self.store.put(e):
            return False
        n = len(q)
        q.clear()
        w.fails = 0
        self.logged_steps[eid] = 0
        log.warning("back-off %s source=%s site=%s: level %d, rate %.3f/s (was %.3f/s; the "
                    "site took %.3f/s; %d of %d attempts deferred); recovers by %.3f/s every "
                    "%.1fs up to %.3f/s", "deeper" if old else "begins", source, site, e.level,
                    rate, current, accepted, fails, n,
                    e.step, self.interval, e.ceiling)
        return True

    # -- upkeep ---------------------------------------------------------------

    def tick(self) -> bool:
        """Once a second: read the store, log back-off steps, drop what ended.
        True when limits may have changed (steps, new or removed entries)."""
        changed = self.store.refresh()
        now = self.now()
        for e in self.store.removed:
            if e.kind in (BACKOFF, WARMUP) or e.until > now:
                log.warning("%s %s source=%s site=%s (id %s) cancelled", e.kind, e.rule,
                            e.source or "*", e.site or "*", e.id)
            self.logged_steps.pop(e.id, None)
        self.store.removed.clear()
        for eid, e in list(self.store.entries.items()):
            if e.kind == BACKOFF:
                n = e.steps(now)
                if n != self.logged_steps.get(eid):
                    self.logged_steps[eid] = n
                    changed = True
                    if e.current_rate(now) >= e.ceiling:
                        log.warning("back-off over: source=%s site=%s back at %.3f/s after %d "
                                    "step(s)", e.source, e.site, e.ceiling, n)
                        self.store.remove(eid)
                        self.logged_steps.pop(eid, None)
                    elif n:
                        log.warning("back-off source=%s site=%s: step %d, rate %.3f/s "
                                    "(ceiling %.3f/s)", e.source, e.site, n,
                                    e.current_rate(now), e.ceiling)
            elif e.kind != WARMUP and e.until <= now:
                log.warning("%s by rule %s ended: source=%s site=%s", e.kind, e.rule,
                            e.source or "*", e.site or "*")
                self.store.remove(eid)
                changed = True
        return changed

    def status(self) -> list[dict]:
        now = self.now()
        out = []
        for e in self.store.entries.values():
            d = msgspec.to_builtins(e)
            d["left"] = round(e.until - now, 1) if e.until else None
            if e.kind == BACKOFF:
                d["current_rate"] = e.current_rate(now)
                d["step_no"] = e.steps(now)
            out.append(d)
        return out


class Warmup:
    """IP warm-up (``[[warmup]]``): per source a schedule of caps per site by day of use.

    The day counts from the source's first use, recorded once, durably, as a
    ``warmup`` entry in the store (``mta rules list`` shows it; cancelling it
    starts the warm-up again).  Counts are node-wide, per (source x site), in
    fixed windows counted from the first use (hour 0, 1, ...; day 0, 1, ...;
    3600 and 86400 seconds x ``delivery.time_scale``) kept by the limiter (in
    the run directory: they survive restarts, and a reboot carries them over);
    a source at
    its cap for a site sends no more there until the window rolls over, and its
    mail goes to the pool's other sources (``overflow = "other_sources"``) or
    waits in the queue (``"wait"``).
    """

    def __init__(self, cfg, store: Store, limiter, scale: float = 1.0, now=time.time,
                 nodes: int = 1):
        self.plans = {}
        for w in cfg.warmup:
            self.plans[w.source] = (glob_regex(w.mx) if w.mx else None,
                                    sorted(w.schedule, key=lambda st: st.day), w.overflow)
        self.store = store
        self.limiter = limiter
        self.hour = 3600.0 * scale
        self.day = 86400.0 * scale
        self.now = now
        self.nodes = max(1, nodes)      # [cluster] nodes: the caps are this node's share
        # the sites (name -> hosts) this process counted a warming source's message for
        # (the latest MAX_STATUS_SITES): the ones whose counts the status shows -- not
        # every site known, a count read (and a limiter file) per site and cap each
        # second; a process started anew (a reload, a restart) takes its predecessor's
        # (remember()), whose counts hold node-wide
        self.counted_sites: dict[str, tuple] = {}

    def first_use(self, source: str, create: bool = True) -> float | None:
        eid = entry_id(WARMUP, "source", source, "")
        e = self.store.entries.get(eid) or self.store.reread(eid)
        if e is None and create:
            now = self.now()
            e = Entry(id=eid, kind=WARMUP, scope="source", source=source, rule="warmup",
                      reply="first use", created=now)
            self.store.put(e)
            log.warning("warm-up of source %s begins (day 1)", source)
        return e.created if e is not None else None

    def stage(self, source: str, hosts, now: float, create: bool = True):
        """(day, stage, first use) for *source* sending to a site with *hosts*; None
        when no schedule applies."""
        plan = self.plans.get(source)
        if plan is None:
            return None
        glob, stages, _ = plan
        if glob is not None and not any(glob.fullmatch(h) for h in hosts):
            return None
        first = self.first_use(source, create)
        if first is None:
            return 1, stages[0], now
        day = int(max(0.0, now - first) // self.day) + 1
        current = stages[0]
        for st in stages:
            if st.day <= day:
                current = st
        return day, current, first

    def overflow(self, source: str) -> str:
        return self.plans[source][2]

    def _caps(self, stage, first: float, now: float):
        """(limiter key suffix, window number, seconds to its end, cap) per cap; windows
        count from the source's first use (hour 0, hour 1, ...)."""
        since = max(0.0, now - first)
        for kind, length, cap in (("warmup-hour", self.hour, share_cap(stage.hourly, self.nodes)),
                                  ("warmup-day", self.day, share_cap(stage.daily, self.nodes))):
            if cap:
                window = int(since // length)
                yield kind, window, (window + 1) * length - since, cap

    def capped(self, source: str, site: str, hosts, now: float) -> float:
        """0.0 when *source* may send one more message to *site* now; else the seconds
        until its window rolls over (nothing is counted)."""
        found = self.stage(source, hosts, now)
        if found is None:
            return 0.0
        for kind, window, left, cap in self._caps(found[1], found[2], now):
            n = self.limiter.count(f"{source}|{site}|{kind}", window, cap, take=False)
            if n is not None and n >= cap:     # busy (None): take() counts and decides
                return left
        return 0.0

    def take(self, source: str, site: str, hosts, now: float,
             counted: list | None = None) -> float:
        """Count one message of *source* to *site*: 0.0 when counted, else the seconds
        until the full window rolls over (then nothing is counted).  *counted* gets the
        (key, window) of each count taken, for :meth:`give_back`."""
        found = self.stage(source, hosts, now)
        if found is None:
            return 0.0
        caps = list(self._caps(found[1], found[2], now))
        for kind, window, left, cap in caps:   # all must have room before any is taken
            n = self.limiter.count(f"{source}|{site}|{kind}", window, cap, take=False)
            if n is None:
                return BUSY_WAIT               # another process is counting: ask again soon
            if n >= cap:
                return left
        taken = []
        for kind, window, left, cap in caps:
            key = f"{source}|{site}|{kind}"
            n = self.limiter.count(key, window, cap)
            if n is None or n >= cap:          # busy, or another process took the last one
                self.give_back(taken)
                return BUSY_WAIT if n is None else left
            taken.append((key, window))
        if counted is not None:
            counted.extend(taken)
        if site not in self.counted_sites:
            self.remember(site, hosts)
        return 0.0

    def remember(self, site: str, hosts) -> None:
        """Show *site*'s counts in the status from now on (the latest MAX_STATUS_SITES)."""
        sites = self.counted_sites
        sites[site] = tuple(hosts)
        if len(sites) > MAX_STATUS_SITES:
            del sites[next(iter(sites))]

    def give_back(self, counted) -> None:
        """Uncount what :meth:`take` counted for a message that was not sent (it went
        back to the spool, or to another source): the cap is for what the source sends."""
        for key, window in counted:
            self.limiter.uncount(key, window)

    def status(self, sites=None) -> dict:
        """Per warming source: day, stage caps, and this hour's / day's counts per site
        (*sites*: objects with a name and hosts, as Engine's sites; by default the
        counted ones)."""
        now = self.now()
        out = {}
        sites = list(self.counted_sites.items()) if sites is None else \
            [(s.name, s.hosts) for s in sites]
        for source in self.plans:
            info = {"first_use": self.first_use(source, create=False), "sites": {}}
            for name, hosts in sites:
                found = self.stage(source, hosts, now, create=False)
                if found is None:
                    continue
                day, st, first = found
                info.update(day=day, hourly=share_cap(st.hourly, self.nodes),
                            daily=share_cap(st.daily, self.nodes))
                counts = {}
                for kind, window, _, cap in self._caps(st, first, now):
                    n = self.limiter.count(f"{source}|{name}|{kind}", window, cap,
                                           take=False)
                    if n is not None:          # busy: left out this time
                        counts[kind.split("-")[1]] = n
                info["sites"][name] = counts
            out[source] = info
        return out
