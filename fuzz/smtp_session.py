"""Whole-session target: the SMTP session on a fake transport, input split anywhere.

The real :class:`mta.acceptor.smtp.Session` and acceptor run on the fake loop
and transport of tests/acceptor/fake.py (no sockets, a spool that answers ok,
fail or not yet, as the input says).  The input chooses small limits, the
client's address (a relay network or not), whether STARTTLS/AUTH are offered,
how the client's bytes are split, and between pieces: the spool's answers,
time passing (the idle check) and a drain.  It fails when

- any exception leaves the session (a traceback in a real acceptor);
- the server writes anything that is not a well-formed SMTP reply (three
  digits 2xx-5xx, SP or '-', printable text, CRLF; a multi-line reply keeps
  its code), or a reply that speaks of an internal error or a traceback;
- reading stays paused with nothing the session waits for (a hang);
- the session writes after it closed the connection;
- the compiled scanner and the pure twin give different conversations or
  different messages handed to the spool (queue ids aside).
"""
from __future__ import annotations

import glob
import os
import re

from fuzz.common import REPO, Divergence, Input, tests_on_path

tests_on_path()
from acceptor import fake  # noqa: E402  (tests/acceptor/fake.py)

from mta.acceptor import smtp  # noqa: E402

REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([\x20-\x7e]*)\Z")
FORBIDDEN = re.compile(rb"internal|traceback|exception|error:", re.I)
QID = re.compile(rb"[0-9A-F]{20}")
PEERS = (("127.0.0.1", 4000), ("192.0.2.7", 4000), ("::1", 4000, 0, 0))
ANSWERS = ("ok", "ok", "fail", "hold")
LIMITS = (
    {},
    {"max_command_line": 40, "max_text_line": 30, "max_message_size": 200,
     "max_recipients": 3, "max_errors": 6},
    {"max_command_line": 512, "max_text_line": 1000, "max_message_size": 2000,
     "max_recipients": 2, "max_errors": 3, "max_buffered_input": 64},
)
USER, PASSWORD = "alice", "secret"
ACTIONS = 4    # per cut: 0 nothing, 1 the spool answers what it holds, 2 idle time, 3 drain


def _settings(variant: int):
    return fake.settings(LIMITS[variant], {USER: PASSWORD})


_SETTINGS: dict = {}


def settings(variant: int):
    s = _SETTINGS.get(variant)
    if s is None:   # built once: hashing the password is the slow part
        s = _SETTINGS[variant] = _settings(variant)
    return s


def converse(inp_bytes: bytes, pure: bool):
    """Play the input; return (server output, messages submitted), or raise."""
    inp = Input(inp_bytes)
    variant = inp.byte() % len(LIMITS)
    peer = inp.pick(PEERS)
    tls = inp.flag()
    loop = fake.Loop()
    acc = fake.Acceptor(settings(variant), loop, pure=pure, tls=tls)
    acc.answer = inp.pick(ANSWERS)
    loop.tls_fails = inp.byte() == 0xFF
    n = inp.byte() % 10
    plan = [(inp.u16(), inp.byte() % ACTIONS, inp.byte()) for _ in range(n)]
    payload = inp.rest()
    size = len(payload)
    steps = sorted({(1 + c % (size - 1) if size > 1 else 0): (a, arg) for c, a, arg in plan}
                   .items())
    transport = fake.Transport(peer)
    session = smtp.Session(acc)
    transport.connect(session)
    loop.run_ready()
    at = 0
    for end, (action, arg) in [*steps, (size, (0, 0))]:
        if end > at:
            _feed(session, loop, acc, payload[at:end])
            at = end
        if action == 1:
            acc.answer_held(bool(arg & 1))
            acc.answer = ANSWERS[arg % len(ANSWERS)]
        elif action == 2:
            loop.now += (arg % 8) * 60.0
            session.idle_check(loop.now, acc.draining, False)
        elif action == 3:
            acc.draining = True
            loop.now += 2.0
            session.idle_check(loop.now, True, bool(arg & 1))
        loop.run_ready()
        if _closed(session):
            break
    acc.answer_held(True)
    loop.run_ready()
    if not _closed(session):
        session.eof_received()
    session.connection_lost(None)
    loop.run_ready()
    written = session.transport.written
    if transport.written_at_close is not None or session.transport.written_at_close is not None:
        closed_at = [t.written_at_close for t in (transport, session.transport)
                     if t.written_at_close is not None][0]
        if len(written) > closed_at:
            raise Divergence(f"written after the connection was closed: "
                             f"{b''.join(written[closed_at:])!r:.300}")
    return b"".join(written), [(m.sender, m.rcpts, m.params, m.message)
                               for m in acc.submitted]


