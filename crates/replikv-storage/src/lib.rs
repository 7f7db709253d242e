//! The embedded storage engine behind a small interface. It knows nothing of Raft: it stores
//! byte records in tables keyed by partition, and commits writes through one writer thread
//! per database file. A node has two files (`Stores`): the logs, and the state machines.
//!
//! ```text
//!   callers ──submit(job)──► writer thread ──one redb write transaction per batch──► disk
//!                            (drains every queued job, commits once, then answers them all)
//! ```
//! The deterministic simulation opens the same stores in memory (`Stores::in_memory`), with
//! the writer as a tokio task running the same loop body (`WriterKind::Task`).
//! That single writer is the group commit: under `fsync: always`, many Raft groups' appends
//! share one fsync. Reads open a redb read transaction (MVCC) and never wait for the writer.
//!
//! Tables (all keyed by partition first, so one partition's records are contiguous):
//! - `log`: (partition, index) → record bytes (the Raft layer adds its own checksums)
//! - `meta`: (partition, name) → bytes (vote, committed, purged, applied, membership)
//! - `kv`: (partition, key) → value bytes (the state machine)
//! - `snapshot`: partition → the latest snapshot's bytes

mod raft_log;
mod store;

pub use raft_log::{FsLogDir, LogDir, LogOp, MemLogDir, RaftLog, SEGMENT_BYTES};

pub use store::{FsyncPolicy, ReadTx, StorageError, Store, Stores, WriteTx, WriterKind};
