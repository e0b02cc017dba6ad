"""NAT tuple allocation: Linux's get_unique_tuple() rules, made deterministic."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.config import NatConfig, SnatRule
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.services.nat import Nat
from flowshift.services.nat_alloc import AddressRange, allocate

PROTO_GRE = 47


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def key(src: str, dst: str, sport: int, dport: int, proto: int = PROTO_TCP) -> FlowKey:
    family = 6 if ":" in src else 4
    return FlowKey(family, proto, 0, ip(src), ip(dst), sport, dport)


class Conntrack:
    """The keys of live flows in both directions, as Linux's conntrack table holds them."""

    def __init__(self) -> None:
        self.keys: set[FlowKey] = set()
        self.asked: list[FlowKey] = []

    def in_use(self, reply: FlowKey) -> bool:
        self.asked.append(reply)
        return reply in self.keys

    def add(self, original: FlowKey, translated: FlowKey) -> None:
        self.keys.add(original)
        self.keys.add(translated.reversed())

    def snat(self, original: FlowKey, addrs: str, ports=None) -> FlowKey | None:
        got = allocate(
            original,
            rewrite_src=True,
            addrs=AddressRange.from_str(addrs),
            ports=ports,
            in_use=self.in_use,
        )
        if got is not None:
            self.add(original, got)
        return got

    def dnat(self, original: FlowKey, addrs: str, ports=None) -> FlowKey | None:
        got = allocate(
            original,
            rewrite_src=False,
            addrs=AddressRange.from_str(addrs),
            ports=ports,
            in_use=self.in_use,
        )
        if got is not None:
            self.add(original, got)
        return got


CLIENT_A = key("10.0.0.2", "198.51.100.7", 40000, 443)
CLIENT_B = key("10.0.0.3", "198.51.100.7", 40000, 443)


def test_source_port_is_preserved_when_free():
    ct = Conntrack()
    got = ct.snat(CLIENT_A, "192.0.2.1")
    assert got == CLIENT_A._replace(src=ip("192.0.2.1"))
    assert ct.asked == [got.reversed()]


def test_source_port_is_preserved_inside_a_port_range():
    got = Conntrack().snat(CLIENT_A, "192.0.2.1", (30000, 50000))
    assert got is not None and got.sport == CLIENT_A.sport


def test_port_outside_the_range_moves_into_it_deterministically():
    first = Conntrack().snat(CLIENT_A, "192.0.2.1", (61000, 61999))
    again = Conntrack().snat(CLIENT_A, "192.0.2.1", (61000, 61999))
    assert first == again
    assert first is not None and 61000 <= first.sport <= 61999
    assert first._replace(src=CLIENT_A.src, sport=CLIENT_A.sport) == CLIENT_A


def test_collision_moves_the_second_flow_to_another_port():
    ct = Conntrack()
    a = ct.snat(CLIENT_A, "192.0.2.1")
    b = ct.snat(CLIENT_B, "192.0.2.1")
    assert a is not None and b is not None
    assert a.sport == 40000 and b.sport != 40000 and 1024 <= b.sport <= 65535
    assert b.reversed() != a.reversed()
    # the same table state gives the same choice on every run
    replay = Conntrack()
    replay.snat(CLIENT_A, "192.0.2.1")
    assert replay.snat(CLIENT_B, "192.0.2.1") == b


@pytest.mark.parametrize(("sport", "low", "high"), [(22, 1, 511), (700, 600, 1023)])
def test_privileged_ports_stay_in_their_class(sport, low, high):
    ct = Conntrack()
    ct.snat(CLIENT_A._replace(sport=sport), "192.0.2.1")
    moved = ct.snat(CLIENT_B._replace(sport=sport), "192.0.2.1")
    assert moved is not None and moved.sport != sport and low <= moved.sport <= high


def test_source_already_in_range_is_kept():
    ct = Conntrack()
    assert ct.snat(CLIENT_A, "10.0.0.0-10.0.0.255") == CLIENT_A


