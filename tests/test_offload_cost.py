"""What makes an offload cheaper changes nothing it does.

The event text of a flow formats IPv6 without ipaddress's objects, and writes what ipaddress
writes; the VNIC's decision of a packet whose key it just found no flow for does not look the
key up again, and a run is the same run, result for result and event for event, as one that
looks again; the entries handed back ahead of their time (`Vnic.deferred`) expire exactly as a
scan of all of them says, whatever the order of deferrals, deliveries and syncs, and a sync that
passes those not due is the run that waits for them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift import channel as ch
from flowshift.config import parse_config
from flowshift.entry import Flow, Tier
from flowshift.flow import FlowKey, format_addr
from flowshift.gen import TraceSpec, generate
from flowshift.host import Host
from flowshift.services.chain import Chain
from flowshift.tiers.vnic import Vnic, VnicChain
from flowshift.verdict import ReturnReason
from hosttools import FIREWALL_HOST, GATEWAY_HOST, run

MS = 1_000_000


# -- event text ----------------------------------------------------------------------------


@st.composite
def ipv6(draw: st.DrawFn) -> bytes:
    """16 bytes with runs of zero groups where RFC 5952 compresses, and the special prefixes
    (::ffff:0:0/96, ::/96) where inet_ntop could write a dotted quad."""
    groups = draw(st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0x1234, 0xABCD]) | st.integers(
        0, 0xFFFF), min_size=8, max_size=8))
    prefix = draw(st.sampled_from([None, [0] * 5 + [0xFFFF], [0] * 6, [0] * 5 + [0]]))
    if prefix is not None:
        groups[:6] = prefix
    return b"".join(g.to_bytes(2, "big") for g in groups)


@settings(max_examples=2000, deadline=None)
@given(addr=ipv6() | st.binary(min_size=16, max_size=16) | st.binary(min_size=4, max_size=4))
def test_an_address_is_written_as_ipaddress_writes_it(addr: bytes) -> None:
    assert format_addr(addr) == str(ipaddress.ip_address(addr))


# -- the VNIC's decisions ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_trace(tmp_path_factory) -> tuple[Path, object]:
    cfg = parse_config(GATEWAY_HOST, "test")
    path = tmp_path_factory.mktemp("cost") / "gw.pcap"
    generate(TraceSpec(flows=150, duration_s=6.0, seed=9, elephants=2, udp_share=0.2,
                       icmp_share=0.05, gateway=cfg, ingress_share=0.3), path)
    return path, cfg


def _facts(r) -> tuple:
    s = r.host.stats
    return (r.outputs(), [(x.tier, x.machine, x.direction, x.index) for x in r.results],
            r.dumps, s.events, s.offloads_to_pnic, s.refused, s.returned, s.tier_packets,
            s.rejected_messages, s.peak_first_cache, s.peak_second_cache, s.held_packets)


@pytest.mark.parametrize("kw", [
    {"policy": "elephant"},
    {"policy": "always", "latency": 50 * MS, "rows": 256},
    {"policy": "always", "latency": 1 * MS, "capacity": 4, "rows": 512},
    {"random_seed": 3, "p": 0.5, "latency": 1 * MS, "batch": 3},
    {"policy": "always", "engine": "reference", "rows": 256, "dump_at": 900},
    {"policy": "elephant", "crash_at": 1500, "rows": 300},
])
def test_a_missed_key_looked_up_once_is_the_run_that_looks_again(gateway_trace, monkeypatch,
                                                                   kw):
    trace, cfg = gateway_trace
    spared = []
    lookup = VnicChain.lookup

    def counted(self, key, now):
        if self.missed is not None and key == self.missed:
            spared.append(key)
        return lookup(self, key, now)
    monkeypatch.setattr(VnicChain, "lookup", counted)
    once = run(trace, cfg, **kw)
    assert spared  # the VNIC decided packets of new flows without asking twice
    monkeypatch.setattr(VnicChain, "lookup", Chain.lookup)  # every lookup asks the table
    again = run(trace, cfg, **kw)
    assert _facts(once) == _facts(again)


def _sync_at_every_deferral(self, now: int) -> bool:
    """Vnic.sync as it was: any entry handed back ahead, due or not, makes it wait."""
    if self.synced_at == now and not self.batch and not self.outstanding:
        return False
    if not (self.batch or self.outstanding or self.deferred) and not (
            self.alive and self.healthy and self.pnic_flows and not self.expiry_floor > now):
        self.synced_at = now
        return False
    self.drain(now)
    self._expire_deferred(now)
    if self.alive and self.healthy and self.pnic_flows and not self.expiry_floor > now:
        self.sync_seq += 1
        self._send(ch.Tick(now, self.sync_seq), at=now)
        self.expiry_floor = (1 << 63) - 1
        self.drain(now)
    self.synced_at = now
    return True


# entries are handed back ahead where the PNIC's passes run ahead of software: with a PNIC in
# its own process or a latency (in this process at latency 0, the fast path runs its rows)
@pytest.mark.parametrize("kw", [
    {"policy": "always", "rows": 256, "pnic": "process"},
    {"policy": "elephant", "latency": 1 * MS, "rows": 4096},
    {"policy": "always", "latency": 50 * MS, "rows": 512, "capacity": 5},
    {"policy": "always", "rows": 256, "withdraw_at": 1200, "pnic": "process"},
])
def test_a_sync_that_skips_entries_not_due_is_the_run_that_waits(gateway_trace, monkeypatch,
                                                                  kw):
    trace, cfg = gateway_trace
    waited = []
    sync = Vnic.sync

    def counted(self, now):
        deferred = bool(self.deferred)
        done = sync(self, now)
        waited.append((deferred, done))
        return done
    monkeypatch.setattr(Vnic, "sync", counted)
    skipping = run(trace, cfg, **kw)
    assert (True, False) in waited  # entries were handed back ahead, and a sync passed them
    monkeypatch.setattr(Vnic, "sync", _sync_at_every_deferral)
    assert _facts(skipping) == _facts(run(trace, cfg, **kw))


# -- entries handed back ahead of their time -----------------------------------------------


def _entry(i: int, expires: int) -> bytes:
    key = FlowKey(4, 17, 0, b"\x0a\x00\x00\x02", b"\xc6\x33\x64\x01", 1000 + i, 53)
    return Flow(key=key, xlat=key, machine=0, chain=1, expires=expires,
                owner=Tier.PNIC).to_bytes()


step = st.one_of(
    st.tuples(st.just("defer"), st.integers(0, 100), st.integers(0, 100)),  # at, expires
    st.tuples(st.just("deliver"), st.integers(0, 100), st.just(0)),
    st.tuples(st.just("expire"), st.integers(0, 100), st.just(0)))


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step, max_size=40))
def test_deferred_entries_expire_as_a_scan_of_all_of_them_says(steps) -> None:
    host = Host(parse_config(FIREWALL_HOST, "test"), policy="always")
    vnic = host.vnic
    seen: list[tuple[bytes, int, int]] = []  # (entry, reason, at) as the VNIC applies them
    vnic._on_message = lambda msg, at: seen.append((msg.entry, msg.reason, at))  # type: ignore[method-assign]
    model: list[tuple[int, int, bytes, int]] = []  # (at, order, entry, expires)
    expected: list[tuple[bytes, int, int]] = []
    try:
        for n, (what, t, expires) in enumerate(steps):
            if what == "defer":
                raw = _entry(n, expires)
                vnic.defer([ch.Return(raw, ReturnReason.CLOSED, t)], 0)
                model.append((t, n, raw, expires))
            elif what == "deliver":
                vnic.deliver(t)
                due = sorted(m for m in model if m[0] <= t)
                expected += [(raw, ReturnReason.CLOSED, at) for at, _, raw, _ in due]
                model = [m for m in model if m[0] > t]
            else:
                vnic._expire_deferred(t)
                dead = sorted(m for m in model if m[3] <= t)
                expected += [(raw, ReturnReason.EXPIRED, t) for _, _, raw, _ in dead]
                model = [m for m in model if m[3] > t]
            assert seen == expected
            assert sorted(d[2].entry for d in vnic.deferred) == sorted(m[2] for m in model)
            assert vnic.deferred_floor <= min((m[3] for m in model), default=vnic.deferred_floor)
    finally:
        host.close()
