"""The host config: loading into typed objects, one-line errors with key paths, round trips."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowshift.config import (
    Backend,
    ConfigError,
    DnatRule,
    FirewallConfig,
    HostConfig,
    LbPool,
    MachineConfig,
    NatConfig,
    OffloadConfig,
    PnicConfig,
    Rule,
    SnatRule,
    handoff_config,
    load_config,
    parse_config,
    parse_machine,
    to_dict,
)
from flowshift.flow import PROTO_ICMP, PROTO_TCP
from flowshift.services import maglev
from flowshift.services.nat_alloc import AddressRange
from flowshift.services.rules import EGRESS, INGRESS

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def write(tmp_path: Path, text: str, name: str = "host.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# The shape of the brief's example, made consistent: `lb` is listed in services and its VIP
# among the public addresses.
SHAPE = """
[pnic]
capacity = 4096
services = ["firewall", "nat", "lb", "count"]

[offload]
policy = "elephant"
elephant_packets = 32
elephant_bytes = 65536
idle_timeout = 30.0
report_interval = 1.0

[[machine]]
name = "gw"
addresses = ["10.0.0.0/24", "fd00::/64"]
public = ["203.0.113.1", "203.0.113.10"]
services = ["lb", "firewall", "nat"]
start = "machine"

[machine.firewall]
default = "drop"
[[machine.firewall.rule]]
action = "allow"
direction = "egress"
proto = "tcp"
src = "10.0.0.0/24"
dst = "0.0.0.0/0"
dst_port = [80, "5000-5999"]
[[machine.firewall.rule]]
action = "drop"
proto = "icmp"
icmp_type = [8]

[[machine.nat.snat]]
source = "10.0.0.0/24"
to = "203.0.113.1"
ports = "1024-65535"

[[machine.nat.dnat]]
proto = "tcp"
match = "203.0.113.1:8080"
to = "10.0.0.3:8080"

[[machine.lb]]
proto = "tcp"
vip = "203.0.113.10:80"
backends = ["10.0.0.11:8080", "10.0.0.12:8080@2"]
"""


def test_example_shape_loads_into_expected_objects(tmp_path: Path) -> None:
    got = load_config(write(tmp_path, SHAPE))
    expected = HostConfig(
        pnic=PnicConfig(capacity=4096, services=("firewall", "nat", "lb", "count")),
        offload=OffloadConfig(
            policy="elephant",
            elephant_packets=32,
            elephant_bytes=65536,
            idle_timeout=30.0,
            report_interval=1.0,
        ),
        machines=(
            MachineConfig(
                name="gw",
                addresses=(net("10.0.0.0/24"), net("fd00::/64")),
                public=(ip("203.0.113.1"), ip("203.0.113.10")),
                services=("firewall", "nat", "lb"),  # chain order, whatever the file's order
                start="machine",
                firewall=FirewallConfig(
                    default_allow=False,
                    rules=(
                        Rule(
                            allow=True,
                            direction=EGRESS,
                            proto=PROTO_TCP,
                            src=net("10.0.0.0/24"),
                            dst=net("0.0.0.0/0"),
                            dst_port=((80, 80), (5000, 5999)),
                        ),
                        Rule(allow=False, direction=None, proto=PROTO_ICMP, icmp_type=(8,)),
                    ),
                ),
                nat=NatConfig(
                    snat=(
                        SnatRule(
                            source=net("10.0.0.0/24"),
                            to=AddressRange(ip("203.0.113.1"), ip("203.0.113.1")),
                            ports=(1024, 65535),
                        ),
                    ),
                    dnat=(
                        DnatRule(
                            proto=PROTO_TCP,
                            match_addr=ip("203.0.113.1"),
                            match_port=8080,
                            to_addr=ip("10.0.0.3"),
                            to_port=8080,
                        ),
                    ),
                ),
                lb=(
                    LbPool(
                        proto=PROTO_TCP,
                        vip=ip("203.0.113.10"),
                        port=80,
                        backends=(
                            Backend(
                                addr=ip("10.0.0.11"), port=8080, weight=1, name="10.0.0.11:8080"
                            ),
                            Backend(
                                addr=ip("10.0.0.12"), port=8080, weight=2, name="10.0.0.12:8080"
                            ),
                        ),
                    ),
                ),
            ),
        ),
    )
    assert got == expected


def test_defaults_for_omitted_keys(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
        [[machine]]
        name = "vm"
        addresses = ["192.0.2.0/28"]
        services = ["firewall"]
        [machine.firewall]
        [[machine.firewall.rule]]
        action = "allow"
    """,
        )
    )
    assert cfg.pnic == PnicConfig(capacity=4096, services=("firewall", "nat", "lb", "count"))
    assert cfg.offload == OffloadConfig(
        policy="elephant",
        elephant_packets=32,
        elephant_bytes=65536,
        idle_timeout=30.0,
        report_interval=1.0,
    )
    machine = cfg.machines[0]
    assert (machine.public, machine.start, machine.nat, machine.lb) == ((), "machine", None, ())
    assert machine.firewall == FirewallConfig(
        default_allow=False,
        rules=(
            Rule(
                allow=True, direction=None, proto=0, src=None, dst=None, dst_port=(), icmp_type=()
            ),
        ),
    )


