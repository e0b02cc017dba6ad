"""Batches of frames as numpy arrays, the input of the vectorized (PNIC) engines.

The file is read a chunk at a time straight into the batch's buffer, and a small compiled loop
walks each chunk while it is in the cache: the record headers of classic pcap, the blocks of
pcapng (interface descriptions, and timestamps beyond int64 arithmetic, come back to Python).
The frames stay where they were read, each at its `offset`, the record headers or block
framing between them: no frame is copied after the kernel's read. A trace that breaks off
ends with its `problem` on the last batch, exactly as the per-frame reader (packet/pcap.py)
reports it. docs/traces.md tells the whole of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedReader

import numpy as np

from flowshift.packet._records import pack_records
from flowshift.packet.pcap import (
    BLOCK_EPB,
    BLOCK_IDB,
    BLOCK_OPB,
    BLOCK_SPB,
    MAX_RECORD,
    PCAPNG_BOM,
    PCAPNG_BOM_SWAPPED,
    PCAPNG_SHB,
    TS_MAX_NS,
    TS_MIN_NS,
    BlockProblem,
    PcapHeader,
    _Interface,
    _interface,
    block_problem,
    corrupt_record_problem,
    interface_timestamp,
    open_trace,
    timestamp_problem,
    truncated_record_problem,
)
from flowshift.tiers._pnic_mem import cached

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
    memory. Writing into a batch's buffer never reaches the file.
    Raises TraceError, before the first batch, when the file is not a trace.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    reader = open_trace(path)
    file, head = reader.detach()
    if reader.pcap_header is None:
        return _pcapng_batches(file, head, batch_size, reuse)
    return _pcap_batches(file, head, reader.pcap_header, batch_size, reuse)


# walk() stops for one of these reasons
FULL = 0  # the batch is full
MORE = 1  # the chunk ends inside a record: read on
CORRUPT = 2  # a record claims more than `limit` bytes


@cached()
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


@cached(nogil=True)  # a read-ahead thread walks beside the replay (ahead.py)
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
    lt: np.ndarray
    buf: np.ndarray

    def __init__(self, size: int, room: int, recycled: _Columns | None = None) -> None:
        if recycled is not None:
            self.ts, self.caplen, self.wire, self.src, self.lt = (
                recycled.ts, recycled.caplen, recycled.wire, recycled.src, recycled.lt)
            self.buf = recycled.buf if len(recycled.buf) >= room else _room(room)
        else:
            self.ts = np.empty(size, np.int64)
            self.caplen = np.empty(size, np.uint32)
            self.wire = np.empty(size, np.uint32)
            self.src = np.empty(size, np.int64)
            self.lt = np.empty(size, np.uint16)
            self.buf = _room(room)


def _room(room: int) -> np.ndarray:
    """A buffer for `room` bytes and half as much again, so that it can be recycled for a
    batch a little larger than this one."""
    return np.empty(room + room // 2, np.uint8)


class _Stream:
    """The file read a chunk at a time straight into the current batch's buffer, so that each
    chunk is walked while it is still in the cache and the frames stay where they were read:
    no frame is copied after the kernel's read."""

    def __init__(self, file: BufferedReader, head: bytes, start: int, batch_size: int,
                 reuse: bool) -> None:
        self.file = file
        self.reuse = reuse
        self.base = start  # file offset of the batch's buffer
        self.got = len(head) - start  # bytes in the buffer
        self.room = max(CHUNK, self.got)  # grows to what a whole batch has needed
        self.cols = _Columns(batch_size, self.room)
        self.spare: _Columns | None = None  # the arrays before the last, to recycle
        self.cols.buf[: self.got] = np.frombuffer(head, np.uint8, offset=start)
        self.eof = False

    def read_more(self, end: int, n: int) -> bool:
        """One more chunk into the buffer; False at the end of the file. `end`, `n`: where
        the walk stopped and how many packets it found, to size a growing buffer."""
        if self.eof:
            return False
        cols = self.cols
        if self.got + CHUNK > len(cols.buf):
            # room for as many records as a batch holds, at the mean size so far (at most
            # eight times as much at once: a first record may be far above the mean)
            guess = end // max(n, 1) * len(cols.ts) * 5 // 4
            self.room = max(2 * self.room, min(guess, 8 * self.room))
            grown = _room(self.room)
            grown[: self.got] = cols.buf[: self.got]
            cols.buf = grown
        more = self.file.readinto(cols.buf.data[self.got : self.got + CHUNK])
        self.eof = not more
        self.got += more
        return bool(more)

    def batch(self, n: int, end: int, linktype: np.ndarray, problem: str | None) -> Batch:
        c = self.cols
        return Batch(ts_ns=c.ts[:n], caplen=c.caplen[:n], wire_len=c.wire[:n],
                     linktype=linktype, offset=c.src[:n], buf=c.buf[:end], problem=problem)

    def next_batch(self, end: int) -> None:
        """The batch ends at `end`: what was read past it begins the next batch's buffer."""
        self.room = max(self.room, self.got)
        last = self.cols
        self.spare, self.cols = (last if self.reuse else None), _Columns(
            len(last.ts), self.room, self.spare)
        self.got -= end
        self.cols.buf[: self.got] = last.buf[end : end + self.got]
        self.base += end


