"""The PNIC engine's pipeline over one batch, compiled: parse, classify, look up, process.

One pass in packet order, as a SmartNIC pipeline would run it. A packet either is processed
here (verdict FORWARD or DROP with its Reason, frame rewritten in place, entry updated) or
punted (verdict -1 with its PuntReason, frame untouched); a punted hit also takes its entry out
of the index (returned[i] = slot) so that later packets of that flow in the batch miss and go
to software behind it. `punt_reason` is the one statement of when the engine punts.
"""

from __future__ import annotations

import numba
import numpy as np

from flowshift.tiers._pnic_flow import (
    E_EXPIRES,
    E_TCP_STATE,
    N_STATES,
    PROTO_TCP,
    TCP_LIFE,
    forward_hop,
    process_flow,
)
from flowshift.tiers._pnic_index import E_PROTO, E_SIZE, head_word, index_remove, lookup
from flowshift.tiers._pnic_mem import kernel, ld64, prefetch
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
    parse_frame,
)
from flowshift.verdict import PuntReason

PUNT = -1
PUNT_MISS = int(PuntReason.MISS)
PUNT_LIFE = int(PuntReason.LIFE)
PUNT_EXPIRED = int(PuntReason.EXPIRED)
PUNT_UNSUPPORTED = int(PuntReason.UNSUPPORTED)
FREE = 0  # a slot's state (tiers/entry_table.py): free, LIVE, or RETURNED (handed back)
LIVE = 1
RETURNED = 2
_SIGN = np.int64(-9223372036854775808)
AHEAD = 8  # frames between a prefetch and the frame's turn
OUTSIDE = -1  # process_batch: a selected frame lies outside buf
SCAN_MAX = 8  # classifier rows scanned in order; more are bisected (sorted: classifier_tables)


@kernel(private=True)
def _ule(a, b):
    """a <= b for int64 words read as unsigned."""
    return (a ^ _SIGN) <= (b ^ _SIGN)


@kernel(private=True)
def _before(family, hi, lo, row_family, row_hi, row_lo):
    """(family, hi, lo) < (row_family, row_hi, row_lo), the words read as unsigned."""
    if family != row_family:
        return family < row_family
    if hi != row_hi:
        return _ule(hi, row_hi)
    return lo != row_lo and _ule(lo, row_lo)


@kernel(private=True)
def _holds(j, family, hi, lo, inside):
    """Does row j of `inside` hold the address?"""
    if inside[j, 0] != family:
        return False
    r_hi, r_lo = inside[j, 1], inside[j, 2]
    t_hi, t_lo = inside[j, 3], inside[j, 4]
    above = (r_hi != hi and _ule(r_hi, hi)) or (r_hi == hi and _ule(r_lo, lo))
    below = (hi != t_hi and _ule(hi, t_hi)) or (hi == t_hi and _ule(lo, t_lo))
    return above and below


@kernel(private=True)
def _inside(family, hi, lo, inside):
    """Classifier._inside: the machine whose range holds the address, or -1.

    inside rows: (family, lo_hi, lo_lo, hi_hi, hi_lo, machine); IPv4 values in the low word;
    sorted by family and first address, disjoint (classifier_tables). A few rows are scanned;
    more are bisected: the last row that starts at or before the address is the only one that
    can hold it.
    """
    if family == 4:
        lo = (hi >> 32) & 0xFFFFFFFF
        hi = 0
    n = inside.shape[0]
    if n <= SCAN_MAX:
        for j in range(n):
            if _holds(j, family, hi, lo, inside):
                return inside[j, 5]
        return -1
    a, b = 0, n
    while a < b:
        mid = (a + b) >> 1
        if _before(family, hi, lo, inside[mid, 0], inside[mid, 1], inside[mid, 2]):
            b = mid
        else:
            a = mid + 1
    if a and _holds(a - 1, family, hi, lo, inside):
        return inside[a - 1, 5]
    return -1


@kernel()
def classify(f, inside, public):
    """Classifier.classify: (machine, 0 egress) for the source's machine, else (machine,
    1 ingress) for the public or inside destination's; machine -1: none.

    public rows: (family, address words hi, lo as in keys, machine), sorted: a few are
    scanned, more bisected.
    """
    family = f[F_FAMILY]
    m = _inside(family, f[F_SRC_HI], f[F_SRC_LO], inside)
    if m >= 0:
        return m, 0
    hi, lo = f[F_DST_HI], f[F_DST_LO]
    n = public.shape[0]
    a = 0
    if n > SCAN_MAX:
        b = n
        while a < b:
            mid = (a + b) >> 1
            if _before(public[mid, 0], public[mid, 1], public[mid, 2], family, hi, lo):
                a = mid + 1
            else:
                b = mid
    for j in range(a, n):
        if public[j, 0] == family and public[j, 1] == hi and public[j, 2] == lo:
            return public[j, 3], 1
        if n > SCAN_MAX:
            break  # the bisection's row is the only one that can match
    return _inside(family, hi, lo, inside), 1


