//! A full disk (issue 16, finding 3): a write that cannot be made durable fails with a clear
//! `-MISCONF` error and changes nothing; reads of what is applied keep working; `/ready`
//! says why it is not ready; and when space returns the node takes writes again by itself,
//! without a restart, with every acknowledged write present (docs/design/durability.md,
//! "A full disk"). Each node under test has its data directory on a tmpfs (needs root).

use std::time::Duration;

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

const MIB: u64 = 1 << 20;
/// Large values fill the disk in a few thousand writes.
const VALUE_BYTES: usize = 8 << 10;

fn value(i: usize) -> Vec<u8> {
    let mut v = vec![b'a' + (i % 26) as u8; VALUE_BYTES];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v
}

/// What a write through `via` got: acknowledged, refused for the disk, or refused for a
/// moment (leadership moving).
enum Outcome {
    Acked,
    Misconf(String),
    Retry,
}

fn set(conn: &mut redis::Connection, i: usize) -> Outcome {
    match conn.set::<_, _, ()>(format!("k{i}"), value(i)) {
        Ok(()) => Outcome::Acked,
        Err(e) if e.code() == Some("MISCONF") => Outcome::Misconf(e.to_string()),
        Err(e) if matches!(e.code(), Some("TRYAGAIN" | "CLUSTERDOWN" | "NOQUORUM")) => {
            Outcome::Retry
        }
        Err(e) => panic!("write k{i}: unexpected error {e}"),
    }
}

fn assert_present(c: &Cluster, via: u64, acked: &[usize]) {
    let mut conn = c.redis(via);
    for &i in acked {
        let got: Option<Vec<u8>> = conn.get(format!("k{i}")).unwrap();
        assert!(
            got.as_deref() == Some(&value(i)[..]),
            "acknowledged write k{i} lost (read through node {via})"
        );
    }
}

fn ready_reason(c: &Cluster, id: u64) -> Option<String> {
    c.readiness(id).err()
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_resumes_when_space_returns_on_a_single_node() {
    let mut c = Cluster::start(
        bin(),
        Options {
            nodes: 1,
            factor: 1,
            tmpfs: [(1, 96 * MIB)].into(),
            min_free_bytes: Some(40 * MIB),
            ..Options::default()
        },
    );
    let mut conn = c.redis(1);
    let mut acked = Vec::new();
    let refusal = (0..20_000)
        .find_map(|i| match set(&mut conn, i) {
            Outcome::Acked => {
                acked.push(i);
                None
            }
            Outcome::Misconf(e) => Some(e),
            Outcome::Retry => panic!("a single node asked to retry k{i}"),
        })
        .expect("the disk never filled");
    assert!(refusal.contains("min_free_bytes"), "{refusal}");
    assert!(!acked.is_empty());
    // Nothing of a refused write was kept, and reads go on.
    let size: usize = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(size, acked.len());
    assert_present(&c, 1, &acked);
    let reason = ready_reason(&c, 1).expect("/ready answered 200 on a full disk");
    assert!(reason.contains("min_free_bytes"), "{reason}");
    assert_eq!(c.metric(1, "replikv_storage_disk_full"), 1.0);
    assert!(
        c.node(1).log_text().contains("disk full"),
        "{}",
        c.node(1).log_tail()
    );

    c.resize_tmpfs(1, 512 * MIB).unwrap();
    let next = acked.last().unwrap() + 1;
    wait_until(Duration::from_secs(10), "writes accepted again", || {
        matches!(set(&mut conn, next), Outcome::Acked)
    });
    acked.push(next);
    wait_until(Duration::from_secs(10), "ready again", || {
        ready_reason(&c, 1).is_none()
    });
    assert_eq!(c.metric(1, "replikv_storage_disk_full"), 0.0);
    assert_present(&c, 1, &acked);
    // And it survives a restart with all of it.
    c.kill(1);
    c.restart(1);
    c.wait_ready(Duration::from_secs(20));
    assert_present(&c, 1, &acked);
}

#[test]
fn a_replica_with_a_full_disk_hands_off_leadership_lags_and_catches_up_when_space_returns() {
    let full = 3;
    let c = Cluster::start(
        bin(),
        Options {
            tmpfs: [(full, 96 * MIB)].into(),
            min_free_bytes: Some(40 * MIB),
            ..Options::default()
        },
    );
    let mut conn = c.redis(1);
    let mut acked = Vec::new();
    let mut i = 0;
    // Fill until the tmpfs node refuses, then write as much again: the other two replicas
    // are a majority, so writes go on once its leaderships have moved.
    let mut after_full = 0;
    while after_full < 1_000 {
        assert!(i < 40_000, "node {full}'s disk never filled");
        match set(&mut conn, i) {
            Outcome::Acked => acked.push(i),
            Outcome::Misconf(e) => assert!(e.contains(&format!("node {full}")), "{e}"),
            Outcome::Retry => {}
        }
        if after_full > 0 || (i % 100 == 0 && c.metric(full, "replikv_storage_disk_full") == 1.0) {
            after_full += 1;
        }
        i += 1;
    }
    wait_until(
        Duration::from_secs(20),
        "the full node leads nothing",
        || c.led_by(full).is_empty(),
    );
    let reason = ready_reason(&c, full).expect("/ready answered 200 on a full disk");
    assert!(reason.contains("min_free_bytes"), "{reason}");
    // Reads through the full node work (it forwards them to the leaders).
    assert_present(&c, full, &acked[acked.len() - 100..]);

    c.resize_tmpfs(full, 1024 * MIB).unwrap();
    wait_until(Duration::from_secs(20), "ready again", || {
        ready_reason(&c, full).is_none()
    });
    c.wait_converged(Duration::from_secs(60));
    assert_present(&c, full, &acked);
    wait_until(Duration::from_secs(30), "the node leads again", || {
        !c.led_by(full).is_empty()
    });
}
