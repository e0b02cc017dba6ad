"""The live host with its PNIC: real TCP across the eBPF datapath, offloaded mid-stream by the
VNIC daemon, returned, withdrawn and crashed, with captures at both ends.

As tests/test_live.py: the command line as a user runs it, a suffix of our own in
FLOWSHIFT_LIVE_SUFFIX, traffic only between the namespaces the host made, `down` always, every
wait bounded. A stepped sender (nsrun.py `steps`) pauses the transfer between steps so a drill
lands mid-stream with data still in flight.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from test_live import HOST, NSRUN, WAIT, LiveHost, finish, free_port, ours

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

BPFFS = Path("/sys/fs/bpf")


def config(tmp_path: Path, **offload: object) -> Path:
    """The live tests' host with an [offload] table of our own."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in offload.items()]
    path = tmp_path / "host.toml"
    path.write_text(HOST.read_text() + "\n[offload]\n" + "\n".join(lines) + "\n")
    return path


def host_up(suffix: str, cfg: Path, *args: str) -> Iterator[LiveHost]:
    host = LiveHost(suffix)
    try:
        done = host.cli("up", str(cfg), *args)
        assert done.returncode == 0, done.stderr
        yield host
    finally:
        host.cli("down")
        for ns in ours(host.names):  # only if `down` itself failed
            netns.remove(ns)


@pytest.fixture(scope="module")
def elephant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveHost]:
    """Offload by policy: elephants from 32 packets; reports every 0.2 s."""
    cfg = config(tmp_path_factory.mktemp("pnic"), policy="elephant", elephant_packets=32,
                 report_interval=0.2)
    port = free_port()
    for host in host_up(secrets.token_hex(4), cfg, "--metrics-port", str(port)):
        host.metrics_port = port  # type: ignore[attr-defined]
        yield host


def daemon_cpu(host: LiveHost) -> int:
    """The CPU the VNIC daemon pinned itself to."""
    return min(os.sched_getaffinity(json.loads(host.names.state.read_text())["pid"]))


def on_cpu(cpu: int | None) -> Callable[[], None] | None:
    return None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))


def start_on(host: LiveHost, cpu: int, ns: str, *args: str) -> subprocess.Popen[str]:
    """LiveHost.start, the role pinned to one CPU."""
    target = host.names.wire if ns == "wire" else host.names.machine(ns)
    proc = subprocess.Popen([sys.executable, str(NSRUN), target, *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=on_cpu(cpu))
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], WAIT)[0]:
        proc.kill()
        pytest.fail(f"{args[0]} in {ns} not ready within {WAIT} s")
    assert json.loads(proc.stdout.readline()) == {"ready": True}
    return proc


