#!/usr/bin/env bash
# Install everything the tests need (apt + pip, from scratch), then lint and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v tshark >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq tshark >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check src tests bench fuzz
.venv/bin/mypy  # [tool.mypy] in pyproject.toml: strict but for the modules listed there
.venv/bin/python -m pytest -p no:cacheprovider "$@"