def test_tiny_range_is_exhausted():
    ct = Conntrack()
    got = [ct.snat(CLIENT_A._replace(sport=p), "192.0.2.1", (5000, 5003)) for p in range(1, 6)]
    assert got[4] is None
    assert sorted(k.sport for k in got[:4]) == [5000, 5001, 5002, 5003]


def test_large_range_search_is_bounded_like_linux():
    calls = 0

    def everything_taken(_reply: FlowKey) -> bool:
        nonlocal calls
        calls += 1
        return True

    got = allocate(
        CLIENT_A,
        rewrite_src=True,
        addrs=AddressRange.from_str("192.0.2.1"),
        ports=None,
        in_use=everything_taken,
    )
    assert got is None
    # one check of the kept port, then rounds of 128, 64, 32, 16 and 8 candidates
    assert calls == 1 + 128 + 64 + 32 + 16 + 8


def test_dnat_to_one_address_and_port_is_fixed():
    ct = Conntrack()
    vip = key("203.0.113.9", "192.0.2.80", 51000, 80)
    got = ct.dnat(vip, "10.0.0.5", (8080, 8080))
    assert got == vip._replace(dst=ip("10.0.0.5"), dport=8080)
    # the same client endpoint sent to the same backend endpoint: replies would be ambiguous
    other = vip._replace(dst=ip("192.0.2.81"))
    assert ct.dnat(other, "10.0.0.5", (8080, 8080)) is None


def test_dnat_keeps_the_port_and_never_moves_it():
    ct = Conntrack()
    vip = key("203.0.113.9", "192.0.2.80", 51000, 80)
    assert ct.dnat(vip, "10.0.0.5") == vip._replace(dst=ip("10.0.0.5"))
    assert ct.dnat(vip._replace(dst=ip("192.0.2.81")), "10.0.0.5") is None


def test_dnat_port_range_searches_from_its_bottom():
    ct = Conntrack()
    first = ct.dnat(key("203.0.113.9", "192.0.2.80", 51000, 80), "10.0.0.5", (8000, 8009))
    second = ct.dnat(key("203.0.113.9", "192.0.2.81", 51000, 80), "10.0.0.5", (8000, 8009))
    assert first is not None and second is not None
    assert (first.dport, second.dport) == (8000, 8001)
    assert first.sport == second.sport == 51000


def echo(src: str, dst: str, ident: int) -> FlowKey:
    proto = PROTO_ICMPV6 if ":" in src else PROTO_ICMP
    return key(src, dst, ident, ident, proto)


def test_icmp_identifier_is_kept_then_moved_as_both_ports():
    ct = Conntrack()
    a = ct.snat(echo("10.0.0.2", "198.51.100.7", 7), "192.0.2.1")
    b = ct.snat(echo("10.0.0.3", "198.51.100.7", 7), "192.0.2.1")
    assert a == echo("192.0.2.1", "198.51.100.7", 7)
    assert b is not None and b.sport == b.dport != 7
    assert b.reversed() == b._replace(src=b.dst, dst=b.src)


def test_icmp_identifier_range():
    got = Conntrack().snat(echo("10.0.0.2", "198.51.100.7", 7), "192.0.2.1", (100, 100))
    assert got == echo("192.0.2.1", "198.51.100.7", 100)


def test_icmp_dnat_moves_the_identifier_on_collision():
    ct = Conntrack()
    a = ct.dnat(echo("203.0.113.9", "192.0.2.80", 7), "10.0.0.5")
    b = ct.dnat(echo("203.0.113.9", "192.0.2.81", 7), "10.0.0.5")
    assert a == echo("203.0.113.9", "10.0.0.5", 7)
    assert b is not None and b.sport == b.dport == 0  # Linux searches a DNAT id from 0


def test_ipv6():
    ct = Conntrack()
    client = key("fd00::2", "2001:db8::7", 40000, 443, PROTO_UDP)
    got = ct.snat(client, "2001:db8:ffff::1-2001:db8:ffff::ffff")
    assert got is not None and got.sport == 40000 and got.dst == client.dst
    assert got.src in AddressRange.from_str("2001:db8:ffff::1-2001:db8:ffff::ffff")
    ping = ct.snat(echo("fd00::2", "2001:db8::7", 9), "2001:db8:ffff::1")
    assert ping == echo("2001:db8:ffff::1", "2001:db8::7", 9)


