"""Shards on one machine that read a classic pcap together: the trace is read once, not once
per shard.

The trace is cut into pieces of `RING_PIECE` bytes. Piece j holds the records that *start* in
its bytes; shard j mod n reads it, with up to `TAIL` bytes after it (the rest of the last
record it starts), into slot j mod S of a ring in shared memory (a file in /dev/shm that
every shard maps), walks its records and places those with a plain key (`Sharder.plain`,
which needs no earlier packet). Every shard then takes its own packets from every piece, in
order, where they lie in the ring; the frames the slow path must place (fragments, ICMP
errors) are copied aside untouched, since their owner rewrites frames in place, and each
shard places them itself in input order, as `Sharder.assign` does.

A piece's first record is found by `_resync`; the piece before it says exactly where its own
last record ends. A shard takes a piece only when the two agree and the piece is clean (no
corrupt record, no record cut by the tail or by the end of the trace). Otherwise, or when
the shard that reads it is gone or stalled, the shard reads that piece itself exactly as a
lone shard does (`_pcap_pieces`, which also reports the trace's problem). So the ring only
ever changes how long a replay takes, never what it finds.

Slots are recycled as `read_batches(reuse=True)` recycles batches: a shard's batch stays
whole until it asks for the batch after the next one. The shared control words are plain
stores, ordered as written on x86 (total store order): `usable()` is false elsewhere.
"""

from __future__ import annotations

import mmap
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flowshift.config import HostConfig
from flowshift.packet.batch import MORE, Batch, _walk
from flowshift.packet.pcap import PcapHeader, open_trace
from flowshift.shard import SIP, Part, Placement, _pcap_pieces, _pieces, _resync

RING_PIECE = 1 << 24  # bytes of the trace per piece
TAIL = 1 << 18  # bytes read past a piece for its last record (a longer one: read alone)
RECORD_MIN = 64  # bytes per record the columns have room for, on average (an Ethernet
#                  frame's 60 and its header's 16 are more; a piece of smaller ones: alone)
ASIDE = 1 << 21  # bytes of frames for the slow path per piece (more: read alone)
DEPTH = 3  # slots per shard: each reads ahead while the others take its earlier pieces
START_WAIT = 5.0  # s a shard waits for another to start before it reads alone
STALL_WAIT = 20.0  # s it waits for one that started but stopped moving
_MAGIC = 0x46535249_4E470001  # "FSRING", layout 1
_PAGE = 4096
_CLEAN, _ALONE = 1, 2  # a piece's state: taken from the ring, or read by each shard alone
_GONE = 1 << 62  # a shard's release mark once it uses no slot again
_X86 = {"x86_64", "amd64", "i386", "i686"}


