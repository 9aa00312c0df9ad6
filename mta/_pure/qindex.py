"""The spool shard's queue index (pure-Python twin).

The readable specification of ``mta._ext.qindex``: both have the same public
API and results, and the same tests run against both
(tests/spool/test_qindex.py drives them with the same random operations).
This twin keeps a Python object per message; only the compiled module is
compact.  Why the index exists and what it replaces: docs/queue-index.md.

A :class:`QueueIndex` holds, per queued message (by queue id): where its
record lies (segment number, offset of the record's meta, meta and body
lengths: the envelope sits right before the body, so one read gets both),
its arrival and start times, dispatch lane, egress pool and campaign, the
in-flight job count, and per recipient: state, attempts, due time, RCPT_*
flags, domain and last temporary reply.  Around them: a due-time queue per
lane (one entry per message at most, ordered by (due, push sequence)) and
deadline buckets (a message's age limit).  Domains, pools, campaigns and
replies are interned with reference counts, so they go when their last user
does.

Orders that callers can see are fixed so both twins agree: bulk walks
(:meth:`select`, :meth:`in_segment`, :meth:`flush`,
:meth:`schedule_recovered`) go in slot order (a removed message's slot is
reused last-in first-out); :meth:`pop_due` by (due, sequence of the push
that set it); :meth:`passed` by bucket, then by when the message entered it;
:meth:`sorted_qids` by queue id (canonical ids first, then other strings).

:class:`QidFifo` is the spool's other per-message structure: the messages
waiting for a slot of one recipient domain (mta.spool.dispatch), a FIFO
without repeats.
"""

import heapq
import operator
from collections import deque

PENDING = 0                 # recipient states: mta.store's (PENDING ... EXPIRED)
_LAST_STATE = 3             # (EXPIRED: a record's state is one of 0..this)
LANES = 2                   # mta.spool.dispatch: BULK 0, TRANSACTIONAL 1
MAX_ATTEMPTS = 0xFFFF       # attempts are kept saturated at this
MAX_OUT = 0xFFFF            # in-flight jobs per message, likewise
_SEQ_MASK = 0xFFFFFFFF      # push sequence numbers wrap (only ties of equal due see it)
_KEY_MAX = 1 << 62          # deadline bucket keys are clamped to +-this
_DUE_MAX = 1e11              # a due time read from a record lies strictly within +-this


def is_canonical(qid: str) -> bool:
    """True for a queue id of mta.queueid's shape: 20 upper-case hex digits."""
    return type(qid) is str and len(qid) == 20 and all(c in "0123456789ABCDEF" for c in qid)


def _u8(name, v):
    v = operator.index(v)
    if not 0 <= v <= 0xFF:
        raise ValueError(f"{name} must be in 0..255")
    return v


def _uint(v, bits):
    v = operator.index(v)
    if not 0 <= v < 1 << bits:
        raise OverflowError(f"value out of range for {bits} bits")
    return v


def _attempts(v):
    v = operator.index(v)
    if not -(1 << 63) <= v < 1 << 63:
        raise OverflowError("attempts out of range")
    return min(max(v, 0), MAX_ATTEMPTS)


class _Interner:
    """Values <-> small ids (0: none) with reference counts; an id is freed at zero."""

    def __init__(self):
        self.ids = {}
        self.values = [None]
        self.refs = [0]
        self.free = []

    def ref(self, value) -> int:
        if value is None:
            return 0
        i = self.ids.get(value)
        if i is None:
            if self.free:
                i = self.free.pop()
                self.values[i] = value
                self.refs[i] = 0
            else:
                i = len(self.values)
                self.values.append(value)
                self.refs.append(0)
            self.ids[value] = i
        self.refs[i] += 1
        return i

    def unref(self, i: int) -> None:
        if i:
            self.refs[i] -= 1
            if not self.refs[i]:
                del self.ids[self.values[i]]
                self.values[i] = None
                self.free.append(i)

    def __len__(self):
        return len(self.ids)


