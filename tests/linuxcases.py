"""Linux's verdicts on the cases in tests/data/linux, and a replay held up against them.

Each case directory holds what entered a Linux router (replay_input.pcap), what it sent
(linux_output.pcap), its verdict and rewritten 5-tuple per input frame (linux_verdicts.csv)
and the same policy as a flowshift host config (host.toml); make_cases.py wrote them and
README.md describes them. `disagreements` compares a replay with Linux as
test_corpus_linux.py does for the shared corpus: the forward / not-forwarded verdict of every
input frame, the 5-tuple a forwarded frame leaves with, and its bytes from the IP header on.
"""

from __future__ import annotations

import csv
import ipaddress
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flowshift.config import HostConfig, parse_config
from flowshift.packet.checksum import ones_sum
from flowshift.packet.parse import parse
from flowshift.packet.pcap import Frame, open_trace
from flowshift.packet.view import LINKTYPE_ETHERNET, Packet
from flowshift.results import PacketResult
from flowshift.verdict import Verdict
from hosttools import run

LINUX = Path(__file__).resolve().parent / "data" / "linux"
CASES = ("frag-order", "frag-reversed", "frag-overlap", "frag-geometry", "frag-memory",
         "frag-expire", "ct-timeout", "ct-tcp", "ct-tcp-strict", "nat-ports", "ttl")
FILES = ("replay_input.pcap", "linux_output.pcap", "linux_verdicts.csv", "host.toml",
         "phases.tsv", "case.json")


@dataclass(frozen=True)
class LinuxCase:
    name: str
    path: Path
    rows: list[dict[str, str]]  # linux_verdicts.csv, one per replay_input frame
    inputs: list[Frame]  # replay_input.pcap
    outputs: list[Frame]  # linux_output.pcap

    @property
    def config(self) -> HostConfig:
        return parse_config(tomllib.loads((self.path / "host.toml").read_text()),
                            str(self.path / "host.toml"))

    def replay(self) -> list[PacketResult]:
        return run(self.path / "replay_input.pcap", self.config).results


@cache
def load(name: str) -> LinuxCase:
    path = LINUX / name
    with (path / "linux_verdicts.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    with open_trace(path / "replay_input.pcap") as frames:
        inputs = list(frames)
    with open_trace(path / "linux_output.pcap") as frames:
        outputs = list(frames)
    return LinuxCase(name, path, rows, inputs, outputs)


def packet(data: bytes, wire_len: int) -> Packet:
    return parse(bytearray(data), LINKTYPE_ETHERNET, wire_len)


def five_tuple(pkt: Packet) -> tuple[str, int | None, str, int | None, int]:
    """Ports only where the frame carries them (a non-first fragment has none)."""
    src, dst = ipaddress.ip_address(pkt.src), ipaddress.ip_address(pkt.dst)
    if pkt.frag_offset:
        return str(src), None, str(dst), None, pkt.proto
    return str(src), pkt.sport, str(dst), pkt.dport, pkt.proto


def linux_tuple(row: dict[str, str], fragment: bool) -> tuple[str, int | None, str,
                                                                int | None, int]:
    def port(text: str) -> int | None:
        return None if fragment or text == "" else int(text)

    return (row["out_src"], port(row["out_sport"]), row["out_dst"], port(row["out_dport"]),
            int(row["out_proto"]))


def comparable_bytes(pkt: Packet) -> bytearray:
    """The datagram from its IP header on, without what routing changes (TTL / hop limit and
    the IPv4 header checksum) and without the IPv6 fragment id, which Linux draws anew when
    it fragments the reassembled datagram again (measured: frag-order, frag-reversed)."""
    b = bytearray(pkt.data[pkt.l3:])
    if pkt.family == 4:
        b[8] = 0
        b[10:12] = bytes(2)
    else:
        b[7] = 0
        if b[6] == 44:  # fragment header right after the fixed header (all these cases)
            b[44:48] = bytes(4)
    return b


def disagreements(case: LinuxCase, results: list[PacketResult]) -> list[str]:
    """Every way the replay differs from Linux, one line each (empty: they agree)."""
    if [r.index for r in results] != [int(row["input_index"]) for row in case.rows]:
        return ["the replay's packets are not the capture's input packets"]
    out = []
    for row, res in zip(case.rows, results, strict=True):
        where = f"#{res.index} {row['part']}"
        forwarded = res.verdict == Verdict.FORWARD
        if (row["verdict"] == "forward") != forwarded:
            out.append(f"{where}: Linux {row['verdict']}, ours {res.verdict.label} "
                       f"({res.reason})")
            continue
        if not forwarded:
            continue
        assert res.data is not None
        mine = packet(res.data, res.wire_len)
        theirs_frame = case.outputs[int(row["output_index"])]
        theirs = packet(theirs_frame.data, theirs_frame.wire_len)
        got, want = five_tuple(mine), linux_tuple(row, bool(mine.frag_offset))
        if got != want:
            out.append(f"{where}: ours {got}, Linux {want}")
        elif mine.family == 4 and ones_sum(mine.data[mine.l3:mine.l3 + 20]) != 0xFFFF:
            out.append(f"{where}: bad IPv4 header checksum")
        elif mine.ttl != theirs.ttl:  # every case's machine routes, as the Linux router does
            out.append(f"{where}: TTL / hop limit {mine.ttl}, Linux {theirs.ttl}")
        elif comparable_bytes(mine) != comparable_bytes(theirs):
            out.append(f"{where}: bytes differ from Linux's output #{row['output_index']}")
    return out
