"""`flowshift replay TRACE --config HOST.toml`: a trace through the emulated host.

A thin layer over flowshift.replay.run_replay: options in, the summary out. Bad arguments, a
bad config or a file that is not a trace exit with status 2 and one line on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from flowshift.cluster import KINDS, ClusterError
from flowshift.config import ConfigError
from flowshift.offload import POLICIES
from flowshift.packet.pcap import TraceError
from flowshift.replay import PNIC_MODES, ReplayError, run_replay
from flowshift.report import print_summary
from flowshift.shard import ShardError

SECONDS = click.FloatRange(min=0, max=1e9)


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
              help="Where shard traces go while they replay (shared storage for a cluster).")
def replay(trace: Path, config: Path, out: Path | None, verdicts: Path | None,
           report: Path | None, plot: Path | None, offload: str | None, pnic: str,
           pnic_capacity: int | None, pnic_crash_at: float | None,
           pnic_withdraw_at: float | None, dump_flows_at: float | None,
           dump_flows: Path | None, quiet: bool, workers: int | None, scheduler: str | None,
           executor: str, shard_dir: Path | None) -> None:
    """Replay TRACE (pcap or pcapng) through the host that HOST.toml describes.

    Prints a summary; the files asked for are written as the trace goes. T is in seconds
    from the trace's first packet.
    """
    if (dump_flows_at is None) != (dump_flows is None):
        raise click.UsageError("--dump-flows-at and --dump-flows go together")
    options = dict(
        out=out, verdicts=verdicts, report=report, plot=plot, offload=offload, pnic=pnic,
        capacity=pnic_capacity, crash_at=pnic_crash_at, withdraw_at=pnic_withdraw_at,
        dump_at=dump_flows_at, dump_path=dump_flows, progress=not quiet)
    try:
        if (workers or 1) > 1 or scheduler is not None:
            from flowshift.shard_replay import run_sharded

            result = run_sharded(trace, config, workers=workers, scheduler=scheduler,
                                 executor=executor, shard_dir=shard_dir, **options)
        else:
            result = run_replay(trace, config, **options)  # type: ignore[arg-type]
    except (ConfigError, TraceError, ReplayError, ClusterError, ShardError) as e:
        raise fail(str(e)) from None
    if not quiet:
        print_summary(result, Console())
    elif result["trace"]["problem"]:
        click.echo(f"Warning: trace ended early: {result['trace']['problem']}", err=True)
