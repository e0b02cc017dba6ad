"""The punt device: where the PNIC datapath hands frames to the VNIC daemon.

With the datapath at tc ingress of fs-host's ports, AF_PACKET taps on the ports would still see
every frame (they run before tc ingress), so software reads a separate veth pair instead:
the datapath redirects what it does not process to `fs-punt`, and the daemon reads its peer,
`fs-vnic`. Each punted frame carries its `PuntReason` as an accelerated VLAN tag, which
AF_PACKET gives in the packet's auxiliary data (PACKET_AUXDATA), not in the frame bytes.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from flowshift.live.source import ETH_P_ALL, MAX_FRAME, RCVBUF, SO_RCVBUFFORCE, SOL_PACKET
from flowshift.live.topology import offloads_off

PUNT_IF = "fs-punt"  # the datapath redirects punts here (in fs-host)
VNIC_IF = "fs-vnic"  # its peer: the daemon's packet source
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6
TP_STATUS_VLAN_VALID = 0x10
_AUX = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata
_ANC = socket.CMSG_SPACE(_AUX.size)
BURST = 64
MARK = -1  # the reason yielded for our own marker frame
MARK_TYPE = 0x88B5  # IEEE local experimental EtherType: never a machine's frame
_MARK_HEAD = b"\xff" * 6 + b"\x02\0\0\0\0\x01" + MARK_TYPE.to_bytes(2, "big") + b"fs-mark"


def make_pair(host_ns: str) -> None:
    """The punt veth pair in fs-host, both ends up, offloads off (whole frames)."""
    with IPRoute(netns=host_ns) as ipr:
        ipr.link("add", ifname=PUNT_IF, kind="veth", peer={"ifname": VNIC_IF})
    offloads_off(host_ns, [PUNT_IF, VNIC_IF])
    with IPRoute(netns=host_ns) as ipr:
        for name in (PUNT_IF, VNIC_IF):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


class PuntSource:
    """An AF_PACKET socket on fs-vnic (opened inside fs-host): yields (PuntReason, frame); 0
    for a frame without the datapath's tag (none should come)."""

    def __init__(self, ifname: str = VNIC_IF) -> None:
        self.rx_drops = 0
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * RCVBUF)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * RCVBUF)
            s.bind((ifname, ETH_P_ALL))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self.sock = s
        # the marker goes in at fs-punt, so it reaches us behind every punt already queued
        self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.tx.bind((PUNT_IF, 0))
        self.marks = 0

    def mark(self) -> int:
        """Send a marker through the punt pair; its number (receive yields it as MARK)."""
        self.marks += 1
        self.tx.send(_MARK_HEAD + self.marks.to_bytes(8, "big") + b"\0" * 31)
        return self.marks

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, limit: int = BURST) -> Iterator[tuple[int, bytearray]]:
        """Frames ready now, at most `limit`, as (punt reason, frame)."""
        recvmsg = self.sock.recvmsg
        for _ in range(limit):
            try:
                data, anc, _, _ = recvmsg(MAX_FRAME, _ANC)
            except BlockingIOError:
                return
            if data.startswith(_MARK_HEAD):
                yield MARK, bytearray(data)
                continue
            reason = 0
            for level, kind, raw in anc:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status, _, _, _, _, tci, _ = _AUX.unpack_from(raw)
                    if status & TP_STATUS_VLAN_VALID:
                        reason = tci & 0x0FFF
            yield reason, bytearray(data)

    def count_drops(self) -> int:
        _, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.rx_drops += drops
        return self.rx_drops

    def close(self) -> None:
        self.sock.close()
        self.tx.close()
