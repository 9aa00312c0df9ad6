"""The message bus between processes: ZeroMQ transport, msgpack encoding.

This is the only package that imports zmq and msgpack.  Every message that
crosses a process boundary is declared once in :data:`MESSAGES` with its
fields and who sends it to whom; :func:`encode` and :func:`decode` refuse
anything else.

Wire format: one ZeroMQ frame per message: a code byte followed by a msgpack
array of the declared fields in order; messages declared with bodies append
the raw RFC 5322 message(s) as msgpack ``bin`` — exactly one for ``BODY_ONE``,
a list for ``BODY_MANY`` (the acceptor batches every message that completed
in one loop iteration for a shard into one request, and the shard answers
each request once).  One frame, not one per body: each extra frame costs a
separate zmq_msg_send (measured 17 µs for three frames against 7 µs for one,
send and receive included).

Topology (all ipc:// endpoints in the run directory, created after fork):

    acceptor[i]  DEALER --connect-->  ROUTER  spool[n]     ("spool-<n>")
    mta CLI      DEALER --connect-->  ROUTER  spool[n]
    spool[n]     DEALER --connect-->  ROUTER  delivery[d]  ("delivery-<d>"); outcomes come
                                                           back on the same pair

A request carries a ``req`` number chosen by the sender; the reply echoes it.
High-water marks bound every queue; a send that would block fails instead
(:meth:`Client.send` returns False) and the caller pushes back.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import msgpack
import zmq

__all__ = [
    "MESSAGES", "BusError", "AsyncServer", "Client", "SyncClient", "Server", "encode", "decode",
    "new_context", "STATUS_OK", "STATUS_STORAGE", "STATUS_UNKNOWN",
    "BODY_NONE", "BODY_ONE", "BODY_MANY",
]


# Plain ints: pyzmq's enum members cost an object construction per use.
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_RCVMORE = int(zmq.RCVMORE)
_SNDMORE = int(zmq.SNDMORE)
_zmq_poll = zmq.zmq_poll


class BusError(Exception):
    """A malformed or undeclared bus message."""


BODY_NONE, BODY_ONE, BODY_MANY = 0, 1, 2


@dataclass(frozen=True)
class Msg:
    """One declared message type."""

    code: int
    name: str
    route: str              # who sends it to whom
    fields: tuple           # names of the header fields, in order
    body: int = BODY_NONE   # raw body frames that follow the header
    # check(values, body) -> True when the field values have the types the
    # receiver relies on; decode() refuses the message otherwise, so that a
    # receiver never fails later on a value it took in (a shard must not die
    # on its input).  None: the receiver copes with any value.
    check: object = None


# Reply status codes used in *_REPLY / *_COMMITTED messages.
STATUS_OK = 0
STATUS_STORAGE = 1   # the spool could not make it durable (EIO, ENOSPC, ...)
STATUS_UNKNOWN = 2   # no such queue id / request not understood

MAX_QID = 64        # longest queue id a message may carry


def _is_str(v) -> bool:
    return type(v) is str


def _valid_envelope(env) -> bool:
    """[qid, sender, [rcpt, ...], params, client, arrival]: at least one recipient."""
    return (type(env) is list and len(env) == 6
            and type(env[0]) is str and 0 < len(env[0]) <= MAX_QID
            and type(env[1]) is str
            and type(env[2]) is list and len(env[2]) > 0 and all(map(_is_str, env[2]))
            and type(env[3]) is dict and type(env[4]) is str
            and type(env[5]) in (float, int))


def _valid_commit(v, bodies) -> bool:
    return (type(v[0]) is int and type(v[1]) is list and len(v[1]) == len(bodies)
            and all(map(_valid_envelope, v[1])))


def _valid_ready(v, body) -> bool:
    req, qid, sender, domain, rcpts, params, attempt = v
    return (type(req) is int and type(qid) is str and type(sender) is str
            and type(domain) is str and type(rcpts) is list and len(rcpts) > 0
            and all(type(r) is list and len(r) == 2 and type(r[0]) is int and type(r[1]) is str
                    for r in rcpts)
            and type(params) is dict and type(attempt) is int)


def _valid_outcome(v, body) -> bool:
    req, qid, results = v
    return (type(req) is int and type(qid) is str and type(results) is list
            and all(type(r) is list and len(r) == 7 and type(r[0]) is int and type(r[1]) is str
                    for r in results))


_TABLE = (
    # envelopes: [[qid, sender, rcpts, params, client, arrival], ...], one body frame each
    Msg(1, "SPOOL_MESSAGE_COMMIT", "acceptor -> spool", ("req", "envelopes"), BODY_MANY,
        _valid_commit),
    Msg(2, "SPOOL_MESSAGE_COMMITTED", "spool -> acceptor", ("req", "status")),
    Msg(3, "SPOOL_QUEUE_SUMMARY", "cli -> spool", ("req",)),
    Msg(4, "SPOOL_QUEUE_SUMMARY_REPLY", "spool -> cli", ("req", "summary")),
    Msg(5, "SPOOL_QUEUE_LIST", "cli -> spool", ("req", "limit")),
    Msg(6, "SPOOL_QUEUE_LIST_REPLY", "spool -> cli", ("req", "entries")),
    Msg(7, "SPOOL_MESSAGE_SHOW", "cli -> spool", ("req", "qid")),
    Msg(8, "SPOOL_MESSAGE_SHOW_REPLY", "spool -> cli", ("req", "status", "entry"), BODY_ONE),
    Msg(9, "SPOOL_MESSAGE_DELETE", "cli -> spool", ("req", "qids")),
    Msg(10, "SPOOL_MESSAGE_DELETE_REPLY", "spool -> cli", ("req", "status", "deleted")),
    # A message's recipients for one domain, ready to be delivered now.
    # rcpts: [[index in the message, address], ...]; params: BODY/SMTPUTF8 of the reception.
    Msg(11, "DELIVERY_MESSAGE_READY", "spool -> delivery",
        ("req", "qid", "sender", "domain", "rcpts", "params", "attempt"), BODY_ONE,
        _valid_ready),
    # results: [[index, outcome, code, enhanced, text, remote_host, remote_ip], ...]
    # outcome: "delivered" | "deferred" | "failed"
    Msg(12, "DELIVERY_OUTCOME", "delivery -> spool", ("req", "qid", "results"),
        check=_valid_outcome),
    Msg(13, "SPOOL_QUEUE_FLUSH", "cli -> spool", ("req",)),
    Msg(14, "SPOOL_QUEUE_FLUSH_REPLY", "spool -> cli", ("req", "count")),
)

MESSAGES = {m.name: m for m in _TABLE}

# What encode() and decode() need of each message, in one tuple per dict lookup
# (every bus message passes here; attribute reads on Msg cost more).
# name -> (code frame, number of fields, body kind)
_ENCODING = {m.name: (bytes([m.code]), len(m.fields), m.body) for m in _TABLE}
# code -> (Msg, number of msgpack array items: fields plus the body item if any, body kind,
#          check)
_DECODING = {m.code: (m, len(m.fields) + (m.body != BODY_NONE), m.body, m.check)
             for m in _TABLE}

_packb = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb


def encode(name: str, *values, body: bytes | None = None, bodies: list | None = None) -> list:
    """Build the frame list of message *name* from its field values (in declared order)."""
    code, nfields, kind = _ENCODING[name]
    if len(values) != nfields:
        raise BusError(f"{name} takes {nfields} fields, got {len(values)}")
    if kind == BODY_MANY:
        payload = _packb((*values, bodies or []))
    elif kind == BODY_ONE:
        payload = _packb((*values, body if body is not None else b""))
    elif body is not None or bodies:
        raise BusError(f"{name} carries no body")
    else:
        payload = _packb(values)
    return [code + payload]


def decode(frames: list) -> tuple[Msg, list, object]:
    """Parse frames into (Msg, field values, bodies); strict about shape.

    The third item is None, one body (BODY_ONE) or the list of bodies (BODY_MANY).
    """
    if len(frames) != 1 or len(frames[0]) < 2:
        raise BusError("malformed message")
    frame = frames[0]
    shape = _DECODING.get(frame[0])
    if shape is None:
        raise BusError(f"unknown message code {frame[0]}")
    m, nfields, kind, check = shape
    try:
        values = _unpackb(memoryview(frame)[1:], raw=False, use_list=True,
                          strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BusError(f"{m.name}: undecodable header") from exc
    if not isinstance(values, list) or len(values) != nfields:
        raise BusError(f"{m.name}: expected {len(m.fields)} fields")
    extra = None
    if kind != BODY_NONE:
        extra = values.pop()
        if kind == BODY_ONE:
            if not isinstance(extra, bytes):
                raise BusError(f"{m.name}: body is not bytes")
        elif not isinstance(extra, list) or not all(isinstance(b, bytes) for b in extra):
            raise BusError(f"{m.name}: bodies are not a list of bytes")
    if check is not None and not check(values, extra):
        raise BusError(f"{m.name}: a field has the wrong type or shape")
    return m, values, extra


def new_context() -> zmq.Context:
    """A fresh ZeroMQ context; call it in the process that uses it, after fork."""
    return zmq.Context(io_threads=1)


class Server:
    """A ROUTER socket bound at *endpoint*, used synchronously by a role's loop."""

    def __init__(self, ctx: zmq.Context, endpoint: str, hwm: int):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        # A reply to a peer that went away is dropped, not queued forever.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(endpoint)

    def recv(self):
        """Return (peer identity, frames) or None when nothing is waiting."""
        # recv_multipart without pyzmq's wrapper (keyword arguments, an enum
        # per RCVMORE look-up): this runs for every request a shard takes.
        sock = self.sock
        try:
            peer = sock.recv(_NOBLOCK)
        except zmq.Again:
            return None
        frames = []
        while sock.get(_RCVMORE):  # the rest of a multipart message is already here
            frames.append(sock.recv(_NOBLOCK))
        return peer, frames

    def send(self, peer: bytes, frames: list) -> None:
        sock = self.sock
        try:
            if len(frames) == 1 and type(frames[0]) is bytes:
                # The common one-frame reply, without send_multipart's wrapper.
                sock.send(peer, _NOBLOCK | _SNDMORE)
                sock.send(frames[0], _NOBLOCK)
            else:
                sock.send_multipart([peer, *frames], _NOBLOCK)
        except zmq.Again:
            pass  # the peer is not reading; it will time out and retry

    def close(self) -> None:
        self.sock.close(0)


