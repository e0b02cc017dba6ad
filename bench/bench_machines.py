"""Replay against the number of machines: one trace, the same traffic, split over 1 to N guests.

    python bench/bench_machines.py [--machines 1,16,64,256] [--flows 4000] [--repeat 5]
        [--workdir DIR] [--json PATH]

A host runs many guests, and the replay's per-pass work must not grow with them. The trace is
short TCP connections from 1,024 clients in 10.0.0.0/16 (flowshift.gen, IPv4, no NAT so that
the replies are those of the clients' own addresses); each host splits that /16 into N equal
networks, one per machine, each with a stateful firewall (egress allowed, the rest dropped but
for replies). Every machine offloads through its VNIC once its first elephant comes, so with
`--offload elephant` each one also hands its chain over. Each figure is the median of --repeat
replays, the host sizes in turns; the baseline is one machine in the same run.
"""

from __future__ import annotations

import ipaddress
import statistics
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from common import machine, report
from flowshift.config import HostConfig, parse_config
from flowshift.gen import TraceSpec, generate
from flowshift.replay import run_replay

INSIDE = ipaddress.ip_network("10.0.0.0/16")
CLIENT_NETS = tuple(INSIDE.subnets(new_prefix=20))  # 64 client hosts drawn from each


def host(n: int) -> HostConfig:
    """INSIDE split over n machines (n a power of two), each behind its own firewall."""
    prefix = INSIDE.prefixlen + (n - 1).bit_length()
    machines = [{
        "name": f"m{k}", "addresses": [str(net)], "public": [f"192.0.2.{k}" if k < 256 else
                                                            f"198.18.{k >> 8}.{k & 255}"],
        "services": ["firewall", "count"],
        "firewall": {"default": "drop",
                     "rule": [{"action": "allow", "direction": "egress", "proto": "any"}]},
    } for k, net in enumerate(INSIDE.subnets(new_prefix=prefix))]
    return parse_config({
        "pnic": {"capacity": 4096, "services": ["firewall", "nat", "lb", "count"]},
        "offload": {"policy": "elephant", "elephant_packets": 32, "elephant_bytes": 65536},
        "machine": machines}, f"{n} machines")


def replay(trace: Path, cfg: HostConfig, offload: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_replay(trace, cfg, offload=offload, progress=False,
                          report=Path(tmp) / "r.json")


@click.command()
@click.option("--machines", default="1,16,64,256", help="host sizes (powers of two)")
@click.option("--flows", default=4000, show_default=True)
@click.option("--repeat", default=5, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(machines: str, flows: int, repeat: int, workdir: Path | None,
         json_path: Path | None) -> None:
    console = Console()
    sizes = [int(s) for s in machines.split(",")]
    if any(n < 1 or n & (n - 1) for n in sizes):
        raise click.BadParameter("host sizes must be powers of two", param_hint="--machines")
    work = workdir or Path(tempfile.mkdtemp(prefix="fs-bench-machines-"))
    work.mkdir(parents=True, exist_ok=True)
    trace = work / f"machines-{flows}.pcap"
    if not trace.exists():
        generate(TraceSpec(flows=flows, duration_s=flows / 100, seed=17, udp_share=0.0,
                           icmp_share=0.0, ipv6_share=0.0, clients=CLIENT_NETS), trace)
    hosts = {n: host(n) for n in sizes}
    runs: dict[tuple[int, str], list[float]] = {}
    reports: dict[tuple[int, str], dict[str, Any]] = {}
    for offload in ("never", "elephant"):
        for n in sizes:
            replay(trace, hosts[n], offload)  # warm: compiled kernels, first allocations
        for _ in range(repeat):
            for n in sizes:
                r = replay(trace, hosts[n], offload)
                runs.setdefault((n, offload), []).append(r["timing"]["packets_per_second"])
                reports[(n, offload)] = r
    results: dict[str, Any] = {"machine": machine(), "trace": {
        "path": str(trace), "packets": reports[(sizes[0], "never")]["packets"]["in"],
        "flows": flows}, "points": []}
    table = Table(title=f"replay against machines ({results['trace']['packets']:,} packets, "
                        f"{flows:,} connections)")
    for col in ("machines", "offload", "packets/s", "against 1 machine", "handoffs",
                "offloads"):
        table.add_column(col, justify="right")
    for offload in ("never", "elephant"):
        base = statistics.median(runs[(sizes[0], offload)])
        for n in sizes:
            pps = statistics.median(runs[(n, offload)])
            r = reports[(n, offload)]
            point = {"machines": n, "offload": offload, "packets_per_second": pps,
                     "runs": runs[(n, offload)], "against_first": pps / base,
                     "handoffs": r["events"].get("handoff", 0),
                     "offloads": r["offloads"]["to_pnic"]}
            results["points"].append(point)
            table.add_row(str(n), offload, f"{pps:,.0f}", f"{pps / base:.2f}×",
                          str(point["handoffs"]), f"{point['offloads']:,}")
    report(console, table, results, json_path)

if __name__ == "__main__":
    main()
