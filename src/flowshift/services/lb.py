"""The L4 load balancer: a VIP's new connections pick a backend, by hashing or in turn.

Each pool has a scheduler (config `scheduler`):

- "maglev": Maglev consistent hashing of the 5-tuple (maglev.py). Stateless: every tier that
  builds the pool's table picks the same backend for the same connection.
- "round-robin": as Linux nftables `numgen inc mod N` (and IPVS rr): each new connection of
  the pool takes the next slot of a cycle in which a backend of weight w has w slots in a row,
  in list order (weight 0: none). The position in the cycle is state of the pool, kept by the
  chain and not by any flow, so it travels with the chain when a machine hands its chain to
  its VNIC: `state()` and `restore()`.

The backend becomes part of the flow's state (its xlat destination and `backend` index), so
established connections keep their backend whatever happens to the pool later.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from flowshift.config import LbPool
from flowshift.flow import FlowKey, format_endpoint
from flowshift.services.maglev import NO_BACKEND, Maglev, flow_hash


class LoadBalancer:
    def __init__(self, pools: tuple[LbPool, ...]) -> None:
        self.order = pools  # config order: the order of state()
        self.pools = {(p.proto, p.vip, p.port): i for i, p in enumerate(pools)}
        self.tables = {
            i: Maglev([(b.name, b.weight) for b in p.backends])
            for i, p in enumerate(pools)
            if p.scheduler == "maglev"
        }
        # round robin: where each slot run of the cycle ends, and the next slot per pool
        self.ends = [list(accumulate(b.weight for b in p.backends)) for p in pools]
        self.next = [0] * len(pools)

    def pool_for(self, key: FlowKey) -> LbPool | None:
        i = self.pools.get((key.proto, key.dst, key.dport))
        return None if i is None else self.order[i]

    def peek(self, pool: LbPool, key: FlowKey) -> tuple[int, bytes, int]:
        """(backend index, address, port) a new flow would get; index -1 when none can serve.
        Changes nothing: `advance` commits a round-robin pick once the flow exists."""
        i = self.pools[(pool.proto, pool.vip, pool.port)]
        if i in self.tables:
            index = self.tables[i].lookup(flow_hash(key))
        else:
            index = self._in_turn(i)
        if index < 0:
            return -1, b"", 0
        backend = pool.backends[index]
        return index, backend.addr, backend.port

    def advance(self, pool: LbPool) -> None:
        """A flow took the pool's current pick: a round-robin pool moves to its next slot."""
        i = self.pools[(pool.proto, pool.vip, pool.port)]
        cycle = self._cycle(i)
        if cycle:
            self.next[i] = (self.next[i] + 1) % cycle

    def pick(self, pool: LbPool, key: FlowKey) -> tuple[int, bytes, int]:
        """`peek` and `advance` at once."""
        hit = self.peek(pool, key)
        if hit[0] >= 0:
            self.advance(pool)
        return hit

    def _in_turn(self, i: int) -> int:
        cycle = self._cycle(i)
        if cycle == 0:
            return NO_BACKEND
        return bisect_right(self.ends[i], self.next[i])  # the backend whose run holds the slot

    def _cycle(self, i: int) -> int:
        """Slots in pool i's round-robin cycle: its total weight (0 for Maglev pools)."""
        ends = self.ends[i]
        return ends[-1] if ends and i not in self.tables else 0

    # -- the pools' state, for a handoff of the chain ----------------------------------------

    def state(self) -> list[int]:
        """Per pool, in config order: the next round-robin slot (always 0 for Maglev pools)."""
        return list(self.next)

    def restore(self, state: list[int]) -> None:
        """Continue from `state()` of a chain with the same pools; ValueError names a misfit."""
        if not isinstance(state, list) or len(state) != len(self.order):
            raise ValueError(
                f"LB state must be a list of {len(self.order)} slot numbers, one per pool, "
                f"got {state!r:.80}"
            )
        for i, slot in enumerate(state):
            cycle = self._cycle(i)
            if (
                isinstance(slot, bool)
                or not isinstance(slot, int)
                or not (0 <= slot < max(cycle, 1))
            ):
                pool = self.order[i]
                raise ValueError(
                    f"LB state of pool {i} ({format_endpoint(pool.vip, pool.port)}): slot "
                    f"{slot!r:.40} is not an integer in 0-{max(cycle, 1) - 1}"
                )
        self.next = list(state)
