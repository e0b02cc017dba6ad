"""`flowshift replay` and `flowshift demo`: every option, every output file, and the errors.

The host is the real one (flowshift.host). The main trace is the demo's (NAT, LB, two machines)
at a small scale, with frames the host must bypass, drop and leave unparsed mixed in.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowshift.cli import main
from flowshift.commands.demo import OUTPUTS, build_trace, demo_config_text
from flowshift.config import load_config
from flowshift.packet.build import udp_frame
from flowshift.packet.pcap import PcapWriter, open_trace
from flowshift.replay import VERDICTS_HEADER, ReplayError, run_replay

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
REAL = CORPUS / "real"

ARP = bytes(12) + b"\x08\x06" + bytes(28)
CUT_IP = bytes(12) + b"\x08\x00" + b"\x45\x00\x00"  # ends inside the IPv4 header
# udp/5004 from an inside client: no rule allows it, the default drops it
BLOCKED = udp_frame(src=bytes([10, 0, 0, 9]), dst=bytes([198, 51, 100, 9]), sport=40000,
                    dport=5004, payload=b"media")
EXTRA = (ARP, CUT_IP, BLOCKED)

FLOW_LINE = re.compile(
    r"(?P<proto>tcp|udp|icmp|icmpv6) +(?P<num>\d+) (?P<timeout>\d+) "
    r"(?:(?P<state>[A-Z_0-9]+) )?"
    r"src=\S+ dst=\S+ (?:sport=\d+ dport=\d+|type=\d+ code=\d+ id=\d+) packets=\d+ bytes=\d+ "
    r"(?:\[UNREPLIED\] )?"
    r"src=\S+ dst=\S+ (?:sport=\d+ dport=\d+|type=\d+ code=\d+ id=\d+) packets=\d+ bytes=\d+ "
    r"(?:\[ASSURED\] )?machine=(?P<machine>gw|lab) tier=(?P<tier>machine|vnic|pnic)")


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(trace, config): the demo's traffic at 3 %, an extra frame after every 500th."""
    d = tmp_path_factory.mktemp("replay")
    config = d / "demo.toml"
    config.write_text(demo_config_text(), encoding="utf-8")
    base = d / "base.pcap"
    build_trace(base, load_config(config), scale=0.03)
    trace = d / "trace.pcap"
    with open_trace(base) as reader, PcapWriter(trace) as out:
        for i, f in enumerate(reader):
            out.write(f.ts_ns, f.data, f.wire_len)
            if i % 500 == 499:
                out.write(f.ts_ns, EXTRA[i // 500 % 3])
    return trace, config


def replay(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["replay", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def frames(path: Path) -> list[tuple[int, bytes, int]]:
    with open_trace(path) as reader:
        return [(f.ts_ns, f.data, f.wire_len) for f in reader]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(demo_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Path]:
    """One replay with every output and a flow dump at 2 s."""
    trace, config = demo_files
    d = tmp_path_factory.mktemp("full")
    files = {name: d / name for name in ("out.pcap", "verdicts.csv", "report.json",
                                         "plot.png", "flows.txt")}
    code, stdout, stderr = replay(
        trace, "--config", config, "--out", files["out.pcap"], "--verdicts",
        files["verdicts.csv"], "--report", files["report.json"], "--plot", files["plot.png"],
        "--offload", "elephant", "--dump-flows-at", "2", "--dump-flows", files["flows.txt"])
    assert code == 0, stderr
    assert "packets in" in stdout and "tier pnic" in stdout
    return files


def test_report_agrees_with_the_verdicts(full_run: dict[str, Path],
                                         demo_files: tuple[Path, Path]) -> None:
    report = json.loads(full_run["report.json"].read_text())
    table = rows(full_run["verdicts.csv"])
    assert list(table[0]) == list(VERDICTS_HEADER)
    n = len(frames(demo_files[0]))
    assert [int(r["index"]) for r in table] == list(range(n))
    assert report["trace"]["packets"] == report["packets"]["in"] == n
    verdicts = Counter(r["verdict"] for r in table)
    assert report["packets"] == {
        "in": n, "forwarded": verdicts["forward"], "dropped": verdicts["drop"],
        "bypass": verdicts["bypass"], "unparsed": verdicts["unparsed"],
        "out": sum(1 for r in table if r["out_index"])}
    # the extra frames are all there, with their verdicts
    assert verdicts["bypass"] >= 1 and verdicts["unparsed"] >= 1 and verdicts["drop"] >= 1
    tiers = Counter(r["tier"] for r in table)
    for tier in ("machine", "vnic", "pnic"):
        assert report["tiers"][tier]["packets"] == tiers[tier]
    assert tiers["pnic"] > 0  # elephants were offloaded
    assert report["drops"] == dict(Counter(r["reason"] for r in table if r["verdict"] == "drop"))
    assert report["unparsed"] == dict(
        Counter(r["reason"] for r in table if r["verdict"] == "unparsed"))
    assert report["unparsed"] == {"truncated-ip": verdicts["unparsed"]}
    assert report["drops"]["default"] >= 1
    for r in table:
        if r["verdict"] in ("bypass", "unparsed"):
            assert r["tier"] == r["machine"] == r["direction"] == ""
        else:
            assert r["machine"] in ("gw", "lab") and r["direction"] in ("egress", "ingress")
    assert report["offloads"]["to_pnic"] > 0
    assert report["config"]["offload"]["policy"] == "elephant"
    assert report["options"]["dump_flows_at"] == 2.0
    assert report["schedule"][0]["action"] == "dump"
    assert report["timing"]["wall_seconds"] > 0
    assert report["version"]


def test_out_pcap_holds_the_forwarded_packets_in_order(full_run: dict[str, Path],
                                                       demo_files: tuple[Path, Path]) -> None:
    inputs = frames(demo_files[0])
    outputs = frames(full_run["out.pcap"])
    table = rows(full_run["verdicts.csv"])
    first = inputs[0][0]
    sent = [r for r in table if r["out_index"]]
    assert [int(r["out_index"]) for r in sent] == list(range(len(outputs)))
    for r in sent:
        ts, data, wire_len = outputs[int(r["out_index"])]
        its, idata, iwire = inputs[int(r["index"])]
        assert ts == its and wire_len == iwire and len(data) == len(idata)
        if r["verdict"] == "bypass":
            assert data == idata
    assert all(r["verdict"] in ("forward", "bypass") for r in sent)
    assert all(r["verdict"] in ("drop", "unparsed") for r in table if not r["out_index"])
    # time: seconds since the first packet, 9 decimals, exactly
    for r in table[:50]:
        ts = inputs[int(r["index"])][0]
        assert r["time"] == f"{(ts - first) // 10**9}.{(ts - first) % 10**9:09d}"


def test_flow_dump_and_plot(full_run: dict[str, Path]) -> None:
    lines = full_run["flows.txt"].read_text().splitlines()
    assert lines
    for line in lines:
        m = FLOW_LINE.fullmatch(line)
        assert m, line
        assert (m["state"] is not None) == (m["proto"] == "tcp")
        assert int(m["num"]) == {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}[m["proto"]]
    assert {FLOW_LINE.fullmatch(s)["machine"] for s in lines} == {"gw", "lab"}
    assert full_run["plot.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_offload_never_changes_nothing_but_the_tier(demo_files: tuple[Path, Path],
                                                    full_run: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """Offload transparency, through the command line, and --offload overriding the config."""
    trace, config = demo_files
    out, verdicts = tmp_path / "o.pcap", tmp_path / "v.csv"
    code, _, err = replay(trace, "--config", config, "--offload", "never", "--out", out,
                          "--verdicts", verdicts, "--report", tmp_path / "r.json")
    assert code == 0, err
    assert out.read_bytes() == full_run["out.pcap"].read_bytes()
    never, elephant = rows(verdicts), rows(full_run["verdicts.csv"])
    assert {r["tier"] for r in never} <= {"machine", "vnic", ""}
    strip = [{k: v for k, v in r.items() if k != "tier"} for r in never]
    assert strip == [{k: v for k, v in r.items() if k != "tier"} for r in elephant]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["offload"]["policy"] == "never"
    assert report["offloads"]["to_pnic"] == 0


def test_capacity_zero_refuses_every_offload(demo_files: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    trace, config = demo_files
    code, _, err = replay(trace, "--config", config, "--pnic-capacity", "0", "--report",
                          tmp_path / "r.json", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["pnic"]["capacity"] == 0
    assert report["tiers"]["pnic"]["packets"] == 0
    assert report["offloads"]["to_pnic"] == 0
    assert report["offloads"]["refused"].get("full", 0) > 0


def test_withdraw_is_transparent_and_crash_is_reported(demo_files: tuple[Path, Path],
                                                       full_run: dict[str, Path],
                                                       tmp_path: Path) -> None:
    trace, config = demo_files
    out = tmp_path / "w.pcap"
    code, _, err = replay(trace, "--config", config, "--pnic-withdraw-at", "3", "--out", out,
                          "--report", tmp_path / "w.json", "-q")
    assert code == 0, err
    assert out.read_bytes() == full_run["out.pcap"].read_bytes()
    w = json.loads((tmp_path / "w.json").read_text())
    assert w["events"]["withdraw"] == 1
    [entry] = w["schedule"]
    assert entry["action"] == "withdraw" and entry["at"] == 3.0
    assert entry["before_index"] is not None and entry["time"] >= 3.0

    code, _, err = replay(trace, "--config", config, "--pnic-crash-at", "1.5", "--report",
                          tmp_path / "c.json", "--pnic-withdraw-at", "100", "-q")
    assert code == 0, err
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["events"]["crash"] == 1 and "withdraw" not in c["events"]
    crash, late = c["schedule"]
    assert crash["action"] == "crash" and crash["time"] >= 1.5
    assert late == {"action": "withdraw", "at": 100.0, "time": late["time"],
                    "before_index": None, "skipped": "the trace ended before this time"}
    assert c["offloads"]["refused"].get("unhealthy", 0) > 0  # no offload after the crash
    assert c["options"]["pnic_crash_at"] == 1.5


def test_dump_past_the_end_is_taken_at_the_end(demo_files: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    trace, config = demo_files
    flows = tmp_path / "f.txt"
    code, _, err = replay(trace, "--config", config, "--dump-flows-at", "1e6", "--dump-flows",
                          flows, "--report", tmp_path / "r.json", "-q")
    assert code == 0, err
    assert flows.read_text().splitlines()
    [entry] = json.loads((tmp_path / "r.json").read_text())["schedule"]
    assert entry["before_index"] is None and "skipped" not in entry


@pytest.mark.parametrize("flag", ["--read-ahead", "--no-read-ahead"])
def test_reading_ahead_or_not_gives_the_same_outputs(demo_files: tuple[Path, Path],
                                                     full_run: dict[str, Path], tmp_path: Path,
                                                     flag: str) -> None:
    trace, config = demo_files
    out, verdicts, report = tmp_path / "o.pcap", tmp_path / "v.csv", tmp_path / "r.json"
    code, _, err = replay(trace, "--config", config, flag, "--out", out, "--verdicts",
                          verdicts, "--report", report, "-q")
    assert code == 0, err
    assert out.read_bytes() == full_run["out.pcap"].read_bytes()
    assert verdicts.read_bytes() == full_run["verdicts.csv"].read_bytes()
    assert json.loads(report.read_text())["timing"]["read_ahead"] is (flag == "--read-ahead")


def test_process_pnic_gives_the_same_packets(demo_files: tuple[Path, Path],
                                             full_run: dict[str, Path], tmp_path: Path) -> None:
    trace, config = demo_files
    out = tmp_path / "p.pcap"
    code, _, err = replay(trace, "--config", config, "--pnic", "process", "--out", out,
                          "--verdicts", tmp_path / "v.csv", "-q")
    assert code == 0, err
    assert out.read_bytes() == full_run["out.pcap"].read_bytes()
    # which packets the PNIC processed depends on when its answers arrive: only the tier moves
    process, inline = rows(tmp_path / "v.csv"), rows(full_run["verdicts.csv"])
    assert [{k: v for k, v in r.items() if k != "tier"} for r in process] == \
        [{k: v for k, v in r.items() if k != "tier"} for r in inline]
    assert any(r["tier"] == "pnic" for r in process)


def test_empty_and_truncated_traces(demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    _, config = demo_files
    empty = tmp_path / "empty.pcap"
    PcapWriter(empty).close()
    out = tmp_path / "o.pcap"
    code, _, err = replay(empty, "--config", config, "--out", out, "--verdicts",
                          tmp_path / "v.csv", "--plot", tmp_path / "p.png", "--report",
                          tmp_path / "r.json", "--dump-flows-at", "0", "--dump-flows",
                          tmp_path / "f.txt")
    assert code == 0, err
    assert frames(out) == [] and rows(tmp_path / "v.csv") == []
    assert (tmp_path / "f.txt").read_text() == ""
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["packets"]["in"] == 0 and report["trace"]["first_ts"] is None

    cut = tmp_path / "cut.pcap"
    with PcapWriter(cut) as w:
        w.write(10**18, BLOCKED)
        w.write(10**18 + 1, ARP)
    cut.write_bytes(cut.read_bytes()[:-10])
    code, _, err = replay(cut, "--config", config, "--report", tmp_path / "c.json", "-q")
    assert code == 0
    assert "trace ended early" in err
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["packets"]["in"] == 1
    assert "truncated record" in report["trace"]["problem"]


def test_run_replay_without_the_command_line(demo_files: tuple[Path, Path]) -> None:
    trace, config = demo_files
    report = run_replay(trace, load_config(config), offload="always", progress=False)
    assert report["options"]["config"] is None
    assert report["config"]["offload"]["policy"] == "always"
    assert report["packets"]["in"] == report["trace"]["packets"] > 0
    with pytest.raises(ReplayError, match="go together"):
        run_replay(trace, config, dump_at=1.0)
    with pytest.raises(ReplayError, match="--offload"):
        run_replay(trace, config, offload="sometimes")


# ---------------------------------------------------------------- errors: exit status 2


def test_bad_input_exits_2_with_one_line(demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    trace, config = demo_files
    not_trace = tmp_path / "notes.txt"
    not_trace.write_text("hello, this is not a capture\n")
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text(config.read_text().replace('default = "drop"', 'default = "maybe"', 1))
    cases = [
        ((tmp_path / "missing.pcap", "--config", config), "missing.pcap"),
        ((not_trace, "--config", config), "not a pcap or pcapng trace"),
        ((trace, "--config", tmp_path / "missing.toml"), "missing.toml"),
        ((trace, "--config", bad_config), "bad.toml: machine[0].firewall.default"),
        ((trace, "--config", config, "--out", trace), "would overwrite the trace"),
        ((trace, "--config", config, "--out", tmp_path / "no" / "o.pcap"), "does not exist"),
        ((trace, "--config", config, "--report", tmp_path / "r", "--plot", tmp_path / "r"),
         "would overwrite --report"),
        ((trace, "--config", config, "--plot", tmp_path / "p.doc"), "unknown image format"),
    ]
    for args, needle in cases:
        code, stdout, stderr = replay(*args)
        assert code == 2, (args, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
        assert needle in lines[0], (needle, stderr)


@pytest.mark.parametrize("args, needle", [
    (("--dump-flows", "f.txt"), "--dump-flows-at and --dump-flows go together"),
    (("--dump-flows-at", "1"), "--dump-flows-at and --dump-flows go together"),
    (("--offload", "sometimes"), "'sometimes' is not one of"),
    (("--pnic", "fpga"), "'fpga' is not one of"),
    (("--pnic-capacity", "-1"), "--pnic-capacity"),
    (("--pnic-crash-at", "-2"), "--pnic-crash-at"),
    (("--pnic-withdraw-at", "soon"), "--pnic-withdraw-at"),
    (("--workers", "2", "--read-ahead"), "--read-ahead is for one process"),
])
def test_usage_errors_exit_2(demo_files: tuple[Path, Path], args: tuple[str, ...],
                             needle: str) -> None:
    trace, config = demo_files
    code, _, stderr = replay(trace, "--config", config, *args)
    assert code == 2
    assert needle in stderr


def test_config_is_required(demo_files: tuple[Path, Path]) -> None:
    code, _, stderr = replay(demo_files[0])
    assert code == 2 and "--config" in stderr


# ---------------------------------------------------------------- the real capture


@pytest.mark.skipif(not (REAL / "replay_input.pcap").exists(),
                    reason=f"corpus not present at {REAL}")
def test_real_capture_through_the_lb_gateway(tmp_path: Path) -> None:
    trace, config = REAL / "replay_input.pcap", REAL / "lb-gateway.toml"
    v, r, f = tmp_path / "v.csv", tmp_path / "r.json", tmp_path / "f.txt"
    code, _, err = replay(trace, "--config", config, "--verdicts", v, "--report", r,
                          "--out", tmp_path / "o.pcap", "--dump-flows-at", "0.1",
                          "--dump-flows", f, "-q")
    assert code == 0, err
    report = json.loads(r.read_text())
    table = rows(v)
    assert len(table) == report["packets"]["in"] == len(frames(trace))
    assert len(frames(tmp_path / "o.pcap")) == report["packets"]["out"]
    assert Counter(x["verdict"] for x in table)["forward"] == report["packets"]["forwarded"]
    assert report["packets"]["forwarded"] > 0 and report["packets"]["bypass"] > 0
    lines = f.read_text().splitlines()
    assert lines
    # the LB rewrote the VIP: the reply tuple comes from a backend
    assert any("dst=198.51.100.10 sport=" in s and "src=10.1.0.1" in s for s in lines)
    for line in lines:
        assert re.fullmatch(FLOW_LINE.pattern.replace("gw|lab", "lbgw"), line), line


# ---------------------------------------------------------------- demo


def test_demo_writes_every_file(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--scale", "0.02"])
    assert result.exit_code == 0, result.stderr
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["offload"]["policy"] == "elephant"
    assert report["packets"]["in"] == len(frames(out / "demo.pcap"))
    assert report["schedule"][0]["action"] == "dump"
    assert load_config(out / "demo.toml").machines[0].name == "gw"
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
