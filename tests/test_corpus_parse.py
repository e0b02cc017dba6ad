"""parse() over real captures: tcpdump's own test corpus (many deliberately malformed frames) and
the real traffic through a Linux load-balancer gateway. Nothing may raise; the reasons given must
be the expected ones where the capture is known."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from flowshift.flow import PROTO_ICMPV6, PROTO_TCP
from flowshift.packet.parse import parse, verify_checksums
from flowshift.packet.pcap import TraceError, open_trace
from flowshift.packet.view import Packet, ParseError

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
TCPDUMP = CORPUS / "tcpdump"
REAL = CORPUS / "real"

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"capture corpus absent: {CORPUS}")


def parsed_frames(path: Path):
    """(frame, packet) for every frame of a trace; TraceError if it is not a trace."""
    with open_trace(path) as trace:
        for frame in trace:
            pkt = parse(frame.data, frame.linktype, frame.wire_len)
            check_bounds(pkt)
            verify_checksums(pkt)
            yield frame, pkt


def check_bounds(pkt: Packet) -> None:
    n = len(pkt.data)
    for view in (pkt, pkt.inner):
        if view is not None:
            assert view.l3 < 0 or view.l3 + (20 if view.family == 4 else 40) <= n
            assert view.l4 < 0 or view.l4 + 8 <= n


def test_tcpdump_corpus_parses():
    reasons: Counter[ParseError] = Counter()
    by_file: dict[str, Counter[ParseError]] = {}
    not_traces = []
    for path in sorted(TCPDUMP.iterdir()):
        counts: Counter[ParseError] = Counter()
        try:
            for _frame, pkt in parsed_frames(path):
                counts[pkt.error] += 1
        except TraceError:
            not_traces.append(path.name)
        by_file[path.name] = counts
        reasons.update(counts)
    total = sum(reasons.values())
    assert len(by_file) > 800 and total > 5_000
    assert len(not_traces) < 10, not_traces
    # a zoo of protocols, mostly well-formed, with every kind of trouble represented
    not_tracked = (
        ParseError.NOT_IP,
        ParseError.UNSUPPORTED_PROTOCOL,
        ParseError.UNKNOWN_LINKTYPE,
        ParseError.UNKNOWN_ETHERTYPE,
    )
    assert reasons[ParseError.OK] > 0.3 * total
    assert reasons[ParseError.OK] + sum(reasons[r] for r in not_tracked) > 0.97 * total
    for reason in (
        ParseError.NOT_IP,
        ParseError.UNKNOWN_LINKTYPE,
        ParseError.UNKNOWN_ETHERTYPE,
        ParseError.TRUNCATED_L2,
        ParseError.TRUNCATED_IP,
        ParseError.TRUNCATED_L4,
        ParseError.BAD_IP_VERSION,
        ParseError.BAD_IP_TOTAL_LENGTH,
        ParseError.BAD_UDP_LENGTH,
        ParseError.UNSUPPORTED_PROTOCOL,
    ):
        assert reasons[reason] > 0, reason.label
    assert reasons[ParseError.BAD_CHECKSUM] == 0
    # files whose content their names tell
    assert by_file["LINKTYPE_IPV4.pcap"] == {ParseError.OK: 1}
    assert by_file["LINKTYPE_IPV6.pcap"] == {ParseError.OK: 1}
    assert by_file["LINKTYPE_RAW_ipv4.pcap"] == {ParseError.OK: 1}
    assert by_file["LINKTYPE_RAW_ipv6.pcap"] == {ParseError.OK: 1}
    assert by_file["LINKTYPE_IPV4_invalid.pcap"] == {ParseError.BAD_IP_VERSION: 1}
    assert by_file["LINKTYPE_IPV6_invalid.pcap"] == {ParseError.BAD_IP_VERSION: 1}
    assert by_file["ipv6_jumbogram_1.pcap"] == {ParseError.OK: 1}
    assert by_file["ipv6_missing_jumbo_payload_option.pcap"] == {ParseError.BAD_IP_TOTAL_LENGTH: 1}
    assert by_file["ipv4_invalid_hdr_length.pcap"] == {ParseError.BAD_IP_HEADER_LENGTH: 1}
    assert set(by_file["802_15_4-data.pcap"]) == {ParseError.UNKNOWN_LINKTYPE}


def test_tcpdump_qinq_tags():
    frames = list(parsed_frames(TCPDUMP / "802.1ad_QinQ.pcap"))
    assert frames
    for _frame, pkt in frames:
        assert pkt.error == ParseError.NOT_IP  # ARP inside 802.1ad + 802.1Q
        assert len(pkt.vlans) == 2 and pkt.ethertype == 0x0806


# frame classes of the real captures, counted by tshark (real/README.md)
REAL_CLASSES = {
    "replay_input.pcap": {"tcp4": 15023, "tcp6": 7435, "icmp6": 17, "arp": 4},
    "linux_output.pcap": {"tcp4": 15009, "tcp6": 7432, "icmp6": 14, "arp": 4},
    "inside.pcap": {"tcp4": 15009, "tcp6": 7432, "icmp6": 14, "arp": 4},
    "outside.pcap": {"tcp4": 15023, "tcp6": 7435, "icmp6": 17, "arp": 4},
}


@pytest.mark.parametrize("name", sorted(REAL_CLASSES))
def test_real_gateway_traffic(name):
    classes: Counter[str] = Counter()
    checks: Counter[bool | None] = Counter()
    for frame, pkt in parsed_frames(REAL / name):
        if pkt.error == ParseError.NOT_IP:
            assert pkt.ethertype == 0x0806
            classes["arp"] += 1
            continue
        assert pkt.error == ParseError.OK, (frame.ts_ns, pkt.error.label)
        if pkt.proto == PROTO_TCP:
            classes[f"tcp{pkt.family}"] += 1
            assert pkt.tcp_hlen >= 20 and pkt.sport and pkt.dport
            assert pkt.l4 + pkt.tcp_hlen <= len(pkt.data)  # snaplen 160 keeps headers whole
        elif pkt.proto == PROTO_ICMPV6:
            classes["icmp6"] += 1
        checks[verify_checksums(pkt)] += 1
    assert dict(classes) == REAL_CLASSES[name]
    # real stacks, no offloads: every checksum that can be checked is right
    assert checks[False] == 0
    assert checks[True] > 1000
