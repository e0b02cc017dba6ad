"""What-if sweeps: the grid of replays over config values, offload policies, schedules and
traces, run on an executor (cluster.py), written as one table and plots.

A varied key is a path into the config's dict form (`to_dict`), e.g. `pnic.capacity` or
`machine[0].nat.snat[0].ports`; each value is set there and the whole config validated again
by `parse_config`, so a bad key or value is the config loader's own one-line error.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import os
import re
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowshift.cluster import Executor
from flowshift.config import ConfigError, HostConfig, parse_config, to_dict
from flowshift.packet.ahead import spare_cores
from flowshift.replay import run_replay
from flowshift.verdict import RefuseReason, ReturnReason

_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")
REFUSED = tuple(r.label for r in RefuseReason)
RETURNED = tuple(r.label for r in ReturnReason)
PLOTTED = ("pnic_share_packets", "pnic_share_bytes", "offloads", "refused", "returned",
           "peak_second_cache", "held_packets", "wall_seconds")


class SweepError(Exception):
    """A bad --vary or output directory. One line."""


@dataclass(frozen=True)
class Vary:
    key: str  # a config key path, or one of the run options below
    values: tuple[Any, ...]


def parse_value(text: str) -> Any:
    """A value as TOML reads it (42, 1.5, true, "x"), else the bare text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_vary(text: str) -> Vary:
    """KEY=V1,V2,... (values as TOML values, or bare words)."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise SweepError(f"--vary {text!r}: expected KEY=V1,V2,...")
    if not all(_STEP.fullmatch(step) for step in key.split(".")):
        raise SweepError(f"--vary {key}: not a key path (like pnic.capacity or "
                         "machine[0].nat.snat[0].ports)")
    items = tuple(parse_value(v.strip()) for v in values.split(","))
    if any(v == "" for v in items):
        raise SweepError(f"--vary {key}: an empty value")
    return Vary(key, items)


def set_key(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` (a.b[0].c) in a config dict; a missing last key is added (the config check
    then names it), a missing table or item is an error here."""
    node: Any = data
    steps = path.split(".")
    for depth, step in enumerate(steps):
        m = _STEP.fullmatch(step)
        assert m is not None
        name, indices = m.group(1), [int(i) for i in re.findall(r"\d+", m.group(2))]
        last = depth == len(steps) - 1 and not indices
        if not isinstance(node, dict):
            raise SweepError(f"--vary {path}: {'.'.join(steps[:depth])} is not a table")
        if last:
            node[name] = value
            return
        if name not in node:
            node[name] = [] if indices else {}
        node = node[name]
        for j, i in enumerate(indices):
            if not isinstance(node, list) or i >= len(node):
                have = len(node) if isinstance(node, list) else 0
                raise SweepError(f"--vary {path}: {name}{''.join(f'[{x}]' for x in indices[:j])}"
                                 f" has {have} item{'s' if have != 1 else ''}, no [{i}]")
            if j == len(indices) - 1 and depth == len(steps) - 1:
                node[i] = value
                return
            node = node[i]


