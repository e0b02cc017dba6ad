"""packet.defrag against its own laws, scapy as an oracle, and Linux's captures."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, defragment, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6, fragment6

from flowshift.packet.defrag import (
    Defrag,
    DefragOutcome,
    Reassembled,
    fragment_info,
    refragment,
    split,
)
from linuxcases import load

SEC = 1_000_000_000


def v4_datagram(size: int, ident: int = 0x1234, df: bool = False, tos: int = 0) -> bytes:
    return bytes(IP(src="10.9.0.2", dst="203.0.113.2", id=ident, flags="DF" if df else 0,
                    tos=tos) / UDP(sport=4000, dport=5000) / bytes(i & 0xFF for i in range(size)))


def v6_datagram(size: int) -> bytes:
    return bytes(IPv6(src="fd00:9::2", dst="2001:db8:9::2") / UDP(sport=4000, dport=5000)
                 / bytes(i & 0xFF for i in range(size)))


def cut(datagram: bytes, per: int, ident: int = 0x1234) -> list[bytes]:
    plen = len(datagram) - (20 if datagram[0] >> 4 == 4 else 40)
    return split(datagram, [(o, min(per, plen - o)) for o in range(0, plen, per)], ident)


def feed(d: Defrag, frags: list[bytes], t0: int = 0, step: int = 0) -> list[Reassembled]:
    out = []
    for i, f in enumerate(frags):
        r = d.push(f, t0 + i * step)
        if isinstance(r, Reassembled):
            out.append(r)
    return out


datagrams = st.one_of(
    st.builds(v4_datagram, st.integers(9, 6000)),
    st.builds(v6_datagram, st.integers(9, 6000)),
)


@given(datagrams, st.integers(1, 200), st.randoms(use_true_random=False), st.data())
@settings(max_examples=150, deadline=None)
def test_any_order_with_duplicates_reassembles_the_original(
        dg: bytes, per8: int, rnd: random.Random, data: st.DataObject) -> None:
    per = per8 * 8
    frags = cut(dg, per)
    if len(frags) < 2:
        return
    order = frags[:]
    rnd.shuffle(order)
    dups = data.draw(st.lists(st.sampled_from(frags), max_size=3))
    for f in dups:  # a fragment again, at some point after its first copy
        at = order.index(f) + 1
        order.insert(rnd.randint(at, len(order)), f)
    d = Defrag()
    got = []
    for f in order:
        r = d.push(f, 0)
        if isinstance(r, Reassembled):
            got.append(r)
            break  # later copies would start a new queue, as in Linux
    assert len(got) == 1
    (r,) = got
    assert r.datagram == dg
    assert r.fragments == frags  # each once, in offset order: what Linux forwards
    assert split(r.datagram, r.pieces, r.ident) == frags
    assert d.memory == 0 and len(d) == 0


@given(datagrams, st.integers(1, 6), st.integers(1, 7))
@settings(max_examples=100, deadline=None)
def test_a_partial_overlap_drops_the_whole_datagram(dg: bytes, which: int, shift8: int) -> None:
    frags = cut(dg, 1232)
    if len(frags) < 3:
        return
    k = min(which, len(frags) - 2)  # a middle fragment
    info = fragment_info(frags[k])
    assert info is not None
    # the same bytes, 8*shift8 bytes earlier: reaches into fragment k-1
    hdr_end = len(frags[k]) - len(info.payload)
    start = info.offset - 8 * shift8
    plen = len(dg) - (20 if dg[0] >> 4 == 4 else 40)
    hdr_dg = 20 if dg[0] >> 4 == 4 else 40
    moved = split(dg, [(start, len(info.payload))], info.key[5])[0]
    assert hdr_end and plen and hdr_dg
    d = Defrag()
    assert feed(d, [*frags[:k], moved, *frags[k:]]) == []
    assert d.counts[DefragOutcome.OVERLAP] == 1


def test_duplicate_of_a_run_is_dropped_but_spanning_two_runs_is_an_overlap() -> None:
    dg = v4_datagram(4000)
    a, b, _, _ = cut(dg, 1232)
    span = split(dg, [(0, 2464)], 0x1234)[0]  # covers a and b exactly
    d = Defrag()
    feed(d, [a, b, span])  # a and b came back to back: one run, span lies within it
    assert d.last is DefragOutcome.DUPLICATE and len(d) == 1
    d = Defrag()
    feed(d, [b, a, span])  # b then a: two runs; span touches both
    assert d.last is DefragOutcome.OVERLAP and len(d) == 0


def test_incomplete_datagram_expires_after_the_timeout() -> None:
    frags = cut(v4_datagram(3000), 1232)
    d = Defrag(timeout_ns=30 * SEC)
    assert feed(d, frags[:2], 0) == []
    assert d.push(frags[2], 30 * SEC - 1) is not None  # just in time
    d = Defrag(timeout_ns=30 * SEC)
    feed(d, frags[:2], 0)
    assert d.push(frags[2], 30 * SEC) is None  # the queue is gone: this starts a new one
    assert d.counts[DefragOutcome.EXPIRED] == 1 and len(d) == 1
    assert d.expire(60 * SEC) == 1 and d.memory == 0


def test_ipv6_timeout_is_its_own() -> None:
    frags = cut(v6_datagram(3000), 1232, 7)
    d = Defrag(timeout_ns=1 * SEC, timeout6_ns=60 * SEC)
    assert len(feed(d, frags, 0, 20 * SEC)) == 1


@given(st.integers(2, 40), st.integers(3000, 20000))
@settings(max_examples=30, deadline=None)
def test_memory_bound_drops_fragments_above_high_thresh(n: int, thresh: int) -> None:
    d = Defrag(high_thresh=thresh)
    for i in range(n):  # first fragments only: never complete
        d.push(cut(v4_datagram(3000, ident=i), 1232, i)[0], i)
        assert d.memory <= thresh + 1252
    assert len(d) * 1252 == d.memory
    if n * 1252 > thresh + 1252:
        assert d.counts[DefragOutcome.MEMORY] > 0
    d.expire(10**12)
    assert d.memory == 0
    # with memory back, datagrams complete again
    assert len(feed(d, cut(v4_datagram(3000, ident=999), 1232, 999), 10**12)) == 1


def _last(frag: bytes) -> bytes:
    """The same fragment with More Fragments cleared."""
    if frag[0] >> 4 == 4:
        return frag[:6] + bytes([frag[6] & 0xDF]) + frag[7:]
    return frag[:43] + bytes([frag[43] & 0xFE]) + frag[44:]


@pytest.mark.parametrize("make", [v4_datagram, v6_datagram])
def test_a_second_end_kills_an_ipv4_queue_but_drops_only_an_ipv6_fragment(make: object) -> None:
    dg = make(3000)  # type: ignore[operator]
    a, b, c = cut(dg, 1232, 9)
    early_end = _last(split(dg, [(1232, 104)], 9)[0])  # a "last" fragment short of the end
    d = Defrag()
    feed(d, [a, c])
    assert d.push(early_end, 0) is None and d.last is DefragOutcome.INVALID
    if dg[0] >> 4 == 4:
        assert len(d) == 0 and d.memory == 0  # ip_frag_queue: the queue is corrupt
    else:
        assert len(feed(d, [b])) == 1  # nf_ct_frag6_queue: the fragment alone goes


def test_misaligned_ipv6_fragment_kills_the_queue_ipv4_trims_it() -> None:
    dg6 = v6_datagram(3000)
    a, _, c = cut(dg6, 1232, 5)
    odd = split(dg6, [(1232, 1231)], 5)[0]  # not the last, not a multiple of 8
    d = Defrag()
    feed(d, [a, c])
    assert d.push(odd, 0) is None and d.last is DefragOutcome.INVALID and len(d) == 0
    dg4 = v4_datagram(3000)
    a, b, c = cut(dg4, 1232)
    longer = split(dg4, [(1232, 1236)], 0x1234)[0]  # trimmed to 1232: a duplicate of b
    d = Defrag()
    feed(d, [a, b])
    assert d.push(longer, 0) is None and d.last is DefragOutcome.DUPLICATE
    assert len(feed(d, [c])) == 1


def test_not_a_fragment_passes_through() -> None:
    dg = v4_datagram(100)
    d = Defrag()
    assert d.push(dg, 0) is dg and len(d) == 0


def test_ecn_of_fragments_combines_as_rfc_3168() -> None:
    dg_ce, dg_ect = v4_datagram(3000, tos=3), v4_datagram(3000, tos=2)
    _, b, c = cut(dg_ect, 1232)
    a_ce = cut(dg_ce, 1232)[0]
    (r,) = feed(Defrag(), [a_ce, b, c])
    assert r.datagram[1] & 3 == 3
    dg_not = v4_datagram(3000, tos=0)
    d = Defrag()
    assert feed(d, [a_ce, *cut(dg_not, 1232)[1:]]) == []
    assert d.counts[DefragOutcome.INVALID] == 1


def test_df_survives_only_when_the_largest_fragment_had_it() -> None:
    dg = v4_datagram(3000, df=True)
    (r,) = feed(Defrag(), cut(dg, 1232))
    assert r.datagram == dg


# --------------------------------------------------------------------------- scapy oracle
@given(st.integers(9, 8000), st.integers(1, 180), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_ipv4_matches_scapy_fragment_and_defragment(size: int, per8: int,
                                                    rnd: random.Random) -> None:
    dg = v4_datagram(size)
    per = per8 * 8
    theirs = [bytes(p) for p in fragment(IP(dg), fragsize=per)]
    mine = refragment(dg, 20 + per)
    assert mine == theirs
    order = mine[:]
    rnd.shuffle(order)
    if len(mine) > 1:
        (r,) = feed(Defrag(), order)
        # scapy's defragment wants the fragments in order (shuffled, it reports overlaps)
        assert r.datagram == bytes(defragment([IP(f) for f in mine])[0])


@given(st.integers(9, 8000), st.integers(154, 400))
@settings(max_examples=40, deadline=None)
def test_ipv6_matches_scapy_fragment6_and_defragment6(size: int, per8: int) -> None:
    dg = v6_datagram(size)
    size_out = 48 + per8 * 8
    pkt = (IPv6(src="fd00:9::2", dst="2001:db8:9::2") / IPv6ExtHdrFragment(id=77)
           / IPv6(dg).payload)
    theirs = [bytes(p) for p in fragment6(pkt, size_out)]
    mine = refragment(dg, size_out, 77)
    if len(dg) > size_out:  # Linux fragments only what does not fit (scapy counts the header)
        assert mine == theirs
        (r,) = feed(Defrag(), mine[::-1])
        assert r.datagram == bytes(defragment6([IPv6(f) for f in mine]))


# --------------------------------------------------------------------------- Linux
@pytest.mark.parametrize("name", ["frag-order", "frag-reversed", "frag-overlap",
                                  "frag-geometry"])
def test_linux_forwards_what_split_cuts_from_the_translated_datagram(name: str) -> None:
    """Reassemble what entered the router and what it sent: Linux sent the translated
    datagram cut at the boundaries it received (IPv4 id kept, IPv6 id drawn anew)."""
    case = load(name)
    ins = feed(Defrag(), [f.data[14:] for f in case.inputs])
    outs = feed(Defrag(), [f.data[14:] for f in case.outputs])
    assert len(ins) == len(outs) > 0
    for a, b in zip(ins, outs, strict=True):
        # the cut of the received datagram holds the received payloads (headers may differ:
        # Linux gives every fragment the first one's, frag-geometry/*-mixed-headers)
        assert [fragment_info(f).payload for f in split(a.datagram, a.pieces, a.ident)] == [
            fragment_info(f).payload for f in a.fragments]  # type: ignore[union-attr]
        assert split(b.datagram, a.pieces, b.ident) == b.fragments
        assert refragment(b.datagram, a.max_size, b.ident) == b.fragments
        if a.datagram[0] >> 4 == 4:
            assert a.ident == b.ident
        assert a.datagram[48:] == b.datagram[48:]  # NAT touched the headers only


# frag-memory: Linux's bound is 8 KiB of skb truesize and queue structs; it kept 4 of the 6
# filling first fragments per family (case.json: ReasmTimeout 4, Ip6ReasmTimeout 4). In
# flowshift's bytes (IP lengths) a bound of 4096 keeps 4 fragments of 1252 / 1280 bytes too.
@pytest.mark.parametrize(("name", "timeout", "bound"), [
    ("frag-order", 30, 4 << 20), ("frag-reversed", 30, 4 << 20), ("frag-overlap", 30, 4 << 20),
    ("frag-geometry", 30, 4 << 20), ("frag-expire", 2, 4 << 20), ("frag-memory", 2, 4096)])
def test_datagrams_linux_forwarded_are_those_defrag_completes(name: str, timeout: int,
                                                              bound: int) -> None:
    """Linux forwarded exactly the fragments Defrag kept in the datagrams it completed."""
    case = load(name)
    d = Defrag(timeout_ns=timeout * SEC, timeout6_ns=timeout * SEC, high_thresh=bound)
    completed: set[int] = set()
    kept: dict[object, list[int]] = {}  # input fragments held in each open queue
    for i, fr in enumerate(case.inputs):
        info = fragment_info(fr.data[14:])
        if info is None:
            continue
        d.expire(fr.ts_ns)
        if info.key not in d:
            kept.pop(info.key, None)
        out = d.push(fr.data[14:], fr.ts_ns)
        if d.last in (DefragOutcome.QUEUED, DefragOutcome.REASSEMBLED):
            kept.setdefault(info.key, []).append(i)
        if isinstance(out, Reassembled):
            completed.update(kept.pop(info.key))
    forwarded = {i for i, row in enumerate(case.rows)
                 if row["verdict"] == "forward" and (row["frag_mf"] == "1"
                                                     or row["frag_offset"] not in ("", "0"))}
    assert forwarded == completed
    if name == "frag-memory":
        d.expire(case.inputs[-1].ts_ns + timeout * SEC)
        assert d.counts[DefragOutcome.EXPIRED] == 4 + 4  # as ReasmTimeout + Ip6ReasmTimeout
        assert d.counts[DefragOutcome.MEMORY] == (2 + 3) * 2  # 2 fills, 3 over the bound


def test_later_fragments_carry_only_copied_options() -> None:
    """ip_options_fragment: options without the copy flag become NOPs after the first
    fragment (the header keeps its length); reassembly takes the first fragment's header."""
    from scapy.layers.inet import IPOption_RR, IPOption_Security

    dg = bytes(IP(src="10.9.0.2", dst="203.0.113.2",
                  options=[IPOption_Security(), IPOption_RR()]) / UDP(sport=1, dport=2)
               / bytes(3000))
    first, *later = refragment(dg, 1500)
    assert first[20:36] == dg[20:36]
    for f in later:
        opts = f[20:36]
        assert opts[:11] == dg[20:31]  # security (copy flag set) kept
        assert opts[11:14] == b"\x01\x01\x01"  # record route (not copied): NOPs
    (r,) = feed(Defrag(), [*later, first])
    assert r.datagram == dg


