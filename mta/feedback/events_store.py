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
number ``seq`` (monotonic, never reused) when it is appended.  A stored event
that is no msgpack map (LMDB has no checksums) is logged and passed over:
:meth:`EventStore.read` gives it as an empty event, a query's page and
:meth:`EventStore.originals` leave it out, :meth:`EventStore.prune` deletes it
with its index entries and counts (found by a walk of the indexes: its values
cannot be read; the walk, :meth:`EventStore.sweep`, runs in bounded transactions
of its own, between the events process's appends).

Layout (named databases; times are big-endian milliseconds, 8 octets; seq is
big-endian, 8 octets; so byte order is time order):

- ``ev``: seq -> time + the event (msgpack);
- ``time``: time + seq -> the event's type (the walk of an unfiltered page,
  and the type without decoding the event);
- ``ids``: event_id -> time + seq (a replayed event is skipped; the
  ``event_ids`` filter);
- ``rcpt``, ``msg``, ``tx``, ``camp``, ``bcls``, ``type`` (dupsort, fixed
  16-octet duplicates): value -> time + seq, for the ``recipients``,
  ``messages``, ``transmissions``, ``campaigns`` (one entry per run of up to
  MAX_RUN keyword tokens of the campaign id, :func:`campaign_keys`),
  ``bounce_classes`` and ``events`` filters.  A query
  walks the index of its most selective filter, newest first, and checks the
  other filters on the events it reads;
- ``mid`` (dupsort, like the others): the ``Message-ID`` header of a message
  (``message_id_header`` without its angle brackets, lower case) -> time + seq
  of its ``injection`` events only, so that a report quoting it (an
  out-of-band DSN, an ARF complaint) finds its message (:meth:`EventStore.originals`);
- ``count``: index name + value + minute -> number of events (for the
  ``type``, ``camp``, ``tx`` and ``bcls`` indexes, and for all events), so the
  ``total_count`` of a page filtered by one of those (or by time only) costs
  a few thousand reads instead of a walk over millions of events: whole
  minutes from the counters, the partial minutes at the ends walked;
- ``meta``: the last seq; the pending sweep (:meth:`EventStore.sweep`); ``pruned``
  (what a full store's prune commits after its deletions, see
  :meth:`EventStore._release`); the store's id (8 random octets, written when the
  store is made: a store deleted and made anew -- its seqs start again at 1
  -- has another, so webhook cursors saved with the old one are reset).

Each commit is durable when it returns: its data pages synced, then its meta
page (LMDB's default sync and metasync).  Readers see a commit as soon as it
returns, and the webhooks move their cursor past what they read, durably, at
once: with NOMETASYNC, as before, a power cut took the last commit back, the
events process stored other events under the same seqs after the restart (it
reads again from its cursors), and the webhooks' cursor skipped them -- never
sent.  With NOSYNC as well, as before that, a power cut could leave a meta page
on disk that names data pages that never got there: a damaged store, and with
it every event the webhooks had not sent yet (measured end to end, the synced
data pages cost nothing visible: bench/RESULTS.md, stop 38; the meta page's
sync is one more small synced write per commit of the events process, not
measured).  A store damaged all the same (a disk that lies about its flushes)
is set aside and made anew by the events process (:class:`StoreDamaged`,
:func:`mta.events.main.open_sink`).

Readers follow a store made anew: an LMDB handle reads the files it opened,
and after a set-aside those are in ``<dir>.damaged-<time>``, so a reader
would serve the old store until it restarted (the webhooks would send nothing
again).  Each handle keeps the (device, inode) of the ``data.mdb`` it opened;
:meth:`EventStore.successor` compares it with the file at the path (one stat)
and opens the new store when they differ.  The readers ask once per look, not
per event: the webhooks process at each ``webhooks.poll_interval`` (its
senders are then restarted on the new handle, and a cursor saved for another
store id starts at the new store's beginning: :meth:`mta.webhooks.sender.Sender.load`),
an acceptor at each events API request or report it reads.  A new store not
readable yet (no id committed yet) is looked at again next time.

Results are newest first (descending time, then seq); the paging cursor is
the (time, seq) of the last event of a page, base64-encoded: a keyset cursor,
stable while new events arrive (they are newer than the cursor).

Bounded: ``store_max_size`` is the LMDB map size.  :meth:`prune` deletes
events older than the retention in chunks of at most ``chunk`` events per
transaction -- in the events process one transaction of at most about
PRUNE_PIECE_SECONDS between two of its appends (:meth:`prune_piece`), so that
millions to delete never hold them long --, never events at or after
``keep_from_seq`` (those a webhook has not consumed yet), and when the store
is nearly full also the oldest ones (a warning is logged from
``WARN_FRACTION``).  An append into a full map raises :class:`StoreFull`.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import errno
import heapq
import logging
import os
import re
import struct
import time

import lmdb
import msgspec

from mta import native
from mta.store import make_dirs, sync_dir

log = logging.getLogger("mta.feedback.events_store")

_U64 = struct.Struct(">Q")
_TS = struct.Struct(">QQ")        # time (ms), seq
_MIN = struct.Struct(">I")         # minute number

MAX_RUN = 4                        # tokens of a campaign id indexed together
MAX_CAMPAIGN_KEYS = 32             # index keys of one campaign id
# the per-event keys and times, typed (mta._pure.evkernel: their rules, and the bounds)
_kernel = native.load("evkernel")
MAX_KEY = _kernel.MAX_KEY           # octets of an indexed value kept (LMDB keys: at most 511)
WARN_FRACTION = 0.75               # of the map size: warn
PRUNE_FRACTION = 0.85              # of the map size: prune the oldest events too
PRUNE_TARGET = 0.7               # ... down to this
DEFAULT_CHUNK = 5000               # events deleted per prune transaction
SWEEP_PIECE = 20_000               # index entries one sweep transaction looks at, at most
SWEEP_PIECE_SECONDS = 0.05         # ... and seconds it runs, at most (then it commits)
MAX_SWEEP_PIECES = 1_000_000       # sweep transactions one prune(sweep=True) runs, at most
PRUNE_PIECE_SECONDS = 0.02         # seconds of deletions in one of the events process's prune
                                   # transactions, about (then it commits: about as long again)
MAX_ORIGINAL_EVENTS = 1000         # events of an original message read for one report
MAX_MESSAGE_ID_MATCHES = 8         # messages one Message-ID is looked up in (newest first)
MAX_CACHED_CAMPAIGNS = 1000       # campaign ids (and, apart, type and bounce-class values) whose index keys the writer keeps
MAX_TIME_MS = _kernel.MAX_TIME_MS   # 9999-12-31T23:59:59.999Z: a later timestamp is no time
MAX_SCAN = 500_000                 # index entries one query may read (then: a short page, a cursor)

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

# Indexes with per-minute counters (few distinct values, many events each).
COUNTED = frozenset(("type", "camp", "bcls", "tx"))
_ALL = b"*\x00\x00"                 # counter prefix of every event

# The pending sweep, in ``meta``: where it is (a stage, a duplicate and a key: see
# EventStore.sweep) and the unreadable events it is for (time key -> minute).
_SWEEP_AT = b"sweep@"
_SWEEP_BAD = b"sweep/"
_SWEEP_STAGES = ("rcpt", "msg", "tx", "camp", "bcls", "type", "mid", "ids")
_NO_DUP = b"\x00" * 16


def _counter(name: str, key: bytes) -> bytes:
    """Prefix of the minute counters of *key* in index *name* (then 4 octets of minute)."""
    return name.encode() + b"\x00" + key + b"\x00"


_timestamp_ms = _kernel.timestamp_ms
_event_keys = _kernel.event_keys
# the ``mid`` index key of a Message-ID header value (no angle brackets, lower case), or None
_mid_key = _kernel.mid_key

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict)


def _event(raw, seq_key, what: str) -> dict | None:
    """The event of an ``ev`` value *raw* (8 octets of time, then msgpack), or None when
    it is no msgpack map: damage LMDB does not see (it has no checksums), or a writer's
    bug.  Raised, it stopped its reader at the same event at every pass (a webhook for
    good) or at every start (the events process, when its prune reached it); it is
    logged with its seq (*seq_key*: 8 octets, big-endian) and *what* is done with it."""
    try:
        return _dec.decode(raw[8:])
    except msgspec.DecodeError as exc:
        log.error("events store: the event of seq %d cannot be read (%s: %s); %s",
                  _U64.unpack(seq_key)[0], type(exc).__name__, exc, what)
        return None


# What LMDB says of an environment a power cut left damaged (see the module's text: a
# disk that lies about its flushes): no LMDB file, a page of the wrong kind, a page
# beyond the end of the file.
DAMAGED = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError)


