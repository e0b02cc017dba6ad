"""The PNIC: a SmartNIC with a bounded, exact-match second cache of flow entries.

It processes packets of the flows it owns and nothing else: it never evaluates rules, allocates
NAT ports or picks LB backends. Its data path is the compiled engine (tiers/pnic_engine.py);
a packet the engine does not finish (a miss, a SYN/FIN/RST that changes the connection's life,
an expired entry, a header shape it does not handle) is punted to the VNIC, after returning the
flow's entry when it has one, so the VNIC continues with the exact state. It reports entries on
an interval and returns idle flows. It talks to the VNIC only through channel messages; packets
reach it as batches, in a message or, for the host's own batches, in place (like a DMA ring).
"""

from __future__ import annotations

import numpy as np

from flowshift import channel as ch
from flowshift.config import MachineConfig
from flowshift.entry import ENTRY_DTYPE, Tier
from flowshift.flow import FlowKey
from flowshift.tiers.pnic_engine import RETURN_REASONS, PnicEngine
from flowshift.verdict import PuntReason, RefuseReason, ReturnReason

PUNT = -1
_OWNER = ENTRY_DTYPE.fields["owner"][1]  # the entry's owner byte


class Pnic:
    """The device side of the VNIC↔PNIC channel."""

    def __init__(self, capacity: int, machines: tuple[MachineConfig, ...], *,
                 idle_timeout_ns: int, report_interval_ns: int) -> None:
        from flowshift.host import Classifier  # the PNIC steers by the machines' addresses

        self.capacity = capacity
        self.engine = PnicEngine(max(capacity, 1), Classifier(machines))
        self.idle_timeout = idle_timeout_ns
        self.report_interval = report_interval_ns
        self.next_report = -1
        self.healthy = True

    # -- messages ----------------------------------------------------------------------------

    def handle(self, msg: ch.Msg) -> list[ch.Msg]:
        """Apply one message; the replies to send back, in order."""
        out: list[ch.Msg] = []
        engine = self.engine
        if isinstance(msg, ch.Packets):
            self._timers(msg.now, out)
            self._packets(msg, out)
        elif isinstance(msg, ch.Offload):
            out.append(self._offload(msg))
        elif isinstance(msg, ch.Tick):
            self._timers(msg.now, out)
            if msg.sync:
                self._expire(msg.now, out)
                out.append(ch.Synced(msg.sync))
        elif isinstance(msg, ch.Recall):
            hit = engine.find(FlowKey(*msg.key))
            if hit is not None and hit[1] == 0:
                out.append(ch.Return(engine.remove(hit[0]), msg.reason))
        elif isinstance(msg, ch.Withdraw):
            self.healthy = False
            for slot in engine.used_slots():
                out.append(ch.Return(engine.remove(slot), ReturnReason.WITHDRAW))
            out.append(ch.Health(False))
        return out

    def _offload(self, msg: ch.Offload) -> ch.Msg:
        if not self.healthy:
            return ch.Refuse(msg.seq, RefuseReason.UNHEALTHY)
        if len(self.engine) >= self.capacity:
            return ch.Refuse(msg.seq, RefuseReason.FULL)
        entry = bytearray(msg.entry)
        entry[_OWNER] = Tier.PNIC
        if self.engine.insert(entry) < 0:
            return ch.Refuse(msg.seq, RefuseReason.DUPLICATE)
        return ch.Ack(msg.seq)

    def _timers(self, now: int, out: list[ch.Msg]) -> None:
        if self.next_report < 0:
            self.next_report = now + self.report_interval
        if now < self.next_report:
            return
        self.next_report = now + self.report_interval
        engine = self.engine
        slots = np.array(engine.used_slots(), np.int64)
        idle = engine.entries["last_seen"][slots] + self.idle_timeout <= now
        for slot in slots[idle].tolist():
            out.append(ch.Return(engine.remove(slot), ReturnReason.IDLE))
        out.append(ch.Report(now, [engine.get(s) for s in slots[~idle].tolist()]))

    def _expire(self, now: int, out: list[ch.Msg]) -> None:
        """Return entries whose conntrack timeout passed: the VNIC expires them exactly."""
        engine = self.engine
        slots = np.array(engine.used_slots(), np.int64)
        for slot in slots[engine.entries["expires"][slots] <= now].tolist():
            out.append(ch.Return(engine.remove(slot), ReturnReason.EXPIRED))

    # -- the data path -----------------------------------------------------------------------

    def run(self, buf: np.ndarray, offset: np.ndarray, caplen: np.ndarray,
            wire_len: np.ndarray, linktype: np.ndarray, ts: np.ndarray, select: np.ndarray,
            verdict: np.ndarray, reason: np.ndarray, machine: np.ndarray,
            direction: np.ndarray, out: list[ch.Msg]) -> None:
        """The selected packets of a batch through the engine, in place: processed ones get
        their verdict, punted ones verdict PUNT and their PuntReason; the entries handed back
        become Return messages, in order, with the reason the engine gave."""
        returned = np.full(len(offset), -1, np.int64)
        self.engine.process(buf, offset, caplen, wire_len, linktype, ts, select, verdict,
                            reason, returned, machine, direction)
        for i in np.flatnonzero(returned >= 0).tolist():
            raw = self.engine.take_returned(int(returned[i]))
            out.append(ch.Return(raw, RETURN_REASONS[PuntReason(int(reason[i]))]))

    def _packets(self, msg: ch.Packets, out: list[ch.Msg]) -> None:
        n = len(msg.index)
        caplen = np.fromiter(map(len, msg.data), np.int64, n)
        offset = np.zeros(n, np.int64)
        np.cumsum(caplen[:-1], out=offset[1:])
        buf = np.frombuffer(b"".join(msg.data), np.uint8).copy()
        verdict = np.empty(n, np.int8)
        reason = np.empty(n, np.int16)
        self.run(buf, offset, caplen, np.array(msg.wire_len, np.int64),
                 np.array(msg.linktype, np.int64), np.array(msg.ts, np.int64),
                 np.ones(n, np.bool_), verdict, reason,
                 np.empty(n, np.int16), np.empty(n, np.int8), out)
        datas = [buf[offset[i]:offset[i] + caplen[i]].tobytes() if verdict[i] == 0 else b""
                 for i in range(n)]
        out.append(ch.Results(list(msg.index), verdict.tolist(), reason.tolist(), datas))


def serve(endpoint: ch.Endpoint, pnic: Pnic) -> None:
    """Drain an in-process endpoint: handle every pending message, send the replies."""
    while True:
        msg = endpoint.receive()
        if msg is None:
            return
        for reply in pnic.handle(msg):
            endpoint.send(reply)


__all__ = ["PUNT", "Pnic", "serve"]
