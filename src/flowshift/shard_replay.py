"""A replay split across workers: split by outside endpoint (shard.py), one full `run_replay`
per shard on an executor (cluster.py), and the outputs merged back in input order
(shard_merge.py). docs/scale.md says which results are exactly the serial ones and which
differ, by design, where the host keeps state across flows.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flowshift.cluster import Executor, open_executor
from flowshift.config import HostConfig, load_config, parse_config, to_dict
from flowshift.flow import NS_PER_S as NS
from flowshift.output import AtomicOutputs
from flowshift.replay import (
    ReplayError,
    _temporaries,
    check_request,
    run_replay,
)
from flowshift.shard import split_trace
from flowshift.shard_merge import (
    merge_dumps,
    merge_packets,
    merge_plot_data,
    merge_reports,
    merge_verdicts,
)

# What sharding changes, stated in every sharded report (docs/scale.md).
SEMANTICS = {
    "key": "the flow's outside endpoint: egress destination, ingress source (address, "
           "protocol, and the port for TCP/UDP); ICMP errors follow the quoted flow, "
           "non-first fragments their first fragment; packets of no machine go to shard 0",
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

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()


def shard_capacities(capacity: int, n: int) -> list[int]:
    """capacity / n per shard, the remainder to the first shards: they add up to capacity."""
    return [capacity // n + (1 if k < capacity % n else 0) for k in range(n)]


def replay_shard(trace: str, config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """One shard's replay; runs on a worker. Arguments are plain data for any executor."""
    if options.get("pnic") == "process" and multiprocessing.current_process().daemon:
        raise ReplayError("--pnic process needs workers that may start processes: start the "
                          "Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False")
    cpu = time.process_time()
    report = run_replay(trace, parse_config(config, "<shard config>"), progress=False,
                        **options)
    report["timing"]["cpu_seconds"] = round(time.process_time() - cpu, 6)
    return report


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
) -> dict[str, Any]:
    """`run_replay` over `workers` shards (or every worker of the cluster at `scheduler`);
    the same outputs and report, plus `sharding` and `shards`. `pool`: an executor to use
    (not closed here) instead of opening one. Outputs appear whole or not at all, as
    `run_replay`'s."""
    with AtomicOutputs() as files:
        return _run_sharded(
            trace, config, files, workers=workers, scheduler=scheduler, executor=executor,
            shard_dir=shard_dir, out=out, verdicts=verdicts, report=report, plot=plot,
            offload=offload, pnic=pnic, capacity=capacity, crash_at=crash_at,
            withdraw_at=withdraw_at, dump_at=dump_at, dump_path=dump_path, progress=progress,
            plot_window=plot_window, pool=pool)


