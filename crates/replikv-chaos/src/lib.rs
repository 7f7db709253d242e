//! Jepsen-style fault campaigns against real replikv clusters (issue: reliability harness).
//!
//! A run starts a cluster of `replikv server` processes, each in its own network namespace
//! (replikv-testkit), drives concurrent RESP clients (`workload`), injects one kind of fault
//! on a schedule and heals it (`fault`), and then checks what the clients saw against the
//! promises of DESIGN.md section 3 (`run`, with replikv-checker):
//!
//! | promise | checked by |
//! |---|---|
//! | `primary` reads and writes are linearizable | per-key Wing–Gong/Lowe search over register histories |
//! | acknowledged `quorum`, `all` (and majority `at_least`) writes survive | every unique key read back at the end |
//! | `eventual` / minority `at_least` losses are bounded to the fault | lost writes counted with their time after the fault |
//! | follower reads are at most `max_lag_ms` stale | a clock key written at `quorum`, read at `secondary` on every node |
//! | a session reads its own writes on any replica | SET then GET with `REPLIKV.READ secondary` |
//! | replicas converge after healing | per-partition digests of every replica, and of every meta group replica (the topology) |
//! | failover heals quickly | longest stretch without an acknowledged `quorum` write, per fault |
//! | a damaged log is found and cut at the damage, never as a torn tail (`log-damage`) | the restarted node's log |
//!
//! A campaign (`campaign`) runs many of those and prints one table; `replikv-chaos short` is
//! what CI runs, `replikv-chaos full` the long one (docs/RELIABILITY.md).

pub mod campaign;
pub mod fault;
pub mod run;
pub mod workload;

pub use campaign::{run_campaign, CampaignReport, CampaignSpec};
pub use fault::Fault;
pub use run::{Bugs, RunResult, RunSpec};
