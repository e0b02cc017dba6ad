"""Scale-out: a sharded replay and a sweep on local workers, each against its serial baseline
measured in the same run, and the start-up time of the executors.

    python bench/bench_scale.py [--flows N] [--workers N] [--workdir DIR] [--json PATH]

Uses bench/offload-host.toml and the elephant-heavy gateway trace bench/bench_offload.py
builds (generated once per work dir). Measures:

- `replay --offload elephant` serial, then `--workers N` on plain processes and on a local
  Dask cluster (started beforehand, its start-up reported apart); with the split, replay and
  merge times of the sharded runs; on processes, also with every shard reading the whole
  trace (`read="whole"`) against the shards reading it together through a ring;
- the same with `--out` and `--verdicts`: the serial outputs' cost over the report-only run,
  against the time this disk needs for their bytes (its direct write and read rates,
  measured on a 1 GiB file in the work dir), and the sharded runs' merge (the shards' rows
  scattered to input order, their output packets read back and copied);
- a generated trace of 12,000 short connections and no elephant (mostly software work:
  compute-bound), serial against `--workers N`;
- a sweep of 8 points (pnic.capacity × offload.elephant_packets) on N workers against the same
  8 replays one after another in this process;
- the start-up of each executor: opening it and a first small sharded replay (workers load
  flowshift and its compiled kernels); a full sharded replay follows, not measured, as the
  serial runs follow one: the measured runs find the workers warm, their memory grown.

Beside each wall time it gives processor time: the serial run's, and the parallel run's on its
critical path (the slowest shard, its reading included, + merge; for a sweep, the
busiest worker). On a machine shared with other work, wall-time ratios fall towards 1 or
below (Linux's autogroup gives a session one share of the processors, however many
processes it runs) while the processor-time ratio shows what an idle machine with a core per
worker would approach (for a sweep: the points' processor times, alone, scheduled longest
first on the workers).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from bench_offload import CONFIG, bench_trace
from common import machine
from flowshift.cluster import dask_available, open_executor
from flowshift.config import load_config
from flowshift.gen import TraceSpec, generate
from flowshift.packet.ahead import spare_cores
from flowshift.packet.direct import ALIGN, DirectReader, DirectWriter, aligned_empty
from flowshift.replay import run_replay
from flowshift.shard_replay import run_sharded
from flowshift.sweep import execute, parse_vary, plan_sweep, preload_plots

SWEEP = ("pnic.capacity=64,4096", "offload.elephant_packets=8,32,128,512")
MICE_FLOWS = 12_000


def serial_replay(trace: Path, outputs: bool, work: Path, read_ahead: bool | None = None
                  ) -> dict[str, Any]:
    """A serial replay; `read_ahead`: as run_replay's (None: the default, reading ahead in a
    thread when there is a core to spare)."""
    kw: dict[str, Any] = {"out": work / "s.pcap", "verdicts": work / "s.csv"} if outputs else {}
    cpu = time.process_time()
    report = run_replay(trace, CONFIG, offload="elephant", progress=False,
                        read_ahead=read_ahead, **kw)
    report["timing"]["cpu_seconds"] = time.process_time() - cpu
    return report


LABELS = {False: "report only", True: "report + out + verdicts"}
DISK_PROBE = 1 << 30  # bytes written and read back to measure the disk


def disk_rates(work: Path) -> tuple[float, float]:
    """GB/s of direct writes and reads (as the outputs are written, and as a sharded merge
    reads its shards' files) in `work`, through one reused buffer."""
    path = work / "disk-probe.bin"
    try:
        start = time.perf_counter()
        with DirectWriter(path) as w:
            chunk = np.full(1 << 24, 7, np.uint8)
            for _ in range(DISK_PROBE // len(chunk)):
                w.write(chunk)
        wrote = time.perf_counter() - start
        start = time.perf_counter()
        with DirectReader(path) as r:
            buf = aligned_empty(len(chunk) + 2 * ALIGN)
            for at in range(0, DISK_PROBE, len(chunk)):
                r.read(buf, at, at + len(chunk))
        read = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return DISK_PROBE / wrote / 1e9, DISK_PROBE / read / 1e9


def outputs_cost(serial: dict[bool, dict[str, Any]], work: Path) -> dict[str, Any]:
    """What the serial run's outputs cost over its report-only run, against what the disk
    needs for their bytes."""
    written = sum(p.stat().st_size for p in (work / "s.pcap", work / "s.csv"))
    write_rate, read_rate = disk_rates(work)
    plain, outs = serial[False]["wall_seconds"], serial[True]["wall_seconds"]
    return {"report_only_s": plain, "with_outputs_s": outs, "outputs_s": outs - plain,
            "ratio": outs / plain, "bytes": written, "disk_write_gb_s": write_rate,
            "disk_read_gb_s": read_rate, "disk_s": written / write_rate / 1e9}


def sharded_row(r: dict[str, Any], serial: dict[str, Any], rows: list[tuple[str, str, str]],
                label: str, one_core: dict[str, Any] | None = None) -> dict[str, Any]:
    """`one_core`: the serial run reading in its main thread, for a second ratio."""
    s = r["sharding"]
    wall, serial_s, serial_cpu = r["timing"]["wall_seconds"], serial["wall_seconds"], serial[
        "cpu_seconds"]
    path = critical_cpu(r)
    also = (f", {one_core['wall_seconds'] / wall:.2f}× serial reading in its main thread"
            if one_core is not None else "")
    rows.append((label, f"{wall:.2f} s", f"{serial_s / wall:.2f}× serial{also} (read: {s['read']}; "
                 f"shards {s['replay_seconds']:.2f} s, of which split {s['split_seconds']:.2f} s; "
                 f"merge "
                 f"{s['merge_seconds']:.2f} s); processor time on the critical path "
                 f"{path:.2f} s: {serial_cpu / path:.2f}× serial's"))
    return {"serial_s": serial_s, "sharded_s": wall, "speedup": serial_s / wall,
            "speedup_one_core": (one_core["wall_seconds"] / wall if one_core is not None
                                 else None),
            "read": s["read"],
            "split_s": s["split_seconds"], "split_cpu_s": s["split_cpu_seconds"],
            "replay_s": s["replay_seconds"], "merge_s": s["merge_seconds"],
            "merge_cpu_s": s["merge_cpu_seconds"], "packets": s["packets"],
            "shard_cpu_s": [x["timing"]["cpu_seconds"] for x in r["shards"]],
            "serial_cpu_s": serial_cpu, "critical_path_cpu_s": path,
            "idle_speedup_estimate": serial_cpu / path}


def critical_cpu(report: dict[str, Any]) -> float:
    """Processor seconds on a sharded run's critical path: the slowest shard (its reading and
    the split included), then the merge. On an idle machine with a core per
    worker, the wall time tends to this."""
    s = report["sharding"]
    return s["merge_cpu_seconds"] + max(r["timing"]["cpu_seconds"] for r in report["shards"])


def makespan(seconds: list[float], workers: int) -> float:
    """Longest worker's load when each point goes to the least loaded worker, longest first."""
    loads = [0.0] * workers
    for t in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += t
    return max(loads)


def sharded_replay(trace: Path, pool: Any, outputs: bool, work: Path, read: str = "auto"
                   ) -> dict[str, Any]:
    kw: dict[str, Any] = {"out": work / "p.pcap", "verdicts": work / "p.csv"} if outputs else {}
    return run_sharded(trace, CONFIG, workers=pool.workers, pool=pool, offload="elephant",
                       progress=False, read=read, **kw)


def head(trace: Path, n: int, path: Path) -> Path:
    """The first n packets of a trace."""
    from flowshift.packet.batch import read_batches
    from flowshift.packet.pcap import PcapWriter

    batch = next(read_batches(trace, n))
    with PcapWriter(path) as w:
        w.write_batch(batch.ts_ns, batch.buf, batch.offset, batch.caplen, batch.wire_len)
    return path


def mice_trace(work: Path) -> tuple[Path, dict[str, Any]]:
    """Many short connections and no elephants: a replay that is mostly software work."""
    path = work / f"mice-{MICE_FLOWS}.pcap"
    info_path = path.with_suffix(".json")
    if not path.exists() or not info_path.exists():
        s = generate(TraceSpec(flows=MICE_FLOWS, duration_s=60, seed=12, elephants=0,
                               elephant_share=0.5, udp_share=0.15, icmp_share=0.02,
                               gateway=load_config(CONFIG)), path)
        info_path.write_text(json.dumps({"packets": s.packets, "flows": s.flows}))
    return path, json.loads(info_path.read_text())


def mice_figures(work: Path, pool: Any) -> dict[str, Any]:
    """The compute-bound case: serial against sharded on the mice trace."""
    part, info = mice_trace(work)
    run_replay(part, CONFIG, progress=False)  # warm
    cpu = time.process_time()
    serial = run_replay(part, CONFIG, progress=False)["timing"]["wall_seconds"]
    serial_cpu = time.process_time() - cpu
    r = run_sharded(part, CONFIG, workers=pool.workers, pool=pool, progress=False)
    wall = r["timing"]["wall_seconds"]
    path = critical_cpu(r)
    return {**info, "serial_s": serial, "sharded_s": wall, "speedup": serial / wall,
            "split_s": r["sharding"]["split_seconds"], "shard_packets": r["sharding"]["packets"],
            "serial_cpu_s": serial_cpu, "critical_path_cpu_s": path,
            "idle_speedup_estimate": serial_cpu / path}


def sweep_figures(trace: Path, pool: Any, work: Path, tiny: Path) -> dict[str, Any]:
    """The sweep as `flowshift sweep --workers 1` runs it (one worker, the points one after
    another, then the table and plots) against the same on `pool`: both warmed up first."""
    def plan(name: str) -> Any:
        return plan_sweep([trace], load_config(CONFIG), [parse_vary(v) for v in SWEEP],
                          work / name, offloads=["elephant"])

    one, _ = started("processes", 1, tiny)
    try:
        start = time.perf_counter()
        serial_rows = execute(plan("sweep-1"), one, progress=False)
        one_by_one = time.perf_counter() - start
    finally:
        one.close()
    cpu = [r["cpu_seconds"] for r in serial_rows]
    start = time.perf_counter()
    rows = execute(plan("sweep-n"), pool, progress=False)
    parallel = time.perf_counter() - start
    # each point costs what it cost alone: the schedule's bound on an idle machine
    span = makespan(cpu, pool.workers)
    assert len(rows) == len(cpu)
    return {"points": len(rows), "one_after_another_s": one_by_one,
            # as `execute` decides: points read ahead where the workers leave a core free
            "read_ahead_one": spare_cores(1), "read_ahead_parallel": spare_cores(pool.workers),
            "parallel_s": parallel, "speedup": one_by_one / parallel,
            "one_after_another_cpu_s": sum(cpu), "parallel_makespan_cpu_s": span,
            "idle_speedup_estimate": sum(cpu) / span}


def started(kind: str, workers: int, tiny: Path) -> tuple[Any, float]:
    """An executor and its cold start: opening it, then a first small sharded replay (the
    workers load flowshift and its compiled kernels). Later runs find them warm."""
    start = time.perf_counter()
    pool = open_executor(workers, kind=kind)
    run_sharded(tiny, CONFIG, workers=workers, pool=pool, progress=False)
    return pool, time.perf_counter() - start


@click.command()
@click.option("--flows", default=1500, show_default=True, help="Flows of the generated trace.")
@click.option("--workers", default=2, show_default=True, help="Workers of the parallel runs.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the generated trace here (reused when present).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(flows: int, workers: int, workdir: Path | None, json_path: Path | None) -> None:
    console = Console()
    work, trace, info = bench_trace(workdir, flows, console)
    results: dict[str, Any] = {"machine": machine(), "trace": info, "workers": workers}
    preload_plots()  # as `flowshift sweep` does, before its workers fork
    rows: list[tuple[str, str, str]] = []
    results["startup"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        tiny = head(trace, 2000, scratch / "tiny.pcap")
        serial_replay(trace, False, scratch)  # warm: page cache and compiled kernels
        serial = {out: serial_replay(trace, out, scratch)["timing"] for out in (False, True)}
        for out, timing in serial.items():
            rows.append((f"replay serial ({LABELS[out]}; read ahead: {timing['read_ahead']})",
                         f"{timing['wall_seconds']:.2f} s",
                         f"baseline; {timing['cpu_seconds']:.2f} s processor time"))
        # the same reading in its main thread: what a replay takes of one core
        one_core = serial_replay(trace, False, scratch, read_ahead=False)["timing"]
        results["serial_one_core"] = one_core
        rows.append(("replay serial (report only), reading in its main thread",
                     f"{one_core['wall_seconds']:.2f} s",
                     f"{one_core['wall_seconds'] / serial[False]['wall_seconds']:.2f}× the "
                     f"default's time; {one_core['cpu_seconds']:.2f} s processor time"))
        results["serial"] = outputs_cost(serial, scratch)
        cost = results["serial"]
        rows.append(("serial outputs' cost (--out + --verdicts)",
                     f"{cost['outputs_s']:.2f} s",
                     f"{cost['ratio']:.2f}× report only; they write "
                     f"{cost['bytes'] / 1e9:.2f} GB, which this disk takes in "
                     f"{cost['disk_s']:.2f} s ({cost['disk_write_gb_s']:.2f} GB/s direct; "
                     f"direct reads {cost['disk_read_gb_s']:.2f} GB/s)"))
        # plain processes first: forked from this single-threaded process, they start warm
        for kind in ["processes"] + (["dask"] if dask_available() else []):
            pool, cold = started(kind, workers, tiny)
            results["startup"][kind] = cold
            try:
                # warm, as the serial runs were: the workers' memory grown to a full replay's
                sharded_replay(trace, pool, False, scratch)
                for out, timing in serial.items():
                    r = sharded_replay(trace, pool, out, scratch)
                    results[f"{kind}-{'outputs' if out else 'report'}"] = sharded_row(
                        r, timing, rows, f"replay --workers {workers} on {kind} "
                                         f"({LABELS[out]})", None if out else one_core)
                if kind == "processes":
                    whole = sharded_replay(trace, pool, False, scratch, read="whole")
                    results["processes-whole"] = sharded_row(
                        whole, serial[False], rows, f"replay --workers {workers} on processes "
                                                    "(report only), each shard reading the "
                                                    "whole trace (no ring)", one_core)
                    results["mice"] = mice = mice_figures(work, pool)
                    rows.append((f"replay, mice trace ({mice['packets']:,} packets, "
                                 f"{MICE_FLOWS:,} flows), serial", f"{mice['serial_s']:.2f} s",
                                 f"baseline; {mice['serial_cpu_s']:.2f} s processor time"))
                    rows.append((f"the same, --workers {workers} on processes",
                                 f"{mice['sharded_s']:.2f} s",
                                 f"{mice['speedup']:.2f}× serial (split in each shard "
                                 f"{mice['split_s']:.2f} s); processor time on the critical "
                                 f"path: {mice['idle_speedup_estimate']:.2f}× serial's"))
                    results["sweep"] = sweep = sweep_figures(trace, pool, scratch, tiny)
                    rows.append((f"sweep, {sweep['points']} points on 1 worker (table and "
                                 f"plots included; read ahead: {sweep['read_ahead_one']})",
                                 f"{sweep['one_after_another_s']:.2f} s", "baseline"))
                    rows.append((f"sweep, {sweep['points']} points on {workers} workers "
                                 f"(read ahead: {sweep['read_ahead_parallel']})",
                                 f"{sweep['parallel_s']:.2f} s",
                                 f"{sweep['speedup']:.2f}× one after another; processor time: "
                                 f"{sweep['idle_speedup_estimate']:.2f}× (busiest worker's "
                                 f"{sweep['parallel_makespan_cpu_s']:.1f} s of "
                                 f"{sweep['one_after_another_cpu_s']:.1f} s)"))
            finally:
                pool.close()
    for kind, seconds in results["startup"].items():
        rows.append((f"start-up: {kind}, to a first small replay", f"{seconds:.2f} s",
                     f"{workers} workers"))
    m = results["machine"]
    table = Table(title=f"flowshift scale-out benchmark — {m['cpu']}, {m['cores']} cores, "
                        f"{m['memory']}, Python {m['python']}; trace {info['packets']:,} packets")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("against")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
