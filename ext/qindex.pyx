"""The spool shard's queue index (compiled).

The pure-Python twin ``mta._pure.qindex`` is the readable specification of
this module; both have the same public API and results.  The design, and
how each use of the shard's queue maps to it: docs/queue-index.md.

Why native: the queue as Python objects (an ``Entry`` with its msgspec
envelope, five per-recipient lists and a dict of params, plus heap tuples
and set members) measured ~1.3 KB of RSS per queued single-recipient
message (bench/RESULTS.md, "Restart with a large queue"); 10 million queued
recipients would need ~13 GB.  Here a message is one fixed-size C struct
(96 octets) in a growable array and each recipient a packed 20-octet struct
in a second one; a queue id is two integers; the due queues, the qid hash
table and the deadline lists hold 4-16 octet entries.  Nothing per message
or recipient is a Python object (the rare queue id that is not 20
upper-case hex digits is kept in a side table).  Measured figures:
bench/queue_memory.py.

Layout:

- ``Msg`` (slot-indexed): qid (hi 16 bits, lo 64 bits), record location,
  arrival and start, lane, interned pool and campaign, in-flight jobs, the
  recipient range (first, count) and pending count, its due-queue position
  and its deadline bucket links.  Free slots form a LIFO list.
- ``Rcpt`` arena: each message's recipients are consecutive; freed ranges
  go on free lists by size and are reused by a message of that size; when
  more than half the arena is free it is rebuilt (compact) in slot order.
- qid -> slot: open addressing, linear probing, backward-shift deletion
  (no tombstones), at most 70 % full.
- Due queues: one indexed binary heap per lane of (due, push sequence,
  slot); a message is in its lane's heap at most once (pushing an earlier
  time moves it up), and leaves it when removed: nothing stale piles up.
- Deadlines: per bucket key a circular doubly-linked list through the
  messages (O(1) add and remove); the bucket heads and the heap of keys are
  Python objects, one per bucket (about 1000).
- Interning (domain, pool, campaign, reply): value <-> id with a reference
  count per id; an id and its value go when the last user does.

Cost: a lookup is a parse of the 20 digits and ~1-2 probes; an insert
allocates nothing per message once the arrays have grown (amortised
realloc; big arrays grow with mremap, and untouched capacity is not
resident); per-recipient lists are made only when a caller asks for them.
"""

cimport cython
from cpython.unicode cimport PyUnicode_Check, PyUnicode_GET_LENGTH


cdef extern from "Python.h":
    int PyUnicode_KIND(object o)
    void* PyUnicode_DATA(object o)
    int PyUnicode_1BYTE_KIND
from libc.math cimport isnan
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy, memset

import heapq
from operator import index as _index

cdef enum:
    _PENDING = 0
    _LAST_STATE = 3             # mta.store's EXPIRED: a record's state is one of 0..this
    _LANES = 2
    _MAX_ATTEMPTS = 0xFFFF
    _MAX_OUT = 0xFFFF
    _SMALL = 64                 # recipient ranges up to this size have C free lists
    _COMPACT_MIN = 1 << 16      # recipient records: no arena rebuild below this size
    _BIT_LIVE = 1
    _BIT_ODD = 2                # qid is in the side table, not in lo/hi
    _BIT_DEADLINE = 4

PENDING = _PENDING
LANES = _LANES
MAX_ATTEMPTS = _MAX_ATTEMPTS
MAX_OUT = _MAX_OUT

cdef uint32_t NONE = 0xFFFFFFFF
cdef int64_t _KEY_MAX = 1 << 62
cdef double _KEY_MAX_F = <double>(1 << 62)
# a due time read from a record lies strictly within +-this (mta.store.MAX_TIME)
cdef double _DUE_MAX = 1e11


ctypedef struct Msg:
    uint64_t lo
    uint64_t offset
    double arrival
    double start
    int64_t dkey            # deadline bucket key (when _BIT_DEADLINE)
    uint32_t seg
    uint32_t meta_len
    uint32_t body_len
    uint32_t pool
    uint32_t campaign
    uint32_t rfirst         # first recipient in the arena (NONE: no recipients)
    uint32_t nrcpt
    uint32_t pending
    uint32_t hpos           # position in its lane's heap (NONE: not queued); free list link
    uint32_t dprev
    uint32_t dnext
    uint16_t hi
    uint16_t out
    uint8_t lane
    uint8_t bits


ctypedef packed struct Rcpt:
    double due
    uint32_t domain         # a free range's first record: the next free range
    uint32_t last
    uint16_t attempts
    uint8_t state
    uint8_t flags


ctypedef struct HEnt:
    double due
    uint32_t seq
    uint32_t slot


ctypedef struct Key:
    uint64_t lo
    uint16_t hi
    uint32_t slot


cdef inline uint64_t _mix(uint16_t hi, uint64_t lo) noexcept nogil:
    cdef uint64_t z = lo ^ (<uint64_t>hi * 0x9E3779B97F4A7C15ULL)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline bint _stays(uint64_t i, uint64_t j, uint64_t k) noexcept nogil:
    """Backward-shift deletion in a linear-probing table: when slot *i* empties, whether the
    entry in slot *j* (home slot *k*) stays, its home lying cyclically in (i, j]."""
    return (i <= j and i < k and k <= j) or (i > j and (i < k or k <= j))


cdef int _key_cmp(const void* a, const void* b) noexcept nogil:
    cdef const Key* x = <const Key*>a
    cdef const Key* y = <const Key*>b
    if x.hi != y.hi:
        return -1 if x.hi < y.hi else 1
    if x.lo != y.lo:
        return -1 if x.lo < y.lo else 1
    return 0


cdef void _sift_down(Key* keys, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    """Restore the max-heap (by _key_cmp) of *keys*[:n] below position *i*."""
    cdef Py_ssize_t c
    cdef Key k
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        if c + 1 < n and _key_cmp(&keys[c + 1], &keys[c]) > 0:
            c += 1
        if _key_cmp(&keys[c], &keys[i]) <= 0:
            return
        k = keys[i]
        keys[i] = keys[c]
        keys[c] = k
        i = c


cdef void* _grow(void* p, size_t* cap, size_t need, size_t item) except NULL:
    """realloc *p* to at least *need* items (x1.5 steps); MemoryError if it cannot."""
    cdef size_t c = cap[0]
    if need <= c and p != NULL:
        return p
    if c < 16:
        c = 16
    while c < need:
        c += c >> 1
    cdef void* q = realloc(p, c * item)
    if q == NULL:
        raise MemoryError()
    cap[0] = c
    return q


cdef inline uint64_t _hex8(const unsigned char* p, uint64_t* bad) noexcept:
    """The 32-bit number of the 8 hex digits at *p* (upper case); ORs into *bad* a
    non-zero value when one of the octets is no such digit.

    All eight at once in a 64-bit word (no branch per character: this runs about
    twenty times per message, at every look-up by queue id).  The octets are read
    first character highest, so the nibbles come out in order.  No step carries
    from one octet into the next: each octet stays below 0x100 throughout."""
    cdef uint64_t x = ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) |
                       (<uint64_t>p[2] << 40) | (<uint64_t>p[3] << 32) |
                       (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16) |
                       (<uint64_t>p[6] << 8) | <uint64_t>p[7])
    # 1 in the octets with bit 6 set: a valid one is then a letter A-F (0x41-0x46),
    # else a digit 0-9 (0x30-0x39)
    cdef uint64_t letter = (x >> 6) & 0x0101010101010101ULL
    # its value: the low nibble, +9 for a letter (at most 15 + 9 = 24 per octet)
    cdef uint64_t v = (x & 0x0F0F0F0F0F0F0F0FULL) + letter * 9
    bad[0] |= ((x & 0x8080808080808080ULL)                    # not ASCII
               # high nibble not 3 (digit) or 4 (letter)
               | ((x & 0xF0F0F0F0F0F0F0F0ULL) ^ (0x3030303030303030ULL + (letter << 4)))
               # value 16 or more (a letter past F)
               | ((v + 0x7070707070707070ULL) & 0x8080808080808080ULL)
               # value 10 or more exactly for the letters (not "@", nor ":" to "?")
               | (((v + 0x7676767676767676ULL) & 0x8080808080808080ULL) ^ (letter << 7)))
    # the eight nibbles together: octet pairs, then 16-bit pairs, then 32-bit halves
    v = (v | (v >> 4)) & 0x00FF00FF00FF00FFULL
    v = (v | (v >> 8)) & 0x0000FFFF0000FFFFULL
    return (v | (v >> 16)) & 0xFFFFFFFFULL


