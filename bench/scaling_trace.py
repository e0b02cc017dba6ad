"""A gateway trace of N concurrent TCP flows and P packets, written with numpy a round at a time.

The scaling benchmark needs up to 10 million flows open at once and 50 million packets;
flowshift's own generator (gen.py) simulates each flow packet by packet in Python and spreads
flow starts over the duration, which is right for realistic traffic but neither fast enough
nor concurrent enough here. This trace is built for the opposite purpose: every flow opens
first, then all of them stay open and take turns, so the host holds all N flows from the end
of the handshakes to the end of the trace.

Round 0 is every flow's SYN, round 1 every SYN-ACK, round 2 every ACK, then data rounds
alternate client and server segments of `PAYLOAD` bytes, each acknowledging all the other side
sent (valid for conntrack's window tracking); rounds stop when P packets are written, the last
one possibly partial. No flow closes.

Addresses suit bench/offload-host.toml (clients in 10.0.0.0/24 behind SNAT to 192.0.2.1):
flow i goes from 10.0.0.(1 + i % 254) port 1024 + i % 64512 to server 198.18.0.0 + 1 + i //
64512 (the benchmarking range, RFC 2544) port 80. Each (server, port) sees each source port
once, so SNAT keeps every port (Linux's "port preserved") and the server answers
192.0.2.1 on the client's own port: the trace is what the gateway sees.

Classic pcap, nanosecond timestamps, one packet every `GAP_NS`; IPv4 and TCP checksums right.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from os import PathLike
from typing import BinaryIO

import numpy as np

PAYLOAD = 32  # bytes of each data segment (even: the TCP checksum sums 16-bit words)
GAP_NS = 1_000  # between packets; N = 10 M flows spans 10 s per round, inside every timeout
START_S = 1_704_067_200  # 2024-01-01T00:00:00Z
PORTS = 65536 - 1024  # source ports per (server, port): 1024..65535, SNAT's range
MIN_PER_FLOW = 4  # the handshake and one data segment
CHUNK = 1 << 18  # flows written per numpy step: bounds the writer's memory (~25 MB)

CLIENT_NET = 0x0A000000  # 10.0.0.0/24
SERVER_NET = 0xC6120000  # 198.18.0.0/15
PUBLIC = 0xC0000201  # 192.0.2.1, the SNAT address
SERVER_PORT = 80
CLIENT_MAC = bytes.fromhex("020000000001")
GATEWAY_MAC = bytes.fromhex("02005e000001")

SYN, ACK, PSH = 0x02, 0x10, 0x08
ETH, IP, TCP = 14, 20, 20
REC = 16  # pcap record header


@dataclass(frozen=True)
class TraceInfo:
    flows: int
    packets: int
    bytes: int  # of the file


def check(flows: int, packets: int) -> str | None:
    """Why (flows, packets) cannot be built, or None."""
    if flows < 1:
        return f"flows must be at least 1, not {flows}"
    if flows > PORTS * 2**16:
        return f"at most {PORTS * 2**16:,} flows"
    if packets < MIN_PER_FLOW * flows:
        return f"needs at least {MIN_PER_FLOW} packets per flow ({MIN_PER_FLOW * flows:,})"
    return None


def size_bytes(flows: int, packets: int) -> int:
    """The file's size, without writing it."""
    data = packets - 3 * flows
    return 24 + 3 * flows * (REC + ETH + IP + TCP) + data * (REC + ETH + IP + TCP + PAYLOAD)


def write_trace(path: str | PathLike[str], flows: int, packets: int) -> TraceInfo:
    """Write the trace of `flows` concurrent flows and `packets` packets to `path`."""
    problem = check(flows, packets)
    if problem:
        raise ValueError(problem)
    rounds, last = divmod(packets, flows)
    with open(path, "wb") as f:
        # nanosecond pcap, version 2.4, snaplen 65535, Ethernet
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1))
        for r in range(rounds + (last > 0)):
            n = flows if r < rounds else last
            for lo in range(0, n, CHUNK):
                _round(f, r, np.arange(lo, min(n, lo + CHUNK), dtype=np.int64), flows)
    return TraceInfo(flows, packets, size_bytes(flows, packets))


def _isn(i: np.ndarray, salt: int) -> np.ndarray:
    """A flow's initial sequence number, spread over the 32-bit space."""
    return ((i * 2654435761 + salt) & 0xFFFFFFFF).astype(np.uint64)


