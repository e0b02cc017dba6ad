"""Packet-layer throughput: trace reading frame by frame, parsing into flow keys, batch reading.

    python bench/bench_packet.py [--packets N] [--json PATH]

Writes a trace of at least N packets (default 1,000,000) to a temporary folder, with the
traffic generator (flowshift.gen) when it is there and works, else with simple TCP frames of
mixed sizes built here, then measures each stage in packets per second on this machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from common import machine
from flowshift.packet.batch import read_batches
from flowshift.packet.build import tcp_frame
from flowshift.packet.parse import parse
from flowshift.packet.pcap import PcapWriter, open_trace
from flowshift.packet.view import TCP_ACK, TCP_PSH

PACKETS_PER_FLOW = 100  # the generator's traffic averages about 150: aim over the target


def generated_trace(path: Path, packets: int) -> str | None:
    """Write the generator's traffic; None when the generator is missing or fails."""
    try:
        from flowshift.gen import TraceSpec, generate
    except ImportError:
        return None
    flows = max(100, packets // PACKETS_PER_FLOW)
    try:
        while True:
            spec = TraceSpec(flows=flows, duration_s=max(10.0, flows / 50), elephants=flows // 100)
            if generate(spec, path).packets >= packets:
                return f"flowshift.gen ({flows} flows)"
            flows *= 2
    except Exception as e:  # a broken generator must not stop the benchmark
        print(f"flowshift.gen failed ({e!r}); using built-in frames", file=sys.stderr)
        return None


def builtin_trace(path: Path, packets: int) -> str:
    """TCP frames of 64..1514 bytes over 1,000 IPv4 flows, 1 µs apart."""
    frames = []
    for i in range(1000):
        size = (64, 1514, 576, 1514, 90)[i % 5]
        flow = {
            "src": bytes([10, 0, i >> 8, i & 0xFF]),
            "dst": bytes([198, 51, 100, 1 + i % 200]),
            "sport": 32768 + i,
            "dport": 443,
        }
        frames.append(
            tcp_frame(
                **flow, seq=i, ack=1, flags=TCP_ACK | TCP_PSH, window=501, payload_len=size - 54
            )
        )
    with PcapWriter(path) as w:
        for i in range(packets):
            w.write(1_700_000_000_000_000_000 + i * 1000, frames[i % len(frames)])
    return "built-in TCP frames"


def timed(run: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    n = run()
    return n, time.perf_counter() - start


def iterate(path: Path) -> int:
    n = 0
    with open_trace(path) as reader:
        for _ in reader:
            n += 1
    return n


def parse_keys(path: Path) -> int:
    n = 0
    with open_trace(path) as reader:
        for f in reader:
            parse(f.data, f.linktype, f.wire_len).key()
            n += 1
    return n


def batches(path: Path) -> int:
    return sum(len(b) for b in read_batches(path))


@click.command()
@click.option("--packets", default=1_000_000, show_default=True, help="Packets in the trace.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results here.")
@click.option("--repeat", default=3, show_default=True, help="Runs per stage; the best counts.")
def bench(packets: int, json_path: str | None, repeat: int) -> None:
    console = Console()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="flowshift-bench-") as tmp:
        path = Path(tmp) / "bench.pcap"
        with console.status("writing the trace"):
            source = generated_trace(path, packets) or builtin_trace(path, packets)
        with open_trace(path) as reader:
            size = reader.size
        # compile (or load) the batch decoder before timing it
        small = Path(tmp) / "small.pcap"
        with PcapWriter(small) as w:
            w.write(0, bytes(60))
        batches(small)

        stages = {
            "frames (per-frame iteration)": iterate,
            "flow keys (iterate + parse + key)": parse_keys,
            "batches (arrays, 65536 per batch)": batches,
        }
        results = []
        for name, run in stages.items():
            with console.status(f"measuring {name}"):
                runs = [timed(lambda run=run: run(path)) for _ in range(repeat)]
            n, seconds = min(runs, key=lambda r: r[1])
            results.append(
                {
                    "stage": name,
                    "packets": n,
                    "seconds": round(seconds, 4),
                    "packets_per_s": round(n / seconds),
                    "mbytes_per_s": round(size / seconds / 1e6, 1),
                }
            )

    console.print(
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"numpy {info['numpy']}, numba {info['numba']}",
        soft_wrap=True,
    )
    console.print(
        f"trace: {results[0]['packets']:,} packets, {size / 1e6:,.0f} MB, {source}; "
        f"best of {repeat} runs",
        soft_wrap=True,
    )
    table = Table()
    table.add_column("stage")
    table.add_column("packets/s", justify="right")
    table.add_column("MB/s", justify="right")
    table.add_column("seconds", justify="right")
    for r in results:
        table.add_row(
            r["stage"], f"{r['packets_per_s']:,}", f"{r['mbytes_per_s']:,}", f"{r['seconds']}"
        )
    console.print(table)
    if json_path:
        doc = {
            "machine": info,
            "trace": {"packets": results[0]["packets"], "bytes": size, "source": source},
            "repeat": repeat,
            "results": results,
        }
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    bench()
