"""The software tiers' compiled fast path against the reference engine, bit for bit.

`--engine reference` runs every software packet in Python; the default runs the established
flows of the machine and VNIC tiers through the PNIC's kernels (tiers/fastpath.py). Every
packet's verdict, reason, bytes and tier, every counter, event and peak of the host must be
the same, under every offload schedule, batch size, latency and transport, and the fast path
must really have run (else these tests would prove nothing).
"""

from __future__ import annotations

import dataclasses
import random
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowshift.commands.demo import build_trace, demo_config_text
from flowshift.config import load_config, parse_config, to_dict
from flowshift.entry import Flow, Status, Tier
from flowshift.flow import PROTO_TCP, FlowKey
from flowshift.gen import TraceSpec, generate, parse_networks
from flowshift.host import Host
from flowshift.packet.build import tcp_frame
from flowshift.packet.parse import parse
from flowshift.packet.pcap import PcapWriter, open_trace
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN
from flowshift.results import BatchResults
from flowshift.services.conntrack import FlowTable
from flowshift.services.conntrack_tcp import TcpConn, TcpState
from flowshift.tiers._fastpath_batch import DONE
from flowshift.tiers.classify import Classifier
from flowshift.tiers.fastpath import Fastpath
from flowshift.verdict import Verdict
from hosttools import FIREWALL_HOST, GATEWAY_HOST, REAL, Run, run

CLIENTS = parse_networks("10.0.0.0/24,fd00::/64")
SERVERS = parse_networks("198.51.100.0/24,2001:db8::/64")


def _stats(r: Run) -> dict[str, object]:
    return dataclasses.asdict(r.host.stats)


def _results(r: Run) -> list[tuple[object, ...]]:
    return [(x.index, int(x.verdict), x.reason, x.tier, x.data) for x in r.results]


def assert_same(trace: Path, cfg, **kw) -> Run:
    """The trace through both engines: identical."""
    ref = run(trace, cfg, engine="reference", **kw)
    return _same_as(ref, run(trace, cfg, engine="compiled", **kw))


def _same_as(ref: Run, fast: Run) -> Run:
    assert _results(fast) == _results(ref)
    assert _stats(fast) == _stats(ref)
    assert fast.dumps == ref.dumps
    # what the VNIC keeps of its flows' returns, by which it offers them again
    assert fast.host.vnic.backoff == ref.host.vnic.backoff
    return fast


@pytest.fixture(scope="module")
def gateway():
    return parse_config(GATEWAY_HOST, "gateway test")


@pytest.fixture(scope="module")
def gateway_trace(gateway, tmp_path_factory):
    path = tmp_path_factory.mktemp("fast") / "gw.pcap"
    generate(TraceSpec(flows=300, duration_s=20.0, seed=5, elephants=4, ipv6_share=0.3,
                       icmp_share=0.05, udp_share=0.2, clients=CLIENTS, servers=SERVERS,
                       gateway=gateway), path)
    return path


def _ran_compiled(r: Run) -> None:
    fp = r.host.fastpath
    assert fp is not None
    assert fp.ran > 0, "the fast path ran no packet: the comparison proved nothing"


@pytest.mark.parametrize("policy", ["never", "elephant", "always"])
@pytest.mark.parametrize("rows", [1, 97, 4096])
def test_gateway_trace_is_the_same_on_both_engines(gateway, gateway_trace, policy, rows):
    fast = assert_same(gateway_trace, gateway, policy=policy, rows=rows)
    if policy == "never" and rows > 1:
        _ran_compiled(fast)


@pytest.mark.parametrize("kw", [
    {"latency": 3_000_000}, {"pnic": "process"}, {"capacity": 2}, {"random_seed": 7},
    {"withdraw_at": 5000}, {"crash_at": 5000}, {"dump_at": 4000},
    {"withdraw_at": 2000, "crash_at": 9000, "latency": 1_000_000},
], ids=str)
def test_schedules_and_transports_are_the_same_on_both_engines(gateway, gateway_trace, kw):
    assert_same(gateway_trace, gateway, policy="elephant", rows=512, **kw)


