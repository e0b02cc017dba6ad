"""`flowshift replay TRACE --config HOST.toml`: a trace through the emulated host.

A thin layer over flowshift.replay.run_replay: options in, the summary out. Bad arguments, a
bad config or a file that is not a trace exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from flowshift.cluster import KINDS, ClusterError
from flowshift.config import ConfigError
from flowshift.host import ENGINES
from flowshift.offload import POLICIES
from flowshift.packet.pcap import TraceError
from flowshift.replay import PNIC_MODES, ReplayError, run_replay
from flowshift.report import summary_table
from flowshift.shard import ShardError

SECONDS = click.FloatRange(min=0, max=1e9)
SCHEDULE_FLAGS = {"crash": "--pnic-crash-at", "withdraw": "--pnic-withdraw-at",
                  "dump": "--dump-flows-at"}


def warm_engine(console: Console | None, ahead: subprocess.Popen[bytes] | None = None) -> float:
    """Compile the compiled engine's kernels, the PNIC's and the software fast path's (first
    run; later runs load them from the cache) before the replay starts, as a step of its own:
    the replay's time and packets/s leave it out. `ahead`: the process compiling them already
    (_pnic_cache.compiling_ahead), waited for. The seconds."""
    from flowshift.replay import warm_io
    from flowshift.tiers import fastpath, pnic_engine

    def work() -> float:
        started = time.perf_counter()
        if ahead is not None:  # the other process compiles the PNIC's kernels: the trace
            # I/O's and the fast path's here, meanwhile (replay.compile_ahead_work)
            warm_io()
            fastpath.warm()
        fastpath.warm_all(ahead)
        return time.perf_counter() - started

    if console is None:
        return work()
    with console.status("compiling the engine (first run only)…", spinner="dots"):
        seconds = work()
    if ahead is not None:
        done = "compiled in the background, ready"
    else:
        done = "compiled" if pnic_engine.compilations() + fastpath.compilations() else "loaded"
    console.print(f"engine {done} in {seconds:.2f} s (not counted in the replay's time)")
    return seconds


def fail(message: str) -> click.exceptions.Exit:
    """Print one line on stderr; the caller raises the returned exit (status 2)."""
    click.echo(f"Error: {message}", err=True)
    return click.exceptions.Exit(2)


@click.command("replay")
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config", required=True, type=click.Path(path_type=Path),
              metavar="HOST.toml", help="The host config: machines, their services, the PNIC.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.pcap",
              help="Write every packet that leaves the host, rewritten, in input order.")
@click.option("--verdicts", type=click.Path(dir_okay=False, path_type=Path),
              metavar="VERDICTS.csv", help="Write one verdict row per input packet.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), metavar="REPORT.json",
              help="Write the JSON report.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="PLOT.png",
              help="Plot packets per tier, PNIC occupancy and offload events over time.")
@click.option("--plot-window", metavar="A:B",
              help="Plot only trace time A to B (seconds from the first packet; either end may "
              "be left out). Default: where the packets are (see docs/replay.md).")
@click.option("--offload", type=click.Choice(POLICIES),
              help="Offload policy (overrides the config's [offload] policy).")
@click.option("--pnic", type=click.Choice(PNIC_MODES), default="inline", show_default=True,
              help="Run the PNIC in this process or in its own process.")
@click.option("--pnic-capacity", type=click.IntRange(min=0), metavar="N",
              help="Second-cache capacity in flow entries (overrides the config).")
@click.option("--pnic-crash-at", type=SECONDS, metavar="T",
              help="Crash the PNIC T seconds after the first packet (no entry returns).")
@click.option("--pnic-withdraw-at", type=SECONDS, metavar="T",
              help="Withdraw the PNIC gracefully T seconds after the first packet.")
@click.option("--dump-flows-at", type=SECONDS, metavar="T",
              help="Dump every flow T seconds after the first packet (with --dump-flows).")
@click.option("--dump-flows", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FLOWS.txt", help="Where the flow dump goes, conntrack -L style.")
@click.option("--engine", type=click.Choice(ENGINES), default="compiled", show_default=True,
              help="How software runs established flows: compiled (the fast path) or "
                   "reference (every packet in Python). The results are identical.")
@click.option("--read-ahead/--no-read-ahead", default=None,
              help="Read the trace a batch ahead in a thread of its own [default: when the "
                   "process may run on more than one core; never for --workers]. The "
                   "results are identical.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="Split the trace by outside endpoint over N worker processes "
                   "(docs/scale.md).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Split the trace over the workers of this Dask scheduler (docs/scale.md).")
@click.option("--executor", type=click.Choice(KINDS), default="auto", show_default=True,
              help="Workers as plain processes or a local Dask cluster (auto: Dask when "
                   "installed).")
@click.option("--shard-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Where the shards write their outputs until merged (shared storage for a "
                   "cluster).")
def replay(trace: Path, config: Path, out: Path | None, verdicts: Path | None,
           report: Path | None, plot: Path | None, plot_window: str | None,
           offload: str | None, pnic: str,
           pnic_capacity: int | None, pnic_crash_at: float | None,
           pnic_withdraw_at: float | None, dump_flows_at: float | None,
           dump_flows: Path | None, engine: str, read_ahead: bool | None, quiet: bool,
           workers: int | None,
           scheduler: str | None,
           executor: str, shard_dir: Path | None) -> None:
    """Replay TRACE (pcap or pcapng) through the host that HOST.toml describes.

    Prints a summary; the files asked for are written as the trace goes. T is in seconds
    from the trace's first packet.
    """
    if (dump_flows_at is None) != (dump_flows is None):
        raise click.UsageError("--dump-flows-at and --dump-flows go together")
    window = None
    if plot_window is not None and plot is None:
        raise click.UsageError("--plot-window needs --plot")
    if plot_window is not None:
        try:
            window = parse_window(plot_window)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--plot-window") from None
    sharded = (workers or 1) > 1 or scheduler is not None
    if sharded and engine != "compiled":
        raise click.UsageError("--engine reference runs one process: leave out --workers and "
                               "--scheduler")
    if sharded and read_ahead:
        raise click.UsageError("--read-ahead is for one process: the shards of --workers and "
                               "--scheduler share the cores")
    if offload != "never" or engine == "compiled":
        warm_engine(None if quiet else Console())
    options: dict[str, Any] = dict(
        out=out, verdicts=verdicts, report=report, plot=plot, plot_window=window,
        offload=offload, pnic=pnic, capacity=pnic_capacity, crash_at=pnic_crash_at,
        withdraw_at=pnic_withdraw_at, dump_at=dump_flows_at, dump_path=dump_flows,
        progress=not quiet)
    try:
        if sharded:
            from flowshift.shard_replay import run_sharded

            result = run_sharded(trace, config, workers=workers, scheduler=scheduler,
                                 executor=executor, shard_dir=shard_dir, **options)
        else:
            result = run_replay(trace, config, engine=engine, read_ahead=read_ahead,
                                **options)
    except (ConfigError, TraceError, ReplayError, ClusterError, ShardError) as e:
        raise fail(str(e)) from None
    if not quiet:
        Console().print(summary_table(result))
    warn_about(result)


def warn_about(result: dict[str, Any]) -> None:
    """What the user must not miss, one line each on stderr: a trace that broke off, and
    scheduled actions the trace ended before (the report marks them `skipped`)."""
    if result["trace"]["problem"]:
        click.echo(f"Warning: trace ended early: {result['trace']['problem']}", err=True)
    duration = result["trace"]["duration"]
    for action in result["schedule"]:
        if "skipped" in action:
            flag = SCHEDULE_FLAGS.get(action["action"], action["action"])
            click.echo(f"Warning: {flag} {action['at']:g} skipped: the trace ended at "
                       f"{duration:.3f} s", err=True)


def parse_window(text: str) -> tuple[float | None, float | None]:
    """ "A:B", "A:" or ":B", seconds of trace time from the first packet."""
    lo_text, sep, hi_text = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r} is not A:B (seconds, e.g. 2:10, 2: or :10)")
    try:
        lo = float(lo_text) if lo_text.strip() else None
        hi = float(hi_text) if hi_text.strip() else None
    except ValueError:
        raise ValueError(f"{text!r} is not A:B (seconds, e.g. 2:10, 2: or :10)") from None
    for v in (lo, hi):
        if v is not None and not 0 <= v < float("inf"):
            raise ValueError(f"{text!r}: times must be seconds >= 0")
    if lo is not None and hi is not None and hi <= lo:
        raise ValueError(f"{text!r}: the end must come after the start")
    return lo, hi
