"""Splitting a trace into shards that replay independently: by the flow's outside endpoint.

A packet's shard is a hash of its flow's outside endpoint: the destination of an egress packet,
the source of an ingress one (machine and direction as the host classifies them), with the
transport protocol and, for TCP and UDP, the outside port. Every packet of a flow has the same
outside endpoint, and two flows can only collide on a NAT tuple (Linux's nf_nat_used_tuple:
the same reply tuple) when they share it, so a flow and every flow it could collide with land
in one shard. NAT never moves the outside port (SNAT moves the inside source, DNAT and the LB
the inside destination); ICMP echo identifiers do move, so ICMP hashes the address alone.

- An ICMP error follows the flow it quotes: the quoted datagram's outside endpoint (its
  destination when the error comes in, its source when it goes out).
- A non-first fragment follows the first fragment of its datagram (the same source,
  destination, protocol and identification); one whose first fragment was not seen before it
  hashes the outside address with port 0.
- Packets of no machine, unparsed ones and non-IP frames go to shard 0: their verdicts depend
  on no state.

The common packets (a key the compiled PNIC parser reads whole) are hashed by a compiled
kernel over each batch, with the engine's own parser and classifier; the rest (ICMP errors,
fragments, IPv6 extension headers, parse errors) go through `parse()` and `Classifier`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowshift.config import HostConfig
from flowshift.flow import EGRESS
from flowshift.packet.batch import CORRUPT, Batch, _caplen_at, _u32, _walk, read_batches
from flowshift.packet.batch import FULL as WHOLE
from flowshift.packet.parse import parse
from flowshift.packet.pcap import (
    PcapHeader,
    PcapWriter,
    TraceError,
    corrupt_record_problem,
    open_trace,
    truncated_record_problem,
)
from flowshift.packet.view import Packet, ParseError
from flowshift.tiers._pnic_batch import classify
from flowshift.tiers._pnic_index import address_words
from flowshift.tiers._pnic_mem import cached, kernel
from flowshift.tiers._pnic_parse import (
    F_DPORT,
    F_DST_HI,
    F_DST_LO,
    F_PROTO,
    F_SPORT,
    F_SRC_HI,
    F_SRC_LO,
    FULL,
    N_FIELDS,
    parse_frame,
)
from flowshift.tiers.classify import Classifier
from flowshift.tiers.pnic_engine import classifier_tables

BATCH = 65536
# a shard reading the whole trace: bytes of it per batch of the shard's packets, and bytes
# read at a time (parsed while still in the processor's cache)
PIECE = 1 << 25
SIP = 1 << 20
FRAGMENTS_MAX = 1 << 16  # datagrams whose first fragment's shard is remembered
_PORTED = (6, 17)  # TCP, UDP: the outside port is part of the key
_V6_EXT = {0: "hop", 43: "routing", 60: "dest", 51: "ah"}  # skipped when looking for 44
_V6_FRAGMENT = 44


class ShardError(Exception):
    """A trace that cannot be split. One line."""


@kernel(inline=True)
def _key(hi: int, lo: int, port: int, proto: int) -> np.uint64:
    """splitmix64 over the endpoint words: the endpoint's key, the same in every process."""
    x = np.uint64(hi) ^ (np.uint64(lo) * np.uint64(0x9E3779B97F4A7C15))
    x ^= np.uint64((port << 8) | proto) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@kernel(inline=True)
def _place(x: np.uint64, keys: np.ndarray, shards: np.ndarray, n: int) -> int:
    """The shard of endpoint key x: its placement when it has one, else the key mod n."""
    for j in range(len(keys)):
        if keys[j] == x:
            return int(shards[j])
    return int(x % np.uint64(n))