def _counting(monkeypatch, *names: str) -> dict[str, list[tuple[object, ...]]]:
    """Calls of these Host methods from now on, with their arguments, by name."""
    calls: dict[str, list[tuple[object, ...]]] = {name: [] for name in names}
    for name in names:
        original = getattr(Host, name)

        def counted(self, *args, _original=original, _calls=calls[name]):
            _calls.append(args)
            return _original(self, *args)

        monkeypatch.setattr(Host, name, counted)
    return calls


def test_offers_rows_and_returns_of_the_pnic_run_inside_the_pass(gateway, gateway_trace,
                                                                 monkeypatch):
    """With the PNIC in this process at latency 0, the fast path's passes move a flow the
    policy wants down to the PNIC, run its later rows with the PNIC's entry, and take the entry
    back at its FIN, without stopping (no second pass of the PNIC, no offer or return in
    Python); a recall first runs the rest of the segment's rows of a flow that moved down in it
    (the entry comes back with them, as from a second pass). All bit for bit as the reference
    engine, which offers, answers and returns through the channel and makes the second
    passes."""
    calls = _counting(monkeypatch, "_pnic_again", "_run_ahead", "_moved_down", "_took_back",
                      "_passed", "_hand_back", "_offer")
    for capacity in (None, 2):
        kw = {"policy": "elephant", "rows": 512, "capacity": capacity}
        ref = run(gateway_trace, gateway, engine="reference", **kw)
        assert calls["_pnic_again"]  # the reference's second passes
        for c in calls.values():
            c.clear()
        fast = _same_as(ref, run(gateway_trace, gateway, **kw))
        stats = fast.host.stats
        assert stats.offloads_to_pnic > 10 and stats.returned["closed"] > 10
        passed = [p for (p,) in calls["_passed"]]
        assert len(calls["_moved_down"]) + sum(len(p.keys) for p in passed) + len(
            calls["_offer"]) >= stats.offloads_to_pnic
        # a flow that stays down past its pass has a shadow; one that moves down and comes
        # back in one pass has none: both happen, and each pair is heard at both ends
        assert calls["_moved_down"] and calls["_took_back"] and any(p.keys for p in passed)
        for p in passed:
            assert len(p.keys) == len(p.expires) == len(p.down_rows) == len(p.back_rows) == len(
                p.backoffs)
            assert all(d < b for d, b in zip(p.down_rows, p.back_rows, strict=True))
        if capacity is None:  # room for every flow: each offer but the handoff's in the pass
            assert len(calls["_offer"]) == 1 and not calls["_pnic_again"]
            assert not calls["_run_ahead"] and "room" not in stats.returned
        else:  # a full PNIC: offers refused in Python, and recalls that run rows first
            assert stats.returned["room"] > 5 and stats.refused["full"] > 5
            assert calls["_pnic_again"]


def test_a_handoff_leaves_the_machines_cached_flows_in_their_rows(gateway, gateway_trace,
                                                                 monkeypatch):
    """The machine's handoff sends every flow's entry, its cached flows' read from their rows;
    the VNIC writes each of those back over its row, which is the VNIC's from then on: no row
    comes back to Python as a `Flow` and none moves. Still the reference's results."""
    seen: list[tuple[dict[int, FlowKey], dict[int, FlowKey], int]] = []
    handoff = Host.handoff
    pull = Fastpath.pull

    def no_pull(self, slot):
        raise AssertionError(f"row {slot} pulled back into Python during the handoff")

    def watched(self, m, now):
        fp = self.fastpath
        if fp is None:  # the reference engine's
            return handoff(self, m, now)
        table = self.machines[m].chain.flows
        before = {slot: Flow.from_bytes(fp.table.get(slot)).key
                  for slot, t in enumerate(fp.tables) if t is table}
        monkeypatch.setattr(Fastpath, "pull", no_pull)
        try:
            handoff(self, m, now)
        finally:
            monkeypatch.setattr(Fastpath, "pull", pull)
        vnic_table = self.vnic.chains[m].flows
        after = {slot: Flow.from_bytes(fp.table.get(slot)).key
                 for slot, t in enumerate(fp.tables) if t is vnic_table}
        owners = {int(fp.entries["owner"][slot]) for slot in after}
        seen.append((before, after, len(owners - {int(Tier.VNIC)})))
        return None

    monkeypatch.setattr(Host, "handoff", watched)
    # a late first offer: the machine has many flows to hand over by then
    late = dataclasses.replace(gateway, offload=dataclasses.replace(
        gateway.offload, elephant_packets=1000, elephant_bytes=10**7))
    ref = run(gateway_trace, late, engine="reference", policy="elephant", rows=4096)
    _same_as(ref, run(gateway_trace, late, policy="elephant", rows=4096))
    (before, after, foreign), = seen
    assert len(before) > 10 and foreign == 0
    # the same flows in the same rows (and those the machine held as `Flow`s, cached anew)
    assert before.items() <= after.items()


