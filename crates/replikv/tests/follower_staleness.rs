//! Regression tests for what the chaos campaign found (docs/RELIABILITY.md): follower reads
//! were served staler than `max_lag_ms` after a paused follower resumed, and on the minority
//! side of a split where a deposed leader kept heartbeating its follower. A replica measured
//! its staleness from when AppendEntries *arrived*; messages delivered late (after SIGSTOP,
//! after a partition) or sent by a deposed leader made it look current. It now measures from
//! its own ping's send time and the leader's last quorum acknowledgement (cluster `lag.rs`).

use std::time::{Duration, Instant};

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};

const MAX_LAG_MS: u64 = 1_000;

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

fn secondary(c: &Cluster, node: u64) -> redis::Connection {
    c.redis_reading(node, "secondary")
}

#[test]
fn pause_one_a_resumed_follower_serves_no_read_staler_than_max_lag() {
    let opts = Options {
        partitions: 1,
        max_lag_ms: MAX_LAG_MS,
        rebalance_leaders: false,
        ..Options::default()
    };
    let c = Cluster::start(bin(), opts);
    let leader = c.wait_new_leader(0, 0, Duration::from_secs(10));
    // A follower serves `secondary` reads only once its clock is vouched for (clock.rs).
    c.wait_ready(Duration::from_secs(10));
    let follower = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    let mut writer = c.redis(leader);
    let _: () = writer.set("k", 0).unwrap();
    let mut reader = secondary(&c, follower);
    wait_until(Duration::from_secs(10), "the follower holds k = 0", || {
        reader.get::<_, Option<i64>>("k").ok().flatten() == Some(0)
    });

    c.pause(follower);
    let paused = Instant::now();
    // While it is frozen the leader keeps sending it heartbeats, which queue in its socket
    // with the commit offset of k = 0; wait until the leader has given up on it.
    wait_until(
        Duration::from_secs(15),
        "the leader reports the frozen follower UNHEALTHY",
        || {
            c.http_get(leader, "/api/replication/stats")
                .ok()
                .and_then(|v| {
                    v["replicas"].as_array().map(|rs| {
                        rs.iter().any(|r| {
                            r["node_id"].as_u64() == Some(follower) && r["health"] == "UNHEALTHY"
                        })
                    })
                })
                .unwrap_or(false)
        },
    );
    for i in 1..=20 {
        let _: () = writer.set("k", i).unwrap();
    }
    // Everything the follower lacks is now older than max_lag_ms, by a margin.
    let stale_since = Instant::now();
    wait_until(Duration::from_secs(10), "max_lag_ms passes twice", || {
        stale_since.elapsed() > Duration::from_millis(2 * MAX_LAG_MS)
    });
    // The read is queued while the follower is frozen, so it meets the follower's backlog
    // of late AppendEntries when it wakes.
    let read = std::thread::spawn(move || reader.get::<_, i64>("k"));
    c.resume(follower);
    match read.join().unwrap() {
        Ok(v) => assert_eq!(
            v,
            20,
            "a follower frozen for {:?} served k = {v}, which is stale by more than max_lag_ms",
            paused.elapsed()
        ),
        Err(e) => eprintln!("refused, as allowed: {e}"),
    }
}

#[test]
fn split_a_follower_with_a_deposed_leader_refuses_reads_staler_than_max_lag() {
    let opts = Options {
        nodes: 5,
        // Every node a replica, so the deposed leader and its follower are a minority.
        factor: 5,
        partitions: 1,
        max_lag_ms: MAX_LAG_MS,
        rebalance_leaders: false,
        namespaces: true,
        ..Options::default()
    };
    let c = Cluster::start(bin(), opts);
    let old = c.wait_new_leader(0, 0, Duration::from_secs(10));
    // A follower serves `secondary` reads only once its clock is vouched for (clock.rs).
    c.wait_ready(Duration::from_secs(10));
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    let follower = ids.iter().copied().find(|n| *n != old).unwrap();
    let majority: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|n| *n != old && *n != follower)
        .collect();
    let mut writer = c.redis(majority[0]);
    let _: () = writer.set("k", "before").unwrap();
    let mut reader = secondary(&c, follower);
    wait_until(
        Duration::from_secs(10),
        "the follower holds the write",
        || {
            reader
                .get::<_, Option<String>>("k")
                .ok()
                .flatten()
                .as_deref()
                == Some("before")
        },
    );

    // The old leader keeps its follower; the other three elect a new leader and move on.
    c.partition(&[vec![old, follower], majority.clone()])
        .unwrap();
    c.wait_new_leader_among(0, &majority, Duration::from_secs(15));
    let _: () = writer.set("k", "after").unwrap();
    let moved_on = Instant::now();
    wait_until(Duration::from_secs(10), "max_lag_ms passes twice", || {
        moved_on.elapsed() > Duration::from_millis(2 * MAX_LAG_MS)
    });
    for _ in 0..20 {
        if let Ok(Some(v)) = reader.get::<_, Option<String>>("k") {
            assert_eq!(
                v, "after",
                "a follower cut off with a deposed leader served a value stale by more than \
                 max_lag_ms"
            );
        }
    }
    c.heal();
}
