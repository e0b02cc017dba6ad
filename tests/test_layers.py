"""The import layers of flowshift, bottom to top, and no import cycles.

Every module of src/flowshift belongs to one layer (LAYERS: the longest matching module prefix
wins). A module may import its own layer and the layers below, never one above; and no chain
of imports leads back to where it started. Imports at module level and inside functions both
count; imports under `if TYPE_CHECKING:` do not (they never run).

To place a new module, add its name (or its package's) to LAYERS. KNOWN_VIOLATIONS lists the
upward imports that a change under way removes; delete a line when its import is gone (the
test says so).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "flowshift"

# bottom to top; a module imports only from its layer and those before it
LAYERS: dict[str, tuple[str, ...]] = {
    # and the kernels' compiler settings, cache and loads/stores, which every compiled module
    # uses (the packet reader's too) and which import only the package's version; and the
    # with-block of everything that closes (the trace readers and writers among them)
    "flow": ("flowshift", "flowshift.flow", "flowshift.verdict", "flowshift.tiers._pnic_mem",
             "flowshift.tiers._pnic_cache", "flowshift.closing"),
    "packet": ("flowshift.packet",),
    "entry": ("flowshift.entry", "flowshift.conntrack_types", "flowshift.results"),
    "config": ("flowshift.config",),
    "services": ("flowshift.services", "flowshift.channel"),
    # the policy and the handoff queue, and the counters the tiers keep: the VNIC uses them
    "offload": ("flowshift.offload", "flowshift.stats"),
    "tiers": ("flowshift.tiers",),
    "host": ("flowshift.host",),
    # the report is built from the replay's counters by the replay: it sits below it
    "report": ("flowshift.report", "flowshift.plot"),
    "replay": ("flowshift.replay", "flowshift._verdict_rows", "flowshift._codes",
               "flowshift.output", "flowshift.gen",
               "flowshift.gen_gateway"),
    # scale-out: shards of one replay, sweeps of many, on processes or a Dask cluster
    "scale": ("flowshift.shard", "flowshift.shard_ring", "flowshift.shard_merge",
              "flowshift.shard_replay", "flowshift.sweep", "flowshift.cluster"),
    # Linux itself: the config as nftables, a Linux router checked against the replay
    "linux": ("flowshift.nft", "flowshift.linux"),
    # the live runtime: namespaces, the VNIC daemon, the eBPF datapath
    "live": ("flowshift.live",),
    "commands": ("flowshift.commands", "flowshift.cli", "flowshift.__main__"),
}

# (importer, imported): upward imports that a change under way removes
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if prefix == "flowshift" and module != "flowshift":
                    continue  # the package root alone, not everything under it
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), layer)
    return best[1] if best else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node`, except the bodies of `if TYPE_CHECKING:` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield child
        yield from _runtime_nodes(child)


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The flowshift modules that `module` imports when it runs."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "flowshift")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "flowshift":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) & known for m, p in mods.items()}


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, (
        f"modules in no layer: {', '.join(missing)}; add each (or its package) to LAYERS in "
        "tests/test_layers.py"
    )


def test_no_module_imports_a_higher_layer() -> None:
    order = list(LAYERS)
    bad = []
    for importer, targets in sorted(graph().items()):
        mine = layer_of(importer)
        if mine is None:
            continue  # reported by test_every_module_has_a_layer
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs is None or order.index(theirs) <= order.index(mine):
                continue
            if (importer, target) not in KNOWN_VIOLATIONS:
                bad.append(f"{importer} ({mine}) imports {target} ({theirs})")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_known_violations_still_exist() -> None:
    g = graph()
    gone = sorted(f"{a} -> {b}" for a, b in KNOWN_VIOLATIONS if b not in g.get(a, set()))
    assert not gone, f"no longer imported, delete from KNOWN_VIOLATIONS: {', '.join(gone)}"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    g = graph()
    for importer, target in KNOWN_VIOLATIONS:  # their cycles go when they go
        g.get(importer, set()).discard(target)
    found = cycles(g)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_what_it_must(tmp_path: Path) -> None:
    """Function-level imports count, TYPE_CHECKING ones do not; cycles are found."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from flowshift.host import Host\n"
        "def f():\n    from flowshift.replay import run_replay\n"
        "from flowshift import channel\n"
    )
    got = imports("flowshift.m", src, {"flowshift.channel"})
    assert got == {"flowshift.replay", "flowshift.channel"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("flowshift.tiers.vnic") == "tiers"
    assert layer_of("flowshift.unplaced") is None
