"""Frame parser: link layer, IPv4/IPv6 and TCP/UDP/ICMP headers into a `Packet` view.

`parse()` never raises and never reads past the captured bytes. Two lengths are kept apart:
what the headers claim (`ip_total`, `l4_len`, `payload_len`: the datagram as it was on the wire)
and what was captured (`len(data)`, which snaplen may have cut). A header that claims more than
the wire carried is an error; a capture that ends early is not, as long as the headers read are
whole. Offsets are absolute in `data`, for the embedded datagram of an ICMP error too, so that
rewrites can change the frame in place.

Length rules, checked in this order for each layer: the lengths in the headers must agree with
each other (else BAD_*), then the bytes needed must have been captured (else TRUNCATED_*).
"""

from __future__ import annotations

from struct import Struct

from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from flowshift.packet.checksum import ones_sum, pseudo_header_sum
from flowshift.packet.view import (
    DLT_RAW_ALIASES,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    Packet,
    ParseError,
)

ETH_P_IPV4 = 0x0800
ETH_P_IPV6 = 0x86DD
# 802.1Q, 802.1ad, and the pre-standard QinQ outer tags still seen in the wild
VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100, 0x9200))
# ethertypes of protocols flowshift passes by untouched (not IP, or IP inside a shim it does
# not open: MPLS, PPPoE)
NON_IP_ETHERTYPES = frozenset(
    (
        0x0806,  # ARP
        0x8035,  # RARP
        0x0842,  # Wake-on-LAN
        0x22F0,  # AVTP
        0x22F3,  # TRILL
        0x6002,  # DEC MOP remote console
        0x6003,  # DECnet phase IV
        0x6004,  # DEC LAT
        0x809B,  # AppleTalk
        0x80F3,  # AARP
        0x8137,  # IPX
        0x8808,  # Ethernet flow control (PAUSE)
        0x8809,  # slow protocols (LACP, marker, OAM)
        0x8847,  # MPLS unicast
        0x8848,  # MPLS multicast
        0x8863,  # PPPoE discovery
        0x8864,  # PPPoE session
        0x888E,  # 802.1X (EAPOL)
        0x8892,  # PROFINET
        0x889A,  # HyperSCSI
        0x88A2,  # ATA over Ethernet
        0x88A4,  # EtherCAT
        0x88B5,  # local experimental 1
        0x88B6,  # local experimental 2
        0x88B7,  # OUI extended
        0x88CC,  # LLDP
        0x88E3,  # media redundancy protocol
        0x88E5,  # MACsec
        0x88E7,  # provider backbone bridges (802.1ah)
        0x88F7,  # PTP
        0x88FB,  # parallel redundancy protocol
        0x8902,  # connectivity fault management (802.1ag)
        0x8906,  # FCoE
        0x8914,  # FCoE initialization
        0x892F,  # HSR
        0x893A,  # IEEE 1905.1
        0x9000,  # Ethernet configuration testing (loopback)
    )
)
ETHER_MAX_LENGTH = 1500  # up to 1500 the field is an 802.3 length (LLC frames: STP, CDP, IS-IS)
ARPHRD_NETLINK = 824  # SLL/SLL2 "protocol" is then a netlink family, not an ethertype
# BSD loopback address families: AF_INET everywhere; AF_INET6 differs per system
# (Linux 10, NetBSD/OpenBSD 24, FreeBSD 28, Darwin 30)
AF_INET = 2
AF_INET6 = frozenset((10, 24, 28, 30))
AF_NON_IP = frozenset((7, 16, 23))  # OSI, AppleTalk, IPX

ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
ICMP_ECHO_TYPES = frozenset((ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST))
ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))  # unreachable, quench, redirect, time, param
ICMPV6_ECHO_TYPES = frozenset((ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY))
ICMPV6_ERROR_TYPES = frozenset((1, 2, 3, 4))  # unreachable, too big, time, param problem

IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_DSTOPTS = 60
IPV6_EXT_HEADERS = frozenset(
    (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH, IPPROTO_DSTOPTS)
)

IPV6_OPT_JUMBO = 0xC2

IP_MF = 0x2000
IP_OFFSET = 0x1FFF
NO_ROOM_LIMIT = 1 << 32  # an embedded datagram is quoted, not carried: its length is unchecked

