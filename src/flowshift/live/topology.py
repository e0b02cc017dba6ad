"""The live host's namespaces and links, built and removed with pyroute2.

```
 fs-m-<machine> [eth0] ──veth── [fs-p-<machine>] fs-host [fs-up] ──veth── [eth0] fs-wire
```

fs-host has no addresses and forwards nothing (ip_forward 0, IPv6 off on its ports): every packet
between a machine and the wire crosses the VNIC daemon. Each machine and the wire route through
a link-local gateway (169.254.0.1, fe80::1) whose MAC is fs-host's port, by a permanent
neighbour entry: no ARP or ND ever needs an answer from the daemon. Checksum offload,
segmentation and GRO are off on both ends of every veth, so the daemon sees whole frames with
full checksums and the receiving kernels verify the checksums the daemon rewrote.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]
from pyroute2.ethtool import Ethtool  # type: ignore[import-untyped]

from flowshift.config import ConntrackConfig, MachineConfig, fields_default
from flowshift.live.engine import ConfigError, HostConfig
from flowshift.live.names import (
    GATEWAY4,
    GATEWAY6,
    INSIDE4,
    INSIDE6,
    INSIDE_IF,
    PEER_IF,
    UPLINK,
    LiveError,
    Names,
    port_name,
)
from flowshift.live.state import PortState

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

IFA_F_NODAD = 0x02  # no duplicate address detection: the address is usable at once
RTNH_F_ONLINK = 0x04  # the gateway is on the link although no prefix says so
NUD_PERMANENT = 0x80
AF_INET6 = 10
# ethtool features turned off on every veth end (names as `ethtool -k` prints them); the ones a
# kernel does not have are skipped
OFFLOADS_OFF = (
    "rx-checksum", "tx-checksum-ip-generic", "tx-checksum-ipv4", "tx-checksum-ipv6",
    "tx-checksum-sctp", "tx-scatter-gather", "tx-tcp-segmentation", "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation", "tx-tcp6-segmentation", "tx-generic-segmentation",
    "tx-udp-segmentation", "tx-gso-list", "rx-gro", "rx-gro-list", "rx-udp-gro-forwarding",
)
# (path under /proc/sys/net, value): fs-host forwards nothing and speaks no IPv6 of its own
HOST_SYSCTLS = (
    ("ipv4/ip_forward", "0"),
    ("ipv6/conf/all/forwarding", "0"),
    ("ipv6/conf/all/disable_ipv6", "1"),
    ("ipv6/conf/default/disable_ipv6", "1"),
)
# machines and the wire: addresses usable at once, no router discovery chatter
END_SYSCTLS = tuple(
    (f"ipv6/conf/{dev}/{key}", "0")
    for dev in ("all", "default")
    for key in ("accept_dad", "router_solicitations", "accept_ra")
)


@dataclass(frozen=True)
class MachinePlan:
    name: str
    netns: str
    port: str
    addresses: tuple[Interface, ...]  # on its eth0, or on fs-i-<machine>'s for a guest router
    inside: str = ""  # machine tier (start = "machine"): the namespace behind the guest router


@dataclass(frozen=True)
class Plan:
    host: str
    wire: str
    machines: tuple[MachinePlan, ...]
    peers: tuple[Interface, ...]  # on fs-wire's eth0, as /32 and /128
    wire_routes: tuple[Network, ...]  # from fs-wire to the host: machines' networks and publics


def first_host(net: Network) -> Interface:
    """The first host address of a network (the network address itself for /31, /32, /128)."""
    addr = net.network_address + 1 if net.num_addresses > 2 else net.network_address
    return ipaddress.ip_interface(f"{addr}/{net.prefixlen}")


def plan(cfg: HostConfig, names: Names, source: str) -> Plan:
    """What `live up` creates for a config; a ConfigError when no live host can be made of it
    (a peer that is a machine's address). A machine's eth0 gets the first host address of each
    of its networks, and the machine-side addresses its LB backends and DNAT targets use."""
    machines = []
    ports: dict[str, str] = {}
    for j, m in enumerate(cfg.machines):
        port = port_name(m.name)
        if port in ports:
            raise ConfigError(source, f"machine[{j}].name", f"{m.name!r} and {ports[port]!r} "
                              f"would share the live port name {port}: rename one")
        ports[port] = m.name
        # the eBPF datapath runs Linux's default conntrack sysctls and bridges
        if m.conntrack != ConntrackConfig():
            raise ConfigError(source, f"machine[{j}].conntrack",
                              "flowshift live runs Linux's default conntrack settings only")
        if m.forwarding != fields_default(MachineConfig, "forwarding"):
            raise ConfigError(source, f"machine[{j}].forwarding",
                              f"flowshift live does not run forwarding = {m.forwarding!r}")
        addrs = [first_host(n) for n in m.addresses]
        inside = [b.addr for pool in m.lb for b in pool.backends]
        inside += [rule.to_addr for rule in (m.nat.dnat if m.nat else ())]
        for raw in inside:
            ip = ipaddress.ip_address(raw)
            net = next((n for n in m.addresses if n.version == ip.version and ip in n), None)
            iface = ipaddress.ip_interface(f"{ip}/{net.prefixlen if net else ip.max_prefixlen}")
            if all(a.ip != iface.ip for a in addrs):
                addrs.append(iface)
        inside_ns = names.inside(m.name) if m.start == "machine" else ""
        machines.append(MachinePlan(m.name, names.machine(m.name), port, tuple(addrs),
                                    inside_ns))
    peers = []
    for i, raw in enumerate(cfg.live.peers):
        ip = ipaddress.ip_address(raw)
        for m in cfg.machines:
            if raw in m.public or any(ip in n for n in m.addresses if n.version == ip.version):
                raise ConfigError(source, f"live.peers[{i}]",
                                  f"peer {ip} is an address of machine {m.name!r}")
        peers.append(ipaddress.ip_interface(f"{ip}/{ip.max_prefixlen}"))
    routes: list[Network] = []
    for m in cfg.machines:
        routes += m.addresses
        routes += [ipaddress.ip_network(a) for a in m.public]
    return Plan(names.host, names.wire, tuple(machines), tuple(peers), tuple(routes))


def build(p: Plan, record: Callable[[str], None]) -> tuple[list[PortState], PortState]:
    """Create everything; `record(netns)` is called before each namespace is created, so a
    failure part way leaves a record that `teardown` removes. Returns (ports, uplink)."""
    spaces = ((p.host, HOST_SYSCTLS), (p.wire, END_SYSCTLS),
              *((m.netns, END_SYSCTLS) for m in p.machines),
              *((m.inside, END_SYSCTLS) for m in p.machines if m.inside))
    existing = set(netns.listnetns())
    for ns, _ in spaces:
        if ns in existing:  # not ours: never recorded, so never removed
            raise LiveError(f"network namespace {ns} already exists: flowshift did not "
                            "create it; remove it first")
    for ns, sysctls in spaces:
        record(ns)
        netns.create(ns)
        _sysctls(ns, sysctls)
    with IPRoute(netns=p.host) as host:
        _up(host, "lo")
        host.link("add", ifname=UPLINK, kind="veth", peer={"ifname": PEER_IF, "net_ns_fd": p.wire})
        for m in p.machines:
            host.link("add", ifname=m.port, kind="veth",
                      peer={"ifname": PEER_IF, "net_ns_fd": m.netns})
    offloads_off(p.host, [UPLINK, *(m.port for m in p.machines)])
    offloads_off(p.wire, [PEER_IF])
    for m in p.machines:
        offloads_off(m.netns, [PEER_IF])
        if m.inside:
            with IPRoute(netns=m.netns) as ipr:
                ipr.link("add", ifname=INSIDE_IF, kind="veth",
                         peer={"ifname": PEER_IF, "net_ns_fd": m.inside})
            offloads_off(m.netns, [INSIDE_IF])
            offloads_off(m.inside, [PEER_IF])
    with IPRoute(netns=p.host) as host:
        macs = {name: _up(host, name) for name in (UPLINK, *(m.port for m in p.machines))}
    ports = []
    default = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    for m in p.machines:
        with IPRoute(netns=m.netns) as ipr:
            _up(ipr, "lo")
            mac = _end(ipr, () if m.inside else m.addresses, macs[m.port], default)
            if m.inside:
                router_mac = _up(ipr, INSIDE_IF)
                with IPRoute(netns=m.inside) as inner:
                    _up(inner, "lo")
                    inside_mac = _end(inner, m.addresses, router_mac, default)
                _inside_routes(ipr, m.addresses, inside_mac)
        ports.append(PortState(ifname=m.port, mac=macs[m.port], peer_mac=mac, machine=m.name))
    with IPRoute(netns=p.wire) as ipr:
        _up(ipr, "lo")
        mac = _end(ipr, p.peers, macs[UPLINK], p.wire_routes)
    return ports, PortState(ifname=UPLINK, mac=macs[UPLINK], peer_mac=mac)


def _end(ipr: IPRoute, addrs: Iterable[Interface], gw_mac: str,
         routes: Iterable[Network]) -> str:
    """Set up a machine's or the wire's eth0: addresses, gateways, routes. Returns its MAC."""
    mac = _up(ipr, PEER_IF)
    idx = ipr.link_lookup(ifname=PEER_IF)[0]
    for a in addrs:
        ipr.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen,
                 flags=IFA_F_NODAD if a.version == 6 else 0)
    ipr.neigh("add", dst=GATEWAY4, lladdr=gw_mac, ifindex=idx, state=NUD_PERMANENT)
    ipr.neigh("add", dst=GATEWAY6, lladdr=gw_mac, ifindex=idx, state=NUD_PERMANENT,
              family=AF_INET6)
    for net in routes:
        if net.version == 4:
            ipr.route("add", dst=str(net), gateway=GATEWAY4, oif=idx, flags=RTNH_F_ONLINK)
        else:
            ipr.route("add", dst=str(net), gateway=GATEWAY6, oif=idx, family=AF_INET6)
    return mac


def _inside_routes(ipr: IPRoute, addrs: Iterable[Interface], mac: str) -> None:
    """The guest router's routes to the machine's networks and addresses: through a link-local
    next hop on `inside` whose MAC is fs-i-<machine>'s eth0 (permanent: no ARP, no ND)."""
    idx = ipr.link_lookup(ifname=INSIDE_IF)[0]
    ipr.neigh("add", dst=INSIDE4, lladdr=mac, ifindex=idx, state=NUD_PERMANENT)
    ipr.neigh("add", dst=INSIDE6, lladdr=mac, ifindex=idx, state=NUD_PERMANENT, family=AF_INET6)
    nets = {a.network for a in addrs}
    for net in sorted(nets, key=str):
        if net.version == 4:
            ipr.route("add", dst=str(net), gateway=INSIDE4, oif=idx, flags=RTNH_F_ONLINK)
        else:
            ipr.route("add", dst=str(net), gateway=INSIDE6, oif=idx, family=AF_INET6)


def _up(ipr: IPRoute, ifname: str) -> str:
    """Bring a link up; its MAC address."""
    idx = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, state="up")
    return str(ipr.get_links(idx)[0].get("IFLA_ADDRESS"))


