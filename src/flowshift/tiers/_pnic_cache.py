"""Where the compiled code of flowshift's kernels (the PNIC's, the fast path's, the trace
I/O's) is kept between runs.

numba's `cache=True` writes next to the source by default, which a non-editable install
(site-packages owned by root, a zip) cannot do, and it keys cached code by the kernel's own
source file only: a changed constant in a module the kernels read (entry.py, the conntrack
types) would leave stale machine code behind. So the kernels cache in a user directory,
`$XDG_CACHE_HOME/flowshift/numba` (default `~/.cache/flowshift/numba`), in a subdirectory named
by a digest of flowshift's version and of every source file the kernels are compiled from:
any change to any of them compiles afresh. `NUMBA_CACHE_DIR`, when the user sets it, wins.

The first run can fill the cache ahead, in two other processes on the other cores, while it does
other work (`compiling_ahead`: the demo generates its trace meanwhile); `fastpath.warm_all` then
waits for them and loads the kernels. This module does not import numba, so that the other process
starts at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

from flowshift import __version__

_PACKAGE = Path(__file__).resolve().parent.parent

# Every flowshift module the kernels are compiled from (tests/test_pnic_constants.py checks
# that the kernel modules import no other).
SOURCES = (
    "__init__.py",
    "_codes.py",
    "_verdict_rows.py",
    "closing.py",
    "conntrack_types.py",
    "entry.py",
    "flow.py",
    "results.py",
    "verdict.py",
    "packet/__init__.py",
    "packet/_records.py",
    "packet/batch.py",
    "packet/checksum.py",
    "packet/direct.py",
    "packet/fragrows.py",
    "packet/parse.py",
    "packet/pcap.py",
    "packet/rewrite.py",
    "packet/route.py",
    "packet/view.py",
    "services/__init__.py",
    "services/conntrack_tcp.py",
    "services/maglev.py",
    "tiers/__init__.py",
    "tiers/_fastpath_batch.py",
    "tiers/_fastpath_open.py",
    "tiers/_pnic_batch.py",
    "tiers/_pnic_cache.py",
    "tiers/_pnic_flow.py",
    "tiers/_pnic_index.py",
    "tiers/_pnic_mem.py",
    "tiers/_pnic_parse.py",
)


def fingerprint() -> str:
    """A digest of the version, numba's version and the kernels' sources."""
    h = hashlib.sha256(f"{__version__} {version('numba')}".encode())
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


# Written into the cache directory once every kernel a run needs is in it (fastpath.warm_all),
# named by the digest too: a NUMBA_CACHE_DIR set by the user may serve several versions
READY = "flowshift-pnic-ready-"
# Filling the cache takes about 6 CPU-seconds; a compilation still running after this long
# is given up, and the waiting process compiles for itself
AHEAD_TIMEOUT_S = 600.0


def ready() -> bool:
    """Are the compiled kernels in the cache (as far as this process can tell)?"""
    return (Path(cache_dir()) / (READY + fingerprint())).exists()


def mark_ready() -> None:
    path = Path(cache_dir()) / (READY + fingerprint())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:  # a hint only: without it, a later run compiles ahead for nothing
        pass


def compile_ahead(work: Callable[[], object]) -> subprocess.Popen[bytes] | None:
    """Start filling the cache in another process, unless it is filled already (None).

    The process calls `work` (a module's function, the caller's say of what it compiles:
    replay.compile_ahead_work) of this very package (its directory put in front of the path
    only while `flowshift` itself is imported), with this interpreter and environment: it
    computes the same cache directory, and numba's own cache (the trace I/O's kernels) is the
    same place for it as for this process. Its output is discarded: should it fail, `warm`
    compiles in the waiting process and any error shows there."""
    if ready():
        return None
    code = (f"import sys; sys.path.insert(0, {str(_PACKAGE.parent)!r}); import flowshift; "
            f"del sys.path[0]; from {work.__module__} import {work.__name__}; "
            f"{work.__name__}()")
    return subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@contextmanager
def compiling_ahead(work: Callable[[], object]) -> Iterator[subprocess.Popen[bytes] | None]:
    """`compile_ahead(work)` for the body of the with statement: pass what it yields to
    `fastpath.warm_all`. A compilation still running when the body ends (an error before the
    warm step) is stopped; numba writes each cache file whole (a temporary file renamed), so
    a stopped one leaves nothing half-written."""
    job = compile_ahead(work)
    try:
        yield job
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
