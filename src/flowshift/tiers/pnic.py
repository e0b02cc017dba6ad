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
from flowshift.entry import ENTRY_SIZE, Tier, field_offsets
from flowshift.flow import FlowKey
from flowshift.tiers._pnic_index import KEY_TAKEN, NO_ROOM
from flowshift.tiers.classify import Classifier
from flowshift.tiers.pnic_engine import RETURN_REASONS, PnicEngine
from flowshift.verdict import RefuseReason, ReturnReason

PUNT = -1
_OWNER = field_offsets()["owner"]  # the entry's owner byte
_PNIC_OWNER = bytes([Tier.PNIC])
# an insert's outcome (tiers/_pnic_index.py) as an OffloadResults byte
_REFUSALS = np.zeros(3, np.uint8)
_REFUSALS[NO_ROOM], _REFUSALS[KEY_TAKEN] = RefuseReason.FULL, RefuseReason.DUPLICATE
_RETURN_BY_PUNT = {int(punt): int(why) for punt, why in RETURN_REASONS.items()}  # plain ints


class Pnic:
    """The device side of the VNIC↔PNIC channel."""

    def __init__(self, capacity: int, machines: tuple[MachineConfig, ...], *,
                 idle_timeout_ns: int, report_interval_ns: int) -> None:
        self.capacity = capacity
        self.engine = PnicEngine(max(capacity, 1), Classifier(machines),
                                 [m.conntrack.knobs() for m in machines],
                                 [m.forwarding == "router" for m in machines])
        self.idle_timeout = idle_timeout_ns
        self.report_interval = report_interval_ns
        self.zones = len(machines)
        self.healthy = True
        self.rejected: dict[str, int] = {}  # messages rejected by content, by reason
        self._returned = np.empty(0, np.int64)  # the engine's per-packet slot, reused

    # -- messages ----------------------------------------------------------------------------

    def _reject(self, reason: str) -> list[ch.Msg]:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return []

    def handle(self, msg: ch.Msg) -> list[ch.Msg]:
        """Apply one message; the replies to send back, in order. A message whose contents
        cannot be the VNIC's is rejected (counted by reason) and changes nothing."""
        out: list[ch.Msg] = []
        engine = self.engine
        if isinstance(msg, ch.Packets):
            problem = self._packets_problem(msg)
            if problem is not None:
                return self._reject(problem)
            self._packets(msg, out)
        elif isinstance(msg, ch.Offload):
            out.append(self._offload(msg))
        elif isinstance(msg, ch.Offloads):
            if len(msg.entries) % ENTRY_SIZE:  # not whole entries: nothing to answer for
                return self._reject("bad-entry")
            out.append(self._offloads(msg))
        elif isinstance(msg, ch.Tick):
            if msg.sync:  # a barrier: expired entries come back, no report
                self._expire(msg.now, out)
                slots = np.array(engine.used_slots(), np.int64)
                out.append(ch.Synced(msg.sync, int(engine.entries["expires"][slots].min())
                                     if len(slots) else -1))
            else:  # the VNIC's report timer, on its grid of trace time
                self._timers(msg.now, out)
        elif isinstance(msg, ch.Query):
            out.append(ch.Entries(msg.now, [engine.get(s) for s in engine.used_slots()],
                                  dict(self.rejected)))
        elif isinstance(msg, ch.Recall):
            problem = ch.key_problem(msg.key, self.zones)
            if problem is None and msg.reason not in ReturnReason._value2member_map_:
                problem = "bad-reason"
            if problem is not None:
                return self._reject(problem)
            hit = engine.find(FlowKey(*msg.key))
            if hit is not None and hit[1] == 0:
                out.append(ch.Return(engine.remove(hit[0]), msg.reason))
        elif isinstance(msg, ch.Withdraw):
            self.healthy = False
            for slot in engine.used_slots():
                out.append(ch.Return(engine.remove(slot), ReturnReason.WITHDRAW))
            out.append(ch.Health(False))
        else:
            return self._reject("unexpected")
        return out

    def _packets_problem(self, msg: ch.Packets) -> str | None:
        n = len(msg.index)
        if not (len(msg.zone) == len(msg.ts) == len(msg.data) == len(msg.linktype)
                == len(msg.wire_len) == n):
            return "bad-packets"
        if any(not 0 <= z < self.zones for z in msg.zone):
            return "unknown-zone"
        if any(not 0 <= lt < 1 << 16 for lt in msg.linktype) or any(
                w < 0 or w >= 1 << 32 for w in msg.wire_len) or any(
                t < 0 or t >= 1 << 63 for t in msg.ts):
            return "bad-packets"
        return None

    def _offload(self, msg: ch.Offload) -> ch.Msg:
        problem = ch.entry_problem(msg.entry, self.zones)
        if problem is not None:
            self._reject(problem)
            return ch.Refuse(msg.seq, RefuseReason.BAD_ENTRY)
        if not self.healthy:
            return ch.Refuse(msg.seq, RefuseReason.UNHEALTHY)
        if len(self.engine) >= self.capacity:
            return ch.Refuse(msg.seq, RefuseReason.FULL)
        entry = msg.entry[:_OWNER] + _PNIC_OWNER + msg.entry[_OWNER + 1:]
        if self.engine.insert(entry) < 0:
            return ch.Refuse(msg.seq, RefuseReason.DUPLICATE)
        return ch.Ack(msg.seq)

    def _offloads(self, msg: ch.Offloads) -> ch.Msg:
        """Every entry as `_offload` takes one, in order, installed in one compiled call. An
        entry that fails its checks rejects the whole message (counted once, nothing
        installed, every entry refused as a bad entry): a batch with one bad entry in it
        cannot be trusted for the others."""
        n = len(msg.entries) // ENTRY_SIZE
        problem = ch.entries_problem(msg.entries, self.zones)
        if problem is not None:
            self._reject(problem)
            return ch.OffloadResults(msg.seq, bytes([RefuseReason.BAD_ENTRY]) * n)
        if not self.healthy:
            return ch.OffloadResults(msg.seq, bytes([RefuseReason.UNHEALTHY]) * n)
        rows = np.frombuffer(msg.entries, np.uint8).reshape(n, ENTRY_SIZE).copy()
        rows[:, _OWNER] = Tier.PNIC
        codes = self.engine.insert_many(rows, self.capacity - len(self.engine))
        return ch.OffloadResults(msg.seq, _REFUSALS[codes].tobytes())

    def _timers(self, now: int, out: list[ch.Msg]) -> None:
        """Idle returns and a report of every other entry."""
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
        if len(self._returned) < len(offset):
            self._returned = np.empty(len(offset), np.int64)
        returned = self._returned[:len(offset)]  # the engine sets it for selected packets
        live = len(self.engine)
        self.engine.process(buf, offset, caplen, wire_len, linktype, ts, select, verdict,
                            reason, returned, machine, direction)
        if len(self.engine) == live:  # none handed back: no need to look
            return
        chosen = np.flatnonzero(select)  # `returned` is set for these only
        for i in chosen[returned[chosen] >= 0].tolist():
            raw = self.engine.take_returned(int(returned[i]))
            out.append(ch.Return(raw, _RETURN_BY_PUNT[int(reason[i])], int(ts[i])))

    def handed_back(self, slot: int, punt: int, now: int) -> ch.Return:
        """The entry a fast-path pass punted from this cache at trace time `now` (the pass ran
        the PNIC's rows for it: tiers/_fastpath_batch.py), as the Return `run` sends."""
        return ch.Return(self.engine.hand_back(slot), _RETURN_BY_PUNT[punt], now)

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