def _sysctls(ns: str, values: Iterable[tuple[str, str]]) -> None:
    """Write /proc/sys/net keys of a namespace: /proc/sys/net shows the writer's namespace."""
    netns.pushns(ns)
    try:
        for key, value in values:
            with open(f"/proc/sys/net/{key}", "w") as f:
                f.write(value)
    finally:
        netns.popns()


def offloads_off(ns: str, ifnames: Iterable[str]) -> None:
    """`ethtool -K <if> <feature> off` for OFFLOADS_OFF, by ioctl (pyroute2's Ethtool) from
    inside the namespace, where the ioctl socket must be opened."""
    netns.pushns(ns)
    try:
        with Ethtool() as et:
            for ifname in ifnames:
                features = et.get_features(ifname)
                for name in OFFLOADS_OFF:
                    feature = features.features.get(name)
                    if feature is not None:
                        feature.enable = False
                et.set_features(ifname, features)
    finally:
        netns.popns()


def teardown(namespaces: Iterable[str]) -> list[str]:
    """Remove the namespaces (their veths go with them); the ones already gone are skipped.
    Returns those removed."""
    removed = []
    existing = set(netns.listnetns())
    for ns in namespaces:
        if ns not in existing:
            continue
        try:
            netns.remove(ns)
        except FileNotFoundError:
            continue
        removed.append(ns)
    return removed


def offloads(ns: str, ifname: str) -> dict[str, bool]:
    """The features of OFFLOADS_OFF that an interface has, and whether each is on."""
    netns.pushns(ns)
    try:
        with Ethtool() as et:
            features = et.get_features(ifname).features
            return {n: bool(features[n].enable) for n in OFFLOADS_OFF if n in features}
    finally:
        netns.popns()


__all__ = ["MachinePlan", "Plan", "build", "first_host", "offloads", "offloads_off", "plan",
           "teardown"]
