"""In-place rewrites of a parsed packet's addresses and ports, with every checksum kept right.

Rewrites use RFC 1624 incremental updates, as a router or NAT does: each checksum moves by
exactly the change made, so the result is right relative to the original even when snaplen cut
the bytes a full recomputation would need. The checksums touched:

- an address: the IPv4 header checksum, and the TCP, UDP and ICMPv6 checksums (pseudo-header);
- a port (or an ICMP echo identifier, which is both "ports"): the TCP, UDP or ICMP checksum;
- anything inside the datagram an ICMP error quotes (`set_inner_*`): the quoted datagram's own
  checksums where they were quoted and captured, then the outer ICMP/ICMPv6 checksum for every
  byte changed in its body.

UDP over IPv4 with checksum 0 carries no checksum and keeps 0; a UDP checksum that comes out as
0 is sent as 0xFFFF, over IPv4 (RFC 768) and IPv6 (RFC 8200), as `checksum.update_transport`
says. The `Packet` fields follow the bytes. `fix_checksums` recomputes
everything from scratch, for building packets and for checking the incremental path.

A NAT rewrites every packet of a flow direction the same way, so `plan_outer` works the change
out once (which bytes, and how far each checksum moves) and `rewrite_outer` applies it to a
packet: the same bytes as the `set_*` calls one field after another, at a fraction of the cost.
"""

from __future__ import annotations

from typing import NamedTuple

from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from flowshift.packet.checksum import (
    change_sum,
    checksum,
    fold,
    pseudo_header_sum,
    update_bytes,
    update_sum,
    update_transport,
)
from flowshift.packet.view import Packet

# where the checksum field sits in each transport header
L4_CHECKSUM_AT = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}
# transport checksums that cover the IP addresses through the pseudo-header
PSEUDO_HEADER_PROTOS = frozenset((PROTO_TCP, PROTO_UDP, PROTO_ICMPV6))
IPV4_CHECKSUM_AT = 10

Change = tuple[int, bytes, bytes]  # (offset in data, old bytes, new bytes)
Tuple4 = tuple[bytes, bytes, int, int]  # (src, dst, sport, dport) of a packet's outer headers


class OuterRewrite(NamedTuple):
    """A rewrite of the outer addresses and ports, old -> new, worked out by `plan_outer`."""

    proto: int
    old: Tuple4  # what the packet must hold for the plan to apply
    new: Tuple4
    addrs_at: int  # offset from the IP header of src + dst (-1: addresses unchanged)
    addrs: bytes  # the new src + dst, written at once (an unchanged one is rewritten as it was)
    ports_at: int  # offset from the transport header of the ports or echo id (-1: unchanged)
    ports: bytes  # the new sport + dport (ICMP echo: the identifier)
    echo: bool  # the ports are an ICMP echo identifier
    ip_change: int  # what the IPv4 header checksum moves by (0: unchanged)
    l4_at: int  # offset of the transport checksum from the transport header
    l4_change: int  # what the transport checksum moves by (0: unchanged)
    udp: bool  # UDP: a result of 0 is sent as 0xFFFF (over IPv4 a checksum of 0 stays 0)
    v4: bool


_new_plan = tuple.__new__


def set_src(pkt: Packet, addr: bytes) -> None:
    """Rewrite the source address."""
    _set_addr(pkt, pkt, addr, False)


def set_dst(pkt: Packet, addr: bytes) -> None:
    """Rewrite the destination address."""
    _set_addr(pkt, pkt, addr, True)


def set_sport(pkt: Packet, port: int) -> None:
    """Rewrite the source port (for ICMP echo: the identifier)."""
    _set_port(pkt, pkt, port, False)


def set_dport(pkt: Packet, port: int) -> None:
    """Rewrite the destination port (for ICMP echo: the identifier)."""
    _set_port(pkt, pkt, port, True)


def plan_outer(family: int, proto: int, old: Tuple4, new: Tuple4) -> OuterRewrite | None:
    """Work out the rewrite of a packet's outer `old` addresses and ports to `new`.

    None when `rewrite_outer` cannot do it (odd cases, left to the `set_*` calls: a port change
    that is not TCP, UDP or one ICMP echo identifier, a wrong address length, a bad port).
    The checksum changes are the sums of the changes the `set_*` calls would make one after
    another; folded to 16 bits they stay 0 only when all of them are 0, so one RFC 1624 update
    gives the very bytes of several (ones'-complement 0 and 0xFFFF included).
    """
    o_src, o_dst, o_sport, o_dport = old
    src, dst, sport, dport = new
    size = 4 if family == 4 else 16
    if not len(o_src) == len(o_dst) == len(src) == len(dst) == size:
        return None
    addr_change = 0
    if src != o_src:
        addr_change += change_sum(o_src, src)
    if dst != o_dst:
        addr_change += change_sum(o_dst, dst)
    echo = proto in (PROTO_ICMP, PROTO_ICMPV6)
    port_change = 0
    ports_at, ports = -1, b""
    if sport != o_sport or dport != o_dport:
        if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
            return None
        if echo:
            if not (o_sport == o_dport and sport == dport):
                return None
            ports_at, ports = 4, sport.to_bytes(2, "big")
            port_change = change_sum(o_sport.to_bytes(2, "big"), ports)
        elif proto in (PROTO_TCP, PROTO_UDP):
            ports_at, ports = 0, sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
            port_change = change_sum(o_sport.to_bytes(2, "big") + o_dport.to_bytes(2, "big"),
                                     ports)
        else:
            return None
    v4 = family == 4
    l4_change = port_change + (addr_change if proto in PSEUDO_HEADER_PROTOS else 0)
    return _new_plan(OuterRewrite, (  # OuterRewrite(...) without NamedTuple's Python __new__
        proto, old, new,
        -1 if src == o_src and dst == o_dst else 12 if v4 else 8, src + dst,
        ports_at, ports, echo and ports_at >= 0,
        fold(addr_change) if v4 else 0,
        L4_CHECKSUM_AT.get(proto, 0), fold(l4_change),
        proto == PROTO_UDP, v4,
    ))


