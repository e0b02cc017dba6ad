"""Differential check: one machine's config in flowshift and in the real Linux kernel, per packet.

The machine's chain is rendered as nftables (flowshift.nft) and loaded into a router in
namespaces (router.py). The same trace goes through flowshift (replay.run_replay) and
through the router, in order: egress packets enter on the machine side, ingress packets on
the wire side. Each packet's outcome is compared: forwarded or not, and when forwarded, the
5-tuple it left with and its transport bytes (so checksums, sequence numbers and ICMP
quotes count too).

To find a packet's output, each injected packet is stamped with its injection number in a
field neither NAT nor conntrack looks at: the IPv4 identification (header checksum fixed)
or the IPv6 flow label. Packets flowshift does not give to the machine (bypass, unparsed),
IP fragments and what no router forwards (link-scope, multicast, TTL 1) are not injected;
they are counted as not compared, by why. A truncated capture (snaplen) is sent zero-filled
to its length on the wire with a valid transport checksum, so Linux tracks the connection as
the capture saw it; its verdict and 5-tuple are compared, its transport bytes are not.
"""

from __future__ import annotations

import csv
import ipaddress
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flowshift.config import HostConfig, LbPool, MachineConfig
from flowshift.flow import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_NAMES,
    PROTO_TCP,
    PROTO_UDP,
    format_endpoint,
)
from flowshift.gen import TraceSpec, generate
from flowshift.linux.router import (
    MACHINE,
    MTU,
    NOT_ROOT,
    QUIET_S,
    SETTLE_S,
    WIRE,
    Output,
    Router,
    RouterError,
    Routes,
    pinned,
)
from flowshift.nft import Ports, render, sysctl_lines
from flowshift.packet.checksum import checksum, ones_sum, pseudo_header_sum
from flowshift.packet.parse import parse
from flowshift.packet.pcap import open_trace
from flowshift.packet.view import LINKTYPE_ETHERNET, Packet
from flowshift.replay import run_replay

BATCH = 64  # frames sent before reading what came out
STAMP_MOD = {4: 1 << 16, 6: 1 << 20}  # IPv4 identification, IPv6 flow label
ETHERTYPES = {4: b"\x08\x00", 6: b"\x86\xdd"}
SHOWN = 10  # differences kept for the report
ESTABLISHED_REASONS = ("established", "related")
DEFAULT_FLOWS = 200
DEFAULT_DURATION = 5.0
BROADCAST = ipaddress.ip_address("255.255.255.255")
CHECKSUM_AT = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}

Tuple5 = tuple[str, str, int]  # "src:port", "dst:port", proto


@dataclass
class Difference:
    index: int  # the input packet, 0-based in the trace
    cls: str
    what: str  # "verdict", "side", "rewrite" or "bytes"
    flowshift: str
    linux: str

    def text(self) -> str:
        return (f"#{self.index} {self.cls}: {self.what} differs: flowshift {self.flowshift}; "
                f"Linux {self.linux}")


@dataclass
class Verification:
    machine: str
    trace: str
    # class -> [agree, differ, forwarded (by both, alike)]
    classes: dict[str, list[int]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)  # not compared, by why
    differences: list[Difference] = field(default_factory=list)  # the first SHOWN
    differing: int = 0
    filled: int = 0  # truncated captures sent zero-filled to their length on the wire
    notes: list[str] = field(default_factory=list)

    @property
    def compared(self) -> int:
        return sum(a + d for a, d, _ in self.classes.values())

    @property
    def agreed(self) -> bool:
        return self.differing == 0

    def count(self, cls: str, diff: Difference | None, forwarded: bool) -> None:
        row = self.classes.setdefault(cls, [0, 0, 0])
        if diff is None:
            row[0] += 1
            row[2] += forwarded
            return
        row[1] += 1
        self.differing += 1
        if len(self.differences) < SHOWN:
            self.differences.append(diff)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "trace": self.trace,
            "agree": self.agreed,
            "compared": self.compared,
            "differing": self.differing,
            "classes": {k: {"agree": a, "differ": d, "forwarded": f}
                        for k, (a, d, f) in sorted(self.classes.items())},
            "not_compared": dict(sorted(self.skipped.items())),
            "zero_filled": self.filled,
            "differences": [vars(d) for d in self.differences],
            "notes": self.notes,
        }


def round_robin_twin(cfg: HostConfig) -> HostConfig:
    """The same config with every Maglev pool balanced round robin, as Linux can."""
    machines = tuple(
        replace(m, lb=tuple(replace(p, scheduler="round-robin") for p in m.lb))
        for m in cfg.machines
    )
    return replace(cfg, machines=machines)


