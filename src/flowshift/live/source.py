"""Where the VNIC daemon's frames come from and how they leave: AF_PACKET on fs-host's ports.

A packet source yields (arrival port, frame). Today the source is the ports themselves: an
AF_PACKET socket on each sees every frame the machines and the wire send (fs-host routes
nothing, so the kernel drops them after the tap; the daemon sends the forwarded copy). With the
PNIC datapath at tc ingress of the ports, the taps would still see every frame (they run before
tc ingress), so the source becomes the punt device, which only carries the frames the datapath
hands to software; the ports then only transmit (`receive=False`).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Protocol

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20: no copies of the frames we send ourselves
PACKET_OUTGOING = 4  # sll_pkttype of a frame leaving the interface
PACKET_STATISTICS = 6  # (packets, drops) since the last read
SO_RCVBUFFORCE = 33  # root may pass net.core.rmem_max (about 200 KiB by default)
RCVBUF = 8 << 20  # room for bursts (a TCP window or two) while the loop is busy elsewhere
MAX_FRAME = 65536  # larger than any frame: offloads are off, so frames are at most MTU + 14
BURST = 64  # frames taken from one socket before the loop looks at the others


class PacketSource(Protocol):
    """Selectable sockets that deliver frames, each with its arrival port."""

    def sockets(self) -> Sequence[socket.socket]: ...

    def receive(self, index: int) -> Iterator[tuple[int, bytearray]]:
        """Frames ready on socket `index`, at most BURST of them, as (port, frame)."""
        ...

    def close(self) -> None: ...


class AfPacketPorts:
    """One AF_PACKET socket per port: the packet source (with `receive`) and the transmitter.

    Port i is ifnames[i]; the frames of a port's socket arrived on that port."""

    def __init__(self, ifnames: Sequence[str], *, receive: bool = True) -> None:
        self.ifnames = list(ifnames)
        self.tx_errors = [0] * len(ifnames)
        self.rx_drops = [0] * len(ifnames)  # frames the kernel dropped: our buffer was full
        self._socks: list[socket.socket] = []
        proto = ETH_P_ALL if receive else 0  # protocol 0: the socket receives nothing
        try:
            for name in self.ifnames:
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
                self._socks.append(s)
                if receive:
                    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                    try:
                        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                    except PermissionError:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                s.bind((name, proto))
                s.setblocking(False)
        except OSError:
            self.close()
            raise

    def sockets(self) -> Sequence[socket.socket]:
        return self._socks

    def receive(self, index: int) -> Iterator[tuple[int, bytearray]]:
        sock = self._socks[index]
        for _ in range(BURST):
            try:
                data, addr = sock.recvfrom(MAX_FRAME)
            except BlockingIOError:
                return
            if addr[2] != PACKET_OUTGOING:
                yield index, bytearray(data)

    def count_drops(self) -> list[int]:
        """Frames each port's socket lost to a full buffer, so far (the kernel's counters reset
        on every read: they are added up here)."""
        for i, s in enumerate(self._socks):
            _, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            self.rx_drops[i] += drops
        return self.rx_drops

    def send(self, port: int, frame: bytearray) -> bool:
        """Send a frame out of a port; False (and counted) when the kernel refused it."""
        try:
            self._socks[port].send(frame)
            return True
        except OSError as err:
            if err.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ENETDOWN, errno.EMSGSIZE):
                raise
            self.tx_errors[port] += 1
            return False

    def close(self) -> None:
        for s in self._socks:
            s.close()
        self._socks = []
