"""Putting the shards of a replay back together, in input order: the verdict rows, the output
packets, the flow dumps and the report.

Each shard replayed its packets in input order, so shard k's i-th verdict row is the row of
the i-th input packet that went to shard k (`Split.shard`), and its j-th output packet is the
one of its j-th row with an `out_index`. The merge walks the input order once.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flowshift.packet.batch import Batch, read_batches
from flowshift.packet.pcap import PcapWriter
from flowshift.report import TIERS, Tally

CHUNK = 65536  # output packets gathered from the shards at a time


def merge_verdicts(shard: np.ndarray, parts: list[Path], path: Path | None) -> np.ndarray:
    """Write the verdict rows of every shard in input order (`index` and `out_index` renumbered
    for the whole trace) when `path` is given; return, per input packet, whether it left."""
    n = len(shard)
    leaving = np.zeros(n, np.bool_)
    files = [open(p, encoding="utf-8") for p in parts]  # noqa: SIM115 (closed below)
    try:
        header = ""
        for f in files:
            header = f.readline()
        rows: list[Iterator[str]] = [iter(f) for f in files]
        out = open(path, "w", newline="", encoding="utf-8") if path else None  # noqa: SIM115
        try:
            if out is not None:
                out.write(header)
            lines: list[str] = []
            sent = 0
            for i, k in enumerate(shard.tolist()):
                line = next(rows[k])
                rest = line[line.index(",") + 1:line.rindex(",")]
                if line[-2] != ",":  # an out_index: the packet left
                    leaving[i] = True
                    if out is not None:
                        lines.append(f"{i},{rest},{sent}\n")
                    sent += 1
                elif out is not None:
                    lines.append(f"{i},{rest},\n")
                if len(lines) >= CHUNK:
                    assert out is not None
                    out.write("".join(lines))
                    lines.clear()
            if out is not None:
                out.write("".join(lines))
        finally:
            if out is not None:
                out.close()
    finally:
        for f in files:
            f.close()
    return leaving


class _Stream:
    """The packets of one shard's output trace, taken a run at a time."""

    def __init__(self, path: Path) -> None:
        self.batches = read_batches(path, CHUNK)
        self.batch: Batch | None = None
        self.pos = 0

    def take(self, m: int) -> list[tuple[Any, ...]]:
        """The next m packets, as slices of batches: (ts, buf, offset, caplen, wire)."""
        pieces = []
        while m:
            b = self.batch
            if b is None or self.pos >= len(b):
                b = self.batch = next(self.batches)
                self.pos = 0
            a = self.pos
            z = min(len(b), a + m)
            lo = int(b.offset[a])
            hi = int(b.offset[z - 1]) + int(b.caplen[z - 1])
            pieces.append((b.ts_ns[a:z], b.buf[lo:hi], b.offset[a:z] - lo, b.caplen[a:z],
                           b.wire_len[a:z]))
            m -= z - a
            self.pos = z
        return pieces


def merge_packets(shard: np.ndarray, leaving: np.ndarray, parts: list[Path], path: Path,
                  linktype: int) -> int:
    """Write the shards' output packets in input order; returns how many."""
    order = shard[leaving]
    streams = [_Stream(p) for p in parts]
    with PcapWriter(path, linktype=linktype) as writer:
        for start in range(0, len(order), CHUNK):
            seq = order[start:start + CHUNK]
            m = len(seq)
            ts = np.empty(m, np.int64)
            offset = np.empty(m, np.int64)
            caplen = np.empty(m, np.uint32)
            wire = np.empty(m, np.uint32)
            bufs, base = [], 0
            for k, stream in enumerate(streams):
                at = np.flatnonzero(seq == k)
                if not len(at):
                    continue
                pos = 0
                for p_ts, p_buf, p_off, p_cap, p_wire in stream.take(len(at)):
                    dest = at[pos:pos + len(p_ts)]
                    ts[dest], caplen[dest], wire[dest] = p_ts, p_cap, p_wire
                    offset[dest] = p_off + base
                    bufs.append(p_buf)
                    base += len(p_buf)
                    pos += len(p_ts)
            writer.write_batch(ts, np.concatenate(bufs), offset, caplen, wire)
    return len(order)


def _dump_key(line: str) -> tuple[Any, ...]:
    """The serial dump's order (report.flow_dump) read back from a line: machine, then the
    original tuple (family, protocol, source, destination, ports)."""
    fields = dict(t.split("=", 1) for t in line.split() if "=" in t)
    parts = line.split()
    src = ipaddress.ip_address(fields.get("src", "0.0.0.0"))
    dst = ipaddress.ip_address(fields.get("dst", "0.0.0.0"))
    sport = int(fields.get("sport", fields.get("id", 0)))
    dport = int(fields.get("dport", fields.get("id", 0)))
    return (fields.get("machine", ""), src.version, int(parts[1]), src.packed, dst.packed,
            sport, dport)


def merge_dumps(parts: list[Path], path: Path) -> None:
    lines: list[str] = []
    for p in parts:
        lines.extend(p.read_text(encoding="utf-8").splitlines(keepends=True))
    lines.sort(key=lambda line: _dump_key(_original_part(line)))
    Path(path).write_text("".join(lines), encoding="utf-8")


def _original_part(line: str) -> str:
    """The line up to the reply tuple (its second `src=`), plus the machine field."""
    second = line.find(" src=", line.find(" src=") + 1)
    machine = line[line.rfind(" machine="):]
    return (line[:second] if second > 0 else line) + machine