def _caplen_at(chunk: np.ndarray, pos: int, big: bool) -> int:
    return int.from_bytes(chunk[pos + 8 : pos + 12].tobytes(), "big" if big else "little")


def _pcap_batches(file: BufferedReader, head: bytes, header: PcapHeader, batch_size: int,
                  reuse: bool = False) -> Iterator[Batch]:
    """Classic pcap, the record headers left in the buffer between the frames. `head`: the
    file's first bytes, already read (the file is positioned after them)."""
    frac_ns = 1 if header.nanosecond else 1000
    limit = header.record_limit
    big = header.big_endian
    stream = _Stream(file, head, 24, batch_size, reuse)
    with file:
        while True:
            n = end = 0
            while True:
                c = stream.cols
                n, end, why = _walk(c.buf[: stream.got], end, big, frac_ns, limit, n,
                                    c.ts, c.caplen, c.wire, c.src)
                if why != MORE or not stream.read_more(end, n):
                    break
            buf = stream.cols.buf
            problem = None
            if why == CORRUPT:
                problem = corrupt_record_problem(stream.base + end, _caplen_at(buf, end, big),
                                                 header.snaplen)
            elif why == MORE and end < stream.got:  # the file ends inside a record
                left = stream.got - end
                need = 16 + (_caplen_at(buf, end, big) if left >= 16 else 0)
                problem = truncated_record_problem(stream.base + end, need, left)
            if n or problem:
                yield stream.batch(n, end, np.full(n, header.linktype, np.uint16), problem)
            if why != FULL:
                return
            stream.next_batch(end)


# pcapng: walk_ng() stops for these besides FULL and MORE, and leaves what it found in `info`
PROBLEM = 3  # info: BlockProblem, a, b
IDB = 4  # an interface description block, complete (Python reads its options); info: length
EXACT_TS = 5  # a timestamp that needs more than int64 to compute (Python's integers do it);
# info: interface, units (high, low 32 bits), captured length, wire length, block length
INT64_MAX = (1 << 63) - 1
# the interface table's columns, one row per interface of the section
IF_LINKTYPE, IF_SNAPLEN, IF_MUL, IF_DIV, IF_OFFSET, IF_INT64 = range(6)


@cached()
def _stop(info, kind, a, b):
    info[0] = kind
    info[1] = a
    info[2] = b