# precompiled layouts, network byte order
_U16 = Struct("!H")
_U32 = Struct("!I")
_IPV4 = Struct("!BxHxxHBBxx4s4s")  # ver/ihl, total, frag, ttl, proto, src, dst
_IPV6 = Struct("!IHBB16s16s")  # ver/class/label, payload length, next, hop limit, src, dst
_FRAG6 = Struct("!BxH")  # next header, offset/flags
_TCP = Struct("!HHIIBBH")  # ports, seq, ack, data offset, flags, window
_PORTS_SEQ = Struct("!HHI")  # what an ICMP error quotes of a TCP header at least
_UDP = Struct("!HHH")  # ports, length
_ICMP = Struct("!BBxxH")  # type, code, identifier
_MSS = _U16
_TS = Struct("!II")
_SACK = Struct("!II")
_TS_ONLY = Struct("!III")  # NOP, NOP, timestamps (kind 8, length 10): marker, tsval, tsecr
TS_ONLY_MARKER = 0x0101080A
# The options of a Linux SYN and SYN/ACK, in its order: MSS (kind 2, length 4), SACK-permitted
# (4, 2), timestamps (8, 10), NOP, window scale (3, 3); the constant words and bytes as read
_LINUX_SYN = Struct("!HHHHIIHBB")  # 0x0204, mss, 0x0402, 0x080A, tsval, tsecr, 0x0103, 3, wscale
LINUX_SYN_LEN = 20
# The common frame, read in one go: Ethernet (ethertype), IPv4 without options, TCP
_ETH_IPV4_TCP = Struct("!12xH" "BxHxxHBBxx4s4s" "HHIIBBH")  # up to the TCP window
ETH_IPV4_TCP_LEN = 14 + 20 + 20  # the whole TCP header (checksum, urgent pointer) captured
IPV4_NO_OPTIONS = 0x45  # version 4, header length 20

_OK = ParseError.OK
_TRUNCATED_IP = ParseError.TRUNCATED_IP
_TRUNCATED_L4 = ParseError.TRUNCATED_L4


def parse(data: bytes | bytearray, linktype: int, wire_len: int | None = None) -> Packet:
    """Parse one captured frame. `wire_len` is its length on the wire (default: as captured)."""
    n = len(data)
    if wire_len is None or wire_len < n:
        wire_len = n
    if linktype == LINKTYPE_ETHERNET and n >= ETH_IPV4_TCP_LEN:
        pkt = _eth_ipv4_tcp(data, n, wire_len)
        if pkt is not None:
            return pkt
    pkt = Packet(data, linktype, wire_len)  # type: ignore[arg-type]  # rewrites need bytearray
    if linktype == LINKTYPE_ETHERNET:
        if n < 14:
            pkt.error = ParseError.TRUNCATED_L2
            return pkt
        ethertype = data[12] << 8 | data[13]
        off = 14
    elif linktype == LINKTYPE_RAW or linktype in DLT_RAW_ALIASES:
        if n == 0:
            pkt.error = _TRUNCATED_IP
            return pkt
        version = data[0] >> 4
        ethertype = ETH_P_IPV4 if version == 4 else ETH_P_IPV6 if version == 6 else 0
        if not ethertype:
            pkt.error = ParseError.BAD_IP_VERSION
            return pkt
        off = 0
    elif linktype in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        ethertype = ETH_P_IPV4 if linktype == LINKTYPE_IPV4 else ETH_P_IPV6
        off = 0
    elif linktype in (LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2):
        off = 16 if linktype == LINKTYPE_LINUX_SLL else 20
        if n < off:
            pkt.error = ParseError.TRUNCATED_L2
            return pkt
        if linktype == LINKTYPE_LINUX_SLL:
            hatype, ethertype = data[2] << 8 | data[3], data[14] << 8 | data[15]
        else:
            hatype, ethertype = data[8] << 8 | data[9], data[0] << 8 | data[1]
        if hatype == ARPHRD_NETLINK:
            pkt.error = ParseError.NOT_IP
            return pkt
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if n < 4:
            pkt.error = ParseError.TRUNCATED_L2
            return pkt
        family = _U32.unpack_from(data)[0]
        if linktype == LINKTYPE_NULL and family > 0xFFFF:
            family = int.from_bytes(data[:4], "little")  # written in the other host order
        if family == AF_INET:
            ethertype = ETH_P_IPV4
        elif family in AF_INET6:
            ethertype = ETH_P_IPV6
        else:
            pkt.error = ParseError.NOT_IP if family in AF_NON_IP else ParseError.UNKNOWN_ETHERTYPE
            return pkt
        off = 4
    else:
        pkt.error = ParseError.UNKNOWN_LINKTYPE
        return pkt
    if ethertype in VLAN_TPIDS:  # 802.1Q / 802.1ad / QinQ tags, outermost first
        vlans = []
        while ethertype in VLAN_TPIDS:
            if n < off + 4:
                pkt.error = ParseError.TRUNCATED_L2
                return pkt
            vlans.append((data[off] << 8 | data[off + 1]) & 0xFFF)
            ethertype = data[off + 2] << 8 | data[off + 3]
            off += 4
        pkt.vlans = tuple(vlans)
    pkt.ethertype = ethertype
    if ethertype == ETH_P_IPV4:
        _ipv4(pkt, data, off, n, wire_len - off, False)
    elif ethertype == ETH_P_IPV6:
        _ipv6(pkt, data, off, n, wire_len - off, False)
    elif ethertype <= ETHER_MAX_LENGTH or ethertype in NON_IP_ETHERTYPES:
        pkt.error = ParseError.NOT_IP
    else:
        pkt.error = ParseError.UNKNOWN_ETHERTYPE
    return pkt


