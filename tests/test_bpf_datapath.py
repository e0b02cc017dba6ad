"""The eBPF datapath against the compiled PNIC engine, packet by packet (BPF_PROG_TEST_RUN).

Every row is made by `PnicEngine` (tests/bpfrows.py) and run through the program: verdict,
reason, the rewritten frame and the entry after must be identical. Rows cover established TCP
flows (plain, SNAT, LB; IPv4 and IPv6; sequence numbers around 2**32) with data, ACKs, SACK,
retransmissions, zero windows, out-of-window and old segments, FIN/RST/SYN punts, misses,
expired entries; UDP with and without checksum; ICMP echo; VLAN tags; fragments; and
hypothesis-drawn entries and segments near every window edge.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfrows import PUNT, Row, check_row, check_rows, engine_row
from flowshift.config import load_config, parse_config
from flowshift.entry import Flow, Service, Status
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowKey
from flowshift.host import Classifier
from flowshift.live import bpfsys
from flowshift.live.datapath import Clock, Datapath, Mode, Port, Result, key_bytes, reply_key
from flowshift.offload import established as offloadable
from flowshift.packet.build import icmp_echo_frame, tcp_frame, tcp_options, udp_frame
from flowshift.packet.parse import parse
from flowshift.packet.pcap import open_trace
from flowshift.packet.view import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, ParseError
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.services.chain import Chain
from flowshift.services.conntrack_tcp import TcpConn, TcpDir, TcpState
from flowshift.verdict import PuntReason, Reason, Verdict

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")]

S = 1_000_000_000
LAB = {"machine": [{"name": "lab", "addresses": ["10.0.0.0/24", "fd00::/64"],
                    "public": ["192.0.2.1", "2001:db8::1"], "services": ["count"]}]}
CLASSIFIER = Classifier(parse_config(LAB, "lab").machines)
PORTS = {0: Port(21, bytes.fromhex("020000000101"), bytes.fromhex("020000000102")),
         1: Port(22, bytes.fromhex("020000000201"), bytes.fromhex("020000000202"))}
PUNT_IFINDEX = 23

ADDR = {4: {"client": bytes([10, 0, 0, 5]), "server": bytes([198, 51, 100, 7]),
            "public": bytes([192, 0, 2, 1]), "backend": bytes([10, 0, 0, 9])},
        6: {"client": bytes.fromhex("fd000000000000000000000000000005"),
            "server": bytes.fromhex("20010db800ff00000000000000000007"),
            "public": bytes.fromhex("20010db8000000000000000000000001"),
            "backend": bytes.fromhex("fd000000000000000000000000000009")}}


@pytest.fixture(scope="module")
def dp():
    with Datapath(f"t{os.getpid()}", 8, CLASSIFIER, uplink=PORTS[0], machine_ports=[PORTS[1]],
                  punt_ifindex=PUNT_IFINDEX, clock=Clock.TSTAMP) as d:
        yield d


def run(dp: Datapath, row: Row) -> Row:
    check_row(dp, row, CLASSIFIER, PORTS)
    return row


# -- flows and their packets ---------------------------------------------------------------

def keys(family: int, proto: int, nat: str | None, sport: int = 40000,
         dport: int = 443) -> tuple[FlowKey, FlowKey]:
    a = ADDR[family]
    if nat == "lb":  # an outside client to the public VIP, balanced to an inside backend
        key = FlowKey(family, proto, 0, a["server"], a["public"], sport, 80)
        return key, key._replace(dst=a["backend"], dport=8080)
    key = FlowKey(family, proto, 0, a["client"], a["server"], sport, dport)
    if nat == "snat":
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            return key, key._replace(src=a["public"], sport=50001, dport=50001)
        return key, key._replace(src=a["public"], sport=50000)
    return key, key


def flow(key: FlowKey, xlat: FlowKey, tcp: TcpConn | None = None, status: int = 0,
         expires: int = 100 * S, stream_ts: int = 5 * S) -> Flow:
    nat = Status.NAT if xlat != key else 0
    return Flow(key=key, xlat=xlat, machine=0, chain=Service.NAT | Service.COUNT, tcp=tcp,
                status=status | nat, created=S, last_seen=2 * S, expires=expires,
                stream_ts=stream_ts, packets=[10, 9], bytes=[5000, 90000])


def established(a: int, b: int, *, scale: int = 7, win: int = 512, sack: bool = True) -> TcpConn:
    flags = ct_tcp.TCP_FLAG_MAXACK_SET | ct_tcp.TCP_FLAG_WINDOW_SCALE
    flags |= ct_tcp.TCP_FLAG_SACK_PERM if sack else 0
    w = win << scale
    return TcpConn(seen=(TcpDir(a, (b + w) % 2**32, w, b, scale, flags),
                         TcpDir(b, (a + w) % 2**32, w, a, scale, flags)),
                   state=TcpState.ESTABLISHED, last_dir=1, last_index=ct_tcp.TCP_ACK_SET,
                   last_seq=b, last_ack=a, last_end=b, last_win=win, seen_reply=True)


def segment(f: Flow, d: int, seq: int, ack: int, *, flags: int = TCP_ACK, size: int = 0,
            window: int = 512, sack: tuple[tuple[int, int], ...] = (), vlan: int | None = None,
            ts_opt: bool = True) -> bytes:
    k = f.key if d == 0 else f.reply_key
    opts = tcp_options(timestamps=(7, 9) if ts_opt else None, sack=sack)
    return tcp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport, seq=seq % 2**32,
                     ack=ack % 2**32, flags=flags, window=window, options=opts,
                     payload_len=size, vlan=vlan)


def chain(dp: Datapath, entry: bytes, steps: list[tuple[int, bytes, str]]) -> list[Row]:
    """Packets one after the other, each row's entry after the next one's entry before."""
    rows = []
    for ts, frame, what in steps:
        row = run(dp, engine_row(CLASSIFIER, entry, frame, ts, description=what))
        rows.append(row)
        if row.entry_after is not None:
            entry = row.entry_after
    return rows


# -- established TCP ------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("nat", [None, "snat", "lb"])
@pytest.mark.parametrize("isn", [(1000, 7_000_000), (2**32 - 1500, 2**32 - 300)])
def test_established_tcp_flow_runs_as_the_engine(dp, family, nat, isn):
    a, b = isn
    key, xlat = keys(family, PROTO_TCP, nat)
    f = flow(key, xlat, established(a, b), Status.SEEN_REPLY | Status.ASSURED)
    t = 10 * S
    steps = [
        (t, segment(f, 0, a, b, size=1000, flags=TCP_ACK | TCP_PSH), "data"),
        (t + 1, segment(f, 1, b, a + 1000), "ack"),
        (t + 2, segment(f, 0, a + 1000, b, size=1400), "more data"),
        (t + 3, segment(f, 0, a + 1000, b, size=1400), "retransmission 1"),
        (t + 4, segment(f, 0, a + 1000, b, size=1400), "retransmission 2"),
        (t + 5, segment(f, 0, a + 1000, b, size=1400), "retransmission 3"),
        (t + 6, segment(f, 1, b, a + 2400, size=300, sack=((a + 2400, a + 2900),)), "sack"),
        (t + 7, segment(f, 1, b + 300, a + 2400, window=0), "zero window"),
        (t + 8, segment(f, 0, a + 2400, b + 300, size=10, ts_opt=False), "no options"),
        (t + 9, segment(f, 0, a + 10**7, b + 300, size=100), "beyond the window"),
        (t + 10, segment(f, 1, b + 300, a + 10**7), "acks data never sent"),
        (t + 11, segment(f, 0, a + 2410, b - 200_000), "very old ack"),
        (t + 12, segment(f, 0, a - 300_000, b + 300, size=100), "old data"),
        (t + 13, segment(f, 0, a + 2410, b + 300, flags=0), "no ack"),
        (t + 14, segment(f, 0, a + 2410, b + 300, vlan=7), "vlan tag"),
        (t + 15, segment(f, 1, b + 300, a + 2410, flags=TCP_ACK | TCP_FIN), "fin"),
    ]
    rows = chain(dp, f.to_bytes(), steps)
    verdicts = [r.verdict for r in rows]
    assert Verdict.FORWARD in verdicts and Verdict.DROP in verdicts
    assert rows[-1].verdict == PUNT and rows[-1].reason == PuntReason.LIFE
    assert rows[5].entry_after is not None and rows[5].entry_after[92] >= 3  # retrans counted


@pytest.mark.parametrize("flags", [TCP_RST, TCP_RST | TCP_ACK, TCP_SYN, TCP_SYN | TCP_ACK,
                                   TCP_FIN | TCP_ACK])
def test_life_changes_are_handed_back(dp, flags):
    key, xlat = keys(4, PROTO_TCP, "snat")
    f = flow(key, xlat, established(5000, 9000), Status.SEEN_REPLY | Status.ASSURED)
    row = run(dp, engine_row(CLASSIFIER, f.to_bytes(), segment(f, 0, 5000, 9000, flags=flags),
                             10 * S))
    assert (row.verdict, row.reason) == (PUNT, PuntReason.LIFE)
    # the flow is gone from the fast path: the next packet misses, the entry waits intact
    again = dp.test_run(segment(f, 0, 5000, 9000), ts=10 * S + 1)
    assert (again.result, again.code) == (Result.PUNT, PuntReason.MISS)
    assert dp.returned() == [f.to_bytes()[:40]]
    assert dp.remove(key) == f.to_bytes() and len(dp) == 0


@pytest.mark.parametrize("family", [4, 6])
def test_expired_entry_and_miss(dp, family):
    key, xlat = keys(family, PROTO_TCP, "snat")
    f = flow(key, xlat, established(1, 2), Status.SEEN_REPLY, expires=20 * S)
    row = run(dp, engine_row(CLASSIFIER, f.to_bytes(), segment(f, 0, 1, 2), 20 * S))
    assert (row.verdict, row.reason) == (PUNT, PuntReason.EXPIRED)
    other = keys(family, PROTO_TCP, None, sport=41000)[0]
    g = flow(other, other, established(1, 2))
    row = run(dp, engine_row(CLASSIFIER, f.to_bytes(), segment(g, 0, 1, 2), 10 * S))
    assert (row.verdict, row.reason) == (PUNT, PuntReason.MISS)
    row = run(dp, engine_row(CLASSIFIER, None, segment(g, 0, 1, 2), 10 * S))
    assert (row.verdict, row.reason) == (PUNT, PuntReason.MISS)


def test_shapes_the_engine_does_not_process(dp):
    key, xlat = keys(4, PROTO_TCP, "snat")
    f = flow(key, xlat, established(1, 2), Status.SEEN_REPLY)
    frag = bytearray(segment(f, 0, 1, 2, size=100))
    frag[20] |= 0x20  # more fragments: a first fragment is KEY_ONLY
    row = run(dp, engine_row(CLASSIFIER, f.to_bytes(), bytes(frag), 10 * S))
    assert (row.verdict, row.reason) == (PUNT, PuntReason.UNSUPPORTED)
    later = bytearray(frag)
    later[21] = 8  # a non-first fragment: no lookup
    run(dp, engine_row(CLASSIFIER, f.to_bytes(), bytes(later), 10 * S))
    bad_state = f.copy()
    assert bad_state.tcp is not None
    bad_state.tcp.state = 10
    run(dp, engine_row(CLASSIFIER, bad_state.to_bytes(), segment(f, 0, 1, 2), 10 * S))
    key6, xlat6 = keys(6, PROTO_TCP, "snat")
    f6 = flow(key6, xlat6, established(1, 2), Status.SEEN_REPLY)
    plain = segment(f6, 0, 1, 2, size=20)
    hop = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # hop-by-hop options: next TCP, PadN
    ext = bytearray(plain[:54] + hop + plain[54:])
    ext[18:20] = (int.from_bytes(plain[18:20], "big") + 8).to_bytes(2, "big")
    ext[20] = 0  # next header: hop-by-hop
    row = run(dp, engine_row(CLASSIFIER, f6.to_bytes(), bytes(ext), 10 * S))
    assert (row.verdict, row.reason) == (PUNT, PuntReason.UNSUPPORTED)  # KEY_ONLY hit
    row = run(dp, engine_row(CLASSIFIER, None, bytes(ext), 10 * S))
    assert (row.verdict, row.reason) == (PUNT, PuntReason.MISS)
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    row = run(dp, engine_row(CLASSIFIER, None, arp, 10 * S))
    assert (row.verdict, row.reason) == (PUNT, PuntReason.UNSUPPORTED)
    nobody = tcp_frame(src=bytes([1, 2, 3, 4]), dst=bytes([5, 6, 7, 8]), sport=1, dport=2,
                       seq=1, ack=1, flags=TCP_ACK, window=1)
    run(dp, engine_row(CLASSIFIER, None, nobody, 10 * S))


# -- UDP and ICMP echo ----------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("nat", [None, "snat", "lb"])
@pytest.mark.parametrize("status", [0, Status.SEEN_REPLY])
def test_udp(dp, family, nat, status):
    key, xlat = keys(family, PROTO_UDP, nat, dport=53)
    f = flow(key, xlat, status=status)
    k0, k1 = f.key, f.reply_key

    def dgram(k: FlowKey, n: int) -> bytes:
        return udp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport, payload_len=n)

    no_sum = bytearray(dgram(k0, 20))
    if family == 4:
        no_sum[40:42] = b"\0\0"
    steps = [(3 * S, dgram(k0, 30), "query"), (4 * S, dgram(k1, 200), "answer"),
             (6 * S, bytes(no_sum), "no checksum"), (7 * S, dgram(k1, 0), "empty"),
             (200 * S, dgram(k0, 5), "expired")]
    rows = chain(dp, f.to_bytes(), steps)
    assert rows[-1].reason == PuntReason.EXPIRED


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("nat", [None, "snat"])
def test_icmp_echo(dp, family, nat):
    proto = PROTO_ICMP if family == 4 else PROTO_ICMPV6
    key, xlat = keys(family, proto, nat, sport=777, dport=777)
    f = flow(key, xlat)
    k0, k1 = f.key, f.reply_key
    steps = [(3 * S, icmp_echo_frame(src=k0.src, dst=k0.dst, ident=k0.sport, seq=1), "ping"),
             (4 * S, icmp_echo_frame(src=k1.src, dst=k1.dst, ident=k1.sport, seq=1,
                                     reply=True), "pong")]
    rows = chain(dp, f.to_bytes(), steps)
    assert [r.verdict for r in rows] == [Verdict.FORWARD, Verdict.FORWARD]


# -- hypothesis: entries and segments near every edge ---------------------------------------

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
    proto = draw(st.sampled_from([PROTO_TCP, PROTO_TCP, PROTO_TCP, PROTO_UDP, "icmp"]))
    if proto == "icmp":
        proto = PROTO_ICMP if family == 4 else PROTO_ICMPV6
        port = draw(st.integers(0, 0xFFFF))
        key, xlat = keys(family, proto, draw(st.sampled_from([None, "snat"])), port, port)
    else:
        key, xlat = keys(family, proto, draw(st.sampled_from([None, "snat", "lb"])),
                         draw(st.integers(1, 0xFFFF)), draw(st.integers(1, 0xFFFF)))
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
    return flow(key, xlat, tcp, status, expires=draw(st.sampled_from([21 * S, 100 * S])),
                stream_ts=draw(st.sampled_from([10 * S, 40 * S])))


@st.composite
def _packet(draw, f: Flow):
    d = draw(st.integers(0, 1))
    k = f.key if d == 0 else f.reply_key
    if f.key.proto == PROTO_TCP:
        assert f.tcp is not None
        near = f.tcp.seen[d].end
        other = f.tcp.seen[1 - d].end
        seq = draw(st.one_of(_NEAR_WRAP, st.integers(near - 70000, near + 70000).map(
            lambda v: v % 2**32)))
        ack = draw(st.one_of(_NEAR_WRAP, st.just(other), st.integers(
            other - 70000, other + 3000).map(lambda v: v % 2**32)))
        flags = draw(st.sampled_from([TCP_ACK, TCP_ACK, TCP_ACK | 0x08, TCP_ACK | 0x20,
                                      TCP_ACK | 0xC8, 0x08, 0, TCP_SYN | TCP_ACK,
                                      TCP_FIN | TCP_ACK, TCP_RST]))
        sack = tuple((draw(_NEAR_WRAP), r) for r in draw(st.lists(st.one_of(
            _NEAR_WRAP, st.integers(ack, ack + 5000).map(lambda v: v % 2**32)), max_size=3)))
        options = tcp_options(timestamps=(1, 2) if draw(st.booleans()) else None, sack=sack)
        frame = tcp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport, seq=seq, ack=ack,
                          flags=flags, window=draw(st.sampled_from([0, 1, 512, 65535])),
                          options=options, payload_len=draw(st.sampled_from([0, 1, 100, 1400])))
    elif f.key.proto == PROTO_UDP:
        frame = udp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport,
                          payload_len=draw(st.integers(0, 64)))
        if f.key.family == 4 and draw(st.booleans()):
            frame = frame[:40] + b"\0\0" + frame[42:]  # UDP over IPv4 without a checksum
    else:
        frame = icmp_echo_frame(src=k.src, dst=k.dst, ident=k.sport, seq=draw(st.integers(0, 9)),
                                reply=d == 1)
    return draw(st.sampled_from([20 * S + 1, 30 * S, 60 * S])), frame


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_window_tracking_edge_cases(dp, data):
    f = data.draw(_flow())
    packets = sorted(data.draw(st.lists(_packet(f), min_size=1, max_size=6)),
                     key=lambda p: p[0])
    chain(dp, f.to_bytes(), [(ts, frame, f"hypothesis packet {i}")
                             for i, (ts, frame) in enumerate(packets)])


# -- the cache and the modes ----------------------------------------------------------------

def test_insert_refuses_duplicates_and_a_full_cache(dp):
    dp.clear()
    entries = []
    for i in range(8):
        key, xlat = keys(4, PROTO_UDP, "snat", sport=1000 + i)
        entries.append(flow(key, xlat._replace(sport=2000 + i)).to_bytes())
        assert dp.insert(entries[-1])
    assert not dp.insert(entries[0])  # same key
    key, xlat = keys(4, PROTO_UDP, "snat", sport=5000)
    assert not dp.insert(flow(key, xlat._replace(sport=9999)).to_bytes())  # full
    same_reply = flow(key, keys(4, PROTO_UDP, "snat", sport=1000)[1]._replace(sport=2000))
    assert dp.remove(entries[7][:40]) == entries[7]
    assert not dp.insert(same_reply.to_bytes())  # its reply key is entry 0's
    assert sorted(dp.entries()) == sorted(entries[:7])
    with pytest.raises(ValueError, match="224 bytes"):
        dp.insert(b"short")
    dp.clear()
    assert len(dp) == 0


def test_punt_all_mode_and_counters(dp):
    key, xlat = keys(4, PROTO_TCP, "snat")
    f = flow(key, xlat, established(1000, 2000), Status.SEEN_REPLY | Status.ASSURED)
    dp.clear()
    assert dp.insert(f.to_bytes())
    before = dp.punt_counts()
    dp.set_mode(Mode.PUNT_ALL)
    try:
        r = dp.test_run(segment(f, 0, 1000, 2000, size=10), ts=10 * S)
        assert (r.result, r.code, r.ifindex) == (Result.PUNT, PuntReason.MISS, PUNT_IFINDEX)
        assert dp.get(key) == f.to_bytes()
    finally:
        dp.set_mode(Mode.FAST)
    forwarded = dp.forwarded()
    r = dp.test_run(segment(f, 0, 1000, 2000, size=10), ts=10 * S)
    assert (r.result, r.code) == (Result.FORWARD, Reason.ESTABLISHED)
    assert dp.forwarded() == forwarded + 1
    assert dp.punt_counts()[PuntReason.MISS] == before[PuntReason.MISS] + 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="capacity"):
        Datapath("x", 0, CLASSIFIER, uplink=PORTS[0], machine_ports=[], punt_ifindex=1)
    with pytest.raises(ValueError, match="name"):
        Datapath("a/b", 4, CLASSIFIER, uplink=PORTS[0], machine_ports=[], punt_ifindex=1)


def test_a_datapath_with_the_same_name_is_refused_and_close_removes_its_pins(dp):
    assert dp.pin_dir.is_dir()
    with pytest.raises(FileExistsError):
        Datapath(dp.name, 4, CLASSIFIER, uplink=PORTS[0], machine_ports=[], punt_ifindex=1)
    assert dp.pin_dir.is_dir()  # the refused one took nothing of the first one's
    machines = parse_config(LAB, "lab").machines  # the machines or their Classifier
    with Datapath(f"u{os.getpid()}", 4, machines, uplink=PORTS[0], machine_ports=[],
                  punt_ifindex=1) as other:
        pins = sorted(p.name for p in other.pin_dir.iterdir())
        assert pins == sorted(["fs_flows", "fs_replies", "fs_holds", "fs_config", "fs_ports",
                               "fs_punts", "pnic_ingress", "hold_ctl"])
    assert not other.pin_dir.exists()


def test_a_table_of_rows_runs_and_non_ethernet_rows_are_counted_apart(dp):
    key, xlat = keys(4, PROTO_UDP, "snat", dport=53)
    f = flow(key, xlat)
    k = f.key
    frame = udp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport, payload_len=4)
    rows = [engine_row(CLASSIFIER, f.to_bytes(), frame, 3 * S, description="ethernet"),
            engine_row(CLASSIFIER, f.to_bytes(), frame[14:], 3 * S, linktype=101,
                       description="raw IP")]
    assert rows[1].verdict == Verdict.FORWARD  # the engine runs raw IP; tc never sees it
    assert check_rows(dp, rows, CLASSIFIER, PORTS) == (1, 1)


def test_another_process_reaches_the_maps_by_their_pins(dp):
    """What the VNIC daemon does: BPF_OBJ_GET on the pinned paths, then map operations."""
    key, xlat = keys(4, PROTO_UDP, "snat", dport=53)
    entry = flow(key, xlat).to_bytes()
    dp.clear()
    assert dp.insert(entry)
    fd = bpfsys.obj_get(dp.pin_dir / "fs_flows")
    try:
        info = bpfsys.map_info(fd)
        assert (info.key_size, info.value_size, info.max_entries) == (40, 224, 8)
        assert bpfsys.lookup(fd, entry[:40], info.value_size) == entry
        assert bpfsys.next_key(fd, None, info.key_size) == entry[:40]
    finally:
        os.close(fd)
    dp.clear()


# -- the real capture ------------------------------------------------------------------------

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/corpus/real not present")
def test_real_capture_rows_match_the_engine():
    """The real LB gateway capture: its first half through the reference chains, every
    established flow then offloaded, and each later packet a row (the flow's entry as the
    engine left it before the packet) through the engine and the datapath."""
    cfg = load_config(REAL / "lb-gateway.toml")
    classifier = Classifier(cfg.machines)
    with open_trace(REAL / "replay_input.pcap") as reader:
        # the capture is cut to a snaplen; the kernel sees whole frames: pad the payload
        frames = [(f.ts_ns, bytes(f.data).ljust(f.wire_len, b"\0"), f.linktype)
                  for f in reader]
    chains = [Chain(m, i) for i, m in enumerate(cfg.machines)]
    entries: dict[bytes, bytes] = {}
    index: dict[bytes, bytes] = {}
    pos = 0
    for k in range(1, 10):  # the first tenth after which a dozen flows are live and offloadable
        mark = len(frames) * k // 10
        for now, data, lt in frames[pos:mark]:
            pkt = parse(bytearray(data), lt, len(data))
            if pkt.error in (ParseError.OK, ParseError.UNSUPPORTED_PROTOCOL):
                m, direction = classifier.classify(pkt)
                if m >= 0:
                    chains[m].process(pkt, direction, now)
        pos = mark
        now = frames[mark][0]
        live = [f.to_bytes() for c in chains for f in c.flows
                if offloadable(f) and f.expires > now]
        if len(live) >= 12:
            break
    for raw in live:
        entries[raw[:40]] = raw
        index[raw[:40]] = index[reply_key(raw)] = raw[:40]
    ports = {i: Port(30 + i, bytes([2, 0, 0, 0, 3, i]), bytes([2, 0, 0, 0, 4, i]))
             for i in range(len(cfg.machines) + 1)}
    outcomes: Counter[tuple[int, int]] = Counter()
    with Datapath(f"r{os.getpid()}", 8, classifier, uplink=ports[0],
                  machine_ports=[ports[1 + i] for i in range(len(cfg.machines))],
                  punt_ifindex=PUNT_IFINDEX, clock=Clock.TSTAMP) as dp:
        for ts, data, lt in frames[pos:]:
            pkt = parse(bytearray(data), lt, len(data))
            orig = None
            if pkt.error == ParseError.OK and pkt.inner is None and not pkt.frag_offset:
                m, _ = classifier.classify(pkt)
                orig = index.get(key_bytes(pkt.key(m))) if m >= 0 else None
            entry = entries.get(orig) if orig is not None else None
            row = engine_row(classifier, entry, data, ts, lt)
            assert check_rows(dp, [row], classifier, ports) == (1, 0)
            outcomes[(row.verdict, row.reason)] += 1
            if orig is None or row.entry_after is None:
                continue
            if row.verdict == PUNT and row.reason != PuntReason.MISS:  # handed back
                del index[orig], index[reply_key(entries.pop(orig))]
            else:
                entries[orig] = row.entry_after
    assert outcomes[(Verdict.FORWARD, Reason.ESTABLISHED)] > 1000
    assert outcomes[(PUNT, PuntReason.LIFE)] > 0


def test_packets_of_one_flow_on_two_cpus_lose_no_update(dp):
    """Both cores run the same flow's packets at once (BPF_PROG_TEST_RUN with repeat, from two
    threads): the flow's lock serializes the entry's updates, so no count is lost."""
    key, xlat = keys(4, PROTO_UDP, None, dport=53)
    f = flow(key, xlat, status=Status.SEEN_REPLY)
    k = f.key
    frame = udp_frame(src=k.src, dst=k.dst, sport=k.sport, dport=k.dport, payload_len=10)
    dp.clear()
    assert dp.insert(f.to_bytes())
    calls, repeat = 20, 50000

    def hammer() -> None:
        for _ in range(calls):
            assert dp.test_run(frame, ts=3 * S, repeat=repeat).result is Result.FORWARD

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    after = dp.get(key)
    assert after is not None
    sent = 2 * calls * repeat
    assert struct.unpack_from("<2Q", after, 180) == (f.packets[0] + sent, f.packets[1])
    assert struct.unpack_from("<Q", after, 196)[0] == f.bytes[0] + sent * (len(frame) - 14)
    dp.clear()
