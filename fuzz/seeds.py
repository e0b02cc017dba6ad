"""Seed inputs for the fuzz targets, built at run time from the project's own fixtures and the
small files of ../shared/corpus (nothing is copied into the repository).

`seeds(name)` returns a list of byte strings for target `name`; `write_seeds(name, directory)`
writes them as files, for atheris (libFuzzer reads a corpus directory).
"""

from __future__ import annotations

import hashlib
import ipaddress
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from flowshift import channel
from flowshift.entry import Flow, Tier
from flowshift.flow import PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.gen import TraceSpec, generate
from flowshift.packet.build import (
    icmp_echo_frame,
    icmp_error_frame,
    tcp_frame,
    tcp_options,
    udp_frame,
)
from flowshift.packet.pcap import TraceError, open_trace
from flowshift.services.conntrack_tcp import TcpConn, TcpDir
from fuzz.targets import parse_input

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
SMALL = 16 << 10  # corpus files up to this size become trace seeds
FRAMES_PER_FILE = 4  # frames taken from each corpus trace for the parser

V4A, V4B = ipaddress.ip_address("10.0.0.2").packed, ipaddress.ip_address("198.51.100.7").packed
V6A, V6B = ipaddress.ip_address("fd00::2").packed, ipaddress.ip_address("2001:db8::7").packed


def _corpus_traces() -> Iterator[Path]:
    for sub in ("tcpdump", "real"):
        folder = CORPUS / sub
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.suffix in (".pcap", ".pcapng") and p.stat().st_size <= SMALL:
                    yield p


def _built_frames() -> list[bytes]:
    opts = tcp_options(mss=1460, wscale=7, sack_perm=True, timestamps=(1, 0))
    frames = []
    for src, dst in ((V4A, V4B), (V6A, V6B)):
        frames += [
            tcp_frame(src=src, dst=dst, sport=41000, dport=80, seq=1, ack=0, flags=0x02,
                      window=64240, options=opts),
            tcp_frame(src=src, dst=dst, sport=41000, dport=80, seq=2, ack=9, flags=0x18,
                      window=502, options=tcp_options(timestamps=(5, 6)), payload=b"GET /"),
            tcp_frame(src=src, dst=dst, sport=41000, dport=80, seq=2, ack=9, flags=0x10,
                      window=502, options=tcp_options(sack=((10, 20), (30, 40))), vlan=7),
            udp_frame(src=src, dst=dst, sport=5353, dport=53, payload=b"\x12\x34" + bytes(10)),
            icmp_echo_frame(src=src, dst=dst, ident=99, seq=1, payload=b"ping"),
        ]
    frames.append(icmp_error_frame(frames[3], type=3, code=3))
    return frames


def parse_seeds() -> list[bytes]:
    out = [parse_input(1, f) for f in _built_frames()]
    out += [parse_input(101, f[14:]) for f in _built_frames()[:5]]
    for path in _corpus_traces():
        try:
            with open_trace(path) as reader:
                for i, frame in enumerate(reader):
                    if i == FRAMES_PER_FILE:
                        break
                    if frame.linktype in (1, 101, 12, 14, 228, 229, 113, 276, 0, 108):
                        out.append(parse_input(frame.linktype, frame.data))
        except TraceError:
            continue
    return out


def trace_seeds() -> list[bytes]:
    out = [p.read_bytes() for p in _corpus_traces()]
    with tempfile.TemporaryDirectory(prefix="fs-fuzz-seed-") as tmp:
        path = Path(tmp) / "gen.pcap"
        generate(TraceSpec(flows=6, duration_s=0.5, seed=3, elephants=0), path)
        out.append(path.read_bytes())
    return out


def _flows() -> list[Flow]:
    tcp = TcpConn(seen=(TcpDir(1000, 2000, 3000, 4000, 7, 1), TcpDir(5, 6, 7, 8, 2, 3)),
                  state=3, last_seq=11, last_ack=12, last_end=13, last_win=14, seen_reply=True)
    k4 = FlowKey(4, PROTO_TCP, 0, V4A, V4B, 41000, 80)
    k6 = FlowKey(6, PROTO_UDP, 2, V6A, V6B, 5353, 53)
    return [
        Flow(key=k4, xlat=k4._replace(src=V4B), machine=1, chain=0b1111, tcp=tcp, status=6,
             rule=3, backend=1, created=1, last_seen=2, expires=3, packets=[4, 5],
             bytes=[600, 700], generation=9, owner=Tier.PNIC),
        Flow(key=k6, xlat=k6, machine=0, chain=0b1001, status=2, rule=-1, created=10**18),
    ]


def entry_seeds() -> list[bytes]:
    return [f.to_bytes() for f in _flows()]


def channel_seeds() -> list[bytes]:
    flows = [f.to_bytes() for f in _flows()]
    msgs: list[channel.Msg] = [
        channel.Offload(seq=1, entry=flows[0]),
        channel.Offloads(seq=3, entries=b"".join(flows)),
        channel.OffloadResults(seq=3, reasons=bytes([0, 3, 4])[:len(flows)]),
        channel.Recall(seq=2, key=tuple(_flows()[0].key), reason=1),  # type: ignore[arg-type]
        channel.Packets(now=5, index=[0, 1], zone=[0, 0], ts=[5, 6], data=[b"ab", b"cd"],
                        linktype=[1, 1], wire_len=[60, 60]),
        channel.Tick(now=7, sync=1), channel.RunBatch(rows=3, size=100),
        channel.Withdraw(now=8), channel.Ack(seq=1), channel.Refuse(seq=1, reason=2),
        channel.Return(entry=flows[1], reason=1),
        channel.Results(index=[0], verdict=[1], reason=[0], data=[b"x"]),
        channel.Report(now=9, entries=flows), channel.Synced(sync=1),
        channel.Health(healthy=True), channel.BatchDone(rows=3),
    ]
    out = []
    for m in msgs:
        frame = channel.encode(m)
        out.append(b"\0" + frame[6:])  # the body behind a good header
        out.append(b"\1" + frame)  # the whole frame
    return out


def config_seeds() -> list[bytes]:
    texts = [p.read_bytes() for p in sorted((ROOT / "examples").glob("*.toml"))]
    texts.append(resources.files("flowshift").joinpath("data/demo.toml").read_bytes())
    if (CORPUS / "real").is_dir():
        texts += [p.read_bytes() for p in sorted((CORPUS / "real").glob("*.toml"))]
    return texts


SEEDS = {
    "parse": parse_seeds,
    "trace": trace_seeds,
    "channel": channel_seeds,
    "entry": entry_seeds,
    "config": config_seeds,
}


def seeds(name: str) -> list[bytes]:
    return SEEDS[name]()


def write_seeds(name: str, directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    items = seeds(name)
    for data in items:
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(items)

