"""The delivery engine's node-wide connection slots, in process: what a lane does when
other delivery processes want its slots, when its jobs leave while it waits for one,
and when a worker fails.

A real SMTP peer (aiosmtpd on loopback, its replies to the end of data delayed) and a
limiter that stands for the node's (mta/delivery/limits.py): it hands out slots up to
the limit and says, as the test decides, whether another process waits for one.
"""
from __future__ import annotations

import asyncio
import tempfile
import time

import uvloop

from mta import bus
from mta.delivery.engine import Engine, Job
from test_engine import job, mx_to_loopback, settings

BOUND = 20.0
_DIRS = tempfile.TemporaryDirectory(prefix="engine-slots-")


class Limiter:
    """Slots up to the limit; *others* waiting as the test says; calls recorded."""

    def __init__(self, free: bool = True):
        self.free = free            # False: every slot is held by other processes
        self.held = 0
        self.others = False
        self.marks: dict[str, bool] = {}
        self.fail_take = None       # an exception take() raises (EMFILE opening a file)

    def acquire_connection(self, key, limit):
        if not self.free or self.held >= limit:
            return None
        self.held += 1
        return object()

    def release(self, slot):
        self.held -= 1

    def connections(self, key):
        return self.held

    def take(self, key, rate, burst=1, now=None):
        if self.fail_take is not None:
            raise self.fail_take
        return 0.0

    def set_waiting(self, key, waiting):
        self.marks[key] = waiting
        return True

    def others_waiting(self, key, waiting=False):
        return self.others

    def close(self):
        pass


class SlowPeer:
    """A minimal SMTP server offering PIPELINING (the engine then sends a connection's
    next envelope behind each final dot and decides there whether to keep its slot):
    accepts everything, and answers each end of data after *delay* seconds plus *step*
    times the connection's number modulo 4 (connections out of step with each other)."""

    def __init__(self, delay: float, step: float = 0.0):
        self.delay = delay
        self.step = step
        self.connections = 0

    def protocol(self):
        wait = self.delay + self.step * (self.connections % 4)
        self.connections += 1

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                self.t = transport
                self.buf = b""
                self.data = False
                self.lines: asyncio.Queue = asyncio.Queue()
                self.task = asyncio.get_running_loop().create_task(self.serve())
                transport.write(b"220 peer.test ESMTP\r\n")

            def data_received(self, data):
                self.lines.put_nowait(data)

            def connection_lost(self, exc):
                self.task.cancel()

            async def line(self) -> bytes:
                while b"\r\n" not in self.buf:
                    self.buf += await self.lines.get()
                out, _, self.buf = self.buf.partition(b"\r\n")
                return out

            async def serve(self):
                while True:
                    cmd = (await self.line()).upper()
                    if cmd.startswith(b"EHLO"):
                        self.t.write(b"250-peer.test\r\n250 PIPELINING\r\n")
                    elif cmd == b"DATA":
                        self.t.write(b"354 go on\r\n")
                        while await self.line() != b".":
                            pass
                        await asyncio.sleep(wait)
                        self.t.write(b"250 2.0.0 queued\r\n")
                    elif cmd == b"QUIT":
                        self.t.write(b"221 bye\r\n")
                        self.t.close()
                        return
                    else:
                        self.t.write(b"250 ok\r\n")

        return Proto()


def run(main):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(main(), BOUND))


async def engine_for(peer, limiter, processes: int = 2, **delivery):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reports = []
    eng = Engine(settings(port, **delivery), mx_to_loopback("ex.test"),
                 lambda j, rs, retry_after=0.0: reports.append((j, rs)), loop, limiter=limiter)
    eng.processes = processes
    return eng, server, reports


def the_lane(eng):
    (site,) = eng.sites.values()
    (lane,) = site.lanes.values()
    return lane


