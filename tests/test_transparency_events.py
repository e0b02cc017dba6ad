"""Transparency under the event model: traces built to break it, every schedule, both formats.

Hypothesis builds traces from episodes that stress the event order (time gaps longer than every
timeout, flows that close across a gap, timestamps that go backwards, many short flows among
elephants, an untracked protocol, two link types in one pcapng) and picks a schedule (policy,
batch size, capacity, PNIC latency, withdrawal, crash and dump at any packet). Every run is
compared with the run that never offloads: verdicts, reasons and bytes of every packet, and the
flow dump but for its tier column. After a crash only the forwarded packets of the never run
are checked (the VNIC resumes loosely), as Linux would keep those connections.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.config import HostConfig, load_config, parse_config
from flowshift.packet.build import ip_frame, tcp_frame, udp_frame
from flowshift.packet.defrag import refragment
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN
from flowshift.verdict import Verdict
from hosttools import CORPUS, FIREWALL_HOST, GATEWAY_HOST, REAL, Run, run
from tracetools import (
    CLIENT,
    SERVER,
    S,
    TcpConn,
    pcap_to_pcapng,
    write_mixed_pcapng,
    write_pcap,
)

MS = S // 1000
# Linux sysctls far from their defaults: flows expire within the trace's gaps and steps
SHORT = {"tcp_timeout_established": 1, "tcp_timeout_syn_sent": 1, "tcp_timeout_syn_recv": 1,
         "tcp_timeout_fin_wait": 1, "tcp_timeout_close_wait": 1, "tcp_timeout_last_ack": 1,
         "tcp_timeout_time_wait": 1, "tcp_timeout_close": 1, "tcp_timeout_unacknowledged": 1,
         "tcp_timeout_max_retrans": 1, "tcp_max_retrans": 1, "udp_timeout": 1,
         "udp_timeout_stream": 2, "icmp_timeout": 1, "icmpv6_timeout": 1, "generic_timeout": 1}
HOSTS = {"firewall": parse_config(FIREWALL_HOST, "test"),
         "gateway": parse_config(GATEWAY_HOST, "test"),
         "gateway-short": parse_config(  # and a routing machine: TTL decremented on every tier
             {**GATEWAY_HOST, "conntrack": SHORT, "machine": [
                 {**m, "forwarding": "router"} for m in GATEWAY_HOST["machine"]]}, "test"),
         "gateway-small": parse_config({**GATEWAY_HOST, "conntrack": {"max": 6}}, "test"),
         "firewall-strict": parse_config(  # per machine: no mid-stream pickup, liberal windows
             {**FIREWALL_HOST, "machine": [
                 {**m, "conntrack": {"tcp_loose": False, "tcp_be_liberal": True,
                                     "tcp_timeout_established": 3}}
                 for m in FIREWALL_HOST["machine"]]}, "test")}


def _episode(rng: random.Random, kind: str, t0: int, port: int) -> list[tuple[int, bytes]]:
    """One flow's packets from trace time t0."""
    if kind == "dns":  # a short UDP exchange
        q = udp_frame(src=CLIENT, dst=SERVER, sport=port, dport=53, payload=b"q")
        a = udp_frame(src=SERVER, dst=CLIENT, sport=53, dport=port, payload=b"a" * 40)
        return [(t0, q), (t0 + rng.randint(1, 50) * MS, a)]
    if kind == "fragmented":  # UDP whose big datagrams come in fragments, in any order
        frames = []
        for i in range(rng.randint(1, 6)):
            there = i % 2 == 0
            dgram = udp_frame(src=CLIENT if there else SERVER, dst=SERVER if there else CLIENT,
                              sport=port if there else 4000, dport=4000 if there else port,
                              payload=bytes([i]) * rng.choice([40, 1400, 3000]), ip_id=i + 1,
                              df=False)
            pieces = [dgram[:14] + f for f in refragment(dgram[14:], rng.choice([576, 1500]))]
            if rng.random() < 0.3:
                rng.shuffle(pieces)
            frames += pieces
        if len(frames) > 1 and rng.random() < 0.2:  # (never the trace's only frame)
            frames.pop(rng.randrange(len(frames)))  # a datagram that never completes
        return [(t0 + i * rng.choice([0, MS]), f) for i, f in enumerate(frames)]
    if kind == "igmp":
        return [(t0, ip_frame(src=CLIENT, dst=bytes([224, 0, 0, 251]), proto=2,
                              l4=bytes([0x16, 0, 0, 0, 224, 0, 0, 251])))]
    conn = TcpConn(sport=port)
    step = rng.choice([MS // 10, MS, 20 * MS])
    frames = conn.handshake() + conn.data(rng.choice([2, 12, 40]))
    out = [(t0 + i * step, f) for i, f in enumerate(frames)]
    t = out[-1][0]
    if kind == "elephant":
        return [*out, (t + step, conn.client_fin()), (t + 2 * step, conn.server_fin()),
                (t + 3 * step, conn.client_ack())]
    if kind == "close_across_gap":  # the peer answers the FIN after a long silence
        gap = rng.choice([30 * S, 130 * S, 700 * S])
        return [*out, (t + step, conn.client_fin()), (t + gap, conn.server_fin()),
                (t + gap + step, conn.client_ack())]
    return out  # "open": never closes


KINDS = ("dns", "elephant", "open", "close_across_gap", "igmp", "fragmented")


@st.composite
def traces(draw: st.DrawFn) -> tuple[list[tuple[int, bytes]], list[bool]]:
    rng = random.Random(draw(st.integers(0, 2**32)))
    episodes = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=30))
    t = S
    trace: list[tuple[int, bytes]] = []
    for n, kind in enumerate(episodes):
        gap = draw(st.sampled_from([0, 3 * MS, 1500 * MS, 2 * S, 200 * S, 800 * S]))
        t += gap
        trace += _episode(rng, kind, t, 20000 + n)
    trace.sort(key=lambda p: p[0])
    for _ in range(draw(st.integers(0, 4))):  # timestamps that go backwards
        i = rng.randrange(len(trace))
        j = min(len(trace) - 1, i + rng.randint(1, 5))
        trace[i], trace[j] = trace[j], trace[i]
    if draw(st.booleans()):  # ... across a gap longer than a timeout
        for i in range(len(trace) - 1):
            if trace[i + 1][0] - trace[i][0] > 100 * S and rng.random() < 0.5:
                trace[i], trace[i + 1] = trace[i + 1], trace[i]
    raw = [False] * len(trace)
    if draw(st.booleans()):  # two link types in one pcapng
        raw = [rng.random() < 0.3 for _ in trace]
    return trace, raw


