//! `replikv-chaos`: runs fault campaigns against real clusters and prints what they found.
//! Needs root (network namespaces, iptables). See docs/RELIABILITY.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use replikv_chaos::{run_campaign, Bugs, CampaignReport, CampaignSpec, Fault, RunResult};

#[derive(Parser)]
#[command(
    name = "replikv-chaos",
    about = "Fault campaigns against real replikv clusters"
)]
struct Cli {
    /// The replikv binary under test (default: `replikv` beside this program).
    #[arg(long, global = true)]
    bin: Option<PathBuf>,
    /// Where the summary and every failed run's histories and node logs are written.
    #[arg(long, global = true, default_value = "target/chaos")]
    out: PathBuf,
    /// Fail on the known open findings too (docs/RELIABILITY.md lists them).
    #[arg(long, global = true)]
    strict: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every fault once, two short cycles (what CI runs; about 5 minutes).
    Short,
    /// Every fault 20 times (about 65 minutes).
    Full,
    /// A chosen campaign: some faults, some runs, some bugs.
    Run {
        /// Faults to run (comma-separated; `all` for every one). See `list`.
        #[arg(long, default_value = "all")]
        faults: String,
        #[arg(long, default_value_t = 1)]
        runs: u32,
        #[arg(long, default_value_t = 2)]
        cycles: u32,
        /// Seconds each fault is held.
        #[arg(long, default_value_t = 3.0)]
        hold: f64,
        /// Seconds after healing before the next fault.
        #[arg(long, default_value_t = 3.0)]
        recover: f64,
        /// First seed; run i of each fault uses seed + i.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Inject the known bug `debug.ack_before_commit` (the campaign must then fail).
        #[arg(long)]
        ack_before_commit: bool,
        /// Inject the known bug `debug.skip_read_index` (the campaign must then fail).
        #[arg(long)]
        skip_read_index: bool,
        /// Inject the known bug `debug.stamp_with_wall_clock` (`clock-offset` must then fail).
        #[arg(long)]
        stamp_with_wall_clock: bool,
        /// The nodes' `storage.fsync` policy (docs/design/durability.md).
        #[arg(long, default_value = "always", value_parser = ["always", "everysec", "never"])]
        fsync: String,
    },
    /// The fault names.
    List,
}

fn default_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("replikv")))
        .unwrap_or_else(|| PathBuf::from("replikv"))
}

fn parse_faults(s: &str) -> Result<Vec<Fault>, String> {
    if s == "all" {
        return Ok(replikv_chaos::fault::ALL.to_vec());
    }
    s.split(',').map(|f| f.trim().parse()).collect()
}

fn print_run(r: &RunResult) {
    let why = r.failures();
    let verdict = if why.is_empty() {
        "ok".to_string()
    } else if r.new_failures().is_empty() {
        format!("KNOWN OPEN FINDING: {}", why.join("; "))
    } else {
        format!("FAILED: {}", why.join("; "))
    };
    let worst = r
        .events
        .iter()
        .map(|e| e.unavailable_ms)
        .fold(0.0, f64::max);
    println!(
        "{:<15} seed {:<3} {:>6} ops, {} faults, longest gap {:>5.0} ms, {:>5.1} s  {verdict}",
        r.fault,
        r.seed,
        r.ops,
        r.events.len(),
        worst,
        r.seconds
    );
    for s in &r.stale_reads {
        println!("      stale read: {s}");
    }
    for v in &r.read_your_writes_violations {
        println!("      read-your-writes: {v}");
    }
    for v in &r.expiry_examples {
        println!("      expiring key: {v}");
    }
    for e in &r.events {
        let notes = if e.notes.is_empty() {
            String::new()
        } else {
            format!(" [{}]", e.notes)
        };
        println!(
            "      {:>6.1}s {} — healed at {:.1}s, {:.0} ms without quorum writes{notes}",
            e.start_s, e.detail, e.healed_s, e.unavailable_ms
        );
    }
}

fn finish(report: &CampaignReport, out: &Path, command: &str, strict: bool) -> ExitCode {
    let table = report.table();
    let failures = report.failure_list(out);
    println!(
        "\n{} campaign: {} runs in {:.0} s\n\n{table}",
        report.name,
        report.results.len(),
        report.seconds
    );
    let _ = std::fs::create_dir_all(out);
    let md = format!(
        "# replikv-chaos {} campaign\n\nCommand: `{command}`\n\n{table}\n{}",
        report.name,
        if report.failed_runs().is_empty() {
            "Every run kept every promise.\n".to_string()
        } else {
            format!("Failed runs:\n\n{failures}")
        }
    );
    let _ = std::fs::write(out.join("summary.md"), md);
    if let Ok(json) = serde_json::to_string_pretty(report) {
        let _ = std::fs::write(out.join("summary.json"), json);
    }
    println!("summary written to {}", out.join("summary.md").display());
    if report.passed(strict) {
        if report.failed_runs().is_empty() {
            println!("every run kept every promise");
        } else {
            println!("no new failures; known open findings:\n{failures}");
        }
        ExitCode::SUCCESS
    } else {
        println!("FAILED runs:\n{failures}");
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let bin = cli.bin.clone().unwrap_or_else(default_bin);
    if !matches!(cli.command, Command::List) && !bin.exists() {
        eprintln!(
            "replikv-chaos: no replikv binary at {} (build it, or pass --bin)",
            bin.display()
        );
        return ExitCode::from(2);
    }
    let command: Vec<String> = std::env::args().collect();
    let command = command.join(" ");
    let out = cli.out.clone();
    let strict = cli.strict;
    let spec = match cli.command {
        Command::List => {
            for f in replikv_chaos::fault::ALL {
                println!("{f:<15} {} nodes", f.nodes());
            }
            return ExitCode::SUCCESS;
        }
        Command::Short => CampaignSpec::short(bin, out.clone()),
        Command::Full => CampaignSpec::full(bin, out.clone()),
        Command::Run {
            faults,
            runs,
            cycles,
            hold,
            recover,
            seed,
            ack_before_commit,
            skip_read_index,
            stamp_with_wall_clock,
            fsync,
        } => {
            let faults = match parse_faults(&faults) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("replikv-chaos: {e}");
                    return ExitCode::from(2);
                }
            };
            if runs == 0 || cycles == 0 || !(hold > 0.0 && recover >= 0.0) {
                eprintln!("replikv-chaos: --runs and --cycles must be at least 1, --hold above 0, --recover at least 0");
                return ExitCode::from(2);
            }
            CampaignSpec {
                name: "custom".into(),
                faults,
                runs_per_fault: runs,
                cycles,
                hold: Duration::from_secs_f64(hold),
                recover: Duration::from_secs_f64(recover),
                seed,
                bugs: Bugs {
                    ack_before_commit,
                    skip_read_index,
                    stamp_with_wall_clock,
                },
                // Clap allowed only the three names; the spec keeps it for the whole run.
                fsync: fsync.leak(),
                ..CampaignSpec::short(bin, out.clone())
            }
        }
    };
    let report = run_campaign(&spec, print_run);
    finish(&report, &out, &command, strict)
}
