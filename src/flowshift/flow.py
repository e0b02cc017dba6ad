"""Flow keys: the tuple that names one direction of a flow, and its reverse.

A key is a plain NamedTuple so that it hashes fast and reads well. Addresses are raw bytes
(4 for IPv4, 16 for IPv6). ICMP echo uses the identifier as both "ports", so that the reply
direction of an echo flow is simply the reversed key.
"""

from __future__ import annotations

import ipaddress
from enum import IntEnum
from typing import NamedTuple

NS_PER_S = 1_000_000_000  # trace time is in nanoseconds

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMPV6: "icmpv6"}


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
        return FlowKey(self.family, self.proto, self.zone, self.dst, self.src, self.dport,
                       self.sport)

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


def format_addr(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


def format_endpoint(addr: bytes, port: int) -> str:
    a = format_addr(addr)
    return f"[{a}]:{port}" if len(addr) == 16 else f"{a}:{port}"
