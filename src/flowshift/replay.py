"""The replay runtime: one trace through one emulated host, and the files that tell the result.

Per packet the loop only hands the frame to the host, takes the results the host has finished
(in input order) and writes them: the output trace, the verdicts file and the counters of the
report (report.Tally). Scheduled PNIC actions (crash, withdraw) and the flow dump fire just
before the first packet at or after their time. Everything else (the report, the plot, the
summary) is built once at the end from the counters, so memory stays flat whatever the trace.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from flowshift import __version__
from flowshift.config import HostConfig, load_config, to_dict
from flowshift.host import Host
from flowshift.offload import POLICIES
from flowshift.packet.pcap import Frame, PcapWriter, open_trace, trace_linktype_name
from flowshift.report import HIST_MAX_BINS, NS, Tally, build_report, flow_dump
from flowshift.verdict import Verdict

VERDICTS_HEADER = ("index", "time", "machine", "direction", "verdict", "reason", "tier",
                   "out_index")
PNIC_MODES = ("inline", "process")
PROGRESS_EVERY = 4096  # packets between progress-bar updates
# Scheduled actions at the same time run in this order: the dump sees the state before the
# PNIC changes.
ACTIONS = ("dump", "withdraw", "crash")
LABELS = {v: v.label for v in Verdict}


class ReplayError(Exception):
    """Bad options or an output that cannot be written. One line."""


def seconds_text(delta_ns: int) -> str:
    """Nanoseconds as seconds with 9 decimals, exactly (no float rounding)."""
    sign = "-" if delta_ns < 0 else ""
    s, ns = divmod(abs(delta_ns), NS)
    return f"{sign}{s}.{ns:09d}"


def _check_outputs(trace: str | os.PathLike[str], outputs: dict[str, str | None]) -> None:
    """Every output goes to its own file, in a directory that exists, never over the trace."""
    seen: dict[Path, str] = {Path(trace).resolve(): "the trace"}
    for name, path in outputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if p in seen:
            raise ReplayError(f"--{name} {path} would overwrite {seen[p]}")
        if not p.parent.is_dir():
            raise ReplayError(f"--{name} {path}: directory {p.parent} does not exist")
        if p.is_dir():
            raise ReplayError(f"--{name} {path} is a directory")
        seen[p] = f"--{name}"


def _check_options(offload: str | None, pnic: str, capacity: int | None,
                   times: dict[str, float | None], dump_path: str | None) -> None:
    if offload is not None and offload not in POLICIES:
        raise ReplayError(f"--offload must be one of {', '.join(POLICIES)}, not {offload!r}")
    if pnic not in PNIC_MODES:
        raise ReplayError(f"--pnic must be one of {', '.join(PNIC_MODES)}, not {pnic!r}")
    if capacity is not None and capacity < 0:
        raise ReplayError(f"--pnic-capacity must be 0 or more, not {capacity}")
    for name, t in times.items():
        if t is not None and not 0 <= t < float("inf"):
            raise ReplayError(f"--{name} must be a number of seconds >= 0, not {t}")
    if (times["dump-flows-at"] is None) != (dump_path is None):
        raise ReplayError("--dump-flows-at and --dump-flows go together")


def _opener(path: str | os.PathLike[str], flag: str) -> Any:
    try:
        return open(path, "w", newline="", encoding="utf-8")
    except OSError as e:
        raise ReplayError(f"--{flag} {path}: cannot write ({e.strerror})") from None


def run_replay(
    trace: str | os.PathLike[str],
    config: HostConfig | str | os.PathLike[str],
    *,
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
) -> dict[str, Any]:
    """Replay `trace` through a host built from `config`; return the report (also written to
    `report` when given). Raises ConfigError, TraceError or ReplayError on bad input."""
    paths = {"out": out, "verdicts": verdicts, "report": report, "plot": plot,
             "dump-flows": dump_path}
    outputs = {k: os.fspath(v) for k, v in paths.items() if v is not None}
    times = {"pnic-crash-at": crash_at, "pnic-withdraw-at": withdraw_at, "dump-flows-at": dump_at}
    _check_options(offload, pnic, capacity, times, outputs.get("dump-flows"))
    _check_outputs(trace, {k: outputs.get(k) for k in paths})
    if plot is not None:
        from flowshift.plot import FORMATS, plot_format  # matplotlib only when a plot is asked

        if plot_format(plot) not in FORMATS:
            raise ReplayError(f"--plot {plot}: unknown image format (use one of "
                              f"{', '.join('.' + f for f in FORMATS)})")
    options = {
        "trace": os.fspath(trace),
        "config": None if isinstance(config, HostConfig) else os.fspath(config),
        "out": outputs.get("out"), "verdicts": outputs.get("verdicts"),
        "report": outputs.get("report"), "plot": outputs.get("plot"),
        "offload": offload, "pnic": pnic, "pnic_capacity": capacity,
        "pnic_crash_at": crash_at, "pnic_withdraw_at": withdraw_at,
        "dump_flows_at": dump_at, "dump_flows": outputs.get("dump-flows"),
    }
    cfg = config if isinstance(config, HostConfig) else load_config(config)
    if offload is not None:
        cfg = replace(cfg, offload=replace(cfg.offload, policy=offload))
    if capacity is not None:
        cfg = replace(cfg, pnic=replace(cfg.pnic, capacity=capacity))

    # (seconds after the first packet, action), in firing order
    schedule = sorted(
        ((t, action) for action, t in (("dump", dump_at), ("withdraw", withdraw_at),
                                       ("crash", crash_at)) if t is not None),
        key=lambda e: (e[0], ACTIONS.index(e[1])))

    started = time.perf_counter()
    with ExitStack() as stack:
        reader = stack.enter_context(open_trace(trace))
        frames: Iterator[Frame] = iter(reader)
        first = next(frames, None)
        # classic pcap holds one link type; the output takes the input's (the first frame's
        # for pcapng, whose interfaces may differ: docs/replay.md)
        linktype = first.linktype if first is not None else (
            reader.pcap_header.linktype if reader.pcap_header else 1)
        run = _Run(cfg, pnic, first.ts_ns if first is not None else 0, linktype)
        stack.callback(run.host.close)
        if out is not None:
            try:
                run.writer = stack.enter_context(PcapWriter(out, linktype=linktype))
            except OSError as e:
                raise ReplayError(f"--out {out}: cannot write ({e.strerror})") from None
        if verdicts is not None:
            vfile = stack.enter_context(_opener(verdicts, "verdicts"))
            run.rows = csv.writer(vfile, lineterminator="\n")
            run.rows.writerow(VERDICTS_HEADER)
        if first is not None:
            frames = chain((first,), frames)
        bar = _progress(progress, reader.size, os.path.basename(os.fspath(trace)))
        if bar is not None:
            stack.enter_context(bar[0])
        fired = run.replay(frames, schedule, dump_path, bar, reader)
        run.host.finish()
        run.drain()
        for t, action in schedule[len(fired):]:  # past the end of the trace
            entry = {"action": action, "at": t, "time": (run.last_ts - run.first_ts) / NS,
                     "before_index": None}
            if action == "dump":
                run.dump(dump_path, run.last_ts)
            else:
                entry["skipped"] = "the trace ended before this time"
            fired.append(entry)
        wall = time.perf_counter() - started
        trace_info = {
            "path": os.fspath(trace),
            "format": reader.format,
            "linktypes": sorted(trace_linktype_name(lt) for lt in reader.linktypes),
            "packets": run.n,
            "first_ts": run.first_ts / NS if run.n else None,
            "duration": (run.last_ts - run.first_ts) / NS if run.n else 0.0,
            "problem": reader.problem,
        }
    result = build_report(
        run.tally, run.host.stats, version=__version__, trace=trace_info, options=options,
        config=to_dict(cfg), schedule=fired, outputs=outputs, wall_seconds=wall)
    if run.linktype_mismatch:
        result["packets"]["out_linktype_mismatch"] = run.linktype_mismatch
    if plot is not None:
        from flowshift.plot import write_plot

        try:
            write_plot(plot, run.tally, run.host.stats, result)
        except OSError as e:
            raise ReplayError(f"--plot {plot}: cannot write ({e.strerror})") from None
    if report is not None:
        from json import dumps

        try:
            Path(report).write_text(dumps(result, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ReplayError(f"--report {report}: cannot write ({e.strerror})") from None
    return result


def _progress(enabled: bool, size: int, name: str) -> tuple[Progress, Any] | None:
    """A transient progress bar on stderr (by file position), only on a terminal."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        return None
    bar = Progress(TextColumn("replay {task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[packets]:,} packets"), TimeElapsedColumn(),
                   console=console, transient=True)
    task = bar.add_task(name, total=max(size, 1), packets=0)
    return bar, task


