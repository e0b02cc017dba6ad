#!/usr/bin/env python3
"""Capture Linux's verdicts on the semantics flowshift does not model yet.

usage (root):  .venv/bin/python tests/data/linux/make_cases.py [--out DIR] [CASE ...]
               .venv/bin/python tests/data/linux/make_cases.py --configs

For every case it builds three network namespaces, a client (the inside), a Linux router
running nftables (SNAT + stateful forward filter) and a server (the outside), sets the
case's sysctls on the router, runs the case's traffic (real sockets, or frames crafted with
scapy and written to an AF_PACKET socket where no real stack makes the pattern), captures
both router interfaces and writes into tests/data/linux/<case>/:

  replay_input.pcap   frames that entered the router (src MAC not the router's), by time
  linux_output.pcap   frames the router sent (src MAC the router's), by time
  linux_verdicts.csv  Linux's verdict and rewritten 5-tuple for every input frame
  phases.tsv          the traffic parts and their time windows
  case.json           what the run measured: kernel, sysctls, ruleset, conntrack table

The case's host.toml (the same policy for flowshift) and README.md are hand-written next to
them. Everything it creates is named fs-*-<pid> and deleted on exit, even on failure; it
only sends traffic inside its own namespaces.

How a verdict is found (see `match`): an input frame was forwarded when a frame leaves the
other router interface within 2 s carrying the same invariant bytes: what neither routing
nor NAT changes (IPv4 id, fragment offset and MF flag, IP payload length, TCP sequence,
acknowledgement and flags, the L4 payload after the ports and checksum, or the whole
fragment payload of a non-first fragment). Each output frame is matched at most once, the
earliest candidate first. Frames the router sent on the interface they came in on are its
own answers (ICMP time exceeded), noted on the input frame they quote.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from flowshift.config import ConntrackConfig

HERE = Path(__file__).resolve().parent
PID = os.getpid()
NS_C, NS_R, NS_S = f"fs-lc-{PID}", f"fs-lr-{PID}", f"fs-ls-{PID}"

MAC_C = "02:fd:09:00:00:02"
MAC_RI = "02:fd:09:00:00:01"  # router inside
MAC_RO = "02:fd:cb:00:00:01"  # router outside
MAC_S = "02:fd:cb:00:00:02"
C4, C4B, RI4, RO4, S4 = "10.9.0.2", "10.9.0.3", "10.9.0.1", "203.0.113.1", "203.0.113.2"
C6, RI6, RO6, S6 = "fd00:9::2", "fd00:9::1", "2001:db8:9::1", "2001:db8:9::2"
UDP_ECHO = 5000  # the server's UDP echo port (a payload "wait<sec>|" delays the echo)
TCP_PORT = 80  # the server's TCP service: reads a line, answers, closes
TCP_ECHO = 81  # echoes what it reads until EOF; "push<sec>|" makes it send unasked, later

BASE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.conf.all.rp_filter": "0",
}


# ----------------------------------------------------------------------------- topology
def sh(*cmd: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(full)}: rc={res.returncode} {res.stderr.strip()}")
    return res.stdout


def ruleset(udp_ports: str = "", tcp_ports: str = "") -> str:
    """SNAT of the inside to the router's outside address, stateful forward filter."""
    u = f":{udp_ports}" if udp_ports else ""
    t = f":{tcp_ports}" if tcp_ports else ""
    return f"""flush ruleset
table inet fs {{
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname "outside" ip saddr {C4} meta l4proto udp snat ip to {RO4}{u}
		oifname "outside" ip saddr {C4B} meta l4proto tcp snat ip to {RO4}{t}
		oifname "outside" ip saddr 10.9.0.0/24 snat ip to {RO4}
		oifname "outside" ip6 saddr fd00:9::/64 snat ip6 to {RO6}
	}}
	chain forward {{
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		ct state invalid drop
		iifname "inside" oifname "outside" accept
	}}
	chain input {{
		type filter hook input priority filter; policy drop;
		ct state established,related accept
	}}
}}
"""


