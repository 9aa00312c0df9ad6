"""What a spool shard sends to delivery, and when (mta/spool/dispatch.py, Shard.dispatch).

A real Shard over a real store in tmp_path; the delivery links are a list that
records every job (which process, what job), so each test reads exactly what
went out: transactional before bulk, each lane's window, the per-domain cap on
bulk, a busy domain spread over processes, REQUEUED outcomes.  No daemon, no
sockets, no timing.
"""
from __future__ import annotations

import collections
import os
import time

import msgspec

from mta import bus
from mta import controls as ctl
from mta.obs import events as ev
from mta.config import resolve
from mta.config.schema import Config
from mta.queueid import domain_shard, new_qid
from mta.spool import dispatch as dsp
from mta.spool import schedule as sch
from mta.spool import shard as shard_mod
from mta.spool.shard import Shard
from mta.store import MessageMeta

BODY = b"Subject: s\r\n\r\nbody\r\n"


class Links:
    """DeliveryLinks stand-in: records what is sent; outcomes queued per process."""

    def __init__(self, n: int):
        self.up = [True] * n
        self.sent: list[tuple[int, bus.DeliveryMessageReady]] = []
        self.outcomes: list[list] = [[] for _ in range(n)]

    def __len__(self):
        return len(self.up)

    def send_jobs(self, d, jobs):
        self.sent.extend((d, job) for job in jobs)
        return len(jobs)

    def send(self, d, msg):
        self.sent.append((d, msg))
        return True

    def recv(self, d):
        return self.outcomes[d].pop(0) if self.outcomes[d] else None


class Server:
    def recv(self):
        return None

    def send(self, peer, msg):
        pass


def make_shard(tmp_path, processes=1, **delivery) -> Shard:
    cfg = msgspec.convert({
        "server": {"state_dir": str(tmp_path), "hostname": "mta.test"},
        "spool": {"shards": 1, "fsync": False, "preallocate": False},
        "delivery": {"hold": False, "processes": processes, **delivery},
    }, Config)
    shard = Shard(resolve(cfg, None), 0)
    shard.store.recover()
    shard.server = Server()
    shard.links = Links(processes)
    shard.parked = [shard.new_fifo() for _ in range(processes)]
    return shard


def queue(shard, rcpts, transactional=False, pool=None, start_at=None) -> str:
    """Spool one message (written and committed like a batch) and make it due."""
    params = {"message_id": "<m@example.com>"}
    if transactional:
        params["transactional"] = True
    if pool:
        params["ip_pool"] = pool
    if start_at is not None:
        params["start_at"] = start_at
    qid = new_qid(0)
    meta = MessageMeta(qid, "s@example.com", list(rcpts), time.time(), params, "c")
    new = shard.store.write([(meta, BODY)], [])
    shard.store.commit(new, [])
    shard._after_commit(new, shard.plan())
    return qid


def sent(shard):
    out = list(shard.links.sent)
    shard.links.sent.clear()
    return out


def test_transactional_messages_go_first_with_their_priority_and_pool(tmp_path):
    shard = make_shard(tmp_path)
    bulk = [queue(shard, [f"b{i}@site.example"], pool="mkt") for i in range(3)]
    tx = [queue(shard, [f"t{i}@site.example"], transactional=True) for i in range(2)]
    shard.dispatch()
    jobs = [j for _, j in sent(shard)]
    assert [j.qid for j in jobs] == tx + bulk
    assert [j.priority for j in jobs] == [bus.PRIORITY_TRANSACTIONAL] * 2 + [bus.PRIORITY_BULK] * 3
    assert [j.pool for j in jobs] == ["default"] * 2 + ["mkt"] * 3
    assert jobs[0].rcpts == [bus.JobRecipient(0, "t0@site.example")] and jobs[0].body == BODY


def test_jobs_a_full_delivery_queue_refused_are_taken_back_and_sent_later(tmp_path):
    """A dispatch pass's jobs go to each process together; those its queue did not take
    are no longer out (window, the message's count) and their messages are due again
    shortly, as if never made."""
    from mta.spool import shard as shard_mod
    shard = make_shard(tmp_path)
    qids = [queue(shard, [f"r{i}@a.example"]) for i in range(5)]
    two = queue(shard, ["x@a.example", "y@b.example"])      # two jobs, two domains
    calls = []

    def take_three(d, jobs):
        calls.append(len(jobs))
        shard.links.sent.extend((d, j) for j in jobs[:3])
        return 3

    shard.links.send_jobs = take_three
    before = time.time()
    shard.dispatch()
    assert calls == [7]                                      # one pass, one call
    assert [j.qid for _, j in sent(shard)] == qids[:3]
    assert len(shard.window) == 3 and shard.window.room(dsp.BULK) == shard.window.max_in_flight - 3
    idx = shard.store.index
    for qid in qids[3:] + [two]:
        assert idx.info(qid)[shard_mod._OUT] == 0            # nothing of it is out
        due = idx.scheduled(qid)
        assert due is not None and before + shard_mod.BUSY_RETRY <= due
    for qid in qids[:3]:
        assert idx.info(qid)[shard_mod._OUT] == 1
    # the queue has room again: they go, each job once
    del shard.links.send_jobs
    shard.dispatch()
    assert sent(shard) == []                                 # not before their retry
    for qid in qids[3:] + [two]:
        idx.push(qid, time.time() - 1)                       # (their retry time has come)
    shard.dispatch()
    got = sent(shard)
    assert sorted((j.qid, j.domain) for _, j in got) == sorted(
        [(q, "a.example") for q in qids[3:]] + [(two, "a.example"), (two, "b.example")])
    assert len(shard.window) == 7


def test_a_message_with_one_job_taken_and_one_refused_sends_it_again_beside_the_one_out(
        tmp_path):
    """Two domains, two jobs, two processes; one process's queue is full: the other job
    is out, the message counts one job out, and the refused recipient goes again when
    due -- beside the job out, not after its outcome (it waited for that outcome, up
    to the data timeout at a slow site) -- and nothing is sent twice, nothing left
    behind."""
    from mta.spool import shard as shard_mod
    shard = make_shard(tmp_path, processes=2)
    from mta.queueid import domain_shard
    a, b = "a.example", "b.example"
    n = 0
    while domain_shard(b, 2) == domain_shard(a, 2):          # two domains, two homes
        n += 1
        b = f"b{n}.example"
    qid = queue(shard, [f"x@{a}", f"y@{b}"])
    full = domain_shard(b, 2)

    def refuse_one(d, jobs):
        if d == full:
            return 0
        shard.links.sent.extend((d, j) for j in jobs)
        return len(jobs)

    shard.links.send_jobs = refuse_one
    shard.dispatch()
    got = sent(shard)
    assert [(j.qid, j.domain) for _, j in got] == [(qid, a)]
    idx = shard.store.index
    assert idx.info(qid)[shard_mod._OUT] == 1 and len(shard.window) == 1
    del shard.links.send_jobs
    idx.push(qid, time.time() - 1)
    shard.dispatch()
    # the refused recipient goes now, and only it (x@a is out: it waits for its outcome)
    got = sent(shard)
    assert [(j.qid, j.domain, [r.index for r in j.rcpts]) for _, j in got] == [(qid, b, [1])]
    assert idx.info(qid)[shard_mod._OUT] == 2 and len(shard.window) == 2
    idx.push(qid, time.time() - 1)
    shard.dispatch()
    assert sent(shard) == []                  # both out: nothing sent twice
    # the outcome of the first job: nothing else to send; of the second: the message done
    for d, dom in ((domain_shard(a, 2), a), (full, b)):
        req, job = next((r, j) for r, j in shard.jobs.items() if j.domain == dom)
        shard.links.outcomes[d].append(bus.DeliveryOutcome(req, qid, [bus.Result(
            job.idxs[0], bus.DELIVERED, 250, "2.0.0", "ok", "mx", "127.0.0.1")]))
        shard.batch()
        for _ in range(3):
            shard.dispatch()
        assert sent(shard) == [], dom
    assert idx.info(qid) is None and len(shard.window) == 0 and not shard.window.qid_out


