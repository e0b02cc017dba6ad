"""Channel contents: every receiver checks what it is given, never raises, changes no state.

Garbage and mutated valid messages go to both ends: the PNIC (tiers/pnic.py `Pnic.handle`) and
the VNIC (tiers/vnic.py, through a host whose PNIC answers are replaced by the test's).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift import channel as ch
from flowshift.config import parse_config
from flowshift.entry import ENTRY_SIZE, Flow
from flowshift.flow import FlowKey
from flowshift.host import Host
from flowshift.tiers.pnic import Pnic
from hosttools import FIREWALL_HOST
from tracetools import S, TcpConn, spaced

CFG = parse_config(FIREWALL_HOST, "test")
KEY = FlowKey(4, 17, 0, b"\x0a\0\0\x02", b"\xc6\x33\x64\x01", 1000, 53)
ENTRY = Flow(key=KEY, xlat=KEY, machine=0, chain=1, expires=10**12).to_bytes()


def _pnic() -> Pnic:
    return Pnic(4, CFG.machines, idle_timeout_ns=10**9, report_interval_ns=10**9)


def _state(p: Pnic) -> list[bytes]:
    return sorted(p.engine.get(s) for s in p.engine.used_slots())


def _mutate(raw: bytes, data: st.DataObject) -> bytes:
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    return bytes(b)


def test_wrong_length_entry_is_refused_and_counted():
    p = _pnic()
    assert p.handle(ch.Offload(1, ENTRY[:-1])) == [ch.Refuse(1, 5)]
    assert p.handle(ch.Offload(2, b"\0" * ENTRY_SIZE)) == [ch.Refuse(2, 5)]
    assert len(p.engine) == 0
    assert p.rejected == {"bad-entry": 2}


msgs_to_pnic = st.one_of(
    st.builds(ch.Offload, st.integers(0, 9), st.binary(max_size=300)),
    st.builds(ch.Recall, st.integers(0, 9),
              st.tuples(st.integers(0, 9), st.integers(-1, 300), st.integers(-1, 3),
                        st.binary(max_size=17), st.binary(max_size=17),
                        st.integers(-1, 70000), st.integers(-1, 70000)),
              st.integers(-2, 9)),
    st.builds(ch.Packets, st.integers(0, 10**12), st.lists(st.integers(0, 9), max_size=3),
              st.lists(st.integers(-1, 3), max_size=3), st.lists(st.integers(0, 10**12),
                                                                  max_size=3),
              st.lists(st.binary(max_size=80), max_size=3), st.lists(st.integers(0, 300),
                                                                    max_size=3),
              st.lists(st.integers(0, 2000), max_size=3)),
    st.builds(ch.Tick, st.integers(0, 10**12), st.integers(0, 3)),
    st.builds(ch.Query, st.integers(0, 10**12)),
    st.builds(ch.Ack, st.integers(0, 9)),
    st.builds(ch.Return, st.binary(max_size=300), st.integers(-1, 9)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(msgs_to_pnic, max_size=6), data=st.data())
def test_pnic_never_raises_on_garbage_or_mutated_messages(msgs, data):
    p = _pnic()
    p.handle(ch.Offload(1, ENTRY))
    for msg in [*msgs, ch.Offload(2, _mutate(ENTRY, data))]:
        before, rejected = _state(p), sum(p.rejected.values())
        p.handle(msg)
        if sum(p.rejected.values()) > rejected:  # rejected: nothing changed
            assert _state(p) == before
    for raw in _state(p):  # every entry it took was a valid one
        assert ch.entry_problem(raw, len(CFG.machines)) is None


# -- the VNIC end --------------------------------------------------------------------------


class FakeLink:
    """A PNIC that answers what the test says (garbage included); it holds nothing."""

    def __init__(self, answers: list[list[ch.Msg]]) -> None:
        self.scripted = list(answers)
        self.sent: list[ch.Msg] = []
        self.rejected: dict[str, int] = {}

    def send(self, msg: ch.Msg) -> None:
        self.sent.append(msg)

    def send_frame(self, frame: bytes) -> None:
        self.sent.append(ch.decode(frame))

    def answers(self) -> list[ch.Msg]:
        return self.scripted.pop(0) if self.scripted else []

    def run_batch(self, res, select, now):
        return None

    def close(self) -> None:
        pass


msgs_to_vnic = st.one_of(
    st.builds(ch.Ack, st.integers(-1, 9)),
    st.builds(ch.Refuse, st.integers(-1, 9), st.integers(-1, 9)),
    st.builds(ch.Return, st.binary(max_size=300), st.integers(-1, 9), st.integers(-1, 10**10)),
    st.builds(ch.Results, st.lists(st.integers(-1, 40), max_size=3),
              st.lists(st.integers(-3, 4), max_size=3), st.lists(st.integers(-1, 99),
                                                                 max_size=3),
              st.lists(st.binary(max_size=80), max_size=3)),
    st.builds(ch.Report, st.integers(0, 10**10), st.lists(st.binary(max_size=300),
                                                          max_size=2)),
    st.builds(ch.Synced, st.integers(0, 9)),
    st.builds(ch.Health, st.booleans()),
    st.builds(ch.Offload, st.integers(0, 9), st.binary(max_size=10)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(groups=st.lists(st.lists(msgs_to_vnic, max_size=4), max_size=12), data=st.data())
def test_vnic_never_raises_on_garbage_or_mutated_answers(groups, data):
    conn = TcpConn()
    frames = conn.handshake() + conn.data(30)
    mutated = [ch.Return(_mutate(ENTRY, data), 1), ch.Ack(data.draw(st.integers(0, 5)))]
    host = Host(CFG, policy="always")
    host.vnic.link = FakeLink([*groups, mutated])  # type: ignore[assignment]
    for i, (ts, frame) in enumerate(spaced(frames, S, S // 100)):
        host.process(i, ts, frame, 1, len(frame))
    host.finish()
    results = list(host.results())
    assert len(results) == len(frames)  # every packet decided, none lost
    # every flow is owned by exactly one tier and the counts agree with the shadows
    assert host.vnic.pnic_flows >= len(host.vnic.pnic_owned)


@pytest.mark.parametrize("msg", [
    ch.Ack(77), ch.Refuse(77, 3), ch.Results([12345], [0], [3], [b""]),
    ch.Return(b"\0" * ENTRY_SIZE, 1), ch.Return(ENTRY, 1), ch.Return(ENTRY[:100], 1),
    ch.Return(ENTRY, 99),
])
def test_vnic_rejects_and_counts(msg):
    host = Host(CFG, policy="always")
    host.vnic.link = FakeLink([[msg]])  # type: ignore[assignment]
    host.vnic.outstanding.append((0, 3, 0))
    host.vnic.deliver(0)
    host.finish()
    assert sum(host.stats.rejected_messages.values()) == 1



def test_pnic_rejections_reach_the_report():
    host = Host(CFG, policy="always")
    host.vnic.link.send(ch.Offload(9, ENTRY[:50]))  # type: ignore[attr-defined]
    host.vnic.link.answers()  # type: ignore[attr-defined]
    host.finish()
    assert host.stats.rejected_messages == {"pnic-bad-entry": 1}


def test_a_corrupt_frame_at_the_pnic_process_is_counted_and_answered():
    host = Host(CFG, policy="always", pnic="process")
    try:
        good = ch.encode(ch.Offload(1, ENTRY))
        host.vnic.link.send_frame(good[:6] + b"\0" + good[7:])  # the CRC no longer matches
        assert host.vnic.link.answers() == []  # answered with nothing, not left hanging
        host.finish()
        assert host.stats.rejected_messages == {"pnic-checksum": 1}
    finally:
        host.close()
