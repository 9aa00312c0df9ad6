"""Receiving mail servers for delivery tests, on loopback only.

- :class:`AioSink`: aiosmtpd in a thread, with scriptable replies.  It records
  every connection, every RCPT it was offered (with the reply it gave) and
  every completed transaction (:class:`Txn`: envelope and the exact bytes of
  the message as received, dot-unstuffed, CRLF kept).  It offers SMTPUTF8
  unless made with ``smtputf8=False`` (a peer that has not heard of RFC 6531).
- :class:`SmtpSink`: Postfix's ``smtp-sink`` (our own child, stopped by its
  PID) dumping every transaction to a file (``-d``); :meth:`SmtpSink.messages`
  parses the dumps (see smtp-sink(1), DUMP FILE FORMAT: its own X-* headers
  and a three-line Received header, then the message with LF line ends, then
  one empty line).

Several receivers listen on distinct loopback addresses (127.0.0.10, .11, ...)
on one port (:func:`common_port`), which is the daemon's ``delivery.mx_port``.
"""
from __future__ import annotations

import asyncio

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from daemon import wait_until

SMTP_SINK = "/usr/sbin/smtp-sink"

_QID_RE = re.compile(rb"^Received: [^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*?[ \t]*by \S+ \(mta\) "
                     rb"with [A-Z]+ id ([0-9A-F]{20})[;\r\n]")


def common_port(ips, tries: int = 50) -> int:
    """A TCP port free on every address in *ips* right now."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        ok = True
        for ip in ips:
            with socket.socket() as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError(f"no common free port on {ips}")


def qid_of(message: bytes) -> str | None:
    """The queue id in the Received header our acceptor put at the top of *message*."""
    m = _QID_RE.match(message)
    return m.group(1).decode() if m else None


@dataclass
class Txn:
    """One transaction a receiver completed (it answered the end of data)."""

    server_ip: str
    conn: int                 # connection number at this receiver
    client_ip: str
    mail_from: str
    mail_options: list
    rcpt_tos: list
    data: bytes
    reply: str
    at: float = field(default_factory=time.time)


class _CountingSMTP(SMTP):
    def __init__(self, sink: "AioSink", *a, **kw):
        super().__init__(*a, **kw)
        self._sink = sink
        self._conn_no = 0

    def connection_made(self, transport):
        peer = transport.get_extra_info("peername")
        with self._sink.lock:
            sink = self._sink
            sink.connections += 1
            self._conn_no = sink.connections
            sink.open_now += 1
            sink.max_open = max(sink.max_open, sink.open_now)
            sink.conn_clients[self._conn_no] = peer[0] if peer else ""
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc):
        if getattr(self, "_counted", False):
            self._counted = False
            with self._sink.lock:
                self._sink.open_now -= 1
        super().connection_lost(exc)


    def _getparams(self, params):
        # A DSN sink takes RFC 3461's parameters (aiosmtpd knows none of them): they
        # stay in the options it records and are left out of its "unknown" check.
        result = super()._getparams(params)
        if result is not None and self._sink.dsn:
            for key in ("NOTIFY", "ORCPT", "ENVID", "RET"):
                result.pop(key, None)
        return result


class _Controller(Controller):
    def __init__(self, sink, *a, **kw):
        self._sink = sink
        super().__init__(*a, **kw)

    def factory(self):
        return _CountingSMTP(self._sink, self.handler, **self.SMTP_kwargs)


class AioSink:
    """aiosmtpd on *ip*:*port*.

    ``rcpt(sink, address, mail_from) -> reply or None`` decides each RCPT
    (None accepts); ``data(sink, txn) -> reply or None`` the end of data (None:
    ``250 2.0.0 ok``; a non-2xx reply is recorded in :attr:`rejected`, not in
    :attr:`txns`).  Both may be replaced while the server runs.
    """

    def __init__(self, ip: str, port: int, rcpt=None, data=None, name: str = "",
                 dsn: bool = False, tls_context=None, smtputf8: bool = True):
        self.ip, self.port, self.name = ip, port, name or ip
        self.dsn = dsn                # offer DSN (RFC 3461) and take its parameters
        self.rcpt_params: list[tuple[str, list]] = []   # (address, RCPT parameters), dsn only
        self.rcpt = rcpt
        self.data = data
        self.lock = threading.Lock()
        self.connections = 0
        self.open_now = 0             # connections open at this moment
        self.max_open = 0             # the most that were ever open at once
        self.conn_clients: dict[int, str] = {}   # connection number -> client IP
        self.delay = 0.0              # seconds each end of data waits before its reply
        self.txns: list[Txn] = []
        self.rejected: list[Txn] = []
        self.rcpt_log: list[tuple[str, str, str]] = []   # (mail_from, address, reply)
        # tls_context (an ssl.SSLContext with its certificate): STARTTLS is offered
        tls = {"tls_context": tls_context} if tls_context is not None else {}
        self.ctl = _Controller(self, (_DsnHandler if dsn else _Handler)(self),
                               hostname=ip, port=port,
                               enable_SMTPUTF8=smtputf8, ready_timeout=10, **tls)

    def start(self) -> "AioSink":
        self.ctl.start()
        # The controller's own trigger connection does not count.
        wait_until(lambda: self.open_now == 0, 5.0, "the trigger connection to close")
        with self.lock:
            self.connections = 0
            self.max_open = 0
            self.conn_clients.clear()
        return self

    def stop(self) -> None:
        try:
            self.ctl.stop()
        except Exception:
            pass

    def snapshot(self) -> list[Txn]:
        with self.lock:
            return list(self.txns)

    def received(self) -> int:
        with self.lock:
            return len(self.txns)

    def wait_for(self, rcpt: str, timeout: float = 30.0) -> Txn:
        """The first completed transaction that had *rcpt* among its recipients (waits)."""
        def find():
            return next((t for t in self.snapshot() if rcpt in t.rcpt_tos), None)
        return wait_until(find, timeout, f"{rcpt} at the receiver {self.name}", interval=0.05)

    def deliveries(self) -> list[tuple[str, str, Txn]]:
        """(qid, recipient, txn) for every recipient of every completed transaction."""
        out = []
        for t in self.snapshot():
            q = qid_of(t.data)
            for r in t.rcpt_tos:
                out.append((q, r, t))
        return out


def _null(mail_from: str) -> str:
    """aiosmtpd gives the null reverse-path as "<>"; we record it as ""."""
    return "" if mail_from == "<>" else mail_from


class _Handler:
    def __init__(self, sink: AioSink):
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        s = self.sink
        reply = s.rcpt(s, address, _null(envelope.mail_from)) if s.rcpt else None
        reply = reply or "250 2.1.5 ok"
        with s.lock:
            s.rcpt_log.append((_null(envelope.mail_from), address, reply))
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server, session, envelope):
        s = self.sink
        txn = Txn(s.ip, server._conn_no, session.peer[0], _null(envelope.mail_from),
                  list(envelope.mail_options), list(envelope.rcpt_tos),
                  envelope.original_content, "")
        if s.delay:
            await asyncio.sleep(s.delay)     # a slow receiver; other connections go on
        reply = (s.data(s, txn) if s.data else None) or "250 2.0.0 ok"
        txn.reply = reply
        with s.lock:
            (s.txns if reply.startswith("2") else s.rejected).append(txn)
        return reply


class _DsnHandler(_Handler):
    """The handler of a sink that offers DSN: EHLO says so; RCPT parameters are recorded."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses[:-1] + ["250-DSN"] + responses[-1:]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.sink.lock:
            self.sink.rcpt_params.append((address, list(rcpt_options)))
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@dataclass
class Dumped:
    """One transaction as smtp-sink dumped it."""

    path: str
    client_ip: str
    helo: str
    mail_from: str
    mail_args: str
    rcpt_tos: list
    message: bytes            # as received, LF line ends (smtp-sink's format)


