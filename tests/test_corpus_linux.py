"""flowshift against the real Linux LB gateway (shared/corpus/real), packet by packet.

The capture's router ran nftables: `dnat to numgen inc mod 2` per family (a round robin over
new connections), a stateful forward filter and masquerade. lb-gateway.toml states the same
policy; with `scheduler = "round-robin"` on both pools it is the same policy. For every
packet that entered the router, linux_verdicts.csv says whether Linux forwarded it and how
it rewrote the 5-tuple, and linux_output.pcap holds the packet as it left.

Agreement on this corpus: all 22479 verdicts; all 22441 rewritten 5-tuples; every forwarded
packet byte for byte from its IP header to the end of the capture (TCP checksums included).
The exceptions are the justified differences, listed here and in NOT_FORWARDED:

- Linux routes, so it decrements TTL / hop limit (and so changes the IPv4 header checksum)
  and writes new MAC addresses. A flowshift host steers frames between the wire and a
  machine without routing them, so those bytes stay as they came.
- What Linux consumes itself (ARP, neighbour discovery, pings and junk addressed to the
  router) has no forwarded counterpart. flowshift drops it in the firewall or passes it by
  as no machine's traffic (bypass). The machine, like the router, keeps it to itself, so it
  does not cross the gateway: "not forwarded" either way.
"""

from __future__ import annotations

import csv
import ipaddress
import tomllib
from dataclasses import dataclass

import pytest

from flowshift import channel
from flowshift.config import parse_config
from flowshift.host import PacketResult
from flowshift.packet.checksum import ones_sum
from flowshift.packet.parse import parse
from flowshift.packet.pcap import open_trace
from flowshift.packet.view import LINKTYPE_ETHERNET, Packet
from flowshift.verdict import Verdict
from hosttools import REAL, run

pytestmark = pytest.mark.skipif(
    not (REAL / "linux_verdicts.csv").is_file(), reason=f"real corpus absent: {REAL}"
)

# Why a packet Linux did not forward is not forwarded by flowshift either, by
# (part, flowshift verdict, reason). Anything else not forwarded is a mismatch.
NOT_FORWARDED = {
    ("arp", "bypass", "not-ip"): "ARP is not IP: the host passes it by; the router answered it",
    ("nd", "bypass", "no-machine"): (
        "ND and router solicitations between link-local or multicast addresses and the "
        "client's: no machine's address (Linux: a router never forwards link-scope traffic)"
    ),
    ("nd", "drop", "default"): (
        "ND from a backend's global address to the router (link-local or solicited-node "
        "multicast): machine egress that no rule allows (Linux: consumed by the input chain)"
    ),
    ("4-blocked-ssh", "drop", "default"): (
        "SYN to VIP:22: no pool, no rule (Linux: no DNAT, so router-local, input chain drop)"
    ),
    ("6-icmpv6-echo", "drop", "default"): (
        "echo request to the router's own address: no rule (Linux answers it itself)"
    ),
    ("7-junk", "drop", "default"): (
        "bare ACK to a VIP port without a pool: picked up as new (tcp_loose), no rule "
        "(Linux: new, router-local, input chain drop)"
    ),
    ("7-junk", "drop", "invalid"): (
        "RST or RST|ACK of no connection: invalid (Linux: `ct state invalid drop`)"
    ),
}
# these parts are deterministic; ND traffic varies between runs of make_real.sh
ALWAYS_SEEN = {k for k in NOT_FORWARDED if k[0] != "nd"}

EGRESS_PART, EGRESS_PORT = "5-egress-443", 44000


def _handoff_carries_lb_state() -> bool:
    return "lb_state" in channel.Handoff.__struct_fields__


needs_lb_handoff = pytest.mark.skipif(
    not _handoff_carries_lb_state(),
    reason="the machine->VNIC handoff does not carry LoadBalancer.state() yet",
)

# (start tier, offload policy). A machine that starts on its own tier hands its chain to the
# VNIC mid-run under "always" and "elephant": the round-robin position must move with it.
SCHEDULES = [
    pytest.param(("machine", "never"), id="machine-never"),
    pytest.param(("vnic", "always"), id="vnic-always"),
    pytest.param(("vnic", "elephant"), id="vnic-elephant"),
    pytest.param(("machine", "always"), id="machine-always", marks=needs_lb_handoff),
    pytest.param(("machine", "elephant"), id="machine-elephant", marks=needs_lb_handoff),
]


@dataclass(frozen=True)
class Linux:
    rows: list[dict[str, str]]  # linux_verdicts.csv, one per replay_input packet
    output: list[Packet]  # linux_output.pcap, parsed


