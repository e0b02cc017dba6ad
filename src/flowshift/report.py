"""What a replay tells its user: the counters it keeps, the JSON report, the terminal summary
and the conntrack-style flow dump.

`Tally` is filled by the replay loop (replay.py) from the packet results; everything here only
reads it. The verdicts file and the report are built from the same results, so every number in
the report can be recounted from the verdicts file.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from flowshift.entry import Status
from flowshift.flow import NS_PER_S, PROTO_ICMP, PROTO_ICMPV6, PROTO_NAMES, FlowKey, format_addr
from flowshift.services.conntrack_tcp import TcpState
from flowshift.verdict import Verdict

NS = NS_PER_S  # trace time per second (flow.NS_PER_S)
TIERS = ("machine", "vnic", "pnic")
HIST_START_NS = 1_000_000  # the rate histogram starts with 1 ms bins...
HIST_MAX_BINS = 1024  # ...and doubles its bin width whenever the trace outgrows this many

# Result breakdown key: (verdict, reason, tier, machine, direction)
Key = tuple[int, str, str, str, str]


@dataclass(slots=True)
class Tally:
    """Counters of one replay, kept in constant memory whatever the trace's length."""

    counts: dict[Key, list[int]] = field(default_factory=dict)  # key -> [packets, bytes]
    out_packets: int = 0
    # packets per (bin, tier) over trace time: bins of `bin_ns` from the first packet
    bin_ns: int = HIST_START_NS
    rate: dict[tuple[int, str], int] = field(default_factory=dict)

    def coarsen(self) -> None:
        """Double the bin width (halve the bins): keeps the histogram at most HIST_MAX_BINS."""
        merged: dict[tuple[int, str], int] = {}
        for (b, tier), n in self.rate.items():
            k = (b >> 1, tier)
            merged[k] = merged.get(k, 0) + n
        self.rate = merged
        self.bin_ns *= 2

    def by(self, *fields: int, verdict: Verdict | None = None) -> dict[Any, list[int]]:
        """[packets, bytes] grouped by the key fields at `fields` (indices into Key)."""
        out: dict[Any, list[int]] = {}
        for key, (n, b) in self.counts.items():
            if verdict is not None and key[0] != verdict:
                continue
            group = key[fields[0]] if len(fields) == 1 else tuple(key[i] for i in fields)
            acc = out.setdefault(group, [0, 0])
            acc[0] += n
            acc[1] += b
        return out


def _sorted_counts(d: dict[str, list[int]] | dict[str, int]) -> dict[str, int]:
    """{name: packets}, largest first, then by name: stable for diffs."""
    items = [(k, v[0] if isinstance(v, list) else v) for k, v in d.items()]
    return dict(sorted(items, key=lambda kv: (-kv[1], kv[0])))


def report_options(trace: str | os.PathLike[str], config: object, outputs: dict[str, str], *,
                   offload: str | None, pnic: str, capacity: int | None,
                   crash_at: float | None, withdraw_at: float | None, dump_at: float | None,
                   **more: object) -> dict[str, Any]:
    """A replay report's `options`: the options as given (docs/replay.md), `more` after them.
    `config`: a path, or a config given as an object (null); `outputs`: the paths written."""
    return {
        "trace": os.fspath(trace),
        "config": os.fspath(config) if isinstance(config, (str, os.PathLike)) else None,
        "out": outputs.get("out"), "verdicts": outputs.get("verdicts"),
        "report": outputs.get("report"), "plot": outputs.get("plot"),
        "offload": offload, "pnic": pnic, "pnic_capacity": capacity,
        "pnic_crash_at": crash_at, "pnic_withdraw_at": withdraw_at,
        "dump_flows_at": dump_at, "dump_flows": outputs.get("dump-flows"), **more,
    }


