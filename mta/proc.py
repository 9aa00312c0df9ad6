"""What every role does when it starts in a freshly forked child.

``start_role`` sets the process title (``mta: spool[2]``), resets the signal
dispositions inherited from the supervisor and configures logging.
``report_ready`` tells the supervisor, over the pipe it handed down, that the
role has finished starting (sockets bound, spool recovered).
"""
from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Mapping

import setproctitle

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _escaped(text: str) -> str:
    """*text* with each character that is not printable written as its escape
    (``\\n``, ``\\r``, ``\\x1b``, ``\\u2028``)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class _Formatter(logging.Formatter):
    """logging.Formatter's line, with the time's text made once a second.

    A delivery process logs a line per recipient (as Postfix's smtp does); the
    stock formatTime calls localtime() and strftime() for each of them.

    A message is one line, printable: much of what is logged is someone else's
    text -- a receiving server's reply (its lines joined with LF), a client's
    addresses, a report's fields -- and a line break there would write a line
    of its choosing (a forged "status=sent", an address for a log watcher to
    ban), a CR or an ESC sequence would rewrite what a terminal shows.  Such
    characters are written escaped (``\\n``, ``\\x1b``).  A traceback, which
    follows the message, keeps its lines.  Costs one str.isprintable() per line.
    """

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self._second = -1
        self._text = ""
        self._uses_time = self.usesTime()

    def format(self, record):
        # logging.Formatter.format's steps, in one call, for a record with no
        # traceback or stack to add (every other record takes the stock path):
        # the same text.
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        message = record.getMessage()
        record.message = message if message.isprintable() else _escaped(message)
        if self._uses_time:
            record.asctime = self.formatTime(record)
        try:
            return self._fmt % record.__dict__
        except KeyError:        # (a field the record lacks: the stock error)
            return super().format(record)

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._text, record.msecs)

    def formatMessage(self, record):
        if not record.message.isprintable():
            record.message = _escaped(record.message)
        return super().formatMessage(record)


class _TurnHandler(logging.StreamHandler):
    """StreamHandler whose lines logged inside a running event loop are written
    together at the end of the loop's turn.

    A delivery process logs a line per recipient: one write() each was about
    4 % of its CPU under load.  Lines logged outside a loop (the spool's and the
    events process's own pollers, threads, start and stop), and warnings and
    errors, are written at once, after any held lines, so the order is kept.
    At most MAX_HELD lines wait.  :func:`flush_logging` writes what is held
    (before a child exits).
    """

    MAX_HELD = 1000
    PIECE = 4096                # octets of lines written together (PIPE_BUF)

    def __init__(self, stream):
        super().__init__(stream)
        self._held: list[str] = []
        self._scheduled = None      # the loop a flush is scheduled on

    def emit(self, record):
        try:
            held = self._held
            held.append(self.format(record))
            if record.levelno < logging.WARNING and len(held) < self.MAX_HELD:
                loop = asyncio._get_running_loop()
                if loop is not None:
                    # (a loop that stopped before its flush ran, and another one
                    # runs now: that one flushes)
                    if self._scheduled is not loop:
                        self._scheduled = loop
                        loop.call_soon(self._turn_end)
                    return
            self._write()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self):
        self.acquire()
        try:
            self._scheduled = None
            self._write()
        finally:
            self.release()

    def _turn_end(self):
        try:
            self.flush()
        except (OSError, ValueError):
            pass        # stderr is gone or closed: there is nowhere to say so

    def _write(self):
        """Write the held lines in pieces of at most PIECE octets, each ending a line.

        All roles share the supervisor's stderr (a pipe, or journald's socket):
        a write of up to PIPE_BUF (4096) octets is never split, so the lines of
        two processes never interleave mid-line, as with one write per line.
        """
        held = self._held
        if held:
            stream = self.stream
            piece: list[str] = []
            size = 0
            for line in held:
                n = len(line) + 1
                if piece and (size + n > self.PIECE or not line.isascii()):
                    stream.write("\n".join(piece) + "\n")
                    stream.flush()
                    piece, size = [], 0
                piece.append(line)
                size += n if line.isascii() else self.PIECE    # (octets unknown: alone)
            stream.write("\n".join(piece) + "\n")
            held.clear()
        if hasattr(self.stream, "flush"):
            self.stream.flush()


_UNKNOWN_FILE = "(unknown file)"        # logging's pathname when no caller is looked up


class _Record(logging.LogRecord):
    """logging.LogRecord (Python 3.11's), made without the steps whose answers
    setup_logging makes known.

    With no caller looked up, every record's file is "(unknown file)", and the
    stock record still takes its basename and splitext (four calls) for its
    filename and module, the same text; with the thread, process and
    multiprocessing look-ups off, it tests three switches for fields that are
    None.  This one sets the same attributes to the same values, in the same
    order; a record naming a file, or made with a switch turned on again, is
    made by LogRecord itself.  (About 7,000 instructions of a line's ~45,000.)
    """

    def __init__(self, name, level, pathname, lineno, msg, args, exc_info, func=None,
                 sinfo=None, **kwargs):
        if (pathname != _UNKNOWN_FILE or logging.logThreads or logging.logProcesses
                or logging.logMultiprocessing):
            super().__init__(name, level, pathname, lineno, msg, args, exc_info, func, sinfo,
                             **kwargs)
            return
        ct = time.time()
        self.name = name
        self.msg = msg
        if args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]      # (the record's "%(key)s" form)
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.levelno = level
        self.pathname = pathname
        self.filename = pathname            # (its basename,
        self.module = pathname              # without an extension)
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func
        self.created = ct
        self.msecs = int((ct - int(ct)) * 1000) + 0.0
        self.relativeCreated = (ct - logging._startTime) * 1000
        self.thread = None
        self.threadName = None
        self.processName = None
        self.process = None


def alive(pid: int) -> bool:
    """Whether process *pid* runs: it exists (ours or another user's) and is not a
    zombie (exited, not yet reaped).  A pid reused since is taken for alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def title(pid: int) -> str:
    """The process title of *pid* (``mta: spool[0]``: its first argument); "" if it is
    gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")[0].decode("utf-8", "replace")
    except OSError:
        return ""


def holds_open(pid: int, path: str) -> bool | None:
    """Whether process *pid* has the file at *path* open; None when that cannot be
    told (its descriptors cannot be read: another user's, or it is gone; no such file)."""
    try:
        want = os.stat(path)
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue            # (closed meanwhile)
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


def flush_logging() -> None:
    """Write every log line still held for the end of a loop turn."""
    for h in logging.getLogger().handlers:
        h.flush()


def setup_logging(level: str, name: str) -> None:
    """Diagnostic log to stderr: time, level, process name and id, message.

    The process id is written into the format here, in the process that logs
    (each role calls this after the fork), so records need not look it up;
    nor the thread, the multiprocessing name or the calling function, which
    the line does not show.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None         # (documented: skips the caller's frame lookup)
    if sys.version_info[:2] == (3, 11):      # (the LogRecord it follows)
        logging.setLogRecordFactory(_Record)
    handler = _TurnHandler(sys.stderr)
    handler.setFormatter(_Formatter(
        f"%(asctime)s %(levelname)s {name}[{os.getpid()}]: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))


def set_log_level(level: str) -> None:
    """Log at *level* from now on (a reload's server.log_level, in a process it does not
    replace)."""
    logging.getLogger().setLevel(_LEVELS.get(level, logging.INFO))


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3    # mallopt (glibc malloc.h)


def keep_heap(trim_threshold: int = 64 << 20, top_pad: int = 16 << 20,
              mmap_threshold: int = 32 << 20) -> bool:
    """Have glibc keep freed heap memory for reuse instead of giving it back at once.

    A role that builds and drops a large batch of objects every turn (the
    events process: a poll's events, shaped, encoded twice) otherwise grows
    and trims the heap each time: 4 page faults per message end to end, a
    tenth of that with this.  Its resident size then stays at its peak (plus
    *top_pad*, at most *trim_threshold* of free memory) rather than falling
    back between batches.  Setting these turns glibc's own adjustment of the
    mmap threshold off, which would leave it at 128 KiB and map (and fault in)
    every bigger block anew: it is set to the most that adjustment would
    reach, *mmap_threshold*.  False where the C library has no mallopt (not
    glibc): nothing changes.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(_M_MMAP_THRESHOLD, mmap_threshold), mallopt(_M_TRIM_THRESHOLD,
                                                                    trim_threshold),
                mallopt(_M_TOP_PAD, top_pad)])


_PR_SET_PDEATHSIG = 1        # prctl(2), linux/prctl.h


def die_with_parent(parent: int) -> None:
    """In a child just forked by *parent* (the supervisor): be sent SIGTERM when it dies.

    A supervisor killed with SIGKILL (outside systemd, which stops the whole
    cgroup) would otherwise leave its children running for good, holding the
    listening sockets and the spool shards; the next ``mta serve`` would find its
    ports taken, or, on other ports, start a second writer of each shard.  SIGTERM
    is each role's own stop (drain, then exit).  The parent may already be gone
    between fork and prctl: then the child exits at once.
    """
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass            # not Linux: the shard lock (mta.spool.shard) still keeps writers apart
    if os.getppid() != parent:
        os._exit(1)


GC_SETTLE_INTERVAL = 1.0     # seconds between settling collections (GcSettler)
GC_FULL_INTERVAL = 300.0     # seconds between full collections of everything, frozen too


class GcSettler:
    """Keep the cyclic collector's pauses short in a process that holds many
    long-lived objects (an acceptor with thousands of open connections).

    Why: left alone, the collector's full collections walk every tracked object
    alive; with 10,000 keep-alive HTTP connections an acceptor's took 31-83 ms,
    several times in 10 s, and every request waiting on that loop waited too: the
    p99 at a fixed rate was 122 ms (bench/RESULTS.md, "The acceptor's collector
    with 10,000 connections").  So, once a second (:meth:`settle`): collect what
    the last second left (only objects not frozen yet are walked), then freeze
    the survivors, so later collections skip them; and the survivors of every
    full collection the interpreter makes by itself are frozen at once
    (:meth:`install`), so that when thousands of connections arrive together
    each full collection walks only what came since the one before, not all of
    them again.  Frozen objects are still freed by reference counting when their
    connection ends; only a reference cycle among them that becomes garbage
    after it was frozen would stay, so every *full_interval* seconds (in
    :meth:`settle`) everything is unfrozen and collected once (one full-length
    pause every few minutes instead of every few seconds).  Measured on
    connection churn, that garbage is well under one object per closed
    connection.
    """

    def __init__(self, settle_interval: float = GC_SETTLE_INTERVAL,
                 full_interval: float | None = GC_FULL_INTERVAL):
        """*full_interval* None: never unfreeze (a process whose long-lived objects
        form no reference cycles: the spool shard's)."""
        self.settle_interval = settle_interval
        self.full_interval = full_interval
        self.next_full = (time.monotonic() + full_interval if full_interval is not None
                          else float("inf"))
        self.collected_full = 0          # garbage the full collections found (a leak check)

    def settle(self) -> int:
        """One turn: a full collection and a re-freeze when one is due, else a collection
        of the unfrozen objects and a freeze of what survived.  Returns what was collected."""
        now = time.monotonic()
        if now >= self.next_full:
            self.next_full = now + self.full_interval
            gc.unfreeze()
            n = gc.collect()
            self.collected_full += n
        else:
            n = gc.collect()
        gc.freeze()
        return n

    @staticmethod
    def _after_collection(phase: str, info: dict) -> None:
        # (Called once the collection is over: freezing only moves list heads.)
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()

    def install(self) -> None:
        """Freeze the survivors of every full collection as soon as it ends."""
        if self._after_collection not in gc.callbacks:
            gc.callbacks.append(self._after_collection)

    def uninstall(self) -> None:
        while self._after_collection in gc.callbacks:
            gc.callbacks.remove(self._after_collection)

    def run_on(self, loop) -> None:
        """Freeze after full collections, and settle every settle_interval seconds, on
        the asyncio *loop*."""
        self.install()

        def turn():
            self.settle()
            loop.call_later(self.settle_interval, turn)
        loop.call_later(self.settle_interval, turn)


FD_TABLE_MARGIN = 1024     # descriptors beyond the connections: bus sockets, files, databases


def presize_fd_table(n: int) -> int:
    """Make this process's descriptor table hold *n* descriptors now, while it has one
    thread; returns the size asked for (capped by RLIMIT_NOFILE), or 0 if not done.

    Why: the kernel doubles a process's descriptor table as descriptors are opened, and
    in a process of more than one thread every doubling waits for an RCU grace period.
    An acceptor (it has ZeroMQ's I/O thread) taking thousands of connections at once
    stalled 20-95 ms in the kernel (synchronize_rcu) at each doubling, at 256, 512, ...,
    8192 descriptors (bench/RESULTS.md, "The acceptor's descriptor table"); a delivery
    process opening connections to slow receivers grows its table the same way.  With one
    thread no grace period is waited for, and the table never shrinks: asked for here
    once, it costs 8 octets per slot and never stalls later.  A descriptor number is
    duplicated to n - 1 and closed again (only if that number is not in use).
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        n = min(n, soft)
    if n < 2:
        return 0
    try:
        fcntl.fcntl(n - 1, fcntl.F_GETFD)
        return 0            # (in use: the table is that large already)
    except OSError:
        pass
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(fd, n - 1, inheritable=False)
        os.close(n - 1)
    except OSError:
        return 0
    finally:
        os.close(fd)
    return n


def start_role(role: str, index: int | None, log_level: str) -> str:
    """Title, signals and logging for a new child; returns its display name."""
    name = f"{role}[{index}]" if index is not None else role
    setproctitle.setproctitle(f"mta: {name}")
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # SIGUSR1 (reopen the event log) and SIGUSR2 (upgrade) are the supervisor's too, but
    # logrotate's `systemctl kill -s USR1` signals every process of the unit: with the
    # default action each child died.  The events process installs its own SIGUSR1 handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # Ctrl-C in a terminal reaches the whole process group; only the supervisor acts on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP is the supervisor's (a reload); a child that takes it (the spool shards)
    # installs its handler when it can act on it -- until then one must not end it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(log_level, name)
    return name


def on_sigterm(loop, callback) -> None:
    """``loop.add_signal_handler(SIGTERM, callback)`` without losing a SIGTERM that comes
    before *loop* runs.  uvloop (0.23) installs the handler's Python-level stand-in at
    once but reads the signals it catches only from its first run: one that arrives in
    between is taken by the stand-in and *callback* is never called -- a child told to
    stop while it started (a reload, a stop) ran on, greeting clients with the
    configuration it was replaced for, until the supervisor killed it.  Until the loop's
    first turn a plain handler notes a SIGTERM; then the loop's own handler is
    installed, and a noted one is acted on."""
    noted = []
    signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))

    def install() -> None:
        loop.add_signal_handler(signal.SIGTERM, callback)
        if noted:
            callback()
    loop.call_soon(install)


def report_ready(fd: int | None, keep: bool = False) -> None:
    """Tell the supervisor this child is up.  *keep*: the pipe stays open for
    :func:`report_stopped_accepting` (an acceptor)."""
    if fd is None:
        return
    try:
        os.write(fd, b"R")
    finally:
        if not keep:
            os.close(fd)


def report_stopped_accepting(fd: int | None) -> None:
    """Tell the supervisor, over the pipe kept open by ``report_ready(fd, keep=True)``,
    that this acceptor has closed its listeners: a reload is done only then (the
    listening sockets are shared with the successor, which takes every connection
    from now on).  Its exit says the same (the pipe's end)."""
    if fd is None:
        return
    try:
        os.write(fd, b"S")
    except OSError:
        pass
    finally:
        os.close(fd)


CLOCK_STEP = 2.0    # seconds the wall clock must fall behind the monotonic one to count


class ClockStepWatch:
    """Notices the wall clock (``time.time``) being stepped back (NTP/chrony after a
    boot with the clock ahead, an operator's ``date -s``), against the monotonic clock.

    Times kept as wall-clock instants (a retry's due time, a pause's end) then come
    later by the step than they were meant to: a queue waits that much longer.  A
    step forward is not reported: the monotonic clock stops while the machine is
    suspended, so a resume looks just like one, and the time that passed then is real.
    """

    __slots__ = ("offset", "wall", "mono", "least")

    def __init__(self, wall=None, mono=None, least: float = CLOCK_STEP):
        # (None: time.time and time.monotonic, looked up at each call)
        self.wall, self.mono, self.least = wall, mono, least
        self.offset = self._offset()

    def _offset(self) -> float:
        return (self.wall or time.time)() - (self.mono or time.monotonic)()

    def stepped_back(self) -> float:
        """Seconds the wall clock went back since the last call (0.0: none, or less than
        *least*: NTP's slewing moves it by at most half a millisecond a second)."""
        offset = self._offset()
        back = self.offset - offset
        self.offset = offset
        return back if back >= self.least else 0.0


def replace_file(path: str, data: bytes, *, durable: bool = False) -> None:
    """Replace the file *path* with *data* (readers see the old or the new one) through a
    temporary name of this process's own (``<path>.<pid>.tmp``): during a reload the old
    (draining) and the new process of one role write the same files, and through one
    shared name each would truncate, fill or rename the other's.  *durable*: fsync the
    file before the rename (the caller syncs the directory).  The temporary file is
    removed when the write fails."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
