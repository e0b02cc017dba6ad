"""The classifier: which machine a packet belongs to and in which direction it travels.

The host steers by the machines' addresses, as a virtual switch steers by port: a packet from a
machine's inside address is that machine's egress; a packet to one of its public or inside
addresses is its ingress. The PNIC uses the same classifier (it sits in front of the host).
"""

from __future__ import annotations

from flowshift.config import MachineConfig
from flowshift.packet.view import Packet
from flowshift.services.rules import EGRESS, INGRESS

CLASSIFIER_CACHE = 1 << 16  # addresses whose machine is remembered


class Classifier:
    """The machine and direction of a packet, from the machines' addresses."""

    def __init__(self, machines: tuple[MachineConfig, ...]) -> None:
        self.inside: list[tuple[int, int, int, int]] = []  # (family, lo, hi, machine)
        self.public: dict[bytes, int] = {}
        self.cache: dict[bytes, int] = {}
        for i, m in enumerate(machines):
            for net in m.addresses:
                fam = 4 if net.version == 4 else 6
                lo = int(net.network_address)
                self.inside.append((fam, lo, lo + net.num_addresses - 1, i))
            for addr in m.public:
                self.public[addr] = i

    def _inside(self, family: int, addr: bytes) -> int:
        m = self.cache.get(addr)
        if m is None:
            if len(self.cache) >= CLASSIFIER_CACHE:  # spoofed sources must not grow it
                self.cache.clear()
            m = self.cache[addr] = self._inside_slow(family, addr)
        return m

    def _inside_slow(self, family: int, addr: bytes) -> int:
        v = int.from_bytes(addr, "big")
        for fam, lo, hi, m in self.inside:
            if fam == family and lo <= v <= hi:
                return m
        return -1

    def classify(self, pkt: Packet) -> tuple[int, int]:
        """(machine, EGRESS | INGRESS), or (-1, 0) when the packet is no machine's."""
        m = self._inside(pkt.family, pkt.src)
        if m >= 0:
            return m, EGRESS
        m = self.public.get(pkt.dst, -1)
        if m < 0:
            m = self._inside(pkt.family, pkt.dst)
        return (m, INGRESS) if m >= 0 else (-1, 0)


__all__ = ["CLASSIFIER_CACHE", "Classifier"]