def test_an_outcome_uses_the_envelope_its_dispatch_read(tmp_path):
    """The envelope read to make a job comes back with its outcome's bookkeeping: the
    outcome is recorded without reading the record again; an outcome the window does not
    know reads it, as before."""
    shard = make_shard(tmp_path)
    done_qid = queue(shard, ["a@x.example"])
    deferred_qid = queue(shard, ["b@x.example"])
    shard.dispatch()
    jobs = {j.qid: (r, j) for r, j in shard.jobs.items()}
    assert set(jobs) == {done_qid, deferred_qid}
    reads = []
    real = shard.store.read_meta

    def counting(qid):
        reads.append(qid)
        return real(qid)

    shard.store.read_meta = counting
    ok = bus.Result(0, bus.DELIVERED, 250, "2.0.0", "ok", "mx", "127.0.0.1")
    later = bus.Result(0, bus.DEFERRED, 451, "4.3.0", "later", "mx", "127.0.0.1")
    shard.links.outcomes[0] += [bus.DeliveryOutcome(jobs[done_qid][0], done_qid, [ok]),
                                bus.DeliveryOutcome(jobs[deferred_qid][0], deferred_qid,
                                                    [later])]
    shard.batch()
    assert reads == []
    idx = shard.store.index
    assert idx.info(done_qid) is None                         # delivered: gone
    assert idx.recipient(deferred_qid, 0)[1] == 1              # one attempt, deferred
    # an outcome of a job the window does not know (the same one again): read
    shard.links.outcomes[0].append(bus.DeliveryOutcome(jobs[deferred_qid][0], deferred_qid,
                                                       [later]))
    shard.batch()
    assert reads == [deferred_qid]


def test_each_lane_has_its_own_window(tmp_path):
    shard = make_shard(tmp_path, max_in_flight=2)
    bulk = [queue(shard, [f"b{i}@a.example"]) for i in range(3)]
    tx = [queue(shard, [f"t{i}@a.example"], transactional=True) for i in range(3)]
    shard.dispatch()
    # The transactional lane's window is full and so is the bulk one's: neither
    # starved the other.
    assert [j.qid for _, j in sent(shard)] == tx[:2] + bulk[:2]
    assert shard.open_lanes() == []
    # A transactional job comes back: only the transactional lane opens.
    req = next(r for r, j in shard.jobs.items() if j.qid == tx[0])
    shard.returned(req, tx[0])
    assert shard.open_lanes() == [dsp.TRANSACTIONAL]
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [tx[2]]


def test_the_window_counts_jobs_not_messages(tmp_path):
    """max_in_flight bounds the jobs out -- what a crash may deliver twice -- also when a
    message makes one job per recipient domain: a message whose jobs do not fit waits,
    due and first in line, until enough come back; none is lost or sent twice."""
    shard = make_shard(tmp_path, max_in_flight=4)
    qids = [queue(shard, [f"a{i}@one.example", f"b{i}@two.example", f"c{i}@three.example"])
            for i in range(3)]
    single = queue(shard, ["z@four.example"])
    shard.dispatch()
    # 3 jobs fit in 4; the second message's 3 do not (nor does the one behind it jump
    # the line): 3 out, not 6 or 9.
    assert sorted((j.qid, j.domain) for _, j in sent(shard)) == \
        sorted((qids[0], d) for d in ("one.example", "two.example", "three.example"))
    assert shard.window.out[dsp.BULK] == 3
    assert shard.store.index.next_due() is not None         # the rest still due...
    assert shard.open_lanes() == [dsp.TRANSACTIONAL]         # ...but no wake-up for them
    done = [r for r, j in shard.jobs.items() if j.qid == qids[0]]
    shard.returned(done[0], qids[0])                         # 2 out: room for 2 only
    assert shard.open_lanes() == [dsp.TRANSACTIONAL]
    shard.dispatch()
    assert sent(shard) == [] and shard.window.out[dsp.BULK] == 2
    for r in done[1:]:
        shard.returned(r, qids[0])                           # nothing out: room for 4
    assert dsp.BULK in shard.open_lanes()
    shard.dispatch()
    assert {j.qid for _, j in sent(shard)} == {qids[1]} and shard.window.out[dsp.BULK] == 3
    for r in [r for r, j in shard.jobs.items() if j.qid == qids[1]]:
        shard.returned(r, qids[1])
    shard.dispatch()
    got = [j.qid for _, j in sent(shard)]
    assert sorted(got) == sorted([qids[2]] * 3 + [single]) and shard.window.out[dsp.BULK] == 4


def test_a_message_of_more_domains_than_the_window_goes_alone(tmp_path):
    shard = make_shard(tmp_path, max_in_flight=2)
    wide = queue(shard, [f"r@d{i}.example" for i in range(3)])
    after = queue(shard, ["r@e.example"])
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [wide] * 3      # nothing was out: it goes
    for r in list(shard.jobs):
        shard.returned(r, wide)
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [after]


def test_bulk_is_capped_per_domain_and_waits_without_spinning(tmp_path):
    shard = make_shard(tmp_path, max_in_flight_per_domain=2)
    slow = [queue(shard, [f"r{i}@slow.example"]) for i in range(5)]
    other = queue(shard, ["r@other.example"])
    tx = [queue(shard, [f"t{i}@slow.example"], transactional=True) for i in range(3)]
    shard.dispatch()
    got = [j.qid for _, j in sent(shard)]
    # Transactional jobs are not capped per domain; bulk to slow.example is, and
    # the message behind the cap (to another domain) is not held up by it.
    assert got == tx + slow[:2] + [other]
    assert shard.window.blocked_count() == 3
    # The blocked messages left the due queue: nothing due wakes the loop.
    assert shard.store.index.next_due() is None
    shard.dispatch()
    assert sent(shard) == []
    # One slow.example job comes back: exactly one more goes, the oldest waiting.
    req = next(r for r, j in shard.jobs.items() if j.qid == slow[0])
    shard.returned(req, slow[0])
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [slow[2]]
    assert shard.window.blocked_count() == 2


def test_a_multi_domain_message_sends_the_groups_under_the_cap(tmp_path):
    shard = make_shard(tmp_path, max_in_flight_per_domain=1)
    first = queue(shard, ["a@slow.example"])
    both = queue(shard, ["b@slow.example", "c@fast.example"])
    shard.dispatch()
    jobs = [j for _, j in sent(shard)]
    assert [(j.qid, j.domain) for j in jobs] == [(first, "slow.example"), (both, "fast.example")]
    assert {d: list(f) for d, f in shard.window.blocked.items()} == {"slow.example": [both]}


def test_a_busy_domain_spreads_over_processes_past_the_threshold(tmp_path):
    shard = make_shard(tmp_path, processes=3, spread_threshold=2)
    home = domain_shard("busy.example", 3)
    qids = [queue(shard, [f"r{i}@busy.example"]) for i in range(7)]
    quiet = queue(shard, ["r@quiet.example"])
    shard.dispatch()
    procs = {j.qid: d for d, j in sent(shard)}
    assert [procs[q] for q in qids[:2]] == [home, home]
    counts = [sum(1 for q in qids if procs[q] == d) for d in range(3)]
    assert sorted(counts) == [2, 2, 3] and counts[home] == 3
    # A quiet domain stays at its home process.
    assert procs[quiet] == domain_shard("quiet.example", 3)
    # The reaper knows where each job went: delivery[home] dies -> exactly its jobs again.
    lost = shard.window.of_process(home)
    assert sorted(shard.jobs[r].qid for r in lost) == sorted(
        q for q in qids + [quiet] if procs[q] == home)


def test_spreading_skips_a_process_that_is_down(tmp_path):
    w = dsp.Window(processes=3, max_in_flight=100, per_domain=100, spread_threshold=1)
    w.add(1, "Q1", [0], 0, "d.example", dsp.BULK)
    assert w.target("d.example", 0, [True, False, True]) == 2
    assert w.target("d.example", 0, [True, True, True]) == 1
    # Home down: the caller parks the job for it (target says home).
    assert w.target("d.example", 0, [False, True, True]) == 0
    w.remove(1)
    assert w.at == {} and w.out == [0, 0] and w.bulk_out == {}


def requeue_outcome(shard, job, retry_after, source="ip-1"):
    """*source*: the one delivery picked ("": none of the pool's may send, as delivery
    says when every source of the pool is suspended for the site)."""
    return bus.DeliveryOutcome(req=job.req, qid=job.qid, results=[
        bus.Result(r.index, bus.REQUEUED, 0, "", "source suspended", "", "")
        for r in job.rcpts], source=source, retry_after=retry_after)


