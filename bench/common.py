"""What every benchmark prints beside its figures: the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numba
import numpy as np
from rich.console import Console
from rich.table import Table


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split()[1]
        memory = f"{int(mem) / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        memory = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "system": f"{platform.system()} {platform.release()}",
    }


def rss_bytes() -> int:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def report(console: Console, table: Table, results: dict[str, Any],
           json_path: Path | None) -> None:
    """The figures' table, the machine they were measured on (results["machine"]), and the
    results as JSON when asked."""
    console.print(table)
    m = results["machine"]
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Python "
                  f"{m['python']}, numba {m['numba']}")
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
