"""The L4 load balancer: round robin as nftables `numgen inc mod N`, Maglev, the pools' state."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.config import parse_config
from flowshift.flow import PROTO_TCP, FlowKey
from flowshift.packet.build import tcp_frame
from flowshift.packet.parse import parse
from flowshift.packet.view import LINKTYPE_ETHERNET, TCP_SYN
from flowshift.services.chain import INGRESS, Chain
from flowshift.services.lb import LoadBalancer
from flowshift.services.maglev import Maglev, flow_hash
from flowshift.verdict import Reason, Verdict

VIP4, VIP6 = "203.0.113.10", "2001:db8::10"


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def machine(pools: list[dict], firewall: dict | None = None) -> dict:
    services = ["lb"] + (["firewall"] if firewall is not None else [])
    m = {
        "name": "lb",
        "addresses": ["10.0.0.0/24", "fd00::/64"],
        "public": [VIP4, VIP6],
        "services": services,
        "lb": pools,
    }
    if firewall is not None:
        m["firewall"] = firewall
    return m


def pool(weights: list[int], scheduler: str = "round-robin", v6: bool = False) -> dict:
    backends = [
        (f"[fd00::{i + 1:x}]:8080" if v6 else f"10.0.0.{i + 1}:8080") + f"@{w}"
        for i, w in enumerate(weights)
    ]
    vip = f"[{VIP6}]:80" if v6 else f"{VIP4}:80"
    return {"proto": "tcp", "vip": vip, "backends": backends, "scheduler": scheduler}


def balancer(*pools: dict) -> LoadBalancer:
    return LoadBalancer(parse_config({"machine": [machine(list(pools))]}).machines[0].lb)


def key(sport: int, v6: bool = False) -> FlowKey:
    if v6:
        return FlowKey(6, PROTO_TCP, 0, ip("2001:db8:9::2"), ip(VIP6), sport, 80)
    return FlowKey(4, PROTO_TCP, 0, ip("198.51.100.2"), ip(VIP4), sport, 80)


def picks(lb: LoadBalancer, n: int, v6: bool = False, sport: int = 40000) -> list[int]:
    k = key(sport, v6)
    p = lb.pool_for(k)
    assert p is not None
    return [lb.pick(p, k._replace(sport=sport + i))[0] for i in range(n)]


def cycle(weights: list[int]) -> list[int]:
    """The documented round-robin cycle: weight w gives w slots in a row, in list order."""
    return [i for i, w in enumerate(weights) for _ in range(w)]


# -- round robin ------------------------------------------------------------------------------


def test_round_robin_starts_at_the_first_backend_and_takes_turns() -> None:
    lb = balancer(pool([1, 1]))
    k = key(40000)
    p = lb.pool_for(k)
    assert p is not None
    # as nftables numgen inc mod 2: b1 b2 b1 b2..., whatever the flow (even the same tuple)
    assert [lb.pick(p, k) for _ in range(3)] == [
        (0, ip("10.0.0.1"), 8080),
        (1, ip("10.0.0.2"), 8080),
        (0, ip("10.0.0.1"), 8080),
    ]


def test_weights_expand_in_list_order_and_zero_is_skipped() -> None:
    lb = balancer(pool([2, 0, 1, 3]))
    assert picks(lb, 12) == [0, 0, 2, 3, 3, 3] * 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=5), st.integers(0, 30))
def test_any_weights_follow_the_cycle(weights: list[int], extra: int) -> None:
    lb = balancer(pool(weights))
    expected = cycle(weights)
    n = 2 * len(expected) + extra
    got = picks(lb, n)
    if not expected:  # every weight 0: no backend, and the position does not move
        assert got == [-1] * n
        assert lb.state() == [0]
    else:
        assert got == [expected[i % len(expected)] for i in range(n)]
        assert lb.state() == [n % len(expected)]


def test_all_weights_zero_means_no_backend() -> None:
    lb = balancer(pool([0, 0]))
    k = key(1)
    p = lb.pool_for(k)
    assert p is not None
    assert lb.pick(p, k) == (-1, b"", 0)


def test_each_pool_keeps_its_own_turn() -> None:
    # one rule per family in nftables, so one counter per family: interleaving does not mix
    lb = balancer(pool([1, 1, 1]), pool([1, 2], v6=True))
    got = [(picks(lb, 1)[0], picks(lb, 1, v6=True)[0]) for _ in range(4)]
    assert got == [(0, 0), (1, 1), (2, 1), (0, 0)]
    assert lb.state() == [1, 1]


def test_maglev_is_the_default_and_hashes_the_flow() -> None:
    raw = pool([1, 2, 1])
    del raw["scheduler"]
    lb = balancer(raw)
    (p,) = lb.order
    assert p.scheduler == "maglev"
    table = Maglev([(b.name, b.weight) for b in p.backends])
    for sport in range(40000, 40050):
        k = key(sport)
        assert lb.pick(p, k)[0] == table.lookup(flow_hash(k)) == lb.pick(p, k)[0]
    assert lb.state() == [0]


def test_maglev_and_round_robin_pools_side_by_side() -> None:
    lb = balancer(pool([1, 1], scheduler="maglev"), pool([1, 1, 1], v6=True))
    before = picks(lb, 10)
    assert picks(lb, 9, v6=True) == [0, 1, 2] * 3
    assert lb.state() == [0, 0]
    assert picks(balancer(pool([1, 1], scheduler="maglev")), 10) == before


def test_pool_for_matches_the_frontend_only() -> None:
    lb = balancer(pool([1]))
    assert lb.pool_for(key(1)) is not None
    assert lb.pool_for(key(1)._replace(dport=81)) is None
    assert lb.pool_for(key(1)._replace(proto=17)) is None
    assert lb.pool_for(key(1, v6=True)) is None


# -- the pools' state moves with the chain ------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=4),
    st.lists(st.integers(0, 3), min_size=1, max_size=4),
    st.integers(0, 20),
    st.integers(0, 20),
)
def test_restored_state_continues_the_sequence(
    w4: list[int], w6: list[int], done4: int, done6: int
) -> None:
    pools = (pool(w4), pool(w6, v6=True), pool([1, 1], scheduler="maglev") | {"vip": f"{VIP4}:8"})
    whole = balancer(*pools)
    moved = balancer(*pools)
    picks(whole, done4)
    picks(whole, done6, v6=True)
    picks(moved, done4)
    picks(moved, done6, v6=True)
    fresh = balancer(*pools)
    fresh.restore(moved.state())
    assert fresh.state() == whole.state()
    assert picks(fresh, 7) == picks(whole, 7)
    assert picks(fresh, 7, v6=True) == picks(whole, 7, v6=True)


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ([0], ["list of 2", "one per pool"]),
        ([0, 0, 0], ["list of 2"]),
        ((0, 0), ["list of 2"]),
        ([0, 3], ["pool 1", "[2001:db8::10]:80", "slot 3", "0-2"]),
        ([-1, 0], ["pool 0", "203.0.113.10:80", "slot -1", "0-1"]),
        ([True, 0], ["pool 0", "slot True"]),
        ([0, "1"], ["pool 1", "slot '1'"]),
        ([0.0, 0], ["pool 0", "not an integer"]),
    ],
)
def test_restore_rejects_state_of_other_pools(state: object, words: list[str]) -> None:
    lb = balancer(pool([1, 1]), pool([1, 2], v6=True))
    with pytest.raises(ValueError) as info:
        lb.restore(state)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value)
    assert lb.state() == [0, 0]


def test_restore_of_a_maglev_pool_accepts_only_zero() -> None:
    lb = balancer(pool([1, 1], scheduler="maglev"))
    lb.restore([0])
    with pytest.raises(ValueError, match="slot 1 is not an integer in 0-0"):
        lb.restore([1])


# -- in the chain: one turn per new connection, as netfilter's prerouting DNAT -------------------


def syn(sport: int, seq: int = 1000) -> bytes:
    return tcp_frame(
        src=ip("198.51.100.2"),
        dst=ip(VIP4),
        sport=sport,
        dport=80,
        seq=seq,
        ack=0,
        flags=TCP_SYN,
        window=64240,
    )


def run_chain(chain: Chain, frames: list[bytes]) -> list[tuple[Verdict, Reason, bytes]]:
    out = []
    for i, frame in enumerate(frames):
        pkt = parse(bytearray(frame), LINKTYPE_ETHERNET, len(frame))
        res = chain.process(pkt, INGRESS, 1_000_000 * (i + 1))
        out.append((res.verdict, res.reason, pkt.dst))
    return out


def test_a_connection_takes_one_turn_not_one_per_packet() -> None:
    cfg = parse_config({"machine": [machine([pool([1, 1])])]}).machines[0]
    chain = Chain(cfg, 0)
    # a retransmitted SYN belongs to the flow already created: it keeps b1, takes no turn
    got = run_chain(chain, [syn(40000), syn(40000), syn(40001), syn(40002)])
    assert [(v, dst) for v, _, dst in got] == [
        (Verdict.FORWARD, ip("10.0.0.1")),
        (Verdict.FORWARD, ip("10.0.0.1")),
        (Verdict.FORWARD, ip("10.0.0.2")),
        (Verdict.FORWARD, ip("10.0.0.1")),
    ]
    assert chain.lb is not None and chain.lb.state() == [1]


def test_a_connection_the_firewall_drops_still_took_its_turn() -> None:
    # Linux evaluates `dnat to numgen inc ...` in prerouting, before the forward filter drops
    firewall = {
        "default": "drop",
        "rule": [{"action": "allow", "direction": "ingress", "dst": "10.0.0.2/32"}],
    }
    cfg = parse_config({"machine": [machine([pool([1, 1])], firewall)]}).machines[0]
    got = run_chain(Chain(cfg, 0), [syn(40000), syn(40001), syn(40002)])
    assert [(v, r) for v, r, _ in got] == [
        (Verdict.DROP, Reason.DEFAULT),
        (Verdict.FORWARD, Reason.RULE),
        (Verdict.DROP, Reason.DEFAULT),
    ]
