"""The bus's ZeroMQ sockets: every socket a role uses, built and read here.

Roles hold these objects and exchange declared messages (:mod:`mta.bus.messages`)
through them; they never see a ZeroMQ socket, a frame or an encoding.  Every
socket takes only the messages of its route (:func:`~mta.bus.messages.receive`
drops and logs anything else), and every send is non-blocking: a send that
would pass a high-water mark returns False and the caller pushes back.

- :class:`Server` -- a ROUTER a role's own loop reads (the spool shard's
  requests from acceptors and the CLI).
- :class:`DeliveryLinks` -- the spool shard's DEALER sockets to each delivery
  process, with whether each is connected (socket monitors).
- :class:`Poller` -- one wait over a shard's Server and DeliveryLinks.
- :class:`Client`, :class:`AsyncServer` -- DEALER and ROUTER driven by an
  asyncio loop (acceptors to the spool; a delivery process's intake and its
  outcomes, which must never be dropped: :class:`PeerGone`).
- :class:`SyncClient` -- blocking request/reply with a timeout for the CLI.
- :class:`StatsSender`, :class:`StatsReceiver` -- every child's statistics
  snapshots to the admin process (PUSH/PULL): a snapshot the admin is not
  there or too slow to take is dropped, never waited for.
"""
from __future__ import annotations

import collections
import errno
import itertools
import logging
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from mta.bus.messages import (DELIVERY_OUTCOMES, MAX_JOB_BATCH_BYTES, MAX_JOBS_PER_SEND,
                              STATS_REPORTS, BusError, DeliveryJobs, DeliveryOutcomes, Message,
                              decode, encode, encode_request, receive)

__all__ = ["new_context", "close_context", "Server", "DeliveryLinks", "Poller", "Client",
           "AsyncServer", "SyncClient", "PeerGone", "StatsSender", "StatsReceiver"]

# Plain ints: pyzmq's enum members cost an object construction per use.
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_SNDMORE = int(zmq.SNDMORE)
_zmq_poll = zmq.zmq_poll


def new_context() -> zmq.Context:
    """A fresh ZeroMQ context; call it in the process that uses it, after fork."""
    return zmq.Context(io_threads=1)


def close_context(ctx: zmq.Context) -> None:
    """Close every socket of *ctx* still open, then end it.

    ``ctx.term()`` waits until every socket is closed: after an exception that
    left the role's sockets open it would wait for ever, the process would hang
    instead of exiting with its traceback, and the supervisor would never
    restart it.  Every bus socket has LINGER 0, so nothing is waited for.
    """
    ctx.destroy(linger=0)


# A connecting socket tries again this often (ms) while its peer is away (a shard that
# crashed and is being restarted).  ZeroMQ's default, 100 ms plus up to as much again at
# random, kept an acceptor answering 451 for up to ~170 ms after its shard was back;
# 10 ms: ~2-16 ms (an ipc connect that fails costs a few microseconds).
RECONNECT_IVL_MS = 10


def _socket(ctx: zmq.Context, kind: int, hwm: int):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    return sock


