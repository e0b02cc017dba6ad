"""The software tiers' fast path: their established flows in the entry layout, run compiled.

Open vSwitch splits its datapath cache from its slow path; flowshift's software tiers do the
same. A flow the machine or the VNIC owns is *cached* once it is established: its state moves
from its Python `Flow` into a row of this table (ENTRY_DTYPE, the PNIC's layout, indexed by
both keys), and its packets run through the PNIC's compiled kernels (tiers/_fastpath_batch.py)
in input order. The first packet of a flow whose chain needs no decision only Python can make
(a SYN or UDP datagram a firewall rule judges and NAT keeps its port) opens the flow here too
(tiers/_fastpath_open.py), in a zone the host opens for it (`open_zone`), unless a `Flow`
Python holds has one of its keys (`hold`: an index of those keys). With the PNIC in this
process at latency 0, a pass also runs the PNIC's flows with its entries, moves a flow the
policy wants down to it and takes a closing flow's entry back (`attach_pnic`, notes for the
host: `_heard`). Python still decides everything else: other first packets, NAT port searches
and backends, the SYNs of cached flows, expiry, handoffs and every other offer and return.
A cached flow has no `Flow` object: its
`FlowTable` counts it and, when asked for it (a lookup, a listing, a sweep), takes it back from
here as a new `Flow` (`find`, `pull_all`, `expire`); the flow is cached again after its next
Python decision. The tier a packet is counted at does not change: a cached flow's packets are
the work of the tier that owns it.

The table grows by doubling; it holds flows of every machine (the zone tells them apart) and
of both software tiers (the entry's owner byte tells which).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flowshift.conntrack_types import Status
from flowshift.entry import ENTRY_SIZE, Flow, Tier, expires_of, field_offsets, key_of
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.services.conntrack_tcp import TcpConn, TcpState
from flowshift.tiers import _fastpath_batch as kb
from flowshift.tiers import _fastpath_open as ko
from flowshift.tiers import _pnic_index as ki
from flowshift.tiers import pnic_engine
from flowshift.tiers._pnic_cache import mark_ready
from flowshift.tiers._pnic_index import key_words
from flowshift.tiers._pnic_parse import N_FIELDS
from flowshift.tiers.entry_table import EntryTable
from flowshift.tiers.open_tables import open_tables
from flowshift.tiers.pnic_engine import PnicEngine, classifier_tables, kernel_arg, knob_table

if TYPE_CHECKING:
    from flowshift.config import HostConfig
    from flowshift.offload import OffloadPolicy
    from flowshift.results import BatchResults
    from flowshift.services.conntrack import FlowTable
    from flowshift.tiers.classify import Classifier

_CACHED_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6})
_ASSURED = int(Status.ASSURED)
_ZONE = field_offsets()["zone"]  # an entry's zone: its machine
_OWNER = field_offsets()["owner"]
MAX_NOTES = 256  # offers and returns a pass notes for the host at most (`notes_room`)
_NEVER = np.iinfo(np.int64).max
_ROW_BY_ROW = 8  # open_until writes this many zones one by one, more in one indexed write
_POLICIES = {"never": kb.POLICY_NEVER, "always": kb.POLICY_ALWAYS,
             "elephant": kb.POLICY_ELEPHANT}

STOP_SOFTWARE, STOP_PUNT, STOP_TIME, STOP_OFFER, STOP_RETURN = (
    kb.STOP_SOFTWARE, kb.STOP_PUNT, kb.STOP_TIME, kb.STOP_OFFER, kb.STOP_RETURN)


def _runs_compiled(proto: int, tcp_state: int) -> bool:
    """Do the kernels run a flow of this protocol (and TCP state) from its next packet on?"""
    return proto in _CACHED_PROTOCOLS and (
        proto != PROTO_TCP or bool(kb.CACHED_TCP_STATES >> tcp_state & 1))


def _kept(bounded: bool, status: int) -> bool:
    """May a flow of this status live here? In a bounded table only an assured one: early
    drop must read the flows it may drop."""
    return not bounded or bool(status & _ASSURED)


@dataclass(slots=True)
class Passed:
    """The end of a pass's notes (`Fastpath._heard`): the batch row of the last one, and the
    flows the pass moved down to the PNIC and took back, in the order they moved down: each
    one's key, expiry when it moved, batch rows of the two notes and back-off when it came
    back; and how far above its count at the pass's end the PNIC's count rose meanwhile (all of
    the pass's notes counted)."""

    last_row: int
    above: int
    keys: list[FlowKey]
    expires: list[int]
    down_rows: list[int]
    back_rows: list[int]
    backoffs: list[int]


class Fastpath:
    """The cached flows of a host's software tiers and their compiled data path."""

    def __init__(self, config: HostConfig, classifier: Classifier, capacity: int = 1024) -> None:
        machines = config.machines
        self._inside, self._public = classifier_tables(classifier)
        self._knobs = knob_table(classifier, [m.conntrack.knobs() for m in machines])
        zones = len(self._knobs)
        self._routing = np.zeros(zones, np.int8)
        self._bounded = np.zeros(zones, np.int8)
        for i, m in enumerate(machines):
            self._routing[i] = m.forwarding == "router"
            self._bounded[i] = m.conntrack.knobs().max > 0
        self.policy = np.zeros(3, np.int64)  # set_policy: never until the host says
        self._f = np.zeros(N_FIELDS + 2, np.int64)  # the parser's fields, machine, direction
        self.counts = np.zeros((len(Tier), 2), np.int64)  # per tier: packets, wire bytes
        self.live = 0
        self.ran = 0  # packets run here so far
        self.cached = 0  # flows moved in so far: a row that missed may hit now
        self.on = False  # the host is deciding a batch: flows decided in Python may be cached
        self.floor = _NEVER  # no cached entry expires before this
        # no packet the kernels run gives its entry less life than this
        self.min_timeout = min(m.conntrack.knobs().min_timeout() for m in machines)
        self._returned = np.empty(0, np.int64)
        self._opened = np.empty(0, np.int64)  # rows a pass opened flows in
        # a pass's free rows left, flows opened, earliest expiry it left a row with, the
        # first time the PNIC's rows ran in it, the reason of its STOP_RETURN, the notes it
        # left for the host (`_notes`: offers and returns it made itself)
        self._fstate = np.zeros(6, np.int64)
        self.notes_room(MAX_NOTES)
        # the host's hand in what a pass did with the PNIC (`_heard`): an entry taken back
        # (batch row, the entry as it came back, the VNIC's back-off), a flow moved down (batch
        # row, its table, its entry as it was); and, at once, after them, the flows that moved
        # down and came back in the same pass (`Passed`)
        self.on_take_back: Callable[[int, bytes, int], None] | None = None
        self.on_move_down: Callable[[int, FlowTable, bytes], None] | None = None
        self.on_passed: Callable[[Passed], None] | None = None
        self._pnic: PnicEngine | None = None
        self._pnic_table: EntryTable | None = None
        # per pass: offers the VNIC may still make, the services the PNIC runs, its free slots
        self.pnic_ctl = np.zeros(3, np.int64)
        # the PNIC in this process, whose rows a pass runs too when `pnic_on` (`attach_pnic`,
        # `let_pnic`): its second cache's arrays as run_rows takes them
        self.pnic_on = False
        self.pnic_from = -1  # after a pass: the time of its first PNIC row (-1: none ran)
        self._pnic_arrays: tuple[np.ndarray, ...] = ()
        self.open = open_tables(machines, zones)
        self.zone_tables: list[FlowTable | None] = [None] * len(self.open.zone)  # open zones'
        self.opened = 0  # flows opened by the passes since the host last counted
        self.opened_all = 0  # flows opened by the passes so far
        self.opening = False  # some zone is open: a pass may open flows
        self._zones_open = 0  # how many
        # the keys Python holds (its tables' `Flow`s, by both keys), as an index the kernel
        # that opens flows asks, and how many tables hold each (`hold`)
        self._held: dict[FlowKey, int] = {}
        self._allocate_held(0)
        self.table = EntryTable(capacity)
        self._offer_at = np.zeros(capacity, np.int64)
        self.tables: list[FlowTable | None] = [None] * capacity  # whose flow each row is

    @property
    def capacity(self) -> int:
        return self.table.capacity

    def notes_room(self, n: int) -> None:
        """Let a pass note at most n offers and returns (then it stops for the host)."""
        self._notes = np.zeros((n, kb.N_NOTE), np.int64)
        self._shadows = np.zeros((n, ENTRY_SIZE), np.uint8)

    def attach_pnic(self, engine: PnicEngine) -> None:
        """Let passes run the rows of flows this PNIC engine holds (when the host sets
        `pnic_on`), as the PNIC's own pass runs them: it must run each machine as this fast
        path does."""
        if not engine.runs_as(self._knobs, self._routing):
            raise ValueError("the PNIC runs the machines with other knobs than the fast path")
        self._pnic_arrays = engine.pass_arrays()
        self._pnic_table = engine.table
        self._pnic = engine

    def let_pnic(self, on: bool, room: int = 0, supported: int = 0) -> None:
        """Whether the next passes run the attached PNIC's rows (`on`), and the offers they
        may make it: `room` more flows, of chains whose services are all in `supported`."""
        self.pnic_on = on
        ctl = self.pnic_ctl
        ctl[kb.C_ROOM] = room if on else 0
        ctl[kb.C_SUPPORTED] = supported

    @property
    def entries(self) -> np.ndarray:
        return self.table.entries

    def _allocate_held(self, n: int) -> None:
        self._held_keys, self._held_vals = ki.empty_index(max(n, 16))
        self._held_room = len(self._held_vals) // 4  # keys before it grows: a quarter full

    def _grow(self) -> None:
        """Double the table (EntryTable.grow) and the rows' own columns."""
        n = self.capacity
        self.table.grow()
        offer_at = np.zeros(2 * n, np.int64)
        offer_at[:n] = self._offer_at
        self._offer_at = offer_at
        self.tables.extend([None] * n)

    # -- flows in and out --------------------------------------------------------------------

    def cacheable(self, flow: Flow, tier: int) -> bool:
        """May this flow's state move into the table now? TCP past the SYN
        (kb.CACHED_TCP_STATES), or a UDP / ICMP echo flow, owned by the tier deciding it."""
        return flow.owner == tier and _runs_compiled(
            flow.key.proto, flow.tcp.state if flow.tcp is not None else 0)

    def admit(self, flow: Flow, table: FlowTable, tier: int, now: int, offer_at: int,
              bounded: bool) -> None:
        """After tier `tier` decided a packet of `flow` in Python: cache the flow if it may run
        here now (a batch is being decided, it is established, live and still `table`'s)."""
        if self.on and self.cacheable(flow, tier) and flow.expires > now and table.holds(flow):
            self.cache(flow, table, offer_at, bounded)

    def cache(self, flow: Flow, table: FlowTable, offer_at: int, bounded: bool) -> None:
        """Move the flow from its table into this one: its packets run compiled from now on,
        and the `Flow` is no more (the table finds it here, as a new `Flow`, when asked).
        offer_at: the packet count below which an offer of it would be refused (-1: it is never
        offered); bounded: its table has a limit (only an assured flow then, as early drop
        must read the flows it may drop)."""
        if not _kept(bounded, flow.status):
            return
        if not self.table.nfree:
            self._grow()
        slot = self.table.put(flow.to_bytes())
        if slot < 0:  # a key taken
            return
        self._offer_at[slot] = _NEVER if offer_at < 0 else offer_at
        self.tables[slot] = table
        table.detach(flow)
        self.live += 1
        self.cached += 1
        self.floor = min(self.floor, flow.expires)

    def pull(self, slot: int) -> Flow:
        """The flow of a row back into its table as a `Flow`; it runs in Python again."""
        table = self.tables[slot]
        if table is None:
            raise KeyError(f"row {slot} of the fast path holds no flow")
        flow = Flow.from_bytes(self.table.remove(slot))
        self.tables[slot] = None
        self.live -= 1
        table.attach(flow)
        return flow

    def find(self, key: FlowKey, table: FlowTable) -> tuple[Flow, int] | None:
        """The flow of `key` if this table holds it for `table`: pulled, with the key's
        direction."""
        hit = self.table.lookup(key)
        if hit < 0 or self.tables[hit >> 1] is not table:
            return None
        return self.pull(hit >> 1), hit & 1

    def peek(self, key: FlowKey, table: FlowTable, now: int) -> bool | None:
        """Does this table hold a live flow of `key` for `table` (left where it is)? None:
        it holds one that expired by `now`, which only a lookup may remove."""
        hit = self.table.lookup(key)
        if hit < 0 or self.tables[hit >> 1] is not table:
            return False
        return True if int(self.entries["expires"][hit >> 1]) > now else None

    def _slots_of(self, table: FlowTable) -> list[int]:
        """The rows holding `table`'s flows, in order."""
        return [s for s, t in enumerate(self.tables) if t is table]

    def pull_all(self, table: FlowTable) -> None:
        """Every flow of `table` back into it (to list all of them)."""
        for slot in self._slots_of(table):
            self.pull(slot)

    def entries_of(self, table: FlowTable) -> list[bytes]:
        """The entries of `table`'s flows here, by row, left where they are."""
        return [self.table.get(slot) for slot in self._slots_of(table)]

    def take_over(self, raw: bytes, old: FlowTable, new: FlowTable, tier: int, now: int,
                  offer_at: int, bounded: bool, may_run: bool) -> bool:
        """A handoff brought the entry `raw` of a flow whose row here is `old`'s: when `admit`
        would cache it for `new` at once (owned by `tier`, live at `now`; `offer_at`, `bounded`
        as `cache` takes them; `may_run`: its new owner lets it), the entry is written over
        that row, which is `new`'s now, its keys and index as they were. False: it must run in
        Python (its row, if it had one, is gone; `new` imports it)."""
        hit = self.table.lookup(key_of(raw))
        if hit < 0 or self.tables[hit >> 1] is not old:
            return False
        slot = hit >> 1
        old.cached -= 1
        row = self.entries[slot]  # the conditions of `admit` and `cache`, on the row
        if not (may_run and self.on and int(row["expires"]) > now
                and _runs_compiled(int(row["proto"]), int(row["tcp_state"]))
                and _kept(bounded, int(row["status"]))):
            self.table.remove(slot)
            self.tables[slot] = None
            self.live -= 1
            return False
        at = slot * ENTRY_SIZE
        buf = self.table.buf
        buf[at:at + ENTRY_SIZE] = raw
        buf[at + _OWNER] = tier
        self._offer_at[slot] = _NEVER if offer_at < 0 else offer_at
        self.tables[slot] = new
        new.cached += 1
        self.cached += 1
        return True

    def take(self, i: int) -> Flow:
        """The flow of batch row i, which stopped the last pass (STOP_PUNT, STOP_OFFER): back
        in its table, for software to continue."""
        return self.pull(int(self._returned[i]))

    def open_zone(self, zone: int, table: FlowTable | None, tier: int, offer_at: int) -> None:
        """Let the next passes open flows of `zone` into `table`, owned by `tier`, with this
        offer_at (see `cache`); None: they may not (software opens them). A zone whose bound
        `open_until` sets opens flows only before it."""
        row = self.open.zone[zone]
        self.zone_tables[zone] = table
        self._zones_open += (table is not None) - int(row[ko.Z_OPEN])
        row[ko.Z_OPEN] = table is not None
        row[ko.Z_TIER] = tier
        row[ko.Z_OFFER_AT] = _NEVER if offer_at < 0 else offer_at
        row[ko.Z_UNTIL] = _NEVER
        self.opening = self._zones_open > 0

    def open_until(self, zones: np.ndarray, until: int) -> None:
        """The zones `zones`, each given its table by `open_zone`, open flows only for rows
        before trace time `until`, and none when it is negative: one write for all of them."""
        rows = self.open.zone
        is_open = until >= 0
        if len(zones) <= _ROW_BY_ROW:  # numpy's indexed writes cost more than a few rows'
            for zone in zones.tolist():
                row = rows[zone]
                self._zones_open += is_open - int(row[ko.Z_OPEN])
                row[ko.Z_UNTIL] = until
                row[ko.Z_OPEN] = is_open
        else:
            self._zones_open += (len(zones) if is_open else 0) - int(rows[zones, ko.Z_OPEN].sum())
            rows[zones, ko.Z_UNTIL] = until
            rows[zones, ko.Z_OPEN] = is_open
        self.opening = self._zones_open > 0

    def hold(self, table: FlowTable) -> None:
        """Bring the index of the keys Python holds up to date with what `table` changed
        since (its `dirty` keys): a missed row whose key, or whose new flow's reply key, a
        `Flow` of a table holds is Python's (tiers/_fastpath_open.py). Keys that came and went
        between two passes (a flow decided in Python and cached at once) cost the index
        nothing."""
        dirty = table.dirty
        if not dirty:
            return
        indexed, held = table.indexed, self._held
        join: list[FlowKey] = []
        leave: list[FlowKey] = []
        for key in dirty:
            if table.has_key(key):
                if key not in indexed:
                    indexed.add(key)
                    n = held.get(key, 0)
                    held[key] = n + 1
                    if not n:
                        join.append(key)
            elif key in indexed:
                indexed.discard(key)
                self._let_go(key, leave)
        dirty.clear()
        self._held_update(join, leave)

    def forget(self, table: FlowTable) -> None:
        """`table` is no more (its machine handed its flows over): its keys leave the index."""
        if table.dirty is None:
            return
        leave: list[FlowKey] = []
        for key in table.indexed:
            self._let_go(key, leave)
        table.indexed.clear()
        table.dirty.clear()
        self._held_update([], leave)

    def _let_go(self, key: FlowKey, leave: list[FlowKey]) -> None:
        """One table fewer holds `key`; when none does, it joins `leave`."""
        n = self._held[key] - 1
        if n:
            self._held[key] = n
        else:
            del self._held[key]
            leave.append(key)

    def _held_update(self, join: list[FlowKey], leave: list[FlowKey]) -> None:
        if len(self._held) > self._held_room:  # grown past its room: a new index of them all
            self._allocate_held(2 * len(self._held))
            join, leave = list(self._held), []
        if join or leave:
            words = np.array([key_words(k) for k in (*leave, *join)], np.int64).reshape(-1, 5)
            ki.update_keys(self._held_keys, self._held_vals, words, len(leave))

    @property
    def active(self) -> bool:
        """Can a pass do anything: run a cached flow's packet, a PNIC flow's, or open a
        flow?"""
        return self.live > 0 or self.opening or self.pnic_on

    def _adopt(self, n: int) -> None:
        """The n flows the last pass opened: their tables count them. (A row opened may have
        been freed again in the pass, its flow moved down to the PNIC: `_heard` says so.)"""
        opened = self._opened[:n]
        zones = (opened >> 32).tolist()
        for slot, zone in zip((opened & 0xFFFFFFFF).tolist(), zones, strict=True):
            table = self.zone_tables[zone]
            assert table is not None  # an open zone has its table
            self.tables[slot] = table
            table.cached += 1
        self.live += n
        self.cached += n
        self.opened += n
        self.opened_all += n

    def set_policy(self, policy: OffloadPolicy) -> None:
        """The offload policy whose offers stop a pass (STOP_OFFER); one the kernel does not
        know stops it after every packet of an established flow, for Python to ask."""
        kind = _POLICIES.get(policy.name, kb.POLICY_ASK)
        self.policy = np.array([kind, policy.packets, policy.bytes], np.int64)

    def expire(self, now: int) -> None:
        """Cached flows expired by `now` go back to their tables, where the sweep finds them."""
        if now < self.floor or not self.live:
            return
        out = np.empty(self.capacity, np.int64)
        n, earliest = kb.expired_slots(self.table.mem, self.table.state, now, out)
        for slot in out[:n].tolist():
            self.pull(slot)
        self.floor = _NEVER if earliest < 0 else int(earliest)

    # -- the data path -----------------------------------------------------------------------

    def run(self, res: BatchResults, clock: np.ndarray, rows: np.ndarray, start: int,
            stop_time: int) -> tuple[int, int, int]:
        """rows[start:] of the batch in order, until one stops the pass: (position, why,
        rows after a STOP_SOFTWARE row that software may take too)."""
        if not self.active:
            return start, STOP_SOFTWARE, 0
        if len(self._returned) < len(res):
            self._returned = np.empty(len(res), np.int64)
        if len(self._opened) < len(res):
            self._opened = np.empty(len(res), np.int64)
        returned = self._returned  # the kernel sets only the punted row's
        fstate = self._fstate
        t = self.table
        fstate[0] = t.nfree
        fstate[1] = 0
        fstate[2] = _NEVER
        fstate[3] = _NEVER
        fstate[5] = 0
        tables = self.open
        pnic = self._pnic_arrays if self.pnic_on else self._no_pnic()
        ctl = self.pnic_ctl
        pnic_free = t.free  # a stand-in, unread
        if self.pnic_on:
            assert self._pnic_table is not None
            ctl[kb.C_NFREE] = self._pnic_table.nfree
            pnic_free = self._pnic_table.free
        at, why, ahead = kb.run_rows(
            res.buf, kernel_arg(res.offset, np.int64), res.caplen, res.wire_len, res.linktype,
            clock, rows, start, stop_time, res.verdict, res.reason, res.rule, returned,
            res.machine, res.direction, res.tier, t.mem, t.state, t.keys,
            t.vals, self._held_keys, self._held_vals, self._inside, self._public,
            self._knobs, self._routing, self._bounded,
            self._offer_at, self.policy, self._f, self.counts, tables.zone, tables.rules,
            tables.ports, tables.snat, t.free, fstate, self._opened, *pnic, self.pnic_on,
            self.min_timeout, self._notes, self._shadows, pnic_free, ctl)
        if fstate[1] or fstate[5]:
            t.nfree = int(fstate[0])
        if fstate[1]:
            self._adopt(int(fstate[1]))
        if fstate[5]:
            assert self._pnic_table is not None
            self._pnic_table.nfree = int(ctl[kb.C_NFREE])
            self._heard(int(fstate[5]))
        self.ran += at - start
        if start < at:
            # no packet it ran gives its entry less life than min_timeout but an RST before
            # any reply, whose entry expires at once (fstate[2])
            self.floor = min(self.floor, int(clock[rows[start]]) + self.min_timeout,
                             int(fstate[2]))
        self.pnic_from = -1 if fstate[3] == _NEVER else int(fstate[3])
        if why == STOP_PUNT:
            self.pull(int(returned[rows[at]]))
        return int(at), int(why), int(ahead)

    def _heard(self, n: int) -> None:
        """The n notes of the last pass, in order (_fastpath_batch.run_rows): entries it took
        back from the PNIC into rows here, flows it moved from rows here down to the PNIC.
        The PNIC's cache counts them and frees the slots taken back, in order; the host hands
        each to the VNIC. Most short connections' flows move down and come back within one
        pass: between the two notes nothing but the other notes can look at such a flow, so it
        needs no shadow there, and the host hears of all of them at once, by their keys, after
        the others (`Passed`, which ends the notes). A row a pass freed may have been taken
        again in it: each row noted ends with the table its state says."""
        assert self.on_take_back is not None and self.on_move_down is not None
        assert self.on_passed is not None and self._pnic is not None
        notes = self._notes[:n]
        back = notes[:, 0] == kb.NOTE_TAKEN_BACK
        partner = notes[:, 5]  # the pairs' (_fastpath_batch._note)
        taken = notes[back, 3].tolist()  # the PNIC's slots taken back, in order
        self._pnic.passed(n - len(taken), taken)
        self.live += 2 * len(taken) - n
        self.cached += len(taken)
        level = np.cumsum(np.where(back, -1, 1))  # the PNIC's count, from before the notes
        raws = self._shadows[:n].tobytes()  # the rows themselves may be others' flows by now
        rows, slots, backoffs = notes[:, 1].tolist(), notes[:, 2].tolist(), notes[:, 4].tolist()
        for k in np.flatnonzero(partner < 0).tolist():
            raw = raws[k * ENTRY_SIZE:(k + 1) * ENTRY_SIZE]
            if back[k]:
                self.on_take_back(rows[k], raw, backoffs[k])
            else:
                table = self.zone_tables[int.from_bytes(raw[_ZONE:_ZONE + 2], "little")]
                assert table is not None  # the VNIC's, unbounded: open to the pass
                self.on_move_down(rows[k], table, raw)
        down = np.flatnonzero((partner >= 0) & ~back)
        up = partner[down]
        moved = [raws[k * ENTRY_SIZE:(k + 1) * ENTRY_SIZE] for k in down.tolist()]
        self.on_passed(Passed(
            last_row=rows[-1], above=max(int(level.max()), 0) - int(level[-1]),
            keys=list(map(key_of, moved)), expires=list(map(expires_of, moved)),
            down_rows=notes[down, 1].tolist(), back_rows=notes[up, 1].tolist(),
            backoffs=notes[up, 4].tolist()))
        live = (self.table.state[slots] == ko.LIVE).tolist()
        for slot, on, zone in zip(slots, live, self.entries["zone"][slots].tolist(), strict=True):
            self.tables[slot] = self.zone_tables[zone] if on else None

    def handed_back(self, i: int) -> tuple[int, int]:
        """Batch row i stopped the last pass with STOP_RETURN: the PNIC's slot whose entry
        it punted out of the index, and the PuntReason."""
        return int(self._returned[i]), int(self._fstate[4])

    def _no_pnic(self) -> tuple[np.ndarray, ...]:
        """Stand-ins for the PNIC's arrays when a pass does not run its rows (never read)."""
        t = self.table
        return t.mem, t.state, t.keys, t.vals, self._fstate


def compilations() -> int:
    """How many times this process compiled the fast path's kernel (0: it came from the
    cache)."""
    return sum(sum(k.stats.cache_misses.values()) for k in (kb.run_rows, kb.row_marks,
                                                            kb.pair_mark, kb.pick_rows,
                                                            kb.pass_tally))


def _warm_fastpath() -> Fastpath:
    """A one-row fast path of one machine: what the warm-ups run the kernels on."""
    from flowshift.config import parse_config
    from flowshift.tiers.classify import Classifier

    cfg = parse_config({"machine": [{"name": "m", "addresses": ["10.0.0.0/24"],
                                     "services": ["count"]}]}, "fast path warm-up")
    return Fastpath(cfg, Classifier(cfg.machines), capacity=1)


def warm(data_path: bool = True) -> float:
    """Compile the fast path's kernels, or load them from the cache; the seconds it took (see
    pnic_engine.warm). `data_path=False`: all but the pass itself (`run_rows`), last first, in
    the other process of a first run, while the first compiles the pass
    (`replay.compile_ahead_work`)."""
    from flowshift.packet.build import tcp_frame
    from flowshift.packet.fragrows import fragment_rows
    from flowshift.packet.view import TCP_ACK
    from flowshift.results import BatchResults
    from flowshift.services.conntrack import FlowTable
    from flowshift.tiers.repass import Repass

    started = time.perf_counter()
    fp = _warm_fastpath()
    table = FlowTable()
    table.use_cache(fp)
    for sport in (1, 3):  # two flows: the table grows
        key = FlowKey(4, PROTO_TCP, 0, b"\x0a\x00\x00\x01", b"\x0a\x00\x01\x02", sport, 2)
        flow = Flow(key=key, xlat=key, machine=0, chain=0, tcp=TcpConn(), expires=1 << 40)
        assert flow.tcp is not None
        flow.tcp.state = TcpState.ESTABLISHED
        table.add(flow)
        fp.cache(flow, table, -1, bounded=False)
    frame = np.frombuffer(tcp_frame(src=key.src, dst=key.dst, sport=3, dport=2, seq=1, ack=1,
                                    flags=TCP_ACK, window=1), np.uint8).copy()
    n = len(frame)
    res = BatchResults.over(0, frame, np.zeros(1, np.int64), np.full(1, n, np.uint32),
                            np.full(1, n, np.uint32), np.ones(1, np.uint16),
                            np.zeros(1, np.int64))
    steps: list[Callable[[], object]] = [
        lambda: fp.run(res, res.ts, np.zeros(1, np.int64), 0, _NEVER),
        lambda: Repass().pick(res, np.zeros(1, np.int64), 0, [flow]),  # row_marks, pick_rows
        lambda: kb.pass_tally(np.ones(1, np.bool_), res.verdict, res.tier, res.wire_len,
                              int(Tier.PNIC), np.empty(1, np.bool_)),  # a PNIC pass's count
        lambda: fragment_rows(res.buf, res.offset, res.caplen, res.linktype, res.wire_len),
        lambda: fp.expire(1 << 41),
        lambda: ki.update_keys(fp._held_keys, fp._held_vals, np.zeros((1, 5), np.int64), 0)]
    # the other process takes them last first: the two meet halfway
    for step in steps if data_path else steps[:0:-1]:
        step()
    return time.perf_counter() - started


def warm_all(ahead: subprocess.Popen[bytes] | None = None) -> float:
    """Every kernel a replay runs, the PNIC's and the fast path's, compiled or loaded; then
    the cache is marked ready (_pnic_cache). `ahead`: the process compiling the PNIC's
    kernels meanwhile (`replay.compile_ahead_work`), waited for. The seconds."""
    seconds = pnic_engine.warm(ahead) + warm()
    mark_ready()
    return seconds
