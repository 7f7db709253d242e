//! openraft wired to replikv's storage: the type configuration, the durable log store, the
//! state machine, snapshots, and the waiters that let a proposer learn when its entry reached
//! the leader's disk (for `eventual` and `at_least(n)` writes).
//!
//! ```text
//!  Raft core ──append(entries)──► LogStore ──job──► Store writer (group commit, fsync)
//!      │                             └─ on flush: AppendWaiters (req_id → offset)
//!      └──apply(entries)──► StateMachine ──► Overlay (memory) ──checkpoint job──► Store writer
//!                                                       (thousands of keys at a time, no fsync: the log is durable)
//! ```
//! Every log record and snapshot carries a CRC32C; a torn log tail is cut when the log opens,
//! damage to the log is refused or repaired by `damage.rs`, and a snapshot that fails its
//! checksum is refused.

// openraft's storage traits fix the error type (`openraft::StorageError`, over 200 bytes);
// the helpers that feed them return it too rather than convert at every call.
#![allow(clippy::result_large_err)]

mod damage;
mod log_store;
mod overlay;
mod purge_gate;
mod record;
mod snapshot;
mod state_machine;

use std::io::Cursor;

use replikv_types::GroupId;

pub use damage::{open_stores, repair_log, repair_log_hosting, MIN_ENTRY_RECORD};
pub use log_store::{contiguous_from, AppendSignals, AppendWaiters, LogStore, Recovery};
pub use overlay::CheckpointLimits;
pub use purge_gate::PurgeGate;
pub use record::{decode_record, encode_record, RecordError};
pub use snapshot::{SnapshotFile, SNAPSHOT_MAGIC};
pub use state_machine::{ExpiryPage, KvView, StateMachine};

openraft::declare_raft_types!(
    /// The openraft type configuration of a partition group.
    pub TypeConfig:
        D = replikv_types::WriteRequest,
        R = replikv_types::Replies,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type Membership = openraft::StoredMembership<u64, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<u64>;

pub(crate) fn storage_error(e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::<u64>::write(&std::io::Error::other(e.to_string())).into()
}

pub(crate) fn read_error(e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::<u64>::read(&std::io::Error::other(e.to_string())).into()
}

/// Opens group `group`'s log store and state machine.
pub fn open_group(
    stores: &replikv_storage::Stores,
    group: GroupId,
) -> Result<(LogStore, StateMachine), StorageError> {
    let sm = StateMachine::open(stores.state.clone(), group)?;
    let log = LogStore::open(stores.log.clone(), group, sm.purge_gate())?;
    // The log is purged only below a snapshot the state file holds durably; a state file
    // behind the purge point lost a durable commit (redb rolls back a newest commit whose
    // pages fail their checksums after a crash, silently), and openraft would rebuild a
    // snapshot from it: refuse instead.
    let applied = sm.applied_in_file()?.map(|l| l.index);
    if let Some(purged) = stores.log.purged(group).map(|(i, _)| i) {
        if applied.is_none_or(|a| a < purged) {
            return Err(read_error(format!(
                "group {group}: the state file's applied offset ({applied:?}) is behind \
                 the log's purge point ({purged}): the state file lost a durable commit. \
                 Refusing to start on it; move this node's data directory away and start the \
                 node on an empty one to take a fresh copy from its replicas"
            )));
        }
    }
    Ok((log, sm))
}
