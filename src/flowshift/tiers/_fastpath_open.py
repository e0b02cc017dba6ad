"""The first packet of a flow, compiled: the slow path's common case, for the fast path.

Open vSwitch's slow path installs a flow and its datapath runs the rest; here the software
tiers' fast path (tiers/_fastpath_batch.py) also opens the flows whose first packet needs no
decision only Python can make, so that a connection's packets, its first included, never
leave compiled code. A missed row opens a flow here when all of this holds, and is left to
Python (untouched, exactly as before) otherwise:

- its zone is open (tiers/open_tables.py: the host says so before each pass): its table has
  no limit (nothing to sweep or early-drop), and, at the VNIC, the row comes before any
  answer of the PNIC is due or any PNIC entry may have expired (a sync would do nothing);
- neither key of the new flow is a key of a flow Python holds (the index of those keys,
  tiers/fastpath.py `hold`: a miss of both indexes is a miss of the table), the PNIC's
  shadows at the VNIC included;
- it is a TCP SYN without ACK, FIN or RST (Linux tcp_new's SYN_SENT, as conntrack_tcp.tcp_open
  takes its short way), a UDP datagram or an ICMP / ICMPv6 echo request, parsed whole, of a
  chain with services;
- egress, or ingress of a chain without DNAT rules or a load balancer;
- a routing machine's packet arrives with a TTL / hop limit above 1;
- NAT, if any, keeps the source port: the first source rule that matches translates to one
  address and the port lies in the rule's range, and the translated tuple's reply is free
  (nat_alloc.allocate's steps 1 and 2; its search hashes with BLAKE2b, Python's);
- no key of the new flow is in the index, and a row is free.

The chain's order is services/chain.py `_decide_new`'s: the firewall's rules judge the
machine-side tuple (a drop opens nothing), then SNAT, then the conntrack is created, counted
and the packet translated. A flow opened here is cached at once, as Python caches it after
deciding its first packet (tiers/fastpath.py `admit`): its row is the bytes `Flow.to_bytes`
gives that flow. tests/test_fastpath_open.py holds every case against the reference engine.
"""

from __future__ import annotations

import numba
import numpy as np

from flowshift.conntrack_types import UDP_STREAM_AFTER, Status
from flowshift.entry import field_offsets
from flowshift.flow import EGRESS, PROTO_ICMP, PROTO_ICMPV6
from flowshift.packet.parse import ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST
from flowshift.packet.view import TCP_URG
from flowshift.tiers._pnic_flow import (
    DROP,
    E_BYTES,
    E_EXPIRES,
    E_LAST_SEEN,
    E_PACKETS,
    E_STATUS,
    E_STREAM_TS,
    FORWARD,
    HOP_LIMIT_AT_IPV6,
    K_ICMP,
    K_ICMPV6,
    K_UDP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_CHECKED,
    TCP_SYN,
    TTL_AT_IPV4,
    forward_hop,
    syn_open,
    translate,
)
from flowshift.tiers._pnic_index import (
    E_DPORT,
    E_DST,
    E_FAMILY,
    E_PROTO,
    E_SIZE,
    E_SPORT,
    E_SRC,
    E_XDPORT,
    E_XDST,
    E_XSPORT,
    E_XSRC,
    E_ZONE,
    EMPTY,
    head_word,
    index_insert,
    lookup,
)
from flowshift.tiers._pnic_mem import kernel, st16, st64
from flowshift.tiers._pnic_parse import (
    F_DPORT,
    F_DST_HI,
    F_DST_LO,
    F_ECHO,
    F_FAMILY,
    F_FLAGS,
    F_L3,
    F_L4,
    F_PROTO,
    F_SPORT,
    F_SRC_HI,
    F_SRC_LO,
    F_TOTAL,
    N_FIELDS,
)
from flowshift.verdict import Reason

_FIELDS = field_offsets()
E_MACHINE = _FIELDS["machine"]
E_CHAIN = _FIELDS["chain"]
E_OWNER = _FIELDS["owner"]
E_RULE = _FIELDS["rule"]
E_BACKEND = _FIELDS["backend"]
E_CREATED = _FIELDS["created"]

