"""`flowshift verify` against the real kernel: full agreement where Linux can say the same thing.

Each case builds a Linux router in namespaces of its own (fs-v-<pid>-*), sends a generated
gateway trace through it and through flowshift, and tears the namespaces down. Maglev pools
have no nftables form: the plain config differs from Linux on LB flows, exactly as stated,
and its round-robin twin agrees.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroute2 import netns  # type: ignore[import-untyped]

from flowshift.cli import main
from flowshift.config import load_config, parse_config
from flowshift.linux.verify import verify
from flowshift.nft import render
from hosttools import REAL

ROOT = Path(__file__).resolve().parents[1]
root = pytest.mark.root
needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
EXACT = [  # (config, machine, round-robin twin of its Maglev pools)
    (ROOT / "examples/nat-gateway.toml", None, False),
    (ROOT / "examples/guest-firewall.toml", None, False),
    (ROOT / "examples/load-balancer.toml", None, True),
    (ROOT / "src/flowshift/data/demo.toml", "gw", True),
    (ROOT / "src/flowshift/data/demo.toml", "lab", False),
    (ROOT / "bench/offload-host.toml", None, False),
    (REAL / "lb-gateway-rr.toml", None, False),
]


def leftovers() -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(f"fs-v-{os.getpid()}-")]


def run_verify(*args: str) -> tuple[int, dict[str, Any] | str]:
    out = CliRunner().invoke(main, ["verify", *args], catch_exceptions=False)
    assert not leftovers()
    try:
        return out.exit_code, json.loads(out.output)
    except json.JSONDecodeError:
        return out.exit_code, out.output


@root
@needs_nft
@pytest.mark.slow
@pytest.mark.parametrize(("path", "machine", "twin"), EXACT,
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_linux_agrees_on_a_generated_gateway_trace(path: Path, machine: str | None,
                                                   twin: bool) -> None:
    args = [str(path), "--json", *(["--machine", machine] if machine else [])]
    code, result = run_verify(*args, *(["--maglev-as-round-robin"] if twin else []))
    assert isinstance(result, dict), result
    assert code == 0, result["differences"]
    assert result["agree"] and result["differing"] == 0
    assert result["compared"] > 1000 and not result["not_compared"]
    classes = result["classes"]
    for direction in ("egress", "ingress"):  # traffic crossed Linux both ways
        assert sum(c["forwarded"] for k, c in classes.items() if direction in k) > 0


@root
@needs_nft
@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "replay_input.pcap").is_file(), reason="real corpus absent")
def test_the_real_gateway_capture_agrees_with_the_live_kernel() -> None:
    """The corpus capture (snaplen 160) through today's kernel and through flowshift.

    Truncated frames go in zero-filled with valid checksums, so Linux tracks the connections
    as captured: without that, its window tracking would drop the ACKs of unseen data.
    """
    code, result = run_verify(str(REAL / "lb-gateway-rr.toml"), str(REAL / "replay_input.pcap"),
                              "--json")
    assert isinstance(result, dict), result
    assert code == 0, result["differences"]
    assert result["compared"] == 22463 and result["zero_filled"] == 13632
    assert result["not_compared"] == {
        "flowshift bypass": 12,  # ARP and link-local ND: no machine's
        "link-scope, multicast or broadcast (a router never forwards it)": 4,
    }
    assert sum(c["forwarded"] for c in result["classes"].values()) == 22441  # as Linux did then


@root
@needs_nft
@pytest.mark.slow
def test_maglev_pools_differ_from_linux_on_the_backend_choice() -> None:
    """jhash is not Maglev: the first difference is a new LB flow sent to another backend."""
    code, result = run_verify(str(ROOT / "examples/load-balancer.toml"), "--json")
    assert isinstance(result, dict), result
    assert code == 1 and not result["agree"]
    first = result["differences"][0]
    assert first["what"] == "rewrite" and first["cls"].endswith("ingress new")
    assert any("Maglev" in note for note in result["notes"])


@root
@needs_nft
@pytest.mark.slow
def test_a_ruleset_that_is_not_the_config_is_caught(tmp_path: Path) -> None:
    """Rendered, then web traffic to port 80 removed: Linux drops what flowshift allows."""
    config = ROOT / "examples/nat-gateway.toml"
    ruleset = render(load_config(config)).text
    tweaked = ruleset.replace("tcp dport { 80, 443 }", "tcp dport { 443 }")
    assert tweaked != ruleset
    (tmp_path / "rules.nft").write_text(tweaked)
    code, result = run_verify(str(config), "--json", "--ruleset", str(tmp_path / "rules.nft"))
    assert isinstance(result, dict), result
    assert code == 1 and result["differing"] > 0
    first = result["differences"][0]
    assert first["what"] == "verdict" and first["cls"] == "tcp egress new"
    assert first["flowshift"] == "forward (rule:0)" and first["linux"] == "drop"
    text = CliRunner().invoke(main, ["verify", str(config), "--ruleset",
                                     str(tmp_path / "rules.nft")])
    assert text.exit_code == 1
    assert f"#{first['index']} tcp egress new: verdict differs" in text.output


@root
@needs_nft
def test_a_ruleset_linux_refuses_exits_2_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "bad.nft").write_text("table inet x { chain y { nonsense } }\n")
    code, text = run_verify(str(ROOT / "examples/nat-gateway.toml"), "--flows", "5",
                            "--ruleset", str(tmp_path / "bad.nft"))
    assert code == 2
    assert isinstance(text, str) and text.startswith("Error: nft refused the ruleset:")


def test_verify_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out = CliRunner().invoke(main, ["verify", str(ROOT / "examples/nat-gateway.toml"),
                                    "--flows", "5"])
    assert out.exit_code == 2
    assert out.output == "Error: verify needs root (network namespaces and nftables)\n"


def test_verify_names_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[[machine]]\nname = 1\n")
    out = CliRunner().invoke(main, ["verify", str(tmp_path / "bad.toml")])
    assert out.exit_code == 2 and out.output.startswith(f"Error: {tmp_path / 'bad.toml'}: ")


@root
@needs_nft
def test_the_api_reports_classes_and_tears_down() -> None:
    result = verify(load_config(ROOT / "examples/guest-firewall.toml"), 0, flows=20, seed=3)
    assert result.agreed and result.compared > 0
    assert all(" " in cls for cls in result.classes)
    assert not leftovers()


@root
@needs_nft
def test_ctrl_c_mid_injection_tears_everything_down(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowshift.linux.router import Router

    sent = []

    def interrupted(self: Router, *args: Any) -> list[Any]:
        sent.append(self.namespaces)
        assert len(leftovers()) == 3  # the router and its two ends exist meanwhile
        raise KeyboardInterrupt

    monkeypatch.setattr(Router, "exchange", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify(load_config(ROOT / "examples/nat-gateway.toml"), 0, flows=5)
    assert sent and not leftovers()


# Rules built from what a generated gateway trace holds, so that they match some of it.
NETS = {4: ["10.0.0.0/24", "10.0.0.0/25", "198.51.100.0/24", "198.51.100.0/26", "0.0.0.0/0"],
        6: ["fd00::/64", "2001:db8::/64", "2001:db8::/80", "::/0"]}
PORTS = [53, 80, 8080, 5004, "1-1023", "8000-9000", "5000-5010"]
TYPES = [0, 3, 8, 128, 129, 1]


@st.composite
def gateway_rules(draw: st.DrawFn) -> dict[str, Any]:
    family = draw(st.sampled_from([None, 4, 6]))
    proto = draw(st.sampled_from(
        {None: ["any", "tcp", "udp", "icmp", "icmpv6"], 4: ["any", "tcp", "udp", "icmp"],
         6: ["any", "tcp", "udp", "icmpv6"]}[family]))
    rule: dict[str, Any] = {"action": draw(st.sampled_from(["allow", "drop"])),
                            "direction": draw(st.sampled_from(["egress", "ingress", "any"])),
                            "proto": proto}
    if family is not None:
        rule[draw(st.sampled_from(["src", "dst"]))] = draw(st.sampled_from(NETS[family]))
    if proto in ("any", "tcp", "udp") and draw(st.booleans()):
        rule["dst_port"] = draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=3))
    elif proto in ("any", "icmp", "icmpv6") and draw(st.booleans()):
        rule["icmp_type"] = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3))
    return rule


@st.composite
def gateway_configs(draw: st.DrawFn) -> dict[str, Any]:
    m: dict[str, Any] = {
        "name": "gw", "addresses": ["10.0.0.0/24", "fd00::/64"],
        "public": ["203.0.113.1", "2001:db8:ff::1"], "services": ["firewall", "count"],
        "firewall": {"default": draw(st.sampled_from(["allow", "drop"])),
                     "rule": draw(st.lists(gateway_rules(), max_size=5))},
    }
    if draw(st.booleans()):
        # SNAT whose range holds every client port and echo identifier, so both keep them: a
        # port that must move moves to a random one in Linux (docs/nftables.md)
        m["services"].append("nat")
        ports = draw(st.sampled_from([None, "1-65535"]))
        snat: list[dict[str, str]] = [{"source": "10.0.0.0/24", "to": "203.0.113.1"},
                                      {"source": "fd00::/64", "to": "2001:db8:ff::1"}]
        for rule in snat if ports is not None else []:
            rule["ports"] = ports
        m["nat"] = {"snat": snat, "dnat": [
            {"proto": "tcp", "match": "203.0.113.1:80", "to": "10.0.0.3:8080"}]}
    if draw(st.booleans()):
        m["services"].append("lb")
        m["public"].append("203.0.113.10")
        m["lb"] = [{"proto": draw(st.sampled_from(["tcp", "udp"])), "vip": "203.0.113.10:53",
                    "scheduler": "round-robin",
                    "backends": draw(st.sampled_from([["10.0.0.21:53", "10.0.0.22:53@2"],
                                                      ["10.0.0.21:53@0", "10.0.0.22:5353"]]))}]
    return {"machine": [m]}


@root
@needs_nft
@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(gateway_configs())
def test_linux_agrees_on_random_gateway_configs(data: dict[str, Any]) -> None:
    cfg = parse_config(data, "generated")
    result = verify(cfg, 0, flows=40, seed=7)
    assert result.agreed, [d.text() for d in result.differences]
    assert result.compared > 100
    assert not leftovers()
