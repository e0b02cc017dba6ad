"""The config package: model, load and dump, each default written once (in the model)."""

from __future__ import annotations

import inspect
import re
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import flowshift.config as config
from flowshift.config import (
    Backend,
    FirewallConfig,
    LbPool,
    MachineConfig,
    OffloadConfig,
    PnicConfig,
    Rule,
    load_config,
    parse_config,
    to_toml,
)
from flowshift.config import load as load_module

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
MINIMAL = {"machine": [{"name": "m", "addresses": ["10.0.0.0/24"], "services": ["firewall", "lb"],
                        "firewall": {"rule": [{"action": "allow"}]},
                        "lb": [{"proto": "tcp", "vip": "10.0.0.1:80",
                                "backends": ["10.0.0.2:80"]}]}]}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_toml_round_trip(path: Path) -> None:
    cfg = load_config(path)
    assert parse_config(tomllib.loads(to_toml(cfg)), "again") == cfg


def test_omitted_keys_take_the_model_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.pnic == PnicConfig() and cfg.offload == OffloadConfig()
    m = cfg.machines[0]
    assert m.start == MachineConfig.__dataclass_fields__["start"].default
    assert m.firewall is not None
    assert m.firewall.default_allow == FirewallConfig().default_allow
    rule = m.firewall.rules[0]
    assert (rule.direction, rule.proto) == (Rule(allow=True).direction, Rule(allow=True).proto)
    pool = m.lb[0]
    assert pool.scheduler == LbPool.__dataclass_fields__["scheduler"].default
    assert pool.backends[0].weight == Backend.__dataclass_fields__["weight"].default


def test_the_loader_writes_no_default_of_its_own() -> None:
    """Every default lives in the model: load.py reads none as a literal (`t.get(key, 4096)`)."""
    source = inspect.getsource(load_module)
    literals = re.findall(r"\.get\(\s*\"\w+\",\s*([^)\s]+)\)", source)
    assert literals, "the pattern must see the loader's t.get(key, default) calls"
    for cls in (PnicConfig, OffloadConfig, MachineConfig, LbPool, Backend):
        for f in fields(cls):
            if f.default is not MISSING:
                assert repr(f.default) not in literals, f"{cls.__name__}.{f.name} written twice"
    assert not [v for v in literals if re.fullmatch(r"[-\d.\"']+.*", v)], literals


def test_the_package_re_exports_the_public_names() -> None:
    for name in config.__all__:
        assert getattr(config, name) is not None
    assert config.ConfigError.__module__ == "flowshift.config.model"
