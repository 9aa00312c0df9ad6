"""mta.delivery.client against real peers on loopback.

Peers: Postfix's smtp-sink (byte-exactness through its dump files, with and
without PIPELINING/ESMTP/8BITMIME, refusing greetings), aiosmtpd with a
scripted handler (per-recipient replies, STARTTLS with a trustme CA, SIZE,
SMTPUTF8), and raw asyncio servers scripted here (pipelining on the wire,
timeouts, dropped connections, multi-line and over-long replies, 421).
Every test runs its own event loop (uvloop unless noted) under a time bound.
"""
import asyncio
import os
import random
import shutil
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

from mta.delivery.client import (
    MAX_REPLY_BYTES,
    REPLY_TOO_BIG,
    DeliveryResult,
    ReplyParser,
    SmtpConnectError,
    SmtpConnection,
    SmtpConnectionLost,
    SmtpProtocolError,
    SmtpReply,
    SmtpTimeout,
    SourceUnavailable,
    Unsupported8Bit,
    UnsupportedSmtpUtf8,
    dot_stuff,
)

SMTP_SINK = "/usr/sbin/smtp-sink"
HELO = "client.test.example"
LOOP_BOUND = 20.0           # seconds: no test's event loop may run longer
NO_HANG = 8.0               # seconds: a timeout of 0.5 s fired, not a longer one (no speed check)


def run(coro, uv: bool = True):
    """Run *coro* on a fresh loop (uvloop or asyncio), bounded by LOOP_BOUND."""
    factory = uvloop.new_event_loop if uv else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, LOOP_BOUND))


# A corpus of awkward messages: (name, bytes).
CORPUS = [
    ("plain", b"From: a@test.example\r\nSubject: plain\r\n\r\nHello.\r\n"),
    ("leading-dot", b".starts with a dot\r\nSubject: x\r\n\r\nbody\r\n"),
    ("dot-lines", b"Subject: dots\r\n\r\n.\r\nline\r\n.\r\n..\r\n...x\r\n.\r\n"),
    ("dot-last", b"Subject: dot last\r\n\r\ntext\r\n."),
    ("empty", b""),
    ("no-final-crlf", b"Subject: no crlf\r\n\r\nlast line has no end"),
    ("crlf-dot-crlf-inside", b"Subject: s\r\n\r\na\r\n.\r\nb\r\n"),
    ("blank-lines", b"Subject: b\r\n\r\n\r\n\r\n\r\n"),
    ("8bit", "Subject: 8bit\r\n\r\nGrüße, ½ € .\r\n.ünïcode\r\n".encode()),
]


# --- pure pieces -----------------------------------------------------------------------------

def test_dot_stuff():
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"a\r\n") == b"a\r\n.\r\n"
    assert dot_stuff(b"a") == b"a\r\n.\r\n"
    assert dot_stuff(b".") == b"..\r\n.\r\n"
    assert dot_stuff(b".a\r\n.\r\n..\r\nb.\r\n") == b"..a\r\n..\r\n...\r\nb.\r\n.\r\n"
    assert dot_stuff(b"x\r\n.") == b"x\r\n..\r\n.\r\n"
    # a bare LF before a dot gets the dot doubled too: no early end on a lenient server
    assert dot_stuff(b"a\n.\nb\r\n") == b"a\n..\nb\r\n.\r\n"
    # no copy of the body when nothing needs stuffing beyond the final dot
    big = b"x" * 1000 + b"\r\n"
    assert dot_stuff(big) == big + b".\r\n"


REPLY_STREAM = (b"220-mx.test.example ESMTP\r\n220 ready\r\n"
                b"250-mx.test.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
                b"250 2.1.0 Sender ok\r\n"
                b"550-5.1.1 first line\r\n550-5.1.1 second line\r\n550 5.1.1 third line\n"
                b"452 4.5.3\r\n"
                b"550 4.1.1 class mismatch is not an enhanced code\r\n"
                b"354\r\n"
                b"421 4.3.2 \xff bye\r\n")
REPLY_EXPECTED = [
    SmtpReply(220, None, "mx.test.example ESMTP\nready"),
    SmtpReply(250, None, "mx.test.example\nPIPELINING\nSIZE 1000\n8BITMIME"),
    SmtpReply(250, "2.1.0", "Sender ok"),
    SmtpReply(550, "5.1.1", "first line\nsecond line\nthird line"),
    SmtpReply(452, "4.5.3", ""),
    SmtpReply(550, None, "4.1.1 class mismatch is not an enhanced code"),
    SmtpReply(354, None, ""),
    SmtpReply(421, "4.3.2", "\ufffd bye"),
]


def _parse_in(pieces):
    p = ReplyParser()
    out = []
    for piece in pieces:
        out.extend(p.feed(piece))
    return out


def test_reply_parser_whole_bytewise_random():
    assert _parse_in([REPLY_STREAM]) == REPLY_EXPECTED
    assert _parse_in([REPLY_STREAM[i:i + 1] for i in range(len(REPLY_STREAM))]) == REPLY_EXPECTED
    rnd = random.Random(5321)
    for _ in range(200):
        cuts = sorted(rnd.sample(range(1, len(REPLY_STREAM)), rnd.randint(1, 12)))
        pieces = [REPLY_STREAM[a:b] for a, b in zip([0] + cuts, cuts + [len(REPLY_STREAM)], strict=True)]
        assert _parse_in(pieces) == REPLY_EXPECTED


ONE_LINE_STREAM = (b"250 2.1.0 Sender ok\r\n250 2.1.5\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
                   b"250 2.0.0 Ok: queued as 4F1234\r\n550 4.1.1 class mismatch\r\n"
                   b"452 4.5.3\r\n421 4.3.2 \xff bye\r\n250x odd separator\r\n"
                   b"250 a\rb\r\n251\r\n")
ONE_LINE_EXPECTED = [
    SmtpReply(250, "2.1.0", "Sender ok"), SmtpReply(250, "2.1.5", ""),
    SmtpReply(354, None, "End data with <CR><LF>.<CR><LF>"),
    SmtpReply(250, "2.0.0", "Ok: queued as 4F1234"),
    SmtpReply(550, None, "4.1.1 class mismatch"), SmtpReply(452, "4.5.3", ""),
    SmtpReply(421, "4.3.2", "\ufffd bye"), SmtpReply(250, None, "x odd separator"),
    SmtpReply(250, None, "a\rb"), SmtpReply(251, None, ""),
]


def test_reply_parser_one_line_replies_at_once():
    """Whole one-line replies arriving together (the fast path) parse exactly as the
    same bytes fed one at a time (the general path), alone and in any run."""
    assert _parse_in([ONE_LINE_STREAM]) == ONE_LINE_EXPECTED
    assert _parse_in([ONE_LINE_STREAM[i:i + 1] for i in range(len(ONE_LINE_STREAM))]) \
        == ONE_LINE_EXPECTED
    lines = ONE_LINE_STREAM.split(b"\r\n")[:-1]
    rnd = random.Random(2920)
    for _ in range(300):
        k = rnd.randint(1, 5)
        picked = [rnd.choice(lines) + b"\r\n" for _ in range(k)]
        whole = b"".join(picked)
        assert _parse_in([whole]) == _parse_in([whole[i:i + 1] for i in range(len(whole))])
    # after a partial reply, or with a continuation, a bare LF or a bad line among them,
    # the general path decides: the same replies, or the same error
    for whole in (b"250-first\r\n250 last\r\n", b"250 a\n250 b\r\n",
                  b"250 ok\r\n\r\n", b"250 ok\r\nxyz\r\n", b"250 ok\r\n650 no\r\n"):
        try:
            expected = _parse_in([whole[i:i + 1] for i in range(len(whole))])
        except SmtpProtocolError:
            with pytest.raises(SmtpProtocolError):
                _parse_in([whole])
        else:
            assert _parse_in([whole]) == expected
    p = ReplyParser()
    assert p.feed(b"250-one\r\n") == []
    assert p.feed(b"250 two\r\n250 3.0.0 x\r\n") == [SmtpReply(250, None, "one\ntwo"),
                                                       SmtpReply(250, None, "3.0.0 x")]


def test_one_line_replies_remembered_parse_as_a_fresh_parse():
    """The parts of one-line replies are remembered by their octets (client._reply_parts):
    a line seen before gives the reply a fresh parse gives, as a new object each time
    (the engine matches response rules once per reply object), and what is remembered
    stays within REPLY_CACHE_MAX lines of at most REPLY_CACHE_LINE octets."""
    from mta.delivery import client as smtpc
    rnd = random.Random(3463)
    lines = ONE_LINE_STREAM.split(b"\r\n")[:-1] + [
        b"250 2.0.0 Ok: queued as %X" % rnd.getrandbits(40) for _ in range(600)] + [
        b"550 5.1.1 " + b"u" * 200, b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 go on",
        b"452 4.5.3 too many", "250 2.0.0 d\u00e9j\u00e0 vu".encode(), b"250 2.0.0 \xff\xfe"]
    for _ in range(3000):
        line = rnd.choice(lines)
        [got] = ReplyParser().feed(line + b"\r\n")
        [fresh] = _parse_in([bytes([c]) for c in line + b"\r\n"])   # (the general path)
        assert (type(got), got.code, got.enhanced, got.text) == \
            (smtpc.SmtpReply, fresh.code, fresh.enhanced, fresh.text)
        assert got is not ReplyParser().feed(line + b"\r\n")[0]
        assert len(smtpc._reply_parts) <= smtpc.REPLY_CACHE_MAX
        assert all(len(k) <= smtpc.REPLY_CACHE_LINE for k in smtpc._reply_parts)
    # and as the general path (the line alone, fed octet by octet) parses it
    for line in lines[:40]:
        data = line + b"\r\n"
        assert _parse_in([data]) == _parse_in([data[i:i + 1] for i in range(len(data))])


