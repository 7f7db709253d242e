//! The per-key linearizability check: split the history by key, prepare each key's ops for the
//! search (drop what cannot matter, intern values), search, and gather a report.

use crate::history::{History, Op, OpKind, Outcome};
use crate::search::{self, SearchOp, Step, Value, Verdict};
use crate::violation::{self, Violation};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// What [`check_linearizable`] found.
#[derive(Clone, Debug, Default)]
pub struct LinearizabilityReport {
    /// Keys examined, including the ones that timed out.
    pub keys_checked: usize,
    /// Ops that took part in a search (failed ops, unknown reads and malformed ops do not).
    pub ops_checked: usize,
    /// At most one per key, in key order.
    pub violations: Vec<Violation>,
    /// Keys whose search needed more than the budget; neither passed nor failed.
    pub keys_timed_out: Vec<String>,
    /// Ops that contradict themselves (a harness bug); they were left out of the check.
    pub malformed: Vec<MalformedOp>,
}

/// An op the checker could not use, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedOp {
    /// Index into [`History::ops`].
    pub index: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl LinearizabilityReport {
    /// True only if every key was decided, none has a violation, and no op was malformed.
    pub fn is_linearizable(&self) -> bool {
        self.violations.is_empty() && self.keys_timed_out.is_empty() && self.malformed.is_empty()
    }
}

impl fmt::Display for LinearizabilityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} keys, {} ops checked: {} violations, {} keys timed out, {} malformed ops",
            self.keys_checked,
            self.ops_checked,
            self.violations.len(),
            self.keys_timed_out.len(),
            self.malformed.len()
        )?;
        for violation in &self.violations {
            writeln!(f, "{violation}")?;
        }
        if !self.keys_timed_out.is_empty() {
            writeln!(f, "timed out (undecided): {:?}", self.keys_timed_out)?;
        }
        for malformed in &self.malformed {
            writeln!(f, "malformed op #{}: {}", malformed.index, malformed.reason)?;
        }
        Ok(())
    }
}

/// Checks each key's sub-history against a read/write/compare-and-set register that starts
/// absent (see the crate documentation for the algorithm and how outcomes are treated).
///
/// `budget_per_key` caps the search configurations (set of placed ops, register state)
/// entered per key; a key needing more is reported in
/// [`LinearizabilityReport::keys_timed_out`]. Linearizable histories need a few per op;
/// about a million per key takes a second or so in a release build.
pub fn check_linearizable(history: &History, budget_per_key: usize) -> LinearizabilityReport {
    let mut report = LinearizabilityReport::default();
    for (key, indices) in ops_by_key(history, &mut report.malformed) {
        let prepared = PreparedKey::new(history, &indices);
        report.keys_checked += 1;
        report.ops_checked += prepared.ops.len();
        match search::search(&prepared.ops, budget_per_key) {
            Verdict::Linearizable => {}
            Verdict::OutOfBudget => report.keys_timed_out.push(key.to_owned()),
            Verdict::NotLinearizable(blocked) => report
                .violations
                .push(violation::describe(history, key, &prepared, &blocked)),
        }
    }
    report
}

/// Indices of the well-formed ops, grouped by key in key order; malformed ones are reported.
fn ops_by_key<'h>(
    history: &'h History,
    malformed: &mut Vec<MalformedOp>,
) -> BTreeMap<&'h str, Vec<usize>> {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, op) in history.ops.iter().enumerate() {
        match op.malformation() {
            Some(reason) => malformed.push(MalformedOp { index, reason }),
            None => by_key.entry(op.key.as_str()).or_default().push(index),
        }
    }
    by_key
}

/// One key's ops in the search's terms, with the way back to the history.
pub(crate) struct PreparedKey {
    pub ops: Vec<SearchOp>,
    /// For each search op, its index into [`History::ops`].
    pub history_index: Vec<usize>,
    /// Interned values: `Some(id)` in the search stands for `values[id]`.
    pub values: Vec<String>,
}

impl PreparedKey {
    fn new(history: &History, indices: &[usize]) -> Self {
        let (mut ops, mut history_index, mut interner) =
            (Vec::new(), Vec::new(), Interner::default());
        for &index in indices {
            let op = &history.ops[index];
            let Some(step) = step_of(op, &mut interner) else {
                continue;
            };
            let return_ns = match op.outcome {
                Outcome::Unknown => u64::MAX,
                _ => op
                    .complete_ns
                    .expect("well-formed acknowledged ops have a completion time"),
            };
            ops.push(SearchOp {
                call_ns: op.invoke_ns,
                return_ns,
                step,
            });
            history_index.push(index);
        }
        PreparedKey {
            ops,
            history_index,
            values: interner.values,
        }
    }

    /// The string a search value stands for.
    pub fn value(&self, value: Value) -> Option<&str> {
        value.map(|id| self.values[id as usize].as_str())
    }
}

/// The search step for a well-formed op, or `None` for ops that cannot affect the outcome:
/// failed ops (no effect) and unknown reads (no effect, nothing observed).
fn step_of(op: &Op, interner: &mut Interner) -> Option<Step> {
    let swapped = match op.outcome {
        Outcome::Failed => return None,
        Outcome::CasResult(swapped) => Some(swapped),
        _ => None,
    };
    match (&op.kind, &op.outcome) {
        (OpKind::Read, Outcome::Read(seen)) => Some(Step::Read(interner.value(seen.as_deref()))),
        (OpKind::Read, _) => None,
        (OpKind::Write(value), _) => Some(Step::Write(interner.id(value))),
        (OpKind::Cas { expected, new }, _) => Some(Step::Cas {
            expected: interner.value(expected.as_deref()),
            new: interner.id(new),
            swapped,
        }),
    }
}

/// Numbers one key's distinct values, so the search compares and hashes integers.
#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
    values: Vec<String>,
}

impl Interner {
    fn id(&mut self, value: &str) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = u32::try_from(self.values.len()).expect("fewer than 2^32 distinct values per key");
        self.ids.insert(value.to_owned(), id);
        self.values.push(value.to_owned());
        id
    }

    fn value(&mut self, value: Option<&str>) -> Value {
        value.map(|value| self.id(value))
    }
}
