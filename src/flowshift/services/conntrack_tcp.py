"""TCP connection tracking with the semantics of Linux nf_conntrack (6.x, TCP protocol part).

The reference statement of how the firewall follows a TCP connection: the state machine
(`TCP_CONNTRACKS`), flag validation, the window tracking of both directions (`TcpDir`, Linux
`struct ip_ct_tcp_state`) and the timeout each accepted packet sets. The compiled PNIC engine
mirrors it bit for bit, so state is plain integers, sequence numbers are u32 with explicit
masks and the control flow follows Linux's step by step.

The sysctl knobs come as a `Knobs` (Linux's defaults unless a `[conntrack]` table sets them).
Left out because they do not apply to a packet model: checksums (verified by the parser's
caller), helpers and expectations, sequence adjustment (seqadj), SYN proxy, per-conntrack
timeout policies.

Use:
- a packet with no conntrack: `tcp_new(conn, pkt)`; if True, run the same packet through
  `tcp_packet(conn, 0, pkt, False)`, as Linux does, and keep the entry only if that accepts.
- a packet of a tracked conntrack: `tcp_packet(conn, direction, pkt, assured)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowshift.conntrack_types import (
    DEFAULT_KNOBS,
    MAXACKWINCONST,
    NF_CT_TCP_BE_LIBERAL,
    NF_CT_TCP_IGNORE_INVALID_RST,
    NF_CT_TCP_LOOSE,
    NF_CT_TCP_MAX_RETRANS,
    STATE_IGNORE,
    STATE_INVALID,
    TCP_ACK_SET,
    TCP_FIN_SET,
    TCP_FLAG_BE_LIBERAL,
    TCP_FLAG_CHALLENGE_ACK,
    TCP_FLAG_CLOSE_INIT,
    TCP_FLAG_DATA_UNACKNOWLEDGED,
    TCP_FLAG_MAXACK_SET,
    TCP_FLAG_SACK_PERM,
    TCP_FLAG_SIMULTANEOUS_OPEN,
    TCP_FLAG_WINDOW_SCALE,
    TCP_MAX_WSCALE,
    TCP_NONE_SET,
    TCP_RST_SET,
    TCP_SYN_SET,
    TCP_SYNACK_SET,
    TCP_TIMEOUTS_NS,
    TIMEOUT_RETRANS_NS,
    TIMEOUT_UNACK_NS,
    Knobs,
    TcpAction,
    TcpConn,
    TcpDir,
    TcpState,
    fresh_dirs,
)
from flowshift.packet.view import (
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    Packet,
)

__all__ = [  # the tracker, and the conntrack types its users have always taken from here
    "M32", "MAXACKWINCONST", "NF_CT_TCP_BE_LIBERAL", "NF_CT_TCP_IGNORE_INVALID_RST",
    "NF_CT_TCP_LOOSE", "NF_CT_TCP_MAX_RETRANS", "STATE_IGNORE", "STATE_INVALID", "TCP_ACK_SET",
    "TCP_CONNTRACKS", "TCP_FIN_SET", "TCP_FLAG_BE_LIBERAL", "TCP_FLAG_CHALLENGE_ACK",
    "TCP_FLAG_CLOSE_INIT", "TCP_FLAG_DATA_UNACKNOWLEDGED", "TCP_FLAG_MAXACK_SET",
    "TCP_FLAG_SACK_PERM", "TCP_FLAG_SIMULTANEOUS_OPEN", "TCP_FLAG_WINDOW_SCALE", "TCP_MAX_WSCALE",
    "TCP_NONE_SET", "TCP_RST_SET", "TCP_SYNACK_SET", "TCP_SYN_SET", "TCP_TIMEOUTS_NS",
    "TIMEOUT_DESTROY", "TIMEOUT_RETRANS_NS", "TIMEOUT_UNACK_NS", "TIMEOUT_UNCHANGED", "TcpAction",
    "TcpConn", "TcpDir", "TcpResult", "TcpState", "conntrack_index", "relearn", "seq_after",
    "tcp_new", "tcp_open",
    "tcp_packet", "tcp_valid_flags",
]

M32 = 0xFFFFFFFF


# The members as module globals: an enum attribute lookup costs ~70 ns, a global ~15 ns, and
# tcp_packet runs for every TCP packet.
_ACCEPT = TcpAction.ACCEPT
_INVALID = TcpAction.INVALID
_IGNORE = TcpAction.IGNORE
_REOPEN = TcpAction.REOPEN


# States as plain ints (conn.state holds one): int comparisons are cheaper than IntEnum ones
_NO = int(TcpState.NONE)
_SS = int(TcpState.SYN_SENT)
_SR = int(TcpState.SYN_RECV)
_ES = int(TcpState.ESTABLISHED)
_FW = int(TcpState.FIN_WAIT)
_CW = int(TcpState.CLOSE_WAIT)
_LA = int(TcpState.LAST_ACK)
_TW = int(TcpState.TIME_WAIT)
_CL = int(TcpState.CLOSE)
_S2 = int(TcpState.SYN_SENT2)
_IV = STATE_INVALID
_IG = STATE_IGNORE

# TCP_CONNTRACKS[direction][index][old state] -> new state, STATE_INVALID or STATE_IGNORE.
# Columns: NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT,
# CLOSE, SYN_SENT2.
TCP_CONNTRACKS: tuple[tuple[tuple[int, ...], ...], ...] = (
    (  # original direction
        (_SS, _SS, _IG, _IG, _IG, _IG, _IG, _SS, _SS, _S2),  # syn
        (_IV, _IV, _SR, _IV, _IV, _IV, _IV, _IV, _IV, _SR),  # syn/ack
        (_IV, _IV, _FW, _FW, _LA, _LA, _LA, _TW, _CL, _IV),  # fin
        (_ES, _IV, _ES, _ES, _CW, _CW, _TW, _TW, _CL, _IV),  # ack
        (_IV, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL),  # rst
        (_IV, _IV, _IV, _IV, _IV, _IV, _IV, _IV, _IV, _IV),  # none
    ),
    (  # reply direction
        (_IV, _S2, _IV, _IV, _IV, _IV, _IV, _SS, _IV, _S2),  # syn
        (_IV, _SR, _IG, _IG, _IG, _IG, _IG, _IG, _IG, _SR),  # syn/ack
        (_IV, _IV, _FW, _FW, _LA, _LA, _LA, _TW, _CL, _IV),  # fin
        (_IV, _IG, _SR, _ES, _CW, _CW, _TW, _TW, _CL, _IG),  # ack
        (_IV, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL, _CL),  # rst
        (_IV, _IV, _IV, _IV, _IV, _IV, _IV, _IV, _IV, _IV),  # none
    ),
)

TIMEOUT_UNCHANGED = -1  # TcpResult.timeout_ns: leave the conntrack's expiry as it is
TIMEOUT_DESTROY = 0  # TcpResult.timeout_ns: the conntrack is gone now (delete it)

# PSH, ECE and CWR never make a flag combination invalid
_CHECKED_FLAGS = TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | TCP_URG
_VALID_FLAGS = frozenset((
    TCP_SYN,
    TCP_SYN | TCP_URG,
    TCP_SYN | TCP_ACK,
    TCP_RST,
    TCP_RST | TCP_ACK,
    TCP_FIN | TCP_ACK,
    TCP_FIN | TCP_ACK | TCP_URG,
    TCP_ACK,
    TCP_ACK | TCP_URG,
))


@dataclass(slots=True)
class TcpResult:
    """What one packet did to its conntrack.

    timeout_ns, by action:
    - ACCEPT: > 0 the conntrack now expires timeout_ns after this packet; TIMEOUT_DESTROY:
      the conntrack is gone (an RST before any reply); TIMEOUT_UNCHANGED: keep the expiry (a
      retransmitted SYN before any reply must not keep the entry alive).
    - INVALID: TIMEOUT_UNCHANGED, or > 0: expire at the latest timeout_ns after this packet
      (an assured conntrack that sees an out-of-window FIN/RST after the other side's).
    - IGNORE, REOPEN: TIMEOUT_UNCHANGED.
    """

    action: TcpAction
    timeout_ns: int
    assured: bool  # the conntrack is (now) ASSURED


def _before(a: int, b: int) -> bool:
    """a is before b in u32 sequence space (Linux before(): (s32)(a - b) < 0)."""
    return ((a - b) & M32) >= 0x80000000


def _after(a: int, b: int) -> bool:
    return ((b - a) & M32) >= 0x80000000


def seq_after(a: int, b: int) -> bool:
    """Linux after(a, b) on u32 sequence numbers (NAT's reuse of a closing tuple uses it)."""
    return _after(a & M32, b & M32)


def tcp_valid_flags(flags: int) -> bool:
    """Linux tcp_error's table of acceptable SYN/ACK/FIN/RST/URG combinations."""
    return (flags & _CHECKED_FLAGS) in _VALID_FLAGS


def conntrack_index(flags: int) -> int:
    """The state-table row of a packet: RST wins over SYN, SYN over FIN, FIN over ACK."""
    if flags & TCP_RST:
        return TCP_RST_SET
    if flags & TCP_SYN:
        return TCP_SYNACK_SET if flags & TCP_ACK else TCP_SYN_SET
    if flags & TCP_FIN:
        return TCP_FIN_SET
    if flags & TCP_ACK:
        return TCP_ACK_SET
    return TCP_NONE_SET


def _segment_end(pkt: Packet) -> int:
    """seq + data length + 1 for SYN + 1 for FIN (the sequence space the segment uses)."""
    end = pkt.seq + pkt.payload_len
    if pkt.flags & TCP_SYN:
        end += 1
    if pkt.flags & TCP_FIN:
        end += 1
    return end & M32


def _has_options(pkt: Packet) -> bool:
    """The header carries options (the option fields cover packets built without tcp_hlen)."""
    return (
        pkt.tcp_hlen > 20
        or pkt.wscale >= 0
        or pkt.sack_perm
        or pkt.mss > 0
        or pkt.tsval >= 0
        or len(pkt.sack) > 0
    )


def _read_options(d: TcpDir, pkt: Packet) -> None:
    """Window scale and SACK-permitted of a SYN into d (Linux tcp_options)."""
    if not _has_options(pkt):
        return  # Linux returns before resetting anything when the header has no options
    d.scale = 0
    d.flags &= TCP_FLAG_BE_LIBERAL
    if pkt.sack_perm:
        d.flags |= TCP_FLAG_SACK_PERM
    if pkt.wscale >= 0:
        d.scale = min(pkt.wscale, TCP_MAX_WSCALE)
        d.flags |= TCP_FLAG_WINDOW_SCALE


def _highest_sack(pkt: Packet, ack: int) -> int:
    """The highest right edge of the SACK blocks if after ack, else ack (Linux tcp_sack)."""
    sack = ack
    for block in pkt.sack:
        right = block[1] & M32
        if _after(right, sack):
            sack = right
    return sack


def _state_reset(d: TcpDir) -> None:
    d.end = 0
    d.maxend = 0
    d.maxwin = 0
    d.maxack = 0
    d.scale = 0
    d.flags &= TCP_FLAG_BE_LIBERAL


def _init_sender(
    sender: TcpDir, receiver: TcpDir, pkt: Packet, end: int, win: int, direction: int
) -> None:
    """Learn a direction from its SYN or SYN/ACK."""
    sender.end = end
    sender.maxend = end
    sender.maxwin = win if win else 1
    _read_options(sender, pkt)
    # RFC 7323: scaling applies only when both SYNs carried the option
    both = sender.flags & receiver.flags & TCP_FLAG_WINDOW_SCALE
    if direction == 1 and not both:
        sender.scale = 0
        receiver.scale = 0


def _max_ack_window(sender: TcpDir) -> int:
    return sender.maxwin if sender.maxwin > MAXACKWINCONST else MAXACKWINCONST


def _lenient(sender: TcpDir, action: TcpAction, liberal: bool) -> TcpAction:
    """A failed window check: ACCEPT for a liberal sender (or tcp_be_liberal), else the given
    outcome."""
    if sender.flags & TCP_FLAG_BE_LIBERAL or liberal:
        return _ACCEPT
    return action


def _in_window(conn: TcpConn, direction: int, index: int, pkt: Packet,
               liberal: bool) -> TcpAction:
    """Linux tcp_in_window: check the segment against both directions' windows, then learn.
    liberal: nf_conntrack_tcp_be_liberal."""
    sender = conn.seen[direction]
    receiver = conn.seen[1 - direction]
    flags = pkt.flags
    seq = pkt.seq & M32
    ack = pkt.ack & M32
    win_raw = pkt.window & 0xFFFF
    win = win_raw
    end = _segment_end(pkt)
    sack = _highest_sack(pkt, ack) if pkt.sack and receiver.flags & TCP_FLAG_SACK_PERM else ack

    if sender.maxwin == 0:
        if flags & TCP_SYN:
            _init_sender(sender, receiver, pkt, end, win, direction)
            if not flags & TCP_ACK:
                return _ACCEPT  # simultaneous open: a SYN from the reply side
        else:
            # First packet seen from this side mid-stream: learn from it
            sender.end = end
            swin = (win << sender.scale) & M32
            sender.maxwin = swin if swin else 1
            sender.maxend = (end + sender.maxwin) & M32
            if receiver.maxwin == 0:
                # Nothing seen from the other side yet: let its checks III and IV pass
                receiver.end = sack
                receiver.maxend = sack
            elif sack == (receiver.end + 1) & M32:
                receiver.end = sack  # likely the answer to a keepalive
    elif (
        flags & TCP_SYN
        and _after(end, sender.end)
        and conn.state in (_SS, _SR)
    ):
        # A newer SYN (RFC 793 reinitialisation): learn this side again
        _init_sender(sender, receiver, pkt, end, win, direction)
        if direction == 1 and not flags & TCP_ACK:
            return _ACCEPT

    if not flags & TCP_ACK:
        ack = sack = receiver.end  # no ACK: pretend it acknowledges everything seen
    elif flags & TCP_RST and ack == 0:
        ack = sack = receiver.end  # stacks that send RST|ACK with a zero ack

    if flags & TCP_RST and seq == 0 and conn.state == _SS:
        seq = end = sender.end  # RST answering a SYN

    if not _before(seq, (sender.maxend + 1) & M32):
        # I: data starts beyond the receiver's window
        overshot = (end - sender.maxend + 1) & M32
        ack_ok = _after(sack, (receiver.end - _max_ack_window(sender) - 1) & M32)
        in_recv_win = receiver.maxwin != 0 and _after(end, (sender.end - receiver.maxwin - 1) & M32)
        if (
            in_recv_win
            and ack_ok
            and overshot <= receiver.maxwin
            and _before(sack, (receiver.end + 1) & M32)
        ):
            # A sender exceeding the window slightly: remember the data so its ACK passes III
            sender.end = end
            sender.flags |= TCP_FLAG_DATA_UNACKNOWLEDGED
            return _lenient(sender, _IGNORE, liberal)
        return _lenient(sender, _INVALID, liberal)
    if not _before(sack, (receiver.end + 1) & M32):
        return _lenient(sender, _INVALID, liberal)  # III: acknowledges data never seen
    if receiver.maxwin != 0 and not _after(end, (sender.end - receiver.maxwin - 1) & M32):
        return _lenient(sender, _IGNORE, liberal)  # II: retransmission of acknowledged data
    if not _after(sack, (receiver.end - _max_ack_window(sender) - 1) & M32):
        return _lenient(sender, _IGNORE, liberal)  # IV: very old ACK

    if not flags & TCP_SYN:
        win = (win << sender.scale) & M32  # windows in SYNs are never scaled

    swin = (win + sack - ack) & M32
    if sender.maxwin < swin:
        sender.maxwin = swin
    if _after(end, sender.end):
        sender.end = end
        sender.flags |= TCP_FLAG_DATA_UNACKNOWLEDGED
    if flags & TCP_ACK:
        if not sender.flags & TCP_FLAG_MAXACK_SET:
            sender.maxack = ack
            sender.flags |= TCP_FLAG_MAXACK_SET
        elif _after(ack, sender.maxack):
            sender.maxack = ack

    if receiver.maxwin != 0 and _after(end, sender.maxend):
        receiver.maxwin = (receiver.maxwin + end - sender.maxend) & M32
    right_edge = (sack + win) & M32
    if _after(right_edge, (receiver.maxend - 1) & M32):
        receiver.maxend = right_edge if win else (right_edge + 1) & M32
    if ack == receiver.end:
        receiver.flags &= ~TCP_FLAG_DATA_UNACKNOWLEDGED

    if index == TCP_ACK_SET:
        if (
            conn.last_dir == direction
            and conn.last_seq == seq
            and conn.last_ack == ack
            and conn.last_end == end
            and conn.last_win == win_raw
        ):
            conn.retrans = (conn.retrans + 1) & 0xFF
        else:
            conn.last_dir = direction
            conn.last_seq = seq
            conn.last_ack = ack
            conn.last_end = end
            conn.last_win = win_raw
            conn.retrans = 0
    return _ACCEPT


def _shrink_on_invalid(conn: TcpConn, direction: int, index: int, assured: bool,
                       unack: int) -> int:
    """An out-of-window FIN/RST answering the other side's FIN/RST caps an assured
    conntrack's remaining time at TIMEOUT_UNACK (Linux nf_tcp_handle_invalid)."""
    if not assured or index not in (TCP_RST_SET, TCP_FIN_SET):
        return TIMEOUT_UNCHANGED
    if conn.last_dir != direction and conn.last_index in (TCP_FIN_SET, TCP_RST_SET):
        return unack
    conn.last_index = index
    conn.last_dir = direction
    return TIMEOUT_UNCHANGED


def _note_ignored(conn: TcpConn, direction: int, index: int, old_state: int, pkt: Packet) -> None:
    """Remember an ignored packet so that the answer to it can resynchronise us."""
    conn.last_index = index
    conn.last_dir = direction
    conn.last_seq = pkt.seq & M32
    conn.last_end = _segment_end(pkt)
    conn.last_win = pkt.window & 0xFFFF
    if index == TCP_SYN_SET and direction == 0:
        # A SYN the two ends may agree on while we do not: keep its options
        opts = TcpDir()
        _read_options(opts, pkt)
        conn.last_flags = opts.flags  # WINDOW_SCALE and SACK_PERM at most
        conn.last_wscale = opts.scale
        if old_state == _LA:
            conn.last_flags |= TCP_FLAG_CHALLENGE_ACK
    if old_state == _SS and index == TCP_ACK_SET and direction == 1:
        conn.last_ack = pkt.ack & M32  # maybe a challenge ACK answering the SYN


def _resync(conn: TcpConn, direction: int) -> None:
    """A SYN/ACK answering the SYN we ignored: restart tracking from that SYN."""
    syn_side = conn.seen[conn.last_dir]
    syn_side.end = conn.last_end
    syn_side.maxend = conn.last_end
    syn_side.maxwin = conn.last_win if conn.last_win else 1
    syn_side.scale = conn.last_wscale
    conn.last_flags &= ~TCP_FLAG_CHALLENGE_ACK
    syn_side.flags = conn.last_flags
    _state_reset(conn.seen[direction])


# What the RST checks decided (Linux's CLOSE case in nf_conntrack_tcp_packet)
_RST_INVALID = 0
_RST_CHECK = 1  # go on to the window checks
_RST_KEEP_STATE = 2  # window checks, but stay in the old state (room for a challenge ACK)
_RST_TRUSTED = 3  # skip the window checks


def _rst_disposition(
    conn: TcpConn, direction: int, pkt: Packet, old_state: int, assured: bool, knobs: Knobs
) -> int:
    if old_state in (_FW, _LA, _TW, _CL, _CW):
        return _RST_TRUSTED  # closing: the tuple may be reused already, the data is stale
    seq = pkt.seq & M32
    ack = pkt.ack & M32
    peer = conn.seen[1 - direction]
    outcome = _RST_CHECK
    if peer.flags & TCP_FLAG_MAXACK_SET and conn.last_index != TCP_SYN_SET:
        established = old_state == _ES and assured
        if seq == 0 and not established:
            return _RST_CHECK  # likely answers a SYN we let through
        if _before(seq, peer.maxack) and not knobs.tcp_ignore_invalid_rst:
            return _RST_INVALID
        if not established or seq == peer.maxack:
            return _RST_CHECK
        if conn.last_index == TCP_ACK_SET and conn.last_dir == direction and seq == conn.last_end:
            return _RST_CHECK  # RST right after this side's last data
        outcome = _RST_KEEP_STATE
    if (
        (conn.seen_reply and conn.last_index == TCP_SYN_SET)
        or (not assured and conn.last_index == TCP_ACK_SET)
    ) and ack == conn.last_end:
        return _RST_TRUSTED  # answers a SYN or ACK we let through (ignored)
    if (
        old_state == _SS
        and conn.last_index == TCP_ACK_SET
        and conn.last_dir == 1
        and seq == conn.last_ack
    ):
        return _RST_TRUSTED  # answers a challenge ACK we let through
    return outcome


def _timeout(conn: TcpConn, index: int, new_state: int, knobs: Knobs) -> int:
    timeouts = knobs.tcp_timeouts
    retrans = knobs.tcp_timeout_max_retrans
    unack = knobs.tcp_timeout_unacknowledged
    state_timeout = timeouts[new_state]
    if conn.retrans >= knobs.tcp_max_retrans and state_timeout > retrans:
        return retrans
    if index == TCP_RST_SET:
        return timeouts[_CL]
    unacked = (conn.seen[0].flags | conn.seen[1].flags) & TCP_FLAG_DATA_UNACKNOWLEDGED
    if unacked and state_timeout > unack:
        return unack
    if conn.last_win == 0 and state_timeout > retrans:
        return retrans
    return state_timeout


def _done(
    conn: TcpConn, direction: int, action: TcpAction, timeout_ns: int, assured: bool
) -> TcpResult:
    if direction == 1 and action in (_ACCEPT, _IGNORE):
        conn.seen_reply = True  # Linux sets it for every reply packet the tracker passes
    return TcpResult(action, timeout_ns, assured)


def _forget_last(conn: TcpConn) -> None:
    """Clear the last-packet memory as a new conntrack has it."""
    conn.retrans = 0
    conn.last_dir = 0
    conn.last_index = TCP_NONE_SET
    conn.last_seq = 0
    conn.last_ack = 0
    conn.last_end = 0
    conn.last_win = 0
    conn.last_wscale = 0


def tcp_new(conn: TcpConn, pkt: Packet, knobs: Knobs = DEFAULT_KNOBS) -> bool:
    """May pkt create a conntrack? If so, initialise conn from it (Linux tcp_new).

    A SYN starts a tracked handshake; an ACK-class packet picks up a connection mid-stream
    (with knobs.tcp_loose, nf_conntrack_tcp_loose=1) with liberal window checks in both
    directions. conn's state
    stays NONE: run the same packet through tcp_packet(conn, 0, pkt, False) next.
    """
    flags = pkt.flags & 0xFF
    if not tcp_valid_flags(flags):
        return False
    new_state = TCP_CONNTRACKS[0][conntrack_index(flags)][_NO]
    if new_state >= STATE_INVALID:
        return False
    if new_state != _SS and not knobs.tcp_loose:
        return False
    conn.seen = fresh_dirs()
    conn.state = _NO
    conn.seen_reply = False
    conn.last_flags = 0
    _forget_last(conn)
    orig = conn.seen[0]
    orig.end = _segment_end(pkt)
    orig.maxwin = (pkt.window & 0xFFFF) or 1
    if new_state == _SS:
        orig.maxend = orig.end
        _read_options(orig, pkt)
    else:
        # Mid-stream: the scale is unknown, so both sides are checked liberally
        orig.maxend = (orig.end + orig.maxwin) & M32
        orig.flags = TCP_FLAG_SACK_PERM | TCP_FLAG_BE_LIBERAL
        conn.seen[1].flags = TCP_FLAG_SACK_PERM | TCP_FLAG_BE_LIBERAL
    return True


def tcp_open(conn: TcpConn, pkt: Packet, knobs: Knobs = DEFAULT_KNOBS) -> TcpResult | None:
    """`tcp_new`, then `tcp_packet(conn, 0, pkt, False, knobs)`: the packet that opens a
    conntrack, tracked. None when it may not open one.

    A plain SYN (NONE -> SYN_SENT) takes a short way with the same result: every check of
    tcp_in_window passes (its data starts within its own end, it acknowledges nothing, and
    nothing is seen from the reply side yet), and of the window learning only the reply
    side's right edge moves, to the SYN's window. tests/test_conntrack_tcp.py holds the two
    ways equal. A loose pick-up, or a length no parsed packet has, runs tcp_packet itself.
    """
    if not tcp_new(conn, pkt, knobs):
        return None
    if conntrack_index(pkt.flags & 0xFF) != TCP_SYN_SET or not 0 <= pkt.payload_len < 1 << 31:
        return tcp_packet(conn, 0, pkt, False, knobs)
    win = pkt.window & 0xFFFF
    conn.seen[1].maxend = win if win else 1
    conn.last_index = TCP_SYN_SET
    conn.last_dir = 0
    conn.state = _SS
    return TcpResult(_ACCEPT, _timeout(conn, TCP_SYN_SET, _SS, knobs), False)


def tcp_packet(conn: TcpConn, direction: int, pkt: Packet, assured: bool,
               knobs: Knobs = DEFAULT_KNOBS) -> TcpResult:
    """Track one packet of a conntrack (Linux nf_conntrack_tcp_packet).

    direction: 0 original, 1 reply. assured: the conntrack's ASSURED status before this
    packet. conn is updated in place; REOPEN leaves it as it was. knobs: the table's sysctls.
    """
    flags = pkt.flags & 0xFF
    if not tcp_valid_flags(flags):
        return TcpResult(_INVALID, TIMEOUT_UNCHANGED, assured)
    index = conntrack_index(flags)
    old_state = conn.state
    new_state = TCP_CONNTRACKS[direction][index][old_state]
    check_window = True

    if new_state == _SS and old_state >= _TW:
        # RFC 1122: a SYN may reopen a connection in TIME_WAIT. A closed or aborted
        # connection is replaced; otherwise the SYN is ignored like one mid-connection.
        closing = (conn.seen[0].flags | conn.seen[1].flags) & TCP_FLAG_CLOSE_INIT
        aborted_here = conn.last_dir == direction and conn.last_index == TCP_RST_SET
        if closing or aborted_here:
            return TcpResult(_REOPEN, TIMEOUT_UNCHANGED, assured)
        new_state = _IG

    if new_state == _IG:
        if (
            index == TCP_SYNACK_SET
            and conn.last_index == TCP_SYN_SET
            and conn.last_dir != direction
            and pkt.ack & M32 == conn.last_end
        ):
            _resync(conn, direction)
            old_state = _SS
            new_state = _SR
        else:
            _note_ignored(conn, direction, index, old_state, pkt)
            return _done(conn, direction, _IGNORE, TIMEOUT_UNCHANGED, assured)
    elif new_state == _IV:
        return TcpResult(_INVALID, TIMEOUT_UNCHANGED, assured)
    elif new_state == _TW:
        if (
            old_state == _LA
            and index == TCP_ACK_SET
            and conn.last_dir != direction
            and conn.last_index == TCP_SYN_SET
            and conn.last_flags & TCP_FLAG_CHALLENGE_ACK
        ):
            # RFC 5961 challenge ACK to a SYN: it does not acknowledge the last FIN
            conn.last_flags &= ~TCP_FLAG_CHALLENGE_ACK
            return _done(conn, direction, _IGNORE, TIMEOUT_UNCHANGED, assured)
    elif new_state == _S2:
        conn.last_flags |= TCP_FLAG_SIMULTANEOUS_OPEN
    elif new_state == _SR:
        if direction == 1 and index == TCP_ACK_SET and conn.last_flags & TCP_FLAG_SIMULTANEOUS_OPEN:
            new_state = _ES
    elif new_state == _CL and index == TCP_RST_SET:
        disposition = _rst_disposition(conn, direction, pkt, old_state, assured, knobs)
        if disposition == _RST_INVALID:
            return TcpResult(_INVALID, TIMEOUT_UNCHANGED, assured)
        if disposition == _RST_KEEP_STATE:
            new_state = old_state
        check_window = disposition != _RST_TRUSTED

    if check_window:
        action = _in_window(conn, direction, index, pkt, knobs.tcp_be_liberal)
        if action == _IGNORE:
            return _done(conn, direction, _IGNORE, TIMEOUT_UNCHANGED, assured)
        if action == _INVALID:
            cap = _shrink_on_invalid(conn, direction, index, assured,
                                     knobs.tcp_timeout_unacknowledged)
            return TcpResult(_INVALID, cap, assured)

    conn.last_index = index
    conn.last_dir = direction
    conn.state = new_state
    if old_state != new_state and new_state == _FW:
        conn.seen[direction].flags |= TCP_FLAG_CLOSE_INIT

    timeout = _timeout(conn, index, new_state, knobs)
    if not conn.seen_reply:
        if flags & TCP_RST:
            return TcpResult(_ACCEPT, TIMEOUT_DESTROY, assured)  # only answer: RST
        if index == TCP_SYN_SET and old_state == _SS:
            timeout = TIMEOUT_UNCHANGED  # SYN retransmissions must not keep the entry alive
        elif new_state == _ES and timeout > knobs.tcp_timeout_unacknowledged:
            timeout = knobs.tcp_timeout_unacknowledged  # picked up mid-stream, no answer yet
    elif not assured and old_state in (_SR, _ES) and new_state == _ES:
        assured = True  # an ACK completing the handshake, or answering a picked-up flow
    return _done(conn, direction, _ACCEPT, timeout, assured)


def relearn(conn: TcpConn) -> None:
    """Forget the window data after state loss (PNIC crash): both directions are learned
    again from their next packets, liberally, as after a mid-stream pickup.

    State, window scales, negotiated options and who closed first are kept; a liberal
    direction never fails a window check, so no in-window packet is dropped.
    """
    for d in conn.seen:
        kept = d.flags & (TCP_FLAG_WINDOW_SCALE | TCP_FLAG_CLOSE_INIT)
        d.end = 0
        d.maxend = 0
        d.maxwin = 0
        d.maxack = 0
        d.flags = kept | TCP_FLAG_SACK_PERM | TCP_FLAG_BE_LIBERAL
    _forget_last(conn)
    conn.last_flags &= TCP_FLAG_SIMULTANEOUS_OPEN
