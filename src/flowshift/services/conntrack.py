"""The connection-tracking table and the non-TCP trackers (UDP, ICMP echo, generic).

The table maps both keys of a flow (original and reply, as packets arrive) to the flow and the
direction. Expiry follows Linux: a flow whose timeout passed is gone for the next packet that
looks it up (lazy), and a periodic sweep (`sweep`, driven by the host on trace time) frees the
memory of flows nobody looked up again, without changing any result.
TCP tracking lives in conntrack_tcp.py. Any other protocol is tracked as Linux's generic
tracker does (nf_conntrack_proto_generic): by addresses and protocol, every packet refreshing
a 600 s timeout. Every timeout comes from the chain's `Knobs` (its `[conntrack]` table).
"""

from __future__ import annotations

import heapq
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from flowshift.conntrack_types import (  # the Linux defaults, shared with the PNIC kernels
    DEFAULT_KNOBS,
    GENERIC_TIMEOUT,
    ICMP_TIMEOUT,
    NF_CT_EVICTION_RANGE,
    SECOND,
    UDP_STREAM_AFTER,
    UDP_TIMEOUT_REPLIED,
    UDP_TIMEOUT_UNREPLIED,
    Knobs,
)
from flowshift.entry import Flow, Status, Tier
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, FlowKey

__all__ = ["GENERIC_TIMEOUT", "ICMP_TIMEOUT", "SECOND", "UDP_STREAM_AFTER", "UDP_TIMEOUT_REPLIED",
           "UDP_TIMEOUT_UNREPLIED", "FlowTable", "icmp_update", "udp_update"]



_SEEN_REPLY = int(Status.SEEN_REPLY)  # plain ints: IntFlag arithmetic builds enum members
_ASSURED = int(Status.ASSURED)
_PNIC = int(Tier.PNIC)


def udp_update(flow: Flow, direction: int, now: int, knobs: Knobs = DEFAULT_KNOBS) -> None:
    """Linux nf_conntrack_udp_packet: the timeout and ASSURED for one packet of a tracked flow."""
    if flow.status & _SEEN_REPLY:
        timeout = knobs.udp_timeout
        if now > flow.stream_ts:
            timeout = knobs.udp_timeout_stream
            flow.status |= _ASSURED
        flow.expires = now + timeout
    else:
        flow.expires = now + knobs.udp_timeout


def icmp_update(flow: Flow, direction: int, now: int, knobs: Knobs = DEFAULT_KNOBS) -> None:
    """Linux nf_conntrack_icmp_packet / icmpv6: every packet refreshes the timeout."""
    flow.expires = now + (knobs.icmp_timeout if flow.key.proto == PROTO_ICMP
                          else knobs.icmpv6_timeout)


def generic_update(flow: Flow, direction: int, now: int, knobs: Knobs = DEFAULT_KNOBS) -> None:
    """Linux nf_conntrack_generic: every packet refreshes the timeout."""
    flow.expires = now + knobs.generic_timeout


def generic_timeout(flow: Flow, knobs: Knobs = DEFAULT_KNOBS) -> int:
    """The timeout a packet of this non-TCP flow would give it now."""
    proto = flow.key.proto
    if proto == PROTO_UDP:
        return knobs.udp_timeout_stream if flow.status & _SEEN_REPLY else knobs.udp_timeout
    if proto == PROTO_ICMP:
        return knobs.icmp_timeout
    if proto == PROTO_ICMPV6:
        return knobs.icmpv6_timeout
    return knobs.generic_timeout


_HEAD = struct.Struct("!BBI")  # family, protocol, zone
_PORTS = struct.Struct("!HH")


def _bucket(family: int, proto: int, zone: int, src: bytes, dst: bytes, sport: int, dport: int,
            buckets: int) -> int:
    return zlib.crc32(_HEAD.pack(family, proto, zone) + src + dst
                      + _PORTS.pack(sport, dport)) % buckets


def bucket_of(key: FlowKey, buckets: int) -> int:
    """The hash bucket of one tuple in a bounded table: a fixed hash (CRC-32 of the tuple),
    so that early drop picks the same entries in every run, whatever PYTHONHASHSEED is."""
    return _bucket(*key, buckets)


def _homes(flow: Flow, buckets: int) -> tuple[int, ...]:
    """The buckets of both tuples of a flow (its reply tuple: the translated one reversed)."""
    x = flow.xlat
    one = bucket_of(flow.key, buckets)
    two = _bucket(x.family, x.proto, x.zone, x.dst, x.src, x.dport, x.sport, buckets)
    return (one,) if one == two else (one, two)


