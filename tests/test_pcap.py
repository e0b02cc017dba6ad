"""Trace reading and writing: classic pcap and pcapng, hand-built, tool-written and real."""

from __future__ import annotations

import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.packet import pcap
from flowshift.packet.pcap import (
    Frame,
    PcapWriter,
    TraceError,
    open_trace,
    trace_linktype_name,
)

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
TCPDUMP = CORPUS / "tcpdump"


# ---- hand-built traces -------------------------------------------------------------------


def classic_pcap(
    records: list[tuple[int, int, bytes, int]],
    *,
    big: bool = False,
    nano: bool = False,
    snaplen: int = 65535,
    linktype: int = 1,
) -> bytes:
    """A classic pcap file of (seconds, fraction, data, wire_len) records."""
    o = ">" if big else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for sec, frac, data, wire in records:
        out.append(struct.pack(o + "IIII", sec, frac, len(data), wire) + data)
    return b"".join(out)


def block(btype: int, body: bytes, big: bool = False) -> bytes:
    o = ">" if big else "<"
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(o + "II", btype, n) + body + struct.pack(o + "I", n)


def shb(big: bool = False) -> bytes:
    o = ">" if big else "<"
    return block(0x0A0D0D0A, struct.pack(o + "IHHq", 0x1A2B3C4D, 1, 0, -1), big)


