"""Replay you can trust: regressions for defects of the event order, the handoff and the channel.

Each test names the defect it pins down; each failed before its fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowshift.config import parse_config
from flowshift.packet.build import ip_frame
from flowshift.packet.view import TCP_ACK, TCP_SYN
from flowshift.replay import run_replay
from flowshift.verdict import Verdict
from hosttools import FIREWALL_HOST, REAL, run
from tracetools import S, TcpConn, spaced, udp, write_pcap, write_pcapng

needs_corpus = pytest.mark.skipif(not REAL.is_dir(), reason="shared/corpus/real not present")
POLICIES = ("always", "elephant")


def _closing_across_gap(gap: int) -> list[tuple[int, bytes]]:
    """A connection that closes around a far-later packet whose timestamp comes first in the
    file (the clock never goes back: the late FIN/ACK is judged at the far packet's time)."""
    a = TcpConn()
    trace = spaced(a.handshake() + a.data(12), S, S // 1000)
    t = trace[-1][0]
    return [*trace, (t + S, a.client_fin()), (t + S + gap, udp(7000)),
            (t + S + 1000, a.server_fin()), (t + S + 2000, a.client_ack())]


def _diff(a, b):
    return [(i, x[:2], y[:2]) for i, (x, y) in enumerate(zip(a.outputs(), b.outputs(),
                                                             strict=True)) if x != y]


# -- 1. held packets judged after the sweep freed their flow ---------------------------------


@pytest.mark.parametrize("rows", [None, 64])
@pytest.mark.parametrize("policy", POLICIES)
def test_sweep_acts_at_its_own_time_not_a_later_packets(tmp_path, policy, rows):
    cfg = parse_config(FIREWALL_HOST, "test")
    path = write_pcap(tmp_path / "gap.pcap", _closing_across_gap(130 * S))
    never = run(path, cfg, policy="never", rows=rows)
    assert _diff(never, run(path, cfg, policy=policy, rows=rows)) == []


def _replay(tmp_path: Path, trace: Path, cfg, name: str, **kw) -> tuple[dict, str, bytes]:
    out, verdicts = tmp_path / f"{name}.pcap", tmp_path / f"{name}.csv"
    report = run_replay(trace, cfg, out=out, verdicts=verdicts, progress=False, **kw)
    return report, verdicts.read_text(), out.read_bytes()


def _fin_wait_trace(tmp_path: Path) -> Path:
    """A flow offloaded, then its FIN; the peer's FIN/ACK 1 ms later; a packet 130 s later."""
    a = TcpConn()
    trace = spaced(a.handshake() + a.data(20), S, S // 1000)
    t = trace[-1][0]
    trace += [(t + S, a.client_fin()), (t + S + S // 1000, a.server_fin()),
              (t + S + 2 * S // 1000, a.client_ack()), (t + 131 * S, udp(7000))]
    return write_pcap(tmp_path / "finwait.pcap", trace)


@pytest.mark.parametrize("split", [{}, {"dump_at": 1.5}, {"withdraw_at": 1.5},
                                   {"crash_at": 1.5}, {"dump_at": 3.0}])
@pytest.mark.parametrize("policy", POLICIES)
def test_split_points_keep_the_peers_fin(tmp_path, policy, split):
    cfg = parse_config(FIREWALL_HOST, "test")
    trace = _fin_wait_trace(tmp_path)
    if "dump_at" in split:
        split = {**split, "dump_path": tmp_path / "flows.txt"}
    never = _replay(tmp_path, trace, cfg, "never", offload="never")
    got = _replay(tmp_path, trace, cfg, "got", offload=policy, **split)
    assert got[1].replace(",pnic,", ",vnic,").replace(",machine,", ",vnic,") == \
        never[1].replace(",machine,", ",vnic,")
    assert got[2] == never[2]


# -- 4. a retried decision advanced a round-robin pool twice ---------------------------------

RR_HOST = {
    "offload": {"policy": "always"},
    "machine": [{
        "name": "lb", "addresses": ["10.0.1.0/24"], "public": ["192.0.2.10", "192.0.2.11"],
        "services": ["lb", "count"],
        "lb": [
            {"proto": "tcp", "vip": "192.0.2.10:80", "scheduler": "round-robin",
             "backends": ["10.0.1.11:8080"]},
            {"proto": "tcp", "vip": "192.0.2.11:80", "scheduler": "round-robin",
             "backends": ["10.0.1.11:8080", "10.0.1.12:8080"]},
        ],
    }],
}


def test_a_clash_check_does_not_advance_a_round_robin_pool_twice(tmp_path):
    cfg = parse_config(RR_HOST, "test")
    a = TcpConn(sport=40000, dport=80, client=bytes([198, 51, 100, 7]),
                server=bytes([192, 0, 2, 10]))
    syn = a.handshake()[0]
    # the backend's answer and the client's ACK, written as they cross the host
    synack = ip_frame(src=bytes([10, 0, 1, 11]), dst=bytes([198, 51, 100, 7]), proto=6,
                      l4=_tcp(8080, 40000, 5000, 1001, TCP_SYN | TCP_ACK,
                              bytes([10, 0, 1, 11]), bytes([198, 51, 100, 7])))
    ack = TcpConn(sport=40000, dport=80, client=bytes([198, 51, 100, 7]),
                  server=bytes([192, 0, 2, 10]))
    ack.cseq, ack.sseq = 1001, 5001
    frames = [syn, synack, ack._out(TCP_ACK), *[ack._out(TCP_ACK, b"x" * 10) for _ in range(3)]]
    b = TcpConn(sport=40000, dport=80, client=bytes([198, 51, 100, 7]),
                server=bytes([192, 0, 2, 11]))
    c = TcpConn(sport=40001, dport=80, client=bytes([198, 51, 100, 7]),
                server=bytes([192, 0, 2, 11]))
    frames += [b.handshake()[0], c.handshake()[0]]
    path = write_pcap(tmp_path / "rr.pcap", spaced(frames, S, S // 100))
    never = run(path, cfg, policy="never")
    always = run(path, cfg, policy="always")
    # to VIP 2 the first pick is the shared backend: the tuple clashes with the first flow
    assert never.results[6].reason == "nat-exhausted"
    assert always.host.stats.offloads_to_pnic > 0
    assert _diff(never, always) == []
    # the pool took one turn for the dropped SYN: the next one goes to the other backend
    assert never.results[7].data == always.results[7].data


def _tcp(sport: int, dport: int, seq: int, ack: int, flags: int, src: bytes,
         dst: bytes) -> bytes:
    from flowshift.packet.build import tcp_segment

    return tcp_segment(src=src, dst=dst, sport=sport, dport=dport, seq=seq, ack=ack,
                       flags=flags, window=65535)


# -- 5. untracked protocols: Linux's generic tracker -----------------------------------------


def _igmp(src: bytes, dst: bytes) -> bytes:
    body = bytes([0x16, 0, 0, 0]) + dst  # IGMPv2 membership report (checksum not checked)
    return ip_frame(src=src, dst=dst, proto=2, l4=body)


def test_igmp_from_a_machine_that_allows_egress_is_tracked_generically(tmp_path):
    cfg = parse_config(FIREWALL_HOST, "test")
    group = bytes([224, 0, 0, 251])
    src = bytes([10, 0, 0, 2])
    trace = [(S, _igmp(src, group)), (2 * S, _igmp(src, group)), (700 * S, _igmp(src, group))]
    path = write_pcap(tmp_path / "igmp.pcap", trace)
    for policy in ("never", "always"):
        got = run(path, cfg, policy=policy)
        assert [r.verdict for r in got.results] == [Verdict.FORWARD] * 3
        # the second is the tracked flow's (600 s); the third starts a new one
        assert [r.reason for r in got.results] == ["rule:0", "established", "rule:0"]


def test_untracked_protocol_ingress_is_judged_by_the_rules(tmp_path):
    cfg = parse_config(FIREWALL_HOST, "test")
    trace = [(S, _igmp(bytes([198, 51, 100, 1]), bytes([10, 0, 0, 2])))]
    path = write_pcap(tmp_path / "igmp-in.pcap", trace)
    got = run(path, cfg, policy="never")
    assert [(r.verdict, r.reason) for r in got.results] == [(Verdict.DROP, "default")]


# -- 6. pcapng replay ------------------------------------------------------------------------


@pytest.mark.parametrize("pnic", ["inline", "process"])
def test_pcapng_replay_rewrites_in_place(tmp_path, pnic):
    cfg = parse_config(FIREWALL_HOST, "test")
    a = TcpConn()
    trace = spaced(a.handshake() + a.data(40), S, S // 1000)
    ng = write_pcapng(tmp_path / "t.pcapng", trace)
    classic = write_pcap(tmp_path / "t.pcap", trace)
    got = _replay(tmp_path, ng, cfg, "ng", offload="always", pnic=pnic)
    want = _replay(tmp_path, classic, cfg, "classic", offload="always", pnic=pnic)
    assert got[0]["tiers"]["pnic"]["packets"] > 0 if "tiers" in got[0] else True
    assert got[1] == want[1]
    assert got[2] == want[2]


# -- 8. events stamped at their own time; peaks independent of batch, dumps, transport -------


@needs_corpus
def test_events_and_peaks_do_not_depend_on_batches_dumps_or_transport(tmp_path, monkeypatch):
    import flowshift.replay as replay_mod
    from flowshift.config import load_config

    cfg = load_config(REAL / "lb-gateway-rr.toml")
    trace = REAL / "replay_input.pcap"

    def go(name, batch=65536, **kw):
        monkeypatch.setattr(replay_mod, "BATCH", batch)
        return _replay(tmp_path, trace, cfg, name, offload="always", **kw)

    base = go("base")
    assert base[0]["offloads"]["to_pnic"] > 0
    for name, kw in [("small", {"batch": 500}), ("dump", {"dump_at": 3.0,
                                                          "dump_path": tmp_path / "f.txt"}),
                     ("process", {"pnic": "process"})]:
        got = go(name, **kw)
        assert got[1] == base[1], name
        assert got[2] == base[2], name
        for key in ("offloads", "flows", "tiers"):
            assert got[0][key] == base[0][key], (name, key)
        assert got[0]["events"] == base[0]["events"], name


# -- 9. the flow dump of PNIC-owned flows is as of the dump -----------------------------------


@needs_corpus
@pytest.mark.parametrize("at", [2.0, 6.0, 11.0])
def test_dump_is_the_same_under_every_schedule_but_the_tier(tmp_path, at):
    from flowshift.config import load_config

    cfg = load_config(REAL / "lb-gateway-rr.toml")
    trace = REAL / "replay_input.pcap"
    dumps = {}
    for policy in ("never", "always", "elephant"):
        path = tmp_path / f"{policy}.txt"
        run_replay(trace, cfg, offload=policy, dump_at=at, dump_path=path, progress=False)
        dumps[policy] = [line.rsplit(" tier=", 1)[0] for line in path.read_text().splitlines()]
    assert dumps["never"]
    assert dumps["always"] == dumps["never"]
    assert dumps["elephant"] == dumps["never"]


def test_report_counts_rejected_messages(tmp_path):
    cfg = parse_config(FIREWALL_HOST, "test")
    trace = write_pcap(tmp_path / "t.pcap", spaced(TcpConn().handshake(), S, S))
    report = run_replay(trace, cfg, progress=False)
    assert json.loads(json.dumps(report))["offloads"]["rejected_messages"] == {}


# -- 8 and 9 on the demo's gateway: elephants, a SYN flood, UDP media --------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from flowshift.commands.demo import build_trace, demo_config_text

    d = tmp_path_factory.mktemp("demo")
    (d / "demo.toml").write_text(demo_config_text())
    from flowshift.config import load_config

    cfg = load_config(d / "demo.toml")
    build_trace(d / "demo.pcap", cfg, scale=0.3)
    return d / "demo.pcap", cfg


def test_demo_dump_is_the_same_under_every_schedule_but_the_tier(tmp_path, demo):
    trace, cfg = demo
    dumps = {}
    for policy, kw in [("never", {}), ("elephant", {}), ("always", {}),
                       ("elephant", {"pnic": "process"})]:
        path = tmp_path / "flows.txt"
        run_replay(trace, cfg, offload=policy, dump_at=10.0, dump_path=path, progress=False,
                   **kw)
        dumps[policy, *kw.values()] = [line.rsplit(" tier=", 1)[0]
                                       for line in path.read_text().splitlines()]
    never = dumps.pop(("never",))
    assert never
    for name, got in dumps.items():
        assert got == never, name


def test_demo_events_and_peaks_do_not_depend_on_batches_dumps_or_transport(
        tmp_path, demo, monkeypatch):
    import flowshift.replay as replay_mod

    trace, cfg = demo
    seen = []
    original = replay_mod.build_report

    def keep(tally, stats, **kw):
        seen.append(list(stats.events))
        return original(tally, stats, **kw)

    monkeypatch.setattr(replay_mod, "build_report", keep)

    def go(name, batch=65536, **kw):
        monkeypatch.setattr(replay_mod, "BATCH", batch)
        return _replay(tmp_path, trace, cfg, name, offload="elephant", **kw)

    base = go("base")
    assert base[0]["offloads"]["to_pnic"] > 0
    closed = [t for t, kind, what in seen[0] if kind == "return" and what == "closed"]
    assert len(set(closed)) > 1  # stamped at their own packets, not at a batch's start
    for name, kw in [("small", {"batch": 700}),
                     ("dump", {"dump_at": 7.0, "dump_path": tmp_path / "f.txt"}),
                     ("process", {"pnic": "process"})]:
        got = go(name, **kw)
        assert got[1] == base[1], name
        assert got[2] == base[2], name
        for key in ("offloads", "flows", "tiers"):
            assert got[0][key] == base[0][key], (name, key)
        assert seen[-1] == seen[0], name


# -- the ordering rule: the clock never goes back ---------------------------------------------


@pytest.mark.parametrize("rows", [None, 1, 2, 64])
@pytest.mark.parametrize("policy", ["never", "always"])
def test_a_packet_whose_timestamp_goes_back_is_decided_at_the_clock(tmp_path, policy, rows):
    cfg = parse_config(FIREWALL_HOST, "test")
    reply = udp(53, 7000, src=bytes([198, 51, 100, 1]), dst=bytes([10, 0, 0, 2]))
    # a UDP flow at 1 s, answered; a packet at 100 s; the flow's next packet stamped 2 s:
    # decided at 100 s, when the 30 s flow has long expired, so it starts a new flow
    trace = [(S, udp(7000)), (S + 1000, reply), (100 * S, udp(7001)), (2 * S, udp(7000))]
    got = run(write_pcap(tmp_path / "back.pcap", trace), cfg, policy=policy, rows=rows)
    assert [r.reason for r in got.results] == ["rule:0", "established", "rule:0", "rule:0"]


# -- 3. the process transport ends cleanly -----------------------------------------------------


def test_process_pnic_stops_its_reader_and_process(tmp_path):
    import threading

    errors = []
    old = threading.excepthook
    threading.excepthook = errors.append
    try:
        cfg = parse_config(FIREWALL_HOST, "test")
        got = run(_fin_wait_trace(tmp_path), cfg, policy="always", pnic="process", rows=8)
        link = got.host.vnic.link
        assert got.host.stats.offloads_to_pnic > 0
        assert not link.reader.is_alive()
        assert not link.proc.is_alive()
    finally:
        threading.excepthook = old
    assert errors == []


# -- an entry the PNIC handed back at a later packet, expired by an earlier decision -----------


def test_a_clash_check_sees_a_pnic_entry_expired_before_its_return(tmp_path):
    import copy

    from hosttools import GATEWAY_HOST

    host = copy.deepcopy(GATEWAY_HOST)
    host["offload"]["idle_timeout"] = 10_000.0  # the PNIC keeps idle flows
    cfg = parse_config(host, "test")
    server = bytes([198, 51, 100, 1])
    a, b = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 3])
    back = udp(53, 5000, src=server, dst=bytes([192, 0, 2, 1]))
    t = S
    trace = [(t, udp(5000, src=a, dst=server)), (t + 1000, back),
             *[(t + 2000 + i * 1000, udp(5000, src=a, dst=server)) for i in range(4)]]
    t += 200 * S  # past the flow's 120 s: it is dead, though still at the PNIC
    trace += [(t, udp(5000, src=b, dst=server)),  # SNAT wants the dead flow's port
              (t + 1000, udp(5000, src=a, dst=server))]  # the dead flow's next packet
    path = write_pcap(tmp_path / "dead.pcap", trace)
    never = run(path, cfg, policy="never", rows=64)
    got = run(path, cfg, policy="always", rows=64)
    assert got.host.stats.offloads_to_pnic > 0
    assert _diff(never, got) == []
    assert never.results[6].data == got.results[6].data


@pytest.mark.parametrize("split", [{}, {"dump_at": 100.0}, {"crash_at": 100.0}])
def test_a_fin_answered_30_s_later_survives_a_later_packet_in_the_batch(tmp_path, split):
    """The peer's FIN/ACK 30 s after the FIN (FIN_WAIT lasts 120 s), and a packet 200 s
    later in the same batch: the FIN/ACK is the connection's, whatever the schedule."""
    cfg = parse_config(FIREWALL_HOST, "test")
    a = TcpConn()
    trace = spaced([*a.handshake(), *a.data(2), a.client_fin()], 2 * S, S // 10000)
    trace += [(32 * S, a.server_fin()), (32 * S + 1000, a.client_ack()), (202 * S, udp(7000))]
    path = write_pcap(tmp_path / "fin30.pcap", trace)
    if "dump_at" in split:
        split = {**split, "dump_path": tmp_path / "flows.txt"}
    never = _replay(tmp_path, path, cfg, "never", offload="never")
    got = _replay(tmp_path, path, cfg, "got", offload="always", **split)
    rows = [line.split(",")[4:6] for line in got[1].splitlines()]
    assert rows == [line.split(",")[4:6] for line in never[1].splitlines()]
    assert rows[7] == ["forward", "established"]  # the peer's FIN/ACK (row 0: the header)
    assert got[2] == never[2]
