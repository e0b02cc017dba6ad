"""SNAT reuse of a tuple held by a closing TCP flow (Linux nf_nat_used_tuple_harder).

With the port range full, a new SYN may take the tuple of a SNAT'd TCP flow in TIME_WAIT or
CLOSE when its sequence number is ahead of that flow's: the old flow is evicted. A SYN behind
it, a flow still open, or a packet other than a SYN finds the tuple taken (the nat-ports
Linux case holds both outcomes as Linux gave them).
"""

from __future__ import annotations

from flowshift.config import parse_config
from flowshift.conntrack_types import SECOND, TcpState
from flowshift.packet.build import tcp_frame
from flowshift.packet.parse import parse
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_SYN
from flowshift.services.chain import EGRESS, INGRESS, Chain
from flowshift.verdict import Reason, Verdict

S = SECOND
CLIENT, SERVER = bytes([10, 9, 0, 3]), bytes([203, 0, 113, 2])
PUBLIC = bytes([203, 0, 113, 1])
HOST = {"machine": [{
    "name": "gw", "addresses": ["10.9.0.0/24"], "public": ["203.0.113.1"],
    "services": ["firewall", "nat"],
    "firewall": {"default": "drop", "rule": [
        {"action": "allow", "direction": "egress", "proto": "any"}]},
    "nat": {"snat": [{"source": "10.9.0.3/32", "to": "203.0.113.1", "ports": "40010"}]}}]}


def _seg(src, dst, sport, dport, seq, ack, flags):
    return parse(bytearray(tcp_frame(src=src, dst=dst, sport=sport, dport=dport, seq=seq,
                                     ack=ack, flags=flags, window=65535)), 1)


def _time_wait(chain: Chain, c_isn: int = 1000, s_isn: int = 5000) -> None:
    """A whole connection from CLIENT:40010 through SNAT to 40010, left in TIME_WAIT."""
    c, s, t = c_isn, s_isn, S

    def out(seq, ack, flags):
        return chain.process(_seg(CLIENT, SERVER, 40010, 80, seq, ack, flags), EGRESS, t)

    def back(seq, ack, flags):
        return chain.process(_seg(SERVER, PUBLIC, 80, 40010, seq, ack, flags), INGRESS, t)

    assert out(c, 0, TCP_SYN).created
    back(s, c + 1, TCP_SYN | TCP_ACK)
    out(c + 1, s + 1, TCP_ACK)
    out(c + 1, s + 1, TCP_FIN | TCP_ACK)
    back(s + 1, c + 2, TCP_FIN | TCP_ACK)
    out(c + 2, s + 2, TCP_ACK)
    (flow,) = list(chain.flows)
    assert flow.tcp is not None and flow.tcp.state == TcpState.TIME_WAIT


def _chain() -> Chain:
    return Chain(parse_config(HOST, "t").machines[0], 0)


def test_a_syn_ahead_evicts_the_time_wait_flow_and_takes_its_port() -> None:
    chain = _chain()
    _time_wait(chain)
    out = chain.process(_seg(CLIENT, SERVER, 40012, 80, 1000 + (1 << 30), 0, TCP_SYN),
                        EGRESS, 2 * S)
    assert out.created and out.flow is not None
    assert (out.flow.xlat.src, out.flow.xlat.sport) == (PUBLIC, 40010)
    assert len(chain.flows) == 1  # the TIME_WAIT flow is gone


def test_a_syn_behind_finds_the_port_taken() -> None:
    chain = _chain()
    _time_wait(chain)
    out = chain.process(_seg(CLIENT, SERVER, 40011, 80, 1000 - (1 << 30), 0, TCP_SYN),
                        EGRESS, 2 * S)
    assert (out.verdict, out.reason) == (Verdict.DROP, Reason.NAT_EXHAUSTED)
    assert len(chain.flows) == 1


def test_an_open_flow_is_never_evicted() -> None:
    chain = _chain()
    assert chain.process(_seg(CLIENT, SERVER, 40010, 80, 1000, 0, TCP_SYN), EGRESS, S).created
    out = chain.process(_seg(CLIENT, SERVER, 40012, 80, 1000 + (1 << 30), 0, TCP_SYN),
                        EGRESS, 2 * S)
    assert out.reason == Reason.NAT_EXHAUSTED


def test_only_a_syn_may_evict() -> None:
    chain = _chain()
    _time_wait(chain)
    out = chain.process(_seg(CLIENT, SERVER, 40012, 80, 1000 + (1 << 30), 7, TCP_ACK),
                        EGRESS, 2 * S)  # a mid-stream pickup: no eviction
    assert out.reason == Reason.NAT_EXHAUSTED
