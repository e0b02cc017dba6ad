"""Where the PNIC kernels' compiled code is kept between runs.

numba's `cache=True` writes next to the source by default, which a non-editable install
(site-packages owned by root, a zip) cannot do, and it keys cached code by the kernel's own
source file only: a changed constant in a module the kernels read (entry.py, the conntrack
types) would leave stale machine code behind. So the kernels cache in a user directory,
`$XDG_CACHE_HOME/flowshift/numba` (default `~/.cache/flowshift/numba`), in a subdirectory named
by a digest of flowshift's version and of every source file the kernels are compiled from:
any change to any of them compiles afresh. `NUMBA_CACHE_DIR`, when the user sets it, wins.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

from flowshift import __version__

_PACKAGE = Path(__file__).resolve().parent.parent

# Every flowshift module the kernels are compiled from (tests/test_pnic_constants.py checks
# that the kernel modules import no other).
SOURCES = (
    "__init__.py",
    "conntrack_types.py",
    "entry.py",
    "flow.py",
    "verdict.py",
    "packet/__init__.py",
    "packet/checksum.py",
    "packet/parse.py",
    "packet/rewrite.py",
    "packet/route.py",
    "packet/view.py",
    "services/__init__.py",
    "services/conntrack_tcp.py",
    "tiers/__init__.py",
    "tiers/_fastpath_batch.py",
    "tiers/_pnic_batch.py",
    "tiers/_pnic_cache.py",
    "tiers/_pnic_flow.py",
    "tiers/_pnic_index.py",
    "tiers/_pnic_mem.py",
    "tiers/_pnic_parse.py",
)


def fingerprint() -> str:
    """A digest of the version, numba's version and the kernels' sources."""
    h = hashlib.sha256(f"{__version__} {numba.__version__}".encode())
    for name in SOURCES:
        h.update(name.encode())
        try:
            h.update((_PACKAGE / name).read_bytes())
        except OSError:  # a zipped or stripped install: the version must do
            h.update(b"-")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flowshift" / "numba"


_DIR: str | None = None


def cache_dir() -> str:
    """The directory the kernels cache in (computed once per process)."""
    global _DIR
    if _DIR is None:
        user = os.environ.get("NUMBA_CACHE_DIR")
        _DIR = user if user else os.fspath(cache_root() / fingerprint())
    return _DIR
