"""What every role sets up in mta/proc.py: the diagnostic log line (what the stock
logging.Formatter writes), lines of a loop turn written together, keep_heap and GcSettler."""
import gc
import logging
import os
import random
import subprocess
import sys
import time
import weakref

import pytest

from mta import proc


@pytest.fixture
def handler():
    saved = (logging.logProcesses, logging.logThreads, logging.logMultiprocessing,
             logging._srcfile, logging.getLogRecordFactory(), logging.getLogger().handlers[:],
             logging.getLogger().level)
    proc.setup_logging("info", "delivery[3]")
    yield logging.getLogger().handlers[0]
    (logging.logProcesses, logging.logThreads, logging.logMultiprocessing,
     logging._srcfile, factory, handlers, level) = saved
    logging.setLogRecordFactory(factory)
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_the_line_is_the_stock_formatters_in_any_order_of_times(handler):
    stock = logging.Formatter("%(asctime)s %(levelname)s delivery[3][%(process)d]: %(message)s")
    rnd = random.Random(7)
    base = 1_796_000_000.0
    # times within one second, across seconds, going back (a clock step), far apart
    times = [base + 0.001, base + 0.999, base + 1.0, base + 0.5, base + 86_400.25,
             base + 59.9999] + [base + rnd.uniform(-5e6, 5e6) for _ in range(300)]
    for t in times:
        r = logging.LogRecord("x", logging.WARNING, __file__, 1, "to=<%s> status=%s",
                              ("a@b.test", "sent"), None)
        r.created = t
        r.msecs = int((t - int(t)) * 1000) + 0.0
        r.process = os.getpid()
        assert handler.format(r) == stock.format(r), t


def test_records_are_made_without_the_process_lookups(handler):
    r = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    assert r.process is None and r.thread is None        # not looked up per record
    assert handler.format(r).endswith(f" INFO delivery[3][{os.getpid()}]: m")


def test_the_roles_records_are_the_stock_records(handler, monkeypatch):
    """The record the roles make (proc._Record) has the stock LogRecord's attributes,
    values and order, and formats to the same line, whatever the level, message,
    arguments (a lone mapping too), traceback or stack; a file named, or a switch
    turned on again, and it is the stock record."""
    factory = logging.getLogRecordFactory()
    if sys.version_info[:2] == (3, 11):
        assert factory is proc._Record
    rnd = random.Random(46)
    try:
        raise ValueError("boom\nline")
    except ValueError:
        exc = sys.exc_info()
    texts = ["a", "to=<x@y>", "550 a\nINFO forged\r\x1b[2J\x00 é", "ü", "", "%", "\u2028"]
    shapes = [lambda: ("%s: to=<%s> status=%s (%d %s)", ("Q", rnd.choice(texts),
                                                        rnd.choice(texts), 250, "x")),
              lambda: ("%(a)s and %(b)s", ({"a": rnd.choice(texts), "b": 1},)),
              lambda: ("one %s", (rnd.choice(texts),)), lambda: ("%s", ({},)),
              lambda: (rnd.choice(texts), ()), lambda: (ValueError("v"), ())]
    for _ in range(2000):
        t = 1_796_000_000 + rnd.randrange(10 ** 8) / 1000
        monkeypatch.setattr(time, "time", lambda t=t: t)
        msg, args = rnd.choice(shapes)()
        level = rnd.choice([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 5])
        ei = exc if rnd.random() < 0.05 else None
        sinfo = "Stack (most recent call last):\n  x" if rnd.random() < 0.05 else None
        made = [f("mta.x", level, "(unknown file)", 0, msg, args, ei, "(unknown function)",
                  sinfo) for f in (logging.LogRecord, factory)]
        assert list(made[0].__dict__.items()) == list(made[1].__dict__.items())
        assert handler.format(made[0]) == handler.format(made[1])
        assert list(made[0].__dict__.items()) == list(made[1].__dict__.items())
    monkeypatch.undo()
    r = factory("x", logging.INFO, "/a/b/c.py", 3, "m", (), None)
    assert (r.filename, r.module, r.lineno) == ("c.py", "c", 3)
    monkeypatch.setattr(logging, "logThreads", True)
    assert factory("x", logging.INFO, "(unknown file)", 0, "m", (), None).thread is not None


