"""Packet fixture rows, made by the compiled PNIC engine and run through the eBPF datapath.

A `Row` is one packet against one cache state: the entry before (or none), the frame, its link
type and time, and what must come of it: the verdict (Verdict.FORWARD / DROP, or PUNT), the
reason (Reason when processed, PuntReason when punted), the frame after and the entry after.
`engine_row` makes a row with `PnicEngine`; `check_row` runs one through a `Datapath` with
BPF_PROG_TEST_RUN and compares everything. Any table of such rows (the shared fixture table
included) can be pointed at `check_row`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowshift.host import Classifier
from flowshift.live.datapath import Datapath, Hold, Port, Result
from flowshift.packet.parse import parse
from flowshift.packet.view import ParseError
from flowshift.tiers._pnic_parse import F_FLAGS, F_PROTO, FAIL, FULL, N_FIELDS, parse_frame
from flowshift.tiers.pnic_engine import PnicEngine
from flowshift.verdict import PuntReason

PUNT = -1
ETHERNET = 1


@dataclass(frozen=True, slots=True)
class Row:
    entry_before: bytes | None
    frame: bytes
    linktype: int
    ts: int
    verdict: int  # Verdict.FORWARD / DROP, or PUNT
    reason: int  # Reason when processed, PuntReason when punted
    frame_after: bytes
    entry_after: bytes | None  # the entry in the cache, or the one handed back
    description: str = ""


def _punt_reason(engine: PnicEngine, frame: bytes, linktype: int, ts: int, entry: bytes | None,
                 returned: bool) -> PuntReason:
    """Why the engine punted: from its own parser and its order of checks (pnic_engine)."""
    f = np.zeros(N_FIELDS, np.int64)
    buf = np.frombuffer(frame, np.uint8).copy()
    status = parse_frame(buf, 0, len(frame), len(frame), linktype, f)
    if not returned:
        if status == FAIL:
            return PuntReason.UNSUPPORTED
        return PuntReason.MISS  # no machine's, or no entry
    assert entry is not None
    expires = int.from_bytes(entry[164:172], "little", signed=True)
    if status != FULL:
        return PuntReason.UNSUPPORTED
    if expires <= ts:
        return PuntReason.EXPIRED
    if f[F_PROTO] == 6 and f[F_FLAGS] & 0x07:
        return PuntReason.LIFE
    return PuntReason.UNSUPPORTED


def engine_row(classifier: Classifier, entry: bytes | None, frame: bytes, ts: int,
               linktype: int = ETHERNET, description: str = "") -> Row:
    """One packet through a fresh PnicEngine holding entry: the row it makes."""
    engine = PnicEngine(2, classifier)
    slot = -1
    if entry is not None:
        slot = engine.insert(entry)
        assert slot >= 0, "the engine refused the entry"
    buf = np.frombuffer(frame, np.uint8).copy()
    one = np.ones(1, bool)
    verdict = np.zeros(1, np.int8)
    reason = np.zeros(1, np.int8)
    returned = np.full(1, -1, np.int32)
    engine.process(buf, np.zeros(1, np.int64), np.array([len(frame)], np.uint32),
                   np.array([len(frame)], np.uint32), np.array([linktype], np.uint16),
                   np.array([ts], np.int64), one, verdict, reason, returned)
    v = int(verdict[0])
    after: bytes | None = None
    if int(returned[0]) >= 0:
        after = engine.take_returned(int(returned[0]))
    elif slot >= 0:
        after = engine.get(slot)
    if v < 0:
        r = int(_punt_reason(engine, frame, linktype, ts, entry, int(returned[0]) >= 0))
        return Row(entry, frame, linktype, ts, PUNT, r, buf.tobytes(), after, description)
    return Row(entry, frame, linktype, ts, v, int(reason[0]), buf.tobytes(), after, description)


class NotEthernet(Exception):
    """The row's frame is not Ethernet: tc sees only Ethernet frames."""


def check_row(dp: Datapath, row: Row, classifier: Classifier, ports: dict[int, Port]) -> None:
    """Run row through dp (cleared first) and assert the datapath's answer equals the row's.

    ports: the datapath's port table (0 the uplink, 1 + m machine m) to check a forwarded
    frame's Ethernet addresses and device against.
    """
    if row.linktype != ETHERNET:
        raise NotEthernet(row.description)
    what = row.description or row.frame.hex()
    dp.clear()
    if row.entry_before is not None:
        assert dp.insert(row.entry_before), f"{what}: the datapath refused the entry"
    run = dp.test_run(row.frame, ts=row.ts)
    want = {PUNT: Result.PUNT, 0: Result.FORWARD, 1: Result.DROP}[row.verdict]
    assert (run.result, run.code) == (want, row.reason), (
        f"{what}: datapath {run.result.name}/{run.code}, engine {want.name}/{row.reason}")
    if run.result is Result.FORWARD:
        pkt = parse(bytearray(row.frame), ETHERNET, len(row.frame))
        assert pkt.error == ParseError.OK
        m, d = classifier.classify(pkt)
        assert (run.machine, run.direction) == (m, d), f"{what}: classified differently"
        port = ports[1 + m if d else 0]
        assert run.ifindex == port.ifindex, f"{what}: redirected to the wrong port"
        assert run.frame[:12] == port.dst_mac + port.src_mac, f"{what}: Ethernet addresses"
        assert run.frame[12:] == row.frame_after[12:], f"{what}: rewritten differently"
    else:
        assert run.frame == row.frame_after, f"{what}: frame changed"
    if row.entry_before is None:
        assert len(dp) == 0
        return
    key = row.entry_before[:40]
    assert dp.get(key) == row.entry_after, f"{what}: entry after differs"
    if row.verdict == PUNT and row.reason in (PuntReason.LIFE, PuntReason.EXPIRED):
        assert dp.hold_state(key)[0] == Hold.RETURNED, f"{what}: the entry was not handed back"


def check_rows(dp: Datapath, rows: list[Row], classifier: Classifier,
               ports: dict[int, Port]) -> tuple[int, int]:
    """check_row for every row: (rows checked, rows skipped as not Ethernet)."""
    checked = skipped = 0
    for row in rows:
        try:
            check_row(dp, row, classifier, ports)
        except NotEthernet:
            skipped += 1
            continue
        checked += 1
    return checked, skipped