@kernel(inline=True)
def _frame_key(buf: np.ndarray, s: int, caplen: int, wire: int, linktype: int,
               inside: np.ndarray, public: np.ndarray, f: np.ndarray) -> tuple[int, np.uint64]:
    """(1, key) for a frame of a machine with a plain key; (0, 0): no machine's; (-1, 0):
    `parse()` must decide."""
    if parse_frame(buf, s, caplen, wire, linktype, f) != FULL:
        return -1, np.uint64(0)
    m, d = classify(f, inside, public)
    if m < 0:
        return 0, np.uint64(0)
    proto = f[F_PROTO]
    if d == 0:  # egress: the destination is outside
        hi, lo, port = f[F_DST_HI], f[F_DST_LO], f[F_DPORT]
    else:
        hi, lo, port = f[F_SRC_HI], f[F_SRC_LO], f[F_SPORT]
    if proto != 6 and proto != 17:
        port = 0
    return 1, _key(hi, lo, port, proto)


@kernel()
def _assign(buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray, wire_len: np.ndarray,
            linktype: np.ndarray, inside: np.ndarray, public: np.ndarray, n: int,
            keys: np.ndarray, shards: np.ndarray, out: np.ndarray, f: np.ndarray) -> None:
    """out[i]: the shard of frame i, or -1 when `parse()` must decide (not a plain key).
    `f`: scratch for the parser's fields (the engine's kernels allocate nothing)."""
    for i in range(len(offset)):
        status, x = _frame_key(buf, offset[i], caplen[i], wire_len[i], linktype[i], inside,
                               public, f)
        out[i] = _place(x, keys, shards, n) if status > 0 else status


@kernel()
def _keys(buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray, wire_len: np.ndarray,
          linktype: np.ndarray, inside: np.ndarray, public: np.ndarray, out: np.ndarray,
          plain: np.ndarray, f: np.ndarray) -> None:
    """out[i]: the endpoint key of frame i where plain[i] (a machine's frame with a plain key)."""
    for i in range(len(offset)):
        status, x = _frame_key(buf, offset[i], caplen[i], wire_len[i], linktype[i], inside,
                               public, f)
        out[i] = x
        plain[i] = status > 0


@cached()
def _place_py(hi: int, lo: int, port: int, proto: int, n: int, keys: np.ndarray,
              shards: np.ndarray) -> int:
    """The kernels' shard of an endpoint, callable from Python (an inlined kernel is not)."""
    return _place(_key(hi, lo, port, proto), keys, shards, n)  # type: ignore[no-any-return]


def _signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


NO_PLACEMENT = (np.empty(0, np.uint64), np.empty(0, np.int32))


def endpoint_shard(addr: bytes, port: int, proto: int, n: int,
                   placed: tuple[np.ndarray, np.ndarray] = NO_PLACEMENT) -> int:
    """The shard of an outside endpoint (what the kernel computes, for one packet)."""
    hi, lo = address_words(addr)
    return int(_place_py(_signed(hi), _signed(lo), port if proto in _PORTED else 0, proto, n,
                         *placed))


def _fragment_id(pkt: Packet) -> int:
    """The identification of a fragment: IPv4's 16 bits, IPv6's fragment header's 32."""
    data, l3 = pkt.data, pkt.l3
    if pkt.family == 4:
        return int.from_bytes(data[l3 + 4:l3 + 6], "big")
    nxt, i = data[l3 + 6], l3 + 40
    while nxt != _V6_FRAGMENT and nxt in _V6_EXT and i + 8 <= len(data):
        step = (data[i + 1] + 2) * 4 if nxt == 51 else (data[i + 1] + 1) * 8
        nxt, i = data[i], i + step
    if nxt != _V6_FRAGMENT or i + 8 > len(data):
        return -1
    return int.from_bytes(data[i + 4:i + 8], "big")


Placement = dict[int, int]  # endpoint key -> shard: the heavy endpoints, placed by `place`
SAMPLES = 32  # places in a classic pcap that `place` looks at
SAMPLE_BYTES = 1 << 19  # bytes read at each
SAMPLE = 65536  # packets of a pcapng trace's head that `place` counts
HEAVY = 64  # endpoints placed at most
_SANE_RUN = 16  # records in a row that must look sane where a sample starts