def test_a_filter_on_the_roles_handler_is_asked(handler):
    stream = _CountingStream()
    handler.setStream(stream)
    handler.addFilter(lambda r: "secret" not in r.getMessage())
    log = logging.getLogger("mta.test")
    log.info("a secret")
    log.info("shown")
    assert len(stream.writes) == 1 and stream.writes[0].endswith(": shown\n")


class _CountingStream:
    """A stream that records each write (one write() system call each, for stderr)."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


@pytest.fixture
def counted(handler):
    """The handler writing to a _CountingStream; (the stream, a logger)."""
    stream = _CountingStream()
    handler.setStream(stream)
    return stream, logging.getLogger("mta.test")


def test_lines_logged_in_a_loop_turn_are_written_together_in_order(handler, counted):
    import asyncio
    stream, log = counted

    async def main():
        for i in range(5):
            log.info("line %d", i)
        assert stream.writes == []              # held until the turn ends
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(stream.writes) == 1
        log.info("line 5")
        log.warning("line 6")                   # a warning: at once, after the held line
        assert len(stream.writes) == 2
        log.info("line 7")
        proc.flush_logging()                    # (a child about to exit)
        assert len(stream.writes) == 3

    asyncio.run(main())
    lines = "".join(stream.writes).splitlines()
    assert [ln.rsplit(": ", 1)[1] for ln in lines] == [f"line {i}" for i in range(8)]
    assert "WARNING" in lines[6] and "INFO" in lines[5]

    # Many lines of one turn: written in pieces of whole lines, none over PIPE_BUF
    # octets (roles share stderr: a bigger write could be split, mid-line, by another's);
    # a line that is not ASCII goes alone.
    stream.writes.clear()

    async def many():
        for i in range(300):
            log.info("to=<r%d@example.net> %s", i, "x" * 100)
        log.info("to=<ü@example.net> status=sent")
        log.info("after")

    asyncio.run(many())
    assert 1 < len(stream.writes) < 20
    for w in stream.writes:
        assert w.endswith("\n") and len(w.encode()) <= handler.PIECE
    assert [w for w in stream.writes if "ü" in w][0].count("\n") == 1
    got = "".join(stream.writes).splitlines()
    assert len(got) == 302 and got[-1].endswith("after") and "ü" in got[-2]


def test_lines_logged_outside_a_loop_are_written_at_once(handler):
    stream = _CountingStream()
    handler.setStream(stream)
    logging.getLogger("mta.test").info("no loop here")
    assert len(stream.writes) == 1 and stream.writes[0].endswith("no loop here\n")


def test_held_lines_of_a_loop_that_stopped_are_written_by_flush_logging():
    """A role whose loop stops in the turn that logged (a crash, a stop) and then
    exits with os._exit, as the supervisor's spawn does, after flush_logging."""
    code = (
        "import asyncio, logging, os, sys\n"
        "from mta import proc\n"
        "proc.setup_logging('info', 'delivery[0]')\n"
        "loop = asyncio.new_event_loop()\n"
        "def turn():\n"
        "    logging.getLogger('x').info('held line')\n"
        "    loop.stop()\n"
        "loop.call_soon(turn)\n"
        "loop.run_forever()\n"
        "if sys.argv[1] == 'flush':\n"
        "    proc.flush_logging()\n"
        "os._exit(3)\n")
    out = {}
    for how in ("flush", "none"):
        r = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 3, r.stderr
        out[how] = r.stderr
    assert "INFO delivery[0]" in out["flush"] and out["flush"].rstrip().endswith("held line")
    assert "held line" not in out["none"]       # (what the flush is for)


