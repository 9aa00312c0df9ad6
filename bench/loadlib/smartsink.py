"""A receiving mail server that behaves like a mailbox provider: the smart sink.

Used by the tests (``tests/smartsink.py`` re-exports it) and by the benchmarks
(``bench/adaptive.py``).  Loopback only; standard library only (asyncio).

Behaviour is a :class:`Policy`, chosen per client IP (connection-level
behaviour: hanging, slow replies, messages per connection, messages per
window per client IP) and per recipient domain (RCPT-level behaviour:
greylisting, unknown users, a fixed reply), falling back to the sink's
default policy.  Policies may be replaced while the sink runs
(:meth:`SmartSink.set_policy`), e.g. to stop deferring in the middle of a test.

- ``max_per_connection`` N: the (N+1)th MAIL on one connection gets
  ``conn_reply`` (a 421) and the connection is closed.
- ``max_per_window`` M over ``window`` seconds (a sliding window, per client
  IP, of the transactions whose MAIL it accepted -- counted then, so that
  transactions in flight on several connections cannot overshoot; ``window``
  may be scaled down for tests): a MAIL beyond it gets ``rate_reply`` (421 by default, Yahoo's words) and the
  connection is closed, as RFC 5321 says of 421.
- ``greylist``: the first RCPT of each (client IP, sender, recipient) triplet
  gets ``450 4.2.0``; a retry after ``greylist_delay`` seconds is accepted.
- ``unknown_share`` s: local parts whose stable hash falls in the first share
  s get ``550 5.1.1`` (so the same address always gets the same answer);
  local parts starting with ``unknown`` always do.
- ``reply_delay``: seconds before every reply (a slow server).
- ``hang``: accept TCP and never say anything.

Everything the sink said is recorded as :class:`Seen` (time, client IP,
connection number, stage, recipient, reply); :meth:`SmartSink.accepted` lists
the completed transactions; :meth:`SmartSink.connections_from` when each
connection from a client IP was accepted.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field, replace

__all__ = ["Policy", "Seen", "SmartSink", "YAHOO_RATE", "GMAIL_RATE", "OUTLOOK_RATE"]

# Replies the big providers give when a sender goes too fast (their public help pages).
YAHOO_RATE = ("421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected "
              "volume or user complaints - 4.16.55.1; see https://senders.yahooinc.com/"
              "smtp-error-codes")
GMAIL_RATE = ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail "
              "originating from your IP address {ip}. To protect our users from spam, mail "
              "sent from your IP address has been temporarily rate limited.")
OUTLOOK_RATE = "451 4.7.500 Server busy. Please try again later from [{ip}]."

MAX_LINE = 4096
MAX_MESSAGE = 16 * 1024 * 1024
MAX_SEEN = 1_000_000


@dataclass(frozen=True)
class Policy:
    max_per_connection: int = 0
    conn_reply: str = "421 4.7.0 Too many messages on this connection, reconnect"
    max_per_window: int = 0
    window: float = 60.0
    rate_reply: str = YAHOO_RATE
    greylist: bool = False
    greylist_delay: float = 0.0
    unknown_share: float = 0.0
    rcpt_reply: str = ""          # a fixed reply to every RCPT ("" = decide as above)
    data_reply: str = ""          # a fixed reply to the end of data ("" = 250)
    reply_delay: float = 0.0
    hang: bool = False


@dataclass
class Seen:
    at: float
    client_ip: str
    conn: int
    stage: str                    # connect | mail | rcpt | data
    rcpt: str
    reply: str


@dataclass
class Accepted:
    at: float
    client_ip: str
    conn: int
    mail_from: str
    rcpts: list
    size: int
    mail_at: float = 0.0          # when its MAIL was accepted (the sink's window counts it then)


@dataclass
class _Session:
    ip: str
    conn: int
    messages: int = 0
    mail_from: str | None = None
    mail_at: float = 0.0
    rcpts: list = field(default_factory=list)


def _unknown(local: str, share: float) -> bool:
    if local.lower().startswith("unknown"):
        return True
    if share <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(local.lower().encode(), digest_size=4).digest(), "big")
    return h / 2 ** 32 < share


class SmartSink:
    """One listening address; runs its own event loop in a thread (start/stop)."""

    def __init__(self, ip: str, port: int, default: Policy | None = None, *,
                 by_client: dict | None = None, by_domain: dict | None = None,
                 hostname: str = "smartsink.test"):
        self.ip, self.port = ip, port
        self.default = default or Policy()
        self.by_client: dict[str, Policy] = dict(by_client or {})
        self.by_domain: dict[str, Policy] = dict(by_domain or {})
        self.hostname = hostname
        self.seen: list[Seen] = []
        self.accepted: list[Accepted] = []
        self.connections = 0
        self.opened: dict[int, tuple[float, str]] = {}   # connection number: (time, client IP)
        self.open_now = 0             # connections open at this moment
        self.max_open = 0             # the most open at once (reset_max_open() starts again)
        self._lock = threading.Lock()
        self._window: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._grey: dict[tuple, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._writers: set = set()

    # -- policy -----------------------------------------------------------

    def set_policy(self, policy: Policy | None = None, *, client: str | None = None,
                   domain: str | None = None, **changes) -> None:
        """Replace (or change fields of) the default, a client's or a domain's policy."""
        with self._lock:
            if client is not None:
                base = self.by_client.get(client, self.default)
                self.by_client[client] = policy or replace(base, **changes)
            elif domain is not None:
                base = self.by_domain.get(domain.lower(), self.default)
                self.by_domain[domain.lower()] = policy or replace(base, **changes)
            else:
                self.default = policy or replace(self.default, **changes)

    def _client_policy(self, ip: str) -> Policy:
        return self.by_client.get(ip, self.default)

    def _rcpt_policy(self, ip: str, domain: str) -> Policy:
        return self.by_domain.get(domain.lower()) or self._client_policy(ip)

    # -- records ----------------------------------------------------------

    def _record(self, s: _Session, stage: str, rcpt: str, reply: str) -> None:
        with self._lock:
            if len(self.seen) < MAX_SEEN:
                self.seen.append(Seen(time.time(), s.ip, s.conn, stage, rcpt, reply))

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def deliveries(self) -> list[Accepted]:
        with self._lock:
            return list(self.accepted)

    def connections_from(self, ip: str) -> list[tuple[float, int]]:
        """(time accepted, connection number) of every connection from *ip*."""
        with self._lock:
            return [(t, c) for c, (t, i) in self.opened.items() if i == ip]

    def reset_max_open(self) -> None:
        """Count the most connections open at once from now on."""
        with self._lock:
            self.max_open = self.open_now

    def received(self) -> int:
        with self._lock:
            return len(self.accepted)

    # -- life -------------------------------------------------------------

    def start(self) -> SmartSink:
        ready = threading.Event()
        failed: list = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.ip, self.port, reuse_address=True,
                                         limit=MAX_LINE * 4))
            except OSError as exc:
                failed.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"smartsink-{self.ip}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            raise failed[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def close():
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    async def serve_forever(self) -> None:
        """Run on the caller's event loop (the command line)."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, self.ip, self.port,
                                                  reuse_address=True, limit=MAX_LINE * 4)
        async with self._server:
            await self._server.serve_forever()

    # -- the SMTP session -------------------------------------------------

    def _over_rate(self, ip: str, p: Policy, now: float) -> bool:
        if p.max_per_window <= 0:
            return False
        q = self._window[ip]
        while q and q[0] <= now - p.window:
            q.popleft()
        return len(q) >= p.max_per_window

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        with self._lock:
            self.connections += 1
            s = _Session(peer[0], self.connections)
            if len(self.opened) < MAX_SEEN:
                self.opened[s.conn] = (time.time(), s.ip)
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
        self._writers.add(writer)
        policy = self._client_policy(s.ip)

        async def say(text: str, stage: str = "", rcpt: str = "") -> None:
            if policy.reply_delay:
                await asyncio.sleep(policy.reply_delay)
            if stage:
                self._record(s, stage, rcpt, text)
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        try:
            if policy.hang:
                self._record(s, "connect", "", "(hang)")
                await reader.read()       # until the client gives up
                return
            await say(f"220 {self.hostname} ESMTP smartsink")
            while True:
                line = await reader.readline()
                if not line:
                    return
                cmd = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = cmd[:4].upper()
                policy = self._client_policy(s.ip)
                if verb == "EHLO":
                    await say(f"250-{self.hostname}\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                              "250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE 52428800")
                elif verb == "HELO":
                    await say(f"250 {self.hostname}")
                elif verb == "MAIL":
                    if policy.max_per_connection and s.messages >= policy.max_per_connection:
                        await say(policy.conn_reply.format(ip=s.ip), "mail")
                        return
                    with self._lock:
                        over = self._over_rate(s.ip, policy, time.monotonic())
                    if over:
                        await say(policy.rate_reply.format(ip=s.ip), "mail")
                        if policy.rate_reply.startswith("421"):
                            return
                        continue
                    s.mail_from = cmd[10:].split(">")[0].lstrip("<") if ":" in cmd else ""
                    s.mail_at = time.time()
                    with self._lock:       # counted when admitted: transactions in flight
                        self._window[s.ip].append(time.monotonic())   # count too
                    s.rcpts = []
                    await say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    addr = cmd.partition(":")[2].strip().split(">")[0].lstrip("<")
                    if s.mail_from is None:
                        await say("503 5.5.1 MAIL first", "rcpt", addr)
                        continue
                    await say(self._rcpt(s, addr), "rcpt", addr)
                elif verb == "DATA":
                    if not s.rcpts:
                        await say("554 5.5.1 No valid recipients", "data")
                        s.mail_from = None
                        continue
                    await say("354 End data with <CR><LF>.<CR><LF>")
                    size = await self._read_data(reader)
                    if size < 0:
                        await say("552 5.3.4 Message too big", "data")
                        return
                    reply = policy.data_reply or "250 2.0.0 Ok: queued"
                    for r in s.rcpts:
                        self._record(s, "data", r, reply)
                    if reply.startswith("2"):
                        s.messages += 1
                        with self._lock:
                            self.accepted.append(Accepted(time.time(), s.ip, s.conn,
                                                          s.mail_from or "", list(s.rcpts),
                                                          size, s.mail_at))
                    s.mail_from, s.rcpts = None, []
                    await say(reply)
                    if reply.startswith("421"):
                        return
                elif verb == "RSET":
                    s.mail_from, s.rcpts = None, []
                    await say("250 2.0.0 Ok")
                elif verb == "NOOP":
                    await say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    await say("221 2.0.0 Bye")
                    return
                else:
                    await say("502 5.5.2 Command not recognized")
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with self._lock:
                self.open_now -= 1

    def _rcpt(self, s: _Session, addr: str) -> str:
        local, _, domain = addr.rpartition("@")
        p = self._rcpt_policy(s.ip, domain)
        if p.rcpt_reply:
            reply = p.rcpt_reply.format(ip=s.ip)
        elif _unknown(local, p.unknown_share):
            reply = "550 5.1.1 <%s>: Recipient address rejected: User unknown" % addr
        elif p.greylist:
            key = (s.ip, (s.mail_from or "").lower(), addr.lower())
            now = time.monotonic()
            with self._lock:
                first = self._grey.setdefault(key, now)
            if first == now or now - first < p.greylist_delay:
                reply = "450 4.2.0 <%s>: Recipient address rejected: Greylisted" % addr
            else:
                reply = "250 2.1.5 Ok"
        else:
            reply = "250 2.1.5 Ok"
        if reply.startswith("2"):
            s.rcpts.append(addr)
        return reply

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader) -> int:
        size = 0
        while True:
            line = await reader.readuntil(b"\n")
            if line in (b".\r\n", b".\n"):
                return size if size <= MAX_MESSAGE else -1
            size += len(line)


