"""Shards that read a trace together through a ring in shared memory (shard_ring.py) keep
exactly what a shard reading the whole trace alone keeps, whatever the piece sizes, the
trace's damage, a stalled or absent partner, or a wrong guess at a piece's first record."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowshift.shard_ring as ring_module
from flowshift import cluster
from flowshift.config import HostConfig, parse_config
from flowshift.packet.batch import read_batches
from flowshift.shard import Part
from flowshift.shard_replay import ReplayError, run_sharded
from flowshift.shard_ring import RingPart, create_ring, remove_ring
from test_shard import (
    GATEWAY,
    REAL,
    TRACE,
    Pieces,
    assert_same_counters,
    both,
    collision_trace,
    same_file,
    with_start,
)


@pytest.fixture(scope="module")
def collisions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HostConfig]:
    cfg = parse_config(__import__("tomllib").loads(GATEWAY))
    return collision_trace(tmp_path_factory.mktemp("collisions"), cfg), cfg


@contextmanager
def ring_sizes(piece: int, tail: int, record_min: int, aside: int, depth: int
               ) -> Iterator[None]:
    names = ("RING_PIECE", "TAIL", "RECORD_MIN", "ASIDE", "DEPTH")
    saved = [getattr(ring_module, n) for n in names]
    for n, v in zip(names, (piece, tail, record_min, aside, depth), strict=True):
        setattr(ring_module, n, v)
    try:
        yield
    finally:
        for n, v in zip(names, saved, strict=True):
            setattr(ring_module, n, v)


def whole(trace: Path, cfg: HostConfig, n: int) -> list[dict[str, Any]]:
    """What each of n shards keeps reading the whole trace alone."""
    return [read_part(Part(trace, cfg, k, n), scribble=False) for k in range(n)]


def read_part(part: Part, scribble: bool) -> dict[str, Any]:
    frames, problem = [], None
    for b in part:
        frames.extend((int(b.ts_ns[i]), int(b.wire_len[i]), b.frame(i)) for i in range(len(b)))
        problem = b.problem
        if scribble:  # a replay rewrites its own frames in place: the others must not care
            for i in range(len(b)):
                o = int(b.offset[i])
                b.buf[o:o + int(b.caplen[i])] = 0xEE
    return {"frames": frames, "index": part.index.tolist(), "counts": part.counts,
            "span": (part.first_ns, part.end_ns), "problem": problem}


def together(trace: Path, cfg: HostConfig, n: int, shards: range | None = None,
             directory: Path | None = None) -> tuple[list[dict[str, Any]], list[RingPart]]:
    """Shards `shards` (all n by default) reading through one ring, each on a thread."""
    path = create_ring(n, str(directory) if directory else "/dev/shm")
    try:
        parts = [RingPart(trace, cfg, k, n, path) for k in (shards or range(n))]
        got: list[Any] = [None] * len(parts)

        def run(i: int) -> None:
            try:
                got[i] = read_part(parts[i], scribble=True)
            except BaseException as e:  # reported below, on the test's thread
                got[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a shard never finished"
    finally:
        remove_ring(path)
    for g in got:
        if isinstance(g, BaseException):
            raise g
    return got, parts


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(piece=st.integers(40, 6000), tail=st.integers(16, 3000),
       record_min=st.sampled_from([16, 64, 300]), aside=st.sampled_from([0, 200, 1 << 16]),
       depth=st.integers(2, 3), n=st.integers(2, 3),
       cut=st.one_of(st.none(), st.integers(25, 60_000)),
       corrupt=st.one_of(st.none(), st.integers(0, 200)))
def test_shards_reading_together_keep_what_each_keeps_alone(
        tmp_path_factory: pytest.TempPathFactory, collisions: tuple[Path, HostConfig],
        piece: int, tail: int, record_min: int, aside: int, depth: int, n: int,
        cut: int | None, corrupt: int | None) -> None:
    """Pieces and tails of any size (records cut by both, records longer than a tail, pieces
    with no record starting in them), columns too small, no room for the slow path's frames,
    a trace that breaks off anywhere or holds a corrupt record: the same packets, positions,
    counts, span and problem, while every shard scribbles over its own frames."""
    trace, cfg = collisions
    data = bytearray(trace.read_bytes())
    if corrupt is not None:  # record `corrupt` claims a gigabyte
        at = 24
        for _ in range(corrupt):
            if at + 16 > len(data):
                break
            at += 16 + int.from_bytes(data[at + 8:at + 12], "little")
        if at + 16 <= len(data):
            data[at + 8:at + 12] = (1 << 30).to_bytes(4, "little")
    if cut is not None:
        data = data[:cut]
    bad = tmp_path_factory.mktemp("t") / "t.pcap"
    bad.write_bytes(bytes(data))
    expected = whole(bad, cfg, n)
    with ring_sizes(piece, tail, record_min, aside, depth), Pieces(4096, 700):
        got, _ = together(bad, cfg, n)
    assert got == expected


def test_most_pieces_come_from_the_ring(collisions: tuple[Path, HostConfig]) -> None:
    trace, cfg = collisions
    with ring_sizes(2000, 2000, 64, 1 << 16, 2):
        got, parts = together(trace, cfg, 2)
    assert got == whole(trace, cfg, 2)
    for p in parts:
        assert p.taken > 3 * p.alone and p.alone <= 1  # the last piece may be too short


def test_a_partner_that_never_starts(collisions: tuple[Path, HostConfig],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 1 runs and shard 0 never does: shard 1 waits a while, then reads alone."""
    trace, cfg = collisions
    monkeypatch.setattr(ring_module, "START_WAIT", 0.2)
    with ring_sizes(2000, 2000, 64, 1 << 16, 2):
        got, parts = together(trace, cfg, 2, shards=range(1, 2))
    assert got == whole(trace, cfg, 2)[1:]
    assert parts[0].alone > 0


