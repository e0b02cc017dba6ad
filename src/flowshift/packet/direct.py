"""Large sequential file I/O that bypasses the page cache (O_DIRECT) where the file system
takes it, through buffers that are allocated once and reused.

A replay's outputs (the output trace, the verdict rows, a sharded run's shard files) are
written once, in order, and not read back by this process; through the page cache each of
their bytes costs a fresh page of memory, and on a virtual machine whose host hands memory out
lazily a fresh page costs more than the disk write itself (docs/scale.md has figures). Direct
I/O moves the bytes from our buffer to the device.

Direct I/O wants the buffer's address, the file offset and the length aligned (`ALIGN`, the
largest logical block size in common use). A writer stages bytes in an aligned buffer, writes
its whole blocks directly, keeps the remainder for the next write, and writes the last partial
block through the page cache when it closes. The writes run on a thread of the writer's own,
in order, up to `DEPTH` of them queued, while the caller fills the next buffer: a replay
computes while its last outputs reach the disk, and a burst (a batch's packets) does not wait
for the disk. Callers fill at most about `FLUSH` bytes at a time (room(n) grows the buffer to
n), so the few buffers stay small and are touched once.

Where O_DIRECT is refused (tmpfs, some network and FUSE file systems, any EINVAL on a write),
the same bytes go through the page cache: the file is the same either way.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from flowshift.closing import Closing

ALIGN = 4096
FLUSH = 1 << 24  # staged bytes written out once this many are held
DEPTH = 4  # writes handed to the writer's thread and not yet done, at most
_DIRECT = getattr(os, "O_DIRECT", 0)


def _open(path: str | os.PathLike[str], flags: int) -> tuple[int, bool]:
    """The file opened with O_DIRECT where the file system takes it: (fd, direct)."""
    flags |= getattr(os, "O_CLOEXEC", 0)
    if _DIRECT:
        try:
            return os.open(path, flags | _DIRECT, 0o666), True
        except OSError:
            pass
    return os.open(path, flags, 0o666), False


def _drop_direct(fd: int) -> None:
    """Go on through the page cache (a direct transfer came back EINVAL)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)


def aligned_empty(size: int) -> np.ndarray:
    """An uninitialised uint8 array of `size` bytes starting at an `ALIGN` boundary."""
    raw = np.empty(size + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + size]


class DirectWriter(Closing):
    """Bytes appended to a new (truncated) file, in order. `room(n)` gives a view of `n`
    writable bytes to fill and `advance(m)` keeps the first m of them; `write(data)` does both.
    Raises OSError as opening the file with open(path, "wb") would."""

    def __init__(self, path: str | os.PathLike[str], flush: int = FLUSH) -> None:
        self.fd, self.direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.flush_at = flush
        self._use(aligned_empty(flush + ALIGN))
        self.fill = 0
        self.written = 0  # bytes handed to the file so far
        self._flight: deque[tuple[Future[None], np.ndarray]] = deque()  # writes, in order
        self._free: list[np.ndarray] = []  # buffers written out, to be filled again
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="flowshift-write")

    def _use(self, buf: np.ndarray) -> None:
        self.buf = buf
        self._view = buf.data.cast("B")

    def room(self, n: int) -> np.ndarray:
        """A view of the next `n` bytes of the staging buffer, grown when needed (the buffer
        is kept: fresh pages cost more than the copies they would save)."""
        need = self.fill + n
        if need > len(self.buf):
            bigger = aligned_empty(need + need // 4 + ALIGN)
            bigger[:self.fill] = self.buf[:self.fill]
            self._use(bigger)
        return self.buf[self.fill:need]

    def advance(self, n: int) -> None:
        """Keep `n` bytes just filled in `room`; write out whole blocks past the threshold."""
        self.fill += n
        if self.fill >= self.flush_at:
            self._flush(final=False)

    def write(self, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        view = (data.reshape(-1).view(np.uint8).data if isinstance(data, np.ndarray)
                else memoryview(data)).cast("B")
        end = self.fill + len(view)
        if end > len(self.buf):
            self.room(len(view))
        self._view[self.fill:end] = view  # a memoryview copy: cheap for one small frame
        self.fill = end
        if end >= self.flush_at:
            self._flush(final=False)

    def _retire(self) -> None:
        """Wait for the oldest write in flight (its error raised here); free its buffer."""
        done, buf = self._flight.popleft()
        done.result()
        self._free.append(buf)

    def _wait(self) -> None:
        """Until every write in flight is done."""
        while self._flight:
            self._retire()

    def _flush(self, final: bool) -> None:
        if final:
            self._wait()  # also settles `direct`, which a failed write may have turned off
            if self.direct and self.fill % ALIGN:
                self._buffered()  # the last partial block: direct I/O cannot write it
            self._put(self.buf.data[:self.fill])
            self.written += self.fill
            self.fill = 0
            return
        while len(self._flight) >= DEPTH or (self._flight and self._flight[0][0].done()):
            self._retire()
        upto = self.fill - self.fill % ALIGN if self.direct else self.fill
        old = self.buf
        spare = self._free.pop() if self._free else aligned_empty(self.flush_at + ALIGN)
        rest = self.fill - upto
        spare[:rest] = old[upto:self.fill]
        self._flight.append((self._thread.submit(self._put, old.data[:upto]), old))
        self._use(spare)
        self.written += upto
        self.fill = rest

    def _put(self, data: memoryview) -> None:
        while len(data):
            try:
                n = os.write(self.fd, data)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # this file system's direct I/O wants more than ALIGN
                continue
            data = data[n:]

    def _buffered(self) -> None:
        _drop_direct(self.fd)
        self.direct = False

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if self.direct:
                self._flush(final=False)  # the whole blocks, directly
            self._flush(final=True)
        finally:
            try:
                self._wait()
            finally:
                self._thread.shutdown()
                os.close(self.fd)
                self.fd = -1


class DirectReader(Closing):
    """Reads ranges of a file into aligned buffers, directly where the file system takes it
    (the bytes are read once: caching them would cost fresh pages for nothing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd, self.direct = _open(path, os.O_RDONLY)

    def read(self, out: np.ndarray, start: int, stop: int) -> int:
        """Bytes start..stop of the file into `out` (aligned, at least stop - start + 2 *
        ALIGN long); returns where byte `start` is in `out`. Raises OSError when the file
        ends before `stop`."""
        lo = start - start % ALIGN if self.direct else start
        hi = -(-stop // ALIGN) * ALIGN if self.direct else stop
        got = 0
        while lo + got < stop:
            try:
                n = os.preadv(self.fd, [out.data[got:hi - lo]], lo + got)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                _drop_direct(self.fd)
                self.direct = False
                continue
            if not n:
                raise OSError(errno.EIO, f"file ends at byte {lo + got}, before {stop}")
            got += n
        return start - lo

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
