#!/usr/bin/env bash
# The window in which writes fail after kill -9 of a partition leader under load.
# Load: replikv bench, 16 clients of quorum SETs on a node that survives.
# Usage: bench/failover.sh   (RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
trap stop_cluster EXIT
RUNS=${RUNS:-3}
build
machine_facts
echo "run,victim,errors,error_window_ms,longest_write_ms,ops_per_sec"
for run in $(seq 1 "$RUNS"); do
  start_cluster /tmp/replikv-bench-failover
  victim=$(leader_of 0)
  survivor=$(( victim % 3 + 1 ))
  "$BIN" bench --addr "127.0.0.1:$((BASE + survivor - 1))" --workload set --clients 16 \
    --requests 100000000 --duration-secs 8 --consistency quorum --json > /tmp/replikv-failover.json &
  bench=$!
  sleep 3
  pkill -9 -f -- "--node-id $victim --peers" || true
  wait "$bench"
  python3 - "$run" "$victim" <<'PY'
import json, sys
r = json.load(open("/tmp/replikv-failover.json"))
a, b = r["first_error_ms"], r["last_error_ms"]
w = (b - a) if a is not None else 0
# Writes to the dead leader's partitions wait for the new leader instead of failing, so the
# unavailability shows as the longest write.
print(f"{sys.argv[1]},{sys.argv[2]},{r['errors']},{w},{r['max_us'] / 1000:.0f},{r['ops_per_sec']:.0f}")
PY
  stop_cluster
done
