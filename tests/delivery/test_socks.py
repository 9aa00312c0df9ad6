"""Delivery through a SOCKS5 proxy (mta.delivery.socks, SmtpConnection.open(socks5=...)).

Peers, all on loopback: microsocks (outbound connections bound to 127.0.0.3,
with and without -u/-P), Dante's danted (outbound address 127.0.0.4, which it
reports as BND.ADDR; a rule blocks 127.0.0.99), aiosmtpd receivers on
127.0.0.10 / ::1 that record the client's address, and scripted fake proxies
for the replies real ones will not produce on demand.  Each proxy is our own
child, stopped by its PID; scripts/install-test-deps installs microsocks and
dante-server (a missing one fails the tests, it does not skip them).
"""
import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import pytest
import trustme
import uvloop
from aiosmtpd.smtp import SMTP as AiosmtpdServer
from daemon import free_port
from sinks import AioSink

from mta.delivery import socks
from mta.delivery.client import (
    SmtpConnectError,
    SmtpConnection,
    SmtpConnectionLost,
    Socks5Proxy,
    SourceUnavailable,
)

HELO = "client.test.example"
LOOP_BOUND = 20.0           # seconds: no test's event loop may run longer
RECEIVER_IP = "127.0.0.10"
MICROSOCKS_OUT = "127.0.0.3"
DANTE_OUT = "127.0.0.4"
DANTE_BLOCKED = "127.0.0.99"
MSG = b"From: a@src.test.example\r\nSubject: via proxy\r\n\r\nbody\r\n"



def run(coro, uv: bool = True):
    """Run *coro* on a fresh loop (uvloop or asyncio), bounded by LOOP_BOUND."""
    factory = uvloop.new_event_loop if uv else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, LOOP_BOUND))


def wait_listening(ip: str, port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}")
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"proxy not listening on {ip}:{port}")


class Proxy:
    """A SOCKS5 server we started: ``port``, ``proc``; stop() kills it by its PID."""

    def __init__(self, argv, port, cwd=None):
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=cwd)
        wait_listening("127.0.0.1", port, self.proc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def microsocks():
    """microsocks(user="", password="", bind=MICROSOCKS_OUT) -> a started Proxy."""
    made = []

    def start(user: str = "", password: str = "", bind: str | None = MICROSOCKS_OUT) -> Proxy:
        port = free_port()
        argv = ["microsocks", "-i", "127.0.0.1", "-p", str(port)]
        if bind:
            argv += ["-b", bind]
        if user:
            argv += ["-u", user, "-P", password]
        p = Proxy(argv, port)
        made.append(p)
        return p

    yield start
    for p in made:
        p.stop()


DANTE_CONF = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: {external}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks block {{ from: 0.0.0.0/0 to: {blocked}/32 }}
socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 command: connect }}
"""


@pytest.fixture
def dante():
    """danted on 127.0.0.1, outbound from DANTE_OUT, refusing connections to DANTE_BLOCKED."""
    d = tempfile.mkdtemp(prefix="dante-")
    port = free_port()
    conf = os.path.join(d, "danted.conf")
    with open(conf, "w") as f:
        f.write(DANTE_CONF.format(port=port, external=DANTE_OUT, blocked=DANTE_BLOCKED))
    p = Proxy(["danted", "-f", conf, "-p", os.path.join(d, "pid"), "-N", "1"], port, cwd=d)
    yield p
    p.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def receiver():
    """aiosmtpd on RECEIVER_IP (a thread of its own) recording each client's address."""
    sink = AioSink(RECEIVER_IP, free_port(RECEIVER_IP)).start()
    yield sink
    sink.stop()


async def send_one(conn: SmtpConnection, rcpt: str = "x@dst.test.example") -> None:
    r = await conn.send_message("a@src.test.example", [rcpt], MSG)
    assert r.accepted(0), r
    await conn.quit()


