"""A table of flow entries: the rows the compiled kernels read and write, and their index.

The PNIC's second cache (tiers/pnic_engine.py) and the software tiers' fast path
(tiers/fastpath.py) keep their flows alike: entries in the ENTRY_DTYPE layout, one per slot,
an exact-match index on both keys of each (tiers/_pnic_index.py), a state per slot and the free
slots as a stack in an array (a list of a million ints would cost 36 MB). This is that table,
once; the second cache has a fixed capacity, the fast path's doubles (`grow`).
"""

from __future__ import annotations

import numpy as np

from flowshift.entry import ENTRY_DTYPE, ENTRY_SIZE
from flowshift.flow import FlowKey
from flowshift.tiers import _pnic_index as ki
from flowshift.tiers._pnic_batch import FREE, LIVE
from flowshift.tiers._pnic_index import key_words

_EMPTY_ROW = bytes(ENTRY_SIZE)


class EntryTable:
    """Entries, their states, their index and the free slots.

    mem: the entries' bytes, as the kernels take them; buf: the same bytes as a memoryview, so
    that a row is written from bytes and read back without numpy's calls; free[:nfree]: the
    free slots, the next one last."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self._allocate_rows(capacity)
        self._allocate_index()

    def _allocate_rows(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries = np.zeros(capacity, ENTRY_DTYPE)
        self.mem = self.entries.view(np.uint8)
        self.buf = self.mem.data
        self.state = np.zeros(capacity, np.int8)
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int64)
        self.nfree = capacity

    def _allocate_index(self) -> None:
        self.keys, self.vals = ki.empty_index(self.capacity)

    def put(self, entry: bytes | bytearray | memoryview) -> int:
        """The entry into the next free slot, indexed and LIVE: the slot, or -1 when no slot
        is free or a key is taken (the table is as it was)."""
        if not self.nfree:
            return -1
        slot = int(self.free[self.nfree - 1])
        at = slot * ENTRY_SIZE
        self.buf[at:at + ENTRY_SIZE] = entry
        if not ki.index_insert(self.mem, slot, self.keys, self.vals):
            self.buf[at:at + ENTRY_SIZE] = _EMPTY_ROW
            return -1
        self.nfree -= 1
        self.state[slot] = LIVE
        return slot

    def put_rows(self, rows: np.ndarray, room: int) -> tuple[int, np.ndarray]:
        """Entries (rows of an (n, ENTRY_SIZE) uint8 array) in order, in one compiled call, as
        many `put` calls would (the same slots, the same index), into at most `room` slots:
        the slots used, and per row INSERTED, NO_ROOM or KEY_TAKEN (tiers/_pnic_index.py)."""
        n = len(rows)
        k = max(min(n, self.nfree, room), 0)
        free = self.free[self.nfree - k:self.nfree][::-1].copy()  # in the order put takes them
        codes = np.empty(n, np.int8)
        flat = np.ascontiguousarray(rows).reshape(-1)
        if not flat.flags.writeable:  # a read-only array is a type of its own to numba: the
            flat = flat.copy()  # kernel and the key functions it shares would compile twice
        used = int(ki.index_insert_rows(self.mem, flat, free, self.keys, self.vals, self.state,
                                        LIVE, codes))
        self.nfree -= used
        return used, codes

    def unindex(self, slot: int) -> None:
        """The entry's keys out of the index (it stays in its slot)."""
        ki.index_remove(self.mem, slot, self.keys, self.vals)

    def release(self, slot: int) -> bytes:
        """The slot's entry, whose keys are out of the index: its exact bytes; the slot is
        zeroed and free."""
        at = slot * ENTRY_SIZE
        raw = self.buf[at:at + ENTRY_SIZE].tobytes()
        self.buf[at:at + ENTRY_SIZE] = _EMPTY_ROW
        self.state[slot] = FREE
        self.free[self.nfree] = slot
        self.nfree += 1
        return raw

    def release_rows(self, slots: list[int]) -> None:
        """`release` of each of these slots in turn, their bytes unread: the free stack ends as
        that many calls leave it."""
        buf, state, free = self.buf, self.state, self.free
        for slot in slots:  # row by row: numpy's indexed writes cost more, even for hundreds
            at = slot * ENTRY_SIZE
            buf[at:at + ENTRY_SIZE] = _EMPTY_ROW
            state[slot] = FREE
            free[self.nfree] = slot
            self.nfree += 1

    def remove(self, slot: int) -> bytes:
        """The slot's entry, out of the index if it is LIVE (a RETURNED one is out already):
        its exact bytes; the slot is zeroed and free."""
        if self.state[slot] == LIVE:
            self.unindex(slot)
        return self.release(slot)

    def get(self, slot: int) -> bytes:
        return self.buf[slot * ENTRY_SIZE:(slot + 1) * ENTRY_SIZE].tobytes()

    def lookup(self, key: FlowKey) -> int:
        """slot * 2 + direction of a key, or -1."""
        return int(ki.lookup(self.keys, self.vals, *key_words(key)))

    def grow(self) -> None:
        """Double the capacity: slots keep their entries and states, and the slots free before
        are taken before the new ones. The old index goes first and the new one comes last, so
        that at most the old rows, the new rows and one index are in memory at once."""
        old = (self.mem, self.state)
        was_free = self.free[:self.nfree].copy()
        del self.keys, self.vals
        n = self.capacity
        self._allocate_rows(2 * n)
        self.mem[:len(old[0])] = old[0]  # as bytes: numpy copies structured rows 3-6x slower
        self.state[:n] = old[1]
        del old
        self.free[:n] = np.arange(2 * n - 1, n - 1, -1)
        self.free[n:n + len(was_free)] = was_free
        self.nfree = n + len(was_free)
        self._allocate_index()
        if not ki.reindex(self.mem, self.state, LIVE, self.keys, self.vals):
            raise RuntimeError("a table of flow entries lost an entry while growing")


__all__ = ["FREE", "EntryTable"]
