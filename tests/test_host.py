"""Host bookkeeping that the transparency tests do not see."""

from __future__ import annotations

from flowshift.config import parse_config
from flowshift.host import Host
from flowshift.packet.build import udp_frame
from flowshift.verdict import Verdict
from hosttools import FIREWALL_HOST

S = 1_000_000_000


def _udp(sport: int) -> bytes:
    return udp_frame(src=b"\x0a\x00\x00\x02", dst=b"\xc6\x33\x64\x01", sport=sport, dport=53,
                     payload=b"q")


def test_expired_flows_are_swept_and_their_tuples_reusable():
    host = Host(parse_config(FIREWALL_HOST, "test"), policy="never")
    for i, (t, sport) in enumerate([(0, 1000), (1, 1001), (100, 1002), (101, 1000)]):
        host.process(i, t * S, _udp(sport), 1, 0)
    results = list(host.results())
    assert [r.verdict for r in results] == [Verdict.FORWARD] * 4
    assert [r.reason for r in results] == ["rule:0", "rule:0", "rule:0", "rule:0"]
    machine = host.machines[0]
    assert machine is not None
    chain = machine.chain
    # the 30 s UDP flows of t=0 and t=1 were swept at t=100; 1000 came back as a new flow
    assert sorted(f.key.sport for f in chain.flows) == [1000, 1002]
