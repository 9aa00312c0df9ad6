"""A spool shard given malformed bus requests drops them and keeps serving.

(The field checks are declared with the messages in mta/bus and made by
bus.decode; tests/test_bus.py covers them for every checked message.)

The acceptors are the only senders of commits, but a shard is the one process
that must never die on its input: it holds every message of its shard.  The
test speaks to the running daemon's shard over its real sockets -- the stream
socket the acceptors use and the ZeroMQ endpoint of the operator's commands --
with requests an acceptor would never send.
"""
from __future__ import annotations

import os
import socket
import stat
import struct
import time

import msgspec
import pytest
import zmq

from mta import bus, config
from mta.queueid import new_qid_for_shard


def body(n: int) -> bytes:
    return f"Message-ID: <bus{n}@example.com>\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()


def commit_frame(req: int, envelopes, bodies) -> bytes:
    """A SPOOL_MESSAGE_COMMIT frame as any peer could send it: the fields unchecked."""
    return msgspec.msgpack.encode([bus.SpoolMessageCommit.__struct_config__.tag, req,
                                   envelopes, bodies])


def envelope(qid: str, rcpts=None, **change) -> list:
    env = [qid, "sender@example.com", ["rcpt@example.net"] if rcpts is None else rcpts,
           {}, "bus.test [127.0.0.1]", time.time()]
    for index, value in change.items():
        env[int(index[1:])] = value
    return env


class ZmqPeer:
    """The shard's ZeroMQ endpoint, as `mta queue` speaks to it."""

    def __init__(self, run_dir: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect("ipc://" + os.path.join(run_dir, "spool-0"))

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout: float) -> bytes | None:
        return self.sock.recv() if self.sock.poll(int(timeout * 1000)) else None

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class StreamPeer:
    """The shard's stream socket, as an acceptor speaks to it: 8-octet lengths, frames."""

    def __init__(self, run_dir: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.path.join(run_dir, "commit-0"))
        self.buf = b""

    def send(self, frame: bytes) -> None:
        self.sock.sendall(struct.pack(">Q", len(frame)) + frame)

    def recv(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while len(self.buf) < 8 or len(self.buf) < 8 + struct.unpack(">Q", self.buf[:8])[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            assert data, "the shard closed the stream"
            self.buf += data
        n = struct.unpack(">Q", self.buf[:8])[0]
        frame, self.buf = self.buf[8:8 + n], self.buf[8 + n:]
        return frame

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("peer_class", [StreamPeer, ZmqPeer])
def test_malformed_commits_are_dropped_and_the_shard_keeps_serving(make_daemon, peer_class):
    d = make_daemon(acceptors=1, shards=1)
    spool_pid = d.children()["spool[0]"]
    sock = peer_class(os.path.join(d.state_dir, "run"))
    try:
        q = [new_qid_for_shard(0, 1) for _ in range(20)]
        bad = [
            [envelope(q[0], rcpts=[])],                      # no recipient
            [envelope(q[1], rcpts="rcpt@example.net")],      # not a list
            [envelope(q[2], rcpts=[7])],                     # not an address
            [envelope(q[3])[:4]],                            # too short
            [envelope(q[4], f3=["not", "a", "dict"])],      # params
            [envelope(q[5], f5="yesterday")],               # arrival
            [envelope(q[6], f0="")],                         # empty queue id
            [envelope(q[7], f0="Q" * 200)],                  # absurd queue id
            [envelope(q[8], f1=None)],                       # sender
            ["not an envelope"],
        ]
        for req, envelopes in enumerate(bad, start=1):
            sock.send(commit_frame(req, envelopes, [body(req)]))
        # The outer shape wrong: envelopes not a list; more envelopes than bodies.
        sock.send(commit_frame(50, 5, [body(50)]))
        sock.send(commit_frame(51, [envelope(q[9]), envelope(q[10])], [body(51)]))
        sock.send(b"\xff\x00garbage")
        # Then a good one: it is the only request answered, and it is stored.
        sock.send(bus.encode(bus.SpoolMessageCommit(
            99, [bus.Envelope(*envelope(q[11]))], [body(99)])))
        reply = sock.recv(20)
        assert reply is not None, "no answer to the well-formed commit"
        assert bus.decode(reply) == bus.SpoolMessageCommitted(99, bus.STATUS_OK)
        assert sock.recv(0.5) is None, "a malformed request was answered"
    finally:
        sock.close()
    # The same shard process, alive, and it logged each refusal.
    assert d.children()["spool[0]"] == spool_pid
    log = d.log()
    # Each of them: the bad envelopes, the two wrong outer shapes and the garbage.
    assert log.count("dropped a malformed request") == len(bad) + 3, log[-3000:]
    # The queue holds the good message only (asked of the running daemon).
    queued = d.queue_list()
    assert [(m["queue_id"], m["recipients"]) for m in queued] == [(q[11], ["rcpt@example.net"])], \
        queued


def test_a_stream_cut_mid_frame_or_claiming_a_huge_frame_harms_nothing(make_daemon):
    """A peer on the shard's stream socket that says a frame of 2**60 octets follows and
    then goes away, or cuts a frame in the middle: the shard drops what it had of it,
    keeps running and takes the next peer's commits (and mail over SMTP)."""
    d = make_daemon(acceptors=1, shards=1)
    spool_pid = d.children()["spool[0]"]
    run_dir = os.path.join(d.state_dir, "run")
    q = new_qid_for_shard(0, 1)
    huge = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    huge.connect(os.path.join(run_dir, "commit-0"))
    huge.sendall(struct.pack(">Q", 1 << 60) + b"x" * 100_000)
    cut = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cut.connect(os.path.join(run_dir, "commit-0"))
    frame = bus.encode(bus.SpoolMessageCommit(7, [bus.Envelope(*envelope(q))], [body(7)]))
    cut.sendall(struct.pack(">Q", len(frame)) + frame[:len(frame) // 2])
    time.sleep(0.3)
    huge.close()
    cut.close()
    good = StreamPeer(run_dir)
    q2 = new_qid_for_shard(0, 1)
    try:
        good.send(bus.encode(bus.SpoolMessageCommit(
            8, [bus.Envelope(*envelope(q2))], [body(8)])))
        reply = good.recv(20)
        assert reply is not None and bus.decode(reply) == bus.SpoolMessageCommitted(
            8, bus.STATUS_OK)
    finally:
        good.close()
    q3 = d.send("s@example.com", ["after@example.net"], body(9))
    assert d.children()["spool[0]"] == spool_pid
    assert {m["queue_id"] for m in d.queue_list()} == {q2, q3}
    # Every socket the running daemon made in run/ is one Settings.socket_paths names
    # (what config.load measures against the length a Unix socket path may have).
    made = {os.path.join(os.path.abspath(run_dir), n) for n in os.listdir(run_dir)
            if stat.S_ISSOCK(os.lstat(os.path.join(run_dir, n)).st_mode)}
    assert made == set(config.load(d.config_path).socket_paths()), sorted(made)