def test_keep_heap_stops_the_grow_and_trim_of_every_batch():
    """proc.keep_heap (the events process): a batch of objects built and dropped each
    turn no longer faults fresh pages in every time."""
    code = (
        "import resource, sys\n"
        "from mta import proc\n"
        "if sys.argv[1] == 'keep':\n"
        "    assert proc.keep_heap()\n"
        "def turn():\n"
        "    events = [bytes(800) + str(i).encode() for i in range(3000)]\n"
        "    data = b''.join(events)\n"
        "    big = b'x' * (8 << 20)\n"     # (a big block each turn: not mapped anew)
        "    return len(data) + len(big)\n"
        "turn()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(200):\n"
        "    turn()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {}
    for how in ("keep", "default"):
        r = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        faults[how] = int(r.stdout)
    assert faults["default"] > 200, faults           # (what it is for: some every turn)
    assert faults["keep"] * 10 < faults["default"], faults


def test_held_lines_are_bounded_and_a_new_loop_flushes_what_a_stopped_one_left(handler, counted):
    import asyncio
    stream, log = counted

    async def many():
        for i in range(2500):
            log.info("n %d", i)
        # never more than MAX_HELD lines wait for the end of the turn
        assert 2500 - sum(w.count("\n") for w in stream.writes) < handler.MAX_HELD

    asyncio.run(many())
    assert sum(w.count("\n") for w in stream.writes) == 2500
    stream.writes.clear()
    # a loop that stops in the turn that logged: its flush never runs...
    loop = asyncio.new_event_loop()
    loop.call_soon(lambda: (log.info("left behind"), loop.stop()))
    loop.run_forever()
    loop.close()
    assert stream.writes == []

    # ... and the next loop's lines are not held behind it forever
    async def later():
        log.info("next loop")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        text = "".join(stream.writes)
        assert text.index("left behind") < text.index("next loop")

    asyncio.run(later())


class _Node:
    def __init__(self):
        self.peer = None


def _cycle():
    a, b = _Node(), _Node()
    a.peer, b.peer = b, a
    return a


def test_gc_settler_collects_then_freezes_and_the_full_pass_frees_what_froze():
    s = proc.GcSettler(full_interval=3600.0)
    was_enabled = gc.isenabled()
    gc.disable()            # no automatic collection between the steps below
    try:
        young = weakref.ref(_cycle())       # cyclic garbage made before a settle
        assert young() is not None
        assert s.settle() >= 2 and young() is None
        assert gc.get_freeze_count() > 0    # the survivors are exempt from now on
        holder = [_cycle()]                 # alive at the next settle: frozen
        frozen = weakref.ref(holder[0])
        s.settle()
        del holder                          # now garbage, but frozen
        s.settle()
        assert frozen() is not None, "a frozen cycle is left to the full pass"
        s.next_full = 0.0                   # the full pass is due
        s.settle()
        assert frozen() is None and s.collected_full >= 2
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def test_gc_settler_freezes_the_survivors_of_a_full_collection_at_once():
    s = proc.GcSettler()
    gc.unfreeze()
    before = gc.get_freeze_count()
    s.install()
    s.install()                             # once only
    try:
        assert gc.callbacks.count(s._after_collection) == 1
        kept = [_Node() for _ in range(100)]
        gc.collect(1)                       # a young collection freezes nothing
        assert gc.get_freeze_count() == before
        gc.collect()                        # a full one: its survivors are frozen
        assert gc.get_freeze_count() >= before + len(kept)
    finally:
        s.uninstall()
        gc.unfreeze()
    assert s._after_collection not in gc.callbacks


def test_gc_settler_without_a_full_pass_never_unfreezes():
    """The spool shard's settler (full_interval None): what froze alive stays frozen."""
    s = proc.GcSettler(full_interval=None)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        holder = [_cycle()]
        frozen = weakref.ref(holder[0])
        s.settle()
        del holder
        for _ in range(3):
            s.settle()
        assert frozen() is not None and s.collected_full == 0
    finally:
        gc.unfreeze()
        gc.collect()
        if was_enabled:
            gc.enable()


PRESIZE_CHILD = r"""
import os, resource, threading, time
from mta import proc

def fdsize():
    return int(next(l for l in open("/proc/self/status") if l.startswith("FDSize:")).split()[1])

resource.setrlimit(resource.RLIMIT_NOFILE, (6000, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
before = fdsize()
assert proc.presize_fd_table(5000) == 5000
grown = fdsize()
assert proc.presize_fd_table(50000) == 6000            # capped by the soft limit
capped = fdsize()
keep = os.open(os.devnull, os.O_RDONLY)
os.dup2(keep, 5999)
assert proc.presize_fd_table(6000) == 0                # a number in use is not touched
os.fstat(5999)
threading.Thread(target=time.sleep, args=(10,), daemon=True).start()
fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(5800)]
print(before, grown, capped, fdsize())
"""


def test_presize_fd_table_grows_the_table_once_and_keeps_descriptors_in_use():
    """The descriptor table holds the asked-for count at once (FDSize in /proc), capped
    by RLIMIT_NOFILE; a descriptor number in use is not touched; opening nearly that
    many afterwards, with a second thread running, does not grow the table again (no
    doubling, so none of the RCU waits a doubling costs a threaded process)."""
    r = subprocess.run([sys.executable, "-c", PRESIZE_CHILD], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert r.returncode == 0, r.stderr
    before, grown, capped, after = map(int, r.stdout.split())
    assert before < 5000 <= grown
    assert capped >= 6000
    assert after == capped


def test_a_new_child_ignores_sighup_until_its_role_takes_it():
    # The supervisor SIGHUPs the spool shards at a reload; one just forked, before it
    # installed its handler, must not be ended by it (SIG_DFL terminates)
    import subprocess
    import sys
    code = ("import os, signal, time\n"
            "from mta import proc\n"
            "proc.start_role('spool', 0, 'warning')\n"
            "assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN\n"
            "os.kill(os.getpid(), signal.SIGHUP)\n"
            "time.sleep(0.1)\n"
            "print('alive')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == b"alive", r


def test_clock_step_watch_reports_a_step_back_once_and_never_a_forward_one():
    t = {"wall": 1_800_000_000.0, "mono": 100.0}
    w = proc.ClockStepWatch(wall=lambda: t["wall"], mono=lambda: t["mono"])
    t["wall"] += 1.0005                 # slewed: a second and a half millisecond
    t["mono"] += 1.0
    assert w.stepped_back() == 0.0
    t["wall"] -= 3599.0                 # a second later, stepped back an hour
    t["mono"] += 1.0
    assert w.stepped_back() == pytest.approx(3600.0)
    assert w.stepped_back() == 0.0      # (reported once)
    t["wall"] += 86400.0                # forward (a resume from suspend looks the same)
    assert w.stepped_back() == 0.0


def test_a_logged_message_is_one_printable_line_and_a_traceback_keeps_its_lines():
    # (someone else's text in a message -- a server's reply, a client's address -- must
    # not write lines of its own, nor CR / ESC sequences for a terminal)
    f = proc._Formatter("%(levelname)s x: %(message)s")
    rec = logging.LogRecord("t", logging.INFO, "", 0, "reply (%s)", ("550 a\nINFO forged\r\x1b[2J\x00 é",),
                            None)
    assert f.format(rec) == "INFO x: reply (550 a\\nINFO forged\\r\\x1b[2J\\x00 é)"
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("t", logging.ERROR, "", 0, "failed: %s", ("a\nb",),
                                sys.exc_info())
    out = f.format(rec).split("\n")
    assert out[0] == "ERROR x: failed: a\\nb" and out[1] == "Traceback (most recent call last):"
    assert out[-1] == "ValueError: boom"


SIGTERM_CHILD = r"""
import asyncio, os, signal, sys, uvloop
from mta import proc
loop = uvloop.new_event_loop()
asyncio.set_event_loop(loop)
stop = asyncio.Event()
proc.on_sigterm(loop, stop.set)
if sys.argv[1] == "before":
    os.kill(os.getpid(), signal.SIGTERM)     # before the loop has run at all

async def main():
    if sys.argv[1] == "after":
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(stop.wait(), 5)
    print("stopped", flush=True)
loop.run_until_complete(main())
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_sigterm_before_or_after_the_loop_runs_reaches_the_role(when):
    # uvloop took a SIGTERM that came between add_signal_handler and the loop's first run
    # and never called the handler: an acceptor told to stop while it started (a reload)
    # ran on with the configuration it was replaced for until the supervisor killed it
    r = subprocess.run([sys.executable, "-c", SIGTERM_CHILD, when], capture_output=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout == b"stopped\n", r
