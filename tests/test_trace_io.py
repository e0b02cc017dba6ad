"""The bulk writers a replay uses give the very bytes of the one-at-a-time ones: the pcap
writer's batches (its record buffer reused from batch to batch) and the verdict rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift._verdict_rows import rows_text
from flowshift.packet.pcap import PcapWriter
from flowshift.replay import run_replay, seconds_text
from test_pcap import epb, idb, shb

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)


def reference_rows(index0: int, ts: list[int], first: int, middle: list[int],
                   middles: list[bytes], out_index: list[int]) -> bytes:
    """A row as the replay wrote it one packet at a time."""
    return "".join(
        f"{index0 + i},{seconds_text(t - first)}{middles[m].decode()}"
        f"{out_index[i] if out_index[i] >= 0 else ''}\n"
        for i, (t, m) in enumerate(zip(ts, middle, strict=True))).encode()


@settings(max_examples=300, deadline=None)
@given(data=st.data(), first=INT64, index0=st.integers(0, 1 << 40),
       middles=st.lists(st.text(max_size=12).map(lambda t: f",{t},".encode()), min_size=1,
                        max_size=4))
def test_rows_equal_the_per_packet_formatting(data: st.DataObject, first: int, index0: int,
                                              middles: list[bytes]) -> None:
    ts = data.draw(st.lists(st.one_of(INT64, st.integers(first - 10**10, first + 10**10)
                                      .filter(lambda t: -(1 << 63) <= t < 1 << 63)),
                            max_size=20))
    middle = data.draw(st.lists(st.integers(0, len(middles) - 1), min_size=len(ts),
                                max_size=len(ts)))
    out_index = data.draw(st.lists(st.integers(-1, 1 << 62), min_size=len(ts),
                                   max_size=len(ts)))
    text = rows_text(index0, np.array(ts, np.int64), first, np.array(middle, np.int64),
                     middles, np.array(out_index, np.int64))
    fits = not ts or (min(ts) - first > -(1 << 63) and max(ts) - first < 1 << 63)
    if not fits:
        assert text is None  # the replay formats these in Python
        return
    assert text is not None
    assert bytes(text) == reference_rows(index0, ts, first, middle, middles, out_index)


def test_rows_at_the_edges_of_the_time_range() -> None:
    ts = [0, 999_999_999, 1_000_000_000, -1, -1_000_000_001, (1 << 63) - 1, -(1 << 63) + 1]
    text = rows_text(7, np.array(ts, np.int64), 0, np.zeros(len(ts), np.int64), [b",x,"],
                     np.array([-1, 0, 9, 10, 99, 100, 1 << 62], np.int64))
    assert text is not None
    assert bytes(text) == reference_rows(7, ts, 0, [0] * len(ts), [b",x,"],
                                         [-1, 0, 9, 10, 99, 100, 1 << 62])
    assert bytes(text).splitlines()[0] == b"7,0.000000000,x,"
    assert bytes(text).splitlines()[4] == b"11,-1.000000001,x,99"


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), snaplen=st.integers(1, 64),
       frames=st.lists(st.binary(max_size=90), min_size=1, max_size=30))
def test_batches_write_what_single_frames_write(tmp_path_factory: object, sizes: list[int],
                                              snaplen: int, frames: list[bytes]) -> None:
    tmp = Path(str(tmp_path_factory.mktemp("w")))  # type: ignore[attr-defined]
    buf = np.frombuffer(b"".join(frames), np.uint8)
    offset = np.concatenate([[0], np.cumsum([len(f) for f in frames])[:-1]]).astype(np.int64)
    caplen = np.array([len(f) for f in frames], np.uint32)
    wire = caplen + np.arange(len(frames), dtype=np.uint32) % 3
    ts = 1_700_000_000 * 10**9 + np.arange(len(frames), dtype=np.int64) * 999_999_937
    with PcapWriter(tmp / "one.pcap", snaplen=snaplen) as one, \
         PcapWriter(tmp / "bulk.pcap", snaplen=snaplen) as bulk:
        for size in sizes:  # batches growing and shrinking: the buffer is reused
            sel = np.arange(min(size, len(frames)))[::-1]
            for i in sel.tolist():
                one.write(int(ts[i]), frames[i], int(wire[i]))
            bulk.write_batch(ts[sel], buf, offset[sel], caplen[sel], wire[sel])
    assert (tmp / "bulk.pcap").read_bytes() == (tmp / "one.pcap").read_bytes()


def test_verdict_rows_of_times_beyond_int64_apart_are_formatted_in_python(
        tmp_path: Path) -> None:
    """Two interfaces 12e18 ns apart (more than int64 holds): the rows still say each time
    exactly, through the Python fallback."""
    early, late = -6_000_000_000, 6_000_000_000  # seconds, as pcapng tsoffsets
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(46)  # not IP: passed on as is
    trace = tmp_path / "t.pcapng"
    trace.write_bytes(shb() + idb(1, tsoffset=early) + idb(1, tsoffset=late)
                      + epb(0, 5, arp) + epb(1, 7, arp) + epb(0, 9, arp))
    rows = tmp_path / "v.csv"
    root = Path(__file__).resolve().parents[1]
    run_replay(trace, root / "examples" / "nat-gateway.toml", verdicts=rows, progress=False)
    times = [line.split(",")[1] for line in rows.read_text().splitlines()[1:]]
    first = early * 10**9 + 5_000
    assert times == [seconds_text(t - first) for t in
                     (first, late * 10**9 + 7_000, early * 10**9 + 9_000)]
    assert times[1] == "12000000000.000002000"
