#!/usr/bin/env bash
# Install everything the tests need (apt + pip, from scratch), then lint and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v tshark >/dev/null 2>&1 || missing+=(tshark)
command -v nft >/dev/null 2>&1 || missing+=(nftables)  # flowshift nft / verify tests
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -p no:cacheprovider "$@"
