"""`flowshift inspect TRACE`: what a trace holds, before replaying it.

Reads the trace once, parses every frame as the tiers would, and counts: packets and bytes,
link types, frames that did not parse (by reason), bidirectional flows by protocol and the
largest flows. A trace that breaks off part way is summarized up to the break, and the break
is reported.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from flowshift.flow import PROTO_NAMES, FlowKey
from flowshift.packet.parse import parse
from flowshift.packet.pcap import TraceError, open_trace, trace_linktype_name
from flowshift.packet.view import ParseError

TOP_FLOWS = 10
PROGRESS_FROM = 16 << 20  # files at least this large get a progress bar
PROGRESS_EVERY = 4096  # frames between progress updates


@dataclass(slots=True)
class FlowTally:
    key: FlowKey  # as its first packet saw it: the original direction
    packets: int = 0
    bytes: int = 0


@dataclass(slots=True)
class TraceSummary:
    path: str
    format: str
    packets: int = 0
    bytes: int = 0  # on the wire
    first_ns: int | None = None
    last_ns: int | None = None
    linktypes: Counter[int] = field(default_factory=Counter)  # packets per link type
    failures: Counter[ParseError] = field(default_factory=Counter)
    flows: dict[FlowKey, FlowTally] = field(default_factory=dict)  # by canonical key
    problem: str | None = None

    @property
    def duration_s(self) -> float:
        if self.first_ns is None or self.last_ns is None:
            return 0.0
        return (self.last_ns - self.first_ns) / 1e9

    def flows_by_protocol(self) -> dict[str, int]:
        counts = Counter(proto_name(k.proto) for k in self.flows)
        return dict(counts.most_common())

    def top_flows(self, n: int = TOP_FLOWS) -> list[FlowTally]:
        return sorted(self.flows.values(), key=lambda t: (-t.bytes, -t.packets))[:n]

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.path,
            "format": self.format,
            "packets": self.packets,
            "bytes": self.bytes,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "duration_s": self.duration_s,
            "linktypes": {trace_linktype_name(lt): n for lt, n in self.linktypes.most_common()},
            "parse_failures": {e.label: n for e, n in self.failures.most_common()},
            "flows": self.flows_by_protocol(),
            "top_flows": [
                {"flow": str(t.key), "packets": t.packets, "bytes": t.bytes}
                for t in self.top_flows()
            ],
            "problem": self.problem,
        }


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


def summarize(path: str, progress: Callable[[int, int], None] | None = None) -> TraceSummary:
    """Read and parse the whole trace. `progress(position, size)` is called now and then."""
    with open_trace(path) as reader:
        s = TraceSummary(path, reader.format)
        linktypes, failures, flows = s.linktypes, s.failures, s.flows
        ok = ParseError.OK
        for frame in reader:
            s.packets += 1
            s.bytes += frame.wire_len
            if s.first_ns is None:
                s.first_ns = frame.ts_ns
            s.last_ns = frame.ts_ns
            linktypes[frame.linktype] += 1
            if progress is not None and s.packets % PROGRESS_EVERY == 0:
                progress(reader.position, reader.size)
            pkt = parse(frame.data, frame.linktype, frame.wire_len)
            if pkt.error != ok:
                failures[pkt.error] += 1
                continue
            key = pkt.key()
            canonical = key.canonical()
            tally = flows.get(canonical)
            if tally is None:
                tally = flows[canonical] = FlowTally(key)
            tally.packets += 1
            tally.bytes += frame.wire_len
        s.problem = reader.problem
    return s


def render(s: TraceSummary, console: Console) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("trace", Text(f"{s.path} ({s.format})"))
    head.add_row("packets", f"{s.packets:,}")
    head.add_row("bytes", f"{s.bytes:,} on the wire")
    head.add_row("duration", f"{s.duration_s:.6f} s")
    head.add_row(
        "link types",
        ", ".join(f"{trace_linktype_name(lt)} ({n:,})" for lt, n in s.linktypes.most_common())
        or "-",
    )
    head.add_row("flows", f"{len(s.flows):,} bidirectional")
    console.print(head)
    if s.problem:
        console.print(
            Text.assemble(("reading stopped early: ", "yellow"), s.problem), soft_wrap=True
        )
    if s.failures:
        console.print(
            _counts("parse failures", "reason", {e.label: n for e, n in s.failures.items()})
        )
    if s.flows:
        console.print(_counts("flows by protocol", "protocol", s.flows_by_protocol()))
        top = Table(title=f"top {TOP_FLOWS} flows by bytes", title_justify="left")
        top.add_column("flow (original direction)")
        top.add_column("packets", justify="right")
        top.add_column("bytes", justify="right")
        for t in s.top_flows():
            top.add_row(Text(str(t.key)), f"{t.packets:,}", f"{t.bytes:,}")
        console.print(top)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # open_trace will say what is wrong


def _counts(title: str, what: str, counts: dict[str, int]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(what)
    table.add_column("count", justify="right")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(Text(name), f"{n:,}")
    return table


@click.command("inspect")
@click.argument("trace")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(trace: str, as_json: bool) -> None:
    """Summarize a pcap/pcapng TRACE: packets, link types, parse failures, flows."""
    err = Console(stderr=True)
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal or _file_size(trace) < PROGRESS_FROM,
        ) as bar:
            task = bar.add_task(f"reading {escape(trace)}", total=None)

            def progress(position: int, size: int) -> None:
                bar.update(task, completed=position, total=size)

            summary = summarize(trace, progress)
    except TraceError as e:
        click.echo(f"Error: {e}", err=True)
        raise click.exceptions.Exit(2) from None
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        render(summary, Console())