def _write(tmp: Path, trace: list[tuple[int, bytes]], raw: list[bool]) -> Path:
    if any(raw):
        return write_mixed_pcapng(tmp / "t.pcapng", trace, raw)
    return write_pcap(tmp / "t.pcap", trace)


def _check(never: Run, got: Run, crashed: bool) -> None:
    assert len(never.results) == len(got.results)
    if crashed:
        for x, y in zip(never.results, got.results, strict=True):
            if x.verdict == Verdict.FORWARD:
                assert y.verdict == Verdict.FORWARD, (x, y)
                assert y.data == x.data
        return
    for i, (x, y) in enumerate(zip(never.outputs(), got.outputs(), strict=True)):
        assert x == y, i
    assert got.dumps == never.dumps


schedules = st.fixed_dictionaries({
    "policy": st.sampled_from(["always", "elephant"]),
    "rows": st.sampled_from([None, 1, 7, 64, 4096]),
    "capacity": st.sampled_from([1, 2, 64]),
    "latency": st.sampled_from([0, 0, MS, 50 * MS]),
    "withdraw": st.booleans(), "crash": st.booleans(), "dump": st.booleans(),
    "at": st.floats(0, 1),
})


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(trace=traces(), schedule=schedules, host=st.sampled_from(sorted(HOSTS)))
def test_generated_traces_every_schedule(tmp_path_factory, trace, schedule, host):
    tmp = tmp_path_factory.mktemp("ev")
    path = _write(tmp, *trace)
    cfg = HOSTS[host]
    n = len(trace[0])
    at = min(int(schedule["at"] * n), n - 1)
    if schedule["rows"] is not None and schedule["latency"]:
        schedule["latency"] = 0  # the batch path runs as the replay does: answers at once
    dump_at = at if schedule["dump"] else None
    never = run(path, cfg, policy="never", rows=schedule["rows"], dump_at=dump_at)
    got = run(path, cfg, policy=schedule["policy"], rows=schedule["rows"],
              capacity=schedule["capacity"], latency=schedule["latency"],
              withdraw_at=at if schedule["withdraw"] else None,
              crash_at=at if schedule["crash"] and not schedule["withdraw"] else None,
              dump_at=dump_at)
    crashed = schedule["crash"] and not schedule["withdraw"]
    if crashed:
        got.dumps = never.dumps  # a crash resumes loosely: its dump after it is not exact
    elif dump_at is not None and got.held[0]:
        # packets held at the dump for a handoff still in transit have not met the firewall
        # yet: the dump is the never run's over the other packets before it, at that time
        seen = sorted(set(range(dump_at)) - set(got.held[0]))
        never.dumps = _never_dump(tmp, trace, cfg, seen, trace[0][dump_at][0])
    _check(never, got, crashed)


