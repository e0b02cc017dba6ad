"""Compiled per-flow work of the PNIC engine: conntrack update, NAT/LB rewrite, counters.

A port of services/chain.py `process_flow` for the packets the engines process (the PNIC's:
TCP segments without SYN, FIN or RST; the software fast path's: FIN and RST too, and the
SYN/ACK answering a SYN; UDP; ICMP echo), working on one entry row of bytes in ENTRY_DTYPE
layout (read and written at `mem[e + offset]`, the cache's bytes and the entry's start) and on
the frame bytes in place. TCP follows services/conntrack_tcp.py step by step (`tcp_packet` for
the ACK, FIN, RST and SYN/ACK rows of the state table, `_rst_disposition`, `_in_window`,
`_timeout`); sequence numbers are u32 with explicit masks in int64 arithmetic. Rewrites follow
packet/rewrite.py: RFC 1624 updates of the IPv4 header checksum and the TCP/UDP/ICMPv6
pseudo-header sums, by the very functions of packet/checksum.py (UDP over IPv4 keeps a zero
checksum; a UDP checksum computed as zero is sent as 0xFFFF, over IPv4 and IPv6).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import register_jitable

from flowshift import conntrack_types as ct
from flowshift import entry, flow
from flowshift.packet import checksum, rewrite, route, view
from flowshift.services.conntrack_tcp import TCP_CONNTRACKS, TIMEOUT_DESTROY
from flowshift.tiers._pnic_index import (
    E_DPORT,
    E_DST,
    E_PROTO,
    E_SPORT,
    E_SRC,
    E_XDPORT,
    E_XDST,
    E_XSPORT,
    E_XSRC,
)
from flowshift.tiers._pnic_mem import be16, be32, kernel, ld16, ld32, ld64, st32, st64, st_be16
from flowshift.tiers._pnic_parse import (
    F_ACK,
    F_DPORT,
    F_ECHO,
    F_FAMILY,
    F_FLAGS,
    F_L3,
    F_L4,
    F_L4LEN,
    F_PAYLOAD,
    F_PROTO,
    F_SACK_AT,
    F_SACK_N,
    F_SACK_PERM,
    F_SEQ,
    F_SPORT,
    F_TOTAL,
    F_WINDOW,
    F_WSCALE,
)
from flowshift.verdict import Reason, Verdict

# Every fact below is derived from the module that defines it for the reference (numba reads
# module globals as compile-time constants); tests/test_pnic_constants.py checks them.

_FIELDS = entry.field_offsets()
E_STATUS = _FIELDS["status"]
E_TCP_STATE = _FIELDS["tcp_state"]
E_LAST_DIR = _FIELDS["last_dir"]
E_RETRANS = _FIELDS["retrans"]
E_LAST_INDEX = _FIELDS["last_index"]
E_LAST_FLAGS = _FIELDS["last_flags"]
E_LAST_SEQ = _FIELDS["last_seq"]
E_LAST_ACK = _FIELDS["last_ack"]
E_LAST_END = _FIELDS["last_end"]
E_LAST_WIN = _FIELDS["last_win"]
E_SEEN = _FIELDS["seen0"]  # seen0; seen1 follows at E_SEEN + SEEN_SIZE
SEEN_SIZE = _FIELDS["seen1"] - _FIELDS["seen0"]
_DIR = entry.field_offsets("seen0")
D_END = _DIR["end"]
D_MAXEND = _DIR["maxend"]
D_MAXWIN = _DIR["maxwin"]
D_MAXACK = _DIR["maxack"]
D_SCALE = _DIR["scale"]
D_FLAGS = _DIR["flags"]
E_LAST_SEEN = _FIELDS["last_seen"]
E_EXPIRES = _FIELDS["expires"]
E_STREAM_TS = _FIELDS["stream_ts"]
E_PACKETS = _FIELDS["packets"]
E_BYTES = _FIELDS["bytes"]

FORWARD = int(Verdict.FORWARD)
DROP = int(Verdict.DROP)
ESTABLISHED = int(Reason.ESTABLISHED)
INVALID = int(Reason.INVALID)
TTL_EXCEEDED = int(Reason.TTL_EXCEEDED)
TTL_AT_IPV4 = route.TTL_AT_IPV4
HOP_LIMIT_AT_IPV6 = route.HOP_LIMIT_AT_IPV6

SEEN_REPLY = int(ct.Status.SEEN_REPLY)
ASSURED = int(ct.Status.ASSURED)

M32 = 0xFFFFFFFF
TCP_ACK = view.TCP_ACK
TCP_FIN = view.TCP_FIN
TCP_SYN = view.TCP_SYN
TCP_RST = view.TCP_RST
# the flags whose combination conntrack checks (conntrack_tcp.tcp_valid_flags)
TCP_CHECKED = view.TCP_FIN | view.TCP_SYN | view.TCP_RST | view.TCP_ACK | view.TCP_URG
TCP_LIFE = view.TCP_SYN | view.TCP_FIN | view.TCP_RST  # flags the PNIC leaves to software
# the software tiers' fast path runs FIN and RST too (the PNIC hands a closing flow back
# instead)
TCP_LIFE_SOFTWARE = view.TCP_SYN
PROTO_TCP = flow.PROTO_TCP
PROTO_UDP = flow.PROTO_UDP
PROTO_ICMPV6 = flow.PROTO_ICMPV6

ACCEPT = int(ct.TcpAction.ACCEPT)
A_INVALID = int(ct.TcpAction.INVALID)
IGNORE = int(ct.TcpAction.IGNORE)

S_SYN_SENT = int(ct.TcpState.SYN_SENT)
S_SYN_RECV = int(ct.TcpState.SYN_RECV)
S_ESTABLISHED = int(ct.TcpState.ESTABLISHED)
S_FIN_WAIT = int(ct.TcpState.FIN_WAIT)
S_CLOSE_WAIT = int(ct.TcpState.CLOSE_WAIT)
S_LAST_ACK = int(ct.TcpState.LAST_ACK)
S_TIME_WAIT = int(ct.TcpState.TIME_WAIT)
S_CLOSE = int(ct.TcpState.CLOSE)
S_INVALID = ct.STATE_INVALID
S_IGNORE = ct.STATE_IGNORE
ACK_SET = ct.TCP_ACK_SET
SYN_SET = ct.TCP_SYN_SET
SYNACK_SET = ct.TCP_SYNACK_SET
FIN_SET = ct.TCP_FIN_SET
RST_SET = ct.TCP_RST_SET
N_STATES = ct.N_TCP_STATES

FLAG_SACK_PERM = ct.TCP_FLAG_SACK_PERM
FLAG_BE_LIBERAL = ct.TCP_FLAG_BE_LIBERAL
FLAG_DATA_UNACKNOWLEDGED = ct.TCP_FLAG_DATA_UNACKNOWLEDGED
FLAG_MAXACK_SET = ct.TCP_FLAG_MAXACK_SET
FLAG_CLOSE_INIT = ct.TCP_FLAG_CLOSE_INIT
FLAG_WINDOW_SCALE = ct.TCP_FLAG_WINDOW_SCALE
MAX_WSCALE = ct.TCP_MAX_WSCALE
FLAG_CHALLENGE_ACK = ct.TCP_FLAG_CHALLENGE_ACK
FLAG_SIMULTANEOUS_OPEN = ct.TCP_FLAG_SIMULTANEOUS_OPEN

MAXACKWINCONST = ct.MAXACKWINCONST
# The knobs of the flow's conntrack table: row `z` (the zone, the machine) of the `kn` array
# the engine passes (conntrack_types.Knobs.row), so one compiled kernel serves every setting
K_TCP = ct.K_TCP
K_RETRANS = ct.K_RETRANS
K_UNACK = ct.K_UNACK
K_UDP = ct.K_UDP
K_UDP_STREAM = ct.K_UDP_STREAM
K_ICMP = ct.K_ICMP
K_ICMPV6 = ct.K_ICMPV6
K_MAX_RETRANS = ct.K_MAX_RETRANS
K_BE_LIBERAL = ct.K_BE_LIBERAL
K_IGNORE_INVALID_RST = ct.K_IGNORE_INVALID_RST

# The state table, [direction, index, old state]
ROWS = np.array(TCP_CONNTRACKS, np.int64)


@kernel(private=True)
def _before(a, b):
    return ((a - b) & M32) >= 0x80000000


@kernel(private=True)
def _after(a, b):
    return ((b - a) & M32) >= 0x80000000


@kernel(private=True)
def _scaled(win, scale):
    return 0 if scale >= 32 else (win << scale) & M32


# -- TCP conntrack ------------------------------------------------------------------------------

@kernel(private=True)
def _lenient(mem, e, sender, action, liberal):
    if mem[e + sender + D_FLAGS] & FLAG_BE_LIBERAL or liberal:
        return ACCEPT
    return action


@kernel(private=True)
def _highest_sack(b, s, f, ack):
    sack = ack
    at = f[F_SACK_AT]
    for j in range(f[F_SACK_N]):
        right = be32(b, s + at + 8 * j + 4)
        if _after(right, sack):
            sack = right
    return sack


@kernel(private=True)
def _max_ack_window(mem, e, sender):
    maxwin = ld32(mem, e + sender + D_MAXWIN)
    return maxwin if maxwin > MAXACKWINCONST else MAXACKWINCONST


@kernel(private=True)
def _init_sender(mem, e, sender, receiver, d, f, end, win):
    """conntrack_tcp._init_sender and _read_options: learn a side from its SYN/ACK."""
    st32(mem, e + sender + D_END, end)
    st32(mem, e + sender + D_MAXEND, end)
    st32(mem, e + sender + D_MAXWIN, win if win else 1)
    if f[F_L4LEN] - f[F_PAYLOAD] > 20:  # options (Linux reads none from a bare header)
        mem[e + sender + D_SCALE] = 0
        mem[e + sender + D_FLAGS] &= FLAG_BE_LIBERAL
        if f[F_SACK_PERM]:
            mem[e + sender + D_FLAGS] |= FLAG_SACK_PERM
        if f[F_WSCALE] >= 0:
            mem[e + sender + D_SCALE] = min(f[F_WSCALE], MAX_WSCALE)
            mem[e + sender + D_FLAGS] |= FLAG_WINDOW_SCALE
    # RFC 7323: scaling applies only when both SYNs carried the option
    both = mem[e + sender + D_FLAGS] & mem[e + receiver + D_FLAGS] & FLAG_WINDOW_SCALE
    if d == 1 and not both:
        mem[e + sender + D_SCALE] = 0
        mem[e + receiver + D_SCALE] = 0


@kernel()
def syn_open(mem, e, f, kn, z):
    """conntrack_tcp.tcp_open's short way, for a plain SYN on a zeroed entry: the original
    side learnt from the SYN, the reply side's right edge at its window, SYN_SENT. The
    timeout (the flow's first packet, software's everywhere else: tiers/_fastpath_open.py)."""
    win = f[F_WINDOW]
    _init_sender(mem, e, np.int64(E_SEEN), np.int64(E_SEEN + SEEN_SIZE), np.int64(0), f,
                 (f[F_SEQ] + f[F_PAYLOAD] + 1) & M32, win)
    st32(mem, e + E_SEEN + SEEN_SIZE + D_MAXEND, win if win else 1)
    mem[e + E_LAST_INDEX] = SYN_SET
    mem[e + E_LAST_DIR] = 0
    mem[e + E_TCP_STATE] = S_SYN_SENT
    return _tcp_timeout(mem, e, np.int64(SYN_SET), np.int64(S_SYN_SENT), kn, z)


@kernel()
def syn_answer(mem, e, d, f):
    """Is this TCP packet the SYN/ACK answering the SYN of a SYN_SENT conntrack, the first
    packet of the reply side? The fast path tracks it (the state table's SYN/ACK row takes it
    to SYN_RECV); every other SYN is software's."""
    return ((f[F_FLAGS] & TCP_CHECKED) == TCP_SYN | TCP_ACK and d == 1
            and mem[e + E_TCP_STATE] == S_SYN_SENT
            and ld32(mem, e + E_SEEN + SEEN_SIZE + D_MAXWIN) == 0)


