"""Channel framing: good messages round-trip; bad frames are rejected and change nothing."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowshift import channel as ch
from flowshift.config import parse_config
from flowshift.entry import Flow
from flowshift.flow import FlowKey
from flowshift.tiers.link import InlineLink
from flowshift.verdict import RefuseReason, ReturnReason
from hosttools import FIREWALL_HOST

MESSAGES = [
    ch.Handoff(1, {"name": "gw"}, [b"\x01" * 224], [3, 0]),
    ch.Offload(7, b"\x02" * 224),
    ch.Recall(8, (4, 6, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02", 1000, 80), ReturnReason.ROOM),
    ch.Packets(5, [0, 1], [0, 0], [4, 5], [b"ab", b"cd"], [1, 1], [60, 60]),
    ch.Tick(9, 2), ch.Withdraw(3), ch.Ack(7), ch.Refuse(7, RefuseReason.FULL),
    ch.Return(b"\x03" * 224, ReturnReason.IDLE), ch.Results([0], [0], [3], [b"x"]),
    ch.Report(4, [b"\x04" * 224]), ch.Synced(2), ch.Health(False),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg):
    assert ch.decode(ch.encode(msg)) == msg


def _reframe(frame: bytes, version: int | None = None, crc: int | None = None) -> bytes:
    v, c = struct.unpack_from("<HI", frame)
    return struct.pack("<HI", v if version is None else version,
                       c if crc is None else crc) + frame[6:]


@pytest.mark.parametrize(("frame", "reason"), [
    (b"\x01", "short-frame"),
    (_reframe(ch.encode(ch.Ack(1)), version=ch.VERSION + 1), "version"),
    (_reframe(ch.encode(ch.Ack(1)), crc=0), "checksum"),
    (struct.pack("<HI", ch.VERSION, zlib.crc32(b"\xc1")) + b"\xc1", "undecodable"),
    (struct.pack("<HI", ch.VERSION, zlib.crc32(b"\x92\xa3Bad\x01")) + b"\x92\xa3Bad\x01",
     "undecodable"),
])
def test_bad_frames_name_their_reason(frame, reason):
    with pytest.raises(ch.ChannelError) as info:
        ch.decode(frame)
    assert info.value.reason == reason


@given(st.binary(max_size=64))
def test_garbage_never_escapes_as_another_error(data):
    with contextlib.suppress(ch.ChannelError):
        ch.decode(data)


def test_rejected_frame_changes_no_pnic_state_and_is_counted():
    machines = parse_config(FIREWALL_HOST, "test").machines
    link = InlineLink(4, machines, idle_timeout_ns=10**9, report_interval_ns=10**9)
    key = FlowKey(4, 17, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02", 1000, 53)
    entry = Flow(key=key, xlat=key, machine=0, chain=1, expires=10**12).to_bytes()
    good = ch.encode(ch.Offload(1, entry))
    link.send_frame(_reframe(good, crc=0))  # corrupted in transit
    assert len(link.pnic.engine) == 0
    assert link.pnic_end.rejected == {"checksum": 1}
    assert link.answers() == []  # no answer to a frame that never arrived
    link.send(ch.Offload(1, entry))
    assert link.answers() == [ch.Ack(1)]
    assert len(link.pnic.engine) == 1