def option(code: int, value: bytes, big: bool = False) -> bytes:
    o = ">" if big else "<"
    return struct.pack(o + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def idb(
    linktype: int,
    snaplen: int = 0,
    tsresol: int | None = None,
    tsoffset: int | None = None,
    big: bool = False,
) -> bytes:
    o = ">" if big else "<"
    opts = b""
    if tsresol is not None:
        opts += option(9, bytes([tsresol]), big)
    if tsoffset is not None:
        opts += option(14, struct.pack(o + "q", tsoffset), big)
    if opts:
        opts += option(0, b"", big)
    return block(1, struct.pack(o + "HHI", linktype, 0, snaplen) + opts, big)


def epb(if_id: int, units: int, data: bytes, wire: int | None = None, big: bool = False) -> bytes:
    o = ">" if big else "<"
    wire = len(data) if wire is None else wire
    head = struct.pack(o + "IIIII", if_id, units >> 32, units & 0xFFFFFFFF, len(data), wire)
    return block(6, head + data, big)


def spb(data: bytes, wire: int, big: bool = False) -> bytes:
    return block(3, struct.pack(">I" if big else "<I", wire) + data, big)


def frame_bytes(i: int, n: int = 60) -> bytes:
    return bytes((i + k) % 256 for k in range(n))


def read_all(path: Path) -> tuple[list[Frame], pcap.TraceReader]:
    with open_trace(path) as reader:
        frames = list(reader)
    return frames, reader


def write(tmp_path: Path, content: bytes, name: str = "t.pcap") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# ---- classic pcap ------------------------------------------------------------------------


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("nano", [False, True])
def test_classic_pcap_byte_orders_and_resolutions(tmp_path: Path, big: bool, nano: bool) -> None:
    records = [(1_700_000_000 + i, 999_999 - i, frame_bytes(i, 40 + i), 40 + i) for i in range(5)]
    frames, reader = read_all(write(tmp_path, classic_pcap(records, big=big, nano=nano)))
    assert reader.format == "pcap"
    assert reader.problem is None
    assert reader.linktypes == {1}
    assert reader.position == reader.size
    assert [f.data for f in frames] == [r[2] for r in records]
    scale = 1 if nano else 1000
    assert [f.ts_ns for f in frames] == [s * 10**9 + frac * scale for s, frac, _, _ in records]
    assert all(f.linktype == 1 and f.interface == 0 for f in frames)


def test_snaplen_cut_frames_keep_their_wire_length(tmp_path: Path) -> None:
    path = tmp_path / "cut.pcap"
    with PcapWriter(path, snaplen=64) as w:
        w.write(5, frame_bytes(1, 100))
        w.write(6, frame_bytes(2, 30), wire_len=1514)
    frames, reader = read_all(path)
    assert [(len(f.data), f.wire_len) for f in frames] == [(64, 100), (30, 1514)]
    assert frames[0].data == frame_bytes(1, 100)[:64]
    assert reader.problem is None


def test_wire_length_smaller_than_captured_is_raised_to_it(tmp_path: Path) -> None:
    frames, _ = read_all(write(tmp_path, classic_pcap([(0, 0, b"x" * 20, 0)])))
    assert frames[0].wire_len == 20


def test_linktype_field_upper_bits_are_fcs_information(tmp_path: Path) -> None:
    frames, reader = read_all(write(tmp_path, classic_pcap([(0, 0, b"x", 1)], linktype=0x14000001)))
    assert reader.linktypes == {1} and frames[0].linktype == 1


def test_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rt.pcap"
    sent = [
        (1_600_000_000_123_456_789 + i * 7, frame_bytes(i, 14 + i), 14 + 2 * i) for i in range(50)
    ]
    with PcapWriter(path, linktype=101) as w:
        for ts, data, wire in sent:
            w.write(ts, data, wire)
    assert path.read_bytes()[:4] == struct.pack("<I", 0xA1B23C4D)  # the nanosecond magic
    frames, reader = read_all(path)
    assert [(f.ts_ns, f.data, f.wire_len, f.linktype) for f in frames] == [
        (ts, data, wire, 101) for ts, data, wire in sent
    ]
    assert reader.problem is None and reader.position == reader.size == path.stat().st_size


def test_writer_refuses_a_timestamp_pcap_cannot_hold(tmp_path: Path) -> None:
    with PcapWriter(tmp_path / "w.pcap") as w, pytest.raises(ValueError, match="timestamp"):
        w.write(-1, b"x")


@pytest.mark.parametrize("chunk", [32, 100, 1 << 20])
def test_reading_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(pcap, "CHUNK", chunk)
    records = [(i, i, frame_bytes(i, 1 + (i * 37) % 300), 400) for i in range(40)]
    frames, reader = read_all(write(tmp_path, classic_pcap(records)))
    assert [f.data for f in frames] == [r[2] for r in records]
    assert reader.problem is None


def test_truncated_last_record_keeps_the_frames_before(tmp_path: Path) -> None:
    content = classic_pcap([(1, 0, frame_bytes(1, 100), 100), (2, 0, frame_bytes(2, 1514), 1514)])
    cut = content[:-1314]  # 200 bytes of the second frame's 1514 remain
    frames, reader = read_all(write(tmp_path, cut))
    assert [f.data for f in frames] == [frame_bytes(1, 100)]
    offset = 24 + 16 + 100
    assert reader.problem == (
        f"truncated record at byte {offset}: header says 1514 bytes, 200 left"
    )
    assert reader.position == offset


def test_truncated_record_header(tmp_path: Path) -> None:
    content = classic_pcap([(1, 0, b"abcd", 4)]) + b"\0" * 5
    frames, reader = read_all(write(tmp_path, content))
    assert len(frames) == 1
    assert reader.problem == "truncated record header at byte 44: 16 bytes needed, 5 left"


def test_record_claiming_an_impossible_length_is_corrupt(tmp_path: Path) -> None:
    content = classic_pcap([(1, 0, b"abcd", 4)]) + struct.pack("<IIII", 2, 0, 0x7FFFFFF0, 60)
    frames, reader = read_all(write(tmp_path, content + b"\0" * 100))
    assert len(frames) == 1
    assert reader.problem is not None
    assert reader.problem.startswith("corrupt record at byte 44: captured length 2147483632")


# ---- pcapng ------------------------------------------------------------------------------


def test_pcapng_interfaces_with_their_own_link_types_and_resolutions(tmp_path: Path) -> None:
    content = (
        shb()
        + idb(1)  # default: microseconds
        + idb(101, tsresol=9)  # nanoseconds
        + idb(113, tsresol=0x80 | 10)  # 2^-10 s
        + idb(228, tsresol=3, tsoffset=1_000)  # milliseconds, 1000 s later
        + epb(0, 1_700_000_000_000_001, b"eth")
        + epb(1, 1_700_000_000_000_000_002, b"raw")
        + epb(2, 3 * 1024 + 512, b"sll")
        + epb(3, 1_234, b"ip4")
    )
    frames, reader = read_all(write(tmp_path, content, "t.pcapng"))
    assert reader.format == "pcapng" and reader.problem is None
    assert reader.linktypes == {1, 101, 113, 228}
    assert [(f.ts_ns, f.data, f.linktype, f.interface) for f in frames] == [
        (1_700_000_000_000_001_000, b"eth", 1, 0),
        (1_700_000_000_000_000_002, b"raw", 101, 1),
        (3_500_000_000, b"sll", 113, 2),
        (1_001_234_000_000, b"ip4", 228, 3),
    ]
    assert reader.position == reader.size


def test_pcapng_resolution_finer_than_a_nanosecond(tmp_path: Path) -> None:
    content = shb() + idb(1, tsresol=12) + epb(0, 5_000_000_123_456, b"x")
    frames, _ = read_all(write(tmp_path, content, "t.pcapng"))
    assert frames[0].ts_ns == 5_000_000_123


def test_pcapng_sections_with_either_byte_order(tmp_path: Path) -> None:
    content = (
        shb(big=True)
        + idb(1, big=True)
        + epb(0, 10, b"first", 99, big=True)
        + shb()  # a new section: interface ids start again
        + idb(101, tsresol=9)
        + epb(0, 20, b"second")
        + shb(big=True)
        + idb(113, big=True)
        + idb(1, big=True)
        + epb(1, 30, b"third", big=True)
    )
    frames, reader = read_all(write(tmp_path, content, "t.pcapng"))
    assert reader.problem is None
    assert [(f.data, f.ts_ns, f.linktype, f.wire_len) for f in frames] == [
        (b"first", 10_000, 1, 99),
        (b"second", 20, 101, 6),
        (b"third", 30_000, 1, 5),
    ]


@pytest.mark.parametrize("big", [False, True])
def test_simple_packet_blocks(tmp_path: Path, big: bool) -> None:
    content = (
        shb(big)
        + idb(1, snaplen=8, big=big)
        + epb(0, 7, b"epb", big=big)
        + spb(b"0123456789", 10, big)  # captured: min(wire, snaplen 8)
        + spb(b"abc", 3, big)
        + spb(b"abcdefgh", 1500, big)
    )
    frames, reader = read_all(write(tmp_path, content, "t.pcapng"))
    assert reader.problem is None
    assert [(f.data, f.wire_len, f.ts_ns) for f in frames] == [
        (b"epb", 3, 7000),
        (b"01234567", 10, 7000),  # no timestamp of its own: the one before
        (b"abc", 3, 7000),
        (b"abcdefgh", 1500, 7000),
    ]


def test_unknown_blocks_are_skipped(tmp_path: Path) -> None:
    content = (
        shb()
        + block(4, b"\x01\x00\x08\x00\x0a\x00\x00\x01host\0\0\0\0")  # name resolution
        + idb(1)
        + block(5, b"\0" * 12)  # interface statistics
        + epb(0, 1, b"a")
        + block(0x00000BAD, b"custom data")
        + block(0x40000BAD, b"")
        + epb(0, 2, b"b")
    )
    frames, reader = read_all(write(tmp_path, content, "t.pcapng"))
    assert [f.data for f in frames] == [b"a", b"b"] and reader.problem is None


def test_obsolete_packet_block(tmp_path: Path) -> None:
    body = struct.pack("<HHIIII", 1, 0, 0, 5, 3, 60) + b"opb"
    content = shb() + idb(1) + idb(101) + block(2, body)
    frames, _ = read_all(write(tmp_path, content, "t.pcapng"))
    assert [(f.data, f.interface, f.linktype, f.wire_len) for f in frames] == [(b"opb", 1, 101, 60)]


def test_corrupt_block_stops_with_its_offset(tmp_path: Path) -> None:
    good = shb() + idb(1) + epb(0, 1, b"kept")
    bad = bytearray(epb(0, 2, b"lost"))
    bad[-4:] = struct.pack("<I", 999)  # trailing length disagrees
    content = good + bytes(bad) + epb(0, 3, b"after")
    frames, reader = read_all(write(tmp_path, content, "t.pcapng"))
    assert [f.data for f in frames] == [b"kept"]
    assert reader.problem == (
        f"corrupt block at byte {len(good)}: trailing length 999 differs from leading length "
        f"{len(bad)}"
    )


@pytest.mark.parametrize(
    ("tail", "problem"),
    [
        (struct.pack("<II", 6, 7) + b"\0" * 8, "corrupt block at byte {n}: block length 7"),
        (epb(0, 1, b"abcdef")[:-3], "truncated block at byte {n}: header says 40 bytes, 37 left"),
        (b"\x06\0\0\0", "truncated block header at byte {n}: 4 bytes left"),
        (epb(4, 1, b"x"), "corrupt packet block at byte {n}: interface 4 not described (1 in"),
        (block(6, struct.pack("<IIIII", 0, 0, 0, 500, 500)), "corrupt packet block at byte {n}: "),
    ],
)
def test_broken_pcapng_tails(tmp_path: Path, tail: bytes, problem: str) -> None:
    good = shb() + idb(1) + epb(0, 1, b"kept")
    frames, reader = read_all(write(tmp_path, good + tail, "t.pcapng"))
    assert [f.data for f in frames] == [b"kept"]
    assert reader.problem is not None
    assert reader.problem.startswith(problem.format(n=len(good)))


def test_simple_packet_block_before_any_interface(tmp_path: Path) -> None:
    frames, reader = read_all(write(tmp_path, shb() + spb(b"x", 1), "t.pcapng"))
    assert frames == []
    assert (
        reader.problem == "corrupt simple packet block at byte 28: no interface described before it"
    )


# ---- not a trace -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"<html><body>hello</body></html>\n", "(starts with 0x3c68746d)"),
        (b"", "(empty file)"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "(pcap file header cut at 6 of 24 bytes)"),
        (b"\x0a\x0d\x0d\x0a" + b"\0" * 40, "(pcapng section header without byte-order magic)"),
    ],
)
def test_not_a_trace_is_one_line_naming_the_file(tmp_path: Path, content: bytes, why: str) -> None:
    path = write(tmp_path, content, "foo.txt")
    with pytest.raises(TraceError) as err:
        open_trace(path)
    assert str(err.value) == f"not a pcap or pcapng trace: {path} {why}"


