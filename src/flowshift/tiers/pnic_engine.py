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

from typing import TYPE_CHECKING

import numpy as np

from flowshift.entry import ENTRY_DTYPE, ENTRY_SIZE, Status
from flowshift.flow import FlowKey
from flowshift.services import conntrack as ct
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.tiers import _pnic_flow as kf
from flowshift.tiers import _pnic_index as ki
from flowshift.tiers._pnic_batch import LIVE, RETURNED, process_batch
from flowshift.tiers._pnic_parse import N_FIELDS
from flowshift.verdict import Reason, Verdict

if TYPE_CHECKING:  # host.py wires the tiers together: import it for types only
    from flowshift.host import Classifier

_FREE = 0
_M64 = (1 << 64) - 1


def _check_layout() -> None:
    """The compiled code's constants must describe ENTRY_DTYPE and the reference's tables."""
    fields = ENTRY_DTYPE.fields
    assert fields is not None
    offsets = {
        "family": ki.E_FAMILY, "proto": ki.E_PROTO, "zone": ki.E_ZONE, "sport": ki.E_SPORT,
        "dport": ki.E_DPORT, "src": ki.E_SRC, "dst": ki.E_DST, "xsrc": ki.E_XSRC,
        "xdst": ki.E_XDST, "xsport": ki.E_XSPORT, "xdport": ki.E_XDPORT,
        "status": kf.E_STATUS, "tcp_state": kf.E_TCP_STATE, "last_dir": kf.E_LAST_DIR,
        "retrans": kf.E_RETRANS, "last_index": kf.E_LAST_INDEX, "last_flags": kf.E_LAST_FLAGS,
        "last_seq": kf.E_LAST_SEQ, "last_ack": kf.E_LAST_ACK, "last_end": kf.E_LAST_END,
        "last_win": kf.E_LAST_WIN, "seen0": kf.E_SEEN, "seen1": kf.E_SEEN + kf.SEEN_SIZE,
        "last_seen": kf.E_LAST_SEEN, "expires": kf.E_EXPIRES, "stream_ts": kf.E_STREAM_TS,
        "packets": kf.E_PACKETS, "bytes": kf.E_BYTES,
    }
    assert ki.E_SIZE == ENTRY_SIZE, "ENTRY_DTYPE changed size: update the PNIC engine"
    for name, off in offsets.items():
        assert fields[name][1] == off, f"ENTRY_DTYPE.{name} moved: update the PNIC engine"
    seen = fields["seen0"][0]
    assert seen.itemsize == kf.SEEN_SIZE
    for name, off in (("end", kf.D_END), ("maxend", kf.D_MAXEND), ("maxwin", kf.D_MAXWIN),
                      ("maxack", kf.D_MAXACK), ("scale", kf.D_SCALE), ("flags", kf.D_FLAGS)):
        assert seen.fields[name][1] == off, f"TcpDir.{name} moved: update the PNIC engine"
    assert (kf.SEEN_REPLY, kf.ASSURED) == (Status.SEEN_REPLY, Status.ASSURED)
    assert (kf.FORWARD, kf.DROP) == (Verdict.FORWARD, Verdict.DROP)
    assert (kf.ESTABLISHED, kf.INVALID) == (Reason.ESTABLISHED, Reason.INVALID)
    for d in (0, 1):
        assert tuple(kf.ACK_ROWS[d]) == ct_tcp.TCP_CONNTRACKS[d][ct_tcp.TCP_ACK_SET]
    assert tuple(kf.TIMEOUTS) == ct_tcp.TCP_TIMEOUTS_NS
    assert (kf.TIMEOUT_RETRANS, kf.TIMEOUT_UNACK) == (ct_tcp.TIMEOUT_RETRANS_NS,
                                                      ct_tcp.TIMEOUT_UNACK_NS)
    assert (kf.UDP_TIMEOUT_UNREPLIED, kf.UDP_TIMEOUT_REPLIED, kf.ICMP_TIMEOUT) == (
        ct.UDP_TIMEOUT_UNREPLIED, ct.UDP_TIMEOUT_REPLIED, ct.ICMP_TIMEOUT)
    assert kf.MAX_RETRANS == ct_tcp.NF_CT_TCP_MAX_RETRANS
    assert kf.MAXACKWINCONST == ct_tcp.MAXACKWINCONST
    assert not ct_tcp.NF_CT_TCP_BE_LIBERAL  # the kernels assume the Linux default


