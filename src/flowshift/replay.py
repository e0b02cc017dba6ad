"""The replay runtime: one trace through one emulated host, and the files that tell the result.

The trace is read in batches (packet/batch.py); the host decides a whole batch at once into
arrays (results.BatchResults, its buffer rewritten in place), and the loop counts and writes
them with numpy: the output trace, the verdicts file and the counters of the report
(report.Tally). Scheduled PNIC actions (crash, withdraw) and the flow dump fire just before the
first packet at or after their time (a batch is split there). Everything else (the report,
the plot, the summary) is built once at the end from the counters, so memory stays flat
whatever the trace.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from flowshift import __version__
from flowshift._codes import group_codes
from flowshift._verdict_rows import ROW_DATA, middles_path, rows_bytes, rows_text
from flowshift._verdict_rows import seconds_text as seconds_text  # where it was
from flowshift.config import HostConfig, load_config, to_dict
from flowshift.flow import NS_PER_S
from flowshift.host import Host
from flowshift.offload import POLICIES
from flowshift.output import AtomicOutputs
from flowshift.packet.ahead import ReadAhead, spare_cores
from flowshift.packet.batch import Batch, read_batches
from flowshift.packet.direct import DirectWriter
from flowshift.packet.pcap import MAX_SNAPLEN, PcapWriter, open_trace, trace_linktype_name
from flowshift.report import HIST_MAX_BINS, Tally, build_report, flow_dump, report_options
from flowshift.results import DIRECTION_LABELS, TIER_LABELS, BatchResults, reason_label
from flowshift.verdict import Verdict

VERDICTS_HEADER = ("index", "time", "machine", "direction", "verdict", "reason", "tier",
                   "out_index")
PNIC_MODES = ("inline", "process")
BATCH = 65536  # packets read and decided at a time
# Scheduled actions at the same time run in this order: the dump sees the state before the
# PNIC changes.
ACTIONS = ("dump", "withdraw", "crash")
LABELS = {v: v.label for v in Verdict}


class Part(Protocol):
    """A part of a trace replayed alone (a shard, shard.Part): its batches, and the whole
    trace's latest packet, known once they are read."""

    end_ns: int | None

    def __iter__(self) -> Iterator[Batch]: ...


def verdicts_header() -> bytes:
    return (",".join(VERDICTS_HEADER) + "\n").encode()


class ReplayError(Exception):
    """Bad options or an output that cannot be written. One line."""


def _check_outputs(trace: str | os.PathLike[str], outputs: dict[str, str | None]) -> None:
    """Every output goes to its own file, in a directory that exists, never over the trace."""
    seen: dict[Path, str] = {Path(trace).resolve(): "the trace"}
    for name, path in outputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if p in seen:
            raise ReplayError(f"--{name} {path} would overwrite {seen[p]}")
        if not p.parent.is_dir():
            raise ReplayError(f"--{name} {path}: directory {p.parent} does not exist")
        if p.is_dir():
            raise ReplayError(f"--{name} {path} is a directory")
        seen[p] = f"--{name}"


def _check_options(offload: str | None, pnic: str, capacity: int | None,
                   times: dict[str, float | None], dump_path: str | None) -> None:
    if offload is not None and offload not in POLICIES:
        raise ReplayError(f"--offload must be one of {', '.join(POLICIES)}, not {offload!r}")
    if pnic not in PNIC_MODES:
        raise ReplayError(f"--pnic must be one of {', '.join(PNIC_MODES)}, not {pnic!r}")
    if capacity is not None and capacity < 0:
        raise ReplayError(f"--pnic-capacity must be 0 or more, not {capacity}")
    for name, t in times.items():
        if t is not None and not 0 <= t < float("inf"):
            raise ReplayError(f"--{name} must be a number of seconds >= 0, not {t}")
    if (times["dump-flows-at"] is None) != (dump_path is None):
        raise ReplayError("--dump-flows-at and --dump-flows go together")


def _opener(path: str | os.PathLike[str], flag: str) -> DirectWriter:
    try:
        return DirectWriter(path)
    except OSError as e:
        raise ReplayError(f"--{flag} {path}: cannot write ({e.strerror})") from None


