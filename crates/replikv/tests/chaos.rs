//! The chaos campaign's checkers bite: with a known bug injected, a short campaign against a
//! real cluster (network namespaces, real packet loss) must fail, naming the broken promise.
//! The same runs without the bug are part of `replikv-chaos short`, which CI runs.
//! Needs root, as every network fault does.

use std::time::Duration;

use replikv_chaos::{Bugs, Fault, RunResult, RunSpec};

fn run(fault: Fault, bugs: Bugs) -> RunResult {
    run_seed(fault, bugs, 7)
}

fn run_seed(fault: Fault, bugs: Bugs, seed: u64) -> RunResult {
    let spec = RunSpec {
        fault,
        seed,
        // Five: with three, 1 run in 3 of the stale-read case caught its stale reads only as
        // over-limit follower reads, none on a register.
        cycles: 5,
        hold: Duration::from_secs(4),
        recover: Duration::from_secs(2),
        bugs,
        fsync: "always",
        // More register clients than a campaign uses, so that some are on the isolated
        // leader in every cycle.
        mix: replikv_chaos::workload::Mix {
            register_clients: 9,
            unique_clients: 2,
            // More expiring keys, so that several are written in the moments a leader's
            // clock has jumped and it has not yet handed over.
            expiry_writers: 6,
        },
        bin: env!("CARGO_BIN_EXE_replikv").into(),
        out: None,
    };
    let result = replikv_chaos::run::run(&spec);
    eprintln!(
        "{} ops, failures: {:?}, loss: {:?}",
        result.ops,
        result.failures(),
        result.loss
    );
    assert!(
        result.error.is_none(),
        "the run itself failed (network namespaces need root): {:?}",
        result.error
    );
    result
}

#[test]
fn campaign_catches_quorum_writes_acknowledged_before_commit() {
    let bugs = Bugs {
        ack_before_commit: true,
        ..Bugs::default()
    };
    let result = run(Fault::IsolateLeader, bugs);
    let lost = result.loss.get("quorum").map_or(0, |l| l.lost);
    assert!(
        lost > 0 || result.linearizability_violations > 0,
        "an isolated leader acknowledged quorum writes it never committed, and the campaign \
         saw nothing: {:?}",
        result.failures()
    );
    assert!(!result.failures().is_empty());
}

/// A leader that stamps entries with its wall clock, jump and all, sets expiries an hour off
/// in the moments before it notices and hands over: the expiring-key checker sees keys gone
/// at once (a jump back) or living far too long (a jump ahead).
#[test]
fn campaign_catches_a_jumped_wall_clock_reaching_expiries() {
    let bugs = Bugs {
        stamp_with_wall_clock: true,
        ..Bugs::default()
    };
    // Seed 8 draws mostly large jumps (minutes, not milliseconds) in its cycles.
    let result = run_seed(Fault::ClockOffset, bugs, 8);
    assert!(
        result.expiry_violations > 0,
        "leaders stamped entries with a jumped wall clock, and the expiry checker saw nothing: \
         {:?}",
        result.failures()
    );
}

#[test]
fn campaign_catches_primary_reads_without_a_read_index() {
    let bugs = Bugs {
        skip_read_index: true,
        ..Bugs::default()
    };
    let result = run(Fault::IsolateLeader, bugs);
    assert!(
        result.linearizability_violations > 0,
        "an isolated leader served stale primary reads, and the checker saw nothing: {:?}",
        result.failures()
    );
}
