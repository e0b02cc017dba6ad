"""Applying a flow's NAT/LB translation to its packets (and to ICMP errors about it).

A flow's `key` is its original direction as it arrives and `xlat` the same direction as it
leaves. A packet of the original direction is rewritten key → xlat; a reply arrives as the
reverse of xlat and is rewritten back to the reverse of key. Checksums are updated
incrementally (RFC 1624) by packet.rewrite.

Every packet of a flow direction changes the same way, so that rewrite is worked out once
(`rewrite.plan_outer`) and kept for the next packets, keyed by what it depends on: the flow's
key, xlat and the direction.
"""

from __future__ import annotations

from functools import lru_cache

from flowshift.entry import Flow
from flowshift.flow import FlowKey
from flowshift.packet import rewrite
from flowshift.packet.view import Packet

# flow directions whose rewrite is kept worked out (about 800 bytes each, keys included); the
# least recently used is dropped first, and worked out again when its flow comes back
PLAN_CACHE = 1 << 14


def translate(pkt: Packet, flow: Flow, direction: int) -> None:
    """Rewrite a packet of `flow` travelling in `direction` (0 original, 1 reply)."""
    k, x = flow.key, flow.xlat
    if k == x:
        return
    plan = _plan(k, x, direction)
    if plan is not None and rewrite.rewrite_outer(pkt, plan):
        return
    # a packet the plan does not fit: one field after another
    src, dst, sport, dport = _target(k, x, direction)
    if pkt.src != src:
        rewrite.set_src(pkt, src)
    if pkt.dst != dst:
        rewrite.set_dst(pkt, dst)
    if pkt.sport != sport:
        rewrite.set_sport(pkt, sport)
    if pkt.dport != dport:
        rewrite.set_dport(pkt, dport)


def translate_first(pkt: Packet, flow: Flow) -> None:
    """`translate` for the packet that created `flow`: its rewrite is worked out but not kept,
    as the flow's next packets mostly run on the fast path (or are of the other direction);
    its next packet of this direction that runs here keeps it."""
    k, x = flow.key, flow.xlat
    if k == x:
        return
    plan = rewrite.plan_outer(k.family, k.proto, (k.src, k.dst, k.sport, k.dport),
                              (x.src, x.dst, x.sport, x.dport))
    if plan is None or not rewrite.rewrite_outer(pkt, plan):
        translate(pkt, flow, 0)


@lru_cache(maxsize=PLAN_CACHE)
def _plan(key: FlowKey, xlat: FlowKey, direction: int) -> rewrite.OuterRewrite | None:
    if direction == 0:  # as the packet arrives
        old = key.src, key.dst, key.sport, key.dport
    else:
        old = xlat.dst, xlat.src, xlat.dport, xlat.sport
    return rewrite.plan_outer(key.family, key.proto, old, _target(key, xlat, direction))


def _target(key: FlowKey, xlat: FlowKey, direction: int) -> rewrite.Tuple4:
    """(src, dst, sport, dport) a packet of `direction` leaves with."""
    if direction == 0:
        return xlat.src, xlat.dst, xlat.sport, xlat.dport
    return key.dst, key.src, key.dport, key.sport


def translate_related(pkt: Packet, flow: Flow, direction: int) -> None:
    """Rewrite an ICMP error about `flow` travelling in the flow's `direction`.

    As Linux nf_nat_icmp_reply_translation: the embedded datagram (a packet of the opposite
    direction) is put back into the form its endpoint sent it, and on the outer header only
    the translated side (the NAT'ed source, the DNAT'ed destination) is rewritten.
    """
    k, x = flow.key, flow.xlat
    if k == x:
        return
    inner = pkt.inner
    assert inner is not None
    if direction == 1:
        # error travelling back towards the originator about an original-direction packet
        # that left as xlat: make the inner look like the packet the originator sent (key)
        want = (k.src, k.dst, k.sport, k.dport)
        if k.src != x.src:  # SNAT: the error was addressed to the NAT address
            rewrite.set_dst(pkt, k.src)
        if k.dst != x.dst:  # DNAT/LB: the error came from the backend side
            rewrite.set_src(pkt, k.dst)
    else:
        # error travelling towards the responder about a reply-direction packet that was
        # delivered as reverse(key): make the inner look like the reply it sent (reverse(xlat))
        want = (x.dst, x.src, x.dport, x.sport)
        if k.src != x.src:
            rewrite.set_src(pkt, x.src)
        if k.dst != x.dst:
            rewrite.set_dst(pkt, x.dst)
    src, dst, sport, dport = want
    if inner.src != src:
        rewrite.set_inner_src(pkt, src)
    if inner.dst != dst:
        rewrite.set_inner_dst(pkt, dst)
    if inner.sport != sport:
        rewrite.set_inner_sport(pkt, sport)
    if inner.dport != dport:
        rewrite.set_inner_dport(pkt, dport)