def _eth_ipv4_tcp(data: bytes | bytearray, n: int, wire_len: int) -> Packet | None:
    """The fast path: an untagged Ethernet frame of an unfragmented IPv4 datagram without IP
    options carrying a whole TCP header. The same result as the general path, which gets every
    other frame (None)."""
    (ethertype, vihl, total, frag, ttl, proto, src, dst,
     sport, dport, seq, ack, doff, flags, window) = _ETH_IPV4_TCP.unpack_from(data)
    seglen = total - 20
    hlen = (doff >> 4) << 2
    if (
        ethertype != ETH_P_IPV4
        or vihl != IPV4_NO_OPTIONS
        or total > wire_len - 14
        or frag & (IP_MF | IP_OFFSET)
        or proto != PROTO_TCP
        or hlen < 20
        or hlen > seglen
    ):
        return None
    # fields set one by one: keyword arguments to the dataclass constructor cost twice as much
    pkt = Packet(data, LINKTYPE_ETHERNET, wire_len)  # type: ignore[arg-type]  # as in parse()
    pkt.ethertype = ETH_P_IPV4
    pkt.l3 = 14
    pkt.family = 4
    pkt.src = src
    pkt.dst = dst
    pkt.ttl = ttl
    pkt.ip_total = total
    pkt.proto = PROTO_TCP
    pkt.l4_len = seglen
    pkt.l4 = 34
    pkt.sport = sport
    pkt.dport = dport
    pkt.seq = seq
    pkt.ack = ack
    pkt.flags = flags
    pkt.window = window
    pkt.tcp_hlen = hlen
    pkt.payload_len = seglen - hlen
    if hlen == 32 and n >= 66:
        marker, tsval, tsecr = _TS_ONLY.unpack_from(data, 54)
        if marker == TS_ONLY_MARKER:  # the options of nearly every established segment
            pkt.tsval = tsval
            pkt.tsecr = tsecr
            return pkt
    if hlen > 20 and not _tcp_options(pkt, data, 54, 34 + hlen, n):
        pkt.error = ParseError.BAD_TCP_OPTIONS
    return pkt


def _short_ip_header(data: bytes | bytearray, off: int, limit: int, version: int) -> ParseError:
    """What an IP header cut short at `limit` is: of another version where its first byte
    was captured and says so, else truncated."""
    if limit > off and data[off] >> 4 != version:
        return ParseError.BAD_IP_VERSION
    return _TRUNCATED_IP


