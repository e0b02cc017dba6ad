"""The compiled PNIC engine against the reference: bit for bit on every packet it processes.

The reference is tiers/pnic.py's data path: parse, look the key up in the second cache, return
the entry on SYN/FIN/RST or expiry, else services/chain.py `process_flow`. `Reference` below
runs it over Flow objects kept beside the engine's slots. For every packet the engine
processes, verdict, reason, rewritten bytes and the resulting entry must equal the reference's;
a packet it punts must be untouched, and a returned entry must be the exact entry, returned
only for a reason the reference returns too or for a packet kind the engine leaves to software.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.config import load_config, parse_config
from flowshift.conntrack_types import DEFAULT_KNOBS, Knobs
from flowshift.entry import Flow, Status
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.gen import TraceSpec, generate, parse_networks
from flowshift.host import Classifier
from flowshift.offload import established
from flowshift.packet.build import icmp_echo_frame, tcp_frame, tcp_options, udp_frame
from flowshift.packet.parse import parse
from flowshift.packet.pcap import open_trace
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ParseError
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.chain import Chain, forward_hop, process_flow
from flowshift.services.conntrack_tcp import TcpConn, TcpDir
from flowshift.tiers.pnic_engine import PnicEngine
from flowshift.verdict import PuntReason, Reason
from hosttools import GATEWAY_HOST, REAL

needs_corpus = pytest.mark.skipif(not REAL.is_dir(), reason="shared/corpus/real not present")

S = 1_000_000_000
_LIFE = TCP_SYN | TCP_FIN | TCP_RST


# a machine for hand-made flows: inside 10.0.0.0/24 and fd00::/64, NAT'ed to 192.0.2.1/::1
LAB = {"machine": [{"name": "lab", "addresses": ["10.0.0.0/24", "fd00::/64"],
                    "public": ["192.0.2.1", "2001:db8::1"], "services": ["count"]}]}


# -- the reference and the differential driver ------------------------------------------------

def _returned_anyway(pkt) -> bool:
    """Packets the engine may hand back although the reference PNIC would process them."""
    v6_ext = pkt.family == 6 and pkt.l4 - pkt.l3 != 40
    icmp_other = pkt.proto in (PROTO_ICMP, PROTO_ICMPV6) and pkt.icmp_id < 0
    return pkt.frag or v6_ext or icmp_other


@dataclass
class Reference:
    """tiers/pnic.py's second cache and data path over Flow objects, by engine slot."""

    flows: dict[int, Flow] = field(default_factory=dict)
    index: dict[FlowKey, tuple[int, int]] = field(default_factory=dict)

    def add(self, slot: int, flow: Flow) -> None:
        self.flows[slot] = flow
        self.index[flow.key] = (slot, 0)
        self.index[flow.reply_key] = (slot, 1)

    def drop(self, slot: int) -> Flow:
        flow = self.flows.pop(slot)
        del self.index[flow.key], self.index[flow.reply_key]
        return flow


@dataclass
class Tally:
    processed: int = 0
    missed: int = 0
    returned: Counter = field(default_factory=Counter)


def _arrays(frames: list[tuple[int, bytes, int, int]]):
    """(ts, captured bytes, linktype, wire_len) frames as the engine's batch arrays."""
    caplen = np.array([len(f[1]) for f in frames], np.uint32)
    offset = np.zeros(len(frames), np.int64)
    np.cumsum(caplen[:-1], out=offset[1:])
    buf = np.frombuffer(b"".join(f[1] for f in frames), np.uint8).copy()
    return (buf, offset, caplen, np.array([f[3] for f in frames], np.uint32),
            np.array([f[2] for f in frames], np.uint16), np.array([f[0] for f in frames], np.int64))


