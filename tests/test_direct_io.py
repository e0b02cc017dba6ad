"""packet/direct.py: a DirectWriter's file holds exactly the bytes given, in order, whatever
the sizes of the pieces, the staging threshold, and whether the file system takes O_DIRECT."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.packet import direct
from flowshift.packet.direct import ALIGN, DirectWriter, aligned_empty

pieces = st.lists(st.binary(max_size=3 * ALIGN), max_size=30)


def _write(path: Path, parts: list[bytes], flush: int, room: bool) -> None:
    with DirectWriter(path, flush=flush) as w:
        for p in parts:
            if room:  # fill a view of the staging buffer, keep a prefix of it
                view = w.room(len(p) + 7)
                view[:len(p)] = np.frombuffer(p, np.uint8)
                w.advance(len(p))
            else:
                w.write(p)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=pieces, flush=st.sampled_from([1, ALIGN, 3 * ALIGN + 5, 1 << 20]),
       room=st.booleans())
def test_file_is_the_bytes_in_order(tmp_path: Path, parts: list[bytes], flush: int,
                                    room: bool) -> None:
    path = tmp_path / "out.bin"
    _write(path, parts, flush, room)
    assert path.read_bytes() == b"".join(parts)


def test_truncates_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"x" * 3 * ALIGN)
    _write(path, [b"abc"], ALIGN, False)
    assert path.read_bytes() == b"abc"


def test_einval_on_a_direct_write_falls_back_to_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system whose direct I/O wants a larger alignment refuses the write (EINVAL):
    the same bytes go through the page cache, none lost or doubled."""
    real = os.write
    refused = []

    def write(fd: int, data: memoryview) -> int:
        if not refused and fd == writer.fd and writer.direct:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    path = tmp_path / "out.bin"
    data = os.urandom(5 * ALIGN + 123)
    writer = DirectWriter(path, flush=ALIGN)
    monkeypatch.setattr(direct.os, "write", write)
    with writer:
        writer.write(data[:ALIGN + 1])
        writer.write(data[ALIGN + 1:])
    assert refused == [ALIGN] or not direct._DIRECT
    assert not writer.direct
    assert path.read_bytes() == data


def test_without_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "_DIRECT", 0)
    path = tmp_path / "out.bin"
    _write(path, [b"a" * 5000, b"b" * 3], ALIGN, True)
    assert path.read_bytes() == b"a" * 5000 + b"b" * 3


def test_open_error_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        DirectWriter(tmp_path / "missing" / "out.bin")


def test_aligned_empty() -> None:
    for size in (1, ALIGN, 10 * ALIGN + 3):
        a = aligned_empty(size)
        assert len(a) == size and a.ctypes.data % ALIGN == 0