def _ipv4(
    pkt: Packet, data: bytes | bytearray, off: int, limit: int, room: int, inner: bool
) -> None:
    """IPv4 header at `off`; `limit` is where readable bytes end, `room` the bytes on the wire."""
    if limit - off < 20:
        pkt.error = _short_ip_header(data, off, limit, 4)
        return
    vihl, total, frag, ttl, proto, src, dst = _IPV4.unpack_from(data, off)
    hlen = (vihl & 0xF) << 2
    if vihl >> 4 != 4:
        pkt.error = ParseError.BAD_IP_VERSION
        return
    if hlen < 20:
        pkt.error = ParseError.BAD_IP_HEADER_LENGTH
        return
    if total < 20 or total > room:
        pkt.error = ParseError.BAD_IP_TOTAL_LENGTH
        return
    if hlen > total:
        pkt.error = ParseError.BAD_IP_HEADER_LENGTH
        return
    pkt.l3 = off
    pkt.family = 4
    pkt.src = src
    pkt.dst = dst
    pkt.ttl = ttl
    pkt.ip_total = total
    pkt.proto = proto
    pkt.l4_len = total - hlen
    frag_offset = (frag & IP_OFFSET) << 3
    if frag & (IP_MF | IP_OFFSET):
        pkt.frag = True
        pkt.frag_offset = frag_offset
    if hlen > 20:
        if off + hlen > limit:
            pkt.error = _TRUNCATED_IP
            return
        if not _ipv4_options_ok(data, off + 20, off + hlen):
            pkt.error = ParseError.BAD_IP_OPTIONS
            return
    if frag_offset:
        return
    _transport(pkt, data, proto, off + hlen, limit, inner)


def _ipv4_options_ok(data: bytes | bytearray, i: int, end: int) -> bool:
    """Type-length-value structure of IPv4 options (RFC 791): every length inside the header."""
    while i < end:
        kind = data[i]
        if kind == 0:  # end of option list
            return True
        if kind == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= end:
            return False
        size = data[i + 1]
        if size < 2 or i + size > end:
            return False
        i += size
    return True


def _ipv6(
    pkt: Packet, data: bytes | bytearray, off: int, limit: int, room: int, inner: bool
) -> None:
    """IPv6 header at `off` and its extension headers (RFC 8200 §4), up to the transport."""
    if limit - off < 40:
        pkt.error = _short_ip_header(data, off, limit, 6)
        return
    vcf, plen, nxt, hlim, src, dst = _IPV6.unpack_from(data, off)
    if vcf >> 28 != 6:
        pkt.error = ParseError.BAD_IP_VERSION
        return
    total = 40 + plen
    if plen == 0 and nxt == IPPROTO_HOPOPTS:
        total += _jumbo_payload_length(data, off + 40, limit)
    if total > room:
        pkt.error = ParseError.BAD_IP_TOTAL_LENGTH
        return
    pkt.l3 = off
    pkt.family = 6
    pkt.src = src
    pkt.dst = dst
    pkt.ttl = hlim
    pkt.ip_total = total
    end = off + total
    i = off + 40
    while nxt in IPV6_EXT_HEADERS:
        if nxt == IPPROTO_HOPOPTS and i != off + 40:
            pkt.error = ParseError.BAD_EXTENSION_HEADER  # hop-by-hop must come first
            return
        if i + 8 > end:
            pkt.error = ParseError.BAD_IP_TOTAL_LENGTH
            return
        if i + 8 > limit:
            pkt.error = _TRUNCATED_IP
            return
        if nxt == IPPROTO_FRAGMENT:
            after, fo = _FRAG6.unpack_from(data, i)
            frag_offset = fo & 0xFFF8
            if frag_offset or fo & 1:
                pkt.frag = True
                pkt.frag_offset = frag_offset
            i += 8
            if frag_offset:  # the rest is fragment payload, not headers
                pkt.proto = after
                pkt.l4_len = end - i
                return
            nxt = after
            continue
        size = (data[i + 1] + 2) << 2 if nxt == IPPROTO_AH else (data[i + 1] + 1) << 3
        if i + size > end:
            pkt.error = ParseError.BAD_IP_TOTAL_LENGTH
            return
        if i + size > limit:
            pkt.error = _TRUNCATED_IP
            return
        nxt = data[i]
        i += size
    pkt.proto = nxt
    pkt.l4_len = end - i
    _transport(pkt, data, nxt, i, limit, inner)


