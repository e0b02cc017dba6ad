"""The VNIC tier: the first cache, the offload policy applied, and the VNIC end of the PNIC channel.

Once a machine hands its chain over, the VNIC runs it for every flow the PNIC does not own. Its
first cache (one `VnicChain` per machine) holds every flow of the machine, with a shadow of each
flow the PNIC owns. It offers flows the policy wants to the PNIC, refuses when the PNIC cannot
take them (and makes room by recalling an idle flow), holds the packets of a flow whose entry is
in transit (offload.HandoffQueue) and handles every message the PNIC sends: Ack, Refuse, Return,
Results, Report, Health. It also resumes flows after a PNIC crash.

Time. Every message to the PNIC takes effect there in the order sent; its answers take effect
at the VNIC at a modelled trace time (`latency` after it was sent), never when the transport
happens to deliver them: `deliver(until)` applies, in time order, every answer due by `until`,
blocking on the transport if it is not there yet. Offers wait to go together, as one Offloads
message, until something else is sent or one of their answers is due; each answer still takes
effect at its own offer's time (`_offer`, `_post_offers`, `_answers`). Entries the PNIC hands
back during a batch that met it first (`defer`) take effect at their punted packet's trace
time. A decision that can reach a PNIC-owned entry (a miss or a TCP SYN of a chain with NAT
or LB, an ICMP error) is taken after a `sync`: every answer applied and every expired entry
back, so a PNIC-owned flow in the first cache is live.

Every message is checked before it changes anything: an unknown sequence number, flow or
packet, an entry that does not decode or has a field out of range, an unknown reason, is
rejected, counted by reason (`rejected`) and changes nothing.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from flowshift import channel as ch
from flowshift.config import HostConfig, MachineConfig, parse_machine
from flowshift.conntrack_types import DEFAULT_KNOBS, Knobs, Status
from flowshift.entry import ENTRY_SIZE, Flow, Tier, expires_of, key_of
from flowshift.flow import PROTO_TCP, FlowKey, new_key
from flowshift.offload import HandoffQueue, OffloadPolicy
from flowshift.packet.view import TCP_SYN, Packet, ParseError
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.chain import Chain, Outcome
from flowshift.services.conntrack import FlowTable, generic_timeout
from flowshift.stats import TIER_NAMES, FlowView, HostStats
from flowshift.tiers._fastpath_batch import returned_backoff
from flowshift.tiers.fastpath import Fastpath, Passed
from flowshift.tiers.link import PnicLink
from flowshift.tiers.pnic import PUNT
from flowshift.verdict import RefuseReason, ReturnReason, Verdict

_OK = ParseError.OK
_PNIC, _VNIC = Tier.PNIC, Tier.VNIC
_ASSURED = int(Status.ASSURED)
_VERDICTS = frozenset(int(v) for v in Verdict) | {PUNT}
_KIND_PACKETS, _KIND_OFFLOAD, _KIND_RECALL, _KIND_OTHER = range(4)
_NEVER = (1 << 63) - 1  # an int64: the fast path compares times with it
_ANSWERS = bytes([0, *RefuseReason])  # the bytes of an OffloadResults: ack or a refusal
_RETURN_LABELS = {int(r): r.label for r in ReturnReason}  # a Return's reason, checked and named
_CLOSED = ReturnReason.CLOSED.label
_UNANSWERED = -1  # an offer of an Offloads that got no valid answer


class VnicChain(Chain):
    """The chain a VNIC runs: its first cache also shadows the flows the PNIC owns."""

    def __init__(self, machine: MachineConfig, index: int) -> None:
        super().__init__(machine, index, Tier.VNIC)
        # the key of the packet being decided when the VNIC found no flow for it just before:
        # the decision's first lookup, of that key, need not ask the table and its fast path
        self.missed: FlowKey | None = None

    def lookup(self, key: FlowKey, now: int) -> tuple[Flow, int] | None:
        missed, self.missed = self.missed, None  # the first lookup only
        if missed is not None and key == missed:
            return None
        return Chain.lookup(self, key, now)

    def lookup_remote(self, key: FlowKey, now: int) -> tuple[Flow, int] | None:
        # A PNIC-owned flow: the VNIC synced before any decision that can reach it, so the
        # PNIC has handed back every entry that expired; the shadow is live.
        return self.flows.get(key)


@dataclass(slots=True)
class Pending:
    """A packet at the VNIC: being decided, held, or at the PNIC."""

    index: int
    ts: int  # its trace time
    pkt: Packet
    machine: int
    direction: int
    fkey: FlowKey | None  # the original key of its flow (None until known)


# (packet, verdict, reason, rule, tier, rewritten): the host records a packet's result
Record = Callable[[Pending, int, int, int, int, bool], None]


class Vnic:
    """The VNICs of a host's machines and their side of the one PNIC channel."""

    def __init__(self, config: HostConfig, link: PnicLink, policy: OffloadPolicy,
                 stats: HostStats, record: Record, *, latency: int = 0,
                 batch: int = 256, fastpath: Fastpath | None = None) -> None:
        self.names = [m.name for m in config.machines]
        self.fastpath = fastpath  # where the VNIC's established flows run compiled
        self.capacity = config.pnic.capacity
        # No packet the PNIC processes gives its entry less life than this (the shortest
        # timeout of any machine's conntrack table): a sync finds nothing expired before the
        # earliest known expiry or this long after the earliest packet since.
        self.min_timeout = min(m.conntrack.knobs().min_timeout() for m in config.machines)
        self.chains: list[VnicChain | None] = [None] * len(config.machines)
        self.link = link
        self.policy = policy
        self.stats = stats
        self.record = record
        self.latency = latency
        self.batch_size = batch
        self.queue: HandoffQueue[Pending] = HandoffQueue()
        self.healthy = True
        self.alive = True  # the PNIC is there at all (a crash ends it)
        self.pnic_flows = 0  # entries the PNIC holds or is being sent
        self.pnic_owned: dict[FlowKey, Flow] = {}  # shadows of PNIC-owned flows
        self.moved_down: list[Flow] = []  # acknowledged since the host last looked
        # called with a flow's key before it is recalled (the host may run its rows first)
        self.before_recall: Callable[[FlowKey], None] = _nothing
        # pnic_owned by last_seen (ties in their order), built when room is needed and kept
        # until a shadow comes, goes or changes: a full PNIC refuses many offers in a row
        self._lru: list[Flow] | None = None
        self.backoff: dict[FlowKey, int] = {}  # flow -> packet count before the next offer
        self.batch: list[Pending] = []  # packets for the PNIC, not sent yet
        self.seq = 0
        self.sync_seq = 0
        self.packets_seq = 0
        self.packets_sent: dict[int, list[int]] = {}  # Packets message -> its packets
        self.clock = 0  # the trace time of the event being handled (set by the host)
        self.synced_at = -1
        self.expiry_floor = -1  # no PNIC entry expires before this (-1: unknown)
        # messages sent whose answers are not applied: (due time, kind, seq)
        self.outstanding: deque[tuple[int, int, int]] = deque()
        self.offers: list[tuple[int, bytes]] = []  # (seq, entry) offered, not sent yet
        self.offer_batches: dict[int, int] = {}  # an Offloads sent: its first seq -> offers
        # the answer to each offer of an Offloads after its first, by seq, until it takes
        # effect: 0 acknowledged, a RefuseReason, or _UNANSWERED
        self.split: dict[int, int] = {}
        self.deferred: list[tuple[int, int, ch.Return]] = []  # heap: (time, order, entry)
        self.deferred_floor = _NEVER  # no deferred entry expires before this
        self._order = itertools.count()
        self.rejected: dict[str, int] = {}  # messages rejected by content, by reason
        self._pnic_rejected: dict[str, int] = {}  # the same at the PNIC, as it last said

    # -- machine -> VNIC ---------------------------------------------------------------------

    def adopt(self, msg: ch.Handoff, now: int = -1, handed: FlowTable | None = None) -> int:
        """Take over a machine's chain from its handoff message; the entries taken. At `now`
        (>= 0: during a batch), its flows go on running compiled, as they did at the machine:
        those whose rows this process's fast path holds for the machine's table `handed` go
        on in those rows (the entry written over each, `Fastpath.take_over`), the rest are
        cached again after they are imported."""
        m = msg.machine
        cfg = parse_machine(msg.config, f"handoff of machine {m}")
        chain = VnicChain(cfg, m)
        chain.spare = self.queue.pending
        chain.dropped = self._forget
        fp = self.fastpath
        if fp is not None:
            chain.flows.use_cache(fp)
        if chain.lb is not None:
            chain.lb.restore(msg.lb_state)
        self.chains[m] = chain
        bounded = chain.knobs.max > 0
        flows = []
        for raw in msg.entries:
            if fp is not None and handed is not None:
                key = key_of(raw)
                if fp.take_over(raw, handed, chain.flows, _VNIC, now, self._threshold(key),
                                bounded, now >= 0 and not self.queue.pending(key)):
                    continue
            flow = Flow.from_bytes(raw)
            chain.import_flow(flow)
            flows.append(flow)
        if now >= 0:
            for flow in flows:
                self.admit(m, flow, now)
        self.peaks()
        return len(msg.entries)

    # -- packets -----------------------------------------------------------------------------

    def steer(self, item: Pending) -> None:
        """A packet of a machine whose VNIC runs its chain: to its flow's owner, in order."""
        chain = self.chains[item.machine]
        assert chain is not None
        pkt = item.pkt
        hit = missed = None
        if pkt.error == _OK and pkt.inner is None:
            key = new_key((pkt.family, pkt.proto, item.machine, pkt.src, pkt.dst, pkt.sport,
                           pkt.dport))  # pkt.key(item.machine)
            hit = chain.flows.get(key)
            if hit is None:
                missed = key
        if hit is not None:
            flow = hit[0]
            fkey = item.fkey = flow.key
            q = self.queue
            if q.in_transit(fkey) or q.is_held(fkey) or (
                    flow.owner != _PNIC and q.in_flight(fkey)):
                q.hold(item)  # behind its entry, or behind its packets still at the PNIC
                self.stats.held_packets += 1
                return
            if flow.owner == _PNIC:
                self._to_pnic(item)
                return
        self._decide(item, chain, missed)

    def _decide(self, item: Pending, chain: VnicChain, missed: FlowKey | None = None) -> None:
        """Decide a packet in the VNIC's chain; `missed`: its key, which no flow had when it
        was just looked up (the chain need not look again, unless answers came meanwhile)."""
        if self._reaches_pnic(item, chain) and self.sync(item.ts):
            missed = None  # answers applied may have brought a flow of its key
        chain.missed = missed
        out = chain.process(item.pkt, item.direction, item.ts)
        chain.missed = None
        self.outcome(item, out, _VNIC, chain.router)
        if out.flow is not None:
            self.after(item.machine, out.flow, item.ts)

    def after(self, machine: int, flow: Flow, now: int) -> None:
        """After the VNIC decided a packet of `flow`: offer it if the policy wants it, else
        let it run on the fast path."""
        if flow.owner == _VNIC and self.policy.wants(flow):
            self.consider(machine, flow.key, now)
        self.admit(machine, flow, now)

    def admit(self, machine: int, flow: Flow, now: int) -> None:
        """Let a flow the VNIC owns run on the fast path, if it may now."""
        fp = self.fastpath
        chain = self.chains[machine]
        if fp is not None and fp.on and chain is not None and not self.queue.pending(flow.key):
            fp.admit(flow, chain.flows, _VNIC, now, self._threshold(flow.key),
                     chain.knobs.max > 0)

    def _threshold(self, fkey: FlowKey) -> int:
        """The packet count below which an offer of this flow would be refused (-1: never)."""
        return -1 if self.policy.name == "never" else self.backoff.get(fkey, 0)

    def _forget(self, flow: Flow) -> None:
        """A flow the chain's table dropped (expired, or early-dropped to make room)."""
        self.backoff.pop(flow.key, None)

    def _reaches_pnic(self, item: Pending, chain: Chain) -> bool:
        """Can deciding this packet look at a flow the PNIC owns (other than its own)?"""
        if not self.pnic_flows:
            return False
        pkt = item.pkt
        if chain.at_limit() and (  # a new flow in a full table: it counts the PNIC's flows
                item.fkey is None or (pkt.proto == PROTO_TCP and pkt.flags & TCP_SYN)
                or _gone(chain, item.fkey, item.ts)):
            return True
        if pkt.inner is not None:  # an ICMP error: related to any flow
            return True
        if not syncs_first(chain):
            return False
        return item.fkey is None or (pkt.proto == PROTO_TCP and bool(pkt.flags & TCP_SYN))

    def outcome(self, item: Pending, out: Outcome, tier: int, router: bool) -> None:
        """Record a packet a chain decided; `router`: the chain's machine routes (a packet it
        forwards leaves with its TTL / hop limit one lower, translated or not)."""
        if out.created:
            self.stats.flows_total += 1
        flow = out.flow
        self.record(item, out.verdict, out.reason, out.rule, tier,
                    (router and out.verdict == Verdict.FORWARD)
                    or (flow is not None and flow.key != flow.xlat))

    # -- VNIC -> PNIC ------------------------------------------------------------------------

    def consider(self, machine: int, fkey: FlowKey, now: int) -> None:
        """Offer a flow the policy wants to the PNIC, if the PNIC can take it."""
        chain = self.chains[machine]
        assert chain is not None
        hit = chain.flows.get(fkey)
        if hit is None or self.queue.in_transit(fkey):
            return
        flow = hit[0]
        if chain.knobs.max and not flow.status & _ASSURED:
            return  # a full table may early-drop it: only assured flows leave for the PNIC
        total = flow.packets[0] + flow.packets[1]
        if total < self.backoff.get(fkey, 0):
            return
        self.deliver(now)  # the room the PNIC has now, with every answer due so far
        if flow.owner != _VNIC or self.queue.in_transit(fkey):
            return
        reason = None
        if not self.healthy:
            reason = RefuseReason.UNHEALTHY
        elif not self.policy.supports(flow):
            reason = RefuseReason.UNSUPPORTED_SERVICE
        elif self.pnic_flows >= self.capacity:
            reason = RefuseReason.FULL
            self._make_room(flow)
        if reason is not None:
            self._refused(fkey, total, reason, now)
            return
        self.seq += 1
        self.queue.start(self.seq, fkey)
        self._going_down(flow.expires)
        self._offer(self.seq, flow.to_bytes())

    def _going_down(self, expires: int) -> None:
        """An offer of a flow that expires at `expires` is made: the PNIC's count takes it,
        and its expiry."""
        self.pnic_flows += 1
        self.lower_floor(expires)
        s = self.stats  # an offer changes the second cache's count only
        s.peak_second_cache = max(s.peak_second_cache, self.pnic_flows)

    def _refused(self, fkey: FlowKey, total: int, reason: RefuseReason, now: int) -> None:
        self.stats.count(self.stats.refused, reason.label)
        self.backoff[fkey] = max(2 * total, total + 1)
        self.stats.events.append((now, "refuse", reason.label))

    def _make_room(self, candidate: Flow) -> None:
        """Take back the least recently used PNIC flow if it sat idle for the candidate's life."""
        if self._lru is None:
            self._lru = sorted(self.pnic_owned.values(), key=lambda f: f.last_seen)
        lru = next((f for f in self._lru if not self.queue.in_transit(f.key)), None)
        if lru is not None and lru.last_seen < candidate.created:
            self.before_recall(lru.key)
            self.seq += 1
            self.queue.start(self.seq, lru.key)
            self._send(ch.Recall(self.seq, tuple(lru.key), ReturnReason.ROOM),  # type: ignore[arg-type]
                       _KIND_RECALL, self.seq)

    def _offer(self, seq: int, entry: bytes) -> None:
        """Offer an entry: it takes effect as a message sent now would, but waits to go with
        the offers made after it until anything else is sent or any of their answers is due
        (`_post_offers`): the PNIC takes a batch's entries in order, and each answer still
        takes effect at its own offer's time, so nothing can tell the difference."""
        self._flush()  # one FIFO: the offer stays behind earlier packets
        if not self.alive:
            return
        self.offers.append((seq, entry))
        self.outstanding.append((self.clock + self.latency, _KIND_OFFLOAD, seq))
        self.synced_at = -1

    def _post_offers(self) -> None:
        """Send the offers made and not sent yet: one Offload, or one Offloads for many."""
        offers = self.offers
        if not offers:
            return
        self.offers = []
        if len(offers) == 1:
            self.link.send(ch.Offload(*offers[0]))
            return
        first = offers[0][0]
        self.offer_batches[first] = len(offers)
        self.link.send(ch.Offloads(first, b"".join([raw for _, raw in offers])))

    def _to_pnic(self, item: Pending) -> None:
        self.queue.sent(item)
        self.batch.append(item)
        if len(self.batch) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self.batch:
            return
        self._post_offers()  # made before these packets came
        b = self.batch
        self.batch = []
        self.link.send(ch.Packets(b[-1].ts, [p.index for p in b], [p.machine for p in b],
                                  [p.ts for p in b], [bytes(p.pkt.data) for p in b],
                                  [p.pkt.linktype for p in b], [p.pkt.wire_len for p in b]))
        self.packets_seq += 1
        self.packets_sent[self.packets_seq] = [p.index for p in b]
        self.lower_floor(min(p.ts for p in b) + self.min_timeout)
        self.outstanding.append((b[-1].ts + self.latency, _KIND_PACKETS, self.packets_seq))
        self.synced_at = -1

    def _send(self, msg: ch.Msg, kind: int = _KIND_OTHER, seq: int = 0, at: int = -1) -> None:
        self._flush()  # one FIFO: control messages stay behind earlier packets and offers
        self._post_offers()
        if not self.alive:
            return
        self.link.send(msg)
        now = at if at >= 0 else self.clock
        self.outstanding.append((now + self.latency, kind, seq))
        self.synced_at = -1

    # -- time --------------------------------------------------------------------------------

    def next_due(self) -> int:
        """The trace time of the first answer (or batch of packets) due; _NEVER: none."""
        t = _NEVER
        if self.outstanding:
            t = self.outstanding[0][0]
        if self.deferred:
            t = min(t, self.deferred[0][0])
        if self.batch:
            t = min(t, self.batch[0].ts + self.latency)
        return t

    def due(self, until: int) -> bool:
        """Is anything to apply by trace time `until`?"""
        return self.next_due() <= until

    def deliver(self, until: int) -> None:
        """Apply, in trace-time order, every answer due by `until` (blocking for it if the
        transport has not brought it yet)."""
        while True:
            if self.batch and self.batch[0].ts + self.latency <= until:
                self._flush()
            out = self.outstanding[0][0] if self.outstanding else None
            dfr = self.deferred[0][0] if self.deferred else None
            if dfr is not None and dfr <= until and (out is None or dfr < out):
                at, _, ret = heapq.heappop(self.deferred)
                self._on_message(ret, at)
            elif out is not None and out <= until:
                self._apply_next()
            else:
                return

    def _apply_next(self) -> None:
        due, kind, seq = self.outstanding.popleft()
        answer = self.split.pop(seq, None) if kind == _KIND_OFFLOAD else None
        if answer is None:
            for msg in self._answers(kind, seq):
                self._on_message(msg, due)
        elif answer == 0:  # an offer of an Offloads, answered by its OffloadResults
            self._on_ack(seq, due)
        elif answer > 0:
            self._on_refuse(seq, answer, due)
        if kind == _KIND_OFFLOAD and self.queue.transit.get(seq) is not None:
            fkey = self.queue.answered(seq)  # no valid answer: the offer did not happen
            assert fkey is not None
            self.pnic_flows -= 1
            self.stats.count(self.rejected, "unanswered")
            self._refused(fkey, 0, RefuseReason.BAD_ENTRY, due)
            self._release(fkey)
        elif kind == _KIND_RECALL and self.queue.transit.get(seq) is not None:
            fkey = self.queue.answered(seq)  # the PNIC no longer had the flow
            assert fkey is not None
            self._release(fkey)
        elif kind == _KIND_PACKETS:
            for index in self.packets_sent.pop(seq, ()):
                if index in self.queue.inflight:  # no result came back for it: ours to decide
                    self.stats.count(self.rejected, "unanswered")
                    self._on_results(ch.Results([index], [PUNT], [0], [b""]), due)

    def _answers(self, kind: int, seq: int) -> list[ch.Msg]:
        """The answers to the message of an outstanding entry. The offers of one Offloads
        message are answered by one OffloadResults: the first offer's answer comes back as
        the Ack or Refuse it would have had, the others' wait in `split`, each to take effect
        with its own offer, in order."""
        if kind != _KIND_OFFLOAD:
            return self.link.answers()
        if self.offers and self.offers[0][0] <= seq:
            self._post_offers()  # its answer is due: it goes now, with the offers after it
        group = self.link.answers()
        n = self.offer_batches.pop(seq, 0)
        if not n:
            return group
        split = self.split
        split.update(zip(range(seq + 1, seq + n), itertools.repeat(_UNANSWERED)))
        mine: list[ch.Msg] = []
        answered = False
        for msg in group:
            if not isinstance(msg, ch.OffloadResults):
                mine.append(msg)
            elif msg.seq != seq or answered:
                self._reject("unknown-seq")
            elif len(msg.reasons) != n:
                self._reject("bad-results")
            elif msg.reasons.translate(None, _ANSWERS):  # a byte that is no answer
                self._reject("bad-reason")
            else:
                answered = True
                first = msg.reasons[0]
                mine.append(ch.Refuse(seq, first) if first else ch.Ack(seq))
                split.update(zip(range(seq + 1, seq + n), msg.reasons[1:], strict=True))
        return mine

    def defer(self, returned: list[ch.Msg], fallback: int) -> None:
        """Entries handed back by a batch that met the PNIC first: each takes effect at its
        own packet's trace time."""
        for msg in returned:
            if isinstance(msg, ch.Return):
                at = msg.now if msg.now >= 0 else fallback
                heapq.heappush(self.deferred, (at, next(self._order), msg))
                self.deferred_floor = min(self.deferred_floor, expires_of(msg.entry))
            else:
                self.stats.count(self.rejected, "unexpected")

    def drain(self, until: int | None = None) -> None:
        """Apply every answer outstanding (and deferred entries up to `until`): a barrier."""
        while self.batch or self.outstanding:
            self._flush()
            while self.outstanding:
                self._apply_next()
        if until is not None:
            self.deliver(until)

    def lower_floor(self, t: int) -> None:
        """An entry at the PNIC may expire as early as `t`."""
        if self.expiry_floor >= 0:
            self.expiry_floor = min(self.expiry_floor, t)

    def quiet_until(self) -> int:
        """Until when (a trace time, excluded) a new flow can be decided without a barrier:
        nothing is held, and a `sync` would do nothing (`_sync_free_until`). -1: not even
        now."""
        return -1 if self.queue.busy() else self._sync_free_until()

    def _sync_free_until(self) -> int:
        """Until when (a trace time, excluded) a `sync` has nothing to wait for: no packet or
        message waits for the PNIC or its answer, and no entry handed back ahead is due or
        expired, nor any PNIC entry. -1: not even now."""
        if self.batch or self.outstanding:
            return -1
        t = _NEVER
        if self.deferred:
            t = min(self.deferred[0][0], self.deferred_floor)
        if self.alive and self.healthy and self.pnic_flows:
            t = min(t, self.expiry_floor)  # -1: unknown
        return t

    def sync(self, now: int) -> bool:
        """Barrier before a decision that can reach a PNIC-owned entry: every answer applied,
        every entry expired by `now` handed back (no round trip when none can have). Did it
        wait at the barrier (False: nothing can have changed)?"""
        if self.synced_at == now and not self.batch and not self.outstanding:
            return False
        if self._sync_free_until() > now:
            self.synced_at = now  # nothing to apply, nothing expired: no barrier to wait at
            return False
        self.drain(now)
        self._expire_deferred(now)
        if self.alive and self.healthy and self.pnic_flows and not (
                self.expiry_floor > now):
            self.sync_seq += 1
            self._send(ch.Tick(now, self.sync_seq), at=now)
            self.expiry_floor = _NEVER  # lowered by the answer and by what follows
            self.drain(now)
        self.synced_at = now
        return True

    def _expire_deferred(self, now: int) -> None:
        """Entries a batch handed back at a later packet's time that had expired by `now`:
        the PNIC would have handed them back at this sync, so they come back now."""
        if not self.deferred or self.deferred_floor > now:
            return
        dead = [d for d in self.deferred if expires_of(d[2].entry) <= now]
        self.deferred = [d for d in self.deferred if expires_of(d[2].entry) > now]
        self.deferred_floor = min((expires_of(d[2].entry) for d in self.deferred), default=_NEVER)
        if not dead:
            return
        heapq.heapify(self.deferred)
        for _, _, ret in sorted(dead):
            self._on_message(ch.Return(ret.entry, ReturnReason.EXPIRED, now), now)

    def settle(self, now: int) -> None:
        """Finish every packet still held, batched or at the PNIC."""
        self.drain(now)
        while self.queue.held:
            for fkey in self.queue.held_flows():
                if not self.queue.in_transit(fkey) and not self.queue.in_flight(fkey):
                    self._release(fkey)
            if self.batch or self.outstanding:
                self.drain(now)
            elif self.queue.held:  # waiting on nothing that will come: let them go in order
                for fkey in self.queue.held_flows():
                    self.queue.cancel(fkey)
                    self._release(fkey)

    def tick(self, now: int) -> None:
        """The report timer: the PNIC reports its entries and hands back idle ones."""
        if self.alive and self.healthy and self.pnic_flows:
            self._send(ch.Tick(now), at=now)
            self.stats.occupancy.append((now, self.pnic_flows))

    def sweep(self, now: int) -> None:
        """Free expired flows nobody looked up again; PNIC-owned flows and flows with packets
        or entries still on their way are left alone."""
        for chain in self.chains:
            if chain is not None:
                for flow in chain.flows.sweep(now, keep=_PNIC, spare=self.queue.pending):
                    self.backoff.pop(flow.key, None)

    # -- PNIC -> VNIC ------------------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        self.stats.count(self.rejected, reason)

    def _on_message(self, msg: ch.Msg, at: int) -> None:
        if isinstance(msg, ch.Results):
            self._on_results(msg, at)
        elif isinstance(msg, ch.Ack):
            self._on_ack(msg.seq, at)
        elif isinstance(msg, ch.Refuse):
            self._on_refuse(msg.seq, msg.reason, at)
        elif isinstance(msg, ch.Return):
            self._on_return(msg, at)
        elif isinstance(msg, ch.Report):
            for raw in msg.entries:
                flow = self._entry(raw)
                if flow is not None:
                    self._shadow(flow)
        elif isinstance(msg, ch.Health):
            self.healthy = bool(msg.healthy)
        elif isinstance(msg, ch.Synced):
            if msg.next_expiry >= 0:
                self.lower_floor(msg.next_expiry)
            self.lower_floor(at + self.min_timeout)
        elif not isinstance(msg, ch.Entries):
            self._reject("unexpected")

    def _entry(self, raw: bytes) -> Flow | None:
        """An entry from the PNIC, checked: None (counted) when it cannot be one of ours."""
        if len(raw) != ENTRY_SIZE:
            self._reject("bad-entry")
            return None
        try:
            flow = Flow.from_bytes(raw)
        except (struct.error, ValueError):
            self._reject("bad-entry")
            return None
        key = flow.key
        if not (0 <= key.zone < len(self.chains)) or self.chains[key.zone] is None \
                or flow.machine != key.zone:
            self._reject("unknown-zone")
            return None
        if key.family not in (4, 6) or flow.xlat.proto != key.proto or (
                flow.tcp is not None and not 0 <= flow.tcp.state < len(ct_tcp.TCP_TIMEOUTS_NS)):
            self._reject("bad-entry")
            return None
        return flow

    def _on_ack(self, seq: int, at: int) -> None:
        fkey = self.queue.transit.get(seq)
        if fkey is None or fkey in self.pnic_owned:
            self._reject("unknown-seq")
            return
        chain = self.chains[fkey.zone]
        hit = chain.flows.get(fkey) if chain is not None else None
        self.queue.answered(seq)
        if hit is None:  # cannot happen while the sweep spares flows in transit
            self._reject("unknown-flow")
            self.pnic_flows -= 1
            return
        self._now_pnic(hit[0], at)
        self.moved_down.append(hit[0])
        self._release(fkey)

    def _now_pnic(self, flow: Flow, at: int) -> None:
        """The PNIC took `flow` at `at`: its `Flow` here is the shadow of a PNIC-owned flow."""
        flow.owner = _PNIC
        self.pnic_owned[flow.key] = flow
        self._lru = None
        self._offloaded(flow.key, at)

    def _offloaded(self, fkey: FlowKey, at: int) -> None:
        self.stats.offloads_to_pnic += 1
        self.stats.events.append((at, "offload", fkey))

    def _on_refuse(self, seq: int, reason: int, at: int) -> None:
        if reason not in RefuseReason._value2member_map_:
            self._reject("bad-reason")
            return
        fkey = self.queue.transit.get(seq)
        if fkey is None or fkey in self.pnic_owned:
            self._reject("unknown-seq")
            return
        self.queue.answered(seq)
        self.pnic_flows -= 1
        chain = self.chains[fkey.zone]
        hit = chain.flows.get(fkey) if chain is not None else None
        total = hit[0].packets[0] + hit[0].packets[1] if hit is not None else 0
        self._refused(fkey, total, RefuseReason(reason), at)
        self._release(fkey)

    def _on_return(self, msg: ch.Return, at: int) -> None:
        label = _RETURN_LABELS.get(msg.reason)
        if label is None:
            self._reject("bad-reason")
            return
        flow = self._entry(msg.entry)
        if flow is None:
            return
        fkey = flow.key
        if fkey not in self.pnic_owned:
            self._reject("unknown-flow")
            return
        del self.pnic_owned[fkey]
        self._lru = None
        chain = self.chains[fkey.zone]
        assert chain is not None
        old = chain.flows.get(fkey)
        if old is not None:
            chain.flows.remove(old[0])
        chain.import_flow(flow)
        self._back(fkey, label, returned_backoff(flow.packets[0] + flow.packets[1]), at)
        # the packet it came back at (a FIN, mostly) and the rest run compiled, as they
        # would have had it never left software
        self.admit(fkey.zone, flow, at)

    def moved_down_in_pass(self, flow: Flow, at: int) -> None:
        """A flow this VNIC owns (back in its table, as it was when offered) moved to the
        PNIC's cache in the host's pass (tiers/_fastpath_batch.py): what `consider` and, at
        latency 0 at once, `_on_ack` do with an offer the PNIC takes."""
        self._offered_in_pass(flow.expires)
        self._now_pnic(flow, at)

    def _offered_in_pass(self, expires: int) -> None:
        """The pass made an offer (a sequence number, as `consider`'s) that the PNIC took."""
        self.seq += 1
        self._going_down(expires)
        self.synced_at = -1

    def took_back(self, fkey: FlowKey, backoff: int, at: int) -> None:
        """The entry of a flow the PNIC owned came back at a FIN or RST straight into the
        fast path (the host's pass ran the PNIC's row, tiers/_fastpath_batch.py), cached with
        this back-off: what `_on_return` and `admit` do with such a Return at `at`. Its shadow
        leaves the table."""
        shadow = self.pnic_owned.pop(fkey)
        self._lru = None
        chain = self.chains[fkey.zone]
        assert chain is not None
        chain.flows.detach(shadow)  # its `Flow` gives way to the cached row
        self.synced_at = -1
        self._back(fkey, _CLOSED, backoff, at)

    def passed(self, passed: Passed, down_at: list[int], back_at: list[int]) -> None:
        """`moved_down_in_pass` and `took_back` of each flow that moved down to the PNIC and
        came back within one pass (at those times), after the pass's other notes: nothing
        looked at such a flow between the two, so it got no shadow, and no packet or recall
        of it can wait (only Python makes them). Counted at once: nothing reads the counters
        inside a pass, and the events are listed by time (`stats.event_order`)."""
        n = len(passed.keys)
        self.seq += n  # the offers' sequence numbers, as `consider`'s
        self.synced_at = -1
        self.lower_floor(min(passed.expires))
        s = self.stats
        s.peak_second_cache = max(s.peak_second_cache, self.pnic_flows + passed.above)
        s.offloads_to_pnic += n
        s.returned[_CLOSED] = s.returned.get(_CLOSED, 0) + n
        s.events.extend(zip(down_at, itertools.repeat("offload"), passed.keys))
        s.events.extend(zip(back_at, itertools.repeat("return"), itertools.repeat(_CLOSED)))
        # in note order: a flow that came back twice keeps its later back-off
        self.backoff.update(zip(passed.keys, passed.backoffs, strict=True))

    def _back(self, fkey: FlowKey, label: str, backoff: int, at: int) -> None:
        """The PNIC handed the flow of `fkey` back at `at` (why: `label`); it is this VNIC's
        in its table again, and may be offered again from `backoff` packets on."""
        self._came_back(label, at)
        self.queue.cancel(fkey)  # the answer to a recall, if we sent one
        self.backoff[fkey] = backoff
        if not self.queue.in_flight(fkey):
            self._release(fkey)

    def _came_back(self, label: str, at: int) -> None:
        self.pnic_flows -= 1
        self.stats.count(self.stats.returned, label)
        self.stats.events.append((at, "return", label))

    def _on_results(self, msg: ch.Results, at: int) -> None:
        n = len(msg.index)
        if not (len(msg.verdict) == len(msg.reason) == len(msg.data) == n):
            self._reject("bad-results")
            return
        for index, verdict, reason, data in zip(msg.index, msg.verdict, msg.reason, msg.data,
                                                strict=True):
            item = self.queue.inflight.get(index)
            if item is None or verdict not in _VERDICTS or (
                    verdict == Verdict.FORWARD and len(data) != len(item.pkt.data)) or not (
                    0 <= reason < 1 << 15):
                self._reject("bad-results" if item is not None else "unknown-packet")
                continue
            back = self.queue.returned(index)
            assert back is not None
            _, last = back
            fkey = item.fkey
            chain = self.chains[item.machine]
            assert chain is not None
            if verdict == PUNT:  # the PNIC gave the flow back before this packet: ours now
                if fkey is not None and self.queue.in_transit(fkey):
                    # a packet before it, punted too, had the flow offered again: this one
                    # waits behind the entry, as `steer` makes any packet of it wait (ahead
                    # of the packets that came after it and wait for it already)
                    self.queue.hold_back(item)
                    self.stats.held_packets += 1
                else:
                    self._decide(item, chain)
            else:
                if data:
                    item.pkt.data[:] = data
                self.record(item, verdict, reason, -1, _PNIC, True)
            if last and fkey is not None:  # always: sent() required its key
                hit = chain.flows.get(fkey)
                if hit is not None and hit[0].owner != _PNIC:
                    self._release(fkey)

    def _shadow(self, reported: Flow) -> None:
        """Refresh the shadow of a PNIC-owned flow from a report."""
        shadow = self.pnic_owned.get(reported.key)
        if shadow is None:
            return
        shadow.tcp, shadow.status = reported.tcp, reported.status
        shadow.packets, shadow.bytes = reported.packets, reported.bytes
        if shadow.last_seen != reported.last_seen:
            self._lru = None
        shadow.last_seen, shadow.expires = reported.last_seen, reported.expires

    def _release(self, fkey: FlowKey) -> None:
        """Hand held packets of a flow to its owner now, in arrival order."""
        if not self.queue.is_held(fkey):
            return
        held = self.queue.release(fkey)
        while held:
            self.steer(held.popleft())
            if self.queue.is_held(fkey):  # it had to wait again: keep the rest behind it
                self.queue.requeue(fkey, held)
                return

    def peaks(self) -> None:
        first = sum(len(c.flows) for c in self.chains if c is not None)
        s = self.stats
        s.peak_first_cache = max(s.peak_first_cache, first)
        s.peak_second_cache = max(s.peak_second_cache, self.pnic_flows)

    # -- PNIC failure ------------------------------------------------------------------------

    def withdraw(self, now: int) -> None:
        """Graceful withdrawal: every entry comes back exact; no offload afterwards."""
        if not self.healthy:
            return
        self.drain(now)
        self.stats.events.append((now, "withdraw", ""))
        self._send(ch.Withdraw(now), at=now)
        self.drain(now)
        self.healthy = False

    def crash(self, now: int) -> None:
        """The PNIC dies: no entry comes back; the VNIC resumes from the last report."""
        if not self.alive:
            return
        self.sync(now)  # packets already handed to the PNIC were processed before it died
        self.pnic_rejected()  # its counters die with it
        self.stats.events.append((now, "crash", ""))
        self.healthy = self.alive = False
        self.link.close()
        owned, self.pnic_owned = self.pnic_owned, {}
        self._lru = None
        for flow in owned.values():
            chain = self.chains[flow.machine]
            resume(flow, now, chain.knobs if chain is not None else DEFAULT_KNOBS)
            flow.owner = _VNIC
            if chain is not None:  # software's again: a bounded table's sweep must see it
                chain.flows.touch(flow)
            self.pnic_flows -= 1
            self.stats.count(self.stats.returned, ReturnReason.CRASH.label)
            self.stats.events.append((now, "return", ReturnReason.CRASH.label))
            self._release(flow.key)

    # -- dumps -------------------------------------------------------------------------------

    def pnic_rejected(self) -> dict[str, int]:
        """The messages the PNIC rejected, by reason (asked while it is there)."""
        if self.alive:
            self.drain()
            self.link.send(ch.Query(self.clock))
            for msg in self.link.answers():
                if isinstance(msg, ch.Entries):
                    self._pnic_rejected = {f"pnic-{k}": v for k, v in msg.rejected.items()}
        return dict(self._pnic_rejected)

    def views(self, now: int, machines: list[Chain | None]) -> list[FlowView]:
        """Every live flow as it stands at `now`, with its owner tier; PNIC-owned flows as the
        PNIC has them now (read, not synced: a dump changes nothing)."""
        self.deliver(now)
        fresh: dict[FlowKey, Flow] = {}
        if self.alive and self.pnic_owned:
            self.drain()
            self.link.send(ch.Query(now))
            for msg in self.link.answers():
                if isinstance(msg, ch.Entries):
                    for raw in msg.entries:
                        flow = self._entry(raw)
                        if flow is not None:
                            fresh[flow.key] = flow
        out = []
        for i, name in enumerate(self.names):
            chain = self.chains[i] or machines[i]
            assert chain is not None
            for flow in chain.flows:
                tier = flow.owner
                if tier == _PNIC:
                    flow = fresh.get(flow.key, flow)
                if flow.expires > now:
                    out.append(FlowView(flow.copy(), name, TIER_NAMES[tier]))
        return out


