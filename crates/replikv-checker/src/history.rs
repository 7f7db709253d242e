//! The recorded vocabulary: what a client asked for ([`OpKind`]), what it saw ([`Outcome`]),
//! and when ([`Op`]), gathered into a [`History`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// One operation on one key, as a client saw it. Times are monotonic nanoseconds from a common
/// origin shared by all clients of the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Which client issued the op; used only in reports.
    pub client: u64,
    /// The key the op touched.
    pub key: String,
    /// What the client asked for.
    pub kind: OpKind,
    /// When the client sent the request.
    pub invoke_ns: u64,
    /// When the client received the reply; `None` if it never did. Required for
    /// acknowledged outcomes; ignored for [`Outcome::Unknown`], whose effect may land later.
    pub complete_ns: Option<u64>,
    /// What the client learned.
    pub outcome: Outcome,
}

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    /// Read the key's value.
    Read,
    /// Set the key to this value.
    Write(String),
    /// Set the key to `new` if it currently holds `expected`. `expected: None` means "if the
    /// key is absent" (SET NX).
    Cas {
        /// The value the key must hold for the swap to happen; `None` = absent.
        expected: Option<String>,
        /// The value stored if the swap happens.
        new: String,
    },
}

/// What a client learned about its op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A [`OpKind::Read`] returned this value (`None` = the key was absent).
    Read(Option<String>),
    /// A [`OpKind::Write`] was acknowledged.
    Written,
    /// A [`OpKind::Cas`] was acknowledged: `true` if it swapped, `false` if the key did not
    /// hold the expected value (and so was left unchanged).
    CasResult(bool),
    /// The op definitely did not take effect (for example, rejected before being proposed).
    Failed,
    /// Timeout or dropped connection: the op may or may not have taken effect, at any time
    /// after its invocation.
    Unknown,
}

/// Everything the harness's clients did during one run, in any order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The ops; checkers refer to them by index into this vector.
    pub ops: Vec<Op>,
}

impl History {
    /// The history as JSON, for saving next to a failed run.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .expect("a history has only strings and integers, which JSON always encodes")
    }

    /// Reads a history saved by [`History::to_json`].
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

impl Op {
    /// Why this op contradicts itself and cannot be checked, or `None` if it is well formed.
    pub fn malformation(&self) -> Option<String> {
        let fits = matches!(
            (&self.kind, &self.outcome),
            (_, Outcome::Failed | Outcome::Unknown)
                | (OpKind::Read, Outcome::Read(_))
                | (OpKind::Write(_), Outcome::Written)
                | (OpKind::Cas { .. }, Outcome::CasResult(_))
        );
        if !fits {
            return Some(format!(
                "outcome {:?} does not fit a {}",
                self.outcome,
                self.kind_name()
            ));
        }
        match self.complete_ns {
            None if self.is_acknowledged() => {
                Some("acknowledged but has no completion time".into())
            }
            Some(done) if done < self.invoke_ns => Some("completes before it is invoked".into()),
            _ => None,
        }
    }

    /// True if the client got a definite reply saying what happened.
    pub(crate) fn is_acknowledged(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Read(_) | Outcome::Written | Outcome::CasResult(_)
        )
    }

    /// The value this op stores if it takes effect, for writes and compare-and-sets.
    pub(crate) fn stored_value(&self) -> Option<&str> {
        match &self.kind {
            OpKind::Read => None,
            OpKind::Write(value) | OpKind::Cas { new: value, .. } => Some(value),
        }
    }

    /// True if the op might have changed the key: a write or compare-and-set that neither
    /// failed nor reported that it did not swap.
    pub(crate) fn may_have_stored(&self) -> bool {
        self.stored_value().is_some()
            && !matches!(self.outcome, Outcome::Failed | Outcome::CasResult(false))
    }

    /// True if the op is known to have stored its value.
    pub(crate) fn stored_for_sure(&self) -> bool {
        matches!(self.outcome, Outcome::Written | Outcome::CasResult(true))
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            OpKind::Read => "read",
            OpKind::Write(_) => "write",
            OpKind::Cas { .. } => "cas",
        }
    }
}

/// Formats a register value the way reports print it: `nil` or a quoted string.
pub(crate) fn show_value(value: Option<&str>) -> String {
    match value {
        None => "nil".to_owned(),
        Some(value) => format!("{value:?}"),
    }
}

/// `client 3: read -> "v"`, `client 1: cas nil => "a" -> true`, ... (times are printed by the
/// caller, which knows what they are relative to).
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}: ", self.client)?;
        match &self.kind {
            OpKind::Read => write!(f, "read")?,
            OpKind::Write(value) => write!(f, "write {value:?}")?,
            OpKind::Cas { expected, new } => {
                write!(f, "cas {} => {new:?}", show_value(expected.as_deref()))?
            }
        }
        match &self.outcome {
            Outcome::Read(value) => write!(f, " -> {}", show_value(value.as_deref())),
            Outcome::Written => write!(f, " -> ok"),
            Outcome::CasResult(swapped) => write!(f, " -> {swapped}"),
            Outcome::Failed => write!(f, " -> failed"),
            Outcome::Unknown => write!(f, " -> unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, complete_ns: Option<u64>, outcome: Outcome) -> Op {
        Op {
            client: 1,
            key: "k".into(),
            kind,
            invoke_ns: 10,
            complete_ns,
            outcome,
        }
    }

    #[test]
    fn outcome_must_fit_kind() {
        let bad = op(OpKind::Read, Some(20), Outcome::Written);
        assert!(bad
            .malformation()
            .expect("a read cannot be written")
            .contains("read"));
        let good = op(OpKind::Write("a".into()), Some(20), Outcome::Written);
        assert_eq!(good.malformation(), None);
    }

    #[test]
    fn acknowledged_ops_need_a_sane_completion_time() {
        let missing = op(OpKind::Read, None, Outcome::Read(None));
        assert!(missing.malformation().is_some());
        let backwards = op(OpKind::Read, Some(5), Outcome::Read(None));
        assert!(backwards.malformation().is_some());
        let unknown = op(OpKind::Write("a".into()), None, Outcome::Unknown);
        assert_eq!(unknown.malformation(), None);
    }

    #[test]
    fn display_reads_like_a_log_line() {
        let cas = op(
            OpKind::Cas {
                expected: None,
                new: "a".into(),
            },
            Some(20),
            Outcome::CasResult(true),
        );
        assert_eq!(cas.to_string(), "client 1: cas nil => \"a\" -> true");
    }
}
