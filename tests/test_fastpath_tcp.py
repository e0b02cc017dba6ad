"""The fast path runs a TCP flow's every packet but a SYN, the SYN/ACK answering its SYN
included, FIN and RST too (the PNIC hands a flow back at FIN or RST instead): the compiled
tracker (tiers/_pnic_flow.py `process_flow`) against the reference (services/chain.py
`process_flow`) on one packet of any state, flags, options, window and sequence: the same
verdict, reason, rewritten bytes and entry (its expiry included), bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from flowshift.conntrack_types import DEFAULT_KNOBS, Knobs
from flowshift.entry import Flow, Status
from flowshift.flow import PROTO_TCP
from flowshift.packet.build import tcp_frame, tcp_options
from flowshift.packet.parse import parse
from flowshift.packet.view import (
    TCP_ACK,
    TCP_CWR,
    TCP_ECE,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    ParseError,
)
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.chain import process_flow
from flowshift.services.conntrack_tcp import TcpDir, TcpState
from flowshift.tiers import _pnic_flow as kf
from flowshift.tiers._pnic_parse import F_PROTO, FULL, N_FIELDS, parse_frame
from flowshift.tiers.pnic_engine import knob_table
from test_pnic_engine import _NEAR_WRAP, _flow, _packet

FIN_ACK = TCP_FIN | TCP_ACK
KNOBS = [dataclasses.replace(DEFAULT_KNOBS, tcp_timeout_unacknowledged=7 * 10**9)]  # UNACK apart


def compiled(flow: Flow, d: int, frame: bytes, wire: int, now: int, knobs: Knobs = KNOBS[0]
             ) -> tuple[int, int, bytes, bytes] | None:
    """The kernel's (verdict, reason, frame after, entry after); None when it would not run
    the packet (the fast path punts it: run_rows's rule)."""
    mem = np.frombuffer(flow.to_bytes(), np.uint8).copy()
    b = np.frombuffer(frame, np.uint8).copy()
    f = np.zeros(N_FIELDS + 2, np.int64)
    if parse_frame(b, 0, len(b), wire, 1, f) != FULL or f[F_PROTO] != PROTO_TCP:
        return None
    flags = frame_flags(frame)
    if flow.expires <= now:
        return None
    if flags & kf.TCP_LIFE_SOFTWARE and not kf.syn_answer(mem, 0, d, f):
        return None
    v, r = kf.process_flow(mem, 0, d, b, 0, f, now, knob_table(None, [knobs]), 0)
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


# -- RST ----------------------------------------------------------------------------------------

RstCase = tuple[Flow, int, Knobs, tuple[int, bytes, int]]
_RST_FLAGS = [TCP_RST] * 4 + [TCP_RST | TCP_ACK] * 4 + [
    TCP_RST | TCP_ACK | TCP_PSH, TCP_RST | TCP_ECE | TCP_CWR, TCP_RST | TCP_URG,
    TCP_RST | TCP_FIN | TCP_ACK]
_U32 = 2**32


@st.composite
def rst_heavy(draw: st.DrawFn) -> RstCase:
    """An RST, with ACK or without (now and then with a flag that makes it invalid), of a live
    flow in any state: right after its SYN (the reply side unseen) or SYN/ACK, established or
    closing, assured or not, its last packet in either direction; in either direction, its
    seq 0, at the other side's highest ACK or beside it, at the last packet's end or ACK,
    in the window or far out; under the tables' knobs tcp_be_liberal and
    tcp_ignore_invalid_rst either way."""
    flow = draw(_flow().filter(lambda f: f.key.proto == PROTO_TCP))
    tcp = flow.tcp
    assert tcp is not None
    tcp.state = TcpState(draw(st.sampled_from([1, 1, 2, 2, 3, 3, 3, 3, 3, 4, 5, 6, 7, 8, 9])))
    if draw(st.integers(0, 3)) == 0:  # after the SYN: nothing seen from the reply side
        tcp.seen = (tcp.seen[0], TcpDir(flags=draw(st.sampled_from(
            [0, ct_tcp.TCP_FLAG_BE_LIBERAL]))))
    status = draw(st.sampled_from([0, Status.SEEN_REPLY, Status.SEEN_REPLY | Status.ASSURED,
                                   Status.SEEN_REPLY | Status.ASSURED]))
    flow.status = (flow.status & ~(Status.SEEN_REPLY | Status.ASSURED)) | status
    tcp.seen_reply = bool(status & Status.SEEN_REPLY)
    # the last packet: FIN and RST (the cap's) as often as the others together
    tcp.last_index = draw(st.one_of(st.integers(0, 5), st.sampled_from(
        [ct_tcp.TCP_FIN_SET, ct_tcp.TCP_RST_SET])))
    tcp.last_dir = draw(st.integers(0, 1))
    flow.expires = 10**12  # live: an expired flow is punted, not tracked
    d = draw(st.integers(0, 1))
    sender, peer = tcp.seen[d], tcp.seen[1 - d]
    if draw(st.booleans()):  # strict window checks for the sender (failed checks count)
        sender.flags &= ~ct_tcp.TCP_FLAG_BE_LIBERAL
    if draw(st.booleans()):  # the other side acknowledged up to about this side's end
        peer.flags |= ct_tcp.TCP_FLAG_MAXACK_SET
        peer.maxack = (sender.end - draw(st.sampled_from([0, 0, 1, 1000, 2**31]))) % _U32
    tcp.last_end = draw(st.sampled_from([tcp.last_end, sender.end, peer.end]))
    seq = draw(st.one_of(
        st.sampled_from([0, peer.maxack, (peer.maxack + 1) % _U32, (peer.maxack - 1) % _U32,
                         tcp.last_end, tcp.last_ack, sender.end]),
        st.integers(sender.end - 70000, sender.end + 70000).map(lambda v: v % _U32),
        _NEAR_WRAP))
    ack = draw(st.one_of(st.sampled_from([0, tcp.last_end, peer.end, (peer.end + 1) % _U32]),
                         _NEAR_WRAP))
    options = b""
    if draw(st.booleans()):
        options = tcp_options(sack=((ack, (ack + draw(st.integers(0, 5000))) % _U32),))
    k = flow.key if d == 0 else flow.reply_key
    frame = tcp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport, seq=seq, ack=ack,
                      flags=draw(st.sampled_from(_RST_FLAGS)),
                      window=draw(st.sampled_from([0, 1, 512, 65535])), options=options,
                      payload_len=draw(st.sampled_from([0, 0, 0, 10])))
    knobs = dataclasses.replace(
        KNOBS[0], tcp_be_liberal=draw(st.sampled_from([False, False, False, True])),
        tcp_ignore_invalid_rst=draw(st.booleans()))
    # as an entry holds it (SEEN_REPLY is the conntrack's seen_reply)
    return Flow.from_bytes(flow.to_bytes()), d, knobs, (30 * 10**9, frame, len(frame))


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=rst_heavy())
def test_the_compiled_tracker_runs_rst_as_the_reference(case: RstCase) -> None:
    flow, d, knobs, (now, frame, wire) = case
    got = compiled(flow, d, frame, wire, now, knobs)
    assert got is not None  # the fast path runs every RST of a live flow
    pkt = parse(bytearray(frame), 1, wire)
    ref = flow.copy()
    out = process_flow(pkt, ref, d, now, knobs)
    assert out is not None  # no REOPEN without a SYN
    verdict, reason, after, entry = got
    assert (verdict, reason) == (int(out.verdict), int(out.reason))
    assert Flow.from_bytes(entry).expires == ref.expires
    assert after == bytes(pkt.data)
    assert entry == ref.to_bytes()