def run_both(engine: PnicEngine, ref: Reference, classifier: Classifier,
             frames: list[tuple[int, bytes, int, int]], tally: Tally,
             knobs: Sequence[Knobs] = (), routing: Sequence[bool] = ()) -> None:
    """One batch through the engine, then packet by packet through the reference; compare.
    knobs: each machine's conntrack table, as the engine was given them (default: Linux's)."""
    buf, offset, caplen, wire, linktype, ts = _arrays(frames)
    n = len(frames)
    verdict = np.zeros(n, np.int8)
    reason = np.zeros(n, np.int8)
    returned = np.zeros(n, np.int32)
    done = engine.process(buf, offset, caplen, wire, linktype, ts, np.ones(n, bool), verdict,
                          reason, returned)
    assert done == int((verdict >= 0).sum())
    for i, (now, data, lt, wire_len) in enumerate(frames):
        out_bytes = buf[offset[i]:offset[i] + caplen[i]].tobytes()
        pkt = parse(bytearray(data), lt, wire_len)
        hit = None
        if pkt.error == ParseError.OK and pkt.inner is None and not pkt.frag_offset:
            m, _ = classifier.classify(pkt)
            hit = ref.index.get(pkt.key(m)) if m >= 0 else None
        if verdict[i] < 0:
            assert out_bytes == data, f"packet {i}: punted but rewritten"
            slot = int(returned[i])
            why = PuntReason(int(reason[i]))
            if slot < 0:
                assert hit is None, f"packet {i}: the engine missed a cached flow"
                looked_up = pkt.error == ParseError.OK and pkt.inner is None \
                    and not pkt.frag_offset
                assert why == (PuntReason.MISS if looked_up else PuntReason.UNSUPPORTED), i
                tally.missed += 1
                continue
            assert hit is not None and hit[0] == slot, f"packet {i}: returned the wrong entry"
            flow = ref.drop(slot)
            assert engine.take_returned(slot) == flow.to_bytes(), f"packet {i}: entry differs"
            if flow.expires <= now:
                assert why == PuntReason.EXPIRED, i
                tally.returned["expired"] += 1
            elif flow.key.proto == PROTO_TCP and pkt.flags & _LIFE:
                assert why == PuntReason.LIFE, i
                tally.returned["closed"] += 1
            else:
                assert _returned_anyway(pkt), f"packet {i}: returned for no allowed reason"
                assert why == PuntReason.UNSUPPORTED, i
                tally.returned["unhandled"] += 1
            continue
        assert hit is not None, f"packet {i}: processed without a cached flow"
        slot, fdir = hit
        flow = ref.flows[slot]
        assert flow.expires > now and not (flow.key.proto == PROTO_TCP and pkt.flags & _LIFE)
        assert not _returned_anyway(pkt)
        out = process_flow(pkt, flow, fdir, now,
                           knobs[flow.machine] if knobs else DEFAULT_KNOBS)
        assert out is not None
        if routing and routing[flow.machine]:
            out = forward_hop(pkt, out)
        assert (int(verdict[i]), int(reason[i])) == (int(out.verdict), int(out.reason)), i
        assert out_bytes == bytes(pkt.data), f"packet {i}: rewritten bytes differ"
        if n == 1:  # else the engine's entry is already past later packets of the batch
            assert engine.get(slot) == flow.to_bytes(), f"packet {i}: entry differs"
        tally.processed += 1
    assert sorted(ref.flows) == engine.used_slots()
    for slot, flow in ref.flows.items():
        assert engine.get(slot) == flow.to_bytes()


