//! Expiry as Redis has it (DESIGN.md section 4, the EXPIRE family), with replikv's rule that
//! time comes from the log: a relative expiry is resolved at apply with the entry's time
//! stamp, so every replica stores the same absolute time.
//!
//! The expected answers were read from redis-server 7.0.15 (Debian's `redis-server`) on
//! loopback, command for command.

use std::time::Duration;

use redis::{Commands, Value};
use replikv_testkit::{wait_until, Cluster, Options};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

/// The reply to `args`, an error as its text.
fn ask(conn: &mut redis::Connection, args: &[&str]) -> Result<Value, String> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query::<Value>(conn).map_err(|e| {
        // The redis crate splits "ERR text" into a kind and a detail.
        format!("{} {}", e.code().unwrap_or(""), e.detail().unwrap_or(""))
            .trim()
            .to_string()
    })
}

fn int(conn: &mut redis::Connection, args: &[&str]) -> i64 {
    match ask(conn, args) {
        Ok(Value::Int(n)) => n,
        other => panic!("{args:?}: {other:?}"),
    }
}

#[test]
fn the_expire_family_answers_as_redis_7_does() {
    let c = Cluster::start(bin(), Options::default());
    // Through different nodes, so that some requests are forwarded to the leader.
    let mut n1 = c.redis(1);
    let mut n2 = c.redis(2);

    // A non-positive relative time deletes the key at apply; on a missing key it is 0.
    for args in [
        ["EXPIRE", "k", "0"],
        ["EXPIRE", "k", "-5"],
        ["PEXPIRE", "k", "-1"],
        ["EXPIREAT", "k", "-10"],
        ["PEXPIREAT", "k", "1"],
    ] {
        let _: () = n1.set("k", "v").unwrap();
        assert_eq!(int(&mut n2, &args), 1, "{args:?}");
        assert!(!n1.exists::<_, bool>("k").unwrap(), "{args:?} left the key");
    }
    assert_eq!(int(&mut n2, &["EXPIRE", "missing", "-5"]), 0);

    // The conditions are checked first, as for a time in the future.
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .arg("EX")
        .arg(100)
        .query(&mut n1)
        .unwrap();
    assert_eq!(int(&mut n2, &["EXPIRE", "k", "-1", "GT"]), 0);
    assert!(n1.exists::<_, bool>("k").unwrap());
    assert_eq!(int(&mut n2, &["EXPIRE", "k", "-1", "LT"]), 1);
    assert!(!n1.exists::<_, bool>("k").unwrap());
    let _: () = n1.set("k", "v").unwrap();
    assert_eq!(int(&mut n2, &["EXPIRE", "k", "-1", "XX"]), 0);
    assert_eq!(int(&mut n2, &["EXPIRE", "k", "-1", "NX"]), 1);
    assert!(!n1.exists::<_, bool>("k").unwrap());

    // Times that overflow, and times that must be positive.
    let _: () = n1.set("k", "v").unwrap();
    let invalid = |cmd: &str| format!("ERR invalid expire time in '{cmd}' command");
    for (args, cmd) in [
        (&["EXPIRE", "k", "9223372036854775"][..], "expire"),
        (&["EXPIRE", "k", "9223372036854775807"], "expire"),
        (&["PEXPIRE", "k", "9223372036854775807"], "pexpire"),
        (&["PEXPIRE", "k", "9223372036854770000"], "pexpire"),
        (&["SET", "k", "v", "EX", "0"], "set"),
        (&["SET", "k", "v", "EX", "-1"], "set"),
        (&["SET", "k", "v", "PX", "0"], "set"),
        (&["SET", "k", "v", "EX", "9223372036854775"], "set"),
        (&["SET", "k", "v", "PX", "9223372036854775807"], "set"),
        (&["SET", "k", "v", "EXAT", "0"], "set"),
        (&["SETEX", "k", "0", "v"], "setex"),
        (&["SETEX", "k", "-1", "v"], "setex"),
        (&["PSETEX", "k", "0", "v"], "psetex"),
        (&["SETEX", "k", "9223372036854775", "v"], "setex"),
        (&["PSETEX", "k", "9223372036854775807", "v"], "psetex"),
    ] {
        assert_eq!(ask(&mut n2, args), Err(invalid(cmd)), "{args:?}");
    }
    assert_eq!(
        ask(&mut n2, &["EXPIRE", "k", "abc"]),
        Err("ERR value is not an integer or out of range".into())
    );
    assert_eq!(
        ask(&mut n2, &["EXPIRE", "k", "1", "FOO"]),
        Err("ERR Unsupported option FOO".into())
    );
    // Far but representable absolute times are taken.
    assert_eq!(int(&mut n2, &["EXPIREAT", "k", "9223372036854775"]), 1);
    assert_eq!(
        int(&mut n2, &["PEXPIRETIME", "k"]),
        9_223_372_036_854_775_000
    );
    assert_eq!(int(&mut n2, &["PEXPIREAT", "k", "9223372036854775807"]), 1);
    assert_eq!(int(&mut n2, &["PEXPIRETIME", "k"]), i64::MAX);
    // A SET whose absolute time has passed answers OK and leaves no key.
    assert_eq!(
        ask(&mut n2, &["SET", "k", "v", "PXAT", "1"]),
        Ok(Value::Okay)
    );
    assert!(!n1.exists::<_, bool>("k").unwrap());
}

/// Expired keys leave every replica through the log: each partition's leader finds them and
/// proposes their eviction, so the replicas' stored keys (counted by the digests, expired
/// ones included) drop to the keys that never expire, and stay identical.
#[test]
fn expired_keys_are_evicted_through_the_log_on_every_replica() {
    let c = Cluster::start(bin(), Options::default());
    let mut conn = c.redis(2);
    let mut pipe = redis::pipe();
    for i in 0..300 {
        pipe.cmd("SET")
            .arg(format!("short{i}"))
            .arg("v")
            .arg("PX")
            .arg(200)
            .ignore();
        pipe.cmd("SET")
            .arg(format!("long{i}"))
            .arg("v")
            .arg("EX")
            .arg(3_600)
            .ignore();
        pipe.set(format!("plain{i}"), "v").ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    let stored = |id: u64| -> u64 { c.digests(id).values().map(|d| d.0).sum() };
    wait_until(
        Duration::from_secs(30),
        "every replica holds only the keys that have not expired",
        || [1, 2, 3].iter().all(|id| stored(*id) == 600),
    );
    c.wait_converged(Duration::from_secs(10));
    let evicted: f64 = [1, 2, 3]
        .iter()
        .map(|id| c.metric(*id, "replikv_expired_keys_evicted_total"))
        .sum();
    assert_eq!(evicted, 300.0);
    let n: i64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(n, 600);
}
