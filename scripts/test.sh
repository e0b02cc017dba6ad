#!/usr/bin/env bash
# Install everything the tests need (apt + pip, from scratch), then lint and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# apt packages the tests need, installed only when missing: tshark (capture checks); clang,
# llvm, libbpf-dev, bpftool (the eBPF datapath's build); iproute2 (namespaces for live tests)
need=()
command -v tshark >/dev/null 2>&1 || need+=(tshark)
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v llvm-objdump >/dev/null 2>&1 || need+=(llvm)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v bpftool >/dev/null 2>&1 || [ -x /usr/sbin/bpftool ] || need+=(bpftool)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -p no:cacheprovider "$@"
