"""Throughput of the live host with its PNIC: one TCP transfer kept at the VNIC daemon, the same
transfer offloaded to the eBPF datapath, and through a Linux router running the same policy
with nftables (conntrack, SNAT) as the anchor; then packets per second of many small UDP flows,
offloaded and not.

    python bench/bench_live_pnic.py [--mib N] [--runs R] [--udp-flows F] [--udp-packets P]
                                    [--json PATH]                       (root)

Every path has the same shape (machine namespace → middle → wire over veths, MTU 1500, checksum
offload, segmentation and GRO off), and the same machine `gw` of tests/live/host.toml (its
firewall, SNAT and counters). Every namespace has a random suffix and is removed at the end;
traffic stays inside them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pyroute2 import NetNS, netns

from bench_live import transfer
from common import machine
from flowshift.config import load_config
from flowshift.linux import router as lr
from flowshift.live.names import Names
from flowshift.nft import Ports, render, sysctl_lines

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "tests" / "live" / "host.toml"
CLI = [sys.executable, "-c", "from flowshift.cli import main; main()", "live"]
TIMEOUT = 300
UDP_PORT = 5002
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4


def host_config(tmp: Path, policy: str) -> Path:
    """host.toml with UDP to UDP_PORT allowed out and the given offload policy."""
    text = HOST.read_text().replace(
        "[[machine.firewall.rule]]                # rule 1: ping out",
        f"[[machine.firewall.rule]]\naction = \"allow\"\ndirection = \"egress\"\n"
        f"proto = \"udp\"\ndst_port = [{UDP_PORT}]\n\n"
        "[[machine.firewall.rule]]                # rule 1: ping out", 1)
    path = tmp / f"host-{policy}.toml"
    path.write_text(text + f"\n[offload]\npolicy = \"{policy}\"\nelephant_packets = 32\n")
    return path


# -- UDP roles (run in a namespace: `python bench_live_pnic.py --role ...`) -------------------

def usink(addr: str, port: int) -> None:
    """Answer each new peer once (so its flow is established), count every datagram; print
    the count and the seconds from the first counted datagram to the last."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE
    s.bind((addr, port))
    print(json.dumps({"ready": True}), flush=True)
    peers: set[tuple[str, int]] = set()
    n, first, last = 0, 0.0, 0.0
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if not select.select([s], [], [], 2.0 if n else TIMEOUT)[0]:
            break
        data, peer = s.recvfrom(2048)
        if data == b"hello":
            if peer not in peers:
                peers.add(peer)
                s.sendto(b"ok", peer)
            continue
        if not n:
            first = time.monotonic()
        n += 1
        last = time.monotonic()
    print(json.dumps({"count": n, "seconds": last - first}), flush=True)


def ublast(addr: str, port: int, flows: int, packets: int) -> None:
    socks = []
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((addr, port))
        s.settimeout(5.0)
        for _ in range(20):  # the first may meet the flow's creation; retry a few times
            s.send(b"hello")
            try:
                s.recv(16)
                break
            except TimeoutError:
                continue
        socks.append(s)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # the bench lets the host settle (offloads done) first
    payload = b"\0" * 18  # a 64-byte frame
    start = time.monotonic()
    for i in range(packets):
        with contextlib.suppress(OSError):
            socks[i % flows].send(payload)
    print(json.dumps({"sent": packets, "seconds": time.monotonic() - start}), flush=True)


