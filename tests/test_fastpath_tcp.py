"""The fast path runs a TCP flow's every packet but RST and SYN, the SYN/ACK answering its SYN
included (the PNIC hands a flow back at FIN instead): the compiled tracker (tiers/_pnic_flow.py
`process_flow`) against the reference (services/chain.py `process_flow`) on one packet of any
state, flags, options, window and sequence: the same verdict, reason, rewritten bytes and
entry, bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.conntrack_types import DEFAULT_KNOBS
from flowshift.entry import Flow, Status
from flowshift.flow import PROTO_TCP
from flowshift.packet.build import tcp_frame, tcp_options
from flowshift.packet.parse import parse
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ParseError
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.chain import process_flow
from flowshift.services.conntrack_tcp import TcpDir, TcpState
from flowshift.tiers import _pnic_flow as kf
from flowshift.tiers._pnic_parse import F_PROTO, FULL, N_FIELDS, parse_frame
from flowshift.tiers.pnic_engine import knob_table
from test_pnic_engine import _NEAR_WRAP, _flow, _packet

FIN_ACK = TCP_FIN | TCP_ACK
KNOBS = [dataclasses.replace(DEFAULT_KNOBS, tcp_timeout_unacknowledged=7 * 10**9)]  # UNACK apart


def compiled(flow: Flow, d: int, frame: bytes, wire: int, now: int
             ) -> tuple[int, int, bytes, bytes] | None:
    """The kernel's (verdict, reason, frame after, entry after); None when it would not run
    the packet (the fast path punts it)."""
    mem = np.frombuffer(flow.to_bytes(), np.uint8).copy()
    b = np.frombuffer(frame, np.uint8).copy()
    f = np.zeros(N_FIELDS + 2, np.int64)
    if parse_frame(b, 0, len(b), wire, 1, f) != FULL or f[F_PROTO] != PROTO_TCP:
        return None
    flags = frame_flags(frame)
    if flow.expires <= now or flags & TCP_RST:
        return None
    if flags & TCP_SYN and not kf.syn_answer(mem, 0, d, f):
        return None
    v, r = kf.process_flow(mem, 0, d, b, 0, f, now, knob_table(None, KNOBS), 0)
    return int(v), int(r), b.tobytes(), mem.tobytes()


def frame_flags(frame: bytes) -> int:
    pkt = parse(bytearray(frame), 1, len(frame))
    return pkt.flags if pkt.error == ParseError.OK else -1


@st.composite
def fin_heavy(draw: st.DrawFn) -> tuple[Flow, int, tuple[int, bytes, int, int]]:
    flow = draw(_flow().filter(lambda f: f.key.proto == PROTO_TCP))
    assert flow.tcp is not None
    flow.tcp.state = TcpState(draw(st.integers(1, 9)))
    flow.expires = 10**12  # live: an expired flow is punted, not tracked
    now, frame, lt, wire = draw(_packet(flow))
    d = 0 if parse(bytearray(frame), lt, wire).key() == flow.key else 1
    if draw(st.booleans()):  # most of them FIN|ACK
        pkt = parse(bytearray(frame), lt, wire)
        if pkt.error == ParseError.OK and pkt.proto == PROTO_TCP:
            off = pkt.l4 + 13
            frame = frame[:off] + bytes([FIN_ACK | (frame[off] & 0x08)]) + frame[off + 1:]
    return flow, d, (now, frame, lt, wire)


@st.composite
def syn_answers(draw: st.DrawFn) -> tuple[Flow, int, tuple[int, bytes, int, int]]:
    """A SYN_SENT flow, its reply side unseen, and the reply side's SYN/ACK: options of every
    kind (a window scale past Linux's cap of 14 too), or none."""
    flow = draw(_flow().filter(lambda f: f.key.proto == PROTO_TCP))
    assert flow.tcp is not None
    flow.tcp.state = TcpState.SYN_SENT
    flow.tcp.seen = (flow.tcp.seen[0], TcpDir(flags=draw(st.sampled_from(
        [0, ct_tcp.TCP_FLAG_BE_LIBERAL]))))
    flow.tcp.seen_reply = False
    flow.status &= ~(Status.SEEN_REPLY | Status.ASSURED)
    flow.expires = 10**12
    k = flow.reply_key
    options = b""
    if draw(st.booleans()):
        options = tcp_options(mss=draw(st.sampled_from([None, 1460])),
                              sack_perm=draw(st.booleans()),
                              timestamps=draw(st.sampled_from([None, (5, 7)])))
        ws = draw(st.sampled_from([None, 0, 7, 14, 15, 255]))
        if ws is not None:
            options += b"\x01\x03\x03" + bytes((ws,))
        options += b"\x01" * (-len(options) % 4)
    origin = flow.tcp.seen[0].end
    ack = draw(st.sampled_from([origin, origin - 1, origin + 1, draw(_NEAR_WRAP)])) % 2**32
    frame = tcp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport,
                      seq=draw(_NEAR_WRAP), ack=ack, flags=TCP_SYN | TCP_ACK,
                      window=draw(st.sampled_from([0, 1, 512, 65535])), options=options,
                      payload_len=draw(st.sampled_from([0, 0, 10])))
    return flow, 1, (30 * 10**9, frame, 1, len(frame))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=syn_answers())
def test_the_compiled_tracker_runs_the_syn_answer_as_the_reference(
        case: tuple[Flow, int, tuple[int, bytes, int, int]]) -> None:
    test_the_compiled_tracker_runs_fin_and_ack_as_the_reference.hypothesis.inner_test(case)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=fin_heavy())
def test_the_compiled_tracker_runs_fin_and_ack_as_the_reference(
        case: tuple[Flow, int, tuple[int, bytes, int, int]]) -> None:
    flow, d, (now, frame, _lt, wire) = case
    got = compiled(flow, d, frame, wire, now)
    if got is None:
        return
    pkt = parse(bytearray(frame), 1, wire)
    ref = flow.copy()
    out = process_flow(pkt, ref, d, now, KNOBS[0])
    assert out is not None  # no REOPEN without a SYN
    verdict, reason, after, entry = got
    assert (verdict, reason) == (int(out.verdict), int(out.reason))
    assert after == bytes(pkt.data)
    assert entry == ref.to_bytes()
