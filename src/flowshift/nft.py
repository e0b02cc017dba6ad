"""A host config's service chains as a Linux nftables ruleset (family inet), one table a machine.

The ruleset is the Linux router that does what flowshift does to the machine's traffic,
rule for rule (docs/nftables.md has the mapping). The router has two ports per machine: the
machine side (egress traffic enters there) and the wire side (ingress traffic enters
there), so `direction` becomes `iifname`. Each machine's table touches only packets that
enter through its own two ports.

- prerouting (nat): LB pools and DNAT port forwards of ingress flows. Round-robin pools are
  `numgen inc mod W` maps (W the total weight, a backend of weight w owns a run of w
  slots, as flowshift's cycle); Maglev pools have no nftables form and become `jhash` maps
  with the same shares (a warning comment says so).
- postrouting (nat): SNAT of egress flows, first matching source wins (nat statements are
  terminal), with the port range applied to TCP, UDP and ICMP echo identifiers.
- forward (filter): established and related pass, invalid drops (but ICMP, which flowshift
  judges untracked by the rules), protocols flowshift does not track drop, then the rules
  in order and the default. The rules see ingress after DNAT and egress before SNAT, which
  is where netfilter's forward hook sits, so machine-side rules need no translation.

`RenderError` (one line, with the key path) is for what has no exact form; what has only an
approximate one is rendered with a `# warning:` comment (`Rendering.warnings`).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from flowshift.config import (
    Backend,
    ConntrackConfig,
    HostConfig,
    LbPool,
    MachineConfig,
    Rule,
    SnatRule,
)
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from flowshift.services.rules import EGRESS, INGRESS

MAX_MODULUS = (1 << 32) - 1  # numgen / jhash `mod` is a 32-bit register
L4_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "ipv6-icmp"}
TRACKED = "{ tcp, udp, icmp, ipv6-icmp }"  # what flowshift's conntrack tracks; the rest drops
ICMPS = "{ icmp, ipv6-icmp }"

# What the router needs beside the ruleset, as sysctl.conf lines. flowshift's conntrack
# follows these Linux settings (loose TCP pickup, strict window tracking, checksums checked).
BASE_SYSCTLS = (
    ("net.ipv4.ip_forward", 1),
    ("net.ipv6.conf.all.forwarding", 1),
    ("net.netfilter.nf_conntrack_tcp_loose", 1),
    ("net.netfilter.nf_conntrack_tcp_be_liberal", 0),
    ("net.netfilter.nf_conntrack_checksum", 1),
)
# A `[conntrack]` key -> its Linux sysctl (net.netfilter.nf_conntrack_<name>). Keys not listed
# are rendered as a comment saying they have no sysctl.
CONNTRACK_SYSCTLS = {
    name: f"net.netfilter.nf_conntrack_{name}"
    for name in (
        "tcp_loose", "tcp_be_liberal", "tcp_max_retrans", "tcp_ignore_invalid_rst", "checksum",
        "acct", "timestamp", "max", "buckets", "generic_timeout", "icmp_timeout",
        "icmpv6_timeout", "udp_timeout", "udp_timeout_stream", "tcp_timeout_syn_sent",
        "tcp_timeout_syn_recv", "tcp_timeout_established", "tcp_timeout_fin_wait",
        "tcp_timeout_close_wait", "tcp_timeout_last_ack", "tcp_timeout_time_wait",
        "tcp_timeout_close", "tcp_timeout_max_retrans", "tcp_timeout_unacknowledged",
        "frag6_timeout", "frag6_high_thresh",
    )
} | {name: f"net.ipv4.{name}" for name in ("ipfrag_time", "ipfrag_high_thresh")}


class RenderError(ValueError):
    """A config feature with no nftables form: one line, `machine[i].key: why`."""


@dataclass(frozen=True)
class Ports:
    """The router's two ports for one machine (interface names)."""

    machine_side: str = "inside"
    wire_side: str = "outside"


@dataclass
class Rendering:
    text: str
    warnings: list[str] = field(default_factory=list)  # approximations, also in `text`


def default_ports(cfg: HostConfig) -> dict[int, Ports]:
    """inside/outside for a one-machine host; inside<i>/outside<i> for machine i otherwise."""
    if len(cfg.machines) == 1:
        return {0: Ports()}
    return {i: Ports(f"inside{i}", f"outside{i}") for i in range(len(cfg.machines))}


