"""PNIC engine throughput on synthetic elephants: the compiled pipeline alone, in packets/s.

    python bench/bench_pnic_engine.py [--packets N] [--repeat N] [--json PATH]

32 NAT'ed TCP elephants of the gateway in bench/offload-host.toml, each opened by a handshake
through the reference chain and offloaded to a fresh engine; then downloads: per flow, two
1460-byte data segments from the server (ingress, the reply rewrite) and one ACK from the
client (egress, SNAT), flows interleaved. Every packet is processed and rewritten. Cases:

- header-only: the first 54 bytes of each frame captured, the whole trace in one batch;
- full-size: whole frames (1514-byte data segments), batches of 65536 as bench_offload reads;
- miss path: header-only frames against an empty cache (parse, classify, look up).

Each case is run `--repeat` times on fresh copies of the frames and a fresh engine; the best
run counts. The digest covers verdicts, reasons, rewritten frames and final entries, so two
versions of the engine can be checked for identical results (run this script with another
checkout's `src` first on PYTHONPATH for the figures of that version).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from common import machine
from flowshift.config import HostConfig, load_config
from flowshift.entry import Tier
from flowshift.packet.build import tcp_frame, tcp_options
from flowshift.packet.parse import parse
from flowshift.packet.view import TCP_ACK, TCP_SYN
from flowshift.services.chain import Chain
from flowshift.tiers.classify import Classifier
from flowshift.tiers.pnic_engine import PnicEngine

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "offload-host.toml"
FLOWS = 32
MSS = 1460
HEAD = 54  # Ethernet + IPv4 + TCP without options
CLIENT_WIN = 2048  # raw window of the client's ACKs (scale 7: 256 KiB)
US = 1000


def _client(i: int) -> tuple[bytes, bytes, int]:
    return bytes((10, 0, 0, 10 + i)), bytes((198, 51, 100, 1 + i % 8)), 40000 + i


def handshakes(cfg: HostConfig) -> tuple[list[bytes], list[tuple[bytes, bytes, int, int]]]:
    """The 32 flows' entries after SYN, SYN-ACK and ACK through the reference chain, and each
    flow's (public address, server, public port, server port) as the server sees it."""
    classifier = Classifier(cfg.machines)
    chain = Chain(cfg.machines[0], 0, Tier.VNIC)

    def run(frame: bytes, now: int) -> None:
        pkt = parse(bytearray(frame), 1, len(frame))
        _, direction = classifier.classify(pkt)
        chain.process(pkt, direction, now)

    for i in range(FLOWS):
        client, server, port = _client(i)
        run(tcp_frame(src=client, dst=server, sport=port, dport=443, seq=999, ack=0,
                      flags=TCP_SYN, window=65535,
                      options=tcp_options(mss=MSS, wscale=7, sack_perm=True)), i * US)
    flows = {f.key.sport: f for f in chain.export_flows()}
    views = []
    for i in range(FLOWS):
        client, server, port = _client(i)
        x = flows[port].xlat
        run(tcp_frame(src=server, dst=x.src, sport=443, dport=x.sport, seq=4999, ack=1000,
                      flags=TCP_SYN | TCP_ACK, window=65535,
                      options=tcp_options(mss=MSS, wscale=7, sack_perm=True)), (100 + i) * US)
        run(tcp_frame(src=client, dst=server, sport=port, dport=443, seq=1000, ack=5000,
                      flags=TCP_ACK, window=CLIENT_WIN), (200 + i) * US)
        views.append((x.src, server, x.sport, 443))
    entries = []
    for f in chain.export_flows():
        f.owner = Tier.PNIC
        entries.append(f.to_bytes())
    return entries, views


def _patch(rows: np.ndarray, seq: np.ndarray, ack: np.ndarray) -> None:
    """Set sequence and acknowledgement numbers in frames built with 0 and 0, fixing the TCP
    checksum (RFC 1624: the payload is the same in every frame)."""
    for at, v in ((38, seq), (42, ack)):
        for k in range(4):
            rows[..., at + k] = (v >> (24 - 8 * k)) & 0xFF
    csum = (rows[..., 50].astype(np.int64) << 8) | rows[..., 51]
    t = (~csum & 0xFFFF) + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
    for _ in range(3):
        t = (t & 0xFFFF) + (t >> 16)
    csum = ~t & 0xFFFF
    rows[..., 50] = csum >> 8
    rows[..., 51] = csum & 0xFF