@kernel()
def tcp_in_window(mem, e, d, b, s, f, liberal):
    """conntrack_tcp._in_window for a segment without SYN but the SYN/ACK of `syn_answer`:
    FIN_SET, ACK_SET, RST_SET (with ACK or without), or that SYN/ACK; liberal:
    nf_conntrack_tcp_be_liberal."""
    sender = E_SEEN + SEEN_SIZE * d
    receiver = E_SEEN + SEEN_SIZE * (1 - d)
    flags = f[F_FLAGS]
    seq = f[F_SEQ]
    ack = f[F_ACK]  # the header's field, whether the ACK flag is set or not
    win_raw = f[F_WINDOW]
    win = win_raw
    fin = flags & TCP_FIN
    syn = flags & TCP_SYN
    rst = flags & TCP_RST
    end = (seq + f[F_PAYLOAD] + (1 if fin else 0) + (1 if syn else 0)) & M32
    if mem[e + receiver + D_FLAGS] & FLAG_SACK_PERM:
        sack = _highest_sack(b, s, f, ack)
    else:
        sack = ack

    if syn:  # syn_answer: the reply side's first packet (conntrack_tcp._init_sender)
        _init_sender(mem, e, sender, receiver, d, f, end, win)
    elif ld32(mem, e + sender + D_MAXWIN) == 0:
        # first packet seen from this side mid-stream: learn from it
        st32(mem, e + sender + D_END, end)
        swin = _scaled(win, mem[e + sender + D_SCALE])
        maxwin = swin if swin else 1
        st32(mem, e + sender + D_MAXWIN, maxwin)
        st32(mem, e + sender + D_MAXEND, (end + maxwin) & M32)
        if ld32(mem, e + receiver + D_MAXWIN) == 0:
            st32(mem, e + receiver + D_END, sack)
            st32(mem, e + receiver + D_MAXEND, sack)
        elif sack == (ld32(mem, e + receiver + D_END) + 1) & M32:
            st32(mem, e + receiver + D_END, sack)

    if not flags & TCP_ACK:
        ack = sack = ld32(mem, e + receiver + D_END)  # no ACK: as if it acknowledged all seen
    elif rst and ack == 0:
        ack = sack = ld32(mem, e + receiver + D_END)  # stacks that send RST|ACK with ack 0
    if rst and seq == 0 and mem[e + E_TCP_STATE] == S_SYN_SENT:
        seq = end = ld32(mem, e + sender + D_END)  # an RST answering a SYN

    s_end = ld32(mem, e + sender + D_END)
    s_maxend = ld32(mem, e + sender + D_MAXEND)
    r_end = ld32(mem, e + receiver + D_END)
    r_maxwin = ld32(mem, e + receiver + D_MAXWIN)
    if not _before(seq, (s_maxend + 1) & M32):
        # I: data starts beyond the receiver's window
        overshot = (end - s_maxend + 1) & M32
        ack_ok = _after(sack, (r_end - _max_ack_window(mem, e, sender) - 1) & M32)
        in_recv_win = r_maxwin != 0 and _after(end, (s_end - r_maxwin - 1) & M32)
        if in_recv_win and ack_ok and overshot <= r_maxwin and _before(sack, (r_end + 1) & M32):
            st32(mem, e + sender + D_END, end)
            mem[e + sender + D_FLAGS] |= FLAG_DATA_UNACKNOWLEDGED
            return _lenient(mem, e, sender, np.int64(IGNORE), liberal)
        return _lenient(mem, e, sender, np.int64(A_INVALID), liberal)
    if not _before(sack, (r_end + 1) & M32):  # III: acknowledges data never seen
        return _lenient(mem, e, sender, np.int64(A_INVALID), liberal)
    if r_maxwin != 0 and not _after(end, (s_end - r_maxwin - 1) & M32):
        # II: retransmission of acknowledged data
        return _lenient(mem, e, sender, np.int64(IGNORE), liberal)
    if not _after(sack, (r_end - _max_ack_window(mem, e, sender) - 1) & M32):
        return _lenient(mem, e, sender, np.int64(IGNORE), liberal)  # IV: very old ACK

    if not syn:  # the window of a SYN is never scaled
        win = _scaled(win, mem[e + sender + D_SCALE])
    swin = (win + sack - ack) & M32
    if ld32(mem, e + sender + D_MAXWIN) < swin:
        st32(mem, e + sender + D_MAXWIN, swin)
    if _after(end, s_end):
        st32(mem, e + sender + D_END, end)
        mem[e + sender + D_FLAGS] |= FLAG_DATA_UNACKNOWLEDGED
    if flags & TCP_ACK:
        if not mem[e + sender + D_FLAGS] & FLAG_MAXACK_SET:
            st32(mem, e + sender + D_MAXACK, ack)
            mem[e + sender + D_FLAGS] |= FLAG_MAXACK_SET
        elif _after(ack, ld32(mem, e + sender + D_MAXACK)):
            st32(mem, e + sender + D_MAXACK, ack)

    s_maxend = ld32(mem, e + sender + D_MAXEND)
    r_maxwin = ld32(mem, e + receiver + D_MAXWIN)
    if r_maxwin != 0 and _after(end, s_maxend):
        st32(mem, e + receiver + D_MAXWIN, (r_maxwin + end - s_maxend) & M32)
    right_edge = (sack + win) & M32
    if _after(right_edge, (ld32(mem, e + receiver + D_MAXEND) - 1) & M32):
        st32(mem, e + receiver + D_MAXEND, right_edge if win else (right_edge + 1) & M32)
    if ack == ld32(mem, e + receiver + D_END):
        mem[e + receiver + D_FLAGS] &= ~FLAG_DATA_UNACKNOWLEDGED

    if fin or syn or rst:
        return ACCEPT
    # an ACK_SET segment: count identical ones in a row (retransmissions)
    if (mem[e + E_LAST_DIR] == d and ld32(mem, e + E_LAST_SEQ) == seq
            and ld32(mem, e + E_LAST_ACK) == ack and ld32(mem, e + E_LAST_END) == end
            and ld32(mem, e + E_LAST_WIN) == win_raw):
        mem[e + E_RETRANS] = (mem[e + E_RETRANS] + 1) & 0xFF
    else:
        mem[e + E_LAST_DIR] = d
        st32(mem, e + E_LAST_SEQ, seq)
        st32(mem, e + E_LAST_ACK, ack)
        st32(mem, e + E_LAST_END, end)
        st32(mem, e + E_LAST_WIN, win_raw)
        mem[e + E_RETRANS] = 0
    return ACCEPT


