"""Sharded replay (`--workers`, `--scheduler`): the split keeps related packets together, the
merge gives the serial outputs where every decision is per flow, and where the host keeps
state across flows the results are exactly the stated per-shard semantics (docs/scale.md).
"""

from __future__ import annotations

import csv
import filecmp
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift import cluster
from flowshift import shard as shard_module
from flowshift.cli import main
from flowshift.commands.demo import build_trace, demo_config_text
from flowshift.config import HostConfig, load_config, parse_config, to_dict
from flowshift.packet.batch import read_batches
from flowshift.packet.build import icmp_error_frame, tcp_frame, udp_frame
from flowshift.packet.checksum import checksum
from flowshift.packet.parse import parse
from flowshift.packet.pcap import PcapWriter
from flowshift.replay import run_replay
from flowshift.shard import Part, Sharder, place, split_trace
from flowshift.shard_replay import run_sharded, shard_capacities

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
TRACE = REAL / "replay_input.pcap"
NS = 1_000_000_000

GATEWAY = """
[pnic]
capacity = 64
[offload]
policy = "always"
report_interval = 1.0
[[machine]]
name = "gw"
addresses = ["10.0.0.0/24", "fd00::/64"]
public = ["192.0.2.1", "2001:db8:ffff::1"]
services = ["firewall", "nat"]
start = "vnic"
[machine.firewall]
default = "drop"
[[machine.firewall.rule]]
action = "allow"
direction = "egress"
proto = "any"
[[machine.nat.snat]]
source = "10.0.0.0/24"
to = "192.0.2.1"
ports = "20000-20003"
[[machine.nat.snat]]
source = "fd00::/64"
to = "2001:db8:ffff::1"
ports = "20000-20003"
"""


def ip4(*b: int) -> bytes:
    return bytes(b)


@pytest.fixture(scope="module")
def pool() -> Any:
    with cluster.open_executor(2, kind="processes") as ex:
        yield ex


def with_start(path: Path, start: str) -> HostConfig:
    data = to_dict(load_config(path))
    for m in data["machine"]:
        m["start"] = start
    return parse_config(data, str(path))


