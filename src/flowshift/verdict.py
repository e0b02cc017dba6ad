"""One verdict and one reason vocabulary for every tier and engine.

Numbered and never renumbered: the PNIC engine stores these codes in arrays, reports carry
their names. Retire a reason by leaving its number unused.
"""

from __future__ import annotations

from enum import IntEnum


class Verdict(IntEnum):
    FORWARD = 0  # processed by the chain and sent on (possibly rewritten)
    DROP = 1  # processed by the chain and dropped, with a reason
    BYPASS = 2  # not for any machine, or not IP: passed on unchanged
    UNPARSED = 3  # headers could not be parsed: dropped, counted by parse reason

    @property
    def label(self) -> str:
        return self.name.lower()


class Reason(IntEnum):
    NONE = 0
    RULE = 1  # a firewall rule decided (its index goes beside the reason)
    DEFAULT = 2  # the firewall default decided
    ESTABLISHED = 3  # packet of a tracked flow
    RELATED = 4  # ICMP error about a tracked flow
    INVALID = 5  # conntrack found the packet invalid (flags, window)
    NAT_EXHAUSTED = 6  # no free NAT tuple for a new flow
    NO_BACKEND = 7  # LB VIP with no usable backend
    BAD_CHECKSUM = 8  # fully captured packet with a wrong L3/L4 checksum
    NOT_NEW = 9  # a packet that cannot start a flow and matches none
    NO_MACHINE = 10  # bypass: no machine owns either address
    NOT_IP = 11  # bypass: not an IP packet
    FRAGMENT = 12  # non-first IP fragment: passed untracked
    MALFORMED = 13  # unparsed: see the parse reason
    TABLE_FULL = 14  # the conntrack table is at its `max` and no entry could be early-dropped
    TTL_EXCEEDED = 15  # a routing machine got a packet with TTL / hop limit 1 or 0
    # IP fragments dropped by reassembly (packet/defrag.py, as nf_defrag): the fragment, or
    # every held fragment of its datagram
    FRAG_DUPLICATE = 16  # lies within fragments already held: this fragment only
    FRAG_OVERLAP = 17  # overlaps held fragments: the whole datagram
    FRAG_EXPIRED = 18  # datagram incomplete when its time was up (or at the end of input)
    FRAG_TOO_BIG = 19  # datagram over 65535 bytes
    FRAG_MEMORY = 20  # fragment memory over its bound: this fragment only
    FRAG_INVALID = 21  # bad fragment geometry or an ECN mix

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


def reason_text(reason: Reason, rule: int = -1) -> str:
    """The reason as printed in reports and verdict files: `rule:3`, `default`, `invalid`..."""
    if reason is Reason.RULE:
        return f"rule:{rule}"
    return reason.label


class RefuseReason(IntEnum):
    """Why an offload to the PNIC did not happen (the flow stays where it was)."""

    UNHEALTHY = 1  # the PNIC is withdrawn, crashed or failing
    UNSUPPORTED_SERVICE = 2  # the flow's chain has a service the PNIC does not run
    FULL = 3  # the second cache has no room
    DUPLICATE = 4  # the PNIC already holds an entry with this key
    BAD_ENTRY = 5  # the entry did not decode or failed its checks

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class ReturnReason(IntEnum):
    """Why a flow came back up from the PNIC."""

    CLOSED = 1  # a FIN or RST: the connection's end runs in software
    IDLE = 2  # no packet for the offload idle timeout
    EXPIRED = 3  # its conntrack timeout passed
    ROOM = 4  # the VNIC took it back to make room for another flow
    WITHDRAW = 5  # graceful PNIC withdrawal: the exact entry came back
    CRASH = 6  # the PNIC died: resumed from the last report
    UNSUPPORTED = 7  # a packet of a shape the PNIC does not run
    REQUESTED = 8  # an operator asked for it (`flowshift live return`)

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class PuntReason(IntEnum):
    """Why the PNIC data path handed a packet to software instead of processing it."""

    MISS = 1  # no entry in the second cache
    LIFE = 2  # SYN, FIN or RST: the connection's life changes in software
    EXPIRED = 3  # the entry's conntrack timeout passed
    UNSUPPORTED = 4  # a header shape or protocol the fast path does not run
    HELD = 5  # the flow is in transit between tiers: software keeps arrival order

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")
