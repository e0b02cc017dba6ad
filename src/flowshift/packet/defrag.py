"""IP reassembly before connection tracking, as Linux's nf_defrag_ipv4 / nf_defrag_ipv6 do it.

Linux reassembles a fragmented datagram before conntrack sees it, tracks (and NATs) the whole
datagram, and forwards it fragmented again along the boundaries it arrived with. This module
is that reassembly, without the rest of the chain:

- `Defrag.push(ip, ts_ns)` takes one IP packet (bytes from the IP header on). A packet that is
  not a fragment comes back as it is; a fragment is queued and `push` returns a `Reassembled`
  once its datagram is complete, else None.
- Queues are keyed as Linux keys them: IPv4 (zone, src, dst, protocol, id), IPv6 (zone, src,
  dst, id). Fragments may come in any order. A fragment that lies within a run of fragments
  already queued (a duplicate) is dropped and the queue kept; one that overlaps partly kills
  the whole queue (IPv4 since Linux 4.19, IPv6 per RFC 5722); later fragments of the same
  id start a new queue, as in Linux.
- A queue lives `timeout_ns` of trace time from its first fragment (`ipfrag_time`, 30 s;
  nf_conntrack_frag6_timeout is 60 s by default) and is then dropped whole.
- Memory is charged per queued fragment (its IP length). Above `high_thresh` (4 MiB) every
  fragment is dropped until queues complete or expire: since Linux 4.17 there is no eviction
  of old queues (ipfrag_low_thresh is obsolete).
- `counts` holds every outcome by `DefragOutcome`.

Linux forwards the datagram cut again at the boundaries it arrived with, in offset order,
every fragment with the first fragment's header (`Reassembled.fragments` are the fragments
as received, each once). After NAT rewrote the reassembled datagram (its addresses, and its
L4 header, whose checksum covers the whole datagram), `split(translated, r.pieces)` is that
cut, keeping the IPv4 id; `refragment(datagram, size)` is Linux's ip_do_fragment cut at
`r.max_size`, the largest fragment received.
"""

from __future__ import annotations

import bisect
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from flowshift.packet.checksum import checksum

IPFRAG_TIME_NS = 30_000_000_000  # net.ipv4.ipfrag_time
FRAG6_TIMEOUT_NS = 60_000_000_000  # net.netfilter.nf_conntrack_frag6_timeout
IPFRAG_HIGH_THRESH = 4 * 1024 * 1024  # net.ipv4.ipfrag_high_thresh (and frag6_high_thresh)
IP_MAX_LEN = 65535

_IP_MF, _IP_DF, _IP_OFFSET = 0x2000, 0x4000, 0x1FFF
_EXT_UNFRAGMENTABLE = (0, 43, 60)  # hop-by-hop, routing, destination options before routing
_NH_FRAGMENT = 44


class DefragOutcome(IntEnum):
    """What happened to a fragment, or to its queue. Numbered; never renumbered."""

    QUEUED = 1  # kept, datagram not complete yet
    REASSEMBLED = 2  # completed a datagram (counted once per datagram)
    DUPLICATE = 3  # lies within fragments already queued: dropped, queue kept
    OVERLAP = 4  # overlaps queued fragments partly: the whole queue dropped
    EXPIRED = 5  # queue older than the timeout: dropped whole (counted once per queue)
    TOO_BIG = 6  # the datagram would exceed 65535 bytes
    MEMORY = 7  # fragment memory above high_thresh: fragment dropped
    INVALID = 8  # bad geometry (misaligned, empty, beyond the end) or an ECN mix

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class FragmentInfo:
    """Where a fragment sits in its datagram. `header` is the per-fragment part: IPv4 header
    with options; IPv6 header + extension headers before the fragment header."""

    family: int
    key: tuple[int, int, bytes, bytes, int, int]  # (family, zone, src, dst, proto/0, id)
    header_len: int
    next_header: int  # IPv6: the protocol after the fragment header (IPv4: the protocol)
    nh_offset: int  # IPv6: offset of the next-header byte that names the fragment header
    offset: int  # bytes
    more: bool
    payload: bytes  # the fragment's share of the datagram's payload