@kernel(private=True)
def _tcp_timeout(mem, e, index, new_state, kn, z):
    """conntrack_tcp._timeout."""
    state_timeout = kn[z, K_TCP + new_state]
    retrans = kn[z, K_RETRANS]
    unack = kn[z, K_UNACK]
    if mem[e + E_RETRANS] >= kn[z, K_MAX_RETRANS] and state_timeout > retrans:
        return retrans
    if index == RST_SET:
        return kn[z, K_TCP + S_CLOSE]
    flags = mem[e + E_SEEN + D_FLAGS] | mem[e + E_SEEN + SEEN_SIZE + D_FLAGS]
    unacked = flags & FLAG_DATA_UNACKNOWLEDGED
    if unacked and state_timeout > unack:
        return unack
    if ld32(mem, e + E_LAST_WIN) == 0 and state_timeout > retrans:
        return retrans
    return state_timeout


@kernel(private=True)
def _ignored(mem, e, d):
    """conntrack_tcp._done for IGNORE: a reply packet the tracker passes marks SEEN_REPLY."""
    if d == 1:
        mem[e + E_STATUS] |= SEEN_REPLY
    return IGNORE, -1


# What the RST checks decide (conntrack_tcp._rst_disposition's outcomes; codes of this module)
RST_INVALID = 0
RST_CHECK = 1  # go on to the window checks
RST_KEEP_STATE = 2  # window checks, but stay in the old state (room for a challenge ACK)
RST_TRUSTED = 3  # skip the window checks