def build_report(
    tally: Tally,
    stats: Any,
    *,
    version: str,
    trace: dict[str, Any],
    options: dict[str, Any],
    config: dict[str, Any],
    schedule: list[dict[str, Any]],
    outputs: dict[str, str],
    wall_seconds: float,
) -> dict[str, Any]:
    """The JSON report of a replay (see docs/replay.md for every field)."""
    by_verdict = tally.by(0)
    n_in = sum(v[0] for v in by_verdict.values())

    def packets(v: Verdict) -> int:
        return by_verdict.get(v, [0, 0])[0]

    by_tier = tally.by(2)
    processed = sum(by_tier.get(t, [0, 0])[0] for t in TIERS)
    tiers = {
        t: {
            "packets": by_tier.get(t, [0, 0])[0],
            "bytes": by_tier.get(t, [0, 0])[1],
            "share": round(by_tier.get(t, [0, 0])[0] / processed, 6) if processed else 0.0,
        }
        for t in TIERS
    }
    machines: dict[str, dict[str, int]] = {}
    for (name, direction, verdict), (n, _) in sorted(tally.by(3, 4, 0).items()):
        if not name:
            continue
        m = machines.setdefault(name, {"egress": 0, "ingress": 0, "forwarded": 0, "dropped": 0})
        if direction in ("egress", "ingress"):
            m[direction] += n
        if verdict == Verdict.FORWARD:
            m["forwarded"] += n
        elif verdict == Verdict.DROP:
            m["dropped"] += n
    events = Counter(kind for _, kind, _ in stats.events)
    return {
        "version": version,
        "trace": trace,
        "options": options,
        "config": config,
        "packets": {
            "in": n_in,
            "forwarded": packets(Verdict.FORWARD),
            "dropped": packets(Verdict.DROP),
            "bypass": packets(Verdict.BYPASS),
            "unparsed": packets(Verdict.UNPARSED),
            "out": tally.out_packets,
        },
        "tiers": tiers,
        "machines": machines,
        "offloads": {
            "to_vnic": stats.offloads_to_vnic,
            "to_pnic": stats.offloads_to_pnic,
            "refused": _sorted_counts(dict(stats.refused)),
            "returned": _sorted_counts(dict(stats.returned)),
            "held_packets": stats.held_packets,
            "rejected_messages": _sorted_counts(dict(stats.rejected_messages)),
        },
        "flows": {
            "total": stats.flows_total,
            "peak_first_cache": stats.peak_first_cache,
            "peak_second_cache": stats.peak_second_cache,
        },
        "drops": _sorted_counts(tally.by(1, verdict=Verdict.DROP)),
        "unparsed": _sorted_counts(tally.by(1, verdict=Verdict.UNPARSED)),
        "bypass_reasons": _sorted_counts(tally.by(1, verdict=Verdict.BYPASS)),
        "events": dict(sorted(events.items())),
        "schedule": schedule,
        "outputs": outputs,
        "timing": {
            "wall_seconds": round(wall_seconds, 6),
            "packets_per_second": round(n_in / wall_seconds, 1) if wall_seconds > 0 else 0.0,
        },
    }


# ---------------------------------------------------------------- terminal summary


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _reasons(d: dict[str, int], limit: int = 5) -> str:
    if not d:
        return "-"
    items = list(d.items())
    text = ", ".join(f"{k} {v:,}" for k, v in items[:limit])
    if len(items) > limit:
        text += f", +{len(items) - limit} more"
    return text


