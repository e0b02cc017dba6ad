#!/usr/bin/env bash
# Install everything the tests need (apt + pip, from scratch), then lint and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# apt packages the tests need, installed only when missing: tshark (capture checks); iproute2,
# nftables, conntrack, tcpdump, ethtool, iputils-ping (Linux routers and live hosts in
# namespaces); clang, llvm, libbpf-dev, bpftool (the eBPF datapath's build)
need=()
for t in tshark:tshark ip:iproute2 nft:nftables conntrack:conntrack tcpdump:tcpdump \
         ethtool:ethtool ping:iputils-ping clang:clang llvm-objdump:llvm bpftool:bpftool; do
    command -v "${t%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${t%%:*}" ] || need+=("${t#*:}")
done
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check src tests bench fuzz
.venv/bin/mypy  # [tool.mypy] in pyproject.toml: strict but for the modules listed there
.venv/bin/python -m pytest -p no:cacheprovider "$@"
