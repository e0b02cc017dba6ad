"""Transports of the VNIC↔PNIC channel, as seen from the VNIC.

`InlineLink` runs the PNIC in this process: a frame sent is handled at once and its replies wait
in the VNIC's inbox (deterministic; the host decides when it looks). `ProcessLink` runs the PNIC
in a process of its own, pinned to its own core where there is one, as a SmartNIC's processor
would be: frames go over a pipe, and a reader thread empties the way back so neither side can
block the other.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
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

    def run_batch(self, res: BatchResults, select: np.ndarray) -> None:
        """The host's batch through the PNIC's data path in place (its DMA ring); the entries
        handed back arrive as Return messages."""
        out: list[ch.Msg] = []
        self.pnic.run(res.buf, res.offset, res.caplen, res.wire_len, res.linktype, res.ts,
                      select, res.verdict, res.reason, res.machine, res.direction, out)
        for msg in out:
            self.pnic_end.send(msg)

    @property
    def rejected(self) -> dict[str, int]:
        return self.vnic_end.rejected

    def close(self) -> None:
        self.vnic_end.inbox.clear()


def _pnic_main(conn: Connection, capacity: int, machines: tuple[MachineConfig, ...],
               idle_timeout_ns: int, report_interval_ns: int) -> None:
    """The PNIC process: decode, handle, answer, until the pipe closes."""
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
        for reply in pnic.handle(msg):
            conn.send_bytes(ch.encode(reply))


class ProcessLink:
    def __init__(self, capacity: int, machines: tuple[MachineConfig, ...], *,
                 idle_timeout_ns: int, report_interval_ns: int) -> None:
        ctx = mp.get_context("fork")  # a SmartNIC boots on its own: inherit nothing but args
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_pnic_main, name="flowshift-pnic", daemon=True,
                                args=(child, capacity, machines, idle_timeout_ns,
                                      report_interval_ns))
        self.proc.start()
        child.close()
        self.replies: queue.Queue[bytes | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="pnic-reader", daemon=True)
        self.reader.start()
        self.rejected: dict[str, int] = {}

    def _read(self) -> None:
        while True:
            try:
                self.replies.put(self.conn.recv_bytes())
            except (EOFError, OSError):
                self.replies.put(None)
                return

    def send(self, msg: ch.Msg) -> None:
        self.conn.send_bytes(ch.encode(msg))

    def receive(self, block: bool = False) -> ch.Msg | None:
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
