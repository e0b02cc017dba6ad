"""The emulated host: machines, their VNICs and one PNIC, and the steering between them.

Division of labour: a `Chain` (services/chain.py) runs a machine's services wherever the flow
is owned; this module decides, per packet, which tier owns its flow and hands the packet there.
The VNIC side lives here: it keeps the first cache (every flow of a handed-over machine, with a
shadow of the flows the PNIC owns), applies the offload policy, holds packets of flows whose
entry is in transit and releases them in arrival order after the PNIC's answer. The PNIC
(tiers/pnic.py) sits at the far end of a channel (channel.py), in-process or in its own process.

Time is trace time: each packet's timestamp drives conntrack timeouts, PNIC reports and idle
returns, so a replay is deterministic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from flowshift import channel as ch
from flowshift.config import HostConfig, MachineConfig, parse_config, to_dict
from flowshift.entry import Flow, Tier
from flowshift.flow import FlowKey
from flowshift.offload import OffloadPolicy
from flowshift.packet.parse import parse
from flowshift.packet.view import Packet, ParseError
from flowshift.results import PARSE_BASE, PENDING, BatchResults, PacketResult, reason_label
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.chain import EGRESS, INGRESS, Chain, Outcome
from flowshift.services.conntrack import ICMP_TIMEOUT, SECOND, UDP_TIMEOUT_REPLIED
from flowshift.tiers.link import InlineLink, PnicLink, ProcessLink
from flowshift.tiers.pnic import PUNT
from flowshift.verdict import Reason, RefuseReason, ReturnReason, Verdict

_TIER_NAMES = ("machine", "vnic", "pnic")
_DIRECTIONS = ("egress", "ingress")
SWEEP_INTERVAL = 10 * SECOND  # of trace time between sweeps of expired flows
CLASSIFIER_CACHE = 1 << 16  # addresses whose machine is remembered
REPASS_MIN = 256  # undecided rows worth another pass through the PNIC after an offload
_OK, _UNSUP = ParseError.OK, ParseError.UNSUPPORTED_PROTOCOL
_FWD, _BYP, _MACHINE = Verdict.FORWARD, Verdict.BYPASS, Tier.MACHINE
_BYPASS_PARSE = (ParseError.NOT_IP, ParseError.UNKNOWN_ETHERTYPE)


@dataclass(slots=True)
class FlowView:
    flow: Flow
    machine: str
    tier: str


@dataclass
class HostStats:
    tier_packets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TIER_NAMES, 0))
    tier_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TIER_NAMES, 0))
    offloads_to_vnic: int = 0
    offloads_to_pnic: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    returned: dict[str, int] = field(default_factory=dict)
    flows_total: int = 0
    peak_first_cache: int = 0
    peak_second_cache: int = 0
    held_packets: int = 0
    rejected_messages: dict[str, int] = field(default_factory=dict)
    events: list[tuple[int, str, str]] = field(default_factory=list)
    occupancy: list[tuple[int, int]] = field(default_factory=list)


class NeedSync(Exception):
    """A decision needs the exact state of PNIC-owned flows: sync the channel and retry."""


class Classifier:
    """The machine and direction of a packet, from the machines' addresses."""

    def __init__(self, machines: tuple[MachineConfig, ...]) -> None:
        self.inside: list[tuple[int, int, int, int]] = []  # (family, lo, hi, machine)
        self.public: dict[bytes, int] = {}
        self.cache: dict[bytes, int] = {}
        for i, m in enumerate(machines):
            for net in m.addresses:
                fam = 4 if net.version == 4 else 6
                lo = int(net.network_address)
                self.inside.append((fam, lo, lo + net.num_addresses - 1, i))
            for addr in m.public:
                self.public[addr] = i

    def _inside(self, family: int, addr: bytes) -> int:
        m = self.cache.get(addr)
        if m is None:
            if len(self.cache) >= CLASSIFIER_CACHE:  # spoofed sources must not grow it
                self.cache.clear()
            m = self.cache[addr] = self._inside_slow(family, addr)
        return m

    def _inside_slow(self, family: int, addr: bytes) -> int:
        v = int.from_bytes(addr, "big")
        for fam, lo, hi, m in self.inside:
            if fam == family and lo <= v <= hi:
                return m
        return -1

    def classify(self, pkt: Packet) -> tuple[int, int]:
        """(machine, EGRESS | INGRESS), or (-1, 0) when the packet is no machine's."""
        m = self._inside(pkt.family, pkt.src)
        if m >= 0:
            return m, EGRESS
        m = self.public.get(pkt.dst, -1)
        if m < 0:
            m = self._inside(pkt.family, pkt.dst)
        return (m, INGRESS) if m >= 0 else (-1, 0)


