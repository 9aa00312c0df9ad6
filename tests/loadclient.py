"""A small pipelining SMTP load client whose messages can be checked byte for byte.

Message *seq* is :func:`message` (seq): an ``X-Seq: N`` header and a body of
the SHA-256 of N repeated to about 2 KB, so a test can tell exactly what every
message must contain.  Each of K connections (threads) does, per message, the
RFC 2920 pipelined group ``MAIL``/``RCPT``/``DATA`` in one write, reads the
three replies, sends the body and ``.``, and reads the final reply.

Every outcome is recorded in :attr:`LoadClient.results`:

    seq -> ("250", qid)     the server said the message is queued as qid
    seq -> ("4xx"/"5xx", text)  a negative final (or MAIL/RCPT/DATA) reply
    seq -> ("error", text)  the connection broke before the final reply:
                            the message may or may not have been queued

A connection that breaks is not retried.  The load is bounded by a message
count and a time limit; it talks to loopback only.  :func:`smtp_source_argv` is
the other load the tests use, Postfix's smtp-source.
"""
from __future__ import annotations

import hashlib
import itertools
import re
import socket
import threading
import time

from daemon import QUEUED_RE, read_reply

SENDER = "crash@example.com"
RCPT = "sink@example.net"

_SEQ_RE = re.compile(rb"^X-Seq: (\d+)\r$", re.M)


def smtp_source_argv(port: int, sessions: int, messages: int, sender: str, rcpt: str,
                     size: int = 2048) -> list[str]:
    """Postfix's smtp-source as background load: *sessions* connections reused (-d) for
    *messages* messages of *size* octets, HELO [127.0.0.1], to 127.0.0.1:*port*."""
    return ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size), "-d",
            "-M", "[127.0.0.1]", "-f", sender, "-t", rcpt, f"127.0.0.1:{port}"]


def message(seq: int, size: int = 2048) -> bytes:
    """The exact bytes sent for message *seq* (before dot-stuffing)."""
    line = hashlib.sha256(str(seq).encode()).hexdigest().encode() + b"\r\n"
    head = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: load message {seq}\r\n"
            f"X-Seq: {seq}\r\n\r\n").encode()
    return head + line * max(1, (size - len(head)) // len(line))


def seq_of(msg: bytes) -> int | None:
    """The X-Seq of a message as stored (None for one that is not ours)."""
    m = _SEQ_RE.search(msg)
    return int(m.group(1)) if m else None


def _stuff(data: bytes) -> bytes:
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


class _Conn:
    def __init__(self, host: str, port: int, timeout: float):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def reply(self) -> tuple[int, str]:
        """(code, text) of one reply, its lines joined by newlines; ConnectionError if the
        connection ends (or a line runs past 4 KiB) before the reply is complete."""
        code, lines = read_reply(self.rfile, 4096)
        return code, "\n".join(lines)

    def close(self) -> None:
        for x in (self.rfile, self.sock):
            try:
                x.close()
            except OSError:
                pass


class LoadClient:
    """K pipelining SMTP connections sending numbered messages until told to stop."""

    def __init__(self, host: str, port: int, connections: int = 8, max_messages: int = 20_000,
                 time_limit: float = 30.0, first_seq: int = 0, size: int = 2048,
                 timeout: float = 30.0):
        self.host, self.port = host, port
        self.connections = connections
        self.max_messages = max_messages
        self.time_limit = time_limit
        self.size = size
        self.timeout = timeout
        self.first_seq = first_seq
        self._seqs = itertools.count(first_seq)
        self._lock = threading.Lock()
        self.results: dict[int, tuple[str, str]] = {}
        self.connection_errors: list[str] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.started = 0.0

    # ---------------------------------------------------------------- control

    def start(self) -> "LoadClient":
        self.started = time.monotonic()
        for i in range(self.connections):
            t = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Ask every connection to finish its transaction and QUIT; wait for them."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"load connections did not finish: {alive}")

    def running(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def wait_for(self, count: int, timeout: float) -> None:
        """Wait until *count* messages have been answered 250 (bounded)."""
        deadline = time.monotonic() + timeout
        while len(self.queued()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.queued())} of {count} messages queued "
                                   f"in {timeout}s; results so far: {self.tally()}")
            if not self.running():
                raise RuntimeError(f"all load connections ended: {self.connection_errors[:5]}")
            time.sleep(0.02)

    # ---------------------------------------------------------------- results

    def queued(self) -> dict[int, str]:
        """seq -> qid for every message answered 250."""
        with self._lock:
            return {s: r[1] for s, r in self.results.items() if r[0] == "250"}

    def tally(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for r in self.results.values():
                out[r[0]] = out.get(r[0], 0) + 1
        return out

    def _record(self, seq: int, kind: str, text: str) -> None:
        with self._lock:
            self.results[seq] = (kind, text)

    # ------------------------------------------------------------- one conn

    def _next_seq(self) -> int | None:
        if self.stopping.is_set() or time.monotonic() - self.started > self.time_limit:
            return None
        with self._lock:
            seq = next(self._seqs)
        return seq if seq - self.first_seq < self.max_messages else None

    def _run(self) -> None:
        try:
            conn = _Conn(self.host, self.port, self.timeout)
        except OSError as exc:
            self.connection_errors.append(f"connect: {exc}")
            return
        seq = None
        try:
            code, _ = conn.reply()
            if code != 220:
                self.connection_errors.append(f"greeting {code}")
                return
            conn.sock.sendall(b"EHLO load.test\r\n")
            code, text = conn.reply()
            if code != 250 or "PIPELINING" not in text.split("\n"):
                self.connection_errors.append(f"EHLO {code} {text!r}")
                return
            while True:
                seq = self._next_seq()
                if seq is None:
                    break
                self._one(conn, seq)
                seq = None
            conn.sock.sendall(b"QUIT\r\n")
            conn.reply()
        except (OSError, ConnectionError, ValueError) as exc:
            if seq is not None:
                self._record(seq, "error", f"{type(exc).__name__}: {exc}")
            self.connection_errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    def _one(self, conn: _Conn, seq: int) -> None:
        conn.sock.sendall(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
        replies = [conn.reply() for _ in range(3)]
        (mc, mt), (rc, rt), (dc, dt) = replies
        if dc != 354:
            bad = next(((c, t) for c, t in replies if c >= 400), (dc, dt))
            self._record(seq, f"{bad[0]}", bad[1])
            if mc < 400:
                conn.sock.sendall(b"RSET\r\n")
                conn.reply()
            return
        conn.sock.sendall(_stuff(message(seq, self.size)) + b".\r\n")
        code, text = conn.reply()
        if code == 250:
            m = QUEUED_RE.fullmatch(text)
            if m:
                self._record(seq, "250", m.group(1))
            else:
                self._record(seq, "250-without-queue-id", text)
        else:
            self._record(seq, str(code), text)
