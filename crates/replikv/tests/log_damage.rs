//! Damage to the newest Raft log segment (issue 16, finding 1): a record that fails its
//! checksum with valid records after it is damage of the medium, not a torn write, and must
//! never be cut silently (docs/design/durability.md, "The tear rule").
//!
//! - A single node refuses to start, naming the file and the offset, and changes nothing.
//! - In a 3-node cluster one damaged replica cuts at the damage, votes as if it still held
//!   what it lost until the leader has sent it again, and heals: nothing lost, digests equal.
//! - With two of three replicas damaged and the third down, no leader is elected (the group
//!   refuses rather than losing commits); when the intact replica returns, the group heals.
//! - A true torn tail (the last record cut short by a crash) is still cut, and the node serves.

use std::time::{Duration, Instant};

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

/// Writes `n` keys `{prefix}{i}` = i through node `via`, in pipelines of 100.
fn fill(c: &Cluster, via: u64, prefix: &str, n: usize) {
    let mut conn = c.redis(via);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.set(format!("{prefix}{i}"), *i).ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
}

/// Every key `{prefix}{i}` for i < n reads back as i through node `via`.
fn assert_all_present(c: &Cluster, via: u64, prefix: &str, n: usize) {
    let mut conn = c.redis(via);
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    for chunk in keys.chunks(500) {
        let got: Vec<Option<usize>> = conn.mget(chunk).unwrap();
        for (k, v) in chunk.iter().zip(got) {
            let want: usize = k[prefix.len()..].parse().unwrap();
            assert_eq!(
                v,
                Some(want),
                "acknowledged key {k} lost (read through node {via})"
            );
        }
    }
}

fn recovering(c: &Cluster, id: u64) -> Vec<u64> {
    c.recovering(id).expect("replication state")
}

#[test]
fn damage_in_the_newest_segment_of_a_single_node_refuses_to_start_and_changes_nothing() {
    let mut c = Cluster::start(
        bin(),
        Options {
            nodes: 1,
            factor: 1,
            ..Options::default()
        },
    );
    fill(&c, 1, "k", 5_000);
    c.kill(1);
    let (path, written) = c.newest_log_segment(1);
    let intact = std::fs::read(&path).unwrap();
    // The start (past the open's checkpoint), the middle, and the end (valid records still
    // after the damaged one).
    for fraction in [0.05, 0.5, 0.97] {
        let (_, at) = c.damage_log(1, fraction, 16);
        let damaged = std::fs::read(&path).unwrap();
        let why = c
            .try_restart(1)
            .expect_err("a single node started on a damaged log");
        assert!(why.contains(&path.display().to_string()), "{why}");
        assert!(why.contains("damage of the medium"), "{why}");
        assert!(why.contains("no replica but this node"), "{why}");
        assert!(why.contains("truncate -s"), "{why}");
        assert!(
            (at.saturating_sub(2_000)..=at).any(|o| why.contains(&format!("offset {o}:"))),
            "the message names an offset at or just before the damage ({at} of {written}): {why}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            damaged,
            "the refusal changed the segment"
        );
        std::fs::write(&path, &intact).unwrap();
    }
    c.restart(1);
    c.wait_ready(Duration::from_secs(20));
    assert_all_present(&c, 1, "k", 5_000);
}

#[test]
fn one_damaged_replica_heals_from_the_leader_and_loses_nothing() {
    let mut c = Cluster::start(
        bin(),
        Options {
            rebalance_leaders: true,
            ..Options::default()
        },
    );
    fill(&c, 1, "k", 3_000);
    c.wait_converged(Duration::from_secs(30));
    let victim = 3;
    c.kill(victim);
    c.damage_log(victim, 0.5, 16);
    c.restart(victim);
    let log = c.node(victim).log_text();
    assert!(
        log.contains("the Raft log was damaged; cut at the damage"),
        "{}",
        c.node(victim).log_tail()
    );
    assert!(
        !log.contains("cutting a torn tail"),
        "damage was cut as a tear"
    );
    // New writes make every leader send the damaged replica what it lost.
    fill(&c, 1, "after", 400);
    wait_until(
        Duration::from_secs(30),
        "the damaged replica recovered",
        || recovering(&c, victim).is_empty(),
    );
    c.wait_converged(Duration::from_secs(30));
    assert_all_present(&c, victim, "k", 3_000);
    // A recovered replica leads again (the rebalancer gives it back its partitions).
    wait_until(Duration::from_secs(30), "the replica leads again", || {
        !c.led_by(victim).is_empty()
    });
}

#[test]
fn two_damaged_replicas_elect_no_leader_until_the_intact_one_returns() {
    let mut c = Cluster::start(
        bin(),
        Options {
            rebalance_leaders: false,
            ..Options::default()
        },
    );
    fill(&c, 1, "k", 3_000);
    c.wait_converged(Duration::from_secs(30));
    for n in [1, 2, 3] {
        c.kill(n);
    }
    c.damage_log(1, 0.5, 16);
    c.damage_log(2, 0.4, 16);
    c.restart(1);
    c.restart(2);
    for n in [1, 2] {
        assert!(
            !recovering(&c, n).is_empty(),
            "node {n} is not recovering: {}",
            c.node(n).log_tail()
        );
    }
    // Observed over several election timeouts (0.3 to 0.6 s): neither damaged replica may
    // lead, and each refuses the other's log (it would lack writes both acknowledged).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for n in [1, 2] {
            let led = c.led_by(n);
            assert!(led.is_empty(), "damaged node {n} leads {led:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.restart(3);
    c.wait_ready(Duration::from_secs(30));
    assert_all_present(&c, 1, "k", 3_000);
    fill(&c, 2, "after", 400);
    wait_until(Duration::from_secs(30), "both replicas recovered", || {
        recovering(&c, 1).is_empty() && recovering(&c, 2).is_empty()
    });
    c.wait_converged(Duration::from_secs(30));
    for n in [1, 2, 3] {
        assert_all_present(&c, n, "k", 3_000);
    }
}

#[test]
fn a_true_torn_tail_is_cut_and_the_node_serves() {
    let mut c = Cluster::start(
        bin(),
        Options {
            rebalance_leaders: false,
            ..Options::default()
        },
    );
    fill(&c, 1, "k", 200);
    c.wait_converged(Duration::from_secs(20));
    let victim = 3;
    c.kill(victim);
    // A crash in the middle of the last write: the last 100 bytes never reached the file.
    let (path, written) = c.newest_log_segment(victim);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..written - 100]).unwrap();
    c.restart(victim);
    assert!(
        c.node(victim).log_text().contains("cutting a torn tail"),
        "{}",
        c.node(victim).log_tail()
    );
    assert!(recovering(&c, victim).is_empty(), "a tear is not damage");
    fill(&c, 1, "after", 50);
    c.wait_converged(Duration::from_secs(30));
    let v: i64 = c.redis(victim).get("k199").unwrap();
    assert_eq!(v, 199);
}