def both(tmp: Path, trace: Path, cfg: HostConfig | Path, pool: Any, **kw: Any
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The serial replay (a.*) and the sharded one on 2 workers (b.*), every output."""
    dump = "dump_at" in kw
    serial = run_replay(trace, cfg, out=tmp / "a.pcap", verdicts=tmp / "a.csv",
                        dump_path=tmp / "a.txt" if dump else None, progress=False, **kw)
    sharded = run_sharded(trace, cfg, workers=2, pool=pool, out=tmp / "b.pcap",
                          verdicts=tmp / "b.csv", dump_path=tmp / "b.txt" if dump else None,
                          progress=False, **kw)
    return serial, sharded


def same_file(tmp: Path, ext: str) -> bool:
    return filecmp.cmp(tmp / f"a.{ext}", tmp / f"b.{ext}", shallow=False)


COUNTERS = ("packets", "tiers", "machines", "offloads", "drops", "unparsed", "bypass_reasons",
            "events", "schedule")


def assert_same_counters(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in COUNTERS:
        assert a[key] == b[key], key
    assert a["flows"]["total"] == b["flows"]["total"]
    assert a["trace"] == {**b["trace"], "path": a["trace"]["path"]}


# -- the split ---------------------------------------------------------------------------


def fragments(frame: bytes, ip_id: int, cut: int) -> list[bytes]:
    """An Ethernet + IPv4 frame as two fragments, the first carrying `cut` payload bytes."""
    eth, ip = frame[:14], bytearray(frame[14:])
    head, payload = bytes(ip[:20]), ip[20:]
    out = []
    for offset, part, more in ((0, payload[:cut], True), (cut, payload[cut:], False)):
        h = bytearray(head)
        h[2:4] = (20 + len(part)).to_bytes(2, "big")
        h[4:6] = ip_id.to_bytes(2, "big")
        h[6:8] = ((0x2000 if more else 0) | offset // 8).to_bytes(2, "big")
        h[10:12] = b"\0\0"
        h[10:12] = checksum(bytes(h)).to_bytes(2, "big")
        out.append(eth + bytes(h) + bytes(part))
    return out


@settings(max_examples=60, deadline=None)
@given(client=st.integers(2, 250), server=st.integers(1, 250), sport=st.integers(1024, 65535),
       dport=st.integers(1, 65535), n=st.integers(2, 9), ip_id=st.integers(0, 65535))
def test_a_flow_its_icmp_errors_and_fragments_share_a_shard(
        client: int, server: int, sport: int, dport: int, n: int, ip_id: int) -> None:
    cfg = parse_config(__import__("tomllib").loads(GATEWAY))
    sharder = Sharder(cfg, n)
    inside, outside, public = ip4(10, 0, 0, client), ip4(198, 51, 100, server), ip4(192, 0, 2, 1)
    out = tcp_frame(src=inside, dst=outside, sport=sport, dport=dport, seq=1, ack=0,
                    flags=0x02, window=1000)
    as_left = tcp_frame(src=public, dst=outside, sport=20001, dport=dport, seq=1, ack=0,
                        flags=0x02, window=1000)
    back = tcp_frame(src=outside, dst=public, sport=dport, dport=20001, seq=9, ack=2,
                     flags=0x12, window=1000)
    big = udp_frame(src=inside, dst=outside, sport=sport, dport=dport, payload_len=600)
    frames = {
        "egress": out,
        "ingress reply": back,
        "ingress icmp error quoting it": icmp_error_frame(as_left, type=3, code=3,
                                                           src=ip4(203, 0, 113, 1)),
    }
    first_frag, second_frag = fragments(big, ip_id, 200)
    shards = {name: sharder.packet_shard(parse(bytearray(f), 1)) for name, f in frames.items()}
    assert len(set(shards.values())) == 1, shards
    udp_shard = sharder.packet_shard(parse(bytearray(big), 1))
    assert sharder.packet_shard(parse(bytearray(first_frag), 1)) == udp_shard
    assert sharder.packet_shard(parse(bytearray(second_frag), 1)) == udp_shard
    # an outside client's connection, and the machine's ICMP error about it going out
    inbound = udp_frame(src=outside, dst=public, sport=dport, dport=53, payload=b"q")
    error_out = icmp_error_frame(inbound, type=3, code=3, src=inside)
    assert (sharder.packet_shard(parse(bytearray(inbound), 1))
            == sharder.packet_shard(parse(bytearray(error_out), 1)))


def test_the_compiled_split_agrees_with_the_parser(tmp_path: Path) -> None:
    """Every frame of the real capture: the kernel's shard is the slow path's."""
    cfg = load_config(REAL / "lb-gateway.toml")
    sharder = Sharder(cfg, 5)
    for batch in read_batches(TRACE, 4096):
        fast = sharder.assign(batch)
        for i in range(0, len(batch), 7):
            pkt = parse(bytearray(batch.frame(i)), int(batch.linktype[i]),
                        int(batch.wire_len[i]))
            assert fast[i] == sharder.packet_shard(pkt), i


# -- exact where every decision is per flow ------------------------------------------------


def test_real_capture_is_exact_when_machines_start_on_the_vnic(tmp_path: Path, pool: Any
                                                               ) -> None:
    cfg = with_start(REAL / "lb-gateway.toml", "vnic")
    a, b = both(tmp_path, TRACE, cfg, pool, dump_at=4.0, crash_at=6.0)
    for ext in ("pcap", "csv", "txt"):
        assert same_file(tmp_path, ext), ext
    assert_same_counters(a, b)
    assert b["offloads"]["to_pnic"] > 0 and b["events"]["crash"] == 1
    assert b["sharding"]["shards"] == 2 and sum(b["sharding"]["packets"]) == a["packets"]["in"]


def test_real_capture_handoff_moves_per_shard(tmp_path: Path, pool: Any) -> None:
    """A machine that starts on the machine tier hands off per shard: only the tier column of
    the rows between the whole trace's handoff and its shard's differs (vnic -> machine)."""
    _, b = both(tmp_path, TRACE, REAL / "lb-gateway.toml", pool, dump_at=4.0)
    assert same_file(tmp_path, "pcap") and same_file(tmp_path, "txt")
    a_rows = (tmp_path / "a.csv").read_text().splitlines()
    b_rows = (tmp_path / "b.csv").read_text().splitlines()
    assert len(a_rows) == len(b_rows)
    moved = 0
    for x, y in zip(a_rows, b_rows, strict=True):
        if x != y:
            fx, fy = x.split(","), y.split(",")
            assert (fx[6], fy[6]) == ("vnic", "machine")
            assert fx[:6] + fx[7:] == fy[:6] + fy[7:]
            moved += 1
    assert moved > 0
    assert b["events"]["handoff"] == 1


def test_real_capture_never_offloading_is_exact_with_maglev(tmp_path: Path, pool: Any) -> None:
    a, b = both(tmp_path, TRACE, REAL / "lb-gateway.toml", pool, offload="never",
                dump_at=3.0, withdraw_at=5.0)
    for ext in ("pcap", "csv", "txt"):
        assert same_file(tmp_path, ext), ext
    assert_same_counters(a, b)


def independent(tmp: Path, trace: Path, cfg: HostConfig, n: int, **kw: Any) -> list[list[str]]:
    """The stated semantics spelled out: each shard replayed alone, with its own capacity and
    pools, then put back in input order."""
    split = split_trace(trace, cfg, n, tmp, place(trace, cfg, n))
    caps = shard_capacities(cfg.pnic.capacity, n)
    per_shard = []
    for k in range(n):
        data = to_dict(cfg)
        data["pnic"]["capacity"] = caps[k]
        run_replay(split.paths[k], parse_config(data), verdicts=tmp / f"v{k}.csv",
                   progress=False, origin_ns=split.first_ts, end_ns=split.last_ts, **kw)
        with open(tmp / f"v{k}.csv") as f:
            per_shard.append(iter(list(csv.reader(f))[1:]))
    return [next(per_shard[k])[1:7] for k in split.shard.tolist()]


def rows_of(path: Path) -> list[list[str]]:
    with open(path) as f:
        return [r[1:7] for r in list(csv.reader(f))[1:]]


def test_round_robin_pools_advance_per_shard(tmp_path: Path, pool: Any) -> None:
    cfg = with_start(REAL / "lb-gateway-rr.toml", "vnic")
    a, b = both(tmp_path, TRACE, cfg, pool, offload="never")
    assert not same_file(tmp_path, "csv")  # Linux's round robin was over the whole host
    assert b["packets"]["dropped"] > a["packets"]["dropped"]
    assert rows_of(tmp_path / "b.csv") == independent(tmp_path, TRACE, cfg, 2, offload="never")
    assert "per shard" in b["sharding"]["semantics"]["round_robin"]


# -- generated traces: NAT collisions, ICMP errors, fragments ---------------------------------


def collision_trace(tmp: Path, cfg: HostConfig) -> Path:
    """Clients that share source ports towards few servers through a 4-port SNAT range (NAT
    collisions and exhaustion), answered, with ICMP errors about some flows and fragments."""
    rng = random.Random(7)
    egress: list[tuple[int, bytes]] = []
    t = 1_700_000_000 * NS
    servers = [ip4(198, 51, 100, s) for s in (7, 8, 9)]
    for i in range(60):
        client = ip4(10, 0, 0, 2 + i % 9)
        server = servers[i % 3]
        t += rng.randrange(1, 40) * 1_000_000
        if i % 5 == 4:
            big = udp_frame(src=client, dst=server, sport=4000 + i % 2, dport=53,
                            payload_len=700)
            for f in fragments(big, 100 + i, 296):
                egress.append((t, f))
                t += 1000
        egress.append((t, udp_frame(src=client, dst=server, sport=4000 + i % 2, dport=53,
                                    payload=b"q%d" % i)))
        egress.append((t + 500, tcp_frame(src=client, dst=server, sport=5000, dport=80, seq=i,
                                          ack=0, flags=0x02, window=1000)))
    first = tmp / "egress.pcap"
    with PcapWriter(first) as w:
        for ts, f in egress:
            w.write(ts, f)
    run_replay(first, cfg, out=tmp / "left.pcap", offload="never", progress=False)
    frames = list(egress)
    for batch in read_batches(tmp / "left.pcap"):
        for i in range(len(batch)):
            left, ts = batch.frame(i), int(batch.ts_ns[i])
            pkt = parse(bytearray(left), 1)
            if pkt.frag:
                continue
            if pkt.proto == 17 and rng.random() < 0.3:
                frames.append((ts + 3_000_000, icmp_error_frame(left, type=3, code=3)))
            elif pkt.proto == 17:
                frames.append((ts + 2_000_000, udp_frame(src=pkt.dst, dst=pkt.src,
                                                         sport=pkt.dport, dport=pkt.sport,
                                                         payload=b"answer")))
            else:
                frames.append((ts + 1_000_000, tcp_frame(
                    src=pkt.dst, dst=pkt.src, sport=pkt.dport, dport=pkt.sport, seq=77,
                    ack=pkt.seq + 1, flags=0x12, window=1000)))
    frames.sort(key=lambda x: x[0])
    path = tmp / "collisions.pcap"
    with PcapWriter(path) as w:
        for ts, f in frames:
            w.write(ts, f)
    return path


@pytest.mark.parametrize("policy", ["never", "always"])
def test_nat_collisions_icmp_errors_and_fragments_are_exact(tmp_path: Path, pool: Any,
                                                            policy: str) -> None:
    cfg = parse_config(__import__("tomllib").loads(GATEWAY))
    trace = collision_trace(tmp_path, cfg)
    a, b = both(tmp_path, trace, cfg, pool, offload=policy, dump_at=0.5)
    for ext in ("pcap", "csv", "txt"):
        assert same_file(tmp_path, ext), ext
    assert_same_counters(a, b)
    reasons = {r[4] for r in rows_of(tmp_path / "a.csv")}
    assert {"related", "nat-exhausted"} <= reasons, reasons
    assert "fragment" not in reasons  # fragments are reassembled before conntrack


def test_pnic_capacity_is_split_per_shard(tmp_path: Path, pool: Any) -> None:
    data = parse_config(__import__("tomllib").loads(GATEWAY))
    cfg = parse_config({**to_dict(data), "pnic": {**to_dict(data)["pnic"], "capacity": 3}})
    trace = collision_trace(tmp_path, cfg)
    _, b = both(tmp_path, trace, cfg, pool)
    assert b["sharding"]["pnic_capacity"] == [2, 1]
    assert b["offloads"]["refused"].get("full", 0) > 0
    assert rows_of(tmp_path / "b.csv") == independent(tmp_path, trace, cfg, 2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HostConfig]:
    """The demo's host and a small demo trace (two machines, NAT, LB, a SYN flood)."""
    path = tmp_path_factory.mktemp("demo") / "demo.pcap"
    cfg = parse_config(__import__("tomllib").loads(demo_config_text()), "demo.toml")
    build_trace(path, cfg, 0.03)
    return path, cfg


def test_demo_trace_is_exact_with_machines_on_the_vnic_and_plots(
        tmp_path: Path, pool: Any, demo: tuple[Path, HostConfig]) -> None:
    trace, cfg = demo
    data = to_dict(cfg)
    for m in data["machine"]:
        m["start"] = "vnic"
    cfg = parse_config(data)
    a, b = both(tmp_path, trace, cfg, pool, dump_at=2.0, withdraw_at=9.0)
    for ext in ("pcap", "csv", "txt"):
        assert same_file(tmp_path, ext), ext
    assert_same_counters(a, b)
    assert b["offloads"]["to_pnic"] > 0 and b["events"]["withdraw"] == 1
    run_sharded(trace, cfg, workers=2, pool=pool, plot=tmp_path / "p.png", progress=False)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_trace_as_shipped_differs_only_in_the_handoff_tier(
        tmp_path: Path, pool: Any, demo: tuple[Path, HostConfig]) -> None:
    trace, cfg = demo
    both(tmp_path, trace, cfg, pool, dump_at=5.0)
    assert same_file(tmp_path, "pcap") and same_file(tmp_path, "txt")
    for x, y in zip(rows_of(tmp_path / "a.csv"), rows_of(tmp_path / "b.csv"), strict=True):
        if x != y:
            assert (x[5], y[5]) == ("vnic", "machine") and x[:5] == y[:5]


def test_timers_run_on_each_shards_clock(tmp_path: Path, pool: Any,
                                        demo: tuple[Path, HostConfig]) -> None:
    """Idle returns and reports: the sharded run is N independent hosts, each on its clock."""
    trace, cfg = demo
    data = to_dict(cfg)
    for m in data["machine"]:
        m["start"] = "vnic"
    data["offload"].update(policy="always", idle_timeout=0.2, report_interval=0.05)
    cfg = parse_config(data)
    _, b = both(tmp_path, trace, cfg, pool)
    assert b["offloads"]["returned"].get("idle", 0) > 0
    assert rows_of(tmp_path / "b.csv") == independent(tmp_path, trace, cfg, 2)


# -- every shard reading the whole trace ------------------------------------------------------


def own_frames(part: Part) -> list[tuple[int, int, bytes]]:
    """The packets a Part gives, copied as they come (its buffers are recycled)."""
    out = []
    for b in part:
        out.extend((int(b.ts_ns[i]), int(b.wire_len[i]), b.frame(i)) for i in range(len(b)))
    return out


def file_frames(path: Path) -> list[tuple[int, int, bytes]]:
    return [(int(b.ts_ns[i]), int(b.wire_len[i]), b.frame(i))
            for b in read_batches(path) for i in range(len(b))]


class Pieces:
    """shard.PIECE and shard.SIP set for a while: small pieces cut records, reads cut them."""

    def __init__(self, piece: int, sip: int) -> None:
        self.sizes = piece, sip

    def __enter__(self) -> None:
        self.saved = shard_module.PIECE, shard_module.SIP
        shard_module.PIECE, shard_module.SIP = self.sizes

    def __exit__(self, *exc: object) -> None:
        shard_module.PIECE, shard_module.SIP = self.saved


@pytest.fixture(scope="module")
def collisions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HostConfig]:
    cfg = parse_config(__import__("tomllib").loads(GATEWAY))
    return collision_trace(tmp_path_factory.mktemp("collisions"), cfg), cfg


