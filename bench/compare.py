#!/usr/bin/env python3
"""replikv side by side with Redis and etcd, on this machine, in one run.

Each system runs in the same shape on loopback: replikv as 3 nodes (factor 3), Redis as a
primary with 2 replicas, etcd as 3 members. The same workloads run against each, several
times after a warm-up; the table gives the median with the spread (min-max) of throughput,
p50 and p99 latency, and the ratio replikv / peer. The machine's facts, versions and CPU
pinning are printed with the results, which also go to --out as JSON and Markdown.

Load generators: redis-benchmark for plain SET/GET (both RESP systems), `replikv bench` for
SET+WAIT, reads with a read preference, YCSB mixes and failover (also against Redis, it speaks
RESP), and bench/etcd-bench (gRPC, closed loop) for etcd.

Usage: bench/compare.py [--quick] [--runs N] [--only eventual,quorum,...] [--pin split|none]
Scenarios: eventual quorum wait reads ycsb failover resync
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# REPLIKV_BIN runs another build (an older commit, for before/after figures) with --no-build.
REPLIKV = os.environ.get("REPLIKV_BIN") or os.path.join(ROOT, "target", "release", "replikv")
ETCD_BENCH = os.path.join(ROOT, "bench", "etcd-bench", "target", "release", "etcd-bench")
SCENARIOS = ["eventual", "quorum", "wait", "reads", "ycsb", "failover", "resync"]
PACKAGES = {  # command -> Debian package
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "redis-cli": "redis-tools",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "protoc": "protobuf-compiler",
    "taskset": "util-linux",
}
RK_RESP, RK_HTTP, RK_PEER = 27001, 27101, 27201
REDIS_PORT = 27301
ETCD_CLIENT, ETCD_PEER = 27401, 27501


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Pin:
    """taskset prefixes: load generators on one CPU, servers on the others (`split`)."""

    def __init__(self, mode):
        cpus = os.cpu_count() or 1
        self.mode = mode if cpus >= 2 else "none"
        self.load_cpus = "0"
        self.server_cpus = "1" if cpus == 2 else f"1-{cpus - 1}"

    def load(self):
        return ["taskset", "-c", self.load_cpus] if self.mode == "split" else []

    def server(self):
        return ["taskset", "-c", self.server_cpus] if self.mode == "split" else []

    def describe(self):
        if self.mode == "split":
            return f"load generators on CPU {self.load_cpus}, servers on CPU {self.server_cpus} (taskset)"
        return "no pinning: load generators and servers share every CPU"


def run(cmd, check=True, capture=True, env=None, timeout=None):
    r = subprocess.run(cmd, capture_output=capture, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-600:]}")
    return r.stdout


def ensure_tools():
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if shutil.which(cmd) is None})
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", *missing], env=env)
    log("building replikv and etcd-bench (release)")
    run(["cargo", "build", "--release", "-q", "-p", "replikv"], capture=False)
    run(["cargo", "build", "--release", "-q", "--manifest-path",
         os.path.join(ROOT, "bench", "etcd-bench", "Cargo.toml")], capture=False)


def http_json(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def wait_for(cond, what, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def stop(procs):
    for p in procs:
        if p and p.poll() is None:
            p.terminate()
    for p in procs:
        if p:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- systems


# Extra YAML appended to every replikv node's configuration (--replikv-yaml).
REPLIKV_YAML = ""


class Replikv:
    name = "replikv"

    def __init__(self, pin, workdir, level="quorum", fsync="always", read="primary", redirect=False):
        self.pin, self.dir = pin, os.path.join(workdir, "replikv")
        self.level, self.fsync, self.read = level, fsync, read
        # redirect: answer -MOVED like Redis Cluster, for cluster-aware clients.
        self.redirect = redirect
        self.procs = {}

    def args(self, i):
        peers = ",".join(f"{n}=127.0.0.1:{RK_PEER + n}" for n in (1, 2, 3))
        return self.pin.server() + [
            REPLIKV, "server", "--node-id", str(i), "--peers", peers,
            "--data-dir", os.path.join(self.dir, f"node{i}"),
            "--resp-listen", f"127.0.0.1:{RK_RESP + i - 1}",
            "--http-listen", f"127.0.0.1:{RK_HTTP + i - 1}",
            "--peer-listen", f"127.0.0.1:{RK_PEER + i}",
            "--consistency", self.level, "--fsync", self.fsync,
            "--read-preference", self.read, "--config", os.path.join(self.dir, "replikv.yaml")]

    def start_node(self, i):
        logf = open(os.path.join(self.dir, f"node{i}.log"), "a")
        env = dict(os.environ, REPLIKV_LOG="warn")
        self.procs[i] = subprocess.Popen(self.args(i), stdout=logf, stderr=logf, env=env)

    def __enter__(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "replikv.yaml"), "w") as f:
            f.write(f"resp:\n  redirect: {'true' if self.redirect else 'false'}\n")
            if REPLIKV_YAML:
                f.write(REPLIKV_YAML + "\n")
        for i in (1, 2, 3):
            self.start_node(i)
        for i in (1, 2, 3):
            wait_for(lambda i=i: urllib.request.urlopen(
                f"http://127.0.0.1:{RK_HTTP + i - 1}/ready", timeout=1).status == 200,
                f"replikv node {i} ready")
        self.wait_preferred_leaders()
        return self

    def wait_preferred_leaders(self):
        # Leaders start on their preferred nodes; wait until every partition has one.
        def settled():
            parts = self.state(1)["partitions"]
            return all(p.get("leader") for p in parts)
        wait_for(settled, "replikv leaders")

    def __exit__(self, *exc):
        stop(list(self.procs.values()))

    def state(self, i):
        return http_json(f"http://127.0.0.1:{RK_HTTP + i - 1}/v1/_replication/state")

    def resp(self, i=1):
        return RK_RESP + i - 1

    def stop_replica(self, i):
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def replica_synced(self, i):
        return self.caught_up(i)

    def settled(self):
        """Every replica has applied what its leaders hold."""
        return all(self.caught_up(i) for i in (1, 2, 3))

    def partial_resync_note(self):
        return "node killed (-9), restarted from its log"

    def leader_of(self, partition):
        return [p["leader"] for p in self.state(1)["partitions"] if p["partition"] == partition][0]

    def caught_up(self, node):
        """True when `node` has applied every leader's last offset."""
        leaders = {}
        for i in (1, 2, 3):
            if i == node:
                continue
            for p in self.state(i)["partitions"]:
                if p["role"] == "leader":
                    leaders[p["partition"]] = p["last_offset"]
        mine = {p["partition"]: p["applied_offset"] for p in self.state(node)["partitions"]}
        return bool(leaders) and all(mine.get(p, 0) >= off for p, off in leaders.items())