def fragment_info(ip: bytes, zone: int = 0) -> FragmentInfo | None:
    """Fragment fields of an IP packet, or None when it is not a fragment (or unreadable)."""
    if len(ip) < 20:
        return None
    version = ip[0] >> 4
    if version == 4:
        ihl = (ip[0] & 0x0F) * 4
        total, ident, fo = struct.unpack_from("!HHH", ip, 2)
        if ihl < 20 or total < ihl or total > len(ip) or not fo & (_IP_MF | _IP_OFFSET):
            return None
        return FragmentInfo(4, (4, zone, ip[12:16], ip[16:20], ip[9], ident), ihl, ip[9], 9,
                            (fo & _IP_OFFSET) * 8, bool(fo & _IP_MF), bytes(ip[ihl:total]))
    if version != 6 or len(ip) < 48:
        return None
    end = 40 + struct.unpack_from("!H", ip, 4)[0]
    nh, pos, nh_at = ip[6], 40, 6
    while nh in _EXT_UNFRAGMENTABLE and pos + 8 <= end:
        nh, nh_at, pos = ip[pos], pos, pos + (ip[pos + 1] + 1) * 8
    if nh != _NH_FRAGMENT or pos + 8 > end or end > len(ip):
        return None
    nxt, fo, ident = struct.unpack_from("!BxHI", ip, pos)
    if not fo & 0xFFF9:  # offset 0 and M clear: an atomic fragment, not a fragment
        return None
    return FragmentInfo(6, (6, zone, ip[8:24], ip[24:40], 0, ident), pos, nxt, nh_at,
                        fo & 0xFFF8, bool(fo & 1), bytes(ip[pos + 8:end]))


@dataclass
class _Fragment:
    offset: int
    end: int
    packet: bytes  # the fragment as received (IP header on)
    info: FragmentInfo


@dataclass
class _Run:
    """Fragments received back to back in offset order: Linux tells a duplicate (within one
    run) from an overlap (anything else that touches a run) by these runs."""

    start: int
    end: int
    frags: list[_Fragment] = field(default_factory=list)


@dataclass
class _Queue:
    created_ns: int
    runs: list[_Run] = field(default_factory=list)  # sorted by start, disjoint
    length: int = 0  # the datagram's payload length, as far as known
    last_in: bool = False
    first: _Fragment | None = None
    meat: int = 0  # payload bytes received
    memory: int = 0
    max_size: int = 0  # largest fragment received (IP length)
    max_df_size: int = 0  # largest IPv4 fragment with DF set
    ecn: int = 0  # bit per ECN codepoint seen

    @property
    def tail(self) -> _Fragment | None:
        return self.runs[-1].frags[-1] if self.runs else None


@dataclass(frozen=True, slots=True)
class Reassembled:
    """A completed datagram and what Linux forwards for it."""

    datagram: bytes  # the reassembled IP datagram: the first fragment's header, unfragmented
    fragments: list[bytes]  # the received fragments, each once, in offset order
    pieces: list[tuple[int, int]]  # (offset, length) of each of them in the payload
    max_size: int  # the largest fragment received (IP length): Linux's re-fragmenting size
    ident: int  # IPv4 id / IPv6 fragment id


