"""fragment_rows (packet/fragrows.py) finds every row the parser calls a fragment, for Ethernet
with and without an 802.1Q tag, raw IP, and link types it leaves to the parser; any other row
it names is one the parser rejects (a fragment captured short): cutting the batch there costs
a segment, missing a fragment would let the PNIC run past it."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.packet.build import udp_frame
from flowshift.packet.defrag import split
from flowshift.packet.fragrows import fragment_rows
from flowshift.packet.parse import parse
from flowshift.packet.view import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_RAW,
    ParseError,
)

V4 = (bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
V6 = (bytes(15) + b"\x01", bytes(15) + b"\x02")


def rows_of(draw: st.DrawFn) -> tuple[bytes, int]:
    """One frame and its link type: whole or a fragment, v4 or v6, tagged or raw or SLL."""
    src, dst = draw(st.sampled_from([V4, V6]))
    vlan = draw(st.sampled_from([None, 7]))
    frame = udp_frame(src=src, dst=dst, sport=1, dport=2, payload=bytes(64), vlan=vlan,
                      df=False)
    l3 = 18 if vlan is not None else 14
    if draw(st.booleans()):  # a fragment of it
        pieces = split(frame[l3:], [(0, 40), (40, 32)], ident=5)
        frame = frame[:l3] + pieces[draw(st.integers(0, 1))]
    cut = draw(st.integers(l3 + 1, len(frame)))
    if draw(st.integers(0, 4)) == 0:
        frame = frame[:cut]  # captured short
    kind = draw(st.sampled_from([LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL]))
    if kind == LINKTYPE_RAW:
        return frame[l3:], kind
    if kind == LINKTYPE_LINUX_SLL:  # cooked header: 16 bytes, protocol in the last two
        return bytes(14) + frame[l3 - 2:l3] + frame[l3:], kind
    return frame, kind


@settings(max_examples=200, deadline=None)
@given(st.lists(st.composite(rows_of)(), min_size=1, max_size=12))
def test_fragment_rows_agree_with_the_parser(rows: list[tuple[bytes, int]]) -> None:
    frames = [f for f, _ in rows]
    caplen = np.array([len(f) for f in frames], np.uint32)
    offset = np.zeros(len(frames), np.int64)
    np.cumsum(caplen[:-1], out=offset[1:])
    buf = np.frombuffer(b"".join(frames), np.uint8).copy()
    linktype = np.array([k for _, k in rows], np.uint16)
    parsed = [parse(bytearray(f), k, len(f)) for f, k in rows]
    want = {i for i, p in enumerate(parsed) if p.frag}
    got = fragment_rows(buf, offset, caplen, linktype, caplen).tolist()
    assert got == sorted(got) and want <= set(got)
    assert all(parsed[i].error != ParseError.OK for i in set(got) - want)
