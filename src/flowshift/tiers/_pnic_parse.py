"""Compiled header parsing for the PNIC engine: one frame of a batch into a field vector.

A port of packet/parse.py reduced to what the engine needs, with the same checks in the same
order, so that it reaches the same decision as `parse()` for every frame:

- FAIL: `parse()` reports an error, an ICMP error (quoted datagram) or a non-first fragment;
  the reference PNIC never looks such a packet up, so neither does the engine.
- KEY_ONLY: the flow key is the one `parse()` gives, but the engine does not process the packet
  (IPv6 extension headers, first fragments, ICMP other than echo): a hit is returned to software.
- FULL: every field the chain reads is in `f`; the engine may process the packet.

Offsets in `f` are relative to the frame start; all reads stay below the captured length.
"""

from __future__ import annotations

import numba

from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from flowshift.packet import parse, view
from flowshift.tiers._pnic_mem import be16, be32, be64, kernel, ld32

FAIL = 0
KEY_ONLY = 1
FULL = 2

# indices into the field vector
F_L3 = 0
F_FAMILY = 1
F_PROTO = 2
F_TOTAL = 3  # IP datagram length (pkt.ip_total)
F_L4 = 4
F_L4LEN = 5  # transport segment length per the IP header
F_SPORT = 6
F_DPORT = 7
F_SEQ = 8
F_ACK = 9
F_FLAGS = 10
F_WINDOW = 11
F_PAYLOAD = 12
F_SACK_AT = 13  # first SACK block of the last SACK option, -1: none
F_SACK_N = 14
F_ECHO = 15  # ICMP echo: the identifier is both ports
F_SRC_HI = 16  # addresses as two big-endian 64-bit words (IPv4: top 32 bits of the first)
F_SRC_LO = 17
F_DST_HI = 18
F_DST_LO = 19
F_FRAG = 20  # part of a fragmented datagram (a first fragment: MF set)
F_WSCALE = 21  # TCP: the window scale option's shift, -1: none
F_SACK_PERM = 22  # TCP: 1 when the SACK-permitted option came
N_FIELDS = 23

# the facts of packet/parse.py and packet/view.py (numba reads them as constants)
_ETH_P_IPV4 = parse.ETH_P_IPV4
_ETH_P_IPV6 = parse.ETH_P_IPV6
_VLAN_TPIDS = tuple(sorted(parse.VLAN_TPIDS))
_ARPHRD_NETLINK = parse.ARPHRD_NETLINK
_TS_ONLY_MARKER = parse.TS_ONLY_MARKER
_AF_INET = parse.AF_INET
_AF_INET6 = tuple(sorted(parse.AF_INET6))
_LT_ETHERNET = view.LINKTYPE_ETHERNET
_LT_RAW = (view.LINKTYPE_RAW, *view.DLT_RAW_ALIASES)
_LT_IPV4 = view.LINKTYPE_IPV4
_LT_IPV6 = view.LINKTYPE_IPV6
_LT_SLL = view.LINKTYPE_LINUX_SLL
_LT_SLL2 = view.LINKTYPE_LINUX_SLL2
_LT_NULL = view.LINKTYPE_NULL
_LT_LOOP = view.LINKTYPE_LOOP
_IP_MF = parse.IP_MF
_IP_OFFSET = parse.IP_OFFSET
_IPV6_EXT = tuple(sorted(parse.IPV6_EXT_HEADERS))
_HOPOPTS = parse.IPPROTO_HOPOPTS
_FRAGMENT = parse.IPPROTO_FRAGMENT
_AH = parse.IPPROTO_AH
_JUMBO = parse.IPV6_OPT_JUMBO
_ICMP_ECHO = tuple(sorted(parse.ICMP_ECHO_TYPES))
_ICMP_ERROR = tuple(sorted(parse.ICMP_ERROR_TYPES))
_ICMPV6_ECHO = tuple(sorted(parse.ICMPV6_ECHO_TYPES))
_ICMPV6_ERROR = tuple(sorted(parse.ICMPV6_ERROR_TYPES))


