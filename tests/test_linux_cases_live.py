"""make_cases.py run again on this machine's kernel gives the verdicts committed with it."""

from __future__ import annotations

import collections
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from linuxcases import LINUX

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


def _verdicts(path: Path) -> dict[str, tuple[bool, int]]:
    """Per traffic part: did Linux forward anything, and how many frames did it drop. (How
    many TCP segments a real exchange takes may vary with ACK timing; what is dropped here
    is crafted or UDP and does not. MLD chatter varies from run to run: left out.)"""
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["part"] != "link-local":
                per[row["part"]][row["verdict"]] += 1
    return {part: (c["forward"] > 0, c["drop"]) for part, c in per.items()}


@pytest.mark.parametrize("name", ["ttl", "frag-reversed", "nat-ports"])
def test_regenerated_case_has_the_committed_verdicts(name: str, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(LINUX / "make_cases.py"), "--out",
                             str(tmp_path), name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the script deletes its namespaces when it ends
            proc.terminate()
            proc.wait(10)
    assert proc.returncode == 0, err[-2000:]
    assert _verdicts(tmp_path / name / "linux_verdicts.csv") == _verdicts(
        LINUX / name / "linux_verdicts.csv")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in left.splitlines()
                if ln.split()[0] in {f"fs-l{x}-{proc.pid}" for x in "crs"}]