class Redis:
    name = "redis"

    def __init__(self, pin, workdir, aof=False, replicas=2):
        self.pin, self.dir, self.aof, self.replicas = pin, os.path.join(workdir, "redis"), aof, replicas
        self.procs = {}

    def start_node(self, i, replicaof=True):
        d = os.path.join(self.dir, f"node{i}")
        os.makedirs(d, exist_ok=True)
        args = self.pin.server() + [
            "redis-server", "--port", str(REDIS_PORT + i - 1), "--bind", "127.0.0.1",
            "--dir", d, "--save", "", "--daemonize", "no", "--protected-mode", "no",
            "--enable-debug-command", "local",
            "--repl-backlog-size", "512mb", "--repl-diskless-sync-delay", "0",
            "--logfile", os.path.join(d, "redis.log")]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if i > 1 and replicaof:
            args += ["--replicaof", "127.0.0.1", str(REDIS_PORT)]
        self.procs[i] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        for i in range(1, self.replicas + 2):
            self.start_node(i)
        wait_for(lambda: self.cli(1, "PING").strip() == "PONG", "redis primary")
        wait_for(lambda: self.info(1).count("state=online") == self.replicas, "redis replicas online")
        return self

    def __exit__(self, *exc):
        stop(list(self.procs.values()))

    def cli(self, i, *cmd):
        return run(["redis-cli", "-p", str(REDIS_PORT + i - 1), *cmd])

    def info(self, i, section="replication"):
        return self.cli(i, "INFO", section)

    def field(self, i, name, section="replication"):
        for line in self.info(i, section).splitlines():
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
        return None

    def resp(self, i=1):
        return REDIS_PORT + i - 1

    def stop_replica(self, i):
        self.cli(i, "SHUTDOWN", "SAVE")
        self.procs[i].wait()

    def replica_synced(self, i):
        return self.in_sync(i)

    def settled(self):
        """Every replica has what the primary holds."""
        return all(self.in_sync(i) for i in range(2, self.replicas + 2))

    def partial_resync_note(self):
        partial = self.field(1, "sync_partial_ok", section="stats")
        return f"replica stopped with SHUTDOWN SAVE, restarted; PSYNC (partial syncs: {partial})"

    def in_sync(self, i):
        return (self.field(i, "master_link_status") == "up"
                and self.field(i, "master_sync_in_progress") == "0"
                and int(self.field(i, "slave_repl_offset") or -1) >= int(self.field(1, "master_repl_offset")))


