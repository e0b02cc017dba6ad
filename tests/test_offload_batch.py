"""Offers in batches: one Offloads message for many entries, one OffloadResults for its answers.

The PNIC takes an Offloads message exactly as it would take its entries one Offload at a time
(the same answers, the same second cache, slot for slot), checks every entry as entry_problem
does, and rejects a batch with one bad entry whole. The VNIC sends the offers it makes with
nothing else sent between them as one message, and a run with its offers batched is the same
run, result for result, event for event, as one with every offer sent on its own.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift import channel as ch
from flowshift.config import parse_config
from flowshift.entry import ENTRY_SIZE, Flow, Tier, field_offsets
from flowshift.flow import FlowKey
from flowshift.gen import TraceSpec, generate
from flowshift.host import Host
from flowshift.packet.pcap import open_trace
from flowshift.services.conntrack_tcp import TcpConn, TcpState
from flowshift.tiers import link as linkmod
from flowshift.tiers._pnic_index import INSERTED, KEY_TAKEN, NO_ROOM
from flowshift.tiers.pnic import Pnic
from flowshift.tiers.pnic_engine import PnicEngine
from flowshift.tiers.vnic import Vnic
from flowshift.verdict import RefuseReason
from hosttools import FIREWALL_HOST, run

CFG = parse_config(FIREWALL_HOST, "test")
ZONES = len(CFG.machines)
MS = 1_000_000


def _flow(i: int, *, clash: bool = False) -> bytes:
    """A valid entry; `clash`: its reply key is flow 0's (the PNIC refuses a duplicate)."""
    key = FlowKey(4, 6, 0, bytes((10, 0, i >> 8 & 255, i & 255)), b"\xc6\x33\x64\x01",
                  1024 + i, 443)
    xlat = key if not clash else FlowKey(4, 6, 0, b"\xc6\x33\x64\x01", b"\x0a\0\0\0", 443, 1024)
    return Flow(key=key, xlat=xlat, machine=0, chain=1, tcp=TcpConn(state=TcpState.ESTABLISHED),
                expires=10**12, owner=Tier.VNIC).to_bytes()


def _pnic(capacity: int) -> Pnic:
    return Pnic(capacity, CFG.machines, idle_timeout_ns=10**9, report_interval_ns=10**9)


def _cache(p: Pnic) -> tuple:
    """The second cache to the byte: entries, index, slot states and free slots."""
    return _engine(p.engine)


def _one_by_one(answers: list[ch.Msg]) -> bytes:
    """The answers to single Offloads as the bytes an OffloadResults carries."""
    return bytes(0 if isinstance(a, ch.Ack) else a.reason for a in answers)  # type: ignore[attr-defined]


# -- the checks ----------------------------------------------------------------------------


def _mutate(raw: bytes, data: st.DataObject) -> bytes:
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 6))):
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.sampled_from([1, 2, 5, 15, 16, 40]))
def test_every_entry_is_checked_as_entry_problem_checks_one(data, n):
    """A few entries are checked one by one, many at once: both as entry_problem does."""
    raws = [_mutate(_flow(i), data) if data.draw(st.integers(0, 3)) == 0 else _flow(i)
            for i in range(n)]
    rows = np.frombuffer(b"".join(raws), np.uint8).reshape(n, ENTRY_SIZE)
    each = [ch.entry_problem(raw, ZONES) for raw in raws]
    assert ch.entries_problems(rows, ZONES) == each
    assert ch.entries_problem(b"".join(raws), ZONES) == next((p for p in each if p), None)


_F = field_offsets()


@pytest.mark.parametrize("field, value", [
    ("family", 5), ("tcp_state", 0), ("tcp_state", 200), ("zone", 7), ("machine", 1),
    *[(f, 1) for f in ("src", "dst", "xsrc", "xdst")],  # + 4: an IPv4 address's padding
])
@pytest.mark.parametrize("n", [3, 20])
def test_each_check_is_entry_problems(field, value, n):
    raws = [bytearray(_flow(i)) for i in range(n)]
    at = _F[field] + (4 if field in ("src", "dst", "xsrc", "xdst") else 0)
    raws[n - 2][at] = value
    each = [ch.entry_problem(bytes(raw), ZONES) for raw in raws]
    assert each[n - 2] is not None
    rows = np.frombuffer(b"".join(raws), np.uint8).reshape(n, ENTRY_SIZE)
    assert ch.entries_problems(rows, ZONES) == each
    assert ch.entries_problem(b"".join(raws), ZONES) == each[n - 2]


def test_entries_that_are_not_whole_are_a_bad_entry():
    assert ch.entries_problem(_flow(0)[:-1], ZONES) == "bad-entry"
    assert ch.entries_problem(b"", ZONES) is None


# -- the PNIC ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(picks=st.lists(st.integers(0, 9), min_size=1, max_size=12), capacity=st.integers(0, 8),
       before=st.integers(0, 3), healthy=st.booleans())
