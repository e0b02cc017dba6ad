"""The sweep of a bounded conntrack table at its limit (a new flow in a full table).

Expired entries count as gone (Linux), so a new flow at nf_conntrack_max first frees every
entry whose timeout passed. A bounded table finds them in a deadline heap instead of a scan of
the whole table: it must find exactly the flows the scan finds, in the same order, however
the flows' expiries and owners moved in between, and a sweep with nothing due must not look
at the table at all (so a flood's cost per SYN does not grow with `max`).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flowshift.config import parse_config
from flowshift.conntrack_types import SECOND
from flowshift.entry import Flow, Tier
from flowshift.flow import PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.packet.build import tcp_frame, udp_frame
from flowshift.packet.parse import parse
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from flowshift.services.chain import EGRESS, INGRESS, Chain
from flowshift.services.conntrack import FlowTable

PNIC, VNIC = int(Tier.PNIC), int(Tier.VNIC)
HOSTS = (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), bytes([192, 0, 2, 1]))


def scan(table: FlowTable, now: int, keep: int, spare: set[FlowKey]) -> list[Flow]:
    """What a sweep removes, by definition: a look at every flow of the table, in order."""
    return [f for f in table if f.expires <= now and f.owner != keep and f.key not in spare]


class SweepMachine(RuleBasedStateMachine):
    """A bounded table under every kind of change its users make, swept at random times:
    each sweep takes exactly the flows a scan of the whole table would, in its order.

    Keys come from a tiny space so that a flow's reply tuple takes over another flow's key;
    an expiry moved earlier is announced with `touch` (the chain after a packet), a later one
    need not be; a PNIC-owned flow's expiry moves freely (reports) and the flow is touched
    when it becomes software's again (a PNIC crash)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = FlowTable(4)
        self.now = 100
        self.known: list[Flow] = []  # every flow ever made, in the table or not

    def _pick(self, i: int) -> Flow | None:
        live = list(self.table)  # not len(table): a flow whose reply is its own key counts half
        return live[i % len(live)] if live else None

    @rule(src=st.sampled_from(HOSTS), dst=st.sampled_from(HOSTS), sport=st.integers(1, 2),
          dport=st.integers(1, 2), nat=st.sampled_from((None, *HOSTS)),
          life=st.integers(0, 60))
    def add_new(self, src: bytes, dst: bytes, sport: int, dport: int, nat: bytes | None,
                life: int) -> None:
        key = FlowKey(4, PROTO_UDP, 0, src, dst, sport, dport)
        xlat = key if nat is None else key._replace(src=nat)
        flow = Flow(key=key, xlat=xlat, machine=0, chain=1, expires=self.now + life,
                    owner=VNIC)
        self.known.append(flow)
        self.table.add(flow)

    @precondition(lambda self: self.known)
    @rule(i=st.integers(0, 10**6), life=st.integers(-5, 60))
    def add_again(self, i: int, life: int) -> None:
        """A flow object added again (an import of a flow the table has, or had)."""
        flow = self.known[i % len(self.known)]
        if flow.owner == PNIC:
            return
        flow.expires = self.now + life
        self.table.add(flow)

    @rule(i=st.integers(0, 10**6), life=st.integers(-5, 60), announce=st.booleans())
    def move_expiry(self, i: int, life: int, announce: bool) -> None:
        flow = self._pick(i)
        if flow is None:
            return
        earlier = self.now + life < flow.expires
        flow.expires = self.now + life
        if flow.owner != PNIC and (earlier or announce):
            self.table.touch(flow)

    @rule(i=st.integers(0, 10**6))
    def to_pnic(self, i: int) -> None:
        flow = self._pick(i)
        if flow is not None:
            flow.owner = PNIC

    @rule(i=st.integers(0, 10**6), life=st.integers(1, 60))
    def from_pnic(self, i: int, life: int) -> None:
        """A PNIC crash: the flow resumes from its last report, in software."""
        flow = self._pick(i)
        if flow is not None and flow.owner == PNIC:
            flow.expires = max(flow.expires, self.now + life)
            flow.owner = VNIC
            self.table.touch(flow)

    @rule(i=st.integers(0, 10**6))
    def remove(self, i: int) -> None:
        flow = self._pick(i)
        if flow is not None:
            self.table.remove(flow)

    @rule(src=st.sampled_from(HOSTS), sport=st.integers(1, 2))
    def early_drop(self, src: bytes, sport: int) -> None:
        self.table.early_drop(FlowKey(4, PROTO_UDP, 0, src, HOSTS[0], sport, 1), VNIC)

    @rule(step=st.integers(0, 30))
    def advance(self, step: int) -> None:
        self.now += step

    @rule(spared=st.sets(st.integers(0, 20), max_size=3))
    def sweep_at_the_limit(self, spared: set[int]) -> None:
        live = list(self.table)
        spare = {live[i % len(live)].key for i in spared} if live else set()
        expect = scan(self.table, self.now, PNIC, spare)
        got = self.table.sweep(self.now, keep=PNIC, spare=lambda k: k in spare)
        assert [id(f) for f in got] == [id(f) for f in expect]

    @rule()
    def periodic_sweep(self) -> None:
        """The host's sweep of a machine's table keeps nothing: the whole table is scanned."""
        expect = scan(self.table, self.now, -1, set())
        assert self.table.sweep(self.now) == expect

    @invariant()
    def bounded_heap(self) -> None:
        assert len(self.table._heap) <= 2 * len(self.table._deadline) + 64


