"""bench/scaling_trace.py, the concurrent-flows trace of the scaling benchmark: frames that parse
with right checksums (scapy as the oracle), the size it promises, flows that all stay open and
take turns, a replay through the benchmark's host that forwards every packet with every flow
established and every SNAT port kept, and distinct translated tuples past one server's ports."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from bench.scaling_trace import MIN_PER_FLOW, PORTS, PUBLIC, check, size_bytes, write_trace

from flowshift.packet.batch import read_batches
from flowshift.packet.parse import parse, verify_checksums
from flowshift.packet.pcap import open_trace
from flowshift.packet.view import TCP_SYN, ParseError
from flowshift.replay import run_replay
from test_build import scapy_checksums_ok

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "bench/offload-host.toml"
FLOWS, PACKETS = 300, 300 * 7 + 150  # a last round of half the flows


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scaling") / "t.pcap"
    info = write_trace(path, FLOWS, PACKETS)
    assert info.packets == PACKETS
    return path


def test_frames_parse_with_right_checksums(trace: Path) -> None:
    with open_trace(trace) as reader:
        frames = [(f.ts_ns, bytes(f.data), f.linktype, f.wire_len) for f in reader]
    assert len(frames) == PACKETS
    assert trace.stat().st_size == size_bytes(FLOWS, PACKETS)
    times = [t for t, *_ in frames]
    assert times == sorted(times) and len(set(times)) == len(times)
    per_flow: Counter[tuple[bytes, int]] = Counter()
    for _, data, linktype, wire_len in frames:
        pkt = parse(bytearray(data), linktype, wire_len)
        assert pkt.error == ParseError.OK
        assert verify_checksums(pkt)
        # a flow is (server, client port): replies go to the SNAT address
        flow = (pkt.dst, pkt.sport) if pkt.src[0] == 10 else (pkt.src, pkt.dport)
        per_flow[flow] += 1
    assert len(per_flow) == FLOWS
    assert set(per_flow.values()) == {7, 8}  # every flow takes its turn in every round
    assert all(scapy_checksums_ok(data) for _, data, *_ in frames[:: PACKETS // 97])


def test_replay_forwards_every_packet_and_keeps_every_flow_established(
        trace: Path, tmp_path: Path) -> None:
    dump = tmp_path / "flows.txt"
    out = tmp_path / "out.pcap"
    report = run_replay(trace, HOST, offload="never", out=out, progress=False,
                        dump_at=3600.0, dump_path=dump)
    assert report["packets"]["forwarded"] == PACKETS
    assert report["flows"]["total"] == FLOWS
    lines = dump.read_text().splitlines()
    assert len(lines) == FLOWS
    assert all(" ESTABLISHED " in line and "[ASSURED]" in line for line in lines)
    with open_trace(trace) as before, open_trace(out) as after:
        for a, b in zip(before, after, strict=True):
            pa = parse(bytearray(a.data), a.linktype, a.wire_len)
            pb = parse(bytearray(b.data), b.linktype, b.wire_len)
            if pa.src[0] == 10:  # SNAT: the client's port is kept, as the trace's replies assume
                assert int.from_bytes(pb.src, "big") == PUBLIC and pb.sport == pa.sport


def test_translated_tuples_stay_distinct_past_one_servers_ports(tmp_path: Path) -> None:
    flows = PORTS + 10
    path = tmp_path / "wide.pcap"
    write_trace(path, flows, MIN_PER_FLOW * flows)
    syn = next(read_batches(path, flows))  # round 0: every flow's SYN
    frames = [syn.frame(i) for i in range(flows)]
    assert all(f[47] == TCP_SYN for f in frames)
    replies = {(f[30:34], f[34:36]) for f in frames}  # (server, client port) the server answers
    assert len(replies) == flows
    servers = np.unique([int.from_bytes(f[30:34], "big") for f in frames])
    assert len(servers) == 2


def test_check_refuses_what_cannot_be_built() -> None:
    assert check(10, MIN_PER_FLOW * 10) is None
    assert check(10, MIN_PER_FLOW * 10 - 1) is not None
    assert check(0, 100) is not None
    with pytest.raises(ValueError, match="packets per flow"):
        write_trace("/dev/null", 10, 10)
