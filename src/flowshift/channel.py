"""Messages between tiers and the transports that carry them.

Only messages cross a channel, never shared objects: a flow travels as its fixed-layout entry
bytes (entry.py), a machine's config as its table in dict form, standing on its own
(config.handoff_config). Every message is framed as `version (u16) | crc32 of the body (u32) |
msgpack body`; a frame that fails to decode, has another version or a wrong checksum is
rejected with a logged reason and changes nothing.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections import deque
from typing import Any

import msgspec
import numpy as np

from flowshift.conntrack_types import TcpState
from flowshift.entry import ENTRY_SIZE, field_offsets

log = logging.getLogger("flowshift.channel")

VERSION = 1
_HEADER = struct.Struct("<HI")


class Msg(msgspec.Struct, tag=True, array_like=True):
    """Base of every channel message."""


# -- machine -> VNIC -----------------------------------------------------------------------


class Handoff(Msg):
    """The machine hands its config and the entries of its flows to its VNIC."""

    machine: int
    config: dict[str, Any]
    entries: list[bytes]
    lb_state: list[int] = []  # LoadBalancer.state(): each pool's next round-robin slot


# -- VNIC -> PNIC --------------------------------------------------------------------------


class Offload(Msg):
    seq: int
    entry: bytes


class Offloads(Msg):
    """Many offers in one message, taken in order as that many Offloads would be: entry i
    (bytes i * ENTRY_SIZE onward) has sequence number seq + i. Answered by OffloadResults."""

    seq: int
    entries: bytes  # the entries back to back, ENTRY_SIZE bytes each


class Recall(Msg):
    """The VNIC takes a flow back (room, withdrawal of its machine)."""

    seq: int
    key: tuple[int, int, int, bytes, bytes, int, int]  # the flow's original FlowKey
    reason: int  # verdict.ReturnReason


class Packets(Msg):
    """A batch of packets of PNIC-owned flows, in arrival order."""

    now: int
    index: list[int]
    zone: list[int]  # the machine of each packet (the host classifies, as a vport would)
    ts: list[int]
    data: list[bytes]
    linktype: list[int]
    wire_len: list[int]


class Tick(Msg):
    """Trace time advanced; `sync` asks for a Synced reply once everything before is done."""

    now: int
    sync: int = 0


class RunBatch(Msg):
    """The host's batch is in the shared ring: run its selected packets (process transport)."""

    rows: int
    size: int  # bytes of frames in the ring


class Withdraw(Msg):
    """Graceful PNIC withdrawal: return every entry, then refuse offloads."""

    now: int


class Query(Msg):
    """Every entry as it stands now, read only (a flow dump): answered by Entries."""

    now: int


# -- PNIC -> VNIC --------------------------------------------------------------------------


class Ack(Msg):
    seq: int


class Refuse(Msg):
    seq: int
    reason: int  # verdict.RefuseReason


class OffloadResults(Msg):
    """The answer to Offloads: per entry, in order, one byte: 0 acknowledged (an Ack), else
    the RefuseReason it was refused for (a Refuse)."""

    seq: int
    reasons: bytes


class Return(Msg):
    entry: bytes
    reason: int  # verdict.ReturnReason
    now: int = -1  # trace time it happened (the punted packet's); -1: when its message was


class Results(Msg):
    """Outcome of a Packets batch: per packet a verdict and reason code, or a punt (-1)."""

    index: list[int]
    verdict: list[int]
    reason: list[int]
    data: list[bytes]  # the rewritten packet when forwarded, else b""


class Report(Msg):
    now: int
    entries: list[bytes]


class Synced(Msg):
    sync: int
    next_expiry: int = -1  # the earliest expiry among the entries left (-1: none)


class Entries(Msg):
    """The answer to a Query: every entry, unchanged, and the messages the PNIC rejected."""

    now: int
    entries: list[bytes]
    rejected: dict[str, int] = {}


class Done(Msg):
    """The answers to one message are complete (process transport: frames carry no grouping)."""


class Health(Msg):
    healthy: bool


class BatchDone(Msg):
    """The batch in the shared ring is done; its Return messages came before this."""

    rows: int


Message = (Handoff | Offload | Offloads | Recall | Packets | Tick | RunBatch | Withdraw | Query
           | Ack | Refuse | OffloadResults | Return | Results | Report | Synced | Entries | Done
           | Health | BatchDone)

_F = field_offsets()
_E_FAMILY, _E_PROTO, _E_ZONE = _F["family"], _F["proto"], _F["zone"]
_E_MACHINE, _E_TCP_STATE = _F["machine"], _F["tcp_state"]
_E_ADDRESSES = (_F["src"], _F["dst"], _F["xsrc"], _F["xdst"])
_ZERO12 = bytes(12)
_P0, _P1, _P2, _P3 = (at + 4 for at in _E_ADDRESSES)  # where each address's padding starts
_TCP_STATES = len(TcpState)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


# -- contents ------------------------------------------------------------------------------
# Framing and the CRC say a frame arrived whole; these say its contents can be ours. Every
# receiver checks what it is given and rejects, by one of these reasons, before changing state.

def entry_problem(raw: bytes, zones: int) -> str | None:
    """Why `raw` cannot be a flow entry of a host with `zones` machines (None: it can)."""
    if len(raw) != ENTRY_SIZE:
        return "bad-entry"
    family, proto, state = raw[_E_FAMILY], raw[_E_PROTO], raw[_E_TCP_STATE]
    if family not in (4, 6) or state >= _TCP_STATES or (proto == 6 and state == 0):
        return "bad-entry"
    zone = int.from_bytes(raw[_E_ZONE:_E_ZONE + 2], "little")
    if not 0 <= zone < zones or int.from_bytes(raw[_E_MACHINE:_E_MACHINE + 2], "little") != zone:
        return "unknown-zone"
    # an IPv4 address is its 4 bytes and 12 zero bytes
    if family == 4 and (raw[_P0:_P0 + 12] != _ZERO12 or raw[_P1:_P1 + 12] != _ZERO12
                        or raw[_P2:_P2 + 12] != _ZERO12 or raw[_P3:_P3 + 12] != _ZERO12):
        return "bad-entry"
    return None


