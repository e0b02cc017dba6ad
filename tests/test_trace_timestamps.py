"""A pcapng timestamp beyond int64 nanoseconds ends the trace with a problem naming the block's
offset, in the frame reader, the batch reader, `inspect` and `replay` alike: never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowshift.cli import main
from flowshift.packet.batch import read_batches
from flowshift.packet.pcap import open_trace
from test_pcap import epb, frame_bytes, idb, shb

INT64_MAX = (1 << 63) - 1
YEAR_2286_US = 9_999_999_999 * 1_000_000  # microseconds (the default resolution) in 2286
FLIPPED_BIT_NS = 1_700_000_000 * 10**9 | (1 << 63)  # a 2023 time with its top bit flipped


def _trace(tmp_path: Path, bad_units: int, tsresol: int | None = None) -> tuple[Path, int]:
    """Two good packets, one with `bad_units`, one more good: (path, offset of the bad block)."""
    head = shb() + idb(1, tsresol=tsresol)
    good = [epb(0, 1_700_000_000 * 10**6 + i, frame_bytes(i)) for i in range(3)]
    if tsresol == 9:
        good = [epb(0, 1_700_000_000 * 10**9 + i, frame_bytes(i)) for i in range(3)]
    bad_at = len(head) + len(good[0]) + len(good[1])
    path = tmp_path / "t.pcapng"
    path.write_bytes(head + good[0] + good[1] + epb(0, bad_units, frame_bytes(9)) + good[2])
    return path, bad_at


CASES = {"year-2286": (YEAR_2286_US, None), "flipped-bit": (FLIPPED_BIT_NS, 9)}


@pytest.mark.parametrize("case", CASES)
def test_frame_and_batch_readers_stop_at_the_block(tmp_path: Path, case: str) -> None:
    path, bad_at = _trace(tmp_path, *CASES[case])
    with open_trace(path) as reader:
        frames = list(reader)
    assert len(frames) == 2
    assert reader.problem is not None
    assert f"byte {bad_at}" in reader.problem and "timestamp" in reader.problem
    batches = list(read_batches(path))
    assert sum(len(b) for b in batches) == 2
    assert batches[-1].problem == reader.problem
    assert all(abs(int(t)) <= INT64_MAX for b in batches for t in b.ts_ns)


def test_inspect_and_replay_agree(tmp_path: Path) -> None:
    path, bad_at = _trace(tmp_path, YEAR_2286_US)
    inspected = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert inspected.exit_code == 0, inspected.output
    summary = json.loads(inspected.stdout)
    assert summary["packets"] == 2 and f"byte {bad_at}" in summary["problem"]
    config = tmp_path / "host.toml"
    config.write_text('[[machine]]\nname = "m"\naddresses = ["10.0.0.0/24"]\n'
                      'services = ["count"]\n')
    report = tmp_path / "report.json"
    replayed = CliRunner().invoke(main, ["replay", str(path), "--config", str(config),
                                         "--report", str(report), "-q"])
    assert replayed.exit_code == 0, replayed.output
    assert replayed.exception is None
    trace = json.loads(report.read_text())["trace"]
    assert trace["packets"] == 2 and trace["problem"] == summary["problem"]
