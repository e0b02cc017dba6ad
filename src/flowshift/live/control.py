"""The VNIC daemon's control socket: a Unix stream socket in the run directory.

One request per connection, one reply. Each message is framed as a 4-byte big-endian length and
a msgpack body (msgspec, tagged structs), so both ends decode into typed objects.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgspec

_LEN = struct.Struct(">I")
MAX_MESSAGE = 64 << 20  # a flow dump of a few hundred thousand flows


class StatusRequest(msgspec.Struct, tag=True):
    pass


class FlowsRequest(msgspec.Struct, tag=True):
    pass


class HandoffRequest(msgspec.Struct, tag=True):
    """Hand a machine-tier machine's chain and flows over to the VNIC (`live handoff`)."""

    machine: str


class OffloadRequest(msgspec.Struct, tag=True):
    flow: str = ""  # a flow's original tuple (pnic.flow_text); "" for every flow


class ReturnRequest(msgspec.Struct, tag=True):
    flow: str = ""


class PnicRequest(msgspec.Struct, tag=True):
    action: str  # withdraw | crash | restore


Request = (StatusRequest | FlowsRequest | HandoffRequest | OffloadRequest | ReturnRequest
           | PnicRequest)


class TrafficRow(msgspec.Struct):
    tier: str
    machine: str
    direction: str
    packets: int
    bytes: int


class VerdictRow(msgspec.Struct):
    machine: str  # "" for frames of no machine
    direction: str
    verdict: str
    reason: str
    packets: int


class PortRow(msgspec.Struct):
    ifname: str
    machine: str  # "" for the uplink
    rx_drops: int  # frames lost before the daemon read them (its socket buffer was full)
    tx_errors: int  # frames the kernel refused to send


class Status(msgspec.Struct, tag=True):
    pid: int
    uptime_s: float
    source: str  # the packet source: "punt" (the PNIC's punt device) or "af_packet" (ports)
    ports: list[PortRow]
    metrics: str  # the Prometheus endpoint's URL, "" when off
    traffic: list[TrafficRow]
    verdicts: list[VerdictRow]
    flows: dict[str, int]  # live flows per machine
    flows_created: dict[str, int]
    first_cache: int  # entries in the VNIC's flow tables
    swept: int  # expired flows freed so far
    tiers: dict[str, str] = {}  # machine -> the tier running its chain (machine or vnic)
    pnic: dict[str, Any] = {}  # the PNIC datapath's state and counters ({} without one)


class FlowRow(msgspec.Struct):
    machine: str
    tier: str
    proto: int
    family: int
    original: tuple[str, str, int, int]  # src, dst, sport, dport
    reply: tuple[str, str, int, int]
    packets: tuple[int, int]  # original, reply direction
    bytes: tuple[int, int]
    tcp_state: str  # "" when not TCP
    expires_in_s: int
    line: str  # the conntrack-style line of `live flows`
    flow: str = ""  # the original tuple as `live offload` / `live return` take it


class Flows(msgspec.Struct, tag=True):
    text: str  # report.flow_dump of every live flow
    flows: list[FlowRow]


class HandoffDone(msgspec.Struct, tag=True):
    machine: str
    flows: int  # entries the VNIC imported
    flushed: int  # of them deleted from the guest's conntrack table afterwards
    lb_state: list[int]
    seconds: float  # the daemon's time from the first step to the flush (it forwarded nothing)
    phases: dict[str, float] = {}  # seconds per step: withdraw, dump, import, flush


class Failed(msgspec.Struct, tag=True):
    """The request was refused or failed: one line."""

    error: str



class Done(msgspec.Struct, tag=True):
    """The answer to an offload, return or PNIC drill."""

    ok: bool
    count: int  # flows moved
    text: str  # one line for the user; notes on flows not moved


Reply = Status | Flows | HandoffDone | Failed | Done

_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


class ControlError(Exception):
    """The daemon could not be reached or answered nonsense."""


def frame(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def unframe(buf: bytes | bytearray) -> tuple[bytes, int] | None:
    """(body, bytes used) of the first whole message in buf, or None while incomplete."""
    if len(buf) < _LEN.size:
        return None
    (n,) = _LEN.unpack_from(buf)
    if n > MAX_MESSAGE:
        raise ControlError(f"message of {n} bytes is too long")
    if len(buf) < _LEN.size + n:
        return None
    return bytes(buf[_LEN.size:_LEN.size + n]), _LEN.size + n


def decode_request(body: bytes) -> Request:
    return _request_decoder.decode(body)


def request(path: Path, msg: Request, timeout: float = 5.0) -> Reply:
    """Send one request to the daemon and wait (at most `timeout` seconds) for its reply."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(frame(msg))
            buf = bytearray()
            while True:
                got = unframe(buf)
                if got is not None:
                    return _reply_decoder.decode(got[0])
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise ControlError("the daemon closed the connection without an answer")
                buf += chunk
    except (OSError, msgspec.DecodeError) as err:
        raise ControlError(f"{path}: {err}") from None
