#!/usr/bin/env bash
# Catch-up rate: a follower is stopped, the cluster takes N quorum writes, the follower is
# restarted, and the time until every partition it hosts has applied the leaders' offsets
# gives the rate in entries per second. With the default backlog the writes exceed it, so
# the follower gets snapshots (full sync) then the log.
# Usage: bench/catchup.sh   (N=200000)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
trap stop_cluster EXIT
N=${N:-200000}
build
machine_facts
start_cluster /tmp/replikv-bench-catchup
# Node 3 stops; node 1 and 2 keep a majority.
args=$(ps -o args= -p "$(pgrep -f -- '--node-id 3 --peers')")
pkill -9 -f -- "--node-id 3 --peers"
"$BIN" bench --addr "127.0.0.1:$BASE" --workload set --clients 32 --pipeline 16 --requests "$N" --keys "$N" --consistency quorum
# Entries node 3 lacks, summed over the partitions' leaders (nodes 1 and 2).
behind=$(for i in 0 1; do curl -s "http://127.0.0.1:$((BASE + 2000 + i))/v1/_replication/state"; echo; done | python3 -c "
import json,sys
print(sum(r['lag_ops'] or 0 for line in sys.stdin if line.strip() for p in json.loads(line)['partitions'] for r in p['replicas'] if r['node_id']==3))")
start=$(date +%s.%N)
$args >/dev/null 2>/tmp/replikv-catchup-node3.log &
node3=$!
until curl -sf "http://127.0.0.1:$((BASE + 2002))/health" >/dev/null; do sleep 0.05; done
python3 - "$BASE" <<'PY'
import json, sys, time, urllib.request
base = int(sys.argv[1])
def state(i):
    return json.load(urllib.request.urlopen(f"http://127.0.0.1:{base + 2000 + i}/v1/_replication/state"))
while True:
    leaders = {}
    for i in (0, 1):
        for p in state(i)["partitions"]:
            if p["role"] == "leader":
                leaders[p["partition"]] = p["last_offset"]
    mine = {p["partition"]: p["applied_offset"] for p in state(2)["partitions"]}
    if leaders and all(mine.get(p, 0) >= off for p, off in leaders.items()):
        break
    time.sleep(0.05)
PY
end=$(date +%s.%N)
python3 -c "t=$end-$start; print(f'node 3 caught up on {$behind} entries in {t:.2f} s = {$behind/t:.0f} entries/s')"
kill "$node3" 2>/dev/null || true
stop_cluster
