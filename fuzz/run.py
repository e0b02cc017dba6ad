"""Run one fuzz target: `python -m fuzz.run TARGET [libFuzzer options...]`.

With atheris installed this is a coverage-guided libFuzzer run over the seeds of
fuzz/seeds.py (written to a temporary corpus directory; new inputs go there too), e.g.
`python -m fuzz.run parse -runs=1000000`. Without atheris, or with FUZZ_ENGINE=mutate, it
runs the mutation fuzzer of fuzz/mutate.py for `-runs=N` inputs (default 100,000), which
keeps every seed in play. See docs/fuzzing.md.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path


def _numba_modules() -> list[str]:
    import flowshift

    root = Path(flowshift.__file__).parent
    return [
        ".".join(("flowshift", *p.relative_to(root).with_suffix("").parts))
        for p in sorted(root.rglob("*.py"))
        if re.search(r"^(import numba|from numba|from flowshift\.tiers\._pnic_mem import)",
                     p.read_text(encoding="utf-8"), re.M)
    ]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("parse", "trace", "channel", "entry", "config"):
        print("usage: python -m fuzz.run parse|trace|channel|entry|config [-runs=N ...]",
              file=sys.stderr)
        return 2
    name, options = argv[1], argv[2:]
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is None or os.environ.get("FUZZ_ENGINE") == "mutate":
        from fuzz.mutate import run
        from fuzz.seeds import seeds
        from fuzz.targets import TARGETS

        runs = next((int(o.split("=", 1)[1]) for o in options if o.startswith("-runs=")),
                    100_000)
        n = run(name, TARGETS[name], seeds(name), runs)
        print(f"Done {n} runs (the mutation fuzzer of fuzz/mutate.py)")
        return 0
    # coverage of flowshift only, and not of its numba modules: numba cannot compile
    # instrumented bytecode
    with atheris.instrument_imports(include=["flowshift"], exclude=_numba_modules()):
        from fuzz.targets import TARGETS
    from fuzz.seeds import write_seeds

    # the seeds, and the inputs libFuzzer adds: FUZZ_CORPUS, else a fresh temporary directory
    # (kept afterwards, to start a later run from)
    given = os.environ.get("FUZZ_CORPUS")
    corpus = Path(given) if given else Path(tempfile.mkdtemp(prefix=f"fs-fuzz-{name}-"))
    count = write_seeds(name, corpus)
    print(f"{name}: {count} seeds in {corpus}", file=sys.stderr)
    atheris.Setup([argv[0], *options, str(corpus)], TARGETS[name])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
