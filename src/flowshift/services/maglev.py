"""Maglev consistent hashing for the L4 load balancer (Eisenbud et al., NSDI 2016, §3.4).

Every backend walks its own permutation of the M table slots (M prime): slot j of the walk
is (offset + j * skip) mod M, with offset and skip taken from two independent hashes of the
backend's name. Backends take turns claiming the next free slot of their walk until the
table is full. Weights follow Katran's MaglevHashV2: in each round a backend earns its
weight in credit and claims a slot whenever its credit reaches the largest weight, so a
backend of weight w ends up with about w / Σw of the slots and one of weight 0 with none.
With equal weights this is exactly the paper's round robin.

Everything is deterministic across runs, processes and machines (keyed BLAKE2b, never
Python's `hash()`), so every tier that rebuilds a pool's table picks the same backends.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import numpy as np

from flowshift.flow import FlowKey
from flowshift.tiers._pnic_mem import cached

DEFAULT_TABLE_SIZE = 65537
MAX_TABLE_SIZE = 1 << 24  # 64 MiB of int32: far beyond any sensible pool
MAX_WEIGHT = (1 << 32) - 1  # Katran's weights are u32
NO_BACKEND = -1


def _hash64(data: bytes, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "little")


def offset_skip(name: str, size: int) -> tuple[int, int]:
    """The start and stride of backend `name`'s walk through a table of prime `size`."""
    data = name.encode("utf-8", "surrogatepass")
    offset = _hash64(data, b"maglev-offset") % size
    skip = _hash64(data, b"maglev-skip") % (size - 1) + 1
    return offset, skip


def flow_hash(key: FlowKey) -> int:
    """A deterministic 64-bit hash of the 5-tuple (the zone does not take part)."""
    head = struct.pack("!BBHH", key.family, key.proto, key.sport, key.dport)
    return _hash64(head + key.src + key.dst, b"flowshift-flow")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


@cached()
def _populate(offsets, skips, weights, size):  # pragma: no cover - compiled
    table = np.full(size, NO_BACKEND, np.int32)
    n = offsets.shape[0]
    top = 0
    for i in range(n):
        top = max(top, weights[i])
    if top == 0:
        return table
    pos = offsets.copy()  # the next unexplored slot of each backend's walk
    credit = np.zeros(n, np.int64)
    filled = 0
    while True:
        for i in range(n):
            credit[i] += weights[i]
            if credit[i] < top:
                continue
            credit[i] -= top
            while table[pos[i]] != NO_BACKEND:
                pos[i] = (pos[i] + skips[i]) % size
            table[pos[i]] = i
            pos[i] = (pos[i] + skips[i]) % size
            filled += 1
            if filled == size:
                return table


class Maglev:
    """The lookup table of one pool: flow hash → index of a backend in `backends`.

    `backends` is a sequence of (name, weight); a name identifies a backend across
    rebuilds, so it must be unique. `size` is the table size M, a prime; the paper asks
    for M well above 100 × the number of backends.
    """

    def __init__(self, backends: Sequence[tuple[str, int]], size: int = DEFAULT_TABLE_SIZE):
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"Maglev table size must be an integer, not {size!r}")
        if not 2 <= size <= MAX_TABLE_SIZE or not is_prime(size):
            raise ValueError(f"Maglev table size must be a prime in 2..{MAX_TABLE_SIZE}: {size}")
        self._backends = tuple(_checked(backends))
        self._size = size
        params = [offset_skip(name, size) for name, _ in self._backends]
        offsets = np.array([o for o, _ in params], np.int64)
        skips = np.array([s for _, s in params], np.int64)
        weights = np.array([w for _, w in self._backends], np.int64)
        table = _populate(offsets, skips, weights, np.int64(size))
        table.flags.writeable = False
        self._table: np.ndarray = table

    @property
    def backends(self) -> tuple[tuple[str, int], ...]:
        return self._backends

    @property
    def size(self) -> int:
        return self._size

    @property
    def table(self) -> np.ndarray:
        """The read-only int32 table; -1 in every slot when no backend has a weight."""
        return self._table

    def lookup(self, flow_hash: int) -> int:
        """Index of the backend for a flow of hash `flow_hash`; -1 if the pool is empty."""
        return int(self._table[flow_hash % self._size])


def _checked(backends: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for item in backends:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(f"a Maglev backend must be a (name, weight) pair, not {item!r}")
        name, weight = item
        if not isinstance(name, str):
            raise ValueError(f"Maglev backend name must be a string, not {name!r}")
        if name in seen:
            raise ValueError(f"Maglev backend {name!r} appears twice")
        if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
            raise ValueError(f"weight of Maglev backend {name!r} must be an integer: {weight!r}")
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight of Maglev backend {name!r} must be in 0..{MAX_WEIGHT}")
        seen.add(name)
        out.append((name, int(weight)))
    return out
