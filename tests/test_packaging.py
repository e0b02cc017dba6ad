"""Packaging: the licence as an SPDX expression (no setuptools deprecation banner on every
install), the dependencies' lower bounds, `python -m flowshift`."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_is_an_spdx_expression() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    [setuptools] = [r for r in PYPROJECT["build-system"]["requires"] if "setuptools" in r]
    bound = re.fullmatch(r"setuptools>=(\d+).*", setuptools)
    assert bound is not None and int(bound[1]) >= 77  # the first to read an SPDX string
    assert importlib.metadata.metadata("flowshift")["License-Expression"] == "Apache-2.0"


def test_every_dependency_has_a_lower_bound() -> None:
    project = PYPROJECT["project"]
    for req in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        assert ">=" in req, f"{req} has no lower bound"
    assert any(r.startswith("mypy>=") for r in project["optional-dependencies"]["test"])
