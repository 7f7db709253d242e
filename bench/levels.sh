#!/usr/bin/env bash
# SET/GET throughput and latency per write consistency level, with redis-benchmark against a
# local 3-node cluster (every client on node 1, which forwards 2/3 of the keys).
# Usage: bench/levels.sh   (N=requests C=clients D=value bytes)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
trap stop_cluster EXIT
N=${N:-100000} C=${C:-50} D=${D:-100}
build
machine_facts
echo "level,pipeline,test,rps,avg_ms,p50_ms,p99_ms"
for level in eventual at_least:2 quorum all; do
  for P in 1 16; do
    REPLIKV_CONSISTENCY=$level start_cluster /tmp/replikv-bench-levels
    if ! redis-benchmark -p "$BASE" -t set,get -n "$N" -c "$C" -P "$P" -r 100000 -d "$D" --csv 2>/tmp/replikv-bench-err |
      tail -n +2 | tr -d '"' | awk -F, -v l="$level" -v p="$P" '{print l "," p "," $1 "," $2 "," $3 "," $5 "," $7}'; then
      echo "$level,$P,failed: $(grep -v WARNING /tmp/replikv-bench-err | head -1)"
    fi
    stop_cluster
  done
done
