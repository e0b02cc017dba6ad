"""Throughput of `flowshift live`: one TCP transfer through the Python VNIC daemon (SNAT and a
stateful firewall on every packet), against the same transfer through a Linux router.

    python bench/bench_live.py [--mib N] [--runs R] [--json PATH]      (root)

Both paths have the same shape (machine namespace → middle namespace → wire namespace over
veths with checksum offload, segmentation and GRO off, MTU 1500), so the difference is the
VNIC daemon against the kernel's own forwarding. Every namespace has a random suffix and is
removed at the end; traffic stays inside them.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from pyroute2 import IPRoute, netns

from common import machine
from flowshift.live.names import Names
from flowshift.live.topology import offloads_off

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "tests" / "live" / "host.toml"
NSRUN = ROOT / "tests" / "live" / "nsrun.py"
CLI = [sys.executable, "-c", "from flowshift.cli import main; main()", "live"]
TIMEOUT = 300


def transfer(client_ns: str, server_ns: str, addr: str, nbytes: int) -> float:
    """Seconds to send nbytes from client_ns to addr:5001 in server_ns (checked by hash)."""
    sink = subprocess.Popen([sys.executable, str(NSRUN), server_ns, "sink", addr, "5001"],
                            stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    assert json.loads(sink.stdout.readline()) == {"ready": True}
    sent = json.loads(subprocess.run(
        [sys.executable, str(NSRUN), client_ns, "send", addr, "5001", str(nbytes)],
        capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout)
    got = json.loads(sink.communicate(timeout=TIMEOUT)[0].splitlines()[-1])
    if got["sha256"] != sent["sha256"]:
        raise SystemExit("transfer corrupted")
    return float(sent["seconds"])


def live_runs(nbytes: int, runs: int) -> list[float]:
    suffix = "b" + secrets.token_hex(3)
    names = Names(suffix)
    env = {**os.environ, "FLOWSHIFT_LIVE_SUFFIX": suffix}
    try:
        subprocess.run([*CLI, "up", str(HOST)], env=env, check=True, timeout=TIMEOUT)
        return [transfer(names.machine("gw"), names.wire, "198.51.100.2", nbytes)
                for _ in range(runs)]
    finally:
        subprocess.run([*CLI, "down"], env=env, timeout=TIMEOUT)


def router_runs(nbytes: int, runs: int) -> list[float]:
    """machine ─ router (ip_forward=1) ─ wire, the kernel forwarding."""
    sfx = secrets.token_hex(3)
    a, r, b = f"fs-bm-{sfx}", f"fs-br-{sfx}", f"fs-bw-{sfx}"
    made = []
    try:
        for ns in (a, r, b):
            made.append(ns)
            netns.create(ns)
        with IPRoute(netns=r) as ipr:
            ipr.link("add", ifname="ra", kind="veth", peer={"ifname": "eth0", "net_ns_fd": a})
            ipr.link("add", ifname="rb", kind="veth", peer={"ifname": "eth0", "net_ns_fd": b})
        offloads_off(r, ["ra", "rb"])
        offloads_off(a, ["eth0"])
        offloads_off(b, ["eth0"])
        netns.pushns(r)
        try:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        finally:
            netns.popns()
        for ns, ifname, addr, gw in ((r, "ra", "10.0.0.254/24", None),
                                     (r, "rb", "198.51.100.254/24", None),
                                     (a, "eth0", "10.0.0.1/24", "10.0.0.254"),
                                     (b, "eth0", "198.51.100.2/24", "198.51.100.254")):
            with IPRoute(netns=ns) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ip, plen = addr.split("/")
                ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                if gw:
                    ipr.route("add", dst="0.0.0.0/0", gateway=gw)
        return [transfer(a, b, "198.51.100.2", nbytes) for _ in range(runs)]
    finally:
        for ns in made:
            netns.remove(ns)


@click.command()
@click.option("--mib", default=32, show_default=True, help="MiB per transfer.")
@click.option("--runs", default=3, show_default=True, help="Transfers per path.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(mib: int, runs: int, json_path: str | None) -> None:
    nbytes = mib << 20
    result: dict[str, Any] = {"machine": machine(), "bytes": nbytes}
    for name, fn in (("kernel router", router_runs), ("live VNIC daemon", live_runs)):
        secs = fn(nbytes, runs)
        med = statistics.median(secs)
        result[name] = {"seconds": secs, "MB/s": nbytes / med / 1e6,
                        "packets/s": nbytes / 1448 / med}
        print(f"{name:18} {nbytes / med / 1e6:8.1f} MB/s  {nbytes / 1448 / med:9.0f} "
              f"data segments/s  (median of {runs}: {', '.join(f'{s:.3f}' for s in secs)} s)")
    ratio = result["kernel router"]["MB/s"] / result["live VNIC daemon"]["MB/s"]
    print(f"the kernel router is {ratio:.1f}x faster; machine: {result['machine']['cpu']}, "
          f"{result['machine']['cores']} cores")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