def _never_dump(tmp: Path, trace: tuple[list[tuple[int, bytes]], list[bool]], cfg: HostConfig,
                seen: list[int], ts: int) -> list[list[str]]:
    """The never run's dump at time `ts`, after the packets `seen` only."""
    frames, raw = trace
    (tmp / "seen").mkdir()
    part = _write(tmp / "seen", [frames[i] for i in seen], [raw[i] for i in seen])
    return run(part, cfg, policy="never", dump_ts=ts).dumps


def test_a_packet_punted_after_its_flow_was_offered_again_waits_for_the_entry(tmp_path):
    """Packets held while a flow's entry is in transit go to the PNIC with it; the PNIC hands
    the flow back at the first (a SYN/ACK after a mid-stream pick-up) and punts them all. The
    VNIC decides them in order, and an established one has the flow offered again: the
    packets punted after it (here, the FIN) must wait behind that entry, or the entry leaves
    without them and comes back, idle, without the FIN: the flow then outlives its close by
    days. Found by hypothesis (test_generated_traces_every_schedule)."""
    def tcp(t: float, out: bool, flags: int, seq: int, ack: int, size: int = 0):
        src, dst, sport, dport = (CLIENT, SERVER, 20002, 80) if out else (SERVER, CLIENT, 80,
                                                                          20002)
        return int(t * S), tcp_frame(src=src, dst=dst, sport=sport, dport=dport, seq=seq,
                                     ack=ack, flags=flags, window=65535, payload=b"d" * size)

    trace = [
        (S, udp_frame(src=CLIENT, dst=SERVER, sport=20000, dport=53, payload=b"q")),
        (S + 22 * MS, udp_frame(src=SERVER, dst=CLIENT, sport=53, dport=20000,
                                payload=b"a" * 40)),  # the machine hands over; offloaded
        tcp(201.002, True, TCP_ACK, 1001, 5001),  # picked up mid-stream: offered at once
        tcp(201.001, False, TCP_SYN | TCP_ACK, 5000, 1001),  # held behind the entry ...
        tcp(201.000, True, TCP_SYN, 1000, 0),
        tcp(201.003, True, TCP_PSH | TCP_ACK, 1001, 5001, 100),
        tcp(201.004, False, TCP_PSH | TCP_ACK, 5001, 1101, 100),
        tcp(201.005, True, TCP_FIN | TCP_ACK, 1101, 5101),  # ... punted, decided, re-offered
        tcp(901.004, False, TCP_FIN | TCP_ACK, 5101, 1102),  # long after FIN_WAIT's 120 s
        tcp(901.005, True, TCP_ACK, 1102, 5102)]
    path = write_pcap(tmp_path / "t.pcap", trace)
    cfg = HOSTS["firewall"]
    never = run(path, cfg, policy="never")
    got = run(path, cfg, policy="always", capacity=1, latency=50 * MS)
    assert got.host.stats.offloads_to_pnic >= 3  # the UDP flow, the TCP flow twice
    _check(never, got, crashed=False)
    assert never.results[-2].verdict == Verdict.DROP  # the late FIN: no flow, invalid


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(trace=traces(), rows=st.sampled_from([None, 64]))
def test_generated_traces_process_pnic(tmp_path_factory, trace, rows):
    path = _write(tmp_path_factory.mktemp("evp"), *trace)
    cfg = HOSTS["gateway"]
    inline = run(path, cfg, policy="always", rows=rows)
    process = run(path, cfg, policy="always", rows=rows, pnic="process")
    assert process.outputs() == inline.outputs()
    assert process.host.stats.events == inline.host.stats.events
    assert process.host.stats.tier_packets == inline.host.stats.tier_packets