def rewrite_outer(pkt: Packet, plan: OuterRewrite) -> bool:
    """Apply `plan` to `pkt`, checksums and `Packet` fields included. False (nothing changed)
    when the packet does not hold `plan.old`, has no parsed transport header or is not in a
    bytearray: the `set_*` calls then do it, or say why not."""
    (proto, old, new, addrs_at, addrs, ports_at, ports, echo,
     ip_change, l4_at, l4_change, udp, v4) = plan
    data = pkt.data
    l4 = pkt.l4
    if (l4 < 0 or pkt.proto != proto or (pkt.src, pkt.dst, pkt.sport, pkt.dport) != old
            or type(data) is not bytearray or (echo and pkt.icmp_id < 0)):
        return False
    pkt.src, pkt.dst, pkt.sport, pkt.dport = new  # an unchanged one as it was
    if addrs_at >= 0:
        l3 = pkt.l3
        at = l3 + addrs_at
        data[at : at + len(addrs)] = addrs
        if ip_change:
            at = l3 + IPV4_CHECKSUM_AT
            value = update_sum(data[at] << 8 | data[at + 1], ip_change)
            data[at] = value >> 8
            data[at + 1] = value & 0xFF
    if ports_at >= 0:
        at = l4 + ports_at
        data[at : at + len(ports)] = ports
        if echo:
            pkt.icmp_id = new[2]
    if l4_change:
        at = l4 + l4_at
        value = update_transport(data[at] << 8 | data[at + 1], l4_change, udp, v4)
        data[at] = value >> 8
        data[at + 1] = value & 0xFF
    return True


def set_inner_src(pkt: Packet, addr: bytes) -> None:
    """Rewrite the source address of the datagram an ICMP error quotes."""
    _set_addr(pkt, _inner(pkt), addr, False)


def set_inner_dst(pkt: Packet, addr: bytes) -> None:
    """Rewrite the destination address of the datagram an ICMP error quotes."""
    _set_addr(pkt, _inner(pkt), addr, True)


def set_inner_sport(pkt: Packet, port: int) -> None:
    """Rewrite the source port (or echo identifier) of the datagram an ICMP error quotes."""
    _set_port(pkt, _inner(pkt), port, False)


def set_inner_dport(pkt: Packet, port: int) -> None:
    """Rewrite the destination port (or echo identifier) of the datagram an ICMP error quotes."""
    _set_port(pkt, _inner(pkt), port, True)


def fix_checksums(pkt: Packet) -> None:
    """Recompute every checksum in full: the quoted datagram's first, then the outer ones.

    A checksum whose covered bytes were not all captured (snaplen, or a datagram an ICMP error
    quotes only in part) and the transport checksum of a fragment are left as they are.
    """
    _bytearray(pkt)
    inner = pkt.inner
    if inner is not None and inner.l3 >= 0:
        _fix_view(inner, min(len(pkt.data), pkt.l4 + pkt.l4_len))
    _fix_view(pkt, len(pkt.data))


def _set_addr(pkt: Packet, view: Packet, addr: bytes, dst: bool) -> None:
    data = _bytearray(pkt)
    l3 = view.l3
    if l3 < 0:
        raise ValueError(f"cannot set an address: not an IP packet ({view.error.label})")
    old = view.dst if dst else view.src
    if len(addr) != len(old):
        raise ValueError(f"address of {len(addr)} bytes for an IPv{view.family} packet")
    addr = bytes(addr)
    v4 = view.family == 4
    off = l3 + (16 if dst else 12) if v4 else l3 + (24 if dst else 8)
    changes: list[Change | None] = [_write(data, off, addr)]
    diff = change_sum(old, addr)  # summed once for both checksums
    if v4:
        changes.append(_adjust(data, l3 + IPV4_CHECKSUM_AT, diff, False, True))
    if view.l4 >= 0 and view.proto in PSEUDO_HEADER_PROTOS:
        changes.append(_adjust_l4(pkt, view, old, addr, diff))
    if dst:
        view.dst = addr
    else:
        view.src = addr
    _carry_to_icmp(pkt, view, changes)


