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
# tests/test_linux_cases_live.py re-captures Linux cases: namespaces, nftables, tcpdump
missing=()
for t in ip:iproute2 nft:nftables tcpdump:tcpdump conntrack:conntrack ethtool:ethtool \
         ping:iputils-ping; do
    command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
if [ "$(id -u)" = 0 ] && [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -p no:cacheprovider "$@"
