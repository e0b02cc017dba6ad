"""What a replay tells on the terminal and in the plot: warnings on stderr, one line each and
never wrapped; scheduled actions the trace ended before; the plot's window, its whole-number
occupancy axis and its return count, which is the summary's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from flowshift import plot as plot_module
from flowshift.cli import main
from flowshift.commands.demo import build_trace, demo_config_text
from flowshift.commands.replay import parse_window
from flowshift.config import load_config
from flowshift.packet.build import udp_frame
from flowshift.packet.pcap import PcapWriter
from flowshift.replay import run_replay

BLOCKED = udp_frame(src=bytes([10, 0, 0, 9]), dst=bytes([198, 51, 100, 9]), sport=40000,
                    dport=5004, payload=bytes(40))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("messages")
    config = d / "demo.toml"
    config.write_text(demo_config_text(), encoding="utf-8")
    trace = d / "trace.pcap"
    build_trace(trace, load_config(config), scale=0.03)
    return trace, config


def _cut_trace(tmp_path: Path) -> Path:
    """Two records, the second cut short: a big byte offset in the problem."""
    cut = tmp_path / "cut.pcap"
    with PcapWriter(cut) as w:
        w.write(10**18, BLOCKED)
        w.write(10**18 + 1, BLOCKED)
    cut.write_bytes(cut.read_bytes()[:-10])
    return cut


@pytest.mark.parametrize("quiet", [False, True])
def test_truncated_trace_warning_is_one_stderr_line(demo: tuple[Path, Path], tmp_path: Path,
                                                    quiet: bool) -> None:
    _, config = demo
    args = ["replay", str(_cut_trace(tmp_path)), "--config", str(config)]
    result = CliRunner().invoke(main, args + (["-q"] if quiet else []),
                                env={"COLUMNS": "40"}, terminal_width=40)
    assert result.exit_code == 0, result.output
    assert "ended early" not in result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith("Warning: trace ended early: truncated record at byte ")
    assert line.endswith("left")  # the whole problem, on one line


def test_actions_after_the_end_are_reported(demo: tuple[Path, Path], tmp_path: Path) -> None:
    trace, config = demo
    result = CliRunner().invoke(main, [
        "replay", str(trace), "--config", str(config), "--pnic-crash-at", "500",
        "--pnic-withdraw-at", "600", "--report", str(tmp_path / "r.json"), "-q"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Warning: --pnic-crash-at 500 skipped: the trace ended at ")
    assert lines[1].startswith("Warning: --pnic-withdraw-at 600 skipped")
    schedule = json.loads((tmp_path / "r.json").read_text())["schedule"]
    assert [e.get("skipped") is not None for e in schedule] == [True, True]


@pytest.mark.parametrize(("text", "window"), [
    ("1:2.5", (1.0, 2.5)), ("3:", (3.0, None)), (":4", (None, 4.0)), ("0:1e-3", (0.0, 0.001))])
def test_plot_window_values(text: str, window: tuple[float | None, float | None]) -> None:
    assert parse_window(text) == window


@given(st.floats(0, 1e6), st.floats(0, 1e6))
def test_plot_window_reads_any_pair_of_times(a: float, b: float) -> None:
    text = f"{a!r}:{b!r}"
    if a < b:
        assert parse_window(text) == (a, b)
    else:
        with pytest.raises(ValueError):
            parse_window(text)


@pytest.mark.parametrize("text", ["2", "a:b", "3:1", "-1:2", "1:inf", "2:2"])
def test_bad_plot_window_exits_2(demo: tuple[Path, Path], tmp_path: Path, text: str) -> None:
    trace, config = demo
    result = CliRunner().invoke(main, ["replay", str(trace), "--config", str(config), "--plot",
                                       str(tmp_path / "p.png"), "--plot-window", text, "-q"])
    assert result.exit_code == 2
    assert "--plot-window" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_plot_window_needs_a_plot(demo: tuple[Path, Path]) -> None:
    trace, config = demo
    result = CliRunner().invoke(main, ["replay", str(trace), "--config", str(config),
                                       "--plot-window", "1:2", "-q"])
    assert result.exit_code == 2 and "--plot-window needs --plot" in result.stderr


def test_activity_window_zooms_on_a_long_empty_tail() -> None:
    times = np.arange(100) * 0.1
    busy = np.zeros(100)
    busy[:3] = 1000.0  # everything in the first 0.3 s of 10 s
    busy[90] = 1.0  # a straggler
    lo, hi = plot_module.activity_window(times, {"vnic": busy}, 0.1, 10.0, []) or (None, None)
    assert lo == 0.0 and hi is not None and hi < 0.5
    # a crash late in the trace stays in view
    zoom = plot_module.activity_window(times, {"vnic": busy}, 0.1, 10.0, [4.0])
    assert zoom is not None and zoom[1] >= 4.0
    # traffic spread over the trace: the whole trace
    assert plot_module.activity_window(times, {"vnic": np.ones(100)}, 0.1, 10.0, []) is None


def _figure_of(monkeypatch: pytest.MonkeyPatch, **replay: Any) -> tuple[Any, dict[str, Any]]:
    figures: list[Any] = []
    real_close = plt.close
    monkeypatch.setattr(plot_module.plt, "close",
                        lambda fig: (figures.append(fig), real_close(fig)))
    report = run_replay(progress=False, **replay)
    [fig] = figures
    return fig, report


def test_plot_counts_crash_returns_and_ticks_whole_entries(
    demo: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace, config = demo
    fig, report = _figure_of(monkeypatch, trace=trace, config=config, crash_at=1.5,
                             plot=tmp_path / "p.png")
    returned = report["offloads"]["returned"]
    assert returned.get("crash", 0) > 0, "the test needs flows on the PNIC at the crash"
    _, ax_cache, ax_events = fig.axes
    labels = [t.get_text() for t in ax_events.get_legend().get_texts()]
    assert f"returns ({sum(returned.values()):,})" in labels
    ticks = ax_cache.get_yticks()
    assert all(float(t).is_integer() for t in ticks)


def test_plot_window_sets_the_axis(demo: tuple[Path, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    trace, config = demo
    fig, report = _figure_of(monkeypatch, trace=trace, config=config, plot=tmp_path / "p.png",
                             plot_window=(2.0, 5.0))
    assert fig.axes[2].get_xlim() == (2.0, 5.0)
    assert "showing 2-5 s" in fig.axes[2].get_xlabel()
    assert report["options"]["plot_window"] == [2.0, 5.0]


def test_every_report_field_is_documented(demo: tuple[Path, Path]) -> None:
    """docs/replay.md names every key of the report, nested ones included (counts keyed by
    reason, machine or event kind are data, not fields)."""
    trace, config = demo
    report = run_replay(trace, config, crash_at=1.5, progress=False)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "replay.md").read_text()
    data_keyed = {"config", "options", "machines", "refused", "returned", "rejected_messages",
                  "drops", "unparsed", "bypass_reasons", "events", "outputs", "linktypes"}

    def keys(d: dict[str, Any]) -> set[str]:
        found = set(d)
        for k, v in d.items():
            if isinstance(v, dict) and k not in data_keyed:
                found |= keys(v)
            if isinstance(v, list) and v and isinstance(v[0], dict):
                found |= set().union(*(keys(x) for x in v))
        return found

    missing = sorted(k for k in keys(report) if f"`{k}`" not in doc)
    assert not missing, f"report fields not in docs/replay.md: {missing}"
