"""The events store: every message event of the node, in LMDB, for the Events API and webhooks.

Leaf library (no sockets, no bus).  One process writes (the ``events``
process: :meth:`EventStore.append`, :meth:`EventStore.sync`,
:meth:`EventStore.prune`); the acceptors open it read-only after fork and
answer ``GET /api/v1/events/message`` from it (:meth:`EventStore.query`);
webhook senders read it in order from a cursor of their own
(:meth:`EventStore.read`).  LMDB gives the readers consistent snapshots without
locks, across processes.

An event is a flat SparkPost message event (a dict: ``type``, ``event_id``,
``timestamp`` as Unix seconds, ``rcpt_to``, ...).  Each one gets a sequence
number ``seq`` (monotonic, never reused) when it is appended.

Layout (named databases; times are big-endian milliseconds, 8 octets; seq is
big-endian, 8 octets; so byte order is time order):

- ``ev``: seq -> time + the event (msgpack);
- ``time``: time + seq -> the event's type (the walk of an unfiltered page,
  and the type without decoding the event);
- ``ids``: event_id -> time + seq (a replayed event is skipped; the
  ``event_ids`` filter);
- ``rcpt``, ``msg``, ``tx``, ``camp``, ``bcls``, ``type`` (dupsort, fixed
  16-octet duplicates): value -> time + seq, for the ``recipients``,
  ``messages``, ``transmissions``, ``campaigns`` (one entry per keyword token
  of the campaign id), ``bounce_classes`` and ``events`` filters.  A query
  walks the index of its most selective filter, newest first, and checks the
  other filters on the events it reads;
- ``count``: minute + type -> number of events, so the ``total_count`` of a
  page filtered only by time and type costs a few hundred reads instead of a
  walk over millions of events;
- ``meta``: the last seq.

Results are newest first (descending time, then seq); the paging cursor is
the (time, seq) of the last event of a page, base64-encoded: a keyset cursor,
stable while new events arrive (they are newer than the cursor).

Bounded: ``store_max_size`` is the LMDB map size.  :meth:`prune` deletes
events older than the retention in chunks of at most ``chunk`` events per
transaction (the writer is never held long), never events at or after
``keep_from_seq`` (those a webhook has not consumed yet), and when the store
is nearly full also the oldest ones (a warning is logged from
``WARN_FRACTION``).  An append into a full map raises :class:`StoreFull`.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import heapq
import logging
import os
import re
import struct
import time

import lmdb
import msgspec

log = logging.getLogger("mta.events.store")

_U64 = struct.Struct(">Q")
_TS = struct.Struct(">QQ")        # time (ms), seq
_MIN = struct.Struct(">I")         # minute number

MAX_KEY = 400                      # octets of an indexed value kept (LMDB keys: at most 511)
WARN_FRACTION = 0.75               # of the map size: warn
PRUNE_FRACTION = 0.85              # of the map size: prune the oldest events too
PRUNE_TARGET = 0.7               # ... down to this
DEFAULT_CHUNK = 5000               # events deleted per prune transaction
MAX_SCAN = 2_000_000               # index entries one query may read (past it: total is a floor)

# Filters of the Events API: parameter -> (event field, how it matches).
EXACT, KEYWORD, DOMAIN = "exact", "keyword", "domain"
FILTERS = {
    "events": ("type", EXACT),
    "event_ids": ("event_id", EXACT),
    "recipients": ("rcpt_to", EXACT),
    "from_addresses": ("friendly_from", EXACT),
    "subjects": ("subject", KEYWORD),
    "bounce_classes": ("bounce_class", EXACT),
    "reasons": ("reason", KEYWORD),
    "campaigns": ("campaign_id", KEYWORD),
    "templates": ("template_id", KEYWORD),
    "sending_ips": ("sending_ip", EXACT),
    "ip_pools": ("ip_pool", KEYWORD),
    "subaccounts": ("subaccount_id", EXACT),
    "messages": ("message_id", EXACT),
    "transmissions": ("transmission_id", EXACT),
    "recipient_domains": ("recipient_domain", DOMAIN),
    "sending_domains": ("sending_domain", DOMAIN),
    "mailbox_providers": ("mailbox_provider", KEYWORD),
    "mailbox_provider_regions": ("mailbox_provider_region", KEYWORD),
    "ab_tests": ("ab_test_id", KEYWORD),
    "ab_test_versions": ("ab_test_version", EXACT),
}
# Filters answered from an index: parameter -> database name.
INDEXED = {"recipients": b"rcpt", "messages": b"msg", "transmissions": b"tx",
           "campaigns": b"camp", "bounce_classes": b"bcls", "events": b"type"}
_INDEX_FIELDS = (("rcpt", "rcpt_to"), ("msg", "message_id"), ("tx", "transmission_id"),
                 ("bcls", "bounce_class"), ("type", "type"))

_SPLIT = re.compile(r"[\s\-_]+")
_SPLIT_DOMAIN = re.compile(r"[\s\-_.]+")

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict)


class StoreFull(Exception):
    """The store has reached its map size ([events] store_max_size)."""


class BadCursor(ValueError):
    """A paging cursor that this store did not hand out."""


def tokens(text: str, domain: bool = False) -> list[str]:
    """The keyword tokens of *text*: lower-cased, split on space, - and _ (and . for domains)."""
    return [t for t in (_SPLIT_DOMAIN if domain else _SPLIT).split(text.lower()) if t]


def event_time(ev: dict, now: float | None = None) -> int:
    """The event's time in milliseconds: ``timestamp`` as Unix seconds (number or string) or ISO."""
    ts = ev.get("timestamp")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return max(0, int(ts * 1000))
    if isinstance(ts, str) and ts:
        try:
            return max(0, int(float(ts) * 1000))
        except ValueError:
            pass
        try:
            d = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
            if d.tzinfo is None:
                d = d.replace(tzinfo=datetime.timezone.utc)
            return max(0, int(d.timestamp() * 1000))
        except ValueError:
            pass
    return int((time.time() if now is None else now) * 1000)


