"""In-process tests of the bus's declared messages and strict decoding (mta/bus)."""
from __future__ import annotations

import logging
import time

import msgspec
import pytest

from mta import bus

QID = "0" * 20


def roundtrip(msg):
    return bus.decode(bus.encode(msg))


def envelope(**change) -> list:
    """An envelope as the raw list on the wire, with fields replaced by position (f0..f6)."""
    env = [QID, "s@example.com", ["r@example.net"], {}, "c [127.0.0.1]", 1.5, "<m@example.com>"]
    for k, v in change.items():
        env[int(k[1:])] = v
    return env


def raw(tag: int, *fields) -> bytes:
    """A frame as a peer could send it: the code, then whatever fields it likes."""
    return msgspec.msgpack.encode([tag, *fields])


def test_every_declared_message_has_a_unique_code_name_and_route():
    codes = [cls.__struct_config__.tag for cls in bus.MESSAGES.values()]
    assert len(set(codes)) == len(codes) == len(bus.MESSAGES)
    for name, cls in bus.MESSAGES.items():
        assert cls.NAME == name and " -> " in cls.ROUTE
        assert name.split("_")[0] in ("SPOOL", "DELIVERY", "ADMIN")


def test_well_formed_messages_pass():
    env = bus.Envelope(QID, "s@example.com", ["r@example.net"], {"BODY": "8BITMIME"},
                       "c [127.0.0.1]", 1.5, "<m@example.com>")
    m = roundtrip(bus.SpoolMessageCommit(1, [env, env], [b"a", b"b"]))
    assert type(m) is bus.SpoolMessageCommit and m.req == 1 and m.bodies == [b"a", b"b"]
    assert m.envelopes[0] == env and m.envelopes[1].message_id == "<m@example.com>"
    job = roundtrip(bus.DeliveryMessageReady(3, QID, "", "example.net",
                                             [bus.JobRecipient(0, "r@example.net")],
                                             {"BODY": "8BITMIME"}, 1, b"x"))
    assert job.rcpts == [bus.JobRecipient(0, "r@example.net")] and job.body == b"x"
    out = roundtrip(bus.DeliveryOutcome(3, QID, [bus.Result(0, bus.DELIVERED, 250, "2.0.0",
                                                            "ok", "mx.test", "127.0.0.1")]))
    assert out.results[0].outcome == bus.DELIVERED and out.results[0].host == "mx.test"
    reply = roundtrip(bus.SpoolMessageCommitted(7, bus.STATUS_STORAGE))
    assert (type(reply), reply.req, reply.status) == (bus.SpoolMessageCommitted, 7, 1)
    # An integer arrival time is a number like any other.
    assert roundtrip(bus.SpoolMessageCommit(1, [envelope(f5=7)], [b"a"])).envelopes[0].arrival == 7


def test_records_cost_nothing_on_the_wire():
    """array_like: the frame is the code and the bare field values, no field names."""
    frame = bus.encode(bus.SpoolMessageCommitted(5, 0))
    assert frame == msgspec.msgpack.encode([2, 5, 0])
    result = bus.Result(0, bus.DEFERRED, 451, "4.4.1", "t", "h", "i")
    assert bus.encode(bus.DeliveryOutcome(1, QID, [result])) == msgspec.msgpack.encode(
        [12, 1, QID, [[0, "deferred", 451, "4.4.1", "t", "h", "i", False, "", None, False]],
         "", "", "", 0.0, None, ""])


@pytest.mark.parametrize("envelopes, bodies", [
    ([envelope(f2=[])], [b"a"]),                     # no recipient
    ([envelope(f2="r@example.net")], [b"a"]),       # recipients not a list
    ([envelope(f2=[1])], [b"a"]),                    # a recipient not a string
    ([envelope()[:5]], [b"a"]),                      # too short
    ([envelope(f3=[])], [b"a"]),                     # params not a map
    ([envelope(f5="now")], [b"a"]),                  # arrival not a number
    ([envelope(f5=True)], [b"a"]),                   # nor a boolean
    ([envelope(f0="")], [b"a"]),                     # empty queue id
    ([envelope(f0="Q" * 65)], [b"a"]),               # queue id too long
    ([envelope(f1=None)], [b"a"]),                   # sender
    ([envelope(f6=5)], [b"a"]),                      # message id
    (["x"], [b"a"]),
    (5, [b"a"]),                                     # envelopes not a list
    ([envelope(), envelope()], [b"a"]),              # a body missing
    ([envelope()], [b"a", b"b"]),                    # a body too many
    ([envelope()], ["a"]),                           # a body not bytes
])
def test_commit_with_a_bad_envelope_is_refused(envelopes, bodies):
    with pytest.raises(bus.BusError, match="SPOOL_MESSAGE_COMMIT"):
        bus.decode(raw(1, 1, envelopes, bodies))


