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
from flowshift.tiers._pnic_mem import cached, prefetch

_ETH_IPV4, _ETH_IPV6, _ETH_VLAN = 0x0800, 0x86DD, 0x8100
_NH_FRAGMENT = 44
_AHEAD = 8  # frames ahead whose headers are asked for (a hint: never faults)
_RAW = (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6)


# what _flags says of a row
_WHOLE, _FRAGMENT, _PARSE = 0, 1, 2


@cached(nogil=True)
def _flags(buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray, linktype: np.ndarray,
           out: np.ndarray) -> None:
    """out[i]: _FRAGMENT for an IPv4 fragment (MF or an offset) or an IPv6 fragment header
    right after the fixed header, _PARSE for a link type read by the parser, else _WHOLE. A
    byte past the buffer reads as its last byte (then the row is too short to count)."""
    top = len(buf) - 1
    n = len(offset)
    for i in range(n):
        if i + _AHEAD < n:  # a later frame's headers, beyond the hardware prefetcher's reach
            prefetch(buf, offset[i + _AHEAD])  # type: ignore[call-arg]
        lt = linktype[i]
        off = int(offset[i])
        if lt == LINKTYPE_ETHERNET:
            ethertype = np.int64(buf[min(off + 12, top)]) << 8 | buf[min(off + 13, top)]
            l3 = off + 14
            if ethertype == _ETH_VLAN:
                ethertype = np.int64(buf[min(off + 16, top)]) << 8 | buf[min(off + 17, top)]
                l3 = off + 18
            v4 = ethertype == _ETH_IPV4
            v6 = ethertype == _ETH_IPV6
        elif lt in _RAW:
            l3 = off
            version = buf[min(l3, top)] >> 4
            v4 = version == 4
            v6 = version == 6
        else:
            out[i] = _PARSE
            continue
        room = np.int64(caplen[i]) - (l3 - off)
        if v4 and room >= 20:
            frag = ((np.int64(buf[min(l3 + 6, top)]) & 0x3F) << 8 | buf[min(l3 + 7, top)]) != 0
        elif v6 and room >= 48:
            frag = buf[min(l3 + 6, top)] == _NH_FRAGMENT
        else:
            frag = False
        out[i] = _FRAGMENT if frag else _WHOLE


def fragment_rows(buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray,
                  linktype: np.ndarray, wire_len: np.ndarray) -> np.ndarray:
    """Sorted indices of the rows that hold an IPv4 fragment (MF or an offset) or an IPv6
    fragment header right after the fixed header."""
    if len(offset) == 0 or len(buf) == 0:
        return np.zeros(0, np.int64)
    flags = np.empty(len(offset), np.int8)
    _flags(buf, offset, caplen, linktype, flags)
    out = set(np.flatnonzero(flags == _FRAGMENT).tolist())
    for i in np.flatnonzero(flags == _PARSE).tolist():  # other link types: parsed
        start = int(offset[i])
        pkt = parse(bytearray(buf[start:start + int(caplen[i])].tobytes()), int(linktype[i]),
                    int(wire_len[i]))
        if pkt.frag:
            out.add(i)
    return np.array(sorted(out), np.int64)