def test_events_at_one_time_are_listed_alike_by_every_engine(tmp_path):
    """Packets whose times go back happen at the host's clock, so their events share one
    time. With the PNIC in the pass a flow's rows run in turn with software's; the reference
    engine and a PNIC in its own process run them ahead, so they meet the same events in
    another order: each engine lists them in one (stats.EVENT_KINDS, then the flow). Found by
    hypothesis (test_generated_traces_process_pnic), shrunk to four packets."""
    def syn_or_ack(t: float, sport: int, flags: int, seq: int, ack: int):
        return int(t * S), tcp_frame(src=CLIENT, dst=SERVER, sport=sport, dport=80, seq=seq,
                                     ack=ack, flags=flags, window=65535)

    trace = [syn_or_ack(1.0, 20001, TCP_SYN, 1000, 0),
             syn_or_ack(201.0002, 20004, TCP_ACK, 1001, 5001),  # handed over, offloaded
             syn_or_ack(1.9, 20001, TCP_ACK, 3002, 7002),  # back in time: at 201.0002 too
             syn_or_ack(201.0, 20004, TCP_SYN, 1000, 0)]  # the PNIC hands it back
    path = write_pcap(tmp_path / "t.pcap", trace)
    runs = [run(path, HOSTS["gateway"], policy="always", rows=64, **kw)
            for kw in ({}, {"engine": "reference"}, {"pnic": "process"})]
    events = runs[0].host.stats.events
    assert [(kind, getattr(what, "sport", what)) for _, kind, what in events] == [
        ("handoff", "gw"), ("offload", 20001), ("offload", 20004), ("return", "closed")]
    assert len({t for t, _, _ in events}) == 1
    assert all(r.host.stats.events == events for r in runs[1:])


# -- real captures, both formats, every schedule ---------------------------------------------

needs_corpus = pytest.mark.skipif(not REAL.is_dir(), reason="shared/corpus/real not present")
REAL_CAPTURES = sorted(p.name for p in REAL.glob("*.pcap")) if REAL.is_dir() else []


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    cfg = load_config(REAL / "lb-gateway-rr.toml")
    tmp = tmp_path_factory.mktemp("realng")
    out = {}
    for name in REAL_CAPTURES:
        classic = REAL / name
        ng = pcap_to_pcapng(classic, tmp / (name + "ng"))
        out[name] = (classic, ng, run(classic, cfg, policy="never", rows=4096))
    return cfg, out