@kernel(private=True)
def _rst_disposition(mem, e, d, f, old_state, ignore_invalid_rst):
    """conntrack_tcp._rst_disposition (Linux's CLOSE case); ignore_invalid_rst:
    nf_conntrack_tcp_ignore_invalid_rst."""
    if old_state in (S_FIN_WAIT, S_LAST_ACK, S_TIME_WAIT, S_CLOSE, S_CLOSE_WAIT):
        return RST_TRUSTED  # closing: the tuple may be reused already, the data is stale
    seq = f[F_SEQ]
    ack = f[F_ACK]
    peer = E_SEEN + SEEN_SIZE * (1 - d)
    status = mem[e + E_STATUS]
    assured = (status & ASSURED) != 0
    last_index = mem[e + E_LAST_INDEX]
    outcome = RST_CHECK
    if mem[e + peer + D_FLAGS] & FLAG_MAXACK_SET and last_index != SYN_SET:
        established = old_state == S_ESTABLISHED and assured
        maxack = ld32(mem, e + peer + D_MAXACK)
        if seq == 0 and not established:
            return RST_CHECK  # likely answers a SYN we let through
        if _before(seq, maxack) and not ignore_invalid_rst:
            return RST_INVALID
        if not established or seq == maxack:
            return RST_CHECK
        if (last_index == ACK_SET and mem[e + E_LAST_DIR] == d
                and seq == ld32(mem, e + E_LAST_END)):
            return RST_CHECK  # RST right after this side's last data
        outcome = RST_KEEP_STATE
    if (((status & SEEN_REPLY and last_index == SYN_SET)
         or (not assured and last_index == ACK_SET))
            and ack == ld32(mem, e + E_LAST_END)):
        return RST_TRUSTED  # answers a SYN or ACK we let through (ignored)
    if (old_state == S_SYN_SENT and last_index == ACK_SET and mem[e + E_LAST_DIR] == 1
            and seq == ld32(mem, e + E_LAST_ACK)):
        return RST_TRUSTED  # answers a challenge ACK we let through
    return outcome


