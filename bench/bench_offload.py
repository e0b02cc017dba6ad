"""Offload performance: the PNIC engine, the reference engine, end-to-end replay, offloads,
entry sizes and the memory of a million flows, each measured against its baseline in one run.

    python bench/bench_offload.py [--flows N] [--workdir DIR] [--json PATH] [--offloads-only]

Generates (once per work dir) an elephant-heavy gateway trace for bench/offload-host.toml
(≥ 2 million packets, ≥ 95 % of packets and bytes in a few elephants, the rest in thousands of
short connections), then measures:

- reference engine alone: parse + the machine's chain, per packet, in Python;
- PNIC engine alone: the compiled pipeline over batches, with the trace's established flows
  installed in its second cache (taken from the reference engine mid-trace);
- `flowshift replay` end to end with `--offload never` and with `--offload elephant`;
- offloads per second: entries installed through the VNIC↔PNIC channel, in process and to
  the PNIC's own process, one Offload message at a time (the baseline) and in Offloads
  batches of 64 and 1,024 entries
  (`--offloads-only` measures these alone, without a trace), and offers made by the VNIC
  itself at one trace instant, each alone (answers due at once) and as one Offloads;
- bytes per flow entry in the first cache (Python objects) and the second cache (fixed layout);
- peak memory with 1 million concurrent flows in the first cache;
- what offload costs and saves the replay itself: elephant's time beyond never's per flow it
  offloaded (the short-connection traces), never's time less elephant's per packet the PNIC
  ran (the elephant-heavy trace), and so how many PNIC packets a flow needs for its move to
  pay for itself in a replay.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from common import machine, rss_bytes
from flowshift import channel as ch
from flowshift.config import HostConfig, load_config
from flowshift.entry import ENTRY_SIZE, Flow, Tier
from flowshift.flow import NS_PER_S, FlowKey
from flowshift.gen import TraceSpec, generate
from flowshift.offload import established
from flowshift.packet.batch import read_batches
from flowshift.packet.parse import parse
from flowshift.packet.view import ParseError
from flowshift.replay import run_replay
from flowshift.services.chain import Chain
from flowshift.services.conntrack_tcp import TcpConn, TcpState
from flowshift.tiers.classify import Classifier
from flowshift.tiers.fastpath import warm_all
from flowshift.tiers.link import InlineLink, PnicLink, ProcessLink

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "offload-host.toml"
SECOND = NS_PER_S


def make_trace(path: Path, cfg: HostConfig, flows: int) -> dict[str, Any]:
    spec = TraceSpec(flows=flows, duration_s=max(10.0, flows / 60), seed=11, elephants=8,
                     elephant_share=0.985, udp_share=0.05, icmp_share=0.01, gateway=cfg)
    s = generate(spec, path)
    return {"packets": s.packets, "bytes": s.bytes, "flows": s.flows,
            "elephant_packet_share": round(s.elephant_packet_share, 4),
            "elephant_byte_share": round(s.elephant_byte_share, 4)}


def bench_trace(workdir: Path | None, flows: int, console: Console
                ) -> tuple[Path, Path, dict[str, Any]]:
    """The work directory (a new temporary one unless given), the bench trace in it
    (generated once, reused while its description sits beside it) and that description."""
    work = workdir or Path(tempfile.mkdtemp(prefix="flowshift-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    trace = work / f"elephants-{flows}.pcap"
    info_path = trace.with_suffix(".json")
    if not trace.exists() or not info_path.exists():
        console.print(f"generating {trace} ...")
        info_path.write_text(json.dumps(make_trace(trace, load_config(CONFIG), flows)))
    return work, trace, json.loads(info_path.read_text())


def frames(path: Path, limit: int | None = None) -> list[tuple[int, bytes, int, int]]:
    out: list[tuple[int, bytes, int, int]] = []
    for b in read_batches(path):
        for i in range(len(b)):
            out.append((int(b.ts_ns[i]), b.frame(i), int(b.linktype[i]), int(b.wire_len[i])))
            if limit is not None and len(out) >= limit:
                return out
    return out


def reference_engine(cfg: HostConfig, packets: list[tuple[int, bytes, int, int]]
                     ) -> tuple[float, Chain]:
    """Packets/s of parse + chain over `packets`; the chain afterwards."""
    classifier = Classifier(cfg.machines)
    chain = Chain(cfg.machines[0], 0, Tier.VNIC)
    start = time.perf_counter()
    for ts, data, linktype, wire_len in packets:
        pkt = parse(bytearray(data), linktype, wire_len)
        if pkt.error != ParseError.OK:
            continue
        m, direction = classifier.classify(pkt)
        if m >= 0:
            chain.process(pkt, direction, ts)
    return len(packets) / (time.perf_counter() - start), chain


def pnic_engine(cfg: HostConfig, trace: Path, chain: Chain, skip: int) -> dict[str, Any]:
    """The compiled engine over the rest of the trace, with the chain's established flows."""
    from flowshift.tiers.pnic_engine import PnicEngine

    flows = [f for f in chain.export_flows() if established(f)]
    engine = PnicEngine(max(len(flows), 1) * 2, Classifier(cfg.machines))
    for f in flows:
        f.owner = Tier.PNIC
        engine.insert(f.to_bytes())
    seen = processed = total = 0
    elapsed = 0.0
    for b in read_batches(trace):
        n = len(b)
        lo = max(0, skip - seen)
        seen += n
        if lo >= n:
            continue
        sl = slice(lo, n)
        verdict = np.empty(n - lo, np.int8)
        reason = np.empty(n - lo, np.int16)
        returned = np.empty(n - lo, np.int64)
        select = np.ones(n - lo, np.bool_)
        start = time.perf_counter()
        processed += engine.process(b.buf, b.offset[sl], b.caplen[sl], b.wire_len[sl],
                                    b.linktype[sl], b.ts_ns[sl], select, verdict, reason,
                                    returned)
        elapsed += time.perf_counter() - start
        total += n - lo
    return {"entries": len(flows), "packets": total, "processed": processed,
            "processed_share": processed / max(total, 1),
            "packets_per_second": total / elapsed if elapsed else 0.0,
            "bytes_per_entry": second_cache_bytes(cfg)}