@dataclass
class Topology:
    sysctls: dict[str, str]
    rules: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def up(self) -> None:
        for ns in (NS_C, NS_R, NS_S):
            sh("ip", "netns", "add", ns)
        for ns in (NS_C, NS_R, NS_S):
            # before the links exist, so that they inherit it: no router solicitations
            # or DAD in the captures (MLD reports remain)
            for k, v in (("net.ipv6.conf.all.router_solicitations", "0"),
                         ("net.ipv6.conf.default.router_solicitations", "0"),
                         ("net.ipv6.conf.all.accept_dad", "0"),
                         ("net.ipv6.conf.default.accept_dad", "0"),
                         ("net.ipv6.conf.all.force_mld_version", "2"),
                         ("net.ipv6.conf.default.addr_gen_mode", "1")):
                sh("sysctl", "-qw", f"{k}={v}", ns=ns)
        sh("ip", "link", "add", "eth0", "netns", NS_C, "address", MAC_C, "type", "veth",
           "peer", "inside", "netns", NS_R, "address", MAC_RI)
        sh("ip", "link", "add", "eth0", "netns", NS_S, "address", MAC_S, "type", "veth",
           "peer", "outside", "netns", NS_R, "address", MAC_RO)
        addrs = {NS_C: [("eth0", f"{C4}/24"), ("eth0", f"{C4B}/24"), ("eth0", f"{C6}/64")],
                 NS_R: [("inside", f"{RI4}/24"), ("inside", f"{RI6}/64"),
                        ("outside", f"{RO4}/24"), ("outside", f"{RO6}/64")],
                 NS_S: [("eth0", f"{S4}/24"), ("eth0", f"{S6}/64")]}
        for ns, items in addrs.items():
            for dev, cidr in items:
                sh("ip", "addr", "add", cidr, "dev", dev, *(("nodad",) if ":" in cidr else ()),
                   ns=ns)
        for ns, devs in ((NS_C, ["eth0"]), (NS_R, ["inside", "outside"]), (NS_S, ["eth0"])):
            for dev in devs:
                # wire-sized frames with real checksums: no segmentation or checksum offload
                sh("ethtool", "-K", dev, "tx", "off", "sg", "off", "tso", "off", "gso", "off",
                   "gro", "off", ns=ns, check=False)
                sh("ip", "link", "set", dev, "up", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        # static neighbours: no ARP or neighbour discovery in the captures
        for ns, dev, peers in ((NS_C, "eth0", [(RI4, MAC_RI), (RI6, MAC_RI)]),
                               (NS_S, "eth0", [(RO4, MAC_RO), (RO6, MAC_RO)]),
                               (NS_R, "inside", [(C4, MAC_C), (C4B, MAC_C), (C6, MAC_C)]),
                               (NS_R, "outside", [(S4, MAC_S), (S6, MAC_S)])):
            for addr, mac in peers:
                sh("ip", "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent",
                   ns=ns)
        sh("ip", "route", "add", "default", "via", RI4, ns=NS_C)
        sh("ip", "-6", "route", "add", "default", "via", RI6, ns=NS_C)
        sh("ip", "route", "add", "default", "via", RO4, ns=NS_S)
        sh("ip", "-6", "route", "add", "default", "via", RO6, ns=NS_S)
        with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
            f.write(self.rules)
        try:
            sh("nft", "-f", f.name, ns=NS_R)
        finally:
            os.unlink(f.name)
        for k, v in {**BASE_SYSCTLS, **self.sysctls}.items():
            sh("sysctl", "-qw", f"{k}={v}", ns=NS_R)

    def spawn(self, ns: str, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
        for ns in (NS_C, NS_R, NS_S):
            # processes left in our namespaces (ours only), then the namespace
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)


def role(ns: str, *args: str, timeout: float = 60) -> str:
    """Run a role of this script inside a namespace and wait for it (bounded)."""
    return sh(sys.executable, __file__, *args, ns=ns, timeout=timeout)


def wait_ready(p: subprocess.Popen[bytes], what: str) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()  # the role prints "ready" once listening; bounded by its alarm
    if b"ready" not in line:
        raise RuntimeError(f"{what} did not start: {line!r}")


# ----------------------------------------------------------------------------- roles
def role_servers() -> None:
    """UDP echo (both families) on UDP_ECHO and a one-line TCP service on TCP_PORT."""
    import selectors
    import threading

    signal.alarm(600)
    sel = selectors.DefaultSelector()
    for fam, addr in ((socket.AF_INET, S4), (socket.AF_INET6, S6)):
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.bind((addr, UDP_ECHO))
        if fam == socket.AF_INET:
            u.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = DONT: fragment locally
        sel.register(u, selectors.EVENT_READ, "udp")
        t = socket.socket(fam, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((addr, TCP_PORT))
        t.listen(64)
        sel.register(t, selectors.EVENT_READ, "tcp")
        e = socket.socket(fam, socket.SOCK_STREAM)
        e.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        e.bind((addr, TCP_ECHO))
        e.listen(64)
        sel.register(e, selectors.EVENT_READ, "echo")

    def echo_later(sock: socket.socket, data: bytes, peer: tuple[str, int], delay: float) -> None:
        time.sleep(delay)
        sock.sendto(data, peer)

    def serve(conn: socket.socket) -> None:
        conn.settimeout(10)
        with contextlib.suppress(OSError), conn:
            conn.recv(4096)
            conn.sendall(b"ok\n")

    def echo(conn: socket.socket) -> None:
        conn.settimeout(20)
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(4096):
                if data.startswith(b"push"):
                    time.sleep(float(data[4:data.index(b"|")]))
                    data = b"pushed\n"
                conn.sendall(data)

    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "udp":
                data, peer = sock.recvfrom(65535)
                delay = 0.0
                if data.startswith(b"wait"):
                    delay = float(data[4:data.index(b"|")])
                threading.Thread(target=echo_later, args=(sock, data, peer, delay),
                                 daemon=True).start()
            else:
                conn, _ = sock.accept()
                threading.Thread(target=serve if key.data == "tcp" else echo, args=(conn,),
                                 daemon=True).start()


def udp_exchange(src: str, sport: int, dst: str, payload: bytes, timeout: float = 1.0,
                 ttl: int | None = None) -> bool:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((src, sport))
        if fam == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = DONT: fragment locally
            if ttl is not None:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        elif ttl is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
        s.settimeout(timeout)
        s.sendto(payload, (dst, UDP_ECHO))
        try:
            return s.recv(65535) == payload
        except TimeoutError:
            return False


def tag(name: str, size: int) -> bytes:
    """A payload unique to `name`, so that every datagram is told apart by its bytes."""
    seed = hashlib.sha256(name.encode()).digest()
    out = bytearray(name.encode() + b"|")
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:size])