NAT = int(Status.NAT)
RULE = int(Reason.RULE)
DEFAULT = int(Reason.DEFAULT)
LIVE = 1  # a row in use (tiers/fastpath.py)
F_MACHINE = N_FIELDS  # where the fast path's lookup leaves the machine and direction (f has
F_DIRECTION = N_FIELDS + 1  # room)
NOT_OPENED = -1  # open_flow's verdict for a row it leaves to Python

# zone[z, ...]: one row per machine (zone), built by open_tables.zone_table
Z_OPEN = 0  # 1: the host lets this pass open flows of the zone (set before each pass)
Z_TIER = 1  # the tier that owns the zone's flows (their entries' owner)
Z_OFFER_AT = 2  # a new flow's offer_at (tiers/fastpath.py `cache`)
Z_SERVICES = 3  # the chain's service bits (entry.Service)
Z_FIREWALL = 4  # 1: the chain runs a firewall
Z_DEFAULT_ALLOW = 5
Z_SNAT = 6  # 1: egress flows meet the NAT's source rules
Z_INGRESS_SOFTWARE = 7  # 1: DNAT rules or a load balancer choose ingress flows' destination
Z_RULES = 8  # [Z_RULES + 2 * group, + 1]: the group's rows of `rules`, group = direction * 2
#            + (family == 6), in the firewall's order
Z_SNAT_ROWS = 16  # [Z_SNAT_ROWS, + 1]: the zone's rows of `snat`
Z_UNTIL = 18  # rows at or after this trace time open nothing (the VNIC's sync would act)
Z_N = 19

# rules[k, ...]: one firewall rule of one group; addresses as two words, the sign bit
# flipped so that signed comparison orders them as unsigned numbers
R_INDEX = 0
R_ALLOW = 1
R_PROTO = 2  # 0: any
R_SRC = 3  # lo hi word, lo lo word, hi hi word, hi lo word
R_DST = 7
R_PORTS = 11  # [R_PORTS, + 1]: the rule's rows of `ports` (inclusive ranges of dport)
R_ANY_PORT = 13  # 1: no port match
R_ICMP = 14  # 1: the rule matches ICMP types only, those of R_TYPES
R_TYPES = 15  # [R_TYPES, + 4]: the ICMP types, a 256-bit mask (type t: bit t % 64 of word t // 64)
R_N = 19

# snat[k, ...]: one source rule of the NAT, in order; words as the parser reads them
S_LEN = 0  # address length: 4 or 16
S_NET = 1  # network's two words
S_MASK = 3  # netmask's two words
S_TO = 5  # the address translated to (its two words), when S_ONE
S_ONE = 7  # 1: the rule translates to a single address
S_PORT_LO = 8  # the port range; -1: none
S_PORT_HI = 9
S_N = 10

_FLIP = np.int64(-9223372036854775808)  # the sign bit
_M64 = np.int64(-1)


@kernel(private=True)
def _within(hi, lo, rule, k, at):
    """Is the address (hi, lo) (sign bits flipped) inside rule k's range at column `at`?"""
    if hi < rule[k, at] or (hi == rule[k, at] and lo < rule[k, at + 1]):
        return False
    return not (hi > rule[k, at + 2] or (hi == rule[k, at + 2] and lo > rule[k, at + 3]))


@kernel(private=True)
def decide(rules, ports, lo, hi, proto, icmp_type, f, default_allow):
    """rules.RuleSet.decide for a TCP or UDP packet (icmp_type -1) or an ICMP / ICMPv6 one, over
    rules[lo:hi] (one group): (allowed, the deciding rule's index or -1 for the default)."""
    s_hi = f[F_SRC_HI] ^ _FLIP
    s_lo = f[F_SRC_LO] ^ _FLIP
    d_hi = f[F_DST_HI] ^ _FLIP
    d_lo = f[F_DST_LO] ^ _FLIP
    dport = f[F_DPORT]
    for k in range(lo, hi):
        rproto = rules[k, R_PROTO]
        if rproto and rproto != proto:
            continue
        if rules[k, R_ICMP] and (icmp_type < 0 or not (
                rules[k, R_TYPES + (icmp_type >> 6)] >> (icmp_type & 63)) & 1):
            continue  # ICMP types: never a TCP or UDP packet's
        if not (_within(s_hi, s_lo, rules, k, np.int64(R_SRC))
                and _within(d_hi, d_lo, rules, k, np.int64(R_DST))):
            continue
        if not rules[k, R_ANY_PORT]:
            if icmp_type >= 0:
                continue  # ports: TCP and UDP only
            hit = False
            for p in range(rules[k, R_PORTS], rules[k, R_PORTS + 1]):
                if ports[p, 0] <= dport <= ports[p, 1]:
                    hit = True
                    break
            if not hit:
                continue
        return rules[k, R_ALLOW] != 0, rules[k, R_INDEX]
    return default_allow != 0, np.int64(-1)


