"""The flow entry: a flow's complete chain state in one fixed, packed little-endian layout.

This is what crosses a channel when a flow moves between tiers, and the row type of the PNIC's
second cache. It is defined here once as a numpy structured dtype; docs/flow-entry.md lists the
offsets, and tests/test_entry.py pins size and offsets so that any mirror (a C struct for a
kernel fast path) can be checked against it automatically.

Byte order: every integer is little-endian (host order on x86/arm64). Ports are stored as
numbers (not network order). Addresses are 16 bytes: IPv6 as is, IPv4 in the first 4 bytes
followed by 12 zero bytes (`family` tells which). Times are nanoseconds of trace time.
Retired fields become `reservedN`; never reorder.
"""

from __future__ import annotations

import builtins
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

import numpy as np

from flowshift.conntrack_types import Status, TcpConn, TcpDir
from flowshift.flow import FlowKey, new_key

__all__ = ["ENTRY_DTYPE", "ENTRY_SIZE", "SERVICE_NAMES", "Flow", "Service", "Status", "Tier",
           "chain_bits", "expires_of", "field_offsets", "key_of"]


class Tier(IntEnum):
    MACHINE = 0
    VNIC = 1
    PNIC = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Service(IntFlag):
    """The chain bitmap: which services a flow's chain runs."""

    FIREWALL = 1
    NAT = 2
    LB = 4
    COUNT = 8


SERVICE_NAMES = {"firewall": Service.FIREWALL, "nat": Service.NAT, "lb": Service.LB,
                 "count": Service.COUNT}


def chain_bits(services: list[str] | tuple[str, ...]) -> int:
    bits = 0
    for name in services:
        bits |= SERVICE_NAMES[name]
    return bits


_TCP_DIR = [("end", "<u4"), ("maxend", "<u4"), ("maxwin", "<u4"), ("maxack", "<u4"),
            ("scale", "u1"), ("flags", "u1")]

ENTRY_DTYPE = np.dtype(
    [
        # key: the original direction as it arrives (before NAT)
        ("family", "u1"),
        ("proto", "u1"),
        ("zone", "<u2"),
        ("sport", "<u2"),
        ("dport", "<u2"),
        ("src", "u1", 16),
        ("dst", "u1", 16),
        # rewrite: the original direction as it leaves (after NAT/LB); the reply key is its reverse
        ("xsrc", "u1", 16),
        ("xdst", "u1", 16),
        ("xsport", "<u2"),
        ("xdport", "<u2"),
        # ownership and chain
        ("machine", "<u2"),
        ("chain", "u1"),
        ("owner", "u1"),
        ("generation", "<u4"),
        ("status", "<u2"),
        ("rule", "<i2"),  # firewall rule that admitted the flow, -1: the default
        ("backend", "<i2"),  # LB backend index, -1: none
        # TCP conntrack (Linux struct ip_ct_tcp)
        ("tcp_state", "u1"),
        ("last_dir", "u1"),
        ("retrans", "u1"),
        ("last_index", "u1"),
        ("last_wscale", "u1"),
        ("last_flags", "u1"),
        ("last_seq", "<u4"),
        ("last_ack", "<u4"),
        ("last_end", "<u4"),
        ("last_win", "<u4"),
        ("seen0", _TCP_DIR),
        ("seen1", _TCP_DIR),
        # times (ns of trace time)
        ("created", "<i8"),
        ("last_seen", "<i8"),
        ("expires", "<i8"),
        ("stream_ts", "<i8"),  # UDP: after this time a replied flow counts as a stream
        # counters per direction (0 original, 1 reply)
        ("packets", "<u8", 2),
        ("bytes", "<u8", 2),
        ("reserved0", "u1", 12),
    ],
    align=False,
)

ENTRY_SIZE = ENTRY_DTYPE.itemsize


def field_offsets(record: str = "") -> dict[str, int]:
    """Byte offset of each field of the entry, or of its sub-record `record` (e.g. "seen0"):
    what a compiled mirror of the layout reads and writes."""
    dtype = ENTRY_DTYPE[record] if record else ENTRY_DTYPE
    fields = dtype.fields
    if fields is None:
        raise ValueError(f"entry field {record!r} is not a sub-record")
    return {name: int(spec[1]) for name, spec in fields.items()}


# The same layout as a struct format: packing all fields at once is ~20x faster than setting
# record fields one by one. tests/test_entry.py checks that both describe identical bytes.
_KEY_FORMAT = "<BBHHH16s16s"
_STRUCT = struct.Struct(
    _KEY_FORMAT +  # key
    "16s16sHH"  # rewrite
    "HBBIHhh"  # machine, chain, owner, generation, status, rule, backend
    "BBBBBBIIII"  # tcp scalars
    "IIIIBB" "IIIIBB"  # seen0, seen1
    "qqqq"  # times
    "QQQQ"  # packets[2], bytes[2]
    "12x"
)
if _STRUCT.size != ENTRY_SIZE:
    raise ImportError(f"entry struct packs {_STRUCT.size} bytes, ENTRY_DTYPE holds {ENTRY_SIZE}")
