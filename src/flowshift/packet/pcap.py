"""Trace I/O: streaming readers for classic pcap and pcapng, and a classic pcap writer.

Reading holds one chunk of the file in memory at a time, whatever the trace's size. A file that
is not a trace raises `TraceError`; a trace that breaks off part way (a truncated last record, a
corrupt block) ends iteration cleanly after the frames before the break and sets
`TraceReader.problem` to one line naming the byte offset, as tcpdump and Wireshark keep the
packets they could read. Formats follow the tcpdump.org pcap and pcapng specifications
(draft-ietf-opsawg-pcap, draft-ietf-opsawg-pcapng).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from io import BufferedReader
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from flowshift.closing import Closing
from flowshift.packet.direct import FLUSH, DirectWriter

CHUNK = 1 << 20  # bytes read per refill
MAX_SNAPLEN = 262144  # libpcap's largest snapshot length for ordinary link types
MAX_RECORD = 1 << 26  # a record claiming more is corrupt, not big: refuse to buffer it

# classic pcap magic numbers as read little-endian: (byte order, nanosecond resolution)
PCAP_MAGICS = {
    0xA1B2C3D4: ("<", False),
    0xD4C3B2A1: (">", False),
    0xA1B23C4D: ("<", True),
    0x4D3CB2A1: (">", True),
}
PCAP_NSEC_MAGIC = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A  # the same bytes in either byte order
PCAPNG_BOM = 0x1A2B3C4D  # read little-endian
PCAPNG_BOM_SWAPPED = 0x4D3C2B1A
BLOCK_IDB = 1
BLOCK_OPB = 2  # obsolete packet block, still written by old tools
BLOCK_SPB = 3
BLOCK_EPB = 6
OPT_ENDOFOPT = 0
OPT_IF_TSRESOL = 9
OPT_IF_TSOFFSET = 14

LINKTYPE_NAMES = {
    0: "null",
    1: "ethernet",
    6: "ieee802_5",
    9: "ppp",
    12: "raw",  # DLT_RAW as some systems number it
    14: "raw",
    50: "ppp_hdlc",
    51: "pppoe",
    101: "raw",
    104: "c_hdlc",
    105: "ieee802_11",
    108: "loop",
    113: "linux-sll",
    119: "ieee802_11_prism",
    127: "ieee802_11_radiotap",
    192: "ppi",
    195: "ieee802_15_4",
    220: "usb_linux_mmapped",
    228: "ipv4",
    229: "ipv6",
    249: "netlink",
    276: "linux-sll2",
}


def trace_linktype_name(lt: int) -> str:
    return LINKTYPE_NAMES.get(lt, f"linktype-{lt}")


class TraceError(Exception):
    """The file cannot be opened, or is not a pcap/pcapng trace at all. One line, naming it."""


@dataclass(slots=True)
class Frame:
    ts_ns: int  # nanoseconds since the epoch
    data: bytes  # the bytes captured (at most the snaplen)
    wire_len: int  # length on the wire; >= len(data)
    linktype: int
    interface: int = 0  # pcapng interface id (0 for classic pcap)


class PcapHeader(NamedTuple):
    """What a classic pcap file header says."""

    big_endian: bool
    nanosecond: bool
    snaplen: int
    linktype: int

    @property
    def record_limit(self) -> int:
        """The largest captured length a sane record can claim."""
        return min(max(self.snaplen, MAX_SNAPLEN), MAX_RECORD)


# Timestamps are int64 nanoseconds since the epoch everywhere (batches, the engines, the
# writer): about 1677 to 2262. A pcapng block can say more (64-bit units, any resolution, an
# offset), and one flipped bit does; such a block is corrupt like any other.
TS_MIN_NS = -(1 << 63)
TS_MAX_NS = (1 << 63) - 1


def timestamp_problem(offset: int, ts_ns: int) -> str:
    return (
        f"corrupt packet block at byte {offset}: timestamp {ts_ns // 1_000_000_000} s since "
        f"the epoch is beyond int64 nanoseconds (years 1677-2262)"
    )


def corrupt_record_problem(offset: int, caplen: int, snaplen: int) -> str:
    return (
        f"corrupt record at byte {offset}: captured length {caplen} exceeds the snaplen {snaplen}"
    )


def truncated_record_problem(offset: int, need: int, left: int) -> str:
    """`need`: bytes of the record (16-byte header included); `left`: bytes the file still has."""
    if left < 16:
        return f"truncated record header at byte {offset}: 16 bytes needed, {left} left"
    return f"truncated record at byte {offset}: header says {need - 16} bytes, {left - 16} left"


class BlockProblem(IntEnum):
    """What ends a pcapng trace at a block, with up to two numbers (`a`, `b`) that say more.
    Both readers (this one and the compiled batch reader) report by code; the text is made
    once, by `block_problem`."""

    HEADER_CUT = 1  # a: bytes left
    BAD_BOM = 2  # a: the byte-order magic read
    BAD_LENGTH = 3  # a: block length
    CUT = 4  # a: block length, b: bytes left
    BAD_TRAILER = 5  # a: trailing length, b: leading length
    PACKET_SHORT = 6  # a: block length
    NO_INTERFACE = 7  # a: interface id, b: interfaces described in the section
    CAPLEN = 8  # a: captured length
    SPB_NO_INTERFACE = 9
    SPB_SHORT = 10
    IDB_SHORT = 11  # a: block length


def block_problem(kind: int, offset: int, a: int = 0, b: int = 0) -> str:
    """The one line a pcapng problem gets; `offset`: the block's byte offset in the file."""
    match BlockProblem(kind):
        case BlockProblem.HEADER_CUT:
            return f"truncated block header at byte {offset}: {a} bytes left"
        case BlockProblem.BAD_BOM:
            return f"corrupt section header block at byte {offset}: byte-order magic 0x{a:08x}"
        case BlockProblem.BAD_LENGTH:
            return f"corrupt block at byte {offset}: block length {a}"
        case BlockProblem.CUT:
            return f"truncated block at byte {offset}: header says {a} bytes, {b} left"
        case BlockProblem.BAD_TRAILER:
            return (f"corrupt block at byte {offset}: trailing length {a} "
                    f"differs from leading length {b}")
        case BlockProblem.PACKET_SHORT:
            return f"corrupt packet block at byte {offset}: {a} bytes long"
        case BlockProblem.NO_INTERFACE:
            return (f"corrupt packet block at byte {offset}: interface {a} "
                    f"not described ({b} in this section)")
        case BlockProblem.CAPLEN:
            return f"corrupt packet block at byte {offset}: captured length {a} exceeds the block"
        case BlockProblem.SPB_NO_INTERFACE:
            return (f"corrupt simple packet block at byte {offset}: "
                    "no interface described before it")
        case BlockProblem.SPB_SHORT:
            return f"corrupt simple packet block at byte {offset}: too short"
        case BlockProblem.IDB_SHORT:
            return f"corrupt interface description block at byte {offset}: {a} bytes long"


