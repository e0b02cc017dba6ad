"""Building frames: Ethernet II (optionally 802.1Q-tagged) over IPv4/IPv6, then TCP, UDP or ICMP.

Every builder returns the complete frame as bytes with valid IPv4, TCP, UDP and ICMP checksums.
Addresses are raw bytes (4 or 16, as in `FlowKey`); the address length picks the IP version.
Payloads are either given or taken from a fixed filler buffer (`filler`): slicing one
precomputed buffer keeps the traffic generator fast, and the same length always gives the same
bytes. TCP options follow the order and NOP padding Linux writes (`tcp_options`).
"""

from __future__ import annotations

import struct

from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from flowshift.packet.checksum import checksum, ones_sum, pseudo_header_sum

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMPV6_DEST_UNREACH = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

# How much of the offending datagram an ICMP error quotes: RFC 1812 §4.3.2.3 (the error fits
# 576 bytes) and RFC 4443 §2.4 (the error fits the IPv6 minimum MTU), as Linux does.
ICMP_ERROR_MAX = 576
ICMPV6_ERROR_MAX = 1280

DEFAULT_SRC_MAC = bytes.fromhex("020000000001")
DEFAULT_DST_MAC = bytes.fromhex("020000000002")

_FILL_PERIOD = 1 << 16
# printable, non-repeating over short spans, so payloads read as "data" in dissectors
_FILL = bytes(0x20 + (i * 37 + (i >> 8)) % 95 for i in range(_FILL_PERIOD + 65536))

