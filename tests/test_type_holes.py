"""States the types rule out, reached anyway (hand-built objects): a clear error, not a crash
deep inside, and not an `assert` (which `python -O` strips)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from flowshift.config import MachineConfig
from flowshift.entry import Flow, field_offsets
from flowshift.flow import PROTO_TCP, FlowKey
from flowshift.offload import HandoffQueue
from flowshift.packet.build import tcp_frame
from flowshift.packet.parse import parse
from flowshift.packet.view import LINKTYPE_ETHERNET, TCP_ACK
from flowshift.services.chain import Chain, process_flow

A, B = b"\x0a\0\0\x01", b"\x0a\0\0\x02"
KEY = FlowKey(4, PROTO_TCP, 0, A, B, 40000, 80)


def test_firewall_service_without_its_section() -> None:
    machine = MachineConfig(name="m", addresses=(ipaddress.ip_network("10.0.0.0/24"),),
                            services=("firewall",))
    with pytest.raises(ValueError, match=r"'m'.*no firewall section"):
        Chain(machine, 0)


def test_tcp_flow_without_tcp_state() -> None:
    pkt = parse(tcp_frame(src=A, dst=B, sport=40000, dport=80, seq=1, ack=1, flags=TCP_ACK,
                          window=1000), LINKTYPE_ETHERNET)
    flow = Flow(key=KEY, xlat=KEY, machine=0, chain=0, tcp=None)
    with pytest.raises(ValueError, match="TCP flow without TCP state"):
        process_flow(pkt, flow, 0, 1)


def test_field_offsets_of_a_plain_field() -> None:
    assert field_offsets("seen1")["maxwin"] == 8
    with pytest.raises(ValueError, match="'owner' is not a sub-record"):
        field_offsets("owner")


@dataclass
class Item:
    index: int
    fkey: FlowKey | None


def test_queue_needs_the_flow_key() -> None:
    q: HandoffQueue[Item] = HandoffQueue()
    for put in (q.sent, q.hold):
        with pytest.raises(ValueError, match="packet 7 queued before its flow is known"):
            put(Item(7, None))
    q.sent(Item(8, KEY))
    assert q.in_flight(KEY)
