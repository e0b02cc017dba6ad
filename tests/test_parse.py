"""parse(): every link type and protocol against scapy as the oracle, every ParseError reason on a
crafted frame, truncation at every byte of a header, and random bytes (hypothesis)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_RS,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, LLC, STP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Dot3, Ether
from scapy.layers.sctp import SCTP
from scapy.packet import Raw

from flowshift.flow import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from flowshift.packet import parse as parse_module
from flowshift.packet.build import tcp_frame
from flowshift.packet.parse import parse, verify_checksums
from flowshift.packet.view import TCP_ACK, TCP_PSH, TCP_SYN, Packet, ParseError

A4 = "192.0.2.1"
B4 = "198.51.100.7"
A6 = "2001:db8::1"
B6 = "2001:db8:ffff::2"
TCP_OPTIONS = [
    ("MSS", 1460),
    ("SAckOK", b""),
    ("Timestamp", (123456, 654321)),
    ("NOP", None),
    ("WScale", 7),
]


def parsed(data: bytes | bytearray, linktype: int = 1, wire_len: int | None = None) -> Packet:
    pkt = parse(data, linktype, wire_len)
    assert_in_bounds(pkt)
    return pkt


def assert_in_bounds(pkt: Packet) -> None:
    """Offsets that parse() claims always point at whole headers inside the captured bytes."""
    n = len(pkt.data)
    for view in (pkt, pkt.inner):
        if view is None:
            continue
        assert view.data is pkt.data
        if view.l3 >= 0:
            assert view.l3 + (20 if view.family == 4 else 40) <= n
        if view.l4 >= 0:
            assert view.l3 >= 0 and view.l3 < view.l4 and view.l4 + 8 <= n
        if view.tcp_hlen and view is pkt:
            assert view.l4 + 20 <= n


def addr(text: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(text).packed


def eth(l3, *tags):
    frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    for t in tags:
        frame = frame / t
    return bytes(frame / l3)


# ---- link types -----------------------------------------------------------------------------


def test_ethernet_ipv4_tcp_all_options():
    frame = eth(
        IP(src=A4, dst=B4, ttl=17)
        / TCP(
            sport=40000,
            dport=80,
            seq=1000,
            ack=2000,
            flags="SA",
            window=29200,
            options=[*TCP_OPTIONS, ("SAck", (10, 20, 30, 40))],
        )
        / Raw(b"x" * 33)
    )
    buf = bytearray(frame)
    pkt = parsed(buf)
    assert pkt.data is buf
    assert pkt.error == ParseError.OK
    assert (pkt.l3, pkt.family, pkt.src, pkt.dst, pkt.ttl) == (14, 4, addr(A4), addr(B4), 17)
    assert (pkt.proto, pkt.l4, pkt.sport, pkt.dport) == (PROTO_TCP, 34, 40000, 80)
    assert (pkt.seq, pkt.ack, pkt.flags, pkt.window) == (1000, 2000, TCP_SYN | TCP_ACK, 29200)
    ip = IP(frame[14:])
    assert pkt.tcp_hlen == ip[TCP].dataofs * 4
    assert pkt.ip_total == ip.len
    assert pkt.l4_len == ip.len - 20
    assert pkt.payload_len == 33
    assert (pkt.mss, pkt.wscale, pkt.sack_perm) == (1460, 7, True)
    assert (pkt.tsval, pkt.tsecr) == (123456, 654321)
    assert pkt.sack == ((10, 20), (30, 40))
    assert not pkt.truncated and not pkt.frag
    assert pkt.key().sport == 40000
    assert verify_checksums(pkt) is True


def test_bytes_input_kept():
    frame = eth(IP(src=A4, dst=B4) / UDP(sport=5, dport=6))
    assert parsed(frame).data is frame


@pytest.mark.parametrize(
    ("tags", "vlans"),
    [
        ((Dot1Q(vlan=100),), (100,)),
        ((Dot1AD(vlan=200), Dot1Q(vlan=100)), (200, 100)),
        ((Dot1Q(vlan=7), Dot1Q(vlan=4095)), (7, 4095)),
    ],
)
def test_vlan_tags(tags, vlans):
    pkt = parsed(eth(IPv6(src=A6, dst=B6) / UDP(sport=53, dport=5353) / Raw(b"q" * 9), *tags))
    assert pkt.error == ParseError.OK
    assert pkt.vlans == vlans
    assert pkt.l3 == 14 + 4 * len(vlans)
    assert (pkt.family, pkt.proto, pkt.sport, pkt.dport, pkt.payload_len) == (6, 17, 53, 5353, 9)


def test_qinq_legacy_tpid():
    frame = bytearray(eth(IP(src=A4, dst=B4) / UDP(), Dot1Q(vlan=10), Dot1Q(vlan=20)))
    frame[12:14] = b"\x91\x00"
    pkt = parsed(frame)
    assert pkt.error == ParseError.OK and pkt.vlans == (10, 20)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (bytes(Ether() / ARP()), ParseError.NOT_IP),
        (bytes(Ether(type=0x88CC) / Raw(b"\x02\x07" + b"\0" * 20)), ParseError.NOT_IP),
        (bytes(Ether(type=0x888E) / Raw(b"\0" * 20)), ParseError.NOT_IP),
        (bytes(Ether(type=0x8847) / Raw(b"\0" * 20)), ParseError.NOT_IP),
        (bytes(Dot3() / LLC() / STP()), ParseError.NOT_IP),
        (bytes(Ether(type=0x1234) / Raw(b"\0" * 20)), ParseError.UNKNOWN_ETHERTYPE),
        (bytes(Ether(type=0x0600) / Raw(b"\0" * 20)), ParseError.UNKNOWN_ETHERTYPE),
        (bytes(Ether() / Dot1Q(vlan=3) / ARP()), ParseError.NOT_IP),
    ],
)
def test_non_ip_ethernet(frame, reason):
    pkt = parsed(frame)
    assert pkt.error == reason
    assert pkt.l3 == -1 and pkt.family == 0


V4_UDP = bytes(IP(src=A4, dst=B4, ttl=3) / UDP(sport=1, dport=2) / Raw(b"abc"))
V6_TCP = bytes(IPv6(src=A6, dst=B6, hlim=9) / TCP(sport=3, dport=4, flags="PA") / Raw(b"abcd"))


@pytest.mark.parametrize("linktype", [101, 12, 14])
@pytest.mark.parametrize("datagram", [V4_UDP, V6_TCP])
def test_raw_ip_version_nibble_decides(linktype, datagram):
    pkt = parsed(datagram, linktype)
    assert pkt.error == ParseError.OK
    assert pkt.l3 == 0
    assert pkt.family == datagram[0] >> 4
    assert pkt.ethertype == (0x0800 if pkt.family == 4 else 0x86DD)


def test_linktype_ipv4_ipv6():
    assert parsed(V4_UDP, 228).family == 4
    assert parsed(V6_TCP, 229).family == 6
    assert parsed(V6_TCP, 228).error == ParseError.BAD_IP_VERSION
    assert parsed(V4_UDP, 229).error == ParseError.BAD_IP_VERSION
    assert parsed(b"\x50" + V4_UDP[1:], 101).error == ParseError.BAD_IP_VERSION
    assert parsed(b"", 101).error == ParseError.TRUNCATED_IP


def test_linux_sll():
    pkt = parsed(bytes(CookedLinux(pkttype=0, proto=0x0800) / IP(src=A4, dst=B4) / TCP()), 113)
    assert (pkt.error, pkt.l3, pkt.proto, pkt.dport) == (ParseError.OK, 16, PROTO_TCP, 80)
    netlink = CookedLinux(lladdrtype=824, proto=0) / Raw(b"\0" * 16)
    assert parsed(bytes(netlink), 113).error == ParseError.NOT_IP
    arp = CookedLinux(proto=0x0806) / ARP()
    assert parsed(bytes(arp), 113).error == ParseError.NOT_IP
    llc = CookedLinux(proto=0x0004) / Raw(b"\0" * 10)
    assert parsed(bytes(llc), 113).error == ParseError.NOT_IP


def test_linux_sll2():
    frame = bytes(CookedLinuxV2(proto=0x86DD) / IPv6(src=A6, dst=B6) / UDP(sport=7, dport=8))
    pkt = parsed(frame, 276)
    assert (pkt.error, pkt.l3, pkt.family, pkt.sport, pkt.dport) == (ParseError.OK, 20, 6, 7, 8)
    vlan = bytes(CookedLinuxV2(proto=0x8100) / Dot1Q(vlan=42) / IP(src=A4, dst=B4) / UDP())
    pkt = parsed(vlan, 276)
    assert (pkt.error, pkt.vlans, pkt.l3) == (ParseError.OK, (42,), 24)


@pytest.mark.parametrize(
    ("linktype", "header", "family", "reason"),
    [
        (0, struct.pack("<I", 2), 4, ParseError.OK),
        (0, struct.pack(">I", 2), 4, ParseError.OK),
        (0, struct.pack("<I", 30), 6, ParseError.OK),
        (0, struct.pack(">I", 28), 6, ParseError.OK),
        (0, struct.pack("<I", 24), 6, ParseError.OK),
        (108, struct.pack(">I", 2), 4, ParseError.OK),
        (108, struct.pack(">I", 24), 6, ParseError.OK),
        (0, struct.pack("<I", 23), 0, ParseError.NOT_IP),
        (108, struct.pack(">I", 99), 0, ParseError.UNKNOWN_ETHERTYPE),
    ],
)
def test_bsd_loopback(linktype, header, family, reason):
    pkt = parsed(header + (V4_UDP if family == 4 else V6_TCP), linktype)
    assert pkt.error == reason
    assert pkt.family == family
    if family:
        assert pkt.l3 == 4


@pytest.mark.parametrize("linktype", [105, 127, 9, 1000, -1])
def test_unknown_linktype(linktype):
    assert parsed(V4_UDP, linktype).error == ParseError.UNKNOWN_LINKTYPE


# ---- IPv4 -----------------------------------------------------------------------------------


def test_ipv4_options():
    frame = eth(IP(src=A4, dst=B4, options=[IPOption_RR(routers=["1.2.3.4"])]) / TCP(dport=22))
    pkt = parsed(frame)
    ihl = IP(frame[14:]).ihl
    assert ihl > 5
    assert (pkt.error, pkt.l4, pkt.dport) == (ParseError.OK, 14 + ihl * 4, 22)
    assert verify_checksums(pkt) is True


def test_ipv4_fragments():
    datagram = IP(src=A4, dst=B4, id=7) / UDP(sport=1111, dport=2222) / Raw(b"z" * 100)
    first, second = (bytes(f) for f in _fragment(datagram, 56))
    pkt = parsed(first, 101)
    assert (pkt.error, pkt.frag, pkt.frag_offset) == (ParseError.OK, True, 0)
    # the UDP length covers the whole datagram, more than this fragment holds
    assert (pkt.l4_len, pkt.sport, pkt.dport, pkt.payload_len) == (56, 1111, 2222, 100)
    pkt = parsed(second, 101)
    assert (pkt.error, pkt.frag, pkt.frag_offset) == (ParseError.OK, True, 56)
    assert (pkt.l4, pkt.sport, pkt.dport, pkt.proto) == (-1, 0, 0, PROTO_UDP)
    assert verify_checksums(pkt) is True  # the IPv4 header only


def _fragment(datagram, size):
    from scapy.layers.inet import fragment

    return fragment(datagram, fragsize=size)


def test_ipv4_first_fragment_with_tcp_ports():
    raw = bytes(IP(src=A4, dst=B4, flags="MF") / TCP(sport=9, dport=10) / Raw(b"p" * 40))
    pkt = parsed(raw, 101)
    assert (pkt.error, pkt.frag, pkt.sport, pkt.dport) == (ParseError.OK, True, 9, 10)
    assert verify_checksums(pkt) is True  # transport checksum of a fragment is not checked


def test_ethernet_padding_is_not_data():
    frame = eth(IP(src=A4, dst=B4) / UDP(sport=1, dport=2)) + b"\0" * 18
    pkt = parsed(frame)
    assert (pkt.error, pkt.ip_total, pkt.payload_len) == (ParseError.OK, 28, 0)
    assert verify_checksums(pkt) is True


# ---- IPv6 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exts",
    [
        (IPv6ExtHdrHopByHop(),),
        (IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(addresses=[B6]), IPv6ExtHdrDestOpt()),
        (IPv6ExtHdrDestOpt(), IPv6ExtHdrFragment(offset=0, m=0)),
        (IPv6ExtHdrFragment(offset=0, m=1),),
    ],
)
def test_ipv6_extension_headers_skipped(exts):
    l3 = IPv6(src=A6, dst=B6)
    for ext in exts:
        l3 = l3 / ext
    frame = eth(l3 / TCP(sport=5000, dport=443, flags="S", options=TCP_OPTIONS))
    pkt = parsed(frame)
    headers = IPv6(frame[14:])
    assert pkt.error == ParseError.OK
    assert pkt.proto == PROTO_TCP
    assert pkt.l4 == 14 + len(bytes(headers)) - len(bytes(headers[TCP]))
    assert (pkt.sport, pkt.dport, pkt.mss) == (5000, 443, 1460)
    assert pkt.frag == any(isinstance(e, IPv6ExtHdrFragment) and e.m for e in exts)
    assert pkt.ip_total == 40 + headers.plen


def test_ipv6_later_fragment_and_ah():
    frame = eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=10, m=1, nh=6) / Raw(b"d" * 16))
    pkt = parsed(frame)
    assert (pkt.error, pkt.frag, pkt.frag_offset, pkt.proto, pkt.l4) == (
        ParseError.OK,
        True,
        80,
        PROTO_TCP,
        -1,
    )
    assert pkt.l4_len == 16
    ah = AH(nh=PROTO_UDP, payloadlen=4, spi=1, icv=b"\0" * 12)  # (4 + 2) * 4 bytes
    pkt = parsed(eth(IPv6(src=A6, dst=B6) / ah / UDP(sport=1, dport=2)))
    assert (pkt.error, pkt.proto, pkt.sport, pkt.dport) == (ParseError.OK, PROTO_UDP, 1, 2)


def test_ipv6_no_next_header():
    pkt = parsed(eth(IPv6(src=A6, dst=B6, nh=59)))
    assert pkt.error == ParseError.UNSUPPORTED_PROTOCOL
    assert (pkt.proto, pkt.family, pkt.src) == (59, 6, addr(A6))


def test_udp_ipv6_jumbo_length_zero():
    raw = bytearray(bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / Raw(b"j" * 10)))
    raw[44:46] = b"\0\0"
    pkt = parsed(raw, 101)
    assert (pkt.error, pkt.payload_len) == (ParseError.OK, 10)


# ---- ICMP -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "l3l4",
    [
        IP(src=A4, dst=B4) / ICMP(type=8, id=0x1234, seq=1) / Raw(b"ping"),
        IP(src=A4, dst=B4) / ICMP(type=0, id=0x1234, seq=1),
        IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=0x1234, seq=5) / Raw(b"ping6"),
        IPv6(src=A6, dst=B6) / ICMPv6EchoReply(id=0x1234),
    ],
)
def test_icmp_echo_id_is_both_ports(l3l4):
    pkt = parsed(eth(l3l4))
    assert pkt.error == ParseError.OK
    assert pkt.is_icmp_echo and not pkt.is_icmp_error
    assert pkt.icmp_id == pkt.sport == pkt.dport == 0x1234
    assert pkt.key().reversed() == pkt.key()._replace(src=pkt.dst, dst=pkt.src)
    assert verify_checksums(pkt) is True


def test_icmp_other_types_have_no_ports():
    pkt = parsed(eth(IP(src=A4, dst=B4) / ICMP(type=13)))
    assert (pkt.error, pkt.icmp_type, pkt.icmp_code, pkt.icmp_id, pkt.sport) == (
        ParseError.OK,
        13,
        0,
        -1,
        0,
    )
    pkt = parsed(eth(IPv6(src=A6, dst=B6, hlim=255) / ICMPv6ND_RS()))
    assert (pkt.error, pkt.proto, pkt.icmp_type, pkt.inner) == (ParseError.OK, 58, 133, None)
    assert verify_checksums(pkt) is True


def quoted_tcp4(cut: int | None = None) -> bytes:
    inner = bytes(
        IP(src=B4, dst=A4, ttl=1) / TCP(sport=80, dport=40000, seq=77, flags="PA") / Raw(b"y" * 30)
    )
    return inner if cut is None else inner[:cut]


@pytest.mark.parametrize(("itype", "code"), [(3, 3), (4, 0), (5, 1), (11, 0), (12, 0)])
def test_icmp_error_quotes_tcp(itype, code):
    frame = eth(IP(src=A4, dst=B4) / ICMP(type=itype, code=code) / Raw(quoted_tcp4(28)))
    pkt = parsed(frame)
    assert pkt.error == ParseError.OK
    assert pkt.is_icmp_error and not pkt.is_icmp_echo
    assert (pkt.icmp_type, pkt.icmp_code, pkt.sport, pkt.dport) == (itype, code, 0, 0)
    inner = pkt.inner
    assert inner.error == ParseError.OK
    assert inner.data is pkt.data
    assert (inner.l3, inner.l4) == (14 + 20 + 8, 14 + 20 + 8 + 20)
    assert (inner.src, inner.dst, inner.proto) == (addr(B4), addr(A4), PROTO_TCP)
    assert (inner.sport, inner.dport, inner.seq) == (80, 40000, 77)
    assert inner.ip_total == 70 and inner.l4_len == 50 and inner.truncated
    assert verify_checksums(pkt) is True


def test_icmp_error_quoting_whole_tcp_header():
    pkt = parsed(eth(IP(src=A4, dst=B4) / ICMP(type=3) / Raw(quoted_tcp4(40))))
    assert pkt.inner.error == ParseError.OK
    assert (pkt.inner.flags, pkt.inner.tcp_hlen) == (TCP_PSH | TCP_ACK, 20)


def test_icmp_errors_quote_udp_and_echo():
    quoted = bytes(IP(src=B4, dst=A4) / UDP(sport=53, dport=3333) / Raw(b"r" * 20))
    pkt = parsed(eth(IP(src=A4, dst=B4) / ICMP(type=11) / Raw(quoted)))
    assert (pkt.inner.proto, pkt.inner.sport, pkt.inner.dport) == (PROTO_UDP, 53, 3333)
    quoted = bytes(IP(src=B4, dst=A4) / ICMP(type=8, id=99))
    pkt = parsed(eth(IP(src=A4, dst=B4) / ICMP(type=3, code=1) / Raw(quoted)))
    assert pkt.error == ParseError.OK
    assert (pkt.inner.proto, pkt.inner.icmp_id, pkt.inner.sport) == (PROTO_ICMP, 99, 99)


@pytest.mark.parametrize(
    "error", [ICMPv6DestUnreach(code=4), ICMPv6PacketTooBig(mtu=1280), ICMPv6TimeExceeded()]
)
def test_icmpv6_errors(error):
    quoted = bytes(
        IPv6(src=B6, dst=A6)
        / IPv6ExtHdrDestOpt()
        / TCP(sport=8080, dport=41000, seq=5)
        / Raw(b"w" * 100)
    )
    frame = eth(IPv6(src=A6, dst=B6) / error / Raw(quoted[:80]))
    pkt = parsed(frame)
    assert pkt.error == ParseError.OK
    inner = pkt.inner
    assert (inner.family, inner.proto, inner.sport, inner.dport, inner.seq) == (
        6,
        PROTO_TCP,
        8080,
        41000,
        5,
    )
    assert inner.l4 == 14 + 40 + 8 + 40 + 8
    assert inner.ip_total == len(quoted)
    assert verify_checksums(pkt) is True


def test_icmpv6_parameter_problem_quoting_udp():
    quoted = bytes(IPv6(src=B6, dst=A6) / UDP(sport=1, dport=2))
    from scapy.layers.inet6 import ICMPv6ParamProblem

    pkt = parsed(eth(IPv6(src=A6, dst=B6) / ICMPv6ParamProblem(ptr=6) / Raw(quoted)))
    assert (pkt.error, pkt.icmp_type, pkt.inner.sport) == (ParseError.OK, 4, 1)


@pytest.mark.parametrize(
    "quoted",
    [b"", quoted_tcp4(10), quoted_tcp4(19), quoted_tcp4(27), b"\x65" + quoted_tcp4(27)[1:]],
)
def test_icmp_error_without_usable_quote(quoted):
    pkt = parsed(eth(IP(src=A4, dst=B4) / ICMP(type=3) / Raw(quoted)))
    assert pkt.error == ParseError.TRUNCATED_ICMP_INNER
    assert pkt.inner.error != ParseError.OK
    assert pkt.inner.l4 == -1


def test_icmp_error_quoting_unsupported_protocol():
    quoted = bytes(IP(src=B4, dst=A4, proto=47) / Raw(b"\0" * 8))
    pkt = parsed(eth(IP(src=A4, dst=B4) / ICMP(type=3) / Raw(quoted)))
    assert pkt.error == ParseError.UNSUPPORTED_PROTOCOL
    assert pkt.inner.proto == 47


def test_icmp_quote_ends_with_the_datagram_not_the_frame():
    # the ICMP message holds only 20 bytes of the quote; Ethernet padding must not be read as more
    frame = eth(IP(src=A4, dst=B4) / ICMP(type=3) / Raw(quoted_tcp4(20))) + quoted_tcp4()[20:40]
    assert parsed(frame).error == ParseError.TRUNCATED_ICMP_INNER


# ---- other protocols ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "l3l4",
    [
        IP(src=A4, dst=B4, proto=47) / Raw(b"\0\0\x08\0"),
        IP(src=A4, dst=B4, proto=50) / Raw(b"\0" * 16),
        IP(src=A4, dst=B4) / SCTP(sport=1, dport=2),
        IPv6(src=A6, dst=B6) / SCTP(sport=1, dport=2),
        IP(src=A4, dst=B4) / AH(spi=1, icv=b"\0" * 12) / UDP(),
    ],
)
def test_unsupported_protocols_keep_l3(l3l4):
    pkt = parsed(eth(l3l4))
    assert pkt.error == ParseError.UNSUPPORTED_PROTOCOL
    assert pkt.l3 == 14 and pkt.src and pkt.dst and pkt.proto not in (0, 6, 17, 1, 58)
    assert pkt.l4 == -1 and pkt.sport == pkt.dport == 0


# ---- every error reason, crafted ------------------------------------------------------------

TCP4 = eth(IP(src=A4, dst=B4) / TCP(sport=1, dport=2, options=TCP_OPTIONS) / Raw(b"d" * 10))
UDP4 = eth(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / Raw(b"d" * 10))
ICMP4 = eth(IP(src=A4, dst=B4) / ICMP(id=5) / Raw(b"d" * 10))
TCP6 = eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP())
ICMP6 = eth(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest())
VLAN_TCP4 = eth(IP(src=A4, dst=B4) / TCP(), Dot1AD(vlan=1), Dot1Q(vlan=2))


def patched(frame: bytes, at: int, new: bytes) -> bytearray:
    out = bytearray(frame)
    out[at : at + len(new)] = new
    return out


@pytest.mark.parametrize(
    ("frame", "linktype", "header_end"),
    [
        (TCP4, 1, 14),
        (VLAN_TCP4, 1, 22),
        (bytes(CookedLinux() / IP() / TCP()), 113, 16),
        (bytes(CookedLinuxV2() / IP() / TCP()), 276, 20),
        (struct.pack("<I", 2) + V4_UDP, 0, 4),
    ],
)
def test_truncated_link_layer_at_every_byte(frame, linktype, header_end):
    for cut in range(header_end):
        assert parsed(frame[:cut], linktype, len(frame)).error == ParseError.TRUNCATED_L2, cut


@pytest.mark.parametrize(
    ("frame", "l3", "l3_end"),
    [
        (TCP4, 14, 34),
        (eth(IP(options=[IPOption_RR()]) / TCP()), 14, 14 + 24),
        (TCP6, 14, 14 + 40 + 16),
    ],
)
def test_snaplen_inside_ip_headers(frame, l3, l3_end):
    for cut in range(l3, l3_end):
        pkt = parsed(frame[:cut], 1, len(frame))
        assert pkt.error == ParseError.TRUNCATED_IP, cut
        assert pkt.l4 == -1


@pytest.mark.parametrize(
    ("frame", "l4"), [(TCP4, 34), (UDP4, 34), (ICMP4, 34), (ICMP6, 54), (TCP6, 70)]
)
def test_snaplen_inside_transport_header(frame, l4):
    needed = 20 if frame in (TCP4, TCP6) else 8
    for cut in range(l4, l4 + needed):
        pkt = parsed(frame[:cut], 1, len(frame))
        assert pkt.error == ParseError.TRUNCATED_L4, cut
        assert pkt.l3 == 14 and pkt.l4 == -1 and pkt.truncated


def test_snaplen_inside_tcp_options_parses_what_is_there():
    full = parsed(TCP4)
    for cut in range(34 + 20, 34 + full.tcp_hlen):
        pkt = parsed(TCP4[:cut], 1, len(TCP4))
        assert pkt.error == ParseError.OK, cut
        assert (pkt.sport, pkt.tcp_hlen, pkt.payload_len) == (1, full.tcp_hlen, 10)
        assert pkt.mss == (1460 if cut >= 34 + 24 else 0)
        assert pkt.tsval in (-1, full.tsval)
        assert verify_checksums(pkt) is None


def test_capture_cut_without_wire_len_is_a_length_error():
    # a frame shorter than its IP total length on the wire is malformed, not cut by snaplen
    assert parsed(TCP4[:-1]).error == ParseError.BAD_IP_TOTAL_LENGTH
    assert parsed(TCP4[:-1], 1, len(TCP4)).error == ParseError.OK


IP4 = 14  # IPv4 header offset in the Ethernet frames above


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (patched(TCP4, IP4, b"\x55"), ParseError.BAD_IP_VERSION),
        (patched(TCP6, IP4, b"\x46"), ParseError.BAD_IP_VERSION),
        (patched(TCP4, IP4, b"\x44"), ParseError.BAD_IP_HEADER_LENGTH),
        (patched(TCP4, IP4, b"\x40"), ParseError.BAD_IP_HEADER_LENGTH),
        (patched(UDP4, IP4, b"\x4f"), ParseError.BAD_IP_HEADER_LENGTH),  # 60 > total 38
        (patched(TCP4, IP4 + 2, b"\x00\x13"), ParseError.BAD_IP_TOTAL_LENGTH),
        (patched(TCP4, IP4 + 2, b"\x05\xdc"), ParseError.BAD_IP_TOTAL_LENGTH),  # > wire
        (patched(TCP4, IP4 + 2, b"\x00\x20"), ParseError.BAD_IP_TOTAL_LENGTH),  # 12 B of TCP
        (patched(UDP4, IP4 + 2, b"\x00\x1a"), ParseError.BAD_IP_TOTAL_LENGTH),  # 6 B of UDP
        (patched(ICMP4, IP4 + 2, b"\x00\x1a"), ParseError.BAD_IP_TOTAL_LENGTH),
        (patched(TCP6, IP4 + 4, b"\x05\xdc"), ParseError.BAD_IP_TOTAL_LENGTH),
        (patched(TCP6, IP4 + 4, b"\x00\x04"), ParseError.BAD_IP_TOTAL_LENGTH),  # HBH beyond
        (patched(TCP6, IP4 + 40, b"\x00"), ParseError.BAD_EXTENSION_HEADER),  # HBH after HBH
        (patched(TCP4, 34 + 12, b"\x00"), ParseError.BAD_TCP_HEADER_LENGTH),
        (patched(TCP4, 34 + 12, b"\x40"), ParseError.BAD_TCP_HEADER_LENGTH),
        (patched(TCP4, 34 + 12, b"\xf0"), ParseError.BAD_TCP_HEADER_LENGTH),  # 60 > segment
        (patched(UDP4, 34 + 4, b"\x00\x07"), ParseError.BAD_UDP_LENGTH),
        (patched(UDP4, 34 + 4, b"\x00\x13"), ParseError.BAD_UDP_LENGTH),
        (patched(UDP4, 34 + 4, b"\x00\x00"), ParseError.BAD_UDP_LENGTH),
        (patched(eth(IPv6() / TCP()), 14 + 6, b"\x2f"), ParseError.UNSUPPORTED_PROTOCOL),
    ],
)
def test_malformed_headers(frame, reason):
    pkt = parsed(frame)
    assert pkt.error == reason
    if reason in (ParseError.BAD_IP_VERSION, ParseError.BAD_IP_HEADER_LENGTH):
        assert pkt.l3 == -1
    assert pkt.l4 == -1


def tcp_with_option_bytes(options: bytes) -> bytes:
    options += b"\0" * (-len(options) % 4)
    return eth(
        IP(src=A4, dst=B4) / TCP(sport=1, dport=2, dataofs=5 + len(options) // 4) / Raw(options)
    )


@pytest.mark.parametrize(
    "options",
    [
        b"\x02",  # the length byte is outside the header
        b"\x02\x00\x05\xb4",  # length 0
        b"\x02\x01\x05\xb4",  # length 1
        b"\x02\x05\x05\xb4",  # MSS of 5 bytes
        b"\x02\x09\x05\xb4",  # beyond the header
        b"\x03\x04\x07\x00",  # window scale of 4 bytes
        b"\x04\x03\x00\x00",  # SACK-permitted of 3 bytes
        b"\x05\x06" + b"\0" * 6,  # SACK with no whole block
        b"\x05\x0b" + b"\0" * 9 + b"\x01",  # SACK of 11 bytes
        b"\x08\x09" + b"\0" * 7,  # timestamps of 9 bytes
        b"\x01\x01\xfe\x01",  # unknown option, length 1
    ],
)
def test_malformed_tcp_options(options):
    pkt = parsed(tcp_with_option_bytes(options))
    assert pkt.error == ParseError.BAD_TCP_OPTIONS
    assert (pkt.sport, pkt.dport) == (1, 2)  # the fixed header stays parsed


def test_well_formed_odd_tcp_options():
    pkt = parsed(tcp_with_option_bytes(b"\xfe\x04\xab\xcd\x00\x02\x00"))  # unknown, then EOL
    assert (pkt.error, pkt.mss) == (ParseError.OK, 0)
    sack = b"\x05\x22" + struct.pack("!8I", *range(1, 9))
    assert parsed(tcp_with_option_bytes(sack)).sack == ((1, 2), (3, 4), (5, 6), (7, 8))


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (b"\x01\x07\x03\x04", ParseError.OK),  # NOP, record route with room for nothing
        (b"\x00\xff\xff\xff", ParseError.OK),  # end of list, then padding
        (b"\x44\x01\x00\x00", ParseError.BAD_IP_OPTIONS),  # length 1
        (b"\x07\x0a\x04\x00", ParseError.BAD_IP_OPTIONS),  # beyond the header
        (b"\x01\x01\x01\x44", ParseError.BAD_IP_OPTIONS),  # length byte beyond the header
    ],
)
def test_ipv4_options_structure(options, reason):
    datagram = bytes(IP(src=A4, dst=B4, options=[]) / TCP())
    header = b"\x46" + datagram[1:2] + (len(datagram) + 4).to_bytes(2, "big") + datagram[4:20]
    assert parsed(header + options + datagram[20:], 101).error == reason


def test_checksum_never_judged_by_parse():
    frame = patched(TCP4, 34 + 16, b"\xde\xad")
    pkt = parsed(frame)
    assert pkt.error == ParseError.OK
    assert verify_checksums(pkt) is False
    pkt = parsed(patched(TCP4, IP4 + 10, b"\xde\xad"))
    assert (pkt.error, verify_checksums(pkt)) == (ParseError.OK, False)


def test_verify_checksums_cases():
    assert verify_checksums(parsed(bytes(Ether() / ARP()))) is None
    assert verify_checksums(parsed(TCP4[:-1], 1, len(TCP4))) is None
    no_sum = eth(IP(src=A4, dst=B4) / UDP(sport=1, dport=2, chksum=0) / Raw(b"x"))
    assert verify_checksums(parsed(no_sum)) is True
    no_sum6 = eth(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2, chksum=0) / Raw(b"x"))
    assert verify_checksums(parsed(no_sum6)) is False
    assert verify_checksums(parsed(eth(IPv6(src=A6, dst=B6) / UDP() / Raw(b"x")))) is True
    assert verify_checksums(parsed(eth(IPv6(nh=59)))) is None


REASON_EXAMPLES = {
    ParseError.OK: (TCP4, 1),
    ParseError.NOT_IP: (bytes(Ether() / ARP()), 1),
    ParseError.UNKNOWN_LINKTYPE: (TCP4, 147),
    ParseError.TRUNCATED_L2: (TCP4[:13], 1),
    ParseError.UNKNOWN_ETHERTYPE: (patched(TCP4, 12, b"\x12\x34"), 1),
    ParseError.TRUNCATED_IP: (V6_TCP[:39], 101),
    ParseError.BAD_IP_VERSION: (patched(V4_UDP, 0, b"\x35"), 101),
    ParseError.BAD_IP_HEADER_LENGTH: (patched(V4_UDP, 0, b"\x43"), 101),
    ParseError.BAD_IP_TOTAL_LENGTH: (V4_UDP[:-1], 101),
    ParseError.BAD_IP_OPTIONS: (
        b"\x46" + V4_UDP[1:2] + b"\x00\x23" + V4_UDP[4:20] + b"\x07\x09\x04\x00" + V4_UDP[20:],
        101,
    ),
    ParseError.BAD_EXTENSION_HEADER: (patched(TCP6, IP4 + 40, b"\x00"), 1),
    ParseError.TRUNCATED_L4: (TCP4[:40], 1),
    ParseError.BAD_TCP_HEADER_LENGTH: (patched(TCP4, 34 + 12, b"\x30"), 1),
    ParseError.BAD_TCP_OPTIONS: (tcp_with_option_bytes(b"\x08\x0a\x00"), 1),
    ParseError.BAD_UDP_LENGTH: (patched(V4_UDP, 24, b"\x00\x05"), 101),
    ParseError.TRUNCATED_ICMP_INNER: (bytes(IP() / ICMP(type=11) / Raw(b"\x45" * 12)), 101),
    ParseError.UNSUPPORTED_PROTOCOL: (bytes(IP(proto=132) / Raw(b"\0" * 12)), 101),
}


def test_every_reason_has_a_crafted_frame():
    never_from_parse = {ParseError.BAD_CHECKSUM}  # set by verification only
    assert set(REASON_EXAMPLES) == set(ParseError) - never_from_parse
    for reason, (frame, linktype) in REASON_EXAMPLES.items():
        wire = len(TCP4) if reason == ParseError.TRUNCATED_L4 else None
        assert parsed(frame, linktype, wire).error == reason, reason.label


# ---- random input ---------------------------------------------------------------------------

LINKTYPES = [0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 7]
SAMPLES = [
    TCP4,
    UDP4,
    ICMP4,
    TCP6,
    ICMP6,
    VLAN_TCP4,
    eth(IP(src=A4, dst=B4) / ICMP(type=3) / Raw(quoted_tcp4(40))),
    eth(IPv6(src=A6, dst=B6) / ICMPv6DestUnreach() / Raw(bytes(IPv6() / UDP()))),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=120),
    linktype=st.sampled_from(LINKTYPES),
    wire_extra=st.integers(0, 100),
)
def test_random_bytes_never_raise(data, linktype, wire_extra):
    pkt = parse(data, linktype, len(data) + wire_extra)
    assert isinstance(pkt.error, ParseError)
    assert_in_bounds(pkt)


@settings(max_examples=400, deadline=None)
@given(
    sample=st.sampled_from(SAMPLES),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 200),
    snaplen=st.booleans(),
)
def test_mutated_frames_never_raise(sample, edits, cut, snaplen):
    frame = bytearray(sample)
    for at, value in edits:
        if at < len(frame):
            frame[at] = value
    frame = frame[:cut] if cut < len(frame) else frame
    pkt = parse(frame, 1, len(sample) if snaplen else None)
    assert_in_bounds(pkt)
    verify_checksums(pkt)


def test_linux_timestamp_layout():
    frame = eth(
        IP(src=A4, dst=B4) / TCP(options=[("NOP", None), ("NOP", None), ("Timestamp", (7, 8))])
    )
    pkt = parsed(frame)
    assert (pkt.error, pkt.tcp_hlen, pkt.tsval, pkt.tsecr, pkt.mss) == (ParseError.OK, 32, 7, 8, 0)
    pkt = parsed(frame[:-1], 1, len(frame))
    assert (pkt.error, pkt.tsval) == (ParseError.OK, -1)


@pytest.mark.parametrize(
    ("l3", "error", "quoted", "needed"),
    [
        (IP(src=A4, dst=B4), ICMP(type=3), quoted_tcp4(), 28),
        (IPv6(src=A6, dst=B6), ICMPv6TimeExceeded(), bytes(IPv6() / UDP() / Raw(b"u" * 9)), 48),
    ],
)
def test_icmp_quote_cut_at_every_byte(l3, error, quoted, needed):
    for length in range(len(quoted) + 1):
        pkt = parsed(eth(l3 / error / Raw(quoted[:length])))
        if length < needed:
            assert pkt.error == ParseError.TRUNCATED_ICMP_INNER, length
            assert pkt.inner.l4 == -1
        else:
            assert pkt.error == ParseError.OK, length
            assert pkt.inner.sport and pkt.inner.dport


def _option_fields(pkt: Packet) -> tuple[object, ...]:
    return (pkt.error, pkt.mss, pkt.wscale, pkt.sack_perm, pkt.tsval, pkt.tsecr, pkt.sack)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFF), st.integers(-1, 19), st.integers(0, 0xFF), st.booleans())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_linux_syn_options_read_at_once_as_one_by_one(mss, tsval, tsecr, wscale, at, value,
                                                      v6):
    """The options of a Linux SYN (MSS, SACK-permitted, timestamps, NOP, window scale: 20
    bytes) are read in one go; the same bytes followed by four NOPs take the option-by-option
    walk and must give the same fields. `at` >= 0 overwrites one byte: a layout that is not
    Linux's (or a malformed one) is walked like any other."""
    options = bytearray(struct.pack("!HHHHIIHBB", 0x0204, mss, 0x0402, 0x080A, tsval, tsecr,
                                    0x0103, 3, wscale))
    if at >= 0:
        options[at] = value
    ip = IPv6(src=A6, dst=B6) if v6 else IP(src=A4, dst=B4)

    def frame(opts: bytes) -> bytes:
        return eth(ip / TCP(sport=1, dport=2, flags="S", dataofs=5 + len(opts) // 4)
                   / Raw(opts))

    at_once, one_by_one = parsed(frame(bytes(options))), parsed(frame(bytes(options) + b"\1" * 4))
    assert _option_fields(at_once) == _option_fields(one_by_one)
    if at < 0:
        assert (at_once.mss, at_once.sack_perm, at_once.tsval, at_once.tsecr, at_once.wscale) == (
            mss, True, tsval, tsecr, wscale)


def _general_path(frame: bytes, wire_len: int | None) -> Packet:
    """parse() with its fast path (_eth_ipv4_tcp) out of reach: every frame the general way."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parse_module, "ETH_IPV4_TCP_LEN", 1 << 30)
        return parse(frame, 1, wire_len)


_FAST_PATH_OPTIONS = [
    b"",
    b"\1\1\x08\x0a" + struct.pack("!II", 7, 8),  # NOP NOP timestamps: read at once
    struct.pack("!HHHHIIHBB", 0x0204, 1460, 0x0402, 0x080A, 5, 6, 0x0103, 3, 7),  # Linux SYN
    b"\1\1\5\x0a" + struct.pack("!II", 100, 200) + b"\1\1\x08\x0a" + struct.pack("!II", 1, 2),
    b"\2\4\5\xb4\1\0\0\0",  # MSS, NOP, end of list
    b"\2\3\5\xb4",  # a length that is impossible for MSS
]


# one change to a well-formed frame: (byte offset, value) of a field the fast path decides on
_FAST_PATH_FAULTS = st.one_of(
    st.tuples(st.just(14), st.sampled_from([0x46, 0x55, 0x44, 0x4F])),  # version, IHL
    st.tuples(st.just(16), st.integers(0, 0xFF)),  # total length, high byte
    st.tuples(st.just(17), st.integers(0, 0xFF)),  # total length, low byte
    st.tuples(st.just(20), st.sampled_from([0x40, 0x20, 0x00, 0x1F])),  # DF, MF, offset
    st.tuples(st.just(21), st.sampled_from([0x00, 0x01])),  # offset, low byte
    st.tuples(st.just(23), st.sampled_from([17, 1, 0])),  # protocol
    st.tuples(st.just(46), st.integers(0, 15).map(lambda d: d << 4)),  # TCP data offset
    st.tuples(st.integers(12, 80), st.integers(0, 0xFF)),  # any byte
)


@given(st.sampled_from(_FAST_PATH_OPTIONS), st.binary(max_size=24), st.integers(0, 0xFF),
       st.lists(_FAST_PATH_FAULTS, max_size=2), st.none() | st.integers(54, 120),
       st.integers(0, 40))
@example(b"", b"", 0x10, [(46, 0x40)], None, 0)  # a data offset of 16 bytes
@example(b"", b"", 0x10, [(17, 39)], None, 0)  # a segment shorter than the TCP header
@example(b"", b"", 0x10, [(17, 41)], None, 0)  # a datagram longer than the wire
@example(b"", b"", 0x10, [(20, 0x20)], None, 0)  # a first fragment
@example(_FAST_PATH_OPTIONS[1], b"", 0x10, [], 62, 0)  # timestamps cut by the capture
@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
def test_fast_path_agrees_with_the_general_path(options, payload, flags, faults, cut,
                                                wire_extra):
    """The unrolled parser of untagged Ethernet/IPv4/TCP frames is kept beside the general one
    for speed; on every frame, well formed or not (a header field the fast path decides on set
    to another value, the capture cut, the wire longer), both give the same Packet, field for
    field."""
    frame = bytearray(tcp_frame(src=addr(A4), dst=addr(B4), sport=1, dport=2, seq=3, ack=4,
                                flags=flags, window=5, options=options, payload=payload))
    for at, value in faults:
        if at < len(frame):
            frame[at] = value
    wire_len = len(frame) + wire_extra
    data = bytes(frame[:cut])
    assert parse(data, 1, wire_len) == _general_path(data, wire_len)


def test_the_fast_path_takes_the_common_frames():
    """The agreement above compares something: the common segments do take the fast path."""
    for options in _FAST_PATH_OPTIONS[:4]:
        frame = eth(IP(src=A4, dst=B4) / TCP(flags="A", dataofs=5 + len(options) // 4)
                    / Raw(options + b"data"))
        assert parse_module._eth_ipv4_tcp(frame, len(frame), len(frame)) is not None
