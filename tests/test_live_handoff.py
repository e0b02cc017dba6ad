"""The live handoff without root: Linux conntrack entries (built by hand, as ctnetlink dumps
them) become flow entries, cross the machine↔VNIC channel and are owned by the VNIC's pipeline,
which goes on translating their packets where the guest stopped."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.config import load_config
from flowshift.entry import Service, Status, Tier
from flowshift.live import handoff
from flowshift.live.ctimport import (
    IPS_ASSURED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    CtEntry,
    from_nfct,
    to_flow,
)
from flowshift.live.pipeline import Pipeline, Wiring
from flowshift.packet.build import mac, tcp_frame
from flowshift.packet.parse import parse, verify_checksums
from flowshift.packet.view import LINKTYPE_ETHERNET, TCP_ACK
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.conntrack_tcp import TcpState

GUEST = Path(__file__).parent / "live" / "guest.toml"
GW, LB, UP = 0, 1, 2
PORT_MACS = (mac("02:00:00:00:01:01"), mac("02:00:00:00:01:02"), mac("02:00:00:00:01:ff"))
PEER_MACS = (mac("02:00:00:00:02:01"), mac("02:00:00:00:02:02"), mac("02:00:00:00:02:ff"))
SECOND = 1_000_000_000
NOW = 1000 * SECOND
CHAIN = int(Service.FIREWALL | Service.NAT | Service.COUNT)
WSCALE_SACK = ct_tcp.TCP_FLAG_WINDOW_SCALE | ct_tcp.TCP_FLAG_SACK_PERM


def a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


# `conntrack -L`: tcp 6 431999 ESTABLISHED src=10.0.0.1 dst=198.51.100.2 sport=40000
# dport=5001 packets=72 bytes=103752 src=198.51.100.2 dst=203.0.113.1 sport=5001 dport=21000
# packets=32 bytes=1672 [ASSURED]
SNAT_TCP = CtEntry(
    family=4, proto=6, original=("10.0.0.1", "198.51.100.2", 40000, 5001),
    reply=("198.51.100.2", "203.0.113.1", 5001, 21000),
    status=IPS_SEEN_REPLY | IPS_ASSURED | IPS_SRC_NAT | 0x8 | 0x80 | 0x100,
    timeout_s=431999, tcp_state=TcpState.ESTABLISHED, wscale=(7, 9),
    tcp_flags=(WSCALE_SACK | ct_tcp.TCP_FLAG_DATA_UNACKNOWLEDGED, WSCALE_SACK),
    packets=(72, 32), bytes=(103752, 1672))


def test_a_snat_tcp_conntrack_becomes_its_flow_entry_with_windows_to_relearn():
    flow = to_flow(SNAT_TCP, GW, CHAIN, NOW)
    k, x = flow.key, flow.xlat
    assert (k.family, k.proto, k.zone, k.src, k.dst, k.sport, k.dport) == (
        4, 6, GW, a("10.0.0.1"), a("198.51.100.2"), 40000, 5001)
    # the rewrite is the reply tuple reversed: the source as the peer sees it
    assert (x.src, x.dst, x.sport, x.dport) == (a("203.0.113.1"), a("198.51.100.2"), 21000, 5001)
    assert flow.reply_key.src == a("198.51.100.2") and flow.reply_key.dport == 21000
    assert flow.status == Status.SEEN_REPLY | Status.ASSURED | Status.NAT
    assert flow.chain == CHAIN and flow.owner == Tier.VNIC and flow.machine == GW
    assert flow.packets == [72, 32] and flow.bytes == [103752, 1672]
    assert flow.expires == NOW + 431999 * SECOND and flow.created == flow.last_seen == NOW
    tcp = flow.tcp
    assert tcp is not None and tcp.state == TcpState.ESTABLISHED and tcp.seen_reply
    assert (tcp.seen[0].scale, tcp.seen[1].scale) == (7, 9)
    for d in tcp.seen:  # carried: scaling; re-learned: every window variable, liberally
        assert d.flags & ct_tcp.TCP_FLAG_WINDOW_SCALE and d.flags & ct_tcp.TCP_FLAG_BE_LIBERAL
        assert not d.flags & ct_tcp.TCP_FLAG_DATA_UNACKNOWLEDGED
        assert (d.end, d.maxend, d.maxwin, d.maxack) == (0, 0, 0, 0)
    assert flow.rule == -1 and flow.backend == -1
    # it survives the entry layout unchanged
    assert type(flow).from_bytes(flow.to_bytes()) == flow


def test_an_lb_conntrack_names_its_backend_and_an_unreplied_udp_one_is_not_assured():
    lb = CtEntry(family=4, proto=6, original=("198.51.100.2", "198.51.100.10", 33000, 80),
                 reply=("10.2.0.12", "198.51.100.2", 8080, 33000), status=0x20 | 0x2 | 0x4,
                 timeout_s=60, tcp_state=TcpState.SYN_RECV)
    flow = to_flow(lb, LB, int(Service.LB), NOW, {(a("10.2.0.11"), 8080): 0,
                                                   (a("10.2.0.12"), 8080): 1})
    assert flow.backend == 1 and (flow.xlat.dst, flow.xlat.dport) == (a("10.2.0.12"), 8080)
    udp = CtEntry(family=6, proto=17, original=("fd00::1", "2001:db8::2", 5353, 53),
                  reply=("2001:db8::2", "2001:db8::1", 53, 5353), status=0x10, timeout_s=25)
    flow = to_flow(udp, GW, CHAIN, NOW)
    assert flow.tcp is None and flow.status == Status.NAT and flow.key.family == 6
    assert flow.xlat.src == a("2001:db8::1") and flow.expires == NOW + 25 * SECOND


def test_an_icmp_echo_conntrack_keys_by_identifier():
    ping = CtEntry(family=4, proto=1, original=("10.0.0.1", "198.51.100.2", 77, 77),
                   reply=("198.51.100.2", "203.0.113.1", 20077, 20077), status=0x2 | 0x10,
                   timeout_s=29)
    flow = to_flow(ping, GW, CHAIN, NOW)
    assert (flow.key.sport, flow.key.dport, flow.xlat.sport, flow.xlat.dport) == (
        77, 77, 20077, 20077)


class Nla:
    """A stand-in for pyroute2's decoded netlink messages and nested attributes: `["attrs"]` is
    the list of (name, value) pairs; other keys are header fields (`nfgen_family`)."""

    def __init__(self, header: dict[str, Any] | None = None, **attrs: Any) -> None:
        self.header = header or {}
        self.attrs = attrs

    def __getitem__(self, name: str) -> Any:
        return list(self.attrs.items()) if name == "attrs" else self.header[name]


def _tuple(src: str, dst: str, proto: int, sport: int, dport: int) -> Nla:
    return Nla(CTA_TUPLE_IP=Nla(CTA_IP_V4_SRC=src, CTA_IP_V4_DST=dst),
               CTA_TUPLE_PROTO=Nla(CTA_PROTO_NUM=proto, CTA_PROTO_SRC_PORT=sport,
                                   CTA_PROTO_DST_PORT=dport))


def test_a_ctnetlink_message_reads_into_the_entry_conntrack_l_shows():
    msg = Nla(
        {"nfgen_family": socket.AF_INET},
        CTA_TUPLE_ORIG=_tuple("10.0.0.1", "198.51.100.2", 6, 40000, 5001),
        CTA_TUPLE_REPLY=_tuple("198.51.100.2", "203.0.113.1", 6, 5001, 21000),
        CTA_STATUS=SNAT_TCP.status, CTA_TIMEOUT=431999,
        CTA_PROTOINFO=Nla(CTA_PROTOINFO_TCP=Nla(
            CTA_PROTOINFO_TCP_STATE=3, CTA_PROTOINFO_TCP_WSCALE_ORIGINAL=7,
            CTA_PROTOINFO_TCP_WSCALE_REPLY=9,
            CTA_PROTOINFO_TCP_FLAGS_ORIGINAL=(SNAT_TCP.tcp_flags[0], 0),
            CTA_PROTOINFO_TCP_FLAGS_REPLY=(SNAT_TCP.tcp_flags[1], 0))),
        CTA_COUNTERS_ORIG=Nla(CTA_COUNTERS_PACKETS=72, CTA_COUNTERS_BYTES=103752),
        CTA_COUNTERS_REPLY=Nla(CTA_COUNTERS_PACKETS=32, CTA_COUNTERS_BYTES=1672))
    assert from_nfct(msg) == SNAT_TCP
    gre = Nla({"nfgen_family": socket.AF_INET},
              CTA_TUPLE_ORIG=_tuple("10.0.0.1", "1.2.3.4", 47, 0, 0))
    assert from_nfct(gre) is None  # no flow entry holds it: the VNIC never sees one


def _pipeline() -> Pipeline:
    return Pipeline(load_config(GUEST), Wiring(PORT_MACS, PEER_MACS))


def _ack(src: str, dst: str, sport: int, dport: int, seq: int) -> bytearray:
    return bytearray(tcp_frame(src=a(src), dst=a(dst), sport=sport, dport=dport, seq=seq,
                               ack=9000, flags=TCP_ACK, window=500, payload_len=100))


def test_the_vnic_owns_the_handed_flows_and_translates_where_the_guest_stopped():
    cfg = load_config(GUEST)
    p = _pipeline()
    assert p.tier(GW) == "machine"
    # before: the guest's frames pass untouched (its Linux ruleset judged them)
    translated = _ack("203.0.113.1", "198.51.100.2", 21000, 5001, 1000)
    untouched = bytes(translated[12:])
    assert p.frame(GW, translated, NOW) == UP and bytes(translated[12:]) == untouched
    frame = handoff.machine_message(cfg, GW, [SNAT_TCP], [], NOW)
    assert handoff.vnic_receive(p, frame, NOW) == 1
    assert p.tier(GW) == "vnic" and p.first_cache() == 1
    # a frame the guest translated before its ruleset went, still queued: passed as it is
    late = _ack("203.0.113.1", "198.51.100.2", 21000, 5001, 1100)
    before = bytes(late[12:])
    assert p.frame(GW, late, NOW + 1) == UP and bytes(late[12:]) == before
    # the next one, untranslated (the guest has no ruleset any more): the VNIC's SNAT
    egress = _ack("10.0.0.1", "198.51.100.2", 40000, 5001, 1200)
    assert p.frame(GW, egress, NOW + 2) == UP
    out = parse(egress, LINKTYPE_ETHERNET)
    assert (out.src, out.sport) == (a("203.0.113.1"), 21000) and verify_checksums(out)
    reply = _ack("198.51.100.2", "203.0.113.1", 5001, 21000, 9000)
    assert p.frame(UP, reply, NOW + 3) == GW
    back = parse(reply, LINKTYPE_ETHERNET)
    assert (back.dst, back.dport) == (a("10.0.0.1"), 40000)
    v = p.counters.verdicts()
    assert v[("gw", "egress", "forward", "established")] == 1
    assert v[("gw", "ingress", "forward", "established")] == 1
    t = p.counters.traffic()
    assert t[("machine", "gw", "egress")][0] == 2 and t[("vnic", "gw", "egress")][0] == 1
    # past the drain, a machine sending from its public address is nobody's: dropped
    spoof = _ack("203.0.113.1", "198.51.100.2", 21000, 5001, 1300)
    assert p.frame(GW, spoof, NOW + 10 * SECOND) == -1


def test_the_vnic_runs_a_handed_chain_with_the_hosts_conntrack_table():
    """A host-level `[conntrack]` table reaches the VNIC's chain with the machine's config: the
    handoff carries the machine's whole table, since the VNIC reads it without the host's."""
    from flowshift.config import parse_config, to_dict

    data = to_dict(load_config(GUEST))
    data["conntrack"] = {**data["conntrack"], "tcp_timeout_established": 300, "tcp_loose": False}
    for machine in data["machine"]:
        machine.pop("conntrack", None)
    cfg = parse_config(data, "guest with a host conntrack table")
    p = _pipeline()
    assert handoff.vnic_receive(p, handoff.machine_message(cfg, GW, [SNAT_TCP], [], NOW),
                                NOW) == 1
    chain = p.chains[GW]
    assert chain is not None
    assert chain.config.conntrack == cfg.machines[GW].conntrack
    knobs = chain.knobs
    assert knobs.tcp_timeouts[TcpState.ESTABLISHED] == 300 * SECOND and not knobs.tcp_loose


_ports = st.integers(0, 65535)
_v4 = st.ip_addresses(v=4).map(str)


@settings(max_examples=200, deadline=None)
@given(orig=st.tuples(_v4, _v4, _ports, _ports), reply=st.tuples(_v4, _v4, _ports, _ports),
       status=st.integers(0, 0xFFFF), proto=st.sampled_from([6, 17]),
       state=st.integers(0, 9), wscale=st.tuples(st.integers(0, 255), st.integers(0, 255)),
       flags=st.tuples(st.integers(0, 255), st.integers(0, 255)),
       timeout=st.integers(0, 1 << 31), counts=st.tuples(*[st.integers(0, 1 << 40)] * 4))
def test_any_conntrack_converts_to_an_entry_the_layout_keeps(orig, reply, status, proto, state,
                                                            wscale, flags, timeout, counts):
    ct = CtEntry(4, proto, orig, reply, status, timeout, state, wscale, flags,
                 counts[:2], counts[2:])
    flow = to_flow(ct, GW, CHAIN, NOW)
    r = flow.reply_key
    assert (r.src, r.dst, r.sport, r.dport) == (a(reply[0]), a(reply[1]), reply[2], reply[3])
    mirrored = (orig[0], orig[1], orig[2], orig[3]) == (reply[1], reply[0], reply[3], reply[2])
    assert bool(flow.status & Status.NAT) is not mirrored
    assert bool(flow.status & Status.ASSURED) is bool(status & IPS_ASSURED)
    assert type(flow).from_bytes(flow.to_bytes()) == flow
    if proto == 6:
        assert flow.tcp is not None and flow.tcp.state == state
        for d, scale in zip(flow.tcp.seen, wscale, strict=True):
            assert d.scale == min(scale, ct_tcp.TCP_MAX_WSCALE) and d.maxwin == 0
            assert d.flags & ct_tcp.TCP_FLAG_BE_LIBERAL


class FailingConntrack:
    def dump(self) -> list[CtEntry]:
        raise OSError("ctnetlink: no buffer space")

    def flush(self) -> None:
        raise AssertionError("nothing was handed: nothing to flush")


def test_a_handoff_that_fails_puts_the_ruleset_back_and_leaves_the_guest_owner(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(handoff.guest, "lb_slots", lambda cfg, m, ns: [])
    monkeypatch.setattr(handoff.guest, "withdraw", lambda cfg, m, ns: calls.append("withdraw"))
    monkeypatch.setattr(handoff.guest, "apply", lambda cfg, m, ns: calls.append("apply") or [])
    p = _pipeline()
    with pytest.raises(OSError, match="no buffer space"):
        handoff.run(load_config(GUEST), GW, "fs-m-gw-x", FailingConntrack(), p)  # type: ignore[arg-type]
    assert calls == ["withdraw", "apply"]
    assert p.tier(GW) == "machine" and p.first_cache() == 0


def test_a_guest_passes_only_frames_from_its_own_addresses():
    p = _pipeline()
    ours = _ack("10.0.0.1", "198.51.100.2", 40000, 5001, 1)  # not translated: no rule for it
    assert p.frame(GW, ours, NOW) == UP
    spoof = _ack("10.2.0.11", "198.51.100.2", 8080, 5001, 1)  # the lb machine's backend
    assert p.frame(GW, spoof, NOW) == -1
    foreign = _ack("192.0.2.7", "198.51.100.2", 1, 5001, 1)
    assert p.frame(GW, foreign, NOW) == -1
    v = p.counters.verdicts()
    assert v[("lb", "egress", "drop", "wrong-port")] == 1
    assert v[("", "", "bypass", "no-machine")] == 1