class Server:
    """A ROUTER socket bound at *endpoint*, read synchronously by a role's own loop.

    *takes* are the message classes it accepts; anything else is dropped and
    logged to *log* as a malformed or unexpected *source*.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, hwm: int, takes: tuple,
                 log: logging.Logger, source: str = "request"):
        self.sock = _socket(ctx, zmq.ROUTER, hwm)
        # A reply to a peer that went away is dropped, not queued forever.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(endpoint)
        self._send_frame = super(zmq.Socket, self.sock).send     # (see _LoopSocket)
        self._takes = takes
        self._log = log
        self._source = source

    def recv(self):
        """Return (peer identity, message) or None when nothing (well-formed) is waiting."""
        # recv_multipart without pyzmq's wrapper (keyword arguments, a
        # sock.get(RCVMORE) per frame: ~8k instructions of Python each, an enum
        # look-up among them): this runs for every request a shard takes.  A
        # ROUTER's message is the peer's identity, then at least one frame, all
        # here once the first is; a frame received as a Frame says itself
        # whether more follow (read in C at the receive).
        sock = self.sock
        while True:
            try:
                peer = sock.recv(_NOBLOCK)
            except zmq.Again:
                return None
            frame = sock.recv(_NOBLOCK, copy=False)
            frames = [frame.bytes]
            while frame.more:
                frame = sock.recv(_NOBLOCK, copy=False)
                frames.append(frame.bytes)
            msg = receive(frames, self._takes, self._log, self._source)
            if msg is not None:
                return peer, msg

    def send(self, peer: bytes, msg: Message) -> None:
        """Answer *peer*; dropped when it is not reading (it times out and retries)."""
        send = self._send_frame
        try:
            send(peer, _NOBLOCK | _SNDMORE)
            send(encode(msg), _NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.sock.close(0)


class DeliveryLinks:
    """A spool shard's links to the delivery processes: jobs out, outcomes back.

    One DEALER per delivery process with ZMQ_IMMEDIATE, so nothing is queued
    towards a process that is not there; a socket monitor per link tells when
    a delivery process connects and when it goes away (:meth:`changes`).
    """

    def __init__(self, ctx: zmq.Context, endpoints: list[str], hwm: int, log: logging.Logger):
        self.socks = []
        self.monitors = []
        self.up = [False] * len(endpoints)      # delivery[d] is connected
        # outcomes of a DeliveryOutcomes message not taken yet, per link
        self.pending: list[collections.deque] = [collections.deque() for _ in endpoints]
        self._log = log
        for endpoint in endpoints:
            s = _socket(ctx, zmq.DEALER, hwm)
            s.setsockopt(zmq.IMMEDIATE, 1)
            self.monitors.append(s.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED))
            s.connect(endpoint)
            self.socks.append(s)

    def __len__(self) -> int:
        return len(self.socks)

    def send_jobs(self, d: int, jobs: list) -> int:
        """Hand *jobs* to delivery[d], in order, several to a message (DeliveryJobs, at
        most MAX_JOBS_PER_SEND and MAX_JOB_BATCH_BYTES of bodies each, a bigger job
        alone); how many were sent: the rest did not fit its queue (or it is away)."""
        send = super(zmq.Socket, self.socks[d]).send     # (see _LoopSocket)
        n = len(jobs)
        sent = 0
        while sent < n:
            end = sent + 1
            size = len(jobs[sent].body)
            while end < n and end - sent < MAX_JOBS_PER_SEND:
                size += len(jobs[end].body)
                if size > MAX_JOB_BATCH_BYTES:
                    break
                end += 1
            msg = jobs[sent] if end - sent == 1 else DeliveryJobs(jobs[sent:end])
            try:
                send(encode(msg), _NOBLOCK)
            except zmq.Again:
                break
            sent = end
        return sent

    def send(self, d: int, msg: Message) -> bool:
        """Hand one message (not a job) to delivery[d]; False when it did not fit its
        queue (or it is away)."""
        try:
            super(zmq.Socket, self.socks[d]).send(encode(msg), _NOBLOCK)
        except zmq.Again:
            return False
        return True

    def recv(self, d: int):
        """The next DeliveryOutcome delivery[d] sent, or None when none is waiting.

        (One of a DeliveryOutcomes message is taken at a time, like the others.)
        """
        pending = self.pending[d]
        if pending:
            return pending.popleft()
        sock = self.socks[d]
        while True:
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return None
            msg = receive(frames, DELIVERY_OUTCOMES, self._log, "outcome")
            if msg is None:
                continue
            if type(msg) is DeliveryOutcomes:
                if not msg.outcomes:
                    continue
                pending.extend(msg.outcomes)
                return pending.popleft()
            return msg

    def waiting(self, d: int) -> bool:
        """True when delivery[d] has sent something not yet read."""
        return bool(self.pending[d]) or bool(self.socks[d].get(_EVENTS) & _POLLIN)

    def changes(self) -> list[tuple[int, bool]]:
        """Connection changes since the last call: [(d, connected), ...]; updates ``up``."""
        out = []
        for d, mon in enumerate(self.monitors):
            while mon.get(_EVENTS) & _POLLIN:
                event = recv_monitor_message(mon)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.up[d] = True
                    out.append((d, True))
                elif event == zmq.EVENT_DISCONNECTED:
                    self.up[d] = False
                    out.append((d, False))
        return out

    def close(self) -> None:
        for s in self.socks + self.monitors:
            s.close(0)


class Poller:
    """One wait over a shard's request Server and its DeliveryLinks.

    The result says which sockets have work, so a loop turn looks only at
    those: a look at an idle ZeroMQ socket is not free (a recv that finds
    nothing raises zmq.Again, an exception built in Python, and, like
    ZMQ_EVENTS, makes a system call).
    """

    _REQUESTS, _CHANGES = -1, -2

    def __init__(self, server: Server, links: DeliveryLinks):
        self._pending = links.pending
        self._items = [(server.sock, _POLLIN)]
        self._kind = {server.sock: self._REQUESTS}
        for d, s in enumerate(links.socks):
            self._items.append((s, _POLLIN))
            self._kind[s] = d
        for m in links.monitors:
            self._items.append((m, _POLLIN))
            self._kind[m] = self._CHANGES

    def wait(self, timeout_ms: int) -> tuple[bool, list[int], bool]:
        """Wait up to *timeout_ms*: (requests waiting, links with outcomes, links changed)."""
        requests = changes = False
        # outcomes already read, not taken yet (a batch larger than a group commit takes)
        outcomes = [d for d, p in enumerate(self._pending) if p]
        if outcomes:
            timeout_ms = 0
        kind = self._kind
        for sock, _ in _zmq_poll(self._items, timeout_ms):
            k = kind[sock]
            if k >= 0:
                if k not in outcomes:
                    outcomes.append(k)
            elif k == self._REQUESTS:
                requests = True
            else:
                changes = True
        return requests, outcomes, changes


class _LoopSocket:
    """A ZeroMQ socket read by an asyncio loop, with reading paused and resumed at will.

    ZeroMQ's file descriptor is edge-triggered and also signals on sends: a
    send can consume the edge of messages that arrived meanwhile, after which
    the reader would never fire again.  So every send (sent or not), and every
    resume, schedules one more drain of the socket on the loop.
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

    def _send(self, peer: bytes | None, msg: Message) -> bool:
        try:
            if peer is not None:
                self._send_frame(peer, _NOBLOCK | _SNDMORE)
            self._send_frame(encode(msg), _NOBLOCK)
        except zmq.Again:
            return False
        finally:
            # Also after a send that failed (a full queue, or a peer that is gone):
            # libzmq handled the socket's pending commands all the same, and may have
            # consumed the edge of a message that arrived meanwhile.
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
    """A DEALER socket on an asyncio loop: send requests, get replies by callback.

    ``on_reply(message)`` gets each well-formed reply of the classes *takes*.
    """

    def __init__(self, ctx: zmq.Context, loop, endpoint: str, hwm: int, takes: tuple,
                 on_reply, log: logging.Logger, source: str = "reply"):
        sock = _socket(ctx, zmq.DEALER, hwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a dead peer
        sock.connect(endpoint)
        self._on_reply = on_reply
        self._takes = takes
        self._log = log
        self._source = source
        super().__init__(sock, loop)

    def send(self, msg: Message) -> bool:
        """Queue *msg* for the peer; False when the high-water mark is reached."""
        return self._send(None, msg)

    def connected(self) -> bool:
        """True once the peer is connected (ZMQ_IMMEDIATE: only then can we send)."""
        return bool(self.sock.getsockopt(_EVENTS) & _POLLOUT)

    def _received(self, frames: list) -> None:
        msg = receive(frames, self._takes, self._log, self._source)
        if msg is not None:
            self._on_reply(msg)


class PeerGone(Exception):
    """The peer a reply was for is not connected (any more)."""


class AsyncServer(_LoopSocket):
    """A ROUTER socket bound at *endpoint* on an asyncio loop: requests by callback.

    ``on_request(peer, message)`` gets each well-formed request of the classes
    *takes*; it may call :meth:`pause` to stop taking work; replies go back
    with :meth:`send` to the peer identity.  A reply is never dropped
    silently: :meth:`send` says when the peer's queue is full and raises
    :class:`PeerGone` when the peer is not there (ZMQ_ROUTER_MANDATORY; a
    plain ROUTER drops both and reports success).
    """

    def __init__(self, ctx: zmq.Context, loop, endpoint: str, hwm: int, takes: tuple,
                 on_request, log: logging.Logger, source: str = "request"):
        sock = _socket(ctx, zmq.ROUTER, hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.bind(endpoint)
        self._on_request = on_request
        self._takes = takes
        self._log = log
        self._source = source
        super().__init__(sock, loop)

    def send(self, peer: bytes, msg: Message) -> bool:
        """Send *msg* to *peer*; False when its queue is at the high-water mark.

        False means "not sent, try again when the peer has read"; a peer that
        is not connected raises :class:`PeerGone`.
        """
        try:
            return self._send(peer, msg)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                raise PeerGone(peer) from None
            raise

    def _received(self, frames: list) -> None:
        msg = receive(frames[1:], self._takes, self._log, self._source)
        if msg is not None:
            self._on_request(frames[0], msg)


CHECK_EVERY = 1.0   # seconds a SyncClient waits for a reply before it asks its check (cheap)


class SyncClient:
    """Blocking request/reply with a timeout, for the command-line tools."""

    _reqs = itertools.count(1)

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def call(self, request_class: type[Message], *values, timeout: float = 5.0,
             check=None) -> Message:
        """Send a *request_class* request (its ``req`` is filled in); return the reply.

        *check*: called each CHECK_EVERY seconds without a reply, for a long *timeout*;
        it raises TimeoutError when waiting on is pointless (no daemon runs)."""
        req = next(self._reqs)
        # (as a daemon of the version before takes it too: mta queue flush before mta upgrade)
        self.sock.send(encode_request(request_class(req, *values)))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            step = left if check is None else min(left, CHECK_EVERY)
            if left <= 0 or not self.sock.poll(int(step * 1000)):
                if left <= step:
                    raise TimeoutError(f"no reply to {request_class.NAME} within {timeout:g}s")
                check()
                continue
            frames = self.sock.recv_multipart()
            if len(frames) != 1:
                raise BusError("malformed reply")
            reply = decode(frames[0])
            if reply.req == req:
                return reply

    def close(self) -> None:
        self.sock.close(0)


STATS_HWM = 2     # snapshots queued per child towards the admin before new ones are dropped


class StatsSender:
    """A child's PUSH socket to the admin process's statistics endpoint.

    ZMQ_IMMEDIATE: nothing is queued while the admin process is not there;
    a small high-water mark: a slow admin costs at most two queued snapshots.
    :meth:`send` never blocks; it says whether the snapshot went.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = _socket(ctx, zmq.PUSH, STATS_HWM)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.connect(endpoint)

    def writable(self) -> bool:
        """Whether a send now would go (connected, below the high-water mark)."""
        return bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)

    def send(self, msg: Message) -> bool:
        try:
            self.sock.send(encode(msg), _NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self.sock.close(0)


class StatsReceiver(_LoopSocket):
    """The admin process's PULL socket, bound at *endpoint*, read by its asyncio loop.

    ``on_report(report)`` gets each well-formed STATS_REPORT.
    """

    def __init__(self, ctx: zmq.Context, loop, endpoint: str, on_report, log: logging.Logger,
                 hwm: int = 1000):
        sock = _socket(ctx, zmq.PULL, hwm)
        sock.bind(endpoint)
        self._on_report = on_report
        self._log = log
        super().__init__(sock, loop)

    def _received(self, frames: list) -> None:
        msg = receive(frames, STATS_REPORTS, self._log, "statistics report")
        if msg is not None:
            self._on_report(msg)
