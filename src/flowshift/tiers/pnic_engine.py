"""The compiled PNIC engine: the second cache and a SmartNIC pipeline over batches of packets.

The cache is a fixed array of flow entries in the ENTRY_DTYPE layout with an exact-match hash
index on both keys of each entry (tiers/_pnic_index.py). `process` runs a whole batch through
one compiled kernel (tiers/_pnic_batch.py): parse, classify (machine = zone), look up, then the
flow's chain exactly as services/chain.py `process_flow` (tiers/_pnic_flow.py), rewriting the
frames in place. What it does not run exactly it punts; a punted hit hands its entry back
(`returned[i]`, then `take_returned(slot)`), so software continues with the exact state.
docs/pnic-engine.md describes the pipeline and what is punted.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from flowshift.conntrack_types import DEFAULT_KNOBS, N_KNOBS, Knobs
from flowshift.entry import ENTRY_SIZE, Flow
from flowshift.flow import FlowKey
from flowshift.packet.view import TCP_ACK
from flowshift.tiers._pnic_batch import LIVE, OUTSIDE, RETURNED, process_batch
from flowshift.tiers._pnic_cache import AHEAD_TIMEOUT_S
from flowshift.tiers._pnic_index import address_words
from flowshift.tiers._pnic_parse import N_FIELDS
from flowshift.tiers.entry_table import FREE, EntryTable
from flowshift.verdict import PuntReason, ReturnReason

if TYPE_CHECKING:  # host.py wires the tiers together: import it for types only
    from flowshift.host import Classifier

_M64 = (1 << 64) - 1

# The entry a punted hit hands back comes back to software for this reason (a miss returns
# nothing, and the engine never holds a packet: the host does).
RETURN_REASONS = {
    PuntReason.LIFE: ReturnReason.CLOSED,
    PuntReason.EXPIRED: ReturnReason.EXPIRED,
    PuntReason.UNSUPPORTED: ReturnReason.UNSUPPORTED,
}

# The array types every call of the batch kernel gets, so that it is compiled once: the
# dtypes of results.BatchResults for the outputs, the widest for the inputs.
_IN = {"offset": np.int64, "caplen": np.uint32, "wire_len": np.uint32, "linktype": np.uint16,
       "ts": np.int64}
_OUT = {"verdict": np.int8, "reason": np.int16, "returned": np.int64, "machine": np.int16,
        "direction": np.int8}
_NAMES = (*_IN, *_OUT)  # process's arrays in the kernel's order, and their types
_TYPES = (*_IN.values(), *_OUT.values())
_N_IN = len(_IN)


def _int64(values: list[list[int]], width: int) -> np.ndarray:
    """Rows of unsigned 64-bit values as int64 bit patterns (numba compares them unsigned)."""
    table = np.array(values, dtype=np.uint64).reshape(-1, width)
    return table.view(np.int64)


def classifier_tables(classifier: Classifier | None) -> tuple[np.ndarray, np.ndarray]:
    """Classifier's ranges and public addresses as arrays for the kernel (see _pnic_batch),
    each sorted so that the kernel bisects them; None: no machine (every packet misses).
    A machine's overlapping ranges are merged: the config keeps machines apart (a range two
    machines share is refused here too), so every address has at most one row."""
    inside: list[list[int]] = []
    public: list[list[int]] = []
    if classifier is None:
        return _int64(inside, 6), _int64(public, 4)
    ranges: list[list[int]] = []
    for family, lo, hi, m in sorted(classifier.inside):
        last = ranges[-1] if ranges else None
        if last is not None and last[0] == family and lo <= last[2]:
            if last[3] != m:
                raise ValueError(f"machines {last[3]} and {m} share addresses")
            last[2] = max(last[2], hi)
        else:
            ranges.append([family, lo, hi, m])
    for family, lo, hi, m in ranges:
        inside.append([family, lo >> 64, lo & _M64, hi >> 64, hi & _M64, m])
    for addr, m in classifier.public.items():
        hi, lo = address_words(addr)
        public.append([4 if len(addr) == 4 else 6, hi, lo, m])
    public.sort()
    return _int64(inside, 6), _int64(public, 4)


def knob_table(classifier: Classifier | None, knobs: Sequence[Knobs]) -> np.ndarray:
    """The conntrack knobs of each machine (zone) as int64 rows for the kernel: `knobs[i]`
    for machine i, Linux's defaults for a machine not given."""
    zones = len(knobs)
    if classifier is not None:
        zones = max([zones, *(m + 1 for *_, m in classifier.inside),
                     *(m + 1 for m in classifier.public.values())])
    rows = [(knobs[i] if i < len(knobs) else DEFAULT_KNOBS).row() for i in range(max(zones, 1))]
    return np.array(rows, np.int64).reshape(-1, N_KNOBS)


