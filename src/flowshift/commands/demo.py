"""`flowshift demo`: a complete replay with no input from the user.

Writes the embedded demo host config (flowshift/data/demo.toml), generates a gateway trace for
it, replays the trace with the elephant offload policy and writes every output next to them.

The trace merges two generated halves: the machines' own clients going out (elephants and mice,
DNS, pings, a few media streams the firewall drops; IPv4 and some IPv6), and outside clients
coming in to the web VIP (plus a SYN flood against it). Answers are then put in their wire
form (WireView): to the SNAT address, from the LB backend.
"""

from __future__ import annotations

import heapq
import ipaddress
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

import click
from rich.console import Console

from flowshift.config import ConfigError, HostConfig, load_config
from flowshift.entry import Flow, Tier
from flowshift.flow import FlowKey
from flowshift.gen import TraceSpec, generate
from flowshift.host import Classifier
from flowshift.packet.parse import parse
from flowshift.packet.pcap import PcapWriter, TraceError, open_trace
from flowshift.packet.rewrite import (
    set_dport,
    set_dst,
    set_inner_dport,
    set_inner_dst,
    set_inner_sport,
    set_inner_src,
    set_sport,
    set_src,
)
from flowshift.packet.view import LINKTYPE_ETHERNET, Packet, ParseError
from flowshift.replay import ReplayError, run_replay
from flowshift.report import print_summary
from flowshift.services.chain import Chain

DURATION_S = 20.0
OUTSIDE_CLIENTS = "203.0.113.0/24", "2001:db8:beef::/64"
INSIDE_CLIENTS = "10.0.0.0/24", "10.0.2.0/24", "fd00::/64"
OUTPUTS = ("demo.toml", "demo.pcap", "out.pcap", "verdicts.csv", "report.json", "plot.png",
           "flows.txt")


def demo_config_text() -> str:
    return resources.files("flowshift").joinpath("data/demo.toml").read_text(encoding="utf-8")


def _nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def trace_specs(config: HostConfig, scale: float) -> tuple[TraceSpec, TraceSpec]:
    """(the machines' clients going out, outside clients coming in to the VIPs)."""
    vips = tuple(ipaddress.ip_network(ipaddress.ip_address(p.vip))
                 for m in config.machines for p in m.lb)
    outgoing = TraceSpec(
        flows=max(int(750 * scale), 20), elephants=max(round(2 * scale), 1),
        duration_s=DURATION_S, seed=1, udp_share=0.2, icmp_share=0.04, ipv6_share=0.15,
        clients=_nets(*INSIDE_CLIENTS), tcp_ports=(80, 443, 8080))
    incoming = TraceSpec(
        flows=max(int(200 * scale), 10), elephants=1, elephant_share=0.5,
        duration_s=DURATION_S, seed=2, udp_share=0.0, icmp_share=0.0, ipv6_share=0.25,
        clients=_nets(*OUTSIDE_CLIENTS), servers=vips, tcp_ports=(80,), attack="syn-flood",
        attack_flows=max(int(150 * scale), 10))
    return outgoing, incoming


def _frames(path: Path) -> Iterator[tuple[int, bytes, int]]:
    with open_trace(path) as reader:
        for f in reader:
            yield f.ts_ns, f.data, f.wire_len


