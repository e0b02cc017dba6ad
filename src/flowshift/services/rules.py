"""Firewall rule matching: the first matching rule decides, else the firewall's default.

Rules are written in machine-side addresses and judge the packet that starts a flow (see
design.md for where the chain calls this). A rule matches when every key it sets matches:
its direction, its protocol, src and dst networks of the packet's family (a rule with an
IPv4 network never matches IPv6, and the reverse), dst_port for TCP and UDP packets only and
icmp_type for ICMP and ICMPv6 packets only.

`RuleSet` compiles the rules once into plain integer tuples grouped by (direction, family),
so `decide` compares integers and never builds `ipaddress` objects per packet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowshift.flow import EGRESS, INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

if TYPE_CHECKING:
    from flowshift.config import FirewallConfig, Rule

__all__ = ["EGRESS", "INGRESS", "RuleSet"]  # the directions live in flow.py

_PORT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP})
_ICMP_PROTOS = frozenset({PROTO_ICMP, PROTO_ICMPV6})
_FAMILY_ADDR_LEN = {4: 4, 6: 16}

# (rule index, allow, proto or 0, src lo, src hi, dst lo, dst hi, port ranges or None,
#  icmp types or None)
_Compiled = tuple[
    int, bool, int, int, int, int, int, tuple[tuple[int, int], ...] | None, frozenset[int] | None
]


class RuleSet:
    """The compiled rules of one firewall."""

    def __init__(self, firewall: FirewallConfig) -> None:
        self.default_allow = firewall.default_allow
        self._groups: dict[tuple[int, int], tuple[_Compiled, ...]] = {}
        for direction in (EGRESS, INGRESS):
            for family, addr_len in _FAMILY_ADDR_LEN.items():
                self._groups[direction, addr_len] = tuple(
                    _compile(index, rule, addr_len)
                    for index, rule in enumerate(firewall.rules)
                    if rule.direction in (None, direction) and _family_fits(rule, family)
                )

    def group(self, direction: int, addr_len: int) -> tuple[_Compiled, ...]:
        """The rules `decide` reads for packets of this direction and address length, in
        order: (rule index, allow, proto or 0, src lo, src hi, dst lo, dst hi, dport ranges
        or None, ICMP types or None), addresses as integers."""
        return self._groups[direction, addr_len]

    def decide(
        self, direction: int, proto: int, src: bytes, dst: bytes, dport: int, icmp_type: int
    ) -> tuple[bool, int]:
        """(allowed, index of the deciding rule or -1 for the default) for a new flow's packet.

        `src` and `dst` are raw 4- or 16-byte addresses; `dport` counts for TCP/UDP only and
        `icmp_type` for ICMP/ICMPv6 only.
        """
        rules = self._groups.get((direction, len(src)))
        if rules is None:
            raise ValueError(
                f"direction must be EGRESS or INGRESS and addresses 4 or 16 bytes, got "
                f"direction {direction!r} with a {len(src)}-byte source"
            )
        s = int.from_bytes(src, "big")
        d = int.from_bytes(dst, "big")
        for index, allow, rproto, slo, shi, dlo, dhi, ports, types in rules:
            if rproto and rproto != proto:
                continue
            if not (slo <= s <= shi and dlo <= d <= dhi):
                continue
            if ports is not None and (
                proto not in _PORT_PROTOS or not any(lo <= dport <= hi for lo, hi in ports)
            ):
                continue
            if types is not None and (proto not in _ICMP_PROTOS or icmp_type not in types):
                continue
            return allow, index
        return self.default_allow, -1


def _family_fits(rule: Rule, family: int) -> bool:
    """Whether the rule's networks (if any) are all of `family`."""
    return all(net is None or net.version == family for net in (rule.src, rule.dst))


def _compile(index: int, rule: Rule, addr_len: int) -> _Compiled:
    everything = (0, (1 << (8 * addr_len)) - 1)
    slo, shi = (
        everything
        if rule.src is None
        else (int(rule.src.network_address), int(rule.src.broadcast_address))
    )
    dlo, dhi = (
        everything
        if rule.dst is None
        else (int(rule.dst.network_address), int(rule.dst.broadcast_address))
    )
    return (
        index,
        rule.allow,
        rule.proto,
        slo,
        shi,
        dlo,
        dhi,
        rule.dst_port or None,
        frozenset(rule.icmp_type) if rule.icmp_type else None,
    )
