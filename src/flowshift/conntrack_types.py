"""Connection-tracking facts shared by the trackers, the flow entry and the compiled engine.

Like Cilium's conntrack_types.h: the TCP states and the tracker's outcomes, the direction
indexes, the status bits, the per-direction TCP flags, the Linux default timeouts and knobs, and
the TCP part of a conntrack (`TcpDir`, `TcpConn`). The reference trackers
(services/conntrack*.py), the flow entry (entry.py) and the PNIC kernels (tiers/_pnic_*.py)
all take them from here, so none of them holds a copy. This module imports nothing of
flowshift: the entry layout must not depend on the services that use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum, IntFlag

from flowshift.flow import NS_PER_S

# -- directions (Linux IP_CT_DIR_*) ----------------------------------------------------------

ORIGINAL = 0  # as the flow's first packet travelled
REPLY = 1


class Status(IntFlag):
    """Conntrack status bits carried by the entry (Linux IPS_* meaning, own numbering)."""

    SEEN_REPLY = 1  # a packet was seen in the reply direction
    ASSURED = 2  # the flow is assured (TCP established handshake / UDP stream)
    NAT = 4  # the flow is translated (xlat differs from key)


# -- TCP -------------------------------------------------------------------------------------

class TcpState(IntEnum):
    """Linux enum tcp_conntrack (values as ctnetlink reports them)."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


N_TCP_STATES = len(TcpState)

# State-table sentinels (Linux sIV = TCP_CONNTRACK_MAX, sIG = TCP_CONNTRACK_IGNORE)
STATE_INVALID = 10
STATE_IGNORE = 11


class TcpAction(IntEnum):
    """What the TCP tracker decided about one packet."""

    ACCEPT = 0  # tracked: the conntrack was updated and its timeout refreshed
    INVALID = 1  # not part of the connection (Linux: ct state invalid); conntrack unchanged
    IGNORE = 2  # passes as part of the connection, but conntrack was not updated from it
    REOPEN = 3  # SYN on a closed conntrack: drop the entry and treat the packet as new


# Which flags matter for the state table (Linux get_conntrack_index): its row indexes
TCP_SYN_SET = 0
TCP_SYNACK_SET = 1
TCP_FIN_SET = 2
TCP_ACK_SET = 3
TCP_RST_SET = 4
TCP_NONE_SET = 5

# Per-direction flags (IP_CT_TCP_FLAG_*); the last two live in TcpConn.last_flags only
TCP_FLAG_WINDOW_SCALE = 0x01  # this side sent the window scale option
TCP_FLAG_SACK_PERM = 0x02  # this side sent SACK-permitted
TCP_FLAG_CLOSE_INIT = 0x04  # this side sent the first FIN
TCP_FLAG_BE_LIBERAL = 0x08  # window checks never fail for this side (mid-stream pickup)
TCP_FLAG_DATA_UNACKNOWLEDGED = 0x10  # this side has data the other has not acknowledged
TCP_FLAG_MAXACK_SET = 0x20  # TcpDir.maxack holds a value
TCP_FLAG_CHALLENGE_ACK = 0x40  # IP_CT_EXP_CHALLENGE_ACK: an RFC 5961 challenge ACK may come
TCP_FLAG_SIMULTANEOUS_OPEN = 0x80  # IP_CT_TCP_SIMULTANEOUS_OPEN

# Linux sysctl knobs: their defaults (a config's `[conntrack]` table changes them: Knobs)
NF_CT_TCP_BE_LIBERAL = False  # net.netfilter.nf_conntrack_tcp_be_liberal = 0
NF_CT_TCP_LOOSE = True  # nf_conntrack_tcp_loose = 1: pick up connections mid-stream
NF_CT_TCP_MAX_RETRANS = 3  # nf_conntrack_tcp_max_retrans
NF_CT_TCP_IGNORE_INVALID_RST = False  # nf_conntrack_tcp_ignore_invalid_rst = 0
# nf_conntrack_max: Linux sizes it from the machine's memory; 0 (which Linux also reads as no
# limit) keeps flowshift's table unbounded unless a config sets it
NF_CT_MAX = 0
NF_CT_EVICTION_RANGE = 8  # hash buckets Linux's early_drop scans from the new entry's

TCP_MAX_WSCALE = 14  # RFC 7323 cap Linux applies to the window scale option
MAXACKWINCONST = 66000  # floor of the lower bound for acceptable ACKs

# -- timeouts (ns; Linux defaults) -----------------------------------------------------------

SECOND = NS_PER_S

# Indexed by TcpState. NONE is never a target state; Linux fills its slot with SYN_SENT's.
TCP_TIMEOUTS_NS: tuple[int, ...] = (
    120 * SECOND,  # NONE
    120 * SECOND,  # SYN_SENT
    60 * SECOND,  # SYN_RECV
    5 * 24 * 3600 * SECOND,  # ESTABLISHED
    120 * SECOND,  # FIN_WAIT
    60 * SECOND,  # CLOSE_WAIT
    30 * SECOND,  # LAST_ACK
    120 * SECOND,  # TIME_WAIT
    10 * SECOND,  # CLOSE
    120 * SECOND,  # SYN_SENT2
)
TIMEOUT_RETRANS_NS = 300 * SECOND  # cap after max_retrans retransmissions or on a zero window
TIMEOUT_UNACK_NS = 300 * SECOND  # cap while data is unacknowledged

