"""Transports of the VNIC↔PNIC channel, as seen from the VNIC.

Both give the VNIC the same thing: for each message sent, in order, the group of answers the
PNIC gave to it (`answers`), and for a batch in place, the entries it handed back. The VNIC
decides when in trace time an answer takes effect; the transport only decides where the work
runs. `InlineLink` runs the PNIC in this process: a frame sent is handled at once and its
answers wait in order. `ProcessLink` runs the PNIC in a process of its own, pinned to its own
core where there is one, as a SmartNIC's processor would be: frames go over a pipe, a reader
thread empties the way back so neither side can block the other, and the PNIC closes each
message's answers with a `Done` frame, so `answers` blocks until exactly that group is in,
however late it arrives in wall time.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing as mp
import os
import queue
import signal
import socket
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
    @property
    def rejected(self) -> dict[str, int]:
        """Frames from the PNIC rejected at the VNIC, by reason."""

    def send(self, msg: ch.Msg) -> None: ...
    def send_frame(self, frame: bytes) -> None: ...
    def answers(self) -> list[ch.Msg]: ...
    def run_batch(self, res: BatchResults, select: np.ndarray,
                  now: np.ndarray) -> list[ch.Msg] | None: ...
    def close(self) -> None: ...


class InlineLink:
    def __init__(self, capacity: int, machines: tuple[MachineConfig, ...], *,
                 idle_timeout_ns: int, report_interval_ns: int) -> None:
        self.pnic = Pnic(capacity, machines, idle_timeout_ns=idle_timeout_ns,
                         report_interval_ns=report_interval_ns)
        self.vnic_end, self.pnic_end = ch.pair()
        self.groups: deque[list[ch.Msg]] = deque()

    def send(self, msg: ch.Msg) -> None:
        self.send_frame(ch.encode(msg))

    def send_frame(self, frame: bytes) -> None:
        """One frame to the PNIC; its answers (none when it was rejected) form one group."""
        self.vnic_end.send_frame(frame)
        serve(self.pnic_end, self.pnic)
        group = []
        while (msg := self.vnic_end.receive()) is not None:
            group.append(msg)
        self.groups.append(group)

    def answers(self) -> list[ch.Msg]:
        """The answers to the oldest message not yet answered."""
        return self.groups.popleft()

    def run_batch(self, res: BatchResults, select: np.ndarray,
                  now: np.ndarray) -> list[ch.Msg] | None:
        """The host's batch through the PNIC's data path in place (its DMA ring), each packet
        at its trace time `now`; the entries it handed back, as Return messages."""
        out: list[ch.Msg] = []
        self.pnic.run(res.buf, res.offset, res.caplen, res.wire_len, res.linktype, now,
                      select, res.verdict, res.reason, res.machine, res.direction, out)
        return self._across(out)

    def hand_back(self, slot: int, punt: int, now: int) -> list[ch.Msg]:
        """The entry a fast-path pass punted from the PNIC's cache (`Pnic.handed_back`),
        across the channel, as `run_batch` brings one."""
        return self._across([self.pnic.handed_back(slot, punt, now)])

    def _across(self, out: list[ch.Msg]) -> list[ch.Msg]:
        """The PNIC's messages through the channel to the VNIC, as it receives them."""
        for msg in out:
            self.pnic_end.send(msg)
        returned = []
        while (back := self.vnic_end.receive()) is not None:
            returned.append(back)
        return returned

    @property
    def rejected(self) -> dict[str, int]:
        return self.vnic_end.rejected

    def close(self) -> None:
        self.vnic_end.inbox.clear()
        self.groups.clear()


# The ring the host and a PNIC process share for batches: mapped before the fork, so both see
# the same pages (no names, nothing to clean up). A batch too big for it goes per packet.
PNIC_TIMEOUT = 60.0  # seconds of wall time an answer may take before the PNIC counts as gone
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
        self.outputs: dict[str, np.ndarray] = {}
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
        replies: list[ch.Msg] = []
        try:
            msg = ch.decode(frame)
        except ch.ChannelError as exc:
            ch.count_rejected(pnic.rejected, exc)  # reported as pnic-<reason>
            msg = None
        if isinstance(msg, ch.RunBatch):
            ring.run(pnic, msg, replies)
            replies.append(ch.BatchDone(msg.rows))
        else:
            if msg is not None:
                replies = pnic.handle(msg)
            replies.append(ch.Done())  # every frame is answered: the VNIC counts groups
        try:
            for reply in replies:
                conn.send_bytes(ch.encode(reply))
        except OSError:  # the host closed the pipe: it needs no more answers
            return


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
        self.closed = False

    def _read(self) -> None:
        while True:
            try:
                self.replies.put(self.conn.recv_bytes())
            except (EOFError, OSError):
                self.replies.put(None)
                return

    def send(self, msg: ch.Msg) -> None:
        self.send_frame(ch.encode(msg))

    def send_frame(self, frame: bytes) -> None:
        self.conn.send_bytes(frame)

    def answers(self) -> list[ch.Msg]:
        """The answers to the oldest message not yet answered: blocks until its Done."""
        group = []
        while not isinstance(msg := self._next(), ch.Done):
            group.append(msg)
        return group

    def run_batch(self, res: BatchResults, select: np.ndarray,
                  now: np.ndarray) -> list[ch.Msg] | None:
        """The host's batch through the PNIC process's data path, by way of the shared ring,
        each packet at its trace time `now`; the entries handed back, as Return messages.
        None: too big for the ring (nothing was run)."""
        rows = np.flatnonzero(select)
        n = len(res)
        if not len(rows):
            return []
        if n > RING_ROWS:
            return None
        lo = int(res.offset[rows].min())
        hi = int((res.offset[rows] + res.caplen[rows]).max())
        if hi - lo > RING_FRAMES:
            return None
        ring = self.ring
        ring.frames[:hi - lo] = res.buf[lo:hi]
        cols = ring.inputs[:, :n]
        cols[0] = res.offset - lo
        cols[1], cols[2], cols[3], cols[4] = res.caplen, res.wire_len, res.linktype, now
        cols[5] = select
        self.send(ch.RunBatch(n, hi - lo))
        returned = []
        while not isinstance(msg := self._next(), ch.BatchDone):
            returned.append(msg)
        o = {name: a[:n] for name, a in ring.outputs.items()}
        done = select & (o["verdict"] >= 0)
        res.verdict[select] = o["verdict"][select]
        res.reason[done], res.machine[done] = o["reason"][done], o["machine"][done]
        res.direction[done] = o["direction"][done]
        res.buf[lo:hi] = ring.frames[:hi - lo]
        return returned

    def _next(self) -> ch.Msg:
        """The next message off the pipe, waiting for it (bad frames counted and skipped)."""
        while True:
            try:
                frame = self.replies.get(timeout=PNIC_TIMEOUT)
            except queue.Empty:
                raise ConnectionError(f"no answer from the PNIC process in {PNIC_TIMEOUT:.0f} s"
                                      ) from None
            if frame is None:
                raise ConnectionError("the PNIC process has gone")
            try:
                return ch.decode(frame)
            except ch.ChannelError as exc:
                ch.count_rejected(self.rejected, exc)

    def close(self) -> None:
        """Stop the PNIC process and the reader (idempotent)."""
        if self.closed:
            return
        self.closed = True
        # shut the socket down before closing it: the reader, blocked in a read, sees EOF
        # (closing the descriptor under it is not safe), and the PNIC process sees EOF and exits
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self.conn.fileno())) as s:
            s.shutdown(socket.SHUT_RDWR)
        self.reader.join(timeout=5)
        self.conn.close()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
