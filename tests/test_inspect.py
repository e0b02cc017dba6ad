"""`flowshift inspect`: the summary of a trace, as a table and as JSON, and its errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowshift.cli import main
from flowshift.commands.inspect import summarize
from flowshift.packet.build import tcp_frame, udp_frame
from flowshift.packet.pcap import PcapWriter
from flowshift.packet.view import TCP_ACK, TCP_SYN

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"

A4, B4 = bytes([10, 0, 0, 1]), bytes([198, 51, 100, 7])
A6, B6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("20010db8" + "00" * 11 + "07")
ARP = bytes(12) + b"\x08\x06" + bytes(28)


def tcp(src: bytes, dst: bytes, sport: int, dport: int, n: int, flags: int = TCP_ACK) -> bytes:
    return tcp_frame(
        src=src, dst=dst, sport=sport, dport=dport, seq=1, ack=1, flags=flags, window=1000,
        payload_len=n,
    )  # fmt: skip


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    """Three flows (one TCP flow seen both ways, one IPv6 TCP flow, one UDP flow), an ARP
    frame, a frame cut inside its IP header and one cut by the snaplen."""
    path = tmp_path / "small.pcap"
    frames = [
        tcp(A4, B4, 40000, 80, 0, TCP_SYN),
        tcp(B4, A4, 80, 40000, 0, TCP_SYN | TCP_ACK),
        tcp(A4, B4, 40000, 80, 100),
        tcp(B4, A4, 80, 40000, 1000),
        tcp(A6, B6, 40001, 443, 10),
        udp_frame(src=A4, dst=B4, sport=5353, dport=53, payload_len=30),
        ARP,
        tcp(A4, B4, 1, 2, 0)[:20],  # 6 bytes of IP header
    ]
    with PcapWriter(path, snaplen=1200) as w:
        for i, f in enumerate(frames):
            w.write(1_000_000_000 + i * 250_000_000, f)
    return path


def test_summary_counts(trace: Path) -> None:
    s = summarize(str(trace))
    assert s.packets == 8 and s.format == "pcap" and s.problem is None
    assert s.duration_s == pytest.approx(1.75)
    assert s.linktypes == {1: 8}
    assert {e.label: n for e, n in s.failures.items()} == {"not-ip": 1, "truncated-ip": 1}
    assert s.flows_by_protocol() == {"tcp": 2, "udp": 1}
    top = s.top_flows()
    assert [(t.packets, str(t.key)) for t in top] == [
        (4, "tcp 10.0.0.1:40000 > 198.51.100.7:80"),  # both directions, named as first seen
        (1, "tcp [fd00::1]:40001 > [2001:db8::7]:443"),
        (1, "udp 10.0.0.1:5353 > 198.51.100.7:53"),
    ]
    assert top[0].bytes == 2 * 54 + 154 + 1054  # wire length, past the snaplen


def test_json_output(trace: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(trace), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["packets"] == 8
    assert doc["bytes"] == sum(t["bytes"] for t in doc["top_flows"]) + 42 + 20
    assert doc["linktypes"] == {"ethernet": 8}
    assert doc["parse_failures"] == {"not-ip": 1, "truncated-ip": 1}
    assert doc["flows"] == {"tcp": 2, "udp": 1}
    assert doc["top_flows"][0] == {
        "flow": "tcp 10.0.0.1:40000 > 198.51.100.7:80",
        "packets": 4,
        "bytes": 1316,
    }
    assert doc["problem"] is None and doc["format"] == "pcap"


def test_table_output(trace: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(trace)])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("packets", "ethernet (8)", "truncated-ip", "not-ip", "flows by protocol"):
        assert text in out
    # addresses in brackets are shown, not taken for markup
    assert "[fd00::1]:40001 > [2001:db8::7]:443" in out


def test_broken_trace_is_summarized_up_to_the_break(trace: Path) -> None:
    content = trace.read_bytes()
    trace.write_bytes(content + struct.pack("<IIII", 9, 0, 1000, 1000) + b"x" * 10)
    result = CliRunner().invoke(main, ["inspect", str(trace), "--json"])
    doc = json.loads(result.output)
    assert result.exit_code == 0 and doc["packets"] == 8
    assert doc["problem"] == (
        f"truncated record at byte {len(content)}: header says 1000 bytes, 10 left"
    )
    table = CliRunner().invoke(main, ["inspect", str(trace)])
    assert "reading stopped early" in table.output and f"byte {len(content)}" in table.output


@pytest.mark.parametrize("as_json", [False, True])
def test_not_a_trace_exits_2_with_one_line(tmp_path: Path, as_json: bool) -> None:
    path = tmp_path / "foo.txt"
    path.write_text("<html>\n")
    result = CliRunner().invoke(main, ["inspect", str(path)] + (["--json"] if as_json else []))
    assert result.exit_code == 2
    assert result.output == (
        f"Error: not a pcap or pcapng trace: {path} (starts with 0x3c68746d)\n"
    )


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope.pcap")])
    assert result.exit_code == 2
    assert result.output.startswith("Error: cannot open trace: ") and result.output.count("\n") == 1


@pytest.mark.skipif(not (CORPUS / "real").is_dir(), reason=f"corpus not found at {CORPUS}")
def test_real_capture() -> None:
    s = summarize(str(CORPUS / "real" / "replay_input.pcap"))
    assert s.problem is None and s.packets > 1000
    assert set(s.linktypes) == {1}
    assert s.flows_by_protocol().get("tcp", 0) > 10
    assert sum(t.packets for t in s.flows.values()) + sum(s.failures.values()) == s.packets


@pytest.mark.skipif(not (CORPUS / "tcpdump").is_dir(), reason=f"corpus not found at {CORPUS}")
def test_pcapng_from_the_corpus_with_unhandled_link_types() -> None:
    """Link types the parser does not handle are reported as such, not guessed."""
    paths = sorted((CORPUS / "tcpdump").glob("*.pcapng"))
    unknown = 0
    for path in paths:
        s = summarize(str(path))
        assert s.packets == sum(s.linktypes.values())
        unknown += sum(n for e, n in s.failures.items() if e.label == "unknown-linktype")
    assert len(paths) >= 40 and unknown > 0