def test_family_mismatch_is_named():
    with pytest.raises(ValueError, match=r"IPv6 but flow .* IPv4"):
        Conntrack().snat(CLIENT_A, "2001:db8::1")


@pytest.mark.parametrize("ports", [(10, 5), (-1, 5), (0, 65536)])
def test_bad_port_range_is_named(ports):
    with pytest.raises(ValueError, match="port range"):
        Conntrack().snat(CLIENT_A, "192.0.2.1", ports)


def test_address_is_stable_per_client_and_spread_over_clients():
    pool = "192.0.2.1-192.0.2.100"
    ct = Conntrack()
    one_client = {
        ct.snat(key("10.0.0.2", "198.51.100.7", sport, 443, proto), pool).src
        for sport in range(1024, 1124)
        for proto in (PROTO_TCP, PROTO_UDP)
    }
    assert len(one_client) == 1
    many = {ct.snat(key(f"10.0.1.{i}", "198.51.100.7", 5000, 443), pool).src for i in range(50)}
    assert len(many) > 20
    assert all(a in AddressRange.from_str(pool) for a in many | one_client)


def test_protocol_without_ports_only_changes_the_address():
    ct = Conntrack()
    gre = key("10.0.0.2", "198.51.100.7", 0, 0, PROTO_GRE)
    assert ct.snat(gre, "192.0.2.1") == gre._replace(src=ip("192.0.2.1"))
    assert ct.snat(gre._replace(src=ip("10.0.0.3")), "192.0.2.1") is None


@pytest.mark.parametrize(
    ("text", "size", "shown"),
    [
        ("192.0.2.1", 1, "192.0.2.1"),
        (" 192.0.2.1 - 192.0.2.10 ", 10, "192.0.2.1-192.0.2.10"),
        ("2001:db8::-2001:db8::ff", 256, "2001:db8::-2001:db8::ff"),
    ],
)
def test_address_range_parses(text, size, shown):
    r = AddressRange.from_str(text)
    assert len(r) == r.size == size and str(r) == shown
    assert AddressRange.from_str(str(r)) == r
    assert r.address(0) == r.first and r.address(size - 1) == r.last
    assert r.first in r and r.last in r and b"\x00" not in r


def test_address_range_beyond_len_has_a_size():
    r = AddressRange.from_str("::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
    assert r.size == 2**128 and r.family == 6


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("192.0.2.300", "bad address range"),
        ("192.0.2.9-192.0.2.1", "backwards"),
        ("192.0.2.1-2001:db8::1", "mixes"),
        ("", "bad address range"),
    ],
)
def test_bad_address_range_is_named(text, match):
    with pytest.raises(ValueError, match=match):
        AddressRange.from_str(text)


def test_address_range_checks_its_ends():
    with pytest.raises(ValueError, match=r"4 .* or 16"):
        AddressRange(b"\x01\x02", b"\x01\x03")
    with pytest.raises(IndexError):
        AddressRange.from_str("192.0.2.1").address(1)