class Stepper:
    """A transfer from gw to the wire in steps, each released by the test."""

    def __init__(self, host: LiveHost, nbytes: int, steps: int, cpu: int | None = None,
                 addr: str = "198.51.100.2") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(NSRUN), host.names.machine("gw"), "steps", addr,
             "5001", str(nbytes), str(steps)], preexec_fn=on_cpu(cpu),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.line()
        assert first["ready"]
        self.flow = (f"tcp 10.0.0.1:{first['sport']} > {addr}:5001" if ":" not in addr else
                     f"tcp [fd00::1]:{first['sport']} > [{addr}]:5001")

    def line(self) -> Any:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], WAIT)[0]:
            self.proc.kill()
            pytest.fail(f"the sender said nothing within {WAIT} s")
        text = self.proc.stdout.readline()
        if not text:
            pytest.fail(f"the sender ended: {self.proc.communicate(timeout=WAIT)[1]}")
        return json.loads(text)

    def step(self) -> None:
        """Send the next step and wait until it is in the sender's socket."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert "step" in self.line()

    def finish(self) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.line()


def tier_of(host: LiveHost, flow: str) -> str:
    for row in host.json("flows"):
        if row["flow"] == flow:
            return str(row["tier"])
    return ""


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not within {WAIT} s")
        time.sleep(0.05)


def pnic(host: LiveHost) -> dict[str, Any]:
    return dict(host.json("status")["pnic"])


def assert_same_stream(machine: dict[str, Any], wire: dict[str, Any], nbytes: int) -> None:
    """The data segments the machine sent are those the wire received, in the same order; the
    stream has no hole."""
    assert machine["dropped"] == wire["dropped"] == 0  # the captures saw every frame
    first = machine["segments"][0][0]
    end = 0
    for start, n in sorted(((seq - first) % (1 << 32), n) for seq, n in machine["segments"]):
        assert start <= end, f"hole at stream offset {end}"
        end = max(end, start + n)
    assert end == nbytes
    assert wire["segments"] == machine["segments"]


def test_a_100_mb_transfer_is_offloaded_mid_stream_and_arrives_whole(elephant: LiveHost):
    """The flow goes to the PNIC by policy while it runs (`live flows` says tier=pnic), the
    fast path carries most of it, and every byte arrives in order from the SNAT address."""
    total = 100 << 20
    before = pnic(elephant)
    sink = elephant.start("wire", "sink", "198.51.100.2", "5001")
    sender = Stepper(elephant, total, 4)
    sender.step()
    wait_for("tier=pnic", lambda: tier_of(elephant, sender.flow) == "pnic")
    sender.step()
    rows = [r for r in elephant.json("flows") if r["flow"] == sender.flow]
    assert rows[0]["tier"] == "pnic" and rows[0]["tcp_state"] == "ESTABLISHED"
    sender.step()
    sender.step()
    sent = sender.finish()
    got = finish(sink)
    assert got["bytes"] == total
    assert got["sha256"] == sent["sha256"] == sent["answer"]  # every byte, in order
    assert got["peer"][0] == "203.0.113.1"  # the SNAT address, from the fast path too
    assert 20000 <= got["peer"][1] <= 29999
    after = pnic(elephant)
    assert after["offloads"] == before["offloads"] + 1
    assert after["returned"].get("closed", 0) == before["returned"].get("closed", 0) + 1
    carried = after["forwarded"] - before["forwarded"]
    software = sum(after["received"].values()) - sum(before["received"].values())
    assert carried > 20 * software  # the fast path carried nearly all of it
    assert carried * 1448 > 0.9 * total
    assert after["late"] == 0 and after["punt_rx_drops"] == 0
    pnic_rows = {(m, d): (n, b) for m, d, n, b in after["traffic"]}
    assert pnic_rows[("gw", "egress")][1] > 0.9 * total
    print(f"live pnic: 100 MiB in {sent['seconds']:.3f} s = "
          f"{total / sent['seconds'] / 1e6:.0f} MB/s; fast path {carried} packets, "
          f"software {software}")


def test_offload_return_withdraw_crash_mid_stream_lose_and_reorder_nothing(elephant: LiveHost):
    """One transfer through every move: offload by policy, `live return`, re-offload,
    withdrawal, restore, crash, restore, and the FIN's return; the captures at both ends hold
    the same data segments in the same order, and the data arrives whole.

    Every process of the test runs on the daemon's CPU: frames one end sends from two CPUs
    cross the veth through two per-CPU backlogs and may change order before any host sees
    them (a Linux router on veths shows the same); on one CPU, any change of order at the
    wire is the host's."""
    total = 24 << 20
    before = pnic(elephant)
    cpu = daemon_cpu(elephant)
    sink = start_on(elephant, cpu, "wire", "sink", "198.51.100.2", "5001")
    sent_cap = start_on(elephant, cpu, "gw", "capture", "eth0", "out", "5001")
    got_cap = start_on(elephant, cpu, "wire", "capture", "eth0", "in", "5001")
    sender = Stepper(elephant, total, 8, cpu)

    def on(tier: str) -> None:
        wait_for(f"tier={tier}", lambda: tier_of(elephant, sender.flow) == tier)

    def cli(*args: str) -> str:
        done = elephant.cli(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    sender.step()
    on("pnic")
    assert "returned 1 flow" in cli("return", *sender.flow.split())
    assert tier_of(elephant, sender.flow) == "vnic"
    assert "offloaded 1 flow" in cli("offload", *sender.flow.split())
    assert tier_of(elephant, sender.flow) == "pnic"
    sender.step()
    sender.step()
    assert "1 flow(s) back" in cli("pnic", "withdraw")
    assert tier_of(elephant, sender.flow) == "vnic"
    sender.step()  # all in software, punt-all
    assert tier_of(elephant, sender.flow) == "vnic"
    cli("pnic", "restore")
    sender.step()
    on("pnic")  # offloaded by policy again
    at = pnic(elephant)["reports"]
    wait_for("a report", lambda: pnic(elephant)["reports"] > at)  # the crash resumes from it
    assert "1 flow(s) resumed" in cli("pnic", "crash")
    sender.step()  # in software, windows re-learned
    cli("pnic", "restore")
    sender.step()
    on("pnic")
    sender.step()
    sent = sender.finish()
    assert finish(sink)["sha256"] == sent["sha256"] == sent["answer"]
    after = pnic(elephant)
    st = elephant.json("status")
    diag = json.dumps({"pnic": after, "verdicts": st["verdicts"], "ports": st["ports"]})
    mcap, wcap = finish(sent_cap), finish(got_cap)
    try:
        assert_same_stream(mcap, wcap, total)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{diag}") from None
    returned = {k: after["returned"].get(k, 0) - before["returned"].get(k, 0)
                for k in ("requested", "withdraw", "crash", "closed")}
    assert returned == {"requested": 1, "withdraw": 1, "crash": 1, "closed": 1}
    assert after["offloads"] - before["offloads"] == 4
    assert after["mode"] == "fast" and after["late"] == 0
    assert all(p["rx_drops"] == 0 for p in elephant.json("status")["ports"])


def test_firewall_still_refuses_with_the_pnic_attached(elephant: LiveHost):
    sink = elephant.start("wire", "sink", "198.51.100.2", "5002")
    got = elephant.run("gw", "probe", "198.51.100.2", "5002", "2")
    assert not got["connected"]
    sink.kill()
    sink.communicate(timeout=WAIT)
    v = elephant.verdicts()
    assert v.get(("gw", "egress", "drop", "default"), 0) >= 1


def test_metrics_export_the_pnic(elephant: LiveHost):
    url = f"http://127.0.0.1:{elephant.metrics_port}/metrics"  # type: ignore[attr-defined]
    wait_for("a report", lambda: pnic(elephant)["offloads"] >= 0)
    text = urllib.request.urlopen(url, timeout=WAIT).read().decode()
    for name in ("flowshift_live_offloads_total", "flowshift_live_returns_total",
                 "flowshift_live_refusals_total", "flowshift_live_punts_total",
                 "flowshift_live_second_cache_entries", "flowshift_live_held_handled_total",
                 "flowshift_live_pnic_forwarded_total"):
        assert name in text, name
    assert 'flowshift_live_punts_total{reason="miss"}' in text
    assert 'flowshift_live_flows{machine="gw",tier="pnic"}' in text
    assert 'flowshift_live_packets_total{direction="egress",machine="gw",tier="pnic"}' in text


def test_offload_and_return_commands_name_a_flow_or_all(tmp_path: Path):
    """Policy `never`: nothing moves unless asked; FLOW must parse."""
    cfg = config(tmp_path, policy="never")
    for host in host_up(secrets.token_hex(4), cfg):
        sink = host.start("wire", "sink", "198.51.100.2", "5001")
        sender = Stepper(host, 4 << 20, 2)
        sender.step()
        assert tier_of(host, sender.flow) == "vnic"
        bad = host.cli("offload", "tcp", "10.0.0.1:x", ">", "198.51.100.2:5001")
        assert bad.returncode == 1 and "is not ADDRESS:PORT" in bad.stderr
        assert host.cli("offload").returncode == 2
        done = host.cli("offload", "--all")
        assert done.returncode == 0 and "offloaded 1 flow" in done.stdout, done.stderr
        assert tier_of(host, sender.flow) == "pnic"
        assert "returned 1 flow" in host.cli("return", "--all").stdout
        assert tier_of(host, sender.flow) == "vnic"
        sender.step()
        sent = sender.finish()
        assert finish(sink)["sha256"] == sent["sha256"]
        assert pnic(host)["offloads"] == 1


def test_no_pnic_runs_software_only(tmp_path: Path):
    for host in host_up(secrets.token_hex(4), config(tmp_path, policy="always"), "--no-pnic"):
        status = host.json("status")
        assert status["source"] == "af_packet" and status["pnic"] == {}
        assert not (BPFFS / host.names.host).exists()
        sink = host.start("wire", "sink", "198.51.100.2", "5001")
        sent = host.run("gw", "send", "198.51.100.2", "5001", str(1 << 20))
        assert finish(sink)["sha256"] == sent["sha256"]
        assert "no PNIC" in host.cli("pnic", "withdraw").stderr


def test_down_after_sigkill_of_the_daemon_removes_the_pins(tmp_path: Path):
    host = LiveHost(secrets.token_hex(4))
    pins = BPFFS / host.names.host
    try:
        done = host.cli("up", str(config(tmp_path)))
        assert done.returncode == 0, done.stderr
        assert (pins / "fs_flows").exists()
        pid = json.loads(host.names.state.read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
    finally:
        done = host.cli("down")
        for ns in ours(host.names):
            netns.remove(ns)
    assert done.returncode == 0, done.stderr
    assert not pins.exists()
    assert not ours(host.names)


def test_a_full_cache_makes_room_and_idle_flows_come_back(tmp_path: Path):
    """Capacity 1: a second elephant finds the cache full; it moves down once the first has
    come back, to make room (`room`: the first sat idle for the second's whole life) or idle
    (`idle`: which of the two depends on when the first's last segment passed); once idle for
    idle_timeout it comes back too. Both transfers arrive whole."""
    cfg = config(tmp_path, policy="elephant", idle_timeout=2.0, report_interval=0.1)
    cfg.write_text(cfg.read_text().replace("[offload]", "[pnic]\ncapacity = 1\n\n[offload]"))
    for host in host_up(secrets.token_hex(4), cfg):
        room_and_idle(host)


def room_and_idle(host: LiveHost) -> None:
    sink_a = host.start("wire", "sink", "198.51.100.2", "5001")
    sink_b = host.start("wire", "sink", "2001:db8::2", "5001")
    a = Stepper(host, 2 << 20, 2)
    a.step()
    wait_for("a on the PNIC", lambda: tier_of(host, a.flow) == "pnic")
    b = Stepper(host, 4 << 20, 2, addr="2001:db8::2")
    b.step()
    wait_for("b on the PNIC", lambda: tier_of(host, b.flow) == "pnic")
    assert tier_of(host, a.flow) == "vnic"
    back = pnic(host)["returned"]
    assert back.get("room", 0) + back.get("idle", 0) >= 1
    wait_for("b back, idle", lambda: tier_of(host, b.flow) == "vnic")
    back = pnic(host)["returned"]
    assert back.get("room", 0) + back.get("idle", 0) == 2
    assert tier_of(host, b.flow) == "vnic"
    for sender, sink in ((a, sink_a), (b, sink_b)):
        sender.step()
        sent = sender.finish()
        assert finish(sink)["sha256"] == sent["sha256"]