def differential(path, cfg, *, checkpoints: int, seed: int) -> Tally:
    """Replay a trace through the reference chains; at each checkpoint offload every
    established flow to a fresh engine and a reference cache, and feed both the packets up to
    the next checkpoint in random batch sizes."""
    with open_trace(path) as reader:
        frames = [(f.ts_ns, bytes(f.data), f.linktype, f.wire_len) for f in reader]
    classifier = Classifier(cfg.machines)
    chains = [Chain(m, i) for i, m in enumerate(cfg.machines)]
    knobs = [chain.knobs for chain in chains]
    routing = [chain.router for chain in chains]
    rng = random.Random(seed)
    marks = [len(frames) * k // (checkpoints + 1) for k in range(1, checkpoints + 2)]
    tally = Tally()
    pos = 0
    for mark, stop in itertools.pairwise(marks):
        for now, data, lt, wire_len in frames[pos:mark]:
            pkt = parse(bytearray(data), lt, wire_len)
            if pkt.error not in (ParseError.OK, ParseError.UNSUPPORTED_PROTOCOL):
                continue
            m, direction = classifier.classify(pkt)
            if m >= 0:
                chains[m].process(pkt, direction, now)
        pos = mark
        now = frames[mark][0]
        engine = PnicEngine(4096, classifier, knobs, routing)
        ref = Reference()
        for chain in chains:
            for flow in chain.flows:
                if established(flow) and flow.expires > now:
                    slot = engine.insert(flow.to_bytes())
                    assert slot >= 0
                    ref.add(slot, flow.copy())
        i = mark
        while i < stop:
            size = rng.choice([1, 7, 64, 1000])
            run_both(engine, ref, classifier, frames[i:min(i + size, stop)], tally, knobs,
                     routing)
            i += size
    return tally


@needs_corpus
def test_real_capture_matches_reference():
    tally = differential(REAL / "replay_input.pcap", load_config(REAL / "lb-gateway.toml"),
                         checkpoints=4, seed=1)
    assert tally.processed > 1000
    assert tally.returned["closed"] > 0


@pytest.mark.parametrize("attack", ["none", "out-of-window"])
def test_generated_gateway_trace_matches_reference(tmp_path, attack):
    cfg = parse_config(GATEWAY_HOST, "gateway")
    path = tmp_path / "gw.pcap"
    generate(TraceSpec(flows=150, duration_s=8.0, seed=5, elephants=3, ipv6_share=0.3,
                       icmp_share=0.05, udp_share=0.2, attack=attack,
                       clients=parse_networks("10.0.0.0/24,fd00::/64"),
                       servers=parse_networks("198.51.100.0/24,2001:db8::/64"), gateway=cfg),
             path)
    tally = differential(path, cfg, checkpoints=3, seed=2)
    assert tally.processed > 500


# Linux sysctls far from their defaults: flows expire within the trace, retransmissions cap
# early, and (liberal) out-of-window segments pass
SHORT = {"tcp_timeout_established": 3, "tcp_timeout_unacknowledged": 2,
         "tcp_timeout_max_retrans": 2, "tcp_max_retrans": 1, "udp_timeout": 1,
         "udp_timeout_stream": 2, "icmp_timeout": 1, "icmpv6_timeout": 2}


@pytest.mark.parametrize("conntrack", [SHORT, {**SHORT, "tcp_be_liberal": True}],
                         ids=["short", "short-liberal"])
def test_generated_gateway_trace_with_tuned_conntrack_matches_reference(tmp_path, conntrack):
    """Non-default sysctls, on a routing machine (TTL decremented on the PNIC too)."""
    host = {**GATEWAY_HOST, "conntrack": conntrack,
            "machine": [{**m, "forwarding": "router"} for m in GATEWAY_HOST["machine"]]}
    cfg = parse_config(host, "gateway")
    path = tmp_path / "gw.pcap"
    generate(TraceSpec(flows=150, duration_s=8.0, seed=5, elephants=3, ipv6_share=0.3,
                       icmp_share=0.05, udp_share=0.2, attack="out-of-window",
                       clients=parse_networks("10.0.0.0/24,fd00::/64"),
                       servers=parse_networks("198.51.100.0/24,2001:db8::/64"), gateway=cfg),
             path)
    tally = differential(path, cfg, checkpoints=3, seed=2)
    assert tally.processed > 300



def test_generated_firewall_trace_with_vlans_matches_reference(tmp_path):
    cfg = parse_config({"machine": [{
        "name": "vm", "addresses": ["10.0.0.0/24", "fd00::/64"], "services": ["firewall"],
        "firewall": {"default": "drop", "rule": [
            {"action": "allow", "direction": "egress", "proto": "any"}]}}]}, "firewall")
    path = tmp_path / "fw.pcap"
    generate(TraceSpec(flows=120, duration_s=6.0, seed=9, elephants=2, udp_share=0.3,
                       ipv6_share=0.4, vlan=7), path)
    tally = differential(path, cfg, checkpoints=3, seed=3)
    assert tally.processed > 300


# -- hand-made flows: window tracking edge cases ---------------------------------------------

_CLIENT4, _SERVER4, _PUBLIC4 = bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7]), bytes([192, 0, 2, 1])
_CLIENT6 = bytes.fromhex("fd000000000000000000000000000005")
_SERVER6 = bytes.fromhex("20010db8000000000000000000000077")
_PUBLIC6 = bytes.fromhex("20010db8000000000000000000000001")
_NEAR_WRAP = st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 70000, 2**32 - 1),
                       st.integers(0, 70000))
_DIR_FLAGS = st.sets(st.sampled_from([ct_tcp.TCP_FLAG_WINDOW_SCALE, ct_tcp.TCP_FLAG_SACK_PERM,
                                      ct_tcp.TCP_FLAG_BE_LIBERAL, ct_tcp.TCP_FLAG_MAXACK_SET,
                                      ct_tcp.TCP_FLAG_DATA_UNACKNOWLEDGED,
                                      ct_tcp.TCP_FLAG_CLOSE_INIT])).map(sum)


