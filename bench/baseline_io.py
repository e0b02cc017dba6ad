"""flowshift's trace I/O as it was before it was taken off the replay's critical path, frozen
as the baseline of bench/bench_trace_io.py: classic pcap read in 4 MiB chunks with every frame
copied again into the batch's buffer (packet/batch.py as it was), pcap records packed into a
fresh buffer per batch (PcapWriter.write_batch as it was), and the verdicts file formatted a
line at a time in Python (replay._Run.drain as it was). Not part of the package; kept only to
be measured against.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from flowshift.packet._records import _copy_bytes, pack_records
from flowshift.packet.pcap import (
    Frame,
    PcapHeader,
    TraceError,
    TraceReader,
    corrupt_record_problem,
    open_trace,
    truncated_record_problem,
)

__all__ = ["Batch", "pack_records", "read_batches"]

CHUNK = 1 << 22  # bytes read at a time by the bulk decoder


@dataclass(slots=True)
class Batch:
    ts_ns: np.ndarray  # int64[n]
    caplen: np.ndarray  # uint32[n]: bytes captured
    wire_len: np.ndarray  # uint32[n]: bytes on the wire (>= caplen)
    linktype: np.ndarray  # uint16[n]
    offset: np.ndarray  # int64[n]: start of each frame in buf
    buf: np.ndarray  # uint8: the frames back to back
    problem: str | None = None  # set on the last batch when the trace broke off

    def __len__(self) -> int:
        return len(self.ts_ns)

    def frame(self, i: int) -> bytes:
        start = int(self.offset[i])
        return self.buf[start : start + int(self.caplen[i])].tobytes()


def read_batches(path: str | os.PathLike[str], batch_size: int = 65536,
                 reuse: bool = False) -> Iterator[Batch]:
    """The frames of a trace in batches of `batch_size` (the last one shorter).

    `reuse`: a batch's arrays are recycled for the batch after the next one, so a consumer
    that is done with each batch before it takes the one after next saves the cost of fresh
    memory (page faults: about a third of a second per GB here). Classic pcap only.
    Raises TraceError, before the first batch, when the file is not a trace.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    reader = open_trace(path)
    if reader.pcap_header is None:
        return _frame_batches(reader, batch_size)
    reader.close()
    return _pcap_batches(reader.path, reader.pcap_header, batch_size, reuse)


def _frame_batches(reader: TraceReader, batch_size: int) -> Iterator[Batch]:
    with reader:
        frames: list[Frame] = []
        for frame in reader:
            frames.append(frame)
            if len(frames) == batch_size:
                yield _batch_of(frames)
                frames = []
        if frames or reader.problem:
            yield _batch_of(frames, reader.problem)


def _batch_of(frames: list[Frame], problem: str | None = None) -> Batch:
    caplen = np.fromiter((len(f.data) for f in frames), np.uint32, len(frames))
    offset = np.zeros(len(frames), np.int64)
    np.cumsum(caplen[:-1], out=offset[1:])
    return Batch(
        ts_ns=np.fromiter((f.ts_ns for f in frames), np.int64, len(frames)),
        caplen=caplen,
        wire_len=np.fromiter((f.wire_len for f in frames), np.uint32, len(frames)),
        linktype=np.fromiter((f.linktype for f in frames), np.uint16, len(frames)),
        offset=offset,
        # writable: the host rewrites packets in place (NAT, the PNIC's data path)
        buf=np.frombuffer(bytearray(b"".join(f.data for f in frames)), np.uint8),
        problem=problem,
    )


# walk() stops for one of these reasons
FULL = 0  # the batch is full
MORE = 1  # the chunk ends inside a record: read on
CORRUPT = 2  # a record claims more than `limit` bytes


