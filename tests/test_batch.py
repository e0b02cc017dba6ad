"""Batches of frames as arrays: the same frames, times and problems as the per-frame reader."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.packet import batch as batch_mod
from flowshift.packet import pcap as pcap_mod
from flowshift.packet.batch import Batch, read_batches
from flowshift.packet.pcap import Frame, PcapWriter, TraceError, open_trace
from test_pcap import block, epb, frame_bytes, idb, shb, spb

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
TCPDUMP = CORPUS / "tcpdump"


def classic_pcap(records: list[tuple[int, int, bytes, int]], big: bool, nano: bool) -> bytes:
    o = ">" if big else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(o + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)]
    out += [struct.pack(o + "IIII", s, f, len(d), w) + d for s, f, d, w in records]
    return b"".join(out)


def frames_of(batches: list[Batch]) -> list[Frame]:
    out = []
    for b in batches:
        assert b.ts_ns.dtype == np.int64 and b.caplen.dtype == np.uint32
        assert b.wire_len.dtype == np.uint32 and b.linktype.dtype == np.uint16
        assert b.offset.dtype == np.int64 and b.buf.dtype == np.uint8
        # frames lie in buf in order, none over another (with record headers between them
        # when buf maps the file)
        end = b.offset + b.caplen
        assert (b.offset >= 0).all() and (end <= len(b.buf)).all()
        assert (b.offset[1:] >= end[:-1]).all()
        assert b.buf.flags.writeable
        out += [
            Frame(int(b.ts_ns[i]), b.frame(i), int(b.wire_len[i]), int(b.linktype[i]))
            for i in range(len(b))
        ]
    return out


def per_frame(path: Path) -> tuple[list[Frame], str | None]:
    with open_trace(path) as reader:
        frames = [Frame(f.ts_ns, f.data, f.wire_len, f.linktype) for f in reader]
    return frames, reader.problem


def assert_same_as_per_frame(path: Path, batch_size: int = 65536) -> list[Batch]:
    batches = list(read_batches(path, batch_size))
    frames, problem = per_frame(path)
    assert frames_of(batches) == frames
    assert all(len(b) == batch_size for b in batches[:-1])
    assert [b.problem for b in batches[:-1]] == [None] * (len(batches) - 1)
    assert (batches[-1].problem if batches else None) == problem
    return batches


def records(n: int) -> list[tuple[int, int, bytes, int]]:
    return [
        (1_000 + i, (i * 7919) % 1_000_000, bytes([i % 256]) * (1 + i * 13 % 200), 300)
        for i in range(n)
    ]


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("nano", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, 50, 65536])
def test_classic_pcap_batches_equal_per_frame_reading(
    tmp_path: Path, big: bool, nano: bool, batch_size: int
) -> None:
    path = tmp_path / "t.pcap"
    path.write_bytes(classic_pcap(records(50), big, nano))
    batches = assert_same_as_per_frame(path, batch_size)
    assert sum(len(b) for b in batches) == 50
    assert len(batches) == -(-50 // batch_size)


@pytest.mark.parametrize("chunk", [16, 40, 333])
def test_small_chunks_and_records_longer_than_a_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(batch_mod, "CHUNK", chunk)
    path = tmp_path / "t.pcap"
    path.write_bytes(classic_pcap(records(60), big=False, nano=True))
    assert_same_as_per_frame(path, 25)


def test_writer_output_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "w.pcap"
    with PcapWriter(path, linktype=101, snaplen=100) as w:
        for i in range(1000):
            w.write(1_700_000_000_000_000_000 + i, bytes([i % 256]) * (i % 150), 150)
    batches = assert_same_as_per_frame(path, 300)
    assert [len(b) for b in batches] == [300, 300, 300, 100]
    assert batches[0].wire_len[5] == 150 and batches[0].caplen[120] == 100
    assert set(np.concatenate([b.linktype for b in batches]).tolist()) == {101}


@pytest.mark.parametrize(
    ("tail", "problem_start"),
    [
        (struct.pack("<IIII", 9, 0, 100, 100) + b"x" * 30, "truncated record at byte"),
        (b"\0" * 9, "truncated record header at byte"),
        (struct.pack("<IIII", 9, 0, 1 << 30, 100) + b"x" * 30, "corrupt record at byte"),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_problem_on_the_last_batch(
    tmp_path: Path, tail: bytes, problem_start: str, batch_size: int
) -> None:
    path = tmp_path / "cut.pcap"
    path.write_bytes(classic_pcap(records(4), big=False, nano=False) + tail)
    batches = assert_same_as_per_frame(path, batch_size)
    assert batches[-1].problem is not None and batches[-1].problem.startswith(problem_start)
    assert sum(len(b) for b in batches) == 4


def test_rewriting_a_batch_leaves_the_trace_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "t.pcap"
    data = classic_pcap(records(50), big=False, nano=True)
    path.write_bytes(data)
    batches = list(read_batches(path, 7))
    for b in batches:
        for i in range(len(b)):  # every frame's bytes overwritten, as a NAT rewrite would
            b.buf[b.offset[i] : b.offset[i] + b.caplen[i]] = 0xEE
    assert all(b.frame(i) == b"\xee" * int(b.caplen[i]) for b in batches for i in range(len(b)))
    assert path.read_bytes() == data
    assert frames_of(list(read_batches(path, 7))) == per_frame(path)[0]


def test_a_pipe_reads_like_a_file(tmp_path: Path) -> None:
    path = tmp_path / "t.pcap"
    path.write_bytes(classic_pcap(records(30), big=True, nano=False))
    frames, problem = per_frame(path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["cp", str(path), str(fifo)])
    try:
        batches = list(read_batches(fifo, 8))
    finally:
        writer.wait(timeout=30)
    assert frames_of(batches) == frames and problem is None


def test_problem_before_any_frame_comes_in_an_empty_batch(tmp_path: Path) -> None:
    path = tmp_path / "cut.pcap"
    path.write_bytes(classic_pcap([], big=True, nano=False) + b"\0" * 9)
    (only,) = assert_same_as_per_frame(path)
    assert len(only) == 0 and len(only.buf) == 0
    assert only.problem == "truncated record header at byte 24: 16 bytes needed, 9 left"


def test_empty_trace_has_no_batches(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    with PcapWriter(path):
        pass
    assert list(read_batches(path)) == []


def test_not_a_trace_raises_before_the_first_batch(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, world\n")
    with pytest.raises(TraceError, match=r"not a pcap or pcapng trace: .*notes\.txt"):
        read_batches(path)
    with pytest.raises(ValueError, match="batch_size"):
        read_batches(path, 0)


@pytest.mark.skipif(not shutil.which("editcap"), reason="editcap missing")
def test_pcapng_batches(tmp_path: Path) -> None:
    src = tmp_path / "src.pcap"
    src.write_bytes(classic_pcap(records(40), big=False, nano=False))
    dst = tmp_path / "t.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(src), str(dst)], check=True, capture_output=True)
    batches = assert_same_as_per_frame(dst, 16)
    assert frames_of(batches) == frames_of(list(read_batches(src, 16)))
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(dst.read_bytes()[:-10])
    batches = assert_same_as_per_frame(cut, 16)
    assert batches[-1].problem is not None and batches[-1].problem.startswith("truncated block")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    recs=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=80)),
        max_size=6,
    ),
    tail=st.binary(max_size=40),
    big=st.booleans(),
    nano=st.booleans(),
)
def test_batches_agree_with_per_frame_reading_on_any_input(
    tmp_path: Path, recs: list[tuple[int, int, bytes]], tail: bytes, big: bool, nano: bool
) -> None:
    path = tmp_path / "fuzz.pcap"
    path.write_bytes(classic_pcap([(s, f, d, len(d)) for s, f, d in recs], big, nano) + tail)
    assert_same_as_per_frame(path, 4)


@pytest.mark.skipif(not TCPDUMP.is_dir(), reason=f"corpus not found at {TCPDUMP}")
def test_corpus_batches_equal_per_frame_reading() -> None:
    paths = sorted(TCPDUMP.iterdir())
    for path in paths:
        assert_same_as_per_frame(path, 64)
    assert len(paths) >= 800


# -- pcapng: the compiled walk against the frame reader ------------------------------------

NG_BLOCKS = st.one_of(
    st.builds(lambda big: ("shb", big), st.booleans()),
    st.builds(lambda lt, snap, res, off: ("idb", lt, snap, res, off),
              st.sampled_from([1, 101, 113]), st.sampled_from([0, 40, 65535]),
              st.one_of(st.none(), st.sampled_from([0, 3, 6, 9, 12, 0x80 | 20, 0x80 | 100])),
              st.one_of(st.none(), st.integers(-(1 << 40), 1 << 40),
                        st.sampled_from([-(1 << 63), (1 << 63) - 1]))),
    st.builds(lambda i, units, data, extra: ("epb", i, units, data, extra), st.integers(0, 2),
              st.one_of(st.integers(0, 1 << 53), st.integers(0, (1 << 64) - 1)),
              st.binary(max_size=70), st.integers(0, 3)),
    st.builds(lambda data, extra: ("spb", data, extra), st.binary(max_size=70),
              st.integers(0, 3)),
    st.builds(lambda data: ("other", data), st.binary(max_size=12).map(
        lambda b: b + b"\0" * (-len(b) % 4))),
)


def pcapng_bytes(blocks: list[tuple], big0: bool) -> bytes:
    out = [shb(big0)]
    big = big0
    for b in blocks:
        if b[0] == "shb":
            big = b[1]
            out.append(shb(big))
        elif b[0] == "idb":
            out.append(idb(b[1], b[2], b[3], b[4], big=big))
        elif b[0] == "epb":
            out.append(epb(b[1], b[2], b[3], len(b[3]) + b[4], big=big))
        elif b[0] == "spb":
            out.append(spb(b[1], len(b[1]) + b[2], big=big))
        else:
            out.append(block(0x0BAD, b[1], big))
    return b"".join(out)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blocks=st.lists(NG_BLOCKS, max_size=14), big=st.booleans(), cut=st.integers(0, 40),
       tail=st.binary(max_size=24), chunk=st.sampled_from([32, 100, 1 << 20]),
       batch_size=st.sampled_from([1, 3, 64]))
def test_pcapng_batches_agree_with_per_frame_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocks: list[tuple], big: bool, cut: int,
    tail: bytes, chunk: int, batch_size: int
) -> None:
    """Sections of either byte order, interfaces of every resolution and offset (beyond
    int64 too), every packet block kind, unknown blocks, a cut or garbage at the end, read a
    chunk at a time of several sizes."""
    data = pcapng_bytes(blocks, big)
    data = data[: max(28, len(data) - cut)] + tail if cut else data
    path = tmp_path / "t.pcapng"
    path.write_bytes(data)
    monkeypatch.setattr(batch_mod, "CHUNK", chunk)
    assert_same_as_per_frame(path, batch_size)


def test_pcapng_batches_stop_at_a_timestamp_beyond_int64(tmp_path: Path) -> None:
    # 2^-100 s units and an offset near the int64 end: computed exactly, refused past it
    ok = epb(0, (1 << 64) - 1, frame_bytes(1))
    data = shb() + idb(1, tsresol=0x80 | 100, tsoffset=9_000_000_000) + ok + ok
    data += idb(1, tsresol=0, tsoffset=9_300_000_000) + epb(1, 1, frame_bytes(2)) + ok
    path = tmp_path / "t.pcapng"
    path.write_bytes(data)
    batches = assert_same_as_per_frame(path, 2)
    assert sum(len(b) for b in batches) == 2
    assert batches[-1].problem is not None and "beyond int64" in batches[-1].problem


def test_a_first_record_far_above_the_mean_does_not_size_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_mod, "CHUNK", 4096)
    monkeypatch.setattr(pcap_mod, "CHUNK", 4096)
    big = (1, 0, b"\x01" * 200_000, 200_000)  # a 200 kB record, then 10,000 small ones
    path = tmp_path / "t.pcap"
    path.write_bytes(classic_pcap([big] + [(2, i, b"\x02" * 60, 60) for i in range(10_000)],
                                  big=False, nano=False))
    (batch,) = assert_same_as_per_frame(path)
    assert batch.buf.base is not None and batch.buf.base.nbytes < 4 << 20