@pytest.mark.parametrize(("seed", "p", "capacity", "policy"), [
    (1, 0.5, 64, "elephant"), (2, 0.2, 2, "elephant"), (3, 0.5, 2, "always"),
    (4, 0.8, 64, "always")])
def test_the_pnic_in_the_pass_may_stop_at_any_moment(gateway, gateway_trace, monkeypatch,
                                                     seed, p, capacity, policy):
    """Whenever the pass may not run the PNIC's rows (something of the VNIC's held or in
    flight: here at random moments), the PNIC's first pass, the second passes and the
    catch-up of the rows left (`Host._catch_up`) take over: still the reference's results."""
    draw = random.Random(seed)
    in_pass = Host._pnic_in_pass
    caught: list[bool] = []
    catch_up = Host._catch_up

    def sometimes(self):
        return in_pass(self) and draw.random() >= p

    def counted(self):
        was = self._all_in_pass
        catch_up(self)
        caught.append(was and not self._all_in_pass)  # it ran the PNIC over the rows left

    monkeypatch.setattr(Host, "_pnic_in_pass", sometimes)
    monkeypatch.setattr(Host, "_catch_up", counted)
    kw = {"policy": policy, "rows": 512, "capacity": capacity}
    ref = run(gateway_trace, gateway, engine="reference", **kw)
    caught.clear()
    _same_as(ref, run(gateway_trace, gateway, **kw))
    assert any(caught)  # rows left to catch up with, every PNIC flow's