@settings(max_examples=15, deadline=None)
@given(piece=st.integers(40, 1 << 14), sip=st.integers(200, 5000), n=st.integers(1, 3),
       cut=st.one_of(st.none(), st.integers(25, 60_000)))
def test_a_part_holds_what_its_shard_trace_holds(
        tmp_path_factory: pytest.TempPathFactory, collisions: tuple[Path, HostConfig],
        piece: int, sip: int, n: int, cut: int | None) -> None:
    """Every shard reading the whole trace, in pieces of any size and reads of any size
    (records cut by both, records longer than a piece, a trace that breaks off anywhere), keeps
    the packets its shard trace holds, in order, and knows where each came from."""
    trace, cfg = collisions
    if cut is not None:
        data = trace.read_bytes()
        trace = tmp_path_factory.mktemp("cut") / "cut.pcap"
        trace.write_bytes(data[:cut])
    split = split_trace(trace, cfg, n, tmp_path_factory.mktemp("split"))
    problem = list(read_batches(trace))[-1].problem
    with Pieces(piece, sip):
        for k in range(n):
            part = Part(trace, cfg, k, n)
            last = None
            got = []
            for b in part:
                got.extend((int(b.ts_ns[i]), int(b.wire_len[i]), b.frame(i))
                           for i in range(len(b)))
                last = b
            assert got == file_frames(split.paths[k])
            assert part.index.tolist() == split.index(k).tolist()
            assert part.counts == split.counts
            assert (part.first_ns, part.end_ns) == (split.first_ts, split.last_ts)
            assert (last.problem if last is not None else None) == problem


