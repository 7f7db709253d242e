//! Campaigns: many runs over a list of faults, and the summary table of what they found.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fault::{Fault, ALL};
use crate::run::{self, Bugs, RunResult, RunSpec};
use crate::workload::LEVELS;

/// What a campaign runs.
#[derive(Clone, Debug)]
pub struct CampaignSpec {
    pub name: String,
    pub faults: Vec<Fault>,
    pub runs_per_fault: u32,
    pub cycles: u32,
    pub hold: Duration,
    pub recover: Duration,
    /// Run `i` of a fault uses seed `seed + i`, so any run replays from its seed.
    pub seed: u64,
    pub bugs: Bugs,
    /// The nodes' `storage.fsync` policy.
    pub fsync: &'static str,
    pub bin: PathBuf,
    pub out: PathBuf,
}

impl CampaignSpec {
    /// What CI runs: every fault once, two short cycles each (about 5 minutes).
    pub fn short(bin: PathBuf, out: PathBuf) -> CampaignSpec {
        CampaignSpec {
            name: "short".into(),
            faults: ALL.to_vec(),
            runs_per_fault: 1,
            cycles: 2,
            hold: Duration::from_secs(3),
            recover: Duration::from_secs(3),
            seed: 1,
            bugs: Bugs::default(),
            fsync: "always",
            bin,
            out,
        }
    }

    /// Every fault 20 times with seeds 1 to 20 (about 65 minutes).
    pub fn full(bin: PathBuf, out: PathBuf) -> CampaignSpec {
        CampaignSpec {
            name: "full".into(),
            runs_per_fault: 20,
            ..CampaignSpec::short(bin, out)
        }
    }

    /// The runs, in order.
    pub fn runs(&self) -> Vec<RunSpec> {
        let mut runs = Vec::new();
        for fault in &self.faults {
            for i in 0..self.runs_per_fault {
                let seed = self.seed + i as u64;
                runs.push(RunSpec {
                    fault: *fault,
                    seed,
                    cycles: self.cycles,
                    hold: self.hold,
                    recover: self.recover,
                    bugs: self.bugs,
                    fsync: self.fsync,
                    mix: run::default_mix(),
                    bin: self.bin.clone(),
                    out: Some(self.out.join(format!("{fault}-seed{seed}"))),
                });
            }
        }
        runs
    }
}

/// Every run's result, and the campaign's verdict.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CampaignReport {
    pub name: String,
    pub bugs: Bugs,
    pub results: Vec<RunResult>,
    pub seconds: f64,
}

