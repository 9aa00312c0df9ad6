"""A plain mutation step (no coverage feedback), shared by the runner and the daemon test."""
from __future__ import annotations


def mutate(rng, data: bytes, corpus, tokens, max_len: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(b))
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 2:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            del b[pos:pos + rng.randint(1, 16)]
        elif op == 4 and b:
            n = rng.randint(1, 32)
            b[pos:pos] = b[pos:pos + n]
        elif op == 5:
            other = rng.choice(corpus)
            a = rng.randint(0, len(other))
            b[pos:pos] = other[a:a + rng.randint(1, 64)]
        elif tokens:
            b[pos:pos] = rng.choice(tokens)
    return bytes(b[:max_len])
