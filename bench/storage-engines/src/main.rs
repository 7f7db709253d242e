//! Storage-engine measurements for replikv's Raft log and state machine.
//!
//! `cargo run --release --manifest-path bench/storage-engines/Cargo.toml`
//! runs every scenario for every engine `--runs` times (default 3) and prints
//! markdown tables: each cell is the median of the runs and, after `±`, half
//! the min-to-max range of the runs as a percentage of the median.
//!
//! Options:
//!   --runs N        repetitions of the whole set (default 3)
//!   --dir PATH      scratch directory (default: $TMPDIR or /tmp, plus
//!                   `replikv-storage-bench`); wiped before and after
//!   --budget-ms N   time budget of each timed loop (default 1000)
//!   --only a,b      only the engines with these keys
//!                   (keys: redb2, redb4, redb4-qr, fjall, raftlog,
//!                   raftlog-1ms, raw)

mod common;
mod engines;
mod report;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use common::*;
use engines::fjall_engine::{FjallKv, FjallLog};
use engines::raftlog_engine::RaftLogStore;
use engines::raw_file::RawFile;
use report::Report;

/// Entries in the "100,000-entry log" (scenarios 2 and 5).
const LOG_ENTRIES: u64 = 100_000;
/// Entry size in that log.
const LOG_ENTRY_SIZE: usize = 1024;
/// Entries per durable commit while building it.
const LOG_BUILD_BATCH: usize = 128;
const RANGE_LEN: u64 = 128;
const RANGE_READS: usize = 1000;
const PURGE_N: u64 = 10_000;
const SM_KEYS: usize = 100_000;
const SM_BATCH: usize = 64;
const GROUPS: usize = 8;
const GROUP_REQ_ENTRIES: usize = 16;
const GROUP_ENTRY_SIZE: usize = 100;

struct Opts {
    runs: usize,
    dir: PathBuf,
    budget: Duration,
    only: Vec<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() >= 4 && args[1] == "--crash-child" {
        crash_child(&args[2], Path::new(&args[3]));
        return;
    }
    let opts = parse_opts(&args[1..]);
    let mut rep = Report::default();

    let t_all = Instant::now();
    for run in 1..=opts.runs {
        let t_run = Instant::now();
        let root = opts.dir.join(format!("run{run}"));
        fresh_dir(&root);
        eprintln!("== run {run}/{} in {}", opts.runs, root.display());
        run_once(&opts, &root, &mut rep);
        let _ = fs::remove_dir_all(&root);
        eprintln!("== run {run} took {:.1} s", t_run.elapsed().as_secs_f64());
    }
    let _ = fs::remove_dir_all(&opts.dir);
    eprintln!("all runs took {:.1} s", t_all.elapsed().as_secs_f64());

    println!("{}", rep.render(opts.runs));
}

fn parse_opts(args: &[String]) -> Opts {
    let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".to_string());
    let mut o = Opts {
        runs: 3,
        dir: Path::new(&tmp).join("replikv-storage-bench"),
        budget: Duration::from_millis(1000),
        only: vec![],
    };
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--runs" => o.runs = v.parse().expect("--runs N"),
            "--dir" => o.dir = PathBuf::from(v),
            "--budget-ms" => o.budget = Duration::from_millis(v.parse().expect("--budget-ms N")),
            "--only" => o.only = v.split(',').map(|s| s.to_string()).collect(),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    o
}

fn wanted(o: &Opts, key: &str) -> bool {
    o.only.is_empty() || o.only.iter().any(|s| key == s.as_str())
}

type Redb2Log = engines::redb2::RedbLog<false>;
type Redb4Log = engines::redb4::RedbLog<false>;
type Redb4LogQr = engines::redb4::RedbLog<true>;
type Redb2Kv = engines::redb2::RedbKv;
type Redb4Kv = engines::redb4::RedbKv;
type RaftLog0 = RaftLogStore<0>;
type RaftLog1ms = RaftLogStore<1000>;

const REDB2: &str = "redb 2.6.4";
const REDB4: &str = "redb 4.5.0";
const REDB4_QR: &str = "redb 4.5.0, quick-repair";
const FJALL: &str = "fjall 3.1.13";
const RAFTLOG: &str = "raft-log 0.4.6";
const RAFTLOG_1MS: &str = "raft-log 0.4.6, default 1 ms batch wait";
const RAW: &str = "(reference) plain append-only file + fdatasync";

/// A log engine under test: its `--only` key, its name in the tables, and
/// how to create it.
struct LogEngine {
    key: &'static str,
    name: &'static str,
    create: fn(&Path, usize) -> Box<dyn LogStore>,
}