@dataclass(slots=True)
class _Deadline:
    """A flow of a bounded table as its deadline heap knows it."""

    added: int  # add number: the table's order, and the heap's tie-break
    due: int | None  # the expiry of its one valid heap entry (None: none, a PNIC-owned flow)
    flow: Flow | None  # None once removed: a stale heap entry does not keep the flow alive
    reply: FlowKey  # its reply tuple and hash buckets, as added
    homes: tuple[int, ...]


class Cache(Protocol):
    """Where flows of a table may live as entries instead of `Flow`s (tiers/fastpath.py)."""

    def find(self, key: FlowKey, table: FlowTable) -> tuple[Flow, int] | None:
        """The flow of `key` held for `table`, back in the table as a `Flow`."""

    def peek(self, key: FlowKey, table: FlowTable, now: int) -> bool | None:
        """Is a live flow of `key` held for `table` (None: one that expired)?"""

    def pull_all(self, table: FlowTable) -> None:
        """Every flow held for `table` back in it."""

    def expire(self, now: int) -> None:
        """Every flow held that expired by `now` back in its table."""

    def entries_of(self, table: FlowTable) -> list[bytes]:
        """The entries of the flows held for `table`, left where they are."""


class FlowTable:
    """Flows of one chain, by both of their keys.

    A bounded table (`buckets` > 0, Linux's nf_conntrack_max) also keeps each flow in the hash
    buckets of both its tuples, as Linux's table does, for `early_drop`, and a deadline heap
    of its flows, so that the sweep a new flow at the limit runs looks only at the flows whose
    timeout may have passed: the cost of a new flow does not grow with the table.

    The heap holds each flow's expiry as last seen, never later than the flow's own: `add`
    records it, a sweep that finds it moved on pushes it again, and whoever moves a flow's
    expiry earlier in place, or hands a PNIC-owned flow back to software without `add`, calls
    `touch` (the chain after each packet of a tracked flow, the VNIC after a PNIC crash).

    With a `cache`, some flows (`cached` of them) live there as entries, not here: every read
    here finds them there and takes them back first (they come back through `attach`, with
    their expiry as it stands).
    """

    def __init__(self, buckets: int = 0) -> None:
        self._by_key: dict[FlowKey, tuple[Flow, int]] = {}
        # The flow and direction of a key, live or not (callers check `expires`). The dict's
        # own method while nothing is cached: every packet looks its flow up.
        self.get: Callable[[FlowKey], tuple[Flow, int] | None] = self._by_key.get
        self.cache: Cache | None = None
        self.cached = 0
        self.buckets = buckets
        self._bucket: dict[int, list[Flow]] = {}  # bucket -> its flows, oldest first
        # bounded: the heap of (expiry, add number, deadline), and each flow's deadline by id
        self._heap: list[tuple[int, int, _Deadline]] = []
        self._deadline: dict[int, _Deadline] = {}
        self._adds = 0
        # With a cache that opens flows itself (tiers/fastpath.py `hold`): the keys whose
        # presence here changed since it last looked, and those it knows this table holds.
        # None: no such cache (or a bounded table, where it opens none).
        self.dirty: set[FlowKey] | None = None
        self.indexed: set[FlowKey] = set()

    def __len__(self) -> int:
        return len(self._by_key) // 2 + self.cached

    def use_cache(self, cache: Cache) -> None:
        """Let flows of this table live in `cache` (which `detach`es and `attach`es them)."""
        self.cache = cache
        self.get = self._get_or_find
        if not self.buckets:
            self.dirty = set(self._by_key)

    def _get_or_find(self, key: FlowKey) -> tuple[Flow, int] | None:
        hit = self._by_key.get(key)
        if hit is None and self.cached and self.cache is not None:
            return self.cache.find(key, self)
        return hit

    def cached_live(self, key: FlowKey, now: int) -> bool | None:
        """Is `key` a key of a live flow the cache holds for this table, left there? None: it
        is not known without a lookup (held here, or expired there)."""
        if key in self._by_key or not self.cached or self.cache is None:
            return None
        return self.cache.peek(key, self, now)

    def __iter__(self) -> Iterator[Flow]:
        if self.cached and self.cache is not None:
            self.cache.pull_all(self)
        yield from self._own()

    def _own(self) -> list[Flow]:
        """The flows held here as `Flow`s, each once, in the order they came."""
        return [flow for key, (flow, direction) in self._by_key.items()
                if direction == 0 or key is flow.key]  # its own key (a reply of its own: both)

    def entries(self) -> list[bytes]:
        """Every flow's entry, in the order iterating lists the flows (those held here, then
        the cache's), the cache's read where they are: what a handoff sends."""
        out = [flow.to_bytes() for flow in self._own()]
        if self.cached and self.cache is not None:
            out.extend(self.cache.entries_of(self))
        return out

    def _note(self, key: FlowKey) -> None:
        """`key` came or went: dirty holds exactly the keys whose presence here differs from
        what the cache knows (`indexed`), so a flow that comes and goes between two looks (one
        decided in Python and cached at once, say) leaves nothing behind."""
        assert self.dirty is not None
        if (key in self._by_key) == (key in self.indexed):
            self.dirty.discard(key)
        else:
            self.dirty.add(key)

    def has_key(self, key: FlowKey) -> bool:
        """Does a flow held here as a `Flow` have this key (live or not)?"""
        return key in self._by_key

    def detach(self, flow: Flow) -> None:
        """The cache takes the flow: it leaves the table but still counts."""
        self.remove(flow)
        self.cached += 1

    def attach(self, flow: Flow) -> None:
        """The cache gives a flow back (none of its keys is here: it was detached)."""
        self.cached -= 1
        self._insert(flow)

    def holds(self, flow: Flow) -> bool:
        """Is this very flow in the table (not dropped, not replaced)?"""
        hit = self._by_key.get(flow.key)
        return hit is not None and hit[0] is flow

    def add(self, flow: Flow) -> None:
        old = self.get(flow.key)
        if old is not None and old[0] is not flow:
            self.remove(old[0])  # an entry that replaces its flow's older copy
        elif old is not None:
            self.touch(flow)
            return
        self._claim(flow.reply_key)
        self._insert(flow)

    def add_new(self, flow: Flow) -> None:
        """Add a flow whose key the table does not hold: the chain just looked the key up,
        found no flow, and nothing since can have brought one (a lookup pulls a cached flow
        back by either of its keys, so a flow holding this key would have been found). `add`'s
        own lookup, which asks the cache too, is skipped."""
        if flow.key in self._by_key:
            raise RuntimeError(f"a new flow's key is taken: {flow.key}")
        self._claim(flow.reply_key)
        self._insert(flow)

    def _claim(self, key: FlowKey) -> None:
        """A flow is about to take `key` (its reply key, which may be another flow's own key):
        a cached flow holding it comes back first, so that it loses the key here, as it does
        in a table without a cache."""
        if self.cached and self.cache is not None and key not in self._by_key:
            self.cache.find(key, self)

    def _insert(self, flow: Flow) -> None:
        if self.buckets:
            d = self._deadline.get(id(flow))
            if d is not None and d.flow is flow:
                # still here by its reply key alone (another flow's reply took its own key
                # over, and that flow is gone): one place in the buckets, one deadline
                self.remove(flow)
        reply = flow.reply_key
        # A flow whose reply is its own key (a packet to its own address and port) is held
        # under it as the reply, as Linux finds its reply tuple first; it is still listed
        # and swept by that key.
        self._by_key[flow.key] = (flow, 0)
        self._by_key[reply] = (flow, 1)
        if self.dirty is not None:
            for key in (flow.key, reply):
                self._note(key)
        if self.buckets:
            homes = _homes(flow, self.buckets)
            for b in homes:
                self._bucket.setdefault(b, []).append(flow)
            self._adds += 1
            d = _Deadline(self._adds, flow.expires, flow, reply, homes)
            self._deadline[id(flow)] = d
            self._push(d, flow.expires)

    def touch(self, flow: Flow) -> None:
        """`flow`'s expiry moved in place (or it is software's again): the sweep sees it."""
        d = self._deadline.get(id(flow))
        if d is not None and d.flow is flow and (d.due is None or flow.expires < d.due):
            d.due = flow.expires
            self._push(d, flow.expires)

    def _push(self, d: _Deadline, due: int) -> None:
        """The heap entry of `d` (`d.due` is `due`; its entries at other times are stale)."""
        heap = self._heap
        heapq.heappush(heap, (due, d.added, d))
        if len(heap) > 2 * len(self._deadline) + 64:  # mostly stale entries: rebuild
            heap[:] = [(e.due, e.added, e) for e in self._deadline.values()
                       if e.due is not None]
            heapq.heapify(heap)

    def remove(self, flow: Flow) -> None:
        d = self._deadline.get(id(flow)) if self.buckets else None
        if d is not None and d.flow is not flow:
            d = None
        for key in (flow.key, flow.reply_key if d is None else d.reply):
            hit = self._by_key.get(key)
            if hit is not None and hit[0] is flow:
                del self._by_key[key]
                if self.dirty is not None:
                    self._note(key)
        if self.buckets:
            if d is not None:
                del self._deadline[id(flow)]
                d.flow = None
            for b in _homes(flow, self.buckets) if d is None else d.homes:
                chain = self._bucket.get(b)
                if chain is not None:
                    for i, other in enumerate(chain):
                        if other is flow:
                            del chain[i]
                            break
                    if not chain:
                        del self._bucket[b]

    def sweep(self, now: int, keep: int = -1,
              spare: Callable[[FlowKey], bool] | None = None) -> list[Flow]:
        """Remove flows whose timeout has passed; flows owned by tier `keep`, and flows for
        which `spare(key)` is true (packets of theirs not decided yet), are left alone. The
        flows removed, in the order they were added.

        Unbounded, or keeping flows of a tier other than the PNIC: a scan of the whole table
        (no per-flow timer state, so a million flows cost nothing between sweeps). Bounded and
        keeping the PNIC's flows (a sweep at the limit): only the flows the heap says are due.
        """
        if self.cache is not None:
            self.cache.expire(now)  # a cached flow's expiry is the cache's: expired ones back
        if self.buckets and keep == _PNIC:
            return self._sweep_due(now, spare)
        gone = [flow for key, (flow, direction) in self._by_key.items()
                if (direction == 0 or key is flow.key) and flow.expires <= now
                and flow.owner != keep and (spare is None or not spare(flow.key))]
        for flow in gone:
            self.remove(flow)
        return gone

    def _sweep_due(self, now: int, spare: Callable[[FlowKey], bool] | None) -> list[Flow]:
        heap, by_key = self._heap, self._by_key
        if not heap or heap[0][0] > now:
            return []  # nothing due: the common case in a flood
        due: list[tuple[int, Flow]] = []
        spared: list[tuple[_Deadline, int]] = []
        while heap and heap[0][0] <= now:
            expires, _, d = heapq.heappop(heap)
            flow = d.flow
            if flow is None or d.due != expires:
                continue  # stale: the flow left, or has an entry at another time
            d.due = None  # handled below: a duplicate of this entry is stale now
            hit = by_key.get(flow.key)
            if hit is None or hit[0] is not flow:
                pass  # its key was taken over by another flow: not the table's to sweep
            elif flow.owner == _PNIC:
                pass  # the PNIC's: `add` or `touch` when it comes back
            elif flow.expires > now:
                d.due = flow.expires
                heapq.heappush(heap, (d.due, d.added, d))
            elif spare is not None and spare(flow.key):
                spared.append((d, flow.expires))
            else:
                due.append((d.added, flow))
        for d, expires in spared:  # due still: looked at again by the next sweep
            d.due = expires
            heapq.heappush(heap, (expires, d.added, d))
        due.sort(key=lambda a: a[0])
        gone = [flow for _, flow in due]
        for flow in gone:
            self.remove(flow)
        return gone

    def early_drop(self, key: FlowKey, owner: int,
                   spare: Callable[[FlowKey], bool] | None = None) -> list[Flow]:
        """Linux early_drop for a new entry with tuple `key` in a full table: scan the
        NF_CT_EVICTION_RANGE buckets from the key's on, and in the first that holds any flow
        that is not assured, remove every such flow; the flows removed (none: the table stays
        full). Only flows of tier `owner` that `spare` does not protect are candidates."""
        home = bucket_of(key, self.buckets)
        for i in range(NF_CT_EVICTION_RANGE):
            chain = self._bucket.get((home + i) % self.buckets, [])
            # (a bounded table caches only assured flows, never candidates: none is missed)
            drop = [flow for flow in chain if not flow.status & _ASSURED
                    and flow.owner == owner and (spare is None or not spare(flow.key))]
            for flow in drop:
                self.remove(flow)
            if drop:
                return drop
        return []
