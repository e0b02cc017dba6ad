"""A router's hop on a forwarded packet: the TTL (IPv4) or hop limit (IPv6) one lower.

Linux's ip_forward / ip6_forward decrement it on every packet they forward (ip_decrease_ttl)
and drop a packet that arrives with 1 or 0 before the forward hook. The IPv4 header checksum
moves by the change of the TTL's 16-bit word (RFC 1624 eqn. 3); IPv6 has no header checksum.
"""

from __future__ import annotations

from flowshift.packet.checksum import change_of, update_sum
from flowshift.packet.view import Packet

TTL_AT_IPV4 = 8  # the TTL byte in the IPv4 header; the protocol byte follows it
HOP_LIMIT_AT_IPV6 = 7
CSUM_AT_IPV4 = 10


def ttl_word_change(ttl: int, proto: int) -> int:
    """~m + m' of RFC 1624 for the 16-bit word (TTL, protocol) losing one from the TTL."""
    old = (ttl << 8) | proto
    return change_of(old, old - 0x100)


def decrement_ttl(pkt: Packet) -> None:
    """The hop of a forwarded packet whose TTL / hop limit is 2 or more, in place."""
    data = pkt.data
    l3 = pkt.l3
    if pkt.family == 4:
        ttl, proto = data[l3 + TTL_AT_IPV4], data[l3 + TTL_AT_IPV4 + 1]
        data[l3 + TTL_AT_IPV4] = ttl - 1
        at = l3 + CSUM_AT_IPV4
        csum = update_sum(int.from_bytes(data[at:at + 2], "big"), ttl_word_change(ttl, proto))
        data[at:at + 2] = csum.to_bytes(2, "big")
    else:
        data[l3 + HOP_LIMIT_AT_IPV6] -= 1
    pkt.ttl -= 1


__all__ = ["decrement_ttl", "ttl_word_change"]
