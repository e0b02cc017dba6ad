"""The reference engine: one machine's service chain, per packet, in plain Python.

This is the readable statement of flowshift's semantics; every faster engine must agree with it
bit for bit. Order as in netfilter: egress runs the firewall on the machine-side tuple, then
SNAT; ingress runs DNAT/LB first, then the firewall on the (now machine-side) tuple. Packets of
tracked flows pass in both directions while the flow is valid, translated by the flow's entry.

A tier runs a `Chain` built from the machine's config; flows move between chains as entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flowshift.config import FirewallConfig, LbPool, MachineConfig
from flowshift.conntrack_types import DEFAULT_KNOBS, Knobs
from flowshift.entry import Flow, Service, Status, Tier, chain_bits
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey, new_key
from flowshift.packet.parse import ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST
from flowshift.packet.route import decrement_ttl
from flowshift.packet.view import TCP_ACK, TCP_SYN, Packet
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.conntrack import (
    UDP_STREAM_AFTER,
    FlowTable,
    generic_update,
    icmp_update,
    udp_update,
)
from flowshift.services.lb import LoadBalancer
from flowshift.services.nat import Nat
from flowshift.services.rules import EGRESS, INGRESS, RuleSet
from flowshift.services.xlat import translate, translate_first, translate_related
from flowshift.verdict import Reason, Verdict

__all__ = ["EGRESS", "INGRESS", "Chain", "Outcome", "forward_hop", "process_flow"]


@dataclass(slots=True)
class Outcome:
    verdict: Verdict
    reason: Reason
    rule: int = -1  # firewall rule index when reason is RULE
    flow: Flow | None = None  # the flow the packet belongs to (None: untracked)
    direction: int = 0  # within the flow
    created: bool = False  # the packet started this flow


_ECHO_REQUESTS = {PROTO_ICMP: ICMP_ECHO_REQUEST, PROTO_ICMPV6: ICMPV6_ECHO_REQUEST}

# Per-packet constants as module globals: enum attribute lookups cost ~70 ns each, and IntFlag
# arithmetic builds a new enum member; flow.status holds a plain int.
_SEEN_REPLY = int(Status.SEEN_REPLY)
_ASSURED = int(Status.ASSURED)
_NAT = int(Status.NAT)
_FORWARD = Verdict.FORWARD
_DROP = Verdict.DROP
_ESTABLISHED = Reason.ESTABLISHED
_INVALID = Reason.INVALID
_RULE = Reason.RULE
_DEFAULT = Reason.DEFAULT
_TCP_REOPEN = ct_tcp.TcpAction.REOPEN
_TCP_ACCEPT = ct_tcp.TcpAction.ACCEPT
_TCP_INVALID = ct_tcp.TcpAction.INVALID
_TCP_IGNORE = ct_tcp.TcpAction.IGNORE
_tcp_packet = ct_tcp.tcp_packet
_TIME_WAIT = int(ct_tcp.TcpState.TIME_WAIT)
_SYN, _SYN_ACK = TCP_SYN, TCP_SYN | TCP_ACK


def process_flow(pkt: Packet, flow: Flow, fdir: int, now: int,
                 knobs: Knobs = DEFAULT_KNOBS) -> Outcome | None:
    """A packet of a tracked flow. None: the flow must be destroyed and the packet is new.
    knobs: the sysctls of the chain's conntrack table."""
    proto = flow.key.proto
    if proto == PROTO_TCP:
        tcp = flow.tcp
        if tcp is None:  # a TCP flow is built with its TcpConn (Chain, Flow.from_bytes)
            raise ValueError(f"TCP flow without TCP state: {flow.key}")
        res = _tcp_packet(tcp, fdir, pkt, flow.status & _ASSURED != 0, knobs)
        action = res.action
        if action == _TCP_REOPEN:
            return None
        if tcp.seen_reply:
            flow.status |= _SEEN_REPLY
        if res.assured:
            flow.status |= _ASSURED
        if action == _TCP_INVALID:
            if res.timeout_ns > 0:  # Linux shortens the life of a doomed assured conntrack
                flow.expires = min(flow.expires, now + res.timeout_ns)
            return Outcome(_DROP, _INVALID, -1, flow, fdir)
        if action == _TCP_IGNORE:
            translate(pkt, flow, fdir)
            return Outcome(_FORWARD, _ESTABLISHED, -1, flow, fdir)
        if res.timeout_ns == ct_tcp.TIMEOUT_DESTROY:
            flow.expires = now  # gone for the next packet (an RST before any reply)
        elif res.timeout_ns > 0:
            flow.expires = now + res.timeout_ns
    elif proto == PROTO_UDP:
        udp_update(flow, fdir, now, knobs)
        if fdir:
            flow.status |= _SEEN_REPLY
    else:
        (icmp_update if proto in _ECHO_REQUESTS else generic_update)(flow, fdir, now, knobs)
        if fdir:
            flow.status |= _SEEN_REPLY
    flow.packets[fdir] += 1
    flow.bytes[fdir] += pkt.ip_total
    flow.last_seen = now
    translate(pkt, flow, fdir)
    return Outcome(_FORWARD, _ESTABLISHED, -1, flow, fdir)