def test_a_corrupt_record_ends_every_part_with_the_readers_problem(
        tmp_path: Path, collisions: tuple[Path, HostConfig]) -> None:
    trace, cfg = collisions
    data = bytearray(trace.read_bytes())
    at = 24 + 16 + int.from_bytes(data[24 + 8:24 + 12], "little")  # the second record
    data[at + 8:at + 12] = (1 << 30).to_bytes(4, "little")
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(bytes(data))
    problem = list(read_batches(bad))[-1].problem
    assert problem is not None and "corrupt record" in problem
    with Pieces(4096, 100):
        batches = [(len(b), b.problem) for b in Part(bad, cfg, 0, 1)]
    assert batches == [(1, problem)]


def as_pcapng(trace: Path, path: Path) -> Path:
    """A classic pcap's frames as pcapng: a section, one Ethernet interface (microseconds)."""
    def block(kind: int, body: bytes) -> bytes:
        body += bytes(-len(body) % 4)
        size = (12 + len(body)).to_bytes(4, "little")
        return kind.to_bytes(4, "little") + size + body + size

    out = [block(0x0A0D0D0A, (0x1A2B3C4D).to_bytes(4, "little") + bytes([1, 0, 0, 0])
                 + (2**64 - 1).to_bytes(8, "little")),
           block(1, (1).to_bytes(2, "little") + bytes(2) + (65535).to_bytes(4, "little"))]
    for ts, wire, frame in file_frames(trace):
        us = ts // 1000
        out.append(block(6, bytes(4) + (us >> 32).to_bytes(4, "little")
                         + (us & 0xFFFFFFFF).to_bytes(4, "little")
                         + len(frame).to_bytes(4, "little") + wire.to_bytes(4, "little")
                         + frame))
    path.write_bytes(b"".join(out))
    return path