def interface_timestamp(iface: _Interface, units: int) -> int:
    """A packet block's timestamp in nanoseconds, exactly (Python integers)."""
    return units * iface.ts_mul // iface.ts_div + iface.ts_offset_ns


@dataclass(slots=True)
class _Interface:
    """What a pcapng interface description block says about the packets that name it."""

    linktype: int
    snaplen: int
    ts_mul: int  # ts_ns = units * ts_mul // ts_div + ts_offset_ns
    ts_div: int
    ts_offset_ns: int


class TraceReader(Closing):
    """One pass over the frames of a trace. Use as a context manager, iterate once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.format: Literal["pcap", "pcapng"]
        self.linktypes: set[int] = set()
        self.problem: str | None = None
        self.position = 0
        self.pcap_header: PcapHeader | None = None  # classic pcap only
        try:
            self._file: BufferedReader = open(path, "rb")  # noqa: SIM115 - closed by close()
            self.size = os.fstat(self._file.fileno()).st_size
        except OSError as e:
            raise TraceError(f"cannot open trace: {self.path} ({e.strerror})") from None
        try:
            self._head = self._file.read(CHUNK)
        except OSError as e:
            self._file.close()
            raise TraceError(f"cannot read trace: {self.path} ({e.strerror})") from None
        try:
            self._frames = self._open_format()
        except TraceError:
            self._file.close()
            raise

    def _not_a_trace(self, why: str) -> TraceError:
        return TraceError(f"not a pcap or pcapng trace: {self.path} ({why})")

    def _open_format(self) -> Iterator[Frame]:
        head = self._head
        if len(head) < 4:
            raise self._not_a_trace("empty file" if not head else f"only {len(head)} bytes")
        (magic,) = struct.unpack_from("<I", head)
        if magic in PCAP_MAGICS:
            self.format = "pcap"
            if len(head) < 24:
                raise self._not_a_trace(f"pcap file header cut at {len(head)} of 24 bytes")
            order, nano = PCAP_MAGICS[magic]
            snaplen, network = struct.unpack_from(order + "16xII", head)
            # the upper 16 bits of the link type field carry FCS information
            self.pcap_header = PcapHeader(order == ">", nano, snaplen, network & 0xFFFF)
            self.linktypes.add(self.pcap_header.linktype)
            return self._pcap_frames(self.pcap_header)
        if magic == PCAPNG_SHB:
            self.format = "pcapng"
            if len(head) < 28:
                raise self._not_a_trace(f"pcapng section header cut at {len(head)} bytes")
            if struct.unpack_from("<I", head, 8)[0] not in (PCAPNG_BOM, PCAPNG_BOM_SWAPPED):
                raise self._not_a_trace("pcapng section header without byte-order magic")
            return self._pcapng_frames()
        raise self._not_a_trace(f"starts with 0x{struct.unpack_from('>I', head)[0]:08x}")

    def __iter__(self) -> Iterator[Frame]:
        return self._frames

    def close(self) -> None:
        self._file.close()

    def detach(self) -> tuple[BufferedReader, bytes]:
        """Hand the open file over to another reader (the batch reader), with the bytes read
        from its start so far (the file is positioned after them); this reader is done."""
        file, head = self._file, self._head
        self._frames = iter(())
        return file, head

    def _read(self, n: int) -> bytes:
        try:
            return self._file.read(n)
        except OSError as e:  # an I/O error mid-file ends the trace like a cut would
            self.problem = f"read error at byte {self.position}: {e.strerror}"
            return b""

    def _pcap_frames(self, header: PcapHeader) -> Iterator[Frame]:
        record = struct.Struct((">" if header.big_endian else "<") + "IIII").unpack_from
        frac_ns = 1 if header.nanosecond else 1000
        limit = header.record_limit
        lt = header.linktype
        frame = Frame  # a local name: this loop is the hot path
        buf = self._head
        del self._head
        base = 0  # file offset of buf[0]
        pos = 24
        self.position = 24
        while True:
            n = len(buf)
            # the hot loop: whole records inside the buffer
            while pos + 16 <= n:
                sec, frac, caplen, wire = record(buf, pos)
                end = pos + 16 + caplen
                if end > n or caplen > limit:
                    break
                yield frame(
                    sec * 1_000_000_000 + frac * frac_ns,
                    buf[pos + 16 : end],
                    wire if wire >= caplen else caplen,  # some writers leave it 0
                    lt,
                )
                pos = end
                self.position = base + pos
            # the buffer ends inside a record (or at a corrupt one): complete that record alone,
            # so that the next chunk is used as read, not copied onto the end of this one
            rest = buf[pos:]
            base += pos
            if len(rest) < 16:
                rest += self._read(16 - len(rest))
            need = 16
            if len(rest) >= 16:
                caplen = record(rest, 0)[2]
                if caplen > limit:
                    self.problem = corrupt_record_problem(base, caplen, header.snaplen)
                    return
                need += caplen
                if len(rest) < need:
                    rest += self._read(need - len(rest))
            if len(rest) < need:
                if rest and self.problem is None:
                    self.problem = truncated_record_problem(base, need, len(rest))
                return
            sec, frac, caplen, wire = record(rest, 0)
            yield frame(
                sec * 1_000_000_000 + frac * frac_ns,
                rest[16:],
                wire if wire >= caplen else caplen,
                lt,
            )
            base += need
            self.position = base
            buf = self._read(CHUNK)
            pos = 0

    def _pcapng_frames(self) -> Iterator[Frame]:
        buf = self._head
        del self._head
        base = 0  # file offset of buf[0]
        pos = 0
        big = False
        u32, epb = _U32[big], _EPB[big]
        ifaces: list[_Interface] = []
        last_ts = 0
        while True:
            n = len(buf)
            if n - pos < 12:
                buf, base, pos, n = self._refill(buf, base, pos, 12)
                if n < 12:
                    if n and self.problem is None:
                        self.problem = block_problem(BlockProblem.HEADER_CUT, base, n)
                    return
            btype = u32(buf, pos)[0]
            if btype == PCAPNG_SHB:  # a new section: its own byte order and interfaces
                bom = _U32[False](buf, pos + 8)[0]
                if bom not in (PCAPNG_BOM, PCAPNG_BOM_SWAPPED):
                    self.problem = block_problem(BlockProblem.BAD_BOM, base + pos, bom)
                    return
                big = bom == PCAPNG_BOM_SWAPPED
                u32, epb = _U32[big], _EPB[big]
                ifaces = []
            blen = u32(buf, pos + 4)[0]
            if blen < 12 or blen % 4 or blen > MAX_RECORD or (btype == PCAPNG_SHB and blen < 28):
                self.problem = block_problem(BlockProblem.BAD_LENGTH, base + pos, blen)
                return
            if n - pos < blen:
                buf, base, pos, n = self._refill(buf, base, pos, blen)
                if n < blen:
                    if self.problem is None:
                        self.problem = block_problem(BlockProblem.CUT, base, blen, n)
                    return
            trailer = u32(buf, pos + blen - 4)[0]
            if trailer != blen:
                self.problem = block_problem(BlockProblem.BAD_TRAILER, base + pos, trailer, blen)
                return
            body = pos + 8
            body_len = blen - 12
            if btype in (BLOCK_EPB, BLOCK_OPB):
                if body_len < 20:
                    self.problem = block_problem(BlockProblem.PACKET_SHORT, base + pos, blen)
                    return
                if_id, ts_hi, ts_lo, caplen, wire = epb(buf, body)
                if btype == BLOCK_OPB:  # 16-bit interface id, then a 16-bit drop count
                    if_id = if_id >> 16 if big else if_id & 0xFFFF
                if if_id >= len(ifaces):
                    self.problem = block_problem(BlockProblem.NO_INTERFACE, base + pos, if_id,
                                                 len(ifaces))
                    return
                if caplen > body_len - 20:
                    self.problem = block_problem(BlockProblem.CAPLEN, base + pos, caplen)
                    return
                iface = ifaces[if_id]
                # interface_timestamp, inlined: this is the hot loop
                ts = ((ts_hi << 32) | ts_lo) * iface.ts_mul // iface.ts_div + iface.ts_offset_ns
                if not TS_MIN_NS <= ts <= TS_MAX_NS:
                    self.problem = timestamp_problem(base + pos, ts)
                    return
                last_ts = ts
                yield Frame(
                    last_ts,
                    buf[body + 20 : body + 20 + caplen],
                    wire if wire >= caplen else caplen,
                    iface.linktype,
                    if_id,
                )
            elif btype == BLOCK_SPB:
                if not ifaces or body_len < 4:
                    self.problem = block_problem(
                        BlockProblem.SPB_SHORT if ifaces else BlockProblem.SPB_NO_INTERFACE,
                        base + pos)
                    return
                wire = u32(buf, body)[0]
                # the spec's rule: captured = min(original length, interface 0's snaplen)
                caplen = min(wire, body_len - 4)
                if ifaces[0].snaplen:
                    caplen = min(caplen, ifaces[0].snaplen)
                # an SPB has no timestamp: it keeps the time of the packet before it
                yield Frame(last_ts, buf[body + 4 : body + 4 + caplen], wire, ifaces[0].linktype)
            elif btype == BLOCK_IDB:
                if body_len < 8:
                    self.problem = block_problem(BlockProblem.IDB_SHORT, base + pos, blen)
                    return
                iface = _interface(buf, body, body_len, big)
                ifaces.append(iface)
                self.linktypes.add(iface.linktype)
            pos += blen
            self.position = base + pos

    def _refill(self, buf: bytes, base: int, pos: int, need: int) -> tuple[bytes, int, int, int]:
        """Drop what was consumed and read on until `need` bytes from `pos` are held (or EOF)."""
        more = self._read(max(CHUNK, need - (len(buf) - pos)))
        buf = buf[pos:] + more
        return buf, base + pos, 0, len(buf)


def _interface(buf: bytes, body: int, body_len: int, big: bool) -> _Interface:
    """Link type, snaplen and timestamp scale from an interface description block's body."""
    order = ">" if big else "<"
    lt, snaplen = struct.unpack_from(order + "H2xI", buf, body)
    ts_mul, ts_div, offset_ns = 1000, 1, 0  # default resolution: microseconds
    p, end = body + 8, body + body_len
    while p + 4 <= end:
        code, olen = struct.unpack_from(order + "HH", buf, p)
        if code == OPT_ENDOFOPT or p + 4 + olen > end:
            break
        if code == OPT_IF_TSRESOL and olen >= 1:
            v = buf[p + 4]
            if v & 0x80:  # units of 2^-n seconds
                ts_mul, ts_div = 1_000_000_000, 1 << (v & 0x7F)
            elif v <= 9:  # units of 10^-n seconds
                ts_mul, ts_div = 10 ** (9 - v), 1
            else:
                ts_mul, ts_div = 1, 10 ** (v - 9)
        elif code == OPT_IF_TSOFFSET and olen >= 8:
            offset_ns = struct.unpack_from(order + "q", buf, p + 4)[0] * 1_000_000_000
        p += 4 + ((olen + 3) & ~3)
    return _Interface(lt, snaplen, ts_mul, ts_div, offset_ns)