def test_real_lb_gateway_loads() -> None:
    path = CORPUS / "real" / "lb-gateway.toml"
    if not path.exists():
        pytest.skip(f"real corpus absent: {path}")
    cfg = load_config(path)
    (machine,) = cfg.machines
    assert machine.name == "lbgw"
    assert machine.services == ("firewall", "nat", "lb")
    assert len(machine.firewall.rules) == 5
    assert machine.firewall.rules[2].dst == net("fd00:1::11/128")
    assert machine.firewall.rules[2].direction == INGRESS
    assert [str(s.to) for s in machine.nat.snat] == ["198.51.100.1", "2001:db8:1::1"]
    v6 = machine.lb[1]
    assert (v6.vip, v6.port) == (ip("2001:db8:1::10"), 80)
    assert [b.name for b in v6.backends] == ["[fd00:1::11]:8080", "[fd00:1::12]:8080"]
    assert [b.addr for b in v6.backends] == [ip("fd00:1::11"), ip("fd00:1::12")]


def test_examples_exist_and_load() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"nat-gateway.toml", "load-balancer.toml", "guest-firewall.toml"} <= names
    for path in EXAMPLES:
        cfg = load_config(path)
        assert parse_config(json.loads(json.dumps(to_dict(cfg))), str(path)) == cfg


def test_example_details() -> None:
    lb = load_config(ROOT / "examples" / "load-balancer.toml").machines[0]
    assert [b.weight for b in lb.lb[0].backends] == [1, 1, 2]
    assert [b.weight for b in lb.lb[1].backends] == [1, 3, 0]
    assert lb.start == "vnic"
    guest = load_config(ROOT / "examples" / "guest-firewall.toml").machines[0]
    assert guest.start == "vnic" and guest.public == ()
    gw = load_config(ROOT / "examples" / "nat-gateway.toml").machines[0]
    assert gw.nat is not None and len(gw.nat.dnat) == 1 and len(gw.nat.snat) == 2


def test_weight_limit_is_maglevs() -> None:
    from flowshift.config import MAX_WEIGHT

    assert MAX_WEIGHT == maglev.MAX_WEIGHT


def test_lb_scheduler_defaults_to_maglev_and_round_trips(tmp_path: Path) -> None:
    text = SHAPE + 'scheduler = "round-robin"\n'
    text += '[[machine.lb]]\nproto = "udp"\nvip = "203.0.113.10:53"\nbackends = ["10.0.0.53:53"]\n'
    cfg = load_config(write(tmp_path, text))
    rr, default = cfg.machines[0].lb
    assert (rr.scheduler, default.scheduler) == ("round-robin", "maglev")
    pools = to_dict(cfg)["machine"][0]["lb"]
    assert [p["scheduler"] for p in pools] == ["round-robin", "maglev"]
    assert parse_config(json.loads(json.dumps(to_dict(cfg)))) == cfg
    # files written before the key existed keep their Maglev pools
    assert load_config(write(tmp_path, SHAPE)).machines[0].lb[0].scheduler == "maglev"


# -- errors: one line, the file, the key path and what is wrong -----------------------------

M = """
[[machine]]
name = "m"
addresses = ["10.0.0.0/24", "fd00::/64"]
public = ["203.0.113.1", "2001:db8::1"]
"""


def fw(rule: str, services: str = '["firewall"]') -> str:
    return f"{M}services = {services}\n[machine.firewall]\n[[machine.firewall.rule]]\n{rule}\n"


def lb(pool: str) -> str:
    return f'{M}services = ["lb"]\n[[machine.lb]]\n{pool}\n'


def nat(section: str) -> str:
    return f'{M}services = ["nat"]\n{section}\n'


