"""SMTP dialogues from data files, played against the real Session on the fake transport.

Every file in ``dialogues/`` is one conversation (format in ``dialogues/README.md``):
client lines, the exact replies expected, and directives that set the session up
or act on it (the spool's answer, the clock).  Each dialogue runs against the
compiled scanner and the pure twin, with every batch of client input written
whole, one byte at a time and in random pieces: the replies must not change.
"""
from __future__ import annotations

import codecs
import random
import re
from pathlib import Path

import pytest

from acceptor import fake
from mta.acceptor import replies as R
from mta.acceptor import smtp

DIALOGUES = sorted((Path(__file__).parent / "dialogues").glob("*.txt"))
IMPLS = ["compiled", "pure"]
SPLITS = ["whole", "bytes", "random"]
QID = rb"[0-9A-F]{20}"

# Directives that describe the set-up: they come before the first exchange.
SETUP = {"smtp", "peer", "tls", "auth"}


class DialogueError(AssertionError):
    pass


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _expected(line: str) -> bytes:
    """The regular expression for one S: line (a reply constant, or literal text)."""
    if line.startswith("@"):
        name, *args = line[1:].split()
        reply = getattr(R, name)
        if isinstance(reply, str):
            # A template: fill in the arguments given, keep {qid} for any queue id.
            fill = dict(a.split("=", 1) for a in args)
            reply = reply.replace("{qid}", "\0QID\0").format(**fill).encode()
        elif args:
            raise DialogueError(f"@{name} takes no arguments")
        return re.escape(reply).replace(b"\0QID\0", QID)
    return re.escape(line.encode("utf-8") + b"\r\n").replace(rb"\{qid\}", QID)


def parse(path: Path):
    """Split a dialogue into (setup directives, steps).

    A step is (directive or None, client input, expected reply lines, line number).
    """
    setup: list[list[str]] = []
    steps: list[tuple] = []
    action: list = [None]   # the directive that starts the step being collected
    batch: list[bytes] = []
    expect: list[str] = []
    first = [0]             # the line the step being collected starts on
    started = False

    def flush():
        if action[0] is not None or batch or expect:
            steps.append((action[0], b"".join(batch), list(expect), first[0]))
        action[0] = None
        batch.clear()
        expect.clear()

    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path.name}:{n}"
        if action[0] is None and not batch and not expect:
            first[0] = n
        if not line.strip():
            flush()
        elif line.startswith("#"):
            continue
        elif line.startswith("!"):
            words = line[1:].split()
            if words[0] in SETUP:
                if started:
                    raise DialogueError(f"{where}: '! {words[0]}' belongs before the first exchange")
                setup.append(words)
                continue
            started = True
            flush()
            first[0] = n
            action[0] = words
        elif line.startswith(("C: ", "B: ")) or line in ("C:", "B:"):
            started = True
            if expect or action[0] is not None:
                flush()
                first[0] = n
            text = line[3:]
            if line[0] == "C":
                batch.append(text.encode("utf-8") + b"\r\n")
            else:
                batch.append(codecs.escape_decode(text.encode("utf-8"))[0])
        elif line.startswith("S: "):
            started = True
            expect.append(line[3:])
        else:
            raise DialogueError(f"{where}: a line starts with C:, B:, S:, !, # or is blank")
    flush()
    return setup, steps


class Player:
    """One acceptor and one session, played step by step."""

    def __init__(self, setup, impl: str, split: str, seed: str):
        smtp_cfg: dict = {}
        users: dict = {}
        peer, tls = fake.PEER, False
        for words in setup:
            if words[0] == "smtp":
                smtp_cfg.update((k, _value(v)) for k, v in (w.split("=", 1) for w in words[1:]))
            elif words[0] == "peer":
                peer = (words[1], 40000)
            elif words[0] == "tls":
                tls = True
            elif words[0] == "auth":
                users[words[1]] = words[2]
        self.loop = fake.Loop()
        self.acceptor = fake.Acceptor(fake.settings(smtp_cfg, users), self.loop,
                                      pure=impl == "pure", tls=tls)
        self.transport = fake.Transport(peer)
        self.split = split
        self.rng = random.Random(seed)
        self.seen = 0           # how much of transport.written the steps have checked
        self.closed_expected = False
        self.session = smtp.Session(self.acceptor)
        self.transport.connect(self.session)

    def pieces(self, data: bytes):
        if self.split == "whole" or len(data) < 2:
            return [data] if data else []
        if self.split == "bytes":
            return [data[i:i + 1] for i in range(len(data))]
        cuts = sorted(self.rng.sample(range(1, len(data)), min(len(data) - 1, 4)))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]

    def output(self) -> bytes:
        written = self.transport.written
        out = b"".join(written[self.seen:])
        self.seen = len(written)
        return out

    def step(self, action, data: bytes, expect: list[str], where: str) -> None:
        if action is not None:
            self.act(action, where)
        transport = self.session.transport
        for piece in self.pieces(data):
            # Each read is one loop iteration.  A closed connection reads nothing
            # more, and plaintext the client sent behind STARTTLS never reaches
            # the session once TLS is up (it would have broken the handshake).
            if transport.closed or self.session.transport is not transport:
                break
            self.session.data_received(piece)
            self.loop.run_ready()
        self.loop.run_ready()
        got = self.output()
        want = b"".join(self.expected(x) for x in expect)
        if not re.fullmatch(want, got, re.S):
            shown = "\n".join("S: " + x for x in expect)
            raise DialogueError(f"{where}: expected\n{shown}\ngot\n{got.decode('latin-1')}")

    def expected(self, line: str) -> bytes:
        if line == "@EHLO":
            # The EHLO reply this session gets now (its full text: ehlo_helo.txt).
            s = self.session
            return re.escape(self.acceptor.ehlo_reply(s.tls, s.user is not None))
        return _expected(line)

    def act(self, words: list[str], where: str) -> None:
        acc, session = self.acceptor, self.session
        name, args = words[0], words[1:]
        if name == "spool":
            acc.answer = args[0]
        elif name == "answer":
            acc.answer_held(args[0] == "ok")
        elif name == "closed":
            t = session.transport
            assert t.closed, f"{where}: the connection is still open"
            assert len(t.written) == t.written_at_close, f"{where}: written after close"
            self.closed_expected = True
        elif name == "submitted":
            got = len(acc.submitted)
            assert got == int(args[0]), f"{where}: {got} message(s) reached the spool"
        elif name == "idle":
            self.loop.now += float(args[0])
            session.idle_check(self.loop.now, acc.draining, False)
        elif name == "drain":
            acc.draining = True
        elif name == "space":
            acc.space_low = args[0] == "low"
        elif name == "handshake":
            self.loop.tls_fails = args[0] == "fails"
        else:
            raise DialogueError(f"{where}: unknown directive '! {name}'")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", DIALOGUES, ids=[p.stem for p in DIALOGUES])
def test_dialogue(path, impl, split):
    setup, steps = parse(path)
    player = Player(setup, impl, split, seed=path.name)
    for action, data, expect, line in steps:
        player.step(action, data, expect, f"{path.name}:{line}")
    if not player.closed_expected:
        assert not player.session.transport.closed, f"{path.name}: the server closed"


def test_dialogues_exist():
    assert len(DIALOGUES) >= 10
