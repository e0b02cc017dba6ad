"""Offload transparency: whatever the offload schedule, the host's output is the same.

Every run is compared packet for packet (verdict, reason, bytes) with the run that never
offloads, over the real captures of the corpus and over generated traces.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.config import load_config, parse_config
from flowshift.gen import TraceSpec, generate
from flowshift.host import Host
from flowshift.tiers.link import ProcessLink
from flowshift.verdict import Verdict
from hosttools import FIREWALL_HOST, REAL, run

# trace time before the PNIC's answers take effect: none, 1 ms, 50 ms
LATENCY = st.sampled_from([0, 1_000_000, 50_000_000])
needs_corpus = pytest.mark.skipif(not REAL.is_dir(), reason="shared/corpus/real not present")

@pytest.fixture(scope="module")
def real():
    cfg = load_config(REAL / "lb-gateway.toml")
    return REAL / "replay_input.pcap", cfg, run(REAL / "replay_input.pcap", cfg, policy="never")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "trace.pcap"
    generate(TraceSpec(flows=300, duration_s=20.0, seed=7, elephants=4, udp_share=0.2,
                       ipv6_share=0.3), path)
    cfg = parse_config(FIREWALL_HOST, "test")
    return path, cfg, run(path, cfg, policy="never")


def _same(a, b) -> None:
    assert len(a.results) == len(b.results)
    for x, y in zip(a.outputs(), b.outputs(), strict=True):
        assert x == y


@needs_corpus
@pytest.mark.parametrize("policy", ["always", "elephant"])
def test_real_capture_policies(real, policy):
    trace, cfg, never = real
    offloaded = run(trace, cfg, policy=policy)
    _same(never, offloaded)
    assert offloaded.host.stats.offloads_to_pnic > 0
    assert offloaded.host.stats.tier_packets["pnic"] > 0


@needs_corpus
def test_real_capture_process_pnic(real):
    trace, cfg, never = real
    offloaded = run(trace, cfg, policy="always", pnic="process")
    _same(never, offloaded)
    assert offloaded.host.stats.tier_packets["pnic"] > 0


@needs_corpus
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16), p=st.floats(0.05, 1.0), latency=LATENCY,
       batch=st.sampled_from([1, 3, 16, 256]), capacity=st.sampled_from([1, 4, 4096]))
def test_real_capture_random_schedules(real, seed, p, latency, batch, capacity):
    trace, cfg, never = real
    offloaded = run(trace, cfg, random_seed=seed, p=p, latency=latency, batch=batch,
                    capacity=capacity)
    _same(never, offloaded)


@needs_corpus
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.integers(0, 22000), latency=LATENCY)
def test_real_capture_graceful_withdrawal(real, at, latency):
    trace, cfg, never = real
    offloaded = run(trace, cfg, policy="always", latency=latency, withdraw_at=at)
    _same(never, offloaded)


@needs_corpus
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.integers(0, 22000))
def test_real_capture_crash_keeps_connections(real, at):
    trace, cfg, never = real
    crashed = run(trace, cfg, policy="always", crash_at=at)
    for x, y in zip(never.results, crashed.results, strict=True):
        if x.verdict == Verdict.FORWARD:
            assert y.verdict == Verdict.FORWARD, (x, y)
            assert y.data == x.data


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16), p=st.floats(0.05, 1.0), latency=LATENCY,
       batch=st.sampled_from([1, 5, 64]), capacity=st.sampled_from([2, 16, 64]))
def test_generated_random_schedules(generated, seed, p, latency, batch, capacity):
    trace, cfg, never = generated
    offloaded = run(trace, cfg, random_seed=seed, p=p, latency=latency, batch=batch,
                    capacity=capacity)
    _same(never, offloaded)


def test_generated_elephant_policy_moves_flows(generated):
    trace, cfg, never = generated
    offloaded = run(trace, cfg)
    _same(never, offloaded)
    s = offloaded.host.stats
    assert s.offloads_to_pnic > 0
    assert sum(s.returned.values()) > 0
    assert s.peak_second_cache <= 64


def test_generated_withdraw_and_crash(generated: tuple[Path, object, object]):
    trace, cfg, never = generated
    n = len(never.results)
    _same(never, run(trace, cfg, policy="always", withdraw_at=n // 2))
    crashed = run(trace, cfg, policy="always", crash_at=n // 3)
    for x, y in zip(never.results, crashed.results, strict=True):
        if x.verdict == Verdict.FORWARD:
            assert y.verdict == Verdict.FORWARD


# -- the replay's own path: batches that meet the PNIC first ---------------------------------


@needs_corpus
@pytest.mark.parametrize(("policy", "rows"), [("always", 64), ("elephant", 1000),
                                              ("always", 65536), ("never", 5000)])
def test_real_capture_batched(real, policy, rows, monkeypatch):
    in_pass = []
    ran = Host._pnic_ran

    def counted_in_pass(self, first):
        in_pass.append(first)
        return ran(self, first)

    monkeypatch.setattr(Host, "_pnic_ran", counted_in_pass)
    trace, cfg, never = real
    batched = run(trace, cfg, policy=policy, rows=rows)
    _same(never, batched)
    if policy != "never":
        assert batched.host.stats.tier_packets["pnic"] > 0
        assert in_pass  # the fast path's passes ran the PNIC's rows (the PNIC in this process)


@needs_corpus
@pytest.mark.parametrize("rows", [500, 65536])
def test_real_capture_batched_process_pnic(real, rows, monkeypatch):
    passes = []
    original = ProcessLink.run_batch

    def counted(self, res, select, now):
        passes.append(int(select.sum()))
        return original(self, res, select, now)

    monkeypatch.setattr(ProcessLink, "run_batch", counted)
    trace, cfg, never = real
    batched = run(trace, cfg, policy="always", pnic="process", rows=rows)
    _same(never, batched)
    assert batched.host.stats.tier_packets["pnic"] > 0
    assert passes  # the PNIC in its own process met batches before software did


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16), p=st.floats(0.05, 1.0), rows=st.sampled_from([7, 300, 5000]),
       capacity=st.sampled_from([2, 16, 64]))
def test_generated_batched_random_schedules(generated, seed, p, rows, capacity):
    trace, cfg, never = generated
    _same(never, run(trace, cfg, random_seed=seed, p=p, rows=rows, capacity=capacity))


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(at=st.integers(0, 20000), rows=st.sampled_from([100, 4096]))
def test_generated_batched_withdraw_and_crash(generated, at, rows):
    trace, cfg, never = generated
    at = at % len(never.results)
    _same(never, run(trace, cfg, policy="always", rows=rows, withdraw_at=at))
    crashed = run(trace, cfg, policy="always", rows=rows, crash_at=at)
    for x, y in zip(never.results, crashed.results, strict=True):
        if x.verdict == Verdict.FORWARD:
            assert y.verdict == Verdict.FORWARD
