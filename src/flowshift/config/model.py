"""The host config as typed, frozen values: what the tiers read. Every default is written
once, here; the loader (load.py) and the writer (dump.py) derive theirs from these classes.

Typed values, as the tiers use them: addresses are raw bytes (4 or 16, as in FlowKey),
networks `ipaddress` network objects, port sets tuples of inclusive (lo, hi) ranges,
protocols numbers (flow.PROTO_*, 0 = any), directions flow.EGRESS / flow.INGRESS (None =
any). Service lists are kept in chain order, whatever order the file lists them in.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any

from flowshift import conntrack_types as ct
from flowshift.flow import (
    EGRESS,
    INGRESS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    AddressRange,
)
from flowshift.packet import defrag

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRanges = tuple[tuple[int, int], ...]

SERVICES = ("firewall", "nat", "lb", "count")  # chain order
SECTION_SERVICES = ("firewall", "nat", "lb")  # services configured by a section of their own
POLICIES = ("never", "always", "elephant")
STARTS = ("machine", "vnic")
FORWARDINGS = ("bridge", "router")  # how a machine forwards: TTL untouched, or routed
SCHEDULERS = ("maglev", "round-robin")  # how an LB pool picks the backend of a new flow
ACTIONS = ("allow", "drop")
DIRECTIONS: dict[str, int | None] = {"egress": EGRESS, "ingress": INGRESS, "any": None}
PROTOCOLS = {
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
    "icmp": PROTO_ICMP,
    "icmpv6": PROTO_ICMPV6,
    "any": 0,
}
PORT_PROTOCOLS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}  # for DNAT and LB, which move ports

MAX_CAPACITY = 1 << 24  # second-cache entries: 4 GiB of 256-byte entries is plenty
MAX_COUNT = (1 << 63) - 1  # packet and byte thresholds compare with int64 counters
MAX_SECONDS = 1e9  # about 31 years: any timeout in nanoseconds still fits an int64
MAX_WEIGHT = (1 << 32) - 1  # Katran's u32 weights, as services.maglev.MAX_WEIGHT
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


# -- the typed config ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PnicConfig:
    capacity: int = 4096  # flow entries the second cache holds
    services: tuple[str, ...] = SERVICES  # services the PNIC can run


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    policy: str = "elephant"  # never | always | elephant
    elephant_packets: int = 32  # either threshold makes a flow an elephant
    elephant_bytes: int = 65536
    idle_timeout: float = 30.0  # seconds of trace time before an idle PNIC flow returns
    report_interval: float = 1.0  # seconds between PNIC state reports to the VNIC


def _s(ns: int) -> int:
    return ns // ct.SECOND


_TCP_TIMEOUT_STATES = {  # tcp_timeout_<name> -> the TcpState it sets (Linux's sysctl table)
    "syn_sent": ct.TcpState.SYN_SENT,
    "syn_recv": ct.TcpState.SYN_RECV,
    "established": ct.TcpState.ESTABLISHED,
    "fin_wait": ct.TcpState.FIN_WAIT,
    "close_wait": ct.TcpState.CLOSE_WAIT,
    "last_ack": ct.TcpState.LAST_ACK,
    "time_wait": ct.TcpState.TIME_WAIT,
    "close": ct.TcpState.CLOSE,
}
_T = ct.TCP_TIMEOUTS_NS
_S = ct.TcpState
MAX_CT_SECONDS = (1 << 31) - 1  # sysctl timeouts are C ints of seconds
MAX_CT_RETRANS = 255  # Linux compares with a u8 counter
MAX_CT_MAX = (1 << 31) - 1  # nf_conntrack_max is a C int


@dataclass(frozen=True, kw_only=True)
class ConntrackConfig:
    """Linux's net.netfilter.nf_conntrack_<key> sysctls, timeouts in whole seconds; defaults
    are Linux's (conntrack_types)."""

    max: int = ct.NF_CT_MAX  # 0: no limit
    tcp_loose: bool = ct.NF_CT_TCP_LOOSE
    tcp_be_liberal: bool = ct.NF_CT_TCP_BE_LIBERAL
    tcp_max_retrans: int = ct.NF_CT_TCP_MAX_RETRANS
    tcp_ignore_invalid_rst: bool = ct.NF_CT_TCP_IGNORE_INVALID_RST
    tcp_timeout_syn_sent: int = _s(_T[_S.SYN_SENT])
    tcp_timeout_syn_recv: int = _s(_T[_S.SYN_RECV])
    tcp_timeout_established: int = _s(_T[_S.ESTABLISHED])
    tcp_timeout_fin_wait: int = _s(_T[_S.FIN_WAIT])
    tcp_timeout_close_wait: int = _s(_T[_S.CLOSE_WAIT])
    tcp_timeout_last_ack: int = _s(_T[_S.LAST_ACK])
    tcp_timeout_time_wait: int = _s(_T[_S.TIME_WAIT])
    tcp_timeout_close: int = _s(_T[_S.CLOSE])
    tcp_timeout_max_retrans: int = _s(ct.TIMEOUT_RETRANS_NS)
    tcp_timeout_unacknowledged: int = _s(ct.TIMEOUT_UNACK_NS)
    udp_timeout: int = _s(ct.UDP_TIMEOUT_UNREPLIED)
    udp_timeout_stream: int = _s(ct.UDP_TIMEOUT_REPLIED)
    icmp_timeout: int = _s(ct.ICMP_TIMEOUT)
    icmpv6_timeout: int = _s(ct.ICMPV6_TIMEOUT)
    generic_timeout: int = _s(ct.GENERIC_TIMEOUT)
    # reassembly before conntrack (nf_defrag): net.ipv4.ipfrag_time / ipfrag_high_thresh and
    # net.netfilter.nf_conntrack_frag6_timeout / frag6_high_thresh (seconds, bytes)
    ipfrag_time: int = _s(defrag.IPFRAG_TIME_NS)
    ipfrag_high_thresh: int = defrag.IPFRAG_HIGH_THRESH
    frag6_timeout: int = _s(defrag.FRAG6_TIMEOUT_NS)
    frag6_high_thresh: int = defrag.IPFRAG_HIGH_THRESH

    def knobs(self) -> ct.Knobs:
        """The table as the trackers use it (timeouts in ns)."""
        sec = ct.SECOND
        tcp = list(ct.TCP_TIMEOUTS_NS)
        for name, state in _TCP_TIMEOUT_STATES.items():
            tcp[state] = getattr(self, f"tcp_timeout_{name}") * sec
        return ct.Knobs(
            tcp_timeouts=tuple(tcp),
            tcp_timeout_max_retrans=self.tcp_timeout_max_retrans * sec,
            tcp_timeout_unacknowledged=self.tcp_timeout_unacknowledged * sec,
            udp_timeout=self.udp_timeout * sec,
            udp_timeout_stream=self.udp_timeout_stream * sec,
            icmp_timeout=self.icmp_timeout * sec,
            icmpv6_timeout=self.icmpv6_timeout * sec,
            generic_timeout=self.generic_timeout * sec,
            tcp_loose=self.tcp_loose,
            tcp_be_liberal=self.tcp_be_liberal,
            tcp_max_retrans=self.tcp_max_retrans,
            tcp_ignore_invalid_rst=self.tcp_ignore_invalid_rst,
            max=self.max,
        )


