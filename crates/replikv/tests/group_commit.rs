//! Writes that queue at a leader are proposed together as one log entry (group commit,
//! `replikv-cluster/src/propose.rs`). Batching must not change what a client sees: each
//! write gets its own reply, in order, at every consistency level, and a connection's
//! writes apply in the order it sent them.

use std::thread;

use replikv_testkit::{Cluster, Options};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_replikv").as_ref()
}

#[test]
fn pipelined_writes_share_log_entries_and_keep_their_own_replies_in_order() {
    let c = Cluster::start(bin(), Options::default());
    for level in ["eventual", "at_least:2", "quorum", "all"] {
        let mut conn = c.redis(1);
        let _: () = redis::cmd("REPLIKV.CONSISTENCY")
            .arg(level)
            .query(&mut conn)
            .unwrap();
        let key = format!("counter-{level}");
        let entries_before: f64 = (1..=3)
            .map(|n| c.metric(n, "replikv_changes_applied_total"))
            .sum();
        let mut pipe = redis::pipe();
        for _ in 0..500 {
            pipe.cmd("INCR").arg(&key);
        }
        // A blind SET between the INCRs, then more INCRs: order within the connection holds.
        pipe.cmd("SET").arg(&key).arg(1000);
        for _ in 0..10 {
            pipe.cmd("INCR").arg(&key);
        }
        let replies: Vec<redis::Value> = pipe.query(&mut conn).unwrap();
        let ints: Vec<i64> = replies
            .iter()
            .filter_map(|v| match v {
                redis::Value::Int(i) => Some(*i),
                _ => None,
            })
            .collect();
        let expected: Vec<i64> = (1..=500).chain(1001..=1010).collect();
        assert_eq!(ints, expected, "{level}: replies out of order or wrong");
        assert_eq!(replies[500], redis::Value::Okay, "{level}: SET reply");
        let entries_after: f64 = (1..=3)
            .map(|n| c.metric(n, "replikv_changes_applied_total"))
            .sum();
        // 511 writes on 3 replicas would be 1,533 applied entries one write per entry.
        let applied = entries_after - entries_before;
        assert!(
            applied < 1_533.0 / 2.0,
            "{level}: 511 pipelined writes took {applied} applied entries over 3 replicas; expected them batched"
        );
    }
}

#[test]
fn concurrent_connections_each_keep_their_order_through_shared_entries() {
    let c = Cluster::start(bin(), Options::default());
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let url = c.node(1 + t % 3).redis_url();
            thread::spawn(move || {
                let mut conn = redis::Client::open(url.as_str())
                    .unwrap()
                    .get_connection()
                    .unwrap();
                let key = format!("seq-{t}");
                let mut pipe = redis::pipe();
                for i in 0..300 {
                    pipe.cmd("SET").arg(&key).arg(i).ignore();
                    pipe.cmd("APPEND")
                        .arg(format!("log-{t}"))
                        .arg(format!("{i},"));
                }
                let lens: Vec<i64> = pipe.query(&mut conn).unwrap();
                assert!(
                    lens.windows(2).all(|w| w[0] < w[1]),
                    "APPEND lengths must grow"
                );
                let last: i64 = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
                assert_eq!(last, 299, "the last SET of the connection wins");
                let log: String = redis::cmd("GET")
                    .arg(format!("log-{t}"))
                    .query(&mut conn)
                    .unwrap();
                let want: String = (0..300).map(|i| format!("{i},")).collect();
                assert_eq!(log, want, "APPENDs applied in the connection's order");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