@kernel()
def punt_reason(mem, e, f, full, now, life):
    """Why a hit goes to software with its entry (a PuntReason code), or 0: processed here.

    Expired first (software expires it exactly), then a TCP flag of `life` (the PNIC's
    TCP_LIFE: SYN, FIN or RST, the connection's life changes in software; the fast path's
    TCP_LIFE_SOFTWARE: a SYN), then what the engine does not run (`full` False: a header
    shape parsed for its key only; a TCP state byte out of range). A TCP packet's flags are
    parsed whenever its key is.
    """
    if ld64(mem, e + E_EXPIRES) <= now:
        return PUNT_EXPIRED
    if mem[e + E_PROTO] == PROTO_TCP:
        if f[F_FLAGS] & life:
            return PUNT_LIFE
        if mem[e + E_TCP_STATE] >= N_STATES:
            return PUNT_UNSUPPORTED
    if not full:
        return PUNT_UNSUPPORTED
    return 0


@kernel()
def process_batch(buf, offset, caplen, wire_len, linktype, ts, select, verdict, reason,
                  returned, machine, direction, mem, state, keys, vals, inside, public, knobs,
                  routing, f, punts):
    """Run the selected packets of a batch; (packets processed, entries returned), or
    (OUTSIDE, 0) with nothing touched when a selected frame does not lie inside buf.

    buf must be contiguous (the loads of _pnic_mem); mem is the cache's bytes, E_SIZE per slot;
    knobs: int64 rows, one per machine (zone), of conntrack_types.Knobs.row(); routing: int8,
    one per machine, 1 for a routing machine (its TTL is checked and decremented); f: N_FIELDS
    int64, the parser's field vector (kernels allocate nothing); punts: counts by PuntReason
    code, incremented.
    """
    n = len(select)
    size = len(buf)
    for i in range(n):  # the loads are unchecked: every frame first
        if select[i] and (offset[i] < 0 or offset[i] + caplen[i] > size):
            return OUTSIDE, 0
    processed = 0
    gone = 0
    for i in range(n):
        if i + AHEAD < n:
            # the headers of a later frame: a trace's frames are far apart, beyond the
            # hardware prefetcher's reach, and each would otherwise wait for memory (a hint
            # only: an unselected frame's offset may point anywhere, a prefetch never faults)
            at = offset[i + AHEAD]
            prefetch(buf, at)
            prefetch(buf, at + 63)
        if not select[i]:
            continue
        verdict[i] = PUNT
        returned[i] = -1
        s = offset[i]
        status = parse_frame(buf, s, numba.int64(caplen[i]), numba.int64(wire_len[i]),
                             numba.int64(linktype[i]), f)
        if status == FAIL:
            # not parsed as the reference parses it, or a shape never looked up (ICMP error,
            # non-first fragment, untracked protocol): software decides
            reason[i] = PUNT_UNSUPPORTED
            punts[PUNT_UNSUPPORTED] += 1
            continue
        m, d = classify(f, inside, public)
        hit = -1
        if m >= 0:
            hit = lookup(keys, vals,
                         head_word(f[F_FAMILY], f[F_PROTO], m, f[F_SPORT], f[F_DPORT]),
                         f[F_SRC_HI], f[F_SRC_LO], f[F_DST_HI], f[F_DST_LO])
        if hit < 0:
            reason[i] = PUNT_MISS
            punts[PUNT_MISS] += 1
            continue
        slot = hit >> 1
        e = slot * E_SIZE
        now = ts[i]
        why = punt_reason(mem, e, f, status == FULL, now, np.int64(TCP_LIFE))
        if why:
            index_remove(mem, slot, keys, vals)
            state[slot] = RETURNED
            returned[i] = slot
            reason[i] = why
            punts[why] += 1
            gone += 1
            continue
        v, r = process_flow(mem, e, hit & 1, buf, s, f, now, knobs, m)
        if routing[m]:
            v, r = forward_hop(buf, s, f, v, r)
        verdict[i] = v
        reason[i] = r
        machine[i] = m
        direction[i] = d
        processed += 1
    return processed, gone
