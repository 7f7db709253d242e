# Shared helpers for the benchmark scripts: start and stop a local release-build cluster.
# Sourced, not run. Every cluster listens on loopback only.
BIN=${BIN:-target/release/replikv}
BASE=${BASE:-26380}

build() {
  cargo build --release -q
  command -v redis-benchmark >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools >/dev/null
  }
}

# start_cluster DIR [extra env assignments are inherited]; sets CLUSTER_PID
start_cluster() {
  local dir=$1
  rm -rf "$dir"
  "$BIN" cluster --nodes 3 --base-port "$BASE" --data-dir "$dir" >/dev/null 2>"$dir.log" &
  CLUSTER_PID=$!
  for i in 0 1 2; do
    until curl -sf "http://127.0.0.1:$((BASE + 2000 + i))/ready" >/dev/null; do sleep 0.1; done
  done
  # Let the preferred leaders settle before measuring.
  sleep 2
}

stop_cluster() {
  [ -n "${CLUSTER_PID:-}" ] || return 0
  kill "$CLUSTER_PID" 2>/dev/null || true
  wait "$CLUSTER_PID" 2>/dev/null || true
  CLUSTER_PID=
}

# leader_of PARTITION: node id of the partition's leader, as node 1 sees it
leader_of() {
  curl -s "http://127.0.0.1:$((BASE + 2000))/v1/_replication/state" |
    python3 -c "import json,sys; print([p['leader'] for p in json.load(sys.stdin)['partitions'] if p['partition']==$1][0])"
}

machine_facts() {
  echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr), $(df -T . | awk 'NR==2{print $2}') filesystem"
  echo "replikv: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), release build"
}
