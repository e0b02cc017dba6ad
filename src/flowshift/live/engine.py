"""The parts of flowshift the live runtime runs, imported in this one place.

The live VNIC is the reference engine on real frames: the same config loader, the same address
classifier as the replay host and the same `Chain`. Nothing here adds behaviour.
"""

from flowshift.config import (
    ConfigError,
    HostConfig,
    handoff_config,
    load_config,
    parse_config,
    parse_machine,
    to_dict,
)
from flowshift.entry import Flow, Tier, chain_bits
from flowshift.flow import FlowKey
from flowshift.nft import Ports, render, sysctl_lines, table_name
from flowshift.offload import OffloadPolicy, established
from flowshift.packet.parse import parse
from flowshift.report import flow_dump, flow_line
from flowshift.services.chain import EGRESS, INGRESS, Chain
from flowshift.stats import FlowView
from flowshift.tiers.classify import Classifier
from flowshift.tiers.vnic import resume

__all__ = [
    "EGRESS",
    "INGRESS",
    "Chain",
    "Classifier",
    "ConfigError",
    "Flow",
    "FlowKey",
    "FlowView",
    "HostConfig",
    "OffloadPolicy",
    "Ports",
    "Tier",
    "chain_bits",
    "established",
    "flow_dump",
    "flow_line",
    "handoff_config",
    "load_config",
    "parse",
    "parse_config",
    "parse_machine",
    "render",
    "resume",
    "sysctl_lines",
    "table_name",
    "to_dict",
]
