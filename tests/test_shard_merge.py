"""The merge of a sharded replay's outputs (shard_merge.py): whatever the shard of each packet,
which of them leave, their sizes and times, the merged verdicts file and output trace are the
bytes the serial writers give for the same rows in input order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift import shard_merge
from flowshift._verdict_rows import ROW_DATA, middles_path, rows_bytes
from flowshift.packet.pcap import PcapWriter
from flowshift.replay import verdicts_header
from flowshift.shard_merge import merge_packets, merge_rows, write_verdicts

MIDDLES = [b",gw,egress,forward,accept (new),vnic,", b",gw,ingress,forward,established,pnic,",
           b",,,bypass,not-ip,,", b",gw,egress,drop,invalid,machine,"]
FIRST = 1_700_000_000 * 10**9


@st.composite
def runs(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(0, 120))
    shards = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    return {
        "shards": shards,
        "shard": draw(st.lists(st.integers(0, shards - 1), min_size=n, max_size=n)),
        "leaving": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        "middle": draw(st.lists(st.integers(0, len(MIDDLES) - 1), min_size=n, max_size=n)),
        "ts": draw(st.lists(st.integers(-10**9, 10**12), min_size=n, max_size=n)),
        "sizes": sizes,
        "seed": draw(st.integers(0, 2**32 - 1)),
        "window": draw(st.sampled_from([1, 200, 5000, 1 << 24])),
    }


def _serial(tmp: Path, ts: np.ndarray, middle: np.ndarray, leaving: np.ndarray,
            buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray) -> tuple[bytes, bytes]:
    out_index = np.where(leaving, np.cumsum(leaving) - 1, -1)
    rows = verdicts_header() + bytes(rows_bytes(0, ts, FIRST, middle, MIDDLES, out_index))
    with PcapWriter(tmp / "serial.pcap") as w:
        sent = np.flatnonzero(leaving)
        w.write_batch(ts[sent], buf, offset[sent], caplen[sent], caplen[sent] + 4)
    return rows, (tmp / "serial.pcap").read_bytes()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=runs())
def test_merged_outputs_are_the_serial_ones(tmp_path: Path, run: dict[str, object],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_merge, "WINDOW", run["window"])
    rng = np.random.default_rng(run["seed"])  # type: ignore[arg-type]
    shard = np.array(run["shard"], np.int32)
    leaving = np.array(run["leaving"], np.bool_)
    middle = np.array(run["middle"], np.int64)
    ts = FIRST + np.array(run["ts"], np.int64)
    caplen = np.array(run["sizes"], np.int64)
    offset = np.concatenate([[0], np.cumsum(caplen)[:-1]]).astype(np.int64)
    buf = rng.integers(0, 256, int(caplen.sum()), np.uint8)
    want_rows, want_pcap = _serial(tmp_path, ts, middle, leaving, buf, offset, caplen)

    index, rows_paths, pcaps = [], [], []
    for k in range(int(run["shards"])):  # type: ignore[call-overload]
        at = np.flatnonzero(shard == k)
        # each shard numbers the middles in its own order
        order = rng.permutation(len(MIDDLES))
        local = np.argsort(order)
        rows = np.zeros(len(at), ROW_DATA)
        rows["ts"] = ts[at]
        rows["middle"] = local[middle[at]]
        rows["record"] = np.where(leaving[at], 16 + caplen[at], 0)
        path = tmp_path / f"rows-{k}.bin"
        rows.tofile(path)
        middles_path(path).write_text(json.dumps([MIDDLES[i].decode() for i in order]))
        sent = at[leaving[at]]
        with PcapWriter(tmp_path / f"out-{k}.pcap") as w:
            w.write_batch(ts[sent], buf, offset[sent], caplen[sent], caplen[sent] + 4)
        index.append(at)
        rows_paths.append(path)
        pcaps.append(tmp_path / f"out-{k}.pcap")

    merged = merge_rows(index, rows_paths)
    assert np.array_equal(merged.leaving, leaving)
    write_verdicts(merged, FIRST, tmp_path / "merged.csv", verdicts_header())
    assert (tmp_path / "merged.csv").read_bytes() == want_rows
    assert merge_packets(merged, pcaps, tmp_path / "merged.pcap", 1) == int(leaving.sum())
    assert (tmp_path / "merged.pcap").read_bytes() == want_pcap


def test_a_shard_whose_rows_are_short_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.bin"
    np.zeros(2, ROW_DATA).tofile(path)
    middles_path(path).write_text("[]")
    with pytest.raises(ValueError, match="2 rows for 3 packets"):
        merge_rows([np.arange(3)], [path])


REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"


def test_an_interrupted_merge_leaves_the_previous_outputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted while the packets are copied, with the rows being formatted beside: the
    previous run's files stay as they were, and no temporary or shard file is left."""
    from flowshift.packet.pcap import PcapWriter
    from flowshift.shard_replay import run_sharded

    out_dir, work = tmp_path / "out", tmp_path / "work"
    out_dir.mkdir()
    work.mkdir()
    old = {"out.pcap": b"previous out\n", "v.csv": b"previous verdicts\n"}
    for name, content in old.items():
        (out_dir / name).write_bytes(content)
    monkeypatch.setattr(shard_merge, "WINDOW", 4096)  # several windows
    copied = []
    real = PcapWriter.write_records

    def write_records(self: PcapWriter, *args: object) -> None:
        real(self, *args)  # type: ignore[arg-type]
        copied.append(1)
        if len(copied) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PcapWriter, "write_records", write_records)
    with pytest.raises(KeyboardInterrupt):
        run_sharded(REAL / "replay_input.pcap", REAL / "lb-gateway.toml", workers=2,
                    executor="processes", shard_dir=work, out=out_dir / "out.pcap",
                    verdicts=out_dir / "v.csv", progress=False)
    assert len(copied) == 2
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == old
    assert not list(work.iterdir())


TCPDUMP = REAL.parent / "tcpdump"


@pytest.mark.parametrize("name", sorted(p.name for p in TCPDUMP.glob("*.pcap"))[::40])
def test_a_replays_row_data_merges_into_its_own_verdicts(tmp_path: Path, name: str) -> None:
    """One replay writes its verdicts as text and as row data: merged alone (one shard, every
    input position its own), the data gives the text's bytes, and the leaving rows say which
    packets the output trace holds, with their record sizes."""
    from flowshift.packet.pcap import TraceError
    from flowshift.replay import run_replay

    trace = TCPDUMP / name
    try:
        report = run_replay(trace, REAL / "lb-gateway.toml", verdicts=tmp_path / "v.csv",
                            out=tmp_path / "o.pcap", row_data=tmp_path / "rows.bin",
                            progress=False)
    except TraceError:
        pytest.skip("not a trace the replay reads")
    n = report["trace"]["packets"]
    merged = merge_rows([np.arange(n)], [tmp_path / "rows.bin"])
    first = int(merged.ts[0]) if n else 0  # the origin: the first packet's time
    write_verdicts(merged, first, tmp_path / "m.csv", verdicts_header())
    assert (tmp_path / "m.csv").read_bytes() == (tmp_path / "v.csv").read_bytes()
    assert int(merged.leaving.sum()) == report["packets"]["out"]
    out = (tmp_path / "o.pcap").read_bytes()
    assert 24 + int(merged.record.sum()) == len(out)