@st.composite
def _tcp_dir(draw, base):
    end = (base + draw(st.integers(-5000, 5000))) % 2**32
    maxwin = draw(st.sampled_from([0, 1, 65535, 2**20, 2**30]) | st.integers(0, 2**31))
    return TcpDir(end=end, maxend=(end + draw(st.integers(-100, 2**20))) % 2**32,
                  maxwin=maxwin, maxack=draw(_NEAR_WRAP), scale=draw(st.integers(0, 14)),
                  flags=draw(_DIR_FLAGS))


@st.composite
def _flow(draw):
    family = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([PROTO_TCP, PROTO_TCP, PROTO_UDP, "icmp"]))
    client, server, public = ((_CLIENT4, _SERVER4, _PUBLIC4) if family == 4
                              else (_CLIENT6, _SERVER6, _PUBLIC6))
    if proto == "icmp":
        proto = PROTO_ICMP if family == 4 else PROTO_ICMPV6
        sport = dport = draw(st.integers(0, 0xFFFF))
    else:
        sport, dport = draw(st.integers(1, 0xFFFF)), draw(st.integers(1, 0xFFFF))
    key = FlowKey(family, proto, 0, client, server, sport, dport)
    xlat = key
    if draw(st.booleans()):  # SNAT to the public address (ICMP: the identifier too)
        nport = draw(st.integers(1024, 0xFFFF))
        xlat = key._replace(src=public, sport=nport, dport=nport if proto != PROTO_TCP
                            and proto != PROTO_UDP else dport)
    tcp = None
    if proto == PROTO_TCP:
        base = draw(_NEAR_WRAP)
        tcp = TcpConn(seen=(draw(_tcp_dir(base)), draw(_tcp_dir(base + 100000))),
                      state=draw(st.sampled_from([3, 3, 3, 1, 2, 4, 5, 6, 7, 8, 9])),
                      last_dir=draw(st.integers(0, 1)), retrans=draw(st.integers(0, 4)),
                      last_index=draw(st.integers(0, 5)), last_seq=base,
                      last_ack=draw(_NEAR_WRAP), last_end=base,
                      last_win=draw(st.sampled_from([0, 1, 65535])),
                      last_flags=draw(st.sampled_from([0, 0x40, 0x80])),
                      seen_reply=draw(st.booleans()))
    status = draw(st.sampled_from([0, Status.SEEN_REPLY, Status.SEEN_REPLY | Status.ASSURED]))
    return Flow(key=key, xlat=xlat, machine=0, chain=8, tcp=tcp,
                status=status | (Status.NAT if xlat != key else 0), created=10 * S,
                last_seen=20 * S, expires=draw(st.sampled_from([21 * S, 100 * S])),
                stream_ts=draw(st.sampled_from([10 * S, 40 * S])), packets=[3, 2],
                bytes=[300, 200])


