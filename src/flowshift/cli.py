"""The `flowshift` command line: a registry of subcommands, each in flowshift.commands."""

from __future__ import annotations

import importlib

import click

from flowshift import __version__

# name -> "module:attribute" of a click command; imported lazily so `--help` stays fast
COMMANDS = {
    "demo": "flowshift.commands.demo:demo",
    "replay": "flowshift.commands.replay:replay",
    "gen-trace": "flowshift.commands.gen_trace:gen_trace",
    "inspect": "flowshift.commands.inspect:inspect_cmd",
    "sweep": "flowshift.commands.sweep:sweep",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowshift")
def main() -> None:
    """flowshift: replay traffic through an emulated host whose stateful services
    (conntrack firewall, NAT, L4 load balancer) move flow by flow from the guest
    machine to its VNIC and on to the SmartNIC (PNIC), mid-stream, with their state.
    """
