//! Regression tests for issue 16, finding 2: expiry was computed on the receiving node's
//! clock. With node 3 of 3 an hour ahead (libfaketime), `SET key-led-by-node-3 x EX 100`
//! sent to node 1 answered OK and then read TTL -2 on every node: the write vanished, while
//! node 1's own replica still showed it with TTL 100. Sent through node 3, the TTL read
//! 3,700.
//!
//! Now a relative expiry is resolved at apply with the leader's time stamp, a TTL is counted
//! by the replica that serves the read, and only a node whose clock is in step with a
//! majority's leads or serves `secondary` reads (`replikv-cluster/src/clock.rs`). These
//! tests set one node's clock an hour off (ahead and behind), from the start and as a jump
//! on a running leader, write keys of every partition through every node, and check on
//! every replica that no acknowledged write vanished and that TTLs agree within the margin.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};

const HOUR_MS: i64 = 3_600_000;
/// How far an expiry may be from what the test's own clock says: twice the default
/// `max_clock_offset_ms` (two in-step nodes may differ by that), and the time a request
/// takes on a busy machine.
const MARGIN_MS: i64 = 1_500;

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

/// The real time, in Unix ms (the test process is not under libfaketime).
fn real_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Partition → (its preferred leader, a hash tag of that partition such as
/// `{key-led-by-node-3-7}`: keys that start with it belong to the partition).
fn keys_by_partition(c: &Cluster) -> BTreeMap<u64, (u64, String)> {
    let state = c.http_get(1, "/v1/_replication/state").unwrap();
    let mut conn = c.redis(1);
    let mut slot = |key: &str| -> u64 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .unwrap()
    };
    state["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let (lo, hi) = (
                p["slots"][0].as_u64().unwrap(),
                p["slots"][1].as_u64().unwrap(),
            );
            let preferred = p["preferred_leader"].as_u64().unwrap();
            let tag = (0..)
                .map(|j| format!("{{key-led-by-node-{preferred}-{j}}}"))
                .find(|k| (lo..=hi).contains(&slot(k)))
                .unwrap();
            (p["partition"].as_u64().unwrap(), (preferred, tag))
        })
        .collect()
}

/// Follower reads node `node` served from its own replica, over every partition.
fn replica_reads(c: &Cluster, node: u64) -> f64 {
    c.http_text(node, "/metrics")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("replikv_reads_total{") && l.contains("served_by=\"replica\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn secondary(c: &Cluster, node: u64) -> redis::Connection {
    c.redis_reading(node, "secondary")
}

/// A key written with `PX ttl_ms` between `invoked` and `acked` (real Unix ms) must be live
/// on every node, with the same absolute expiry everywhere, within the margin of
/// `invoked + ttl_ms ..= acked + ttl_ms`, and a TTL that agrees with it.
fn check_everywhere(c: &Cluster, key: &str, invoked: i64, acked: i64, ttl_ms: i64) {
    let mut expiries = Vec::new();
    for node in [1, 2, 3] {
        for mut conn in [c.redis(node), secondary(c, node)] {
            let read_at = real_ms();
            let v: Option<String> = conn.get(key).unwrap();
            assert_eq!(
                v.as_deref(),
                Some("x"),
                "{key} vanished on node {node} (written at {invoked}..{acked} with a lifetime of {ttl_ms} ms)"
            );
            let at: i64 = redis::cmd("PEXPIRETIME").arg(key).query(&mut conn).unwrap();
            assert!(
                at >= invoked + ttl_ms - MARGIN_MS && at <= acked + ttl_ms + MARGIN_MS,
                "{key}: expiry {at} on node {node}, not within {invoked}+{ttl_ms}..{acked}+{ttl_ms}"
            );
            let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).unwrap();
            let left = at - read_at;
            assert!(
                (pttl - left).abs() <= MARGIN_MS,
                "{key}: PTTL {pttl} on node {node}, but {left} ms are left by the test's clock"
            );
            expiries.push(at);
        }
    }
    assert!(
        expiries.windows(2).all(|w| w[0] == w[1]),
        "{key}: replicas disagree on its expiry: {expiries:?}"
    );
}

fn node_clock_in_step(c: &Cluster, node: u64) -> bool {
    c.clock_in_step(node)
}

/// Node 3 runs `offset_ms` off from the start: it never leads, and keys of every partition
/// (among them the ones node 3 would lead) written through every node keep their TTLs.
fn one_node_off_from_the_start(offset_ms: i64) {
    let opts = Options {
        partitions: 3,
        clock_offsets: [(3, offset_ms)].into(),
        ..Options::default()
    };
    let c = Cluster::start(bin(), opts);
    assert!(node_clock_in_step(&c, 1) && node_clock_in_step(&c, 2));
    wait_until(
        Duration::from_secs(5),
        "node 3 knows it is out of step",
        || {
            !node_clock_in_step(&c, 3)
                && c.http_get(3, "/v1/_replication/state").unwrap()["clock"]["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|p| {
                        p["offset_ms"]
                            .as_i64()
                            .is_some_and(|o| (o + offset_ms).abs() < 1_000)
                    })
        },
    );
    assert!(c.led_by(3).is_empty(), "node 3 leads {:?}", c.led_by(3));
    assert_eq!(c.metric(3, "replikv_clock_in_step"), 0.0);
    assert_eq!(c.metric(1, "replikv_clock_in_step"), 1.0);

    let keys = keys_by_partition(&c);
    assert!(keys.values().any(|(pref, _)| *pref == 3), "{keys:?}");
    let mut written = Vec::new();
    for (_, tag) in keys.values() {
        for via in [1, 2, 3] {
            let key = format!("{tag}-via-{via}");
            let invoked = real_ms();
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg("x")
                .arg("EX")
                .arg(100)
                .query(&mut c.redis(via))
                .unwrap();
            written.push((key, invoked, real_ms()));
        }
    }
    for (key, invoked, acked) in &written {
        check_everywhere(&c, key, *invoked, *acked, 100_000);
        // EXPIRE through the skewed node is resolved by the leader too.
        let n: i64 = c.redis(3).pexpire(key, 50_000).unwrap();
        assert_eq!(n, 1);
    }
    let renewed = real_ms();
    for (key, _, _) in &written {
        check_everywhere(&c, key, renewed - 5_000, renewed, 50_000);
    }
    assert_eq!(
        replica_reads(&c, 3),
        0.0,
        "node 3 served secondary reads with a clock out of step"
    );
    assert!(
        replica_reads(&c, 1) + replica_reads(&c, 2) > 0.0,
        "no follower read was served at all"
    );
    c.wait_converged(Duration::from_secs(20));
}