def machine_index(cfg: HostConfig, name: str) -> int:
    for i, m in enumerate(cfg.machines):
        if m.name == name:
            return i
    names = ", ".join(m.name for m in cfg.machines)
    raise RenderError(f"no machine named {name!r} (machines: {names})")


def table_name(m: MachineConfig) -> str:
    return f"flowshift-{m.name}"  # machine names are letters, digits, '.', '_', '-'


def render(
    cfg: HostConfig, machines: Sequence[int] | None = None, ports: dict[int, Ports] | None = None
) -> Rendering:
    """The ruleset of the given machines (all by default), each in a table of its own."""
    indices = list(range(len(cfg.machines))) if machines is None else list(machines)
    ports = default_ports(cfg) if ports is None else ports
    out = Rendering("")
    lines = [
        "#!/usr/sbin/nft -f",
        "# flowshift host config as nftables (docs/nftables.md). Router settings:",
        *(f"#   sysctl {line}" for line in sysctl_lines(cfg, indices)),
        "# [pnic], [offload] and `start` say which tier runs a flow; Linux has one tier.",
    ]
    for i in indices:
        lines.append("")
        lines += _machine(cfg.machines[i], i, ports[i], out.warnings)
    out.text = "\n".join(lines) + "\n"
    return out


def sysctl_lines(cfg: HostConfig, machines: Sequence[int] | None = None) -> list[str]:
    """sysctl.conf lines for the router: forwarding, conntrack as flowshift models it, and the
    config's `[conntrack]` table when it has one."""
    indices = range(len(cfg.machines)) if machines is None else machines
    values: dict[str, object] = dict(BASE_SYSCTLS)
    if any("count" in cfg.machines[i].services for i in indices):
        values["net.netfilter.nf_conntrack_acct"] = 1  # per-flow packet and byte counters
    notes: list[str] = []
    section = getattr(cfg, "conntrack", None)
    if machines is not None and len(indices) == 1:  # one machine's router: its own table
        section = getattr(cfg.machines[indices[0]], "conntrack", section)
    for key, value in _conntrack_items(section):
        name = CONNTRACK_SYSCTLS.get(key)
        if name is None:
            notes.append(f"# conntrack.{key}: no Linux sysctl")
            continue
        if isinstance(value, bool):
            values[name] = int(value)
        elif isinstance(value, float) and not value.is_integer():
            values[name] = math.ceil(value)  # Linux timeouts are whole seconds
            notes.append(f"# conntrack.{key} = {value}: rounded up to whole seconds")
        else:
            values[name] = int(value) if isinstance(value, float) else value
    return [f"{k} = {v}" for k, v in values.items()] + notes


def _conntrack_items(section: object) -> Iterator[tuple[str, Any]]:
    if section is None:
        return
    if isinstance(section, ConntrackConfig):  # the keys that differ from Linux's defaults
        yield from ((f.name, getattr(section, f.name)) for f in fields(section)
                    if getattr(section, f.name) != f.default)
    elif is_dataclass(section) and not isinstance(section, type):
        yield from ((f.name, getattr(section, f.name)) for f in fields(section))
    elif isinstance(section, dict):
        yield from section.items()


# -- one machine ----------------------------------------------------------------------------


def _machine(m: MachineConfig, index: int, ports: Ports, warnings: list[str]) -> list[str]:
    at = f"machine[{index}]"
    inside, outside = _q(ports.machine_side), _q(ports.wire_side)
    head = [
        f"# machine {m.name!r} ({at}): services {', '.join(m.services) or 'none'}",
        f"# ports: machine side {inside}, wire side {outside}",
        f"table inet {table_name(m)} {{",
    ]
    body: list[str] = []
    counting = "count" in m.services
    if counting:
        body += ["\tcounter egress {", "\t}", "\tcounter ingress {", "\t}", ""]
    pre = _prerouting(m, at, outside, warnings)
    if pre:
        body += _chain("prerouting", "nat hook prerouting priority dstnat", pre)
    post = _postrouting(m, at, inside, warnings)
    if post:
        body += _chain("postrouting", "nat hook postrouting priority srcnat", post)
    body += _chain("forward", "filter hook forward priority filter",
                   _forward(m, at, inside, outside, counting))
    if body and body[-1] == "":
        body.pop()
    return [*head, *body, "}"]