@pytest.mark.parametrize("room", [1, 2, 5])
def test_a_pass_full_of_offers_and_returns_stops_and_goes_on(gateway, gateway_trace, room,
                                                             monkeypatch):
    """A pass notes a bounded number of offers and returns for the host; past that it stops
    as it would without them, and the next pass goes on: the same as the reference engine."""
    heard: list[int] = []
    heard_of, init = Fastpath._heard, Fastpath.__init__

    def counted(self, n):
        heard.append(n)
        return heard_of(self, n)

    def small(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.notes_room(room)

    monkeypatch.setattr(Fastpath, "_heard", counted)
    monkeypatch.setattr(Fastpath, "__init__", small)
    assert_same(gateway_trace, gateway, policy="always", rows=4096)
    assert max(heard) == room and sum(heard) > 10 * room


@pytest.mark.parametrize("policy", ["always", "elephant"])
def test_the_demo_host_is_the_same_on_both_engines(tmp_path, policy):
    """Two machines on their VNIC, one zone each: within one pass a flow is opened, moved down
    to the PNIC and taken back, and its row freed and taken again by another zone's flow;
    every row still counts at its own table (the dumps list every flow)."""
    cfg = parse_config(tomllib.loads(demo_config_text()), "demo.toml")
    path = tmp_path / "demo.pcap"
    n = build_trace(path, cfg, 0.03)
    data = to_dict(cfg)
    for machine in data["machine"]:
        machine["start"] = "vnic"
    fast = assert_same(path, parse_config(data), policy=policy, rows=4096, dump_at=n // 4)
    assert fast.host.stats.offloads_to_pnic > 10 and fast.dumps[0]


@pytest.mark.parametrize("policy", ["never", "elephant"])
def test_real_capture_is_the_same_on_both_engines(policy):
    cfg = load_config(REAL / "lb-gateway.toml")
    fast = assert_same(REAL / "replay_input.pcap", cfg, policy=policy, rows=1024)
    if policy == "never":
        _ran_compiled(fast)


@pytest.mark.parametrize("conntrack", [
    {"max": 40}, {"tcp_timeout_established": 3, "udp_timeout_stream": 2, "udp_timeout": 1},
    {"tcp_be_liberal": 1, "tcp_max_retrans": 1},
], ids=str)
def test_tuned_and_bounded_tables_are_the_same_on_both_engines(tmp_path, conntrack):
    host = {**GATEWAY_HOST, "conntrack": conntrack}
    cfg = parse_config(host, "tuned gateway")
    path = tmp_path / "t.pcap"
    generate(TraceSpec(flows=200, duration_s=30.0, seed=9, elephants=3, udp_share=0.3,
                       clients=CLIENTS, servers=SERVERS, gateway=cfg), path)
    for policy in ("never", "elephant"):
        assert_same(path, cfg, policy=policy, rows=256)


def test_a_routing_machine_is_the_same_on_both_engines(tmp_path):
    machine = {**GATEWAY_HOST["machine"][0], "forwarding": "router"}
    cfg = parse_config({**GATEWAY_HOST, "machine": [machine]}, "router")
    path = tmp_path / "r.pcap"
    generate(TraceSpec(flows=100, duration_s=10.0, seed=2, elephants=2, clients=CLIENTS,
                       servers=SERVERS, gateway=cfg), path)
    _ran_compiled(assert_same(path, cfg, policy="never", rows=256))


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), rows=st.sampled_from([1, 7, 64, 1000]),
       policy=st.sampled_from(["never", "elephant", "always"]),
       attack=st.sampled_from(["none", "syn-flood", "out-of-window"]),
       gap=st.booleans())
# an RST out of the window, which the PNIC punts with its entry and the fast path ignores: the
# flow, taken back into a fast-path row, is moved down again later in the same pass
@example(seed=0, rows=64, policy="always", attack="out-of-window", gap=False)
def test_any_generated_trace_is_the_same_on_both_engines(tmp_path_factory, seed, rows, policy,
                                                         attack, gap):
    cfg = parse_config(GATEWAY_HOST, "gateway")
    path = tmp_path_factory.mktemp("h") / "t.pcap"
    # gap: flows spread over 10 minutes, past the UDP and unreplied timeouts
    generate(TraceSpec(flows=60, duration_s=600.0 if gap else 5.0, seed=seed, elephants=2,
                       ipv6_share=0.3, icmp_share=0.05, udp_share=0.3, attack=attack,
                       clients=CLIENTS, servers=SERVERS, gateway=cfg), path)
    assert_same(path, cfg, policy=policy, rows=rows)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), rows=st.sampled_from([1, 7, 64, 1000]),
       policy=st.sampled_from(["elephant", "always"]),
       attack=st.sampled_from(["none", "syn-flood", "out-of-window"]),
       gap=st.booleans(), start=st.sampled_from(["machine", "vnic"]))
def test_a_firewall_alone_is_the_same_on_both_engines(tmp_path_factory, seed, rows, policy,
                                                      attack, gap, start):
    """A machine behind its firewall alone: at its VNIC a new flow looks at nothing of the
    PNIC's, so the pass opens new flows there while the PNIC holds others whatever a sync
    would do (`vnic.syncs_first`); all of it as the reference engine."""
    cfg = parse_config({**FIREWALL_HOST, "machine": [{**FIREWALL_HOST["machine"][0],
                                                      "start": start}]}, "firewall")
    path = tmp_path_factory.mktemp("fw") / "t.pcap"
    generate(TraceSpec(flows=60, duration_s=600.0 if gap else 5.0, seed=seed, elephants=2,
                       ipv6_share=0.3, icmp_share=0.05, udp_share=0.3, attack=attack,
                       clients=CLIENTS, servers=SERVERS), path)
    assert_same(path, cfg, policy=policy, rows=rows)