class Defrag:
    """Fragment queues of one conntrack zone space, driven by trace time (nanoseconds)."""

    def __init__(self, timeout_ns: int = IPFRAG_TIME_NS,
                 high_thresh: int = IPFRAG_HIGH_THRESH,
                 timeout6_ns: int = FRAG6_TIMEOUT_NS) -> None:
        self.timeout_ns = {4: timeout_ns, 6: timeout6_ns}
        self.high_thresh = high_thresh
        self.memory = 0
        self.counts: Counter[DefragOutcome] = Counter()
        self.last = DefragOutcome.QUEUED  # what the last push did with its fragment
        self._queues: dict[tuple[int, int, bytes, bytes, int, int], _Queue] = {}

    def __len__(self) -> int:
        return len(self._queues)

    def __contains__(self, key: object) -> bool:
        """Is a queue open for this key (`FragmentInfo.key`)?"""
        return key in self._queues

    def expire(self, now_ns: int) -> int:
        """Drop every queue whose time is up at `now_ns`; returns how many."""
        gone = [k for k, q in self._queues.items()
                if now_ns - q.created_ns >= self.timeout_ns[k[0]]]
        for k in gone:
            self._kill(k, DefragOutcome.EXPIRED)
        return len(gone)

    def push(self, ip: bytes, ts_ns: int, zone: int = 0) -> bytes | Reassembled | None:
        """One IP packet in. Not a fragment: returned as is. A fragment: None until its
        datagram completes, then the `Reassembled` datagram. `last` tells what happened."""
        self.expire(ts_ns)
        info = fragment_info(ip, zone)
        if info is None:
            return ip
        self.last = self._queue(info, bytes(ip), ts_ns)
        self.counts[self.last] += 1
        if self.last is not DefragOutcome.REASSEMBLED:
            return None
        return self._reassemble(info.key)

    # ------------------------------------------------------------------ queueing
    def _queue(self, info: FragmentInfo, packet: bytes, ts_ns: int) -> DefragOutcome:
        if self.memory > self.high_thresh:
            return DefragOutcome.MEMORY
        offset, end = info.offset, info.offset + len(info.payload)
        q = self._queues.get(info.key)
        if q is None:  # Linux finds or creates the queue first, whatever follows
            q = self._queues[info.key] = _Queue(ts_ns)
        if info.family == 6 and end > IP_MAX_LEN:
            return DefragOutcome.TOO_BIG
        if not info.more:
            if end < q.length or (q.last_in and end != q.length):
                return self._corrupt(info)
            q.last_in, q.length = True, end
        else:
            if end & 7:
                if info.family == 6:  # RFC 8200: kills the queue
                    return self._kill(info.key, DefragOutcome.INVALID)
                end &= ~7  # IPv4: trimmed to a multiple of 8
            if end > q.length:
                if q.last_in:
                    return self._corrupt(info)
                q.length = end
        if end == offset:
            return self._corrupt(info)
        frag = _Fragment(offset, end, packet, info)
        placed = self._insert(q, frag)
        if placed is not DefragOutcome.QUEUED:
            if placed is DefragOutcome.OVERLAP:
                self._kill(info.key, DefragOutcome.OVERLAP)
            return placed
        q.meat += end - offset
        q.memory += len(packet)
        self.memory += len(packet)
        q.max_size = max(q.max_size, len(packet))
        if info.family == 4:
            q.ecn |= 1 << (packet[1] & 3)
            if packet[6] & 0x40:
                q.max_df_size = max(q.max_df_size, len(packet))
        else:
            q.ecn |= 1 << ((struct.unpack_from("!I", packet)[0] >> 20) & 3)
        if offset == 0:
            q.first = frag
        if q.first is None or not q.last_in or q.meat != q.length:
            return DefragOutcome.QUEUED
        # complete: what Linux still refuses when it glues the datagram together
        size = q.first.info.header_len + q.length  # IPv4 total length
        if info.family == 6:
            size -= 40  # IPv6 payload length
        if size > IP_MAX_LEN:
            return self._kill(info.key, DefragOutcome.TOO_BIG)
        if _ecn(q.ecn) < 0:
            return self._kill(info.key, DefragOutcome.INVALID)
        return DefragOutcome.REASSEMBLED

    def _corrupt(self, info: FragmentInfo) -> DefragOutcome:
        """Inconsistent geometry: IPv4 drops the whole queue, IPv6 (nf_conntrack_reasm)
        only the fragment."""
        if info.family == 4:
            return self._kill(info.key, DefragOutcome.INVALID)
        return DefragOutcome.INVALID

    @staticmethod
    def _insert(q: _Queue, frag: _Fragment) -> DefragOutcome:
        tail = q.tail
        if tail is None or tail.end < frag.end:
            # the common case: past everything queued
            if tail is not None and frag.offset < tail.end:
                return DefragOutcome.OVERLAP
            if tail is not None and frag.offset == tail.end:
                run = q.runs[-1]
                run.frags.append(frag)
                run.end = frag.end
            else:
                q.runs.append(_Run(frag.offset, frag.end, [frag]))
            return DefragOutcome.QUEUED
        starts = [r.start for r in q.runs]
        i = bisect.bisect_right(starts, frag.offset)
        for run in q.runs[max(i - 1, 0):]:
            if frag.end <= run.start:
                break
            if frag.offset >= run.end:
                continue
            if run.start <= frag.offset and frag.end <= run.end:
                return DefragOutcome.DUPLICATE
            return DefragOutcome.OVERLAP
        q.runs.insert(i, _Run(frag.offset, frag.end, [frag]))
        return DefragOutcome.QUEUED

    def _kill(self, key: tuple[int, int, bytes, bytes, int, int],
              why: DefragOutcome) -> DefragOutcome:
        q = self._queues.pop(key, None)
        if q is not None:
            self.memory -= q.memory
            if why is DefragOutcome.EXPIRED:
                self.counts[why] += 1
        return why

    # ------------------------------------------------------------------ reassembly
    def _reassemble(self, key: tuple[int, int, bytes, bytes, int, int]) -> Reassembled:
        q = self._queues[key]
        first = q.first
        assert first is not None
        frags = [f for run in q.runs for f in run.frags]
        payload = b"".join(f.info.payload[: f.end - f.offset] for f in frags)
        info = first.info
        ecn = _ecn(q.ecn)
        self._kill(key, DefragOutcome.REASSEMBLED)
        head = bytearray(first.packet[: info.header_len])
        if info.family == 4:
            struct.pack_into("!H", head, 2, len(head) + len(payload))
            # DF only when the largest fragment carried it (Linux: IPSKB_FRAG_PMTU)
            df = q.max_df_size and q.max_df_size == q.max_size
            struct.pack_into("!H", head, 6, _IP_DF if df else 0)
            head[1] |= ecn
            head[10:12] = b"\0\0"
            struct.pack_into("!H", head, 10, checksum(head))
        else:
            head[info.nh_offset] = info.next_header
            struct.pack_into("!H", head, 4, len(head) - 40 + len(payload))
            head[1] |= ecn << 4
        return Reassembled(bytes(head) + payload, [f.packet for f in frags],
                           [(f.offset, f.end - f.offset) for f in frags], q.max_size,
                           info.key[5])


