"""The rows another PNIC pass sees after flows move down mid-segment (tiers/repass.py): a
row's mark, computed by the PNIC's parser, is its flow's, in both directions and through NAT;
a pick finds exactly the undecided rows of the flows that moved, after the position."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.entry import Flow
from flowshift.flow import PROTO_ICMP, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.packet.build import icmp_echo_frame, tcp_frame, udp_frame
from flowshift.packet.parse import parse
from flowshift.packet.view import TCP_ACK
from flowshift.results import PENDING, BatchResults
from flowshift.tiers._pnic_index import address_words, key_words
from flowshift.tiers.repass import Repass, key_mark

v4 = st.binary(min_size=4, max_size=4)
v6 = st.binary(min_size=16, max_size=16)
port = st.integers(1, 65535)


def frame(proto: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    if proto == PROTO_TCP:
        return tcp_frame(src=src, dst=dst, sport=sport, dport=dport, seq=1, ack=1,
                         flags=TCP_ACK, window=100)
    if proto == PROTO_UDP:
        return udp_frame(src=src, dst=dst, sport=sport, dport=dport, payload=b"x")
    return icmp_echo_frame(src=src, dst=dst, ident=sport, seq=1)


def batch(frames: list[bytes]) -> BatchResults:
    sizes = np.array([len(f) for f in frames], np.uint32)
    offset = np.zeros(len(frames), np.int64)
    np.cumsum(sizes[:-1], out=offset[1:])
    buf = np.frombuffer(b"".join(frames), np.uint8).copy()
    n = len(frames)
    return BatchResults.over(0, buf, offset, sizes, sizes.copy(), np.ones(n, np.uint16),
                             np.arange(n, dtype=np.int64))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP]), st.one_of(
    st.tuples(v4, v4), st.tuples(v6, v6)), port, port)
def test_a_row_carries_its_flows_mark_both_ways(proto: int, addrs: tuple[bytes, bytes],
                                                sport: int, dport: int) -> None:
    src, dst = addrs
    if proto == PROTO_ICMP:
        dport = sport  # an echo's identifier is both ports
    there = frame(proto, src, dst, sport, dport)
    back = frame(proto, dst, src, dport, sport)
    for f in (there, back):
        key = parse(bytearray(f), 1, len(f)).key()
        assert key_mark(key) == key_mark(key.reversed()) != 0
    res = batch([there, back])
    rows = np.arange(2, dtype=np.int64)
    key = parse(bytearray(there), 1, len(there)).key()
    flow = Flow(key=key, xlat=key, machine=0, chain=0)
    assert Repass().pick(res, rows, 0, [flow]).tolist() == [0, 1]


def key(src: str, dst: str, sport: int, dport: int) -> FlowKey:
    return FlowKey(4, PROTO_TCP, 0, bytes(map(int, src.split("."))),
                   bytes(map(int, dst.split("."))), sport, dport)


def test_a_pick_finds_the_moved_flows_rows_after_the_position_both_ways_through_nat() -> None:
    inside = key("10.0.0.1", "198.51.100.7", 40000, 443)
    xlat = inside._replace(src=bytes((192, 0, 2, 1)), sport=61000)  # SNAT'd
    other = key("10.0.0.2", "198.51.100.7", 40001, 443)
    reply = xlat.reversed()  # the reply arrives for the public tuple
    spec = [inside, other, reply, inside, other, reply, other, inside]
    frames = [frame(PROTO_TCP, k.src, k.dst, k.sport, k.dport) for k in spec]
    res = batch(frames)
    rows = np.arange(len(frames), dtype=np.int64)
    moved = Flow(key=inside, xlat=xlat, machine=0, chain=0)
    r = Repass()
    assert r.pick(res, rows, 0, [moved]).tolist() == [0, 2, 3, 5, 7]
    assert r.pick(res, rows, 3, [moved]).tolist() == [3, 5, 7]
    res.verdict[5] = 0  # decided since: not picked again
    assert r.pick(res, rows, 3, [moved]).tolist() == [3, 7]
    assert res.verdict[3] == PENDING
    assert not len(r.pick(res, rows, 8, [moved]))
    # the marks of a segment stay until the next one begins
    r.begin()
    assert r.pick(res, rows, 0, [Flow(key=other, xlat=other, machine=0, chain=0)]
                  ).tolist() == [1, 4, 6]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.tuples(st.just(4), v4, v4), st.tuples(st.just(6), v6, v6)),
       st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP]), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_key_words_are_the_unsigned_words_as_int64(addrs: tuple[int, bytes, bytes], proto: int,
                                                   zone: int, sport: int, dport: int) -> None:
    """pnic_engine.key_words (the index's key of a FlowKey, read signed by struct) against
    the words written out: the address as big-endian words, the head word's fields."""
    family, src, dst = addrs
    key = FlowKey(family, proto, zone, src, dst, sport, dport)
    words = [family | proto << 8 | zone << 16 | sport << 32 | dport << 48,
             *address_words(src), *address_words(dst)]
    assert key_words(key) == tuple(w - (1 << 64) if w >> 63 else w for w in words)


POOL = [key("10.0.0.1", "198.51.100.7", 40000, 443), key("10.0.0.2", "198.51.100.7", 40001, 443),
        key("10.0.0.3", "198.51.100.8", 40002, 80), key("10.0.0.4", "198.51.100.8", 40003, 80)]
# the odd ones leave SNAT'd: their replies arrive for the public tuple
XLAT = [k._replace(src=bytes((192, 0, 2, 1)), sport=61000 + i) if i % 2 else k
        for i, k in enumerate(POOL)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.booleans()), min_size=1,
                max_size=40), st.sets(st.integers(0, len(POOL) - 1), min_size=1),
       st.integers(0, 40), st.sets(st.integers(0, 39)))
def test_a_pick_is_every_undecided_row_of_a_moved_flow_after_the_position(
        spec: list[tuple[int, bool]], moved: set[int], at: int, decided: set[int]) -> None:
    """Against the rows read one by one: a row is picked when it lies at or after the
    position, is undecided, and carries the mark of a moved flow's key or of its reply."""
    keys = [XLAT[i].reversed() if reply else POOL[i] for i, reply in spec]
    res = batch([frame(PROTO_TCP, k.src, k.dst, k.sport, k.dport) for k in keys])
    for i in decided:
        if i < len(keys):
            res.verdict[i] = 0
    flows = [Flow(key=POOL[i], xlat=XLAT[i], machine=0, chain=0) for i in sorted(moved)]
    marks = {key_mark(k) for f in flows for k in (f.key, f.xlat)}
    rows = np.arange(len(keys), dtype=np.int64)
    expected = [i for i in range(min(at, len(keys)), len(keys))
                if res.verdict[i] == PENDING and key_mark(keys[i]) in marks]
    assert Repass().pick(res, rows, min(at, len(keys)), flows).tolist() == expected
