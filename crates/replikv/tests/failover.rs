//! Failover promises (DESIGN.md section 3): an acknowledged `quorum` write survives `kill -9`
//! of the leader, whose followers campaign once their lease runs out; a minority side refuses writes while the majority serves; leadership
//! returns to the preferred leader; `promote` moves leadership on request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

/// Writes unique keys through `nodes` until `stop`, reconnecting when a node dies; returns
/// the acknowledged (key, value) pairs.
fn writer(
    c: &Cluster,
    id: usize,
    nodes: Vec<u64>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<(String, String)>> {
    let urls: Vec<String> = nodes.iter().map(|n| c.node(*n).redis_url()).collect();
    thread::spawn(move || {
        let mut acked = Vec::new();
        let mut i = 0u64;
        let mut which = id;
        let mut conn: Option<redis::Connection> = None;
        while !stop.load(Ordering::Relaxed) {
            if conn.is_none() {
                which += 1;
                let client = redis::Client::open(urls[which % urls.len()].as_str()).unwrap();
                conn = client
                    .get_connection_with_timeout(Duration::from_millis(500))
                    .ok();
                if let Some(c) = &conn {
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                }
                continue;
            }
            let key = format!("w{id}-{i}");
            let value = format!("v{i}");
            i += 1;
            let r: redis::RedisResult<()> = conn.as_mut().unwrap().set(&key, &value);
            match r {
                Ok(()) => acked.push((key, value)),
                Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                    conn = None
                }
                Err(_) => {} // refused (TRYAGAIN, NOQUORUM, CLUSTERDOWN): not acknowledged
            }
        }
        acked
    })
}

