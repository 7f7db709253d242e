#!/usr/bin/env bash
# Profiles a local 3-node cluster under load: where the servers' CPU goes, by component, and
# a flamegraph. Servers run on CPU 1 and the load generator on CPU 0, as in bench/compare.py.
# Usage: bench/profile.sh LEVEL TEST [PIPELINE] [SECONDS]
#   LEVEL: eventual | at_least:2 | quorum | all     TEST: set | get
#   CLUSTER=1 bench/profile.sh ...: resp.redirect on and redis-benchmark --cluster, so each
#   request goes to its partition's leader (no forwarding hop).
# Writes target/profile/<level>-<test>-P<pipeline>.{perf.data,txt,svg} and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
LEVEL=${1:?LEVEL}; TEST=${2:?TEST}; P=${3:-1}; SECS=${4:-8}
CLUSTER=${CLUSTER:-0}
OUT=target/profile; NAME="${LEVEL//:/-}-$TEST-P$P$([ "$CLUSTER" = 1 ] && echo -cluster || true)"; DIR=$(mktemp -d)
for tool in perf:linux-perf redis-benchmark:redis-tools taskset:util-linux; do
  command -v "${tool%%:*}" >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool#*:}" >/dev/null
  }
done
command -v inferno-flamegraph >/dev/null || cargo install -q inferno
cargo build --release -q -p replikv
mkdir -p "$OUT"
PEERS=1=127.0.0.1:27202,2=127.0.0.1:27203,3=127.0.0.1:27204
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
printf 'resp:\n  redirect: %s\n' "$([ "$CLUSTER" = 1 ] && echo true || echo false)" >"$DIR/replikv.yaml"
cluster_flag=(); [ "$CLUSTER" = 1 ] && cluster_flag=(--cluster)
for i in 1 2 3; do
  REPLIKV_LOG=warn taskset -c 1 target/release/replikv server --node-id $i --peers $PEERS \
    --data-dir "$DIR/n$i" --resp-listen 127.0.0.1:$((27000 + i)) \
    --http-listen 127.0.0.1:$((27100 + i)) --peer-listen 127.0.0.1:$((27201 + i)) \
    --consistency "$LEVEL" --config "$DIR/replikv.yaml" >"$DIR/n$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do until curl -sf "http://127.0.0.1:$((27100 + i))/ready" >/dev/null; do sleep 0.1; done; done
# Values to read, then the measured load.
taskset -c 0 target/release/replikv bench --addr 127.0.0.1:27001 --workload set --sequential \
  --keys 100000 --requests 100000 --clients 32 --pipeline 16 >/dev/null
taskset -c 0 redis-benchmark -p 27001 -t "$TEST" -n 100000000 -c 50 -P "$P" -r 100000 -d 100 -q \
  "${cluster_flag[@]}" >/dev/null 2>&1 &
load=$!
sleep 2
perf record -q -F 999 -g --call-graph dwarf,16384 -p "$(IFS=,; echo "${pids[*]}")" \
  -o "$OUT/$NAME.perf.data" -- sleep "$SECS" 2>/dev/null
kill $load 2>/dev/null || true
perf script -i "$OUT/$NAME.perf.data" 2>/dev/null >"$DIR/script.txt"
inferno-collapse-perf <"$DIR/script.txt" | inferno-flamegraph >"$OUT/$NAME.svg"
python3 - "$DIR/script.txt" <<'PY' | tee "$OUT/$NAME.txt"
import collections, sys
samples, cur = [], []
for line in open(sys.argv[1]):
    if not line.strip():
        if cur:
            samples.append(cur)
        cur = []
    else:
        cur.append(line)
if cur:
    samples.append(cur)
has = lambda s, p: any(p in l for l in s)
storage = lambda s: s[0].startswith("replikv-storage")
log_writer = lambda s: s[0].startswith("replikv-log-wri")
# First match wins; each sample counts once.
rules = [
    ("Raft log: fdatasync of a batch", lambda s: log_writer(s) and (has(s, "sync_data") or has(s, "fdatasync"))),
    ("Raft log: write() of a batch", lambda s: log_writer(s) and has(s, "pwrite")),
    ("Raft log: encoding, checksums, index", log_writer),
    ("state: durable commit (redb; snapshots)", lambda s: storage(s) and has(s, "durable_commit") and not has(s, "non_durable_commit")),
    ("state: commit without fsync (redb)", lambda s: storage(s) and has(s, "non_durable_commit")),
    ("state: commit bookkeeping (redb)", lambda s: storage(s) and has(s, "commit_with")),
    ("state: checkpoints of applied writes (redb inserts)", lambda s: storage(s) and has(s, "state_machine")),
    ("state: other", storage),
    ("state: applying writes (into the overlay)", lambda s: has(s, "replikv_raft::state_machine") or has(s, "replikv_raft::overlay")),
    ("read index (openraft ensure_linearizable)", lambda s: has(s, "ensure_linearizable") or has(s, "read_rounds")),
    ("peer transport (frames, sockets)", lambda s: has(s, "replikv_cluster::transport") or has(s, "replikv_cluster::frame")),
    ("RESP connections and commands", lambda s: has(s, "replikv_resp")),
    ("openraft core and replication", lambda s: has(s, "openraft")),
    ("reads from the state machine (redb)", lambda s: has(s, "KvView")),
    ("other (tokio, kernel)", lambda s: True),
]
counts = collections.Counter()
for s in samples:
    counts[next(name for name, f in rules if f(s))] += 1
print(f"| share of server CPU | component |\n|---:|---|")
for name, n in counts.most_common():
    print(f"| {100 * n / len(samples):.1f} % | {name} |")
print(f"\n{len(samples)} samples")
PY
echo "flamegraph: $OUT/$NAME.svg"
