"""Reading a host config: TOML (or an already decoded dict) into the typed model.

`load_config` reads a file, `parse_config` validates an already decoded dict (from TOML or
JSON). Every problem is a `ConfigError` whose text is one line: the file, the key path
(`machine[1].firewall.rule[3].dst_port`, array indices counted from 0) and what is wrong.
docs/config.md is the reference of every key, its default and its checks. Defaults come from
the model's classes (model.py), never written here.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flowshift.config.model import (
    ACTIONS,
    DIRECTIONS,
    FORWARDINGS,
    MAX_CAPACITY,
    MAX_COUNT,
    MAX_CT_MAX,
    MAX_CT_RETRANS,
    MAX_CT_SECONDS,
    MAX_SECONDS,
    MAX_WEIGHT,
    NAME_RE,
    POLICIES,
    PORT_PROTOCOLS,
    PROTOCOLS,
    SCHEDULERS,
    SECTION_SERVICES,
    SERVICES,
    STARTS,
    Backend,
    ConfigError,
    ConntrackConfig,
    DnatRule,
    FirewallConfig,
    HostConfig,
    LbPool,
    LiveConfig,
    MachineConfig,
    NatConfig,
    Network,
    OffloadConfig,
    PnicConfig,
    PortRanges,
    Rule,
    SnatRule,
    fields_default,
)
from flowshift.flow import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    AddressRange,
    format_endpoint,
)

# the model's defaults, in the form the file writes them
_PNIC = PnicConfig()
_OFFLOAD = OffloadConfig()
_FIREWALL_DEFAULT = "allow" if FirewallConfig().default_allow else "drop"
_MACHINE_START = fields_default(MachineConfig, "start")
_MACHINE_FORWARDING = fields_default(MachineConfig, "forwarding")
_POOL_SCHEDULER = fields_default(LbPool, "scheduler")
_BACKEND_WEIGHT = fields_default(Backend, "weight")
_RULE_PROTO = next(k for k, v in PROTOCOLS.items() if v == fields_default(Rule, "proto"))
_RULE_DIRECTION = next(k for k, v in DIRECTIONS.items() if v == fields_default(Rule, "direction"))


# -- reading ------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> HostConfig:
    """Read and validate a TOML host config file."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as err:
        raise ConfigError(source, "", f"cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(source, f"line {line}", "not UTF-8 text (TOML must be)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, *_toml_where(str(err))) from None
    except RecursionError:
        raise ConfigError(source, "", "TOML syntax error: nested too deeply") from None
    return parse_config(data, source)


_TOML_AT = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|(end of document))\)")


def _toml_where(message: str) -> tuple[str, str]:
    m = _TOML_AT.fullmatch(message)
    if m is None:
        return "", f"TOML syntax error: {message}"
    where = m[4] if m[4] else f"line {m[2]}, column {m[3]}"
    return where, f"TOML syntax error: {m[1]}"


def parse_config(data: dict[str, Any], source: str = "<config>") -> HostConfig:
    """Validate a decoded config (TOML or JSON); `source` names it in errors."""
    at = _At(source)
    t = _table(at, data, ("machine",), ("pnic", "offload", "live", "conntrack"))
    pnic = _pnic(at.key("pnic"), t.get("pnic", {}))
    offload = _offload(at.key("offload"), t.get("offload", {}))
    conntrack = _conntrack(at.key("conntrack"), t.get("conntrack", {}), ConntrackConfig())
    items = _items(at.key("machine"), t["machine"], "[[machine]]", "needs at least one machine")
    machines = tuple(_machine(a, v, conntrack) for a, v in items)
    _check_machines(at, machines)
    live = _live(at.key("live"), t.get("live", {}))
    return HostConfig(pnic=pnic, offload=offload, machines=machines, live=live,
                      conntrack=conntrack)


