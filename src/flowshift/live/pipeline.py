"""The live VNIC's per-frame path: parse, classify, run the machine's chain, address the frame.

No sockets here: a frame comes in with the port it arrived on, and leaves (rewritten in place)
with the port to send it out of, or is dropped and counted. A machine with `start = "vnic"` has
its chain run here (tier `vnic`) from the first packet. A machine with `start = "machine"` runs
its chain in Linux in its own namespace (live/guest.py): until its handoff, the VNIC passes its
frames untouched (tier `machine`); `take_over` makes the VNIC the owner with the guest's flows.

Steering, as the replay host's classifier: a frame whose source is inside a machine's networks
is that machine's egress and leaves by the uplink towards the wire; one whose destination is a
machine's public or inside address is its ingress and leaves by its port. A frame that arrives
on another port than its direction implies (a machine sending with another machine's source, the
wire sending with a machine's source) is dropped as `wrong-port`: the VNIC is the machine's
only way out, so it is where spoofing stops. Frames of no machine (IPv6 multicast listener
reports and the like) and unparsed frames are dropped and counted: the host forwards nothing
on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowshift.live.engine import EGRESS, Chain, Classifier, Flow, HostConfig, Tier, parse
from flowshift.packet.view import LINKTYPE_ETHERNET, Packet, ParseError
from flowshift.results import PARSE_BASE, reason_label
from flowshift.verdict import Reason, Verdict

DIRECTIONS = ("egress", "ingress")
WRONG_PORT = "wrong-port"  # a steering drop of the live host, not a chain reason
ENGINE_ERROR = "error"  # the pipeline raised on a frame: dropped, logged
UNKNOWN_PORT = -1  # a source that cannot tell the arrival port (the PNIC's punt device)
_OK, _UNSUP = ParseError.OK, ParseError.UNSUPPORTED_PROTOCOL
_BYPASS_PARSE = (ParseError.NOT_IP, ParseError.UNKNOWN_ETHERTYPE)
# per-frame constants as plain ints: enum attribute lookups cost more than the dict update
_FORWARD, _DROP = int(Verdict.FORWARD), int(Verdict.DROP)
_BYPASS, _UNPARSED = int(Verdict.BYPASS), int(Verdict.UNPARSED)
_NO_MACHINE = int(Reason.NO_MACHINE)
_VNIC, _MACHINE = int(Tier.VNIC), int(Tier.MACHINE)
# After a handoff, frames the guest translated before its ruleset went may still be queued
# for the daemon: for this long they are recognised (by their reply-direction tuple) and passed
DRAIN_NS = 2_000_000_000


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass(frozen=True)
class Wiring:
    """The ports as the pipeline sees them: index i < machines is machine i's port, the last
    one is the uplink. MACs: each port's own, and its far end's."""

    port_macs: tuple[bytes, ...]
    peer_macs: tuple[bytes, ...]

    @property
    def uplink(self) -> int:
        return len(self.port_macs) - 1


# live-only reason codes of steering drops, beside the chain's Reason and PARSE_BASE + parse
# error codes (negative: they never collide)
_WRONG_PORT, _ENGINE_ERROR = -1, -2
_LIVE_REASONS = {_WRONG_PORT: WRONG_PORT, _ENGINE_ERROR: ENGINE_ERROR}


@dataclass
class Counters:
    """Plain counters keyed by numbers (cheap per frame); labelled when read, by `live status`
    and the Prometheus collector. Machine -1 and direction -1: the frame was no machine's."""

    names: list[str]
    # (tier, machine, direction) -> [packets, bytes] of the frames a chain processed
    raw_traffic: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)
    # (machine, direction, verdict, reason code, rule) -> frames
    raw_verdicts: dict[tuple[int, int, int, int, int], int] = field(default_factory=dict)
    flows_created: dict[str, int] = field(default_factory=dict)

    def _name(self, m: int) -> str:
        return self.names[m] if m >= 0 else ""

    def traffic(self) -> dict[tuple[str, str, str], list[int]]:
        """(tier, machine, direction) -> [packets, bytes]."""
        return {(Tier(t).name.lower(), self._name(m), DIRECTIONS[d]): list(row)
                for (t, m, d), row in self.raw_traffic.copy().items()}

    def verdicts(self) -> dict[tuple[str, str, str, str], int]:
        """(machine, direction, verdict, reason) -> frames; "" for no machine."""
        out: dict[tuple[str, str, str, str], int] = {}
        for (m, d, v, code, rule), n in self.raw_verdicts.copy().items():
            reason = _LIVE_REASONS.get(code) or reason_label(code, rule)
            key = (self._name(m), DIRECTIONS[d] if d >= 0 else "", Verdict(v).label, reason)
            out[key] = out.get(key, 0) + n
        return out


