"""`flowshift live`: a real host on Linux, its machines in network namespaces, its VNIC a daemon.

`up HOST.toml` builds the host and starts the VNIC daemon, `down` removes everything `up` made,
`status`, `flows` and `handoff` ask the daemon. See docs/live.md.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click
import msgspec

from flowshift.live import control as ctl
from flowshift.live import lifecycle
from flowshift.live import state as st
from flowshift.live.engine import ConfigError
from flowshift.live.names import LiveError, Names


def _fail(err: Exception, status: int = 1) -> None:
    """One line on stderr; status 2 for bad input (as every command), 1 for the rest."""
    click.echo(f"Error: {err}", err=True)
    raise click.exceptions.Exit(status)


def _names() -> Names:
    try:
        return Names.from_env()
    except LiveError as err:
        _fail(err)
        raise  # unreachable: _fail exits


def _ask(names: Names, request: ctl.Request, timeout: float = 5.0) -> ctl.Reply:
    try:
        state = st.load(names)
        if not lifecycle.daemon_running(state.pid, names):
            raise LiveError(f"the VNIC daemon (pid {state.pid}) is not running: "
                            "`flowshift live down` cleans up")
        return ctl.request(names.control, request, timeout)
    except (LiveError, ctl.ControlError) as err:
        _fail(err)
        raise


def _echo_json(reply: Any) -> None:
    """A daemon's reply (or part of it) as the --json of every live command prints it."""
    click.echo(json.dumps(msgspec.to_builtins(reply), indent=2))


@click.group("live")
def live() -> None:
    """A live host: machines in network namespaces, the VNIC a daemon on real packets."""


@live.command("up")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics on 127.0.0.1:PORT (root namespace). Default: off.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=60.0, show_default=True,
              help="Seconds to wait for the daemon to answer.")
@click.option("--pnic/--no-pnic", default=True, show_default=True,
              help="Attach the eBPF PNIC datapath to the host's ports (--no-pnic: the VNIC "
                   "daemon alone).")
def up(config: str, metrics_port: int | None, timeout: float, pnic: bool) -> None:
    """Build the host of CONFIG and start its VNIC daemon; return when it is ready."""
    names = _names()
    if os.geteuid() != 0:
        _fail(LiveError("flowshift live up needs root (network namespaces)"))
    try:
        state = lifecycle.up(config, names, metrics_port=metrics_port or 0, timeout=timeout,
                             pnic=pnic)
    except ConfigError as err:
        _fail(err, 2)
        return
    except LiveError as err:
        _fail(err)
        return
    except OSError as err:  # netlink and socket errors while building
        _fail(LiveError(f"cannot build the live host: {err}"))
        return
    machines = ", ".join(p.machine for p in state.ports)
    click.echo(f"live host up: {names.host}, {names.wire}, machines {machines}; "
               f"VNIC daemon pid {state.pid}" + ("; PNIC attached" if state.pnic else ""))


@live.command("down")
def down() -> None:
    """Stop the VNIC daemon and remove everything `live up` created."""
    names = _names()
    try:
        removed = lifecycle.down(names)
    except LiveError as err:
        _fail(err)
        return
    click.echo(f"live host down: removed {', '.join(removed) or 'no namespace'}")