class SmtpSink:
    """Postfix's smtp-sink on *ip*:*port*, one dump file per transaction."""

    def __init__(self, ip: str, port: int, args=()):
        self.ip, self.port = ip, port
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        # smtp-sink drops to "nobody" (we may be root): a world-writable
        # directory of its own outside pytest's private tmp.
        self.dir = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(self.dir, 0o777)
        self.dump = os.path.join(self.dir, "dump")
        os.mkdir(self.dump)
        os.chmod(self.dump, 0o777)

    def start(self, timeout: float = 10.0) -> "SmtpSink":
        argv = [SMTP_SINK, "-u", "nobody", *self.args, "-d", os.path.join(self.dump, "%M."),
                f"{self.ip}:{self.port}", "1000"]
        with open(os.path.join(self.dir, "stderr"), "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited {self.proc.returncode}: {self.stderr()}")
            try:
                with socket.create_connection((self.ip, self.port), timeout=1) as s:
                    s.settimeout(max(1.0, deadline - time.monotonic()))   # (-W CONNECT:n)
                    if re.match(rb"[245]\d\d[ -]", s.recv(100)):   # 421 with -Q CONNECT
                        s.sendall(b"QUIT\r\n")
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("smtp-sink did not start")
            time.sleep(0.02)

    def stderr(self) -> str:
        try:
            with open(os.path.join(self.dir, "stderr"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def count(self) -> int:
        """Dump files so far (the last may still be being written)."""
        try:
            return len(os.listdir(self.dump))
        except FileNotFoundError:
            return 0

    def messages(self) -> list[Dumped]:
        """Every dumped transaction, parsed (call when the transactions are complete)."""
        out = []
        for name in sorted(os.listdir(self.dump)):
            path = os.path.join(self.dump, name)
            with open(path, "rb") as f:
                raw = f.read()
            out.append(parse_dump(path, raw))
        return out

    def deliveries(self) -> list[tuple[str, str, Dumped]]:
        """(qid, recipient, dump) for every recipient of every dumped transaction."""
        out = []
        for m in self.messages():
            q = qid_of(m.message)
            for r in m.rcpt_tos:
                out.append((q, r, m))
        return out


def parse_dump(path: str, raw: bytes) -> Dumped:
    fields: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = raw.index(b"\n", pos)
        line = raw[pos:end].decode("utf-8", "replace")
        if line.startswith("Received: "):
            break
        name, _, value = line.partition(": ")
        fields.setdefault(name, []).append(value)
        pos = end + 1
    # smtp-sink's Received header is three lines: "Received: from ...",
    # "\tby host (smtp-sink) ...", "\tdate"
    for _ in range(3):
        pos = raw.index(b"\n", pos) + 1
    if not raw.endswith(b"\n\n"):
        raise AssertionError(f"{path}: incomplete dump (no final empty line)")
    mail_args = fields["X-Mail-Args"][0]
    m = re.match(r"<([^>]*)>", mail_args)
    rcpts = []
    for a in fields.get("X-Rcpt-Args", []):
        rm = re.match(r"<([^>]*)>", a)
        rcpts.append(rm.group(1) if rm else a)
    return Dumped(path, fields["X-Client-Addr"][0], fields.get("X-Helo-Args", [""])[0],
                  m.group(1) if m else mail_args, mail_args, rcpts, raw[pos:-1])