@pytest.mark.parametrize("fields", [
    ("1", QID, "", "d", [[0, "r@d"]], {}, 1, b"x"),        # req
    (1, QID, "", "d", [], {}, 1, b"x"),                    # no recipient
    (1, QID, "", "d", [["0", "r@d"]], {}, 1, b"x"),        # index not a number
    (1, QID, "", "d", [[0, "r@d", 3]], {}, 1, b"x"),       # recipient not [index, address]
    (1, QID, "", "d", [[0, "r@d"]], [], 1, b"x"),          # params
    (1, QID, None, "d", [[0, "r@d"]], {}, 1, b"x"),        # sender
    (1, QID, "", "d", [[0, "r@d"]], {}, 1.5, b"x"),        # attempt
    (1, QID, "", "d", [[0, "r@d"]], {}, 1),                # no body
])
def test_bad_delivery_job_is_refused(fields):
    with pytest.raises(bus.BusError, match="DELIVERY_MESSAGE_READY"):
        bus.decode(raw(11, *fields))


@pytest.mark.parametrize("fields", [
    (1, QID, "delivered"),
    (1, QID, [[0, "delivered", 250]]),                               # too short
    (1, QID, [["0", "delivered", 250, "", "", "", ""]]),             # index
    (1, QID, [[0, "sent", 250, "", "", "", ""]]),                    # not an outcome word
    (1, 7, [[0, "delivered", 250, "", "", "", ""]]),                 # qid
])
def test_bad_outcome_is_refused(fields):
    with pytest.raises(bus.BusError, match="DELIVERY_OUTCOME"):
        bus.decode(raw(12, *fields))


@pytest.mark.parametrize("frame", [b"", b"\xff\x00garbage", raw(99, 1), raw(2, 1),
                                   msgspec.msgpack.encode({"req": 1})])
def test_garbage_and_unknown_codes_are_refused(frame):
    with pytest.raises(bus.BusError):
        bus.decode(frame)


def test_receive_drops_and_logs_what_the_receiver_does_not_take(caplog):
    log = logging.getLogger("test.bus")
    committed = bus.encode(bus.SpoolMessageCommitted(1, 0))
    with caplog.at_level(logging.WARNING, "test.bus"):
        assert bus.receive([committed], bus.SPOOL_REPLIES, log, "reply") == \
            bus.SpoolMessageCommitted(1, 0)
        assert bus.receive([committed], bus.SPOOL_REQUESTS, log, "request") is None
        assert bus.receive([b"\xff"], bus.SPOOL_REQUESTS, log, "request") is None
        assert bus.receive([committed, committed], bus.SPOOL_REPLIES, log, "reply") is None
    text = caplog.text
    assert "dropped an unexpected request: SPOOL_MESSAGE_COMMITTED" in text
    assert text.count("dropped a malformed") == 2


def test_a_result_of_the_previous_version_still_decodes():
    # (a delivery process of the version before, during an upgrade: no rule per result)
    frame = msgspec.msgpack.encode([12, 1, QID, [[0, "failed", 554, "5.7.1", "t", "h", "i",
                                                  False, "51"]], "", "", "", 0.0,
                                    ["r", "", "bounce", "site", "554 5.7.1 t", "rcpt", 0.0],
                                    ""])
    [r] = bus.decode(frame).results
    assert (r.outcome, r.bounce_class, r.rule, r.local) == ("failed", "51", None, False)
    rule = bus.FiredRule("r", "", "bounce", "site", "554 5.7.1 t", "rcpt")
    r = roundtrip(bus.DeliveryOutcome(1, QID, [bus.Result(0, bus.FAILED, 554, "", "", "", "",
                                                          rule=rule)])).results[0]
    assert r.rule == rule


def test_a_whole_queue_flush_of_the_cli_still_reaches_a_daemon_of_the_previous_version(
        tmp_path):
    # Decoding refuses extra fields, so 'mta queue flush' of a newly installed package,
    # run before 'mta upgrade', sent the (empty) selection fields that --domain and
    # --queue-id added, and the running daemon's shards dropped it ("dropped a
    # malformed request"): the flush timed out.  The command-line tools' requests are
    # sent without their trailing fields left at their defaults, as that version sent
    # them; a selective one carries its selection (a daemon of the version before drops
    # it rather than flush everything).
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{tmp_path}/s")
    cl = bus.SyncClient(ctx, f"ipc://{tmp_path}/s")
    sent = []
    try:
        for values in ((), (True,), (False, ["example.com"], [QID])):
            with pytest.raises(TimeoutError):
                cl.call(bus.SpoolQueueFlush, *values, timeout=0.2)
            sent.append(router.recv_multipart()[1])
    finally:
        cl.close()
        router.close()
        ctx.term()
    wire = [msgspec.msgpack.decode(f)[2:] for f in sent]
    # (what the version before declared: code, req, requeued = False)
    assert wire[:2] == [[], [True]]
    got = bus.decode(sent[2])
    assert (got.requeued, got.domains, got.qids) == (False, ["example.com"], [QID])
    assert bus.decode(sent[0]) == bus.SpoolQueueFlush(bus.decode(sent[0]).req)


