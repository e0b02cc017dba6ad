"""Transports of the VNIC↔PNIC channel, as seen from the VNIC.

`InlineLink` runs the PNIC in this process: a frame sent is handled at once and its replies wait
in the VNIC's inbox (deterministic; the host decides when it looks). `ProcessLink` runs the PNIC
in a process of its own, pinned to its own core where there is one, as a SmartNIC's processor
would be: frames go over a pipe, and a reader thread empties the way back so neither side can
block the other.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing as mp
import os
import queue
import signal
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Protocol

import numpy as np

from flowshift import channel as ch
from flowshift.config import MachineConfig
from flowshift.results import BatchResults
from flowshift.tiers.pnic import Pnic, serve

log = logging.getLogger("flowshift.link")


class PnicLink(Protocol):
    rejected: dict[str, int]  # frames from the PNIC rejected at the VNIC, by reason

    def send(self, msg: ch.Msg) -> None: ...
    def run_batch(self, res: BatchResults, select: np.ndarray) -> bool: ...
    def receive(self, block: bool = False) -> ch.Msg | None: ...
    def close(self) -> None: ...


class InlineLink:
    def __init__(self, capacity: int, machines: tuple[MachineConfig, ...], *,
                 idle_timeout_ns: int, report_interval_ns: int) -> None:
        self.pnic = Pnic(capacity, machines, idle_timeout_ns=idle_timeout_ns,
                         report_interval_ns=report_interval_ns)
        self.vnic_end, self.pnic_end = ch.pair()

    def send(self, msg: ch.Msg) -> None:
        self.vnic_end.send(msg)
        serve(self.pnic_end, self.pnic)

    def receive(self, block: bool = False) -> ch.Msg | None:
        return self.vnic_end.receive()

    def run_batch(self, res: BatchResults, select: np.ndarray) -> bool:
        """The host's batch through the PNIC's data path in place (its DMA ring); the entries
        handed back arrive as Return messages. Always done: True."""
        out: list[ch.Msg] = []
        self.pnic.run(res.buf, res.offset, res.caplen, res.wire_len, res.linktype, res.ts,
                      select, res.verdict, res.reason, res.machine, res.direction, out)
        for msg in out:
            self.pnic_end.send(msg)
        return True

    @property
    def rejected(self) -> dict[str, int]:
        return self.vnic_end.rejected

    def close(self) -> None:
        self.vnic_end.inbox.clear()


# The ring the host and a PNIC process share for batches: mapped before the fork, so both see
# the same pages (no names, nothing to clean up). A batch too big for it goes per packet.
RING_FRAMES = 1 << 27  # bytes of frames
RING_ROWS = 1 << 17  # packets
_INPUTS = 6  # int64 columns: offset, caplen, wire_len, linktype, ts, select
# outputs in the dtypes of BatchResults, so both transports run the same compiled kernel
_OUTPUTS = (("verdict", np.int8), ("reason", np.int16), ("machine", np.int16),
            ("direction", np.int8))


class Ring:
    def __init__(self) -> None:
        out_bytes = sum(np.dtype(t).itemsize for _, t in _OUTPUTS) * RING_ROWS
        self.maps = (mmap.mmap(-1, RING_FRAMES), mmap.mmap(-1, _INPUTS * 8 * RING_ROWS),
                     mmap.mmap(-1, out_bytes))
        self.frames = np.frombuffer(self.maps[0], np.uint8)
        self.inputs = np.frombuffer(self.maps[1], np.int64).reshape(_INPUTS, RING_ROWS)
        self.outputs = {}
        at = 0
        for name, dtype in _OUTPUTS:
            self.outputs[name] = np.frombuffer(self.maps[2], dtype, RING_ROWS, at)
            at += np.dtype(dtype).itemsize * RING_ROWS

    def run(self, pnic: Pnic, msg: ch.RunBatch, out: list[ch.Msg]) -> None:
        """The PNIC side: run the batch in the ring, results written back into it."""
        n = msg.rows
        offset, caplen, wire_len, linktype, ts, select = self.inputs[:, :n]
        o = self.outputs
        pnic.run(self.frames[:msg.size], offset, caplen, wire_len, linktype, ts,
                 select.astype(np.bool_), o["verdict"][:n], o["reason"][:n], o["machine"][:n],
                 o["direction"][:n], out)


def _pnic_main(conn: Connection, capacity: int, machines: tuple[MachineConfig, ...],
               idle_timeout_ns: int, report_interval_ns: int, ring: Ring) -> None:
    """The PNIC process: decode, handle, answer, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the host's to handle: it closes us
    cores = os.sched_getaffinity(0)
    if len(cores) > 1:
        os.sched_setaffinity(0, {max(cores)})
    pnic = Pnic(capacity, machines, idle_timeout_ns=idle_timeout_ns,
                report_interval_ns=report_interval_ns)
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            msg = ch.decode(frame)
        except ch.ChannelError as exc:
            log.warning("pnic: rejected frame: %s", exc)
            continue
        if isinstance(msg, ch.RunBatch):
            replies: list[ch.Msg] = []
            ring.run(pnic, msg, replies)
            replies.append(ch.BatchDone(msg.rows))
        else:
            replies = pnic.handle(msg)
        for reply in replies:
            conn.send_bytes(ch.encode(reply))


