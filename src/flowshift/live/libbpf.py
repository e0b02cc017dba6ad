"""The few libbpf calls that load the datapath's object, through ctypes.

libbpf does what a loader must (BTF-defined maps, CO-RE relocations, the verifier log); the
maps' sizes are set between open and load. Map and program objects are opaque pointers that
live as long as the `BpfObject`; their file descriptors are the handles the rest of the live
package uses (bpfsys.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

_lib: ctypes.CDLL | None = None


def _libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise OSError(f"libbpf not found ({e}): install libbpf-dev") from None
        vp, cp, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32
        for fn, res, args in (
            ("bpf_object__open_file", vp, [cp, vp]),
            ("bpf_object__load", ctypes.c_int, [vp]),
            ("bpf_object__close", None, [vp]),
            ("bpf_object__find_map_by_name", vp, [vp, cp]),
            ("bpf_object__find_program_by_name", vp, [vp, cp]),
            ("bpf_map__set_max_entries", ctypes.c_int, [vp, u32]),
            ("bpf_map__fd", ctypes.c_int, [vp]),
            ("bpf_program__fd", ctypes.c_int, [vp]),
        ):
            f = getattr(lib, fn)
            f.restype = res
            f.argtypes = args
        _lib = lib
    return _lib


class BpfObject:
    """An opened BPF object file: size its maps, load it, then look up fds by name."""

    def __init__(self, path: Path) -> None:
        lib = _libbpf()
        obj = lib.bpf_object__open_file(os.fsencode(path), None)
        if not obj:
            err = ctypes.get_errno()
            raise OSError(err, f"libbpf: cannot open {path}: {os.strerror(err)}")
        self._obj: int | None = obj
        self.path = path

    def _ptr(self) -> int:
        if self._obj is None:
            raise ValueError(f"{self.path}: object closed")
        return self._obj

    def _map(self, name: str) -> int:
        m = _libbpf().bpf_object__find_map_by_name(self._ptr(), name.encode())
        if not m:
            raise KeyError(f"{self.path}: no map {name}")
        return int(m)

    def set_max_entries(self, name: str, n: int) -> None:
        if _libbpf().bpf_map__set_max_entries(self._map(name), n) != 0:
            raise OSError(f"libbpf: cannot size map {name} to {n}")

    def load(self) -> None:
        ret = _libbpf().bpf_object__load(self._ptr())
        if ret != 0:
            raise OSError(-ret, f"libbpf: loading {self.path} failed: {os.strerror(-ret)} "
                                "(the verifier's log is on stderr)")

    def map_fd(self, name: str) -> int:
        return int(_libbpf().bpf_map__fd(self._map(name)))

    def prog_fd(self, name: str) -> int:
        p = _libbpf().bpf_object__find_program_by_name(self._ptr(), name.encode())
        if not p:
            raise KeyError(f"{self.path}: no program {name}")
        return int(_libbpf().bpf_program__fd(p))

    def close(self) -> None:
        if self._obj is not None:
            _libbpf().bpf_object__close(self._obj)
            self._obj = None