@kernel()
def parse_frame(b, s, n, wire, linktype, f):
    """Parse the frame b[s:s+n] (wire: its length on the wire) into f; FAIL/KEY_ONLY/FULL."""
    if wire < n:
        wire = n
    if linktype == _LT_ETHERNET:
        if n < 14:
            return FAIL
        ethertype = be16(b, s + 12)
        off = 14
    elif linktype in _LT_RAW:  # version nibble tells
        if n == 0:
            return FAIL
        version = b[s] >> 4
        if version == 4:
            ethertype = _ETH_P_IPV4
        elif version == 6:
            ethertype = _ETH_P_IPV6
        else:
            return FAIL
        off = 0
    elif linktype in (_LT_IPV4, _LT_IPV6):
        ethertype = _ETH_P_IPV4 if linktype == _LT_IPV4 else _ETH_P_IPV6
        off = 0
    elif linktype in (_LT_SLL, _LT_SLL2):  # Linux cooked v1 / v2
        off = 16 if linktype == _LT_SLL else 20
        if n < off:
            return FAIL
        if linktype == _LT_SLL:
            hatype = be16(b, s + 2)
            ethertype = be16(b, s + 14)
        else:
            hatype = be16(b, s + 8)
            ethertype = be16(b, s)
        if hatype == _ARPHRD_NETLINK:
            return FAIL
    elif linktype in (_LT_NULL, _LT_LOOP):  # BSD / OpenBSD loopback
        if n < 4:
            return FAIL
        family = be32(b, s)
        if linktype == _LT_NULL and family > 0xFFFF:
            family = ld32(b, s)
        if family == _AF_INET:
            ethertype = _ETH_P_IPV4
        elif family in _AF_INET6:
            ethertype = _ETH_P_IPV6
        else:
            return FAIL
        off = 4
    else:
        return FAIL
    while ethertype in _VLAN_TPIDS:
        if n < off + 4:
            return FAIL
        ethertype = be16(b, s + off + 2)
        off += 4
    if ethertype == _ETH_P_IPV4:
        return _ipv4(b, s, off, n, wire - off, f)
    if ethertype == _ETH_P_IPV6:
        return _ipv6(b, s, off, n, wire - off, f)
    return FAIL


@kernel(private=True)
def _ipv4_options_ok(b, s, i, end):
    while i < end:
        kind = b[s + i]
        if kind == 0:
            return True
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            return False
        size = numba.int64(b[s + i + 1])
        if size < 2 or i + size > end:
            return False
        i += size
    return True


@kernel(private=True)
def _ipv4(b, s, off, limit, room, f):
    if limit - off < 20:
        return FAIL
    vihl = numba.int64(b[s + off])
    total = be16(b, s + off + 2)
    frag = be16(b, s + off + 6)
    proto = numba.int64(b[s + off + 9])
    hlen = (vihl & 0xF) << 2
    if vihl >> 4 != 4 or hlen < 20 or total < 20 or total > room or hlen > total:
        return FAIL
    f[F_L3] = off
    f[F_FAMILY] = 4
    f[F_PROTO] = proto
    f[F_TOTAL] = total
    f[F_L4LEN] = total - hlen
    f[F_SRC_HI] = be32(b, s + off + 12) << 32
    f[F_SRC_LO] = 0
    f[F_DST_HI] = be32(b, s + off + 16) << 32
    f[F_DST_LO] = 0
    if hlen > 20 and (off + hlen > limit or not _ipv4_options_ok(b, s, off + 20, off + hlen)):
        return FAIL
    if frag & _IP_OFFSET:
        return FAIL  # no transport header: the reference PNIC does not look it up
    f[F_FRAG] = (frag & _IP_MF) != 0
    status = _transport(b, s, proto, off + hlen, limit, f)
    if status == FULL and f[F_FRAG]:
        return KEY_ONLY
    return status


@kernel(private=True)
def _jumbo_payload_length(b, s, i, limit):
    """The Jumbo Payload option of the hop-by-hop header at i (RFC 2675), or 0."""
    if i + 8 > limit:
        return 0
    end = i + ((numba.int64(b[s + i + 1]) + 1) << 3)
    if end > limit:  # not min(): one numba function less to compile
        end = limit
    i += 2
    while i + 1 < end:
        kind = b[s + i]
        if kind == 0:
            i += 1
            continue
        if kind == _JUMBO and b[s + i + 1] == 4 and i + 6 <= end:
            length = be32(b, s + i + 2)
            return length if length > 0xFFFF else 0
        i += 2 + numba.int64(b[s + i + 1])
    return 0


@kernel(private=True)
def _ipv6(b, s, off, limit, room, f):
    if limit - off < 40:
        return FAIL
    if b[s + off] >> 4 != 6:
        return FAIL
    plen = be16(b, s + off + 4)
    nxt = numba.int64(b[s + off + 6])
    total = 40 + plen
    if plen == 0 and nxt == _HOPOPTS:
        total += _jumbo_payload_length(b, s, off + 40, limit)
    if total > room:
        return FAIL
    f[F_L3] = off
    f[F_FAMILY] = 6
    f[F_TOTAL] = total
    f[F_SRC_HI] = be64(b, s + off + 8)
    f[F_SRC_LO] = be64(b, s + off + 16)
    f[F_DST_HI] = be64(b, s + off + 24)
    f[F_DST_LO] = be64(b, s + off + 32)
    end = off + total
    i = off + 40
    extended = False
    f[F_FRAG] = 0
    while nxt in _IPV6_EXT:
        extended = True
        if (nxt == _HOPOPTS and i != off + 40) or i + 8 > end or i + 8 > limit:
            return FAIL
        if nxt == _FRAGMENT:
            after = numba.int64(b[s + i])
            fo = be16(b, s + i + 2)
            if fo & 0xFFF8:
                return FAIL  # fragment payload, no transport header
            if fo & 1:
                f[F_FRAG] = 1
            i += 8
            nxt = after
            continue
        if nxt == _AH:
            size = (numba.int64(b[s + i + 1]) + 2) << 2
        else:
            size = (numba.int64(b[s + i + 1]) + 1) << 3
        if i + size > end or i + size > limit:
            return FAIL
        nxt = numba.int64(b[s + i])
        i += size
    f[F_PROTO] = nxt
    f[F_L4LEN] = end - i
    status = _transport(b, s, nxt, i, limit, f)
    if status == FULL and extended:
        return KEY_ONLY
    return status


