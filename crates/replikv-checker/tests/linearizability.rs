//! Scenario tests for `check_linearizable`: hand-written histories with a known verdict, then
//! large generated ones. Each test's name says the scenario and the promise it checks.

mod common;

use common::*;
use replikv_checker::{check_linearizable, History, LinearizabilityReport, Op, OpKind, Outcome};
use std::collections::BTreeMap;

const BUDGET: usize = 1_000_000;

fn check(ops: Vec<Op>) -> LinearizabilityReport {
    check_linearizable(&History { ops }, BUDGET)
}

fn assert_linearizable(ops: Vec<Op>) {
    let report = check(ops);
    assert!(
        report.is_linearizable(),
        "expected linearizable, got:\n{report}"
    );
}

/// Asserts a single violation and returns its culprit's index.
fn assert_violation(ops: Vec<Op>) -> usize {
    let report = check(ops);
    assert_eq!(
        report.violations.len(),
        1,
        "expected one violation, got:\n{report}"
    );
    assert!(report.keys_timed_out.is_empty(), "{report}");
    report.violations[0].culprit
}

#[test]
fn sequential_history_is_linearizable() {
    assert_linearizable(vec![
        read(1, None, (0, 10)),
        write(1, "a", (20, 30)),
        read(2, Some("a"), (40, 50)),
        write(2, "b", (60, 70)),
        read(1, Some("b"), (80, 90)),
    ]);
}

#[test]
fn empty_history_is_linearizable() {
    let report = check(vec![]);
    assert!(report.is_linearizable());
    assert_eq!((report.keys_checked, report.ops_checked), (0, 0));
}

#[test]
fn concurrent_writes_allow_reads_of_either_order() {
    // Two overlapping writes, seen concurrently in both states; readers after both agree on
    // one winner, whichever it is.
    for winner in ["a", "b"] {
        assert_linearizable(vec![
            write(1, "a", (0, 100)),
            write(2, "b", (10, 90)),
            read(3, Some("a"), (20, 30)),
            read(4, Some("b"), (20, 30)),
            read(3, Some(winner), (110, 120)),
            read(4, Some(winner), (130, 140)),
        ]);
    }
}

#[test]
fn stale_read_after_completed_write_is_a_violation() {
    let report = check(vec![
        write(1, "a", (0, 10)),
        write(1, "b", (20, 30)),
        read(2, Some("a"), (40, 50)),
    ]);
    assert_eq!(report.violations.len(), 1, "{report}");
    let violation = &report.violations[0];
    assert_eq!(violation.culprit, 2);
    let expected =
        "register holding \"b\"; \"a\" was written by op #0 and surely overwritten by op #1";
    assert!(violation.explanation.contains(expected), "{violation}");
}

#[test]
fn read_of_nil_after_completed_write_is_a_violation() {
    assert_violation(vec![write(1, "a", (0, 10)), read(2, None, (20, 30))]);
}

#[test]
fn read_of_a_value_never_written_is_a_violation() {
    let report = check(vec![
        write(1, "a", (0, 10)),
        read(2, Some("ghost"), (5, 30)),
    ]);
    let violation = &report.violations[0];
    assert_eq!(violation.culprit, 1);
    assert!(
        violation.explanation.contains("no op ever wrote \"ghost\""),
        "{violation}"
    );
}

#[test]
fn unknown_write_may_have_taken_effect() {
    // The write timed out, yet a later read sees it: it took effect.
    assert_linearizable(vec![
        write(1, "a", (0, 10)),
        unknown_write(2, "b", 20),
        read(3, Some("b"), (1_000, 1_010)),
        read(3, Some("b"), (2_000, 2_010)),
    ]);
}

#[test]
fn unknown_write_may_never_take_effect() {
    assert_linearizable(vec![
        write(1, "a", (0, 10)),
        unknown_write(2, "b", 20),
        read(3, Some("a"), (1_000, 1_010)),
        read(3, Some("a"), (2_000, 2_010)),
    ]);
}

