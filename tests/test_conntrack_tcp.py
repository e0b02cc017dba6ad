"""TCP conntrack: cases follow how Linux nf_conntrack (6.x) treats each packet."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.conntrack_types import Knobs
from flowshift.packet.view import (
    TCP_ACK,
    TCP_CWR,
    TCP_ECE,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    Packet,
)
from flowshift.services.conntrack_tcp import (
    TCP_FLAG_BE_LIBERAL,
    TCP_FLAG_CHALLENGE_ACK,
    TCP_FLAG_CLOSE_INIT,
    TCP_FLAG_DATA_UNACKNOWLEDGED,
    TCP_FLAG_MAXACK_SET,
    TCP_FLAG_SACK_PERM,
    TCP_FLAG_SIMULTANEOUS_OPEN,
    TCP_FLAG_WINDOW_SCALE,
    TCP_TIMEOUTS_NS,
    TIMEOUT_DESTROY,
    TIMEOUT_RETRANS_NS,
    TIMEOUT_UNACK_NS,
    TIMEOUT_UNCHANGED,
    TcpAction,
    TcpConn,
    TcpResult,
    TcpState,
    relearn,
    tcp_new,
    tcp_open,
    tcp_packet,
    tcp_valid_flags,
)

M32 = 0xFFFFFFFF
SA = TCP_SYN | TCP_ACK
FA = TCP_FIN | TCP_ACK
RA = TCP_RST | TCP_ACK
A = TCP_ACK
ACCEPT, INVALID, IGNORE, REOPEN = (
    TcpAction.ACCEPT,
    TcpAction.INVALID,
    TcpAction.IGNORE,
    TcpAction.REOPEN,
)
S = TcpState
DAYS5 = TCP_TIMEOUTS_NS[S.ESTABLISHED]


def seg(
    flags: int,
    seq: int = 0,
    ack: int = 0,
    win: int = 65535,
    length: int = 0,
    wscale: int = -1,
    sack_perm: bool = False,
    sack: tuple[tuple[int, int], ...] = (),
) -> Packet:
    """A TCP segment as parse() would describe it (only the fields conntrack reads)."""
    options = (
        (3 if wscale >= 0 else 0) + (2 if sack_perm else 0) + (2 + 8 * len(sack) if sack else 0)
    )
    hlen = 20 + (options + 3) // 4 * 4
    return Packet(
        data=bytearray(),
        linktype=1,
        wire_len=0,
        family=4,
        proto=6,
        flags=flags,
        seq=seq & M32,
        ack=ack & M32,
        window=win,
        payload_len=length,
        wscale=wscale,
        sack_perm=sack_perm,
        sack=sack,
        tcp_hlen=hlen,
    )


@dataclass
class Track:
    """A conntrack as the firewall holds it: TCP state plus the ASSURED bit."""

    conn: TcpConn | None = None
    assured: bool = False
    results: list[TcpResult] = field(default_factory=list)

    def __call__(self, direction: int, pkt: Packet) -> TcpResult:
        if self.conn is None:
            conn = TcpConn()
            assert direction == 0 and tcp_new(conn, pkt), "packet cannot create a conntrack"
            self.conn = conn
        result = tcp_packet(self.conn, direction, pkt, self.assured)
        if result.action == REOPEN:
            self.conn, self.assured = None, False
            return self(direction, pkt)
        self.assured = result.assured
        self.results.append(result)
        return result

    @property
    def state(self) -> int:
        assert self.conn is not None
        return self.conn.state


C_ISN, S_ISN = 1000, 5000  # client (original) and server (reply) initial sequence numbers


def established(
    c_wscale: int = 7,
    s_wscale: int = 7,
    sack: bool = True,
    c_isn: int = C_ISN,
    s_win: int = 65160,
) -> Track:
    t = Track()
    t(0, seg(TCP_SYN, c_isn, 0, 64240, wscale=c_wscale, sack_perm=sack))
    t(1, seg(SA, S_ISN, c_isn + 1, s_win, wscale=s_wscale, sack_perm=sack))
    t(0, seg(A, c_isn + 1, S_ISN + 1, 502))
    assert t.state == S.ESTABLISHED and t.assured
    return t


# --- handshake, data, close -------------------------------------------------------------


def test_three_way_handshake() -> None:
    t = Track()
    r = t(0, seg(TCP_SYN, C_ISN, 0, 64240, wscale=7, sack_perm=True))
    assert (r.action, t.state, r.timeout_ns, r.assured) == (ACCEPT, S.SYN_SENT, 120 * 10**9, False)
    c, s = t.conn.seen
    assert (c.end, c.maxend, c.maxwin, c.scale) == (C_ISN + 1, C_ISN + 1, 64240, 7)
    assert c.flags == TCP_FLAG_WINDOW_SCALE | TCP_FLAG_SACK_PERM
    assert s.maxend == 64240  # right edge the SYN offers the server: 0 + window

    r = t(1, seg(SA, S_ISN, C_ISN + 1, 65160, wscale=8, sack_perm=True))
    assert (r.action, t.state, r.timeout_ns, r.assured) == (ACCEPT, S.SYN_RECV, 60 * 10**9, False)
    assert (s.end, s.maxwin, s.scale, s.maxack) == (S_ISN + 1, 65160, 8, C_ISN + 1)
    assert c.maxend == C_ISN + 1 + 65160  # SYN/ACK windows are never scaled

    r = t(0, seg(A, C_ISN + 1, S_ISN + 1, 502))
    assert (r.action, t.state, r.timeout_ns, r.assured) == (ACCEPT, S.ESTABLISHED, DAYS5, True)
    assert s.maxend == S_ISN + 1 + (502 << 7)
    assert t.conn.seen_reply


def test_data_both_ways_and_unacknowledged_timeout() -> None:
    t = established()
    c, s = t.conn.seen
    r = t(0, seg(A | TCP_PSH, C_ISN + 1, S_ISN + 1, 502, length=1000))
    assert (r.action, r.timeout_ns) == (ACCEPT, TIMEOUT_UNACK_NS)
    assert c.end == C_ISN + 1001 and c.flags & TCP_FLAG_DATA_UNACKNOWLEDGED
    r = t(1, seg(A | TCP_PSH, S_ISN + 1, C_ISN + 1001, 500, length=300))
    assert not c.flags & TCP_FLAG_DATA_UNACKNOWLEDGED
    assert (r.action, r.timeout_ns) == (ACCEPT, TIMEOUT_UNACK_NS)  # the server's data now
    r = t(0, seg(A, C_ISN + 1001, S_ISN + 301, 502))
    assert (r.action, r.timeout_ns) == (ACCEPT, DAYS5)
    assert s.end == S_ISN + 301 and c.maxack == S_ISN + 301


@pytest.mark.parametrize(
    "closing, states",
    [
        # client closes, server acks, server closes, client acks
        (
            [(0, FA), (1, A), (1, FA), (0, A)],
            [S.FIN_WAIT, S.CLOSE_WAIT, S.LAST_ACK, S.TIME_WAIT],
        ),
        # server closes first, the client's FIN acknowledges it
        ([(1, FA), (0, FA), (1, A)], [S.FIN_WAIT, S.LAST_ACK, S.TIME_WAIT]),
    ],
)
def test_fin_close_reaches_time_wait(
    closing: list[tuple[int, int]], states: list[TcpState]
) -> None:
    t = established()
    nxt = [C_ISN + 1, S_ISN + 1]  # next seq of each side
    for (direction, flags), want in zip(closing, states, strict=True):
        r = t(direction, seg(flags, nxt[direction], nxt[1 - direction], 500))
        if flags & TCP_FIN:
            nxt[direction] += 1
        assert r.action == ACCEPT and t.state == want
        assert r.timeout_ns == TCP_TIMEOUTS_NS[want]
    first = closing[0][0]
    assert t.conn.seen[first].flags & TCP_FLAG_CLOSE_INIT
    assert not t.conn.seen[1 - first].flags & TCP_FLAG_CLOSE_INIT


# --- RST --------------------------------------------------------------------------------


def test_rst_exactly_at_acknowledged_seq_closes() -> None:
    t = established()
    r = t(1, seg(TCP_RST, S_ISN + 1, 0, 0))
    assert (r.action, t.state, r.timeout_ns) == (ACCEPT, S.CLOSE, 10 * 10**9)


def test_rst_before_acknowledged_seq_is_invalid() -> None:
    t = established()
    r = t(1, seg(TCP_RST, S_ISN - 5000, 0, 0))
    assert (r.action, t.state, r.timeout_ns) == (INVALID, S.ESTABLISHED, TIMEOUT_UNCHANGED)


def test_rst_in_window_but_not_exact_keeps_established() -> None:
    # room for a challenge ACK (RFC 5961): state stays, but the timeout drops to CLOSE's
    t = established()
    r = t(1, seg(TCP_RST, S_ISN + 100, 0, 0))
    assert (r.action, t.state, r.timeout_ns) == (ACCEPT, S.ESTABLISHED, 10 * 10**9)


def test_rst_after_own_data_train_closes() -> None:
    t = established()
    t(1, seg(A, S_ISN + 1, C_ISN + 1, 500, length=19))
    r = t(1, seg(RA, S_ISN + 20, C_ISN + 1, 0))
    assert (r.action, t.state) == (ACCEPT, S.CLOSE)


def test_rst_beyond_window_is_invalid() -> None:
    t = established()
    r = t(1, seg(TCP_RST, S_ISN + 10_000_000, 0, 0))
    assert (r.action, t.state) == (INVALID, S.ESTABLISHED)
    assert (t.conn.last_index, t.conn.last_dir) == (4, 1)  # remembered for the other side


def test_out_of_window_fin_after_peer_fin_shrinks_timeout() -> None:
    t = established()
    t(0, seg(FA, C_ISN + 1, S_ISN + 1, 502))
    r = t(1, seg(FA, S_ISN + 10_000_000, C_ISN + 2, 500))
    assert (r.action, r.timeout_ns, t.state) == (INVALID, TIMEOUT_UNACK_NS, S.FIN_WAIT)


def test_rst_before_any_reply_destroys() -> None:
    t = Track()
    t(0, seg(TCP_SYN, C_ISN, 0, 64240))
    r = t(0, seg(TCP_RST, C_ISN + 1, 0, 0))
    assert (r.action, r.timeout_ns) == (ACCEPT, TIMEOUT_DESTROY)


def test_rst_answering_syn_with_zero_seq() -> None:
    t = Track()
    t(0, seg(TCP_SYN, C_ISN, 0, 64240))
    r = t(1, seg(RA, 0, C_ISN + 1, 0))
    assert (r.action, t.state, r.timeout_ns) == (ACCEPT, S.CLOSE, TIMEOUT_DESTROY)


# --- retransmissions, zero windows, SACK, wrap ---------------------------------------------


def test_retransmissions_counted_then_retrans_timeout() -> None:
    t = established()
    dup = seg(A, C_ISN + 1, S_ISN + 1, 502)
    timeouts = [t(0, dup).timeout_ns for _ in range(4)]
    assert t.conn.retrans == 4
    assert timeouts == [DAYS5, DAYS5, TIMEOUT_RETRANS_NS, TIMEOUT_RETRANS_NS]
    r = t(0, seg(A, C_ISN + 1, S_ISN + 1, 503))  # a new window: not a retransmission
    assert (t.conn.retrans, r.timeout_ns) == (0, DAYS5)


def test_retransmitted_syn_does_not_refresh() -> None:
    t = Track()
    t(0, seg(TCP_SYN, C_ISN, 0, 64240))
    r = t(0, seg(TCP_SYN, C_ISN, 0, 64240))
    assert (r.action, t.state, r.timeout_ns) == (ACCEPT, S.SYN_SENT, TIMEOUT_UNCHANGED)


def test_zero_window_and_probes() -> None:
    t = established(c_wscale=0, s_wscale=0)
    t(0, seg(A, C_ISN + 1, S_ISN + 1, 1000, length=100))
    r = t(1, seg(A, S_ISN + 1, C_ISN + 101, 0))  # server's buffer full
    assert (r.action, r.timeout_ns) == (ACCEPT, TIMEOUT_RETRANS_NS)
    # Linux-style probe: old seq, no data; BSD-style probe: one byte beyond the window
    assert t(0, seg(A, C_ISN + 100, S_ISN + 1, 1000)).action == ACCEPT
    assert t(0, seg(A, C_ISN + 101, S_ISN + 1, 1000, length=1)).action == ACCEPT
    r = t(1, seg(A, S_ISN + 1, C_ISN + 101, 0))
    assert r.timeout_ns == TIMEOUT_RETRANS_NS
    r = t(1, seg(A, S_ISN + 1, C_ISN + 102, 2000))  # window opens again
    assert (r.action, r.timeout_ns) == (ACCEPT, DAYS5)


def test_sack_blocks_acknowledge_beyond_ack() -> None:
    t = established(c_wscale=0, s_wscale=0, s_win=5000)
    for i in range(3):
        t(0, seg(A, C_ISN + 1 + 1000 * i, S_ISN + 1, 1000, length=1000))
    # the middle segment got lost after us: SACK the third
    block = ((C_ISN + 2001, C_ISN + 3001),)
    r = t(1, seg(A, S_ISN + 1, C_ISN + 1001, 4000, sack=block))
    assert r.action == ACCEPT
    assert t.conn.seen[1].maxwin >= 4000 + 2000  # window + (sack - ack)
    assert t.conn.seen[0].maxend == C_ISN + 3001 + 4000  # right edge counted from the SACK
    bogus = ((C_ISN + 2001, C_ISN + 9001),)  # SACKs data never sent
    assert t(1, seg(A, S_ISN + 1, C_ISN + 1001, 4000, sack=bogus)).action == INVALID


def test_sack_blocks_ignored_without_sack_permitted() -> None:
    t = established(c_wscale=0, s_wscale=0, sack=False)
    t(0, seg(A, C_ISN + 1, S_ISN + 1, 1000, length=1000))
    bogus = ((C_ISN + 2001, C_ISN + 9001),)
    assert t(1, seg(A, S_ISN + 1, C_ISN + 1001, 4000, sack=bogus)).action == ACCEPT


def test_sequence_numbers_wrap_around() -> None:
    isn = 0xFFFFFF00
    t = established(c_isn=isn, c_wscale=0, s_wscale=0)
    for i in range(4):  # crosses 2^32 on the second segment
        assert t(0, seg(A, isn + 1 + 200 * i, S_ISN + 1, 1000, length=200)).action == ACCEPT
    assert t.conn.seen[0].end == (isn + 801) & M32 == 0x221
    assert t(1, seg(A, S_ISN + 1, isn + 801, 5000)).action == ACCEPT
    assert t(1, seg(A, S_ISN + 1, isn + 2000, 5000)).action == INVALID  # acks unsent data


# --- window checks ---------------------------------------------------------------------


def test_out_of_window_data_is_invalid_and_not_learned() -> None:
    t = established(c_wscale=0, s_wscale=0)
    before = t.conn.copy()
    r = t(0, seg(A, C_ISN + 1 + 10_000_000, S_ISN + 1, 502, length=100))
    assert (r.action, r.timeout_ns) == (INVALID, TIMEOUT_UNCHANGED)
    assert t.conn == before


def test_retransmission_below_window_is_ignored() -> None:
    t = established(c_wscale=0, s_wscale=0)
    seq = C_ISN + 1
    for _ in range(80):  # 80 kB sent and acknowledged, window 1000
        t(0, seg(A, seq, S_ISN + 1, 1000, length=1000))
        seq += 1000
        t(1, seg(A, S_ISN + 1, seq, 1000))
    r = t(0, seg(A, C_ISN + 1, S_ISN + 1, 1000, length=1000))
    assert (r.action, r.timeout_ns) == (IGNORE, TIMEOUT_UNCHANGED)


def test_slight_overshoot_is_ignored_but_learned() -> None:
    t = established(c_wscale=0, s_wscale=0)  # server offered 502 bytes past S_ISN's ack
    edge = t.conn.seen[0].maxend
    r = t(0, seg(A, edge + 1, S_ISN + 1, 1000, length=100))
    assert r.action == IGNORE
    assert t.conn.seen[0].end == edge + 101  # so the ACK for it passes later
    assert t(1, seg(A, S_ISN + 1, edge + 101, 1000)).action == ACCEPT


@pytest.mark.parametrize(
    "c_wscale, s_wscale, want_c, want_s",
    [(7, 9, 7, 9), (7, -1, 0, 0), (-1, 9, 0, 0), (-1, -1, 0, 0), (20, 14, 14, 14)],
)
def test_window_scaling_only_when_both_offer(
    c_wscale: int, s_wscale: int, want_c: int, want_s: int
) -> None:
    t = established(c_wscale=c_wscale, s_wscale=s_wscale)
    c, s = t.conn.seen
    assert (c.scale, s.scale) == (want_c, want_s)
    assert s.maxend == S_ISN + 1 + (502 << want_c)  # the client's ACK window, scaled
    t(1, seg(A, S_ISN + 1, C_ISN + 1, 300))
    assert c.maxend == max(C_ISN + 1 + 65160, C_ISN + 1 + (300 << want_s))


# --- opening corner cases ----------------------------------------------------------------


def test_simultaneous_open() -> None:
    t = Track()
    t(0, seg(TCP_SYN, C_ISN, 0, 64240))
    r = t(1, seg(TCP_SYN, S_ISN, 0, 65160))
    assert (r.action, t.state) == (ACCEPT, S.SYN_SENT2)
    assert t.conn.last_flags & TCP_FLAG_SIMULTANEOUS_OPEN
    assert t(0, seg(SA, C_ISN, S_ISN + 1, 64240)).action == ACCEPT
    assert t.state == S.SYN_RECV
    r = t(1, seg(A, S_ISN + 1, C_ISN + 1, 65160))
    assert (r.action, t.state, r.assured) == (ACCEPT, S.ESTABLISHED, True)


def test_synack_from_original_in_syn_sent_is_invalid() -> None:
    t = Track()
    t(0, seg(TCP_SYN, C_ISN, 0, 64240))
    assert t(0, seg(SA, C_ISN, 1, 64240)).action == INVALID
    assert t.state == S.SYN_SENT


def test_retransmitted_synack_is_ignored() -> None:
    t = Track()
    t(0, seg(TCP_SYN, C_ISN, 0, 64240))
    t(1, seg(SA, S_ISN, C_ISN + 1, 65160))
    r = t(1, seg(SA, S_ISN, C_ISN + 1, 65160))
    assert (r.action, t.state, r.timeout_ns) == (IGNORE, S.SYN_RECV, TIMEOUT_UNCHANGED)


def test_synack_answering_ignored_syn_resyncs() -> None:
    # The ends start over with new ISNs while we still hold the old connection
    t = established()
    r = t(0, seg(TCP_SYN, 90_000, 0, 64240, wscale=6, sack_perm=True))
    assert (r.action, t.state) == (IGNORE, S.ESTABLISHED)
    r = t(1, seg(SA, 70_000, 90_001, 65160, wscale=5))
    assert (r.action, t.state) == (ACCEPT, S.SYN_RECV)
    c, s = t.conn.seen
    assert (c.end, c.scale, s.end, s.scale) == (90_001, 6, 70_001, 5)
    assert t(0, seg(A, 90_001, 70_001, 1000)).action == ACCEPT
    assert t.state == S.ESTABLISHED


def test_ack_in_syn_sent_from_reply_is_ignored_and_rst_to_it_closes() -> None:
    # Half-open: the server answers our SYN with a challenge ACK; the client resets
    t = Track()
    t(0, seg(TCP_SYN, C_ISN, 0, 64240))
    r = t(1, seg(A, S_ISN, 777, 65160))
    assert (r.action, t.state, t.conn.last_ack) == (IGNORE, S.SYN_SENT, 777)
    r = t(0, seg(TCP_RST, 777, 0, 0))
    assert (r.action, t.state) == (ACCEPT, S.CLOSE)


def test_challenge_ack_in_last_ack_does_not_close() -> None:
    t = established()
    t(0, seg(FA, C_ISN + 1, S_ISN + 1, 502))
    t(1, seg(FA, S_ISN + 1, C_ISN + 2, 500))
    assert t.state == S.LAST_ACK
    r = t(0, seg(TCP_SYN, 123_456, 0, 64240))  # the client reuses the port early
    assert (r.action, t.state) == (IGNORE, S.LAST_ACK)
    assert t.conn.last_flags & TCP_FLAG_CHALLENGE_ACK
    r = t(1, seg(A, S_ISN + 2, C_ISN + 2, 500))  # RFC 5961 challenge ACK
    assert (r.action, t.state) == (IGNORE, S.LAST_ACK)
    r = t(0, seg(A, C_ISN + 2, S_ISN + 2, 502))  # the real last ACK
    assert (r.action, t.state) == (ACCEPT, S.TIME_WAIT)


def closed_by_fin() -> Track:
    t = established()
    t(0, seg(FA, C_ISN + 1, S_ISN + 1, 502))
    t(1, seg(FA, S_ISN + 1, C_ISN + 2, 500))
    t(0, seg(A, C_ISN + 2, S_ISN + 2, 502))
    assert t.state == S.TIME_WAIT
    return t


@pytest.mark.parametrize("direction", [0, 1])
def test_syn_in_time_wait_reopens(direction: int) -> None:
    t = closed_by_fin()
    before = t.conn.copy()
    r = tcp_packet(t.conn, direction, seg(TCP_SYN, 50_000, 0, 64240), t.assured)
    assert (r.action, r.timeout_ns) == (REOPEN, TIMEOUT_UNCHANGED)
    assert t.conn == before
    fresh = TcpConn()
    assert tcp_new(fresh, seg(TCP_SYN, 50_000, 0, 64240))
    r = tcp_packet(fresh, 0, seg(TCP_SYN, 50_000, 0, 64240), False)
    assert (r.action, fresh.state) == (ACCEPT, S.SYN_SENT)


def test_syn_after_own_rst_reopens_else_ignored_or_invalid() -> None:
    t = established()
    t(0, seg(TCP_RST, C_ISN + 1, 0, 0))
    assert t.state == S.CLOSE
    syn = seg(TCP_SYN, 50_000, 0, 64240)
    assert tcp_packet(t.conn.copy(), 0, syn, True).action == REOPEN
    assert tcp_packet(t.conn.copy(), 1, syn, True).action == INVALID
    t = established()
    t(1, seg(TCP_RST, S_ISN + 1, 0, 0))
    assert tcp_packet(t.conn.copy(), 0, syn, True).action == IGNORE


# --- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        0,
        TCP_FIN,
        TCP_SYN | TCP_FIN,
        TCP_SYN | TCP_RST,
        TCP_SYN | TCP_FIN | TCP_ACK,
        TCP_RST | TCP_FIN,
        TCP_RST | TCP_FIN | TCP_ACK,
        TCP_URG,
        TCP_PSH,
        TCP_FIN | TCP_PSH | TCP_URG,  # xmas scan
        TCP_RST | TCP_URG,
        0xFF,
    ],
)
def test_invalid_flag_combinations(flags: int) -> None:
    assert not tcp_valid_flags(flags)
    assert not tcp_new(TcpConn(), seg(flags, C_ISN))
    t = established()
    before = t.conn.copy()
    r = tcp_packet(t.conn, 0, seg(flags, C_ISN + 1, S_ISN + 1, 502), True)
    assert (r.action, r.timeout_ns, r.assured) == (INVALID, TIMEOUT_UNCHANGED, True)
    assert t.conn == before


@pytest.mark.parametrize(
    "flags",
    [
        TCP_SYN,
        TCP_SYN | TCP_ECE | TCP_CWR,
        TCP_SYN | TCP_URG,
        SA,
        SA | TCP_ECE,
        TCP_RST,
        RA,
        FA,
        FA | TCP_PSH | TCP_URG,
        A,
        A | TCP_PSH,
        A | TCP_URG | TCP_CWR,
    ],
)
def test_valid_flag_combinations(flags: int) -> None:
    assert tcp_valid_flags(flags)


@pytest.mark.parametrize(
    "flags, creates", [(TCP_SYN, True), (A, True), (SA, False), (FA, False), (TCP_RST, False)]
)
def test_which_packets_create_a_conntrack(flags: int, creates: bool) -> None:
    assert tcp_new(TcpConn(), seg(flags, C_ISN, S_ISN)) is creates


# --- mid-stream pickup and relearn ----------------------------------------------------------


def test_mid_stream_pickup_then_window_learning() -> None:
    t = Track()
    r = t(0, seg(A | TCP_PSH, 3_000_000, 8_000_000, 1000, length=100))
    assert (r.action, t.state, r.assured) == (ACCEPT, S.ESTABLISHED, False)
    assert r.timeout_ns == TIMEOUT_UNACK_NS  # no answer yet: no 5-day timeout
    c, s = t.conn.seen
    liberal = TCP_FLAG_SACK_PERM | TCP_FLAG_BE_LIBERAL
    assert c.flags & liberal == liberal and s.flags & liberal == liberal
    assert (c.end, c.maxwin, c.maxend) == (3_000_100, 1000, 3_001_100)

    r = t(1, seg(A, 8_000_000, 3_000_100, 2000, length=50))
    assert (r.action, r.assured, r.timeout_ns) == (ACCEPT, False, TIMEOUT_UNACK_NS)
    assert (s.end, s.maxwin) == (8_000_050, 2000)  # learned from its first packet
    r = t(0, seg(A, 3_000_100, 8_000_050, 1000))
    assert (r.action, r.assured, r.timeout_ns) == (ACCEPT, True, DAYS5)
    # liberal: even data far outside any window passes
    assert t(0, seg(A, 3_900_000, 8_000_050, 1000, length=10)).action == ACCEPT


def test_relearn_keeps_state_and_accepts_in_window_traffic() -> None:
    t = established()
    t(0, seg(A, C_ISN + 1, S_ISN + 1, 502, length=5000))
    t(1, seg(A, S_ISN + 1, C_ISN + 5001, 500, length=3000))
    relearn(t.conn)
    c, s = t.conn.seen
    assert t.state == S.ESTABLISHED and t.assured
    assert (c.end, c.maxend, c.maxwin, c.maxack) == (0, 0, 0, 0)
    assert (c.scale, s.scale) == (7, 7)
    assert c.flags & TCP_FLAG_BE_LIBERAL and s.flags & TCP_FLAG_BE_LIBERAL
    assert not (c.flags | s.flags) & TCP_FLAG_MAXACK_SET
    # the first packets after the crash: a retransmission, an ACK of data we never saw
    # (it went through the lost tier), then new data both ways
    assert t(0, seg(A, C_ISN + 1001, S_ISN + 3001, 502, length=1000)).action == ACCEPT
    assert t(1, seg(A, S_ISN + 3001, C_ISN + 5001, 500)).action == ACCEPT
    assert t(0, seg(A, C_ISN + 5001, S_ISN + 3001, 502, length=2000)).action == ACCEPT
    assert t(1, seg(A, S_ISN + 3001, C_ISN + 7001, 500, length=10)).action == ACCEPT
    assert t.state == S.ESTABLISHED
    assert s.maxwin == 500 << 7  # window learned with the kept scale


def test_copy_is_independent() -> None:
    t = established()
    dup = t.conn.copy()
    t(0, seg(A, C_ISN + 1, S_ISN + 1, 502, length=10))
    assert dup != t.conn and dup.seen[0].end == C_ISN + 1


# --- properties ----------------------------------------------------------------------------


@dataclass
class End:
    """One TCP endpoint of the simulated conversation."""

    isn: int
    wscale: int  # -1: no option
    buf: int  # receive buffer: the window it offers
    mss: int
    scale: int = 0  # effective scale of the windows it sends
    snd_una: int = 0
    snd_nxt: int = 0
    edge: int = 0  # right edge of the peer's window as last heard
    rcv_nxt: int = 0
    ooo: list[tuple[int, int]] = field(default_factory=list)  # out-of-order (start, end)

    def window(self) -> int:
        return min(self.buf >> self.scale, 0xFFFF)


def _off(x: int, base: int) -> int:
    return (x - base) & M32


def _segment(src: End, dst: End, seq: int, length: int, sack_ok: bool) -> Packet:
    blocks: tuple[tuple[int, int], ...] = ()
    if sack_ok and src.ooo:
        blocks = tuple((s & M32, e & M32) for s, e in src.ooo[-3:])
    return seg(A | (TCP_PSH if length else 0), seq, src.rcv_nxt, src.window(), length, sack=blocks)


def _receive(rcv: End, snd: End, pkt: Packet, data_base: int, ack_base: int) -> None:
    """rcv takes pkt (sent by snd): data into its buffer, the ACK into its send side."""
    start = _off(pkt.seq, data_base)
    end = start + pkt.payload_len
    if pkt.payload_len:
        rcv.ooo.append((data_base + start, data_base + end))
        rcv.ooo.sort(key=lambda b: _off(b[0], data_base))
        nxt = _off(rcv.rcv_nxt, data_base)
        keep = []
        for s, e in rcv.ooo:
            s_off, e_off = _off(s, data_base), _off(e, data_base)
            if s_off <= nxt:
                nxt = max(nxt, e_off)
            else:
                keep.append((s, e))
        rcv.rcv_nxt = (data_base + nxt) & M32
        rcv.ooo = keep
    ack_off = _off(pkt.ack, ack_base)
    if _off(rcv.snd_una, ack_base) < ack_off <= _off(rcv.snd_nxt, ack_base):
        rcv.snd_una = pkt.ack
    heard = ack_off + (pkt.window << snd.scale)
    if heard > _off(rcv.edge, ack_base):
        rcv.edge = (ack_base + heard) & M32


def _draw_end(data: st.DataObject) -> End:
    wscale = data.draw(st.integers(-1, 14))
    return End(
        isn=data.draw(st.integers(0, M32)),
        wscale=wscale,
        buf=data.draw(st.integers(max(1000, 1 << (wscale + 1)), 1 << 21)),  # window never 0
        mss=data.draw(st.integers(100, 1460)),
    )


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_well_behaved_conversation_is_never_invalid_even_after_relearn(data: st.DataObject) -> None:
    client, server = _draw_end(data), _draw_end(data)
    sack_ok = data.draw(st.booleans())
    ends = (client, server)
    base = (client.isn + 1, server.isn + 1)  # data sequence bases
    t = Track()

    def through(direction: int, pkt: Packet) -> None:
        r = t(direction, pkt)
        assert r.action != INVALID, (direction, pkt, t.conn)

    syn_win = (min(client.buf, 0xFFFF), min(server.buf, 0xFFFF))
    through(0, seg(TCP_SYN, client.isn, 0, syn_win[0], wscale=client.wscale, sack_perm=sack_ok))
    through(
        1,
        seg(SA, server.isn, client.isn + 1, syn_win[1], wscale=server.wscale, sack_perm=sack_ok),
    )
    if client.wscale >= 0 and server.wscale >= 0:
        client.scale, server.scale = min(client.wscale, 14), min(server.wscale, 14)
    for i, me in enumerate(ends):
        me.snd_una = me.snd_nxt = base[i]
        me.rcv_nxt = base[1 - i]
    client.edge = (base[0] + syn_win[1]) & M32
    through(0, seg(A, base[0], base[1], client.window()))
    server.edge = (base[1] + (client.window() << client.scale)) & M32

    flight: list[tuple[int, Packet]] = []  # sent, not yet past the firewall
    steps = data.draw(st.integers(5, 80))
    crash_at = data.draw(st.one_of(st.just(-1), st.integers(0, steps - 1)))  # PNIC lost state
    for step in range(steps):
        if step == crash_at:
            relearn(t.conn)
        move = data.draw(st.sampled_from(["send", "send", "retransmit", "deliver", "deliver"]))
        if move == "deliver" and flight:
            k = data.draw(st.integers(0, min(3, len(flight) - 1)))  # mild reordering
            direction, pkt = flight.pop(k)
            if data.draw(st.integers(0, 9)) == 0:
                continue  # lost before the firewall
            through(direction, pkt)
            if data.draw(st.integers(0, 9)) == 0:
                continue  # lost after the firewall
            rcv, snd = ends[1 - direction], ends[direction]
            _receive(rcv, snd, pkt, base[direction], base[1 - direction])
            if pkt.payload_len:
                flight.append((1 - direction, _segment(rcv, snd, rcv.snd_nxt, 0, sack_ok)))
        elif move in ("send", "retransmit"):
            i = data.draw(st.integers(0, 1))
            me, peer = ends[i], ends[1 - i]
            if move == "send":
                room = _off(me.edge, base[i]) - _off(me.snd_nxt, base[i])
                if room <= 0:
                    continue
                n = data.draw(st.integers(1, min(room, me.mss)))
                flight.append((i, _segment(me, peer, me.snd_nxt, n, sack_ok)))
                me.snd_nxt = (me.snd_nxt + n) & M32
            else:
                outstanding = _off(me.snd_nxt, base[i]) - _off(me.snd_una, base[i])
                if outstanding > 0:
                    n = min(outstanding, me.mss)
                    flight.append((i, _segment(me, peer, me.snd_una, n, sack_ok)))

    # deliver everything in order, retransmitting what was lost; then close
    while True:
        if not flight:
            behind = [i for i in (0, 1) if ends[i].snd_una != ends[i].snd_nxt]
            if not behind:
                break
            me = ends[behind[0]]
            n = min(_off(me.snd_nxt, me.snd_una), me.mss)
            flight.append((behind[0], _segment(me, ends[1 - behind[0]], me.snd_una, n, sack_ok)))
        direction, pkt = flight.pop(0)
        through(direction, pkt)
        rcv, snd = ends[1 - direction], ends[direction]
        _receive(rcv, snd, pkt, base[direction], base[1 - direction])
        if pkt.payload_len:
            flight.append((1 - direction, _segment(rcv, snd, rcv.snd_nxt, 0, sack_ok)))
    for i in (0, 1):
        me, peer = ends[i], ends[1 - i]
        through(i, seg(FA, me.snd_nxt, me.rcv_nxt, me.window()))
        me.snd_nxt = (me.snd_nxt + 1) & M32
        peer.rcv_nxt = (peer.rcv_nxt + 1) & M32
        through(1 - i, seg(A, peer.snd_nxt, peer.rcv_nxt, peer.window()))
    assert t.state == S.TIME_WAIT


_FIELD_BITS = {"end": 32, "maxend": 32, "maxwin": 32, "maxack": 32, "scale": 8, "flags": 8}
_CONN_BITS = {
    "last_dir": 1,
    "retrans": 8,
    "last_index": 8,
    "last_seq": 32,
    "last_ack": 32,
    "last_end": 32,
    "last_win": 16,
    "last_wscale": 8,
    "last_flags": 8,
}

packets = st.tuples(
    st.integers(0, 1),
    st.builds(
        Packet,
        data=st.just(bytearray()),
        linktype=st.just(1),
        wire_len=st.just(0),
        flags=st.one_of(st.integers(0, 255), st.sampled_from([TCP_SYN, SA, A, FA, RA, TCP_RST])),
        seq=st.one_of(st.integers(-(2**33), 2**33), st.integers(0, 3000)),
        ack=st.one_of(st.integers(-(2**33), 2**33), st.integers(0, 3000)),
        window=st.integers(-1, 70000),
        payload_len=st.integers(-5, 70000),
        tcp_hlen=st.integers(0, 60),
        wscale=st.integers(-3, 300),
        sack_perm=st.booleans(),
        sack=st.lists(st.tuples(st.integers(0, M32), st.integers(-5, 2**33)), max_size=4).map(
            tuple
        ),
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(packets, min_size=1, max_size=30))
def test_arbitrary_packets_never_raise_and_keep_fields_in_range(
    stream: list[tuple[int, Packet]],
) -> None:
    conn: TcpConn | None = None
    assured = False
    for direction, pkt in stream:
        if conn is None:
            conn = TcpConn()
            if not tcp_new(conn, pkt):
                conn = None
                continue
            direction = 0
        r = tcp_packet(conn, direction, pkt, assured)
        assert isinstance(r.action, TcpAction)
        assert r.timeout_ns >= TIMEOUT_UNCHANGED
        assured = r.assured
        if r.action == REOPEN or (r.action == ACCEPT and r.timeout_ns == TIMEOUT_DESTROY):
            conn, assured = None, False
            continue
        assert conn.state in set(TcpState)
        for d in conn.seen:
            for name, bits in _FIELD_BITS.items():
                assert 0 <= getattr(d, name) < 1 << bits, name
        for name, bits in _CONN_BITS.items():
            assert 0 <= getattr(conn, name) < 1 << bits, name


# the sysctls tcp_open's short way reads or could be thought to read
knob_sets = st.builds(
    Knobs,
    tcp_loose=st.booleans(),
    tcp_be_liberal=st.booleans(),
    tcp_max_retrans=st.integers(0, 5),
    tcp_timeout_max_retrans=st.sampled_from([TIMEOUT_RETRANS_NS, 1, 10**12]),
    tcp_timeout_unacknowledged=st.sampled_from([TIMEOUT_UNACK_NS, 1]),
)
syns = st.builds(
    Packet,
    data=st.just(bytearray()),
    linktype=st.just(1),
    wire_len=st.just(0),
    flags=st.one_of(st.sampled_from([TCP_SYN, TCP_SYN | 0x40 | 0x80, TCP_SYN | 0x08, SA, A]),
                    st.integers(0, 255)),
    seq=st.one_of(st.integers(0, M32), st.integers(-(2**33), 2**33)),
    ack=st.integers(-(2**33), 2**33),
    window=st.one_of(st.integers(0, 0xFFFF), st.integers(-1, 70000)),
    payload_len=st.one_of(st.integers(0, 1500), st.integers(-5, 2**32)),
    tcp_hlen=st.integers(0, 60),
    wscale=st.integers(-3, 300),
    sack_perm=st.booleans(),
    mss=st.integers(0, 1460),
    sack=st.lists(st.tuples(st.integers(0, M32), st.integers(-5, 2**33)), max_size=2).map(tuple),
)


@settings(max_examples=400, deadline=None)
@given(syns, knob_sets)
def test_tcp_open_is_tcp_new_then_tcp_packet(pkt: Packet, knobs: Knobs) -> None:
    """The packet that opens a conntrack: tcp_open's short way for a plain SYN leaves the
    conntrack and gives the result exactly as tcp_new and then tcp_packet do."""
    slow = TcpConn()
    created = tcp_new(slow, pkt, knobs)
    fast = TcpConn()
    got = tcp_open(fast, pkt, knobs)
    if not created:
        assert got is None
        return
    assert got == tcp_packet(slow, 0, pkt, False, knobs)
    assert fast == slow
