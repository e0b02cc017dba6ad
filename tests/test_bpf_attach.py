"""The datapath attached at tc ingress of a real port, in throwaway network namespaces.

Topology (every name ours, with the pid): a host namespace with a machine port `hm` (its peer
`mh` in a machine namespace), an uplink `hw` (its peer `wh` in a wire namespace) and a punt
pair `hp0`/`hp1`. Frames sent with AF_PACKET from the machine must come out of the wire end
rewritten (SNAT) with the port table's Ethernet addresses, a miss must come out of the punt
pair tagged with its PuntReason; after close nothing of ours is left: no pins, no filters,
no clsact qdisc.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from flowshift.entry import Status
from flowshift.flow import PROTO_TCP
from flowshift.live.datapath import Clock, Datapath, Port
from flowshift.verdict import PuntReason
from test_bpf_datapath import CLASSIFIER, established, flow, keys, segment

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and tc need root")]

pyroute2 = pytest.importorskip("pyroute2")

S = 1_000_000_000
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10
ETH_P_ALL = 0x0003
WAIT = 5.0  # seconds, for any one frame


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    from pyroute2 import netns

    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


def packet_socket(ns: str, ifname: str) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((ifname, 0))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    s.setblocking(False)
    return s


def receive(s: socket.socket, match: Callable[[bytes], bool]) -> tuple[bytes, int | None]:
    """The first frame that matches (other traffic, IPv6 neighbour discovery, is skipped) and
    its VLAN tag from the packet's auxiliary data; bounded by WAIT."""
    deadline = time.monotonic() + WAIT
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        data, anc, _, _ = s.recvmsg(65535, socket.CMSG_SPACE(20))
        if not match(data):
            continue
        tci = None
        for level, kind, raw in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                status = struct.unpack_from("=I", raw, 0)[0]
                if status & TP_STATUS_VLAN_VALID:
                    tci = struct.unpack_from("=H", raw, 16)[0]
        return data, tci
    raise AssertionError(f"no matching frame within {WAIT} s")


@pytest.fixture
def lab():
    from pyroute2 import NetNS, netns

    tag = f"{os.getpid()}"
    host, machine, wire = f"fs-th-{tag}", f"fs-tm-{tag}", f"fs-tw-{tag}"
    made = []
    try:
        for ns in (host, machine, wire):
            netns.create(ns)
            made.append(ns)
        with NetNS(host) as ipr:
            ipr.link("add", ifname="hm", kind="veth", peer={"ifname": "mh", "net_ns_fd": machine})
            ipr.link("add", ifname="hw", kind="veth", peer={"ifname": "wh", "net_ns_fd": wire})
            ipr.link("add", ifname="hp0", kind="veth", peer={"ifname": "hp1"})
            info = {}
            for name in ("hm", "hw", "hp0", "hp1"):
                index = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=index, state="up")
                mac = ipr.get_links(index)[0].get("address")
                info[name] = (index, bytes.fromhex(mac.replace(":", "")))
        for ns, name in ((machine, "mh"), (wire, "wh")):
            with NetNS(ns) as ipr:
                index = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=index, state="up")
                mac = ipr.get_links(index)[0].get("address")
                info[name] = (index, bytes.fromhex(mac.replace(":", "")))
        yield host, machine, wire, info
    finally:
        for ns in made:
            netns.remove(ns)


def _filters_and_qdiscs(ns: str, ifname: str) -> tuple[list, list]:
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        qdiscs = [q.get("TCA_KIND") for q in ipr.get_qdiscs(index)]
        filters = list(ipr.get_filters(index=index, parent=0xFFFFFFF2))
    return filters, [q for q in qdiscs if q == "clsact"]


