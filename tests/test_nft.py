"""`flowshift nft`: the rendering of each config feature, and Linux accepting every rendering."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings

from flowshift.cli import main
from flowshift.config import HostConfig, load_config, parse_config
from flowshift.nft import MAX_MODULUS, RenderError, render, sysctl_lines
from hosttools import REAL
from test_config import configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    *sorted((ROOT / "examples").glob("*.toml")),
    ROOT / "src/flowshift/data/demo.toml",
    ROOT / "bench/offload-host.toml",
    *sorted(REAL.glob("*.toml")),
]
needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")


def nft_check(ruleset: str) -> subprocess.CompletedProcess[str]:
    """`nft -c`: parse and check against the kernel, change nothing."""
    return subprocess.run(["nft", "-c", "-f", "-"], input=ruleset, text=True,
                          capture_output=True, timeout=30)


def machine(**extra: Any) -> dict[str, Any]:
    return {"name": "m", "addresses": ["10.0.0.0/24", "fd00::/64"],
            "public": ["192.0.2.1", "192.0.2.2", "2001:db8::1"], **extra}


def cfg_of(*machines: dict[str, Any]) -> HostConfig:
    return parse_config({"machine": list(machines)}, "test")


def lines(cfg: HostConfig) -> list[str]:
    return [line.strip() for line in render(cfg).text.splitlines()]


def test_weights_become_runs_of_numgen_slots() -> None:
    cfg = cfg_of(machine(services=["lb"], lb=[{
        "proto": "tcp", "vip": "192.0.2.1:80", "scheduler": "round-robin",
        "backends": ["10.0.0.1:8080", "10.0.0.2:9090@2", "10.0.0.3:8080@0"]}]))
    (rule,) = [line for line in lines(cfg) if "numgen" in line]
    assert ('iifname "outside" ip daddr 192.0.2.1 tcp dport 80 counter dnat ip to numgen inc '
            "mod 3 map { 0 : 10.0.0.1 . 8080, 1-2 : 10.0.0.2 . 9090 }") in rule


def test_maglev_renders_as_jhash_with_a_warning() -> None:
    cfg = cfg_of(machine(services=["lb"], lb=[{
        "proto": "udp", "vip": "[2001:db8::1]:53", "backends": ["[fd00::1]:53", "[fd00::2]:53"]}]))
    out = render(cfg)
    assert len(out.warnings) == 1 and "Maglev" in out.warnings[0]
    assert "# warning: machine[0].lb[0]: Maglev" in out.text
    assert "jhash ip6 saddr . ip6 daddr . udp sport . udp dport mod 2 seed 0x0 map" in out.text


def test_a_pool_without_weight_drops_its_new_flows_before_the_rules() -> None:
    cfg = cfg_of(machine(services=["firewall", "lb"], firewall={"default": "allow"}, lb=[{
        "proto": "tcp", "vip": "192.0.2.1:80", "backends": ["10.0.0.1:80@0"]}]))
    text = lines(cfg)
    assert not any("numgen" in t or "jhash" in t for t in text)
    drop = text.index('iifname "outside" ip daddr 192.0.2.1 tcp dport 80 counter drop '
                      'comment "machine[0].lb[0]: no backend"')
    assert drop < text.index('counter accept comment "machine[0].firewall.default"')


def test_a_total_weight_over_32_bits_cannot_be_rendered() -> None:
    cfg = cfg_of(machine(services=["lb"], lb=[{
        "proto": "tcp", "vip": "192.0.2.1:80", "scheduler": "round-robin",
        "backends": [f"10.0.0.1:80@{MAX_MODULUS}", "10.0.0.2:80@1"]}]))
    with pytest.raises(RenderError, match=r"machine\[0\]\.lb\[0\]\.backends: total weight"):
        render(cfg)


def test_rules_keep_their_order_and_match_semantics() -> None:
    cfg = cfg_of(machine(services=["firewall"], firewall={"default": "drop", "rule": [
        {"action": "allow", "direction": "egress", "proto": "tcp", "dst_port": [80, "81-89"]},
        {"action": "drop", "direction": "ingress", "src": "203.0.113.0/24"},
        {"action": "allow", "dst_port": [53]},
        {"action": "allow", "icmp_type": [8, 128]},
        {"action": "allow", "proto": "icmpv6", "icmp_type": [135]},
        {"action": "allow", "proto": "udp", "dst": "fd00::/64"},
    ]}))
    text = lines(cfg)
    rules = [t.rsplit(" comment", 1)[0] for t in text if "firewall.rule[" in t]
    assert rules == [
        'iifname "inside" tcp dport { 80, 81-89 } counter accept',
        'iifname "outside" ip saddr 203.0.113.0/24 counter drop',
        "meta l4proto { tcp, udp } th dport { 53 } counter accept",
        "meta l4proto { icmp, ipv6-icmp } @th,0,8 { 8, 128 } counter accept",
        "icmpv6 type { 135 } counter accept",
        "ip6 daddr fd00::/64 meta l4proto udp counter accept",
    ]
    assert text.index("ct state established,related counter accept") < text.index(
        'counter drop comment "machine[0].firewall.default"')


def test_snat_port_range_covers_echo_identifiers_and_no_range_keeps_the_port_class() -> None:
    cfg = cfg_of(machine(services=["nat"], nat={"snat": [
        {"source": "10.0.0.0/25", "to": "192.0.2.1-192.0.2.2", "ports": "1024-65535"},
        {"source": "10.0.0.128/25", "to": "192.0.2.1"},
        {"source": "fd00::/64", "to": "2001:db8::1", "ports": 40000},
    ]}))
    out = render(cfg)
    snat = [t.strip().rsplit(" comment", 1)[0] for t in out.text.splitlines() if " snat " in t]
    assert snat == [
        'iifname "inside" ip saddr 10.0.0.0/25 meta l4proto { tcp, udp, icmp } counter '
        "snat ip to 192.0.2.1-192.0.2.2:1024-65535",
        'iifname "inside" ip saddr 10.0.0.128/25 counter snat ip to 192.0.2.1',
        'iifname "inside" ip6 saddr fd00::/64 meta l4proto { tcp, udp, ipv6-icmp } counter '
        "snat ip6 to [2001:db8::1]:40000",
    ]
    assert len(out.warnings) == 1 and "snat[0]" in out.warnings[0]


def test_machines_get_tables_and_ports_of_their_own() -> None:
    cfg = load_config(ROOT / "src/flowshift/data/demo.toml")
    text = render(cfg).text
    assert "table inet flowshift-gw {" in text and "table inet flowshift-lab {" in text
    assert 'iifname != { "inside0", "outside0" } accept' in text
    assert 'iifname != { "inside1", "outside1" } accept' in text


@dataclass(frozen=True)
class _Conntrack:
    tcp_loose: bool = False
    udp_timeout: float = 30.5
    made_up: int = 3


@dataclass(frozen=True)
class _WithConntrack:
    machines: tuple[Any, ...]
    conntrack: _Conntrack = _Conntrack()


def test_sysctl_lines_with_and_without_a_conntrack_table() -> None:
    cfg = load_config(ROOT / "examples/guest-firewall.toml")
    plain = sysctl_lines(cfg)
    assert "net.ipv4.ip_forward = 1" in plain and "net.netfilter.nf_conntrack_acct = 1" in plain
    assert "net.netfilter.nf_conntrack_tcp_loose = 1" in plain
    with_ct = sysctl_lines(_WithConntrack(cfg.machines))  # type: ignore[arg-type]
    assert "net.netfilter.nf_conntrack_tcp_loose = 0" in with_ct
    assert "net.netfilter.nf_conntrack_udp_timeout = 31" in with_ct
    assert "# conntrack.made_up: no Linux sysctl" in with_ct


def test_cli_renders_one_machine_and_refuses_unknown_ones() -> None:
    runner = CliRunner()
    demo = str(ROOT / "src/flowshift/data/demo.toml")
    ok = runner.invoke(main, ["nft", demo, "--machine", "lab", "--machine-port", "eth1"])
    assert ok.exit_code == 0, ok.output
    assert "flowshift-lab" in ok.output and "flowshift-gw" not in ok.output
    assert 'iifname "eth1" counter accept' in ok.output
    bad = runner.invoke(main, ["nft", demo, "--machine", "nope"])
    assert bad.exit_code == 2
    assert "no machine named 'nope'" in bad.output


def test_cli_exits_2_on_what_it_cannot_render(tmp_path: Path) -> None:
    path = tmp_path / "heavy.toml"
    path.write_text(
        '[[machine]]\nname = "m"\naddresses = ["10.0.0.0/24"]\npublic = ["192.0.2.1"]\n'
        'services = ["lb"]\n[[machine.lb]]\nproto = "tcp"\nvip = "192.0.2.1:80"\n'
        f'backends = ["10.0.0.1:80@{MAX_MODULUS}", "10.0.0.2:80@{MAX_MODULUS}"]\n')
    out = CliRunner().invoke(main, ["nft", str(path)])
    assert out.exit_code == 2
    assert out.output.count("\n") == 1 and "32-bit modulus" in out.output


@pytest.mark.root
@needs_nft
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_linux_accepts_every_shipped_config(path: Path) -> None:
    done = nft_check(render(load_config(path)).text)
    assert done.returncode == 0, done.stderr


@pytest.mark.root
@needs_nft
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_linux_accepts_any_valid_config(data: dict[str, Any]) -> None:
    cfg = parse_config(data, "generated")
    try:
        ruleset = render(cfg).text
    except RenderError as e:  # only a round-robin or Maglev pool's total weight is refused
        assert "total weight" in str(e)
        return
    done = nft_check(ruleset)
    assert done.returncode == 0, f"{done.stderr}\n{ruleset}"