fn boxed<E: LogStore + 'static>(dir: &Path, groups: usize) -> Box<dyn LogStore> {
    Box::new(E::create(dir, groups))
}

fn log_engines(o: &Opts, with_raft_log_default: bool, with_raw: bool) -> Vec<LogEngine> {
    let mut v = vec![
        LogEngine { key: "redb2", name: REDB2, create: boxed::<Redb2Log> },
        LogEngine { key: "redb4", name: REDB4, create: boxed::<Redb4Log> },
        LogEngine { key: "redb4-qr", name: REDB4_QR, create: boxed::<Redb4LogQr> },
        LogEngine { key: "fjall", name: FJALL, create: boxed::<FjallLog> },
        LogEngine { key: "raftlog", name: RAFTLOG, create: boxed::<RaftLog0> },
    ];
    if with_raft_log_default {
        v.push(LogEngine { key: "raftlog-1ms", name: RAFTLOG_1MS, create: boxed::<RaftLog1ms> });
    }
    if with_raw {
        v.push(LogEngine { key: "raw", name: RAW, create: boxed::<RawFile> });
    }
    v.retain(|e| wanted(o, e.key));
    v
}

fn run_once(o: &Opts, root: &Path, rep: &mut Report) {
    // 1. Raft log append, fsync per commit.
    for size in [100usize, 1024] {
        for batch in [1usize, 16, 128] {
            bench_append(o, root, rep, size, batch);
        }
    }

    // 2 + 5. The 100,000-entry log: range reads, purge, open, size.
    macro_rules! lg {
        ($key:literal, $name:expr, $ty:ty) => {
            if wanted(o, $key) {
                bench_log_db::<$ty>(root, rep, $name, $key);
            }
        };
    }
    lg!("redb2", REDB2, Redb2Log);
    lg!("redb4", REDB4, Redb4Log);
    lg!("redb4-qr", REDB4_QR, Redb4LogQr);
    lg!("fjall", FJALL, FjallLog);
    lg!("raftlog", RAFTLOG, RaftLog0);

    // 3. State machine.
    macro_rules! sm {
        ($key:literal, $name:expr, $ty:ty) => {
            if wanted(o, $key) {
                bench_sm::<$ty>(root, rep, $name);
            }
        };
    }
    sm!("redb2", REDB2, Redb2Kv);
    sm!("redb4", REDB4, Redb4Kv);
    sm!("fjall", FJALL, FjallKv);

    // 4. Eight Raft groups through one writer.
    for batched in [true, false] {
        bench_groups(o, root, rep, batched);
    }
}

/// Distinct random payloads, so that compressing engines get no advantage.
fn payload_pool(size: usize, n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut v = vec![0u8; size];
            rng.fill_bytes(&mut v);
            v
        })
        .collect()
}

// ---------------------------------------------------------------- scenario 1

/// Time slices per engine: the engines take turns, so that they all see the
/// same mix of quiet and busy moments on a disk shared with other work.
const ROUNDS: u32 = 10;

struct AppendAcc {
    db: Box<dyn LogStore>,
    next: u64,
    k: usize,
    lat: Vec<Duration>,
    time: Duration,
}

fn bench_append(o: &Opts, root: &Path, rep: &mut Report, size: usize, batch: usize) {
    let pool = payload_pool(size, 256, 1);
    let engines = log_engines(o, true, true);
    let mut accs: Vec<AppendAcc> = engines
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let dir = root.join(format!("append-{i}"));
            fresh_dir(&dir);
            AppendAcc { db: (e.create)(&dir, 1), next: 1, k: 0, lat: vec![], time: Duration::ZERO }
        })
        .collect();
    fn commit(a: &mut AppendAcc, pool: &[Vec<u8>], batch: usize) {
        let off = (a.k * batch) % 128;
        a.k += 1;
        a.db.append(&[GroupAppend { group: 0, first: a.next, payloads: &pool[off..off + batch] }]);
        a.next += batch as u64;
    }
    for a in accs.iter_mut() {
        for _ in 0..20 {
            commit(a, &pool, batch); // warm-up
        }
    }
    let slice = o.budget / ROUNDS;
    for _ in 0..ROUNDS {
        for a in accs.iter_mut() {
            let t0 = Instant::now();
            let mut n = 0;
            while t0.elapsed() < slice || n < 10 {
                let t = Instant::now();
                commit(a, &pool, batch);
                a.lat.push(t.elapsed());
                n += 1;
            }
            a.time += t0.elapsed();
        }
    }
    let t = "1. Raft log append, one fsync per commit";
    let size_s = if size == 1024 { "1 KiB".to_string() } else { format!("{size} B") };
    let eps_of = |a: &AppendAcc| (a.lat.len() * batch) as f64 / a.time.as_secs_f64();
    let base_eps = engines.iter().zip(&accs).find(|(e, _)| e.key == "redb4").map(|(_, a)| eps_of(a));
    for (e, mut a) in engines.iter().zip(accs) {
        a.lat.sort();
        let eps = eps_of(&a);
        let row = [e.name, &size_s, &batch.to_string()];
        rep.put(t, &row, "entries/s", eps);
        if let Some(b) = base_eps {
            rep.put(t, &row, "÷ redb 4.5.0, same run", eps / b);
        }
        rep.put(t, &row, "commit p50 µs", us(pct(&a.lat, 0.5)));
        rep.put(t, &row, "commit p99 µs", us(pct(&a.lat, 0.99)));
        eprintln!("  append {:<40} {size:>5} B x {batch:>3}: {eps:>9.0} entries/s", e.name);
    }
    for i in 0..engines.len() {
        let _ = fs::remove_dir_all(root.join(format!("append-{i}")));
    }
}

