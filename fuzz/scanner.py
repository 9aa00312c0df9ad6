"""Differential target: the SMTP command/data scanner, compiled vs pure, split anywhere.

The input chooses the limits and two ways of splitting the payload.  Both
implementations get the same pieces, and switch modes the way the SMTP
session does (DATA, BDAT n [LAST], RSET, STARTTLS discards what is buffered);
after every piece their events, buffered octets and mode must be equal.  Then
without STARTTLS (whose discard depends on what arrived together) the events
must not depend on the split: the compiled module fed the payload whole and
the pure one fed it in other pieces give the events of the first run.
"""
from __future__ import annotations

from fuzz.common import Divergence, Input, cut, same, twins

COMPILED, PURE = twins("scanner")
EV_COMMAND = PURE.EV_COMMAND

COMMAND_LINES = (1, 2, 5, 16, 64, 512, 2048)
TEXT_LINES = (1, 2, 8, 78, 1000)
MESSAGES = (0, 1, 10, 100, 1000, 1 << 20)
MAX_DIGITS = 30


def _seed(limits: bytes, payload: bytes, cuts_a=(), cuts_b=()) -> bytes:
    """An input: 3 limit choices, the two lists of split points, the payload."""
    head = limits + bytes([len(cuts_a), len(cuts_b)])
    for c in (*cuts_a, *cuts_b):
        head += (c - 1).to_bytes(2, "little")
    return head + payload


SEEDS = [
    _seed(b"\x05\x04\x05", b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
          b"Subject: s\r\n\r\n..dot\r\nbody\n\rbare\r\n.\r\nQUIT\r\n", (9, 30), (50,)),
    _seed(b"\x05\x04\x05", b"BDAT 5\r\nhel\rBDAT 3 LAST\r\n\nx\r.RSET\r\n", (12, 13), (3,)),
    _seed(b"\x02\x01\x02", b"x" * 40 + b"\r\nDATA\r\n" + b"y" * 100 + b"\r\n.\r\n"),
    _seed(b"\x05\x04\x05", b"STARTTLS\r\nEHLO after\r\n", (10,)),
    _seed(b"\x05\x04\x05", b"DATA\r\n\xe9\x00\r\r\n.\r\n", (7,), (8,)),
    _seed(b"\x01\x02\x01", b"BDAT 10\r\n0123456789BDAT 4 LAST\r\nabc\rNOOP\r\n", (13, 22), ()),
    _seed(b"\x04\x03\x02", b"BDAT 2000\r\n" + b"z\r\n" * 700 + b"RSET\r\n", (300,), (11, 12)),
]


def drive(mod, pieces, limits, starttls=True):
    """Feed *pieces*, switching modes like the session; the record of each step."""
    try:
        s = mod.Scanner(**limits)
    except Exception as exc:   # noqa: BLE001 - the class is compared
        return [("error", type(exc).__name__)]
    steps = []
    for piece in pieces:
        try:
            s.feed(piece)
            events = []
            while (ev := s.next()) is not None:
                events.append(ev)
                switch = _switch(s, ev, starttls)
                if switch is not None:
                    events.append(switch)
            steps.append((tuple(events), s.buffered, s.mode))
        except Exception as exc:   # noqa: BLE001 - the class is compared
            steps.append(("error", type(exc).__name__))
            break
    return steps


def _switch(s, ev, starttls):
    if ev[0] != EV_COMMAND:
        return None
    verb, _, arg = bytes(ev[1]).partition(b" ")
    verb = verb.upper()
    if verb == b"DATA":
        s.start_data()
    elif verb == b"BDAT":
        words = arg.split()
        if words and words[0].isdigit() and len(words[0]) <= MAX_DIGITS:
            s.start_chunk(int(words[0]), len(words) > 1 and words[1].upper() == b"LAST")
    elif verb == b"RSET":
        s.reset_message()
    elif verb == b"STARTTLS" and starttls:
        return ("discarded", s.discard())
    return None


def events_of(steps):
    out = []
    for step in steps:
        if step[0] == "error":
            out.append(step)
        else:
            out.extend(step[0])
    return out


def one_input(data: bytes) -> None:
    inp = Input(data)
    limits = {"max_command_line": inp.pick(COMMAND_LINES),
              "max_text_line": inp.pick(TEXT_LINES),
              "max_message": inp.pick(MESSAGES)}
    n_a = inp.byte() % 9
    n_b = inp.byte() % 9
    raw_a = [inp.u16() for _ in range(n_a)]
    raw_b = [inp.u16() for _ in range(n_b)]
    payload = inp.rest()
    size = len(payload)
    cuts_a = sorted({1 + c % (size - 1) for c in raw_a}) if size > 1 else []
    cuts_b = sorted({1 + c % (size - 1) for c in raw_b}) if size > 1 else []
    a = cut(payload, cuts_a)
    same("scanner, same pieces", drive(COMPILED, a, limits), drive(PURE, a, limits))
    whole = events_of(drive(COMPILED, [payload], limits, starttls=False))
    split = events_of(drive(PURE, cut(payload, cuts_b), limits, starttls=False))
    if whole != split:
        raise Divergence(f"scanner, split {cuts_b}: events depend on the split: "
                         f"{whole!r:.600} != {split!r:.600}")