def maglev_pools(m: MachineConfig) -> list[LbPool]:
    return [p for p in m.lb if p.scheduler == "maglev"] if "lb" in m.services else []


def verify(cfg: HostConfig, machine: int, trace: str | Path | None = None, *,
           flows: int = DEFAULT_FLOWS, seed: int = 1, ruleset: str | None = None) -> Verification:
    """Run the check for machine `machine` of `cfg`; generate a gateway trace when none given.

    `ruleset`: the nftables ruleset Linux runs (ports "inside" and "outside"), by default
    the machine's rendering; another one checks a hand-written ruleset against the config.
    """
    if os.geteuid() != 0:
        raise RouterError(NOT_ROOT)
    m = cfg.machines[machine]
    one = replace(cfg, machines=(m,))  # the machine alone: both sides see only its traffic
    with tempfile.TemporaryDirectory(prefix="fs-verify-") as tmp:
        work = Path(tmp)
        if trace is None:
            trace = work / "trace.pcap"
            generate(TraceSpec(flows=flows, duration_s=DEFAULT_DURATION, seed=seed,
                               gateway=one, clients=m.addresses), trace)
            name = f"generated gateway trace (flows {flows}, seed {seed})"
        else:
            name = str(trace)
        run_replay(trace, one, out=work / "flowshift.pcap", verdicts=work / "verdicts.csv",
                   progress=False)
        result = Verification(m.name, name)
        if maglev_pools(m):
            result.notes.append(
                "Maglev pools run as jhash in Linux: LB flows may take other backends "
                "(verify the round-robin twin with --maglev-as-round-robin)")
        if ruleset is None:
            ruleset = render(one, [0], {0: Ports()}).text
        _compare(one, trace, work, ruleset, result)
    return result


# -- the comparison -------------------------------------------------------------------------


@dataclass
class _Input:
    index: int
    side: int
    cls: str
    verdict: str  # flowshift's
    reason: str
    out: Packet | None  # flowshift's output
    family: int
    stamp: int
    frame: bytes
    proto: int
    ip_total: int
    filled: bool  # a truncated capture, zero-filled: its transport bytes are not compared