def downloads(views: list[tuple[bytes, bytes, int, int]], n: int, full: bool):
    """n packets in groups of 32 (one per flow): data, data, ACK, data, data, ACK, ...; the
    batch arrays (buf, offset, caplen, wire_len, linktype, ts)."""
    data_len = HEAD + MSS if full else HEAD
    data_t = np.array([np.frombuffer(tcp_frame(src=server, dst=public, sport=sport,
                                               dport=dport, seq=0, ack=0, flags=TCP_ACK,
                                               window=65535, payload_len=MSS), np.uint8)
                       for public, server, dport, sport in views])[:, :data_len]
    ack_t = np.array([np.frombuffer(tcp_frame(src=_client(i)[0], dst=_client(i)[1],
                                              sport=_client(i)[2], dport=443, seq=0, ack=0,
                                              flags=TCP_ACK, window=CLIENT_WIN), np.uint8)
                      for i in range(FLOWS)])
    cycles = -(-n // (3 * FLOWS))
    cycle = FLOWS * (2 * data_len + HEAD)
    buf = np.empty(cycles * cycle, np.uint8)
    flat = buf.reshape(cycles, cycle)
    c = np.arange(cycles, dtype=np.int64)[:, None]
    server_seq = 5000 + (2 * c) * MSS  # first data segment of the cycle
    for k in range(2):
        rows = flat[:, k * FLOWS * data_len:(k + 1) * FLOWS * data_len].reshape(
            cycles, FLOWS, data_len)
        rows[:] = data_t
        _patch(rows, np.broadcast_to((server_seq + k * MSS) & 0xFFFFFFFF, (cycles, FLOWS)),
               np.full((cycles, FLOWS), 1000, np.int64))
    rows = flat[:, 2 * FLOWS * data_len:].reshape(cycles, FLOWS, HEAD)
    rows[:] = ack_t
    _patch(rows, np.full((cycles, FLOWS), 1000, np.int64),
           np.broadcast_to((server_seq + 2 * MSS) & 0xFFFFFFFF, (cycles, FLOWS)))
    caplen = np.tile(np.repeat(np.array([data_len, data_len, HEAD], np.uint32), FLOWS), cycles)
    wire = np.tile(np.repeat(np.array([HEAD + MSS, HEAD + MSS, HEAD], np.uint32), FLOWS), cycles)
    offset = np.zeros(len(caplen), np.int64)
    np.cumsum(caplen[:-1], out=offset[1:])
    ts = 1_000_000 * US + np.arange(len(caplen), dtype=np.int64) * 100
    return (buf, offset[:n], caplen[:n], wire[:n], np.ones(n, np.uint16), ts[:n])


def measure(cfg: HostConfig, entries: list[bytes], batch: tuple, size: int, repeat: int,
            install: bool) -> dict[str, Any]:
    pristine, offset, caplen, wire, linktype, ts = batch
    n = len(offset)
    buf = np.empty_like(pristine)
    verdict = np.empty(n, np.int8)
    reason = np.empty(n, np.int16)
    returned = np.empty(n, np.int64)
    select = np.ones(n, np.bool_)
    times = []
    for _ in range(repeat + 1):  # the first run loads the compiled code
        engine = PnicEngine(2 * FLOWS, Classifier(cfg.machines))
        for raw in entries if install else ():
            engine.insert(raw)
        np.copyto(buf, pristine)
        processed = 0
        start = time.perf_counter()
        for lo in range(0, n, size):
            s = slice(lo, min(lo + size, n))
            processed += engine.process(buf, offset[s], caplen[s], wire[s], linktype[s], ts[s],
                                        select[s], verdict[s], reason[s], returned[s])
        times.append(time.perf_counter() - start)
    digest = hashlib.sha256()
    for a in (verdict, reason, buf, engine.entries):
        digest.update(a.tobytes())
    seconds = min(times[1:])
    return {"packets": n, "batch": size, "processed": processed, "seconds": round(seconds, 4),
            "packets_per_s": round(n / seconds), "digest": digest.hexdigest()[:12]}


@click.command()
@click.option("--packets", default=1 << 20, show_default=True, help="Packets per case.")
@click.option("--repeat", default=5, show_default=True, help="Runs per case; the best counts.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results here.")
def bench(packets: int, repeat: int, json_path: str | None) -> None:
    console = Console()
    cfg = load_config(CONFIG)
    entries, views = handshakes(cfg)
    with console.status("building the frames"):
        header_only = downloads(views, packets, full=False)
        full_size = downloads(views, packets, full=True)
    cases = {
        "header-only, one batch": (header_only, packets, True),
        "full-size, batches of 65536": (full_size, 65536, True),
        "miss path (empty cache), header-only": (header_only, packets, False),
    }
    results = []
    for name, (batch, size, install) in cases.items():
        with console.status(f"measuring {name}"):
            results.append({"case": name, **measure(cfg, entries, batch, size, repeat, install)})
    info = machine()
    console.print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
                  f"numba {info['numba']}, {info['system']}", soft_wrap=True)
    console.print(f"{FLOWS} NAT'ed TCP elephants, {packets:,} packets per case, best of "
                  f"{repeat} runs", soft_wrap=True)
    table = Table()
    for column, justify in (("case", "left"), ("packets/s", "right"), ("ns/packet", "right"),
                            ("processed", "right"), ("digest", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in results:
        table.add_row(str(r["case"]), f"{r['packets_per_s']:,}",
                      f"{1e9 / r['packets_per_s']:.0f}", f"{r['processed']:,}", str(r["digest"]))
    console.print(table)
    if json_path:
        doc = {"machine": info, "flows": FLOWS, "packets": packets, "repeat": repeat,
               "results": results}
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    bench()
