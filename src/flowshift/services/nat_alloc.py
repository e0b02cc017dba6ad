"""NAT tuple allocation: the translated tuple of a new flow, chosen as Linux chooses it.

`allocate` follows get_unique_tuple() in Linux's nf_nat_core.c for one manipulation: the
source (SNAT, masquerade) or the destination (DNAT) of the original direction.

1. SNAT only: a tuple already inside the range (address, and port if a range is given)
   whose reply is free is kept unchanged.
2. The address: the only one of a one-address range; otherwise one picked by a hash of the
   flow's source and destination addresses and zone (find_best_ips_proto), so a client
   talking to a server always shows the same NAT address whatever its ports.
3. The port is kept when it lies in the range and the tuple is free ("port preserved").
4. Otherwise the port range is searched (nf_nat_l4proto_unique_tuple): 128 candidates from
   an offset, then rounds of 64, 32, 16 and 8 from fresh offsets, never more than the range
   holds. Without a port range SNAT keeps a port in its class (1-511, 600-1023 or
   1024-65535) and DNAT never moves the port. ICMP echo flows move their identifier, which
   is both "ports" of the key (see flow.py), even for DNAT, as Linux does.

   In the last NF_NAT_HARDER_THRESH (32) candidates of a round, a taken tuple may still be
   had (nf_nat_used_tuple_harder): `evict(reply_key)` is asked whether the flow holding it
   can be evicted (Linux: a SNAT'd TCP conntrack in TIME_WAIT or CLOSE whose original
   sequence the new SYN has passed); the caller passes it for a new TCP SYN only.

Deliberate differences from Linux, so that replays are reproducible: offsets are hashes of
the tuple and the round, not random numbers (DNAT's first round starts at offset 0 as in
Linux); there is no table of existing source mappings (find_appropriate_src); a tuple that
stays taken gives None where Linux would let the new flow clash at confirmation and drop
its packet.

`in_use(reply_key)` answers Linux's nf_nat_used_tuple: is the REPLY key of a candidate,
the reversed translated key, already held by another flow?

`AddressRange` lives in flow.py (config names ranges too); it is re-exported here.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

from flowshift.flow import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    AddressRange,
    FlowKey,
    new_key,
)

PROTO_SCTP = 132
PROTO_UDPLITE = 136
PORT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_UDPLITE})
ICMP_PROTOS = frozenset({PROTO_ICMP, PROTO_ICMPV6})
MOVABLE_PROTOS = PORT_PROTOS | ICMP_PROTOS  # those with a port or identifier to move

MAX_ATTEMPTS = 128  # Linux NF_NAT_MAX_ATTEMPTS: candidates in the first round of a search
MIN_ROUND = 16  # rounds halve in size; no round follows one smaller than this
HARDER_THRESH = MAX_ATTEMPTS // 4  # Linux NF_NAT_HARDER_THRESH: the last candidates of a round

__all__ = ["AddressRange", "allocate"]


def allocate(
    original: FlowKey,
    *,
    rewrite_src: bool,
    addrs: AddressRange,
    ports: tuple[int, int] | None,
    in_use: Callable[[FlowKey], bool],
    evict: Callable[[FlowKey], bool] | None = None,
) -> FlowKey | None:
    """The translated original-direction tuple of a new flow, or None if none is free.

    `rewrite_src` picks SNAT (new source address/port) or DNAT (new destination); `ports`
    is an inclusive (low, high) range for the port or ICMP identifier, None for "any".
    `evict(reply_key)`: True when the reply key is free, or its holder may be evicted and
    was (Linux's one lookup for the last HARDER_THRESH candidates of each round, instead of
    `in_use`).
    """
    if len(addrs.first) != len(original.src):
        raise ValueError(
            f"NAT range {addrs} is IPv{addrs.family} but flow {original} is IPv{original.family}"
        )
    if ports is not None and not (0 <= ports[0] <= ports[1] <= 0xFFFF):
        raise ValueError(f"NAT port range {ports[0]}-{ports[1]} is not within 0-65535")

    def free(key: FlowKey) -> bool:
        return not in_use(key.reversed())

    if rewrite_src and original.src in addrs and _port_in(original, True, ports) and free(original):
        return original

    candidate = _with_addr(original, rewrite_src, _pick_addr(original, addrs))
    if candidate.proto not in MOVABLE_PROTOS:
        return candidate if free(candidate) else None
    if _port_in(candidate, rewrite_src, ports) and free(candidate):
        return candidate

    search = _search_range(candidate, rewrite_src, ports)
    if search is None:
        return None
    low, size = search
    attempts = min(size, MAX_ATTEMPTS)
    round_no = 0
    while True:
        offset = _offset(candidate, rewrite_src, round_no)
        for i in range(attempts):
            key = _with_port(candidate, rewrite_src, low + (offset + i) % size)
            if evict is not None and attempts - i <= HARDER_THRESH:
                if evict(key.reversed()):  # one lookup: free, or its holder evicted
                    return key
            elif free(key):
                return key
        if attempts >= size or attempts < MIN_ROUND:
            return None
        attempts //= 2
        round_no += 1


def _pick_addr(key: FlowKey, addrs: AddressRange) -> bytes:
    if addrs.first == addrs.last:
        return addrs.first
    data = struct.pack("!H", key.zone & 0xFFFF) + key.src + key.dst
    return addrs.address(_hash64(data, b"nat-addr") % addrs.size)


def _offset(key: FlowKey, rewrite_src: bool, round_no: int) -> int:
    if not rewrite_src and round_no == 0:
        return 0  # as Linux: a DNAT search starts at the bottom of the range
    head = struct.pack(
        "!BBHHHB", key.family, key.proto, key.zone & 0xFFFF, key.sport, key.dport, round_no
    )
    return _hash64(head + key.src + key.dst, b"nat-port")


def _hash64(data: bytes, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "little")


def _port_of(key: FlowKey, rewrite_src: bool) -> int:
    return key.sport if rewrite_src or key.proto in ICMP_PROTOS else key.dport


def _port_in(key: FlowKey, rewrite_src: bool, ports: tuple[int, int] | None) -> bool:
    if ports is None or key.proto not in MOVABLE_PROTOS:
        return True
    return ports[0] <= _port_of(key, rewrite_src) <= ports[1]


# The candidates' keys come from new_key, not FlowKey(...) nor _replace: every new flow builds
# many of them


def _with_addr(key: FlowKey, rewrite_src: bool, addr: bytes) -> FlowKey:
    family, proto, zone, src, dst, sport, dport = key
    if rewrite_src:
        return new_key((family, proto, zone, addr, dst, sport, dport))
    return new_key((family, proto, zone, src, addr, sport, dport))


def _with_port(key: FlowKey, rewrite_src: bool, port: int) -> FlowKey:
    family, proto, zone, src, dst, sport, dport = key
    if proto in ICMP_PROTOS:  # the echo identifier is both "ports"
        return new_key((family, proto, zone, src, dst, port, port))
    if rewrite_src:
        return new_key((family, proto, zone, src, dst, port, dport))
    return new_key((family, proto, zone, src, dst, sport, port))


def _search_range(
    key: FlowKey, rewrite_src: bool, ports: tuple[int, int] | None
) -> tuple[int, int] | None:
    """(lowest port, how many) to search, or None when this manipulation cannot move it."""
    if ports is not None:
        return ports[0], ports[1] - ports[0] + 1
    if key.proto in ICMP_PROTOS:
        return 0, 0x10000
    if not rewrite_src:
        return None  # DNAT without a port range keeps the destination port
    # Linux keeps privileged ports privileged; below 512 is credential passing by convention
    if key.sport < 512:
        return 1, 511
    if key.sport < 1024:
        return 600, 424
    return 1024, 0x10000 - 1024