def _nothing(key: FlowKey) -> None:
    pass


def syncs_first(chain: Chain) -> bool:
    """Does the VNIC sync with the PNIC before it decides a new flow of this chain (in a
    table with room)? Only when the chain picks a tuple, by NAT or its load balancer: the pick
    must not clash with one a PNIC flow holds. A firewall's new flow looks at nothing of the
    PNIC's."""
    return chain.nat is not None or chain.lb is not None


def _gone(chain: Chain, key: FlowKey, now: int) -> bool:
    """Has the VNIC-owned flow of `key` expired (its next packet starts a new flow)?"""
    hit = chain.flows.get(key)
    return hit is not None and hit[0].owner == _VNIC and hit[0].expires <= now


def resume(flow: Flow, now: int, knobs: Knobs = DEFAULT_KNOBS) -> None:
    """After a PNIC crash: continue from the last report, re-learning TCP windows loosely;
    timeouts are those of the machine's conntrack table (`knobs`)."""
    if flow.tcp is not None:
        ct_tcp.relearn(flow.tcp)
        timeout = knobs.tcp_timeouts[flow.tcp.state]
    else:
        timeout = generic_timeout(flow, knobs)
    flow.expires = max(flow.expires, now + timeout)


__all__ = ["Pending", "Vnic", "VnicChain", "resume"]