def test_a_part_of_a_pcapng_trace(tmp_path: Path, collisions: tuple[Path, HostConfig]) -> None:
    trace, cfg = collisions
    pcapng = as_pcapng(trace, tmp_path / "t.pcapng")
    split = split_trace(pcapng, cfg, 2, tmp_path)
    for k in range(2):
        part = Part(pcapng, cfg, k, 2)
        assert own_frames(part) == file_frames(split.paths[k])
        assert part.index.tolist() == split.index(k).tolist()


def test_small_pieces_replay_as_the_shard_trace(tmp_path: Path,
                                                demo: tuple[Path, HostConfig]) -> None:
    """A shard replayed from the whole trace, a small piece at a time, decides every packet as
    the replay of its own trace file does, timers and a binding capacity included: how the
    packets are batched changes nothing."""
    trace, cfg = demo
    data = to_dict(cfg)
    for m in data["machine"]:
        m["start"] = "vnic"
    data["offload"].update(policy="always", idle_timeout=0.2, report_interval=0.05)
    data["pnic"]["capacity"] = 2
    cfg = parse_config(data)
    placement = place(trace, cfg, 2)
    split = split_trace(trace, cfg, 2, tmp_path, placement)
    with Pieces(3000, 700):
        for k in range(2):
            a = run_replay(split.paths[k], cfg, verdicts=tmp_path / "a.csv",
                           out=tmp_path / "a.pcap", progress=False, origin_ns=split.first_ts,
                           end_ns=split.last_ts)
            b = run_replay(trace, cfg, verdicts=tmp_path / "b.csv", out=tmp_path / "b.pcap",
                           progress=False, part=Part(trace, cfg, k, 2, placement))
            assert same_file(tmp_path, "csv") and same_file(tmp_path, "pcap")
            assert a["offloads"] == b["offloads"] and a["packets"] == b["packets"]
            assert b["offloads"]["to_pnic"] > 0


