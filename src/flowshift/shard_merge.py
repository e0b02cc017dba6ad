"""Putting the shards of a replay back together, in input order: the verdict rows, the output
packets, the flow dumps and the report.

Each shard replayed its packets in input order and wrote its rows as data (_verdict_rows.
ROW_DATA): shard k's i-th row is the row of the i-th input packet that went to it (its
`index`), and its j-th output packet is the one of its j-th leaving row. The merge scatters the
rows to input order with numpy, formats them as the serial replay does, and gathers the
output packets a window at a time, each window one range of each shard's output trace, copied
by a compiled loop; the files are read and written directly (packet/direct.py).
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from flowshift._verdict_rows import ROW_DATA, middles_path, rows_bytes
from flowshift.packet.direct import ALIGN, DirectReader, DirectWriter, aligned_empty
from flowshift.packet.pcap import PcapWriter
from flowshift.report import TIERS, Tally
from flowshift.stats import Event, event_order

ROWS = 1 << 20  # verdict rows formatted at a time
WINDOW = 1 << 24  # bytes of output packets gathered from the shards at a time


@dataclass
class Rows:
    """The shards' rows (ROW_DATA) in input order, with the shard of each and the table of
    middles they number."""

    ts: np.ndarray  # int64 per input packet
    middle: np.ndarray  # int32: its number in `middles`
    record: np.ndarray  # uint32: its output record's bytes, 0 when it did not leave
    shard: np.ndarray  # int32
    middles: list[bytes]

    @property
    def leaving(self) -> np.ndarray:
        return self.record > 0


def merge_rows(index: list[np.ndarray], parts: list[Path]) -> Rows:
    """Scatter each shard's rows to the input positions of its packets (`index[k]`), the
    middles renumbered into one table."""
    n = sum(len(at) for at in index)
    ts = np.empty(n, np.int64)
    middle = np.empty(n, np.int32)
    record = np.empty(n, np.uint32)
    shard = np.empty(n, np.int32)
    known: dict[bytes, int] = {}  # a middle -> its number, in the order they are met
    for k, (at, path) in enumerate(zip(index, parts, strict=True)):
        rows = np.fromfile(path, ROW_DATA)
        if len(rows) != len(at):
            raise ValueError(f"{path}: {len(rows)} rows for {len(at)} packets")
        own = json.loads(middles_path(path).read_text(encoding="utf-8"))
        renumber = np.array([known.setdefault(m.encode(), len(known)) for m in own] or [0],
                            np.int32)
        ts[at] = rows["ts"]
        middle[at] = renumber[rows["middle"]]
        record[at] = rows["record"]
        shard[at] = k
    return Rows(ts, middle, record, shard, list(known))


def write_verdicts(rows: Rows, first_ts: int, path: Path, header: bytes) -> None:
    """The verdicts file of the whole trace, formatted as the serial replay formats it."""
    leaving = rows.leaving
    out_index = np.cumsum(leaving, dtype=np.int64) - 1
    out_index[~leaving] = -1
    with DirectWriter(path) as out:
        out.write(header)
        for a in range(0, len(rows.ts), ROWS):
            b = a + ROWS
            out.write(rows_bytes(a, rows.ts[a:b], first_ts, rows.middle[a:b], rows.middles,
                                 out_index[a:b]))


def merge_packets(rows: Rows, parts: list[Path], path: Path, linktype: int) -> int:
    """Write the shards' output packets in input order; returns how many. Shard k's output
    trace holds the records of its leaving packets in input order, so each packet's record is
    found from the sizes alone (`rows.record`); a window of the output is gathered from one
    contiguous range of each shard's file."""
    sent = np.flatnonzero(rows.leaving)
    size = rows.record[sent].astype(np.int64)
    owner = rows.shard[sent]
    src = np.empty(len(sent), np.int64)  # each record's offset in its shard's file
    for k in range(len(parts)):
        mine = owner == k
        src[mine] = 24 + np.cumsum(size[mine]) - size[mine]
    ends = np.cumsum(size)
    cuts = [0]
    while cuts[-1] < len(sent):  # windows of about WINDOW bytes, at least one record each
        at = int(np.searchsorted(ends, (ends[cuts[-1] - 1] if cuts[-1] else 0) + WINDOW,
                                 side="right"))
        cuts.append(max(at, cuts[-1] + 1))
    longest = max((int(ends[b - 1] - (ends[a - 1] if a else 0)) for a, b in
                   pairwise(cuts)), default=0)
    # two input buffers: the next window is read (on a thread) while this one is copied
    inbufs = [aligned_empty(longest + 2 * ALIGN * len(parts)) for _ in range(2)]

    def fetch(a: int, b: int, inbuf: np.ndarray) -> np.ndarray:
        """Read window a..b's records into `inbuf`; where each one is there."""
        w_owner, w_src, w_size = owner[a:b], src[a:b], size[a:b]
        pos = np.empty(b - a, np.int64)
        base = 0
        for k, reader in enumerate(readers):
            mine = np.flatnonzero(w_owner == k)
            if not len(mine):
                continue
            lo, hi = int(w_src[mine[0]]), int(w_src[mine[-1]] + w_size[mine[-1]])
            skip = reader.read(inbuf[base:], lo, hi)
            pos[mine] = w_src[mine] - lo + base + skip
            base += -(-(skip + hi - lo) // ALIGN) * ALIGN
        return pos

    windows = list(pairwise(cuts))
    with ExitStack() as stack:
        readers = [stack.enter_context(DirectReader(p)) for p in parts]
        writer = stack.enter_context(PcapWriter(path, linktype=linktype))
        ahead = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="flowshift-read"))
        coming = ahead.submit(fetch, *windows[0], inbufs[0]) if windows else None
        for i, (a, b) in enumerate(windows):
            assert coming is not None
            pos = coming.result()
            if i + 1 < len(windows):  # its buffer was copied out by the last window
                coming = ahead.submit(fetch, *windows[i + 1], inbufs[(i + 1) % 2])
            writer.write_records(inbufs[i % 2], pos, size[a:b])
    return len(sent)


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

    def __init__(self, occupancy: list[tuple[int, int]], events: list[Event]
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
    events: list[Event] = []
    for d in data:
        for t, kind in d["events"]:
            if kind in HOST_EVENTS:
                if (t, kind) in host_seen:
                    continue
                host_seen.add((t, kind))
            events.append((t, kind, ""))
    events.sort(key=event_order)
    return tally, PlotStats(list(zip(times.tolist(), total.tolist(), strict=True)), events)