M2 = '[[machine]]\nname = "n"\nservices = []\n'
ERRORS = [
    # wrong types
    (
        f'[pnic]\ncapacity = "big"\n{M}services = []',
        "pnic.capacity",
        ["expected an integer", "string 'big'"],
    ),
    (f"[pnic]\ncapacity = true\n{M}services = []", "pnic.capacity", ["boolean"]),
    (f'{M}services = "firewall"', "machine[0].services", ["expected an array", "string"]),
    (f"offload = 3\n{M}services = []", "offload", ["expected a table", "integer 3"]),
    (
        f'{M}services = ["lb"]\n[machine.lb]\nproto = "tcp"',
        "machine[0].lb",
        ["array of tables", "[[machine.lb]]"],
    ),
    (fw('action = "allow"\nsrc = 10'), "machine[0].firewall.rule[0].src", ["expected a string"]),
    # unknown and missing keys
    (f"colour = 1\n{M}services = []", "colour",
     ["unknown key", "allowed: conntrack, live, machine, offload, pnic"]),
    (
        fw('action = "allow"\nprot = "tcp"'),
        "machine[0].firewall.rule[0].prot",
        ["unknown key", "dst_port", "icmp_type"],
    ),
    (f'{M}services = []\n"odd key" = 1', 'machine[0]."odd key"', ["unknown key"]),
    (fw('direction = "egress"'), "machine[0].firewall.rule[0].action", ["missing"]),
    ('[[machine]]\nname = "m"\nservices = []', "machine[0].addresses", ["missing"]),
    ("[pnic]\ncapacity = 1", "machine", ["missing"]),
    ("machine = []", "machine", ["at least one machine"]),
    # values
    (
        f"{M}services = []".replace("10.0.0.0/24", "10.0.0.1/24"),
        "machine[0].addresses[0]",
        ["bad CIDR", "host bits set"],
    ),
    (
        fw('action = "allow"\ndst = "10.0.0.0/33"'),
        "machine[0].firewall.rule[0].dst",
        ["bad CIDR", "10.0.0.0/33"],
    ),
    (
        fw('action = "allow"\ndst = "fe80::%eth0/64"'),
        "machine[0].firewall.rule[0].dst",
        ["bad CIDR", "scoped"],
    ),
    (
        f"{M}services = []".replace('"203.0.113.1"', '"203.0.113.256"'),
        "machine[0].public[0]",
        ["bad address", "203.0.113.256"],
    ),
    (
        fw('action = "allow"\ndst_port = [70000]'),
        "machine[0].firewall.rule[0].dst_port[0]",
        ["port 70000 out of range 0-65535"],
    ),
    (
        fw('action = "allow"\ndst_port = [80, "6000-5000"]'),
        "machine[0].firewall.rule[0].dst_port[1]",
        ["'6000-5000'", "backwards", "lo > hi"],
    ),
    (
        fw('action = "allow"\ndst_port = ["http"]'),
        "machine[0].firewall.rule[0].dst_port[0]",
        ["bad port", "'http'"],
    ),
    (
        fw('action = "allow"\ndst_port = []'),
        "machine[0].firewall.rule[0].dst_port",
        ["must not be empty"],
    ),
    (
        fw('action = "allow"\nproto = "icmp"\nicmp_type = [256]'),
        "machine[0].firewall.rule[0].icmp_type[0]",
        ["256 out of range 0-255"],
    ),
    (
        fw('action = "reject"'),
        "machine[0].firewall.rule[0].action",
        ["unknown action", "'reject'", "allow, drop"],
    ),
    (
        fw('action = "allow"\ndirection = "inbound"'),
        "machine[0].firewall.rule[0].direction",
        ["unknown direction", "egress, ingress, any"],
    ),
    (
        fw('action = "allow"\nproto = "sctp"'),
        "machine[0].firewall.rule[0].proto",
        ["unknown protocol", "'sctp'"],
    ),
    (
        f'{M}services = ["firewall"]\n[machine.firewall]\ndefault = "accept"',
        "machine[0].firewall.default",
        ["unknown action", "'accept'"],
    ),
    (
        f'{M}services = []\nstart = "pnic"',
        "machine[0].start",
        ["unknown start tier", "machine, vnic"],
    ),
    (f"{M}services = []".replace('"m"', '"my vm"'), "machine[0].name", ["bad machine name"]),
    # rules that could never match
    (
        fw('action = "allow"\nproto = "icmp"\ndst_port = [80]'),
        "machine[0].firewall.rule[0].dst_port",
        ["tcp and udp only", "'icmp'"],
    ),
    (
        fw('action = "allow"\nproto = "tcp"\nicmp_type = [8]'),
        "machine[0].firewall.rule[0].icmp_type",
        ["icmp and icmpv6 only", "'tcp'"],
    ),
    (
        fw('action = "allow"\ndst_port = [80]\nicmp_type = [8]'),
        "machine[0].firewall.rule[0].icmp_type",
        ["cannot be combined with dst_port"],
    ),
    (
        fw('action = "allow"\nsrc = "10.0.0.0/24"\ndst = "::/0"'),
        "machine[0].firewall.rule[0].dst",
        ["IPv6 but src is IPv4", "never match"],
    ),
    (
        fw('action = "allow"\nproto = "icmp"\ndst = "fd00::/64"'),
        "machine[0].firewall.rule[0].proto",
        ["IPv4 only", "IPv6"],
    ),
    # services and their sections
    (
        f'{M}services = ["dns"]',
        "machine[0].services[0]",
        ["unknown service", "'dns'", "firewall, nat, lb, count"],
    ),
    (f'{M}services = ["nat", "count", "nat"]', "machine[0].services[2]", ["'nat' listed twice"]),
    (f'[pnic]\nservices = ["offload"]\n{M}services = []', "pnic.services[0]", ["unknown service"]),
    (f'{M}services = ["firewall"]', "machine[0].firewall", ["section missing", "'firewall'"]),
    (
        f'{M}services = []\n[machine.firewall]\ndefault = "drop"',
        "machine[0].firewall",
        ["section present", "'firewall'"],
    ),
    (f'{M}services = ["lb"]', "machine[0].lb", ["section missing", "'lb'"]),
    (f"{M}services = []\nlb = []", "machine[0].lb", ["section present", "'lb'"]),
    (f'{M}services = ["lb"]\nlb = []', "machine[0].lb", ["no pool"]),
    (nat("[machine.nat]"), "machine[0].nat", ["no snat or dnat"]),
    (
        f'{M}services = []\n[[machine.nat.snat]]\nsource = "10.0.0.0/24"\nto = "203.0.113.1"',
        "machine[0].nat",
        ["section present", "'nat'"],
    ),
    # NAT
    (
        nat('[[machine.nat.snat]]\nsource = "10.0.0.0/24"\nto = "2001:db8::1"'),
        "machine[0].nat.snat[0].to",
        ["IPv6 but source 10.0.0.0/24 is IPv4"],
    ),
    (
        nat('[[machine.nat.snat]]\nsource = "10.0.0.0/24"\nto = "203.0.113.9"'),
        "machine[0].nat.snat[0].to",
        ["203.0.113.9", "not in this machine's public"],
    ),
    (
        nat('[[machine.nat.snat]]\nsource = "10.0.0.0/24"\nto = "203.0.113.1-203.0.113.2"'),
        "machine[0].nat.snat[0].to",
        ["203.0.113.2", "not in this machine's public"],
    ),
    (
        nat('[[machine.nat.snat]]\nsource = "10.0.0.0/24"\nto = "203.0.113.2-203.0.113.1"'),
        "machine[0].nat.snat[0].to",
        ["runs backwards"],
    ),
    (
        nat('[[machine.nat.snat]]\nsource = "10.0.0.0/24"\nto = "203.0.113.1"\nports = "0-9"'),
        "machine[0].nat.snat[0].ports",
        ["port 0 out of range 1-65535"],
    ),
    (
        nat('[[machine.nat.dnat]]\nproto = "tcp"\nmatch = "203.0.113.1:80"\nto = "[fd00::3]:80"'),
        "machine[0].nat.dnat[0].to",
        ["IPv6 but match 203.0.113.1:80 is IPv4"],
    ),
    (
        nat('[[machine.nat.dnat]]\nproto = "icmp"\nmatch = "203.0.113.1:80"\nto = "10.0.0.3:80"'),
        "machine[0].nat.dnat[0].proto",
        ["unknown protocol", "tcp, udp"],
    ),
    (
        nat('[[machine.nat.dnat]]\nproto = "tcp"\nmatch = "203.0.113.1"\nto = "10.0.0.3:80"'),
        "machine[0].nat.dnat[0].match",
        ["expected address:port"],
    ),
    (
        nat('[[machine.nat.dnat]]\nproto = "tcp"\nmatch = "198.51.100.1:80"\nto = "10.0.0.3:80"'),
        "machine[0].nat.dnat[0].match",
        ["198.51.100.1", "not in this machine's public"],
    ),
    # LB
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = ["[fd00::11]:8080"]'),
        "machine[0].lb[0].backends[0]",
        ["IPv6 backend", "IPv4 vip 203.0.113.1:80"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = ["10.0.0.11:80", "10.0.0.12:80@-1"]'),
        "machine[0].lb[0].backends[1]",
        ["weight -1 out of range"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = ["10.0.0.11:80@x"]'),
        "machine[0].lb[0].backends[0]",
        ["weight 'x' is not an integer"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = []'),
        "machine[0].lb[0].backends",
        ["must not be empty"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = ["10.0.0.11:80", "10.0.0.11:80@2"]'),
        "machine[0].lb[0].backends[1]",
        ["10.0.0.11:80 listed twice"],
    ),
    (
        lb('proto = "tcp"\nvip = "2001:db8::1:80"\nbackends = ["[fd00::11]:80"]'),
        "machine[0].lb[0].vip",
        ["[address]:port"],
    ),
    (
        lb('proto = "tcp"\nvip = "[203.0.113.1]:80"\nbackends = ["10.0.0.1:80"]'),
        "machine[0].lb[0].vip",
        ["brackets are for IPv6 only"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:0"\nbackends = ["10.0.0.1:80"]'),
        "machine[0].lb[0].vip",
        ["port 0 out of range 1-65535"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.7:80"\nbackends = ["10.0.0.1:80"]'),
        "machine[0].lb[0].vip",
        ["203.0.113.7", "not in this machine's public"],
    ),
    (
        lb(
            'proto = "udp"\nvip = "203.0.113.1:53"\nbackends = ["10.0.0.1:53"]\n[[machine.lb]]\n'
            'proto = "udp"\nvip = "203.0.113.1:53"\nbackends = ["10.0.0.2:53"]'
        ),
        "machine[0].lb[1].vip",
        ["203.0.113.1:53 is also machine[0].lb[0].vip"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = ["10.0.0.1:80"]\nscheduler = "wrr"'),
        "machine[0].lb[0].scheduler",
        ["unknown scheduler", "'wrr'", "maglev, round-robin"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = ["10.0.0.1:80"]\nscheduler = 1'),
        "machine[0].lb[0].scheduler",
        ["expected a string", "integer 1"],
    ),
    (
        lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = ["10.0.0.1:80"]\nschedule = "x"'),
        "machine[0].lb[0].schedule",
        ["unknown key", "allowed: backends, proto, scheduler, vip"],
    ),
    # offload and PNIC
    (
        f'[offload]\npolicy = "sometimes"\n{M}services = []',
        "offload.policy",
        ["unknown policy", "'sometimes'", "never, always, elephant"],
    ),
    (f"[pnic]\ncapacity = -1\n{M}services = []", "pnic.capacity", ["-1 out of range"]),
    (
        f"[offload]\nidle_timeout = -5.0\n{M}services = []",
        "offload.idle_timeout",
        ["-5.0 out of range", "> 0"],
    ),
    (
        f"[offload]\nreport_interval = 0\n{M}services = []",
        "offload.report_interval",
        ["out of range"],
    ),
    (
        f"[offload]\nidle_timeout = nan\n{M}services = []",
        "offload.idle_timeout",
        ["nan out of range"],
    ),
    (
        f"[offload]\nelephant_packets = -1\n{M}services = []",
        "offload.elephant_packets",
        ["-1 out of range"],
    ),
    # across machines
    (
        f'{M}services = []\n{M2}addresses = ["10.1.0.0/24"]'.replace('"n"', '"m"'),
        "machine[1].name",
        ["duplicate machine name 'm'", "machine[0]"],
    ),
    (
        f'{M}services = []\n{M2}addresses = ["10.0.0.128/25"]',
        "machine[1].addresses[0]",
        ["10.0.0.128/25 overlaps 10.0.0.0/24", "machine[0].addresses[0]", "'m'"],
    ),
    (
        f'{M}services = []\n{M2}addresses = ["10.1.0.0/24"]\npublic = ["2001:db8::1"]',
        "machine[1].public[0]",
        ["overlaps", "machine[0].public[1]"],
    ),
    (
        f'{M}services = []\n{M2}addresses = ["10.1.0.0/24"]\npublic = ["10.0.0.9"]',
        "machine[1].public[0]",
        ["overlaps 10.0.0.0/24"],
    ),
    (
        f"{M}services = []".replace('"2001:db8::1"', '"203.0.113.1"'),
        "machine[0].public[1]",
        ["203.0.113.1 listed twice"],
    ),
]


@pytest.mark.parametrize(
    ("snippet", "where", "words"), ERRORS, ids=[f"{i}-{e[1]}" for i, e in enumerate(ERRORS)]
)
def test_error_names_file_path_and_problem(
    tmp_path: Path, snippet: str, where: str, words: list[str]
) -> None:
    path = write(tmp_path, snippet)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {where}: "), message
    assert info.value.where == where
    for word in words:
        assert word in message, message


def test_the_error_table_is_built_on_valid_bases(tmp_path: Path) -> None:
    """Each error above comes from its one wrong key: the bases themselves load."""
    load_config(write(tmp_path, f"{M}services = []\n{M2}addresses = ['10.1.0.0/24']"))
    load_config(write(tmp_path, fw('action = "allow"')))
    load_config(
        write(tmp_path, lb('proto = "tcp"\nvip = "203.0.113.1:80"\nbackends = ["10.0.0.11:80"]'))
    )
    load_config(
        write(
            tmp_path,
            nat('[[machine.nat.snat]]\nsource = "10.0.0.0/24"\nto = "203.0.113.1"\nports = "1-9"'),
        )
    )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[pnic]\ncapacity = 1\nservices = [\n  "nat",\n  @\n]', "line 5, column 3"),
        ("[pnic]\n[pnic]\n", "line 2, column 6"),
        ("a = ", "end of document"),
    ],
)
def test_toml_syntax_errors_name_file_and_line(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}: TOML syntax error: "), message
    assert "\n" not in message


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read"):
        load_config(missing)
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b"[pnic]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.toml: line 2: not UTF-8"):
        load_config(binary)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_parse_config_names_its_source_and_checks_json_types() -> None:
    with pytest.raises(ConfigError, match=r"^report\.json: expected a table, got array$"):
        parse_config([], "report.json")  # type: ignore[arg-type]
    data = {"machine": [{"name": "m", "addresses": ["10.0.0.0/8"], "services": None}]}
    with pytest.raises(ConfigError, match=r"^<config>: machine\[0\]\.services: .*null None"):
        parse_config(data)


def test_error_values_stay_on_one_line() -> None:
    data = {"machine": [{"name": "a\nb" * 40, "addresses": ["10.0.0.0/8"], "services": []}]}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "multi\nline.toml")
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 300


# -- round trips and robustness -------------------------------------------------------------


@st.composite
def networks(draw: st.DrawFn, family: int) -> str:
    if family == 4:
        addr = draw(st.ip_addresses(v=4))
        return str(ipaddress.ip_network(f"{addr}/{draw(st.integers(0, 32))}", strict=False))
    addr = draw(st.ip_addresses(v=6))
    return str(ipaddress.ip_network(f"{addr}/{draw(st.integers(0, 128))}", strict=False))


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    family = draw(st.sampled_from([None, 4, 6]))
    protos = {
        None: ["any", "tcp", "udp", "icmp", "icmpv6"],
        4: ["any", "tcp", "udp", "icmp"],
        6: ["any", "tcp", "udp", "icmpv6"],
    }[family]
    out: dict[str, Any] = {"action": draw(st.sampled_from(["allow", "drop"]))}
    if draw(st.booleans()):
        out["direction"] = draw(st.sampled_from(["egress", "ingress", "any"]))
    proto = draw(st.sampled_from(protos))
    if proto != "any" or draw(st.booleans()):
        out["proto"] = proto
    if family is not None:
        for key in draw(st.sampled_from([["src"], ["dst"], ["src", "dst"]])):
            out[key] = draw(networks(family))
    if proto in ("any", "tcp", "udp") and draw(st.booleans()):
        port = st.integers(0, 65535)
        out["dst_port"] = draw(
            st.lists(
                port | st.tuples(port, port).map(lambda t: f"{min(t)}-{max(t)}"),
                min_size=1,
                max_size=3,
            )
        )
    elif proto in ("any", "icmp", "icmpv6") and draw(st.booleans()):
        out["icmp_type"] = draw(st.lists(st.integers(0, 255), min_size=1, max_size=3))
    return out


@st.composite
def machines(draw: st.DrawFn, j: int) -> dict[str, Any]:
    v4, v6 = f"10.{j}.0.0/16", f"fd00:{j}::/64"
    addresses = draw(st.sampled_from([[v4], [v6], [v4, v6], [v6, v4]]))
    public = [f"203.0.{j}.{k}" for k in range(1, 4)] + [f"2001:db8:{j}::{k}" for k in (1, 2)]
    services = draw(st.lists(st.sampled_from(["firewall", "nat", "lb", "count"]), unique=True))
    out: dict[str, Any] = {"name": f"m{j}", "addresses": addresses, "services": services}
    if public or draw(st.booleans()):
        out["public"] = public
    if draw(st.booleans()):
        out["start"] = draw(st.sampled_from(["machine", "vnic"]))
    if "firewall" in services:
        out["firewall"] = {"rule": draw(st.lists(rules(), max_size=4))}
        if draw(st.booleans()):
            out["firewall"]["default"] = draw(st.sampled_from(["allow", "drop"]))
    inside = {4: f"10.{j}.0.", 6: f"fd00:{j}::"}
    if "nat" in services:
        snat = []
        for family in draw(st.lists(st.sampled_from([4, 6]), max_size=2)):
            rule = {
                "source": v4 if family == 4 else v6,
                "to": draw(
                    st.sampled_from(
                        ["203.0.{j}.1", "203.0.{j}.1-203.0.{j}.3"]
                        if family == 4
                        else ["2001:db8:{j}::1", "2001:db8:{j}::1-2001:db8:{j}::2"]
                    )
                ).format(j=j),
            }
            if draw(st.booleans()):
                lo = draw(st.integers(1, 65535))
                rule["ports"] = draw(st.sampled_from([lo, f"{lo}-{max(lo, 1024)}"]))
            snat.append(rule)
        dnat = [
            {
                "proto": draw(st.sampled_from(["tcp", "udp"])),
                "match": f"203.0.{j}.2:{2000 + k}",
                "to": f"{inside[4]}{k + 1}:{draw(st.integers(1, 65535))}",
            }
            for k in range(draw(st.integers(0 if snat else 1, 2)))
        ]
        out["nat"] = {"snat": snat, "dnat": dnat}
    if "lb" in services:
        pools = []
        for k in range(draw(st.integers(1, 3))):
            family = draw(st.sampled_from([4, 6]))
            vip = f"203.0.{j}.3:{1000 + k}" if family == 4 else f"[2001:db8:{j}::2]:{1000 + k}"
            hosts = draw(st.lists(st.integers(1, 200), min_size=1, max_size=4, unique=True))
            backends = []
            for h in hosts:
                text = f"{inside[4]}{h}:80" if family == 4 else f"[{inside[6]}{h:x}]:80"
                if draw(st.booleans()):
                    text += f"@{draw(st.integers(0, 2**32 - 1))}"
                backends.append(text)
            pools.append(
                {"proto": draw(st.sampled_from(["tcp", "udp"])), "vip": vip, "backends": backends}
            )
            if draw(st.booleans()):
                pools[-1]["scheduler"] = draw(st.sampled_from(["maglev", "round-robin"]))
        out["lb"] = pools
    return out


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": [draw(machines(j)) for j in range(draw(st.integers(1, 3)))]}
    if draw(st.booleans()):
        out["pnic"] = {
            "capacity": draw(st.integers(0, 1 << 24)),
            "services": draw(
                st.lists(st.sampled_from(["firewall", "nat", "lb", "count"]), unique=True)
            ),
        }
    if draw(st.booleans()):
        seconds = st.floats(1e-3, 1e6) | st.integers(1, 10**6)
        out["offload"] = {
            "policy": draw(st.sampled_from(["never", "always", "elephant"])),
            "elephant_packets": draw(st.integers(0, 2**63 - 1)),
            "elephant_bytes": draw(st.integers(0, 2**63 - 1)),
            "idle_timeout": draw(seconds),
            "report_interval": draw(seconds),
        }
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_valid_configs_round_trip(data: dict[str, Any]) -> None:
    cfg = parse_config(data, "random")
    dumped = to_dict(cfg)
    again = parse_config(json.loads(json.dumps(dumped)), "round-trip")
    assert again == cfg
    assert to_dict(again) == dumped


_conntracks = st.fixed_dictionaries({}, optional={
    "tcp_timeout_established": st.integers(1, 10**6), "udp_timeout": st.integers(1, 10**6),
    "tcp_loose": st.booleans(), "max": st.integers(0, 1 << 20)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), _conntracks, st.lists(_conntracks, min_size=3, max_size=3))
def test_a_machine_handed_over_reads_back_alone_as_it_was(data: dict[str, Any],
                                                         host: dict[str, Any],
                                                         own: list[dict[str, Any]]) -> None:
    """What a machine hands its VNIC as its config (`handoff_config`) reads back on its own
    (`parse_machine`, which knows nothing of the host) to the machine's config: the host's
    conntrack table and the machine's own over it included."""
    data = {**data, "conntrack": host}
    for machine, table in zip(data["machine"], own, strict=False):
        if table:
            machine["conntrack"] = table
    cfg = parse_config(json.loads(json.dumps(data)), "random")
    for i, machine in enumerate(cfg.machines):
        table = json.loads(json.dumps(handoff_config(cfg, i)))  # as the channel carries it
        assert parse_machine(table, "handoff") == machine
        # alone, it is what a host of that one machine makes of it
        assert parse_config({"machine": [table]}, "handoff").machines[0] == machine


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [path] + [p for k, v in value.items() for p in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [path] + [p for i, v in enumerate(value) for p in _leaves(v, (*path, i))]
    return [path]


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _damaged(data: st.DataObject, base: dict[str, Any]) -> dict[str, Any]:
    """`base` with one drawn value anywhere in it replaced by drawn junk."""
    path = data.draw(st.sampled_from([p for p in _leaves(base) if p]))
    target = base
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = data.draw(junk)
    return base


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_configs_fail_with_one_line_config_errors(data: st.DataObject) -> None:
    base = _damaged(data, to_dict(load_config(ROOT / "examples" / "nat-gateway.toml")))
    try:
        parse_config(base, "damaged.toml")
    except ConfigError as err:
        assert str(err).startswith("damaged.toml: ")
        assert "\n" not in str(err)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_damaged_machine_fails_alone_as_in_a_host(data: st.DataObject) -> None:
    """`parse_machine` refuses what `parse_config` refuses in a host of that one machine, with
    the same one-line error (the same key path)."""
    base = _damaged(data, handoff_config(load_config(ROOT / "examples" / "nat-gateway.toml"), 0))
    alone = in_host = None
    try:
        parse_machine(base, "damaged.toml")
    except ConfigError as err:
        alone = str(err)
    try:
        parse_config({"machine": [base]}, "damaged.toml")
    except ConfigError as err:
        in_host = str(err)
    assert alone == in_host


def _pairwise_clash(machines: list[dict[str, Any]]) -> str | None:
    """The rule as stated, pair by pair: the first claim, in the file's order, that overlaps
    an earlier machine's claim, named with the earliest such claim (what the error says)."""
    claims: list[tuple[int, str, Any, str]] = []
    for j, m in enumerate(machines):
        mine = [(j, f"machine[{j}].addresses[{k}]", ipaddress.ip_network(a), str(
            ipaddress.ip_network(a))) for k, a in enumerate(m["addresses"])]
        mine += [(j, f"machine[{j}].public[{k}]", ipaddress.ip_network(a), a)
                 for k, a in enumerate(m["public"])]
        for _, path, net, text in mine:
            for i, other_path, other, other_text in claims:
                if net.version == other.version and net.overlaps(other):
                    return (f"{path}: {text} overlaps {other_text} at {other_path} "
                            f"(machine 'm{i}')")
        claims += mine
    return None


@st.composite
def _crowded_machines(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Machines whose networks and addresses fall in a few small ranges: they clash often."""
    def v4() -> st.SearchStrategy[str]:
        return st.builds(lambda a, p: str(ipaddress.ip_network(f"10.0.{a}.0/{p}", strict=False)),
                         st.integers(0, 15), st.integers(20, 26))

    def v6() -> st.SearchStrategy[str]:
        return st.builds(lambda a, p: str(ipaddress.ip_network(f"fd00:0:0:{a:x}::/{p}",
                                                               strict=False)),
                         st.integers(0, 15), st.integers(60, 66))

    machines = []
    for j in range(draw(st.integers(1, 8))):
        addresses = draw(st.lists(st.one_of(v4(), v6()), min_size=1, max_size=3, unique=True))
        public = draw(st.lists(st.builds(lambda a: f"10.0.{a}.9", st.integers(0, 15)),
                               max_size=1))
        machines.append({"name": f"m{j}", "addresses": addresses, "public": public,
                         "services": []})
    return machines


@settings(max_examples=300, deadline=None)
@given(_crowded_machines())
def test_machine_clashes_are_those_of_every_pair(machines: list[dict[str, Any]]) -> None:
    """The sorted check of machines' claims names the clash the pairwise rule names."""
    expected = _pairwise_clash(machines)
    try:
        parse_config({"machine": machines}, "crowded")
    except ConfigError as err:
        assert expected is not None and str(err).endswith(expected), (str(err), expected)
    else:
        assert expected is None
