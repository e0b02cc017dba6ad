"""A replay split across workers: one full `run_replay` per shard on an executor (cluster.py),
each keeping its packets of the trace (shard.Part: split by outside endpoint; shards on one
machine read it together, shard_ring.py), and the outputs merged back in input order
(shard_merge.py). docs/scale.md says which results
are exactly the serial ones and which differ, by design, where the host keeps state across
flows.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from flowshift.cluster import Executor, open_executor
from flowshift.config import HostConfig, parse_config, to_dict
from flowshift.flow import NS_PER_S as NS
from flowshift.output import AtomicOutputs
from flowshift.packet.pcap import open_trace
from flowshift.replay import (
    ReplayError,
    _temporaries,
    check_request,
    replay_config,
    run_replay,
    verdicts_header,
    write_plot_file,
    write_report,
)
from flowshift.report import report_options
from flowshift.shard import Part, Placement, place
from flowshift.shard_merge import (
    merge_dumps,
    merge_packets,
    merge_plot_data,
    merge_reports,
    merge_rows,
    write_verdicts,
)
from flowshift.shard_ring import RingPart, RingWatch, create_ring, remove_ring, usable

# What sharding changes, stated in every sharded report (docs/scale.md).
SEMANTICS = {
    "key": "the flow's outside endpoint: egress destination, ingress source (address, "
           "protocol, and the port for TCP/UDP), its hash, or the shard the busiest "
           "endpoints of a sample of the trace are placed in to balance packets; ICMP errors "
           "follow the quoted flow, non-first fragments their first fragment; packets of no "
           "machine go to shard 0",
    "exact": "output packets, verdicts and flow dumps equal the serial run's whenever every "
             "decision is per flow: policy never, or machines that start on the VNIC, with "
             "no PNIC refusal for room, no round-robin pool and no idle return",
    "pnic_capacity": "each shard has its own second cache of capacity / shards entries "
                     "(the remainder to the first shards), as a NIC with per-queue tables",
    "round_robin": "round-robin pools advance per shard",
    "handoff": "a machine that starts on the machine tier hands its chain to its VNIC per "
               "shard, at the first flow the policy wants in that shard",
    "timers": "PNIC reports and idle returns run on each shard's own clock (its packets)",
    "peaks": "flows.peak_first_cache and peak_second_cache are the sums of the shards' peaks",
}


class _Status:
    """What a sharded replay is doing, as a transient status line on stderr (a terminal only)."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        self.status = console.status("") if enabled and console.is_terminal else None
        if self.status is not None:
            self.status.start()

    def show(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)

    def wait(self, futures: list[Any], text: str, watch: RingWatch | None) -> None:
        """Until every future is done, with the shards' progress through the trace when they
        read it through a ring."""
        if self.status is None or watch is None:
            return
        while not all(f.done() for f in futures):
            self.show(f"{text}: {100 * watch.fraction():.0f} %")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()


