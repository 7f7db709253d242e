//! Read preferences (DESIGN.md section 3, reads): a follower serves `secondary` reads while
//! its measured staleness is within `max_lag_ms` and refuses (or sends to the leader) once
//! it is not; a session token gives read-your-writes on a follower; RESP3 via HELLO 3.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use redis::Commands;
use replikv_testkit::{wait_until, Cluster, Options};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

/// Reads node `node` served, by who served them: "replica" (from its own state) or "leader"
/// (through the read index).
fn reads_served(c: &Cluster, node: u64, by: &str) -> f64 {
    let label = format!("served_by=\"{by}\"");
    let text = c.http_text(node, "/metrics").unwrap();
    text.lines()
        .filter(|l| l.starts_with("replikv_reads_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn replica_reads(c: &Cluster, node: u64) -> f64 {
    reads_served(c, node, "replica")
}

#[test]
fn follower_serves_fresh_reads_refuses_stale_ones_and_reads_its_own_writes() {
    let opts = Options {
        partitions: 1,
        max_lag_ms: 400,
        rebalance_leaders: false,
        ..Options::default()
    };
    let c = Cluster::start(bin(), opts);
    let leader = c.wait_new_leader(0, 0, Duration::from_secs(10));
    // A follower serves `secondary` reads only once its clock is vouched for (clock.rs).
    c.wait_ready(Duration::from_secs(10));
    let follower = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != follower).collect();
    let mut conn = c.redis(follower);
    let _: () = redis::cmd("REPLIKV.READ")
        .arg("secondary")
        .query(&mut conn)
        .unwrap();

    // Phase 1: read-your-writes. The write goes to the leader; the read right after it is
    // served by this follower, which first applies the connection's own write.
    let before = replica_reads(&c, follower);
    for i in 0..20 {
        let _: () = conn.set("k", i).unwrap();
        let v: i64 = conn.get("k").unwrap();
        assert_eq!(v, i, "a follower read missed the connection's own write");
    }
    assert!(
        replica_reads(&c, follower) >= before + 20.0,
        "reads were not served by the follower"
    );

    // Phase 2: HTTP session token: written on the leader, read on the follower.
    let w = c
        .http_put(
            leader,
            "/v1/kv/default/doc?consistency=quorum",
            "{\"v\": 7}",
        )
        .unwrap();
    let token = format!("{}:{}", w["partition"], w["offset"]);
    let doc = c
        .http_get(
            follower,
            &format!("/v1/kv/default/doc?read=secondary&session={token}"),
        )
        .unwrap();
    assert_eq!(doc["v"], 7);

    // Phase 3: cut off, the follower's staleness passes max_lag_ms and it stops serving.
    c.cut(follower, &others);
    wait_until(
        Duration::from_secs(10),
        "the follower refuses stale reads",
        || conn.get::<_, Option<i64>>("k").is_err(),
    );
    let status = c.http_get(follower, "/v1/_replication/state").unwrap();
    let stale = status["partitions"][0]["staleness_ms"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(stale > 400, "staleness {stale} ms reported while refusing");

    // Phase 4: healed, it serves again.
    c.heal();
    wait_until(Duration::from_secs(10), "the follower serves again", || {
        conn.get::<_, Option<i64>>("k").ok().flatten() == Some(19)
    });
}

#[test]
fn hello_3_switches_the_connection_to_resp3() {
    let c = Cluster::start(
        bin(),
        Options {
            partitions: 1,
            ..Options::default()
        },
    );
    let mut s = TcpStream::connect(c.node(1).resp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"HELLO 3\r\nGET missing\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"_\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with('%'), "HELLO 3 answers a map: {text}");
    assert!(
        text.contains("proto") && text.ends_with("_\r\n"),
        "RESP3 null for a missing key: {text}"
    );
}

/// Found while chasing a stale follower read in the `kill-all` campaign: a leader served
/// `nearest`/`any` reads (and, in a race with its own election, `secondary` ones) from its
/// state machine, judged current by its last quorum acknowledgement, although a leader just
/// elected after a restart may not have applied everything committed yet. A leader now
/// answers every read through the read index.
#[test]
fn kill_all_a_leader_answers_nearest_reads_through_the_read_index() {
    let opts = Options {
        partitions: 1,
        rebalance_leaders: false,
        ..Options::default()
    };
    let c = Cluster::start(bin(), opts);
    let leader = c.wait_new_leader(0, 0, Duration::from_secs(10));
    // A follower serves `secondary` reads only once its clock is vouched for (clock.rs).
    c.wait_ready(Duration::from_secs(10));
    let mut conn = c.redis(leader);
    let _: () = conn.set("k", 1).unwrap();
    for pref in ["nearest", "any", "secondary"] {
        let _: () = redis::cmd("REPLIKV.READ")
            .arg(pref)
            .query(&mut conn)
            .unwrap();
        let (before_leader, before_replica) = (
            reads_served(&c, leader, "leader"),
            replica_reads(&c, leader),
        );
        for _ in 0..5 {
            let v: i64 = conn.get("k").unwrap();
            assert_eq!(v, 1);
        }
        assert!(
            reads_served(&c, leader, "leader") >= before_leader + 5.0,
            "{pref} reads on the leader did not go through the read index"
        );
        assert_eq!(
            replica_reads(&c, leader),
            before_replica,
            "the leader served {pref} reads from its state machine without a read index"
        );
    }
}

/// A pipeline's reads run beside each other (a forwarded read no longer waits for the one
/// before it), but never beside the connection's writes: each read sees the writes sent
/// before it and none sent after it, and the answers come back in the order sent.
#[test]
fn a_pipelines_reads_keep_their_place_among_its_writes() {
    let c = Cluster::start(bin(), Options::default());
    let mut conn = c.redis(1);
    let keys: Vec<String> = (0..120).map(|i| format!("pipelined-{i}")).collect();
    let mut pipe = redis::pipe();
    for (i, k) in keys.iter().enumerate() {
        pipe.cmd("GET").arg(k);
        pipe.cmd("EXISTS").arg(k);
        pipe.cmd("SET").arg(k).arg(i);
        pipe.cmd("GET").arg(k);
        pipe.cmd("STRLEN").arg(k);
        pipe.cmd("TTL").arg(k);
    }
    // A run of reads over every partition (most forwarded from node 1), then one more write.
    for k in &keys {
        pipe.cmd("GET").arg(k);
    }
    pipe.cmd("SET").arg(&keys[0]).arg("last");
    pipe.cmd("MGET").arg(&keys[0]).arg(&keys[1]);
    let replies: Vec<redis::Value> = pipe.query(&mut conn).unwrap();
    let bulk = |s: String| redis::Value::BulkString(s.into_bytes());
    let mut expected = Vec::new();
    for i in 0..keys.len() {
        expected.push(redis::Value::Nil);
        expected.push(redis::Value::Int(0));
        expected.push(redis::Value::Okay);
        expected.push(bulk(i.to_string()));
        expected.push(redis::Value::Int(i.to_string().len() as i64));
        expected.push(redis::Value::Int(-1));
    }
    expected.extend((0..keys.len()).map(|i| bulk(i.to_string())));
    expected.push(redis::Value::Okay);
    expected.push(redis::Value::Array(vec![
        bulk("last".into()),
        bulk("1".into()),
    ]));
    assert_eq!(replies.len(), expected.len());
    for (n, (got, want)) in replies.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "reply {n} of the pipeline");
    }
}
