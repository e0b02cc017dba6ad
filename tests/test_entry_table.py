"""The table of flow entries the second cache and the fast path share (tiers/entry_table.py),
against a dict of what it should hold, through puts, batch puts, releases, removes and growth."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.entry import ENTRY_SIZE, Flow, Tier
from flowshift.flow import FlowKey
from flowshift.services.conntrack_tcp import TcpConn, TcpState
from flowshift.tiers._pnic_batch import LIVE
from flowshift.tiers._pnic_index import INSERTED, KEY_TAKEN, NO_ROOM
from flowshift.tiers.entry_table import FREE, EntryTable

KEYS = 12  # few keys, so that puts of a key already held are common


def _key(i: int) -> FlowKey:
    return FlowKey(4, 6, 0, bytes((10, 0, 0, i)), b"\xc6\x33\x64\x01", 1024 + i, 443)


def _entry(i: int) -> bytes:
    key = _key(i)
    return Flow(key=key, xlat=key, machine=0, chain=1, tcp=TcpConn(state=TcpState.ESTABLISHED),
                expires=10**12 + i, owner=Tier.VNIC).to_bytes()


def _check(table: EntryTable, held: dict[int, int]) -> None:
    """The table holds exactly `held` (key number -> slot), each entry found by both keys."""
    assert table.nfree == table.capacity - len(held)
    assert sorted(np.flatnonzero(table.state == LIVE).tolist()) == sorted(held.values())
    assert not set(table.free[:table.nfree].tolist()) & set(held.values())
    for i in range(KEYS):
        hit = table.lookup(_key(i))
        if i in held:
            assert hit == held[i] * 2 and table.get(held[i]) == _entry(i)
            assert table.lookup(_key(i).reversed()) == held[i] * 2 + 1
        else:
            assert hit == -1


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, KEYS - 1)),
    st.tuples(st.just("rows"), st.lists(st.integers(0, KEYS - 1), max_size=6),
              st.integers(0, 8)),
    st.tuples(st.just("release"), st.integers(0, KEYS - 1)),
    st.tuples(st.just("remove"), st.integers(0, KEYS - 1)),
    st.tuples(st.just("release_rows"), st.lists(st.integers(0, KEYS - 1), max_size=5,
                                                 unique=True)),
    st.tuples(st.just("grow"),)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), ops)
def test_the_table_holds_what_was_put_and_not_released(capacity: int, steps: list) -> None:
    table = EntryTable(capacity)
    held: dict[int, int] = {}
    for step in steps:
        if step[0] == "put":
            i = step[1]
            slot = table.put(_entry(i))
            if i in held or len(held) == table.capacity:
                assert slot == -1
            else:
                assert slot >= 0
                held[i] = slot
        elif step[0] == "rows":
            picks, room = step[1], step[2]
            rows = np.frombuffer(b"".join(_entry(i) for i in picks), np.uint8).reshape(
                -1, ENTRY_SIZE)
            free_before = table.nfree
            used, codes = table.put_rows(rows, room)
            want, left = [], min(room, free_before)
            for i in picks:  # what puts one by one would say, in order
                if left <= 0:
                    want.append(NO_ROOM)
                elif i in held:
                    want.append(KEY_TAKEN)
                else:
                    want.append(INSERTED)
                    held[i] = int(table.lookup(_key(i))) >> 1
                    left -= 1
            assert codes.tolist() == want and used == want.count(INSERTED)
        elif step[0] == "release":
            i = step[1]
            if i in held:
                slot = held.pop(i)
                table.unindex(slot)
                assert table.release(slot) == _entry(i)
                assert table.state[slot] == FREE and table.get(slot) == bytes(ENTRY_SIZE)
        elif step[0] == "release_rows":  # releases in turn, the bytes unread
            slots = [held.pop(i) for i in step[1] if i in held]
            for slot in slots:
                table.unindex(slot)
            free_before = table.nfree
            table.release_rows(slots)
            assert table.free[free_before:table.nfree].tolist() == slots
            for slot in slots:
                assert table.state[slot] == FREE and table.get(slot) == bytes(ENTRY_SIZE)
        elif step[0] == "remove":  # unindex and release in one: a live entry's keys go too
            i = step[1]
            if i in held:
                slot = held.pop(i)
                assert table.remove(slot) == _entry(i)
                assert table.state[slot] == FREE and table.get(slot) == bytes(ENTRY_SIZE)
        else:
            before = table.capacity
            table.grow()
            assert table.capacity == 2 * before
        _check(table, held)


def test_put_takes_the_slot_a_release_freed_first() -> None:
    table = EntryTable(4)
    slots = [table.put(_entry(i)) for i in range(3)]
    assert slots == [0, 1, 2]
    table.unindex(1)
    table.release(1)
    assert table.put(_entry(5)) == 1  # the free slots are a stack


def test_slots_released_at_once_are_taken_again_as_after_releases_in_turn() -> None:
    one, many = EntryTable(6), EntryTable(6)
    for table in (one, many):
        for i in range(5):
            table.put(_entry(i))
        for slot in (3, 0, 4):
            table.unindex(slot)
    for slot in (3, 0, 4):
        one.release(slot)
    many.release_rows([3, 0, 4])
    assert [one.put(_entry(i)) for i in range(6, 10)] == [
        many.put(_entry(i)) for i in range(6, 10)] == [4, 0, 3, 5]
    assert one.mem.tobytes() == many.mem.tobytes()


def test_a_table_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EntryTable(0)
