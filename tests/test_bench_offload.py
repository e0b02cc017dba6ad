"""bench/bench_offload.py's arithmetic of what an offload costs and saves the replay (the
benchmark itself runs in bench/, not here)."""

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


def test_the_pay_back_is_a_moves_cost_over_a_pnic_packets_saving(bench: ModuleType) -> None:
    # 94 flows offloaded costing 40.9 µs each, bringing 7,704 packets to the PNIC
    short = {"cost_per_offloaded_flow_us": 40.9, "offloaded_flows": 94, "pnic_packets": 7704}
    be = bench.break_even(short, 12.8)
    assert be["packets_to_pay_back"] == pytest.approx(40_900 / 12.8)
    assert be["pnic_packets_per_offloaded_flow"] == pytest.approx(7704 / 94)
    assert be["cost_per_offloaded_flow_us"] == 40.9 and be["saving_per_pnic_packet_ns"] == 12.8
    for nothing in (0.0, -3.0):  # a PNIC packet that saves nothing: no flow pays its move back
        assert bench.break_even(short, nothing)["packets_to_pay_back"] is None


def test_a_pnic_packets_saving_is_nevers_time_less_elephants_per_pnic_packet(
        bench: ModuleType) -> None:
    # 1,000 packets: 1 ms with never, 0.5 ms with elephant, 500 of them at the PNIC
    assert bench.pnic_packet_saving_ns(1000, 1e6, 2e6, 500) == pytest.approx(1000.0)
    assert bench.pnic_packet_saving_ns(1000, 2e6, 1e6, 500) == pytest.approx(-1000.0)