def _set_port(pkt: Packet, view: Packet, port: int, dst: bool) -> None:
    data = _bytearray(pkt)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range 0..65535")
    echo = view.is_icmp_echo
    if view.l4 < 0 or (view.proto not in (PROTO_TCP, PROTO_UDP) and not echo):
        raise ValueError(f"cannot set a port: no TCP/UDP header or ICMP echo ({view.error.label})")
    off = view.l4 + 4 if echo else view.l4 + (2 if dst else 0)
    new = port.to_bytes(2, "big")
    change = _write(data, off, new)
    changes = [change, _adjust_l4(pkt, view, change[1], new, change_sum(change[1], new))]
    if echo:
        view.icmp_id = view.sport = view.dport = port
    elif dst:
        view.dport = port
    else:
        view.sport = port
    _carry_to_icmp(pkt, view, changes)


def _adjust_l4(pkt: Packet, view: Packet, old: bytes, new: bytes, diff: int) -> Change | None:
    """Move the transport checksum of `view` by old -> new (`diff`: their `change_sum`); return
    the change it made.

    In a quoted datagram the field may be missing. Not quoted: nothing to do (Linux NAT leaves
    a partly quoted header alone too). Quoted but cut by snaplen: the field on the wire moved by
    exactly new -> old (a checksum moves against the bytes it covers), so that change is
    returned, unwritten, for the ICMP checksum, which covers the field.
    """
    at = view.l4 + L4_CHECKSUM_AT[view.proto]
    if view is not pkt:
        if at + 2 > pkt.l4 + pkt.l4_len:
            return None
        if at + 2 > len(pkt.data):
            return at, new, old
    return _adjust(pkt.data, at, diff, view.proto == PROTO_UDP, view.family == 4)


def _adjust(data: bytearray, at: int, diff: int, udp: bool, v4: bool) -> Change | None:
    """RFC 1624 update of the checksum field at `at` for a change elsewhere (`diff`: its
    `change_sum`), with UDP's rules for zero; None when nothing changed."""
    csum = data[at] << 8 | data[at + 1]
    value = update_transport(csum, diff, udp, v4)
    if value == csum:
        return None
    return _write(data, at, value.to_bytes(2, "big"))


def _carry_to_icmp(pkt: Packet, view: Packet, changes: list[Change | None]) -> None:
    """Changes inside an ICMP error's quoted datagram change the ICMP body: move its checksum."""
    if view is pkt:
        return
    data = pkt.data
    at = pkt.l4 + L4_CHECKSUM_AT[pkt.proto]
    csum = data[at] << 8 | data[at + 1]
    for change in changes:
        if change is not None:
            csum = update_bytes(csum, change[1], change[2])
    data[at : at + 2] = csum.to_bytes(2, "big")


def _write(data: bytearray, off: int, new: bytes) -> Change:
    old = bytes(data[off : off + len(new)])
    data[off : off + len(new)] = new
    return off, old, new


def _fix_view(view: Packet, limit: int) -> None:
    data = view.data
    l3 = view.l3
    if l3 < 0:
        return
    if view.family == 4:
        hlen = (data[l3] & 0xF) << 2
        if l3 + hlen <= limit:
            data[l3 + IPV4_CHECKSUM_AT : l3 + IPV4_CHECKSUM_AT + 2] = b"\0\0"
            value = checksum(data[l3 : l3 + hlen])
            data[l3 + IPV4_CHECKSUM_AT : l3 + IPV4_CHECKSUM_AT + 2] = value.to_bytes(2, "big")
    l4, proto = view.l4, view.proto
    if l4 < 0 or view.frag or proto not in L4_CHECKSUM_AT:
        return
    seglen = view.payload_len + 8 if proto == PROTO_UDP else view.l4_len
    if l4 + seglen > limit:
        return
    at = l4 + L4_CHECKSUM_AT[proto]
    if proto == PROTO_UDP and view.family == 4 and data[at] == data[at + 1] == 0:
        return
    data[at : at + 2] = b"\0\0"
    initial = 0 if proto == PROTO_ICMP else pseudo_header_sum(view.src, view.dst, proto, seglen)
    value = checksum(data[l4 : l4 + seglen], initial)
    if value == 0 and proto == PROTO_UDP:
        value = 0xFFFF
    data[at : at + 2] = value.to_bytes(2, "big")


def _inner(pkt: Packet) -> Packet:
    if pkt.inner is None or pkt.inner.l3 < 0:
        raise ValueError("not an ICMP error with a parsed quoted datagram")
    return pkt.inner


def _bytearray(pkt: Packet) -> bytearray:
    data = pkt.data
    if not isinstance(data, bytearray):
        raise TypeError("rewriting needs the packet parsed from a bytearray")
    return data
