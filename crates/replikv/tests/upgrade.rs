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
