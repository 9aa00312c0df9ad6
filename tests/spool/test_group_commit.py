"""Group commit, in process: a real Shard, real bus sockets, the real fdatasync counted.

The spool's promise (DESIGN.md): messages that arrive together are written
together and made durable by ONE fdatasync, and each is acknowledged only
after that fdatasync returned.  Checked here on every CI run (the benchmarks
measure how fast; this says it is still one sync per batch, and in order).
"""
from __future__ import annotations

import collections
import logging
import os
import time

import msgspec
import pytest

from mta import bus
from mta.config import resolve
from mta.config.schema import Config
from mta.queueid import new_qid
from mta.spool.shard import Shard

ACCEPTORS = 3
PER_REQUEST = 4


def settings_for(state_dir: str):
    cfg = msgspec.convert({
        "server": {"state_dir": state_dir, "hostname": "mta.test"},
        "smtp": {"acceptors": ACCEPTORS},
        "spool": {"shards": 1, "fsync": True, "preallocate": False},
        "delivery": {"hold": True, "processes": 1},
    }, Config)
    return resolve(cfg, None)


@pytest.fixture
def rig(tmp_path, monkeypatch):
    """A shard, ACCEPTORS DEALER sockets to it, and a log of syncs and replies in order."""
    s = settings_for(str(tmp_path))
    os.makedirs(s.run_dir, exist_ok=True)
    order: list[str] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        real_fdatasync(fd)
        order.append("fdatasync")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    ctx = bus.new_context()
    shard = Shard(s, 0)
    shard.open(ctx)
    shard.start()
    # The first segment, made now: a new segment's opening record has its own fdatasync
    # (mta.store, REC_COMMIT), once per segment, not per batch.
    shard.store._writable()
    real_send = shard.server.send

    def send(peer, msg):
        order.append(type(msg).__name__)
        real_send(peer, msg)

    shard.server.send = send
    clients = [bus.SyncClient(ctx, shard.endpoint) for _ in range(ACCEPTORS)]
    yield shard, clients, order
    for c in clients:
        c.close()
    shard.store.close()
    os.close(shard.writer_lock)
    shard.server.close()
    shard.links.close()
    if shard.pusher is not None:
        shard.pusher.close()
    ctx.term()


def commit(req: int) -> bytes:
    envelopes, bodies = [], []
    for i in range(PER_REQUEST):
        qid = new_qid(0)
        envelopes.append(bus.Envelope(qid=qid, sender="s@example.com", rcpts=["r@example.net"],
                                      params={}, client="c [127.0.0.1]", arrival=time.time(),
                                      message_id=f"<{req}.{i}@example.com>"))
        bodies.append(f"Subject: {req}.{i}\r\n\r\nbody\r\n".encode())
    return bus.encode(bus.SpoolMessageCommit(req, envelopes, bodies))


def wait_all_requests_arrived(shard, clients, timeout=10.0):
    """Until every request sits in the shard's socket (the poll sees them), without taking any."""
    deadline = time.monotonic() + timeout
    while True:
        requests, _, _ = shard.poller.wait(50)
        if requests:
            time.sleep(0.2)      # the io thread has the others too by now (same process)
            return
        assert time.monotonic() < deadline, "the requests did not arrive"


def test_requests_that_arrive_together_share_one_fdatasync_and_are_answered_after_it(rig):
    shard, clients, order = rig
    for req, c in enumerate(clients, start=1):
        c.sock.send(commit(req))
    wait_all_requests_arrived(shard, clients)
    order.clear()
    shard.step()
    # One sync for all ACCEPTORS x PER_REQUEST messages, then every answer.
    assert order == ["fdatasync"] + ["SpoolMessageCommitted"] * ACCEPTORS, order
    for req, c in enumerate(clients, start=1):
        assert c.sock.poll(5000), f"no answer to request {req}"
        reply = bus.decode(c.sock.recv())
        assert reply == bus.SpoolMessageCommitted(req, bus.STATUS_OK)
    assert len(shard.store.index) == ACCEPTORS * PER_REQUEST