class ProcessLink:
    def __init__(self, capacity: int, machines: tuple[MachineConfig, ...], *,
                 idle_timeout_ns: int, report_interval_ns: int) -> None:
        ctx = mp.get_context("fork")  # a SmartNIC boots on its own: inherit nothing but args
        self.conn, child = ctx.Pipe(duplex=True)
        self.ring = Ring()
        self.proc = ctx.Process(target=_pnic_main, name="flowshift-pnic", daemon=True,
                                args=(child, capacity, machines, idle_timeout_ns,
                                      report_interval_ns, self.ring))
        self.proc.start()
        child.close()
        self.replies: queue.Queue[bytes | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="pnic-reader", daemon=True)
        self.reader.start()
        self.rejected: dict[str, int] = {}
        self.early: deque[ch.Msg] = deque()  # messages read while waiting for a batch

    def _read(self) -> None:
        while True:
            try:
                self.replies.put(self.conn.recv_bytes())
            except (EOFError, OSError):
                self.replies.put(None)
                return

    def send(self, msg: ch.Msg) -> None:
        self.conn.send_bytes(ch.encode(msg))

    def run_batch(self, res: BatchResults, select: np.ndarray) -> bool:
        """The host's batch through the PNIC process's data path, by way of the shared ring;
        the entries handed back arrive as Return messages. False: too big for the ring."""
        rows = np.flatnonzero(select)
        n = len(res)
        if not len(rows) or n > RING_ROWS:
            return not len(rows)
        lo = int(res.offset[rows].min())
        hi = int((res.offset[rows] + res.caplen[rows]).max())
        if hi - lo > RING_FRAMES:
            return False
        ring = self.ring
        ring.frames[:hi - lo] = res.buf[lo:hi]
        cols = ring.inputs[:, :n]
        cols[0] = res.offset - lo
        cols[1], cols[2], cols[3], cols[4] = res.caplen, res.wire_len, res.linktype, res.ts
        cols[5] = select
        self.send(ch.RunBatch(n, hi - lo))
        while True:
            msg = self._next(block=True)
            if isinstance(msg, ch.BatchDone):
                break
            if msg is not None:
                self.early.append(msg)  # Returns (and anything else) for the host, in order
        o = {name: a[:n] for name, a in ring.outputs.items()}
        done = select & (o["verdict"] >= 0)
        res.verdict[select] = o["verdict"][select]
        res.reason[done], res.machine[done] = o["reason"][done], o["machine"][done]
        res.direction[done] = o["direction"][done]
        res.buf[lo:hi] = ring.frames[:hi - lo]
        return True

    def receive(self, block: bool = False) -> ch.Msg | None:
        if self.early:
            return self.early.popleft()
        return self._next(block)

    def _next(self, block: bool) -> ch.Msg | None:
        """The next message off the pipe (bad frames counted and skipped)."""
        while True:
            try:
                frame = self.replies.get(block=block)
            except queue.Empty:
                return None
            if frame is None:
                raise ConnectionError("the PNIC process has gone")
            try:
                return ch.decode(frame)
            except ch.ChannelError as exc:
                ch.count_rejected(self.rejected, exc)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.close()
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