def _temporaries(files: AtomicOutputs, outputs: dict[str, str]) -> dict[str, str]:
    """A temporary file beside each output, renamed into place when the replay completed."""
    temps = {}
    for flag, path in outputs.items():
        try:
            temps[flag] = os.fspath(files.temp(path))
        except OSError as e:
            raise ReplayError(f"--{flag} {path}: cannot write ({e.strerror})") from None
    return temps


def check_request(
    trace: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None,
    verdicts: str | os.PathLike[str] | None,
    report: str | os.PathLike[str] | None,
    plot: str | os.PathLike[str] | None,
    dump_path: str | os.PathLike[str] | None,
    offload: str | None,
    pnic: str,
    capacity: int | None,
    crash_at: float | None,
    withdraw_at: float | None,
    dump_at: float | None,
) -> dict[str, str]:
    """Check a replay's options and outputs before anything runs (ReplayError, one line);
    the outputs asked for, by flag."""
    paths = {"out": out, "verdicts": verdicts, "report": report, "plot": plot,
             "dump-flows": dump_path}
    outputs = {k: os.fspath(v) for k, v in paths.items() if v is not None}
    times = {"pnic-crash-at": crash_at, "pnic-withdraw-at": withdraw_at, "dump-flows-at": dump_at}
    _check_options(offload, pnic, capacity, times, outputs.get("dump-flows"))
    _check_outputs(trace, {k: outputs.get(k) for k in paths})
    if plot is not None:
        from flowshift.plot import FORMATS, plot_format  # matplotlib only when a plot is asked

        if plot_format(plot) not in FORMATS:
            raise ReplayError(f"--plot {plot}: unknown image format (use one of "
                              f"{', '.join('.' + f for f in FORMATS)})")
    return outputs


def replay_config(config: HostConfig | str | os.PathLike[str], offload: str | None,
                  capacity: int | None) -> HostConfig:
    """The host a replay builds: `config` (loaded when a path), its offload policy and PNIC
    capacity overridden by --offload and --pnic-capacity where given."""
    cfg = config if isinstance(config, HostConfig) else load_config(config)
    if offload is not None:
        cfg = replace(cfg, offload=replace(cfg.offload, policy=offload))
    if capacity is not None:
        cfg = replace(cfg, pnic=replace(cfg.pnic, capacity=capacity))
    return cfg