@kernel()
def tcp_track(mem, e, d, b, s, f, kn, z):
    """conntrack_tcp.tcp_packet for a segment without SYN but the SYN/ACK of `syn_answer`
    (an RST, with ACK or without, included): (action, timeout_ns); for ACCEPT, timeout_ns
    TIMEOUT_DESTROY: the conntrack is gone (an RST before any reply); for INVALID,
    timeout_ns > 0 caps the conntrack's remaining life. kn[z]: the knobs of the flow's
    conntrack table.

    The status byte's SEEN_REPLY bit is the conntrack's seen_reply (entry.Flow keeps them so).
    """
    flags = f[F_FLAGS]
    if flags & TCP_RST:
        if flags & TCP_CHECKED & ~TCP_ACK != TCP_RST:
            return A_INVALID, -1  # RST with SYN, FIN or URG: not a valid combination
        index = RST_SET
    elif not flags & TCP_ACK:
        return A_INVALID, -1  # a FIN or a bare segment without ACK: not a valid combination
    elif flags & TCP_SYN:
        index = SYNACK_SET
    else:
        index = FIN_SET if flags & TCP_FIN else ACK_SET
    old_state = numba.int64(mem[e + E_TCP_STATE])
    new_state = ROWS[d, index, old_state]
    check_window = True
    if new_state == S_IGNORE:
        # conntrack_tcp._note_ignored for a FIN_SET or ACK_SET packet
        mem[e + E_LAST_INDEX] = index
        mem[e + E_LAST_DIR] = d
        st32(mem, e + E_LAST_SEQ, f[F_SEQ])
        fin = 1 if index == FIN_SET else 0
        st32(mem, e + E_LAST_END, (f[F_SEQ] + f[F_PAYLOAD] + fin) & M32)
        st32(mem, e + E_LAST_WIN, f[F_WINDOW])
        if old_state == S_SYN_SENT and index == ACK_SET and d == 1:
            st32(mem, e + E_LAST_ACK, f[F_ACK])
        return _ignored(mem, e, d)
    if new_state == S_INVALID:
        return A_INVALID, -1
    if new_state == S_TIME_WAIT:
        if (old_state == S_LAST_ACK and index == ACK_SET and mem[e + E_LAST_DIR] != d
                and mem[e + E_LAST_INDEX] == SYN_SET
                and mem[e + E_LAST_FLAGS] & FLAG_CHALLENGE_ACK):
            mem[e + E_LAST_FLAGS] &= ~FLAG_CHALLENGE_ACK
            return _ignored(mem, e, d)
    elif new_state == S_SYN_RECV:
        if d == 1 and index == ACK_SET and mem[e + E_LAST_FLAGS] & FLAG_SIMULTANEOUS_OPEN:
            new_state = S_ESTABLISHED
    elif new_state == S_CLOSE and index == RST_SET:
        disposition = _rst_disposition(mem, e, d, f, old_state,
                                       kn[z, K_IGNORE_INVALID_RST] != 0)
        if disposition == RST_INVALID:
            return A_INVALID, -1
        if disposition == RST_KEEP_STATE:
            new_state = old_state
        check_window = disposition != RST_TRUSTED

    if check_window:
        action = tcp_in_window(mem, e, d, b, s, f, kn[z, K_BE_LIBERAL] != 0)
        if action == IGNORE:
            return _ignored(mem, e, d)
        if action == A_INVALID:
            if index in (FIN_SET, RST_SET) and mem[e + E_STATUS] & ASSURED:
                # conntrack_tcp._shrink_on_invalid: an out-of-window FIN or RST answering
                # the other side's FIN or RST caps the doomed conntrack's life
                last = mem[e + E_LAST_INDEX]
                if mem[e + E_LAST_DIR] != d and last in (FIN_SET, RST_SET):
                    return A_INVALID, kn[z, K_UNACK]
                mem[e + E_LAST_INDEX] = index
                mem[e + E_LAST_DIR] = d
            return A_INVALID, -1

    mem[e + E_LAST_INDEX] = index
    mem[e + E_LAST_DIR] = d
    mem[e + E_TCP_STATE] = new_state
    if old_state != new_state and new_state == S_FIN_WAIT:
        mem[e + E_SEEN + SEEN_SIZE * d + D_FLAGS] |= FLAG_CLOSE_INIT
    timeout = _tcp_timeout(mem, e, index, new_state, kn, z)
    if not mem[e + E_STATUS] & SEEN_REPLY:
        if index == RST_SET:
            return ACCEPT, TIMEOUT_DESTROY  # an RST before any reply: the conntrack is gone
        if new_state == S_ESTABLISHED and timeout > kn[z, K_UNACK]:
            timeout = kn[z, K_UNACK]  # picked up mid-stream, no answer yet
    elif (not mem[e + E_STATUS] & ASSURED and new_state == S_ESTABLISHED
          and old_state in (S_SYN_RECV, S_ESTABLISHED)):
        mem[e + E_STATUS] |= ASSURED
    if d == 1:
        mem[e + E_STATUS] |= SEEN_REPLY
    return ACCEPT, timeout


