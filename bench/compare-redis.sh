#!/usr/bin/env bash
# replikv beside Redis on the same machine, same shape and same load: a Redis primary with
# two replicas against a 3-node replikv cluster at `eventual` (the level that, like Redis's
# asynchronous replication, acknowledges before replicas hold the write). redis-benchmark
# drives both with the same parameters, every client on one node. Prints a table with the
# ratio replikv ÷ Redis. Usage: bench/compare-redis.sh   (N=requests C=clients)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
trap 'stop_cluster; stop_redis' EXIT
N=${N:-50000} C=${C:-50}
RPORT=${RPORT:-26390}
build
command -v redis-server >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}
machine_facts
echo "redis: $(redis-server --version | awk '{print $3}')"

REDIS_PIDS=()
stop_redis() { for p in "${REDIS_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
start_redis() {
  local dir; dir=$(mktemp -d)
  for i in 0 1 2; do
    local port=$((RPORT + i)) extra=()
    [ "$i" -gt 0 ] && extra=(--replicaof 127.0.0.1 "$RPORT")
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
      --daemonize no "${extra[@]}" >/dev/null 2>&1 &
    REDIS_PIDS+=($!)
  done
  until [ "$(redis-cli -p "$RPORT" info replication | grep -c 'state=online')" = 2 ]; do sleep 0.1; done
}

run() { # system port pipeline -> lines "system,pipeline,test,rps,p50,p99"
  redis-benchmark -p "$2" -t set,get -n "$N" -c "$C" -P "$3" -r 100000 -d 100 --csv 2>/dev/null |
    tail -n +2 | tr -d '"' | awk -F, -v s="$1" -v p="$3" '{print s "," p "," $1 "," $2 "," $5 "," $7}'
}

results=$(mktemp)
start_redis
for P in 1 16; do run redis "$RPORT" "$P" >> "$results"; done
stop_redis
REPLIKV_CONSISTENCY=eventual start_cluster /tmp/replikv-bench-compare
for P in 1 16; do run replikv "$BASE" "$P" >> "$results"; done
stop_cluster

python3 - "$results" <<'PY'
import sys, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    system, p, test, rps, p50, p99 = line.strip().split(",")
    rows[(test, p)][system] = (float(rps), float(p50), float(p99))
print("| test | pipeline | Redis ops/s | replikv ops/s | ratio | Redis p50/p99 ms | replikv p50/p99 ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
for (test, p), s in sorted(rows.items()):
    r, k = s.get("redis"), s.get("replikv")
    if not r or not k:
        continue
    print(f"| {test} | {p} | {r[0]:,.0f} | {k[0]:,.0f} | {k[0]/r[0]:.2f} | {r[1]:.2f}/{r[2]:.2f} | {k[1]:.2f}/{k[2]:.2f} |")
PY