def test_a_storage_error_answers_the_whole_batch_and_nothing_is_queued(rig, monkeypatch):
    shard, clients, order = rig

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    for req, c in enumerate(clients, start=1):
        c.sock.send(commit(req))
    wait_all_requests_arrived(shard, clients)
    shard.step()
    for req, c in enumerate(clients, start=1):
        assert c.sock.poll(5000)
        assert bus.decode(c.sock.recv()) == bus.SpoolMessageCommitted(req, bus.STATUS_STORAGE)
    assert len(shard.store.index) == 0 and not shard.healthy
    assert shard.last_error == "Input/output error"


@pytest.fixture(autouse=True)
def quiet_logs(caplog):
    caplog.set_level(logging.CRITICAL, "mta.spool")


def test_an_acceptors_refusal_events_are_written_and_answered_after_the_sync(rig):
    """SpoolEventsCommit: a policy_rejection (and a generation_*) is written in the batch's
    REC_EVENTS record, answered after the fdatasync; a type no acceptor makes is refused."""
    from mta import native
    from mta.obs import events as ev
    from mta.store import read_events

    shard, clients, order = rig
    refusal = {"type": "policy_rejection", "timestamp": time.time(), "recipient": "a@x.test",
               "response": {"code": 550, "enhanced": "5.7.1", "text": "suppressed"}}
    gen = {"type": "generation_failure", "timestamp": time.time(), "recipient": "b@x.test"}
    clients[0].sock.send(bus.encode(bus.SpoolEventsCommit(1, [refusal, gen])))
    clients[1].sock.send(bus.encode(bus.SpoolEventsCommit(2, [{"type": "delivery"}])))
    wait_all_requests_arrived(shard, clients)
    order.clear()
    shard.step()
    # the refused request is answered at once, the other after the sync
    assert sorted(order) == ["SpoolMessageCommitted", "SpoolMessageCommitted", "fdatasync"]
    assert order[-1] == "SpoolMessageCommitted" and order[-2] == "fdatasync"
    assert clients[0].sock.poll(5000) and clients[1].sock.poll(5000)
    assert bus.decode(clients[0].sock.recv()) == bus.SpoolMessageCommitted(1, bus.STATUS_OK)
    assert bus.decode(clients[1].sock.recv()) == \
        bus.SpoolMessageCommitted(2, bus.STATUS_UNKNOWN)
    written = []
    seg = shard.store.current
    with open(seg.path, "rb") as fh:
        data = fh.read()
    read_events(native.load("record"), data, 0, seg.size, True,
                lambda off, meta: written.extend(ev.decode(meta)), segment=seg.number)
    assert written == [refusal, gen]


def commit_one(shard, clients) -> None:
    """One request of PER_REQUEST messages from the first client, committed and answered."""
    c = clients[0]
    c.sock.send(commit(1))
    wait_all_requests_arrived(shard, clients)
    shard.step()
    assert bus.decode(c.sock.recv()) == bus.SpoolMessageCommitted(1, bus.STATUS_OK)


def test_show_of_an_unreadable_record_is_answered_and_the_shard_goes_on(rig, monkeypatch):
    """``mta queue show`` of a message whose record cannot be read (EIO, EMFILE) gets
    STATUS_STORAGE; the error used to escape the loop and stop the shard."""
    shard, clients, order = rig
    c = clients[0]
    commit_one(shard, clients)
    qid = shard.store.index.sorted_qids()[0]

    def eio(*a, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shard.store, "read_record", eio)
    c.sock.send(bus.encode(bus.SpoolMessageShow(7, qid)))
    wait_all_requests_arrived(shard, clients)
    shard.step()
    assert c.sock.poll(5000)
    assert bus.decode(c.sock.recv()) == bus.SpoolMessageShowReply(7, bus.STATUS_STORAGE, None,
                                                                   b"")
    c.sock.send(commit(2))                  # and it still takes mail
    wait_all_requests_arrived(shard, clients)
    shard.step()
    assert bus.decode(c.sock.recv()) == bus.SpoolMessageCommitted(2, bus.STATUS_OK)


