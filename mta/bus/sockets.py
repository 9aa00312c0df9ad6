"""The bus's ZeroMQ sockets: every socket a role uses, built and read here.

Roles hold these objects and exchange declared messages (:mod:`mta.bus.messages`)
through them; they never see a ZeroMQ socket, a frame or an encoding.  Every
socket takes only the messages of its route (:func:`~mta.bus.messages.receive`
drops and logs anything else), and every send is non-blocking: a send that
would pass a high-water mark returns False and the caller pushes back.

- :class:`Server` -- a ROUTER a role's own loop reads (the spool shard's
  requests from the CLI and the admin process), and beside it, when given a
  path, a Unix stream socket for the acceptors' commits (:class:`StreamClient`).
- :class:`DeliveryLinks` -- the spool shard's DEALER sockets to each delivery
  process, with whether each is connected (socket monitors).
- :class:`Poller` -- one wait over a shard's Server and DeliveryLinks.
- :class:`StreamClient` -- an acceptor's connection to a shard's stream
  socket, on its asyncio loop: length-prefixed msgpack frames read and written
  by the two processes' own loops, with no ZeroMQ I/O thread between them.
- :class:`AsyncServer` -- a ROUTER driven by an asyncio loop (a delivery
  process's intake and its outcomes, which must never be dropped:
  :class:`PeerGone`).
- :class:`SyncClient` -- blocking request/reply with a timeout for the CLI.
- :class:`StatsSender`, :class:`StatsReceiver` -- every child's statistics
  snapshots to the admin process (PUSH/PULL): a snapshot the admin is not
  there or too slow to take is dropped, never waited for.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import os
import socket
import struct
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from mta.bus.messages import (DELIVERY_OUTCOMES, MAX_JOB_BATCH_BYTES, MAX_JOBS_PER_SEND,
                              STATS_REPORTS, BusError, DeliveryJobs, DeliveryOutcomes, Message,
                              decode, encode, encode_request, receive)

__all__ = ["new_context", "close_context", "Server", "DeliveryLinks", "Poller", "StreamClient",
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


# The acceptors' stream to a shard.  Why not ZeroMQ there: a message handed over
# a DEALER/ROUTER pair wakes four threads besides the two processes' own loops
# (each side's I/O thread, each way).  Measured on the 2-core host
# (bench/bus_roundtrip.py), a 2 KB request and its reply paced at 5,000/s cost
# 49-52 µs of CPU over both processes through ZeroMQ against 25-30 µs over a
# Unix stream read by the loops themselves (bench/RESULTS.md, "The acceptors'
# commits over a Unix stream").  A frame is
# an 8-octet big-endian length, then one encoded message (a commit of several
# messages of up to smtp.max_message_size each can pass 4 GiB).
_FRAME_HEAD = struct.Struct(">Q")
_HEAD = _FRAME_HEAD.size
STREAM_READ = 256 * 1024        # octets a shard reads from one acceptor's stream at a time
# Replies a shard holds for an acceptor that does not read them (octets): beyond,
# the connection is closed (the acceptor connects again; what it waited for times
# out and is answered 451, as a reply ZeroMQ dropped was).
STREAM_OUT_LIMIT = 4 * 1024 * 1024


# frame_head(n): the octets in front of an encoded message of n octets on a stream
frame_head = _FRAME_HEAD.pack


class _Stream:
    """A byte stream cut into frames: the partial frame's pieces are kept in a list and
    joined once it is whole, so a large message read in many pieces is copied once."""

    __slots__ = ("pieces", "have", "need")

    def __init__(self):
        self.pieces: list[bytes] = []
        self.have = 0       # octets in pieces
        self.need = _HEAD   # octets pieces must hold before a frame can be whole

    def feed(self, data: bytes, out: list) -> None:
        """Take *data*; append every frame it completes to *out* (as memoryviews)."""
        if self.pieces:
            self.pieces.append(data)
            self.have += len(data)
            if self.have < self.need:
                return
            data = b"".join(self.pieces)
        view = memoryview(data)
        n = len(data)
        off = 0
        unpack = _FRAME_HEAD.unpack_from
        while n - off >= _HEAD:
            end = off + _HEAD + unpack(data, off)[0]
            if end > n:
                self.pieces = [data[off:]]
                self.have = n - off
                self.need = end - off
                return
            out.append(view[off + _HEAD:end])
            off = end
        if off < n:
            self.pieces = [data[off:]]
            self.have = n - off
        else:
            self.pieces = []
            self.have = 0
        self.need = _HEAD


class _Conn:
    """One acceptor's connection to a shard's stream socket."""

    __slots__ = ("sock", "fd", "stream", "out", "closed")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.stream = _Stream()
        self.out = bytearray()      # replies the socket did not take yet
        self.closed = False


class _StreamListener:
    """A shard's Unix stream socket for the acceptors, read by its own loop.

    Frames read wait in ``ready`` until :meth:`Server.recv` takes them; a
    connection is read only while fewer than the high-water mark wait, so an
    acceptor's writes are held back by the kernel when the shard falls behind.
    """

    def __init__(self, path: str, hwm: int, log):
        try:
            os.unlink(path)         # a socket file a process killed before left there
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind(path)
        sock.listen(128)
        self.listener = sock
        self.fd = sock.fileno()
        self.hwm = hwm
        self.log = log
        self.conns: dict[int, _Conn] = {}
        self.ready: collections.deque = collections.deque()   # (conn, frame)
        self.readable: list[_Conn] = []
        self.unflushed: list[_Conn] = []    # with replies not written yet
        self.changed = True         # the poll's items must be made again

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # (EMFILE: the next poll tries again)
                self.log.warning("the spool's stream socket: accept failed: %s", exc)
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self.conns[conn.fd] = conn
            self.changed = True

    def read(self) -> None:
        """Read the connections the last poll found readable, while few frames wait."""
        readable, self.readable = self.readable, []
        ready = self.ready
        frames: list = []
        for conn in readable:
            while len(ready) < self.hwm:
                try:
                    data = conn.sock.recv(STREAM_READ)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self.drop(conn, str(exc))
                    break
                if not data:
                    self.drop(conn, None)
                    break
                conn.stream.feed(data, frames)
                if frames:
                    ready.extend([(conn, f) for f in frames])
                    frames.clear()
                if len(data) < STREAM_READ:
                    break       # (most likely all there was: the next poll says)

    def write(self, conn: _Conn, data: bytes) -> None:
        """Queue a reply to *conn*; written at :meth:`flush_all` (all of a loop turn's
        replies to one acceptor in one system call, one wake-up)."""
        if conn.closed:
            return              # (the acceptor went away: nobody waits for this)
        out = conn.out
        if not out:
            self.unflushed.append(conn)
        out += frame_head(len(data))
        out += data
        if len(out) > STREAM_OUT_LIMIT:
            self.drop(conn, f"more than {STREAM_OUT_LIMIT} octets of replies unread")

    def flush_all(self) -> None:
        """Write the replies queued since the last call (what the socket does not take
        waits for POLLOUT)."""
        conns, self.unflushed = self.unflushed, []
        for conn in conns:
            if conn.out and not conn.closed:
                self.flush(conn)
                if conn.out:
                    self.changed = True     # (poll for POLLOUT too)

    def flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.drop(conn, str(exc))
            return
        del conn.out[:sent]

    def drop(self, conn: _Conn, why: str | None) -> None:
        """Close *conn* (its frames already read are still taken; replies to them go
        nowhere: the acceptor has gone, or times them out)."""
        if conn.closed:
            return
        if why is not None:
            self.log.warning("an acceptor's stream to the spool closed: %s", why)
        conn.closed = True
        conn.out = bytearray()
        del self.conns[conn.fd]
        conn.sock.close()
        self.changed = True

    def items(self) -> list:
        """What a poll watches: the listener, every connection, POLLOUT where replies wait."""
        self.changed = False
        out = [(self.fd, _POLLIN)]
        for fd, conn in self.conns.items():
            out.append((fd, _POLLIN | _POLLOUT if conn.out else _POLLIN))
        return out

    def polled(self, fd: int, events: int) -> bool:
        """What the poll found on *fd*; True when a connection has something to read."""
        if fd == self.fd:
            self.accept()
            return False
        conn = self.conns.get(fd)
        if conn is None:
            return False
        if events & _POLLOUT and conn.out:
            self.flush(conn)
            if not conn.out:
                self.changed = True     # (no POLLOUT any more)
        if events & ~_POLLOUT:          # (POLLIN, or POLLERR / POLLHUP: read says which)
            self.readable.append(conn)
            return True
        return False

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.sock.close()
        self.conns.clear()
        self.listener.close()


class Server:
    """A ROUTER socket bound at *endpoint*, read synchronously by a role's own loop.

    *takes* are the message classes it accepts; anything else is dropped and
    logged to *log* as a malformed or unexpected *source*.  With *stream* (a
    path), a Unix stream socket there takes requests too (the acceptors':
    :class:`StreamClient`); :meth:`recv` gives its frames first, with a peer
    :meth:`send` answers on the same connection.  Such answers are written at
    :meth:`flush` or the Poller's next wait, all of a turn's to one acceptor
    together: each write wakes the acceptor, and one write per answer had
    made the tail latency at 10,000 connections worse than ZeroMQ's (p99
    17-28 ms against 16-19; 14-20 with them together, bench/RESULTS.md).
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, hwm: int, takes: tuple,
                 log: logging.Logger, source: str = "request", stream: str | None = None):
        self.sock = _socket(ctx, zmq.ROUTER, hwm)
        # A reply to a peer that went away is dropped, not queued forever.
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(endpoint)
        self._send_frame = super(zmq.Socket, self.sock).send     # (see _LoopSocket)
        self._takes = takes
        self._log = log
        self._source = source
        self.stream = _StreamListener(stream, hwm, log) if stream else None

    def recv(self):
        """Return (peer identity, message) or None when nothing (well-formed) is waiting."""
        st = self.stream
        if st is not None:
            ready = st.ready
            while ready or st.readable:
                if not ready:
                    st.read()       # (empties readable: read at most once more here)
                    continue
                conn, frame = ready.popleft()
                msg = receive((frame,), self._takes, self._log, self._source)
                if msg is not None:
                    return conn, msg
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

    def send(self, peer, msg: Message) -> None:
        """Answer *peer*; dropped when it is not reading (it times out and retries)."""
        if type(peer) is _Conn:
            self.stream.write(peer, encode(msg))
            return
        send = self._send_frame
        try:
            send(peer, _NOBLOCK | _SNDMORE)
            send(encode(msg), _NOBLOCK)
        except zmq.Again:
            pass

    def flush(self) -> None:
        """Write the replies to the stream's peers queued so far (the next wait does too)."""
        st = self.stream
        if st is not None and st.unflushed:
            st.flush_all()

    def close(self) -> None:
        self.sock.close(0)
        if self.stream is not None:
            self.flush()        # (answers given since the last wait: not left unsent)
            self.stream.close()


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
    """One wait over a shard's request Server (its stream too) and its DeliveryLinks.

    The result says which sockets have work, so a loop turn looks only at
    those: a look at an idle ZeroMQ socket is not free (a recv that finds
    nothing raises zmq.Again, an exception built in Python, and, like
    ZMQ_EVENTS, makes a system call).
    """

    _REQUESTS, _CHANGES = -1, -2

    def __init__(self, server: Server, links: DeliveryLinks):
        self._pending = links.pending
        self._stream = server.stream
        self._flush = server.flush
        self._zmq_items = [(server.sock, _POLLIN)]
        self._kind = {server.sock: self._REQUESTS}
        for d, s in enumerate(links.socks):
            self._zmq_items.append((s, _POLLIN))
            self._kind[s] = d
        for m in links.monitors:
            self._zmq_items.append((m, _POLLIN))
            self._kind[m] = self._CHANGES
        self._items = self._zmq_items

    def wait(self, timeout_ms: int) -> tuple[bool, list[int], bool]:
        """Wait up to *timeout_ms*: (requests waiting, links with outcomes, links changed)."""
        requests = changes = False
        # outcomes already read, not taken yet (a batch larger than a group commit takes)
        outcomes = [d for d, p in enumerate(self._pending) if p]
        if outcomes:
            timeout_ms = 0
        st = self._stream
        if st is not None:
            self._flush()           # (answers given since the group commit's flush)
            if st.changed:
                self._items = self._zmq_items + st.items()
            if st.ready:
                requests = True         # (frames read, not taken yet)
                timeout_ms = 0
        kind = self._kind
        for sock, events in _zmq_poll(self._items, timeout_ms):
            k = kind.get(sock)
            if k is None:
                if st.polled(sock, events):
                    requests = True
            elif k >= 0:
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