def _chain(name: str, hook: str, rules: list[str]) -> list[str]:
    return [f"\tchain {name} {{", f"\t\ttype {hook}; policy accept;",
            *(r if r.startswith("\t\t#") else f"\t\t{r}" for r in rules), "\t}", ""]


def _prerouting(m: MachineConfig, at: str, outside: str, warnings: list[str]) -> list[str]:
    rules: list[str] = []
    if "lb" in m.services:
        for i, pool in enumerate(m.lb):
            rules += _pool(pool, f"{at}.lb[{i}]", outside, warnings)
    if "nat" in m.services and m.nat is not None:
        for i, d in enumerate(m.nat.dnat):
            fam = _fam(d.match_addr)
            rules.append(
                f"iifname {outside} {fam} daddr {_addr(d.match_addr)} {L4_NAMES[d.proto]} dport "
                f"{d.match_port} counter dnat {fam} to {_endpoint(d.to_addr, d.to_port)} "
                f'comment "{at}.nat.dnat[{i}]"'
            )
    return rules


def _pool(pool: LbPool, at: str, outside: str, warnings: list[str]) -> list[str]:
    runs = _slot_runs(pool.backends)
    total = runs[-1][2] + 1 if runs else 0
    if total == 0:
        return []  # no backend can serve: the forward chain drops the VIP's new flows
    if total > MAX_MODULUS:
        raise RenderError(
            f"{at}.backends: total weight {total} exceeds nftables' 32-bit modulus "
            f"({MAX_MODULUS}); scale the weights down"
        )
    fam = _fam(pool.vip)
    elements = ", ".join(
        f"{lo if lo == hi else f'{lo}-{hi}'} : {_addr(b.addr)} . {b.port}" for b, lo, hi in runs
    )
    l4 = L4_NAMES[pool.proto]
    match = f"iifname {outside} {fam} daddr {_addr(pool.vip)} {l4} dport {pool.port}"
    lines: list[str] = []
    if pool.scheduler == "round-robin":
        pick = f"numgen inc mod {total}"
    else:
        why = (f"{at}: Maglev has no nftables form; rendered as jhash of the 5-tuple mod the "
               "total weight: the same shares, another backend per connection, and most "
               "connections move when the pool changes (Maglev moves few)")
        warnings.append(why)
        lines.append(f"\t\t# warning: {why}")
        pick = (f"jhash {fam} saddr . {fam} daddr . {L4_NAMES[pool.proto]} sport . "
                f"{L4_NAMES[pool.proto]} dport mod {total} seed 0x0")
    lines.append(f'{match} counter dnat {fam} to {pick} map {{ {elements} }} comment "{at}"')
    return lines


def _slot_runs(backends: Sequence[Backend]) -> list[tuple[Backend, int, int]]:
    """(backend, first slot, last slot) of each backend with weight, in list order."""
    runs = []
    slot = 0
    for b in backends:
        if b.weight:
            runs.append((b, slot, slot + b.weight - 1))
            slot += b.weight
    return runs


def _postrouting(m: MachineConfig, at: str, inside: str, warnings: list[str]) -> list[str]:
    if "nat" not in m.services or m.nat is None:
        return []
    rules = []
    for i, s in enumerate(m.nat.snat):
        where = f"{at}.nat.snat[{i}]"
        if s.to.size > 1:
            why = (f"{where}: Linux picks the address of a range by its own hash of the "
                   "addresses, flowshift by another: a flow may leave from another address")
            warnings.append(why)
            rules.append(f"\t\t# warning: {why}")
        rules.append(f"iifname {inside} {_snat(s)} comment \"{where}\"")
    return rules


