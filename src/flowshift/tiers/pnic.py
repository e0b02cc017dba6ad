"""The PNIC: a SmartNIC with a bounded, exact-match second cache of flow entries.

It processes packets of the flows it owns and nothing else: it never evaluates rules, allocates
NAT ports or picks LB backends. A packet it cannot finish (a miss, a SYN/FIN/RST that changes
the connection's life, an expired entry) is punted to the VNIC, after returning the flow's entry
when it has one, so the VNIC continues with the exact state. It reports entries on an interval
and returns idle flows. It talks to the VNIC only through channel messages.
"""

from __future__ import annotations

from flowshift import channel as ch
from flowshift.entry import ENTRY_SIZE, Flow, Tier
from flowshift.flow import FlowKey
from flowshift.packet.parse import parse
from flowshift.packet.view import TCP_FIN, TCP_RST, TCP_SYN, ParseError
from flowshift.services.chain import process_flow
from flowshift.verdict import Reason, Verdict

PUNT = -1
_LIFE_FLAGS = TCP_SYN | TCP_FIN | TCP_RST


class SecondCache:
    """Fixed-layout flow entries in one buffer, an exact-match index on both keys."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buf = bytearray(capacity * ENTRY_SIZE)
        self.index: dict[FlowKey, tuple[int, int]] = {}  # key -> (slot, direction)
        self.keys: dict[int, tuple[FlowKey, FlowKey]] = {}  # slot -> (key, reply key)
        self.free = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, slot: int) -> Flow:
        return Flow.from_bytes(memoryview(self.buf)[slot * ENTRY_SIZE:(slot + 1) * ENTRY_SIZE])

    def put(self, slot: int, flow: Flow) -> None:
        self.buf[slot * ENTRY_SIZE:(slot + 1) * ENTRY_SIZE] = flow.to_bytes()

    def insert(self, flow: Flow) -> int:
        slot = self.free.pop()
        self.put(slot, flow)
        self.index[flow.key] = (slot, 0)
        self.index[flow.reply_key] = (slot, 1)
        self.keys[slot] = (flow.key, flow.reply_key)
        return slot

    def remove(self, slot: int) -> bytes:
        key, reply = self.keys.pop(slot)
        self.index.pop(key, None)
        self.index.pop(reply, None)
        self.free.append(slot)
        return bytes(self.buf[slot * ENTRY_SIZE:(slot + 1) * ENTRY_SIZE])


class Pnic:
    """The device side of the VNIC↔PNIC channel."""

    def __init__(self, capacity: int, *, idle_timeout_ns: int, report_interval_ns: int) -> None:
        self.cache = SecondCache(capacity)
        self.idle_timeout = idle_timeout_ns
        self.report_interval = report_interval_ns
        self.next_report = -1
        self.healthy = True

    # -- messages ----------------------------------------------------------------------------

    def handle(self, msg: ch.Msg) -> list[ch.Msg]:
        """Apply one message; the replies to send back, in order."""
        out: list[ch.Msg] = []
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
            hit = self.cache.index.get(FlowKey(*msg.key))
            if hit is not None and hit[1] == 0:
                out.append(ch.Return(self.cache.remove(hit[0]), msg.reason))
        elif isinstance(msg, ch.Withdraw):
            self.healthy = False
            for slot in sorted(self.cache.keys):
                out.append(ch.Return(self.cache.remove(slot), "withdraw"))
            out.append(ch.Health(False))
        return out

    def _offload(self, msg: ch.Offload) -> ch.Msg:
        if not self.healthy:
            return ch.Refuse(msg.seq, "unhealthy")
        if not self.cache.free:
            return ch.Refuse(msg.seq, "full")
        flow = Flow.from_bytes(msg.entry)
        if flow.key in self.cache.index or flow.reply_key in self.cache.index:
            return ch.Refuse(msg.seq, "duplicate")
        flow.owner = Tier.PNIC
        self.cache.insert(flow)
        return ch.Ack(msg.seq)

    def _timers(self, now: int, out: list[ch.Msg]) -> None:
        if self.next_report < 0:
            self.next_report = now + self.report_interval
        if now < self.next_report:
            return
        self.next_report = now + self.report_interval
        cache = self.cache
        for slot in sorted(cache.keys):
            flow = cache.get(slot)
            if flow.last_seen + self.idle_timeout <= now:
                out.append(ch.Return(cache.remove(slot), "idle"))
        out.append(ch.Report(now, [bytes(cache.buf[s * ENTRY_SIZE:(s + 1) * ENTRY_SIZE])
                                   for s in sorted(cache.keys)]))

    def _expire(self, now: int, out: list[ch.Msg]) -> None:
        """Return entries whose conntrack timeout passed: the VNIC expires them exactly."""
        cache = self.cache
        for slot in sorted(cache.keys):
            if cache.get(slot).expires <= now:
                out.append(ch.Return(cache.remove(slot), "expired"))

    # -- the data path -----------------------------------------------------------------------

    def _packets(self, msg: ch.Packets, out: list[ch.Msg]) -> None:
        cache = self.cache
        verdicts: list[int] = []
        reasons: list[int] = []
        datas: list[bytes] = []
        for i in range(len(msg.index)):
            now = msg.ts[i]
            pkt = parse(bytearray(msg.data[i]), msg.linktype[i], msg.wire_len[i])
            hit = None
            if pkt.error == ParseError.OK and pkt.inner is None and not pkt.frag_offset:
                hit = cache.index.get(pkt.key(msg.zone[i]))
            if hit is None:
                verdicts.append(PUNT)
                reasons.append(0)
                datas.append(b"")
                continue
            slot, fdir = hit
            flow = cache.get(slot)
            if flow.expires <= now or (flow.key.proto == 6 and pkt.flags & _LIFE_FLAGS):
                reason = "expired" if flow.expires <= now else "closed"
                out.append(ch.Return(cache.remove(slot), reason))
                verdicts.append(PUNT)
                reasons.append(0)
                datas.append(b"")
                continue
            outcome = process_flow(pkt, flow, fdir, now)
            cache.put(slot, flow)
            verdicts.append(int(outcome.verdict))
            reasons.append(int(outcome.reason))
            datas.append(bytes(pkt.data) if outcome.verdict == Verdict.FORWARD else b"")
        out.append(ch.Results(list(msg.index), verdicts, reasons, datas))


def serve(endpoint: ch.Endpoint, pnic: Pnic) -> None:
    """Drain an in-process endpoint: handle every pending message, send the replies."""
    while True:
        msg = endpoint.receive()
        if msg is None:
            return
        for reply in pnic.handle(msg):
            endpoint.send(reply)


__all__ = ["PUNT", "Pnic", "Reason", "SecondCache", "serve"]
