"""Writing a host config: the typed model back into the dict (and TOML) form it was read from.

`to_dict` spells out every default, so a report records the effective config; `parse_config`
reads the dict back to an equal config (tests/test_config.py, and the config fuzz target).
"""

from __future__ import annotations

import ipaddress
from dataclasses import fields
from typing import Any

import tomli_w

from flowshift.config.model import (
    DIRECTIONS,
    PROTOCOLS,
    ConntrackConfig,
    DnatRule,
    HostConfig,
    LbPool,
    MachineConfig,
    Rule,
    SnatRule,
)
from flowshift.flow import format_endpoint

# -- writing ------------------------------------------------------------------------------


_PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
_DIRECTION_NAMES = {number: name for name, number in DIRECTIONS.items()}


def to_dict(cfg: HostConfig) -> dict[str, Any]:
    """The config as a JSON-able dict (every default spelled out); parse_config reads it back."""
    return {
        "pnic": {"capacity": cfg.pnic.capacity, "services": list(cfg.pnic.services)},
        "offload": {
            "policy": cfg.offload.policy,
            "elephant_packets": cfg.offload.elephant_packets,
            "elephant_bytes": cfg.offload.elephant_bytes,
            "idle_timeout": cfg.offload.idle_timeout,
            "report_interval": cfg.offload.report_interval,
        },
        "conntrack": _conntrack_dict(cfg.conntrack),
        "machine": [_machine_dict(m, cfg.conntrack) for m in cfg.machines],
        "live": {"peers": [_addr_text(a) for a in cfg.live.peers]},
    }


def handoff_config(cfg: HostConfig, index: int) -> dict[str, Any]:
    """What machine `index` hands its VNIC as its config: its table as `to_dict` writes it,
    with its whole conntrack table, since the VNIC reads it without the host's
    (`parse_machine` reads it back to the machine's config)."""
    machine = cfg.machines[index]
    out = _machine_dict(machine, machine.conntrack)  # no overrides: the whole table follows
    out["conntrack"] = _conntrack_dict(machine.conntrack)
    return out


def _conntrack_dict(ct: ConntrackConfig, base: ConntrackConfig | None = None) -> dict[str, Any]:
    """Every key (base None), or the keys that differ from `base` (a machine's overrides)."""
    return {f.name: getattr(ct, f.name) for f in fields(ct)
            if base is None or getattr(ct, f.name) != getattr(base, f.name)}


def to_toml(cfg: HostConfig) -> str:
    """The config as TOML text (every default spelled out); load_config reads it back."""
    return tomli_w.dumps(to_dict(cfg))


def _machine_dict(m: MachineConfig, host: ConntrackConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": m.name,
        "addresses": [str(n) for n in m.addresses],
        "public": [_addr_text(a) for a in m.public],
        "services": list(m.services),
        "start": m.start,
        "forwarding": m.forwarding,
    }
    if m.firewall is not None:
        out["firewall"] = {
            "default": "allow" if m.firewall.default_allow else "drop",
            "rule": [_rule_dict(r) for r in m.firewall.rules],
        }
    if m.nat is not None:
        out["nat"] = {
            "snat": [_snat_dict(s) for s in m.nat.snat],
            "dnat": [_dnat_dict(d) for d in m.nat.dnat],
        }
    if m.lb:
        out["lb"] = [_pool_dict(p) for p in m.lb]
    if m.conntrack != host:
        out["conntrack"] = _conntrack_dict(m.conntrack, host)
    return out


def _rule_dict(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {
        "action": "allow" if rule.allow else "drop",
        "direction": _DIRECTION_NAMES[rule.direction],
        "proto": _PROTOCOL_NAMES[rule.proto],
    }
    if rule.src is not None:
        out["src"] = str(rule.src)
    if rule.dst is not None:
        out["dst"] = str(rule.dst)
    if rule.dst_port:
        out["dst_port"] = [_ports_value(r) for r in rule.dst_port]
    if rule.icmp_type:
        out["icmp_type"] = list(rule.icmp_type)
    return out


def _ports_value(ports: tuple[int, int]) -> int | str:
    lo, hi = ports
    return lo if lo == hi else f"{lo}-{hi}"


def _snat_dict(rule: SnatRule) -> dict[str, Any]:
    out: dict[str, Any] = {"source": str(rule.source), "to": str(rule.to)}
    if rule.ports is not None:
        out["ports"] = _ports_value(rule.ports)
    return out


def _dnat_dict(rule: DnatRule) -> dict[str, Any]:
    return {
        "proto": _PROTOCOL_NAMES[rule.proto],
        "match": format_endpoint(rule.match_addr, rule.match_port),
        "to": format_endpoint(rule.to_addr, rule.to_port),
    }


def _pool_dict(pool: LbPool) -> dict[str, Any]:
    backends = [b.name if b.weight == 1 else f"{b.name}@{b.weight}" for b in pool.backends]
    return {
        "proto": _PROTOCOL_NAMES[pool.proto],
        "vip": format_endpoint(pool.vip, pool.port),
        "backends": backends,
        "scheduler": pool.scheduler,
    }


def _addr_text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))
