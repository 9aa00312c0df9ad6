"""Queue identifiers: unique, sortable by arrival time, and they choose the spool shard.

Format: 13 hex digits of microseconds since the epoch, 2 of the acceptor slot,
5 of a per-process counter — 20 characters, e.g. ``18A3F2C4B1D2E03000A1F``.
Sorting ids sorts messages by arrival.  The shard is the counter modulo the
shard count, so each acceptor spreads its messages evenly over the shards.
Recipient domains map to delivery processes by CRC-32 (:func:`domain_shard`).
"""
import itertools
import re
import time
import zlib
from time import time_ns

_counter = itertools.count()
SPOOL_SLOT = 0xFF   # the "acceptor slot" of ids the spool makes itself (bounces)
QID_SHAPE = "20 hexadecimal digits"     # what an error names when a queue id is not one
_QID = re.compile("[0-9A-F]{20}")


def new_qid(slot: int) -> str:
    """A fresh queue id for a message received by acceptor *slot*."""
    # The three fields as one number, formatted once: the same 20 digits as
    # "%013X%02X%05X" of the fields, for a third less work.
    us = time_ns() // 1000
    return "%020X" % ((us << 28) | ((slot & 0xFF) << 20) | (next(_counter) & 0xFFFFF))


def shard_of(qid: str, shards: int) -> int:
    """The spool shard that owns *qid*."""
    return int(qid[15:20], 16) % shards


def is_qid(text: str) -> bool:
    """True when *text* has the shape of a queue id: exactly 20 upper-case hexadecimal
    digits (ASCII).  (Not int(text, 16), which also takes a "0X" prefix, spaces around,
    "_" between digits and other scripts' digits.)"""
    return _QID.fullmatch(text) is not None


def normal_qid(text: str) -> str:
    """*text* in upper case, as queue ids are made, when it is ASCII: the events carry
    the id in lower case (``message_id``, the VERP return path), and an operator copies
    it from there.  (Not a queue id when it was not one before: see :func:`is_qid`.)"""
    return text.upper() if text.isascii() else text


def new_qid_for_shard(shard: int, shards: int) -> str:
    """A queue id made by spool shard *shard* for its own new message (a bounce)."""
    counter = (next(_counter) % (0x100000 // shards)) * shards + shard   # < 2**20
    return "%013X%02X%05X" % (time.time_ns() // 1000, SPOOL_SLOT, counter)


def domain_shard(domain: str, shards: int) -> int:
    """The delivery process responsible for recipient domain *domain* (stable)."""
    return zlib.crc32(domain.encode("utf-8", "surrogateescape")) % shards


def recipient_domain(address: str) -> str:
    """The domain of *address*, lower-cased: what dispatch groups by and shards on."""
    return address.rpartition("@")[2].lower()