_RST_ENDINGS = ["refused", "refused-bare", "client-gives-up", "abort", "abort-bare",
                "abort-server", "out-of-window", "below-ack", "seq-zero", "after-fin", "none"]


def _rst_trace(path: Path, draw: st.DrawFn, connections: int) -> None:
    """Connections from the firewall host's machine, each ending one of _RST_ENDINGS ways
    (an RST answering the SYN, with ACK or without, or the client's before any answer; an RST
    of either side in the window, out of it, below the other side's ACK, at seq 0, after a
    FIN), some followed by more of their packets, spread over 40 s (sweeps every 10 s)."""
    frames: list[tuple[int, int, bytes]] = []
    for n in range(connections):
        c_addr, s_addr = bytes((10, 0, 0, 1 + n % 50)), bytes((198, 51, 100, 1 + n % 3))
        c_port = 20000 + n
        c_isn, s_isn = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        c_nxt, s_nxt = c_isn + 1, s_isn + 1
        out: list[tuple[bool, int, int, int, int]] = []  # from the client, seq, ack, flags, len
        ending = draw(st.sampled_from(_RST_ENDINGS))
        out.append((True, c_isn, 0, TCP_SYN, 0))
        if ending == "refused":
            out.append((False, 0, c_nxt, TCP_RST | TCP_ACK, 0))
        elif ending == "refused-bare":
            out.append((False, draw(st.sampled_from([0, s_isn])), 0, TCP_RST, 0))
        elif ending == "client-gives-up":
            out.append((True, c_nxt, 0, TCP_RST, 0))
        else:
            size = draw(st.sampled_from([0, 100, 1400]))
            out += [(False, s_isn, c_nxt, TCP_SYN | TCP_ACK, 0), (True, c_nxt, s_nxt, TCP_ACK, 0),
                    (True, c_nxt, s_nxt, TCP_ACK | TCP_PSH, size),
                    (False, s_nxt, c_nxt + size, TCP_ACK, 0)]
            c_nxt += size
            out.append({
                "abort": (True, c_nxt, s_nxt, TCP_RST | TCP_ACK, 0),
                "abort-bare": (True, c_nxt, 0, TCP_RST, 0),
                "abort-server": (False, s_nxt, c_nxt, TCP_RST | TCP_ACK, 0),
                "out-of-window": (True, c_nxt + 2**31, s_nxt, TCP_RST, 0),
                "below-ack": (False, s_nxt - draw(st.integers(1, 5000)), c_nxt,
                              TCP_RST | TCP_ACK, 0),
                "seq-zero": (True, 0, s_nxt, TCP_RST | TCP_ACK, 0),
                "after-fin": (True, c_nxt, s_nxt, TCP_FIN | TCP_ACK, 0),
                "none": (True, c_nxt, s_nxt, TCP_ACK, 0),
            }[ending])
            if ending == "after-fin":
                out.append((False, s_nxt, c_nxt + 1, TCP_RST | TCP_ACK, 0))
        for _ in range(draw(st.integers(0, 2))):  # more after the end: a late ACK, another RST
            out.append((True, c_nxt, s_nxt,
                        draw(st.sampled_from([TCP_ACK, TCP_RST, TCP_RST | TCP_ACK])), 0))
        t = draw(st.integers(0, 40 * 10**9))
        for from_client, seq, ack, flags, size in out:
            ends = (c_addr, s_addr, c_port, 80)
            src, dst, sport, dport = ends if from_client else (s_addr, c_addr, 80, c_port)
            t += draw(st.integers(1, 3 * 10**9 if flags & TCP_RST else 10**7))
            frames.append((t, n, tcp_frame(src=src, dst=dst, sport=sport, dport=dport,
                                           seq=seq % 2**32, ack=ack % 2**32, flags=flags,
                                           window=65535, payload_len=size)))
    with PcapWriter(path) as w:
        for t, _, frame in sorted(frames, key=lambda x: x[:2]):
            w.write(10**9 + t, frame)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), rows=st.sampled_from([1, 16, 4096]),
       policy=st.sampled_from(["never", "elephant"]),
       conntrack=st.sampled_from([{}, {"tcp_ignore_invalid_rst": True},
                                  {"tcp_be_liberal": True}]))