_KEY = struct.Struct(_KEY_FORMAT)  # the key alone, at the entry's start


def key_of(raw: builtins.bytes | memoryview) -> FlowKey:
    """The key of an ENTRY_DTYPE record (`Flow.from_bytes(raw).key`, without the rest)."""
    return _key(*_KEY.unpack_from(raw))


_EXPIRES = field_offsets()["expires"]


def expires_of(raw: builtins.bytes | memoryview) -> int:
    """The expiry of an ENTRY_DTYPE record (`Flow.from_bytes(raw).expires`, without the rest)."""
    return int.from_bytes(raw[_EXPIRES:_EXPIRES + 8], "little", signed=True)


def _key(fam: int, proto: int, zone: int, sport: int, dport: int, src: builtins.bytes,
         dst: builtins.bytes) -> FlowKey:
    """A key from its unpacked fields (addresses padded to 16 bytes)."""
    n = 4 if fam == 4 else 16
    return new_key((fam, proto, zone, src[:n], dst[:n], sport, dport))


_NO_TCP = (0,) * 22
_SEEN_REPLY = int(Status.SEEN_REPLY)  # a plain int: IntFlag operators cost per entry


@dataclass(slots=True)
class Flow:
    """A flow's state as the reference engine keeps it (first cache, machine tier)."""

    key: FlowKey  # original direction, as it arrives
    xlat: FlowKey  # original direction, as it leaves (after NAT/LB)
    machine: int
    chain: int
    tcp: TcpConn | None = None
    status: int = 0
    rule: int = -1
    backend: int = -1
    created: int = 0
    last_seen: int = 0
    expires: int = 0
    stream_ts: int = 0
    packets: list[int] = field(default_factory=lambda: [0, 0])
    bytes: list[int] = field(default_factory=lambda: [0, 0])
    generation: int = 0
    owner: int = Tier.MACHINE

    @property
    def reply_key(self) -> FlowKey:
        return self.xlat.reversed()

    def to_bytes(self) -> builtins.bytes:  # builtins: the field `bytes` shadows the type here
        """Export as one ENTRY_DTYPE record."""
        k, x, t = self.key, self.xlat, self.tcp
        if t is None:
            tcp = _NO_TCP
        else:
            s0, s1 = t.seen
            tcp = (t.state, t.last_dir, t.retrans, t.last_index, t.last_wscale, t.last_flags,
                   t.last_seq, t.last_ack, t.last_end, t.last_win,
                   s0.end, s0.maxend, s0.maxwin, s0.maxack, s0.scale, s0.flags,
                   s1.end, s1.maxend, s1.maxwin, s1.maxack, s1.scale, s1.flags)
        return _STRUCT.pack(  # "16s" pads an IPv4 address with the 12 zero bytes itself
            k.family, k.proto, k.zone, k.sport, k.dport, k.src, k.dst, x.src, x.dst,
            x.sport, x.dport,
            self.machine, self.chain, self.owner, self.generation,
            self.status | (_SEEN_REPLY if t is not None and t.seen_reply else 0), self.rule,
            self.backend, *tcp, self.created, self.last_seen, self.expires, self.stream_ts,
            *self.packets, *self.bytes)

    @classmethod
    def from_bytes(cls, raw: builtins.bytes | memoryview) -> Flow:
        """Import one ENTRY_DTYPE record: the exact inverse of to_bytes."""
        v = _STRUCT.unpack(raw)
        fam, proto, zone = v[0], v[1], v[2]
        n = 4 if fam == 4 else 16
        key = _key(*v[:7])
        xlat = new_key((fam, proto, zone, v[7][:n], v[8][:n], v[9], v[10]))
        tcp = None
        if proto == 6:
            tcp = TcpConn(
                seen=(TcpDir(*v[28:34]), TcpDir(*v[34:40])),
                state=v[18], last_dir=v[19], retrans=v[20], last_index=v[21],
                last_wscale=v[22], last_flags=v[23], last_seq=v[24], last_ack=v[25],
                last_end=v[26], last_win=v[27], seen_reply=bool(v[15] & _SEEN_REPLY))
        return cls(key=key, xlat=xlat, machine=v[11], chain=v[12], owner=v[13],
                   generation=v[14], status=v[15], rule=v[16], backend=v[17], tcp=tcp,
                   created=v[40], last_seen=v[41], expires=v[42], stream_ts=v[43],
                   packets=[v[44], v[45]], bytes=[v[46], v[47]])

    def to_record(self) -> np.void:
        """Export as one ENTRY_DTYPE record (a structured scalar)."""
        record: np.void = np.frombuffer(self.to_bytes(), dtype=ENTRY_DTYPE)[0]  # one item
        return record

    @classmethod
    def from_record(cls, record: np.ndarray | np.void) -> Flow:
        return cls.from_bytes(record.tobytes())

    def copy(self) -> Flow:
        return Flow.from_bytes(self.to_bytes())