class _Msg:
    __slots__ = ("qid", "seg", "offset", "meta_len", "body_len", "arrival", "start", "lane",
                 "pool", "campaign", "out", "state", "attempts", "due", "flags", "domain",
                 "last", "pending", "hkey", "dkey")


class QueueIndex:
    """The queued messages of one shard, their recipients' progress and their schedule.

    *deadline_width*: seconds per deadline bucket (a message is reported by
    :meth:`passed` at most that late).
    """

    def __init__(self, deadline_width: float):
        if not deadline_width > 0:
            raise ValueError("deadline_width must be > 0")
        self.width = float(deadline_width)
        self._slots: list = []          # slot -> _Msg or None
        self._free: list = []           # free slots, reused last-in first-out
        self._by_qid: dict = {}         # qid -> slot
        self._heaps = [[] for _ in range(LANES)]   # (due, seq, slot), stale ones skipped
        self._queued = [0] * LANES
        self._seq = 0
        self._buckets: dict = {}        # key -> {slot: None} in arrival order
        self._keys: list = []           # heap of the buckets' keys
        self._domains = _Interner()
        self._pools = _Interner()
        self._campaigns = _Interner()
        self._replies = _Interner()
        self.recipients = 0             # of every queued message, whatever their state
        self.body_bytes = 0

    # ------------------------------------------------------------ messages

    def __len__(self) -> int:
        return len(self._by_qid)

    def __contains__(self, qid) -> bool:
        return qid in self._by_qid

    def _get(self, qid):
        s = self._by_qid.get(qid)
        return None if s is None else self._slots[s]

    def add(self, qid, seg, offset, meta_len, body_len, arrival, start, lane, pool, campaign,
            domains, state=None, attempts=None, due=None, flags=None) -> bool:
        """Index a message record; True when it replaced the same queue id's (a copy).

        *domains*: each recipient's domain; *state*, *attempts*, *due*,
        *flags*: per recipient, None for a fresh message (pending, 0, *start*,
        0).  A replaced message keeps its jobs out, its place in the due
        queue and its deadline, and its last replies if it has as many
        recipients: none of them is on disk.
        """
        if type(qid) is not str:
            raise TypeError("qid must be a str")
        if lane not in (0, 1):
            raise ValueError("lane must be 0 or 1")
        n = len(domains)
        for name, lst in (("state", state), ("attempts", attempts), ("due", due),
                          ("flags", flags)):
            if lst is not None and len(lst) != n:
                raise ValueError(f"{name} must have one value per recipient")
        st = [PENDING] * n if state is None else [_u8("state", v) for v in state]
        at = [0] * n if attempts is None else [_attempts(v) for v in attempts]
        du = [float(start)] * n if due is None else [float(v) for v in due]
        fl = [0] * n if flags is None else [_u8("flags", v) for v in flags]
        if not all(type(d) is str for d in domains):
            raise TypeError("domains must be str")
        if pool is not None and type(pool) is not str or \
                campaign is not None and type(campaign) is not str:
            raise TypeError("pool and campaign must be str or None")
        loc = (_uint(seg, 32), _uint(offset, 64), _uint(meta_len, 32), _uint(body_len, 32))
        old_slot = self._by_qid.get(qid)
        if old_slot is not None:
            m = self._slots[old_slot]
            out, hkey, dkey, old_lane = m.out, m.hkey, m.dkey, m.lane
            last = m.last if len(m.last) == n else None
            if last is not None:
                for r in last:
                    self._replies.ref(self._replies.values[r] if r else None)
            self._release(m)
            slot = old_slot
        else:
            out, hkey, dkey, last = 0, None, None, None
            slot = self._free.pop() if self._free else len(self._slots)
            if slot == len(self._slots):
                self._slots.append(None)
        m = _Msg()
        m.qid = qid
        m.seg, m.offset, m.meta_len, m.body_len = loc
        m.arrival, m.start, m.lane = float(arrival), float(start), lane
        m.pool = self._pools.ref(pool or None)
        m.campaign = self._campaigns.ref(campaign or None)
        m.out = out
        m.state, m.attempts, m.due, m.flags = st, at, du, fl
        m.domain = [self._domains.ref(d) for d in domains]
        m.last = last if last is not None else [0] * n
        m.pending = st.count(PENDING)
        m.hkey, m.dkey = None, None
        self._slots[slot] = m
        self._by_qid[qid] = slot
        self.recipients += n
        self.body_bytes += m.body_len
        if old_slot is not None:
            if hkey is not None:
                if m.lane != old_lane:     # (its old entry goes stale)
                    self._queued[old_lane] -= 1
                    self._schedule(slot, m, hkey[0])
                else:
                    m.hkey = hkey
            if dkey is not None:
                m.dkey = dkey           # (the bucket holds the slot, which stays)
        return old_slot is not None

    def _release(self, m) -> None:
        """Drop *m*'s references to interned values and its counts."""
        for d in m.domain:
            self._domains.unref(d)
        for r in m.last:
            self._replies.unref(r)
        self._pools.unref(m.pool)
        self._campaigns.unref(m.campaign)
        self.recipients -= len(m.state)
        self.body_bytes -= m.body_len

    def remove(self, qid) -> bool:
        """Forget a message (finished or deleted): its recipients, schedule and deadline."""
        slot = self._by_qid.pop(qid, None)
        if slot is None:
            return False
        m = self._slots[slot]
        self._release(m)
        if m.hkey is not None:
            self._queued[m.lane] -= 1
        if m.dkey is not None:
            del self._buckets[m.dkey][slot]
        self._slots[slot] = None
        self._free.append(slot)
        return True

    def info(self, qid):
        """(seg, offset, meta_len, body_len, arrival, start, lane, pool, campaign, out,
        recipients, pending) of a message; None if it is not queued."""
        m = self._get(qid)
        if m is None:
            return None
        return (m.seg, m.offset, m.meta_len, m.body_len, m.arrival, m.start, m.lane,
                self._pools.values[m.pool], self._campaigns.values[m.campaign], m.out,
                len(m.state), m.pending)

    def location(self, qid):
        """(seg, offset, meta_len, body_len): read meta_len + body_len octets at offset."""
        m = self._get(qid)
        return None if m is None else (m.seg, m.offset, m.meta_len, m.body_len)

    def progress(self, qid):
        """([state], [attempts], [due], [flags]) of a message's recipients (for a copy)."""
        m = self._get(qid)
        return None if m is None else (list(m.state), list(m.attempts), list(m.due),
                                       list(m.flags))

    def domains(self, qid):
        """Each recipient's domain (the interned strings)."""
        m = self._get(qid)
        return None if m is None else [self._domains.values[d] for d in m.domain]

    def recipient(self, qid, idx):
        """(state, attempts, due, flags, domain, last reply) of recipient *idx*, or None."""
        m = self._get(qid)
        if m is None or not 0 <= idx < len(m.state):
            return None
        return (m.state[idx], m.attempts[idx], m.due[idx], m.flags[idx],
                self._domains.values[m.domain[idx]], self._replies.values[m.last[idx]])

    # ---------------------------------------------------------- recipients

    def update(self, qid, idx, state, attempts, due, flags=None) -> bool:
        """Set recipient *idx*'s progress (*flags* None: unchanged); False if no such one."""
        m = self._get(qid)
        if m is None or not 0 <= idx < len(m.state):
            return False
        # every value converted before anything changes (as the compiled twin)
        state = _u8("state", state)
        if state > _LAST_STATE:
            raise ValueError("state must be in 0..3")
        flags = None if flags is None else _u8("flags", flags)
        attempts = _attempts(attempts)
        due = float(due)
        if not -_DUE_MAX < due < _DUE_MAX:
            # (a NaN or an infinity would stall or stop the shard's due queue)
            raise ValueError("due must be a time")
        if flags is not None:
            m.flags[idx] = flags
        m.pending += (state == PENDING) - (m.state[idx] == PENDING)
        m.state[idx] = state
        m.attempts[idx] = attempts
        m.due[idx] = due
        return True

    def apply(self, qid, updates) -> int:
        """Apply a REC_RCPT record's [[idx, state, attempts, due(, flags)], ...] (bad
        indexes and malformed updates ignored); how many applied."""
        n = 0
        for u in updates:
            try:
                a = tuple(u)
                if not 4 <= len(a) <= 5:
                    continue        # not an update: skipped, as a bad index
                if self.update(qid, *a):
                    n += 1
            except (OverflowError, TypeError, ValueError):
                pass        # a record's update that cannot be one: skipped, as a bad index
        return n

    def set_due(self, qid, idx, due) -> bool:
        """Recipient *idx*'s next attempt is at *due* (in memory: a requeue, a flush)."""
        m = self._get(qid)
        if m is None or not 0 <= idx < len(m.state):
            return False
        m.due[idx] = float(due)
        return True

    def set_last(self, qid, idx, reply) -> bool:
        """Remember recipient *idx*'s last temporary reply (a hashable value; None: none)."""
        m = self._get(qid)
        if m is None or not 0 <= idx < len(m.state):
            return False
        new = self._replies.ref(reply)
        self._replies.unref(m.last[idx])
        m.last[idx] = new
        return True

    def last(self, qid, idx):
        m = self._get(qid)
        if m is None or not 0 <= idx < len(m.state):
            return None
        return self._replies.values[m.last[idx]]

    def add_out(self, qid, delta) -> int:
        """Change the count of delivery jobs out (kept in 0..MAX_OUT); the new count, -1
        if the message is not queued."""
        m = self._get(qid)
        if m is None:
            return -1
        m.out = min(max(m.out + int(delta), 0), MAX_OUT)
        return m.out

    def pending_idxs(self, qid):
        m = self._get(qid)
        return None if m is None else [i for i, s in enumerate(m.state) if s == PENDING]

    def first_due(self, qid):
        """The earliest due time of the pending recipients; None if none is pending."""
        m = self._get(qid)
        if m is None:
            return None
        best = None
        for i, s in enumerate(m.state):
            if s == PENDING and (best is None or m.due[i] < best):
                best = m.due[i]
        return best

    def ready(self, qid, now):
        """([pending recipients due by *now*], earliest due time of the others or None)."""
        m = self._get(qid)
        if m is None:
            return None
        idxs = []
        later = None
        for i, s in enumerate(m.state):
            if s != PENDING:
                continue
            d = m.due[i]
            if d <= now:
                idxs.append(i)
            elif later is None or d < later:
                later = d
        return idxs, later

    # ------------------------------------------------------------ schedule

    def _schedule(self, slot, m, due) -> None:
        if due != due:
            due = 0.0                   # (a NaN read from disk: due at once)
        if m.hkey is None:
            self._queued[m.lane] += 1
        elif not due < m.hkey[0]:
            return
        m.hkey = (due, self._seq)
        self._seq = (self._seq + 1) & _SEQ_MASK
        heapq.heappush(self._heaps[m.lane], (due, m.hkey[1], slot))

    def push(self, qid, due) -> bool:
        """Make the message due at *due* in its lane, unless it is due earlier already."""
        slot = self._by_qid.get(qid)
        if slot is None:
            return False
        self._schedule(slot, self._slots[slot], float(due))
        return True

    def scheduled(self, qid):
        """When the message is due in its lane's queue; None if it is not in it."""
        m = self._get(qid)
        return None if m is None or m.hkey is None else m.hkey[0]

    def _top(self, lane):
        """The lane's first live (due, seq, slot), dropping stale entries on the way."""
        heap = self._heaps[lane]
        while heap:
            due, seq, slot = heap[0]
            m = self._slots[slot] if slot < len(self._slots) else None
            if m is not None and m.hkey == (due, seq):
                return heap[0]
            heapq.heappop(heap)
        return None

    def pop_due(self, lane, now, limit) -> list:
        """Take out up to *limit* messages of *lane* due by *now*, earliest first."""
        out = []
        while len(out) < limit:
            top = self._top(lane)
            if top is None or not top[0] <= now:
                break
            heapq.heappop(self._heaps[lane])
            m = self._slots[top[2]]
            m.hkey = None
            self._queued[lane] -= 1
            out.append(m.qid)
        return out

    def next_due(self, lanes=None):
        """The earliest due time in *lanes* (default: every lane); None if they are empty."""
        best = None
        for lane in range(LANES) if lanes is None else lanes:
            top = self._top(lane)
            if top is not None and (best is None or top[0] < best):
                best = top[0]
        return best

    def queued(self, lane) -> int:
        """How many messages wait in *lane*'s due queue."""
        return self._queued[lane]

    # ----------------------------------------------------------- deadlines

    def _key(self, t):
        q = t / self.width
        if not q < _KEY_MAX:
            return _KEY_MAX
        if q <= -_KEY_MAX:
            return -_KEY_MAX
        return int(q) + 1               # every deadline in bucket k is < k * width

    def set_deadline(self, qid, t) -> bool:
        """File the message under deadline *t* (moving it if it had one)."""
        slot = self._by_qid.get(qid)
        if slot is None:
            return False
        m = self._slots[slot]
        if m.dkey is not None:
            del self._buckets[m.dkey][slot]
        k = self._key(float(t))
        b = self._buckets.get(k)
        if b is None:
            b = self._buckets[k] = {}
            heapq.heappush(self._keys, k)
        b[slot] = None
        m.dkey = k
        return True

    def clear_deadline(self, qid) -> bool:
        m = self._get(qid)
        if m is None or m.dkey is None:
            return False
        del self._buckets[m.dkey][self._by_qid[qid]]
        m.dkey = None
        return True

    def passed(self, now) -> list:
        """Take out every message whose deadline bucket has passed by *now*."""
        out = []
        keys = self._keys
        while keys and keys[0] * self.width <= now:
            for slot in self._buckets.pop(heapq.heappop(keys)):
                m = self._slots[slot]
                m.dkey = None
                out.append(m.qid)
        return out

    # ---------------------------------------------------------- bulk walks

    def _walk(self):
        for m in self._slots:
            if m is not None:
                yield m

    def schedule_recovered(self, upto_seg, max_age) -> list:
        """After recovery: queue each message of segments <= *upto_seg* at its earliest
        pending due time with deadline start + *max_age*; return those with none pending."""
        finished = []
        for m in list(self._walk()):
            if m.seg > upto_seg:
                continue
            first = self.first_due(m.qid)
            if first is None:
                finished.append(m.qid)
                continue
            self._schedule(self._by_qid[m.qid], m, first)
            self.set_deadline(m.qid, m.start + max_age)
        return finished

    def flush(self, now, qids=None, domains=None) -> int:
        """Make every pending recipient due later than *now* due now (of *qids* only, when
        given; at one of *domains* only, when given), queueing its message at *now*; how
        many recipients.  A message whose start (options.start_time) is still after *now*
        is left scheduled: it was never tried."""
        if qids is None:
            msgs = list(self._walk())
        else:
            msgs = [self._slots[self._by_qid[q]] for q in qids if q in self._by_qid]
        dids = None
        if domains is not None:
            dids = {self._domains.ids[d] for d in domains if d in self._domains.ids}
            if not dids:
                return 0
        count = 0
        for m in msgs:
            if m.start > now:
                continue
            hit = False
            for i, s in enumerate(m.state):
                if s == PENDING and m.due[i] > now and (dids is None or m.domain[i] in dids):
                    m.due[i] = float(now)
                    hit = True
                    count += 1
            if hit:
                self._schedule(self._by_qid[m.qid], m, float(now))
        return count

    def step_back(self, now, by) -> int:
        """The wall clock was stepped back by *by* seconds: every pending due time later
        than *now* comes *by* earlier (not before *now*) and its message is queued at its
        earliest; how many recipients.  A recipient never tried whose message's start
        (options.start_time, after its arrival) is still ahead keeps it: that is an
        instant the client named, not one counted from the clock.  A message queued for
        later than *now* whatever its recipients' due times (a job a full delivery queue
        refused, a failed read: due again a moment on) comes *by* earlier too."""
        now, by = float(now), float(by)
        count = 0
        for m in list(self._walk()):
            scheduled = m.start > m.arrival and m.start > now
            first = None
            for i, s in enumerate(m.state):
                if s != PENDING or not m.due[i] > now or \
                        scheduled and not m.attempts[i] and m.due[i] == m.start:
                    continue
                m.due[i] = max(now, m.due[i] - by)
                count += 1
                if first is None or m.due[i] < first:
                    first = m.due[i]
            if not scheduled and m.hkey is not None and m.hkey[0] > now:
                queued = max(now, m.hkey[0] - by)
                if first is None or queued < first:
                    first = queued
            if first is not None:
                self._schedule(self._by_qid[m.qid], m, first)
        return count

    def _matcher(self, domains, campaign, pool):
        """(domain ids or None, campaign id or None, pool id or None); False: nothing can
        match (a named campaign or pool no message has)."""
        dids = None
        if domains:
            dids = {self._domains.ids[d] for d in domains if d in self._domains.ids}
        cid = pid = None
        if campaign:
            cid = self._campaigns.ids.get(campaign)
            if cid is None:
                return False
        if pool:
            pid = self._pools.ids.get(pool)
            if pid is None:
                return False
        return dids, cid, pid

    def _matching(self, m, how):
        dids, cid, pid = how
        if cid is not None and m.campaign != cid or pid is not None and m.pool != pid:
            return []
        return [i for i, s in enumerate(m.state)
                if s == PENDING and (dids is None or m.domain[i] in dids)]

    def select(self, domains=None, campaign="", pool="") -> list:
        """[(qid, pending recipients matching)] of every message with any: recipients at
        one of *domains* (none given: any) of messages of *campaign* and *pool* (each ""
        for any)."""
        how = self._matcher(domains, campaign, pool)
        if how is False:
            return []
        out = []
        for m in self._walk():
            n = len(self._matching(m, how))
            if n:
                out.append((m.qid, n))
        return out

    def matching(self, qid, domains=None, campaign="", pool=""):
        """The pending recipients of *qid* that :meth:`select` would count."""
        m = self._get(qid)
        if m is None:
            return None
        how = self._matcher(domains, campaign, pool)
        return [] if how is False else self._matching(m, how)

    def in_segment(self, seg) -> list:
        """The messages whose current record is in segment *seg*."""
        return [m.qid for m in self._walk() if m.seg == seg]

    def segment_counts(self) -> dict:
        """{segment: messages whose current record is there}."""
        out: dict = {}
        for m in self._walk():
            out[m.seg] = out.get(m.seg, 0) + 1
        return out

    def sorted_qids(self, limit=0, after="") -> list:
        """Queue ids in order (canonical ones by value, then the others as strings);
        only those after queue id *after* ("": from the first); at most *limit* (0: all)."""
        # (canonical ids are 20 upper-case hex digits: as strings in the order of their value)
        canon_after = not after or is_canonical(after)
        canon = sorted(q for q in self._by_qid if is_canonical(q) and canon_after
                       and q > after)
        odd = sorted(q for q in self._by_qid if not is_canonical(q)
                     and (canon_after or q > after))
        out = canon + odd
        return out[:limit] if limit > 0 else out

    def summary(self, now) -> dict:
        """Counts for ``mta queue``: see mta.spool.queries.summary, which shapes them."""
        pending = deferred = scheduled = scheduled_messages = 0
        next_attempt = next_start = oldest = None
        domains: dict = {}
        pools: dict = {}
        campaigns: dict = {}
        for m in self._walk():
            if oldest is None or m.arrival < oldest:
                oldest = m.arrival
            p = pools.setdefault(self._pools.values[m.pool], [0, 0])
            p[0] += 1
            p[1] += m.pending
            c = campaigns.setdefault(self._campaigns.values[m.campaign], [0, 0])
            c[0] += 1
            c[1] += m.pending
            later = m.start > now
            counted = False
            for i, st in enumerate(m.state):
                if st != PENDING:
                    continue
                pending += 1
                at = m.attempts[i]
                due = m.due[i]
                if later and not at and due > now:
                    scheduled += 1
                    if not counted:
                        counted = True
                        scheduled_messages += 1
                        if next_start is None or m.start < next_start:
                            next_start = m.start
                d = domains.setdefault(self._domains.values[m.domain[i]], [0, 0, None])
                d[0] += 1
                if at:
                    deferred += 1
                    d[1] += 1
                    if d[2] is None or due < d[2]:
                        d[2] = due
                    if next_attempt is None or due < next_attempt:
                        next_attempt = due
        return {"messages": len(self), "recipients": self.recipients,
                "bytes": self.body_bytes, "oldest_arrival": oldest, "pending": pending,
                "deferred": deferred, "next_attempt": next_attempt, "scheduled": scheduled,
                "scheduled_messages": scheduled_messages, "next_start": next_start,
                "domains": domains, "pools": pools, "campaigns": campaigns}

    def tables(self) -> tuple:
        """How many (domains, pools, campaigns, replies) are interned now."""
        return (len(self._domains), len(self._pools), len(self._campaigns),
                len(self._replies))

    def memory(self) -> dict:
        """Octets held by the native arrays, by structure (the twin holds none: {})."""
        return {}