def test_requeued_recipients_wait_retry_after_without_an_attempt(tmp_path):
    shard = make_shard(tmp_path, retry_jitter=0.0)     # (the spread: a test of its own)
    qid = queue(shard, ["a@x.example", "b@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(requeue_outcome(shard, job, 30.0))
    before = time.time()
    shard.batch(outcomes=[d])
    q = shard.store.index
    state, attempts, due, _ = q.progress(qid)
    assert state == [sch.PENDING, sch.PENDING] and attempts == [0, 0]
    assert all(before + 30.0 <= t <= time.time() + 30.0 for t in due)
    assert q.info(qid)[9] == 0 and not shard.jobs          # (jobs out)
    assert shard.requeued == 2
    # Not due now: nothing goes out; due at retry_after.
    shard.dispatch()
    assert sent(shard) == []
    assert before + 30.0 <= q.next_due() <= time.time() + 30.0
    # The next attempt is still the first one.  (As if the wait had passed: the
    # domain's pause with it.)
    for i in range(2):
        q.set_due(qid, i, time.time())
    q.push(qid, time.time())
    shard.window.unpause()
    shard.dispatch()
    [(_, job)] = sent(shard)
    assert job.attempt == 1


def test_a_recipient_handed_back_again_and_again_gets_its_delay_notice(tmp_path):
    # Never deferred (delivery REQUEUEs it: a rate limit, a suspended source), so no
    # deferral ever sends its delay notice: the expiry sweep finds its message past
    # delay_warning_time and the next batch queues the notice to the sender, the flag
    # written with it; once.
    from mta.store import RCPT_DELAY_NOTIFIED
    shard = make_shard(tmp_path, delay_warning_time=30.0, max_age=3600.0)
    qid = queued_at(shard, time.time() - 40.0, ["a@x.example"])
    q = shard.store.index
    for _ in range(3):
        shard.dispatch()
        [(d, job)] = sent(shard)
        shard.links.outcomes[d].append(requeue_outcome(shard, job, 30.0))
        shard.batch(outcomes=[d])
        q.set_due(qid, 0, time.time())      # (as if the wait had passed)
        q.push(qid, time.time())
        shard.window.unpause()
    assert len(q) == 1
    shard.expire_waiting()
    assert list(shard.notice_work) == [qid]
    shard.batch()
    assert list(shard.notice_work) == []
    [notice] = [x for x in q.sorted_qids() if x != qid]
    meta, body = shard.store.read_record(notice)
    assert meta.sender == "" and meta.rcpts == ["s@example.com"]
    assert b"Action: delayed" in body and b"Final-Recipient: rfc822; a@x.example" in body
    assert q.recipient(qid, 0)[:2] == (sch.PENDING, 0)       # no attempt counted
    assert q.recipient(qid, 0)[3] & RCPT_DELAY_NOTIFIED
    # once: looked at again (filed then), nothing more goes
    q.set_deadline(qid, time.time() - 10.0)
    shard.expire_waiting()
    shard.batch()
    assert len(q) == 2


def test_a_batch_that_could_not_be_written_keeps_its_messages_delay_notice_look(tmp_path):
    # A write error leaves a batch's outcomes unrecorded and their messages filed again
    # for the expiry sweep: at their delay notice's time still, not only at the deadline
    # (then a recipient never deferred again would get no notice by time in queue).
    shard = make_shard(tmp_path, delay_warning_time=30.0, max_age=3600.0)
    qid = queue(shard, ["a@x.example"])
    start = shard.store.index.info(qid)[5]
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job.req, qid=qid, results=[
        bus.Result(0, bus.DEFERRED, 451, "4.3.0", "later", "mx.x.example", "127.0.0.2")]))

    def failing(*args, **kw):
        raise OSError(5, "Input/output error")

    shard.store.write = failing
    shard.batch(outcomes=[d])
    assert not shard.healthy
    assert qid in shard.store.index.passed(start + 30.0 + 3.6 + 0.1)


