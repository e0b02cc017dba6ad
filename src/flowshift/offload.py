"""The offload policy: which flows the VNIC moves down to the PNIC, and whether it can.

Only flows the firewall considers established are candidates (a TCP connection in ESTABLISHED,
a UDP or ICMP flow that has seen a reply), never a first packet. `elephant` takes a flow once
it passes either threshold; `always` takes every established flow; `never` none.
"""

from __future__ import annotations

from flowshift.config import OffloadConfig, PnicConfig
from flowshift.entry import SERVICE_NAMES, Flow, Status
from flowshift.services.conntrack_tcp import TcpState

POLICIES = ("never", "always", "elephant")


def established(flow: Flow) -> bool:
    if flow.tcp is not None:
        return flow.tcp.state == TcpState.ESTABLISHED
    return bool(flow.status & Status.SEEN_REPLY)


class OffloadPolicy:
    def __init__(self, offload: OffloadConfig, pnic: PnicConfig) -> None:
        self.name = offload.policy
        self.packets = offload.elephant_packets
        self.bytes = offload.elephant_bytes
        supported = 0
        for name in pnic.services:
            supported |= SERVICE_NAMES[name]
        self.supported = supported

    def wants(self, flow: Flow) -> bool:
        """Is this flow a candidate for the PNIC now?"""
        if self.name == "never" or not established(flow):
            return False
        if self.name == "always":
            return True
        return (flow.packets[0] + flow.packets[1] >= self.packets
                or flow.bytes[0] + flow.bytes[1] >= self.bytes)

    def supports(self, flow: Flow) -> bool:
        """Does the PNIC run every service of the flow's chain?"""
        return flow.chain & ~self.supported == 0
