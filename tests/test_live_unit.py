"""The live runtime's parts that need no root: names, the plan, the per-frame pipeline, the
control framing, the [live] config table."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.config import ConfigError, load_config, parse_config
from flowshift.live import control as ctl
from flowshift.live.names import IFNAMSIZ, LiveError, Names, port_name
from flowshift.live.pipeline import UNKNOWN_PORT, WRONG_PORT, Pipeline, Wiring
from flowshift.live.topology import first_host, plan
from flowshift.packet.build import mac, tcp_frame, udp_frame
from flowshift.packet.parse import parse, verify_checksums
from flowshift.packet.view import LINKTYPE_ETHERNET, TCP_ACK, TCP_SYN

HOST = Path(__file__).parent / "live" / "host.toml"
GW, LB, UP = 0, 1, 2  # port indices: machines in config order, then the uplink
PORT_MACS = (mac("02:00:00:00:01:01"), mac("02:00:00:00:01:02"), mac("02:00:00:00:01:ff"))
PEER_MACS = (mac("02:00:00:00:02:01"), mac("02:00:00:00:02:02"), mac("02:00:00:00:02:ff"))
INSIDE, PEER, SNAT = (ipaddress.ip_address(a).packed
                      for a in ("10.0.0.1", "198.51.100.2", "203.0.113.1"))


def pipeline() -> Pipeline:
    return Pipeline(load_config(HOST), Wiring(PORT_MACS, PEER_MACS))


def syn(src: bytes, dst: bytes, sport: int, dport: int) -> bytearray:
    return bytearray(tcp_frame(src=src, dst=dst, sport=sport, dport=dport, seq=1000, ack=0,
                               flags=TCP_SYN, window=65535))


def test_port_names_fit_the_kernel_limit_and_stay_distinct():
    assert port_name("gw") == "fs-p-gw"
    long_a, long_b = port_name("a-very-long-machine-1"), port_name("a-very-long-machine-2")
    assert len(long_a) <= IFNAMSIZ and len(long_b) <= IFNAMSIZ
    assert long_a != long_b


def test_names_carry_the_suffix_and_refuse_bad_ones(monkeypatch: pytest.MonkeyPatch):
    assert Names().host == "fs-host" and Names().machine("gw") == "fs-m-gw"
    assert str(Names().run_dir) == "/run/flowshift/live"
    monkeypatch.setenv("FLOWSHIFT_LIVE_SUFFIX", "ab12")
    n = Names.from_env()
    assert (n.host, n.wire, n.machine("gw")) == ("fs-host-ab12", "fs-wire-ab12", "fs-m-gw-ab12")
    assert n.run_dir.name == "live-ab12"
    monkeypatch.setenv("FLOWSHIFT_LIVE_SUFFIX", "../x")
    with pytest.raises(LiveError, match="FLOWSHIFT_LIVE_SUFFIX"):
        Names.from_env()


def test_first_host_address():
    net = ipaddress.ip_network
    assert str(first_host(net("10.0.0.0/24"))) == "10.0.0.1/24"
    assert str(first_host(net("fd00::/64"))) == "fd00::1/64"
    assert str(first_host(net("10.9.9.9/32"))) == "10.9.9.9/32"


def test_plan_gives_machines_their_addresses_and_backends_and_the_wire_its_routes():
    p = plan(load_config(HOST), Names("x"), "host.toml")
    gw, lb = p.machines
    assert (gw.netns, gw.port) == ("fs-m-gw-x", "fs-p-gw")
    assert [str(a) for a in gw.addresses] == ["10.0.0.1/24", "fd00::1/64"]
    # the LB's backends answer inside the machine's namespace
    assert [str(a) for a in lb.addresses] == ["10.2.0.1/24", "10.2.0.11/24", "10.2.0.12/24"]
    assert [str(a) for a in p.peers] == ["198.51.100.2/32", "2001:db8::2/128"]
    assert [str(r) for r in p.wire_routes] == [
        "10.0.0.0/24", "fd00::/64", "203.0.113.1/32", "2001:db8::1/128", "10.2.0.0/24",
        "198.51.100.10/32"]


def test_plan_refuses_a_peer_that_is_a_machine_address():
    raw = {"machine": [{"name": "m", "addresses": ["198.51.100.0/24"], "services": []}]}
    with pytest.raises(ConfigError, match=r"h\.toml: live\.peers\[0\]: peer 198\.51\.100\.2 "):
        plan(parse_config(raw), Names(), "h.toml")  # the default peers count too


@pytest.mark.parametrize(("extra", "where"), [
    ({"conntrack": {"udp_timeout": 2}}, "machine[0].conntrack"),
    ({"forwarding": "router"}, "machine[0].forwarding"),
])
def test_plan_refuses_what_the_ebpf_datapath_does_not_run(extra, where):
    raw = {"machine": [{"name": "m", "addresses": ["10.0.0.0/24"], "services": [], **extra}]}
    with pytest.raises(ConfigError, match=rf"h\.toml: {re.escape(where)}: flowshift live"):
        plan(parse_config(raw), Names(), "h.toml")


@pytest.mark.parametrize("live, where, words", [
    ({"peers": ["300.1.1.1"]}, "live.peers[0]", "bad address"),
    ({"peers": ["224.0.0.1"]}, "live.peers[0]", "not a unicast"),
    ({"peers": ["192.0.2.9", "192.0.2.9"]}, "live.peers[1]", "listed twice"),
    ({"peers": "192.0.2.9"}, "live.peers", "expected an array"),
    ({"peer": []}, "live.peer", "unknown key (allowed: peers)"),
])
def test_live_table_errors_name_the_key(live: dict, where: str, words: str):
    raw = {"machine": [{"name": "m", "addresses": ["10.0.0.0/24"], "services": []}],
           "live": live}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "h.toml")
    assert info.value.where == where
    assert words in str(info.value)


def test_live_peers_default_and_explicit():
    base = {"machine": [{"name": "m", "addresses": ["10.0.0.0/24"], "services": []}]}
    assert parse_config(base).live.peers == (PEER, ipaddress.ip_address("2001:db8::2").packed)
    cfg = parse_config({**base, "live": {"peers": ["192.0.2.9"]}})
    assert cfg.live.peers == (ipaddress.ip_address("192.0.2.9").packed,)


def test_egress_is_translated_and_addressed_to_the_wire():
    p = pipeline()
    frame = syn(INSIDE, PEER, 40000, 5001)
    assert p.frame(GW, frame, 1) == UP
    pkt = parse(frame, LINKTYPE_ETHERNET)
    assert (pkt.src, pkt.dst, pkt.dport) == (SNAT, PEER, 5001)
    assert 20000 <= pkt.sport <= 29999
    assert bytes(frame[0:6]) == PEER_MACS[UP] and bytes(frame[6:12]) == PORT_MACS[UP]
    assert verify_checksums(pkt)
    # the reply comes back de-NATed, to the machine's port and MAC
    reply = bytearray(tcp_frame(src=PEER, dst=SNAT, sport=5001, dport=pkt.sport, seq=5000,
                                ack=1001, flags=TCP_SYN | TCP_ACK, window=65535))
    assert p.frame(UP, reply, 2) == GW
    back = parse(reply, LINKTYPE_ETHERNET)
    assert (back.src, back.dst, back.sport, back.dport) == (PEER, INSIDE, 5001, 40000)
    assert bytes(reply[0:6]) == PEER_MACS[GW] and bytes(reply[6:12]) == PORT_MACS[GW]
    assert verify_checksums(back)
    assert p.counters.verdicts()[("gw", "egress", "forward", "rule:0")] == 1
    assert p.counters.verdicts()[("gw", "ingress", "forward", "established")] == 1
    assert p.counters.traffic()[("vnic", "gw", "egress")] == [1, len(frame)]
    assert p.first_cache() == 1


def test_refused_flow_is_dropped_and_counted_by_reason():
    p = pipeline()
    assert p.frame(GW, syn(INSIDE, PEER, 40000, 6000), 1) == -1
    assert p.counters.verdicts() == {("gw", "egress", "drop", "default"): 1}
    assert p.first_cache() == 0


def test_a_frame_on_the_wrong_port_is_dropped():
    p = pipeline()
    assert p.frame(UP, syn(INSIDE, PEER, 40000, 5001), 1) == -1  # a machine's source, from out
    assert p.frame(LB, syn(INSIDE, PEER, 40000, 5001), 1) == -1  # another machine's source
    assert p.counters.verdicts() == {("gw", "egress", "drop", WRONG_PORT): 2}
    # a source that cannot tell the port (the punt device) is steered by address alone
    assert p.frame(UNKNOWN_PORT, syn(INSIDE, PEER, 40000, 5001), 1) == UP


def test_frames_of_no_machine_and_garbage_are_dropped_and_counted():
    p = pipeline()
    stranger = udp_frame(src=PEER, dst=ipaddress.ip_address("192.0.2.1").packed, sport=1,
                         dport=2, payload=b"x")
    assert p.frame(UP, bytearray(stranger), 1) == -1
    assert p.frame(UP, bytearray(stranger[:20]), 1) == -1
    arp = bytearray(stranger[:12] + b"\x08\x06" + bytes(28))
    assert p.frame(UP, arp, 1) == -1
    assert p.counters.verdicts() == {
        ("", "", "bypass", "no-machine"): 1, ("", "", "unparsed", "truncated-ip"): 1,
        ("", "", "bypass", "not-ip"): 1}
    assert p.counters.traffic() == {}


def test_lb_vip_spreads_new_flows_round_robin_to_the_machine_port():
    p = pipeline()
    vip = ipaddress.ip_address("198.51.100.10").packed
    backends = []
    for sport in (1001, 1002, 1003):
        frame = syn(PEER, vip, sport, 80)
        assert p.frame(UP, frame, 1) == LB
        pkt = parse(frame, LINKTYPE_ETHERNET)
        backends.append((str(ipaddress.ip_address(pkt.dst)), pkt.dport))
    assert backends == [("10.2.0.11", 8080), ("10.2.0.12", 8080), ("10.2.0.11", 8080)]


def test_control_messages_round_trip_through_their_framing():
    data = ctl.frame(ctl.FlowsRequest())
    assert ctl.unframe(data[:-1]) is None
    body, used = ctl.unframe(data + b"rest")
    assert used == len(data)
    assert isinstance(ctl.decode_request(body), ctl.FlowsRequest)
    with pytest.raises(ctl.ControlError, match="too long"):
        ctl.unframe(b"\xff\xff\xff\xff")


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from(["syn-out", "syn-in", "udp-out"]),
       cut=st.integers(0, 80), flips=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)),
                                              max_size=4),
       port=st.sampled_from([GW, LB, UP, UNKNOWN_PORT]))
def test_any_frame_is_decided_and_counted_once_never_a_crash(base: str, cut: int,
                                                              flips: list[tuple[int, int]],
                                                              port: int):
    p = pipeline()
    frame = {
        "syn-out": syn(INSIDE, PEER, 40000, 5001),
        "syn-in": syn(PEER, ipaddress.ip_address("198.51.100.10").packed, 1000, 80),
        "udp-out": bytearray(udp_frame(src=INSIDE, dst=PEER, sport=5, dport=53, payload=b"q")),
    }[base]
    for at, value in flips:
        if at < len(frame):
            frame[at] = value
    frame = frame[:len(frame) - cut] if cut < len(frame) else frame[:1]
    out = p.frame(port, frame, 1)
    assert out in (-1, GW, LB, UP)
    assert sum(p.counters.verdicts().values()) == 1
    if out >= 0:
        assert bytes(frame[0:6]) == PEER_MACS[out] and bytes(frame[6:12]) == PORT_MACS[out]
