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
use serde::{Deserialize, Serialize};

/// A node's id, as given by `--node-id`.
pub type NodeId = u64;
/// A partition of a keyspace.
pub type PartitionId = u32;
/// A keyspace, by its number: the `db` that `SELECT` names, `default` being 0.
pub type KeyspaceId = u32;
/// A Raft log index within one partition (the seeds' "offset").
pub type Offset = u64;

/// The one keyspace that always exists.
pub const DEFAULT_KEYSPACE: &str = "default";
/// The number of [`DEFAULT_KEYSPACE`].
pub const DEFAULT_KEYSPACE_ID: KeyspaceId = 0;

/// One Raft group: a partition of a keyspace, or the meta group ([`GroupId::META`]), which
/// holds the topology. What peer messages, log records, state-file tables, metrics and status
/// name a group by.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct GroupId {
    pub keyspace: KeyspaceId,
    pub partition: PartitionId,
}

impl GroupId {
    /// The keyspace number no keyspace is given: it names the meta group.
    pub const META_KEYSPACE: KeyspaceId = KeyspaceId::MAX;
    /// The meta group.
    pub const META: GroupId = GroupId {
        keyspace: Self::META_KEYSPACE,
        partition: 0,
    };

    pub const fn new(keyspace: KeyspaceId, partition: PartitionId) -> GroupId {
        GroupId {
            keyspace,
            partition,
        }
    }

    /// Partition `partition` of the default keyspace.
    pub const fn default_keyspace(partition: PartitionId) -> GroupId {
        GroupId::new(DEFAULT_KEYSPACE_ID, partition)
    }

    pub fn is_meta(&self) -> bool {
        self.keyspace == Self::META_KEYSPACE
    }
}

impl std::fmt::Display for GroupId {
    /// `meta`, or `KEYSPACE/PARTITION` by numbers (`0/3`: partition 3 of `default`). The
    /// alternate form (`{:#}`) is for messages: `the meta group`, `partition 3` in the
    /// default keyspace, `partition 3 of keyspace 5` in another.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.is_meta(), f.alternate()) {
            (true, false) => f.write_str("meta"),
            (true, true) => f.write_str("the meta group"),
            (false, false) => write!(f, "{}/{}", self.keyspace, self.partition),
            (false, true) if self.keyspace == DEFAULT_KEYSPACE_ID => {
                write!(f, "partition {}", self.partition)
            }
            (false, true) => write!(
                f,
                "partition {} of keyspace {}",
                self.partition, self.keyspace
            ),
        }
    }
}