_ETH = struct.Struct("!6s6sH")
_VLAN = struct.Struct("!HH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP_ECHO = struct.Struct("!BBHHH")
_TS = struct.Struct("!BBII")


def mac(text: str) -> bytes:
    """`"02:00:00:00:00:01"` -> 6 bytes."""
    raw = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return raw


def filler(n: int, offset: int = 0) -> bytes:
    """`n` deterministic payload bytes: the filler stream from `offset` on (n <= 65536)."""
    if not 0 <= n <= 65536:
        raise ValueError(f"filler length {n} outside 0..65536")
    start = offset % _FILL_PERIOD
    return _FILL[start : start + n]


def ethernet_header(
    *, src_mac: bytes, dst_mac: bytes, ethertype: int, vlan: int | None = None
) -> bytes:
    if vlan is None:
        return _ETH.pack(dst_mac, src_mac, ethertype)
    if not 0 <= vlan < 4096:
        raise ValueError(f"VLAN id {vlan} outside 0..4095")
    return _ETH.pack(dst_mac, src_mac, ETH_P_8021Q) + _VLAN.pack(vlan, ethertype)


def ipv4_header(
    *,
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ttl: int = 64,
    ip_id: int = 0,
    df: bool = True,
    tos: int = 0,
) -> bytes:
    """A 20-byte IPv4 header (no options) with its checksum."""
    total = 20 + payload_len
    if total > 0xFFFF:
        raise ValueError(f"IPv4 datagram of {total} bytes exceeds 65535")
    frag = 0x4000 if df else 0
    head = _IPV4.pack(0x45, tos, total, ip_id & 0xFFFF, frag, ttl, proto, 0, src, dst)
    return head[:10] + checksum(head).to_bytes(2, "big") + head[12:]


def ipv6_header(
    *,
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    flow_label: int = 0,
    tclass: int = 0,
) -> bytes:
    """A 40-byte IPv6 header (no extension headers)."""
    if payload_len > 0xFFFF:
        raise ValueError(f"IPv6 payload of {payload_len} bytes needs a jumbogram")
    first = (6 << 28) | (tclass << 20) | (flow_label & 0xFFFFF)
    return _IPV6.pack(first, payload_len, next_header, hop_limit, src, dst)


def ip_frame(
    *,
    src: bytes,
    dst: bytes,
    proto: int,
    l4: bytes,
    src_mac: bytes = DEFAULT_SRC_MAC,
    dst_mac: bytes = DEFAULT_DST_MAC,
    ttl: int = 64,
    ip_id: int = 0,
    df: bool = True,
    flow_label: int = 0,
    vlan: int | None = None,
) -> bytes:
    """Ethernet + IP around a finished transport segment `l4` (its checksum already set)."""
    if len(src) == 4:
        eth = ethernet_header(src_mac=src_mac, dst_mac=dst_mac, ethertype=ETH_P_IP, vlan=vlan)
        ip = ipv4_header(
            src=src, dst=dst, proto=proto, payload_len=len(l4), ttl=ttl, ip_id=ip_id, df=df
        )
    elif len(src) == 16:
        eth = ethernet_header(src_mac=src_mac, dst_mac=dst_mac, ethertype=ETH_P_IPV6, vlan=vlan)
        ip = ipv6_header(
            src=src,
            dst=dst,
            next_header=proto,
            payload_len=len(l4),
            hop_limit=ttl,
            flow_label=flow_label,
        )
    else:
        raise ValueError(f"source address of {len(src)} bytes is neither IPv4 nor IPv6")
    if len(dst) != len(src):
        raise ValueError("source and destination addresses are of different IP versions")
    return eth + ip + l4


def tcp_options(
    *,
    mss: int | None = None,
    wscale: int | None = None,
    sack_perm: bool = False,
    timestamps: tuple[int, int] | None = None,
    sack: tuple[tuple[int, int], ...] = (),
) -> bytes:
    """TCP options laid out as Linux's tcp_options_write(): MSS; SACK-permitted folded into the
    timestamps' padding (or NOP NOP SACK-permitted); NOP NOP timestamps; NOP window scale;
    NOP NOP SACK blocks. The result is always a multiple of 4 bytes.
    """
    out = bytearray()
    if mss is not None:
        out += b"\x02\x04" + mss.to_bytes(2, "big")
    if timestamps is not None:
        tsval, tsecr = timestamps
        head = b"\x04\x02" if sack_perm else b"\x01\x01"
        out += head + _TS.pack(8, 10, tsval & 0xFFFFFFFF, tsecr & 0xFFFFFFFF)
    elif sack_perm:
        out += b"\x01\x01\x04\x02"
    if wscale is not None:
        if not 0 <= wscale <= 14:
            raise ValueError(f"window scale {wscale} outside 0..14 (RFC 7323)")
        out += b"\x01\x03\x03" + bytes((wscale,))
    if sack:
        out += b"\x01\x01\x05" + bytes((2 + 8 * len(sack),))
        for left, right in sack:
            out += (left & 0xFFFFFFFF).to_bytes(4, "big") + (right & 0xFFFFFFFF).to_bytes(4, "big")
    if len(out) > 40:
        raise ValueError(f"TCP options of {len(out)} bytes exceed 40")
    return bytes(out)


def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return checksum(segment, pseudo_header_sum(src, dst, proto, len(segment)))


def tcp_segment(
    *,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload: bytes = b"",
    urgent: int = 0,
) -> bytes:
    """The TCP header + payload with its checksum (pseudo-header from `src`/`dst`)."""
    if len(options) % 4:
        raise ValueError(f"TCP options of {len(options)} bytes are not padded to 4")
    hlen = 20 + len(options)
    head = _TCP.pack(
        sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hlen // 4) << 4, flags, window, 0, urgent
    )
    pseudo = pseudo_header_sum(src, dst, PROTO_TCP, hlen + len(payload))
    # header and options have even length, so the payload's sum starts on a 16-bit boundary
    csum = checksum(head + options, ones_sum(payload, pseudo))
    return head[:16] + csum.to_bytes(2, "big") + head[18:] + options + payload


class TcpFramer:
    """`tcp_frame` for one sender of one connection, byte for byte: what its frames share (the
    link header, the IP header but for its length and ID, the addresses' share of both
    checksums) is worked out once. A traffic generator builds most of its frames here.

    A 16-bit ones'-complement sum is the sum of the words modulo 0xFFFF (zero standing as
    0xFFFF once anything was added), so the shared part is added as a number."""

    __slots__ = ("_eth", "_fixed", "_ip_sum", "_pseudo", "_v4", "_v6")

    def __init__(self, *, src: bytes, dst: bytes, sport: int, dport: int,
                 src_mac: bytes = DEFAULT_SRC_MAC, dst_mac: bytes = DEFAULT_DST_MAC,
                 ttl: int = 64, df: bool = True, flow_label: int = 0,
                 vlan: int | None = None) -> None:
        if len(src) not in (4, 16):
            raise ValueError(f"source address of {len(src)} bytes is neither IPv4 nor IPv6")
        if len(dst) != len(src):
            raise ValueError("source and destination addresses are of different IP versions")
        self._v4 = len(src) == 4
        self._eth = ethernet_header(src_mac=src_mac, dst_mac=dst_mac,
                                    ethertype=ETH_P_IP if self._v4 else ETH_P_IPV6, vlan=vlan)
        addresses = int.from_bytes(src + dst, "big")
        self._fixed = (sport, dport, ttl, 0x4000 if df else 0, src, dst)
        # IPv4: version and header length, flags, TTL and protocol, the addresses
        self._ip_sum = 0x4500 + self._fixed[3] + (ttl << 8 | PROTO_TCP) + addresses
        self._pseudo = addresses + PROTO_TCP  # the segment's length is added per frame
        self._v6 = (6 << 28) | (flow_label & 0xFFFFF)

    def frame(self, *, seq: int, ack: int, flags: int, window: int, options: bytes = b"",
              payload: bytes = b"", ip_id: int = 0) -> bytes:
        if len(options) % 4:
            raise ValueError(f"TCP options of {len(options)} bytes are not padded to 4")
        sport, dport, ttl, frag, src, dst = self._fixed
        hlen = 20 + len(options)
        seglen = hlen + len(payload)
        seq &= 0xFFFFFFFF
        ack &= 0xFFFFFFFF
        head = _TCP.pack(sport, dport, seq, ack, (hlen // 4) << 4, flags, window, 0, 0)
        data = int.from_bytes(payload, "big")
        v = (self._pseudo + seglen + int.from_bytes(head + options, "big")
             + (data << 8 if len(payload) & 1 else data)) % 0xFFFF
        csum = ~(v or 0xFFFF) & 0xFFFF
        head = _TCP.pack(sport, dport, seq, ack, (hlen // 4) << 4, flags, window, csum, 0)
        if self._v4:
            total = 20 + seglen
            if total > 0xFFFF:
                raise ValueError(f"IPv4 datagram of {total} bytes exceeds 65535")
            ip_id &= 0xFFFF
            ip = ~((self._ip_sum + total + ip_id) % 0xFFFF or 0xFFFF) & 0xFFFF
            ip_head = _IPV4.pack(0x45, 0, total, ip_id, frag, ttl, PROTO_TCP, ip, src, dst)
        else:
            if seglen > 0xFFFF:
                raise ValueError(f"IPv6 payload of {seglen} bytes needs a jumbogram")
            ip_head = _IPV6.pack(self._v6, seglen, PROTO_TCP, ttl, src, dst)
        return b"".join((self._eth, ip_head, head, options, payload))


def tcp_frame(
    *,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload: bytes = b"",
    payload_len: int | None = None,
    src_mac: bytes = DEFAULT_SRC_MAC,
    dst_mac: bytes = DEFAULT_DST_MAC,
    ttl: int = 64,
    ip_id: int = 0,
    df: bool = True,
    flow_label: int = 0,
    vlan: int | None = None,
) -> bytes:
    """A TCP frame. `payload_len` (instead of `payload`) takes that many filler bytes."""
    if payload_len is not None:
        payload = filler(payload_len)
    l4 = tcp_segment(
        src=src,
        dst=dst,
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=options,
        payload=payload,
    )
    return ip_frame(
        src=src,
        dst=dst,
        proto=PROTO_TCP,
        l4=l4,
        src_mac=src_mac,
        dst_mac=dst_mac,
        ttl=ttl,
        ip_id=ip_id,
        df=df,
        flow_label=flow_label,
        vlan=vlan,
    )


def udp_frame(
    *,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    payload: bytes = b"",
    payload_len: int | None = None,
    src_mac: bytes = DEFAULT_SRC_MAC,
    dst_mac: bytes = DEFAULT_DST_MAC,
    ttl: int = 64,
    ip_id: int = 0,
    df: bool = True,
    flow_label: int = 0,
    vlan: int | None = None,
) -> bytes:
    if payload_len is not None:
        payload = filler(payload_len)
    length = 8 + len(payload)
    head = _UDP.pack(sport, dport, length, 0)
    csum = checksum(head, ones_sum(payload, pseudo_header_sum(src, dst, PROTO_UDP, length)))
    # RFC 768: a computed zero is sent as all ones (zero means "no checksum")
    l4 = head[:6] + (csum or 0xFFFF).to_bytes(2, "big") + payload
    return ip_frame(
        src=src,
        dst=dst,
        proto=PROTO_UDP,
        l4=l4,
        src_mac=src_mac,
        dst_mac=dst_mac,
        ttl=ttl,
        ip_id=ip_id,
        df=df,
        flow_label=flow_label,
        vlan=vlan,
    )


def _icmp_message(src: bytes, dst: bytes, body: bytes) -> tuple[int, bytes]:
    """(protocol, message with checksum) for an ICMP (IPv4) or ICMPv6 message `body`."""
    if len(src) == 4:
        csum = checksum(body)
        proto = PROTO_ICMP
    else:
        csum = _l4_checksum(src, dst, PROTO_ICMPV6, body)
        proto = PROTO_ICMPV6
    return proto, body[:2] + csum.to_bytes(2, "big") + body[4:]


def icmp_echo_frame(
    *,
    src: bytes,
    dst: bytes,
    ident: int,
    seq: int,
    reply: bool = False,
    payload: bytes = b"",
    src_mac: bytes = DEFAULT_SRC_MAC,
    dst_mac: bytes = DEFAULT_DST_MAC,
    ttl: int = 64,
    ip_id: int = 0,
    df: bool = True,
    vlan: int | None = None,
) -> bytes:
    """An ICMP echo request/reply, or ICMPv6 echo for IPv6 addresses."""
    if len(src) == 4:
        kind = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    else:
        kind = ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST
    body = _ICMP_ECHO.pack(kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + payload
    proto, l4 = _icmp_message(src, dst, body)
    return ip_frame(
        src=src,
        dst=dst,
        proto=proto,
        l4=l4,
        src_mac=src_mac,
        dst_mac=dst_mac,
        ttl=ttl,
        ip_id=ip_id,
        df=df,
        vlan=vlan,
    )


def _ip_of_frame(frame: bytes) -> tuple[int, memoryview]:
    """(IP version, the IP datagram) of an Ethernet frame, skipping 802.1Q/802.1ad tags."""
    if len(frame) < 14:
        raise ValueError("original frame is shorter than an Ethernet header")
    off, ethertype = 12, int.from_bytes(frame[12:14], "big")
    while ethertype in (ETH_P_8021Q, 0x88A8) and len(frame) >= off + 6:
        off += 4
        ethertype = int.from_bytes(frame[off : off + 2], "big")
    ip = memoryview(frame)[off + 2 :]
    if ethertype == ETH_P_IP and len(ip) >= 20 and ip[0] >> 4 == 4:
        return 4, ip
    if ethertype == ETH_P_IPV6 and len(ip) >= 40 and ip[0] >> 4 == 6:
        return 6, ip
    raise ValueError(f"original frame carries no complete IP header (ethertype {ethertype:#06x})")


def icmp_error_frame(
    original: bytes,
    *,
    type: int,
    code: int,
    src: bytes | None = None,
    mtu: int = 0,
    src_mac: bytes | None = None,
    dst_mac: bytes | None = None,
    ttl: int = 64,
    ip_id: int = 0,
    vlan: int | None = None,
) -> bytes:
    """An ICMP (or ICMPv6) error about the Ethernet frame `original`, sent back to its source.

    `src` is the reporting node (default: the original destination, as for port unreachable);
    the MACs default to the original's, swapped. `mtu` fills the next-hop MTU of
    "fragmentation needed" (type 3 code 4) and ICMPv6 "packet too big". The quote is the
    original IP datagram cut so that the error fits 576 bytes (IPv4) or 1280 bytes (IPv6).
    """
    version, ip = _ip_of_frame(original)
    if version == 4:
        orig_src, orig_dst = bytes(ip[12:16]), bytes(ip[16:20])
        quote = bytes(ip[: ICMP_ERROR_MAX - 20 - 8])
        rest = mtu if (type, code) == (ICMP_DEST_UNREACH, 4) else 0
    else:
        orig_src, orig_dst = bytes(ip[8:24]), bytes(ip[24:40])
        quote = bytes(ip[: ICMPV6_ERROR_MAX - 40 - 8])
        rest = mtu if type == ICMPV6_PACKET_TOO_BIG else 0
    reporter = orig_dst if src is None else src
    if len(reporter) != len(orig_src):
        raise ValueError("the ICMP error's source is not of the original's IP version")
    body = bytes((type, code, 0, 0)) + rest.to_bytes(4, "big") + quote
    proto, l4 = _icmp_message(reporter, orig_src, body)
    return ip_frame(
        src=reporter,
        dst=orig_src,
        proto=proto,
        l4=l4,
        src_mac=bytes(original[:6]) if src_mac is None else src_mac,
        dst_mac=bytes(original[6:12]) if dst_mac is None else dst_mac,
        ttl=ttl,
        ip_id=ip_id,
        df=False,
        vlan=vlan,
    )