@contextmanager
def _collector_tuned() -> Iterator[None]:
    """Python's cyclic collector, told that a replay keeps many long-lived objects (flows):
    full collections of a table of flows that never form cycles cost a bounded table's flood
    half its time. Restored afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def warm_io(engine: str = "compiled") -> None:
    """The kernels of the trace reader and of the replay's writers (numba's own cache, next
    to their modules), compiled or loaded: a replay of a two-packet trace with every output,
    in a temporary directory, on `engine` (the compiled one compiles its pass too; the
    reference one, nothing but the trace I/O)."""
    from flowshift.config import parse_config
    from flowshift.packet.build import tcp_frame
    from flowshift.packet.pcap import PcapWriter
    from flowshift.packet.view import TCP_ACK

    cfg = parse_config({"machine": [{"name": "m", "addresses": ["10.0.0.0/24"],
                                     "services": ["count"]}]}, "trace I/O warm-up")
    with tempfile.TemporaryDirectory(prefix="flowshift-warm-") as tmp:
        trace = Path(tmp) / "t.pcap"
        with PcapWriter(trace, linktype=1) as w:
            for i in range(2):
                w.write(i, tcp_frame(src=b"\x0a\x00\x00\x01", dst=b"\x0a\x00\x01\x02",
                                     sport=1, dport=2, seq=i, ack=1, flags=TCP_ACK, window=1))
        run_replay(trace, cfg, progress=False, out=Path(tmp) / "o.pcap",
                   verdicts=Path(tmp) / "v.csv", engine=engine)


def compile_ahead_work() -> None:
    """What the process of `_pnic_cache.compile_ahead` does while the first process generates
    its trace and then compiles the rest (commands/replay.py `warm_engine`: the trace I/O and
    the fast path's pass, with the kernel that opens flows, which it reaches first). A kernel
    in the cache before the first process needs it is loaded there; one not yet, it compiles
    too. So this process takes:
    - the PNIC's data path (the longest compilation; the inner kernels it shares with the
      fast path's pass reach the cache early, where the first process finds them);
    - the PNIC's table;
    - what the first process needs after the pass, in the opposite order, so that the two
      meet halfway: the fast path's other kernels, then the replay's writers (a replay on
      the reference engine, which runs no kernel of its own).
    Measured on the demo: the first process finishes compiling about 1 s sooner than when it
    compiled the last two itself while this one sat idle."""
    from flowshift.tiers import fastpath, pnic_engine

    pnic_engine.warm_data_path()
    pnic_engine.warm_table()
    fastpath.warm(data_path=False)
    warm_io(engine="reference")


def run_replay(
    trace: str | os.PathLike[str],
    config: HostConfig | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    verdicts: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    plot_window: tuple[float | None, float | None] | None = None,
    offload: str | None = None,
    pnic: str = "inline",
    capacity: int | None = None,
    crash_at: float | None = None,
    withdraw_at: float | None = None,
    dump_at: float | None = None,
    dump_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    origin_ns: int | None = None,
    end_ns: int | None = None,
    plot_data: str | os.PathLike[str] | None = None,
    part: Part | None = None,
    engine: str = "compiled",
    row_data: str | os.PathLike[str] | None = None,
    read_ahead: bool | None = None,
) -> dict[str, Any]:
    """Replay `trace` through a host built from `config`; return the report (also written to
    `report` when given). Raises ConfigError, TraceError or ReplayError on bad input.

    Every output is written under a temporary name beside it and renamed into place only
    when the whole replay completed (output.py): after any failure or an interrupt, the
    previous run's files are as they were.

    `origin_ns`/`end_ns`: the trace time of the first and the latest packet when `trace` is a
    part of a larger trace (a shard, see shard.py): schedule times and verdict times count
    from the origin, and actions past the end happen at the end, as in the whole trace.
    `plot_data`: write what the plot is drawn from (JSON), for a plot of several parts.
    `part`: replay these packets of `trace` only (its first packet is still the origin, and
    the part's `end_ns` the end when `end_ns` is not given).
    `row_data`: write the verdict rows as data for a merge (_verdict_rows.ROW_DATA), not
    renamed into place (a sharded run's work file).
    `engine`: "compiled" (established flows of the software tiers run on their compiled fast
    path) or "reference" (every software packet in Python); the results are identical.
    `read_ahead`: read the trace a batch ahead in a thread of its own (packet/ahead.py; not
    for a `part`); None: when the process has more than one core. The results are identical."""
    with AtomicOutputs() as files:
        outputs = check_request(trace, out=out, verdicts=verdicts, report=report, plot=plot,
                                dump_path=dump_path, offload=offload, pnic=pnic,
                                capacity=capacity, crash_at=crash_at, withdraw_at=withdraw_at,
                                dump_at=dump_at)
        options = report_options(
            trace, config, outputs, offload=offload, pnic=pnic, capacity=capacity,
            crash_at=crash_at, withdraw_at=withdraw_at, dump_at=dump_at,
            plot_window=list(plot_window) if plot_window is not None else None, engine=engine)
        cfg = replay_config(config, offload, capacity)

        temps = _temporaries(files, outputs)  # every output is written here, renamed at the end
        # (seconds after the first packet, action), in firing order
        schedule = sorted(
            ((t, action) for action, t in (("dump", dump_at), ("withdraw", withdraw_at),
                                           ("crash", crash_at)) if t is not None),
            key=lambda e: (e[0], ACTIONS.index(e[1])))

        started = time.perf_counter()
        with ExitStack() as stack:
            stack.enter_context(_collector_tuned())
            with open_trace(trace) as reader:  # a TraceError for a file that is not a trace
                fmt, size = reader.format, reader.size
                first = next(iter(reader), None)
            # classic pcap holds one link type; the output takes the input's (the first frame's
            # for pcapng, whose interfaces may differ: docs/replay.md)
            linktype = first.linktype if first is not None else (
                reader.pcap_header.linktype if reader.pcap_header else 1)
            origin = origin_ns if origin_ns is not None else (
                first.ts_ns if first is not None else 0)
            run = _Run(cfg, pnic, origin, linktype, engine)
            stack.callback(run.host.close)
            if out is not None:
                try:
                    run.writer = stack.enter_context(PcapWriter(temps["out"], linktype=linktype))
                except OSError as e:
                    raise ReplayError(f"--out {out}: cannot write ({e.strerror})") from None
            if verdicts is not None:
                run.rows = stack.enter_context(_opener(temps["verdicts"], "verdicts"))
                run.rows.write(verdicts_header())
            if row_data is not None:
                run.row_data = stack.enter_context(_opener(row_data, "row-data"))
            bar = _progress(progress, size, os.path.basename(os.fspath(trace)))
            if bar is not None:
                stack.enter_context(bar[0])
            dump_temp = temps.get("dump-flows")
            ahead = part is None and (spare_cores() if read_ahead is None else read_ahead)
            source: Iterable[Batch] = part if part is not None else read_batches(
                trace, BATCH, reuse=True)
            if ahead:
                source = stack.enter_context(ReadAhead(iter(source)))
            fired = run.replay(iter(source), schedule, dump_temp, bar)
            run.host.finish()
            for done in run.host.ready():  # batches that waited for fragments to the end
                run.drain(done)
            latest = run.last_ts
            if end_ns is None and part is not None:
                end_ns = part.end_ns
            if end_ns is not None:
                run.last_ts = max(run.last_ts, end_ns)
            for t, action in schedule[len(fired):]:  # past the end of the trace
                at = run.first_ts + round(t * NS_PER_S)
                if end_ns is not None and at <= end_ns:
                    # past this part's end but not the whole trace's: it happens as there
                    now = max(at, latest)
                    _act(run, action, dump_temp, now)
                    fired.append({"action": action, "at": t,
                                  "time": (now - run.first_ts) / NS_PER_S,
                                  "before_index": None})
                    continue
                entry = {"action": action, "at": t, "time": (run.last_ts - run.first_ts) / NS_PER_S,
                         "before_index": None}
                if action == "dump":
                    run.dump(dump_temp, run.last_ts)
                else:
                    entry["skipped"] = "the trace ended before this time"
                fired.append(entry)
            if row_data is not None:
                middles_path(row_data).write_text(
                    json.dumps([m.decode() for m in run.middles]), encoding="utf-8")
            wall = time.perf_counter() - started
            trace_info = {
                "path": os.fspath(trace),
                "format": fmt,
                "linktypes": sorted(trace_linktype_name(lt) for lt in run.linktypes),
                "packets": run.n,
                "first_ts": run.first_ts / NS_PER_S if run.n else None,
                "duration": (run.last_ts - run.first_ts) / NS_PER_S if run.n else 0.0,
                "problem": run.problem,
            }
        result = build_report(
            run.tally, run.host.stats, version=__version__, trace=trace_info, options=options,
            config=to_dict(cfg), schedule=fired, outputs=outputs, wall_seconds=wall)
        result["timing"]["read_ahead"] = ahead
        if run.linktype_mismatch:
            result["packets"]["out_linktype_mismatch"] = run.linktype_mismatch
        if plot is not None:
            write_plot_file(temps["plot"], plot, run.tally, run.host.stats, result, plot_window)
        if plot_data is not None:
            Path(plot_data).write_text(json.dumps({
                "bin_ns": run.tally.bin_ns,
                "rate": [[b, tier, n] for (b, tier), n in run.tally.rate.items()],
                "occupancy": run.host.stats.occupancy,
                "events": [[t, kind] for t, kind, _ in run.host.stats.events]}), encoding="utf-8")
        if report is not None:
            write_report(temps["report"], report, result)
        return result


def write_report(temp: str, report: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """The report as JSON to `temp`, the temporary name of `--report report`."""
    try:
        Path(temp).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise ReplayError(f"--report {report}: cannot write ({e.strerror})") from None


def write_plot_file(temp: str, plot: str | os.PathLike[str], tally: Tally, stats: Any,
                    result: dict[str, Any],
                    window: tuple[float | None, float | None] | None) -> None:
    """The plot to `temp`, the temporary name of `--plot plot` (the plotting library is
    loaded only now)."""
    from flowshift.plot import write_plot

    try:
        write_plot(temp, tally, stats, result, window=window)
    except OSError as e:
        raise ReplayError(f"--plot {plot}: cannot write ({e.strerror})") from None


def _act(run: _Run, action: str, dump_path: str | os.PathLike[str] | None, now: int) -> None:
    if action == "dump":
        run.dump(dump_path, now)
    elif action == "withdraw":
        run.host.withdraw_pnic(now)
    else:
        run.host.crash_pnic(now)


def _progress(enabled: bool, size: int, name: str) -> tuple[Progress, Any] | None:
    """A transient progress bar on stderr (by file position), only on a terminal."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        return None
    bar = Progress(TextColumn("replay {task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[packets]:,} packets"), TimeElapsedColumn(),
                   console=console, transient=True)
    task = bar.add_task(name, total=max(size, 1), packets=0)
    return bar, task


class _Run:
    """The state of one replay loop: the host, the writers and the counters."""

    def __init__(self, cfg: HostConfig, pnic: str, first_ts: int, linktype: int,
                 engine: str = "compiled") -> None:
        self.host = Host(cfg, pnic=pnic, engine=engine)
        self.names = [m.name for m in cfg.machines]
        self.first_ts = first_ts
        self.last_ts = first_ts
        self.linktype = linktype
        self.linktypes: set[int] = set()
        self.problem: str | None = None
        self.writer: PcapWriter | None = None
        self.rows: DirectWriter | None = None  # the verdicts file
        self.tally = Tally()
        self.n = 0
        self.linktype_mismatch = 0
        self.labels: dict[int, tuple[Any, ...]] = {}  # result code -> its text fields
        self.row_data: DirectWriter | None = None  # the rows as data, for a merge
        self.middle_ids: dict[int, int] = {}  # result code -> its number in `middles`
        self.middles: list[bytes] = []

    def replay(self, batches: Iterator[Batch], schedule: list[tuple[float, str]],
               dump_path: str | os.PathLike[str] | None,
               bar: tuple[Progress, Any] | None) -> list[dict[str, Any]]:
        """The loop, a batch at a time. Returns the scheduled actions that fired."""
        host = self.host
        pending = [(self.first_ts + round(t * NS_PER_S), t, a) for t, a in schedule]
        fired: list[dict[str, Any]] = []
        latest = self.first_ts
        done_bytes = 0
        for batch in batches:
            n = len(batch)
            self.problem = batch.problem
            if n == 0:
                continue
            linktype = batch.linktype
            first = int(linktype[0])
            # one link type throughout, as a capture mostly is: no sort of the batch
            self.linktypes.update([first] if (linktype == first).all()
                                  else np.unique(linktype).tolist())
            start = 0
            while start < n:
                stop = n
                if pending:
                    # actions fire just before the first packet at or after their time
                    due = np.flatnonzero(batch.ts_ns[start:] >= pending[0][0])
                    if len(due) and due[0] == 0:
                        now = max(pending[0][0], latest)  # the host's clock never goes back
                        while pending and int(batch.ts_ns[start]) >= pending[0][0]:
                            _, t, action = pending.pop(0)
                            if action == "dump":
                                self.dump(dump_path, now)
                            elif action == "withdraw":
                                host.withdraw_pnic(now)
                            else:
                                host.crash_pnic(now)
                            fired.append({"action": action, "at": t,
                                          "time": (now - self.first_ts) / NS_PER_S,
                                          "before_index": self.n})
                        continue
                    if len(due):
                        stop = start + int(due[0])
                res = BatchResults.over(self.n, batch.buf, batch.offset[start:stop],
                                        batch.caplen[start:stop], batch.wire_len[start:stop],
                                        batch.linktype[start:stop], batch.ts_ns[start:stop])
                for done in host.process_batch(res):  # a batch waits for held fragments
                    self.drain(done)
                latest = max(latest, int(res.ts.max()))
                self.n += stop - start
                start = stop
            done_bytes += int(batch.caplen.sum(dtype=np.int64)) + 16 * n
            if bar is not None:
                bar[0].update(bar[1], completed=done_bytes, packets=self.n)
        self.last_ts = latest
        return fired

    def _label(self, code: int) -> tuple[Any, ...]:
        """(verdict, reason, tier, machine, direction) texts of a packed result code."""
        hit = self.labels.get(code)
        if hit is None:
            verdict, reason, rule, tier, machine, direction = _unpack(code)
            hit = (Verdict(verdict), reason_label(reason, rule),
                   TIER_LABELS[tier] if tier >= 0 else "",
                   self.names[machine] if machine >= 0 else "",
                   DIRECTION_LABELS[direction] if direction >= 0 else "")
            self.labels[code] = hit
        return hit

    def drain(self, res: BatchResults) -> None:
        """Count a finished batch and write its outputs (packets, verdict rows), vectorized."""
        tally = self.tally
        uniq, inverse, packets, octets = group_codes(_pack(res), res.wire_len)
        for code, p, b in zip(uniq.tolist(), packets.tolist(), octets.tolist(), strict=True):
            key = self._label(code)
            c = tally.counts.setdefault(key, [0, 0])
            c[0] += p
            c[1] += b
        self._rates(res)
        leaving = res.leaving
        sent = np.flatnonzero(leaving)
        out_base = tally.out_packets
        tally.out_packets += len(sent)
        self.linktype_mismatch += int(np.count_nonzero(res.linktype[sent] != self.linktype))
        if self.writer is not None:
            try:
                self.writer.write_batch(res.ts[sent], res.buf, res.offset[sent],
                                        res.caplen[sent], res.wire_len[sent])
            except ValueError as e:
                raise ReplayError(f"--out: {e}") from None
        if self.rows is not None:
            out_index = np.where(leaving, np.cumsum(leaving) - 1 + out_base, -1)
            middles = [self._middle(code) for code in uniq.tolist()]
            text = rows_text(res.index0, res.ts, self.first_ts, inverse, middles, out_index)
            self.rows.write(text if text is not None else rows_bytes(
                res.index0, res.ts, self.first_ts, inverse, middles, out_index))
        if self.row_data is not None:
            self._row_data(res, uniq, inverse, sent)

    def _row_data(self, res: BatchResults, uniq: np.ndarray, inverse: np.ndarray,
                  sent: np.ndarray) -> None:
        """The batch's rows as data (ROW_DATA), each result by its number in `middles`."""
        assert self.row_data is not None
        ids = np.empty(len(uniq), np.int32)
        for i, code in enumerate(uniq.tolist()):
            k = self.middle_ids.get(code)
            if k is None:
                k = self.middle_ids[code] = len(self.middles)
                self.middles.append(self._middle(code))
            ids[i] = k
        rows = np.zeros(len(res), ROW_DATA)
        rows["ts"] = res.ts
        rows["middle"] = ids[inverse]
        rows["record"][sent] = 16 + np.minimum(res.caplen[sent], MAX_SNAPLEN)
        self.row_data.write(rows.view(np.uint8))

    def _middle(self, code: int) -> bytes:
        """A verdict row's fields after the time, up to the out_index, commas around them."""
        verdict, reason, tier, machine, direction = self._label(code)
        return f",{machine},{direction},{LABELS[verdict]},{reason},{tier},".encode()

    def _rates(self, res: BatchResults) -> None:
        """Packets per (time bin, tier) for the plot."""
        tally = self.tally
        tiered = res.tier >= 0
        if not tiered.any():
            return
        rel = np.maximum(res.ts[tiered] - self.first_ts, 0)
        while int(rel.max()) // tally.bin_ns >= HIST_MAX_BINS:
            tally.coarsen()
        # one count per (bin, tier) the batch touches: bin * tiers + tier, counted at once
        cells, counts = np.unique(rel // tally.bin_ns * len(TIER_LABELS) + res.tier[tiered],
                                  return_counts=True)
        rate = tally.rate
        for cell, n in zip(cells.tolist(), counts.tolist(), strict=True):
            k = (cell // len(TIER_LABELS), TIER_LABELS[cell % len(TIER_LABELS)])
            rate[k] = rate.get(k, 0) + n

    def dump(self, path: str | os.PathLike[str] | None, now: int) -> None:
        assert path is not None
        text = flow_dump(self.host.dump_flows(now), now)
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as e:
            raise ReplayError(f"--dump-flows {path}: cannot write ({e.strerror})") from None


def _pack(res: BatchResults) -> np.ndarray:
    """One int64 per packet holding everything the counters group by."""
    return ((res.verdict.astype(np.int64) + 1)
            | (res.reason.astype(np.int64) << 4)
            | ((res.rule.astype(np.int64) + 1) << 16)
            | ((res.tier.astype(np.int64) + 1) << 32)
            | ((res.machine.astype(np.int64) + 1) << 36)
            | ((res.direction.astype(np.int64) + 1) << 52))


def _unpack(code: int) -> tuple[int, int, int, int, int, int]:
    return ((code & 0xF) - 1, (code >> 4) & 0xFFF, ((code >> 16) & 0xFFFF) - 1,
            ((code >> 32) & 0xF) - 1, ((code >> 36) & 0xFFFF) - 1, ((code >> 52) & 0xF) - 1)