def configure(base: dict[str, Any], values: dict[str, Any], source: str) -> HostConfig:
    """The base config with `values` (key path -> value) set, validated."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        set_key(data, key, value)
    return parse_config(data, source)


def grid(varies: list[Vary]) -> list[dict[str, Any]]:
    keys = [v.key for v in varies]
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(v.values for v in varies))]


def run_point(trace: str, config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """One replay of the grid, on a worker: its measures (a table row without the keys)."""
    cpu = time.process_time()
    report = run_replay(trace, parse_config(config, "<sweep point>"), progress=False, **options)
    return {**measures(report), "cpu_seconds": round(time.process_time() - cpu, 6)}


def measures(report: dict[str, Any]) -> dict[str, Any]:
    tiers, off, flows = report["tiers"], report["offloads"], report["flows"]
    processed = sum(t["packets"] for t in tiers.values())
    processed_bytes = sum(t["bytes"] for t in tiers.values())
    row: dict[str, Any] = {
        "packets": report["packets"]["in"],
        "pnic_share_packets": round(tiers["pnic"]["packets"] / processed, 6) if processed
        else 0.0,
        "pnic_share_bytes": round(tiers["pnic"]["bytes"] / processed_bytes, 6)
        if processed_bytes else 0.0,
        "software_packets_saved": tiers["pnic"]["packets"],
        "offloads": off["to_pnic"],
        "refused": sum(off["refused"].values()),
        "returned": sum(off["returned"].values()),
        "peak_first_cache": flows["peak_first_cache"],
        "peak_second_cache": flows["peak_second_cache"],
        "held_packets": off["held_packets"],
        "dropped": report["packets"]["dropped"],
        "wall_seconds": report["timing"]["wall_seconds"],
    }
    for label in REFUSED:
        row[f"refused_{label}"] = off["refused"].get(label, 0)
    for label in RETURNED:
        row[f"returned_{label}"] = off["returned"].get(label, 0)
    return row


@dataclass
class SweepPlan:
    """A checked grid: every point's config validated, the output directory usable."""

    out: Path
    dims: list[Vary]
    points: list[dict[str, Any]]
    runs: list[tuple[str, dict[str, Any], dict[str, Any]]]  # run_point's arguments
    source: str


def plan_sweep(
    traces: list[str | os.PathLike[str]],
    config: HostConfig,
    varies: list[Vary],
    out_dir: str | os.PathLike[str],
    *,
    offloads: list[str] | None = None,
    crash_at: list[float] | None = None,
    withdraw_at: list[float] | None = None,
    source: str = "<config>",
) -> SweepPlan:
    """The grid over traces × varied values × policies × schedules, checked before any run:
    a bad key or value raises the config loader's ConfigError (or SweepError)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SweepError(f"--out-dir {out_dir}: exists and is not an empty directory")
    if not out.parent.is_dir():
        raise SweepError(f"--out-dir {out_dir}: directory {out.parent} does not exist")
    base = to_dict(config)
    keys = [v.key for v in varies]
    dims = [Vary("trace", tuple(os.fspath(t) for t in traces)), *varies]
    for name, values in (("offload", offloads), ("crash_at", crash_at),
                         ("withdraw_at", withdraw_at)):
        if values:
            dims.append(Vary(name, tuple(values)))
    points = grid(dims)
    runs = []
    for point in points:
        cfg = configure(base, {k: point[k] for k in keys}, source)
        options = {"offload": point.get("offload"), "crash_at": point.get("crash_at"),
                   "withdraw_at": point.get("withdraw_at")}
        runs.append((point["trace"], to_dict(cfg), options))
    return SweepPlan(out, dims, points, runs, source)


def execute(plan: SweepPlan, executor: Executor, progress: bool = True
            ) -> list[dict[str, Any]]:
    """Run a plan's points on the executor; write sweep.csv, sweep.json and the plots into
    its directory, all or nothing. The rows, in grid order."""
    started = time.perf_counter()
    # a point reads its trace ahead in a thread of its own when the workers leave a core free
    # (a cluster's workers are taken to have a core each)
    ahead = executor.kind != "dask" and spare_cores(executor.workers)
    futures = [executor.submit(run_point, trace, config, {**options, "read_ahead": ahead})
               for trace, config, options in plan.runs]
    where = {id(f): i for i, f in enumerate(futures)}
    rows: list[dict[str, Any] | None] = [None] * len(futures)
    bar = _progress(progress, len(futures))
    try:
        for f in executor.as_completed(futures):
            i = where[id(f)]
            rows[i] = {**{d.key: plan.points[i][d.key] for d in plan.dims}, **f.result()}
            if bar is not None:
                bar[0].update(bar[1], advance=1)
    finally:
        if bar is not None:
            bar[0].stop()
    table = [r for r in rows if r is not None]
    _write(plan.out, table, [d.key for d in plan.dims], executor, {
        "config": plan.source, "varied": {d.key: list(d.values) for d in plan.dims},
        "executor": executor.describe(), "wall_seconds": round(time.perf_counter() - started, 6)})
    return table


def run_sweep(
    traces: list[str | os.PathLike[str]],
    config: HostConfig,
    varies: list[Vary],
    out_dir: str | os.PathLike[str],
    *,
    offloads: list[str] | None = None,
    crash_at: list[float] | None = None,
    withdraw_at: list[float] | None = None,
    executor: Executor,
    progress: bool = True,
    source: str = "<config>",
) -> list[dict[str, Any]]:
    """plan_sweep, then execute."""
    plan = plan_sweep(traces, config, varies, out_dir, offloads=offloads, crash_at=crash_at,
                      withdraw_at=withdraw_at, source=source)
    return execute(plan, executor, progress)


def _progress(enabled: bool, total: int) -> tuple[Any, Any] | None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        return None
    bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    task = bar.add_task("sweep", total=total)
    bar.start()
    return bar, task


def _write(out: Path, rows: list[dict[str, Any]], keys: list[str], executor: Executor,
           meta: dict[str, Any]) -> None:
    """Everything into a temporary directory beside `out`, then one rename; the figures
    drawn on the executor's workers, one each."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        columns = list(rows[0]) if rows else keys
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(v) for k, v in r.items()})
        (tmp / "sweep.csv").write_text(text.getvalue(), encoding="utf-8")
        (tmp / "sweep.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n",
                                        encoding="utf-8")
        write_plots(tmp, rows, [k for k in keys if len({_cell(r[k]) for r in rows}) > 1],
                    executor)
        if out.exists():
            out.rmdir()  # empty (checked before the runs)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, list | dict) else v


