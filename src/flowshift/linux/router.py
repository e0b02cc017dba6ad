"""A real Linux router in network namespaces: inject frames on either side, see what it forwards.

Three namespaces, all named `fs-v-<pid>-<suffix>` and removed on exit whatever happens:

    <tag>-m  m0 ─── inside  <tag>-r  outside ─── w0  <tag>-w
    (machine side)          (router)              (wire side)

The router runs the given nftables ruleset and sysctls; it has no addresses of its own, so
it never answers anything and never sources traffic: it forwards or drops. Routes send the
machine's networks and public addresses to the machine side and everything else to the wire
side, through one next hop per side whose neighbour entry is static (no ARP or ND). The end
namespaces have IPv6 disabled and no addresses: they stay silent, and raw AF_PACKET sockets
on m0 and w0 inject frames towards the router and receive what it forwards.

Order: Linux must see the frames in trace order. The sender is pinned to one CPU, so every
frame goes through the same CPU's backlog, and the router forwards them in sending order;
`exchange` sends a batch and then reads until both sockets stay quiet (bounded).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from pyroute2 import NetNS, netns  # type: ignore[import-untyped]
from pyroute2.ethtool import Ethtool  # type: ignore[import-untyped]

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
RCVBUF = 32 << 20
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
QUIET_S = 0.005  # a side is quiet when it delivers nothing for this long
SETTLE_S = 0.05  # before the first frame and after the last: the router's own noise, stragglers
BATCH_BOUND_S = 2.0  # never wait longer than this for one batch
MAX_FRAME = 65535
MTU = 16000  # of every veth: room for jumbo traces, one frame per packet (no GSO)

MACHINE, WIRE = 0, 1  # sides: where a frame is injected (and where its output is read)
SIDE_LABELS = ("machine", "wire")
ROUTER_PORTS = ("inside", "outside")  # the router's port on each side
END_PORTS = ("m0", "w0")
ROUTER_MACS = ("02:fd:76:00:00:01", "02:fd:76:00:01:01")
END_MACS = ("02:fd:76:00:00:02", "02:fd:76:00:01:02")
NEXT_HOP4 = ("169.254.0.2", "169.254.1.2")  # the router's neighbour on each side (static)
NEXT_HOP6 = "fe80::2"
OFFLOADS = ("tx-checksum-ip-generic", "tx-scatter-gather", "tx-tcp-segmentation",
            "tx-tcp6-segmentation", "tx-generic-segmentation", "rx-gro")


NOT_ROOT = "verify needs root (network namespaces and nftables)"


class RouterError(RuntimeError):
    """The router could not be built (not root, no nft, ruleset refused): one line."""


@dataclass(frozen=True)
class Routes:
    """Destinations the router sends to the machine side; everything else goes to the wire."""

    machine_side: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


@dataclass
class Output:
    side: int  # where the frame left the router
    frame: bytes


@dataclass
class Router:
    ruleset: str
    sysctls: Sequence[str]  # "name = value" lines, applied in the router namespace
    routes: Routes
    tag: str = field(default_factory=lambda: f"fs-v-{os.getpid()}")
    _names: list[str] = field(default_factory=list)
    _socks: list[socket.socket] = field(default_factory=list)

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> Router:
        if os.geteuid() != 0:
            raise RouterError(NOT_ROOT)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for s in self._socks:
            s.close()
        self._socks.clear()
        for name in reversed(self._names):
            with contextlib.suppress(OSError):
                netns.remove(name)  # removes its veths too
        self._names.clear()

    @property
    def namespaces(self) -> list[str]:
        return list(self._names)

    # -- building ---------------------------------------------------------------------------

    def _netns(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        if name in netns.listnetns():
            raise RouterError(f"namespace {name} exists already (a leftover of this process id?)")
        self._names.append(name)  # first: an interrupted create is still removed
        netns.create(name)
        return name

    def _build(self) -> None:
        router = self._netns("r")
        ends = (self._netns("m"), self._netns("w"))
        for ns in ends:  # silent ends: no IPv6 (no ND, MLD, RS), no addresses (no ARP)
            _sysctls(ns, ["net.ipv6.conf.all.disable_ipv6 = 1",
                          "net.ipv6.conf.default.disable_ipv6 = 1"])
        _sysctls(router, ["net.ipv6.conf.default.addr_gen_mode = 1",  # no link-local: silent
                          "net.ipv6.conf.all.accept_ra = 0",
                          "net.ipv6.conf.default.accept_ra = 0",
                          "net.ipv4.conf.all.send_redirects = 0",
                          "net.ipv4.conf.default.send_redirects = 0",
                          "net.ipv4.conf.all.rp_filter = 2",
                          "net.ipv4.conf.default.rp_filter = 2"])
        with NetNS(router, flags=0) as ipr:
            for side in (MACHINE, WIRE):
                ipr.link("add", ifname=ROUTER_PORTS[side], kind="veth",
                         address=ROUTER_MACS[side], mtu=MTU,
                         peer={"ifname": END_PORTS[side], "address": END_MACS[side],
                               "mtu": MTU})
                peer = ipr.link_lookup(ifname=END_PORTS[side])[0]
                ipr.link("set", index=peer, net_ns_fd=ends[side])
        for side in (MACHINE, WIRE):
            _offloads_off(ends[side], [END_PORTS[side]])
            with NetNS(ends[side], flags=0) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=END_PORTS[side])[0], state="up")
        _offloads_off(router, list(ROUTER_PORTS))
        with NetNS(router, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for side in (MACHINE, WIRE):
                ipr.link("set", index=ipr.link_lookup(ifname=ROUTER_PORTS[side])[0], state="up")
            self._route(ipr)
        _load_ruleset(router, self.ruleset)
        _sysctls(router, [*self.sysctls, "net.ipv4.conf.all.forwarding = 1",
                          "net.ipv6.conf.all.forwarding = 1"])
        for side in (MACHINE, WIRE):
            self._socks.append(_packet_socket(ends[side], END_PORTS[side]))

    def _route(self, ipr: NetNS) -> None:
        port = [ipr.link_lookup(ifname=p)[0] for p in ROUTER_PORTS]
        for side in (MACHINE, WIRE):
            ipr.neigh("add", dst=NEXT_HOP4[side], lladdr=END_MACS[side], ifindex=port[side],
                      state=NUD_PERMANENT)
            ipr.neigh("add", dst=NEXT_HOP6, lladdr=END_MACS[side], ifindex=port[side],
                      state=NUD_PERMANENT, family=socket.AF_INET6)
        dests: list[tuple[int, str]] = [(WIRE, "0.0.0.0/0"), (WIRE, "::/0")]
        dests += [(MACHINE, str(net)) for net in self.routes.machine_side]
        for side, dst in dests:
            if ":" in dst:
                ipr.route("add", dst=dst, gateway=NEXT_HOP6, oif=port[side],
                          family=socket.AF_INET6)
            else:
                ipr.route("add", dst=dst, gateway=NEXT_HOP4[side], oif=port[side],
                          flags=RTNH_F_ONLINK)

    # -- traffic ----------------------------------------------------------------------------

    def exchange(self, frames: Sequence[tuple[int, bytes]], quiet_s: float = QUIET_S
                 ) -> list[Output]:
        """Send (side, frame) in order; return what the router forwarded meanwhile, in order.

        Ethernet addresses are set here: from the end's MAC to the router port's. Without
        frames, it only reads until both sides stay quiet for `quiet_s`.
        """
        out: list[Output] = []
        for side, frame in frames:
            data = _mac(ROUTER_MACS[side]) + _mac(END_MACS[side]) + frame[12:]
            self._socks[side].send(data)
        deadline = time.monotonic() + BATCH_BOUND_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select(self._socks, [], [], quiet_s)
            if not ready:
                break
            for s in ready:
                out += self._read(s)
        return out

    def _read(self, sock: socket.socket) -> Iterator[Output]:
        side = self._socks.index(sock)
        while True:
            try:
                data, addr = sock.recvfrom(MAX_FRAME, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if addr[2] != PACKET_OUTGOING and data[6:12] == _mac(ROUTER_MACS[side]):
                yield Output(side, data)


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Run on one CPU meanwhile, so the frames sent share one backlog and keep their order."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# -- namespace helpers ----------------------------------------------------------------------


@contextlib.contextmanager
def _inside(name: str) -> Iterator[None]:
    """This thread in namespace `name` meanwhile (for /proc/sys and ethtool ioctls)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns.setns(name, flags=0)
        try:
            yield
        finally:
            netns.setns(home, flags=0)
    finally:
        os.close(home)