# The queue id _parse read last, and its number: the callers look the same id up
# several times in a row (an outcome, a dispatch), most often as the same string
# object.  Keyed by identity (a str is immutable, and this reference keeps it
# alive), so it gives exactly what parsing that string gives; one entry.
cdef object _last_qid = None
cdef uint16_t _last_hi = 0
cdef uint64_t _last_lo = 0


cdef bint _parse(object qid, uint16_t* hi, uint64_t* lo):
    """The 80-bit number of a canonical queue id (20 upper-case hex digits); False if not.

    (Read from the string's octets: a canonical id is ASCII, so one-octet kind;
    PyUnicode_READ_CHAR per character cost about three times as much.  Eight
    octets at a time (_hex8): the loop of one test per character was ~310
    instructions a call, and this runs at every look-up by queue id.)"""
    global _last_qid, _last_hi, _last_lo
    cdef const unsigned char* p
    cdef uint64_t a, b, c, bad = 0
    if qid is _last_qid:
        hi[0] = _last_hi
        lo[0] = _last_lo
        return True
    if not PyUnicode_Check(qid) or PyUnicode_GET_LENGTH(qid) != 20 or \
            PyUnicode_KIND(qid) != PyUnicode_1BYTE_KIND:
        return False    # (not a str: sorted_qids' *after* is the caller's, unchecked)
    p = <const unsigned char*>PyUnicode_DATA(qid)
    a = _hex8(p, &bad)          # characters 0-7
    b = _hex8(p + 8, &bad)      # 8-15
    c = _hex8(p + 12, &bad)     # 12-19 (16-19 used)
    if bad:
        return False
    # (the old entry let go first: its release may run code -- a str subclass's --
    # that must not find the new numbers under the old string)
    _last_qid = None
    hi[0] = _last_hi = <uint16_t>(a >> 16)
    lo[0] = _last_lo = ((a & 0xFFFF) << 48) | (b << 16) | (c & 0xFFFF)
    _last_qid = qid
    return True


cdef object _format(uint16_t hi, uint64_t lo):
    cdef char buf[20]
    cdef int i
    cdef const char* digits = b"0123456789ABCDEF"
    for i in range(15, -1, -1):
        buf[4 + i] = digits[lo & 15]
        lo >>= 4
    for i in range(3, -1, -1):
        buf[i] = digits[hi & 15]
        hi >>= 4
    return buf[:20].decode("ascii")


def is_canonical(qid) -> bool:
    """True for a queue id of mta.queueid's shape: 20 upper-case hex digits."""
    cdef uint16_t hi
    cdef uint64_t lo
    return type(qid) is str and _parse(qid, &hi, &lo)


cdef uint8_t _u8(str name, object v) except? 0xFF:
    # (operator.index: TypeError for what is no integer, as the pure twin's)
    cdef Py_ssize_t x = _index(v)
    if x < 0 or x > 0xFF:
        raise ValueError(f"{name} must be in 0..255")
    return <uint8_t>x


cdef uint16_t _attempts(object v) except? 0xFFFF:
    cdef int64_t x = _index(v)
    if x < 0:
        return 0
    if x > _MAX_ATTEMPTS:
        return _MAX_ATTEMPTS
    return <uint16_t>x


@cython.final
cdef class _Interner:
    """Values <-> small ids (0: none) with reference counts; an id is freed at zero."""

    cdef dict ids
    cdef list values
    cdef uint32_t* refs
    cdef size_t cap
    cdef list free

    def __cinit__(self):
        self.ids = {}
        self.values = [None]
        self.free = []
        self.cap = 0
        self.refs = <uint32_t*>_grow(NULL, &self.cap, 16, sizeof(uint32_t))
        self.refs[0] = 0

    def __dealloc__(self):
        free(self.refs)

    cdef uint32_t ref(self, object value) except? 0xFFFFFFFF:
        cdef uint32_t i
        if value is None:
            return 0
        got = self.ids.get(value)
        if got is None:
            if self.free:
                i = self.free.pop()
                self.values[i] = value
            else:
                i = len(self.values)
                self.refs = <uint32_t*>_grow(self.refs, &self.cap, i + 1, sizeof(uint32_t))
                self.values.append(value)
            self.refs[i] = 0
            self.ids[value] = i
        else:
            i = got
        self.refs[i] += 1
        return i

    cdef void unref(self, uint32_t i) except *:
        if i:
            self.refs[i] -= 1
            if not self.refs[i]:
                del self.ids[self.values[i]]
                self.values[i] = None
                self.free.append(i)

    cdef inline object value(self, uint32_t i):
        return self.values[i]

    cdef size_t size(self):
        return len(self.ids)


