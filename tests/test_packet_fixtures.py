"""The packet fixture table (tests/fixtures/packets.py) on every engine.

The file the other engines read must be current; the reference PNIC and the compiled engine
must each give every row exactly: verdict, reason, the return reason of a handed-back entry,
the frame after and the entry after. The PNIC tier passes the engine's return reason on.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import packets
from fixtures.packets import PUNT, Row
from flowshift import channel as ch
from flowshift.config import parse_config
from flowshift.entry import ENTRY_SIZE
from flowshift.tiers.pnic import Pnic
from flowshift.tiers.pnic_engine import RETURN_REASONS, PnicEngine
from flowshift.verdict import PuntReason

ROWS = packets.load()


def test_the_table_file_is_current() -> None:
    """Regenerate with `python tests/fixtures/packets.py` after changing a builder or an engine
    semantics; the diff of packets.json shows what changed."""
    assert packets.PATH.read_text(encoding="utf-8") == packets.text()


def test_rows_are_named_once_and_cover_every_outcome() -> None:
    names = [r.name for r in ROWS]
    assert len(names) == len(set(names))
    punts = {PuntReason(r.reason) for r in ROWS if r.verdict == PUNT}
    assert punts == {PuntReason.MISS, PuntReason.LIFE, PuntReason.EXPIRED,
                     PuntReason.UNSUPPORTED}  # HELD is the host's, never the data path's
    assert {r.verdict for r in ROWS} == {PUNT, 0, 1}
    for r in ROWS:
        for raw in (r.entry_before, r.entry_after):
            assert raw is None or len(raw) == ENTRY_SIZE


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_reference_gives_the_row(row: Row) -> None:
    out = packets.run_reference(row.entry_before, row.frame, row.linktype, row.wire_len, row.ts,
                                packets.knobs_of(row.conntrack))
    assert (out.verdict, out.reason, out.returned) == (row.verdict, row.reason, row.returned)
    assert out.frame_after == row.frame_after
    assert out.entry_after == row.entry_after


def run_engine(row: Row) -> packets.Outcome:
    """One row through a fresh compiled engine holding the row's entry."""
    engine = PnicEngine(4, packets.CLASSIFIER, [packets.knobs_of(row.conntrack)])
    slot = -1
    if row.entry_before is not None:
        slot = engine.insert(row.entry_before)
        assert slot >= 0
    buf = np.frombuffer(row.frame, np.uint8).copy()
    one = np.zeros(1, np.int64)
    verdict = np.zeros(1, np.int8)
    reason = np.zeros(1, np.int16)
    returned = np.full(1, -1, np.int64)
    before = engine.punt_counts()
    done = engine.process(buf, one, one + len(row.frame), one + row.wire_len,
                          one + row.linktype, one + row.ts, np.ones(1, np.bool_), verdict,
                          reason, returned)
    assert done == (1 if verdict[0] >= 0 else 0)
    counts = engine.punt_counts()
    back = 0
    entry_after = engine.get(slot) if slot >= 0 else None
    if verdict[0] == PUNT:
        why = PuntReason(int(reason[0]))
        assert counts[why] == before[why] + 1
        assert sum(counts.values()) == sum(before.values()) + 1
        if returned[0] >= 0:
            assert returned[0] == slot
            back = RETURN_REASONS[why]
            entry_after = engine.take_returned(slot)
            assert len(engine) == 0
    else:
        assert counts == before
    return packets.Outcome(int(verdict[0]), int(reason[0]), int(back), buf.tobytes(),
                           entry_after)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_compiled_engine_gives_the_row(row: Row) -> None:
    out = run_engine(row)
    assert (out.verdict, out.reason, out.returned) == (row.verdict, row.reason, row.returned)
    assert out.frame_after == row.frame_after
    assert out.entry_after == row.entry_after


@pytest.mark.parametrize("row", [r for r in ROWS if r.returned],
                         ids=[r.name for r in ROWS if r.returned])
def test_the_pnic_returns_the_entry_with_the_engines_reason(row: Row) -> None:
    machines = parse_config({"machine": packets.MACHINES, "conntrack": row.conntrack},
                            "fixtures").machines
    pnic = Pnic(4, machines, idle_timeout_ns=10**12, report_interval_ns=10**12)
    assert row.entry_before is not None and pnic.engine.insert(row.entry_before) >= 0
    out: list[ch.Msg] = []
    buf = np.frombuffer(row.frame, np.uint8).copy()
    one = np.zeros(1, np.int64)
    verdict = np.zeros(1, np.int8)
    reason = np.zeros(1, np.int16)
    pnic.run(buf, one, one + len(row.frame), one + row.wire_len, one + row.linktype,
             one + row.ts, np.ones(1, np.bool_), verdict, reason, np.zeros(1, np.int16),
             np.zeros(1, np.int8), out)
    assert out == [ch.Return(row.entry_before, row.returned, row.ts)]


def _l4_checksum(row: Row) -> bytes:
    at = 14 + (20 if row.frame[12:14] == b"\x08\x00" else 40) + 6
    return row.frame_after[at:at + 2]


def test_udp_checksum_rows_hold_the_zero_rules() -> None:
    by_name = {r.name: r for r in ROWS}
    assert _l4_checksum(by_name["snat4_udp_zero_checksum_stays_zero"]) == b"\0\0"
    assert _l4_checksum(by_name["snat4_udp_computed_zero_is_ffff"]) == b"\xff\xff"
    assert _l4_checksum(by_name["snat6_udp_computed_zero_is_ffff"]) == b"\xff\xff"
