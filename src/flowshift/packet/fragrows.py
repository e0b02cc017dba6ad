"""Which rows of a batch hold an IP fragment, without parsing each (numpy over the buffer).

A batch meets the PNIC first and software after; a fragment is software's (reassembly), and
the datagram it completes changes its flow's entry, so a batch is cut at its fragments: the
PNIC decides no row after a fragment before software has had the fragment. Ethernet (one
802.1Q tag) and raw IP are read here; other link types are parsed row by row.
"""

from __future__ import annotations

import numpy as np

from flowshift.packet.parse import parse
from flowshift.packet.view import LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_RAW

_ETH_IPV4, _ETH_IPV6, _ETH_VLAN = 0x0800, 0x86DD, 0x8100
_NH_FRAGMENT = 44
_RAW = (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6)


def fragment_rows(buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray,
                  linktype: np.ndarray, wire_len: np.ndarray) -> np.ndarray:
    """Sorted indices of the rows that hold an IPv4 fragment (MF or an offset) or an IPv6
    fragment header right after the fixed header."""
    n = len(offset)
    if n == 0:
        return np.zeros(0, np.int64)
    top = len(buf) - 1

    def at(pos: np.ndarray) -> np.ndarray:
        byte: np.ndarray = buf[np.minimum(pos, top)].astype(np.int64)
        return byte

    off = offset.astype(np.int64)
    cap = caplen.astype(np.int64)
    eth = linktype == LINKTYPE_ETHERNET
    ethertype = at(off + 12) << 8 | at(off + 13)
    vlan = eth & (ethertype == _ETH_VLAN)
    ethertype = np.where(vlan, at(off + 16) << 8 | at(off + 17), ethertype)
    l3 = off + np.where(vlan, 18, 14)
    raw = np.isin(linktype, _RAW)
    l3 = np.where(raw, off, l3)
    version = at(l3) >> 4
    v4 = np.where(raw, version == 4, eth & (ethertype == _ETH_IPV4))
    v6 = np.where(raw, version == 6, eth & (ethertype == _ETH_IPV6))
    room = cap - (l3 - off)
    frag4 = v4 & (room >= 20) & (((at(l3 + 6) & 0x3F) << 8 | at(l3 + 7)) != 0)
    frag6 = v6 & (room >= 48) & (at(l3 + 6) == _NH_FRAGMENT)
    out = set(np.flatnonzero(frag4 | frag6).tolist())
    for i in np.flatnonzero(~(eth | raw)).tolist():  # other link types: parsed
        start = int(offset[i])
        pkt = parse(bytearray(buf[start:start + int(caplen[i])].tobytes()), int(linktype[i]),
                    int(wire_len[i]))
        if pkt.frag:
            out.add(i)
    return np.array(sorted(out), np.int64)
