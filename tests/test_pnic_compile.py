"""Compiling the PNIC kernels: once, ahead of a run, into a user cache directory.

Every call of the engine runs one compiled specialization of the batch kernel whatever the
caller's array types, so `warm()` compiles everything a run needs; the cache lives under the
user's cache directory, in a subdirectory keyed by the kernels' sources; NUMBA_CACHE_DIR wins.
A first run can fill it in another process while it does other work (`compiling_ahead`).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from flowshift.commands.replay import warm_engine
from flowshift.replay import compile_ahead_work
from flowshift.tiers import _pnic_cache, pnic_engine
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
    assert "engine loaded in" in out.getvalue() or "engine compiled in" in out.getvalue()
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


AHEAD = """
import io
import flowshift
print(flowshift.__file__)
from rich.console import Console
from flowshift.commands.replay import warm_engine
from flowshift.tiers import pnic_engine
from flowshift.replay import compile_ahead_work
from flowshift.tiers._pnic_cache import compiling_ahead, ready
assert not ready()
with compiling_ahead(compile_ahead_work) as ahead:
    assert ahead is not None
    out = io.StringIO()
    warm_engine(Console(file=out, width=100), ahead)
    assert ahead.returncode == 0, ahead.returncode
print(out.getvalue().strip())
print(pnic_engine.compilations(), ready())
with compiling_ahead(compile_ahead_work) as again:
    print(again is None)
"""


def test_compiling_ahead_fills_the_cache_in_another_process(tmp_path: Path) -> None:
    """A first run (an empty cache) compiles in another process; this one loads the result,
    and the next run finds the cache ready and starts no compilation. The run uses a copy of
    the package that the environment does not know (it finds the installed one): the other
    process must compile this very copy, or this one would find nothing to load."""
    copy = tmp_path / "elsewhere"
    shutil.copytree(Path(pnic_engine.__file__).parents[1], copy / "flowshift",
                    ignore=shutil.ignore_patterns("__pycache__"))
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR",
                                                              "XDG_CACHE_HOME", "PYTHONPATH")}
    code = f"import sys; sys.path.insert(0, {str(copy)!r})\n{AHEAD}"
    out = subprocess.run([sys.executable, "-c", code], env=clean | {"XDG_CACHE_HOME": str(
        tmp_path)}, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    where, shown, counts, again = out.stdout.strip().splitlines()
    assert where == str(copy / "flowshift" / "__init__.py")
    assert shown.startswith("engine compiled in the background, ready in")
    assert counts == "0 True"  # loaded here, not compiled
    assert again == "True"
    assert list((tmp_path / "flowshift" / "numba").rglob("*.nbi"))


def test_a_compilation_ahead_is_stopped_when_the_work_beside_it_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pnic_cache, "_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="no trace"), _pnic_cache.compiling_ahead(
            compile_ahead_work) as job:
        assert job is not None
        raise RuntimeError("no trace")
    assert job.returncode is not None  # not left running
    assert not _pnic_cache.ready()
