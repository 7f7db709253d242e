//! Scenario tests for `check_acknowledged_present`, the lost-write check of the unique-value
//! workload (each value written once, to its own key).

mod common;

use common::*;
use replikv_checker::{check_acknowledged_present, History, Op};
use std::collections::BTreeMap;

fn final_state(entries: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
    entries
        .iter()
        .map(|(key, value)| (key.to_string(), value.map(str::to_owned)))
        .collect()
}

fn history(ops: Vec<Op>) -> History {
    History { ops }
}

#[test]
fn every_acknowledged_write_present_passes() {
    let history = history(vec![
        on_key("k1", write(1, "a", (0, 10))),
        on_key("k2", cas(2, None, "b", (0, 10), true)),
    ]);
    let check = check_acknowledged_present(
        &history,
        &final_state(&[("k1", Some("a")), ("k2", Some("b"))]),
    );
    assert!(check.is_ok(), "{check:?}");
    assert_eq!(check.acknowledged, 2);
}

#[test]
fn acknowledged_write_missing_at_the_end_is_lost() {
    let history = history(vec![
        on_key("k1", write(1, "a", (0, 10))),
        on_key("k2", write(1, "b", (0, 10))),
    ]);
    // k2 is absent from the final read altogether: that counts as absent.
    let check = check_acknowledged_present(&history, &final_state(&[("k1", None)]));
    assert_eq!(
        check.lost,
        vec![
            ("k1".to_owned(), "a".to_owned()),
            ("k2".to_owned(), "b".to_owned())
        ]
    );
    assert!(!check.is_ok());
}

#[test]
fn acknowledged_write_replaced_by_an_earlier_one_is_lost() {
    let history = history(vec![write(1, "old", (0, 10)), write(1, "new", (20, 30))]);
    let check = check_acknowledged_present(&history, &final_state(&[("x", Some("old"))]));
    assert_eq!(check.lost, vec![("x".to_owned(), "new".to_owned())]);
}

#[test]
fn write_overwritten_by_a_later_or_concurrent_one_is_not_lost() {
    let history = history(vec![
        write(1, "a", (0, 10)),
        write(2, "b", (20, 30)),
        write(3, "c", (25, 40)),
    ]);
    for winner in ["b", "c"] {
        let check = check_acknowledged_present(&history, &final_state(&[("x", Some(winner))]));
        assert!(check.is_ok(), "{winner}: {check:?}");
    }
}

#[test]
fn unknown_write_may_overwrite_and_may_be_present() {
    let history = history(vec![write(1, "a", (0, 10)), unknown_write(2, "u", 20)]);
    let check = check_acknowledged_present(&history, &final_state(&[("x", Some("u"))]));
    assert!(check.is_ok(), "{check:?}");
    assert_eq!(check.unacknowledged_present, 1);
}

#[test]
fn value_of_a_failed_write_present_at_the_end_is_a_phantom() {
    let history = history(vec![
        failed_write(1, "f", (0, 10)),
        on_key("y", write(1, "a", (0, 10))),
    ]);
    let state = final_state(&[("x", Some("f")), ("y", Some("a")), ("z", Some("ghost"))]);
    let check = check_acknowledged_present(&history, &state);
    assert_eq!(
        check.phantom,
        vec![
            ("x".to_owned(), "f".to_owned()),
            ("z".to_owned(), "ghost".to_owned())
        ]
    );
    assert!(check.lost.is_empty());
}
