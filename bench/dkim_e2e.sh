#!/bin/bash
# Realistic messages (issue 15, item 5): end to end with DKIM RSA-2048 signing off and on,
# at 2 KB and 100 KB, side by side with Postfix, in interleaved rounds.
#
#   unshare --net bench/dkim_e2e.sh OUTDIR [ROUNDS] [MESSAGES_2K] [MESSAGES_100K] [PACED]
#
# Run inside a private network namespace (it brings lo up; loopback only).  Each round,
# per size: bench/load.py --e2e --runs 1 --targets mta,postfix with signing off (the
# mta's and Postfix's rate, same run), then --targets mta with [dkim] signing every
# message (a key for the From domain: one RSA-2048 signature per message, in the acceptor);
# the order of "off" and "on" alternates by round.  The bare RSA-2048 sign operation is
# timed by `openssl speed` before and after.  OUTDIR gets every run's output; the last
# lines printed (OUTDIR/summary.txt) give per run each target's msgs/s end to end and
# its process tree's CPU per message.  Bounded by load.py's own timeouts.
#
# At full speed the two are compared at different rates (signing halves the rate), so
# fewer messages share each group commit, wake-up and delivery batch with signing on.
# PACED (default 500; 0 skips) adds, per round, 2 KB runs of the mta alone with signing off
# and on at one offered rate: PACED smtp-source sessions each pausing a random 0-2 s after
# every message (load.py --random-wait 2; a fixed pause would make them send in step, in
# waves), about PACED msgs/s for both, below either's maximum.  The difference in tree CPU
# per message there is what signing itself adds.
set -u
OUT=${1:?usage: bench/dkim_e2e.sh OUTDIR [ROUNDS] [MESSAGES_2K] [MESSAGES_100K]}
ROUNDS=${2:-3}
N2=${3:-20000}
N100=${4:-5000}
PACED=${5:-500}
cd "$(dirname "$0")/.."
. bench/python.sh   # PY
mkdir -p "$OUT"
ip link set lo up
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # PACED sessions: a descriptor each, both ends
KEY="$OUT/dkim-rsa2048.pem"
[ -f "$KEY" ] || openssl genrsa -out "$KEY" 2048 2>/dev/null
# load.py's sender is sender@example.com (smtp-source writes it in From:): that domain's key
ON=$'[dkim]\nenabled = true\n[[dkim.keys]]\ndomain = "example.com"\nselector = "s2048"\nkey_file = "'"$KEY"$'"'
rsa() { openssl speed -seconds 3 rsa2048 2>/dev/null | awk '/^rsa 2048 bits/ {print "bare RSA-2048 sign " $4 " (" $6 " signs/s)"}'; }
echo "before: $(rsa)" | tee "$OUT/rsa.txt"
# "mta 1,234 msgs/s tree 0.456 ms" per target, from load.py's per-run lines
figures() { sed -n 's/^ *\([a-z-]*\) *run 1: *\([0-9,]*\) msgs\/s.* tree \([0-9.]*\) ms.*/\1 \2 msgs\/s tree \3 ms;/p' "$1" | tr '\n' ' '; }
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="off on"; else order="on off"; fi
  for size in 2048 102400; do
    n=$N2; [ "$size" = 102400 ] && n=$N100
    for kind in $order; do
      f="$OUT/$size-$kind-$round.txt"
      if [ "$kind" = off ]; then
        "$PY" bench/load.py --e2e --netns no --targets mta,postfix --size "$size" \
            --messages "$n" --runs 1 > "$f" 2>&1
      else
        "$PY" bench/load.py --e2e --netns no --targets mta --size "$size" \
            --messages "$n" --runs 1 --mta-config-extra "$ON" > "$f" 2>&1
      fi
      echo "size $size dkim $kind round $round: $(figures "$f")"
    done
  done
  [ "$PACED" -gt 0 ] || continue
  for kind in $order; do
    f="$OUT/paced-2048-$kind-$round.txt"
    # every session from 127.0.0.1: lift the per-IP limit (200 per acceptor by default)
    extra=$'[smtp]\nmax_connections_per_ip = 100000\nmax_connections = 100000'
    [ "$kind" = on ] && extra="$extra"$'\n'"$ON"
    "$PY" bench/load.py --e2e --netns no --targets mta --size 2048 --sessions "$PACED" \
        --random-wait 2 --messages "$N2" --warmup "$PACED" --runs 1 --mta-config-extra "$extra" \
        > "$f" 2>&1
    echo "paced ~$PACED msgs/s size 2048 dkim $kind round $round: $(figures "$f")"
  done
done | tee "$OUT/summary.txt"
echo "after: $(rsa)" | tee -a "$OUT/rsa.txt"