def rate_per_window(seen, window: float) -> dict[str, int]:
    """The most accepted messages in any *window* seconds, per client IP (a window
    starts at each acceptance)."""
    by_ip: dict[str, list[float]] = collections.defaultdict(list)
    for a in seen:
        by_ip[a.client_ip].append(a.at)
    out = {}
    for ip, times in by_ip.items():
        times.sort()
        best = j = 0
        for i, t in enumerate(times):
            while times[j] <= t - window:
                j += 1
            best = max(best, i - j + 1)
        out[ip] = best
    return out


def main(argv=None) -> None:
    """``python -m bench.loadlib.smartsink --listen IP:PORT [--policy JSON]
    [--log FILE]``: serve until killed; with --log, one JSON line per reply."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True)
    ap.add_argument("--policy", default="{}", help="Policy fields as JSON")
    ap.add_argument("--log", default="")
    a = ap.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    sink = SmartSink(host, int(port), Policy(**json.loads(a.policy)))
    if a.log:
        out = open(a.log, "a", buffering=1)
        record = sink._record

        def logged(s, stage, rcpt, reply):
            record(s, stage, rcpt, reply)
            out.write(json.dumps({"at": time.time(), "ip": s.ip, "conn": s.conn,
                                  "stage": stage, "rcpt": rcpt, "reply": reply}) + "\n")
        sink._record = logged
    asyncio.run(sink.serve_forever())


if __name__ == "__main__":
    main()
