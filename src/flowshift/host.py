"""The emulated host: the wiring of its machines, their VNICs and one PNIC.

Per packet: classify it (tiers/classify.py), hand it to the tier that owns its machine's chain
(the machine, tiers/machine.py, or its VNIC, tiers/vnic.py, which passes PNIC-owned flows on to
the PNIC, tiers/pnic.py, over a channel, tiers/link.py), and collect its result.

A replay is a discrete-event run in trace time (docs/architecture.md): the clock is the latest
timestamp seen (it never goes back); before a packet at T every timer due by T fires at its own
grid time and every PNIC answer due by T takes effect; a batch meets the PNIC first, one
segment between timer events at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from flowshift import channel as ch
from flowshift.config import HostConfig
from flowshift.entry import Flow, Tier, key_of
from flowshift.flow import NS_PER_S, FlowKey
from flowshift.offload import OffloadPolicy
from flowshift.packet.defrag import Defrag, DefragOutcome, Reassembled, fragment_info, split
from flowshift.packet.fragrows import fragment_rows
from flowshift.packet.parse import parse
from flowshift.packet.view import Packet, ParseError
from flowshift.results import PARSE_BASE, PENDING, BatchResults, PacketResult, Results
from flowshift.services.chain import Chain, Outcome
from flowshift.services.conntrack import FlowTable
from flowshift.stats import TIER_NAMES, FlowView, HostStats, event_order
from flowshift.tiers import _fastpath_batch as kb
from flowshift.tiers.classify import Classifier
from flowshift.tiers.fastpath import (
    STOP_OFFER,
    STOP_RETURN,
    STOP_SOFTWARE,
    STOP_TIME,
    Fastpath,
    Passed,
)
from flowshift.tiers.link import InlineLink, PnicLink, ProcessLink
from flowshift.tiers.machine import Machine
from flowshift.tiers.repass import Repass
from flowshift.tiers.vnic import Pending, Vnic, syncs_first
from flowshift.verdict import Reason, Verdict

FragKey = tuple[int, int, bytes, bytes, int, int]
# a fragment reassembly dropped -> its verdict's reason
FRAG_REASONS = {o: Reason[f"FRAG_{o.name}"] for o in DefragOutcome
                if f"FRAG_{o.name}" in Reason.__members__}

SWEEP_INTERVAL = 10 * NS_PER_S  # of trace time between sweeps of expired flows
_OK, _UNSUP = ParseError.OK, ParseError.UNSUPPORTED_PROTOCOL
_FWD = Verdict.FORWARD
_BYPASS_PARSE = (ParseError.NOT_IP, ParseError.UNKNOWN_ETHERTYPE)
_PNIC, _PNIC_LABEL = int(Tier.PNIC), Tier.PNIC.label
_MACHINE, _VNIC = int(Tier.MACHINE), int(Tier.VNIC)


ENGINES = ("compiled", "reference")


class Host:
    def __init__(self, config: HostConfig, *, policy: str | None = None,
                 capacity: int | None = None, pnic: str = "inline", latency: int = 0,
                 batch: int = 256, engine: str = "compiled") -> None:
        """`latency`: trace time (ns) before the PNIC's answer to a message takes effect;
        `batch`: packets the VNIC sends the PNIC in one message at most; `engine`: how the
        software tiers run established flows in a batch, "compiled" (their fast path,
        tiers/fastpath.py) or "reference" (every packet in Python)."""
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if policy is not None:
            config = replace(config, offload=replace(config.offload, policy=policy))
        if capacity is not None:
            config = replace(config, pnic=replace(config.pnic, capacity=capacity))
        self.config = config
        self.names = [m.name for m in config.machines]
        self.classifier = Classifier(config.machines)
        self.stats = HostStats()
        self.fastpath = Fastpath(config, self.classifier) if engine == "compiled" else None
        self.repass = Repass()  # which rows see the PNIC again after flows move down
        # the zones the fast path may open flows in (`_open_zones`): those to write again, the
        # tables it looks at, the VNIC's zones that open only while a sync would do nothing,
        # and their bound (every zone is stale once the policy is set, below)
        self._stale_zones: set[int] = set()
        self._zone_tables: dict[int, FlowTable] = {}
        self._vnic_zone_set: set[int] = set()
        self._vnic_zones = np.zeros(0, np.int64)  # the set's zones, as open_until takes them
        self._until: int | None = None
        self.machines: list[Machine | None] = [Machine(config, i)
                                               for i in range(len(config.machines))]
        if self.fastpath is not None:
            for machine in self.machines:
                if machine is not None:
                    machine.chain.flows.use_cache(self.fastpath)
        self.report_interval = max(int(config.offload.report_interval * NS_PER_S), 1)
        link: PnicLink = (ProcessLink if pnic == "process" else InlineLink)(
            config.pnic.capacity, config.machines,
            idle_timeout_ns=int(config.offload.idle_timeout * NS_PER_S),
            report_interval_ns=self.report_interval)
        self.vnic = Vnic(config, link, OffloadPolicy(config.offload, config.pnic), self.stats,
                         self._record, latency=latency, batch=batch, fastpath=self.fastpath)
        # the PNIC in this process, answering at once: the fast path's passes run the rows of
        # the flows it owns too (`_pnic_in_pass`), so that a flow moving down mid-segment
        # needs no second pass of the PNIC
        self._inline: InlineLink | None = None
        if self.fastpath is not None and isinstance(link, InlineLink) and latency == 0:
            self._inline = link
            self.fastpath.attach_pnic(link.pnic.engine)
            self.fastpath.on_take_back = self._took_back
            self.fastpath.on_move_down = self._moved_down
            self.fastpath.on_passed = self._passed
            self.vnic.before_recall = self._run_ahead
        # the segment being decided (its rows), where in it software is, whether the PNIC
        # decided rows of it since it began, and the flows that moved down in it whose rows
        # the fast path runs as they come
        self._segment: tuple[BatchResults, np.ndarray, np.ndarray] | None = None
        self._at = 0
        self._moved_rows = False
        self._moved_in_pass: dict[FlowKey, Flow] = {}
        self._all_in_pass = False  # every PNIC flow's rows too: the PNIC's first pass not made
        self.policy = self.vnic.policy
        self.clock = -1  # trace time: the latest timestamp seen
        self.next_tick = self.next_sweep = self.next_timer = -1
        self.out = Results(self.names)
        # IP reassembly per machine, in trace time (packet/defrag.py): the queues, the
        # fragments held in them by offset, and the datagrams being decided (by a negative
        # stand-in index) with their fragments
        # (Linux bounds IPv4's and IPv6's fragment memory apart)
        self.defrag = {
            (i, family): Defrag(m.conntrack.ipfrag_time * NS_PER_S,
                                m.conntrack.ipfrag_high_thresh if family == 4
                                else m.conntrack.frag6_high_thresh,
                                m.conntrack.frag6_timeout * NS_PER_S)
            for i, m in enumerate(config.machines) for family in (4, 6)}
        self.reassembles = [bool(m.services) for m in config.machines]  # conntrack runs
        self.held: dict[FragKey, dict[int, Pending]] = {}
        self.datagrams: dict[int, tuple[dict[int, Pending], Reassembled]] = {}
        self.datagram_id = -1
        for i, m in enumerate(config.machines):
            if m.start == "vnic":
                self.handoff(i, 0)

    @property
    def policy(self) -> OffloadPolicy:
        return self.vnic.policy

    @policy.setter
    def policy(self, policy: OffloadPolicy) -> None:
        self.vnic.policy = policy
        self.offloading = policy.name != "never"  # checked per packet: a plain bool
        # a flow opened compiled takes the policy's offer threshold: every zone changes
        self._stale_zones = set(range(len(self.machines)))
        if self.fastpath is not None:
            self.fastpath.set_policy(policy)

    # -- time --------------------------------------------------------------------------------

    def advance(self, ts: int) -> int:
        """Move the clock to `ts` (never back): timers and answers due by then take effect."""
        if ts <= self.clock:
            ts = self.clock
        elif self.next_timer < 0:  # the first packet sets the timers' grids
            self.next_tick, self.next_sweep = ts + self.report_interval, ts + SWEEP_INTERVAL
            self.next_timer = min(self.next_tick, self.next_sweep)
        if ts >= self.next_timer >= 0:
            self._timers(ts)
        self.clock = self.vnic.clock = ts
        if self.vnic.due(ts):
            self.vnic.deliver(ts)
        return ts

    def _timers(self, now: int) -> None:
        """Fire every timer due by `now`, each at its own time, in time order."""
        vnic = self.vnic
        while (t := min(self.next_tick, self.next_sweep)) <= now:
            vnic.clock = t
            vnic.deliver(t)
            if t == self.next_tick:
                if vnic.alive and vnic.healthy and vnic.pnic_flows:
                    vnic.tick(t)
                    self.next_tick = t + self.report_interval
                else:  # nothing at the PNIC: the next tick that can matter is after `now`
                    self.next_tick = t + self.report_interval * ((now - t)
                                                                 // self.report_interval + 1)
            if t == self.next_sweep:
                # sweeps with no other timer between them: the last one does them all
                last = min(now, self.next_tick - 1)
                t = max(t, t + SWEEP_INTERVAL * ((last - t) // SWEEP_INTERVAL))
                vnic.clock = t
                vnic.deliver(t)
                for machine in self.machines:
                    if machine is not None:
                        machine.chain.flows.sweep(t)
                for defrag in self.defrag.values():
                    if defrag.expire(t):
                        self._drop_gone(defrag)
                vnic.sweep(t)
                self.next_sweep = t + SWEEP_INTERVAL
        self.next_timer = min(self.next_tick, self.next_sweep)

    # -- per packet --------------------------------------------------------------------------

    def process(self, index: int, ts_ns: int, data: bytes | memoryview, linktype: int,
                wire_len: int) -> None:
        now = self.advance(ts_ns)
        pkt = parse(bytearray(data), linktype, wire_len)
        err = pkt.error
        if err != _OK and err != _UNSUP:
            verdict = Verdict.BYPASS if err in _BYPASS_PARSE else Verdict.UNPARSED
            self._finish(index, now, -1, -1, verdict, PARSE_BASE + err, -1, -1,
                         pkt if verdict == Verdict.BYPASS else None, wire_len)
            return
        m, direction = self.classifier.classify(pkt)
        if m < 0:
            self._finish(index, now, -1, -1, Verdict.BYPASS, Reason.NO_MACHINE, -1, -1, pkt,
                         wire_len)
            return
        item = Pending(index, now, pkt, m, direction, None)
        if pkt.frag and self.reassembles[m]:
            whole = self._fragment(item)
            if whole is not None:
                self._route(whole, now)
            return
        self._route(item, now)

    def _fragment(self, item: Pending) -> Pending | None:
        """A fragment into its machine's reassembly queue (nf_defrag, before conntrack): held
        until its datagram completes, then the datagram goes on as one packet."""
        pkt = item.pkt
        defrag = self.defrag[item.machine, pkt.family]
        ip = bytes(pkt.data[pkt.l3:])
        info = fragment_info(ip, item.machine)
        if info is None:  # too short to say where it sits: as before reassembly
            return item
        r = defrag.push(ip, item.ts, item.machine)
        self._drop_gone(defrag, info.key)  # push expired queues first
        if isinstance(r, Reassembled):
            held = self.held.pop(info.key, {})
            held[info.offset] = item
            first = held[0].pkt
            link = bytes(first.data[:first.l3])
            whole = parse(bytearray(link + r.datagram), first.linktype,
                          len(link) + len(r.datagram))
            self.datagram_id -= 1
            self.datagrams[self.datagram_id] = (held, r)
            datagram = Pending(self.datagram_id, item.ts, whole, item.machine, item.direction,
                               None)
            err = whole.error
            if err != _OK and err != _UNSUP:  # the datagram does not parse: as a packet would
                self._datagram(datagram, Verdict.UNPARSED, PARSE_BASE + err, -1, -1)
                return None
            return datagram
        outcome = defrag.last
        if outcome is DefragOutcome.QUEUED:
            self.held.setdefault(info.key, {})[info.offset] = item
            return None
        reason = FRAG_REASONS[outcome]
        self._drop(item, reason)
        if info.key not in defrag:  # the fragment took its queue with it
            for h in self.held.pop(info.key, {}).values():
                self._drop(h, reason)
        return None

    def _drop_gone(self, defrag: Defrag, but: FragKey | None = None) -> None:
        """Held fragments whose queue is gone (expired; `but` is being decided): dropped."""
        mine = [k for k in self.held if k != but and self.defrag.get((k[1], k[0])) is defrag]
        for key in [k for k in mine if k not in defrag]:
            for h in self.held.pop(key).values():
                self._drop(h, Reason.FRAG_EXPIRED)

    def _drop(self, item: Pending, reason: Reason) -> None:
        self._finish(item.index, item.ts, item.machine, item.direction, Verdict.DROP, reason,
                     -1, -1, None, item.pkt.wire_len)

    def _route(self, item: Pending, now: int) -> None:
        m, pkt, direction = item.machine, item.pkt, item.direction
        machine = self.machines[m]
        if machine is None:
            self.vnic.steer(item)
            return
        out: Outcome = machine.chain.process(pkt, direction, now)
        self.vnic.outcome(item, out, Tier.MACHINE, machine.chain.router)
        if out.flow is not None:
            self._after(m, machine, out.flow, now)

    def _after(self, m: int, machine: Machine, flow: Flow, now: int) -> None:
        """After a machine decided a packet of `flow`: hand the chain to the VNIC if the
        offload policy wants the flow, else let the flow run on the fast path."""
        if self.offloading and self.policy.wants(flow):
            self.handoff(m, now)
            self.vnic.consider(m, flow.key, now)
            return
        self._admit(machine, flow, now)

    def _admit(self, machine: Machine, flow: Flow, now: int) -> None:
        """Let a flow the machine owns run on the fast path, if it may now."""
        if self.fastpath is not None:
            chain = machine.chain
            self.fastpath.admit(flow, chain.flows, Tier.MACHINE, now,
                                0 if self.offloading else -1, chain.knobs.max > 0)

    def process_batch(self, res: BatchResults) -> list[BatchResults]:
        """Decide the packets of a batch; its arrays are filled and its buffer rewritten.
        Returns the batches now decided, in input order: this one, earlier ones, or none.

        Nothing of the batch stays in flight; only IP fragments held until their datagram
        completes (or expires) leave it undecided, and it waits for them (`finish` ends
        every wait)."""
        self.vnic.settle(max(self.clock, 0))
        self.out.current = res
        fp = self.fastpath
        if fp is not None:
            fp.on = True
        try:
            clock = np.maximum.accumulate(res.ts)  # each packet's trace time: never back
            if self.clock > 0:
                np.maximum(clock, self.clock, out=clock)
            buf = res.buf.data  # a memoryview: slices without copies
            # Python's rows only read these: no list of the whole batch
            offset, caplen, wire_len, linktype, ts = (res.offset, res.caplen, res.wire_len,
                                                      res.linktype, res.ts)
            pos, n = 0, len(res)
            frags = fragment_rows(res.buf, res.offset, res.caplen, res.linktype,
                                  res.wire_len) if any(self.reassembles) else np.zeros(0, int)
            while pos < n:
                self.advance(int(ts[pos]))  # the timers up to this segment fire first
                end = int(np.searchsorted(clock, self.next_timer, "left")) if (
                    self.next_timer >= 0) else n
                end = max(end, pos + 1)
                # a fragment is a segment of its own: the datagram it may complete changes
                # its flow's entry before the PNIC decides the rows after it
                f = int(np.searchsorted(frags, pos))
                if f < len(frags):
                    end = pos + 1 if frags[f] == pos else min(end, int(frags[f]))
                # a fragment's segment is Python's: its datagram is reassembled there
                fast = fp is not None and not (f < len(frags) and frags[f] == pos)
                self._moved_in_pass.clear()
                rows = self._pnic_first(res, clock, pos, end, fast)
                self.vnic.moved_down.clear()  # the pass saw every flow the PNIC owns
                self.repass.begin()
                self._segment = (res, clock, rows)
                at = ahead = 0
                self._moved_rows = False  # rows holds rows the PNIC decided since
                while at < len(rows):
                    why = STOP_SOFTWARE
                    if ahead:  # rows the fast path saw it would stop at: straight to Python
                        ahead -= 1
                    elif fast and fp is not None and self._open_zones(fp):
                        at, why, ahead = fp.run(res, clock, rows, at, self.vnic.next_due())
                        if fp.pnic_from >= 0:
                            self._pnic_ran(fp.pnic_from)
                        if why == STOP_RETURN:  # the row and its entry are software's now
                            self._hand_back(fp, int(rows[at]), int(clock[rows[at]]))
                            why = STOP_TIME  # the entry takes effect at the row's time
                    if why == STOP_OFFER:
                        self._at = at
                        self._offer(int(rows[at - 1]), int(clock[rows[at - 1]]))
                        if at < len(rows) and fp is not None and fp.active and (
                                not self.vnic.moved_down and res.verdict[rows[at]] == PENDING
                                and clock[rows[at]] >= self.vnic.next_due()):
                            why = STOP_TIME  # what the fast path would say of the next row
                    if why != STOP_OFFER and at < len(rows):
                        # Python's row; at a due time, it takes effect first
                        i = int(rows[at])
                        if self._moved_rows and res.verdict[i] != PENDING:
                            at += 1
                            continue  # the PNIC's, since its flow moved down
                        # the clock as packet-by-packet, past the rows run compiled: answers
                        # due by then may move this row's flow down, so they come first
                        self._at = at
                        self.advance(int(clock[i]))
                        if self.vnic.moved_down:
                            ahead = 0  # a row seen as a miss may be a moved flow's
                            self._repass(res, clock, rows, at)
                        self._catch_up()
                        if self._moved_rows and res.verdict[i] != PENDING:
                            at += 1
                            continue
                        if why == STOP_TIME and not self.vnic.moved_down:
                            # the row stopped the fast path only for what was due, which has
                            # taken effect: it asks the fast path again (nothing is due by then)
                            continue
                        at += 1
                        start = int(offset[i])
                        cached = fp.cached if fp is not None else 0
                        self._at = at
                        self.process(res.index0 + i, int(ts[i]),
                                     buf[start:start + int(caplen[i])], int(linktype[i]),
                                     int(wire_len[i]))
                        if ahead and fp is not None and fp.cached != cached:
                            ahead = 0  # a row seen as a miss may be this flow's: ask again
                    if self.vnic.moved_down and at < len(rows):
                        ahead = 0
                        self._repass(res, clock, rows, at)
                pos = end
            self.vnic.settle(self.clock)
        finally:
            self._segment = None
            self._moved_in_pass.clear()
            self._all_in_pass = False
            if fp is not None:
                fp.on = False
                self._count_fast()
            self.out.current = None
            res.flush()
        if self.out.open or (res.verdict == PENDING).any():
            self.out.hold(res)
        else:
            return [res]
        return self.out.ready()

    def _open_zones(self, fp: Fastpath) -> bool:
        """Whether the fast path's next pass runs the PNIC's rows too (`_pnic_in_pass`), and
        which machines' flows it may open (tiers/_fastpath_open.py), and until when: those
        whose table has no limit, the keys of its `Flow`s known to the pass (`Fastpath.hold`:
        a miss of the fast path's index and of those is a miss of the table); at the VNIC, for
        a chain that syncs with the PNIC before a new flow (`vnic.syncs_first`: NAT or a load
        balancer), while that sync would do nothing (`Vnic.quiet_until`). Can the pass do
        anything?

        Per pass it costs a look at each table and one bound for every VNIC zone at once: a
        zone itself changes only when its machine hands its chain over (`_stale_zones`)."""
        if self._stale_zones:
            self._set_zones(fp)
        vnic = self.vnic  # the offers the pass may make, as `Vnic.consider` would take them
        fp.let_pnic(self._pnic_in_pass(), vnic.capacity - vnic.pnic_flows, self.policy.supported)
        for table in self._zone_tables.values():
            if table.dirty:
                fp.hold(table)
        if len(self._vnic_zones):
            until = vnic.quiet_until()
            if until != self._until:
                self._until = until
                fp.open_until(self._vnic_zones, until)
        return fp.active

    def _pnic_in_pass(self) -> bool:
        """May the fast path's next pass run the rows of the flows the PNIC owns as the
        PNIC's own pass would, and move flows there as the VNIC's offers would? With the PNIC
        in this process at latency 0, alive and healthy, and nothing of the VNIC's held or in
        flight (no row may overtake it)."""
        vnic = self.vnic
        return (self._inline is not None and vnic.alive and vnic.healthy
                and not vnic.queue.busy())

    def _pnic_ran(self, first: int) -> None:
        """A pass ran the PNIC's rows from trace time `first` on, as `_pnic_pass` does."""
        vnic = self.vnic
        vnic.synced_at = -1
        vnic.lower_floor(first + vnic.min_timeout)

    def _hand_back(self, fp: Fastpath, i: int, now: int) -> None:
        """Row i, a PNIC flow's, stopped a pass with its entry punted (STOP_RETURN): the
        entry comes back to the VNIC at the row's time, as from the PNIC's own pass."""
        assert self._inline is not None
        slot, punt = fp.handed_back(i)
        self.vnic.defer(self._inline.hand_back(slot, punt, now), now)
        self.vnic.synced_at = -1

    def _took_back(self, i: int, raw: bytes, backoff: int) -> None:
        """A pass took the entry `raw` of a PNIC flow back at batch row i (a FIN or RST the
        PNIC punts) into a row of the fast path, and ran the row there (the PNIC freed its
        slot): the VNIC takes the flow back as from that Return at the row's time."""
        self.vnic.took_back(key_of(raw), backoff, self._time_of(i))

    def _moved_down(self, i: int, table: FlowTable, raw: bytes) -> None:
        """A pass moved a VNIC flow its policy wanted after batch row i down to the PNIC's
        cache: the flow, as it was, back in its table as the shadow of a PNIC-owned flow, as
        the VNIC's offer and the PNIC's answer make it at latency 0."""
        flow = Flow.from_bytes(raw)
        table.attach(flow)
        self.vnic.moved_down_in_pass(flow, self._time_of(i))
        self._moved_in_pass[flow.key] = flow

    def _passed(self, passed: Passed) -> None:
        """The end of a pass's notes: `_moved_down` and `_took_back` of the flows it moved
        down and took back, counted at once at their rows' times, and the clock at the last
        note's row. Nothing is due inside a pass (it stops before), so the clock moves there
        once, not note by note."""
        if passed.keys:
            clock = self._segment_clock()
            self.vnic.passed(passed, clock[passed.down_rows].tolist(),
                             clock[passed.back_rows].tolist())
        self.advance(self._time_of(passed.last_row))

    def _time_of(self, i: int) -> int:
        """The time of batch row i of the segment being decided."""
        return int(self._segment_clock()[i])

    def _segment_clock(self) -> np.ndarray:
        assert self._segment is not None
        return self._segment[1]

    def _set_zones(self, fp: Fastpath) -> None:
        """The stale machines' zones as they stand: the table (none when it has a limit), the
        tier that owns it and the offer threshold of a flow opened there."""
        offer_at = 0 if self.offloading else -1
        vnic_zones = self._vnic_zone_set
        for m in sorted(self._stale_zones):
            machine = self.machines[m]
            if machine is not None:
                chain: Chain | None = machine.chain
                tier = _MACHINE
            else:
                chain = self.vnic.chains[m]
                tier = _VNIC
            table = chain.flows if chain is not None else None
            vnic_zones.discard(m)
            self._zone_tables.pop(m, None)
            if table is not None:
                self._zone_tables[m] = table
                fp.hold(table)
                if table.buckets:
                    table = None
                elif tier == _VNIC and chain is not None and syncs_first(chain):
                    vnic_zones.add(m)  # its new flows wait for the VNIC's sync
            fp.open_zone(m, table, tier, offer_at)
        self._vnic_zones = np.array(sorted(vnic_zones), np.int64)
        self._until = None  # the VNIC zones' bound is set at the next look
        self._stale_zones.clear()

    def _offer(self, i: int, now: int) -> None:
        """Row i ran on the fast path and now the offload policy wants its flow: what the
        tier that owns it does after deciding a packet (the flow comes back to Python)."""
        fp = self.fastpath
        assert fp is not None
        self.advance(now)  # nothing is due: the fast path stops before any due time
        flow = fp.take(i)
        m = flow.machine
        machine = self.machines[m]
        if machine is not None:
            self._after(m, machine, flow, now)
        else:
            self.vnic.after(m, flow, now)

    def _count_fast(self) -> None:
        """The packets the fast path ran, at the tier that owns their flow."""
        fp = self.fastpath
        assert fp is not None
        for tier, (packets, size) in enumerate(fp.counts.tolist()):
            if packets:
                self.stats.tier_packets[TIER_NAMES[tier]] += packets
                self.stats.tier_bytes[TIER_NAMES[tier]] += size
        fp.counts[:] = 0
        self.stats.flows_total += fp.opened
        fp.opened = 0

    def ready(self) -> list[BatchResults]:
        """Batches decided since (after `finish`: every one left)."""
        return self.out.ready()

    def _pnic_first(self, res: BatchResults, clock: np.ndarray, lo: int, hi: int,
                    fast: bool) -> np.ndarray:
        """The undecided rows lo..hi through the PNIC's data path first; the rows it left to
        software, in order. The entries it hands back take effect at their packet's time.
        When the fast path's passes may run the PNIC's rows (`fast`, `_pnic_in_pass`), they
        run them as they come instead (`_all_in_pass`: `_run_ahead` and `_catch_up` run a
        flow's rest of the segment at the PNIC when the order would show)."""
        res.flush()
        rows = lo + np.flatnonzero(res.verdict[lo:hi] == PENDING)
        self._all_in_pass = fast and self._pnic_in_pass()
        if self._all_in_pass or not self._pnic_ready(rows):
            return rows
        done = self._pnic_pass(res, clock, rows, lo, hi)
        return rows if done is None else rows[~done[rows - lo]]

    def _repass(self, res: BatchResults, clock: np.ndarray, rows: np.ndarray, at: int) -> None:
        """Flows just moved down to the PNIC: their rows in rows[at:] meet it now (rows keeps
        them; the fast path and Python skip what it decided), or, when the fast path's passes
        run the PNIC's rows, as they come (`_run_ahead` runs them now if a recall needs it)."""
        moved = self.vnic.moved_down
        if self._pnic_in_pass():
            for flow in moved:
                self._moved_in_pass[flow.key] = flow
        else:
            self._pnic_rows(res, clock, rows, at, moved)
        moved.clear()

    def _pnic_rows(self, res: BatchResults, clock: np.ndarray, rows: np.ndarray, at: int,
                   flows: list[Flow]) -> None:
        """The undecided rows of `flows` in rows[at:] through the PNIC now."""
        pick = self.repass.pick(res, rows, at, flows)
        if len(pick):
            self._pnic_again(res, clock, pick)
            self._moved_rows = True

    def _run_ahead(self, key: FlowKey) -> None:
        """The VNIC is about to recall a PNIC flow whose rows the fast path's passes run as
        they come (it moved down in this segment, or the PNIC's first pass was not made): the
        rest of the segment's rows of it meet the PNIC now, as they would have in the PNIC's
        first or second pass, so the entry comes back with them (docs/architecture.md,
        rule 4)."""
        flow = self._moved_in_pass.pop(key, None)
        if flow is None and self._all_in_pass:
            flow = self.vnic.pnic_owned.get(key)
        if flow is not None and self._segment is not None:
            res, clock, rows = self._segment
            self._pnic_rows(res, clock, rows, self._at, [flow])

    def _catch_up(self) -> None:
        """The passes were to run PNIC flows' rows as they come and no longer can (something
        of the VNIC's is held or in flight): the rows of the segment left meet the PNIC now,
        as in its first pass (every PNIC flow's) or its second (the flows that moved down in
        the segment and that it still holds)."""
        if not (self._all_in_pass or self._moved_in_pass) or self._segment is None or (
                self._pnic_in_pass()):
            return
        res, clock, rows = self._segment
        if self._all_in_pass:
            self._all_in_pass = False
            self._moved_in_pass.clear()
            left = rows[self._at:]
            left = left[res.verdict[left] == PENDING]
            if len(left):
                self._pnic_again(res, clock, left)
                self._moved_rows = True
            return
        owned = self.vnic.pnic_owned
        flows = [f for f in self._moved_in_pass.values() if f.key in owned]
        self._moved_in_pass.clear()
        if flows:
            self._pnic_rows(res, clock, rows, self._at, flows)

    def _pnic_again(self, res: BatchResults, clock: np.ndarray, rows: np.ndarray) -> None:
        """Undecided rows through the PNIC's data path (of flows that just moved down, or all
        a segment has left), selected in the stretch of the batch they span; those it leaves
        stay undecided, software's.
        (Results Python set and did not flush yet are all of rows before these: no flush.)"""
        if not self._pnic_ready(rows):
            return
        self._pnic_pass(res, clock, rows, int(rows[0]), int(rows[-1]) + 1)

    def _pnic_ready(self, rows: np.ndarray) -> bool:
        """Is there a pass to make (rows, and a PNIC that owns flows)? Then every answer of
        the PNIC is applied first."""
        vnic = self.vnic
        if not (vnic.alive and vnic.healthy and vnic.pnic_owned) or not len(rows):
            return False
        vnic.drain()  # the PNIC is quiet: nothing of ours in flight
        return True

    def _pnic_pass(self, res: BatchResults, clock: np.ndarray, rows: np.ndarray, lo: int,
                   hi: int) -> np.ndarray | None:
        """The rows `rows` (sorted, within lo..hi) through the PNIC, each at its `clock`,
        selected in that stretch of the batch, as views of it: a pass costs the stretch, not
        the batch. Which rows of the stretch it decided (None: the transport could not take
        them, nothing ran)."""
        select = np.zeros(hi - lo, np.bool_)
        select[rows - lo] = True
        part = res.view(lo, hi)
        vnic = self.vnic
        returned = vnic.link.run_batch(part, select, clock[lo:hi])
        if returned is None:
            return None
        first = int(clock[lo])
        vnic.defer(returned, first)
        vnic.synced_at = -1
        vnic.lower_floor(first + vnic.min_timeout)
        done = np.empty(len(select), np.bool_)
        n, size = kb.pass_tally(select, part.verdict, part.tier, part.wire_len, _PNIC, done)
        self.stats.tier_packets[_PNIC_LABEL] += int(n)
        self.stats.tier_bytes[_PNIC_LABEL] += int(size)
        return done

    # -- results -----------------------------------------------------------------------------

    def _record(self, item: Pending, verdict: int, reason: int, rule: int, tier: int,
                rewritten: bool) -> None:
        if item.index < -1:  # a reassembled datagram: its verdict is every fragment's
            self._datagram(item, verdict, reason, rule, tier)
            return
        self._finish(item.index, item.ts, item.machine, item.direction, verdict, reason, rule,
                     tier, item.pkt if verdict == _FWD else None, item.pkt.wire_len, rewritten)

    def _datagram(self, item: Pending, verdict: int, reason: int, rule: int, tier: int) -> None:
        """Forwarded: the translated datagram cut again at the boundaries it came in with,
        each piece with its own fragment's link header (Linux keeps the IPv4 id; its new IPv6
        id is random, the received one stands in for it)."""
        held, r = self.datagrams.pop(item.index)
        if verdict != _FWD:
            for h in held.values():
                self._finish(h.index, h.ts, h.machine, h.direction, verdict, reason, rule, tier,
                             None, h.pkt.wire_len)
            return
        whole = bytes(item.pkt.data[item.pkt.l3:])
        pieces = split(whole, r.pieces, None if whole[0] >> 4 == 4 else r.ident)
        for (offset, _), piece in zip(r.pieces, pieces, strict=True):
            h = held[offset]
            data = bytearray(bytes(h.pkt.data[:h.pkt.l3]) + piece)
            if tier >= 0:
                self.stats.tier_packets[TIER_NAMES[tier]] += 1
                self.stats.tier_bytes[TIER_NAMES[tier]] += len(data)
            self.out.put(h.index, h.ts, h.machine, h.direction, verdict, reason, rule, tier,
                         data, len(data), True)

    def _finish(self, index: int, ts: int, machine: int, direction: int, verdict: int,
                reason: int, rule: int, tier: int, pkt: Packet | None, wire_len: int,
                rewritten: bool = False) -> None:
        if tier >= 0:
            name = TIER_NAMES[tier]
            self.stats.tier_packets[name] += 1
            self.stats.tier_bytes[name] += wire_len
        self.out.put(index, ts, machine, direction, verdict, reason, rule, tier,
                     pkt.data if pkt is not None else None, wire_len, rewritten)

    def results(self) -> Iterator[PacketResult]:
        """Finished results, in input order (a held packet delays the ones after it)."""
        return self.out.take()

    # -- machine -> VNIC, the PNIC going away, end, dumps -------------------------------------

    def handoff(self, m: int, now: int) -> None:
        """The machine hands its config and every flow entry to its VNIC (one message)."""
        machine = self.machines[m]
        if machine is None:
            raise RuntimeError(f"machine {self.names[m]!r} was already handed to its VNIC")
        machine_end, vnic_end = ch.pair()
        machine_end.send(machine.handoff())
        msg = vnic_end.receive()
        if not isinstance(msg, ch.Handoff):
            raise RuntimeError(f"handoff of machine {self.names[m]!r} arrived as {msg!r}")
        self.stats.offloads_to_vnic += self.vnic.adopt(msg, now, machine.chain.flows)
        if machine.chain.flows.cached:
            raise RuntimeError(f"handoff of machine {self.names[m]!r} left flows behind")
        if self.fastpath is not None:
            self.fastpath.forget(machine.chain.flows)
        self.machines[m] = None
        self._stale_zones.add(m)
        self.stats.events.append((now, "handoff", self.names[m]))

    def withdraw_pnic(self, now: int) -> None:
        """Graceful withdrawal: every entry comes back exact; no offload afterwards."""
        self.vnic.withdraw(self.advance(now))

    def crash_pnic(self, now: int) -> None:
        """The PNIC dies: no entry comes back; the VNIC resumes from the last report."""
        self.vnic.crash(self.advance(now))

    def finish(self) -> None:
        """End of input: every packet decided, the counters complete."""
        self.vnic.settle(max(self.clock, 0))
        self._drop_held()
        rejected = dict(self.vnic.link.rejected)
        for reason, n in [*self.vnic.rejected.items(), *self.vnic.pnic_rejected().items()]:
            rejected[reason] = rejected.get(reason, 0) + n
        self.stats.rejected_messages = rejected
        self.stats.events.sort(key=event_order)
        self.vnic.peaks()

    def _drop_held(self) -> None:
        """End of input: fragments still held never saw their datagram complete."""
        for held in self.held.values():
            for h in held.values():
                self._drop(h, Reason.FRAG_EXPIRED)
        self.held.clear()

    def close(self) -> None:
        self.vnic.link.close()

    def dump_flows(self, now: int) -> list[FlowView]:
        """Every live flow as it stands at `now`, with its owner tier. Listing takes the fast
        path's flows back to their tables; those it may run go back to it, so that the
        passes after a dump run and open flows as before (`_open_zones`)."""
        now = self.advance(now)
        views = self.vnic.views(now, [m.chain if m is not None else None for m in self.machines])
        self._recache(now)
        return views

    def _recache(self, now: int) -> None:
        """Every flow a tier holds in Python that its fast path may run, cached again, as
        after a Python decision of one of its packets (`_admit`, `Vnic.admit`): admitted as
        if a batch were being decided, which the next one is."""
        fp = self.fastpath
        if fp is None:
            return
        on, fp.on = fp.on, True
        try:
            for m, machine in enumerate(self.machines):
                chain = machine.chain if machine is not None else self.vnic.chains[m]
                for flow in list(chain.flows) if chain is not None else ():
                    if machine is not None:
                        self._admit(machine, flow, now)
                    else:
                        self.vnic.admit(m, flow, now)
        finally:
            fp.on = on


__all__ = ["Classifier", "FlowView", "Host", "HostStats", "PacketResult"]
