"""Scaling: time per packet and memory per flow of `flowshift replay` as flows and packets grow.

    python bench/bench_scaling.py [--flows 1e4,1e5,1e6,1e7] [--packets 1e6,1e7,5e7]
        [--per-flow 4,40] [--quick] [--offload never,elephant] [--max-memory 16]
        [--timeout 3600] [--workdir DIR] [--keep] [--out-dir DIR]

Each point of the grid (concurrent flows × packets, or flows × packets per flow) is a trace of
that many TCP flows, all open at once and taking turns until the packets are written
(bench/scaling_trace.py), replayed through bench/offload-host.toml (firewall + SNAT) with each
offload policy. Every replay runs in a process of its own that first replays a small trace
(imports, compiled engine, first allocations), then takes its resident memory as the base,
resets the peak and replays the point: the peak beyond the base is the memory the point's flows
and packets needed. Time is taken both as wall time and as the process's CPU time (the steadier
figure on a shared machine).

Guards: a point whose memory, estimated from what each flow added at the largest points already
measured with the same policy, would pass --max-memory is skipped, and so is one whose time,
estimated the same way, would pass --timeout; a replay still running at --timeout, or whose
resident memory passes --max-memory, is stopped. Each is recorded with its reason.

Writes scaling.json, scaling.csv and scaling.png (log-log: CPU ns per packet and bytes per flow
against concurrent flows; docs/performance.md tells how to read it) to --out-dir. Uses only the
trace writer, `run_replay` and the replay's report: whatever the engines are today, this
measures them.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common import machine
from scaling_trace import check, size_bytes, write_trace

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "offload-host.toml"
GIB = 2**30
FULL = ("1e4,1e5,1e6,1e7", "1e6,1e7,5e7")
QUICK = ("1e3,1e4", "5e4,1e5")
MARGIN = 1.15  # an estimate from a smaller point, with room for what it did not show
POLL_S = 0.2
WARM_FLOWS = 64  # the child's warm-up trace: enough packets per flow to offload elephants
WARM_PACKETS = WARM_FLOWS * 40
COLUMNS = ("flows", "packets", "series", "offload", "status", "note", "seconds",
           "packets_per_second", "ns_per_packet", "cpu_seconds", "cpu_ns_per_packet",
           "base_rss_bytes", "peak_rss_bytes", "extra_bytes", "bytes_per_flow",
           "marginal_bytes_per_flow", "pnic_share", "forwarded", "dropped")


def counts(text: str) -> list[int]:
    """`"1e4,1e5"` -> [10000, 100000]; click.BadParameter otherwise."""
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise click.BadParameter(f"not a number: {part!r}") from None
        if not value.is_integer() or value < 1:
            raise click.BadParameter(f"not a whole number >= 1: {part!r}")
        out.append(int(value))
    return sorted(set(out))


def status_kib(pid: int | str, field: str) -> int:
    """A field of /proc/PID/status in bytes (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- one replay, in its own process


def measure(trace: Path, flows: int, offload: str, config: Path, capacity: int | None,
            work: Path) -> dict[str, Any]:
    """Replay `trace` in this (fresh) process and measure it against the warmed-up base."""
    from flowshift.replay import run_replay

    warm = work / f"warm-{os.getpid()}.pcap"
    try:
        write_trace(warm, WARM_FLOWS, WARM_PACKETS)
        run_replay(warm, config, offload=offload, capacity=capacity, progress=False)
    finally:
        warm.unlink(missing_ok=True)
    gc.collect()
    base = status_kib("self", "VmRSS")
    peak_reset = True
    try:  # the peak from here on (Linux: "5" resets VmHWM to the current RSS)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        peak_reset = False
    cpu = time.process_time()
    report = run_replay(trace, config, offload=offload, capacity=capacity, progress=False)
    cpu = time.process_time() - cpu
    peak = status_kib("self", "VmHWM")
    seconds = float(report["timing"]["wall_seconds"])
    packets = int(report["packets"]["in"])
    extra = max(peak - base, 0)
    return {
        "seconds": seconds,
        "packets_per_second": packets / seconds,
        "ns_per_packet": seconds / packets * 1e9,
        "cpu_seconds": cpu,  # this process's CPU time: the figure a busy machine disturbs least
        "cpu_ns_per_packet": cpu / packets * 1e9,
        "base_rss_bytes": base,
        "peak_rss_bytes": peak,
        "peak_reset": peak_reset,
        "extra_bytes": extra,
        "bytes_per_flow": extra / flows,
        "pnic_share": report["tiers"]["pnic"]["share"],
        "tiers": {t: v["share"] for t, v in report["tiers"].items()},
        "forwarded": report["packets"]["forwarded"],
        "dropped": report["packets"]["dropped"],
        "flows_total": report["flows"]["total"],
        "peak_second_cache": report["flows"]["peak_second_cache"],
        "offloads_to_pnic": report["offloads"]["to_pnic"],
        "refused": report["offloads"]["refused"],
    }


def run_child(trace: Path, flows: int, offload: str, config: Path, capacity: int | None,
              work: Path, timeout: float, max_bytes: int) -> dict[str, Any]:
    """`measure` in a child process, stopped at `timeout` or past `max_bytes` resident."""
    cmd = [sys.executable, __file__, "--child", str(trace), "--child-flows", str(flows),
           "--offload", offload, "--config", str(config), "--workdir", str(work)]
    if capacity is not None:
        cmd += ["--pnic-capacity", str(capacity)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        started = time.monotonic()
        try:
            while proc.poll() is None:
                if time.monotonic() - started > timeout:
                    return {"status": "timed out", "note": f"still running after {timeout:g} s"}
                if status_kib(proc.pid, "VmRSS") > max_bytes:
                    return {"status": "stopped",
                            "note": f"resident memory passed {max_bytes / GIB:.1f} GiB"}
                time.sleep(POLL_S)
        finally:  # stopped by a guard, or this run interrupted: the replay goes too
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            last = (err.read().strip().splitlines() or ["?"])[-1]
            return {"status": "failed", "note": f"exit {proc.returncode}: {last}"}
        return {"status": "ok", "note": "", **json.loads(out.read().strip().splitlines()[-1])}


# ---------------------------------------------------------------- guards


def measured(results: list[dict[str, Any]], offload: str) -> list[dict[str, Any]]:
    """The measured points of this policy, by flows (then packets)."""
    done = [r for r in results if r["offload"] == offload and r["status"] == "ok"]
    return sorted(done, key=lambda r: (r["flows"], r["packets"]))


def per_flow(done: list[dict[str, Any]]) -> float:
    """Bytes each further flow adds: the slope between the two largest flow counts measured
    (what the fixed buffers of a replay do not blur), else the largest point's average."""
    ref = done[-1]
    smaller = [r for r in done if r["flows"] < ref["flows"]]
    if smaller:
        lo = smaller[-1]
        slope = (ref["extra_bytes"] - lo["extra_bytes"]) / (ref["flows"] - lo["flows"])
        return max(float(slope), 0.0)
    return float(ref["bytes_per_flow"])


def guard(results: list[dict[str, Any]], flows: int, packets: int, offload: str,
          max_bytes: int, timeout: float) -> str | None:
    """Why this replay should not run, judged from the smaller points measured; or None."""
    done = measured(results, offload)
    if not done:
        return None
    ref = done[-1]
    extra = ref["extra_bytes"] + per_flow(done) * max(flows - ref["flows"], 0)
    need = (ref["base_rss_bytes"] + extra) * MARGIN
    if need > max_bytes:
        return f"needs ~{need / GIB:.1f} GiB"
    seconds = max(r["ns_per_packet"] for r in done if r["flows"] == ref["flows"]) * packets / 1e9
    if seconds * MARGIN > timeout:
        return f"needs ~{seconds * MARGIN:,.0f} s"
    return None


# ---------------------------------------------------------------- outputs


def slope(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of log y against log x (0: constant, 1: linear)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def series_of(r: dict[str, Any]) -> str:
    return str(r.get("series") or f"{r['packets']:,} packets")


def marginal(results: list[dict[str, Any]], r: dict[str, Any]) -> float | None:
    """Bytes each flow added between the series' previous point (fewer flows) and `r`."""
    prev = [q for q in results if q["status"] == "ok" and q["offload"] == r["offload"]
            and series_of(q) == series_of(r) and q["flows"] < r["flows"]]
    if not prev:
        return None
    q = max(prev, key=lambda q: q["flows"])
    return float(r["extra_bytes"] - q["extra_bytes"]) / float(r["flows"] - q["flows"])


def write_plot(path: Path, results: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5.6))
    ok = [r for r in results if r["status"] == "ok"]
    for offload, series in sorted({(r["offload"], series_of(r)) for r in ok}):
        pts = sorted(((r["flows"], r) for r in ok
                      if r["offload"] == offload and series_of(r) == series), key=lambda e: e[0])
        xs = [f for f, _ in pts]
        style = "-o" if offload == "never" else "--s"
        color = None
        for ax, key in ((ax_t, "cpu_ns_per_packet"), (ax_m, "bytes_per_flow")):
            ys = [r.get(key, r["ns_per_packet"]) for _, r in pts]
            s = slope(list(zip(xs, ys, strict=True)))
            label = f"{offload}, {series}" + (f" (slope {s:+.2f})" if s is not None else "")
            (line,) = ax.plot(xs, ys, style, label=label, color=color)
            color = line.get_color()
        steps = [(f, r["marginal_bytes_per_flow"]) for f, r in pts
                 if (r.get("marginal_bytes_per_flow") or 0) > 0]
        if steps:
            ax_m.plot(*zip(*steps, strict=True), ":x", color=color, alpha=0.8)
    for ax, ylabel in ((ax_t, "CPU time per packet (ns, the replaying process)"),
                       (ax_m, "bytes per flow: (peak − base) / flows;  ···× each further flow")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent flows")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ok:
            ax.legend(fontsize=7)
            lo, hi = ax.get_ylim()
            if hi < 10 * lo:  # at least a decade: a few percent must not look like a slope
                mid = math.sqrt(lo * hi)
                ax.set_ylim(mid / math.sqrt(10), mid * math.sqrt(10))
    ax_t.set_title("time per packet (flat: constant cost per packet)")
    ax_m.set_title("memory per flow (flat: memory linear in flows)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir: Path, doc: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scaling.json").write_text(json.dumps(doc, indent=2) + "\n")
    with open(out_dir / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(doc["results"])
    m = doc["machine"]
    write_plot(out_dir / "scaling.png", doc["results"],
               f"flowshift replay scaling, {doc['config']} — {m['cpu']}, {m['cores']} cores, "
               f"{m['memory']}, Python {m['python']}")


def table(results: list[dict[str, Any]]) -> Table:
    t = Table(title="flowshift replay scaling")
    names = ("flows", "packets", "offload", "packets/s", "ns/packet", "CPU ns/packet",
             "peak − base", "B/flow", "B/further flow", "PNIC", "status")
    for name in names:
        t.add_column(name, justify="left" if name in ("offload", "status") else "right")
    for r in results:
        row = [f"{r['flows']:,}", f"{r['packets']:,}", r["offload"]]
        if r["status"] == "ok":
            m = r.get("marginal_bytes_per_flow")
            row += [f"{r['packets_per_second']:,.0f}", f"{r['ns_per_packet']:,.0f}",
                    f"{r['cpu_ns_per_packet']:,.0f}", f"{r['extra_bytes'] / 2**20:,.0f} MiB",
                    f"{r['bytes_per_flow']:,.0f}", "" if m is None else f"{m:,.0f}",
                    f"{r['pnic_share']:.1%}", "ok" + (f": {r['note']}" if r["note"] else "")]
        else:
            row += [""] * 7 + [f"{r['status']}: {r['note']}"]
        t.add_row(*row)
    return t


# ---------------------------------------------------------------- the grid


def points(flows: list[int], packets: list[int], per_flow: list[int]) -> list[tuple[int, int, str]]:
    """(flows, packets, series) of the grid, by flows then packets. A series is a line of the
    plot: a fixed number of packets, or of packets per flow."""
    grid = [(n, p, f"{p:,} packets") for n in flows for p in packets]
    grid += [(n, n * k, f"{k:,} packets per flow") for n in flows for k in per_flow]
    return sorted(grid)


def run_grid(grid: list[tuple[int, int, str]], offloads: list[str], config: Path,
             capacity: int | None, max_bytes: int, timeout: float, work: Path, keep: bool,
             console: Console, save: Callable[[list[dict[str, Any]]], None]
             ) -> list[dict[str, Any]]:
    """Every point of the grid with every policy; `save(results)` after each replay."""
    results: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("scaling", total=len(grid) * len(offloads))
        for n, p, series in grid:
            point = {"flows": n, "packets": p, "series": series}
            problem = check(n, p)
            why = {o: problem or guard(results, n, p, o, max_bytes, timeout) for o in offloads}
            trace = work / f"concurrent-{n}-{p}.pcap"
            if not problem and any(w is None for w in why.values()) and not trace.exists():
                need, free = size_bytes(n, p), shutil.disk_usage(work).free
                if need > free - GIB:
                    why = {o: f"trace needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
                           for o in offloads}
                else:
                    bar.update(task, description=f"writing {n:,} flows × {p:,} packets")
                    part = trace.with_suffix(".part")
                    write_trace(part, n, p)
                    part.rename(trace)  # a trace cut short by an interrupt is never reused
            for o in offloads:
                if why[o] is not None:
                    results.append({**point, "offload": o, "status": "skipped", "note": why[o]})
                else:
                    bar.update(task, description=f"replay {o}, {n:,} flows × {p:,} packets")
                    results.append({**point, "offload": o,
                                    **run_child(trace, n, o, config, capacity, work, timeout,
                                                max_bytes)})
                    r = results[-1]
                    if r["status"] == "ok":
                        r["marginal_bytes_per_flow"] = marginal(results, r)
                    if r["status"] == "ok":  # the trace is made to be forwarded whole
                        lost, extra_flows = p - r["forwarded"], r["flows_total"] - n
                        r["note"] = "; ".join(
                            ([f"{lost:,} packets not forwarded"] if lost else [])
                            + ([f"{r['flows_total']:,} flows"] if extra_flows else []))
                    console.log(f"{n:,} flows × {p:,} packets, {o}: " + (
                        f"{r['ns_per_packet']:,.0f} ns/packet ({r['cpu_ns_per_packet']:,.0f} "
                        f"CPU), {r['bytes_per_flow']:,.0f} B/flow"
                        if r["status"] == "ok" else f"{r['status']}: {r['note']}"))
                bar.advance(task)
                save(results)
            if not keep:
                trace.unlink(missing_ok=True)
    return results


@click.command()
@click.option("--flows", default=None, help=f"Concurrent flows per point [{FULL[0]}].")
@click.option("--packets", default=None, help=f"Packets per point [{FULL[1]}].")
@click.option("--per-flow", default="",
              help="Also points of N flows × N·K packets for each K here (e.g. 4,40): lines "
                   "whose packets per flow stay fixed as flows grow.")
@click.option("--quick", is_flag=True, help=f"A small grid: flows {QUICK[0]}, packets {QUICK[1]}.")
@click.option("--offload", "offloads", default="never,elephant", show_default=True,
              help="Offload policies, each replayed at every point.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=CONFIG, show_default=True, help="The host config replayed.")
@click.option("--pnic-capacity", type=click.IntRange(min=0), default=None,
              help="The PNIC's second cache (default: the config's).")
@click.option("--max-memory", type=click.FloatRange(min=0.1), default=16.0, show_default=True,
              help="GiB a replay may use; points estimated above it are skipped.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds a replay may run; points estimated above it are skipped.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the traces are written (default: a temporary directory).")
@click.option("--keep", is_flag=True, help="Keep the traces (reused by the next run in --workdir).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench-scaling"), show_default=True,
              help="scaling.json, scaling.csv and scaling.png go here.")
@click.option("--child", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--child-flows", type=int, default=0, hidden=True)
def main(flows: str | None, packets: str | None, per_flow: str, quick: bool, offloads: str,
         config: Path, pnic_capacity: int | None, max_memory: float, timeout: float,
         workdir: Path | None, keep: bool, out_dir: Path, child: Path | None,
         child_flows: int) -> None:
    if child is not None:  # one replay, measured in this fresh process
        assert workdir is not None
        print(json.dumps(measure(child, child_flows, offloads, config, pnic_capacity, workdir)))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file keeps the whole table
    grid_flows = counts(flows or (QUICK if quick else FULL)[0])
    grid_per_flow = counts(per_flow) if per_flow else []
    grid_packets = counts(packets or (QUICK if quick else FULL)[1]) if packets or quick or \
        not grid_per_flow else []
    grid = points(grid_flows, grid_packets, grid_per_flow)
    policies = [o.strip() for o in offloads.split(",") if o.strip()]
    work = workdir or Path(tempfile.mkdtemp(prefix="flowshift-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    console.print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, "
                  f"Python {info['python']}, numba {info['numba']}, {info['system']}; "
                  f"load average {os.getloadavg()[0]:.2f}; traces in {work}")
    doc: dict[str, Any] = {
        "machine": info, "config": config.name,
        "options": {"flows": grid_flows, "packets": grid_packets, "per_flow": grid_per_flow,
                    "offload": policies, "pnic_capacity": pnic_capacity,
                    "max_memory_gib": max_memory, "timeout_s": timeout},
        "load_average": {"before": os.getloadavg(), "after": None}, "wall_seconds": None,
        "results": []}
    started = time.monotonic()

    def save(results: list[dict[str, Any]]) -> None:  # after every replay: a stopped run keeps
        doc.update(results=results, wall_seconds=round(time.monotonic() - started, 1))
        doc["load_average"]["after"] = os.getloadavg()
        write_outputs(out_dir, doc)

    try:
        results = run_grid(grid, policies, config, pnic_capacity, int(max_memory * GIB),
                           timeout, work, keep, console, save)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    save(results)
    console.print(table(results))
    console.print(f"written: {out_dir / 'scaling.json'}, scaling.csv, scaling.png")


if __name__ == "__main__":
    main()
