//! The embedded storage behind a small interface. It knows nothing of Raft: it stores byte
//! records keyed by partition, and writes through one writer per store. A node has two
//! (`Stores`):
//! - the Raft logs ([`RaftLog`], `raft_log.rs`): append-only segment files in `log/`, with
//!   every partition's entries, votes and commit points, and an in-memory index for reads;
//! - the state machines ([`Store`], `store.rs`): one redb database, `state.redb`.
//!
//! ```text
//!   callers ──submit(job)──► writer thread ──one batch: every queued job──► disk
//!                            (log: one write + at most one fdatasync; state: one redb commit)
//! ```
//! That single writer is the group commit: under `fsync: always`, many Raft groups' appends
//! share one fsync. Readers never wait for a writer: the log's index points at bytes that are
//! never overwritten, and redb reads are MVCC. The deterministic simulation opens the same
//! stores on simulated disks, with each writer a tokio task running the same loop body
//! (`WriterKind::Task`).
//!
//! The state file's tables (all keyed by partition first):
//! - `meta`: (partition, name) → bytes (applied offset, membership)
//! - `kv`: (partition, key) → value bytes (the state machine)
//! - `snapshot`: partition → the latest snapshot's bytes

mod raft_log;
mod space;
mod store;

pub use raft_log::{
    BadSpan, Damage, DamagedLog, FsLogDir, LogDir, LogOp, MemLogDir, Opened, RaftLog, SEGMENT_BYTES,
};

pub use space::{is_no_space, DiskSpace};
pub use store::{FsyncPolicy, ReadTx, StorageError, Store, Stores, WriteTx, WriterKind};

/// Shared by the tests of both stores.
#[cfg(test)]
pub(crate) mod test_util {
    use std::time::{Duration, Instant};

    /// Waits until `cond()` holds; panics with `what` after `secs` seconds.
    pub async fn wait_until(secs: u64, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `syncs()` moves on from its value now (a flusher ran); panics with `what`
    /// after `secs` seconds.
    pub async fn wait_for_a_sync(syncs: impl Fn() -> u64, secs: u64, what: &str) {
        let from = syncs();
        wait_until(secs, what, || syncs() != from).await;
    }
}