def open_via(port, proxy, **kw):
    kw.setdefault("command_timeout", 5)
    kw.setdefault("connect_timeout", 5)
    return SmtpConnection.open(RECEIVER_IP, port, helo_name=HELO, socks5=proxy, **kw)


# --- encoding and the proxy value ------------------------------------------------------------

def test_encode_address_types():
    assert socks.encode_address("127.0.0.10", 25) == b"\x01\x7f\x00\x00\x0a\x00\x19"
    assert socks.encode_address("::1", 2525) == b"\x04" + b"\x00" * 15 + b"\x01\x09\xdd"
    assert socks.encode_address("[::1]", 25) == b"\x04" + b"\x00" * 15 + b"\x01\x00\x19"
    assert socks.encode_address("mx.test.example", 25) == b"\x03\x0fmx.test.example\x00\x19"
    assert socks.encode_address("bücher.test", 25) == b"\x03\x12xn--bcher-kva.test\x00\x19"
    with pytest.raises(ValueError):
        socks.encode_address("a" * 256, 25)
    with pytest.raises(ValueError):
        socks.encode_address("127.0.0.1", 70000)


def test_proxy_value():
    p = Socks5Proxy.parse("127.0.0.1:1080", "user", "secret")
    assert (p.host, p.port, p.username, p.password) == ("127.0.0.1", 1080, "user", "secret")
    assert "secret" not in repr(p) and p.name == "127.0.0.1:1080"
    v6 = Socks5Proxy.parse("[::1]:1080")
    assert v6.host == "::1" and v6.name == "[::1]:1080"
    assert Socks5Proxy.parse("proxy.test.example:1080") == Socks5Proxy("proxy.test.example", 1080)
    for bad in ("127.0.0.1", "::1:1080", "h:0", "h:x", ":1080", "h:65536"):
        with pytest.raises(ValueError):
            Socks5Proxy.parse(bad)
    with pytest.raises(ValueError):
        Socks5Proxy("h", 1080, "", "password-without-user")
    with pytest.raises(ValueError):
        Socks5Proxy("h", 1080, "u" * 256, "p")


# --- real proxies ----------------------------------------------------------------------------

@pytest.mark.parametrize("uv", [True, False], ids=["uvloop", "asyncio"])
def test_microsocks_receiver_sees_proxy_address(microsocks, receiver, uv):
    proxy = microsocks()
    via = Socks5Proxy("127.0.0.1", proxy.port)

    async def main():
        # microsocks reports BND.ADDR 0.0.0.0: local_ip is then the source's configured address
        conn = await open_via(receiver.port, via, source_address=MICROSOCKS_OUT)
        assert conn.local_ip == MICROSOCKS_OUT and conn.socks5 == via
        await send_one(conn, "one@dst.test.example")
        conn = await open_via(receiver.port, via)
        assert conn.local_ip is None            # the proxy did not say, nor did the caller
        await send_one(conn, "two@dst.test.example")

    run(main(), uv=uv)
    t1 = receiver.wait_for("one@dst.test.example", 10)
    t2 = receiver.wait_for("two@dst.test.example", 10)
    assert t1.client_ip == t2.client_ip == MICROSOCKS_OUT
    assert t1.data == MSG and t1.mail_from == "a@src.test.example"


def test_dante_bnd_addr_is_local_ip(dante, receiver):
    via = Socks5Proxy("127.0.0.1", dante.port)

    async def main():
        # the caller's source_address is not bound through a proxy, and BND.ADDR wins over it
        conn = await open_via(receiver.port, via, source_address="192.0.2.10")
        local_ip = conn.local_ip
        await send_one(conn)
        return local_ip

    local_ip = run(main())
    t = receiver.wait_for("x@dst.test.example", 10)
    assert t.client_ip == DANTE_OUT
    assert local_ip == DANTE_OUT


