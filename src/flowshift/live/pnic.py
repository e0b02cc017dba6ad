"""The VNIC's side of the live PNIC: offer flows to the eBPF datapath, take them back, drills.

The daemon's chains stay the first cache. A flow the offload policy wants is inserted into the
datapath's second cache *held*, every punt of it already queued is handled in software, the
entry is rewritten with the state software reached, and only then released to the fast path
(docs/live.md, the handoff). From then on the chain keeps a shadow of the flow (owner `pnic`),
refreshed from the map every report interval. A punt of a flow the PNIC owns (the datapath
handed it back on a FIN/RST, an expired timeout or a shape it does not run) takes the exact
entry back before the packet runs in software; so do idle flows, the least recently used one
when the cache is full, `live return` and a withdrawal. A crash loses the map unread: the
shadows resume from the last report with their TCP windows re-learned loosely.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flowshift.live.datapath import Datapath, Mode, Port, key_bytes
from flowshift.live.engine import (
    Chain,
    Flow,
    FlowKey,
    HostConfig,
    OffloadPolicy,
    Tier,
    established,
    resume,
)
from flowshift.live.pipeline import DIRECTIONS, UNKNOWN_PORT, Pipeline, mac_bytes
from flowshift.live.punt import MARK, PUNT_IF, PuntSource
from flowshift.live.source import AfPacketPorts
from flowshift.live.state import LiveState
from flowshift.services.chain import Outcome
from flowshift.verdict import PuntReason, RefuseReason, ReturnReason

log = logging.getLogger("flowshift.live.pnic")
SECOND = 1_000_000_000
RELEASE_TRIES = 64  # handoff attempts (each after handling the punts in flight) before giving up
DRAIN_LIMIT = 8192  # punts handled in one drain: a flood elsewhere must not stall a handoff
QUIET = 0.0005  # seconds without a punt that end a drain (punts still in a CPU's backlog)
MARK_WAIT = 0.05  # seconds a drain waits for its marker frame
GRACE = 0.002  # seconds for packets already on the fast path to finish (withdraw)
_RETURN_OF_PUNT = {PuntReason.LIFE: ReturnReason.CLOSED, PuntReason.EXPIRED: ReturnReason.EXPIRED,
                   PuntReason.UNSUPPORTED: ReturnReason.UNSUPPORTED}
PIN_FILES = ("fs_flows", "fs_replies", "fs_holds", "fs_config", "fs_ports", "fs_punts",
             "pnic_ingress", "hold_ctl")


def _current_cpu() -> int:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[36])  # field 39 of stat(5), "processor"


def datapath_name(host_ns: str) -> str:
    """The datapath of fs-host[-suffix] pins under /sys/fs/bpf/fs-host[-suffix]/."""
    return host_ns.removeprefix("fs-")


def flow_text(key: FlowKey) -> str:
    """A flow's original tuple as `live offload` / `live return` take it:
    `tcp 10.0.0.1:40000 > 198.51.100.2:5001`, IPv6 addresses in brackets."""
    proto = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(key.proto, str(key.proto))

    def end(addr: bytes, port: int) -> str:
        a = ipaddress.ip_address(addr)
        return f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}"

    return f"{proto} {end(key.src, key.sport)} > {end(key.dst, key.dport)}"


def parse_flow_text(text: str) -> tuple[int, bytes, int, bytes, int]:
    """(proto, src, sport, dst, dport) of a flow_text; ValueError with a one-line message."""
    protos = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
    parts = text.split()
    if len(parts) != 4 or parts[2] != ">":
        raise ValueError(f"flow {text!r}: expected 'PROTO SRC:PORT > DST:PORT'")
    proto = protos.get(parts[0].lower())
    if proto is None:
        raise ValueError(f"flow {text!r}: protocol {parts[0]!r} is not tcp, udp, icmp, icmpv6")

    def end(s: str) -> tuple[bytes, int]:
        addr, _, port = s.rpartition(":")
        try:
            number = int(port)
            if not 0 <= number <= 65535:
                raise ValueError(port)
            return ipaddress.ip_address(addr.strip("[]")).packed, number
        except ValueError:
            raise ValueError(f"flow {text!r}: {s!r} is not ADDRESS:PORT") from None

    (src, sport), (dst, dport) = end(parts[1]), end(parts[3])
    return proto, src, sport, dst, dport


class PnicChain(Chain):
    """A machine's chain at the VNIC whose flows may be owned by the PNIC (shadows)."""

    def __init__(self, chain: Chain, vnic: PnicVnic) -> None:
        super().__init__(chain.config, chain.index, Tier.VNIC)
        self.vnic = vnic

    def lookup_remote(self, key: FlowKey, now: int) -> tuple[Flow, int] | None:
        """A packet of a flow the PNIC owns reached software: take the entry back first."""
        hit = self.flows.get(key)
        if hit is None:
            return None
        self.vnic.take_back(hit[0], now, None)
        hit = self.flows.get(key)
        if hit is None or hit[0].expires <= now:
            if hit is not None:
                self.flows.remove(hit[0])
            return None
        return hit

    def in_use(self, reply_key: FlowKey, now: int) -> bool:
        hit = self.flows.get(reply_key)  # NAT's port search must not pull flows back
        if hit is not None and hit[0].owner == Tier.PNIC:
            return True
        return super().in_use(reply_key, now)

    def process(self, pkt, direction: int, now: int) -> Outcome:  # type: ignore[no-untyped-def]
        out = super().process(pkt, direction, now)
        self.vnic.seen(out, direction)
        return out