class WireView:
    """Puts generated answers into the form they have on the wire outside a NAT/LB host.

    The generator answers each packet as it was sent: to the client's inside address, from the
    VIP. On the wire, the answer goes to the SNAT address and port the host chose, and comes
    from the backend its LB chose: the reverse of the flow's `xlat`. Those choices depend on
    the host's state, so this pass runs the machines' chains (the reference engine, as the
    replay does before any offload) over the trace and rewrites each answer from its flow.
    """

    def __init__(self, config: HostConfig) -> None:
        self.classifier = Classifier(config.machines)
        self.chains = [Chain(m, i, Tier.MACHINE) for i, m in enumerate(config.machines)]
        self.now = 0

    def _flow(self, key: FlowKey) -> Flow | None:
        """The flow whose original key is `key` in any machine's zone."""
        for chain in self.chains:
            hit = chain.flows.get(key._replace(zone=chain.index))
            if hit is not None and hit[1] == 0 and hit[0].expires > self.now:
                return hit[0]
        return None

    def frame(self, ts: int, data: bytes, wire_len: int) -> bytes:
        self.now = ts
        pkt = parse(bytearray(data), LINKTYPE_ETHERNET, wire_len)
        if pkt.error != ParseError.OK:
            return data
        inner = pkt.inner
        if inner is None:
            flow = self._flow(pkt.key().reversed())
            if flow is not None and flow.key != flow.xlat:  # an answer: from reverse(xlat)
                x = flow.xlat
                _set(pkt, x.dst, x.src, x.dport, x.sport)
        elif inner.error == ParseError.OK:
            flow = self._flow(inner.key())
            if flow is not None and flow.key != flow.xlat:  # an ICMP error about a query
                k, x = flow.key, flow.xlat
                if k.src != x.src:  # SNAT: the error goes to the NAT address
                    set_dst(pkt, x.src)
                if k.dst != x.dst:  # LB: the error comes from the backend
                    set_src(pkt, x.dst)
                _set(inner, x.src, x.dst, x.sport, x.dport, pkt)
        wire = bytes(pkt.data)
        m, direction = self.classifier.classify(pkt)
        if m >= 0:
            self.chains[m].process(pkt, direction, ts)  # the state the next answer needs
        return wire


def _set(view: Packet, src: bytes, dst: bytes, sport: int, dport: int,
         outer: Packet | None = None) -> None:
    """Rewrite a packet's (or, with `outer`, its quoted datagram's) tuple, checksums kept."""
    if outer is None:
        setters = (set_src, set_dst, set_sport, set_dport)
        pkt = view
    else:
        setters = (set_inner_src, set_inner_dst, set_inner_sport, set_inner_dport)
        pkt = outer
    for setter, old, new in zip(setters, (view.src, view.dst, view.sport, view.dport),
                                (src, dst, sport, dport), strict=True):
        if old != new:
            setter(pkt, new)


def build_trace(path: Path, config: HostConfig, scale: float = 1.0) -> int:
    """Write the demo trace for `config` to `path`; returns its packet count."""
    outgoing, incoming = trace_specs(config, scale)
    wire = WireView(config)
    with tempfile.TemporaryDirectory(prefix="flowshift-demo-") as tmp:
        a, b = Path(tmp) / "outgoing.pcap", Path(tmp) / "incoming.pcap"
        generate(outgoing, a)
        generate(incoming, b)
        n = 0
        with PcapWriter(path, linktype=LINKTYPE_ETHERNET) as out:
            for ts, data, wire_len in heapq.merge(_frames(a), _frames(b), key=lambda f: f[0]):
                out.write(ts, wire.frame(ts, data, wire_len), wire_len)
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
        with console.status("generating the demo trace", spinner="dots") if not quiet \
                else nullcontext():
            packets = build_trace(trace, config, scale)
        if not quiet:
            console.print(f"generated {trace}: {packets:,} packets, {DURATION_S:g} s")
        result = run_replay(
            trace, config_path, out=out_dir / "out.pcap", verdicts=out_dir / "verdicts.csv",
            report=out_dir / "report.json", plot=out_dir / "plot.png", offload="elephant",
            dump_at=DURATION_S / 2, dump_path=out_dir / "flows.txt", progress=not quiet)
    except (ConfigError, TraceError, ReplayError, OSError) as e:
        click.echo(f"Error: {e}", err=True)
        raise click.exceptions.Exit(2) from None
    if not quiet:
        print_summary(result, console)
        console.print(f"files written in {out_dir}:")
        for name in OUTPUTS:
            console.print(f"  {out_dir / name}")
