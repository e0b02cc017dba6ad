"""The `flowshift` command line: a registry of subcommands, each in flowshift.commands."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from flowshift import __version__

# name -> "module:attribute" of a click command; imported lazily so `--help` stays fast
COMMANDS = {
    "demo": "flowshift.commands.demo:demo",
    "replay": "flowshift.commands.replay:replay",
    "gen-trace": "flowshift.commands.gen_trace:gen_trace",
    "inspect": "flowshift.commands.inspect:inspect_cmd",
    "nft": "flowshift.commands.nft:nft_cmd",
    "verify": "flowshift.commands.verify:verify_cmd",
    "live": "flowshift.commands.live:live",
    "sweep": "flowshift.commands.sweep:sweep",
}


INTERRUPTED = 130  # 128 + SIGINT, as shells report a command that Ctrl-C stopped


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        """Ctrl-C: one line and status 130; the command's outputs were never put in place."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            print("Interrupted: stopped before the end; unfinished outputs were not written.",
                  file=sys.stderr)
            raise click.exceptions.Exit(INTERRUPTED) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowshift")
def main() -> None:
    """flowshift: replay traffic through an emulated host whose stateful services
    (conntrack firewall, NAT, L4 load balancer) move flow by flow from the guest
    machine to its VNIC and on to the SmartNIC (PNIC), mid-stream, with their state.
    """