def test_outcome_words_are_the_declared_vocabulary():
    assert bus.OUTCOMES == (bus.DELIVERED, bus.DEFERRED, bus.FAILED, bus.REQUEUED)
    for word in bus.OUTCOMES:
        msg = bus.DeliveryOutcome(1, QID, [bus.Result(0, word, 250, "", "", "", "")])
        assert roundtrip(msg).results[0].outcome == word


def test_outbound_tls_is_one_of_sparkposts_values():
    result = bus.Result(0, bus.DELIVERED, 250, "", "", "", "")
    for value in ("", "1", "0", "-1"):
        assert roundtrip(bus.DeliveryOutcome(1, QID, [result], outbound_tls=value)) \
            .outbound_tls == value
    frame = msgspec.msgpack.encode([12, 1, QID, [[0, "delivered", 250, "", "", "", "", False,
                                                 ""]], "", "", "", 0.0, None, "yes"])
    with pytest.raises(bus.BusError):
        bus.decode(frame)


# ----------------------------------------------------------- the delivery side's ROUTER

def _outcome(n: int) -> bus.DeliveryOutcome:
    return bus.DeliveryOutcome(n, QID, [bus.Result(0, bus.DELIVERED, 250, "2.0.0", "ok " * 100,
                                                   "mx.test", "127.0.0.1")])


def test_async_server_says_when_a_peer_is_full_and_drops_nothing(tmp_path):
    """At the high-water mark towards one peer, send() returns False instead of
    dropping the message silently (ZMQ_ROUTER_MANDATORY): every send that said
    True arrives, and a refused one can be sent again once the peer reads."""
    import asyncio

    import zmq
    loop = asyncio.new_event_loop()
    ctx = bus.new_context()
    endpoint = f"ipc://{tmp_path}/delivery-0"
    server = bus.AsyncServer(ctx, loop, endpoint, 2, bus.DELIVERY_JOBS,
                             lambda peer, msg: jobs.append((peer, msg)),
                             logging.getLogger("test"), "job")
    jobs = []
    # The spool shard's side: a DEALER that sends one job and then stops reading.
    shard = ctx.socket(zmq.DEALER)
    shard.setsockopt(zmq.LINGER, 0)
    shard.setsockopt(zmq.RCVHWM, 2)
    shard.setsockopt(zmq.RCVBUF, 4096)
    shard.connect(endpoint)
    try:
        shard.send(bus.encode(bus.DeliveryMessageReady(
            1, QID, "", "example.net", [bus.JobRecipient(0, "r@example.net")], {}, 1, b"x")))
        deadline = loop.time() + 10
        while not jobs and loop.time() < deadline:
            loop.run_until_complete(asyncio.sleep(0.01))
        assert jobs, "the job never arrived"
        peer = jobs[0][0]
        sent = []
        for n in range(2000):      # far more than HWM + socket buffers hold
            if server.send(peer, _outcome(n)):
                sent.append(n)
            else:
                break
        assert len(sent) < 2000, "send() never reported the full queue"
        refused = len(sent)
        got = []

        def read_all():
            while shard.poll(200):
                got.append(bus.decode(shard.recv()).req)
        read_all()
        assert got == sent, (len(got), len(sent))
        # The peer has read everything: the refused outcome goes now.
        assert server.send(peer, _outcome(refused))
        read_all()
        assert got[-1] == refused
        # A peer that is not connected (a shard that restarted) is named as gone.
        with pytest.raises(bus.PeerGone):
            server.send(b"\0no-such-peer", _outcome(0))
    finally:
        shard.close(0)
        server.close()
        ctx.term()
        loop.close()


CRASH = """
import sys
from mta import bus
ctx = bus.new_context()
server = bus.Server(ctx, sys.argv[1], 10, bus.SPOOL_REQUESTS, None)
try:
    raise RuntimeError("a defect in the role's loop")
finally:
    bus.close_context(ctx)
"""