def parse_machine(data: object, source: str = "<machine>") -> MachineConfig:
    """Validate one machine's table, as a host config's `[[machine]]` holds it, on its own (a
    handoff's config): what `parse_config` makes of a host of this one machine with every
    other table left to its defaults, errors named alike (`machine[0]....`). Its
    `[machine.conntrack]` sets keys over Linux's defaults."""
    return _machine(_At(source).key("machine").item(0), data, _CONNTRACK)


_CT_FIELDS = {f.name: f.type for f in fields(ConntrackConfig)}
_CONNTRACK = ConntrackConfig()


def _conntrack(at: _At, raw: object, base: ConntrackConfig) -> ConntrackConfig:
    """A [conntrack] table: the keys it sets over `base` (sysctl values: booleans may be
    written 0 / 1, timeouts are whole seconds >= 1)."""
    t = _table(at, raw, (), tuple(_CT_FIELDS))
    values: dict[str, Any] = {}
    for key, value in t.items():
        a = at.key(key)
        if _CT_FIELDS[key] in (bool, "bool"):
            if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
                value = bool(value)
            if not isinstance(value, bool):
                raise a.error(f"expected true / false (or 0 / 1), got {_kind(value)}")
            values[key] = value
        elif key == "tcp_max_retrans":
            values[key] = _int(a, value, 0, MAX_CT_RETRANS)
        elif key == "max" or key.endswith("_high_thresh"):
            values[key] = _int(a, value, 0, MAX_CT_MAX)
        else:
            values[key] = _int(a, value, 1, MAX_CT_SECONDS)
    return replace(base, **values)


def _live(at: _At, raw: object) -> LiveConfig:
    """Peers that clash with a machine's addresses are refused by `flowshift live up`, which
    also checks the defaults."""
    t = _table(at, raw, (), ("peers",))
    if "peers" not in t:
        return LiveConfig()
    peers: list[bytes] = []
    for a, v in _items(at.key("peers"), t["peers"]):
        addr = _address(a, v)
        ip = ipaddress.ip_address(addr)
        if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
            raise a.error(f"{ip} is not a unicast address a peer can have")
        if addr in peers:
            raise a.error(f"peer {ip} listed twice")
        peers.append(addr)
    return LiveConfig(peers=tuple(peers))


def _pnic(at: _At, raw: object) -> PnicConfig:
    t = _table(at, raw, (), ("capacity", "services"))
    capacity = _int(at.key("capacity"), t.get("capacity", _PNIC.capacity), 0, MAX_CAPACITY)
    services = _services(at.key("services"), t.get("services", list(_PNIC.services)))
    return PnicConfig(capacity=capacity, services=services)


def _offload(at: _At, raw: object) -> OffloadConfig:
    d = _OFFLOAD
    t = _table(
        at,
        raw,
        (),
        ("policy", "elephant_packets", "elephant_bytes", "idle_timeout", "report_interval"),
    )
    return OffloadConfig(
        policy=_choice(at.key("policy"), t.get("policy", d.policy), POLICIES, "policy"),
        elephant_packets=_int(
            at.key("elephant_packets"), t.get("elephant_packets", d.elephant_packets), 0, MAX_COUNT
        ),
        elephant_bytes=_int(
            at.key("elephant_bytes"), t.get("elephant_bytes", d.elephant_bytes), 0, MAX_COUNT
        ),
        idle_timeout=_seconds(at.key("idle_timeout"), t.get("idle_timeout", d.idle_timeout)),
        report_interval=_seconds(
            at.key("report_interval"), t.get("report_interval", d.report_interval)
        ),
    )