def udp_run(client_ns: str, server_ns: str, flows: int, packets: int,
            settled: Callable[[], bool] = lambda: True) -> float:
    """Datagrams per second the sink received (in steady state: the blast starts once every
    flow is established and `settled` says so)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    sink = subprocess.Popen([*me, "--role", "usink", "--ns", server_ns], stdout=subprocess.PIPE,
                            text=True)
    assert sink.stdout is not None
    assert json.loads(sink.stdout.readline()) == {"ready": True}
    blast = subprocess.Popen([*me, "--role", "ublast", "--ns", client_ns, "--udp-flows",
                              str(flows), "--udp-packets", str(packets)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert blast.stdout is not None and blast.stdin is not None
    assert json.loads(blast.stdout.readline()) == {"ready": True}
    deadline = time.monotonic() + 30
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.1)
    blast.stdin.write("\n")
    blast.stdin.flush()
    blast.communicate(timeout=TIMEOUT)
    got = json.loads(sink.communicate(timeout=TIMEOUT)[0].splitlines()[-1])
    return float(got["count"] / got["seconds"]) if got["seconds"] else 0.0


# -- the paths -------------------------------------------------------------------------------

def live_host(tmp: Path, policy: str, *args: str
              ) -> Callable[[Callable[[str, str, dict[str, str]], Any]], Any]:
    def run(body: Callable[[str, str, dict[str, str]], Any]) -> Any:
        suffix = "b" + secrets.token_hex(3)
        names = Names(suffix)
        env = {**os.environ, "FLOWSHIFT_LIVE_SUFFIX": suffix}
        try:
            subprocess.run([*CLI, "up", str(host_config(tmp, policy)), *args], env=env,
                           check=True, timeout=TIMEOUT, stdout=subprocess.DEVNULL)
            out = body(names.machine("gw"), names.wire, env)
            st = json.loads(subprocess.run([*CLI, "status", "--json"], env=env, check=True,
                                           capture_output=True, text=True).stdout)
            if st["pnic"]:
                print(f"    pnic: {st['pnic']['offloads']} offloads, fast path "
                      f"{st['pnic']['forwarded']} packets, punts {st['pnic']['punts']}")
            return out
        finally:
            subprocess.run([*CLI, "down"], env=env, timeout=TIMEOUT, stdout=subprocess.DEVNULL)
    return run


def linux_router(tmp: Path) -> Callable[[Callable[[str, str, dict[str, str]], Any]], Any]:
    """machine ─ Linux router (nftables: the gw machine's firewall, SNAT, conntrack) ─ wire."""
    def run(body: Callable[[str, str, dict[str, str]], Any]) -> Any:
        cfg = load_config(str(host_config(tmp, "never")))
        gw = next(i for i, m in enumerate(cfg.machines) if m.name == "gw")
        routes = lr.Routes([*cfg.machines[gw].addresses,
                            ipaddress.ip_network("203.0.113.1/32")])
        ruleset = render(cfg, [gw], {gw: Ports()}).text
        with lr.Router(ruleset, sysctl_lines(cfg, [gw]), routes,
                       tag=f"fs-bn-{secrets.token_hex(3)}") as r:
            rns, mns, wns = r.namespaces
            with NetNS(rns, flags=0) as ipr:
                for p in lr.ROUTER_PORTS:
                    ipr.link("set", index=ipr.link_lookup(ifname=p)[0], mtu=1500)
            for ns, ifname, addr, side in ((mns, "m0", ("10.0.0.1", 24), 0),
                                           (wns, "w0", ("198.51.100.2", 32), 1)):
                with NetNS(ns, flags=0) as ipr:
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.link("set", index=idx, mtu=1500)
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                    ipr.addr("add", index=idx, address=addr[0], prefixlen=addr[1])
                    ipr.neigh("add", dst="169.254.9.1", lladdr=lr.ROUTER_MACS[side],
                              ifindex=idx, state=NUD_PERMANENT)
                    ipr.route("add", dst="0.0.0.0/0", gateway="169.254.9.1", oif=idx,
                              flags=RTNH_F_ONLINK)
            return body(mns, wns, {})
    return run


def offloaded(env: dict[str, str]) -> int:
    """Flows on the live host's PNIC now (0 without one)."""
    if not env:
        return 0
    st = json.loads(subprocess.run([*CLI, "status", "--json"], env=env, check=True,
                                   capture_output=True, text=True).stdout)
    return int(st["pnic"]["entries"]) if st["pnic"] else 1 << 30


@click.command()
@click.option("--mib", default=100, show_default=True, help="MiB per TCP transfer.")
@click.option("--runs", default=3, show_default=True, help="TCP transfers per path.")
@click.option("--udp-flows", default=256, show_default=True)
@click.option("--udp-packets", default=200_000, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--role", type=click.Choice(["usink", "ublast"]), default=None, hidden=True)
@click.option("--ns", default=None, hidden=True)
def main(mib: int, runs: int, udp_flows: int, udp_packets: int, json_path: str | None,
         role: str | None, ns: str | None) -> None:
    if role is not None:
        assert ns is not None
        netns.setns(ns, flags=0)
        if role == "usink":
            usink("198.51.100.2", UDP_PORT)
        else:
            ublast("198.51.100.2", UDP_PORT, udp_flows, udp_packets)
        return
    import tempfile

    nbytes = mib << 20
    result: dict[str, Any] = {"machine": machine(), "bytes": nbytes}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tcp_paths = (("Linux router (nftables)", linux_router(tmp)),
                     ("live, kept at the VNIC", live_host(tmp, "never", "--no-pnic")),
                     ("live, offloaded to the PNIC", live_host(tmp, "elephant")))
        for name, path in tcp_paths:
            # the VNIC path is slow: a smaller transfer keeps the run short
            n = nbytes if "VNIC" not in name else min(nbytes, 32 << 20)
            secs = path(lambda m, w, env, n=n: [transfer(m, w, "198.51.100.2", n)
                                                for _ in range(runs)])
            med = statistics.median(secs)
            result[name] = {"bytes": n, "seconds": secs, "MB/s": n / med / 1e6}
            print(f"TCP {name:30} {n / med / 1e6:8.1f} MB/s  (median of {runs}, "
                  f"{n >> 20} MiB: {', '.join(f'{s:.3f}' for s in secs)} s)", flush=True)
        for name, path in (("UDP, kept at the VNIC", live_host(tmp, "never", "--no-pnic")),
                           ("UDP, offloaded to the PNIC", live_host(tmp, "always"))):
            pps = path(lambda m, w, env: udp_run(m, w, udp_flows, udp_packets,
                                                 lambda: offloaded(env) >= udp_flows))
            result[name] = {"flows": udp_flows, "packets": udp_packets, "received/s": pps}
            print(f"{name:34} {pps:10.0f} datagrams/s received ({udp_flows} flows, "
                  f"{udp_packets} sent, 64-byte frames)", flush=True)
    pn = result["live, offloaded to the PNIC"]["MB/s"]
    print(f"offloaded / VNIC: {pn / result['live, kept at the VNIC']['MB/s']:.1f}x; "
          f"offloaded / Linux router: {pn / result['Linux router (nftables)']['MB/s']:.2f}x; "
          f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