class StreamClient(asyncio.Protocol):
    """An acceptor's connection to a shard's stream socket (:class:`Server`'s *stream*).

    :meth:`send` writes a request on the loop's transport; ``on_reply(message)``
    gets each well-formed reply of the classes *takes*.  While there is no
    connection (the shard is starting or was restarted) :meth:`send` says
    False and a connect is tried every RECONNECT_IVL_MS; at most *hwm* requests
    are unanswered on a connection (a shard that stops reading holds the rest
    back: False too).  Requests unanswered when a connection ends never get a
    reply (an answer goes back on the connection its request came by):
    ``on_lost()`` is then called, so the caller can give up on them at once.
    """

    def __init__(self, loop, path: str, hwm: int, takes: tuple, on_reply,
                 log: logging.Logger, source: str = "reply", connect: bool = True,
                 on_lost=None):
        self._loop = loop
        self._path = path
        self._hwm = hwm
        self._takes = takes
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._log = log
        self._source = source
        self._transport = None
        self._stream = _Stream()
        self._frames: list = []
        self._unanswered = 0
        self._closed = False
        self._task = None
        if connect:
            self._connect()

    def _connect(self) -> None:
        if not self._closed and self._transport is None:
            self._task = self._loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            await self._loop.create_unix_connection(lambda: self, self._path)
        except OSError:         # (not there yet, or refused: the shard is starting)
            if not self._closed:
                self._loop.call_later(RECONNECT_IVL_MS / 1000, self._connect)

    def connection_made(self, transport) -> None:
        if self._closed:
            transport.close()
            return
        self._transport = transport
        self._stream = _Stream()
        self._unanswered = 0

    def connection_lost(self, exc) -> None:
        self._transport = None
        if not self._closed:
            self._loop.call_later(RECONNECT_IVL_MS / 1000, self._connect)
            if self._unanswered and self._on_lost is not None:
                self._on_lost()

    def data_received(self, data: bytes) -> None:
        frames = self._frames
        self._stream.feed(data, frames)
        if not frames:
            return
        self._unanswered -= len(frames)
        takes, log, source, on_reply = self._takes, self._log, self._source, self._on_reply
        for frame in frames:
            msg = receive((frame,), takes, log, source)
            if msg is not None:
                on_reply(msg)
        frames.clear()

    def send(self, msg: Message) -> bool:
        """Write *msg* to the shard; False when not connected or *hwm* are unanswered."""
        tr = self._transport
        # (closing: the shard went away and connection_lost is still to come; a write
        # now would raise)
        if tr is None or self._unanswered >= self._hwm or tr.is_closing():
            return False
        data = encode(msg)
        tr.writelines((frame_head(len(data)), data))
        self._unanswered += 1
        return True

    def connected(self) -> bool:
        """True while connected to the shard."""
        tr = self._transport
        return tr is not None and not tr.is_closing()

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None


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