def test_workers_that_yield_their_slots_at_once_leave_the_lane_its_fair_share():
    """connection_limit 4 over 2 processes (fair share 2); 4 connections busy, then
    another process waits for a slot.  Every worker sees 4 > 2 at its next message and
    decides to yield; each counted the others still there, so all four used to go and
    the lane stood with 28 jobs queued, no connection and no waiting mark until its jobs
    went back to the spool (max_wait, 30 s).  Now two go, and the lane keeps its share."""
    async def main():
        lim = Limiter()
        peer = SlowPeer(0.3, step=0.06)     # each worker checks in its own moment
        eng, server, reports = await engine_for(peer, lim, connection_limit=4)
        n = 40
        for i in range(n):
            eng.submit(job("ex.test", f"a{i}", n=i))
        deadline = time.monotonic() + 5.0
        while not (eng.sites and the_lane(eng).active == 4 and reports):
            assert time.monotonic() < deadline, "the lane did not open its 4 connections"
            await asyncio.sleep(0.05)
        lane = the_lane(eng)
        lim.others = True               # another process now wants a slot
        fewest = 4
        deadline = time.monotonic() + 15.0
        while len(reports) < n:
            assert time.monotonic() < deadline, (len(reports), lane.active, lane.queued())
            await asyncio.sleep(0.05)
            if lane.queued():
                fewest = min(fewest, lane.active)
                assert lane.active >= 1 or lane.retry is not None, "the lane stands still"
        assert all(r.outcome == bus.DELIVERED for _, rs in reports for r in rs)
        # exactly two gave theirs up (the others saw them going): no connection closed
        # below the share and opened again
        assert fewest == 2 and peer.connections == 4, (fewest, peer.connections)
        await eng.close()
        server.close()
        assert eng.in_flight == 0
    run(main)


def test_a_lane_whose_jobs_went_back_while_it_waited_for_a_slot_drops_its_waiting_mark():
    """Every slot held by other processes: the lane marks that it waits and asks again
    later.  When its jobs go back to the spool (max_wait), the lane is forgotten and its
    mark cleared -- a mark left behind made the other processes close their idle
    connections early and keep to their fair share, for as long as this one lived."""
    async def main():
        lim = Limiter(free=False)
        eng, server, reports = await engine_for(SlowPeer(0.0), lim, connection_limit=2)
        eng.submit(job("ex.test", "a", n=0))
        await asyncio.sleep(0.3)
        lane = the_lane(eng)
        assert lane.waiting and lim.marks[lane.key] is True and lane.retry is not None
        eng.max_wait = 0.0
        assert eng.sweep() == 1
        (j, rs), = reports
        assert rs[0].outcome == bus.REQUEUED
        assert lim.marks[lane.key] is False and lane.retry is None
        assert not any(s.lanes for s in eng.sites.values())
        await eng.close()
        server.close()
        assert eng.in_flight == 0
    run(main)


def test_a_worker_that_fails_gives_its_job_back():
    """An unexpected error in a worker (here the node limiter's rate file cannot be
    opened: EMFILE) used to lose the job it held: no outcome went to the spool until its
    job_timeout, and the process's window stayed one job smaller for good."""
    async def main():
        lim = Limiter()
        lim.fail_take = OSError(24, "Too many open files")
        eng, server, reports = await engine_for(SlowPeer(0.0), lim, connection_limit=2,
                                                shaping=[{"domain": "ex.test",
                                                          "max_message_rate": "100/s"}])
        eng.submit(job("ex.test", "a", n=0))
        deadline = time.monotonic() + 5.0
        while not reports:
            assert time.monotonic() < deadline, "no outcome for the job"
            await asyncio.sleep(0.05)
        (j, rs), = reports
        assert rs[0].outcome == bus.REQUEUED and "worker failed" in rs[0].text
        assert eng.in_flight == 0
        await eng.close()
        server.close()
    run(main)


def test_a_domain_whose_lookup_fails_leaves_its_old_site():
    """A domain looked up again (its cached site had expired) whose lookup now fails:
    it used to stay among the old site's domains (and shaped ones), so that site was
    never forgotten and a domain rule kept shaping it."""
    from mta.dns import MxResult

    async def main():
        resolver = mx_to_loopback("ex.test")
        lim = Limiter()
        eng, server, reports = await engine_for(SlowPeer(0.0), lim, connection_limit=2,
                                                idle_timeout=0.1)
        eng.resolver = resolver
        eng.submit(job("ex.test", "a", n=0))
        deadline = time.monotonic() + 5.0
        while not reports:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        (site,) = eng.sites.values()
        assert "ex.test" in site.domains
        resolver.mx["ex.test"] = MxResult("nxdomain", domain="ex.test")
        eng.resolving["ex.test"] = []
        await eng._resolve("ex.test")
        assert "ex.test" not in site.domains and "ex.test" not in eng.domain_site
        while site.lanes:                       # its idle connection closes (idle_timeout)
            assert time.monotonic() < deadline + 5
            await asyncio.sleep(0.05)
        eng.forget_old_sites()
        assert not eng.sites
        await eng.close()
        server.close()
    run(main)


