//! The lost-write check: after the run, the harness reads back every key; every write the store
//! acknowledged must still be there unless something may have overwritten it since.
//!
//! Designed for the unique-value workload, where each value is written once to its own key, so
//! a key's final value names the write that produced it. It stays sound when a key is written
//! several times: a write is only judged when nothing else could have overwritten it.

use crate::history::{History, Op, Outcome};
use std::collections::BTreeMap;

/// What [`check_acknowledged_present`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FinalReadCheck {
    /// Acknowledged writes: [`Outcome::Written`] writes and compare-and-sets that reported
    /// `CasResult(true)`.
    pub acknowledged: usize,
    /// (key, value) of acknowledged writes missing at the end although no other op could
    /// have overwritten them: data loss.
    pub lost: Vec<(String, String)>,
    /// Final values written only by ops whose outcome was [`Outcome::Unknown`]: they took
    /// effect after all, which is allowed.
    pub unacknowledged_present: usize,
    /// (key, value) of final values that no op could have stored: never written, or written
    /// only by ops that failed or reported that they did not swap. Always a bug.
    pub phantom: Vec<(String, String)>,
}

impl FinalReadCheck {
    /// True if nothing was lost and nothing appeared from nowhere.
    pub fn is_ok(&self) -> bool {
        self.lost.is_empty() && self.phantom.is_empty()
    }
}

/// Compares the acknowledged writes in `history` with the contents read at the end.
///
/// `final_state` maps each key to the value read at the end (`None` = absent); a key missing
/// from the map counts as absent, so pass every key the workload wrote. An acknowledged write
/// of `v` to `k` is lost iff `k` does not hold `v` at the end and no other op on `k` that may
/// have stored a value (acknowledged, or unknown) could have taken effect after it, that is,
/// none is unknown or completed at or after the write's invocation.
pub fn check_acknowledged_present(
    history: &History,
    final_state: &BTreeMap<String, Option<String>>,
) -> FinalReadCheck {
    let mut check = FinalReadCheck::default();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &history.ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in &by_key {
        let final_value = final_state.get(*key).and_then(|value| value.as_deref());
        check_writes(key, ops, final_value, &mut check);
    }
    for (key, value) in final_state {
        if let Some(value) = value {
            let ops = by_key.get(key.as_str()).map_or(&[][..], Vec::as_slice);
            classify_final_value(key, ops, value, &mut check);
        }
    }
    check
}

/// Counts one key's acknowledged writes and reports those missing at the end.
fn check_writes(key: &str, ops: &[&Op], final_value: Option<&str>, check: &mut FinalReadCheck) {
    for (index, write) in ops.iter().enumerate() {
        if !write.stored_for_sure() {
            continue;
        }
        check.acknowledged += 1;
        let value = write
            .stored_value()
            .expect("only writes and compare-and-sets store");
        if final_value != Some(value) && !may_be_overwritten(ops, index) {
            check.lost.push((key.to_owned(), value.to_owned()));
        }
    }
}

/// True if another op on the key may have stored a value after `ops[index]` did.
fn may_be_overwritten(ops: &[&Op], index: usize) -> bool {
    let write = ops[index];
    ops.iter().enumerate().any(|(other_index, other)| {
        other_index != index
            && other.may_have_stored()
            && (other.outcome == Outcome::Unknown
                || other.complete_ns.is_none_or(|done| done >= write.invoke_ns))
    })
}

/// Counts or reports a value present at the end, according to who could have written it.
fn classify_final_value(key: &str, ops: &[&Op], value: &str, check: &mut FinalReadCheck) {
    let writers = || ops.iter().filter(|op| op.stored_value() == Some(value));
    if writers().any(|op| op.stored_for_sure()) {
        return;
    }
    if writers().any(|op| op.may_have_stored()) {
        check.unacknowledged_present += 1;
    } else {
        check.phantom.push((key.to_owned(), value.to_owned()));
    }
}
