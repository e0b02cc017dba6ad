"""Linux's conntrack limits under attack: a SYN flood's peak memory with `max` against without
a limit, and the cost of a SYN that finds the SNAT port range full against one that finds a
port free. Each pair runs in this one invocation, each case in a fresh process (peak RSS).

    python bench/bench_conntrack.py [--syns N] [--max M] [--refused K]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from typing import Any

import click

from common import machine
from flowshift.config import parse_config
from flowshift.host import Host
from flowshift.packet.build import tcp_frame
from flowshift.packet.view import LINKTYPE_ETHERNET, TCP_SYN

WEB = bytes([198, 51, 100, 7])  # the web server (a machine address)


def _gateway(ports: str) -> Host:
    """A SNAT gateway: the machine's 10/8 behind 192.0.2.1, ports from `ports`."""
    return Host(parse_config({
        "offload": {"policy": "never"},
        "machine": [{"name": "gw", "addresses": ["10.0.0.0/8"], "public": ["192.0.2.1"],
                     "services": ["firewall", "nat"],
                     "firewall": {"default": "allow", "rule": []},
                     "nat": {"snat": [{"source": "10.0.0.0/8", "to": "192.0.2.1",
                                       "ports": ports}]}}]}, "bench"))


def _server(max_flows: int) -> Host:
    """A web server's stateful firewall: new connections to port 80 allowed in."""
    cfg: dict[str, Any] = {
        "offload": {"policy": "never"},
        "machine": [{"name": "web", "addresses": [f"{WEB[0]}.{WEB[1]}.{WEB[2]}.0/24"],
                     "services": ["firewall"],
                     "firewall": {"default": "drop", "rule": [
                         {"action": "allow", "direction": "ingress", "proto": "tcp",
                          "dst_port": [80]}]}}]}
    if max_flows:
        cfg["conntrack"] = {"max": max_flows}
    return Host(parse_config(cfg, "bench"))


def _syn(i: int, inside: bool) -> bytes:
    """SYN number i: from the machine's network out (inside) or from a spoofed source in."""
    src = bytes([10 if inside else 100, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])
    dst = bytes([203, 0, 113, 9]) if inside else WEB
    return tcp_frame(src=src, dst=dst, sport=1024 + i % 60000, dport=80, seq=i,
                     ack=0, flags=TCP_SYN, window=65535)


def _flood(args: tuple[int, int]) -> dict[str, float]:
    """A flood of `syns` spoofed SYNs, 10 µs apart, at a web server's stateful firewall; the
    CPU time per SYN over its second tenth and its last (with a `max` below a tenth of the
    SYNs, both at the limit: flat when no cost grows with the flows seen)."""
    syns, max_flows = args
    host = _server(max_flows)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, cpu = time.perf_counter(), time.process_time()
    tenth = max(syns // 10, 1)
    marks: dict[int, float] = {}
    for i in range(syns):
        if i in (tenth, 2 * tenth, syns - tenth):
            marks[i] = time.process_time()
        data = _syn(i, False)
        host.process(i, 10_000 * i, data, LINKTYPE_ETHERNET, len(data))
        for _ in host.results():
            pass
    host.finish()
    seconds = time.perf_counter() - started
    end = time.process_time()
    second = (marks.get(2 * tenth, end) - marks.get(tenth, cpu)) / tenth * 1e6
    last = (end - marks.get(syns - tenth, cpu)) / tenth * 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chains = [m.chain for m in host.machines if m is not None]
    chains += [c for c in host.vnic.chains if c is not None]
    flows = sum(len(c.flows) for c in chains)
    host.close()
    return {"seconds": seconds, "cpu_seconds": end - cpu, "peak_mib": (peak - base) / 1024,
            "flows": flows, "us_second_tenth": second, "us_last_tenth": last}


def _refused(args: tuple[int, bool]) -> dict[str, float]:
    """CPU µs per SYN through SNAT: a range of 8 ports all taken (each SYN searches the
    bounded candidate set and is refused), or a wide range where each SYN keeps its own
    port."""
    count, full = args
    host = _gateway("40000-40007" if full else "1024-65535")
    for i in range(8 if full else 0):  # the range's ports, held by flows of their own
        data = _syn(i, True)
        host.process(i, i, data, LINKTYPE_ETHERNET, len(data))
    for _ in host.results():
        pass
    started = time.process_time()  # CPU time: the figure holds on a shared machine
    for k in range(count):
        data = _syn(1_000_000 + k, True)
        host.process(100 + k, 1000 + k, data, LINKTYPE_ETHERNET, len(data))
        for _ in host.results():
            pass
    return {"us_per_syn": (time.process_time() - started) / count * 1e6}


def _in_fresh_process(fn: Any, args: Any) -> Any:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (args,))


@click.command()
@click.option("--syns", default=1_000_000, show_default=True, help="SYNs of the flood.")
@click.option("--max", "max_flows", default=65536, show_default=True,
              help="conntrack max of the bounded run.")
@click.option("--refused", default=2000, show_default=True,
              help="SYNs timed against a full and a free port range.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(syns: int, max_flows: int, refused: int, json_path: str | None) -> None:
    result: dict[str, Any] = {"machine": machine()}
    result["flood_unbounded"] = _in_fresh_process(_flood, (syns, 0))
    result["flood_bounded"] = _in_fresh_process(_flood, (syns, max_flows))
    result["syn_port_free"] = _in_fresh_process(_refused, (refused, False))
    result["syn_range_full"] = _in_fresh_process(_refused, (refused, True))
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Python {m['python']}")
    u, b = result["flood_unbounded"], result["flood_bounded"]
    print(f"{syns:,} spoofed SYNs, no limit:   {u['peak_mib']:8.1f} MiB peak, "
          f"{u['flows']:,} flows at the end, {u['seconds']:.1f} s "
          f"({u['cpu_seconds']:.1f} s CPU)")
    print(f"{syns:,} spoofed SYNs, max {max_flows:,}: {b['peak_mib']:8.1f} MiB peak, "
          f"{b['flows']:,} flows at the end, {b['seconds']:.1f} s "
          f"({b['cpu_seconds']:.1f} s CPU; "
          f"{u['peak_mib'] / max(b['peak_mib'], 1e-9):.1f}x less memory)")
    for name, r in (("no limit", u), (f"max {max_flows:,}", b)):
        print(f"CPU per SYN, {name}: {r['us_second_tenth']:.1f} us over the second tenth, "
              f"{r['us_last_tenth']:.1f} us over the last")
    f, r = result["syn_port_free"], result["syn_range_full"]
    print(f"SYN with a free SNAT port:      {f['us_per_syn']:8.1f} us CPU (baseline)")
    print(f"SYN refused, port range full:   {r['us_per_syn']:8.1f} us CPU "
          f"({r['us_per_syn'] / f['us_per_syn']:.1f}x)")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
