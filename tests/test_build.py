"""packet.build: frames against scapy as the oracle (fields and checksums), Linux's TCP option
layout byte for byte, ICMP error quoting limits, and the errors for impossible frames."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6PacketTooBig, IPerror6, IPv6
from scapy.layers.l2 import Dot1Q, Ether

from flowshift.packet.build import (
    TcpFramer,
    filler,
    icmp_echo_frame,
    icmp_error_frame,
    ip_frame,
    mac,
    tcp_frame,
    tcp_options,
    udp_frame,
)
from flowshift.packet.parse import parse, verify_checksums
from flowshift.packet.view import LINKTYPE_ETHERNET, TCP_ACK, TCP_PSH, TCP_SYN

A4 = ipaddress.ip_address("10.0.0.1").packed
B4 = ipaddress.ip_address("198.51.100.7").packed
A6 = ipaddress.ip_address("fd00::1").packed
B6 = ipaddress.ip_address("2001:db8::7").packed


def scapy_checksums_ok(frame: bytes) -> bool:
    """Rebuild the frame with scapy, every checksum deleted (so recomputed), and compare.

    The datagram an ICMP error quotes keeps its checksums: they cover bytes no longer there.
    """
    pkt = Ether(frame)
    layer = pkt
    while layer and not isinstance(layer, (IPerror, IPerror6)):
        for name in ("chksum", "cksum"):
            if name in layer.fields:
                delattr(layer, name)
        layer = layer.payload
    return bytes(pkt) == frame


def test_tcp_frame_fields_and_checksums_v4() -> None:
    opts = tcp_options(timestamps=(1000, 2000))
    frame = tcp_frame(
        src=A4, dst=B4, sport=40000, dport=80, seq=1, ack=2, flags=TCP_ACK | TCP_PSH,
        window=501, options=opts, payload_len=1001, ttl=60, ip_id=77,
    )
    p = Ether(frame)
    assert (p[IP].src, p[IP].dst, p[IP].ttl, p[IP].id, p[IP].flags) == (
        "10.0.0.1", "198.51.100.7", 60, 77, "DF",
    )
    assert (p[TCP].sport, p[TCP].dport, p[TCP].seq, p[TCP].ack, p[TCP].window) == (
        40000, 80, 1, 2, 501,
    )
    assert len(p[TCP].payload) == 1001  # odd: the checksum pads correctly
    assert dict(p[TCP].options)["Timestamp"] == (1000, 2000)
    assert scapy_checksums_ok(frame)


def test_tcp_frame_v6_with_vlan() -> None:
    frame = tcp_frame(
        src=A6, dst=B6, sport=1, dport=2, seq=0xFFFFFFFF + 5, ack=0, flags=TCP_SYN,
        window=65535, payload=b"x", vlan=42, flow_label=0x12345, ttl=50,
    )
    p = Ether(frame)
    assert p[Dot1Q].vlan == 42
    assert (p[IPv6].fl, p[IPv6].hlim, p[IPv6].plen) == (0x12345, 50, 21)
    assert p[TCP].seq == 4  # sequence numbers wrap modulo 2**32
    assert scapy_checksums_ok(frame)


@settings(max_examples=60, deadline=None)
@given(
    v6=st.booleans(),
    payload=st.binary(max_size=300),
    sport=st.integers(0, 65535),
    seq=st.integers(0, 2**32 - 1),
    ws=st.one_of(st.none(), st.integers(0, 14)),
)
def test_frames_agree_with_scapy(
    v6: bool, payload: bytes, sport: int, seq: int, ws: int | None
) -> None:
    src, dst = (A6, B6) if v6 else (A4, B4)
    opts = tcp_options(mss=1460, wscale=ws, sack_perm=True, timestamps=(seq, 7))
    tcp = tcp_frame(src=src, dst=dst, sport=sport, dport=443, seq=seq, ack=seq ^ 0xFFFF,
                    flags=TCP_ACK, window=1000, options=opts, payload=payload)
    udp = udp_frame(src=src, dst=dst, sport=sport, dport=53, payload=payload)
    echo = icmp_echo_frame(src=src, dst=dst, ident=sport, seq=seq & 0xFFFF, payload=payload)
    for frame in (tcp, udp, echo):
        assert scapy_checksums_ok(frame)
        assert verify_checksums(parse(frame, LINKTYPE_ETHERNET)) is True
    assert Ether(udp)[UDP].len == 8 + len(payload)


def test_linux_syn_option_layout() -> None:
    # what Linux puts in a SYN: MSS, SACK-permitted folded into the timestamp's NOPs, NOP + WS
    assert tcp_options(mss=1460, sack_perm=True, timestamps=(1, 0), wscale=7) == bytes.fromhex(
        "020405b4" "0402080a" "00000001" "00000000" "01030307"
    )
    assert tcp_options(mss=1460, sack_perm=True, wscale=7) == bytes.fromhex(
        "020405b4" "01010402" "01030307"
    )
    assert tcp_options(timestamps=(5, 6)) == bytes.fromhex("0101080a0000000500000006")
    assert tcp_options(sack=((10, 20),)) == bytes.fromhex("0101050a0000000a00000014")


def test_options_parse_back() -> None:
    opts = tcp_options(mss=1400, sack_perm=True, timestamps=(11, 22), wscale=9)
    pkt = parse(
        tcp_frame(src=A4, dst=B4, sport=1, dport=2, seq=0, ack=0, flags=TCP_SYN, window=64240,
                  options=opts),
        LINKTYPE_ETHERNET,
    )
    assert (pkt.mss, pkt.wscale, pkt.sack_perm, pkt.tsval, pkt.tsecr) == (1400, 9, True, 11, 22)


def test_icmpv4_port_unreachable_quotes_the_datagram() -> None:
    original = udp_frame(src=A4, dst=B4, sport=5353, dport=53, payload_len=1000,
                         src_mac=mac("02:00:00:00:00:0a"), dst_mac=mac("02:00:00:00:00:0b"))
    err = icmp_error_frame(original, type=3, code=3, ttl=55, ip_id=9)
    p = Ether(err)
    assert (p.src, p.dst) == ("02:00:00:00:00:0b", "02:00:00:00:00:0a")  # sent back
    assert (p[IP].src, p[IP].dst, p[ICMP].type, p[ICMP].code) == ("198.51.100.7", "10.0.0.1", 3, 3)
    assert len(p[IP]) == 576  # the quote is cut so that the error fits 576 bytes
    assert (p[IPerror].dst, p[UDPerror].dport) == ("198.51.100.7", 53)
    assert scapy_checksums_ok(err)
    inner = parse(err, LINKTYPE_ETHERNET).inner
    assert inner is not None and inner.dport == 53


def test_icmp_frag_needed_and_v6_packet_too_big_carry_the_mtu() -> None:
    v4 = tcp_frame(src=A4, dst=B4, sport=1, dport=80, seq=0, ack=0, flags=TCP_ACK, window=1,
                   payload_len=1400)
    p = Ether(icmp_error_frame(v4, type=3, code=4, mtu=1400, src=ipaddress.ip_address(
        "192.0.2.254").packed))
    assert (p[ICMP].nexthopmtu, p[IP].src, p[TCPerror].dport) == (1400, "192.0.2.254", 80)
    v6 = udp_frame(src=A6, dst=B6, sport=1, dport=2, payload_len=1400)
    err6 = icmp_error_frame(v6, type=2, code=0, mtu=1280)
    p6 = Ether(err6)
    assert p6[ICMPv6PacketTooBig].mtu == 1280
    assert len(p6[IPv6]) == 1280  # RFC 4443: as much of the original as fits the minimum MTU
    assert scapy_checksums_ok(err6)


def test_icmpv6_echo() -> None:
    frame = icmp_echo_frame(src=A6, dst=B6, ident=7, seq=3, payload=b"abc")
    p = Ether(frame)
    assert (p[ICMPv6EchoRequest].id, p[ICMPv6EchoRequest].seq) == (7, 3)
    assert verify_checksums(parse(frame, LINKTYPE_ETHERNET)) is True


def test_filler_is_deterministic_and_sized() -> None:
    assert filler(100) == filler(100)
    assert len(filler(1448, 70000)) == 1448
    assert filler(10, 5) == filler(15)[5:]
    assert filler(0) == b""


@settings(max_examples=300)
@given(
    v6=st.booleans(),
    addresses=st.binary(min_size=32, max_size=32),
    ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    seq=st.integers(0, 2**33), ack=st.integers(0, 2**33), flags=st.integers(0, 255),
    window=st.integers(0, 65535), ip_id=st.integers(0, 2**17), ttl=st.integers(0, 255),
    df=st.booleans(), flow_label=st.integers(0, 2**21),
    vlan=st.one_of(st.none(), st.integers(0, 4095)),
    options=st.sampled_from([b"", tcp_options(mss=1460), tcp_options(
        mss=1380, wscale=7, sack_perm=True, timestamps=(1, 2)), tcp_options(sack=((5, 9),))]),
    payload=st.binary(max_size=1500),
)
def test_a_framer_builds_what_tcp_frame_builds(
    v6: bool, addresses: bytes, ports: tuple[int, int], seq: int, ack: int, flags: int,
    window: int, ip_id: int, ttl: int, df: bool, flow_label: int, vlan: int | None,
    options: bytes, payload: bytes,
) -> None:
    """The generator's framer is tcp_frame, byte for byte (zero addresses included: its
    checksums add the shared part as a number, where an all-zero sum is the edge)."""
    n = 16 if v6 else 4
    src, dst = addresses[:n], addresses[16:16 + n]
    fixed = {"src": src, "dst": dst, "sport": ports[0], "dport": ports[1],
             "src_mac": b"\x02" * 6, "dst_mac": b"\x04" * 6, "ttl": ttl, "df": df,
             "flow_label": flow_label, "vlan": vlan}
    each = {"seq": seq, "ack": ack, "flags": flags, "window": window, "options": options,
            "payload": payload, "ip_id": ip_id}
    assert TcpFramer(**fixed).frame(**each) == tcp_frame(**fixed, **each)


def test_a_framer_agrees_where_a_sum_wraps_to_zero() -> None:
    """The one ID (and the one window) whose header sums are multiples of 0xFFFF: the
    checksum is 0x0000 there, not 0xFFFF (tcp_frame's, from RFC 1071's sum)."""
    framer = TcpFramer(src=A4, dst=B4, sport=1, dport=2)

    def build(ip_id: int, window: int) -> bytes:
        return tcp_frame(src=A4, dst=B4, sport=1, dport=2, seq=0, ack=0, flags=TCP_ACK,
                         window=window, ip_id=ip_id)

    ip_id = next(i for i in range(1 << 16) if build(i, 0)[24:26] == b"\0\0")
    window = next(w for w in range(1 << 16) if build(0, w)[50:52] == b"\0\0")
    for i, w in ((ip_id, 0), (0, window)):
        assert framer.frame(seq=0, ack=0, flags=TCP_ACK, window=w, ip_id=i) == build(i, w)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: tcp_options(wscale=15), "window scale"),
        (lambda: tcp_options(sack=((1, 2),) * 5), "exceed 40"),
        (lambda: ip_frame(src=A4, dst=B6, proto=17, l4=b""), "different IP versions"),
        (lambda: ip_frame(src=b"\x01", dst=b"\x02", proto=17, l4=b""), "neither IPv4 nor IPv6"),
        (lambda: udp_frame(src=A4, dst=B4, sport=1, dport=2, vlan=4096), "VLAN id"),
        (lambda: udp_frame(src=A4, dst=B4, sport=1, dport=2, payload=bytes(65520)), "65535"),
        (lambda: icmp_error_frame(b"\x00" * 14, type=3, code=3), "no complete IP header"),
        (lambda: icmp_error_frame(b"\x00", type=3, code=3), "shorter than an Ethernet"),
        (lambda: filler(70000), "filler length"),
        (lambda: mac("02:00"), "not a MAC"),
        (
            lambda: tcp_frame(src=A4, dst=B4, sport=1, dport=2, seq=0, ack=0, flags=0, window=0,
                              options=b"\x01"),
            "not padded",
        ),
        (lambda: TcpFramer(src=A4, dst=B6, sport=1, dport=2), "different IP versions"),
        (lambda: TcpFramer(src=A4, dst=B4, sport=1, dport=2).frame(
            seq=0, ack=0, flags=0, window=0, options=b"\x01"), "not padded"),
        (lambda: TcpFramer(src=A4, dst=B4, sport=1, dport=2).frame(
            seq=0, ack=0, flags=0, window=0, payload=bytes(65500)), "65535"),
    ],
)
def test_impossible_frames_are_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_the_checksum_oracle_catches_a_flipped_byte() -> None:
    frame = bytearray(udp_frame(src=A4, dst=B4, sport=1, dport=2, payload=b"payload"))
    frame[-1] ^= 0x01
    assert not scapy_checksums_ok(bytes(frame))
    assert verify_checksums(parse(frame, LINKTYPE_ETHERNET)) is False
