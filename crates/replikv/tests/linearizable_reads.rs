//! `primary` reads stay linearizable across leader changes (DESIGN.md section 3), including
//! an old leader frozen with SIGSTOP and resumed, and a leader killed with `kill -9`.
//! Clients on every node run reads, writes and SET NX on a few registers; the recorded
//! history is checked per key (Wing–Gong/Lowe, replikv-checker).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use replikv_chaos::workload::register_op;
use replikv_checker::{check_linearizable, History, Op, OpKind, Outcome};
use replikv_testkit::{wait_until, Cluster, Options};

const KEYS: usize = 4;

fn client(
    id: u64,
    urls: Vec<String>,
    origin: Instant,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Op>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(id);
        let mut conn: Option<redis::Connection> = None;
        let mut which = id as usize;
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if conn.is_none() {
                which += 1;
                let c = redis::Client::open(urls[which % urls.len()].as_str()).unwrap();
                conn = c
                    .get_connection_with_timeout(Duration::from_millis(500))
                    .ok();
                if let Some(c) = &conn {
                    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                }
                continue;
            }
            let key = format!("reg{}", rng.random_range(0..KEYS));
            seq += 1;
            let value = format!("c{id}-{seq}");
            let roll = rng.random_range(0..100);
            let kind = if roll < 50 {
                OpKind::Read
            } else if roll < 90 {
                OpKind::Write(value.clone())
            } else {
                OpKind::Cas {
                    expected: None,
                    new: value.clone(),
                }
            };
            let c = conn.as_mut().unwrap();
            let invoke_ns = origin.elapsed().as_nanos() as u64;
            let outcome = register_op(c, &key, &kind);
            let complete_ns = origin.elapsed().as_nanos() as u64;
            if matches!(outcome, Outcome::Unknown) {
                conn = None;
            }
            let complete_ns = (!matches!(outcome, Outcome::Unknown)).then_some(complete_ns);
            history.lock().unwrap().push(Op {
                client: id,
                key,
                kind,
                invoke_ns,
                complete_ns,
                outcome,
            });
        }
    })
}

#[test]
fn primary_reads_stay_linearizable_across_paused_and_killed_leaders() {
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_replikv").as_ref(), Options::default());
    let urls: Vec<String> = [1, 2, 3].iter().map(|n| c.node(*n).redis_url()).collect();
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..6)
        .map(|i| client(i, urls.clone(), origin, stop.clone(), history.clone()))
        .collect();
    let ops = || history.lock().unwrap().len();

    // Phase 1: load, then freeze the leader of partition 0 until the others elect another.
    wait_until(Duration::from_secs(20), "200 operations", || ops() > 200);
    let frozen = c.leader_seen_by(1, 0).unwrap();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != frozen).collect();
    c.pause(frozen);
    c.wait_new_leader_among(0, &others, Duration::from_secs(15));
    let before = ops();
    wait_until(
        Duration::from_secs(20),
        "operations continue while the old leader is frozen",
        || ops() > before + 100,
    );

    // Phase 2: the old leader wakes up still believing it leads; it must not serve stale reads.
    c.resume(frozen);
    let before = ops();
    wait_until(
        Duration::from_secs(20),
        "operations after the resume",
        || ops() > before + 200,
    );

    // Phase 3: kill -9 the current leader of partition 1 and bring it back.
    let victim = c.wait_new_leader(1, 0, Duration::from_secs(15));
    c.kill(victim);
    c.wait_new_leader(1, victim, Duration::from_secs(15));
    let before = ops();
    wait_until(Duration::from_secs(20), "operations after the kill", || {
        ops() > before + 100
    });
    c.restart(victim);
    let before = ops();
    wait_until(
        Duration::from_secs(20),
        "operations after the restart",
        || ops() > before + 100,
    );

    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().unwrap();
    }
    let history = History {
        ops: std::mem::take(&mut *history.lock().unwrap()),
    };
    let report = check_linearizable(&history, 2_000_000);
    eprintln!(
        "{} operations on {} keys checked",
        report.ops_checked, report.keys_checked
    );
    assert!(
        report.keys_timed_out.is_empty(),
        "checker budget exhausted for {:?}",
        report.keys_timed_out
    );
    assert!(
        report.violations.is_empty(),
        "linearizability violations:\n{report}"
    );
    assert!(
        report.ops_checked > 500,
        "only {} operations checked",
        report.ops_checked
    );
}

/// The checker bites. With the read index skipped (`debug.skip_read_index`, an injected
/// bug), a leader cut off from its followers keeps serving reads from its own state while
/// the majority elects a new leader and moves on; the history checker must report it. The
/// same scenario without the bug is `minority_side_refuses_writes_while_majority_serves...`
/// and the test above.
#[test]
fn checker_catches_stale_reads_when_the_read_index_is_skipped() {
    let opts = Options {
        partitions: 1,
        skip_read_index: true,
        rebalance_leaders: false,
        ..Options::default()
    };
    let c = Cluster::start(env!("CARGO_BIN_EXE_replikv").as_ref(), opts);
    let old = c.wait_new_leader(0, 0, Duration::from_secs(10));
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != old).collect();
    let mut reader = c.redis(old);
    let mut writer = c.redis(others[0]);
    let origin = Instant::now();
    let mut ops = Vec::new();
    let mut record = |client: u64, kind: OpKind, outcome: Outcome, invoke_ns: u64| {
        let complete_ns = Some(origin.elapsed().as_nanos() as u64);
        ops.push(Op {
            client,
            key: "reg".into(),
            kind,
            invoke_ns,
            complete_ns,
            outcome,
        });
    };

    // Phase 1: v0 is written and seen.
    let t = origin.elapsed().as_nanos() as u64;
    redis::cmd("SET")
        .arg("reg")
        .arg("v0")
        .query::<()>(&mut writer)
        .unwrap();
    record(2, OpKind::Write("v0".into()), Outcome::Written, t);

    // Phase 2: the old leader is cut off; the others elect a new one.
    c.cut(old, &others);
    c.wait_new_leader_among(0, &others, Duration::from_secs(10));

    // Phase 3: each write completes on the majority before the old leader is read.
    for i in 1..=10 {
        let v = format!("v{i}");
        let t = origin.elapsed().as_nanos() as u64;
        redis::cmd("SET")
            .arg("reg")
            .arg(&v)
            .query::<()>(&mut writer)
            .unwrap();
        record(2, OpKind::Write(v), Outcome::Written, t);
        let t = origin.elapsed().as_nanos() as u64;
        let got: Option<String> = redis::cmd("GET").arg("reg").query(&mut reader).unwrap();
        record(1, OpKind::Read, Outcome::Read(got), t);
    }
    let report = check_linearizable(&History { ops }, 1_000_000);
    assert!(
        !report.violations.is_empty(),
        "the checker missed the stale reads:\n{report}"
    );
}
