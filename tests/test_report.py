"""report.py: the flow dump lines, the counters, the JSON report and the summary table."""

from __future__ import annotations

import re
from decimal import Decimal
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from flowshift.entry import Flow, Status
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.host import HostStats
from flowshift.replay import seconds_text
from flowshift.report import (
    HIST_MAX_BINS,
    NS,
    Tally,
    build_report,
    flow_dump,
    flow_line,
    summary_table,
)
from flowshift.services.conntrack_tcp import TcpConn, TcpState
from flowshift.verdict import Verdict

IN4, OUT4, NAT4 = bytes([10, 0, 0, 2]), bytes([203, 0, 113, 2]), bytes([203, 0, 113, 1])
IN6 = bytes.fromhex("fd00" + "00" * 13 + "02")
OUT6 = bytes.fromhex("20010db8" + "00" * 11 + "02")


def view(key: FlowKey, xlat: FlowKey | None = None, *, state: int | None = None,
         status: int = 0, expires: int = 432_000 * NS, machine: str = "gw",
         tier: str = "pnic") -> SimpleNamespace:
    tcp = TcpConn(state=state) if state is not None else None
    flow = Flow(key=key, xlat=xlat or key, machine=0, chain=1, tcp=tcp, status=status,
                expires=expires, packets=[10, 8], bytes=[5000, 400])
    return SimpleNamespace(flow=flow, machine=machine, tier=tier)


def test_tcp_line_is_conntrack_order_with_nat_reply_tuple() -> None:
    key = FlowKey(4, PROTO_TCP, 0, IN4, OUT4, 41000, 5201)
    xlat = key._replace(src=NAT4)
    line = flow_line(view(key, xlat, state=TcpState.ESTABLISHED,
                          status=Status.SEEN_REPLY | Status.ASSURED), now_ns=1 * NS)
    assert line == (
        "tcp      6 431999 ESTABLISHED src=10.0.0.2 dst=203.0.113.2 sport=41000 dport=5201 "
        "packets=10 bytes=5000 src=203.0.113.2 dst=203.0.113.1 sport=5201 dport=41000 "
        "packets=8 bytes=400 [ASSURED] machine=gw tier=pnic")


def test_unreplied_goes_between_the_tuples_and_expiry_never_negative() -> None:
    key = FlowKey(4, PROTO_UDP, 0, IN4, OUT4, 5353, 53)
    line = flow_line(view(key, expires=5 * NS, tier="vnic"), now_ns=9 * NS)
    assert line.startswith("udp      17 0 src=10.0.0.2 ")
    assert " bytes=5000 [UNREPLIED] src=203.0.113.2 dst=10.0.0.2 sport=53 dport=5353 " in line
    assert "[ASSURED]" not in line
    assert line.endswith("machine=gw tier=vnic")


def test_icmp_echo_lines_show_type_code_id() -> None:
    v4 = flow_line(view(FlowKey(4, PROTO_ICMP, 0, IN4, OUT4, 77, 77),
                        status=Status.SEEN_REPLY, expires=30 * NS), now_ns=0)
    assert v4.startswith("icmp     1 30 src=10.0.0.2 dst=203.0.113.2 type=8 code=0 id=77 ")
    assert "src=203.0.113.2 dst=10.0.0.2 type=0 code=0 id=77 " in v4
    assert "[UNREPLIED]" not in v4
    v6 = flow_line(view(FlowKey(6, PROTO_ICMPV6, 0, IN6, OUT6, 9, 9)), now_ns=0)
    assert v6.startswith("icmpv6   58 ")
    assert "src=fd00::2 dst=2001:db8::2 type=128 code=0 id=9 " in v6
    assert "type=129 code=0 id=9 " in v6


def test_dump_is_sorted_whatever_the_input_order() -> None:
    views = [view(FlowKey(4, PROTO_UDP, 0, IN4, OUT4, p, 53), machine=m)
             for m in ("lab", "gw") for p in (9, 3)]
    text = flow_dump(views, 0)
    assert text == flow_dump(list(reversed(views)), 0)
    lines = text.splitlines()
    assert [re.search(r"sport=(\d+)", s)[1] for s in lines] == ["3", "9", "3", "9"]
    assert [s.rsplit("machine=", 1)[1].split()[0] for s in lines] == ["gw", "gw", "lab", "lab"]


@settings(max_examples=200)
@given(st.integers(-(10**15), 10**15))
def test_seconds_text_is_exact(delta: int) -> None:
    text = seconds_text(delta)
    assert re.fullmatch(r"-?\d+\.\d{9}", text)
    assert Decimal(text) * NS == delta


def test_coarsen_keeps_every_packet() -> None:
    tally = Tally()
    for b in range(HIST_MAX_BINS):
        tally.rate[(b, "vnic")] = 2
        tally.rate[(b, "pnic")] = 1
    tally.coarsen()
    assert tally.bin_ns == 2 * 1_000_000
    assert max(b for b, _ in tally.rate) == HIST_MAX_BINS // 2 - 1
    assert sum(n for (_, t), n in tally.rate.items() if t == "vnic") == 2 * HIST_MAX_BINS
    assert tally.rate[(0, "pnic")] == 2


def fake_stats() -> HostStats:
    return HostStats(
        offloads_to_vnic=1, offloads_to_pnic=3, refused={"full": 2}, returned={"closed": 3},
        flows_total=4, peak_first_cache=4, peak_second_cache=2,
        events=[(0, "offload", ""), (5, "return", ""), (6, "offload", "")], occupancy=[])


def test_report_groups_the_counts() -> None:
    tally = Tally()
    tally.counts = {
        (Verdict.FORWARD, "rule:0", "machine", "gw", "egress"): [3, 300],
        (Verdict.FORWARD, "established", "pnic", "gw", "ingress"): [5, 5000],
        (Verdict.DROP, "default", "vnic", "gw", "ingress"): [2, 120],
        (Verdict.DROP, "invalid", "vnic", "lab", "egress"): [1, 60],
        (Verdict.BYPASS, "not-ip", "", "", ""): [4, 240],
        (Verdict.UNPARSED, "truncated-ip", "", "", ""): [1, 20],
    }
    tally.out_packets = 12
    trace = {"path": "/x/t.pcap", "packets": 16, "first_ts": 1.0, "duration": 2.5,
             "problem": None}
    r = build_report(tally, fake_stats(), version="9", trace=trace, options={}, config={},
                     schedule=[], outputs={}, wall_seconds=0.5)
    assert r["packets"] == {"in": 16, "forwarded": 8, "dropped": 3, "bypass": 4,
                            "unparsed": 1, "out": 12}
    assert r["tiers"]["pnic"] == {"packets": 5, "bytes": 5000, "share": round(5 / 11, 6)}
    assert r["tiers"]["machine"]["packets"] == 3
    assert r["drops"] == {"default": 2, "invalid": 1}
    assert r["unparsed"] == {"truncated-ip": 1}
    assert r["bypass_reasons"] == {"not-ip": 4}
    assert r["machines"]["gw"] == {"egress": 3, "ingress": 7, "forwarded": 8, "dropped": 2}
    assert r["machines"]["lab"]["dropped"] == 1
    assert r["offloads"]["refused"] == {"full": 2}
    assert r["events"] == {"offload": 2, "return": 1}
    assert r["timing"]["packets_per_second"] == 32.0

    console = Console(record=True, width=120)
    console.print(summary_table(r))
    text = console.export_text()
    for needle in ("t.pcap", "packets in", "16", "tier pnic", "45.5%", "default 2, invalid 1",
                   "full 2", "closed 3", "32 packets/s"):
        assert needle in text
