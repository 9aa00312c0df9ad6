#!/bin/bash
# The e2e rate with and without a live webhook, interleaved pairs (issue 14).
#
#   unshare --net bench/webhook_e2e.sh OUTDIR [PAIRS] [MESSAGES]
#
# Run inside a private network namespace (it brings lo up; loopback only): a webhook
# receiver (bench/webhook_sink.py, 127.0.0.1:18090) and bench/load.py --netns no, PAIRS
# pairs (default 3) of MESSAGES messages (default 30,000) with 2 recipients each (4 events
# per message), order alternating.  OUTDIR gets each run's load.py output and JSON and the
# receiver's counts before and after each live run.  Bounded: every run by load.py's own
# timeouts, the receiver by --seconds.
set -u
OUT=${1:?usage: bench/webhook_e2e.sh OUTDIR [PAIRS] [MESSAGES]}
PAIRS=${2:-3}
N=${3:-30000}
cd "$(dirname "$0")/.."
. bench/python.sh   # PY
mkdir -p "$OUT"
ip link set lo up
"$PY" bench/webhook_sink.py --port 18090 --out "$OUT/counts.json" --seconds 3600 &
SINK=$!
trap 'kill $SINK 2>/dev/null' EXIT
sleep 1
HOOK=$'[[webhook]]\nname = "live"\ntarget = "http://127.0.0.1:18090/hook"\nevents = ["injection", "delivery", "delay", "bounce"]'
for round in $(seq 1 "$PAIRS"); do
  if [ $((round % 2)) = 1 ]; then order="none live"; else order="live none"; fi
  for kind in $order; do
    cp "$OUT/counts.json" "$OUT/counts-before-$kind-$round.json"
    extra=()
    [ "$kind" = live ] && extra=(--mta-config-extra "$HOOK")
    "$PY" bench/load.py --e2e --netns no --targets mta --messages "$N" --rcpts 2 --runs 1 \
        --json "$OUT/$kind-$round.json" "${extra[@]}" > "$OUT/$kind-$round.txt" 2>&1
    cp "$OUT/counts.json" "$OUT/counts-after-$kind-$round.json"
    echo "$kind $round: $(grep 'run 1:' "$OUT/$kind-$round.txt" | grep -o '[0-9,]* msgs/s')"
  done
done
