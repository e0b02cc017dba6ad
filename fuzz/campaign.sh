#!/usr/bin/env bash
# The long fuzz campaign (docs/fuzzing.md): RUNS inputs per target, one target after the
# other on one core at low priority, a log per target in LOGDIR.
# usage: bash fuzz/campaign.sh [LOGDIR] [RUNS] [TARGET...]
# FUZZ_OPTIONS: more libFuzzer options for every target (e.g. -max_len=4096)
set -uo pipefail
cd "$(dirname "$0")/.."
logdir=${1:-fuzz-logs}
runs=${2:-1000000}
shift 2 2>/dev/null || shift $#
targets=("${@:-parse trace channel entry config}")
read -r -a targets <<< "${targets[*]}"
core=$(( $(nproc) - 1 ))
mkdir -p "$logdir"
for t in "${targets[@]}"; do
    start=$(date +%s)
    taskset -c "$core" nice -n 10 .venv/bin/python -m fuzz.run "$t" -runs="$runs" \
        -print_final_stats=1 -artifact_prefix="$logdir/$t-" ${FUZZ_OPTIONS:-} \
        >"$logdir/$t.log" 2>&1
    status=$?
    echo "$t exit=$status seconds=$(( $(date +%s) - start ))" >>"$logdir/summary.txt"
done
