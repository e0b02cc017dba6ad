"""Reference-engine throughput: parsing, the service chain and the whole host, per packet.

    python bench/bench_reference.py [--flows N] [--repeat N] [--json PATH]

Generates two traces once into a temporary folder with flowshift.gen (about 300,000 packets
each by default): a guest's traffic and a NAT gateway's capture (gen's gateway mode, so replies
come back to the translated addresses). The frames are read into memory first, so that every
stage measures the engine, not the disk. Stages, in packets per second on this machine:

- parse: `parse()` of every frame;
- firewall chain: parse + `Chain.process` of a firewall machine (the tests' FIREWALL_HOST);
- NAT chain: parse + `Chain.process` of a gateway with firewall, SNAT and a port forward;
- host: `Host.process` + `results()` with offload policy never (the firewall machine);
- replay: `run_replay(..., offload="never")` of the firewall trace, reading the file too.

Each stage also prints a digest of what it produced (verdicts, reasons, bytes out), so that two
runs of different code can be compared for identical results.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from common import machine
from flowshift.config import HostConfig, parse_config
from flowshift.gen import TraceSpec, generate
from flowshift.host import Host
from flowshift.packet.parse import parse
from flowshift.packet.pcap import open_trace
from flowshift.replay import run_replay
from flowshift.services.chain import Chain
from flowshift.tiers.classify import Classifier

FIREWALL_HOST = {  # as tests/test_transparency.py
    "pnic": {"capacity": 64},
    "offload": {"policy": "elephant", "elephant_packets": 8, "elephant_bytes": 20000,
                "idle_timeout": 2.0, "report_interval": 0.5},
    "machine": [{
        "name": "vm",
        "addresses": ["10.0.0.0/24", "fd00::/64"],
        "services": ["firewall", "count"],
        "firewall": {"default": "drop", "rule": [
            {"action": "allow", "direction": "egress", "proto": "any"},
        ]},
    }],
}

NAT_HOST = {  # a gateway: stateful firewall, masquerade of both families, one port forward
    "machine": [{
        "name": "gw",
        "addresses": ["10.0.0.0/24", "fd00::/64"],
        "public": ["203.0.113.1", "2001:db8::1"],
        "services": ["firewall", "nat", "count"],
        "firewall": {"default": "drop", "rule": [
            {"action": "allow", "direction": "egress", "proto": "any"},
            {"action": "allow", "direction": "ingress", "proto": "tcp", "dst": "10.0.0.3/32",
             "dst_port": [8080]},
        ]},
        "nat": {
            "snat": [{"source": "10.0.0.0/24", "to": "203.0.113.1", "ports": "1024-65535"},
                     {"source": "fd00::/64", "to": "2001:db8::1", "ports": "1024-65535"}],
            "dnat": [{"proto": "tcp", "match": "203.0.113.1:8080", "to": "10.0.0.3:8080"}],
        },
    }],
}

Frames = list[tuple[int, bytes, int, int]]  # (ts_ns, data, linktype, wire_len)


def load(path: Path) -> Frames:
    with open_trace(path) as reader:
        return [(f.ts_ns, bytes(f.data), f.linktype, f.wire_len) for f in reader]


def directions(frames: Frames, cfg: HostConfig) -> list[int]:
    """Each frame's direction for the chain stages (-1: no machine's or not parsed)."""
    classifier = Classifier(cfg.machines)
    out = []
    for _, data, linktype, wire_len in frames:
        pkt = parse(data, linktype, wire_len)
        m, direction = classifier.classify(pkt) if pkt.l3 >= 0 else (-1, 0)
        out.append(direction if m == 0 else -1)
    return out


def parse_only(frames: Frames) -> tuple[int, str]:
    digest = hashlib.sha256()
    errors = 0
    for _, data, linktype, wire_len in frames:
        errors += parse(bytearray(data), linktype, wire_len).error != 0
    digest.update(str(errors).encode())
    return len(frames), digest.hexdigest()[:12]


def chain_only(frames: Frames, cfg: HostConfig, dirs: list[int]) -> tuple[int, str]:
    chain = Chain(cfg.machines[0], 0)
    process = chain.process
    digest = hashlib.sha256()
    for (ts, data, linktype, wire_len), direction in zip(frames, dirs, strict=True):
        pkt = parse(bytearray(data), linktype, wire_len)
        if direction < 0 or pkt.error not in (0, 17):  # OK, UNSUPPORTED_PROTOCOL
            continue
        out = process(pkt, direction, ts)
        digest.update(b"%d %d %d|" % (out.verdict, out.reason, out.rule))
        digest.update(pkt.data)
    return len(frames), digest.hexdigest()[:12]


def host_never(frames: Frames, cfg: HostConfig) -> tuple[int, str]:
    host = Host(cfg, policy="never")
    process = host.process
    results = host.results
    digest = hashlib.sha256()
    for i, (ts, data, linktype, wire_len) in enumerate(frames):
        process(i, ts, data, linktype, wire_len)
        for r in results():
            digest.update(b"%d %s|" % (r.verdict, r.reason.encode()))
            if r.data is not None:
                digest.update(r.data)
    host.finish()
    host.close()
    return len(frames), digest.hexdigest()[:12]


def replay_never(path: Path, cfg: HostConfig) -> tuple[int, str]:
    report = run_replay(path, cfg, offload="never", progress=False)
    counts = json.dumps(report["packets"], sort_keys=True).encode()
    return report["trace"]["packets"], hashlib.sha256(counts).hexdigest()[:12]


def trace(path: Path, flows: int, gateway: HostConfig | None) -> int:
    spec = TraceSpec(flows=flows, duration_s=max(10.0, flows / 50), elephants=max(1, flows // 400),
                     gateway=gateway)
    return generate(spec, path).packets


def best(run: Callable[[], tuple[int, str]], repeat: int) -> dict[str, object]:
    times = []
    digests = set()
    n = 0
    for _ in range(repeat):
        start = time.perf_counter()
        n, digest = run()
        times.append(time.perf_counter() - start)
        digests.add(digest)
    seconds = min(times)
    return {"packets": n, "seconds": round(seconds, 4), "packets_per_s": round(n / seconds),
            "digest": ",".join(sorted(digests))}


@click.command()
@click.option("--flows", default=2400, show_default=True,
              help="Flows per generated trace (2400: about 310,000 packets).")
@click.option("--repeat", default=3, show_default=True, help="Runs per stage; the best counts.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results here.")
def bench(flows: int, repeat: int, json_path: str | None) -> None:
    console = Console()
    info = machine()
    firewall = parse_config(FIREWALL_HOST, "firewall host")
    nat = parse_config(NAT_HOST, "nat host")
    with tempfile.TemporaryDirectory(prefix="flowshift-bench-") as tmp:
        guest_path, gateway_path = Path(tmp) / "guest.pcap", Path(tmp) / "gateway.pcap"
        with console.status("writing the traces"):
            trace(guest_path, flows, None)
            trace(gateway_path, flows, nat)
            guest, gateway = load(guest_path), load(gateway_path)
            guest_dirs, gateway_dirs = directions(guest, firewall), directions(gateway, nat)
        stages: dict[str, Callable[[], tuple[int, str]]] = {
            "parse": lambda: parse_only(guest),
            "parse + firewall chain": lambda: chain_only(guest, firewall, guest_dirs),
            "parse + NAT gateway chain": lambda: chain_only(gateway, nat, gateway_dirs),
            "host, offload never (firewall)": lambda: host_never(guest, firewall),
            "replay, offload never (firewall)": lambda: replay_never(guest_path, firewall),
        }
        results = []
        for name, run in stages.items():
            with console.status(f"measuring {name}"):
                results.append({"stage": name, **best(run, repeat)})

    console.print(f"machine: {info['cpu']}, {info['cores']} cores, Python "
                  f"{info['python']}, {info['system']}", soft_wrap=True)
    console.print(f"traces: {len(guest):,} packets (guest), {len(gateway):,} packets (NAT "
                  f"gateway), {flows} flows each; best of {repeat} runs", soft_wrap=True)
    table = Table()
    for column, justify in (("stage", "left"), ("packets/s", "right"), ("seconds", "right"),
                            ("digest", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in results:
        table.add_row(str(r["stage"]), f"{r['packets_per_s']:,}", str(r["seconds"]),
                      str(r["digest"]))
    console.print(table)
    if json_path:
        doc = {"machine": info, "traces": {"guest": len(guest), "gateway": len(gateway),
                                           "flows": flows},
               "repeat": repeat, "results": results}
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    bench()