@st.composite
def _packet(draw, flow: Flow):
    """A packet of `flow` in either direction, with tracking-relevant fields drawn near the
    flow's windows."""
    d = draw(st.integers(0, 1))
    k = flow.key if d == 0 else flow.reply_key
    if flow.key.proto == PROTO_TCP:
        conn = flow.tcp
        near = conn.seen[d].end
        seq = draw(st.one_of(_NEAR_WRAP, st.integers(near - 70000, near + 70000).map(
            lambda v: v % 2**32)))
        ack = draw(st.one_of(_NEAR_WRAP, st.just(conn.seen[1 - d].end), st.integers(
            conn.seen[1 - d].end - 70000, conn.seen[1 - d].end + 3000).map(lambda v: v % 2**32)))
        flags = draw(st.sampled_from([TCP_ACK, TCP_ACK, TCP_ACK | 0x08, TCP_ACK | 0x20,
                                      TCP_ACK | 0xC8, 0x08, 0, TCP_SYN | TCP_ACK,
                                      TCP_FIN | TCP_ACK, TCP_RST]))
        sack = tuple((draw(_NEAR_WRAP), r) for r in draw(st.lists(st.one_of(
            _NEAR_WRAP, st.integers(ack, ack + 5000).map(lambda v: v % 2**32)), max_size=3)))
        options = tcp_options(timestamps=(1, 2) if draw(st.booleans()) else None, sack=sack)
        frame = tcp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport, seq=seq, ack=ack,
                          flags=flags, window=draw(st.sampled_from([0, 1, 512, 65535])),
                          options=options, payload_len=draw(st.sampled_from([0, 1, 100, 1400])))
    elif flow.key.proto == PROTO_UDP:
        frame = udp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport,
                          payload_len=draw(st.integers(0, 64)))
    else:
        frame = icmp_echo_frame(src=k.src, dst=k.dst, ident=k.sport, seq=draw(st.integers(0, 9)),
                                reply=d == 1)
    now = draw(st.sampled_from([20 * S + 1, 30 * S, 60 * S]))
    if flow.key.proto == PROTO_UDP and draw(st.booleans()) and flow.key.family == 4:
        frame = frame[:40] + b"\0\0" + frame[42:]  # UDP over IPv4 without a checksum
    caplen = len(frame)
    if draw(st.integers(0, 5)) == 0:
        caplen = draw(st.integers(14, len(frame)))  # snaplen cut
    return now, frame[:caplen], 1, len(frame)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_window_tracking_edge_cases(data):
    flows = data.draw(st.lists(_flow(), min_size=1, max_size=3))
    table = data.draw(st.one_of(st.just({}), st.fixed_dictionaries({}, optional={
        "tcp_be_liberal": st.booleans(), "tcp_max_retrans": st.integers(0, 4),
        "tcp_timeout_established": st.integers(1, 10), "tcp_timeout_unacknowledged":
        st.integers(1, 10), "tcp_timeout_max_retrans": st.integers(1, 10),
        "tcp_timeout_time_wait": st.integers(1, 10), "udp_timeout": st.integers(1, 10),
        "udp_timeout_stream": st.integers(1, 10), "icmp_timeout": st.integers(1, 10),
        "icmpv6_timeout": st.integers(1, 10)})))
    classifier = Classifier(parse_config({**LAB, "conntrack": table}, "lab").machines)
    knobs = [parse_config({**LAB, "conntrack": table}, "lab").machines[0].conntrack.knobs()]
    engine = PnicEngine(4, classifier, knobs)
    ref = Reference()
    for flow in flows:
        slot = engine.insert(flow.to_bytes())
        if slot >= 0:
            ref.add(slot, flow.copy())
    packets = []
    for _ in range(data.draw(st.integers(1, 8))):
        slot = data.draw(st.sampled_from(sorted(ref.flows))) if ref.flows else None
        if slot is None:
            break
        packets.append(data.draw(_packet(ref.flows[slot].copy())))
    packets.sort(key=lambda p: p[0])
    run_both(engine, ref, classifier, packets, Tally(), knobs)


def test_retransmissions_raise_the_counter_and_cap_the_timeout():
    """Identical segments in a row: retrans counts up and caps the timeout at 300 s."""
    key = FlowKey(4, PROTO_TCP, 0, _CLIENT4, _SERVER4, 40000, 443)
    conn = TcpConn(seen=(TcpDir(1000, 70000, 65535, 5000, 0, 0x22),
                         TcpDir(5000, 66000, 65535, 1000, 0, 0x22)),
                   state=3, last_index=3, last_win=65535, seen_reply=True)
    flow = Flow(key=key, xlat=key, machine=0, chain=8, tcp=conn,
                status=Status.SEEN_REPLY | Status.ASSURED, expires=1000 * S)
    classifier = Classifier(parse_config(LAB, "lab").machines)
    engine = PnicEngine(2, classifier)
    ref = Reference()
    ref.add(engine.insert(flow.to_bytes()), flow.copy())
    frame = tcp_frame(src=_CLIENT4, dst=_SERVER4, sport=40000, dport=443, seq=1000, ack=5000,
                      flags=TCP_ACK, window=65535, payload_len=100)
    tally = Tally()
    run_both(engine, ref, classifier, [(S * (i + 1), frame, 1, len(frame)) for i in range(5)],
             tally)
    assert tally.processed == 5
    entry = Flow.from_bytes(engine.get(0))
    assert entry.tcp is not None and entry.tcp.retrans >= ct_tcp.NF_CT_TCP_MAX_RETRANS