def test_requeued_floor_and_age(tmp_path):
    shard = make_shard(tmp_path, max_age=60.0)
    qid = queue(shard, ["a@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(requeue_outcome(shard, job, 0.0))
    t0 = time.time()
    shard.batch(outcomes=[d])
    q = shard.store.index
    assert q.progress(qid)[2][0] >= t0 + 1.0     # the floor
    # Requeued longer than the age left: kept (the deadline expires it), not expired now.
    q.set_due(qid, 0, time.time())
    q.push(qid, time.time())
    shard.window.unpause()          # (as if the floor had passed)
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(requeue_outcome(shard, job, 3000.0))
    shard.batch(outcomes=[d])
    assert shard.store.index.progress(qid)[0] == [sch.PENDING]


def test_a_requeued_domain_waits_as_a_whole_instead_of_cycling_its_backlog(tmp_path):
    # A site suspended by a response rule (Yahoo's TSS04: an hour) answers REQUEUED to
    # every job of the pool for it.  Each one that came back freed a slot of the domain's
    # cap, so the next message behind it was read from disk and sent, body and all,
    # only to come back REQUEUED too: the domain's whole backlog went through delivery
    # once per suspension.  The answer holds for every message of that domain and pool
    # until the wait ends: they wait in the spool, requeued as delivery would have.
    shard = make_shard(tmp_path, max_in_flight_per_domain=3, retry_jitter=0.0)
    other_pool = queue(shard, ["p@x.example"], pool="mkt")
    qids = [queue(shard, [f"r{i}@x.example"]) for i in range(6)]
    other_domain = queue(shard, ["o@y.example"])
    shard.dispatch()
    jobs = sent(shard)
    assert sorted(j.qid for _, j in jobs) == sorted([other_pool] + qids[:2] + [other_domain])
    t0 = time.time()
    for d, j in jobs:
        if j.qid in qids:
            shard.links.outcomes[d].append(requeue_outcome(shard, j, 3000.0, source=""))
    shard.batch(outcomes=[0])
    shard.dispatch()
    assert sent(shard) == []                 # nothing more of x.example in pool default
    shard.release_blocked(everything=True)
    shard.dispatch()
    assert sent(shard) == []
    q = shard.store.index
    for qid in qids:
        state, attempts, due, _ = q.progress(qid)
        assert state == [sch.PENDING] and attempts == [0], qid       # no attempt
        assert t0 + 3000.0 <= due[0] <= time.time() + 3000.0, qid
    # the suspension is cancelled (mta rules cancel): they are due at once, and go
    shard.query(b"cli", bus.SpoolQueueFlush(1, True))
    shard.dispatch()
    assert len(sent(shard)) == 2                 # (the domain's cap: mkt's job is out)


def test_a_release_makes_due_only_what_the_lanes_named_handed_back(tmp_path):
    # A throttle of (ip-1, site A) is cancelled: what that lane handed back is due at
    # once; what another lane (ip-1 to site B) handed back keeps its wait, and so does a
    # deferral of a message once handed back there (not what the lane handed back now),
    # and another recipient of the same message at a domain of another lane.
    shard = make_shard(tmp_path, retry_jitter=0.0)
    qa = [queue(shard, [f"a{i}@x.example", f"b{i}@y.example"]) for i in range(3)]
    qb = queue(shard, ["c@y.example"])
    shard.dispatch()
    jobs = sent(shard)
    assert len(jobs) == 7
    tried = None
    for d, j in jobs:
        site = "site-a" if j.domain == "x.example" else "site-b"
        out = requeue_outcome(shard, j, 3000.0)
        shard.links.outcomes[d].append(bus.DeliveryOutcome(
            req=out.req, qid=out.qid, results=out.results, source="ip-1", site=site,
            retry_after=3000.0))
    shard.batch(outcomes=[0])
    q = shard.store.index
    # qa[0]'s x.example job comes again (a flush of it) and is deferred this time
    q.flush(time.time(), [qa[0]], ["x.example"])
    shard.dispatch()
    [(d, j)] = sent(shard)
    shard.links.outcomes[d].append(bus.DeliveryOutcome(
        req=j.req, qid=j.qid, results=[bus.Result(0, bus.DEFERRED, 451, "4.7.1", "later",
                                                  "h", "127.0.0.1")],
        source="ip-1", site="site-a"))
    shard.batch(outcomes=[0])
    tried = q.progress(qa[0])[2][0]
    assert tried > time.time() + 10
    t0 = time.time()
    replies = []
    shard.server.send = lambda peer, msg: replies.append(msg)
    shard.query(b"cli", bus.SpoolQueueFlush(1, True, lanes=[("site-a", "*"), ("site-a", "")]))
    assert replies == [bus.SpoolQueueFlushReply(1, 2)]
    for qid in qa:
        state, attempts, due, _ = q.progress(qid)
        if qid != qa[0]:
            assert due[0] <= time.time(), qid           # x.example: due now
        assert due[1] >= t0 + 3000.0 - 1, qid           # y.example: still waiting
    assert q.progress(qa[0])[2][0] == tried             # the deferral keeps its time
    assert q.progress(qb)[2][0] >= t0 + 3000.0 - 1
    shard.dispatch()
    assert sorted((j.qid, j.domain) for _, j in sent(shard)) == \
        sorted((qid, "x.example") for qid in qa[1:])
    assert {k[:2] for k in shard.handed_back.lanes} == {("site-b", "ip-1")}
    assert len(shard.handed_back) == 4


def test_messages_held_by_a_domains_pause_are_due_again_spread_not_all_at_its_end(tmp_path):
    # A pause (delivery REQUEUED a job naming no source) holds every message of the
    # domain and pool until it ends; they were all made due at its very end, so a
    # suspended site's backlog came due in the same second, in lockstep at every
    # repeat.  Each is due at the end plus up to retry_jitter of its wait, never before.
    shard = make_shard(tmp_path, retry_jitter=0.1)
    first = queue(shard, ["r@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(requeue_outcome(shard, job, 600.0, source=""))
    shard.batch(outcomes=[0])
    until = shard.window.paused[("x.example", "default")]
    t0 = time.time()
    qids = [queue(shard, [f"r{i}@x.example", f"s{i}@x.example"]) for i in range(100)]
    shard.dispatch()
    assert sent(shard) == []
    q = shard.store.index
    dues = []
    for qid in qids:
        _, attempts, due, _ = q.progress(qid)
        assert attempts == [0, 0] and due[0] == due[1], qid     # (one job again)
        assert until <= due[0] <= until + 0.1 * (until - t0) + 0.01, qid
        dues.append(due[0])
    assert len({round(x) for x in dues}) >= 20
    assert until <= q.progress(first)[2][0] <= until + 60.0       # (the job's own)


def test_a_requeue_for_one_sources_warmup_cap_holds_back_that_job_alone(tmp_path):
    # warmup overflow = "wait": a warming source at its cap requeues the job it was
    # picked for until the hour or day rolls over (the answer names that source); the
    # pool's other sources take the domain's next mail meanwhile.  The whole domain and
    # pool waited with it -- up to an hour -- though only that source was at its cap.
    shard = make_shard(tmp_path, max_in_flight_per_domain=3)
    qids = [queue(shard, [f"r{i}@x.example"]) for i in range(4)]
    shard.dispatch()
    jobs = sent(shard)
    assert sorted(j.qid for _, j in jobs) == sorted(qids[:3])
    d, first = jobs[0]
    shard.links.outcomes[d].append(requeue_outcome(shard, first, 3000.0, source="new"))
    shard.batch(outcomes=[0])
    shard.release_blocked(everything=True)
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [qids[3]]     # the next one goes
    q = shard.store.index
    state, attempts, due, _ = q.progress(first.qid)
    assert state == [sch.PENDING] and attempts == [0] and due[0] >= time.time() + 2900


def test_a_scheduled_message_is_due_at_its_start_and_ages_from_it(tmp_path):
    shard = make_shard(tmp_path, max_age=60.0)
    start = time.time() + 3600.0
    qid = queue(shard, ["a@x.example"], start_at=start)
    assert shard.store.index.progress(qid)[2] == [start]
    shard.dispatch()
    assert sent(shard) == []
    assert shard.store.index.next_due() == start
    # Older than max_age since arrival, but not since its start: not expired.
    assert not shard.policy.expired(start, time.time())
    shard.expire_waiting()
    assert shard.expire_work == []
    # Recovery reads the start again from the record.
    shard.store.close()
    os.close(shard.writer_lock)      # (what the process's end would release)
    again = make_shard(tmp_path, max_age=60.0)
    assert again.store.index.progress(qid)[2] == [start]


def queued_at(shard: Shard, arrival: float, rcpts: list[str]) -> str:
    """Queue one message that arrived at *arrival* (its deadline: arrival + max_age);
    its queue id."""
    qid = new_qid(0)
    meta = MessageMeta(qid, "s@example.com", rcpts, arrival,
                       {"message_id": "<m@example.com>"}, "c")
    new = shard.store.write([(meta, BODY)], [])
    shard.store.commit(new, [])
    shard._after_commit(new, shard.plan())
    return qid


def test_a_recipient_due_at_the_deadline_gets_its_last_attempt_though_it_is_reached(tmp_path):
    # A deferral whose next retry would pass max_age makes the recipient due at the
    # message's deadline (its last attempt; outcomes.Plan.outcome): dispatched then,
    # though the deadline is reached by the time the shard looks.  A recipient that
    # waited past the deadline for anything else still expires at dispatch.
    shard = make_shard(tmp_path, max_age=60.0)
    arrival = time.time() - 61.0
    qid = queued_at(shard, arrival, ["a@x.example", "b@x.example"])
    q = shard.store.index
    q.set_due(qid, 0, arrival + 60.0)        # a's last attempt, at the deadline
    q.set_due(qid, 1, arrival + 30.0)        # b: due long ago, waited past it
    q.push(qid, arrival + 30.0)
    shard.dispatch()
    [(_, job)] = sent(shard)
    assert [r.address for r in job.rcpts] == ["a@x.example"]
    assert shard.expire_work == [(qid, [1])]


def test_the_expiry_sweep_leaves_a_last_attempt_due_at_the_deadline_to_its_dispatch(tmp_path):
    # The once-a-second sweep (expire_waiting) may run after the deadline and before
    # the dispatch pass that sends the recipient due at it: that one is left for its
    # last attempt (for LAST_TRY_GRACE), the others expire; past the grace it expires.
    shard = make_shard(tmp_path, max_age=60.0)
    arrival = time.time() - 61.0
    qid = queued_at(shard, arrival, ["a@x.example", "b@x.example"])
    q = shard.store.index
    q.set_due(qid, 0, arrival + 60.0)        # a's last attempt, at the deadline
    q.set_due(qid, 1, arrival + 30.0)        # b: waited past the deadline
    shard.expire_waiting()
    assert shard.expire_work == [(qid, [1])]
    shard.expire_work.clear()
    shard.dispatch()                          # (b is not yet expired in the index)
    assert [r.address for _, j in sent(shard) for r in j.rcpts] == ["a@x.example"]
    # a recipient still waiting for it past the grace expires
    late = make_shard(tmp_path / "late", max_age=60.0)
    arrival = time.time() - 60.0 - sch.LAST_TRY_GRACE - 1.0
    qid = queued_at(late, arrival, ["a@x.example"])
    late.store.index.set_due(qid, 0, arrival + 60.0)
    late.expire_waiting()
    assert late.expire_work == [(qid, [0])]


def test_a_last_attempt_whose_job_got_no_outcome_is_not_sent_again_past_the_grace(
        tmp_path, monkeypatch):
    # The last attempt (due at the deadline) goes; its job gets no outcome (its delivery
    # process died, or did not answer within the job timeout) and is sent again -- but
    # not past the deadline's grace: it expires then, as the sweep would expire it.  It
    # was dispatched again at every job timeout or crash, for as long as that went on,
    # the message never expiring (its sweep waits while a job is out).
    shard = make_shard(tmp_path, max_age=60.0)
    arrival = time.time() - 61.0
    qid = queued_at(shard, arrival, ["a@x.example"])
    q = shard.store.index
    q.set_due(qid, 0, arrival + 60.0)        # its last attempt, at the deadline
    q.push(qid, arrival + 60.0)
    shard.dispatch()
    [(_, job)] = sent(shard)
    later = time.time() + sch.LAST_TRY_GRACE + 600.0     # (a job timeout later)
    monkeypatch.setattr(shard_mod.time, "time", lambda: later)
    shard._resend([job.req])                 # no outcome came: sent again...
    shard.dispatch()
    assert sent(shard) == []                 # ... not any more: past max_age and grace
    assert shard.expire_work == [(qid, [0])]


def test_a_long_blocked_backlog_is_released_in_order_once_each():
    # A throttled site in a burst: tens of thousands of messages blocked behind its
    # per-domain cap, released one per job that comes back while new ones keep
    # arriving at the back, across the FIFO's remakes (its cost per message:
    # bench/test_bench_spool.py::test_blocked_backlog_release).  Strict FIFO, each
    # message once; a message blocked again while it waits keeps its place.
    w = dsp.Window(processes=1, max_in_flight=10, per_domain=1, spread_threshold=10)
    w.add(1, "first", [0], 0, "slow.example", dsp.BULK)
    for i in range(20_000):
        w.block("slow.example", f"q{i:06d}")
    got, req, nxt = [], 1, 20_000
    while w.blocked_count():
        w.remove(req)                           # the job out comes back ...
        out = w.released()
        assert len(out) == 1                    # ... one slot free: one message
        got += out
        req += 1
        w.add(req, out[0], [0], 0, "slow.example", dsp.BULK)
        if nxt < 30_000 and len(got) % 2 == 0:  # one new arrival per two released
            w.block("slow.example", f"q{nxt:06d}")
            nxt += 1
        if len(got) == 25_000:
            w.block("slow.example", f"q{29_000:06d}")     # already waiting: no-op
    assert got == [f"q{i:06d}" for i in range(30_000)]
    assert "slow.example" not in w.blocked
    assert w.released(everything=True) == []


def test_blocked_messages_deleted_while_they_wait_do_not_hold_up_their_domain(tmp_path):
    # A throttled domain's backlog is bounced (here: deleted) while it waits behind the
    # per-domain cap; the next message to that domain goes as soon as a slot is free,
    # not after the ghosts have been released one slot at a time.
    shard = make_shard(tmp_path, max_in_flight_per_domain=1)
    first = queue(shard, ["r@slow.example"])
    backlog = [queue(shard, [f"b{i}@slow.example"]) for i in range(300)]
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [first]
    assert shard.window.blocked_count() == 300
    shard.batch(deletes=[(b"cli", bus.SpoolMessageDelete(1, backlog))])
    assert not any(q in shard.store.index for q in backlog)
    new = queue(shard, ["n@slow.example"])
    shard.dispatch()
    assert sent(shard) == []                    # blocked: the domain's one slot is out
    req = next(r for r, j in shard.jobs.items() if j.qid == first)
    shard.returned(req, first)
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [new]
    assert shard.window.blocked_count() == 0 and "slow.example" not in shard.window.blocked


def test_released_skips_what_is_no_longer_queued_without_using_a_slot():
    w = dsp.Window(processes=1, max_in_flight=10, per_domain=3, spread_threshold=10)
    for i in range(10):
        w.block("d.example", f"q{i}")
    gone = {"q0", "q1", "q3", "q4", "q5"}
    assert w.released(everything=True, release=lambda q: q not in gone) == ["q2", "q6", "q7"]
    assert list(w.blocked["d.example"]) == ["q8", "q9"]
    assert w.released(everything=True) == ["q8", "q9"] and not w.blocked


def test_released_drops_a_bounded_number_of_ghosts_per_pass():
    w = dsp.Window(processes=1, max_in_flight=10, per_domain=1, spread_threshold=10)
    n = dsp.GHOSTS_PER_PASS + 5
    for i in range(n):
        w.block("d.example", f"g{i}")
    w.block("d.example", "live")
    assert w.released(everything=True, release=lambda q: q == "live") == []
    assert len(w.blocked["d.example"]) == 6     # the rest next time, not in one long pause
    assert w.released(everything=True, release=lambda q: q == "live") == ["live"]
    assert not w.blocked


def test_a_queue_flush_leaves_a_scheduled_message_until_its_start(tmp_path):
    # `mta queue flush` retries the *deferred* recipients now; a message whose
    # options.start_time is still ahead was never attempted and stays scheduled
    # (README: start_time messages are kept scheduled, durably, until then).
    from mta.spool import queries
    shard = make_shard(tmp_path)
    start = time.time() + 3600.0
    later = queue(shard, ["a@x.example"], start_at=start)
    now_qid = queue(shard, ["b@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)
    assert job.qid == now_qid
    deferred = bus.DeliveryOutcome(req=job.req, qid=now_qid, results=[
        bus.Result(0, bus.DEFERRED, 451, "4.3.0", "try later", "mx", "127.0.0.1")])
    shard.links.outcomes[d].append(deferred)
    shard.batch(outcomes=[d])
    assert shard.store.index.progress(now_qid)[1] == [1]
    reply = queries.flush(shard.store, 7)
    assert reply.count == 1                     # the deferred one only
    assert shard.store.index.progress(later)[2] == [start]
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [now_qid]


def test_a_flush_of_a_domain_or_a_message_makes_only_its_recipients_due(tmp_path):
    # mta queue flush --domain / --queue-id: the deferred recipients at that domain (of
    # that message) are due now, the others keep waiting; the delivery processes end the
    # dead-site holds of those domains' sites only, ahead of the jobs
    shard = make_shard(tmp_path)
    replies = []
    shard.server.send = lambda peer, msg: replies.append(msg)
    both = queue(shard, ["a@x.example", "b@y.example"])
    other = queue(shard, ["c@y.example"])
    shard.dispatch()
    jobs = [j for _, j in sent(shard)]
    assert len(jobs) == 3
    for j in jobs:
        shard.links.outcomes[0].append(bus.DeliveryOutcome(req=j.req, qid=j.qid, results=[
            bus.Result(r.index, bus.DEFERRED, 451, "4.3.0", "try later", "mx", "127.0.0.1")
            for r in j.rcpts]))
    shard.batch(outcomes=[0])
    shard.dispatch()
    assert sent(shard) == []

    shard.query(b"cli", bus.SpoolQueueFlush(1, domains=["x.example"]))
    assert replies.pop() == bus.SpoolQueueFlushReply(1, 1)
    assert shard.store.index.progress(other)[2][0] > time.time() + 10
    shard.dispatch()
    out = sent(shard)
    assert out[0] == (0, bus.DeliveryQueueFlush(["x.example"]))      # (first)
    assert [(j.qid, j.domain) for _, j in out[1:]] == [(both, "x.example")]
    job = out[1][1]
    shard.links.outcomes[0].append(bus.DeliveryOutcome(req=job.req, qid=both, results=[
        bus.Result(job.rcpts[0].index, bus.DELIVERED, 250, "2.0.0", "ok", "mx",
                   "127.0.0.1")]))
    shard.batch(outcomes=[0])

    shard.query(b"cli", bus.SpoolQueueFlush(2, qids=[other, "18A3F2C4B1D2E0300009"]))
    assert replies.pop() == bus.SpoolQueueFlushReply(2, 1, ["18A3F2C4B1D2E0300009"])
    shard.dispatch()
    out = sent(shard)
    assert out[0] == (0, bus.DeliveryQueueFlush(["y.example"]))
    assert [(j.qid, j.domain) for _, j in out[1:]] == [(other, "y.example")]
    job = out[1][1]
    shard.links.outcomes[0].append(bus.DeliveryOutcome(req=job.req, qid=other, results=[
        bus.Result(0, bus.DELIVERED, 250, "2.0.0", "ok", "mx", "127.0.0.1")]))
    shard.batch(outcomes=[0])
    assert shard.store.index.progress(both)[2][1] > time.time() + 10   # b@y.example waits

    shard.query(b"cli", bus.SpoolQueueFlush(3, domains=["nowhere.example"]))
    assert replies.pop() == bus.SpoolQueueFlushReply(3, 0)
    shard.dispatch()
    assert sent(shard) == [(0, bus.DeliveryQueueFlush(["nowhere.example"]))]

    # a suspended domain stays suspended: its flushed recipients are held back again
    from mta import controls as ctl
    ctl.save(ctl.path_of(str(tmp_path)), [ctl.Suspension(id="s1", domain="y.example")])
    shard.query(b"cli", bus.SpoolAdminRefresh(4))
    shard.query(b"cli", bus.SpoolQueueFlush(5, domains=["y.example"]))
    assert replies.pop() == bus.SpoolQueueFlushReply(5, 1)
    shard.dispatch()
    assert sent(shard) == [(0, bus.DeliveryQueueFlush(["y.example"]))]
    assert list(shard.held) == [both], (list(shard.held), both, other)


def test_a_delete_of_messages_no_longer_queued_is_answered(tmp_path):
    # `mta queue delete` of a message that was delivered meanwhile (or a typo'd id): the
    # batch has nothing to write, and the request must still get its reply (deleted:
    # none), not be left for the CLI to time out as "spool[n] is not answering".
    shard = make_shard(tmp_path)
    replies = []
    shard.server.send = lambda peer, msg: replies.append((peer, msg))
    gone = new_qid(0)
    shard.batch(deletes=[(b"cli", bus.SpoolMessageDelete(5, [gone]))])
    assert replies == [(b"cli", bus.SpoolMessageDeleteReply(5, bus.STATUS_OK, []))]
    # and one that names a queued message as well as a gone one
    qid = queue(shard, ["a@x.example"])
    replies.clear()
    shard.batch(deletes=[(b"cli", bus.SpoolMessageDelete(6, [gone, qid]))])
    assert replies == [(b"cli", bus.SpoolMessageDeleteReply(6, bus.STATUS_OK, [qid]))]


def test_a_bulk_bounce_takes_again_a_message_it_could_not_read(tmp_path):
    # A read error on one message's record (EIO) during a bulk bounce must not drop it
    # from the operation: it is bounced once the record reads again, not delivered.
    shard = make_shard(tmp_path, hold=True)
    qid = queue(shard, ["a@x.example"])
    reply = shard.start_bounce(bus.SpoolAdminBounce(1, "op1", {"domains": ["x.example"]},
                                                    "test", False))
    assert reply.status == bus.STATUS_OK and reply.ops[0]["total"] == 1
    real = shard.store.read_meta

    def failing(q):
        raise OSError(5, "Input/output error")

    shard.store.read_meta = failing
    shard.batch()
    assert qid in shard.store.index
    shard.store.read_meta = real
    shard.op_idle_until = 0.0
    shard.batch()
    assert qid not in shard.store.index
    assert shard.ops["op1"].done == 1


def test_an_expiry_that_could_not_read_the_record_is_tried_again(tmp_path):
    # A read error (EIO) on the record while the message expires must not leave it
    # queued for good: its deadline was taken, so it is filed again for a retry.
    shard = make_shard(tmp_path, hold=True, max_age=60.0)
    qid = queue(shard, ["a@x.example"])
    shard.policy.expired = lambda start, now: True      # (an hour later, say)
    shard.store.index.set_deadline(qid, time.time() - 1.0)
    real = shard.store.read_meta

    def failing(q):
        raise OSError(5, "Input/output error")

    shard.store.read_meta = failing
    shard.expire_waiting()
    assert shard.expire_work == [(qid, [0])]
    shard.batch()
    assert qid in shard.store.index             # not expired: the record did not read
    shard.store.read_meta = real
    shard.expire_waiting()                      # (its deadline is a little ahead now)
    assert shard.expire_work == []
    assert qid in shard.store.index.passed(time.time() + 180.0)
    shard.expire_work = [(qid, [0])]            # ... as expire_waiting then files it
    shard.batch()
    assert qid not in shard.store.index


def _reload_to(shard, **delivery):
    """Record, as the supervisor does before its SIGHUP, *shard*'s settings with
    *delivery* changed, and let the shard take them."""
    import dataclasses
    from mta import config as mconfig
    s = shard.settings
    new = dataclasses.replace(s, config=msgspec.structs.replace(
        s.config, delivery=msgspec.structs.replace(s.config.delivery, **delivery)))
    os.makedirs(new.run_dir, exist_ok=True)
    mconfig.write_active(new, None)
    shard.apply_reload()


def test_a_reload_before_the_shard_listened_for_it_is_taken_at_its_first_turn(tmp_path):
    # The supervisor records the new configuration, then sends SIGHUP.  A shard forked
    # just before (a restart after a crash, during the reload) ignores SIGHUP until its
    # handler is set: it kept the old [delivery] (hold, retries) until the next reload.
    shard = make_shard(tmp_path)
    assert shard.dcfg.hold is False
    import dataclasses
    from mta import config as mconfig
    s = shard.settings
    os.makedirs(s.run_dir, exist_ok=True)
    mconfig.write_active(dataclasses.replace(s, config=msgspec.structs.replace(
        s.config, delivery=msgspec.structs.replace(s.config.delivery, hold=True))), None)
    shard.start()
    assert shard.reload_wanted          # (step() begins with it: the first turn)
    shard.apply_reload()
    assert shard.dcfg.hold is True
    # with the record as the shard started, nothing changes at its first turn
    same = make_shard(tmp_path / "same")
    os.makedirs(same.settings.run_dir, exist_ok=True)
    mconfig.write_active(same.settings, None)
    before = same.dcfg
    same.start()
    same.apply_reload()
    assert same.dcfg is before


def test_a_reload_lowering_the_timeouts_does_not_resend_jobs_still_out(tmp_path):
    # A reload that lowers the delivery timeouts reaches the shard (SIGHUP) before the
    # delivery processes are replaced; the old ones finish their jobs under the old
    # timeouts.  A job out for longer than the new bound but shorter than the old one is
    # not lost: sent again, its message would go out twice.
    shard = make_shard(tmp_path, data_timeout=600.0)
    before = shard.job_timeout
    queue(shard, ["a@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)
    _reload_to(shard, data_timeout=30.0)
    assert shard.dcfg.data_timeout == 30.0
    out = shard.window.jobs[job.req]
    # (out for longer than the new bound, not the old one)
    shard.window.jobs[job.req] = out._replace(sent_at=out.sent_at - (before - 60.0))
    shard.expire_jobs()
    assert job.req in shard.window.jobs
    shard.dispatch()
    assert sent(shard) == []


def answer_the_job(shard, *results) -> None:
    """Dispatch the one job due and give its outcome (*results*) back in a batch."""
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job.req, qid=job.qid,
                                                       results=list(results)))
    shard.batch(outcomes=[d])


def test_queue_show_gives_a_last_reply_only_for_recipients_still_waiting(tmp_path):
    # `mta queue show` / inspect print "last reply" under each recipient: a recipient
    # deferred once and delivered since must not read as if a 451 was its last reply.
    from mta.spool import queries
    shard = make_shard(tmp_path)
    qid = queue(shard, ["a@x.example", "b@x.example"])
    answer_the_job(shard, bus.Result(0, bus.DEFERRED, 451, "4.3.0", "try later", "mx", ""),
                   bus.Result(1, bus.DEFERRED, 451, "4.3.0", "try later", "mx", ""))
    queries.flush(shard.store, 1)
    answer_the_job(shard, bus.Result(0, bus.DELIVERED, 250, "2.0.0", "ok", "mx", ""),
                   bus.Result(1, bus.DEFERRED, 452, "4.2.2", "full", "mx", ""))
    e = queries.show(shard.store, 2, qid).entry
    assert e["state"] == ["delivered", "pending"]
    assert e["last"][0] is None
    assert e["last"][1]["code"] == 452


def capture_events(shard) -> list:
    """The list that every event *shard*'s batches write from now on is added to."""
    written = []
    real = shard._batch_events

    def capture(messages, plan):
        out = real(messages, plan)
        written.extend(out)
        return out
    shard._batch_events = capture
    return written


def test_a_delete_gives_no_bounce_event_to_recipients_whose_job_is_out(tmp_path):
    # `mta queue delete` of a message whose delivery job is out: its recipients may be
    # delivered yet, so the delete must not report them bounced (a webhook consumer
    # could suppress a subscriber who got the mail); those not in the job get their
    # class-25 bounce.  If the job's outcome comes in the same batch, it says what
    # happened to its recipients.
    shard = make_shard(tmp_path, max_in_flight_per_domain=1)
    written = capture_events(shard)
    qid = queue(shard, ["a@x.example", "b@y.example"])     # two domains: two jobs
    shard.dispatch()
    jobs = sent(shard)
    assert len(jobs) == 2
    (d, job_a), = [(d, j) for d, j in jobs if j.rcpts[0].index == 0]
    # the job for b came back (deferred): b waits in the queue, a's job is still out
    (d_b, job_b), = [(d, j) for d, j in jobs if j.rcpts[0].index == 1]
    shard.links.outcomes[d_b].append(bus.DeliveryOutcome(req=job_b.req, qid=qid, results=[
        bus.Result(1, bus.DEFERRED, 451, "4.3.0", "try later", "mx.y.example", "")]))
    shard.batch(outcomes=[d_b])
    written.clear()
    shard.batch(deletes=[(b"cli", bus.SpoolMessageDelete(1, [qid]))])
    assert qid not in shard.store.index
    ends = [(e["type"], e["recipient"], e.get("bounce_class")) for e in written
            if e["type"] != ev.INJECTION]
    assert ends == [(ev.BOUNCE, "b@y.example", 25)], ends
    # a's outcome, later: the message is gone, but a was delivered, and says so once
    written.clear()
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job_a.req, qid=qid, results=[
        bus.Result(0, bus.DELIVERED, 250, "2.0.0", "ok", "mx.x.example", "")]))
    shard.batch(outcomes=[d])
    assert [(e["type"], e["recipient"], e["queue_id"], e["response"]["code"])
            for e in written] == [(ev.DELIVERY, "a@x.example", qid, 250)], written
    assert shard.deleted_out == {}
    written.clear()
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job_a.req, qid=qid, results=[
        bus.Result(0, bus.DELIVERED, 250, "2.0.0", "ok", "mx.x.example", "")]))
    shard.batch(outcomes=[d])                   # repeated (at least once): nothing more
    assert written == []


def test_the_jobs_out_of_a_deleted_message_end_each_recipient_once(tmp_path):
    # Deleted while three jobs were out (three domains): each outcome that comes later
    # makes its recipient's last event -- the server's bounce (with its class, no DSN),
    # the delete's class-25 bounce for one deferred -- and a job that never answers is
    # not sent again.  Nothing of the message is kept once no job of it is out.
    shard = make_shard(tmp_path, max_in_flight_per_domain=1)
    written = capture_events(shard)
    suppressed = []
    shard.bounce_rule = True                    # (suppression.bounce_rule, as by default)
    shard.add_bounce_rule = suppressed.extend
    qid = queue(shard, ["a@x.example", "b@y.example", "c@z.example"])
    shard.dispatch()
    jobs = {j.rcpts[0].index: (d, j) for d, j in sent(shard)}
    assert sorted(jobs) == [0, 1, 2]
    written.clear()
    shard.batch(deletes=[(b"cli", bus.SpoolMessageDelete(1, [qid]))])
    assert qid not in shard.store.index
    assert [e for e in written if e["type"] != ev.INJECTION] == []
    assert sorted(shard.deleted_out[qid].attempts) == [0, 1, 2]
    d, job = jobs[0]
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job.req, qid=qid, results=[
        bus.Result(0, bus.FAILED, 550, "5.1.1", "no such user", "mx.x.example", "")]))
    d, job = jobs[1]
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job.req, qid=qid, results=[
        bus.Result(1, bus.DEFERRED, 451, "4.3.0", "try later", "mx.y.example", "")]))
    shard.batch(outcomes=sorted({jobs[0][0], jobs[1][0]}))
    got = sorted((e["recipient"], e["type"], e["bounce_class"], e["response"]["code"])
                 for e in written)
    assert got == [("a@x.example", ev.BOUNCE, 10, 550),
                   ("b@y.example", ev.BOUNCE, 25, ctl.BOUNCE_CODE)], got
    assert [r for r, _ in suppressed] == ["a@x.example"]    # a hard bounce is a hard bounce
    assert sorted(shard.deleted_out[qid].attempts) == [2]
    # c's job never answers: given up after the job timeout, and not sent again
    written.clear()
    req = jobs[2][1].req
    # (sent longer ago than the job timeout by the monotonic clock: not its zero, which is
    # the boot, less than a job timeout before on a machine just started)
    shard.window.jobs[req] = shard.window.jobs[req]._replace(
        sent_at=time.monotonic() - shard.job_timeout - 1)
    shard.expire_jobs()
    assert shard.deleted_out == {} and shard.window.jobs == {}
    shard.dispatch()
    assert sent(shard) == []