# struct readers by byte order (big-endian?)
_U32 = {False: struct.Struct("<I").unpack_from, True: struct.Struct(">I").unpack_from}
_EPB = {False: struct.Struct("<IIIII").unpack_from, True: struct.Struct(">IIIII").unpack_from}


def open_trace(path: str | os.PathLike[str]) -> TraceReader:
    return TraceReader(path)


class PcapWriter(Closing):
    """Writes classic pcap with nanosecond timestamps, little-endian."""

    def __init__(
        self, path: str | os.PathLike[str], linktype: int = 1, snaplen: int = MAX_SNAPLEN
    ) -> None:
        self.path = Path(path)
        self.snaplen = snaplen
        # direct I/O, staged in a reused buffer: write_batch packs its records there
        self._file = DirectWriter(path)
        self._record = struct.Struct("<IIII").pack
        self._file.write(struct.pack("<IHHiIII", PCAP_NSEC_MAGIC, 2, 4, 0, 0, snaplen, linktype))

    def write(self, ts_ns: int, data: bytes, wire_len: int | None = None) -> None:
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        if not 0 <= sec <= 0xFFFFFFFF:
            raise ValueError(f"timestamp {ts_ns} ns does not fit a pcap record")
        wire = len(data) if wire_len is None else max(wire_len, len(data))
        if len(data) > self.snaplen:
            data = data[: self.snaplen]
        self._file.write(self._record(sec, nsec, len(data), wire) + data)

    def write_batch(self, ts_ns: np.ndarray, buf: np.ndarray, offset: np.ndarray,
                    caplen: np.ndarray, wire_len: np.ndarray) -> None:
        """Write many frames at once: frame i is buf[offset[i]:offset[i]+caplen[i]]. The
        records are packed straight into the writer's staging buffer (packet/direct.py)."""
        from flowshift.packet._records import pack_records  # numba: only when batches are used

        if not len(offset):
            return
        if ts_ns.min() < 0 or ts_ns.max() // 1_000_000_000 > 0xFFFFFFFF:
            raise ValueError("a timestamp does not fit a pcap record")
        cap = np.minimum(caplen, self.snaplen).astype(np.int64)
        wire = np.maximum(wire_len.astype(np.int64), cap)
        ends = np.cumsum(cap + 16)
        offset, ts_ns = offset.astype(np.int64), ts_ns.astype(np.int64)
        a = 0
        while a < len(ends):  # about FLUSH bytes at a time: the staging buffers stay small
            done = int(ends[a - 1]) if a else 0
            b = max(int(np.searchsorted(ends, done + FLUSH, side="right")), a + 1)
            n = pack_records(buf, offset[a:b], cap[a:b], wire[a:b], ts_ns[a:b],
                             self._file.room(int(ends[b - 1]) - done))
            self._file.advance(n)
            a = b

    def write_records(self, src: np.ndarray, pos: np.ndarray, size: np.ndarray) -> None:
        """Copy whole records (header and frame, as this writer writes them) from `src`:
        record i is src[pos[i]:pos[i]+size[i]]."""
        from flowshift.packet._records import gather_records

        n = gather_records(src, pos, size, self._file.room(int(size.sum())))
        self._file.advance(n)

    def close(self) -> None:
        self._file.close()