def _sysctls(name: str, lines: Sequence[str]) -> None:
    with _inside(name):
        for line in lines:
            key, _, value = line.partition("=")
            path = "/proc/sys/" + key.strip().replace(".", "/")
            try:
                with open(path, "w") as f:
                    f.write(value.strip())
            except OSError as e:
                raise RouterError(f"sysctl {key.strip()} in {name}: {e.strerror}") from None


def _offloads_off(name: str, ifnames: Sequence[str]) -> None:
    """Checksums computed in software, no segmentation or GRO: what is captured is on the wire."""
    with _inside(name):
        eth = Ethtool()
        try:
            for ifname in ifnames:
                features = eth.get_features(ifname)
                for key in OFFLOADS:
                    if key in features.features:
                        features.features[key].enable = False
                eth.set_features(ifname, features)
        finally:
            eth.close()


def _load_ruleset(name: str, ruleset: str) -> None:
    try:
        done = subprocess.run(
            ["nft", "-f", "-"], input=ruleset, text=True, capture_output=True, timeout=30,
            preexec_fn=lambda: netns.setns(name, flags=0, fork=False))
    except FileNotFoundError:
        raise RouterError("nft not found: install nftables") from None
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
        raise RouterError(f"nft refused the ruleset: {first}")


def _packet_socket(name: str, ifname: str) -> socket.socket:
    sock: socket.socket = netns.create_socket(name, socket.AF_PACKET, socket.SOCK_RAW,
                               socket.htons(ETH_P_ALL), flags=0)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    sock.bind((ifname, 0))
    return sock


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))
