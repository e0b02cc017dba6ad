"""A trace read one batch ahead, in a thread of its own, while the replay decides the batch before.

A replay of a large capture spends a third of its time or more reading it: the kernel's copy of
every byte from the page cache, and the walk over the record headers. Both run without the GIL
(the read is a system call, the walk a compiled loop), so on a machine with a core to spare
they run beside the replay's own work instead of before it. The compiled kernels of the
replay release the GIL too, so the reading thread finds it free between its chunks.

`read_batches(reuse=True)` recycles a batch's arrays for the batch after next. Read one ahead,
the batch after next is read as soon as the consumer takes the next one: so its consumer must
be done with a batch when it asks for the next (a replay is: it copies what it keeps of a
batch, and writes its outputs as it goes).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterator

from flowshift.closing import Closing
from flowshift.packet.batch import Batch

__all__ = ["ReadAhead", "spare_cores"]

_END = None  # what the thread hands over after the last batch
CLOSE_WAIT = 60.0  # seconds `close` waits for a read in hand (one batch) to end
# The reader needs the GIL for a moment after each 1 MiB read. Python makes a thread that wants
# it wait up to the switch interval (5 ms by default) while another runs Python code: reads
# would then come too late. At 1 ms the reader keeps ahead (the bench trace: 0.51 s against
# 0.65 s at 5 ms, and 0.77 s without reading ahead); the interval is restored at `close`.
SWITCH_INTERVAL = 0.001


def spare_cores(busy: int = 1) -> bool:
    """Has this process more cores to run on than `busy` replays use at once?"""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > busy


class ReadAhead(Closing):
    """The batches of `batches` (a `read_batches` generator), each read while the consumer
    decides the one before. An error of the reader reaches the consumer in its turn, after the
    batches read before it. `close` stops the thread and closes the generator (and its
    file); use it as a context manager."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self._batches = batches
        self._ask = threading.Semaphore(1)  # one read may start: the first batch
        self._ready: queue.Queue[Batch | BaseException | None] = queue.Queue()
        self._stop = False
        self._done = False
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._read, name="flowshift-read-ahead",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                self._ask.acquire()
                if self._stop:
                    return
                batch = next(self._batches, _END)
                self._ready.put(batch)
                if batch is _END:
                    return
        except BaseException as e:  # handed to the consumer, raised there in its turn
            self._ready.put(e)

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        item = self._ready.get()
        if item is _END or isinstance(item, BaseException):
            self._done = True
            if item is _END:
                raise StopIteration
            raise item
        # the consumer is done with the batch before this one: the next read may take its
        # arrays
        self._ask.release()
        return item

    def close(self) -> None:
        """Stop reading: the thread finishes the batch in hand, if any, and ends; then the
        generator is closed, in this thread."""
        if self._stop:
            return
        self._done = True
        self._stop = True
        self._ask.release()
        sys.setswitchinterval(self._interval)
        self._thread.join(CLOSE_WAIT)
        if self._thread.is_alive():  # a read that hangs: the generator is still running
            return
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
