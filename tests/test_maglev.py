"""Maglev lookup tables: the paper's algorithm, weights, disruption, determinism."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.flow import PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.services.maglev import DEFAULT_TABLE_SIZE, Maglev, flow_hash, offset_skip

SMALL_PRIMES = [2, 3, 7, 13, 101, 251, 1009]


def reference_table(backends: list[tuple[str, int]], size: int) -> list[int]:
    """Section 3.4's pseudo-code, literally, with Katran's weight credits in front of each turn.

    With equal weights every backend takes every turn: the paper's round robin unchanged.
    """
    perms = []
    for name, _ in backends:
        offset, skip = offset_skip(name, size)
        perms.append([(offset + j * skip) % size for j in range(size)])
    top = max((w for _, w in backends), default=0)
    entry = [-1] * size
    if top == 0:
        return entry
    nxt = [0] * len(backends)
    credit = [0] * len(backends)
    n = 0
    while True:
        for i, (_, weight) in enumerate(backends):
            credit[i] += weight
            if credit[i] < top:
                continue
            credit[i] -= top
            c = perms[i][nxt[i]]
            while entry[c] >= 0:
                nxt[i] += 1
                c = perms[i][nxt[i]]
            entry[c] = i
            nxt[i] += 1
            n += 1
            if n == size:
                return entry


def owners(m: Maglev) -> np.ndarray:
    """The table as backend names, to compare tables whose indices differ."""
    names = np.array([name for name, _ in m.backends] + [""])
    return names[m.table]  # -1 picks the trailing ""


def pool(n: int) -> list[tuple[str, int]]:
    return [(f"10.1.{i // 250}.{i % 250 + 1}:8080", 1) for i in range(n)]


@pytest.mark.parametrize("size", SMALL_PRIMES)
@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_equal_weights_match_the_paper(size, n):
    backends = pool(n)
    assert Maglev(backends, size).table.tolist() == reference_table(backends, size)


@pytest.mark.parametrize("size", [7, 101, 1009])
def test_each_walk_is_a_permutation(size):
    for name, _ in pool(20):
        offset, skip = offset_skip(name, size)
        assert 0 <= offset < size and 1 <= skip < size
        assert len({(offset + j * skip) % size for j in range(size)}) == size


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=12), st.integers(0, 6)),
        max_size=12,
        unique_by=lambda b: b[0],
    ),
    st.sampled_from(SMALL_PRIMES),
)
def test_random_pools_match_the_reference(backends, size):
    m = Maglev(backends, size)
    assert m.table.tolist() == reference_table(backends, size)
    if any(w for _, w in backends):
        assert (m.table >= 0).all()
        assert all(backends[i][1] > 0 for i in set(m.table.tolist()))
    else:
        assert (m.table == -1).all()


@pytest.mark.parametrize("weights", [[2, 1], [3, 1, 1], [1, 4, 2, 1], [10, 1]])
def test_weights_set_the_share_of_slots(weights):
    m = Maglev([(f"b{i}", w) for i, w in enumerate(weights)])
    share = np.bincount(m.table, minlength=len(weights)) / m.size
    want = np.array(weights) / sum(weights)
    assert np.all(np.abs(share - want) <= 0.02 * want)


def test_zero_weight_gets_no_slots():
    m = Maglev([("a", 1), ("idle", 0), ("b", 2)])
    assert 1 not in m.table
    assert {0, 2} == set(np.unique(m.table).tolist())


@pytest.mark.parametrize("backends", [[], [("a", 0), ("b", 0)]])
def test_no_usable_backend_means_no_lookup(backends):
    m = Maglev(backends)
    assert m.table.shape == (DEFAULT_TABLE_SIZE,) and m.table.dtype == np.int32
    assert (m.table == -1).all()
    assert [m.lookup(h) for h in (0, 1, 2**64 - 1, 123456789)] == [-1] * 4


def test_lookup_reads_the_table():
    m = Maglev(pool(7))
    for h in (0, 5, DEFAULT_TABLE_SIZE, 2**63 + 11, 2**64 - 1):
        got = m.lookup(h)
        assert type(got) is int and got == m.table[h % DEFAULT_TABLE_SIZE]


def test_table_is_read_only():
    m = Maglev(pool(3))
    with pytest.raises(ValueError):
        m.table[0] = 2


@pytest.mark.parametrize("n", [3, 10, 50])
def test_removing_a_backend_moves_about_one_nth(n):
    backends = pool(n)
    before = owners(Maglev(backends))
    for gone in sorted({0, n // 2, n - 1}):
        after = owners(Maglev(backends[:gone] + backends[gone + 1 :]))
        name = backends[gone][0]
        assert name not in after
        changed = np.mean(before != after)
        survivors_moved = np.mean((before != after) & (before != name))
        # the removed backend's own slots (≈ 1/n) must move; the rest, ideally, would not
        assert changed <= 1.5 / n
        assert survivors_moved <= 0.5 / n


@pytest.mark.parametrize("n", [3, 10, 50])
def test_adding_a_backend_moves_about_one_nth(n):
    backends = pool(n + 1)
    before = owners(Maglev(backends[:-1]))
    after = owners(Maglev(backends))
    newcomer = backends[-1][0]
    assert np.mean(after == newcomer) >= 0.9 / (n + 1)
    assert np.mean(before != after) <= 1.5 / (n + 1)
    assert np.mean((before != after) & (after != newcomer)) <= 0.5 / (n + 1)


def test_big_pool_builds():
    m = Maglev([(f"backend-{i}", 1 + i % 3) for i in range(300)])
    counts = np.bincount(m.table, minlength=300)
    assert counts.sum() == DEFAULT_TABLE_SIZE and (counts > 0).all()


KEYS = [
    FlowKey(4, PROTO_TCP, 0, bytes([10, 0, 0, 2]), bytes([192, 0, 2, 10]), 40000, 80),
    FlowKey(6, PROTO_UDP, 3, bytes(15) + b"\x01", bytes(15) + b"\x02", 5353, 53),
]


def test_flow_hash_ignores_zone_and_sees_every_other_field():
    key = KEYS[0]
    assert flow_hash(key) == flow_hash(key._replace(zone=9))
    variants = [
        key._replace(proto=PROTO_UDP),
        key._replace(src=bytes([10, 0, 0, 3])),
        key._replace(dst=bytes([192, 0, 2, 11])),
        key._replace(sport=40001),
        key._replace(dport=81),
        key.reversed(),
    ]
    hashes = {flow_hash(k) for k in [key, *variants]}
    assert len(hashes) == len(variants) + 1
    assert all(0 <= h < 2**64 for h in hashes)


GOLDEN_FLOW_HASH = 12013267724532257487


def test_flow_hash_is_pinned():
    # A different value here changes which backend every existing flow maps to.
    assert flow_hash(KEYS[0]) == GOLDEN_FLOW_HASH


def _fingerprint() -> str:
    m = Maglev([("a", 3), ("b", 1), ("c", 2), *pool(20)])
    table = hashlib.sha256(m.table.tobytes()).hexdigest()
    return f"{table} {[flow_hash(k) for k in KEYS]}"


def test_deterministic_across_processes():
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from test_maglev import _fingerprint
        print(_fingerprint())
        """
    )
    env = dict(os.environ, PYTHONHASHSEED="4242")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", code, here], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == _fingerprint()


@pytest.mark.parametrize("size", [1, 0, -7, 65536, 9, 2**25 + 1, 7.0, True])
def test_size_must_be_a_prime(size):
    with pytest.raises(ValueError, match="size"):
        Maglev(pool(2), size)


@pytest.mark.parametrize(
    ("backends", "match"),
    [
        ([("a", 1), ("a", 2)], "twice"),
        ([("a", -1)], "weight"),
        ([("a", 1.5)], "weight"),
        ([("a", 2**32)], "weight"),
        ([("a",)], "pair"),
        ([(7, 1)], "name"),
    ],
)
def test_bad_backends_are_named(backends, match):
    with pytest.raises(ValueError, match=match):
        Maglev(backends, 7)