# -- the command line and the cluster ---------------------------------------------------------


def test_cli_workers_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["replay", str(TRACE), "--config", str(REAL / "lb-gateway.toml"), "-q"]
    ok = runner.invoke(main, [*args, "--workers", "2", "--executor", "processes",
                              "--report", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sharding"]["cluster"]["kind"] == "processes"
    assert report["packets"]["in"] == 22479
    bad = runner.invoke(main, [*args, "--workers", "2", "--plot", str(tmp_path / "p.xyz")])
    assert bad.exit_code == 2 and "--plot" in bad.output
    bad = runner.invoke(main, [*args, "--workers", "2", "--shard-dir", str(tmp_path / "no")])
    assert bad.exit_code == 2 and "--shard-dir" in bad.output


def test_scheduler_without_dask_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "dask_available", lambda: False)
    with pytest.raises(cluster.ClusterError, match=r"pip install 'flowshift\[cluster\]'"):
        cluster.open_executor(scheduler="tcp://127.0.0.1:1")
    with cluster.open_executor(2) as ex:  # --workers still works, on plain processes
        assert ex.kind == "processes"


def test_dask_local_cluster_and_existing_scheduler(tmp_path: Path) -> None:
    """--workers on a LocalCluster of 2 worker processes, and --scheduler on its address."""
    pytest.importorskip("distributed")
    cfg = with_start(REAL / "lb-gateway.toml", "vnic")
    serial = run_replay(TRACE, cfg, verdicts=tmp_path / "a.csv", progress=False)
    with cluster.open_executor(2, kind="dask") as local:
        assert local.kind == "dask-local" and local.startup_seconds > 0
        result = run_sharded(TRACE, cfg, scheduler=local.address, verdicts=tmp_path / "b.csv",
                             progress=False)
        # tasks that must run at once go to a worker each
        where = [f.result() for f in local.submit_spread(_worker_address, [(), ()])]
        assert len(set(where)) == 2
        ring = run_sharded(TRACE, cfg, workers=2, pool=local, verdicts=tmp_path / "c.csv",
                           progress=False)
    assert same_file(tmp_path, "csv")
    assert ring["sharding"]["read"] == "ring" and ring["packets"] == serial["packets"]
    assert filecmp.cmp(tmp_path / "a.csv", tmp_path / "c.csv", shallow=False)
    assert result["packets"] == serial["packets"]
    info = result["sharding"]["cluster"]
    assert info["kind"] == "dask" and info["workers"] == 2 and info["startup_seconds"] >= 0


def _worker_address() -> str:
    from distributed import get_worker

    return str(get_worker().address)


TCPDUMP = REAL.parent / "tcpdump"


@pytest.mark.parametrize("name", sorted(p.name for p in TCPDUMP.glob("*.pcap*"))[::60])
def test_tcpdump_captures_shard_like_serial(tmp_path: Path, pool: Any, name: str) -> None:
    """Odd link types, malformed and truncated captures: the same verdicts, packets and report
    counters, or the same one-line refusal."""
    from flowshift.packet.pcap import TraceError
    from flowshift.shard import ShardError

    cfg = REAL / "lb-gateway.toml"
    try:
        a = run_replay(TCPDUMP / name, cfg, out=tmp_path / "a.pcap", verdicts=tmp_path / "a.csv",
                       progress=False)
    except TraceError as e:
        with pytest.raises(TraceError, match=re.escape(str(e).split(":")[0])):
            run_sharded(TCPDUMP / name, cfg, workers=2, pool=pool, progress=False)
        return
    try:
        b = run_sharded(TCPDUMP / name, cfg, workers=2, pool=pool, out=tmp_path / "b.pcap",
                        verdicts=tmp_path / "b.csv", progress=False)
    except ShardError as e:
        assert "mixes link types" in str(e) and len(a["trace"]["linktypes"]) > 1
        return
    assert same_file(tmp_path, "csv") and same_file(tmp_path, "pcap")
    assert_same_counters(a, b)