#[test]
fn unknown_write_may_take_effect_late_but_only_once() {
    // Seen, then overwritten: fine. Seen again after the overwrite: impossible.
    let mut ops = vec![
        unknown_write(1, "u", 0),
        read(2, Some("u"), (100, 110)),
        write(2, "w", (200, 210)),
        read(2, Some("w"), (300, 310)),
    ];
    assert_linearizable(ops.clone());
    ops.push(read(3, Some("u"), (400, 410)));
    assert_eq!(assert_violation(ops), 4);
}

#[test]
fn unknown_write_cannot_take_effect_before_its_invocation() {
    let report = check(vec![read(1, Some("u"), (0, 10)), unknown_write(2, "u", 20)]);
    let violation = &report.violations[0];
    assert_eq!(violation.culprit, 0);
    assert!(
        violation
            .explanation
            .contains("invoked after this read completed"),
        "{violation}"
    );
}

#[test]
fn failed_write_seen_by_a_read_is_a_violation() {
    let report = check(vec![
        write(1, "a", (0, 10)),
        failed_write(2, "f", (20, 30)),
        read(3, Some("f"), (40, 50)),
    ]);
    assert_eq!(report.violations.len(), 1, "{report}");
    let violation = &report.violations[0];
    assert_eq!(violation.culprit, 2);
    assert!(
        violation.explanation.contains("which did not take effect"),
        "{violation}"
    );
    assert_eq!(
        report.ops_checked, 2,
        "the failed write takes no part in the search"
    );
}

#[test]
fn cas_that_swaps_from_the_current_value_is_linearizable() {
    assert_linearizable(vec![
        cas(1, None, "a", (0, 10), true), // SET NX on an absent key
        cas(2, Some("a"), "b", (20, 30), true),
        cas(3, Some("a"), "c", (40, 50), false),
        cas(1, None, "d", (60, 70), false), // SET NX on a present key
        read(2, Some("b"), (80, 90)),
    ]);
}

#[test]
fn cas_that_swaps_from_a_value_the_key_does_not_hold_is_a_violation() {
    assert_eq!(
        assert_violation(vec![
            write(1, "a", (0, 10)),
            cas(2, Some("z"), "b", (20, 30), true)
        ]),
        1
    );
}

#[test]
fn cas_that_refuses_although_the_key_holds_its_expected_value_is_a_violation() {
    assert_eq!(
        assert_violation(vec![
            write(1, "a", (0, 10)),
            cas(2, Some("a"), "b", (20, 30), false)
        ]),
        1
    );
}

#[test]
fn set_nx_that_succeeds_on_a_present_key_is_a_violation() {
    assert_eq!(
        assert_violation(vec![
            write(1, "a", (0, 10)),
            cas(2, None, "b", (20, 30), true)
        ]),
        1
    );
}

#[test]
fn two_set_nx_cannot_both_succeed() {
    let culprit = assert_violation(vec![
        cas(1, None, "a", (0, 100), true),
        cas(2, None, "b", (10, 90), true),
    ]);
    assert!(culprit <= 1);
}

#[test]
fn concurrent_cas_may_fail_before_the_write_it_expects() {
    assert_linearizable(vec![
        write(1, "a", (0, 100)),
        cas(2, Some("a"), "b", (10, 20), false),
        read(3, Some("a"), (110, 120)),
    ]);
}

#[test]
fn unknown_cas_may_or_may_not_swap() {
    let unknown_cas = Op {
        client: 2,
        key: "x".into(),
        kind: OpKind::Cas {
            expected: Some("a".into()),
            new: "b".into(),
        },
        invoke_ns: 20,
        complete_ns: None,
        outcome: Outcome::Unknown,
    };
    for seen in ["a", "b"] {
        assert_linearizable(vec![
            write(1, "a", (0, 10)),
            unknown_cas.clone(),
            read(3, Some(seen), (100, 110)),
        ]);
    }
    // It cannot swap from a value the key never held at the time.
    let stale = vec![
        write(1, "a", (0, 10)),
        write(1, "c", (15, 18)),
        unknown_cas,
        read(3, Some("b"), (100, 110)),
    ];
    assert_eq!(assert_violation(stale), 3);
}

