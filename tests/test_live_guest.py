"""The live machine tier: a machine's chain runs as nftables in its namespace and is handed,
with its conntrack state, to its VNIC in the middle of its connections.

Each test brings up its own live host (tests/live/guest.toml, a suffix of its own), sends
traffic only between the namespaces it created and always takes the host down. Every wait is
bounded; the one poll (for the automatic handoff) has a deadline.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from flowshift.live.names import Names

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

GUEST = Path(__file__).parent / "live" / "guest.toml"
NSRUN = Path(__file__).parent / "live" / "nsrun.py"
WAIT = 60.0
CLI = [sys.executable, "-c", "from flowshift.cli import main; main()", "live"]
MB = 1 << 20


class Host:
    def __init__(self, suffix: str) -> None:
        self.names = Names(suffix)
        self.env = {**os.environ, "FLOWSHIFT_LIVE_SUFFIX": suffix}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=WAIT + 30)

    def json(self, *args: str) -> Any:
        done = self.cli(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def ns(self, where: str) -> str:
        """wire, or inside:<machine> (the namespace behind a guest router)."""
        if where == "wire":
            return self.names.wire
        return self.names.inside(where.split(":", 1)[1])

    def start(self, where: str, *args: str) -> subprocess.Popen[str]:
        """A role of nsrun.py, once it printed {"ready": true}."""
        proc = subprocess.Popen([sys.executable, str(NSRUN), self.ns(where), *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        if not ready:
            proc.kill()
            pytest.fail(f"{args[0]} in {where} not ready within {WAIT} s")
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        assert json.loads(line) == {"ready": True}, line
        return proc

    def run(self, where: str, *args: str) -> Any:
        done = subprocess.run([sys.executable, str(NSRUN), self.ns(where), *args],
                              capture_output=True, text=True, timeout=WAIT)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def flows(self, machine: str) -> dict[tuple[Any, ...], str]:
        """(proto, original tuple) -> tier of each live flow of a machine."""
        return {(f["proto"], *f["original"]): f["tier"] for f in self.json("flows")
                if f["machine"] == machine}

    def tier(self, machine: str) -> str:
        return str(self.json("status")["tiers"][machine])


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[str]) -> Any:
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def _up(config: Path) -> Iterator[Host]:
    host = Host(secrets.token_hex(4))
    procs: list[subprocess.Popen[str]] = []
    host.procs = procs  # type: ignore[attr-defined]
    try:
        done = host.cli("up", str(config))
        assert done.returncode == 0, done.stderr
        yield host
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=WAIT)
        host.cli("down")
        for ns in netns.listnetns():  # only if `down` itself failed
            if ns.endswith(f"-{host.names.suffix}"):
                netns.remove(ns)


@pytest.fixture
def guest() -> Iterator[Host]:
    yield from _up(GUEST)


def track(host: Host, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    host.procs.append(proc)  # type: ignore[attr-defined]
    return proc


def test_transfers_through_the_guest_ruleset_survive_its_handoff_mid_stream(guest: Host):
    transfers = [("198.51.100.2", "5001", 4 * MB), ("198.51.100.2", "5002", 2 * MB),
                 ("2001:db8::2", "5003", 2 * MB)]
    sinks = [track(guest, guest.start("wire", "sink", a, p)) for a, p, _ in transfers]
    echo = track(guest, guest.start("wire", "udpecho", "198.51.100.2", "5010"))
    senders = [track(guest, guest.start("inside:gw", "halfsend", a, p, str(n)))
               for a, p, n in transfers]
    stream = track(guest, guest.start("inside:gw", "udpstream", "198.51.100.2", "5010", "400"))
    # every connection is half way, held by the guest's Linux ruleset
    before = guest.flows("gw")
    assert {k[0] for k in before} == {6, 17}
    assert len(before) >= 4 and set(before.values()) == {"machine"}
    assert guest.tier("gw") == "machine"

    done = guest.cli("handoff", "gw")
    assert done.returncode == 0, done.stderr
    assert "now at tier vnic" in done.stdout

    after = guest.flows("gw")
    for key in before:  # the same flows (original tuples), now the VNIC's
        assert after.get(key) == "vnic", (key, after)
    assert guest.tier("gw") == "vnic"
    for proc in (*senders, stream):
        go(proc)
    for (addr, _, n), sink, sender in zip(transfers, sinks, senders, strict=True):
        sent, got = finish(sender), finish(sink)
        assert got["bytes"] == n and got["sha256"] == sent["sha256"] == sent["answer"]
        if ":" in addr:
            assert got["peer"][0] == "2001:db8::1"  # SNAT seen at the peer
        else:
            assert got["peer"][0] == "203.0.113.1" and 20000 <= got["peer"][1] <= 29999
    streamed, echoed = finish(stream), finish(echo)
    assert echoed["received"] == 400 and echoed["sha256"] == streamed["sha256"]
    assert echoed["peer"][0] == "203.0.113.1"
    traffic = {(t["tier"], t["direction"]): t["packets"]
               for t in guest.json("status")["traffic"] if t["machine"] == "gw"}
    assert traffic[("machine", "egress")] > 0 and traffic[("vnic", "egress")] > 0
    assert traffic[("machine", "ingress")] > 0 and traffic[("vnic", "ingress")] > 0
    # the guest's table is gone and its handed conntrack entries with it
    assert "flowshift-gw" not in subprocess.run(
        ["ip", "netns", "exec", guest.names.machine("gw"), "nft", "list", "tables"],
        capture_output=True, text=True, timeout=WAIT).stdout


def test_a_connection_the_firewall_denies_stays_denied_after_the_handoff(guest: Host):
    track(guest, guest.start("wire", "names", "198.51.100.2:6000", "1"))  # listening
    assert guest.run("inside:gw", "probe", "198.51.100.2", "6000", "1")["connected"] is False
    assert guest.cli("handoff", "gw").returncode == 0
    assert guest.run("inside:gw", "probe", "198.51.100.2", "6000", "1")["connected"] is False
    verdicts = {(v["machine"], v["direction"], v["verdict"], v["reason"])
                for v in guest.json("status")["verdicts"]}
    assert ("gw", "egress", "drop", "default") in verdicts


def test_a_handoff_of_a_machine_with_no_flows_leaves_its_vnic_serving(guest: Host):
    done = guest.cli("handoff", "lb")
    assert done.returncode == 0, done.stderr
    assert "0 flows" in done.stdout and "LB slots [0]" in done.stdout
    assert guest.tier("lb") == "vnic"
    track(guest, guest.start("inside:lb", "names", "10.2.0.11:8080,10.2.0.12:8080", "2"))
    answers = guest.run("wire", "fetch", "198.51.100.10", "80", "2")["answers"]
    assert answers == ["10.2.0.11:8080", "10.2.0.12:8080"]
    again = guest.cli("handoff", "lb")
    assert again.returncode == 1 and "nothing to hand over" in again.stderr


def test_the_policy_hands_the_machine_over_at_its_first_elephant(tmp_path: Path):
    config = tmp_path / "elephant.toml"
    config.write_text(GUEST.read_text().replace('policy = "never"', 'policy = "elephant"'))
    for host in _up(config):
        sink = track(host, host.start("wire", "sink", "198.51.100.2", "5001"))
        sender = track(host, host.start("inside:gw", "halfsend", "198.51.100.2", "5001",
                                        str(MB)))  # half a MiB: over 64 KiB, an elephant
        deadline = time.monotonic() + WAIT
        while host.tier("gw") != "vnic":  # each look is a CLI call: no sleep needed
            assert time.monotonic() < deadline, "no automatic handoff"
        assert set(host.flows("gw").values()) == {"vnic"}
        go(sender)
        sent, got = finish(sender), finish(sink)
        assert got["bytes"] == MB and got["sha256"] == sent["sha256"]


def test_round_robin_goes_on_at_the_vnic_where_the_guest_left_it(guest: Host):
    track(guest, guest.start("inside:lb", "names", "10.2.0.11:8080,10.2.0.12:8080", "3"))
    first = guest.run("wire", "fetch", "198.51.100.10", "80", "1")["answers"]
    assert first == ["10.2.0.11:8080"]  # the guest's numgen: slot 0
    assert set(guest.flows("lb").values()) == {"machine"}
    done = guest.json("handoff", "lb")
    assert done["lb_state"] == [1] and done["flows"] >= 1
    # the VNIC's cycle continues at slot 1, then wraps
    answers = guest.run("wire", "fetch", "198.51.100.10", "80", "2")["answers"]
    assert answers == ["10.2.0.12:8080", "10.2.0.11:8080"]


def test_flows_move_from_the_guest_to_the_vnic_to_the_pnic_mid_stream(guest: Host):
    """The whole hierarchy on real connections: the guest's Linux ruleset holds them, the
    machine hands them to its VNIC, the VNIC hands them to the eBPF PNIC, and every byte
    arrives."""
    transfers = [("198.51.100.2", "5001", 8 * MB), ("2001:db8::2", "5003", 4 * MB)]
    sinks = [track(guest, guest.start("wire", "sink", a, p)) for a, p, _ in transfers]
    echo = track(guest, guest.start("wire", "udpecho", "198.51.100.2", "5010"))
    senders = [track(guest, guest.start("inside:gw", "halfsend", a, p, str(n)))
               for a, p, n in transfers]
    stream = track(guest, guest.start("inside:gw", "udpstream", "198.51.100.2", "5010", "400"))
    before = guest.flows("gw")
    assert len(before) >= 3 and set(before.values()) == {"machine"}
    assert guest.cli("handoff", "gw").returncode == 0
    assert {guest.flows("gw").get(k) for k in before} == {"vnic"}
    moved = guest.cli("offload", "--all")
    assert moved.returncode == 0, moved.stderr
    after = guest.flows("gw")
    for key in before:
        assert after.get(key) == "pnic", (key, after, moved.stdout)
    for proc in (*senders, stream):
        go(proc)
    for (_, _, n), sink, sender in zip(transfers, sinks, senders, strict=True):
        sent, got = finish(sender), finish(sink)
        assert got["bytes"] == n and got["sha256"] == sent["sha256"] == sent["answer"]
    streamed, echoed = finish(stream), finish(echo)
    assert echoed["received"] == 400 and echoed["sha256"] == streamed["sha256"]
    status = guest.json("status")
    traffic = {(t["tier"], t["direction"]): t["packets"]
               for t in status["traffic"] if t["machine"] == "gw"}
    assert traffic[("machine", "egress")] > 0 and traffic[("machine", "ingress")] > 0
    pnic = {(m, d): n for m, d, n, _ in status["pnic"]["traffic"] if m == "gw"}
    assert pnic[("gw", "egress")] > 0 and pnic[("gw", "ingress")] > 0, status["pnic"]