def shard_capacities(capacity: int, n: int) -> list[int]:
    """capacity / n per shard, the remainder to the first shards: they add up to capacity."""
    return [capacity // n + (1 if k < capacity % n else 0) for k in range(n)]


def replay_part(trace: str, config: dict[str, Any], k: int, n: int, placement: Placement,
                options: dict[str, Any], ring: str | None = None
                ) -> tuple[dict[str, Any], np.ndarray, list[int], int | None, int | None]:
    """Shard k of n's replay; runs on a worker, reading the whole trace, or with `ring` (a
    ring file every shard maps, on one machine: shard_ring.py) its share of it. Arguments are
    plain data for any executor. Returns the report (its `timing` with the worker's
    `cpu_seconds` and the picking's `split_seconds`/`split_cpu_seconds`), the input position
    of each of the shard's packets, the packets of every shard, and the whole trace's first
    and latest packet time."""
    if options.get("pnic") == "process" and multiprocessing.current_process().daemon:
        raise ReplayError("--pnic process needs workers that may start processes: start the "
                          "Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False")
    cpu = time.process_time()
    cfg = parse_config(config, "<shard config>")
    part = Part(trace, cfg, k, n, placement) if ring is None else RingPart(
        trace, cfg, k, n, ring, placement)
    report = run_replay(trace, cfg, progress=False, part=part, **options)
    timing = report["timing"]
    timing["cpu_seconds"] = round(time.process_time() - cpu, 6)
    timing["split_seconds"] = round(part.seconds, 6)
    timing["split_cpu_seconds"] = round(part.cpu_seconds, 6)
    if isinstance(part, RingPart):
        timing["pieces_shared"], timing["pieces_alone"] = part.taken, part.alone
    return report, part.index, part.counts, part.first_ns, part.end_ns


def _out_linktype(trace: str | os.PathLike[str]) -> int:
    """The link type of the output trace: the first frame's, as in the serial run."""
    with open_trace(trace) as reader:
        first = next(iter(reader), None)
        if first is not None:
            return first.linktype
        return reader.pcap_header.linktype if reader.pcap_header else 1


def run_sharded(
    trace: str | os.PathLike[str],
    config: HostConfig | str | os.PathLike[str],
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    executor: str = "auto",
    shard_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    verdicts: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    offload: str | None = None,
    pnic: str = "inline",
    capacity: int | None = None,
    crash_at: float | None = None,
    withdraw_at: float | None = None,
    dump_at: float | None = None,
    dump_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    plot_window: tuple[float | None, float | None] | None = None,
    pool: Executor | None = None,
    read: str = "auto",
) -> dict[str, Any]:
    """`run_replay` over `workers` shards (or every worker of the cluster at `scheduler`);
    the same outputs and report, plus `sharding` and `shards`. `pool`: an executor to use
    (not closed here) instead of opening one. `read`: "auto" (through a ring where the
    shards can share one, docs/scale.md) or "whole" (every shard reads the whole trace).
    Outputs appear whole or not at all, as `run_replay`'s."""
    if read not in ("auto", "whole"):
        raise ReplayError(f"read must be auto or whole, not {read!r}")
    with AtomicOutputs() as files:
        started = time.perf_counter()
        outputs = check_request(trace, out=out, verdicts=verdicts, report=report, plot=plot,
                                dump_path=dump_path, offload=offload, pnic=pnic,
                                capacity=capacity, crash_at=crash_at, withdraw_at=withdraw_at,
                                dump_at=dump_at)
        if shard_dir is not None and not Path(shard_dir).is_dir():
            raise ReplayError(f"--shard-dir {shard_dir}: not a directory")
        cfg = replay_config(config, offload, capacity)
        total_capacity = cfg.pnic.capacity  # shared out among the shards
        temps = _temporaries(files, outputs)  # every output is written here, renamed at the end

        with open_trace(trace) as reader:  # a TraceError, here, for a file that is not a trace
            fmt = reader.format
        own = pool is None
        status = _Status(progress)
        status.show("starting the workers")
        ex = pool if pool is not None else open_executor(workers, scheduler, executor)
        work = Path(tempfile.mkdtemp(prefix="flowshift-shards-", dir=shard_dir))
        futures: list[Any] = []
        ring = None
        try:
            n = workers if workers is not None and scheduler is None else max(ex.workers, 1)
            caps = shard_capacities(total_capacity, n)
            placement = place(trace, cfg, n)
            # shards on this machine, all running at once, read a classic pcap together
            if (read == "auto" and ex.kind != "dask" and n <= ex.workers and fmt == "pcap"
                    and usable(n)):
                ring = create_ring(n)
            base = to_dict(cfg)
            doing = f"replaying {os.path.basename(os.fspath(trace))} in {n} shards on {ex.kind}"
            status.show(doing)
            replayed = time.perf_counter()
            need_rows = verdicts is not None or out is not None
            calls = []
            for k in range(n):
                d = work / f"shard-{k}"
                d.mkdir()
                shard_cfg = dict(base, pnic=dict(base["pnic"], capacity=caps[k]))
                options = {
                    "out": os.fspath(d / "out.pcap") if out is not None else None,
                    "row_data": os.fspath(d / "rows.bin") if need_rows else None,
                    "pnic": pnic, "crash_at": crash_at, "withdraw_at": withdraw_at,
                    "dump_at": dump_at,
                    "dump_path": os.fspath(d / "flows.txt") if dump_at is not None else None,
                    "plot_data": os.fspath(d / "plot.json") if plot is not None else None,
                }
                calls.append((os.fspath(trace), shard_cfg, k, n, placement, options, ring))
            # shards sharing a ring run at once, each on a worker of its own
            futures += (ex.submit_spread(replay_part, calls) if ring is not None else
                        [ex.submit(replay_part, *args) for args in calls])
            status.wait(futures, doing, RingWatch(ring) if ring is not None else None)
            done = [f.result() for f in futures]
            replayed = time.perf_counter() - replayed
            reports = [d[0] for d in done]
            index = [d[1] for d in done]
            counts, first, last = done[0][2], done[0][3], done[0][4]
            status.show("merging the shards")
            merging = time.perf_counter()
            cpu = time.process_time()
            if need_rows:
                rows = merge_rows(index, [work / f"shard-{k}" / "rows.bin" for k in range(n)])
                # the rows are formatted on a thread while the packets are copied (mostly I/O)
                with ThreadPoolExecutor(1, thread_name_prefix="flowshift-merge") as side:
                    if verdicts is not None:
                        written = side.submit(write_verdicts, rows, first if first is not None
                                              else 0, Path(temps["verdicts"]), verdicts_header())
                    if out is not None:
                        merge_packets(rows, [work / f"shard-{k}" / "out.pcap" for k in range(n)],
                                      Path(temps["out"]), _out_linktype(trace))
                    if verdicts is not None:
                        written.result()
                del rows
            if dump_path is not None:
                merge_dumps([work / f"shard-{k}" / "flows.txt" for k in range(n)],
                            Path(temps["dump-flows"]))
            if plot is not None:
                plot_inputs = merge_plot_data([work / f"shard-{k}" / "plot.json" for k in range(n)])
            merging = time.perf_counter() - merging
            merge_cpu = time.process_time() - cpu
        finally:
            status.stop()
            for f in futures:  # a failed shard: the others are of no use
                f.cancel()
            if own:
                ex.close()
            shutil.rmtree(work, ignore_errors=True)
            remove_ring(ring)
        result = merge_reports(reports, index)
        wall = time.perf_counter() - started
        n_in = result["packets"]["in"]
        result["trace"] = {
            "path": os.fspath(trace),
            "format": fmt,
            "linktypes": sorted({lt for r in reports for lt in r["trace"]["linktypes"]}),
            "packets": n_in,
            "first_ts": first / NS if first is not None else None,
            "duration": (last - first) / NS if first is not None and last is not None else 0.0,
            "problem": reports[0]["trace"]["problem"],
        }
        result["options"] = report_options(
            trace, config, outputs, offload=offload, pnic=pnic, capacity=capacity,
            crash_at=crash_at, withdraw_at=withdraw_at, dump_at=dump_at, workers=workers,
            scheduler=scheduler)
        result["config"] = to_dict(cfg)
        result["outputs"] = outputs
        result["timing"] = {
            "wall_seconds": round(wall, 6),
            "packets_per_second": round(n_in / wall, 1) if wall > 0 else 0.0,
        }
        splits = [r["timing"] for r in reports]
        result["sharding"] = {
            "shards": n,
            "packets": counts,
            "pnic_capacity": caps,
            "placed_endpoints": len(placement),
            "cluster": ex.describe(),
            # "ring": the shards read the trace together, each its share of the pieces;
            # "whole": each reads all of it and keeps its packets
            "read": "ring" if ring is not None else "whole",
            # the split is the slowest shard's reading and picking, part of replay_seconds
            "split_seconds": max(t["split_seconds"] for t in splits),
            "replay_seconds": round(replayed, 6),
            "merge_seconds": round(merging, 6),
            "split_cpu_seconds": max(t["split_cpu_seconds"] for t in splits),
            # processor time of the serial part (the shards' own is in shards[k].timing)
            "merge_cpu_seconds": round(merge_cpu, 6),
            "semantics": SEMANTICS,
        }
        result["shards"] = [{k: r[k] for k in ("packets", "tiers", "offloads", "flows", "events",
                                                "schedule", "timing")} for r in reports]
        if plot is not None:
            write_plot_file(temps["plot"], plot, *plot_inputs, result, plot_window)
        if report is not None:
            write_report(temps["report"], report, result)
        return result
