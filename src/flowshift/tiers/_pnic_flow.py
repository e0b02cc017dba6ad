"""Compiled per-flow work of the PNIC engine: conntrack update, NAT/LB rewrite, counters.

A port of services/chain.py `process_flow` for the packets the engine processes (TCP segments
without SYN, FIN or RST; UDP; ICMP echo), working on one entry row of bytes in ENTRY_DTYPE
layout and on the frame bytes in place. TCP follows services/conntrack_tcp.py step by step
(`tcp_packet` for the ACK row of the state table, `_in_window`, `_timeout`); sequence numbers
are u32 with explicit masks in int64 arithmetic. Rewrites follow packet/rewrite.py: RFC 1624
updates of the IPv4 header checksum and the TCP/UDP/ICMPv6 pseudo-header sums, UDP over IPv4
keeps a zero checksum and sends a computed zero as 0xFFFF.
"""

from __future__ import annotations

import numba
import numpy as np

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
    le16,
)
from flowshift.tiers._pnic_parse import (
    F_ACK,
    F_DPORT,
    F_ECHO,
    F_FAMILY,
    F_FLAGS,
    F_L3,
    F_L4,
    F_PAYLOAD,
    F_PROTO,
    F_SACK_AT,
    F_SACK_N,
    F_SEQ,
    F_SPORT,
    F_TOTAL,
    F_WINDOW,
    be16,
    be32,
)

# the rest of the ENTRY_DTYPE offsets (checked by the engine at import)
E_STATUS = 84
E_TCP_STATE = 90
E_LAST_DIR = 91
E_RETRANS = 92
E_LAST_INDEX = 93
E_LAST_FLAGS = 95
E_LAST_SEQ = 96
E_LAST_ACK = 100
E_LAST_END = 104
E_LAST_WIN = 108
E_SEEN = 112  # seen0; seen1 follows at E_SEEN + SEEN_SIZE
SEEN_SIZE = 18
D_END = 0
D_MAXEND = 4
D_MAXWIN = 8
D_MAXACK = 12
D_SCALE = 16
D_FLAGS = 17
E_LAST_SEEN = 156
E_EXPIRES = 164
E_STREAM_TS = 172
E_PACKETS = 180
E_BYTES = 196

# verdict / reason codes (flowshift.verdict), checked by the engine at import
FORWARD = 0
DROP = 1
ESTABLISHED = 3
INVALID = 5

# conntrack status bits (entry.Status)
SEEN_REPLY = 1
ASSURED = 2

M32 = 0xFFFFFFFF
TCP_ACK = 0x10

# TcpAction
ACCEPT = 0
A_INVALID = 1
IGNORE = 2

# TcpState values used below, the table sentinels and the ACK_SET row index
S_SYN_SENT = 1
S_SYN_RECV = 2
S_ESTABLISHED = 3
S_LAST_ACK = 6
S_TIME_WAIT = 7
S_INVALID = 10
S_IGNORE = 11
ACK_SET = 3
SYN_SET = 0
N_STATES = 10

# per-direction and last_flags bits (conntrack_tcp TCP_FLAG_*)
FLAG_SACK_PERM = 0x02
FLAG_BE_LIBERAL = 0x08
FLAG_DATA_UNACKNOWLEDGED = 0x10
FLAG_MAXACK_SET = 0x20
FLAG_CHALLENGE_ACK = 0x40
FLAG_SIMULTANEOUS_OPEN = 0x80

MAX_RETRANS = 3
MAXACKWINCONST = 66000
_S = 1_000_000_000
TIMEOUT_RETRANS = 300 * _S
TIMEOUT_UNACK = 300 * _S
UDP_TIMEOUT_UNREPLIED = 30 * _S
UDP_TIMEOUT_REPLIED = 120 * _S
ICMP_TIMEOUT = 30 * _S

# The ACK row of TCP_CONNTRACKS per direction, and TCP_TIMEOUTS_NS (checked at import)
ACK_ROWS = np.array([[3, 10, 3, 3, 5, 5, 7, 7, 8, 10],
                     [10, 11, 2, 3, 5, 5, 7, 7, 8, 11]], np.int64)