def _ecn(seen: int) -> int:
    """The ECN codepoint of a reassembled datagram from the set its fragments carried
    (RFC 3168 5.3): CE if any fragment had it; not-ECT mixed with ECT/CE is invalid (-1)."""
    not_ect, ce = 1 << 0, 1 << 3
    if seen & not_ect and seen != not_ect:
        return -1
    return 3 if seen & ce else 0


# ---------------------------------------------------------------------- fragmenting again
def _unfragmentable(datagram: bytes) -> tuple[int, int, int]:
    """IPv6: (length of the per-fragment headers, offset of the next-header byte to point
    at the fragment header, the protocol that follows them)."""
    nh, pos, nh_at = datagram[6], 40, 6
    while nh in _EXT_UNFRAGMENTABLE:
        nh, nh_at, pos = datagram[pos], pos, pos + (datagram[pos + 1] + 1) * 8
    return pos, nh_at, nh


def split(datagram: bytes, pieces: Sequence[tuple[int, int]], ident: int | None = None,
          ) -> list[bytes]:
    """Fragments of an unfragmented IP datagram cut at `pieces` ((offset, length) of its
    payload, in order, covering it). IPv4 keeps its id (`ident` overrides); non-copied
    options of later fragments become NOPs, as Linux's ip_options_fragment does. IPv6
    needs `ident` for the fragment header."""
    out = []
    if datagram[0] >> 4 == 4:
        ihl = (datagram[0] & 0x0F) * 4
        total = struct.unpack_from("!H", datagram, 2)[0]
        payload = datagram[ihl:total]
        df = struct.unpack_from("!H", datagram, 6)[0] & _IP_DF
        head = bytearray(datagram[:ihl])
        if ident is not None:
            struct.pack_into("!H", head, 4, ident)
        for off, n in pieces:
            h = bytearray(head)
            more = off + n < len(payload)
            struct.pack_into("!H", h, 2, ihl + n)
            struct.pack_into("!H", h, 6, df | (off >> 3) | (_IP_MF if more else 0))
            h[10:12] = b"\0\0"
            struct.pack_into("!H", h, 10, checksum(h))
            out.append(bytes(h) + payload[off:off + n])
            if off == 0:
                head = _options_for_later_fragments(head)
        return out
    if ident is None:
        raise ValueError("an IPv6 fragment header needs an identification")
    hlen, nh_at, nh = _unfragmentable(datagram)
    payload = datagram[hlen:40 + struct.unpack_from("!H", datagram, 4)[0]]
    for off, n in pieces:
        h = bytearray(datagram[:hlen])
        h[nh_at] = _NH_FRAGMENT
        struct.pack_into("!H", h, 4, hlen - 40 + 8 + n)
        more = off + n < len(payload)
        frag = struct.pack("!BxHI", nh, off | int(more), ident)
        out.append(bytes(h) + frag + payload[off:off + n])
    return out


def refragment(datagram: bytes, size: int, ident: int | None = None) -> list[bytes]:
    """Linux's ip_do_fragment / ip6_fragment cut: fragments of at most `size` bytes (IP
    length), every payload but the last a multiple of 8. A datagram that fits is returned
    whole."""
    if datagram[0] >> 4 == 4:
        hlen = (datagram[0] & 0x0F) * 4
        plen = struct.unpack_from("!H", datagram, 2)[0] - hlen
        per = (size - hlen) & ~7
    else:
        hlen = _unfragmentable(datagram)[0]
        plen = 40 + struct.unpack_from("!H", datagram, 4)[0] - hlen
        per = (size - hlen - 8) & ~7
    if hlen + plen <= size:
        return [datagram]
    if per <= 0:
        raise ValueError(f"fragment size {size} leaves no room for payload")
    return split(datagram, [(o, min(per, plen - o)) for o in range(0, plen, per)], ident)


def _options_for_later_fragments(head: bytearray) -> bytearray:
    """IPv4 options whose copy flag is clear become NOPs after the first fragment."""
    h = bytearray(head)
    i = 20
    while i < len(h):
        kind = h[i]
        if kind == 0:  # end of options
            break
        if kind == 1:
            i += 1
            continue
        length = h[i + 1] if i + 1 < len(h) else 0
        if length < 2:
            break
        if not kind & 0x80:
            h[i:i + length] = b"\x01" * length
        i += length
    return h