@numba.njit(cache=True)
def _u32(b: np.ndarray, i: int, big: bool) -> np.int64:
    if big:
        return (
            (np.int64(b[i]) << 24)
            | (np.int64(b[i + 1]) << 16)
            | (np.int64(b[i + 2]) << 8)
            | np.int64(b[i + 3])
        )
    return (
        np.int64(b[i])
        | (np.int64(b[i + 1]) << 8)
        | (np.int64(b[i + 2]) << 16)
        | (np.int64(b[i + 3]) << 24)
    )


@numba.njit(cache=True)
def _walk(chunk, pos, big, frac_ns, limit, n, ts, caplen, wire, src):
    """Decode whole records from chunk[pos:] into slots n.. of the arrays (src: where each frame
    starts in chunk). Returns (next slot, next pos, why it stopped)."""
    size = len(chunk)
    while n < len(ts):
        if pos + 16 > size:
            return n, pos, MORE
        cap = _u32(chunk, pos + 8, big)
        if cap > limit:
            return n, pos, CORRUPT
        if pos + 16 + cap > size:
            return n, pos, MORE
        ts[n] = _u32(chunk, pos, big) * 1_000_000_000 + _u32(chunk, pos + 4, big) * frac_ns
        caplen[n] = cap
        wire[n] = max(_u32(chunk, pos + 12, big), cap)
        src[n] = pos + 16
        pos += 16 + cap
        n += 1
    return n, pos, FULL


@numba.njit(cache=True)
def _gather(chunk, src, caplen, out, out_pos):
    """Copy frames chunk[src[i]:src[i]+caplen[i]] back to back into out from out_pos on."""
    for i in range(len(src)):
        _copy_bytes(out, out_pos, chunk, src[i], caplen[i])
        out_pos += caplen[i]
    return out_pos


class _BatchBuilder:
    """One batch being filled from successive chunks."""

    ts: np.ndarray
    caplen: np.ndarray
    wire: np.ndarray
    src: np.ndarray
    offset: np.ndarray
    buf: np.ndarray

    def __init__(self, size: int, linktype: int, recycled: _BatchBuilder | None = None) -> None:
        if recycled is not None and len(recycled.ts) == size:
            self.ts, self.caplen, self.wire = recycled.ts, recycled.caplen, recycled.wire
            self.src, self.offset, self.buf = recycled.src, recycled.offset, recycled.buf
        else:
            self.ts = np.empty(size, np.int64)
            self.caplen = np.empty(size, np.uint32)
            self.wire = np.empty(size, np.uint32)
            self.src = np.empty(size, np.int64)
            self.offset = np.empty(size, np.int64)
            self.buf = np.empty(0, np.uint8)
        self.linktype = linktype
        self.n = 0
        self.buf_len = 0

    def take(self, chunk: np.ndarray, start: int, stop: int) -> None:
        """Slots start..stop were decoded from `chunk`: copy their frames out of it."""
        caplen = self.caplen[start:stop]
        self.offset[start:stop] = self.buf_len
        self.offset[start + 1 : stop] += np.cumsum(caplen[:-1], dtype=np.int64)
        need = self.buf_len + int(caplen.sum(dtype=np.int64))
        if need > len(self.buf):
            # room for the whole batch at the mean frame size so far; pages never written to
            # are never touched, so a generous guess costs address space, not memory
            mean = need / stop
            grown = np.empty(
                max(need, int(mean * len(self.ts) * 1.25), 2 * len(self.buf)), np.uint8
            )
            grown[: self.buf_len] = self.buf[: self.buf_len]
            self.buf = grown
        self.buf_len = _gather(chunk, self.src[start:stop], caplen, self.buf, self.buf_len)
        self.n = stop

    def batch(self, problem: str | None = None) -> Batch:
        n = self.n
        return Batch(
            ts_ns=self.ts[:n],
            caplen=self.caplen[:n],
            wire_len=self.wire[:n],
            linktype=np.full(n, self.linktype, np.uint16),
            offset=self.offset[:n],
            buf=self.buf[: self.buf_len],
            problem=problem,
        )


def _caplen_at(chunk: np.ndarray, pos: int, big: bool) -> int:
    return int.from_bytes(chunk[pos + 8 : pos + 12].tobytes(), "big" if big else "little")