def kernel_arg(a: np.ndarray, dtype: type) -> np.ndarray:
    """a as a writable contiguous array of dtype (one compiled type), copied only when it is
    not one already."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype)


class PnicEngine:
    """The second cache and its compiled data path."""

    def __init__(self, capacity: int, classifier: Classifier | None,
                 knobs: Sequence[Knobs] = (), routing: Sequence[bool] = ()) -> None:
        self.table = EntryTable(capacity)  # states FREE, LIVE or RETURNED; it never grows
        self._live = 0
        self._inside, self._public = classifier_tables(classifier)
        self._knobs = knob_table(classifier, knobs)
        # per machine: 1 routes (forwarding = "router": TTL checked and decremented)
        self._routing = np.zeros(len(self._knobs), np.int8)
        self._routing[:len(routing)] = np.array(routing, np.int8)[:len(self._knobs)]
        self._punts = np.zeros(max(PuntReason) + 1, np.int64)  # by PuntReason code

    def __len__(self) -> int:
        """Entries in the cache (returned ones not yet taken do not count)."""
        return self._live

    # -- the cache ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.table.capacity

    @property
    def entries(self) -> np.ndarray:
        return self.table.entries

    def insert(self, entry: bytes | bytearray) -> int:
        """Add an entry; its slot, or -1 when the cache is full or a key is already present."""
        if len(entry) != ENTRY_SIZE:
            raise ValueError(f"a flow entry has {ENTRY_SIZE} bytes, not {len(entry)}")
        slot = self.table.put(entry)
        if slot >= 0:
            self._live += 1
        return slot

    def insert_many(self, rows: np.ndarray, room: int | None = None) -> np.ndarray:
        """Add entries, the rows of an (n, ENTRY_SIZE) uint8 array, in order and in one compiled
        call, as many `insert` calls would (the same slots, the same index); at most `room`
        of them (None: as many as there are free slots). Per row: INSERTED, NO_ROOM or
        KEY_TAKEN (tiers/_pnic_index.py)."""
        if rows.ndim != 2 or rows.shape[1] != ENTRY_SIZE or rows.dtype != np.uint8:
            raise ValueError(f"entries must be rows of {ENTRY_SIZE} uint8")
        used, codes = self.table.put_rows(rows, len(rows) if room is None else room)
        self._live += used
        return codes

    def remove(self, slot: int) -> bytes:
        """Take an entry out (live, or returned by `process`): its exact bytes."""
        if self._slot_state(slot) == LIVE:
            self._live -= 1
        return self.table.remove(slot)

    def hand_back(self, slot: int) -> bytes:
        """The entry a fast-path pass ran and punted, stopping there (tiers/_fastpath_batch.py
        STOP_RETURN; RETURNED, as `process` leaves one): its exact bytes; frees the slot."""
        raw = self.take_returned(slot)
        self._live -= 1
        return raw

    def passed(self, moved_in: int, handed_back: list[int]) -> None:
        """A fast-path pass put `moved_in` entries in the cache (`_move_down`: LIVE and
        indexed) and ran and punted the entries of the slots `handed_back`, in that order
        (tiers/_fastpath_batch.py; RETURNED, as `process` leaves one; their bytes are the
        pass's): those slots are freed in turn."""
        state = self.table.state
        for slot in handed_back:
            if state[slot] != RETURNED:
                raise KeyError(f"slot {slot} holds no returned entry")
        self.table.release_rows(handed_back)
        self._live += moved_in - len(handed_back)

    def pass_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What a fast-path pass runs this cache's rows with (`run_rows`): the entries'
        bytes, their states, the index and the punt counts, all shared with the engine."""
        t = self.table
        return t.mem, t.state, t.keys, t.vals, self._punts

    def runs_as(self, knobs: np.ndarray, routing: np.ndarray) -> bool:
        """Do these per-machine knobs and routing flags equal the engine's (a pass that runs
        its rows reads its own)?"""
        return np.array_equal(knobs, self._knobs) and np.array_equal(routing, self._routing)

    def take_returned(self, slot: int) -> bytes:
        """The entry `process` handed back in `returned`: its exact bytes; frees the slot."""
        if self._slot_state(slot) != RETURNED:
            raise KeyError(f"slot {slot} holds no returned entry")
        return self.table.release(slot)

    def get(self, slot: int) -> bytes:
        self._slot_state(slot)
        return self.table.get(slot)

    def find(self, key: FlowKey) -> tuple[int, int] | None:
        """(slot, direction) of a live entry with this key."""
        hit = self.table.lookup(key)
        return None if hit < 0 else (hit >> 1, hit & 1)

    def used_slots(self) -> list[int]:
        return np.flatnonzero(self.table.state == LIVE).tolist()

    def punt_counts(self) -> dict[PuntReason, int]:
        """Packets punted so far, by reason (every reason, zeros included)."""
        return {r: int(self._punts[r]) for r in PuntReason}

    def _slot_state(self, slot: int) -> int:
        if not 0 <= slot < self.capacity:
            raise KeyError(f"slot {slot} outside 0..{self.capacity - 1}")
        state = int(self.table.state[slot])
        if state == FREE:
            raise KeyError(f"slot {slot} holds no entry")
        return state

    # -- the data path -----------------------------------------------------------------------

    def process(self, buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray,
                wire_len: np.ndarray, linktype: np.ndarray, ts: np.ndarray, select: np.ndarray,
                verdict: np.ndarray, reason: np.ndarray, returned: np.ndarray,
                machine: np.ndarray | None = None, direction: np.ndarray | None = None) -> int:
        """Run the selected packets of a batch in index order; the number processed.

        For a selected packet i: verdict[i] = Verdict.FORWARD/DROP and reason[i] = Reason when
        processed (buf rewritten in place), else verdict[i] = -1 (punt, buf untouched),
        reason[i] = the PuntReason and returned[i] = the slot whose entry came back for
        software (`take_returned`; RETURN_REASONS[reason] says why), or -1.
        Unselected packets are left alone. `machine` and `direction` (optional) receive the
        machine index and 0 egress / 1 ingress of each processed packet.
        """
        n = len(select)
        if machine is None:
            machine = np.empty(n, np.int16)
        if direction is None:
            direction = np.empty(n, np.int8)
        given = (offset, caplen, wire_len, linktype, ts, verdict, reason, returned, machine,
                 direction)
        for name, a in zip(_NAMES, given, strict=True):
            if a.ndim != 1 or len(a) != n:
                raise ValueError(f"{name} must be one-dimensional with {n} elements")
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.writeable:
            raise ValueError("buf must be a writable one-dimensional uint8 array")
        for name, a in zip(_OUT, given[_N_IN:], strict=True):
            if a.dtype.kind != "i" or not a.flags.writeable:
                raise ValueError(f"{name} must be a writable signed integer array")
        chosen = kernel_arg(select.astype(np.bool_, copy=False), np.bool_)
        args = tuple(map(kernel_arg, given, _TYPES))  # tuples, not dicts: a pass per offload
        work = np.ascontiguousarray(buf)
        t = self.table
        done, gone = process_batch(work, *args[:_N_IN], chosen, *args[_N_IN:], t.mem,
                                   t.state, t.keys, t.vals, self._inside,
                                   self._public, self._knobs, self._routing,
                                   np.zeros(N_FIELDS, np.int64), self._punts)
        if done == OUTSIDE:
            raise ValueError("a selected frame lies outside buf")
        if work is not buf:
            buf[:] = work
        for a, mine in zip(args[_N_IN:], given[_N_IN:], strict=True):
            if a is not mine:  # results computed in a copy go back to the caller's
                mine[chosen] = a[chosen]
        self._live -= gone
        return int(done)


def compilations() -> int:
    """How many times this process compiled the batch kernel (0: it came from the cache)."""
    return sum(process_batch.stats.cache_misses.values())


def warm_table() -> None:
    """The second cache's kernels (insert, find, remove), compiled or loaded."""
    engine = PnicEngine(1, None)
    raw = Flow(key=_WARM_KEY, xlat=_WARM_KEY, machine=0, chain=0).to_bytes()
    slot = engine.insert(raw)
    engine.insert_many(np.frombuffer(raw, np.uint8).reshape(1, ENTRY_SIZE))  # a duplicate
    engine.find(_WARM_KEY)
    engine.remove(slot)