def test_a_message_left_with_no_pending_recipient_and_no_job_out_is_finished(rig):
    """Every recipient became terminal while a job was out (say, an operator's bulk
    bounce), so the DONE waited for that job's outcome; its delivery process went away
    and the job was taken back.  Dispatch finds nothing to send: it used to drop the
    message from the schedule and keep it queued (copied forward by every compaction)
    until the next restart.  Now it is finished: a DONE record, gone after a restart."""
    from mta.spool import dispatch as dsp
    from mta.store import FAILED, Store
    shard, clients, order = rig
    commit_one(shard, clients)
    q = shard.q
    qid = q.sorted_qids()[0]
    others = [x for x in q.sorted_qids() if x != qid]
    q.add_out(qid, 1)                                    # a job out ...
    q.apply(qid, [[0, FAILED, 1, 0.0]])                  # ... and its recipient failed
    q.add_out(qid, -1)                                   # the job taken back (_resend)
    q.push(qid, time.time())
    shard._dispatch_lane(dsp.BULK, {})
    assert shard.finish_work == [qid]
    shard.step()
    assert qid not in q and all(x in q for x in others)
    again = Store(shard.store.dir, shard.store.segment_size, fsync=False, preallocate=False)
    again.recover()
    assert qid not in again.index and all(x in again.index for x in others)
    again.close()


def _two_domain_message(shard, clients) -> str:
    """Spool, through the shard's bus, a message to a@one.test and b@two.test; its qid."""
    qid = new_qid(0)
    env = bus.Envelope(qid=qid, sender="s@example.com", rcpts=["a@one.test", "b@two.test"],
                       params={}, client="c [127.0.0.1]", arrival=time.time(),
                       message_id="<two@example.com>")
    clients[0].sock.send(bus.encode(bus.SpoolMessageCommit(
        1, [env], [b"Subject: two\r\n\r\nbody\r\n"])))
    wait_all_requests_arrived(shard, clients)
    shard.step()
    assert bus.decode(clients[0].sock.recv()) == bus.SpoolMessageCommitted(1, bus.STATUS_OK)
    return qid


def _record(st, ups: dict, owed: dict) -> None:
    """Write, sync and publish recipient updates with the bounces they make owed."""
    new = st.write([], [], ups, None, owed)
    st.sync()
    st.commit(new, [], ups, owed)


def _owed_bounce_goes_out(shard, qid: str) -> None:
    """Turn the shard (at most 10 s) until nothing is owed: the bounce of *qid*'s
    recipient 0 is then queued to its sender, and its flag cleared."""
    q, st = shard.q, shard.store
    deadline = time.monotonic() + 10.0
    for _ in range(5000):
        if not st.owed or time.monotonic() >= deadline:
            break
        shard.step()
    assert st.owed == {} and len(q) == 2 and q.recipient(qid, 0)[3] == 0
    [bounce] = [x for x in q.sorted_qids() if x != qid]
    assert st.read_record(bounce)[0].rcpts == ["s@example.com"]


def _a_bounce_owed(qid: str) -> dict:
    """The report of recipient 0's bounce owed (RcptMeta.owed), as Plan._hold makes it."""
    return {qid: [[0, "5.1.1", "mx.one.test", "550 5.1.1 no such user", time.time()]]}