// ------------------------------------------------------- scenarios 2 and 5

/// Builds the 100,000-entry log; used by the parent and by the crash child.
fn build_log<E: LogStore>(dir: &Path) -> (E, Duration) {
    let pool = payload_pool(LOG_ENTRY_SIZE, 256, 2);
    let mut db = E::create(dir, 1);
    let t0 = Instant::now();
    let mut next = 1u64;
    let mut k = 0;
    while next <= LOG_ENTRIES {
        let n = LOG_BUILD_BATCH.min((LOG_ENTRIES - next + 1) as usize);
        let off = (k * LOG_BUILD_BATCH) % 128;
        k += 1;
        db.append(&[GroupAppend { group: 0, first: next, payloads: &pool[off..off + n] }]);
        next += n as u64;
    }
    (db, t0.elapsed())
}

fn range_reads<E: LogStore>(db: &E, lo: u64, seed: u64) -> Vec<Duration> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lat = Vec::with_capacity(RANGE_READS);
    for _ in 0..RANGE_READS {
        let from = rng.random_range(lo..=LOG_ENTRIES - RANGE_LEN + 1);
        let t = Instant::now();
        let n = db.read_range(0, from, from + RANGE_LEN);
        lat.push(t.elapsed());
        assert_eq!(n as u64, RANGE_LEN, "range read returned {n} entries");
    }
    lat.sort();
    lat
}

fn bench_log_db<E: LogStore>(root: &Path, rep: &mut Report, name: &str, key: &str) {
    let dir = root.join("log100k");
    fresh_dir(&dir);
    let (db, build) = build_log::<E>(&dir);
    eprintln!("  log100k {name:<39} built in {:.2} s", build.as_secs_f64());

    // Range reads in the process that wrote the log (engine caches warm).
    let warm = range_reads(&db, 1, 3);
    drop(db);
    let (alloc, _apparent) = dir_size(&dir);

    // Open after a clean close.
    let t = Instant::now();
    let mut db = E::open(&dir, 1);
    let open_clean = t.elapsed();
    // Range reads right after opening (engine caches as open left them; the OS page cache is warm).
    let reopened = range_reads(&db, 1, 4);

    // Purge a prefix of 10,000 entries, durably.
    let t = Instant::now();
    db.purge(0, 1, PURGE_N);
    let purge = t.elapsed();
    assert_eq!(db.read_range(0, 1, PURGE_N + 1), 0, "purge left entries behind");
    assert_eq!(db.read_range(0, PURGE_N + 1, PURGE_N + 1 + RANGE_LEN) as u64, RANGE_LEN);
    // Reads just after the purge point (tombstones / freed pages in front of them).
    let after_purge = range_reads(&db, PURGE_N + 1, 5);
    drop(db);

    // Open after a crash: a child process opens the log, appends and
    // commits one more batch durably, then aborts without closing.
    let status = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--crash-child", key, dir.to_str().expect("utf8")])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("spawn crash child");
    assert!(!status.success(), "crash child was expected to abort");
    let t = Instant::now();
    let db = E::open(&dir, 1);
    let open_crash = t.elapsed();
    let n = db.read_range(0, LOG_ENTRIES + 1, LOG_ENTRIES + 1 + LOG_BUILD_BATCH as u64);
    assert_eq!(n, LOG_BUILD_BATCH, "durable commit lost in the crash");
    drop(db);
    let _ = fs::remove_dir_all(&dir);

    let t2 = "2. Log reads and purge (100,000 x 1 KiB entries)";
    let row = [name];
    rep.put(t2, &row, "read 128, p50 µs", us(pct(&warm, 0.5)));
    rep.put(t2, &row, "read 128, p99 µs", us(pct(&warm, 0.99)));
    rep.put(t2, &row, "after reopen p50 µs", us(pct(&reopened, 0.5)));
    rep.put(t2, &row, "after purge p50 µs", us(pct(&after_purge, 0.5)));
    rep.put(t2, &row, "purge 10,000 ms", ms(purge));
    let t5 = "5. Open / recovery and size (100,000 x 1 KiB entries)";
    rep.put(t5, &row, "build s (128/commit)", build.as_secs_f64());
    rep.put(t5, &row, "open after clean close ms", ms(open_clean));
    rep.put(t5, &row, "open after crash ms", ms(open_crash));
    rep.put(t5, &row, "on disk MiB", alloc as f64 / (1024.0 * 1024.0));
}

