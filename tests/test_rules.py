"""Firewall rule matching: first match wins, else the default; checked by tables and against
a naive statement of the same semantics."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.config import FirewallConfig, Rule
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from flowshift.services.rules import EGRESS, INGRESS, RuleSet

PROTO_GRE = 47


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def rule(
    allow: bool = True, *, src: str | None = None, dst: str | None = None, **kw: object
) -> Rule:
    return Rule(
        allow=allow,
        src=ipaddress.ip_network(src) if src else None,
        dst=ipaddress.ip_network(dst) if dst else None,
        **kw,
    )


def decide(
    rules: list[Rule],
    direction: int,
    proto: int,
    src: str,
    dst: str,
    dport: int = 0,
    icmp_type: int = 0,
    default_allow: bool = False,
) -> tuple[bool, int]:
    ruleset = RuleSet(FirewallConfig(default_allow=default_allow, rules=tuple(rules)))
    return ruleset.decide(direction, proto, ip(src), ip(dst), dport, icmp_type)


def test_first_match_wins() -> None:
    rules = [rule(False, proto=PROTO_TCP, dst_port=((22, 22),)), rule(True, proto=PROTO_TCP)]
    assert decide(rules, INGRESS, PROTO_TCP, "1.2.3.4", "10.0.0.1", 22) == (False, 0)
    assert decide(rules, INGRESS, PROTO_TCP, "1.2.3.4", "10.0.0.1", 80) == (True, 1)


@pytest.mark.parametrize("default_allow", [False, True])
def test_default_decides_when_nothing_matches(default_allow: bool) -> None:
    rules = [rule(True, proto=PROTO_UDP)]
    got = decide(rules, EGRESS, PROTO_TCP, "10.0.0.1", "1.2.3.4", 80, default_allow=default_allow)
    assert got == (default_allow, -1)
    assert decide(
        [], EGRESS, PROTO_TCP, "10.0.0.1", "1.2.3.4", 80, default_allow=default_allow
    ) == (default_allow, -1)


@pytest.mark.parametrize(
    ("rule_direction", "direction", "matches"),
    [
        (EGRESS, EGRESS, True),
        (EGRESS, INGRESS, False),
        (INGRESS, INGRESS, True),
        (INGRESS, EGRESS, False),
        (None, EGRESS, True),
        (None, INGRESS, True),
    ],
)
def test_direction(rule_direction: int | None, direction: int, matches: bool) -> None:
    got = decide([rule(direction=rule_direction)], direction, PROTO_TCP, "10.0.0.1", "1.2.3.4")
    assert got == ((True, 0) if matches else (False, -1))


@pytest.mark.parametrize(
    ("proto", "dport", "matches"),
    [
        (PROTO_TCP, 80, True),
        (PROTO_TCP, 81, False),
        (PROTO_TCP, 4999, False),
        (PROTO_TCP, 5000, True),
        (PROTO_TCP, 5500, True),
        (PROTO_TCP, 5999, True),
        (PROTO_TCP, 6000, False),
        (PROTO_UDP, 5000, True),
        # dst_port applies to TCP and UDP only, even with proto "any"
        (PROTO_ICMP, 80, False),
        (PROTO_GRE, 80, False),
    ],
)
def test_port_ranges(proto: int, dport: int, matches: bool) -> None:
    rules = [rule(dst_port=((80, 80), (5000, 5999)))]
    got = decide(rules, INGRESS, proto, "1.2.3.4", "10.0.0.1", dport)
    assert got == ((True, 0) if matches else (False, -1))


@pytest.mark.parametrize(
    ("rule_proto", "proto", "src", "icmp_type", "matches"),
    [
        (PROTO_ICMP, PROTO_ICMP, "10.0.0.1", 8, True),
        (PROTO_ICMP, PROTO_ICMP, "10.0.0.1", 0, False),
        (PROTO_ICMPV6, PROTO_ICMPV6, "fd00::1", 128, True),
        (PROTO_ICMPV6, PROTO_ICMP, "10.0.0.1", 8, False),
        # proto "any" with icmp_type: ICMP and ICMPv6 only
        (0, PROTO_ICMP, "10.0.0.1", 8, True),
        (0, PROTO_ICMPV6, "fd00::1", 128, True),
        (0, PROTO_ICMPV6, "fd00::1", 129, False),
        (0, PROTO_TCP, "10.0.0.1", 8, False),
        (0, PROTO_UDP, "fd00::1", 128, False),
    ],
)
def test_icmp_types(rule_proto: int, proto: int, src: str, icmp_type: int, matches: bool) -> None:
    rules = [rule(proto=rule_proto, icmp_type=(8, 128))]
    dst = "1.2.3.4" if ":" not in src else "2001:db8::1"
    got = decide(rules, EGRESS, proto, src, dst, 0, icmp_type)
    assert got == ((True, 0) if matches else (False, -1))


def test_icmp_rule_without_types_matches_every_type() -> None:
    rules = [rule(proto=PROTO_ICMP)]
    for icmp_type in (0, 3, 8, 255):
        assert decide(rules, INGRESS, PROTO_ICMP, "1.2.3.4", "10.0.0.1", 0, icmp_type) == (True, 0)


@pytest.mark.parametrize(
    ("src", "dst", "matches"),
    [
        ("10.0.0.0", "1.2.3.4", True),  # network address
        ("10.0.0.255", "1.2.3.4", True),  # broadcast address
        ("9.255.255.255", "1.2.3.4", False),
        ("10.0.1.0", "1.2.3.4", False),
        ("10.0.0.7", "1.2.4.0", False),  # dst outside 1.2.3.0/24
        ("fd00::1", "2001:db8::1", False),  # IPv4 rule, IPv6 packet
    ],
)
def test_networks_and_family(src: str, dst: str, matches: bool) -> None:
    rules = [rule(src="10.0.0.0/24", dst="1.2.3.0/24")]
    got = decide(rules, EGRESS, PROTO_TCP, src, dst, 80)
    assert got == ((True, 0) if matches else (False, -1))


def test_family_mismatch_skips_to_later_rules() -> None:
    rules = [rule(False, dst="fd00::/8"), rule(True, dst="0.0.0.0/0"), rule(False)]
    assert decide(rules, INGRESS, PROTO_UDP, "1.2.3.4", "10.0.0.1", 53) == (True, 1)
    assert decide(rules, INGRESS, PROTO_UDP, "2001:db8::1", "fd00::5", 53) == (False, 0)
    assert decide(rules, INGRESS, PROTO_UDP, "2001:db8::1", "2001:db8::2", 53) == (False, 2)


def test_rule_without_networks_matches_both_families() -> None:
    rules = [rule(proto=PROTO_TCP)]
    assert decide(rules, EGRESS, PROTO_TCP, "10.0.0.1", "1.2.3.4") == (True, 0)
    assert decide(rules, EGRESS, PROTO_TCP, "fd00::1", "2001:db8::1") == (True, 0)


def test_proto_mismatch() -> None:
    assert decide([rule(proto=PROTO_UDP)], EGRESS, PROTO_TCP, "10.0.0.1", "1.2.3.4") == (False, -1)
    assert decide([rule(proto=0)], EGRESS, PROTO_GRE, "10.0.0.1", "1.2.3.4") == (True, 0)


@pytest.mark.parametrize(("direction", "src"), [(2, ip("10.0.0.1")), (EGRESS, b"\x01\x02")])
def test_bad_arguments_are_named(direction: int, src: bytes) -> None:
    ruleset = RuleSet(FirewallConfig(rules=(rule(),)))
    with pytest.raises(ValueError, match="EGRESS or INGRESS"):
        ruleset.decide(direction, PROTO_TCP, src, src, 80, 0)


# -- agreement with a naive statement of the semantics --------------------------------------


def naive(
    firewall: FirewallConfig,
    direction: int,
    proto: int,
    src: bytes,
    dst: bytes,
    dport: int,
    icmp_type: int,
) -> tuple[bool, int]:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    for index, r in enumerate(firewall.rules):
        if r.direction is not None and r.direction != direction:
            continue
        if r.proto and r.proto != proto:
            continue
        if r.src is not None and (r.src.version != s.version or s not in r.src):
            continue
        if r.dst is not None and (r.dst.version != d.version or d not in r.dst):
            continue
        if r.dst_port and (
            proto not in (PROTO_TCP, PROTO_UDP)
            or not any(lo <= dport <= hi for lo, hi in r.dst_port)
        ):
            continue
        if r.icmp_type and (
            proto not in (PROTO_ICMP, PROTO_ICMPV6) or icmp_type not in r.icmp_type
        ):
            continue
        return r.allow, index
    return firewall.default_allow, -1


# small address and port spaces, so that rules and packets often meet
V4 = ["10.0.0.0/8", "10.0.0.0/30", "10.0.0.2/31", "10.0.0.1/32", "0.0.0.0/0", "11.0.0.0/8"]
V6 = ["fd00::/8", "fd00::/126", "fd00::1/128", "::/0"]
ADDRS_V4 = [ip(a) for a in ("10.0.0.0", "10.0.0.1", "10.0.0.3", "11.1.1.1", "10.0.0.2")]
ADDRS_V6 = [ip(a) for a in ("fd00::", "fd00::1", "fd00::4", "2001:db8::1")]
PROTOS = [0, PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, PROTO_GRE]

port_ranges = st.tuples(st.integers(0, 12), st.integers(0, 12)).map(lambda t: (min(t), max(t)))
rules = st.builds(
    rule,
    st.booleans(),
    src=st.none() | st.sampled_from(V4 + V6),
    dst=st.none() | st.sampled_from(V4 + V6),
    direction=st.sampled_from([None, EGRESS, INGRESS]),
    proto=st.sampled_from(PROTOS),
    dst_port=st.lists(port_ranges, max_size=3).map(tuple),
    icmp_type=st.lists(st.integers(0, 12), max_size=3).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(
    rule_list=st.lists(rules, max_size=8),
    default_allow=st.booleans(),
    packets=st.lists(
        st.sampled_from([ADDRS_V4, ADDRS_V6]).flatmap(
            lambda addrs: st.tuples(
                st.sampled_from([EGRESS, INGRESS]),
                st.sampled_from(PROTOS),
                st.sampled_from(addrs),
                st.sampled_from(addrs),
                st.integers(0, 12),
                st.integers(0, 12),
            )
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_agrees_with_naive_matching(
    rule_list: list[Rule],
    default_allow: bool,
    packets: list[tuple[int, int, bytes, bytes, int, int]],
) -> None:
    firewall = FirewallConfig(default_allow=default_allow, rules=tuple(rule_list))
    ruleset = RuleSet(firewall)
    for packet in packets:
        assert ruleset.decide(*packet) == naive(firewall, *packet)
