"""What every fuzz target shares: reading choices from the input, comparing twins.

A target is a function ``one_input(data: bytes) -> None`` that raises on a
failure (a divergence between the compiled module and its pure twin, a crash,
a reply that breaks the protocol).  Everything a target does is derived from
*data* alone, so a saved input replays exactly: ``python -m fuzz TARGET FILE``
or the regression test in tests/fuzz/.
"""
from __future__ import annotations

import os
import sys

from mta import native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Divergence(AssertionError):
    """The compiled module and its pure twin disagreed (or broke a property)."""


class Input:
    """Choices read from the front of a fuzz input; the rest is the payload.

    Reads past the end give zeros, so every input, however short, is valid.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos < len(self.data):
            b = self.data[self.pos]
            self.pos += 1
            return b
        return 0

    def u16(self) -> int:
        return self.byte() | self.byte() << 8

    def pick(self, choices):
        return choices[self.byte() % len(choices)]

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def cuts(self, length: int, most: int = 8) -> list[int]:
        """Sorted distinct split offsets inside [1, length)."""
        n = self.byte() % (most + 1)
        if length < 2:
            return []
        return sorted({1 + self.u16() % (length - 1) for _ in range(n)})

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def cut(data, points):
    """Split *data* at the sorted offsets *points*."""
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def outcome(fn, *args):
    """('ok', result) or ('error', exception class name): what twins must agree on."""
    try:
        return ("ok", fn(*args))
    except (ValueError, TypeError, OverflowError, IndexError, KeyError, UnicodeError,
            BufferError) as exc:
        return ("error", _error_class(exc))


def _error_class(exc: BaseException) -> str:
    # UnicodeDecodeError vs UnicodeEncodeError are both "the text is not valid":
    # compare at the level callers catch.
    for base in (UnicodeError, ValueError, TypeError, OverflowError, IndexError, KeyError,
                 BufferError):
        if isinstance(exc, base):
            return base.__name__
    return type(exc).__name__


def same(what: str, compiled, pure) -> None:
    if compiled != pure:
        raise Divergence(f"{what}: compiled {_short(compiled)} != pure {_short(pure)}")


def _short(value, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def twins(name: str):
    """(compiled, pure) modules of hot-path module *name*."""
    return native.load(name, pure=False), native.load(name, pure=True)


def tests_on_path() -> None:
    """Make tests/ importable (the acceptor fake lives in tests/acceptor/fake.py)."""
    tests = os.path.join(REPO, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