# nf_conntrack_proto_udp.c, nf_conntrack_proto_icmp.c, nf_conntrack_proto_icmpv6.c
UDP_TIMEOUT_UNREPLIED = 30 * SECOND
UDP_TIMEOUT_REPLIED = 120 * SECOND  # a stream: still active 2 s after the first packet
UDP_STREAM_AFTER = 2 * SECOND
ICMP_TIMEOUT = 30 * SECOND
ICMPV6_TIMEOUT = 30 * SECOND
GENERIC_TIMEOUT = 600 * SECOND  # nf_conntrack_generic_timeout: other protocols


# -- the knobs of one conntrack table (a machine's `[conntrack]`, resolved) -------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Knobs:
    """The net.netfilter.nf_conntrack_* sysctls a tracker follows; timeouts in ns.

    Defaults are Linux's (the constants above). `tcp_timeouts` is indexed by TcpState; only the
    states Linux has a sysctl for change (NONE and SYN_SENT2 keep their built-in values).
    """

    tcp_timeouts: tuple[int, ...] = TCP_TIMEOUTS_NS
    tcp_timeout_max_retrans: int = TIMEOUT_RETRANS_NS
    tcp_timeout_unacknowledged: int = TIMEOUT_UNACK_NS
    udp_timeout: int = UDP_TIMEOUT_UNREPLIED
    udp_timeout_stream: int = UDP_TIMEOUT_REPLIED
    icmp_timeout: int = ICMP_TIMEOUT
    icmpv6_timeout: int = ICMPV6_TIMEOUT
    generic_timeout: int = GENERIC_TIMEOUT
    tcp_loose: bool = NF_CT_TCP_LOOSE
    tcp_be_liberal: bool = NF_CT_TCP_BE_LIBERAL
    tcp_max_retrans: int = NF_CT_TCP_MAX_RETRANS
    tcp_ignore_invalid_rst: bool = NF_CT_TCP_IGNORE_INVALID_RST
    max: int = NF_CT_MAX  # entries the table holds at most (0: no limit); not in row()

    def row(self) -> tuple[int, ...]:
        """The knobs as the PNIC kernels read them: one int64 row, K_* indexes."""
        return (*self.tcp_timeouts, self.tcp_timeout_max_retrans,
                self.tcp_timeout_unacknowledged, self.udp_timeout, self.udp_timeout_stream,
                self.icmp_timeout, self.icmpv6_timeout, self.generic_timeout,
                self.tcp_max_retrans, int(self.tcp_be_liberal),
                int(self.tcp_ignore_invalid_rst))

    def min_timeout(self) -> int:
        """The shortest life any packet can give a flow (bounds the PNIC's next expiry)."""
        return min(t for t in (*self.tcp_timeouts, self.tcp_timeout_max_retrans,
                               self.tcp_timeout_unacknowledged, self.udp_timeout,
                               self.udp_timeout_stream, self.icmp_timeout, self.icmpv6_timeout,
                               self.generic_timeout) if t > 0)


DEFAULT_KNOBS = Knobs()

# Knobs.row() indexes (K_TCP + state: the timeout of a TCP state)
K_TCP = 0
K_RETRANS = K_TCP + N_TCP_STATES
K_UNACK = K_RETRANS + 1
K_UDP = K_UNACK + 1
K_UDP_STREAM = K_UDP + 1
K_ICMP = K_UDP_STREAM + 1
K_ICMPV6 = K_ICMP + 1
K_GENERIC = K_ICMPV6 + 1
K_MAX_RETRANS = K_GENERIC + 1
K_BE_LIBERAL = K_MAX_RETRANS + 1
K_IGNORE_INVALID_RST = K_BE_LIBERAL + 1
N_KNOBS = K_IGNORE_INVALID_RST + 1
assert len(DEFAULT_KNOBS.row()) == N_KNOBS


# -- the TCP part of a conntrack ---------------------------------------------------------------

@dataclass(slots=True)
class TcpDir:
    """Window tracking of one direction (Linux struct ip_ct_tcp_state); all u32 but scale/flags."""

    end: int = 0  # highest seq + len sent
    maxend: int = 0  # highest ack + window the other side advertised (right window edge)
    maxwin: int = 0  # largest window this side advertised (scaled); 0: not learned yet
    maxack: int = 0  # highest ack this side sent (valid with TCP_FLAG_MAXACK_SET)
    scale: int = 0  # window scale this side applies to the windows it sends (u8)
    flags: int = 0  # TCP_FLAG_* (u8)


def fresh_dirs() -> tuple[TcpDir, TcpDir]:
    return (TcpDir(), TcpDir())


@dataclass(slots=True)
class TcpConn:
    """The TCP part of a conntrack (Linux struct ip_ct_tcp) plus its IPS_SEEN_REPLY bit."""

    seen: tuple[TcpDir, TcpDir] = field(default_factory=fresh_dirs)  # by direction
    state: int = 0  # TcpState
    last_dir: int = 0  # direction of the last packet (u8)
    retrans: int = 0  # identical ACK-class packets in a row (u8)
    last_index: int = 0  # conntrack index of the last packet (TCP_*_SET, u8)
    last_seq: int = 0
    last_ack: int = 0
    last_end: int = 0
    last_win: int = 0  # raw window of the last packet (u16)
    last_wscale: int = 0  # window scale of an ignored SYN (u8)
    last_flags: int = 0  # options of an ignored SYN, CHALLENGE_ACK, SIMULTANEOUS_OPEN (u8)
    # The conntrack status bit IPS_SEEN_REPLY: a reply packet was tracked. Linux keeps it in
    # the generic conntrack; only the TCP tracker reads it, so it lives here.
    seen_reply: bool = False

    def copy(self) -> TcpConn:
        return replace(self, seen=(replace(self.seen[0]), replace(self.seen[1])))
