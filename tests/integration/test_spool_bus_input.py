"""A spool shard given malformed bus requests drops them and keeps serving.

(The field checks are declared with the messages in mta/bus and made by
bus.decode; tests/test_bus.py covers them for every checked message.)

The acceptors are the only senders on the bus, but a shard is the one process
that must never die on its input: it holds every message of its shard.  The
test speaks to the running daemon's shard over its real ZeroMQ endpoint, the
way an acceptor does, with requests an acceptor would never send.
"""
from __future__ import annotations

import os
import time

import msgspec
import zmq

from mta import bus
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


def test_malformed_commits_are_dropped_and_the_shard_keeps_serving(make_daemon):
    d = make_daemon(acceptors=1, shards=1)
    spool_pid = d.children()["spool[0]"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + os.path.join(d.state_dir, "run", "spool-0"))
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
        assert sock.poll(20_000), "no answer to the well-formed commit"
        assert bus.decode(sock.recv()) == bus.SpoolMessageCommitted(99, bus.STATUS_OK)
        assert not sock.poll(500), "a malformed request was answered"
    finally:
        sock.close(0)
        ctx.term()
    # The same shard process, alive, and it logged each refusal.
    assert d.children()["spool[0]"] == spool_pid
    log = d.log()
    # Each of them: the bad envelopes, the two wrong outer shapes and the garbage.
    assert log.count("dropped a malformed request") == len(bad) + 3, log[-3000:]
    # The queue holds the good message only (asked of the running daemon).
    queued = d.queue_list()
    assert [(m["queue_id"], m["recipients"]) for m in queued] == [(q[11], ["rcpt@example.net"])], \
        queued