@kernel(private=True)
def _transport(b, s, proto, off, limit, f):
    f[F_SACK_AT] = -1
    f[F_SACK_N] = 0
    f[F_ECHO] = 0
    if proto == PROTO_TCP:
        return _tcp(b, s, off, limit, f)
    if proto == PROTO_UDP:
        return _udp(b, s, off, limit, f)
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        return _icmp(b, s, proto, off, limit, f)
    return FAIL  # a protocol flowshift does not track


@kernel(private=True)
def _tcp(b, s, off, limit, f):
    seglen = f[F_L4LEN]
    if seglen < 20 or limit - off < 20:
        return FAIL
    hlen = (numba.int64(b[s + off + 12]) >> 4) << 2
    if hlen < 20 or hlen > seglen:
        return FAIL
    f[F_L4] = off
    f[F_SPORT] = be16(b, s + off)
    f[F_DPORT] = be16(b, s + off + 2)
    f[F_SEQ] = be32(b, s + off + 4)
    f[F_ACK] = be32(b, s + off + 8)
    f[F_FLAGS] = b[s + off + 13]
    f[F_WINDOW] = be16(b, s + off + 14)
    f[F_PAYLOAD] = seglen - hlen
    f[F_WSCALE] = -1
    f[F_SACK_PERM] = 0
    if hlen == 32 and off + 32 <= limit and be32(b, s + off + 20) == _TS_ONLY_MARKER:
        return FULL  # NOP NOP timestamps: the options of nearly every established segment
    if hlen > 20 and not _tcp_options(b, s, off + 20, off + hlen, limit, f):
        return FAIL
    return FULL


@kernel(private=True)
def _tcp_options(b, s, i, end, limit, f):
    """Validate the options like parse._tcp_options; note where the last SACK option is."""
    stop = end if end < limit else limit
    while i < stop:
        kind = b[s + i]
        if kind == 0:
            return True
        if kind == 1:
            i += 1
            continue
        if i + 1 >= stop:
            return i + 1 < end
        size = numba.int64(b[s + i + 1])
        if size < 2 or i + size > end:
            return False
        if i + size > limit:
            return True
        if kind == 2:
            if size != 4:
                return False
        elif kind == 3:
            if size != 3:
                return False
            f[F_WSCALE] = b[s + i + 2]
        elif kind == 4:
            if size != 2:
                return False
            f[F_SACK_PERM] = 1
        elif kind == 5:
            if size < 10 or (size - 2) & 7:
                return False
            f[F_SACK_AT] = i + 2
            f[F_SACK_N] = (size - 2) >> 3
        elif kind == 8 and size != 10:
            return False
        i += size
    return True


@kernel(private=True)
def _udp(b, s, off, limit, f):
    seglen = f[F_L4LEN]
    if seglen < 8 or limit - off < 8:
        return FAIL
    ulen = be16(b, s + off + 4)
    if ulen == 0 and f[F_FAMILY] == 6:
        ulen = seglen
    if ulen < 8 or (ulen > seglen and not f[F_FRAG]):
        return FAIL
    f[F_L4] = off
    f[F_SPORT] = be16(b, s + off)
    f[F_DPORT] = be16(b, s + off + 2)
    return FULL


@kernel(private=True)
def _icmp(b, s, proto, off, limit, f):
    if f[F_L4LEN] < 8 or limit - off < 8:
        return FAIL
    kind = b[s + off]
    f[F_L4] = off
    if proto == PROTO_ICMPV6:
        echo = kind in _ICMPV6_ECHO
        error = kind in _ICMPV6_ERROR
    else:
        echo = kind in _ICMP_ECHO
        error = kind in _ICMP_ERROR
    if echo:
        f[F_ECHO] = 1
        f[F_SPORT] = f[F_DPORT] = be16(b, s + off + 4)
        return FULL
    if error:
        return FAIL  # an ICMP error quotes a datagram: software relates it
    f[F_SPORT] = f[F_DPORT] = 0
    return KEY_ONLY
