"""The Linux cases in tests/data/linux: their files hold to their own claims, and a replay
agrees with Linux on every part flowshift already models.

A part that needs a Linux semantic flowshift lacks is a strict xfail naming the semantic:
the day the semantic lands and the part agrees, the test fails until the marker goes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import struct
from functools import cache

import pytest

from flowshift.flow import PROTO_TCP
from flowshift.packet.view import Packet, ParseError
from flowshift.results import PacketResult
from hosttools import run
from linuxcases import CASES, FILES, LINUX, LinuxCase, disagreements, five_tuple, load, packet

MISSING: dict[tuple[str, str], str] = {}


def parts(name: str) -> list[str]:
    with (LINUX / name / "phases.tsv").open(newline="") as f:
        return [row["part"] for row in csv.DictReader(f, delimiter="\t")]


def _params() -> list[object]:
    out: list[object] = []
    for name in CASES:
        with (LINUX / name / "linux_verdicts.csv").open(newline="") as f:
            present = {row["part"] for row in csv.DictReader(f)}
        for part in [*parts(name), *sorted(present - set(parts(name)))]:
            why = MISSING.get((name, part))
            marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
            out.append(pytest.param(name, part, id=f"{name}/{part}", marks=marks))
    return out


@cache
def replayed(name: str) -> list[PacketResult]:
    return load(name).replay()


@pytest.mark.parametrize("name", CASES)
def test_case_files_exist_and_parse(name: str) -> None:
    case = load(name)
    for f in FILES:
        assert (case.path / f).is_file(), f"{name}/{f} missing"
    assert case.inputs and case.outputs
    for i, fr in enumerate(case.inputs):
        assert packet(fr.data, fr.wire_len).error in (ParseError.OK, ParseError.NOT_IP), i
    # one verdict row per input frame, in order
    assert [int(r["input_index"]) for r in case.rows] == list(range(len(case.inputs)))
    assert {r["verdict"] for r in case.rows} <= {"forward", "drop"}
    case.config  # noqa: B018 - host.toml parses as a flowshift config
    meta = json.loads((case.path / "case.json").read_text())
    assert meta["packets"] == {"entered": len(case.inputs), "left": len(case.outputs),
                               "forwarded": sum(r["verdict"] == "forward" for r in case.rows)}


@pytest.mark.parametrize("name", CASES)
def test_verdicts_hold_to_the_captures(name: str) -> None:
    """Every forward row names its own output frame, which carries the row's 5-tuple and the
    input frame's payload; every part the client ran appears in the rows."""
    case = load(name)
    seen: set[int] = set()
    for row, fr in zip(case.rows, case.inputs, strict=True):
        assert float(row["ts_in"]) == pytest.approx(fr.ts_ns / 1e9, abs=1e-6)
        if row["verdict"] != "forward":
            assert row["output_index"] == ""
            continue
        j = int(row["output_index"])
        assert j not in seen, f"output {j} matched twice"
        seen.add(j)
        out = case.outputs[j]
        assert out.ts_ns >= fr.ts_ns
        pin, pout = packet(fr.data, fr.wire_len), packet(out.data, out.wire_len)
        frag = bool(pin.frag_offset)
        assert pout.frag_offset == pin.frag_offset
        src, sport, dst, dport, proto = five_tuple(pout)
        assert (src, dst, proto) == (row["out_src"], row["out_dst"], int(row["out_proto"]))
        if not frag:
            assert (sport, dport) == (int(row["out_sport"]), int(row["out_dport"]))
        assert _tail(pin) == _tail(pout), f"#{row['input_index']}: payload differs"
    assert {r["part"] for r in case.rows} >= set(parts(name))


def _tail(pkt: Packet) -> str:
    """What neither NAT nor routing rewrites: the payload beyond the L4 header (TCP: with
    sequence, acknowledgement and flags), or a non-first fragment's last bytes."""
    if pkt.frag_offset:
        kept = bytes(pkt.data[-16:])
    elif pkt.proto == PROTO_TCP:
        kept = struct.pack("!IIB", pkt.seq, pkt.ack, pkt.flags) + pkt.data[pkt.l4 + pkt.tcp_hlen:]
    else:
        kept = bytes(pkt.data[pkt.l4 + 8:])
    return hashlib.sha256(kept).hexdigest()


def test_readme_describes_every_case_and_the_kernel() -> None:
    text = (LINUX / "README.md").read_text()
    kernels = {json.loads((LINUX / n / "case.json").read_text())["kernel"] for n in CASES}
    for k in kernels:
        assert k in text
    for name in CASES:
        assert re.search(rf"`{re.escape(name)}`", text), name
        for part in parts(name):
            assert f"`{part}`" in text, f"{name}/{part} not described"


def test_readme_counts_are_the_captures() -> None:
    text = (LINUX / "README.md").read_text()
    for name in CASES:
        m = re.search(rf"^\| `{re.escape(name)}` \|.*\| (\d+) / (\d+) / (\d+) \|$", text, re.M)
        assert m, f"no table row for {name}"
        meta = json.loads((LINUX / name / "case.json").read_text())["packets"]
        assert tuple(map(int, m.groups())) == (meta["entered"], meta["left"], meta["forwarded"])


def test_missing_semantics_name_real_parts() -> None:
    known = {(n, p) for n in CASES for p in parts(n)}
    assert set(MISSING) <= known


@pytest.mark.parametrize(("name", "part"), _params())
def test_replay_agrees_with_linux(name: str, part: str) -> None:
    case: LinuxCase = load(name)
    results = replayed(name)
    rows = {i for i, r in enumerate(case.rows) if r["part"] == part}
    wrong = [d for d in disagreements(case, results) if int(d[1:].split(" ")[0]) in rows]
    assert not wrong, f"{len(wrong)} disagreements, first: " + "; ".join(wrong[:4])


@pytest.mark.parametrize("name", CASES)
def test_offloaded_replay_agrees_with_linux_as_the_software_one(name: str) -> None:
    """Every case again with every established flow offloaded, a batch at a time (each batch
    meets the PNIC first): it agrees with Linux on every packet, as the software replay."""
    case: LinuxCase = load(name)
    offloaded = run(case.path / "replay_input.pcap", case.config, policy="always", rows=64)
    assert offloaded.host.stats.offloads_to_pnic > 0
    assert disagreements(case, offloaded.results) == []

