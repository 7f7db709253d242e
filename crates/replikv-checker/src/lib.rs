//! History checkers for replikv's Jepsen-style reliability harness.
//!
//! The harness records every operation its clients issue as an [`Op`] (what was asked, when it
//! was invoked, when and how it completed) into a [`History`]; the checkers here decide, after
//! the run, whether what the clients saw is consistent with a correct store. They are pure
//! functions of the history: no I/O, no clocks, no threads.
//!
//! # What is here
//! | module | what it holds |
//! |---|---|
//! | `history` | [`Op`], [`OpKind`], [`Outcome`], [`History`]: the recorded vocabulary, JSON (de)serialisation, and well-formedness rules |
//! | `linearizability` | [`check_linearizable`] and its [`LinearizabilityReport`]: split by key, prepare, search, report |
//! | `search` | the Wing & Gong / Lowe search over one key's ops (pure, on interned values) |
//! | `violation` | [`Violation`]: the culprit op, the window of ops around it, and a printable explanation |
//! | `final_read` | [`check_acknowledged_present`]: were acknowledged writes still there at the end? |
//!
//! # The linearizability algorithm
//! Each key is a register (absent, or holding a string) that supports read, write and
//! compare-and-set. Linearizability is *P-compositional* (Herlihy & Wing): a history is
//! linearizable iff each key's sub-history is, so keys are checked one at a time, as Porcupine
//! does. For one key the checker runs Wing & Gong's backtracking search in Lowe's form: the
//! call and return events sit in a doubly linked list sorted by time; the search walks it,
//! linearizing (lifting out) any op whose call it reaches and whose effect the model accepts,
//! and backtracking when it reaches the return of an op it has not linearized. Lowe's cache of
//! failed configurations (set of linearized ops, register state) prunes repeated work.
//!
//! Timed-out ops would make that search exponential (each may land anywhere, or nowhere), so
//! three sound prunings keep it near-linear on realistic histories: a failed configuration
//! also rules out those that differ only by having placed more unknown-outcome ops; ops with
//! a deadline are tried before unknown ones, so the smaller configurations fail first; and
//! placements that only hide an unknown op's effect are skipped. The invariants are stated in
//! the `search` module, and `tests/against_brute_force.rs` checks verdicts and culprits
//! against an exhaustive search on thousands of small random histories.
//!
//! Outcomes map onto the search as follows:
//! * [`Outcome::Failed`] ops definitely did not take effect: they are dropped.
//! * [`Outcome::Unknown`] writes and compare-and-sets may take effect at any time after their
//!   invocation, or never: their return is placed at infinity, and "never" is the same as
//!   "last", where nothing observes them. Unknown reads observe nothing and are dropped.
//! * Everything else must take effect between its invocation and its completion.
//!
//! Ops whose invocation equals another's completion are treated as concurrent, so a coarse
//! clock can hide a violation but never invent one.
//!
//! # Limits
//! * The search is exponential in the number of mutually concurrent ops on one key in the worst
//!   case, and in the number of timed-out ops whose values are observed; `budget_per_key` caps
//!   the configurations explored, and a key that exceeds it is reported in
//!   [`LinearizabilityReport::keys_timed_out`], undecided. As with Jepsen, spread a workload
//!   over many keys rather than hammering one.
//! * One violation is reported per key: the earliest-completing op that cannot be linearized.
//!   Its window is a readable neighbourhood (ops concurrent with it and the ops that may have
//!   preceded them), not a proven-minimal counterexample.
//! * The model has no deletes or expiries; histories using them need another model.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod final_read;
mod history;
mod linearizability;
mod search;
mod violation;

pub use final_read::{check_acknowledged_present, FinalReadCheck};
pub use history::{History, Op, OpKind, Outcome};
pub use linearizability::{check_linearizable, LinearizabilityReport, MalformedOp};
pub use violation::Violation;