def engine_bytes(engine: Any) -> int:
    """Memory of the engine's arrays and its table's, each buffer once (views of the entries
    are not new)."""
    arrays = {id(v): v for part in (engine, engine.table) for v in vars(part).values()
              if isinstance(v, np.ndarray) and v.base is None}
    return sum(v.nbytes for v in arrays.values())


def second_cache_bytes(cfg: HostConfig) -> float:
    """Bytes per slot of a second cache of the config's capacity: entries and their index."""
    from flowshift.tiers.pnic_engine import PnicEngine

    capacity = cfg.pnic.capacity
    return engine_bytes(PnicEngine(capacity, Classifier(cfg.machines))) / capacity


def replay(trace: Path, offload: str, engine: str = "compiled") -> tuple[float, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        report = run_replay(trace, CONFIG, offload=offload, progress=False, engine=engine,
                            report=Path(tmp) / "r.json")
    return float(report["timing"]["packets_per_second"]), report


def short_connections(work: Path, cfg: HostConfig, flows: int, seconds: float
                      ) -> dict[str, Any]:
    """A trace of short connections only: elephant offload against never, both engines; new
    connections per second through the slow path."""
    trace = work / f"short-{flows}.pcap"
    info_path = trace.with_suffix(".json")
    if not trace.exists() or not info_path.exists():
        s = generate(TraceSpec(flows=flows, duration_s=seconds, seed=13, udp_share=0.0,
                               icmp_share=0.0, gateway=cfg), trace)
        info_path.write_text(json.dumps({"packets": s.packets, "flows": sum(s.flows.values())}))
    info = json.loads(info_path.read_text())
    out: dict[str, Any] = {"trace": info}
    runs: dict[str, list[float]] = {}
    reports: dict[str, dict[str, Any]] = {}
    # a replay lasts tens of ms (the small trace) or a few hundred (the large one, whose
    # reading ahead varies from run to run): the median of five, the modes in turns (the
    # reference engine's once on the large trace: it takes ten seconds)
    small = info["packets"] < 100_000
    for round_ in range(5):
        for name, offload, engine in (("never", "never", "compiled"),
                                      ("elephant", "elephant", "compiled"),
                                      ("never_reference", "never", "reference")):
            if engine == "reference" and round_ and not small:
                continue
            pps, reports[name] = replay(trace, offload, engine)
            runs.setdefault(name, []).append(pps)
    for name, rates in runs.items():
        pps = statistics.median(rates)
        out[name] = {"packets_per_second": pps, "runs": rates,
                     "connections_per_second": pps * info["flows"] / info["packets"],
                     "tiers": reports[name]["tiers"]}
    out["elephant_vs_never"] = out["elephant"]["packets_per_second"] / out["never"][
        "packets_per_second"]
    # what offload costs the replay: elephant's time beyond never's, per flow it offloaded
    # (the handoff, each offer, move and return, and their counting and events)
    eleph = reports["elephant"]
    offloaded = eleph["events"].get("offload", 0)
    seconds = {name: info["packets"] / out[name]["packets_per_second"]
               for name in ("never", "elephant")}
    out["offloaded_flows"] = offloaded
    out["pnic_packets"] = eleph["tiers"]["pnic"]["packets"]
    out["cost_per_offloaded_flow_us"] = (
        (seconds["elephant"] - seconds["never"]) / max(offloaded, 1) * 1e6)
    return out


def pnic_packet_saving_ns(packets: int, never_pps: float, elephant_pps: float,
                          pnic_packets: int) -> float:
    """What a packet the PNIC runs saves the replay: never's time less elephant's, per PNIC
    packet (the offloads' own cost included, so a little under the saving alone)."""
    return (1 / never_pps - 1 / elephant_pps) * packets / max(pnic_packets, 1) * 1e9


def break_even(short: dict[str, Any], saving_ns: float) -> dict[str, Any]:
    """How many packets an offloaded flow must bring the PNIC for its move to pay for itself
    in the replay's time (None: a PNIC packet saves nothing), against how many the short
    connections' offloaded flows bring."""
    cost_ns = short["cost_per_offloaded_flow_us"] * 1e3
    return {"cost_per_offloaded_flow_us": short["cost_per_offloaded_flow_us"],
            "saving_per_pnic_packet_ns": saving_ns,
            "packets_to_pay_back": cost_ns / saving_ns if saving_ns > 0 else None,
            "pnic_packets_per_offloaded_flow": short["pnic_packets"]
            / max(short["offloaded_flows"], 1)}


BATCHES = (64, 1024)  # entries per Offloads message for the batched figures
REPLAY_ROUNDS = 3  # replays of each mode of the elephant-heavy trace (the median is reported)


def _offload_link(n: int, transport: str) -> PnicLink:
    link = InlineLink if transport == "inline" else ProcessLink  # forked: inherits the warm code
    return link(n, load_config(CONFIG).machines, idle_timeout_ns=3600 * SECOND,
                report_interval_ns=3600 * SECOND)


def _warm(entries: list[bytes]) -> None:
    """Load the compiled index code (both inserts) before timing."""
    warm = _offload_link(2, "inline")
    warm.send(ch.Offload(0, entries[0]))
    warm.send(ch.Offloads(1, entries[1]))


def offloads_per_second(n: int, entries: list[bytes] | None = None,
                        transport: str = "inline") -> float:
    """Offload + acknowledgement of n entries through the channel (`transport`: "inline",
    in-process, or "process", the PNIC in its own process), one Offload message and one Ack
    at a time."""
    entries = entries or [synthetic_flow(i).to_bytes() for i in range(n)]
    _warm(entries)
    link = _offload_link(n, transport)
    try:
        start = time.perf_counter()
        for seq, raw in enumerate(entries):
            link.send(ch.Offload(seq, raw))
            msg = link.answers()
            assert msg == [ch.Ack(seq)], msg
        return n / (time.perf_counter() - start)
    finally:
        link.close()


def offload_batches_per_second(n: int, size: int, entries: list[bytes] | None = None,
                               transport: str = "inline") -> float:
    """Entries/s offloaded and acknowledged through the channel in Offloads messages of
    `size` entries (the VNIC's join of their bytes included), one OffloadResults back for
    each."""
    entries = entries or [synthetic_flow(i).to_bytes() for i in range(n)]
    _warm(entries)
    link = _offload_link(n, transport)
    try:
        start = time.perf_counter()
        for seq in range(0, n, size):
            chunk = entries[seq:seq + size]
            link.send(ch.Offloads(seq, b"".join(chunk)))
            msg = link.answers()
            assert msg == [ch.OffloadResults(seq, bytes(len(chunk)))], msg
        return n / (time.perf_counter() - start)
    finally:
        link.close()


def vnic_offers_per_second(n: int, latency: int) -> float:
    """Offers the VNIC makes at one trace instant, n established flows of its first cache,
    until every answer took effect: its bookkeeping per offer included. With `latency` 0 each
    answer is due at once, so each offer goes alone; with more they go as one Offloads."""
    from flowshift.host import Host  # the VNIC with its link, as a replay wires them

    host = Host(load_config(CONFIG), policy="always", capacity=n, latency=latency,
                engine="reference")
    host.handoff(0, 0)
    vnic = host.vnic
    chain = vnic.chains[0]
    assert chain is not None
    for i in range(n):
        chain.import_flow(synthetic_flow(i))
    keys = [f.key for f in chain.flows]
    vnic.clock = n  # after every flow's creation
    start = time.perf_counter()
    for key in keys:
        vnic.consider(0, key, n)
    vnic.drain()
    elapsed = time.perf_counter() - start
    assert host.stats.offloads_to_pnic == n, host.stats.offloads_to_pnic
    host.close()
    return n / elapsed


def offloads(n: int, rounds: int = 3) -> dict[str, float]:
    """One at a time, then in batches of each size of BATCHES; then the VNIC's offers, one
    message each and one message for all: in one run, each figure the best of `rounds`
    taken in turns (other work on the machine only ever slows a round down)."""
    entries = [synthetic_flow(i).to_bytes() for i in range(n)]
    vnic_offers_per_second(1000, 1)  # warm
    measures: dict[str, Callable[[], float]] = {}
    for transport, prefix in (("inline", ""), ("process", "process_")):
        measures[f"{prefix}one_at_a_time"] = partial(offloads_per_second, n, entries, transport)
        for size in BATCHES:
            measures[f"{prefix}batches_of_{size}"] = partial(offload_batches_per_second, n,
                                                             size, entries, transport)
    measures |= {
        "vnic_one_at_a_time": lambda: vnic_offers_per_second(n, 0),
        "vnic_batched": lambda: vnic_offers_per_second(n, 1)}
    out = dict.fromkeys(measures, 0.0)
    for _ in range(rounds):
        for name, measure in measures.items():
            out[name] = max(out[name], measure())
    return out


def offload_rows(table: Table, figures: dict[str, float]) -> None:
    for prefix, where in (("", "the channel"), ("process_", "the process transport")):
        one = figures[f"{prefix}one_at_a_time"]
        table.add_row(f"offloads through {where}, one at a time", f"{one:,.0f} /s", "baseline")
        for size in BATCHES:
            rate = figures[f"{prefix}batches_of_{size}"]
            table.add_row(f"offloads through {where}, batches of {size:,}",
                          f"{rate:,.0f} /s", f"{rate / one:,.1f}× one at a time")
    alone, together = figures["vnic_one_at_a_time"], figures["vnic_batched"]
    table.add_row("VNIC offers at one instant, answers due at once", f"{alone:,.0f} /s",
                  "baseline")
    table.add_row("VNIC offers at one instant, answers due later (one Offloads)",
                  f"{together:,.0f} /s", f"{together / alone:,.1f}× answers at once")


def title(m: dict[str, Any]) -> str:
    return (f"flowshift offload benchmark — {m['cpu']}, {m['cores']} cores, {m['memory']}, "
            f"Python {m['python']}")


def synthetic_flow(i: int) -> Flow:
    # unique keys and reply keys for i < 2**28: 4096 flows per server, one port each
    src = bytes((10, 0, (i >> 8) & 0xFF, i & 0xFF))
    dst = bytes((198, 51, (i >> 12) & 0xFF, 1 + (i >> 20)))
    key = FlowKey(4, 6, 0, src, dst, 1024 + (i & 0xFFF), 443)
    xlat = key._replace(src=b"\xc0\x00\x02\x01")
    return Flow(key=key, xlat=xlat, machine=0, chain=11, tcp=TcpConn(state=TcpState.ESTABLISHED),
                status=3, created=i, last_seen=i, expires=10**15, owner=Tier.VNIC)


def first_cache_memory(n: int, engine: str) -> dict[str, float]:
    """Run in a fresh process: RSS of n established flows in one VNIC chain, as the reference
    engine keeps them (Python objects) or as the compiled one does (the fast path's table)."""
    from flowshift.tiers.fastpath import Fastpath

    cfg = load_config(CONFIG)
    chain = Chain(cfg.machines[0], 0, Tier.VNIC)
    fp = Fastpath(cfg, Classifier(cfg.machines))
    if engine == "compiled":
        chain.flows.use_cache(fp)
    before = rss_bytes()
    for i in range(n):
        flow = synthetic_flow(i)
        chain.import_flow(flow)
        if engine == "compiled":
            fp.cache(flow, chain.flows, -1, bounded=False)
    after = rss_bytes()
    return {"flows": len(chain.flows), "rss_mib": after / 2**20,
            "beyond_base_mib": (after - before) / 2**20, "bytes_per_flow": (after - before) / n}


@click.command()
@click.option("--flows", default=1500, show_default=True, help="Flows of the generated trace.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the generated trace here (reused when present).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--million", default=1_000_000, show_default=True,
              help="Flows for the first-cache memory figure.")
@click.option("--memory-only", type=click.Choice(["compiled", "reference"]), hidden=True)
@click.option("--offloads-only", is_flag=True,
              help="Only the offloads through the channel (no trace is generated).")
def main(flows: int, workdir: Path | None, json_path: Path | None, million: int,
         memory_only: str | None, offloads_only: bool) -> None:
    if memory_only:  # the child that measures the first cache on its own
        print(json.dumps(first_cache_memory(million, memory_only)))
        return
    console = Console()
    if offloads_only:
        results = {"machine": machine(), "offloads": offloads(100_000)}
        table = Table(title=title(results["machine"]))
        for column in ("measure", "value", "against"):
            table.add_column(column, justify="left" if column == "measure" else "right")
        offload_rows(table, results["offloads"])
        console.print(table)
        if json_path is not None:
            json_path.write_text(json.dumps(results, indent=2) + "\n")
        return
    cfg = load_config(CONFIG)
    work, trace, info = bench_trace(workdir, flows, console)
    results: dict[str, Any] = {"machine": machine(), "trace": info}
    warm_all()  # every kernel compiled or loaded before anything is timed (a cold cache
    # otherwise puts seconds of compiling into the first figure)

    sample = frames(trace, 300_000)
    ref_pps, chain = reference_engine(cfg, sample)
    results["reference_engine_pps"] = ref_pps
    results["pnic_engine"] = pnic_engine(cfg, trace, chain, len(sample))
    ref_never_pps, _ = replay(trace, "never", "reference")
    # the median of three of each, in turns: one replay of each was at the machine's mercy
    # (a `never` at a third of its speed once made elephant 3.2× faster)
    pair: dict[str, list[float]] = {"never": [], "elephant": []}
    for _ in range(REPLAY_ROUNDS):
        for mode, rates in pair.items():
            pps, report = replay(trace, mode)
            rates.append(pps)
            if mode == "elephant":
                eleph = report
    never_pps, eleph_pps = (statistics.median(pair[m]) for m in ("never", "elephant"))
    results["replay"] = {
        "never_reference_pps": ref_never_pps, "never_pps": never_pps, "elephant_pps": eleph_pps,
        "never_runs": pair["never"], "elephant_runs": pair["elephant"],
        "ratio": eleph_pps / never_pps, "elephant_tiers": eleph["tiers"],
        "elephant_offloads": eleph["offloads"]}
    results["short"] = short_connections(work, cfg, 500, 10.0)
    results["connections"] = short_connections(work, cfg, 20_000, 20.0)
    saving = pnic_packet_saving_ns(info["packets"], never_pps, eleph_pps,
                                   eleph["tiers"]["pnic"]["packets"])
    results["break_even"] = break_even(results["short"], saving)
    results["offloads"] = offloads(100_000)
    memories = {}
    for engine in ("reference", "compiled"):
        child = subprocess.run([sys.executable, __file__, "--memory-only", engine,
                                "--million", str(million)], capture_output=True, text=True,
                               check=True)
        memories[engine] = json.loads(child.stdout.strip().splitlines()[-1])
    memory = memories["compiled"]
    results["first_cache"] = memories
    results["entry_bytes"] = {"first_cache": memory["bytes_per_flow"],
                              "second_cache": results["pnic_engine"]["bytes_per_entry"],
                              "entry_layout": ENTRY_SIZE}

    m = results["machine"]
    table = Table(title=title(m))
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("against", justify="right")
    pe = results["pnic_engine"]
    rp = results["replay"]
    table.add_row("trace", f"{info['packets']:,} packets",
                  f"elephants: {info['elephant_packet_share']:.1%} of packets, "
                  f"{info['elephant_byte_share']:.1%} of bytes")
    table.add_row("PNIC engine alone", f"{pe['packets_per_second']:,.0f} pkt/s",
                  f"{pe['packets_per_second'] / ref_pps:,.1f}× reference engine")
    table.add_row("reference engine alone", f"{ref_pps:,.0f} pkt/s", "baseline")
    table.add_row("replay --offload never --engine reference", f"{ref_never_pps:,.0f} pkt/s",
                  "baseline")
    table.add_row("replay --offload never (median of 3)", f"{never_pps:,.0f} pkt/s",
                  f"{never_pps / ref_never_pps:,.1f}× reference")
    table.add_row("replay --offload elephant (median of 3)", f"{eleph_pps:,.0f} pkt/s",
                  f"{rp['ratio']:,.1f}× never")
    sh = results["short"]
    never, ref = sh["never"]["packets_per_second"], sh["never_reference"]["packets_per_second"]
    table.add_row(f"short connections ({sh['trace']['flows']:,} flows, "
                  f"{sh['trace']['packets']:,} packets), never", f"{never:,.0f} pkt/s",
                  f"{never / ref:,.1f}× reference")
    table.add_row("short connections, elephant",
                  f"{sh['elephant']['packets_per_second']:,.0f} pkt/s",
                  f"{sh['elephant_vs_never']:,.2f}× never")
    co = results["connections"]
    table.add_row(f"short connections ({co['trace']['flows']:,} flows, "
                  f"{co['trace']['packets']:,} packets), elephant",
                  f"{co['elephant']['packets_per_second']:,.0f} pkt/s",
                  f"{co['elephant_vs_never']:,.2f}× never")
    software = 1 - sh["pnic_packets"] / sh["trace"]["packets"]
    table.add_row("short connections, packets software decides, elephant", f"{software:.1%}",
                  "100% with never")
    be = results["break_even"]
    table.add_row("an offloaded flow's cost to the replay (500 connections)",
                  f"{be['cost_per_offloaded_flow_us']:,.1f} µs",
                  f"{co['cost_per_offloaded_flow_us']:,.1f} µs (20,000 connections)")
    table.add_row("a PNIC packet's saving to the replay (elephant-heavy trace)",
                  f"{be['saving_per_pnic_packet_ns']:,.1f} ns",
                  f"{1e9 / never_pps:,.1f} ns a packet with never")
    pay = be["packets_to_pay_back"]
    table.add_row("PNIC packets an offloaded flow needs to pay for its move",
                  f"{pay:,.0f}" if pay is not None else "none pays (no saving)",
                  f"{be['pnic_packets_per_offloaded_flow']:,.0f} per offloaded short connection")
    cps = co["never"]["connections_per_second"]
    table.add_row(f"new connections through the slow path ({co['trace']['flows']:,})",
                  f"{cps:,.0f} /s",
                  f"{cps / co['never_reference']['connections_per_second']:,.1f}× reference")
    offload_rows(table, results["offloads"])
    table.add_row("bytes per entry, second cache",
                  f"{results['entry_bytes']['second_cache']:,.0f}",
                  f"layout {ENTRY_SIZE} B + index")
    ref_memory = memories["reference"]
    table.add_row("bytes per flow, first cache, fast path",
                  f"{memory['bytes_per_flow']:,.0f}",
                  f"{ref_memory['bytes_per_flow']:,.0f} as Python objects")
    table.add_row(f"{memory['flows']:,} established first-cache flows",
                  f"{memory['beyond_base_mib']:,.0f} MiB beyond the base",
                  f"{ref_memory['beyond_base_mib']:,.0f} MiB as Python objects")
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