def _machine(at: _At, raw: object, conntrack: ConntrackConfig) -> MachineConfig:
    t = _table(
        at, raw, ("name", "addresses", "services"),
        ("public", "start", "forwarding", "firewall", "nat", "lb", "conntrack"),
    )
    name = _str(at.key("name"), t["name"])
    if not NAME_RE.fullmatch(name):
        raise at.key("name").error(
            f"bad machine name {_short(name)}: 1-32 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    items = _items(at.key("addresses"), t["addresses"], empty="needs at least one network")
    addresses = tuple(_network(a, v) for a, v in items)
    public = tuple(_address(a, v) for a, v in _items(at.key("public"), t.get("public", [])))
    for i, addr in enumerate(public):
        if addr in public[:i]:
            raise at.key("public").item(i).error(f"{_addr_text(addr)} listed twice")
    services = _services(at.key("services"), t["services"])
    for service in SECTION_SERVICES:
        if service in services and service not in t:
            raise at.key(service).error(f"section missing: services lists {service!r}")
        if service in t and service not in services:
            raise at.key(service).error(f"section present but services lacks {service!r}")
    firewall = _firewall(at.key("firewall"), t["firewall"]) if "firewall" in t else None
    nat = _nat(at.key("nat"), t["nat"]) if "nat" in t else None
    lb_items = _items(at.key("lb"), t.get("lb", []), "[[machine.lb]]")
    lb = tuple(_pool(a, v) for a, v in lb_items)
    if "lb" in services and not lb:
        raise at.key("lb").error("services lists 'lb' but there is no pool")
    machine = MachineConfig(
        name=name,
        addresses=addresses,
        public=public,
        services=services,
        start=_choice(at.key("start"), t.get("start", _MACHINE_START), STARTS, "start tier"),
        forwarding=_choice(at.key("forwarding"), t.get("forwarding", _MACHINE_FORWARDING),
                           FORWARDINGS, "forwarding"),
        firewall=firewall,
        nat=nat,
        lb=lb,
        conntrack=_conntrack(at.key("conntrack"), t.get("conntrack", {}), conntrack),
    )
    _check_wire_side(at, machine)
    return machine


def _firewall(at: _At, raw: object) -> FirewallConfig:
    t = _table(at, raw, (), ("default", "rule"))
    default = _choice(at.key("default"), t.get("default", _FIREWALL_DEFAULT), ACTIONS, "action")
    items = _items(at.key("rule"), t.get("rule", []), "[[machine.firewall.rule]]")
    return FirewallConfig(
        default_allow=default == "allow", rules=tuple(_rule(a, v) for a, v in items)
    )


def _rule(at: _At, raw: object) -> Rule:
    t = _table(at, raw, ("action",), ("direction", "proto", "src", "dst", "dst_port", "icmp_type"))
    proto_name = _choice(at.key("proto"), t.get("proto", _RULE_PROTO), PROTOCOLS, "protocol")
    direction = _choice(
        at.key("direction"), t.get("direction", _RULE_DIRECTION), DIRECTIONS, "direction"
    )
    src = _network(at.key("src"), t["src"]) if "src" in t else None
    dst = _network(at.key("dst"), t["dst"]) if "dst" in t else None
    dst_port: PortRanges = ()
    if "dst_port" in t:
        items = _items(
            at.key("dst_port"), t["dst_port"], empty="must not be empty (omit it to match any port)"
        )
        dst_port = tuple(_port_range(a, v, 0) for a, v in items)
    icmp_type: tuple[int, ...] = ()
    if "icmp_type" in t:
        items = _items(
            at.key("icmp_type"),
            t["icmp_type"],
            empty="must not be empty (omit it to match any type)",
        )
        icmp_type = tuple(_int(a, v, 0, 255) for a, v in items)
    rule = Rule(
        allow=_choice(at.key("action"), t["action"], ACTIONS, "action") == "allow",
        direction=DIRECTIONS[direction],
        proto=PROTOCOLS[proto_name],
        src=src,
        dst=dst,
        dst_port=dst_port,
        icmp_type=icmp_type,
    )
    _check_rule_can_match(at, rule, proto_name)
    return rule


def _check_rule_can_match(at: _At, rule: Rule, proto_name: str) -> None:
    """A rule that can never match is a mistake in the config: say which keys conflict."""
    if rule.src and rule.dst and rule.src.version != rule.dst.version:
        raise at.key("dst").error(
            f"IPv{rule.dst.version} but src is IPv{rule.src.version}: the rule could never match"
        )
    if rule.dst_port and rule.proto not in (0, PROTO_TCP, PROTO_UDP):
        raise at.key("dst_port").error(f"applies to tcp and udp only, not proto {proto_name!r}")
    if rule.icmp_type and rule.proto not in (0, PROTO_ICMP, PROTO_ICMPV6):
        raise at.key("icmp_type").error(
            f"applies to icmp and icmpv6 only, not proto {proto_name!r}"
        )
    if rule.dst_port and rule.icmp_type:
        raise at.key("icmp_type").error("cannot be combined with dst_port (tcp/udp only)")
    network = rule.src or rule.dst
    family = {PROTO_ICMP: 4, PROTO_ICMPV6: 6}.get(rule.proto)
    if network is not None and family is not None and network.version != family:
        raise at.key("proto").error(
            f"{proto_name!r} is IPv{family} only but the rule's addresses are IPv{network.version}"
        )


def _nat(at: _At, raw: object) -> NatConfig:
    t = _table(at, raw, (), ("snat", "dnat"))
    snat = tuple(
        _snat(a, v) for a, v in _items(at.key("snat"), t.get("snat", []), "[[machine.nat.snat]]")
    )
    dnat = tuple(
        _dnat(a, v) for a, v in _items(at.key("dnat"), t.get("dnat", []), "[[machine.nat.dnat]]")
    )
    if not snat and not dnat:
        raise at.error("has no snat or dnat rule")
    return NatConfig(snat=snat, dnat=dnat)


def _snat(at: _At, raw: object) -> SnatRule:
    t = _table(at, raw, ("source", "to"), ("ports",))
    source = _network(at.key("source"), t["source"])
    to = _address_range(at.key("to"), t["to"])
    if to.family != source.version:
        raise at.key("to").error(f"IPv{to.family} but source {source} is IPv{source.version}")
    ports = _port_range(at.key("ports"), t["ports"], 1) if "ports" in t else None
    return SnatRule(source=source, to=to, ports=ports)


def _dnat(at: _At, raw: object) -> DnatRule:
    t = _table(at, raw, ("proto", "match", "to"), ())
    proto = _choice(at.key("proto"), t["proto"], PORT_PROTOCOLS, "protocol")
    match_addr, match_port = _endpoint(at.key("match"), t["match"])
    to_addr, to_port = _endpoint(at.key("to"), t["to"])
    if len(to_addr) != len(match_addr):
        raise at.key("to").error(
            f"{_family(to_addr)} but match {format_endpoint(match_addr, match_port)} is "
            f"{_family(match_addr)}"
        )
    return DnatRule(
        proto=PORT_PROTOCOLS[proto],
        match_addr=match_addr,
        match_port=match_port,
        to_addr=to_addr,
        to_port=to_port,
    )


def _pool(at: _At, raw: object) -> LbPool:
    t = _table(at, raw, ("proto", "vip", "backends"), ("scheduler",))
    proto = _choice(at.key("proto"), t["proto"], PORT_PROTOCOLS, "protocol")
    vip, port = _endpoint(at.key("vip"), t["vip"])
    items = _items(at.key("backends"), t["backends"], empty="must not be empty")
    backends: list[Backend] = []
    for a, v in items:
        backend = _backend(a, v)
        if len(backend.addr) != len(vip):
            raise a.error(
                f"{_family(backend.addr)} backend {backend.name} for "
                f"{_family(vip)} vip {format_endpoint(vip, port)}"
            )
        if any(b.name == backend.name for b in backends):
            raise a.error(f"backend {backend.name} listed twice")
        backends.append(backend)
    scheduler = _choice(
        at.key("scheduler"), t.get("scheduler", _POOL_SCHEDULER), SCHEDULERS, "scheduler"
    )
    return LbPool(
        proto=PORT_PROTOCOLS[proto],
        vip=vip,
        port=port,
        backends=tuple(backends),
        scheduler=scheduler,
    )


_WEIGHT_RE = re.compile(r"-?[0-9]+")


def _backend(at: _At, raw: object) -> Backend:
    text = _str(at, raw)
    endpoint, sep, weight_text = text.partition("@")
    addr, port = _endpoint(at, endpoint)
    weight = _BACKEND_WEIGHT
    if sep:
        if not _WEIGHT_RE.fullmatch(weight_text.strip()):
            raise at.error(f"weight {_short(weight_text)} is not an integer")
        weight = int(weight_text)
        if not 0 <= weight <= MAX_WEIGHT:
            raise at.error(f"weight {weight} out of range 0-{MAX_WEIGHT}")
    return Backend(addr=addr, port=port, weight=weight, name=format_endpoint(addr, port))


# -- checks across keys and machines ------------------------------------------------------


def _check_wire_side(at: _At, m: MachineConfig) -> None:
    """Wire-side addresses a rule rewrites must be the machine's, or no packet reaches it."""
    claims = [_span(n) for n in m.addresses] + [_span(a) for a in m.public]
    why = "is not in this machine's public or addresses (the host would not steer it here)"
    frontends: dict[tuple[int, bytes, int], str] = {}
    rewrites: list[tuple[_At, int, bytes, int]] = []
    if m.nat is not None:
        for i, snat in enumerate(m.nat.snat):
            lo, hi, _ = _span(snat.to)
            missing = _first_uncovered(lo, hi, [c for c in claims if c[2] == snat.to.family])
            if missing is not None:
                addr = missing.to_bytes(len(snat.to.first), "big")
                raise at.key("nat").key("snat").item(i).key("to").error(f"{_addr_text(addr)} {why}")
        rewrites += [
            (at.key("nat").key("dnat").item(i).key("match"), d.proto, d.match_addr, d.match_port)
            for i, d in enumerate(m.nat.dnat)
        ]
    rewrites += [
        (at.key("lb").item(i).key("vip"), p.proto, p.vip, p.port) for i, p in enumerate(m.lb)
    ]
    for where, proto, addr, port in rewrites:
        lo, hi, family = _span(addr)
        if _first_uncovered(lo, hi, [c for c in claims if c[2] == family]) is not None:
            raise where.error(f"{_addr_text(addr)} {why}")
        other = frontends.setdefault((proto, addr, port), where.path)
        if other != where.path:
            raise where.error(f"{format_endpoint(addr, port)} is also {other}")


def _check_machines(at: _At, machines: Sequence[MachineConfig]) -> None:
    """Names are unique; no address or network belongs to two machines (one machine's may
    overlap). A clash names the first claim, in the file's order, that overlaps another
    machine's earlier one, and the earliest of those. Earlier claims are kept sorted by their
    first address: only those that start less than the longest claim's length before the new
    one can reach it, so a host of many machines is not checked pair by pair."""
    names: dict[str, int] = {}
    claims: list[tuple[int, _At, str]] = []  # (machine, key path, text), in the file's order
    spans: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}  # (first, last, claim)
    longest = {4: 0, 6: 0}
    for j, m in enumerate(machines):
        mat = at.key("machine").item(j)
        i = names.setdefault(m.name, j)
        if i != j:
            raise mat.key("name").error(f"duplicate machine name {m.name!r} (also machine[{i}])")
        mine = [(mat.key("addresses").item(k), n, str(n)) for k, n in enumerate(m.addresses)]
        mine += [(mat.key("public").item(k), ipaddress.ip_network(a), _addr_text(a))
                 for k, a in enumerate(m.public)]
        new: list[tuple[int, tuple[int, int, int]]] = []
        for where, net, text in mine:
            first, last, family = int(net.network_address), int(net.broadcast_address), net.version
            sorted_spans = spans[family]
            k = bisect.bisect_right(sorted_spans, (last, _AFTER, _AFTER))
            clash = -1
            while k and sorted_spans[k - 1][0] >= first - longest[family]:
                k -= 1
                if sorted_spans[k][1] >= first and (clash < 0 or sorted_spans[k][2] < clash):
                    clash = sorted_spans[k][2]
            if clash >= 0:
                other, other_at, other_text = claims[clash]
                raise where.error(f"{text} overlaps {other_text} at {other_at.path} "
                                  f"(machine {machines[other].name!r})")
            new.append((family, (first, last, len(claims) + len(new))))
        for (version, span), (where, _, text) in zip(new, mine, strict=True):
            bisect.insort(spans[version], span)
            longest[version] = max(longest[version], span[1] - span[0])
            claims.append((j, where, text))