def _compare(cfg: HostConfig, trace: str | Path, work: Path, ruleset: str,
             result: Verification) -> None:
    m = cfg.machines[0]
    with (work / "verdicts.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    with open_trace(work / "flowshift.pcap") as frames:
        ours = [parse(bytearray(fr.data), fr.linktype, fr.wire_len) for fr in frames]
    inputs = list(_inputs(trace, rows, ours, result))
    routes = Routes([*m.addresses, *(ipaddress.ip_network(a) for a in m.public)])
    outputs: dict[int, Output] = {}
    with Router(ruleset, sysctl_lines(cfg, [0]), routes) as router, pinned():
        router.exchange([], SETTLE_S)  # what the router said at link-up (MLD) is not ours
        recent: dict[tuple[int, int], _Input] = {}
        batches = [inputs[k:k + BATCH] for k in range(0, len(inputs), BATCH)]
        for batch in [*batches, []]:  # the empty batch: stragglers of a busy machine
            for i in batch:
                recent[i.family, i.stamp] = i
            quiet = QUIET_S if batch else SETTLE_S
            for o in router.exchange([(i.side, i.frame) for i in batch], quiet):
                hit = _owner(o, recent)
                if hit is not None and hit.index not in outputs:
                    outputs[hit.index] = o
    for i in inputs:
        out = outputs.get(i.index)
        result.count(i.cls, _judge(i, out), out is not None)


def _inputs(trace: str | Path, rows: list[dict[str, str]], ours: list[Packet],
            result: Verification) -> Iterator[_Input]:
    seq = 0
    with open_trace(trace) as frames:
        for fr, row in zip(frames, rows, strict=False):
            if row["verdict"] not in ("forward", "drop"):
                result.skipped[f"flowshift {row['verdict']}"] += 1
                continue
            pkt = parse(bytearray(fr.data), fr.linktype, fr.wire_len)
            why = _not_routable(pkt)
            if why:
                result.skipped[why] += 1
                continue
            ip = bytearray(pkt.data[pkt.l3:pkt.l3 + pkt.ip_total])
            filled = pkt.truncated
            if filled:
                if pkt.l4 < 0 or pkt.proto not in CHECKSUM_AT:
                    result.skipped["truncated capture"] += 1
                    continue
                _fill(ip, pkt)
                result.filled += 1
            stamp = seq % STAMP_MOD[pkt.family]
            _stamp(ip, pkt.family, stamp)
            seq += 1
            direction = row["direction"]
            state = ("established" if row["reason"] in ESTABLISHED_REASONS else
                     "invalid" if row["reason"] == "invalid" else "new")
            proto = PROTO_NAMES.get(pkt.proto, f"proto {pkt.proto}")
            out = None
            if row["verdict"] == "forward" and row["out_index"]:
                out = ours[int(row["out_index"])]
            yield _Input(int(row["index"]), MACHINE if direction == "egress" else WIRE,
                         f"{proto} {direction} {state}", row["verdict"], row["reason"], out,
                         pkt.family, stamp, bytes(12) + ETHERTYPES[pkt.family] + bytes(ip),
                         pkt.proto, pkt.ip_total, filled)


def _not_routable(pkt: Packet) -> str:
    """Why a router cannot be asked about this packet ("" when it can)."""
    if pkt.frag:
        return "IP fragment"
    if pkt.ip_total > MTU:
        return f"larger than the router's MTU ({MTU})"
    if pkt.ttl <= 1:
        return "TTL or hop limit <= 1 (a router never forwards it)"
    src, dst = ipaddress.ip_address(pkt.src), ipaddress.ip_address(pkt.dst)
    if src.is_link_local or dst.is_link_local or dst.is_multicast or dst == BROADCAST:
        return "link-scope, multicast or broadcast (a router never forwards it)"
    return ""


def _fill(ip: bytearray, pkt: Packet) -> None:
    """Zero-fill a truncated capture to its length on the wire and give it a valid transport
    checksum, so Linux takes it as the packet the capture stood for."""
    ip.extend(bytes(pkt.ip_total - len(ip)))
    l4 = pkt.l4 - pkt.l3
    at = l4 + CHECKSUM_AT[pkt.proto]
    ip[at:at + 2] = b"\0\0"
    segment = ip[l4:]
    initial = 0 if pkt.proto == PROTO_ICMP else pseudo_header_sum(
        pkt.src, pkt.dst, pkt.proto, len(segment))
    value = checksum(segment, initial)
    if value == 0 and pkt.proto == PROTO_UDP:
        value = 0xFFFF  # 0 means "no checksum" in UDP
    struct.pack_into("!H", ip, at, value)


def _stamp(ip: bytearray, family: int, stamp: int) -> None:
    if family == 4:
        struct.pack_into("!H", ip, 4, stamp)
        hlen = (ip[0] & 0xF) * 4
        ip[10:12] = b"\0\0"
        struct.pack_into("!H", ip, 10, ~ones_sum(ip[:hlen]) & 0xFFFF)
    else:
        ip[1] = (ip[1] & 0xF0) | (stamp >> 16)
        struct.pack_into("!H", ip, 2, stamp & 0xFFFF)


def _owner(o: Output, recent: dict[tuple[int, int], _Input]) -> _Input | None:
    pkt = parse(bytearray(o.frame), LINKTYPE_ETHERNET)
    if pkt.family == 4:
        stamp = struct.unpack_from("!H", pkt.data, pkt.l3 + 4)[0]
    elif pkt.family == 6:
        stamp = struct.unpack_from("!I", pkt.data, pkt.l3)[0] & 0xFFFFF
    else:
        return None
    hit = recent.get((pkt.family, stamp))
    if hit is None or hit.proto != pkt.proto or hit.ip_total != pkt.ip_total:
        return None  # the router's own traffic, or another packet
    return hit


def _judge(i: _Input, o: Output | None) -> Difference | None:
    ours = "forward" if i.verdict == "forward" else f"drop ({i.reason})"
    if o is None:
        if i.verdict != "forward":
            return None
        return Difference(i.index, i.cls, "verdict", f"forward ({i.reason})", "drop")
    theirs = parse(bytearray(o.frame), LINKTYPE_ETHERNET)
    if i.verdict != "forward" or i.out is None:
        return Difference(i.index, i.cls, "verdict", ours, f"forward {_tuple(theirs)}")
    if o.side == i.side:
        return Difference(i.index, i.cls, "side", "forward", "sent back where it came from")
    if _tuple(theirs) != _tuple(i.out):
        return Difference(i.index, i.cls, "rewrite", _tuple(i.out), _tuple(theirs))
    if not i.filled and _l4(theirs) != _l4(i.out):
        return Difference(i.index, i.cls, "bytes", "transport bytes as written",
                          "other transport bytes (checksum, quote or payload)")
    return None


def _tuple(pkt: Packet) -> str:
    proto = PROTO_NAMES.get(pkt.proto, str(pkt.proto))
    return f"{proto} {format_endpoint(pkt.src, pkt.sport)} > {format_endpoint(pkt.dst, pkt.dport)}"


def _l4(pkt: Packet) -> bytes:
    return bytes(pkt.data[pkt.l4:pkt.l3 + pkt.ip_total]) if pkt.l4 >= 0 else b""