class Pipeline:
    def __init__(self, config: HostConfig, wiring: Wiring) -> None:
        self.names = [m.name for m in config.machines]
        self.chains = [Chain(m, i, Tier.VNIC) for i, m in enumerate(config.machines)]
        # machines whose chain runs in their own namespace (Linux): their frames pass untouched
        self.machine_tier = [m.start == "machine" for m in config.machines]
        self.drain_until = [0] * len(config.machines)  # ns: end of each handoff's drain
        self.classifier = Classifier(config.machines)
        self.wiring = wiring
        self.counters = Counters(self.names)
        # Ethernet header (dst, src) per output port: egress goes to the wire's eth0, ingress
        # to the machine's
        self._eth = [peer + own for own, peer in zip(wiring.port_macs, wiring.peer_macs,
                                                     strict=True)]

    def frame(self, port: int, data: bytearray, now: int) -> int:
        """Decide one frame that arrived on `port` (UNKNOWN_PORT: any). Returns the port to
        send `data` (rewritten in place) out of, or -1 when it is dropped."""
        pkt = parse(data, LINKTYPE_ETHERNET, len(data))
        err = pkt.error
        if err != _OK and err != _UNSUP:
            verdict = _BYPASS if err in _BYPASS_PARSE else _UNPARSED
            self._count(-1, -1, verdict, PARSE_BASE + err, -1)
            return -1
        uplink = self.wiring.uplink
        m, direction = self.classifier.classify(pkt)
        came = port
        if port == UNKNOWN_PORT:
            # the PNIC's punts do not say where they came in: a frame with a machine's own or
            # public source came from that machine's port (steering is by address alone)
            came = m if m >= 0 and direction == EGRESS else self.classifier.public.get(
                pkt.src, UNKNOWN_PORT)
        if 0 <= came < uplink:
            if self.machine_tier[came]:
                # the guest judged it: pass it if its source is the machine's (inside, or a
                # public address the guest translated to); the rest is dropped as below
                if (m == came and direction == EGRESS) or self.classifier.public.get(
                        pkt.src, -1) == came:
                    return self._pass(came, EGRESS, data, uplink)
            elif now < self.drain_until[came] and self._judged_by_guest(came, pkt):
                return self._pass(came, EGRESS, data, uplink)
        if m < 0:
            self._count(-1, -1, _BYPASS, _NO_MACHINE, -1)
            return -1
        if self.machine_tier[m] and port in (uplink, UNKNOWN_PORT) and direction != EGRESS:
            return self._pass(m, direction, data, m)
        if port != UNKNOWN_PORT and port != (m if direction == EGRESS else uplink):
            self._count(m, direction, _DROP, _WRONG_PORT, -1)
            return -1
        outcome = self.chains[m].process(pkt, direction, now)
        c = self.counters
        key = (_VNIC, m, direction)
        row = c.raw_traffic.get(key)
        if row is None:
            row = c.raw_traffic[key] = [0, 0]
        row[0] += 1
        row[1] += len(data)
        if outcome.created:
            name = self.names[m]
            c.flows_created[name] = c.flows_created.get(name, 0) + 1
        verdict = outcome.verdict
        self._count(m, direction, verdict, outcome.reason, outcome.rule)
        if verdict != _FORWARD:
            return -1
        out = uplink if direction == EGRESS else m
        data[0:12] = self._eth[out]
        return out

    def _pass(self, m: int, direction: int, data: bytearray, out: int) -> int:
        """A frame of a flow the guest owns: forwarded untouched, counted as tier machine."""
        key = (_MACHINE, m, direction)
        row = self.counters.raw_traffic.get(key)
        if row is None:
            row = self.counters.raw_traffic[key] = [0, 0]
        row[0] += 1
        row[1] += len(data)
        data[0:12] = self._eth[out]
        return out

    def _judged_by_guest(self, m: int, pkt: Packet) -> bool:
        """An egress frame the guest translated before its ruleset went: its own tuple is no
        flow's, its reverse is a translated flow's reply tuple."""
        key = pkt.key(m)
        flows = self.chains[m].flows
        if flows.get(key) is not None:
            return False
        hit = flows.get(key.reversed())
        return hit is not None and hit[1] == 1 and hit[0].key != hit[0].xlat

    def take_over(self, m: int, chain: Chain, flows: list[Flow], lb_state: list[int],
                  now: int) -> None:
        """The handoff's VNIC side: machine m's chain (built from the config that crossed the
        channel) owns its flows from now on."""
        if chain.lb is not None:
            chain.lb.restore(lb_state)
        for flow in flows:
            chain.import_flow(flow)
        self.chains[m] = chain
        self.machine_tier[m] = False
        self.drain_until[m] = now + DRAIN_NS

    def tier(self, m: int) -> str:
        return "machine" if self.machine_tier[m] else "vnic"

    def _count(self, m: int, direction: int, verdict: int, reason: int, rule: int) -> None:
        key = (m, direction, verdict, reason, rule)
        v = self.counters.raw_verdicts
        v[key] = v.get(key, 0) + 1

    def count_error(self) -> None:
        """A frame the pipeline failed on (a bug, logged by the daemon): dropped."""
        self._count(-1, -1, _DROP, _ENGINE_ERROR, -1)

    def sweep(self, now: int) -> int:
        """Free expired flows; how many."""
        return sum(len(chain.flows.sweep(now, keep=Tier.PNIC)) for chain in self.chains)

    def first_cache(self) -> int:
        """Flow entries the VNIC holds (expired ones until the next sweep)."""
        return sum(len(chain.flows) for chain in self.chains)
