"""The live machine → VNIC handoff: a guest's Linux chain and conntrack state become the VNIC's.

The daemon runs it between two frames of its single-threaded loop, so while it runs the VNIC
forwards nothing: frames wait in the ports' socket buffers. The steps (docs/live.md has the
sequence diagram):

1. read each LB pool's round-robin position from its rule's counter (the guest's ruleset is
   still in place, and no new inbound connection can reach it: the VNIC forwards nothing);
2. withdraw the ruleset in one nft transaction: from here the guest judges no packet; frames it
   judged before are already on their way to the VNIC (translated), later ones are not;
3. dump the guest's conntrack table over ctnetlink: complete, since no packet can create or
   translate an entry any more (entries outlive the ruleset);
4. convert every entry (ctimport.py) and send config + entries + LB state as one
   `channel.Handoff` frame; the VNIC side decodes it, builds the chain from the config that
   crossed, imports the entries and owns the machine's flows;
5. flush the guest's conntrack table: every entry in it was handed over, and none was made
   since the withdrawal (the guest's conntrack hooks went with its ruleset).

If steps 1–4 fail, the ruleset is put back (its conntrack entries are untouched, so the guest
goes on where it stopped) and the machine stays at tier machine.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from flowshift import channel
from flowshift.live import guest
from flowshift.live.ctimport import CtEntry, to_flow
from flowshift.live.engine import (
    Chain,
    Flow,
    HostConfig,
    Tier,
    chain_bits,
    handoff_config,
    parse_machine,
)
from flowshift.live.pipeline import Pipeline


@dataclass(frozen=True)
class Result:
    flows: int
    flushed: int  # entries deleted from the guest's table
    lb_state: list[int]
    seconds: float  # from the first step to the flush: the VNIC forwarded nothing meanwhile
    phases: dict[str, float]  # seconds of each step: withdraw (with the LB read), dump,
    # import (convert, frame, decode, import), flush


def backends(cfg: HostConfig, m: int) -> dict[tuple[bytes, int], int]:
    """(address, port) -> backend index in its pool, to name an imported flow's backend."""
    out: dict[tuple[bytes, int], int] = {}
    for pool in cfg.machines[m].lb:
        for i, b in enumerate(pool.backends):
            out.setdefault((ipaddress.ip_address(b.addr).packed, b.port), i)
    return out


def flows_of(cfg: HostConfig, m: int, entries: list[CtEntry], now: int,
             owner: Tier = Tier.VNIC) -> list[Flow]:
    bits = chain_bits(cfg.machines[m].services)
    table = backends(cfg, m)
    flows = [to_flow(ct, m, bits, now, table) for ct in entries]
    for f in flows:
        f.owner = owner
    return flows


def machine_message(cfg: HostConfig, m: int, entries: list[CtEntry], lb_state: list[int],
                    now: int) -> bytes:
    """The machine's side: its config and entries as one channel frame."""
    msg = channel.Handoff(m, handoff_config(cfg, m),
                          [f.to_bytes() for f in flows_of(cfg, m, entries, now)], lb_state)
    return channel.encode(msg)


def vnic_receive(pipeline: Pipeline, frame: bytes, now: int) -> int:
    """The VNIC's side: decode the frame, build the chain, import. Returns the entries."""
    msg = channel.decode(frame)
    assert isinstance(msg, channel.Handoff)
    machine = parse_machine(msg.config, f"handoff of machine {msg.machine}")
    chain = Chain(machine, msg.machine, Tier.VNIC)
    pipeline.take_over(msg.machine, chain, [Flow.from_bytes(raw) for raw in msg.entries],
                       list(msg.lb_state), now)
    return len(msg.entries)


def run(cfg: HostConfig, m: int, ns: str, conntrack: guest.Conntrack,
        pipeline: Pipeline) -> Result:
    """Hand machine m (namespace ns) over to the VNIC; see the module docstring."""
    t0 = time.monotonic()
    lb_state = guest.lb_slots(cfg, m, ns)
    guest.withdraw(cfg, m, ns)
    t1 = time.monotonic()
    try:
        entries = conntrack.dump()
        t2 = time.monotonic()
        now = time.monotonic_ns()
        n = vnic_receive(pipeline, machine_message(cfg, m, entries, lb_state, now), now)
    except BaseException:
        guest.apply(cfg, m, ns)
        raise
    t3 = time.monotonic()
    conntrack.flush()
    t4 = time.monotonic()
    phases = {"withdraw": t1 - t0, "dump": t2 - t1, "import": t3 - t2, "flush": t4 - t3}
    return Result(n, len(entries), lb_state, t4 - t0, phases)


__all__ = ["Result", "flows_of", "machine_message", "run", "vnic_receive"]
