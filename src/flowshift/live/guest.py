"""The machine tier in Linux: a machine's namespace runs its chain as an nftables ruleset.

The machine namespace `fs-m-<machine>` is the guest's router: its `inside` port leads to the
namespace that holds the machine's addresses (`fs-i-<machine>`), its `eth0` to the VNIC. Here:
the ruleset (`flowshift.nft`, machine side `inside`, wire side `eth0`) applied and withdrawn with
`nft -f` inside the namespace, the router's sysctls, and the guest's conntrack table read and
flushed over ctnetlink (pyroute2's NFCTSocket, made inside the namespace).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterable

from pyroute2 import netns  # type: ignore[import-untyped]
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket  # type: ignore[import-untyped]

from flowshift.live.ctimport import CtEntry, from_nfct
from flowshift.live.engine import HostConfig, Ports, render, sysctl_lines, table_name
from flowshift.live.names import LiveError

MACHINE_SIDE = "inside"  # the guest router's port towards the machine's addresses
WIRE_SIDE = "eth0"  # its port towards the VNIC
NFT_TIMEOUT = 30.0
# the router: forwards, loose reverse-path filter, no redirects; per-flow counters for the
# offload policy and `live flows`
ROUTER_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    ("net.netfilter.nf_conntrack_acct", "1"),
)


def ruleset(cfg: HostConfig, m: int) -> str:
    return render(cfg, [m], {m: Ports(MACHINE_SIDE, WIRE_SIDE)}).text


def _nft(ns: str, args: list[str], script: str = "") -> str:
    """Run nft inside the namespace (setns in the child before exec); its stdout."""
    try:
        done = subprocess.run(
            ["nft", *args], input=script, text=True, capture_output=True,
            timeout=NFT_TIMEOUT, preexec_fn=lambda: netns.setns(ns, flags=0))
    except FileNotFoundError:
        raise LiveError("nft not found: install nftables") from None
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
        raise LiveError(f"nft in {ns}: {first}")
    return done.stdout


def apply(cfg: HostConfig, m: int, ns: str) -> list[str]:
    """Load machine m's ruleset into its namespace and set the router's sysctls (the ruleset
    first: it loads conntrack, whose sysctls exist only then). Returns the sysctls a namespace
    may not set (skipped)."""
    _nft(ns, ["-f", "-"], ruleset(cfg, m))
    values = dict(ROUTER_SYSCTLS)
    for line in sysctl_lines(cfg, [m]):  # forwarding, conntrack as flowshift models it
        if not line.startswith("#"):
            name, _, value = line.partition(" = ")
            values[name] = value
    values["net.netfilter.nf_conntrack_acct"] = "1"
    return _sysctls(ns, values.items())


def _sysctls(ns: str, values: Iterable[tuple[str, str]]) -> list[str]:
    skipped = []
    netns.pushns(ns)
    try:
        for name, value in values:
            path = "/proc/sys/" + name.replace(".", "/")
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError:  # global-only in a namespace (nf_conntrack_max, buckets, ...)
                skipped.append(name)
    finally:
        netns.popns()
    return skipped


def lb_slots(cfg: HostConfig, m: int, ns: str) -> list[int]:
    """Each pool's next round-robin slot, from the counter of its `numgen inc` rule: only a
    connection's first packet runs the nat chain, so the rule's packets are the draws."""
    machine = cfg.machines[m]
    if not machine.lb or "lb" not in machine.services:
        return []
    listing = json.loads(_nft(ns, ["-j", "list", "table", "inet", table_name(machine)]))
    drawn: dict[str, int] = {}
    for item in listing.get("nftables", []):
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                drawn[rule["comment"]] = int(expr["counter"]["packets"])
    slots = []
    for j, pool in enumerate(machine.lb):
        total = sum(b.weight for b in pool.backends)
        n = drawn.get(f"machine[{m}].lb[{j}]", 0)
        slots.append(n % total if pool.scheduler == "round-robin" and total else 0)
    return slots


def withdraw(cfg: HostConfig, m: int, ns: str) -> None:
    """Remove machine m's table in one nft transaction. When nft returns, no packet is inside
    the old hooks any more (the kernel waits for them when it unregisters a hook)."""
    _nft(ns, ["delete", "table", "inet", table_name(cfg.machines[m])])


class Conntrack:
    """ctnetlink sockets of one namespace (IPv4 and IPv6), made inside it (pyroute2 `netns`:
    its socket is made lazily, so it must be told where)."""

    def __init__(self, ns: str) -> None:
        self.socks = [NFCTSocket(nfgen_family=socket.AF_INET, netns=ns),
                      NFCTSocket(nfgen_family=socket.AF_INET6, netns=ns)]

    def dump(self) -> list[CtEntry]:
        out = []
        for s in self.socks:
            for msg in s.dump():
                ct = from_nfct(msg)
                if ct is not None:
                    out.append(ct)
        return out

    def flush(self) -> None:
        """Delete every conntrack of the namespace, IPv4 and IPv6, one request each."""
        for s in self.socks:
            s.flush()

    def close(self) -> None:
        for s in self.socks:
            s.close()


__all__ = ["Conntrack", "apply", "lb_slots", "ruleset", "withdraw"]
