//! One run: a fresh cluster in network namespaces, the clients of `workload`, a fault
//! injected and healed `cycles` times, then the checks.
//!
//! ```text
//!  start ─ warm-up ─┬─ inject ── hold ── heal ── recover ─┬─ stop clients ─ converge ─ read back ─ check
//!                   └──────────────── × cycles ───────────┘
//! ```

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use replikv_checker::{check_acknowledged_present, check_linearizable, History, OpKind};
use replikv_testkit::{wait_until, Cluster, Options};
use serde::{Deserialize, Serialize};

use crate::fault::{self, Fault};
use crate::workload::{self, Clients, Mix, Recorded, LEVELS};

/// Follower reads must not be staler than this (the cluster's `max_lag_ms` in every run).
pub const MAX_LAG_MS: u64 = 1_000;
/// Configurations the linearizability search may explore per key before giving up.
const CHECK_BUDGET_PER_KEY: usize = 2_000_000;

/// Findings of the campaign that are not fixed yet: (fault, the start of the failure's
/// text). A run whose only failures are listed here counts as "known", not failed, unless the
/// campaign is strict; each is described in docs/RELIABILITY.md under "Open findings".
pub const KNOWN_OPEN: &[(&str, &str)] = &[];

/// Injected bugs (DESIGN.md's "prove the checkers bite").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bugs {
    /// `debug.ack_before_commit`: blind quorum writes acknowledged before they commit.
    pub ack_before_commit: bool,
    /// `debug.skip_read_index`: primary reads without a read index.
    pub skip_read_index: bool,
    /// `debug.stamp_with_wall_clock`: entries stamped by the wall clock, jumps and all.
    #[serde(default)]
    pub stamp_with_wall_clock: bool,
}

/// What one run does.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub fault: Fault,
    pub seed: u64,
    pub cycles: u32,
    pub hold: Duration,
    pub recover: Duration,
    pub bugs: Bugs,
    /// The nodes' `storage.fsync` policy (`always` unless a campaign says otherwise).
    pub fsync: &'static str,
    pub mix: Mix,
    /// The `replikv` binary under test.
    pub bin: PathBuf,
    /// Where a failed run's histories and node logs go.
    pub out: Option<PathBuf>,
}

/// One injected fault, as it happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub fault: String,
    pub detail: String,
    /// Seconds since the clients started.
    pub start_s: f64,
    pub healed_s: f64,
    /// Longest stretch (ms) from the injection to the end of the recovery time with no
    /// acknowledged `quorum` write from any client.
    pub unavailable_ms: f64,
    pub notes: String,
}

/// Acknowledged writes of one level and what became of them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LevelLoss {
    pub acknowledged: usize,
    pub lost: usize,
    /// Values present that no write could have stored: always a bug.
    pub phantom: usize,
    /// For each lost write: ms between the start of the fault before it and its
    /// acknowledgement (negative: acknowledged before any fault).
    pub lost_window_ms: Vec<f64>,
}

/// Everything a run found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub fault: String,
    pub seed: u64,
    pub nodes: u64,
    pub events: Vec<Event>,
    pub ops: usize,
    pub register_ops_checked: usize,
    pub linearizability_violations: usize,
    /// Keys whose check ran out of budget (undecided, not a violation).
    pub keys_undecided: usize,
    pub violation_report: Option<String>,
    pub loss: BTreeMap<String, LevelLoss>,
    pub follower_reads: usize,
    pub max_staleness_ms: f64,
    pub stale_reads_over_limit: usize,
    /// The first few of those: which node served it, when, what it returned, how stale.
    pub stale_reads: Vec<String>,
    pub session_reads: u64,
    pub read_your_writes_violations: Vec<String>,
    /// Acknowledged expiring keys, and the reads of them checked against their lifetimes.
    #[serde(default)]
    pub expiring_writes: usize,
    #[serde(default)]
    pub expiry_reads_checked: usize,
    #[serde(default)]
    pub expiry_violations: usize,
    /// The first few: which read, what it saw, against which lifetime.
    #[serde(default)]
    pub expiry_examples: Vec<String>,
    /// Leaders whose clock the fault set far off and that still led when it was healed.
    #[serde(default)]
    pub off_clock_leaders: Vec<String>,
    pub converged: bool,
    /// Damaged logs (`log-damage`) whose node did not report the damage at its restart, or
    /// cut it as a torn tail.
    #[serde(default)]
    pub damage_not_found: Vec<String>,
    /// Why the run could not finish (cluster did not start, a node did not come back...).
    pub error: Option<String>,
    pub seconds: f64,
}