class StoreDamaged(OSError):
    """The store's files are not a readable LMDB environment (errno EIO)."""

    def __init__(self, path: str, exc: Exception):
        super().__init__(errno.EIO, f"events store {path} is damaged: {exc}")


class StoreFull(OSError):
    """The store has reached its map size ([events] store_max_size); errno ENOSPC."""

    def __init__(self, text: str):
        super().__init__(errno.ENOSPC, text)


class BadCursor(ValueError):
    """A paging cursor that this store did not hand out."""


def tokens(text: str, domain: bool = False) -> list[str]:
    """The keyword tokens of *text*: lower-cased, split on space, - and _ (and . for domains)."""
    return [t for t in (_SPLIT_DOMAIN if domain else _SPLIT).split(text.lower()) if t]


def event_time(ev: dict, now: float | None = None) -> int:
    """The event's time in milliseconds: ``timestamp`` as Unix seconds (number or string) or
    ISO; now when it is none of these (or beyond MAX_TIME_MS, or not finite)."""
    ts = ev.get("timestamp")
    ms = _timestamp_ms(ts)
    if ms >= 0:
        return ms
    if isinstance(ts, str) and ts:
        try:
            d = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
            if d.tzinfo is None:
                d = d.replace(tzinfo=datetime.timezone.utc)
            return max(0, int(d.timestamp() * 1000))
        except ValueError:
            pass
    return int((time.time() if now is None else now) * 1000)


def campaign_keys(campaign: str) -> list[bytes]:
    """The ``camp`` index keys of a campaign id: each run of up to MAX_RUN tokens.

    A ``campaigns`` value of at most MAX_RUN tokens is then one key (its
    tokens joined by a space), so it is answered and counted from the index
    alone; a longer value is checked on the events of its first run.
    """
    toks = tokens(campaign)
    keys = {}
    for i in range(len(toks)):
        for j in range(i + 1, min(len(toks), i + MAX_RUN) + 1):
            keys[_key(" ".join(toks[i:j]))] = None
            if len(keys) >= MAX_CAMPAIGN_KEYS:
                return list(keys)
    return list(keys)


# str(value) lower-cased, UTF-8 with surrogates escaped, its first MAX_KEY octets
_key = _kernel.key


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
                # the values' token runs by their first token, then by the length of
                # the rest (a run is looked for where its first token is, a set look-up
                # per length there, not each value on each event: a URI holds about
                # 1,300 values)
                runs: dict[str, dict[int, set[tuple]]] = {}
                for v in values:
                    toks = tuple(tokens(str(v), mode == DOMAIN))
                    if toks:
                        runs.setdefault(toks[0], {}).setdefault(len(toks) - 1,
                                                                set()).add(toks[1:])
                self.checks.append((field, mode, runs))

    def __call__(self, ev: dict) -> bool:
        for field, mode, want in self.checks:
            v = _sending_domain(ev) if field == "sending_domain" else ev.get(field)
            if v is None or v == "":
                return False
            if mode == EXACT:
                if str(v).lower() not in want:
                    return False
            else:
                if not _contains(tokens(str(v), mode == DOMAIN), want):
                    return False
        return True


def _contains(have: list, runs: dict) -> bool:
    """Whether one of the token runs *runs* (first token -> length of the rest -> the
    rests) appears in *have*, in order and next to each other."""
    for i, tok in enumerate(have):
        by_len = runs.get(tok)
        if by_len is None:
            continue
        for n, rests in by_len.items():
            if not n or tuple(have[i + 1:i + 1 + n]) in rests:
                return True
    return False


class _Pruning:
    """A prune under way (:meth:`EventStore.prune`): the time key it deletes up to (the
    retention's cutoff, or all when it deletes the oldest), the seqs it keeps, where it
    resumes, whether it is for a full store, and for its log line."""

    __slots__ = ("cutoff", "stop", "keep", "resume", "oldest", "full", "n", "txns", "t0")

    def __init__(self, cutoff: bytes):
        self.cutoff = self.stop = cutoff
        self.keep = 0
        self.resume: bytes | None = b""
        self.oldest = False       # deleting the oldest within the retention (nearly full)
        self.full = False
        self.n = 0
        self.txns = 0
        self.t0 = time.monotonic()