fn assert_all_present(c: &Cluster, via: u64, acked: &[(String, String)]) {
    let mut conn = c.redis(via);
    let mut missing = Vec::new();
    for (k, v) in acked {
        let got: Option<String> = conn.get(k).unwrap();
        if got.as_deref() != Some(v.as_str()) {
            missing.push((k.clone(), v.clone(), got));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
}

#[test]
fn quorum_writes_survive_leader_kill_under_load_and_replicas_converge() {
    let mut c = Cluster::start(bin(), Options::default());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|i| writer(&c, i, vec![1, 2, 3], stop.clone()))
        .collect();

    // Phase 1: load is flowing.
    let mut probe = c.redis(1);
    wait_until(Duration::from_secs(20), "some writes acknowledged", || {
        redis::cmd("DBSIZE").query::<i64>(&mut probe).unwrap_or(0) > 200
    });

    // Phase 2: kill -9 the leader of partition 0 mid-load.
    let victim = c.leader_seen_by(1, 0).expect("partition 0 has a leader");
    let killed_at = Instant::now();
    c.kill(victim);
    let survivor = *c.live().first().unwrap();
    let new_leader = c.wait_new_leader(0, victim, Duration::from_secs(10));
    eprintln!(
        "partition 0: leader {victim} killed; node {new_leader} leads after {:?}",
        killed_at.elapsed()
    );
    // The survivors saw the leader's port refuse connections and campaigned as soon as
    // their lease ran out, not after openraft's lease plus a random election timeout.
    wait_until(
        Duration::from_secs(10),
        "an early campaign on a survivor",
        || {
            c.live()
                .iter()
                .map(|n| c.metric(*n, "replikv_early_campaigns_total"))
                .sum::<f64>()
                >= 1.0
        },
    );

    // Phase 3: writes continue on the survivors, then the victim comes back from disk.
    let mut probe = c.redis(survivor);
    let before: i64 = redis::cmd("DBSIZE").query(&mut probe).unwrap();
    wait_until(
        Duration::from_secs(20),
        "writes continue after failover",
        || redis::cmd("DBSIZE").query::<i64>(&mut probe).unwrap_or(0) > before + 100,
    );
    c.restart(victim);
    c.wait_ready(Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<(String, String)> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        acked.len() > 300,
        "only {} writes acknowledged",
        acked.len()
    );

    // Phase 4: nothing acknowledged is lost, and all replicas hold identical contents.
    assert_all_present(&c, victim, &acked);
    c.wait_converged(Duration::from_secs(20));
}

#[test]
fn minority_side_refuses_writes_while_majority_serves_then_converges() {
    let c = Cluster::start(
        bin(),
        Options {
            rebalance_leaders: false,
            ..Options::default()
        },
    );
    let mut minority = c.redis(3);
    let _: () = minority.set("before", "1").unwrap();

    // Phase 1: node 3 is cut off from nodes 1 and 2.
    c.cut(3, &[1, 2]);

    // Phase 2: the majority keeps serving every partition.
    let mut majority = c.redis(1);
    for p in 0..c.opts.partitions as u64 {
        c.wait_new_leader_among(p, &[1, 2], Duration::from_secs(10));
    }
    for i in 0..20 {
        let _: () = majority.set(format!("during{i}"), i).unwrap();
    }

    // Phase 3: the minority refuses writes, whichever partition the key is in.
    wait_until(Duration::from_secs(10), "node 3 refuses writes", || {
        (0..20).all(|i| majority_refused(&mut minority, &format!("minority{i}")))
    });
    let err = minority.set::<_, _, ()>("minority-x", "1").unwrap_err();
    let text = err.to_string().to_lowercase();
    assert!(
        text.contains("noquorum") || text.contains("clusterdown"),
        "{text}"
    );

    // Its status says so: whatever role openraft still reports, no partition reaches a majority.
    let state = c.http_get(3, "/v1/_replication/state").unwrap();
    for part in state["partitions"].as_array().unwrap() {
        assert_eq!(
            part["reaches_majority"], false,
            "partition {} on the cut-off node",
            part["partition"]
        );
    }

    // Phase 4: after healing, node 3 catches up and every replica is identical.
    c.heal();
    c.wait_converged(Duration::from_secs(20));
    let v: Option<i64> = minority.get("during7").unwrap();
    assert_eq!(v, Some(7));
    for i in 0..20 {
        let v: Option<String> = majority.get(format!("minority{i}")).unwrap();
        assert_eq!(v, None, "a write refused by the minority appeared");
    }
}

fn majority_refused(conn: &mut redis::Connection, key: &str) -> bool {
    conn.set::<_, _, ()>(key, "x").is_err()
}

#[test]
fn promote_moves_leadership_and_preferred_leaders_return_after_restart() {
    let mut c = Cluster::start(bin(), Options::default());
    let state = c.http_get(1, "/v1/_replication/state").unwrap();
    let preferred: BTreeMap<u64, u64> = state["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_u64().unwrap(),
                p["preferred_leader"].as_u64().unwrap(),
            )
        })
        .collect();

    // Phase 1: leaders settle on their preferred replicas.
    wait_until(Duration::from_secs(20), "preferred leaders lead", || {
        preferred
            .iter()
            .all(|(p, l)| c.leader_seen_by(1, *p) == Some(*l))
    });

    // Phase 2: promote another replica of partition 0 through any node's API.
    let current = preferred[&0];
    let target = [1, 2, 3].into_iter().find(|n| *n != current).unwrap();
    let mut conn = c.redis(1);
    let _: () = conn.set("x", "before-promote").unwrap();
    c.http_post(
        2,
        "/v1/_replication/promote",
        serde_json::json!({"partition": 0, "node": target}),
    )
    .unwrap_or_else(|e| panic!("promote failed: {e}"));
    assert_eq!(c.leader_seen_by(target, 0), Some(target));
    let v: String = conn.get("x").unwrap();
    assert_eq!(v, "before-promote");
    let bad = c.http_post(
        1,
        "/v1/_replication/promote",
        serde_json::json!({"partition": 0, "node": 99}),
    );
    assert!(bad.unwrap_err().starts_with("400"));

    // Phase 3: kill a preferred leader; after it restarts, its partitions come back to it.
    let victim = preferred[&1];
    c.kill(victim);
    c.wait_new_leader(1, victim, Duration::from_secs(10));
    c.restart(victim);
    wait_until(
        Duration::from_secs(30),
        "leadership returns to the preferred leader",
        || {
            preferred
                .iter()
                .filter(|(_, l)| **l == victim)
                .all(|(p, _)| c.leader_seen_by(victim, *p) == Some(victim))
        },
    );
}