TIMEOUTS = np.array([120 * _S, 120 * _S, 60 * _S, 5 * 24 * 3600 * _S, 120 * _S, 60 * _S,
                     30 * _S, 120 * _S, 10 * _S, 120 * _S], np.int64)


# -- entry field access (little-endian) ---------------------------------------------------------

@numba.njit(cache=True, inline="always")
def rd32(row, i):
    return le16(row, i) | (le16(row, i + 2) << 16)


@numba.njit(cache=True, inline="always")
def wr32(row, i, v):
    for k in range(4):
        row[i + k] = (v >> (8 * k)) & 0xFF


@numba.njit(cache=True, inline="always")
def rd64(row, i):
    return rd32(row, i) | (rd32(row, i + 4) << 32)


@numba.njit(cache=True, inline="always")
def wr64(row, i, v):
    for k in range(8):
        row[i + k] = (v >> (8 * k)) & 0xFF


@numba.njit(cache=True, inline="always")
def _before(a, b):
    return ((a - b) & M32) >= 0x80000000


@numba.njit(cache=True, inline="always")
def _after(a, b):
    return ((b - a) & M32) >= 0x80000000


@numba.njit(cache=True, inline="always")
def _scaled(win, scale):
    return 0 if scale >= 32 else (win << scale) & M32


# -- TCP conntrack ------------------------------------------------------------------------------

@numba.njit(cache=True)
def _lenient(row, sender, action):
    if row[sender + D_FLAGS] & FLAG_BE_LIBERAL:
        return ACCEPT
    return action


@numba.njit(cache=True)
def _highest_sack(b, s, f, ack):
    sack = ack
    at = f[F_SACK_AT]
    for j in range(f[F_SACK_N]):
        right = be32(b, s + at + 8 * j + 4)
        if _after(right, sack):
            sack = right
    return sack


@numba.njit(cache=True)
def _max_ack_window(row, sender):
    maxwin = rd32(row, sender + D_MAXWIN)
    return maxwin if maxwin > MAXACKWINCONST else MAXACKWINCONST


