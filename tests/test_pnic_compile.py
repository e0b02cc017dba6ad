"""Compiling the PNIC kernels: once, ahead of a run, into a user cache directory.

Every call of the engine runs one compiled specialization of the batch kernel whatever the
caller's array types, so `warm()` compiles everything a run needs; the cache lives under the
user's cache directory, in a subdirectory keyed by the kernels' sources; NUMBA_CACHE_DIR wins.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from flowshift.commands.replay import warm_engine
from flowshift.tiers import pnic_engine
from flowshift.tiers._pnic_batch import process_batch
from flowshift.tiers._pnic_cache import fingerprint
from flowshift.verdict import PuntReason


def test_after_warm_any_caller_runs_the_compiled_kernel() -> None:
    seconds = pnic_engine.warm()
    assert seconds >= 0
    signatures = list(process_batch.signatures)
    assert len(signatures) == 1
    engine = pnic_engine.PnicEngine(2, None)
    n = 3
    buf = np.zeros(64 * n, np.uint8)
    verdict = np.zeros(n, np.int32)  # other dtypes than BatchResults' on purpose
    reason = np.zeros(n, np.int64)
    returned = np.zeros(n, np.int32)
    done = engine.process(buf, np.arange(n) * 64, np.full(n, 64), np.full(n, 64),
                          np.ones(n, np.int32), np.arange(n), np.array([1, 0, 1], bool),
                          verdict, reason, returned)
    assert done == 0
    assert list(process_batch.signatures) == signatures
    assert verdict.tolist() == [-1, 0, -1]  # the unselected packet is left alone
    assert reason.tolist()[::2] == [PuntReason.UNSUPPORTED] * 2  # zeros: no IP


def test_warm_step_is_shown_and_says_whether_it_compiled() -> None:
    out = io.StringIO()
    warm_engine(Console(file=out, width=100))
    assert "PNIC engine loaded in" in out.getvalue() or "PNIC engine compiled in" in out.getvalue()
    assert "not counted in the replay's time" in out.getvalue()


def _cache_dir(env: dict[str, str]) -> str:
    code = "from flowshift.tiers._pnic_cache import cache_dir; print(cache_dir())"
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR",
                                                              "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True,
                         text=True, check=True, timeout=120)
    return out.stdout.strip()


def test_cache_goes_to_the_user_cache_directory(tmp_path: Path) -> None:
    assert _cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(
        tmp_path / "flowshift" / "numba" / fingerprint())
    assert _cache_dir({"HOME": str(tmp_path)}) == str(
        tmp_path / ".cache" / "flowshift" / "numba" / fingerprint())
    assert _cache_dir({"NUMBA_CACHE_DIR": str(tmp_path / "mine")}) == str(tmp_path / "mine")