def test_a_bounce_owed_goes_out_when_the_last_job_is_taken_back(rig):
    """Recipient 0 of a message to two domains failed while the other domain's job
    was out: its bounce is owed (held).  That job is then taken back (its delivery
    process went away) and the message is not sent again now (delivery held here; a
    suspension, an absent process or a full domain do the same): the bounce goes in
    the next batch, not whenever the message is next tried, and the flag is cleared
    with it -- after a restart nothing is owed and the DSN is queued."""
    from mta.spool import dispatch as dsp
    from mta.store import FAILED, RCPT_BOUNCE_OWED, Store
    shard, clients, order = rig
    qid = _two_domain_message(shard, clients)
    q, st = shard.q, shard.store
    q.add_out(qid, 1)                                    # b's job, out
    shard.window.add(99, qid, [1], 0, "two.test", dsp.BULK)
    ups = {qid: [[0, FAILED, 1, 0.0, RCPT_BOUNCE_OWED]]}  # a failed: held (Plan._hold)
    owed = _a_bounce_owed(qid)
    _record(st, ups, owed)
    assert set(st.owed) == {qid}
    shard.step()                                         # nothing to do: still held
    assert len(q) == 1 and set(st.owed) == {qid}
    shard._resend([99])                                  # (Shard.follow_links)
    shard.step()
    assert st.owed == {} and q.recipient(qid, 0)[3] == 0
    [bounce] = [x for x in q.sorted_qids() if x != qid]
    m, dsn = st.read_record(bounce)
    assert m.sender == "" and m.rcpts == ["s@example.com"]
    assert b"Final-Recipient: rfc822; a@one.test" in dsn and b"b@two.test" not in dsn
    assert b"550 5.1.1 no such user" in dsn
    again = Store(st.dir, st.segment_size, fsync=False, preallocate=False)
    again.recover()
    assert again.owed == {} and bounce in again.index and qid in again.index
    again.close()


def test_a_finished_message_whose_owed_bounce_cannot_be_read_is_not_finished(rig):
    """A message found at dispatch with no recipient pending (Shard.finish_work) owes a
    bounce, but its record cannot be read now (an I/O error): its DONE was written all
    the same and the bounce owed went with it.  It stays queued with its bounce owed,
    and once it can be read the bounce and the DONE go together."""
    from mta.store import DELIVERED, FAILED, RCPT_BOUNCE_OWED
    shard, clients, order = rig
    qid = _two_domain_message(shard, clients)
    q, st = shard.q, shard.store
    ups = {qid: [[0, FAILED, 1, 0.0, RCPT_BOUNCE_OWED], [1, DELIVERED, 1, 0.0]]}
    owed = _a_bounce_owed(qid)
    _record(st, ups, owed)
    read_meta = st.read_meta

    def unreadable(x):
        if x == qid:
            raise OSError(5, "Input/output error")
        return read_meta(x)

    st.read_meta = unreadable
    shard.finish_work.append(qid)         # (its end found at dispatch)
    shard.step()
    assert qid in q.sorted_qids() and set(st.owed) == {qid}
    assert q.sorted_qids() == [qid]       # (no bounce could be made)
    st.read_meta = read_meta
    shard.finish_work.append(qid)         # (found at dispatch again, later)
    shard.step()
    [bounce] = q.sorted_qids()
    assert bounce != qid and st.owed == {}
    m, dsn = st.read_record(bounce)
    assert m.rcpts == ["s@example.com"] and b"550 5.1.1 no such user" in dsn


def test_a_bounce_owed_during_a_storage_failure_does_not_spin_the_shard(rig):
    """A bounce owed whose batch cannot be written (disk full) was looked at again in
    the very next turn, which never waited: the shard retried the write in a busy loop
    for as long as the storage failed.  It is looked at again a moment later, as the
    messages of a batch not written are, and goes out once writes succeed."""
    from mta.store import FAILED, RCPT_BOUNCE_OWED
    shard, clients, order = rig
    qid = _two_domain_message(shard, clients)
    st = shard.store
    # (b pending, its job taken back: delivery is held here)
    ups = {qid: [[0, FAILED, 1, 0.0, RCPT_BOUNCE_OWED]]}
    owed = _a_bounce_owed(qid)
    _record(st, ups, owed)
    write = st.write
    writes = []

    def full(*a, **k):
        writes.append(1)
        raise OSError(28, "No space left on device")

    st.write = full
    shard.settle_work.append(qid)
    deadline = time.monotonic() + 0.5
    for _ in range(5000):
        if time.monotonic() >= deadline:
            break
        shard.step()
    assert 1 <= len(writes) <= 3
    st.write = write
    _owed_bounce_goes_out(shard, qid)