class Injector:
    """Writes crafted frames to the client's eth0, towards the router's inside MAC."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.sock.bind(("eth0", 0))

    def send(self, ip_packet: bytes) -> None:
        eth = bytes.fromhex(MAC_RI.replace(":", "")) + bytes.fromhex(MAC_C.replace(":", ""))
        ethertype = b"\x86\xdd" if ip_packet[0] >> 4 == 6 else b"\x08\x00"
        self.sock.send(eth + ethertype + ip_packet)


def udp_datagram(src: str, dst: str, sport: int, payload: bytes) -> bytes:
    """The IP payload (UDP header + data) of a datagram, checksum over the whole of it."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6

    ip = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
    raw = bytes(ip / UDP(sport=sport, dport=UDP_ECHO) / payload)
    return raw[40:] if ":" in dst else raw[20:]


def fragment_packets(src: str, dst: str, ident: int, body: bytes,
                     pieces: list[tuple[int, int]]) -> list[bytes]:
    """IP fragments of `body` (an L4 datagram): pieces are (offset, length) in bytes."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment

    out = []
    for off, length in pieces:
        last = off + length >= len(body)
        chunk = body[off:off + length]
        if ":" in dst:
            out.append(bytes(IPv6(src=src, dst=dst, hlim=64)
                             / IPv6ExtHdrFragment(nh=17, offset=off // 8, m=0 if last else 1,
                                                  id=ident)
                             / chunk))
        else:
            out.append(bytes(IP(src=src, dst=dst, id=ident, proto=17, ttl=64,
                                flags=0 if last else 1, frag=off // 8) / chunk))
    return out


def _with_header(pkt: bytes, ttl: int, dscp: int) -> bytes:
    """The packet with another TTL / hop limit and DSCP (IPv4 checksum fixed)."""
    b = bytearray(pkt)
    if b[0] >> 4 == 4:
        b[8], b[1] = ttl, dscp << 2
        b[10:12] = b"\0\0"
        b[10:12] = struct.pack("!H", _ip_checksum(bytes(b[:(b[0] & 15) * 4])))
    else:
        b[7] = ttl
        b[0], b[1] = 0x60 | dscp >> 2, (b[1] & 0x0F) | (dscp & 3) << 6
    return bytes(b)


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def even_pieces(total: int, size: int) -> list[tuple[int, int]]:
    return [(off, min(size, total - off)) for off in range(0, total, size)]


def crafted_udp(inj: Injector, src: str, dst: str, sport: int, ident: int, name: str,
                size: int, order: Callable[[list[tuple[int, int]]], list[tuple[int, int]]],
                gap: float = 0.0, frag: int = 1232) -> None:
    body = udp_datagram(src, dst, sport, tag(name, size))
    for i, pkt in enumerate(fragment_packets(src, dst, ident, body, order(even_pieces(
            len(body), frag)))):
        if i and gap:
            time.sleep(gap)
        inj.send(pkt)


def role_client(case: str) -> None:
    """The case's traffic from the client side, part by part, timed in phases.tsv lines."""
    signal.alarm(120)
    inj = Injector()

    @contextlib.contextmanager
    def part(name: str) -> Iterator[None]:
        t0 = time.time()
        yield
        time.sleep(0.3)  # let the answers of this part pass before the next one
        print(f"{name}\t{t0:.6f}\t{time.time():.6f}", flush=True)

    @contextlib.contextmanager
    def listening(src: str, ports: list[int]) -> Iterator[list[socket.socket]]:
        """Sockets that take the echoes of crafted datagrams (no port unreachable back)."""
        socks = []
        for p in ports:
            s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET,
                              socket.SOCK_DGRAM)
            s.bind((src, p))
            socks.append(s)
        try:
            yield socks
        finally:
            for s in socks:
                s.close()

    def rev(p: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return p[::-1]

    if case == "frag-order":
        with part("v4-udp"):
            udp_exchange(C4, 42001, S4, tag("v4-udp", 3000))
        with part("v6-udp"):
            udp_exchange(C6, 42002, S6, tag("v6-udp", 3000))
        with part("v4-ping"):
            sh("ping", "-n", "-c", "1", "-W", "1", "-s", "3000", "-M", "dont", "-p", "a4", S4,
               check=False)
        with part("v6-ping"):
            sh("ping", "-6", "-n", "-c", "1", "-W", "1", "-s", "3000", "-p", "a6", S6,
               check=False)
    elif case == "frag-reversed":
        with listening(C4, [42101]), part("v4-udp-reversed"):
            crafted_udp(inj, C4, S4, 42101, 0x4101, "v4-udp-reversed", 3000, rev)
        with listening(C6, [42102]), part("v6-udp-reversed"):
            crafted_udp(inj, C6, S6, 42102, 0x64102, "v6-udp-reversed", 3000, rev)
        with listening(C4, [42103]), part("v4-udp-shuffled"):
            crafted_udp(inj, C4, S4, 42103, 0x4103, "v4-udp-shuffled", 4000,
                        lambda p: [p[1], p[3], p[0], p[2]])
    elif case == "frag-overlap":
        # a duplicate of a fragment (same bytes again) is tolerated; a partial overlap kills
        # the whole datagram (Linux since 4.19 for IPv4, RFC 5722 for IPv6)
        for fam, src, dst in (("v4", C4, S4), ("v6", C6, S6)):
            sport = 42201 if fam == "v4" else 42211
            with listening(src, [sport, sport + 1, sport + 2]):
                with part(f"{fam}-duplicate"):
                    crafted_udp(inj, src, dst, sport, 0x4201 + (fam == "v6") * 0x10000,
                                f"{fam}-duplicate", 3000, lambda p: [p[0], p[1], p[1], p[2]])
                with part(f"{fam}-overlap"):
                    name = f"{fam}-overlap"
                    body = udp_datagram(src, dst, sport + 1, tag(name, 3000))
                    # 0..1232, then 1224..2456 (8 bytes over the first), then the rest
                    pieces = [(0, 1232), (1224, 1232), (2456, len(body) - 2456)]
                    for pkt in fragment_packets(src, dst, 0x4202 + (fam == "v6") * 0x10000,
                                                body, pieces):
                        inj.send(pkt)
                with part(f"{fam}-overlap-resent"):
                    # the same datagram again, well formed, after the overlap killed it
                    crafted_udp(inj, src, dst, sport + 1, 0x4202 + (fam == "v6") * 0x10000,
                                f"{fam}-overlap", 3000, lambda p: p)
    elif case == "frag-geometry":
        # a second "last" fragment that ends early: IPv4 drops the queue, IPv6 the fragment
        for fam, src, dst in (("v4", C4, S4), ("v6", C6, S6)):
            sport = 42401 if fam == "v4" else 42411
            ident = 0x4401 + (fam == "v6") * 0x10000
            with listening(src, [sport, sport + 1, sport + 2]):
                with part(f"{fam}-early-end"):
                    body = udp_datagram(src, dst, sport, tag(f"{fam}-early-end", 3000))
                    a, b, c = fragment_packets(src, dst, ident, body, even_pieces(len(body), 1232))
                    early = fragment_packets(src, dst, ident, body[:1232 + 104], [(1232, 104)])[0]
                    for pkt in (a, c, early, b):
                        inj.send(pkt)
                with part(f"{fam}-mixed-headers"):
                    # fragments whose headers differ (TTL / hop limit, DSCP): Linux sends
                    # every fragment with the first fragment's header
                    body = udp_datagram(src, dst, sport + 2, tag(f"{fam}-mixed", 3000))
                    frags = fragment_packets(src, dst, ident + 2, body,
                                             even_pieces(len(body), 1232))
                    for k, pkt in enumerate(frags):
                        inj.send(_with_header(pkt, ttl=64 - 10 * k, dscp=8 * k))
                if fam == "v6":
                    with part("v6-misaligned"):
                        # a non-last fragment whose length is no multiple of 8 (RFC 8200)
                        body = udp_datagram(src, dst, sport + 1, tag("v6-misaligned", 3000))
                        a, b, c = fragment_packets(src, dst, ident + 1, body,
                                                   even_pieces(len(body), 1232))
                        odd = fragment_packets(src, dst, ident + 1, body[:1232 + 1228],
                                               [(1232, 1228)])[0]
                        odd = odd[:43] + bytes([odd[43] | 1]) + odd[44:]  # More Fragments
                        for pkt in (a, odd, b, c):
                            inj.send(pkt)
    elif case == "frag-memory":
        # the router's fragment memory bound is 8 KiB and its reassembly timeout 2 s
        for fam, src, dst in (("v4", C4, S4), ("v6", C6, S6)):
            sport = 42501 if fam == "v4" else 42511
            base = 0x4500 + (fam == "v6") * 0x10000
            with listening(src, [sport, sport + 1]):
                with part(f"{fam}-fill"):
                    # first fragments of six datagrams that never complete
                    for k in range(6):
                        body = udp_datagram(src, dst, sport, tag(f"{fam}-fill-{k}", 3000))
                        inj.send(fragment_packets(src, dst, base + 10 + k, body,
                                                  [(0, 1232)])[0])
                with part(f"{fam}-over-bound"):
                    crafted_udp(inj, src, dst, sport, base + 1, f"{fam}-over-bound", 3000,
                                lambda p: p)
                time.sleep(2.5)  # the filling queues expire; their memory comes back
                with part(f"{fam}-after-expiry"):
                    crafted_udp(inj, src, dst, sport + 1, base + 2, f"{fam}-after-expiry",
                                3000, lambda p: p)
    elif case == "frag-expire":
        # the router's ipfrag_time / nf_conntrack_frag6_timeout is 2 s in this case
        for fam, src, dst in (("v4", C4, S4), ("v6", C6, S6)):
            sport = 42301 if fam == "v4" else 42311
            with listening(src, [sport, sport + 1]):
                with part(f"{fam}-within"):
                    crafted_udp(inj, src, dst, sport, 0x4301 + (fam == "v6") * 0x10000,
                                f"{fam}-within", 3000, lambda p: p, gap=0.5)
                with part(f"{fam}-expired"):
                    crafted_udp(inj, src, dst, sport + 1, 0x4302 + (fam == "v6") * 0x10000,
                                f"{fam}-expired", 3000, lambda p: p, gap=1.6)
    elif case == "ct-timeout":
        # the router's nf_conntrack_udp_timeout is 2 s in this case
        for fam, src, dst in (("v4", C4, S4), ("v6", C6, S6)):
            sport = 43001 if fam == "v4" else 43011
            with part(f"{fam}-reply-in-time"):
                udp_exchange(src, sport, dst, b"wait1.0|" + tag(f"{fam}-in-time", 40), 2.0)
            with part(f"{fam}-reply-late"):
                udp_exchange(src, sport + 1, dst, b"wait3.0|" + tag(f"{fam}-late", 40), 3.5)
    elif case in ("ct-tcp", "ct-tcp-strict"):
        # the router's nf_conntrack_tcp_timeout_established is 2 s (ct-tcp-strict: and
        # nf_conntrack_tcp_loose = 0): a connection idle for 3 s has lost its entry
        with part("idle-client-first"):
            tcp_idle(C4, 45001, S4, b"push0|")
        with part("idle-server-first"):
            tcp_idle(C4, 45002, S4, b"push3|")
    elif case == "nat-ports":
        # UDP from 10.9.0.2 is SNATed to 203.0.113.1:40000-40003; TCP from 10.9.0.3 to :40010
        with part("udp-range"):
            for sport in range(40000, 40006):
                udp_exchange(C4, sport, S4, tag(f"udp-range-{sport}", 40), 0.3)
        with part("tcp-first"):
            isn = tcp_exchange(C4B, 40010, S4)
        # the first connection is now TIME_WAIT on the router and holds 203.0.113.1:40010
        with part("tcp-syn-behind"):
            crafted_syn(inj, 40011, (isn - 0x40000000) & 0xFFFFFFFF)
        with part("tcp-syn-ahead"):
            crafted_syn(inj, 40012, (isn + 0x40000000) & 0xFFFFFFFF)
    elif case == "ttl":
        for fam, src, dst in (("v4", C4, S4), ("v6", C6, S6)):
            for ttl in (1, 2):
                with part(f"{fam}-udp-ttl{ttl}"):
                    udp_exchange(src, 44000 + ttl + (fam == "v6") * 10, dst,
                                 tag(f"{fam}-ttl{ttl}", 40), 0.5, ttl=ttl)
            with part(f"{fam}-ping-ttl1"):
                sh("ping", "-n", f"-{fam[1]}", "-c", "1", "-W", "1", "-t", "1", dst, check=False)
    else:
        raise SystemExit(f"unknown case {case}")


def tcp_idle(src: str, sport: int, dst: str, second: bytes) -> None:
    """A connection that talks, idles 3 s, and talks again (`second` first), then resets."""
    c = socket.create_connection((dst, TCP_ECHO), timeout=3, source_address=(src, sport))
    try:
        c.sendall(b"one\n")
        c.recv(100)
        time.sleep(3)
        c.settimeout(4.5)
        c.sendall(second)
        with contextlib.suppress(OSError):
            c.recv(100)
    finally:
        # RST, not FIN: no retransmissions outlive the part
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()


def tcp_exchange(src: str, sport: int, dst: str) -> int:
    """A whole TCP connection (server answers and closes first); returns the client's ISN."""
    # ETH_P_ALL: packet sockets of one protocol do not see outgoing frames
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    sniff.bind(("eth0", 0))
    sniff.settimeout(2)
    with socket.create_connection((dst, TCP_PORT), timeout=3, source_address=(src, sport)) as c:
        c.sendall(b"hello\n")
        c.recv(100)
        with contextlib.suppress(OSError):
            c.recv(100)
    deadline = time.time() + 2
    while time.time() < deadline:
        frame = sniff.recv(2048)
        ip = frame[14:]
        if frame[12:14] == b"\x08\x00" and ip[9] == 6 and ip[12:16] == socket.inet_aton(src):
            tcp = ip[(ip[0] & 15) * 4:]
            sp, seq, flags = struct.unpack("!H2xI5xB", tcp[:14])
            if sp == sport and flags & 0x02:
                return int(seq)
    raise RuntimeError("did not see our own SYN")


def crafted_syn(inj: Injector, sport: int, seq: int) -> None:
    from scapy.layers.inet import IP, TCP

    inj.send(bytes(IP(src=C4B, dst=S4, ttl=64) / TCP(sport=sport, dport=TCP_PORT, flags="S",
                                                     seq=seq, window=64240)))


# ----------------------------------------------------------------------------- matching
@dataclass
class Frame:
    index: int
    ts_ns: int
    data: bytes
    wire_len: int
    side: str  # router interface: inside / outside


def ip_fields(data: bytes) -> dict[str, object] | None:
    """What matching needs from a frame: addresses, protocol, fragment info, invariant bytes."""
    et = struct.unpack_from("!H", data, 12)[0]
    ip = data[14:]
    f: dict[str, object] = {}
    if et == 0x0800:
        ihl = (ip[0] & 15) * 4
        total, ident, fo = struct.unpack_from("!HHH", ip, 2)
        f.update(family=4, src=str(ipaddress.ip_address(ip[12:16])),
                 dst=str(ipaddress.ip_address(ip[16:20])), proto=ip[9], id=ident,
                 offset=(fo & 0x1FFF) * 8, mf=bool(fo & 0x2000), length=total - ihl,
                 ttl=ip[8])
        body = ip[ihl:]
    elif et == 0x86DD:
        plen, nh, hlim = struct.unpack_from("!HBB", ip, 4)
        f.update(family=6, src=str(ipaddress.ip_address(ip[8:24])),
                 dst=str(ipaddress.ip_address(ip[24:40])), id=None, offset=0, mf=False,
                 ttl=hlim)
        body, length = ip[40:], plen
        if nh == 44:
            nh2, fo, ident = struct.unpack_from("!BxHI", body)
            f.update(id=ident, offset=fo & 0xFFF8, mf=bool(fo & 1))
            nh, body, length = nh2, body[8:], length - 8
        f.update(proto=nh, length=length)
    else:
        return None
    proto = f["proto"]
    f.update(sport=None, dport=None, flags="")
    if f["offset"]:
        f["invariant"] = (f["offset"], f["mf"], f["length"], body)
        return f
    head: tuple[object, ...] = (0, f["mf"], f["length"])
    if proto == 6 and len(body) >= 20:
        sp, dp, seq, ack, off, fl = struct.unpack_from("!HHIIBB", body)
        f.update(sport=sp, dport=dp, flags="".join(c for b, c in zip(
            (1, 2, 4, 8, 16, 32), "FSRPAU", strict=True) if fl & b))
        f["invariant"] = (*head, seq, ack, fl, body[(off >> 4) * 4:])
    elif proto == 17 and len(body) >= 8:
        sp, dp = struct.unpack_from("!HH", body)
        f.update(sport=sp, dport=dp)
        f["invariant"] = (*head, body[8:])
    elif proto in (1, 58) and len(body) >= 8:
        typ, code, ident, seq = struct.unpack_from("!BBxxHH", body)
        f.update(icmp_type=typ, icmp_code=code)
        echo = (typ in (0, 8)) if proto == 1 else (typ in (128, 129))
        error = typ in (3, 4, 5, 11, 12) if proto == 1 else typ < 128
        if echo:
            f.update(sport=ident, dport=ident)
        # an ICMP error quotes a datagram NAT rewrites: only its kind is invariant
        f["invariant"] = ((*head, typ, code) if error else (*head, typ, code, seq, body[8:])
                          if echo else (*head, typ, code, body[4:]))
    else:
        f["invariant"] = (*head, body)
    return f


def read(path: Path, side: str) -> list[Frame]:
    from flowshift.packet.pcap import open_trace

    with open_trace(path) as frames:
        return [Frame(i, fr.ts_ns, fr.data, fr.wire_len, side) for i, fr in enumerate(frames)]


def split(inside: list[Frame], outside: list[Frame]) -> tuple[list[Frame], list[Frame]]:
    mine = {"inside": bytes.fromhex(MAC_RI.replace(":", "")),
            "outside": bytes.fromhex(MAC_RO.replace(":", ""))}
    entered: list[Frame] = []
    left: list[Frame] = []
    for fr in sorted(inside + outside, key=lambda f: (f.ts_ns, f.side, f.index)):
        (left if fr.data[6:12] == mine[fr.side] else entered).append(fr)
    return entered, left


def match(entered: list[Frame], left: list[Frame], phases: list[tuple[str, float, float]],
          ) -> list[dict[str, object]]:
    outs = [(fr, ip_fields(fr.data)) for fr in left]
    used: set[int] = set()

    def part_of(ts_ns: int, f: dict[str, object] | None) -> str:
        if f is None or str(f["dst"]).startswith("ff02:"):
            return "link-local"  # MLD reports and the like: never forwarded
        for name, t0, t1 in phases:
            if t0 <= ts_ns / 1e9 <= t1:
                return name
        return "between"

    def first_fragment_tuple(j: int) -> tuple[object, ...] | None:
        """The translated ports of a forwarded fragment's datagram (its first fragment)."""
        fr, f = outs[j]
        assert f is not None
        for fr2, f2 in outs:
            if (f2 is not None and f2["offset"] == 0 and f2["id"] == f["id"]
                    and f2["proto"] == f["proto"] and fr2.side == fr.side
                    and abs(fr2.ts_ns - fr.ts_ns) < 2e9):
                return f2["src"], f2["sport"], f2["dst"], f2["dport"], f2["proto"]
        return None

    rows: list[dict[str, object]] = []
    for i, fr in enumerate(entered):
        f = ip_fields(fr.data)
        row: dict[str, object] = {"input_index": i, "verdict": "drop", "output_index": "",
                                  "out_src": "", "out_sport": "", "out_dst": "",
                                  "out_dport": "", "out_proto": "", "part": part_of(fr.ts_ns, f),
                                  "ingress": fr.side, "egress": "", "ts_in":
                                  f"{fr.ts_ns / 1e9:.9f}", "delay_us": "", "note": ""}
        if f is None:
            row.update(in_src="", in_sport="", in_dst="", in_dport="", in_proto="",
                       tcp_flags="", note="not IP")
            rows.append(row)
            continue
        row.update(in_src=f["src"], in_sport=f["sport"] if f["sport"] is not None else "",
                   in_dst=f["dst"], in_dport=f["dport"] if f["dport"] is not None else "",
                   in_proto=f["proto"], tcp_flags=f["flags"], ip_id=f["id"] if f["id"]
                   is not None else "", frag_offset=f["offset"], frag_mf=int(bool(f["mf"])),
                   ttl_in=f["ttl"])
        link_scope = str(f["dst"]).startswith("ff02:") or str(f["src"]).startswith(("fe80:", "::"))
        for j, (out, g) in enumerate(outs):
            if (link_scope or j in used or g is None or out.side == fr.side or out.ts_ns < fr.ts_ns
                    or out.ts_ns - fr.ts_ns > 2_000_000_000 or g["family"] != f["family"]
                    or g["proto"] != f["proto"] or g["invariant"] != f["invariant"]
                    or (f["family"] == 4 and g["id"] != f["id"])):
                continue
            used.add(j)
            tup = ((g["src"], g["sport"], g["dst"], g["dport"], g["proto"]) if not g["offset"]
                   else first_fragment_tuple(j))
            row.update(verdict="forward", output_index=j, egress=out.side,
                       delay_us=(out.ts_ns - fr.ts_ns) // 1000, ttl_out=g["ttl"],
                       out_ip_id=g["id"] if g["id"] is not None else "")
            if tup is not None:
                row.update(out_src=tup[0], out_sport="" if tup[1] is None else tup[1],
                           out_dst=tup[2], out_dport="" if tup[3] is None else tup[3],
                           out_proto=tup[4])
            row["note"] = "forwarded" + (f", fragment at {f['offset']}" if f["offset"] else "")
            break
        else:
            # the router's own answer (same interface back) quoting this frame
            for j, (out, g) in enumerate(outs):
                if (j not in used and g is not None and out.side == fr.side
                        and 0 <= out.ts_ns - fr.ts_ns < 1_000_000_000
                        and g.get("icmp_type") in (3, 11, 1, 2, 4)
                        and quotes(out.data, g, f)):
                    used.add(j)
                    icmp = "ICMP" if g["family"] == 4 else "ICMPv6"
                    row["note"] = (f"dropped; router answered {icmp} type {g['icmp_type']} "
                                   f"code {g['icmp_code']} (output {j})")
                    row["answer_index"] = j
                    break
            else:
                row["note"] = "dropped"
        rows.append(row)
    return rows


def quotes(data: bytes, g: dict[str, object], f: dict[str, object]) -> bool:
    """Does ICMP error `data` (fields g) quote the datagram of input fields f?"""
    off = 14 + (20 if g["family"] == 4 else 40) + 8
    inner = ip_fields(data[:14] + data[off:])
    return (inner is not None and inner["proto"] == f["proto"] and inner["src"] == f["src"]
            and inner["dst"] == f["dst"] and inner["sport"] == f["sport"])


COLUMNS = ["input_index", "verdict", "output_index", "out_src", "out_sport", "out_dst",
           "out_dport", "out_proto", "part", "ingress", "egress", "in_src", "in_sport",
           "in_dst", "in_dport", "in_proto", "tcp_flags", "ts_in", "delay_us", "note",
           "ip_id", "frag_offset", "frag_mf", "ttl_in", "ttl_out", "out_ip_id", "answer_index"]


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str
    sysctls: dict[str, str] = field(default_factory=dict)
    udp_ports: str = ""
    tcp_ports: str = ""
    snaplen: int = 160


CASES = {c.name: c for c in (
    Case("frag-order", snaplen=2000),
    Case("frag-reversed", snaplen=2000),
    Case("frag-overlap", snaplen=2000),
    Case("frag-geometry", snaplen=2000),
    Case("frag-memory", {"net.ipv4.ipfrag_time": "2",
                         "net.netfilter.nf_conntrack_frag6_timeout": "2",
                         "net.ipv4.ipfrag_low_thresh": "1024",
                         "net.ipv4.ipfrag_high_thresh": "8192",
                         "net.netfilter.nf_conntrack_frag6_low_thresh": "1024",
                         "net.netfilter.nf_conntrack_frag6_high_thresh": "8192"}, snaplen=2000),
    Case("frag-expire", {"net.ipv4.ipfrag_time": "2",
                         "net.netfilter.nf_conntrack_frag6_timeout": "2"}, snaplen=2000),
    Case("ct-timeout", {"net.netfilter.nf_conntrack_udp_timeout": "2"}),
    Case("ct-tcp", {"net.netfilter.nf_conntrack_tcp_timeout_established": "2"}),
    Case("ct-tcp-strict", {"net.netfilter.nf_conntrack_tcp_timeout_established": "2",
                           "net.netfilter.nf_conntrack_tcp_loose": "0"}),
    Case("nat-ports", udp_ports="40000-40003", tcp_ports="40010"),
    Case("ttl"),
)}


CT_SYSCTL = "net.netfilter.nf_conntrack_"
CT_KEYS = {f.name for f in fields(ConntrackConfig)}  # the [conntrack] keys: sysctl names


def _ct_key(sysctl: str) -> str:
    """The [conntrack] key of a sysctl (ipfrag_* are net.ipv4's)."""
    return sysctl.removeprefix(CT_SYSCTL).removeprefix("net.ipv4.")


def host_toml(case: Case) -> str:
    """The router's policy as a flowshift host config: the inside is the machine."""
    snat = []
    if case.udp_ports:
        snat.append((f"{C4}/32", RO4, case.udp_ports, "UDP of 10.9.0.2 (Linux: udp only)"))
    if case.tcp_ports:
        snat.append((f"{C4B}/32", RO4, case.tcp_ports, "TCP of 10.9.0.3 (Linux: tcp only)"))
    snat += [("10.9.0.0/24", RO4, "", "the inside, IPv4"), ("fd00:9::/64", RO6, "", "IPv6")]
    lines = [
        f"# flowshift host config for the Linux case {case.name!r} (written by make_cases.py).",
        "# The same policy as the router's nftables ruleset (case.json): the inside may open",
        "# anything, replies pass, everything else is dropped; SNAT to the outside address.",
    ]
    keyed = {_ct_key(k): v for k, v in case.sysctls.items() if _ct_key(k) in CT_KEYS}
    others = {k: v for k, v in case.sysctls.items() if _ct_key(k) not in keyed}
    if others:
        lines.append("# Router sysctls flowshift has no key for yet: " + ", ".join(
            f"{k}={v}" for k, v in others.items()))
    lines += ["", "[pnic]", "capacity = 64", "", "[offload]", 'policy = "never"', ""]
    if keyed:  # the router's conntrack sysctls, as the [conntrack] table names them
        lines += ["[conntrack]", *(f"{k} = {v}" for k, v in keyed.items()), ""]
    lines += [
              "[[machine]]", 'name = "gw"', 'addresses = ["10.9.0.0/24", "fd00:9::/64"]',
              f'public = ["{RO4}", "{RO6}"]', 'services = ["firewall", "nat", "count"]',
              'start = "vnic"', 'forwarding = "router"', "", "[machine.firewall]",
              'default = "drop"', "",
              "[[machine.firewall.rule]]", 'action = "allow"', 'direction = "egress"',
              'proto = "any"']
    for source, to, ports, why in snat:
        lines += ["", f"# {why}", "[[machine.nat.snat]]", f'source = "{source}"', f'to = "{to}"']
        if ports:
            lines.append(f'ports = "{ports}"')
    return "\n".join(lines) + "\n"


def run_case(case: Case, into: Path = HERE) -> None:
    out = into / case.name
    out.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"fs-linux-{case.name}-"))
    topo = Topology(case.sysctls, ruleset(case.udp_ports, case.tcp_ports))
    try:
        topo.up()
        # conntrack must exist before the captures start, so that the first packet is tracked
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", ns=NS_R)
        servers = topo.spawn(NS_S, "role-servers")
        wait_ready(servers, "servers")
        dumps = []
        for side in ("inside", "outside"):
            # immediate mode: without it the last packets can wait in a capture block that
            # the SIGINT below leaves unread (a part missing from the capture now and then)
            p = subprocess.Popen(["ip", "netns", "exec", NS_R, "tcpdump", "-i", side, "-p",
                                  "--immediate-mode", "-U", "-s", str(case.snaplen), "-B",
                                  "8192", "-w", str(work / f"{side}.pcap")],
                                 stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
            topo.procs.append(p)
            dumps.append(p)
            assert p.stderr is not None
            line = p.stderr.readline()  # "listening on ..." once the socket is open
            if b"listening" not in line:
                raise RuntimeError(f"tcpdump {side}: {line!r}")
        phases_text = role(NS_C, "role-client", case.name, timeout=120)
        time.sleep(0.5)
        table = sh("conntrack", "-L", "-o", "extended", ns=NS_R, check=False)
        stats = sh("conntrack", "-S", ns=NS_R, check=False)
        sysctl = sh("sysctl", "-a", ns=NS_R, check=False)
        snmp = sh("cat", "/proc/net/snmp", ns=NS_R) + sh("cat", "/proc/net/snmp6", ns=NS_R)
        for p in dumps:
            p.send_signal(signal.SIGINT)
            p.wait(10)
    finally:
        topo.down()
    phases = []
    for ln in phases_text.splitlines():
        part, t0, t1 = ln.split("\t")
        phases.append((part, float(t0), float(t1)))
    entered, left = split(read(work / "inside.pcap", "inside"),
                          read(work / "outside.pcap", "outside"))
    write_pcap(out / "replay_input.pcap", entered, case.snaplen)
    write_pcap(out / "linux_output.pcap", left, case.snaplen)
    rows = match(entered, left, phases)
    with (out / "linux_verdicts.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="raise", restval="")
        w.writeheader()
        w.writerows(rows)
    (out / "host.toml").write_text(host_toml(case))
    (out / "phases.tsv").write_text("part\tstart_epoch\tend_epoch\n" + phases_text)
    wanted = ("net.ipv4.ipfrag", "net.netfilter.nf_conntrack_", "net.ipv4.ip_forward",
              "net.ipv6.conf.all.forwarding", "net.netfilter.nf_conntrack_frag6")
    meas = {
        "kernel": platform.release(),
        "tools": {t: sh(t, "--version", check=False).splitlines()[0:1]
                  for t in ("nft", "conntrack", "tcpdump")},
        "snaplen": case.snaplen,
        "case_sysctls": case.sysctls,
        "router_sysctls": {k: v for k, v in (ln.split(" = ", 1) for ln in sysctl.splitlines()
                                             if " = " in ln) if k.startswith(wanted)},
        "ruleset": ruleset(case.udp_ports, case.tcp_ports).splitlines(),
        "conntrack_table_at_end": table.splitlines(),
        "conntrack_stats": stats.splitlines(),
        "reassembly_counters": [ln for ln in snmp.splitlines() if "Reasm" in ln or
                                ln.startswith("Ip:")],
        "packets": {"entered": len(entered), "left": len(left),
                    "forwarded": sum(r["verdict"] == "forward" for r in rows)},
    }
    (out / "case.json").write_text(json.dumps(meas, indent=1) + "\n")
    shutil.rmtree(work)
    forwarded = sum(r["verdict"] == "forward" for r in rows)
    print(f"{case.name}: entered {len(entered)}, left {len(left)}, forwarded {forwarded}")


def write_pcap(path: Path, frames: list[Frame], snaplen: int) -> None:
    from flowshift.packet.pcap import PcapWriter

    with PcapWriter(path, snaplen=snaplen) as w:
        for fr in frames:
            w.write(fr.ts_ns, fr.data, fr.wire_len)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "role-servers":
        role_servers()
        return
    if argv and argv[0] == "role-client":
        role_client(argv[1])
        return
    if os.geteuid():
        raise SystemExit("make_cases.py: needs root (namespaces, nft, tcpdump)")
    for tool in ("ip", "nft", "tcpdump", "conntrack", "ethtool", "ping"):
        if not shutil.which(tool):
            raise SystemExit(f"make_cases.py: missing {tool}")
    if argv[:1] == ["--configs"]:  # rewrite host.toml only, no capture
        for case in CASES.values():
            (HERE / case.name / "host.toml").write_text(host_toml(case))
        return
    # a TERM ends the run through its finally blocks: the namespaces are deleted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    into = HERE
    if argv[:1] == ["--out"] and len(argv) > 1:
        into, argv = Path(argv[1]), argv[2:]
    for name in argv or list(CASES):
        if name not in CASES:
            raise SystemExit(f"make_cases.py: unknown case {name!r} (cases: {', '.join(CASES)})")
        run_case(CASES[name], into)


if __name__ == "__main__":
    main(sys.argv[1:])