#[test]
fn five_nodes_reach_partitions_they_do_not_host_across_a_leader_kill() {
    let mut c = Cluster::start(
        bin(),
        Options {
            nodes: 5,
            partitions: 8,
            ..Options::default()
        },
    );
    // Only the three replicas of partition 0 report on it.
    let victim = (1..=5)
        .find_map(|n| c.leader_seen_by(n, 0))
        .expect("partition 0 has a leader");
    // With factor 3 of 5 nodes, some nodes host no replica of a given partition: they must
    // find its leader through the replicas they ask.
    c.kill(victim);
    let live = c.live();
    let mut acked = Vec::new();
    for i in 0..200 {
        let node = live[i % live.len()];
        let (k, v) = (format!("five{i}"), format!("v{i}"));
        c.redis(node)
            .set::<_, _, ()>(&k, &v)
            .unwrap_or_else(|e| panic!("SET {k} via node {node}: {e}"));
        acked.push((k, v));
    }
    for node in &live {
        assert_all_present(&c, *node, &acked);
    }
}

/// Found by the chaos campaign (`pause-leader`, `isolate-leader`: about 2 s without
/// acknowledged writes, the write timeout): a write forwarded to a leader that then froze
/// waited out the whole write timeout even after the others elected a new leader. Now the
/// forwarding node answers "commit unknown" as soon as it sees the new leader, and reads
/// forwarded to the frozen leader go to the new one.
#[test]
fn pause_leader_a_forwarded_write_is_answered_once_a_new_leader_is_elected() {
    let opts = Options {
        partitions: 1,
        rebalance_leaders: false,
        // Long, so that an answer at the timeout and an answer at the new election differ.
        write_timeout_ms: 20_000,
        ..Options::default()
    };
    let c = Cluster::start(bin(), opts);
    let old = c.wait_new_leader(0, 0, Duration::from_secs(10));
    let via = [1, 2, 3].into_iter().find(|n| *n != old).unwrap();
    let mut conn = c.redis(via);
    conn.set::<_, _, ()>("k", "before").unwrap();

    c.pause(old);
    let sent = Instant::now();
    let err = conn
        .set::<_, _, ()>("k", "during")
        .expect_err("a write forwarded to a frozen leader cannot be acknowledged by it");
    let text = err.to_string();
    assert!(
        text.contains("TIMEOUT") && text.contains("commit unknown") && text.contains("now leads"),
        "expected an early 'commit unknown' naming the new leader, got {text:?} after {:?}",
        sent.elapsed()
    );
    // The next read and write go to the new leader.
    let got: String = conn.get("k").unwrap();
    assert!(got == "before" || got == "during", "read {got:?}");
    conn.set::<_, _, ()>("k", "after").unwrap();
    c.resume(old);
}

/// What one pipelining client saw: replies out of their place in the pipeline, and how many
/// replies were errors (writes refused or timed out during the failover).
type OrderViolations = (Vec<String>, u64);