class VnicChain(Chain):
    """The chain a VNIC runs: its first cache also shadows the flows the PNIC owns."""

    def __init__(self, machine: MachineConfig, index: int, host: Host) -> None:
        super().__init__(machine, index, Tier.VNIC)
        self.host = host

    def lookup_remote(self, key: FlowKey, now: int) -> tuple[Flow, int] | None:
        # A PNIC-owned flow is live unless the PNIC says otherwise; only a synced channel
        # (every earlier packet done, expired entries returned) lets the VNIC rely on that.
        if not self.host.synced(now):
            raise NeedSync
        return self.flows.get(key)


@dataclass(slots=True)
class _Pending:
    """A packet waiting at the VNIC (held) or at the PNIC (in flight)."""

    index: int
    ts: int
    pkt: Packet
    machine: int
    direction: int
    fkey: FlowKey  # the original key of its flow


class Host:
    def __init__(self, config: HostConfig, *, policy: str | None = None,
                 capacity: int | None = None, pnic: str = "inline", latency: int = 0,
                 batch: int = 256) -> None:
        if policy is not None:
            config = replace(config, offload=replace(config.offload, policy=policy))
        if capacity is not None:
            config = replace(config, pnic=replace(config.pnic, capacity=capacity))
        self.config = config
        self.names = [m.name for m in config.machines]
        self.classifier = Classifier(config.machines)
        self.policy = OffloadPolicy(config.offload, config.pnic)  # sets self.offloading
        self.stats = HostStats()
        self.machine_chains: list[Chain | None] = [
            Chain(m, i, Tier.MACHINE) for i, m in enumerate(config.machines)]
        self.vnics: list[VnicChain | None] = [None] * len(config.machines)
        self.link: PnicLink = (ProcessLink if pnic == "process" else InlineLink)(
            config.pnic.capacity, config.machines,
            idle_timeout_ns=int(config.offload.idle_timeout * SECOND),
            report_interval_ns=int(config.offload.report_interval * SECOND))
        self.latency = latency
        self.batch_size = batch
        self.now = 0
        # VNIC-side offload bookkeeping, by the flow's original key
        self.pnic_healthy = True
        self.pnic_flows = 0  # entries the PNIC holds or is being sent
        self.pnic_owned: dict[FlowKey, Flow] = {}  # the VNIC's shadows of PNIC-owned flows
        self.transit: dict[int, FlowKey] = {}  # offload/recall seq -> flow
        self.in_transit: set[FlowKey] = set()
        self.held: dict[FlowKey, deque[_Pending]] = {}
        self.inflight: dict[int, _Pending] = {}  # packet index -> packet sent to the PNIC
        self.inflight_per_flow: dict[FlowKey, int] = {}
        self.backoff: dict[FlowKey, int] = {}  # flow -> packet count before the next try
        self.batch: list[_Pending] = []
        self.seq = 0
        self.sync_seq = 0
        self.dirty = False  # sent something to the PNIC since the last sync
        self.synced_at = -1
        self.since_pump = 0
        self.next_tick = -1
        self.next_sweep = -1
        self.report_interval = int(config.offload.report_interval * SECOND)
        # results, released in input order
        self.done: dict[int, PacketResult] = {}
        self.next_out = 0
        self.current: BatchResults | None = None  # the batch process_batch is filling
        for i, m in enumerate(config.machines):
            if m.start == "vnic":
                self.handoff(i, 0)

    @property
    def policy(self) -> OffloadPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: OffloadPolicy) -> None:
        self._policy = policy
        self.offloading = policy.name != "never"  # checked per packet: a plain bool

    # -- per packet --------------------------------------------------------------------------

    def process(self, index: int, ts_ns: int, data: bytes, linktype: int, wire_len: int) -> None:
        self.now = ts_ns
        if ts_ns >= self.next_tick:
            self._clock(ts_ns)
        if ts_ns >= self.next_sweep:
            self._sweep(ts_ns)
        pkt = parse(bytearray(data), linktype, wire_len)
        err = pkt.error
        if err != _OK and err != _UNSUP:
            verdict = Verdict.BYPASS if err in _BYPASS_PARSE else Verdict.UNPARSED
            self._finish(index, ts_ns, -1, -1, verdict, PARSE_BASE + err, -1, -1,
                         pkt if verdict == Verdict.BYPASS else None, wire_len)
            return
        m, direction = self.classifier.classify(pkt)
        if m < 0:
            self._finish(index, ts_ns, -1, -1, Verdict.BYPASS, Reason.NO_MACHINE, -1, -1, pkt,
                         wire_len)
            return
        item = _Pending(index, ts_ns, pkt, m, direction, None)  # type: ignore[arg-type]
        vnic = self.vnics[m]
        if vnic is None:
            chain = self.machine_chains[m]
            assert chain is not None
            out = chain.process(pkt, direction, ts_ns)
            self._record(item, out, _MACHINE)
            if self.offloading and out.flow is not None and self.policy.wants(out.flow):
                self.handoff(m, ts_ns)
                self._consider(self.vnics[m], out.flow.key)
        else:
            self._steer(item, vnic)
        if self.latency:
            self._pump()
        elif self.dirty:
            self._receive_all()

    def process_batch(self, res: BatchResults) -> BatchResults:
        """Decide every packet of a batch; its arrays are filled and its buffer rewritten.

        The batch is settled before this returns: nothing of it stays held or in flight.
        """
        self.settle()
        self.current = res
        try:
            buf = memoryview(res.buf)
            offset, caplen = res.offset.tolist(), res.caplen.tolist()
            wire_len, linktype, ts = res.wire_len.tolist(), res.linktype.tolist(), res.ts.tolist()
            base = res.index0
            rows = self._pnic_first(res, None)
            pos = 0
            while pos < len(rows):
                i = int(rows[pos])
                pos += 1
                offloads = self.stats.offloads_to_pnic
                start = offset[i]
                self.process(base + i, ts[i], buf[start:start + caplen[i]], linktype[i],
                             wire_len[i])
                if self.stats.offloads_to_pnic != offloads and len(rows) - pos >= REPASS_MIN:
                    # a flow just moved down: its later packets in this batch are the PNIC's
                    self.settle()
                    rows, pos = self._pnic_first(res, rows[pos:]), 0
            self.settle()
        finally:
            self.current = None
            res.flush()
        return res

    def _pnic_first(self, res: BatchResults, rows: np.ndarray | None) -> np.ndarray:
        """Packets of PNIC-owned flows are the PNIC's before software sees the batch, as on a
        SmartNIC whose second cache sits in front of the host: it processes the hits in place
        and leaves the rest (and the flows it hands back) to software, whose packets follow in
        order. `rows`: the rows still undecided (None: all). The rows left to software, in
        order."""
        link = self.link
        if not (self.pnic_healthy and self.pnic_owned):
            return np.arange(len(res)) if rows is None else rows
        res.flush()
        select = np.ones(len(res), np.bool_)
        if rows is not None:
            select[:] = False
            select[rows] = True
        first = int(np.argmax(select))
        self._clock(int(res.ts[first]))
        self.settle()  # the PNIC is quiet: nothing of ours in flight
        if not link.run_batch(res, select):
            return np.arange(len(res)) if rows is None else rows
        self._receive_all()  # the entries handed back, before any packet of theirs
        done = select & (res.verdict != PENDING)
        res.tier[done] = Tier.PNIC
        count = int(np.count_nonzero(done))
        self.stats.tier_packets["pnic"] += count
        self.stats.tier_bytes["pnic"] += int(res.wire_len[done].sum())
        return np.flatnonzero(select & ~done)

    def _steer(self, item: _Pending, vnic: VnicChain) -> None:
        pkt = item.pkt
        fkey = None
        if pkt.error == ParseError.OK and pkt.inner is None:
            hit = vnic.flows.get(pkt.key(item.machine))
            if hit is not None:
                fkey = hit[0].key
        item.fkey = fkey
        if fkey is not None:
            if fkey in self.in_transit or (self.inflight_per_flow.get(fkey, 0) and \
                    hit[0].owner != Tier.PNIC):
                self.held.setdefault(fkey, deque()).append(item)
                self.stats.held_packets += 1
                return
            if fkey in self.held:  # earlier packets still wait: keep arrival order
                self.held[fkey].append(item)
                self.stats.held_packets += 1
                return
            if hit[0].owner == Tier.PNIC:
                self._to_pnic(item)
                return
        self._vnic_process(item, vnic)

    def _vnic_process(self, item: _Pending, vnic: VnicChain) -> None:
        snapshot = bytes(item.pkt.data)
        while True:
            try:
                out = vnic.process(item.pkt, item.direction, item.ts)
                break
            except NeedSync:
                # nothing was changed: make the PNIC state exact, then run the packet again
                item.pkt.data[:] = snapshot
                self.sync(item.ts)
        self._record(item, out, Tier.VNIC)
        flow = out.flow
        if flow is not None and flow.owner == Tier.VNIC and self.policy.wants(flow):
            self._consider(vnic, flow.key)

    # -- results -----------------------------------------------------------------------------

    def _record(self, item: _Pending, out: Outcome, tier: Tier) -> None:
        if out.created:
            self.stats.flows_total += 1
        flow = out.flow
        self._finish(item.index, item.ts, item.machine, item.direction, out.verdict, out.reason,
                     out.rule, tier, item.pkt if out.verdict == _FWD else None,
                     item.pkt.wire_len, flow is not None and flow.key != flow.xlat)

    def _finish(self, index: int, ts: int, machine: int, direction: int, verdict: int,
                reason: int, rule: int, tier: int, pkt: Packet | None, wire_len: int,
                rewritten: bool = False) -> None:
        """Record a packet's result; `pkt`: the packet as it leaves (None: it does not),
        `rewritten`: its bytes differ from the input's (only those go back into a batch)."""
        if tier >= 0:
            name = _TIER_NAMES[tier]
            self.stats.tier_packets[name] += 1
            self.stats.tier_bytes[name] += wire_len
        data = pkt.data if pkt is not None else None
        cur = self.current
        if cur is not None and 0 <= index - cur.index0 < len(cur):
            cur.set(index - cur.index0, verdict, reason, rule, tier, machine, direction,
                    data if rewritten else None)
            return
        self.done[index] = PacketResult(
            index, ts, self.names[machine] if machine >= 0 else "",
            _DIRECTIONS[direction] if direction >= 0 else "", Verdict(verdict),
            reason_label(reason, rule), _TIER_NAMES[tier] if tier >= 0 else "",
            bytes(data) if data is not None else None, wire_len)

    def results(self) -> Iterator[PacketResult]:
        """Finished results, in input order (a held packet delays the ones after it)."""
        done = self.done
        while self.next_out in done:
            yield done.pop(self.next_out)
            self.next_out += 1

    # -- machine -> VNIC ---------------------------------------------------------------------

    def handoff(self, m: int, now: int) -> None:
        """The machine hands its config and every flow entry to its VNIC (one message)."""
        chain = self.machine_chains[m]
        assert chain is not None
        machine_end, vnic_end = ch.pair()
        machine_end.send(ch.Handoff(m, to_dict_machine(self.config, m),
                                    [f.to_bytes() for f in chain.export_flows()],
                                    chain.lb.state() if chain.lb is not None else []))
        msg = vnic_end.receive()
        assert isinstance(msg, ch.Handoff)
        cfg = parse_config({"machine": [msg.config]}, f"handoff of machine {m}").machines[0]
        vnic = VnicChain(cfg, m, self)
        if vnic.lb is not None:
            vnic.lb.restore(msg.lb_state)
        for raw in msg.entries:
            vnic.import_flow(Flow.from_bytes(raw))
        self.vnics[m] = vnic
        self.machine_chains[m] = None
        self.stats.offloads_to_vnic += len(msg.entries)
        self.stats.events.append((now, "handoff", self.names[m]))
        self._peaks()

    # -- VNIC -> PNIC ------------------------------------------------------------------------

    def _consider(self, vnic: VnicChain | None, fkey: FlowKey) -> None:
        """Offer a flow the policy wants to the PNIC, if the PNIC can take it."""
        assert vnic is not None
        hit = vnic.flows.get(fkey)
        if hit is None or fkey in self.in_transit:
            return
        flow = hit[0]
        total = flow.packets[0] + flow.packets[1]
        if total < self.backoff.get(fkey, 0):
            return
        reason = None
        if not self.pnic_healthy:
            reason = RefuseReason.UNHEALTHY
        elif not self.policy.supports(flow):
            reason = RefuseReason.UNSUPPORTED_SERVICE
        elif self.pnic_flows >= self.config.pnic.capacity:
            reason = RefuseReason.FULL
            self._make_room(flow)
        if reason is not None:
            self._refused(fkey, total, reason)
            return
        self.seq += 1
        self.transit[self.seq] = fkey
        self.in_transit.add(fkey)
        self.pnic_flows += 1
        self._send(ch.Offload(self.seq, flow.to_bytes()))
        self._peaks()

    def _refused(self, fkey: FlowKey, total: int, reason: int) -> None:
        label = RefuseReason(reason).label
        self.stats.refused[label] = self.stats.refused.get(label, 0) + 1
        self.backoff[fkey] = max(2 * total, total + 1)
        self.stats.events.append((self.now, "refuse", label))

    def _make_room(self, candidate: Flow) -> None:
        """Take back the least recently used PNIC flow if it sat idle for the candidate's life."""
        lru = None
        for flow in self.pnic_owned.values():
            if flow.key not in self.in_transit and (lru is None or flow.last_seen < lru.last_seen):
                lru = flow
        if lru is not None and lru.last_seen < candidate.created:
            self.seq += 1
            self.transit[self.seq] = lru.key
            self.in_transit.add(lru.key)
            self._send(ch.Recall(self.seq, tuple(lru.key), ReturnReason.ROOM))

    def _to_pnic(self, item: _Pending) -> None:
        self.inflight[item.index] = item
        self.inflight_per_flow[item.fkey] = self.inflight_per_flow.get(item.fkey, 0) + 1
        self.batch.append(item)
        if len(self.batch) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self.batch:
            return
        b = self.batch
        self.batch = []
        self.link.send(ch.Packets(b[-1].ts, [p.index for p in b], [p.machine for p in b],
                                  [p.ts for p in b], [bytes(p.pkt.data) for p in b],
                                  [p.pkt.linktype for p in b], [p.pkt.wire_len for p in b]))
        self.dirty = True

    def _send(self, msg: ch.Msg) -> None:
        self._flush()  # one FIFO: control messages stay behind earlier packets
        self.link.send(msg)
        self.dirty = True

    def _sweep(self, now: int) -> None:
        """Free the flows that expired and were never looked up again (results unchanged)."""
        if self.next_sweep >= 0:
            for chain in (*self.machine_chains, *self.vnics):
                if chain is not None:
                    for flow in chain.flows.sweep(now, keep=Tier.PNIC):
                        self.backoff.pop(flow.key, None)
        self.next_sweep = now + SWEEP_INTERVAL

    def _clock(self, now: int) -> None:
        """Let the PNIC see time pass (reports, idle returns) even when it gets no packets:
        once per report interval of trace time."""
        if now < self.next_tick:
            return
        self.next_tick = now + self.report_interval
        if self.pnic_healthy and self.pnic_flows:
            self._send(ch.Tick(now))
            self.stats.occupancy.append((now, self.pnic_flows))

    def _pump(self) -> None:
        self.since_pump += 1
        if self.since_pump > self.latency:
            self.since_pump = 0
            if self.latency:
                self._flush()
            if self.dirty:
                self._receive_all()

    def _receive_all(self, until_sync: int = 0) -> None:
        while True:
            msg = self.link.receive(block=bool(until_sync))
            if msg is None:
                return
            if isinstance(msg, ch.Synced):
                if msg.sync == until_sync:
                    return
                continue
            self._on_message(msg)

    def synced(self, now: int) -> bool:
        return not self.dirty and self.synced_at == now and not self.batch

    def sync(self, now: int) -> None:
        """Barrier: every packet and message sent so far is done and its answer applied."""
        self.sync_seq += 1
        self._send(ch.Tick(now, self.sync_seq))
        self._receive_all(until_sync=self.sync_seq)
        self.dirty = False
        self.synced_at = now

    def _on_message(self, msg: ch.Msg) -> None:
        if isinstance(msg, ch.Results):
            self._on_results(msg)
        elif isinstance(msg, ch.Ack):
            fkey = self.transit.pop(msg.seq)
            self.in_transit.discard(fkey)
            vnic = self._vnic_of(fkey)
            hit = vnic.flows.get(fkey)
            assert hit is not None
            hit[0].owner = Tier.PNIC
            self.pnic_owned[fkey] = hit[0]
            self.stats.offloads_to_pnic += 1
            self.stats.events.append((self.now, "offload", str(fkey)))
            self._release(fkey)
        elif isinstance(msg, ch.Refuse):
            fkey = self.transit.pop(msg.seq)
            self.in_transit.discard(fkey)
            self.pnic_flows -= 1
            vnic = self._vnic_of(fkey)
            hit = vnic.flows.get(fkey)
            assert hit is not None
            flow = hit[0]
            self._refused(fkey, flow.packets[0] + flow.packets[1], msg.reason)
            self._release(fkey)
        elif isinstance(msg, ch.Return):
            self._on_return(Flow.from_bytes(msg.entry), msg.reason)
        elif isinstance(msg, ch.Report):
            for raw in msg.entries:
                self._shadow(Flow.from_bytes(raw))
        elif isinstance(msg, ch.Health):
            self.pnic_healthy = msg.healthy

    def _vnic_of(self, fkey: FlowKey) -> VnicChain:
        vnic = self.vnics[fkey.zone]
        assert vnic is not None
        return vnic

    def _shadow(self, reported: Flow) -> None:
        """Refresh the VNIC's shadow of a PNIC-owned flow from a report."""
        shadow = self.pnic_owned.get(reported.key)
        if shadow is None:
            return
        shadow.tcp, shadow.status = reported.tcp, reported.status
        shadow.packets, shadow.bytes = reported.packets, reported.bytes
        shadow.last_seen, shadow.expires = reported.last_seen, reported.expires

    def _on_return(self, flow: Flow, reason: int) -> None:
        fkey = flow.key
        self.pnic_owned.pop(fkey, None)
        vnic = self._vnic_of(fkey)
        old = vnic.flows.get(fkey)
        if old is not None:
            vnic.flows.remove(old[0])
        vnic.import_flow(flow)
        self.pnic_flows -= 1
        label = ReturnReason(reason).label
        self.stats.returned[label] = self.stats.returned.get(label, 0) + 1
        self.stats.events.append((self.now, "return", label))
        for seq, key in list(self.transit.items()):
            if key == fkey:  # the answer to our recall
                del self.transit[seq]
                self.in_transit.discard(fkey)
        self.backoff[fkey] = 2 * (flow.packets[0] + flow.packets[1]) + 1
        if not self.inflight_per_flow.get(fkey):
            self._release(fkey)

    def _on_results(self, msg: ch.Results) -> None:
        for i, index in enumerate(msg.index):
            item = self.inflight.pop(index)
            fkey = item.fkey
            left = self.inflight_per_flow[fkey] - 1
            if left:
                self.inflight_per_flow[fkey] = left
            else:
                del self.inflight_per_flow[fkey]
            verdict = msg.verdict[i]
            if verdict == PUNT:
                # the PNIC gave the flow back before this packet: the VNIC runs it
                self._vnic_process(item, self._vnic_of(fkey))
            else:
                if msg.data[i]:
                    item.pkt.data[:] = msg.data[i]
                self._finish(item.index, item.ts, item.machine, item.direction, verdict,
                             msg.reason[i], -1, Tier.PNIC,
                             item.pkt if verdict == Verdict.FORWARD else None,
                             item.pkt.wire_len, True)
            if not left:
                hit = self._vnic_of(fkey).flows.get(fkey)
                if hit is not None and hit[0].owner != Tier.PNIC:
                    self._release(fkey)

    def _release(self, fkey: FlowKey) -> None:
        """Hand held packets of a flow to its owner now, in arrival order."""
        queue = self.held.pop(fkey, None)
        while queue:
            item = queue.popleft()
            vnic = self._vnic_of(fkey)
            self._steer(item, vnic)
            if fkey in self.held:  # it had to wait again: keep the rest behind it
                self.held[fkey].extend(queue)
                return

    def _peaks(self) -> None:
        first = sum(len(v.flows) for v in self.vnics if v is not None)
        s = self.stats
        s.peak_first_cache = max(s.peak_first_cache, first)
        s.peak_second_cache = max(s.peak_second_cache, self.pnic_flows)

    # -- PNIC failure ------------------------------------------------------------------------

    def withdraw_pnic(self, now: int) -> None:
        """Graceful withdrawal: every entry comes back exact; no offload afterwards."""
        if not self.pnic_healthy:
            return
        self.stats.events.append((now, "withdraw", ""))
        self._send(ch.Withdraw(now))
        self.sync(now)
        self.pnic_healthy = False

    def crash_pnic(self, now: int) -> None:
        """The PNIC dies: no entry comes back; the VNIC resumes from the last report."""
        if not self.pnic_healthy:
            return
        self.sync(now)  # packets already handed to the PNIC were processed before it died
        self.stats.events.append((now, "crash", ""))
        self.pnic_healthy = False
        self.link.close()
        owned, self.pnic_owned = self.pnic_owned, {}
        for flow in owned.values():
            resume(flow, now)
            flow.owner = Tier.VNIC
            self.pnic_flows -= 1
            crash = ReturnReason.CRASH.label
            self.stats.returned[crash] = self.stats.returned.get(crash, 0) + 1
            self._release(flow.key)

    # -- end, dumps --------------------------------------------------------------------------

    def settle(self) -> None:
        """Finish every packet still held, batched or at the PNIC."""
        while self.pnic_healthy and (self.dirty or self.batch or self.held):
            self.sync(self.now)  # answers may release held packets into a new batch
            for fkey in list(self.held):
                self._release(fkey)
        for fkey in list(self.held):
            self._release(fkey)

    def finish(self) -> None:
        """End of input."""
        self.settle()
        self.stats.rejected_messages = dict(self.link.rejected)
        self._peaks()

    def close(self) -> None:
        self.link.close()

    def dump_flows(self, now: int) -> list[FlowView]:
        """Every live flow with its owner tier (PNIC-owned ones as last reported)."""
        if self.pnic_healthy and self.pnic_flows:
            self.sync(now)
        views = []
        for i, name in enumerate(self.names):
            chain = self.vnics[i] or self.machine_chains[i]
            assert chain is not None
            for flow in chain.flows:
                if flow.owner == Tier.PNIC or flow.expires > now:
                    views.append(FlowView(flow.copy(), name, _TIER_NAMES[flow.owner]))
        return views


def resume(flow: Flow, now: int) -> None:
    """After a PNIC crash: continue from the last report, re-learning TCP windows loosely."""
    if flow.tcp is not None:
        ct_tcp.relearn(flow.tcp)
        timeout = ct_tcp.TCP_TIMEOUTS_NS[flow.tcp.state]
    else:
        timeout = UDP_TIMEOUT_REPLIED if flow.key.proto == 17 else ICMP_TIMEOUT
    flow.expires = max(flow.expires, now + timeout)


def to_dict_machine(config: HostConfig, m: int) -> dict:
    """One machine's config as the dict that crosses the machine↔VNIC channel."""
    return to_dict(config)["machine"][m]


__all__ = ["FlowView", "Host", "HostStats", "PacketResult"]