def _pcap_batches(path: str, header: PcapHeader, batch_size: int,
                  reuse: bool = False) -> Iterator[Batch]:
    frac_ns = 1 if header.nanosecond else 1000
    limit = header.record_limit
    big = header.big_endian
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise TraceError(f"cannot open trace: {path} ({e.strerror})") from None
    with file:
        file.seek(24)
        chunk = np.empty(CHUNK, np.uint8)  # reused: frames are copied out of it
        base = 24  # file offset of chunk[0]
        pos = filled = 0  # chunk[pos:filled] is read but not yet decoded
        builder = _BatchBuilder(batch_size, header.linktype)
        spare: _BatchBuilder | None = None  # the builder before the last, to recycle
        problem = None
        while True:
            # keep the unfinished record at the front, grow for a record longer than a chunk
            left = filled - pos
            need = 16 + (_caplen_at(chunk, pos, big) if left >= 16 else 0)
            if need > len(chunk) and need <= 16 + limit:
                chunk = np.concatenate([chunk[pos:filled], np.empty(need - left, np.uint8)])
            else:
                chunk[:left] = chunk[pos:filled]
            base += pos
            pos = 0
            got = file.readinto(chunk.data[left:])
            filled = left + got
            while True:
                start = builder.n
                n, pos, why = _walk(
                    chunk[:filled], pos, big, frac_ns, limit, start,
                    builder.ts, builder.caplen, builder.wire, builder.src,
                )  # fmt: skip
                if n > start:
                    builder.take(chunk, start, n)
                if why != FULL:
                    break
                yield builder.batch()
                spare, builder = (builder if reuse else None), _BatchBuilder(
                    batch_size, header.linktype, spare)
            if why == CORRUPT:
                caplen = _caplen_at(chunk, pos, big)
                problem = corrupt_record_problem(base + pos, caplen, header.snaplen)
                break
            if not got:  # end of file
                left = filled - pos
                if left:
                    need = 16 + (_caplen_at(chunk, pos, big) if left >= 16 else 0)
                    problem = truncated_record_problem(base + pos, need, left)
                break
        if builder.n or problem:
            yield builder.batch(problem)


# -- the writers -----------------------------------------------------------------------------


def write_batch(self: Any, ts_ns: np.ndarray, buf: np.ndarray, offset: np.ndarray,
                caplen: np.ndarray, wire_len: np.ndarray) -> None:
    """PcapWriter.write_batch as it was: a fresh buffer for every batch's records."""
    if not len(offset):
        return
    if ts_ns.min() < 0 or ts_ns.max() // 1_000_000_000 > 0xFFFFFFFF:
        raise ValueError("a timestamp does not fit a pcap record")
    cap = np.minimum(caplen, self.snaplen).astype(np.int64)
    wire = np.maximum(wire_len.astype(np.int64), cap)
    out = np.empty(int(cap.sum()) + 16 * len(cap), np.uint8)
    n = pack_records(buf, offset.astype(np.int64), cap, wire, ts_ns.astype(np.int64), out)
    self._file.write(out.data[:n])


def rows_text(index0: int, ts: np.ndarray, first_ts: int, middle: np.ndarray,
              middles: list[bytes], out_index: np.ndarray) -> bytes:
    """The verdict rows as the replay formatted them: a Python f-string per packet."""
    texts = [m.decode() for m in middles]
    lines = []
    for i, (m, t, o) in enumerate(zip(middle.tolist(), ts.tolist(), out_index.tolist(),
                                      strict=True)):
        lines.append(f"{index0 + i},{seconds_text(t - first_ts)}{texts[m]}"
                     f"{o if o >= 0 else ''}\n")
    return "".join(lines).encode()


def seconds_text(delta_ns: int) -> str:
    sign = "-" if delta_ns < 0 else ""
    s, ns = divmod(abs(delta_ns), 1_000_000_000)
    return f"{sign}{s}.{ns:09d}"