fn crash_child(key: &str, dir: &Path) {
    fn go<E: LogStore>(dir: &Path) {
        let mut db = E::open(dir, 1);
        let pool = payload_pool(LOG_ENTRY_SIZE, LOG_BUILD_BATCH, 9);
        db.append(&[GroupAppend { group: 0, first: LOG_ENTRIES + 1, payloads: &pool }]);
        // Durable; now die without closing anything.
        std::process::abort();
    }
    match key {
        "redb2" => go::<Redb2Log>(dir),
        "redb4" => go::<Redb4Log>(dir),
        "redb4-qr" => go::<Redb4LogQr>(dir),
        "fjall" => go::<FjallLog>(dir),
        "raftlog" => go::<RaftLog0>(dir),
        other => panic!("unknown engine {other}"),
    }
}

// ---------------------------------------------------------------- scenario 3

fn bench_sm<K: KvStore>(root: &Path, rep: &mut Report, name: &str) {
    let dir = root.join("sm");
    fresh_dir(&dir);
    let mut rng = StdRng::seed_from_u64(6);
    let kvs: Vec<([u8; 16], [u8; 100])> = (0..SM_KEYS)
        .map(|_| {
            let mut k = [0u8; 16];
            let mut v = [0u8; 100];
            rng.fill_bytes(&mut k);
            rng.fill_bytes(&mut v);
            (k, v)
        })
        .collect();
    let mut db = K::create(&dir);

    let t = Instant::now();
    for chunk in kvs.chunks(SM_BATCH) {
        db.apply(chunk);
    }
    let apply_nosync = t.elapsed();
    db.persist();
    let apply = t.elapsed();

    let mut order: Vec<usize> = (0..SM_KEYS).collect();
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let t = Instant::now();
    for &i in &order {
        assert_eq!(db.get(&kvs[i].0), Some(100));
    }
    let gets = t.elapsed();

    let t = Instant::now();
    let (n, bytes) = db.scan();
    let scan = t.elapsed();
    assert_eq!(n, SM_KEYS);
    assert_eq!(bytes, SM_KEYS * 116);
    drop(db);
    let (alloc, _) = dir_size(&dir);
    let _ = fs::remove_dir_all(&dir);

    let t3 = "3. State machine: 100,000 SET (16 B key, 100 B value), 64 per transaction, no fsync";
    let row = [name];
    rep.put(t3, &row, "apply SET/s", SM_KEYS as f64 / apply_nosync.as_secs_f64());
    rep.put(t3, &row, "apply + final fsync ms", ms(apply));
    rep.put(t3, &row, "random GET/s", SM_KEYS as f64 / gets.as_secs_f64());
    rep.put(t3, &row, "full scan ms", ms(scan));
    rep.put(t3, &row, "on disk MiB", alloc as f64 / (1024.0 * 1024.0));
    eprintln!(
        "  sm {name:<44} {:>9.0} SET/s {:>9.0} GET/s",
        SM_KEYS as f64 / apply_nosync.as_secs_f64(),
        SM_KEYS as f64 / gets.as_secs_f64()
    );
}

// ---------------------------------------------------------------- scenario 4

struct Req {
    group: usize,
    sent: Instant,
    done: SyncSender<()>,
}

struct GroupAcc {
    db: Box<dyn LogStore>,
    next: Vec<u64>,
    k: usize,
    lat: Vec<Duration>,
    commits: usize,
    entries: usize,
    time: Duration,
}

