//! Builders for hand-written histories, shared by the scenario tests.
#![allow(dead_code)] // each test file uses a different subset

use replikv_checker::{Op, OpKind, Outcome};

/// A completed op on key "x" unless the test renames it.
fn op(client: u64, kind: OpKind, span: (u64, u64), outcome: Outcome) -> Op {
    Op {
        client,
        key: "x".into(),
        kind,
        invoke_ns: span.0,
        complete_ns: Some(span.1),
        outcome,
    }
}

pub fn write(client: u64, value: &str, span: (u64, u64)) -> Op {
    op(client, OpKind::Write(value.into()), span, Outcome::Written)
}

pub fn read(client: u64, seen: Option<&str>, span: (u64, u64)) -> Op {
    op(
        client,
        OpKind::Read,
        span,
        Outcome::Read(seen.map(str::to_owned)),
    )
}

pub fn cas(client: u64, expected: Option<&str>, new: &str, span: (u64, u64), swapped: bool) -> Op {
    let kind = OpKind::Cas {
        expected: expected.map(str::to_owned),
        new: new.into(),
    };
    op(client, kind, span, Outcome::CasResult(swapped))
}

/// A write that timed out: the client never learned what happened.
pub fn unknown_write(client: u64, value: &str, invoke_ns: u64) -> Op {
    Op {
        client,
        key: "x".into(),
        kind: OpKind::Write(value.into()),
        invoke_ns,
        complete_ns: None,
        outcome: Outcome::Unknown,
    }
}

pub fn failed_write(client: u64, value: &str, span: (u64, u64)) -> Op {
    op(client, OpKind::Write(value.into()), span, Outcome::Failed)
}

pub fn on_key(key: &str, mut op: Op) -> Op {
    op.key = key.into();
    op
}
