"""The machine tier: a guest running its own service chain, until it hands it to its VNIC.

The machine owns its config and, while it runs its chain, every flow of it. It can export both
at once (`handoff`): its config as its table of the config file, its whole conntrack table in
it (`config.handoff_config`), each flow as its entry bytes, and its load balancer's round-robin
positions. After that the VNIC runs the chain.
"""

from __future__ import annotations

from flowshift import channel as ch
from flowshift.config import HostConfig, handoff_config
from flowshift.entry import Tier
from flowshift.services.chain import Chain


class Machine:
    """One machine of the host and the chain it runs while it owns its flows."""

    def __init__(self, config: HostConfig, index: int) -> None:
        self.index = index
        self.name = config.machines[index].name
        self._host_config = config
        self.chain = Chain(config.machines[index], index, Tier.MACHINE)

    def handoff(self) -> ch.Handoff:
        """The message that hands this machine's config and flow entries to its VNIC."""
        chain = self.chain
        return ch.Handoff(self.index, handoff_config(self._host_config, self.index),
                          chain.flows.entries(), chain.lb.state() if chain.lb is not None else [])


__all__ = ["Machine"]
