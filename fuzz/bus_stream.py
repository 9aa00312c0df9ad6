"""Protocol target: the acceptors' stream to a spool shard, as the shard reads it.

A shard is the one process that must never die on its input (it holds every
message of its shard), and its stream socket (``run/commit-<n>``) takes whatever a
local peer writes.  Three modes, chosen by the first byte:

0. arbitrary bytes fed to the shard's framing (``mta.bus.sockets._Stream``) whole and
   in pieces cut anywhere: the same frames and the same partial frame left over,
   however the bytes were cut; then every frame through ``receive`` with the
   shard's requests (``SPOOL_REQUESTS``): a message or None, never an exception;
1. commits an acceptor could send (queue ids, addresses, parameters and bodies
   from the input), framed as ``StreamClient`` frames them, with arbitrary bytes
   behind (and, before those, a message a shard does not take), fed in pieces: every one of them decodes to the commit that was sent,
   in order, before the bytes behind are read as anything;
2. a frame head claiming a length (up to 2**64 - 1) and part of it: no frame,
   and the framing waits for exactly the claimed length.
"""
from __future__ import annotations

import logging
import struct

from fuzz.common import Divergence, Input

from mta import bus
from mta.bus.sockets import _Stream, frame_head
from mta.queueid import new_qid_for_shard

CUTS = 25      # octets of choices for the cuts (how many, then two for each offset)
_CUT3 = bytes([3, 5, 0, 9, 0, 12, 0]).ljust(CUTS, b"\0")    # three cuts: at 5, 9 and 12

SEEDS = [
    b"\x00" + _CUT3 + frame_head(3) + b"\x93\x01\x02" + b"junk",
    b"\x01\x02\x03\x04\x07\x00" + b"sender@example.com\x00rcpt@example.net\x00body",
    b"\x02\xff\xff\xff\xff\xff\xff\xff\xff" + _CUT3 + b"x" * 20,
    b"\x00" + _CUT3 + frame_head(0) + frame_head(1) + b"\xc0",
]


class _Log:
    """A logger stand-in that keeps what receive() says (it warns about what it drops)."""

    def __init__(self):
        self.lines = []

    def warning(self, fmt, *args):
        self.lines.append(fmt % args)

    def isEnabledFor(self, level):     # noqa: N802 (logging.Logger's name)
        return level >= logging.WARNING


def _feed(pieces) -> tuple[list[bytes], _Stream]:
    st, out = _Stream(), []
    for p in pieces:
        st.feed(p, out)
    return [bytes(f) for f in out], st


def _left(st: _Stream) -> tuple[bytes, int, int]:
    return b"".join(st.pieces), st.have, st.need


def _split(inp: Input, data: bytes) -> list[bytes]:
    points = inp.cuts(len(data), most=12)
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _take_all(frames: list[bytes]) -> None:
    log = _Log()
    for f in frames:
        try:
            msg = bus.receive((memoryview(f),), bus.SPOOL_REQUESTS, log, "request")
        except Exception as exc:
            raise Divergence(f"receive raised {exc!r} on frame {f[:80]!r}") from exc
        if msg is None and not log.lines:
            raise Divergence(f"a frame dropped without a word: {f[:80]!r}")
        log.lines.clear()


def _commit(inp: Input, req: int) -> bus.SpoolMessageCommit:
    words = inp.take(inp.byte() % 64).split(b"\x00")
    text = [w.decode("utf-8", "replace") for w in words] + ["", "", ""]
    n = 1 + inp.byte() % 3
    envs = [bus.Envelope(new_qid_for_shard(0, 1), text[0], [text[1] or "r@example.net"],
                         {"SIZE": text[2]} if inp.flag() else {}, "helo [127.0.0.1]",
                         1.5e9 + inp.u16(), text[2]) for _ in range(n)]
    bodies = [inp.take(inp.u16() % 300) for _ in range(n)]
    return bus.SpoolMessageCommit(req, envs, bodies)


def one_input(data: bytes) -> None:
    inp = Input(data)
    mode = inp.byte() % 3
    if mode == 0:
        cuts = Input(inp.take(CUTS))        # (the cuts' choices, then the bytes to cut)
        payload = inp.rest()
        whole, st_whole = _feed([payload])
        cut_frames, st_cut = _feed(_split(cuts, payload))
        if whole != cut_frames or _left(st_whole) != _left(st_cut):
            raise Divergence(f"framing depends on the cuts: {whole[:4]!r} / "
                             f"{cut_frames[:4]!r}")
        _take_all(whole)
    elif mode == 1:
        sent = [_commit(inp, req) for req in range(1, 2 + inp.byte() % 4)]
        stream = b"".join(frame_head(len(e)) + e for e in map(bus.encode, sent))
        behind = inp.take(inp.byte())
        if inp.flag():      # (a well-formed message the shard does not take: dropped)
            reply = bus.encode(bus.SpoolMessageCommitted(9, bus.STATUS_OK))
            behind = frame_head(len(reply)) + reply + behind
        frames, _ = _feed(_split(inp, stream + behind))
        got = [bus.receive((f,), bus.SPOOL_REQUESTS, _Log(), "request")
               for f in frames[:len(sent)]]
        if got != sent:
            raise Divergence(f"commits framed and read back differ: {got!r} != {sent!r}")
        _take_all(frames[len(sent):])
    else:
        claim = struct.unpack(">Q", inp.take(8).ljust(8, b"\0"))[0]
        cuts = Input(inp.take(CUTS))
        part = inp.rest()
        frames, st = _feed(_split(cuts, frame_head(claim) + part))
        if claim <= len(part):
            if not frames or frames[0] != part[:claim]:
                raise Divergence(f"a whole frame of {claim} octets was not taken")
        elif frames or st.need != claim + 8 or st.have != len(part) + 8:
            raise Divergence(f"claimed {claim}: frames {len(frames)}, need {st.need}, "
                             f"have {st.have}")