def test_a_batch_is_taken_as_its_offloads_one_by_one(picks, capacity, before, healthy):
    """Same answers and the same cache, slot for slot: duplicates within the batch, with
    entries already there, a cache filling up on the way, an unhealthy PNIC."""
    entries = [_flow(i, clash=i == 9) for i in picks]
    one, many = _pnic(capacity), _pnic(capacity)
    for p in (one, many):
        for i in range(before):
            p.handle(ch.Offload(i, _flow(10 + i)))
        p.healthy = healthy
    singles = [a for seq, raw in enumerate(entries) for a in one.handle(ch.Offload(50 + seq, raw))]
    assert [a.seq for a in singles] == list(range(50, 50 + len(entries)))  # type: ignore[attr-defined]
    assert many.handle(ch.Offloads(50, b"".join(entries))) == [
        ch.OffloadResults(50, _one_by_one(singles))]
    assert _cache(one) == _cache(many)
    assert one.rejected == many.rejected == {}


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(churn=st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=30),
       picks=st.lists(st.integers(0, 40), max_size=12), room=st.integers(0, 12))
def test_insert_many_is_inserts_one_by_one_after_any_churn(churn, picks, room):
    """After inserts and removes in any order (the free slots out of order), a batch lands in
    the slots, index buckets and counts that one insert after another gives."""
    one, many = PnicEngine(8, None), PnicEngine(8, None)
    for engine in (one, many):
        for add, i in churn:
            hit = engine.find(Flow.from_bytes(_flow(i)).key)
            if add:
                engine.insert(_flow(i))
            elif hit is not None:
                engine.remove(hit[0])
    codes, left = [], room
    for i in picks:
        if left <= 0 or not one.table.nfree:
            codes.append(NO_ROOM)
            continue
        ok = one.insert(_flow(i)) >= 0
        codes.append(INSERTED if ok else KEY_TAKEN)
        left -= ok
    rows = np.frombuffer(b"".join(_flow(i) for i in picks), np.uint8).reshape(-1, ENTRY_SIZE)
    assert many.insert_many(rows, room).tolist() == codes
    assert _engine(one) == _engine(many)


def _engine(e: PnicEngine) -> tuple:
    t = e.table
    return (t.entries.tobytes(), t.keys.tobytes(), t.vals.tobytes(), t.state.tobytes(),
            tuple(t.free[:t.nfree]), len(e))


def test_a_batch_with_a_bad_entry_is_rejected_whole_and_counted_once():
    p = _pnic(8)
    p.handle(ch.Offload(1, _flow(1)))
    before = _cache(p)
    bad = bytearray(_flow(3))
    bad[0] = 5  # no such family
    answer = p.handle(ch.Offloads(7, _flow(2) + bytes(bad) + _flow(4)))
    assert answer == [ch.OffloadResults(7, bytes([RefuseReason.BAD_ENTRY]) * 3)]
    assert p.rejected == {"bad-entry": 1}
    assert _cache(p) == before
    assert p.handle(ch.Offloads(8, _flow(2)[:100])) == []  # not whole entries: no answer
    assert p.rejected == {"bad-entry": 2}
    assert _cache(p) == before


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), n=st.integers(0, 5), cut=st.integers(0, 3))
def test_pnic_never_raises_on_mutated_batches(data, n, cut):
    p = _pnic(4)
    p.handle(ch.Offload(1, _flow(1)))
    raw = b"".join(_mutate(_flow(i), data) for i in range(2, 2 + n))
    before, rejected = _cache(p), sum(p.rejected.values())
    p.handle(ch.Offloads(data.draw(st.integers(-5, 2**63 - 1)), raw[:len(raw) - cut]))
    if sum(p.rejected.values()) > rejected:
        assert _cache(p) == before
    for slot in p.engine.used_slots():  # every entry it took was a valid one
        assert ch.entry_problem(p.engine.get(slot), ZONES) is None


def test_offloads_cross_both_transports():
    """The message and its answer through the inline and the process transport."""
    entries = _flow(1) + _flow(2) + _flow(9, clash=True)
    want = [ch.OffloadResults(3, bytes([0, 0, RefuseReason.DUPLICATE]))]
    assert ch.decode(ch.encode(ch.Offloads(3, entries))) == ch.Offloads(3, entries)
    for cls in (linkmod.InlineLink, linkmod.ProcessLink):
        link = cls(4, CFG.machines, idle_timeout_ns=10**9, report_interval_ns=10**9)
        try:
            link.send(ch.Offloads(1, _flow(0)))
            assert link.answers() == [ch.OffloadResults(1, b"\0")]
            link.send(ch.Offloads(3, entries))
            assert link.answers() == want
        finally:
            link.close()


# -- the VNIC ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "trace.pcap"
    generate(TraceSpec(flows=300, duration_s=20.0, seed=7, elephants=4, udp_share=0.2,
                       ipv6_share=0.3), path)
    return path