impl RunResult {
    /// True if acknowledged writes of `level` must survive this run's faults: `quorum`,
    /// `all`, and `at_least:n` with n a majority (then also committed, DESIGN.md section 3).
    pub fn must_keep(&self, level: &str) -> bool {
        match level.strip_prefix("at_least:") {
            Some(n) => n.parse::<u64>().is_ok_and(|n| n > self.nodes / 2),
            None => level == "quorum" || level == "all",
        }
    }

    /// Why the run failed, or an empty list: every promise DESIGN.md section 3 makes for
    /// what this run exercised.
    pub fn failures(&self) -> Vec<String> {
        let mut why = Vec::new();
        if let Some(e) = &self.error {
            why.push(format!("harness: {e}"));
        }
        if self.linearizability_violations > 0 {
            why.push(format!(
                "{} linearizability violation(s)",
                self.linearizability_violations
            ));
        }
        for (level, l) in &self.loss {
            if l.lost > 0 && self.must_keep(level) {
                why.push(format!("{} acknowledged {level} write(s) lost", l.lost));
            }
            if l.phantom > 0 {
                why.push(format!("{} phantom value(s) at {level}", l.phantom));
            }
        }
        if self.stale_reads_over_limit > 0 {
            why.push(format!(
                "{} follower read(s) staler than max_lag_ms",
                self.stale_reads_over_limit
            ));
        }
        if !self.read_your_writes_violations.is_empty() {
            why.push(format!(
                "{} read-your-writes violation(s)",
                self.read_your_writes_violations.len()
            ));
        }
        for v in &self.off_clock_leaders {
            why.push(v.clone());
        }
        if self.expiry_violations > 0 {
            why.push(format!(
                "{} read(s) of expiring keys outside their lifetime",
                self.expiry_violations
            ));
        }
        if !self.damage_not_found.is_empty() {
            why.push(format!(
                "{} damaged log(s) not found as damage",
                self.damage_not_found.len()
            ));
        }
        if self.error.is_none() && !self.converged {
            why.push("replicas did not converge".into());
        }
        why
    }
}

impl RunResult {
    /// Failures not listed in [`KNOWN_OPEN`] for this run's fault.
    pub fn new_failures(&self) -> Vec<String> {
        self.failures_not_in(KNOWN_OPEN)
    }

