"""The [conntrack] table: Linux's nf_conntrack sysctls by name, host-wide and per machine.

Read, checked and written back like every config table; every tier follows it (the machine's
chain, the VNIC after a handoff, the PNIC engine; the engines' agreement under non-default
settings is tests/test_pnic_engine.py's and tests/test_packet_fixtures.py's).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from flowshift.config import (
    ConfigError,
    ConntrackConfig,
    load_config,
    parse_config,
    to_dict,
    to_toml,
)
from flowshift.conntrack_types import DEFAULT_KNOBS, SECOND, TcpState
from flowshift.nft import CONNTRACK_SYSCTLS, sysctl_lines
from flowshift.packet.build import tcp_frame, udp_frame
from flowshift.packet.parse import parse
from flowshift.packet.view import TCP_ACK, TCP_SYN
from flowshift.services.chain import EGRESS, INGRESS, Chain
from flowshift.tiers.machine import Machine
from flowshift.tiers.vnic import VnicChain
from flowshift.verdict import Reason, Verdict

S = SECOND
INSIDE, OUTSIDE = bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7])
MACHINE = {"name": "m", "addresses": ["10.0.0.0/24"], "services": ["firewall"],
           "firewall": {"default": "drop", "rule": [
               {"action": "allow", "direction": "egress", "proto": "any"}]}}


def _cfg(host: dict | None = None, machine: dict | None = None):
    data: dict = {"machine": [{**MACHINE, **({"conntrack": machine} if machine else {})}]}
    if host is not None:
        data["conntrack"] = host
    return parse_config(data, "host.toml")


def test_defaults_are_linux_and_every_key_is_a_sysctl() -> None:
    assert ConntrackConfig().knobs() == DEFAULT_KNOBS
    assert _cfg().machines[0].conntrack == ConntrackConfig()
    for f in fields(ConntrackConfig):
        assert f.name in CONNTRACK_SYSCTLS, f.name  # `flowshift nft --sysctl` knows it


def test_machine_keys_override_the_hosts() -> None:
    cfg = _cfg({"udp_timeout": 2, "tcp_loose": 0}, {"udp_timeout": 5,
                                                    "tcp_timeout_established": 60})
    ct = cfg.machines[0].conntrack
    assert (ct.udp_timeout, ct.tcp_loose, ct.tcp_timeout_established) == (5, False, 60)
    assert cfg.conntrack.udp_timeout == 2 and cfg.conntrack.tcp_timeout_established == 432000
    knobs = ct.knobs()
    assert knobs.udp_timeout == 5 * S and not knobs.tcp_loose
    assert knobs.tcp_timeouts[TcpState.ESTABLISHED] == 60 * S
    assert knobs.tcp_timeouts[TcpState.SYN_SENT2] == DEFAULT_KNOBS.tcp_timeouts[
        TcpState.SYN_SENT2]  # Linux has no sysctl for it


@pytest.mark.parametrize(("host", "machine", "where", "what"), [
    ({"udp_timout": 2}, None, "conntrack.udp_timout", "unknown key"),
    ({"udp_timeout": 0}, None, "conntrack.udp_timeout", "0 out of range 1-2147483647"),
    ({"udp_timeout": 2.5}, None, "conntrack.udp_timeout", "expected an integer"),
    ({"tcp_max_retrans": 256}, None, "conntrack.tcp_max_retrans", "out of range 0-255"),
    ({"tcp_loose": 2}, None, "conntrack.tcp_loose", "expected true / false"),
    ({"tcp_loose": "yes"}, None, "conntrack.tcp_loose", "expected true / false"),
    (None, {"icmp_timeout": -1}, "machine[0].conntrack.icmp_timeout", "out of range"),
    (None, {"max_age": 1}, "machine[0].conntrack.max_age", "unknown key"),
    ([1], None, "conntrack", "expected a table"),
])
def test_errors_name_the_key_path(host, machine, where, what) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(host, machine)
    assert info.value.where == where
    assert what in str(info.value)


def test_errors_from_a_file_name_it(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text('[conntrack]\ntcp_timeout_close = 0\n[[machine]]\nname = "m"\n'
                    'addresses = ["10.0.0.0/24"]\nservices = []\n')
    with pytest.raises(ConfigError, match=rf"^{path}: conntrack.tcp_timeout_close: 0 out"):
        load_config(path)


def test_round_trip_through_dict_and_toml(tmp_path: Path) -> None:
    cfg = _cfg({"udp_timeout": 2, "tcp_be_liberal": True}, {"tcp_timeout_established": 9})
    assert parse_config(to_dict(cfg), "dict") == cfg
    path = tmp_path / "again.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    machine = to_dict(cfg)["machine"][0]
    assert machine["conntrack"] == {"tcp_timeout_established": 9}  # only its own keys
    assert "conntrack" not in to_dict(_cfg({"udp_timeout": 2}))["machine"][0]


def test_the_handoff_carries_the_machines_whole_table() -> None:
    """The VNIC reads the machine's config without the host's: it gets the merged table."""
    cfg = _cfg({"udp_timeout": 2}, {"tcp_timeout_established": 9})
    machine = Machine(cfg, 0)
    vnic = VnicChain(parse_config({"machine": [machine.handoff().config]}, "h").machines[0], 0)
    assert vnic.knobs == machine.chain.knobs == cfg.machines[0].conntrack.knobs()


def test_sysctl_lines_write_the_keys_that_differ() -> None:
    cfg = _cfg({"udp_timeout": 2, "tcp_loose": False}, {"icmp_timeout": 7})
    host = sysctl_lines(cfg)
    assert "net.netfilter.nf_conntrack_udp_timeout = 2" in host
    assert "net.netfilter.nf_conntrack_tcp_loose = 0" in host
    assert not any("icmp_timeout" in line or "established" in line for line in host)
    one = sysctl_lines(cfg, [0])  # one machine's router: its own table
    assert "net.netfilter.nf_conntrack_icmp_timeout = 7" in one
    assert "net.netfilter.nf_conntrack_udp_timeout = 2" in one


def _udp(src: bytes, dst: bytes, sport: int, dport: int):
    return parse(bytearray(udp_frame(src=src, dst=dst, sport=sport, dport=dport,
                                     payload=b"x")), 1)


def test_a_late_reply_after_a_short_udp_timeout_is_a_new_flow() -> None:
    """nf_conntrack_udp_timeout = 2: a reply 3 s after the request finds no flow (the
    ct-timeout Linux case); within 2 s it is the flow's."""
    for table, late in (({"udp_timeout": 2}, True), ({}, False)):
        chain = Chain(_cfg(table).machines[0], 0)
        assert chain.process(_udp(INSIDE, OUTSIDE, 5000, 53), EGRESS, S).created
        out = chain.process(_udp(OUTSIDE, INSIDE, 53, 5000), INGRESS, 4 * S)
        if late:
            assert (out.verdict, out.reason) == (Verdict.DROP, Reason.DEFAULT)
        else:
            assert (out.verdict, out.reason) == (Verdict.FORWARD, Reason.ESTABLISHED)


def test_tcp_loose_off_starts_flows_with_a_syn_only() -> None:
    ack = tcp_frame(src=INSIDE, dst=OUTSIDE, sport=5000, dport=80, seq=1, ack=1, flags=TCP_ACK,
                    window=100)
    syn = tcp_frame(src=INSIDE, dst=OUTSIDE, sport=5001, dport=80, seq=1, ack=0, flags=TCP_SYN,
                    window=100)
    strict = Chain(_cfg({"tcp_loose": False}).machines[0], 0)
    assert strict.process(parse(bytearray(ack), 1), EGRESS, S).reason == Reason.INVALID
    assert strict.process(parse(bytearray(syn), 1), EGRESS, S).created
    loose = Chain(_cfg().machines[0], 0)
    assert loose.process(parse(bytearray(ack), 1), EGRESS, S).created