@pytest.fixture(scope="module")
def linux() -> Linux:
    with (REAL / "linux_verdicts.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    with open_trace(REAL / "linux_output.pcap") as frames:
        output = [parse(bytearray(fr.data), fr.linktype, fr.wire_len) for fr in frames]
    return Linux(rows, output)


@pytest.fixture(scope="module", params=SCHEDULES)
def ours(request: pytest.FixtureRequest) -> list[PacketResult]:
    start, policy = request.param
    data = tomllib.loads((REAL / "lb-gateway.toml").read_text())
    (machine,) = data["machine"]
    machine["start"] = start
    for pool in machine["lb"]:
        pool["scheduler"] = "round-robin"  # nftables `numgen inc mod 2`
    cfg = parse_config(data, "lb-gateway.toml, round robin")
    results = run(REAL / "replay_input.pcap", cfg, policy=policy).results
    if policy != "never":
        assert any(r.tier == "pnic" for r in results)
    return results


def _parsed(result: PacketResult) -> Packet:
    assert result.data is not None
    return parse(bytearray(result.data), LINKTYPE_ETHERNET, result.wire_len)


def _tuple(pkt: Packet) -> tuple[str, int, str, int, int]:
    src, dst = ipaddress.ip_address(pkt.src), ipaddress.ip_address(pkt.dst)
    return str(src), pkt.sport, str(dst), pkt.dport, pkt.proto


def _linux_tuple(row: dict[str, str]) -> tuple[str, int, str, int, int]:
    return (
        row["out_src"],
        int(row["out_sport"]),
        row["out_dst"],
        int(row["out_dport"]),
        int(row["out_proto"]),
    )


def _show(mismatches: list[str]) -> str:
    return f"{len(mismatches)} mismatches, first: " + "; ".join(mismatches[:5])


def test_every_packet_gets_linuxs_verdict(linux: Linux, ours: list[PacketResult]) -> None:
    assert [r.index for r in ours] == [int(row["input_index"]) for row in linux.rows]
    mismatches = []
    seen = set()
    for row, res in zip(linux.rows, ours, strict=True):
        forwarded = res.verdict == Verdict.FORWARD
        if row["verdict"] == "forward":
            if not forwarded:
                mismatches.append(f"#{res.index} {row['part']}: Linux forward, ours {res.reason}")
            continue
        assert row["verdict"] == "drop"
        why = (row["part"], res.verdict.label, res.reason)
        if forwarded or why not in NOT_FORWARDED:
            mismatches.append(f"#{res.index} {row['note']}: ours {why}")
        seen.add(why)
    assert not mismatches, _show(mismatches)
    assert seen >= ALWAYS_SEEN


def test_forwarded_packets_leave_with_linuxs_5_tuple(
    linux: Linux, ours: list[PacketResult]
) -> None:
    # covers the backend choice: the first SYN of each connection goes where numgen sent it
    mismatches = []
    for row, res in zip(linux.rows, ours, strict=True):
        if row["verdict"] == "forward" and res.verdict == Verdict.FORWARD:
            got, want = _tuple(_parsed(res)), _linux_tuple(row)
            if got != want:
                mismatches.append(f"#{res.index} {row['part']}: ours {got}, Linux {want}")
    assert not mismatches, _show(mismatches)


def test_forwarded_packets_match_linux_output_bytes(linux: Linux, ours: list[PacketResult]) -> None:
    """IP header (but TTL / hop limit and the IPv4 checksum) to the end of the capture."""
    mismatches = []
    for row, res in zip(linux.rows, ours, strict=True):
        if row["verdict"] != "forward" or res.verdict != Verdict.FORWARD:
            continue
        mine, theirs = _parsed(res), linux.output[int(row["output_index"])]
        a, b = bytearray(mine.data[mine.l3 :]), bytearray(theirs.data[theirs.l3 :])
        if mine.family == 4:
            if ones_sum(a[: (a[0] & 0xF) * 4]) != 0xFFFF:
                mismatches.append(f"#{res.index}: bad IPv4 header checksum")
            a[8] = b[8] = 0  # TTL
            a[10:12] = b[10:12] = bytes(2)  # header checksum, which covers the TTL
        else:
            a[7] = b[7] = 0  # hop limit
        if a != b:
            mismatches.append(f"#{res.index} {row['part']}: bytes differ from Linux output")
    assert not mismatches, _show(mismatches)


def test_egress_443_keeps_its_source_port(linux: Linux, ours: list[PacketResult]) -> None:
    """Linux's masquerade kept the free port 44000; flowshift's SNAT keeps it too."""
    ports = []
    for row, res in zip(linux.rows, ours, strict=True):
        if row["part"] != EGRESS_PART:
            continue
        assert res.verdict == Verdict.FORWARD, f"#{res.index}: {res.reason}"
        pkt = _parsed(res)
        outbound = res.direction == "egress"
        src = "198.51.100.1" if outbound else "198.51.100.2"  # masqueraded / the client
        assert pkt.src == ipaddress.ip_address(src).packed
        ports.append(pkt.sport if outbound else pkt.dport)
    assert len(ports) > 100
    assert set(ports) == {EGRESS_PORT}