def test_tuned_timeouts_expire_pnic_entries_as_the_reference_does():
    """With tcp_timeout_established = 3 and udp_timeout_stream = 2, a packet sets the entry's
    expiry from the machine's table, and the next packet after it is punted as expired."""
    cfg = parse_config({**LAB, "conntrack": SHORT}, "lab")
    knobs = [cfg.machines[0].conntrack.knobs()]
    tcp_key = FlowKey(4, PROTO_TCP, 0, _CLIENT4, _SERVER4, 40000, 443)
    conn = TcpConn(seen=(TcpDir(1000, 70000, 65535, 5000, 0, 0x22),
                         TcpDir(5000, 66000, 65535, 1000, 0, 0x22)),
                   state=3, last_index=3, last_win=65535, seen_reply=True)
    udp_key = FlowKey(4, PROTO_UDP, 0, _CLIENT4, _SERVER4, 40001, 53)
    flows = [Flow(key=tcp_key, xlat=tcp_key, machine=0, chain=8, tcp=conn,
                  status=Status.SEEN_REPLY | Status.ASSURED, expires=1000 * S),
             Flow(key=udp_key, xlat=udp_key, machine=0, chain=8,
                  status=Status.SEEN_REPLY | Status.ASSURED, expires=1000 * S)]
    classifier = Classifier(cfg.machines)
    engine = PnicEngine(2, classifier, knobs)
    ref = Reference()
    for flow in flows:
        ref.add(engine.insert(flow.to_bytes()), flow.copy())
    seg = tcp_frame(src=_CLIENT4, dst=_SERVER4, sport=40000, dport=443, seq=1000, ack=5000,
                    flags=TCP_ACK, window=65535, payload_len=0)
    dgram = udp_frame(src=_CLIENT4, dst=_SERVER4, sport=40001, dport=53, payload=b"x")
    tally = Tally()
    run_both(engine, ref, classifier, [(S, seg, 1, len(seg)), (S, dgram, 1, len(dgram))],
             tally, knobs)
    assert [Flow.from_bytes(engine.get(slot)).expires for slot in sorted(ref.flows)] == \
        [4 * S, 3 * S]
    run_both(engine, ref, classifier, [(4 * S, seg, 1, len(seg)), (4 * S, dgram, 1, len(dgram))],
             tally, knobs)
    assert tally.returned["expired"] == 2


@pytest.mark.parametrize("router", [False, True])
def test_a_routing_machine_checks_and_decrements_the_ttl_on_the_pnic(router):
    """forwarding = "router": TTL / hop limit 1 or 0 dropped (ttl-exceeded), 2 and more
    forwarded one lower with the IPv4 header checksum updated, as the reference does."""
    machines = [{**m, "forwarding": "router" if router else "bridge"} for m in LAB["machine"]]
    cfg = parse_config({"machine": machines}, "lab")
    classifier = Classifier(cfg.machines)
    engine = PnicEngine(4, classifier, routing=[router])
    ref = Reference()
    conn = TcpConn(seen=(TcpDir(1000, 70000, 65535, 5000, 0, 0x22),
                         TcpDir(5000, 66000, 65535, 1000, 0, 0x22)),
                   state=3, last_index=3, last_win=65535, seen_reply=True)
    key = FlowKey(4, PROTO_TCP, 0, _CLIENT4, _SERVER4, 40000, 443)
    flow = Flow(key=key, xlat=key._replace(src=_PUBLIC4), machine=0, chain=8, tcp=conn,
                status=Status.SEEN_REPLY | Status.ASSURED | Status.NAT, expires=1000 * S)
    ref.add(engine.insert(flow.to_bytes()), flow.copy())
    frames = [(S + ttl, tcp_frame(src=_CLIENT4, dst=_SERVER4, sport=40000, dport=443,
                                  seq=1000, ack=5000, flags=TCP_ACK, window=65535, ttl=ttl),
               1, 54) for ttl in (0, 1, 2, 64, 255)]
    tally = Tally()
    buf, offset, caplen, wire, linktype, ts = _arrays(frames)
    verdict = np.zeros(len(frames), np.int8)
    reason = np.zeros(len(frames), np.int16)
    engine.process(buf.copy(), offset, caplen, wire, linktype, ts, np.ones(len(frames), bool),
                   verdict, reason, np.zeros(len(frames), np.int64))
    want = [Reason.TTL_EXCEEDED] * 2 + [Reason.ESTABLISHED] * 3 if router \
        else [Reason.ESTABLISHED] * 5
    assert [Reason(int(r)) for r in reason] == want
    engine = PnicEngine(4, classifier, routing=[router])
    ref = Reference()
    ref.add(engine.insert(flow.to_bytes()), flow.copy())
    run_both(engine, ref, classifier, frames, tally, routing=[router])
    assert tally.processed == 5


