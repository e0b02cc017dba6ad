"""The generator's view of a gateway machine: the translation the host will give each flow.

A gateway capture holds every packet as it enters the machine, so the far side of a
translated flow must already answer the translated tuple. The tuple is chosen here with the
host's own service code (services/nat.py, services/lb.py), in the order the host creates
flows, as services/chain.py `_new` does: ingress flows meet the LB, then DNAT; egress flows
meet SNAT.

SNAT and DNAT look at the tuples other flows hold (`in_use`). The host knows only the flows
alive at that moment; the generator cannot model every conntrack timeout, so it asks a
stricter question instead: has any flow of the trace held the tuple? When every candidate
the allocator looked at is free by that test, it is free for the host too, and both pick the
same tuple. Otherwise the flow's source port (or echo identifier) is drawn again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from flowshift.config import HostConfig
from flowshift.flow import FlowKey
from flowshift.services.lb import LoadBalancer
from flowshift.services.nat import Nat

ATTEMPTS = 64  # redraws of a flow's port before giving up on a free tuple

Target = tuple[int, bytes, int]  # (proto, wire-side address, port) that ingress flows open


class Gateway:
    """The first machine of a host config, as the flows of a generated trace cross it."""

    def __init__(self, config: HostConfig) -> None:
        m = config.machines[0]
        self.machine = m
        self.nat = Nat(m.nat) if "nat" in m.services and m.nat is not None else None
        self.lb = LoadBalancer(m.lb) if "lb" in m.services and m.lb else None
        self.used: set[FlowKey] = set()  # both keys of every flow so far

    def targets(self) -> list[Target]:
        """The wire-side endpoints ingress flows open: LB VIPs, then DNAT matches."""
        out: list[Target] = []
        if self.lb is not None:
            out += [(p.proto, p.vip, p.port) for p in self.machine.lb]
        if self.nat is not None and self.machine.nat is not None:
            out += [(r.proto, r.match_addr, r.match_port) for r in self.machine.nat.dnat]
        return out

    def owns(self, addr: bytes) -> bool:
        """Is `addr` one the host steers to this machine (an inside or a public address)?"""
        if addr in self.machine.public:
            return True
        ip = ipaddress.ip_address(addr)
        return any(ip.version == n.version and ip in n for n in self.machine.addresses)

    def open(
        self, key: FlowKey, ingress: bool, redraw: Callable[[FlowKey], FlowKey] | None = None
    ) -> tuple[FlowKey, FlowKey]:
        """(key, xlat) of a new flow, as the host will translate it.

        `redraw(key)` gives the same flow with another client port; without it (spoofed
        attack packets) the first translation is taken as it is. ValueError: no port gave a
        tuple the host is sure to pick.
        """
        state = self.lb.state() if self.lb is not None else None
        for _ in range(ATTEMPTS):
            xlat, exact = self._translate(key, ingress)
            if exact or redraw is None:
                break
            if self.lb is not None and state is not None:
                self.lb.restore(state)  # the host picks once per flow
            key = redraw(key)
        else:
            raise ValueError(f"no free translated tuple for {key} after {ATTEMPTS} ports")
        self.used.add(key)
        self.used.add(xlat.reversed())
        return key, xlat

    def _translate(self, key: FlowKey, ingress: bool) -> tuple[FlowKey, bool]:
        """The flow's xlat tuple, and whether the host is sure to choose the same one."""
        used = self.used
        exact = key not in used and key.reversed() not in used
        if ingress:
            xlat = key
            pool = self.lb.pool_for(key) if self.lb is not None else None
            if pool is not None and self.lb is not None:
                backend, addr, port = self.lb.pick(pool, key)
                if backend >= 0:
                    xlat = key._replace(dst=addr, dport=port)
            elif self.nat is not None:
                xlat = self.nat.dnat(key, key)
            return xlat, exact and xlat.reversed() not in used
        if self.nat is None:
            return key, exact
        clash = False

        def in_use(reply: FlowKey) -> bool:
            nonlocal clash
            hit = reply in used
            clash = clash or hit
            return hit

        snat = self.nat.snat(key, in_use)
        if snat is None:
            return key, False
        return snat, exact and not clash
