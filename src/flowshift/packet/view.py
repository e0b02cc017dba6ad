"""The parsed view of one frame: offsets into its bytes and the header fields services use.

`parse()` (packet/parse.py) fills a `Packet`; it never raises. When it cannot parse a frame it
sets `error` to a `ParseError` and leaves the fields of the unparsed layers at their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from flowshift.flow import FlowKey

# tcpdump link types (LINKTYPE_*) that flowshift reads
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6, version nibble tells
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
LINKTYPE_NULL = 0  # BSD loopback: 4-byte host-order family
LINKTYPE_LOOP = 108  # OpenBSD loopback: 4-byte network-order family
DLT_RAW_ALIASES = (12, 14)  # DLT_RAW as written by some systems

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80


class ParseError(IntEnum):
    """Why a frame was not (fully) parsed. Numbered; never renumbered."""

    OK = 0
    NOT_IP = 1  # a well-formed frame of a known non-IP protocol (ARP, LLDP, ...): bypass
    UNKNOWN_LINKTYPE = 2
    TRUNCATED_L2 = 3  # captured bytes end inside the link-layer header (or VLAN tags)
    UNKNOWN_ETHERTYPE = 4
    TRUNCATED_IP = 5  # captured bytes end inside the IPv4/IPv6 header (or extension headers)
    BAD_IP_VERSION = 6
    BAD_IP_HEADER_LENGTH = 7  # IPv4 IHL < 5 or beyond the total length
    BAD_IP_TOTAL_LENGTH = 8  # total/payload length shorter than the headers or longer than the wire
    BAD_IP_OPTIONS = 9
    BAD_EXTENSION_HEADER = 10  # IPv6 extension header chain malformed
    TRUNCATED_L4 = 11  # captured bytes end inside the TCP/UDP/ICMP header
    BAD_TCP_HEADER_LENGTH = 12  # data offset < 5 (incl. zero) or beyond the segment
    BAD_TCP_OPTIONS = 13
    BAD_UDP_LENGTH = 14
    BAD_CHECKSUM = 15  # set only by verification, never by parse()
    TRUNCATED_ICMP_INNER = 16  # ICMP error whose embedded header cannot be parsed
    UNSUPPORTED_PROTOCOL = 17  # IP protocol not tracked (GRE, ESP, SCTP...): parsed to L3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(slots=True)
class Packet:
    data: bytearray  # the frame as captured; rewrites change it in place
    linktype: int
    wire_len: int  # original length on the wire (>= len(data) when snaplen cut it)
    error: ParseError = ParseError.OK
    # L2
    vlans: tuple[int, ...] = ()  # 802.1Q / QinQ VLAN ids, outermost first
    ethertype: int = 0
    # L3
    l3: int = -1  # offset of the IP header in data
    family: int = 0  # 4 or 6 (0: not IP)
    src: bytes = b""
    dst: bytes = b""
    ttl: int = 0  # TTL / hop limit
    ip_total: int = 0  # IP datagram length from the header (IPv4 total length / 40 + payload len)
    proto: int = 0  # transport protocol after IPv6 extension headers
    frag: bool = False  # part of a fragmented datagram (MF set or offset > 0)
    frag_offset: int = 0  # in bytes; > 0 means no transport header here
    # L4: offsets and fields (only when frag_offset == 0 and the header is present)
    l4: int = -1  # offset of the TCP/UDP/ICMP header in data
    l4_len: int = 0  # transport segment length per the IP header (header + payload, on the wire)
    sport: int = 0  # TCP/UDP port; ICMP echo: identifier
    dport: int = 0  # TCP/UDP port; ICMP echo: identifier
    # TCP
    seq: int = 0
    ack: int = 0
    flags: int = 0  # TCP flag bits (TCP_FIN...)
    window: int = 0  # raw advertised window (unscaled)
    tcp_hlen: int = 0  # TCP header length in bytes
    payload_len: int = 0  # L4 payload bytes per the IP header (not limited by snaplen)
    mss: int = 0  # 0: option absent
    wscale: int = -1  # -1: option absent
    sack_perm: bool = False
    sack: tuple[tuple[int, int], ...] = ()  # SACK blocks (left, right)
    tsval: int = -1  # -1: timestamps absent
    tsecr: int = -1
    # ICMP / ICMPv6
    icmp_type: int = -1
    icmp_code: int = -1
    icmp_id: int = -1  # echo request/reply identifier
    inner: Packet | None = None  # ICMP error: the quoted original datagram, from its IP header
    extra: dict[str, int] = field(default_factory=dict)  # rarely used fields (e.g. udp length)

    @property
    def is_icmp_error(self) -> bool:
        return self.inner is not None

    @property
    def is_icmp_echo(self) -> bool:
        return self.icmp_id >= 0

    @property
    def truncated(self) -> bool:
        """True when the capture holds fewer bytes than the datagram had on the wire."""
        return self.l3 >= 0 and len(self.data) - self.l3 < self.ip_total

    def key(self, zone: int = 0) -> FlowKey:
        return FlowKey(self.family, self.proto, zone, self.src, self.dst, self.sport, self.dport)