def _closed(session) -> bool:
    return session.transport.closed


def _feed(session, loop, acc, data: bytes) -> None:
    if _closed(session):
        return
    t = session.transport
    if not t.reading:
        # A real transport would not deliver this until reading resumes: what
        # the session waits for is the spool's answer.
        acc.answer_held(True)
        loop.run_ready()
        if _closed(session):
            return
        if not session.transport.reading:
            raise Divergence(f"reading paused with nothing to wait for (state "
                             f"{session.state}, {session.scanner.buffered} octets buffered)")
    session.data_received(data)
    loop.run_ready()


def check_replies(out: bytes) -> None:
    lines = out.split(b"\r\n")
    if lines[-1] != b"":
        raise Divergence(f"output does not end in CRLF: {out[-80:]!r}")
    code = None
    for line in lines[:-1]:
        m = REPLY_LINE.match(line)
        if m is None:
            raise Divergence(f"not an SMTP reply line: {line!r:.200}")
        if FORBIDDEN.search(m.group(3)):
            raise Divergence(f"a reply speaks of internals: {line!r:.200}")
        if code is not None and m.group(1) != code:
            raise Divergence(f"a multi-line reply changes its code: {line!r:.200}")
        code = m.group(1) if m.group(2) == b"-" else None
    if code is not None:
        raise Divergence("the output ends inside a multi-line reply")


def one_input(data: bytes) -> None:
    out_c, msgs_c = converse(data, pure=False)
    check_replies(out_c)
    out_p, msgs_p = converse(data, pure=True)
    if QID.sub(b"Q", out_c) != QID.sub(b"Q", out_p):
        raise Divergence(f"the conversation differs with the pure scanner:\n"
                         f"compiled {out_c!r:.600}\npure     {out_p!r:.600}")
    if msgs_c != msgs_p:
        raise Divergence(f"the messages differ with the pure scanner: {msgs_c!r:.300} != "
                         f"{msgs_p!r:.300}")


def _dialogue_seeds() -> list[bytes]:
    """The client side of every dialogue in tests/acceptor/dialogues, as seeds."""
    seeds = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "acceptor", "dialogues", "*.txt"))):
        client = bytearray()
        tls = False
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.startswith("C: "):
                    client += line[3:].encode() + b"\r\n"
                elif line.startswith("B: "):
                    client += line[3:].encode().decode("unicode_escape").encode("latin-1")
                elif line.strip() == "! tls":
                    tls = True
        seeds.append(bytes([0, 0, 1 if tls else 0, 0, 0, 0]) + bytes(client))
    return seeds


SEEDS = [
    b"\x00\x00\x00\x00\x00\x00EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
    b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
    b"\x01\x01\x01\x03\x00\x02\x05\x00\x01\x01\x10\x00\x02\x03EHLO c\r\nSTARTTLS\r\nEHLO c\r\n"
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b> BODY=8BITMIME\r\n"
    b"RCPT TO:<x@y> NOTIFY=SUCCESS ORCPT=rfc822;x@y\r\nBDAT 4\r\nabcdBDAT 0 LAST\r\n",
    *_dialogue_seeds(),
]