def test_delay_notice_looks_during_a_storage_failure_do_not_spin_the_shard(rig):
    """The messages the sweep found past delay_warning_time are looked at a batch's
    worth at a time; while the spool could not write (disk full), each turn took the
    next ones without waiting, built their notices (reading each message) and failed
    again, back to back: a busy loop as long as the backlog lasted, renewed every
    second.  They wait until writes succeed, then their notices go out."""
    shard, clients, order = rig
    for req, c in enumerate(clients, start=1):
        c.sock.send(commit(req))
    wait_all_requests_arrived(shard, clients)
    shard.step()
    for c in clients:
        assert c.sock.poll(5000)
        c.sock.recv()
    q, st = shard.q, shard.store
    qids = q.sorted_qids()
    assert len(qids) == ACCEPTORS * PER_REQUEST
    shard.policy.delay_warning = 0.001
    shard.cfg = msgspec.structs.replace(shard.cfg, max_batch_messages=1)
    shard.notice_work = collections.deque(qids)                 # (as the sweep finds them)
    write = st.write
    writes = []

    def full(*a, **k):
        writes.append(1)
        raise OSError(28, "No space left on device")

    st.write = full
    deadline = time.monotonic() + 0.5
    for _ in range(5000):
        if time.monotonic() >= deadline:
            break
        shard.step()
    assert 1 <= len(writes) <= 3, len(writes)
    st.write = write
    deadline = time.monotonic() + 10.0
    while len(q) < 2 * len(qids) - len(writes) and time.monotonic() < deadline:
        shard.step()
    notices = [st.read_record(x) for x in q.sorted_qids() if x not in qids]
    assert all(b"Action: delayed" in body for _, body in notices)
    noticed = {m.client.rpartition(" ")[2] for m, _ in notices}
    assert len(noticed) == len(notices) == len(qids) - len(writes)
    # (those of the batches not written: looked at again, at the sweep's next bucket)
    again = set(q.passed(time.time() + 2.0 + q.width))
    assert set(qids) - noticed <= again


def test_a_bounce_owed_whose_last_outcome_was_not_written_goes_out_all_the_same(rig):
    """The last job out of a message that owes a bounce comes back in a batch that
    cannot be written (disk full): the message is tried again later -- but delivery is
    held here (or its domain suspended), so it is not, and the bounce stayed owed until
    it was.  It is looked at once writes succeed, as for a job taken back."""
    from mta.spool import dispatch as dsp
    from mta.store import FAILED, RCPT_BOUNCE_OWED
    shard, clients, order = rig
    qid = _two_domain_message(shard, clients)
    q, st = shard.q, shard.store
    q.add_out(qid, 1)                                    # b's job, out
    shard.window.add(99, qid, [1], 0, "two.test", dsp.BULK)
    ups = {qid: [[0, FAILED, 1, 0.0, RCPT_BOUNCE_OWED]]}
    owed = _a_bounce_owed(qid)
    _record(st, ups, owed)
    outcomes = [bus.DeliveryOutcome(99, qid, [bus.Result(1, bus.DEFERRED, 451, "4.3.0",
                                                         "try later", "mx.two.test",
                                                         "127.0.0.2")])]
    shard.links.recv = lambda d: outcomes.pop() if outcomes else None
    write = st.write

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    st.write = full
    shard.batch(outcomes=[0])
    assert not outcomes and set(st.owed) == {qid} and q.info(qid)[9] == 0
    st.write = write
    _owed_bounce_goes_out(shard, qid)