def test_dante_ruleset_refusal_is_source_trouble(dante, receiver):
    via = Socks5Proxy("127.0.0.1", dante.port)

    async def main():
        with pytest.raises(SourceUnavailable) as ei:
            await SmtpConnection.open(DANTE_BLOCKED, receiver.port, helo_name=HELO, socks5=via,
                                      connect_timeout=5)
        return ei.value

    exc = run(main())
    assert "not allowed by ruleset" in exc.reason and exc.source == via.name
    assert exc.temporary and receiver.connections == 0


def test_microsocks_username_password(microsocks, receiver):
    proxy = microsocks(user="mta", password="s3cret")

    async def main():
        conn = await open_via(receiver.port, Socks5Proxy("127.0.0.1", proxy.port, "mta", "s3cret"),
                              source_address=MICROSOCKS_OUT)
        assert conn.local_ip == MICROSOCKS_OUT
        await send_one(conn)
        with pytest.raises(SourceUnavailable) as wrong:
            await open_via(receiver.port, Socks5Proxy("127.0.0.1", proxy.port, "mta", "wrong"))
        with pytest.raises(SourceUnavailable) as none:
            await open_via(receiver.port, Socks5Proxy("127.0.0.1", proxy.port))
        return wrong.value, none.value

    wrong, none = run(main())
    assert "refused the credentials of user 'mta'" in wrong.reason
    assert "wrong" not in str(wrong)                      # never the password
    assert "refused no authentication" in none.reason
    t = receiver.wait_for("x@dst.test.example", 10)
    assert t.client_ip == MICROSOCKS_OUT
    assert receiver.received() == 1


def test_proxy_killed_is_source_unavailable(microsocks, receiver):
    proxy = microsocks()
    via = Socks5Proxy("127.0.0.1", proxy.port)

    async def main():
        await send_one(await open_via(receiver.port, via))
        held = await open_via(receiver.port, via)
        proxy.kill()
        # a session the proxy was relaying is lost (the proxy's sockets died with it) ...
        with pytest.raises(SmtpConnectionLost):
            await held.send_message("a@src.test.example", ["lost@dst.test.example"], MSG)
        # ... and a new one finds the source unusable
        with pytest.raises(SourceUnavailable) as ei:
            await open_via(receiver.port, via)
        return ei.value

    exc = run(main())
    assert exc.source == via.name and "unreachable" in exc.reason and exc.temporary
    assert "Connection refused" in exc.reason
    assert receiver.received() == 1


def test_destination_refused_through_proxy_is_not_source_trouble(microsocks):
    proxy = microsocks()
    closed = free_port(RECEIVER_IP)         # nothing listens there

    async def main():
        with pytest.raises(SmtpConnectError) as ei:
            await open_via(closed, Socks5Proxy("127.0.0.1", proxy.port))
        return ei.value

    exc = run(main())
    assert not isinstance(exc, SourceUnavailable)
    assert "connection refused" in str(exc) and exc.temporary


def test_ipv6_destination_through_proxy(microsocks):
    proxy = microsocks(bind=None)
    sink = AioSink("::1", free_port("::1")).start()
    try:
        async def main():
            conn = await SmtpConnection.open("::1", sink.port, helo_name=HELO, connect_timeout=5,
                                             socks5=Socks5Proxy("127.0.0.1", proxy.port))
            await send_one(conn)

        run(main())
        t = sink.wait_for("x@dst.test.example", 10)
        assert t.client_ip == "::1" and t.data == MSG
    finally:
        sink.stop()


@pytest.fixture(scope="module")
def tls_material():
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test.example")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


class _Recorder:
    """aiosmtpd handler: records (peer IP, TLS in use, message)."""

    def __init__(self):
        self.got = []

    async def handle_DATA(self, server, session, envelope):
        self.got.append((session.peer[0], session.ssl is not None, envelope.original_content))
        return "250 2.0.0 Ok: queued"