def _jumbo_payload_length(data: bytes | bytearray, i: int, limit: int) -> int:
    """The Jumbo Payload option of the hop-by-hop header at `i` (RFC 2675), or 0 if none."""
    if i + 8 > limit:
        return 0
    end = min(i + ((data[i + 1] + 1) << 3), limit)
    i += 2
    while i + 1 < end:
        kind = data[i]
        if kind == 0:  # Pad1
            i += 1
            continue
        if kind == IPV6_OPT_JUMBO and data[i + 1] == 4 and i + 6 <= end:
            length = _U32.unpack_from(data, i + 2)[0]
            return length if length > 0xFFFF else 0
        i += 2 + data[i + 1]
    return 0


def _transport(
    pkt: Packet, data: bytes | bytearray, proto: int, off: int, limit: int, inner: bool
) -> None:
    if proto == PROTO_TCP:
        _tcp(pkt, data, off, limit, inner)
    elif proto == PROTO_UDP:
        _udp(pkt, data, off, limit)
    elif proto in (PROTO_ICMP, PROTO_ICMPV6):
        _icmp(pkt, data, off, limit, inner)
    else:
        pkt.error = ParseError.UNSUPPORTED_PROTOCOL


def _tcp(pkt: Packet, data: bytes | bytearray, off: int, limit: int, inner: bool) -> None:
    seglen = pkt.l4_len
    if seglen < 20:
        pkt.error = ParseError.BAD_IP_TOTAL_LENGTH
        return
    if limit - off < 20:
        if inner and limit - off >= 8:  # an ICMP error quotes at least ports and sequence
            pkt.sport, pkt.dport, pkt.seq = _PORTS_SEQ.unpack_from(data, off)
            pkt.l4 = off
            return
        pkt.error = _TRUNCATED_L4
        return
    sport, dport, seq, ack, doff, flags, window = _TCP.unpack_from(data, off)
    hlen = (doff >> 4) << 2
    if hlen < 20 or hlen > seglen:
        pkt.error = ParseError.BAD_TCP_HEADER_LENGTH
        return
    pkt.l4 = off
    pkt.sport = sport
    pkt.dport = dport
    pkt.seq = seq
    pkt.ack = ack
    pkt.flags = flags
    pkt.window = window
    pkt.tcp_hlen = hlen
    pkt.payload_len = seglen - hlen
    if hlen == 32 and off + 32 <= limit:
        marker, tsval, tsecr = _TS_ONLY.unpack_from(data, off + 20)
        if marker == TS_ONLY_MARKER:  # the options of nearly every established segment
            pkt.tsval = tsval
            pkt.tsecr = tsecr
            return
    if hlen > 20 and not _tcp_options(pkt, data, off + 20, off + hlen, limit):
        pkt.error = ParseError.BAD_TCP_OPTIONS


def _tcp_options(pkt: Packet, data: bytes | bytearray, i: int, end: int, limit: int) -> bool:
    """Fill MSS, window scale, SACK, timestamps from the options in [i, end) (RFC 9293 §3.1).

    False when a length is impossible; options beyond `limit` (cut by snaplen) are skipped.
    """
    stop = end if end < limit else limit
    if stop - i == LINUX_SYN_LEN:  # the layout of nearly every SYN: read at once
        (mss_kind, mss, sack_kind, ts_kind, tsval, tsecr, nop_ws, ws_len,
         wscale) = _LINUX_SYN.unpack_from(data, i)
        if (mss_kind == 0x0204 and sack_kind == 0x0402 and ts_kind == 0x080A
                and nop_ws == 0x0103 and ws_len == 3):
            pkt.mss = mss
            pkt.sack_perm = True
            pkt.tsval, pkt.tsecr = tsval, tsecr
            pkt.wscale = wscale
            return True
    while i < stop:
        kind = data[i]
        if kind == 0:  # end of option list
            return True
        if kind == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= stop:
            return i + 1 < end  # the length byte is inside the header but not captured
        size = data[i + 1]
        if size < 2 or i + size > end:
            return False
        if i + size > limit:
            return True
        if kind == 2:
            if size != 4:
                return False
            pkt.mss = _MSS.unpack_from(data, i + 2)[0]
        elif kind == 3:
            if size != 3:
                return False
            pkt.wscale = data[i + 2]
        elif kind == 4:
            if size != 2:
                return False
            pkt.sack_perm = True
        elif kind == 5:
            if size < 10 or (size - 2) & 7:
                return False
            pkt.sack = tuple(_SACK.unpack_from(data, j) for j in range(i + 2, i + size, 8))
        elif kind == 8:
            if size != 10:
                return False
            pkt.tsval, pkt.tsecr = _TS.unpack_from(data, i + 2)
        i += size
    return True