def _snat(s: SnatRule) -> str:
    fam = "ip" if s.source.version == 4 else "ip6"
    to = _range(s.to.first, s.to.last)
    if s.ports is None:  # Linux's default keeps the port class, as flowshift does
        return f"{fam} saddr {s.source} counter snat {fam} to {to}"
    icmp = "icmp" if fam == "ip" else "ipv6-icmp"
    if fam == "ip6":
        to = f"[{_addr(s.to.first)}]" if s.to.size == 1 else (
            f"[{_addr(s.to.first)}]-[{_addr(s.to.last)}]")
    lo, hi = s.ports
    ports = str(lo) if lo == hi else f"{lo}-{hi}"
    # a port range needs a protocol match; flowshift applies it to echo identifiers too
    return (f"{fam} saddr {s.source} meta l4proto {{ tcp, udp, {icmp} }} counter "
            f"snat {fam} to {to}:{ports}")


def _forward(m: MachineConfig, at: str, inside: str, outside: str, counting: bool) -> list[str]:
    rules = [f"iifname != {{ {inside}, {outside} }} accept comment \"not this machine's ports\""]
    if not m.services:
        rules.append("accept comment \"no services: flowshift forwards everything\"")
        return rules
    if counting:
        rules += [f'iifname {inside} counter name "egress"',
                  f'iifname {outside} counter name "ingress"']
    rules += [
        "ct state established,related counter accept",
        f'ct state invalid meta l4proto != {ICMPS} counter drop comment "flowshift: invalid"',
        f'meta l4proto != {TRACKED} counter drop comment "flowshift tracks tcp, udp, icmp only"',
    ]
    if "lb" in m.services:
        for i, pool in enumerate(m.lb):
            if not _slot_runs(pool.backends):
                fam = _fam(pool.vip)
                rules.append(
                    f"iifname {outside} {fam} daddr {_addr(pool.vip)} {L4_NAMES[pool.proto]} "
                    f'dport {pool.port} counter drop comment "{at}.lb[{i}]: no backend"')
    fw = m.firewall if "firewall" in m.services else None
    if fw is None:
        rules.append('counter accept comment "no firewall: new flows pass"')
        return rules
    for i, rule in enumerate(fw.rules):
        match = _match(rule, inside, outside)
        verdict = "accept" if rule.allow else "drop"
        rules.append(f'{match}{" " if match else ""}counter {verdict} '
                     f'comment "{at}.firewall.rule[{i}]"')
    default = "accept" if fw.default_allow else "drop"
    rules.append(f'counter {default} comment "{at}.firewall.default"')
    return rules


def _match(rule: Rule, inside: str, outside: str) -> str:
    parts = []
    if rule.direction == EGRESS:
        parts.append(f"iifname {inside}")
    elif rule.direction == INGRESS:
        parts.append(f"iifname {outside}")
    for key, net in (("saddr", rule.src), ("daddr", rule.dst)):
        if net is not None:
            parts.append(f"{'ip' if net.version == 4 else 'ip6'} {key} {net}")
    proto = L4_NAMES.get(rule.proto)
    if rule.dst_port:
        ports = _set(lo if lo == hi else f"{lo}-{hi}" for lo, hi in rule.dst_port)
        if rule.proto in (PROTO_TCP, PROTO_UDP):
            parts.append(f"{proto} dport {ports}")
        else:  # any: TCP and UDP only, as flowshift
            parts.append(f"meta l4proto {{ tcp, udp }} th dport {ports}")
    elif rule.icmp_type:
        types = _set(rule.icmp_type)
        if rule.proto == PROTO_ICMP:
            parts.append(f"icmp type {types}")
        elif rule.proto == PROTO_ICMPV6:
            parts.append(f"icmpv6 type {types}")
        else:  # any: the type byte of ICMP and ICMPv6 alike
            parts.append(f"meta l4proto {ICMPS} @th,0,8 {types}")
    elif proto is not None:
        parts.append(f"meta l4proto {proto}")
    return " ".join(parts)


# -- text -----------------------------------------------------------------------------------


def _q(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fam(addr: bytes) -> str:
    return "ip" if len(addr) == 4 else "ip6"


def _addr(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


def _range(first: bytes, last: bytes) -> str:
    return _addr(first) if first == last else f"{_addr(first)}-{_addr(last)}"


def _endpoint(addr: bytes, port: int) -> str:
    return f"{_addr(addr)}:{port}" if len(addr) == 4 else f"[{_addr(addr)}]:{port}"


def _set(items: Iterator[object] | Sequence[object]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"
