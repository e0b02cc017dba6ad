"""A guest's Linux conntrack entries as flowshift flow entries: the conversion of the handoff.

`CtEntry` is what ctnetlink's dump (IPCTNL_MSG_CT_GET) gives of one conntrack, reduced to what a
flow entry can hold; `from_nfct` reads it from a pyroute2 `nfct_msg`; `to_flow` makes the flow
entry the VNIC imports. What is carried and what is re-learned (docs/nftables.md):

- carried: both tuples (the NAT/LB rewrite is the reply tuple reversed), the status bits
  SEEN_REPLY and ASSURED (NAT when the tuples differ), the TCP state, each direction's window
  scale and its flags (window scaling, SACK permitted, who closed first), the seconds left,
  the packet and byte counters (with nf_conntrack_acct = 1), the LB backend (by the rewrite's
  destination);
- re-learned: the TCP window-tracking variables (td_end, td_maxend, td_maxwin, td_maxack), which
  ctnetlink's dump does not carry: both directions are picked up liberally, as Linux does for a
  connection it meets mid-stream (`conntrack_tcp.relearn`);
- not known to Linux's entry: the firewall rule that admitted the flow (-1), its creation time
  and last packet (the handoff time), the UDP stream timer (the handoff time).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from flowshift.entry import Flow, Status, Tier
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, FlowKey
from flowshift.services import conntrack_tcp as ct_tcp

SECOND = 1_000_000_000
# Linux enum ip_conntrack_status bits (include/uapi/linux/netfilter/nf_conntrack_common.h)
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
# the TCP flag bits flowshift keeps from Linux (IP_CT_TCP_FLAG_*, the same values)
TCP_FLAGS_KEPT = (ct_tcp.TCP_FLAG_WINDOW_SCALE | ct_tcp.TCP_FLAG_SACK_PERM
                  | ct_tcp.TCP_FLAG_CLOSE_INIT)

Tuple = tuple[str, str, int, int]  # src, dst, sport, dport (ICMP echo: id, id)


@dataclass(frozen=True)
class CtEntry:
    """One Linux conntrack as ctnetlink dumps it."""

    family: int  # 4 or 6
    proto: int
    original: Tuple
    reply: Tuple
    status: int  # IPS_* bits
    timeout_s: int  # seconds left
    tcp_state: int = 0  # enum tcp_conntrack (flowshift's TcpState has the same values)
    wscale: tuple[int, int] = (0, 0)  # per direction
    tcp_flags: tuple[int, int] = (0, 0)  # IP_CT_TCP_FLAG_* per direction
    packets: tuple[int, int] = (0, 0)  # original, reply (nf_conntrack_acct)
    bytes: tuple[int, int] = (0, 0)  # bytes of IP packets, as flowshift counts


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _key(family: int, proto: int, zone: int, t: Tuple) -> FlowKey:
    return FlowKey(family, proto, zone, _addr(t[0]), _addr(t[1]), t[2], t[3])


def to_flow(ct: CtEntry, machine: int, chain: int, now: int,
            backends: dict[tuple[bytes, int], int] | None = None) -> Flow:
    """The flow entry of one conntrack of machine `machine` (its zone), owned by the VNIC.

    `backends` maps an LB backend's (address, port) to its index, to name the flow's backend."""
    key = _key(ct.family, ct.proto, machine, ct.original)
    xlat = _key(ct.family, ct.proto, machine, ct.reply).reversed()
    status = 0
    if ct.status & IPS_SEEN_REPLY:
        status |= Status.SEEN_REPLY
    if ct.status & IPS_ASSURED:
        status |= Status.ASSURED
    if key != xlat:
        status |= Status.NAT
    tcp = None
    if ct.proto == PROTO_TCP:
        tcp = ct_tcp.TcpConn(state=ct.tcp_state, seen_reply=bool(ct.status & IPS_SEEN_REPLY))
        for d in (0, 1):
            tcp.seen[d].scale = min(ct.wscale[d], ct_tcp.TCP_MAX_WSCALE)
            tcp.seen[d].flags = ct.tcp_flags[d] & TCP_FLAGS_KEPT
        ct_tcp.relearn(tcp)  # windows: picked up liberally, as Linux after a loose pickup
    backend = -1
    if backends and key.dst != xlat.dst:
        backend = backends.get((xlat.dst, xlat.dport), -1)
    return Flow(key=key, xlat=xlat, machine=machine, chain=chain, tcp=tcp, status=int(status),
                backend=backend, created=now, last_seen=now,
                expires=now + ct.timeout_s * SECOND, stream_ts=now,
                packets=list(ct.packets), bytes=list(ct.bytes), owner=Tier.VNIC)


# -- ctnetlink messages ------------------------------------------------------------------------


def _attrs(nla: Any) -> dict[str, Any]:
    """A netlink message's or nested attribute's attributes by name, decoded once (pyroute2's
    get_attr decodes again on every call: five times slower over a dump)."""
    return dict(nla["attrs"]) if nla is not None else {}


def _tuple(nla: Any, family: int, proto: int) -> Tuple:
    t = _attrs(nla)
    ip, p = _attrs(t.get("CTA_TUPLE_IP")), _attrs(t.get("CTA_TUPLE_PROTO"))
    v = "V4" if family == 4 else "V6"
    src, dst = str(ip[f"CTA_IP_{v}_SRC"]), str(ip[f"CTA_IP_{v}_DST"])
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        ident = int(p.get("CTA_PROTO_ICMP_ID" if proto == PROTO_ICMP else "CTA_PROTO_ICMPV6_ID")
                    or 0)
        return src, dst, ident, ident
    return src, dst, int(p.get("CTA_PROTO_SRC_PORT") or 0), int(p.get("CTA_PROTO_DST_PORT") or 0)


def _counters(nla: Any) -> tuple[int, int]:
    c = _attrs(nla)
    return int(c.get("CTA_COUNTERS_PACKETS") or 0), int(c.get("CTA_COUNTERS_BYTES") or 0)


def from_nfct(msg: Any) -> CtEntry | None:
    """A CtEntry of one pyroute2 nfct_msg; None for what a flow entry cannot hold (other
    protocols than TCP, UDP and ICMP echo)."""
    family = 4 if msg["nfgen_family"] == socket.AF_INET else 6
    a = _attrs(msg)
    orig = a["CTA_TUPLE_ORIG"]
    proto = int(_attrs(_attrs(orig).get("CTA_TUPLE_PROTO")).get("CTA_PROTO_NUM") or 0)
    if proto not in (PROTO_TCP, 17, PROTO_ICMP, PROTO_ICMPV6):
        return None
    state, wscale, flags = 0, (0, 0), (0, 0)
    tcp = _attrs(_attrs(a.get("CTA_PROTOINFO")).get("CTA_PROTOINFO_TCP"))
    if tcp:
        state = int(tcp.get("CTA_PROTOINFO_TCP_STATE") or 0)
        wscale = (int(tcp.get("CTA_PROTOINFO_TCP_WSCALE_ORIGINAL") or 0),
                  int(tcp.get("CTA_PROTOINFO_TCP_WSCALE_REPLY") or 0))
        fo = tcp.get("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL")
        fr = tcp.get("CTA_PROTOINFO_TCP_FLAGS_REPLY")
        flags = (int(fo[0]) if fo else 0, int(fr[0]) if fr else 0)
    po, bo = _counters(a.get("CTA_COUNTERS_ORIG"))
    pr, br = _counters(a.get("CTA_COUNTERS_REPLY"))
    return CtEntry(family, proto, _tuple(orig, family, proto),
                   _tuple(a["CTA_TUPLE_REPLY"], family, proto),
                   int(a.get("CTA_STATUS") or 0), int(a.get("CTA_TIMEOUT") or 0),
                   state, wscale, flags, (po, pr), (bo, br))


__all__ = ["CtEntry", "from_nfct", "to_flow"]