#[test]
fn reads_observing_two_writes_in_opposite_orders_is_a_violation() {
    // The classic: while writes of 1 and 2 are in flight, client 3 sees 1 then 2 and client 4
    // sees 2 then 1. Each order alone is fine; both cannot be.
    let ops = vec![
        write(1, "1", (0, 100)),
        write(2, "2", (0, 100)),
        read(3, Some("1"), (10, 20)),
        read(3, Some("2"), (30, 40)),
        read(4, Some("2"), (10, 20)),
        read(4, Some("1"), (30, 40)),
    ];
    let report = check(ops);
    assert_eq!(report.violations.len(), 1, "{report}");
    let violation = &report.violations[0];
    assert!([3, 5].contains(&violation.culprit), "{violation}");
    assert_eq!(violation.window.len(), 6, "{violation}");
    let printed = violation.to_string();
    assert!(printed.contains(">>"), "{printed}");
}

#[test]
fn keys_are_checked_independently() {
    let ops = vec![
        on_key("a", write(1, "1", (0, 10))),
        on_key("b", read(2, Some("1"), (20, 30))),
        on_key("c", write(3, "3", (0, 10))),
        on_key("c", read(3, Some("3"), (20, 30))),
    ];
    let report = check(ops);
    assert_eq!(report.keys_checked, 3);
    assert_eq!(report.violations.len(), 1, "{report}");
    assert_eq!(report.violations[0].key, "b");
}

#[test]
fn malformed_ops_are_reported_and_left_out() {
    let mut backwards = write(1, "a", (50, 40));
    backwards.complete_ns = Some(40);
    let report = check(vec![backwards, read(2, None, (60, 70))]);
    assert_eq!(report.malformed.len(), 1, "{report}");
    assert_eq!(report.malformed[0].index, 0);
    assert!(report.violations.is_empty());
    assert!(!report.is_linearizable());
}