TestSweepMachine = SweepMachine.TestCase
TestSweepMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


class CountedFlow(Flow):
    """A flow that counts how often anyone reads its expiry."""

    reads = 0

    @property  # type: ignore[override]
    def expires(self) -> int:
        CountedFlow.reads += 1
        return self._expires

    @expires.setter
    def expires(self, value: int) -> None:
        self._expires = value


def test_a_sweep_with_nothing_due_looks_at_no_flow() -> None:
    table = FlowTable(1024)
    for i in range(1000):
        key = FlowKey(4, PROTO_TCP, 0, bytes([100, 0, i >> 8, i & 255]), HOSTS[0], 1024, 80)
        table.add(CountedFlow(key=key, xlat=key, machine=0, chain=1, expires=120 * SECOND + i,
                              owner=VNIC))
    CountedFlow.reads = 0
    for now in range(0, 100 * SECOND, SECOND):
        assert table.sweep(now, keep=PNIC) == []
    assert CountedFlow.reads == 0
    gone = table.sweep(120 * SECOND + 9, keep=PNIC)  # the ten oldest are due
    assert len(gone) == 10 and CountedFlow.reads < 100


# -- the chain: a flood at the limit, flows expiring and ending on the way -----------------------

INSIDE, OUTSIDE = bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7])
MACHINE = {"name": "m", "addresses": ["10.0.0.0/24"], "services": ["firewall"],
           "firewall": {"default": "drop", "rule": [
               {"action": "allow", "direction": "egress", "proto": "any"}]}}


class ScanTable(FlowTable):
    """The reference: every sweep scans the whole table."""

    def sweep(self, now: int, keep: int = -1, spare=None) -> list[Flow]:  # type: ignore[no-untyped-def]
        gone = [f for f in self if f.expires <= now and f.owner != keep
                and (spare is None or not spare(f.key))]
        for flow in gone:
            self.remove(flow)
        return gone


def _chain(cap: int, table: FlowTable) -> Chain:
    cfg = parse_config({"machine": [MACHINE], "conntrack": {
        "max": cap, "tcp_timeout_syn_sent": 3, "tcp_timeout_fin_wait": 2,
        "tcp_timeout_close": 1, "udp_timeout": 2}}, "t")
    chain = Chain(cfg.machines[0], 0)
    chain.flows = table
    return chain


_PACKET = st.tuples(st.sampled_from(("syn", "synack", "ack", "rst", "fin", "udp", "reply")),
                    st.integers(0, 5), st.sampled_from((0, 1000, 300_000_000, 900_000_000)))


