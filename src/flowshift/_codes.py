"""A batch's result codes grouped, compiled: what a replay counts each finished batch by.

`np.unique(codes, return_inverse=True)` sorts every packet's code: on a batch of 60,000 packets
with a few dozen distinct codes, most of a replay's bookkeeping. One pass over a small hash
table gives the same groups; only the distinct codes are sorted.
"""

from __future__ import annotations

import numpy as np

from flowshift.tiers._pnic_mem import cached

_EMPTY = -1


@cached(nogil=True)
def _group(codes, weights, slots, uniq, inverse, packets, octets):
    """Group codes (each >= 0) in first-seen order: uniq[:k], each packet's group in
    inverse, packets and summed weights per group; k. slots: a power-of-two hash table of
    group numbers, all _EMPTY, with room for every distinct code twice over."""
    mask = len(slots) - 1
    k = 0
    for i in range(len(codes)):
        c = codes[i]
        h = (c * -7046029254386353131) >> 40 & mask  # Fibonacci hashing
        while True:
            g = slots[h]
            if g == _EMPTY:
                g = k
                slots[h] = g
                uniq[g] = c
                packets[g] = 0
                octets[g] = 0
                k += 1
                break
            if uniq[g] == c:
                break
            h = (h + 1) & mask
        inverse[i] = g
        packets[g] += 1
        octets[g] += weights[i]
    return k


def group_codes(codes: np.ndarray, weights: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(uniq, inverse, packets, octets): the distinct codes sorted, each packet's index into
    them, and per code its packets and summed weights (np.unique with bincounts, the same
    arrays). codes: non-negative int64."""
    n = len(codes)
    slots = np.full(1 << max(4, (2 * n).bit_length()), _EMPTY, np.int64)
    uniq = np.empty(n, np.int64)
    inverse = np.empty(n, np.int64)
    packets = np.empty(n, np.int64)
    octets = np.empty(n, np.int64)
    k = _group(codes, weights.astype(np.int64, copy=False), slots, uniq, inverse, packets,
               octets)
    order = np.argsort(uniq[:k])
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    return uniq[:k][order], rank[inverse], packets[:k][order], octets[:k][order]