@pytest.mark.parametrize("name", ["missing.pcap", "."])
def test_unopenable_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(TraceError, match=r"^cannot open trace: .*\(.+\)$") as err:
        open_trace(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_linktype_names() -> None:
    assert trace_linktype_name(1) == "ethernet"
    assert trace_linktype_name(276) == "linux-sll2"
    assert trace_linktype_name(101) == trace_linktype_name(12) == "raw"
    assert trace_linktype_name(4242) == "linktype-4242"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    head=st.sampled_from(
        [classic_pcap([]), classic_pcap([], big=True, nano=True), shb(), shb() + idb(1), shb(True)]
    ),
    tail=st.binary(max_size=300),
)
def test_garbage_after_a_header_never_raises(tmp_path: Path, head: bytes, tail: bytes) -> None:
    path = write(tmp_path, head + tail, "fuzz")
    frames, reader = read_all(path)
    assert reader.problem is not None or reader.position == reader.size
    assert all(len(f.data) <= f.wire_len for f in frames)


# ---- files written by real tools ---------------------------------------------------------

needs_wireshark = pytest.mark.skipif(
    not (shutil.which("editcap") and shutil.which("mergecap")), reason="editcap/mergecap missing"
)


def run_tool(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


@needs_wireshark
def test_editcap_pcapng_matches_its_source(tmp_path: Path) -> None:
    src = tmp_path / "src.pcap"
    with PcapWriter(src, snaplen=200) as w:
        for i in range(30):
            w.write(1_700_000_000_000_000_000 + i * 123_457, frame_bytes(i, 60 + 10 * i))
    run_tool("editcap", "-F", "pcapng", src, tmp_path / "out.pcapng")
    original, _ = read_all(src)
    converted, reader = read_all(tmp_path / "out.pcapng")
    assert reader.format == "pcapng" and reader.problem is None
    assert converted == original


@needs_wireshark
def test_mergecap_interfaces_with_different_link_types(tmp_path: Path) -> None:
    eth = [(1000 + 2 * i, 5, frame_bytes(i, 60), 60) for i in range(5)]
    raw = [(1001 + 2 * i, 7, b"\x45" + frame_bytes(i, 39), 40) for i in range(5)]
    write(tmp_path, classic_pcap(eth), "eth.pcap")
    write(tmp_path, classic_pcap(raw, big=True, linktype=101), "raw.pcap")
    run_tool("mergecap", "-F", "pcapng", "-w", tmp_path / "m.pcapng",
             tmp_path / "eth.pcap", tmp_path / "raw.pcap")  # fmt: skip
    frames, reader = read_all(tmp_path / "m.pcapng")
    assert reader.problem is None and reader.linktypes == {1, 101}
    expected = sorted(
        [(s * 10**9 + f * 1000, d, 1) for s, f, d, _ in eth]
        + [(s * 10**9 + f * 1000, d, 101) for s, f, d, _ in raw]
    )
    assert [(f.ts_ns, f.data, f.linktype) for f in frames] == expected


# ---- the tcpdump test-suite corpus -------------------------------------------------------

needs_corpus = pytest.mark.skipif(not TCPDUMP.is_dir(), reason=f"corpus not found at {TCPDUMP}")


@needs_corpus
def test_every_corpus_file_reads_or_stops_with_a_named_problem() -> None:
    outcome = {"complete": 0, "problem": 0, "not a trace": 0}
    formats = set()
    frames = 0
    for path in sorted(TCPDUMP.iterdir()):
        try:
            with open_trace(path) as reader:
                frames += sum(1 for _ in reader)
        except TraceError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            outcome["not a trace"] += 1
            continue
        formats.add(reader.format)
        if reader.problem is None:
            assert reader.position == reader.size, path
            outcome["complete"] += 1
        else:
            assert " at byte " in reader.problem and "\n" not in reader.problem, reader.problem
            outcome["problem"] += 1
    assert sum(outcome.values()) == len(list(TCPDUMP.iterdir())) >= 800
    # every file of tcpdump's suite is a well-formed trace; the damage is inside the packets
    assert outcome == {"complete": sum(outcome.values()), "problem": 0, "not a trace": 0}
    assert formats == {"pcap", "pcapng"}
    assert frames > 10_000


@needs_corpus
def test_corpus_sample_agrees_with_scapy() -> None:
    scapy_utils = pytest.importorskip("scapy.utils")
    paths = sorted(TCPDUMP.iterdir())
    sample = paths[::20] + [p for p in paths if p.suffix == ".pcapng"][:15]
    compared = 0
    for path in sample:
        frames, _ = read_all(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with scapy_utils.RawPcapReader(str(path)) as theirs:
                records = list(theirs)
                nano = getattr(theirs, "nano", False)
        assert len(frames) == len(records), path
        for frame, (data, meta) in zip(frames, records, strict=True):
            # scapy cuts frames at its MTU (65535) and keeps the captured length apart
            assert frame.data[: len(data)] == data, path
            if hasattr(meta, "tshigh"):  # pcapng
                assert frame.ts_ns == ((meta.tshigh << 32) | meta.tslow) * 10**9 // meta.tsresol
                assert frame.linktype == meta.linktype
            else:
                assert len(frame.data) == meta.caplen
                assert frame.ts_ns == meta.sec * 10**9 + meta.usec * (1 if nano else 1000)
            assert frame.wire_len == max(meta.wirelen, len(frame.data))
            compared += 1
    assert compared > 300