def _udp(pkt: Packet, data: bytes | bytearray, off: int, limit: int) -> None:
    seglen = pkt.l4_len
    if seglen < 8:
        pkt.error = ParseError.BAD_IP_TOTAL_LENGTH
        return
    if limit - off < 8:
        pkt.error = _TRUNCATED_L4
        return
    sport, dport, ulen = _UDP.unpack_from(data, off)
    if ulen == 0 and pkt.family == 6:
        ulen = seglen  # RFC 2675 jumbogram: the length comes from the IP layer
    if ulen < 8 or (ulen > seglen and not pkt.frag):  # a first fragment holds only part
        pkt.error = ParseError.BAD_UDP_LENGTH
        return
    pkt.l4 = off
    pkt.sport = sport
    pkt.dport = dport
    pkt.payload_len = ulen - 8


def _icmp(pkt: Packet, data: bytes | bytearray, off: int, limit: int, inner: bool) -> None:
    seglen = pkt.l4_len
    if seglen < 8:
        pkt.error = ParseError.BAD_IP_TOTAL_LENGTH
        return
    if limit - off < 8:
        pkt.error = _TRUNCATED_L4
        return
    itype, code, ident = _ICMP.unpack_from(data, off)
    pkt.l4 = off
    pkt.icmp_type = itype
    pkt.icmp_code = code
    pkt.payload_len = seglen - 8
    v6 = pkt.proto == PROTO_ICMPV6
    if itype in (ICMPV6_ECHO_TYPES if v6 else ICMP_ECHO_TYPES):
        pkt.icmp_id = pkt.sport = pkt.dport = ident
    elif not inner and itype in (ICMPV6_ERROR_TYPES if v6 else ICMP_ERROR_TYPES):
        _icmp_inner(pkt, data, off + 8, min(limit, off + seglen), v6)


def _icmp_inner(pkt: Packet, data: bytes | bytearray, off: int, limit: int, v6: bool) -> None:
    """The datagram an ICMP error quotes: its headers, as far as they were quoted and captured."""
    inner = Packet(data, pkt.linktype, pkt.wire_len)  # type: ignore[arg-type]  # as in parse()
    pkt.inner = inner
    if v6:
        _ipv6(inner, data, off, limit, NO_ROOM_LIMIT, True)
    else:
        _ipv4(inner, data, off, limit, NO_ROOM_LIMIT, True)
    if inner.error == ParseError.UNSUPPORTED_PROTOCOL:
        pkt.error = ParseError.UNSUPPORTED_PROTOCOL  # about a flow flowshift does not track
    elif inner.error != _OK:
        pkt.error = ParseError.TRUNCATED_ICMP_INNER


def verify_checksums(pkt: Packet) -> bool | None:
    """Check the IPv4 header and the TCP/UDP/ICMP/ICMPv6 checksums by full recomputation.

    None when nothing could be verified: not IP, or the bytes a checksum covers were not all
    captured (snaplen), or the segment is a fragment and only IPv6 (no header checksum) is left.
    """
    data = pkt.data
    n = len(data)
    l3 = pkt.l3
    if l3 < 0:
        return None
    verified = False
    if pkt.family == 4:
        hlen = (data[l3] & 0xF) << 2
        if l3 + hlen > n:
            return None
        if ones_sum(data[l3 : l3 + hlen]) != 0xFFFF:
            return False
        verified = True
    l4, seglen, proto = pkt.l4, pkt.l4_len, pkt.proto
    if l4 < 0 or pkt.frag or proto not in (PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6):
        return True if verified else None
    if l4 + seglen > n:
        return None
    if proto == PROTO_UDP:
        csum = _U16.unpack_from(data, l4 + 6)[0]
        if csum == 0:
            return pkt.family == 4  # IPv4: no checksum sent; IPv6: forbidden (RFC 8200 §8.1)
        seglen = pkt.payload_len + 8
    initial = 0 if proto == PROTO_ICMP else pseudo_header_sum(pkt.src, pkt.dst, proto, seglen)
    return ones_sum(data[l4 : l4 + seglen], initial) == 0xFFFF
