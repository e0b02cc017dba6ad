"""What `live up` and `live down` do for the PNIC outside the daemon: compile the datapath,
make the punt veth pair, and remove pins a killed daemon left behind."""

from __future__ import annotations

import contextlib
from pathlib import Path

from flowshift.live.datapath import BPFFS, Datapath
from flowshift.live.pnic import PIN_FILES, datapath_name
from flowshift.live.punt import make_pair

__all__ = ["build", "make_pair", "pin_dir", "unpin"]


def build() -> Path:
    return Datapath.build()


def pin_dir(host_ns: str) -> Path:
    return BPFFS / f"fs-{datapath_name(host_ns)}"


def unpin(path: Path) -> None:
    """Remove the datapath's pins (only its own file names) and the directory."""
    if path.parent != BPFFS or not path.name.startswith("fs-"):
        return  # a state file that names something else: not ours to remove
    for name in PIN_FILES:
        (path / name).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()
