"""eBPF datapath against the compiled PNIC engine: ns per packet on the same frames, same run.

    sudo python bench/bench_bpf.py [--packets N] [--repeat N] [--json PATH]

The frame is a 1514-byte data segment of an established, load-balanced TCP flow (an outside
client to the public VIP, rewritten to an inside backend: addresses, port and both checksums
change) or of a plain tracked flow, or a miss. The datapath runs it with BPF_PROG_TEST_RUN and
`repeat` (the kernel's mean per run: no syscall in the figure). A test run keeps the frame it
rewrote for the next repetition, so the LB case holds a second entry that maps the backend
frame back to the VIP one: every repetition is a full hit, tracked and rewritten. The engine
processes `--packets` copies of the same frame in one batch (`PnicEngine.process`); the best of
`--repeat` runs counts for both. Needs root (BPF_PROG_TEST_RUN of a tc program).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from common import machine
from flowshift.config import parse_config
from flowshift.entry import Flow, Service, Status
from flowshift.flow import PROTO_TCP, FlowKey
from flowshift.host import Classifier
from flowshift.live.datapath import Clock, Datapath, Port, Result
from flowshift.packet.build import tcp_frame, tcp_options
from flowshift.packet.view import TCP_ACK
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.conntrack_tcp import TcpConn, TcpDir, TcpState
from flowshift.tiers.pnic_engine import PnicEngine

S = 1_000_000_000
LAB = {"machine": [{"name": "lab", "addresses": ["10.0.0.0/24"], "public": ["192.0.2.1"],
                    "services": ["count"]}]}
CLIENT = bytes((198, 51, 100, 7))
VIP = bytes((192, 0, 2, 1))
BACKEND = bytes((10, 0, 0, 9))
SEQ, ACK = 1000, 7_000_000


def _conn() -> TcpConn:
    flags = ct_tcp.TCP_FLAG_MAXACK_SET | ct_tcp.TCP_FLAG_WINDOW_SCALE | ct_tcp.TCP_FLAG_SACK_PERM
    w = 2048 << 7
    return TcpConn(seen=(TcpDir(SEQ + 1460, ACK + w, w, ACK, 7, flags),
                         TcpDir(ACK, SEQ + w, w, SEQ, 7, flags)),
                   state=TcpState.ESTABLISHED, last_dir=1, last_index=ct_tcp.TCP_ACK_SET,
                   seen_reply=True)


def _entry(key: FlowKey, xlat: FlowKey) -> bytes:
    return Flow(key=key, xlat=xlat, machine=0, chain=Service.LB | Service.COUNT, tcp=_conn(),
                status=Status.SEEN_REPLY | Status.ASSURED | (Status.NAT if key != xlat else 0),
                created=S, last_seen=S, expires=10_000 * S).to_bytes()


def _frame(dst: bytes, dport: int) -> bytes:
    return tcp_frame(src=CLIENT, dst=dst, sport=40000, dport=dport, seq=SEQ, ack=ACK,
                     flags=TCP_ACK, window=2048, options=tcp_options(timestamps=(1, 2)),
                     payload_len=1460)


def cases() -> dict[str, tuple[bytes, list[bytes]]]:
    """case -> (frame, entries for the datapath); the engine gets the first entry only."""
    vip = FlowKey(4, PROTO_TCP, 0, CLIENT, VIP, 40000, 80)
    backend = vip._replace(dst=BACKEND, dport=8080)
    plain = vip._replace(dst=BACKEND, dport=22)
    return {
        "established, LB rewrite": (_frame(VIP, 80),
                                    [_entry(vip, backend), _entry(backend, vip)]),
        "established, no rewrite": (_frame(BACKEND, 22), [_entry(plain, plain)]),
        "miss (empty cache)": (_frame(BACKEND, 23), []),
    }


def bpf_ns(dp: Datapath, frame: bytes, entries: list[bytes], packets: int) -> float:
    dp.clear()
    for e in entries:
        assert dp.insert(e)
    run = dp.test_run(frame, ts=2 * S, repeat=packets)
    want = Result.PUNT if not entries else Result.FORWARD
    assert run.result is want, f"{run.result} {run.code}"
    return float(run.duration_ns)


def engine_ns(classifier: Classifier, frame: bytes, entries: list[bytes], packets: int) -> float:
    engine = PnicEngine(4, classifier)
    for e in entries[:1]:
        assert engine.insert(e) >= 0
    buf = np.tile(np.frombuffer(frame, np.uint8), packets)
    n = len(frame)
    args = (np.arange(packets, dtype=np.int64) * n, np.full(packets, n, np.uint32),
            np.full(packets, n, np.uint32), np.ones(packets, np.uint16),
            np.full(packets, 2 * S, np.int64), np.ones(packets, bool),
            np.zeros(packets, np.int8), np.zeros(packets, np.int8), np.zeros(packets, np.int32))
    start = time.perf_counter_ns()
    engine.process(buf, *args)
    return (time.perf_counter_ns() - start) / packets


@click.command()
@click.option("--packets", default=1_000_000, show_default=True)
@click.option("--repeat", default=5, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path))
def main(packets: int, repeat: int, json_path: Path | None) -> None:
    classifier = Classifier(parse_config(LAB, "bench").machines)
    console = Console()
    rows: list[dict[str, Any]] = []
    port = Port(1, bytes(6), bytes(6))
    with Datapath(f"bench{int(time.time())}", 16, classifier, uplink=port,
                  machine_ports=[port], punt_ifindex=1, clock=Clock.TSTAMP,
                  tag_punts=False) as dp:
        for name, (frame, entries) in cases().items():
            engine_ns(classifier, frame, entries, 1000)  # compile / load the kernels
            e = min(engine_ns(classifier, frame, entries, packets) for _ in range(repeat))
            b = min(bpf_ns(dp, frame, entries, packets) for _ in range(repeat))
            rows.append({"case": name, "bpf_ns": b, "engine_ns": e})
    table = Table(title=f"ns per packet, best of {repeat} runs of {packets:,} packets")
    for col in ("case", "eBPF (test run)", "compiled engine", "engine / eBPF"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        table.add_row(r["case"], f"{r['bpf_ns']:.0f}", f"{r['engine_ns']:.0f}",
                      f"{r['engine_ns'] / r['bpf_ns']:.2f}")
    console.print(table)
    info = machine()
    console.print(info)
    if json_path:
        json_path.write_text(json.dumps({"machine": info, "packets": packets, "cases": rows},
                                        indent=2))


if __name__ == "__main__":
    sys.exit(main())
