//! The one error type, with variants grouped by what the caller must decide: retry on
//! another node (`NotLeader`, `Moved`), retry later (`ClusterDown`, `TryAgain`, `NoQuorum`,
//! `Timeout`, `DiskFull`), or give up and fix the request (`InvalidArgument`, `TooLarge`, `ReadOnly`,
//! `UnknownKeyspace`). Front ends convert it once, at the edge, to RESP and to HTTP.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::{GroupId, NodeId};

/// Whether a write that failed to meet its consistency level was committed anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Commit {
    /// It was never proposed, or it is known not to be in the log: retrying is safe.
    No,
    /// It is committed (it will not be lost) but fewer copies than asked hold it yet.
    Yes,
    /// It may or may not commit later (the proposer lost track of it).
    Unknown,
}

impl fmt::Display for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Commit::No => "not committed",
            Commit::Yes => "committed",
            Commit::Unknown => "commit unknown",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// This node does not lead the group; `leader` is who does, if known.
    #[error("not the leader of {group:#} (leader: {leader:?})")]
    NotLeader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    /// Redis Cluster redirection, when `resp.redirect` is on.
    #[error("MOVED {slot} {addr}")]
    Moved { slot: u16, addr: String },
    /// No leader is known for the group (election under way or majority lost).
    #[error("{group:#} has no leader: {detail}")]
    ClusterDown { group: GroupId, detail: String },
    /// The level cannot be met now: a majority (or the replicas asked for) is unreachable.
    #[error("{detail} ({committed})")]
    NoQuorum { committed: Commit, detail: String },
    /// The level was not met within the write timeout.
    #[error("{detail} ({committed})")]
    Timeout { committed: Commit, detail: String },
    /// A transient condition (leadership moving, replica catching up): retry shortly.
    #[error("{0}")]
    TryAgain(String),
    /// A write sent to a replica that only serves reads.
    #[error("{0}")]
    ReadOnly(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("unknown keyspace {0:?}")]
    UnknownKeyspace(String),
    /// A fault inside this node (storage error, shut down). Logged where it happens.
    #[error("internal error: {0}")]
    Internal(String),
    /// The leader cannot make the write durable: its disk is full, or below the reserve
    /// `storage.min_free_bytes`. Nothing was written; reads still work.
    #[error("{0}")]
    DiskFull(String),
}

impl Error {
    /// The Redis error line for this error, without the leading `-`.
    pub fn to_resp(&self) -> String {
        match self {
            Error::NotLeader { .. } | Error::ClusterDown { .. } => format!("CLUSTERDOWN {self}"),
            Error::Moved { .. } => self.to_string(),
            Error::NoQuorum { .. } => format!("NOQUORUM {self}"),
            Error::Timeout { .. } => format!("TIMEOUT {self}"),
            Error::TryAgain(m) => format!("TRYAGAIN {m}"),
            Error::ReadOnly(m) => format!("READONLY {m}"),
            Error::InvalidArgument(m) | Error::TooLarge(m) => {
                if m.starts_with("ERR ") || m.starts_with("WRONGTYPE ") {
                    m.clone()
                } else {
                    format!("ERR {m}")
                }
            }
            Error::UnknownKeyspace(_) | Error::Internal(_) => format!("ERR {self}"),
            // Redis's prefix for "cannot persist, writes disabled" (stop-writes-on-bgsave-error).
            Error::DiskFull(m) => format!(
                "MISCONF Errors writing to the disk: {m}. Commands that may modify the data set \
                 are disabled until there is room again; reads still work"
            ),
        }
    }

    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InvalidArgument(_) => 400,
            Error::UnknownKeyspace(_) => 404,
            Error::ReadOnly(_) => 403,
            Error::TooLarge(_) => 413,
            Error::Moved { .. } => 421,
            Error::Timeout { .. } => 504,
            Error::Internal(_) => 500,
            Error::DiskFull(_) => 507,
            Error::NotLeader { .. }
            | Error::ClusterDown { .. }
            | Error::NoQuorum { .. }
            | Error::TryAgain(_) => 503,
        }
    }

    /// Whether the write may have been committed, for errors that answer a write.
    pub fn committed(&self) -> Commit {
        match self {
            Error::NoQuorum { committed, .. } | Error::Timeout { committed, .. } => *committed,
            _ => Commit::No,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_lines_use_redis_prefixes() {
        let e = Error::NoQuorum {
            committed: Commit::No,
            detail: "2 of 3 replicas unreachable".into(),
        };
        assert_eq!(
            e.to_resp(),
            "NOQUORUM 2 of 3 replicas unreachable (not committed)"
        );
        let e = Error::InvalidArgument("wrong number of arguments for 'get' command".into());
        assert_eq!(
            e.to_resp(),
            "ERR wrong number of arguments for 'get' command"
        );
        assert_eq!(Error::TryAgain("x".into()).http_status(), 503);
    }
}
