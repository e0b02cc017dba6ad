"""Trace I/O against its baseline in one run: reading classic pcap into batches, writing the
output pcap, formatting the verdicts file, and `flowshift replay --offload elephant` end to
end, each with the code of today and with the code before (bench/baseline_io.py).

    python bench/bench_trace_io.py [--workdir DIR] [--out-dir DIR] [--repeat N] [--json PATH]

The trace is bench/bench_offload.py's elephant-heavy gateway trace (flowshift.gen, 2.2 million
packets of mostly full-size frames), generated once per work dir, and the same packets as
pcapng (editcap, when installed). Writes go to --out-dir
(default /dev/shm: the page cache's cost without the disk's), and once to /dev/null (the
writer's own cost). Every figure
is the best of --repeat runs, baseline and today's code taking turns; wall seconds and the
process's CPU seconds are both kept (the machine may be shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

import baseline_io
from bench_offload import CONFIG, bench_trace
from common import machine
from flowshift import replay as replay_mod
from flowshift._verdict_rows import rows_text
from flowshift.packet.batch import Batch, read_batches
from flowshift.packet.pcap import PcapWriter, open_trace

BATCH = replay_mod.BATCH
DIGESTS: dict[str, set[str]] = {}  # of the replay's --out and --verdicts, by code
# stages whose baseline runs once (the per-frame pcapng reader takes a minute here)
SLOW_BASELINE = {"read pcapng into batches"}
HELD = 8  # batches held in memory for the write and verdict stages, written over and over


def baseline_batches(path: Path | str, batch_size: int = BATCH, reuse: bool = False
                     ) -> Iterator[Batch]:
    with open_trace(path) as reader:
        header = reader.pcap_header
    assert header is not None, "the benchmark reads classic pcap"
    return baseline_io._pcap_batches(os.fspath(path), header, batch_size, reuse)


def pcapng_copy(trace: Path, console: Console) -> Path | None:
    """The trace as pcapng (editcap), made once beside it; None without editcap."""
    ng = trace.with_suffix(".pcapng")
    if not ng.exists():
        if shutil.which("editcap") is None:
            console.print("editcap not found: no pcapng figure")
            return None
        console.print(f"writing {ng} ...")
        subprocess.run(["editcap", "-F", "pcapng", str(trace), str(ng)], check=True)
    return ng


def timed(run: Callable[[], int]) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    n = run()
    return n, time.perf_counter() - wall, time.process_time() - cpu


def read(reader: Callable[..., Iterator[Batch]], trace: Path) -> int:
    return sum(len(b) for b in reader(trace, BATCH, reuse=True))


def write(batches: list[Batch], total: int, out: Path, baseline: bool) -> int:
    w = PcapWriter(out)
    bulk = baseline_io.write_batch if baseline else PcapWriter.write_batch
    n = 0
    with w:
        while n < total:
            for b in batches:
                bulk(w, b.ts_ns, b.buf, b.offset, b.caplen, b.wire_len)
                n += len(b)
    if out.is_file():
        out.unlink()
    return n


def verdicts(batches: list[Batch], total: int, out: Path, baseline: bool) -> int:
    """Rows as a replay of an elephant trace writes them: a handful of distinct results, the
    packets that leave numbered."""
    fmt = baseline_io.rows_text if baseline else rows_text
    middles = [b",gateway,egress,forward,accept (established),pnic,",
               b",gateway,ingress,forward,accept (established),pnic,",
               b",gateway,egress,forward,accept (new),vnic,", b",,,bypass,not-ip,,"]
    first = int(batches[0].ts_ns[0])
    n = out_base = 0
    with open(out, "wb") as f:
        while n < total:
            for b in batches:
                k = len(b)
                middle = (b.caplen.astype(np.int64) * 7 + np.arange(k)) % len(middles)
                leaving = middle < 3
                out_index = np.where(leaving, np.cumsum(leaving) - 1 + out_base, -1)
                f.write(fmt(n, b.ts_ns, first, middle, middles, out_index))
                out_base += int(leaving.sum())
                n += k
    out.unlink()
    return n


def replay(trace: Path, out_dir: Path, baseline: bool, outputs: bool) -> int:
    """One `flowshift replay --offload elephant`; with `outputs`, --out and --verdicts too."""
    saved = (replay_mod.read_batches, PcapWriter.write_batch, replay_mod.rows_text)
    if baseline:
        replay_mod.read_batches = baseline_batches  # type: ignore[assignment]
        PcapWriter.write_batch = baseline_io.write_batch  # type: ignore[method-assign]
        replay_mod.rows_text = baseline_io.rows_text  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            extra = {"out": Path(tmp) / "o.pcap", "verdicts": Path(tmp) / "v.csv"} if (
                outputs) else {}
            report = replay_mod.run_replay(trace, CONFIG, offload="elephant", progress=False,
                                           **extra)
            if outputs:
                digest = hashlib.sha256()
                for path in extra.values():
                    with open(path, "rb") as f:
                        digest.update(hashlib.file_digest(f, "sha256").digest())
                DIGESTS.setdefault("baseline" if baseline else "today", set()).add(
                    digest.hexdigest())
    finally:
        replay_mod.read_batches, PcapWriter.write_batch, replay_mod.rows_text = saved
    return int(report["trace"]["packets"])


def best(run: Callable[[], int], repeat: int) -> dict[str, float]:
    runs = [timed(run) for _ in range(repeat)]
    n, wall, cpu = min(runs, key=lambda r: r[1])
    return {"packets": n, "seconds": round(wall, 4), "cpu_seconds": round(cpu, 4),
            "packets_per_s": round(n / wall), "cpu_packets_per_s": round(n / max(cpu, 1e-9))}


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the generated trace here (reused when present).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the writes go (default /dev/shm, else the work dir).")
@click.option("--flows", default=1500, show_default=True, help="Flows of the generated trace.")
@click.option("--repeat", default=3, show_default=True, help="Runs per stage; the best counts.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(workdir: Path | None, out_dir: Path | None, flows: int, repeat: int,
         json_path: Path | None) -> None:
    console = Console()
    work, trace, info = bench_trace(workdir, flows, console)
    if out_dir is None:
        out_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    total = int(info["packets"])
    size = trace.stat().st_size

    # warm up: the compiled code loaded, the trace in the page cache
    for reader in (baseline_batches, read_batches):
        read(reader, trace)
    held = []
    for b in read_batches(trace, BATCH):
        held.append(b)
        if len(held) == HELD:
            break
    held_bytes = sum(int(b.caplen.sum(dtype=np.int64)) + 16 * len(b) for b in held)

    stages: list[tuple[str, Callable[[bool], int]]] = [
        ("read pcap into batches", lambda base: read(
            baseline_batches if base else read_batches, trace)),
    ]
    ng = pcapng_copy(trace, console)
    if ng is not None:  # before: the per-frame reader's frames gathered into arrays
        stages.append(("read pcapng into batches", lambda base: read(
            baseline_io.read_batches if base else read_batches, ng)))
    stages += [
        ("pack pcap records (to /dev/null)", lambda base: write(
            held, total, Path(os.devnull), base)),
        ("write pcap", lambda base: write(held, total, out_dir / "bench-io.pcap", base)),
        ("write verdict rows", lambda base: verdicts(held, total, out_dir / "bench-io.csv",
                                                     base)),
        ("replay --offload elephant", lambda base: replay(trace, out_dir, base, False)),
        ("replay --offload elephant --out --verdicts",
         lambda base: replay(trace, out_dir, base, True)),
    ]
    results: dict[str, Any] = {"machine": machine(), "trace": {**info, "file_bytes": size},
                               "out_dir": os.fspath(out_dir), "repeat": repeat, "stages": {}}
    for name, run in stages:
        with console.status(f"measuring {name}"):
            pair: dict[str, list[tuple[int, float, float]]] = {"baseline": [], "today": []}
            for k in range(repeat):  # taking turns: a busy moment hits both alike
                if k == 0 or name not in SLOW_BASELINE:
                    pair["baseline"].append(timed(lambda run=run: run(True)))
                pair["today"].append(timed(lambda run=run: run(False)))
        entry = {}
        for which, runs in pair.items():
            n, wall, cpu = min(runs, key=lambda r: r[1])
            entry[which] = {"packets": n, "seconds": round(wall, 4), "cpu_seconds": round(cpu, 4),
                            "packets_per_s": round(n / wall),
                            "cpu_packets_per_s": round(n / max(cpu, 1e-9))}
        entry["speedup"] = round(entry["baseline"]["seconds"] / entry["today"]["seconds"], 2)
        results["stages"][name] = entry

    same = len(DIGESTS.get("baseline", set()) | DIGESTS.get("today", set())) == 1
    results["replay_outputs_identical"] = same
    m = results["machine"]
    table = Table(title=f"flowshift trace I/O — {m['cpu']}, {m['cores']} cores, {m['memory']}, "
                        f"Python {m['python']}, numba {m['numba']}")
    table.add_column("stage")
    table.add_column("today pkt/s", justify="right")
    table.add_column("baseline pkt/s", justify="right")
    table.add_column("×", justify="right")
    table.add_column("today CPU pkt/s", justify="right")
    table.add_column("baseline CPU pkt/s", justify="right")
    for name, e in results["stages"].items():
        table.add_row(name, f"{e['today']['packets_per_s']:,}",
                      f"{e['baseline']['packets_per_s']:,}", f"{e['speedup']}",
                      f"{e['today']['cpu_packets_per_s']:,}",
                      f"{e['baseline']['cpu_packets_per_s']:,}")
    console.print(f"trace: {total:,} packets, {size / 1e9:.2f} GB ({trace}); writes to "
                  f"{out_dir}, {HELD} batches ({held_bytes / 1e6:,.0f} MB) written over and over; "
                  f"best of {repeat}", soft_wrap=True)
    console.print(table)
    console.print("replay outputs (--out, --verdicts) of today and the baseline: "
                  + ("byte-identical" if same else "DIFFERENT"))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
