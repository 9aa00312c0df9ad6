"""A fake event loop, TCP transport and spool for driving SMTP sessions without sockets.

One fake for everything that runs :class:`mta.acceptor.smtp.Session` in process:
the session's unit tests (this directory) and the in-process benchmark
(``bench/test_bench_session.py``, which keeps the real bus client and answers
from an in-process spool socket instead of :class:`Acceptor` below).

- :class:`Loop` has the parts of an asyncio loop the acceptor uses.  Nothing
  runs by itself: callbacks (spool answers, AUTH checks, the STARTTLS
  handshake) wait until :meth:`Loop.run_ready`, so a test decides when an
  iteration of the loop ends, and time moves only when a test sets ``now``.
- :class:`Transport` keeps what is written, and says whether the session
  paused reading, closed or aborted the connection.
- :class:`Acceptor` is the real acceptor with the spool replaced: ``submit()``
  records each message (with its Received header) and ``commit_events()`` each
  batch of events (a policy rejection's), and answers them ok, not ok, or not
  yet, as the test says.
"""
from __future__ import annotations

import dataclasses

import msgspec

from mta import config, native
from mta.acceptor import main as acceptor_main
from mta.passwords import MIN_ITERATIONS, hash_password, parse_password_file
from mta.queueid import new_qid

HOSTNAME = "mx.test"
PEER = ("127.0.0.1", 12345)


class Loop:
    """The parts of an asyncio loop the acceptor uses; callbacks run when run_ready() says."""

    def __init__(self):
        self.ready: list = []
        self.timers: list = []      # (delay, callback, args) of call_later, never run
        self.now = 0.0
        self.tls_fails = False      # make the next STARTTLS handshake fail

    def time(self) -> float:
        return self.now

    def call_soon(self, cb, *args):
        self.ready.append((cb, args))

    def call_later(self, delay, cb, *args):
        # timers never fire: tests call the periodic checks (or a recorded timer) themselves
        self.timers.append((delay, cb, args))

    def add_reader(self, fd, cb):
        pass

    def remove_reader(self, fd):
        pass

    def run_in_executor(self, executor, fn, *args):
        """Run *fn* now; its done-callbacks run at the end of the loop iteration."""
        return _Done(self, fn, args)

    def create_task(self, coro):
        self.call_soon(_run_to_end, coro)

    async def start_tls(self, transport, protocol, ssl_context, *, server_side=False,
                        ssl_handshake_timeout=None):
        """The handshake: a new transport on the same connection, or an error."""
        if self.tls_fails:
            raise ConnectionResetError("handshake failed")
        return transport.upgraded()

    def run_ready(self) -> None:
        """One loop iteration: run the callbacks scheduled so far (and those they schedule)."""
        ready = self.ready
        while ready:
            batch = ready[:]
            ready.clear()
            for cb, args in batch:
                cb(*args)


class _Done:
    """A future whose work is already done (run_in_executor's)."""

    def __init__(self, loop: Loop, fn, args):
        self._loop = loop
        try:
            self._result, self._error = fn(*args), None
        except Exception as exc:  # handed to result(), as a real future does
            self._result, self._error = None, exc

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result

    def add_done_callback(self, cb):
        self._loop.call_soon(cb, self)


def _run_to_end(coro) -> None:
    """Run a coroutine that does not suspend (the fake loop's awaitables never do)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise AssertionError("a coroutine waited on something the fake loop does not provide")


class Transport:
    """A TCP transport that keeps what is written (write is list.append: no frame per call)."""

    def __init__(self, peer=PEER, written: list | None = None):
        self.written: list[bytes] = [] if written is None else written
        self.write = self.written.append
        self.peer = peer
        self.tls = False
        self.reading = True
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.written_at_close: int | None = None   # len(written) when it was closed
        self.protocol = None

    def connect(self, protocol) -> None:
        """Make the connection: the protocol's connection_made(), as a server does."""
        self.protocol = protocol
        protocol.connection_made(self)

    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self.peer
        if name == "sockname":
            return ("127.0.0.1", 25)
        return default

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def close(self):
        if not self.closed:
            self.closed = True
            self.written_at_close = len(self.written)

    def abort(self):
        self.close()
        self.aborted = True

    def can_write_eof(self) -> bool:
        return not self.tls     # as asyncio's and uvloop's TLS transports

    def write_eof(self):
        """The session is done writing (a lingering close): it counts as closed here."""
        self.eof_written = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def upgraded(self) -> Transport:
        """The transport after a STARTTLS handshake: same connection, same record of writes."""
        tls = Transport(self.peer, self.written)
        tls.tls = True
        tls.protocol = self.protocol
        return tls


# --------------------------------------------------------------- the acceptor


def settings(smtp: dict | None = None, auth: dict | None = None, hostname: str = HOSTNAME):
    """Built-in default settings with [smtp] keys replaced and optional AUTH users.

    *smtp* values are not checked against the schema's bounds, so unit tests
    can use small limits (a 40-octet command line) that a config file may not.
    """
    base = config.load(None)
    cfg = base.config
    if smtp:
        cfg = msgspec.structs.replace(cfg, smtp=msgspec.structs.replace(cfg.smtp, **smtp))
    users = {}
    if auth:
        users = parse_password_file("".join(
            f"{user}:{hash_password(password, MIN_ITERATIONS)}\n"
            for user, password in auth.items()))
    return dataclasses.replace(base, config=cfg, hostname=hostname, auth_users=users)


@dataclasses.dataclass
class Submitted:
    """One message as it reached Acceptor.submit()."""

    qid: str
    sender: str
    rcpts: list
    params: dict
    client: str
    received: bytes
    message: bytes
    peer: str
    add_missing: bool = False       # smtp.add_missing_headers applies to it


TLS_CONTEXT = object()   # stands for an ssl.SSLContext: the fake loop's start_tls ignores it


class Acceptor(acceptor_main.Acceptor):
    """The real acceptor whose spool is a list: submit() records and answers as told.

    ``answer`` is "ok" (the shard has it on disk), "fail" (storage error,
    back-pressure or timeout: all look alike to the session) or "hold" (no
    answer until :meth:`answer_held`).  Answers arrive at the end of the loop
    iteration, as the bus delivers them.
    """

    def __init__(self, settings, loop: Loop, pure: bool = False, tls: bool = False):
        super().__init__(settings, 0, loop)
        self.scanner_mod = native.load("scanner", pure=pure)
        if tls:
            self.ssl_context = TLS_CONTEXT
        self.answer = "ok"
        self.submitted: list[Submitted] = []
        self.events: list[tuple[str, list]] = []     # (key, events) given to commit_events
        self.held: list = []

    def submit(self, sender, rcpts, params, client_info, message, trace, done, peer="",
               message_id=None, add_missing=False):
        qid = new_qid(self.slot)
        self.submitted.append(Submitted(qid, sender, list(rcpts), dict(params), client_info,
                                        trace(qid), message, peer, add_missing))
        if self.answer == "hold":
            self.held.append((done, qid))
        else:
            self.loop.call_soon(done, qid, self.answer == "ok")
        return qid

    def commit_events(self, key, events, done, what):
        self.events.append((key, list(events)))
        if self.answer == "hold":
            self.held.append((lambda _key, ok: done(ok), key))
        else:
            self.loop.call_soon(done, self.answer == "ok")

    def answer_held(self, ok: bool) -> None:
        """Answer every held message (at the end of this loop iteration)."""
        for done, qid in self.held:
            self.loop.call_soon(done, qid, ok)
        self.held.clear()
