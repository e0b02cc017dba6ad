"""NAT: SNAT of egress flows and DNAT of ingress flows, chosen once per flow.

The choice becomes the flow's `xlat` tuple (entry.py); translating its packets afterwards needs
the entry alone (xlat.py), so any tier can run it. Tuple choice follows Linux (nat_alloc.py).
"""

from __future__ import annotations

from collections.abc import Callable

from flowshift.config import NatConfig, SnatRule
from flowshift.flow import FlowKey
from flowshift.services.nat_alloc import allocate


class Nat:
    def __init__(self, config: NatConfig | None) -> None:
        self.snat_rules = config.snat if config else ()
        # each rule's sources as (address length, network, netmask) in integers, worked out
        # once: a new flow's source is matched without building an ipaddress object
        self._sources: list[tuple[int, int, int, SnatRule]] = [
            (rule.source.max_prefixlen // 8, int(rule.source.network_address),
             int(rule.source.netmask), rule) for rule in self.snat_rules]
        self.dnat_rules = {(r.proto, r.match_addr, r.match_port): r
                           for r in (config.dnat if config else ())}

    def snat(self, key: FlowKey, in_use: Callable[[FlowKey], bool],
             evict: Callable[[FlowKey], bool] | None = None) -> FlowKey | None:
        """The translated original tuple of a new egress flow; None: no free tuple. `evict`:
        see nat_alloc.allocate (a closing flow's tuple reused by a new SYN)."""
        src = key.src
        size, value = len(src), int.from_bytes(src, "big")
        for rule_size, network, netmask, rule in self._sources:
            if rule_size == size and value & netmask == network:  # src in rule.source
                return allocate(key, rewrite_src=True, addrs=rule.to, ports=rule.ports,
                                in_use=in_use, evict=evict)
        return key

    def dnat(self, key: FlowKey, xlat: FlowKey) -> FlowKey:
        """The machine-side destination of a new ingress flow (unchanged when no rule)."""
        rule = self.dnat_rules.get((key.proto, key.dst, key.dport))
        if rule is None:
            return xlat
        return xlat._replace(dst=rule.to_addr, dport=rule.to_port)