def _round(f: BinaryIO, r: int, i: np.ndarray, flows: int) -> None:
    """Round `r`'s packets of flows `i` (in flow order), appended to `f`."""
    client = CLIENT_NET + 1 + i % 254
    server = SERVER_NET + 1 + i // PORTS
    cport = 1024 + i % PORTS
    c_isn, s_isn = _isn(i, 0x1234), _isn(i, 0x9E3779B9)
    payload = 0
    if r == 0:
        up, flags, seq, ack = True, SYN, c_isn, np.zeros_like(c_isn)
    elif r == 1:
        up, flags, seq, ack = False, SYN | ACK, s_isn, c_isn + 1
    elif r == 2:
        up, flags, seq, ack = True, ACK, c_isn + 1, s_isn + 1
    else:
        m, server_turn = divmod(r - 3, 2)
        payload = PAYLOAD
        up, flags = not server_turn, PSH | ACK
        if up:  # the client's m-th segment; the server has sent m
            seq, ack = c_isn + 1 + m * PAYLOAD, s_isn + 1 + m * PAYLOAD
        else:  # the server's m-th; the client has sent m + 1
            seq, ack = s_isn + 1 + m * PAYLOAD, c_isn + 1 + (m + 1) * PAYLOAD
    if up:
        src, dst, sport, dport = client, server, cport, np.full_like(i, SERVER_PORT)
        macs, ttl = GATEWAY_MAC + CLIENT_MAC, 64
    else:  # the server answers the translated tuple
        src, dst, sport = server, np.full_like(i, PUBLIC), np.full_like(i, SERVER_PORT)
        dport = cport
        macs, ttl = CLIENT_MAC + GATEWAY_MAC, 52
    frame = ETH + IP + TCP + payload
    n = len(i)
    rec = np.zeros((n, REC + frame), np.uint8)
    template = bytearray(REC + frame)
    template[REC : REC + ETH] = macs + b"\x08\x00"
    ip = REC + ETH
    template[ip : ip + 10] = struct.pack("!BBHHHBB", 0x45, 0, IP + TCP + payload, 0, 0x4000, ttl, 6)
    tcp = ip + IP
    template[tcp + 12] = (TCP // 4) << 4
    template[tcp + 13] = flags
    template[tcp + 14 : tcp + 16] = (65535).to_bytes(2, "big")
    template[tcp + TCP :] = bytes((k * 7 + 1) & 0xFF for k in range(payload))
    rec[:] = np.frombuffer(template, np.uint8)

    t = (START_S * 10**9 + (r * flows + i) * GAP_NS).astype(np.uint64)
    _put(rec, 0, t // 10**9, "<u4")
    _put(rec, 4, t % 10**9, "<u4")
    _put(rec, 8, np.full(n, frame), "<u4")
    _put(rec, 12, np.full(n, frame), "<u4")
    _put(rec, ip + 4, (r * flows + i) & 0xFFFF, ">u2")  # IP ID
    _put(rec, ip + 12, src, ">u4")
    _put(rec, ip + 16, dst, ">u4")
    _put(rec, ip + 10, _fold(_words(rec, ip, ip + IP)), ">u2")
    _put(rec, tcp, sport, ">u2")
    _put(rec, tcp + 2, dport, ">u2")
    _put(rec, tcp + 4, seq & 0xFFFFFFFF, ">u4")
    _put(rec, tcp + 8, ack & 0xFFFFFFFF, ">u4")
    pseudo = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + 6 + TCP + payload
    _put(rec, tcp + 16, _fold(_words(rec, tcp, REC + frame) + pseudo), ">u2")
    rec.tofile(f)


def _put(rec: np.ndarray, at: int, values: np.ndarray, dtype: str) -> None:
    """Column `at` of every record gets `values` in `dtype` (its byte order)."""
    raw = np.ascontiguousarray(values.astype(dtype)).view(np.uint8).reshape(len(rec), -1)
    rec[:, at : at + raw.shape[1]] = raw


def _words(rec: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The sum of the big-endian 16-bit words of bytes lo..hi of every record."""
    b = rec[:, lo:hi].astype(np.int64)
    total: np.ndarray = (b[:, 0::2] * 256 + b[:, 1::2]).sum(axis=1)
    return total


def _fold(total: np.ndarray) -> np.ndarray:
    """The Internet checksum (RFC 1071) of a ones'-complement sum."""
    for _ in range(3):
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
