"""The host config: a TOML contract that other tools write, validated into typed objects.

Three modules with one job each: `model` (the frozen dataclasses, every default written
once), `load` (TOML or a decoded dict -> validated model, errors naming the file and key path)
and `dump` (model -> dict or TOML). This package re-exports their public names, so
`from flowshift.config import HostConfig, load_config` keeps working.
"""

from flowshift.config.dump import to_dict, to_toml
from flowshift.config.load import load_config, parse_config
from flowshift.config.model import (
    ACTIONS,
    DIRECTIONS,
    MAX_CAPACITY,
    MAX_COUNT,
    MAX_SECONDS,
    MAX_WEIGHT,
    NAME_RE,
    POLICIES,
    PORT_PROTOCOLS,
    PROTOCOLS,
    SCHEDULERS,
    SECTION_SERVICES,
    SERVICES,
    STARTS,
    Backend,
    ConfigError,
    DnatRule,
    FirewallConfig,
    HostConfig,
    LbPool,
    LiveConfig,
    MachineConfig,
    NatConfig,
    Network,
    OffloadConfig,
    PnicConfig,
    PortRanges,
    Rule,
    SnatRule,
    fields_default,
)

__all__ = [
    "ACTIONS",
    "DIRECTIONS",
    "MAX_CAPACITY",
    "MAX_COUNT",
    "MAX_SECONDS",
    "MAX_WEIGHT",
    "NAME_RE",
    "POLICIES",
    "PORT_PROTOCOLS",
    "PROTOCOLS",
    "SCHEDULERS",
    "SECTION_SERVICES",
    "SERVICES",
    "STARTS",
    "Backend",
    "ConfigError",
    "DnatRule",
    "FirewallConfig",
    "HostConfig",
    "LbPool",
    "LiveConfig",
    "MachineConfig",
    "NatConfig",
    "Network",
    "OffloadConfig",
    "PnicConfig",
    "PortRanges",
    "Rule",
    "SnatRule",
    "fields_default",
    "load_config",
    "parse_config",
    "to_dict",
    "to_toml",
]