@dataclass
class _Offloaded:
    """A PNIC-owned flow: its shadow in the chain, the machine direction of its original
    tuple, and its counters when it went down (what the PNIC carried is the difference)."""

    flow: Flow
    odir: int
    packets: tuple[int, int]
    nbytes: tuple[int, int]


@dataclass
class PnicStats:
    offloads: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    returned: dict[str, int] = field(default_factory=dict)
    held_handled: int = 0  # HELD punts handled in software during handoffs
    release_retries: int = 0  # releases refused because a punt was in flight
    late: int = 0  # MISS punts of a flow already released (a straggler from before its insert)
    received: dict[str, int] = field(default_factory=dict)  # punts read, by tag
    # (machine, direction) -> [packets, bytes] the fast path carried
    traffic: dict[tuple[int, int], list[int]] = field(default_factory=dict)


class PnicVnic:
    """The datapath of a live host and the daemon's policy over it (one thread: the loop)."""

    def __init__(self, state: LiveState, config: HostConfig, pipeline: Pipeline,
                 ports: AfPacketPorts, host_ns: str) -> None:
        self.config = config
        self.pipeline = pipeline
        self.ports = ports
        self.policy = OffloadPolicy(config.offload, config.pnic)
        self.capacity = config.pnic.capacity
        self.idle_ns = int(config.offload.idle_timeout * SECOND)
        self.report_ns = max(1, int(config.offload.report_interval * SECOND))
        self.stats = PnicStats()
        # one CPU: a marker sent behind our frames then follows them through one backlog
        os.sched_setaffinity(0, {_current_cpu()})
        self.healthy = True
        self.mode = "fast"
        self.owned: dict[FlowKey, _Offloaded] = {}
        self.backoff: dict[FlowKey, int] = {}
        self.candidates: dict[FlowKey, tuple[Flow, int]] = {}
        self.holding: FlowKey | None = None
        # frames of the held flow in its lighter direction (a bulk transfer's ACKs), processed
        # but not sent until the release: without ACKs its sender runs out of window and
        # stops, so the punts in flight drain and the release succeeds; the heavy direction
        # goes out at once, so nothing the fast path carries later can overtake it
        self.deferred: list[tuple[int, bytearray]] = []
        self.hold_dir = -1  # the flow direction whose frames wait: the one with fewer bytes
        self.last_fdir = -1
        self.draining = False
        self.reason = 0  # the punt tag of the frame being processed
        self.last: Flow | None = None
        self.snapshot: dict[str, object] = {}
        self.reports = 0  # reports read from the map so far
        self.marked = 0  # the last marker frame read back from the punt device
        self.next_report = time.monotonic_ns() + self.report_ns
        pipeline.chains = [PnicChain(c, self) for c in pipeline.chains]
        assert state.uplink is not None

        def port(p: object) -> Port:
            return Port(socket.if_nametoindex(p.ifname), mac_bytes(p.mac),  # type: ignore[attr-defined]
                        mac_bytes(p.peer_mac))  # type: ignore[attr-defined]

        self.dp = Datapath(datapath_name(host_ns), self.capacity, config.machines,
                           uplink=port(state.uplink),
                           machine_ports=[port(p) for p in state.ports],
                           punt_ifindex=socket.if_nametoindex(PUNT_IF))
        try:
            self.source = PuntSource()
            for p in (*state.ports, state.uplink):
                self.dp.attach(p.ifname)
        except BaseException:
            self.dp.close()
            raise
        self._take_snapshot()

    def close(self) -> None:
        self.source.close()
        self.dp.close()

    # -- frames ------------------------------------------------------------------------------

    def on_punts(self) -> None:
        """Frames ready on the punt device, then the offers they made due."""
        for reason, data in self.source.receive():
            self.frame(reason, data)
        if not self.draining:
            self._offer_candidates()

    def frame(self, reason: int, data: bytearray) -> None:
        if reason == MARK:
            self.marked = int.from_bytes(data[len(data) - 39:len(data) - 31], "big")
            return
        self.reason, self.last = reason, None
        label = PuntReason(reason).label if reason in PuntReason._value2member_map_ else "none"
        rec = self.stats.received
        rec[label] = rec.get(label, 0) + 1
        try:
            out = self.pipeline.frame(UNKNOWN_PORT, data, time.monotonic_ns())
        except Exception:  # a bug must not take every machine off the net
            log.exception("punted frame of %d bytes", len(data))
            self.pipeline.count_error()
            return
        if out >= 0:
            if self.last is not None and self.last.key == self.holding and \
                    self.last_fdir == self.hold_dir:
                self.deferred.append((out, data))  # sent once the flow is released
            else:
                self.ports.send(out, data)
        if reason == PuntReason.HELD and self.last is not None:
            self.dp.handled(key_bytes(self.last.key))
            self.stats.held_handled += 1

    def seen(self, out: Outcome, direction: int) -> None:
        """After a chain ran a packet: remember its flow, and whether the policy wants it."""
        flow = out.flow
        self.last, self.last_fdir = flow, out.direction
        if flow is None or flow.owner != Tier.VNIC or flow.key == self.holding:
            return
        if not self.policy.wants(flow):
            return
        if flow.packets[0] + flow.packets[1] < self.backoff.get(flow.key, 0):
            return
        odir = direction if out.direction == 0 else 1 - direction
        self.candidates[flow.key] = (flow, odir)

    def drain(self, quiet: bool) -> None:
        """Handle every punt queued on this CPU's path: up to a marker frame sent now, which
        also comes back only once every frame sent before it on this CPU's backlog (the
        frames just forwarded in software) has been delivered; with `quiet`, then until the
        device is quiet for QUIET (punts still in another CPU's backlog). Bounded by
        DRAIN_LIMIT frames and MARK_WAIT seconds."""
        self.draining = True
        mark = self.source.mark()
        deadline = time.monotonic() + MARK_WAIT
        try:
            n = 0
            while n < DRAIN_LIMIT and time.monotonic() < deadline:
                got = 0
                for reason, data in self.source.receive():
                    self.frame(reason, data)
                    got += 1
                n += got
                if self.marked >= mark and (not quiet or not got):
                    if not quiet or not select.select([self.source], [], [], QUIET)[0]:
                        return
                elif not got:
                    select.select([self.source], [], [], QUIET)
        finally:
            self.draining = False

    # -- offload -----------------------------------------------------------------------------

    def _offer_candidates(self) -> None:
        while self.candidates:
            key = next(iter(self.candidates))
            flow, odir = self.candidates.pop(key)
            chain = self.pipeline.chains[key.zone]
            hit = chain.flows.get(key)
            if hit is not None and hit[0] is flow and flow.owner == Tier.VNIC:
                self.offer(flow, odir)

    def _refused(self, flow: Flow, reason: RefuseReason) -> None:
        total = flow.packets[0] + flow.packets[1]
        self.backoff[flow.key] = max(2 * total, total + 1)
        r = self.stats.refused
        r[reason.label] = r.get(reason.label, 0) + 1

    def offer(self, flow: Flow, odir: int) -> str:
        """Move one flow to the PNIC (the handoff); "" when done, else why not."""
        refuse = None
        if not self.healthy:
            refuse = RefuseReason.UNHEALTHY
        elif not self.policy.supports(flow):
            refuse = RefuseReason.UNSUPPORTED_SERVICE
        elif len(self.owned) >= self.capacity:
            refuse = RefuseReason.FULL
            self._make_room(flow)
        if refuse is None:
            entry = flow.copy()
            entry.owner = Tier.PNIC
            if not self.dp.insert(entry.to_bytes(), held=True):
                refuse = (RefuseReason.DUPLICATE if self.dp.get(flow.key) is not None
                          else RefuseReason.FULL)
        if refuse is not None:
            self._refused(flow, refuse)
            return refuse.label
        kb = key_bytes(flow.key)
        chain = self.pipeline.chains[flow.key.zone]
        self.holding = flow.key
        self.hold_dir = 0 if flow.bytes[0] < flow.bytes[1] else 1
        released = False
        try:
            for attempt in range(RELEASE_TRIES):
                # every punt of the flow queued before the insert (MISS) or since (HELD) runs
                # here, in arrival order, on the first cache's state; and what software sent
                # of it has arrived before the fast path may send more
                self.drain(quiet=attempt == 0)
                hit = chain.flows.get(flow.key)
                if hit is None or hit[0] is not flow:
                    break  # it ended (or reopened) while held: nothing to hand over
                entry = flow.copy()
                entry.owner = Tier.PNIC
                self.dp.update(entry.to_bytes())  # the fast path starts from this state
                if self.dp.release(kb):
                    released = True
                    break
                self.stats.release_retries += 1
        finally:
            self.holding = None
            deferred, self.deferred = self.deferred, []
            for out, data in deferred:  # in arrival order, as processed
                self.ports.send(out, data)
        if not released:
            # the flow stays at the VNIC; punts of it still in flight are plain misses now
            self.dp.remove(kb)
            self.drain(quiet=False)
            self._refused(flow, RefuseReason.UNHEALTHY)
            return RefuseReason.UNHEALTHY.label
        flow.owner = Tier.PNIC
        log.debug("offload %s", flow_text(flow.key))
        self.owned[flow.key] = _Offloaded(flow, odir, (flow.packets[0], flow.packets[1]),
                                          (flow.bytes[0], flow.bytes[1]))
        self.stats.offloads += 1
        return ""

    def _make_room(self, candidate: Flow) -> None:
        """Take back the least recently used PNIC flow if it sat idle for the candidate's life."""
        lru = min(self.owned.values(), key=lambda o: o.flow.last_seen, default=None)
        if lru is not None and lru.flow.last_seen < candidate.created:
            self.take_back(lru.flow, time.monotonic_ns(), ReturnReason.ROOM)

    # -- returns -----------------------------------------------------------------------------

    def _carried(self, o: _Offloaded, flow: Flow) -> None:
        """Count what the fast path carried of a flow (its counters past the offload)."""
        for fdir in (0, 1):
            mdir = o.odir if fdir == 0 else 1 - o.odir
            row = self.stats.traffic.setdefault((flow.key.zone, mdir), [0, 0])
            row[0] += max(0, flow.packets[fdir] - o.packets[fdir])
            row[1] += max(0, flow.bytes[fdir] - o.nbytes[fdir])

    def take_back(self, shadow: Flow, now: int, reason: ReturnReason | None) -> None:
        """The flow's exact entry comes out of the map into the first cache."""
        o = self.owned.pop(shadow.key, None)
        chain = self.pipeline.chains[shadow.key.zone]
        raw = self.dp.remove(key_bytes(shadow.key))
        if reason is None:
            if self.reason == PuntReason.MISS:
                self.stats.late += 1
            reason = _RETURN_OF_PUNT.get(PuntReason(self.reason) if self.reason in
                                         PuntReason._value2member_map_ else PuntReason.MISS,
                                         ReturnReason.UNSUPPORTED)
        if raw is None:  # not in the map (cannot happen while we own it): resume the shadow
            flow = shadow
            resume(flow, now)
            flow.owner = Tier.VNIC
            chain.flows.touch(flow)  # software's again: a bounded table's sweep must see it
        else:
            flow = Flow.from_bytes(raw)
            chain.flows.remove(shadow)
            chain.import_flow(flow)
        if o is not None:
            self._carried(o, flow)
        total = flow.packets[0] + flow.packets[1]
        self.backoff[flow.key] = 2 * total + 1
        log.info("return %s: %s (last seen %.3f s ago)", flow_text(flow.key), reason.label,
                 (now - flow.last_seen) / SECOND)
        r = self.stats.returned
        r[reason.label] = r.get(reason.label, 0) + 1

    # -- timers: reports, idle returns -------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic_ns()
        if now < self.next_report:
            return
        self.next_report = now + self.report_ns
        self.report(now)
        self.reports += 1
        self._take_snapshot()

    def refresh(self) -> None:
        """A report now (before `live status` and `live flows` answer)."""
        self.report(time.monotonic_ns())
        self.reports += 1
        self._take_snapshot()

    def report(self, now: int) -> None:
        """Refresh the shadows from the map; take back idle and expired flows."""
        for raw in self.dp.entries():
            f = Flow.from_bytes(raw)
            o = self.owned.get(f.key)
            if o is None:
                continue
            s = o.flow
            s.tcp, s.status = f.tcp, f.status
            s.packets, s.bytes = f.packets, f.bytes
            s.last_seen, s.expires = f.last_seen, f.expires
            if f.expires <= now:
                self.take_back(s, now, ReturnReason.EXPIRED)
            elif now - f.last_seen >= self.idle_ns:
                self.take_back(s, now, ReturnReason.IDLE)

    def _take_snapshot(self) -> None:
        """What status and metrics read (the metrics thread reads only this)."""
        traffic = {k: list(v) for k, v in self.stats.traffic.items()}
        for o in self.owned.values():
            f = o.flow
            for fdir in (0, 1):
                mdir = o.odir if fdir == 0 else 1 - o.odir
                row = traffic.setdefault((f.key.zone, mdir), [0, 0])
                row[0] += max(0, f.packets[fdir] - o.packets[fdir])
                row[1] += max(0, f.bytes[fdir] - o.nbytes[fdir])
        names = self.pipeline.names
        s = self.stats
        self.snapshot = {
            "mode": self.mode,
            "reports": self.reports,
            "entries": len(self.owned),
            "owned": {name: sum(1 for k in self.owned if k.zone == m)
                      for m, name in enumerate(names)},
            "capacity": self.capacity,
            "offloads": s.offloads,
            "refused": dict(s.refused),
            "returned": dict(s.returned),
            "held_handled": s.held_handled,
            "release_retries": s.release_retries,
            "late": s.late,
            "received": dict(s.received),
            "punts": {r.label: n for r, n in self.dp.punt_counts().items()},
            "forwarded": self.dp.forwarded(),
            "dropped": self.dp.dropped(),
            "punt_rx_drops": self.source.count_drops(),
            "traffic": [[names[m], DIRECTIONS[d], n, b] for (m, d), (n, b) in
                        sorted(traffic.items())],
        }

    # -- commands ----------------------------------------------------------------------------

    def select_flows(self, text: str, owner: Tier) -> Iterator[Flow]:
        """Flows owned by `owner` whose original tuple is `text` (every one for "")."""
        want = parse_flow_text(text) if text else None
        now = time.monotonic_ns()
        for chain in self.pipeline.chains:
            for flow in list(chain.flows):
                if flow.owner != owner or (owner == Tier.VNIC and flow.expires <= now):
                    continue
                k = flow.key
                if want is None or want == (k.proto, k.src, k.sport, k.dst, k.dport):
                    yield flow

    def offload_cmd(self, text: str) -> tuple[int, list[str]]:
        """`live offload`: (flows offloaded, why the others were not)."""
        done, notes = 0, []
        for flow in list(self.select_flows(text, Tier.VNIC)):
            if not established(flow):
                notes.append(f"{flow_text(flow.key)}: not established")
                continue
            why = self.offer(flow, 0 if self._is_egress(flow) else 1)
            if why:
                notes.append(f"{flow_text(flow.key)}: refused ({why})")
            else:
                done += 1
        return done, notes

    def _is_egress(self, flow: Flow) -> bool:
        cls = self.pipeline.classifier
        return bool(cls._inside(flow.key.family, flow.key.src) == flow.key.zone)

    def return_cmd(self, text: str) -> int:
        now = time.monotonic_ns()
        flows = list(self.select_flows(text, Tier.PNIC))
        for flow in flows:
            self.take_back(flow, now, ReturnReason.REQUESTED)
        self._take_snapshot()
        return len(flows)

    def withdraw(self) -> int:
        """Every entry comes back exact; then every packet goes to software (punt-all)."""
        self.dp.set_mode(Mode.PUNT_ALL)
        time.sleep(GRACE)  # packets already past the mode check finish their update
        now = time.monotonic_ns()
        flows = [o.flow for o in self.owned.values()]
        for flow in flows:
            self.take_back(flow, now, ReturnReason.WITHDRAW)
        self.healthy, self.mode = False, "withdrawn"
        self._take_snapshot()
        return len(flows)

    def crash(self) -> int:
        """The map is lost unread: the shadows resume from the last report, windows re-learned."""
        self.dp.set_mode(Mode.PUNT_ALL)
        self.dp.clear()
        now = time.monotonic_ns()
        owned, self.owned = self.owned, {}
        for o in owned.values():
            flow = o.flow
            resume(flow, now)
            flow.owner = Tier.VNIC
            self.pipeline.chains[flow.key.zone].flows.touch(flow)  # swept again
            self._carried(o, flow)
            r = self.stats.returned
            r[ReturnReason.CRASH.label] = r.get(ReturnReason.CRASH.label, 0) + 1
        self.healthy, self.mode = False, "crashed"
        self._take_snapshot()
        return len(owned)

    def restore(self) -> None:
        self.dp.set_mode(Mode.FAST)
        self.healthy, self.mode = True, "fast"
        self.backoff.clear()
        self._take_snapshot()


def snapshot_reader(vnic: PnicVnic | None) -> Callable[[], dict[str, object]]:
    return (lambda: vnic.snapshot) if vnic is not None else dict