def summary_table(report: dict[str, Any]) -> Table:
    """The end-of-run summary: packets, tiers, offloads, drops, timing."""
    p, tiers, off = report["packets"], report["tiers"], report["offloads"]
    name = report["trace"]["path"].rsplit("/", 1)[-1]
    table = Table(title=f"flowshift replay: {name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    n_in = p["in"]
    table.add_row("packets in", f"{n_in:,}", f"{report['trace']['duration']:.3f} s of trace")
    for label, key in (("forwarded", "forwarded"), ("dropped", "dropped"),
                       ("bypass", "bypass"), ("unparsed", "unparsed")):
        table.add_row(f"  {label}", f"{p[key]:,}", _pct(p[key], n_in))
    table.add_row("packets out", f"{p['out']:,}", "written to the output trace" if
                  report["outputs"].get("out") else "")
    table.add_section()
    for t in TIERS:
        table.add_row(f"tier {t}", f"{tiers[t]['packets']:,}",
                      f"{100 * tiers[t]['share']:.1f}% of processed packets")
    table.add_section()
    table.add_row("offloads to VNIC", f"{off['to_vnic']:,}", "")
    table.add_row("offloads to PNIC", f"{off['to_pnic']:,}", "")
    table.add_row("refused", f"{sum(off['refused'].values()):,}", _reasons(off["refused"]))
    table.add_row("returned", f"{sum(off['returned'].values()):,}", _reasons(off["returned"]))
    flows = report["flows"]
    table.add_row("flows", f"{flows['total']:,}",
                  f"peak first cache {flows['peak_first_cache']:,}, "
                  f"second cache {flows['peak_second_cache']:,}")
    table.add_section()
    table.add_row("top drop reasons", f"{p['dropped']:,}", _reasons(report["drops"]))
    if report["unparsed"]:
        table.add_row("unparsed by reason", f"{p['unparsed']:,}", _reasons(report["unparsed"]))
    timing = report["timing"]
    table.add_section()
    table.add_row("time", f"{timing['wall_seconds']:.2f} s",
                  f"{timing['packets_per_second']:,.0f} packets/s")
    return table


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(report))
    if report["trace"]["problem"]:
        console.print(f"[yellow]trace ended early:[/] {report['trace']['problem']}")


# ---------------------------------------------------------------- flow dump (conntrack -L)

# ICMP echo flows: the request type of the original direction, the reply type of the other
_ECHO_TYPES = {PROTO_ICMP: (8, 0), PROTO_ICMPV6: (128, 129)}


def _tuple_text(key: FlowKey, original: bool) -> str:
    text = f"src={format_addr(key.src)} dst={format_addr(key.dst)}"
    types = _ECHO_TYPES.get(key.proto)
    if types is not None:  # the echo identifier is both "ports" of the key
        return f"{text} type={types[0 if original else 1]} code=0 id={key.sport}"
    return f"{text} sport={key.sport} dport={key.dport}"


def flow_line(view: Any, now_ns: int) -> str:
    """One flow as `conntrack -L` prints it, plus `machine=` and `tier=`.

    Order as libnetfilter_conntrack's default output: protocol name (padded to 8) and number,
    seconds until the timeout, the TCP state, the original tuple and its counters, [UNREPLIED]
    when no reply was seen, the reply tuple and its counters, [ASSURED].
    """
    flow = view.flow
    key, reply = flow.key, flow.xlat.reversed()
    proto = PROTO_NAMES.get(key.proto, "unknown")
    parts = [f"{proto:<8} {key.proto} {max(0, (flow.expires - now_ns) // NS)}"]
    if flow.tcp is not None:
        parts.append(TcpState(flow.tcp.state).name)
    parts.append(_tuple_text(key, True))
    parts.append(f"packets={flow.packets[0]} bytes={flow.bytes[0]}")
    if not flow.status & Status.SEEN_REPLY:
        parts.append("[UNREPLIED]")
    parts.append(_tuple_text(reply, False))
    parts.append(f"packets={flow.packets[1]} bytes={flow.bytes[1]}")
    if flow.status & Status.ASSURED:
        parts.append("[ASSURED]")
    parts.append(f"machine={view.machine} tier={view.tier}")
    return " ".join(parts)


def _flow_order(view: Any) -> tuple[Any, ...]:
    k = view.flow.key
    return (view.machine, k.family, k.proto, k.src, k.dst, k.sport, k.dport, k.zone)


def flow_dump(views: Iterable[Any], now_ns: int) -> str:
    """The dump file's text: one line per flow, sorted by machine then original tuple."""
    return "".join(flow_line(v, now_ns) + "\n" for v in sorted(views, key=_flow_order))
