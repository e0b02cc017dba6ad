"""A deterministic generator of realistic traffic traces, for replay and benchmarks.

The trace is what a capture point next to the clients sees: clients' packets when they leave,
servers' packets when they arrive. The model, in the order it is built:

- plan: flow start times spread over the duration (a Poisson process: sorted uniform times
  for a fixed count), each flow's kind, family, endpoints, sizes, RTT and rate. Flow sizes are
  heavy-tailed (log-normal body, Pareto tail); elephants are sized afterwards so that they
  carry `elephant_share` of the payload bytes.
- packets: each flow is a lazy iterator of (time, frame) in time order. TCP runs a small
  simulation per transfer: slow start from 10 segments, a sender that never passes the
  receiver's advertised right edge, a receiver that ACKs every second segment (or after the
  40 ms delayed-ACK timer) and whose window grows as it receives, all timed by the flow's RTT
  and bottleneck rate.
- merge: flows are started as the merged time reaches their start and interleaved with a
  heap, so memory holds the plan and the open flows, never the packets.

Everything random comes from `random.Random` seeded by the spec's seed (one generator for
the plan, one per flow), so the same spec gives the same bytes.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import random
import struct
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from itertools import count
from os import PathLike
from typing import Any, NamedTuple

from flowshift.config import HostConfig
from flowshift.flow import NS_PER_S, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.gen_gateway import Gateway
from flowshift.packet.build import (
    ICMP_DEST_UNREACH,
    ICMPV6_DEST_UNREACH,
    TcpFramer,
    filler,
    icmp_echo_frame,
    icmp_error_frame,
    tcp_frame,
    tcp_options,
    udp_frame,
)
from flowshift.packet.parse import parse
from flowshift.packet.pcap import PcapWriter
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NS = NS_PER_S  # flow.NS_PER_S
MS = 1_000_000
US = 1_000
START_NS = 1_704_067_200 * NS  # 2024-01-01T00:00:00Z, fixed so that traces are reproducible
ATTACKS = ("none", "syn-flood", "out-of-window")

DEFAULT_CLIENTS = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64"))
DEFAULT_SERVERS = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8::/64"))

HOSTS_PER_NETWORK = 64  # distinct hosts drawn from each client/server network
INGRESS_SHARE = 0.3  # of the mice, with a gateway that has VIPs or port forwards
EPHEMERAL_PORTS = (32768, 60999)  # Linux net.ipv4.ip_local_port_range default
DELACK_NS = 40 * MS  # Linux TCP_DELACK_MIN
INIT_CWND = 10  # segments (RFC 6928, Linux default)
STREAM_SHARE = 0.05  # of UDP flows: long media-like streams instead of DNS-like exchanges
UNREACHABLE_SHARE = 0.04  # of DNS-like flows: answered by ICMP port unreachable
RST_SHARE = 0.1  # of TCP flows: closed by the client with RST instead of FIN
UPLOAD_SHARE = 0.05  # of TCP mice (and a third of elephants): the client sends the object
MIN_ELEPHANT_SEGMENTS = 2000
GATEWAY_MAC = bytes.fromhex("02005e000001")

MARK_PLAIN, MARK_ELEPHANT, MARK_ATTACK = 0, 1, 2

Emit = tuple[int, bytes, int]  # (time ns, frame, mark)


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """`"10.0.0.0/24,fd00::/64,192.0.2.7"` -> networks (an address is a one-host network)."""
    nets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"not an IP network or address: {part!r}") from None
    if not nets:
        raise ValueError(f"no network in {text!r}")
    return tuple(nets)


def parse_ports(text: str) -> tuple[int, ...]:
    """`"80,8080"` -> (80, 8080)."""
    ports = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise ValueError(f"not a port number 1..65535: {part!r}")
        ports.append(int(part))
    return tuple(ports)


def _inside(net: IPNetwork, other: IPNetwork) -> bool:
    """Whether `net` lies within `other` (never, across families)."""
    if isinstance(net, ipaddress.IPv4Network):
        return isinstance(other, ipaddress.IPv4Network) and net.subnet_of(other)
    return isinstance(other, ipaddress.IPv6Network) and net.subnet_of(other)


@dataclass(frozen=True, kw_only=True)
class TraceSpec:
    flows: int  # flows that start within the duration, elephants included, attacks not
    duration_s: float
    seed: int = 0
    elephants: int = 0
    elephant_share: float = 0.85  # of all payload bytes, carried by the elephants
    udp_share: float = 0.15  # of the non-elephant flows
    icmp_share: float = 0.02  # of the non-elephant flows: ping sequences
    ipv6_share: float | None = None  # None: 0.2 when both families are in both pools
    attack: str = "none"
    attack_flows: int | None = None  # spoofed SYNs or attacked flows; None: flows // 10, >= 10
    clients: tuple[IPNetwork, ...] = DEFAULT_CLIENTS
    servers: tuple[IPNetwork, ...] = DEFAULT_SERVERS
    tcp_ports: tuple[int, ...] = (80, 8080)  # HTTP-like request/response
    udp_ports: tuple[int, ...] = (53,)  # request/response (DNS messages on port 53)
    stream_ports: tuple[int, ...] = (5004,)  # long UDP streams
    mtu: int = 1500
    vlan: int | None = None
    start_ns: int = START_NS
    # a gateway capture of this host config's first machine (see docs/gen-trace.md)
    gateway: HostConfig | None = None
    ingress_share: float | None = None  # of the mice; None: INGRESS_SHARE when there are targets

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        if self.flows < 1:
            return f"flows must be at least 1, not {self.flows}"
        if not 0 < self.duration_s <= 86400 * 7:
            return f"duration must be in (0, 604800] seconds, not {self.duration_s}"
        if not 0 <= self.elephants <= self.flows:
            return f"elephants must be in 0..flows ({self.flows}), not {self.elephants}"
        if not 0 < self.elephant_share < 1:
            return f"elephant share must be in (0, 1), not {self.elephant_share}"
        for name in ("udp_share", "icmp_share"):
            if not 0 <= getattr(self, name) <= 1:
                return f"{name.replace('_', ' ')} must be in [0, 1], not {getattr(self, name)}"
        if self.udp_share + self.icmp_share > 1:
            return "udp share + icmp share exceed 1"
        if self.attack not in ATTACKS:
            return f"attack must be one of {', '.join(ATTACKS)}, not {self.attack!r}"
        if self.attack_flows is not None and self.attack_flows < 1:
            return f"attack flows must be at least 1, not {self.attack_flows}"
        if not 1280 <= self.mtu <= 9216:
            return f"mtu must be in 1280..9216, not {self.mtu}"
        if self.vlan is not None and not 0 <= self.vlan <= 4094:
            return f"vlan must be in 0..4094, not {self.vlan}"
        if not 0 <= self.start_ns < (1 << 32) * NS - self.duration_s * NS * 10:
            return "start time does not fit pcap timestamps"
        for name in ("tcp_ports", "udp_ports", "stream_ports"):
            ports = getattr(self, name)
            if not ports or not all(1 <= p <= 65535 for p in ports):
                return f"{name.replace('_', ' ')} must be port numbers 1..65535"
        if not self.clients:
            return "no client network"
        if not self.servers:
            return "no server network"
        if self.ipv6_share is not None and not 0 <= self.ipv6_share <= 1:
            return f"ipv6 share must be in [0, 1], not {self.ipv6_share}"
        problem = self._gateway_problem()
        if problem:
            return problem
        share = self.v6_share
        for fam, needed in ((4, share < 1), (6, share > 0)):
            for role, nets in (("client", self.clients), ("server", self.servers)):
                if needed and not any(n.version == fam for n in nets):
                    return (
                        f"ipv6 share {share:g} needs IPv{fam} traffic but no {role} network "
                        f"is IPv{fam}"
                    )
        return None

    def _gateway_problem(self) -> str | None:
        if self.gateway is None:
            if self.ingress_share is not None:
                return "an ingress share needs a gateway config"
            return None
        m = self.gateway.machines[0]
        for net in self.clients:
            if not any(_inside(net, a) for a in m.addresses):
                return f"client network {net} is not inside gateway machine {m.name}'s addresses"
        for net in self.servers:
            # partly inside is fine: hosts the gateway owns are left out of the pool
            if any(_inside(net, a) for a in m.addresses):
                return f"server network {net} is inside gateway machine {m.name}'s addresses"
        if self.ingress_share is not None:
            if not 0 <= self.ingress_share <= 1:
                return f"ingress share must be in [0, 1], not {self.ingress_share}"
            if self.ingress_share > 0 and not self.ingress_targets():
                return (
                    f"ingress share {self.ingress_share:g} needs an LB VIP or DNAT rule on "
                    f"gateway machine {m.name} whose family a server network has"
                )
        return None

    def ingress_targets(self) -> list[tuple[int, bytes, int]]:
        """(proto, address, port) that ingress flows open: the gateway's VIPs and DNAT matches
        of a family the server (outside) networks have."""
        if self.gateway is None:
            return []
        families = {n.version for n in self.servers}
        targets = Gateway(self.gateway).targets()
        return [t for t in targets if (4 if len(t[1]) == 4 else 6) in families]

    @property
    def ingress(self) -> float:
        """The share of mice that are ingress flows: as given, or what the gateway offers."""
        if self.ingress_share is not None:
            return self.ingress_share
        return INGRESS_SHARE if self.ingress_targets() else 0.0

    @property
    def v6_share(self) -> float:
        """The IPv6 share of flows: as given, or what the address pools allow."""
        if self.ipv6_share is not None:
            return self.ipv6_share
        v4 = all(any(n.version == 4 for n in ns) for ns in (self.clients, self.servers))
        v6 = all(any(n.version == 6 for n in ns) for ns in (self.clients, self.servers))
        return 0.2 if v4 and v6 else (1.0 if v6 else 0.0)

    @property
    def attack_count(self) -> int:
        if self.attack == "none":
            return 0
        return self.attack_flows if self.attack_flows is not None else max(10, self.flows // 10)


@dataclass(slots=True)
class GenSummary:
    packets: int = 0
    bytes: int = 0
    # by kind: tcp, elephant, udp, udp-stream, icmp, syn-flood
    flows: dict[str, int] = field(default_factory=dict)
    attacked_flows: int = 0  # out-of-window: valid flows that received injected segments
    ingress_flows: int = 0  # gateway traces: flows opened from the outside (in `flows` too)
    elephant_packets: int = 0
    elephant_bytes: int = 0
    attack_packets: int = 0
    first_ns: int = 0
    last_ns: int = 0

    @property
    def elephant_byte_share(self) -> float:
        return self.elephant_bytes / self.bytes if self.bytes else 0.0

    @property
    def elephant_packet_share(self) -> float:
        return self.elephant_packets / self.packets if self.packets else 0.0

    @property
    def span_s(self) -> float:
        return (self.last_ns - self.first_ns) / NS


@dataclass(slots=True)
class _Plan:
    index: int
    kind: str
    start_ns: int
    client: bytes
    server: bytes
    sport: int
    dport: int
    size: int  # payload bytes the flow carries in its main direction
    rtt_ns: int
    rate_bps: float
    upload: bool = False
    attacked: bool = False
    ingress: bool = False  # a gateway trace's flow from the outside to a VIP or port forward
    down: Wire | None = None  # the server side's packets as captured; None: reverse of `up`

    @property
    def up(self) -> Wire:
        """The client side's packets as captured (the original tuple of the flow)."""
        return Wire(self.client, self.server, self.sport, self.dport)

    @property
    def reply(self) -> Wire:
        return self.down or Wire(self.server, self.client, self.dport, self.sport)


