//! Real Redis clients against a real 3-node cluster: the `redis` crate and `redis-cli`.
//! Any node accepts any key; writes reach the partition's leader by forwarding.

use std::process::Command;
use std::time::Duration;

use redis::Commands;
use replikv_testkit::{Cluster, Options};

fn cluster() -> Cluster {
    Cluster::start(env!("CARGO_BIN_EXE_replikv").as_ref(), Options::default())
}

#[test]
fn redis_crate_strings_keys_and_expiry_on_any_node() {
    let c = cluster();
    let mut n1 = c.redis(1);
    let mut n2 = c.redis(2);
    let mut n3 = c.redis(3);

    // Phase 1: writes on one node are read on every node (primary reads).
    for i in 0..50 {
        let _: () = n1.set(format!("k{i}"), format!("v{i}")).unwrap();
    }
    for i in 0..50 {
        let v: String = n2.get(format!("k{i}")).unwrap();
        assert_eq!(v, format!("v{i}"));
    }
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut n3).unwrap();
    assert_eq!(dbsize, 50);

    // Phase 2: the strings family.
    assert_eq!(n3.incr::<_, _, i64>("counter", 5).unwrap(), 5);
    assert_eq!(n1.incr::<_, _, i64>("counter", 1).unwrap(), 6);
    assert_eq!(n2.decr::<_, _, i64>("counter", 2).unwrap(), 4);
    assert_eq!(n1.append::<_, _, i64>("s", "ab").unwrap(), 2);
    assert_eq!(n2.append::<_, _, i64>("s", "cd").unwrap(), 4);
    assert_eq!(n3.strlen::<_, i64>("s").unwrap(), 4);
    let _: () = redis::cmd("MSET")
        .arg("m1")
        .arg("a")
        .arg("m2")
        .arg("b")
        .query(&mut n1)
        .unwrap();
    let got: Vec<Option<String>> = n2.mget(&["m1", "m2", "missing"]).unwrap();
    assert_eq!(got, vec![Some("a".into()), Some("b".into()), None]);
    let nx: bool = n1.set_nx("m1", "z").unwrap();
    assert!(!nx);
    let old: Option<String> = redis::cmd("SET")
        .arg("m1")
        .arg("c")
        .arg("GET")
        .query(&mut n3)
        .unwrap();
    assert_eq!(old.as_deref(), Some("a"));
    let deleted: i64 = n2.del(&["m1", "m2", "missing"]).unwrap();
    assert_eq!(deleted, 2);
    let taken: Option<String> = redis::cmd("GETDEL").arg("s").query(&mut n1).unwrap();
    assert_eq!(taken.as_deref(), Some("abcd"));
    assert!(!n1.exists::<_, bool>("s").unwrap());

    // Phase 3: expiry.
    let _: () = redis::cmd("SET")
        .arg("ttl")
        .arg("v")
        .arg("EX")
        .arg(100)
        .query(&mut n1)
        .unwrap();
    let ttl: i64 = n2.ttl("ttl").unwrap();
    assert!((98..=100).contains(&ttl), "ttl {ttl}");
    let _: () = redis::cmd("PEXPIRE")
        .arg("ttl")
        .arg(1)
        .query(&mut n3)
        .unwrap();
    replikv_testkit::wait_until(Duration::from_secs(5), "key expires", || {
        !n1.exists::<_, bool>("ttl").unwrap()
    });
    assert_eq!(n2.ttl::<_, i64>("ttl").unwrap(), -2);

    // Phase 4: KEYS and SCAN see every partition.
    let mut keys: Vec<String> = n1.keys("k1*").unwrap();
    keys.sort();
    assert_eq!(keys.len(), 11, "{keys:?}");
    let scanned: Vec<String> = n3.scan_match("k*").unwrap().collect();
    assert_eq!(scanned.len(), 50);
}

#[test]
fn redis_cli_talks_to_every_node() {
    if Command::new("redis-cli").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "redis-cli must be installed in CI (.ci/run installs redis-tools)"
        );
        eprintln!("redis-cli is not installed; skipping");
        return;
    }
    let c = cluster();
    let cli = |node: u64, args: &[&str]| -> String {
        let out = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &c.node(node).resp.port().to_string(),
            ])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(1, &["SET", "hello", "world"]), "OK");
    assert_eq!(cli(3, &["GET", "hello"]), "world");
    assert_eq!(cli(2, &["PING"]), "PONG");
    assert!(cli(2, &["INFO", "replication"]).contains("# Replication"));
    assert!(cli(1, &["CLUSTER", "KEYSLOT", "foo"]).contains("12182"));
    assert!(cli(1, &["NOSUCHCOMMAND"]).contains("unknown command"));
    assert_eq!(cli(1, &["WAIT", "2", "5000"]), "2");
}

#[test]
fn redirect_mode_answers_moved_to_the_leader_like_redis_cluster() {
    let c = Cluster::start(
        env!("CARGO_BIN_EXE_replikv").as_ref(),
        Options {
            partitions: 2,
            redirect: true,
            rebalance_leaders: false,
            ..Options::default()
        },
    );
    let leader = c.wait_new_leader(0, 0, Duration::from_secs(10));
    let other = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    // A key of partition 0 (slots 0..8191 of 2 partitions).
    let mut probe = c.redis(leader);
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| {
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(k)
                .query::<u64>(&mut probe)
                .unwrap()
                < 8192
        })
        .unwrap();
    let slot: u64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&key)
        .query(&mut probe)
        .unwrap();
    let err = c.redis(other).set::<_, _, ()>(&key, "v").unwrap_err();
    assert_eq!(err.kind(), redis::ErrorKind::Moved, "{err}");
    let (addr, moved_slot) = err.redirect_node().expect("a MOVED target");
    assert_eq!(moved_slot as u64, slot);
    assert_eq!(addr, c.node(leader).resp.to_string());
    let _: () = probe.set(&key, "v").unwrap();
    let v: String = c.redis(other).get(&key).unwrap();
    assert_eq!(
        v, "v",
        "reads are still served (forwarded) in redirect mode"
    );
}
