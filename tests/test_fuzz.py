"""A short run of every fuzz target (fuzz/targets.py): its seeds, then random mutations.

The mutation fuzzer (fuzz/mutate.py) runs in this process, deterministically; with atheris
installed each target also gets a short coverage-guided run in a subprocess. The long campaign
and its figures are in docs/fuzzing.md.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.mutate import FuzzFinding, run
from fuzz.seeds import seeds
from fuzz.targets import TARGETS, fuzz_trace

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 2000
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_survives_seeds_and_mutations(name: str) -> None:
    assert run(name, TARGETS[name], seeds(name), ITERATIONS, rng_seed=1) > ITERATIONS


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris not installed")
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_under_atheris(name: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fuzz.run", name, f"-runs={ITERATIONS}",
         f"-artifact_prefix={tmp_path}/"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "FUZZ_CORPUS": str(tmp_path / "corpus")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {ITERATIONS} runs" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"], "atheris wrote a crash input"


def test_a_finding_names_its_input() -> None:
    def broken(data: bytes) -> None:
        if data.startswith(b"\xff"):
            raise IndexError("boom")

    with pytest.raises(FuzzFinding) as info:
        run("broken", broken, [b"\xff\x01"], 0)
    assert info.value.data == b"\xff\x01" and "ff01" in str(info.value)


def test_trace_target_catches_the_int64_timestamp() -> None:
    """The campaign's regression: a pcapng timestamp beyond int64 ns (tests/test_pcap.py
    builders) is a problem at its block, not an OverflowError in the batch reader."""
    from test_pcap import epb, idb, shb

    fuzz_trace(shb() + idb(1) + epb(0, 9_999_999_999 * 10**6, bytes(60)))
