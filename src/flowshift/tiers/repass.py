"""The rows another PNIC pass should see after flows moved down to the PNIC mid-segment.

A segment meets the PNIC first (Host._pnic_first); the rows it leaves are software's. When a
flow's offload is acknowledged, its later rows in the segment are the PNIC's work: rather than
send every row left through the PNIC again (a pass per offload, each as long as what is left),
only the rows whose endpoints are those of a flow that moved go back to it. A row's endpoints
are hashed once per segment (`row_marks`, with the PNIC's own parser), a flow's from its
original and its translated key: a reply arrives with the translated tuple reversed. Two flows
may share a mark; the PNIC decides only the rows it owns, and any row it leaves is software's,
which passes a PNIC-owned flow's packet to the PNIC anyway: the pick changes what the work
costs, never its outcome.
"""

from __future__ import annotations

import numpy as np

from flowshift.entry import Flow
from flowshift.flow import FlowKey
from flowshift.results import BatchResults
from flowshift.tiers import _fastpath_batch as kb
from flowshift.tiers._pnic_index import key_words
from flowshift.tiers._pnic_parse import N_FIELDS
from flowshift.tiers.pnic_engine import kernel_arg


def key_mark(key: FlowKey) -> int:
    """The mark of a flow key's endpoints (row_marks' of its packets, either direction)."""
    _, s_hi, s_lo, d_hi, d_lo = key_words(key)
    return int(kb.pair_mark(key.proto, s_hi, s_lo, key.sport, d_hi, d_lo, key.dport))


class Repass:
    """Row marks of the current segment, computed when a flow first moves down in it: a pick
    scans the marks of the rows left, a compare each, and parses nothing again."""

    def __init__(self) -> None:
        self._f = np.zeros(N_FIELDS + 2, np.int64)
        self._marks = np.zeros(0, np.int64)  # the mark of each row left at the first pick
        self._rows = np.zeros(0, np.int64)  # those rows
        self._out = np.zeros(0, np.int64)  # a pick's rows
        self._known = False

    def begin(self) -> None:
        """A new segment (or a full pass over what is left of one)."""
        self._known = False

    def pick(self, res: BatchResults, rows: np.ndarray, at: int, flows: list[Flow]
             ) -> np.ndarray:
        """The undecided rows of rows[at:] whose endpoints are those of one of `flows`, in
        order. rows[at:] is what is left of the rows of the first pick since `begin`."""
        left = rows[at:]
        if not len(left) or not flows:
            return left[:0]
        if not self._known:  # every row left in the segment, once
            self._marks = np.empty(len(left), np.int64)
            kb.row_marks(res.buf, kernel_arg(res.offset, np.int64), res.caplen, res.wire_len,
                         res.linktype, left, 0, self._marks, self._f)
            self._rows, self._out = left, np.empty(len(left), np.int64)
            self._known = True
        keys = np.array([key_words(k) for f in flows for k in (f.key, f.xlat)], np.int64)
        n = kb.pick_rows(self._marks, self._rows, len(self._rows) - len(left), keys,
                         np.empty(len(keys), np.int64), res.verdict, self._out)
        undecided: np.ndarray = self._out[:n].copy()
        return undecided