_PROBLEMS = (None, "bad-entry", "unknown-zone")
_VECTOR_MIN = 16  # entries from which entries_problem checks them all at once
# the 12 bytes after each IPv4 address, as 32-bit words of the entry (every address starts on
# a word: entry.py's layout)
_PAD_WORDS = np.zeros(ENTRY_SIZE // 4, np.bool_)
for _at in _E_ADDRESSES:
    assert _at % 4 == 0 and ENTRY_SIZE % 4 == 0, "the entry's addresses start on 32-bit words"
    _PAD_WORDS[(_at + 4) // 4:(_at + 16) // 4] = True


def _entry_masks(rows: np.ndarray, zones: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of an (n, ENTRY_SIZE) uint8 array: entry_problem says bad-entry, unknown-zone."""
    family, proto, state = rows[:, _E_FAMILY], rows[:, _E_PROTO], rows[:, _E_TCP_STATE]
    zone = rows[:, _E_ZONE:_E_ZONE + 2].view("<u2")[:, 0]
    machine = rows[:, _E_MACHINE:_E_MACHINE + 2].view("<u2")[:, 0]
    v4 = family == 4
    bad = ~(v4 | (family == 6)) | (state >= _TCP_STATES) | ((proto == 6) & (state == 0))
    foreign = ~bad & ((zone >= zones) | (machine != zone))
    bad |= ~foreign & v4 & rows.view("<u4")[:, _PAD_WORDS].any(axis=1)
    return bad, foreign


def entries_problems(rows: np.ndarray, zones: int) -> list[str | None]:
    """entry_problem of every row of an (n, ENTRY_SIZE) uint8 array, computed at once."""
    bad, foreign = _entry_masks(rows, zones)
    return [_PROBLEMS[c] for c in (bad + 2 * foreign).tolist()]


def entries_problem(entries: bytes, zones: int) -> str | None:
    """Why `entries` cannot be flow entries back to back (an Offloads message's) of a host
    with `zones` machines: the reason entry_problem gives for the first that cannot be one."""
    if len(entries) % ENTRY_SIZE:
        return "bad-entry"
    if len(entries) < _VECTOR_MIN * ENTRY_SIZE:  # a few: numpy's calls would cost more
        for at in range(0, len(entries), ENTRY_SIZE):
            problem = entry_problem(entries[at:at + ENTRY_SIZE], zones)
            if problem is not None:
                return problem
        return None
    bad, foreign = _entry_masks(np.frombuffer(entries, np.uint8).reshape(-1, ENTRY_SIZE), zones)
    either = bad | foreign
    if not either.any():
        return None
    return _PROBLEMS[1 if bad[either.argmax()] else 2]


def key_problem(key: tuple[int, int, int, bytes, bytes, int, int], zones: int) -> str | None:
    """Why `key` cannot be a flow key of a host with `zones` machines (None: it can)."""
    family, proto, zone, src, dst, sport, dport = key
    n = {4: 4, 6: 16}.get(family)
    if n is None or len(src) != n or len(dst) != n or not 0 <= proto < 256 \
            or not 0 <= sport < 65536 or not 0 <= dport < 65536:
        return "bad-key"
    if not 0 <= zone < zones:
        return "unknown-zone"
    return None


class ChannelError(ValueError):
    """A frame that was rejected: its reason is logged and counted; no state changed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # short-frame | version | checksum | undecodable


def encode(msg: Msg) -> bytes:
    body = _encoder.encode(msg)
    return _HEADER.pack(VERSION, zlib.crc32(body)) + body


def decode(frame: bytes) -> Msg:
    if len(frame) < _HEADER.size:
        raise ChannelError("short-frame", f"{len(frame)} bytes")
    version, crc = _HEADER.unpack_from(frame)
    body = memoryview(frame)[_HEADER.size:]
    if version != VERSION:
        raise ChannelError("version", f"{version}, expected {VERSION}")
    if zlib.crc32(body) != crc:
        raise ChannelError("checksum", "crc32 of the body differs")
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ChannelError("undecodable", str(exc)) from None


class Endpoint:
    """One end of an in-process channel: frames are queued, not shared objects."""

    def __init__(self) -> None:
        self.inbox: deque[bytes] = deque()
        self.peer: Endpoint | None = None
        self.rejected: dict[str, int] = {}

    def send(self, msg: Msg) -> None:
        assert self.peer is not None
        self.peer.inbox.append(encode(msg))

    def send_frame(self, frame: bytes) -> None:
        assert self.peer is not None
        self.peer.inbox.append(frame)

    def receive(self) -> Msg | None:
        """The next valid message, or None when the inbox is empty. Bad frames are dropped."""
        while self.inbox:
            frame = self.inbox.popleft()
            try:
                return decode(frame)
            except ChannelError as exc:
                count_rejected(self.rejected, exc)
        return None


def count_rejected(rejected: dict[str, int], exc: ChannelError) -> None:
    rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
    log.warning("channel: rejected frame: %s", exc)


def pair() -> tuple[Endpoint, Endpoint]:
    a, b = Endpoint(), Endpoint()
    a.peer, b.peer = b, a
    return a, b
