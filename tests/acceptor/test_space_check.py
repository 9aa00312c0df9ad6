"""The free-space check of Acceptor.submit: MAIL gets 452 once the octets sent since the
last statvfs would take the spool below spool.min_free_*, decided per message by one
comparison with a margin found at each statvfs (Acceptor._space_margin)."""
import collections
import dataclasses
import random

import msgspec
import pytest

from acceptor import fake
from mta.acceptor import main

_Statvfs = collections.namedtuple("_Statvfs", "f_bavail f_frsize f_blocks")


def _acceptor(monkeypatch, min_bytes: int, min_percent: float, free: int, total: int):
    base = fake.settings()
    spool = msgspec.structs.replace(base.config.spool, min_free_bytes=min_bytes,
                                    min_free_percent=min_percent)
    settings = dataclasses.replace(base, config=msgspec.structs.replace(base.config,
                                                                        spool=spool))
    acc = main.Acceptor(settings, 0, fake.Loop())
    acc.outbox.append([])
    monkeypatch.setattr(main.os, "statvfs", lambda _path: _Statvfs(free, 1, total))
    acc.space_low = acc._space_low()
    return acc


@pytest.mark.parametrize("min_bytes, min_percent", [(10_000, 0.0), (0, 10.0), (5_000, 12.5)])
def test_the_message_that_crosses_the_limit_makes_mail_wait(monkeypatch, min_bytes,
                                                            min_percent):
    total = 100_000
    acc = _acceptor(monkeypatch, min_bytes, min_percent, 20_000, total)
    assert not acc.space_low
    room = 20_000 - max(min_bytes, int(min_percent * total / 100))   # octets still allowed
    body = b"x" * (room - main.RECORD_OVERHEAD - 200)
    acc.submit("s@x.test", ["r@y.test"], {}, "c", body, lambda qid: b"R: 1\r\n",
               lambda qid, ok: None)
    assert not acc.space_low                # (a Received header of 7 octets: 193 to spare)
    acc.submit("s@x.test", ["r@y.test"], {}, "c", b"x" * 200, lambda qid: b"",
               lambda qid, ok: None)
    assert acc.space_low                    # 7 octets over


def test_the_margin_is_the_threshold_exactly():
    rnd = random.Random(5)
    acc = main.Acceptor.__new__(main.Acceptor)
    for _ in range(2000):
        acc.spool_cfg = msgspec.structs.replace(
            fake.settings().config.spool,
            min_free_bytes=rnd.choice([0, 1, 4096, rnd.randrange(1 << 40)]),
            min_free_percent=rnd.choice([0.0, 1e-9, 5.0, 100.0, rnd.random() * 100]))
        acc.space_free = rnd.choice([-1, 0, 4096, rnd.randrange(1 << 30),
                                     rnd.randrange(1 << 60)])
        acc.space_total = max(1, acc.space_free + rnd.randrange(1 << 50))
        margin = acc._space_margin()
        for u in [0, 1, acc.space_free, acc.space_free + 1,
                  *(rnd.randrange(acc.space_free + 2) for _ in range(5)),
                  *((margin, margin + 1) if margin != float("inf") else ())]:
            if u >= 0:
                assert (u > margin) == acc._below_threshold(u), (acc.spool_cfg, u, margin)