def test_reply_text_right_after_the_code_is_kept_whole():
    """A line with neither space nor hyphen after the code ("550User unknown", seen from
    old or broken servers) ends its reply, and its text starts right after the code: the
    first character is not dropped as if it were the separator (nor the enhanced code's
    first digit)."""
    stream = b"550User unknown\r\n250\r\n550-5.1.1 first\r\n5505.1.1 second\r\n"
    expected = [SmtpReply(550, None, "User unknown"), SmtpReply(250, None, ""),
                SmtpReply(550, "5.1.1", "first\nsecond")]
    assert _parse_in([stream]) == expected
    assert _parse_in([stream[i:i + 1] for i in range(len(stream))]) == expected


def test_reply_parser_rejects_garbage_and_long_replies():
    for bad in (b"HTTP/1.1 400 Bad\r\n", b"25\r\n", b"abc def\r\n", b"650 no\r\n", b"\r\n"):
        with pytest.raises(SmtpProtocolError):
            ReplyParser().feed(bad)
    # many lines: the whole reply is bounded, not just a line
    p = ReplyParser()
    with pytest.raises(SmtpProtocolError):
        for _ in range(MAX_REPLY_BYTES // 100 + 2):
            p.feed(b"250-" + b"x" * 96 + b"\r\n")
    # one endless line
    p = ReplyParser()
    with pytest.raises(SmtpProtocolError):
        for _ in range(MAX_REPLY_BYTES // 4096 + 2):
            p.feed(b"x" * 4096)
    # just under the bound is fine
    line = b"250-" + b"y" * 1000 + b"\r\n"
    n = (MAX_REPLY_BYTES - 100) // len(line)
    [reply] = ReplyParser().feed(line * n + b"250 end\r\n")
    assert reply.code == 250 and reply.text.count("\n") == n


def test_reply_and_result_helpers():
    ok, temp, perm = SmtpReply(250, "2.1.5", "Ok"), SmtpReply(451, None, "x"), SmtpReply(550, "5.1.1", "no\nsuch user")
    assert ok.is_ok and not ok.is_temp and not ok.is_perm
    assert temp.is_temp and not temp.is_ok and not temp.is_perm
    assert perm.is_perm and not perm.is_temp
    assert SmtpReply(354, None, "").is_temp      # unexpected where a final reply is due
    assert str(perm) == "550 5.1.1 no such user"
    assert str(temp) == "451 x"
    r = DeliveryResult([ok, perm, ok], SmtpReply(250, "2.0.0", "queued"))
    assert [r.accepted(i) for i in range(3)] == [True, False, True]
    assert r.reply(1) is perm and r.reply(0).text == "queued" and not r.all_accepted
    r = DeliveryResult([ok, ok], temp)
    assert not r.accepted(0) and r.reply(0) is temp
    r = DeliveryResult([perm], None)
    assert not r.accepted(0) and r.reply(0) is perm


# --- smtp-sink -------------------------------------------------------------------------------

class Sink:
    """A running smtp-sink that dumps every transaction into its own directory."""

    def __init__(self, *flags: str, dump: bool = True):
        self.dir = tempfile.mkdtemp(prefix="sink-")
        os.chmod(self.dir, 0o777)           # smtp-sink writes as nobody
        self.proc = None
        for _ in range(5):                  # bounded retries if the port got taken
            self.port = free_port()
            cmd = [SMTP_SINK]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]
            if dump:
                cmd += ["-d", self.dir + "/%Y%m%d%H%M%S."]
            cmd += [*flags, f"127.0.0.1:{self.port}", "50"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_listening():
                return
            self.stop()
        raise RuntimeError("smtp-sink did not start")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()           # by PID: only the process we started
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def dumps(self, count: int) -> list[dict]:
        """Wait (bounded) for *count* dump files; return them parsed."""
        deadline = time.monotonic() + 5
        while True:
            names = os.listdir(self.dir)
            if len(names) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert len(names) == count, names
        out = []
        for name in names:
            with open(os.path.join(self.dir, name), "rb") as f:
                out.append(parse_dump(f.read()))
        return out


def parse_dump(raw: bytes) -> dict:
    """smtp-sink(1) DUMP FILE FORMAT: X- headers, a 3-line Received, the message, an empty line."""
    d = {"rcpt": [], "mail": None, "proto": None, "helo": None, "addr": None}
    pos = 0
    while True:
        nl = raw.index(b"\n", pos)
        line = raw[pos:nl].decode("utf-8", "surrogateescape")
        pos = nl + 1
        key, _, value = line.partition(": ")
        if key == "X-Rcpt-Args":
            d["rcpt"].append(value)
        elif key == "X-Mail-Args":
            d["mail"] = value
        elif key == "X-Client-Proto":
            d["proto"] = value
        elif key == "X-Helo-Args":
            d["helo"] = value
        elif key == "X-Client-Addr":
            d["addr"] = value
        elif key == "Received":
            while raw[pos:pos + 1] == b"\t":
                pos = raw.index(b"\n", pos) + 1
            break
    d["body"] = raw[pos:]
    return d


def as_dumped(message: bytes) -> bytes:
    """What smtp-sink writes for *message*: lines end in LF, then one empty line."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message.replace(b"\r\n", b"\n") + b"\n"


@pytest.fixture
def sink_factory():
    made = []

    def make(*flags, dump=True):
        s = Sink(*flags, dump=dump)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)


def _send_corpus_to_sink(sink, *, expect_pipelining: bool):
    async def main():
        conn = await SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO,
                                         command_timeout=5, data_timeout=5)
        assert conn.supports_pipelining is expect_pipelining
        assert conn.supports_8bitmime and not conn.tls_active
        results = []
        for k, (name, msg) in enumerate(CORPUS):
            rcpts = [f"r{k}-{j}@dest.test.example" for j in range(k % 3 + 1)]
            sender = "" if name == "empty" else f"{name}@src.test.example"
            results.append(await conn.send_message(sender, rcpts, msg))
            assert conn.is_usable
        assert conn.messages_sent == len(CORPUS)
        await conn.quit()
        assert not conn.is_usable
        return results

    results = run(main())
    for r in results:
        assert r.all_accepted and r.data_reply.code == 250 and r.data_reply.enhanced == "2.0.0"
    dumps = {d["mail"].split()[0]: d for d in sink.dumps(len(CORPUS))}
    for k, (name, msg) in enumerate(CORPUS):
        sender = "<>" if name == "empty" else f"<{name}@src.test.example>"
        d = dumps[sender]
        assert d["body"] == as_dumped(msg), name
        assert d["rcpt"] == [f"<r{k}-{j}@dest.test.example>" for j in range(k % 3 + 1)]
        assert d["helo"] == HELO and d["proto"] == "ESMTP"
        assert ("BODY=8BITMIME" in d["mail"]) is (name == "8bit")


def test_sink_pipelined_byte_exact(sink_factory):
    _send_corpus_to_sink(sink_factory(), expect_pipelining=True)


def test_sink_without_pipelining_byte_exact(sink_factory):
    _send_corpus_to_sink(sink_factory("-p"), expect_pipelining=False)


def test_sink_fifty_messages_one_connection(sink_factory):
    sink = sink_factory()
    messages = [b"Message-ID: <%d@src.test.example>\r\nSubject: n%d\r\n\r\n" % (i, i)
                + b"line %d\r\n" % i * (i % 7) + b"." * (i % 3) + b"\r\n" for i in range(50)]

    async def main():
        conn = await SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO,
                                         command_timeout=5, data_timeout=5)
        for i, msg in enumerate(messages):
            r = await conn.send_message(f"s{i}@src.test.example", [f"d{i}@dst.test.example"], msg)
            assert r.accepted(0)
        assert conn.messages_sent == 50 and conn.transactions == 50
        assert (await conn.noop()).is_ok and conn.is_usable
        await conn.quit()

    run(main())
    for d in sink.dumps(50):
        i = int(d["mail"][2:].split("@")[0])
        assert d["rcpt"] == [f"<d{i}@dst.test.example>"]
        assert d["body"] == as_dumped(messages[i])


def test_sink_source_address(sink_factory):
    sink = sink_factory()

    async def main():
        conn = await SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO,
                                         source_address="127.0.0.2", command_timeout=5)
        assert conn.local_ip == "127.0.0.2" and conn.socks5 is None
        await conn.send_message("a@src.test.example", ["b@dst.test.example"], b"Subject: s\r\n\r\nx\r\n")
        await conn.quit()

    run(main())
    [d] = sink.dumps(1)
    assert d["addr"] == "127.0.0.2"


def test_sink_greeting_421_is_temporary(sink_factory):
    sink = sink_factory("-Q", "CONNECT", dump=False)
    with pytest.raises(SmtpConnectError) as ei:
        run(SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO, command_timeout=5))
    assert ei.value.temporary and ei.value.reply.code == 421


def test_sink_greeting_5xx_is_permanent(sink_factory):
    sink = sink_factory("-f", "CONNECT", dump=False)
    with pytest.raises(SmtpConnectError) as ei:
        run(SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO, command_timeout=5))
    assert not ei.value.temporary and ei.value.reply.code == 500


def test_sink_without_esmtp_falls_back_to_helo(sink_factory):
    sink = sink_factory("-e")
    msg = b"Subject: helo\r\n\r\n.dot\r\n"

    async def main():
        conn = await SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO, command_timeout=5)
        assert not conn.esmtp and conn.extensions == {} and not conn.supports_pipelining
        with pytest.raises(Unsupported8Bit):
            await conn.send_message("a@src.test.example", ["b@dst.test.example"], b"\xe9t\xe9\r\n")
        assert conn.is_usable
        r = await conn.send_message("a@src.test.example", ["b@dst.test.example"], msg)
        assert r.accepted(0)
        await conn.quit()

    run(main())
    [d] = sink.dumps(1)
    assert d["proto"] == "SMTP" and d["body"] == as_dumped(msg) and d["mail"] == "<a@src.test.example>"


def test_sink_without_8bitmime(sink_factory):
    sink = sink_factory("-8")

    async def main():
        conn = await SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO, command_timeout=5)
        assert conn.supports_pipelining and not conn.supports_8bitmime
        with pytest.raises(Unsupported8Bit) as ei:
            await conn.send_message("a@src.test.example", ["b@dst.test.example"], CORPUS[-1][1])
        assert not ei.value.temporary and ei.value.reply.enhanced == "5.6.3"
        r = await conn.send_message("a@src.test.example", ["b@dst.test.example"], CORPUS[0][1])
        assert r.accepted(0)
        await conn.quit()

    run(main())
    [d] = sink.dumps(1)                     # the 8-bit message never went out
    assert d["body"] == as_dumped(CORPUS[0][1])


def test_sink_data_refused_then_reset(sink_factory):
    # -f DATA: DATA gets 5xx (and PIPELINING is off); the next MAIL must follow an RSET
    sink = sink_factory("-f", "DATA", "-s", "RSET", dump=False)

    async def main():
        conn = await SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO, command_timeout=5)
        for _ in range(2):
            r = await conn.send_message("a@src.test.example", ["b@dst.test.example"], b"x\r\n")
            assert r.rcpt_replies[0].is_ok and r.data_reply.code == 500
            assert not r.accepted(0) and r.reply(0).is_perm
            assert conn.is_usable
        await conn.reset()
        await conn.quit()

    run(main())


# --- aiosmtpd --------------------------------------------------------------------------------

class Handler:
    """aiosmtpd handler with scripted replies; records what it was given."""

    def __init__(self, mail_reply=None, rcpt_replies=None, data_reply=None, drop_8bitmime=False):
        self.mail_reply = mail_reply
        self.rcpt_replies = rcpt_replies or {}
        self.data_reply = data_reply
        self.drop_8bitmime = drop_8bitmime
        self.mails = []
        self.messages = []
        self.rsets = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.drop_8bitmime:
            responses = [r for r in responses if r[4:] != "8BITMIME"]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails.append((address, mail_options))
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server, session, envelope):
        self.rsets += 1
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content, list(envelope.mail_options)))
        return self.data_reply or "250 2.0.0 Ok: queued"


async def start_aiosmtpd(handler, **kw):
    loop = asyncio.get_running_loop()
    kw.setdefault("hostname", "mx.test.example")
    server = await loop.create_server(lambda: AiosmtpdServer(handler, loop=loop, **kw),
                                      "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def open_to(port, **kw):
    kw.setdefault("command_timeout", 5)
    kw.setdefault("data_timeout", 5)
    return await SmtpConnection.open("127.0.0.1", port, helo_name=HELO, **kw)


MSG = b"From: a@src.test.example\r\nSubject: test\r\n\r\n.body line\r\n"


def test_aiosmtpd_one_recipient_refused():
    h = Handler(rcpt_replies={"bad@dst.test.example": "550 5.1.1 No such user here"})
    rcpts = ["good1@dst.test.example", "bad@dst.test.example", "good2@dst.test.example"]

    async def main():
        server, port = await start_aiosmtpd(h)
        conn = await open_to(port)
        assert not conn.supports_pipelining      # aiosmtpd does not offer it
        r = await conn.send_message("a@src.test.example", rcpts, MSG)
        await conn.quit()
        server.close()
        return r

    r = run(main())
    assert [r.accepted(i) for i in range(3)] == [True, False, True]
    bad = r.rcpt_replies[1]
    assert (bad.code, bad.enhanced, bad.text) == (550, "5.1.1", "No such user here")
    assert bad.is_perm and r.reply(1) is bad and r.data_reply.is_ok
    [(sender, got_rcpts, content, _)] = h.messages
    assert sender == "a@src.test.example" and got_rcpts == [rcpts[0], rcpts[2]]
    assert content == MSG


def test_aiosmtpd_mail_refused_451():
    h = Handler(mail_reply="451 4.3.0 Try again later")

    async def main():
        server, port = await start_aiosmtpd(h)
        conn = await open_to(port)
        r = await conn.send_message("a@src.test.example", ["x@dst.test.example", "y@dst.test.example"], MSG)
        assert conn.is_usable
        h.mail_reply = None
        r2 = await conn.send_message("a@src.test.example", ["x@dst.test.example"], MSG)
        await conn.quit()
        server.close()
        return r, r2

    r, r2 = run(main())
    assert r.data_reply is None
    assert [x.code for x in r.rcpt_replies] == [451, 451]
    assert all(x.is_temp and x.enhanced == "4.3.0" for x in r.rcpt_replies)
    assert not r.accepted(0) and r2.accepted(0) and len(h.messages) == 1


def test_aiosmtpd_data_refused_554():
    h = Handler(data_reply="554 5.7.1 Message rejected as spam")

    async def main():
        server, port = await start_aiosmtpd(h)
        conn = await open_to(port)
        r = await conn.send_message("a@src.test.example", ["x@dst.test.example", "y@dst.test.example"], MSG)
        assert conn.is_usable
        h.data_reply = None
        r2 = await conn.send_message("a@src.test.example", ["x@dst.test.example"], MSG)
        await conn.quit()
        server.close()
        return r, r2

    r, r2 = run(main())
    assert all(x.is_ok for x in r.rcpt_replies)
    assert r.data_reply.code == 554 and r.data_reply.enhanced == "5.7.1"
    assert not r.accepted(0) and not r.accepted(1) and r.reply(1).is_perm
    assert r2.accepted(0)


def test_aiosmtpd_all_recipients_refused_then_next_message():
    h = Handler(rcpt_replies={"x@dst.test.example": "550 5.1.1 Unknown",
                              "y@dst.test.example": "450 4.2.1 Mailbox busy"})

    async def main():
        server, port = await start_aiosmtpd(h)
        conn = await open_to(port)
        r = await conn.send_message("a@src.test.example", ["x@dst.test.example", "y@dst.test.example"], MSG)
        assert conn.is_usable and h.rsets == 0
        r2 = await conn.send_message("b@src.test.example", ["z@dst.test.example"], MSG)
        await conn.quit()
        server.close()
        return r, r2

    r, r2 = run(main())
    assert r.data_reply is None and r.rcpt_replies[0].is_perm and r.rcpt_replies[1].is_temp
    assert r2.accepted(0) and h.rsets == 1        # the open MAIL was reset first
    assert [m[0] for m in h.messages] == ["b@src.test.example"]


def test_aiosmtpd_size_limit():
    h = Handler()

    async def main():
        server, port = await start_aiosmtpd(h, data_size_limit=1000)
        conn = await open_to(port)
        assert conn.max_size == 1000
        big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n" * 30
        big = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 30
        r = await conn.send_message("a@src.test.example", ["x@dst.test.example", "y@dst.test.example"], big)
        assert h.mails == []                         # nothing was sent
        small = await conn.send_message("a@src.test.example", ["x@dst.test.example"], MSG)
        await conn.quit()
        server.close()
        return r, small

    r, small = run(main())
    assert r.rcpt_replies == [REPLY_TOO_BIG, REPLY_TOO_BIG] and r.data_reply is None
    assert r.rcpt_replies[0].code == 552 and r.rcpt_replies[0].enhanced == "5.3.4"
    assert r.rcpt_replies[0].local        # (made up here: no server said it)
    assert not small.reply(0).local
    assert small.accepted(0)
    assert f"SIZE={len(MSG)}" in h.messages[0][3]


def test_aiosmtpd_8bit_without_8bitmime():
    h = Handler(drop_8bitmime=True)

    async def main():
        server, port = await start_aiosmtpd(h)
        conn = await open_to(port)
        assert not conn.supports_8bitmime
        with pytest.raises(Unsupported8Bit):
            await conn.send_message("a@src.test.example", ["x@dst.test.example"], "é\r\n".encode())
        with pytest.raises(Unsupported8Bit):     # the flag alone is enough
            await conn.send_message("a@src.test.example", ["x@dst.test.example"], MSG, eight_bit=True)
        assert h.mails == [] and conn.is_usable
        r = await conn.send_message("a@src.test.example", ["x@dst.test.example"], MSG)
        await conn.quit()
        server.close()
        return r

    assert run(main()).accepted(0)
    assert "BODY=8BITMIME" not in h.messages[0][3]


def test_aiosmtpd_8bit_with_8bitmime():
    h = Handler()
    msg = CORPUS[-1][1]

    async def main():
        server, port = await start_aiosmtpd(h)
        conn = await open_to(port)
        r = await conn.send_message("a@src.test.example", ["x@dst.test.example"], msg)
        await conn.quit()
        server.close()
        return r

    assert run(main()).accepted(0)
    assert h.messages[0][2] == msg and "BODY=8BITMIME" in h.messages[0][3]


def test_aiosmtpd_smtputf8():
    rcpt = "用户@例子.测试"

    async def main():
        h1, h2 = Handler(), Handler()
        s1, p1 = await start_aiosmtpd(h1, enable_SMTPUTF8=True)
        s2, p2 = await start_aiosmtpd(h2)
        c1, c2 = await open_to(p1), await open_to(p2)
        assert c1.supports_smtputf8 and not c2.supports_smtputf8
        r = await c1.send_message("a@src.test.example", [rcpt], MSG)
        with pytest.raises(UnsupportedSmtpUtf8):
            await c2.send_message("a@src.test.example", [rcpt], MSG)
        # Received with SMTPUTF8 (some clients say it on every MAIL), a UTF-8 header:
        # it needs SMTPUTF8, nothing is sent to a server without it.
        utf8_header = "Subject: Grüße\r\n".encode() + MSG
        with pytest.raises(UnsupportedSmtpUtf8):
            await c2.send_message("a@src.test.example", ["x@dst.test.example"], utf8_header,
                                  smtputf8=True)
        assert h2.mails == [] and c2.is_usable
        # ... but ASCII addresses and headers need nothing of it: sent without SMTPUTF8
        # (as Postfix does), not bounced; where it is offered it is passed on as asked.
        r2 = await c2.send_message("a@src.test.example", ["x@dst.test.example"], MSG,
                                   smtputf8=True)
        r3 = await c1.send_message("a@src.test.example", ["y@dst.test.example"], MSG,
                                   smtputf8=True)
        for c in (c1, c2):
            await c.quit()
        s1.close()
        s2.close()
        return r, h1, r2, h2, r3

    r, h1, r2, h2, r3 = run(main())
    assert r.accepted(0)
    assert h1.messages[0][1] == [rcpt] and "SMTPUTF8" in h1.messages[0][3]
    assert r2.accepted(0) and r3.accepted(0)
    assert h2.messages[0][1] == ["x@dst.test.example"] and h2.messages[0][2] == MSG
    assert "SMTPUTF8" not in h2.messages[0][3]
    assert h1.messages[1][1] == ["y@dst.test.example"] and "SMTPUTF8" in h1.messages[1][3]


def test_aiosmtpd_idn_envelope_downgraded_for_a_server_without_smtputf8():
    # A U-label domain with an ASCII local part has an all-ASCII form (its A-labels):
    # a server without SMTPUTF8 gets that (as Postfix's client sends it), not a 553
    # 5.6.7 bounce.  A UTF-8 local part has none: that recipient alone gets 553 5.6.7.
    rcpts = ["jo@bücher.example", "ü@bücher.example", "x@XN--BCHER-KVA.example"]

    async def main():
        h = Handler()
        s, p = await start_aiosmtpd(h)
        c = await open_to(p)
        assert not c.supports_smtputf8
        r = await c.send_message("news@bäckerei.example", rcpts, MSG)
        # ... a UTF-8 header still needs SMTPUTF8: nothing is sent
        with pytest.raises(UnsupportedSmtpUtf8):
            await c.send_message("a@src.test.example", ["jo@bücher.example"],
                                 "Subject: Grüße\r\n".encode() + MSG)
        # ... and so does a sender whose local part is UTF-8
        with pytest.raises(UnsupportedSmtpUtf8):
            await c.send_message("jörg@src.test.example", ["jo@bücher.example"], MSG)
        assert c.is_usable
        await c.quit()
        s.close()
        return r, h

    r, h = run(main())
    assert len(h.mails) == 1 and len(h.messages) == 1
    mail_from, got_rcpts, data, options = h.messages[0]
    assert mail_from == "news@xn--bckerei-5wa.example" and "SMTPUTF8" not in options
    assert got_rcpts == ["jo@xn--bcher-kva.example", "x@XN--BCHER-KVA.example"]   # (ASCII: as given)
    assert data == MSG
    assert r.accepted(0) and r.accepted(2) and not r.accepted(1)
    assert (r.reply(1).code, r.reply(1).enhanced) == (553, "5.6.7")


@pytest.fixture(scope="module")
def tls_material():
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test.example")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


@pytest.mark.parametrize("uv", [True, False], ids=["uvloop", "asyncio"])
def test_aiosmtpd_starttls_opportunistic(tls_material, uv):
    server_ctx, _ = tls_material
    h = Handler()

    async def main():
        server, port = await start_aiosmtpd(h, tls_context=server_ctx, require_starttls=True)
        conn = await open_to(port)
        assert conn.tls_active and conn.outbound_tls == "1"
        assert "STARTTLS" not in conn.extensions and "AUTH" in conn.extensions   # re-EHLO'd
        r = await conn.send_message("a@src.test.example", ["x@dst.test.example"], MSG)
        await conn.quit()
        plain = await open_to(port, starttls="none")
        assert not plain.tls_active and "STARTTLS" in plain.extensions
        assert plain.outbound_tls == "0"            # not asked for: plaintext
        refused = await plain.send_message("a@src.test.example", ["x@dst.test.example"], MSG)
        await plain.quit()
        server.close()
        return r, refused

    r, refused = run(main(), uv=uv)
    assert r.accepted(0) and h.messages[0][2] == MSG
    assert refused.rcpt_replies[0].code == 530 and refused.data_reply is None


def test_aiosmtpd_starttls_verified_and_required(tls_material):
    server_ctx, client_ctx = tls_material

    async def main():
        tls_server, tls_port = await start_aiosmtpd(Handler(), tls_context=server_ctx)
        plain_server, plain_port = await start_aiosmtpd(Handler())
        # verified against the trustme CA, by name
        conn = await open_to(tls_port, starttls="required", tls_verify=True,
                             tls_server_hostname="mx.test.example", tls_context=client_ctx)
        assert conn.tls_active
        await conn.quit()
        # wrong name: verification fails
        with pytest.raises(SmtpConnectError) as ei:
            await open_to(tls_port, starttls="required", tls_verify=True,
                          tls_server_hostname="other.test.example", tls_context=client_ctx)
        assert ei.value.tls_failed and ei.value.temporary and ei.value.tls == "-1"
        # the shared verifying context does not trust the test CA
        with pytest.raises(SmtpConnectError) as ei:
            await open_to(tls_port, starttls="required", tls_verify=True,
                          tls_server_hostname="mx.test.example")
        assert ei.value.tls_failed
        # required without tls_verify is encryption only (as documented): an unknown CA
        # and another name do not matter
        conn = await open_to(tls_port, starttls="required",
                             tls_server_hostname="other.test.example")
        assert conn.tls_active and conn.outbound_tls == "1"
        await conn.quit()
        # required, but not offered
        with pytest.raises(SmtpConnectError) as ei:
            await open_to(plain_port, starttls="required")
        assert ei.value.tls_failed and ei.value.temporary and ei.value.tls == "0"
        # opportunistic, not offered: plaintext
        conn = await open_to(plain_port)
        assert not conn.tls_active and conn.outbound_tls == "0"
        await conn.quit()
        tls_server.close()
        plain_server.close()

    run(main())


# --- raw scripted servers --------------------------------------------------------------------

class RawPeer(asyncio.Protocol):
    """One server-side connection driven by an async script; records every read."""

    def __init__(self, script, peers):
        self.script = script
        self.chunks: list[bytes] = []
        self.buf = bytearray()
        self.event = asyncio.Event()
        self.closed = False
        peers.append(self)

    def connection_made(self, transport):
        self.transport = transport
        self.peername = transport.get_extra_info("peername")
        self.task = asyncio.get_running_loop().create_task(self.script(self))

    def data_received(self, data):
        self.chunks.append(data)
        self.buf += data
        self.event.set()

    def connection_lost(self, exc):
        self.closed = True
        self.event.set()

    async def until(self, marker: bytes, timeout: float = 5) -> bytes:
        """Wait until *marker* was received; return everything up to and including it."""
        deadline = asyncio.get_running_loop().time() + timeout
        while marker not in self.buf:
            if self.closed:
                raise EOFError
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), deadline - asyncio.get_running_loop().time())
        i = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    def send(self, data: bytes):
        self.transport.write(data)

    async def hello(self, ehlo: bytes = b"250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"):
        """Greeting and EHLO reply."""
        self.send(b"220 raw.test.example ESMTP\r\n")
        await self.until(b"\r\n")
        self.send(b"250-raw.test.example\r\n" + ehlo)


class RawServer:
    def __init__(self, script, rcvbuf: int = 0):
        self.script = script
        self.rcvbuf = rcvbuf
        self.peers: list[RawPeer] = []

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        if self.rcvbuf:     # a small fixed receive window (no autotuning)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.server = await loop.create_server(lambda: RawPeer(self.script, self.peers),
                                               sock=sock)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for p in self.peers:
            p.transport.abort()
            p.task.cancel()
        await asyncio.gather(*(p.task for p in self.peers), return_exceptions=True)
        for p in self.peers:        # a failed assertion inside a script fails the test
            if p.task.done() and not p.task.cancelled() and p.task.exception():
                raise p.task.exception()


async def _idle(peer):
    await asyncio.sleep(LOOP_BOUND)


def test_raw_pipelining_is_one_write():
    msg = b".Leading dot\r\n\r\n.\r\nx\r\n..y\r\nno final crlf"
    stuffed = b"..Leading dot\r\n\r\n..\r\nx\r\n...y\r\nno final crlf\r\n.\r\n"
    envelope = (b"MAIL FROM:<s@src.test.example> SIZE=%d\r\n" % len(msg)
                + b"RCPT TO:<a@dst.test.example>\r\nRCPT TO:<b@dst.test.example>\r\n"
                + b"RCPT TO:<c@dst.test.example>\r\nDATA\r\n")
    seen = {}

    async def script(peer):
        await peer.hello(b"250-PIPELINING\r\n250-SIZE 100000\r\n250 ENHANCEDSTATUSCODES\r\n")
        before = len(peer.chunks)
        # no reply is sent before DATA has arrived: a client waiting for the MAIL
        # reply would time out here instead
        seen["envelope"] = await peer.until(b"DATA\r\n")
        seen["reads"] = peer.chunks[before:]
        peer.send(b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * 3 + b"354 go\r\n")
        seen["body"] = await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 Ok: queued\r\n")
        await peer.until(b"QUIT\r\n")
        peer.send(b"221 2.0.0 Bye\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            r = await conn.send_message("s@src.test.example",
                                        ["a@dst.test.example", "b@dst.test.example", "c@dst.test.example"], msg)
            await conn.quit()
            return r

    r = run(main())
    assert r.all_accepted
    assert seen["envelope"] == envelope
    assert seen["reads"] == [envelope]          # one read, one segment
    assert seen["body"] == stuffed


def test_raw_without_pipelining_one_command_at_a_time():
    seen = []

    async def script(peer):
        await peer.hello(b"250 8BITMIME\r\n")
        for reply in (b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 go\r\n"):
            await peer.until(b"\r\n")
            await asyncio.sleep(0.01)           # anything pipelined would have arrived by now
            seen.append(peer.chunks[-1])
            assert not peer.buf                 # exactly one command per read
            peer.send(reply)
        await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 Ok\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            r = await conn.send_message("s@x.test", ["a@y.test", "b@y.test"], b"hi\r\n")
            conn.close()
            return r

    assert run(main()).all_accepted
    assert seen == [b"MAIL FROM:<s@x.test>\r\n", b"RCPT TO:<a@y.test>\r\n",
                    b"RCPT TO:<b@y.test>\r\n", b"DATA\r\n"]


def test_raw_data_refused_then_rset_pipelined():
    seen = []

    async def script(peer):
        await peer.hello()
        seen.append(await peer.until(b"DATA\r\n"))
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n554 5.5.1 No data for you\r\n")
        seen.append(await peer.until(b"DATA\r\n"))
        peer.send(b"250 2.0.0 Reset\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 Ok\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            r1 = await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            assert conn.is_usable
            r2 = await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            conn.close()
            return r1, r2

    r1, r2 = run(main())
    assert r1.data_reply.code == 554 and not r1.accepted(0) and r2.accepted(0)
    envelope = b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"
    assert seen == [envelope, b"RSET\r\n" + envelope]


def test_raw_multiline_replies_with_enhanced_codes():
    async def script(peer):
        peer.send(b"220-raw.test.example ESMTP\r\n220-second\r\n220 third\r\n")
        await peer.until(b"\r\n")
        peer.send(b"250-raw.test.example\r\n250-PIPELINING\r\n250-SIZE\r\n"
                  b"250-ENHANCEDSTATUSCODES\r\n250 \r\n")
        await peer.until(b"DATA\r\n")
        # replies arrive in awkward pieces
        for piece in (b"250 2.1", b".0 Ok\r\n550-5.1.1 The email account\r\n550-5.1.1 ",
                      b"does not exist.\r\n550 5.1.1 See https://help.test/x\r\n",
                      b"250 2.1.5 Ok\r\n35", b"4 go\r\n"):
            peer.send(piece)
            await asyncio.sleep(0.005)
        await peer.until(b"\r\n.\r\n")
        peer.send(b"250-2.0.0 Ok\r\n250 2.0.0 queued as 1234\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            assert conn.greeting.text == "raw.test.example ESMTP\nsecond\nthird"
            assert conn.max_size is None and conn.supports_pipelining
            r = await conn.send_message("s@x.test", ["a@y.test", "b@y.test"], b"hi\r\n")
            conn.close()
            return r

    r = run(main())
    bad = r.rcpt_replies[0]
    assert (bad.code, bad.enhanced) == (550, "5.1.1")
    assert bad.text == "The email account\ndoes not exist.\nSee https://help.test/x"
    assert str(bad) == "550 5.1.1 The email account does not exist. See https://help.test/x"
    assert r.accepted(1) and not r.accepted(0)
    assert r.data_reply == SmtpReply(250, "2.0.0", "Ok\nqueued as 1234")


def test_raw_overlong_reply():
    async def long_ehlo(peer):
        peer.send(b"220 raw\r\n")
        await peer.until(b"\r\n")
        peer.send(b"250-raw\r\n" + b"250-" + b"X" * 1000 + b"\r\n" * 1)
        for _ in range(MAX_REPLY_BYTES // 1006 + 2):
            peer.send(b"250-" + b"X" * 1000 + b"\r\n")
        peer.send(b"250 end\r\n")
        await asyncio.sleep(LOOP_BOUND)

    async def endless_line(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        for _ in range(MAX_REPLY_BYTES // 8192 + 2):
            peer.send(b"2" * 8192)
            await asyncio.sleep(0)
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        async with RawServer(long_ehlo) as srv:
            with pytest.raises(SmtpProtocolError):
                await open_to(srv.port, command_timeout=2)
        async with RawServer(endless_line) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            with pytest.raises(SmtpProtocolError):
                await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            assert not conn.is_usable

    run(main())


def test_raw_timeouts():
    async def silent(peer):
        await asyncio.sleep(LOOP_BOUND)

    async def silent_after_mail(peer):
        await peer.hello()
        await asyncio.sleep(LOOP_BOUND)

    async def silent_after_dot(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        loop = asyncio.get_running_loop()
        async with RawServer(silent) as srv:
            t0 = loop.time()
            with pytest.raises(SmtpTimeout) as ei:
                await open_to(srv.port, command_timeout=0.5)
            assert 0.45 <= loop.time() - t0 < NO_HANG and ei.value.temporary
        async with RawServer(silent_after_mail) as srv:
            conn = await open_to(srv.port, command_timeout=0.5)
            t0 = loop.time()
            with pytest.raises(SmtpTimeout):
                await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            assert 0.45 <= loop.time() - t0 < NO_HANG
            assert not conn.is_usable
            await conn.quit()               # never raises
            with pytest.raises(SmtpConnectionLost):
                await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
        async with RawServer(silent_after_dot) as srv:
            # data_timeout, not command_timeout, bounds the wait for the reply to the dot:
            # the gap between them is wide enough for a loaded machine.
            conn = await open_to(srv.port, command_timeout=3 * NO_HANG, data_timeout=0.5)
            t0 = loop.time()
            with pytest.raises(SmtpTimeout):
                await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            assert 0.45 <= loop.time() - t0 < NO_HANG
            assert not conn.is_usable
            await srv.peers[0].until(b"\r\n.\r\n")  # the message did go out whole

    run(main())


def test_raw_large_message_exact_bytes():
    # > SINGLE_WRITE_MAX, leading dot, dots inside, no final CRLF; the peer reads slowly
    msg = b".first\r\n" + b"0123456789 .x\r\n.\r\n..\r\n" * 150_000 + b"tail"
    got = {}

    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        peer.transport.pause_reading()
        await asyncio.sleep(0.2)
        peer.transport.resume_reading()
        got["body"] = await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 Ok\r\n")

    async def main():
        async with RawServer(script, rcvbuf=32768) as srv:
            conn = await open_to(srv.port, command_timeout=2, data_timeout=10)
            r = await conn.send_message("s@x.test", ["a@y.test"], msg)
            conn.close()
            return r

    assert run(main()).accepted(0)
    assert got["body"] == dot_stuff(msg)
    assert got["body"].startswith(b"..first\r\n0123456789 .x\r\n..\r\n...\r\n")
    assert got["body"].endswith(b"\r\ntail\r\n.\r\n")


def test_raw_data_timeout_while_peer_stops_reading():
    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.transport.pause_reading()
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        loop = asyncio.get_running_loop()
        async with RawServer(script, rcvbuf=32768) as srv:
            conn = await open_to(srv.port, command_timeout=3 * NO_HANG, data_timeout=0.5)
            t0 = loop.time()
            with pytest.raises(SmtpTimeout) as ei:
                await conn.send_message("s@x.test", ["a@y.test"], (b"x" * 78 + b"\r\n") * 100_000)
            assert "not accepted" in str(ei.value)      # stuck writing, not waiting for a reply
            assert 0.45 <= loop.time() - t0 < NO_HANG and not conn.is_usable

    run(main())


def test_raw_connection_dropped_mid_data():
    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        await peer.until(b"line")           # some of the body, then hang up
        peer.transport.abort()

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2, data_timeout=2)
            with pytest.raises(SmtpConnectionLost) as ei:
                await conn.send_message("s@x.test", ["a@y.test"], b"line\r\n" * 200_000)
            assert type(ei.value) is SmtpConnectionLost
            assert ei.value.temporary and not conn.is_usable
            await conn.quit()

    run(main())


def test_raw_connection_lost_after_the_dot_names_what_each_recipient_was_told():
    """Lost before the reply to the dot: the message may have been delivered to the
    recipients the server took; the exception says which (the others' refusals stand)."""
    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
        await peer.until(b"\r\n.\r\n")
        peer.transport.abort()

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2, data_timeout=2)
            with pytest.raises(SmtpConnectionLost) as ei:
                await conn.send_message("s@x.test", ["a@y.test", "b@y.test"], b"hi\r\n")
            assert not ei.value.unsent and not conn.is_usable
            assert [(r.code, r.enhanced) for r in ei.value.rcpt_replies] == [
                (250, "2.1.5"), (550, "5.1.1")]

    run(main())


def test_raw_421_mid_transaction():
    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n421 4.3.2 Shutting down\r\n")
        peer.transport.close()

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            r = await conn.send_message("s@x.test", ["a@y.test", "b@y.test", "c@y.test"], b"hi\r\n")
            assert not conn.is_usable
            return r

    r = run(main())
    assert [x.code for x in r.rcpt_replies] == [250, 421, 421]
    assert r.data_reply.code == 421 and r.data_reply.enhanced == "4.3.2"
    assert not r.accepted(0) and r.reply(0).is_temp and r.reply(1).is_temp


def test_raw_idle_421_makes_connection_unusable():
    async def script(peer):
        await peer.hello()
        await asyncio.sleep(0.05)
        peer.send(b"421 4.4.2 Idle timeout\r\n")
        peer.transport.close()

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            assert conn.is_usable
            for _ in range(100):            # bounded: ~1 s
                if not conn.is_usable:
                    break
                await asyncio.sleep(0.01)
            assert not conn.is_usable
            with pytest.raises(SmtpConnectionLost):
                await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            await conn.quit()

    run(main())


def test_raw_garbage_greeting_and_refused_connection():
    async def http(peer):
        peer.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        async with RawServer(http) as srv:
            with pytest.raises(SmtpProtocolError):
                await open_to(srv.port, command_timeout=2)
        with pytest.raises(SmtpConnectError) as ei:
            await open_to(free_port(), connect_timeout=2)
        assert ei.value.temporary and ei.value.reply is None

    run(main())


def test_source_trouble_is_not_destination_trouble():
    """A source address that cannot be bound is SourceUnavailable at once (the connect
    timeout is longer than the loop's bound: waiting on it would fail the test), and the
    destination never sees a connection; a refused destination is not the source's fault,
    nor is a destination of the other IP version than the source."""
    async def greet(peer):
        await peer.hello()
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        unbindable = {}
        async with RawServer(greet) as srv:
            for source in ("192.0.2.10", "not-an-address"):
                with pytest.raises(SourceUnavailable) as ei:
                    await open_to(srv.port, source_address=source, connect_timeout=2 * LOOP_BOUND)
                unbindable[source] = ei.value
            conn = await open_to(srv.port, source_address="127.0.0.2", command_timeout=2)
            assert conn.local_ip == "127.0.0.2"
            conn.abort()
            peers = [p.peername[0] for p in srv.peers]
        with pytest.raises(SmtpConnectError) as refused:
            await open_to(free_port(), source_address="127.0.0.2", connect_timeout=2)
        with pytest.raises(SmtpConnectError) as mismatch:
            await SmtpConnection.open("::1", 25, helo_name=HELO, source_address="127.0.0.2",
                                      connect_timeout=2)
        return unbindable, peers, refused.value, mismatch.value

    unbindable, peers, refused, mismatch = run(main())
    for source, exc in unbindable.items():
        assert exc.source == source and exc.temporary and exc.reply is None
        assert not isinstance(exc, SmtpConnectError)
    assert unbindable["192.0.2.10"].reason == \
        "cannot bind source address 192.0.2.10 (Cannot assign requested address)"
    assert "not an IP address" in unbindable["not-an-address"].reason
    assert peers == ["127.0.0.2"]       # only the bound connection got there
    assert not isinstance(refused, SourceUnavailable) and "Connection refused" in str(refused)
    assert not isinstance(mismatch, SourceUnavailable) and "IPv6" in str(mismatch)


def test_starttls_refused_goes_on_in_plaintext_and_says_so():
    # Opportunistic: a 454 to STARTTLS is no reason not to deliver, but the events say
    # TLS was offered and not negotiated (SparkPost's outbound_tls "-1").
    async def script(peer):
        await peer.hello(b"250-PIPELINING\r\n250 STARTTLS\r\n")
        await peer.until(b"STARTTLS\r\n")
        peer.send(b"454 4.7.0 TLS not available due to temporary reason\r\n")
        await peer.until(b"QUIT\r\n")
        peer.send(b"221 bye\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=5)
            tls = (conn.tls_active, conn.tls_refused, conn.outbound_tls)
            await conn.quit()
            return tls

    assert run(main()) == (False, True, "-1")


def test_raw_starttls_reply_with_injected_data_fails():
    # Plaintext sent behind the STARTTLS go-ahead must never be read as a reply: the client
    # refuses the connection at once, naming the injected reply, and sends nothing more (no
    # ClientHello, no EHLO).  A client without the defence would start the handshake and fail
    # only on its timeout, with a different reason and no reply attached.
    async def script(peer):
        await peer.hello(b"250-PIPELINING\r\n250 STARTTLS\r\n")
        await peer.until(b"STARTTLS\r\n")
        peer.send(b"220 2.0.0 Go ahead\r\n250 2.1.0 injected\r\n")
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        async with RawServer(script) as srv:
            with pytest.raises(SmtpConnectError) as ei:
                await open_to(srv.port, command_timeout=5)
            peer = srv.peers[0]
            while not peer.closed:          # the client dropped the connection
                peer.event.clear()
                await peer.event.wait()
            return ei.value, bytes(peer.buf)

    err, after_starttls = run(main())
    assert err.tls_failed and err.temporary and err.tls == "-1"
    assert str(err).startswith("connection broken at STARTTLS")
    assert err.reply is not None
    assert (err.reply.code, err.reply.enhanced, err.reply.text) == (250, "2.1.0", "injected")
    assert after_starttls == b""


def test_bad_addresses_are_not_sent():
    async def script(peer):
        await peer.hello()
        got = await peer.until(b"DATA\r\n")
        assert got == b"MAIL FROM:<s@x.test>\r\nRCPT TO:<ok@y.test>\r\nDATA\r\n"
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 Ok\r\n")
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        async with RawServer(script) as srv:
            for bad in ("", "bad\r\nname", "ünï.example"):
                with pytest.raises(ValueError):
                    await SmtpConnection.open("127.0.0.1", srv.port, helo_name=bad)
            with pytest.raises(ValueError):
                await SmtpConnection.open("127.0.0.1", srv.port, helo_name=HELO, starttls="maybe")
            conn = await open_to(srv.port, command_timeout=2)
            r0 = await conn.send_message("s@x.test\r\nRSET", ["a@y.test"], b"hi\r\n")
            r = await conn.send_message("s@x.test", ["x@y.test>\r\nDATA", "ok@y.test", ""], b"hi\r\n")
            conn.close()
            return r0, r

    r0, r = run(main())
    assert r0.rcpt_replies[0].enhanced == "5.1.7" and r0.data_reply is None
    assert [x.code for x in r.rcpt_replies] == [553, 250, 553]
    assert r.accepted(1) and not r.accepted(0)


def test_busy_connection_refuses_a_second_call():
    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        await asyncio.sleep(0.2)
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 Ok\r\n")
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            first = asyncio.ensure_future(conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n"))
            await asyncio.sleep(0.05)
            with pytest.raises(RuntimeError):
                await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            assert (await first).accepted(0) and conn.is_usable
            # a cancelled call leaves the server in an unknown state: the connection is closed
            task = asyncio.ensure_future(conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not conn.is_usable

    run(main())


def test_dsn_params_from_a_job_are_checked_again():
    """Only RFC 3461 syntax reaches a MAIL or RCPT line; anything else is dropped."""
    from mta.delivery.client import DsnParams
    assert DsnParams.from_params({"BODY": "8BITMIME"}) is None
    p = DsnParams.from_params({"ENVID": "E+2B1", "RET": "HDRS",
                               "NOTIFY": ["SUCCESS,DELAY", "", "NEVER\r\nRSET"],
                               "ORCPT": ["rfc822;a+2Bb@x.test", "rfc822;a b", ""]})
    assert p.mail_params() == " RET=HDRS ENVID=E+2B1"
    assert p.rcpt_params(0) == " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+2Bb@x.test"
    assert p.rcpt_params(1) == "" and p.rcpt_params(2) == "" and p.rcpt_params(9) == ""
    bad = DsnParams.from_params({"ENVID": "x y\r\nQUIT", "RET": "hdrs", "NOTIFY": "NEVER"})
    assert bad.mail_params() == "" and bad.rcpt_params(0) == ""
    # the recipients sent again in another transaction keep their own parameters
    sub = p.subset([2, 0])
    assert sub.mail_params() == p.mail_params()
    assert sub.rcpt_params(0) == "" and sub.rcpt_params(1) == p.rcpt_params(0)
    # a utf-8 ORCPT taken as UTF-8 (utf-8-addr-unitext, with SMTPUTF8) goes on as
    # utf-8-addr-xtext, which any next hop takes (RFC 6533 3)
    p = DsnParams.from_params({"NOTIFY": ["", ""],
                               "ORCPT": ["utf-8;j\u00fcrgen\\x{E9}@x.test", "rfc822;\u00fc@x"]})
    assert p.rcpt_params(0) == " ORCPT=utf-8;j\\x{FC}rgen\\x{E9}@x.test"
    assert p.rcpt_params(1) == ""


def test_over_limit_names_the_452s_after_an_acceptance_in_a_delivered_transaction():
    ok, ok_data = SmtpReply(250, "2.1.5", "ok"), SmtpReply(250, "2.0.0", "queued")
    limit, other = SmtpReply(452, "4.5.3", "Too many recipients"), SmtpReply(450, "4.2.1", "busy")
    r = DeliveryResult([limit, ok, other, limit, SmtpReply(451, "4.5.3", "too many")], ok_data)
    assert r.over_limit() == [3, 4]         # not the 452 before any acceptance, nor the 450
    assert DeliveryResult([ok, limit], SmtpReply(451, "4.3.0", "later")).over_limit() == []
    assert DeliveryResult([ok, limit], None).over_limit() == []
    # a 452 whose enhanced code names the recipient's own trouble (4.2.2 mailbox full,
    # RFC 3463) is that recipient's deferral, not the server's recipient limit
    full = SmtpReply(452, "4.2.2", "Mailbox full")
    assert DeliveryResult([ok, full, SmtpReply(452, None, "x")], ok_data).over_limit() == [2]


# --- cross-transaction pipelining: the next envelope behind the final dot ----------------------

def _chained(conn, jobs):
    """A ``then`` that prepares each of *jobs* (sender, rcpts, message) in turn, and
    the list of the transactions it made, in order."""
    made = []
    it = iter(jobs)

    def then(c):
        assert c is conn
        job = next(it, None)
        if job is None:
            return None
        txn = c.prepare(*job)
        made.append(txn)
        return txn

    return then, made


def test_sink_corpus_chained_byte_exact(sink_factory):
    """Postfix's smtp-sink takes each next envelope behind the previous final dot."""
    sink = sink_factory()
    jobs = []
    for k, (name, msg) in enumerate(CORPUS):
        rcpts = [f"r{k}-{j}@dest.test.example" for j in range(k % 3 + 1)]
        jobs.append(("" if name == "empty" else f"{name}@src.test.example", rcpts, msg))

    async def main():
        conn = await SmtpConnection.open("127.0.0.1", sink.port, helo_name=HELO,
                                         command_timeout=5, data_timeout=5)
        then, made = _chained(conn, jobs[1:])
        results = [await conn.send_message(*jobs[0], then=then)]
        while len(results) < len(jobs):
            results.append(await conn.send_prepared(made[len(results) - 1], then=then))
        assert all(t.sent for t in made) and len(made) == len(jobs) - 1
        assert conn.messages_sent == conn.transactions == len(jobs)
        assert conn.is_usable and (await conn.noop()).is_ok
        await conn.quit()
        return results

    results = run(main())
    assert all(r.all_accepted for r in results)
    dumps = {d["mail"].split()[0]: d for d in sink.dumps(len(CORPUS))}
    for k, (name, msg) in enumerate(CORPUS):
        d = dumps["<>" if name == "empty" else f"<{name}@src.test.example>"]
        assert d["body"] == as_dumped(msg), name
        assert d["rcpt"] == [f"<r{k}-{j}@dest.test.example>" for j in range(k % 3 + 1)]


def test_raw_next_envelope_goes_out_with_the_final_dot():
    env1 = b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"
    env2 = b"MAIL FROM:<t@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    seen = {}

    async def script(peer):
        await peer.hello()
        await peer.until(env1)
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        before = len(peer.chunks)
        # the next envelope arrives before the message's reply is sent: a client that
        # waited for that reply first would time out here
        seen["dot+env2"] = await peer.until(env2)
        seen["reads"] = peer.chunks[before:]
        peer.send(b"250 2.0.0 queued 1\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no c\r\n"
                  b"354 go\r\n")
        seen["body2"] = await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 queued 2\r\n")
        await peer.until(b"QUIT\r\n")
        peer.send(b"221 bye\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            then, made = _chained(conn, [("t@x.test", ["b@y.test", "c@y.test"], b"two\r\n")])
            r1 = await conn.send_message("s@x.test", ["a@y.test"], b"one\r\n", then=then)
            with pytest.raises(RuntimeError):       # the sent-ahead one must run first
                await conn.noop()
            r2 = await conn.send_prepared(made[0], then=then)
            assert conn.transactions == 2 and conn.messages_sent == 2
            await conn.quit()
            return r1, r2

    r1, r2 = run(main())
    assert r1.accepted(0) and r1.data_reply.text == "queued 1"
    assert r2.accepted(0) and not r2.accepted(1) and r2.rcpt_replies[1].code == 550
    assert seen["dot+env2"] == b"one\r\n.\r\n" + env2
    assert seen["reads"] == [b"one\r\n.\r\n" + env2]      # one write, one segment
    assert seen["body2"] == b"two\r\n.\r\n"


def test_raw_421_after_the_message_the_next_is_not_run():
    """The server goes away after the message: the next transaction, whose envelope
    went out ahead, was never run -- nothing of its message is sent; QUIT is not sent
    into a DATA the server may hold open."""
    got = {}

    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
        await peer.until(b"\r\n.\r\nMAIL FROM:<t@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        peer.send(b"421 4.3.2 shutting down\r\n")
        try:
            await peer.until(b"\r\n", timeout=1)
        except (EOFError, asyncio.TimeoutError):
            pass
        got["after"] = bytes(peer.buf)

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            then, made = _chained(conn, [("t@x.test", ["b@y.test"], b"two\r\n")])
            r1 = await conn.send_message("s@x.test", ["a@y.test"], b"one\r\n", then=then)
            assert r1.data_reply.code == 421 and not conn.is_usable
            with pytest.raises(SmtpConnectionLost):
                await conn.send_prepared(made[0])
            await conn.quit()
            await asyncio.sleep(0.2)
            return made

    made = run(main())
    assert made[0].sent
    assert got["after"] == b""          # no message text, no QUIT


def test_raw_quit_with_an_envelope_ahead_closes_without_quit():
    got = {}

    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
        await peer.until(b"\r\n.\r\n")
        await peer.until(b"DATA\r\n")
        peer.send(b"250 queued\r\n250 Ok\r\n250 Ok\r\n354 go\r\n")
        try:
            await peer.until(b"\r\n", timeout=2)
        except EOFError:
            got["eof"] = True
        got["after"] = bytes(peer.buf)

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            then, made = _chained(conn, [("t@x.test", ["b@y.test"], b"two\r\n")])
            r1 = await conn.send_message("s@x.test", ["a@y.test"], b"one\r\n", then=then)
            assert r1.accepted(0)
            await conn.quit()        # the engine's worker gave up before running it
            await asyncio.sleep(0.3)

    run(main())
    assert got == {"eof": True, "after": b""}


def test_raw_refused_message_then_the_next_goes_on_and_a_refused_envelope_is_reset():
    seen = []

    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
        seen.append(await peer.until(b"DATA\r\n"))
        # message 1 refused; message 2's only recipient refused, so DATA is too
        peer.send(b"554 5.7.1 spam\r\n250 Ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
        seen.append(await peer.until(b"DATA\r\n"))
        peer.send(b"250 2.0.0 Reset\r\n250 Ok\r\n250 Ok\r\n354 go\r\n")
        seen.append(await peer.until(b"\r\n.\r\n"))
        peer.send(b"250 2.0.0 queued 3\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            then, made = _chained(conn, [("t@x.test", ["b@y.test"], b"two\r\n")])
            r1 = await conn.send_message("s@x.test", ["a@y.test"], b"one\r\n", then=then)
            r2 = await conn.send_prepared(made[0], then=then)   # no body: then is not asked
            r3 = await conn.send_message("u@x.test", ["c@y.test"], b"three\r\n")
            conn.close()
            return r1, r2, r3, made

    r1, r2, r3, made = run(main())
    assert r1.data_reply.code == 554 and not r1.accepted(0)
    assert r2.rcpt_replies[0].code == 550 and r2.data_reply is None and not r2.accepted(0)
    assert len(made) == 1
    assert r3.accepted(0) and r3.data_reply.text == "queued 3"
    assert seen == [b"one\r\n.\r\nMAIL FROM:<t@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n",
                    b"RSET\r\nMAIL FROM:<u@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n",
                    b"three\r\n.\r\n"]


def test_raw_no_envelope_ahead_without_pipelining():
    asked = []

    async def script(peer):
        await peer.hello(b"250 8BITMIME\r\n")
        for reply in (b"250 Ok\r\n", b"250 Ok\r\n", b"354 go\r\n"):
            await peer.until(b"\r\n")
            peer.send(reply)
        await peer.until(b"\r\n.\r\n")
        await asyncio.sleep(0.05)
        assert not peer.buf             # nothing behind the final dot
        peer.send(b"250 Ok\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            r = await conn.send_message("s@x.test", ["a@y.test"], b"one\r\n",
                                        then=lambda c: asked.append(c))
            conn.close()
            return r

    assert run(main()).accepted(0)
    assert asked == []


@pytest.mark.parametrize("replies, where", [
    # DATA answered 250 instead of 354: the message was never sent
    (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n", "DATA"),
    # a 3xx to RCPT (replies out of step with the commands)
    (b"250 2.1.0 Ok\r\n354 go\r\n354 go\r\n", "RCPT"),
    # a 3xx to MAIL
    (b"354 go\r\n250 2.1.5 Ok\r\n354 go\r\n", "MAIL"),
])
def test_a_positive_reply_out_of_place_is_a_temporary_failure_not_a_delivery(replies, where):
    """Only 2xx, 4xx and 5xx answer MAIL, RCPT and the end of data, and only 354 lets the
    message go: anything else (a server out of step, or not SMTP) used to read as "not
    refused" -- a recipient reported delivered whose message was never sent.  Now each is
    a temporary failure (451 4.5.0) and the connection, whose replies no longer match its
    commands, is closed."""
    seen = {}

    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(replies)
        try:
            seen["more"] = await peer.until(b"\r\n", timeout=0.5)
        except (EOFError, asyncio.TimeoutError):
            seen["more"] = b""

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            r = await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            for _ in range(100):                # (the script's last read ends)
                if "more" in seen:
                    break
                await asyncio.sleep(0.02)
            return r, conn.is_usable

    r, usable = run(main())
    assert not r.accepted(0) and not usable
    decisive = r.reply(0)
    assert (decisive.code, decisive.enhanced) == (451, "4.5.0"), decisive
    assert decisive.local                       # our words on the server's reply
    assert seen["more"] == b""                  # no message text went out


def test_without_pipelining_the_whole_envelope_gets_one_command_timeout():
    """A server without PIPELINING that takes its time over each command: each reply
    came within command_timeout, so 50 RCPTs at 20 s each took 1,000 s and the spool,
    which counts on an outcome within connect + 2 x command + data timeouts, sent the
    job again meanwhile.  The envelope as a whole now gets one command_timeout, as a
    pipelined one does."""
    async def script(peer):
        await peer.hello(b"250 8BITMIME\r\n")
        while True:
            line = await peer.until(b"\r\n")
            await asyncio.sleep(0.3)
            peer.send(b"354 go\r\n" if line == b"DATA\r\n" else b"250 ok\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=1.0)
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(SmtpTimeout):
                await conn.send_message("s@x.test", [f"r{i}@y.test" for i in range(6)],
                                        b"hi\r\n")
            return asyncio.get_running_loop().time() - t0

    took = run(main())
    assert took < 1.5, took         # (one command_timeout, not 8 x 0.3 s)


@pytest.mark.parametrize("after", [b"\r\n", b"garbage\r\n", b"250-" + b"x" * MAX_REPLY_BYTES])
def test_a_final_250_followed_by_a_bad_line_in_the_same_segment_is_a_delivery(after):
    """The server took the message (250 to the final dot), then broke the protocol in the
    same TCP segment (a stray empty line, a garbage line, an over-long reply).  The parser
    raised on the bad line and every reply of that segment was thrown away with it: the
    message was reported not delivered (deferred) and sent again -- a duplicate -- while
    the same bytes in two segments gave a delivery.  The replies before the bad line
    count; the connection is dropped all the same."""
    p = ReplyParser()
    with pytest.raises(SmtpProtocolError) as ei:
        p.feed(b"250 2.0.0 queued as X\r\n" + after)
    assert [r.code for r in ei.value.replies] == [250]

    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
        await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 queued as X\r\n" + after)
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            r = await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            for _ in range(100):                # the bad line is seen: not reused
                if not conn.is_usable:
                    break
                await asyncio.sleep(0.01)
            return r, conn.is_usable, conn.messages_sent

    r, usable, sent = run(main())
    assert r.accepted(0) and r.data_reply.text == "queued as X"
    assert sent == 1 and not usable


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("said, expected", [
    # Exim's "drop" ACL verb: the refusal, then the connection closed
    (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.7.1 Go away\r\n", [None, (550, "5.7.1")]),
    (b"550 5.7.1 Sender refused\r\n", [(550, "5.7.1"), (550, "5.7.1")]),
    (b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n", [(550, "5.1.1"), None]),
])
def test_a_refusal_followed_by_a_hang_up_is_the_servers_answer(pipelining, said, expected):
    """A server that refuses MAIL or a RCPT and then closes the connection (Exim's "drop")
    has said its word on those: they are its refusal in the result, not a lost connection
    that defers every recipient again and again; a recipient it did not answer (None
    above), or accepted, is a temporary failure (451 4.4.2): nothing was sent."""
    async def script(peer):
        await peer.hello(b"250-PIPELINING\r\n250 8BITMIME\r\n" if pipelining else
                         b"250 8BITMIME\r\n")
        lines = said.split(b"\r\n")[:-1]
        if pipelining:
            await peer.until(b"DATA\r\n")
            peer.send(said)
        else:
            for line in lines:
                await peer.until(b"\r\n")
                peer.send(line + b"\r\n")
        peer.transport.close()

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            r = await conn.send_message("s@x.test", ["a@y.test", "b@y.test"], b"hi\r\n")
            # (one command at a time, a refused MAIL is the end: the hang-up comes later)
            assert not conn.is_usable or not pipelining
            return r

    r = run(main())
    got = [(r.reply(i).code, r.reply(i).enhanced) for i in range(2)]
    assert got == [e or (451, "4.4.2") for e in expected]
    assert not r.accepted(0) and not r.accepted(1)


def test_the_tls_floor_is_tls_1_2_whatever_the_hosts_openssl_policy():
    """Both shared client contexts refuse a server that speaks only TLS 1.1 (or older):
    the floor is set here, not left to the host's OpenSSL configuration (with a laxer
    one, the opportunistic context negotiated TLS 1.0).  Opportunistically, the engine
    then sends to that host in plaintext (test_engine's broken-handshake tests)."""
    import warnings

    from mta.delivery.client import _default_tls_context
    for verify in (False, True):
        assert _default_tls_context(verify).minimum_version == ssl.TLSVersion.TLSv1_2
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("mx.test.example").configure_cert(server_ctx)
    server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
        server_ctx.maximum_version = ssl.TLSVersion.TLSv1_1

    async def main():
        server, port = await start_aiosmtpd(Handler(), tls_context=server_ctx)
        try:
            with pytest.raises(SmtpConnectError) as ei:
                await open_to(port)             # opportunistic, the shared context
            assert ei.value.tls_failed and ei.value.tls == "-1"
        finally:
            server.close()

    run(main())


def test_starttls_advertised_twice_and_again_after_tls_is_done_once(tls_material):
    """A server listing STARTTLS twice in its EHLO reply, and again after the upgrade
    (RFC 3207 4.2 says it must not): one STARTTLS, then the transaction, inside TLS."""
    server_ctx, _ = tls_material
    seen = {}

    async def script(peer):
        ehlo = b"250-PIPELINING\r\n250-STARTTLS\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
        await peer.hello(ehlo)
        seen["starttls"] = await peer.until(b"\r\n")
        peer.send(b"220 2.0.0 go ahead\r\n")
        loop = asyncio.get_running_loop()
        peer.transport = await loop.start_tls(peer.transport, peer, server_ctx,
                                              server_side=True)
        seen["ehlo"] = await peer.until(b"\r\n")
        peer.send(b"250-raw.test.example\r\n" + ehlo)
        seen["envelope"] = await peer.until(b"DATA\r\n")
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        await peer.until(b"\r\n.\r\n")
        peer.send(b"250 2.0.0 Ok\r\n")

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            assert conn.tls_active and conn.outbound_tls == "1"
            r = await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            conn.close()
            return r

    assert run(main()).accepted(0)
    assert seen["starttls"] == b"STARTTLS\r\n" and seen["ehlo"].startswith(b"EHLO ")
    assert seen["envelope"] == b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"


def test_a_reply_more_than_the_envelope_asked_is_named_as_the_reason():
    """A server that answers the pipelined envelope with one reply too many (MAIL, RCPT,
    DATA's 354, then a 250 nothing asked for) breaks the protocol: the client drops the
    connection before it writes the message.  The failure said "connection closed" (the
    write found the transport gone), as if the server had hung up: the reason in the delay
    event and the logs named no protocol error and no reply."""
    async def script(peer):
        await peer.hello()
        await peer.until(b"DATA\r\n")
        peer.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 surprise\r\n")
        await asyncio.sleep(LOOP_BOUND)

    async def main():
        async with RawServer(script) as srv:
            conn = await open_to(srv.port, command_timeout=2)
            with pytest.raises(SmtpProtocolError) as ei:
                await conn.send_message("s@x.test", ["a@y.test"], b"hi\r\n")
            await asyncio.sleep(0.2)
            return ei.value, srv.peers[0].buf

    exc, got = run(main())
    assert "unexpected reply" in str(exc) and "surprise" in str(exc), exc
    assert exc.temporary and [r.code for r in exc.rcpt_replies] == [250]
    assert b"hi" not in got                      # nothing of the message went out