@pytest.mark.parametrize("uv", [True, False], ids=["uvloop", "asyncio"])
def test_starttls_through_proxy(microsocks, tls_material, uv):
    server_ctx, client_ctx = tls_material
    proxy = microsocks()
    h = _Recorder()

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: AiosmtpdServer(h, loop=loop, hostname="mx.test.example",
                                   tls_context=server_ctx, require_starttls=True),
            RECEIVER_IP, 0)
        port = server.sockets[0].getsockname()[1]
        conn = await open_via(port, Socks5Proxy("127.0.0.1", proxy.port), starttls="required",
                              tls_verify=True, tls_server_hostname="mx.test.example",
                              tls_context=client_ctx, source_address=MICROSOCKS_OUT)
        assert conn.tls_active and "STARTTLS" not in conn.extensions
        await send_one(conn)
        server.close()

    run(main(), uv=uv)
    assert h.got == [(MICROSOCKS_OUT, True, MSG)]


# --- scripted proxies: replies real ones do not give on demand -------------------------------

class FakeProxy:
    """A scripted SOCKS5 server: ``script(reader, writer)`` plays one connection."""

    def __init__(self, script):
        self.script = script
        self.requests: list[bytes] = []
        self.server = None
        self.port = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def greet(self, reader, writer, method: int = 0) -> None:
        ver, n = await reader.readexactly(2)
        await reader.readexactly(n)
        writer.write(bytes((5, method)))

    async def request(self, reader) -> bytes:
        head = await reader.readexactly(4)
        atyp = head[3]
        if atyp == 1:
            rest = await reader.readexactly(6)
        elif atyp == 4:
            rest = await reader.readexactly(18)
        else:
            n = await reader.readexactly(1)
            rest = n + await reader.readexactly(n[0] + 2)
        self.requests.append(head + rest)
        return head + rest


def _reply(rep: int, bnd: bytes = b"\x01\x00\x00\x00\x00\x00\x00") -> bytes:
    return bytes((5, rep, 0)) + bnd


@pytest.mark.parametrize("rep,source_trouble", [
    (0x01, True), (0x02, True), (0x03, False), (0x04, False), (0x05, False), (0x06, False),
    (0x07, True), (0x08, False), (0x42, True)])
def test_reply_codes_sorted_source_or_destination(rep, source_trouble):
    async def script(fp, reader, writer):
        await fp.greet(reader, writer)
        await fp.request(reader)
        writer.write(_reply(rep))
        await writer.drain()

    async def main():
        async with FakeProxy(script) as fp:
            with pytest.raises(SmtpConnectError if not source_trouble else SourceUnavailable) as ei:
                await SmtpConnection.open("127.0.0.10", 25, helo_name=HELO, connect_timeout=5,
                                          socks5=Socks5Proxy("127.0.0.1", fp.port))
            return ei.value, fp.requests

    exc, requests = run(main())
    assert requests == [b"\x05\x01\x00\x01\x7f\x00\x00\x0a\x00\x19"]
    assert isinstance(exc, SourceUnavailable) == source_trouble
    text = socks.REPLY_TEXT.get(rep, "unassigned reply 0x42")
    assert text in str(exc)


def test_proxy_misbehaviour_is_source_trouble():
    async def silent(fp, reader, writer):
        await reader.read(100)
        await asyncio.sleep(30)

    async def hangs_up(fp, reader, writer):
        await reader.readexactly(3)

    async def smtp_server(fp, reader, writer):
        writer.write(b"220 mx.test.example ESMTP\r\n")
        await writer.drain()
        await reader.read(100)

    async def only_userpass(fp, reader, writer):
        await fp.greet(reader, writer, method=0xFF)
        await writer.drain()

    async def main():
        out = {}
        for name, script in [("silent", silent), ("hangs_up", hangs_up),
                             ("smtp_server", smtp_server), ("only_userpass", only_userpass)]:
            async with FakeProxy(script) as fp:
                with pytest.raises(SourceUnavailable) as ei:
                    await SmtpConnection.open("127.0.0.10", 25, helo_name=HELO,
                                              connect_timeout=2,
                                              socks5=Socks5Proxy("127.0.0.1", fp.port))
                out[name] = ei.value.reason
        return out

    out = run(main())
    assert "did not answer the method negotiation within 2 s" in out["silent"]
    assert "closed the connection during method negotiation" in out["hangs_up"]
    assert "is not a SOCKS5 server" in out["smtp_server"]
    assert "refused no authentication" in out["only_userpass"]