def warm_data_path() -> None:
    """The data path's kernel (`process_batch`, the longest to compile), compiled or loaded."""
    from flowshift.packet.build import tcp_frame  # for this one frame only

    engine = PnicEngine(1, None)
    key = _WARM_KEY
    frame = np.frombuffer(tcp_frame(src=key.src, dst=key.dst, sport=1, dport=2, seq=1, ack=1,
                                    flags=TCP_ACK, window=1), np.uint8).copy()
    one = np.zeros(1, np.int64)
    engine.process(frame, one, one + len(frame), one + len(frame), one + 1, one,
                   np.ones(1, np.bool_), np.empty(1, np.int8), np.empty(1, np.int16),
                   np.empty(1, np.int64))


_WARM_KEY = FlowKey(4, 6, 0, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 1, 2)


def warm(ahead: subprocess.Popen[bytes] | None = None) -> float:
    """Compile every kernel the engine runs, or load it from the cache (tiers/_pnic_cache.py);
    the seconds it took. Call it before timing a run: else the first batch compiles inside it
    (a first run compiles for several seconds, later runs load in a fraction of one).
    `ahead`: the process of `_pnic_cache.compiling_ahead` filling the cache, waited for first
    (bounded; should it fail or time out, this process compiles)."""
    started = time.perf_counter()
    if ahead is not None:
        try:
            ahead.wait(timeout=AHEAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            ahead.kill()
            ahead.wait()
    warm_table()
    warm_data_path()
    return time.perf_counter() - started


__all__ = ["RETURN_REASONS", "PnicEngine", "classifier_tables", "compilations", "kernel_arg",
           "knob_table", "warm"]