def test_a_job_that_answers_in_the_batch_of_its_messages_delete_ends_its_recipients(tmp_path):
    # The delete and the job's outcome read in one batch (a `queue delete ALL` with many
    # jobs out): the outcome is the recipients' last word as in a later batch -- the
    # delete's class-25 bounce for one handed back (REQUEUED; before: no event at all),
    # the server's bounce for one refused, with no DSN for a message that is gone.
    shard = make_shard(tmp_path, max_in_flight_per_domain=1)
    written = capture_events(shard)
    shard.bounce_rule = False                   # (suppression off here)
    qid = queue(shard, ["a@x.example", "b@y.example"])
    shard.dispatch()
    jobs = {j.rcpts[0].index: (d, j) for d, j in sent(shard)}
    written.clear()
    for idx, result in ((0, bus.Result(0, bus.REQUEUED, 0, "", "source busy", "", "")),
                        (1, bus.Result(1, bus.FAILED, 550, "5.1.1", "no such user",
                                       "mx.y.example", ""))):
        d, job = jobs[idx]
        shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job.req, qid=qid,
                                                           results=[result]))
    shard.batch(deletes=[(b"cli", bus.SpoolMessageDelete(1, [qid]))],
                outcomes=sorted({d for d, _ in jobs.values()}))
    assert qid not in shard.store.index
    got = sorted((e["recipient"], e["type"], e["bounce_class"]) for e in written)
    assert got == [("a@x.example", ev.BOUNCE, 25), ("b@y.example", ev.BOUNCE, 10)], written
    assert len(shard.store.index) == 0          # no DSN queued for the deleted message
    assert shard.deleted_out == {} and shard.window.jobs == {}