# -- rewrite ------------------------------------------------------------------------------------

# The RFC 1624 update and UDP's zero rules: their one statement, compiled where the kernels
# call it (numba compiles a registered function, and its calls of another, in the caller)
_fold = register_jitable(checksum.fold)
_change_of = register_jitable(checksum.change_of)
_update_sum = register_jitable(checksum.update_sum)
_update_transport = register_jitable(checksum.update_transport)


@kernel(private=True)
def _ones_sum(a, i, n):
    """checksum.ones_sum of n (even) bytes at a[i]: 0 only for all zero bytes, else 1..0xFFFF.
    Folded with end-around carries rather than taken modulo 0xFFFF: the same value (the
    residue, with 0xFFFF for a non-zero multiple), without a division."""
    v = 0
    for k in range(0, n, 2):
        v += be16(a, i + k)
    return _fold(v)


CSUM_AT_TCP = rewrite.L4_CHECKSUM_AT[PROTO_TCP]
CSUM_AT_UDP = rewrite.L4_CHECKSUM_AT[PROTO_UDP]
CSUM_AT_ICMP = rewrite.L4_CHECKSUM_AT[flow.PROTO_ICMP]
if rewrite.L4_CHECKSUM_AT[PROTO_ICMPV6] != CSUM_AT_ICMP:
    raise ImportError("the PNIC kernels assume one checksum offset for ICMP and ICMPv6")