@cython.final
cdef class QueueIndex:
    """The queued messages of one shard, their recipients' progress and their schedule.

    *deadline_width*: seconds per deadline bucket (a message is reported by
    :meth:`passed` at most that late).
    """

    cdef Msg* msgs
    cdef size_t mcap
    cdef uint32_t mlen             # slots ever used (high-water mark)
    cdef uint32_t free_slot        # head of the free slot list (linked by hpos)
    cdef uint32_t count
    cdef uint32_t* table           # qid hash: slot + 1, 0 empty
    cdef uint64_t tmask
    cdef Rcpt* rc
    cdef size_t rcap
    cdef uint32_t rlen
    cdef uint64_t rfree            # recipient records in free ranges
    cdef uint32_t small_free[_SMALL + 1]
    cdef dict big_free             # size -> [first, ...] for ranges over _SMALL
    cdef HEnt* heaps[_LANES]
    cdef size_t hcap[_LANES]
    cdef uint32_t hlen[_LANES]
    cdef uint32_t seq
    cdef dict odd                  # qid str -> slot, for ids that are not canonical
    cdef dict oddq                 # slot -> qid str
    cdef readonly double width
    cdef dict bheads               # deadline bucket key -> head slot (NONE: empty)
    cdef list bkeys                # heap of the bucket keys
    cdef _Interner domains_, pools_, campaigns_, replies_
    cdef readonly uint64_t recipients
    cdef readonly uint64_t body_bytes
    cdef double _removed_due       # set by _heap_remove

    def __cinit__(self, double deadline_width):
        cdef int i
        if not deadline_width > 0:
            raise ValueError("deadline_width must be > 0")
        self.width = deadline_width
        self.msgs = NULL
        self.mcap = 0
        self.mlen = 0
        self.free_slot = NONE
        self.count = 0
        self.table = <uint32_t*>malloc(16 * sizeof(uint32_t))
        if self.table == NULL:
            raise MemoryError()
        memset(self.table, 0, 16 * sizeof(uint32_t))
        self.tmask = 15
        self.rc = NULL
        self.rcap = 0
        self.rlen = 0
        self.rfree = 0
        for i in range(_SMALL + 1):
            self.small_free[i] = NONE
        self.big_free = {}
        for i in range(_LANES):
            self.heaps[i] = NULL
            self.hcap[i] = 0
            self.hlen[i] = 0
        self.seq = 0
        self.odd = {}
        self.oddq = {}
        self.bheads = {}
        self.bkeys = []
        self.domains_ = _Interner()
        self.pools_ = _Interner()
        self.campaigns_ = _Interner()
        self.replies_ = _Interner()
        self.recipients = 0
        self.body_bytes = 0

    def __dealloc__(self):
        cdef int i
        free(self.msgs)
        free(self.table)
        free(self.rc)
        for i in range(_LANES):
            free(self.heaps[i])

    # ------------------------------------------------------------ the hash

    cdef inline uint32_t _find(self, object qid) except? 0xFFFFFFFE:
        """The slot of *qid*, NONE if it is not queued."""
        cdef uint16_t hi
        cdef uint64_t lo, i
        cdef uint32_t e
        cdef Msg* m
        if type(qid) is not str:
            return NONE
        if not _parse(qid, &hi, &lo):
            got = self.odd.get(qid)
            return NONE if got is None else <uint32_t>got
        i = _mix(hi, lo) & self.tmask
        while True:
            e = self.table[i]
            if e == 0:
                return NONE
            m = &self.msgs[e - 1]
            if m.lo == lo and m.hi == hi and not (m.bits & _BIT_ODD):
                return e - 1
            i = (i + 1) & self.tmask

    cdef void _table_put(self, uint32_t slot) noexcept:
        cdef Msg* m = &self.msgs[slot]
        cdef uint64_t i = _mix(m.hi, m.lo) & self.tmask
        while self.table[i]:
            i = (i + 1) & self.tmask
        self.table[i] = slot + 1

    cdef int _table_grow(self) except -1:
        cdef uint64_t n = (self.tmask + 1) * 2
        cdef uint32_t s
        cdef uint32_t* t = <uint32_t*>malloc(n * sizeof(uint32_t))
        if t == NULL:
            raise MemoryError()
        memset(t, 0, n * sizeof(uint32_t))
        free(self.table)
        self.table = t
        self.tmask = n - 1
        for s in range(self.mlen):
            if (self.msgs[s].bits & _BIT_LIVE) and not (self.msgs[s].bits & _BIT_ODD):
                self._table_put(s)
        return 0

    cdef void _table_del(self, uint32_t slot) noexcept:
        cdef Msg* m = &self.msgs[slot]
        cdef uint64_t mask = self.tmask
        cdef uint64_t i = _mix(m.hi, m.lo) & mask
        cdef uint64_t j, k
        while self.table[i] != slot + 1:
            i = (i + 1) & mask
        j = i
        while True:                 # backward shift: no tombstones
            j = (j + 1) & mask
            if self.table[j] == 0:
                break
            m = &self.msgs[self.table[j] - 1]
            k = _mix(m.hi, m.lo) & mask
            if _stays(i, j, k):
                continue
            self.table[i] = self.table[j]
            i = j
        self.table[i] = 0

    cdef object _qid(self, uint32_t slot):
        cdef Msg* m = &self.msgs[slot]
        if m.bits & _BIT_ODD:
            return self.oddq[slot]
        return _format(m.hi, m.lo)

    # ----------------------------------------------------- recipient arena

    cdef uint32_t _ralloc(self, uint32_t n) except? 0xFFFFFFFE:
        cdef uint32_t first
        if n == 0:
            return NONE
        if n <= _SMALL:
            first = self.small_free[n]
            if first != NONE:
                self.small_free[n] = self.rc[first].domain
                self.rfree -= n
                return first
        else:
            lst = self.big_free.get(n)
            if lst:
                self.rfree -= n
                return lst.pop()
        if <uint64_t>self.rlen + n >= NONE:
            raise MemoryError("too many recipients")
        self.rc = <Rcpt*>_grow(self.rc, &self.rcap, self.rlen + n, sizeof(Rcpt))
        first = self.rlen
        self.rlen += n
        return first

    cdef int _rfree(self, uint32_t first, uint32_t n) except -1:
        if n == 0:
            return 0
        if n <= _SMALL:
            self.rc[first].domain = self.small_free[n]
            self.small_free[n] = first
        else:
            self.big_free.setdefault(n, []).append(first)
        self.rfree += n
        if self.rlen >= _COMPACT_MIN and self.rfree * 2 > self.rlen:
            self._rcompact()
        return 0

    cdef int _rcompact(self) except -1:
        """Rebuild the recipient arena without its free ranges, in slot order."""
        cdef uint32_t s, at = 0, n
        cdef size_t cap = 0
        cdef Rcpt* new = <Rcpt*>_grow(NULL, &cap, self.rlen - self.rfree + 1, sizeof(Rcpt))
        cdef Msg* m
        for s in range(self.mlen):
            m = &self.msgs[s]
            if (m.bits & _BIT_LIVE) and m.nrcpt:
                memcpy(&new[at], &self.rc[m.rfirst], m.nrcpt * sizeof(Rcpt))
                m.rfirst = at
                at += m.nrcpt
        free(self.rc)
        self.rc = new
        self.rcap = cap
        self.rlen = at
        self.rfree = 0
        for n in range(_SMALL + 1):
            self.small_free[n] = NONE
        self.big_free = {}
        return 0

    # ------------------------------------------------------------ messages

    def __len__(self):
        return self.count

    def __contains__(self, qid):
        return self._find(qid) != NONE

    cdef inline Msg* _get(self, object qid) except? NULL:
        cdef uint32_t s = self._find(qid)
        return NULL if s == NONE else &self.msgs[s]

    def add(self, qid, seg, offset, meta_len, body_len, double arrival, double start,
            lane, pool, campaign, domains, state=None, attempts=None, due=None,
            flags=None):
        """Index a message record; True when it replaced the same queue id's (a copy).

        *domains*: each recipient's domain; *state*, *attempts*, *due*,
        *flags*: per recipient, None for a fresh message (pending, 0, *start*,
        0).  A replaced message keeps its jobs out, its place in the due
        queue and its deadline, and its last replies if it has as many
        recipients: none of them is on disk.
        """
        cdef uint32_t s, i, n, first
        cdef uint32_t c_seg, c_meta, c_body
        cdef uint64_t c_off
        cdef uint16_t hi = 0, out = 0
        cdef uint64_t lo = 0
        cdef bint odd, replaced, keep_last = False, had_dl = False
        cdef uint32_t hpos = NONE, dprev = NONE, dnext = NONE, old_first = NONE, old_n = 0
        cdef int64_t dkey = 0
        cdef uint8_t old_lane = 0
        cdef Msg* m
        cdef Rcpt* r
        if type(qid) is not str:
            raise TypeError("qid must be a str")
        if lane not in (0, 1):
            raise ValueError("lane must be 0 or 1")
        n = len(domains)
        for name, lst in (("state", state), ("attempts", attempts), ("due", due),
                          ("flags", flags)):
            if lst is not None and len(lst) != n:
                raise ValueError(f"{name} must have one value per recipient")
        st = None if state is None else [_u8("state", v) for v in state]
        at = None if attempts is None else [_attempts(v) for v in attempts]
        du = None if due is None else [<double>v for v in due]
        fl = None if flags is None else [_u8("flags", v) for v in flags]
        for d in domains:
            if type(d) is not str:
                raise TypeError("domains must be str")
        if pool is not None and type(pool) is not str or \
                campaign is not None and type(campaign) is not str:
            raise TypeError("pool and campaign must be str or None")
        c_seg, c_off, c_meta, c_body = seg, offset, meta_len, body_len
        odd = not _parse(qid, &hi, &lo)
        s = self._find(qid)
        replaced = s != NONE
        if replaced:
            m = &self.msgs[s]
            out, hpos, old_lane = m.out, m.hpos, m.lane
            had_dl = (m.bits & _BIT_DEADLINE) != 0
            dkey, dprev, dnext = m.dkey, m.dprev, m.dnext
            old_first, old_n = m.rfirst, m.nrcpt
            keep_last = old_n == n
            self._release(s, not keep_last)
        else:
            if self.count + 1 > (self.tmask + 1) * 7 // 10:
                self._table_grow()
            if self.free_slot != NONE:
                s = self.free_slot
                self.free_slot = self.msgs[s].hpos
            else:
                if self.mlen == NONE - 1:
                    raise MemoryError("too many messages")
                self.msgs = <Msg*>_grow(self.msgs, &self.mcap, self.mlen + 1, sizeof(Msg))
                s = self.mlen
                self.mlen += 1
        # the recipients: in place when a copy has as many, else a new range
        if keep_last and n:
            first = old_first
        else:
            if replaced:
                self.msgs[s].nrcpt = 0      # (not copied if the arena is rebuilt now)
                self._rfree(old_first, old_n)
            first = self._ralloc(n)
        m = &self.msgs[s]
        m.lo, m.hi = lo, hi
        m.seg, m.offset, m.meta_len, m.body_len = c_seg, c_off, c_meta, c_body
        m.arrival, m.start, m.lane = arrival, start, <uint8_t>lane
        m.pool = self.pools_.ref(pool or None)
        m.campaign = self.campaigns_.ref(campaign or None)
        m.out = out
        m.rfirst, m.nrcpt = first, n
        m.pending = 0
        m.hpos, m.dprev, m.dnext, m.dkey = NONE, NONE, NONE, 0
        m.bits = _BIT_LIVE | (_BIT_ODD if odd else 0)
        for i in range(n):
            r = &self.rc[first + i]
            r.state = _PENDING if st is None else <uint8_t>st[i]
            r.attempts = 0 if at is None else <uint16_t>at[i]
            r.due = start if du is None else <double>du[i]
            r.flags = 0 if fl is None else <uint8_t>fl[i]
            r.domain = self.domains_.ref(domains[i])
            if not keep_last:
                r.last = 0
            if r.state == _PENDING:
                m.pending += 1
        self.recipients += n
        self.body_bytes += c_body
        if not replaced:
            if odd:
                self.odd[qid] = s
                self.oddq[s] = qid
            else:
                self._table_put(s)
            self.count += 1
            return False
        if hpos != NONE:
            if m.lane == old_lane:
                m.hpos = hpos
            else:                                   # (moves to its new lane's queue)
                self._heap_remove(old_lane, hpos)
                self._schedule(s, self._removed_due)
        if had_dl:
            m.bits |= _BIT_DEADLINE
            m.dkey, m.dprev, m.dnext = dkey, dprev, dnext
        return True

    cdef int _release(self, uint32_t s, bint drop_last) except -1:
        """Drop message *s*'s references to interned values and its counts."""
        cdef Msg* m = &self.msgs[s]
        cdef Rcpt* r
        cdef uint32_t i
        for i in range(m.nrcpt):
            r = &self.rc[m.rfirst + i]
            self.domains_.unref(r.domain)
            if drop_last:
                self.replies_.unref(r.last)
        self.pools_.unref(m.pool)
        self.campaigns_.unref(m.campaign)
        self.recipients -= m.nrcpt
        self.body_bytes -= m.body_len
        return 0

    def remove(self, qid):
        """Forget a message (finished or deleted): its recipients, schedule and deadline."""
        cdef uint32_t s = self._find(qid)
        cdef uint32_t first, n
        cdef Msg* m
        if s == NONE:
            return False
        m = &self.msgs[s]
        self._release(s, True)
        if m.hpos != NONE:
            self._heap_remove(m.lane, m.hpos)
        if m.bits & _BIT_DEADLINE:
            self._dl_unlink(s)
        if m.bits & _BIT_ODD:
            del self.odd[qid]
            del self.oddq[s]
        else:
            self._table_del(s)
        first, n = m.rfirst, m.nrcpt
        m.bits = 0
        m.nrcpt = 0
        m.hpos = self.free_slot
        self._rfree(first, n)           # (may rebuild the arena: m is no longer in it)
        self.free_slot = s
        self.count -= 1
        return True

    def info(self, qid):
        """(seg, offset, meta_len, body_len, arrival, start, lane, pool, campaign, out,
        recipients, pending) of a message; None if it is not queued."""
        cdef Msg* m = self._get(qid)
        if m == NULL:
            return None
        return (m.seg, m.offset, m.meta_len, m.body_len, m.arrival, m.start, m.lane,
                self.pools_.value(m.pool), self.campaigns_.value(m.campaign), m.out,
                m.nrcpt, m.pending)

    def location(self, qid):
        """(seg, offset, meta_len, body_len): read meta_len + body_len octets at offset."""
        cdef Msg* m = self._get(qid)
        if m == NULL:
            return None
        return (m.seg, m.offset, m.meta_len, m.body_len)

    def progress(self, qid):
        """([state], [attempts], [due], [flags]) of a message's recipients (for a copy)."""
        cdef Msg* m = self._get(qid)
        cdef Rcpt* r
        cdef uint32_t i
        if m == NULL:
            return None
        st, at, du, fl = [], [], [], []
        for i in range(m.nrcpt):
            r = &self.rc[m.rfirst + i]
            st.append(r.state)
            at.append(r.attempts)
            du.append(r.due)
            fl.append(r.flags)
        return st, at, du, fl

    def domains(self, qid):
        """Each recipient's domain (the interned strings)."""
        cdef Msg* m = self._get(qid)
        cdef uint32_t i
        if m == NULL:
            return None
        return [self.domains_.value(self.rc[m.rfirst + i].domain) for i in range(m.nrcpt)]

    cdef Rcpt* _rcpt(self, object qid, Py_ssize_t idx) except? NULL:
        cdef Msg* m = self._get(qid)
        if m == NULL or idx < 0 or idx >= m.nrcpt:
            return NULL
        return &self.rc[m.rfirst + idx]

    def recipient(self, qid, Py_ssize_t idx):
        """(state, attempts, due, flags, domain, last reply) of recipient *idx*, or None."""
        cdef Rcpt* r = self._rcpt(qid, idx)
        if r == NULL:
            return None
        return (r.state, r.attempts, r.due, r.flags, self.domains_.value(r.domain),
                self.replies_.value(r.last))

    # ---------------------------------------------------------- recipients

    def update(self, qid, Py_ssize_t idx, state, attempts, double due, flags=None):
        """Set recipient *idx*'s progress (*flags* None: unchanged); False if no such one."""
        cdef uint32_t s = self._find(qid)
        cdef Msg* m
        cdef Rcpt* r
        cdef uint8_t c_state, c_flags = 0
        cdef uint16_t c_attempts
        if s == NONE:
            return False
        m = &self.msgs[s]
        if idx < 0 or idx >= m.nrcpt:
            return False
        # every value converted before anything changes (a bad one leaves the recipient as
        # it was, in both twins)
        c_state = _u8("state", state)
        if c_state > _LAST_STATE:
            raise ValueError("state must be in 0..3")
        if flags is not None:
            c_flags = _u8("flags", flags)
        c_attempts = _attempts(attempts)
        if not -_DUE_MAX < due < _DUE_MAX:
            # (a NaN or an infinity would stall or stop the shard's due queue)
            raise ValueError("due must be a time")
        r = &self.rc[m.rfirst + idx]
        if flags is not None:
            r.flags = c_flags
        if r.state == _PENDING:
            m.pending -= 1
        if c_state == _PENDING:
            m.pending += 1
        r.state = c_state
        r.attempts = c_attempts
        r.due = due
        return True

    def apply(self, qid, updates):
        """Apply a REC_RCPT record's [[idx, state, attempts, due(, flags)], ...] (bad
        indexes and malformed updates ignored); how many applied."""
        cdef int n = 0
        cdef tuple a
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

    def set_due(self, qid, Py_ssize_t idx, double due):
        """Recipient *idx*'s next attempt is at *due* (in memory: a requeue, a flush)."""
        cdef Rcpt* r = self._rcpt(qid, idx)
        if r == NULL:
            return False
        r.due = due
        return True

    def set_last(self, qid, Py_ssize_t idx, reply):
        """Remember recipient *idx*'s last temporary reply (a hashable value; None: none)."""
        cdef Rcpt* r = self._rcpt(qid, idx)
        cdef uint32_t new
        if r == NULL:
            return False
        new = self.replies_.ref(reply)
        self.replies_.unref(r.last)
        r.last = new
        return True

    def last(self, qid, Py_ssize_t idx):
        cdef Rcpt* r = self._rcpt(qid, idx)
        return None if r == NULL else self.replies_.value(r.last)

    def add_out(self, qid, int64_t delta):
        """Change the count of delivery jobs out (kept in 0..MAX_OUT); the new count, -1
        if the message is not queued."""
        cdef Msg* m = self._get(qid)
        cdef int64_t v
        if m == NULL:
            return -1
        v = m.out + delta
        m.out = <uint16_t>(0 if v < 0 else _MAX_OUT if v > _MAX_OUT else v)
        return m.out

    def pending_idxs(self, qid):
        cdef Msg* m = self._get(qid)
        cdef uint32_t i
        if m == NULL:
            return None
        return [i for i in range(m.nrcpt) if self.rc[m.rfirst + i].state == _PENDING]

    cdef bint _first_due(self, Msg* m, double* out) noexcept:
        cdef uint32_t i
        cdef bint got = False
        cdef double best = 0, d
        cdef Rcpt* r
        for i in range(m.nrcpt):
            r = &self.rc[m.rfirst + i]
            if r.state == _PENDING:
                d = r.due
                if not got or d < best:
                    best = d
                    got = True
        out[0] = best
        return got

    def first_due(self, qid):
        """The earliest due time of the pending recipients; None if none is pending."""
        cdef Msg* m = self._get(qid)
        cdef double d
        if m == NULL or not self._first_due(m, &d):
            return None
        return d

    def ready(self, qid, double now):
        """([pending recipients due by *now*], earliest due time of the others or None)."""
        cdef Msg* m = self._get(qid)
        cdef uint32_t i
        cdef Rcpt* r
        cdef bint got = False
        cdef double later = 0
        if m == NULL:
            return None
        idxs = []
        for i in range(m.nrcpt):
            r = &self.rc[m.rfirst + i]
            if r.state != _PENDING:
                continue
            if r.due <= now:
                idxs.append(i)
            elif not got or r.due < later:
                later = r.due
                got = True
        return idxs, (later if got else None)

    # ------------------------------------------------------------ schedule

    cdef inline bint _less(self, HEnt* a, HEnt* b) noexcept:
        return a.due < b.due or (a.due == b.due and a.seq < b.seq)

    cdef void _sift_up(self, int lane, uint32_t i) noexcept:
        cdef HEnt* h = self.heaps[lane]
        cdef HEnt e = h[i]
        cdef uint32_t p
        while i > 0:
            p = (i - 1) >> 1
            if not self._less(&e, &h[p]):
                break
            h[i] = h[p]
            self.msgs[h[i].slot].hpos = i
            i = p
        h[i] = e
        self.msgs[e.slot].hpos = i

    cdef void _sift_down(self, int lane, uint32_t i) noexcept:
        cdef HEnt* h = self.heaps[lane]
        cdef uint32_t n = self.hlen[lane]
        cdef HEnt e = h[i]
        cdef uint32_t c
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and self._less(&h[c + 1], &h[c]):
                c += 1
            if not self._less(&h[c], &e):
                break
            h[i] = h[c]
            self.msgs[h[i].slot].hpos = i
            i = c
        h[i] = e
        self.msgs[e.slot].hpos = i

    cdef void _heap_remove(self, int lane, uint32_t i) noexcept:
        """Take entry *i* out of *lane*'s heap (its due time is left in _removed_due)."""
        cdef HEnt* h = self.heaps[lane]
        self._removed_due = h[i].due
        self.msgs[h[i].slot].hpos = NONE
        self.hlen[lane] -= 1
        if i == self.hlen[lane]:
            return
        h[i] = h[self.hlen[lane]]
        self.msgs[h[i].slot].hpos = i
        if i > 0 and self._less(&h[i], &h[(i - 1) >> 1]):
            self._sift_up(lane, i)
        else:
            self._sift_down(lane, i)

    cdef int _schedule(self, uint32_t s, double due) except -1:
        cdef Msg* m = &self.msgs[s]
        cdef int lane = m.lane
        cdef HEnt* e
        if isnan(due):
            due = 0.0                   # (a NaN read from disk: due at once)
        if m.hpos == NONE:
            self.heaps[lane] = <HEnt*>_grow(self.heaps[lane], &self.hcap[lane],
                                            self.hlen[lane] + 1, sizeof(HEnt))
            e = &self.heaps[lane][self.hlen[lane]]
            e.due, e.seq, e.slot = due, self.seq, s
            self.hlen[lane] += 1
            self.seq += 1
            self._sift_up(lane, self.hlen[lane] - 1)
            return 0
        e = &self.heaps[lane][m.hpos]
        if not due < e.due:
            return 0
        e.due, e.seq = due, self.seq
        self.seq += 1
        self._sift_up(lane, m.hpos)
        return 0

    def push(self, qid, double due):
        """Make the message due at *due* in its lane, unless it is due earlier already."""
        cdef uint32_t s = self._find(qid)
        if s == NONE:
            return False
        self._schedule(s, due)
        return True

    def scheduled(self, qid):
        """When the message is due in its lane's queue; None if it is not in it."""
        cdef Msg* m = self._get(qid)
        if m == NULL or m.hpos == NONE:
            return None
        return self.heaps[m.lane][m.hpos].due

    def pop_due(self, int lane, double now, Py_ssize_t limit):
        """Take out up to *limit* messages of *lane* due by *now*, earliest first."""
        cdef HEnt* h
        cdef uint32_t s
        if lane < 0 or lane >= _LANES:
            raise IndexError("no such lane")
        out = []
        while len(out) < limit and self.hlen[lane]:
            h = self.heaps[lane]
            if not h[0].due <= now:
                break
            s = h[0].slot
            self._heap_remove(lane, 0)
            out.append(self._qid(s))
        return out

    def next_due(self, lanes=None):
        """The earliest due time in *lanes* (default: every lane); None if they are empty."""
        cdef int lane
        cdef bint got = False
        cdef double best = 0
        for lane in (range(_LANES) if lanes is None else lanes):
            if lane < 0 or lane >= _LANES:
                raise IndexError("no such lane")
            if self.hlen[lane] and (not got or self.heaps[lane][0].due < best):
                best = self.heaps[lane][0].due
                got = True
        return best if got else None

    def queued(self, int lane):
        """How many messages wait in *lane*'s due queue."""
        if lane < 0 or lane >= _LANES:
            raise IndexError("no such lane")
        return self.hlen[lane]

    # ----------------------------------------------------------- deadlines

    cdef int64_t _key(self, double t) noexcept:
        cdef double q = t / self.width
        if not q < _KEY_MAX_F:
            return _KEY_MAX
        if q <= -_KEY_MAX_F:
            return -_KEY_MAX
        return <int64_t>q + 1           # every deadline in bucket k is < k * width

    cdef int _dl_unlink(self, uint32_t s) except -1:
        cdef Msg* m = &self.msgs[s]
        cdef uint32_t p, n
        key = m.dkey
        if m.dnext == s:
            self.bheads[key] = NONE
        else:
            p, n = m.dprev, m.dnext
            self.msgs[p].dnext = n
            self.msgs[n].dprev = p
            if self.bheads[key] == s:
                self.bheads[key] = n
        m.bits &= ~_BIT_DEADLINE
        return 0

    def set_deadline(self, qid, double t):
        """File the message under deadline *t* (moving it if it had one)."""
        cdef uint32_t s = self._find(qid)
        cdef uint32_t h, tail
        cdef Msg* m
        if s == NONE:
            return False
        m = &self.msgs[s]
        if m.bits & _BIT_DEADLINE:
            self._dl_unlink(s)
        key = self._key(t)
        got = self.bheads.get(key)
        if got is None:
            heapq.heappush(self.bkeys, key)
            h = NONE
        else:
            h = got
        m.dkey = key
        m.bits |= _BIT_DEADLINE
        if h == NONE:
            m.dprev = m.dnext = s
            self.bheads[key] = s
        else:
            tail = self.msgs[h].dprev
            self.msgs[tail].dnext = s
            m.dprev = tail
            m.dnext = h
            self.msgs[h].dprev = s
        return True

    def clear_deadline(self, qid):
        cdef uint32_t s = self._find(qid)
        if s == NONE or not (self.msgs[s].bits & _BIT_DEADLINE):
            return False
        self._dl_unlink(s)
        return True

    def passed(self, double now):
        """Take out every message whose deadline bucket has passed by *now*."""
        cdef uint32_t h, s, nxt
        cdef int64_t key
        out = []
        keys = self.bkeys
        while keys and <double>(<int64_t>keys[0]) * self.width <= now:
            key = heapq.heappop(keys)
            h = self.bheads.pop(key)
            if h == NONE:
                continue
            s = h
            while True:
                nxt = self.msgs[s].dnext
                self.msgs[s].bits &= ~_BIT_DEADLINE
                out.append(self._qid(s))
                if nxt == h:
                    break
                s = nxt
        return out

    # ---------------------------------------------------------- bulk walks

    def schedule_recovered(self, uint32_t upto_seg, double max_age):
        """After recovery: queue each message of segments <= *upto_seg* at its earliest
        pending due time with deadline start + *max_age*; return those with none pending."""
        cdef uint32_t s
        cdef Msg* m
        cdef double first
        finished = []
        for s in range(self.mlen):
            m = &self.msgs[s]
            if not (m.bits & _BIT_LIVE) or m.seg > upto_seg:
                continue
            if not self._first_due(m, &first):
                finished.append(self._qid(s))
                continue
            self._schedule(s, first)
            self.set_deadline(self._qid(s), m.start + max_age)
        return finished

    def flush(self, double now, qids=None, domains=None):
        """Make every pending recipient due later than *now* due now (of *qids* only, when
        given; at one of *domains* only, when given), queueing its message at *now*; how
        many recipients.  A message whose start (options.start_time) is still after *now*
        is left scheduled: it was never tried."""
        cdef uint32_t s
        cdef Py_ssize_t count = 0
        dids = None
        if domains is not None:
            dids = bytearray(len(self.domains_.values))
            for d in domains:
                got = self.domains_.ids.get(d)
                if got is not None:
                    dids[got] = 1
            if not any(dids):
                return 0
        if qids is None:
            for s in range(self.mlen):
                if self.msgs[s].bits & _BIT_LIVE:
                    count += self._flush_one(s, now, dids)
        else:
            slots = []
            for q in qids:
                s = self._find(q)
                if s != NONE:
                    slots.append(s)
            for s in slots:
                count += self._flush_one(s, now, dids)
        return count

    cdef Py_ssize_t _flush_one(self, uint32_t s, double now, object dids) except -1:
        cdef Msg* m = &self.msgs[s]
        cdef Rcpt* r
        cdef uint32_t i
        cdef Py_ssize_t n = 0
        cdef const unsigned char[:] dmap
        cdef bint any_domain = dids is None
        if m.start > now:
            return 0                    # scheduled (start_time ahead): never tried yet
        if not any_domain:
            dmap = dids
        for i in range(m.nrcpt):
            r = &self.rc[m.rfirst + i]
            if r.state == _PENDING and r.due > now and (any_domain or dmap[r.domain]):
                r.due = now
                n += 1
        if n:
            self._schedule(s, now)
        return n

    def step_back(self, double now, double by):
        """The wall clock was stepped back by *by* seconds: every pending due time later
        than *now* comes *by* earlier (not before *now*) and its message is queued at its
        earliest; how many recipients.  A recipient never tried whose message's start
        (options.start_time, after its arrival) is still ahead keeps it: that is an
        instant the client named, not one counted from the clock.  A message queued for
        later than *now* whatever its recipients' due times (a job a full delivery queue
        refused, a failed read: due again a moment on) comes *by* earlier too."""
        cdef uint32_t s, i
        cdef Msg* m
        cdef Rcpt* r
        cdef bint scheduled, got
        cdef double first, queued
        cdef Py_ssize_t count = 0
        for s in range(self.mlen):
            m = &self.msgs[s]
            if not (m.bits & _BIT_LIVE):
                continue
            scheduled = m.start > m.arrival and m.start > now
            got = False
            first = 0
            for i in range(m.nrcpt):
                r = &self.rc[m.rfirst + i]
                if r.state != _PENDING or not r.due > now or \
                        (scheduled and r.attempts == 0 and r.due == m.start):
                    continue
                r.due = r.due - by if r.due - by > now else now
                count += 1
                if not got or r.due < first:
                    first = r.due
                    got = True
            if not scheduled and m.hpos != NONE:
                queued = self.heaps[m.lane][m.hpos].due
                if queued > now:
                    queued = queued - by if queued - by > now else now
                    if not got or queued < first:
                        first = queued
                        got = True
            if got:
                self._schedule(s, first)
        return count

    cdef object _matcher(self, domains, campaign, pool):
        """(bytearray over domain ids or None, campaign id, pool id; 0: any); None when
        nothing can match (a named campaign or pool no message has)."""
        cdef uint32_t cid = 0, pid = 0
        dids = None
        if domains:
            dids = bytearray(len(self.domains_.values))
            for d in domains:
                got = self.domains_.ids.get(d)
                if got is not None:
                    dids[got] = 1
        if campaign:
            got = self.campaigns_.ids.get(campaign)
            if got is None:
                return None
            cid = got
        if pool:
            got = self.pools_.ids.get(pool)
            if got is None:
                return None
            pid = got
        return dids, cid, pid

    cdef list _matching(self, uint32_t s, object how, bint want_list, Py_ssize_t* count):
        cdef Msg* m = &self.msgs[s]
        cdef const unsigned char[:] dmap
        cdef bint any_domain
        cdef uint32_t cid, pid, i
        cdef Rcpt* r
        cdef Py_ssize_t n = 0
        dids, cid, pid = how
        out = [] if want_list else None
        count[0] = 0
        if cid and m.campaign != cid or pid and m.pool != pid:
            return out
        any_domain = dids is None
        if not any_domain:
            dmap = dids
        for i in range(m.nrcpt):
            r = &self.rc[m.rfirst + i]
            if r.state == _PENDING and (any_domain or dmap[r.domain]):
                n += 1
                if want_list:
                    out.append(i)
        count[0] = n
        return out

    def select(self, domains=None, campaign="", pool=""):
        """[(qid, pending recipients matching)] of every message with any: recipients at
        one of *domains* (none given: any) of messages of *campaign* and *pool* (each ""
        for any)."""
        cdef uint32_t s
        cdef Py_ssize_t n
        how = self._matcher(domains, campaign, pool)
        out = []
        if how is None:
            return out
        for s in range(self.mlen):
            if self.msgs[s].bits & _BIT_LIVE:
                self._matching(s, how, False, &n)
                if n:
                    out.append((self._qid(s), n))
        return out

    def matching(self, qid, domains=None, campaign="", pool=""):
        """The pending recipients of *qid* that :meth:`select` would count."""
        cdef uint32_t s = self._find(qid)
        cdef Py_ssize_t n
        if s == NONE:
            return None
        how = self._matcher(domains, campaign, pool)
        if how is None:
            return []
        return self._matching(s, how, True, &n)

    def in_segment(self, uint32_t seg):
        """The messages whose current record is in segment *seg*."""
        cdef uint32_t s
        return [self._qid(s) for s in range(self.mlen)
                if (self.msgs[s].bits & _BIT_LIVE) and self.msgs[s].seg == seg]

    def segment_counts(self):
        """{segment: messages whose current record is there}."""
        cdef uint32_t s
        out = {}
        for s in range(self.mlen):
            if self.msgs[s].bits & _BIT_LIVE:
                k = self.msgs[s].seg
                out[k] = out.get(k, 0) + 1
        return out

    def sorted_qids(self, Py_ssize_t limit=0, after=""):
        """Queue ids in order (canonical ones by value, then the others as strings);
        only those after queue id *after* ("": from the first); at most *limit* (0: all).

        With a limit the work is one walk of the index and a sort of *limit* ids (the
        smallest kept in a heap), not a sort of the whole queue: a page of a long
        queue (``mta queue list``) costs the shard little."""
        cdef uint32_t s, i
        cdef Py_ssize_t n = 0, cap, j
        cdef uint16_t ahi = 0
        cdef uint64_t alo = 0
        cdef bint canon_after = False, odd_after = False
        cdef Key k
        if after:
            if _parse(after, &ahi, &alo):
                canon_after = True
            else:
                odd_after = True        # every canonical id comes before it
        if limit <= 0 or limit > self.count:
            limit = self.count
        cap = limit
        cdef Key* keys = <Key*>malloc((cap + 1) * sizeof(Key))
        if keys == NULL:
            raise MemoryError()
        try:
            for s in range(self.mlen if not odd_after else 0):
                if not (self.msgs[s].bits & _BIT_LIVE) or (self.msgs[s].bits & _BIT_ODD):
                    continue
                k.lo, k.hi, k.slot = self.msgs[s].lo, self.msgs[s].hi, s
                if canon_after and (k.hi < ahi or (k.hi == ahi and k.lo <= alo)):
                    continue
                if n < cap:
                    keys[n] = k
                    n += 1
                    if n == cap:            # full: a max-heap from now on
                        for j in range(cap // 2 - 1, -1, -1):
                            _sift_down(keys, cap, j)
                elif cap and _key_cmp(&k, &keys[0]) < 0:
                    keys[0] = k
                    _sift_down(keys, cap, 0)
            qsort(keys, n, sizeof(Key), _key_cmp)
            out = [_format(keys[i].hi, keys[i].lo) for i in range(<uint32_t>n)]
        finally:
            free(keys)
        if len(out) < limit:
            odd = sorted(q for q in self.odd if not odd_after or q > after)
            out += odd[:limit - len(out)]
        return out

    def summary(self, double now):
        """Counts for ``mta queue``: see mta.spool.queries.summary, which shapes them."""
        cdef uint32_t s, i
        cdef Msg* m
        cdef Rcpt* r
        cdef Py_ssize_t pending = 0, deferred = 0, scheduled = 0, scheduled_messages = 0
        cdef bint later, counted, got_attempt = False, got_start = False, got_oldest = False
        cdef double next_attempt = 0, next_start = 0, oldest = 0
        cdef size_t nd = len(self.domains_.values), npl = len(self.pools_.values)
        cdef size_t nc = len(self.campaigns_.values)
        # per domain: recipients, deferred, next attempt (+ whether set); pools, campaigns:
        # messages, recipients
        cdef uint64_t* dcount = <uint64_t*>malloc((2 * nd + 2 * npl + 2 * nc + 1)
                                                 * sizeof(uint64_t))
        cdef double* dnext = <double*>malloc((nd + 1) * sizeof(double))
        cdef uint8_t* dhas = <uint8_t*>malloc(nd + 1)
        cdef uint64_t* pcount
        cdef uint64_t* ccount
        if dcount == NULL or dnext == NULL or dhas == NULL:
            free(dcount)
            free(dnext)
            free(dhas)
            raise MemoryError()
        try:
            memset(dcount, 0, (2 * nd + 2 * npl + 2 * nc + 1) * sizeof(uint64_t))
            memset(dhas, 0, nd + 1)
            pcount = dcount + 2 * nd
            ccount = pcount + 2 * npl
            for s in range(self.mlen):
                m = &self.msgs[s]
                if not (m.bits & _BIT_LIVE):
                    continue
                if not got_oldest or m.arrival < oldest:
                    oldest = m.arrival
                    got_oldest = True
                pcount[2 * m.pool] += 1
                pcount[2 * m.pool + 1] += m.pending
                ccount[2 * m.campaign] += 1
                ccount[2 * m.campaign + 1] += m.pending
                later = m.start > now
                counted = False
                for i in range(m.nrcpt):
                    r = &self.rc[m.rfirst + i]
                    if r.state != _PENDING:
                        continue
                    pending += 1
                    if later and not r.attempts and r.due > now:
                        scheduled += 1
                        if not counted:
                            counted = True
                            scheduled_messages += 1
                            if not got_start or m.start < next_start:
                                next_start = m.start
                                got_start = True
                    dcount[2 * r.domain] += 1
                    if r.attempts:
                        deferred += 1
                        dcount[2 * r.domain + 1] += 1
                        if not dhas[r.domain] or r.due < dnext[r.domain]:
                            dnext[r.domain] = r.due
                            dhas[r.domain] = 1
                        if not got_attempt or r.due < next_attempt:
                            next_attempt = r.due
                            got_attempt = True
            domains = {}
            for i in range(nd):
                if dcount[2 * i]:
                    domains[self.domains_.value(i)] = [
                        dcount[2 * i], dcount[2 * i + 1], dnext[i] if dhas[i] else None]
            pools = {self.pools_.value(i): [pcount[2 * i], pcount[2 * i + 1]]
                     for i in range(npl) if pcount[2 * i]}
            campaigns = {self.campaigns_.value(i): [ccount[2 * i], ccount[2 * i + 1]]
                         for i in range(nc) if ccount[2 * i]}
        finally:
            free(dcount)
            free(dnext)
            free(dhas)
        return {"messages": self.count, "recipients": self.recipients,
                "bytes": self.body_bytes, "oldest_arrival": oldest if got_oldest else None,
                "pending": pending, "deferred": deferred,
                "next_attempt": next_attempt if got_attempt else None,
                "scheduled": scheduled, "scheduled_messages": scheduled_messages,
                "next_start": next_start if got_start else None,
                "domains": domains, "pools": pools, "campaigns": campaigns}

    def tables(self):
        """How many (domains, pools, campaigns, replies) are interned now."""
        return (self.domains_.size(), self.pools_.size(), self.campaigns_.size(),
                self.replies_.size())

    def memory(self):
        """Octets held by the native arrays, by structure (allocated, not all resident)."""
        cdef int i
        cdef size_t due = 0
        for i in range(_LANES):
            due += self.hcap[i] * sizeof(HEnt)
        return {"messages": self.mcap * sizeof(Msg), "recipients": self.rcap * sizeof(Rcpt),
                "hash": (self.tmask + 1) * sizeof(uint32_t), "due": due,
                "sizes": (sizeof(Msg), sizeof(Rcpt), sizeof(HEnt))}


# ------------------------------------------------------------ QidFifo

cdef enum:
    _FIFO_MIN = 16              # ring entries at least (a power of two)
    _F_ODD = 1                  # not canonical: the id is in the side table, lo is its hash
    _F_DEAD = 2                 # discarded: skipped when taken, dropped at the next rebuild


ctypedef struct FEnt:
    uint64_t lo
    uint16_t hi
    uint8_t bits                # _F_ODD, _F_DEAD


@cython.final
cdef class QidFifo:
    """Queue ids in the order they came, each at most once (a FIFO without repeats).

    The messages that wait for a free slot of one recipient domain
    (:class:`mta.spool.dispatch.Window`), are held back by an operator's
    suspension, or wait for an absent delivery process (the shard).  Why
    native: in a throttled burst most of the queue waits here, and as a deque
    of strings plus a set it cost ~120 octets per message beside the index's
    ~140 (measured in the 5 million burst: 319 octets per queued message in
    the shard).  Here an id is a 16-octet entry of a ring (power-of-two
    capacity) plus an open-addressing hash of ring positions (4 octets, twice
    the ring's capacity: at most half full), so ~24-48 octets each while it
    fills (up to 8 times that as it drains, until it shrinks).
    :meth:`discard` marks an entry dead (out of the hash at once; its ring
    entry goes when taken past or at the next rebuild, which keeps only live
    ones).  The ring is rebuilt when full (to twice the live ids, at least:
    growing, or compacting dead entries) and when the live ids fall to an
    eighth of it (to a quarter to half full).
    """

    cdef FEnt* ring
    cdef uint64_t rmask             # ring capacity - 1
    cdef uint64_t head              # sequence number of the oldest entry
    cdef uint64_t tail              # sequence number the next entry gets
    cdef uint64_t live              # entries not discarded
    cdef uint32_t* table            # ring position + 1 of each live entry; 0 empty
    cdef uint64_t tmask
    cdef dict odd                   # ring position -> qid str (ids that are not canonical)

    def __cinit__(self):
        self.ring = NULL
        self.table = NULL
        self.odd = {}
        self.head = 0
        self.tail = 0
        self.live = 0
        self.rmask = 0
        self._rebuild(_FIFO_MIN)

    def __dealloc__(self):
        free(self.ring)
        free(self.table)

    cdef int _rebuild(self, uint64_t cap) except -1:
        """Move the live ids, in order, to a ring of *cap* entries (from position 0), rehash."""
        cdef uint64_t n = 0, s, q
        cdef FEnt* ring
        cdef uint32_t* table
        if cap > (<uint64_t>1 << 31):
            raise MemoryError("too many queue ids waiting")
        ring = <FEnt*>malloc(cap * sizeof(FEnt))
        table = <uint32_t*>malloc(2 * cap * sizeof(uint32_t))
        if ring == NULL or table == NULL:
            free(ring)
            free(table)
            raise MemoryError()
        memset(table, 0, 2 * cap * sizeof(uint32_t))
        try:
            odd = {}
            if self.ring != NULL:
                for q in range(self.head, self.tail):
                    s = q & self.rmask
                    if self.ring[s].bits & _F_DEAD:
                        continue
                    ring[n] = self.ring[s]
                    if ring[n].bits & _F_ODD:
                        odd[n] = self.odd[s]
                    n += 1
        except BaseException:
            free(ring)          # (the FIFO is as it was)
            free(table)
            raise
        free(self.ring)
        free(self.table)
        self.ring = ring
        self.table = table
        self.rmask = cap - 1
        self.tmask = 2 * cap - 1
        self.odd = odd
        self.head = 0
        self.tail = n
        self.live = n
        for s in range(n):
            self._put(<uint32_t>s)
        return 0

    cdef uint64_t _fit(self, uint64_t n) noexcept:
        """The ring capacity for *n* live ids: a power of two, at least twice *n*."""
        cdef uint64_t cap = _FIFO_MIN
        while cap < 2 * n:
            cap *= 2
        return cap

    cdef inline void _put(self, uint32_t pos) noexcept:
        cdef FEnt* r = &self.ring[pos]
        cdef uint64_t i = _mix(r.hi, r.lo) & self.tmask
        while self.table[i]:
            i = (i + 1) & self.tmask
        self.table[i] = pos + 1

    cdef int64_t _find(self, object qid, uint16_t hi, uint64_t lo, uint8_t odd) except -2:
        """The hash slot of live *qid*, -1 if it is not waiting."""
        cdef uint64_t i = _mix(hi, lo) & self.tmask
        cdef uint32_t e
        cdef FEnt* r
        while True:
            e = self.table[i]
            if e == 0:
                return -1
            r = &self.ring[e - 1]
            if r.lo == lo and r.hi == hi and (r.bits & _F_ODD) == odd:
                if not odd or self.odd[e - 1] == qid:
                    return <int64_t>i
            i = (i + 1) & self.tmask

    cdef void _unput_at(self, uint64_t i) noexcept:
        """Empty hash slot *i* (backward shift: no tombstones)."""
        cdef uint64_t mask = self.tmask
        cdef uint64_t j = i, k
        cdef FEnt* r
        while True:
            j = (j + 1) & mask
            if self.table[j] == 0:
                break
            r = &self.ring[self.table[j] - 1]
            k = _mix(r.hi, r.lo) & mask
            if _stays(i, j, k):
                continue
            self.table[i] = self.table[j]
            i = j
        self.table[i] = 0

    cdef void _unput(self, uint32_t pos) noexcept:
        cdef FEnt* r = &self.ring[pos]
        cdef uint64_t i = _mix(r.hi, r.lo) & self.tmask
        while self.table[i] != pos + 1:
            i = (i + 1) & self.tmask
        self._unput_at(i)

    cdef inline uint8_t _key(self, object qid, uint16_t* hi, uint64_t* lo) except 0xFF:
        """Fill *hi*, *lo*; return _F_ODD for an id that is not canonical (lo: its hash)."""
        if type(qid) is not str:
            raise TypeError("a queue id is a str")
        if _parse(qid, hi, lo):
            return 0
        hi[0] = 0
        lo[0] = <uint64_t>hash(qid)
        return _F_ODD

    def __len__(self):
        return self.live

    def __contains__(self, qid):
        cdef uint16_t hi
        cdef uint64_t lo
        if type(qid) is not str:
            return False
        cdef uint8_t odd = self._key(qid, &hi, &lo)
        return self._find(qid, hi, lo, odd) >= 0

    def __iter__(self):
        cdef uint64_t q, s
        cdef FEnt* r
        out = []
        for q in range(self.head, self.tail):
            s = q & self.rmask
            r = &self.ring[s]
            if not (r.bits & _F_DEAD):
                out.append(self.odd[s] if r.bits & _F_ODD else _format(r.hi, r.lo))
        return iter(out)

    def add(self, qid):
        """Append *qid* unless it is already waiting; True if it was appended."""
        cdef uint16_t hi
        cdef uint64_t lo, pos
        cdef uint8_t odd = self._key(qid, &hi, &lo)
        if self._find(qid, hi, lo, odd) >= 0:
            return False
        if self.tail - self.head > self.rmask:
            self._rebuild(self._fit(self.live))     # full: grow, or drop the dead ones
        pos = self.tail & self.rmask
        self.ring[pos].lo = lo
        self.ring[pos].hi = hi
        self.ring[pos].bits = odd
        if odd:
            self.odd[pos] = qid
        self._put(<uint32_t>pos)
        self.tail += 1
        self.live += 1
        return True

    def discard(self, qid):
        """*qid* no longer waits (if it did); True if it was waiting."""
        cdef uint16_t hi
        cdef uint64_t lo
        cdef int64_t i
        cdef uint32_t pos
        if type(qid) is not str:
            return False
        cdef uint8_t odd = self._key(qid, &hi, &lo)
        i = self._find(qid, hi, lo, odd)
        if i < 0:
            return False
        pos = self.table[i] - 1
        key = pos if odd else None      # (made before the FIFO changes: it may allocate)
        self._unput_at(<uint64_t>i)
        self.ring[pos].bits |= _F_DEAD
        if odd:
            del self.odd[key]
        self.live -= 1
        try:
            self._maybe_shrink()
        except MemoryError:
            pass        # (shrinking is optional: the larger arrays stay)
        return True

    def take(self, Py_ssize_t n):
        """The *n* (or fewer) ids that waited longest, no longer waiting."""
        cdef uint64_t pos
        cdef FEnt* r
        cdef uint8_t odd
        out = []
        while n > 0 and self.head < self.tail:
            pos = self.head & self.rmask
            r = &self.ring[pos]
            if r.bits & _F_DEAD:
                self.head += 1
                continue
            # Everything that allocates first (the id's string, the odd id's key, the
            # list's growth), the FIFO changed after: should one fail, this id still
            # waits and the ones already taken are returned -- none leaves the FIFO
            # without reaching the caller.
            odd = r.bits & _F_ODD
            try:
                if odd:
                    key = pos
                    out.append(self.odd[key])
                else:
                    out.append(_format(r.hi, r.lo))
            except MemoryError:
                if not out:
                    raise
                break
            self.head += 1
            self._unput(<uint32_t>pos)
            if odd:
                del self.odd[key]       # (the key object exists: nothing to allocate)
            self.live -= 1
            n -= 1
        try:
            self._maybe_shrink()
        except MemoryError:
            pass        # (shrinking is optional: the larger arrays stay)
        return out

    cdef int _maybe_shrink(self) except -1:
        cdef uint64_t cap = self.rmask + 1
        if self.head == self.tail:
            self.head = self.tail = 0       # (empty: every entry was taken or dead)
        if cap > _FIFO_MIN and self.live * 8 <= cap:
            self._rebuild(self._fit(self.live))
        return 0

    def memory(self):
        """Octets held by the native arrays (allocated)."""
        return {"ring": (self.rmask + 1) * sizeof(FEnt),
                "hash": (self.tmask + 1) * sizeof(uint32_t), "sizes": (sizeof(FEnt),)}