flows = st.builds(
    lambda c, d, sport, proto: (
        echo(f"10.0.0.{c}", f"198.51.100.{d}", sport)
        if proto == PROTO_ICMP
        else key(f"10.0.0.{c}", f"198.51.100.{d}", sport, 80, proto)
    ),
    st.integers(1, 6),
    st.integers(1, 2),
    st.sampled_from([1, 600, 1030, 1031, 1032, 5000]),
    st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP]),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(flows, st.booleans()), max_size=40),
    st.sampled_from([None, (1030, 1033), (1, 3)]),
    st.sampled_from(["192.0.2.1", "192.0.2.1-192.0.2.2"]),
)
def test_live_flows_never_share_a_reply_tuple(ops, ports, addrs):
    ct = Conntrack()
    live: dict[FlowKey, FlowKey] = {}
    pool = AddressRange.from_str(addrs)
    for original, ends_one in ops:
        if ends_one and live:
            gone = next(iter(live))
            ct.keys -= {gone, live.pop(gone).reversed()}
        if original in ct.keys:
            continue  # conntrack would find the existing flow
        got = ct.snat(original, addrs, ports)
        if got is None:
            continue
        live[original] = got
        assert got.src in pool
        assert (got.dst, got.proto, got.family, got.zone) == (
            original.dst,
            original.proto,
            original.family,
            original.zone,
        )
        if original.proto == PROTO_ICMP:
            assert got.sport == got.dport
        else:
            assert got.dport == original.dport
        if ports is not None:
            assert ports[0] <= got.sport <= ports[1]
        replies = [t.reversed() for t in live.values()]
        assert len(set(replies)) == len(replies)
        assert not set(replies) & set(live)


def test_eviction_is_asked_for_the_last_candidates_of_each_round_only():
    """nf_nat_used_tuple_harder: only when 32 or fewer candidates are left in a round."""
    asked: list[int] = []

    def evict(reply: FlowKey) -> bool:
        asked.append(reply.dport)
        return False

    got = allocate(CLIENT_A, rewrite_src=True, addrs=AddressRange.from_str("192.0.2.1"),
                   ports=None, in_use=lambda _k: True, evict=evict)
    assert got is None
    assert len(asked) == 32 + 32 + 32 + 16 + 8  # the tails of the 128, 64, 32, 16, 8 rounds


def test_an_evicted_holder_gives_its_tuple_to_the_new_flow():
    held = key("192.0.2.1", "198.51.100.7", 40010, 443)
    got = allocate(CLIENT_A, rewrite_src=True, addrs=AddressRange.from_str("192.0.2.1"),
                   ports=(40010, 40010), in_use=lambda k: k == held.reversed(),
                   evict=lambda reply: True)  # the holder of 40010 may go
    assert got == held
    assert allocate(CLIENT_A, rewrite_src=True, addrs=AddressRange.from_str("192.0.2.1"),
                    ports=(40010, 40010), in_use=lambda k: k == held.reversed(),
                    evict=lambda _reply: False) is None


@settings(max_examples=300)
@given(st.data())
def test_snat_rules_match_sources_as_ipaddress_does(data):
    """Nat.snat picks the first rule whose source network holds the flow's source, matched on
    integers: the same rule as `ipaddress` membership, for either family and any prefix."""
    rules = []
    for _ in range(data.draw(st.integers(1, 4))):
        v6 = data.draw(st.booleans())
        bits = 128 if v6 else 32
        prefix = data.draw(st.integers(0, bits))
        value = data.draw(st.integers(0, (1 << bits) - 1))
        network = ipaddress.IPv6Network if v6 else ipaddress.IPv4Network
        net = network((value, prefix), strict=False)
        to = AddressRange.from_str("2001:db8::1" if v6 else "192.0.2.1")
        rules.append(SnatRule(source=net, to=to, ports=(1024, 65535)))
    v6 = data.draw(st.booleans())
    src = data.draw(st.binary(min_size=16, max_size=16) if v6 else
                    st.binary(min_size=4, max_size=4))
    if data.draw(st.booleans()):  # often inside one of the networks
        net = data.draw(st.sampled_from(rules)).source
        if (net.version == 6) == v6:
            offset = data.draw(st.integers(0, net.num_addresses - 1))
            src = (int(net.network_address) + offset).to_bytes(len(src), "big")
    key = FlowKey(6 if v6 else 4, PROTO_TCP, 0, src, bytes(len(src)), 5000, 80)
    nat = Nat(NatConfig(snat=tuple(rules)))
    got = nat.snat(key, lambda k: False)
    match = next((r for r in rules if ipaddress.ip_address(src) in r.source), None)
    if match is None:
        assert got == key
    else:
        assert got == allocate(key, rewrite_src=True, addrs=match.to, ports=match.ports,
                               in_use=lambda k: False)