@cached()
def _resync(chunk: np.ndarray, big: bool, limit: int, frac_max: int) -> int:
    """The first position in chunk from which `_SANE_RUN` records in a row look like pcap
    records (lengths within the limit, the wire length at least the captured one, a
    fraction of a second below one), or -1. Only a sample's start: a wrong guess costs
    balance, never a result."""
    for p in range(len(chunk)):
        q = p
        for _ in range(_SANE_RUN):
            if q + 16 > len(chunk):
                return -1
            cap = int(_u32(chunk, q + 8, big))
            if (cap == 0 or cap > limit or _u32(chunk, q + 12, big) < cap
                    or _u32(chunk, q + 4, big) >= frac_max):
                break
            q += 16 + cap
        else:
            return p
    return -1


def _sample(trace: str | os.PathLike[str], sharder: Sharder) -> tuple[np.ndarray, int]:
    """Endpoint keys of packets from all along a trace (the machines' with plain keys), and
    how many packets were looked at: a classic pcap is read at `SAMPLES` evenly spread
    places, pcapng at its head."""
    reader = open_trace(trace)
    header = reader.pcap_header
    reader.close()
    frames: list[Batch] = []
    if header is None:
        head = next(iter(read_batches(trace, SAMPLE)), None)  # pcapng: the reader closes
        frames = [head] if head is not None else []
    else:
        size = os.path.getsize(reader.path)
        frac = 1 if header.nanosecond else 1000
        slots = SAMPLE_BYTES // 16
        with open(reader.path, "rb") as f:
            for j in range(SAMPLES):
                at = 24 + (size - 24) * j // SAMPLES
                chunk = np.frombuffer(os.pread(f.fileno(), SAMPLE_BYTES, at), np.uint8)
                start = 0 if j == 0 else _resync(chunk, header.big_endian,
                                                 header.record_limit, 10**9 // frac)
                if start < 0:
                    continue
                ts, src = np.empty(slots, np.int64), np.empty(slots, np.int64)
                caplen, wire = np.empty(slots, np.uint32), np.empty(slots, np.uint32)
                m, _, _ = _walk(chunk, start, header.big_endian, frac, header.record_limit,
                                0, ts, caplen, wire, src)
                frames.append(Batch(ts[:m], caplen[:m], wire[:m],
                                    np.full(m, header.linktype, np.uint16), src[:m], chunk))
    keys, looked = [], 0
    for b in frames:
        out = np.empty(len(b), np.uint64)
        plain = np.empty(len(b), np.bool_)
        _keys(b.buf, b.offset, b.caplen.astype(np.int64), b.wire_len.astype(np.int64),
              b.linktype.astype(np.int64), sharder.inside, sharder.public, out, plain,
              np.zeros(N_FIELDS, np.int64))
        keys.append(out[plain])
        looked += len(b)
    return (np.concatenate(keys) if keys else np.empty(0, np.uint64)), looked


def place(trace: str | os.PathLike[str], config: HostConfig, n: int) -> Placement:
    """Where the heaviest outside endpoints go, so that the shards get about as many packets
    each: the endpoints of packets sampled along the trace counted, the `HEAVY` busiest
    (each at least 1/(8n) of the sample) given in turn to the shard with the fewest packets
    so far, the others' packets counted where their hash puts them. A function of the
    endpoint, as the hash is: a flow and every flow it could collide with still share a
    shard."""
    if n < 2:
        return {}
    keys, looked = _sample(trace, Sharder(config, n))
    if not looked:
        return {}
    # the order is the packets' count, then the key: the same placement on every machine
    uniq, count = np.unique(keys, return_counts=True)
    order = np.lexsort((uniq, -count))
    heavy = [i for i in order[:HEAVY].tolist() if count[i] * 8 * n >= looked]
    loads = np.bincount((np.delete(uniq, heavy) % np.uint64(n)).astype(np.int64),
                        weights=np.delete(count, heavy), minlength=n)
    loads[0] += looked - len(keys)  # no machine's, or parsed in Python: shard 0 mostly
    placement: Placement = {}
    for i in heavy:
        k = int(np.argmin(loads))
        placement[int(uniq[i])] = k
        loads[k] += count[i]
    return placement


class Sharder:
    """The shard of every frame, batch by batch, in input order (fragments need the order)."""

    def __init__(self, config: HostConfig, n: int, placement: Placement | None = None
                 ) -> None:
        if n < 1:
            raise ValueError(f"shards must be at least 1, not {n}")
        self.n = n
        pairs = sorted((placement or {}).items())
        self.placed = (np.array([k for k, _ in pairs], np.uint64),
                       np.array([v for _, v in pairs], np.int32))
        if len(pairs) and not (self.placed[1].min() >= 0 and self.placed[1].max() < n):
            raise ValueError(f"a placement names a shard outside 0..{n - 1}")
        self.classifier = Classifier(config.machines)
        inside, public = classifier_tables(self.classifier)
        # the kernel wants 2-D arrays even when a config has no public addresses
        self.inside = inside.reshape(-1, 6)
        self.public = public.reshape(-1, 4)
        self.fragments: dict[tuple[int, bytes, bytes, int, int], int] = {}

    def assign(self, batch: Batch) -> np.ndarray:
        out = self.plain(batch)
        rows = np.flatnonzero(out < 0)
        out[rows] = self.resolve(batch, rows)
        return out

    def plain(self, batch: Batch, out: np.ndarray | None = None) -> np.ndarray:
        """The shard of each frame with a plain key (the compiled kernel); -1 where `resolve`
        must decide. Depends on no earlier frame, so any process may run it on any piece."""
        if out is None:
            out = np.empty(len(batch), np.int32)
        if self.n == 1:
            out[:] = 0
            return out
        _assign(batch.buf, batch.offset, batch.caplen.astype(np.int64),
                batch.wire_len.astype(np.int64), batch.linktype.astype(np.int64),
                self.inside, self.public, self.n, *self.placed, out,
                np.zeros(N_FIELDS, np.int64))
        return out

    def resolve(self, batch: Batch, rows: np.ndarray) -> list[int]:
        """The shards of `batch`'s frames `rows`, in input order: the slow path, which
        remembers first fragments, so every frame `plain` leaves must come here in order."""
        out = []
        for i in rows.tolist():
            pkt = parse(bytearray(batch.frame(i)), int(batch.linktype[i]),
                        int(batch.wire_len[i]))
            out.append(self.packet_shard(pkt))
        return out

    def packet_shard(self, pkt: Packet) -> int:
        """The slow path: one parsed packet."""
        if pkt.error not in (ParseError.OK, ParseError.UNSUPPORTED_PROTOCOL):
            return 0
        m, direction = self.classifier.classify(pkt)
        if m < 0:
            return 0
        egress = direction == EGRESS
        inner = pkt.inner
        if inner is not None:
            # the quoted datagram went the other way: its outside end is the other address
            if inner.error != ParseError.OK and inner.family == 0:
                return 0
            if egress:
                return endpoint_shard(inner.src, inner.sport, inner.proto, self.n,
                                      self.placed)
            return endpoint_shard(inner.dst, inner.dport, inner.proto, self.n, self.placed)
        addr, port = (pkt.dst, pkt.dport) if egress else (pkt.src, pkt.sport)
        if not pkt.frag:
            return endpoint_shard(addr, port, pkt.proto, self.n, self.placed)
        key = (pkt.family, pkt.src, pkt.dst, pkt.proto, _fragment_id(pkt))
        if pkt.frag_offset == 0:  # the first fragment carries the ports
            shard = endpoint_shard(addr, port, pkt.proto, self.n, self.placed)
            if len(self.fragments) >= FRAGMENTS_MAX:
                self.fragments.clear()
            self.fragments[key] = shard
            return shard
        hit = self.fragments.get(key)
        return hit if hit is not None else endpoint_shard(addr, 0, pkt.proto, self.n,
                                                          self.placed)


@dataclass
class Split:
    """A trace split into shard traces, and where each input packet went."""

    paths: list[Path]
    shard: np.ndarray  # int32 per input packet: its shard
    format: str
    linktype: int
    first_ts: int | None  # ns, the whole trace's first packet
    last_ts: int | None  # ns, its latest packet
    problem: str | None
    seconds: float = 0.0
    counts: list[int] = field(default_factory=list)

    def index(self, k: int) -> np.ndarray:
        """The input positions of shard k's packets, in its order."""
        return np.flatnonzero(self.shard == k)


class _Piece:
    """A piece of a classic pcap: its bytes, and its whole records as a batch of views into
    them with the shard of each."""

    def __init__(self, size: int, slots: int, linktype: int) -> None:
        self.buf = np.empty(size, np.uint8)
        self.linktype = linktype
        self.ts = np.empty(0, np.int64)
        self.caplen = np.empty(0, np.uint32)
        self.wire = np.empty(0, np.uint32)
        self.src = np.empty(0, np.int64)
        self.shard = np.empty(0, np.int32)
        self._grow(slots)

    def _grow(self, slots: int) -> None:
        was: tuple[np.ndarray, ...] = (self.ts, self.caplen, self.wire, self.src, self.shard)
        arrays = [np.empty(slots, a.dtype) for a in was]
        for new, old in zip(arrays, was, strict=True):
            new[:len(old)] = old
        self.ts, self.caplen, self.wire, self.src, self.shard = arrays
        self.linktypes = np.full(slots, self.linktype, np.uint16)

    def frames(self, lo: int, hi: int, filled: int) -> Batch:
        return Batch(ts_ns=self.ts[lo:hi], caplen=self.caplen[lo:hi], wire_len=self.wire[lo:hi],
                     linktype=self.linktypes[lo:hi], offset=self.src[lo:hi],
                     buf=self.buf[:filled])


def _pieces(trace: str | os.PathLike[str], sharder: Sharder
            ) -> Iterator[tuple[Batch, np.ndarray]]:
    """The frames of a trace, a piece at a time, with the shard of each. The trace's problem
    comes on the last piece (an empty one when needed). A classic pcap is read into two
    buffers in turn, `PIECE` bytes each, a piece's frames left where they were read (each
    piece is recycled for the one after next, as `read_batches(reuse=True)` does); pcapng
    comes from `read_batches`."""
    reader = open_trace(trace)
    header = reader.pcap_header
    reader.close()
    if header is None:
        for batch in read_batches(trace, BATCH):
            yield batch, sharder.assign(batch)
        return
    yield from _pcap_pieces(reader.path, header, sharder)


def _pcap_pieces(path: str, header: PcapHeader, sharder: Sharder, start: int = 24,
                 stop: int | None = None, reached: list[int] | None = None
                 ) -> Iterator[tuple[Batch, np.ndarray]]:
    """The records from file offset `start` (a record's start) that start before `stop` (the
    end of the file: None); `reached` gets the offset of the first record at or after `stop`
    (where the next reader starts) unless the trace broke off first."""
    # the record walk of packet/batch.py (its `_walk`), each `SIP` bytes as they are read
    frac_ns = 1 if header.nanosecond else 1000
    limit, big = header.record_limit, header.big_endian
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise TraceError(f"cannot open trace: {path} ({e.strerror})") from None
    pieces: list[_Piece] = []
    problem = None
    base = start  # file offset of the piece's first byte
    carry = np.empty(0, np.uint8)  # the start of a record the last piece cut
    end = stop is not None and start >= stop
    if end and reached is not None:
        reached.append(start)
    with file:
        file.seek(start)
        while problem is None and not end:
            if len(pieces) < 2:
                pieces.append(_Piece(PIECE, max(PIECE // 512, 64), header.linktype))
            p = pieces[0]
            pieces.reverse()
            buf = p.buf
            left = len(carry)
            need = 16 + (_caplen_at(carry, 0, big) if left >= 16 else 0)
            if need > len(buf) and need <= 16 + limit:  # a record longer than a piece
                buf = p.buf = np.empty(need, np.uint8)
            buf[:left] = carry
            filled, pos, n = left, 0, 0
            while filled < len(buf):
                got = file.readinto(buf.data[filled:min(filled + SIP, len(buf))])
                filled += got
                while True:
                    m, pos, why = _walk(buf[:filled], pos, big, frac_ns, limit, n, p.ts,
                                        p.caplen, p.wire, p.src)
                    if stop is not None and m > n:  # records from `stop` on are not ours
                        cut = n + int(np.searchsorted(p.src[n:m], stop - base + 16))
                        if cut < m:
                            m, pos, why = cut, int(p.src[cut]) - 16, WHOLE
                    if m > n:
                        p.shard[n:m] = sharder.assign(p.frames(n, m, filled))
                    n = m
                    if stop is not None and base + pos >= stop:
                        break
                    if why != WHOLE:
                        break
                    p._grow(max(2 * len(p.ts), 64))
                if stop is not None and base + pos >= stop:
                    end = True
                    if reached is not None:
                        reached.append(base + pos)
                    break
                if why == CORRUPT:
                    problem = corrupt_record_problem(base + pos, _caplen_at(buf, pos, big),
                                                     header.snaplen)
                    break
                if not got:  # end of file
                    end = True
                    if filled > pos:
                        need = 16 + (_caplen_at(buf, pos, big) if filled - pos >= 16 else 0)
                        problem = truncated_record_problem(base + pos, need, filled - pos)
                    break
            carry = buf[pos:filled].copy()
            base += pos
            batch = p.frames(0, n, filled)
            batch.problem = problem
            if n or problem:
                yield batch, p.shard[:n]
            if end:
                break


class Part:
    """Shard `k` of `n` read straight from the whole trace: its packets in input order, a
    batch per piece of the trace, with the trace's `problem` on the last. No shard file is
    written: every shard reads the whole trace and keeps its packets, so the split runs in
    parallel, in the workers (shard_ring.RingPart: the shards read it together instead). A
    batch's arrays are recycled for the batch after the next one, as
    `read_batches(reuse=True)` does.

    After the batches are read: `index` (the input position of each of its packets),
    `first_ns`/`end_ns` (the whole trace's first and latest packet), `counts` (packets per
    shard, of all shards), and the wall and processor time the reading and picking took (not
    counting the consumer's time between batches)."""

    def __init__(self, trace: str | os.PathLike[str], config: HostConfig, k: int, n: int,
                 placement: Placement | None = None) -> None:
        if not 0 <= k < n:
            raise ValueError(f"shard {k} of {n}")
        self.trace, self.k, self.n = trace, k, n
        self.sharder = Sharder(config, n, placement)
        self.index = np.empty(0, np.int64)
        self.first_ns: int | None = None
        self.end_ns: int | None = None
        self.counts = [0] * n
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __iter__(self) -> Iterator[Batch]:
        wall, cpu = time.perf_counter(), time.process_time()
        k, trace = self.k, self.trace
        parts: list[np.ndarray] = []
        counts = np.zeros(self.n, np.int64)
        linktype: int | None = None
        seen = 0
        for batch, shard in self._pieces():
            m = len(batch)
            if m:
                if linktype is None:
                    linktype = int(batch.linktype[0])
                    self.first_ns = int(batch.ts_ns[0])
                if np.any(batch.linktype != linktype):
                    raise ShardError(f"{os.fspath(trace)}: the trace mixes link types; a "
                                     "sharded replay needs one (split it by interface first)")
                top = int(batch.ts_ns.max())
                self.end_ns = top if self.end_ns is None else max(self.end_ns, top)
                counts += np.bincount(shard, minlength=self.n)
            sel = np.flatnonzero(shard == k)
            parts.append(sel + seen)
            seen += m
            if len(sel) or batch.problem:
                own = Batch(ts_ns=batch.ts_ns[sel], caplen=batch.caplen[sel],
                            wire_len=batch.wire_len[sel], linktype=batch.linktype[sel],
                            offset=batch.offset[sel], buf=batch.buf, problem=batch.problem)
                self._spent(wall, cpu)
                yield own
                wall, cpu = time.perf_counter(), time.process_time()
        self.index = np.concatenate(parts) if parts else np.empty(0, np.int64)
        self.counts = counts.tolist()
        if self.first_ns is not None and self.end_ns is not None:
            self.end_ns = max(self.end_ns, self.first_ns)
        self._spent(wall, cpu)

    def _pieces(self) -> Iterator[tuple[Batch, np.ndarray]]:
        """The trace's frames, a piece at a time, with the shard of each."""
        return _pieces(self.trace, self.sharder)

    def _spent(self, wall: float, cpu: float) -> None:
        self.seconds += time.perf_counter() - wall
        self.cpu_seconds += time.process_time() - cpu


def _batches(trace: str | os.PathLike[str]) -> Iterator[Batch]:
    # reuse: each batch is written out before the one after next is read
    yield from read_batches(trace, BATCH, reuse=True)


def split_trace(trace: str | os.PathLike[str], config: HostConfig, n: int,
                workdir: str | os.PathLike[str], placement: Placement | None = None) -> Split:
    """Write shard k's packets to workdir/shard-k.pcap (timestamps and lengths kept)."""
    started = time.perf_counter()
    with open_trace(trace) as reader:  # a TraceError for a file that is not a trace
        fmt = reader.format
        first = next(iter(reader), None)
        linktype = first.linktype if first is not None else (
            reader.pcap_header.linktype if reader.pcap_header else 1)
    sharder = Sharder(config, n, placement)
    paths = [Path(workdir) / f"shard-{k}.pcap" for k in range(n)]
    parts: list[np.ndarray] = []
    first_ts = last_ts = None
    problem = None
    with ExitStack() as stack:
        writers = [stack.enter_context(PcapWriter(p, linktype=linktype)) for p in paths]
        for batch in _batches(trace):
            problem = batch.problem
            if not len(batch):
                continue
            if np.any(batch.linktype != linktype):
                raise ShardError(f"{os.fspath(trace)}: the trace mixes link types; a sharded "
                                 "replay needs one (split it by interface first)")
            if first_ts is None:
                first_ts = int(batch.ts_ns[0])
            top = int(batch.ts_ns.max())
            last_ts = top if last_ts is None else max(last_ts, top)
            shard = sharder.assign(batch)
            parts.append(shard)
            for k, w in enumerate(writers):
                sel = np.flatnonzero(shard == k)
                if len(sel):
                    w.write_batch(batch.ts_ns[sel], batch.buf, batch.offset[sel],
                                  batch.caplen[sel], batch.wire_len[sel])
    shard_of = np.concatenate(parts) if parts else np.empty(0, np.int32)
    if first_ts is not None and last_ts is not None:
        last_ts = max(last_ts, first_ts)
    return Split(paths, shard_of, fmt, linktype, first_ts, last_ts, problem,
                 time.perf_counter() - started,
                 np.bincount(shard_of, minlength=n).tolist())


__all__ = ["Part", "Placement", "ShardError", "Sharder", "Split", "TraceError", "endpoint_shard",
           "place", "split_trace"]