@numba.njit(cache=True)
def tcp_in_window(row, d, b, s, f):
    """conntrack_tcp._in_window for a segment with ACK and without SYN, FIN, RST."""
    sender = E_SEEN + SEEN_SIZE * d
    receiver = E_SEEN + SEEN_SIZE * (1 - d)
    seq = f[F_SEQ]
    ack = f[F_ACK]
    win_raw = f[F_WINDOW]
    win = win_raw
    end = (seq + f[F_PAYLOAD]) & M32
    if row[receiver + D_FLAGS] & FLAG_SACK_PERM:
        sack = _highest_sack(b, s, f, ack)
    else:
        sack = ack

    if rd32(row, sender + D_MAXWIN) == 0:
        # first packet seen from this side mid-stream: learn from it
        wr32(row, sender + D_END, end)
        swin = _scaled(win, row[sender + D_SCALE])
        maxwin = swin if swin else 1
        wr32(row, sender + D_MAXWIN, maxwin)
        wr32(row, sender + D_MAXEND, (end + maxwin) & M32)
        if rd32(row, receiver + D_MAXWIN) == 0:
            wr32(row, receiver + D_END, sack)
            wr32(row, receiver + D_MAXEND, sack)
        elif sack == (rd32(row, receiver + D_END) + 1) & M32:
            wr32(row, receiver + D_END, sack)

    s_end = rd32(row, sender + D_END)
    s_maxend = rd32(row, sender + D_MAXEND)
    r_end = rd32(row, receiver + D_END)
    r_maxwin = rd32(row, receiver + D_MAXWIN)
    if not _before(seq, (s_maxend + 1) & M32):
        # I: data starts beyond the receiver's window
        overshot = (end - s_maxend + 1) & M32
        ack_ok = _after(sack, (r_end - _max_ack_window(row, sender) - 1) & M32)
        in_recv_win = r_maxwin != 0 and _after(end, (s_end - r_maxwin - 1) & M32)
        if in_recv_win and ack_ok and overshot <= r_maxwin and _before(sack, (r_end + 1) & M32):
            wr32(row, sender + D_END, end)
            row[sender + D_FLAGS] |= FLAG_DATA_UNACKNOWLEDGED
            return _lenient(row, sender, IGNORE)
        return _lenient(row, sender, A_INVALID)
    if not _before(sack, (r_end + 1) & M32):
        return _lenient(row, sender, A_INVALID)  # III: acknowledges data never seen
    if r_maxwin != 0 and not _after(end, (s_end - r_maxwin - 1) & M32):
        return _lenient(row, sender, IGNORE)  # II: retransmission of acknowledged data
    if not _after(sack, (r_end - _max_ack_window(row, sender) - 1) & M32):
        return _lenient(row, sender, IGNORE)  # IV: very old ACK

    win = _scaled(win, row[sender + D_SCALE])
    swin = (win + sack - ack) & M32
    if rd32(row, sender + D_MAXWIN) < swin:
        wr32(row, sender + D_MAXWIN, swin)
    if _after(end, s_end):
        wr32(row, sender + D_END, end)
        row[sender + D_FLAGS] |= FLAG_DATA_UNACKNOWLEDGED
    if not row[sender + D_FLAGS] & FLAG_MAXACK_SET:
        wr32(row, sender + D_MAXACK, ack)
        row[sender + D_FLAGS] |= FLAG_MAXACK_SET
    elif _after(ack, rd32(row, sender + D_MAXACK)):
        wr32(row, sender + D_MAXACK, ack)

    s_maxend = rd32(row, sender + D_MAXEND)
    r_maxwin = rd32(row, receiver + D_MAXWIN)
    if r_maxwin != 0 and _after(end, s_maxend):
        wr32(row, receiver + D_MAXWIN, (r_maxwin + end - s_maxend) & M32)
    right_edge = (sack + win) & M32
    if _after(right_edge, (rd32(row, receiver + D_MAXEND) - 1) & M32):
        wr32(row, receiver + D_MAXEND, right_edge if win else (right_edge + 1) & M32)
    if ack == rd32(row, receiver + D_END):
        row[receiver + D_FLAGS] &= ~FLAG_DATA_UNACKNOWLEDGED

    # the segment is ACK_SET: count identical ones in a row (retransmissions)
    if (row[E_LAST_DIR] == d and rd32(row, E_LAST_SEQ) == seq and rd32(row, E_LAST_ACK) == ack
            and rd32(row, E_LAST_END) == end and rd32(row, E_LAST_WIN) == win_raw):
        row[E_RETRANS] = (row[E_RETRANS] + 1) & 0xFF
    else:
        row[E_LAST_DIR] = d
        wr32(row, E_LAST_SEQ, seq)
        wr32(row, E_LAST_ACK, ack)
        wr32(row, E_LAST_END, end)
        wr32(row, E_LAST_WIN, win_raw)
        row[E_RETRANS] = 0
    return ACCEPT


@numba.njit(cache=True)
def _tcp_timeout(row, new_state):
    state_timeout = TIMEOUTS[new_state]
    if row[E_RETRANS] >= MAX_RETRANS and state_timeout > TIMEOUT_RETRANS:
        return TIMEOUT_RETRANS
    unacked = (row[E_SEEN + D_FLAGS] | row[E_SEEN + SEEN_SIZE + D_FLAGS]) & FLAG_DATA_UNACKNOWLEDGED
    if unacked and state_timeout > TIMEOUT_UNACK:
        return TIMEOUT_UNACK
    if rd32(row, E_LAST_WIN) == 0 and state_timeout > TIMEOUT_RETRANS:
        return TIMEOUT_RETRANS
    return state_timeout


@numba.njit(cache=True)
def _ignored(row, d):
    """conntrack_tcp._done for IGNORE: a reply packet the tracker passes marks SEEN_REPLY."""
    if d == 1:
        row[E_STATUS] |= SEEN_REPLY
    return IGNORE, -1


