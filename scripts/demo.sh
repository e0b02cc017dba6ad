#!/usr/bin/env bash
# Install flowshift into a fresh virtual environment and run the embedded demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
.venv/bin/flowshift demo "$@"
