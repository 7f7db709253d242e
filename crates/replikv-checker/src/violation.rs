//! Turning a stuck search into something a person can read: the culprit op, the window of ops
//! around it, and an explanation.

use crate::history::{show_value, History, Op, Outcome};
use crate::linearizability::PreparedKey;
use crate::search::{Blocked, SearchOp};
use std::fmt;

/// A key whose sub-history has no linearization.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// Index into [`History::ops`] of the culprit: the earliest-completing op such that the
    /// ops completed by then (with the ones still pending free to take effect or not) have no
    /// linearization. Everything before its completion was consistent.
    pub culprit: usize,
    /// The ops around the culprit, as (index into [`History::ops`], op), sorted by invocation:
    /// the ops that overlap it, every op overlapping those, and the ops that may have been the
    /// last to take effect before them. Unknown-outcome ops invoked before that are omitted.
    pub window: Vec<(usize, Op)>,
    /// Why the culprit cannot be linearized, in words.
    pub explanation: String,
}

/// Builds the violation for a key whose search got stuck at `blocked`.
pub(crate) fn describe(
    history: &History,
    key: &str,
    prepared: &PreparedKey,
    blocked: &Blocked,
) -> Violation {
    let culprit = prepared.history_index[blocked.culprit];
    let window = window(&prepared.ops, blocked.culprit)
        .into_iter()
        .map(|i| prepared.history_index[i])
        .map(|index| (index, history.ops[index].clone()))
        .collect();
    let explanation = explain(history, culprit, prepared, blocked);
    Violation {
        key: key.to_owned(),
        culprit,
        window,
        explanation,
    }
}

/// Search-op indices of the window around `culprit`, sorted by invocation.
fn window(ops: &[SearchOp], culprit: usize) -> Vec<usize> {
    let (call_ns, return_ns) = (ops[culprit].call_ns, ops[culprit].return_ns);
    // Unknown ops have no completion (`u64::MAX`); they must not stretch the window back to
    // their invocation, however long ago that was.
    let start_ns = ops
        .iter()
        .filter(|op| op.call_ns <= return_ns && op.return_ns >= call_ns && op.return_ns != u64::MAX)
        .map(|op| op.call_ns)
        .min()
        .unwrap_or(call_ns);
    // The latest invocation among ops done before the window: any op that completed at or
    // after it may have been the last to take effect before the window.
    let frontier_ns = ops
        .iter()
        .filter(|op| op.return_ns < start_ns)
        .map(|op| op.call_ns)
        .max()
        .unwrap_or(0);
    let mut window: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].call_ns <= return_ns && ops[i].return_ns >= frontier_ns)
        .filter(|&i| ops[i].return_ns != u64::MAX || ops[i].call_ns >= frontier_ns)
        .collect();
    window.sort_by_key(|&i| (ops[i].call_ns, i));
    window
}

fn explain(history: &History, culprit: usize, prepared: &PreparedKey, blocked: &Blocked) -> String {
    let op = &history.ops[culprit];
    let completed = op
        .complete_ns
        .map_or("never".to_owned(), |ns| format!("at {ns} ns"));
    let mut text = format!(
        "op #{culprit} ({op}; invoked at {} ns, completed {completed}) cannot be linearized: \
         no order of the ops completed by then allows it",
        op.invoke_ns
    );
    if !blocked.states_at_deadline.is_empty() {
        let mut held: Vec<String> = (blocked.states_at_deadline.iter())
            .map(|&state| show_value(prepared.value(state)))
            .collect();
        if blocked.more_states {
            held.push("others".to_owned());
        }
        text.push_str("; placing every op that completed before it leaves the register holding ");
        text.push_str(&held.join(" or "));
        if blocked.unknown_landings {
            text.push_str(" (or the value of a timed-out write landing just then)");
        }
    }
    if let Some(hint) = read_hint(history, culprit) {
        text.push_str("; ");
        text.push_str(&hint);
    }
    text
}

