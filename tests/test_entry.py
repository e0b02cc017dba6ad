"""The flow entry layout: one definition, pinned, and an exact codec."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from flowshift.entry import _STRUCT, ENTRY_DTYPE, ENTRY_SIZE, Flow, Status
from flowshift.flow import FlowKey
from flowshift.services.conntrack_tcp import TcpConn, TcpDir

# (field, offset, size) as documented in docs/flow-entry.md: a mirror (C struct) checks the same
PINNED = [
    ("family", 0, 1), ("proto", 1, 1), ("zone", 2, 2), ("sport", 4, 2), ("dport", 6, 2),
    ("src", 8, 16), ("dst", 24, 16), ("xsrc", 40, 16), ("xdst", 56, 16), ("xsport", 72, 2),
    ("xdport", 74, 2), ("machine", 76, 2), ("chain", 78, 1), ("owner", 79, 1),
    ("generation", 80, 4), ("status", 84, 2), ("rule", 86, 2), ("backend", 88, 2),
    ("tcp_state", 90, 1), ("last_dir", 91, 1), ("retrans", 92, 1), ("last_index", 93, 1),
    ("last_wscale", 94, 1), ("last_flags", 95, 1), ("last_seq", 96, 4), ("last_ack", 100, 4),
    ("last_end", 104, 4), ("last_win", 108, 4), ("seen0", 112, 18), ("seen1", 130, 18),
    ("created", 148, 8), ("last_seen", 156, 8), ("expires", 164, 8), ("stream_ts", 172, 8),
    ("packets", 180, 16), ("bytes", 196, 16), ("reserved0", 212, 12),
]


def test_layout_is_pinned():
    assert ENTRY_SIZE == 224 <= 256
    assert [(n, ENTRY_DTYPE.fields[n][1], ENTRY_DTYPE.fields[n][0].itemsize)
            for n in ENTRY_DTYPE.names] == PINNED
    assert _STRUCT.size == ENTRY_SIZE


u8, u16, u32 = st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)
i64 = st.integers(0, 2**62)


@st.composite
def flows(draw):
    fam = draw(st.sampled_from([4, 6]))
    n = 4 if fam == 4 else 16
    addr = st.binary(min_size=n, max_size=n)
    proto = draw(st.sampled_from([6, 17, 1, 58]))
    zone = draw(u16)
    key = FlowKey(fam, proto, zone, draw(addr), draw(addr), draw(u16), draw(u16))
    xlat = FlowKey(fam, proto, zone, draw(addr), draw(addr), draw(u16), draw(u16))
    status = draw(st.integers(0, 7))
    tcp = None
    if proto == 6:
        def tdir():
            return TcpDir(draw(u32), draw(u32), draw(u32), draw(u32), draw(u8), draw(u8))
        tcp = TcpConn(seen=(tdir(), tdir()), state=draw(st.integers(0, 9)), last_dir=draw(u8),
                      retrans=draw(u8), last_index=draw(u8), last_seq=draw(u32),
                      last_ack=draw(u32), last_end=draw(u32), last_win=draw(u32),
                      last_wscale=draw(u8), last_flags=draw(u8),
                      seen_reply=bool(status & Status.SEEN_REPLY))
    return Flow(key=key, xlat=xlat, machine=draw(u16), chain=draw(st.integers(0, 15)), tcp=tcp,
                status=status, rule=draw(st.integers(-1, 1000)),
                backend=draw(st.integers(-1, 1000)), created=draw(i64), last_seen=draw(i64),
                expires=draw(i64), stream_ts=draw(i64), packets=[draw(i64), draw(i64)],
                bytes=[draw(i64), draw(i64)], generation=draw(u32), owner=draw(st.integers(0, 2)))


@given(flows())
def test_codec_round_trips_exactly(flow):
    raw = flow.to_bytes()
    assert len(raw) == ENTRY_SIZE
    assert Flow.from_bytes(raw) == flow
    rec = flow.to_record()
    assert rec.dtype == ENTRY_DTYPE
    assert Flow.from_record(rec) == flow


@given(flows())
def test_record_fields_match_the_struct_codec(flow):
    rec = flow.to_record()
    assert int(rec["sport"]) == flow.key.sport
    assert bytes(rec["xdst"])[: len(flow.xlat.dst)] == flow.xlat.dst
    assert int(rec["expires"]) == flow.expires
    assert list(rec["bytes"]) == flow.bytes
    if flow.tcp is not None:
        assert int(rec["seen1"]["maxwin"]) == flow.tcp.seen[1].maxwin
        assert int(rec["tcp_state"]) == flow.tcp.state
    assert struct.unpack_from("<h", flow.to_bytes(), 86)[0] == flow.rule