@dataclass(frozen=True, kw_only=True)
class Rule:
    allow: bool
    direction: int | None = None  # EGRESS, INGRESS or None (any)
    proto: int = 0  # 0: any
    src: Network | None = None  # None: any address
    dst: Network | None = None
    dst_port: PortRanges = ()  # empty: any port (the rule then also matches non-TCP/UDP)
    icmp_type: tuple[int, ...] = ()  # empty: any type


@dataclass(frozen=True, kw_only=True)
class FirewallConfig:
    default_allow: bool = False  # for packets that start a flow and match no rule
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SnatRule:
    source: Network  # machine-side sources this rule translates
    to: AddressRange  # wire-side addresses to translate to
    ports: tuple[int, int] | None = None  # None: Linux's default, keep the port class


@dataclass(frozen=True, kw_only=True)
class DnatRule:
    proto: int
    match_addr: bytes  # the wire-side destination...
    match_port: int
    to_addr: bytes  # ...and the machine-side one it becomes
    to_port: int


@dataclass(frozen=True, kw_only=True)
class NatConfig:
    snat: tuple[SnatRule, ...] = ()  # the first rule whose source matches wins
    dnat: tuple[DnatRule, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Backend:
    addr: bytes
    port: int
    weight: int = 1
    name: str  # the backend's identity in the Maglev table: its endpoint text


@dataclass(frozen=True, kw_only=True)
class LbPool:
    proto: int
    vip: bytes
    port: int
    backends: tuple[Backend, ...]
    scheduler: str = "maglev"  # maglev | round-robin


@dataclass(frozen=True, kw_only=True)
class MachineConfig:
    name: str
    addresses: tuple[Network, ...]  # machine side: its own and those behind it
    public: tuple[bytes, ...] = ()  # wire side: addresses it answers for (NAT, VIPs)
    services: tuple[str, ...]  # chain order
    start: str = "machine"  # tier where new flows start: machine | vnic
    forwarding: str = "bridge"  # bridge: TTL untouched | router: TTL / hop limit decremented
    firewall: FirewallConfig | None = None
    nat: NatConfig | None = None
    lb: tuple[LbPool, ...] = ()
    # the host's [conntrack] with this machine's [machine.conntrack] keys over it
    conntrack: ConntrackConfig = ConntrackConfig()


@dataclass(frozen=True, kw_only=True)
class LiveConfig:
    # addresses of the outside (`fs-wire`) in `flowshift live`: documentation ranges by default
    peers: tuple[bytes, ...] = tuple(
        ipaddress.ip_address(a).packed for a in ("198.51.100.2", "2001:db8::2"))


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    pnic: PnicConfig = PnicConfig()
    offload: OffloadConfig = OffloadConfig()
    machines: tuple[MachineConfig, ...]
    live: LiveConfig = LiveConfig()
    conntrack: ConntrackConfig = ConntrackConfig()  # the host's table; machines hold theirs


class ConfigError(ValueError):
    """A config problem, as one line: `file: key.path: what is wrong`."""

    def __init__(self, source: str, where: str, what: str) -> None:
        text = f"{source}: {where}: {what}" if where else f"{source}: {what}"
        super().__init__("\\n".join(text.splitlines()))
        self.source = source
        self.where = where  # key path, or "line L, column C" for TOML syntax errors
        self.what = what


def fields_default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls`, as the class writes it."""
    for f in fields(cls):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(f"{cls.__name__}.{name} has no default")
