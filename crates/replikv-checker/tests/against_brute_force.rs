//! The search prunes (Lowe's cache, dominance between configurations that differ by placed
//! unknown-outcome ops, and skipping redundant placements). This test checks that no pruning
//! changes a verdict or a culprit: on thousands of small random histories it compares
//! `check_linearizable` with a brute force that tries every order of every subset of the
//! unknown-outcome ops, straight from the definition.

use replikv_checker::{check_linearizable, History, Op, OpKind, Outcome};

/// SplitMix64: tiny, deterministic.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }

    fn value(&mut self) -> Option<String> {
        ["a", "b", "c"]
            .get(self.below(4) as usize)
            .map(|v| v.to_string())
    }
}

/// `unknown_one_in`: how rare timed-out ops are.
fn random_op(rng: &mut Rng, unknown_one_in: u64) -> Op {
    let invoke_ns = rng.below(20);
    let complete_ns = Some(invoke_ns + rng.below(8));
    let value = || ["a", "b", "c"];
    let (kind, outcome) = match rng.below(3) {
        0 => (OpKind::Read, Outcome::Read(rng.value())),
        1 => (
            OpKind::Write(value()[rng.below(3) as usize].into()),
            Outcome::Written,
        ),
        _ => {
            let kind = OpKind::Cas {
                expected: rng.value(),
                new: value()[rng.below(3) as usize].into(),
            };
            (kind, Outcome::CasResult(rng.below(2) == 0))
        }
    };
    let (outcome, complete_ns) = match rng.below(unknown_one_in) {
        0 => (Outcome::Unknown, None),
        1 => (Outcome::Failed, complete_ns),
        _ => (outcome, complete_ns),
    };
    Op {
        client: 0,
        key: "x".into(),
        kind,
        invoke_ns,
        complete_ns,
        outcome,
    }
}

/// An op the brute force must consider: (history index, call, return or None, op).
type Candidate<'h> = (usize, u64, Option<u64>, &'h Op);

/// The register after `op` from `state`, or `None` if its outcome is impossible there.
fn step(op: &Op, state: &Option<String>) -> Option<Option<String>> {
    match (&op.kind, &op.outcome) {
        (OpKind::Read, Outcome::Read(seen)) => (seen == state).then(|| state.clone()),
        (OpKind::Write(new), _) => Some(Some(new.clone())),
        (OpKind::Cas { expected, new }, outcome) => match (expected == state, outcome) {
            (true, Outcome::CasResult(true) | Outcome::Unknown) => Some(Some(new.clone())),
            (false, Outcome::CasResult(false) | Outcome::Unknown) => Some(state.clone()),
            _ => None,
        },
        _ => unreachable!("reads with other outcomes are not candidates"),
    }
}

/// True if the ops in `left` can be ordered (those with no return may also be left out)
/// so that real-time order holds and every step is possible. Ops touching in time are
/// concurrent, as in the checker.
fn orderable(left: &[Candidate], state: &Option<String>) -> bool {
    if left.iter().all(|(_, _, ret, _)| ret.is_none()) {
        return true;
    }
    (0..left.len()).any(|i| {
        let (_, call, _, op) = left[i];
        let preceded = left
            .iter()
            .any(|(_, _, ret, _)| ret.is_some_and(|ret| ret < call));
        let Some(next) = (!preceded).then(|| step(op, state)).flatten() else {
            return false;
        };
        let rest: Vec<Candidate> = (left.iter().enumerate())
            .filter(|&(j, _)| j != i)
            .map(|(_, c)| *c)
            .collect();
        orderable(&rest, &next)
    })
}

/// Failed ops had no effect, and timed-out reads observed nothing.
fn takes_part(op: &Op) -> bool {
    match op.outcome {
        Outcome::Failed => false,
        Outcome::Unknown => op.kind != OpKind::Read,
        _ => true,
    }
}

/// The brute force's verdict: `None` if linearizable, else the culprit, found as the first
/// return event (in the checker's event order) up to which the history has no linearization.
fn brute_force(history: &History) -> Option<usize> {
    let candidates: Vec<Candidate> = (history.ops.iter().enumerate())
        .filter(|(_, op)| takes_part(op))
        .map(|(i, op)| {
            (
                i,
                op.invoke_ns,
                op.complete_ns.filter(|_| op.outcome != Outcome::Unknown),
                op,
            )
        })
        .collect();
    let mut returns: Vec<(u64, usize)> = candidates
        .iter()
        .filter_map(|&(i, _, ret, _)| Some((ret?, i)))
        .collect();
    returns.sort();
    returns.into_iter().find_map(|(time, culprit)| {
        // Up to this return event: ops invoked by then; those returning later are pending.
        let truncated: Vec<Candidate> = (candidates.iter())
            .filter(|&&(_, call, _, _)| call <= time)
            .map(|&(i, call, ret, op)| {
                (i, call, ret.filter(|&ret| (ret, i) <= (time, culprit)), op)
            })
            .filter(|&(_, _, ret, op)| ret.is_some() || op.kind != OpKind::Read)
            .collect();
        (!orderable(&truncated, &None)).then_some(culprit)
    })
}

#[test]
fn search_agrees_with_brute_force_on_small_random_histories() {
    let mut rng = Rng(2024);
    let (mut linearizable, mut not) = (0, 0);
    for round in 0..20_000 {
        // Every other history is heavy with timed-out ops, which most of the pruning is about.
        let unknown_one_in = if round % 2 == 0 { 3 } else { 8 };
        let history = History {
            ops: (0..1 + rng.below(9))
                .map(|_| random_op(&mut rng, unknown_one_in))
                .collect(),
        };
        let report = check_linearizable(&history, 1_000_000);
        assert!(report.keys_timed_out.is_empty() && report.malformed.is_empty());
        let culprit = report.violations.first().map(|violation| violation.culprit);
        assert_eq!(
            culprit,
            brute_force(&history),
            "round {round}: {history:#?}\n{report}"
        );
        match culprit {
            None => linearizable += 1,
            Some(_) => not += 1,
        }
    }
    assert!(
        linearizable > 2_000 && not > 2_000,
        "both verdicts exercised: {linearizable} / {not}"
    );
}