/// Sends pipelines of `GET k; SET k r<round>; GET k` over its own keys through node `via`
/// until `stop`, reconnecting when the connection fails, and checks each reply against the
/// pipeline's order: a GET never sees the SET after it, a GET after an acknowledged SET sees
/// it, and no GET sees a value older than the last acknowledged one.
fn pipeliner(
    c: &Cluster,
    id: usize,
    via: u64,
    rounds_done: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<OrderViolations> {
    let url = c.node(via).redis_url();
    thread::spawn(move || {
        let keys: Vec<String> = (0..16).map(|i| format!("pipe{id}-{i}")).collect();
        // Per key: the last round whose SET was acknowledged, and the last round sent.
        let mut acked = vec![0u64; keys.len()];
        let mut violations = Vec::new();
        let mut errors = 0u64;
        let mut conn: Option<redis::Connection> = None;
        let mut round = 0u64;
        // The round a GET's value came from (0 for nil); None for an error reply.
        let round_of = |v: &redis::Value| -> Option<u64> {
            match v {
                redis::Value::Nil => Some(0),
                redis::Value::BulkString(b) => std::str::from_utf8(b)
                    .ok()
                    .and_then(|s| s.strip_prefix('r'))
                    .and_then(|n| n.parse().ok()),
                _ => None,
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let Some(cn) = conn.as_mut() else {
                conn = redis::Client::open(url.as_str())
                    .unwrap()
                    .get_connection_with_timeout(Duration::from_millis(500))
                    .ok();
                if let Some(cn) = &conn {
                    cn.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                }
                continue;
            };
            round += 1;
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("GET").arg(k);
                pipe.cmd("SET").arg(k).arg(format!("r{round}"));
                pipe.cmd("GET").arg(k);
            }
            // Error replies stay in their place (`query` would fail at the first).
            let packed = pipe.get_packed_pipeline();
            let replies =
                match redis::ConnectionLike::req_packed_commands(cn, &packed, 0, 3 * keys.len()) {
                    Ok(r) => r,
                    Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                        conn = None;
                        continue;
                    }
                    Err(e) => panic!("pipeline round {round}: {e}"),
                };
            for (i, k) in keys.iter().enumerate() {
                let (before, set, after) =
                    (&replies[3 * i], &replies[3 * i + 1], &replies[3 * i + 2]);
                let set_ok = matches!(set, redis::Value::Okay);
                errors += [before, set, after]
                    .iter()
                    .filter(|v| matches!(v, redis::Value::ServerError(_)))
                    .count() as u64;
                let floor = acked[i];
                let mut check = |what: &str, v: &redis::Value, floor: u64, newest: u64| {
                    if let Some(r) = round_of(v) {
                        if r > newest || r < floor {
                            violations.push(format!(
                                "round {round} key {k}: {what} read r{r}; last acknowledged r{floor}, newest allowed r{newest}"
                            ));
                        }
                    }
                };
                check("the GET before the SET", before, floor, round - 1);
                let floor = if set_ok { round } else { floor };
                check("the GET after the SET", after, floor, round);
                acked[i] = floor;
            }
            rounds_done.fetch_add(1, Ordering::Relaxed);
        }
        (violations, errors)
    })
}

/// Pipelines that mix reads and writes keep their order through a node that forwards them,
/// while the leader of some of their partitions is killed and another is elected.
#[test]
fn pipelines_keep_their_order_across_a_leader_kill() {
    let mut c = Cluster::start(bin(), Options::default());
    let victim = c.leader_seen_by(1, 0).expect("partition 0 has a leader");
    let via = *c.live().iter().find(|n| **n != victim).unwrap();
    let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|i| pipeliner(&c, i, via, rounds.clone(), stop.clone()))
        .collect();
    let done = || rounds.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(20), "pipelines answered", || {
        done() >= 20
    });
    c.kill(victim);
    c.wait_new_leader(0, victim, Duration::from_secs(10));
    let after_failover = done();
    wait_until(
        Duration::from_secs(30),
        "pipelines answered after the failover",
        || done() >= after_failover + 20,
    );
    stop.store(true, Ordering::Relaxed);
    let (mut violations, mut errors) = (Vec::new(), 0);
    for t in clients {
        let (v, e) = t.join().unwrap();
        violations.extend(v);
        errors += e;
    }
    eprintln!(
        "{} pipeline rounds, {after_failover} before the new leader; {errors} error replies",
        done()
    );
    assert!(
        violations.is_empty(),
        "{} replies out of their place: {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
}