def test_a_role_that_fails_with_its_sockets_open_exits_with_its_traceback(tmp_path):
    """close_context() ends a context whose sockets are still open.  ctx.term() (what the
    roles called) waits for ever there: a shard whose loop raised hung silently instead
    of exiting with its traceback and being restarted (checked by hand: with term() this
    subprocess is still running after 5 s)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", CRASH,
                        f"ipc://{tmp_path}/sock"], capture_output=True, timeout=20)
    assert r.returncode == 1
    assert b"RuntimeError: a defect in the role's loop" in r.stderr


def test_events_commit_carries_a_reports_events_and_is_bounded():
    evs = [{"type": "out_of_band", "timestamp": 1.5, "event": {"rcpt_meta": {"k": [1]}}}]
    m = roundtrip(bus.SpoolEventsCommit(4, evs))
    assert type(m) is bus.SpoolEventsCommit and m.req == 4 and m.events == evs
    assert bus.SpoolEventsCommit in bus.SPOOL_REQUESTS
    with pytest.raises(bus.BusError):
        bus.decode(raw(bus.SpoolEventsCommit.__struct_config__.tag, 4, []))       # none
    with pytest.raises(bus.BusError):
        bus.decode(raw(bus.SpoolEventsCommit.__struct_config__.tag, 4,
                       [{}] * (bus.MAX_REPORT_EVENTS + 1)))
    with pytest.raises(bus.BusError):
        bus.decode(raw(bus.SpoolEventsCommit.__struct_config__.tag, 4, ["not a dict"]))


def test_outcomes_go_in_batches_and_come_out_one_by_one_in_order(tmp_path):
    """DeliveryOutcomes: what a delivery process finished in one loop turn, one message;
    the shard's DeliveryLinks hands them out one at a time, in order, between single
    DeliveryOutcome messages, and its Poller says a link has some left to take even when
    its socket has nothing new."""
    import asyncio

    loop = asyncio.new_event_loop()
    ctx = bus.new_context()
    endpoint = f"ipc://{tmp_path}/delivery-0"
    jobs = []
    server = bus.AsyncServer(ctx, loop, endpoint, 100, bus.DELIVERY_JOBS,
                             lambda peer, msg: jobs.append(peer), logging.getLogger("test"), "job")
    links = bus.DeliveryLinks(ctx, [endpoint], 100, logging.getLogger("test"))
    shard_server = bus.Server(ctx, f"ipc://{tmp_path}/spool-0", 10, bus.SPOOL_REQUESTS, None)
    poller = bus.Poller(shard_server, links)
    try:
        deadline = loop.time() + 10
        while not links.send_jobs(0, [bus.DeliveryMessageReady(
                1, QID, "", "example.net", [bus.JobRecipient(0, "r@example.net")], {}, 1, b"x")]):
            assert loop.time() < deadline
            time.sleep(0.01)
        while not jobs and loop.time() < deadline:
            loop.run_until_complete(asyncio.sleep(0.01))
        peer = jobs[0]
        assert server.send(peer, bus.DeliveryOutcomes([_outcome(n) for n in range(5)]))
        assert server.send(peer, _outcome(5))
        assert server.send(peer, bus.DeliveryOutcomes([_outcome(6), _outcome(7)]))
        got = []
        while len(got) < 2 and loop.time() < deadline:
            _, ready, _ = poller.wait(100)
            if ready:
                got.append(links.recv(0).req)       # one at a time, as a batch limit takes
        assert got == [0, 1]
        # nothing new on the socket... but three of the first batch are still to take
        assert links.pending[0] and links.waiting(0)
        assert poller.wait(0)[1] == [0]
        while len(got) < 8 and loop.time() < deadline:
            if poller.wait(100)[1]:
                while (m := links.recv(0)) is not None:
                    assert type(m) is bus.DeliveryOutcome
                    got.append(m.req)
        assert got == list(range(8))
        assert links.recv(0) is None and not links.waiting(0) and poller.wait(0)[1] == []
        # a batch is bounded
        with pytest.raises(bus.BusError):
            bus.decode(bus.encode(bus.DeliveryOutcomes(
                [_outcome(n) for n in range(bus.MAX_OUTCOMES_PER_SEND + 1)])))
        with pytest.raises(bus.BusError):
            bus.decode(bus.encode(bus.DeliveryOutcomes([])))
    finally:
        links.close()
        shard_server.close()
        server.close()
        bus.close_context(ctx)
        loop.close()


def _job(req: int, size: int = 1) -> bus.DeliveryMessageReady:
    return bus.DeliveryMessageReady(req, QID, "", "example.net",
                                    [bus.JobRecipient(0, "r@example.net")], {}, 1, b"x" * size)


def test_jobs_go_in_bounded_batches_in_order_and_a_full_queue_refuses_the_rest(tmp_path):
    """DeliveryLinks.send_jobs: a dispatch pass's jobs for one process, several to a
    DeliveryJobs message (bounded in count and octets, a big job alone), in order; when
    the process's queue is full, how many went, so the shard takes the rest back."""
    ctx = bus.new_context()
    endpoint = f"ipc://{tmp_path}/delivery-0"
    hwm = 8
    server = bus.Server(ctx, endpoint, hwm, bus.DELIVERY_JOBS, logging.getLogger("test"))
    links = bus.DeliveryLinks(ctx, [endpoint], hwm, logging.getLogger("test"))
    big = bus.MAX_JOB_BATCH_BYTES // 2 + 1
    try:
        deadline = time.monotonic() + 10
        while not links.send_jobs(0, [_job(0)]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first = None
        while first is None and time.monotonic() < deadline:     # (connected, queue empty)
            first = server.recv()
            time.sleep(0.01)
        assert first is not None and first[1].req == 0
        jobs = ([_job(n) for n in range(1, bus.MAX_JOBS_PER_SEND + 3)]
                + [_job(100, big), _job(101, big), _job(102, 10)])
        assert links.send_jobs(0, jobs) == len(jobs)
        got, n = [first[1]], 1
        while n < len(jobs) + 1 and time.monotonic() < deadline:
            m = server.recv()
            if m is None:
                time.sleep(0.01)
                continue
            got.append(m[1])
            n += len(m[1].jobs) if type(m[1]) is bus.DeliveryJobs else 1
        batches = [m.jobs if type(m) is bus.DeliveryJobs else [m] for m in got]
        assert [j.req for b in batches for j in b] == [0] + [j.req for j in jobs]
        for b in batches:
            assert len(b) <= bus.MAX_JOBS_PER_SEND
            assert len(b) == 1 or sum(len(j.body) for j in b) <= bus.MAX_JOB_BATCH_BYTES
        # the first alone; 64; the last small two and the first big one; the second big
        # one and the small one after it
        assert [len(b) for b in batches] == [1, bus.MAX_JOBS_PER_SEND, 3, 2]
        # one job bigger than the bound goes alone
        assert links.send_jobs(0, [_job(300, bus.MAX_JOB_BATCH_BYTES + 1), _job(301)]) == 2
        got = []
        while len(got) < 2 and time.monotonic() < deadline:
            m = server.recv()
            if m is None:
                time.sleep(0.01)
                continue
            got.append(m[1])
        assert [type(m) for m in got] == [bus.DeliveryMessageReady] * 2
        # a full queue (nobody reads): the link takes what fits and says how many; 64 MiB
        # of bodies is far past 8 batches of 1 MiB and the sockets' buffers
        many = [_job(200 + n, 64 << 10) for n in range(1024)]
        sent = links.send_jobs(0, many)
        assert 0 < sent < len(many)
        assert sent % (bus.MAX_JOB_BATCH_BYTES // (64 << 10)) == 0      # whole batches
    finally:
        links.close()
        server.close()
        bus.close_context(ctx)


def test_a_send_that_fails_still_schedules_a_drain(tmp_path):
    """A send that fails went through libzmq's command processing like any other and may
    have consumed the edge of a message that arrived meanwhile: the loop must look at the
    socket again after it too (a delivery process that dropped an outcome for a gone shard
    then missed the next job until something else woke it)."""
    import asyncio

    loop = asyncio.new_event_loop()
    ctx = bus.new_context()
    server = bus.AsyncServer(ctx, loop, f"ipc://{tmp_path}/delivery-0", 2, bus.DELIVERY_JOBS,
                             lambda peer, msg: None, logging.getLogger("test"), "job")
    try:
        loop.run_until_complete(asyncio.sleep(0.01))     # the drains of start-up are done
        assert not server._drain_scheduled
        with pytest.raises(bus.PeerGone):
            server.send(b"\0no-such-peer", _outcome(0))
        assert server._drain_scheduled
    finally:
        server.close()
        ctx.term()
        loop.close()


def _commit(req: int, body: bytes = b"x") -> bus.SpoolMessageCommit:
    return bus.SpoolMessageCommit(req, [bus.Envelope(QID, "s@x", ["r@y"], {}, "c", 1.0)],
                                  [body])


class _StreamPair:
    """A shard's Server with its stream socket and an acceptor's StreamClient, on one
    asyncio loop in this process; :meth:`serve` is the shard's loop turn (poll, take
    every request, answer each)."""

    def __init__(self, tmp_path, hwm: int = 100, answer: bool = True):
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.ctx = bus.new_context()
        self.path = str(tmp_path / "commit-0")
        self.log = logging.getLogger("test.bus")
        self.server = bus.Server(self.ctx, f"ipc://{tmp_path}/spool-0", hwm,
                                 bus.SPOOL_REQUESTS, self.log, stream=self.path)
        self.links = bus.DeliveryLinks(self.ctx, [], hwm, self.log)
        self.poller = bus.Poller(self.server, self.links)
        self.replies: list = []
        self.taken: list = []
        self.answer = answer
        self.client = bus.StreamClient(self.loop, self.path, hwm, (bus.SpoolMessageCommitted,),
                                       self.replies.append, self.log, "reply from the spool")
        self.until(self.client.connected)

    def serve(self, timeout_ms: int = 0) -> int:
        requests, _, _ = self.poller.wait(timeout_ms)
        n = 0
        while requests:
            got = self.server.recv()
            if got is None:
                break
            peer, msg = got
            self.taken.append(msg)
            n += 1
            if self.answer:
                self.server.send(peer, bus.SpoolMessageCommitted(msg.req, bus.STATUS_OK))
        return n

    def turn(self) -> None:
        import asyncio

        self.serve()
        self.loop.run_until_complete(asyncio.sleep(0.001))

    def until(self, cond, seconds: float = 5) -> None:
        deadline = time.monotonic() + seconds
        while not cond():
            assert time.monotonic() < deadline, "not within %gs" % seconds
            self.turn()

    def close(self) -> None:
        import asyncio

        self.client.close()
        self.loop.run_until_complete(asyncio.sleep(0))     # (a connect it cancelled ends)
        self.server.close()
        self.links.close()
        bus.close_context(self.ctx)
        self.loop.close()


def test_the_acceptors_stream_carries_requests_whole_and_in_order_and_replies_back(tmp_path):
    """An acceptor's commits on the shard's stream socket: small and large (a 5 MB
    body read in many pieces) come out whole, in order, with a peer the answer goes
    back to; each reply reaches the client's callback."""
    pair = _StreamPair(tmp_path, hwm=1000)
    try:
        bodies = [b"a", b"b" * 100_000, bytes(range(256)) * 20_000, b"c", b"d" * 3]
        for req, body in enumerate(bodies, 1):
            assert pair.client.send(_commit(req, body))
        pair.until(lambda: len(pair.replies) == len(bodies))
        assert [m.req for m in pair.taken] == [1, 2, 3, 4, 5]
        assert [m.bodies[0] for m in pair.taken] == bodies
        assert [(r.req, r.status) for r in pair.replies] == [(n, bus.STATUS_OK)
                                                             for n in range(1, 6)]
        # many small ones written at once are read at once and all answered
        for req in range(100, 400):
            assert pair.client.send(_commit(req))
        pair.until(lambda: len(pair.replies) == 305)
        assert [r.req for r in pair.replies[5:]] == list(range(100, 400))
    finally:
        pair.close()


def test_a_shards_answers_of_one_turn_go_to_an_acceptor_together(tmp_path):
    """The answers a shard gives in one loop turn wait until its flush (after the group
    commit) or its next wait: one write, one wake-up of the acceptor, for all of them."""
    import asyncio

    pair = _StreamPair(tmp_path, answer=False)
    try:
        for req in (1, 2, 3):
            assert pair.client.send(_commit(req))
        pair.until(lambda: len(pair.taken) == 3)
        conn = next(iter(pair.server.stream.conns.values()))
        for m in pair.taken:
            pair.server.send(conn, bus.SpoolMessageCommitted(m.req, bus.STATUS_OK))
        got = []
        real = pair.client.data_received
        pair.client.data_received = lambda data: (got.append(len(data)), real(data))
        pair.loop.run_until_complete(asyncio.sleep(0.05))
        assert not pair.replies          # not written yet
        pair.server.flush()
        pair.until(lambda: len(pair.replies) == 3)
        assert [r.req for r in pair.replies] == [1, 2, 3]
        assert len(got) == 1             # in one piece
        # what is left unflushed goes at the next wait
        pair.server.send(conn, bus.SpoolMessageCommitted(4, bus.STATUS_OK))
        pair.poller.wait(0)
        pair.until(lambda: len(pair.replies) == 4)
        # ... or when the shard closes its sockets (it stops)
        pair.server.send(conn, bus.SpoolMessageCommitted(5, bus.STATUS_OK))
        pair.server.close()
        pair.loop.run_until_complete(asyncio.sleep(0.05))
        assert [r.req for r in pair.replies] == [1, 2, 3, 4, 5]
        pair.server = bus.Server(pair.ctx, f"ipc://{tmp_path}/spool-0b", 100,
                                 bus.SPOOL_REQUESTS, pair.log, stream=pair.path)
    finally:
        pair.close()


def test_a_stream_frame_is_cut_out_whole_however_the_bytes_arrive():
    """The stream's framing: frames split at every possible point, several in one read,
    a header itself split, come out byte for byte (pieces joined once per frame)."""
    import random

    frames = [b"", b"x", bytes(range(256)) * 40, b"y" * 70_000, b"z" * 3]
    data = b"".join(bus.sockets.frame_head(len(f)) + f for f in frames)
    rnd = random.Random(7)
    for _ in range(300):
        cuts = sorted(rnd.sample(range(1, len(data)), rnd.randint(1, 12)))
        st = bus.sockets._Stream()
        out: list = []
        for a, b in zip([0] + cuts, cuts + [len(data)]):
            st.feed(data[a:b], out)
        assert [bytes(f) for f in out] == frames
        assert st.have == 0 and not st.pieces
    for split in range(1, 9):       # inside the first header and just after it
        st, out = bus.sockets._Stream(), []
        st.feed(data[:split], out)
        st.feed(data[split:], out)
        assert [bytes(f) for f in out] == frames


def test_the_stream_holds_back_at_the_high_water_mark_both_ways(tmp_path):
    """A client with *hwm* requests unanswered says False (the acceptor answers 451)
    until replies come; a shard keeps at most *hwm* frames read and not taken, so an
    acceptor's writes wait in the kernel while the shard is behind."""
    import asyncio

    pair = _StreamPair(tmp_path, hwm=4, answer=False)
    try:
        assert all(pair.client.send(_commit(n)) for n in range(4))
        assert pair.client.send(_commit(4)) is False
        pair.until(lambda: len(pair.taken) == 4)
        assert pair.client.send(_commit(5)) is False       # read, not answered
        for m in pair.taken:
            pair.server.send(next(iter(pair.server.stream.conns.values())),
                             bus.SpoolMessageCommitted(m.req, bus.STATUS_OK))
        pair.until(lambda: len(pair.replies) == 4)
        assert pair.client.send(_commit(6))
        pair.until(lambda: len(pair.taken) == 5)
        # the shard side: it stops reading once the mark's worth of frames wait (one
        # read of STREAM_READ octets at most beyond it): 100 KB frames, 2-3 a read
        st = pair.server.stream
        pair.client._unanswered = -100          # (a client that sends on regardless)
        for n in range(20):
            assert pair.client.send(_commit(100 + n, b"x" * 100_000))
        taken = 0
        rounds = 0
        while taken < 20:
            rounds += 1
            assert rounds < 100
            pair.loop.run_until_complete(asyncio.sleep(0.005))     # the client writes
            if pair.poller.wait(100)[0]:
                st.read()
                assert len(st.ready) <= 4 + 3
                taken += len(st.ready)
                st.ready.clear()
        assert rounds >= 3
    finally:
        pair.close()


def test_a_malformed_frame_on_the_stream_is_dropped_and_the_next_one_taken(tmp_path, caplog):
    pair = _StreamPair(tmp_path)
    try:
        tr = pair.client._transport
        junk = b"\xc1not msgpack"
        tr.write(bus.sockets.frame_head(len(junk)) + junk)
        summary = bus.encode(bus.SpoolMessageCommitted(1, 0))      # (a reply: unexpected)
        tr.write(bus.sockets.frame_head(len(summary)) + summary)
        pair.client._unanswered -= 2
        with caplog.at_level(logging.WARNING, "test.bus"):
            assert pair.client.send(_commit(9))
            pair.until(lambda: pair.replies)
        assert [m.req for m in pair.taken] == [9]
        assert "dropped a malformed request" in caplog.text
        assert "dropped an unexpected request: SPOOL_MESSAGE_COMMITTED" in caplog.text
    finally:
        pair.close()


def test_a_client_connects_again_soon_after_its_shard_is_back(tmp_path):
    """After its shard is restarted an acceptor answers 451 until it has connected again
    (ZeroMQ's default of 100-200 ms between attempts made that up to ~170 ms): the
    client tries every RECONNECT_IVL_MS.  Over seven restarts of the shard's socket the
    median wait is a few tens of milliseconds at most; requests unanswered on the old
    connection get no reply (the acceptor times them out), the new one starts afresh."""
    import statistics

    pair = _StreamPair(tmp_path, answer=False)
    waits = []
    try:
        # a transport closing (connection_lost still to come): not a write that raises
        pair.client._transport.close()
        assert pair.client.send(_commit(0)) is False
        pair.until(pair.client.connected)
        for n in range(7):
            assert pair.client.send(_commit(n))
            pair.until(lambda n=n: len(pair.taken) == n + 1)
            pair.server.close()
            pair.until(lambda: not pair.client.connected())
            assert pair.client.send(_commit(99)) is False
            away = time.monotonic() + 0.1
            pair.until(lambda away=away: time.monotonic() > away)       # away a while
            pair.server = bus.Server(pair.ctx, f"ipc://{tmp_path}/spool-0", 100,
                                     bus.SPOOL_REQUESTS, pair.log, stream=pair.path)
            pair.poller = bus.Poller(pair.server, pair.links)
            t = time.monotonic()
            pair.until(pair.client.connected)
            waits.append(time.monotonic() - t)
            assert pair.client._unanswered == 0
        assert statistics.median(waits) < 0.040, waits
        assert not pair.replies
    finally:
        pair.close()


def test_a_shard_closes_the_stream_of_an_acceptor_that_does_not_read_its_replies(
        tmp_path, caplog):
    """Replies a shard could not write wait for POLLOUT up to STREAM_OUT_LIMIT octets;
    beyond, the connection is closed (as ZeroMQ dropped them) and the shard goes on."""
    pair = _StreamPair(tmp_path)
    try:
        pair.client._transport.pause_reading()
        assert pair.client.send(_commit(1))
        pair.until(lambda: pair.taken)
        conn = next(iter(pair.server.stream.conns.values()))
        big = bus.SpoolMessageShowReply(1, 0, None, b"x" * 65536)
        with caplog.at_level(logging.WARNING, "test.bus"):
            deadline = time.monotonic() + 5
            while not conn.closed:
                assert time.monotonic() < deadline
                pair.server.send(conn, big)
                pair.server.send(conn, bus.SpoolMessageCommitted(2, 0))
        assert "replies unread" in caplog.text
        assert not pair.server.stream.conns
        pair.server.send(conn, bus.SpoolMessageCommitted(3, 0))     # (nowhere: no error)
        pair.client._transport.resume_reading()
        pair.until(pair.client.connected)
        pair.until(lambda: pair.server.stream.conns)      # connected again
    finally:
        pair.close()


def test_a_show_reply_says_recovering_and_one_of_the_version_before_still_decodes():
    """SpoolMessageShowReply gained ``recovering`` (the shard still reads its queue): a
    reply of a daemon of the version before (four fields) decodes as not recovering."""
    old = bus.decode(raw(8, 3, bus.STATUS_UNKNOWN, None, b""))
    assert old == bus.SpoolMessageShowReply(3, bus.STATUS_UNKNOWN, None, b"")
    assert old.recovering is False
    r = roundtrip(bus.SpoolMessageShowReply(4, bus.STATUS_STORAGE, None, b"", recovering=True))
    assert r.recovering is True and r.status == bus.STATUS_STORAGE


def test_queue_show_of_a_shard_of_the_version_before_that_reads_its_queue(tmp_path):
    """A daemon of the version before keeps `mta queue show`'s question until its queue
    is read; the command, after its 5 s, asks the shard's summary and says "recovering"
    rather than "not answering" when the summary says so."""
    import threading

    import zmq

    from mta import cli

    ctx = bus.new_context()
    endpoint = f"ipc://{tmp_path}/spool-0"
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    stop = threading.Event()

    def shard(recovering: bool):
        while not stop.is_set():
            if not sock.poll(100):
                continue
            peer, frame = sock.recv_multipart()
            msg = bus.decode(frame)
            if type(msg) is bus.SpoolQueueSummary:
                sock.send_multipart([peer, bus.encode(bus.SpoolQueueSummaryReply(
                    msg.req, {"recovering": recovering}))])
    try:
        for recovering in (True, False):
            stop.clear()
            t = threading.Thread(target=shard, args=(recovering,))
            t.start()
            try:
                assert cli._recovering(ctx, endpoint) is recovering
            finally:
                stop.set()
                t.join(5)
        assert cli._recovering(ctx, endpoint) is False      # (no answer in 1 s)
    finally:
        sock.close(0)
        ctx.term()


def test_server_takes_each_request_whole_and_drops_multipart_ones(tmp_path, caplog):
    """Server.recv: one request per call with its peer's identity; a message of several
    frames (none of ours) or an empty one is dropped whole, logged, and the next one
    read; None once nothing waits."""
    import zmq

    ctx = bus.new_context()
    log = logging.getLogger("test.bus")
    server = bus.Server(ctx, f"ipc://{tmp_path}/s", 100, bus.SPOOL_REQUESTS, log)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"acceptor-1")
    dealer.connect(f"ipc://{tmp_path}/s")
    summary = bus.encode(bus.SpoolQueueSummary(7))
    big = bus.encode(bus.SpoolMessageCommit(
        8, [bus.Envelope(QID, "s@x", ["r@y"], {}, "c", 1.0)], [b"x" * 100_000]))
    try:
        dealer.send_multipart([summary, summary, summary])
        dealer.send(b"")
        dealer.send(summary)
        dealer.send_multipart([b"", summary])
        dealer.send(big)
        deadline = time.monotonic() + 5
        got = []
        with caplog.at_level(logging.WARNING, "test.bus"):
            while len(got) < 2 and time.monotonic() < deadline:
                r = server.recv()
                if r is None:
                    time.sleep(0.01)
                else:
                    got.append(r)
            assert server.recv() is None
        assert got[0] == (b"acceptor-1", bus.SpoolQueueSummary(7))
        assert got[1][0] == b"acceptor-1" and got[1][1].req == 8
        assert got[1][1].bodies == [b"x" * 100_000]
        assert "dropped a malformed request: 3 frames" in caplog.text
        assert "dropped a malformed request: 2 frames" in caplog.text
        assert caplog.text.count("dropped a malformed") == 3      # (and the empty one)
    finally:
        dealer.close()
        server.close()
        ctx.term()