_check_layout()


def _words(addr: bytes) -> tuple[int, int]:
    """An address as two big-endian words, as the index and the parser keep it."""
    v = int.from_bytes(addr.ljust(16, b"\0"), "big")
    return v >> 64, v & _M64


def _int64(values: list[list[int]], width: int) -> np.ndarray:
    """Rows of unsigned 64-bit values as int64 bit patterns (numba compares them unsigned)."""
    table = np.array(values, dtype=np.uint64).reshape(-1, width)
    return table.view(np.int64)


def _compile_classifier(classifier: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """Classifier's ranges and public addresses as arrays for the kernel (see _pnic_batch)."""
    inside = []
    for family, lo, hi, m in classifier.inside:
        inside.append([family, lo >> 64, lo & _M64, hi >> 64, hi & _M64, m])
    public = []
    for addr, m in classifier.public.items():
        hi, lo = _words(addr)
        public.append([4 if len(addr) == 4 else 6, hi, lo, m])
    return _int64(inside, 6), _int64(public, 4)


def _as(a: np.ndarray, dtype: type) -> np.ndarray:
    """a as a contiguous array of dtype, copied only when it is not one already."""
    return np.ascontiguousarray(a, dtype)


class PnicEngine:
    """The second cache and its compiled data path."""

    def __init__(self, capacity: int, classifier: Classifier) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self.entries = np.zeros(capacity, ENTRY_DTYPE)
        self._mem = self.entries.view(np.uint8)  # what the kernels read: the entries' bytes
        self._rows = self._mem.reshape(capacity, ENTRY_SIZE)
        size = ki.table_size(capacity)
        self._keys = np.zeros((size, 5), np.int64)
        self._vals = np.full(size, ki.EMPTY, np.int64)
        self._state = np.zeros(capacity, np.int8)  # _FREE, LIVE or RETURNED
        self._free = list(range(capacity - 1, -1, -1))
        self._live = 0
        self._inside, self._public = _compile_classifier(classifier)

    def __len__(self) -> int:
        """Entries in the cache (returned ones not yet taken do not count)."""
        return self._live

    # -- the cache ---------------------------------------------------------------------------

    def insert(self, entry: bytes) -> int:
        """Add an entry; its slot, or -1 when the cache is full or a key is already present."""
        if len(entry) != ENTRY_SIZE:
            raise ValueError(f"a flow entry has {ENTRY_SIZE} bytes, not {len(entry)}")
        if not self._free:
            return -1
        slot = self._free[-1]
        self._rows[slot] = np.frombuffer(entry, np.uint8)
        if not ki.index_insert(self._mem, slot, self._keys, self._vals):
            self._rows[slot] = 0
            return -1
        self._free.pop()
        self._state[slot] = LIVE
        self._live += 1
        return slot

    def remove(self, slot: int) -> bytes:
        """Take an entry out (live, or returned by `process`): its exact bytes."""
        state = self._slot_state(slot)
        if state == LIVE:
            ki.index_remove(self._mem, slot, self._keys, self._vals)
            self._live -= 1
        return self._release(slot)

    def take_returned(self, slot: int) -> bytes:
        """The entry `process` handed back in `returned`: its exact bytes; frees the slot."""
        if self._slot_state(slot) != RETURNED:
            raise KeyError(f"slot {slot} holds no returned entry")
        return self._release(slot)

    def get(self, slot: int) -> bytes:
        self._slot_state(slot)
        return self._rows[slot].tobytes()

    def find(self, key: FlowKey) -> tuple[int, int] | None:
        """(slot, direction) of a live entry with this key."""
        src_hi, src_lo = _words(key.src)
        dst_hi, dst_lo = _words(key.dst)
        head = (key.family | key.proto << 8 | key.zone << 16 | key.sport << 32
                | key.dport << 48)
        words = [v - (1 << 64) if v >> 63 else v for v in (head, src_hi, src_lo, dst_hi, dst_lo)]
        hit = ki.lookup(self._keys, self._vals, *words)
        return None if hit < 0 else (hit >> 1, hit & 1)

    def used_slots(self) -> list[int]:
        return np.flatnonzero(self._state == LIVE).tolist()

    def _slot_state(self, slot: int) -> int:
        if not 0 <= slot < self.capacity:
            raise KeyError(f"slot {slot} outside 0..{self.capacity - 1}")
        state = int(self._state[slot])
        if state == _FREE:
            raise KeyError(f"slot {slot} holds no entry")
        return state

    def _release(self, slot: int) -> bytes:
        raw = self._rows[slot].tobytes()
        self._rows[slot] = 0
        self._state[slot] = _FREE
        self._free.append(slot)
        return raw

    # -- the data path -----------------------------------------------------------------------

    def process(self, buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray,
                wire_len: np.ndarray, linktype: np.ndarray, ts: np.ndarray, select: np.ndarray,
                verdict: np.ndarray, reason: np.ndarray, returned: np.ndarray,
                machine: np.ndarray | None = None, direction: np.ndarray | None = None) -> int:
        """Run the selected packets of a batch in index order; the number processed.

        For a selected packet i: verdict[i] = Verdict.FORWARD/DROP and reason[i] = Reason when
        processed (buf rewritten in place), else verdict[i] = -1 (punt, buf untouched) and
        returned[i] = the slot whose entry came back for software (`take_returned`), or -1.
        Unselected packets are left alone. `machine` and `direction` (optional) receive the
        machine index and 0 egress / 1 ingress of each processed packet.
        """
        n = len(select)
        if machine is None:
            machine = np.empty(n, np.int16)
        if direction is None:
            direction = np.empty(n, np.int8)
        for name, a in (("offset", offset), ("caplen", caplen), ("wire_len", wire_len),
                        ("linktype", linktype), ("ts", ts), ("verdict", verdict),
                        ("reason", reason), ("returned", returned), ("machine", machine),
                        ("direction", direction)):
            if a.ndim != 1 or len(a) != n:
                raise ValueError(f"{name} must be one-dimensional with {n} elements")
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.writeable:
            raise ValueError("buf must be a writable one-dimensional uint8 array")
        for name, a in (("verdict", verdict), ("reason", reason), ("returned", returned),
                        ("machine", machine), ("direction", direction)):
            if a.dtype.kind != "i" or not a.flags.writeable:
                raise ValueError(f"{name} must be a writable signed integer array")
        chosen = select.astype(bool, copy=False)
        start = offset[chosen].astype(np.int64)
        if len(start) and (start.min() < 0
                           or (start + caplen[chosen].astype(np.int64)).max() > len(buf)):
            raise ValueError("a selected frame lies outside buf")
        # one set of argument types, so that every caller runs the same compiled kernel
        work = np.ascontiguousarray(buf)
        done, gone = process_batch(work, _as(offset, np.int64), _as(caplen, np.uint32),
                                   _as(wire_len, np.uint32), _as(linktype, np.uint16),
                                   _as(ts, np.int64), chosen, verdict, reason, returned,
                                   machine, direction, self._mem, self._state,
                                   self._keys, self._vals, self._inside, self._public,
                                   np.zeros(N_FIELDS, np.int64))
        if work is not buf:
            buf[:] = work
        self._live -= gone
        return int(done)


__all__ = ["PnicEngine"]
