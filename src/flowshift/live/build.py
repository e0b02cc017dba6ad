"""Build the datapath's BPF object: clang against the running kernel's BTF, cached.

`vmlinux.h` is generated from /sys/kernel/btf/vmlinux with bpftool and the constants header
from the Python definitions (live/consts.py); neither is committed, nor is the object. The
object is cached in the user cache dir (`$XDG_CACHE_HOME/flowshift/bpf`, else
`~/.cache/flowshift/bpf`) under a hash of the sources, the generated headers and the clang
version, so a change to any of them rebuilds and an unchanged tree loads in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from flowshift.live import consts

SOURCES = Path(__file__).parent / "bpf"
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
PROGRAM = "pnic.c"


class BuildError(RuntimeError):
    """The BPF object could not be built (a missing tool, or the compiler's message)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowshift" / "bpf"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise BuildError(f"{name} not found: install clang, llvm, libbpf-dev and bpftool")
    return path


def _run(argv: list[str]) -> bytes:
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise BuildError(f"{' '.join(argv[:3])}... failed ({done.returncode}):\n{err}")
    return done.stdout


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def vmlinux_header(cache: Path) -> Path:
    """vmlinux.h for the running kernel (by a hash of its BTF), generated once."""
    if not VMLINUX_BTF.exists():
        raise BuildError(f"{VMLINUX_BTF} missing: the kernel has no BTF (CONFIG_DEBUG_INFO_BTF)")
    digest = hashlib.sha256(VMLINUX_BTF.read_bytes()).hexdigest()[:16]
    path = cache / f"vmlinux-{digest}.h"
    if not path.exists():
        text = _run([_tool("bpftool"), "btf", "dump", "file", str(VMLINUX_BTF), "format", "c"])
        _atomic_write(path, text)
    return path


def build(cache: Path | None = None) -> Path:
    """The compiled object for the current sources and kernel: cached, else built now."""
    cache = cache or cache_dir()
    clang = _tool("clang")
    version = _run([clang, "--version"])
    vmlinux = vmlinux_header(cache)
    header = consts.render().encode()
    h = hashlib.sha256()
    for part in (version, vmlinux.name.encode(), header):
        h.update(part)
    for src in sorted(SOURCES.iterdir()):
        if src.suffix in (".c", ".h"):
            h.update(src.name.encode())
            h.update(src.read_bytes())
    digest = h.hexdigest()[:20]
    obj = cache / f"pnic-{digest}.o"
    if obj.exists():
        return obj
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        work = Path(tmp)
        (work / "fs_consts.h").write_bytes(header)
        (work / "vmlinux.h").symlink_to(vmlinux)
        out = work / "pnic.o"
        arch = {"x86_64": "x86", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
        _run([clang, "-target", "bpf", "-O2", "-g", f"-D__TARGET_ARCH_{arch}", "-Wall",
              "-Wno-unused-function", "-Werror=implicit-function-declaration",
              "-I", str(work), "-I", str(SOURCES),
              "-c", str(SOURCES / PROGRAM), "-o", str(out)])
        _atomic_write(obj, out.read_bytes())
    return obj