#[test]
fn a_node_an_hour_ahead_never_leads_and_no_write_through_any_node_vanishes() {
    one_node_off_from_the_start(HOUR_MS);
}

#[test]
fn a_node_an_hour_behind_never_leads_and_every_replica_agrees_on_ttls() {
    one_node_off_from_the_start(-HOUR_MS);
}

/// Node 3 leads a partition when its wall clock jumps by `jump_ms`: writes keep being
/// acknowledged through node 1 and node 3 while it notices, none is stamped with the jumped
/// clock, and it hands its partitions over. When its clock comes back, so does its
/// leadership (the rebalancer).
fn a_leader_whose_clock_jumps(jump_ms: i64) {
    let opts = Options {
        partitions: 3,
        clock_offsets: [(1, 0), (2, 0), (3, 0)].into(),
        ..Options::default()
    };
    let mut c = Cluster::start(bin(), opts);
    wait_until(Duration::from_secs(20), "node 3 leads a partition", || {
        !c.led_by(3).is_empty()
    });
    let keys = keys_by_partition(&c);
    let led: Vec<String> = c.led_by(3).iter().map(|p| keys[p].1.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = [1u64, 3]
        .into_iter()
        .map(|via| {
            let (stop, acked, led) = (stop.clone(), acked.clone(), led.clone());
            let url = c.node(via).redis_url();
            std::thread::spawn(move || {
                let mut conn = redis::Client::open(url.as_str())
                    .unwrap()
                    .get_connection()
                    .unwrap();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("{}-{via}-{i}", led[i % led.len()]);
                    let invoked = real_ms();
                    let r: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(&key)
                        .arg("x")
                        .arg("PX")
                        .arg(60_000)
                        .query(&mut conn);
                    // Refusals (a transfer under way) are fine; acknowledged writes must last.
                    if r.is_ok() {
                        acked.lock().unwrap().push((key, invoked, real_ms()));
                    }
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(10), "writes flow", || {
        acked.lock().unwrap().len() > 20
    });
    c.set_clock_offset(3, jump_ms);
    let jumped = std::time::Instant::now();
    wait_until(
        Duration::from_secs(15),
        "node 3 hands over what it led",
        || !node_clock_in_step(&c, 3) && c.led_by(3).is_empty(),
    );
    let after_handover = acked.lock().unwrap().len();
    eprintln!(
        "node 3 out of step and leading nothing {} ms after its clock jumped {jump_ms} ms",
        jumped.elapsed().as_millis()
    );
    wait_until(
        Duration::from_secs(10),
        "writes flow after the hand-over",
        || acked.lock().unwrap().len() > after_handover + 20,
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for (key, invoked, done) in acked.iter().step_by((acked.len() / 40).max(1)) {
        check_everywhere(&c, key, *invoked, *done, 60_000);
    }
    // Every acknowledged write is there with an expiry its own time explains (the digests
    // then show every replica holds the same).
    let mut conn = c.redis(2);
    for (key, invoked, done) in &acked {
        let v: Option<String> = conn.get(key).unwrap();
        assert_eq!(v.as_deref(), Some("x"), "{key} vanished");
        let at: i64 = redis::cmd("PEXPIRETIME").arg(key).query(&mut conn).unwrap();
        assert!(
            at >= invoked + 60_000 - MARGIN_MS && at <= done + 60_000 + MARGIN_MS,
            "{key}: expiry {at}, written at {invoked}..{done} with PX 60000"
        );
    }
    eprintln!("{} acknowledged writes checked", acked.len());
    c.wait_converged(Duration::from_secs(20));

    // The clock comes back: node 3 is in step again and takes its partition back.
    c.set_clock_offset(3, 0);
    wait_until(
        Duration::from_secs(30),
        "node 3 leads again once its clock is back",
        || node_clock_in_step(&c, 3) && !c.led_by(3).is_empty(),
    );
}

#[test]
fn a_leader_whose_clock_jumps_an_hour_ahead_hands_over_and_stamps_nothing_with_it() {
    a_leader_whose_clock_jumps(HOUR_MS);
}

#[test]
fn a_leader_whose_clock_jumps_an_hour_back_hands_over_and_stamps_nothing_with_it() {
    a_leader_whose_clock_jumps(-HOUR_MS);
}
