"""The handoff race: the fast path takes a flow over only once the VNIC handled every punt.

A flow inserted HELD is punted (PuntReason.HELD) and each punt counted in flight under the
hold record's lock; the VNIC reports each handled punt and asks to release; the release is a
compare-and-switch under the same lock (a BPF program run with BPF_PROG_TEST_RUN). The tests
drive the datapath packet by packet against a model of the VNIC's queue (hypothesis picks the
interleaving), and race a packet thread against a VNIC thread on both cores.
"""

from __future__ import annotations

import os
import queue
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from flowshift.entry import Status
from flowshift.flow import PROTO_TCP
from flowshift.live import bpfsys
from flowshift.live.datapath import Clock, Datapath, Hold, Result, key_bytes
from flowshift.verdict import PuntReason, Reason
from test_bpf_datapath import CLASSIFIER, PORTS, PUNT_IFINDEX, S, established, flow, keys, segment

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")]


@pytest.fixture(scope="module")
def dp():
    with Datapath(f"h{os.getpid()}", 8, CLASSIFIER, uplink=PORTS[0], machine_ports=[PORTS[1]],
                  punt_ifindex=PUNT_IFINDEX, clock=Clock.TSTAMP) as d:
        yield d


def _flow():
    key, xlat = keys(4, PROTO_TCP, "snat")
    f = flow(key, xlat, established(1000, 2000), Status.SEEN_REPLY | Status.ASSURED)
    return f, key, [segment(f, 0, 1000, 2000), segment(f, 1, 2000, 1000)]


def test_held_flow_switches_only_with_nothing_in_flight(dp):
    f, key, (out, back) = _flow()
    dp.clear()
    assert dp.insert(f.to_bytes(), held=True)
    assert dp.hold_state(key) == (Hold.HELD, 0)
    for i, frame in enumerate([out, back, out]):
        r = dp.test_run(frame, ts=10 * S)
        assert (r.result, r.code, r.ifindex) == (Result.PUNT, PuntReason.HELD, PUNT_IFINDEX)
        assert r.frame == frame
        assert dp.hold_state(key) == (Hold.HELD, i + 1)
    assert dp.get(key) == f.to_bytes()  # a held flow's entry is the VNIC's to advance
    assert not dp.release(key)
    assert dp.handled(key) == 2
    assert dp.handled(key) == 1
    assert not dp.release(key)
    assert dp.test_run(back, ts=10 * S).code == PuntReason.HELD  # another one in flight
    assert [dp.handled(key) for _ in range(2)] == [1, 0]
    assert dp.handled(key) == -1  # nothing left to handle: the count never goes below 0
    advanced = f.copy()  # the VNIC ran the punted packets: it writes the entry it advanced
    advanced.packets = [20, 30]
    assert dp.update(advanced.to_bytes())
    assert dp.release(key)
    assert dp.hold_state(key) == (Hold.FAST, 0)
    record = bpfsys.lookup(dp.fd["fs_holds"], key_bytes(key), 16)
    assert record is not None and record[4:12] == bytes(8)  # FAST, nothing in flight
    r = dp.test_run(out, ts=10 * S)
    assert (r.result, r.code) == (Result.FORWARD, Reason.ESTABLISHED)
    after = dp.get(key)
    assert after is not None and int.from_bytes(after[180:188], "little") == 21
    assert not dp.release(key)  # not held any more


def test_insert_held_refuses_a_present_flow_and_leaves_no_hold_record(dp):
    f, key, _ = _flow()
    dp.clear()
    assert dp.insert(f.to_bytes())
    assert not dp.insert(f.to_bytes(), held=True)
    assert dp.hold_state(key) == (Hold.FAST, 0)
    dp.clear()


class HandoffMachine(RuleBasedStateMachine):
    """Packets, handled punts and release attempts in any order, against a model queue."""

    datapath: Datapath

    @initialize()
    def start(self) -> None:
        self.f, self.key, self.frames = _flow()
        self.datapath.clear()
        assert self.datapath.insert(self.f.to_bytes(), held=True)
        self.queued = 0  # HELD punts the VNIC has not handled yet
        self.released = False
        self.ts = 10 * S

    @rule(d=st.integers(0, 1))
    def packet(self, d: int) -> None:
        self.ts += 1
        r = self.datapath.test_run(self.frames[d], ts=self.ts)
        if self.released:
            assert r.result is Result.FORWARD
        else:
            assert (r.result, r.code) == (Result.PUNT, PuntReason.HELD)
            self.queued += 1

    @rule()
    def handle_one(self) -> None:
        if self.queued:
            assert self.datapath.handled(self.key) == self.queued - 1
            self.queued -= 1

    @rule()
    def release(self) -> None:
        switched = self.datapath.release(self.key)
        assert switched == (not self.released and self.queued == 0)
        self.released |= switched

    @invariant()
    def state_matches(self) -> None:
        if hasattr(self, "key"):
            want = (Hold.FAST, 0) if self.released else (Hold.HELD, self.queued)
            assert self.datapath.hold_state(self.key) == want


def test_any_interleaving_keeps_the_protocol(dp):
    HandoffMachine.datapath = dp
    HandoffMachine.TestCase.settings = settings(
        max_examples=60, stateful_step_count=40, deadline=None,
        suppress_health_check=list(HealthCheck))
    HandoffMachine.TestCase().runTest()


def test_a_racing_vnic_never_releases_with_a_punt_in_flight(dp):
    """A packet thread and a VNIC thread on both cores: when the release succeeds, every HELD
    punt ever made has been handled, and no packet is punted HELD after it."""
    f, key, frames = _flow()
    dp.clear()
    assert dp.insert(f.to_bytes(), held=True)
    punted: queue.Queue[int] = queue.Queue()
    results: list[Result] = []
    done = threading.Event()
    handled_at_release: list[int] = []

    def packets() -> None:
        try:
            for i in range(4000):
                r = dp.test_run(frames[i & 1], ts=10 * S + i)
                results.append(r.result)
                if r.result is Result.PUNT:
                    assert r.code == PuntReason.HELD
                    punted.put(i)
        finally:
            done.set()

    def vnic() -> None:
        handled = 0
        while True:
            try:
                while True:  # bounded waits: the packet thread always finishes
                    punted.get(timeout=0.001 if handled >= 50 else 0.1)
                    dp.handled(key)
                    handled += 1
            except queue.Empty:
                pass
            finished = done.is_set() and punted.empty()  # every punt handled, none to come
            if handled < 50 and not finished:
                continue  # the VNIC releases mid-stream, not before the first punts
            if dp.release(key):
                handled_at_release.append(handled)
                return
            if finished:
                raise AssertionError("nothing in flight, yet the release failed")

    threads = [threading.Thread(target=packets), threading.Thread(target=vnic)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    held = results.count(Result.PUNT)
    assert held >= 50 and handled_at_release == [held]
    first_fast = results.index(Result.FORWARD) if Result.FORWARD in results else len(results)
    assert Result.PUNT not in results[first_fast:]
    assert dp.hold_state(key) == (Hold.FAST, 0)
