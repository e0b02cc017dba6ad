"""`flowshift demo`: a complete replay with no input from the user.

Writes the embedded demo host config (flowshift/data/demo.toml), generates a gateway trace for
it, replays the trace with the elephant offload policy and writes every output next to them.

The trace merges two generated parts: a gateway capture of the `gw` machine (its clients going
out through SNAT: elephants and mice, DNS, pings, a few media streams the firewall drops, IPv4
and some IPv6; outside clients coming in to the web VIP, plus a SYN flood against it), and the
`lab` machine's own clients going out.
"""

from __future__ import annotations

import heapq
import importlib
import ipaddress
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

import click
from rich.console import Console

from flowshift.commands.replay import warm_engine, warn_about
from flowshift.config import ConfigError, HostConfig, load_config
from flowshift.gen import TraceSpec, frames
from flowshift.output import AtomicOutputs
from flowshift.packet.pcap import PcapWriter, TraceError
from flowshift.packet.view import LINKTYPE_ETHERNET
from flowshift.replay import ReplayError, compile_ahead_work, run_replay
from flowshift.report import summary_table
from flowshift.tiers._pnic_cache import compiling_ahead

DURATION_S = 20.0
GW_CLIENTS = "10.0.0.0/24", "fd00::/64"
LAB_CLIENTS = ("10.0.2.0/24",)
OUTPUTS = ("demo.toml", "demo.pcap", "out.pcap", "verdicts.csv", "report.json", "plot.png",
           "flows.txt")


def demo_config_text() -> str:
    return resources.files("flowshift").joinpath("data/demo.toml").read_text(encoding="utf-8")


def _nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def trace_specs(config: HostConfig, scale: float) -> tuple[TraceSpec, TraceSpec]:
    """(a gateway capture of the first machine, the second machine's clients going out)."""
    gateway = TraceSpec(
        flows=max(int(900 * scale), 20), elephants=max(round(2 * scale), 1),
        duration_s=DURATION_S, seed=1, udp_share=0.2, icmp_share=0.04, ipv6_share=0.15,
        clients=_nets(*GW_CLIENTS), tcp_ports=(80, 443, 8080), gateway=config,
        ingress_share=0.2, attack="syn-flood", attack_flows=max(int(150 * scale), 10))
    lab = TraceSpec(
        flows=max(int(150 * scale), 10), elephants=1, elephant_share=0.5,
        duration_s=DURATION_S, seed=2, udp_share=0.1, icmp_share=0.02, ipv6_share=0.0,
        clients=_nets(*LAB_CLIENTS), tcp_ports=(443,))
    return gateway, lab


def build_trace(path: Path, config: HostConfig, scale: float = 1.0) -> int:
    """Write the demo trace for `config` to `path`; returns its packet count."""
    n = 0
    with AtomicOutputs() as files, PcapWriter(files.temp(path),
                                              linktype=LINKTYPE_ETHERNET) as out:
        for ts, frame in heapq.merge(*(frames(spec) for spec in trace_specs(config, scale)),
                                     key=lambda f: f[0]):
            out.write(ts, frame)
            n += 1
    return n


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("flowshift-demo"), show_default=True, metavar="DIR",
              help="Directory for the config, the trace and every output.")
@click.option("--scale", type=click.FloatRange(min=0.01, max=10), default=1.0,
              show_default=True, help="Size of the generated traffic, relative to the default.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def demo(out_dir: Path, scale: float, quiet: bool) -> None:
    """Generate a gateway trace, replay it with elephant offload and write every output.

    Writes into DIR: demo.toml (the host), demo.pcap (the trace), out.pcap, verdicts.csv,
    report.json, plot.png and flows.txt (the flows in the middle of the trace).
    """
    console = Console()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_path = out_dir / "demo.toml"
        config_path.write_text(demo_config_text(), encoding="utf-8")
    except OSError as e:
        click.echo(f"Error: cannot write into {out_dir}: {e.strerror}", err=True)
        raise click.exceptions.Exit(2) from None
    try:
        config = load_config(config_path)
        trace = out_dir / "demo.pcap"
        # a first run compiles the PNIC engine on the other core while the trace is generated
        with compiling_ahead(compile_ahead_work) as ahead:
            with console.status("generating the demo trace", spinner="dots") if not quiet \
                    else nullcontext():
                packets = build_trace(trace, config, scale)
            if not quiet:
                console.print(f"generated {trace}: {packets:,} packets, {DURATION_S:g} s")
            if ahead is not None:  # the plot's library loads while the engine compiles
                importlib.import_module("flowshift.plot")
            warm_engine(None if quiet else console, ahead)
        result = run_replay(
            trace, config_path, out=out_dir / "out.pcap", verdicts=out_dir / "verdicts.csv",
            report=out_dir / "report.json", plot=out_dir / "plot.png", offload="elephant",
            dump_at=DURATION_S / 2, dump_path=out_dir / "flows.txt", progress=not quiet)
    except (ConfigError, TraceError, ReplayError, OSError) as e:
        click.echo(f"Error: {e}", err=True)
        raise click.exceptions.Exit(2) from None
    if not quiet:
        console.print(summary_table(result))
        console.print(f"files written in {out_dir}:")
        for name in OUTPUTS:
            console.print(f"  {out_dir / name}")
    warn_about(result)
