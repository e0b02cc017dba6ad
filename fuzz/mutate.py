"""A small mutation fuzzer: the fallback when atheris is not installed, and the quick run of
every target in the test suite. Deterministic for a given `rng_seed`.

Mutations are libFuzzer's basic ones: flip a bit, set a byte to an interesting value, insert,
erase or duplicate a run of bytes, overwrite with a run from another seed (splice), and write
an interesting 16/32/64-bit integer in either byte order.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
MAX_LEN = 1 << 16


class FuzzFinding(AssertionError):
    """A target failed on an input; `data` is the input."""

    def __init__(self, target: str, data: bytes, error: BaseException) -> None:
        super().__init__(f"{target}: {type(error).__name__}: {error} on input {data.hex()}")
        self.data = data


def mutate(data: bytes, rng: random.Random, others: Sequence[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        n = len(out)
        if op == 0 and n:
            i = rng.randrange(n)
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            out[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2 and n < MAX_LEN:
            i = rng.randint(0, n)
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and n:
            i = rng.randrange(n)
            del out[i : i + rng.randint(1, 16)]
        elif op == 4 and n:
            i = rng.randrange(n)
            j = rng.randint(i, min(n, i + 64))
            out[rng.randint(0, n) : 0] = out[i:j]
        elif op == 5 and others:
            other = rng.choice(others)
            if other:
                i = rng.randrange(len(other))
                chunk = other[i : i + rng.randint(1, 64)]
                at = rng.randint(0, n)
                out[at : at + len(chunk)] = chunk
        elif op == 6 and n >= 8:
            size = rng.choice((2, 4, 8))
            value = rng.choice(INTERESTING) & ((1 << (8 * size)) - 1)
            fmt = rng.choice("<>") + {2: "H", 4: "I", 8: "Q"}[size]
            i = rng.randrange(n - size + 1)
            out[i : i + size] = struct.pack(fmt, value)
    return bytes(out[:MAX_LEN])


def run(name: str, target: Callable[[bytes], None], seeds: Sequence[bytes], iterations: int,
        rng_seed: int = 0) -> int:
    """Every seed, then `iterations` mutated inputs; raises FuzzFinding on the first failure.
    Returns the number of inputs run."""
    rng = random.Random(rng_seed)
    pool = list(seeds) or [b""]
    count = 0
    for data in [*pool, *(mutate(rng.choice(pool), rng, pool) for _ in range(iterations))]:
        try:
            target(data)
        except Exception as e:  # every escape is a finding
            raise FuzzFinding(name, data, e) from e
        count += 1
    return count