def test_tcp_header_cut_by_snaplen_is_punted():
    """A capture that ends inside the TCP header (here: before its checksum) is no packet
    parse() accepts (TRUNCATED_L4): the engine leaves it to software and keeps the entry."""
    key = FlowKey(4, PROTO_TCP, 0, _CLIENT4, _SERVER4, 40000, 443)
    flow = Flow(key=key, xlat=key._replace(src=_PUBLIC4), machine=0, chain=8,
                tcp=TcpConn(state=3), expires=1000 * S)
    classifier = Classifier(parse_config(LAB, "lab").machines)
    engine = PnicEngine(2, classifier)
    ref = Reference()
    ref.add(engine.insert(flow.to_bytes()), flow.copy())
    frame = tcp_frame(src=_CLIENT4, dst=_SERVER4, sport=40000, dport=443, seq=1, ack=1,
                      flags=TCP_ACK, window=512)
    for cut in (34, 49, 50, 53):
        assert parse(bytearray(frame[:cut]), 1, len(frame)).error == ParseError.TRUNCATED_L4
        tally = Tally()
        run_both(engine, ref, classifier, [(S, frame[:cut], 1, len(frame))], tally)
        assert tally.missed == 1


# -- the hash index ---------------------------------------------------------------------------

def _pool_flow(i: int, nat: bool) -> Flow:
    family = 4 if i % 3 else 6
    client, server = (_CLIENT4, _SERVER4) if family == 4 else (_CLIENT6, _SERVER6)
    key = FlowKey(family, PROTO_UDP if i % 2 else PROTO_TCP, i % 2, client, server,
                  1000 + i, 53)
    xlat = key._replace(src=_PUBLIC4 if family == 4 else _PUBLIC6, sport=2000 + i) if nat else key
    return Flow(key=key, xlat=xlat, machine=0, chain=8)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 11), st.booleans()), max_size=60))
def test_index_churn_matches_a_dict(ops):
    engine = PnicEngine(5, Classifier(()))
    model: dict[FlowKey, tuple[int, int]] = {}
    slots: dict[int, Flow] = {}
    for insert, i, nat in ops:
        if insert:
            flow = _pool_flow(i, nat)
            slot = engine.insert(flow.to_bytes())
            clash = flow.key in model or flow.reply_key in model
            if clash or len(slots) == 5:
                assert slot == -1
                continue
            assert slot >= 0 and slot not in slots
            slots[slot] = flow
            model[flow.key] = (slot, 0)
            model[flow.reply_key] = (slot, 1)
        elif slots:
            slot = sorted(slots)[i % len(slots)]
            flow = slots.pop(slot)
            assert engine.remove(slot) == flow.to_bytes()
            del model[flow.key], model[flow.reply_key]
        assert len(engine) == len(slots)
        assert engine.used_slots() == sorted(slots)
        for j in range(12):
            for nat_ in (False, True):
                f = _pool_flow(j, nat_)
                for k in (f.key, f.reply_key):
                    assert engine.find(k) == model.get(k)


def test_full_cache_and_duplicates_are_refused():
    engine = PnicEngine(2, Classifier(()))
    a, b, c = (_pool_flow(i, True) for i in range(3))
    assert engine.insert(a.to_bytes()) == 0
    assert engine.insert(a.to_bytes()) == -1  # same keys
    same_reply = Flow(key=a.reply_key, xlat=a.reply_key, machine=0, chain=8)
    assert engine.insert(same_reply.to_bytes()) == -1  # its key is a's reply key
    assert engine.insert(b.to_bytes()) == 1
    assert engine.insert(c.to_bytes()) == -1  # full
    assert len(engine) == 2
    assert engine.remove(0) == a.to_bytes()
    assert engine.find(a.key) is None and engine.find(a.reply_key) is None
    assert engine.insert(c.to_bytes()) == 0
    assert engine.find(c.reply_key) == (0, 1)


def test_bad_input_is_named():
    engine = PnicEngine(1, Classifier(()))
    with pytest.raises(ValueError, match="224 bytes"):
        engine.insert(b"short")
    with pytest.raises(KeyError, match="no entry"):
        engine.remove(0)
    with pytest.raises(KeyError, match="outside"):
        engine.get(5)
    one = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="outside buf"):
        engine.process(np.zeros(10, np.uint8), one + 8, np.array([20], np.uint32),
                       np.array([20], np.uint32), np.ones(1, np.uint16), one,
                       np.ones(1, bool), one.copy(), one.copy(), one.copy())
    with pytest.raises(ValueError, match="writable"):
        engine.process(np.frombuffer(b"\0" * 10, np.uint8), one, np.array([10], np.uint32),
                       np.array([10], np.uint32), np.ones(1, np.uint16), one,
                       np.ones(1, bool), one.copy(), one.copy(), one.copy())
    with pytest.raises(ValueError, match="wire_len"):
        engine.process(np.zeros(10, np.uint8), one, np.array([10], np.uint32),
                       np.array([10, 10], np.uint32), np.ones(1, np.uint16), one,
                       np.ones(1, bool), one.copy(), one.copy(), one.copy())