def _sorted_counts(c: Counter[str]) -> dict[str, int]:
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _sum(reports: list[dict[str, Any]], *path: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for r in reports:
        d = r
        for p in path:
            d = d[p]
        total.update(d)
    return total


def merge_reports(reports: list[dict[str, Any]], global_index: list[np.ndarray]) -> dict[str, Any]:
    """The counters of the whole from its shards' reports (fields as docs/replay.md). The
    caller fills in trace, options, config, outputs, timing and sharding."""
    packets = {k: sum(r["packets"][k] for r in reports) for k in reports[0]["packets"]}
    tiers: dict[str, dict[str, Any]] = {}
    processed = sum(r["tiers"][t]["packets"] for r in reports for t in TIERS)
    for t in TIERS:
        n = sum(r["tiers"][t]["packets"] for r in reports)
        tiers[t] = {"packets": n, "bytes": sum(r["tiers"][t]["bytes"] for r in reports),
                    "share": round(n / processed, 6) if processed else 0.0}
    machines: dict[str, dict[str, int]] = {}
    for r in reports:
        for name, m in r["machines"].items():
            acc = machines.setdefault(name, dict.fromkeys(m, 0))
            for k, v in m.items():
                acc[k] += v
    off = [r["offloads"] for r in reports]
    offloads = {
        "to_vnic": sum(o["to_vnic"] for o in off),
        "to_pnic": sum(o["to_pnic"] for o in off),
        "refused": _sorted_counts(_sum(reports, "offloads", "refused")),
        "returned": _sorted_counts(_sum(reports, "offloads", "returned")),
        "held_packets": sum(o["held_packets"] for o in off),
        "rejected_messages": _sorted_counts(_sum(reports, "offloads", "rejected_messages")),
    }
    flows = {k: sum(r["flows"][k] for r in reports) for k in reports[0]["flows"]}
    return {
        "version": reports[0]["version"],
        "trace": {},
        "options": {},
        "config": {},
        "packets": packets,
        "tiers": tiers,
        "machines": dict(sorted(machines.items())),
        "offloads": offloads,
        "flows": flows,
        "drops": _sorted_counts(_sum(reports, "drops")),
        "unparsed": _sorted_counts(_sum(reports, "unparsed")),
        "bypass_reasons": _sorted_counts(_sum(reports, "bypass_reasons")),
        "events": merge_events(reports),
        "schedule": merge_schedule(reports, global_index),
        "outputs": {},
        "timing": {},
    }


# events that happen to the whole host once, whatever its shards: each shard's host has them
HOST_EVENTS = ("handoff", "crash", "withdraw")


def merge_events(reports: list[dict[str, Any]]) -> dict[str, int]:
    """Per-flow events add up; host events (a machine's handoff, a PNIC crash or withdrawal)
    happened in every shard, so the whole saw them as often as the shard that saw most."""
    total = _sum(reports, "events")
    for kind in HOST_EVENTS:
        if kind in total:
            total[kind] = max(r["events"].get(kind, 0) for r in reports)
    return dict(sorted(total.items()))


def merge_schedule(reports: list[dict[str, Any]], global_index: list[np.ndarray]
                   ) -> list[dict[str, Any]]:
    """Each action as the whole trace ran it: before the first packet (of any shard) at or
    after its time; skipped only when the whole trace ended before it."""
    merged = []
    for j, entry in enumerate(reports[0]["schedule"]):
        befores, times = [], []
        skipped = True
        for r, index in zip(reports, global_index, strict=True):
            e = r["schedule"][j]
            times.append(e["time"])
            skipped = skipped and "skipped" in e
            if e["before_index"] is not None:
                befores.append(int(index[e["before_index"]]))
        out = {"action": entry["action"], "at": entry["at"], "time": max(times),
               "before_index": min(befores) if befores else None}
        if skipped:
            out["skipped"] = entry["skipped"]
        merged.append(out)
    return merged



class PlotStats:
    """What the plot reads of a host's stats, for the whole of a sharded run."""

    def __init__(self, occupancy: list[tuple[int, int]], events: list[tuple[int, str, str]]
                 ) -> None:
        self.occupancy = occupancy
        self.events = events


def merge_plot_data(parts: list[Path]) -> tuple[Tally, PlotStats]:
    """The shards' plot inputs as one: rate bins widened to the widest shard's (all count
    from the same origin, so the bins line up), occupancy reports summed as step functions,
    per-flow events together and host events once."""
    data = [json.loads(p.read_text(encoding="utf-8")) for p in parts]
    tally = Tally(bin_ns=max(d["bin_ns"] for d in data))
    for d in data:
        shift = tally.bin_ns // d["bin_ns"]
        for b, tier, n in d["rate"]:
            k = (b // shift, tier)
            tally.rate[k] = tally.rate.get(k, 0) + n
    times = np.unique(np.array([t for d in data for t, _ in d["occupancy"]], np.int64))
    total = np.zeros(len(times), np.int64)
    for d in data:
        occ = np.array(d["occupancy"], np.int64).reshape(-1, 2)
        if len(occ):
            at = np.searchsorted(occ[:, 0], times, side="right") - 1
            total += np.where(at >= 0, occ[np.maximum(at, 0), 1], 0)
    host_seen: set[tuple[int, str]] = set()
    events: list[tuple[int, str, str]] = []
    for d in data:
        for t, kind in d["events"]:
            if kind in HOST_EVENTS:
                if (t, kind) in host_seen:
                    continue
                host_seen.add((t, kind))
            events.append((t, kind, ""))
    events.sort(key=lambda e: e[0])
    return tally, PlotStats(list(zip(times.tolist(), total.tolist(), strict=True)), events)
