"""Batches of frames as numpy arrays, the input of the vectorized (PNIC) engines.

Classic pcap is decoded in bulk: a batch's records are read in one piece into the batch's
buffer and stay there (each frame at its `offset`, the record headers between them), and a
small compiled loop walks the record headers into the batch's arrays; no frame is copied after
the kernel's read. pcapng goes through the per-frame reader (packet/pcap.py), whose frames
lie back to back. Either way a trace that breaks off
ends with its `problem` on the last batch, exactly as the per-frame reader reports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedReader

import numba
import numpy as np

from flowshift.packet._records import pack_records
from flowshift.packet.pcap import (
    Frame,
    PcapHeader,
    TraceReader,
    corrupt_record_problem,
    open_trace,
    truncated_record_problem,
)

__all__ = ["Batch", "pack_records", "read_batches"]

CHUNK = 1 << 20  # bytes read at a time: walked while they are still in the cache


@dataclass(slots=True)
class Batch:
    ts_ns: np.ndarray  # int64[n]
    caplen: np.ndarray  # uint32[n]: bytes captured
    wire_len: np.ndarray  # uint32[n]: bytes on the wire (>= caplen)
    linktype: np.ndarray  # uint16[n]
    offset: np.ndarray  # int64[n]: start of each frame in buf
    buf: np.ndarray  # uint8, writable: holds the frames, each at its offset
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
    memory. Classic pcap only. Writing into a batch's buffer never reaches the file.
    Raises TraceError, before the first batch, when the file is not a trace.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    reader = open_trace(path)
    if reader.pcap_header is None:
        return _frame_batches(reader, batch_size)
    file, head = reader.detach()
    return _pcap_batches(file, head, reader.pcap_header, batch_size, reuse)


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


class _Columns:
    """The arrays of one batch: the per-packet columns and the buffer its records are read
    into, recycled for a later batch when asked."""

    ts: np.ndarray
    caplen: np.ndarray
    wire: np.ndarray
    src: np.ndarray
    buf: np.ndarray

    def __init__(self, size: int, room: int, recycled: _Columns | None = None) -> None:
        if recycled is not None:
            self.ts, self.caplen, self.wire, self.src = (
                recycled.ts, recycled.caplen, recycled.wire, recycled.src)
            self.buf = recycled.buf if len(recycled.buf) >= room else _room(room)
        else:
            self.ts = np.empty(size, np.int64)
            self.caplen = np.empty(size, np.uint32)
            self.wire = np.empty(size, np.uint32)
            self.src = np.empty(size, np.int64)
            self.buf = _room(room)


def _room(room: int) -> np.ndarray:
    """A buffer for `room` bytes and half as much again, so that it can be recycled for a
    batch a little larger than this one."""
    return np.empty(room + room // 2, np.uint8)


def _caplen_at(chunk: np.ndarray, pos: int, big: bool) -> int:
    return int.from_bytes(chunk[pos + 8 : pos + 12].tobytes(), "big" if big else "little")


def _pcap_batches(file: BufferedReader, head: bytes, header: PcapHeader, batch_size: int,
                  reuse: bool = False) -> Iterator[Batch]:
    """Classic pcap: the file is read a chunk at a time straight into the batch's buffer, each
    chunk walked while it is still in the cache, and the frames stay where they were read,
    record headers and all: no frame is copied after the kernel's read. `head`: the file's
    first bytes, already read (the file is positioned after them)."""
    frac_ns = 1 if header.nanosecond else 1000
    limit = header.record_limit
    big = header.big_endian
    lt = header.linktype
    base = 24  # file offset of the batch's buffer
    got = len(head) - 24  # bytes in the buffer
    room = max(CHUNK, got)  # a batch's buffer: grows to what a whole batch has needed
    cols = _Columns(batch_size, room)
    spare: _Columns | None = None  # the arrays before the last, to recycle
    cols.buf[:got] = np.frombuffer(head, np.uint8, offset=24)
    eof = False
    with file:
        while True:
            n = end = 0
            while True:
                n, end, why = _walk(cols.buf[:got], end, big, frac_ns, limit, n,
                                    cols.ts, cols.caplen, cols.wire, cols.src)
                if why != MORE or eof:
                    break
                if got + CHUNK > len(cols.buf):
                    # room for as many records as a batch holds, at the mean size so far
                    room = max(2 * room, end // max(n, 1) * len(cols.ts) * 5 // 4)
                    grown = _room(room)
                    grown[:got] = cols.buf[:got]
                    cols.buf = grown
                more = file.readinto(cols.buf.data[got : got + CHUNK])
                eof = not more
                got += more
            problem = None
            if why == CORRUPT:
                problem = corrupt_record_problem(base + end, _caplen_at(cols.buf, end, big),
                                                 header.snaplen)
            elif why == MORE and end < got:  # the file ends inside a record
                left = got - end
                need = 16 + (_caplen_at(cols.buf, end, big) if left >= 16 else 0)
                problem = truncated_record_problem(base + end, need, left)
            if n or problem:
                yield Batch(ts_ns=cols.ts[:n], caplen=cols.caplen[:n], wire_len=cols.wire[:n],
                            linktype=np.full(n, lt, np.uint16), offset=cols.src[:n],
                            buf=cols.buf[:end], problem=problem)
            if why != FULL:
                return
            room = max(room, got)  # the next batch's: at least what this one needed
            spare, cols, last = (cols if reuse else None), _Columns(batch_size, room, spare), cols
            # what was read past the batch's last record begins the next batch
            got -= end
            cols.buf[:got] = last.buf[end : end + got]
            base += end