def _key(value) -> bytes:
    return str(value).lower().encode("utf-8", "surrogateescape")[:MAX_KEY]


def _sending_domain(ev: dict) -> str:
    d = ev.get("sending_domain")
    if d:
        return str(d)
    addr = ev.get("friendly_from") or ev.get("msg_from") or ""
    return str(addr).rpartition("@")[2]


def encode_cursor(ts_ms: int, seq: int) -> str:
    return base64.urlsafe_b64encode(_TS.pack(ts_ms, seq)).decode().rstrip("=")


def decode_cursor(text: str) -> bytes:
    """The 16-octet (time, seq) key of a cursor from :func:`encode_cursor`; BadCursor."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadCursor("not a cursor from a links.next address") from None
    if len(raw) != 16:
        raise BadCursor("not a cursor from a links.next address")
    return raw


class _Matcher:
    """The filters of one query, checked on a decoded event."""

    def __init__(self, filters: dict):
        self.checks = []
        for name, values in filters.items():
            field, mode = FILTERS[name]
            if mode == EXACT:
                self.checks.append((field, mode, frozenset(str(v).lower() for v in values)))
            else:
                toks = [tuple(tokens(str(v), mode == DOMAIN)) for v in values]
                self.checks.append((field, mode, [t for t in toks if t]))

    def __call__(self, ev: dict) -> bool:
        for field, mode, want in self.checks:
            v = _sending_domain(ev) if field == "sending_domain" else ev.get(field)
            if v is None or v == "":
                return False
            if mode == EXACT:
                if str(v).lower() not in want:
                    return False
            else:
                have = tokens(str(v), mode == DOMAIN)
                if not any(_contains(have, w) for w in want):
                    return False
        return True


def _contains(have: list, want: tuple) -> bool:
    """Whether the tokens *want* appear in *have*, in order and next to each other."""
    n = len(want)
    return any(tuple(have[i:i + n]) == want for i in range(len(have) - n + 1))


class EventStore:
    """One process's handle on the node's events store (open it after fork)."""

    def __init__(self, path: str, *, map_size: int, retention: float, readonly: bool = False,
                 max_readers: int = 512):
        self.path = path
        self.map_size = map_size
        self.retention = retention
        self.readonly = readonly
        if not readonly:
            os.makedirs(path, exist_ok=True)
        elif not os.path.exists(os.path.join(path, "data.mdb")):
            raise FileNotFoundError(f"events store {path}: not created yet")
        try:
            self.env = lmdb.open(path, map_size=map_size, max_dbs=16, subdir=True,
                                 readonly=readonly, readahead=False, sync=False, metasync=False,
                                 max_readers=max_readers)
        except lmdb.Error as exc:
            raise OSError(f"events store {path}: {exc}") from None
        create = not readonly
        self.ev = self.env.open_db(b"ev", create=create)
        self.time = self.env.open_db(b"time", create=create)
        self.ids = self.env.open_db(b"ids", create=create)
        self.count_db = self.env.open_db(b"count", create=create)
        self.meta = self.env.open_db(b"meta", create=create)
        self.idx = {name: self.env.open_db(name.encode(), dupsort=True, dupfixed=True,
                                           create=create)
                    for name in ("rcpt", "msg", "tx", "camp", "bcls", "type")}
        try:
            self.env.reader_check()
        except lmdb.Error:
            pass
        self._warned = False

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------- writing

    def append(self, events: list[dict]) -> int:
        """Store *events* in one transaction; the last seq assigned (the previous one if none).

        An event whose ``event_id`` is already stored is skipped (a replay
        after a crash).  Durable after :meth:`sync`.  StoreFull when the map
        is full (nothing of this call is kept).
        """
        try:
            return self._append(events)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self._append(events)
        except lmdb.MapFullError:
            raise StoreFull(f"the events store is full ({self.map_size} octets, "
                            "[events] store_max_size)") from None

    def _append(self, events: list[dict]) -> int:
        now = time.time()
        counts: dict[bytes, int] = {}
        with self.env.begin(write=True) as txn:
            v = txn.get(b"seq", db=self.meta)
            seq = _U64.unpack(v)[0] if v is not None else 0
            ids = self.ids
            for ev in events:
                eid = ev.get("event_id")
                ekey = _key(eid) if eid not in (None, "") else None
                if ekey is not None and txn.get(ekey, db=ids) is not None:
                    continue
                seq += 1
                ts = event_time(ev, now)
                tk = _TS.pack(ts, seq)
                typ = _key(ev.get("type") or "")
                txn.put(_U64.pack(seq), tk[:8] + _enc.encode(ev), db=self.ev, append=True)
                txn.put(tk, typ, db=self.time)
                if ekey is not None:
                    txn.put(ekey, tk, db=ids)
                for name, k in self._index_keys(ev):
                    txn.put(k, tk, db=self.idx[name])
                ck = _MIN.pack(ts // 60000) + typ
                counts[ck] = counts.get(ck, 0) + 1
            for ck, n in counts.items():
                self._bump(txn, ck, n)
            txn.put(b"seq", _U64.pack(seq), db=self.meta)
        return seq

    @staticmethod
    def _index_keys(ev: dict):
        for name, field in _INDEX_FIELDS:
            v = ev.get(field)
            if v not in (None, ""):
                yield name, _key(v)
        camp = ev.get("campaign_id")
        if camp:
            for t in dict.fromkeys(tokens(str(camp))):
                yield "camp", _key(t)

    def _bump(self, txn, ck: bytes, delta: int) -> None:
        v = txn.get(ck, db=self.count_db)
        n = (_U64.unpack(v)[0] if v is not None else 0) + delta
        if n > 0:
            txn.put(ck, _U64.pack(n), db=self.count_db)
        else:
            txn.delete(ck, db=self.count_db)

    def sync(self) -> None:
        """Flush the environment to disk (fsync): appended events are durable after it."""
        self.env.sync(True)

    # ------------------------------------------------------------- reading

    def last_seq(self) -> int:
        with self.env.begin(db=self.meta) as txn:
            v = txn.get(b"seq")
        return _U64.unpack(v)[0] if v is not None else 0

    def read(self, after_seq: int, limit: int) -> list[tuple[int, dict]]:
        """Up to *limit* events with seq > *after_seq*, in seq order (pruned ones are gone)."""
        out = []
        with self.env.begin(db=self.ev, buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_range(_U64.pack(after_seq + 1)):
                return out
            for k, v in cur:
                out.append((_U64.unpack(k)[0], _dec.decode(v[8:])))
                if len(out) >= limit:
                    break
        return out

    def count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.ev)["entries"]

    def usage(self) -> int:
        """Octets the stored data takes (pages of every database, not the file's size)."""
        with self.env.begin() as txn:
            psize = txn.stat(self.ev)["psize"]
            pages = 0
            for db in (self.ev, self.time, self.ids, self.count_db, self.meta,
                       *self.idx.values()):
                s = txn.stat(db)
                pages += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
        return pages * psize

    def query(self, filters: dict, cursor: str | None = None, per_page: int = 1000, *,
              start: float | None = None, end: float | None = None,
              max_scan: int = MAX_SCAN) -> tuple[list[dict], str | None, int]:
        """One page of events matching *filters*, newest first: (events, next cursor, total).

        *filters* maps Events API parameter names (:data:`FILTERS`) to lists
        of values (OR within a filter, AND across filters); *start*
        (inclusive) and *end* (exclusive) are Unix seconds.  *cursor* is a
        next cursor of an earlier page of the same query (None or "initial":
        the first page).  *total* counts every match in the time range, as
        long as at most *max_scan* index entries had to be read (past that, it
        is the count so far).  Each event carries ``_ts`` (milliseconds).
        """
        filters = {k: list(v) for k, v in filters.items() if v}
        unknown = [k for k in filters if k not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter {unknown[0]}")
        lo = _TS.pack(max(0, int(start * 1000)) if start is not None else 0, 0)
        hi = _TS.pack(int(end * 1000), 0) if end is not None else b"\xff" * 16
        after = decode_cursor(cursor) if cursor and cursor != "initial" else None
        matcher = _Matcher(filters)
        try:
            return self._query(filters, matcher, lo, hi, after, per_page, max_scan)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self._query(filters, matcher, lo, hi, after, per_page, max_scan)

    def _query(self, filters, matcher, lo, hi, after, per_page, max_scan):
        with self.env.begin() as txn:
            total = 0
            counted = False
            if set(filters) <= {"events"}:
                # total from the minute counters: the walk starts at the cursor
                total, counted = self._count_by_time(txn, lo, hi, filters.get("events"),
                                                     max_scan)
            top = min(hi, after) if counted and after is not None else hi
            streams, exact = self._plan(txn, filters, lo, top)
            out: list[dict] = []
            scanned = 0
            more = False
            last = None
            get = txn.get
            evdb = self.ev
            for tk in streams:
                scanned += 1
                if scanned > max_scan:
                    break
                ev = None
                if not exact:
                    ev = _dec.decode(get(tk[8:], db=evdb)[8:])
                    if not matcher(ev):
                        continue
                if not counted:
                    total += 1
                if after is not None and tk >= after:
                    continue
                if len(out) < per_page:
                    if ev is None:
                        raw = get(tk[8:], db=evdb)
                        if raw is None:
                            continue
                        ev = _dec.decode(raw[8:])
                    ev["_ts"] = _U64.unpack(tk[:8])[0]
                    out.append(ev)
                    last = tk
                else:
                    more = True
                    if counted:
                        break
        nxt = encode_cursor(*_TS.unpack(last)) if more and last is not None else None
        return out, nxt, total

    def _plan(self, txn, filters: dict, lo: bytes, hi: bytes):
        """(time+seq keys of candidates, newest first; whether they all match without a check)."""
        best = None
        for name, dbname in INDEXED.items():
            values = filters.get(name)
            if not values:
                continue
            db = self.idx[dbname.decode()]
            cur = txn.cursor(db=db)
            keys = []
            cost = 0
            decides = True
            for v in values:
                if name == "campaigns":
                    toks = tokens(str(v))
                    if not toks:
                        continue
                    if len(toks) > 1:
                        decides = False
                    # the rarest token of the value
                    k = min((_key(t) for t in toks),
                            key=lambda k: cur.count() if cur.set_key(k) else 0)
                else:
                    k = _key(v)
                keys.append(k)
                cost += cur.count() if cur.set_key(k) else 0
            if best is None or cost < best[0]:
                best = (cost, name, db, keys, decides)
        if best is None:
            return self._walk_time(txn, lo, hi), not filters
        cost, name, db, keys, decides = best
        # Several values of one filter: their streams merged (an event can be in
        # two of them only for campaign tokens: duplicates dropped).
        exact = decides and len(filters) == 1 and len(set(keys)) == len(keys)
        gens = [self._walk_dups(txn, db, k, lo, hi) for k in dict.fromkeys(keys)]
        if not gens:
            return iter(()), True
        stream = gens[0] if len(gens) == 1 else _dedupe(heapq.merge(*gens, reverse=True))
        return stream, exact

    @staticmethod
    def _walk_dups(txn, db, key: bytes, lo: bytes, hi: bytes):
        cur = txn.cursor(db=db)
        if not cur.set_key(key):
            return
        if cur.set_range_dup(key, hi):
            ok = cur.prev_dup()
        else:
            cur.set_key(key)
            ok = cur.last_dup()
        if not ok:
            return
        for v in cur.iterprev_dup(keys=False, values=True):
            if v < lo:
                return
            yield v

    def _walk_time(self, txn, lo: bytes, hi: bytes):
        cur = txn.cursor(db=self.time)
        ok = cur.prev() if cur.set_range(hi) else cur.last()
        if not ok:
            return
        for k in cur.iterprev(keys=True, values=False):
            if k < lo:
                return
            yield k

    def _count_by_time(self, txn, lo: bytes, hi: bytes, types, max_scan: int):
        """(events in [lo, hi) of *types* (None: all), whether exact) from the minute counters."""
        lo_ms = _TS.unpack(lo)[0]
        hi_ms = min(_TS.unpack(hi)[0], 2 ** 62)
        want = frozenset(_key(t) for t in types) if types else None
        first_full = -(-lo_ms // 60000)       # first minute wholly inside
        end_full = hi_ms // 60000             # minutes before this one are wholly inside
        total = 0
        if first_full < end_full:
            cur = txn.cursor(db=self.count_db)
            ok = cur.set_range(_MIN.pack(min(first_full, 2 ** 32 - 1)))
            stop = _MIN.pack(min(end_full, 2 ** 32 - 1))
            while ok:
                k = cur.key()
                if k[:4] >= stop:
                    break
                if want is None or bytes(k[4:]) in want:
                    total += _U64.unpack(cur.value())[0]
                ok = cur.next()
            edges = [(lo_ms, first_full * 60000), (end_full * 60000, hi_ms)]
        else:
            edges = [(lo_ms, hi_ms)]
        scanned = 0
        cur = txn.cursor(db=self.time)
        for a, b in edges:
            if a >= b:
                continue
            stop = _TS.pack(b, 0)
            if not cur.set_range(_TS.pack(a, 0)):
                continue
            for k, v in cur.iternext(keys=True, values=True):
                if k >= stop:
                    break
                scanned += 1
                if scanned > max_scan:
                    return total, False
                if want is None or bytes(v) in want:
                    total += 1
        return total, True

    # ------------------------------------------------------------- pruning

    def prune(self, now: float, keep_from_seq: int, chunk: int = DEFAULT_CHUNK,
              max_chunks: int = 1000) -> int:
        """Delete events older than the retention (and the oldest when nearly full); how many.

        Never deletes an event with seq >= *keep_from_seq*.  At most *chunk*
        events per write transaction, at most *max_chunks* transactions per
        call (call again later for the rest).
        """
        cutoff = int((now - self.retention) * 1000)
        n = 0
        resume = b""
        for _ in range(max_chunks):
            k, resume = self._prune_chunk(_TS.pack(max(cutoff, 0), 0), keep_from_seq, chunk,
                                          resume)
            n += k
            if resume is None:
                break
        used = self.usage()
        if used > PRUNE_FRACTION * self.map_size:
            log.warning("events store: %d of %d octets used ([events] store_max_size); "
                        "deleting the oldest events within the retention", used, self.map_size)
            resume = b""
            for _ in range(max_chunks):
                k, resume = self._prune_chunk(b"\xff" * 16, keep_from_seq, chunk, resume)
                n += k
                if resume is None or self.usage() <= PRUNE_TARGET * self.map_size:
                    break
            used = self.usage()
        if used > WARN_FRACTION * self.map_size:
            if not self._warned:
                log.warning("events store: %d of %d octets used ([events] store_max_size); "
                            "raise it or lower [events] retention", used, self.map_size)
                self._warned = True
        else:
            self._warned = False
        return n

    def _prune_chunk(self, stop: bytes, keep_from_seq: int, chunk: int,
                     resume: bytes) -> tuple[int, bytes | None]:
        """Delete up to *chunk* events with time key < *stop*, from *resume* on."""
        n = 0
        counts: dict[bytes, int] = {}
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self.time)
            ok = cur.set_range(resume) if resume else cur.first()
            while ok:
                tk = cur.key()
                if tk >= stop:
                    return self._finish_prune(txn, counts, n), None
                if n >= chunk:
                    self._finish_prune(txn, counts, n)
                    return n, bytes(tk)
                seq = _U64.unpack(tk[8:])[0]
                if seq >= keep_from_seq:
                    ok = cur.next()
                    continue
                tk = bytes(tk)
                raw = txn.get(tk[8:], db=self.ev)
                if raw is not None:
                    ev = _dec.decode(raw[8:])
                    for name, k in self._index_keys(ev):
                        txn.delete(k, tk, db=self.idx[name])
                    eid = ev.get("event_id")
                    if eid not in (None, ""):
                        txn.delete(_key(eid), db=self.ids)
                    txn.delete(tk[8:], db=self.ev)
                ck = _MIN.pack(_U64.unpack(tk[:8])[0] // 60000) + bytes(cur.value())
                counts[ck] = counts.get(ck, 0) - 1
                ok = cur.delete()     # moves to the next entry
                if ok and not cur.key():
                    ok = False
                n += 1
            self._finish_prune(txn, counts, n)
        return n, None

    def _finish_prune(self, txn, counts: dict, n: int) -> int:
        for ck, d in counts.items():
            self._bump(txn, ck, d)
        counts.clear()
        return n


def _dedupe(it):
    prev = None
    for k in it:
        if k != prev:
            yield k
        prev = k


def iso(ms: int) -> str:
    """SparkPost's Events API form: ``2016-04-18T14:25:07.000+00:00``."""
    d = datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + ".%03d+00:00" % (ms % 1000)


def path_in(settings) -> str:
    return os.path.join(settings.state_dir, settings.config.events.store_path)


def open_for(settings, readonly: bool = False) -> EventStore | None:
    """The node's store as [events] configures it (None when disabled); after fork."""
    cfg = settings.config.events
    if not cfg.store:
        return None
    return EventStore(path_in(settings), map_size=cfg.store_max_size,
                      retention=cfg.retention, readonly=readonly)