class QidFifo:
    """Queue ids in the order they came, each at most once (a FIFO without repeats).

    The messages that wait for a free slot of one recipient domain
    (:class:`mta.spool.dispatch.Window`), are held back by an operator's
    suspension or wait for an absent delivery process (the shard): in a
    throttled burst most of the queue waits here.  The twin keeps a deque of
    (sequence, id) and a dict of each waiting id's sequence: an entry whose
    sequence is not its id's current one was discarded (or taken and added
    again) and is skipped.  The compiled one keeps 16 octets per id plus a
    hash slot instead.
    """

    __slots__ = ("_order", "_members", "_seq")

    def __init__(self):
        self._order = deque()
        self._members = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self):
        members = self._members
        return iter([q for s, q in self._order if members.get(q) == s])

    def __contains__(self, qid) -> bool:
        return type(qid) is str and qid in self._members

    def add(self, qid: str) -> bool:
        """Append *qid* unless it is already waiting; True if it was appended."""
        if type(qid) is not str:
            raise TypeError("a queue id is a str")
        if qid in self._members:
            return False
        self._seq += 1
        self._members[qid] = self._seq
        self._order.append((self._seq, qid))
        return True

    def discard(self, qid) -> bool:
        """*qid* no longer waits (if it did); True if it was waiting."""
        if type(qid) is not str or self._members.pop(qid, None) is None:
            return False
        if len(self._order) > 2 * len(self._members) + 16:     # drop the discarded entries
            members = self._members
            self._order = deque(e for e in self._order if members.get(e[1]) == e[0])
        return True

    def take(self, n: int) -> list:
        """The *n* (or fewer) ids that waited longest, no longer waiting."""
        order, members = self._order, self._members
        out = []
        while order and len(out) < n:
            s, qid = order.popleft()
            if members.get(qid) == s:
                del members[qid]
                out.append(qid)
        if not members:
            order.clear()
        return out

    def memory(self) -> dict:
        """Octets held by the native arrays (the twin holds none: {})."""
        return {}