class _Run:
    """The state of one replay loop: the host, the writers and the counters."""

    def __init__(self, cfg: HostConfig, pnic: str, first_ts: int, linktype: int) -> None:
        self.host = Host(cfg, pnic=pnic)
        self.first_ts = first_ts
        self.last_ts = first_ts
        self.linktype = linktype
        self.writer: PcapWriter | None = None
        self.rows: Any = None  # csv writer
        self.tally = Tally()
        self.n = 0
        self.foreign: dict[int, int] = {}  # index -> link type, for frames unlike the first
        self.linktype_mismatch = 0

    def replay(self, frames: Iterator[Frame], schedule: list[tuple[float, str]],
               dump_path: str | os.PathLike[str] | None,
               bar: tuple[Progress, Any] | None, reader: Any) -> list[dict[str, Any]]:
        """The hot loop. Returns the scheduled actions that fired."""
        host = self.host
        process = host.process
        drain = self.drain
        linktype = self.linktype
        foreign = self.foreign
        pending = [(self.first_ts + round(t * NS), t, a) for t, a in schedule]
        next_at = pending[0][0] if pending else None
        fired: list[dict[str, Any]] = []
        latest = self.first_ts
        i = -1
        for i, f in enumerate(frames):
            ts = f.ts_ns
            if next_at is not None and ts >= next_at:
                while pending and ts >= pending[0][0]:
                    at_ns, t, action = pending.pop(0)
                    now = max(at_ns, latest)  # the host's clock never goes back
                    if action == "dump":
                        self.dump(dump_path, now)
                    elif action == "withdraw":
                        host.withdraw_pnic(now)
                    else:
                        host.crash_pnic(now)
                    fired.append({"action": action, "at": t, "time": (now - self.first_ts) / NS,
                                  "before_index": i})
                next_at = pending[0][0] if pending else None
            if ts > latest:
                latest = ts
            if f.linktype != linktype:
                foreign[i] = f.linktype
            process(i, ts, f.data, f.linktype, f.wire_len)
            drain()
            if bar is not None and i % PROGRESS_EVERY == 0:
                bar[0].update(bar[1], completed=reader.position, packets=i)
        self.n = i + 1
        self.last_ts = latest
        return fired

    def drain(self) -> None:
        """Write the results the host has finished: output packet, verdict row, counters."""
        tally = self.tally
        counts = tally.counts
        rate = tally.rate
        writer = self.writer
        rows = self.rows
        first = self.first_ts
        bin_ns = tally.bin_ns
        for r in self.host.results():
            ts = r.ts_ns
            key = (r.verdict, r.reason, r.tier, r.machine, r.direction)
            c = counts.get(key)
            if c is None:
                counts[key] = [1, r.wire_len]
            else:
                c[0] += 1
                c[1] += r.wire_len
            if r.tier:
                b = (ts - first) // bin_ns
                if b >= HIST_MAX_BINS:
                    while b >= HIST_MAX_BINS:
                        tally.coarsen()
                        bin_ns = tally.bin_ns
                        b = (ts - first) // bin_ns
                    rate = tally.rate
                elif b < 0:  # out-of-order timestamps before the first packet
                    b = 0
                k = (b, r.tier)
                rate[k] = rate.get(k, 0) + 1
            foreign = bool(self.foreign) and self.foreign.pop(r.index, None) is not None
            out_index: int | str = ""
            if r.data is not None:
                out_index = tally.out_packets
                tally.out_packets += 1
                if writer is not None:
                    try:
                        writer.write(ts, r.data, r.wire_len)
                    except ValueError as e:
                        raise ReplayError(f"--out: packet {r.index}: {e}") from None
                self.linktype_mismatch += foreign
            if rows is not None:
                rows.writerow((r.index, seconds_text(ts - first), r.machine, r.direction,
                               LABELS[r.verdict], r.reason, r.tier, out_index))

    def dump(self, path: str | os.PathLike[str] | None, now: int) -> None:
        assert path is not None
        text = flow_dump(self.host.dump_flows(now), now)
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as e:
            raise ReplayError(f"--dump-flows {path}: cannot write ({e.strerror})") from None