    fn failures_not_in(&self, known: &[(&str, &str)]) -> Vec<String> {
        self.failures()
            .into_iter()
            .filter(|why| {
                !known
                    .iter()
                    .any(|(fault, what)| *fault == self.fault && why.contains(what))
            })
            .collect()
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Runs one spec; never panics (a harness failure is reported in `error`).
pub fn run(spec: &RunSpec) -> RunResult {
    let started = Instant::now();
    let mut result = RunResult {
        fault: spec.fault.to_string(),
        seed: spec.seed,
        nodes: spec.fault.nodes(),
        ..RunResult::default()
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| run_inner(spec, &mut result)));
    if let Err(p) = outcome {
        result.error = Some(panic_text(p));
    }
    result.seconds = started.elapsed().as_secs_f64();
    result
}

fn run_inner(spec: &RunSpec, result: &mut RunResult) {
    let opts = Options {
        nodes: spec.fault.nodes(),
        partitions: 4,
        namespaces: true,
        write_timeout_ms: 2_000,
        max_lag_ms: MAX_LAG_MS,
        // Small enough that returning nodes sometimes need a snapshot (full sync).
        snapshot_every_entries: 2_000,
        backlog_entries: 1_000,
        fsync: spec.fsync,
        ack_before_commit: spec.bugs.ack_before_commit,
        stamp_with_wall_clock: spec.bugs.stamp_with_wall_clock,
        skip_read_index: spec.bugs.skip_read_index,
        clock_rates: if spec.fault == Fault::ClockDrift {
            (1..).zip(fault::CLOCK_RATES).collect()
        } else {
            Default::default()
        },
        tmpfs: if spec.fault == Fault::DiskFull {
            (1..=spec.fault.nodes())
                .map(|id| (id, fault::DISK_FULL_TMPFS_BYTES))
                .collect()
        } else {
            Default::default()
        },
        min_free_bytes: (spec.fault == Fault::DiskFull).then_some(fault::DISK_FULL_MIN_FREE_BYTES),
        // Rates move wall clocks apart (the fastest and slowest by 100 ms a second): that
        // fault is about leases under rate drift, `clock-offset` about offsets.
        max_clock_offset_ms: if spec.fault == Fault::ClockDrift {
            3_600_000
        } else {
            500
        },
        // Every node can have its wall clock moved while it runs (`clock-offset`, also
        // drawn by `mixed`).
        clock_offsets: if matches!(spec.fault, Fault::ClockOffset | Fault::Mixed) {
            (1..=spec.fault.nodes()).map(|id| (id, 0)).collect()
        } else {
            Default::default()
        },
        ..Options::default()
    };
    // The nodes' clocks run at their rates from about here (`clock-drift`).
    let cluster_started = Instant::now();
    let mut cluster = match Cluster::try_start(&spec.bin, opts) {
        Ok(c) => c,
        Err(e) => {
            result.error = Some(format!("could not start the cluster: {e}"));
            return;
        }
    };
    let urls: Vec<String> = cluster.nodes.values().map(|n| n.redis_url()).collect();
    let origin = Instant::now();
    let rec = Recorded::new(origin);
    let clients = Clients::start(&urls, &rec, &spec.mix, spec.seed);
    let mut rng = StdRng::seed_from_u64(spec.seed);
    wait_until(Duration::from_secs(20), "the workload warms up", || {
        rec.ops() > 100
    });

    let mut events = Vec::new();
    for _ in 0..spec.cycles {
        let start_s = origin.elapsed().as_secs_f64();
        let injected = match fault::inject(&mut cluster, spec.fault, &mut rng) {
            Ok(i) => i,
            Err(e) => {
                clients.stop();
                result.error = Some(format!("injecting {}: {e}", spec.fault));
                return;
            }
        };
        let (name, detail) = (injected.fault.to_string(), injected.detail.clone());
        std::thread::sleep(spec.hold);
        let healed = fault::heal(&mut cluster, injected);
        result.off_clock_leaders.extend(healed.broken);
        result.damage_not_found.extend(healed.damage_not_found);
        let healed_s = origin.elapsed().as_secs_f64();
        std::thread::sleep(spec.recover);
        events.push(Event {
            fault: name,
            detail,
            start_s,
            healed_s,
            unavailable_ms: 0.0,
            notes: healed.notes,
        });
    }
    clients.stop();

    cluster.wait_ready(Duration::from_secs(30));
    result.converged = catch_unwind(AssertUnwindSafe(|| {
        cluster.wait_converged(Duration::from_secs(30));
        cluster.wait_meta_converged(Duration::from_secs(30))
    }))
    .is_ok();

    // Unavailability: the longest stretch without an acknowledged quorum write.
    let mut acks = rec.quorum_acks.lock().unwrap().clone();
    acks.sort_unstable();
    for e in &mut events {
        let from = (e.start_s * 1e9) as u64;
        let to = ((e.healed_s + spec.recover.as_secs_f64()) * 1e9) as u64;
        e.unavailable_ms = longest_gap(&acks, from, to) as f64 / 1e6;
    }

    result.ops = rec.ops();
    let registers = rec.register_history();
    let report = check_linearizable(&registers, CHECK_BUDGET_PER_KEY);
    result.register_ops_checked = report.ops_checked;
    result.linearizability_violations = report.violations.len();
    result.keys_undecided = report.keys_timed_out.len();
    if !report.violations.is_empty() {
        result.violation_report = Some(report.to_string());
    }

    let mut reader = cluster.redis(1);
    for level in LEVELS {
        let history = rec.unique_history(level);
        let finals = read_back(&mut reader, &history);
        let check = check_acknowledged_present(&history, &finals);
        let acked_at: BTreeMap<(&str, &str), u64> = history
            .ops
            .iter()
            .filter_map(|op| match (&op.kind, op.complete_ns) {
                (OpKind::Write(v), Some(t)) => Some(((op.key.as_str(), v.as_str()), t)),
                _ => None,
            })
            .collect();
        let lost_window_ms = check
            .lost
            .iter()
            .filter_map(|(k, v)| acked_at.get(&(k.as_str(), v.as_str())))
            .map(|t| {
                let t_s = *t as f64 / 1e9;
                let before = events
                    .iter()
                    .rev()
                    .find(|e| e.start_s <= t_s)
                    .map_or(0.0, |e| e.start_s);
                (t_s - before) * 1e3
            })
            .collect();
        result.loss.insert(
            level.to_string(),
            LevelLoss {
                acknowledged: check.acknowledged,
                lost: check.lost.len(),
                phantom: check.phantom.len(),
                lost_window_ms,
            },
        );
        if let Some(dir) = &spec.out {
            if !check.is_ok() {
                save(dir, &format!("unique-{level}.json"), &history.to_json());
            }
        }
    }

    let stale = workload::staleness_ms(&rec);
    result.follower_reads = stale.len();
    result.max_staleness_ms = stale.iter().map(|s| s.3).fold(0.0, f64::max);
    let over: Vec<&(u64, u64, u64, f64)> =
        stale.iter().filter(|s| s.3 > MAX_LAG_MS as f64).collect();
    result.stale_reads_over_limit = over.len();
    result.stale_reads = over
        .iter()
        .take(10)
        .map(|(node, t, v, lag)| {
            format!(
                "node {node} at {:.3} s returned clock value {v}, at least {lag:.0} ms stale",
                *t as f64 / 1e9
            )
        })
        .collect();
    // Under `clock-drift` the nodes' wall clocks really are wrong: each runs at its own rate
    // from its start, so by the end of the run it is off by up to the largest deviation
    // times the run's length, and a lifetime is scaled by the rate too. The margin grows by
    // that much; `clock-offset` keeps the plain one.
    let drift_ms = if spec.fault == Fault::ClockDrift {
        let deviation = fault::CLOCK_RATES
            .iter()
            .map(|r| (r - 1.0).abs())
            .fold(0.0, f64::max);
        let span_ms =
            cluster_started.elapsed().as_millis() as f64 + workload::EXPIRY_TTL_MAX_MS as f64;
        (deviation * span_ms).ceil() as u64
    } else {
        0
    };
    let expiry = workload::check_expiry(
        &rec.expiry_writes.lock().unwrap(),
        &rec.expiry_reads.lock().unwrap(),
        workload::EXPIRY_MARGIN_MS + drift_ms,
        MAX_LAG_MS,
    );
    result.expiring_writes = expiry.acknowledged;
    result.expiry_reads_checked = expiry.reads_checked;
    result.expiry_violations = expiry.violations.len();
    result.expiry_examples = expiry.violations.iter().take(10).cloned().collect();
    if let Some(dir) = &spec.out {
        if !expiry.violations.is_empty() {
            let both = serde_json::json!({
                "writes": *rec.expiry_writes.lock().unwrap(),
                "reads": *rec.expiry_reads.lock().unwrap(),
            });
            save(dir, "expiry.json", &both.to_string());
        }
    }
    result.session_reads = rec.session_reads.load(std::sync::atomic::Ordering::Relaxed);
    result.read_your_writes_violations = rec.ryw_violations.lock().unwrap().clone();
    result.events = events;

    if let Some(dir) = &spec.out {
        if !result.failures().is_empty() {
            save(dir, "registers.json", &registers.to_json());
            for n in cluster.nodes.values() {
                save(dir, &format!("node{}.log", n.id), &n.log_text());
            }
        }
    }
}

/// The longest interval within [from, to] that holds no time of `sorted`.
fn longest_gap(sorted: &[u64], from: u64, to: u64) -> u64 {
    let inside = sorted.iter().copied().filter(|t| *t > from && *t < to);
    let mut last = from;
    let mut longest = 0;
    for t in inside.chain(std::iter::once(to)) {
        longest = longest.max(t - last);
        last = t;
    }
    longest
}

/// Reads every key the history wrote, at `primary` (linearizable), in batches.
fn read_back(conn: &mut redis::Connection, history: &History) -> BTreeMap<String, Option<String>> {
    let mut keys: Vec<&str> = history.ops.iter().map(|op| op.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = BTreeMap::new();
    for batch in keys.chunks(200) {
        let mut tries = 0;
        let values: Vec<Option<String>> = loop {
            match redis::cmd("MGET").arg(batch).query(conn) {
                Ok(v) => break v,
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("read-back retry ({e})");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("reading back acknowledged writes: {e}"),
            }
        };
        for (k, v) in batch.iter().zip(values) {
            out.insert(k.to_string(), v);
        }
    }
    out
}

fn save(dir: &Path, name: &str, text: &str) {
    if std::fs::create_dir_all(dir).is_ok() {
        let _ = std::fs::write(dir.join(name), text);
    }
}

/// Shared by campaign and tests: the default workload.
pub fn default_mix() -> Mix {
    Mix {
        register_clients: 4,
        unique_clients: 2,
        expiry_writers: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_findings_are_matched_by_fault_and_text() {
        let r = RunResult {
            fault: "split".into(),
            converged: true,
            stale_reads_over_limit: 2,
            read_your_writes_violations: vec!["x".into()],
            ..RunResult::default()
        };
        let known = [
            ("split", "follower read(s) staler"),
            ("bridge", "read-your-writes"),
        ];
        assert_eq!(
            r.failures_not_in(&known),
            vec!["1 read-your-writes violation(s)"]
        );
    }

    #[test]
    fn longest_gap_counts_edges() {
        assert_eq!(longest_gap(&[], 10, 20), 10);
        assert_eq!(longest_gap(&[12, 18], 10, 20), 6);
        assert_eq!(longest_gap(&[5, 11, 25], 10, 20), 9);
    }

    #[test]
    fn failures_name_the_broken_promise() {
        let mut r = RunResult {
            converged: true,
            nodes: 5,
            ..RunResult::default()
        };
        assert!(r.failures().is_empty());
        r.loss.insert(
            "eventual".into(),
            LevelLoss {
                lost: 3,
                ..LevelLoss::default()
            },
        );
        assert!(r.failures().is_empty(), "eventual may lose writes");
        r.loss.insert(
            "at_least:2".into(),
            LevelLoss {
                lost: 2,
                ..LevelLoss::default()
            },
        );
        assert!(r.failures().is_empty(), "2 of 5 copies is not a commit");
        r.nodes = 3;
        assert_eq!(
            r.failures(),
            vec!["2 acknowledged at_least:2 write(s) lost"]
        );
        r.loss.remove("at_least:2");
        r.loss.insert(
            "quorum".into(),
            LevelLoss {
                lost: 1,
                ..LevelLoss::default()
            },
        );
        assert_eq!(r.failures(), vec!["1 acknowledged quorum write(s) lost"]);
    }
}