@pytest.mark.parametrize("bad_offset", [-1, 100])
def test_a_frame_outside_the_buffer_stops_the_batch_before_any_packet(bad_offset):
    """The kernel's loads are unchecked: every selected frame is checked first, so a bad one
    late in the batch leaves the earlier ones, the frames and the cache untouched."""
    key = FlowKey(4, PROTO_TCP, 0, bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)), 1000, 80)
    engine = PnicEngine(1, Classifier(()))
    slot = engine.insert(Flow(key=key, xlat=key, machine=0, chain=0).to_bytes())
    before = engine.get(slot)
    frame = tcp_frame(src=key.src, dst=key.dst, sport=1000, dport=80, seq=1, ack=1,
                      flags=TCP_ACK, window=100)
    buf = np.frombuffer(frame * 2, np.uint8).copy()
    pristine = buf.copy()
    n = len(frame)
    offset = np.array([0, n, bad_offset], np.int64)
    lengths = np.full(3, n, np.uint32)
    verdict = np.full(3, 7, np.int8)
    with pytest.raises(ValueError, match="outside buf"):
        engine.process(buf, offset, lengths, lengths, np.ones(3, np.uint16),
                       np.zeros(3, np.int64), np.ones(3, bool), verdict,
                       np.zeros(3, np.int16), np.zeros(3, np.int64))
    assert verdict.tolist() == [7, 7, 7]
    assert np.array_equal(buf, pristine)
    assert engine.get(slot) == before
    assert engine.punt_counts() == {r: 0 for r in PuntReason}
    # unselected, the same frame is no concern
    done = engine.process(buf, offset, lengths, lengths, np.ones(3, np.uint16),
                          np.zeros(3, np.int64), np.array([1, 1, 0], bool), verdict,
                          np.zeros(3, np.int16), np.zeros(3, np.int64))
    assert verdict.tolist()[2] == 7 and done + sum(engine.punt_counts().values()) == 2


def test_argument_types_and_a_strided_buffer_give_the_same_results():
    """process() runs one compiled kernel for every caller: other integer types and a frame
    buffer that is a strided view (worked on in a copy, written back) change nothing."""
    key = FlowKey(4, PROTO_TCP, 0, _CLIENT4, _SERVER4, 40000, 443)
    conn = TcpConn(seen=(TcpDir(1000, 70000, 65535, 5000, 0, 0x22),
                         TcpDir(5000, 66000, 65535, 1000, 0, 0x22)),
                   state=3, last_index=3, last_win=65535, seen_reply=True)
    flow = Flow(key=key, xlat=key._replace(src=_PUBLIC4, sport=50000), machine=0, chain=8,
                tcp=conn, status=Status.SEEN_REPLY | Status.ASSURED | Status.NAT,
                expires=1000 * S)
    classifier = Classifier(parse_config(LAB, "lab").machines)
    frames = [(S * (i + 1), tcp_frame(src=_CLIENT4, dst=_SERVER4, sport=40000, dport=443,
                                      seq=1000 + 100 * i, ack=5000, flags=TCP_ACK, window=65535,
                                      payload_len=100), 1, 154) for i in range(4)]
    buf, offset, caplen, wire, linktype, ts = _arrays(frames)
    outputs = []
    for wide, strided in ((False, False), (True, False), (False, True)):
        engine = PnicEngine(2, classifier)
        engine.insert(flow.to_bytes())
        work = buf.copy()
        if strided:
            spaced = np.zeros(2 * len(buf), np.uint8)
            spaced[::2] = buf
            work = spaced[::2]
        args = (offset, caplen, wire, linktype, ts)
        if wide:
            args = tuple(a.astype(np.int64) for a in args)
        n = len(frames)
        verdict, reason, returned = (np.zeros(n, np.int64) for _ in range(3))
        assert engine.process(work, *args, np.ones(n, bool), verdict, reason, returned) == n
        outputs.append((work.tobytes(), verdict.tolist(), reason.tolist(), engine.get(0)))
    assert outputs[0][0] != buf.tobytes()  # rewritten (SNAT)
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