def test_rst_heavy_traces_are_the_same_on_both_engines(tmp_path_factory, data, rows, policy,
                                                       conntrack):
    """RSTs of every kind the fast path now runs (tests/test_fastpath_tcp.py holds one packet
    to the reference; this, whole connections, the sweeps and a dump between them)."""
    cfg = parse_config({**FIREWALL_HOST, "conntrack": conntrack}, "rst")
    path = tmp_path_factory.mktemp("rst") / "t.pcap"
    _rst_trace(path, data.draw, 120)
    fast = assert_same(path, cfg, policy=policy, rows=rows,
                       dump_at=data.draw(st.integers(100, 400)))
    if rows > 1 and policy == "never":
        _ran_compiled(fast)


# -- the table itself ---------------------------------------------------------------------------

def _fastpath() -> Fastpath:
    cfg = parse_config(FIREWALL_HOST, "firewall")
    return Fastpath(cfg, Classifier(cfg.machines), capacity=2)


def _flow(n: int) -> Flow:
    key = FlowKey(4, 6, 0, b"\x0a\x00\x00\x01", b"\xc6\x33\x64\x01", 1000 + n, 80)
    tcp = TcpConn()
    tcp.state = TcpState.ESTABLISHED
    return Flow(key=key, xlat=key, machine=0, chain=1, tcp=tcp, expires=10**12 + n,
                owner=Tier.MACHINE, packets=[n, n], bytes=[40 * n, 40 * n])


def test_a_cached_flow_comes_back_exact_and_the_table_grows():
    fp = _fastpath()
    table = FlowTable()
    table.use_cache(fp)
    flows = [_flow(n) for n in range(9)]  # more than the capacity: the table doubles
    exact = [f.to_bytes() for f in flows]
    for f in flows:
        table.add(f)
        assert fp.cacheable(f, Tier.MACHINE)
        fp.cache(f, table, -1, bounded=False)
    assert fp.live == 9 and fp.capacity >= 9 and len(table) == 9 and table.cached == 9
    for f, raw in zip(flows, exact, strict=True):
        hit = table.get(f.reply_key)  # a lookup finds it in the fast path, as a new Flow
        assert hit is not None and hit[1] == 1 and hit[0] is not f
        assert hit[0].to_bytes() == raw
        assert table.get(f.key) == (hit[0], 0)
    assert fp.live == 0 and table.cached == 0 and len(table) == 9


def test_expired_cached_flows_are_swept_and_live_ones_stay():
    fp = _fastpath()
    table = FlowTable()
    table.use_cache(fp)
    old, young = _flow(1), _flow(2)
    old.expires, young.expires = 100, 10**12
    for f in (old, young):
        table.add(f)
        fp.cache(f, table, -1, bounded=False)
    assert [f.key for f in table.sweep(200)] == [old.key]
    assert len(table) == 1 and table.cached == 1  # the live one is still cached
    assert [f.key for f in table] == [young.key] and table.cached == 0


def test_an_rst_before_any_reply_leaves_its_cached_flow_to_the_next_sweep():
    """The server's RST answering a SYN destroys the conntrack (chain.process_flow: it expires
    at the RST's time): the pass runs it, and a sweep at that time finds the flow, as it finds
    the `Flow` Python leaves (the table's floor is not min_timeout after the pass)."""
    fp = _fastpath()
    table = FlowTable()
    table.use_cache(fp)
    flow = _flow(1)
    assert flow.tcp is not None
    flow.tcp.state = TcpState.SYN_SENT
    table.add(flow)
    fp.cache(flow, table, -1, bounded=False)
    now = 5 * 10**9
    k = flow.reply_key
    frame = tcp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport, seq=7000, ack=1,
                      flags=TCP_RST | TCP_ACK, window=0)
    res = BatchResults.over(0, np.frombuffer(frame, np.uint8).copy(), np.zeros(1, np.int64),
                            np.array([len(frame)], np.uint32), np.array([len(frame)], np.uint32),
                            np.ones(1, np.uint16), np.array([now], np.int64))
    assert fp.run(res, res.ts, np.zeros(1, np.int64), 0, 10**18)[:2] == (1, DONE)
    assert res.verdict[0] == Verdict.FORWARD and fp.ran == 1  # run compiled, not punted
    assert [f.key for f in table.sweep(now)] == [flow.key]
    assert len(table) == 0 and fp.live == 0