_AFTER = 1 << 129  # above any address: bisects after every span that starts at an address


def _span(value: Network | bytes | AddressRange) -> tuple[int, int, int]:
    """(first, last, family) of a network, address or address range, as integers."""
    if isinstance(value, bytes):
        n = int.from_bytes(value, "big")
        return n, n, 4 if len(value) == 4 else 6
    if isinstance(value, AddressRange):
        return int.from_bytes(value.first, "big"), int.from_bytes(value.last, "big"), value.family
    return int(value.network_address), int(value.broadcast_address), value.version


def _first_uncovered(lo: int, hi: int, spans: list[tuple[int, int, int]]) -> int | None:
    """The first integer of lo..hi in none of `spans`, or None when they cover it all."""
    cursor = lo
    for first, last, _ in sorted(spans):
        if last < cursor:
            continue
        if first > cursor:
            break
        cursor = last + 1
        if cursor > hi:
            return None
    return cursor


# -- typed readers: each checks one value and names its key path ---------------------------


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class _At:
    """Where a value sits: the source and its key path, for error messages. The path is
    written out only when asked (an error, mostly): a config names thousands of places."""

    source: str
    parent: _At | None = None
    step: str | int = ""  # a key of the parent's table, or an index of its array

    @property
    def path(self) -> str:
        steps: list[str | int] = []
        at: _At | None = self
        while at is not None and at.parent is not None:
            steps.append(at.step)
            at = at.parent
        text = ""
        for step in reversed(steps):
            if isinstance(step, int):
                text = f"{text}[{step}]"
                continue
            name = step if _BARE_KEY.fullmatch(step) else json.dumps(step)  # quoted, as TOML
            text = f"{text}.{name}" if text else name
        return text

    def key(self, name: object) -> _At:
        return _At(self.source, self, str(name))

    def item(self, index: int) -> _At:
        return _At(self.source, self, index)

    def error(self, what: str) -> ConfigError:
        return ConfigError(self.source, self.path, what)