@settings(max_examples=200, deadline=None)
@given(st.lists(_PACKET, min_size=1, max_size=80), st.integers(1, 4))
def test_a_flood_at_the_limit_decides_as_a_scan_would(packets, cap) -> None:  # type: ignore[no-untyped-def]
    """Handshakes, RSTs (an expiry moved to now), FINs (from days to seconds) and UDP at a
    small table with short timeouts: every verdict, and the table after each packet, as with
    a scan per sweep."""
    fast, slow = _chain(cap, FlowTable(cap)), _chain(cap, ScanTable(cap))
    now = SECOND
    for kind, port, gap in packets:
        now += gap
        sport = 20000 + port
        if kind == "udp":
            frame, d = udp_frame(src=INSIDE, dst=OUTSIDE, sport=sport, dport=53,
                                 payload=b"q"), EGRESS
        elif kind == "reply":
            frame, d = udp_frame(src=OUTSIDE, dst=INSIDE, sport=53, dport=sport,
                                 payload=b"a"), INGRESS
        elif kind == "synack":
            frame, d = tcp_frame(src=OUTSIDE, dst=INSIDE, sport=80, dport=sport, seq=5000,
                                 ack=1001, flags=TCP_SYN | TCP_ACK, window=1000), INGRESS
        else:
            flags = {"syn": TCP_SYN, "ack": TCP_ACK, "rst": TCP_RST,
                     "fin": TCP_FIN | TCP_ACK}[kind]
            frame, d = tcp_frame(src=INSIDE, dst=OUTSIDE, sport=sport, dport=80,
                                 seq=1000 if kind == "syn" else 1001,
                                 ack=0 if kind in ("syn", "rst") else 5001, flags=flags,
                                 window=1000), EGRESS
        a = fast.process(parse(bytearray(frame), 1), d, now)
        b = slow.process(parse(bytearray(frame), 1), d, now)
        assert (a.verdict, a.reason, a.created) == (b.verdict, b.reason, b.created)
        assert [(f.key, f.expires) for f in fast.flows] == \
            [(f.key, f.expires) for f in slow.flows]
        assert len(fast.flows) <= cap


def _tcp(sport: int, flags: int, seq: int) -> bytes:
    return tcp_frame(src=INSIDE, dst=OUTSIDE, sport=sport, dport=80, seq=seq, ack=0,
                     flags=flags, window=1000)


def test_a_reset_flow_makes_room_before_its_old_timeout() -> None:
    """An RST before any reply ends its flow at once (its expiry moves from SYN_SENT's to
    now): the next new flow at the limit finds it gone and early-drops nothing."""
    chain = _chain(2, FlowTable(2))
    for sport in (1, 2):
        chain.process(parse(bytearray(_tcp(sport, TCP_SYN, 1000)), 1), EGRESS, SECOND)
    chain.process(parse(bytearray(_tcp(1, TCP_RST, 1001)), 1), EGRESS, SECOND + 100)
    out = chain.process(parse(bytearray(_tcp(3, TCP_SYN, 1000)), 1), EGRESS, SECOND + 200)
    assert out.created
    assert sorted(f.key.sport for f in chain.flows) == [2, 3]


def _udp_flow(src: bytes, dst: bytes, sport: int, dport: int, expires: int,
              nat: bytes | None = None) -> Flow:
    key = FlowKey(4, PROTO_UDP, 0, src, dst, sport, dport)
    return Flow(key=key, xlat=key if nat is None else key._replace(src=nat), machine=0,
                chain=1, expires=expires, owner=VNIC)


def test_a_flow_added_again_after_its_key_was_taken_over_is_swept_once() -> None:
    """Another flow's reply tuple takes a flow's own key; that flow goes when the first is
    added again, and the first, back in the table, has one deadline: a sweep takes it once."""
    a, g = HOSTS[0], HOSTS[2]
    table = FlowTable(4)
    c = _udp_flow(g, g, 2, 1, 100)
    f = _udp_flow(a, g, 1, 2, 100, nat=g)  # its reply, g:2 -> g:1, is c's key
    assert f.reply_key == c.key
    table.add(c)
    table.add(f)
    table.add(c)  # c again: f, holding c's key, goes
    assert [id(x) for x in table.sweep(100, keep=PNIC)] == [id(c)]
    assert not list(table)


def test_a_flow_whose_reply_is_its_own_key_is_listed_and_swept() -> None:
    """A packet to its own address and port: the flow's two keys are one."""
    a = HOSTS[0]
    for buckets in (0, 4):
        table = FlowTable(buckets)
        loop = _udp_flow(a, a, 7, 7, 100)
        assert loop.reply_key == loop.key
        table.add(loop)
        assert table.get(loop.key) == (loop, 1)  # found as the reply, as Linux does
        assert [id(x) for x in table] == [id(loop)]
        keep = PNIC if buckets else -1
        assert [id(x) for x in table.sweep(100, keep=keep)] == [id(loop)]
        assert table.get(loop.key) is None