/// For a read of a value that no op could have stored, or not in time, or that was surely
/// overwritten before the read began, says so.
fn read_hint(history: &History, culprit: usize) -> Option<String> {
    let read = &history.ops[culprit];
    let Outcome::Read(Some(seen)) = &read.outcome else {
        return None;
    };
    let writers: Vec<usize> = (0..history.ops.len())
        .filter(|&i| {
            history.ops[i].key == read.key && history.ops[i].stored_value() == Some(seen.as_str())
        })
        .collect();
    let possible: Vec<usize> = writers
        .iter()
        .copied()
        .filter(|&i| history.ops[i].may_have_stored())
        .collect();
    let read_done = read
        .complete_ns
        .expect("an acknowledged read has a completion time");
    if writers.is_empty() {
        Some(format!("no op ever wrote {seen:?}"))
    } else if possible.is_empty() {
        Some(format!(
            "{seen:?} was written only by op {}, which did not take effect",
            names(&writers)
        ))
    } else if possible
        .iter()
        .all(|&i| history.ops[i].invoke_ns > read_done)
    {
        Some(format!(
            "{seen:?} was written only by op {}, invoked after this read completed",
            names(&possible)
        ))
    } else {
        let overwrites: Option<Vec<usize>> = possible
            .iter()
            .map(|&i| overwritten_before(history, i, read))
            .collect();
        let overwrites = overwrites?;
        Some(format!(
            "{seen:?} was written by op {} and surely overwritten by op {} before this read began",
            names(&possible),
            names(&overwrites)
        ))
    }
}

/// The latest acknowledged store on the key that surely took effect after op `writer` and
/// before `read` began, if `writer` is known to have stored at all.
fn overwritten_before(history: &History, writer: usize, read: &Op) -> Option<usize> {
    let writer = &history.ops[writer];
    let written_ns = writer.complete_ns.filter(|_| writer.stored_for_sure())?;
    history.ops.iter().rposition(|op| {
        op.key == read.key
            && op.stored_for_sure()
            && op.invoke_ns > written_ns
            && op.complete_ns.is_some_and(|done| done < read.invoke_ns)
    })
}

/// `#3, #7`
fn names(indices: &[usize]) -> String {
    indices
        .iter()
        .map(|index| format!("#{index}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {:?}: {}", self.key, self.explanation)?;
        let origin_ns = self
            .window
            .iter()
            .map(|(_, op)| op.invoke_ns)
            .min()
            .unwrap_or(0);
        writeln!(
            f,
            "  window (times in ns after {origin_ns} ns; >> marks the culprit):"
        )?;
        for (index, op) in &self.window {
            let marker = if *index == self.culprit { ">>" } else { "  " };
            let done = match (&op.outcome, op.complete_ns) {
                (Outcome::Unknown, _) | (_, None) => "?".to_owned(),
                (_, Some(ns)) => (ns - origin_ns).to_string(),
            };
            writeln!(
                f,
                "  {marker} #{index:<6} [{:>10} .. {done:>10}]  {op}",
                op.invoke_ns - origin_ns
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::Step;

    fn op(call_ns: u64, return_ns: u64) -> SearchOp {
        SearchOp {
            call_ns,
            return_ns,
            step: Step::Write(0),
        }
    }

    #[test]
    fn window_spans_overlapping_ops_and_their_possible_predecessors() {
        let ops = [
            op(0, 10),        // 0: superseded by op 1, which starts after it completes
            op(20, 30),       // 1: may be the last before the window
            op(25, 45),       // 2: also may be the last (overlaps op 1)
            op(50, 70),       // 3: overlaps the culprit
            op(60, 80),       // 4: the culprit
            op(85, 90),       // 5: after the culprit
            op(5, u64::MAX),  // 6: unknown, invoked long before: left out
            op(55, u64::MAX), // 7: unknown, invoked inside the window: kept
        ];
        assert_eq!(window(&ops, 4), vec![1, 2, 3, 7, 4]);
    }
}
