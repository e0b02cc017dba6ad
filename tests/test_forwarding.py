"""A routing machine (`forwarding = "router"`): Linux's ip_forward on every forwarded packet.

TTL / hop limit 1 or 0 is dropped with reason `ttl-exceeded` (before the forward hook: no flow
is made, whatever the rules say); every forwarded packet leaves one lower, the IPv4 header
checksum updated. The default (`bridge`) leaves the TTL alone.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowshift.config import ConfigError, parse_config, to_dict
from flowshift.conntrack_types import SECOND
from flowshift.packet.build import icmp_echo_frame, udp_frame
from flowshift.packet.checksum import ones_sum
from flowshift.packet.parse import parse
from flowshift.packet.route import decrement_ttl
from flowshift.services.chain import EGRESS, INGRESS, Chain
from flowshift.verdict import Reason, Verdict

S = SECOND
INSIDE, OUTSIDE = bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7])
IN6, OUT6 = bytes.fromhex("fd00" + "00" * 13 + "05"), bytes.fromhex("2001db8" + "0" * 24 + "7")
MACHINE = {"name": "m", "addresses": ["10.0.0.0/24", "fd00::/64"], "services": ["firewall"],
           "firewall": {"default": "drop", "rule": [
               {"action": "allow", "direction": "egress", "proto": "any"}]}}


def _chain(forwarding: str | None) -> Chain:
    m = {**MACHINE, **({"forwarding": forwarding} if forwarding else {})}
    return Chain(parse_config({"machine": [m]}, "t").machines[0], 0)


def _udp(ttl: int, src: bytes = INSIDE, dst: bytes = OUTSIDE, sport: int = 5000,
         dport: int = 53):
    return parse(bytearray(udp_frame(src=src, dst=dst, sport=sport, dport=dport,
                                     payload=b"x", ttl=ttl)), 1)


def test_the_key_is_read_checked_and_written() -> None:
    assert _chain(None).router is False
    assert _chain("router").router is True
    cfg = parse_config({"machine": [{**MACHINE, "forwarding": "router"}]}, "t")
    assert to_dict(cfg)["machine"][0]["forwarding"] == "router"
    assert parse_config(to_dict(cfg), "again") == cfg
    with pytest.raises(ConfigError, match=r"machine\[0\]\.forwarding"):
        parse_config({"machine": [{**MACHINE, "forwarding": "switch"}]}, "t")


def test_ttl_1_is_dropped_before_any_flow_is_made() -> None:
    chain = _chain("router")
    out = chain.process(_udp(1), EGRESS, S)
    assert (out.verdict, out.reason, out.flow) == (Verdict.DROP, Reason.TTL_EXCEEDED, None)
    assert len(chain.flows) == 0
    assert _chain("router").process(_udp(0, OUTSIDE, INSIDE, 53, 5000), INGRESS,
                                     S).reason == Reason.TTL_EXCEEDED  # not the rules' drop
    assert _chain(None).process(_udp(1), EGRESS, S).verdict == Verdict.FORWARD


def test_a_tracked_flows_ttl_1_packet_is_dropped_and_the_flow_stays() -> None:
    chain = _chain("router")
    assert chain.process(_udp(64), EGRESS, S).created
    out = chain.process(_udp(1, OUTSIDE, INSIDE, 53, 5000), INGRESS, 2 * S)
    assert out.reason == Reason.TTL_EXCEEDED and len(chain.flows) == 1
    assert chain.process(_udp(9, OUTSIDE, INSIDE, 53, 5000), INGRESS, 3 * S).reason \
        == Reason.ESTABLISHED


@given(ttl=st.integers(2, 255), v6=st.booleans(), ident=st.integers(0, 0xFFFF))
def test_forwarded_packets_leave_one_lower_with_a_right_checksum(ttl, v6, ident) -> None:
    frame = icmp_echo_frame(src=IN6 if v6 else INSIDE, dst=OUT6 if v6 else OUTSIDE,
                            ident=ident, seq=1, ttl=ttl)
    pkt = parse(bytearray(frame), 1)
    out = _chain("router").process(pkt, EGRESS, S)
    assert out.verdict == Verdict.FORWARD
    again = parse(bytearray(pkt.data), 1)
    assert again.ttl == ttl - 1
    if not v6:
        assert ones_sum(again.data[again.l3:again.l3 + 20]) == 0xFFFF


def test_decrement_matches_a_recomputed_header() -> None:
    pkt = _udp(2)
    decrement_ttl(pkt)
    assert pkt.ttl == 1 and ones_sum(pkt.data[pkt.l3:pkt.l3 + 20]) == 0xFFFF


@pytest.mark.parametrize("engine", ["reference", "compiled"])
@pytest.mark.parametrize("rows", [None, 64])
def test_a_replay_writes_the_lowered_ttl_of_an_untranslated_flow(tmp_path, engine, rows):
    """The packets a routing machine forwards leave the host one lower, in the replay's
    output too, whether or not NAT rewrote anything (it once kept only translated packets'
    bytes, and the reference engine lost the TTL of untranslated ones)."""
    from hosttools import run
    from tracetools import write_pcap

    cfg = parse_config({"machine": [{**MACHINE, "forwarding": "router"}]}, "t")
    frames = [udp_frame(src=INSIDE, dst=OUTSIDE, sport=5000, dport=53, payload=b"x", ttl=9),
              udp_frame(src=OUTSIDE, dst=INSIDE, sport=53, dport=5000, payload=b"y", ttl=9)]
    path = write_pcap(tmp_path / "r.pcap", [(S + i * 1000, f) for i, f in enumerate(frames)])
    r = run(path, cfg, engine=engine, rows=rows, policy="never")
    assert [x.verdict for x in r.results] == [Verdict.FORWARD, Verdict.FORWARD]
    for x in r.results:
        assert x.data is not None
        pkt = parse(bytearray(x.data), 1)
        assert pkt.ttl == 8
        assert ones_sum(bytes(x.data[14:34])) == 0xFFFF  # the header checksum still adds up
