"""Reading a trace a batch ahead in a thread (packet/ahead.py): the same batches, in the same
order, with the same problems, and no batch overwritten before its consumer asks for the
next."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.packet.ahead import ReadAhead
from flowshift.packet.batch import Batch, read_batches
from flowshift.replay import run_replay
from test_batch import classic_pcap, frames_of

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "src" / "flowshift" / "data" / "demo.toml"

records_st = st.lists(
    st.tuples(st.integers(0, 2**31), st.integers(0, 999_999), st.binary(min_size=0, max_size=300),
              st.integers(0, 400)),
    max_size=60,
)


def _write(tmp: Path, records: list[tuple[int, int, bytes, int]], cut: int) -> Path:
    raw = classic_pcap([(s, f, d, max(w, len(d))) for s, f, d, w in records], False, False)
    path = tmp / "t.pcap"
    path.write_bytes(raw[: len(raw) - cut] if cut < len(raw) - 24 else raw)
    return path


class _Counted:
    """The batches of a reader, counted as the reading thread takes them, so that the
    consumer can wait (bounded) until the batch after its own has been read."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self._batches = batches
        self.asked = 0  # batches the reading thread asked for
        self._read = 0
        self._ended = False
        self._changed = threading.Condition()

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Batch:
        self.asked += 1
        try:
            batch = next(self._batches)
        except StopIteration:
            with self._changed:
                self._ended = True
                self._changed.notify_all()
            raise
        with self._changed:
            self._read += 1
            self._changed.notify_all()
        return batch

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()

    def wait_for(self, n: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self._read >= n or self._ended, WAIT)


WAIT = 30.0  # seconds the consumer waits at most for the reading thread


def _consume(batches: Iterator[Batch], scribble: bool, counted: _Counted | None = None
             ) -> tuple[list[bytes], str | None, bool]:
    """Each batch's frames as bytes, and whether each batch stayed as its consumer left it
    until it asked for the next one (with `counted`: checked once the reading thread has read
    the next one, and had asked for no more than that; the consumer may write over its
    frames, as a NAT does)."""
    seen: list[bytes] = []
    problem = None
    intact = True
    for b in batches:
        data = b"".join(f.data for f in frames_of([b]))
        seen.append(data)
        problem = b.problem or problem
        if scribble:
            for i in range(len(b)):
                start = int(b.offset[i])
                b.buf[start : start + int(b.caplen[i])] ^= 0xFF
            data = b"".join(f.data for f in frames_of([b]))
        if counted is not None:
            counted.wait_for(len(seen) + 1)  # the reader has read the next batch, or ended
            intact &= counted.asked <= len(seen) + 1  # and not the one after it
        intact &= b"".join(f.data for f in frames_of([b])) == data
    return seen, problem, intact


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=records_st, cut=st.integers(0, 40), size=st.integers(1, 9), scribble=st.booleans())
def test_read_ahead_gives_what_reading_gives(tmp_path: Path, records: list, cut: int, size: int,
                                             scribble: bool) -> None:
    path = _write(tmp_path, records, cut)
    alone = _consume(read_batches(path, size, reuse=True), scribble)
    counted = _Counted(read_batches(path, size, reuse=True))
    with ReadAhead(counted) as ahead:
        together = _consume(ahead, scribble, counted)
    assert together == alone
    assert together[2], "a batch changed while its consumer could still use it"


def _failing() -> Iterator[Batch]:
    buf = np.zeros(4, np.uint8)
    one = np.ones(1, np.int64)
    yield Batch(one, one.astype(np.uint32), one.astype(np.uint32), one.astype(np.uint16),
                np.zeros(1, np.int64), buf)
    raise OSError("the disk went away")


def test_an_error_of_the_reader_reaches_the_consumer_in_its_turn() -> None:
    ahead = ReadAhead(_failing())
    assert len(next(ahead)) == 1
    with pytest.raises(OSError, match="the disk went away"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.close()


def test_closing_early_stops_the_thread_and_closes_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, [(i, 0, bytes(100), 100) for i in range(50)], 0)
    closed = threading.Event()

    def batches() -> Iterator[Batch]:
        try:
            yield from read_batches(path, 3, reuse=True)
        finally:
            closed.set()

    before = threading.active_count()
    with ReadAhead(batches()) as ahead:
        next(ahead)
    assert closed.is_set()
    assert threading.active_count() == before
    ahead.close()  # again: nothing left to do


def test_replay_reading_ahead_writes_what_replay_reading_alone_writes(tmp_path: Path) -> None:
    from flowshift.config import load_config
    from flowshift.gen import TraceSpec, generate

    trace = tmp_path / "t.pcap"
    generate(TraceSpec(flows=40, duration_s=2.0, seed=5, elephants=2,
                       gateway=load_config(DEMO_CONFIG)), trace)
    outputs = {}
    for ahead in (False, True):  # the same paths: the report names them
        report = run_replay(trace, DEMO_CONFIG, out=tmp_path / "out.pcap",
                            verdicts=tmp_path / "v.csv", progress=False, read_ahead=ahead)
        assert report["timing"]["read_ahead"] is ahead
        report.pop("timing")
        outputs[ahead] = (report, (tmp_path / "out.pcap").read_bytes(),
                          (tmp_path / "v.csv").read_bytes())
    assert outputs[True] == outputs[False]


def test_the_switch_interval_is_restored(tmp_path: Path) -> None:
    import sys

    path = _write(tmp_path, [(i, 0, bytes(10), 10) for i in range(5)], 0)
    before = sys.getswitchinterval()
    with ReadAhead(read_batches(path, 2, reuse=True)) as ahead:
        assert sys.getswitchinterval() <= 0.001
        assert sum(len(b) for b in ahead) == 5
    assert sys.getswitchinterval() == before