def write_plots(directory: Path, rows: list[dict[str, Any]], varied: list[str],
                executor: Executor | None = None) -> list[Path]:
    """One figure per varied key: every measure against the key's values, one line for each
    combination of the other varied values. With an executor, its workers draw them at once
    (each returns the PNG's bytes: a worker need not see `directory`)."""
    if executor is not None and len(varied) > 1:
        futures = [executor.submit(draw_plot, rows, varied, key) for key in varied]
        images = [f.result() for f in futures]
    else:
        images = [draw_plot(rows, varied, key) for key in varied]
    written = []
    for key, png in zip(varied, images, strict=True):
        path = directory / f"sweep-{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.png"
        path.write_bytes(png)
        written.append(path)
    return written


def preload_plots() -> None:
    """Import the plotting library now (half a second): workers forked after it have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot


def draw_plot(rows: list[dict[str, Any]], varied: list[str], key: str) -> bytes:
    """The figure of one varied key (see write_plots), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in varied if k != key]
    xs = list(dict.fromkeys(_cell(r[key]) for r in rows))
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(_cell(r[k]) for k in others), []).append(r)
    for ax, measure in zip(axes.flat, PLOTTED, strict=True):
        for label, members in groups.items():
            members = sorted(members, key=lambda r: xs.index(_cell(r[key])))
            x = [_cell(r[key]) if numeric else xs.index(_cell(r[key])) for r in members]
            name = ", ".join(f"{k}={_short(v)}" for k, v in zip(others, label, strict=True))
            ax.plot(x, [r[measure] for r in members], marker="o", label=name or None)
        ax.set_title(measure.replace("_", " "))
        ax.set_xlabel(key)
        if not numeric:
            ax.set_xticks(range(len(xs)), [_short(x) for x in xs], rotation=30)
    if others and len(groups) <= 8:
        axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"sweep over {key}")
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)
    return out.getvalue()


def _short(v: Any) -> str:
    text = str(v)
    return os.path.basename(text) if "/" in text else text[:24]


__all__ = ["ConfigError", "SweepError", "SweepPlan", "Vary", "configure", "execute",
           "parse_vary", "plan_sweep", "preload_plots", "run_sweep", "set_key"]
