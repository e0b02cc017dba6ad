"""The L4 load balancer: a VIP's new connections pick a backend by Maglev hashing.

The backend becomes part of the flow's state (its xlat destination and `backend` index), so
established connections keep their backend whatever happens to the pool later.
"""

from __future__ import annotations

from flowshift.config import LbPool
from flowshift.flow import FlowKey
from flowshift.services.maglev import Maglev, flow_hash


class LoadBalancer:
    def __init__(self, pools: tuple[LbPool, ...]) -> None:
        self.pools = {(p.proto, p.vip, p.port): p for p in pools}
        self.tables = {id(p): Maglev([(b.name, b.weight) for b in p.backends]) for p in pools}

    def pool_for(self, key: FlowKey) -> LbPool | None:
        return self.pools.get((key.proto, key.dst, key.dport))

    def pick(self, pool: LbPool, key: FlowKey) -> tuple[int, bytes, int]:
        """(backend index, address, port) for a new flow; index -1 when none can serve."""
        index = self.tables[id(pool)].lookup(flow_hash(key))
        if index < 0:
            return -1, b"", 0
        backend = pool.backends[index]
        return index, backend.addr, backend.port
