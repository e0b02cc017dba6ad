"""`flowshift nft HOST.toml`: the config's service chains as an nftables ruleset (docs/nftables.md).

Prints the ruleset (for `nft -f`), or with `--sysctl` the router settings it needs. What has
only an approximate nftables form is rendered with a `# warning:` comment, also printed on
stderr; what has none exits with status 2 and one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from flowshift.config import ConfigError, load_config
from flowshift.nft import Ports, RenderError, default_ports, machine_index, render, sysctl_lines


def fail(message: str) -> click.exceptions.Exit:
    click.echo(f"Error: {message}", err=True)
    return click.exceptions.Exit(2)


@click.command("nft")
@click.argument("config", type=click.Path(path_type=Path), metavar="HOST.toml")
@click.option("--machine", metavar="NAME", help="Render this machine only [default: every one].")
@click.option("--machine-port", metavar="IFNAME",
              help="The router's port on the machine's side [default: inside].")
@click.option("--wire-port", metavar="IFNAME",
              help="The router's port on the wire side [default: outside].")
@click.option("--sysctl", "sysctl", is_flag=True,
              help="Print the router's sysctl.conf lines instead of the ruleset.")
def nft_cmd(config: Path, machine: str | None, machine_port: str | None,
            wire_port: str | None, sysctl: bool) -> None:
    """Print the service chains of HOST.toml's machines as an nftables ruleset (family inet).

    Each machine is a table `flowshift-<name>` whose chains see only the traffic entering
    through its two router ports: inside/outside for one machine, inside<i>/outside<i> for
    machine i of several (or --machine-port / --wire-port with one machine).
    """
    try:
        cfg = load_config(config)
        indices = list(range(len(cfg.machines)))
        if machine is not None:
            indices = [machine_index(cfg, machine)]
        ports = default_ports(cfg)
        if machine_port is not None or wire_port is not None:
            if len(indices) != 1:
                raise RenderError("--machine-port and --wire-port name one machine's ports: "
                                  "use --machine")
            ports[indices[0]] = Ports(machine_port or "inside", wire_port or "outside")
        elif machine is not None:
            ports[indices[0]] = Ports()
        if sysctl:
            click.echo("\n".join(sysctl_lines(cfg, indices)))
            return
        rendering = render(cfg, indices, ports)
    except (ConfigError, RenderError) as e:
        raise fail(str(e)) from None
    for warning in rendering.warnings:
        click.echo(f"Warning: {warning}", err=True)
    click.echo(rendering.text, nl=False)
