//! Upgrades: a data directory written by an older build opens with this one and serves what
//! it held (STYLE.md: every format change comes with an upgrade path and a fixture of the old
//! format). The fixtures and how they were made: `tests/fixtures/README.md`.

use std::path::PathBuf;
use std::time::Duration;

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

fn fixture(name: &str) -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect()
}

/// (key, value, PEXPIRETIME) the version 2 fixture holds; -1: no expiry, -2: absent.
const V2_KEYS: &[(&str, Option<&str>, i64)] = &[
    ("plain", Some("hello world"), -1),
    ("far-exat", Some("v-exat"), 4_102_444_800_000),
    ("far-pxat", Some("v-pxat"), 4_102_444_800_123),
    ("counter", Some("42"), -1),
    ("m1", Some("a"), -1),
    ("m2", Some("b"), -1),
    ("m3", None, -2),
    ("persisted", Some("p"), -1),
    ("exp-later", Some("e"), 4_133_980_800_000),
    ("gone", None, -2),
    ("long-ex", Some("lx"), 1_896_643_876_373),
    ("nx-key", Some("first"), -1),
];

#[test]
fn a_data_directory_of_log_format_2_opens_and_serves_its_keys() {
    let opts = Options {
        nodes: 1,
        partitions: 2,
        seed_data: [(1, fixture("v2-single-node.tar.gz"))].into(),
        ..Options::default()
    };
    let mut c = Cluster::start(bin(), opts);
    let check = |c: &Cluster| {
        let mut conn = c.redis(1);
        for (key, value, at) in V2_KEYS {
            let got: Option<String> = conn.get(key).unwrap();
            assert_eq!(got.as_deref(), *value, "{key}");
            let expire: i64 = redis::cmd("PEXPIRETIME").arg(key).query(&mut conn).unwrap();
            assert_eq!(expire, *at, "PEXPIRETIME of {key}");
        }
        let n: i64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
        assert_eq!(n, 10);
    };
    check(&c);

    // It takes writes on top of the old log, and opens again after a `kill -9`.
    let mut conn = c.redis(1);
    let _: () = conn.set("after-upgrade", "new").unwrap();
    let n: i64 = conn.incr("counter", 1).unwrap();
    assert_eq!(n, 43);
    let _: i64 = conn.decr("counter", 1).unwrap();
    drop(conn);
    c.kill(1);
    c.restart(1);
    c.wait_ready(Duration::from_secs(30));
    wait_until(Duration::from_secs(10), "the restarted node serves", || {
        c.redis(1).get::<_, Option<String>>("after-upgrade").ok() == Some(Some("new".into()))
    });
    let mut conn = c.redis(1);
    let n: i64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(n, 11);
    let _: i64 = conn.del("after-upgrade").unwrap();
    check(&c);
}

/// The version 3 fixture: a snapshot, a checkpointed state file and log records of layout 1
/// (before groups were named by keyspace and partition). `DBSIZE` was 20006.
#[test]
fn a_data_directory_of_log_layout_1_with_snapshots_opens_and_serves_its_keys() {
    let opts = Options {
        nodes: 1,
        partitions: 2,
        snapshot_every_entries: 50,
        backlog_entries: 10,
        seed_data: [(1, fixture("v3-snapshot-single-node.tar.gz"))].into(),
        ..Options::default()
    };
    let mut c = Cluster::start(bin(), opts);
    let check = |c: &Cluster, extra: i64| {
        let mut conn = c.redis(1);
        let n: i64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
        assert_eq!(n, 20_006 + extra);
        for i in (0..20_000).step_by(997).chain([8, 19_999]) {
            let got: Option<String> = conn.get(format!("bulk:{i}")).unwrap();
            let want = format!("value-{i}-{}", "x".repeat(i % 17));
            assert_eq!(got, Some(want), "bulk:{i}");
        }
        let tail: Option<String> = conn.get("bulk:7").unwrap();
        assert_eq!(tail.as_deref(), Some("value-7-xxxxxxx-tail"));
        for gone in ["bulk:5", "bulk:6", "probe"] {
            let got: Option<String> = conn.get(gone).unwrap();
            assert_eq!(got, None, "{gone}");
        }
        for k in 0..7 {
            // 100 INCRs over ctr:0..ctr:6: ctr:0 and ctr:1 got 15, the rest 14.
            let got: i64 = conn.get(format!("ctr:{k}")).unwrap();
            assert_eq!(got, if k < 2 { 15 } else { 14 }, "ctr:{k}");
        }
        let at: i64 = redis::cmd("PEXPIRETIME")
            .arg("far")
            .query(&mut conn)
            .unwrap();
        assert_eq!(at, 4_102_444_800_000);
    };
    check(&c, 0);

    // Writes on top of it, past more snapshots, and a `kill -9`: the log goes on in layout 2
    // after the old records, and the whole opens again.
    let mut conn = c.redis(1);
    for i in 0..500 {
        let _: () = conn.set(format!("after:{i}"), i).unwrap();
    }
    let n: i64 = conn.incr("ctr:0", 1).unwrap();
    assert_eq!(n, 16);
    let _: i64 = conn.decr("ctr:0", 1).unwrap();
    drop(conn);
    c.kill(1);
    c.restart(1);
    c.wait_ready(Duration::from_secs(30));
    wait_until(Duration::from_secs(10), "the restarted node serves", || {
        c.redis(1).get::<_, Option<String>>("after:499").ok() == Some(Some("499".into()))
    });
    check(&c, 500);
}
