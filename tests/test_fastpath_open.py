"""Flows opened by the fast path (tiers/_fastpath_open.py) against the reference engine.

A first packet the fast path opens a flow for must give the verdict, reason, rule, bytes and
tier the reference engine gives, and leave the very entry Python would have made; one it may
not open (a port SNAT must search for, a hashed address, a load balancer's pick, a routing
machine's last hop, a bounded table, a table holding flows in Python) must reach Python
untouched. Hypothesis draws the chains (firewall rules of both families, SNAT rules with and
without port ranges, one address or several, ICMP types) and the first packets (TCP SYNs, UDP,
ICMP echo requests and replies, both directions, ports and identifiers that clash).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.config import parse_config
from flowshift.packet.build import icmp_echo_frame, tcp_frame, udp_frame
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN, TCP_URG
from hosttools import Run, run
from tracetools import write_pcap

CLIENTS = [bytes([10, 0, 0, i]) for i in (2, 3, 200)] + [
    bytes.fromhex("fd00000000000000000000000000000" + c) for c in "23"]
SERVERS = [bytes([198, 51, 100, 1]), bytes([203, 0, 113, 9]),
           bytes.fromhex("20010db8000000000000000000000001")]
PUBLIC = ["192.0.2.1", "192.0.2.2", "2001:db8:ffff::1"]
NETS = [None, "10.0.0.0/24", "10.0.0.0/25", "198.51.100.0/24", "0.0.0.0/0", "fd00::/64",
        "2001:db8::/32"]

rules = st.lists(st.fixed_dictionaries(
    {"action": st.sampled_from(["allow", "drop"])},
    optional={"direction": st.sampled_from(["egress", "ingress"]),
              "proto": st.sampled_from(["tcp", "udp", "any", "icmp", "icmpv6"]),
              "src": st.sampled_from(NETS[1:]),
              "dst": st.sampled_from(NETS[1:]),
              "dst_port": st.lists(st.sampled_from([80, 53, "1000-2000", 443, "50000-65535"]),
                                   min_size=1, max_size=3),
              "icmp_type": st.lists(st.sampled_from([0, 8, 128, 129, 3, 255]), min_size=1,
                                    max_size=3)}), max_size=5)
snats = st.lists(st.fixed_dictionaries(
    {"source": st.sampled_from(["10.0.0.0/24", "10.0.0.0/25", "fd00::/64"]),
     "to": st.sampled_from(["192.0.2.1", "192.0.2.1-192.0.2.2", "2001:db8:ffff::1"])},
    optional={"ports": st.sampled_from(["1024-65535", "40000-40003", "2000-2001"])}),
    min_size=1, max_size=3)


def _valid_rule(rule: dict[str, object]) -> bool:
    """A rule the config accepts: one family (ICMP's own), ports only for tcp / udp / any,
    ICMP types only for icmp / icmpv6 / any and never with ports."""
    families = {":" in str(rule[k]) for k in ("src", "dst") if k in rule}
    proto = rule.get("proto", "any")
    if proto == "icmp":
        families.add(False)
    elif proto == "icmpv6":
        families.add(True)
    if len(families) > 1:
        return False
    if "dst_port" in rule and proto not in ("tcp", "udp", "any"):
        return False
    return "icmp_type" not in rule or (proto in ("icmp", "icmpv6", "any")
                                       and "dst_port" not in rule)


def _valid_snat(rule: dict[str, str]) -> bool:
    return (":" in rule["source"]) == (":" in rule["to"])


@st.composite
def hosts(draw: st.DrawFn) -> dict[str, object]:
    services = ["count"]
    machine: dict[str, object] = {
        "name": "gw", "addresses": ["10.0.0.0/24", "fd00::/64"], "public": PUBLIC,
        "forwarding": draw(st.sampled_from(["bridge", "router"]))}
    if draw(st.booleans()):
        services.insert(0, "firewall")
        machine["firewall"] = {"default": draw(st.sampled_from(["allow", "drop"])),
                               "rule": [r for r in draw(rules) if _valid_rule(r)]}
    snat = [r for r in draw(snats) if _valid_snat(r)]
    if snat and draw(st.booleans()):
        services.insert(-1, "nat")
        machine["nat"] = {"snat": snat}
    if draw(st.sampled_from([False, False, True])):  # ingress flows: Python's
        services.insert(-1, "lb")
        machine["lb"] = [{"proto": "tcp", "vip": "192.0.2.1:80",
                          "backends": ["10.0.0.11:8080", "10.0.0.12:8080"]}]
    machine["services"] = services
    host: dict[str, object] = {"machine": [machine]}
    if draw(st.sampled_from([False, False, False, True])):  # bounded: Python's
        host["conntrack"] = {"max": draw(st.sampled_from([3, 1000]))}
    return host


@st.composite
def first_packets(draw: st.DrawFn) -> list[bytes]:
    """First packets (and a few answers and repeats) of both families and directions."""
    frames = []
    for _ in range(draw(st.integers(1, 24))):
        v6 = draw(st.booleans())
        client = draw(st.sampled_from(CLIENTS[3:] if v6 else CLIENTS[:3]))
        server = draw(st.sampled_from(SERVERS[2:] if v6 else SERVERS[:2]))
        sport = draw(st.sampled_from([40000, 40001, 2000, 1500, 700, 65535]))
        dport = draw(st.sampled_from([80, 53, 443, 1500, 40000]))
        if draw(st.sampled_from([False, False, True])):  # ingress: from the wire
            src, dst = server, draw(st.sampled_from([client, bytes([192, 0, 2, 1])]
                                                    if not v6 else [client]))
            sport, dport = dport, sport
        else:
            src, dst = client, server
        ttl = draw(st.sampled_from([64, 64, 64, 1]))
        kind = draw(st.sampled_from(["syn", "syn", "synurg", "udp", "ack", "synfin", "echo",
                                     "echo", "echoreply"]))
        if kind in ("echo", "echoreply"):  # the identifier: both "ports"
            frames.append(icmp_echo_frame(src=src, dst=dst, ident=sport,
                                          seq=draw(st.integers(0, 3)),
                                          reply=kind == "echoreply", ttl=ttl))
            continue
        if kind == "udp":
            frames.append(udp_frame(src=src, dst=dst, sport=sport, dport=dport,
                                    payload=b"q" * draw(st.integers(0, 40)), ttl=ttl))
            continue
        flags = {"syn": TCP_SYN, "synurg": TCP_SYN | TCP_URG, "ack": TCP_ACK | TCP_PSH,
                 "synfin": TCP_SYN | TCP_FIN}[kind]
        options = draw(st.sampled_from([b"", b"\x01\x03\x03\x07", b"\x04\x02\x01\x01",
                                        b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x0e\x00\x00"]))
        frames.append(tcp_frame(src=src, dst=dst, sport=sport, dport=dport,
                                seq=draw(st.integers(0, 2**32 - 1)), ack=0, flags=flags,
                                window=draw(st.sampled_from([0, 1, 65535])), options=options,
                                payload=b"x" * draw(st.integers(0, 3)), ttl=ttl))
    return frames


def _same(path: Path, cfg, rows: int) -> Run:
    ref = run(path, cfg, engine="reference", policy="never", rows=rows)
    fast = run(path, cfg, engine="compiled", policy="never", rows=rows)
    assert [(x.index, int(x.verdict), x.reason, x.tier, x.data) for x in fast.results] == [
        (x.index, int(x.verdict), x.reason, x.tier, x.data) for x in ref.results]
    assert dataclasses.asdict(fast.host.stats) == dataclasses.asdict(ref.host.stats)
    # every flow, as the entry bytes either engine left it with
    fast_flows = sorted(f.to_bytes() for f in fast.host.machines[0].chain.flows)
    ref_flows = sorted(f.to_bytes() for f in ref.host.machines[0].chain.flows)
    assert fast_flows == ref_flows
    return fast


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(host=hosts(), frames=first_packets(), rows=st.sampled_from([1, 5, 64]),
       step=st.sampled_from([1_000, 3_000_000_000]))
def test_first_packets_open_the_same_flows_on_both_engines(tmp_path_factory, host, frames,
                                                            rows, step):
    cfg = parse_config(host, "drawn host")
    path = write_pcap(tmp_path_factory.mktemp("open") / "t.pcap",
                      [(10**9 + i * step, f) for i, f in enumerate(frames)])
    _same(path, cfg, rows)


GATEWAY = {"machine": [{
    "name": "gw", "addresses": ["10.0.0.0/24"], "public": ["192.0.2.1"],
    "services": ["firewall", "nat", "count"],
    "firewall": {"default": "drop", "rule": [{"action": "allow", "direction": "egress"}]},
    "nat": {"snat": [{"source": "10.0.0.0/24", "to": "192.0.2.1", "ports": "1024-65535"}]}}]}


def _syns(tmp_path: Path, pairs: list[tuple[bytes, int]]) -> Path:
    frames = [tcp_frame(src=c, dst=SERVERS[0], sport=p, dport=80, seq=7, ack=0, flags=TCP_SYN,
                        window=65535) for c, p in pairs]
    return write_pcap(tmp_path / "s.pcap", [(10**9 + i * 1000, f) for i, f in enumerate(frames)])


def test_a_kept_port_opens_compiled_and_a_taken_one_goes_to_python(tmp_path):
    """Two clients with one source port: the first keeps it (opened compiled); the second's
    translated tuple is taken, SNAT searches the range, which only Python does."""
    cfg = parse_config(GATEWAY, "gateway")
    path = _syns(tmp_path, [(CLIENTS[0], 40000), (CLIENTS[1], 40000), (CLIENTS[1], 40001)])
    fast = _same(path, cfg, rows=64)
    fp = fast.host.fastpath
    assert fp is not None and fp.opened_all == 2
    ports = {f.xlat.sport for f in fast.host.machines[0].chain.flows}
    assert len(ports) == 3 and {40000, 40001} <= ports


def test_a_bounded_table_opens_nothing_compiled(tmp_path):
    """nf_conntrack_max: a new flow may have to make room (early drop): Python's."""
    cfg = parse_config({**GATEWAY, "conntrack": {"max": 10}}, "bounded")
    fast = _same(_syns(tmp_path, [(CLIENTS[0], 40000 + i) for i in range(5)]), cfg, rows=64)
    assert fast.host.fastpath is not None and fast.host.fastpath.opened_all == 0


def test_a_pool_of_addresses_is_python_s(tmp_path):
    """The address of a pool is picked by a hash (BLAKE2b) only Python computes."""
    machine = {**GATEWAY["machine"][0], "public": ["192.0.2.1", "192.0.2.2"],
               "nat": {"snat": [{"source": "10.0.0.0/24", "to": "192.0.2.1-192.0.2.2"}]}}
    cfg = parse_config({"machine": [machine]}, "pool")
    fast = _same(_syns(tmp_path, [(CLIENTS[0], 40000 + i) for i in range(5)]), cfg, rows=64)
    assert fast.host.fastpath is not None and fast.host.fastpath.opened_all == 0


def test_a_new_flow_whose_reply_is_a_cached_flows_key_takes_it_as_without_a_cache(tmp_path):
    """A server's SYN to a client's very port pair: the new flow's reply key is the key of the
    client's cached flow (SNAT'd). Without a cache the new flow takes that key over; the
    cached flow must come back to Python first so that it loses the key the same way, and the
    client's next SYN is then the new flow's reply, on both engines (hypothesis found it)."""
    machine = {"name": "gw", "addresses": ["10.0.0.0/24"], "public": ["192.0.2.1"],
               "services": ["nat", "count"],
               "nat": {"snat": [{"source": "10.0.0.0/24", "to": "192.0.2.1"}]}}
    cfg = parse_config({"machine": [machine]}, "snat")
    client, server = CLIENTS[0], SERVERS[0]

    def syn(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
        return tcp_frame(src=src, dst=dst, sport=sport, dport=dport, seq=0, ack=0,
                         flags=TCP_SYN, window=0)

    frames = [syn(client, server, 40000, 80), syn(server, client, 80, 40000),
              syn(client, server, 40000, 80)]
    path = write_pcap(tmp_path / "t.pcap", [(10**9 + i * 1000, f) for i, f in enumerate(frames)])
    _same(path, cfg, rows=1)
    _same(path, cfg, rows=64)


FIREWALL = {"machine": [{
    "name": "fw", "addresses": ["10.0.0.0/24"], "services": ["firewall", "count"],
    "firewall": {"default": "drop", "rule": [{"action": "allow", "direction": "egress"}]}}]}


@pytest.mark.parametrize("host", [GATEWAY, FIREWALL], ids=["snat", "firewall"])
def test_the_vnic_opens_flows_compiled_while_the_pnic_holds_some(tmp_path, monkeypatch, host):
    """Short connections through a machine whose VNIC offloads each after a few packets: the
    flows that begin while the PNIC holds others open compiled too (their keys clash with no
    flow Python holds, the PNIC's shadows included; behind SNAT, a sync would find nothing to
    do; behind a firewall alone, Python's decision would not sync at all, so neither does the
    pass wait for one), and every result and counter is the reference engine's."""
    from flowshift.gen import TraceSpec, generate, parse_networks
    from flowshift.host import Host

    cfg = parse_config({**host, "offload": {"policy": "elephant", "elephant_packets": 6}},
                       "offloading machine")
    path = tmp_path / "short.pcap"
    generate(TraceSpec(flows=60, duration_s=1.0, seed=5, udp_share=0.2, icmp_share=0.0,
                       ipv6_share=0.0, clients=parse_networks("10.0.0.0/24"), gateway=cfg),
             path)
    ref = run(path, cfg, engine="reference", policy="elephant", rows=64)
    python_rows: list[int] = []  # each packet Python decided: the PNIC's flows then
    decide = Host.process

    def process(self: Host, *args: object) -> object:
        python_rows.append(self.vnic.pnic_flows)
        return decide(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Host, "process", process)
    fast = run(path, cfg, engine="compiled", policy="elephant", rows=64)
    assert [(x.index, int(x.verdict), x.reason, x.tier, x.data) for x in fast.results] == [
        (x.index, int(x.verdict), x.reason, x.tier, x.data) for x in ref.results]
    assert dataclasses.asdict(fast.host.stats) == dataclasses.asdict(ref.host.stats)
    assert fast.host.stats.offloads_to_pnic >= 30  # the PNIC held flows most of the trace
    fp = fast.host.fastpath
    assert fp is not None and fp.opened_all >= 55  # of 60 (was 2: Python opened the rest)
    assert len(python_rows) <= 6


@pytest.mark.parametrize("nat", [True, False], ids=["snat", "firewall"])
@pytest.mark.parametrize("policy", ["never", "elephant"])
@pytest.mark.parametrize("n", [4, 16])
def test_many_machines_at_the_vnic_open_flows_compiled_alike(tmp_path, monkeypatch, policy, n,
                                                             nat):
    """n machines whose chains the VNIC runs, each its own firewall and, with `nat`, a port
    forward of its own: those zones open and close together around the VNIC's syncs (row by
    row, or one indexed write past eight: `Fastpath.open_until`); a firewall alone never waits
    for a sync (its new flows look at nothing of the PNIC's). Every result and counter is the
    reference engine's, without offload and with."""
    from flowshift.gen import TraceSpec, generate, parse_networks
    from flowshift.tiers._fastpath_open import Z_OPEN
    from flowshift.tiers.fastpath import Fastpath

    size = 256 // n
    machines: list[dict[str, object]] = []
    for k in range(n):
        net = f"10.0.0.{size * k}/{32 - size.bit_length() + 1}"
        machines.append({
            "name": f"m{k}", "addresses": [net], "start": "vnic",
            "services": ["firewall", "nat", "count"] if nat else ["firewall", "count"],
            "firewall": {"default": "drop",
                         "rule": [{"action": "allow", "direction": "egress"}]}})
        if nat:  # a port forward (no packet of the trace uses it): a chain with NAT
            machines[-1] |= {"public": [f"192.0.2.{k + 1}"], "nat": {"dnat": [{
                "proto": "tcp", "match": f"192.0.2.{k + 1}:8080",
                "to": f"10.0.0.{size * k + 1}:80"}]}}
    cfg = parse_config({"machine": machines,
                        "offload": {"policy": policy, "elephant_packets": 6}}, f"{n} guests")
    path = tmp_path / "guests.pcap"
    generate(TraceSpec(flows=120, duration_s=1.0, seed=9, udp_share=0.2, icmp_share=0.0,
                       ipv6_share=0.0, clients=parse_networks("10.0.0.0/24")), path)
    ref = run(path, cfg, engine="reference", policy=policy, rows=64)
    writes: list[tuple[int, bool]] = []  # (zones, opened) of each bound written
    open_until = Fastpath.open_until

    def record(self: Fastpath, zones: np.ndarray, until: int) -> None:
        writes.append((len(zones), until >= 0))
        open_until(self, zones, until)
        # its count of open zones is what the zone table says
        assert self.opening == bool(self.open.zone[:, Z_OPEN].any())

    monkeypatch.setattr(Fastpath, "open_until", record)
    fast = run(path, cfg, engine="compiled", policy=policy, rows=64)
    assert [(x.index, int(x.verdict), x.reason, x.tier, x.data) for x in fast.results] == [
        (x.index, int(x.verdict), x.reason, x.tier, x.data) for x in ref.results]
    assert dataclasses.asdict(fast.host.stats) == dataclasses.asdict(ref.host.stats)
    fp = fast.host.fastpath
    assert fp is not None
    if policy == "elephant":
        assert fast.host.stats.offloads_to_pnic >= 20
    if not nat:  # no zone waits for a sync: open from the start, every flow opened compiled
        assert writes == [] and fp.opened_all >= 100
    elif policy == "never":  # open from the start, every flow opened compiled
        assert writes == [(n, True)] and fp.opened_all >= 100
    else:  # closed and opened again around each offload, all at once
        assert (n, True) in writes and (n, False) in writes
