"""Flow keys, directions and address ranges: the vocabulary every layer above shares.

A key is a plain NamedTuple so that it hashes fast and reads well. Addresses are raw bytes
(4 for IPv4, 16 for IPv6). ICMP echo uses the identifier as both "ports", so that the reply
direction of an echo flow is simply the reversed key. A packet's direction relative to its
machine is EGRESS (towards the wire) or INGRESS; `AddressRange` is an inclusive range of
addresses, as NAT rules name them. This module imports nothing of flowshift: it is the bottom
layer (tests/test_layers.py).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import NamedTuple, cast

NS_PER_S = 1_000_000_000  # trace time is in nanoseconds

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMPV6: "icmpv6"}

EGRESS = 0  # from the machine towards the wire
INGRESS = 1  # from the wire towards the machine


class Dir(IntEnum):
    """Direction of a packet within its flow (Linux IP_CT_DIR_ORIGINAL / IP_CT_DIR_REPLY)."""

    ORIGINAL = 0
    REPLY = 1


class FlowKey(NamedTuple):
    family: int  # 4 or 6
    proto: int
    zone: int
    src: bytes
    dst: bytes
    sport: int
    dport: int

    def reversed(self) -> FlowKey:
        family, proto, zone, src, dst, sport, dport = self
        return new_key((family, proto, zone, dst, src, dport, sport))

    def canonical(self) -> FlowKey:
        """The same key for both directions: the smaller (address, port) end first."""
        if (self.src, self.sport) <= (self.dst, self.dport):
            return self
        return self.reversed()

    def direction_of(self, key: FlowKey) -> Dir:
        """Direction of a packet whose key is `key` within the flow that `self` names (original)."""
        return Dir.ORIGINAL if key == self else Dir.REPLY

    def __str__(self) -> str:
        proto = PROTO_NAMES.get(self.proto, str(self.proto))
        return (
            f"{proto} {format_endpoint(self.src, self.sport)} > "
            f"{format_endpoint(self.dst, self.dport)}"
        )


# FlowKey((...)) without NamedTuple's own __new__, a Python call: a key is built per packet,
# and every new flow reverses its keys several times
new_key = cast("Callable[[tuple[int, int, int, bytes, bytes, int, int]], FlowKey]",
               partial(tuple.__new__, FlowKey))


_ZERO80 = bytes(10)  # an IPv6 address that starts so may be written with a dotted quad


def format_addr(addr: bytes) -> str:
    """The address as ipaddress writes it, without its objects (an event per offer and return):
    inet_ntop writes IPv6 as RFC 5952 does, as ipaddress does, but for an address whose first
    80 bits are zero, which it may end with a dotted quad."""
    if len(addr) == 4:
        return socket.inet_ntop(socket.AF_INET, addr)
    if len(addr) == 16 and addr[:10] != _ZERO80:
        return socket.inet_ntop(socket.AF_INET6, addr)
    return str(ipaddress.ip_address(addr))


def format_endpoint(addr: bytes, port: int) -> str:
    a = format_addr(addr)
    return f"[{a}]:{port}" if len(addr) == 16 else f"{a}:{port}"


@dataclass(frozen=True)
class AddressRange:
    """An inclusive range of IPv4 (4-byte) or IPv6 (16-byte) addresses, in network order."""

    first: bytes
    last: bytes

    def __post_init__(self) -> None:
        if len(self.first) not in (4, 16) or len(self.first) != len(self.last):
            raise ValueError("address range ends must both be 4 (IPv4) or 16 (IPv6) bytes")
        if self.first > self.last:
            raise ValueError(f"address range {self} runs backwards")

    @classmethod
    def from_str(cls, text: str) -> AddressRange:
        """Parse "a" or "a-b" (IPv4 or IPv6, both ends of one family)."""
        first, sep, last = text.partition("-")
        try:
            lo = ipaddress.ip_address(first.strip())
            hi = ipaddress.ip_address(last.strip()) if sep else lo
        except ValueError as err:
            raise ValueError(f"bad address range {text!r}: {err}") from None
        if lo.version != hi.version:
            raise ValueError(f"bad address range {text!r}: mixes IPv4 and IPv6")
        if lo.packed > hi.packed:  # one family: byte order is address order
            raise ValueError(f"bad address range {text!r}: runs backwards")
        return cls(lo.packed, hi.packed)

    @property
    def family(self) -> int:
        return 4 if len(self.first) == 4 else 6

    @property
    def size(self) -> int:
        """How many addresses; unlike len(), not limited to sys.maxsize."""
        return int.from_bytes(self.last, "big") - int.from_bytes(self.first, "big") + 1

    def __len__(self) -> int:
        return self.size

    def __contains__(self, addr: object) -> bool:
        return (
            isinstance(addr, bytes)
            and len(addr) == len(self.first)
            and (self.first <= addr <= self.last)
        )

    def address(self, index: int) -> bytes:
        """The `index`-th address of the range (0 is `first`)."""
        if not 0 <= index < self.size:
            raise IndexError(f"address index {index} outside range {self}")
        value = int.from_bytes(self.first, "big") + index
        return value.to_bytes(len(self.first), "big")

    def __str__(self) -> str:
        lo, hi = ipaddress.ip_address(self.first), ipaddress.ip_address(self.last)
        return str(lo) if lo == hi else f"{lo}-{hi}"
