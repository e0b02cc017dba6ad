"""HandoffQueue against a plain model: transit, packets in flight, held packets in order."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flowshift.flow import FlowKey
from flowshift.offload import HandoffQueue

KEYS = [FlowKey(4, 6, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02", p, 80) for p in range(3)]


@dataclass
class Item:
    index: int
    fkey: FlowKey


class Queue(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.q: HandoffQueue[Item] = HandoffQueue()
        self.transit: dict[int, FlowKey] = {}
        self.inflight: dict[int, FlowKey] = {}
        self.held: dict[FlowKey, list[int]] = {}
        self.seq = self.index = 0

    @rule(k=st.sampled_from(KEYS))
    def start(self, k: FlowKey) -> None:
        self.seq += 1
        self.q.start(self.seq, k)
        self.transit[self.seq] = k

    @rule(seq=st.integers(0, 12))
    def answered(self, seq: int) -> None:
        assert self.q.answered(seq) == self.transit.pop(seq, None)

    @rule(k=st.sampled_from(KEYS))
    def cancel(self, k: FlowKey) -> None:
        self.q.cancel(k)
        self.transit = {s: x for s, x in self.transit.items() if x != k}

    @rule(k=st.sampled_from(KEYS))
    def send(self, k: FlowKey) -> None:
        self.index += 1
        self.q.sent(Item(self.index, k))
        self.inflight[self.index] = k

    @rule(index=st.integers(0, 12))
    def back(self, index: int) -> None:
        got = self.q.returned(index)
        k = self.inflight.pop(index, None)
        if k is None:
            assert got is None
        else:
            assert got is not None and got[0].fkey == k
            assert got[1] == (k not in self.inflight.values())

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def back_and_held(self, data: st.DataObject) -> None:
        """A packet back from the PNIC that must wait (its flow offered again): in arrival
        order among the held, ahead of those that came after it."""
        index = data.draw(st.sampled_from(sorted(self.inflight)))
        got = self.q.returned(index)
        k = self.inflight.pop(index)
        assert got is not None
        self.q.hold_back(got[0])
        bisect.insort(self.held.setdefault(k, []), index)

    @rule(k=st.sampled_from(KEYS))
    def hold(self, k: FlowKey) -> None:
        self.index += 1
        self.q.hold(Item(self.index, k))
        self.held.setdefault(k, []).append(self.index)

    @rule(k=st.sampled_from(KEYS))
    def release(self, k: FlowKey) -> None:
        assert [i.index for i in self.q.release(k)] == self.held.pop(k, [])

    @invariant()
    def agrees(self) -> None:
        for k in KEYS:
            assert self.q.in_transit(k) == (k in self.transit.values())
            assert self.q.in_flight(k) == (k in self.inflight.values())
            assert self.q.is_held(k) == (k in self.held)
            assert self.q.pending(k) == (self.q.in_transit(k) or self.q.in_flight(k)
                                         or self.q.is_held(k))


TestHandoffQueue = Queue.TestCase
TestHandoffQueue.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