def _rst_outcome(case: RstCase) -> tuple[int, str]:
    """What the reference decides on the case: (the RST checks' disposition, -1 for a flag
    combination or state they never see; the tracker's action and what it did to the
    expiry)."""
    flow, d, knobs, (_now, frame, wire) = case
    tcp = flow.copy().tcp
    assert tcp is not None
    pkt = parse(bytearray(frame), 1, wire)
    assured = bool(flow.status & Status.ASSURED)
    disposition = -1
    if ct_tcp.tcp_valid_flags(pkt.flags) and tcp.state != TcpState.NONE:
        disposition = ct_tcp._rst_disposition(tcp, d, pkt, int(tcp.state), assured, knobs)
    res = ct_tcp.tcp_packet(tcp, d, pkt, assured, knobs)
    kind = ("destroy" if res.timeout_ns == ct_tcp.TIMEOUT_DESTROY
            else "cap" if res.action == ct_tcp.TcpAction.INVALID and res.timeout_ns > 0
            else "")
    return disposition, f"{res.action.name} {kind}".strip()


@pytest.mark.parametrize("outcome", [
    (ct_tcp._RST_TRUSTED, "ACCEPT"), (ct_tcp._RST_TRUSTED, "ACCEPT destroy"),
    (ct_tcp._RST_CHECK, "ACCEPT"), (ct_tcp._RST_CHECK, "ACCEPT destroy"),
    (ct_tcp._RST_CHECK, "INVALID"), (ct_tcp._RST_CHECK, "INVALID cap"),
    (ct_tcp._RST_CHECK, "IGNORE"), (ct_tcp._RST_KEEP_STATE, "ACCEPT"),
    (ct_tcp._RST_KEEP_STATE, "INVALID"), (ct_tcp._RST_KEEP_STATE, "INVALID cap"),
    (ct_tcp._RST_KEEP_STATE, "IGNORE"),
    (ct_tcp._RST_INVALID, "INVALID"),
    (-1, "INVALID"),
], ids=str)
def test_rst_heavy_reaches_every_outcome_of_the_rst_checks(outcome: tuple[int, str]) -> None:
    """The strategy above draws every disposition of the RST checks and every thing the
    window checks then do (else the comparison would prove less than it says)."""
    find(rst_heavy(), lambda case: _rst_outcome(case) == outcome,
         settings=settings(max_examples=20000, database=None, deadline=None,
                           suppress_health_check=list(HealthCheck)))
