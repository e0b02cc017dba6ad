"""`flowshift verify HOST.toml [TRACE]`: the config against the real Linux kernel, packet by packet.

Exit status: 0 when Linux and flowshift agree on every compared packet, 1 when they differ,
2 on bad input (config, trace, options) or when the check cannot run (not root, no nft).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from flowshift.config import ConfigError, load_config
from flowshift.linux.router import RouterError
from flowshift.linux.verify import (
    DEFAULT_FLOWS,
    Verification,
    maglev_pools,
    round_robin_twin,
    verify,
)
from flowshift.nft import RenderError, machine_index
from flowshift.packet.pcap import TraceError
from flowshift.replay import ReplayError


def fail(message: str) -> click.exceptions.Exit:
    click.echo(f"Error: {message}", err=True)
    return click.exceptions.Exit(2)


@click.command("verify")
@click.argument("config", type=click.Path(path_type=Path), metavar="HOST.toml")
@click.argument("trace", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--machine", metavar="NAME", help="The machine to check [default: the first].")
@click.option("--flows", type=click.IntRange(min=1), default=DEFAULT_FLOWS, show_default=True,
              help="Flows of the generated gateway trace (without TRACE).")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seed of the generated gateway trace (without TRACE).")
@click.option("--maglev-as-round-robin", "twin", is_flag=True,
              help="Check the config with every Maglev pool balanced round robin, as Linux "
              "can balance exactly.")
@click.option("--ruleset", type=click.Path(dir_okay=False, path_type=Path), metavar="RULES.nft",
              help="Load this nftables ruleset into Linux instead of the rendered one "
              '(its ports: "inside" on the machine side, "outside" on the wire side).')
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(config: Path, trace: Path | None, machine: str | None, flows: int, seed: int,
               twin: bool, ruleset: Path | None, as_json: bool) -> None:
    """Check HOST.toml's machine against Linux: the same trace through flowshift and through
    a Linux router in network namespaces running `flowshift nft`'s ruleset (root only).

    Without TRACE, a gateway trace of the machine is generated (as `gen-trace
    --gateway-config`). Prints agreement per packet class and the first differences.
    """
    try:
        cfg = load_config(config)
        index = machine_index(cfg, machine) if machine is not None else 0
        if twin:
            cfg = round_robin_twin(cfg)
        rules = ruleset.read_text(encoding="utf-8") if ruleset is not None else None
        result = verify(cfg, index, trace, flows=flows, seed=seed, ruleset=rules)
    except (ConfigError, RenderError, TraceError, ReplayError, RouterError, ValueError) as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"{e.filename or 'verify'}: {e.strerror or e}") from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print(result, twin and bool(maglev_pools(load_config(config).machines[index])))
    if not result.agreed:
        raise click.exceptions.Exit(1)


def _print(r: Verification, twin: bool) -> None:
    console = Console()
    title = f"machine {r.machine}: {r.trace}" + (" (Maglev pools as round robin)" if twin else "")
    table = Table(title=title, title_justify="left")
    for name in ("class", "packets", "agree", "differ", "forwarded"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for cls, (agree, differ, fwd) in sorted(r.classes.items()):
        style = "red" if differ else None
        table.add_row(cls, f"{agree + differ:,}", f"{agree:,}", f"{differ:,}", f"{fwd:,}",
                      style=style)
    console.print(table)
    for why, n in sorted(r.skipped.items()):
        console.print(f"not compared: {n:,} packets ({why})")
    if r.filled:
        console.print(f"zero-filled: {r.filled:,} truncated captures sent at their length on the "
                      "wire (verdict and 5-tuple compared, transport bytes not)")
    for note in r.notes:
        console.print(f"note: {note}")
    for d in r.differences:
        console.print(d.text(), markup=False, highlight=False, soft_wrap=True)
    share = (r.compared - r.differing) / r.compared if r.compared else 1.0
    verdict = "[green]agree[/]" if r.agreed else "[red]differ[/]"
    console.print(f"{verdict}: {r.compared - r.differing:,} of {r.compared:,} packets alike "
                  f"({share:.2%})")