@pytest.fixture()
def sent(monkeypatch) -> collections.Counter[int]:
    """Offers per message the VNIC sends (1: an Offload)."""
    sizes: collections.Counter[int] = collections.Counter()
    for cls in (linkmod.InlineLink, linkmod.ProcessLink):
        def send(self, msg, _send=cls.send):
            if isinstance(msg, ch.Offloads):
                sizes[len(msg.entries) // ENTRY_SIZE] += 1
            elif isinstance(msg, ch.Offload):
                sizes[1] += 1
            _send(self, msg)
        monkeypatch.setattr(cls, "send", send)
    return sizes


def _every_offer_alone(monkeypatch) -> None:
    """The VNIC as it was before batches: each offer goes at once, in a message of its own."""
    offer = Vnic._offer

    def alone(self, seq, entry):
        offer(self, seq, entry)
        self._post_offers()
    monkeypatch.setattr(Vnic, "_offer", alone)


def _facts(r) -> tuple:
    s = r.host.stats
    return (r.outputs(), [(x.tier, x.machine, x.direction, x.index) for x in r.results],
            s.events, s.offloads_to_pnic, s.refused, s.returned, s.tier_packets,
            s.rejected_messages, s.peak_second_cache)


@pytest.mark.parametrize("kw", [
    {"policy": "always", "latency": 50 * MS},
    {"policy": "always", "latency": 50 * MS, "rows": 256},
    {"policy": "always", "latency": 50 * MS, "capacity": 3},
    {"random_seed": 5, "p": 0.5, "latency": 50 * MS, "batch": 4, "rows": 64},
    {"policy": "always", "latency": 50 * MS, "pnic": "process"},
    {"policy": "always", "latency": 50 * MS, "withdraw_at": 3000},
    {"policy": "always", "latency": 50 * MS, "crash_at": 3000, "rows": 256},
])
def test_batched_offers_are_the_run_of_single_offers(trace, sent, monkeypatch, kw):
    batched = run(trace, CFG, **kw)
    assert sum(n for size, n in sent.items() if size > 1), sent  # some offers went together
    _every_offer_alone(monkeypatch)
    sent.clear()
    single = run(trace, CFG, **kw)
    assert set(sent) == {1}
    assert _facts(batched) == _facts(single)


# -- the VNIC, given garbage ----------------------------------------------------------------


class ScriptedLink:
    """A PNIC that answers each Offloads as the test says, everything else as a real one."""

    def __init__(self, real: linkmod.InlineLink, answer) -> None:
        self.real, self.answer = real, answer
        self.rejected = real.rejected
        self.groups: list[list[ch.Msg]] = []
        self.batches = 0

    def send(self, msg: ch.Msg) -> None:
        if isinstance(msg, ch.Offloads):
            self.batches += 1
            self.real.send(msg)
            self.real.answers()
            self.groups.append(self.answer(msg))
        else:
            self.real.send(msg)
            self.groups.append(self.real.answers())

    def answers(self) -> list[ch.Msg]:
        return self.groups.pop(0)

    def run_batch(self, res, select, now):
        return None

    def close(self) -> None:
        self.real.close()


answers_to_offloads = st.lists(st.one_of(
    st.builds(ch.OffloadResults, st.integers(-1, 400), st.binary(max_size=6)),
    st.builds(ch.Ack, st.integers(-1, 400)),
    st.builds(ch.Refuse, st.integers(-1, 400), st.integers(-1, 9))), max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_vnic_never_raises_on_garbage_answers_to_batches(trace, data):
    """Whatever comes back for a batch (nothing, a wrong seq or count, bad reasons, strays),
    every packet is decided and no flow is lost; a bad answer is counted, and an offer with
    no valid answer is taken as refused."""
    host = Host(CFG, policy="always", latency=50 * MS)
    real = host.vnic.link
    link = ScriptedLink(real, lambda msg: data.draw(answers_to_offloads))  # type: ignore[arg-type]
    host.vnic.link = link  # type: ignore[assignment]
    results = run_host(host, trace, limit=4000)
    assert len(results) == 4000
    assert link.batches
    assert host.vnic.pnic_flows >= len(host.vnic.pnic_owned)
    assert not host.vnic.split and not host.vnic.offer_batches and not host.vnic.offers


def test_vnic_rejects_a_wrong_answer_and_refuses_the_offers(trace):
    host = Host(CFG, policy="always", latency=50 * MS)
    link = ScriptedLink(host.vnic.link, lambda msg: [  # type: ignore[arg-type]
        ch.OffloadResults(msg.seq + 1, bytes(len(msg.entries) // ENTRY_SIZE))])
    host.vnic.link = link  # type: ignore[assignment]
    run_host(host, trace, limit=4000)
    assert link.batches
    assert host.stats.rejected_messages["unknown-seq"] == link.batches
    assert host.stats.rejected_messages["unanswered"] >= 2 * link.batches
    assert host.stats.refused["bad-entry"] == host.stats.rejected_messages["unanswered"]


def run_host(host: Host, trace: Path, limit: int) -> list:
    results = []
    with open_trace(trace) as frames:
        for i, f in enumerate(frames):
            if i == limit:
                break
            host.process(i, f.ts_ns, f.data, f.linktype, f.wire_len)
            results.extend(host.results())
    host.finish()
    results.extend(host.results())
    host.close()
    return results