def test_a_bounded_table_caches_only_assured_flows():
    fp = _fastpath()
    table = FlowTable(buckets=8)
    table.use_cache(fp)
    f = _flow(1)
    table.add(f)
    fp.cache(f, table, -1, bounded=True)
    assert table.cached == 0 and fp.live == 0
    f.status |= Status.ASSURED
    fp.cache(f, table, -1, bounded=True)
    assert table.cached == 1 and fp.live == 1
    assert table.early_drop(f.key, int(Tier.MACHINE)) == []  # an assured flow stays
    assert table.get(f.key) is not None and table.cached == 0


@pytest.mark.parametrize("dump", [False, True], ids=["", "dump"])
def test_short_connections_leave_python_their_ingress_syns_only(gateway, tmp_path,
                                                                monkeypatch, dump):
    """An egress SYN opens its flow compiled (its port kept by SNAT, its rule judged there);
    the handshake's answer, data, FIN, RST and the close run compiled too; a packet that
    missed the table before a flow was cached is asked for again (not left to Python, which
    would pull the flow back): of the TCP packets, Python decides the ingress SYNs (the load
    balancer picks their backend) and the few egress SYNs whose port is taken, and no RST.
    A flow dump mid-trace changes none of it: the flows it lists go back to the fast path,
    which goes on opening flows."""
    path = tmp_path / "short.pcap"
    generate(TraceSpec(flows=200, duration_s=10.0, seed=3, elephants=0, udp_share=0.0,
                       icmp_share=0.0, clients=CLIENTS, servers=SERVERS, gateway=gateway), path)
    classifier = Classifier(gateway.machines)
    syn = [0, 0]  # by direction
    rst = other = total = 0
    with open_trace(path) as reader:
        for f in reader:
            total += 1
            pkt = parse(bytearray(f.data), f.linktype, f.wire_len)
            if pkt.proto != PROTO_TCP:
                other += 1
            elif pkt.flags & TCP_RST:
                rst += 1
            elif pkt.flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                syn[classifier.classify(pkt)[1]] += 1
    decided: list[int] = []  # the flags of the TCP packets the compiled run leaves Python
    process = Host.process

    def counted(host: Host, index: int, ts: int, data: bytes, linktype: int,
                wire_len: int) -> None:
        pkt = parse(bytearray(data), linktype, wire_len)
        if host.fastpath is not None and pkt.proto == PROTO_TCP:
            decided.append(pkt.flags)
        process(host, index, ts, data, linktype, wire_len)

    monkeypatch.setattr(Host, "process", counted)
    fast = assert_same(path, gateway, policy="never", rows=4096,
                       dump_at=total // 3 if dump else None)
    fp = fast.host.fastpath
    assert fp is not None
    assert not dump or (fast.dumps and fast.dumps[0]), "no dump was taken"
    egress, ingress = syn
    assert fp.opened_all >= egress * 0.95, (fp.opened_all, syn)
    assert rst > 0 and not [f for f in decided if f & TCP_RST], (rst, decided)
    assert len(decided) <= ingress + egress // 20, (len(decided), syn)
    in_python = total - fp.ran
    assert in_python <= other + ingress + egress // 20, (in_python, rst, other, syn)


def test_offloaded_short_connections_leave_python_no_more_than_never(gateway, tmp_path,
                                                                    monkeypatch):
    """Under the elephant policy a connection moves down mid-stream and its FIN hands it back:
    the row after an offer, and the FIN the PNIC hands back with its entry, run compiled once
    the answer or the entry has taken effect, not in Python. Python decides no more packets
    than it does when nothing is offloaded, but for the SYNs: while the PNIC holds flows, a
    new flow's NAT check at the VNIC syncs with it first, which only Python does."""
    path = tmp_path / "short.pcap"
    generate(TraceSpec(flows=120, duration_s=4.0, seed=9, elephants=0, udp_share=0.0,
                       icmp_share=0.0, clients=CLIENTS, servers=SERVERS, gateway=gateway), path)
    decided: list[int] = []
    process = Host.process

    def counted(host: Host, index: int, ts: int, data: bytes, linktype: int,
                wire_len: int) -> None:
        pkt = parse(bytearray(data), linktype, wire_len)
        if pkt.proto != PROTO_TCP or pkt.flags & (TCP_SYN | TCP_ACK) != TCP_SYN:
            decided.append(index)
        process(host, index, ts, data, linktype, wire_len)

    monkeypatch.setattr(Host, "process", counted)
    run(path, gateway, policy="never", rows=4096)
    never = len(decided)
    decided.clear()
    offloaded = run(path, gateway, policy="elephant", rows=4096)
    stats = offloaded.host.stats
    assert stats.offloads_to_pnic > 10 and stats.returned.get("closed", 0) > 10
    assert len(decided) <= never, (len(decided), never)


def _held(fp: Fastpath, key: FlowKey) -> bool:
    """Is `key` in the fast path's index of the keys Python holds?"""
    from flowshift.tiers import _pnic_index as ki
    from flowshift.tiers._pnic_index import key_words

    return ki.lookup(fp._held_keys, fp._held_vals, *key_words(key)) != ki.EMPTY


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(["add", "cache", "pull", "remove", "hold",
                                                 "forget"]),
                                st.integers(0, 1), st.integers(0, 3)), max_size=60))
