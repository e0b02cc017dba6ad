"""The offload: which flows the VNIC moves down to the PNIC, and the handoff that moves them.

Policy. Only flows the firewall considers established are candidates (a TCP connection in
ESTABLISHED, a UDP or ICMP flow that has seen a reply), never a first packet, and only flows of
a protocol the PNIC's data path runs (TCP, UDP, ICMP echo; the generic tracker's flows stay in
software). `elephant` takes a flow once it passes either threshold; `always` takes every
established flow; `never` none.

Handoff. While a flow's entry crosses the channel (an offload or a recall in transit), or while
packets of a flow that left the PNIC are still at the PNIC, later packets of that flow are held
at the VNIC; they are released in arrival order, before any later packet of the flow, once the
answer is applied. `HandoffQueue` keeps that bookkeeping: hold, transit and release.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from flowshift.config import OffloadConfig, PnicConfig
from flowshift.entry import SERVICE_NAMES, Flow, Status
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.services.conntrack_tcp import TcpState

POLICIES = ("never", "always", "elephant")
PNIC_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6})


def established(flow: Flow) -> bool:
    if flow.tcp is not None:
        return bool(flow.tcp.state == TcpState.ESTABLISHED)
    return bool(flow.status & Status.SEEN_REPLY)


class OffloadPolicy:
    def __init__(self, offload: OffloadConfig, pnic: PnicConfig) -> None:
        self.name = offload.policy
        self.packets = offload.elephant_packets
        self.bytes = offload.elephant_bytes
        supported = 0
        for name in pnic.services:
            supported |= SERVICE_NAMES[name]
        self.supported = int(supported)  # a plain int: IntFlag operators cost per offer

    def wants(self, flow: Flow) -> bool:
        """Is this flow a candidate for the PNIC now?"""
        if self.name == "never" or not established(flow):
            return False
        if flow.key.proto not in PNIC_PROTOCOLS:
            return False
        if self.name == "always":
            return True
        return (flow.packets[0] + flow.packets[1] >= self.packets
                or flow.bytes[0] + flow.bytes[1] >= self.bytes)

    def supports(self, flow: Flow) -> bool:
        """Does the PNIC run every service of the flow's chain?"""
        return flow.chain & ~self.supported == 0


class Held(Protocol):
    # read-only members, so that an item whose key is always known fits too
    @property
    def index(self) -> int: ...  # the packet's input index

    @property
    def fkey(self) -> FlowKey | None: ...  # the original key of its flow: known when queued


def _flow_of(item: Held) -> FlowKey:
    if item.fkey is None:
        raise ValueError(f"packet {item.index} queued before its flow is known")
    return item.fkey


P = TypeVar("P", bound=Held)


class HandoffQueue(Generic[P]):
    """Flows in transit between the VNIC and the PNIC, and the packets that wait for them.

    transit: a message (offload or recall, by sequence number) whose answer is not applied yet.
    in flight: packets handed to the PNIC whose results are not back yet.
    held: packets that arrived meanwhile, per flow, in arrival order.
    """

    def __init__(self) -> None:
        self.transit: dict[int, FlowKey] = {}  # seq -> flow
        self._in_transit: dict[FlowKey, int] = {}  # flow -> messages in transit
        self.held: dict[FlowKey, deque[P]] = {}
        self.inflight: dict[int, P] = {}  # packet index -> packet at the PNIC
        self._inflight_per_flow: dict[FlowKey, int] = {}
        self.held_total = 0  # packets ever held

    # -- transit ---------------------------------------------------------------------------

    def start(self, seq: int, fkey: FlowKey) -> None:
        self.transit[seq] = fkey
        self._in_transit[fkey] = self._in_transit.get(fkey, 0) + 1

    def answered(self, seq: int) -> FlowKey | None:
        """The flow whose message `seq` was answered (None: no such message in transit)."""
        fkey = self.transit.pop(seq, None)
        if fkey is not None:
            self._end(fkey)
        return fkey

    def cancel(self, fkey: FlowKey) -> None:
        """Every message of `fkey` in transit is answered (its entry came back)."""
        if fkey not in self._in_transit:
            return
        for seq in [s for s, k in self.transit.items() if k == fkey]:
            del self.transit[seq]
            self._end(fkey)

    def _end(self, fkey: FlowKey) -> None:
        left = self._in_transit[fkey] - 1
        if left:
            self._in_transit[fkey] = left
        else:
            del self._in_transit[fkey]

    def in_transit(self, fkey: FlowKey) -> bool:
        return fkey in self._in_transit

    # -- packets at the PNIC -----------------------------------------------------------------

    def sent(self, item: P) -> None:
        fkey = _flow_of(item)
        self.inflight[item.index] = item
        self._inflight_per_flow[fkey] = self._inflight_per_flow.get(fkey, 0) + 1

    def returned(self, index: int) -> tuple[P, bool] | None:
        """The packet `index` back from the PNIC, and whether it was its flow's last in flight
        (None: no such packet in flight)."""
        item = self.inflight.pop(index, None)
        if item is None:
            return None
        fkey = _flow_of(item)
        left = self._inflight_per_flow[fkey] - 1
        if left:
            self._inflight_per_flow[fkey] = left
        else:
            del self._inflight_per_flow[fkey]
        return item, not left

    def in_flight(self, fkey: FlowKey) -> bool:
        return fkey in self._inflight_per_flow

    # -- held packets ------------------------------------------------------------------------

    def hold(self, item: P) -> None:
        self.held.setdefault(_flow_of(item), deque()).append(item)
        self.held_total += 1

    def hold_back(self, item: P) -> None:
        """Hold a packet back from the PNIC that must wait after all: in arrival order,
        before the packets of its flow that came after it and wait already."""
        queue = self.held.setdefault(_flow_of(item), deque())
        at = len(queue)
        while at and queue[at - 1].index > item.index:
            at -= 1
        queue.insert(at, item)
        self.held_total += 1

    def is_held(self, fkey: FlowKey) -> bool:
        return fkey in self.held

    def release(self, fkey: FlowKey) -> deque[P]:
        """The held packets of a flow, in arrival order (the flow holds nothing after this)."""
        return self.held.pop(fkey, deque())

    def requeue(self, fkey: FlowKey, rest: deque[P]) -> None:
        """Put packets back at the end of a flow's queue: one of them had to wait again."""
        self.held[fkey].extend(rest)

    def held_flows(self) -> list[FlowKey]:
        return list(self.held)

    def pending(self, fkey: FlowKey) -> bool:
        """Has the flow any packet or message not settled yet? (the sweep leaves it alone)"""
        return fkey in self._in_transit or fkey in self.held or fkey in self._inflight_per_flow

    def busy(self) -> bool:
        return bool(self.transit or self.held or self.inflight)

    def __iter__(self) -> Iterator[FlowKey]:
        return iter(self._in_transit)


__all__ = ["PNIC_PROTOCOLS", "POLICIES", "HandoffQueue", "OffloadPolicy", "established"]
