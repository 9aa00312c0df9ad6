#!/bin/bash
# The cost of the metrics (issue 11): e2e and acceptance with [admin] on and off, in
# interleaved pairs (order alternating).
#
#   unshare --net bench/metrics_cost.sh OUTDIR [PAIRS] [MESSAGES]
#
# Run inside a private network namespace (it brings lo up; loopback only).  "off" adds
# [admin] enabled = false (no admin child, no /metrics, and no child pushes its
# snapshots); "on" is the default.  Each run is bench/load.py --runs 1 --targets mta;
# OUTDIR gets every run's output.  Bounded by load.py's own timeouts.
set -u
OUT=${1:?usage: bench/metrics_cost.sh OUTDIR [PAIRS] [MESSAGES]}
PAIRS=${2:-3}
N=${3:-20000}
cd "$(dirname "$0")/.."
. bench/python.sh   # PY
mkdir -p "$OUT"
ip link set lo up
OFF=$'[admin]\nenabled = false'
for mode in e2e accept; do
  flag=()
  [ "$mode" = e2e ] && flag=(--e2e)
  for round in $(seq 1 "$PAIRS"); do
    if [ $((round % 2)) = 1 ]; then order="on off"; else order="off on"; fi
    for kind in $order; do
      extra=()
      [ "$kind" = off ] && extra=(--mta-config-extra "$OFF")
      "$PY" bench/load.py "${flag[@]}" --netns no --targets mta --messages "$N" --runs 1 \
          "${extra[@]}" > "$OUT/$mode-$kind-$round.txt" 2>&1
      echo "$mode $kind $round: $(grep 'run 1:' "$OUT/$mode-$kind-$round.txt" | \
          grep -o '[0-9,]* msgs/s\|tree [0-9.]* ms\|background [0-9.]* cores' | tr '\n' ' ')"
    done
  done
done
