"""Every `flowshift ...` command shown in README.md and docs/*.md fenced blocks names a real
subcommand and real options, and every file it names in the repository exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowshift.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
REPO_PATH = re.compile(r"^(examples|docs|scripts|src|bench|fuzz|\.\./shared)/")


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments after `flowshift`) of each command line in a fenced block."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            line_no = text[: block.start()].count("\n") + 2
            joined = re.sub(r"\\\n\s*", " ", block.group(1))  # continuation lines
            for line in joined.splitlines():
                line = line.strip().removeprefix("$ ")
                if not line.startswith("flowshift "):
                    continue
                words = shlex.split(line, comments=True)
                if len(words) > 1 and (words[1] in COMMANDS or words[1].startswith("-")):
                    found.append((f"{doc.relative_to(ROOT)}:{line_no}", words[1:]))
    return found


COMMANDS_SHOWN = shown_commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS_SHOWN) >= 10
    assert {args[0] for _, args in COMMANDS_SHOWN} >= {"demo", "replay", "gen-trace"}


@pytest.mark.parametrize(("where", "args"), COMMANDS_SHOWN, ids=[w for w, _ in COMMANDS_SHOWN])
def test_shown_command_parses_and_its_files_exist(where: str, args: list[str]) -> None:
    missing = [a for a in args if REPO_PATH.match(a) and not (ROOT / a).exists()]
    assert not missing, f"{where}: names files that do not exist: {missing}"
    # --help is handled after the options are recognized: an unknown option or command fails
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, f"{where}: flowshift {' '.join(args)}: {result.output}"
