"""Helpers for tests that run traces through an emulated host and compare runs."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

from flowshift.config import HostConfig
from flowshift.entry import Flow
from flowshift.host import Host
from flowshift.offload import OffloadPolicy, established
from flowshift.packet.batch import read_batches
from flowshift.packet.pcap import open_trace
from flowshift.results import TIER_LABELS, BatchResults, PacketResult, reason_label
from flowshift.verdict import Verdict

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"

# a machine whose firewall lets its own traffic out: replies pass, nothing is translated
FIREWALL_HOST = {
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
REAL = CORPUS / "real"


# a gateway: firewall, SNAT of both families, LB VIPs (round robin and Maglev, TCP and UDP)
GATEWAY_HOST = {
    "offload": {"policy": "elephant", "elephant_packets": 16, "elephant_bytes": 20000,
                "idle_timeout": 2.0, "report_interval": 0.5},
    "pnic": {"capacity": 64},
    "machine": [{
        "name": "gw",
        "addresses": ["10.0.0.0/23", "fd00::/63"],
        "public": ["192.0.2.1", "2001:db8:ffff::1", "192.0.2.10", "2001:db8:ffff::10",
                   "192.0.2.53"],
        "services": ["firewall", "nat", "lb", "count"],
        "firewall": {"default": "drop", "rule": [
            {"action": "allow", "direction": "egress", "proto": "any"},
            {"action": "allow", "direction": "ingress", "proto": "tcp", "dst": "10.0.1.0/24",
             "dst_port": [8080]},
            {"action": "allow", "direction": "ingress", "proto": "tcp",
             "dst": "fd00:0:0:1::/64", "dst_port": [8080]},
            {"action": "allow", "direction": "ingress", "proto": "udp", "dst": "10.0.1.0/24",
             "dst_port": [53]},
        ]},
        "nat": {"snat": [
            {"source": "10.0.0.0/23", "to": "192.0.2.1", "ports": "1024-65535"},
            {"source": "fd00::/63", "to": "2001:db8:ffff::1", "ports": "1024-65535"},
        ]},
        "lb": [
            {"proto": "tcp", "vip": "192.0.2.10:80", "scheduler": "round-robin",
             "backends": ["10.0.1.11:8080", "10.0.1.12:8080", "10.0.1.13:8080"]},
            {"proto": "tcp", "vip": "[2001:db8:ffff::10]:80",
             "backends": ["[fd00:0:0:1::11]:8080", "[fd00:0:0:1::12]:8080"]},
            {"proto": "udp", "vip": "192.0.2.53:53",
             "backends": ["10.0.1.21:53", "10.0.1.22:53"]},
        ],
    }],
}


@dataclass
class Run:
    results: list[PacketResult]
    host: Host
    dumps: list[list[str]] = field(default_factory=list)  # flow dumps, without the tier
    # for each dump, the packets held at the VNIC for a handoff in transit: not yet decided
    held: list[list[int]] = field(default_factory=list)

    def outputs(self) -> list[tuple[int, str, bytes | None]]:
        """What the invariant compares: verdict, reason and bytes of every packet."""
        return [(int(r.verdict), r.reason, r.data) for r in self.results]


class RandomPolicy(OffloadPolicy):
    """Offload established flows at pseudo-random moments drawn from a seed."""

    def __init__(self, base: OffloadPolicy, seed: int, p: float) -> None:
        self.__dict__.update(base.__dict__)
        self.name = "random"
        self.seed = seed
        self.p = p

    def wants(self, flow: Flow) -> bool:
        if not established(flow):
            return False
        total = flow.packets[0] + flow.packets[1]
        return random.Random(f"{self.seed}/{flow.key}/{total}").random() < self.p


def run(trace: Path, config: HostConfig, *, policy: str | None = None,
        random_seed: int | None = None, p: float = 0.3, latency: int = 0, batch: int = 256,
        pnic: str = "inline", capacity: int | None = None, withdraw_at: int | None = None,
        crash_at: int | None = None, rows: int | None = None,
        dump_at: int | None = None, engine: str = "compiled", dump_ts: int | None = None
        ) -> Run:
    """Replay `trace`; withdraw/crash_at are packet indices at which the PNIC goes away,
    dump_at one before which the flows are dumped (Run.dumps); dump_ts: a dump after the last
    packet, at that time (packet by packet only).

    rows: replay as `flowshift replay` does, `rows` packets at a time through
    Host.process_batch (the PNIC sees each batch first); None: packet by packet.
    """
    host = Host(config, policy=policy, capacity=capacity, pnic=pnic, latency=latency,
                batch=batch, engine=engine)
    if random_seed is not None:
        host.policy = RandomPolicy(host.policy, random_seed, p)
    results: list[PacketResult] = []
    dumps: list[list[str]] = []
    held: list[list[int]] = []
    if rows is not None:
        try:
            results = _batched(host, trace, rows, withdraw_at, crash_at, dump_at, dumps, held)
        finally:
            host.close()
        return Run(results, host, dumps, held)
    try:
        with open_trace(trace) as frames:
            for i, f in enumerate(frames):
                if i == dump_at:
                    dumps.append(_dump(host, f.ts_ns, held))
                if i == withdraw_at:
                    host.withdraw_pnic(f.ts_ns)
                if i == crash_at:
                    host.crash_pnic(f.ts_ns)
                host.process(i, f.ts_ns, f.data, f.linktype, f.wire_len)
                results.extend(host.results())
        if dump_ts is not None:
            dumps.append(_dump(host, dump_ts, held))
        host.finish()
        results.extend(host.results())
    finally:
        host.close()
    return Run(results, host, dumps, held)


def _dump(host: Host, ts: int, held: list[list[int]] | None = None) -> list[str]:
    from flowshift.report import flow_dump

    now = max(ts, host.clock)
    lines = [line.rsplit(" tier=", 1)[0]
             for line in flow_dump(host.dump_flows(now), now).splitlines()]
    if held is not None:  # after the dump brought everything due by now
        held.append(sorted(p.index for q in host.vnic.queue.held.values() for p in q))
    return lines


def _batched(host: Host, trace: Path, rows: int, withdraw_at: int | None,
             crash_at: int | None, dump_at: int | None = None,
             dumps: list[list[str]] | None = None,
             held: list[list[int]] | None = None) -> list[PacketResult]:
    results: list[PacketResult] = []
    index = 0
    for b in read_batches(trace, rows):
        # split where the PNIC goes away, as the replay does at a scheduled time
        cuts = sorted({0, len(b), *(t - index for t in (withdraw_at, crash_at, dump_at)
                                     if t is not None and 0 < t - index < len(b))})
        for lo, hi in itertools.pairwise(cuts):
            if index + lo == dump_at and dumps is not None:
                dumps.append(_dump(host, int(b.ts_ns[lo]), held))
            if index + lo == withdraw_at:
                host.withdraw_pnic(int(b.ts_ns[lo]))
            if index + lo == crash_at:
                host.crash_pnic(int(b.ts_ns[lo]))
            res = BatchResults.over(index + lo, b.buf.copy(), b.offset[lo:hi], b.caplen[lo:hi],
                                    b.wire_len[lo:hi], b.linktype[lo:hi], b.ts_ns[lo:hi])
            _collect(host.process_batch(res), results)
        index += len(b)
    host.finish()
    _collect(host.ready(), results)
    return results


def _collect(batches: list[BatchResults], results: list[PacketResult]) -> None:
    for res in batches:
        leaving = res.leaving
        for i in range(len(res)):
            results.append(PacketResult(
                res.index0 + i, int(res.ts[i]), "", "", Verdict(int(res.verdict[i])),
                reason_label(int(res.reason[i]), int(res.rule[i])),
                TIER_LABELS[int(res.tier[i])] if res.tier[i] >= 0 else "",
                res.frame(i) if leaving[i] else None, int(res.wire_len[i])))