@live.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status as JSON.")
def status(as_json: bool) -> None:
    """The daemon's counters: traffic per machine and direction, verdicts, flows."""
    reply = _ask(_names(), ctl.StatusRequest())
    assert isinstance(reply, ctl.Status)
    if as_json:
        _echo_json(reply)
        return
    click.echo(f"VNIC daemon pid {reply.pid}, up {reply.uptime_s:.1f} s, "
               f"source {reply.source}")
    for port in reply.ports:
        click.echo(f"  port {port.ifname} ({port.machine or 'uplink'}): {port.rx_drops} rx "
                   f"drops, {port.tx_errors} tx errors")
    if reply.metrics:
        click.echo(f"metrics: {reply.metrics}")
    click.echo(f"first cache: {reply.first_cache} entries, {reply.swept} swept")
    for machine, n in reply.flows.items():
        tier = reply.tiers.get(machine, "vnic")
        if tier == "machine":
            click.echo(f"  {machine}: tier machine (its chain runs in Linux in its namespace)")
            continue
        click.echo(f"  {machine}: {n} flows, {reply.flows_created.get(machine, 0)} created")
    for t in reply.traffic:
        click.echo(f"  {t.tier} {t.machine} {t.direction}: {t.packets} packets, "
                   f"{t.bytes} bytes")
    for v in reply.verdicts:
        who = f"{v.machine} {v.direction}" if v.machine else "(no machine)"
        click.echo(f"  {who}: {v.verdict} {v.reason}: {v.packets}")
    p = reply.pnic
    if p:
        click.echo(f"PNIC {p['mode']}: {p['entries']}/{p['capacity']} entries, "
                   f"{p['offloads']} offloads, fast path {p['forwarded']} packets")
        for machine, direction, n, b in p["traffic"]:
            click.echo(f"  pnic {machine} {direction}: {n} packets, {b} bytes")
        for what in ("refused", "returned", "punts"):
            counts = ", ".join(f"{k} {n}" for k, n in sorted(p[what].items())) or "none"
            click.echo(f"  {what}: {counts}")


@live.command("handoff")
@click.argument("machine")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def handoff(machine: str, as_json: bool) -> None:
    """Hand MACHINE's chain and flows from its Linux namespace over to its VNIC."""
    reply = _ask(_names(), ctl.HandoffRequest(machine), timeout=60.0)
    if isinstance(reply, ctl.Failed):
        _fail(LiveError(reply.error))
        return
    assert isinstance(reply, ctl.HandoffDone)
    if as_json:
        _echo_json(reply)
        return
    click.echo(f"handoff of {reply.machine}: {reply.flows} flows now at tier vnic "
               f"({reply.seconds * 1000:.1f} ms), {reply.flushed} flushed from the guest"
               + (f", LB slots {reply.lb_state}" if reply.lb_state else ""))


@live.command("flows")
@click.option("--json", "as_json", is_flag=True, help="Print the flows as JSON.")
def flows(as_json: bool) -> None:
    """Every live flow, conntrack-style, with its machine and owner tier."""
    reply = _ask(_names(), ctl.FlowsRequest())
    assert isinstance(reply, ctl.Flows)
    if as_json:
        _echo_json(reply.flows)
        return
    click.echo(reply.text, nl=False)


def _done(reply: ctl.Reply) -> None:
    assert isinstance(reply, ctl.Done)
    if not reply.ok:
        _fail(LiveError(reply.text))
    click.echo(reply.text)


def _flow_arg(flow: tuple[str, ...], every: bool) -> str:
    if every == bool(flow):
        _fail(LiveError("name one FLOW ('tcp SRC:PORT > DST:PORT', as `live flows --json` "
                        "gives it) or --all"), 2)
    return " ".join(flow)


@live.command("offload")
@click.argument("flow", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every established flow at the VNIC.")
def offload(flow: tuple[str, ...], every: bool) -> None:
    """Move FLOW (e.g. tcp 10.0.0.1:40000 > 198.51.100.2:5001) to the PNIC now."""
    _done(_ask(_names(), ctl.OffloadRequest(_flow_arg(flow, every))))


@live.command("return")
@click.argument("flow", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every flow the PNIC holds.")
def return_(flow: tuple[str, ...], every: bool) -> None:
    """Take FLOW's exact entry back from the PNIC to the VNIC."""
    _done(_ask(_names(), ctl.ReturnRequest(_flow_arg(flow, every))))


@live.command("pnic")
@click.argument("action", type=click.Choice(["withdraw", "crash", "restore"]))
def pnic(action: str) -> None:
    """Failure drills: withdraw (entries back exact, punt-all), crash (the map lost, flows
    resumed from the last report, punt-all), restore (the fast path again)."""
    _done(_ask(_names(), ctl.PnicRequest(action)))
