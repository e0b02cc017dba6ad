"""What the host decided for each input packet: one result per packet, or one batch as arrays.

Reasons are small integers so that a batch is a handful of numpy arrays: a `Reason` code
(verdict.py) for the chain's decisions, or `PARSE_BASE + ParseError` for frames that were not
parsed (unparsed) or not IP (bypass). `reason_label` turns a code into the text reports use.
The packets as they leave the host are the batch's own buffer, rewritten in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from flowshift.entry import Tier
from flowshift.flow import EGRESS, INGRESS
from flowshift.packet.view import ParseError
from flowshift.verdict import Reason, Verdict, reason_text

PARSE_BASE = 64  # reason codes from here on are ParseError + PARSE_BASE
TIER_LABELS = tuple(t.label for t in Tier)  # by Tier value
DIRECTION_LABELS = tuple(label for _, label in sorted({EGRESS: "egress",
                                                        INGRESS: "ingress"}.items()))
PENDING = -1  # verdict of a packet not decided yet


def reason_label(code: int, rule: int = -1) -> str:
    if code >= PARSE_BASE:
        return ParseError(code - PARSE_BASE).label
    return reason_text(Reason(code), rule)


@dataclass(slots=True)
class PacketResult:
    index: int
    ts_ns: int
    machine: str
    direction: str  # "egress" | "ingress" | ""
    verdict: Verdict
    reason: str
    tier: str  # "machine" | "vnic" | "pnic" | "" (bypass, unparsed)
    data: bytes | None  # the packet as it leaves the host; None when not forwarded
    wire_len: int


@dataclass
class BatchResults:
    """Results of input packets `index0 .. index0 + n - 1`, one array entry per packet."""

    index0: int
    buf: np.ndarray  # uint8: the packets, rewritten in place as they leave
    offset: np.ndarray  # int64
    caplen: np.ndarray  # uint32
    wire_len: np.ndarray  # uint32
    linktype: np.ndarray  # uint16
    ts: np.ndarray  # int64
    verdict: np.ndarray  # int8, PENDING until decided
    reason: np.ndarray  # int16
    rule: np.ndarray  # int16
    tier: np.ndarray  # int8, -1: no tier (bypass, unparsed)
    machine: np.ndarray  # int16, -1: none
    direction: np.ndarray  # int8, -1: none
    # results set one by one wait here and reach the arrays in bulk (`flush`): six numpy
    # scalar stores per packet would cost more than the list
    _rows: list[tuple[int, int, int, int, int, int, int]] = field(default_factory=list)

    @classmethod
    def over(cls, index0: int, buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray,
             wire_len: np.ndarray, linktype: np.ndarray, ts: np.ndarray) -> BatchResults:
        n = len(offset)
        return cls(index0, buf, offset, caplen, wire_len, linktype, ts,
                   np.full(n, PENDING, np.int8), np.zeros(n, np.int16), np.full(n, -1, np.int16),
                   np.full(n, -1, np.int8), np.full(n, -1, np.int16), np.full(n, -1, np.int8))

    def __len__(self) -> int:
        return len(self.offset)

    def frame(self, i: int) -> bytes:
        start = int(self.offset[i])
        return self.buf[start:start + int(self.caplen[i])].tobytes()

    def set(self, i: int, verdict: int, reason: int, rule: int, tier: int, machine: int,
            direction: int, data: bytes | bytearray | None) -> None:
        self._rows.append((i, verdict, reason, rule, tier, machine, direction))
        if data is not None:
            start = int(self.offset[i])
            self.buf.data[start:start + len(data)] = data  # bytes into the buffer, no array

    _RESULTS = ("verdict", "reason", "rule", "tier", "machine", "direction")

    def view(self, lo: int, hi: int) -> BatchResults:
        """Rows lo..hi as views: what is written into it is written here."""
        return BatchResults(self.index0 + lo, self.buf, *(
            getattr(self, name)[lo:hi] for name in ("offset", "caplen", "wire_len", "linktype",
                                                     "ts", *self._RESULTS)))

    def flush(self) -> None:
        """Move the results set one by one into the arrays."""
        if not self._rows:
            return
        rows = np.array(self._rows, np.int64)
        self._rows.clear()
        at = rows[:, 0]
        for column, array in enumerate((self.verdict, self.reason, self.rule, self.tier,
                                        self.machine, self.direction), start=1):
            array[at] = rows[:, column]

    @property
    def leaving(self) -> np.ndarray:
        """Mask of the packets that leave the host (forwarded or passed on unchanged)."""
        return np.isin(self.verdict, (Verdict.FORWARD, Verdict.BYPASS))


class Results:
    """Where a host's results go: into the batch being decided (`current`), or kept per packet
    until taken, in input order."""

    def __init__(self, names: list[str]) -> None:
        self.names = names  # machine names by index
        self.current: BatchResults | None = None
        # batches decided but for fragments held for their datagram, in input order
        self.open: list[BatchResults] = []
        self.done: dict[int, PacketResult] = {}
        self.next_out = 0

    def put(self, index: int, ts: int, machine: int, direction: int, verdict: int,
            reason: int, rule: int, tier: int, data: bytes | bytearray | None, wire_len: int,
            rewritten: bool) -> None:
        """One packet's result; `data`: the packet as it leaves (None: it does not),
        `rewritten`: its bytes differ from the input's (only those go back into a batch)."""
        cur = self.current
        if cur is not None and 0 <= index - cur.index0 < len(cur):
            cur.set(index - cur.index0, verdict, reason, rule, tier, machine, direction,
                    data if rewritten else None)
            return
        for b in self.open:
            if 0 <= index - b.index0 < len(b):
                b.set(index - b.index0, verdict, reason, rule, tier, machine, direction,
                      data if rewritten else None)
                return
        self.done[index] = PacketResult(
            index, ts, self.names[machine] if machine >= 0 else "",
            DIRECTION_LABELS[direction] if direction >= 0 else "", Verdict(verdict),
            reason_label(reason, rule), TIER_LABELS[tier] if tier >= 0 else "",
            bytes(data) if data is not None else None, wire_len)

    def hold(self, res: BatchResults) -> None:
        """`res` has rows still undecided: it waits (with its own copy of the arrays, which
        the reader may recycle)."""
        for name in ("buf", "offset", "caplen", "wire_len", "linktype", "ts"):
            setattr(res, name, getattr(res, name).copy())
        self.open.append(res)

    def ready(self) -> list[BatchResults]:
        """The waiting batches now decided, from the first on, in input order."""
        out = []
        while self.open:
            self.open[0].flush()
            if (self.open[0].verdict == PENDING).any():
                break
            out.append(self.open.pop(0))
        return out

    def take(self) -> Iterator[PacketResult]:
        done = self.done
        while self.next_out in done:
            yield done.pop(self.next_out)
            self.next_out += 1