def test_connect_reply_timeout_is_destination_trouble():
    """The proxy negotiated, then its own connect to the destination hangs: the
    destination's trouble (SmtpConnectError, like a direct connect timing out)."""
    async def script(fp, reader, writer):
        await fp.greet(reader, writer)
        await fp.request(reader)
        await asyncio.sleep(30)

    async def main():
        async with FakeProxy(script) as fp:
            with pytest.raises(SmtpConnectError) as ei:
                await SmtpConnection.open("127.0.0.10", 25, helo_name=HELO, connect_timeout=2,
                                          socks5=Socks5Proxy("127.0.0.1", fp.port))
            return ei.value

    exc = run(main())
    assert not isinstance(exc, SourceUnavailable) and "timed out" in str(exc)


def test_bnd_address_types_and_domain_request():
    """socks.connect sends a name as ATYP 3 (the proxy resolves it) and reads any BND type."""
    bnds = [b"\x04" + b"\x00" * 15 + b"\x01" + b"\x04\x00",
            b"\x03\x0bout.example" + b"\x04\x01",
            b"\x01\x7f\x00\x00\x05\x04\x02"]

    async def script(fp, reader, writer):
        await fp.greet(reader, writer)
        await fp.request(reader)
        writer.write(_reply(0, bnds[len(fp.requests) - 1]))
        await writer.drain()
        await reader.read(100)

    async def main():
        got = []
        async with FakeProxy(script) as fp:
            for _ in bnds:
                sock, addr, port = await socks.connect(Socks5Proxy("127.0.0.1", fp.port),
                                                       "mx.test.example", 25, 5)
                sock.close()
                got.append((addr, port))
            return got, fp.requests

    got, requests = run(main())
    assert got == [("::1", 1024), ("out.example", 1025), ("127.0.0.5", 1026)]
    assert requests == [b"\x05\x01\x00\x03\x0fmx.test.example\x00\x19"] * 3


def test_userpass_subnegotiation_bytes():
    """RFC 1929: VER 1, ULEN, UNAME, PLEN, PASSWD; status 0 is success."""
    seen = []

    async def script(fp, reader, writer):
        ver, n = await reader.readexactly(2)
        methods = await reader.readexactly(n)
        seen.append(methods)
        writer.write(b"\x05\x02")
        head = await reader.readexactly(2)
        user = await reader.readexactly(head[1])
        plen = await reader.readexactly(1)
        pw = await reader.readexactly(plen[0])
        seen.append((head[0], user, pw))
        writer.write(b"\x01\x00")
        await fp.request(reader)
        writer.write(_reply(0))
        await writer.drain()
        await reader.read(100)

    async def main():
        async with FakeProxy(script) as fp:
            sock, addr, _ = await socks.connect(Socks5Proxy("127.0.0.1", fp.port, "üser", "pw"),
                                                "127.0.0.10", 25, 5)
            sock.close()
            return addr

    assert run(main()) == "0.0.0.0"
    assert seen == [b"\x02", (1, "üser".encode(), b"pw")]


def test_proxy_not_listening_is_source_unavailable():
    async def main():
        with pytest.raises(SourceUnavailable) as ei:
            await SmtpConnection.open("127.0.0.10", 25, helo_name=HELO, connect_timeout=5,
                                      socks5=Socks5Proxy("127.0.0.1", free_port()))
        return ei.value

    exc = run(main())
    assert "unreachable" in exc.reason and "refused" in exc.reason.lower()
