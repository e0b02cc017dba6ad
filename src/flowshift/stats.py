"""What a host counts while it runs, and the flow views a dump is made of."""

from __future__ import annotations

from dataclasses import dataclass, field

from flowshift.entry import Flow
from flowshift.flow import FlowKey
from flowshift.results import TIER_LABELS as TIER_NAMES

# (trace time, kind, what): what is a text, or the key of the flow it happened to (formatted
# only when read: an offload or return is counted many times more often than it is shown)
Event = tuple[int, str, str | FlowKey]

# the kinds of event, in the order they are listed when they happen at one trace time (a
# handoff before the offloads it allows, the PNIC going away before the returns it causes),
# then by what they happened to: engines that interleave their steps differently (the PNIC
# running a flow's rows ahead of software, or in turn with it) list the same events alike
EVENT_KINDS = ("handoff", "withdraw", "crash", "offload", "refuse", "return")
_RANK = {kind: i for i, kind in enumerate(EVENT_KINDS)}


def event_order(event: Event) -> tuple[int, int, str | FlowKey]:
    """The sort key of an event (EVENT_KINDS)."""
    t, kind, what = event
    return t, _RANK.get(kind, len(_RANK)), what


@dataclass(slots=True)
class FlowView:
    flow: Flow
    machine: str
    tier: str


@dataclass
class HostStats:
    tier_packets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIER_NAMES, 0))
    tier_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIER_NAMES, 0))
    offloads_to_vnic: int = 0
    offloads_to_pnic: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    returned: dict[str, int] = field(default_factory=dict)
    flows_total: int = 0
    peak_first_cache: int = 0
    peak_second_cache: int = 0
    held_packets: int = 0
    rejected_messages: dict[str, int] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    occupancy: list[tuple[int, int]] = field(default_factory=list)  # (trace time, PNIC entries)

    def count(self, table: dict[str, int], label: str) -> None:
        table[label] = table.get(label, 0) + 1


__all__ = ["EVENT_KINDS", "TIER_NAMES", "Event", "FlowView", "HostStats", "event_order"]
