"""`flowshift live` on real namespaces: real TCP stacks on both ends of the VNIC daemon.

Every test drives the command line as a user would (subprocesses), with a suffix of its own in
FLOWSHIFT_LIVE_SUFFIX so that parallel runs never share a name, and sends traffic only between
the namespaces it created. Fixtures always take the host down; every wait has a bound.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from flowshift.live import lifecycle
from flowshift.live.names import Names
from flowshift.live.topology import offloads

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

HOST = Path(__file__).parent / "live" / "host.toml"
NSRUN = Path(__file__).parent / "live" / "nsrun.py"
WAIT = 60.0  # bound of every wait on a subprocess
CLI = [sys.executable, "-c", "from flowshift.cli import main; main()", "live"]


class LiveHost:
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

    def start(self, ns: str, *args: str) -> subprocess.Popen[str]:
        """A role of nsrun.py in a namespace, once it printed its first line (ready)."""
        proc = subprocess.Popen([sys.executable, str(NSRUN), self.names.machine(ns)
                                 if ns not in ("wire",) else self.names.wire, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        if not ready:
            proc.kill()
            pytest.fail(f"{args[0]} in {ns} not ready within {WAIT} s")
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        return proc

    def run(self, ns: str, *args: str) -> Any:
        target = self.names.wire if ns == "wire" else self.names.machine(ns)
        done = subprocess.run([sys.executable, str(NSRUN), target, *args], capture_output=True,
                              text=True, timeout=WAIT)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def verdicts(self) -> dict[tuple[str, str, str, str], int]:
        return {(v["machine"], v["direction"], v["verdict"], v["reason"]): v["packets"]
                for v in self.json("status")["verdicts"]}


def finish(proc: subprocess.Popen[str]) -> Any:
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def ours(names: Names) -> list[str]:
    return [ns for ns in netns.listnetns() if ns.endswith(f"-{names.suffix}")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def suffix() -> str:
    return secrets.token_hex(4)


def _up(suffix: str, *args: str) -> Iterator[LiveHost]:
    host = LiveHost(suffix)
    try:
        done = host.cli("up", str(HOST), *args)
        assert done.returncode == 0, done.stderr
        yield host
    finally:
        host.cli("down")
        for ns in ours(host.names):  # only if `down` itself failed
            netns.remove(ns)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveHost]:
    port = free_port()
    # the VNIC daemon alone (tests/test_live_pnic.py runs the host with its PNIC)
    for host in _up(secrets.token_hex(4), "--metrics-port", str(port), "--no-pnic"):
        host.metrics_port = port  # type: ignore[attr-defined]
        yield host


def test_transfer_through_snat_arrives_whole_and_from_the_snat_address(live: LiveHost):
    sink = live.start("wire", "sink", "198.51.100.2", "5001")
    sent = live.run("gw", "send", "198.51.100.2", "5001", str(4 << 20))
    got = finish(sink)
    assert got["bytes"] == 4 << 20
    assert got["sha256"] == sent["sha256"] == sent["answer"]  # every byte, in order
    assert got["peer"][0] == "203.0.113.1"
    assert 20000 <= got["peer"][1] <= 29999  # the SNAT rule's port range
    mb_s = (4 << 20) / sent["seconds"] / 1e6
    print(f"live transfer: 4 MiB in {sent['seconds']:.3f} s = {mb_s:.1f} MB/s")


def test_ipv6_transfer_through_snat(live: LiveHost):
    sink = live.start("wire", "sink", "2001:db8::2", "5001")
    sent = live.run("gw", "send", "2001:db8::2", "5001", str(256 << 10))
    got = finish(sink)
    assert got["sha256"] == sent["sha256"]
    assert got["peer"][0] == "2001:db8::1"


def test_firewall_refuses_what_the_config_refuses_and_counts_the_reason(live: LiveHost):
    key = ("gw", "egress", "drop", "default")
    before = live.verdicts().get(key, 0)
    sink = live.start("wire", "sink", "198.51.100.2", "6000")  # listening: only the VNIC stops it
    try:
        probe = live.run("gw", "probe", "198.51.100.2", "6000", "1.5")
    finally:
        sink.kill()
        sink.wait(timeout=WAIT)
    assert probe["connected"] is False
    assert live.verdicts()[key] > before


def test_lb_vip_spreads_connections_over_backends_in_the_machine(live: LiveHost):
    servers = live.start("lb", "names", "10.2.0.11:8080,10.2.0.12:8080", "6")
    got = live.run("wire", "fetch", "198.51.100.10", "80", "6")
    assert finish(servers) == {"left": 0}
    # round-robin: each new flow takes the next backend
    assert got["answers"] == ["10.2.0.11:8080", "10.2.0.12:8080"] * 3


def test_flows_show_the_vnic_as_owner_tier(live: LiveHost):
    sink = live.start("wire", "sink", "198.51.100.2", "5001")
    live.run("gw", "send", "198.51.100.2", "5001", "1000")
    finish(sink)
    rows = live.json("flows")
    gw = [r for r in rows if r["machine"] == "gw" and r["original"][3] == 5001]
    assert gw and all(r["tier"] == "vnic" for r in rows)
    assert all(r["reply"][1] in ("203.0.113.1", "2001:db8::1") for r in gw)
    text = live.cli("flows")
    assert text.returncode == 0
    lines = [line for line in text.stdout.splitlines() if "dport=5001" in line]
    assert lines and all(line.endswith("machine=gw tier=vnic") for line in lines)
    assert lines[0].startswith("tcp      6 ")


def test_metrics_endpoint_serves_the_counters(live: LiveHost):
    live.run("gw", "probe", "198.51.100.2", "6001", "0.5")  # at least one drop
    port = live.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    assert 'flowshift_live_packets_total{direction="egress",machine="gw",tier="vnic"}' in text
    assert 'flowshift_live_verdicts_total{direction="egress",machine="gw",reason="default",' \
           'verdict="drop"}' in text
    assert "flowshift_live_first_cache_entries " in text
    status = live.json("status")
    assert status["metrics"] == f"http://127.0.0.1:{port}/metrics"


def test_offloads_are_off_on_every_veth_end(live: LiveHost):
    n = live.names
    for ns, ifname in [(n.host, "fs-up"), (n.host, "fs-p-gw"), (n.wire, "eth0"),
                       (n.machine("gw"), "eth0")]:
        on = {k for k, v in offloads(ns, ifname).items() if v}
        # what a veth cannot turn off (fixed features) is not a checksum or segmentation one
        assert not on & {"rx-checksum", "tx-checksum-ip-generic", "tx-tcp-segmentation",
                         "tx-generic-segmentation", "rx-gro"}, (ns, ifname, on)


def test_host_does_no_forwarding_of_its_own(live: LiveHost):
    netns.pushns(live.names.host)
    try:
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"
        assert Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "1"
    finally:
        netns.popns()


def test_up_twice_refuses_with_one_line(live: LiveHost):
    done = live.cli("up", str(HOST))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "already up" in done.stderr
    assert live.json("status")["pid"] > 0  # the running host is untouched


def test_down_after_sigkill_of_the_daemon_leaves_nothing(suffix: str):
    for host in _up(suffix):
        state = json.loads(host.names.state.read_text())
        assert sorted(ours(host.names)) == sorted(state["netns"])
        os.kill(state["pid"], signal.SIGKILL)
        status = host.cli("status")
        assert status.returncode == 1 and "not running" in status.stderr
        done = host.cli("down")
        assert done.returncode == 0, done.stderr
        assert ours(host.names) == []
        assert not host.names.run_dir.exists()


def test_sigterm_stops_the_daemon_cleanly_and_down_removes_the_rest(suffix: str):
    for host in _up(suffix):
        pid = json.loads(host.names.state.read_text())["pid"]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + WAIT
        while lifecycle.daemon_running(pid, host.names) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not lifecycle.daemon_running(pid, host.names)
        assert host.names.log.read_text().rstrip().endswith("stopped")  # left its loop
        assert not host.names.control.exists()
        assert host.cli("down").returncode == 0
        assert ours(host.names) == [] and not host.names.run_dir.exists()
        done = host.cli("down")  # nothing left to remove
        assert done.returncode == 1 and "no live host is up" in done.stderr

def test_captures_at_both_ends_show_no_loss_and_no_reordering(live: LiveHost):
    """The data segments the machine sent are those the wire received, in the same order: the
    VNIC lost, reordered and duplicated nothing (a loss would show as a segment missing at the
    wire, and its retransmission at both ends)."""
    sink = live.start("wire", "sink", "198.51.100.2", "5001")
    sent_cap = live.start("gw", "capture", "eth0", "out", "5001")
    got_cap = live.start("wire", "capture", "eth0", "in", "5001")
    sent = live.run("gw", "send", "198.51.100.2", "5001", str(2 << 20))
    assert finish(sink)["sha256"] == sent["sha256"]
    machine, wire = finish(sent_cap), finish(got_cap)
    assert machine["dropped"] == wire["dropped"] == 0  # the captures saw every frame
    assert all(p["rx_drops"] == 0 for p in live.json("status")["ports"])
    # the whole stream was sent (a busy machine may make TCP retransmit a segment on a timer,
    # which is the sender's doing: both captures then show it)
    first = machine["segments"][0][0]
    spans = sorted(((seq - first) % (1 << 32), n) for seq, n in machine["segments"])
    end = 0  # stream offsets covered so far, from 0: no hole means nothing was never sent
    for start, n in spans:
        assert start <= end, f"hole at stream offset {end}"
        end = max(end, start + n)
    assert end == 2 << 20
    assert wire["segments"] == machine["segments"]


def test_a_bad_config_is_refused_with_one_line_and_nothing_made(suffix: str, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text(HOST.read_text().replace('peers = ["198.51.100.2"', 'peers = ["203.0.113.1"'))
    host = LiveHost(suffix)
    done = host.cli("up", str(bad))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert "live.peers[0]: peer 203.0.113.1 is an address of machine 'gw'" in done.stderr
    assert ours(host.names) == [] and not host.names.state.exists()
    done = host.cli("up", str(tmp_path / "missing.toml"))
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_malformed_frames_and_control_garbage_are_counted_not_fatal(live: LiveHost):
    # an IPv4 header cut short, from the machine: counted as unparsed, never forwarded
    frame = bytes(6) + bytes.fromhex("020000000001") + b"\x08\x00" + bytes.fromhex("4500")
    key = ("", "", "unparsed", "truncated-ip")
    before = live.verdicts().get(key, 0)
    assert live.run("gw", "inject", "eth0", frame.hex()) == {"sent": len(frame)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(str(live.names.control))
        s.sendall(b"\x00\x00\x00\x03abc")  # a frame that is no request
        assert s.recv(16) == b""  # closed without an answer
    deadline = time.monotonic() + WAIT
    while live.verdicts().get(key, 0) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.verdicts()[key] == before + 1


def test_the_daemon_exits_when_its_state_file_is_gone(suffix: str):
    """An `up` killed between starting the daemon and recording its pid leaves `down` no pid to
    stop: the daemon must notice on its own."""
    for host in _up(suffix):
        state = host.names.state.read_text()
        pid = json.loads(state)["pid"]
        host.names.state.unlink()
        try:
            deadline = time.monotonic() + WAIT
            while lifecycle.daemon_running(pid, host.names) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not lifecycle.daemon_running(pid, host.names)
        finally:
            host.names.state.write_text(state)  # for the fixture's `down`
