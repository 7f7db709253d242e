//! The shared vocabulary of replikv: ids, the replicated write commands, replies, the
//! consistency and read-preference options a request carries, and the one error type whose
//! variants say what the caller must decide (retry elsewhere, retry later, give up).
//!
//! Nothing here does I/O but [`refuse`], which answers and closes a connection beyond a
//! listener's cap. Front ends (RESP, HTTP) turn requests into these types, the cluster layer
//! routes them, and the state machine applies [`KvOp`]s deterministically. Every listener
//! caps its connections and paces its failed accepts with the `connections` module's types.

mod command;
mod connections;
mod consistency;
mod error;
mod glob;

pub use command::{
    apply_one, apply_op, format_float, Change, ExpireCond, Expiry, KeyTable, KvOp, Ops, Replies,
    Reply, SetCond, StoredValue, ValueWithTtl, WriteOutcome, WriteRequest,
};
pub use connections::{refuse, AcceptBackoff, ConnLimit, ConnSlot, WarnEvery};
pub use consistency::{Consistency, ReadPreference};
pub use error::{Commit, Error};
pub use glob::glob_match;

/// A node's id, as given by `--node-id`.
pub type NodeId = u64;
/// A partition of a keyspace: one Raft group.
pub type PartitionId = u32;
/// A Raft log index within one partition (the seeds' "offset").
pub type Offset = u64;

/// The one keyspace that always exists.
pub const DEFAULT_KEYSPACE: &str = "default";
