"""The chains as the compiled opening of flows reads them (tiers/_fastpath_open.py): one row
of `zone` per machine, the firewalls' rules and the NATs' source rules as int64 arrays.

Built once from the host's config, as the chains build their own (services/rules.py,
services/nat.py); the host writes a zone's Z_OPEN, Z_TIER and Z_OFFER_AT when its machine's
chain changes hands, and the VNIC zones' Z_UNTIL (and Z_OPEN) when their bound changes
(`Host._open_zones`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowshift.config import MachineConfig
from flowshift.entry import Service, chain_bits
from flowshift.flow import EGRESS, INGRESS
from flowshift.services.rules import RuleSet
from flowshift.tiers import _fastpath_open as ko
from flowshift.tiers._pnic_index import address_words

_SIGN = 1 << 63


def _signed(u: int) -> int:
    """The int64 bit pattern of an unsigned 64-bit value."""
    return u - (1 << 64) if u & _SIGN else u


def _words(value: int, addr_len: int) -> tuple[int, int]:
    """An address (an integer, as ipaddress gives it) as the parser's two big-endian words,
    their int64 bit patterns."""
    hi, lo = address_words(value.to_bytes(addr_len, "big"))
    return _signed(hi), _signed(lo)


def _ordered(value: int, addr_len: int) -> tuple[int, int]:
    """`_words` with the sign bits flipped: signed comparison orders them as addresses."""
    hi, lo = _words(value, addr_len)
    return hi ^ -_SIGN, lo ^ -_SIGN


@dataclass(frozen=True)
class OpenTables:
    """What `open_flow` reads of the chains (column layouts: _fastpath_open)."""

    zone: np.ndarray  # int64 [zones, Z_N]
    rules: np.ndarray  # int64 [rules, R_N]
    ports: np.ndarray  # int64 [ranges, 2]
    snat: np.ndarray  # int64 [source rules, S_N]


def open_tables(machines: tuple[MachineConfig, ...] | list[MachineConfig],
                zones: int) -> OpenTables:
    """The tables for these machines; `zones` rows in all (the kernels' knob table may have
    more zones than machines: those open nothing)."""
    zone = np.zeros((max(zones, len(machines), 1), ko.Z_N), np.int64)
    rules: list[list[int]] = []
    ports: list[tuple[int, int]] = []
    snat: list[list[int]] = []
    for z, m in enumerate(machines):
        services = chain_bits(m.services)
        row = zone[z]
        row[ko.Z_SERVICES] = services
        if services & Service.FIREWALL and m.firewall is not None:
            ruleset = RuleSet(m.firewall)
            row[ko.Z_FIREWALL] = 1
            row[ko.Z_DEFAULT_ALLOW] = int(ruleset.default_allow)
            for direction in (EGRESS, INGRESS):
                for six, addr_len in ((0, 4), (1, 16)):
                    at = ko.Z_RULES + 2 * (2 * direction + six)
                    row[at] = len(rules)
                    for index, allow, proto, slo, shi, dlo, dhi, dports, types in ruleset.group(
                            direction, addr_len):
                        first = len(ports)
                        ports.extend(dports or ())
                        rules.append([index, int(allow), proto,
                                      *_ordered(slo, addr_len), *_ordered(shi, addr_len),
                                      *_ordered(dlo, addr_len), *_ordered(dhi, addr_len),
                                      first, len(ports), int(dports is None),
                                      int(types is not None), *_type_mask(types)])
                    row[at + 1] = len(rules)
        nat = m.nat if services & Service.NAT else None
        if nat is not None and nat.snat:
            row[ko.Z_SNAT] = 1
            row[ko.Z_SNAT_ROWS] = len(snat)
            for rule in nat.snat:
                addr_len = rule.source.max_prefixlen // 8
                to = rule.to
                one = to.first == to.last and len(to.first) == addr_len
                lo, hi = rule.ports if rule.ports is not None else (-1, -1)
                snat.append([addr_len, *_words(int(rule.source.network_address), addr_len),
                             *_words(int(rule.source.netmask), addr_len),
                             *(_words(int.from_bytes(to.first, "big"), addr_len) if one
                               else (0, 0)), int(one), lo, hi])
            row[ko.Z_SNAT_ROWS + 1] = len(snat)
        lb = services & Service.LB and bool(m.lb)
        row[ko.Z_INGRESS_SOFTWARE] = int(bool(lb) or (nat is not None and bool(nat.dnat)))
    return OpenTables(zone, _table(rules, ko.R_N), _table(ports, 2), _table(snat, ko.S_N))


def _type_mask(types: frozenset[int] | None) -> list[int]:
    """ICMP types as four words of a 256-bit mask (type t: bit t % 64 of word t // 64)."""
    words = [0, 0, 0, 0]
    for t in types or ():
        words[t >> 6] |= 1 << (t & 63)
    return [_signed(w) for w in words]


def _table(rows: list[list[int]] | list[tuple[int, int]], width: int) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, width)