def test_a_wrong_first_record_is_never_taken(collisions: tuple[Path, HostConfig],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every guess at a piece's first record one record late (a clean walk that misses a
    record): no piece after the first chains to the one before, and each shard reads those
    alone, to the same result."""
    trace, cfg = collisions
    real = ring_module._resync

    def late(chunk: np.ndarray, *rest: Any) -> int:
        at = int(real(chunk, *rest))
        return at + 16 + int.from_bytes(chunk[at + 8:at + 12].tobytes(), "little")

    monkeypatch.setattr(ring_module, "_resync", late)
    with ring_sizes(2000, 2000, 64, 1 << 16, 2):
        got, parts = together(trace, cfg, 2)
    assert got == whole(trace, cfg, 2)
    assert all(p.taken <= 1 for p in parts)


def test_an_empty_trace(tmp_path: Path, collisions: tuple[Path, HostConfig]) -> None:
    trace, cfg = collisions
    empty = tmp_path / "e.pcap"
    empty.write_bytes(trace.read_bytes()[:24])
    got, _ = together(empty, cfg, 2)
    assert got == whole(empty, cfg, 2)
    assert all(g["frames"] == [] and g["problem"] is None for g in got)


def test_a_ring_of_another_size_is_refused(tmp_path: Path,
                                           collisions: tuple[Path, HostConfig]) -> None:
    trace, cfg = collisions
    path = create_ring(3, str(tmp_path))
    with pytest.raises(ValueError, match="a ring of 3 shards"):
        list(RingPart(trace, cfg, 0, 2, path))


def test_the_frames_read_are_the_files(collisions: tuple[Path, HostConfig]) -> None:
    """The oracle itself: the whole-read parts together hold every frame of the file once."""
    trace, cfg = collisions
    parts = whole(trace, cfg, 2)
    order = np.argsort(np.concatenate([p["index"] for p in parts]), kind="stable")
    frames = [f for p in parts for f in p["frames"]]
    file = [(int(b.ts_ns[i]), int(b.wire_len[i]), b.frame(i))
            for b in read_batches(trace) for i in range(len(b))]
    assert [frames[i] for i in order] == file


def test_a_sharded_replay_on_processes_reads_through_the_ring(tmp_path: Path) -> None:
    """`run_sharded` on local processes shares the reading of a classic pcap (pieces of 64 KiB
    here: the shards' workers take the sizes from the ring file), and its outputs are still
    byte for byte the serial run's."""
    cfg = with_start(REAL / "lb-gateway.toml", "vnic")
    with ring_sizes(1 << 16, 1 << 14, 64, 1 << 14, 2), \
            cluster.open_executor(2, kind="processes") as pool:
        a, b = both(tmp_path, TRACE, cfg, pool, dump_at=4.0)
    for ext in ("pcap", "csv", "txt"):
        assert same_file(tmp_path, ext), ext
    assert_same_counters(a, b)
    assert b["sharding"]["read"] == "ring"
    shared = [s["timing"]["pieces_shared"] for s in b["shards"]]
    alone = [s["timing"]["pieces_alone"] for s in b["shards"]]
    assert min(shared) > 10 and max(alone) <= 1, (shared, alone)


def test_a_watch_sees_the_shards_come_through(collisions: tuple[Path, HostConfig],
                                             tmp_path: Path) -> None:
    """The coordinator's progress: 0 before any shard starts, 1 once all are through."""
    trace, cfg = collisions
    with ring_sizes(2000, 2000, 64, 1 << 16, 2):
        path = create_ring(2, str(tmp_path))
        watch = ring_module.RingWatch(path)
        assert watch.fraction() == 0.0
        parts = [RingPart(trace, cfg, k, 2, path) for k in range(2)]
        threads = [threading.Thread(target=read_part, args=(p, False)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert watch.fraction() == 1.0


def test_a_sharded_replay_can_be_told_to_read_whole(tmp_path: Path) -> None:
    cfg = with_start(REAL / "lb-gateway.toml", "vnic")
    with cluster.open_executor(2, kind="processes") as pool:
        whole = run_sharded(TRACE, cfg, workers=2, pool=pool, progress=False, read="whole")
        ring = run_sharded(TRACE, cfg, workers=2, pool=pool, progress=False)
        with pytest.raises(ReplayError, match="read must be auto or whole"):
            run_sharded(TRACE, cfg, workers=2, pool=pool, progress=False, read="half")
    assert (whole["sharding"]["read"], ring["sharding"]["read"]) == ("whole", "ring")
    assert_same_counters(whole, ring)