def test_no_delay_notice_for_a_message_deleted_or_bounced_by_the_operator_in_its_batch(
        tmp_path):
    # The sweep found the message past delay_warning_time; the batch that looks at it
    # for a delay notice (Plan.remind) also takes the operator's delete of it (its job
    # still out) or a bulk bounce of it: the sender got a "delayed" DSN for a message the
    # operator had deleted, and a "delayed" one with the bounce, for the same recipient.
    shard = make_shard(tmp_path, delay_warning_time=30.0, max_age=3600.0)
    q = shard.store.index
    qid = queued_at(shard, time.time() - 40.0, ["a@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)                      # (its job is out)
    shard.expire_waiting()
    assert list(shard.notice_work) == [qid]
    real = shard.store.write

    def failing(*a, **k):
        raise OSError(28, "No space left on device")

    shard.store.write = failing                   # (a delete not written: still queued,
    shard.batch(deletes=[(b"cli", bus.SpoolMessageDelete(1, [qid]))])
    assert qid in q and qid in q.passed(time.time() + 5.0)     # and looked at again)
    shard.store.write = real
    shard.healthy = True
    shard.notice_work = collections.deque([qid])
    shard.batch(deletes=[(b"cli", bus.SpoolMessageDelete(2, [qid]))])
    assert qid not in q
    assert len(q) == 0                            # no DSN queued
    # a bulk bounce (with its DSN) of a message the sweep found in the same batch
    shard = make_shard(tmp_path / "op", delay_warning_time=30.0, max_age=3600.0, hold=True)
    q = shard.store.index
    qid = queued_at(shard, time.time() - 40.0, ["a@x.example"])
    shard.start_bounce(bus.SpoolAdminBounce(1, "op1", {"domains": ["x.example"]}, "test",
                                            True))
    shard.expire_waiting()
    assert list(shard.notice_work) == [qid]
    shard.batch()
    assert qid not in q
    [dsn] = q.sorted_qids()
    body = shard.store.read_record(dsn)[1]
    assert b"Action: failed" in body and b"Action: delayed" not in body


def test_a_reload_turning_delay_notices_on_or_sooner_files_the_queue_for_them(tmp_path):
    # delivery.delay_warning_time reaches a running shard at a reload; the messages
    # queued before it were filed for the sweep at the old warning time (or, with
    # notices off, at their deadline only), so one that waited untried (a suspended site,
    # handed back) got no notice however long it waited past the new one.
    shard = make_shard(tmp_path, max_age=3600.0)            # (notices off)
    old = queued_at(shard, time.time() - 40.0, ["a@x.example"])
    young = queued_at(shard, time.time(), ["b@x.example"])
    _reload_to(shard, delay_warning_time=30.0)
    shard.expire_waiting()
    assert list(shard.notice_work) == [old]
    shard.batch()
    q = shard.store.index
    [notice] = [x for x in q.sorted_qids() if x not in (old, young)]
    assert b"Action: delayed" in shard.store.read_record(notice)[1]
    assert young in q.passed(time.time() + 30.0 + 3.6 + 0.1)   # (at its own time)
    # lowered: filed for the new time, not the old one
    shard = make_shard(tmp_path / "lower", max_age=3600.0, delay_warning_time=600.0)
    old = queued_at(shard, time.time() - 40.0, ["a@x.example"])
    _reload_to(shard, delay_warning_time=30.0)
    shard.expire_waiting()
    assert list(shard.notice_work) == [old]


def test_no_delay_notice_for_a_recipient_whose_delivery_is_under_way(tmp_path):
    # The sweep's look (Plan.remind) came while the message's job was out: the sender
    # got a "delayed" DSN for a recipient delivered a moment later.  Its outcome decides
    # (a deferral names it, as always); the message is looked at again after it.
    shard = make_shard(tmp_path, delay_warning_time=30.0, max_age=3600.0)
    q = shard.store.index
    qid = queued_at(shard, time.time() - 40.0, ["a@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.expire_waiting()
    assert list(shard.notice_work) == [qid]
    shard.batch()
    assert q.sorted_qids() == [qid]                           # no notice (yet)
    assert qid in q.passed(time.time() + 1.0 + q.width)       # looked at again
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job.req, qid=qid, results=[
        bus.Result(0, bus.DELIVERED, 250, "2.0.0", "ok", "mx.x.example", "127.0.0.2")]))
    shard.batch(outcomes=[d])
    assert len(q) == 0                                        # delivered: no DSN at all


def test_a_wall_clock_stepped_back_does_not_hold_up_the_retries(tmp_path, monkeypatch):
    # NTP steps the clock back an hour (the machine booted with it ahead).  A recipient
    # deferred just before is due again 300 s after its attempt, not an hour and 300 s;
    # a domain's pause ends when it was meant to; a message whose options.start_time is
    # ahead keeps its instant (the client's, not counted from the clock).
    shard = make_shard(tmp_path, retry_schedule=[300.0], retry_jitter=0.0)
    retried = queue(shard, ["a@x.example"])
    start = time.time() + 7200.0
    scheduled = queue(shard, ["b@y.example"], start_at=start)
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job.req, qid=retried, results=[
        bus.Result(0, bus.DEFERRED, 451, "4.3.0", "try later", "mx", "127.0.0.1")]))
    shard.batch(outcomes=[d])
    q = shard.store.index
    deferred_at = time.time()
    shard.window.pause("z.example", "default", deferred_at + 60.0)
    real = time.time
    step = 3600.0
    monkeypatch.setattr(shard_mod.time, "time", lambda: real() - step)
    shard.watch_clock()
    due = q.progress(retried)[2][0]
    assert deferred_at - step + 299.0 <= due <= real() - step + 300.0
    assert q.progress(scheduled)[2] == [start]
    # (a millisecond's slack: (t + 60) - 3600 and (t - 3600) + 60 differ in the last bits
    # of a float near 1.8e9, about half the time; an hour's stall is what is looked for)
    assert shard.window.paused_until("z.example", "default", real() - step) \
        <= deferred_at - step + 60.0 + 0.001
    # nothing before its time...
    shard.dispatch()
    assert sent(shard) == []
    # ... and it goes 300 s after its attempt, by the clock as it is now
    monkeypatch.setattr(shard_mod.time, "time", lambda: real() - step + 301.0)
    shard.watch_clock()                     # (an hour ahead again: not a step back)
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [retried]
    assert q.progress(scheduled)[2] == [start]