class EventStore:
    """One process's handle on the node's events store (open it after fork)."""

    def __init__(self, path: str, *, map_size: int, retention: float, readonly: bool = False,
                 max_readers: int = 512):
        self.path = path
        self.map_size = map_size
        self.retention = retention
        self.readonly = readonly
        self.max_readers = max_readers
        self._told = False         # successor(): the new store's open failure was logged
        # The data file this handle reads (device, inode), taken before the open: a file
        # put there between the stat and the open only makes successor() open it again.
        self.file = _identity(path)
        if not readonly:
            make_dirs(path)
        elif self.file is None:
            raise FileNotFoundError(f"events store {path}: not created yet")
        try:
            self.env = lmdb.open(path, map_size=map_size, max_dbs=16, subdir=True,
                                 readonly=readonly, readahead=False,
                                 # (each commit durable when it returns: readers act
                                 # on it at once, see the module docstring)
                                 sync=True, metasync=True,
                                 max_readers=max_readers)
        except DAMAGED as exc:
            raise StoreDamaged(path, exc) from None
        except lmdb.Error as exc:
            raise OSError(f"events store {path}: {exc}") from None
        if self.file is None:
            self.file = _identity(path)        # (the writer has just made it)
        try:
            self._open_dbs(readonly)
        except DAMAGED as exc:
            self.env.close()
            raise StoreDamaged(path, exc) from None
        self._warned = False
        # the sweep for unreadable events' index entries (see _queue_sweep): whether one
        # is pending (in ``meta``, so a restart goes on with it), their time keys ->
        # minute as last read (None: read again), and for its log line: entries deleted,
        # when it began, transactions
        self._bad: dict[bytes, bytes] | None = None
        self._pruning: _Pruning | None = None    # the prune under way (prune(finish=False))
        self._sweep_pending = False
        self._sweep_log = [0, 0.0, 0]
        if not readonly:
            with self.env.begin(db=self.meta) as txn:
                self._sweep_pending = txn.get(_SWEEP_AT) is not None
            if self._sweep_pending:
                self._sweep_log[1] = time.monotonic()
        # campaign id -> its index keys with their counter prefixes; (index, value) -> the
        # same for the counted indexes with few values (type, bounce class)
        self._campaigns: dict[str, list[tuple[bytes, bytes]]] = {}
        self._prefixes: dict[tuple[str, str], tuple[bytes, bytes]] = {}

    def _open_dbs(self, readonly: bool) -> None:
        path = self.path
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
            self.idx["mid"] = self.env.open_db(b"mid", dupsort=True, dupfixed=True,
                                               create=create)
        except lmdb.NotFoundError:
            pass        # (read-only, a store written before the index existed: no lookups)
        try:
            self.env.reader_check()
        except lmdb.Error:
            pass
        if not readonly:
            with self.env.begin(write=True, db=self.meta) as txn:
                if txn.get(b"id") is None:
                    txn.put(b"id", os.urandom(8))
            # The names of data.mdb and lock.mdb, durable before the first sync() counts
            # (the writer moves its cursors after a sync: a power cut must not take the
            # file those events are in).
            sync_dir(path)

    def close(self) -> None:
        self.env.close()

    def replaced(self) -> bool:
        """Whether the store at this handle's path is no longer the one it reads (the
        events process set it aside and made a new one there, or it is gone).  One stat."""
        return _identity(self.path) != self.file

    def successor(self) -> EventStore | None:
        """A read-only handle on the store now at this one's path when it was replaced
        (see the module's text, "Readers follow a store made anew"); None while it is
        not: the same one, none there yet, or one that cannot be read yet (damaged, or
        made but without its id yet) -- the caller keeps this handle and asks again at
        its next poll or request."""
        if not self.replaced():
            return None
        try:
            new = EventStore(self.path, map_size=self.map_size, retention=self.retention,
                             readonly=True, max_readers=self.max_readers)
        except (OSError, lmdb.Error) as exc:
            if not self._told:
                self._told = True
                log.warning("events store %s: the store there is not the one read until now, "
                            "and it cannot be read yet (%s); trying again", self.path, exc)
            return None
        try:
            ready = new.store_id() != 0
        except lmdb.Error:
            ready = False
        if not ready:         # (made, its first transaction not committed yet)
            new.close()
            return None
        log.warning("events store %s was made anew (the old one set aside); reading the new "
                    "one", self.path)
        return new

    # ------------------------------------------------------------- writing

    def append(self, events: list[dict]) -> int:
        """Store *events* in one transaction; the last seq assigned (the previous one if none).

        An event whose ``event_id`` is already stored is skipped (a replay
        after a crash).  Durable when it returns.  StoreFull when the map
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
        except DAMAGED as exc:
            raise StoreDamaged(self.path, exc) from None

    def _append(self, events: list[dict]) -> int:
        # Keys are gathered per database and written with one putmulti each, in key
        # order (one call per database instead of one per key, and neighbouring keys
        # land on the pages just touched): a quarter less CPU per event than a put per
        # key, measured in one process (bench/RESULTS.md, "The events store's append").
        # The keys are those of _index_keys (which prune uses), made here without its
        # generator and with the repeating ones (type, bounce class, campaign, and the
        # counter prefixes of those) cached: the events process spent most of its time
        # in this loop (bench/RESULTS.md, "The events process's append, streamlined").
        now = time.time()
        per_minute: dict[int, dict[bytes, int]] = {}   # minute -> counter prefix -> events
        evs: list = []
        times: list = []
        rcpt: list = []
        msg: list = []
        tx: list = []
        bcls: list = []
        typ: list = []
        camp: list = []
        mid: list = []
        index_mid = "mid" in self.idx
        cached = self._cached
        campaigns = self._campaigns
        encode = _enc.encode
        event_keys = _event_keys
        pack_ts = _TS.pack
        pack_seq = _U64.pack
        last_minute = -1
        per = per_minute
        with self.env.begin(write=True) as txn:
            v = txn.get(b"seq", db=self.meta)
            seq = _U64.unpack(v)[0] if v is not None else 0
            ids = self.ids
            put = txn.put
            for ev in events:
                # (the keys not cached below, and the time, in one typed call)
                ms, eid, rcpt_k, msg_k, mid_k, tx_k, tx_p = event_keys(ev, index_mid)
                if ms < 0:
                    ms = event_time(ev, now)
                tk = pack_ts(ms, seq + 1)
                # (a replayed event: its id is stored, the put adds nothing and says so)
                if eid is not None and not put(eid, tk, db=ids, overwrite=False):
                    continue
                get = ev.get
                seq += 1
                evs.append((pack_seq(seq), tk[:8] + encode(ev)))
                minute = ms // 60000
                if minute != last_minute:
                    last_minute = minute
                    per = per_minute.get(minute)
                    if per is None:
                        per = per_minute[minute] = {}
                per[_ALL] = per.get(_ALL, 0) + 1
                kind = get("type")
                if kind not in (None, ""):
                    entry = cached("type", kind)
                    # (the time entry keeps _key(kind or ""): b"" for a falsy type, 0 or False)
                    times.append((tk, entry[0] if kind else b""))
                    typ.append((entry[0], tk))
                    per[entry[1]] = per.get(entry[1], 0) + 1
                else:
                    times.append((tk, b""))
                if rcpt_k is not None:
                    rcpt.append((rcpt_k, tk))
                if msg_k is not None:
                    msg.append((msg_k, tk))
                if tx_k is not None:
                    tx.append((tx_k, tk))
                    per[tx_p] = per.get(tx_p, 0) + 1
                v = get("bounce_class")
                if v not in (None, ""):
                    entry = cached("bcls", v)
                    bcls.append((entry[0], tk))
                    per[entry[1]] = per.get(entry[1], 0) + 1
                if mid_k is not None:
                    mid.append((mid_k, tk))
                v = get("campaign_id")
                if v:
                    v = str(v)
                    keys = campaigns.get(v)
                    if keys is None:
                        keys = self._campaign_keys(v)
                    for k, p in keys:
                        camp.append((k, tk))
                        per[p] = per.get(p, 0) + 1
            if evs:
                txn.cursor(db=self.ev).putmulti(evs, append=True)
                times.sort()
                txn.cursor(db=self.time).putmulti(times)
                idx = self.idx
                for name, keys in (("rcpt", rcpt), ("msg", msg), ("tx", tx), ("bcls", bcls),
                                   ("type", typ), ("mid", mid), ("camp", camp)):
                    if keys:
                        keys.sort()
                        txn.cursor(db=idx[name]).putmulti(keys)
            if per_minute:
                self._add_counts(txn, per_minute)
            txn.put(b"seq", _U64.pack(seq), db=self.meta)
        return seq

    def _cached(self, name: str, value) -> tuple[bytes, bytes]:
        """(index key, counter prefix) of a value of a counted index with few values.

        Only strings are kept: values of other types can be equal and print differently
        (0.0 and -0.0, [1] and [True]), so one could be given the other's key.
        """
        if value.__class__ is not str:
            k = _key(value)
            return k, _counter(name, k)
        ck = (name, value)
        entry = self._prefixes.get(ck)
        if entry is None:
            if len(self._prefixes) >= MAX_CACHED_CAMPAIGNS:
                self._prefixes.clear()
            k = _key(value)
            entry = self._prefixes[ck] = (k, _counter(name, k))
        return entry

    def _campaign_keys(self, camp: str) -> list[tuple[bytes, bytes]]:
        """The ``camp`` keys of a campaign id with their counter prefixes (cached)."""
        if len(self._campaigns) >= MAX_CACHED_CAMPAIGNS:
            self._campaigns.clear()
        keys = self._campaigns[camp] = [(k, _counter("camp", k)) for k in campaign_keys(camp)]
        return keys

    def _index_keys(self, ev: dict):
        for name, field in _INDEX_FIELDS:
            v = ev.get(field)
            if v not in (None, ""):
                yield name, _key(v)
        if ev.get("type") == "injection" and "mid" in self.idx:
            mid = _mid_key(ev.get("message_id_header"))
            if mid is not None:
                yield "mid", mid
        camp = ev.get("campaign_id")
        if camp:
            camp = str(camp)
            keys = self._campaigns.get(camp)
            if keys is None:
                keys = self._campaign_keys(camp)
            for k, _ in keys:
                yield "camp", k

    def _add_counts(self, txn, per_minute: dict) -> None:
        """Add an append's events to the minute counters (minute -> prefix -> events).

        One getmulti of the counters there are and one putmulti of the new totals, in key
        order: what a _bump per counter did (an append only adds, so none reaches 0) in
        two calls instead of two a counter -- an HTTP injection's transmission id has a
        counter of its own, so there are about as many counters as events.
        """
        counts = {}
        for minute, per in per_minute.items():
            mb = _MIN.pack(minute)
            for prefix, n in per.items():
                counts[prefix + mb] = n
        keys = sorted(counts)
        cur = txn.cursor(db=self.count_db)
        unpack = _U64.unpack
        for k, v in cur.getmulti(keys):
            counts[k] += unpack(v)[0]
        pack = _U64.pack
        cur.putmulti([(k, pack(counts[k])) for k in keys])

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

    def store_id(self) -> int:
        """This store's identity (made with it, 63 bits, never 0); 0 when the writer has
        not given it one yet (a store written before ids existed, opened read-only)."""
        with self.env.begin(db=self.meta) as txn:
            v = txn.get(b"id")
        return ((_U64.unpack(v)[0] >> 1) or 1) if v is not None else 0

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
                # (one unreadable: an event of no type, which no webhook takes, and the
                # reader's cursor moves past it)
                ev = _event(v, k, "read as an empty event")
                out.append((_U64.unpack(k)[0], {} if ev is None else ev))
                if len(out) >= limit:
                    break
        return out

    def originals(self, *, queue_ids=(), message_id: str = "", recipients=(),
                  limit: int = MAX_ORIGINAL_EVENTS) -> list[dict]:
        """The stored events of one original message (for a report about it), newest first.

        The message is the first of *queue_ids* (our queue ids, e.g. from a
        VERP return path) that has events, else the one whose injection
        carried the ``Message-ID`` header *message_id* (angle brackets
        optional).  At most *limit* events; [] when nothing matches.
        *recipients* (the addresses the report names, lower case): only their
        events when the message has any -- a message of many recipients has more
        than *limit* events, and theirs need not be among its newest.
        """
        for qid in queue_ids:
            if qid:
                found = self._message_events(str(qid).lower(), recipients, limit)
                if found:
                    return found
        mid = _mid_key(message_id)
        db = self.idx.get("mid")
        if db is None and mid:
            try:    # made by the writer since this handle was opened
                db = self.idx["mid"] = self.env.open_db(b"mid", dupsort=True, dupfixed=True,
                                                        create=False)
            except lmdb.Error:
                db = None
        if not mid or db is None:
            return []
        qids = []
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=db)
            if cur.set_key(mid):
                for tk in cur.iterprev_dup(keys=False, values=True) if cur.last_dup() else ():
                    raw = txn.get(bytes(tk[8:]), db=self.ev)
                    if raw is not None:
                        ev = _event(bytes(raw), tk[8:], "passed over")
                        qid = None if ev is None else ev.get("message_id")
                        if qid and qid not in qids:
                            qids.append(qid)
                    if len(qids) >= MAX_MESSAGE_ID_MATCHES:
                        break
        for qid in qids:   # newest first: a Message-ID used twice finds the latest message
            found = self._message_events(qid, recipients, limit)
            if found:
                return found
        return []

    def _message_events(self, qid: str, recipients, limit: int) -> list[dict]:
        """The events of message *qid*: of *recipients* only when it has any of theirs."""
        if recipients:
            found = self.query({"messages": [qid], "recipients": list(recipients)},
                               per_page=limit)[0]
            if found:
                return found
        return self.query({"messages": [qid]}, per_page=limit)[0]

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
        hi = _TS.pack(max(0, int(end * 1000)), 0) if end is not None else b"\xff" * 16
        after = decode_cursor(cursor) if cursor and cursor != "initial" else None
        matcher = _Matcher(filters)
        try:
            return self._query(filters, matcher, lo, hi, after, per_page, max_scan)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self._query(filters, matcher, lo, hi, after, per_page, max_scan)

    def _query(self, filters, matcher, lo, hi, after, per_page, max_scan):
        with self.env.begin() as txn:
            name, keys, exact = self._plan(txn, filters)
            total = 0
            counted = False
            if exact and (name is None or name in COUNTED) and \
                    (name != "camp" or len(keys) == 1):
                # total from the minute counters
                total, counted = self._count(txn, name, keys, lo, hi, max_scan)
            budget = [max_scan]
            top = min(hi, after) if after is not None else hi
            # The page: from the cursor down.  Past the scan budget the page
            # may be short, and its cursor is where the walk stopped.
            out, last, more, found = self._page(txn, name, keys, lo, top, exact, matcher,
                                                per_page, budget, counted)
            if not counted:
                total = found
                if after is not None and budget[0] > 0:
                    # the matches before the cursor count too
                    total += self._page(txn, name, keys, after, hi, exact, matcher, 0,
                                        budget, False)[3]
        nxt = encode_cursor(*_TS.unpack(last)) if more and last is not None else None
        return out, nxt, total

    def _page(self, txn, name, keys, lo, hi, exact, matcher, per_page, budget, counted):
        """Walk [lo, hi) newest first: (page, its last key, more after it, matches seen).

        Stops when the page is full and one more match is seen (*counted*:
        the total is known) or when *budget* [entries] is spent.
        """
        out: list[dict] = []
        found = 0
        last = None
        more = False
        get = txn.get
        evdb = self.ev
        left = budget[0]
        last_tk = None
        for tk in self._stream(txn, name, keys, lo, hi):
            if left <= 0:
                more = True           # the rest is not read: the next page goes on
                if len(out) < per_page:
                    last = last_tk    # from where this walk stopped
                break
            left -= 1
            last_tk = tk
            ev = None
            if not exact:
                raw = get(tk[8:], db=evdb)
                if raw is None:
                    continue
                ev = _event(raw, tk[8:], "passed over")
                if ev is None:
                    continue
                if not matcher(ev):
                    continue
            found += 1
            if len(out) < per_page:
                if ev is None:
                    raw = get(tk[8:], db=evdb)
                    if raw is None:
                        continue
                    ev = _event(raw, tk[8:], "passed over")
                    if ev is None:
                        continue
                ev["_ts"] = _U64.unpack(tk[:8])[0]
                out.append(ev)
                last = tk
            elif per_page:
                more = True
                if counted:
                    break
        budget[0] = left
        return out, last, more, found

    def _plan(self, txn, filters: dict) -> tuple[str | None, list[bytes], bool]:
        """(index to walk or None for the time index, its keys, whether its entries all match).

        The index is that of the indexed filter with the fewest entries.  Its
        entries all match when it is the only filter and none of its values was cut to
        an index key (MAX_KEY octets) or, for campaigns, to its first MAX_RUN tokens.
        """
        best = None
        for param, dbname in INDEXED.items():
            values = filters.get(param)
            if not values:
                continue
            name = dbname.decode()
            cur = txn.cursor(db=self.idx[name])
            keys = []
            cost = 0
            decides = True
            for v in values:
                if param == "campaigns":
                    toks = tokens(str(v))
                    if not toks:
                        continue
                    if len(toks) > MAX_RUN:
                        decides = False     # its first run, then checked on the event
                    k = _key(" ".join(toks[:MAX_RUN]))
                else:
                    k = _key(v)
                if len(k) >= MAX_KEY:
                    # (the value's first MAX_KEY octets, maybe those of longer values
                    # too: its entries are candidates, checked on the event)
                    decides = False
                keys.append(k)
                cost += cur.count() if cur.set_key(k) else 0
            keys = list(dict.fromkeys(keys))
            if best is None or cost < best[0]:
                best = (cost, name, keys, decides)
        if best is None:
            return None, [], not filters
        cost, name, keys, decides = best
        return name, keys, decides and len(filters) == 1

    def _stream(self, txn, name: str | None, keys: list[bytes], lo: bytes, hi: bytes):
        """time+seq keys of the candidates in [lo, hi), newest first."""
        if name is None:
            return self._walk_time(txn, lo, hi)
        db = self.idx[name]
        gens = [self._walk_dups(txn, db, k, lo, hi) for k in keys]
        if not gens:
            return iter(())
        # several values: their streams merged (an event is in two of them only
        # for campaign tokens: duplicates dropped)
        return gens[0] if len(gens) == 1 else _dedupe(heapq.merge(*gens, reverse=True))

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

    def _count(self, txn, name: str | None, keys: list[bytes], lo: bytes, hi: bytes,
               max_scan: int) -> tuple[int, bool]:
        """(events in [lo, hi) under *keys* of index *name* (None: all), whether exact).

        Whole minutes come from the counters; the partial minutes at the two
        ends are walked (at most *max_scan* entries).
        """
        lo_ms = _TS.unpack(lo)[0]
        hi_ms = min(_TS.unpack(hi)[0], 2 ** 62)
        first_full = -(-lo_ms // 60000)       # first minute wholly inside
        end_full = hi_ms // 60000             # minutes before this one are wholly inside
        prefixes = [_ALL] if name is None else [_counter(name, k) for k in keys]
        total = 0
        if first_full < end_full:
            cur = txn.cursor(db=self.count_db)
            a = _MIN.pack(min(first_full, 2 ** 32 - 1))
            b = _MIN.pack(min(end_full, 2 ** 32 - 1))
            for p in prefixes:
                ok = cur.set_range(p + a)
                stop = p + b
                while ok:
                    k = cur.key()
                    if k >= stop:
                        break
                    total += _U64.unpack(cur.value())[0]
                    ok = cur.next()
            edges = [(lo_ms, first_full * 60000), (end_full * 60000, hi_ms)]
        else:
            edges = [(lo_ms, hi_ms)]
        scanned = 0
        for a, b in edges:
            if a >= b:
                continue
            for _ in self._stream(txn, name, keys, _TS.pack(a, 0), _TS.pack(b, 0)):
                scanned += 1
                if scanned > max_scan:
                    return total, False
                total += 1
        return total, True

    # ------------------------------------------------------------- pruning

    def prune(self, now: float, keep_from_seq: int, chunk: int = DEFAULT_CHUNK,
              max_chunks: int = 1000, full: bool = False, sweep: bool = True,
              finish: bool = True) -> int:
        """Delete events older than the retention (and the oldest when nearly full); how many.

        Never deletes an event with seq >= *keep_from_seq*.  At most *chunk*
        events and about PRUNE_PIECE_SECONDS per write transaction (the events
        process's pieces, :meth:`prune_piece`: the entries kept for a webhook that it
        passes over count in the time), at most *max_chunks* transactions per
        call (call again later for the rest: it goes on where this one stopped).
        *full*: an append has just raised :class:`StoreFull`; the oldest are
        deleted down to PRUNE_TARGET whatever :meth:`usage` says (the pages it
        counts are not all the map: pages freed but still held by a reader's
        snapshot fill it too).

        *finish* False (the events process): the prune is only begun -- or, when
        one is under way, given this *now* and *keep_from_seq* -- and the caller runs it
        a transaction at a time between its appends (:meth:`pruning`,
        :meth:`prune_piece`), so that they never wait for millions of deletions (a
        lowered retention, a downtime); with *full*, one transaction of the oldest
        events (*chunk* and PRUNE_PIECE_SECONDS at most) is run at once, for the append
        to go on (it may delete none when it passed only kept entries: the next one
        goes on from there).

        Unreadable (or missing) events deleted leave a sweep for their index entries
        pending (:meth:`sweep`); *sweep*: it is run to its end before this returns, in
        its bounded transactions.  The events process passes False and runs one piece
        between two turns of its reading instead (:meth:`sweeping`), so that its
        appends do not wait for a whole walk of the indexes.
        """
        if not self._sweep_pending and not self.readonly:
            # (a sweep given up for a full map: pruning makes room, it may go on)
            with self.env.begin(db=self.meta) as txn:
                self._sweep_pending = txn.get(_SWEEP_AT) is not None
        self._begin_prune(now, keep_from_seq, full)
        n = 0
        # (each transaction bounded as the events process's are, in deletions and time:
        # entries kept for a webhook are passed over without counting as deletions)
        if full:
            n += self._prune_step(chunk)        # room at once
            self._release()
        if finish:
            for _ in range(max_chunks):
                if self._pruning is None:
                    break
                n += self._prune_step(chunk)
        if sweep:
            for _ in range(MAX_SWEEP_PIECES):
                if not self.sweep():
                    break
        return n

    def _begin_prune(self, now: float, keep_from_seq: int, full: bool) -> None:
        """Begin a prune (see :meth:`prune`), or give the one under way the new cutoff and
        *keep_from_seq*: it goes on from where it is (what it passed is deleted, or kept
        by the seqs it was given, or appended since with an old time: the next prune's)."""
        cutoff = _TS.pack(max(int((now - self.retention) * 1000), 0), 0)
        job = self._pruning
        if job is None:
            job = self._pruning = _Pruning(cutoff)
        else:
            job.cutoff = cutoff
            if not job.oldest:
                job.stop = cutoff
        # (the latest: a webhook made since may need less, and its events must stay)
        job.keep = keep_from_seq
        if full and not job.full:
            job.full = True
            if not job.oldest:
                self._to_oldest(job, "full ([events] store_max_size %d octets)"
                                % self.map_size)

    def _release(self) -> None:
        """Commit one more (tiny) transaction: LMDB gives the pages a transaction freed to
        the second one after it, not the next (that one may still need the previous
        state), so without it the append right after a full store's prune found no room
        -- for good when that prune had deleted the last deletable events (a prune with
        nothing to delete commits nothing)."""
        try:
            with self.env.begin(write=True, db=self.meta) as txn:
                txn.put(b"pruned", _U64.pack(self.env.info()["last_txnid"]))
        except lmdb.MapFullError:
            pass                 # (not even that: the next retry tries again)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)

    def _to_oldest(self, job: _Pruning, why: str) -> None:
        log.warning("events store: %s; deleting the oldest events within the retention", why)
        job.oldest = True
        job.stop = b"\xff" * 16
        job.resume = b""

    def pruning(self) -> bool:
        """Whether a prune is under way (:meth:`prune_piece` has work).  No look-up."""
        return self._pruning is not None

    def prune_piece(self, chunk: int = DEFAULT_CHUNK,
                    max_seconds: float = PRUNE_PIECE_SECONDS) -> bool:
        """One transaction of the prune under way: at most *chunk* events deleted and about
        *max_seconds* (entries kept for a webhook count in the time too); whether some of
        it is still to do.  Events appended between two pieces are never this prune's
        (their seqs are at or above the *keep_from_seq* it was given, or it was given a
        lower one since), and a piece that meets a full map deletes fewer, not none."""
        if self._pruning is None:
            return False
        try:
            self._prune_step(chunk, max_seconds)
        except DAMAGED as exc:
            raise StoreDamaged(self.path, exc) from None
        return self._pruning is not None

    def _prune_step(self, chunk: int, seconds: float = PRUNE_PIECE_SECONDS) -> int:
        """One transaction of the prune under way: at most *chunk* deletions and about
        *seconds*; how many events it deleted.  Moves to the oldest
        events when the retention's are done and the store is nearly full, and ends the
        prune when there is nothing more to do."""
        job = self._pruning
        k, job.resume = self._prune_chunk(job.stop, job.keep, chunk, job.resume,
                                          time.monotonic() + seconds)
        job.n += k
        job.txns += 1
        # (the oldest phase ends at PRUNE_TARGET once past the retention's cutoff: it
        # walks in time order, what it passed that had expired is deleted)
        if job.resume is not None and not (job.oldest and job.resume >= job.cutoff and
                                           self.usage() <= PRUNE_TARGET * self.map_size):
            return k
        used = self.usage()
        if not job.oldest and used > PRUNE_FRACTION * self.map_size:
            self._to_oldest(job, "%d of %d octets used ([events] store_max_size)"
                            % (used, self.map_size))
            return k
        self._pruning = None
        if job.txns > 1:
            log.info("events store: %d event(s) pruned in %.1f s (%d transaction(s))",
                     job.n, time.monotonic() - job.t0, job.txns)
        if used > WARN_FRACTION * self.map_size:
            if not self._warned:
                log.warning("events store: %d of %d octets used ([events] store_max_size); "
                            "raise it or lower [events] retention", used, self.map_size)
                self._warned = True
        else:
            self._warned = False
        return k

    def _prune_chunk(self, stop: bytes, keep_from_seq: int, chunk: int, resume: bytes,
                     deadline: float | None = None) -> tuple[int, bytes | None]:
        """Delete up to *chunk* events with time key < *stop*, from *resume* on, in one
        transaction (committed at *deadline*, time.monotonic(), when given); how many,
        and where the next one resumes (None: at *stop*).

        A deletion needs free pages too (copy on write): in a full map the
        chunk is halved until one fits.
        """
        while True:
            try:
                return self._prune_txn(stop, keep_from_seq, chunk, resume, deadline)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                if chunk <= 1:
                    log.error("events store: full ([events] store_max_size %d octets); not "
                              "even one event could be deleted", self.map_size)
                    return 0, None
                chunk //= 2

    def _prune_txn(self, stop: bytes, keep_from_seq: int, chunk: int, resume: bytes,
                   deadline: float | None = None) -> tuple[int, bytes | None]:
        n = 0
        seen = 0          # time entries looked at (the clock read once in 64, not first)
        counts: dict[bytes, int] = {}
        bad: dict[bytes, bytes] = {}      # unreadable events deleted: time key -> minute
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self.time)
            ok = cur.set_range(resume) if resume else cur.first()
            while ok:
                tk = cur.key()
                if tk >= stop:
                    return self._finish_prune(txn, counts, n, bad), None
                if n >= chunk or (deadline is not None and seen and not seen & 63
                                  and time.monotonic() >= deadline):
                    tk = bytes(tk)
                    self._finish_prune(txn, counts, n, bad)
                    return n, tk
                seen += 1
                seq = _U64.unpack(tk[8:])[0]
                if seq >= keep_from_seq:
                    ok = cur.next()
                    continue
                tk = bytes(tk)
                raw = txn.get(tk[8:], db=self.ev)
                minute = _MIN.pack(_U64.unpack(tk[:8])[0] // 60000)
                counts[_ALL + minute] = counts.get(_ALL + minute, 0) - 1
                if raw is None:
                    # (damage too: a time entry without its event; its entries swept for)
                    log.error("events store: the event of seq %d is missing; its time "
                              "entry deleted", seq)
                    bad[tk] = minute
                else:
                    ev = _event(raw, tk[8:], "deleted")
                    if ev is None:
                        # (its index keys are its values, unreadable: swept for below)
                        bad[tk] = minute
                        ev = {}
                    for name, k in self._index_keys(ev):
                        txn.delete(k, tk, db=self.idx[name])
                        if name in COUNTED:
                            ck = _counter(name, k) + minute
                            counts[ck] = counts.get(ck, 0) - 1
                    eid = ev.get("event_id")
                    if eid not in (None, ""):
                        txn.delete(_key(eid), db=self.ids)
                    txn.delete(tk[8:], db=self.ev)
                ok = cur.delete()     # moves to the next entry
                if ok and not cur.key():
                    ok = False
                n += 1
            self._finish_prune(txn, counts, n, bad)
        return n, None

    def _finish_prune(self, txn, counts: dict, n: int, bad: dict) -> int:
        if bad:
            self._queue_sweep(txn, bad)
        for ck, d in counts.items():
            self._bump(txn, ck, d)
        counts.clear()
        return n

    def _queue_sweep(self, txn, bad: dict[bytes, bytes]) -> None:
        """Leave a sweep pending for the index entries, event_id entries and counts of the
        unreadable (or missing) events *bad* (time key -> minute) this prune transaction
        deletes, in the same transaction (a restart goes on with it).

        Their values (recipient, campaign, event_id...) cannot be read, and an index is
        keyed by them: each index is walked key by key (one look-up of the time keys'
        span under each), and the ``ids`` database entry by entry -- a walk of the
        whole store's indexes (seconds for millions of events), done by :meth:`sweep`
        in pieces of its own transactions.  A sweep already under way starts again
        from the first index with the new events added (those it passed may hold
        theirs).  Damage is rare: otherwise nothing is pending and nothing is walked.
        """
        for tk, minute in bad.items():
            txn.put(_SWEEP_BAD + tk, minute, db=self.meta)
        txn.put(_SWEEP_AT, b"\x00" + _NO_DUP, db=self.meta)
        self._bad = None            # (read again: this transaction may yet be aborted)
        if not self._sweep_pending:
            self._sweep_pending = True
            self._sweep_log[:] = [0, time.monotonic(), 0]
        bad.clear()

    def sweeping(self) -> bool:
        """Whether a sweep is pending (:meth:`sweep` has work).  No look-up: the writer's."""
        return self._sweep_pending

    def sweep(self, max_entries: int = SWEEP_PIECE,
              max_seconds: float = SWEEP_PIECE_SECONDS) -> bool:
        """One piece of the pending sweep (:meth:`_queue_sweep`) in one write transaction
        of at most *max_entries* index entries looked at and about *max_seconds*;
        whether some is still pending.

        It resumes where the last piece stopped (the position is in ``meta``, committed
        with what the piece deleted).  Events appended between two pieces are never
        the sweep's: their time keys hold seqs never given before, and the sweep deletes
        only entries whose value is one of its events' time keys; a key appended before
        where the sweep is holds none of its entries.  The counters of a piece's
        deletions are lowered in its transaction.  In between, a query may meet an
        entry of an event already deleted (it passes over it; a total counted from the
        index may be that much too high until the sweep is done), and a replay of such
        an event's event_id is still skipped as stored."""
        if not self._sweep_pending:
            return False
        while True:
            try:
                # (at least a key and one of its entries: each piece moves on)
                return self._sweep_piece(max(2, max_entries), max_seconds)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                if max_entries <= 2:
                    log.error("events store: full ([events] store_max_size %d octets); the "
                              "sweep for unreadable events' entries waits for the next "
                              "prune", self.map_size)
                    self._sweep_pending = False      # (prune() looks again)
                    return False
                max_entries //= 2
            except DAMAGED as exc:
                raise StoreDamaged(self.path, exc) from None

    def _sweep_piece(self, max_entries: int, max_seconds: float) -> bool:
        deadline = time.monotonic() + max_seconds
        seen = 0
        swept = 0
        counts: dict[bytes, int] = {}

        def spent() -> bool:
            # (the clock read once in 64 entries, never before the first: each piece
            # moves on by at least one entry)
            return seen >= max_entries or (seen and not seen & 63
                                           and time.monotonic() >= deadline)

        with self.env.begin(write=True) as txn:
            at = txn.get(_SWEEP_AT, db=self.meta)
            if at is None:
                self._sweep_pending = False
                return False
            if self._bad is None:
                self._bad = self._read_bad(txn)
            bad = self._bad
            stage, dup, key = at[0], at[1:17], at[17:]
            first, last = (min(bad), max(bad)) if bad else (b"", b"")
            stop = None            # where this piece stops: (stage, dup, key)
            while stage < len(_SWEEP_STAGES) and bad and stop is None:
                name = _SWEEP_STAGES[stage]
                if name == "ids":
                    cur = txn.cursor(db=self.ids)
                    ok = cur.set_range(key) if key else cur.first()
                    while ok:
                        if spent():
                            stop = (stage, _NO_DUP, bytes(cur.key()))
                            break
                        seen += 1
                        if cur.value() in bad:
                            ok = cur.delete() and bool(cur.key())   # (moves to the next)
                            swept += 1
                        else:
                            ok = cur.next()
                elif name in self.idx:
                    counted = name in COUNTED
                    cur = txn.cursor(db=self.idx[name])
                    ok = cur.set_range(key) if key else cur.first()
                    while ok:
                        k = bytes(cur.key())
                        if spent():
                            stop = (stage, _NO_DUP, k)
                            break
                        seen += 1
                        # (a key's entries from the first time key on, up to the last:
                        # about one look-up a key however many unreadable events there are)
                        lo = dup if k == key and dup > first else first
                        found = cur.set_range_dup(k, lo)
                        while found:
                            tk = cur.value()
                            if tk > last:
                                break
                            if spent():
                                stop = (stage, bytes(tk), k)
                                break
                            seen += 1
                            minute = bad.get(tk)
                            if minute is None:
                                found = cur.next_dup()
                                continue
                            cur.delete()      # (moves to the next entry, maybe of another key)
                            swept += 1
                            if counted:
                                ck = _counter(name, k) + minute
                                counts[ck] = counts.get(ck, 0) - 1
                            found = cur.key() == k
                        if stop is not None:
                            break
                        ok = cur.set_range(k + b"\x00")   # the next key
                if stop is None:
                    stage, dup, key = stage + 1, _NO_DUP, b""
            for ck, d in counts.items():
                self._bump(txn, ck, d)
            if stop is not None:
                txn.put(_SWEEP_AT, bytes((stop[0],)) + stop[1] + stop[2], db=self.meta)
            else:
                for tk in bad:
                    txn.delete(_SWEEP_BAD + tk, db=self.meta)
                txn.delete(_SWEEP_AT, db=self.meta)
        self._sweep_log[0] += swept
        self._sweep_log[2] += 1
        if stop is not None:
            return True
        entries, t0, pieces = self._sweep_log
        log.warning("events store: %d unreadable or missing event(s) deleted; %d index entries "
                    "of theirs found and deleted in %.3f s (%d transaction(s))", len(bad),
                    entries, time.monotonic() - t0, pieces)
        self._sweep_pending = False
        self._bad = None
        return False

    def _read_bad(self, txn) -> dict[bytes, bytes]:
        """The pending sweep's events: time key -> minute."""
        out = {}
        cur = txn.cursor(db=self.meta)
        ok = cur.set_range(_SWEEP_BAD)
        while ok:
            k = cur.key()
            if not k.startswith(_SWEEP_BAD):
                break
            out[bytes(k[len(_SWEEP_BAD):])] = bytes(cur.value())
            ok = cur.next()
        return out


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the store's data file at *path*; None when there is none."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


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


DEFAULT_DIR = "events"            # [events] store_path's default


def path_in(settings) -> str:
    """The store's directory: [events] store_path, inside state_dir when relative.

    The one place that decides it (the events process writes there, the
    acceptors and the webhooks process read there); an empty store_path is the
    default, never state_dir itself.
    """
    path = getattr(settings.config.events, "store_path", "") or DEFAULT_DIR
    return os.path.join(settings.state_dir, path)


def open_for(settings, readonly: bool = False) -> EventStore | None:
    """The node's store as [events] configures it (None when disabled); after fork."""
    cfg = settings.config.events
    if not cfg.store:
        return None
    return EventStore(path_in(settings), map_size=cfg.store_max_size,
                      retention=cfg.retention, readonly=readonly)