class Etcd:
    name = "etcd"

    def __init__(self, pin, workdir):
        self.pin, self.dir = pin, os.path.join(workdir, "etcd")
        self.procs = {}

    def url(self, i):
        return f"http://127.0.0.1:{ETCD_CLIENT + i - 1}"

    def start_node(self, i):
        cluster = ",".join(f"e{n}=http://127.0.0.1:{ETCD_PEER + n - 1}" for n in (1, 2, 3))
        args = self.pin.server() + [
            "etcd", "--name", f"e{i}", "--data-dir", os.path.join(self.dir, f"e{i}"),
            "--listen-client-urls", self.url(i), "--advertise-client-urls", self.url(i),
            "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER + i - 1}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER + i - 1}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "replikv-compare", "--log-level", "error"]
        logf = open(os.path.join(self.dir, f"e{i}.log"), "a")
        self.procs[i] = subprocess.Popen(args, stdout=logf, stderr=logf)

    def __enter__(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        for i in (1, 2, 3):
            self.start_node(i)
        wait_for(lambda: self.leader() is not None, "etcd leader", timeout=60)
        return self

    def __exit__(self, *exc):
        stop(list(self.procs.values()))

    def status(self):
        out = run(["etcdctl", "--endpoints", ",".join(self.url(i) for i in (1, 2, 3)),
                   "endpoint", "status", "-w", "json"], check=False, timeout=10)
        return json.loads(out) if out.strip() else []

    def leader(self):
        """Member number (1-3) of the leader, or None."""
        for s in self.status():
            h = s["Status"]["header"]
            if h["member_id"] == s["Status"]["leader"]:
                return int(s["Endpoint"].rsplit(":", 1)[1]) - ETCD_CLIENT + 1
        return None

    def follower(self):
        lead = self.leader()
        return next(i for i in (1, 2, 3) if i != lead)


# ---------------------------------------------------------------- load generators


def redis_benchmark(pin, port, test, clients, pipeline, size, requests, keyspace=100_000,
                    cluster=False):
    out = run(pin.load() + ["redis-benchmark", "-p", str(port), "-t", test, "-n", str(requests),
                            "-c", str(clients), "-P", str(pipeline), "-d", str(size),
                            "-r", str(keyspace), "--csv"] + (["--cluster"] if cluster else []),
              timeout=900)
    # --cluster prints the cluster's masters before the CSV: start after its header.
    lines = out.strip().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"test"')) + 1
    r = lines[start].replace('"', "").split(",")
    return {"rps": float(r[1]), "p50": float(r[4]), "p99": float(r[6])}


def replikv_bench(pin, port, workload, clients, secs, warmup, size=100, pipeline=1, keys=100_000,
                  consistency=None, read=None, zipf=None, wait=None, seed=1, requests=10**12,
                  sequential=False):
    cmd = pin.load() + [REPLIKV, "bench", "--addr", f"127.0.0.1:{port}", "--workload", workload,
                        "--clients", str(clients), "--pipeline", str(pipeline),
                        "--value-size", str(size), "--keys", str(keys), "--seed", str(seed),
                        "--requests", str(requests), "--json"]
    if secs:
        cmd += ["--duration-secs", str(secs + warmup), "--warmup-secs", str(warmup)]
    for flag, v in (("--consistency", consistency), ("--read", read), ("--zipf", zipf), ("--wait", wait)):
        if v is not None:
            cmd += [flag, str(v)]
    if sequential:
        cmd.append("--sequential")
    j = json.loads(run(cmd, timeout=1800).strip().splitlines()[-1])
    return {"rps": j["ops_per_sec"], "p50": j["p50_us"] / 1000, "p99": j["p99_us"] / 1000,
            "errors": j["errors"], "max": j["max_us"] / 1000, "gap": j["longest_gap_ms"]}


def etcd_bench(pin, endpoints, op, clients, secs, warmup, size=256, keys=100_000, preload=False, seed=1):
    cmd = pin.load() + [ETCD_BENCH, "--endpoints", endpoints, "--op", op, "--clients", str(clients),
                        "--duration-secs", str(secs + warmup), "--warmup-secs", str(warmup),
                        "--value-size", str(size), "--keys", str(keys), "--seed", str(seed)]
    if preload:
        cmd.append("--preload")
    j = json.loads(run(cmd, timeout=1800).strip().splitlines()[-1])
    return {"rps": j["rps"], "p50": j["p50_ms"], "p99": j["p99_ms"], "errors": j["errors"],
            "max": j["max_ms"], "gap": j["longest_gap_ms"]}


# ---------------------------------------------------------------- measurement


class Results:
    def __init__(self):
        self.rows = []  # dicts: scenario, case, system, config, runs[...]

    def add(self, scenario, case, system, config, runs):
        row = {"scenario": scenario, "case": case, "system": system, "config": config, "runs": runs}
        for k in ("rps", "p50", "p99"):
            vals = [r[k] for r in runs]
            row[k] = statistics.median(vals)
            row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
        self.rows.append(row)
        log(f"  {scenario:9} {case:34} {system:8} {row['rps']:>10,.0f} ops/s  "
            f"p50 {row['p50']:.2f} ms  p99 {row['p99']:.2f} ms  ({len(runs)} runs)")
        return row


def repeat(args, fn):
    """Warm-up once (discarded), then args.runs measured runs. A run that fails (say
    redis-benchmark stopping at a `-TIMEOUT` during a leadership change) is reported and
    run again, once."""
    def attempt(warm):
        try:
            return fn(warm=warm)
        except RuntimeError as e:
            log(f"  run failed, running it again: {e}")
            return fn(warm=warm)
    attempt(True)
    return [attempt(False) for _ in range(args.runs)]


def rb_sized(args, pin, port, test, clients, pipeline, size, cluster=False):
    """redis-benchmark with a request count sized from the warm-up to last about --secs."""
    est = {"rps": 0}

    def once(warm):
        n = 20_000 if warm else max(10_000, int(est["rps"] * args.secs))
        r = redis_benchmark(pin, port, test, clients, pipeline, size, n, cluster=cluster)
        if warm:
            est["rps"] = r["rps"]
        return r
    return repeat(args, once)


def settle(s):
    """Waits until the replicas have caught up with the load just run, so that one case's
    backlog (asynchronous replication lags under `eventual` SETs) is not measured in the next."""
    t0 = time.time()
    wait_for(s.settled, f"{s.name} replicas caught up", timeout=300)
    waited = time.time() - t0
    if waited > 0.5:
        log(f"  ({s.name} replicas caught up {waited:.1f} s after the previous case)")


def scenario_eventual(args, pin, work, res):
    sizes = [100] if args.quick else [100, 1024]
    systems = [
        (Redis(pin, work), "primary + 2 replicas, no persistence"),
        (Replikv(pin, work, level="eventual"),
         "3 nodes, eventual, fsync always; GET = primary (linearizable)"),
    ]
    for system, config in systems:
        with system as s:
            for size in sizes:
                for p in (1, 16):
                    for test in ("set", "get"):
                        settle(s)
                        res.add("eventual", f"{test.upper()} c50 P{p} {size}B", s.name, config,
                                rb_sized(args, pin, s.resp(), test, 50, p, size))
    # The same load from a cluster-aware client (redis-benchmark --cluster follows -MOVED
    # and sends each key to its partition's leader): no forwarding hop.
    with Replikv(pin, work, level="eventual", redirect=True) as k:
        for p in (1, 16):
            for test in ("set", "get"):
                settle(k)
                res.add("eventual", f"{test.upper()} c50 P{p} 100B", "replikv-cluster",
                        "as replikv, with resp.redirect and redis-benchmark --cluster",
                        rb_sized(args, pin, k.resp(), test, 50, p, 100, cluster=True))


def scenario_quorum(args, pin, work, res):
    clients = [1, 50] if args.quick else [1, 50, 500]
    with Etcd(pin, work) as e:
        ep = e.url(e.leader())
        for c in clients:
            res.add("quorum", f"durable put c{c} 256B", "etcd", "3 members, put to the leader",
                    repeat(args, lambda warm, c=c: etcd_bench(pin, ep, "put", c, 2 if warm else args.secs, 1)))
    with Replikv(pin, work, level="quorum") as k:
        for c in clients:
            res.add("quorum", f"durable put c{c} 256B", "replikv", "3 nodes, quorum, fsync always",
                    rb_sized(args, pin, k.resp(), "set", c, 1, 256))


def scenario_wait(args, pin, work, res):
    with Redis(pin, work, aof=True) as r:
        for n, case in ((1, "SET+WAIT 1 / quorum"), (2, "SET+WAIT 2 / all")):
            res.add("wait", f"{case} c50 256B", "redis", "AOF appendfsync always, SET then WAIT n 0",
                    repeat(args, lambda warm, n=n: replikv_bench(
                        pin, r.resp(), "set", 50, 2 if warm else args.secs, 1, size=256, wait=n)))
    for level, case in (("quorum", "SET+WAIT 1 / quorum"), ("all", "SET+WAIT 2 / all")):
        with Replikv(pin, work, level=level) as k:
            res.add("wait", f"{case} c50 256B", "replikv", f"3 nodes, {level}, fsync always",
                    repeat(args, lambda warm: replikv_bench(
                        pin, k.resp(), "set", 50, 2 if warm else args.secs, 1, size=256)))


def preload_resp(pin, port, keys, size):
    replikv_bench(pin, port, "set", 32, None, 0, size=size, pipeline=16, keys=keys,
                  requests=keys, sequential=True)


def scenario_reads(args, pin, work, res):
    keys = 10_000 if args.quick else 100_000
    g = lambda port, read=None: (lambda warm: replikv_bench(
        pin, port, "get", 50, 2 if warm else args.secs, 1, size=256, keys=keys, read=read))
    with Redis(pin, work) as r:
        preload_resp(pin, r.resp(), keys, 256)
        settle(r)
        res.add("reads", "leader GET c50", "redis", "primary", repeat(args, g(r.resp())))
        res.add("reads", "follower GET c50", "redis", "replica (asynchronous)", repeat(args, g(r.resp(2))))
    with Etcd(pin, work) as e:
        lead, fol = e.url(e.leader()), e.url(e.follower())
        etcd_bench(pin, lead, "put", 32, 0.5, 0, keys=keys, preload=True)
        res.add("reads", "leader GET c50", "etcd", "linearizable range, at the leader",
                repeat(args, lambda warm: etcd_bench(pin, lead, "get-lin", 50, 2 if warm else args.secs, 1, keys=keys)))
        res.add("reads", "follower GET c50", "etcd", "serializable range, at a follower",
                repeat(args, lambda warm: etcd_bench(pin, fol, "get-serial", 50, 2 if warm else args.secs, 1, keys=keys)))
    with Replikv(pin, work) as k:
        preload_resp(pin, k.resp(), keys, 256)
        settle(k)
        res.add("reads", "leader GET c50", "replikv", "primary (read index, linearizable), clients on node 1",
                repeat(args, g(k.resp(), "primary")))
        res.add("reads", "follower GET c50", "replikv", "secondary (bounded staleness), clients on node 2",
                repeat(args, g(k.resp(2), "secondary")))


def scenario_ycsb(args, pin, work, res):
    keys = 10_000 if args.quick else 100_000
    loads = [("ycsb-a", "A 50/50"), ("ycsb-b", "B 95/5"), ("ycsb-c", "C read-only")]
    for system in ("redis", "replikv"):
        ctx = Redis(pin, work) if system == "redis" else Replikv(pin, work)
        with ctx as s:
            preload_resp(pin, s.resp(), keys, 100)
            settle(s)
            for w, case in loads:
                res.add("ycsb", f"{case} zipf 0.99 c50", system,
                        "primary, no persistence" if system == "redis" else "quorum writes, primary reads",
                        repeat(args, lambda warm, w=w: replikv_bench(
                            pin, s.resp(), w, 50, 2 if warm else args.secs, 1, size=100, keys=keys, zipf=0.99)))


def scenario_failover(args, pin, work, res):
    """kill -9 of the leader under a write load; the window is the longest time without a
    successful write (or the longest write, if larger)."""
    secs = 6 if args.quick else 10
    runs_e, runs_k = [], []
    for _ in range(args.runs):
        with Etcd(pin, work) as e:
            lead = e.leader()
            eps = ",".join(e.url(i) for i in (1, 2, 3) if i != lead) + "," + e.url(lead)
            load = subprocess.Popen(pin.load() + [ETCD_BENCH, "--endpoints", eps, "--op", "put",
                                                  "--clients", "16", "--duration-secs", str(secs),
                                                  "--warmup-secs", "1"], stdout=subprocess.PIPE, text=True)
            time.sleep(3)
            e.procs[lead].send_signal(signal.SIGKILL)
            out = load.communicate()[0]
            j = json.loads(out.strip().splitlines()[-1])
            runs_e.append({"rps": j["rps"], "p50": j["p50_ms"], "p99": j["p99_ms"],
                           "window": max(j["longest_gap_ms"], j["max_ms"]), "errors": j["errors"]})
        with Replikv(pin, work) as k:
            # Clients on node 1; kill the leader of a partition that node 1 does not lead.
            victim = next(k.leader_of(p) for p in range(8) if k.leader_of(p) != 1)
            load = subprocess.Popen(pin.load() + [REPLIKV, "bench", "--addr", f"127.0.0.1:{k.resp()}",
                                                  "--workload", "set", "--clients", "16",
                                                  "--duration-secs", str(secs), "--warmup-secs", "1",
                                                  "--requests", str(10**12), "--json"],
                                    stdout=subprocess.PIPE, text=True)
            time.sleep(3)
            k.procs[victim].send_signal(signal.SIGKILL)
            out = load.communicate()[0]
            j = json.loads(out.strip().splitlines()[-1])
            runs_k.append({"rps": j["ops_per_sec"], "p50": j["p50_us"] / 1000, "p99": j["p99_us"] / 1000,
                           "window": max(j["longest_gap_ms"], j["max_us"] / 1000), "errors": j["errors"]})
    for system, runs in (("etcd", runs_e), ("replikv", runs_k)):
        row = res.add("failover", "kill -9 leader, 16 writers", system,
                      "default election timeout" if system == "etcd" else "quorum, default timeouts", runs)
        row["window_ms"] = statistics.median(r["window"] for r in runs)
        row["window_min"] = min(r["window"] for r in runs)
        row["window_max"] = max(r["window"] for r in runs)
        row["errors"] = [r["errors"] for r in runs]
        log(f"  failover window {system}: median {row['window_ms']:.0f} ms "
            f"({row['window_min']:.0f}-{row['window_max']:.0f}), errors {row['errors']}")


def scenario_resync(args, pin, work, res):
    """Catch-up after a short outage, and a full sync of N keys x 100 B to an empty replica."""
    full_keys = 100_000 if args.quick else 1_000_000
    outage_writes = 20_000 if args.quick else 200_000
    out = {}
    # A replica misses outage_writes SETs and comes back. Redis: replica 3 shuts down saving
    # its data set and replication offset (SHUTDOWN SAVE) and restarts from that file,
    # continuing from its offset (PSYNC). replikv: node 3 is killed (-9) and restarts from
    # its log.
    for system in (Redis, Replikv):
        runs = []
        for _ in range(args.runs):
            with system(pin, work) as s:
                s.stop_replica(3)
                replikv_bench(pin, s.resp(), "set", 32, None, 0, pipeline=16, requests=outage_writes)
                t0 = time.time()
                s.start_node(3)
                wait_for(lambda: s.replica_synced(3), f"{s.name} partial resync", timeout=600)
                runs.append(time.time() - t0)
                how = s.partial_resync_note()
        out[f"{s.name} partial"] = (runs, f"{how}; {outage_writes:,} SETs missed")
    # Full sync: an empty replica joins a primary holding full_keys keys.
    runs = []
    for _ in range(args.runs):
        with Redis(pin, work, replicas=0) as r:
            r.cli(1, "DEBUG", "POPULATE", str(full_keys), "key", "100")
            if int(r.cli(1, "DBSIZE")) != full_keys:
                raise RuntimeError(f"redis holds {r.cli(1, 'DBSIZE').strip()} keys, not {full_keys}")
            r.start_node(2)
            t0 = time.time()
            wait_for(lambda: r.field(1, "connected_slaves") == "1" and r.in_sync(2), "redis full sync", timeout=900)
            runs.append(time.time() - t0)
            if int(r.cli(2, "DBSIZE")) != full_keys:
                raise RuntimeError(f"the redis replica holds {r.cli(2, 'DBSIZE').strip()} keys after sync")
    out["redis full"] = (runs, f"{full_keys:,} keys x 100 B, empty replica attaches (diskless, no delay)")
    runs = []
    for _ in range(args.runs):
        with Replikv(pin, work, level="eventual") as k:
            k.stop_replica(3)
            preload_resp(pin, k.resp(), full_keys, 100)
            shutil.rmtree(os.path.join(k.dir, "node3"))
            t0 = time.time()
            k.start_node(3)
            wait_for(lambda: k.caught_up(3), "replikv full sync", timeout=900)
            runs.append(time.time() - t0)
    out["replikv full"] = (runs, f"{full_keys:,} keys x 100 B, node 3 restarts with an empty data dir")
    for kind in ("partial", "full"):
        for system in ("redis", "replikv"):
            secs, config = out[f"{system} {kind}"]
            row = res.add("resync", f"{kind} sync time (s)", system, config,
                          [{"rps": 0, "p50": s, "p99": s} for s in secs])
            row["seconds"] = statistics.median(secs)


# ---------------------------------------------------------------- report


def facts(pin):
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = run(["df", "-T", ROOT]).splitlines()[1].split()[1]
    commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False).strip() or "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}, {fs}",
        "pinning": pin.describe(),
        "replikv": f"{commit}, release build",
        "redis": run(["redis-server", "--version"]).split()[2].removeprefix("v="),
        "etcd": run(["etcd", "--version"]).splitlines()[0].split()[-1],
    }