@given(datagrams, st.randoms(use_true_random=False),
       st.lists(st.integers(0, 20 * SEC), min_size=8, max_size=8))
@settings(max_examples=60, deadline=None)
def test_a_datagram_completes_iff_its_fragments_come_within_the_timeout(
        dg: bytes, rnd: random.Random, gaps: list[int]) -> None:
    frags = cut(dg, 1232, 3)
    rnd.shuffle(frags)
    times = [sum(gaps[: i + 1]) for i in range(len(frags))]
    d = Defrag(timeout_ns=30 * SEC, timeout6_ns=30 * SEC)
    done = [r for f, t in zip(frags, times, strict=False) if isinstance(r := d.push(f, t),
                                                                         Reassembled)]
    single = len(frags) == 1  # not a fragment at all: passed through
    assert (len(done) == 1) == (not single and times[len(frags) - 1] - times[0] < 30 * SEC)


@pytest.mark.parametrize("family", [4, 6])
def test_a_datagram_over_65535_bytes_is_refused(family: int) -> None:
    chunk = bytes(8000)
    frags = []
    for off in range(0, 64000 + 1, 8000):
        last = off == 64000
        if family == 4:
            frags.append(bytes(IP(src="10.9.0.2", dst="203.0.113.2", id=7, proto=17,
                                  flags=0 if last else 1, frag=off // 8) / chunk))
        else:
            frags.append(bytes(IPv6(src="fd00:9::2", dst="2001:db8:9::2")
                               / IPv6ExtHdrFragment(nh=17, offset=off // 8, m=0 if last else 1,
                                                    id=7) / chunk))
    d = Defrag()
    assert feed(d, frags) == []
    if family == 4:  # the queue completes, and gluing it refuses the size
        assert d.counts[DefragOutcome.TOO_BIG] == 1 and len(d) == 0 and d.memory == 0
    else:  # nf_conntrack_reasm refuses the fragment that ends past 65535
        assert d.last is DefragOutcome.TOO_BIG
