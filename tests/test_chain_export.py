"""A flow exported mid-stream and imported into a fresh chain continues with identical results."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.config import load_config
from flowshift.entry import Flow, Tier
from flowshift.packet.parse import parse
from flowshift.packet.pcap import open_trace
from flowshift.packet.view import ParseError
from flowshift.services.chain import Chain
from flowshift.tiers.classify import Classifier
from hosttools import REAL

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="shared/corpus/real not present")


@pytest.fixture(scope="module")
def corpus():
    cfg = load_config(REAL / "lb-gateway.toml")
    with open_trace(REAL / "replay_input.pcap") as frames:
        packets = [(f.ts_ns, f.data, f.linktype, f.wire_len) for f in frames]
    return cfg, packets


def _replay(cfg, packets, moves: set[int]) -> list[tuple[int, int, bytes]]:
    """Run the chain; before each packet index in `moves`, move every flow to a fresh chain."""
    classifier = Classifier(cfg.machines)
    chain = Chain(cfg.machines[0], 0, Tier.VNIC)
    out = []
    for i, (ts, data, linktype, wire_len) in enumerate(packets):
        if i in moves:
            fresh = Chain(cfg.machines[0], 0, Tier.VNIC)
            for flow in chain.export_flows():
                fresh.import_flow(Flow.from_bytes(flow.to_bytes()))
            chain = fresh
        pkt = parse(bytearray(data), linktype, wire_len)
        if pkt.error not in (ParseError.OK, ParseError.UNSUPPORTED_PROTOCOL):
            continue
        m, direction = classifier.classify(pkt)
        if m < 0:
            continue
        o = chain.process(pkt, direction, ts)
        out.append((int(o.verdict), int(o.reason), bytes(pkt.data)))
    return out


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(moves=st.sets(st.integers(0, 22478), min_size=1, max_size=40))
def test_export_import_at_random_points(corpus, moves):
    cfg, packets = corpus
    baseline = _replay(cfg, packets, set())
    assert _replay(cfg, packets, moves) == baseline