def _firewall(machine: MachineConfig) -> FirewallConfig:
    if machine.firewall is None:
        raise ValueError(f"machine {machine.name!r}: services lists 'firewall' but there is "
                         "no firewall section")
    return machine.firewall


# Decided before a router's ip_forward (prerouting: conntrack allocation, defragmentation,
# DNAT/LB): the TTL check never sees these packets
_PREROUTING = frozenset({Reason.TABLE_FULL, Reason.NO_BACKEND, Reason.FRAGMENT})


def forward_hop(pkt: Packet, out: Outcome) -> Outcome:
    """A routing machine's ip_forward on a decided packet: one that arrives with TTL / hop
    limit 1 or 0 is dropped (ttl-exceeded) whatever the forward hook would have decided (the
    flow it belongs to was updated by conntrack already, as Linux's prerouting does); a
    forwarded one leaves with its TTL / hop limit one lower."""
    if pkt.ttl <= 1:
        if out.reason in _PREROUTING:
            return out
        return Outcome(_DROP, Reason.TTL_EXCEEDED, -1, None if out.created else out.flow,
                       out.direction)
    if out.verdict == _FORWARD:
        decrement_ttl(pkt)
    return out


class Chain:
    """A machine's chain: its config, its flows, and the per-packet pipeline."""

    def __init__(self, machine: MachineConfig, index: int, tier: Tier = Tier.MACHINE) -> None:
        self.config = machine
        self.index = index  # the machine's index: the zone of its flow keys
        self.tier = tier
        self.services = chain_bits(machine.services)
        self.rules = RuleSet(_firewall(machine)) if self.services & Service.FIREWALL else None
        self.nat = Nat(machine.nat) if self.services & Service.NAT else None
        self.lb = LoadBalancer(machine.lb) if self.services & Service.LB else None
        self.knobs = machine.conntrack.knobs()  # the sysctls of this machine's conntrack table
        self.router = machine.forwarding == "router"  # ip_forward's TTL check and decrement
        # a bounded table hashes its flows into `max` buckets (Linux's early_drop scans them)
        self.flows = FlowTable(self.knobs.max)
        # flows whose packets or entry are on their way between tiers: never early-dropped
        # (the VNIC sets it), and what to forget of a flow the table drops
        self.spare: Callable[[FlowKey], bool] | None = None
        self.dropped: Callable[[Flow], None] | None = None
        self._picked: LbPool | None = None  # a pool whose pick the decision under way took

    # -- lookups (a subclass may resolve flows whose state lives on another tier) ------------

    def lookup(self, key: FlowKey, now: int) -> tuple[Flow, int] | None:
        """The live flow of `key`; an expired one is removed (Linux: gone at its timeout)."""
        hit = self.flows.get(key)
        if hit is None:
            return None
        flow = hit[0]
        if flow.owner != self.tier:
            return self.lookup_remote(key, now)
        if flow.expires <= now:
            self._drop(flow)
            return None
        return hit

    def _drop(self, flow: Flow) -> None:
        """The flow is gone from the table (expired, replaced by a new conntrack, evicted):
        whoever keeps state by its key hears of it (`dropped`)."""
        self.flows.remove(flow)
        if self.dropped is not None:
            self.dropped(flow)

    def lookup_remote(self, key: FlowKey, now: int) -> tuple[Flow, int] | None:
        """A flow owned by another tier: a plain chain has none (the VNIC overrides this)."""
        return self.flows.get(key)

    def in_use(self, reply_key: FlowKey, now: int) -> bool:
        """Linux nf_nat_used_tuple: does a live flow hold this reply key? A flow cached on the
        fast path is asked there and left there (a lookup would take it back to Python)."""
        live = self.flows.cached_live(reply_key, now)
        if live is not None:
            return live
        return self.lookup(reply_key, now) is not None

    # -- the pipeline ---------------------------------------------------------------------

    def process(self, pkt: Packet, direction: int, now: int) -> Outcome:
        """Run one parsed IP packet of this machine (`direction`: EGRESS or INGRESS)."""
        out = self._process(pkt, direction, now)
        if not self.router:
            return out
        hop = forward_hop(pkt, out)
        if hop is not out and out.created and out.flow is not None:
            self._drop(out.flow)  # Linux: the unconfirmed conntrack dies with it
        return hop

    def _process(self, pkt: Packet, direction: int, now: int) -> Outcome:
        if not self.services:
            return Outcome(Verdict.FORWARD, Reason.NONE)
        if pkt.frag_offset:
            # flowshift does not reassemble (Linux defragments before conntrack)
            return Outcome(Verdict.DROP, Reason.FRAGMENT)
        if pkt.inner is not None:
            return self._related(pkt, pkt.inner, direction, now)
        key = new_key((pkt.family, pkt.proto, self.index, pkt.src, pkt.dst, pkt.sport,
                       pkt.dport))  # pkt.key(self.index)
        hit = self.lookup(key, now)
        if hit is not None:
            flow, fdir = hit
            out = process_flow(pkt, flow, fdir, now, self.knobs)
            if out is not None:
                if self.flows.buckets:  # its expiry may have moved earlier (FIN, RST)
                    self.flows.touch(flow)
                return out
            self._drop(flow)  # TCP reopen: the old conntrack is gone, start anew
        return self._new(pkt, key, direction, now)

    def _new(self, pkt: Packet, key: FlowKey, direction: int, now: int) -> Outcome:
        """A packet that may start a flow. The decision has no side effect until it is final:
        then a round-robin pool whose pick was evaluated moves on (Linux: `numgen inc` runs
        in prerouting, whatever the forward filter or NAT later decide)."""
        self._picked = None
        out = self._decide_new(pkt, key, direction, now)
        if self._picked is not None:
            if self.lb is None:  # only the load balancer picks a pool
                raise RuntimeError("a pool was picked in a chain without a load balancer")
            self.lb.advance(self._picked)
        return out

    def at_limit(self) -> bool:
        """Is the table full (nf_conntrack_max)? A new flow then needs room first."""
        cap = self.knobs.max
        return cap > 0 and len(self.flows) >= cap

    def _room(self, key: FlowKey, now: int) -> bool:
        """Room for one more conntrack, as Linux's __nf_conntrack_alloc at nf_conntrack_max:
        expired entries are gone first (flowshift counts live entries only), then early_drop
        evicts the entries that are not assured from the first of the buckets it scans that
        has any. Assured flows, and flows of another tier, are never touched."""
        if not self.at_limit():
            return True
        gone = self.flows.sweep(now, keep=Tier.PNIC, spare=self.spare)
        if not self.at_limit():
            dropped: list[Flow] = []
        else:
            dropped = self.flows.early_drop(key, int(self.tier), self.spare)
        if self.dropped is not None:
            for flow in (*gone, *dropped):
                self.dropped(flow)
        return not self.at_limit()

    def _decide_new(self, pkt: Packet, key: FlowKey, direction: int, now: int) -> Outcome:
        proto = key.proto
        tcp = opened = None
        untrackable = proto in _ECHO_REQUESTS and (pkt.icmp_id < 0
                                                   or pkt.icmp_type != _ECHO_REQUESTS[proto])
        if not untrackable and not self._room(key, now):
            # Linux allocates the conntrack before any rule sees the packet
            return Outcome(Verdict.DROP, Reason.TABLE_FULL)
        if proto == PROTO_TCP:
            tcp = ct_tcp.TcpConn()
            # tracked now, judged after the rules (as Linux's tcp_new, then tcp_packet)
            opened = ct_tcp.tcp_open(tcp, pkt, self.knobs)
            if opened is None:
                return Outcome(Verdict.DROP, Reason.INVALID)
        elif untrackable:
            # not trackable (echo reply with no request, other ICMP types): judged by the
            # rules like any packet, passed untracked when allowed
            return self._untracked(pkt, key, direction)
        # any other protocol: Linux's generic tracker, by addresses and protocol
        # DNAT / LB choose the machine-side destination of ingress flows
        xlat = key
        backend = -1
        pool = None
        if direction == INGRESS:
            if self.lb is not None:
                pool = self.lb.pool_for(key)
                if pool is not None:
                    backend, dst, dport = self.lb.peek(pool, key)
                    if backend < 0:
                        return Outcome(Verdict.DROP, Reason.NO_BACKEND)
                    self._picked = pool
                    xlat = xlat._replace(dst=dst, dport=dport)
            if backend < 0 and self.nat is not None:
                xlat = self.nat.dnat(key, xlat)
        allowed, rule = self._decide(direction, xlat, pkt.icmp_type)
        if not allowed:
            return Outcome(Verdict.DROP, Reason.RULE if rule >= 0 else Reason.DEFAULT, rule)
        if direction == EGRESS and self.nat is not None:
            evict = None
            if tcp is not None and pkt.flags & _SYN_ACK == _SYN:  # the conntrack: SYN_SENT
                new_end = tcp.seen[0].end
                evict = lambda k: self._evict_closing(k, new_end, now)  # noqa: E731
            snat = self.nat.snat(key, lambda k: self.in_use(k, now), evict)
            if snat is None:
                return Outcome(Verdict.DROP, Reason.NAT_EXHAUSTED)
            xlat = snat
        elif xlat != key and self.in_use(xlat.reversed(), now):
            return Outcome(Verdict.DROP, Reason.NAT_EXHAUSTED)  # DNAT tuple clash
        flow = Flow(key=key, xlat=xlat, machine=self.index, chain=self.services, tcp=tcp,
                    status=_NAT if xlat != key else 0, rule=rule, backend=backend,
                    created=now, last_seen=now, stream_ts=now + UDP_STREAM_AFTER,
                    owner=self.tier)
        if opened is not None:  # set above for, and only for, TCP
            if opened.action != _TCP_ACCEPT or opened.timeout_ns <= 0:
                return Outcome(Verdict.DROP, Reason.INVALID)
            flow.expires = now + opened.timeout_ns
        elif proto == PROTO_UDP:
            udp_update(flow, 0, now, self.knobs)
        elif proto in _ECHO_REQUESTS:
            icmp_update(flow, 0, now, self.knobs)
        else:
            generic_update(flow, 0, now, self.knobs)
        flow.packets[0] = 1
        flow.bytes[0] = pkt.ip_total
        self.flows.add_new(flow)  # _process looked `key` up and found no flow
        translate_first(pkt, flow)
        return Outcome(_FORWARD, _RULE if rule >= 0 else _DEFAULT, rule, flow, 0, created=True)

    def _evict_closing(self, reply_key: FlowKey, new_end: int, now: int) -> bool:
        """Linux nf_nat_used_tuple_harder for a new SYN (original end `new_end`): the flow
        holding `reply_key` as its reply tuple is evicted when it is a SNAT'd TCP flow in
        TIME_WAIT or later (CLOSE, SYN_SENT2: Linux's state order) whose original direction
        the new SYN has passed; True: the tuple is free now."""
        hit = self.lookup(reply_key, now)
        if hit is None:
            return True
        flow, fdir = hit
        tcp = flow.tcp
        if (fdir != 1 or tcp is None or tcp.state < _TIME_WAIT or flow.owner != self.tier
                or flow.xlat.src == flow.key.src
                or not ct_tcp.seq_after(new_end, tcp.seen[0].end)):
            return False
        self._drop(flow)
        return True

    def _decide(self, direction: int, tuple_: FlowKey, icmp_type: int) -> tuple[bool, int]:
        if self.rules is None:
            return True, -1
        return self.rules.decide(direction, tuple_.proto, tuple_.src, tuple_.dst,
                                 tuple_.dport, icmp_type)

    def _untracked(self, pkt: Packet, key: FlowKey, direction: int) -> Outcome:
        if key.proto not in (PROTO_ICMP, PROTO_ICMPV6):
            return Outcome(Verdict.DROP, Reason.INVALID)
        allowed, rule = self._decide(direction, key, pkt.icmp_type)
        if not allowed:
            return Outcome(Verdict.DROP, Reason.RULE if rule >= 0 else Reason.DEFAULT, rule)
        return Outcome(Verdict.FORWARD, Reason.RULE if rule >= 0 else Reason.DEFAULT, rule)

    def _related(self, pkt: Packet, inner: Packet, direction: int, now: int) -> Outcome:
        """An ICMP error (`inner`: the datagram it quotes): RELATED to the flow its embedded
        header belongs to, if any."""
        if inner.error == 0 and inner.l4 >= 0:
            # the embedded datagram travelled the other way: its reverse is a key of the flow
            hit = self.lookup(inner.key(self.index).reversed(), now)
            if hit is not None:
                flow, fdir = hit
                translate_related(pkt, flow, fdir)
                return Outcome(Verdict.FORWARD, Reason.RELATED, flow=flow, direction=fdir)
        return self._untracked(pkt, pkt.key(self.index), direction)

    # -- entries ---------------------------------------------------------------------------

    def export_flows(self) -> list[Flow]:
        return list(self.flows)

    def import_flow(self, flow: Flow) -> None:
        flow.owner = self.tier
        self.flows.add(flow)