def test_frames_are_redirected_rewritten_and_punted_then_nothing_is_left(lab):
    host, machine, wire, info = lab
    uplink = Port(info["hw"][0], src_mac=info["hw"][1], dst_mac=info["wh"][1])
    mport = Port(info["hm"][0], src_mac=info["hm"][1], dst_mac=info["mh"][1])
    key, xlat = keys(4, PROTO_TCP, "snat")
    now = time.monotonic_ns()
    f = flow(key, xlat, established(1000, 2000), Status.SEEN_REPLY | Status.ASSURED,
             expires=now + 600 * S)
    f.created = f.last_seen = now
    name = f"a{os.getpid()}"
    dp = Datapath(name, 4, CLASSIFIER, uplink=uplink, machine_ports=[mport],
                  punt_ifindex=info["hp0"][0], clock=Clock.MONO)
    pins = dp.pin_dir
    try:
        assert dp.insert(f.to_bytes())
        dp.attach("hm", netns=host)
        filters, clsact = _filters_and_qdiscs(host, "hm")
        assert filters and clsact == ["clsact"]
        out = packet_socket(wire, "wh")
        punt = packet_socket(host, "hp1")
        src = packet_socket(machine, "mh")
        try:
            frame = bytearray(segment(f, 0, 1000, 2000, size=100))
            frame[0:6], frame[6:12] = info["hm"][1], info["mh"][1]
            src.send(bytes(frame))
            got, _ = receive(out, lambda d: d[12:14] == b"\x08\x00" and len(d) >= 54
                             and d[34:36] == struct.pack("!H", xlat.sport))
            assert got[0:6] == info["wh"][1] and got[6:12] == info["hw"][1]
            assert got[26:30] == xlat.src  # SNAT'ed source address
            entry = dp.get(key)
            assert entry is not None and int.from_bytes(entry[180:188], "little") == 11

            miss = bytearray(segment(f, 0, 1000, 2000, size=7))
            miss[34:36] = struct.pack("!H", 40999)  # another source port: no entry
            miss[0:6], miss[6:12] = info["hm"][1], info["mh"][1]
            src.send(bytes(miss))
            got, tci = receive(punt, lambda d: d[34:36] == struct.pack("!H", 40999))
            assert got == bytes(miss)  # punted untouched
            assert tci is not None and tci & 0xFFF == PuntReason.MISS
            assert dp.punt_counts()[PuntReason.MISS] >= 1
        finally:
            for s in (out, punt, src):
                s.close()
        dp.detach("hm", netns=host)
        assert _filters_and_qdiscs(host, "hm") == ([], [])
        dp.attach("hm", netns=host)  # attached again: close must take it away too
    finally:
        dp.close()
    assert _filters_and_qdiscs(host, "hm") == ([], [])
    assert not pins.exists()


def _ones(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_a_local_udp_exchange_crosses_the_datapath_both_ways(lab):
    """Real sockets: the machine's stack sends (CHECKSUM_PARTIAL over veth), the datapath
    SNATs it out of the uplink, the wire's stack answers, the datapath de-NATs the answer back
    to the machine. The IPv4 header checksum is checked by both stacks; the UDP field leaves
    the host as the partial (pseudo-header) sum of the translated addresses."""
    from pyroute2 import NetNS

    host, machine, wire, info = lab
    with NetNS(machine) as ipr:
        mh = ipr.link_lookup(ifname="mh")[0]
        ipr.addr("add", index=mh, address="10.0.0.5", prefixlen=24)
        ipr.neigh("add", dst="10.0.0.1", lladdr=info["hm"][1].hex(":"), ifindex=mh, state=0x80)
        ipr.route("add", dst="0.0.0.0/0", gateway="10.0.0.1")
    with NetNS(wire) as ipr:
        wh = ipr.link_lookup(ifname="wh")[0]
        ipr.addr("add", index=wh, address="198.51.100.7", prefixlen=24)
        ipr.route("add", dst="192.0.2.1/32", oif=wh, scope=253)
        ipr.neigh("add", dst="192.0.2.1", lladdr=info["hw"][1].hex(":"), ifindex=wh, state=0x80)
    key, xlat = keys(4, 17, "snat", dport=53)
    now = time.monotonic_ns()
    f = flow(key, xlat, expires=now + 600 * S)
    uplink = Port(info["hw"][0], src_mac=info["hw"][1], dst_mac=info["wh"][1])
    mport = Port(info["hm"][0], src_mac=info["hm"][1], dst_mac=info["mh"][1])
    with Datapath(f"u{os.getpid()}", 4, CLASSIFIER, uplink=uplink, machine_ports=[mport],
                  punt_ifindex=info["hp0"][0], clock=Clock.MONO) as dp:
        assert dp.insert(f.to_bytes())
        dp.attach("hm", netns=host)
        dp.attach("hw", netns=host)
        with in_netns(wire):
            server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            server.bind(("198.51.100.7", 53))
        with in_netns(machine):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind(("10.0.0.5", 40000))
        tap = packet_socket(wire, "wh")
        try:
            for s in (server, client):
                s.settimeout(WAIT)
            client.sendto(b"hello", ("198.51.100.7", 53))
            data, peer = server.recvfrom(100)
            assert (data, peer) == (b"hello", ("192.0.2.1", 50000))
            frame, _ = receive(tap, lambda d: d[12:14] == b"\x08\x00" and d[23] == 17
                               and d[36:38] == b"\x00\x35")
            pseudo = xlat.src + xlat.dst + struct.pack("!BBH", 0, 17, len(frame) - 34)
            csum = struct.unpack_from("!H", frame, 40)[0]
            assert csum == _ones(pseudo), "not the partial sum of the translated addresses"
            server.sendto(b"world", peer)
            assert client.recvfrom(100) == (b"world", ("198.51.100.7", 53))
            entry = dp.get(key)
            assert entry is not None
            assert struct.unpack_from("<2Q", entry, 180) == (11, 10)  # one more each way
        finally:
            for s in (server, client, tap):
                s.close()
