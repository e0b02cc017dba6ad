"""A bounded conntrack table (`[conntrack] max`, Linux's nf_conntrack_max).

A new flow in a full table first frees expired entries, then early-drops the entries that are
not assured from the first of the eight hash buckets (from the new entry's on) that has any;
with none, the packet is dropped with reason `table-full`. Assured flows are never touched, a
flow on the PNIC counts, and the table never holds more than `max` flows.
"""

from __future__ import annotations

from pathlib import Path

from flowshift.config import parse_config
from flowshift.conntrack_types import SECOND
from flowshift.packet.build import tcp_frame, udp_frame
from flowshift.packet.parse import parse
from flowshift.packet.view import TCP_ACK, TCP_SYN
from flowshift.services.chain import EGRESS, INGRESS, Chain
from flowshift.services.conntrack import FlowTable, bucket_of
from flowshift.verdict import Reason, Verdict
from hosttools import run
from tracetools import write_pcap

S = SECOND
INSIDE, OUTSIDE = bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7])
MACHINE = {"name": "m", "addresses": ["10.0.0.0/24"], "services": ["firewall"],
           "firewall": {"default": "drop", "rule": [
               {"action": "allow", "direction": "egress", "proto": "any"}]}}


def _chain(cap: int) -> Chain:
    return Chain(parse_config({"machine": [MACHINE], "conntrack": {"max": cap}}, "t")
                 .machines[0], 0)


def _syn(sport: int) -> bytes:
    return tcp_frame(src=INSIDE, dst=OUTSIDE, sport=sport, dport=80, seq=1000, ack=0,
                     flags=TCP_SYN, window=1000)


def _udp(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return udp_frame(src=src, dst=dst, sport=sport, dport=dport, payload=b"x")


def _p(frame: bytes):
    return parse(bytearray(frame), 1)


def test_a_syn_flood_never_grows_the_table_past_max() -> None:
    chain = _chain(64)
    reasons = set()
    for i in range(2000):
        out = chain.process(_p(_syn(10000 + i)), EGRESS, S + i * 1000)
        reasons.add(out.reason)
        assert len(chain.flows) <= 64
    assert len(chain.flows) == 64
    assert Reason.RULE in reasons  # early drop made room for new flows


def _assured_udp(chain: Chain, port: int, now: int) -> None:
    """A UDP stream: a request, a reply, and a packet after 2 s make it assured."""
    chain.process(_p(_udp(INSIDE, OUTSIDE, port, 53)), EGRESS, now)
    chain.process(_p(_udp(OUTSIDE, INSIDE, 53, port)), INGRESS, now)
    chain.process(_p(_udp(INSIDE, OUTSIDE, port, 53)), EGRESS, now + 3 * S)


def test_assured_flows_are_never_dropped_and_a_new_flow_is_refused() -> None:
    chain = _chain(16)
    for i in range(16):
        _assured_udp(chain, 20000 + i, S)
    assert len(chain.flows) == 16 and all(f.status & 2 for f in chain.flows)
    out = chain.process(_p(_syn(30000)), EGRESS, 5 * S)
    assert (out.verdict, out.reason) == (Verdict.DROP, Reason.TABLE_FULL)
    for i in range(16):  # every established flow still passes
        out = chain.process(_p(_udp(OUTSIDE, INSIDE, 53, 20000 + i)), INGRESS, 6 * S)
        assert out.reason == Reason.ESTABLISHED


def test_expired_entries_make_room_first() -> None:
    chain = _chain(4)
    for i in range(4):
        _assured_udp(chain, 20000 + i, S)
    late = 4 * S + 121 * S  # past udp_timeout_stream
    assert chain.process(_p(_syn(30000)), EGRESS, late).created
    assert len(chain.flows) == 1


def test_early_drop_takes_the_unassured_flows_of_the_first_bucket_that_has_any() -> None:
    table = FlowTable(8)
    chain = _chain(8)
    chain.flows = table
    for i in range(8):
        chain.process(_p(_syn(40000 + i)), EGRESS, S)
    key = _p(_syn(50000)).key(0)
    before = list(table)
    home = bucket_of(key, 8)
    homes = {f.key: {bucket_of(f.key, 8), bucket_of(f.reply_key, 8)} for f in before}
    first = next(b for i in range(8) if any((b := (home + i) % 8) in h for h in homes.values()))
    expect = {k for k, h in homes.items() if first in h}
    assert chain.process(_p(_syn(50000)), EGRESS, 2 * S).created
    assert {f.key for f in before} - {f.key for f in table} == expect


def test_flows_on_the_pnic_count(tmp_path: Path) -> None:
    """Assured flows offloaded to the PNIC fill the table: a new flow is refused, in every
    offload schedule alike."""
    host = {"pnic": {"capacity": 64}, "offload": {"policy": "always"},
            "conntrack": {"max": 4},
            "machine": [{**MACHINE, "start": "vnic"}]}
    trace: list[tuple[int, bytes]] = []
    for i in range(4):  # four assured UDP streams, then data on each
        port = 20000 + i
        trace += [(S + i, _udp(INSIDE, OUTSIDE, port, 53)),
                  (S + 10 + i, _udp(OUTSIDE, INSIDE, 53, port)),
                  (4 * S + i, _udp(INSIDE, OUTSIDE, port, 53)),
                  (5 * S + i, _udp(INSIDE, OUTSIDE, port, 53))]
    trace.sort(key=lambda p: p[0])
    trace += [(6 * S, _syn(30000)), (6 * S + 1, _udp(OUTSIDE, INSIDE, 53, 20000))]
    path = write_pcap(tmp_path / "t.pcap", trace)
    cfg = parse_config(host, "t")
    got = run(path, cfg)
    never = run(path, cfg, policy="never")
    assert got.host.stats.tier_packets["pnic"] > 0  # the streams were on the PNIC
    for r in (got, never):
        assert r.results[-2].reason == Reason.TABLE_FULL.label
        assert r.results[-1].reason == Reason.ESTABLISHED.label
    assert got.outputs() == never.outputs()


def test_the_ack_of_an_early_dropped_handshake_is_not_new() -> None:
    """A flow that was early-dropped is gone: its next packet is judged as new (an ACK is
    picked up mid-stream with tcp_loose, as Linux does)."""
    chain = _chain(1)
    chain.process(_p(_syn(10000)), EGRESS, S)
    chain.process(_p(_syn(10001)), EGRESS, S)  # drops the first
    ack = tcp_frame(src=INSIDE, dst=OUTSIDE, sport=10000, dport=80, seq=1001, ack=1,
                    flags=TCP_ACK, window=1000)
    out = chain.process(_p(ack), EGRESS, 2 * S)
    assert out.created and len(chain.flows) == 1
