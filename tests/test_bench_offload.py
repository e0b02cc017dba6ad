"""bench/bench_offload.py's comparison of short connections, and what it says an offload costs
and saves the replay, on a small trace: a benchmark that breaks is found here, not on the day
its figures are wanted."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # the benchmarks import their `common` module
    import bench_offload

    return bench_offload


def test_short_connections_give_every_figure_the_table_prints(bench: ModuleType,
                                                              tmp_path: Path) -> None:
    cfg = bench.load_config(bench.CONFIG)
    out = bench.short_connections(tmp_path, cfg, 60, 2.0)
    packets = out["trace"]["packets"]
    for mode in ("never", "elephant", "never_reference"):
        assert len(out[mode]["runs"]) == 5 and out[mode]["packets_per_second"] > 0
        assert sum(t["packets"] for t in out[mode]["tiers"].values()) == packets
    assert out["offloaded_flows"] > 0 and 0 < out["pnic_packets"] < packets
    assert out["never"]["tiers"]["pnic"]["packets"] == 0
    seconds = [packets / out[m]["packets_per_second"] for m in ("never", "elephant")]
    assert out["cost_per_offloaded_flow_us"] == pytest.approx(
        (seconds[1] - seconds[0]) / out["offloaded_flows"] * 1e6)
    be = bench.break_even(out, 10.0)
    assert be["packets_to_pay_back"] == pytest.approx(out["cost_per_offloaded_flow_us"] * 100)
    assert be["pnic_packets_per_offloaded_flow"] == out["pnic_packets"] / out["offloaded_flows"]
    assert bench.break_even(out, 0.0)["packets_to_pay_back"] is None  # nothing saved: never


def test_a_pnic_packets_saving_is_nevers_time_less_elephants_per_pnic_packet(
        bench: ModuleType) -> None:
    # 1,000 packets: 1 ms with never, 0.5 ms with elephant, 500 of them at the PNIC
    assert bench.pnic_packet_saving_ns(1000, 1e6, 2e6, 500) == pytest.approx(1000.0)
    assert bench.pnic_packet_saving_ns(1000, 2e6, 1e6, 500) == pytest.approx(-1000.0)
