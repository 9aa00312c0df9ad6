#!/usr/bin/env bash
# Long fuzz campaigns, one process per target, at the lowest CPU priority, each bounded
# in inputs (RUNS, default 10 million) and in time (SECONDS_EACH, default 4 hours).
# Usage: fuzz/campaign.sh OUTDIR [TARGET ...]   (default: every target)
# Each target logs to OUTDIR/TARGET.log, keeps its corpus in fuzz/corpus/TARGET and
# saves failing inputs in OUTDIR/TARGET/; python -m fuzz.summary OUTDIR prints the counts.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: fuzz/campaign.sh OUTDIR [TARGET ...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(scanner record mime_headers mime_canon smtp_session http_api bus_stream)
fi
runs=${RUNS:-10000000}
secs=${SECONDS_EACH:-14400}
mkdir -p "$out"
pids=()
for t in "${targets[@]}"; do
    mkdir -p "$out/$t"
    nice -n 19 python3 -m fuzz "$t" -runs="$runs" -max_total_time="$secs" -timeout=30 \
        -seed=${SEED:-1} -print_final_stats=1 -artifact_prefix="$out/$t/" \
        "fuzz/corpus/$t" >"$out/$t.log" 2>&1 &
    pids+=($!)
    echo "$t: pid $!"
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