class _LoopSocket:
    """A ZeroMQ socket read by an asyncio loop, with reading paused and resumed at will.

    ZeroMQ's file descriptor is edge-triggered and also signals on sends: a
    send can consume the edge of messages that arrived meanwhile, after which
    the reader would never fire again.  So every send, and every resume,
    schedules one more drain of the socket on the loop.
    """

    def __init__(self, sock, loop):
        self.sock = sock
        self._loop = loop
        self._fd = sock.getsockopt(zmq.FD)
        self._poll_in = [(sock, _POLLIN)]
        # The compiled send of pyzmq's base class: zmq.Socket.send wraps it in
        # Python to handle routing ids and groups (draft sockets), which the bus
        # does not use, at about a microsecond per message.
        self._send_frame = super(zmq.Socket, sock).send
        self._reading = False
        self._drain_scheduled = False
        self.resume()

    def resume(self) -> None:
        """Read again (and look at what is already waiting)."""
        if not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._drain)
        self._schedule()

    def pause(self) -> None:
        """Stop reading: the peers' messages wait in ZeroMQ up to the high-water mark."""
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _schedule(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _send(self, frames: list) -> bool:
        try:
            if len(frames) == 1:
                self._send_frame(frames[0], _NOBLOCK)
            else:
                self.sock.send_multipart(frames, _NOBLOCK)
        except zmq.Again:
            return False
        self._schedule()
        return True

    def _drain(self) -> None:
        self._drain_scheduled = False
        recv = self.sock.recv
        poll_in = self._poll_in
        # "Is a message waiting?": zmq_poll with timeout 0 asks libzmq for
        # ZMQ_EVENTS like getsockopt(EVENTS) does, at a third of the cost,
        # since pyzmq's getsockopt() builds a SocketOption enum per call.
        while self._reading and _zmq_poll(poll_in, 0):
            # recv_multipart(), by hand: a Frame's ``more`` comes straight from
            # libzmq, where recv_multipart asks getsockopt(RCVMORE), which costs
            # pyzmq an enum lookup per frame.
            try:
                frame = recv(_NOBLOCK, copy=False)
                frames = [frame.bytes]
                while frame.more:
                    frame = recv(_NOBLOCK, copy=False)
                    frames.append(frame.bytes)
            except zmq.Again:
                break
            self._received(frames)

    def _received(self, frames: list) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.pause()
        self.sock.close(0)


class Client(_LoopSocket):
    """A DEALER socket on an asyncio loop: send requests, get replies by callback."""

    def __init__(self, ctx: zmq.Context, loop, endpoint: str, hwm: int, on_reply):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a dead peer
        sock.connect(endpoint)
        self._on_reply = on_reply
        super().__init__(sock, loop)

    def send(self, frames: list) -> bool:
        """Queue *frames* for the peer; False when the high-water mark is reached."""
        return self._send(frames)

    def connected(self) -> bool:
        """True once the peer is connected (ZMQ_IMMEDIATE: only then can we send)."""
        return bool(self.sock.getsockopt(_EVENTS) & _POLLOUT)

    def _received(self, frames: list) -> None:
        self._on_reply(frames)


class AsyncServer(_LoopSocket):
    """A ROUTER socket bound at *endpoint* on an asyncio loop: requests by callback.

    ``on_request(peer, frames)`` may call :meth:`pause` to stop taking work;
    replies go back with :meth:`send` to the peer identity.
    """

    def __init__(self, ctx: zmq.Context, loop, endpoint: str, hwm: int, on_request):
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.bind(endpoint)
        self._on_request = on_request
        super().__init__(sock, loop)

    def send(self, peer: bytes, frames: list) -> bool:
        """Send *frames* to *peer*; False when it is not taking them (high-water mark)."""
        return self._send([peer, *frames])

    def _received(self, frames: list) -> None:
        self._on_request(frames[0], frames[1:])


class SyncClient:
    """Blocking request/reply with a timeout, for the command-line tools."""

    _reqs = itertools.count(1)

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def call(self, name: str, *values, timeout: float = 5.0, body=None):
        """Send request *name* (its ``req`` field is filled in) and return the decoded reply."""
        req = next(self._reqs)
        self.sock.send_multipart(encode(name, req, *values, body=body))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise TimeoutError(f"no reply to {name} within {timeout:g}s")
            m, fields, rbody = decode(self.sock.recv_multipart())
            if fields[0] == req:
                return m, fields, rbody

    def close(self) -> None:
        self.sock.close(0)
