"""`flowshift sweep TRACE... --config HOST.toml --vary KEY=V1,V2 --out-dir DIR`: what-if grids.

A thin layer over flowshift.sweep.run_sweep. Bad arguments, a bad --vary key or value (the
config loader's one-line error naming the key path) or an unusable output directory exit with
status 2 and one line on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from flowshift.cluster import KINDS, ClusterError, open_executor
from flowshift.commands.replay import fail
from flowshift.config import ConfigError, load_config
from flowshift.offload import POLICIES
from flowshift.packet.pcap import TraceError
from flowshift.replay import ReplayError
from flowshift.sweep import SweepError, Vary, execute, parse_vary, plan_sweep, preload_plots


def _floats(name: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected seconds T1,T2,...",
                                 param_hint=name) from None
    if not all(0 <= v < 1e9 for v in values):
        raise click.BadParameter(f"{text!r}: seconds must be >= 0", param_hint=name)
    return values


@click.command("sweep")
@click.argument("traces", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config", required=True, type=click.Path(path_type=Path),
              metavar="HOST.toml", help="The base host config.")
@click.option("--vary", "varies", multiple=True, metavar="KEY=V1,V2,...",
              help="A config key path and its values, e.g. pnic.capacity=64,256,1024.")
@click.option("--offload", "offloads", metavar="P1,P2",
              help=f"Offload policies to try ({', '.join(POLICIES)}).")
@click.option("--crash-at", metavar="T1,T2", help="PNIC crash times to try (seconds).")
@click.option("--withdraw-at", metavar="T1,T2", help="PNIC withdrawal times to try (seconds).")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              metavar="DIR", help="Where sweep.csv, sweep.json and the plots go (new or empty).")
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="Run the points on N local workers.")
@click.option("--scheduler", metavar="ADDRESS", help="Run the points on this Dask cluster.")
@click.option("--executor", type=click.Choice(KINDS), default="auto", show_default=True,
              help="Workers as plain processes or a local Dask cluster.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def sweep(traces: tuple[Path, ...], config: Path, varies: tuple[str, ...],
          offloads: str | None, crash_at: str | None, withdraw_at: str | None, out_dir: Path,
          workers: int | None, scheduler: str | None, executor: str, quiet: bool) -> None:
    """Replay every TRACE under every combination of the values given; write one row per
    run to DIR/sweep.csv and DIR/sweep.json, and a plot per varied key."""
    policies = offloads.split(",") if offloads else None
    for p in policies or ():
        if p not in POLICIES:
            raise click.BadParameter(f"{p!r} is not one of {', '.join(POLICIES)}",
                                     param_hint="--offload")
    crashes = _floats("--crash-at", crash_at)
    withdrawals = _floats("--withdraw-at", withdraw_at)
    try:
        parsed: list[Vary] = [parse_vary(v) for v in varies]
        plan = plan_sweep(list(traces), load_config(config), parsed, out_dir,
                          offloads=policies, crash_at=crashes, withdraw_at=withdrawals,
                          source=str(config))
        preload_plots()  # before the workers fork: each then draws without importing it
        with open_executor(workers, scheduler, executor) as ex:
            rows = execute(plan, ex, progress=not quiet)
    except (ConfigError, TraceError, ReplayError, SweepError, ClusterError) as e:
        raise fail(str(e)) from None
    if not quiet:
        click.echo(f"{len(rows)} runs: {out_dir}/sweep.csv, sweep.json and plots")
