//! Each write consistency level keeps its promise (DESIGN.md section 3):
//! `eventual` is acknowledged on the leader's append and can be lost if that leader dies
//! before replicating; `at_least(n)` needs n live copies; `all` is held by every voter when
//! acknowledged; a level that cannot be met fails fast and says it was not committed.

use std::time::Duration;

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};
use serde_json::Value;

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

fn key_in_partition(c: &Cluster, partition: u64) -> String {
    let mut conn = c.redis(1);
    let parts = c.opts.partitions as u64;
    (0..10_000)
        .map(|i| format!("key{i}"))
        .find(|k| {
            let slot: u64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(k)
                .query(&mut conn)
                .unwrap();
            slot * parts / 16384 == partition
        })
        .expect("some key lands in the partition")
}

fn replica_health(c: &Cluster, leader: u64, partition: u64, replica: u64) -> String {
    let state = c.http_get(leader, "/v1/_replication/state").unwrap();
    let part = state["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["partition"].as_u64() == Some(partition))
        .cloned()
        .unwrap();
    part["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node_id"].as_u64() == Some(replica))
        .map(|r| r["health"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

#[test]
fn eventual_write_is_lost_when_its_leader_dies_before_replicating() {
    let opts = Options {
        rebalance_leaders: false,
        write_timeout_ms: 2_000,
        ..Options::default()
    };
    let mut c = Cluster::start(bin(), opts);
    let key = key_in_partition(&c, 0);
    let leader = c.leader_seen_by(1, 0).unwrap();
    let others: Vec<u64> = c.live().into_iter().filter(|n| *n != leader).collect();
    let mut conn = c.redis(leader);
    let _: () = redis::cmd("REPLIKV.CONSISTENCY")
        .arg("eventual")
        .query(&mut conn)
        .unwrap();

    // Phase 1: the leader is cut off, and acknowledges an eventual write it cannot replicate.
    c.cut(leader, &others);
    let acked: redis::RedisResult<()> = conn.set(&key, "doomed");
    acked.expect("eventual is acknowledged once the leader appended the write");

    // Phase 2: the leader dies; the others elect a new one; the old leader returns from disk.
    c.kill(leader);
    for o in &others {
        c.http_post(*o, "/debug/faults", serde_json::json!({"blocked": []}))
            .unwrap();
    }
    c.wait_new_leader_among(0, &others, Duration::from_secs(10));
    c.restart(leader);
    c.wait_converged(Duration::from_secs(20));

    // Phase 3: the acknowledged eventual write is gone everywhere: the documented loss.
    for n in [1, 2, 3] {
        let v: Option<String> = c.redis(n).get(&key).unwrap();
        assert_eq!(v, None, "node {n} still has the lost eventual write");
    }
}

#[test]
fn at_least_and_all_need_live_copies_and_fail_fast_without_them() {
    let opts = Options {
        rebalance_leaders: false,
        write_timeout_ms: 3_000,
        ..Options::default()
    };
    let c = Cluster::start(bin(), opts);
    let key = key_in_partition(&c, 0);
    let leader = c.leader_seen_by(1, 0).unwrap();
    let follower = c.live().into_iter().find(|n| *n != leader).unwrap();
    let rest: Vec<u64> = c.live().into_iter().filter(|n| *n != follower).collect();
    let mut conn = c.redis(leader);

    // Phase 1: with every replica up, `all` is acknowledged only once every voter holds it.
    let w: Value = c
        .http_put(
            leader,
            &format!("/v1/kv/default/{key}?consistency=all"),
            "v1",
        )
        .unwrap();
    let offset = w["offset"].as_u64().unwrap();
    let state = c.http_get(leader, "/v1/_replication/state").unwrap();
    let p0 = state["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["partition"] == 0)
        .unwrap()
        .clone();
    for r in p0["replicas"].as_array().unwrap() {
        assert!(
            r["matched_offset"].as_u64().unwrap() >= offset,
            "replica {} lacks offset {offset} after an `all` ack",
            r["node_id"]
        );
    }

    // Phase 2: one follower is cut off.
    c.cut(follower, &rest);
    wait_until(
        Duration::from_secs(10),
        "the cut follower is UNHEALTHY",
        || replica_health(&c, leader, 0, follower) == "UNHEALTHY",
    );

    // Phase 3: at_least:2 and quorum succeed; at_least:3 and all fail fast, not committed.
    let _: () = redis::cmd("REPLIKV.CONSISTENCY")
        .arg("at_least:2")
        .query(&mut conn)
        .unwrap();
    let _: () = conn.set(&key, "two-copies").unwrap();
    let _: () = redis::cmd("REPLIKV.CONSISTENCY")
        .arg("quorum")
        .query(&mut conn)
        .unwrap();
    let _: () = conn.set(&key, "quorum").unwrap();
    for level in ["at_least:3", "all"] {
        let _: () = redis::cmd("REPLIKV.CONSISTENCY")
            .arg(level)
            .query(&mut conn)
            .unwrap();
        let started = std::time::Instant::now();
        let err = conn.set::<_, _, ()>(&key, level).unwrap_err().to_string();
        assert!(
            err.contains("NOQUORUM") && err.contains("not committed"),
            "{level}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{level} did not fail fast: {:?}",
            started.elapsed()
        );
    }
    let _: () = redis::cmd("REPLIKV.CONSISTENCY")
        .arg("quorum")
        .query(&mut conn)
        .unwrap();
    let v: String = conn.get(&key).unwrap();
    assert_eq!(v, "quorum", "a refused write changed the value");

    // Phase 4: healed, `all` succeeds again and every replica converges.
    c.heal();
    wait_until(
        Duration::from_secs(10),
        "the follower is HEALTHY again",
        || replica_health(&c, leader, 0, follower) == "HEALTHY",
    );
    let _: () = redis::cmd("REPLIKV.CONSISTENCY")
        .arg("all")
        .query(&mut conn)
        .unwrap();
    let _: () = conn.set(&key, "everyone").unwrap();
    c.wait_converged(Duration::from_secs(20));

    // Bad levels are refused and change nothing.
    let err = redis::cmd("REPLIKV.CONSISTENCY")
        .arg("at_least:9")
        .query::<()>(&mut conn);
    assert!(err.is_ok(), "the level is accepted per connection...");
    let err = conn.set::<_, _, ()>(&key, "nine").unwrap_err().to_string();
    assert!(
        err.contains("at_least:9"),
        "...and refused per write: {err}"
    );
    let err = redis::cmd("REPLIKV.CONSISTENCY")
        .arg("sometimes")
        .query::<()>(&mut conn)
        .unwrap_err()
        .to_string();
    assert!(err.contains("allowed: eventual"), "{err}");
}

#[test]
fn wait_counts_replicas_holding_the_connections_writes() {
    let c = Cluster::start(
        bin(),
        Options {
            rebalance_leaders: false,
            ..Options::default()
        },
    );
    let mut conn = c.redis(2);
    let _: () = conn.set("w", "1").unwrap();
    let n: i64 = redis::cmd("WAIT")
        .arg(2)
        .arg(5000)
        .query(&mut conn)
        .unwrap();
    assert_eq!(n, 2);
    let err = redis::cmd("WAIT")
        .arg(1)
        .arg(-1)
        .query::<i64>(&mut conn)
        .unwrap_err()
        .to_string();
    assert!(err.contains("timeout is negative"), "{err}");
}