_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "table",
    type(None): "null",
}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:56]}...{text[-1]}"


def _kind(value: object) -> str:
    name = _TYPE_NAMES.get(type(value), type(value).__name__)
    return name if isinstance(value, list | dict) else f"{name} {_short(value)}"


def _table(
    at: _At, value: object, required: Sequence[str], optional: Sequence[str]
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise at.error(f"expected a table, got {_kind(value)}")
    allowed = (*required, *optional)
    for key in value:
        if key not in allowed:
            raise at.key(key).error(f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in value:
            raise at.key(key).error("missing (required)")
    return value


def _items(at: _At, value: object, tables: str = "", empty: str = "") -> Iterator[tuple[_At, Any]]:
    """The elements of an array with their paths; `tables` names a TOML array of tables."""
    if not isinstance(value, list):
        kind = f"an array of tables ({tables})" if tables else "an array"
        raise at.error(f"expected {kind}, got {_kind(value)}")
    if empty and not value:
        raise at.error(empty)
    return ((at.item(i), v) for i, v in enumerate(value))


def _str(at: _At, value: object) -> str:
    if not isinstance(value, str):
        raise at.error(f"expected a string, got {_kind(value)}")
    return value


def _choice(at: _At, value: object, choices: Sequence[str] | dict[str, Any], noun: str) -> str:
    text = _str(at, value)
    if text not in choices:
        raise at.error(f"unknown {noun} {_short(text)} (expected one of: {', '.join(choices)})")
    return text


def _int(at: _At, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.error(f"expected an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise at.error(f"{value} out of range {lo}-{hi}")
    return value


def _seconds(at: _At, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise at.error(f"expected a number of seconds, got {_kind(value)}")
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise at.error(f"{value} out of range: seconds must be > 0 and <= {MAX_SECONDS:.0f}")
    return float(value)


def _services(at: _At, value: object) -> tuple[str, ...]:
    seen: list[str] = []
    for a, v in _items(at, value):
        name = _choice(a, v, SERVICES, "service")
        if name in seen:
            raise a.error(f"service {name!r} listed twice")
        seen.append(name)
    return tuple(s for s in SERVICES if s in seen)


def _address(at: _At, value: object) -> bytes:
    text = _str(at, value)
    try:
        if "%" in text:
            raise ValueError("scoped IPv6 addresses are not supported")
        return ipaddress.ip_address(text).packed
    except ValueError as err:
        raise at.error(f"bad address {_short(text)}: {err}") from None


def _network(at: _At, value: object) -> Network:
    text = _str(at, value)
    try:
        if "%" in text:
            raise ValueError("scoped IPv6 networks are not supported")
        return ipaddress.ip_network(text)
    except ValueError as err:
        raise at.error(f"bad CIDR {_short(text)}: {err}") from None


def _address_range(at: _At, value: object) -> AddressRange:
    text = _str(at, value)
    first, sep, last = text.partition("-")
    lo = _address(at, first.strip())
    hi = _address(at, last.strip()) if sep else lo
    if len(lo) != len(hi):
        raise at.error(f"address range {_short(text)} mixes IPv4 and IPv6")
    if lo > hi:
        raise at.error(f"address range {_short(text)} runs backwards (first > last)")
    return AddressRange(lo, hi)


_DIGITS = re.compile(r"[0-9]+")


def _port(at: _At, text: str, lo: int) -> int:
    if not _DIGITS.fullmatch(text):
        raise at.error(f"bad port {_short(text)}: expected a number")
    port = int(text)
    if not lo <= port <= 65535:
        raise at.error(f"port {port} out of range {lo}-65535")
    return port


def _port_range(at: _At, value: object, lo: int) -> tuple[int, int]:
    """A port (integer or string) or a "lo-hi" range, as an inclusive (lo, hi) pair."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not lo <= value <= 65535:
            raise at.error(f"port {value} out of range {lo}-65535")
        return value, value
    if not isinstance(value, str):
        raise at.error(f'expected a port or a "lo-hi" range, got {_kind(value)}')
    first, sep, last = value.partition("-")
    start = _port(at, first.strip(), lo)
    end = _port(at, last.strip(), lo) if sep else start
    if start > end:
        raise at.error(f"port range {_short(value)} runs backwards (lo > hi)")
    return start, end


def _endpoint(at: _At, value: object) -> tuple[bytes, int]:
    """ "a.b.c.d:port" or "[v6 address]:port"."""
    text = _str(at, value)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise at.error(f"expected address:port, got {_short(text)}")
    if host.startswith("[") and host.endswith("]"):
        addr = _address(at, host[1:-1])
        if len(addr) == 4:
            raise at.error(f"brackets are for IPv6 only: {_short(text)}")
    elif ":" in host:
        raise at.error(f"write IPv6 endpoints as [address]:port, got {_short(text)}")
    else:
        addr = _address(at, host)
    return addr, _port(at, port_text, 1)


def _family(addr: bytes) -> str:
    return "IPv4" if len(addr) == 4 else "IPv6"


def _addr_text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