@numba.njit(cache=True)
def tcp_track(row, d, b, s, f):
    """conntrack_tcp.tcp_packet for a segment without SYN, FIN, RST: (action, timeout_ns).

    The status byte's SEEN_REPLY bit is the conntrack's seen_reply (entry.Flow keeps them so).
    """
    flags = f[F_FLAGS]
    if not flags & TCP_ACK:
        return A_INVALID, -1  # no ACK, no SYN/FIN/RST: not a valid flag combination
    old_state = numba.int64(row[E_TCP_STATE])
    new_state = ACK_ROWS[d, old_state]
    if new_state == S_IGNORE:
        # conntrack_tcp._note_ignored for an ACK_SET packet
        row[E_LAST_INDEX] = ACK_SET
        row[E_LAST_DIR] = d
        wr32(row, E_LAST_SEQ, f[F_SEQ])
        wr32(row, E_LAST_END, (f[F_SEQ] + f[F_PAYLOAD]) & M32)
        wr32(row, E_LAST_WIN, f[F_WINDOW])
        if old_state == S_SYN_SENT and d == 1:
            wr32(row, E_LAST_ACK, f[F_ACK])
        return _ignored(row, d)
    if new_state == S_INVALID:
        return A_INVALID, -1
    if new_state == S_TIME_WAIT:
        if (old_state == S_LAST_ACK and row[E_LAST_DIR] != d and row[E_LAST_INDEX] == SYN_SET
                and row[E_LAST_FLAGS] & FLAG_CHALLENGE_ACK):
            row[E_LAST_FLAGS] &= ~FLAG_CHALLENGE_ACK
            return _ignored(row, d)
    elif new_state == S_SYN_RECV and d == 1 and row[E_LAST_FLAGS] & FLAG_SIMULTANEOUS_OPEN:
        new_state = S_ESTABLISHED

    action = tcp_in_window(row, d, b, s, f)
    if action == IGNORE:
        return _ignored(row, d)
    if action == A_INVALID:
        return A_INVALID, -1

    row[E_LAST_INDEX] = ACK_SET
    row[E_LAST_DIR] = d
    row[E_TCP_STATE] = new_state
    timeout = _tcp_timeout(row, new_state)
    if not row[E_STATUS] & SEEN_REPLY:
        if new_state == S_ESTABLISHED and timeout > TIMEOUT_UNACK:
            timeout = TIMEOUT_UNACK  # picked up mid-stream, no answer yet
    elif (not row[E_STATUS] & ASSURED and new_state == S_ESTABLISHED
          and old_state in (S_SYN_RECV, S_ESTABLISHED)):
        row[E_STATUS] |= ASSURED
    if d == 1:
        row[E_STATUS] |= SEEN_REPLY
    return ACCEPT, timeout


# -- rewrite ------------------------------------------------------------------------------------

@numba.njit(cache=True, inline="always")
def _ones_sum(a, i, n):
    """checksum.ones_sum of n (even) bytes at a[i]: 0 only for all zero bytes, else 1..0xFFFF."""
    v = np.int64(0)
    for k in range(0, n, 2):
        v += be16(a, i + k)
    if v == 0:
        return 0
    r = v % 0xFFFF
    return r if r else 0xFFFF


@numba.njit(cache=True)
def _adjust(b, at, old_sum, new_sum, udp4):
    """rewrite._adjust: RFC 1624 update of the checksum at b[at] for a field old -> new."""
    csum = be16(b, at)
    if udp4 and csum == 0:
        return  # UDP over IPv4 sent without a checksum stays so
    t = (~csum & 0xFFFF) + new_sum + (~old_sum & 0xFFFF)
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    value = ~t & 0xFFFF
    if value == 0 and udp4:
        value = 0xFFFF
    b[at] = value >> 8
    b[at + 1] = value & 0xFF


@numba.njit(cache=True, inline="always")
def _l4_checksum_at(l4, proto):
    if proto == 6:
        return l4 + 16
    if proto == 17:
        return l4 + 6
    return l4 + 2  # ICMP, ICMPv6


@numba.njit(cache=True)
def _set_addr(b, at, row, field, n, family, l3, l4, proto):
    """rewrite._set_addr: write the address at b[at] from row[field:field+n], fix checksums."""
    old_sum = _ones_sum(b, at, n)
    new_sum = _ones_sum(row, field, n)
    for k in range(n):
        b[at + k] = row[field + k]
    if family == 4:
        _adjust(b, l3 + 10, old_sum, new_sum, False)
    if proto == 6 or proto == 17 or proto == 58:
        _adjust(b, _l4_checksum_at(l4, proto), old_sum, new_sum, proto == 17 and family == 4)