class Wire(NamedTuple):
    """One direction's addresses and ports (ICMP echo: identifiers) as the capture sees them."""

    src: bytes
    dst: bytes
    sport: int
    dport: int


# ---------------------------------------------------------------- plan


def _hosts(net: IPNetwork, rng: random.Random) -> list[bytes]:
    """Up to HOSTS_PER_NETWORK distinct host addresses of `net`, in a deterministic order."""
    size = net.num_addresses
    if size <= 2:
        offsets = list(range(size))
    else:
        last = size - 2 if net.version == 4 else size - 1  # no broadcast / no anycast
        if last <= HOSTS_PER_NETWORK:
            offsets = list(range(1, last + 1))
        else:
            chosen: dict[int, None] = {}
            while len(chosen) < HOSTS_PER_NETWORK:
                chosen[rng.randint(1, last)] = None
            offsets = list(chosen)
    base = int(net.network_address)
    return [(base + o).to_bytes(net.max_prefixlen // 8, "big") for o in offsets]


def _pools(nets: tuple[IPNetwork, ...], rng: random.Random) -> dict[int, list[bytes]]:
    pools: dict[int, list[bytes]] = {4: [], 6: []}
    for net in nets:
        pools[net.version] += _hosts(net, rng)
    return pools


class _Ports:
    """Source ports per client, handed out like Linux: from a random start, in small steps."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._next: dict[bytes, int] = {}

    def take(self, client: bytes) -> int:
        lo, hi = EPHEMERAL_PORTS
        port = self._next.get(client)
        if port is None:
            port = self._rng.randint(lo, hi)
        self._next[client] = lo + (port - lo + self._rng.randint(1, 8)) % (hi - lo + 1)
        return port


def _mouse_size(rng: random.Random) -> int:
    """Object bytes of a TCP mouse: log-normal body, Pareto tail (capped below elephants)."""
    if rng.random() < 0.1:
        return min(int(20_000 * rng.paretovariate(1.1)), 2_000_000)
    return max(200, min(int(rng.lognormvariate(math.log(6000), 1.3)), 2_000_000))


def _plan(spec: TraceSpec) -> list[_Plan]:
    rng = random.Random(spec.seed)
    clients, servers = _pools(spec.clients, rng), _pools(spec.servers, rng)
    gateway = Gateway(spec.gateway) if spec.gateway is not None else None
    if gateway is not None:
        for fam, pool in servers.items():  # the outside is what the gateway does not own
            servers[fam] = [a for a in pool if not gateway.owns(a)]
            if not servers[fam] and any(n.version == fam for n in spec.servers):
                raise ValueError(f"every IPv{fam} server host is the gateway's own")
    targets = spec.ingress_targets()
    ingress = spec.ingress
    ports = _Ports(rng)
    v6 = spec.v6_share
    dur = spec.duration_s * NS

    def endpoints() -> tuple[bytes, bytes]:
        fam = 6 if rng.random() < v6 else 4
        server_pool = servers[fam]
        # popularity is skewed: a few servers take most flows
        server = server_pool[int(len(server_pool) * rng.random() ** 2)]
        return rng.choice(clients[fam]), server

    def timing() -> tuple[int, float]:
        rtt = min(max(rng.lognormvariate(math.log(20 * MS), 0.8), 200 * US), 400 * MS)
        rate = min(max(rng.lognormvariate(math.log(50e6), 1.0), 2e6), 1e9)
        return int(rtt), rate

    mice = spec.flows - spec.elephants
    starts = sorted(int(rng.random() * dur) for _ in range(mice))
    plans: list[_Plan] = []
    for start in starts:
        if targets and rng.random() < ingress:
            plans.append(_ingress_plan(start, rng.choice(targets), servers, ports, rng, timing))
            continue
        u = rng.random()
        if u < spec.icmp_share:
            kind = "icmp"
        elif u < spec.icmp_share + spec.udp_share:
            kind = "udp-stream" if rng.random() < STREAM_SHARE else "udp"
        else:
            kind = "tcp"
        client, server = endpoints()
        rtt, rate = timing()
        if kind == "tcp":
            dport, size = rng.choice(spec.tcp_ports), _mouse_size(rng)
        elif kind == "udp":
            dport, size = rng.choice(spec.udp_ports), rng.randint(1, 2)  # queries
        elif kind == "udp-stream":
            dport = rng.choice(spec.stream_ports)
            size = int(min(rng.uniform(1, 10), spec.duration_s) * NS)  # stream length
        else:
            dport, size = 0, rng.randint(3, 10)  # echo requests
        sport = rng.randint(1, 0xFFFF) if kind == "icmp" else ports.take(client)
        upload = kind == "tcp" and rng.random() < UPLOAD_SHARE
        plans.append(_Plan(0, kind, start, client, server, sport, dport, size, rtt, rate, upload))

    if spec.elephants:
        mice_bytes = sum(_payload_estimate(p) for p in plans)
        total = spec.elephant_share / (1 - spec.elephant_share) * mice_bytes
        weights = [rng.uniform(0.5, 1.5) for _ in range(spec.elephants)]
        for w in weights:
            size = max(int(total * w / sum(weights)), MIN_ELEPHANT_SEGMENTS * 1500)
            start = int(rng.random() * dur * 0.1)
            client, server = endpoints()
            rtt = int(min(max(rng.lognormvariate(math.log(5 * MS), 0.6), 200 * US), 50 * MS))
            # fast enough to finish near the end of the duration
            rate = max(size * 8 * NS / max(dur * 0.85 - start, dur * 0.2), 10e6)
            sport = ports.take(client)
            upload = rng.random() < 0.3
            dport = rng.choice(spec.tcp_ports)
            plans.append(
                _Plan(0, "elephant", start, client, server, sport, dport, size, rtt, rate, upload)
            )

    if spec.attack == "out-of-window":
        tcp = [p for p in plans if p.kind == "tcp"]
        for p in rng.sample(tcp, min(spec.attack_count, len(tcp))):
            p.attacked = True
    elif spec.attack == "syn-flood":
        target = _flood_target(spec, targets, gateway)
        plans.append(
            _Plan(0, "syn-flood", int(dur * 0.3), b"", target[0], 0, target[1], 0, 0, 0.0)
        )
    plans.sort(key=lambda p: p.start_ns)  # stable: equal starts keep their drawing order
    for i, p in enumerate(plans):
        p.index = i
        p.start_ns += spec.start_ns
    if gateway is not None:
        _translate(plans, spec, gateway)
    return plans


def _flood_target(
    spec: TraceSpec, targets: list[tuple[int, bytes, int]], gateway: Gateway | None
) -> tuple[bytes, int]:
    """(address, port) a SYN flood hits: a gateway's TCP VIP or port forward, else its public
    address of a family the outside has; b"" (a server of the pool) without a gateway."""
    for proto, addr, port in targets:
        if proto == PROTO_TCP:
            return addr, port
    if gateway is not None:
        families = [n.version for n in spec.servers]
        for addr in sorted(gateway.machine.public, key=len):  # IPv4 first
            if (4 if len(addr) == 4 else 6) in families:
                return addr, spec.tcp_ports[0]
    return b"", spec.tcp_ports[0]


def _ingress_plan(
    start: int,
    target: tuple[int, bytes, int],
    servers: dict[int, list[bytes]],
    ports: _Ports,
    rng: random.Random,
    timing: Callable[[], tuple[int, float]],
) -> _Plan:
    """A flow from an outside host (of the server pool) to a VIP or port forward."""
    proto, addr, port = target
    pool = servers[4 if len(addr) == 4 else 6]
    client = pool[int(len(pool) * rng.random() ** 2)]
    rtt, rate = timing()
    if proto == PROTO_TCP:
        kind, size = "tcp", _mouse_size(rng)
    else:
        kind, size = "udp", rng.randint(1, 2)
    upload = kind == "tcp" and rng.random() < UPLOAD_SHARE
    sport = ports.take(client)
    return _Plan(0, kind, start, client, addr, sport, port, size, rtt, rate, upload, ingress=True)


def _translate(plans: list[_Plan], spec: TraceSpec, gateway: Gateway) -> None:
    """Give every flow the translation the gateway's host will give it (`_Plan.down`).

    Flows are opened in the order the host sees their first packets: by time; at equal
    times a SYN of the flood already queued in generate()'s merge goes first, then plans in
    list order. Each spoofed SYN to a VIP is a flow of its own and takes a round-robin turn.
    """
    events: list[tuple[int, int, int, _Plan | FlowKey]] = []
    for p in plans:
        if p.kind == "syn-flood":
            for i, (t, frame, _) in enumerate(_syn_flood(p, spec, _flow_rng(spec, p))):
                key = parse(frame, 1).key(0)
                events.append((t, 1 if i == 0 else 0, p.index, key))
        else:
            events.append((p.start_ns, 1, p.index, p))
    events.sort(key=lambda e: e[:3])
    redraws = random.Random(f"{spec.seed}:gateway")

    def redraw(key: FlowKey) -> FlowKey:
        if key.proto in (PROTO_ICMP, PROTO_ICMPV6):
            ident = redraws.randint(1, 0xFFFF)
            return key._replace(sport=ident, dport=ident)
        return key._replace(sport=redraws.randint(*EPHEMERAL_PORTS))

    for _, _, _, item in events:
        if isinstance(item, FlowKey):  # spoofed: taken as it comes
            gateway.open(item, ingress=not gateway.owns(item.src))
            continue
        p = item
        key, xlat = gateway.open(_flow_key(p), p.ingress, redraw)
        p.sport = key.sport
        p.down = Wire(xlat.dst, xlat.src, xlat.dport, xlat.sport)


def _flow_key(p: _Plan) -> FlowKey:
    v4 = len(p.client) == 4
    if p.kind == "icmp":  # the echo identifier is both "ports"
        proto = PROTO_ICMP if v4 else PROTO_ICMPV6
        return FlowKey(4 if v4 else 6, proto, 0, p.client, p.server, p.sport, p.sport)
    proto = PROTO_UDP if p.kind in ("udp", "udp-stream") else PROTO_TCP
    return FlowKey(4 if v4 else 6, proto, 0, p.client, p.server, p.sport, p.dport)


def _payload_estimate(p: _Plan) -> int:
    if p.kind == "tcp":
        return p.size
    if p.kind == "udp-stream":
        return p.size // (20 * MS) * 2 * 180
    if p.kind == "udp":
        return p.size * 150
    return p.size * 2 * 56


# ---------------------------------------------------------------- per-flow helpers


def _client_mac(addr: bytes) -> bytes:
    return b"\x02\x00" + addr[-4:]


def _server_ttl(addr: bytes) -> int:
    """TTL/hop limit as the server's packets arrive: 64 or 128 minus a per-server hop count."""
    initial = 128 if addr[-1] % 5 == 0 else 64
    return initial - 3 - sum(addr) % 20


def _random_host(nets: list[IPNetwork], rng: random.Random) -> bytes:
    net = rng.choice(nets)
    size = net.num_addresses
    offset = rng.randint(1, size - 2) if size > 2 else rng.randrange(size)
    return (int(net.network_address) + offset).to_bytes(net.max_prefixlen // 8, "big")


# ---------------------------------------------------------------- TCP


@dataclass(slots=True, kw_only=True)
class _End:
    """One side of a TCP connection, as far as the generator needs it."""

    addr: bytes
    port: int
    dst: bytes  # where its packets are addressed, as captured (a translated tuple's end)
    dport: int
    mac: bytes
    peer_mac: bytes
    ttl: int
    far: bool  # a server: its packets reach the capture point half an RTT after sending
    ip_id: int
    nxt: int  # next sequence number it sends
    mss_opt: int  # the MSS it announces
    wscale: int  # shift of the windows it advertises
    rcv_wnd: int  # receive window (bytes) it starts with
    rcv_max: int  # receive window it grows to
    ts_off: int  # timestamp clock offset (ms); -1: no timestamps
    flow_label: int = 0  # IPv6
    mss: int = 0  # data bytes per segment it sends, set by the handshake
    rcv_nxt: int = 0
    received: int = 0
    right: int = 0  # the right edge of the window it last advertised
    cwnd: int = 0
    sent_ts: deque[tuple[int, int]] = field(default_factory=deque)  # (time, tsval) sent
    ts_recent: int = 0
    framer: TcpFramer | None = None  # built at its first frame, once its headers are set

    def window_bytes(self) -> int:
        # the window opens as data arrives, as Linux's receive-buffer autotuning does
        return min(self.rcv_max, self.rcv_wnd + self.received)


class _Tcp:
    """One TCP connection: the handshake, transfers, teardown, as a packet iterator."""

    def __init__(self, plan: _Plan, spec: TraceSpec, rng: random.Random, mark: int) -> None:
        self.plan, self.spec, self.rng, self.mark = plan, spec, rng, mark
        self.rtt = plan.rtt_ns
        self.proc = rng.randint(5 * US, 60 * US)  # an end's reaction time to a segment
        self.vlan = spec.vlan
        v6 = len(plan.client) == 16
        timestamps = rng.random() < 0.9  # both sides agree (Windows peers often do not)
        base_mss = spec.mtu - (60 if v6 else 40)
        big = plan.kind == "elephant"
        self.client = self._end(plan.up, False, base_mss, timestamps, big)
        server_mss = base_mss - rng.choice((0, 0, 0, 20, 80, 100))
        self.server = self._end(plan.reply, True, server_mss, timestamps, big)
        self.client.mac, self.client.peer_mac = _client_mac(plan.client), GATEWAY_MAC
        self.server.mac, self.server.peer_mac = GATEWAY_MAC, _client_mac(plan.client)
        self.server.ttl = _server_ttl(plan.server)
        if v6:  # each end labels its own direction (RFC 6437)
            self.client.flow_label, self.server.flow_label = (
                rng.getrandbits(20),
                rng.getrandbits(20),
            )

    def _end(self, wire: Wire, far: bool, mss: int, ts: bool, big: bool) -> _End:
        rng = self.rng
        # Linux: rcv window starts near 64 KiB; tcp_rmem max (6 MiB) sets the scale, 7
        rcv_max = rng.choice((256, 1024, 3072, 6144)) * 1024 if not big else 6144 * 1024
        wscale = rng.choice((7, 7, 7, 8, 9, 10)) if big else rng.choice((2, 5, 6, 7, 7, 8, 9))
        wscale = max(wscale, math.ceil(math.log2(rcv_max / 65535)))
        return _End(
            addr=wire.src,
            port=wire.sport,
            dst=wire.dst,
            dport=wire.dport,
            mac=b"",
            peer_mac=b"",
            ttl=64,
            far=far,
            ip_id=rng.getrandbits(16),
            nxt=rng.getrandbits(32),
            mss_opt=mss,
            wscale=wscale,
            rcv_wnd=rng.choice((44, 45)) * mss,
            rcv_max=rcv_max,
            ts_off=rng.getrandbits(32) if ts else -1,
        )

    # ---- packets

    def _send(
        self,
        end: _End,
        peer: _End,
        t: int,
        flags: int,
        payload: bytes = b"",
        *,
        syn_options: bytes | None = None,
        seq: int | None = None,
        mark: int | None = None,
    ) -> Emit:
        if syn_options is not None:
            options = syn_options
            window = min(end.rcv_wnd, 0xFFFF)  # never scaled in a SYN (RFC 7323 §2.2)
            if flags & TCP_ACK:
                end.right = end.rcv_nxt + window
        else:
            options = b""
            if end.ts_off >= 0:
                tsval = self._tsval(end, t)
                end.sent_ts.append((t, tsval))
                options = tcp_options(timestamps=(tsval, self._echo(end, peer, t)))
            window = min(end.window_bytes() >> end.wscale, 0xFFFF)
            end.right = max(end.right, end.rcv_nxt + (window << end.wscale))
        framer = end.framer
        if framer is None:
            framer = end.framer = TcpFramer(
                src=end.addr, dst=end.dst, sport=end.port, dport=end.dport, src_mac=end.mac,
                dst_mac=end.peer_mac, ttl=end.ttl, flow_label=end.flow_label, vlan=self.vlan)
        frame = framer.frame(seq=end.nxt if seq is None else seq,
                             ack=end.rcv_nxt if flags & TCP_ACK else 0, flags=flags,
                             window=window, options=options, payload=payload, ip_id=end.ip_id)
        end.ip_id = (end.ip_id + 1) & 0xFFFF
        return t, frame, self.mark if mark is None else mark

    def _tsval(self, end: _End, t: int) -> int:
        """The millisecond timestamp clock of `end` when it sent what is seen at `t`."""
        sent_at = t - self.rtt // 2 if end.far else t
        return (end.ts_off + sent_at // MS) & 0xFFFFFFFF

    def _echo(self, end: _End, peer: _End, t: int) -> int:
        """TSecr: the peer's latest TSval that `end` had received when it sent at `t`."""
        seen_by = t - self.rtt if end.far else t
        q = peer.sent_ts
        while len(q) >= 2 and q[1][0] <= seen_by:
            q.popleft()
        if q and q[0][0] <= seen_by:
            end.ts_recent = q[0][1]
        return end.ts_recent

    def _reply_at(self, responder: _End, t: int) -> int:
        """When `responder`'s answer to a packet seen at `t` is seen."""
        return t + self.proc + (self.rtt if responder.far else 0)

    def _syn_options(self, end: _End, echo: int, t: int) -> bytes:
        ts = None
        if end.ts_off >= 0:
            tsval = self._tsval(end, t)
            end.sent_ts.append((t, tsval))
            ts = (tsval, echo)
        return tcp_options(mss=end.mss_opt, sack_perm=True, timestamps=ts, wscale=end.wscale)

    # ---- phases

    def packets(self) -> Iterator[Emit]:
        c, s, plan, rng = self.client, self.server, self.plan, self.rng
        t = plan.start_ns
        yield self._send(c, s, t, TCP_SYN, syn_options=self._syn_options(c, 0, t))
        c.nxt += 1
        s.rcv_nxt = c.nxt
        t = self._reply_at(s, t)
        c_tsval = c.sent_ts[-1][1] if c.sent_ts else 0
        ip_id, s.ip_id = s.ip_id, 0  # Linux's listener sends its SYN-ACK with IP ID 0
        yield self._send(s, c, t, TCP_SYN | TCP_ACK, syn_options=self._syn_options(s, c_tsval, t))
        s.ip_id = ip_id
        s.nxt += 1
        c.rcv_nxt = s.nxt
        opt_len = 12 if c.ts_off >= 0 else 0
        c.mss = min(c.mss_opt, s.mss_opt) - opt_len
        s.mss = c.mss
        c.cwnd = s.cwnd = INIT_CWND * c.mss
        if c.ts_off >= 0:
            c.ts_recent = s.sent_ts[-1][1]
            s.ts_recent = c_tsval
        t = self._reply_at(c, t)
        yield self._send(c, s, t, TCP_ACK)

        host = ipaddress.ip_address(plan.server)  # the name the client asked (a VIP)
        host_text = f"[{host}]" if host.version == 6 else str(host)
        if plan.upload:
            request = _http_upload_head(plan.index, host_text, plan.size)
            response = _HTTP_NO_CONTENT
            req_len, resp_len = len(request) + plan.size, len(response)
        else:
            request = _http_get(plan.index, host_text)
            response = _http_ok_head(plan.size)
            req_len, resp_len = len(request), len(response) + plan.size

        t += rng.randint(10 * US, 200 * US)
        fast = plan.kind == "elephant"
        up_rate = plan.rate_bps if plan.upload else 1e9
        sent, last = yield from self._transfer(c, s, request, req_len, t, up_rate, False)
        if plan.attacked:
            last = yield from self._inject(max(last, sent), fast)
        # the server answers the request's last segment (its ACK rides on the response)
        t = max(self._reply_at(s, sent) + rng.randint(50 * US, 20 * MS), last)
        close = rng.random()
        client_closes = close < 0.6 or plan.upload
        think = int(rng.expovariate(1 / (30 * MS)))
        final_ack = client_closes and think >= DELACK_NS
        down_rate = 1e9 if plan.upload else plan.rate_bps
        sent, last = yield from self._transfer(s, c, response, resp_len, t, down_rate, final_ack)
        if client_closes:
            t = max(sent + think, last)
            if close < RST_SHARE:
                yield self._send(c, s, t, TCP_RST | TCP_ACK)
                return
            yield from self._close(c, s, t)
        else:
            yield from self._close(s, c, max(sent + self.proc, last))

    def _close(self, closer: _End, other: _End, t: int) -> Iterator[Emit]:
        yield self._send(closer, other, t, TCP_FIN | TCP_ACK)
        closer.nxt += 1
        other.rcv_nxt = closer.nxt
        t = self._reply_at(other, t)
        if self.rng.random() < 0.3:  # the application closes a little after the kernel ACKs
            yield self._send(other, closer, t, TCP_ACK)
            t += self.rng.randint(50 * US, 5 * MS)
        yield self._send(other, closer, t, TCP_FIN | TCP_ACK)
        other.nxt += 1
        closer.rcv_nxt = other.nxt
        yield self._send(closer, other, self._reply_at(closer, t), TCP_ACK)

    def _transfer(
        self,
        snd: _End,
        rcv: _End,
        head: bytes,
        total: int,
        t: int,
        rate_bps: float,
        final_ack: bool,
    ) -> Generator[Emit, None, tuple[int, int]]:
        """Send `total` bytes (`head`, then filler) from `snd` to `rcv`.

        Returns (time of the last data segment, time of the last packet yielded). A trailing
        odd segment is ACKed by the delayed-ACK timer only with `final_ack`; otherwise the
        receiver's next packet carries the ACK.
        """
        una, end_seq = snd.nxt, snd.nxt + total
        right = rcv.right  # the receiver's window as the sender last heard it
        acks: deque[tuple[int, int, int]] = deque()  # (effective time, ack, right edge)
        out: deque[Emit] = deque()  # receiver's ACKs, in time order
        unacked, last_seg = 0, t
        ns_per_byte = 8 * NS / rate_bps
        offset = 0
        while snd.nxt < end_seq:
            seglen = min(snd.mss, end_seq - snd.nxt)
            while snd.nxt + seglen > min(una + snd.cwnd, right):
                if not acks:  # everything in flight waits for the delayed-ACK timer
                    out.append(self._ack(rcv, snd, last_seg + DELACK_NS, acks))
                    unacked = 0
                eff, ack, edge = acks.popleft()
                snd.cwnd = min(snd.cwnd + (ack - una), rcv.rcv_max)  # slow start, no loss
                una, right, t = ack, max(right, edge), max(t, eff)
            while out and out[0][0] <= t:
                yield out.popleft()
            payload = _stream(head, offset, seglen)
            flags = TCP_ACK | (TCP_PSH if snd.nxt + seglen == end_seq else 0)
            yield self._send(snd, rcv, t, flags, payload)
            snd.nxt += seglen
            offset += seglen
            rcv.rcv_nxt = snd.nxt
            rcv.received += seglen
            unacked += 1
            last_seg = t
            if unacked == 2:
                out.append(self._ack(rcv, snd, t, acks))
                unacked = 0
            t += int((seglen + 78) * ns_per_byte)
        if unacked and final_ack:
            out.append(self._ack(rcv, snd, last_seg + DELACK_NS, acks))
        last = last_seg
        while out:
            last = out[0][0]
            yield out.popleft()
        return last_seg, last

    def _ack(self, rcv: _End, snd: _End, t: int, acks: deque[tuple[int, int, int]]) -> Emit:
        """`rcv` ACKs what it has for a segment seen at `t`; the sender learns it an RTT later."""
        seen = self._reply_at(rcv, t)
        emit = self._send(rcv, snd, seen, TCP_ACK)
        acks.append((t + self.proc + self.rtt, rcv.rcv_nxt, rcv.right))
        return emit

    def _inject(self, t: int, fast: bool) -> Generator[Emit, None, int]:
        """Out-of-window attack: spoofed segments and RSTs far outside the receiver's window."""
        rng, c, s = self.rng, self.client, self.server
        gap = max(self.rtt // 8, 10 * US)
        for i in range(rng.randint(2, 4)):
            t += gap
            src = s if i % 2 == 0 else c
            seq = (src.nxt + rng.choice((1, -1)) * rng.randint(1 << 29, 1 << 30)) & 0xFFFFFFFF
            payload = filler(rng.randint(64, 512), rng.getrandbits(16))
            yield self._spoofed(src, t, seq, TCP_PSH | TCP_ACK, payload)
        t += gap
        src = s if rng.random() < 0.5 else c
        yield self._spoofed(src, t, (src.nxt + (1 << 31)) & 0xFFFFFFFF, TCP_RST, b"")
        return t

    def _spoofed(self, src: _End, t: int, seq: int, flags: int, data: bytes) -> Emit:
        """A segment forged in the name of `src`, addressed as `src`'s own packets are."""
        frame = tcp_frame(
            src=src.addr,
            dst=src.dst,
            sport=src.port,
            dport=src.dport,
            seq=seq,
            ack=src.rcv_nxt if flags & TCP_ACK else 0,
            flags=flags,
            window=self.rng.randint(512, 0xFFFF),
            payload=data,
            src_mac=src.mac,
            dst_mac=src.peer_mac,
            ttl=self.rng.randint(30, 250),
            ip_id=self.rng.getrandbits(16),
            flow_label=src.flow_label,
            vlan=self.vlan,
        )
        return t, frame, MARK_ATTACK


def _stream(head: bytes, offset: int, n: int) -> bytes:
    """Bytes `offset`..`offset+n` of a stream made of `head` then filler."""
    if offset >= len(head):
        return filler(n, offset)
    part = head[offset : offset + n]
    return part + filler(n - len(part), offset + len(part))


def _http_get(index: int, host: str) -> bytes:
    return (
        f"GET /objects/{index}.bin HTTP/1.1\r\nHost: {host}\r\n"
        "User-Agent: flowshift-gen/0.1\r\nAccept: */*\r\n\r\n"
    ).encode()


def _http_ok_head(length: int) -> bytes:
    return (
        "HTTP/1.1 200 OK\r\nServer: flowshift-gen\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _http_upload_head(index: int, host: str, length: int) -> bytes:
    return (
        f"POST /uploads/{index} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: flowshift-gen/0.1\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


_HTTP_NO_CONTENT = b"HTTP/1.1 204 No Content\r\nServer: flowshift-gen\r\n\r\n"


# ---------------------------------------------------------------- UDP, ICMP, SYN flood


class _Hosts:
    """MACs, TTLs and IP IDs of a non-TCP flow's two ends."""

    def __init__(self, plan: _Plan, spec: TraceSpec, rng: random.Random) -> None:
        self.plan, self.rng, self.vlan = plan, rng, spec.vlan
        self.cmac = _client_mac(plan.client)
        self.sttl = _server_ttl(plan.server)
        self.client_id = rng.getrandbits(16)

    def up(self) -> dict[str, Any]:
        """Keyword arguments of a client -> server frame."""
        self.client_id = (self.client_id + 1) & 0xFFFF
        up = self.plan.up
        return {
            "src": up.src,
            "dst": up.dst,
            "src_mac": self.cmac,
            "dst_mac": GATEWAY_MAC,
            "ttl": 64,
            "ip_id": self.client_id,
            "vlan": self.vlan,
        }

    def down(self, df: bool = True) -> dict[str, Any]:
        reply = self.plan.reply
        return {
            "src": reply.src,
            "dst": reply.dst,
            "src_mac": GATEWAY_MAC,
            "dst_mac": self.cmac,
            "ttl": self.sttl,
            "ip_id": self.rng.getrandbits(16),
            "df": df,
            "vlan": self.vlan,
        }


def _udp_flow(plan: _Plan, spec: TraceSpec, rng: random.Random) -> Iterator[Emit]:
    """DNS-like: one or two queries (A, then AAAA), each answered, or refused by ICMP."""
    h = _Hosts(plan, spec, rng)
    t = plan.start_ns
    dns = plan.dport == 53
    name = f"host{plan.index}.example.com"
    reply = plan.reply
    for qtype in (1, 28)[: plan.size]:
        txid = rng.getrandbits(16)
        query = _dns_query(txid, name, qtype) if dns else filler(rng.randint(20, 200), txid)
        sent = h.up()
        up = udp_frame(sport=plan.sport, dport=plan.dport, payload=query, **sent)
        yield t, up, MARK_PLAIN
        t += plan.rtt_ns + rng.randint(100 * US, 5 * MS)
        if rng.random() < UNREACHABLE_SHARE:
            kind = ICMP_DEST_UNREACH if len(plan.client) == 4 else ICMPV6_DEST_UNREACH
            code = 3 if len(plan.client) == 4 else 4  # port unreachable
            d = h.down(df=False)
            if plan.down is not None:  # the server refuses the query as it got it: translated
                sent |= {"src": reply.dst, "dst": reply.src}
                up = udp_frame(sport=reply.dport, dport=reply.sport, payload=query, **sent)
            err = icmp_error_frame(up, type=kind, code=code, ttl=d["ttl"], ip_id=d["ip_id"])
            yield t, err, MARK_PLAIN
            return
        if dns:
            answer = _dns_answer(txid, name, qtype, rng)
        else:
            answer = filler(rng.randint(40, 1200), txid)
        yield (
            t,
            udp_frame(sport=reply.sport, dport=reply.dport, payload=answer, **h.down()),
            MARK_PLAIN,
        )
        t += rng.randint(20 * US, 2 * MS)


def _dns_query(txid: int, name: str, qtype: int) -> bytes:
    qname = b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def _dns_answer(txid: int, name: str, qtype: int, rng: random.Random) -> bytes:
    question = _dns_query(txid, name, qtype)[12:]
    n = rng.randint(1, 4)
    rdata_len = 4 if qtype == 1 else 16
    answers = b"".join(
        struct.pack("!HHHIH", 0xC00C, qtype, 1, rng.randint(30, 3600), rdata_len)
        + rng.getrandbits(8 * rdata_len).to_bytes(rdata_len, "big")
        for _ in range(n)
    )
    return struct.pack("!HHHHHH", txid, 0x8180, 1, n, 0, 0) + question + answers


def _stream_flow(plan: _Plan, spec: TraceSpec, rng: random.Random) -> Iterator[Emit]:
    """A media-like stream: one packet each way every 20 ms for `plan.size` nanoseconds."""
    h = _Hosts(plan, spec, rng)
    interval = 20 * MS
    lag = min(plan.rtt_ns // 2, interval // 2)  # the far end's packets, offset in phase
    up_len, down_len = rng.choice((172, 332, 1200)), rng.choice((172, 332, 1200))
    t = plan.start_ns
    reply = plan.reply
    for i in range(max(1, plan.size // interval)):
        jitter = rng.randint(0, 200 * US)
        yield (
            t + jitter,
            udp_frame(sport=plan.sport, dport=plan.dport, payload=filler(up_len, i * 7), **h.up()),
            MARK_PLAIN,
        )
        yield (
            t + lag + jitter + rng.randint(0, 300 * US),
            udp_frame(
                sport=reply.sport, dport=reply.dport, payload=filler(down_len, i * 11), **h.down()
            ),
            MARK_PLAIN,
        )
        t += interval


def _ping_flow(plan: _Plan, spec: TraceSpec, rng: random.Random) -> Iterator[Emit]:
    """A ping run: `plan.size` echo requests with one identifier, each answered after an RTT."""
    h = _Hosts(plan, spec, rng)
    interval = 1 * NS if rng.random() < 0.8 else 200 * MS
    events: list[Emit] = []
    t = plan.start_ns
    for seq in range(1, plan.size + 1):
        # iputils ping: a struct timeval, then bytes 0x10, 0x11, ... up to 56 bytes
        sent_us = t // US
        data = struct.pack("<qq", sent_us // 1_000_000, sent_us % 1_000_000) + bytes(
            range(0x10, 0x38)
        )
        req = icmp_echo_frame(ident=plan.sport, seq=seq, payload=data, **h.up())
        # the reply carries the identifier as the server got it (NAT may move it)
        rep = icmp_echo_frame(
            ident=plan.reply.dport, seq=seq, reply=True, payload=data, **h.down(df=False)
        )
        events.append((t, req, MARK_PLAIN))
        events.append((t + plan.rtt_ns + rng.randint(10 * US, 100 * US), rep, MARK_PLAIN))
        t += interval + rng.randint(0, 2 * MS)
    events.sort(key=lambda e: e[0])
    yield from events


def _syn_flood(plan: _Plan, spec: TraceSpec, rng: random.Random) -> Iterator[Emit]:
    """SYNs from random addresses of the client networks to one server port, never answered.

    Against a gateway (`plan.server` set) they come from the outside networks instead and go
    to its VIP, port forward or public address.
    """
    if plan.server:
        family = 4 if len(plan.server) == 4 else 6
        nets = [n for n in spec.servers if n.version == family]
        dst = plan.server
    else:
        v4: list[IPNetwork] = [n for n in spec.clients if n.version == 4]
        nets = (
            v4
            if v4 and any(n.version == 4 for n in spec.servers)
            else [n for n in spec.clients if n.version == 6]
        )
        family = nets[0].version
        target = next(n for n in spec.servers if n.version == family)
        dst = _hosts(target, random.Random(spec.seed))[0]
    # the burst lasts about 2% of the duration
    spacing = max(int(spec.duration_s * NS * 0.02 / spec.attack_count), 1 * US)
    mss = spec.mtu - (40 if family == 4 else 60)
    t = plan.start_ns
    for _ in range(spec.attack_count):
        src = _random_host(nets, rng)
        frame = tcp_frame(
            src=src,
            dst=dst,
            sport=rng.randint(1024, 65535),
            dport=plan.dport,
            seq=rng.getrandbits(32),
            ack=0,
            flags=TCP_SYN,
            window=rng.choice((512, 1024, 64240)),
            options=tcp_options(mss=mss) if rng.random() < 0.5 else b"",
            src_mac=_client_mac(src),
            dst_mac=GATEWAY_MAC,
            ttl=rng.randint(40, 64),
            ip_id=rng.getrandbits(16),
            df=False,
            vlan=spec.vlan,
        )
        yield t, frame, MARK_ATTACK
        t += rng.randint(spacing // 2, spacing * 3 // 2)


def _flow_rng(spec: TraceSpec, plan: _Plan) -> random.Random:
    return random.Random(f"{spec.seed}:{plan.index}")


def _flow_packets(plan: _Plan, spec: TraceSpec) -> Iterator[Emit]:
    rng = _flow_rng(spec, plan)
    if plan.kind in ("tcp", "elephant"):
        mark = MARK_ELEPHANT if plan.kind == "elephant" else MARK_PLAIN
        return _Tcp(plan, spec, rng, mark).packets()
    if plan.kind == "udp":
        return _udp_flow(plan, spec, rng)
    if plan.kind == "udp-stream":
        return _stream_flow(plan, spec, rng)
    if plan.kind == "icmp":
        return _ping_flow(plan, spec, rng)
    return _syn_flood(plan, spec, rng)


# ---------------------------------------------------------------- merge


def frames(spec: TraceSpec, summary: GenSummary | None = None) -> Iterator[tuple[int, bytes]]:
    """The frames of the trace `spec` describes, in time order: (time in ns, Ethernet frame).
    `summary`, when given, is filled in as they are taken (complete once they all are)."""
    plans = _plan(spec)
    if summary is None:
        summary = GenSummary()
    for p in plans:
        summary.flows[p.kind] = summary.flows.get(p.kind, 0) + 1
    summary.attacked_flows = sum(p.attacked for p in plans)
    summary.ingress_flows = sum(p.ingress for p in plans)
    heap: list[tuple[int, int, bytes, int, Iterator[Emit]]] = []
    order = count()
    next_plan = 0
    while heap or next_plan < len(plans):
        if next_plan < len(plans) and (not heap or plans[next_plan].start_ns <= heap[0][0]):
            it = _flow_packets(plans[next_plan], spec)
            next_plan += 1
            first = next(it, None)
            if first is not None:
                heapq.heappush(heap, (first[0], next(order), first[1], first[2], it))
            continue
        ts, _, frame, mark, it = heap[0]
        summary.packets += 1
        summary.bytes += len(frame)
        if mark == MARK_ELEPHANT:
            summary.elephant_packets += 1
            summary.elephant_bytes += len(frame)
        elif mark == MARK_ATTACK:
            summary.attack_packets += 1
        if summary.packets == 1:
            summary.first_ns = ts
        summary.last_ns = ts
        yield ts, frame
        nxt = next(it, None)
        if nxt is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (nxt[0], next(order), nxt[1], nxt[2], it))


def generate(
    spec: TraceSpec,
    path: str | PathLike[str],
    progress: Callable[[int, int], None] | None = None,
) -> GenSummary:
    """Write the trace `spec` describes to `path` (classic pcap, Ethernet, nanoseconds).

    `progress(packets written, trace time elapsed in ns)` is called every few thousand packets.
    """
    summary = GenSummary()
    with PcapWriter(path, linktype=1) as out:
        for ts, frame in frames(spec, summary):
            out.write(ts, frame)
            if progress is not None and summary.packets % 4096 == 0:
                progress(summary.packets, ts - spec.start_ns)
    if progress is not None:
        progress(summary.packets, summary.last_ns - spec.start_ns)
    return summary