/// Runs every run of `spec`, calling `progress` after each.
pub fn run_campaign(spec: &CampaignSpec, mut progress: impl FnMut(&RunResult)) -> CampaignReport {
    let started = Instant::now();
    let mut results = Vec::new();
    for r in spec.runs() {
        let result = run::run(&r);
        progress(&result);
        results.push(result);
    }
    CampaignReport {
        name: spec.name.clone(),
        bugs: spec.bugs,
        results,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Nearest-rank percentile of `values` (sorted here); 0 when empty.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

impl CampaignReport {
    /// Runs that broke a promise, with why.
    pub fn failed_runs(&self) -> Vec<(&RunResult, Vec<String>)> {
        self.results
            .iter()
            .map(|r| (r, r.failures()))
            .filter(|(_, why)| !why.is_empty())
            .collect()
    }

    /// True if no run broke a promise, counting known open findings only when `strict`.
    pub fn passed(&self, strict: bool) -> bool {
        self.results.iter().all(|r| {
            if strict {
                r.failures().is_empty()
            } else {
                r.new_failures().is_empty()
            }
        })
    }

    /// The summary table, one row per fault and a total (Markdown).
    pub fn table(&self) -> String {
        let mut by_fault: BTreeMap<&str, Vec<&RunResult>> = BTreeMap::new();
        for r in &self.results {
            by_fault.entry(r.fault.as_str()).or_default().push(r);
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| fault | runs | faults injected | ops checked | linearizability violations | lost acknowledged writes ({}) | lost writes acknowledged after fault start (ms) | unavailable p50 / p99 (ms) | max follower staleness (ms) | read-your-writes violations | expiring-key reads checked / outside their lifetime | failed runs | runs with only known open findings |",
            LEVELS.join(" / ")
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"
        );
        let all: Vec<&RunResult> = self.results.iter().collect();
        let rows = by_fault
            .iter()
            .map(|(f, rs)| (f.to_string(), rs.clone()))
            .chain(std::iter::once(("**all**".to_string(), all)));
        for (name, rs) in rows {
            let injected: usize = rs.iter().map(|r| r.events.len()).sum();
            let ops: usize = rs.iter().map(|r| r.ops).sum();
            let violations: usize = rs.iter().map(|r| r.linearizability_violations).sum();
            let lost: Vec<String> = LEVELS
                .iter()
                .map(|l| {
                    rs.iter()
                        .filter_map(|r| r.loss.get(*l))
                        .map(|x| x.lost)
                        .sum::<usize>()
                        .to_string()
                })
                .collect();
            let windows: Vec<f64> = rs
                .iter()
                .flat_map(|r| {
                    r.loss
                        .values()
                        .flat_map(|l| l.lost_window_ms.iter().copied())
                })
                .collect();
            let window = if windows.is_empty() {
                "-".to_string()
            } else {
                let lo = windows.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = windows.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!("{lo:.0} to {hi:.0}")
            };
            let mut gaps: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.events.iter().map(|e| e.unavailable_ms))
                .collect();
            let (p50, p99) = (percentile(&mut gaps, 50.0), percentile(&mut gaps, 99.0));
            let stale = rs.iter().map(|r| r.max_staleness_ms).fold(0.0, f64::max);
            let ryw: usize = rs.iter().map(|r| r.read_your_writes_violations.len()).sum();
            let expiry_reads: usize = rs.iter().map(|r| r.expiry_reads_checked).sum();
            let expiry_bad: usize = rs.iter().map(|r| r.expiry_violations).sum();
            let failed = rs.iter().filter(|r| !r.new_failures().is_empty()).count();
            let known = rs
                .iter()
                .filter(|r| r.new_failures().is_empty() && !r.failures().is_empty())
                .count();
            let _ = writeln!(
                out,
                "| {name} | {} | {injected} | {ops} | {violations} | {} | {window} | {p50:.0} / {p99:.0} | {stale:.0} | {ryw} | {expiry_reads} / {expiry_bad} | {failed} | {known} |",
                rs.len(),
                lost.join(" / "),
            );
        }
        out
    }

    /// Failed runs with why and where their files are, for the end of the output.
    pub fn failure_list(&self, out_dir: &std::path::Path) -> String {
        let mut out = String::new();
        for (r, why) in self.failed_runs() {
            let known = if r.new_failures().is_empty() {
                " [known open finding]"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "- {} seed {}{known}: {} (files: {})",
                r.fault,
                r.seed,
                why.join("; "),
                out_dir
                    .join(format!("{}-seed{}", r.fault, r.seed))
                    .display()
            );
            if let Some(v) = &r.violation_report {
                let first: String = v.lines().take(30).collect::<Vec<_>>().join("\n    ");
                let _ = writeln!(out, "    {first}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 50.0), 3.0);
        assert_eq!(percentile(&mut v, 99.0), 5.0);
        assert_eq!(percentile(&mut [], 50.0), 0.0);
    }

    #[test]
    fn a_full_campaign_runs_every_fault_twenty_times() {
        let spec = CampaignSpec::full("replikv".into(), "out".into());
        let runs = spec.runs();
        assert_eq!(runs.len(), ALL.len() * 20);
        assert!(ALL.len() >= 10);
        let seeds: Vec<u64> = runs
            .iter()
            .filter(|r| r.fault == Fault::Split)
            .map(|r| r.seed)
            .collect();
        assert_eq!(seeds, (1..=20).collect::<Vec<u64>>());
    }
}