@numba.njit(cache=True)
def _set_port(b, at, port, l4, proto, udp4):
    old = be16(b, at)
    b[at] = port >> 8
    b[at + 1] = port & 0xFF
    _adjust(b, _l4_checksum_at(l4, proto), old, port, udp4)  # ones_sum of one word is itself


@numba.njit(cache=True)
def _differs(b, at, row, field, n):
    for k in range(n):  # noqa: SIM110 - a loop: numba compiles no any(generator)
        if b[at + k] != row[field + k]:
            return True
    return False


@numba.njit(cache=True)
def translate(row, d, b, s, f):
    """xlat.translate: rewrite a packet of the flow in direction d (0 original, 1 reply)."""
    family = f[F_FAMILY]
    n = 4 if family == 4 else 16
    if (not _differs(row, E_SRC, row, E_XSRC, n) and not _differs(row, E_DST, row, E_XDST, n)
            and le16(row, E_SPORT) == le16(row, E_XSPORT)
            and le16(row, E_DPORT) == le16(row, E_XDPORT)):
        return
    if d == 0:
        src, dst = E_XSRC, E_XDST
        sport, dport = le16(row, E_XSPORT), le16(row, E_XDPORT)
    else:
        src, dst = E_DST, E_SRC
        sport, dport = le16(row, E_DPORT), le16(row, E_SPORT)
    proto = f[F_PROTO]
    l3 = s + f[F_L3]
    l4 = s + f[F_L4]
    src_at = l3 + (12 if family == 4 else 8)
    dst_at = l3 + (16 if family == 4 else 24)
    if _differs(b, src_at, row, src, n):
        _set_addr(b, src_at, row, src, n, family, l3, l4, proto)
    if _differs(b, dst_at, row, dst, n):
        _set_addr(b, dst_at, row, dst, n, family, l3, l4, proto)
    udp4 = proto == 17 and family == 4
    echo = f[F_ECHO] != 0
    cur_sport = f[F_SPORT]
    cur_dport = f[F_DPORT]
    if cur_sport != sport:
        _set_port(b, l4 + 4 if echo else l4, sport, l4, proto, udp4)
        cur_sport = sport
        if echo:  # the identifier is both ports
            cur_dport = sport
    if cur_dport != dport:
        _set_port(b, l4 + 4 if echo else l4 + 2, dport, l4, proto, udp4)


# -- the chain for one packet -------------------------------------------------------------------

@numba.njit(cache=True)
def process_flow(row, d, b, s, f, now):
    """chain.process_flow for a packet the engine processes: (verdict, reason)."""
    proto = row[E_PROTO]
    if proto == 6:
        action, timeout = tcp_track(row, d, b, s, f)
        if action == A_INVALID:
            return DROP, INVALID
        if action == IGNORE:
            translate(row, d, b, s, f)
            return FORWARD, ESTABLISHED
        wr64(row, E_EXPIRES, now + timeout)
    elif proto == 17:
        status = row[E_STATUS]
        if status & SEEN_REPLY:
            timeout = UDP_TIMEOUT_UNREPLIED
            if now > rd64(row, E_STREAM_TS):
                timeout = UDP_TIMEOUT_REPLIED
                row[E_STATUS] |= ASSURED
            wr64(row, E_EXPIRES, now + timeout)
        else:
            wr64(row, E_EXPIRES, now + UDP_TIMEOUT_UNREPLIED)
        if d:
            row[E_STATUS] |= SEEN_REPLY
    else:
        wr64(row, E_EXPIRES, now + ICMP_TIMEOUT)
        if d:
            row[E_STATUS] |= SEEN_REPLY
    wr64(row, E_PACKETS + 8 * d, rd64(row, E_PACKETS + 8 * d) + 1)
    wr64(row, E_BYTES + 8 * d, rd64(row, E_BYTES + 8 * d) + f[F_TOTAL])
    wr64(row, E_LAST_SEEN, now)
    translate(row, d, b, s, f)
    return FORWARD, ESTABLISHED


@numba.njit(cache=True)
def processable(row, f):
    """Can the engine run this hit of a fully parsed packet exactly? Else software must."""
    if row[E_PROTO] == 6:
        # SYN, FIN and RST change the connection's life: software handles them
        return not f[F_FLAGS] & 0x07 and row[E_TCP_STATE] < N_STATES
    return True
