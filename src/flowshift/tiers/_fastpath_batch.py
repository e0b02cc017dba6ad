"""The software tiers' fast path over a batch, compiled: the PNIC pipeline's sibling.

The machine and VNIC tiers keep the established flows they own in a table of entries
(tiers/fastpath.py), and run their packets with the PNIC's own kernels: parse, classify, look
up, then the chain exactly as services/chain.py `process_flow` does. Unlike the PNIC's pass,
which may run ahead of software over a whole segment, this one runs the rows in input order
and stops at the first row software must see, so that every Python decision happens exactly
where it would in a run that never left Python. A miss whose flow needs no decision only
Python makes is opened here, and the pass goes on (tiers/_fastpath_open.py).

- STOP_SOFTWARE: the row is not ours (a miss that opens no flow here, a shape the kernels do
  not run, a flow of no machine): software decides it;
- STOP_PUNT: a hit that software must decide (a SYN, expired, unsupported): its entry
  leaves the table (`returned`) and software decides the row with it;
- STOP_TIME: the row lies at or after `stop_time`, when something else is due first (an
  answer of the PNIC): software takes the clock there;
- STOP_OFFER: the row was processed, and now the offload policy wants its flow (established,
  past the thresholds, past the VNIC's back-off for it): software considers the offer;
- STOP_RETURN: a row of a flow the PNIC owns, which the PNIC punted with its entry (a FIN, an
  RST, expired): the entry is out of the PNIC's index (`returned`), software takes it back
  and decides the row.

With the PNIC in this process (`pnic_on`), a miss of the table is looked up in the PNIC's
second cache too, and a hit there runs as the PNIC's pass would run it (its punts, its life,
counted as PNIC work): a flow that moved down mid-segment needs no second pass of the PNIC.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import register_jitable

from flowshift.conntrack_types import TcpState
from flowshift.entry import Tier
from flowshift.results import PENDING
from flowshift.tiers._fastpath_open import (
    E_CHAIN,
    E_OWNER,
    F_DIRECTION,
    F_MACHINE,
    LIVE,
    NOT_OPENED,
    Z_OPEN,
    Z_TIER,
    open_flow,
)
from flowshift.tiers._pnic_batch import AHEAD, FREE, classify, punt_reason
from flowshift.tiers._pnic_flow import (
    ASSURED,
    E_BYTES,
    E_EXPIRES,
    E_PACKETS,
    E_STATUS,
    E_TCP_STATE,
    PROTO_TCP,
    S_ESTABLISHED,
    SEEN_REPLY,
    TCP_LIFE,
    TCP_LIFE_SOFTWARE,
    TCP_SYN,
    forward_hop,
    process_flow,
    syn_answer,
)
from flowshift.tiers._pnic_index import (
    E_PROTO,
    E_SIZE,
    head_word,
    index_insert,
    index_remove,
    lookup,
)
from flowshift.tiers._pnic_mem import kernel, ld16, ld64, prefetch
from flowshift.tiers._pnic_parse import (
    F_DPORT,
    F_DST_HI,
    F_DST_LO,
    F_FAMILY,
    F_FLAGS,
    F_PROTO,
    F_SPORT,
    F_SRC_HI,
    F_SRC_LO,
    FAIL,
    FULL,
    KEY_ONLY,
    parse_frame,
)
from flowshift.verdict import PuntReason

RETURNED = 2
DONE = 0
STOP_SOFTWARE = 1
STOP_PUNT = 2
STOP_TIME = 3
STOP_OFFER = 4
STOP_RETURN = 5
PNIC_TIER = int(Tier.PNIC)  # a row the PNIC's entry ran is counted there
VNIC_TIER = int(Tier.VNIC)
# TCP states whose every packet but a SYN the kernels run (tcp_track), the SYN/ACK answering
# a SYN_SENT flow's SYN included: from the SYN on, through the close and its RSTs (a bit each)
CACHED_TCP_STATES = sum(1 << int(s) for s in (
    TcpState.SYN_SENT, TcpState.SYN_RECV, TcpState.ESTABLISHED, TcpState.FIN_WAIT,
    TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.TIME_WAIT, TcpState.CLOSE))
PUNT_LIFE = int(PuntReason.LIFE)
# what a pass did with the PNIC that software must hear of, in order: a note each of N_NOTE
# words (kind, batch row, this table's row, the PNIC's slot, the back-off taken back with it,
# the other note of a flow that moved down and came back in this pass or -1) (`shadows`: the
# entry as it was moved)
NOTE_TAKEN_BACK = 0  # an entry the PNIC punted at a FIN or RST came back to a row here
NOTE_OFFERED = 1  # an established flow moved from a row here to the PNIC
N_NOTE = 6
# pnic_ctl: what a pass may do with the PNIC's second cache: offers the VNIC may still make
# (room), the services the PNIC runs (chain bits), the cache's free slots
C_ROOM = 0
C_SUPPORTED = 1
C_NFREE = 2
# policy[0]: what the offload policy takes (offload.POLICIES order)
POLICY_NEVER = 0
POLICY_ALWAYS = 1
POLICY_ELEPHANT = 2
POLICY_ASK = 3  # a policy only Python can evaluate: ask after every established packet
AHEAD_MAX = 16  # rows misses_after looks at


@kernel(inline=True)
def _wanted(mem, e, policy):
    """offload.OffloadPolicy.wants for the entry at mem[e] (a protocol the PNIC runs)."""
    kind = policy[0]
    if kind == POLICY_NEVER:
        return False
    if mem[e + E_PROTO] == PROTO_TCP:
        if mem[e + E_TCP_STATE] != S_ESTABLISHED:
            return False
    elif not ld16(mem, e + E_STATUS) & SEEN_REPLY:
        return False
    if kind != POLICY_ELEPHANT:  # always, or ask Python
        return True
    packets = ld64(mem, e + E_PACKETS) + ld64(mem, e + E_PACKETS + 8)
    size = ld64(mem, e + E_BYTES) + ld64(mem, e + E_BYTES + 8)
    return packets >= policy[1] or size >= policy[2]


@kernel()
def _lookup(keys, vals, f):
    """slot * 2 + direction of the parsed packet's key (f, its machine set) in an index, or
    -1."""
    return lookup(keys, vals, head_word(f[F_FAMILY], f[F_PROTO], f[F_MACHINE], f[F_SPORT],
                                        f[F_DPORT]),
                  f[F_SRC_HI], f[F_SRC_LO], f[F_DST_HI], f[F_DST_LO])


NOT_OURS = -1  # what _find says of a row that is no machine's flow, or not parsed for a key
MISS = -2  # a miss, parsed whole (f holds every field, machine and direction)
MISS_PART = -3  # a miss parsed for its key only


@kernel()
def _find(buf, offset, caplen, wire_len, linktype, i, keys, vals, inside, public, f):
    """Parse and look up row i: (slot * 2 + direction) << 2 | parse status for a hit, else
    NOT_OURS, MISS or MISS_PART."""
    status = parse_frame(buf, offset[i], numba.int64(caplen[i]), numba.int64(wire_len[i]),
                         numba.int64(linktype[i]), f)
    if status == FAIL:
        return NOT_OURS
    m, d = classify(f, inside, public)
    if m < 0:
        return NOT_OURS
    f[F_MACHINE] = m
    f[F_DIRECTION] = d
    hit = _lookup(keys, vals, f)
    if hit < 0:
        return MISS if status == FULL else MISS_PART
    return (hit << 2) | status


@kernel()
def misses_after(buf, offset, caplen, wire_len, linktype, clock, rows, j, stop_time, verdict,
                 keys, vals, inside, public, zone, f, pnic_keys, pnic_vals, pnic_on):
    """How many rows after rows[j] are not hits of the table as it stands (before the first
    hit, of this table's or of the PNIC's with pnic_on, the first miss of a zone open to the
    pass, the first row decided already or the first row at or after stop_time): software can
    take them without asking the fast path again. A row that becomes a hit meanwhile (its flow
    cached by the rows before it) is still decided right, in Python. At most AHEAD_MAX: the
    host asks again whenever Python caches a flow, and a burst of new flows (each cached at
    its SYN) would otherwise be scanned to its end once per flow."""
    n = 0
    for k in range(j + 1, min(len(rows), j + 1 + AHEAD_MAX)):
        i = rows[k]
        if clock[i] >= stop_time or verdict[i] != PENDING:
            break
        hit = _find(buf, offset, caplen, wire_len, linktype, i, keys, vals, inside, public, f)
        if hit >= 0 or (hit == MISS and zone[f[F_MACHINE], Z_OPEN]):
            break
        if pnic_on and hit != NOT_OURS and _lookup(pnic_keys, pnic_vals, f) >= 0:
            break
        n += 1
    return n


def returned_backoff(total: int) -> int:
    """The packet count a flow the PNIC handed back must reach before it is offered again
    (`Vnic._on_return`; `total`: its packets so far): twice them, and one more."""
    return 2 * total + 1


_returned_backoff = register_jitable(returned_backoff)  # the same, in the kernels


@kernel()
def _take_back(pnic_mem, pe, mem, state, keys, vals, free, fstate, offer_at, shadow):
    """The entry at pnic_mem[pe] (punted at a FIN or RST, out of the PNIC's index) into a free
    row of this table, owned by the VNIC, indexed, with the VNIC's back-off for it as its offer
    threshold, as `Vnic._on_return` and `Fastpath.cache` leave it, its bytes kept in `shadow`
    (the row may be freed again later in the pass): the row, or -1 (a TCP state the table does
    not run, no free row, a key taken: software takes it back)."""
    tcp_state = pnic_mem[pe + E_TCP_STATE]  # a byte: shifting by 64 or more is undefined
    if tcp_state >= 64 or not (CACHED_TCP_STATES >> tcp_state) & 1 or fstate[0] == 0:
        return -1
    slot = free[fstate[0] - 1]
    if not _put_entry(pnic_mem, pe, mem, slot, keys, vals, VNIC_TIER):
        return -1
    fstate[0] -= 1
    state[slot] = LIVE
    e = slot * E_SIZE
    for b in range(E_SIZE):
        shadow[b] = mem[e + b]
    offer_at[slot] = _returned_backoff(ld64(mem, e + E_PACKETS) + ld64(mem, e + E_PACKETS + 8))
    return slot


@kernel()
def _put_entry(src, se, mem, slot, keys, vals, owner):
    """The entry at src[se] into `slot` of a table, owned by `owner`, both keys indexed: True,
    or False with the slot zeroed again when a key is taken (EntryTable.put)."""
    e = slot * E_SIZE
    for b in range(E_SIZE):
        mem[e + b] = src[se + b]
    mem[e + E_OWNER] = owner
    if index_insert(mem, slot, keys, vals):
        return True
    for b in range(E_SIZE):
        mem[e + b] = 0
    return False


@kernel()
def _note(notes, fstate, kind, i, row, pnic_slot, backoff):
    """One more note for the host (fstate[5] of them so far). An entry taken back from a slot
    this pass moved a flow into (the last note of that slot moved it: a slot holds one flow
    until it comes back) pairs the two notes."""
    k = fstate[5]
    notes[k, 0] = kind
    notes[k, 1] = i
    notes[k, 2] = row
    notes[k, 3] = pnic_slot
    notes[k, 4] = backoff
    notes[k, 5] = -1
    if kind == NOTE_TAKEN_BACK:
        for j in range(k - 1, -1, -1):
            if notes[j, 3] == pnic_slot:
                if notes[j, 0] == NOTE_OFFERED:
                    notes[j, 5] = k
                    notes[k, 5] = j
                break
    fstate[5] = k + 1


@kernel()
def _move_down(mem, slot, state, keys, vals, free, fstate, pnic_mem, pnic_state, pnic_keys,
               pnic_vals, pnic_free, pnic_ctl, shadow):
    """The entry in `slot` into a free slot of the PNIC's cache, owned by the PNIC and indexed
    (Pnic._offload), its row here freed (EntryTable.remove) and its bytes kept in `shadow`:
    the PNIC's slot, or -1 (no free slot, a key taken there: nothing changed)."""
    if pnic_ctl[C_NFREE] == 0:
        return -1
    down = pnic_free[pnic_ctl[C_NFREE] - 1]
    e = slot * E_SIZE
    if not _put_entry(mem, e, pnic_mem, down, pnic_keys, pnic_vals, PNIC_TIER):
        return -1
    for b in range(E_SIZE):
        shadow[b] = mem[e + b]
    pnic_ctl[C_NFREE] -= 1
    pnic_state[down] = LIVE
    index_remove(mem, slot, keys, vals)
    for b in range(E_SIZE):
        mem[e + b] = 0
    state[slot] = FREE
    free[fstate[0]] = slot
    fstate[0] += 1
    return down


@kernel()
def run_rows(buf, offset, caplen, wire_len, linktype, clock, rows, start, stop_time, verdict,
             reason, rule, returned, machine, direction, tier, mem, state, keys, vals, held_keys,
             held_vals, inside, public, knobs, routing, bounded, offer_at, policy, f, counts,
             zone, rules, ports, snat, free, fstate, opened, pnic_mem, pnic_state, pnic_keys,
             pnic_vals, pnic_punts, pnic_on, min_timeout, notes, shadows, pnic_free,
             pnic_ctl):
    """Run rows[start:] in order until one stops the pass: (position in rows, why, ahead).

    STOP_OFFER returns the position after the processed row; every other stop the row's own.
    returned[i]: the slot of the row that stopped the pass with STOP_PUNT or STOP_OFFER.
    ahead: after STOP_SOFTWARE, how many rows after it software may take too (misses_after).
    f: the parser's fields and two more.
    counts: per tier, packets and wire bytes processed (incremented). offer_at: per slot, the
    packet count below which an offer would be refused (the VNIC's back-off). bounded: per
    machine, 1 when its table has a limit (then only assured flows are offered, as
    Vnic.consider does).
    held_keys, held_vals: the keys Python holds, which a missed row opens no flow on.
    zone, rules, ports, snat: the chains as _fastpath_open.open_flow reads them; free, fstate,
    opened: the free rows and the rows opened (open_flow); fstate[2]: lowered to the earliest
    expiry a processed row left its entry with (an RST before any reply: its own time).
    pnic_mem, pnic_state, pnic_keys, pnic_vals, pnic_punts: the PNIC's second cache and its
    punt counts, whose rows run here when pnic_on (else never looked at); fstate[3]: lowered
    to the time of the first row the PNIC's entries ran; fstate[4]: the PuntReason of a
    STOP_RETURN. No entry of the PNIC a row ran expires before min_timeout after it: the pass
    stops there (STOP_TIME), since opening a flow at the VNIC from then on may need a sync.
    An entry the PNIC punts at a FIN or RST whose row this table runs comes back here instead
    of stopping the pass, as the VNIC takes it back and caches it (`_take_back`); a VNIC flow
    the policy wants moves to the PNIC's cache instead of stopping the pass, as the VNIC's
    offer and the PNIC's answer at latency 0 move it (`_move_down`), while pnic_ctl has room:
    notes[k] says what happened k-th (fstate[5] notes; when notes is full, the pass stops as it
    would without them), shadows[k] holds the entry moved as it was (as many rows as notes);
    pnic_free: the PNIC's free slots (pnic_ctl[C_NFREE] of them).
    """
    n = len(rows)
    for j in range(start, n):
        if j + AHEAD < n:  # a later frame's headers, as the PNIC's pass asks for them
            at = offset[rows[j + AHEAD]]
            prefetch(buf, at)
            prefetch(buf, at + 63)
        i = rows[j]
        if verdict[i] != PENDING:  # the PNIC's already: its flow moved down after rows was cut
            continue
        now = clock[i]
        if now >= stop_time:
            return j, STOP_TIME, 0
        hit = _find(buf, offset, caplen, wire_len, linktype, i, keys, vals, inside, public, f)
        # the row's entry: this table's, or with pnic_on the PNIC's (its life, its punts)
        pnic_row = False
        if hit < 0 and pnic_on and hit != NOT_OURS:
            phit = _lookup(pnic_keys, pnic_vals, f)
            if phit >= 0:
                pnic_row = True
                hit = (phit << 2) | (FULL if hit == MISS else KEY_ONLY)
        if hit < 0:
            if hit == MISS:
                v, r, k, slot = open_flow(buf, offset[i], f, now, mem, state, keys, vals,
                                          held_keys, held_vals, knobs, routing, zone, rules,
                                          ports, snat, free, fstate, offer_at, opened)
                if v != NOT_OPENED:
                    owner = zone[f[F_MACHINE], Z_TIER]
                    verdict[i] = v
                    reason[i] = r
                    rule[i] = k
                    machine[i] = f[F_MACHINE]
                    direction[i] = f[F_DIRECTION]
                    tier[i] = owner
                    counts[owner, 0] += 1
                    counts[owner, 1] += wire_len[i]
                    continue
            return j, STOP_SOFTWARE, misses_after(buf, offset, caplen, wire_len, linktype,
                                                  clock, rows, j, stop_time, verdict, keys, vals,
                                                  inside, public, zone, f, pnic_keys, pnic_vals,
                                                  pnic_on)
        status = hit & 3
        hit >>= 2
        m = f[F_MACHINE]
        d = f[F_DIRECTION]
        s = offset[i]
        slot = hit >> 1
        e = slot * E_SIZE
        rmem, rstate, rkeys, rvals = mem, state, keys, vals
        life = TCP_LIFE_SOFTWARE
        if pnic_row:
            rmem, rstate, rkeys, rvals = pnic_mem, pnic_state, pnic_keys, pnic_vals
            life = TCP_LIFE
        elif mem[e + E_PROTO] == PROTO_TCP and syn_answer(mem, e, hit & 1, f):
            life = 0  # the handshake's answer runs here too
        why = punt_reason(rmem, e, f, status == FULL, now, life)
        if why:
            index_remove(rmem, slot, rkeys, rvals)
            rstate[slot] = RETURNED
            returned[i] = slot
            if not pnic_row:
                return j, STOP_PUNT, 0
            pnic_punts[why] += 1
            back = -1
            if why == PUNT_LIFE and status == FULL and not f[F_FLAGS] & TCP_SYN and (
                    not bounded[m]) and fstate[5] < len(notes):
                back = _take_back(pnic_mem, e, mem, state, keys, vals, free, fstate, offer_at,
                                  shadows[fstate[5]])
            if back < 0:
                fstate[4] = why
                return j, STOP_RETURN, 0
            _note(notes, fstate, NOTE_TAKEN_BACK, i, back, slot, offer_at[back])
            pnic_row = False  # the row is this table's now, as software's after the return
            slot = back
            e = back * E_SIZE
            rmem = mem
        v, r = process_flow(rmem, e, hit & 1, buf, s, f, now, knobs, m)
        if routing[m]:
            v, r = forward_hop(buf, s, f, v, r)
        owner = PNIC_TIER if pnic_row else mem[e + E_OWNER]
        verdict[i] = v
        reason[i] = r
        machine[i] = m
        direction[i] = d
        tier[i] = owner
        counts[owner, 0] += 1
        counts[owner, 1] += wire_len[i]
        if pnic_row:
            if now < fstate[3]:
                fstate[3] = now
                stop_time = min(stop_time, now + min_timeout)
            continue
        expires = ld64(mem, e + E_EXPIRES)
        if expires < fstate[2]:
            fstate[2] = expires  # an RST before any reply: the entry expires now
        if _wanted(mem, e, policy) and (
                not bounded[m] or ld16(mem, e + E_STATUS) & ASSURED):
            total = ld64(mem, e + E_PACKETS) + ld64(mem, e + E_PACKETS + 8)
            if total >= offer_at[slot]:
                if (pnic_on and pnic_ctl[C_ROOM] > 0 and owner == VNIC_TIER
                        and not bounded[m] and policy[0] != POLICY_ASK
                        and fstate[5] < len(notes)
                        and not mem[e + E_CHAIN] & ~pnic_ctl[C_SUPPORTED]):
                    down = _move_down(mem, slot, state, keys, vals, free, fstate, pnic_mem,
                                      pnic_state, pnic_keys, pnic_vals, pnic_free, pnic_ctl,
                                      shadows[fstate[5]])
                    if down >= 0:
                        _note(notes, fstate, NOTE_OFFERED, i, slot, down, 0)
                        pnic_ctl[C_ROOM] -= 1
                        if now < fstate[3]:  # as a row the PNIC ran: no entry of it expires
                            fstate[3] = now  # before min_timeout from now
                            stop_time = min(stop_time, now + min_timeout)
                        continue
                returned[i] = slot
                return j + 1, STOP_OFFER, 0
    return n, DONE, 0


_M1 = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15: splitmix64's constants
_M2 = np.int64(-4658895280553007687)  # 0xBF58476D1CE4E5B9
_M3 = np.int64(-7723592293110705685)  # 0x94D049BB133111EB


@kernel()
def _mix(x):
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * _M2  # logical shifts of the 64-bit pattern
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * _M3
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


@kernel()
def pair_mark(proto, a_hi, a_lo, a_port, b_hi, b_lo, b_port):
    """A number for the two endpoints of a flow and its protocol, the same in both directions;
    never 0. Two flows may share one (a hash): it picks rows worth a look, not a flow."""
    x = _mix(_mix(a_hi * _M1 + a_lo) + a_port)
    y = _mix(_mix(b_hi * _M1 + b_lo) + b_port)
    if y < x:
        x, y = y, x
    return _mix(_mix(x * _M1 + y) + proto) | 1


@kernel()
def row_marks(buf, offset, caplen, wire_len, linktype, rows, start, out, f):
    """out[j] = pair_mark of row rows[j]'s endpoints, for j from start; 0 for a row the PNIC's
    parser does not take (never a PNIC row)."""
    for j in range(start, len(rows)):
        i = rows[j]
        status = parse_frame(buf, offset[i], numba.int64(caplen[i]), numba.int64(wire_len[i]),
                             numba.int64(linktype[i]), f)
        if status == FAIL:
            out[j] = 0
        else:
            out[j] = pair_mark(f[F_PROTO], f[F_SRC_HI], f[F_SRC_LO], f[F_SPORT], f[F_DST_HI],
                               f[F_DST_LO], f[F_DPORT])


@kernel()
def _key_mark(keys, k):
    """pair_mark of the key in row k of `keys` (index words, tiers/_pnic_index.py)."""
    head = keys[k, 0]
    return pair_mark((head >> 8) & 0xFF, keys[k, 1], keys[k, 2], (head >> 32) & 0xFFFF,
                     keys[k, 3], keys[k, 4], (head >> 48) & 0xFFFF)


@kernel()
def pick_rows(marks, rows, start, keys, wanted, verdict, out):
    """The undecided rows of rows[start:] whose mark is that of one of `keys` (index words,
    one key a row), into out in order; how many. marks[j]: row_marks of rows[j]; wanted: room
    for the keys' marks."""
    for k in range(len(keys)):
        wanted[k] = _key_mark(keys, k)
    n = 0
    for j in range(start, len(rows)):
        m = marks[j]
        for k in range(len(keys)):
            if wanted[k] == m:
                r = rows[j]
                if verdict[r] == PENDING:
                    out[n] = r
                    n += 1
                break
    return n


@kernel()
def pass_tally(select, verdict, tier, wire_len, pnic, done):
    """After a PNIC pass: done[i] = the selected row i was decided (tier[i] set to `pnic`);
    how many, and their wire bytes."""
    n = 0
    size = 0
    for i in range(len(select)):
        d = select[i] and verdict[i] != PENDING
        done[i] = d
        if d:
            tier[i] = pnic
            n += 1
            size += wire_len[i]
    return n, size


@kernel()
def expired_slots(mem, state, now, out):
    """Live slots whose entry has expired by `now`, into out; how many, and the earliest
    expiry of those still live (-1: none)."""
    n = 0
    earliest = np.int64(-1)
    for slot in range(len(state)):
        if state[slot] != LIVE:
            continue
        t = ld64(mem, slot * E_SIZE + E_EXPIRES)
        if t <= now:
            out[n] = slot
            n += 1
        elif earliest < 0 or t < earliest:
            earliest = t
    return n, earliest