@cached(nogil=True)
def _walk_ng(chunk, pos, big, n, ts, caplen, wire, src, lt, ifaces, n_if, last_ts, info):
    """Decode whole pcapng blocks from chunk[pos:] into slots n.. of the arrays, as the frame
    reader does (packet/pcap.py). Returns (next slot, next pos, why it stopped, byte order,
    interfaces of the section, time of the last packet)."""
    size = len(chunk)
    while n < len(ts):
        if pos + 12 > size:
            return n, pos, MORE, big, n_if, last_ts
        btype = _u32(chunk, pos, big)
        if btype == PCAPNG_SHB:  # a new section: its own byte order and interfaces
            bom = _u32(chunk, pos + 8, False)
            if bom != PCAPNG_BOM and bom != PCAPNG_BOM_SWAPPED:
                _stop(info, BlockProblem.BAD_BOM, bom, 0)
                return n, pos, PROBLEM, big, n_if, last_ts
            big = bom == PCAPNG_BOM_SWAPPED
            n_if = 0
        blen = _u32(chunk, pos + 4, big)
        if blen < 12 or blen % 4 or blen > MAX_RECORD or (btype == PCAPNG_SHB and blen < 28):
            _stop(info, BlockProblem.BAD_LENGTH, blen, 0)
            return n, pos, PROBLEM, big, n_if, last_ts
        if pos + blen > size:
            info[0] = blen
            return n, pos, MORE, big, n_if, last_ts
        trailer = _u32(chunk, pos + blen - 4, big)
        if trailer != blen:
            _stop(info, BlockProblem.BAD_TRAILER, trailer, blen)
            return n, pos, PROBLEM, big, n_if, last_ts
        body = pos + 8
        body_len = blen - 12
        if btype == BLOCK_EPB or btype == BLOCK_OPB:  # noqa: SIM109 - compiled code
            if body_len < 20:
                _stop(info, BlockProblem.PACKET_SHORT, blen, 0)
                return n, pos, PROBLEM, big, n_if, last_ts
            if_id = _u32(chunk, body, big)
            if btype == BLOCK_OPB:  # 16-bit interface id, then a 16-bit drop count
                if_id = if_id >> 16 if big else if_id & 0xFFFF
            if if_id >= n_if:
                _stop(info, BlockProblem.NO_INTERFACE, if_id, n_if)
                return n, pos, PROBLEM, big, n_if, last_ts
            cap = _u32(chunk, body + 12, big)
            if cap > body_len - 20:
                _stop(info, BlockProblem.CAPLEN, cap, 0)
                return n, pos, PROBLEM, big, n_if, last_ts
            hi = _u32(chunk, body + 4, big)
            lo = _u32(chunk, body + 8, big)
            w = max(_u32(chunk, body + 16, big), cap)
            mul = ifaces[if_id, IF_MUL]
            div = ifaces[if_id, IF_DIV]
            off = ifaces[if_id, IF_OFFSET]
            # units * mul // div, as q * mul + r * mul // div (units = q * div + r): exact,
            # and within int64 even for binary resolutions (mul 10^9, div 2^n)
            units = (hi << 32) | lo
            q = units // div
            exact = (ifaces[if_id, IF_INT64] and not hi >> 31 and div <= INT64_MAX // mul
                     and q < INT64_MAX // mul)
            t = q * mul + units % div * mul // div if exact else 0
            if not exact or (off > 0 and t > INT64_MAX - off):
                info[0] = if_id
                info[1] = hi
                info[2] = lo
                info[3] = cap
                info[4] = w
                info[5] = blen
                return n, pos, EXACT_TS, big, n_if, last_ts
            last_ts = t + off
            ts[n] = last_ts
            caplen[n] = cap
            wire[n] = w
            src[n] = body + 20
            lt[n] = ifaces[if_id, IF_LINKTYPE]
            n += 1
        elif btype == BLOCK_SPB:
            if n_if == 0:
                _stop(info, BlockProblem.SPB_NO_INTERFACE, 0, 0)
                return n, pos, PROBLEM, big, n_if, last_ts
            if body_len < 4:
                _stop(info, BlockProblem.SPB_SHORT, 0, 0)
                return n, pos, PROBLEM, big, n_if, last_ts
            w = _u32(chunk, body, big)
            # the spec's rule: captured = min(original length, interface 0's snaplen)
            cap = min(w, body_len - 4)
            if ifaces[0, IF_SNAPLEN]:
                cap = min(cap, ifaces[0, IF_SNAPLEN])
            # an SPB has no timestamp: it keeps the time of the packet before it
            ts[n] = last_ts
            caplen[n] = cap
            wire[n] = w
            src[n] = body + 4
            lt[n] = ifaces[0, IF_LINKTYPE]
            n += 1
        elif btype == BLOCK_IDB:
            if body_len < 8:
                _stop(info, BlockProblem.IDB_SHORT, blen, 0)
                return n, pos, PROBLEM, big, n_if, last_ts
            info[0] = blen
            return n, pos, IDB, big, n_if, last_ts
        pos += blen
    return n, pos, FULL, big, n_if, last_ts


def _interface_row(iface: _Interface) -> list[int]:
    """An interface's row of the table; IF_INT64 = 0 when its scale does not fit int64."""
    fits = iface.ts_div <= INT64_MAX and abs(iface.ts_offset_ns) <= INT64_MAX
    return [iface.linktype, iface.snaplen, iface.ts_mul, iface.ts_div if fits else 1,
            iface.ts_offset_ns if fits else 0, int(fits)]


def _pcapng_batches(file: BufferedReader, head: bytes, batch_size: int,
                    reuse: bool = False) -> Iterator[Batch]:
    """pcapng, the blocks left in the buffer around the frames: the compiled walk decodes the
    packet blocks; interface descriptions and timestamps beyond int64 come back here."""
    stream = _Stream(file, head, 0, batch_size, reuse)
    big = False
    ifaces: list[_Interface] = []  # of the section, as the table's rows
    table = np.zeros((8, 6), np.int64)
    n_if = 0
    last_ts = 0
    info = np.zeros(6, np.int64)
    with file:
        while True:
            n = end = 0
            problem = None
            while True:
                c = stream.cols
                n, end, why, big, n_if, last_ts = _walk_ng(
                    c.buf[: stream.got], end, big, n, c.ts, c.caplen, c.wire, c.src, c.lt,
                    table, n_if, last_ts, info)
                at = stream.base + end  # the block's file offset
                if why == MORE:
                    try:
                        if stream.read_more(end, n):
                            continue
                    except OSError as e:  # as the frame reader: the trace ends here
                        problem = f"read error at byte {at}: {e.strerror}"
                        break
                    left = stream.got - end
                    if left >= 12:
                        problem = block_problem(BlockProblem.CUT, at, int(info[0]), left)
                    elif left:
                        problem = block_problem(BlockProblem.HEADER_CUT, at, left)
                elif why == PROBLEM:
                    problem = block_problem(int(info[0]), at, int(info[1]), int(info[2]))
                elif why == IDB:
                    blen = int(info[0])
                    block = c.buf[end : end + blen].tobytes()
                    del ifaces[n_if:]  # a new section started over
                    ifaces.append(_interface(block, 8, blen - 12, big))
                    if n_if == len(table):
                        table = np.concatenate([table, np.zeros_like(table)])
                    table[n_if] = _interface_row(ifaces[-1])
                    n_if += 1
                    end += blen
                    continue
                elif why == EXACT_TS:
                    if_id, hi, lo, cap, w, blen = (int(v) for v in info)
                    ts = interface_timestamp(ifaces[if_id], (hi << 32) | lo)
                    if not TS_MIN_NS <= ts <= TS_MAX_NS:
                        problem = timestamp_problem(at, ts)
                        break
                    c.ts[n], c.caplen[n], c.wire[n], c.src[n] = ts, cap, w, end + 28
                    c.lt[n] = ifaces[if_id].linktype
                    n += 1
                    last_ts = ts
                    end += blen
                    if n < len(c.ts):
                        continue
                    why = FULL
                break
            if n or problem:
                yield stream.batch(n, end, stream.cols.lt[:n], problem)
            if why != FULL:
                return
            stream.next_batch(end)