#[test]
fn budget_exhaustion_marks_the_key_timed_out_not_failed() {
    // Twenty concurrent writes and reads of every value: many orders to consider.
    let mut ops: Vec<Op> = (0..20)
        .map(|i| on_key("busy", write(i, &i.to_string(), (0, 1_000))))
        .collect();
    ops.extend((0..20).map(|i| {
        on_key(
            "busy",
            read(i, Some(&((i * 7) % 20).to_string()), (10, 990)),
        )
    }));
    ops.push(on_key("quiet", write(1, "q", (0, 10))));
    ops.push(on_key("quiet", read(1, Some("q"), (20, 30))));
    let report = check_linearizable(&History { ops }, 50);
    assert_eq!(report.keys_timed_out, vec!["busy".to_owned()], "{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.keys_checked, 2);
}

#[test]
fn history_survives_a_json_round_trip() {
    let history = History {
        ops: vec![
            write(1, "a", (0, 10)),
            unknown_write(2, "b", 20),
            cas(3, None, "c", (5, 6), false),
        ],
    };
    assert_eq!(
        History::from_json(&history.to_json()).expect("own output parses"),
        history
    );
}

// ---- generated histories -------------------------------------------------------------------

/// SplitMix64: tiny, deterministic, good enough to pick ops.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// A valid execution: op `i` takes effect alone at `10_000 + 100 * i` ns on a model register
/// per key, then its window is widened by up to `jitter_ns` each side, so windows overlap
/// while still containing the real effect point. Some ops time out (their effect may or may
/// not have happened) and some fail outright (no effect). Every written value is unique.
fn generate(seed: u64, op_count: usize, keys: &[&str], jitter_ns: u64) -> History {
    let mut rng = Rng(seed);
    let mut state: BTreeMap<&str, String> = BTreeMap::new();
    let mut ops = Vec::with_capacity(op_count);
    for i in 0..op_count {
        let key = keys[rng.below(keys.len() as u64) as usize];
        let current = state.get(key).cloned();
        let value = format!("v{i}");
        let (kind, outcome, effect) = match rng.below(10) {
            0..=3 => (OpKind::Read, Outcome::Read(current), None),
            4..=6 => (OpKind::Write(value.clone()), Outcome::Written, Some(value)),
            _ => {
                let expected = if rng.below(3) > 0 {
                    current.clone()
                } else {
                    Some(format!("v{}", rng.below(i as u64 + 1)))
                };
                let swapped = expected == current;
                (
                    OpKind::Cas {
                        expected,
                        new: value.clone(),
                    },
                    Outcome::CasResult(swapped),
                    swapped.then_some(value),
                )
            }
        };
        let (outcome, effect) = match rng.below(25) {
            0 => (Outcome::Unknown, effect),
            1 => (Outcome::Unknown, None),
            2 => (Outcome::Failed, None),
            _ => (outcome, effect),
        };
        if let Some(value) = effect {
            state.insert(key, value);
        }
        let effect_ns = 10_000 + 100 * i as u64;
        let complete_ns = (outcome != Outcome::Unknown).then(|| effect_ns + rng.below(jitter_ns));
        let invoke_ns = effect_ns - rng.below(jitter_ns);
        ops.push(Op {
            client: rng.below(16),
            key: key.to_owned(),
            kind,
            invoke_ns,
            complete_ns,
            outcome,
        });
    }
    ops.sort_by_key(|op| op.invoke_ns);
    History { ops }
}

/// Makes one read return a value overwritten before the read began: `w1` completed, then `w2`
/// ran entirely, then the read ran and returned `w1`'s value. Returns the read's index.
fn corrupt_one_read(history: &mut History) -> usize {
    let ops = &history.ops;
    let acknowledged_write = |op: &Op, key: &str| op.key == key && op.outcome == Outcome::Written;
    let (read, stale) = (ops.len() / 2..ops.len())
        .filter(|&r| matches!(ops[r].outcome, Outcome::Read(_)))
        .find_map(|r| {
            let key = &ops[r].key;
            let w2 = ops
                .iter()
                .rev()
                .find(|w| acknowledged_write(w, key) && w.complete_ns < Some(ops[r].invoke_ns))?;
            let w1 = ops
                .iter()
                .rev()
                .find(|w| acknowledged_write(w, key) && w.complete_ns < Some(w2.invoke_ns))?;
            let OpKind::Write(stale) = &w1.kind else {
                unreachable!("acknowledged writes are writes")
            };
            Some((r, stale.clone()))
        })
        .expect("a long history has a read after two sequential writes");
    history.ops[read].outcome = Outcome::Read(Some(stale));
    read
}

#[test]
fn large_generated_history_is_linearizable() {
    let history = generate(7, 4_000, &["k0", "k1", "k2", "k3"], 1_500);
    let report = check_linearizable(&history, BUDGET);
    assert!(report.is_linearizable(), "{report}");
    assert_eq!(report.keys_checked, 4);
    assert!(report.ops_checked > 3_000, "{report}");
}

#[test]
fn large_generated_history_with_one_stale_read_names_that_read() {
    let mut history = generate(11, 4_000, &["k0", "k1", "k2", "k3"], 1_500);
    let corrupted = corrupt_one_read(&mut history);
    let report = check_linearizable(&history, BUDGET);
    assert_eq!(report.violations.len(), 1, "{report}");
    assert!(report.keys_timed_out.is_empty(), "{report}");
    let violation = &report.violations[0];
    assert_eq!(
        (violation.key.as_str(), violation.culprit),
        (history.ops[corrupted].key.as_str(), corrupted),
        "{violation}"
    );
    assert!(violation
        .window
        .iter()
        .any(|(index, _)| *index == corrupted));
    assert!(
        violation.explanation.contains("surely overwritten by op"),
        "{violation}"
    );
}