def test_a_message_taken_while_the_clock_was_ahead_is_not_held_back_by_it(tmp_path,
                                                                        monkeypatch):
    # Accepted (and held back: its domain paused) while the clock was a day ahead; once
    # it is set right the message is due as soon as the pause it waited for ends,
    # not a day later.
    shard = make_shard(tmp_path, retry_jitter=0.0)
    real = time.time
    ahead = 86400.0
    monkeypatch.setattr(shard_mod.time, "time", lambda: real() + ahead)
    shard.clock = shard_mod.proc.ClockStepWatch()
    qid = queue(shard, ["a@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(requeue_outcome(shard, job, 30.0, source=""))
    shard.batch(outcomes=[d])
    monkeypatch.setattr(shard_mod.time, "time", real)
    shard.watch_clock()
    monkeypatch.setattr(shard_mod.time, "time", lambda: real() + 31.0)
    shard.watch_clock()
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [qid]


def test_a_message_a_full_delivery_queue_sent_back_is_not_held_up_by_a_step_back(
        tmp_path, monkeypatch):
    # A backlog: the message was due long ago and its job is refused by a full delivery
    # queue, so it is queued again for a second later.  Then NTP steps the clock back an
    # hour: that second must not become an hour and a second (its recipient's due time,
    # long past, is no later than the new now and so had nothing to bring earlier).
    shard = make_shard(tmp_path)
    real = time.time
    qid = queue(shard, ["a@x.example"])
    monkeypatch.setattr(shard_mod.time, "time", lambda: real() + 7200.0)   # two hours on
    shard.watch_clock()
    shard.links.send_jobs = lambda d, jobs: 0                            # queue full
    shard.dispatch()
    assert sent(shard) == [] and shard.store.index.scheduled(qid) > real() + 7200.0
    monkeypatch.setattr(shard_mod.time, "time", lambda: real() + 3600.0)   # an hour back
    shard.watch_clock()
    monkeypatch.setattr(shard_mod.time, "time", lambda: real() + 3600.0 + 2.0)
    del shard.links.send_jobs                                            # room again
    shard.dispatch()
    assert [j.qid for _, j in sent(shard)] == [qid]


def test_a_step_back_while_the_spool_is_recovered_counts_once(tmp_path, monkeypatch):
    # The daemon starts again with the clock still an hour ahead, as it ran before; NTP
    # steps it back while the shard reads its spool.  The end of the recovery finds the
    # spool an hour "ahead" and brings the retry an hour earlier; the watch of the clock
    # must not then bring it another hour earlier for the same step (a backlog's
    # retries all due at once).
    real = time.time
    monkeypatch.setattr(shard_mod.time, "time", lambda: real() + 3600.0)
    shard = make_shard(tmp_path, retry_schedule=[600.0], retry_jitter=0.0)
    qid = queue(shard, ["a@x.example"])
    shard.dispatch()
    [(d, job)] = sent(shard)
    shard.links.outcomes[d].append(bus.DeliveryOutcome(req=job.req, qid=qid, results=[
        bus.Result(0, bus.DEFERRED, 451, "4.3.0", "try later", "mx", "127.0.0.1")]))
    shard.batch(outcomes=[d])
    assert shard.store.index.progress(qid)[2][0] >= real() + 3600.0 + 590.0
    shard.store.close()
    os.close(shard.writer_lock)                               # (the process ended)
    again = make_shard(tmp_path, retry_schedule=[600.0], retry_jitter=0.0)
    monkeypatch.setattr(shard_mod.time, "time", real)        # stepped back mid-recovery
    again._clock_behind_spool()
    again.watch_clock()
    due = again.store.index.progress(qid)[2][0]
    assert real() + 500.0 <= due <= real() + 600.0, due - real()


class _Counted(str):
    """A site or source name that counts how often it is compared."""
    compared = 0
    __hash__ = str.__hash__

    def __eq__(self, other):
        _Counted.compared += 1
        return str.__eq__(self, other)


def test_taking_many_lanes_by_name_looks_at_each_lane_once():
    # a reload that changes [[egress]] releases every (site, source) lane, and a cancel
    # names up to MAX_FLUSH_NAMES of them: taking them must not compare every lane with
    # every name (20,000 lanes named one by one were 200 million comparisons: minutes)
    from mta import native
    hb = dsp.HandedBack(native.load("qindex").QidFifo)
    n = 2000
    for i in range(n):
        hb.add(new_qid(0), f"mx{i}.test", "ip-1", f"d{i}.test")
    hb.add(new_qid(0), "mx0.test", "ip-2", "d0.test")
    _Counted.compared = 0
    named = [(_Counted(f"mx{i}.test"), _Counted("ip-1")) for i in range(n)]
    taken = hb.take(named)
    assert len(taken) == n and all(len(qids) == 1 for _, qids in taken)
    assert _Counted.compared < 10 * n
    assert list(hb.lanes) == [("mx0.test", "ip-2", "d0.test")] and len(hb) == 1
    # patterns with "*" as before: any source of one site, one source of any site
    hb.add(new_qid(0), "mx1.test", "ip-3", "d1.test")
    assert [k for k, _ in hb.take([("mx1.test", dsp.ANY)])] == [("mx1.test", "ip-3", "d1.test")]
    hb.add(new_qid(0), "mx5.test", "ip-2", "d5.test")
    assert sorted(k for k, _ in hb.take([(dsp.ANY, "ip-2")])) == [
        ("mx0.test", "ip-2", "d0.test"), ("mx5.test", "ip-2", "d5.test")]
    hb.add(new_qid(0), "mx7.test", "", "d7.test")
    assert [k for k, _ in hb.take([(dsp.ANY, dsp.ANY)])] == [("mx7.test", "", "d7.test")]
    assert not hb.lanes and not len(hb)


def test_a_dkim_key_file_replaced_in_place_is_read_again_when_it_is_the_one_checked(
        tmp_path, caplog):
    # The shard re-made its notices' signer only when [dkim]'s text changed: a key file
    # replaced in place (same path and selector) left it signing with the old key.  The
    # record of the active configuration carries the digest of the key files the
    # supervisor checked; the shard reads them again when it differs from its own, and
    # takes them only if they are those (else: logged, the old signer kept, and the
    # next reload tries again).
    import logging

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from mta import config as mconfig
    from mta.dkim import public_record

    key_path = tmp_path / "k.pem"

    def new_key():
        key = ed25519.Ed25519PrivateKey.generate()
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return public_record(key)

    def settings():
        return resolve(msgspec.convert({
            "server": {"state_dir": str(tmp_path), "hostname": "mta.test"},
            "spool": {"shards": 1, "fsync": False, "preallocate": False},
            "delivery": {"hold": False, "processes": 1},
            "dkim": {"keys": [{"domain": "mta.test", "selector": "s", "algorithm":
                               "ed25519-sha256", "key_file": str(key_path)}]}}, Config), None)

    name = "s._domainkey.mta.test"
    first = new_key()
    start = settings()
    shard = Shard(start, 0)
    assert shard.signer.dns_records() == {name: first}
    os.makedirs(start.run_dir, exist_ok=True)
    mconfig.write_active(start, None)
    shard.apply_reload()                        # the same files: nothing to do
    assert shard.signer.dns_records() == {name: first}
    second = new_key()
    checked = settings()
    assert checked.config == start.config
    assert checked.dkim_keys_digest != start.dkim_keys_digest
    mconfig.write_active(checked, None)
    shard.apply_reload()
    assert shard.signer.dns_records() == {name: second}
    # the file replaced again after the supervisor's check: not what it checked
    new_key()
    third = settings()
    new_key()
    mconfig.write_active(third, None, 1.0)
    with caplog.at_level(logging.ERROR):
        shard.apply_reload()
    assert shard.signer.dns_records() == {name: second}
    assert "changed on disk since the supervisor checked them" in caplog.text
    # its answer names the keys it signs with: the supervisor tells it again next time
    said = mconfig.read_applied(start.run_dir, 0)
    assert said["serial"] == 1.0 and said["dkim_keys_digest"] == checked.dkim_keys_digest
    shard.store.close()
