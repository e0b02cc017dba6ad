"""`flowshift gen-trace`: write a realistic, reproducible traffic trace (see docs/gen-trace.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flowshift.config import load_config
from flowshift.gen import (
    ATTACKS,
    DEFAULT_SERVERS,
    NS,
    GenSummary,
    TraceSpec,
    generate,
    parse_networks,
    parse_ports,
)
from flowshift.output import AtomicOutputs


@click.command("gen-trace")
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.option(
    "--flows",
    type=int,
    default=1000,
    show_default=True,
    help="Flows starting within the duration (elephants included, attacks not).",
)
@click.option(
    "--duration",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds over which flows start (a Poisson process); late flows run past it.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Random seed: the same options and seed give a byte-identical trace.",
)
@click.option(
    "--elephants",
    type=int,
    default=0,
    show_default=True,
    help="Long TCP flows (thousands of packets) that carry most of the bytes.",
)
@click.option(
    "--elephant-share",
    type=float,
    default=0.85,
    show_default=True,
    help="Share of all payload bytes the elephants carry together.",
)
@click.option(
    "--udp-share",
    type=float,
    default=0.15,
    show_default=True,
    help="Share of the other flows that are UDP (DNS-like, a few long streams).",
)
@click.option(
    "--icmp-share",
    type=float,
    default=0.02,
    show_default=True,
    help="Share of the other flows that are ping runs (ICMP/ICMPv6 echo).",
)
@click.option(
    "--ipv6-share",
    type=float,
    default=None,
    help="Share of flows over IPv6, all protocols. Default: 0.2 when both pools "
    "have both families, else the one family they have.",
)
@click.option(
    "--attack",
    type=click.Choice(ATTACKS),
    default="none",
    show_default=True,
    help="Add invalid traffic: a burst of spoofed SYNs to one server port, or "
    "segments and RSTs far outside the window on established flows.",
)
@click.option(
    "--attack-flows",
    type=int,
    default=None,
    help="Spoofed SYNs, or flows attacked out of window. Default: flows/10, at least 10.",
)
@click.option(
    "--clients",
    default=None,
    help="Client networks or addresses, comma-separated "
    "[default: 10.0.0.0/24,fd00::/64, or the first machine's with --config].",
)
@click.option(
    "--servers",
    default=None,
    help="Server networks or addresses, comma-separated [default: 198.51.100.0/24,2001:db8::/64].",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Host config (TOML): clients default to its first machine's addresses.",
)
@click.option(
    "--gateway-config",
    "gateway_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Host config (TOML): write a capture of its first machine's gateway, with the "
    "translations it makes (SNAT, LB, DNAT). Clients default to the machine's addresses.",
)
@click.option(
    "--ingress-share",
    type=float,
    default=None,
    help="With --gateway-config: share of the other flows opened from the outside to the "
    "machine's VIPs and port forwards [default: 0.3 when it has any, else 0].",
)
@click.option(
    "--tcp-ports",
    default="80,8080",
    show_default=True,
    help="Server ports of TCP flows (HTTP-like request/response).",
)
@click.option(
    "--udp-ports",
    default="53",
    show_default=True,
    help="Server ports of UDP request/response flows (real DNS messages on 53).",
)
@click.option(
    "--stream-ports", default="5004", show_default=True, help="Server ports of long UDP streams."
)
@click.option(
    "--mtu",
    type=int,
    default=1500,
    show_default=True,
    help="Link MTU: sets the MSS the ends announce.",
)
@click.option("--vlan", type=int, default=None, help="Tag every frame with this 802.1Q VLAN id.")
@click.pass_context
def gen_trace(
    ctx: click.Context,
    out: str,
    flows: int,
    duration: float,
    seed: int,
    elephants: int,
    elephant_share: float,
    udp_share: float,
    icmp_share: float,
    ipv6_share: float | None,
    attack: str,
    attack_flows: int | None,
    clients: str | None,
    servers: str | None,
    config_path: str | None,
    gateway_path: str | None,
    ingress_share: float | None,
    tcp_ports: str,
    udp_ports: str,
    stream_ports: str,
    mtu: int,
    vlan: int | None,
) -> None:
    """Write a realistic, reproducible traffic trace to OUT (classic pcap, Ethernet).

    TCP connections with handshakes, windows and teardown, HTTP-like request and response;
    mice with heavy-tailed sizes and a few elephants; DNS-like UDP and streams; pings; IPv4
    and IPv6; all interleaved in time. Optionally with attack traffic, the only invalid
    packets in the trace.
    """
    try:
        gateway = load_config(gateway_path) if gateway_path is not None else None
        if clients is not None:
            client_nets = parse_networks(clients)
        elif gateway is not None:
            client_nets = gateway.machines[0].addresses
        elif config_path is not None:
            client_nets = load_config(config_path).machines[0].addresses
        else:
            client_nets = None
        extra: dict[str, Any] = {"clients": client_nets} if client_nets is not None else {}
        spec = TraceSpec(
            flows=flows,
            duration_s=duration,
            seed=seed,
            elephants=elephants,
            elephant_share=elephant_share,
            udp_share=udp_share,
            icmp_share=icmp_share,
            ipv6_share=ipv6_share,
            attack=attack,
            attack_flows=attack_flows,
            servers=parse_networks(servers) if servers is not None else DEFAULT_SERVERS,
            tcp_ports=parse_ports(tcp_ports),
            udp_ports=parse_ports(udp_ports),
            stream_ports=parse_ports(stream_ports),
            mtu=mtu,
            vlan=vlan,
            gateway=gateway,
            ingress_share=ingress_share,
            **extra,
        )
    except (ValueError, OSError) as e:
        click.echo(f"Error: {e}", err=True)
        ctx.exit(2)

    err = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]writing[/] {task.fields[packets]:,} packets"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}% of trace time"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # on a terminal only: stderr stays clean for errors
    )
    try:
        with progress:
            task = progress.add_task("gen", total=spec.duration_s * NS, packets=0)

            def report(packets: int, elapsed_ns: int) -> None:
                progress.update(
                    task, completed=min(elapsed_ns, spec.duration_s * NS), packets=packets
                )

            # written under a temporary name, in place only once the trace is complete
            with AtomicOutputs() as files:
                summary = generate(spec, files.temp(out), report)
    except ValueError as e:  # a gateway that leaves a flow no free translated tuple
        click.echo(f"Error: {e}", err=True)
        ctx.exit(2)
    except OSError as e:
        click.echo(f"Error: cannot write {out}: {e.strerror}", err=True)
        ctx.exit(2)
    Console().print(_summary_table(Path(out), summary))


def _summary_table(path: Path, s: GenSummary) -> Table:
    table = Table(title=f"{path}", show_header=False, box=None, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("packets", f"{s.packets:,}")
    table.add_row("bytes", f"{s.bytes:,}")
    table.add_row("trace time", f"{s.span_s:.3f} s")
    table.add_row("flows", ", ".join(f"{k} {n:,}" for k, n in sorted(s.flows.items())))
    if s.flows.get("elephant"):
        table.add_row(
            "elephants",
            f"{s.elephant_byte_share:.1%} of bytes, {s.elephant_packet_share:.1%} of packets",
        )
    if s.attack_packets:
        attacked = f" on {s.attacked_flows:,} flows" if s.attacked_flows else ""
        table.add_row("attack", f"{s.attack_packets:,} packets{attacked}")
    if s.ingress_flows:
        table.add_row("ingress", f"{s.ingress_flows:,} flows from the outside")
    return table