def test_idle_connections_over_a_lowered_limit_close_without_waiting_for_idle_timeout():
    """Four connections to the site, idle (idle_timeout 30 s); a throttle lowers the
    source x site's limit to one: the idle ones over it close now.  They stayed open
    until idle_timeout, while the site that asked for fewer saw them all."""
    from mta.delivery.adaptive import THROTTLE, Entry, entry_id

    peer = SlowPeer(0.3)
    open_now = [0]

    def factory():
        p = peer.protocol()
        lost = p.connection_lost

        def counted(exc):
            open_now[0] -= 1
            lost(exc)
        p.connection_lost = counted
        open_now[0] += 1
        return p

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        reports = []
        eng = Engine(settings(server.sockets[0].getsockname()[1], connection_limit=4,
                              idle_timeout=30.0),
                     mx_to_loopback("ex.test"), lambda j, rs, retry_after=0.0:
                     reports.append(rs[0].outcome), loop)
        for n in range(8):
            eng.submit(job("ex.test", f"ok{n}", n=n))
        while len(reports) < 8:
            await asyncio.sleep(0.05)
        idle = open_now[0]
        lane = the_lane(eng)
        now = time.time()
        eng.adaptive.store.put(Entry(
            id=entry_id(THROTTLE, "source_site", "default", lane.site.name), kind=THROTTLE,
            scope="source_site", source="default", site=lane.site.name, rule="busy",
            created=now, until=now + 600, connection_limit=1))
        eng._relimit()                       # (as a throttle fired here, or read: tick)
        assert lane.limits.connection_limit == 1
        await asyncio.sleep(1.0)
        after = open_now[0]
        await eng.close()
        server.close()
        return reports, idle, after

    reports, idle, after = run(main)
    assert reports == [bus.DELIVERED] * 8
    assert idle == 4 and after == 1, (idle, after)


def shared_site(limit: int, n: int, busy: list[int], turn: float = 0.5):
    """Engines, each with its own node limiter on one directory (they exclude each other
    as delivery processes do), each sending *n* messages to a domain of its own; the
    domains share one site (MX host) limited to *limit* connections, whose server takes
    0.1 s a message.  One engine more than *busy* has entries: they get their mail one
    after the other, each once the one before has *busy[k]* connections busy.  Returns
    (when the last got its mail, [each domain's delivery times], other outcomes, most
    connections open at once, connections made)."""
    from mta.delivery.limits import NodeLimiter
    from mta.dns import MxResult
    from test_engine import Resolver

    peer = SlowPeer(0.1)
    open_now = [0]
    most = [0]
    processes = len(busy) + 1
    domains = [f"d{i}.test" for i in range(processes)]

    def factory():
        p = peer.protocol()
        lost = p.connection_lost

        def counted(exc):
            open_now[0] -= 1
            lost(exc)
        p.connection_lost = counted
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        return p

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        limits = tempfile.mkdtemp(dir=_DIRS.name)
        delivered: dict[str, list[float]] = {d: [] for d in domains}
        other = []

        def report(j, rs, retry_after=0.0):
            for r in rs:
                if r.outcome == bus.DELIVERED:
                    delivered[j.msg.domain].append(time.monotonic())
                else:
                    other.append((j.msg.domain, r.outcome, r.text))
        engines = []
        for _ in domains:
            resolver = Resolver({d: MxResult("ok", [["mx.shared.test"]], domain=d)
                                 for d in domains}, {"mx.shared.test": ["127.0.0.1"]})
            eng = Engine(settings(port, connection_limit=limit, idle_timeout=30.0,
                                  slot_turn=turn),
                         resolver, report, loop, limiter=NodeLimiter(limits))
            eng.processes = processes
            engines.append(eng)
        for k, eng in enumerate(engines):
            t0 = time.monotonic()
            for i in range(n):
                eng.submit(job(domains[k], f"r{i}", n=k * n + i))
            deadline = time.monotonic() + 5.0
            while k < len(busy) and not (eng.sites and the_lane(eng).active == busy[k]
                                         and delivered[domains[k]]):
                assert time.monotonic() < deadline, (k, other)
                await asyncio.sleep(0.02)
        deadline = time.monotonic() + 15.0
        while sum(map(len, delivered.values())) < processes * n:
            assert time.monotonic() < deadline, ({d: len(t) for d, t in delivered.items()},
                                                 other)
            await asyncio.sleep(0.05)
        for eng in engines:
            await eng.close()
        server.close()
        return t0, delivered, other

    t0, delivered, other = run(main)
    return t0, [delivered[d] for d in domains], other, most[0], peer.connections