@example(steps=[("add", 0, 1), ("add", 1, 1), ("remove", 1, 1), ("forget", 0, 0)])
def test_the_index_of_held_keys_is_every_key_tables_hold_as_flows(steps):
    """Flows come and go in two tables, as `Flow`s and cached: after `hold`, the index of the
    keys Python holds is exactly the union of both tables' keys (a key two tables hold
    leaves it only when both let it go), and a table forgotten."""
    fp = _fastpath()
    tables = [FlowTable(), FlowTable()]
    for t in tables:
        t.use_cache(fp)
    alive = [True, True]
    pool = [_flow(n) for n in range(4)]
    for op, t, n in steps:
        table = tables[t]
        if not alive[t]:
            continue
        flow = pool[n]
        if op == "add" and table.get(flow.key) is None and table.get(flow.reply_key) is None:
            flow = pool[n] = dataclasses.replace(flow)  # a new Flow of the same key
            table.add(flow)
        elif op == "cache" and table.holds(flow):
            fp.cache(flow, table, -1, bounded=False)
        elif op == "pull":
            hit = table.get(flow.key)  # back from the fast path, if it is cached there
            if hit is not None:
                pool[n] = hit[0]
        elif op == "remove" and table.holds(flow):
            table.remove(flow)
        elif op == "forget":
            fp.forget(table)  # the table is not used again
            alive[t] = False
        for i, other in enumerate(tables):
            if alive[i]:
                fp.hold(other)
        if op == "hold":
            continue
        for f in pool:
            for key in (f.key, f.reply_key):
                want = any(alive[i] and tables[i].has_key(key) for i in range(2))
                assert _held(fp, key) == want, (op, key)


def test_the_index_of_held_keys_grows_and_empties():
    """Past its room the index is built anew, with every key; emptied, it holds none."""
    fp = _fastpath()
    table = FlowTable()
    table.use_cache(fp)
    flows = [_flow(n) for n in range(40)]
    for f in flows:
        table.add(f)
    fp.hold(table)
    assert len(fp._held_vals) >= 4 * 80  # grown: at most a quarter full
    assert all(_held(fp, k) for f in flows for k in (f.key, f.reply_key))
    for f in flows:
        table.remove(f)
    fp.hold(table)
    assert not any(_held(fp, k) for f in flows for k in (f.key, f.reply_key))
