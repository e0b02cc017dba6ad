"""`flowshift sweep`: every row is the single replay with its values, the table and plots are
written all or nothing, and bad --vary keys or values are one-line errors (exit 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flowshift import cluster
from flowshift.cli import main
from flowshift.config import ConfigError, load_config, to_dict
from flowshift.replay import run_replay
from flowshift.sweep import SweepError, configure, measures, parse_vary, run_sweep, set_key

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
CONFIG = REAL / "lb-gateway.toml"


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 6,000 packets of the real capture: enough for offloads, quick to replay."""
    from flowshift.packet.batch import read_batches
    from flowshift.packet.pcap import PcapWriter

    path = tmp_path_factory.mktemp("sweep") / "head.pcap"
    batch = next(read_batches(REAL / "replay_input.pcap", 6000))
    with PcapWriter(path, linktype=1) as w:
        w.write_batch(batch.ts_ns, batch.buf, batch.offset, batch.caplen, batch.wire_len)
    return path


def test_vary_parsing_and_key_paths() -> None:
    v = parse_vary("pnic.capacity=1,8,64")
    assert v.key == "pnic.capacity" and v.values == (1, 8, 64)
    assert parse_vary("offload.idle_timeout=0.5,30").values == (0.5, 30)
    assert parse_vary("offload.policy=never,elephant").values == ("never", "elephant")
    data = to_dict(load_config(CONFIG))
    set_key(data, "machine[0].nat.snat[1].ports", "2000-2001")
    assert data["machine"][0]["nat"]["snat"][1]["ports"] == "2000-2001"
    for bad in ("pnic.capacity", "=1", "pnic..capacity=1", "pnic.capacity=1,,2"):
        with pytest.raises(SweepError):
            parse_vary(bad)
    with pytest.raises(SweepError, match=r"machine has 1 item, no \[2\]"):
        set_key(data, "machine[2].name", "x")
    with pytest.raises(ConfigError, match=r"pnic\.capacty: unknown key"):
        configure(to_dict(load_config(CONFIG)), {"pnic.capacty": 4}, "host.toml")


def test_grid_rows_equal_single_replays(tmp_path: Path, small_trace: Path) -> None:
    cfg = load_config(CONFIG)
    varies = [parse_vary("pnic.capacity=0,1,64"), parse_vary("offload.elephant_packets=4,16,64")]
    with cluster.open_executor(2, kind="processes") as ex:
        rows = run_sweep([small_trace], cfg, varies, tmp_path / "out", executor=ex,
                         progress=False, source=str(CONFIG))
    assert len(rows) == 9
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "sweep-offload.elephant_packets.png", "sweep-pnic.capacity.png", "sweep.csv",
        "sweep.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    saved = json.loads((out / "sweep.json").read_text())
    assert len(table) == len(saved["rows"]) == 9
    base = to_dict(cfg)
    seen = set()
    for row, full in zip(table, saved["rows"], strict=True):
        values = {"pnic.capacity": int(row["pnic.capacity"]),
                  "offload.elephant_packets": int(row["offload.elephant_packets"])}
        seen.add(tuple(values.values()))
        alone = measures(run_replay(small_trace, configure(base, values, "x"), progress=False))
        for key, value in alone.items():
            if key != "wall_seconds":
                assert full[key] == value, (values, key)
                assert row[key] == str(value)
    assert len(seen) == 9
    capacity_zero = [r for r in saved["rows"] if r["pnic.capacity"] == 0]
    assert all(r["offloads"] == 0 and r["refused_full"] > 0 for r in capacity_zero)
    assert any(r["offloads"] > 0 for r in saved["rows"])


def test_offload_and_crash_dimensions(tmp_path: Path, small_trace: Path) -> None:
    with cluster.open_executor(1, kind="processes") as ex:
        rows = run_sweep([small_trace], load_config(CONFIG), [], tmp_path / "o", executor=ex,
                         offloads=["never", "always"], crash_at=[0.04], progress=False)
    assert [(r["offload"], r["crash_at"]) for r in rows] == [("never", 0.04), ("always", 0.04)]
    assert rows[0]["offloads"] == 0 and rows[1]["returned_crash"] == 1
    assert rows[1]["refused_unhealthy"] > 0
    assert (tmp_path / "o" / "sweep-offload.png").exists()


@pytest.mark.parametrize("vary, message", [
    ("pnic.capacty=1,2", "pnic.capacty: unknown key"),
    ("pnic.capacity=-1,2", "pnic.capacity: -1 out of range"),
    ("offload.policy=sometimes", "offload.policy"),
    ("machine[4].name=x", "machine has 1 item, no [4]"),
    ("nokey", "expected KEY=V1,V2"),
])
def test_bad_vary_is_one_line_exit_2(tmp_path: Path, small_trace: Path, vary: str,
                                     message: str) -> None:
    result = CliRunner().invoke(main, ["sweep", str(small_trace), "--config", str(CONFIG),
                                       "--vary", vary, "--out-dir", str(tmp_path / "x"),
                                       "--executor", "processes"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x").exists()


def test_out_dir_must_be_new_or_empty(tmp_path: Path, small_trace: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["sweep", str(small_trace), "--config", str(CONFIG),
                                       "--vary", "pnic.capacity=1", "--out-dir",
                                       str(tmp_path / "full")])
    assert result.exit_code == 2 and "not an empty directory" in result.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_sweep_on_a_dask_scheduler(tmp_path: Path, small_trace: Path) -> None:
    distributed = pytest.importorskip("distributed")
    local: Any = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                          dashboard_address=":0", silence_logs=40)
    try:
        result = CliRunner().invoke(main, [
            "sweep", str(small_trace), "--config", str(CONFIG), "--vary",
            "offload.idle_timeout=0.5,30", "--out-dir", str(tmp_path / "d"), "--scheduler",
            local.scheduler_address, "-q"])
    finally:
        local.close()
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "d" / "sweep.json").read_text())
    assert saved["executor"]["kind"] == "dask" and len(saved["rows"]) == 2