CSUM_AT_IPV4 = rewrite.IPV4_CHECKSUM_AT


@kernel(private=True)
def _adjust(b, at, terms, udp, v4):
    """rewrite._adjust for several fields at once: the checksum at b[at] moved by `terms`, the
    sum of ~old + new over the changed fields. One update by the sum equals the updates one
    field at a time (ones'-complement addition is associative, and the folded sum is 0 only
    when every term is), including UDP's 0 -> 0xFFFF."""
    st_be16(b, at, _update_transport(be16(b, at), terms, udp, v4))


@kernel(private=True)
def _l4_checksum_at(l4, proto):
    if proto == PROTO_TCP:
        return l4 + CSUM_AT_TCP
    if proto == PROTO_UDP:
        return l4 + CSUM_AT_UDP
    return l4 + CSUM_AT_ICMP  # ICMP, ICMPv6


@kernel(private=True)
def _same_addr(a, i, mem, j, n):
    """Are the n-byte (4 or 16) addresses at a[i] and mem[j] equal?"""
    if n == 4:
        return ld32(a, i) == ld32(mem, j)
    return ld64(a, i) == ld64(mem, j) and ld64(a, i + 8) == ld64(mem, j + 8)


@kernel(private=True)
def _set_addr(b, at, mem, j, n):
    """rewrite._set_addr without the checksums: write the address, return its ~old + new."""
    old_sum = _ones_sum(b, at, n)
    new_sum = _ones_sum(mem, j, n)
    if n == 4:
        st32(b, at, ld32(mem, j))
    else:
        st64(b, at, ld64(mem, j))
        st64(b, at + 8, ld64(mem, j + 8))
    return _change_of(old_sum, new_sum)


@kernel(private=True)
def _set_port(b, at, port):
    old = be16(b, at)
    st_be16(b, at, port)
    return _change_of(old, port)  # ones_sum of one word is itself


