"""Outputs are all or nothing: an interrupted or failed run leaves the previous run's files as
they were and no temporary beside them; Ctrl-C exits 130 with one line on stderr, no traceback
(the PNIC's own process included)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowshift import replay as replay_module
from flowshift.cli import INTERRUPTED, main
from flowshift.commands.demo import build_trace, demo_config_text
from flowshift.config import load_config
from flowshift.output import AtomicOutputs

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"--out": "out.pcap", "--verdicts": "verdicts.csv", "--report": "report.json",
           "--plot": "plot.png", "--dump-flows": "flows.txt"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("interrupt")
    config = d / "demo.toml"
    config.write_text(demo_config_text(), encoding="utf-8")
    trace = d / "trace.pcap"
    build_trace(trace, load_config(config), scale=0.03)
    return trace, config


def _previous_run(d: Path) -> dict[str, bytes]:
    """Files standing in for the previous run's outputs."""
    old = {}
    for name in OUTPUTS.values():
        (d / name).write_bytes(f"previous {name}\n".encode())
        old[name] = (d / name).read_bytes()
    return old


def _args(trace: Path, config: Path, d: Path) -> list[str]:
    args = ["replay", str(trace), "--config", str(config), "--dump-flows-at", "1", "-q"]
    for flag, name in OUTPUTS.items():
        args += [flag, str(d / name)]
    return args


def _assert_untouched(d: Path, old: dict[str, bytes]) -> None:
    assert {p.name for p in d.iterdir()} == set(old), "a temporary was left behind"
    for name, content in old.items():
        assert (d / name).read_bytes() == content, f"{name} was overwritten"


def test_interrupted_replay_keeps_the_previous_outputs(
    inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace, config = inputs
    old = _previous_run(tmp_path)
    monkeypatch.setattr(replay_module, "BATCH", 200)  # several batches, outputs half written
    drained = []
    real_drain = replay_module._Run.drain

    def drain(self: replay_module._Run, res: replay_module.BatchResults) -> None:
        real_drain(self, res)
        drained.append(len(res))
        if len(drained) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(replay_module._Run, "drain", drain)
    result = CliRunner().invoke(main, _args(trace, config, tmp_path))
    assert len(drained) == 3
    assert result.exit_code == INTERRUPTED == 130
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Interrupted" in result.stderr
    _assert_untouched(tmp_path, old)


def test_failed_replay_keeps_the_previous_outputs(
    inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any failure, not only an interrupt: here the plot cannot be drawn, after every other
    output was complete."""
    trace, config = inputs
    old = _previous_run(tmp_path)

    def broken_plot(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flowshift.plot.write_plot", broken_plot)
    result = CliRunner().invoke(main, _args(trace, config, tmp_path))
    assert result.exit_code == 2
    assert "--plot" in result.stderr and "No space left" in result.stderr
    _assert_untouched(tmp_path, old)


def test_completed_replay_replaces_every_output(inputs: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    trace, config = inputs
    old = _previous_run(tmp_path)
    result = CliRunner().invoke(main, _args(trace, config, tmp_path))
    assert result.exit_code == 0, result.output
    assert {p.name for p in tmp_path.iterdir()} == set(old)
    for name in old:
        assert (tmp_path / name).read_bytes() != old[name]
    mode = (tmp_path / "report.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as open() would have created it


# The child: the replay CLI, which announces the end of its first batch on stdout and then
# waits (for the signal) with its outputs half written.
CHILD = """
import sys, threading
from flowshift import replay
replay.BATCH = 200
real_drain = replay._Run.drain
def drain(self, res):
    real_drain(self, res)
    print("batch done", flush=True)
    threading.Event().wait()
replay._Run.drain = drain
from flowshift.cli import main
main(prog_name="flowshift")
"""


@pytest.mark.parametrize("pnic", ["inline", "process"])
def test_sigint_exits_130_with_one_line(inputs: tuple[Path, Path], tmp_path: Path,
                                        pnic: str) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group, PNIC included."""
    trace, config = inputs
    old = _previous_run(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *_args(trace, config, tmp_path), "--pnic", pnic],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # the marker, or give up
        assert ready, "no batch within 120 s"
        line = proc.stdout.readline()
        assert line == "batch done\n", proc.stderr.read() if proc.stderr else ""
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["Interrupted: stopped before the end; unfinished outputs were "
                                "not written."], err
    _assert_untouched(tmp_path, old)


def test_interrupted_gen_trace_keeps_the_previous_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "trace.pcap"
    out.write_bytes(b"previous trace")
    import flowshift.gen as gen

    writes = []
    real_write = gen.PcapWriter.write

    def write(self: gen.PcapWriter, *args: object) -> None:
        real_write(self, *args)  # type: ignore[arg-type]
        writes.append(1)
        if len(writes) == 50:
            raise KeyboardInterrupt

    monkeypatch.setattr(gen.PcapWriter, "write", write)
    result = CliRunner().invoke(main, ["gen-trace", str(out), "--flows", "20", "--seed", "1"])
    assert result.exit_code == 130
    assert len(result.stderr.splitlines()) == 1
    assert out.read_bytes() == b"previous trace"
    assert [p.name for p in tmp_path.iterdir()] == ["trace.pcap"]


def test_gen_trace_bad_output_path_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["gen-trace", str(tmp_path / "no" / "t.pcap"),
                                       "--flows", "5"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: cannot write") and len(result.stderr.splitlines()) == 1


def test_atomic_outputs_discard_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "x.json"
    with pytest.raises(RuntimeError), AtomicOutputs() as files:
        files.temp(final).write_text("partial")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with AtomicOutputs() as files:
        temp = files.temp(final)
        assert temp.parent == tmp_path and temp.suffix == ".json" and temp.name.startswith(".")
        temp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert final.read_text() == "whole"


def test_python_dash_m_flowshift() -> None:
    done = subprocess.run([sys.executable, "-m", "flowshift", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and "gen-trace" in done.stdout and "Usage: flowshift" in done.stdout
