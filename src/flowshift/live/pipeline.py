"""The live VNIC's per-frame path: parse, classify, run the machine's chain, address the frame.

No sockets here: a frame comes in with the port it arrived on, and leaves (rewritten in place)
with the port to send it out of, or is dropped and counted. Every machine's chain runs in the
VNIC (tier `vnic`) from the first packet: the live host has no machine tier yet.

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

from flowshift.live.engine import EGRESS, Chain, Classifier, HostConfig, Tier, parse
from flowshift.packet.view import LINKTYPE_ETHERNET, ParseError
from flowshift.results import PARSE_BASE, reason_label
from flowshift.verdict import Reason, Verdict

DIRECTIONS = ("egress", "ingress")
WRONG_PORT = "wrong-port"  # a steering drop of the live host, not a chain reason
ENGINE_ERROR = "error"  # the pipeline raised on a frame: dropped, logged
UNKNOWN_PORT = -1  # a source that cannot tell the arrival port (the PNIC's punt device)
_OK, _UNSUP = ParseError.OK, ParseError.UNSUPPORTED_PROTOCOL
_FORWARD = Verdict.FORWARD
_VNIC = "vnic"


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


@dataclass
class Counters:
    """Plain counters, read by `live status` and the Prometheus collector."""

    # (tier, machine, direction) -> [packets, bytes], frames the chain processed
    traffic: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    # (machine, direction, verdict, reason) -> packets; machine "" when none was found
    verdicts: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    flows_created: dict[str, int] = field(default_factory=dict)


class Pipeline:
    def __init__(self, config: HostConfig, wiring: Wiring) -> None:
        self.names = [m.name for m in config.machines]
        self.chains = [Chain(m, i, Tier.VNIC) for i, m in enumerate(config.machines)]
        self.classifier = Classifier(config.machines)
        self.wiring = wiring
        self.counters = Counters()
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
            verdict = Verdict.BYPASS if err in (ParseError.NOT_IP,
                                                ParseError.UNKNOWN_ETHERTYPE) else Verdict.UNPARSED
            self._count("", "", verdict.label, reason_label(PARSE_BASE + err))
            return -1
        m, direction = self.classifier.classify(pkt)
        if m < 0:
            self._count("", "", Verdict.BYPASS.label, Reason.NO_MACHINE.label)
            return -1
        name = self.names[m]
        dname = DIRECTIONS[direction]
        out = self.wiring.uplink if direction == EGRESS else m
        if port != UNKNOWN_PORT and port != (m if direction == EGRESS else self.wiring.uplink):
            self._count(name, dname, Verdict.DROP.label, WRONG_PORT)
            return -1
        outcome = self.chains[m].process(pkt, direction, now)
        key = (_VNIC, name, dname)
        row = self.counters.traffic.get(key)
        if row is None:
            row = self.counters.traffic[key] = [0, 0]
        row[0] += 1
        row[1] += len(data)
        if outcome.created:
            self.counters.flows_created[name] = self.counters.flows_created.get(name, 0) + 1
        self._count(name, dname, outcome.verdict.label,
                    reason_label(outcome.reason, outcome.rule))
        if outcome.verdict != _FORWARD:
            return -1
        data[0:12] = self._eth[out]
        return out

    def _count(self, machine: str, direction: str, verdict: str, reason: str) -> None:
        key = (machine, direction, verdict, reason)
        v = self.counters.verdicts
        v[key] = v.get(key, 0) + 1

    def count_error(self) -> None:
        """A frame the pipeline failed on (a bug, logged by the daemon): dropped."""
        self._count("", "", Verdict.DROP.label, ENGINE_ERROR)

    def sweep(self, now: int) -> int:
        """Free expired flows; how many."""
        return sum(len(chain.flows.sweep(now)) for chain in self.chains)

    def first_cache(self) -> int:
        """Flow entries the VNIC holds (expired ones until the next sweep)."""
        return sum(len(chain.flows) for chain in self.chains)
