"""The bpf() system call through ctypes: map operations, pinning, BPF_PROG_TEST_RUN.

Only the commands the datapath uses, each a thin function over `union bpf_attr` (laid out by
hand per command, as include/uapi/linux/bpf.h defines it). Errors raise `BpfError` with the
command and errno; callers tolerate named errnos only (ENOENT for a missing key, EEXIST for
BPF_NOEXIST).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

_NR_BPF = {"x86_64": 321, "aarch64": 280}

MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
PROG_TEST_RUN = 10
OBJ_GET_INFO_BY_FD = 15

ANY = 0
NOEXIST = 1
EXIST = 2
F_LOCK = 4

_ATTR_SIZE = 144
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A failed bpf() command: errno and the command's name."""


def _nr() -> int:
    try:
        return _NR_BPF[platform.machine()]
    except KeyError:
        raise OSError(f"bpf(): no syscall number known for {platform.machine()}") from None


def _call(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(_nr(), cmd, attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what}): {os.strerror(err)}")
    return int(ret)


def _attr(fmt: str, *values: int) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def lookup(fd: int, key: bytes, value_size: int, flags: int = 0) -> bytes | None:
    """The value of key, or None when absent."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _call(MAP_LOOKUP_ELEM, _attr("=IxxxxQQQ", fd, _addr(k), _addr(v), flags),
              "MAP_LOOKUP_ELEM")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def update(fd: int, key: bytes, value: bytes, flags: int = ANY) -> bool:
    """Write key's value; False when BPF_NOEXIST found the key, or BPF_EXIST did not."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    try:
        _call(MAP_UPDATE_ELEM, _attr("=IxxxxQQQ", fd, _addr(k), _addr(v), flags),
              "MAP_UPDATE_ELEM")
    except BpfError as e:
        if (e.errno == errno.EEXIST and flags & NOEXIST) or (
                e.errno == errno.ENOENT and flags & EXIST):
            return False
        raise
    return True


def delete(fd: int, key: bytes) -> bool:
    """Delete key; False when it was absent."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _call(MAP_DELETE_ELEM, _attr("=IxxxxQ", fd, _addr(k)), "MAP_DELETE_ELEM")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after key (the first with None), or None at the end."""
    k = None if key is None else ctypes.create_string_buffer(key, len(key))
    n = ctypes.create_string_buffer(key_size)
    try:
        _call(MAP_GET_NEXT_KEY, _attr("=IxxxxQQ", fd, _addr(k), _addr(n)), "MAP_GET_NEXT_KEY")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return n.raw


def pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _call(OBJ_PIN, _attr("=QI", _addr(p), fd), f"OBJ_PIN {path}")


def obj_get(path: Path) -> int:
    """A new file descriptor for the object pinned at path."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _call(OBJ_GET, _attr("=QI", _addr(p), 0), f"OBJ_GET {path}")


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)
    _call(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), _addr(info)), "OBJ_GET_INFO_BY_FD")
    t, i, ks, vs, me, fl = struct.unpack_from("=6I", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(t, i, ks, vs, me, fl, name)


@dataclass(frozen=True, slots=True)
class TestRun:
    retval: int
    data: bytes
    ctx: bytes
    duration_ns: int


def test_run(prog_fd: int, data: bytes | None = None, ctx: bytes | None = None, *,
             repeat: int = 0, data_room: int = 0, ctx_out_size: int | None = None) -> TestRun:
    """BPF_PROG_TEST_RUN: retval, output data (data_room bytes of room beyond the input for a
    program that grows the frame), output context, mean duration per run."""
    din = None if data is None else ctypes.create_string_buffer(data, len(data))
    dout = None if data is None else ctypes.create_string_buffer(len(data) + data_room)
    cin = None if ctx is None else ctypes.create_string_buffer(ctx, len(ctx))
    csize = (len(ctx) if ctx is not None else 0) if ctx_out_size is None else ctx_out_size
    cout = ctypes.create_string_buffer(csize) if csize else None
    attr = _attr("=IIIIQQIIIIQQ", prog_fd, 0,
                 0 if din is None else len(data or b""), 0 if dout is None else len(dout),
                 _addr(din), _addr(dout), repeat, 0,
                 0 if cin is None else len(ctx or b""), 0 if cout is None else len(cout),
                 _addr(cin), _addr(cout))
    _call(PROG_TEST_RUN, attr, "PROG_TEST_RUN")
    retval, _, size_out = struct.unpack_from("=III", attr, 4)
    duration = struct.unpack_from("=I", attr, 36)[0]
    ctx_size_out = struct.unpack_from("=I", attr, 44)[0]
    data_out = b"" if dout is None else dout.raw[:size_out]
    ctx_out = b"" if cout is None else cout.raw[:ctx_size_out]
    return TestRun(retval, data_out, ctx_out, duration)


def possible_cpus() -> int:
    """The number of possible CPUs: the slots of a per-CPU map value."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count