def _run_sharded(
    trace: str | os.PathLike[str],
    config: HostConfig | str | os.PathLike[str],
    files: AtomicOutputs,
    *,
    workers: int | None,
    scheduler: str | None,
    executor: str,
    shard_dir: str | os.PathLike[str] | None,
    out: str | os.PathLike[str] | None,
    verdicts: str | os.PathLike[str] | None,
    report: str | os.PathLike[str] | None,
    plot: str | os.PathLike[str] | None,
    offload: str | None,
    pnic: str,
    capacity: int | None,
    crash_at: float | None,
    withdraw_at: float | None,
    dump_at: float | None,
    dump_path: str | os.PathLike[str] | None,
    progress: bool,
    plot_window: tuple[float | None, float | None] | None,
    pool: Executor | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    outputs = check_request(trace, out=out, verdicts=verdicts, report=report, plot=plot,
                            dump_path=dump_path, offload=offload, pnic=pnic,
                            capacity=capacity, crash_at=crash_at, withdraw_at=withdraw_at,
                            dump_at=dump_at)
    if shard_dir is not None and not Path(shard_dir).is_dir():
        raise ReplayError(f"--shard-dir {shard_dir}: not a directory")
    cfg = config if isinstance(config, HostConfig) else load_config(config)
    if offload is not None:
        cfg = replace(cfg, offload=replace(cfg.offload, policy=offload))
    total_capacity = capacity if capacity is not None else cfg.pnic.capacity
    temps = _temporaries(files, outputs)  # every output is written here, renamed at the end
    cfg = replace(cfg, pnic=replace(cfg.pnic, capacity=total_capacity))

    own = pool is None
    status = _Status(progress)
    status.show("starting the workers")
    ex = pool if pool is not None else open_executor(workers, scheduler, executor)
    work = Path(tempfile.mkdtemp(prefix="flowshift-shards-", dir=shard_dir))
    futures: list[Any] = []
    try:
        n = workers if workers is not None and scheduler is None else max(ex.workers, 1)
        status.show(f"splitting {os.path.basename(os.fspath(trace))} into {n} shards")
        cpu = time.process_time()
        split = split_trace(trace, cfg, n, work)
        split_cpu = time.process_time() - cpu
        caps = shard_capacities(total_capacity, n)
        base = to_dict(cfg)
        status.show(f"replaying {n} shards on {ex.kind}")
        replayed = time.perf_counter()
        need_rows = verdicts is not None or out is not None
        for k in range(n):
            d = work / f"shard-{k}"
            d.mkdir()
            shard_cfg = dict(base, pnic=dict(base["pnic"], capacity=caps[k]))
            options = {
                "out": os.fspath(d / "out.pcap") if out is not None else None,
                "verdicts": os.fspath(d / "verdicts.csv") if need_rows else None,
                "pnic": pnic, "crash_at": crash_at, "withdraw_at": withdraw_at,
                "dump_at": dump_at,
                "dump_path": os.fspath(d / "flows.txt") if dump_at is not None else None,
                "origin_ns": split.first_ts, "end_ns": split.last_ts,
                "plot_data": os.fspath(d / "plot.json") if plot is not None else None,
            }
            futures.append(ex.submit(replay_shard, os.fspath(split.paths[k]), shard_cfg,
                                     options))
        reports = [f.result() for f in futures]
        replayed = time.perf_counter() - replayed
        status.show("merging the shards")
        merging = time.perf_counter()
        cpu = time.process_time()
        index = [split.index(k) for k in range(n)]
        if need_rows:
            leaving = merge_verdicts(split.shard, [work / f"shard-{k}" / "verdicts.csv"
                                                   for k in range(n)],
                                     Path(temps["verdicts"]) if verdicts is not None else None)
            if out is not None:
                merge_packets(split.shard, leaving,
                              [work / f"shard-{k}" / "out.pcap" for k in range(n)],
                              Path(temps["out"]),
                              split.linktype)
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
    result = merge_reports(reports, index)
    wall = time.perf_counter() - started
    n_in = result["packets"]["in"]
    first, last = split.first_ts, split.last_ts
    result["trace"] = {
        "path": os.fspath(trace),
        "format": split.format,
        "linktypes": sorted({lt for r in reports for lt in r["trace"]["linktypes"]}),
        "packets": n_in,
        "first_ts": first / NS if first is not None else None,
        "duration": (last - first) / NS if first is not None and last is not None else 0.0,
        "problem": split.problem,
    }
    result["options"] = {
        "trace": os.fspath(trace),
        "config": None if isinstance(config, HostConfig) else os.fspath(config),
        "out": outputs.get("out"), "verdicts": outputs.get("verdicts"),
        "report": outputs.get("report"), "plot": outputs.get("plot"),
        "offload": offload, "pnic": pnic, "pnic_capacity": capacity,
        "pnic_crash_at": crash_at, "pnic_withdraw_at": withdraw_at,
        "dump_flows_at": dump_at, "dump_flows": outputs.get("dump-flows"),
        "workers": workers, "scheduler": scheduler,
    }
    result["config"] = to_dict(cfg)
    result["outputs"] = outputs
    result["timing"] = {
        "wall_seconds": round(wall, 6),
        "packets_per_second": round(n_in / wall, 1) if wall > 0 else 0.0,
    }
    result["sharding"] = {
        "shards": n,
        "packets": split.counts,
        "pnic_capacity": caps,
        "cluster": ex.describe(),
        "split_seconds": round(split.seconds, 6),
        "replay_seconds": round(replayed, 6),
        "merge_seconds": round(merging, 6),
        # processor time of the serial parts (the shards' own is in shards[k].timing)
        "split_cpu_seconds": round(split_cpu, 6),
        "merge_cpu_seconds": round(merge_cpu, 6),
        "semantics": SEMANTICS,
    }
    result["shards"] = [{k: r[k] for k in ("packets", "tiers", "offloads", "flows", "events",
                                            "schedule", "timing")} for r in reports]
    if plot is not None:
        from flowshift.plot import write_plot

        try:
            write_plot(temps["plot"], *plot_inputs, result, window=plot_window)
        except OSError as e:
            raise ReplayError(f"--plot {plot}: cannot write ({e.strerror})") from None
    if report is not None:
        from json import dumps

        try:
            Path(temps["report"]).write_text(dumps(result, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ReplayError(f"--report {report}: cannot write ({e.strerror})") from None
    return result