def _up(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


class _Layout:
    """Where everything lies in a ring file: n shards, `slots` slots of a piece of `piece`
    bytes, `tail` more, room for `records` records and `aside` bytes of set-aside frames."""

    def __init__(self, n: int, slots: int, piece: int, tail: int, records: int,
                 aside: int) -> None:
        self.n, self.slots, self.piece, self.tail = n, slots, piece, tail
        self.records, self.aside = records, aside
        # control words: the header (7 words and the trace's pieces), then per slot (piece,
        # count, start, end, state, aside), then per shard (released through, started, left,
        # beat)
        self.head = 8
        self.slot_words = 6
        self.shard_words = 4
        words = self.head + slots * self.slot_words + n * self.shard_words
        self.control = _up(words * 8)
        self.data = _up(piece + tail)
        self.columns = [("ts", np.int64), ("src", np.int64), ("caplen", np.uint32),
                        ("wire", np.uint32), ("shard", np.int32), ("aside", np.int64)]
        self.slot_bytes = self.data + aside + sum(
            _up(records * np.dtype(t).itemsize) for _, t in self.columns)
        self.size = self.control + slots * self.slot_bytes

    @classmethod
    def planned(cls, n: int) -> _Layout:
        return cls(n, DEPTH * n, RING_PIECE, TAIL, (RING_PIECE + TAIL) // RECORD_MIN + 1,
                   _up(min(ASIDE, RING_PIECE + TAIL)))

    def header(self) -> list[int]:
        return [_MAGIC, self.n, self.slots, self.piece, self.tail, self.records, self.aside]


def usable(n: int, directory: str = "/dev/shm") -> bool:
    """Whether n shards here can share a ring: x86, and room for it in `directory`."""
    if n < 2 or platform.machine().lower() not in _X86 or not os.path.isdir(directory):
        return False
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize >= 2 * _Layout.planned(n).size


def create_ring(n: int, directory: str = "/dev/shm") -> str:
    """A ring file for n shards, sparse: a page takes memory when a shard first writes it
    (most of the columns never are), in the shards, at the same time. `usable` asked for
    twice the room the whole file could take. The caller removes it."""
    layout = _Layout.planned(n)
    fd, path = tempfile.mkstemp(prefix="flowshift-ring-", dir=directory)
    try:
        os.ftruncate(fd, layout.size)
        control = np.zeros(layout.control // 8, np.int64)
        control[:7] = layout.header()
        base = layout.head
        for s in range(layout.slots):  # no piece in any slot yet
            control[base + s * layout.slot_words] = -1
        shards = base + layout.slots * layout.slot_words
        control[shards:shards + n * layout.shard_words:layout.shard_words] = -1  # released
        os.pwrite(fd, control.tobytes(), 0)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


class _Ring:
    """One shard's view of the ring file."""

    def __init__(self, path: str, k: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        head = np.frombuffer(self.map, np.int64, 7).tolist()
        if head[0] != _MAGIC:
            raise ValueError(f"{path}: not a flowshift ring")
        self.layout = lay = _Layout(*head[1:])
        n = lay.n
        self.k = k
        words = np.frombuffer(self.map, np.int64, lay.control // 8)
        self.pieces = words[7:8]  # the trace's pieces, once a shard has opened it
        at = lay.head
        self.slot = words[at:at + lay.slots * lay.slot_words].reshape(lay.slots, lay.slot_words)
        at += lay.slots * lay.slot_words
        shards = words[at:at + n * lay.shard_words].reshape(n, lay.shard_words)
        self.released, self.started, self.left, self.beat = (shards[:, i] for i in range(4))
        self.data: list[np.ndarray] = []
        self.aside_bytes: list[np.ndarray] = []
        self.cols: list[dict[str, np.ndarray]] = []
        for s in range(lay.slots):
            at = lay.control + s * lay.slot_bytes
            self.data.append(np.frombuffer(self.map, np.uint8, lay.data, at))
            self.aside_bytes.append(np.frombuffer(self.map, np.uint8, lay.aside, at + lay.data))
            at += lay.data + lay.aside
            cols = {}
            for name, t in lay.columns:
                cols[name] = np.frombuffer(self.map, t, lay.records, at)
                at += _up(lay.records * np.dtype(t).itemsize)
            self.cols.append(cols)


# a slot's control words
_PIECE, _COUNT, _START, _END, _STATE, _ASIDE = range(6)


class RingPart(Part):
    """`Part` whose pieces come through a ring shared with the other shards (see above)."""

    def __init__(self, trace: str | os.PathLike[str], config: HostConfig, k: int, n: int,
                 ring: str, placement: Placement | None = None) -> None:
        super().__init__(trace, config, k, n, placement)
        self.ring_path = ring
        self.taken = 0  # pieces taken from the ring
        self.alone = 0  # pieces this shard read itself

    def _pieces(self) -> Iterator[tuple[Batch, np.ndarray]]:
        reader = open_trace(self.trace)
        header = reader.pcap_header
        reader.close()
        if header is None:  # pcapng: every shard reads it whole
            return _pieces(self.trace, self.sharder)
        return _Shared(self, reader.path, header).pieces()


class _Shared:
    """One shard's walk through the pieces: reading its own into the ring, taking everyone's."""

    def __init__(self, part: RingPart, path: str, header: PcapHeader) -> None:
        self.part = part
        self.path, self.header = path, header
        self.ring = _Ring(part.ring_path, part.k)
        lay = self.ring.layout
        if lay.n != part.n:
            raise ValueError(f"a ring of {lay.n} shards for shard {part.k} of {part.n}")
        self.k, self.n = part.k, part.n
        self.size = os.path.getsize(path)
        self.count = -(-(self.size - 24) // lay.piece) if self.size > 24 else 0
        self.fd = os.open(path, os.O_RDONLY)
        self.next_own = self.k  # the next piece this shard reads into the ring
        self.solo = False
        self.frac_ns = 1 if header.nanosecond else 1000
        self.linktypes = np.full(lay.records, header.linktype, np.uint16)

    # -- the consumer: every piece in order -------------------------------------------------

    def pieces(self) -> Iterator[tuple[Batch, np.ndarray]]:
        ring, k = self.ring, self.k
        ring.pieces[0] = self.count
        ring.started[k] = 1
        expect = 24  # the exact offset of the next record, from the pieces before
        try:
            for j in range(self.count):
                ring.released[k] = j - 2  # the batch before the last is done with
                ring.beat[k] += 1
                stop = min(24 + (j + 1) * ring.layout.piece, self.size)
                if expect >= stop:  # a record longer than the piece covers it
                    continue
                if not self.solo:
                    self._produce()  # keep a piece ahead for the others
                if not self.solo and self._wait(j):
                    s = j % ring.layout.slots
                    w = ring.slot[s]
                    if int(w[_STATE]) == _CLEAN and int(w[_START]) == expect:
                        expect = int(w[_END])
                        self.part.taken += 1
                        yield self._take(s, int(w[_COUNT]), int(w[_ASIDE]))
                        continue
                reached: list[int] = []
                self.part.alone += 1
                yield from _pcap_pieces(self.path, self.header, self.part.sharder, expect,
                                        stop, reached)
                if not reached:  # the trace broke off (the problem is on its last batch)
                    return
                expect = reached[0]
        finally:
            ring.left[k] = 1
            ring.released[k] = _GONE
            os.close(self.fd)

    def _take(self, s: int, m: int, aside: int) -> tuple[Batch, np.ndarray]:
        ring = self.ring
        c = ring.cols[s]
        batch = self._frames(s, 0, m)
        shard = c["shard"][:m].copy()
        if aside:  # placed here, in input order, from their untouched copies
            rows = np.flatnonzero(shard < 0)
            frames = Batch(ts_ns=batch.ts_ns[rows], caplen=batch.caplen[rows],
                           wire_len=batch.wire_len[rows], linktype=batch.linktype[rows],
                           offset=c["aside"][:aside], buf=ring.aside_bytes[s])
            shard[rows] = self.part.sharder.resolve(frames, np.arange(aside))
        return batch, shard

    def _wait(self, j: int) -> bool:
        """Whether piece j is (now) in the ring; False: read it alone (its reader is gone or
        stalled, or this shard went solo waiting)."""
        ring = self.ring
        if j % self.n == self.k:
            while self.next_own <= j and not self.solo:
                self._produce_wait()
            return not self.solo
        p = j % self.n
        row = ring.slot[j % ring.layout.slots]
        clock = _Patience(ring, p)
        while True:
            gone = bool(ring.left[p])  # read before the slot: a leaver published all it will
            if int(row[_PIECE]) == j:
                return True
            if gone:
                return False
            self._produce()
            if clock.expired():
                self._go_solo()
                return False
            clock.sleep()

    def _go_solo(self) -> None:
        """Stop reading pieces for the others: they read this shard's pieces themselves. The
        slots this shard still holds stay held until its consumer is done with them."""
        self.solo = True
        self.ring.left[self.k] = 1

    # -- the producer: this shard's own pieces, into the ring ---------------------------------

    def _produce_wait(self) -> None:
        clock = _Patience(self.ring, None)
        while not self._produce():
            if clock.expired():
                self._go_solo()
                return
            clock.sleep()

    def _produce(self) -> bool:
        """Read the next own piece into its slot if the slot is free (every shard done with
        the piece it held); whether one was read."""
        ring, j = self.ring, self.next_own
        if self.solo or j >= self.count:
            return False
        lay = ring.layout
        if int(ring.released.min()) < j - lay.slots:
            return False
        self._read_piece(j)
        self.next_own += self.n
        ring.beat[self.k] += 1
        return True

    def _read_piece(self, j: int) -> None:
        """Piece j into its slot, a `SIP` at a time, each walked and placed while it is still
        in the processor's cache; then its state, and the piece number last."""
        ring, header = self.ring, self.header
        lay = ring.layout
        s = j % lay.slots
        w, data, c = ring.slot[s], ring.data[s], ring.cols[s]
        start = 24 + j * lay.piece
        stop = min(start + lay.piece, self.size) - start  # from here on: relative to start
        want = min(start + lay.piece + lay.tail, self.size) - start
        limit, big = header.record_limit, header.big_endian
        first = 0 if j == 0 else -1
        filled = pos = m = cut = 0
        while filled < want and pos < stop:
            got = os.preadv(self.fd, [data[filled:min(filled + SIP, want)].data],
                            start + filled)
            if not got:
                break
            filled += got
            if first < 0:
                first = int(_resync(data[:filled], big, limit, 10**9 // self.frac_ns))
                if first < 0:
                    continue  # more bytes may show the run of sane records
                pos = first
            m, pos, why = _walk(data[:filled], pos, big, self.frac_ns, limit, m, c["ts"],
                                c["caplen"], c["wire"], c["src"])
            placed = cut
            cut = int(np.searchsorted(c["src"][:m], stop + 16))  # records starting before stop
            if cut > placed:  # while the bytes just read are in the processor's cache
                self.part.sharder.plain(self._frames(s, placed, cut), c["shard"][placed:cut])
            if why != MORE:  # corrupt, or no room for more records
                break
        end = -1
        if first >= 0 and cut < m:
            end = int(c["src"][cut]) - 16
        elif first >= 0 and pos >= stop:  # the next record starts past the piece, or none does
            end = pos
        state, aside = _ALONE, 0
        if end >= 0:
            batch = self._frames(s, 0, cut)
            aside = _set_aside(batch, np.flatnonzero(c["shard"][:cut] < 0), ring.aside_bytes[s],
                               c["aside"])
            state = _CLEAN if aside >= 0 else _ALONE
        w[_COUNT], w[_START], w[_END] = cut, start + first, start + end
        w[_STATE], w[_ASIDE] = state, aside
        w[_PIECE] = j  # last: the piece is whole once this is seen

    def _frames(self, s: int, lo: int, hi: int) -> Batch:
        c = self.ring.cols[s]
        return Batch(ts_ns=c["ts"][lo:hi], caplen=c["caplen"][lo:hi], wire_len=c["wire"][lo:hi],
                     linktype=self.linktypes[lo:hi], offset=c["src"][lo:hi],
                     buf=self.ring.data[s])


def _set_aside(batch: Batch, rows: np.ndarray, into: np.ndarray, offsets: np.ndarray) -> int:
    """Copy the frames `rows` to `into`, one after another, their offsets to `offsets`; how
    many (-1: no room)."""
    if int(batch.caplen[rows].sum()) > len(into):
        return -1
    at = 0
    for i, r in enumerate(rows.tolist()):
        src, cap = int(batch.offset[r]), int(batch.caplen[r])
        into[at:at + cap] = batch.buf[src:src + cap]
        offsets[i] = at
        at += cap
    return len(rows)


class _Patience:
    """How long a shard waits for another (None: any other) before it reads alone: longer
    for one that has started and keeps moving."""

    def __init__(self, ring: _Ring, peer: int | None) -> None:
        self.ring, self.peer = ring, peer
        self.beat = self._beat()
        self.since = time.monotonic()
        self.delay = 20e-6

    def _beat(self) -> int:
        r = self.ring
        return int(r.beat.sum()) if self.peer is None else int(r.beat[self.peer])

    def expired(self) -> bool:
        now = time.monotonic()
        beat = self._beat()
        if beat != self.beat:
            self.beat, self.since, self.delay = beat, now, 20e-6
            return False
        r = self.ring
        started = bool(r.started.all()) if self.peer is None else bool(r.started[self.peer])
        return now - self.since > (STALL_WAIT if started else START_WAIT)

    def sleep(self) -> None:
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, 1e-3)


class RingWatch:
    """How far the shards sharing a ring have come: the share of the trace's pieces the
    slowest of them has taken."""

    def __init__(self, path: str) -> None:
        self.ring = _Ring(path, 0)

    def fraction(self) -> float:
        ring = self.ring
        total = int(ring.pieces[0])
        if total <= 0:
            return 0.0
        # a shard at piece j has released j - 2; one that is done, everything
        reached = np.minimum(ring.released + 2, total)
        return float(max(int(reached.min()), 0)) / total


def remove_ring(path: str | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)


__all__ = ["RING_PIECE", "RingPart", "create_ring", "remove_ring", "usable"]
