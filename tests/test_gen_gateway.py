"""Gateway captures: generated traces that a translating host (firewall, SNAT, LB) forwards.

The generator picks each flow's translation with the host's own NAT and LB code; replaying
the trace through the host must then forward every valid packet, de-NAT the replies to the
inside clients, and give the same output whatever the offload schedule.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from flowshift.config import parse_config
from flowshift.gen import TraceSpec, generate, parse_networks
from flowshift.packet.parse import parse
from flowshift.packet.pcap import open_trace
from flowshift.verdict import Verdict
from hosttools import GATEWAY_HOST, run

CLIENTS = parse_networks("10.0.0.0/24,fd00::/64")
SERVERS = parse_networks("198.51.100.0/24,2001:db8::/64")


def _spec(cfg, **kw) -> TraceSpec:
    args = {"flows": 200, "duration_s": 10.0, "seed": 3, "elephants": 3, "ipv6_share": 0.3,
            "icmp_share": 0.05, "clients": CLIENTS, "servers": SERVERS, "gateway": cfg}
    return TraceSpec(**(args | kw))


@pytest.fixture(scope="module")
def cfg():
    return parse_config(GATEWAY_HOST, "gateway test")


@pytest.fixture(scope="module", params=["none", "syn-flood", "out-of-window"])
def replayed(request, cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("gw") / f"{request.param}.pcap"
    summary = generate(_spec(cfg, attack=request.param), path)
    return path, summary, run(path, cfg, policy="never")


def _inside(addr: bytes) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip in ipaddress.ip_network(n) for n in GATEWAY_HOST["machine"][0]["addresses"])


def test_every_valid_packet_is_forwarded(replayed):
    _, summary, never = replayed
    assert summary.ingress_flows > 20 and summary.flows["icmp"] > 0
    dropped = Counter(r.reason for r in never.results if r.verdict != Verdict.FORWARD)
    # attack packets are the only ones the host may refuse
    assert sum(dropped.values()) <= summary.attack_packets, dropped
    if summary.attacked_flows:
        assert dropped["invalid"] > 0


def test_replies_arrive_translated(replayed):
    path, _, never = replayed
    with open_trace(path) as frames:
        inputs = [f.data for f in frames]
    egress_replies = 0
    for r, data in zip(never.results, inputs, strict=True):
        if r.verdict != Verdict.FORWARD:
            continue
        before, after = parse(bytearray(data), 1), parse(bytearray(r.data), 1)
        if r.direction == "egress":  # leaves with a public source: SNAT or the VIP
            assert after.src in {ipaddress.ip_address(a).packed
                                 for a in GATEWAY_HOST["machine"][0]["public"]}
        else:  # reaches the inside: a de-NAT'ed reply or a backend
            assert _inside(after.dst)
            if not _inside(before.dst):
                egress_replies += 1
    assert egress_replies > 1000


def test_offload_is_transparent(replayed, cfg):
    path, _, never = replayed
    offloaded = run(path, cfg, policy="elephant")
    assert offloaded.outputs() == never.outputs()
    assert offloaded.host.stats.offloads_to_pnic > 0


def test_syn_flood_hits_the_vip(cfg, tmp_path):
    path = tmp_path / "flood.pcap"
    generate(_spec(cfg, flows=20, elephants=0, attack="syn-flood", attack_flows=30), path)
    marks = []
    with open_trace(path) as frames:
        for f in frames:
            pkt = parse(bytearray(f.data), 1)
            if pkt.dst == ipaddress.ip_address("192.0.2.10").packed and pkt.flags == 0x02:
                marks.append(pkt.src)
    assert len(marks) >= 30
    assert not any(_inside(a) for a in marks)  # spoofed from the outside


def test_deterministic(cfg, tmp_path):
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    generate(_spec(cfg, flows=60, elephants=1), a)
    generate(_spec(cfg, flows=60, elephants=1), b)
    assert a.read_bytes() == b.read_bytes()
    generate(_spec(cfg, flows=60, elephants=1, seed=4), b)
    assert a.read_bytes() != b.read_bytes()


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"clients": parse_networks("10.9.0.0/24")}, "not inside"),
        ({"servers": parse_networks("10.0.1.0/24")}, "is inside"),
        ({"ingress_share": 1.5}, "ingress share"),
        ({"gateway": None, "ingress_share": 0.5}, "needs a gateway"),
    ],
)
def test_bad_specs_name_the_problem(cfg, kw, words):
    with pytest.raises(ValueError, match=words):
        _spec(cfg, **kw)


def test_no_targets_means_no_ingress(tmp_path):
    machine = {k: v for k, v in GATEWAY_HOST["machine"][0].items() if k != "lb"}
    machine["services"] = ["firewall", "nat", "count"]
    plain = parse_config({"machine": [machine]}, "t")
    spec = _spec(plain, flows=40, elephants=0)
    assert spec.ingress == 0
    assert generate(spec, tmp_path / "t.pcap").ingress_flows == 0
    with pytest.raises(ValueError, match="LB VIP or DNAT"):
        _spec(plain, ingress_share=0.2)