@kernel()
def translate(mem, e, d, b, s, f):
    """xlat.translate: rewrite a packet of the flow in direction d (0 original, 1 reply)."""
    family = f[F_FAMILY]
    n = 4 if family == 4 else 16
    if (_same_addr(mem, e + E_SRC, mem, e + E_XSRC, n)
            and _same_addr(mem, e + E_DST, mem, e + E_XDST, n)
            and ld16(mem, e + E_SPORT) == ld16(mem, e + E_XSPORT)
            and ld16(mem, e + E_DPORT) == ld16(mem, e + E_XDPORT)):
        return
    if d == 0:
        src, dst = E_XSRC, E_XDST
        sport, dport = ld16(mem, e + E_XSPORT), ld16(mem, e + E_XDPORT)
    else:
        src, dst = E_DST, E_SRC
        sport, dport = ld16(mem, e + E_DPORT), ld16(mem, e + E_SPORT)
    proto = f[F_PROTO]
    l3 = s + f[F_L3]
    l4 = s + f[F_L4]
    src_at = l3 + (12 if family == 4 else 8)
    dst_at = l3 + (16 if family == 4 else 24)
    addr_terms = 0  # IPv4 header and pseudo-header
    if not _same_addr(b, src_at, mem, e + src, n):
        addr_terms += _set_addr(b, src_at, mem, e + src, n)
    if not _same_addr(b, dst_at, mem, e + dst, n):
        addr_terms += _set_addr(b, dst_at, mem, e + dst, n)
    port_terms = 0
    echo = f[F_ECHO] != 0
    cur_sport = f[F_SPORT]
    cur_dport = f[F_DPORT]
    if cur_sport != sport:
        port_terms += _set_port(b, l4 + 4 if echo else l4, sport)
        if echo:  # the identifier is both ports
            cur_dport = sport
    if cur_dport != dport:
        port_terms += _set_port(b, l4 + 4 if echo else l4 + 2, dport)
    if family == 4 and addr_terms:
        st_be16(b, l3 + CSUM_AT_IPV4, _update_sum(be16(b, l3 + CSUM_AT_IPV4), addr_terms))
    if proto in (PROTO_TCP, PROTO_UDP, PROTO_ICMPV6):
        port_terms += addr_terms  # the pseudo-header
    if port_terms:
        _adjust(b, _l4_checksum_at(l4, proto), port_terms, proto == PROTO_UDP, family == 4)


# -- the chain for one packet -------------------------------------------------------------------

@kernel()
def process_flow(mem, e, d, b, s, f, now, kn, z):
    """chain.process_flow for a packet the engine processes: (verdict, reason). kn[z]: the
    knobs of the flow's conntrack table (z: its zone)."""
    proto = mem[e + E_PROTO]
    if proto == PROTO_TCP:
        action, timeout = tcp_track(mem, e, d, b, s, f, kn, z)
        if action == A_INVALID:
            if timeout > 0 and now + timeout < ld64(mem, e + E_EXPIRES):
                st64(mem, e + E_EXPIRES, now + timeout)
            return DROP, INVALID
        if action == IGNORE:
            translate(mem, e, d, b, s, f)
            return FORWARD, ESTABLISHED
        if timeout == TIMEOUT_DESTROY:
            st64(mem, e + E_EXPIRES, now)  # gone for the next packet (an RST before any reply)
        elif timeout > 0:
            st64(mem, e + E_EXPIRES, now + timeout)
    elif proto == PROTO_UDP:
        status = mem[e + E_STATUS]
        if status & SEEN_REPLY:
            timeout = kn[z, K_UDP]
            if now > ld64(mem, e + E_STREAM_TS):
                timeout = kn[z, K_UDP_STREAM]
                mem[e + E_STATUS] |= ASSURED
            st64(mem, e + E_EXPIRES, now + timeout)
        else:
            st64(mem, e + E_EXPIRES, now + kn[z, K_UDP])
        if d:
            mem[e + E_STATUS] |= SEEN_REPLY
    else:
        st64(mem, e + E_EXPIRES, now + kn[z, K_ICMPV6 if proto == PROTO_ICMPV6 else K_ICMP])
        if d:
            mem[e + E_STATUS] |= SEEN_REPLY
    st64(mem, e + E_PACKETS + 8 * d, ld64(mem, e + E_PACKETS + 8 * d) + 1)
    st64(mem, e + E_BYTES + 8 * d, ld64(mem, e + E_BYTES + 8 * d) + f[F_TOTAL])
    st64(mem, e + E_LAST_SEEN, now)
    translate(mem, e, d, b, s, f)
    return FORWARD, ESTABLISHED


@kernel()
def forward_hop(b, s, f, v, r):
    """chain.forward_hop for a routing machine, after process_flow gave (v, r): TTL / hop
    limit 1 or 0 dropped (ttl-exceeded), else a forwarded frame's one lower (IPv4: with the
    RFC 1624 update of the header checksum for the word TTL, protocol)."""
    l3 = s + f[F_L3]
    v4 = f[F_FAMILY] == 4
    at = l3 + (TTL_AT_IPV4 if v4 else HOP_LIMIT_AT_IPV6)
    ttl = numba.int64(b[at])
    if ttl <= 1:
        return DROP, TTL_EXCEEDED
    if v == FORWARD:
        b[at] = ttl - 1
        if v4:
            old = (ttl << 8) | numba.int64(b[at + 1])
            change = (~old & 0xFFFF) + (old - 0x100)
            st_be16(b, l3 + CSUM_AT_IPV4, _update_sum(be16(b, l3 + CSUM_AT_IPV4), change))
    return v, r
