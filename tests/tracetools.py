"""Small traces built to break offload transparency, and a pcapng writer for tests.

A trace is a list of (ts_ns, frame). `write_pcap` uses the project's writer; `write_pcapng`
writes the same frames as pcapng (one Ethernet interface, nanosecond resolution), so every
replay test can run on both formats.
"""

from __future__ import annotations

import struct
from pathlib import Path

from flowshift.packet.build import tcp_frame, udp_frame
from flowshift.packet.pcap import PcapWriter
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN

S = 1_000_000_000
CLIENT = bytes([10, 0, 0, 2])
SERVER = bytes([198, 51, 100, 1])

Trace = list[tuple[int, bytes]]


def write_pcap(path: Path, trace: Trace) -> Path:
    with PcapWriter(path) as w:
        for ts, frame in trace:
            w.write(ts, frame)
    return path


def _block(kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack("<II", kind, n) + body + struct.pack("<I", n)


def pcapng_bytes(frames: list[tuple[int, bytes, int]], linktype: int = 1,
                 linktypes: list[int] | None = None) -> bytes:
    """(ts_ns, data, wire_len) frames as a pcapng file: SHB, IDBs (ns), EPBs. `linktypes`:
    each frame's link type (one interface per link type); default all `linktype`."""
    kinds = linktypes or [linktype] * len(frames)
    ifaces = sorted(set(kinds)) or [linktype]
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    tsresol = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)  # if_tsresol = 9
    out = [shb] + [_block(1, struct.pack("<HHI", lt, 0, 0) + tsresol) for lt in ifaces]
    for (ts, data, wire), lt in zip(frames, kinds, strict=True):
        out.append(_block(6, struct.pack("<IIIII", ifaces.index(lt), ts >> 32, ts & 0xFFFFFFFF,
                                         len(data), max(wire, len(data))) + data))
    return b"".join(out)


def write_mixed_pcapng(path: Path, trace: Trace, raw: list[bool]) -> Path:
    """The trace as pcapng where the frames marked `raw` lose their Ethernet header and go
    on a raw-IP interface (LINKTYPE_RAW): one trace, two link types."""
    frames = [(ts, f[14:] if r else f, len(f) - (14 if r else 0))
              for (ts, f), r in zip(trace, raw, strict=True)]
    path.write_bytes(pcapng_bytes(frames, linktypes=[101 if r else 1 for r in raw]))
    return path


def write_pcapng(path: Path, trace: Trace) -> Path:
    path.write_bytes(pcapng_bytes([(ts, f, len(f)) for ts, f in trace]))
    return path


def pcap_to_pcapng(src: Path, dst: Path) -> Path:
    """Convert any trace the project reads to pcapng (Ethernet frames only)."""
    from flowshift.packet.pcap import open_trace

    with open_trace(src) as frames:
        rows = [(f.ts_ns, bytes(f.data), f.wire_len) for f in frames if f.linktype == 1]
    dst.write_bytes(pcapng_bytes(rows))
    return dst


class TcpConn:
    """One TCP connection between CLIENT:sport and SERVER:dport, built packet by packet."""

    def __init__(self, sport: int = 40000, dport: int = 80, client: bytes = CLIENT,
                 server: bytes = SERVER) -> None:
        self.c, self.s, self.sport, self.dport = client, server, sport, dport
        self.cseq, self.sseq = 1000, 5000

    def _out(self, flags: int, payload: bytes = b"") -> bytes:
        f = tcp_frame(src=self.c, dst=self.s, sport=self.sport, dport=self.dport,
                      seq=self.cseq, ack=self.sseq, flags=flags, window=65535, payload=payload)
        self.cseq += len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)
        return f

    def _in(self, flags: int, payload: bytes = b"") -> bytes:
        f = tcp_frame(src=self.s, dst=self.c, sport=self.dport, dport=self.sport,
                      seq=self.sseq, ack=self.cseq, flags=flags, window=65535, payload=payload)
        self.sseq += len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)
        return f

    def handshake(self) -> list[bytes]:
        syn = tcp_frame(src=self.c, dst=self.s, sport=self.sport, dport=self.dport,
                        seq=self.cseq, ack=0, flags=TCP_SYN, window=65535)
        self.cseq += 1
        return [syn, self._in(TCP_SYN | TCP_ACK), self._out(TCP_ACK)]

    def data(self, n: int, size: int = 100) -> list[bytes]:
        out = []
        for i in range(n):
            if i % 2:
                out.append(self._in(TCP_ACK | TCP_PSH, b"s" * size))
            else:
                out.append(self._out(TCP_ACK | TCP_PSH, b"c" * size))
        return out

    def client_fin(self) -> bytes:
        return self._out(TCP_FIN | TCP_ACK)

    def server_fin(self) -> bytes:
        return self._in(TCP_FIN | TCP_ACK)

    def client_ack(self) -> bytes:
        return self._out(TCP_ACK)


def udp(sport: int, dport: int = 53, src: bytes = CLIENT, dst: bytes = SERVER) -> bytes:
    return udp_frame(src=src, dst=dst, sport=sport, dport=dport, payload=b"q")


def spaced(frames: list[bytes], start: int, step: int) -> Trace:
    return [(start + i * step, f) for i, f in enumerate(frames)]