def test_a_site_limited_below_the_processes_takes_turns_between_them():
    """connection_limit 1, two delivery processes, each with a busy domain of the one
    site.  The fair share rounded up to 1 each, so the process that had the slot kept it
    while it had mail: the other's jobs waited until it drained (in a daemon, max_wait
    and back to the spool, again and again).  Now the holder lets the slot go after its
    turn (slot_turn) while the other holds none, the two take turns, and the site never
    sees two connections."""
    n = 40                                  # 4 s of mail each at 0.1 s a message
    t0, (ta, tb), other, most, made = shared_site(1, n, [1])
    assert not other, other[:5]
    assert len(ta) == len(tb) == n
    assert most == 1, most                  # never two connections to the site
    # b's first message went out within a turn or so of its arrival, while a still had
    # most of its mail queued -- not after a drained
    assert tb[0] - t0 < 2.0, tb[0] - t0
    assert tb[0] < ta[n // 2], "b waited for a to drain"
    # and they took turns: the slot changed hands more than once
    assert made >= 3, made


def test_shares_rounded_up_that_take_every_slot_leave_one_to_a_process_with_none():
    """connection_limit 4 over three processes: the share rounded up is 2, and two
    processes holding 2 each held every slot, each at its share: the third one's mail
    waited for one of them to drain.  Now one above the share rounded down (1) gives a
    slot up at once (no turn: it keeps one) to the process that holds none."""
    n = 80                  # the first two: 4 s and more of mail each on 2 connections
    t0, (ta, tb, tc), other, most, made = shared_site(4, n, [4, 2], turn=30.0)
    assert not other, other[:5]
    assert most <= 4, most
    # the third got a connection at once (turn 30 s: not a turn -- its share), long
    # before either of the others drained
    assert tc[0] - t0 < 1.5, tc[0] - t0
    assert tc[0] < min(ta[-1], tb[-1]) - 1.0, "the third waited for another to drain"


def test_a_message_its_worker_fails_on_again_is_deferred_not_requeued_for_good():
    """A job whose envelope the engine cannot make (here a BODY parameter that is no
    string, as a damaged or foreign spool record would give) failed its worker; the job
    went back REQUEUED, due again in a second, and failed it again: every second for good,
    with a traceback each time, never an attempt counted, never a bounce.  The first
    failure still requeues it (the error may be the worker's, not the message's); the next
    one within WORKER_FAILED_AGAIN defers it with the reason, so the retry schedule and
    max_age take over.  Every other message goes on."""
    from test_engine import BODY, Peer, deliver

    def one(qid: str, local: str, params=None) -> Job:
        return Job(bus.DeliveryMessageReady(0, qid, "s@example.com", "ex.test",
                                            [bus.JobRecipient(0, f"{local}@ex.test")],
                                            params or {}, 1, BODY), b"spool-peer")
    bad = "B" * 20
    peer = Peer()
    reports = deliver([one(bad, "odd1", {"BODY": 5}), one("A" * 20, "ok"),
                       one(bad, "odd2", {"BODY": 5})], mx_to_loopback("ex.test"), peer)
    got = {j.msg.rcpts[0].address: rs[0] for j, rs in reports}
    assert got["ok@ex.test"].outcome == bus.DELIVERED
    # (two workers may take them in either order)
    first, odd = sorted((got["odd1@ex.test"], got["odd2@ex.test"]),
                        key=lambda r: r.outcome != bus.REQUEUED)
    assert first.outcome == bus.REQUEUED
    assert (odd.outcome, odd.code, odd.enhanced) == (bus.DEFERRED, 451, "4.3.0")
    assert odd.text.startswith("the delivery worker failed on this message again: ")
    assert [m[1] for m in peer.messages] == [["ok@ex.test"]]