/// One time slice of scenario 4 for one engine: 8 closed-loop producers (one
/// per Raft group) each hand the single writer (this thread) a request of 16
/// entries and wait until it is durable before sending the next one. The
/// writer takes everything pending and commits it either as one commit for
/// all groups (`batched`) or as one commit per group.
fn groups_slice(a: &mut GroupAcc, pool: &[Vec<u8>], batched: bool, dur: Duration, measure: bool) {
    let (tx, rx) = channel::<Req>();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..GROUPS)
        .map(|g| {
            let tx = tx.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                let (dtx, drx) = sync_channel(1);
                while !stop.load(Ordering::Relaxed) {
                    let r = Req { group: g, sent: Instant::now(), done: dtx.clone() };
                    if tx.send(r).is_err() || drx.recv().is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(tx);

    let mut pending: Vec<Req> = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => pending.push(r),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while let Ok(r) = rx.try_recv() {
            pending.push(r);
        }
        let mut slices = Vec::with_capacity(pending.len());
        for r in &pending {
            let off = (a.k * GROUP_REQ_ENTRIES) % 128;
            a.k += 1;
            slices.push(GroupAppend {
                group: r.group,
                first: a.next[r.group],
                payloads: &pool[off..off + GROUP_REQ_ENTRIES],
            });
            a.next[r.group] += GROUP_REQ_ENTRIES as u64;
        }
        let commits = if batched {
            a.db.append(&slices);
            1
        } else {
            for s in &slices {
                a.db.append(std::slice::from_ref(s));
            }
            slices.len()
        };
        let entries = slices.len() * GROUP_REQ_ENTRIES;
        for r in pending.drain(..) {
            if measure {
                a.lat.push(r.sent.elapsed());
            }
            let _ = r.done.send(());
        }
        if measure {
            a.commits += commits;
            a.entries += entries;
        }
    }
    if measure {
        a.time += t0.elapsed();
    }
    stop.store(true, Ordering::Relaxed);
    // Release producers still waiting on an ack, then let them see `stop`.
    // (Their last requests are dropped unwritten: the next slice starts a new
    // set of producers.)
    while let Ok(r) = rx.recv_timeout(Duration::from_millis(20)) {
        let _ = r.done.send(());
    }
    drop(rx);
    for p in producers {
        p.join().expect("producer");
    }
}

fn bench_groups(o: &Opts, root: &Path, rep: &mut Report, batched: bool) {
    let pool = payload_pool(GROUP_ENTRY_SIZE, 256, 7);
    let engines = log_engines(o, false, true);
    let mut accs: Vec<GroupAcc> = engines
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let dir = root.join(format!("groups-{i}"));
            fresh_dir(&dir);
            GroupAcc {
                db: (e.create)(&dir, GROUPS),
                next: vec![1; GROUPS],
                k: 0,
                lat: vec![],
                commits: 0,
                entries: 0,
                time: Duration::ZERO,
            }
        })
        .collect();
    for a in accs.iter_mut() {
        groups_slice(a, &pool, batched, Duration::from_millis(100), false); // warm-up
    }
    let slice = o.budget / ROUNDS;
    for _ in 0..ROUNDS {
        for a in accs.iter_mut() {
            groups_slice(a, &pool, batched, slice, true);
        }
    }
    let t4 = "4. Eight Raft groups, one writer thread, 16 x 100 B entries per group request";
    let eps_of = |a: &GroupAcc| a.entries as f64 / a.time.as_secs_f64();
    let base_eps = engines.iter().zip(&accs).find(|(e, _)| e.key == "redb4").map(|(_, a)| eps_of(a));
    for (e, mut a) in engines.iter().zip(accs) {
        a.lat.sort();
        let mode = if batched && e.key == "raftlog" {
            "all groups together: 8 logs, 8 fsyncs in parallel"
        } else if batched {
            "all groups in one commit"
        } else {
            "one commit per group"
        };
        let row = [e.name, mode];
        let eps = eps_of(&a);
        rep.put(t4, &row, "entries/s", eps);
        if let Some(b) = base_eps {
            rep.put(t4, &row, "÷ redb 4.5.0, same run", eps / b);
        }
        rep.put(t4, &row, "commits/s", a.commits as f64 / a.time.as_secs_f64());
        rep.put(t4, &row, "request p50 µs", us(pct(&a.lat, 0.5)));
        rep.put(t4, &row, "request p99 µs", us(pct(&a.lat, 0.99)));
        eprintln!("  groups {:<40} {mode:<25} {eps:>9.0} entries/s", e.name);
    }
    for i in 0..engines.len() {
        let _ = fs::remove_dir_all(root.join(format!("groups-{i}")));
    }
}