@kernel(private=True)
def _put_addr(mem, at, hi, lo, n):
    """An address of n (4 or 16) bytes from its two big-endian words into mem[at:]."""
    for k in range(n if n < 8 else 8):
        mem[at + k] = (hi >> (56 - 8 * k)) & 0xFF
    for k in range(n - 8 if n > 8 else 0):
        mem[at + 8 + k] = (lo >> (56 - 8 * k)) & 0xFF


@kernel(private=True)
def _taken(keys, vals, family, proto, z, s_hi, s_lo, d_hi, d_lo, sport, dport):
    """Does the index hold this key (any flow's, live or not)?"""
    return lookup(keys, vals, head_word(family, proto, z, sport, dport), s_hi, s_lo, d_hi,
                  d_lo) != EMPTY


@kernel(inline=False, private=True)
def open_flow(buf, s, f, now, mem, state, keys, vals, held_keys, held_vals, knobs, routing,
              zone, rules, ports, snat, free, fstate, offer_at, opened):
    """Open the flow of the missed row at buf[s:] (f: its fields, its machine and direction
    from `_find`): (verdict, reason, rule, slot). NOT_OPENED: nothing was touched, Python
    decides it; slot -1: the packet was decided and opened no flow (a firewall drop).
    held_keys, held_vals: an index of the keys Python holds (tiers/fastpath.py `hold`).
    fstate[0]: free rows left on the stack `free`; fstate[1]: rows opened so far, listed in
    `opened` (zone << 32 | row)."""
    m = f[F_MACHINE]
    d = f[F_DIRECTION]
    nothing = (NOT_OPENED, 0, np.int64(-1), np.int64(-1))
    if not zone[m, Z_OPEN] or not zone[m, Z_SERVICES] or now >= zone[m, Z_UNTIL]:
        return nothing
    if _taken(held_keys, held_vals, f[F_FAMILY], f[F_PROTO], m, f[F_SRC_HI], f[F_SRC_LO],
              f[F_DST_HI], f[F_DST_LO], f[F_SPORT], f[F_DPORT]):
        return nothing  # a flow Python holds: the row is its packet
    proto = f[F_PROTO]
    icmp_type = np.int64(-1)
    if proto == PROTO_TCP:
        flags = f[F_FLAGS] & TCP_CHECKED
        if flags != TCP_SYN and flags != TCP_SYN | TCP_URG:
            return nothing
    elif proto in (PROTO_ICMP, PROTO_ICMPV6):
        icmp_type = numba.int64(buf[s + f[F_L4]])
        if not f[F_ECHO] or icmp_type != (ICMP_ECHO_REQUEST if proto == PROTO_ICMP
                                          else ICMPV6_ECHO_REQUEST):
            return nothing  # a reply or another type: untracked, Python's
    elif proto != PROTO_UDP:
        return nothing
    family = f[F_FAMILY]
    if routing[m] and buf[s + f[F_L3] + (TTL_AT_IPV4 if family == 4 else HOP_LIMIT_AT_IPV6)] <= 1:
        return nothing  # Linux drops it after conntrack made the flow: Python unmakes it
    if d != EGRESS and zone[m, Z_INGRESS_SOFTWARE]:
        return nothing
    rule = np.int64(-1)
    if zone[m, Z_FIREWALL]:
        group = Z_RULES + 2 * (2 * d + (1 if family == 6 else 0))
        allowed, rule = decide(rules, ports, zone[m, group], zone[m, group + 1], proto,
                               icmp_type, f, zone[m, Z_DEFAULT_ALLOW])
        if not allowed:
            return DROP, RULE if rule >= 0 else DEFAULT, rule, np.int64(-1)
    s_hi, s_lo, d_hi, d_lo = f[F_SRC_HI], f[F_SRC_LO], f[F_DST_HI], f[F_DST_LO]
    sport, dport = f[F_SPORT], f[F_DPORT]
    x_hi, x_lo = s_hi, s_lo  # the source as the flow leaves
    n = 4 if family == 4 else 16
    if d == EGRESS and zone[m, Z_SNAT]:
        for k in range(zone[m, Z_SNAT_ROWS], zone[m, Z_SNAT_ROWS + 1]):
            if (snat[k, S_LEN] != n or s_hi & snat[k, S_MASK] != snat[k, S_NET]
                    or s_lo & snat[k, S_MASK + 1] != snat[k, S_NET + 1]):
                continue
            # nat_alloc.allocate, steps 1 and 2 at once for one address: keep the port
            if not snat[k, S_ONE]:
                return nothing  # the address is picked by a hash: Python's
            lo_port = snat[k, S_PORT_LO]
            if lo_port >= 0 and not lo_port <= sport <= snat[k, S_PORT_HI]:
                return nothing  # a search of the range: Python's
            x_hi, x_lo = snat[k, S_TO], snat[k, S_TO + 1]
            break
    # the reply key must be free (NAT's nf_nat_used_tuple; without NAT, the index's own
    # rule), and the flow's two keys two
    if d_hi == x_hi and d_lo == x_lo and dport == sport:
        return nothing
    if _taken(keys, vals, family, proto, m, d_hi, d_lo, x_hi, x_lo, dport, sport) or _taken(
            held_keys, held_vals, family, proto, m, d_hi, d_lo, x_hi, x_lo, dport, sport):
        return nothing
    if fstate[0] == 0:
        return nothing  # no row free: Python's cache grows the table
    slot = free[fstate[0] - 1]
    e = slot * E_SIZE
    for b in range(E_SIZE):
        mem[e + b] = 0
    mem[e + E_FAMILY] = family
    mem[e + E_PROTO] = proto
    st16(mem, e + E_ZONE, m)
    st16(mem, e + E_SPORT, sport)
    st16(mem, e + E_DPORT, dport)
    _put_addr(mem, e + E_SRC, s_hi, s_lo, n)
    _put_addr(mem, e + E_DST, d_hi, d_lo, n)
    _put_addr(mem, e + E_XSRC, x_hi, x_lo, n)
    _put_addr(mem, e + E_XDST, d_hi, d_lo, n)
    st16(mem, e + E_XSPORT, sport)
    st16(mem, e + E_XDPORT, dport)
    st16(mem, e + E_MACHINE, m)
    mem[e + E_CHAIN] = zone[m, Z_SERVICES]
    mem[e + E_OWNER] = zone[m, Z_TIER]
    st16(mem, e + E_RULE, rule)
    st16(mem, e + E_BACKEND, -1)
    if x_hi != s_hi or x_lo != s_lo:
        st16(mem, e + E_STATUS, NAT)
    if proto == PROTO_TCP:
        timeout = syn_open(mem, e, f, knobs, m)
        if timeout <= 0:  # a knob of 0: Python drops it as INVALID
            for b in range(E_SIZE):
                mem[e + b] = 0
            return nothing
    elif proto == PROTO_UDP:
        timeout = knobs[m, K_UDP]  # conntrack.udp_update: no reply seen
    else:
        timeout = knobs[m, K_ICMP if proto == PROTO_ICMP else K_ICMPV6]  # icmp_update
    if not index_insert(mem, slot, keys, vals):
        for b in range(E_SIZE):
            mem[e + b] = 0
        return nothing
    fstate[0] -= 1
    st64(mem, e + E_CREATED, now)
    st64(mem, e + E_LAST_SEEN, now)
    st64(mem, e + E_EXPIRES, now + timeout)
    st64(mem, e + E_STREAM_TS, now + UDP_STREAM_AFTER)
    st64(mem, e + E_PACKETS, 1)
    st64(mem, e + E_BYTES, f[F_TOTAL])
    state[slot] = LIVE
    offer_at[slot] = zone[m, Z_OFFER_AT]
    opened[fstate[1]] = (m << 32) | slot  # the zone too: the row may be freed in the pass
    fstate[1] += 1
    reason = RULE if rule >= 0 else DEFAULT
    translate(mem, e, np.int64(0), buf, s, f)
    verdict = np.int64(FORWARD)
    if routing[m]:
        verdict, reason = forward_hop(buf, s, f, verdict, reason)
    return verdict, reason, rule, slot
