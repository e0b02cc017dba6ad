"""The first `flowshift demo` after install, every kernel compiled, against the run after it.

    python bench/bench_first_run.py [--repeat 3] [--json PATH]

A fresh install has no compiled kernels: its first demo compiles them all, the PNIC's data
path in another process while it generates its trace (tiers/_pnic_cache.py). Each round runs
the demo twice, each in a process of its own as a user would: first with an empty kernel cache
(NUMBA_CACHE_DIR pointed at a new directory; flowshift keeps every kernel it compiles there
when it is set) and no font cache of matplotlib's either (MPLCONFIGDIR, likewise), then again
on the caches that run filled, the baseline. The rounds run one
after the other, so the machine's drift hits both alike; the figures are the medians of wall
time from the process's start to its exit.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from common import machine, report
from flowshift.tiers._pnic_cache import READY

FLOOR_S = 10.0  # the first demo's target (issue #12), beside the figure


def demo(out: Path, cache: Path) -> float:
    """Seconds of one `flowshift demo` in its own process, its kernels (and the plot's fonts)
    cached in `cache`."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "MPLCONFIGDIR": str(cache / "mpl")}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flowshift", "demo", "--out", str(out), "-q"],
                   env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


@click.command()
@click.option("--repeat", default=3, show_default=True, help="rounds (a first run and the next)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(repeat: int, json_path: Path | None) -> None:
    console = Console()
    first: list[float] = []
    after: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fs-bench-first-") as tmp:
        for r in range(repeat):
            cache = Path(tmp) / f"cache-{r}"
            cache.mkdir()
            first.append(demo(Path(tmp) / f"first-{r}", cache))
            # the first run compiled and marked the cache: the next only loads
            if not any(p.name.startswith(READY) for p in cache.iterdir()):
                raise click.ClickException(f"the first run left no ready mark in {cache}")
            after.append(demo(Path(tmp) / f"next-{r}", cache))
            console.print(f"round {r + 1}: first {first[-1]:.2f} s, next {after[-1]:.2f} s")
    f, a = statistics.median(first), statistics.median(after)
    results: dict[str, Any] = {"machine": machine(), "first_s": f, "next_s": a,
                               "first_runs": first, "next_runs": after, "floor_s": FLOOR_S}
    table = Table(title=f"flowshift demo, {repeat} rounds (median wall time)")
    for col in ("run", "seconds", "against the next run", "floor"):
        table.add_column(col, justify="right")
    table.add_row("first after install (compiles)", f"{f:.2f}", f"{f / a:.2f}×",
                  f"{FLOOR_S:g} s: {'met' if f <= FLOOR_S else 'missed'}")
    table.add_row("next (loads the kernels)", f"{a:.2f}", "1.00×", "")
    report(console, table, results, json_path)

if __name__ == "__main__":
    main()
