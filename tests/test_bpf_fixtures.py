"""The shared packet-fixture table (tests/fixtures/packets.json) through the eBPF datapath.

The same rows the reference and the compiled engine run (tests/test_packet_fixtures.py) go
through the tc program with BPF_PROG_TEST_RUN: verdict, reason (PuntReason for a punt), the
rewritten frame and the entry after must be the table's. The kernel sees whole Ethernet
frames only: rows of another link type or cut to a snaplen are counted apart, never silently;
so are rows with conntrack settings other than Linux's defaults, which the eBPF datapath does
not run (`flowshift live` refuses such a config).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfrows import Row, check_rows
from flowshift.config import parse_config
from flowshift.live.datapath import Clock, Datapath, Port
from flowshift.tiers.classify import Classifier

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")]

TABLE = json.loads((Path(__file__).parent / "fixtures" / "packets.json").read_text())
CLASSIFIER = Classifier(parse_config({"machine": TABLE["machines"]}, "fixtures").machines)
PORTS = {i: Port(40 + i, bytes([2, 0, 0, 0, 5, i]), bytes([2, 0, 0, 0, 6, i]))
         for i in range(len(TABLE["machines"]) + 1)}


def _hex(text: str | None) -> bytes | None:
    return None if text is None else bytes.fromhex(text)


def _rows() -> Iterator[tuple[Row, bool]]:
    """(row, whole Ethernet frame under Linux's default conntrack settings?) for every row."""
    for r in TABLE["rows"]:
        frame = bytes.fromhex(r["frame"])
        whole = r["linktype"] == 1 and len(frame) == r["wire_len"] and not r.get("conntrack")
        yield Row(_hex(r["entry_before"]), frame, r["linktype"], r["ts"], r["verdict"],
                  r["reason"], bytes.fromhex(r["frame_after"]), _hex(r["entry_after"]),
                  r["name"]), whole


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with Datapath(f"x{os.getpid()}", 8, CLASSIFIER, uplink=PORTS[0],
                  machine_ports=[PORTS[1 + m] for m in range(len(TABLE["machines"]))],
                  punt_ifindex=49, clock=Clock.TSTAMP) as d:
        yield d


def test_every_whole_ethernet_row_runs_as_the_table_says(dp: Datapath) -> None:
    rows = list(_rows())
    whole = [row for row, ok in rows if ok]
    checked, skipped = check_rows(dp, whole, CLASSIFIER, PORTS)
    assert (checked, skipped) == (len(whole), 0)
    # the rows left out: the few the kernel cannot be given as such, and the tuned ones
    tuned = sum(1 for r in TABLE["rows"] if r.get("conntrack"))
    assert len(whole) >= len(rows) - 3 - tuned, [row.description for row, ok in rows if not ok]
