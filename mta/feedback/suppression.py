"""The suppression list: recipients that must not be mailed, in an LMDB store shared by the node.

Leaf library (no sockets, no bus).  Every process of the node opens the same
environment (``<state_dir>/suppression``, :func:`path_in`) after fork: the
acceptors read it at injection (:meth:`SuppressionList.check`) and write it
through the HTTP API (``/api/v1/suppression-list``, :mod:`mta.api.suppression`),
the spool shards write it when a hard bounce of the invalid-recipient kind
comes back (:func:`bounce_rule`).  LMDB gives readers a consistent snapshot
without locks (a memory map, no system call per lookup), serialises writers
across processes with its own lock, and is crash-safe (copy-on-write pages,
a write is durable when its transaction commits).  Readers killed with -9
leave a stale reader slot, cleared at the next open (``reader_check``).

Layout (three named databases):

- ``rcpt``: key = the lower-cased recipient address (UTF-8, at most
  MAX_ADDRESS octets); value = one flags octet (TRANSACTIONAL |
  NON_TRANSACTIONAL: which types are suppressed, so a lookup reads one octet)
  then msgpack ``{type: [source, description, created, updated]}``: one
  record per (recipient, type), as SparkPost keeps them.
- ``updated``: the search index, key = updated time (8 octets, big-endian
  milliseconds) + type octet + address; value = the entry's source as one
  octet (SOURCE_CODES), so that a search by source reads no record.  Search
  and its paging walk it in time order.  A row without that octet (written by
  an earlier version) has the record read for its source.
- ``counts``: records per source (``summary``), kept in the same transaction
  as the records.

Bounded: the environment's map size (``suppression.max_size``) is the most it
can hold; a write that would exceed it raises :class:`ListFull` (the API says
507, a bounce-rule addition is logged) and leaves the store as it was.  One
record takes roughly 120-200 octets with its index (10 million: about 2 GB).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import os
import re
import shutil
import struct
import time
from typing import Annotated, Literal

import logging

import idna
import lmdb
import msgspec

from mta.idn import alabels
from mta.store import MAX_TIME, make_dirs, sync_dir

log = logging.getLogger("mta.suppression")

TRANSACTIONAL = 1
NON_TRANSACTIONAL = 2
BOTH = TRANSACTIONAL | NON_TRANSACTIONAL
TYPES = {"transactional": TRANSACTIONAL, "non_transactional": NON_TRANSACTIONAL}
TYPE_NAMES = {TRANSACTIONAL: "transactional", NON_TRANSACTIONAL: "non_transactional"}

# SparkPost's sources (read-only in the API: entries added there are "Manually Added").
MANUAL = "Manually Added"
BOUNCE_RULE = "Bounce Rule"
INVALID_RECIPIENT_CLASS = "10"   # the bounce class whose failures add a Bounce Rule entry
SPAM_COMPLAINT = "Spam Complaint"
SOURCES = (SPAM_COMPLAINT, "List Unsubscribe", BOUNCE_RULE, "Unsubscribe Link", MANUAL,
           "Compliance")
SUMMARY_KEYS = {s: s.lower().replace(" ", "_") for s in SOURCES}
# A source as the value of its entry's index row (stored: a code is never renumbered or
# reused).  A source not here has an empty value, as rows written before had.
SOURCE_CODES = {SPAM_COMPLAINT: b"\x01", "List Unsubscribe": b"\x02", BOUNCE_RULE: b"\x03",
                "Unsubscribe Link": b"\x04", MANUAL: b"\x05", "Compliance": b"\x06"}

MAX_ADDRESS = 320            # octets of an address kept (LMDB keys: at most 511)
MAX_DESCRIPTION = 1024       # characters of a description kept
MAX_SCAN = 1_000_000         # index rows one search may read (total_count beyond: a lower bound)

# SparkPost's reason for a suppressed recipient (its bounce of class 25).
# Envelope params key: indexes of the message's recipients found on the list at
# injection (set by the acceptor, read by the spool at the commit).
PARAM = "suppressed"

REASON_CODE = 554
REASON_ENHANCED = "5.7.1"
REASON_TEXT = "recipient address was suppressed due to customer policy"
BOUNCE_CLASS = "25"

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict[str, list])
# The records of a value, each part checked as it is decoded (a search by description
# reads one per index row: no Python loop over its parts)
_TIME = Annotated[float, msgspec.Meta(ge=0, lt=MAX_TIME)]
_records_dec = msgspec.msgpack.Decoder(
    dict[Literal["transactional", "non_transactional"], tuple[str, str, _TIME, _TIME]])
_TS = struct.Struct(">Q")


class ListFull(Exception):
    """The store has reached its map size (suppression.max_size)."""


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, "suppression")


# RFC 5322 dot-atom (with RFC 6531's UTF-8): a quoted local part that is one says the same
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
                       r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*")
_QUOTED_PAIR = re.compile(r"\\(.)")


def normalize(address: str) -> str:
    """The one form of a mailbox the list is keyed by, stored and looked up alike.

    Lower case (as SparkPost's list is); a quoted local part that needs no quotes
    (``"foo"@example.com``) without them; a domain in U-labels as its A-labels
    (UTS #46: ``bücher.de`` -> ``xn--bcher-kva.de``, the form DNS and delivery use).
    Otherwise two spellings of one mailbox, one on the list and one in RCPT TO or a
    transmission, would let mail through.  Plain ASCII addresses without quotes (nearly
    all) take the first return.
    """
    a = address.strip().lower()
    if a.isascii() and '"' not in a:
        return a
    local, at, domain = a.rpartition("@")
    if not at:
        return a
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        inner = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if _DOT_ATOM.fullmatch(inner):
            local = inner
    if not domain.isascii():
        # (not a domain IDNA can encode: kept as given; delivery refuses it)
        domain = (alabels(domain) or domain).lower()
    return f"{local}@{domain}"


def _keys(address: str) -> tuple[bytes, ...]:
    """The keys *address* may be stored under: its canonical form (normalize), and the
    form lists written before this canonical form keep (lower case only) when it is
    another -- a domain in U-labels, a quoted local part -- so that those entries still
    suppress, show and delete."""
    legacy = address.strip().lower()
    # (the hot path -- a plain ASCII address without quotes -- lower-cases it once)
    key = legacy if legacy.isascii() and '"' not in legacy else normalize(address)
    if key == legacy:
        return (key.encode("utf-8", "surrogateescape"),)
    return key.encode("utf-8", "surrogateescape"), legacy.encode("utf-8", "surrogateescape")


def _domain_suffixes(domain: str) -> tuple[str, ...]:
    """The key endings of addresses at *domain*, spelt either way: ``@`` and its canonical
    form (A-labels, as keys are written), and its U-labels when it has any (the keys of
    lists written before the canonical form, see _keys)."""
    given = domain.strip().lower().lstrip("@")
    canonical = normalize("x@" + given)[2:]
    forms = {canonical, given}
    if "xn--" in canonical:
        try:
            forms.add(idna.decode(canonical).lower())
        except (idna.IDNAError, UnicodeError, ValueError):
            pass
    return tuple("@" + f for f in sorted(forms))


def iso(ts: float) -> str:
    """``2017-10-01T12:00:00+00:00`` (SparkPost's form of created/updated)."""
    return datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc).isoformat()


def _index_key(updated: float, tbit: int, key: bytes) -> bytes:
    return _TS.pack(int(updated * 1000)) + bytes((tbit,)) + key


class SuppressionList:
    """One process's handle on the node's suppression list (open it after fork)."""

    def __init__(self, path: str, max_size: int, *, sync: bool = True,
                 max_readers: int = 512):
        make_dirs(path)
        try:
            self.env = lmdb.open(path, map_size=max_size, max_dbs=4, subdir=True,
                                 readahead=False, sync=sync, metasync=sync,
                                 max_readers=max_readers)
        except lmdb.Error as exc:
            raise OSError(f"suppression list {path}: {exc}") from None
        if sync:
            # data.mdb's name, durable like its commits (they are synced one by one; a
            # power cut must not take the file with the entries already answered for)
            sync_dir(path)
        self.path = path
        self.max_size = max_size
        self.rcpt = self.env.open_db(b"rcpt")
        self.index = self.env.open_db(b"updated")
        self.counts = self.env.open_db(b"counts")
        try:
            self.env.reader_check()   # slots of readers that died (kill -9)
        except lmdb.Error:
            pass

    def close(self) -> None:
        self.env.close()

    # --------------------------------------------------------------- reading

    def flags(self, address: str) -> int:
        """Which types *address* is suppressed for (TRANSACTIONAL | NON_TRANSACTIONAL), 0: none.

        The hot path: one read transaction and one B-tree lookup in the memory
        map (about 1-2 us).
        """
        keys = _keys(address)
        try:
            with self.env.begin(db=self.rcpt, buffers=True) as txn:
                out = 0
                for key in keys:
                    if len(key) <= MAX_ADDRESS:
                        v = txn.get(key)
                        if v is not None:
                            # (a value without its flags octet is damage: both types)
                            out |= v[0] if v else BOTH
                return out
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)   # another process grew the map: adopt its size
            return self.flags(address)
        except lmdb.Error as exc:
            # (e.g. every reader slot taken): the message is not held up by it
            log.error("suppression list lookup failed: %s; %s not checked", exc, address)
            return 0

    def check(self, address: str, transactional: bool) -> bool:
        """Whether mail of this type (options.transactional) to *address* is suppressed."""
        return bool(self.flags(address) & (TRANSACTIONAL if transactional else NON_TRANSACTIONAL))

    def get(self, address: str, types: int = BOTH) -> list[dict]:
        """The entries of *address* (one per type), as the API shows them."""
        out = []
        with self.env.begin(db=self.rcpt) as txn:
            for key in _keys(address):
                v = txn.get(key) if len(key) <= MAX_ADDRESS else None
                if v is not None:
                    out += [e for e in _entries(key, v) if TYPES[e["type"]] & types]
        return out

    def summary(self) -> dict:
        out = {k: 0 for k in SUMMARY_KEYS.values()}
        total = 0
        with self.env.begin(db=self.counts) as txn:
            for k, v in txn.cursor():
                n = _TS.unpack(v)[0]
                name = SUMMARY_KEYS.get(k.decode(), k.decode().lower().replace(" ", "_"))
                out[name] = out.get(name, 0) + n
                total += n
        out["total"] = total
        return out

    def count(self) -> int:
        with self.env.begin(db=self.rcpt) as txn:
            return txn.stat(self.rcpt)["entries"]

    def search(self, *, start: float | None = None, end: float | None = None,
               types: int = BOTH, sources: frozenset | None = None, domain: str | None = None,
               description: str | None = None, description_strict: bool = False,
               descending: bool = True, per_page: int = 1000, page: int = 1,
               cursor: bytes | None = None, total: int | None = None,
               max_scan: int = MAX_SCAN,
               max_seconds: float | None = None) -> tuple[list, int, bytes | None]:
        """Entries by updated time: (this page, total matching, cursor of the next page or None).

        *cursor* pages: ``b""`` for the first page, then an index key returned by
        the call before (the walk resumes after it; *page* is ignored), with the
        *total* that call returned.  At most *max_scan* index rows are read per
        call: past that, the total is the count so far (a lower bound), and a
        cursor page that is not full ends with a cursor to the last row read, so
        that a sparse filter over a long list is paged through to its end instead
        of stopping early.  *max_seconds* (None: no bound) bounds the call in time
        the same way (the clock read once in 256 rows): a search that reads a record per
        row (``description``) on a slow disk holds its thread that long at most.
        *domain* matches in A-labels and U-labels alike.
        """
        lo = _TS.pack(max(0, int(start * 1000))) if start is not None else b""
        # (a range that ends before 1970 holds nothing: every key is at or after 0)
        hi = _TS.pack(max(0, int(end * 1000) + 1)) if end is not None else None
        dom = _domain_suffixes(domain) if domain else None
        codes = frozenset(SOURCE_CODES[s] for s in sources if s in SOURCE_CODES) \
            if sources else None
        desc = description.lower() if description and not description_strict else description
        paging = cursor is not None
        skip = 0 if paging else max(0, (page - 1) * per_page)
        out: list[dict] = []
        scanned = 0
        last = None
        read = None       # the last index row read
        unfiltered = types == BOTH and not sources and not dom and not desc
        deadline = time.monotonic() + max_seconds if max_seconds is not None else None
        with self.env.begin() as txn:
            known = unfiltered and start is None and end is None   # total from the index size
            if known:
                total = txn.stat(self.index)["entries"]
            # A later cursor page seeks to its cursor: the total came with the cursor (a
            # cursor of an earlier version has none: what follows it is counted)
            counting = not known and (not cursor or total is None)
            if counting:
                total = 0
            cur = txn.cursor(db=self.index)
            if descending:
                if cursor:
                    ok = cur.prev() if cur.set_range(cursor) else cur.last()
                elif hi is not None:
                    ok = cur.prev() if cur.set_range(hi) else cur.last()
                else:
                    ok = cur.last()
                step = cur.prev
            else:
                if cursor:
                    ok = cur.set_range(cursor)
                    if ok and cur.key() == cursor:
                        ok = cur.next()
                else:
                    ok = cur.set_range(lo) if lo else cur.first()
                step = cur.next
            more = False
            rget = txn.get
            while ok:
                k = cur.key()
                if (hi is not None and k >= hi) or (lo and k < lo):
                    break
                scanned += 1
                if scanned > max_scan or (deadline is not None and not scanned & 255
                                          and time.monotonic() >= deadline):
                    if paging and not more and read is not None:
                        more, last = True, read     # go on from here on the next page
                    break
                read = bytes(k)
                tbit = k[8]
                addr = k[9:]
                match = tbit & types
                if match and dom is not None:
                    match = addr.decode("utf-8", "surrogateescape").endswith(dom)
                rec = None      # the record (source, description, created, updated), once read
                if match and codes is not None:
                    code = cur.value()      # (one octet: the record is not read)
                    if code:
                        match = code in codes
                    else:                   # a row of an earlier version: the record says
                        rec = _record(addr, rget(addr, db=self.rcpt), tbit, k)
                        match = rec is not None and rec[0] in sources
                if match and desc:
                    # (the record's description alone: the entry is shaped only when shown)
                    if rec is None:
                        rec = _record(addr, rget(addr, db=self.rcpt), tbit, k)
                    if rec is None:
                        match = False
                    elif (desc not in rec[1].lower()
                          if not description_strict else desc != rec[1]):
                        match = False
                if match:
                    if counting:
                        total += 1
                    if skip:
                        skip -= 1
                    elif len(out) < per_page:
                        if rec is None:
                            rec = _record(addr, rget(addr, db=self.rcpt), tbit, k)
                        if rec is not None:
                            out.append(_shape(bytes(addr).decode("utf-8", "surrogateescape"),
                                              TYPE_NAMES[tbit], rec))
                            last = read
                    else:
                        more = True
                        if not counting:
                            break
                ok = step()
        return out, total, (last if more else None)

    # --------------------------------------------------------------- writing

    def put_many(self, items, source: str = MANUAL, now: float | None = None) -> int:
        """Add or update records: *items* of (address, type bits, description); one transaction.

        The source of a new record is *source*; an existing record keeps its
        created time.  Returns how many records were written.  ListFull when
        the map is full (nothing of this call is kept).  The per-source counts
        are added up and written once, at the end of the transaction.
        """
        now = time.time() if now is None else now
        n = 0
        counts: dict[str, int] = {}
        try:
            with self.env.begin(write=True) as txn:
                for address, tbits, description in items:
                    n += self._put(txn, normalize(address), tbits, source,
                                   (description or "")[:MAX_DESCRIPTION], now, counts)
                self._counts(txn, counts)
        except lmdb.MapFullError:
            raise ListFull(f"the suppression list is full ({self.max_size} octets, "
                           "suppression.max_size)") from None
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.put_many(items, source, now)
        return n

    def _put(self, txn, address: str, tbits: int, source: str, description: str,
             now: float, counts: dict[str, int] | None = None) -> int:
        """Write one address's records; the changes of the per-source counts are added
        up in *counts* when given (the caller writes them: _counts), else written."""
        own = counts is None
        if own:
            counts = {}
        key = address.encode("utf-8", "surrogateescape")
        if not key or len(key) > MAX_ADDRESS:
            return 0
        old = txn.get(key, db=self.rcpt)
        recs = _records(key, old) if old is not None else {}
        if recs is None:
            recs = {}     # (damaged: written anew; its index rows no longer match it)
        n = 0
        for tbit in (TRANSACTIONAL, NON_TRANSACTIONAL):
            if not tbits & tbit:
                continue
            tname = TYPE_NAMES[tbit]
            prev = recs.get(tname)
            created = now
            if prev is not None:
                created = prev[2]
                txn.delete(_index_key(prev[3], tbit, key), db=self.index)
                counts[prev[0]] = counts.get(prev[0], 0) - 1
                src = prev[0] if source == MANUAL else source
            else:
                src = source
            recs[tname] = [src, description, created, now]
            txn.put(_index_key(now, tbit, key), SOURCE_CODES.get(src, b""), db=self.index)
            counts[src] = counts.get(src, 0) + 1
            n += 1
        flags = sum(TYPES[t] for t in recs)
        txn.put(key, bytes((flags,)) + _enc.encode(recs), db=self.rcpt)
        if own:
            self._counts(txn, counts)
        return n

    def _counts(self, txn, deltas: dict[str, int]) -> None:
        for src, delta in deltas.items():
            if delta:
                self._count(txn, src, delta)

    def _count(self, txn, source: str, delta: int) -> None:
        k = source.encode()
        v = txn.get(k, db=self.counts)
        n = (_TS.unpack(v)[0] if v is not None else 0) + delta
        if n > 0:
            txn.put(k, _TS.pack(n), db=self.counts)
        else:
            txn.delete(k, db=self.counts)

    def load_sorted(self, addresses, tbits: int = NON_TRANSACTIONAL, source: str = MANUAL,
                    description: str = "", now: float | None = None,
                    batch: int = 100_000) -> int:
        """Bulk loader for an empty list: *addresses* lower-case and in ascending byte order.

        Appends to the B-trees (no search per key), one transaction per
        *batch* addresses; far faster than :meth:`put_many` (10 million in
        about a minute).  Not for a list in use: records already present are
        not merged (ValueError when the order or emptiness is violated).
        """
        now = time.time() if now is None else now
        tb = _TS.pack(int(now * 1000))
        recs = {TYPE_NAMES[b]: [source, description, now, now]
                for b in (TRANSACTIONAL, NON_TRANSACTIONAL) if tbits & b}
        value = bytes((tbits,)) + _enc.encode(recs)
        code = SOURCE_CODES.get(source, b"")
        n = 0
        it = iter(addresses)
        while True:
            chunk = [a.encode("utf-8", "surrogateescape") for _, a in zip(range(batch), it)]
            if not chunk:
                break
            try:
                with self.env.begin(write=True) as txn:
                    c = txn.cursor(db=self.rcpt)
                    _, added = c.putmulti([(k, value) for k in chunk], append=True)
                    if added != len(chunk):
                        raise ValueError("load_sorted: addresses not in ascending order, or "
                                         "the list is not empty")
                    ci = txn.cursor(db=self.index)
                    for b in (TRANSACTIONAL, NON_TRANSACTIONAL):
                        if tbits & b:
                            ci.putmulti([(tb + bytes((b,)) + k, code) for k in chunk],
                                        append=True)
                    k = source.encode()
                    v = txn.get(k, db=self.counts)
                    per = bin(tbits).count("1")
                    txn.put(k, _TS.pack((_TS.unpack(v)[0] if v else 0) + per * len(chunk)),
                            db=self.counts)
            except lmdb.MapFullError:
                raise ListFull(f"the suppression list is full ({self.max_size} octets)") from None
            n += len(chunk)
        return n

    def delete(self, address: str, types: int = BOTH) -> int:
        """Remove the records of *address* of *types*; how many were removed."""
        return sum(self._delete(key, types) for key in _keys(address))

    def _delete(self, key: bytes, types: int) -> int:
        if not key or len(key) > MAX_ADDRESS:
            return 0
        n = 0
        with self.env.begin(write=True) as txn:
            old = txn.get(key, db=self.rcpt)
            if old is None:
                return 0
            recs = _records(key, old)
            if recs is None:
                # damaged: removed whole (its index rows no longer find it)
                txn.delete(key, db=self.rcpt)
                return max(1, bin(old[0] & BOTH).count("1") if old else 1)
            for tname in list(recs):
                tbit = TYPES[tname]
                if tbit & types:
                    src, _, _, updated = recs.pop(tname)
                    txn.delete(_index_key(updated, tbit, key), db=self.index)
                    self._count(txn, src, -1)
                    n += 1
            if recs:
                flags = sum(TYPES[t] for t in recs)
                txn.put(key, bytes((flags,)) + _enc.encode(recs), db=self.rcpt)
            else:
                txn.delete(key, db=self.rcpt)
        return n


def _records(key: bytes, value) -> dict[str, tuple] | None:
    """The records of a ``rcpt`` value ({type name: (source, description, created,
    updated)}), or None (logged) when it is not what this module writes: LMDB keeps no
    checksums, so a damaged page or a writer's bug gives such a value, and one of them
    must not make every read, write or search that meets it fail."""
    try:
        recs = _records_dec.decode(value[1:])
        if not recs:
            raise ValueError("no record")
        return recs
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        log.error("suppression list: the entry of %r is unreadable (%s); it suppresses "
                  "both types until it is deleted or put again",
                  bytes(key).decode("utf-8", "replace")[:MAX_ADDRESS], exc)
        return None


DAMAGED = "(unreadable record: delete it or add it again)"


def _entries(key: bytes, value: bytes) -> list[dict]:
    addr = key.decode("utf-8", "surrogateescape")
    recs = _records(key, value)
    if recs is None:
        # shown with its types (both when they cannot be read) so that it can be deleted
        flags = (value[0] & BOTH) or BOTH if len(value) else BOTH
        return [_shape(addr, TYPE_NAMES[b], [MANUAL, DAMAGED, 0, 0])
                for b in (NON_TRANSACTIONAL, TRANSACTIONAL) if flags & b]
    return [_shape(addr, tname, r) for tname, r in sorted(recs.items())]


def _record(key: bytes, value, tbit: int, index_key) -> tuple | None:
    """The record (source, description, created, updated) an index row names, or None:
    no record, an unreadable one, or a record updated since that row was written (the
    row of a damaged record that was put again)."""
    if value is None:
        return None
    recs = _records(key, value)
    rec = recs.get(TYPE_NAMES[tbit]) if recs is not None else None
    if rec is None or _TS.unpack(index_key[:8])[0] != int(rec[3] * 1000):
        return None
    return rec


def _shape(address: str, tname: str, rec: list) -> dict:
    """An entry as SparkPost's API shows it (with the deprecated boolean of its type)."""
    source, description, created, updated = rec
    return {"recipient": address, "type": tname, "source": source,
            "description": description, "created": iso(created), "updated": iso(updated),
            tname: True}


def adds_bounce_rule(bounce_class) -> bool:
    """Whether a permanent failure of this ``bounce_class`` adds its recipient to the list.

    Class 10 (Invalid Recipient) only, as SparkPost's Bounce Rule source does: the
    class is the one the failure's bounce event reports (the shipped rules, the
    operator's ``feedback.bounce_rules`` and a response rule's ``bounce_class``), so
    the list and the events always agree.  A block, a full mailbox or a policy
    refusal (classes 20-25, 50-54) is about the sender or the message, not the address.
    """
    return str(bounce_class) == INVALID_RECIPIENT_CLASS


def bounce_description(code: int, enhanced: str, text: str) -> str:
    """SparkPost's Bounce Rule description: ``550: 550 5.1.1 <the reply>``."""
    reply = " ".join(x for x in (str(code), enhanced, text) if x)
    return f"{code}: {reply}"[:MAX_DESCRIPTION]


def open_for(settings) -> SuppressionList | None:
    """The node's list as [suppression] configures it (None when disabled); after fork."""
    cfg = settings.config.suppression
    if not cfg.enabled:
        return None
    return SuppressionList(os.path.join(settings.state_dir, cfg.path), cfg.max_size)


# ------------------------------------------------------------------ damage

SALVAGE_SECONDS = 600.0     # the most a start spends copying a damaged list's entries


def check_at_start(path: str, max_size: int, tick=None) -> str | None:
    """At the supervisor's start, before any process of the node opens the list at
    *path*: the line saying what was done with a damaged list (:func:`check_store`:
    moved aside and rebuilt, :func:`repair`), or None (sound, none yet, or open).

    Only when no other process has the environment open: LMDB grows data.mdb as it
    writes, so a list read while another process creates or writes it can look cut
    short.  Every process that opens it holds a shared fcntl lock on the first octet of
    lock.mdb while it has it open; that octet is locked here, exclusively and without
    waiting, for the check and the repair (a process opening it then waits for them).
    Never in a child, nor at an upgrade or a restart of a child: the list is open then.
    *tick*: called now and then while a list is rebuilt (the supervisor tells systemd
    it is alive: a large list takes seconds to read).
    """
    try:
        fd = os.open(os.path.join(path, "lock.mdb"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                log.warning("suppression list %s: open in another process at this start "
                            "(a process of an earlier run still running?); not checked",
                            path)
                return None
        if os.path.isdir(path + REBUILT):
            aside = _swap_rebuilt(path)
            return (f"suppression list {path}: the start that rebuilt it was cut short "
                    f"before the new list took its place; done now (the damaged one is "
                    f"{aside if os.path.lexists(aside) else 'gone'})")
        why = check_store(path)
        if not why:
            return None
        log.error("suppression list %s: %s; moving it aside and rebuilding it from its "
                  "pages (at most %.0f s)", path, why, SALVAGE_SECONDS)
        return repair(path, max_size, why, tick)
    finally:
        if fd is not None:
            os.close(fd)       # (and the lock with it)


def check_store(path: str) -> str | None:
    """Why the environment at *path* cannot be opened safely, or None (sound, or none yet).

    A ``data.mdb`` shorter than the pages its meta page names (truncated: a partial copy
    or restore, a full disk) is mapped all the same, and the first read of a page past
    its end kills the reader with SIGBUS: every process of the node that opens the list
    would die at its first look-up.  One that is not an LMDB file at all cannot be opened.
    Only the meta pages are read (with pread: no page of the map).  Only for a list no
    process is writing (:func:`check_at_start`): a list being created or grown is short
    of its pages for a moment.  An empty file is one LMDB makes a list in.
    """
    data = os.path.join(path, "data.mdb")
    try:
        size = os.path.getsize(data)
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=4, subdir=True)
    except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as exc:
        return f"not an LMDB environment ({exc})"
    except lmdb.Error as exc:
        # (cannot be read as the host has it -- no permission: not a damaged list)
        raise OSError(f"suppression list {path}: {exc}") from None
    try:
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()
    if size < need:
        return f"data.mdb is {size} octets, shorter than its {need} octets of pages"
    return None


def repair(path: str, max_size: int, reason: str, tick=None) -> str:
    """Move the damaged list at *path* aside (kept for the operator) and make a new one
    there with every entry that can still be read from it; a line saying what was done.

    The new list is made beside it (``<path>.rebuilding``, then ``<path>.rebuilt`` once
    whole and synced) and takes its place by renames: a start killed while it is made
    leaves the damaged list where it was, to be rebuilt at the next one, never a part
    of the entries taken for the whole list.

    LMDB cannot read a list whose root pages are gone (copy-on-write puts them at the
    end of the file: a truncation loses them first), so the entries are taken from the
    file's pages themselves (:func:`_scan`, plain reads with every offset checked: a
    page that is not one is passed over).  Pages freed by later writes still hold
    earlier versions of entries: the newest version of each address is kept, and an
    entry deleted before the damage may come back (it suppresses; delete it again).
    """
    building = path + ".rebuilding"
    if os.path.lexists(building):        # (a rebuild cut short: the damaged list is there)
        shutil.rmtree(building)
    best: dict[bytes, tuple[float, bytes]] = {}
    bad = 0
    stopped = ""
    deadline = time.monotonic() + SALVAGE_SECONDS
    try:
        for key, value in _scan(os.path.join(path, "data.mdb"), deadline, tick):
            # (an index row's key starts with its time: zero octets until 2527)
            if b"@" not in key or key.startswith(b"\x00"):
                continue
            recs = _records(key, value) if len(key) <= MAX_ADDRESS else None
            if recs is None:
                bad += 1
                continue
            newest = max(r[3] for r in recs.values())
            if key not in best or best[key][0] < newest:
                best[key] = (newest, value)
    except OSError as exc:
        stopped = f"; reading it stopped: {exc}"
    if time.monotonic() >= deadline:
        stopped = f"; reading it stopped after {SALVAGE_SECONDS:.0f} s"
    dst = SuppressionList(building, max_size, sync=False)
    kept = 0
    try:
        items = sorted(best.items())
        for at in range(0, len(items), 10_000):
            if tick is not None:
                tick()
            with dst.env.begin(write=True) as txn:
                for key, (_, value) in items[at:at + 10_000]:
                    recs = _dec.decode(value[1:])
                    txn.put(key, bytes((sum(TYPES[t] for t in recs),)) + value[1:],
                            db=dst.rcpt)
                    for tname, (src_name, _, _, updated) in recs.items():
                        txn.put(_index_key(updated, TYPES[tname], key),
                                SOURCE_CODES.get(src_name, b""), db=dst.index)
                        dst._count(txn, src_name, 1)
                    kept += 1
    except lmdb.MapFullError:
        stopped += "; the new list is full (suppression.max_size)"
    except BaseException as exc:
        dst.close()
        if isinstance(exc, lmdb.Error):     # (a full disk: the caller's OSError)
            raise OSError(f"suppression list {path}: rebuilding it in {building}: "
                          f"{exc}") from None
        raise
    try:
        dst.env.sync(True)
    except lmdb.Error as exc:
        raise OSError(f"suppression list {path}: rebuilding it in {building}: "
                      f"{exc}") from None
    finally:
        dst.close()
    sync_dir(building)
    os.rename(building, path + REBUILT)
    aside = _swap_rebuilt(path)
    return (f"suppression list {path}: {reason}; moved to {aside}; a new list is in its "
            f"place with the {kept} entries read from its pages ({bad} unreadable"
            f"{stopped}); entries it held past the damage are lost: put them again")


REBUILT = ".rebuilt"     # a whole rebuilt list, put in the damaged one's place next


def _swap_rebuilt(path: str) -> str:
    """Put the rebuilt list (``<path>.rebuilt``) in the place of the damaged one, which
    is moved aside (when still there); where it went.  Each step is one rename: a start
    killed in between finishes it at the next (:func:`check_at_start`)."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    if os.path.lexists(path):
        os.rename(path, aside)
    os.rename(path + REBUILT, path)
    sync_dir(os.path.dirname(os.path.abspath(path)))
    return aside


_P_LEAF, _P_LEAF2, _F_BIGDATA, _F_SUBDATA = 0x02, 0x20, 0x01, 0x02
_PAGE_HEAD = struct.Struct("<QHHHH")     # pgno, pad, flags, lower, upper (LMDB 0.9, 64-bit)
_NODE_HEAD = struct.Struct("<HHHH")      # data size lo, hi, flags, key size


def _scan(data: str, deadline: float, tick=None):
    """(key, value) of every plain node in the leaf pages of LMDB file *data*, read
    without LMDB (no map: a short file is no SIGBUS).  Page size: the one the meta
    page says, else 4096.  *tick*: called every 1024 pages (the first too)."""
    with open(data, "rb") as fh:
        head = fh.read(_PAGE_HEAD.size + 24)
        psize = 4096
        if len(head) >= _PAGE_HEAD.size + 24:
            # MDB_meta after the page header: magic (4), version (4), address (8), map
            # size (8), then the free DB's MDB_db whose first field is its page size (4)
            magic = struct.unpack_from("<I", head, _PAGE_HEAD.size)[0]
            fh.seek(_PAGE_HEAD.size + 24)
            ps = struct.unpack("<I", fh.read(4) or b"\0\0\0\0")[0]
            if magic == 0xBEEFC0DE and 512 <= ps <= 65536 and not ps & (ps - 1):
                psize = ps
        fh.seek(0)
        pgno = 0
        while time.monotonic() < deadline:
            if tick is not None and not pgno & 1023:
                tick()
            page = fh.read(psize)
            if len(page) < _PAGE_HEAD.size:
                return
            no, _, flags, lower, upper = _PAGE_HEAD.unpack_from(page)
            if no == pgno and flags & _P_LEAF and not flags & _P_LEAF2 and \
                    _PAGE_HEAD.size <= lower <= upper <= len(page):
                for i in range((lower - _PAGE_HEAD.size) >> 1):
                    off = struct.unpack_from("<H", page, _PAGE_HEAD.size + 2 * i)[0]
                    if not upper <= off <= len(page) - _NODE_HEAD.size:
                        continue
                    lo, hi, nflags, ksize = _NODE_HEAD.unpack_from(page, off)
                    k0 = off + _NODE_HEAD.size
                    size = lo | hi << 16
                    if nflags & (_F_BIGDATA | _F_SUBDATA) or k0 + ksize + size > len(page):
                        continue
                    yield page[k0:k0 + ksize], page[k0 + ksize:k0 + ksize + size]
            pgno += 1
