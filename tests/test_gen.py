"""The traffic generator: determinism, valid checksums (scapy as the oracle on a sample), TCP
invariants per connection, the shares asked for, attack traffic, tshark's expert analysis, and
the `gen-trace` command."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowshift.cli import main
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.gen import GenSummary, TraceSpec, generate, parse_networks, parse_ports
from flowshift.packet.parse import parse, verify_checksums
from flowshift.packet.pcap import open_trace
from flowshift.packet.view import (
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Packet,
    ParseError,
)
from test_build import scapy_checksums_ok

FAR = 1 << 28  # an injected segment lands at least this far from the expected sequence


@dataclass
class Trace:
    path: Path
    summary: GenSummary
    packets: list[tuple[int, Packet]]


def read(path: Path) -> list[tuple[int, Packet]]:
    with open_trace(path) as reader:
        return [(f.ts_ns, parse(f.data, f.linktype, f.wire_len)) for f in reader]


def make(tmp_path_factory: pytest.TempPathFactory, name: str, spec: TraceSpec) -> Trace:
    path = tmp_path_factory.mktemp("gen") / f"{name}.pcap"
    summary = generate(spec, path)
    return Trace(path, summary, read(path))


BASE = TraceSpec(flows=400, duration_s=4.0, seed=7, elephants=2, ipv6_share=0.3, udp_share=0.2)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    return make(tmp_path_factory, "base", BASE)


@pytest.fixture(scope="module")
def oow(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    spec = TraceSpec(flows=200, duration_s=2.0, seed=3, attack="out-of-window", attack_flows=15)
    return make(tmp_path_factory, "oow", spec)


def flows_of(packets: list[tuple[int, Packet]]) -> dict[FlowKey, list[Packet]]:
    """Packets per flow (both directions), in capture order."""
    flows: dict[FlowKey, list[Packet]] = defaultdict(list)
    for _, pkt in packets:
        if pkt.inner is not None:  # an ICMP error belongs to the flow it quotes
            flows[pkt.inner.key().canonical()].append(pkt)
        else:
            flows[pkt.key().canonical()].append(pkt)
    return flows


def tcp_problem(pkts: list[Packet]) -> str | None:
    """The first way this connection breaks TCP as a capture point near the client sees it,
    or None. Checks: the three-way handshake first (MSS, window scale and SACK-permitted on
    both SYNs); contiguous sequence numbers per direction (no gap, no retransmission); ACKs
    that never go back and never acknowledge unseen data; data never beyond the right edge
    the receiver advertised last; data segments within the MSS; FIN/RST last."""
    syn, synack, ack = pkts[0], pkts[1], pkts[2]
    if syn.flags != TCP_SYN or synack.flags != TCP_SYN | TCP_ACK or ack.flags != TCP_ACK:
        return "no three-way handshake"
    if synack.ack != (syn.seq + 1) & 0xFFFFFFFF or ack.ack != (synack.seq + 1) & 0xFFFFFFFF:
        return "handshake acknowledges the wrong sequence numbers"
    if min(syn.wscale, synack.wscale) < 0 or not (syn.sack_perm and synack.sack_perm):
        return "window scaling or SACK not negotiated"
    if syn.mss == 0 or synack.mss == 0:
        return "SYN without MSS"
    client = syn.src
    ts = syn.tsval >= 0
    wscale = {True: syn.wscale, False: synack.wscale}  # keyed by "sent by the client"
    mss = {True: synack.mss - 12 * ts, False: syn.mss - 12 * ts}  # what each end may send
    nxt = {True: syn.seq + 1, False: synack.seq + 1}  # next sequence number, unwrapped
    acked = {True: 0, False: syn.seq + 1}  # highest ACK sent, unwrapped
    # right edge each end advertised (in its peer's sequence space); SYN windows are unscaled
    right = {True: 0, False: syn.seq + 1 + synack.window}
    fins: set[bool] = set()
    closed = False
    for i, p in enumerate(pkts[2:], start=2):
        if closed:
            return f"packet {i} after the connection closed"
        me = p.src == client
        distance = (p.seq - nxt[me]) & 0xFFFFFFFF
        if distance:
            far = min(distance, (1 << 32) - distance) >= FAR
            return f"packet {i}: sequence {'outside the window' if far else 'gap'}"
        if (p.tsval >= 0) != ts:
            return f"packet {i}: timestamps option not as negotiated"
        if p.flags & TCP_ACK:
            # unwrapped, at most what the peer sent: acknowledging unseen data wraps far back
            ack = nxt[not me] - ((nxt[not me] - p.ack) & 0xFFFFFFFF)
            if ack < acked[me]:
                return f"packet {i}: ACK goes back or acknowledges unseen data"
            acked[me] = ack
            right[me] = max(right[me], ack + (p.window << wscale[me]))
        if p.payload_len > mss[me]:
            return f"packet {i}: {p.payload_len} bytes exceed the MSS {mss[me]}"
        if nxt[me] + p.payload_len > right[not me]:
            return f"packet {i}: data beyond the receiver's advertised window"
        if p.flags & TCP_RST:
            closed = True
            continue
        nxt[me] += p.payload_len + bool(p.flags & TCP_FIN)
        if p.flags & TCP_FIN:
            fins.add(me)
        elif len(fins) == 2 and p.payload_len == 0:
            closed = True  # the last ACK
    return None if closed else "connection neither closed by FIN handshake nor reset"


def test_packets_are_in_time_order_and_parse(base: Trace) -> None:
    times = [ts for ts, _ in base.packets]
    assert times == sorted(times)
    assert len(base.packets) == base.summary.packets > 10_000
    assert all(p.error is ParseError.OK for _, p in base.packets)
    assert sum(len(p.data) for _, p in base.packets) == base.summary.bytes


def test_every_checksum_is_valid(base: Trace) -> None:
    assert all(verify_checksums(p) is True for _, p in base.packets)
    # scapy as an independent oracle, on every 50th frame and every non-TCP frame
    sample = [p for i, (_, p) in enumerate(base.packets) if i % 50 == 0 or p.proto != PROTO_TCP]
    assert all(scapy_checksums_ok(bytes(p.data)) for p in sample)


def test_tcp_connections_obey_tcp(base: Trace) -> None:
    tcp = {k: v for k, v in flows_of(base.packets).items() if k.proto == PROTO_TCP}
    assert len(tcp) == base.summary.flows["tcp"] + base.summary.flows["elephant"]
    problems = {str(k): tcp_problem(v) for k, v in tcp.items()}
    assert {k: v for k, v in problems.items() if v} == {}


def test_tcp_checker_catches_broken_connections(base: Trace) -> None:
    conn = max(
        (v for k, v in flows_of(base.packets).items() if k.proto == PROTO_TCP), key=len
    )
    assert tcp_problem(conn) is None
    assert tcp_problem(conn[:3] + conn[4:]) is not None  # a segment lost
    assert tcp_problem(conn[:-1]) is not None  # not closed
    assert tcp_problem(conn[1:]) == "no three-way handshake"


def test_elephants_carry_most_bytes(base: Trace) -> None:
    s = base.summary
    assert s.flows["elephant"] == 2
    assert s.elephant_byte_share >= 0.8
    # the same, measured from the trace: the two biggest flows
    sizes = sorted(sum(len(p.data) for p in v) for v in flows_of(base.packets).values())
    assert sum(sizes[-2:]) / s.bytes >= 0.8
    lengths = sorted(len(v) for v in flows_of(base.packets).values())
    assert lengths[-2] >= 2000  # an elephant is thousands of packets long


def test_shares_are_roughly_honoured(base: Trace) -> None:
    flows = flows_of(base.packets)
    mice = [k for k in flows if k.proto != PROTO_TCP or len(flows[k]) < 2000]
    udp = sum(k.proto == PROTO_UDP for k in mice)
    assert abs(udp / len(mice) - 0.2) < 0.07
    v6 = sum(k.family == 6 for k in flows)
    assert abs(v6 / len(flows) - 0.3) < 0.08
    pings = [k for k in flows if k.proto in (PROTO_ICMP, PROTO_ICMPV6)]
    assert {k.family for k in pings} == {4, 6}  # ICMPv6 echo for IPv6 pings
    assert len(flows) == sum(base.summary.flows.values())


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    spec = TraceSpec(flows=60, duration_s=1.0, seed=11, elephants=1, attack="out-of-window")
    paths = [tmp_path / "a.pcap", tmp_path / "b.pcap", tmp_path / "c.pcap"]
    generate(spec, paths[0])
    generate(spec, paths[1])
    generate(TraceSpec(**{**spec.__dict__, "seed": 12}), paths[2])
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c


def test_syn_flood(tmp_path: Path) -> None:
    spec = TraceSpec(flows=50, duration_s=1.0, seed=5, attack="syn-flood", attack_flows=300,
                     clients=parse_networks("10.0.0.0/16,fd00::/64"))
    path = tmp_path / "flood.pcap"
    summary = generate(spec, path)
    assert summary.attack_packets == 300
    assert summary.flows["syn-flood"] == 1
    flows = flows_of(read(path))
    half_open = [v for v in flows.values() if v[0].flags == TCP_SYN and len(v) == 1]
    assert len(half_open) >= 295  # spoofed: no answers, nearly every source new
    assert len({(v[0].dst, v[0].dport) for v in half_open}) == 1  # one server port
    assert len({v[0].src for v in half_open}) > 200
    net = ipaddress.ip_network("10.0.0.0/16")  # spoofed from anywhere in the client networks
    assert all(ipaddress.ip_address(v[0].src) in net for v in half_open)


def test_out_of_window_attack(oow: Trace) -> None:
    assert oow.summary.attacked_flows == 15
    assert oow.summary.attack_packets >= 15 * 3
    tcp = [v for k, v in flows_of(oow.packets).items() if k.proto == PROTO_TCP]
    problems = [tcp_problem(v) for v in tcp]
    bad = [p for p in problems if p]
    assert len(bad) == 15
    assert all("outside the window" in p for p in bad)


def run_tshark(path: Path, display_filter: str) -> list[str]:
    out = subprocess.run(
        [
            "tshark", "-n", "-r", str(path),
            # verify every checksum too: off by default in Wireshark
            "-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
            "-o", "udp.check_checksum:TRUE",
            "-Y", display_filter,
            "-T", "fields", "-e", "frame.number", "-e", "_ws.expert.message",
        ],
        capture_output=True, text=True, timeout=300, check=True,
    )
    return out.stdout.splitlines()


# Wireshark's expert warnings and TCP analysis flags: malformed packets, bad checksums, every
# sequence-analysis finding (segment not captured, ACKed unseen, out-of-order, retransmission,
# duplicate ACK, window full, zero window, ...). Wireshark also warns about every RST, and the
# generator closes about a tenth of its connections with one: those are the only findings
# allowed.
PROBLEMS = "_ws.malformed || _ws.expert.severity >= warning || tcp.analysis.flags"
RST = "Connection reset (RST)"


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_finds_nothing_wrong(base: Trace, oow: Trace) -> None:
    findings = [line.split("\t", 1)[1] for line in run_tshark(base.path, PROBLEMS)]
    assert [f for f in findings if f != RST] == []
    resets = sum(p.flags & TCP_RST != 0 for _, p in base.packets)
    assert 0 < len(findings) == resets < base.summary.flows["tcp"] / 4
    # the same filter does see the invalid traffic of an attack
    findings = [line.split("\t", 1)[1] for line in run_tshark(oow.path, PROBLEMS)]
    assert len([f for f in findings if f != RST]) >= 15


def test_spec_refuses_bad_values() -> None:
    cases = {
        "flows must be": {"flows": 0},
        "duration": {"duration_s": 0},
        "elephants must": {"elephants": 500},
        "udp share": {"udp_share": 1.5},
        "exceed 1": {"udp_share": 0.6, "icmp_share": 0.6},
        "attack must": {"attack": "smurf"},
        "mtu": {"mtu": 500},
        "vlan": {"vlan": 5000},
        "no server network": {"servers": ()},
        "no client network is IPv6": {
            "clients": parse_networks("10.0.0.0/24"), "ipv6_share": 0.5,
        },
        "no server network is IPv4": {
            "servers": parse_networks("2001:db8::/64"), "ipv6_share": 0.5,
        },
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            TraceSpec(**{"flows": 400, "duration_s": 1.0, **bad})


def test_ipv6_share_defaults_to_what_the_pools_allow() -> None:
    v4 = TraceSpec(flows=1, duration_s=1, clients=parse_networks("10.1.0.0/16"))
    assert v4.v6_share == 0.0
    v6 = TraceSpec(flows=1, duration_s=1, clients=parse_networks("fd00::1"),
                   servers=parse_networks("2001:db8::/64"))
    assert v6.v6_share == 1.0
    assert TraceSpec(flows=1, duration_s=1).v6_share == 0.2


def test_parse_helpers() -> None:
    assert parse_networks("10.0.0.5, fd00::/64") == (
        ipaddress.ip_network("10.0.0.5/32"), ipaddress.ip_network("fd00::/64"),
    )
    assert parse_ports("80,8080") == (80, 8080)
    for text in ("", "10.0.0.0/33", "nonsense"):
        with pytest.raises(ValueError):
            parse_networks(text)
    for text in ("0", "65536", "http"):
        with pytest.raises(ValueError, match="port"):
            parse_ports(text)


def test_one_client_address_and_vlan(tmp_path: Path) -> None:
    path = tmp_path / "one.pcap"
    spec = TraceSpec(flows=80, duration_s=1.0, seed=2, clients=parse_networks("192.0.2.9"),
                     servers=parse_networks("203.0.113.0/30"), vlan=7)
    generate(spec, path)
    packets = read(path)
    assert {p.vlans for _, p in packets} == {(7,)}
    ends = {p.src for _, p in packets} | {p.dst for _, p in packets}
    assert ipaddress.ip_address("192.0.2.9").packed in ends
    assert ends <= {ipaddress.ip_address(f"{a}").packed for a in (
        "192.0.2.9", "203.0.113.1", "203.0.113.2")}
    tcp = [v for k, v in flows_of(packets).items() if k.proto == PROTO_TCP]
    assert all(tcp_problem(v) is None for v in tcp)


# ---------------------------------------------------------------- the command


def test_cli_writes_a_trace_and_summarises(tmp_path: Path) -> None:
    out = tmp_path / "t.pcap"
    result = CliRunner().invoke(main, [
        "gen-trace", str(out), "--flows", "50", "--duration", "1", "--seed", "3",
        "--elephants", "1", "--attack", "syn-flood", "--attack-flows", "20",
        "--clients", "10.9.0.0/24,fd09::/64", "--servers", "203.0.113.0/24,2001:db8:1::/64",
        "--tcp-ports", "80", "--mtu", "1400",
    ])
    assert result.exit_code == 0, result.output
    assert "packets" in result.output and "elephant" in result.output
    assert "attack" in result.output
    packets = read(out)
    tcp = [p for _, p in packets if p.proto == PROTO_TCP]
    assert {p.dport for p in tcp if p.flags == TCP_SYN} == {80}
    assert max(p.mss for p in tcp) == 1360


def test_cli_is_deterministic(tmp_path: Path) -> None:
    args = ["--flows", "30", "--duration", "1", "--seed", "9"]
    for name in ("a", "b"):
        r = CliRunner().invoke(main, ["gen-trace", str(tmp_path / f"{name}.pcap"), *args])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "a.pcap").read_bytes() == (tmp_path / "b.pcap").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flows", "0"], "flows must be at least 1"),
        (["--ipv6-share", "2"], "ipv6 share must be in [0, 1]"),
        (["--clients", "10.0.0.0/33"], "not an IP network"),
        (["--clients", "10.0.0.0/24", "--ipv6-share", "0.5"], "no client network is IPv6"),
        (["--tcp-ports", "http"], "not a port number"),
        (["--elephants", "5", "--flows", "2"], "elephants must be"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, ["gen-trace", str(tmp_path / "x.pcap"), *args])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {result.output.strip()[7:]}"]
    assert message in result.output
    assert not (tmp_path / "x.pcap").exists()


def test_cli_config_supplies_the_clients(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text(
        '[[machine]]\nname = "vm1"\naddresses = ["10.20.0.0/24"]\nservices = ["count"]\n'
    )
    out = tmp_path / "c.pcap"
    result = CliRunner().invoke(
        main, ["gen-trace", str(out), "--flows", "40", "--duration", "1", "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    net = ipaddress.ip_network("10.20.0.0/24")
    sources = {
        ipaddress.ip_address(p.src)
        for _, p in read(out)
        if p.flags == TCP_SYN or (p.proto == PROTO_UDP and p.dport == 53)
    }
    assert sources and all(a in net for a in sources)  # and IPv4 only: the share defaulted to 0


def test_cli_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[[machine]]\nname = 1\n")
    result = CliRunner().invoke(main, ["gen-trace", str(tmp_path / "x.pcap"), "--config",
                                       str(config)])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and "bad.toml" in result.output