@needs_corpus
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_real_captures_every_schedule(real_runs, data):
    cfg, runs = real_runs
    name = data.draw(st.sampled_from(sorted(runs)))
    classic, ng, never = runs[name]
    n = len(never.results)
    trace = data.draw(st.sampled_from([classic, ng]))
    at = data.draw(st.integers(0, max(n - 1, 0)))
    kind = data.draw(st.sampled_from(["policy", "withdraw", "crash", "dump"]))
    rows = data.draw(st.sampled_from([500, 4096]))
    policy = data.draw(st.sampled_from(["always", "elephant"]))
    if kind == "dump":
        never = run(classic, cfg, policy="never", rows=rows, dump_at=at)
    got = run(trace, cfg, policy=policy, rows=rows,
              withdraw_at=at if kind == "withdraw" else None,
              crash_at=at if kind == "crash" else None,
              dump_at=at if kind == "dump" else None)
    _check(never, got, kind == "crash")


def _tcpdump_captures() -> list[Path]:
    d = CORPUS / "tcpdump"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix in (".pcap", ".pcapng"))


ALLOW_ALL = {"pnic": {"capacity": 8},
             "offload": {"policy": "always", "idle_timeout": 2.0, "report_interval": 0.5},
             "machine": [{"name": "all", "addresses": ["0.0.0.0/0", "::/0"],
                          "services": ["firewall", "count"],
                          "firewall": {"default": "allow", "rule": []}}]}


@pytest.mark.skipif(not _tcpdump_captures(), reason="shared/corpus/tcpdump not present")
def test_every_tcpdump_capture_both_formats_every_schedule(tmp_path):
    """All of tcpdump's captures (malformed ones included), as they are and converted to
    pcapng: the never-offload run's verdicts and bytes under every offload schedule, the PNIC
    going away and a dump half way through."""
    cfg = parse_config(ALLOW_ALL, "test")
    checked = 0
    for path in _tcpdump_captures():
        ng = pcap_to_pcapng(path, tmp_path / "t.pcapng")
        for trace in (path, ng):
            never = run(trace, cfg, policy="never", rows=64)
            half = len(never.results) // 2
            for kw in ({"rows": 64}, {}, {"rows": 64, "withdraw_at": half},
                       {"rows": 64, "crash_at": half}):
                _check(never, run(trace, cfg, policy="always", **kw), "crash_at" in kw)
            dumped = run(trace, cfg, policy="never", rows=64, dump_at=half)
            _check(dumped, run(trace, cfg, policy="always", rows=64, dump_at=half), False)
            checked += 1
    assert checked == 2 * len(_tcpdump_captures())


# -- the PNIC in its own process, twenty times ------------------------------------------------


@needs_corpus
def test_process_pnic_twenty_times_is_inline_every_time(tmp_path):
    from flowshift.packet.pcap import PcapWriter, open_trace

    cfg = load_config(REAL / "lb-gateway-rr.toml")
    trace = tmp_path / "head.pcap"
    with open_trace(REAL / "replay_input.pcap") as frames, PcapWriter(trace) as out:
        for _, f in zip(range(8000), frames, strict=False):  # its first 8000 packets
            out.write(f.ts_ns, f.data, f.wire_len)
    inline = run(trace, cfg, policy="elephant", rows=2048)
    assert inline.host.stats.offloads_to_pnic > 0
    for _ in range(20):
        process = run(trace, cfg, policy="elephant", rows=2048, pnic="process")
        assert process.outputs() == inline.outputs()
        assert process.host.stats.events == inline.host.stats.events
        assert process.host.stats.tier_packets == inline.host.stats.tier_packets
        assert process.host.stats.peak_second_cache == inline.host.stats.peak_second_cache


@needs_corpus
def test_packet_by_packet_and_batches_agree_on_events_tiers_and_peaks():
    cfg = load_config(REAL / "lb-gateway-rr.toml")
    trace = REAL / "replay_input.pcap"
    runs = [run(trace, cfg, policy="elephant", rows=rows) for rows in (None, 100, 4096)]
    base = runs[-1].host.stats
    assert base.offloads_to_pnic > 0
    for got in runs[:-1]:
        s = got.host.stats
        assert got.outputs() == runs[-1].outputs()
        assert s.events == base.events
        assert s.tier_packets == base.tier_packets
        assert (s.peak_second_cache, s.held_packets) == (base.peak_second_cache,
                                                         base.held_packets)