def markdown(res, f, args):
    lines = [f"Machine: {f['machine']}. {f['pinning']}.",
             f"Versions: replikv {f['replikv']}; Redis {f['redis']}; etcd {f['etcd']}. {f['date']}.",
             f"Each figure is the median of {args.runs} runs after a warm-up run"
             f" ({args.secs:g} s each where the tool runs for a time); min-max in brackets.", ""]
    lines += ["| scenario | case | system | ops/s [min-max] | p50 ms | p99 ms | replikv ÷ peer | setup |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    by_case = {}
    for r in res.rows:
        by_case.setdefault((r["scenario"], r["case"]), {})[r["system"]] = r
    for r in res.rows:
        k = by_case[(r["scenario"], r["case"])].get("replikv")
        if r["scenario"] == "failover":
            figure = f"window {r['window_ms']:,.0f} ms [{r['window_min']:,.0f}-{r['window_max']:,.0f}]"
            ratio = "" if r["system"] == "replikv" or not k else f"{k['window_ms'] / max(r['window_ms'], 1):.2f} (window)"
        elif r["scenario"] == "resync":
            figure = f"{r['seconds']:.2f} s [{r['p50_min']:.2f}-{r['p50_max']:.2f}]"
            ratio = "" if r["system"] == "replikv" or not k else f"{k['seconds'] / max(r['seconds'], 1e-9):.2f} (time)"
        else:
            figure = f"{r['rps']:,.0f} [{r['rps_min']:,.0f}-{r['rps_max']:,.0f}]"
            redis = by_case[(r["scenario"], r["case"])].get("redis")
            if r["system"] == "replikv-cluster":
                ratio = f"{r['rps'] / redis['rps']:.2f} (÷ redis)" if redis else ""
            else:
                ratio = "" if r["system"] == "replikv" or not k else f"{k['rps'] / r['rps']:.2f}"
        p50 = "" if r["scenario"] == "resync" else f"{r['p50']:.2f}"
        p99 = "" if r["scenario"] == "resync" else f"{r['p99']:.2f}"
        lines.append(f"| {r['scenario']} | {r['case']} | {r['system']} | {figure} | {p50} | {p99} | {ratio} | {r['config']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short run of a reduced set (what CI runs)")
    ap.add_argument("--runs", type=int, help="measured runs per case (default 3; 1 with --quick)")
    ap.add_argument("--secs", type=float, help="seconds per measured run (default 8; 2 with --quick)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    ap.add_argument("--pin", choices=["split", "none"], default="split")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench-compare"))
    ap.add_argument("--no-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--replikv-yaml", default="",
                    help="extra YAML for every replikv node, for A/B runs of one build, "
                         "e.g. 'replication: { lease_reads: false }'")
    args = ap.parse_args()
    global REPLIKV_YAML
    REPLIKV_YAML = args.replikv_yaml
    args.runs = args.runs or (1 if args.quick else 3)
    args.secs = args.secs or (2.0 if args.quick else 8.0)
    chosen = args.only.split(",") if args.only else SCENARIOS
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or args.runs < 1 or args.secs <= 0:
        ap.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}" if unknown
                 else "--runs must be at least 1 and --secs above 0")
    if not args.no_build:
        ensure_tools()
    pin = Pin(args.pin)
    f = facts(pin)
    for k, v in f.items():
        log(f"{k}: {v}")
    res = Results()
    work = tempfile.mkdtemp(prefix="replikv-compare-")
    try:
        for s in chosen:
            log(f"scenario {s}")
            globals()[f"scenario_{s}"](args, pin, work, res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    md = markdown(res, f, args)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"facts": f, "args": vars(args), "rows": res.rows}, fh, indent=1)
    print(md)
    log(f"written to {args.out}/results.md and results.json")


if __name__ == "__main__":
    main()
